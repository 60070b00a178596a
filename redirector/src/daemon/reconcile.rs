//! The reconciler: each pass observes cgroups, processes and maps, binds the listeners
//! [`decide::plan_listeners`] asks for, makes the changes [`decide::decide`] chose, and waits
//! for the next change of the desired set, of a pending cgroup, or the timer.
mod decide;

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{info, warn};

use self::decide::{
    Action, CgroupSeen, Decision, EarlierRun, Listen, Memory, Notice, Observed, Proc, Stage,
};
use super::cgroup_watch::{CgroupWatch, watch_paths};
use crate::{
    admin::Readiness,
    netns::{self, NetnsId},
    proxy::{self, ListenerSet},
    state::Shared,
    workloads::{DesiredSet, Workload},
};

/// How often a pass is a full one (see [`Observed::full`]).
const FULL_PASS: Duration = Duration::from_secs(1);
/// The longest wait between passes when nothing wakes the reconciler.
const TICK: Duration = Duration::from_millis(100);

/// Runs until shutdown; `known` says whether `rx` already holds the complete desired set.
pub async fn run(
    shared: Arc<Shared>,
    readiness: Arc<Readiness>,
    mut rx: watch::Receiver<DesiredSet>,
    mut known: bool,
) {
    let mut listeners = ListenerSet::default();
    // Namespaces where no listener could be bound: retried on full passes only, and logged
    // once (a pod holding every candidate port must not flood the log).
    let mut failed: HashSet<NetnsId> = HashSet::new();
    let mut memory = Memory::default();
    let mut last_full = Instant::now() - Duration::from_secs(10);
    let mut watch = CgroupWatch::new().ok();
    loop {
        // A value the watcher sent is the complete desired set. Read from the value, not
        // from `changed()`: a set sent before this first borrow is marked seen by it, and
        // `changed()` would then never fire for it (a daemon with nothing to change would
        // stay unready and keep an earlier run's stale entries).
        let desired = {
            let r = rx.borrow_and_update();
            known |= r.has_changed();
            r.clone()
        };
        let full = last_full.elapsed() >= FULL_PASS;
        if full {
            last_full = Instant::now();
        }

        // Observe, bind the missing listeners, decide, act.
        let mut seen = observe(&shared, &desired, &memory, &listeners, full, known);
        for listen in decide::plan_listeners(&desired, &seen) {
            if !full && failed.contains(&listen.netns) {
                continue;
            }
            if let Some((netns, port)) = bind(&shared, &mut listeners, &mut failed, listen) {
                seen.listeners.insert(netns, port);
            }
        }
        failed.retain(|ns| !listeners.contains(ns));
        let (next, ready) = apply(
            &shared,
            &mut listeners,
            decide::decide(&desired, &seen, &memory),
        );
        memory = next;

        // Publish: metrics, `/workloads`, readiness.
        shared.metrics.listeners.set(listeners.len() as i64);
        shared
            .metrics
            .enabled_cgroups
            .set(memory.enabled.len() as i64);
        shared.metrics.refusing_workloads.set(
            memory
                .enabled
                .values()
                .filter(|e| matches!(e.stage, Stage::NoListener | Stage::PortsDiffer))
                .count() as i64,
        );
        *shared.workloads() = decide::views(&desired, &memory);
        readiness.listeners_ready.store(ready, Ordering::Relaxed);
        if full {
            check_hooks(&shared, &readiness);
        }

        // Wait: a new desired set, a pending cgroup changing, or the timer.
        if let Some(w) = watch.as_mut() {
            let mut pending = HashSet::new();
            for w in desired.values().filter(|w| !decide::settled(&memory, w)) {
                watch_paths(w, &mut pending);
            }
            w.set(&pending);
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
                    tokio::time::sleep(TICK).await;
                } else {
                    known = true;
                }
            }
            _ = tokio::time::sleep(TICK) => {}
        }
    }
    drop(listeners);
}

/// Whether every link of ours is still attached (its pin opens): a link pin removed by hand or
/// by `redirector uninstall` detaches that program, and from then on its connects are not
/// redirected. Readiness follows, and each change is logged once.
fn check_hooks(shared: &Shared, readiness: &Readiness) {
    let pins = crate::bpf::PinLayout::new(&shared.config.load().pin_root);
    let missing: Vec<&str> = redirector_common::names::LINKS
        .iter()
        .copied()
        .filter(|l| !crate::bpf::link_alive(&pins, l))
        .collect();
    let attached = missing.is_empty();
    if readiness.hooks_attached.swap(attached, Ordering::Relaxed) != attached {
        if attached {
            info!("eBPF hooks attached again");
        } else {
            tracing::error!(links = ?missing, "eBPF hooks detached: connects of enabled pods are no longer redirected; not ready");
        }
    }
}

/// Reads what [`decide::decide`] needs: each desired workload's cgroup (found only through
/// [`Workload::find_cgroup`]) and processes, the namespaces of enabled cgroups on full
/// passes, and `rdr_enabled` on the pass that looks for ids an earlier run left.
fn observe(
    shared: &Shared,
    desired: &DesiredSet,
    memory: &Memory,
    listeners: &ListenerSet,
    full: bool,
    known: bool,
) -> Observed {
    let cgroups = desired
        .values()
        .map(|w| (w.key.clone(), observe_cgroup(w, memory, full)))
        .collect();
    let enabled_netns = if full {
        memory
            .enabled
            .iter()
            .filter(|(key, e)| desired.contains_key(*key) && e.stage != Stage::Audit)
            .map(|(_, e)| {
                (
                    e.cgroup.clone(),
                    processes(&e.cgroup).iter().map(|p| p.netns).collect(),
                )
            })
            .collect()
    } else {
        BTreeMap::new()
    };
    let entries = full.then(|| shared.maps().enabled_entries());
    let earlier = decide::wants_earlier_run(memory, known).then(|| EarlierRun {
        map_ids: shared.maps().enabled_ids(),
        // An audited workload the attached programs cannot audit is not wanted in the map:
        // an entry an earlier run left for it goes.
        candidate_ids: desired
            .values()
            .filter(|w| shared.audit_supported || !w.audit)
            .flat_map(|w| &w.cgroup_candidates)
            .filter_map(|p| netns::cgroup_id(p).ok())
            .collect(),
    });
    Observed {
        known,
        full,
        cgroups,
        listeners: listeners
            .by_netns
            .iter()
            .map(|(ns, l)| (*ns, l.port))
            .collect(),
        enabled_netns,
        entries,
        earlier,
        audit_unavailable: !shared.audit_supported,
    }
}

fn observe_cgroup(w: &Workload, memory: &Memory, full: bool) -> CgroupSeen {
    let Some(path) = w.find_cgroup() else {
        return CgroupSeen::Missing;
    };
    let Ok(id) = netns::cgroup_id(&path) else {
        return CgroupSeen::Unreadable;
    };
    // An audited workload needs no listener, hence never its processes.
    let procs =
        (!w.audit && decide::wants_scan(memory, &w.key, id, full)).then(|| processes(&path));
    CgroupSeen::Found { path, id, procs }
}

/// The processes of `cgroup` and its descendants with their network namespaces (processes
/// that exited meanwhile are left out).
fn processes(cgroup: &Path) -> Vec<Proc> {
    netns::cgroup_pids(cgroup)
        .into_iter()
        .filter_map(|pid| netns::netns_of(pid).ok().map(|netns| Proc { pid, netns }))
        .collect()
}

/// Binds one listener, trying each way in until one works; returns its namespace and port.
/// A namespace that fails is remembered in `failed`, counted, and logged the first time.
fn bind(
    shared: &Arc<Shared>,
    listeners: &mut ListenerSet,
    failed: &mut HashSet<NetnsId>,
    listen: Listen,
) -> Option<(NetnsId, u16)> {
    let mut last = None;
    for a in listen.attempts {
        match proxy::spawn_listener(shared, a.pid, Arc::from(a.workload.as_str())) {
            Ok(l) => {
                let found = (l.netns, l.port);
                listeners.insert(l);
                return Some(found);
            }
            Err(e) => last = Some((a, e)),
        }
    }
    if let Some((a, e)) = last {
        shared.metrics.listener_failures.inc();
        if failed.insert(listen.netns) {
            warn!(workload = %a.workload, pid = a.pid, error = %crate::error_chain(&e), "cannot start listener in the workload's netns; its connections are refused until one can be bound");
        }
    }
    None
}

/// Makes the decided changes in order and logs them; returns what to remember and whether
/// the pass left the daemon ready.
fn apply(shared: &Shared, listeners: &mut ListenerSet, d: Decision) -> (Memory, bool) {
    let Decision {
        actions,
        notices,
        mut memory,
        mut ready,
    } = d;
    for n in notices {
        match n {
            Notice::WaitingForCgroup { label } => {
                info!(workload = %label, "waiting for the workload's cgroup to appear");
            }
            Notice::WaitingForProcess { label, cgroup } => {
                info!(workload = %label, cgroup = %cgroup.display(), "cgroup has no process yet; its connections are refused until its network namespace has a listener");
            }
            Notice::AuditUnavailable { label } => {
                warn!(workload = %label, "audit requested, but the attached eBPF programs predate audit mode (they would refuse its connects): left alone, its connects go direct and are not counted, until the programs are replaced");
            }
            Notice::Refused { label, stage } => {
                let why = match stage {
                    Stage::PortsDiffer => {
                        "its network namespaces' listeners are on different ports"
                    }
                    _ => "no listener could be bound in its network namespace",
                };
                warn!(workload = %label, reason = why, "refusing the workload's connections (fail closed)");
            }
        }
    }
    let mut close = HashSet::new();
    for action in actions {
        match action {
            Action::Enable {
                key,
                label,
                cgroup,
                id,
                stage,
            } => match shared.maps().enable(id, stage.mode()) {
                Ok(()) => match stage {
                    Stage::Redirect { port } => {
                        info!(workload = %label, cgroup = %cgroup.display(), cgroup_id = id, port, "workload enabled");
                    }
                    Stage::Audit => {
                        info!(workload = %label, cgroup = %cgroup.display(), cgroup_id = id, "workload audited: its connects are counted, not redirected");
                    }
                    _ => {
                        info!(workload = %label, cgroup = %cgroup.display(), cgroup_id = id, "workload's connections refused until its listener is bound");
                    }
                },
                Err(e) => {
                    ready = false;
                    memory.enabled.remove(&key);
                    warn!(workload = %label, error = %crate::error_chain(&e), "cannot enable cgroup");
                }
            },
            Action::Disable { id } => {
                let _ = shared.maps().disable(id);
            }
            Action::Leave {
                key,
                cgroup,
                disable,
            } => {
                if let Some(id) = disable {
                    let _ = shared.maps().disable(id);
                }
                info!(workload = %key, cgroup = %cgroup.display(), "workload disabled");
            }
            Action::DisableStale { id } => {
                info!(
                    cgroup_id = id,
                    "disabling a cgroup left enabled by an earlier run"
                );
                let _ = shared.maps().disable(id);
            }
            Action::Close { netns } => {
                close.insert(netns);
            }
        }
    }
    if !close.is_empty() {
        let keep = listeners
            .by_netns
            .keys()
            .filter(|ns| !close.contains(*ns))
            .copied()
            .collect();
        listeners.retain(&keep);
    }
    (memory, ready)
}
