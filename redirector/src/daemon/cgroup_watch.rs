//! Wakes the reconciler as soon as a pending workload's cgroup appears or its first process
//! joins, instead of on the next timer tick.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
};

use futures::{FutureExt, StreamExt};
use inotify::{EventStream, Inotify, WatchDescriptor, WatchMask, Watches};

use crate::workloads::Workload;

/// Room for several events at once (one is 16 bytes plus a name of at most 255).
const EVENT_BUFFER: usize = 4096;

/// inotify on the parent directories of cgroups not created yet and on `cgroup.events` of
/// those that exist (the kernel updates its `populated` line when the first process joins):
/// the listener must be in place before the pod's app container makes its first connect.
pub struct CgroupWatch {
    events: EventStream<[u8; EVENT_BUFFER]>,
    watches: Watches,
    watched: HashMap<PathBuf, WatchDescriptor>,
}

impl CgroupWatch {
    pub fn new() -> std::io::Result<CgroupWatch> {
        let inotify = Inotify::init()?;
        let watches = inotify.watches();
        Ok(CgroupWatch {
            events: inotify.into_event_stream([0; EVENT_BUFFER])?,
            watches,
            watched: HashMap::new(),
        })
    }

    /// Watches exactly `paths` (adding new ones, dropping the rest).
    pub fn set(&mut self, paths: &HashSet<PathBuf>) {
        self.watched.retain(|p, wd| {
            let keep = paths.contains(p);
            if !keep {
                let _ = self.watches.remove(wd.clone());
            }
            keep
        });
        for p in paths {
            if self.watched.contains_key(p) || !p.exists() {
                continue;
            }
            if let Ok(wd) = self.watches.add(p, WatchMask::CREATE | WatchMask::MODIFY) {
                self.watched.insert(p.clone(), wd);
            }
        }
    }

    /// Returns once something changed under a watched path. Events already queued behind the
    /// first are consumed too, so one burst of changes wakes the reconciler once. A watch
    /// that fails never returns (the reconciler's timer still runs).
    pub async fn changed(&mut self) {
        match self.events.next().await {
            Some(Ok(_)) => while let Some(Some(Ok(_))) = self.events.next().now_or_never() {},
            _ => std::future::pending().await,
        }
    }
}

/// What to watch for a workload that is not enabled yet: the nearest existing ancestor of
/// each candidate directory, and `cgroup.events` of a candidate that exists.
pub fn watch_paths(w: &Workload, out: &mut HashSet<PathBuf>) {
    for c in &w.cgroup_candidates {
        if c.is_dir() {
            out.insert(c.join("cgroup.events"));
            continue;
        }
        let mut p = c.parent();
        while let Some(dir) = p {
            if dir.is_dir() {
                out.insert(dir.to_owned());
                break;
            }
            p = dir.parent();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_directory_created_under_a_watched_one_wakes_the_watch_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = CgroupWatch::new().unwrap();
        watch.set(&HashSet::from([dir.path().to_owned()]));
        for i in 0..3 {
            std::fs::create_dir(dir.path().join(format!("pod{i}"))).unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("no wake-up for a created directory");
        // The burst was consumed whole: nothing more to wake up for.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), watch.changed())
                .await
                .is_err()
        );
        // Unwatched paths wake nothing (after the one wake-up for the removed watch: the
        // kernel queues IN_IGNORED).
        watch.set(&HashSet::new());
        let _ = tokio::time::timeout(Duration::from_millis(200), watch.changed()).await;
        std::fs::create_dir(dir.path().join("later")).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), watch.changed())
                .await
                .is_err()
        );
    }

    #[test]
    fn pending_workloads_watch_the_nearest_existing_ancestor_or_cgroup_events() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("exists")).unwrap();
        let w = Workload {
            key: "k".into(),
            label: "k".into(),
            cgroup_candidates: vec![dir.path().join("a/b/c"), dir.path().join("exists")],
            pod: None,
            audit: false,
        };
        let mut out = HashSet::new();
        watch_paths(&w, &mut out);
        assert_eq!(
            out,
            HashSet::from([
                dir.path().to_owned(),
                dir.path().join("exists/cgroup.events")
            ])
        );
    }
}
