//! Tunnel settings: proxy URLs and credentials, the gateway and proxy hops, timeouts, and the
//! `Secret` that keeps credentials out of every log, error and dump.
use std::{
    fmt, io,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use rustls::ClientConfig;
use serde::{Serialize, Serializer};

/// A credential that never shows in `Debug`, `Display` or serialized output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyScheme {
    Http,
    Https,
}

/// An enterprise proxy, `http(s)://[user:pass@]host[:port][/]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProxyUrl {
    pub scheme: ProxyScheme,
    /// Canonical host (see [`crate::addr::validate_host`]); IPv6 without brackets.
    pub host: String,
    pub port: u16,
    /// Percent-decoded `user:pass` from the URL, if any.
    pub credentials: Option<(String, Secret)>,
}

impl ProxyUrl {
    /// `host:port`, IPv6 bracketed.
    pub fn authority(&self) -> String {
        crate::addr::authority(&self.host, self.port)
    }
}

/// Without the credentials.
impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            ProxyScheme::Http => "http",
            ProxyScheme::Https => "https",
        };
        write!(f, "{scheme}://{}", self.authority())
    }
}

/// A URL we cannot use. Never echoes the input: it may hold a password.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} url: {reason}")]
pub struct UrlError {
    pub what: &'static str,
    pub reason: &'static str,
}

/// The parts of an `http(s)://` URL with no path, query or fragment.
struct UrlParts<'a> {
    https: bool,
    userinfo: Option<&'a str>,
    host: String,
    port: u16,
}

/// Splits `http(s)://[userinfo@]host[:port][/]`. The host, port and the rest are parsed by
/// `hyper::Uri`; the scheme and the userinfo are taken off first, for a clear message and
/// because a password may hold characters (`@`) a URI parser refuses unencoded.
fn split_url<'a>(what: &'static str, s: &'a str) -> Result<UrlParts<'a>, UrlError> {
    let err = |reason| UrlError { what, reason };
    let (scheme, rest) = s
        .split_once("://")
        .ok_or(err("missing scheme (http:// or https://)"))?;
    let https = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        _ => return Err(err("the scheme must be http or https")),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if !(tail.is_empty() || tail == "/") {
        return Err(err("a path, query or fragment is not allowed"));
    }
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if hostport.is_empty() || hostport.starts_with(':') {
        return Err(err("the host is missing"));
    }
    if hostport.ends_with(':') {
        return Err(err("the port must be a number from 1 to 65535"));
    }
    let uri: hyper::Uri = format!("http://{hostport}/")
        .parse()
        .map_err(|_| err("the host or port is not valid"))?;
    let parsed = uri.authority().ok_or(err("the host is missing"))?;
    let host = parsed.host();
    let host = crate::addr::validate_host(host)
        .map_err(|_| err("the host is not a valid DNS name or IP address"))?;
    // The port as written: `Authority::port` drops one that does not fit a u16.
    let port_text = match parsed.as_str().strip_prefix(parsed.host()) {
        Some("") => None,
        Some(rest) => Some(
            rest.strip_prefix(':')
                .ok_or(err("unexpected text after the host"))?,
        ),
        None => return Err(err("the host or port is not valid")),
    };
    let port = match port_text {
        None if https => 443,
        None => 80,
        Some(p) => crate::addr::parse_port(p)
            .map_err(|_| err("the port must be a number from 1 to 65535"))?,
    };
    Ok(UrlParts {
        https,
        userinfo,
        host,
        port,
    })
}

impl FromStr for ProxyUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| UrlError {
            what: "proxy",
            reason,
        };
        let parts = split_url("proxy", s.trim())?;
        let credentials = match parts.userinfo {
            None => None,
            Some(info) => {
                let (user, pass) = info.split_once(':').unwrap_or((info, ""));
                let decode = |x: &str| {
                    percent_encoding::percent_decode_str(x)
                        .decode_utf8()
                        .map(|c| c.into_owned())
                        .map_err(|_| {
                            err("the credentials are not valid UTF-8 after percent-decoding")
                        })
                };
                let user = decode(user)?;
                if user.is_empty() {
                    return Err(err("the user name is empty"));
                }
                if user.contains(':') {
                    return Err(err("the user name contains ':'"));
                }
                Some((user, Secret(decode(pass)?)))
            }
        };
        let scheme = if parts.https {
            ProxyScheme::Https
        } else {
            ProxyScheme::Http
        };
        Ok(ProxyUrl {
            scheme,
            host: parts.host,
            port: parts.port,
            credentials,
        })
    }
}

/// A credentials or token file we cannot use. Never includes the file's content.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} {reason}", path.display())]
    Format { path: PathBuf, reason: &'static str },
}

/// Reads proxy credentials from a file holding a single `user:pass` line.
pub fn load_credentials_file(path: &Path) -> Result<(String, Secret), CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_credentials(&text).map_err(|reason| CredentialsError::Format {
        path: path.to_owned(),
        reason,
    })
}

pub(crate) fn parse_credentials(text: &str) -> Result<(String, Secret), &'static str> {
    let line = text.trim();
    if line.is_empty() {
        return Err("is empty");
    }
    if line.contains(['\r', '\n']) {
        return Err("must hold a single user:pass line");
    }
    if line.chars().any(char::is_control) {
        return Err("contains control characters");
    }
    let (user, pass) = line
        .split_once(':')
        .ok_or("must hold user:pass (no ':' found)")?;
    if user.is_empty() {
        return Err("has an empty user name");
    }
    Ok((user.to_owned(), Secret(pass.to_owned())))
}

/// Reads a bearer token; called at each tunnel open so a rotated token takes effect.
pub(crate) async fn read_token(path: &Path) -> Result<Secret, CredentialsError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })?;
    parse_token(&text).map_err(|reason| CredentialsError::Format {
        path: path.to_owned(),
        reason,
    })
}

/// The token in a token file's text: one word of visible ASCII, surrounding whitespace
/// ignored.
pub(crate) fn parse_token(text: &str) -> Result<Secret, &'static str> {
    let token = text.trim();
    if token.is_empty() {
        return Err("is empty");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must hold one token of visible ASCII characters");
    }
    Ok(Secret(token.to_owned()))
}

/// The gateway hop. `tls` offers ALPN `http/1.1`, with `h2` first when HTTP/2 CONNECT is
/// allowed (`gateway-http2`).
#[derive(Clone)]
pub struct GatewayConfig {
    /// Host to connect (and to CONNECT to through the enterprise proxy).
    pub addr_host: String,
    pub port: u16,
    /// SNI and the name the certificate must match.
    pub server_name: String,
    /// Sent on the inner CONNECT; values are treated as secrets in logs.
    pub extra_headers: Vec<(String, String)>,
    /// `Authorization: Bearer <file content>` on the inner CONNECT, read at each open.
    pub bearer_token_file: Option<PathBuf>,
    pub tls: Arc<ClientConfig>,
    /// HTTP/2 flow-control windows granted to the gateway.
    pub h2_windows: H2Windows,
    /// Move the session's records into the kernel (kTLS) when it can take them.
    pub kernel_tls: bool,
}

/// The HTTP/2 flow-control windows we grant the gateway. A window is credit, not memory:
/// but what the gateway sends within it and a pod does not read stays buffered here, so the
/// windows bound that memory. Sized from a node-wide budget by [`H2Windows::from_budget`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct H2Windows {
    /// Per stream (one tunnel).
    pub stream: u32,
    /// Per session (all its streams together).
    pub session: u32,
    /// What one stream may queue for sending before a write waits (hyper's default is
    /// 1 MiB: a thousand tunnels whose peer stopped reading would queue a GiB).
    pub send_buf: u32,
}

impl Default for H2Windows {
    /// 4 MiB per stream, 32 MiB per session: one stream is not limited by round trips.
    fn default() -> Self {
        H2Windows {
            stream: 4 << 20,
            session: 32 << 20,
            send_buf: 1 << 20,
        }
    }
}

impl H2Windows {
    /// Windows such that every session the node can have open at once, full to its window
    /// with data no pod reads, stays within `budget` bytes: at most `max_tunnels` tunnels,
    /// `streams_per_session` to a session. Never above [`H2Windows::default`], never below
    /// 64 KiB per session (the protocol's initial window) and the stream window never above
    /// the session's. Each tunnel's send queue gets its share of the same budget (at least
    /// 16 KiB).
    pub fn from_budget(budget: u64, max_tunnels: usize, streams_per_session: usize) -> Self {
        const FLOOR: u64 = 64 << 10;
        let d = H2Windows::default();
        let sessions = max_tunnels.div_ceil(streams_per_session.max(1)).max(1) as u64;
        let session = (budget / sessions).clamp(FLOOR, u64::from(d.session));
        let stream = session.min(u64::from(d.stream));
        // Sends queue per stream: the same budget spread over every tunnel.
        let tunnels = max_tunnels.max(1) as u64;
        let send_buf = (budget / tunnels).clamp(16 << 10, u64::from(d.send_buf));
        H2Windows {
            stream: stream as u32,
            session: session as u32,
            send_buf: send_buf as u32,
        }
    }
}

impl GatewayConfig {
    /// From `--gateway-url https://name[:port]`: SNI is the URL's host.
    pub fn from_url(url: &str, tls: Arc<ClientConfig>) -> Result<Self, UrlError> {
        let parts = split_url("gateway", url.trim())?;
        let err = |reason| UrlError {
            what: "gateway",
            reason,
        };
        if !parts.https {
            return Err(err("the gateway is reached over TLS: use https://"));
        }
        if parts.userinfo.is_some() {
            return Err(err(
                "credentials in the URL are not supported (use a bearer token file)",
            ));
        }
        Ok(GatewayConfig {
            server_name: parts.host.clone(),
            addr_host: parts.host,
            port: parts.port,
            extra_headers: Vec::new(),
            bearer_token_file: None,
            tls,
            h2_windows: H2Windows::default(),
            kernel_tls: true,
        })
    }

    /// `host:port` the enterprise proxy is asked to CONNECT to.
    pub fn authority(&self) -> String {
        crate::addr::authority(&self.addr_host, self.port)
    }
}

/// A `Name: value` header for the gateway CONNECT. Names the header only when its name is a
/// valid token: otherwise the "name" may be the whole line, value (a secret) included.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid header{}: {reason}", name.as_ref().map(|n| format!(" {n:?}")).unwrap_or_default())]
pub struct HeaderError {
    pub name: Option<String>,
    pub reason: &'static str,
}

/// Parses `Name: value`, refusing names we set ourselves and anything that could split
/// the request.
pub fn parse_header(s: &str) -> Result<(String, String), HeaderError> {
    let (name, value) = s.split_once(':').unwrap_or((s, ""));
    let (name, value) = (name.trim(), value.trim());
    check_header(name, value)?;
    Ok((name.to_owned(), value.to_owned()))
}

pub(crate) fn check_header(name: &str, value: &str) -> Result<(), HeaderError> {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(tchar) {
        return Err(HeaderError {
            name: None,
            reason: "the name must be an HTTP token (write `Name: value`)",
        });
    }
    let err = |reason| HeaderError {
        name: Some(name.chars().take(64).collect()),
        reason,
    };
    if [
        "host",
        "content-length",
        "transfer-encoding",
        "proxy-authorization",
        "connection",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n))
    {
        return Err(err(
            "this header is set by the redirector or not allowed on CONNECT",
        ));
    }
    if !value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
    {
        return Err(err("the value contains control characters"));
    }
    // HTTP/1.1 drops them (RFC 9110 §5.5), HTTP/2 sends them: the value would depend on
    // the protocol.
    if value.starts_with([' ', '\t']) || value.ends_with([' ', '\t']) {
        return Err(err("the value has leading or trailing whitespace"));
    }
    Ok(())
}

/// The enterprise proxy hop.
#[derive(Clone)]
pub struct ProxyConfig {
    pub url: ProxyUrl,
    /// Required for `https://` proxies.
    pub tls: Option<Arc<ClientConfig>>,
    /// Sent as `Proxy-Authorization: Basic`, to this hop only. This field is what is used:
    /// [`ProxyConfig::new`] fills it from the URL; a credentials file replaces it.
    pub credentials: Option<(String, Secret)>,
}

impl ProxyConfig {
    pub fn new(url: ProxyUrl, tls: Option<Arc<ClientConfig>>) -> Self {
        let credentials = url.credentials.clone();
        Self {
            url,
            tls,
            credentials,
        }
    }
}

/// Per-step time limits and TCP keepalive of upstream sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// Name resolution plus TCP connect, per hop.
    #[serde(with = "secs")]
    pub connect: Duration,
    #[serde(with = "secs")]
    pub tls_handshake: Duration,
    /// Sending a CONNECT and receiving its response head, per hop.
    #[serde(with = "secs")]
    pub connect_response: Duration,
    /// Idle time before the first keepalive probe: below common NAT idle timeouts (Azure: 4 min).
    #[serde(with = "secs")]
    pub keepalive_idle: Duration,
    #[serde(with = "secs")]
    pub keepalive_interval: Duration,
    pub keepalive_retries: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            tls_handshake: Duration::from_secs(10),
            connect_response: Duration::from_secs(10),
            keepalive_idle: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(15),
            keepalive_retries: 4,
        }
    }
}

pub(crate) mod secs {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// Everything [`open`] needs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TunnelConfig {
    pub gateway: Option<GatewayConfig>,
    pub proxy: Option<ProxyConfig>,
    pub timeouts: Timeouts,
}

/// What `Debug` and `/config_dump` show: no secrets, TLS settings as ALPN only.
mod redacted {
    use std::path::Path;

    use serde::Serialize;

    use super::{ProxyUrl, Secret};

    #[derive(Debug, Serialize)]
    pub(super) struct GatewayConfig<'a> {
        pub addr_host: &'a str,
        pub port: u16,
        pub server_name: &'a str,
        pub extra_headers: Vec<(&'a str, Secret)>,
        pub bearer_token_file: Option<&'a Path>,
        pub alpn: Vec<String>,
        pub h2_windows: super::H2Windows,
        pub kernel_tls: bool,
    }

    #[derive(Debug, Serialize)]
    pub(super) struct ProxyConfig<'a> {
        pub url: &'a ProxyUrl,
        pub alpn: Option<Vec<String>>,
        pub credentials: Option<(&'a str, &'a Secret)>,
    }
}

fn alpn_of(tls: &ClientConfig) -> Vec<String> {
    tls.alpn_protocols
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect()
}

impl GatewayConfig {
    fn redacted(&self) -> redacted::GatewayConfig<'_> {
        redacted::GatewayConfig {
            addr_host: &self.addr_host,
            port: self.port,
            server_name: &self.server_name,
            extra_headers: self
                .extra_headers
                .iter()
                .map(|(n, _)| (n.as_str(), Secret::new("")))
                .collect(),
            bearer_token_file: self.bearer_token_file.as_deref(),
            alpn: alpn_of(&self.tls),
            h2_windows: self.h2_windows,
            kernel_tls: self.kernel_tls,
        }
    }
}

impl fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.redacted().fmt(f)
    }
}

impl Serialize for GatewayConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.redacted().serialize(s)
    }
}

impl ProxyConfig {
    fn redacted(&self) -> redacted::ProxyConfig<'_> {
        redacted::ProxyConfig {
            url: &self.url,
            alpn: self.tls.as_deref().map(alpn_of),
            credentials: self.credentials.as_ref().map(|(u, p)| (u.as_str(), p)),
        }
    }
}

impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.redacted().fmt(f)
    }
}

impl Serialize for ProxyConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.redacted().serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::H2Windows;

    const MIB: u64 = 1 << 20;

    #[test]
    fn h2_windows_from_the_memory_budget() {
        // (budget, max tunnels, streams per session) -> (stream, session)
        let cases = [
            // Defaults: 256 MiB over 164 sessions: about 1.56 MiB each.
            ((256 * MIB, 16384, 100), (1_636_801, 1_636_801)),
            // A small node: the budget allows more than the defaults, which cap it.
            ((256 * MIB, 100, 100), (4 << 20, 32 << 20)),
            ((64 * MIB, 400, 100), (4 << 20, 16 << 20)),
            // A tiny budget: never below the protocol's initial 64 KiB.
            ((MIB, 100_000, 10), (64 << 10, 64 << 10)),
            // Zero streams per session is treated as one.
            ((32 * MIB, 32, 0), (1 << 20, 1 << 20)),
        ];
        for ((budget, tunnels, streams), (stream, session)) in cases {
            let w = H2Windows::from_budget(budget, tunnels, streams);
            let send_share = (budget / tunnels.max(1) as u64).clamp(16 << 10, 1 << 20);
            assert_eq!(u64::from(w.send_buf), send_share, "{budget} {tunnels} send");
            assert_eq!(
                (w.stream, w.session),
                (stream, session),
                "{budget} {tunnels} {streams}"
            );
            let sessions = tunnels.div_ceil(streams.max(1)) as u64;
            assert!(
                sessions * u64::from(w.session) <= budget.max(sessions * (64 << 10)),
                "the budget holds"
            );
        }
    }
}
