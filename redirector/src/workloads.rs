//! The desired set of enabled workloads: what the control plane (static `--cgroup` list or
//! the Kubernetes watcher) wants redirected, or audited. The reconciler (`daemon/reconcile.rs`) turns it into
//! listeners and `rdr_enabled` entries.
use std::{collections::BTreeMap, path::PathBuf};

use crate::kubelet::PodUid;

/// One workload to enable: a pod (Kubernetes mode) or a configured cgroup (static mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Stable identity: the pod UID in Kubernetes mode, the cgroup path in static mode.
    pub key: String,
    /// Human label for logs and the audit line: `namespace/pod` or the cgroup path.
    pub label: String,
    /// Where its cgroup v2 directory is (or will be, once the kubelet creates it). In
    /// Kubernetes mode several candidates may be listed (systemd and cgroupfs drivers, QoS
    /// classes); the first that exists is used.
    pub cgroup_candidates: Vec<PathBuf>,
    /// Kubernetes mode: whose pod cgroup this is. A candidate is used only if it resolves to
    /// this pod's own directory inside the kubepods tree (`kubelet::confine`). `None` for
    /// `--cgroup` paths, which the operator chose.
    pub pod: Option<PodCgroup>,
    /// Audit mode: observed (its connects counted by what enforcement would do), not
    /// redirected. No listener is bound for it and its connects are never refused.
    pub audit: bool,
}

/// The pod a Kubernetes workload's cgroup must belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    /// The cgroup root the kubelet's tree is under.
    pub root: PathBuf,
    /// The UID the pod cgroup is named after (validated; see `kubelet::PodUid`).
    pub uid: PodUid,
}

impl Workload {
    /// The first candidate that exists and, for a pod, is its own directory inside the
    /// kubepods tree (resolved, so neither `..` nor a symlink leads out).
    pub fn find_cgroup(&self) -> Option<PathBuf> {
        let dir = self.cgroup_candidates.iter().find(|p| p.is_dir())?;
        match &self.pod {
            None => Some(dir.clone()),
            Some(pod) => crate::kubelet::confine(&pod.root, dir, &pod.uid),
        }
    }
}

/// Workloads by key. Sent whole through a `tokio::sync::watch` channel on every change.
pub type DesiredSet = BTreeMap<String, Workload>;
