//! Running commands with errors that show the command line.
use std::process::Command;

use anyhow::{Context, bail};

pub fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `c` with inherited stdio; fails with the command line on a non-zero exit.
pub fn run(c: &mut Command) -> anyhow::Result<()> {
    let line = describe(c);
    let status = c
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed with {status}");
    }
    Ok(())
}

/// Runs `c` and returns its stdout.
pub fn output(c: &mut Command) -> anyhow::Result<String> {
    let line = describe(c);
    let o = c
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !o.status.success() {
        bail!(
            "`{line}` failed with {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds every binary of the workspace (the daemon embeds the eBPF object), and
/// `redirector-next`: the daemon with the test-only `variant` datapath, whose programs differ
/// from the normal build's, the "next release" of the upgrade tests (tests/tests/lifecycle.rs).
pub fn build_all() -> anyhow::Result<()> {
    run(cargo().args([
        "build",
        "-p",
        "redirector",
        "--bin",
        "redirector",
        "--features",
        "test-datapath-variant",
    ]))?;
    let debug = target_dir().join("debug");
    std::fs::copy(debug.join("redirector"), debug.join("redirector-next"))?;
    run(cargo().args(["build", "--workspace", "--bins"]))
}

/// The workspace's target directory (`CARGO_TARGET_DIR` or `target/`).
pub fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace root")
                .join("target")
        })
}
