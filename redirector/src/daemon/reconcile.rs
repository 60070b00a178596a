//! The reconciler: each pass observes cgroups, processes and maps, binds the listeners
//! [`decide::plan_listeners`] asks for, makes the changes [`decide::decide`] chose, and waits
//! for the next change of the desired set, of a pending cgroup, or the timer.
mod decide;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
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
    // Whether each failure is the pod's own doing (it holds every candidate port): such a pod
    // is refused and counted but does not hold the node's readiness hostage; any other
    // failure (the namespace cannot be entered, a bind error) keeps the daemon unready.
    let mut failed: HashMap<NetnsId, bool> = HashMap::new();
    let mut memory = Memory::default();
    let mut last_full = Instant::now() - Duration::from_secs(10);
    let mut watch = CgroupWatch::new().ok();
    let mut owner = Owner::default();
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
        shared.cni.retain(|k| desired.contains_key(k));
        let full = last_full.elapsed() >= FULL_PASS;
        if full {
            last_full = Instant::now();
        }

        // Observe, bind the missing listeners, decide, act.
        let mut seen = observe(&shared, &desired, &memory, &listeners, full, known);
        let planned = decide::plan_listeners(&desired, &seen);
        if full {
            // Namespaces that are gone (or got a listener elsewhere) fail no more.
            let wanted: HashSet<NetnsId> = planned.iter().map(|l| l.netns).collect();
            failed.retain(|ns, _| wanted.contains(ns));
        }
        for listen in planned {
            if !full && failed.contains_key(&listen.netns) {
                continue;
            }
            if let Some((netns, port)) = bind(&shared, &mut listeners, &mut failed, listen) {
                seen.listeners.insert(netns, port);
            }
        }
        failed.retain(|ns, _| !listeners.contains(ns));
        let write = owner.may_write(&shared);
        let (next, ready) = apply(
            &shared,
            &mut listeners,
            decide::decide(&desired, &seen, &memory),
            write,
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
        let pending = failed.values().any(|own_doing| !own_doing);
        readiness
            .listeners_ready
            .store(ready && !pending, Ordering::Relaxed);
        if full {
            check_hooks(&shared, &readiness);
        }
        // CNI requests waiting for their pod look at the views just published.
        shared.cni.pass_done();

        // Wait: a new desired set, a pending cgroup changing, a CNI request, or the timer.
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
            () = shared.cni.woken() => {}
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
    let config = shared.config.load();
    let pins = crate::bpf::PinLayout::new(&config.pin_root);
    // A link whose cgroup was removed and created again runs nowhere: attach it afresh.
    match crate::bpf::repair_defunct_links(&pins, &config.cgroup_root) {
        Ok(links) if !links.is_empty() => {
            info!(links = ?links, cgroup_root = %config.cgroup_root.display(), "defunct eBPF links attached afresh");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "cannot attach defunct eBPF links afresh");
        }
    }
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
    // Namespaces the CNI plugin announced for pods that have no process yet.
    let hints = shared.cni.hints();
    let cgroups = desired
        .values()
        .map(|w| {
            let mut seen = observe_cgroup(w, memory, full);
            if let (
                CgroupSeen::Found {
                    procs: Some(procs), ..
                },
                Some(h),
            ) = (&mut seen, hints.get(&w.key))
                && !procs.iter().any(|p| p.netns == h.netns.id)
            {
                procs.push(Proc {
                    pid: 0,
                    netns: h.netns.id,
                });
            }
            (w.key.clone(), seen)
        })
        .collect();
    let netns_files = hints
        .values()
        .map(|h| (h.netns.id, h.netns.clone()))
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
        netns_files,
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
    failed: &mut HashMap<NetnsId, bool>,
    listen: Listen,
) -> Option<(NetnsId, u16)> {
    let mut last = None;
    for a in listen.attempts {
        match proxy::spawn_listener(shared, &a.at, Arc::from(a.workload.as_str())) {
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
        let own_doing = matches!(e, netns::NetnsError::NoFreePort { .. });
        if failed.insert(listen.netns, own_doing).is_none() {
            warn!(workload = %a.workload, at = ?a.at, error = %crate::error_chain(&e), "cannot start listener in the workload's netns; its connections are refused until one can be bound");
        }
    }
    None
}

/// Which daemon writes `rdr_enabled`: the newest one on the node. A daemon writes its pid
/// into `rdr_config` when it starts; an older daemon that finds another live pid there has
/// been taken over (a rolling update starts the new daemon beside the old one). From then on
/// the old one writes nothing: the new one points every pod at its own listeners, and the two
/// never undo each other's entries. The old one keeps serving the connections it has, and
/// those queued on its listeners, until it is stopped. If the daemon that took over exits
/// first, the old one takes the maps back.
#[derive(Default)]
struct Owner {
    /// The pid of the daemon that took over, while it runs.
    superseded_by: Option<u32>,
}

impl Owner {
    fn may_write(&mut self, shared: &Shared) -> bool {
        let me = std::process::id();
        let owner = match shared.maps().config() {
            Ok(c) => c.proxy_tgid,
            Err(_) => return self.superseded_by.is_none(),
        };
        if owner == me {
            self.superseded_by = None;
            return true;
        }
        if owner != 0 && process_alive(owner) {
            if self.superseded_by != Some(owner) {
                info!(
                    pid = owner,
                    "a newer daemon took over this node's pods: serving open connections until stopped, writing no map entry"
                );
                self.superseded_by = Some(owner);
            }
            return false;
        }
        let port = shared.config.load().proxy_port;
        match shared.maps().set_config(port, me) {
            Ok(()) => {
                warn!(
                    pid = owner,
                    "the daemon that had taken over is gone: managing this node's pods again"
                );
                self.superseded_by = None;
                true
            }
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "cannot take the maps back");
                false
            }
        }
    }
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

fn apply(shared: &Shared, listeners: &mut ListenerSet, d: Decision, write: bool) -> (Memory, bool) {
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
        // Taken over by a newer daemon: nothing goes into the map (see `Owner`).
        if !write && !matches!(action, Action::Close { .. }) {
            continue;
        }
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
