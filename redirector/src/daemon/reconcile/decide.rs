//! The reconciler's decisions, free of side effects: from the desired set and what one pass
//! observed to the listeners to bind, the `rdr_enabled` changes and the resulting view.
//!
//! The rules: a workload's cgroup goes into `rdr_enabled` as soon as it exists, first as
//! "refuse" (its connects fail with EPERM, never go direct), and becomes "redirect to port P"
//! once every network namespace its processes use has a listener, all on port P. If a
//! listener cannot be bound (every candidate port is taken by the pod), the workload stays
//! refused: fail closed, for that pod only. It is disabled when it leaves the desired set,
//! and its listeners close once no workload uses their namespace. An id is taken out of
//! `rdr_enabled` only when no workload holds it any more: two pods may resolve to one cgroup.
//!
//! An audited workload goes into `rdr_enabled` as "audit" as soon as its cgroup exists: no
//! listener, no process needed, never refused. Switching it to enforce is a change of stage
//! like any other (it is refused until its listener is bound, then redirected); switching
//! back closes its listeners on the next full pass. When the attached programs predate audit
//! mode (they would read "audit" as "refuse"), an audited workload is kept out of the map.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use crate::{
    api::WorkloadView, bpf::CgroupMode, netns::NetnsId, proxy::ListenAt, workloads::DesiredSet,
};

/// What the reconciler remembers from one pass to the next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Workloads this daemon put into `rdr_enabled`, by key.
    pub enabled: BTreeMap<String, Enabled>,
    /// Workloads whose "waiting" or "refused" line was logged (once, until they redirect or
    /// leave).
    pub waiting_logged: BTreeSet<String>,
    /// Whether ids an earlier run left in `rdr_enabled` were looked for (done once, as soon
    /// as the desired set is known).
    pub stale_checked: bool,
}

/// One enabled workload: the cgroup it was enabled with, that cgroup's id, and its stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enabled {
    pub cgroup: PathBuf,
    pub id: u64,
    pub stage: Stage,
}

/// Where an enabled workload is; `WaitingForProcess`, `NoListener` and `PortsDiffer` are
/// refused in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Audit mode: its connects go on unchanged and are counted; no listener.
    Audit,
    /// Its cgroup has no process yet, so its network namespace is unknown.
    WaitingForProcess,
    /// A namespace its processes use has no listener: none could be bound.
    NoListener,
    /// Its namespaces' listeners are on different ports; one entry cannot point at both.
    PortsDiffer,
    /// Redirected to the listeners on `port`.
    Redirect { port: u16 },
}

impl Stage {
    pub fn mode(self) -> CgroupMode {
        match self {
            Stage::Redirect { port } => CgroupMode::Redirect { port },
            Stage::Audit => CgroupMode::Audit,
            _ => CgroupMode::Refuse,
        }
    }
}

/// What one pass saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The desired set is complete: the static list, or the watcher has sent its first set.
    /// Until then the daemon is not ready and nothing left by an earlier run is disabled.
    pub known: bool,
    /// A full pass (once a second) also looks at the namespaces of enabled workloads and
    /// closes unused listeners; quick passes only handle workloads not enabled yet.
    pub full: bool,
    /// Each desired workload's cgroup, by key.
    pub cgroups: BTreeMap<String, CgroupSeen>,
    /// Network namespaces that have a listener, with its port (after this pass bound the
    /// missing ones).
    pub listeners: BTreeMap<NetnsId, u16>,
    /// Full passes: the namespaces in use in each enabled workload's cgroup, by cgroup path.
    pub enabled_netns: BTreeMap<PathBuf, BTreeSet<NetnsId>>,
    /// Full passes: what `rdr_enabled` holds. An entry that differs from what this daemon
    /// wrote (another daemon during an upgrade pointed it at its own listener, or someone
    /// removed it) is written again.
    pub entries: Option<BTreeMap<u64, CgroupMode>>,
    /// Read on the pass that looks for ids left enabled by an earlier run (see
    /// [`wants_earlier_run`]).
    pub earlier: Option<EarlierRun>,
    /// Namespaces the container runtime handed over through the CNI plugin (a pod's
    /// namespace before its first process), by namespace. Such a namespace is listed among
    /// its workload's processes as a [`Proc`] with pid 0.
    pub netns_files: BTreeMap<NetnsId, crate::netns::NetnsFile>,
    /// The attached programs predate audit mode: audited workloads stay out of the map.
    pub audit_unavailable: bool,
}

/// A desired workload's cgroup as one pass found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupSeen {
    /// No candidate directory exists (for a pod: none inside its own kubepods directory):
    /// not created yet. Waiting for it is not a readiness failure.
    Missing,
    /// Found, but its id could not be read (removed meanwhile): looked at again next pass.
    Unreadable,
    Found {
        path: PathBuf,
        id: u64,
        /// Its processes with their network namespaces; `None` when this pass did not look
        /// (see [`wants_scan`]).
        procs: Option<Vec<Proc>>,
    },
}

/// A process of a workload's cgroup (or a descendant) and the namespace it is in. Pid 0: no
/// process yet, the namespace the CNI plugin announced (see [`Observed::netns_files`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub netns: NetnsId,
}

/// What `rdr_enabled` and the desired workloads' cgroups hold, for the one-time look for ids
/// an earlier run of the daemon left enabled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EarlierRun {
    /// Ids in `rdr_enabled` when the pass began.
    pub map_ids: BTreeSet<u64>,
    /// Ids of every existing candidate directory of every desired workload.
    pub candidate_ids: BTreeSet<u64>,
}

/// Bind a listener in `netns`, trying its processes in turn until one works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listen {
    pub netns: NetnsId,
    pub attempts: Vec<Attempt>,
}

/// Enter the namespace `at`; `workload` names the listener in the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub at: ListenAt,
    pub workload: String,
}

/// One change to `rdr_enabled` or the listeners, in the order they are to be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Put the workload's cgroup id into `rdr_enabled`, or change its mode.
    Enable {
        key: String,
        label: String,
        cgroup: PathBuf,
        id: u64,
        stage: Stage,
    },
    /// Take out the id a workload held before its cgroup was recreated (no one else has it).
    Disable { id: u64 },
    /// A workload left the desired set; its id goes out unless another workload holds it.
    Leave {
        key: String,
        cgroup: PathBuf,
        disable: Option<u64>,
    },
    /// Take out an id an earlier run enabled that no desired workload has.
    DisableStale { id: u64 },
    /// Close the listener of a namespace no workload uses any more.
    Close { netns: NetnsId },
}

/// A line to log once per workload while it waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    WaitingForCgroup {
        label: String,
    },
    WaitingForProcess {
        label: String,
        cgroup: PathBuf,
    },
    /// Its connects are refused until a listener can be bound (see [`Stage`]).
    Refused {
        label: String,
        stage: Stage,
    },
    /// Audited, but the attached programs cannot audit: left alone (direct, not counted).
    AuditUnavailable {
        label: String,
    },
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub actions: Vec<Action>,
    pub notices: Vec<Notice>,
    /// What to remember once the actions are made (an `Enable` that fails is forgotten).
    pub memory: Memory,
    /// The desired set is known (an `Enable` that fails makes the pass not ready). A
    /// workload without a listener does not: it is refused, which is its own problem, and
    /// one pod must not hold up the node's readiness.
    pub ready: bool,
}

/// Whether a pass looks at the processes of a workload whose cgroup has `id`: always on a
/// full pass, otherwise only while it is not redirected with that id.
pub fn wants_scan(memory: &Memory, key: &str, id: u64, full: bool) -> bool {
    full || !redirects_with(memory, key, id)
}

/// Is the workload redirected (not refused, not waiting)?
pub fn redirects(memory: &Memory, key: &str) -> bool {
    memory
        .enabled
        .get(key)
        .is_some_and(|e| matches!(e.stage, Stage::Redirect { .. }))
}

/// Is the workload where it is meant to be (redirected, or audited), so that nothing about
/// it needs watching until the next full pass?
pub fn settled(memory: &Memory, w: &crate::workloads::Workload) -> bool {
    match memory.enabled.get(&w.key).map(|e| e.stage) {
        Some(Stage::Audit) => w.audit,
        Some(Stage::Redirect { .. }) => !w.audit,
        _ => false,
    }
}

/// Whether a pass reads [`EarlierRun`]: once, as soon as the desired set is known.
pub fn wants_earlier_run(memory: &Memory, known: bool) -> bool {
    known && !memory.stale_checked
}

fn redirects_with(memory: &Memory, key: &str, id: u64) -> bool {
    redirects(memory, key) && memory.enabled.get(key).is_some_and(|e| e.id == id)
}

/// The listeners to bind: one per namespace that a looked-at workload's processes use and
/// that has none yet, with every process in it as a way in (in desired-set order).
pub fn plan_listeners(desired: &DesiredSet, seen: &Observed) -> Vec<Listen> {
    let mut plan: Vec<Listen> = Vec::new();
    for w in desired.values().filter(|w| !w.audit) {
        let Some(CgroupSeen::Found {
            procs: Some(procs), ..
        }) = seen.cgroups.get(&w.key)
        else {
            continue;
        };
        for p in procs
            .iter()
            .filter(|p| !seen.listeners.contains_key(&p.netns))
        {
            let at = match seen.netns_files.get(&p.netns) {
                Some(file) if p.pid == 0 => ListenAt::File(file.clone()),
                _ => ListenAt::Pid(p.pid),
            };
            let attempt = Attempt {
                at,
                workload: w.label.clone(),
            };
            match plan.iter_mut().find(|l| l.netns == p.netns) {
                Some(l) => l.attempts.push(attempt),
                None => plan.push(Listen {
                    netns: p.netns,
                    attempts: vec![attempt],
                }),
            }
        }
    }
    plan
}

/// Decides one pass: which ids go into and out of `rdr_enabled`, which listeners close, what
/// to log while workloads wait, and whether the daemon is ready. `seen.listeners` is the set
/// after [`plan_listeners`]' listeners were bound: a namespace still without one is a
/// listener that failed.
pub fn decide(desired: &DesiredSet, seen: &Observed, before: &Memory) -> Decision {
    let mut memory = before.clone();
    let mut actions = Vec::new();
    let mut notices = Vec::new();
    let ready = seen.known;
    // Namespaces the looked-at workloads use: their listeners stay.
    let mut in_use: BTreeSet<NetnsId> = BTreeSet::new();

    for w in desired.values() {
        if w.audit && seen.audit_unavailable {
            // Kept out of rdr_enabled (and taken out below if it was in): the attached
            // programs would refuse its connects. Logged once.
            if memory.waiting_logged.insert(w.key.clone()) {
                notices.push(Notice::AuditUnavailable {
                    label: w.label.clone(),
                });
            }
            continue;
        }
        let (path, id, procs) = match seen.cgroups.get(&w.key) {
            Some(CgroupSeen::Found { path, id, procs }) => (path, *id, procs),
            Some(CgroupSeen::Missing) => {
                // Not created by the kubelet yet: nothing to listen for, not a readiness issue.
                if memory.waiting_logged.insert(w.key.clone()) {
                    notices.push(Notice::WaitingForCgroup {
                        label: w.label.clone(),
                    });
                }
                continue;
            }
            Some(CgroupSeen::Unreadable) | None => continue,
        };
        let stage = if w.audit {
            // No listener, no process needed: audited from the moment its cgroup exists.
            Stage::Audit
        } else {
            let Some(procs) = procs else {
                // Redirected with this id and not looked at on a quick pass.
                continue;
            };
            in_use.extend(procs.iter().map(|p| p.netns));
            stage_of(procs, &seen.listeners)
        };
        match stage {
            Stage::Redirect { .. } | Stage::Audit => {
                memory.waiting_logged.remove(&w.key);
            }
            Stage::WaitingForProcess => {
                if memory.waiting_logged.insert(w.key.clone()) {
                    notices.push(Notice::WaitingForProcess {
                        label: w.label.clone(),
                        cgroup: path.clone(),
                    });
                }
            }
            Stage::NoListener | Stage::PortsDiffer => {
                let was = memory.enabled.get(&w.key).map(|e| e.stage);
                if was != Some(stage) {
                    notices.push(Notice::Refused {
                        label: w.label.clone(),
                        stage,
                    });
                }
            }
        }
        let now = Enabled {
            cgroup: path.clone(),
            id,
            stage,
        };
        let before = memory.enabled.insert(w.key.clone(), now);
        let Some(before) = before else {
            actions.push(enable(w, path, id, stage));
            continue;
        };
        if before.id != id {
            // Its cgroup was recreated (new id): the old id goes unless someone holds it.
            if !holds(&memory, before.id) {
                actions.push(Action::Disable { id: before.id });
            }
            actions.push(enable(w, path, id, stage));
        } else if before.stage.mode() != stage.mode()
            || seen
                .entries
                .as_ref()
                .is_some_and(|m| m.get(&id) != Some(&stage.mode()))
        {
            actions.push(enable(w, path, id, stage));
        }
    }

    // Workloads that left the set: out of the map first, then their listeners go.
    let wanted = |k: &String| {
        desired
            .get(k)
            .is_some_and(|w| !(w.audit && seen.audit_unavailable))
    };
    let gone: Vec<String> = memory
        .enabled
        .keys()
        .filter(|k| !wanted(k))
        .cloned()
        .collect();
    for key in gone {
        if let Some(e) = memory.enabled.remove(&key) {
            let disable = (!holds(&memory, e.id)).then_some(e.id);
            actions.push(Action::Leave {
                key,
                cgroup: e.cgroup,
                disable,
            });
        }
    }
    memory.waiting_logged.retain(|k| desired.contains_key(k));

    if seen.full {
        // Keep listeners of namespaces still used by a desired or enabled workload.
        let mut keep = in_use;
        for e in memory.enabled.values().filter(|e| e.stage != Stage::Audit) {
            if let Some(nss) = seen.enabled_netns.get(&e.cgroup) {
                keep.extend(nss);
            }
        }
        for &netns in seen.listeners.keys().filter(|ns| !keep.contains(ns)) {
            actions.push(Action::Close { netns });
        }
    }

    // Once the desired set is known, forget cgroups an earlier run enabled that are no
    // longer wanted.
    if wants_earlier_run(&memory, seen.known)
        && let Some(earlier) = &seen.earlier
    {
        memory.stale_checked = true;
        let wanted: BTreeSet<u64> = memory.enabled.values().map(|e| e.id).collect();
        let disabled_now: BTreeSet<u64> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Disable { id } => Some(*id),
                Action::Leave { disable, .. } => *disable,
                _ => None,
            })
            .collect();
        let stale: Vec<u64> = earlier
            .map_ids
            .iter()
            .filter(|id| !wanted.contains(id) && !disabled_now.contains(id))
            .filter(|id| !earlier.candidate_ids.contains(id))
            .copied()
            .collect();
        actions.extend(stale.into_iter().map(|id| Action::DisableStale { id }));
    }

    Decision {
        actions,
        notices,
        memory,
        ready,
    }
}

/// What a workload with these processes can be, given the listeners.
fn stage_of(procs: &[Proc], listeners: &BTreeMap<NetnsId, u16>) -> Stage {
    let mut ports = BTreeSet::new();
    for p in procs {
        match listeners.get(&p.netns) {
            Some(port) => ports.insert(*port),
            None => return Stage::NoListener,
        };
    }
    let mut ports = ports.into_iter();
    match (ports.next(), ports.next()) {
        (None, _) => Stage::WaitingForProcess,
        (Some(port), None) => Stage::Redirect { port },
        (Some(_), Some(_)) => Stage::PortsDiffer,
    }
}

fn enable(w: &crate::workloads::Workload, path: &std::path::Path, id: u64, stage: Stage) -> Action {
    Action::Enable {
        key: w.key.clone(),
        label: w.label.clone(),
        cgroup: path.to_owned(),
        id,
        stage,
    }
}

/// Does some enabled workload hold `id`?
fn holds(memory: &Memory, id: u64) -> bool {
    memory.enabled.values().any(|e| e.id == id)
}

/// What `/workloads` shows: every desired workload, with its cgroup once enabled.
pub fn views(desired: &DesiredSet, memory: &Memory) -> Vec<WorkloadView> {
    desired
        .values()
        .map(|w| {
            let e = memory.enabled.get(&w.key);
            let stage = e.map(|e| e.stage);
            WorkloadView {
                key: w.key.clone(),
                label: w.label.clone(),
                cgroup: e.map(|e| e.cgroup.display().to_string()),
                cgroup_id: e.map(|e| e.id),
                listening: matches!(stage, Some(Stage::Redirect { .. })),
                state: match stage {
                    Some(Stage::Audit) => "audit",
                    None | Some(Stage::WaitingForProcess) => "waiting",
                    Some(Stage::NoListener | Stage::PortsDiffer) => "refused",
                    Some(Stage::Redirect { .. }) => "redirect",
                }
                .to_owned(),
                port: match stage {
                    Some(Stage::Redirect { port }) => Some(port),
                    _ => None,
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::Workload;

    fn ns(n: u64) -> NetnsId {
        NetnsId { dev: 4, ino: n }
    }

    fn cg(key: &str) -> PathBuf {
        PathBuf::from(format!("/cg/{key}"))
    }

    fn label(key: &str) -> String {
        format!("default/{key}")
    }

    fn desired(keys: &[&str]) -> DesiredSet {
        keys.iter()
            .map(|k| {
                let w = Workload {
                    key: (*k).to_owned(),
                    label: label(k),
                    cgroup_candidates: vec![cg(k)],
                    pod: None,
                    audit: false,
                };
                ((*k).to_owned(), w)
            })
            .collect()
    }

    /// A cgroup found at `/cg/<key>` with `id` and these `(pid, netns)` processes.
    fn found(key: &str, id: u64, procs: &[(u32, u64)]) -> CgroupSeen {
        CgroupSeen::Found {
            path: cg(key),
            id,
            procs: Some(
                procs
                    .iter()
                    .map(|&(pid, n)| Proc { pid, netns: ns(n) })
                    .collect(),
            ),
        }
    }

    /// Enabled with this id and not looked at (a quick pass).
    fn unscanned(key: &str, id: u64) -> CgroupSeen {
        CgroupSeen::Found {
            path: cg(key),
            id,
            procs: None,
        }
    }

    /// The port listeners get in these cases, unless a case says otherwise.
    const PORT: u16 = 15300;

    fn redirect() -> Stage {
        Stage::Redirect { port: PORT }
    }

    fn enable(key: &str, id: u64) -> Action {
        enable_as(key, id, redirect())
    }

    fn enable_as(key: &str, id: u64, stage: Stage) -> Action {
        Action::Enable {
            key: key.into(),
            label: label(key),
            cgroup: cg(key),
            id,
            stage,
        }
    }

    fn refused(key: &str, stage: Stage) -> Notice {
        Notice::Refused {
            label: label(key),
            stage,
        }
    }

    fn leave(key: &str, disable: Option<u64>) -> Action {
        Action::Leave {
            key: key.into(),
            cgroup: cg(key),
            disable,
        }
    }

    /// One row: the world before a pass and what the pass must decide.
    struct Case {
        name: &'static str,
        desired: &'static [&'static str],
        known: bool,
        full: bool,
        cgroups: Vec<(&'static str, CgroupSeen)>,
        listeners: &'static [u64],
        /// Namespaces among `listeners` whose listener is on `PORT + 1`.
        other_port: &'static [u64],
        /// (cgroup key, namespaces in use) of enabled workloads, seen on full passes.
        enabled_netns: &'static [(&'static str, &'static [u64])],
        /// What `rdr_enabled` holds, read on full passes.
        entries: Option<&'static [(u64, CgroupMode)]>,
        /// (ids in rdr_enabled, ids of the desired workloads' candidates).
        earlier: Option<(&'static [u64], &'static [u64])>,
        /// (key, id) redirected by earlier passes, each at `/cg/<key>`.
        before: &'static [(&'static str, u64)],
        /// (key, id) refused by earlier passes (no listener), each at `/cg/<key>`.
        before_refused: &'static [(&'static str, u64)],
        /// (key, cgroup key, id): like `before`, with another workload's cgroup.
        before_shared: &'static [(&'static str, &'static str, u64)],
        stale_checked: bool,
        /// Keys among `desired` that are audited.
        audited: &'static [&'static str],
        /// (key, id) audited by earlier passes, each at `/cg/<key>`.
        before_audit: &'static [(&'static str, u64)],
        audit_unavailable: bool,
        want_actions: Vec<Action>,
        want_notices: Vec<Notice>,
        want_ready: bool,
        /// (key, id) enabled after the pass.
        want_enabled: &'static [(&'static str, u64)],
    }

    fn case(name: &'static str) -> Case {
        Case {
            name,
            desired: &[],
            known: true,
            full: false,
            cgroups: Vec::new(),
            listeners: &[],
            other_port: &[],
            enabled_netns: &[],
            entries: None,
            earlier: None,
            before: &[],
            before_refused: &[],
            before_shared: &[],
            stale_checked: true,
            audited: &[],
            before_audit: &[],
            audit_unavailable: false,
            want_actions: Vec::new(),
            want_notices: Vec::new(),
            want_ready: true,
            want_enabled: &[],
        }
    }

    fn run(c: &Case) -> (Decision, Memory) {
        let mut before = Memory {
            stale_checked: c.stale_checked,
            ..Memory::default()
        };
        let stages = c.before.iter().map(|&(key, id)| (key, id, redirect()));
        let refused = c
            .before_refused
            .iter()
            .map(|&(key, id)| (key, id, Stage::NoListener));
        let audited = c
            .before_audit
            .iter()
            .map(|&(key, id)| (key, id, Stage::Audit));
        for (key, id, stage) in stages.chain(refused).chain(audited) {
            let cgroup = cg(key);
            let e = Enabled { cgroup, id, stage };
            before.enabled.insert(key.into(), e);
        }
        for &(key, cgroup, id) in c.before_shared {
            let (cgroup, stage) = (cg(cgroup), redirect());
            before
                .enabled
                .insert(key.into(), Enabled { cgroup, id, stage });
        }
        let seen = Observed {
            known: c.known,
            full: c.full,
            cgroups: c
                .cgroups
                .iter()
                .map(|(k, s)| ((*k).to_owned(), s.clone()))
                .collect(),
            listeners: c
                .listeners
                .iter()
                .map(|&n| (ns(n), PORT + u16::from(c.other_port.contains(&n))))
                .collect(),
            enabled_netns: c
                .enabled_netns
                .iter()
                .map(|(k, nss)| (cg(k), nss.iter().map(|&n| ns(n)).collect()))
                .collect(),
            entries: c.entries.map(|e| e.iter().copied().collect()),
            earlier: c.earlier.map(|(map, candidates)| EarlierRun {
                map_ids: map.iter().copied().collect(),
                candidate_ids: candidates.iter().copied().collect(),
            }),
            netns_files: BTreeMap::new(),
            audit_unavailable: c.audit_unavailable,
        };
        let mut want = desired(c.desired);
        for key in c.audited {
            want.get_mut(*key).expect("audited key is desired").audit = true;
        }
        (decide(&want, &seen, &before), before)
    }

    #[test]
    fn decide_table() {
        let cases = vec![
            Case {
                desired: &["a"],
                cgroups: vec![("a", CgroupSeen::Missing)],
                want_notices: vec![Notice::WaitingForCgroup { label: label("a") }],
                ..case("new workload whose cgroup does not exist yet: waits, still ready")
            },
            Case {
                desired: &["a"],
                cgroups: vec![("a", found("a", 10, &[]))],
                want_actions: vec![enable_as("a", 10, Stage::WaitingForProcess)],
                want_notices: vec![Notice::WaitingForProcess {
                    label: label("a"),
                    cgroup: cg("a"),
                }],
                want_enabled: &[("a", 10)],
                ..case("cgroup exists but has no process yet: refused until it has a listener")
            },
            Case {
                desired: &["a"],
                cgroups: vec![("a", CgroupSeen::Unreadable)],
                ..case("cgroup id unreadable (removed meanwhile): looked at again next pass")
            },
            Case {
                desired: &["a"],
                cgroups: vec![("a", found("a", 10, &[(100, 1), (101, 1)]))],
                listeners: &[1],
                want_actions: vec![enable("a", 10)],
                want_enabled: &[("a", 10)],
                ..case("listener bound in its only netns: enabled")
            },
            Case {
                desired: &["a"],
                cgroups: vec![("a", found("a", 10, &[(100, 1), (200, 2)]))],
                listeners: &[1],
                want_actions: vec![enable_as("a", 10, Stage::NoListener)],
                want_notices: vec![refused("a", Stage::NoListener)],
                want_enabled: &[("a", 10)],
                ..case("listener failed in one of its netns: refused, the node stays ready")
            },
            Case {
                desired: &["a"],
                cgroups: vec![("a", found("a", 10, &[(100, 1), (200, 2)]))],
                listeners: &[1, 2],
                other_port: &[2],
                want_actions: vec![enable_as("a", 10, Stage::PortsDiffer)],
                want_notices: vec![refused("a", Stage::PortsDiffer)],
                want_enabled: &[("a", 10)],
                ..case("its netns listen on different ports: one entry cannot serve both, refused")
            },
            Case {
                desired: &["a"],
                cgroups: vec![("a", found("a", 10, &[(100, 1)]))],
                listeners: &[1],
                other_port: &[1],
                before_refused: &[("a", 10)],
                want_actions: vec![enable_as("a", 10, Stage::Redirect { port: PORT + 1 })],
                want_enabled: &[("a", 10)],
                ..case("refused workload whose listener is bound at last: redirected to its port")
            },
            Case {
                desired: &["a"],
                cgroups: vec![("a", found("a", 10, &[(100, 1)]))],
                before_refused: &[("a", 10)],
                want_enabled: &[("a", 10)],
                ..case("refused workload still without a listener: no change, no second line")
            },
            Case {
                desired: &["a", "b"],
                full: true,
                cgroups: vec![
                    ("a", found("a", 10, &[(100, 1)])),
                    ("b", found("b", 20, &[(200, 2)])),
                ],
                listeners: &[1, 2],
                before: &[("a", 10), ("b", 20)],
                enabled_netns: &[("a", &[1]), ("b", &[2])],
                entries: Some(&[(10, CgroupMode::Redirect { port: PORT + 1 })]),
                want_actions: vec![enable("a", 10), enable("b", 20)],
                want_enabled: &[("a", 10), ("b", 20)],
                ..case("full pass: entries changed or removed behind our back are written again")
            },
            Case {
                desired: &["a"],
                full: true,
                cgroups: vec![("a", found("a", 10, &[(100, 1), (200, 2)]))],
                listeners: &[1],
                before: &[("a", 10)],
                enabled_netns: &[("a", &[1, 2])],
                want_actions: vec![enable_as("a", 10, Stage::NoListener)],
                want_notices: vec![refused("a", Stage::NoListener)],
                want_enabled: &[("a", 10)],
                ..case("redirected workload's new netns without a listener: refused, not direct")
            },
            Case {
                desired: &["a"],
                cgroups: vec![("a", unscanned("a", 10))],
                listeners: &[1],
                before: &[("a", 10)],
                want_enabled: &[("a", 10)],
                ..case("quick pass: an enabled, unchanged workload is left alone")
            },
            Case {
                known: false,
                earlier: Some((&[10], &[])),
                stale_checked: false,
                want_ready: false,
                ..case(
                    "desired set not known yet (watcher's first set): not ready, nothing disabled",
                )
            },
            Case {
                full: true,
                listeners: &[1],
                before: &[("a", 10)],
                enabled_netns: &[("a", &[1])],
                want_actions: vec![leave("a", Some(10)), Action::Close { netns: ns(1) }],
                ..case("workload leaves: disabled, and its listener closed on a full pass")
            },
            Case {
                listeners: &[1],
                before: &[("a", 10)],
                want_actions: vec![leave("a", Some(10))],
                ..case(
                    "workload leaves on a quick pass: disabled; the listener waits for a full pass",
                )
            },
            Case {
                desired: &["b"],
                full: true,
                cgroups: vec![("b", found("b", 20, &[(300, 1)]))],
                listeners: &[1],
                before: &[("a", 10), ("b", 20)],
                enabled_netns: &[("a", &[1]), ("b", &[1])],
                want_actions: vec![leave("a", Some(10))],
                want_enabled: &[("b", 20)],
                ..case("workload leaves a netns another workload uses: the listener stays")
            },
            Case {
                desired: &["b"],
                full: true,
                cgroups: vec![("b", found("shared", 10, &[(300, 1)]))],
                listeners: &[1],
                before_shared: &[("a", "shared", 10), ("b", "shared", 10)],
                enabled_netns: &[("shared", &[1])],
                want_actions: vec![Action::Leave {
                    key: "a".into(),
                    cgroup: cg("shared"),
                    disable: None,
                }],
                want_enabled: &[("b", 10)],
                ..case("two workloads on one cgroup id, one leaves: the id stays enabled")
            },
            Case {
                before_shared: &[("b", "shared", 10)],
                want_actions: vec![Action::Leave {
                    key: "b".into(),
                    cgroup: cg("shared"),
                    disable: Some(10),
                }],
                ..case("two workloads on one cgroup id, the last leaves: the id goes")
            },
            Case {
                desired: &["a"],
                cgroups: vec![("a", found("a", 11, &[(100, 1)]))],
                listeners: &[1],
                before: &[("a", 10)],
                want_actions: vec![Action::Disable { id: 10 }, enable("a", 11)],
                want_enabled: &[("a", 11)],
                ..case("cgroup recreated (new id): re-enabled with the new id, the old id goes")
            },
            Case {
                desired: &["a", "b"],
                cgroups: vec![
                    ("a", found("a", 11, &[(100, 1)])),
                    ("b", unscanned("shared", 10)),
                ],
                listeners: &[1],
                before_shared: &[("a", "shared", 10), ("b", "shared", 10)],
                want_actions: vec![enable("a", 11)],
                want_enabled: &[("a", 11), ("b", 10)],
                ..case("cgroup recreated while another workload holds the old id: the old id stays")
            },
            Case {
                desired: &["a"],
                cgroups: vec![("a", found("a", 11, &[]))],
                before: &[("a", 10)],
                want_actions: vec![
                    Action::Disable { id: 10 },
                    enable_as("a", 11, Stage::WaitingForProcess),
                ],
                want_notices: vec![Notice::WaitingForProcess {
                    label: label("a"),
                    cgroup: cg("a"),
                }],
                want_enabled: &[("a", 11)],
                ..case("cgroup recreated, no process yet: the new id is refused, the old one goes")
            },
            Case {
                desired: &["a", "b"],
                cgroups: vec![
                    ("a", found("a", 10, &[(100, 1)])),
                    ("b", found("b", 30, &[])),
                ],
                listeners: &[1],
                stale_checked: false,
                earlier: Some((&[10, 20, 30], &[10, 30])),
                want_actions: vec![
                    enable("a", 10),
                    enable_as("b", 30, Stage::WaitingForProcess),
                    Action::DisableStale { id: 20 },
                ],
                want_notices: vec![Notice::WaitingForProcess {
                    label: label("b"),
                    cgroup: cg("b"),
                }],
                want_enabled: &[("a", 10), ("b", 30)],
                ..case("ids an earlier run enabled: the unwanted go, still-desired ones stay")
            },
            Case {
                stale_checked: false,
                before: &[("a", 10)],
                earlier: Some((&[10], &[])),
                want_actions: vec![leave("a", Some(10))],
                ..case("an id this pass disables is not also reported as left by an earlier run")
            },
            Case {
                earlier: Some((&[20], &[])),
                ..case("ids left by an earlier run are looked for only once")
            },
            Case {
                desired: &["a"],
                audited: &["a"],
                cgroups: vec![("a", found("a", 10, &[]))],
                want_actions: vec![enable_as("a", 10, Stage::Audit)],
                want_enabled: &[("a", 10)],
                ..case(
                    "audited workload: in the map as audit at once, no process or listener needed",
                )
            },
            Case {
                desired: &["a"],
                audited: &["a"],
                cgroups: vec![("a", unscanned("a", 10))],
                before_audit: &[("a", 10)],
                want_enabled: &[("a", 10)],
                ..case("audited workload, unchanged: nothing to do")
            },
            Case {
                desired: &["a"],
                audited: &["a"],
                full: true,
                cgroups: vec![("a", unscanned("a", 10))],
                listeners: &[1],
                before: &[("a", 10)],
                enabled_netns: &[("a", &[1])],
                want_actions: vec![
                    enable_as("a", 10, Stage::Audit),
                    Action::Close { netns: ns(1) },
                ],
                want_enabled: &[("a", 10)],
                ..case("redirected workload switched to audit: audit entry, its listener closes")
            },
            Case {
                desired: &["a"],
                cgroups: vec![("a", found("a", 10, &[(100, 1)]))],
                listeners: &[1],
                before_audit: &[("a", 10)],
                want_actions: vec![enable("a", 10)],
                want_enabled: &[("a", 10)],
                ..case(
                    "audited workload switched to enforce: redirected once its listener is bound",
                )
            },
            Case {
                desired: &["a"],
                cgroups: vec![("a", found("a", 10, &[(100, 1), (200, 2)]))],
                listeners: &[1],
                before_audit: &[("a", 10)],
                want_actions: vec![enable_as("a", 10, Stage::NoListener)],
                want_notices: vec![refused("a", Stage::NoListener)],
                want_enabled: &[("a", 10)],
                ..case(
                    "audited workload switched to enforce without a listener: refused, not direct",
                )
            },
            Case {
                desired: &["a"],
                audited: &["a"],
                audit_unavailable: true,
                cgroups: vec![("a", found("a", 10, &[]))],
                want_notices: vec![Notice::AuditUnavailable { label: label("a") }],
                ..case("programs predate audit: the audited workload stays out of the map")
            },
            Case {
                desired: &["a"],
                audited: &["a"],
                audit_unavailable: true,
                cgroups: vec![("a", unscanned("a", 10))],
                before: &[("a", 10)],
                want_actions: vec![leave("a", Some(10))],
                want_notices: vec![Notice::AuditUnavailable { label: label("a") }],
                ..case("programs predate audit: a workload switched to audit leaves the map")
            },
        ];
        for c in &cases {
            let (d, before) = run(c);
            assert_eq!(d.actions, c.want_actions, "{}: actions", c.name);
            assert_eq!(d.notices, c.want_notices, "{}: notices", c.name);
            assert_eq!(d.ready, c.want_ready, "{}: ready", c.name);
            let enabled: Vec<(&str, u64)> = d
                .memory
                .enabled
                .iter()
                .map(|(k, e)| (k.as_str(), e.id))
                .collect();
            assert_eq!(enabled, c.want_enabled, "{}: enabled", c.name);
            let checked = before.stale_checked || (c.known && c.earlier.is_some());
            assert_eq!(d.memory.stale_checked, checked, "{}: stale check", c.name);
        }
    }

    #[test]
    fn a_waiting_line_is_logged_once_per_workload_until_it_is_enabled() {
        let desired = desired(&["a"]);
        let mut seen = Observed {
            known: true,
            cgroups: BTreeMap::from([("a".to_owned(), CgroupSeen::Missing)]),
            ..Observed::default()
        };
        let first = decide(&desired, &seen, &Memory::default());
        assert_eq!(first.notices.len(), 1);
        let again = decide(&desired, &seen, &first.memory);
        assert!(again.notices.is_empty());
        // The cgroup appears without a process: still the same wait, no second line.
        seen.cgroups.insert("a".into(), found("a", 10, &[]));
        assert!(decide(&desired, &seen, &again.memory).notices.is_empty());
        // Enabled: forgotten, so a later wait (after it leaves and comes back) logs again.
        seen.cgroups.insert("a".into(), found("a", 10, &[(100, 1)]));
        seen.listeners.insert(ns(1), PORT);
        let enabled = decide(&desired, &seen, &again.memory);
        assert!(enabled.memory.waiting_logged.is_empty());
        // A workload that leaves while waiting is forgotten too.
        let gone = decide(&DesiredSet::new(), &Observed::default(), &first.memory);
        assert!(gone.memory.waiting_logged.is_empty());
    }

    #[test]
    fn audited_workloads_get_no_listener_and_are_settled_only_in_their_mode() {
        let mut want = desired(&["a", "b"]);
        want.get_mut("a").unwrap().audit = true;
        let seen = Observed {
            known: true,
            cgroups: BTreeMap::from([
                ("a".to_owned(), found("a", 10, &[(100, 1)])),
                ("b".to_owned(), found("b", 20, &[(200, 2)])),
            ]),
            ..Observed::default()
        };
        let plan = plan_listeners(&want, &seen);
        assert_eq!(plan.len(), 1);
        assert_eq!(
            plan[0].netns,
            ns(2),
            "only the enforced workload gets a listener"
        );

        let mut memory = Memory::default();
        let e = |stage| Enabled {
            cgroup: cg("a"),
            id: 10,
            stage,
        };
        memory.enabled.insert("a".into(), e(Stage::Audit));
        assert!(settled(&memory, &want["a"]));
        want.get_mut("a").unwrap().audit = false;
        assert!(
            !settled(&memory, &want["a"]),
            "switched to enforce: not settled"
        );
        memory.enabled.insert("a".into(), e(redirect()));
        assert!(settled(&memory, &want["a"]));
        want.get_mut("a").unwrap().audit = true;
        assert!(
            !settled(&memory, &want["a"]),
            "switched to audit: not settled"
        );

        let v = views(
            &want,
            &Memory {
                enabled: BTreeMap::from([("a".to_owned(), e(Stage::Audit))]),
                ..Memory::default()
            },
        );
        assert_eq!(
            (v[0].state.as_str(), v[0].listening, v[0].port),
            ("audit", false, None)
        );
    }

    #[test]
    fn listeners_are_planned_once_per_netns_with_every_process_as_a_way_in() {
        let desired = desired(&["a", "b", "c", "d"]);
        let seen = Observed {
            known: true,
            cgroups: BTreeMap::from([
                ("a".to_owned(), found("a", 10, &[(100, 1), (101, 2)])),
                ("b".to_owned(), found("b", 20, &[(200, 1), (201, 3)])),
                ("c".to_owned(), unscanned("c", 30)),
                ("d".to_owned(), CgroupSeen::Missing),
            ]),
            listeners: BTreeMap::from([(ns(3), PORT)]),
            ..Observed::default()
        };
        let attempt = |pid, key: &str| Attempt {
            at: ListenAt::Pid(pid),
            workload: label(key),
        };
        assert_eq!(
            plan_listeners(&desired, &seen),
            vec![
                Listen {
                    netns: ns(1),
                    attempts: vec![attempt(100, "a"), attempt(200, "b")],
                },
                Listen {
                    netns: ns(2),
                    attempts: vec![attempt(101, "a")],
                },
            ]
        );
    }

    #[test]
    fn quick_passes_look_only_at_workloads_not_redirected_with_their_current_id() {
        let mut memory = Memory::default();
        for (key, id, stage) in [("a", 10, redirect()), ("c", 30, Stage::NoListener)] {
            let cgroup = cg(key);
            memory
                .enabled
                .insert(key.into(), Enabled { cgroup, id, stage });
        }
        assert!(!wants_scan(&memory, "a", 10, false));
        assert!(wants_scan(&memory, "a", 10, true));
        assert!(wants_scan(&memory, "a", 11, false), "recreated cgroup");
        assert!(wants_scan(&memory, "b", 20, false), "not enabled yet");
        assert!(
            wants_scan(&memory, "c", 30, false),
            "refused, waiting for a listener"
        );
    }

    #[test]
    fn the_view_lists_every_desired_workload_with_its_cgroup_and_state() {
        let mut memory = Memory::default();
        for (key, id, stage) in [("a", 10, redirect()), ("c", 30, Stage::NoListener)] {
            let cgroup = cg(key);
            memory
                .enabled
                .insert(key.into(), Enabled { cgroup, id, stage });
        }
        let v = views(&desired(&["a", "b", "c"]), &memory);
        let shown: Vec<_> = v
            .iter()
            .map(|v| {
                let cgroup = v.cgroup.as_deref();
                (v.label.as_str(), cgroup, v.cgroup_id, v.listening)
            })
            .collect();
        assert_eq!(
            shown,
            [
                ("default/a", Some("/cg/a"), Some(10), true),
                ("default/b", None, None, false),
                ("default/c", Some("/cg/c"), Some(30), false),
            ]
        );
        let states: Vec<_> = v.iter().map(|v| (v.state.as_str(), v.port)).collect();
        assert_eq!(
            states,
            [
                ("redirect", Some(PORT)),
                ("waiting", None),
                ("refused", None)
            ]
        );
    }
}
