//! The daemon's shared state: what every listener, connection task, the reconciler and the
//! admin endpoint read (configuration snapshot, maps, metrics, registries, shutdown).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::Notify;

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
    pub cni: CniState,
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

/// A pod's network namespace as the runtime handed it over, until a process is in it.
#[derive(Clone, Debug)]
pub struct Hint {
    pub netns: crate::netns::NetnsFile,
}

/// What the CNI plugin's requests (`cni.rs`) share with the reconciler: the namespaces the
/// runtime handed over, and the signals between the two.
#[derive(Default)]
pub struct CniState {
    hints: Mutex<HashMap<String, Hint>>,
    wake: Notify,
    passes: tokio::sync::watch::Sender<u64>,
}

impl CniState {
    /// Hints by workload key (pod UID).
    pub fn hints(&self) -> HashMap<String, Hint> {
        self.hints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
    pub fn set_hint(&self, uid: &str, hint: Option<Hint>) {
        let mut h = self.hints.lock().unwrap_or_else(PoisonError::into_inner);
        match hint {
            Some(hint) => h.insert(uid.to_owned(), hint),
            None => h.remove(uid),
        };
    }
    /// Forgets the hints of pods that left the desired set (deleted, unlabeled).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.hints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| keep(k));
    }
    /// Resolves when a CNI request wants a reconcile pass now.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
    /// The reconciler finished a pass (its views are published).
    pub fn pass_done(&self) {
        self.passes.send_modify(|n| *n = n.wrapping_add(1));
    }
    /// Asks the reconciler for a pass now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
    /// Passes done so far, to wait for the next one.
    pub fn passes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.passes.subscribe()
    }
}
