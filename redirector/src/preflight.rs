//! Checks that run before anything is attached: each failure is one line that says what is
//! wrong and how to fix it.
use std::path::{Path, PathBuf};

use crate::netns;

/// Oldest kernel we support: `bpf_get_netns_cookie()` in sockops programs (5.15) and
/// `SO_NETNS_COOKIE` (5.14) are what the original-destination handoff is built on.
pub const MIN_KERNEL: (u32, u32) = (5, 15);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreflightError {
    #[error(
        "kernel {release} is older than {}.{}, the minimum this redirector supports \
         (it needs bpf_get_netns_cookie in sockops); run on a newer kernel",
        MIN_KERNEL.0, MIN_KERNEL.1
    )]
    KernelTooOld { release: String },
    #[error("cannot parse kernel release {release:?}")]
    KernelUnparsable { release: String },
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

/// Parses `uname -r` style releases ("6.18.44-fc-v669") and checks the minimum.
pub fn check_kernel_release(release: &str) -> Result<(u32, u32), PreflightError> {
    let unparsable = || PreflightError::KernelUnparsable {
        release: release.to_owned(),
    };
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(unparsable)?;
    let minor: u32 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(unparsable)?;
    if (major, minor) < MIN_KERNEL {
        return Err(PreflightError::KernelTooOld {
            release: release.to_owned(),
        });
    }
    Ok((major, minor))
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

/// Every check `redirector run` needs before it may attach anything.
pub fn check_run(
    pin_root: &Path,
    cgroup_root: &Path,
    cgroups: &[PathBuf],
) -> Result<(), PreflightError> {
    check_kernel_release(&kernel_release())?;
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
    fn kernel_versions() {
        for (rel, ok) in [
            ("6.18.44-fc-v669", true),
            ("5.15.0-91-generic", true),
            ("6.1.0-13-amd64", true),
            ("5.14.21", false),
            ("5.10.0-26-amd64", false),
            ("4.19.0", false),
        ] {
            assert_eq!(check_kernel_release(rel).is_ok(), ok, "{rel}");
        }
        assert!(matches!(
            check_kernel_release("garbage"),
            Err(PreflightError::KernelUnparsable { .. })
        ));
        let msg = check_kernel_release("5.10.0").unwrap_err().to_string();
        assert!(msg.contains("5.10.0") && msg.contains("5.15"), "{msg}");
    }

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
