//! `cargo xtask test`: setup, build, every test tier, clippy.
use clap::Args;

use crate::{exec, setup};

#[derive(Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and `cargo clippy -D warnings`.
    #[arg(long)]
    no_clippy: bool,
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
    println!("xtask test: all green");
    Ok(())
}
