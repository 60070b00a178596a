//! The daemon's shared state: what every listener, connection task, the reconciler and the
//! admin endpoint read (configuration snapshot, maps, metrics, registries, shutdown).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::{ConnView, WorkloadView},
    bpf::Maps,
    config::Config,
    telemetry::Metrics,
    tunnel::pool::GatewayPool,
};

/// State shared by every listener and connection task.
pub struct Shared {
    /// Swapped whole on reload; each connection works with the snapshot it started with.
    pub config: arc_swap::ArcSwap<Config>,
    /// The name checks' resolver (with its TTL cache).
    pub names: crate::names::Resolver,
    /// The node's own addresses (refreshed on reload), for the safety rules.
    pub node_addrs: arc_swap::ArcSwap<Vec<std::net::IpAddr>>,
    pub maps: Mutex<Maps>,
    pub metrics: Arc<Metrics>,
    /// Cancelled on SIGTERM: listeners stop accepting, relays get the drain timeout.
    pub shutdown: CancellationToken,
    /// Every relay task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// What the reconciler has enabled (admin `/workloads`, `redirector status`).
    pub workloads: Mutex<Vec<WorkloadView>>,
    /// Connections being relayed now (admin `/connections`).
    pub conns: Mutex<HashMap<u64, ConnView>>,
    pub next_conn: std::sync::atomic::AtomicU64,
    /// Pre-established gateway sessions for `config.tunnel` (replaced on reload).
    pub gateway: arc_swap::ArcSwapOption<GatewayPool>,
    /// Connections the proxy holds now, node-wide (`max-connections`).
    pub open: Arc<std::sync::atomic::AtomicUsize>,
    /// Connections being sniffed or set up now (`max-pending`).
    pub pending: Arc<std::sync::atomic::AtomicUsize>,
    /// Budget refusals are logged at most once a second, with how many were not.
    pub refusal_log: crate::telemetry::LogLimiter,
    /// What the CNI plugin's requests share with the reconciler.
    pub cni: crate::cni::CniState,
    /// The attached programs know audit mode (see `bpf::audit_supported`).
    pub audit_supported: bool,
}

// The locks below guard plain registries and the map handles, with no invariant a panic
// halfway could break. A task that panicked while holding one must not take every later
// user down with it (an accept loop that panics on a poisoned lock would leave its pod's
// connections unanswered), so a poisoned lock is used as it is.
impl Shared {
    pub fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }
    pub fn conns(&self) -> MutexGuard<'_, HashMap<u64, ConnView>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }
    pub fn workloads(&self) -> MutexGuard<'_, Vec<WorkloadView>> {
        self.workloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
