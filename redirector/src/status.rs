//! `redirector status`: reads the pins (works while the daemon is down) and asks the daemon.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

use crate::bpf::{self, Maps, PinLayout};
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
}

#[derive(Debug, Serialize)]
pub struct EnabledCgroup {
    pub id: u64,
    pub path: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonState {
    Ready,
    NotReady,
    NotRunning,
}

#[derive(Debug, Serialize)]
pub struct CountersView {
    pub redirected4: u64,
    pub redirected6: u64,
    pub skip_disabled: u64,
    pub skip_cidr: u64,
    pub skip_loopback: u64,
    pub skip_self: u64,
    pub skip_not_tcp: u64,
    pub established: u64,
    pub errors: u64,
}

impl From<Counters> for CountersView {
    fn from(c: Counters) -> Self {
        Self {
            redirected4: c.redirected4,
            redirected6: c.redirected6,
            skip_disabled: c.skip_disabled,
            skip_cidr: c.skip_cidr,
            skip_loopback: c.skip_loopback,
            skip_self: c.skip_self,
            skip_not_tcp: c.skip_not_tcp,
            established: c.established,
            errors: c.errors,
        }
    }
}

/// Asks `/readyz` on the admin address; a refused connection means the daemon is down.
pub fn probe_daemon(addr: SocketAddr) -> DaemonState {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return DaemonState::NotRunning;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    if buf.starts_with("HTTP/1.1 200") { DaemonState::Ready } else { DaemonState::NotReady }
}

fn find_cgroup_paths(root: &Path, ids: &[u64]) -> BTreeMap<u64, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        if let Ok(id) = crate::netns::cgroup_id(&dir) {
            if ids.contains(&id) {
                out.insert(id, dir.clone());
            }
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

pub fn collect(pin_root: &Path, admin: SocketAddr, cgroup_root: &Path) -> Result<Status, bpf::BpfError> {
    let pins = PinLayout::new(pin_root);
    let links = names::LINKS.iter().map(|l| (*l, bpf::link_alive(&pins, l))).collect();
    let maps = Maps::open(&pins)?;
    let ids: Vec<u64> = maps.enabled_ids().into_iter().collect();
    let paths = find_cgroup_paths(cgroup_root, &ids);
    Ok(Status {
        pin_root: pin_root.to_owned(),
        links,
        daemon: probe_daemon(admin),
        proxy_port: maps.config().ok().filter(|c| c.ready != 0).map(|c| c.proxy_port),
        enabled_cgroups: ids.iter().map(|id| EnabledCgroup { id: *id, path: paths.get(id).cloned() }).collect(),
        skip_ranges: maps.skip_ranges().iter().map(|n| n.to_string()).collect(),
        pending_original_destinations: maps.orig_len(),
        counters: maps.counters().ok().map(Into::into),
    })
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
        out += &format!("link {l:<12} {}\n", if *alive { "attached" } else { "MISSING" });
    }
    if let Some(p) = s.proxy_port {
        out += &format!("proxy port:  {p}\n");
    }
    out += &format!("enabled cgroups ({}):\n", s.enabled_cgroups.len());
    for c in &s.enabled_cgroups {
        let path = c.path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(path not found under cgroup root)".into());
        out += &format!("  {:>10}  {path}\n", c.id);
    }
    out += &format!("skip ranges: {}\n", if s.skip_ranges.is_empty() { "(none)".into() } else { s.skip_ranges.join(", ") });
    out += &format!("awaiting accept: {}\n", s.pending_original_destinations);
    if let Some(c) = &s.counters {
        out += &format!(
            "counters:    redirected4={} redirected6={} established={} skip_cidr={} skip_loopback={} skip_not_tcp={} skip_self={} skip_disabled={} errors={}\n",
            c.redirected4, c.redirected6, c.established, c.skip_cidr, c.skip_loopback, c.skip_not_tcp, c.skip_self, c.skip_disabled, c.errors
        );
    }
    out
}
