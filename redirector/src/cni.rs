//! Zero gap for new pods: a chained CNI plugin.
//!
//! The container runtime runs the node's CNI plugins when it creates a pod's sandbox, after
//! the kubelet made the pod's cgroup and before any container of the pod starts (init
//! containers included); the pod does not start until every plugin has answered. Our plugin
//! (`redirector cni`, chained after the node's own network plugin) asks the daemon over a
//! Unix socket whether the pod is one to redirect and, if it is, waits until the daemon has
//! bound the pod's listener in the namespace the runtime made and written the pod's cgroup
//! into `rdr_enabled` as "redirect". So a pod's first connection is redirected, never direct.
//! While the daemon cannot answer (node boot, crash, upgrade gap), pods outside the exempt
//! namespaces are not created: the runtime gets "try again later" and the kubelet retries.
//! That is the fail-closed choice; the exempt list keeps the daemon's own namespace (and the
//! cluster's system pods) from waiting on it. Pods that already exist are unaffected: their
//! entries are pinned.
//!
//! Why a CNI plugin rather than the alternatives: enabling a cgroup when the daemon sees it
//! (inotify) races a process that connects at once; a node taint covers node boot only; the
//! CNI call is the one synchronous step every pod goes through before its first process, and
//! it hands over the pod's network namespace. Istio's and Cilium's node agents use it the
//! same way.
//!
//! The wire protocol is one JSON line each way; with an ADD, the plugin (which runs in the
//! node's mount namespace, where the runtime's `CNI_NETNS` path is valid) opens the pod's
//! namespace and passes the open descriptor along (`SCM_RIGHTS`). Everything is checked: the
//! pod UID and names by their Kubernetes syntax, the descriptor by what it is (an nsfs file
//! of a network namespace). No path crosses the socket, and a request never names a cgroup:
//! the daemon finds the pod's cgroup itself, from its own view of the API and the kubelet's
//! layout (`kubelet::confine`).
use std::{
    io::{BufRead as _, Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::watch,
};
use tracing::{info, warn};

use crate::{
    k8s::PodsView,
    kubelet::PodUid,
    netns::{self, NetnsFile},
    state::Hint,
    state::Shared,
    workloads::DesiredSet,
};

/// Where the daemon listens for the plugin, and where the plugin looks by default.
pub const DEFAULT_SOCKET: &str = "/var/run/egress-redirector/cni.sock";
/// The plugin's `type` in the CNI configuration, and its binary's name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "egress-redirector";
/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;
/// How long the daemon works on one ADD before answering "try again later".
const ADD_DEADLINE: Duration = Duration::from_secs(20);

/// A request from the plugin.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// `ADD`, `DEL` or `CHECK`.
    pub command: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// The daemon's answer.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    pub ok: bool,
    /// ADD: whether the pod is redirected (false: not ours, left alone).
    pub redirected: bool,
    /// Why not ok (no secrets, no pod-controlled text beyond the checked names).
    pub error: Option<String>,
}

/// Serves the plugin on `path` until shutdown. The socket's directory is made 0700 and the
/// socket 0600: only root on the node (the container runtime) talks to it.
pub async fn serve(
    shared: Arc<Shared>,
    path: PathBuf,
    desired: watch::Receiver<DesiredSet>,
    view: watch::Receiver<PodsView>,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %path.display(), "answering the CNI plugin");
    loop {
        let (stream, _) = tokio::select! {
            () = shared.shutdown.cancelled() => return Ok(()),
            r = listener.accept() => r?,
        };
        let (shared, desired, view) = (Arc::clone(&shared), desired.clone(), view.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(&shared, stream, desired, view).await {
                warn!(error = %e, "CNI request failed");
            }
        });
    }
}

async fn answer(
    shared: &Arc<Shared>,
    stream: UnixStream,
    desired: watch::Receiver<DesiredSet>,
    view: watch::Receiver<PodsView>,
) -> std::io::Result<()> {
    let std = stream.into_std()?;
    std.set_nonblocking(false)?;
    std.set_read_timeout(Some(Duration::from_secs(5)))?;
    let (std, line, fd) =
        tokio::task::spawn_blocking(move || receive(&std).map(|(line, fd)| (std, line, fd)))
            .await
            .map_err(std::io::Error::other)??;
    let reply = match parse(&line) {
        Ok(req) => {
            let netns = fd.map(std::fs::File::from);
            let reply = handle(shared, &req, netns, desired, view).await;
            let outcome = match (&reply.error, reply.redirected) {
                (Some(_), _) => "error",
                (None, true) => "redirected",
                (None, false) => "not ours",
            };
            shared
                .metrics
                .cni_requests
                .get_or_create(&crate::telemetry::CniLabels {
                    command: command_label(&req.command),
                    outcome,
                })
                .inc();
            info!(command = %req.command, pod = %format!("{}/{}", req.pod_namespace, req.pod_name),
                uid = %req.pod_uid, outcome, error = reply.error.as_deref().unwrap_or(""), "CNI request");
            reply
        }
        Err(e) => {
            shared
                .metrics
                .cni_requests
                .get_or_create(&crate::telemetry::CniLabels {
                    command: "invalid",
                    outcome: "error",
                })
                .inc();
            warn!(error = %e, "invalid CNI request refused");
            failure(e)
        }
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    tokio::task::spawn_blocking(move || (&std).write_all(&out))
        .await
        .map_err(std::io::Error::other)?
}

/// One request: the line (sent in one message, at most [`MAX_REQUEST`] bytes) and the
/// descriptor passed with it, if any. More than one descriptor is refused (and closed).
fn receive(
    s: &std::os::unix::net::UnixStream,
) -> std::io::Result<(Vec<u8>, Option<std::os::fd::OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let mut buf = vec![0u8; MAX_REQUEST + 1];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 2]);
    let mut fds: Vec<OwnedFd> = Vec::new();
    let n = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel installed these descriptors in our table for this
                // message; nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        msg.bytes
    };
    if fds.len() > 1 {
        return Err(std::io::Error::other("more than one descriptor passed"));
    }
    buf.truncate(n);
    Ok((buf, fds.pop()))
}

fn command_label(c: &str) -> &'static str {
    match c {
        "ADD" => "ADD",
        "DEL" => "DEL",
        _ => "CHECK",
    }
}

fn failure(error: String) -> Reply {
    Reply {
        ok: false,
        redirected: false,
        error: Some(error),
    }
}

/// Parses and checks a request line; the error says which field is wrong, never echoing it.
pub fn parse(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    let req: Request = serde_json::from_slice(line)
        .map_err(|e| format!("not a request: {}", json_error_kind(&e)))?;
    if !matches!(req.command.as_str(), "ADD" | "DEL" | "CHECK") {
        return Err("unknown command".into());
    }
    if !dns_name(&req.pod_namespace, 63) {
        return Err("pod namespace is not a Kubernetes namespace name".into());
    }
    if !dns_name(&req.pod_name, 253) {
        return Err("pod name is not a Kubernetes object name".into());
    }
    if PodUid::from_api(&req.pod_uid).is_none() {
        return Err("pod UID is not a UID".into());
    }
    Ok(req)
}

/// What was wrong with a request that is not JSON of our shape, without quoting it.
fn json_error_kind(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "JSON syntax error",
        serde_json::error::Category::Data => "wrong or unknown fields",
        serde_json::error::Category::Eof => "truncated",
    }
}

/// A DNS-1123 subdomain (names) or label (namespaces, `max` 63).
fn dns_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// Whether the daemon's view says the pod is one to redirect.
enum Verdict {
    Ours,
    NotOurs,
    Unknown,
}

fn verdict(req: &Request, desired: &DesiredSet, view: &PodsView) -> Verdict {
    if !view.synced {
        return Verdict::Unknown;
    }
    if !view.labeled.contains(&req.pod_namespace) {
        return Verdict::NotOurs;
    }
    if desired.contains_key(&req.pod_uid) {
        return Verdict::Ours;
    }
    if view.pods.contains(&req.pod_uid) {
        // Seen, and not to be enabled (opted out, host network, not this node's).
        return Verdict::NotOurs;
    }
    Verdict::Unknown
}

async fn handle(
    shared: &Arc<Shared>,
    req: &Request,
    netns: Option<std::fs::File>,
    mut desired: watch::Receiver<DesiredSet>,
    mut view: watch::Receiver<PodsView>,
) -> Reply {
    match req.command.as_str() {
        "DEL" => {
            shared.cni.set_hint(&req.pod_uid, None);
            return Reply {
                ok: true,
                redirected: false,
                error: None,
            };
        }
        "CHECK" => {
            return Reply {
                ok: true,
                redirected: false,
                error: None,
            };
        }
        _ => {}
    }
    let deadline = tokio::time::Instant::now() + ADD_DEADLINE;
    // 1. Ours or not: the watcher may not have seen the pod yet (the kubelet and we both
    //    learn of it from the API); wait for it, bounded.
    loop {
        let v = {
            let d = desired.borrow_and_update();
            let w = view.borrow_and_update();
            verdict(req, &d, &w)
        };
        match v {
            Verdict::Ours => break,
            Verdict::NotOurs => {
                return Reply {
                    ok: true,
                    redirected: false,
                    error: None,
                };
            }
            Verdict::Unknown => {}
        }
        let changed = async {
            tokio::select! {
                r = desired.changed() => r.is_ok(),
                r = view.changed() => r.is_ok(),
            }
        };
        match tokio::time::timeout_at(deadline, changed).await {
            Ok(true) => {}
            Ok(false) => return failure("the daemon is not following the API".into()),
            Err(_) => {
                return failure(
                    "the daemon does not know this pod yet (API watch behind): try again".into(),
                );
            }
        }
    }
    // 2. The namespace the runtime made: checked by what it is, then handed to the
    //    reconciler, which binds the listener there and enables the pod's cgroup.
    let Some(file) = netns else {
        return failure("no network namespace passed with the ADD".into());
    };
    let id = match netns::check_netns_file(&file) {
        Ok(id) => id,
        Err(e) => return failure(format!("the descriptor passed: {e}")),
    };
    let netns = NetnsFile {
        id,
        file: Arc::new(file),
    };
    shared.cni.set_hint(&req.pod_uid, Some(Hint { netns }));
    let mut passes = shared.cni.passes();
    shared.cni.wake();
    // 3. Done when the pod's view says "redirect" (listener bound, entry written), or
    //    "audit" for a pod of an audited namespace (entry written: its first connects are
    //    counted; they go direct, as audit mode means).
    loop {
        let state = shared
            .workloads()
            .iter()
            .find(|w| w.key == req.pod_uid)
            .map(|w| (w.state.clone(), w.port));
        match state {
            Some((s, Some(_))) if s == "redirect" => {
                return Reply {
                    ok: true,
                    redirected: true,
                    error: None,
                };
            }
            Some((s, _)) if s == "audit" => {
                return Reply {
                    ok: true,
                    redirected: false,
                    error: None,
                };
            }
            _ => {}
        }
        match tokio::time::timeout_at(deadline, passes.changed()).await {
            Ok(Ok(())) => {}
            _ => {
                return failure(
                    "the pod's listener is not bound yet (its cgroup may not exist): try again"
                        .into(),
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The plugin side: `redirector cni`, run by the container runtime.

/// The plugin's part of the network configuration.
#[derive(Debug, Deserialize)]
struct PluginConf {
    #[serde(rename = "cniVersion", default)]
    cni_version: Option<String>,
    /// The daemon's socket [`DEFAULT_SOCKET`].
    #[serde(default)]
    socket: Option<PathBuf>,
    /// Namespaces whose pods are created even when the daemon cannot be asked.
    #[serde(default = "default_exempt")]
    exempt_namespaces: Vec<String>,
    /// The result of the plugins before us, passed on unchanged.
    #[serde(rename = "prevResult", default)]
    prev_result: Option<serde_json::Value>,
}

fn default_exempt() -> Vec<String> {
    vec!["kube-system".into(), "egress-redirector".into()]
}

/// CNI error code 11: "try again later" (CNI spec 1.0).
const TRY_AGAIN: u32 = 11;
/// CNI error code 7: invalid network config.
const BAD_CONFIG: u32 = 7;
/// CNI error code 5: I/O failure.
const IO_FAILURE: u32 = 5;

/// Runs the plugin: environment and stdin as the CNI spec gives them, result or error on
/// stdout. Returns the exit code.
pub fn plugin_main() -> i32 {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = Vec::new();
    if command != "VERSION" {
        let _ = std::io::stdin().take(1 << 20).read_to_end(&mut stdin);
    }
    let (code, out) = plugin(&command, &stdin, |k| std::env::var(k).ok());
    println!("{out}");
    code
}

/// The plugin's logic, free of process globals (tested directly).
pub fn plugin(command: &str, stdin: &[u8], env: impl Fn(&str) -> Option<String>) -> (i32, String) {
    const VERSIONS: &str = r#"["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]"#;
    if command == "VERSION" {
        return (
            0,
            format!(r#"{{"cniVersion":"1.1.0","supportedVersions":{VERSIONS}}}"#),
        );
    }
    let conf: PluginConf = match serde_json::from_slice(stdin) {
        Ok(c) => c,
        Err(e) => return error_out("1.0.0", BAD_CONFIG, &format!("network config: {e}")),
    };
    let version = conf.cni_version.clone().unwrap_or_else(|| "1.0.0".into());
    let pass = || {
        let prev = conf
            .prev_result
            .clone()
            .unwrap_or_else(|| serde_json::json!({}));
        let mut prev = prev;
        if let Some(o) = prev.as_object_mut() {
            o.insert("cniVersion".into(), version.clone().into());
        }
        (0, prev.to_string())
    };
    if matches!(command, "STATUS" | "GC") {
        return (0, String::new());
    }
    let args = env("CNI_ARGS").unwrap_or_default();
    let arg = |k: &str| {
        args.split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_owned())
    };
    let (Some(ns), Some(name), Some(uid)) = (
        arg("K8S_POD_NAMESPACE"),
        arg("K8S_POD_NAME"),
        arg("K8S_POD_UID"),
    ) else {
        // Not a Kubernetes pod (or a runtime that does not say which): nothing of ours.
        return pass();
    };
    let req = Request {
        command: command.to_owned(),
        pod_namespace: ns.clone(),
        pod_name: name,
        pod_uid: uid,
    };
    let socket = conf
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    // The pod's namespace, opened here (the runtime's path is valid in the node's mount
    // namespace, where plugins run) and passed as a descriptor.
    let netns = if command == "ADD" {
        let path = env("CNI_NETNS").unwrap_or_default();
        match std::fs::File::open(&path) {
            Ok(f) => Some(f),
            Err(e) => {
                return error_out(&version, IO_FAILURE, &format!("CNI_NETNS {path:?}: {e}"));
            }
        }
    } else {
        None
    };
    match ask(&socket, &req, netns.as_ref()) {
        Ok(r) if r.ok => pass(),
        Ok(r) => {
            if command == "DEL" {
                return pass();
            }
            error_out(
                &version,
                TRY_AGAIN,
                &format!(
                    "egress redirector: {}",
                    r.error.unwrap_or_else(|| "refused".into())
                ),
            )
        }
        // DEL must succeed whatever is left; exempt namespaces do not wait for the daemon.
        Err(_) if command == "DEL" || conf.exempt_namespaces.contains(&ns) => pass(),
        Err(e) => error_out(
            &version,
            TRY_AGAIN,
            &format!(
                "egress redirector daemon not reachable at {}: {e}; pods wait until it runs",
                socket.display()
            ),
        ),
    }
}

fn error_out(version: &str, code: u32, msg: &str) -> (i32, String) {
    let e = serde_json::json!({"cniVersion": version, "code": code, "msg": msg});
    (1, e.to_string())
}

/// One request to the daemon (blocking: the plugin is a short-lived process), with the
/// namespace descriptor when there is one, in one message.
fn ask(socket: &Path, req: &Request, netns: Option<&std::fs::File>) -> std::io::Result<Reply> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd as _;
    let s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(ADD_DEADLINE + Duration::from_secs(5)))?;
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let fds: Vec<std::os::fd::RawFd> = netns.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    let sent = sendmsg::<()>(
        s.as_raw_fd(),
        &[std::io::IoSlice::new(&line)],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)?;
    if sent != line.len() {
        return Err(std::io::Error::other("request not sent whole"));
    }
    let mut reply = String::new();
    std::io::BufReader::new(s.take(64 * 1024)).read_line(&mut reply)?;
    serde_json::from_str(&reply).map_err(std::io::Error::other)
}

// ---------------------------------------------------------------------------------------
// Installation: the DaemonSet's init container chains the plugin into the node's network
// configuration; `redirector uninstall-cni` takes it out again.

/// Copies this binary to `bin_dir/egress-redirector` and appends the plugin to the first
/// `.conflist` of `conf_dir` (by name, as the runtime picks it) unless it is there already.
/// Returns the conflist changed.
pub fn install(
    conf_dir: &Path,
    bin_dir: &Path,
    socket: &Path,
    exe: &Path,
) -> std::io::Result<PathBuf> {
    let conflist = primary_conflist(conf_dir)?;
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    std::fs::copy(exe, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, bin_dir.join(PLUGIN_TYPE))?;
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&conflist)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let plugins = v
        .get_mut("plugins")
        .and_then(|p| p.as_array_mut())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "conflist has no plugins")
        })?;
    plugins.retain(|p| p.get("type").and_then(|t| t.as_str()) != Some(PLUGIN_TYPE));
    plugins.push(serde_json::json!({
        "type": PLUGIN_TYPE,
        "socket": socket,
    }));
    write_atomically(&conflist, &v)?;
    Ok(conflist)
}

/// Takes the plugin out of every `.conflist` in `conf_dir` and removes its binary.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for entry in std::fs::read_dir(conf_dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("conflist") {
            continue;
        }
        let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&std::fs::read(&path)?) else {
            continue;
        };
        let Some(plugins) = v.get_mut("plugins").and_then(|p| p.as_array_mut()) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| p.get("type").and_then(|t| t.as_str()) != Some(PLUGIN_TYPE));
        if plugins.len() != before {
            write_atomically(&path, &v)?;
            changed.push(path);
        }
    }
    match std::fs::remove_file(bin_dir.join(PLUGIN_TYPE)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(changed)
}

fn primary_conflist(conf_dir: &Path) -> std::io::Result<PathBuf> {
    let mut lists: Vec<PathBuf> = std::fs::read_dir(conf_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("conflist"))
        .collect();
    lists.sort();
    lists.into_iter().next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "no .conflist in {} (the node's network plugin writes one)",
                conf_dir.display()
            ),
        )
    })
}

fn write_atomically(path: &Path, v: &serde_json::Value) -> std::io::Result<()> {
    let tmp = path.with_extension("conflist.tmp");
    let text = serde_json::to_string_pretty(v).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    fn line(v: serde_json::Value) -> Vec<u8> {
        v.to_string().into_bytes()
    }

    #[test]
    fn requests_are_checked_field_by_field_without_echoing_them() {
        let ok = serde_json::json!({"command":"ADD","pod_namespace":"apps","pod_name":"web-1",
            "pod_uid": UID});
        assert!(parse(&line(ok.clone())).is_ok());
        let cases = [
            ("command", serde_json::json!("EXEC"), "unknown command"),
            ("pod_namespace", serde_json::json!("../etc"), "namespace"),
            ("pod_name", serde_json::json!("a/b"), "pod name"),
            ("pod_uid", serde_json::json!("../../x"), "UID"),
        ];
        for (field, value, want) in cases {
            let mut bad = ok.clone();
            bad[field] = value.clone();
            let err = parse(&line(bad)).unwrap_err();
            assert!(err.contains(want), "{field}: {err}");
            assert!(
                !err.contains(value.as_str().unwrap()),
                "{field} echoed: {err}"
            );
        }
        let mut extra = ok.clone();
        extra["netns"] = "/proc/1/ns/net".into();
        assert!(parse(&line(extra)).is_err(), "unknown fields refused");
        assert!(parse(&vec![b'{'; MAX_REQUEST + 1]).is_err());
    }

    #[test]
    fn the_plugin_passes_the_previous_result_on_and_fails_closed_without_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("none.sock");
        let conf = serde_json::json!({"cniVersion":"1.0.0","name":"k8s","type":PLUGIN_TYPE,
            "socket": socket, "prevResult": {"interfaces":[{"name":"eth0"}]}});
        let stdin = conf.to_string().into_bytes();
        let env = |ns: &'static str| {
            move |k: &str| match k {
                "CNI_ARGS" => Some(format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=web;K8S_POD_UID={UID}"
                )),
                "CNI_NETNS" => Some("/proc/self/ns/net".into()),
                _ => None,
            }
        };
        // No daemon: a pod of an ordinary namespace waits ("try again later")...
        let (code, out) = plugin("ADD", &stdin, env("apps"));
        assert_eq!(code, 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["code"], TRY_AGAIN);
        // ...an exempt one does not, DEL always succeeds, and the result is passed on.
        let (code, out) = plugin("ADD", &stdin, env("kube-system"));
        assert_eq!(code, 0, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["interfaces"][0]["name"], "eth0");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(plugin("DEL", &stdin, env("apps")).0, 0);
        // Not a Kubernetes pod: nothing to ask.
        assert_eq!(plugin("ADD", &stdin, |_| None).0, 0);
        let (code, out) = plugin("VERSION", b"", |_| None);
        assert_eq!(code, 0);
        assert!(out.contains("1.0.0"));
    }

    #[test]
    fn install_chains_the_plugin_once_and_uninstall_takes_it_out() {
        let dir = tempfile::tempdir().unwrap();
        let (conf, bin) = (dir.path().join("net.d"), dir.path().join("bin"));
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        let primary = conf.join("10-bridge.conflist");
        std::fs::write(
            &primary,
            r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        std::fs::write(conf.join("99-other.conflist"), r#"{"plugins":[]}"#).unwrap();
        let exe = dir.path().join("redirector");
        std::fs::write(&exe, b"binary").unwrap();
        let sock = Path::new("/var/run/egress-redirector/cni.sock");
        for _ in 0..2 {
            assert_eq!(install(&conf, &bin, sock, &exe).unwrap(), primary);
        }
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&primary).unwrap()).unwrap();
        let types: Vec<&str> = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "portmap", PLUGIN_TYPE]);
        assert_eq!(std::fs::read(bin.join(PLUGIN_TYPE)).unwrap(), b"binary");
        assert_eq!(uninstall(&conf, &bin).unwrap(), vec![primary.clone()]);
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&primary).unwrap()).unwrap();
        assert_eq!(v["plugins"].as_array().unwrap().len(), 2);
        assert!(!bin.join(PLUGIN_TYPE).exists());
    }
}
