//! The wiring diagram of `redirector run`: one comment per step.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use prometheus_client::registry::Registry;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    admin::{self, Admin, Readiness},
    bpf::{self, Origin, PinLayout},
    cli::RunArgs,
    config::{Config, ConfigError},
    k8s,
    netns::{self, NetnsId},
    preflight,
    proxy::{self, ListenerSet, Shared},
    telemetry::Metrics,
    workloads::{DesiredSet, Workload},
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Preflight(#[from] preflight::PreflightError),
    #[error("cannot bind the admin endpoint")]
    Admin(#[source] std::io::Error),
    #[error(transparent)]
    Bpf(#[from] bpf::BpfError),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("--kubernetes needs NODE_NAME (set it from the downward API: spec.nodeName)")]
    NodeName,
    #[error("cannot reach the Kubernetes API")]
    Kube(#[source] k8s::K8sError),
}

pub async fn run(config: Config, args: RunArgs) -> Result<(), RunError> {
    // 1. Refuse bad input before touching the kernel.
    preflight::check_run(&config.pin_root, &config.cgroup_root, &config.cgroups)?;
    let node_name = if config.kubernetes {
        Some(
            std::env::var("NODE_NAME")
                .ok()
                .filter(|n| !n.is_empty())
                .ok_or(RunError::NodeName)?,
        )
    } else {
        None
    };
    let admin_listener = admin::bind(config.admin_addr)
        .await
        .map_err(RunError::Admin)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(RunError::Signals)?;
    info!(config = %serde_json::to_string(&config).unwrap_or_default(), "starting");

    // 2. Load or adopt the programs and maps under the pin root.
    let pins = PinLayout::new(&config.pin_root);
    let (mut maps, origin, program_logger) = bpf::load_and_attach(&pins, &config.cgroup_root)?;
    if let Some(logger) = program_logger {
        tokio::spawn(forward_program_logs(logger));
    }
    match origin {
        Origin::Attached => {
            info!(pin_root = %pins.root.display(), cgroup_root = %config.cgroup_root.display(), "attached eBPF programs")
        }
        Origin::Adopted => {
            info!(pin_root = %pins.root.display(), "adopted pinned eBPF programs from an earlier run")
        }
    }
    release_freed_heap();

    // 3. Skip ranges first, then our port and pid: only now may the hooks redirect.
    maps.set_skip_ranges(&config.skip_cidrs())?;
    maps.set_config(config.proxy_port, std::process::id())?;

    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let shutdown = CancellationToken::new();
    let pool = crate::pool::GatewayPool::start(
        config.tunnel.clone(),
        config.pool,
        Arc::clone(&metrics),
        &shutdown,
    );
    let shared = Arc::new(Shared {
        config: arc_swap::ArcSwap::from_pointee(config.clone()),
        node_addrs: arc_swap::ArcSwap::from_pointee(node_addresses()),
        maps: Mutex::new(maps),
        metrics: Arc::clone(&metrics),
        shutdown,
        tracker: TaskTracker::new(),
        workloads: Mutex::new(Vec::new()),
        conns: Mutex::new(HashMap::new()),
        next_conn: std::sync::atomic::AtomicU64::new(0),
        gateway: arc_swap::ArcSwapOption::from(Some(pool)),
    });
    let readiness = Arc::new(Readiness::default());
    readiness.hooks_attached.store(
        bpf::link_alive(&pins, redirector_common::names::LINK_CONNECT4),
        Ordering::Relaxed,
    );
    readiness.config_loaded.store(true, Ordering::Relaxed);

    // 4. Admin endpoint.
    let admin = Arc::new(Admin {
        shared: Arc::clone(&shared),
        registry,
        readiness: Arc::clone(&readiness),
    });
    tokio::spawn(admin::serve(admin_listener, admin, shared.shutdown.clone()));

    // 5. The desired set of workloads: fixed (--cgroup) or followed from the API server.
    let (tx, rx) = watch::channel(DesiredSet::new());
    let initial_known = match &node_name {
        None => {
            let set = config
                .cgroups
                .iter()
                .map(|p| {
                    let key = p.display().to_string();
                    (
                        key.clone(),
                        Workload {
                            key: key.clone(),
                            label: key,
                            cgroup_candidates: vec![p.clone()],
                            pod: None,
                        },
                    )
                })
                .collect();
            tx.send_replace(set);
            true
        }
        Some(node) => {
            let client = k8s::client(config.kubeconfig.as_deref())
                .await
                .map_err(RunError::Kube)?;
            let (node, root) = (node.clone(), config.cgroup_root.clone());
            let rejected = shared.metrics.k8s_rejected.clone();
            info!(node = %node, "following pods of labeled namespaces on this node");
            tokio::spawn(async move {
                if let Err(e) = k8s::run(client, node, root, rejected, tx).await {
                    error!(error = %crate::error_chain(&e), "kubernetes watcher stopped");
                }
            });
            false
        }
    };

    // 6. Enablement: listeners in each workload's netns, then its cgroup id into the map.
    let reconciler = tokio::spawn(reconcile(
        Arc::clone(&shared),
        Arc::clone(&readiness),
        rx,
        initial_known,
    ));

    // 7. Reload on SIGHUP and when the config file changes; run until SIGTERM/SIGINT.
    let mut last_stamp = args.config.as_ref().map(|p| file_stamp(p));
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM received, draining"); break; }
            _ = sigint.recv() => { info!("SIGINT received, draining"); break; }
            _ = sighup.recv() => reload(&shared, &args, "SIGHUP"),
            _ = poll.tick() => {
                if let Some(p) = &args.config {
                    let now = file_stamp(p);
                    if last_stamp.as_ref() != Some(&now) {
                        last_stamp = Some(now);
                        reload(&shared, &args, "config file changed");
                    }
                }
            }
        }
    }
    shared.shutdown.cancel();
    let _ = reconciler.await;
    shared.tracker.close();
    let drain = shared.config.load().drain_timeout + Duration::from_millis(500);
    if tokio::time::timeout(drain, shared.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open = shared.tracker.len(),
            "drain timeout: closing remaining connections"
        );
    }
    // Programs stay attached and pinned on purpose: until a daemon comes back, redirected
    // connects fail fast (nobody listens on the proxy port) and nothing leaks direct.
    info!("stopped; eBPF programs stay pinned (`redirector uninstall` removes them)");
    Ok(())
}

/// Forwards the eBPF programs' aya-log records (debug level) into the daemon's log.
async fn forward_program_logs(logger: bpf::ProgramLogger) {
    // SAFETY: the logger owns its ring buffer's fd for its whole life and always returns the
    // same fd from as_raw_fd; the AsyncFd owns the logger.
    let Ok(mut fd) = (unsafe { tokio::io::unix::AsyncFd::register(logger) }) else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Content fingerprint of the config file (ConfigMap mounts swap symlinks, so mtime alone
/// is not trustworthy; the content is small).
fn file_stamp(p: &std::path::Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(p).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

/// Loading parses the kernel's BTF (several MiB, freed once the programs are loaded); glibc
/// keeps freed heap mapped unless asked, which would count against the idle daemon's RSS for
/// its whole life. A no-op for other allocators (glibc's heap is then unused).
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory at the top of glibc's heaps to the OS.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Re-reads the configuration; a bad one is rejected and the running one stays in force.
fn reload(shared: &Shared, args: &RunArgs, why: &str) {
    let old = shared.config.load_full();
    let mut new = match args.load() {
        Ok(c) => c,
        Err(e) => {
            shared
                .metrics
                .reloads
                .get_or_create(&crate::telemetry::ResultLabels { result: "rejected" })
                .inc();
            error!(reason = why, error = %crate::error_chain(&e as &ConfigError), "config reload rejected; the previous configuration stays in force");
            return;
        }
    };
    let restart_only = old.restart_only_changes(&new);
    if !restart_only.is_empty() {
        warn!(settings = ?restart_only, "these settings change only on restart; keeping the running values");
        new.pin_root = old.pin_root.clone();
        new.cgroup_root = old.cgroup_root.clone();
        new.cgroups = old.cgroups.clone();
        new.kubernetes = old.kubernetes;
        new.proxy_port = old.proxy_port;
        new.admin_addr = old.admin_addr;
    }
    // Kernel skip ranges: new entries go in before stale ones come out (no gap).
    if let Err(e) = shared
        .maps
        .lock()
        .expect("maps lock poisoned")
        .set_skip_ranges(&new.skip_cidrs())
    {
        shared
            .metrics
            .reloads
            .get_or_create(&crate::telemetry::ResultLabels { result: "rejected" })
            .inc();
        error!(reason = why, error = %crate::error_chain(&e), "config reload failed updating the skip ranges; keeping the previous configuration");
        let _ = shared
            .maps
            .lock()
            .expect("maps lock poisoned")
            .set_skip_ranges(&old.skip_cidrs());
        return;
    }
    shared.node_addrs.store(Arc::new(node_addresses()));
    info!(reason = why, config = %serde_json::to_string(&new).unwrap_or_default(), "configuration reloaded");
    // New tunnels use sessions made with the new settings; old sessions are let go (tunnels
    // running on them are not affected).
    let pool = crate::pool::GatewayPool::start(
        new.tunnel.clone(),
        new.pool,
        Arc::clone(&shared.metrics),
        &shared.shutdown,
    );
    shared.config.store(Arc::new(new));
    if let Some(old) = shared.gateway.swap(Some(pool)) {
        old.retire();
    }
    shared
        .metrics
        .reloads
        .get_or_create(&crate::telemetry::ResultLabels { result: "applied" })
        .inc();
}

/// Addresses of the daemon's network namespace (the node's, in a DaemonSet with
/// hostNetwork; the pod's otherwise).
pub fn node_addresses() -> Vec<IpAddr> {
    let mut v = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(sa) = a.address else { continue };
            if let Some(s) = sa.as_sockaddr_in() {
                v.push(IpAddr::V4(s.ip()));
            } else if let Some(s) = sa.as_sockaddr_in6() {
                v.push(IpAddr::V6(s.ip()));
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

/// Wakes the reconciler as soon as a pending workload's cgroup directory appears or its
/// first process joins (inotify on the parent directories and on `cgroup.events`, whose
/// `populated` line the kernel updates), instead of waiting for the next timer tick: the
/// listener must be in place before the pod's app container makes its first connect.
struct CgroupWatch {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    inotify: nix::sys::inotify::Inotify,
    watched: HashMap<PathBuf, nix::sys::inotify::WatchDescriptor>,
}

impl CgroupWatch {
    fn new() -> Option<CgroupWatch> {
        use nix::sys::inotify::{InitFlags, Inotify};
        use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
        // A second handle on the same inotify fd for readiness; `inotify` reads the events.
        let dup = inotify.as_fd().try_clone_to_owned().ok()?;
        // SAFETY: `dup` is a fresh, owned, open fd.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(dup.into_raw_fd()) };
        // SAFETY: the AsyncFd owns `owned`, an open fd that stays the same for its lifetime.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
        }
        .ok()?;
        Some(CgroupWatch {
            fd,
            inotify,
            watched: HashMap::new(),
        })
    }

    /// Watches exactly `paths` (adding new ones, dropping the rest).
    fn set(&mut self, paths: &HashSet<PathBuf>) {
        use nix::sys::inotify::AddWatchFlags as F;
        self.watched.retain(|p, wd| {
            let keep = paths.contains(p);
            if !keep {
                let _ = self.inotify.rm_watch(*wd);
            }
            keep
        });
        for p in paths {
            if self.watched.contains_key(p) || !p.exists() {
                continue;
            }
            let flags = F::IN_CREATE | F::IN_MODIFY;
            if let Ok(wd) = self.inotify.add_watch(p.as_path(), flags) {
                self.watched.insert(p.clone(), wd);
            }
        }
    }

    async fn changed(&mut self) {
        if let Ok(mut g) = self.fd.readable_mut().await {
            let _ = self.inotify.read_events();
            g.clear_ready();
        }
    }
}

/// What to watch for a workload that is not enabled yet: the nearest existing ancestor of
/// each candidate directory, and `cgroup.events` of a candidate that exists.
fn watch_paths(w: &Workload, out: &mut HashSet<PathBuf>) {
    for c in &w.cgroup_candidates {
        if c.is_dir() {
            out.insert(c.join("cgroup.events"));
            continue;
        }
        let mut p = c.parent();
        while let Some(dir) = p {
            if dir.is_dir() {
                out.insert(dir.to_owned());
                break;
            }
            p = dir.parent();
        }
    }
}

/// Takes `id` out of `rdr_enabled` unless another workload still has it enabled: two pods
/// may resolve to one cgroup, and the one that leaves must not disable the other's.
fn release(maps: &mut bpf::Maps, enabled: &HashMap<String, Enabled>, id: u64) {
    if !enabled.values().any(|e| e.id == id) {
        let _ = maps.disable(id);
    }
}

/// What the reconciler knows about one enabled workload.
struct Enabled {
    cgroup: PathBuf,
    id: u64,
}

/// Turns the desired set into listeners and `rdr_enabled` entries: a workload is enabled
/// once its cgroup exists and every network namespace its processes use has a listener; it
/// is disabled (and its listeners closed when no one else uses them) when it leaves the set.
async fn reconcile(
    shared: Arc<Shared>,
    readiness: Arc<Readiness>,
    mut rx: watch::Receiver<DesiredSet>,
    mut known: bool,
) {
    let mut listeners = ListenerSet::default();
    let mut enabled: HashMap<String, Enabled> = HashMap::new();
    let mut waiting_logged: HashSet<String> = HashSet::new();
    let mut stale_checked = false;
    let mut last_full = Instant::now() - Duration::from_secs(10);
    let mut watch = CgroupWatch::new();
    loop {
        let desired = rx.borrow_and_update().clone();
        // Full passes look for new netns of enabled workloads too; quick passes only handle
        // workloads still waiting for their cgroup or first process.
        let full = last_full.elapsed() >= Duration::from_secs(1);
        if full {
            last_full = Instant::now();
        }
        let mut live: HashMap<NetnsId, u32> = HashMap::new();
        let mut all_ready = known;
        for w in desired.values() {
            let Some(cg) = w.find_cgroup() else {
                // Not created by the kubelet yet: nothing to listen for, not a readiness issue.
                if waiting_logged.insert(w.key.clone()) {
                    info!(workload = %w.label, "waiting for the workload's cgroup to appear");
                }
                continue;
            };
            let Ok(id) = netns::cgroup_id(&cg) else {
                continue;
            };
            let already = enabled.get(&w.key).is_some_and(|e| e.id == id);
            if already && !full {
                continue;
            }
            let mut nss = Vec::new();
            for pid in netns::cgroup_pids(&cg) {
                if let Ok(ns) = netns::netns_of(pid) {
                    live.entry(ns).or_insert(pid);
                    nss.push((ns, pid));
                }
            }
            if nss.is_empty() {
                if !already && waiting_logged.insert(w.key.clone()) {
                    info!(workload = %w.label, cgroup = %cg.display(), "cgroup has no process yet; enabling it once its network namespace is known");
                }
                continue;
            }
            let mut ok = true;
            for (ns, pid) in &nss {
                if listeners.contains(ns) {
                    continue;
                }
                match proxy::spawn_listener(&shared, *pid, Arc::from(w.label.as_str())) {
                    Ok(l) => listeners.insert(l),
                    Err(e) => {
                        ok = false;
                        warn!(workload = %w.label, pid, error = %crate::error_chain(&e), "cannot start listener in the workload's netns");
                    }
                }
            }
            if !ok {
                all_ready = false;
                continue;
            }
            if !already {
                let mut maps = shared.maps.lock().expect("maps lock poisoned");
                if let Some(old) = enabled.remove(&w.key) {
                    release(&mut maps, &enabled, old.id);
                }
                match maps.enable(id) {
                    Ok(()) => {
                        info!(workload = %w.label, cgroup = %cg.display(), cgroup_id = id, "workload enabled");
                        enabled.insert(
                            w.key.clone(),
                            Enabled {
                                cgroup: cg.clone(),
                                id,
                            },
                        );
                        waiting_logged.remove(&w.key);
                    }
                    Err(e) => {
                        all_ready = false;
                        warn!(workload = %w.label, error = %crate::error_chain(&e), "cannot enable cgroup");
                    }
                }
            }
        }
        // Workloads that left the set: out of the map first, then their listeners go.
        let gone: Vec<String> = enabled
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        if !gone.is_empty() {
            let mut maps = shared.maps.lock().expect("maps lock poisoned");
            for k in gone {
                if let Some(e) = enabled.remove(&k) {
                    release(&mut maps, &enabled, e.id);
                    info!(workload = %k, cgroup = %e.cgroup.display(), "workload disabled");
                }
            }
        }
        waiting_logged.retain(|k| desired.contains_key(k));
        if full {
            // Keep listeners of namespaces still used by an enabled workload.
            let mut keep: HashSet<NetnsId> = live.keys().copied().collect();
            for e in enabled.values() {
                for pid in netns::cgroup_pids(&e.cgroup) {
                    if let Ok(ns) = netns::netns_of(pid) {
                        keep.insert(ns);
                    }
                }
            }
            listeners.retain(&keep);
        }
        // Once the desired set is known, forget cgroups an earlier run enabled that are no
        // longer wanted.
        if known && !stale_checked {
            stale_checked = true;
            let wanted: BTreeSet<u64> = enabled.values().map(|e| e.id).collect();
            let mut maps = shared.maps.lock().expect("maps lock poisoned");
            for stale in maps.enabled_ids().difference(&wanted) {
                let still_desired = desired.values().any(|w| {
                    w.cgroup_candidates
                        .iter()
                        .any(|p| netns::cgroup_id(p).ok() == Some(*stale))
                });
                if !still_desired {
                    info!(
                        cgroup_id = stale,
                        "disabling a cgroup left enabled by an earlier run"
                    );
                    let _ = maps.disable(*stale);
                }
            }
        }
        shared.metrics.listeners.set(listeners.len() as i64);
        shared.metrics.enabled_cgroups.set(enabled.len() as i64);
        let views = desired
            .values()
            .map(|w| {
                let e = enabled.get(&w.key);
                admin::api::WorkloadView {
                    key: w.key.clone(),
                    label: w.label.clone(),
                    cgroup: e.map(|e| e.cgroup.display().to_string()),
                    cgroup_id: e.map(|e| e.id),
                    listening: e.is_some(),
                }
            })
            .collect();
        *shared.workloads.lock().expect("workloads lock poisoned") = views;
        readiness
            .listeners_ready
            .store(all_ready, Ordering::Relaxed);
        let mut pending_paths = HashSet::new();
        for w in desired.values().filter(|w| !enabled.contains_key(&w.key)) {
            watch_paths(w, &mut pending_paths);
        }
        if let Some(w) = watch.as_mut() {
            w.set(&pending_paths);
        }
        let inotified = async {
            match watch.as_mut() {
                Some(w) => w.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = inotified => {}
            r = rx.changed() => {
                if r.is_err() {
                    // The watcher is gone; keep the last set and rescan on the timer.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                } else {
                    known = true;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    drop(listeners);
}
