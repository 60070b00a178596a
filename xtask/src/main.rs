//! `cargo xtask <command>`: the one entry point for building, demoing and testing.
mod bench;
mod demo;
mod deny;
mod exec;
mod fuzz;
mod setup;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (pinned nightly + rust-src, bpf-linker, Debian
    /// packages, kube-apiserver built once for the Kubernetes tests). Idempotent; `demo` and
    /// `test` run it implicitly.
    Setup,
    /// Build the daemon (and the embedded eBPF programs) and the test binaries.
    Build,
    /// Lay out a closed test network and show a pod reaching a host it has no route to.
    Demo,
    /// Everything: unit, in-process and privileged end-to-end tests, clippy.
    Test(test::TestArgs),
    /// Check dependencies with cargo-deny (advisories from $REDIRECTOR_ADVISORY_DB, bans,
    /// licenses, sources; policy in deny.toml).
    Deny,
    /// Run the fuzz targets (skip ranges, routes/config, SNI/Host sniffing) for a bounded time.
    Fuzz(fuzz::FuzzArgs),
    /// Benchmark every path side by side (direct, relay, gateway over HTTP/1.1, gateway-h2,
    /// classic redsocks+stunnel, env proxy client) in the closed test network; reports under
    /// target/bench/.
    Bench(bench::BenchArgs),
    /// The privileged capture scenario on Debian's 5.10, 6.1 and 6.12 kernels booted under
    /// qemu (`--all`: every kernel and the host's; default: the oldest supported).
    Vm(vm::VmArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build => {
            setup::run()?;
            exec::build_all()
        }
        Cmd::Demo => demo::run(),
        Cmd::Test(a) => test::run(a),
        Cmd::Deny => deny::run(),
        Cmd::Fuzz(a) => fuzz::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Vm(a) => vm::run(a),
    }
}
