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

/// Builds every binary of the workspace (the daemon embeds the eBPF object).
pub fn build_all() -> anyhow::Result<()> {
    run(cargo().args(["build", "--workspace", "--bins"]))
}
