//! The desired set of enabled workloads: what the control plane (static `--cgroup` list or
//! the Kubernetes watcher) wants redirected. The reconciler in `app.rs` turns it into
//! listeners and `rdr_enabled` entries.
use std::{collections::BTreeMap, path::PathBuf};

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
}

/// Workloads by key. Sent whole through a `tokio::sync::watch` channel on every change.
pub type DesiredSet = BTreeMap<String, Workload>;
