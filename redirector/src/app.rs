//! The wiring diagram of `redirector run`: one comment per step.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
};

use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    admin::{self, Admin, Readiness},
    bpf::{self, Origin, PinLayout},
    config::Config,
    netns::{self, NetnsId},
    preflight,
    proxy::{self, ListenerSet, Shared},
    telemetry::Metrics,
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
}

pub async fn run(config: Config) -> Result<(), RunError> {
    // 1. Refuse bad input before touching the kernel.
    preflight::check_run(&config.pin_root, &config.cgroup_root, &config.cgroups)?;
    let admin_listener = admin::bind(config.admin_addr).await.map_err(RunError::Admin)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    info!(config = %serde_json::to_string(&config).unwrap_or_default(), "starting");

    // 2. Load or adopt the programs and maps under the pin root.
    let pins = PinLayout::new(&config.pin_root);
    let (mut maps, origin) = bpf::load_and_attach(&pins, &config.cgroup_root)?;
    match origin {
        Origin::Attached => info!(pin_root = %pins.root.display(), cgroup_root = %config.cgroup_root.display(), "attached eBPF programs"),
        Origin::Adopted => info!(pin_root = %pins.root.display(), "adopted pinned eBPF programs from an earlier run"),
    }

    // 3. Skip ranges first, then our port and pid: only now may the hooks redirect.
    maps.set_skip_ranges(&config.skip_cidrs())?;
    maps.set_config(config.proxy_port, std::process::id())?;

    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let shared = Arc::new(Shared {
        config: Arc::clone(&config),
        maps: Mutex::new(maps),
        metrics: Arc::clone(&metrics),
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
    });
    let readiness = Arc::new(Readiness::default());
    readiness.hooks_attached.store(bpf::link_alive(&pins, redirector_common::names::LINK_CONNECT4), Ordering::Relaxed);
    readiness.config_loaded.store(true, Ordering::Relaxed);

    // 4. Admin endpoint.
    let admin = Arc::new(Admin { shared: Arc::clone(&shared), registry, readiness: Arc::clone(&readiness) });
    tokio::spawn(admin::serve(admin_listener, admin, shared.shutdown.clone()));

    // 5. Enablement: listeners in each cgroup's netns, then the cgroup id into the map.
    let enabler = tokio::spawn(static_enablement(Arc::clone(&shared), Arc::clone(&readiness)));

    // 6. Run until SIGTERM/SIGINT, then drain.
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM received, draining"),
        _ = sigint.recv() => info!("SIGINT received, draining"),
    }
    shared.shutdown.cancel();
    let _ = enabler.await;
    shared.tracker.close();
    let drain = config.drain_timeout + std::time::Duration::from_millis(500);
    if tokio::time::timeout(drain, shared.tracker.wait()).await.is_err() {
        warn!(open = shared.tracker.len(), "drain timeout: closing remaining connections");
    }
    // Programs stay attached and pinned on purpose: until a daemon comes back, redirected
    // connects fail fast (nobody listens on the proxy port) and nothing leaks direct.
    info!("stopped; eBPF programs stay pinned (`redirector uninstall` removes them)");
    Ok(())
}

/// `--cgroup` mode: follow the processes of each configured cgroup, keep one listener per
/// network namespace they use, and enable a cgroup once every netns it uses has a listener.
async fn static_enablement(shared: Arc<Shared>, readiness: Arc<Readiness>) {
    let cgroups: Vec<(PathBuf, u64)> = shared
        .config
        .cgroups
        .iter()
        .filter_map(|p| match netns::cgroup_id(p) {
            Ok(id) => Some((p.clone(), id)),
            Err(e) => {
                warn!(cgroup = %p.display(), error = %e, "cannot read cgroup id");
                None
            }
        })
        .collect();
    let wanted: BTreeSet<u64> = cgroups.iter().map(|(_, id)| *id).collect();
    // Forget cgroups a previous run enabled that are no longer configured.
    {
        let mut maps = shared.maps.lock().expect("maps lock poisoned");
        for stale in maps.enabled_ids().difference(&wanted) {
            info!(cgroup_id = stale, "disabling cgroup left enabled by an earlier run");
            let _ = maps.disable(*stale);
        }
    }
    let mut listeners = ListenerSet::default();
    let mut enabled: HashSet<u64> = HashSet::new();
    let mut waiting_logged: HashSet<u64> = HashSet::new();
    loop {
        let mut live: HashMap<NetnsId, u32> = HashMap::new();
        let mut per_cgroup: Vec<(&PathBuf, u64, Vec<NetnsId>)> = Vec::new();
        for (path, id) in &cgroups {
            let mut nss = Vec::new();
            for pid in netns::cgroup_pids(path) {
                if let Ok(ns) = netns::netns_of(pid) {
                    live.entry(ns).or_insert(pid);
                    nss.push(ns);
                }
            }
            per_cgroup.push((path, *id, nss));
        }
        for (ns, pid) in &live {
            if listeners.contains(ns) {
                continue;
            }
            let workload: Arc<str> = per_cgroup
                .iter()
                .filter(|(_, _, nss)| nss.contains(ns))
                .map(|(p, _, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(",")
                .into();
            match proxy::spawn_listener(&shared, *pid, workload) {
                Ok(l) => listeners.insert(l),
                Err(e) => warn!(pid, error = %crate::error_chain(&e), "cannot start listener in pod netns"),
            }
        }
        listeners.retain(&live.keys().copied().collect());
        let mut all_ready = true;
        for (path, id, nss) in &per_cgroup {
            if nss.is_empty() {
                if waiting_logged.insert(*id) && !enabled.contains(id) {
                    info!(cgroup = %path.display(), "cgroup has no process yet; enabling it once its network namespace is known");
                }
                all_ready &= enabled.contains(id);
                continue;
            }
            if nss.iter().all(|ns| listeners.contains(ns)) {
                if enabled.insert(*id) {
                    match shared.maps.lock().expect("maps lock poisoned").enable(*id) {
                        Ok(()) => info!(cgroup = %path.display(), cgroup_id = id, "cgroup enabled"),
                        Err(e) => {
                            enabled.remove(id);
                            warn!(cgroup = %path.display(), error = %crate::error_chain(&e), "cannot enable cgroup");
                        }
                    }
                }
            } else {
                all_ready = false;
            }
        }
        shared.metrics.listeners.set(listeners.len() as i64);
        readiness.listeners_ready.store(all_ready, Ordering::Relaxed);
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = tokio::time::sleep(shared.config.rescan_interval) => {}
        }
    }
    drop(listeners);
}
