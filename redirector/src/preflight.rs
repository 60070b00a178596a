//! Checks that run before anything is attached: each failure is one line that says what is
//! wrong and how to fix it.
use std::path::{Path, PathBuf};

use crate::netns;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreflightError {
    #[error(
        "{} is not on a bpf filesystem; mount one with `mount -t bpf bpf {}` \
         (in Kubernetes, mount the host's /sys/fs/bpf into the pod)",
        .path.display(), .mount_hint.display()
    )]
    NoBpffs { path: PathBuf, mount_hint: PathBuf },
    #[error(
        "cgroup {} does not exist; pass an existing cgroup v2 directory (e.g. a systemd \
         unit's cgroup under /sys/fs/cgroup)",
        .0.display()
    )]
    CgroupMissing(PathBuf),
    #[error(
        "cgroup {} is not on a cgroup v2 filesystem; the hooks need cgroup v2 \
         (mount it with `mount -t cgroup2 none <dir>` or boot with systemd.unified_cgroup_hierarchy=1)",
        .0.display()
    )]
    NotCgroup2(PathBuf),
    #[error(
        "cgroup {} is not below the attach point {}; pass --cgroup-root that contains it",
        .cgroup.display(), .root.display()
    )]
    OutsideRoot { cgroup: PathBuf, root: PathBuf },
    #[error(
        "the kernel has no cgroup BPF support (/proc/config.gz or /boot/config says \
         CONFIG_CGROUP_BPF is not set); use a kernel built with CONFIG_CGROUP_BPF=y"
    )]
    NoCgroupBpf,
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The pin root (or, before it exists, its parent) must be on bpffs.
pub fn check_bpffs(pin_root: &Path) -> Result<(), PreflightError> {
    let probe = if pin_root.exists() {
        pin_root
    } else {
        pin_root.parent().unwrap_or(pin_root)
    };
    let mount_hint = pin_root.parent().unwrap_or(pin_root).to_owned();
    match netns::is_bpffs(probe) {
        Ok(true) => Ok(()),
        _ => Err(PreflightError::NoBpffs {
            path: probe.to_owned(),
            mount_hint,
        }),
    }
}

pub fn check_cgroup(path: &Path) -> Result<(), PreflightError> {
    if !path.is_dir() {
        return Err(PreflightError::CgroupMissing(path.to_owned()));
    }
    match netns::is_cgroup2(path) {
        Ok(true) => Ok(()),
        _ => Err(PreflightError::NotCgroup2(path.to_owned())),
    }
}

pub fn check_below(root: &Path, cgroup: &Path) -> Result<(), PreflightError> {
    let outside = || PreflightError::OutsideRoot {
        cgroup: cgroup.to_owned(),
        root: root.to_owned(),
    };
    let r = root.canonicalize().map_err(|_| outside())?;
    let c = cgroup.canonicalize().map_err(|_| outside())?;
    if c.starts_with(&r) {
        Ok(())
    } else {
        Err(outside())
    }
}

/// Every check `redirector run` needs before it may attach anything. The kernel itself is
/// judged by what it can do (`kernel::probe`), not by its version number.
pub fn check_run(
    pin_root: &Path,
    cgroup_root: &Path,
    cgroups: &[PathBuf],
) -> Result<(), PreflightError> {
    check_bpffs(pin_root)?;
    check_cgroup(cgroup_root)?;
    for c in cgroups {
        check_cgroup(c)?;
        check_below(cgroup_root, c)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cgroup_is_named() {
        let e = check_cgroup(Path::new("/nonexistent/cg")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cg"));
    }

    #[test]
    fn tmp_is_not_bpffs() {
        let e = check_bpffs(Path::new("/tmp/redirector-not-bpffs")).unwrap_err();
        assert!(e.to_string().contains("mount -t bpf"), "{e}");
    }
}
