//! `redirector` binary: parse, dispatch, map errors to exit codes.
use std::process::ExitCode;

use clap::Parser;
use redirector::{check, cli, daemon, error_chain, explain, status, telemetry};

// Allocator alternatives for measurement (`cargo xtask bench --features alloc-…`); the
// default is the system allocator.
#[cfg(all(feature = "alloc-jemalloc", feature = "alloc-mimalloc"))]
compile_error!("choose one of the features alloc-jemalloc and alloc-mimalloc");
#[cfg(feature = "alloc-jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[cfg(feature = "alloc-mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    redact_panics();
    // Run by the container runtime as a CNI plugin: no arguments, CNI_COMMAND set.
    if std::env::args_os().len() == 1 && std::env::var_os("CNI_COMMAND").is_some() {
        return ExitCode::from(redirector::cni::plugin_main() as u8);
    }
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => return usage_error(e),
    };
    telemetry::init_logging();
    match dispatch(args.command) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}

/// Panic messages go through [`redirector::redact_userinfo`] like errors do: a message that
/// quotes a value (an `expect` on something parsed from a URL) must not print a password.
/// Same shape as the default hook; the backtrace follows `RUST_BACKTRACE` as usual.
fn redact_panics() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "Box<dyn Any>".into());
        let at = info.location().map(|l| l.to_string()).unwrap_or_default();
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        eprintln!(
            "thread '{name}' panicked at {at}:\n{}",
            redirector::redact_userinfo(&payload)
        );
        let bt = std::backtrace::Backtrace::capture();
        if bt.status() == std::backtrace::BacktraceStatus::Captured {
            eprintln!("stack backtrace:\n{bt}");
        }
    }));
}

/// Prints `--help`/`--version`, or a usage error with any URL userinfo in it redacted (clap
/// quotes the offending value, which may be a proxy URL given to the wrong flag).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(e.exit_code() as u8);
    }
    eprint!("{}", redirector::redact_userinfo(&e.render().to_string()));
    ExitCode::from(e.exit_code() as u8)
}

/// The daemon's runtime has `workers` worker threads; the CLI's runs on the calling thread.
fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime, String> {
    let mut b = match workers {
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_current_thread(),
    };
    b.enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn json(v: &impl serde::Serialize) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn dispatch(cmd: cli::Command) -> Result<ExitCode, String> {
    match cmd {
        cli::Command::Run(args) => {
            let config = args.load().map_err(|e| error_chain(&e))?;
            runtime(Some(config.worker_threads().0))?
                .block_on(daemon::run(config, args))
                .map_err(|e| error_chain(&e))?;
            Ok(ExitCode::SUCCESS)
        }
        cli::Command::Status(a) => {
            let s =
                status::collect(&a.pins.pin_root, a.admin_addr, &a.cgroup_root).map_err(|e| {
                    format!(
                        "{}; is the redirector installed with this --pin-root?",
                        error_chain(&e)
                    )
                })?;
            if a.json {
                json(&s)?
            } else {
                print!("{}", status::render_text(&s))
            }
            Ok(ExitCode::SUCCESS)
        }
        cli::Command::Explain(a) => {
            let e = explain::explain(&a).map_err(|e| error_chain(&e))?;
            if a.json {
                json(&e)?
            } else {
                print!("{}", explain::render_text(&e))
            }
            Ok(ExitCode::SUCCESS)
        }
        cli::Command::Check(a) => {
            // A broken configuration is one of the failures check reports, not an error.
            let (settings, config) = match a.run.merged() {
                Ok(s) => {
                    let c = redirector::config::Config::build(s.clone());
                    (s, c)
                }
                Err(e) => (a.run.settings.clone(), Err(e)),
            };
            let report = runtime(None)?.block_on(check::run(&settings, config));
            if a.json {
                json(&report)?
            } else {
                print!("{}", check::render_text(&report))
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        cli::Command::Uninstall(a) => {
            let removed = redirector::bpf::uninstall(&redirector::bpf::PinLayout::new(&a.pin_root))
                .map_err(|e| format!("cannot remove pins under {}: {e}", a.pin_root.display()))?;
            for p in &removed {
                println!("removed {}", p.display());
            }
            println!("uninstalled: {} pinned objects removed", removed.len());
            Ok(ExitCode::SUCCESS)
        }
        cli::Command::InstallCni(a) => {
            let exe = std::env::current_exe().map_err(|e| format!("own binary: {e}"))?;
            let conflist =
                redirector::cni::install(&a.cni_conf_dir, &a.cni_bin_dir, &a.socket, &exe)
                    .map_err(|e| format!("cannot chain the CNI plugin: {e}"))?;
            println!(
                "chained {} into {}",
                redirector::cni::PLUGIN_TYPE,
                conflist.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        cli::Command::UninstallCni(a) => {
            let changed = redirector::cni::uninstall(&a.cni_conf_dir, &a.cni_bin_dir)
                .map_err(|e| format!("cannot take the CNI plugin out: {e}"))?;
            for p in &changed {
                println!(
                    "removed {} from {}",
                    redirector::cni::PLUGIN_TYPE,
                    p.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
