//! `redirector` binary: parse, dispatch, map errors to exit codes.
use clap::Parser;
use redirector::{app, cli, error_chain, status, telemetry};

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    telemetry::init_logging();
    match dispatch(args.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            std::process::ExitCode::from(2)
        }
    }
}

fn dispatch(cmd: cli::Command) -> Result<(), String> {
    match cmd {
        cli::Command::Run(args) => {
            let config = args.load().map_err(|e| error_chain(&e))?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the async runtime: {e}"))?;
            rt.block_on(app::run(config, args)).map_err(|e| error_chain(&e))
        }
        cli::Command::Status(a) => {
            let s = status::collect(&a.pins.pin_root, a.admin_addr, &a.cgroup_root)
                .map_err(|e| format!("{}; is the redirector installed with this --pin-root?", error_chain(&e)))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?);
            } else {
                print!("{}", status::render_text(&s));
            }
            Ok(())
        }
        cli::Command::Uninstall(a) => {
            let removed = redirector::bpf::uninstall(&redirector::bpf::PinLayout::new(&a.pin_root))
                .map_err(|e| format!("cannot remove pins under {}: {e}", a.pin_root.display()))?;
            for p in &removed {
                println!("removed {}", p.display());
            }
            println!("uninstalled: {} pinned objects removed", removed.len());
            Ok(())
        }
    }
}
