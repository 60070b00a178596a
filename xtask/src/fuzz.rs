//! `cargo xtask fuzz [--seconds N]`: runs every fuzz target (cargo-fuzz, libFuzzer) for a
//! bounded time with the pinned nightly. Installs cargo-fuzz when missing. `cargo xtask test`
//! runs every target briefly ([`short_run`]).
//!
//! Each run starts from the checked-in seeds (`fuzz/corpus/<target>/`, read only) and keeps
//! what it finds in `target/fuzz-corpus/<target>/`, so later runs continue from there and
//! the checked-in corpus only changes on purpose. Crashes land in `fuzz/artifacts/<target>/`.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use clap::Args;

use crate::{exec, setup};

#[derive(Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Only this target (see `fuzz/Cargo.toml`).
    #[arg(long)]
    target: Option<String>,
}

pub const TARGETS: [&str; 7] = [
    "skip_ranges",
    "routes",
    "sniff",
    "connect_response",
    "h2_connect",
    "config",
    "secret_files",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if exec::output(Command::new("cargo").args(["fuzz", "--version"])).is_err() {
        println!("fuzz: installing cargo-fuzz (runs libFuzzer targets)");
        exec::run(exec::cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

fn cargo_fuzz() -> Command {
    let mut c = Command::new("cargo");
    c.arg(format!("+{}", setup::EBPF_TOOLCHAIN))
        .arg("fuzz")
        .current_dir(root().join("fuzz"));
    c
}

/// Builds every target once (`cargo fuzz run` would otherwise check the build per target).
fn build() -> anyhow::Result<()> {
    exec::run(cargo_fuzz().arg("build"))
}

/// One target for `seconds`; returns libFuzzer's execution count. libFuzzer's output is
/// shown only when the target fails.
fn run_target(target: &str, seconds: u64) -> anyhow::Result<u64> {
    let root = root();
    let found = root.join("target").join("fuzz-corpus").join(target);
    std::fs::create_dir_all(&found)?;
    let seeds = root.join("fuzz").join("corpus").join(target);
    let mut c = cargo_fuzz();
    c.args(["run", target]).arg(&found);
    if seeds.is_dir() {
        c.arg(&seeds);
    }
    c.args(["--", "-timeout=10"])
        .arg(format!("-max_total_time={seconds}"));
    let line = exec::describe(&c);
    let out = c
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
        bail!("fuzz target {target} failed (`{line}`; crash input in fuzz/artifacts/{target}/)");
    }
    executions(&log).with_context(|| format!("no execution count in the output of {target}"))
}

/// The execution count from libFuzzer's last words: `Done 123 runs in 10 second(s)`.
fn executions(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        l.strip_prefix("Done ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

fn run_all(targets: &[&str], seconds: u64) -> anyhow::Result<()> {
    ensure_cargo_fuzz()?;
    build()?;
    let mut counts = Vec::new();
    for t in targets {
        println!("fuzz: {t} for {seconds} s");
        let n = run_target(t, seconds)?;
        println!("fuzz: {t}: {n} executions, no crash");
        counts.push((t, n));
    }
    println!("fuzz: executions per target ({seconds} s each):");
    for (t, n) in counts {
        println!("  {t:<18} {n:>12}");
    }
    Ok(())
}

pub fn run(a: FuzzArgs) -> anyhow::Result<()> {
    let targets: Vec<&str> = TARGETS
        .iter()
        .copied()
        .filter(|t| a.target.as_deref().is_none_or(|only| only == *t))
        .collect();
    if targets.is_empty() {
        bail!("no fuzz target named {:?} (targets: {TARGETS:?})", a.target);
    }
    // The pinned nightly.
    setup::run()?;
    run_all(&targets, a.seconds)
}

/// Seconds per target in `cargo xtask test`.
const SHORT_SECONDS: u64 = 12;

/// Every target for a few seconds: part of `cargo xtask test` (which has run setup).
pub fn short_run() -> anyhow::Result<()> {
    run_all(&TARGETS, SHORT_SECONDS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn execution_count_from_libfuzzer_output() {
        let log = "#65536\tpulse  cov: 10 ft: 12 corp: 3/9b exec/s: 21845 rss: 40Mb\n\
                   #131072\tDONE   cov: 10 ft: 12 corp: 3/9b lim: 4 exec/s: 43690 rss: 40Mb\n\
                   Done 131072 runs in 3 second(s)\n";
        assert_eq!(super::executions(log), Some(131_072));
        assert_eq!(super::executions("INFO: Seed: 1\n"), None);
    }
}
