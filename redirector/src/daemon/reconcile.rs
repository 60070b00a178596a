//! The reconciler: turns the desired set into listeners and `rdr_enabled` entries.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{info, warn};

use super::cgroup_watch::{CgroupWatch, watch_paths};
use crate::{
    admin::Readiness,
    bpf,
    netns::{self, NetnsId},
    proxy::{self, ListenerSet, Shared},
    workloads::DesiredSet,
};

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
pub async fn run(
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
    let mut watch = CgroupWatch::new().ok();
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
                proxy::WorkloadView {
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
