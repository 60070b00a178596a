//! Where the kubelet puts a pod's cgroup v2 directory, for both cgroup drivers (pure, no I/O).
//!
//! With the kubelet's default `--cgroup-root=/` and `--cgroups-per-qos=true`, pod cgroups sit
//! under the cgroup2 mount (`/sys/fs/cgroup`) as follows; `<qos>` is `burstable` or
//! `besteffort`, Guaranteed pods have no QoS level of their own:
//!
//! | driver   | QoS        | pod directory                                                       |
//! |----------|------------|---------------------------------------------------------------------|
//! | systemd  | Burstable  | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<U>.slice` |
//! | systemd  | BestEffort | `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<U>.slice` |
//! | systemd  | Guaranteed | `kubepods.slice/kubepods-pod<U>.slice`                              |
//! | cgroupfs | Burstable  | `kubepods/burstable/pod<uid>`                                       |
//! | cgroupfs | BestEffort | `kubepods/besteffort/pod<uid>`                                      |
//! | cgroupfs | Guaranteed | `kubepods/pod<uid>`                                                 |
//!
//! `<U>` is the pod UID with every `-` replaced by `_`: systemd reads `-` in a slice name as
//! a step down the hierarchy. Containers are child directories of the pod directory
//! (`cri-containerd-<id>.scope`, `crio-<id>.scope` or `<id>`), so enabling the pod directory
//! covers every container of the pod, including ones started later.
//!
//! The UID the kubelet uses is `metadata.uid`, except for static pods: their cgroup is named
//! after the kubelet's own hash of the manifest, which the API's mirror pod carries in the
//! `kubernetes.io/config.mirror` annotation (its `metadata.uid` is a different, API-made one).
//! A kubelet with a non-default `--cgroup-root` is served by passing that directory as the
//! cgroup root.
use std::{fmt, path::Path, path::PathBuf};

/// Pod QoS class as reported in `status.qosClass`; it decides the cgroup's parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// Reads `status.qosClass`. The API server fills it in at creation, so it is missing
    /// only for objects that never went through admission; those get the kubelet's most
    /// common class, Burstable. Unknown values (a class added by a future release) do too.
    pub fn from_status(qos_class: Option<&str>) -> Self {
        match qos_class {
            Some("Guaranteed") => QosClass::Guaranteed,
            Some("BestEffort") => QosClass::BestEffort,
            _ => QosClass::Burstable,
        }
    }

    /// The QoS level's directory name, or `None` for Guaranteed (which has no level).
    fn level(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

impl fmt::Display for QosClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        })
    }
}

/// The pod directory under the systemd driver, relative to the cgroup root.
pub fn systemd_pod_dir(uid: &str, qos: QosClass) -> PathBuf {
    let escaped = uid.replace('-', "_");
    let mut dir = PathBuf::from("kubepods.slice");
    match qos.level() {
        None => dir.push(format!("kubepods-pod{escaped}.slice")),
        Some(level) => {
            dir.push(format!("kubepods-{level}.slice"));
            dir.push(format!("kubepods-{level}-pod{escaped}.slice"));
        }
    }
    dir
}

/// The pod directory under the cgroupfs driver, relative to the cgroup root.
pub fn cgroupfs_pod_dir(uid: &str, qos: QosClass) -> PathBuf {
    let mut dir = PathBuf::from("kubepods");
    if let Some(level) = qos.level() {
        dir.push(level);
    }
    dir.push(format!("pod{uid}"));
    dir
}

/// Every directory the pod's cgroup may have under `cgroup_root`: systemd driver first (the
/// default of kubeadm and most distributions since Kubernetes 1.22), then cgroupfs.
pub fn pod_cgroup_candidates(cgroup_root: &Path, uid: &str, qos: QosClass) -> Vec<PathBuf> {
    vec![
        cgroup_root.join(systemd_pod_dir(uid, qos)),
        cgroup_root.join(cgroupfs_pod_dir(uid, qos)),
    ]
}

/// Recognizes a pod's cgroup directory name (the last path component; a whole path is
/// accepted too) under either driver and returns the pod UID in its usual dashed form.
/// Container directories, QoS levels and anything else give `None`.
pub fn pod_uid_from_cgroup_dir(name: &str) -> Option<String> {
    let name = name.trim_end_matches('/');
    let name = name.rsplit('/').next().unwrap_or(name);
    if let Some(stem) = name.strip_suffix(".slice") {
        // `kubepods-pod<U>`, `kubepods-burstable-pod<U>`, `kubepods-besteffort-pod<U>`.
        let rest = stem.strip_prefix("kubepods-")?;
        let escaped = ["pod", "burstable-pod", "besteffort-pod"]
            .iter()
            .find_map(|prefix| rest.strip_prefix(prefix))?;
        // A dash left in the escaped UID would be a further slice level, not a pod.
        if escaped.contains('-') {
            return None;
        }
        let uid = escaped.replace('_', "-");
        return is_uid(&uid).then_some(uid);
    }
    let uid = name.strip_prefix("pod")?;
    is_uid(uid).then(|| uid.to_owned())
}

/// A UID as the kubelet names cgroups after: an API-assigned UUID (`8-4-4-4-12` hex groups)
/// or a static pod's manifest hash (32 hex digits, no dashes).
fn is_uid(s: &str) -> bool {
    let hex = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_hexdigit());
    if !s.contains('-') {
        return s.len() == 32 && hex(s);
    }
    let parts: Vec<&str> = s.split('-').collect();
    let lens = parts.iter().map(|p| p.len()).collect::<Vec<_>>();
    lens == [8, 4, 4, 4, 12] && parts.iter().all(|p| hex(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
    const UID_: &str = "0a1b2c3d_4e5f_6789_abcd_ef0123456789";

    #[test]
    fn qos_class_from_status() {
        let cases = [
            (Some("Guaranteed"), QosClass::Guaranteed),
            (Some("Burstable"), QosClass::Burstable),
            (Some("BestEffort"), QosClass::BestEffort),
            (None, QosClass::Burstable),
            (Some("guaranteed"), QosClass::Burstable),
            (Some("Premium"), QosClass::Burstable),
        ];
        for (input, want) in cases {
            assert_eq!(QosClass::from_status(input), want, "qosClass {input:?}");
        }
    }

    #[test]
    fn candidates_for_both_drivers_and_every_qos() {
        let root = Path::new("/sys/fs/cgroup");
        let cases = [
            (
                QosClass::Burstable,
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
                ),
                format!("kubepods/burstable/pod{UID}"),
            ),
            (
                QosClass::BestEffort,
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
                ),
                format!("kubepods/besteffort/pod{UID}"),
            ),
            (
                QosClass::Guaranteed,
                format!("kubepods.slice/kubepods-pod{UID_}.slice"),
                format!("kubepods/pod{UID}"),
            ),
        ];
        for (qos, systemd, cgroupfs) in cases {
            assert_eq!(
                pod_cgroup_candidates(root, UID, qos),
                vec![root.join(&systemd), root.join(&cgroupfs)],
                "{qos}"
            );
        }
    }

    #[test]
    fn candidates_follow_the_given_root() {
        let got = pod_cgroup_candidates(Path::new("/tmp/x/cg"), UID, QosClass::Guaranteed);
        assert_eq!(
            got[1],
            PathBuf::from(format!("/tmp/x/cg/kubepods/pod{UID}"))
        );
    }

    #[test]
    fn static_pod_hash_uid() {
        let hash = "6d3f0e9a2b1c4d5e8f7a6b5c4d3e2f1a";
        assert_eq!(
            systemd_pod_dir(hash, QosClass::Burstable),
            PathBuf::from(format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice"
            ))
        );
        assert_eq!(
            pod_uid_from_cgroup_dir(&format!("pod{hash}")).as_deref(),
            Some(hash)
        );
    }

    #[test]
    fn uid_from_cgroup_dir() {
        let some = |s: &str| Some(s.to_owned());
        let cases: Vec<(String, Option<String>)> = vec![
            (format!("kubepods-burstable-pod{UID_}.slice"), some(UID)),
            (format!("kubepods-besteffort-pod{UID_}.slice"), some(UID)),
            (format!("kubepods-pod{UID_}.slice"), some(UID)),
            (format!("pod{UID}"), some(UID)),
            // whole paths and a trailing slash
            (
                format!("/sys/fs/cgroup/kubepods/burstable/pod{UID}/"),
                some(UID),
            ),
            (
                format!("/sys/fs/cgroup/kubepods.slice/kubepods-pod{UID_}.slice"),
                some(UID),
            ),
            // uppercase hex is still hex
            (
                format!("pod{}", UID.to_uppercase()),
                some(&UID.to_uppercase()),
            ),
            // QoS levels and roots
            ("kubepods.slice".into(), None),
            ("kubepods-burstable.slice".into(), None),
            ("kubepods-besteffort.slice".into(), None),
            ("kubepods".into(), None),
            ("burstable".into(), None),
            // containers inside a pod
            ("cri-containerd-0123456789abcdef.scope".into(), None),
            ("crio-0123456789abcdef.scope".into(), None),
            // wrong shapes
            (format!("kubepods-burstable-pod{UID}.slice"), None),
            (format!("kubepods-guaranteed-pod{UID_}.slice"), None),
            (format!("pod{UID_}"), None),
            (format!("kubepods-pod{UID_}.scope"), None),
            ("pod".into(), None),
            ("pod1234".into(), None),
            ("podzzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz".into(), None),
            (format!("system-pod{UID_}.slice"), None),
            (String::new(), None),
        ];
        for (input, want) in cases {
            assert_eq!(pod_uid_from_cgroup_dir(&input), want, "{input:?}");
        }
    }

    #[test]
    fn candidates_round_trip_to_the_uid() {
        for qos in [
            QosClass::Guaranteed,
            QosClass::Burstable,
            QosClass::BestEffort,
        ] {
            for dir in pod_cgroup_candidates(Path::new("/sys/fs/cgroup"), UID, qos) {
                let name = dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .expect("utf-8 name");
                assert_eq!(
                    pod_uid_from_cgroup_dir(name).as_deref(),
                    Some(UID),
                    "{}",
                    dir.display()
                );
            }
        }
    }
}
