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
    /// The gateway, `https://<name>[:port]` (e.g. https://contoso.gw.arc.azure.com). When
    /// set, `gateway` is the default route.
    #[arg(long, env = "REDIRECTOR_GATEWAY_URL")]
    pub gateway_url: Option<String>,
    /// Dial this host instead of the gateway URL's host (SNI and certificate name stay the
    /// URL's); like curl's --connect-to.
    #[arg(long, env = "REDIRECTOR_GATEWAY_CONNECT_TO")]
    pub gateway_connect_to: Option<String>,
    /// Extra header on the gateway CONNECT, `Name: value`; repeatable.
    #[arg(long = "gateway-header", env = "REDIRECTOR_GATEWAY_HEADERS", value_delimiter = '\n')]
    pub gateway_headers: Vec<String>,
    /// File holding a bearer token for the gateway CONNECT (re-read for every tunnel).
    #[arg(long, env = "REDIRECTOR_GATEWAY_TOKEN_FILE")]
    pub gateway_token_file: Option<PathBuf>,
    /// Client certificate (PEM) for the gateway TLS session.
    #[arg(long, env = "REDIRECTOR_GATEWAY_CLIENT_CERT", requires = "gateway_client_key")]
    pub gateway_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --gateway-client-cert.
    #[arg(long, env = "REDIRECTOR_GATEWAY_CLIENT_KEY", requires = "gateway_client_cert")]
    pub gateway_client_key: Option<PathBuf>,
    /// Enterprise proxy for HTTPS traffic and the gateway hop, `http://[user:pass@]host:port`
    /// or `https://…`.
    #[arg(long, env = "REDIRECTOR_PROXY_HTTPS")]
    pub proxy_https: Option<String>,
    /// Enterprise proxy for plain-HTTP traffic on the `proxy` route (and for everything when
    /// --proxy-https is not set).
    #[arg(long, env = "REDIRECTOR_PROXY_HTTP")]
    pub proxy_http: Option<String>,
    /// File with `user:password` for the enterprise proxy (e.g. a mounted Secret); replaces
    /// credentials in the proxy URLs.
    #[arg(long, env = "REDIRECTOR_PROXY_CREDENTIALS_FILE")]
    pub proxy_credentials_file: Option<PathBuf>,
    /// Extra CA bundle (PEM) trusted for the gateway and an https:// proxy, added to the
    /// system roots.
    #[arg(long, env = "REDIRECTOR_PROXY_CERT")]
    pub proxy_cert: Option<PathBuf>,
    /// Seconds to wait for a TLS ClientHello or HTTP request head before tunneling by IP.
    #[arg(long, env = "REDIRECTOR_SNIFF_TIMEOUT", default_value_t = 0.5)]
    pub sniff_timeout: f64,
    /// Seconds allowed for each TCP connect (per hop).
    #[arg(long, env = "REDIRECTOR_CONNECT_TIMEOUT", default_value_t = 5.0)]
    pub connect_timeout: f64,
    /// Seconds allowed for each TLS handshake (per hop).
    #[arg(long, env = "REDIRECTOR_TLS_TIMEOUT", default_value_t = 10.0)]
    pub tls_timeout: f64,
    /// Seconds allowed for each CONNECT response (per hop).
    #[arg(long, env = "REDIRECTOR_CONNECT_RESPONSE_TIMEOUT", default_value_t = 10.0)]
    pub connect_response_timeout: f64,
    /// Seconds SIGTERM waits for open connections.
    #[arg(long, env = "REDIRECTOR_DRAIN_TIMEOUT", default_value_t = 5.0)]
    pub drain_timeout: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid --proxy-skip-range")]
    SkipRange(#[source] crate::policy::SkipParseError),
    #[error("invalid --{field}")]
    Url {
        field: &'static str,
        #[source]
        source: crate::tunnel::UrlError,
    },
    #[error("invalid --gateway-header")]
    Header(#[source] crate::tunnel::HeaderError),
    #[error("cannot load --proxy-credentials-file")]
    Credentials(#[source] crate::tunnel::CredentialsError),
    #[error("cannot build the TLS settings")]
    Tls(#[source] crate::tls::TlsError),
    #[error("invalid --gateway-connect-to {0:?}: expected a host name or IP address")]
    ConnectTo(String),
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
        use crate::tunnel::{self, GatewayConfig, ProxyConfig, ProxyScheme, ProxyUrl, Route, Timeouts, TunnelConfig};
        if self.proxy_port == 0 {
            return Err(ConfigError::Port);
        }
        let skip: SkipRanges = self.proxy_skip_range.parse().map_err(ConfigError::SkipRange)?;
        let timeouts = Timeouts {
            connect: secs("connect-timeout", self.connect_timeout)?,
            tls_handshake: secs("tls-timeout", self.tls_timeout)?,
            connect_response: secs("connect-response-timeout", self.connect_response_timeout)?,
            ..Timeouts::default()
        };
        let extra_ca = self.proxy_cert.as_deref();
        let http11: &[&[u8]] = &[b"http/1.1"];
        let gateway = match &self.gateway_url {
            None => None,
            Some(url) => {
                let client = self.gateway_client_cert.as_deref().zip(self.gateway_client_key.as_deref());
                let tls = crate::tls::client_config(extra_ca, client, http11).map_err(ConfigError::Tls)?;
                let mut g = GatewayConfig::from_url(url, tls)
                    .map_err(|source| ConfigError::Url { field: "gateway-url", source })?;
                if let Some(host) = &self.gateway_connect_to {
                    crate::sniff::validate_host(host).map_err(|_| ConfigError::ConnectTo(host.clone()))?;
                    g.addr_host = host.clone();
                }
                for h in &self.gateway_headers {
                    if !h.trim().is_empty() {
                        g.extra_headers.push(tunnel::parse_header(h).map_err(ConfigError::Header)?);
                    }
                }
                g.bearer_token_file = self.gateway_token_file.clone();
                Some(g)
            }
        };
        let credentials = match &self.proxy_credentials_file {
            Some(p) => Some(tunnel::load_credentials_file(p).map_err(ConfigError::Credentials)?),
            None => None,
        };
        let make_proxy = |field: &'static str, url: &str| -> Result<ProxyConfig, ConfigError> {
            let url: ProxyUrl = url.parse().map_err(|source| ConfigError::Url { field, source })?;
            let tls = match url.scheme {
                ProxyScheme::Https => Some(crate::tls::client_config(extra_ca, None, http11).map_err(ConfigError::Tls)?),
                ProxyScheme::Http => None,
            };
            let mut p = ProxyConfig::new(url, tls);
            if credentials.is_some() {
                p.credentials = credentials.clone();
            }
            Ok(p)
        };
        let https_proxy = self.proxy_https.as_deref().map(|u| make_proxy("proxy-https", u)).transpose()?;
        let http_proxy = self.proxy_http.as_deref().map(|u| make_proxy("proxy-http", u)).transpose()?;
        let default_route = if gateway.is_some() {
            Route::Gateway
        } else if https_proxy.is_some() || http_proxy.is_some() {
            Route::Proxy
        } else {
            Route::Direct
        };
        let tunnel = TunnelConfig {
            gateway: gateway.clone(),
            proxy: https_proxy.clone().or_else(|| http_proxy.clone()),
            timeouts,
        };
        let tunnel_http = match (&https_proxy, http_proxy) {
            (Some(_), Some(h)) => Some(TunnelConfig { gateway, proxy: Some(h), timeouts }),
            _ => None,
        };
        Ok(Config {
            pin_root: self.pins.pin_root,
            cgroup_root: self.cgroup_root,
            cgroups: self.cgroups,
            proxy_port: self.proxy_port,
            admin_addr: self.admin_addr,
            skip,
            default_route,
            tunnel,
            tunnel_http,
            sniff_timeout: secs("sniff-timeout", self.sniff_timeout)?,
            sniff_cap: 16 * 1024,
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
    fn routes_default_to_what_is_configured() {
        use crate::tunnel::Route;
        let cfg = |extra: &[&str]| {
            let mut args = vec!["run"];
            args.extend_from_slice(extra);
            let Command::Run(r) = parse(&args).command else { panic!("not run") };
            r.into_config().unwrap()
        };
        assert_eq!(cfg(&[]).default_route, Route::Direct);
        assert_eq!(cfg(&["--proxy-http", "http://203.0.113.50:3128"]).default_route, Route::Proxy);
        let c = cfg(&["--proxy-https", "http://u:hunter2@203.0.113.50:3128", "--gateway-url", "https://gw.example:443"]);
        assert_eq!(c.default_route, Route::Gateway);
        let dump = serde_json::to_string(&c).unwrap();
        assert!(!dump.contains("hunter2"), "config dump leaks the proxy password: {dump}");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn bad_urls_name_the_flag() {
        for (flag, value) in [("--gateway-url", "http://gw.example"), ("--proxy-https", "ftp://x"), ("--gateway-url", "https://")] {
            let Command::Run(r) = parse(&["run", flag, value]).command else { panic!("not run") };
            let msg = crate::error_chain(&r.into_config().unwrap_err());
            assert!(msg.contains(flag), "{flag} {value}: {msg}");
        }
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
