//! The daemon's typed configuration, built from the command line (and `REDIRECTOR_*` env).
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::Serialize;

use crate::{
    policy::SkipRanges,
    tunnel::{Route, TunnelConfig},
};

/// Everything `redirector run` needs, validated. Logged once at start and served at
/// `/config_dump`; secrets (proxy password, gateway header values) serialize redacted.
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
    /// Route for everything no rule matches: `gateway` when a gateway is configured, else
    /// `proxy` when an enterprise proxy is, else `direct`.
    pub default_route: Route,
    /// Tunnel settings; its proxy is `--proxy-https` (falling back to `--proxy-http`).
    pub tunnel: TunnelConfig,
    /// The same with `--proxy-http` as the proxy: used for plain-HTTP connections on the
    /// `proxy` route when both proxies are set.
    pub tunnel_http: Option<TunnelConfig>,
    /// How long to wait for a ClientHello / HTTP request head before tunneling by IP.
    #[serde(with = "secs")]
    pub sniff_timeout: Duration,
    /// Most bytes read while looking for a host name.
    pub sniff_cap: usize,
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
