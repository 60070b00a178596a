//! The Kubernetes manifests under `deploy/`, parsed into typed k8s-openapi objects and held
//! to what `deploy/README.md` promises: no privileged container, an exact capability set,
//! probes and resources on every DaemonSet container, read-only RBAC on pods and namespaces,
//! a surge update, `NODE_NAME` from the downward API, a config that parses, kustomizations
//! that list only files that exist.
//!
//! No API server runs here, so this is the whole check of `deploy/` short of a cluster: a
//! field k8s-openapi does not know (a typo) fails the parse instead of being dropped the way
//! a lenient `kubectl apply` would drop it. Every check is a function returning the problems
//! it found, and the `bad_*` tests feed each one a deliberately broken manifest.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        batch::v1::Job,
        core::v1::{
            ConfigMap, Container, Namespace, PodSpec, Probe, Secret, ServiceAccount, Volume,
        },
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The capabilities the redirector container adds, exactly; deploy/README.md explains each.
const CAPABILITIES: &[&str] = &["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];
const NAMESPACE: &str = "egress-redirector";
const DAEMONSET: &str = "egress-redirector";
const SERVICE_ACCOUNT: &str = "egress-redirector";
const CONFIGMAP: &str = "egress-redirector-config";
const CONFIG_KEY: &str = "config.yaml";
const CONFIG_PATH: &str = "/etc/redirector/config.yaml";
const PIN_DIR: &str = "redirector";
const BPFFS_HOST: &str = "/sys/fs/bpf";
const CGROUP_HOST: &str = "/sys/fs/cgroup";
/// Keys of the daemon's config file (the long names of the `redirector run` flags).
const KEY_GATEWAY: &str = "gateway-url";
const KEY_SKIP: &str = "proxy-skip-range";
const KEY_ROUTES: &str = "routes";
const ROUTES: &[&str] = &["direct", "proxy", "gateway"];

// ---------------------------------------------------------------------------------------
// Loading

/// One object from a manifest, typed by its apiVersion and kind.
#[derive(Debug)]
enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ConfigMap(ConfigMap),
    Secret(Secret),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    DaemonSet(Box<DaemonSet>),
    Job(Box<Job>),
}

#[derive(Debug)]
struct Doc {
    /// `path#index`, for messages.
    source: String,
    object: Object,
}

/// The subset of kustomize's `Kustomization` these manifests use. Unknown fields are
/// refused so that a misspelt `resources` cannot silently list nothing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    images: Vec<KustomizeImage>,
    #[serde(default)]
    patches: Vec<KustomizePatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KustomizeImage {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KustomizePatch {
    path: Option<String>,
    patch: Option<String>,
    #[serde(default)]
    target: Option<Value>,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn is_yaml(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

fn is_kustomization(p: &Path) -> bool {
    matches!(
        p.file_name().and_then(|n| n.to_str()),
        Some("kustomization.yaml" | "kustomization.yml")
    )
}

/// Every YAML file below `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot read {}: {e}", d.display()));
        for e in entries {
            let p = e.expect("directory entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if is_yaml(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The documents of a (multi-document) YAML text as JSON values; empty documents dropped.
fn yaml_documents(source: &str, text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(de).map_err(|e| format!("{source}#{i}: not YAML: {e}"))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Parses every Kubernetes object of a YAML text; the first problem is the error.
fn parse_objects(source: &str, text: &str) -> Result<Vec<Doc>, String> {
    yaml_documents(source, text)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let source = format!("{source}#{i}");
            typed(&source, &v).map(|object| Doc { source, object })
        })
        .collect()
}

fn typed(source: &str, v: &Value) -> Result<Object, String> {
    let api = v
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("<none>");
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("<none>");
    Ok(match (api, kind) {
        ("v1", "Namespace") => Object::Namespace(decode(source, v)?),
        ("v1", "ServiceAccount") => Object::ServiceAccount(decode(source, v)?),
        ("v1", "ConfigMap") => Object::ConfigMap(decode(source, v)?),
        ("v1", "Secret") => Object::Secret(decode(source, v)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Object::ClusterRole(decode(source, v)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(decode(source, v)?)
        }
        ("apps/v1", "DaemonSet") => Object::DaemonSet(Box::new(decode(source, v)?)),
        ("batch/v1", "Job") => Object::Job(Box::new(decode(source, v)?)),
        _ => {
            return Err(format!(
                "{source}: unexpected kind {api}/{kind} (add it to the test if it belongs in deploy/)"
            ));
        }
    })
}

/// Deserializes into `T`, then serializes back and refuses any field that did not survive:
/// k8s-openapi ignores unknown fields, and a misspelt `readOnlyRootFilesytem` would
/// otherwise pass as if the setting were absent.
fn decode<T: DeserializeOwned + Serialize>(source: &str, v: &Value) -> Result<T, String> {
    let t: T = serde_json::from_value(v.clone()).map_err(|e| format!("{source}: {e}"))?;
    let back =
        serde_json::to_value(&t).map_err(|e| format!("{source}: cannot serialize back: {e}"))?;
    let mut lost = Vec::new();
    lost_fields("", v, &back, &mut lost);
    if lost.is_empty() {
        Ok(t)
    } else {
        Err(format!(
            "{source}: unknown fields (typo?): {}",
            lost.join(", ")
        ))
    }
}

/// Paths present (and not null) in `orig` but missing from `back`.
fn lost_fields(path: &str, orig: &Value, back: &Value, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (k, ov) in o {
                if ov.is_null() {
                    continue;
                }
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(bv) => lost_fields(&p, ov, bv, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) => {
            for (i, (ov, bv)) in o.iter().zip(b).enumerate() {
                lost_fields(&format!("{path}[{i}]"), ov, bv, out);
            }
        }
        _ => {}
    }
}

/// All objects of all manifests under `deploy/` (kustomization files excluded).
fn load_deploy() -> Vec<Doc> {
    let root = deploy_dir();
    let mut docs = Vec::new();
    for f in yaml_files(&root)
        .into_iter()
        .filter(|f| !is_kustomization(f))
    {
        let text = std::fs::read_to_string(&f)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", f.display()));
        let name = f.strip_prefix(&root).unwrap_or(&f).display().to_string();
        docs.extend(parse_objects(&name, &text).unwrap_or_else(|e| panic!("{e}")));
    }
    docs
}

fn daemonsets(docs: &[Doc]) -> Vec<(&str, &DaemonSet)> {
    docs.iter()
        .filter_map(|d| match &d.object {
            Object::DaemonSet(ds) => Some((d.source.as_str(), ds.as_ref())),
            _ => None,
        })
        .collect()
}

fn the_daemonset(docs: &[Doc]) -> &DaemonSet {
    let found: Vec<_> = daemonsets(docs)
        .into_iter()
        .filter(|(_, ds)| ds.metadata.name.as_deref() == Some(DAEMONSET))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one DaemonSet named {DAEMONSET}, found {}",
        found.len()
    );
    found[0].1
}

/// Pod specs of all workloads, with where they come from.
fn pod_specs(docs: &[Doc]) -> Vec<(String, &PodSpec)> {
    let mut out = Vec::new();
    for d in docs {
        let spec = match &d.object {
            Object::DaemonSet(ds) => ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
            Object::Job(j) => j.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
            _ => None,
        };
        if let Some(s) = spec {
            out.push((d.source.clone(), s));
        }
    }
    out
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("DaemonSet without a pod spec")
}

fn problems_to_result(what: &str, problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{what}:\n  - {}",
        problems.join("\n  - ")
    );
}

// ---------------------------------------------------------------------------------------
// Checks: each returns the problems it found (empty = fine)

/// No container (init containers included) runs privileged.
fn check_not_privileged(owner: &str, spec: &PodSpec) -> Vec<String> {
    all_containers(spec)
        .filter(|c| c.security_context.as_ref().and_then(|s| s.privileged) == Some(true))
        .map(|c| format!("{owner}: container {} is privileged", c.name))
        .collect()
}

fn probe_target(p: &Probe) -> String {
    if let Some(e) = &p.exec {
        e.command.clone().unwrap_or_default().join(" ")
    } else if let Some(h) = &p.http_get {
        h.path.clone().unwrap_or_default()
    } else {
        String::new()
    }
}

/// Every DaemonSet container has readiness and liveness probes and CPU and memory requests
/// and limits.
fn check_probes_and_resources(owner: &str, spec: &PodSpec) -> Vec<String> {
    let mut out = Vec::new();
    for c in &spec.containers {
        if c.readiness_probe.is_none() {
            out.push(format!(
                "{owner}: container {} has no readinessProbe",
                c.name
            ));
        }
        if c.liveness_probe.is_none() {
            out.push(format!(
                "{owner}: container {} has no livenessProbe",
                c.name
            ));
        }
    }
    for c in all_containers(spec) {
        let r = c.resources.as_ref();
        for (kind, map) in [
            ("requests", r.and_then(|r| r.requests.as_ref())),
            ("limits", r.and_then(|r| r.limits.as_ref())),
        ] {
            for res in ["cpu", "memory"] {
                if !map.is_some_and(|m| m.contains_key(res)) {
                    out.push(format!("{owner}: container {} has no {res} {kind}", c.name));
                }
            }
        }
    }
    out
}

fn int_or_string_is_zero(v: Option<&IntOrString>) -> bool {
    match v {
        None => false,
        Some(IntOrString::Int(i)) => *i == 0,
        Some(IntOrString::String(s)) => s == "0" || s == "0%",
    }
}

/// Rules any DaemonSet here must follow: every node (all taints tolerated), probes and
/// resources, and no surge when the pod uses the node's network (two pods would then fight
/// over the same loopback ports on one node).
fn check_any_daemonset(owner: &str, ds: &DaemonSet) -> Vec<String> {
    let mut out = Vec::new();
    let spec = pod_spec(ds);
    out.extend(check_not_privileged(owner, spec));
    out.extend(check_probes_and_resources(owner, spec));
    let tolerates_all =
        spec.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
    if !tolerates_all {
        out.push(format!(
            "{owner}: does not tolerate every taint (want `- operator: Exists`)"
        ));
    }
    let strategy = ds.spec.as_ref().and_then(|s| s.update_strategy.as_ref());
    let rolling = strategy.and_then(|s| s.rolling_update.as_ref());
    let surge = rolling.and_then(|r| r.max_surge.as_ref());
    let unavailable = rolling.and_then(|r| r.max_unavailable.as_ref());
    if int_or_string_is_zero(unavailable) && (surge.is_none() || int_or_string_is_zero(surge)) {
        out.push(format!(
            "{owner}: maxUnavailable 0 needs a non-zero maxSurge (the API rejects it)"
        ));
    }
    if spec.host_network == Some(true) && !(surge.is_none() || int_or_string_is_zero(surge)) {
        out.push(format!("{owner}: hostNetwork with maxSurge: the surge pod cannot bind the node's loopback ports"));
    }
    out
}

fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

fn volume<'a>(spec: &'a PodSpec, name: &str) -> Option<&'a Volume> {
    spec.volumes.iter().flatten().find(|v| v.name == name)
}

/// The host path behind a container path, through the container's hostPath mounts.
fn host_path_of(spec: &PodSpec, c: &Container, path: &str) -> Option<String> {
    c.volume_mounts.iter().flatten().find_map(|m| {
        let rest = Path::new(path).strip_prefix(&m.mount_path).ok()?;
        let host = volume(spec, &m.name)?.host_path.as_ref()?;
        if rest.as_os_str().is_empty() {
            return Some(host.path.clone());
        }
        Some(Path::new(&host.path).join(rest).display().to_string())
    })
}

/// What deploy/README.md says about the redirector DaemonSet itself.
fn check_redirector_daemonset(owner: &str, ds: &DaemonSet) -> Vec<String> {
    let mut out = check_any_daemonset(owner, ds);
    let spec = pod_spec(ds);
    let mut bad = |m: String| out.push(format!("{owner}: {m}"));
    if spec.priority_class_name.as_deref() != Some("system-node-critical") {
        bad(format!(
            "priorityClassName is {:?}, want system-node-critical",
            spec.priority_class_name
        ));
    }
    if spec.host_pid != Some(true) {
        bad("hostPID must be true (pod pids in cgroup.procs, /proc/<pid>/ns/net)".into());
    }
    if spec.service_account_name.as_deref() != Some(SERVICE_ACCOUNT) {
        bad(format!(
            "serviceAccountName is {:?}, want {SERVICE_ACCOUNT}",
            spec.service_account_name
        ));
    }
    let strategy = ds.spec.as_ref().and_then(|s| s.update_strategy.as_ref());
    if strategy.and_then(|s| s.type_.as_deref()) != Some("RollingUpdate") {
        bad("updateStrategy.type must be RollingUpdate".into());
    }
    let labels = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.as_ref());
    if labels
        .and_then(|l| l.get("egress-redirector.io/enabled"))
        .map(String::as_str)
        != Some("false")
    {
        bad("the pod template must carry egress-redirector.io/enabled=false (never redirect ourselves)".into());
    }
    if spec.enable_service_links != Some(false) {
        bad(
            "enableServiceLinks must be false (Service env vars could land in REDIRECTOR_*)".into(),
        );
    }
    let Some(c) = spec.containers.iter().find(|c| c.name == "redirector") else {
        bad("no container named redirector".into());
        return out;
    };

    // The daemon: Kubernetes mode, config from the ConfigMap.
    let args = c.args.clone().unwrap_or_default();
    if args.first().map(String::as_str) != Some("run") || !args.iter().any(|a| a == "--kubernetes")
    {
        bad(format!("args {args:?} must be `run --kubernetes …`"));
    }
    let config_arg = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1));
    if config_arg.map(String::as_str) != Some(CONFIG_PATH) {
        bad(format!(
            "--config must be {CONFIG_PATH}, got {config_arg:?}"
        ));
    }
    let config_dir = Path::new(CONFIG_PATH)
        .parent()
        .expect("config dir")
        .display()
        .to_string();
    let config_mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == config_dir);
    let config_volume = config_mount.and_then(|m| volume(spec, &m.name));
    let sources = config_volume
        .and_then(|v| v.projected.as_ref())
        .and_then(|p| p.sources.as_ref());
    let projects_config = sources.is_some_and(|s| {
        s.iter().any(|p| {
            p.config_map.as_ref().is_some_and(|cm| {
                cm.name == CONFIGMAP
                    && cm
                        .items
                        .iter()
                        .flatten()
                        .any(|i| i.key == CONFIG_KEY && i.path == CONFIG_KEY)
            })
        })
    });
    if !projects_config {
        bad(format!(
            "{config_dir} must be a projected volume holding {CONFIGMAP}/{CONFIG_KEY} as {CONFIG_KEY}"
        ));
    }
    for s in sources
        .into_iter()
        .flatten()
        .filter_map(|p| p.secret.as_ref())
    {
        if s.optional != Some(true) {
            bad(format!(
                "secret {} must be optional: true (the daemon runs without proxy credentials)",
                s.name
            ));
        }
    }

    // NODE_NAME from the downward API, never a literal.
    let node = c.env.iter().flatten().find(|e| e.name == "NODE_NAME");
    let from_field = node
        .and_then(|e| e.value_from.as_ref())
        .and_then(|f| f.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    if from_field != Some("spec.nodeName") || node.and_then(|e| e.value.as_ref()).is_some() {
        bad("NODE_NAME must come from fieldRef spec.nodeName".into());
    }

    // Probes: readiness = /readyz (hook + listeners + config), liveness = /healthz.
    let ready = c
        .readiness_probe
        .as_ref()
        .map(probe_target)
        .unwrap_or_default();
    let live = c
        .liveness_probe
        .as_ref()
        .map(probe_target)
        .unwrap_or_default();
    if !ready.contains("/readyz") {
        bad(format!(
            "readinessProbe must check /readyz, checks {ready:?}"
        ));
    }
    if !live.contains("/healthz") {
        bad(format!(
            "livenessProbe must check /healthz, checks {live:?}"
        ));
    }

    // Security context.
    let sc = c.security_context.clone().unwrap_or_default();
    let caps = sc.capabilities.clone().unwrap_or_default();
    if !caps.drop.iter().flatten().any(|d| d == "ALL") {
        bad("capabilities.drop must contain ALL".into());
    }
    let add: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    let want: BTreeSet<&str> = CAPABILITIES.iter().copied().collect();
    if add != want {
        bad(format!(
            "capabilities.add is {add:?}, want exactly {want:?}"
        ));
    }
    if sc.read_only_root_filesystem != Some(true) {
        bad("readOnlyRootFilesystem must be true".into());
    }
    if sc.run_as_user != Some(0) {
        bad("runAsUser must be 0 (bpffs and cgroups are root-owned, no DAC capability)".into());
    }
    if sc.allow_privilege_escalation == Some(false) && add.contains("SYS_ADMIN") {
        bad("allowPrivilegeEscalation: false is meaningless with SYS_ADMIN (Kubernetes treats it as true)".into());
    }
    let seccomp = sc.seccomp_profile.as_ref().map(|p| p.type_.as_str());
    if seccomp != Some("RuntimeDefault") {
        bad(format!(
            "seccompProfile must be RuntimeDefault, is {seccomp:?}"
        ));
    }

    // Mounts: the pin root on the host bpffs, the cgroup root on the host cgroup2 tree.
    let pin_root = env_value(c, "REDIRECTOR_PIN_ROOT").unwrap_or("/sys/fs/bpf/redirector");
    let want_pins = format!("{BPFFS_HOST}/{PIN_DIR}");
    if host_path_of(spec, c, pin_root).as_deref() != Some(want_pins.as_str()) {
        bad(format!(
            "pin root {pin_root} must be {want_pins} on the host"
        ));
    }
    let cgroup_root = env_value(c, "REDIRECTOR_CGROUP_ROOT").unwrap_or("/sys/fs/cgroup");
    if host_path_of(spec, c, cgroup_root).as_deref() != Some(CGROUP_HOST) {
        bad(format!(
            "cgroup root {cgroup_root} must be the host's {CGROUP_HOST}"
        ));
    }
    for m in c.volume_mounts.iter().flatten() {
        let prop = m.mount_propagation.as_deref();
        if prop == Some("Bidirectional") {
            bad(format!(
                "mount {} is Bidirectional (needs a privileged container)",
                m.mount_path
            ));
        }
        let host = volume(spec, &m.name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.as_str());
        if host == Some(BPFFS_HOST) && prop != Some("HostToContainer") {
            bad(format!(
                "bpffs mount {} must use mountPropagation HostToContainer",
                m.mount_path
            ));
        }
        if host == Some(CGROUP_HOST) && m.read_only != Some(true) {
            bad(format!(
                "cgroup mount {} must be read-only (the daemon only reads it)",
                m.mount_path
            ));
        }
    }
    out
}

/// The ClusterRole may list and watch pods and namespaces, and nothing else (what the daemon's
/// watchers use; `k8s_e2e::deploy_rbac_grants_exactly_what_the_daemon_uses` shows each is needed
/// against a real API server).
fn check_cluster_role(owner: &str, cr: &ClusterRole) -> Vec<String> {
    let mut out = Vec::new();
    let mut granted = BTreeSet::new();
    if cr.aggregation_rule.is_some() {
        out.push(format!(
            "{owner}: aggregationRule would pull in other roles' rules"
        ));
    }
    for r in cr.rules.iter().flatten() {
        if r.api_groups.as_deref() != Some(&["".to_owned()][..]) {
            out.push(format!(
                "{owner}: rule apiGroups {:?}, want only the core group \"\"",
                r.api_groups
            ));
        }
        if r.resource_names.as_ref().is_some_and(|n| !n.is_empty())
            || r.non_resource_urls.as_ref().is_some_and(|n| !n.is_empty())
        {
            out.push(format!(
                "{owner}: resourceNames / nonResourceURLs are not expected"
            ));
        }
        for res in r.resources.iter().flatten() {
            for verb in &r.verbs {
                granted.insert((res.clone(), verb.clone()));
            }
        }
    }
    let want: BTreeSet<(String, String)> = ["pods", "namespaces"]
        .iter()
        .flat_map(|r| {
            ["list", "watch"]
                .iter()
                .map(move |v| ((*r).to_owned(), (*v).to_owned()))
        })
        .collect();
    if granted != want {
        let extra: Vec<_> = granted.difference(&want).collect();
        let missing: Vec<_> = want.difference(&granted).collect();
        out.push(format!("{owner}: grants differ from list/watch on pods and namespaces: extra {extra:?}, missing {missing:?}"));
    }
    out
}

/// config.yaml parses and holds the gateway URL, the skip ranges and routes to known routes.
fn check_config_map(owner: &str, cm: &ConfigMap) -> Vec<String> {
    let mut out = Vec::new();
    let Some(text) = cm.data.as_ref().and_then(|d| d.get(CONFIG_KEY)) else {
        return vec![format!("{owner}: no {CONFIG_KEY} key")];
    };
    let config: Value = match serde_norway::from_str(text) {
        Ok(v) => v,
        Err(e) => return vec![format!("{owner}: {CONFIG_KEY} is not YAML: {e}")],
    };
    let Some(map) = config.as_object() else {
        return vec![format!("{owner}: {CONFIG_KEY} is not a mapping")];
    };
    match map.get(KEY_GATEWAY).and_then(Value::as_str) {
        Some(url) if url.starts_with("https://") && url.ends_with(".gw.arc.azure.com") => {}
        other => out.push(format!(
            "{owner}: {KEY_GATEWAY} must be https://<prefix>.gw.arc.azure.com, is {other:?}"
        )),
    }
    match map.get(KEY_SKIP).and_then(Value::as_str) {
        Some(s) => {
            let entries: Vec<&str> = s.split(',').map(str::trim).collect();
            for want in [
                "10.0.0.0/16",
                "kubernetes.default.svc",
                ".svc.cluster.local",
                ".svc",
            ] {
                if !entries.contains(&want) {
                    out.push(format!("{owner}: {KEY_SKIP} lacks {want}"));
                }
            }
        }
        None => out.push(format!("{owner}: no {KEY_SKIP} string")),
    }
    match map.get(KEY_ROUTES).and_then(Value::as_array) {
        Some(routes) if !routes.is_empty() => {
            let mut hosts = Vec::new();
            for (i, r) in routes.iter().enumerate() {
                let host = r.get("host").and_then(Value::as_str);
                let route = r.get("route").and_then(Value::as_str);
                match (host, route) {
                    (Some(h), Some(rt)) if ROUTES.contains(&rt) => hosts.push(h),
                    _ => out.push(format!(
                        "{owner}: {KEY_ROUTES}[{i}] needs host and route (one of {ROUTES:?}): {r}"
                    )),
                }
            }
            // Azure services the Arc gateway does not forward (the `arc-not-covered` preset).
            for svc in [
                "opinsights.azure.com",
                "monitoring.azure.com",
                "vault.azure.net",
                "policy.core.windows.net",
            ] {
                if !hosts.iter().any(|h| h.ends_with(svc)) {
                    out.push(format!("{owner}: no route for *{svc}"));
                }
            }
        }
        _ => out.push(format!("{owner}: no {KEY_ROUTES} list")),
    }
    out
}

/// Every resource and patch a kustomization names exists; in a directory of plain
/// manifests, every manifest is listed except `*.example.yaml`.
fn check_kustomization(path: &Path) -> Vec<String> {
    let owner = path.display().to_string();
    let dir = path.parent().expect("kustomization in a directory");
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return vec![format!("{owner}: {e}")],
    };
    let k: Kustomization = match serde_norway::from_str(&text) {
        Ok(k) => k,
        Err(e) => return vec![format!("{owner}: {e}")],
    };
    let mut out = Vec::new();
    if k.api_version != "kustomize.config.k8s.io/v1beta1" || k.kind != "Kustomization" {
        out.push(format!(
            "{owner}: apiVersion/kind {}/{}",
            k.api_version, k.kind
        ));
    }
    let mut listed = BTreeSet::new();
    for r in &k.resources {
        let p = dir.join(r);
        if p.is_file() {
            listed.insert(p.canonicalize().expect("canonical path"));
        } else if !(p.is_dir()
            && (p.join("kustomization.yaml").is_file() || p.join("kustomization.yml").is_file()))
        {
            out.push(format!(
                "{owner}: resource {r} does not exist (or is a directory without a kustomization)"
            ));
        }
    }
    for p in k.patches.iter().filter_map(|p| p.path.as_ref()) {
        if !dir.join(p).is_file() {
            out.push(format!("{owner}: patch {p} does not exist"));
        }
    }
    for p in &k.patches {
        if p.path.is_none() && p.patch.is_none() {
            out.push(format!("{owner}: a patch needs `path` or `patch`"));
        }
        if p.patch.is_some() && p.target.is_none() {
            out.push(format!("{owner}: an inline patch needs a target"));
        }
    }
    for i in &k.images {
        if i.new_name.is_none() && i.new_tag.is_none() {
            out.push(format!(
                "{owner}: image {} sets neither newName nor newTag",
                i.name
            ));
        }
    }
    if !k.resources.is_empty() && k.resources.iter().all(|r| dir.join(r).is_file()) {
        let entries = std::fs::read_dir(dir)
            .map(|rd| rd.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        for f in entries
            .into_iter()
            .filter(|f| f.is_file() && is_yaml(f) && !is_kustomization(f))
        {
            let name = f
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if !name.ends_with(".example.yaml")
                && !listed.contains(&f.canonicalize().expect("canonical path"))
            {
                out.push(format!(
                    "{owner}: {name} is in the directory but not listed"
                ));
            }
        }
    }
    out
}

fn readme() -> String {
    let p = deploy_dir().join("README.md");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// `kubectl kustomize <dir>`, or None (with the reason printed) when kubectl is missing.
fn kustomize(dir: &Path) -> Option<String> {
    let out = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!(
                "SKIP rendering {}: kubectl not runnable ({e}); the unrendered files are still checked",
                dir.display()
            );
            return None;
        }
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).expect("UTF-8 output"))
}

// ---------------------------------------------------------------------------------------
// Tests over deploy/

#[test]
fn every_manifest_parses_into_a_typed_object() {
    let docs = load_deploy();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &docs {
        let k = match d.object {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ConfigMap(_) => "ConfigMap",
            Object::Secret(_) => "Secret",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::DaemonSet(_) => "DaemonSet",
            Object::Job(_) => "Job",
        };
        *kinds.entry(k).or_default() += 1;
    }
    for k in [
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Secret",
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "Job",
    ] {
        assert!(
            kinds.contains_key(k),
            "no {k} under deploy/ (found {kinds:?})"
        );
    }
    // Namespaced objects all live in our namespace.
    for d in &docs {
        let ns = match &d.object {
            Object::ServiceAccount(o) => o.metadata.namespace.as_deref(),
            Object::ConfigMap(o) => o.metadata.namespace.as_deref(),
            Object::Secret(o) => o.metadata.namespace.as_deref(),
            Object::DaemonSet(o) => o.metadata.namespace.as_deref(),
            Object::Job(o) => o.metadata.namespace.as_deref(),
            Object::Namespace(_) | Object::ClusterRole(_) | Object::ClusterRoleBinding(_) => {
                continue;
            }
        };
        assert_eq!(ns, Some(NAMESPACE), "{}: namespace", d.source);
    }
}

#[test]
fn namespace_admits_the_daemon_under_pod_security() {
    let docs = load_deploy();
    let ns = one(docs, |o| match o {
        Object::Namespace(ns) => Some(ns),
        _ => None,
    });
    assert_eq!(ns.metadata.name.as_deref(), Some(NAMESPACE));
    let labels = ns.metadata.labels.unwrap_or_default();
    // hostPID, hostPath and added capabilities are outside the `baseline` level.
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged")
    );
    // The daemon's namespace is never one whose pods are redirected.
    assert_ne!(
        labels
            .get("egress-redirector.io/enabled")
            .map(String::as_str),
        Some("true")
    );
}

#[test]
fn no_container_is_privileged() {
    let docs = load_deploy();
    let specs = pod_specs(&docs);
    assert!(
        specs.len() >= 3,
        "expected the redirector, the cleanup DaemonSet and the uninstall Job"
    );
    problems_to_result(
        "privileged containers",
        specs
            .iter()
            .flat_map(|(o, s)| check_not_privileged(o, s))
            .collect(),
    );
}

#[test]
fn every_daemonset_tolerates_all_taints_and_has_probes_and_resources() {
    let docs = load_deploy();
    problems_to_result(
        "DaemonSets",
        daemonsets(&docs)
            .into_iter()
            .flat_map(|(o, ds)| check_any_daemonset(o, ds))
            .collect(),
    );
}

#[test]
fn redirector_daemonset_follows_the_readme() {
    let docs = load_deploy();
    let ds = the_daemonset(&docs);
    problems_to_result(
        "redirector DaemonSet",
        check_redirector_daemonset(DAEMONSET, ds),
    );
    // The base itself updates with a surge: never a node without a ready daemon.
    let rolling = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|s| s.rolling_update.as_ref())
        .expect("rollingUpdate");
    assert_eq!(
        rolling.max_unavailable,
        Some(IntOrString::Int(0)),
        "maxUnavailable"
    );
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)), "maxSurge");
}

#[test]
fn capabilities_are_exactly_the_documented_set() {
    let docs = load_deploy();
    let ds = the_daemonset(&docs);
    let c = pod_spec(ds)
        .containers
        .iter()
        .find(|c| c.name == "redirector")
        .expect("redirector container");
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .expect("capabilities");
    let mut add: Vec<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    add.sort_unstable();
    assert_eq!(add, CAPABILITIES, "capabilities.add");
    assert_eq!(
        caps.drop.as_deref(),
        Some(&["ALL".to_owned()][..]),
        "capabilities.drop"
    );
    let readme = readme();
    for cap in CAPABILITIES {
        assert!(
            readme.contains(&format!("CAP_{cap}")),
            "deploy/README.md does not explain CAP_{cap}"
        );
    }
    // The other containers (cleanup) add nothing.
    for (owner, spec) in pod_specs(&docs) {
        for c in all_containers(spec).filter(|c| c.name != "redirector") {
            let add = c
                .security_context
                .as_ref()
                .and_then(|s| s.capabilities.as_ref())
                .and_then(|c| c.add.as_ref());
            assert!(
                add.is_none_or(|a| a.is_empty()),
                "{owner}: {} adds capabilities {add:?}",
                c.name
            );
        }
    }
}

#[test]
fn readme_explains_every_host_path() {
    let docs = load_deploy();
    let readme = readme();
    for (owner, spec) in pod_specs(&docs) {
        for v in spec.volumes.iter().flatten() {
            if let Some(h) = &v.host_path {
                assert!(
                    readme.contains(&format!("`{}`", h.path)),
                    "{owner}: hostPath {} is not explained in deploy/README.md",
                    h.path
                );
            }
        }
    }
}

#[test]
fn cluster_role_is_read_only_on_pods_and_namespaces() {
    let docs = load_deploy();
    let roles: Vec<_> = docs
        .iter()
        .filter_map(|d| match &d.object {
            Object::ClusterRole(cr) => Some((d.source.as_str(), cr)),
            _ => None,
        })
        .collect();
    assert_eq!(roles.len(), 1, "one ClusterRole");
    problems_to_result(
        "ClusterRole",
        roles
            .iter()
            .flat_map(|(o, cr)| check_cluster_role(o, cr))
            .collect(),
    );
}

#[test]
fn cluster_role_binding_grants_the_role_to_the_daemon_service_account() {
    let docs = load_deploy();
    let role = docs
        .iter()
        .find_map(|d| match &d.object {
            Object::ClusterRole(cr) => cr.metadata.name.clone(),
            _ => None,
        })
        .expect("ClusterRole");
    let sa = docs
        .iter()
        .find_map(|d| match &d.object {
            Object::ServiceAccount(sa) => Some(sa),
            _ => None,
        })
        .expect("ServiceAccount");
    assert_eq!(sa.metadata.name.as_deref(), Some(SERVICE_ACCOUNT));
    let crb = docs
        .iter()
        .find_map(|d| match &d.object {
            Object::ClusterRoleBinding(b) => Some(b),
            _ => None,
        })
        .expect("ClusterRoleBinding");
    assert_eq!(
        (crb.role_ref.kind.as_str(), crb.role_ref.name.as_str()),
        ("ClusterRole", role.as_str())
    );
    let subjects = crb.subjects.clone().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "exactly one subject");
    let s = &subjects[0];
    assert_eq!(
        (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()),
        ("ServiceAccount", SERVICE_ACCOUNT, Some(NAMESPACE))
    );
}

#[test]
fn config_map_has_gateway_skip_ranges_and_routes() {
    let docs = load_deploy();
    let cms: Vec<_> = docs
        .iter()
        .filter_map(|d| match &d.object {
            Object::ConfigMap(cm) if cm.metadata.name.as_deref() == Some(CONFIGMAP) => {
                Some((d.source.as_str(), cm))
            }
            _ => None,
        })
        .collect();
    assert_eq!(cms.len(), 1, "one ConfigMap named {CONFIGMAP}");
    problems_to_result("ConfigMap", check_config_map(cms[0].0, cms[0].1));
}

#[test]
fn proxy_secret_is_an_example_only() {
    let docs = load_deploy();
    for d in &docs {
        if let Object::Secret(s) = &d.object {
            assert!(
                d.source.contains(".example."),
                "{}: a real Secret does not belong in deploy/",
                d.source
            );
            assert!(
                s.data.is_none(),
                "{}: use stringData placeholders",
                d.source
            );
        }
    }
    let base = std::fs::read_to_string(deploy_dir().join("base/kustomization.yaml"))
        .expect("base kustomization");
    let k: Kustomization = serde_norway::from_str(&base).expect("kustomization");
    assert!(
        !k.resources.iter().any(|r| r.contains("secret")),
        "the example Secret must not be in the base"
    );
}

#[test]
fn kustomizations_list_only_files_that_exist() {
    let files: Vec<_> = yaml_files(&deploy_dir())
        .into_iter()
        .filter(|f| is_kustomization(f))
        .collect();
    assert!(
        files.len() >= 3,
        "expected base, cleanup and the host-network overlay, found {files:?}"
    );
    problems_to_result(
        "kustomizations",
        files.iter().flat_map(|f| check_kustomization(f)).collect(),
    );
}

#[test]
fn cleanup_uninstalls_the_pins_the_daemon_creates() {
    let docs = load_deploy();
    let ds = the_daemonset(&docs);
    let spec = pod_spec(ds);
    let c = spec
        .containers
        .iter()
        .find(|c| c.name == "redirector")
        .expect("redirector container");
    let daemon_pins = host_path_of(
        spec,
        c,
        env_value(c, "REDIRECTOR_PIN_ROOT").expect("REDIRECTOR_PIN_ROOT"),
    )
    .expect("pins on a host path");
    let mut seen = 0;
    for (owner, spec) in pod_specs(&docs) {
        for c in all_containers(spec) {
            let args = c.args.clone().unwrap_or_default();
            if args.first().map(String::as_str) != Some("uninstall") {
                continue;
            }
            seen += 1;
            let root = args
                .iter()
                .position(|a| a == "--pin-root")
                .and_then(|i| args.get(i + 1))
                .expect("--pin-root");
            assert_eq!(
                host_path_of(spec, c, root).as_deref(),
                Some(daemon_pins.as_str()),
                "{owner}: uninstall removes another directory"
            );
        }
    }
    assert_eq!(
        seen, 2,
        "the cleanup DaemonSet and the uninstall Job both run `redirector uninstall`"
    );
}

#[test]
fn rendered_kustomizations_pass_the_same_checks() {
    for (dir, host_network) in [
        ("base", false),
        ("overlays/host-network", true),
        ("cleanup", false),
    ] {
        let path = deploy_dir().join(dir);
        let Some(text) = kustomize(&path) else { return };
        let docs = parse_objects(dir, &text).unwrap_or_else(|e| panic!("{e}"));
        for (owner, spec) in pod_specs(&docs) {
            problems_to_result(dir, check_not_privileged(&owner, spec));
            for c in all_containers(spec) {
                let image = c.image.as_deref().unwrap_or_default();
                assert!(
                    image.ends_with(":0.1.0"),
                    "{owner}: image {image} did not get the kustomization's tag"
                );
            }
        }
        for (owner, ds) in daemonsets(&docs) {
            if ds.metadata.name.as_deref() == Some(DAEMONSET) {
                problems_to_result(dir, check_redirector_daemonset(owner, ds));
                assert_eq!(
                    pod_spec(ds).host_network.unwrap_or(false),
                    host_network,
                    "{dir}: hostNetwork"
                );
            } else {
                problems_to_result(dir, check_any_daemonset(owner, ds));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The checks themselves fail on bad manifests

const GOOD_CLUSTER_ROLE: &str = "
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: x}
rules:
  - apiGroups: ['']
    resources: [pods, namespaces]
    verbs: [list, watch]
";

const BAD_DAEMONSET: &str = "
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: egress-redirector, namespace: egress-redirector}
spec:
  selector: {matchLabels: {app: x}}
  updateStrategy:
    type: RollingUpdate
    rollingUpdate: {maxUnavailable: 1}
  template:
    metadata: {labels: {app: x}}
    spec:
      hostNetwork: true
      serviceAccountName: egress-redirector
      containers:
        - name: redirector
          image: x
          args: [run, --config, /etc/redirector/config.yaml]
          env:
            - {name: NODE_NAME, value: node-1}
          securityContext:
            privileged: true
            allowPrivilegeEscalation: false
            capabilities:
              add: [SYS_ADMIN, SYS_MODULE]
          volumeMounts:
            - {name: bpf, mountPath: /sys/fs/bpf, mountPropagation: Bidirectional}
            - {name: cg, mountPath: /sys/fs/cgroup}
      volumes:
        - {name: bpf, hostPath: {path: /sys/fs/bpf}}
        - {name: cg, hostPath: {path: /sys/fs/cgroup}}
";

fn one<T>(docs: Vec<Doc>, pick: impl Fn(Object) -> Option<T>) -> T {
    docs.into_iter()
        .find_map(|d| pick(d.object))
        .expect("the object under test")
}

fn assert_reports(problems: &[String], wanted: &[&str]) {
    for w in wanted {
        assert!(
            problems.iter().any(|p| p.contains(w)),
            "no problem mentioning {w:?} in:\n  {}",
            problems.join("\n  ")
        );
    }
}

#[test]
fn bad_daemonset_is_rejected_on_every_count() {
    let ds = one(
        parse_objects("bad", BAD_DAEMONSET).expect("parses"),
        |o| match o {
            Object::DaemonSet(ds) => Some(ds),
            _ => None,
        },
    );
    let problems = check_redirector_daemonset("bad", &ds);
    assert_reports(
        &problems,
        &[
            "is privileged",
            "no readinessProbe",
            "no livenessProbe",
            "no cpu requests",
            "no memory limits",
            "tolerate every taint",
            "priorityClassName",
            "hostPID",
            "egress-redirector.io/enabled=false",
            "enableServiceLinks",
            "--kubernetes",
            "projected volume",
            "NODE_NAME must come from fieldRef",
            "drop must contain ALL",
            "capabilities.add",
            "readOnlyRootFilesystem",
            "runAsUser",
            "allowPrivilegeEscalation",
            "seccompProfile",
            "Bidirectional",
            "must be read-only",
        ],
    );
}

#[test]
fn bad_surge_settings_are_rejected() {
    let surge_on_host =
        BAD_DAEMONSET.replace("{maxUnavailable: 1}", "{maxUnavailable: 0, maxSurge: 1}");
    let ds = one(
        parse_objects("surge", &surge_on_host).expect("parses"),
        |o| match o {
            Object::DaemonSet(ds) => Some(ds),
            _ => None,
        },
    );
    assert_reports(
        &check_any_daemonset("surge", &ds),
        &["hostNetwork with maxSurge"],
    );
    let no_surge = BAD_DAEMONSET.replace("{maxUnavailable: 1}", "{maxUnavailable: 0}");
    let ds = one(
        parse_objects("nosurge", &no_surge).expect("parses"),
        |o| match o {
            Object::DaemonSet(ds) => Some(ds),
            _ => None,
        },
    );
    assert_reports(
        &check_any_daemonset("nosurge", &ds),
        &["needs a non-zero maxSurge"],
    );
}

#[test]
fn misspelt_field_is_rejected() {
    let typo = BAD_DAEMONSET.replace("privileged: true", "privilegd: true");
    let err = parse_objects("typo", &typo).expect_err("a misspelt field must not parse");
    assert!(err.contains("securityContext.privilegd"), "{err}");
    let wrong_type = GOOD_CLUSTER_ROLE.replace("verbs: [list, watch]", "verbs: list");
    assert!(
        parse_objects("type", &wrong_type).is_err(),
        "verbs must be a list"
    );
}

#[test]
fn unknown_kind_is_rejected() {
    let err = parse_objects(
        "svc",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n",
    )
    .expect_err("unknown kind");
    assert!(err.contains("unexpected kind v1/Service"), "{err}");
    let err = parse_objects(
        "wrongapi",
        "apiVersion: extensions/v1beta1\nkind: DaemonSet\nmetadata: {name: x}\n",
    )
    .expect_err("old API");
    assert!(err.contains("unexpected kind"), "{err}");
}

#[test]
fn broad_cluster_role_is_rejected() {
    let parse = |text: &str| {
        one(parse_objects("role", text).expect("parses"), |o| match o {
            Object::ClusterRole(cr) => Some(cr),
            _ => None,
        })
    };
    assert!(check_cluster_role("good", &parse(GOOD_CLUSTER_ROLE)).is_empty());
    let star = parse(&GOOD_CLUSTER_ROLE.replace("[list, watch]", "['*']"));
    assert_reports(&check_cluster_role("star", &star), &["extra"]);
    let secrets =
        parse(&GOOD_CLUSTER_ROLE.replace("[pods, namespaces]", "[pods, namespaces, secrets]"));
    assert_reports(&check_cluster_role("secrets", &secrets), &["\"secrets\""]);
    let apps = parse(&GOOD_CLUSTER_ROLE.replace("apiGroups: ['']", "apiGroups: ['', apps]"));
    assert_reports(&check_cluster_role("apps", &apps), &["apiGroups"]);
    let short = parse(&GOOD_CLUSTER_ROLE.replace("[list, watch]", "[list]"));
    assert_reports(&check_cluster_role("short", &short), &["missing"]);
    let get = parse(&GOOD_CLUSTER_ROLE.replace("[list, watch]", "[get, list, watch]"));
    assert_reports(&check_cluster_role("get", &get), &["extra"]);
}

#[test]
fn config_without_routes_or_skip_ranges_is_rejected() {
    let cm = |body: &str| {
        let text = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {CONFIGMAP}}}\ndata:\n  config.yaml: |\n{}",
            body.lines()
                .map(|l| format!("    {l}\n"))
                .collect::<String>()
        );
        one(parse_objects("cm", &text).expect("parses"), |o| match o {
            Object::ConfigMap(cm) => Some(cm),
            _ => None,
        })
    };
    let bare = cm("gateway-url: http://gw.example.com\nproxy-skip-range: 10.0.0.0/16");
    assert_reports(
        &check_config_map("bare", &bare),
        &[KEY_GATEWAY, ".svc.cluster.local", "no routes list"],
    );
    let bad_route = cm("routes:\n  - host: x.vault.azure.net\n    route: teleport");
    assert_reports(
        &check_config_map("route", &bad_route),
        &["routes[0]", "no route for *opinsights.azure.com"],
    );
    let not_yaml = cm("routes: [unclosed");
    assert_reports(&check_config_map("yaml", &not_yaml), &["is not YAML"]);
}

#[test]
fn kustomization_listing_a_missing_file_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write =
        |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
    write(
        "a.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
    );
    write(
        "orphan.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
    );
    write(
        "x.example.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: c}\n",
    );
    write(
        "kustomization.yaml",
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [a.yaml, missing.yaml]\n",
    );
    assert_reports(
        &check_kustomization(&dir.path().join("kustomization.yaml")),
        &["missing.yaml does not exist"],
    );
    write(
        "kustomization.yaml",
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [a.yaml]\n",
    );
    let problems = check_kustomization(&dir.path().join("kustomization.yaml"));
    assert_reports(
        &problems,
        &["orphan.yaml is in the directory but not listed"],
    );
    assert!(
        !problems.iter().any(|p| p.contains("x.example.yaml")),
        "examples may stay unlisted: {problems:?}"
    );
    write(
        "kustomization.yaml",
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresource: [a.yaml]\n",
    );
    assert_reports(
        &check_kustomization(&dir.path().join("kustomization.yaml")),
        &["unknown field `resource`"],
    );
}
