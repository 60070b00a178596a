//! Kubernetes control plane: watches labeled namespaces and this node's pods and publishes the pods to redirect.
//!
//! Two kube-runtime watchers feed one model: Namespaces labeled
//! `egress-redirector.io/enabled=true` or `=audit` (label selector: the label exists; the
//! value is checked here) and Pods with
//! `spec.nodeName=<node>` (field selector). The pods of an `audit` namespace are in the set
//! marked as audited: observed and counted, not redirected. Relabeling a namespace from one
//! value to the other is an update of the same watched object, so its pods switch mode in
//! place, without leaving the set. After every event the model recomputes the desired set and sends it
//! when it changed. A pod is in the set when all of these hold:
//!
//! - it runs on this node and its namespace is enabled;
//! - its own `egress-redirector.io/enabled` label is not `false` (the per-pod opt-out);
//! - it has not finished (`status.phase` is not `Succeeded` or `Failed`). A pod being
//!   deleted (`metadata.deletionTimestamp` set) stays in: its containers are still running
//!   their graceful shutdown and may still connect out (flushing telemetry, deregistering),
//!   and on a locked-down network a connection that suddenly went direct would just fail.
//!   It leaves when the API deletes it or it reaches a final phase;
//! - it does not use `hostNetwork`: such a pod shares the node's network namespace, so a
//!   listener "inside the pod" would be a listener on the node, and its cgroup holds node
//!   daemons (CNI agents, kube-proxy) that must keep their direct path. They are skipped;
//!   a host service that needs the redirect is enabled with `--cgroup` instead.
//!
//! Pending pods are included: the API knows a pod before the kubelet creates its cgroup, and
//! listing the pod early lets the reconciler enable the cgroup as soon as it appears, before
//! the first container runs.
//!
//! Watch failures never empty the set. `kube::runtime::watcher` resumes a dropped watch from
//! the last resource version it saw (no re-list); after a `410 Gone` it re-lists, emitting
//! `Init`, `InitApply` per object and `InitDone`. The model builds the re-listed state aside
//! and swaps it in only at `InitDone`, so until then the last complete view stays in force,
//! and pods that vanished while the watch was down drop out at the swap. Errors are logged
//! and retried with kube-runtime's default backoff (0.8 s doubling to 30 s, jittered). The
//! first set is sent only once both watchers have completed their initial list, so a
//! restarted daemon never briefly publishes a half-known set.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig, KubeconfigError},
    runtime::{WatchStreamExt, watcher},
};
use thiserror::Error;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    error_chain,
    kubelet::{PodUid, QosClass, pod_cgroup_candidates},
    telemetry::K8sRejectedLabels,
    workloads::{DesiredSet, PodCgroup, Workload},
};
use prometheus_client::metrics::{counter::Counter, family::Family};

/// Namespace label that enables a namespace (`true`) or audits it (`audit`), and pod label
/// that opts a pod out (`false`).
pub const ENABLED_LABEL: &str = "egress-redirector.io/enabled";
/// The [`ENABLED_LABEL`] value that audits a namespace.
pub const AUDIT_VALUE: &str = "audit";

/// What a labeled namespace asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NsMode {
    /// `true`: redirect its pods.
    Enforce,
    /// `audit`: observe its pods.
    Audit,
}

impl NsMode {
    fn as_str(self) -> &'static str {
        match self {
            NsMode::Enforce => "enforce",
            NsMode::Audit => "audit",
        }
    }
}
/// Annotation on a static pod's mirror pod holding the UID the kubelet names its cgroup after.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

#[derive(Debug, Error)]
pub enum K8sError {
    #[error("cannot read kubeconfig {}", path.display())]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("cannot load kubeconfig {}", path.display())]
    LoadKubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error(
        "cannot find a kubernetes client configuration (KUBECONFIG, ~/.kube/config or in-cluster)"
    )]
    InferConfig(#[source] kube::Error),
    #[error("cannot build the kubernetes client")]
    BuildClient(#[source] kube::Error),
    #[error("kubernetes {resource} watch ended")]
    WatchEnded { resource: &'static str },
}

/// Builds the API client: from `kubeconfig` when given (its current context), else kube's
/// inference (`KUBECONFIG` or `~/.kube/config` if present, then the in-cluster service
/// account, which is what the DaemonSet uses).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, K8sError> {
    let Some(path) = kubeconfig else {
        return Client::try_default().await.map_err(K8sError::InferConfig);
    };
    let file = Kubeconfig::read_from(path).map_err(|source| K8sError::ReadKubeconfig {
        path: path.to_owned(),
        source,
    })?;
    let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .map_err(|source| K8sError::LoadKubeconfig {
            path: path.to_owned(),
            source,
        })?;
    Client::try_from(config).map_err(K8sError::BuildClient)
}

/// Watches namespaces and this node's pods and keeps `tx` holding the pods to redirect,
/// keyed by pod UID. Returns `Ok` once every receiver is dropped; API errors are retried,
/// never returned.
pub async fn run(
    client: Client,
    node_name: String,
    cgroup_root: PathBuf,
    rejected: Family<K8sRejectedLabels, Counter>,
    tx: watch::Sender<DesiredSet>,
    view_tx: watch::Sender<PodsView>,
) -> Result<(), K8sError> {
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        // Every namespace that has the label, whatever its value: `decode_namespace` keeps
        // `true` and `audit`. (An existence selector rather than `in (true,audit)`: a change
        // between the two values is then an update of a watched object, never a delete and
        // re-add, and the API stand-in of the tests parses it.)
        watcher::Config::default().labels(ENABLED_LABEL),
    )
    .default_backoff()
    .map(|e| Input::Namespace(Box::new(e)))
    .boxed();
    let pods = watcher(
        Api::<Pod>::all(client),
        watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
    )
    .default_backoff()
    .map(|e| Input::Pod(Box::new(e)))
    .boxed();
    let mut inputs = futures::stream::select(namespaces, pods);

    info!(node = %node_name, label = ENABLED_LABEL, "watching namespaces and pods");
    let mut model = Model::new(node_name, cgroup_root, rejected);
    // The first complete set is always published, even when empty: it tells the reconciler
    // the API has been read, so it can clean up what an earlier run left enabled and report
    // ready on a node with nothing to enable.
    let mut published = false;
    loop {
        let input = tokio::select! {
            () = tx.closed() => {
                info!("desired set no longer read, stopping the kubernetes watch");
                return Ok(());
            }
            input = inputs.next() => input,
        };
        match input {
            Some(Input::Namespace(item)) => match *item {
                Ok(event) => model.on_namespace(event),
                Err(e) => watch_failed("namespaces", &e),
            },
            Some(Input::Pod(item)) => match *item {
                Ok(event) => model.on_pod(event),
                Err(e) => watch_failed("pods", &e),
            },
            // The watcher stream is endless by construction; the select only ends when both do.
            None => {
                return Err(K8sError::WatchEnded {
                    resource: "namespaces and pods",
                });
            }
        }
        let view = model.view();
        view_tx.send_if_modified(|current| {
            let changed = *current != view;
            *current = view;
            changed
        });
        let Some(desired) = model.desired() else {
            continue;
        };
        let first = !published;
        published = true;
        tx.send_if_modified(|current| {
            if *current == desired && !first {
                return false;
            }
            model.log_changes(current, &desired);
            *current = desired;
            true
        });
    }
}

/// What the watcher knows besides the desired set, for the CNI plugin's questions ("is this
/// new pod ours?"): which namespaces are labeled and which pods of this node it has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodsView {
    /// Both initial lists are in: an absent namespace is an unlabeled one.
    pub synced: bool,
    /// Labeled namespaces.
    pub labeled: BTreeSet<String>,
    /// UIDs of this node's pods the watcher has seen (enabled or not).
    pub pods: BTreeSet<String>,
}

/// One item from either watcher (boxed: a Pod is large and the stream moves every item).
enum Input {
    Namespace(Box<Result<watcher::Event<Namespace>, watcher::Error>>),
    Pod(Box<Result<watcher::Event<Pod>, watcher::Error>>),
}

fn watch_failed(resource: &'static str, e: &watcher::Error) {
    // A 410 is routine (the watch fell behind the API server's history) and is followed by a
    // re-list; everything else (API down, RBAC, network) is worth an operator's attention.
    let gone = matches!(e, watcher::Error::WatchError(status) if status.code == 410);
    if gone {
        info!(resource, error = %error_chain(e), "kubernetes watch expired, re-listing");
    } else {
        warn!(resource, error = %error_chain(e), "kubernetes watch failed, retrying");
    }
}

/// One watched collection: the committed view, plus the fresh one a re-list is building.
#[derive(Debug)]
struct Synced<T> {
    committed: BTreeMap<String, T>,
    relisting: Option<BTreeMap<String, T>>,
    /// Whether one list has completed, i.e. `committed` is a whole view.
    synced: bool,
}

impl<T> Default for Synced<T> {
    fn default() -> Self {
        Synced {
            committed: BTreeMap::new(),
            relisting: None,
            synced: false,
        }
    }
}

impl<T> Synced<T> {
    /// Applies one watcher event, `decode` turning an object into its key and, if it is of
    /// interest, its value (`None` value: the object exists but is not of interest).
    fn apply<K>(
        &mut self,
        event: watcher::Event<K>,
        decode: impl Fn(&K) -> Option<(String, Option<T>)>,
    ) {
        match event {
            watcher::Event::Init => self.relisting = Some(BTreeMap::new()),
            watcher::Event::InitApply(obj) => {
                let Some((key, value)) = decode(&obj) else {
                    return;
                };
                // `InitApply` only follows `Init`; the fallback keeps a stray one from being lost.
                let target = self.relisting.as_mut().unwrap_or(&mut self.committed);
                match value {
                    Some(v) => target.insert(key, v),
                    None => target.remove(&key),
                };
            }
            watcher::Event::InitDone => {
                if let Some(fresh) = self.relisting.take() {
                    self.committed = fresh;
                }
                self.synced = true;
            }
            watcher::Event::Apply(obj) => {
                let Some((key, value)) = decode(&obj) else {
                    return;
                };
                match value {
                    Some(v) => self.committed.insert(key, v),
                    None => self.committed.remove(&key),
                };
            }
            watcher::Event::Delete(obj) => {
                if let Some((key, _)) = decode(&obj) {
                    self.committed.remove(&key);
                }
            }
        }
    }
}

/// What the model keeps of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodInfo {
    namespace: String,
    name: String,
    node: Option<String>,
    opted_out: bool,
    qos: QosClass,
    phase: Option<String>,
    host_network: bool,
    terminating: bool,
    /// `metadata.uid`, validated.
    uid: PodUid,
    /// The static pod hash of a mirror pod (`kubernetes.io/config.mirror` in the kubelet's
    /// exact form, with the kubelet's Node owner reference naming this node). Honoured only
    /// while no other pod claims the same hash ([`Model::cgroup_uid`]).
    mirror: Option<PodUid>,
}

use crate::telemetry::K8sRejection as Rejected;

/// At most this much of a pod-supplied value goes into a log line, escaped.
const LOGGED_VALUE_MAX: usize = 64;

/// A pod-supplied value for a log line: escaped, cut to [`LOGGED_VALUE_MAX`] characters, with
/// its full length.
fn logged_value(v: &str) -> String {
    let cut: String = v.chars().take(LOGGED_VALUE_MAX).collect();
    let more = if cut.len() < v.len() { "…" } else { "" };
    format!("{:?}{more} ({} bytes)", cut, v.len())
}

/// Whether the pod has the owner reference the kubelet puts on the mirror pods it creates:
/// the controller reference to its own Node object.
fn owned_by_node(pod: &Pod, node: &str) -> bool {
    pod.metadata.owner_references.as_ref().is_some_and(|refs| {
        refs.iter().any(|r| {
            r.api_version == "v1"
                && r.kind == "Node"
                && r.name == node
                && r.controller == Some(true)
        })
    })
}

impl PodInfo {
    fn decode(
        pod: &Pod,
        node: &str,
        rejected: &Family<K8sRejectedLabels, Counter>,
    ) -> Option<(String, Option<PodInfo>)> {
        let reject = |reason: Rejected| {
            rejected.get_or_create(&K8sRejectedLabels { reason }).inc();
        };
        let meta = &pod.metadata;
        let Some(raw_uid) = meta.uid.clone().filter(|u| !u.is_empty()) else {
            warn!(pod = ?meta.name, namespace = ?meta.namespace, "pod without metadata.uid ignored");
            return None;
        };
        let Some(uid) = PodUid::from_api(&raw_uid) else {
            reject(Rejected::Uid);
            warn!(pod = ?meta.name, namespace = ?meta.namespace, uid = %logged_value(&raw_uid), "pod whose metadata.uid is not a UUID ignored");
            return None;
        };
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let label = |key: &str| {
            meta.labels
                .as_ref()
                .and_then(|l| l.get(key))
                .map(String::as_str)
        };
        let mirror = match meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(MIRROR_ANNOTATION))
        {
            None => None,
            Some(value) => match PodUid::from_mirror_hash(value) {
                Some(hash) if owned_by_node(pod, node) => Some(hash),
                _ => {
                    reject(Rejected::MirrorAnnotation);
                    warn!(
                        pod = ?meta.name, namespace = ?meta.namespace, %uid,
                        value = %logged_value(value),
                        "mirror annotation ignored: not the kubelet's manifest hash on a pod the kubelet of this node owns; the pod's own uid names its cgroup"
                    );
                    None
                }
            },
        };
        let info = PodInfo {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()),
            opted_out: label(ENABLED_LABEL) == Some("false"),
            qos: QosClass::from_status(status.and_then(|s| s.qos_class.as_deref())),
            phase: status.and_then(|s| s.phase.clone()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            terminating: meta.deletion_timestamp.is_some(),
            uid: uid.clone(),
            mirror,
        };
        Some((raw_uid, Some(info)))
    }

    fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn decode_namespace(ns: &Namespace) -> Option<(String, Option<NsMode>)> {
    let name = ns.metadata.name.clone()?;
    let value = ns
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ENABLED_LABEL))
        .map(String::as_str);
    // The label selector already filters; checking again keeps a namespace whose label was
    // just changed (or a server that ignores selectors) from enabling anything.
    let mode = match value {
        Some("true") => Some(NsMode::Enforce),
        Some(AUDIT_VALUE) => Some(NsMode::Audit),
        _ => None,
    };
    Some((name, mode))
}

/// Enabled namespaces and this node's pods, and the desired set derived from them.
#[derive(Debug)]
struct Model {
    node: String,
    cgroup_root: PathBuf,
    namespaces: Synced<NsMode>,
    pods: Synced<PodInfo>,
    /// Pod objects not believed, by reason (`redirector_k8s_rejected_total`).
    rejected: Family<K8sRejectedLabels, Counter>,
    /// Mirror hashes claimed by more than one pod, as last logged.
    contested: BTreeSet<PodUid>,
}

impl Model {
    fn new(
        node: String,
        cgroup_root: PathBuf,
        rejected: Family<K8sRejectedLabels, Counter>,
    ) -> Self {
        Model {
            node,
            cgroup_root,
            namespaces: Synced::default(),
            pods: Synced::default(),
            rejected,
            contested: BTreeSet::new(),
        }
    }

    /// Mirror hashes that more than one pod object claims. Only one of them can be the
    /// kubelet's; since the API cannot tell which, none is believed.
    fn contested_hashes(&self) -> BTreeSet<PodUid> {
        let mut seen = BTreeSet::new();
        let mut twice = BTreeSet::new();
        for hash in self
            .pods
            .committed
            .values()
            .filter_map(|p| p.mirror.as_ref())
        {
            if !seen.insert(hash) {
                twice.insert(hash.clone());
            }
        }
        twice
    }

    /// The UID the pod's cgroup is named after: its mirror hash when that is believed, else
    /// its own `metadata.uid`.
    fn cgroup_uid<'a>(&self, pod: &'a PodInfo, contested: &BTreeSet<PodUid>) -> &'a PodUid {
        match &pod.mirror {
            Some(hash) if !contested.contains(hash) => hash,
            _ => &pod.uid,
        }
    }

    fn on_namespace(&mut self, event: watcher::Event<Namespace>) {
        let before = self.namespaces.committed.clone();
        let done = matches!(event, watcher::Event::InitDone);
        self.namespaces.apply(event, decode_namespace);
        if done {
            info!(
                resource = "namespaces",
                enabled = self.namespaces.committed.len(),
                "kubernetes list complete"
            );
        }
        let after = &self.namespaces.committed;
        for (ns, mode) in after {
            match before.get(ns) {
                None => info!(namespace = %ns, mode = mode.as_str(), "namespace enabled"),
                Some(was) if was != mode => {
                    info!(namespace = %ns, from = was.as_str(), to = mode.as_str(), "namespace mode changed");
                }
                Some(_) => {}
            }
        }
        for ns in before.keys().filter(|ns| !after.contains_key(*ns)) {
            info!(namespace = %ns, "namespace disabled");
        }
    }

    fn on_pod(&mut self, event: watcher::Event<Pod>) {
        let done = matches!(event, watcher::Event::InitDone);
        if let watcher::Event::Apply(pod) | watcher::Event::Delete(pod) = &event {
            debug!(pod = ?pod.metadata.name, namespace = ?pod.metadata.namespace, uid = ?pod.metadata.uid, "pod event");
        }
        let (node, rejected) = (&self.node, &self.rejected);
        self.pods
            .apply(event, |p| PodInfo::decode(p, node, rejected));
        let contested = self.contested_hashes();
        for hash in contested.difference(&self.contested) {
            let claimants: Vec<String> = self
                .pods
                .committed
                .values()
                .filter(|p| p.mirror.as_ref() == Some(hash))
                .map(PodInfo::label)
                .collect();
            for _ in &claimants {
                self.rejected
                    .get_or_create(&K8sRejectedLabels {
                        reason: Rejected::MirrorAnnotation,
                    })
                    .inc();
            }
            warn!(%hash, pods = ?claimants, "several pods claim the same mirror hash; none is believed, each pod's own uid names its cgroup");
        }
        self.contested = contested;
        if done {
            info!(resource = "pods", node = %self.node, pods = self.pods.committed.len(), "kubernetes list complete");
        }
    }

    /// Why `pod` is not redirected, or `None` when it is.
    fn excluded(&self, pod: &PodInfo) -> Option<&'static str> {
        if pod.node.as_deref() != Some(self.node.as_str()) {
            Some("runs on another node")
        } else if !self.namespaces.committed.contains_key(&pod.namespace) {
            Some("namespace not enabled")
        } else if pod.opted_out {
            Some("opted out by pod label")
        } else if pod.host_network {
            Some("uses the host network")
        } else if matches!(pod.phase.as_deref(), Some("Succeeded" | "Failed")) {
            Some("finished")
        } else {
            None
        }
    }

    /// The pods to redirect, or `None` until both watchers have listed once.
    fn view(&self) -> PodsView {
        PodsView {
            synced: self.namespaces.synced && self.pods.synced,
            labeled: self.namespaces.committed.keys().cloned().collect(),
            pods: self.pods.committed.keys().cloned().collect(),
        }
    }

    fn desired(&self) -> Option<DesiredSet> {
        if !(self.namespaces.synced && self.pods.synced) {
            return None;
        }
        let contested = self.contested_hashes();
        let set = self
            .pods
            .committed
            .iter()
            .filter(|(_, pod)| self.excluded(pod).is_none())
            .map(|(uid, pod)| {
                let cgroup_uid = self.cgroup_uid(pod, &contested);
                let workload = Workload {
                    key: uid.clone(),
                    label: pod.label(),
                    cgroup_candidates: pod_cgroup_candidates(
                        &self.cgroup_root,
                        cgroup_uid,
                        pod.qos,
                    ),
                    pod: Some(PodCgroup {
                        root: self.cgroup_root.clone(),
                        uid: cgroup_uid.clone(),
                    }),
                    audit: self.namespaces.committed.get(&pod.namespace) == Some(&NsMode::Audit),
                };
                (uid.clone(), workload)
            })
            .collect();
        Some(set)
    }

    fn log_changes(&self, old: &DesiredSet, new: &DesiredSet) {
        for (uid, w) in new.iter().filter(|(uid, _)| !old.contains_key(*uid)) {
            let pod = self.pods.committed.get(uid);
            info!(
                pod = %w.label,
                %uid,
                qos = %pod.map(|p| p.qos).unwrap_or(QosClass::Burstable),
                terminating = pod.is_some_and(|p| p.terminating),
                mode = if w.audit { "audit" } else { "enforce" },
                "pod enabled"
            );
        }
        for (uid, w) in new.iter() {
            if let Some(was) = old.get(uid).filter(|was| was.audit != w.audit) {
                let (from, to) = if was.audit {
                    ("audit", "enforce")
                } else {
                    ("enforce", "audit")
                };
                info!(pod = %w.label, %uid, from, to, "pod mode changed");
            }
        }
        for (uid, w) in old.iter().filter(|(uid, _)| !new.contains_key(*uid)) {
            let reason = match self.pods.committed.get(uid) {
                None => "deleted",
                Some(pod) => self.excluded(pod).unwrap_or("changed"),
            };
            info!(pod = %w.label, %uid, reason, "pod disabled");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use watcher::Event;

    const NODE: &str = "node-1";
    const UID_A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
    const UID_B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

    fn namespace(name: &str, enabled: Option<&str>) -> Namespace {
        let mut labels = serde_json::json!({ "kubernetes.io/metadata.name": name });
        if let Some(v) = enabled {
            labels[ENABLED_LABEL] = v.into();
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": name, "uid": format!("ns-{name}"), "labels": labels },
        }))
        .expect("namespace json")
    }

    fn pod(ns: &str, name: &str, uid: &str, extra: serde_json::Value) -> Pod {
        let mut v = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": ns, "uid": uid, "labels": {} },
            "spec": { "nodeName": NODE, "containers": [{ "name": "app" }] },
            "status": { "phase": "Running", "qosClass": "Burstable" },
        });
        merge(&mut v, extra);
        serde_json::from_value(v).expect("pod json")
    }

    fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
        match (into, from) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }

    fn model() -> Model {
        Model::new(NODE.into(), PathBuf::from("/cg"), Family::default())
    }

    /// A model whose watchers have listed `namespaces` and `pods`.
    fn listed(namespaces: Vec<Namespace>, pods: Vec<Pod>) -> Model {
        let mut m = model();
        m.on_namespace(Event::Init);
        for ns in namespaces {
            m.on_namespace(Event::InitApply(ns));
        }
        m.on_namespace(Event::InitDone);
        m.on_pod(Event::Init);
        for p in pods {
            m.on_pod(Event::InitApply(p));
        }
        m.on_pod(Event::InitDone);
        m
    }

    fn keys(m: &Model) -> Vec<String> {
        m.desired().expect("synced").into_keys().collect()
    }

    #[test]
    fn nothing_published_before_both_lists_complete() {
        let mut m = model();
        assert_eq!(m.desired(), None);
        m.on_namespace(Event::Init);
        m.on_namespace(Event::InitApply(namespace("apps", Some("true"))));
        m.on_namespace(Event::InitDone);
        assert_eq!(m.desired(), None, "pods not listed yet");
        m.on_pod(Event::Init);
        m.on_pod(Event::InitApply(pod(
            "apps",
            "a",
            UID_A,
            serde_json::json!({}),
        )));
        assert_eq!(m.desired(), None, "pod list not complete");
        m.on_pod(Event::InitDone);
        assert_eq!(keys(&m), vec![UID_A]);
    }

    #[test]
    fn workload_fields() {
        let m = listed(
            vec![namespace("apps", Some("true"))],
            vec![pod(
                "apps",
                "a",
                UID_A,
                serde_json::json!({ "status": { "qosClass": "Guaranteed" } }),
            )],
        );
        let set = m.desired().expect("synced");
        assert_eq!(
            set[UID_A],
            Workload {
                key: UID_A.into(),
                label: "apps/a".into(),
                cgroup_candidates: pod_cgroup_candidates(
                    Path::new("/cg"),
                    &puid(UID_A),
                    QosClass::Guaranteed
                ),
                pod: Some(PodCgroup {
                    root: PathBuf::from("/cg"),
                    uid: puid(UID_A)
                }),
                audit: false,
            }
        );
    }

    #[test]
    fn eligibility() {
        let cases: Vec<(&str, serde_json::Value, bool)> = vec![
            ("plain running pod", serde_json::json!({}), true),
            (
                "pending pod",
                serde_json::json!({ "status": { "phase": "Pending" } }),
                true,
            ),
            (
                "no status at all",
                serde_json::json!({ "status": null }),
                true,
            ),
            (
                "enabled label true is fine",
                serde_json::json!({ "metadata": { "labels": { ENABLED_LABEL: "true" } } }),
                true,
            ),
            (
                "opted out",
                serde_json::json!({ "metadata": { "labels": { ENABLED_LABEL: "false" } } }),
                false,
            ),
            (
                "succeeded",
                serde_json::json!({ "status": { "phase": "Succeeded" } }),
                false,
            ),
            (
                "failed",
                serde_json::json!({ "status": { "phase": "Failed" } }),
                false,
            ),
            (
                "being deleted stays until gone",
                serde_json::json!({ "metadata": { "deletionTimestamp": "2025-01-01T00:00:00Z" } }),
                true,
            ),
            (
                "host network",
                serde_json::json!({ "spec": { "hostNetwork": true } }),
                false,
            ),
            (
                "host network false",
                serde_json::json!({ "spec": { "hostNetwork": false } }),
                true,
            ),
            (
                "other node",
                serde_json::json!({ "spec": { "nodeName": "node-2" } }),
                false,
            ),
            (
                "unscheduled",
                serde_json::json!({ "spec": { "nodeName": null } }),
                false,
            ),
        ];
        for (what, extra, want) in cases {
            let m = listed(
                vec![namespace("apps", Some("true"))],
                vec![pod("apps", "a", UID_A, extra)],
            );
            assert_eq!(!keys(&m).is_empty(), want, "{what}");
        }
    }

    #[test]
    fn audit_namespace_audits_its_pods_and_relabeling_switches_them_in_place() {
        let mut m = listed(
            vec![namespace("apps", Some("audit"))],
            vec![pod("apps", "a", UID_A, serde_json::json!({}))],
        );
        let audited = |m: &Model| m.desired().expect("synced")[UID_A].audit;
        assert_eq!(keys(&m), vec![UID_A]);
        assert!(audited(&m), "enabled=audit: in the set, audited");
        m.on_namespace(Event::Apply(namespace("apps", Some("true"))));
        assert_eq!(
            keys(&m),
            vec![UID_A],
            "same pod, same key: switched in place"
        );
        assert!(!audited(&m), "enabled=true: enforced");
        m.on_namespace(Event::Apply(namespace("apps", Some("audit"))));
        assert!(audited(&m), "and back");
        // The pod opt-out holds in audit namespaces too.
        let opted_out = serde_json::json!({ "metadata": { "labels": { ENABLED_LABEL: "false" } } });
        m.on_pod(Event::Apply(pod("apps", "a", UID_A, opted_out)));
        assert!(keys(&m).is_empty());
        for value in ["Audit", "AUDIT", "audit ", "observe"] {
            let m = listed(
                vec![namespace("apps", Some(value))],
                vec![pod("apps", "a", UID_A, serde_json::json!({}))],
            );
            assert!(keys(&m).is_empty(), "namespace label {value:?}");
        }
    }

    #[test]
    fn namespace_label_must_be_true() {
        for (value, want) in [
            (Some("true"), true),
            (Some("false"), false),
            (Some("TRUE"), false),
            (None, false),
        ] {
            let m = listed(
                vec![namespace("apps", value)],
                vec![pod("apps", "a", UID_A, serde_json::json!({}))],
            );
            assert_eq!(!keys(&m).is_empty(), want, "namespace label {value:?}");
        }
    }

    #[test]
    fn namespace_and_pod_transitions() {
        let mut m = listed(vec![], vec![pod("apps", "a", UID_A, serde_json::json!({}))]);
        assert!(keys(&m).is_empty());
        m.on_namespace(Event::Apply(namespace("apps", Some("true"))));
        assert_eq!(keys(&m), vec![UID_A]);
        m.on_pod(Event::Apply(pod("apps", "b", UID_B, serde_json::json!({}))));
        assert_eq!(keys(&m), vec![UID_A, UID_B]);
        let opted_out = serde_json::json!({ "metadata": { "labels": { ENABLED_LABEL: "false" } } });
        m.on_pod(Event::Apply(pod("apps", "b", UID_B, opted_out)));
        assert_eq!(keys(&m), vec![UID_A]);
        // An unlabeled namespace arriving as a modification (not a selector DELETED) disables it.
        m.on_namespace(Event::Apply(namespace("apps", None)));
        assert!(keys(&m).is_empty());
        m.on_namespace(Event::Apply(namespace("apps", Some("true"))));
        m.on_pod(Event::Delete(pod(
            "apps",
            "a",
            UID_A,
            serde_json::json!({}),
        )));
        assert!(keys(&m).is_empty());
        m.on_pod(Event::Apply(pod("apps", "a", UID_A, serde_json::json!({}))));
        m.on_namespace(Event::Delete(namespace("apps", Some("true"))));
        assert!(keys(&m).is_empty());
    }

    #[test]
    fn relist_keeps_the_old_view_until_init_done() {
        let mut m = listed(
            vec![namespace("apps", Some("true"))],
            vec![
                pod("apps", "a", UID_A, serde_json::json!({})),
                pod("apps", "b", UID_B, serde_json::json!({})),
            ],
        );
        let before = m.desired();
        // Both watchers restart (410 Gone) and re-list. Until each `InitDone` the old view holds,
        // even when the watcher restarts again in the middle of a list.
        m.on_namespace(Event::Init);
        m.on_pod(Event::Init);
        assert_eq!(m.desired(), before);
        m.on_pod(Event::InitApply(pod(
            "apps",
            "a",
            UID_A,
            serde_json::json!({}),
        )));
        assert_eq!(m.desired(), before);
        m.on_pod(Event::Init);
        assert_eq!(m.desired(), before);
        m.on_namespace(Event::InitApply(namespace("apps", Some("true"))));
        m.on_namespace(Event::InitDone);
        assert_eq!(m.desired(), before);
        // The fresh pod list lacks b (deleted while the watch was down) and has a new pod.
        m.on_pod(Event::InitApply(pod(
            "apps",
            "a",
            UID_A,
            serde_json::json!({}),
        )));
        m.on_pod(Event::InitApply(pod(
            "apps",
            "c",
            "cccccccc-0000-4000-8000-000000000003",
            serde_json::json!({}),
        )));
        assert_eq!(m.desired(), before);
        m.on_pod(Event::InitDone);
        assert_eq!(
            keys(&m),
            vec![
                UID_A.to_string(),
                "cccccccc-0000-4000-8000-000000000003".into()
            ]
        );
    }

    #[test]
    fn relist_drops_namespaces_missing_from_the_new_list() {
        let mut m = listed(
            vec![namespace("apps", Some("true"))],
            vec![pod("apps", "a", UID_A, serde_json::json!({}))],
        );
        m.on_namespace(Event::Init);
        assert_eq!(keys(&m), vec![UID_A]);
        m.on_namespace(Event::InitDone);
        assert!(keys(&m).is_empty());
    }

    fn puid(uid: &str) -> PodUid {
        PodUid::from_api(uid).expect("uuid")
    }

    const HASH: &str = "6d3f0e9a2b1c4d5e8f7a6b5c4d3e2f1a";

    /// A mirror pod as the kubelet of `node` creates it, annotated with `value`.
    fn mirror(name: &str, uid: &str, value: &str, node: &str) -> Pod {
        pod(
            "apps",
            name,
            uid,
            serde_json::json!({ "metadata": {
                "annotations": { MIRROR_ANNOTATION: value },
                "ownerReferences": [{ "apiVersion": "v1", "kind": "Node", "name": node,
                    "uid": "0f0f0f0f-0000-4000-8000-00000000000f", "controller": true }],
            } }),
        )
    }

    fn rejected(m: &Model, reason: Rejected) -> u64 {
        m.rejected
            .get_or_create(&K8sRejectedLabels { reason })
            .get()
    }

    #[test]
    fn mirror_pod_uses_the_kubelet_uid_for_cgroups() {
        let hash = HASH;
        let m = listed(
            vec![namespace("apps", Some("true"))],
            vec![mirror("etcd", UID_A, hash, NODE)],
        );
        let set = m.desired().expect("synced");
        assert_eq!(set[UID_A].key, UID_A, "keyed by the API object's uid");
        assert_eq!(
            set[UID_A].cgroup_candidates,
            pod_cgroup_candidates(
                Path::new("/cg"),
                &PodUid::from_mirror_hash(hash).expect("hash"),
                QosClass::Burstable
            )
        );
        assert_eq!(rejected(&m, Rejected::MirrorAnnotation), 0);
    }

    /// Hostile mirror annotations (a tenant writes them): only the kubelet's exact hash form
    /// on a pod owned by this node's Node is believed; anything else falls back to the pod's
    /// own uid, is counted, and never reaches a path.
    #[test]
    fn mirror_annotation_believed_only_in_the_kubelets_form() {
        let own = pod_cgroup_candidates(Path::new("/cg"), &puid(UID_A), QosClass::Burstable);
        let huge = "0".repeat(256 * 1024);
        let traversal = format!("{UID_A}/../../..");
        let cases: Vec<(&str, Pod)> = vec![
            ("traversal", mirror("a", UID_A, &traversal, NODE)),
            (
                "system.slice",
                mirror("a", UID_A, "../../system.slice", NODE),
            ),
            ("another pod's uid", mirror("a", UID_A, UID_B, NODE)),
            (
                "uppercase hash",
                mirror("a", UID_A, &HASH.to_uppercase(), NODE),
            ),
            ("huge", mirror("a", UID_A, &huge, NODE)),
            ("empty", mirror("a", UID_A, "", NODE)),
            ("owned by another node", mirror("a", UID_A, HASH, "node-2")),
            (
                "no owner",
                pod(
                    "apps",
                    "a",
                    UID_A,
                    serde_json::json!({ "metadata": { "annotations": { MIRROR_ANNOTATION: HASH } } }),
                ),
            ),
        ];
        for (what, p) in cases {
            let m = listed(vec![namespace("apps", Some("true"))], vec![p]);
            let set = m.desired().expect("synced");
            assert_eq!(set[UID_A].cgroup_candidates, own, "{what}");
            assert_eq!(rejected(&m, Rejected::MirrorAnnotation), 1, "{what}");
        }
    }

    /// Two pods claiming one hash: one of them is lying, the API cannot say which, so neither
    /// claim is believed (the forged one is then redirected by its own uid, as it should be).
    #[test]
    fn contested_mirror_hash_is_believed_for_no_one() {
        let m = listed(
            vec![namespace("apps", Some("true"))],
            vec![
                mirror("etcd", UID_A, HASH, NODE),
                mirror("forged", UID_B, HASH, NODE),
            ],
        );
        let set = m.desired().expect("synced");
        for uid in [UID_A, UID_B] {
            assert_eq!(
                set[uid].cgroup_candidates,
                pod_cgroup_candidates(Path::new("/cg"), &puid(uid), QosClass::Burstable),
                "{uid}"
            );
        }
        assert_eq!(rejected(&m, Rejected::MirrorAnnotation), 2);
    }

    #[test]
    fn pod_whose_uid_is_not_a_uuid_is_ignored() {
        for bad in [
            "../../..",
            "x",
            HASH,
            "aaaaaaaa-0000-4000-8000-00000000000/",
        ] {
            let m = listed(
                vec![namespace("apps", Some("true"))],
                vec![pod("apps", "a", bad, serde_json::json!({}))],
            );
            assert!(keys(&m).is_empty(), "{bad}");
            assert!(rejected(&m, Rejected::Uid) >= 1, "{bad}");
        }
    }

    #[test]
    fn pod_without_uid_is_ignored() {
        let mut p = pod("apps", "a", UID_A, serde_json::json!({}));
        p.metadata.uid = None;
        let m = listed(vec![namespace("apps", Some("true"))], vec![p]);
        assert!(keys(&m).is_empty());
    }
}
