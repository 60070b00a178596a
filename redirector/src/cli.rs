//! Command-line interface (clap). Every `run` flag can also come from `REDIRECTOR_*` env.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{bpf::DEFAULT_PIN_ROOT, config::Config, policy::SkipRanges};

#[derive(Debug, Parser)]
#[command(name = "redirector", version, about = "Transparent egress redirector (cgroup eBPF + tunneling proxy)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: attach the hooks, enable cgroups, proxy their connections.
    Run(RunArgs),
    /// Show what is attached and enabled, counters and the daemon's state (reads the pins).
    Status(StatusArgs),
    /// Detach our programs and remove our pins (other programs on the same hooks stay).
    Uninstall(PinArgs),
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

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// cgroup v2 directory the hooks attach to; enabled cgroups must be below it.
    #[arg(long, env = "REDIRECTOR_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Enable a cgroup (and everything below it); repeatable.
    #[arg(long = "cgroup", env = "REDIRECTOR_CGROUPS", value_delimiter = ',')]
    pub cgroups: Vec<PathBuf>,
    /// Port of the per-pod-netns listener on 127.0.0.1 and ::1.
    #[arg(long, env = "REDIRECTOR_PROXY_PORT", default_value_t = redirector_common::DEFAULT_PROXY_PORT)]
    pub proxy_port: u16,
    /// Admin endpoint (loopback only).
    #[arg(long, env = "REDIRECTOR_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Destinations that never go through the proxy, `az connectedk8s` syntax:
    /// comma-separated IPs, CIDRs and names (`10.0.0.0/16,kubernetes.default.svc,.svc`).
    #[arg(long, env = "REDIRECTOR_PROXY_SKIP_RANGE", default_value = "")]
    pub proxy_skip_range: String,
    /// Seconds allowed for the TCP connect to an upstream.
    #[arg(long, env = "REDIRECTOR_CONNECT_TIMEOUT", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Seconds SIGTERM waits for open connections.
    #[arg(long, env = "REDIRECTOR_DRAIN_TIMEOUT", default_value_t = 5.0)]
    pub drain_timeout: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid --proxy-skip-range")]
    SkipRange(#[source] crate::policy::SkipParseError),
    #[error("invalid --{field} {value}: must be a positive number of seconds")]
    Duration { field: &'static str, value: f64 },
    #[error("invalid --proxy-port 0: pick a free port")]
    Port,
}

fn secs(field: &'static str, value: f64) -> Result<Duration, ConfigError> {
    if value.is_finite() && value > 0.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(ConfigError::Duration { field, value })
    }
}

impl RunArgs {
    pub fn into_config(self) -> Result<Config, ConfigError> {
        if self.proxy_port == 0 {
            return Err(ConfigError::Port);
        }
        let skip: SkipRanges = self.proxy_skip_range.parse().map_err(ConfigError::SkipRange)?;
        Ok(Config {
            pin_root: self.pins.pin_root,
            cgroup_root: self.cgroup_root,
            cgroups: self.cgroups,
            proxy_port: self.proxy_port,
            admin_addr: self.admin_addr,
            skip,
            connect_timeout: secs("connect-timeout", self.connect_timeout)?,
            drain_timeout: secs("drain-timeout", self.drain_timeout)?,
            rescan_interval: Duration::from_millis(250),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("redirector").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn run_flags_build_a_config() {
        let Command::Run(r) = parse(&["run", "--cgroup", "/a", "--cgroup", "/b", "--proxy-skip-range", "10.0.0.0/8,.svc"]).command else {
            panic!("not run")
        };
        let c = r.into_config().unwrap();
        assert_eq!(c.cgroups.len(), 2);
        assert_eq!(c.skip_cidrs().len(), 1);
    }

    #[test]
    fn bad_skip_range_names_the_flag_and_entry() {
        let Command::Run(r) = parse(&["run", "--proxy-skip-range", "10.0.0.0/99"]).command else {
            panic!("not run")
        };
        let e = r.into_config().unwrap_err();
        let msg = crate::error_chain(&e);
        assert!(msg.contains("--proxy-skip-range") && msg.contains("10.0.0.0/99"), "{msg}");
    }
}
