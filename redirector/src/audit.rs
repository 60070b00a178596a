//! Audit mode, the daemon's side: from what the eBPF audit maps hold to the reports shown by
//! `redirector status`, the metrics and the periodic log line, and which entries to free.
//!
//! Pure (no I/O): `daemon/audit.rs` reads the maps, calls [`Tracker::pass`], and applies the
//! result. Everything a pod controls (its destinations) is bounded before it reaches an
//! operator: at most [`TOP`] destinations per workload in a log line or in the metrics, the
//! rest summed as `other`; the kernel map itself holds at most
//! [`redirector_common::AUDIT_DESTINATIONS`] entries node-wide, and connects past that are
//! counted as `untracked` in their workload's totals.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use redirector_common::{AuditKey, AuditTotals, verdict};
use serde::{Deserialize, Serialize};

use crate::bpf::AuditSnapshot;

/// Destinations per workload named in a log line and in the metrics.
pub const TOP: usize = 5;
/// Passes a destination's count may stay unchanged before its entry is freed (its counts stay
/// in the workload's totals).
pub const IDLE_PASSES: u32 = 10;

/// The verdict's name, as the metrics, the log and `status` show it.
pub fn verdict_name(v: u8) -> &'static str {
    match v {
        verdict::REDIRECT => "redirect",
        verdict::SKIP => "skip",
        _ => "unknown",
    }
}

/// The destination of an audit key; IPv4-mapped addresses come back as IPv4.
pub fn destination(k: &AuditKey) -> SocketAddr {
    let v6 = Ipv6Addr::from(k.addr);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) if k.family == 4 => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, k.port)
}

/// One destination of one workload with its count.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct DestCount {
    /// `addr:port` (`[v6]:port`).
    pub destination: String,
    /// `redirect` or `skip`: what enforcement would have done.
    pub verdict: String,
    pub count: u64,
}

/// The `n` destinations of `cgroup` with the highest counts (ties: in key order, so the
/// choice is stable), and how many more it has.
pub fn top_of(dests: &[(AuditKey, u64)], cgroup: u64, n: usize) -> (Vec<DestCount>, usize) {
    let mut mine: Vec<&(AuditKey, u64)> =
        dests.iter().filter(|(k, _)| k.cgroup == cgroup).collect();
    mine.sort_by(|(ka, ca), (kb, cb)| cb.cmp(ca).then(ka.cmp(kb)));
    let more = mine.len().saturating_sub(n);
    let top = mine
        .into_iter()
        .take(n)
        .map(|(k, c)| DestCount {
            destination: destination(k).to_string(),
            verdict: verdict_name(k.verdict).to_owned(),
            count: *c,
        })
        .collect();
    (top, more)
}

/// `a - b` field by field; a field that went down (the entry was freed and made again) counts
/// from zero.
fn delta(now: &AuditTotals, before: &AuditTotals) -> AuditTotals {
    let d = |n: u64, b: u64| if n >= b { n - b } else { n };
    AuditTotals {
        redirect: d(now.redirect, before.redirect),
        skip: d(now.skip, before.skip),
        untracked: d(now.untracked, before.untracked),
    }
}

/// One audited workload after a pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub cgroup: u64,
    /// `namespace/pod` or the cgroup path.
    pub label: String,
    /// Since the workload's first audited connect.
    pub totals: AuditTotals,
    /// Since the previous pass.
    pub delta: AuditTotals,
    /// Its [`TOP`] destinations by count.
    pub top: Vec<DestCount>,
}

impl Report {
    /// Whether anything was counted since the previous pass (a log line is due).
    pub fn active(&self) -> bool {
        self.delta.redirect + self.delta.skip > 0
    }

    /// The top destinations for the log line: `addr:port verdict=count, …`.
    pub fn top_text(&self) -> String {
        self.top
            .iter()
            .map(|d| format!("{} {}={}", d.destination, d.verdict, d.count))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Connects with `verdict` not among the top destinations (all of them once the top
    /// list is cut, or their entries were freed): the metrics' `destination="other"`.
    pub fn other(&self, verdict: &str) -> u64 {
        let total = match verdict {
            "redirect" => self.totals.redirect,
            _ => self.totals.skip,
        };
        let named: u64 = self
            .top
            .iter()
            .filter(|d| d.verdict == verdict)
            .map(|d| d.count)
            .sum();
        total.saturating_sub(named)
    }
}

/// The outcome of one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Every audited workload the daemon can name, in cgroup id order.
    pub reports: Vec<Report>,
    /// Destination entries to free: idle for [`IDLE_PASSES`] passes, or of a workload that
    /// is gone.
    pub forget_dests: Vec<AuditKey>,
    /// Workloads whose totals to free: their id is no longer in `rdr_enabled`.
    pub forget_workloads: Vec<u64>,
    /// Workloads reported by the previous pass and gone now (their metric series go).
    pub gone: Vec<String>,
}

/// What the daemon remembers between passes.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Totals as last seen, by cgroup id.
    totals: BTreeMap<u64, AuditTotals>,
    /// Per destination entry: its count as last seen and for how many passes it has not
    /// changed.
    dests: HashMap<AuditKey, (u64, u32)>,
    /// Labels reported by the last pass.
    reported: BTreeSet<String>,
}

impl Tracker {
    /// One pass over `snap`. `enabled`: the ids in `rdr_enabled` now (any mode: a workload
    /// switched to enforce keeps its counts while it exists); `labels`: the names of the
    /// workloads the reconciler knows, by cgroup id.
    pub fn pass(
        &mut self,
        snap: &AuditSnapshot,
        enabled: &BTreeSet<u64>,
        labels: &BTreeMap<u64, String>,
    ) -> Pass {
        let mut pass = Pass::default();
        let gone = |id: &u64| !enabled.contains(id) && !labels.contains_key(id);
        for id in snap.totals.keys().filter(|id| gone(id)) {
            pass.forget_workloads.push(*id);
        }
        let mut seen = HashMap::with_capacity(snap.dests.len());
        for (k, count) in &snap.dests {
            if gone(&k.cgroup) {
                pass.forget_dests.push(*k);
                continue;
            }
            let idle = match self.dests.get(k) {
                Some((before, idle)) if before == count => idle + 1,
                _ => 0,
            };
            if idle >= IDLE_PASSES {
                pass.forget_dests.push(*k);
            } else {
                seen.insert(*k, (*count, idle));
            }
        }
        self.dests = seen;

        let mut reported = BTreeSet::new();
        let mut totals = BTreeMap::new();
        for (id, now) in snap.totals.iter().filter(|(id, _)| !gone(id)) {
            // Remembered only once named, so the first report's delta has every count.
            let Some(label) = labels.get(id) else {
                continue;
            };
            totals.insert(*id, *now);
            let before = self.totals.get(id).copied().unwrap_or_default();
            let (top, _) = top_of(&snap.dests, *id, TOP);
            reported.insert(label.clone());
            pass.reports.push(Report {
                cgroup: *id,
                label: label.clone(),
                totals: *now,
                delta: delta(now, &before),
                top,
            });
        }
        self.totals = totals;
        pass.gone = self.reported.difference(&reported).cloned().collect();
        self.reported = reported;
        pass
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redirector_common::v4_mapped;

    fn key(cgroup: u64, last: u8, port: u16, v: u8) -> AuditKey {
        AuditKey {
            cgroup,
            addr: v4_mapped([203, 0, 113, last]),
            port,
            family: 4,
            verdict: v,
            reserved: 0,
        }
    }

    fn totals(redirect: u64, skip: u64) -> AuditTotals {
        AuditTotals {
            redirect,
            skip,
            untracked: 0,
        }
    }

    fn labels(ids: &[u64]) -> BTreeMap<u64, String> {
        ids.iter().map(|id| (*id, format!("ns/p{id}"))).collect()
    }

    #[test]
    fn destinations_print_as_socket_addresses() {
        assert_eq!(
            destination(&key(1, 200, 8080, verdict::REDIRECT)).to_string(),
            "203.0.113.200:8080"
        );
        let v6 = AuditKey {
            addr: "2001:db8:203::200".parse::<Ipv6Addr>().unwrap().octets(),
            family: 6,
            ..key(1, 0, 443, verdict::SKIP)
        };
        assert_eq!(destination(&v6).to_string(), "[2001:db8:203::200]:443");
        // An IPv4-mapped address asked for through an AF_INET6 socket is family 4.
        let mapped_v6 = AuditKey {
            family: 6,
            ..key(1, 7, 80, verdict::SKIP)
        };
        assert_eq!(
            destination(&mapped_v6).to_string(),
            "[::ffff:203.0.113.7]:80"
        );
        assert_eq!(verdict_name(verdict::SKIP), "skip");
        assert_eq!(verdict_name(9), "unknown");
    }

    #[test]
    fn top_is_by_count_then_key_and_counts_the_rest() {
        let dests: Vec<(AuditKey, u64)> = (0..8)
            .map(|i| (key(1, i, 443, verdict::REDIRECT), u64::from(i % 3)))
            .chain([(key(2, 50, 443, verdict::REDIRECT), 99)])
            .collect();
        let (top, more) = top_of(&dests, 1, 3);
        let shown: Vec<(&str, u64)> = top
            .iter()
            .map(|d| (d.destination.as_str(), d.count))
            .collect();
        assert_eq!(
            shown,
            [
                ("203.0.113.2:443", 2),
                ("203.0.113.5:443", 2),
                ("203.0.113.1:443", 1)
            ]
        );
        assert_eq!(more, 5, "the other workload's destination is not counted");
    }

    #[test]
    fn a_pass_reports_deltas_totals_and_a_bounded_top() {
        let mut t = Tracker::default();
        let many: Vec<(AuditKey, u64)> = (0..40)
            .map(|i| (key(1, i, 443, verdict::REDIRECT), 1))
            .chain([(key(1, 200, 8080, verdict::SKIP), 3)])
            .collect();
        let snap = AuditSnapshot {
            totals: BTreeMap::from([(1, totals(40, 3))]),
            dests: many,
        };
        let enabled = BTreeSet::from([1]);
        let p = t.pass(&snap, &enabled, &labels(&[1]));
        assert_eq!(p.reports.len(), 1);
        let r = &p.reports[0];
        assert!(r.active());
        assert_eq!(r.delta, totals(40, 3));
        assert_eq!(
            r.top.len(),
            TOP,
            "a pod's destinations are cut to the top {TOP}"
        );
        assert_eq!(r.top[0].destination, "203.0.113.200:8080");
        assert_eq!(r.other("skip"), 0);
        assert_eq!(r.other("redirect"), 40 - (TOP as u64 - 1));
        assert!(r.top_text().starts_with("203.0.113.200:8080 skip=3, "));

        // Nothing new: not active, nothing freed yet.
        let p = t.pass(&snap, &enabled, &labels(&[1]));
        assert!(!p.reports[0].active());
        assert_eq!(p.reports[0].delta, totals(0, 0));
        assert!(p.forget_dests.is_empty());

        // One more connect to one destination: a delta of one.
        let mut snap2 = snap.clone();
        snap2.totals.insert(1, totals(41, 3));
        snap2.dests[0].1 = 2;
        let p = t.pass(&snap2, &enabled, &labels(&[1]));
        assert_eq!(p.reports[0].delta, totals(1, 0));
    }

    #[test]
    fn idle_destinations_are_freed_and_gone_workloads_forgotten() {
        let mut t = Tracker::default();
        let busy = key(1, 1, 443, verdict::REDIRECT);
        let idle = key(1, 2, 443, verdict::REDIRECT);
        let enabled = BTreeSet::from([1]);
        for round in 0..=IDLE_PASSES {
            let snap = AuditSnapshot {
                totals: BTreeMap::from([(1, totals(u64::from(round) + 2, 0))]),
                dests: vec![(busy, u64::from(round) + 1), (idle, 1)],
            };
            let p = t.pass(&snap, &enabled, &labels(&[1]));
            if round < IDLE_PASSES {
                assert!(p.forget_dests.is_empty(), "round {round}");
            } else {
                assert_eq!(
                    p.forget_dests,
                    vec![idle],
                    "unchanged for {IDLE_PASSES} passes"
                );
            }
        }
        // The workload leaves: out of rdr_enabled and unknown to the reconciler.
        let snap = AuditSnapshot {
            totals: BTreeMap::from([(1, totals(9, 0))]),
            dests: vec![(busy, 9)],
        };
        let p = t.pass(&snap, &BTreeSet::new(), &BTreeMap::new());
        assert_eq!(p.forget_workloads, vec![1]);
        assert_eq!(p.forget_dests, vec![busy]);
        assert!(p.reports.is_empty());
        assert_eq!(p.gone, vec!["ns/p1".to_owned()], "its metric series go");
    }

    #[test]
    fn a_workload_the_reconciler_has_not_named_yet_is_kept_not_reported() {
        let mut t = Tracker::default();
        let snap = AuditSnapshot {
            totals: BTreeMap::from([(7, totals(1, 0))]),
            dests: vec![(key(7, 1, 443, verdict::REDIRECT), 1)],
        };
        // Enabled in the kernel a moment before the reconciler published its view.
        let p = t.pass(&snap, &BTreeSet::from([7]), &BTreeMap::new());
        assert!(p.reports.is_empty());
        assert!(p.forget_dests.is_empty() && p.forget_workloads.is_empty());
        // Named on the next pass: its first connect is still in that pass's delta.
        let p = t.pass(&snap, &BTreeSet::from([7]), &labels(&[7]));
        assert_eq!(p.reports[0].delta, totals(1, 0));
    }

    #[test]
    fn totals_that_went_down_count_from_zero() {
        assert_eq!(delta(&totals(2, 1), &totals(5, 1)), totals(2, 0));
    }
}
