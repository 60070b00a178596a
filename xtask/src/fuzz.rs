//! `cargo xtask fuzz [--seconds N]`: runs every fuzz target (cargo-fuzz, libFuzzer) for a
//! bounded time with the pinned nightly. Installs cargo-fuzz when missing.
use std::process::Command;

use clap::Args;

use crate::{exec, setup};

#[derive(Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Only this target (skip_ranges, routes, sniff).
    #[arg(long)]
    target: Option<String>,
}

const TARGETS: [&str; 3] = ["skip_ranges", "routes", "sniff"];

pub fn run(a: FuzzArgs) -> anyhow::Result<()> {
    setup::run()?;
    if exec::output(Command::new("cargo").args(["fuzz", "--version"])).is_err() {
        println!("fuzz: installing cargo-fuzz (runs libFuzzer targets)");
        exec::run(exec::cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for t in TARGETS
        .iter()
        .filter(|t| a.target.as_deref().is_none_or(|only| only == **t))
    {
        println!("fuzz: {t} for {} s", a.seconds);
        exec::run(
            Command::new("cargo")
                .arg(format!("+{}", setup::EBPF_TOOLCHAIN))
                .args(["fuzz", "run", t, "--"])
                .arg(format!("-max_total_time={}", a.seconds))
                .current_dir(root.join("fuzz")),
        )?;
    }
    println!("fuzz: no crash in {} target(s)", TARGETS.len());
    Ok(())
}
