//! Configuration: one set of [`Settings`] read from a config file (YAML or TOML), the
//! `REDIRECTOR_*` environment and flags — in rising precedence — validated into one typed
//! [`Config`].
//!
//! The file uses the long flag names as keys (`gateway-url: https://…`), plus `routes`,
//! `route-presets` and `allow-dial`, which exist only in the file.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    bpf::DEFAULT_PIN_ROOT,
    policy::{self, RouteRule, RouteTable, SkipRanges},
    tunnel::pool::PoolOptions,
    tunnel::{
        self, GatewayConfig, ProxyConfig, ProxyScheme, ProxyUrl, Route, Timeouts, TunnelConfig,
    },
};

/// Every setting of `redirector run`, each optional, as given by one source (flags+env via
/// clap, or the file via serde). Unknown keys in the file are errors.
#[derive(Args, Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// bpffs directory of our pins [default: /sys/fs/bpf/redirector].
    #[arg(long, env = "REDIRECTOR_PIN_ROOT")]
    pub pin_root: Option<PathBuf>,
    /// cgroup v2 directory the hooks attach to; enabled cgroups must be below it
    /// [default: /sys/fs/cgroup].
    #[arg(long, env = "REDIRECTOR_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Enable a cgroup (and everything below it); repeatable. The non-Kubernetes mode.
    #[arg(long = "cgroup", env = "REDIRECTOR_CGROUPS", value_delimiter = ',')]
    #[serde(alias = "cgroups")]
    pub cgroup: Option<Vec<PathBuf>>,
    /// Follow pods of namespaces labeled egress-redirector.io/enabled=true (redirected) or
    /// =audit (observed, counted, not redirected) on this node (node name from NODE_NAME).
    #[arg(long, env = "REDIRECTOR_KUBERNETES", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub kubernetes: Option<bool>,
    /// Audit the --cgroup workloads instead of redirecting them: their connects go on
    /// unchanged and are counted by destination and by what enforcement would do (redirect
    /// or skip); see `redirector status`. Reloadable: switching needs no restart. In
    /// Kubernetes mode label the namespace egress-redirector.io/enabled=audit instead [false].
    #[arg(long, env = "REDIRECTOR_AUDIT", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub audit: Option<bool>,
    /// Seconds between audit summaries: one log line per audited workload that connected
    /// meanwhile, and the audit metrics refreshed [60].
    #[arg(long, env = "REDIRECTOR_AUDIT_INTERVAL")]
    pub audit_interval: Option<f64>,
    /// Kubeconfig for --kubernetes (default: in-cluster service account).
    #[arg(long, env = "REDIRECTOR_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// First port tried for the per-pod-netns listener on 127.0.0.1 and ::1; a pod that
    /// holds it gets the next free one of the 15 after it [default: 15300].
    #[arg(long, env = "REDIRECTOR_PROXY_PORT")]
    pub proxy_port: Option<u16>,
    /// Admin endpoint, loopback only [default: 127.0.0.1:15000].
    #[arg(long, env = "REDIRECTOR_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// File holding the admin token: requests that change state (`POST /logging`) must send
    /// it as `Authorization: Bearer <token>`. Without it nothing can change state [none].
    #[arg(long, env = "REDIRECTOR_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The cluster's pod and service ranges, comma-separated CIDRs: the proxy never dials
    /// them directly on a pod's behalf (list them in --proxy-skip-range too, so pods reach
    /// them themselves, under NetworkPolicy) [none].
    #[arg(long, env = "REDIRECTOR_CLUSTER_RANGES")]
    pub cluster_ranges: Option<String>,
    /// The node's network namespace, whose addresses the proxy never dials directly on a
    /// pod's behalf (besides its own namespace's) [/proc/1/ns/net].
    #[arg(long, env = "REDIRECTOR_NODE_NETNS")]
    pub node_netns: Option<PathBuf>,
    /// Kubernetes mode: answer the chained CNI plugin on this Unix socket, so a new pod's
    /// cgroup is enabled before its first process (`redirector install-cni` chains the
    /// plugin in) [none].
    #[arg(long, env = "REDIRECTOR_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,
    /// Destinations that never go through the proxy, `az connectedk8s` / NO_PROXY syntax:
    /// comma-separated IPs, CIDRs, names, `.suffix`, `*.suffix`, optional `:port`.
    #[arg(long, env = "REDIRECTOR_PROXY_SKIP_RANGE")]
    pub proxy_skip_range: Option<String>,
    /// The gateway, `https://<name>[:port]`. When set, `gateway` is the default route.
    #[arg(long, env = "REDIRECTOR_GATEWAY_URL")]
    pub gateway_url: Option<String>,
    /// Dial this host instead of the gateway URL's host (SNI and certificate name stay the
    /// URL's); like curl's --connect-to.
    #[arg(long, env = "REDIRECTOR_GATEWAY_CONNECT_TO")]
    pub gateway_connect_to: Option<String>,
    /// Extra header on the gateway CONNECT, `Name: value`; repeatable.
    #[arg(
        long = "gateway-header",
        env = "REDIRECTOR_GATEWAY_HEADERS",
        value_delimiter = '\n',
        hide_env_values = true
    )]
    #[serde(alias = "gateway-headers")]
    pub gateway_header: Option<Vec<String>>,
    /// File holding a bearer token for the gateway CONNECT (re-read for every tunnel).
    #[arg(long, env = "REDIRECTOR_GATEWAY_TOKEN_FILE")]
    pub gateway_token_file: Option<PathBuf>,
    /// Client certificate (PEM) for the gateway TLS session.
    #[arg(long, env = "REDIRECTOR_GATEWAY_CLIENT_CERT")]
    pub gateway_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --gateway-client-cert.
    #[arg(long, env = "REDIRECTOR_GATEWAY_CLIENT_KEY")]
    pub gateway_client_key: Option<PathBuf>,
    /// Enterprise proxy for HTTPS traffic and the gateway hop, `http://[user:pass@]host:port`
    /// or `https://…`.
    #[arg(long, env = "REDIRECTOR_PROXY_HTTPS", hide_env_values = true)]
    pub proxy_https: Option<String>,
    /// Enterprise proxy for plain-HTTP traffic on the `proxy` route (and for everything when
    /// --proxy-https is not set).
    #[arg(long, env = "REDIRECTOR_PROXY_HTTP", hide_env_values = true)]
    pub proxy_http: Option<String>,
    /// File with `user:password` for the enterprise proxy (e.g. a mounted Secret); replaces
    /// credentials in the proxy URL. Only when one proxy is configured (or both URLs name
    /// the same proxy); otherwise use the two settings below.
    #[arg(long, env = "REDIRECTOR_PROXY_CREDENTIALS_FILE")]
    pub proxy_credentials_file: Option<PathBuf>,
    /// File with `user:password` for --proxy-https only.
    #[arg(long, env = "REDIRECTOR_PROXY_HTTPS_CREDENTIALS_FILE")]
    pub proxy_https_credentials_file: Option<PathBuf>,
    /// File with `user:password` for --proxy-http only.
    #[arg(long, env = "REDIRECTOR_PROXY_HTTP_CREDENTIALS_FILE")]
    pub proxy_http_credentials_file: Option<PathBuf>,
    /// Send Basic credentials to an `http://` proxy, where anyone on the path can read them
    /// (a warning is logged). Without it, credentials for an http:// proxy are refused.
    #[arg(long, env = "REDIRECTOR_PROXY_ALLOW_BASIC_OVER_HTTP", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub proxy_allow_basic_over_http: Option<bool>,
    /// Extra CA bundle (PEM) trusted for an https:// enterprise proxy, besides the system
    /// roots. Not trusted for the gateway.
    #[arg(long, env = "REDIRECTOR_PROXY_CA")]
    pub proxy_ca: Option<PathBuf>,
    /// Extra CA bundle (PEM) trusted for the gateway, besides the system roots. Not trusted
    /// for the enterprise proxy.
    #[arg(long, env = "REDIRECTOR_GATEWAY_CA")]
    pub gateway_ca: Option<PathBuf>,
    /// Replaced by --proxy-ca and --gateway-ca; refused with a message saying so.
    #[arg(long, env = "REDIRECTOR_PROXY_CERT", hide = true)]
    pub proxy_cert: Option<PathBuf>,
    /// Seconds to wait for a ClientHello / HTTP request head before tunneling by IP [0.5].
    #[arg(long, env = "REDIRECTOR_SNIFF_TIMEOUT")]
    pub sniff_timeout: Option<f64>,
    /// Seconds allowed for each TCP connect, per hop [5].
    #[arg(long, env = "REDIRECTOR_CONNECT_TIMEOUT")]
    pub connect_timeout: Option<f64>,
    /// Seconds allowed for each TLS handshake, per hop [10].
    #[arg(long, env = "REDIRECTOR_TLS_TIMEOUT")]
    pub tls_timeout: Option<f64>,
    /// Seconds allowed for each CONNECT response, per hop [10].
    #[arg(long, env = "REDIRECTOR_CONNECT_RESPONSE_TIMEOUT")]
    pub connect_response_timeout: Option<f64>,
    /// Seconds SIGTERM waits for open connections [5].
    #[arg(long, env = "REDIRECTOR_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<f64>,
    /// Seconds a relayed connection may carry no byte either way before it is closed;
    /// generous, since websockets through the gateway idle for long [3600].
    #[arg(long, env = "REDIRECTOR_IDLE_TIMEOUT")]
    pub idle_timeout: Option<f64>,
    /// Connections the proxy holds at once on this node; past it new ones are refused
    /// (RST) and counted [16384].
    #[arg(long, env = "REDIRECTOR_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections one pod (one network namespace) may hold at once, so that one pod cannot
    /// take the node's egress [2048].
    #[arg(long, env = "REDIRECTOR_MAX_CONNECTIONS_PER_POD")]
    pub max_connections_per_pod: Option<usize>,
    /// MiB that data received from an HTTP/2 gateway and not yet read by pods may take,
    /// node-wide; the flow-control windows granted to the gateway are sized from it [256].
    #[arg(long, env = "REDIRECTOR_GATEWAY_H2_BUFFER")]
    pub gateway_h2_buffer: Option<u64>,
    /// Connections still being sniffed or having their tunnel set up, node-wide: what a
    /// flood of silent connections can tie up [1024].
    #[arg(long, env = "REDIRECTOR_MAX_PENDING")]
    pub max_pending: Option<usize>,
    /// Threads that run connections (the async runtime's workers), at most 256 [one per CPU
    /// the daemon may use: its CPU affinity, capped by its cgroup's CPU quota, so a
    /// container limited to 500m runs one]. Changes on restart only.
    #[arg(long, env = "REDIRECTOR_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Offer ALPN `h2` to the gateway and, when it accepts, carry tunnels as HTTP/2 CONNECT
    /// streams on shared sessions [true].
    #[arg(long, env = "REDIRECTOR_GATEWAY_HTTP2", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub gateway_http2: Option<bool>,
    /// After the handshake, hand the gateway TLS session's records to the kernel (kTLS) when
    /// it has the `tls` module and the session runs on plain TCP; otherwise, or with
    /// `false`, the redirector seals and opens them itself [true].
    #[arg(long, env = "REDIRECTOR_GATEWAY_KTLS", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub gateway_ktls: Option<bool>,
    /// Gateway sessions (proxy hop and TLS done) kept ready ahead of demand; 0 turns
    /// pre-established sessions off [2].
    #[arg(long, env = "REDIRECTOR_GATEWAY_WARM")]
    pub gateway_warm: Option<usize>,
    /// Tunnels per HTTP/2 gateway session before another session is opened [100].
    #[arg(long, env = "REDIRECTOR_GATEWAY_H2_STREAMS")]
    pub gateway_h2_streams: Option<usize>,
    /// Route table (file only): first match wins.
    #[arg(skip)]
    pub routes: Option<Vec<RawRoute>>,
    /// Built-in route tables to append after `routes` (file only), e.g. `arc-not-covered`.
    #[arg(skip)]
    pub route_presets: Option<Vec<String>>,
    /// Addresses the proxy may dial directly even though they are link-local, metadata or
    /// the node's own (file only); CIDRs or IPs.
    #[arg(skip)]
    pub allow_dial: Option<Vec<String>>,
}

pub use crate::policy::RawRoute;

impl Settings {
    /// Field by field, `higher`'s values win.
    pub fn overlay(self, higher: Settings) -> Settings {
        macro_rules! pick {
            ($($f:ident),* $(,)?) => { Settings { $($f: higher.$f.or(self.$f),)* } };
        }
        pick!(
            pin_root,
            cgroup_root,
            cgroup,
            kubernetes,
            audit,
            audit_interval,
            kubeconfig,
            proxy_port,
            admin_addr,
            admin_token_file,
            cluster_ranges,
            node_netns,
            cni_socket,
            proxy_skip_range,
            gateway_url,
            gateway_connect_to,
            gateway_header,
            gateway_token_file,
            gateway_client_cert,
            gateway_client_key,
            proxy_https,
            proxy_http,
            proxy_credentials_file,
            proxy_https_credentials_file,
            proxy_http_credentials_file,
            proxy_allow_basic_over_http,
            proxy_ca,
            gateway_ca,
            proxy_cert,
            sniff_timeout,
            connect_timeout,
            tls_timeout,
            connect_response_timeout,
            drain_timeout,
            idle_timeout,
            max_connections,
            max_connections_per_pod,
            max_pending,
            worker_threads,
            gateway_h2_buffer,
            routes,
            route_presets,
            allow_dial,
            gateway_http2,
            gateway_ktls,
            gateway_warm,
            gateway_h2_streams,
        )
    }

    /// Reads a YAML (`.yaml`, `.yml`) or TOML (`.toml`) file.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses `text` as the file `path` (its extension picks the format). The error never
    /// quotes the file: the offending line or value may hold a password (see
    /// [`parse_error_detail`]).
    pub fn parse(path: &Path, text: &str) -> Result<Settings, ConfigError> {
        let bad = |detail: String| ConfigError::ParseFile {
            path: path.to_owned(),
            detail,
        };
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => toml::from_str(text).map_err(|e| {
                // The message and the position, without the quoted line; the key of that
                // line when it is one of ours (TOML's message does not name it).
                let at = e.span().map(|s| line_column(text, s.start));
                let key = e
                    .span()
                    .and_then(|s| toml_key_at(text, s.start))
                    .map(|k| format!("{k}: "))
                    .unwrap_or_default();
                bad(key + &parse_error_detail(e.message(), at))
            }),
            Some("yaml" | "yml") => {
                if text.trim().is_empty() {
                    return Ok(Settings::default());
                }
                serde_norway::from_str(text).map_err(|e| {
                    let at = e.location().map(|l| (l.line(), l.column()));
                    let message = e.to_string();
                    // serde_norway appends the position itself; ours replaces it.
                    let message = match message.rfind(" at line ") {
                        Some(i) if at.is_some() => message[..i].to_owned(),
                        _ => message,
                    };
                    bad(parse_error_detail(&message, at))
                })
            }
            _ => Err(bad("unknown format: use a .yaml, .yml or .toml file".into())),
        }
    }
}

/// The `key` of a `key = value` line holding byte `offset`, if it looks like one of our keys.
fn toml_key_at(text: &str, offset: usize) -> Option<&str> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    let ours = !key.is_empty()
        && key.len() <= 40
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ours.then_some(key)
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// A parser's message made safe to show: values it quotes (`"…"`, and `` `…` `` unless it is
/// a lower-case key name) are replaced by `<value>`, since the value may be a password or a URL
/// holding one; the position (`at line L column C`) says where to look instead.
pub(crate) fn parse_error_detail(message: &str, at: Option<(usize, usize)>) -> String {
    // Our keys are lower-case kebab; anything else in backticks is shown as `<value>`
    // (single characters excepted: the parser's "expected `=`").
    let is_key = |s: &str| {
        s.chars().count() == 1
            || (!s.is_empty()
                && s.len() <= 40
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    };
    let mut out = String::with_capacity(message.len());
    let mut rest = message.trim();
    while let Some(open) = rest.find(['"', '`']) {
        let quote = rest[open..].chars().next().unwrap_or('"');
        let (head, tail) = rest.split_at(open);
        out.push_str(head);
        let Some(close) = tail[1..].find(quote) else {
            out.push_str("<value>");
            rest = "";
            break;
        };
        let inner = &tail[1..1 + close];
        out.push(quote);
        out.push_str(if quote == '`' && is_key(inner) {
            inner
        } else {
            "<value>"
        });
        out.push(quote);
        rest = &tail[close + 2..];
    }
    out.push_str(rest);
    let mut out = out.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some((line, column)) = at {
        out.push_str(&format!(" at line {line} column {column}"));
    }
    out
}

/// Everything `redirector run` needs, validated. Logged once at start and served at
/// `/config_dump`; secrets (proxy password, gateway header values) serialize redacted.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub pin_root: PathBuf,
    pub cgroup_root: PathBuf,
    /// Statically enabled cgroups (`--cgroup`).
    pub cgroups: Vec<PathBuf>,
    /// Kubernetes mode (`--kubernetes`).
    pub kubernetes: bool,
    /// Audit the `--cgroup` workloads instead of redirecting them (`--audit`).
    pub audit: bool,
    /// Between audit summaries (`--audit-interval`).
    #[serde(with = "crate::tunnel::secs")]
    pub audit_interval: Duration,
    pub kubeconfig: Option<PathBuf>,
    pub proxy_port: u16,
    pub admin_addr: SocketAddr,
    /// The admin token's file (its content is read per request, never kept or shown).
    pub admin_token_file: Option<PathBuf>,
    pub skip: SkipRanges,
    pub routes: RouteTable,
    /// Route for everything no rule matches: `gateway` when a gateway is configured, else
    /// `proxy` when an enterprise proxy is, else `direct`.
    pub default_route: Route,
    /// Addresses explicitly allowed for direct dialing despite the safety rules.
    pub allow_dial: Vec<IpNet>,
    /// The cluster's pod and service ranges: never dialed directly on a pod's behalf.
    pub cluster_ranges: Vec<IpNet>,
    /// The node's network namespace (its addresses are never dialed directly).
    pub node_netns: PathBuf,
    /// Where the CNI plugin's requests are answered (Kubernetes mode), if anywhere.
    pub cni_socket: Option<PathBuf>,
    /// Tunnel settings; its proxy is `--proxy-https` (falling back to `--proxy-http`).
    pub tunnel: TunnelConfig,
    /// The same with `--proxy-http` as the proxy: used for plain-HTTP connections on the
    /// `proxy` route when both proxies are set.
    pub tunnel_http: Option<TunnelConfig>,
    /// Pre-established gateway sessions.
    pub pool: PoolOptions,
    #[serde(with = "crate::tunnel::secs")]
    pub sniff_timeout: Duration,
    pub sniff_cap: usize,
    #[serde(with = "crate::tunnel::secs")]
    pub drain_timeout: Duration,
    #[serde(with = "crate::tunnel::secs")]
    pub rescan_interval: Duration,
    #[serde(with = "crate::tunnel::secs")]
    pub idle_timeout: Duration,
    /// Connections held at once: on the node, and per pod (network namespace).
    pub max_connections: usize,
    pub max_connections_per_pod: usize,
    pub max_pending: usize,
    /// `worker-threads` as given (checked); [`Config::worker_threads`] resolves the default.
    pub worker_threads_setting: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {detail}")]
    ParseFile { path: PathBuf, detail: String },
    #[error("invalid proxy-skip-range")]
    SkipRange(#[source] policy::SkipParseError),
    #[error("invalid routes[{index}]: {reason}")]
    Route { index: usize, reason: String },
    #[error("unknown route preset {0:?} (known: {known})", known = policy::PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", "))]
    Preset(String),
    #[error("invalid allow-dial entry {0:?}: expected an IP or CIDR")]
    AllowDial(String),
    #[error("invalid cluster-ranges entry {0:?}: expected an IP or CIDR")]
    ClusterRange(String),
    #[error("invalid {field}")]
    Url {
        field: &'static str,
        #[source]
        source: tunnel::UrlError,
    },
    #[error("invalid gateway-header")]
    Header(#[source] tunnel::HeaderError),
    #[error("cannot load {field}")]
    Credentials {
        field: &'static str,
        #[source]
        source: tunnel::CredentialsError,
    },
    #[error(
        "proxy-credentials-file is ambiguous: proxy-https and proxy-http are different proxies; \
         give each its own with proxy-https-credentials-file and proxy-http-credentials-file"
    )]
    SharedCredentials,
    #[error(
        "{field} would get Basic credentials over plain http://, readable by anyone on the \
         path to the proxy: use an https:// proxy, or accept this with \
         proxy-allow-basic-over-http=true"
    )]
    BasicOverHttp { field: &'static str },
    #[error(
        "proxy-cert is no longer accepted: trust is configured per hop; use proxy-ca for an \
         https:// enterprise proxy and gateway-ca for the gateway (give the gateway your \
         proxy's CA only if that proxy inspects the gateway's TLS)"
    )]
    ProxyCertSplit,
    #[error("cannot build the TLS settings")]
    Tls(#[source] crate::tls::TlsError),
    #[error("invalid gateway-connect-to {0:?}: expected a host name or IP address")]
    ConnectTo(String),
    #[error("invalid {field} {value}: must be a positive number of seconds")]
    Duration { field: &'static str, value: f64 },
    #[error("invalid {field} 0: must be at least 1")]
    Limit { field: &'static str },
    #[error("invalid worker-threads {0}: must be from 1 to {MAX_WORKER_THREADS}")]
    WorkerThreads(usize),
    #[error(
        "--audit applies to --cgroup workloads; in Kubernetes mode label the namespace egress-redirector.io/enabled=audit instead"
    )]
    AuditWithKubernetes,
    #[error("invalid proxy-port 0: pick a free port")]
    Port,
    #[error("gateway-client-cert and gateway-client-key must be given together")]
    ClientCertPair,
    #[error("invalid gateway-h2-streams 0: must be at least 1")]
    H2Streams,
}

/// The idle timeout: up to a week (websockets may idle long; that still ends a forgotten
/// tunnel).
fn idle_secs(value: Option<f64>) -> Result<Duration, ConfigError> {
    let value = value.unwrap_or(3600.0);
    if value.is_finite() && value > 0.0 && value <= 7.0 * 86_400.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(ConfigError::Duration {
            field: "idle-timeout",
            value,
        })
    }
}

/// More runtime workers than this is a typo, not a node.
pub const MAX_WORKER_THREADS: usize = 256;

fn limit_of(
    field: &'static str,
    value: Option<usize>,
    default: usize,
) -> Result<usize, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(ConfigError::Limit { field }),
        n => Ok(n),
    }
}

fn secs_of(field: &'static str, value: Option<f64>, default: f64) -> Result<Duration, ConfigError> {
    let value = value.unwrap_or(default);
    if value.is_finite() && value > 0.0 && value < 86_400.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(ConfigError::Duration { field, value })
    }
}

impl Config {
    /// Applies defaults and validates. Errors name the setting and the bad value.
    pub fn build(s: Settings) -> Result<Config, ConfigError> {
        let proxy_port = s
            .proxy_port
            .unwrap_or(redirector_common::DEFAULT_PROXY_PORT);
        if proxy_port == 0 {
            return Err(ConfigError::Port);
        }
        let skip: SkipRanges = s
            .proxy_skip_range
            .as_deref()
            .unwrap_or("")
            .parse()
            .map_err(ConfigError::SkipRange)?;
        let mut rules = Vec::new();
        for (index, r) in s.routes.iter().flatten().enumerate() {
            rules.push(
                RouteRule::from_raw(r).map_err(|reason| ConfigError::Route { index, reason })?,
            );
        }
        for name in s.route_presets.iter().flatten() {
            let preset = policy::preset(name).ok_or_else(|| ConfigError::Preset(name.clone()))?;
            rules.extend(preset);
        }
        let mut allow_dial = Vec::new();
        for a in s.allow_dial.iter().flatten() {
            let net = crate::addr::parse_ip_or_cidr(a)
                .ok_or_else(|| ConfigError::AllowDial(a.clone()))?;
            allow_dial.push(net);
        }
        let mut cluster_ranges = Vec::new();
        for a in s
            .cluster_ranges
            .iter()
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|a| !a.is_empty())
        {
            let net = crate::addr::parse_ip_or_cidr(a)
                .ok_or_else(|| ConfigError::ClusterRange(a.to_owned()))?;
            cluster_ranges.push(net);
        }
        let timeouts = Timeouts {
            connect: secs_of("connect-timeout", s.connect_timeout, 5.0)?,
            tls_handshake: secs_of("tls-timeout", s.tls_timeout, 10.0)?,
            connect_response: secs_of(
                "connect-response-timeout",
                s.connect_response_timeout,
                10.0,
            )?,
            ..Timeouts::default()
        };
        if s.proxy_cert.is_some() {
            return Err(ConfigError::ProxyCertSplit);
        }
        let http11: &[&[u8]] = &[b"http/1.1"];
        let gateway_alpn: &[&[u8]] = if s.gateway_http2.unwrap_or(true) {
            &[b"h2", b"http/1.1"]
        } else {
            http11
        };
        let pool = PoolOptions {
            warm: s.gateway_warm.unwrap_or(PoolOptions::default().warm),
            h2_streams: match s.gateway_h2_streams {
                Some(0) => return Err(ConfigError::H2Streams),
                Some(n) => n,
                None => PoolOptions::default().h2_streams,
            },
            ..PoolOptions::default()
        };
        let client_cert = match (&s.gateway_client_cert, &s.gateway_client_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => return Err(ConfigError::ClientCertPair),
        };
        let gateway = match &s.gateway_url {
            None => None,
            Some(url) => {
                let tls =
                    crate::tls::client_config(s.gateway_ca.as_deref(), client_cert, gateway_alpn)
                        .map_err(ConfigError::Tls)?;
                let mut g =
                    GatewayConfig::from_url(url, tls).map_err(|source| ConfigError::Url {
                        field: "gateway-url",
                        source,
                    })?;
                if let Some(host) = &s.gateway_connect_to {
                    crate::addr::validate_host(host)
                        .map_err(|_| ConfigError::ConnectTo(host.clone()))?;
                    g.addr_host = host.clone();
                }
                for h in s.gateway_header.iter().flatten() {
                    if !h.trim().is_empty() {
                        g.extra_headers
                            .push(tunnel::parse_header(h).map_err(ConfigError::Header)?);
                    }
                }
                g.bearer_token_file = s.gateway_token_file.clone();
                let buffer_mib = match s.gateway_h2_buffer.unwrap_or(256) {
                    0 => {
                        return Err(ConfigError::Limit {
                            field: "gateway-h2-buffer",
                        });
                    }
                    n => n,
                };
                g.h2_windows = tunnel::H2Windows::from_budget(
                    buffer_mib << 20,
                    limit_of("max-connections", s.max_connections, 16384)?,
                    pool.h2_streams,
                );
                g.kernel_tls = s.gateway_ktls.unwrap_or(true);
                Some(g)
            }
        };
        let parse_url = |field: &'static str, url: &Option<String>| {
            url.as_deref()
                .filter(|u| !u.is_empty())
                .map(|u| {
                    u.parse::<ProxyUrl>()
                        .map_err(|source| ConfigError::Url { field, source })
                })
                .transpose()
        };
        let https_url = parse_url("proxy-https", &s.proxy_https)?;
        let http_url = parse_url("proxy-http", &s.proxy_http)?;
        // One shared credentials file only when there is one proxy to give it to.
        let same_proxy =
            |a: &ProxyUrl, b: &ProxyUrl| (a.scheme, &a.host, a.port) == (b.scheme, &b.host, b.port);
        if s.proxy_credentials_file.is_some()
            && matches!((&https_url, &http_url), (Some(a), Some(b)) if !same_proxy(a, b))
        {
            return Err(ConfigError::SharedCredentials);
        }
        let allow_basic_over_http = s.proxy_allow_basic_over_http.unwrap_or(false);
        let make_proxy = |field: &'static str,
                          url: ProxyUrl,
                          own_file: &Option<PathBuf>,
                          own_field: &'static str|
         -> Result<ProxyConfig, ConfigError> {
            let tls = match url.scheme {
                ProxyScheme::Https => Some(
                    crate::tls::client_config(s.proxy_ca.as_deref(), None, http11)
                        .map_err(ConfigError::Tls)?,
                ),
                ProxyScheme::Http => None,
            };
            let mut p = ProxyConfig::new(url, tls);
            let file = match (own_file, &s.proxy_credentials_file) {
                (Some(f), _) => Some((f, own_field)),
                (None, Some(f)) => Some((f, "proxy-credentials-file")),
                (None, None) => None,
            };
            if let Some((f, file_field)) = file {
                p.credentials = Some(tunnel::load_credentials_file(f).map_err(|source| {
                    ConfigError::Credentials {
                        field: file_field,
                        source,
                    }
                })?);
            }
            if p.url.scheme == ProxyScheme::Http && p.credentials.is_some() {
                if !allow_basic_over_http {
                    return Err(ConfigError::BasicOverHttp { field });
                }
                tracing::warn!(
                    proxy = %p.url,
                    "{field}: Basic credentials go to this proxy over plain http:// (proxy-allow-basic-over-http): anyone on the path can read them"
                );
            }
            Ok(p)
        };
        let https_proxy = https_url
            .map(|u| {
                make_proxy(
                    "proxy-https",
                    u,
                    &s.proxy_https_credentials_file,
                    "proxy-https-credentials-file",
                )
            })
            .transpose()?;
        let http_proxy = http_url
            .map(|u| {
                make_proxy(
                    "proxy-http",
                    u,
                    &s.proxy_http_credentials_file,
                    "proxy-http-credentials-file",
                )
            })
            .transpose()?;
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
            (Some(_), Some(h)) => Some(TunnelConfig {
                gateway,
                proxy: Some(h),
                timeouts,
            }),
            _ => None,
        };
        Ok(Config {
            pin_root: s
                .pin_root
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT)),
            cgroup_root: s
                .cgroup_root
                .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup")),
            cgroups: s.cgroup.unwrap_or_default(),
            kubernetes: s.kubernetes.unwrap_or(false),
            audit: match (s.audit.unwrap_or(false), s.kubernetes.unwrap_or(false)) {
                (true, true) => return Err(ConfigError::AuditWithKubernetes),
                (audit, _) => audit,
            },
            audit_interval: secs_of("audit-interval", s.audit_interval, 60.0)?,
            kubeconfig: s.kubeconfig,
            proxy_port,
            admin_addr: s
                .admin_addr
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 15000))),
            admin_token_file: s.admin_token_file,
            skip,
            routes: RouteTable { rules },
            default_route,
            allow_dial,
            cluster_ranges,
            node_netns: s
                .node_netns
                .unwrap_or_else(|| PathBuf::from("/proc/1/ns/net")),
            cni_socket: s.cni_socket,
            tunnel,
            tunnel_http,
            pool,
            sniff_timeout: secs_of("sniff-timeout", s.sniff_timeout, 0.5)?,
            sniff_cap: 16 * 1024,
            drain_timeout: secs_of("drain-timeout", s.drain_timeout, 5.0)?,
            rescan_interval: Duration::from_millis(250),
            idle_timeout: idle_secs(s.idle_timeout)?,
            max_connections: limit_of("max-connections", s.max_connections, 16384)?,
            max_connections_per_pod: limit_of(
                "max-connections-per-pod",
                s.max_connections_per_pod,
                2048,
            )?,
            max_pending: limit_of("max-pending", s.max_pending, 1024)?,
            worker_threads_setting: match s.worker_threads {
                Some(1..=MAX_WORKER_THREADS) | None => s.worker_threads,
                Some(n) => return Err(ConfigError::WorkerThreads(n)),
            },
        })
    }

    /// The CIDR part of the skip ranges, which goes into the kernel LPM maps.
    pub fn skip_cidrs(&self) -> Vec<IpNet> {
        self.skip.cidrs()
    }

    /// Settings a reload cannot change (they need a restart); named for the warning.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.pin_root != new.pin_root {
            v.push("pin-root");
        }
        if self.cgroup_root != new.cgroup_root {
            v.push("cgroup-root");
        }
        if self.cgroups != new.cgroups {
            v.push("cgroup");
        }
        if self.kubernetes != new.kubernetes {
            v.push("kubernetes");
        }
        if self.proxy_port != new.proxy_port {
            v.push("proxy-port");
        }
        if self.admin_addr != new.admin_addr {
            v.push("admin-addr");
        }
        if self.worker_threads_setting != new.worker_threads_setting {
            v.push("worker-threads");
        }
        v
    }

    /// The async runtime's worker threads: `worker-threads`, or one per CPU this process may
    /// use (std's `available_parallelism`: the affinity mask, capped by a cgroup CPU quota
    /// rounded down, at least 1), with where the number came from.
    pub fn worker_threads(&self) -> (usize, &'static str) {
        match self.worker_threads_setting {
            Some(n) => (n, "worker-threads"),
            None => (
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                "cpus",
            ),
        }
    }
}

/// The TLS verification matrix: per-hop trust from these settings, run through the tunnel.
#[cfg(test)]
#[path = "config/tls_matrix.rs"]
mod tls_matrix;

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Result<Settings, ConfigError> {
        Settings::parse(Path::new("c.yaml"), text)
    }

    #[test]
    fn yaml_and_toml_read_the_same_keys() {
        let y = yaml("gateway-url: https://gw.example\nproxy-skip-range: 10.0.0.0/8,.svc\nroutes:\n  - host: '*.vault.azure.net'\n    route: proxy\n").unwrap();
        let t = Settings::parse(
            Path::new("c.toml"),
            "gateway-url = \"https://gw.example\"\nproxy-skip-range = \"10.0.0.0/8,.svc\"\n[[routes]]\nhost = \"*.vault.azure.net\"\nroute = \"proxy\"\n",
        )
        .unwrap();
        assert_eq!(y, t);
        let c = Config::build(y).unwrap();
        assert_eq!(c.default_route, Route::Gateway);
        assert_eq!(c.routes.rules.len(), 1);
    }

    #[test]
    fn precedence_file_then_env_then_flags() {
        let file = Settings {
            proxy_port: Some(1),
            gateway_url: Some("https://file".into()),
            sniff_timeout: Some(1.0),
            ..Default::default()
        };
        let env = Settings {
            proxy_port: Some(2),
            gateway_url: Some("https://env".into()),
            ..Default::default()
        };
        let flags = Settings {
            proxy_port: Some(3),
            ..Default::default()
        };
        let s = file.overlay(env).overlay(flags);
        assert_eq!(s.proxy_port, Some(3));
        assert_eq!(s.gateway_url.as_deref(), Some("https://env"));
        assert_eq!(s.sniff_timeout, Some(1.0));
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let cases: &[(&str, &[&str])] = &[
            ("gateway-url: http://gw.example", &["gateway-url"]),
            (
                "proxy-skip-range: 10.0.0.0/33",
                &["proxy-skip-range", "10.0.0.0/33"],
            ),
            (
                "routes:\n  - host: a.example\n    route: sideways\n",
                &["routes[0]", "sideways"],
            ),
            (
                "routes:\n  - route: proxy\n",
                &["routes[0]", "host or cidr"],
            ),
            ("route-presets: [nope]", &["nope"]),
            ("connect-timeout: -1", &["connect-timeout", "-1"]),
            ("allow-dial: [banana]", &["allow-dial", "banana"]),
            ("gateway-urll: https://x", &["gateway-urll"]),
            ("proxy-port: nope", &["proxy-port"]),
        ];
        for (text, needles) in cases {
            let err = yaml(text).and_then(Config::build).map(|_| ()).unwrap_err();
            let msg = crate::error_chain(&err);
            for n in *needles {
                assert!(msg.contains(n), "{text:?}: {n:?} not in {msg:?}");
            }
        }
    }

    #[test]
    fn file_and_header_errors_never_quote_a_value() {
        let pw = "Pw-unit-9f3e";
        let url = format!("http://agent:{pw}@proxy.example:3128");
        for (name, text, line) in [
            ("c.toml", format!("proxy-port = \"{url}\"\n"), 1),
            (
                "c.toml",
                format!("gateway-url = \"https://gw\"\nproxy-https = {url}\n"),
                2,
            ),
            ("c.toml", format!("kubernetes = \"{pw}\"\n"), 1),
            ("c.yaml", format!("proxy-port: {url}\n"), 1),
            (
                "c.yaml",
                format!("gateway-url: https://gw\nkubernetes: {pw}\n"),
                2,
            ),
            ("c.yaml", format!("{pw}: 1\n"), 1),
        ] {
            let e = Settings::parse(Path::new(name), &text).unwrap_err();
            let msg = crate::error_chain(&e);
            assert!(!msg.contains(pw), "{name} {text:?}: {msg}");
            // The key is still named where the parser knows it.
            if text.starts_with("proxy-port") {
                assert!(msg.contains("proxy-port: invalid type"), "{name}: {msg}");
            }
            assert!(
                msg.contains(&format!("at line {line} column ")),
                "{name}: {msg}"
            );
        }
        let e = Config::build(Settings {
            gateway_url: Some("https://gw.example".into()),
            gateway_header: Some(vec![format!("X-Key {pw}")]),
            ..Default::default()
        })
        .unwrap_err();
        let msg = crate::error_chain(&e);
        assert!(msg.contains("gateway-header") && !msg.contains(pw), "{msg}");
    }

    #[test]
    fn credentials_go_to_their_own_proxy_and_basic_over_http_needs_the_opt_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "alice:pw-a\n").expect("write");
        std::fs::write(&b, "bob:pw-b\n").expect("write");
        let two = |s: Settings| Settings {
            proxy_https: Some("https://p1.example:3128".into()),
            proxy_http: Some("http://p2.example:8080".into()),
            ..s
        };
        // One file for two different proxies: ambiguous.
        let e = Config::build(two(Settings {
            proxy_credentials_file: Some(a.clone()),
            ..Default::default()
        }))
        .unwrap_err();
        assert!(matches!(e, ConfigError::SharedCredentials), "{e:?}");
        // Each its own file; the http:// one needs the opt-in.
        let own = Settings {
            proxy_https_credentials_file: Some(a.clone()),
            proxy_http_credentials_file: Some(b.clone()),
            ..Default::default()
        };
        let e = Config::build(two(own.clone())).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::BasicOverHttp {
                    field: "proxy-http"
                }
            ),
            "{e:?}"
        );
        assert!(crate::error_chain(&e).contains("proxy-allow-basic-over-http=true"));
        let c = Config::build(two(Settings {
            proxy_allow_basic_over_http: Some(true),
            ..own
        }))
        .expect("config");
        let user = |t: &TunnelConfig| {
            let p = t.proxy.as_ref().expect("proxy");
            p.credentials.as_ref().expect("credentials").0.clone()
        };
        assert_eq!(user(&c.tunnel), "alice");
        assert_eq!(user(c.tunnel_http.as_ref().expect("http tunnel")), "bob");
        // One shared file is fine when both settings name the same proxy.
        let same = Settings {
            proxy_https: Some("https://p1.example:3128".into()),
            proxy_http: Some("https://p1.example:3128/".into()),
            proxy_credentials_file: Some(a.clone()),
            ..Default::default()
        };
        let c = Config::build(same).expect("config");
        assert_eq!(user(c.tunnel_http.as_ref().expect("http tunnel")), "alice");
        // Credentials in an http:// URL need the opt-in too; http:// without any is fine.
        let url = |u: &str| Settings {
            proxy_https: Some(u.into()),
            ..Default::default()
        };
        let e = Config::build(url("http://u:p@p.example:3128")).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::BasicOverHttp {
                    field: "proxy-https"
                }
            ),
            "{e:?}"
        );
        assert!(Config::build(url("http://p.example:3128")).is_ok());
        assert!(Config::build(url("https://u:p@p.example:3128")).is_ok());
        // proxy-cert (trusted for both hops before) is refused, naming its replacements.
        let e = Config::build(Settings {
            proxy_cert: Some("/x.pem".into()),
            ..Default::default()
        })
        .unwrap_err();
        let msg = crate::error_chain(&e);
        assert!(
            msg.contains("proxy-ca") && msg.contains("gateway-ca"),
            "{msg}"
        );
    }

    #[test]
    fn worker_threads_is_checked_changes_on_restart_only_and_defaults_to_the_cpus() {
        let build = |n: Option<usize>| {
            Config::build(Settings {
                worker_threads: n,
                ..Default::default()
            })
        };
        for bad in [0, MAX_WORKER_THREADS + 1] {
            let msg = build(Some(bad)).unwrap_err().to_string();
            assert_eq!(
                msg,
                format!("invalid worker-threads {bad}: must be from 1 to {MAX_WORKER_THREADS}")
            );
        }
        let three = build(Some(3)).expect("3 workers");
        assert_eq!(three.worker_threads(), (3, "worker-threads"));
        let file = yaml("worker-threads: 3\n").expect("file key");
        assert_eq!(file.worker_threads, Some(3));
        let auto = build(None).expect("default");
        assert_eq!(auto.restart_only_changes(&three), ["worker-threads"]);
        // The default follows the CPUs the calling thread may run on (a real affinity mask,
        // set on a thread of its own so the test runner's threads keep theirs).
        let on_one_cpu = std::thread::spawn(move || {
            let mut one = nix::sched::CpuSet::new();
            one.set(0).expect("cpu 0");
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one)
                .expect("sched_setaffinity");
            auto.worker_threads()
        })
        .join()
        .expect("thread");
        assert_eq!(on_one_cpu, (1, "cpus"));
    }

    #[test]
    fn secrets_never_reach_debug_or_the_dump() {
        let s = Settings {
            proxy_https: Some("http://u:hunter2@proxy.example:3128".into()),
            proxy_allow_basic_over_http: Some(true),
            gateway_url: Some("https://gw.example".into()),
            gateway_header: Some(vec!["X-Key: sekrit".into()]),
            ..Default::default()
        };
        let c = Config::build(s).unwrap();
        let dump = serde_json::to_string(&c).unwrap();
        for leak in ["hunter2", "sekrit"] {
            assert!(!dump.contains(leak), "dump leaks {leak}: {dump}");
            assert!(!format!("{c:?}").contains(leak), "Debug leaks {leak}");
        }
    }
}
