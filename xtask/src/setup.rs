//! `cargo xtask setup`: installs what is missing, explains what it installs, idempotent.
//! The kube-apiserver of the Kubernetes end-to-end tests is built once and cached outside
//! `target/` (see [`kube_apiserver`]).
use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail};

use crate::exec;

/// Must match `EBPF_TOOLCHAIN` in redirector/build.rs.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests and the demo use, and why.
const PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "ip netns / veth / bridge for the closed test network",
    ),
    (
        "util-linux",
        "nsenter, to run the daemon in the node namespace",
    ),
    (
        "bpftool",
        "inspecting programs, attachments and pinned maps",
    ),
    ("curl", "pod clients in the end-to-end tests"),
    (
        "python3",
        "pod clients (fan-out, UDP) in the end-to-end tests",
    ),
    (
        "python3-h2",
        "hyper-h2, the independent HTTP/2 CONNECT client in the gateway simulator tests",
    ),
    ("squid", "the real enterprise proxy in the tunnel tests"),
    (
        "dnsmasq-base",
        "a real DNS server for the name-check cache test",
    ),
    ("apache2-utils", "htpasswd for Squid's basic_ncsa_auth"),
    ("openssl", "certificate checks in tests"),
    (
        "qemu-system-x86",
        "boots Debian's kernels for the capture scenario (cargo xtask vm)",
    ),
    (
        "busybox-static",
        "the tools of the VMs' initramfs (cargo xtask vm)",
    ),
    (
        "xz-utils",
        "unpacks the compressed kernel modules of trixie's kernel",
    ),
    (
        "binutils",
        "objcopy strips debug info from the binaries put in a VM",
    ),
    (
        "etcd-server",
        "etcd, the store of the real kube-apiserver in the Kubernetes end-to-end tests",
    ),
];
/// Debian packages only the one-time kube-apiserver build needs (`dpkg-dev` for
/// `apt-get source`; Debian's reflect2 1.0.2 replaces the vendored 1.0.1, see the script).
const KUBE_BUILD_PACKAGES: &[&str] = &[
    "dpkg-dev",
    "golang-go",
    "make",
    "rsync",
    "jq",
    "golang-github-modern-go-reflect2-dev",
];
/// The deb-src entry `apt-get source kubernetes` needs, written only when none exists.
const DEB_SRC_FILE: &str = "/etc/apt/sources.list.d/redirector-bookworm-src.sources";
const DEB_SRC: &str = "Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n\
Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";

pub fn run() -> anyhow::Result<()> {
    toolchain()?;
    bpf_linker()?;
    packages()?;
    kubectl()?;
    kube_apiserver()?;
    Ok(())
}

/// `kubectl` renders `deploy/` (kustomize) and applies the RBAC in the Kubernetes end-to-end
/// tests. Any kubectl on PATH will do; without one, Debian's `kubernetes-client` (1.20, whose
/// built-in kustomize renders `deploy/base` identically) is installed.
fn kubectl() -> anyhow::Result<()> {
    let runs = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if runs || installed("kubernetes-client") {
        return Ok(());
    }
    println!(
        "setup: installing Debian package kubernetes-client (kubectl: kustomize and apply in the Kubernetes tests)"
    );
    apt_install(&["kubernetes-client"])
}

/// Builds kube-apiserver once for the Kubernetes end-to-end tests and caches it outside the
/// workspace (`tests::kube_apiserver::binary()`, under `~/.cache/redirector/`), so
/// `cargo clean` keeps it. The source is Debian bookworm's `kubernetes` package (upstream
/// v1.20.2 with its vendor/ tree): no Go module proxy is needed. 7-16 minutes on two
/// cores and 1.8 GB of scratch space under /var/tmp, removed afterwards.
fn kube_apiserver() -> anyhow::Result<()> {
    let bin = tests::kube_apiserver::binary();
    if bin.is_file() {
        return Ok(());
    }
    println!(
        "setup: building kube-apiserver {} from Debian's kubernetes source package into {} \
         (the real API server of the Kubernetes end-to-end tests; 7-16 minutes depending on load, once)",
        tests::kube_apiserver::KUBE_VERSION,
        bin.display()
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!(
            "building kube-apiserver installs Debian packages and needs root; run `sudo cargo xtask setup`"
        );
    }
    let has_src = Command::new("apt-cache")
        .args(["showsrc", "kubernetes"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if !has_src {
        println!(
            "setup: adding a bookworm deb-src entry ({DEB_SRC_FILE}) for `apt-get source kubernetes`"
        );
        std::fs::write(DEB_SRC_FILE, DEB_SRC).with_context(|| format!("writing {DEB_SRC_FILE}"))?;
    }
    exec::run(Command::new("apt-get").args(["update", "-qq"]))?;
    let missing: Vec<&str> = KUBE_BUILD_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/build-kube-apiserver.sh");
    let work = PathBuf::from(format!(
        "/var/tmp/redirector-kube-build-{}",
        std::process::id()
    ));
    let started = std::time::Instant::now();
    let built = exec::run(Command::new(&script).arg(&work).arg(&bin));
    // The scratch tree (sources, generated code, Go cache) is large; the binary is all we keep.
    let _ = std::fs::remove_dir_all(&work);
    built?;
    println!(
        "setup: kube-apiserver built in {:.0?}: {}",
        started.elapsed(),
        bin.display()
    );
    Ok(())
}

fn toolchain() -> anyhow::Result<()> {
    let installed = exec::output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !installed.lines().any(|l| l.starts_with(EBPF_TOOLCHAIN)) {
        println!(
            "setup: installing Rust {EBPF_TOOLCHAIN} (builds the eBPF programs; pinned so its LLVM matches bpf-linker)"
        );
        exec::run(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let comps = exec::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))?;
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        println!(
            "setup: adding rust-src to {EBPF_TOOLCHAIN} (needed by -Z build-std=core for bpfel-unknown-none)"
        );
        exec::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ]))?;
    }
    Ok(())
}

fn llvm_major() -> anyhow::Result<String> {
    let v = exec::output(
        Command::new("rustc")
            .arg(format!("+{EBPF_TOOLCHAIN}"))
            .arg("-vV"),
    )?;
    let line = v
        .lines()
        .find(|l| l.starts_with("LLVM version:"))
        .context("rustc -vV printed no LLVM version")?;
    let ver = line.trim_start_matches("LLVM version:").trim();
    Ok(ver.split('.').next().unwrap_or_default().to_owned())
}

fn bpf_linker() -> anyhow::Result<()> {
    let major = llvm_major()?;
    let sysroot = exec::output(
        Command::new("rustc")
            .arg(format!("+{EBPF_TOOLCHAIN}"))
            .args(["--print", "sysroot"]),
    )?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    // bpf-linker links the toolchain's libLLVM dynamically; rustc provides the library path
    // when it runs the linker, so the version check does the same.
    let have = Command::new("bpf-linker")
        .arg("--version")
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .ok()
        .filter(|o| o.status.success());
    if let Some(o) = have
        && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {EBPF_TOOLCHAIN}'s own LLVM {major} (links the eBPF object; takes a few minutes once)"
    );
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let prefix = PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
        .join(".cache/redirector/llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)?;
    exec::run(
        exec::cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&(&str, &str)> = PACKAGES.iter().filter(|(p, _)| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (p, why) in &missing {
        println!("setup: installing Debian package {p} ({why})");
    }
    let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
    apt_install(&names)
}

/// `apt-get install` of `pkgs` (after an index update), as root.
fn apt_install(pkgs: &[&str]) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("installing Debian packages needs root; run `sudo cargo xtask setup`");
    }
    exec::run(Command::new("apt-get").args(["update", "-qq"]))?;
    exec::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
