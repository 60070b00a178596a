//! The node: kernel release and build options, cgroup v2, bpffs for the pins, kernel BTF.
use std::{path::Path, process::Command};

use super::Check;
use crate::{
    kernel,
    preflight::{self, PreflightError},
};

/// The kernel by what it can do: the probes `redirector run` makes at start.
pub(super) fn release() -> Check {
    let (f, _) = match kernel::probe() {
        Ok(p) => p,
        Err(e) => {
            return Check::warn(
                "kernel",
                format!(
                    "{}: cannot probe its BPF features: {}",
                    preflight::kernel_release(),
                    crate::error_chain(&e)
                ),
                vec!["run check as root (it loads small probe programs)".into()],
            );
        }
    };
    if let Err(e) = kernel::require(&f) {
        let (detail, fix) = split_fix(&e.to_string());
        return Check::fail("kernel", detail, fix);
    }
    let mut detail = format!(
        "{}: connect hooks with netns cookies, ring buffers",
        f.release
    );
    if f.netns_cookie_sockopt {
        detail += ", SO_NETNS_COOKIE";
    } else {
        detail += "; no SO_NETNS_COOKIE (pod namespaces are told apart by the netns probe)";
    }
    if f.memlock_charged {
        detail += "; BPF memory counts against RLIMIT_MEMLOCK (raised at start)";
    }
    Check::ok("kernel", detail)
}

/// The cgroup root the hooks attach to.
pub(super) fn cgroup_v2(cgroup_root: &Path) -> Check {
    match preflight::check_cgroup(cgroup_root) {
        Ok(()) => Check::ok(
            "cgroup v2",
            format!("{} is a cgroup v2 directory", cgroup_root.display()),
        ),
        Err(e) => from_preflight("cgroup v2", &e),
    }
}

/// A cgroup given with `--cgroup`: it must exist, be cgroup v2 and lie below the root.
pub(super) fn enabled_cgroup(c: &Path, cgroup_root: &Path) -> Check {
    let name = format!("cgroup {}", c.display());
    match preflight::check_cgroup(c).and_then(|()| preflight::check_below(cgroup_root, c)) {
        Ok(()) => Check::ok(
            name,
            format!("exists, cgroup v2, below {}", cgroup_root.display()),
        ),
        Err(e) => from_preflight(&name, &e),
    }
}

/// Preflight messages read "what is wrong; how to fix it": split them into the two.
fn from_preflight(name: &str, e: &PreflightError) -> Check {
    if let PreflightError::NotCgroup2(p) = e {
        return Check::fail(name, format!("{} is not on a cgroup v2 filesystem (the hooks attach to cgroup v2 only)", p.display()), vec![
            "mount cgroup v2 (`mount -t cgroup2 none <dir>`, or boot with systemd.unified_cgroup_hierarchy=1) and pass that directory as --cgroup-root".into(),
        ]);
    }
    let (detail, fix) = split_fix(&e.to_string());
    Check::fail(name, detail, fix)
}

fn split_fix(msg: &str) -> (String, Vec<String>) {
    match msg.split_once("; ") {
        Some((what, fix)) => (what.to_owned(), vec![fix.to_owned()]),
        None => (msg.to_owned(), Vec::new()),
    }
}

pub(super) fn bpffs(pin_root: &Path) -> Check {
    match preflight::check_bpffs(pin_root) {
        Ok(()) => Check::ok(
            "bpffs",
            format!(
                "{} is on a bpf filesystem (pins: {})",
                probe_dir(pin_root).display(),
                pin_root.display()
            ),
        ),
        Err(PreflightError::NoBpffs { path, mount_hint }) => {
            let mount = format!("mount -t bpf bpf {}", mount_hint.display());
            let mount = if mount_hint.exists() {
                mount
            } else {
                format!("mkdir -p {} && {mount}", mount_hint.display())
            };
            Check::fail(
                "bpffs",
                format!(
                    "{} is not on a bpf filesystem, so the pins under {} cannot be created",
                    path.display(),
                    pin_root.display()
                ),
                vec![
                    mount,
                    "or pass a --pin-root on a mounted bpffs (default /sys/fs/bpf/redirector)"
                        .into(),
                    "in Kubernetes, mount the host's /sys/fs/bpf into the pod".into(),
                ],
            )
        }
        Err(e) => from_preflight("bpffs", &e),
    }
}

fn probe_dir(pin_root: &Path) -> &Path {
    if pin_root.exists() {
        pin_root
    } else {
        pin_root.parent().unwrap_or(pin_root)
    }
}

pub(super) fn btf(path: &Path) -> Check {
    if path.exists() {
        Check::ok("btf", format!("kernel BTF at {}", path.display()))
    } else {
        Check::warn(
            "btf",
            format!("{} is missing: the kernel has no BTF, so bpftool cannot show map fields by name", path.display()),
            vec!["use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's kernel since 2021 is)".into()],
        )
    }
}

/// Where the kernel's build configuration says CONFIG_CGROUP_BPF is.
#[derive(Debug, PartialEq, Eq)]
pub enum Kconfig {
    Yes,
    No,
    Unknown,
}

pub fn kconfig_cgroup_bpf(text: &str) -> Kconfig {
    for l in text.lines().map(str::trim) {
        if l == "CONFIG_CGROUP_BPF=y" {
            return Kconfig::Yes;
        }
        if l == "# CONFIG_CGROUP_BPF is not set" || l == "CONFIG_CGROUP_BPF=n" {
            return Kconfig::No;
        }
    }
    Kconfig::Unknown
}

/// `/proc/config.gz` (through `gzip -dc`), else `/boot/config-<release>`.
fn read_kconfig() -> Option<(String, String)> {
    if Path::new("/proc/config.gz").exists()
        && let Ok(o) = Command::new("gzip")
            .args(["-dc", "/proc/config.gz"])
            .output()
        && o.status.success()
    {
        return Some((
            "/proc/config.gz".into(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ));
    }
    let boot = format!("/boot/config-{}", preflight::kernel_release());
    std::fs::read_to_string(&boot).ok().map(|t| (boot, t))
}

pub(super) fn cgroup_bpf(queried: bool) -> Check {
    let name = "cgroup bpf";
    match read_kconfig() {
        Some((src, text)) => match kconfig_cgroup_bpf(&text) {
            Kconfig::Yes => Check::ok(name, format!("CONFIG_CGROUP_BPF=y ({src})")),
            Kconfig::No => from_preflight(name, &PreflightError::NoCgroupBpf),
            Kconfig::Unknown if queried => Check::ok(name, format!("{src} does not mention CONFIG_CGROUP_BPF, but the kernel answered a cgroup program query")),
            Kconfig::Unknown => Check::warn(name, format!("{src} does not mention CONFIG_CGROUP_BPF"), vec!["make sure the kernel is built with CONFIG_CGROUP_BPF=y".into()]),
        },
        None if queried => Check::ok(name, "present (the kernel answered a cgroup program query; no kernel config to read)"),
        None => Check::warn(
            name,
            "unknown: neither /proc/config.gz nor /boot/config-<release> is readable",
            vec!["make sure the kernel is built with CONFIG_CGROUP_BPF=y (`redirector run` fails to attach otherwise)".into()],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{Level, Report, render_text};

    #[test]
    fn preflight_messages_split_into_detail_and_fix() {
        let c = bpffs(Path::new("/tmp/rdr-check-unit-nope/pins"));
        assert_eq!(c.level, Level::Fail);
        assert!(
            c.fix[0].contains("mount -t bpf bpf /tmp/rdr-check-unit-nope"),
            "{c:?}"
        );
        let c = from_preflight("cgroup v2", &PreflightError::NotCgroup2("/tmp".into()));
        assert!(
            c.detail
                .starts_with("/tmp is not on a cgroup v2 filesystem")
                && c.fix[0].contains("mount -t cgroup2"),
            "{c:?}"
        );
        assert_eq!(
            kconfig_cgroup_bpf("CONFIG_BPF=y\nCONFIG_CGROUP_BPF=y\n"),
            Kconfig::Yes
        );
        assert_eq!(
            kconfig_cgroup_bpf("# CONFIG_CGROUP_BPF is not set\n"),
            Kconfig::No
        );
        assert_eq!(kconfig_cgroup_bpf("CONFIG_BPF=y\n"), Kconfig::Unknown);
        let r = Report::new(vec![
            Check::ok("kernel", "6.1"),
            Check::fail("bpffs", "x", vec!["mount it".into()]),
        ]);
        assert!(!r.ok);
        assert_eq!(
            render_text(&r),
            "ok    kernel: 6.1\nFAIL  bpffs: x\n      fix: mount it\n2 checks: 1 ok, 0 warn, 1 FAIL\n"
        );
    }
}
