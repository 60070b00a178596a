//! Wakes the reconciler as soon as a pending workload's cgroup appears or its first process
//! joins, instead of on the next timer tick.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
};

use crate::workloads::Workload;

/// Wakes the reconciler as soon as a pending workload's cgroup directory appears or its
/// first process joins (inotify on the parent directories and on `cgroup.events`, whose
/// `populated` line the kernel updates), instead of waiting for the next timer tick: the
/// listener must be in place before the pod's app container makes its first connect.
pub struct CgroupWatch {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    inotify: nix::sys::inotify::Inotify,
    watched: HashMap<PathBuf, nix::sys::inotify::WatchDescriptor>,
}

impl CgroupWatch {
    pub fn new() -> Option<CgroupWatch> {
        use nix::sys::inotify::{InitFlags, Inotify};
        use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
        // A second handle on the same inotify fd for readiness; `inotify` reads the events.
        let dup = inotify.as_fd().try_clone_to_owned().ok()?;
        // SAFETY: `dup` is a fresh, owned, open fd.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(dup.into_raw_fd()) };
        // SAFETY: the AsyncFd owns `owned`, an open fd that stays the same for its lifetime.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
        }
        .ok()?;
        Some(CgroupWatch {
            fd,
            inotify,
            watched: HashMap::new(),
        })
    }

    /// Watches exactly `paths` (adding new ones, dropping the rest).
    pub fn set(&mut self, paths: &HashSet<PathBuf>) {
        use nix::sys::inotify::AddWatchFlags as F;
        self.watched.retain(|p, wd| {
            let keep = paths.contains(p);
            if !keep {
                let _ = self.inotify.rm_watch(*wd);
            }
            keep
        });
        for p in paths {
            if self.watched.contains_key(p) || !p.exists() {
                continue;
            }
            let flags = F::IN_CREATE | F::IN_MODIFY;
            if let Ok(wd) = self.inotify.add_watch(p.as_path(), flags) {
                self.watched.insert(p.clone(), wd);
            }
        }
    }

    pub async fn changed(&mut self) {
        if let Ok(mut g) = self.fd.readable_mut().await {
            let _ = self.inotify.read_events();
            g.clear_ready();
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
