//! The audit reader: every `audit-interval`, reads the eBPF audit maps, updates the audit
//! metrics, logs one summary line per audited workload that connected meanwhile, and frees
//! the entries [`crate::audit::Tracker`] is done with.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use tracing::{info, warn};

use crate::{audit::Tracker, bpf::AuditMaps, state::Shared};

pub async fn run(shared: Arc<Shared>, maps: AuditMaps) {
    let mut state = (maps, Tracker::default());
    loop {
        let every = shared.config.load().audit_interval;
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // A full map is 16384 entries, two system calls each: off the async workers.
        let s = Arc::clone(&shared);
        let (maps, mut tracker) = state;
        match tokio::task::spawn_blocking(move || {
            let mut maps = maps;
            one_pass(&s, &mut maps, &mut tracker);
            (maps, tracker)
        })
        .await
        {
            Ok(back) => state = back,
            Err(e) => {
                warn!(error = %e, "audit reader stopped: audit counts are no longer reported");
                return;
            }
        }
    }
}

fn one_pass(shared: &Shared, maps: &mut AuditMaps, tracker: &mut Tracker) {
    let snap = maps.snapshot();
    let enabled: BTreeSet<u64> = shared.maps().enabled_ids();
    let labels: BTreeMap<u64, String> = shared
        .workloads()
        .iter()
        .filter_map(|w| Some((w.cgroup_id?, w.label.clone())))
        .collect();
    let pass = tracker.pass(&snap, &enabled, &labels);
    maps.forget(&pass.forget_dests, &pass.forget_workloads);
    shared.metrics.set_audit(&pass);
    for r in pass.reports.iter().filter(|r| r.active()) {
        info!(
            workload = %r.label,
            redirect = r.delta.redirect,
            skip = r.delta.skip,
            untracked = r.delta.untracked,
            total_redirect = r.totals.redirect,
            total_skip = r.totals.skip,
            total_untracked = r.totals.untracked,
            top = %r.top_text(),
            "audit summary: what enforcement would do with this workload's connects"
        );
    }
}
