//! `cargo xtask setup`: installs what is missing, explains what it installs, idempotent.
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
];

pub fn run() -> anyhow::Result<()> {
    toolchain()?;
    bpf_linker()?;
    packages()?;
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
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("installing Debian packages needs root; run `sudo cargo xtask setup`");
    }
    exec::run(Command::new("apt-get").args(["update", "-qq"]))?;
    exec::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(missing.iter().map(|(p, _)| *p))
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
