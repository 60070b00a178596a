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
//!
//! Every value here comes from a pod object, which a tenant writes. So a UID becomes part of
//! a path only as a [`PodUid`], which holds exactly the two forms the kubelet names cgroups
//! after, and a directory found from one is used only after [`confine`] has resolved it and
//! checked that it is a pod directory inside the kubepods tree of the cgroup root.
use std::{fmt, path::Path, path::PathBuf};

/// A UID the kubelet names a pod cgroup after, in exactly the kubelet's form: an
/// API-assigned UUID (`8-4-4-4-12` hex groups) or a static pod's manifest hash (32 lowercase
/// hex digits: the kubelet's MD5 of the manifest, written into the mirror pod's
/// `kubernetes.io/config.mirror` annotation). Nothing else — no `/`, no `.`, no other
/// length — can be built, so a `PodUid` cannot step out of the directory it is joined to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodUid(String);

impl PodUid {
    /// `metadata.uid` as the API server assigns it (a UUID).
    pub fn from_api(uid: &str) -> Option<PodUid> {
        is_uuid(uid).then(|| PodUid(uid.to_owned()))
    }

    /// The mirror annotation's value: only the kubelet's own 32-lowercase-hex-digit hash.
    pub fn from_mirror_hash(hash: &str) -> Option<PodUid> {
        is_manifest_hash(hash).then(|| PodUid(hash.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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
pub fn systemd_pod_dir(uid: &PodUid, qos: QosClass) -> PathBuf {
    let escaped = uid.as_str().replace('-', "_");
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
pub fn cgroupfs_pod_dir(uid: &PodUid, qos: QosClass) -> PathBuf {
    let mut dir = PathBuf::from("kubepods");
    if let Some(level) = qos.level() {
        dir.push(level);
    }
    dir.push(format!("pod{uid}"));
    dir
}

/// Every directory the pod's cgroup may have under `cgroup_root`: systemd driver first (the
/// default of kubeadm and most distributions since Kubernetes 1.22), then cgroupfs.
pub fn pod_cgroup_candidates(cgroup_root: &Path, uid: &PodUid, qos: QosClass) -> Vec<PathBuf> {
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

/// The kubepods trees a pod cgroup may sit in, below the cgroup root (systemd, cgroupfs).
const KUBEPODS: [&str; 2] = ["kubepods.slice", "kubepods"];

/// Resolves `dir` (symlinks, `..`) and returns it only if it is a pod cgroup directory of
/// `uid` strictly inside a kubepods tree of `cgroup_root`. The last guard between a value
/// from the API and a cgroup the daemon enables: `None` for anything else, whatever the path
/// says.
pub fn confine(cgroup_root: &Path, dir: &Path, uid: &PodUid) -> Option<PathBuf> {
    let root = cgroup_root.canonicalize().ok()?;
    let real = dir.canonicalize().ok()?;
    let inside = KUBEPODS.iter().any(|tree| {
        real.strip_prefix(root.join(tree))
            .is_ok_and(|rest| rest.components().next().is_some())
    });
    let name = real.file_name()?.to_str()?;
    let same_pod =
        pod_uid_from_cgroup_dir(name).is_some_and(|u| u.eq_ignore_ascii_case(uid.as_str()));
    (inside && same_pod).then_some(real)
}

/// An API-assigned UUID: `8-4-4-4-12` hex groups.
fn is_uuid(s: &str) -> bool {
    let hex = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_hexdigit());
    let parts: Vec<&str> = s.split('-').collect();
    let lens = parts.iter().map(|p| p.len()).collect::<Vec<_>>();
    lens == [8, 4, 4, 4, 12] && parts.iter().all(|p| hex(p))
}

/// A static pod's manifest hash as the kubelet writes it: 32 lowercase hex digits.
fn is_manifest_hash(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A UID as the kubelet names cgroups after (either form; hex of either case, as found on
/// disk).
fn is_uid(s: &str) -> bool {
    is_uuid(s) || (s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
    const UID_: &str = "0a1b2c3d_4e5f_6789_abcd_ef0123456789";

    fn uid() -> PodUid {
        PodUid::from_api(UID).expect("valid uid")
    }

    #[test]
    fn pod_uids_take_only_the_kubelet_forms() {
        let hash = "6d3f0e9a2b1c4d5e8f7a6b5c4d3e2f1a";
        assert!(PodUid::from_api(UID).is_some());
        assert!(PodUid::from_mirror_hash(hash).is_some());
        let bad_api = [
            "",
            hash,
            "../../..",
            &format!("{UID}/../../.."),
            &format!("{UID}/"),
            "0a1b2c3d-4e5f-6789-abcd-ef012345678",
            "0a1b2c3d-4e5f-6789-abcd-ef0123456789-",
            "0a1b2c3d-4e5f-6789-abcd_ef0123456789",
            "0a1b2c3g-4e5f-6789-abcd-ef0123456789",
        ];
        for v in bad_api {
            assert_eq!(PodUid::from_api(v), None, "{v:?}");
        }
        let upper = hash.to_uppercase();
        let long = "0".repeat(256 * 1024);
        let bad_hash = [
            "",
            UID,
            upper.as_str(),
            &hash[..31],
            "6d3f0e9a2b1c4d5e8f7a6b5c4d3e2f1a0",
            "6d3f0e9a2b1c4d5e8f7a6b5c4d3e2f1/",
            "..",
            ".",
            long.as_str(),
            "6d3f0e9a2b1c4d5e8f7a6b5c4d3e2f1\u{0}",
        ];
        for v in bad_hash {
            assert_eq!(PodUid::from_mirror_hash(v), None, "{v:?}");
        }
    }

    #[test]
    fn confine_keeps_only_the_pods_own_directory_inside_kubepods() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        let own = r.join(format!("kubepods/burstable/pod{UID}"));
        let other_uid = "11111111-2222-4333-8444-555555555555";
        let other = r.join(format!("kubepods/burstable/pod{other_uid}"));
        let systemd = r.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
        ));
        for d in [
            &own,
            &other,
            &systemd,
            &r.join("system.slice/containerd.service"),
        ] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::os::unix::fs::symlink(r.join("system.slice"), r.join(format!("kubepods/pod{UID}")))
            .expect("symlink");
        let real = |p: &Path| p.canonicalize().expect("canonical");
        assert_eq!(confine(r, &own, &uid()), Some(real(&own)));
        assert_eq!(confine(r, &systemd, &uid()), Some(real(&systemd)));
        let refused = [
            own.join("../../.."),
            own.join("../../../system.slice/containerd.service"),
            other.clone(),
            r.join("kubepods"),
            r.join("kubepods/burstable"),
            r.join(format!("kubepods/pod{UID}")),
            r.join("missing"),
        ];
        for p in refused {
            assert_eq!(confine(r, &p, &uid()), None, "{}", p.display());
        }
    }

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
                pod_cgroup_candidates(root, &uid(), qos),
                vec![root.join(&systemd), root.join(&cgroupfs)],
                "{qos}"
            );
        }
    }

    #[test]
    fn candidates_follow_the_given_root() {
        let got = pod_cgroup_candidates(Path::new("/tmp/x/cg"), &uid(), QosClass::Guaranteed);
        assert_eq!(
            got[1],
            PathBuf::from(format!("/tmp/x/cg/kubepods/pod{UID}"))
        );
    }

    #[test]
    fn static_pod_hash_uid() {
        let hash = "6d3f0e9a2b1c4d5e8f7a6b5c4d3e2f1a";
        assert_eq!(
            systemd_pod_dir(
                &PodUid::from_mirror_hash(hash).expect("hash"),
                QosClass::Burstable
            ),
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
            for dir in pod_cgroup_candidates(Path::new("/sys/fs/cgroup"), &uid(), qos) {
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
