//! `redirector status`: reads the pins (works while the daemon is down) and asks the daemon.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    admin::client::{self, Fetch, GetError, fetch_json},
    api::{ConnView, WorkloadView},
    bpf::{self, Maps, PinLayout},
};
use redirector_common::{Counters, names};

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_root: PathBuf,
    pub links: BTreeMap<&'static str, bool>,
    pub daemon: DaemonState,
    pub proxy_port: Option<u16>,
    pub enabled_cgroups: Vec<EnabledCgroup>,
    pub skip_ranges: Vec<String>,
    pub pending_original_destinations: usize,
    pub counters: Option<CountersView>,
    /// What the daemon wants enabled (`GET /workloads`); `None` when it could not say.
    pub workloads: Option<Vec<WorkloadView>>,
    /// Connections being relayed right now (`GET /connections`); `None` when unknown.
    pub connections: Option<Vec<ConnView>>,
    /// Audited workloads' counts, read from the audit maps (works while the daemon is down).
    pub audit: Vec<AuditView>,
    /// Why `workloads` / `connections` are missing, in words.
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct EnabledCgroup {
    pub id: u64,
    pub path: Option<PathBuf>,
    /// `namespace/pod` (or the configured cgroup path) when the daemon knows the workload.
    pub workload: Option<String>,
    /// The listener port its connects are redirected to; `None`: they are refused (its
    /// listener is not bound yet, or cannot be), or audited.
    pub port: Option<u16>,
    /// Audit mode: observed and counted, not redirected.
    pub audit: bool,
}

/// Destinations per audited workload that `status` lists.
pub const AUDIT_SHOWN: usize = 10;

/// One audited workload's counts: what enforcement would do with its connects.
#[derive(Debug, Serialize)]
pub struct AuditView {
    pub cgroup_id: u64,
    /// `namespace/pod` or the cgroup path, when the daemon knows the workload.
    pub workload: Option<String>,
    pub would_redirect: u64,
    pub would_skip: u64,
    /// Connects whose destination the full `rdr_audit` map could not track.
    pub untracked: u64,
    /// Its destinations with the highest counts, at most [`AUDIT_SHOWN`].
    pub destinations: Vec<crate::audit::DestCount>,
    /// How many more destinations it has.
    pub more_destinations: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonState {
    Ready,
    NotReady,
    NotRunning,
}

/// The eBPF counters summed over CPUs; JSON `{"<name>": value, ...}` in index order.
#[derive(Debug)]
pub struct CountersView(pub Counters);

impl From<Counters> for CountersView {
    fn from(c: Counters) -> Self {
        Self(c)
    }
}

impl Serialize for CountersView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let named = self.0.named();
        let mut map = s.serialize_map(Some(named.len()))?;
        for (name, v) in named {
            map.serialize_entry(name, &v)?;
        }
        map.end()
    }
}

/// Asks `/readyz` on the admin address; a refused connection means the daemon is down.
pub fn probe_daemon(addr: SocketAddr) -> DaemonState {
    match client::get(addr, "/readyz") {
        Ok((200, _)) => DaemonState::Ready,
        Ok(_) | Err(GetError::Malformed(_)) => DaemonState::NotReady,
        Err(_) => DaemonState::NotRunning,
    }
}

fn find_cgroup_paths(root: &Path, ids: &[u64]) -> BTreeMap<u64, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        if let Ok(id) = crate::netns::cgroup_id(&dir)
            && ids.contains(&id)
        {
            out.insert(id, dir.clone());
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

pub fn collect(
    pin_root: &Path,
    admin: SocketAddr,
    cgroup_root: &Path,
) -> Result<Status, bpf::BpfError> {
    let pins = PinLayout::new(pin_root);
    let links: BTreeMap<&'static str, bool> = names::LINKS
        .iter()
        .map(|l| (*l, bpf::link_alive(&pins, l)))
        .collect();
    let maps = Maps::open(&pins)?;
    let ids: Vec<u64> = maps.enabled_ids().into_iter().collect();
    let mut paths = find_cgroup_paths(cgroup_root, &ids);
    let daemon = probe_daemon(admin);
    let mut notes = Vec::new();
    let (workloads, connections) = match daemon {
        DaemonState::NotRunning => {
            notes.push(format!("the daemon is not running (nothing answers on {admin}): pod names and live connections are unknown"));
            (None, None)
        }
        _ => (
            take(
                fetch_json::<Vec<WorkloadView>>(admin, "/workloads"),
                "/workloads",
                "pod names",
                &mut notes,
            ),
            take(
                fetch_json::<Vec<ConnView>>(admin, "/connections"),
                "/connections",
                "live connections",
                &mut notes,
            ),
        ),
    };
    // The daemon knows where each workload's cgroup is even when it is outside --cgroup-root.
    for w in workloads.iter().flatten() {
        if let (Some(id), Some(p)) = (w.cgroup_id, &w.cgroup) {
            paths.entry(id).or_insert_with(|| p.into());
        }
    }
    let enabled_cgroups = ids
        .iter()
        .map(|id| {
            let path = paths.get(id).cloned();
            let workload = workloads
                .iter()
                .flatten()
                .find(|w| workload_is(w, *id, path.as_deref()))
                .map(|w| w.label.clone());
            let mode = maps.mode(*id);
            let port = match mode {
                Some(bpf::CgroupMode::Redirect { port }) => Some(port),
                _ => None,
            };
            EnabledCgroup {
                id: *id,
                path,
                workload,
                port,
                audit: mode == Some(bpf::CgroupMode::Audit),
            }
        })
        .collect();
    let audit = match bpf::AuditMaps::open(&pins) {
        Ok(m) => {
            let snap = m.snapshot();
            snap.totals
                .iter()
                .map(|(id, t)| {
                    let (destinations, more_destinations) =
                        crate::audit::top_of(&snap.dests, *id, AUDIT_SHOWN);
                    AuditView {
                        cgroup_id: *id,
                        workload: workloads
                            .iter()
                            .flatten()
                            .find(|w| w.cgroup_id == Some(*id))
                            .map(|w| w.label.clone()),
                        would_redirect: t.redirect,
                        would_skip: t.skip,
                        untracked: t.untracked,
                        destinations,
                        more_destinations,
                    }
                })
                .collect()
        }
        Err(_) => {
            notes.push("no audit maps under the pin root (pinned by a release before audit mode): audit counts unknown".into());
            Vec::new()
        }
    };
    if !bpf::audit_supported(&pins) && links.values().all(|up| *up) {
        notes.push("the attached programs predate audit mode: audited workloads are left alone and not counted until they are replaced".into());
    }
    Ok(Status {
        pin_root: pin_root.to_owned(),
        links,
        daemon,
        proxy_port: maps
            .config()
            .ok()
            .filter(|c| c.ready != 0)
            .map(|c| c.proxy_port),
        enabled_cgroups,
        skip_ranges: maps.skip_ranges().iter().map(|n| n.to_string()).collect(),
        pending_original_destinations: maps.orig_len(),
        counters: maps.counters().ok().map(Into::into),
        workloads,
        connections,
        audit,
        notes,
    })
}

fn workload_is(w: &WorkloadView, id: u64, path: Option<&Path>) -> bool {
    match w.cgroup_id {
        Some(wid) => wid == id,
        None => path.is_some() && w.cgroup.as_deref().map(Path::new) == path,
    }
}

fn take<T>(f: Fetch<T>, path: &str, what: &str, notes: &mut Vec<String>) -> Option<T> {
    match f {
        Fetch::Ok(v) => Some(v),
        Fetch::Missing => {
            notes.push(format!(
                "this daemon does not serve {path} (an older version): {what} unknown"
            ));
            None
        }
        Fetch::Down => {
            notes.push(format!("the daemon stopped answering: {what} unknown"));
            None
        }
        Fetch::Bad(why) => {
            notes.push(format!("{what} unknown: {why}"));
            None
        }
    }
}

/// A label that is a cgroup path adds nothing next to the path; `ns/pod` does.
fn pod_label(label: &str, path: Option<&Path>) -> Option<String> {
    if label.is_empty() || path.is_some_and(|p| p == Path::new(label)) {
        None
    } else if label.starts_with('/') {
        Some(format!("({label})"))
    } else {
        Some(format!("pod {label}"))
    }
}

fn age(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

pub fn render_text(s: &Status) -> String {
    let mut out = String::new();
    let daemon = match s.daemon {
        DaemonState::Ready => "running, ready".to_owned(),
        DaemonState::NotReady => "running, NOT ready".to_owned(),
        DaemonState::NotRunning => {
            "NOT RUNNING (pins below are what a restarted daemon will adopt; redirected \
             connects are refused until it is back)"
                .to_owned()
        }
    };
    out += &format!("daemon:      {daemon}\n");
    out += &format!("pin root:    {}\n", s.pin_root.display());
    for (l, alive) in &s.links {
        out += &format!(
            "link {l:<12} {}\n",
            if *alive { "attached" } else { "MISSING" }
        );
    }
    if let Some(p) = s.proxy_port {
        let last = p.saturating_add(redirector_common::PROXY_PORT_CHOICES - 1);
        out += &format!("proxy ports: {p}-{last} (the first free one in each pod)\n");
    }
    out += &format!("enabled cgroups ({}):\n", s.enabled_cgroups.len());
    for c in &s.enabled_cgroups {
        let path = c
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(path not found under cgroup root)".into());
        let label = c
            .workload
            .as_deref()
            .and_then(|l| pod_label(l, c.path.as_deref()));
        let mode = match (c.port, c.audit) {
            (Some(p), _) => format!("port {p}"),
            (None, true) => "audit".into(),
            (None, false) => "REFUSED".into(),
        };
        match label {
            Some(l) => out += &format!("  {:>10}  {mode:<10}  {path}  {l}\n", c.id),
            None => out += &format!("  {:>10}  {mode:<10}  {path}\n", c.id),
        }
    }
    // Workloads the daemon wants but has not (yet) put into the kernel map.
    let waiting: Vec<&WorkloadView> = s
        .workloads
        .iter()
        .flatten()
        .filter(|w| {
            !s.enabled_cgroups
                .iter()
                .any(|c| workload_is(w, c.id, c.path.as_deref()))
        })
        .collect();
    if !waiting.is_empty() {
        out += &format!("waiting workloads ({}):\n", waiting.len());
        for w in waiting {
            let why = match (&w.cgroup, w.listening) {
                (None, _) => "cgroup not created yet".to_owned(),
                (Some(p), false) => {
                    format!("{p}: not enabled yet (waiting for its first process or its listener)")
                }
                (Some(p), true) => format!(
                    "{p}: enabled by the daemon, but its id is not in rdr_enabled (cgroup recreated?)"
                ),
            };
            out += &format!("  {}  {why}\n", w.label);
        }
    }
    if !s.audit.is_empty() {
        out += &format!(
            "audit: what enforcement would do ({} workload(s)):\n",
            s.audit.len()
        );
        for a in &s.audit {
            let who = a
                .workload
                .clone()
                .unwrap_or_else(|| format!("cgroup id {}", a.cgroup_id));
            out += &format!(
                "  {who}: would redirect {}, would skip {}",
                a.would_redirect, a.would_skip
            );
            if a.untracked > 0 {
                out += &format!(" ({} to destinations not tracked: map full)", a.untracked);
            }
            out += "\n";
            for d in &a.destinations {
                out += &format!("    {:<46} {:<8} {}\n", d.destination, d.verdict, d.count);
            }
            if a.more_destinations > 0 {
                out += &format!("    (+{} more destinations)\n", a.more_destinations);
            }
        }
    }
    out += &format!(
        "skip ranges: {}\n",
        if s.skip_ranges.is_empty() {
            "(none)".into()
        } else {
            s.skip_ranges.join(", ")
        }
    );
    out += &format!("awaiting accept: {}\n", s.pending_original_destinations);
    if let Some(c) = &s.counters {
        let counters: Vec<String> =
            c.0.named()
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect();
        out += &format!("counters:    {}\n", counters.join(" "));
    }
    match &s.connections {
        Some(conns) => {
            out += &format!("live connections ({}):\n", conns.len());
            for c in conns {
                let host = c.host.as_deref().unwrap_or("-");
                out += &format!(
                    "  {}  {} -> {} host={host} route={} age={}\n",
                    c.workload,
                    c.src,
                    c.orig_dst,
                    c.route,
                    age(c.since_ms)
                );
            }
        }
        None => out += "live connections: unknown\n",
    }
    for n in &s.notes {
        out += &format!("note: {n}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn status(daemon: DaemonState) -> Status {
        Status {
            pin_root: "/sys/fs/bpf/redirector".into(),
            links: names::LINKS.iter().map(|l| (*l, true)).collect(),
            daemon,
            proxy_port: Some(15300),
            enabled_cgroups: vec![
                EnabledCgroup {
                    id: 842,
                    path: Some("/sys/fs/cgroup/kubepods/pod-a".into()),
                    workload: Some("default/agent-1".into()),
                    port: Some(15300),
                    audit: false,
                },
                EnabledCgroup {
                    id: 900,
                    path: Some("/sys/fs/cgroup/agent.service".into()),
                    workload: Some("/sys/fs/cgroup/agent.service".into()),
                    port: None,
                    audit: false,
                },
            ],
            skip_ranges: vec!["10.96.0.0/12".into()],
            pending_original_destinations: 0,
            counters: Some(
                Counters {
                    redirected4: 3,
                    ..Default::default()
                }
                .into(),
            ),
            workloads: None,
            connections: None,
            audit: Vec::new(),
            notes: Vec::new(),
        }
    }

    #[test]
    fn text_shows_audited_workloads_with_their_destinations() {
        let mut s = status(DaemonState::Ready);
        s.enabled_cgroups.push(EnabledCgroup {
            id: 950,
            path: Some("/sys/fs/cgroup/kubepods/pod-b".into()),
            workload: Some("shop/web".into()),
            port: None,
            audit: true,
        });
        s.audit = vec![AuditView {
            cgroup_id: 950,
            workload: Some("shop/web".into()),
            would_redirect: 7,
            would_skip: 2,
            untracked: 1,
            destinations: vec![crate::audit::DestCount {
                destination: "203.0.113.9:443".into(),
                verdict: "redirect".into(),
                count: 6,
            }],
            more_destinations: 2,
        }];
        let t = render_text(&s);
        assert!(
            t.contains("950  audit       /sys/fs/cgroup/kubepods/pod-b  pod shop/web"),
            "{t}"
        );
        assert!(
            t.contains("audit: what enforcement would do (1 workload(s)):"),
            "{t}"
        );
        assert!(
            t.contains("  shop/web: would redirect 7, would skip 2 (1 to destinations not tracked: map full)\n"),
            "{t}"
        );
        let words = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            t.lines().any(|l| words(l) == "203.0.113.9:443 redirect 6"),
            "{t}"
        );
        assert!(t.contains("(+2 more destinations)"), "{t}");
    }

    #[test]
    fn text_names_pods_and_connections() {
        let mut s = status(DaemonState::Ready);
        s.workloads = Some(vec![WorkloadView {
            key: "uid-2".into(),
            label: "default/agent-2".into(),
            cgroup: None,
            cgroup_id: None,
            listening: false,
            ..Default::default()
        }]);
        s.connections = Some(vec![ConnView {
            workload: "default/agent-1".into(),
            src: "10.1.0.7:40000".into(),
            orig_dst: "203.0.113.10:443".into(),
            host: Some("portal.azure.test".into()),
            route: "gateway".into(),
            since_ms: 61_500,
            ..Default::default()
        }]);
        let t = render_text(&s);
        assert!(t.contains("daemon:      running, ready"), "{t}");
        assert!(t.contains("link rdr_link_c4  attached"), "{t}");
        assert!(
            t.contains("842  port 15300  /sys/fs/cgroup/kubepods/pod-a  pod default/agent-1"),
            "{t}"
        );
        assert!(
            t.contains("900  REFUSED     /sys/fs/cgroup/agent.service\n"),
            "a path label is not repeated: {t}"
        );
        assert!(t.contains("default/agent-2  cgroup not created yet"), "{t}");
        assert!(t.contains("live connections (1):"), "{t}");
        assert!(
            t.contains(
                "10.1.0.7:40000 -> 203.0.113.10:443 host=portal.azure.test route=gateway age=1m01s"
            ),
            "{t}"
        );
    }

    #[test]
    fn text_when_the_daemon_is_down() {
        let mut s = status(DaemonState::NotRunning);
        s.notes.push("the daemon is not running".into());
        let t = render_text(&s);
        assert!(t.contains("NOT RUNNING"), "{t}");
        assert!(t.contains("live connections: unknown"), "{t}");
        assert!(t.contains("note: the daemon is not running"), "{t}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["daemon"], "not_running");
        assert_eq!(json["enabled_cgroups"][0]["workload"], "default/agent-1");
        assert!(json["connections"].is_null());
    }

    #[test]
    fn counters_by_name_in_text_and_json() {
        let s = status(DaemonState::Ready);
        let t = render_text(&s);
        assert!(
            t.contains("counters:    redirected4=3 redirected6=0 skip_disabled=0 "),
            "{t}"
        );
        assert!(t.contains(" errors=0 refused=0\n"), "{t}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["counters"]["redirected4"], 3);
        assert_eq!(json["counters"]["skip_loopback"], 0);
        assert_eq!(
            json["counters"].as_object().unwrap().len(),
            Counters::NAMES.len()
        );
    }

    #[test]
    fn fetch_from_a_live_endpoint_and_a_closed_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for (i, s) in l.incoming().take(2).enumerate() {
                let mut s = s.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let resp: &[u8] = if i == 0 {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n[]"
                } else {
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                };
                s.write_all(resp).unwrap();
            }
        });
        assert!(
            matches!(fetch_json::<Vec<WorkloadView>>(addr, "/workloads"), Fetch::Ok(v) if v.is_empty())
        );
        assert!(matches!(
            fetch_json::<Vec<ConnView>>(addr, "/connections"),
            Fetch::Missing
        ));
        server.join().unwrap();
        // The listener is gone now: nothing answers.
        assert!(matches!(
            fetch_json::<Vec<WorkloadView>>(addr, "/workloads"),
            Fetch::Down
        ));
        assert!(matches!(probe_daemon(addr), DaemonState::NotRunning));
    }
}
