//! `cargo xtask test`: setup, build, every test tier, clippy, dependency checks, a short
//! run of every fuzz target.
use clap::Args;

use crate::{deny, exec, fuzz, setup, vm};

#[derive(Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and `cargo clippy -D warnings`.
    #[arg(long)]
    no_clippy: bool,
    /// Skip `cargo deny` and the short fuzz run.
    #[arg(long)]
    no_extra: bool,
    /// Skip the scenario on the oldest supported kernel in a VM (`cargo xtask vm`).
    #[arg(long)]
    no_vm: bool,
    /// Extra arguments for `cargo test` (e.g. a test name filter).
    #[arg(trailing_var_arg = true)]
    rest: Vec<String>,
}

pub fn run(a: TestArgs) -> anyhow::Result<()> {
    setup::run()?;
    // The end-to-end tests run the real binaries (daemon, target servers, simulator).
    exec::build_all()?;
    // Unit tests (a), in-process proxy tests (b) and privileged end-to-end tests (c). In CI
    // (CI=true, root) a privileged test that cannot run fails instead of skipping.
    exec::run(exec::cargo().args(["test", "--workspace"]).args(&a.rest))?;
    if !a.no_clippy {
        exec::run(exec::cargo().args(["fmt", "--all", "--check"]))?;
        exec::run(exec::cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // A filtered run (`-- --test NAME`) is a quick loop: the whole-tree checks and the VM
    // stay out.
    if !a.no_vm && a.rest.is_empty() {
        // The capture scenario on the oldest kernel we support, booted under qemu.
        vm::oldest()?;
    }
    if !a.no_extra && a.rest.is_empty() {
        // Advisories (local RustSec database), bans, licenses, sources.
        deny::run()?;
        // Every fuzz target for a few seconds (the long run is `cargo xtask fuzz`).
        fuzz::short_run()?;
    }
    println!("xtask test: all green");
    Ok(())
}
