//! `redirector run`: the wiring diagram of the daemon, one comment per step.
mod audit;
mod cgroup_watch;
mod reconcile;
mod reload;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::node::node_addresses;

use crate::{
    admin::{self, Admin, Readiness},
    bpf::{self, Origin, PinLayout},
    cli::RunArgs,
    config::Config,
    k8s, preflight,
    state::Shared,
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
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("--kubernetes needs NODE_NAME (set it from the downward API: spec.nodeName)")]
    NodeName,
    #[error("cannot reach the Kubernetes API")]
    Kube(#[source] k8s::K8sError),
}

/// Every relayed connection holds two descriptors (pod side and upstream), gateway sessions
/// more: the soft limit goes up to the hard one at start, so the connection budgets decide
/// when to refuse, not EMFILE.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => warn!(error = %e, soft, hard, "cannot raise the open-file limit"),
        },
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open-file limit"),
    }
}

pub async fn run(config: Config, args: RunArgs) -> Result<(), RunError> {
    // 1. Preflight: refuse bad input before touching the kernel.
    preflight::check_run(&config.pin_root, &config.cgroup_root, &config.cgroups)?;
    // The kernel by what it can do (small probe programs, not its version number); this
    // also raises RLIMIT_MEMLOCK where the kernel charges BPF memory to it (before 5.11).
    let (features, probe_object) = crate::kernel::probe()?;
    crate::kernel::require(&features)?;
    info!(
        release = %features.release,
        so_netns_cookie = features.netns_cookie_sockopt,
        memlock_charged = features.memlock_charged,
        "kernel has every feature the redirector needs"
    );
    raise_open_file_limit();
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
    let signals = reload::Signals::install().map_err(RunError::Signals)?;
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
        Origin::Upgraded => {
            info!(pin_root = %pins.root.display(), cgroup_root = %config.cgroup_root.display(), "replaced the pinned eBPF programs in place with this release's")
        }
    }
    // Without SO_NETNS_COOKIE (before 5.14) each pod namespace's cookie comes from the
    // netns probe, attached for the daemon's lifetime.
    if !features.netns_cookie_sockopt
        && let Some(object) = probe_object
    {
        crate::kernel::start_netns_probe(object, &config.cgroup_root)?;
    }
    release_freed_heap();
    let audit_supported = bpf::audit_supported(&pins);
    if !audit_supported {
        warn!(
            "the attached eBPF programs predate audit mode: audited workloads are left alone (direct, not counted) until the programs are replaced"
        );
    }

    // 3. Maps: skip ranges first, then our port and pid; only now may the hooks redirect.
    maps.set_skip_ranges(&config.skip_cidrs())?;
    maps.set_config(config.proxy_port, std::process::id())?;

    let metrics = Arc::new(Metrics::default());
    // What the runtime has, not what was asked for: the two differ only by a bug.
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    info!(workers, from = config.worker_threads().1, "async runtime");
    metrics.runtime_workers.set(workers as i64);
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let shutdown = CancellationToken::new();
    let pool = crate::tunnel::pool::GatewayPool::start(
        config.tunnel.clone(),
        config.pool,
        Arc::clone(&metrics),
        &shutdown,
    );
    let shared = Arc::new(Shared {
        config: arc_swap::ArcSwap::from_pointee(config.clone()),
        node_addrs: arc_swap::ArcSwap::from_pointee(node_addresses(&config.node_netns)),
        names: crate::names::Resolver::from_system(),
        maps: Mutex::new(maps),
        metrics: Arc::clone(&metrics),
        shutdown,
        tracker: TaskTracker::new(),
        workloads: Mutex::new(Vec::new()),
        conns: Mutex::new(HashMap::new()),
        next_conn: std::sync::atomic::AtomicU64::new(0),
        gateway: arc_swap::ArcSwapOption::from(Some(pool)),
        open: Arc::default(),
        pending: Arc::default(),
        refusal_log: crate::telemetry::LogLimiter::default(),
        cni: crate::state::CniState::default(),
        audit_supported,
    });
    let readiness = Arc::new(Readiness::default());
    readiness.hooks_attached.store(
        redirector_common::names::LINKS
            .iter()
            .all(|l| bpf::link_alive(&pins, l)),
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

    // 5. The desired set of workloads: fixed (`--cgroup`, known at once) or followed from
    //    the API server (known once the watcher sends its first set).
    let (tx, rx) = watch::channel(DesiredSet::new());
    let static_tx = match &node_name {
        None => {
            tx.send_replace(static_desired_set(&config.cgroups, config.audit));
            Some(tx)
        }
        Some(node) => {
            let client = k8s::client(config.kubeconfig.as_deref())
                .await
                .map_err(RunError::Kube)?;
            let (node, root) = (node.clone(), config.cgroup_root.clone());
            let rejected = shared.metrics.k8s_rejected.clone();
            info!(node = %node, "following pods of labeled namespaces on this node");
            let (view_tx, view_rx) = watch::channel(k8s::PodsView::default());
            if let Some(socket) = config.cni_socket.clone() {
                let (shared, desired) = (Arc::clone(&shared), tx.subscribe());
                tokio::spawn(async move {
                    if let Err(e) = crate::cni::serve(shared, socket, desired, view_rx).await {
                        error!(error = %e, "CNI plugin socket stopped: new pods cannot start on this node");
                    }
                });
            }
            tokio::spawn(async move {
                if let Err(e) = k8s::run(client, node, root, rejected, tx, view_tx).await {
                    error!(error = %crate::error_chain(&e), "kubernetes watcher stopped");
                }
            });
            None
        }
    };
    let initial_known = static_tx.is_some();

    // 6. Reconcile: listeners in each workload's netns, then its cgroup id into the map.
    let reconciler = tokio::spawn(reconcile::run(
        Arc::clone(&shared),
        Arc::clone(&readiness),
        rx,
        initial_known,
    ));

    // 7. Audit: read the counts of audited workloads every audit interval (metrics, one
    //    summary line per active workload, freeing idle entries).
    match bpf::AuditMaps::open(&pins) {
        Ok(maps) => {
            tokio::spawn(audit::run(Arc::clone(&shared), maps));
        }
        Err(e) => {
            warn!(error = %crate::error_chain(&e), "audit maps unavailable: audit counts are not reported")
        }
    }

    // 8. Reload on SIGHUP and when the config file changes, until SIGTERM/SIGINT. In static
    //    mode a reload also re-sends the workloads (`audit` is reloadable).
    let resend = |c: &Config| {
        if let Some(tx) = &static_tx {
            let set = static_desired_set(&c.cgroups, c.audit);
            tx.send_if_modified(|current| {
                let changed = *current != set;
                if changed {
                    info!(audit = c.audit, "static workloads' mode changed");
                    *current = set;
                }
                changed
            });
        }
    };
    reload::until_stopped(&shared, &args, signals, &resend).await;

    // 9. Drain: stop accepting, give open connections the drain timeout.
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
    // Gateway sessions end in order (close_notify), not cut by the exit.
    if let Some(pool) = shared.gateway.load_full() {
        pool.close().await;
    }
    // Programs stay attached and pinned on purpose: until a daemon comes back, redirected
    // connects fail fast (nobody listens on the proxy port) and nothing leaks direct.
    info!("stopped; eBPF programs stay pinned (`redirector uninstall` removes them)");
    Ok(())
}

/// The workloads of static mode: one per `--cgroup` path, keyed and labelled by the path, all
/// audited or all enforced.
fn static_desired_set(cgroups: &[PathBuf], audit: bool) -> DesiredSet {
    cgroups
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
                    audit,
                },
            )
        })
        .collect()
}

/// Forwards the eBPF programs' aya-log records (debug level) into the daemon's log.
async fn forward_program_logs(logger: bpf::ProgramLogger) {
    // SAFETY: `register` requires the fd to stay open and the same while registered: the
    // logger owns its ring buffer's fd for its whole life and always returns that fd from
    // as_raw_fd, and the AsyncFd owns the logger, so the fd outlives the registration.
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

/// Loading parses the kernel's BTF (several MiB, freed once the programs are loaded); glibc
/// keeps freed heap mapped unless asked, which would count against the idle daemon's RSS for
/// its whole life. A no-op for other allocators (glibc's heap is then unused).
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes an integer and only hands free pages of glibc's heaps back
    // to the OS; it is thread-safe (it takes each arena's lock) and frees nothing in use.
    unsafe {
        libc::malloc_trim(0);
    }
}
