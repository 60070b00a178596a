//! The daemon's typed configuration, built from the command line (and `REDIRECTOR_*` env).
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::Serialize;

use crate::policy::SkipRanges;

/// Everything `redirector run` needs, validated. Logged once at start and served at
/// `/config_dump`; it holds no secret today, and any future secret field must serialize
/// redacted.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// bpffs directory for our pins (one per daemon instance).
    pub pin_root: PathBuf,
    /// cgroup v2 directory the hooks attach to; enabled cgroups must be below it.
    pub cgroup_root: PathBuf,
    /// Statically enabled cgroups (`--cgroup`), the non-Kubernetes mode.
    pub cgroups: Vec<PathBuf>,
    /// Port of the per-netns listener on 127.0.0.1 and ::1.
    pub proxy_port: u16,
    /// Admin endpoint (`/metrics`, `/healthz`, `/readyz`, `/config_dump`); loopback only.
    pub admin_addr: SocketAddr,
    /// Skip ranges (`--proxy-skip-range`).
    pub skip: SkipRanges,
    /// Upper bound for the TCP connect to an upstream.
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
    /// How long SIGTERM waits for open connections before exiting.
    #[serde(with = "secs")]
    pub drain_timeout: Duration,
    /// How often the static mode rescans `--cgroup` directories for new network namespaces.
    #[serde(with = "secs")]
    pub rescan_interval: Duration,
}

impl Config {
    /// The CIDR part of the skip ranges, which goes into the kernel LPM maps.
    pub fn skip_cidrs(&self) -> Vec<IpNet> {
        self.skip.cidrs()
    }
}

mod secs {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}
