//! Command-line interface (clap). Every `run` flag can also come from `REDIRECTOR_*` env.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::{
    bpf::DEFAULT_PIN_ROOT,
    config::{Config, ConfigError, Settings},
};

#[derive(Debug, Parser)]
#[command(
    name = "redirector",
    version,
    about = "Transparent egress redirector (cgroup eBPF + tunneling proxy)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: attach the hooks, enable cgroups, proxy their connections.
    Run(RunArgs),
    /// Show what is attached, the enabled cgroups (with pod names), counters, live connections
    /// and the daemon's state. Reads the pins, so it works while the daemon is down.
    Status(StatusArgs),
    /// Why a destination from a cgroup or pod would be skipped in the kernel or routed, and
    /// the exact CONNECT lines each hop would get (secrets redacted).
    Explain(ExplainArgs),
    /// Preflight: kernel, cgroup v2, bpffs, BTF, other programs on our hooks, enterprise
    /// proxy and gateway reachability and TLS; a fix for every failure. Exit 1 on any FAIL.
    Check(CheckArgs),
    /// Detach our programs and remove our pins (other programs on the same hooks stay).
    Uninstall(PinArgs),
    /// Chain the CNI plugin into the node's network configuration, so new pods are enabled
    /// before their first process (the DaemonSet's init container runs this). The installed
    /// binary is this one; the runtime runs it with `CNI_COMMAND` set.
    InstallCni(CniArgs),
    /// Take the CNI plugin out of the node's network configuration again.
    UninstallCni(CniArgs),
}

#[derive(Debug, Args)]
pub struct CniArgs {
    /// The node's CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The node's CNI plugin directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The daemon's socket, as the plugin will reach it on the node.
    #[arg(long, default_value = crate::cni::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// bpffs directory of our pins.
    #[arg(long, env = "REDIRECTOR_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// Admin address of the daemon (to report whether it is running).
    #[arg(long, env = "REDIRECTOR_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// cgroup v2 root used to turn enabled cgroup ids back into paths.
    #[arg(long, env = "REDIRECTOR_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `redirector explain`: the same configuration sources as `run`, plus what to explain.
///
/// `--cgroup` here names the cgroup whose connection is explained (not a cgroup to enable),
/// so it is read from the command line only, never from REDIRECTOR_CGROUPS.
#[derive(Debug, Args)]
#[command(mut_arg("cgroup", |a| a
    .env(None)
    .value_delimiter(None)
    .value_name("PATH")
    .help("cgroup v2 directory the connecting process runs in (it and its ancestors are looked up in rdr_enabled)")
    .conflicts_with("pod")))]
pub struct ExplainArgs {
    /// Original destination, `IP:PORT` (`[v6]:port` for IPv6).
    #[arg(long, value_name = "IP:PORT")]
    pub dst: SocketAddr,
    /// Host name the client would send (TLS SNI or HTTP Host); without it the connection is
    /// judged as one that names no host (tunneled by IP).
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,
    /// The host name comes from a plain-HTTP `Host` header (selects --proxy-http for the
    /// `proxy` route when both proxies are set), not from TLS SNI.
    #[arg(long, requires = "host")]
    pub http: bool,
    /// Kubernetes pod `NAMESPACE/NAME`; resolved to its cgroup by asking the running daemon.
    #[arg(long, value_name = "NS/NAME")]
    pub pod: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `redirector check`: the same configuration sources as `run`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// Config file (YAML or TOML) with the same settings under their long flag names, plus
    /// `routes`, `route-presets` and `allow-dial`. Flags and REDIRECTOR_* env override it.
    /// Re-read on SIGHUP and when it changes.
    #[arg(long, env = "REDIRECTOR_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
}

impl RunArgs {
    /// File (if any), overlaid by env and flags (clap already merged those two), validated.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::build(self.merged()?)
    }

    /// The settings `load` validates: the file (if any) overlaid by env and flags.
    pub fn merged(&self) -> Result<Settings, ConfigError> {
        let file = match &self.config {
            Some(p) => Settings::from_file(p)?,
            None => Settings::default(),
        };
        Ok(file.overlay(self.settings.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let cli =
            Cli::try_parse_from(["redirector", "run"].iter().chain(args.iter()).copied()).unwrap();
        let Command::Run(r) = cli.command else {
            panic!("not run")
        };
        r
    }

    #[test]
    fn run_flags_build_a_config() {
        let c = run_args(&[
            "--cgroup",
            "/a",
            "--cgroup",
            "/b",
            "--proxy-skip-range",
            "10.0.0.0/8,.svc",
        ])
        .load()
        .unwrap();
        assert_eq!(c.cgroups.len(), 2);
        assert_eq!(c.skip_cidrs().len(), 1);
    }

    #[test]
    fn routes_default_to_what_is_configured() {
        use crate::policy::Route;
        assert_eq!(run_args(&[]).load().unwrap().default_route, Route::Direct);
        assert_eq!(
            run_args(&["--proxy-http", "http://203.0.113.50:3128"])
                .load()
                .unwrap()
                .default_route,
            Route::Proxy
        );
        let c = run_args(&[
            "--proxy-https",
            "http://u:hunter2@203.0.113.50:3128",
            "--proxy-allow-basic-over-http",
            "--gateway-url",
            "https://gw.example:443",
        ])
        .load()
        .unwrap();
        assert_eq!(c.default_route, Route::Gateway);
        let dump = serde_json::to_string(&c).unwrap();
        assert!(
            !dump.contains("hunter2"),
            "config dump leaks the proxy password: {dump}"
        );
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (flag, value, needle) in [
            ("--gateway-url", "http://gw.example", "gateway-url"),
            ("--proxy-https", "ftp://x", "proxy-https"),
            ("--proxy-skip-range", "10.0.0.0/99", "10.0.0.0/99"),
            ("--sniff-timeout", "0", "sniff-timeout"),
        ] {
            let msg = crate::error_chain(&run_args(&[flag, value]).load().unwrap_err());
            assert!(msg.contains(needle), "{flag} {value}: {msg}");
        }
    }

    #[test]
    fn explain_takes_run_flags_and_its_own_cgroup() {
        let cli = Cli::try_parse_from([
            "redirector",
            "explain",
            "--dst",
            "203.0.113.10:443",
            "--host",
            "portal.example",
            "--cgroup",
            "/sys/fs/cgroup/a,b",
            "--proxy-skip-range",
            "10.0.0.0/8",
            "--gateway-url",
            "https://gw.example",
        ])
        .unwrap();
        let Command::Explain(e) = cli.command else {
            panic!("not explain")
        };
        assert_eq!(e.dst, "203.0.113.10:443".parse().unwrap());
        // One path, commas and all: this is not the run flag's comma-separated list.
        assert_eq!(
            e.run.settings.cgroup,
            Some(vec![PathBuf::from("/sys/fs/cgroup/a,b")])
        );
        assert_eq!(e.run.load().unwrap().skip_cidrs().len(), 1);
        let both = Cli::try_parse_from([
            "redirector",
            "explain",
            "--dst",
            "1.2.3.4:1",
            "--cgroup",
            "/a",
            "--pod",
            "ns/p",
        ]);
        assert!(both.is_err(), "--cgroup and --pod together must be refused");
    }

    #[test]
    fn check_takes_run_flags() {
        let cli = Cli::try_parse_from([
            "redirector",
            "check",
            "--pin-root",
            "/tmp/x/pins",
            "--proxy-https",
            "http://203.0.113.50:3128",
        ])
        .unwrap();
        let Command::Check(c) = cli.command else {
            panic!("not check")
        };
        let config = c.run.load().unwrap();
        assert_eq!(config.pin_root, PathBuf::from("/tmp/x/pins"));
        assert!(config.tunnel.proxy.is_some());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("rdr-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.yaml");
        std::fs::write(&f, "proxy-port: 16001\nsniff-timeout: 2\n").unwrap();
        let c = run_args(&["--config", f.to_str().unwrap(), "--proxy-port", "17001"])
            .load()
            .unwrap();
        assert_eq!(c.proxy_port, 17001);
        assert_eq!(c.sniff_timeout, std::time::Duration::from_secs(2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
