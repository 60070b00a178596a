//! Upstream tunnels: direct TCP, enterprise-proxy CONNECT, and nested CONNECT inside TLS to the gateway.
use std::{
    fmt, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    str::FromStr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use base64::Engine as _;
use rustls::{ClientConfig, pki_types::ServerName};
use serde::{Serialize, Serializer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpStream, ToSocketAddrs},
    time::timeout,
};
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::sniff;

pub const HOP_TARGET: &str = "target";
pub const HOP_PROXY: &str = "proxy";
pub const HOP_GATEWAY: &str = "gateway";

/// Upper bound for a CONNECT response head (status line plus headers).
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
const MAX_RESPONSE_HEADERS: usize = 64;

/// How a connection leaves the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Straight to the original destination.
    Direct,
    /// `CONNECT host:port` through the enterprise proxy.
    Proxy,
    /// (Enterprise proxy,) TLS to the gateway, `CONNECT host:port` inside it.
    Gateway,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Proxy => "proxy",
            Route::Gateway => "gateway",
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    /// Canonical host (see [`sniff::validate_host`]); IPv6 without brackets.
    pub host: String,
    pub port: u16,
    /// Percent-decoded `user:pass` from the URL, if any.
    pub credentials: Option<(String, Secret)>,
}

impl ProxyUrl {
    /// `host:port`, IPv6 bracketed.
    pub fn authority(&self) -> String {
        sniff::authority(&self.host, self.port)
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

fn split_url<'a>(what: &'static str, s: &'a str) -> Result<UrlParts<'a>, UrlError> {
    let err = |reason| UrlError { what, reason };
    let (scheme, rest) = s.split_once("://").ok_or(err("missing scheme (http:// or https://)"))?;
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
    let (host, port) = if hostport.starts_with('[') {
        let close = hostport.find(']').ok_or(err("unclosed '[' in the host"))?;
        let (host, after) = hostport.split_at(close + 1);
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or(err("unexpected text after ']'"))?)),
        }
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(err("the host is missing"));
    }
    let host = sniff::validate_host(host)
        .map_err(|_| err("the host is not a valid DNS name or IP address"))?;
    let port = match port {
        None if https => 443,
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|n| *n != 0 && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
            .ok_or(err("the port must be a number from 1 to 65535"))?,
    };
    Ok(UrlParts { https, userinfo, host, port })
}

impl FromStr for ProxyUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| UrlError { what: "proxy", reason };
        let parts = split_url("proxy", s.trim())?;
        let credentials = match parts.userinfo {
            None => None,
            Some(info) => {
                let (user, pass) = info.split_once(':').unwrap_or((info, ""));
                let decode = |x: &str| {
                    percent_encoding::percent_decode_str(x)
                        .decode_utf8()
                        .map(|c| c.into_owned())
                        .map_err(|_| err("the credentials are not valid UTF-8 after percent-decoding"))
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
        let scheme = if parts.https { ProxyScheme::Https } else { ProxyScheme::Http };
        Ok(ProxyUrl { scheme, host: parts.host, port: parts.port, credentials })
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
    let text = std::fs::read_to_string(path)
        .map_err(|source| CredentialsError::Read { path: path.to_owned(), source })?;
    parse_credentials(&text).map_err(|reason| CredentialsError::Format { path: path.to_owned(), reason })
}

fn parse_credentials(text: &str) -> Result<(String, Secret), &'static str> {
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
    let (user, pass) = line.split_once(':').ok_or("must hold user:pass (no ':' found)")?;
    if user.is_empty() {
        return Err("has an empty user name");
    }
    Ok((user.to_owned(), Secret(pass.to_owned())))
}

/// Reads a bearer token; called at each tunnel open so a rotated token takes effect.
async fn read_token(path: &Path) -> Result<Secret, CredentialsError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| CredentialsError::Read { path: path.to_owned(), source })?;
    let token = text.trim();
    let format = |reason| CredentialsError::Format { path: path.to_owned(), reason };
    if token.is_empty() {
        return Err(format("is empty"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format("must hold one token of visible ASCII characters"));
    }
    Ok(Secret(token.to_owned()))
}

/// The gateway hop. `tls` should offer ALPN `http/1.1`.
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
}

impl GatewayConfig {
    /// From `--gateway-url https://name[:port]`: SNI is the URL's host.
    pub fn from_url(url: &str, tls: Arc<ClientConfig>) -> Result<Self, UrlError> {
        let parts = split_url("gateway", url.trim())?;
        let err = |reason| UrlError { what: "gateway", reason };
        if !parts.https {
            return Err(err("the gateway is reached over TLS: use https://"));
        }
        if parts.userinfo.is_some() {
            return Err(err("credentials in the URL are not supported (use a bearer token file)"));
        }
        Ok(GatewayConfig {
            server_name: parts.host.clone(),
            addr_host: parts.host,
            port: parts.port,
            extra_headers: Vec::new(),
            bearer_token_file: None,
            tls,
        })
    }

    /// `host:port` the enterprise proxy is asked to CONNECT to.
    pub fn authority(&self) -> String {
        sniff::authority(&self.addr_host, self.port)
    }
}

/// A `Name: value` header for the gateway CONNECT.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid header {name:?}: {reason}")]
pub struct HeaderError {
    pub name: String,
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

fn check_header(name: &str, value: &str) -> Result<(), HeaderError> {
    let err = |reason| HeaderError { name: name.chars().take(64).collect(), reason };
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(tchar) {
        return Err(err("the name must be an HTTP token"));
    }
    if ["host", "content-length", "transfer-encoding", "proxy-authorization", "connection"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
    {
        return Err(err("this header is set by the redirector or not allowed on CONNECT"));
    }
    if !value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80) {
        return Err(err("the value contains control characters"));
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
        Self { url, tls, credentials }
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

mod secs {
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
    }

    #[derive(Debug, Serialize)]
    pub(super) struct ProxyConfig<'a> {
        pub url: &'a ProxyUrl,
        pub alpn: Option<Vec<String>>,
        pub credentials: Option<(&'a str, &'a Secret)>,
    }
}

fn alpn_of(tls: &ClientConfig) -> Vec<String> {
    tls.alpn_protocols.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect()
}

impl GatewayConfig {
    fn redacted(&self) -> redacted::GatewayConfig<'_> {
        redacted::GatewayConfig {
            addr_host: &self.addr_host,
            port: self.port,
            server_name: &self.server_name,
            extra_headers: self.extra_headers.iter().map(|(n, _)| (n.as_str(), Secret::new(""))).collect(),
            bearer_token_file: self.bearer_token_file.as_deref(),
            alpn: alpn_of(&self.tls),
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

/// The status one CONNECT hop answered, for the audit line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct HopStatus {
    pub hop: &'static str,
    pub status: u16,
}

impl fmt::Display for HopStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.hop, self.status)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot connect to the {hop} at {addr}")]
    Connect {
        hop: &'static str,
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("timed out connecting to the {hop} at {addr}")]
    ConnectTimeout { hop: &'static str, addr: String },
    #[error("tls handshake with the {hop} failed")]
    Tls {
        hop: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("timed out in the tls handshake with the {hop}")]
    TlsTimeout { hop: &'static str },
    #[error("the {hop} refused the CONNECT: {status} {reason}")]
    Refused { hop: &'static str, status: u16, reason: String },
    #[error("timed out waiting for the {hop} to answer the CONNECT")]
    ResponseTimeout { hop: &'static str },
    #[error("malformed CONNECT response from the {hop}: {detail}")]
    Malformed { hop: &'static str, detail: &'static str },
    #[error("the {hop} closed the connection before answering the CONNECT")]
    Closed { hop: &'static str },
    #[error("connection to the {hop} failed during the CONNECT")]
    Io {
        hop: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot load credentials for the {hop}")]
    Credentials {
        hop: &'static str,
        #[source]
        source: CredentialsError,
    },
    #[error("cannot build the CONNECT to the {hop}: {detail}")]
    Request { hop: &'static str, detail: &'static str },
    #[error("route {route} is used but no {hop} is configured")]
    NotConfigured { route: Route, hop: &'static str },
}

impl TunnelError {
    /// The hop that failed: `target`, `proxy` or `gateway`.
    pub fn hop(&self) -> &'static str {
        use TunnelError::*;
        match self {
            Connect { hop, .. }
            | ConnectTimeout { hop, .. }
            | Tls { hop, .. }
            | TlsTimeout { hop }
            | Refused { hop, .. }
            | ResponseTimeout { hop }
            | Malformed { hop, .. }
            | Closed { hop }
            | Io { hop, .. }
            | Credentials { hop, .. }
            | Request { hop, .. }
            | NotConfigured { hop, .. } => hop,
        }
    }

    /// A short label for metrics and audit lines; see [`TunnelError::status`] for `refused`.
    pub fn kind(&self) -> &'static str {
        match self {
            TunnelError::Connect { .. } => "connect",
            TunnelError::ConnectTimeout { .. } => "connect_timeout",
            TunnelError::Tls { .. } => "tls",
            TunnelError::TlsTimeout { .. } => "tls_timeout",
            TunnelError::Refused { .. } => "refused",
            TunnelError::ResponseTimeout { .. } => "response_timeout",
            TunnelError::Malformed { .. } => "malformed_response",
            TunnelError::Closed { .. } => "closed",
            TunnelError::Io { .. } => "io",
            TunnelError::Credentials { .. } => "credentials",
            TunnelError::Request { .. } => "bad_request",
            TunnelError::NotConfigured { .. } => "not_configured",
        }
    }

    /// The HTTP status of a refused CONNECT.
    pub fn status(&self) -> Option<u16> {
        match self {
            TunnelError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// `upstream` when a peer or the network failed, `internal` when our own configuration did.
    pub fn side(&self) -> &'static str {
        match self {
            TunnelError::Credentials { .. }
            | TunnelError::Request { .. }
            | TunnelError::NotConfigured { .. } => "internal",
            _ => "upstream",
        }
    }
}

/// Any byte stream a tunnel layer can sit on.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open tunnel: write the client's bytes, read the target's.
pub struct Upstream {
    io: Box<dyn Io>,
    /// The CONNECT status of each hop, in order (empty for `direct`).
    pub hops: Vec<HopStatus>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream").field("hops", &self.hops).finish_non_exhaustive()
    }
}

impl AsyncRead for Upstream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

/// A stream whose first reads return bytes already read past a CONNECT response head.
struct Replay<S> {
    pending: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Replay<S> {
    fn new(pending: Vec<u8>, inner: S) -> Self {
        Self { pending, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.pending.len() {
            let n = buf.remaining().min(this.pending.len() - this.pos);
            buf.put_slice(&this.pending[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.pending.len() {
                this.pending = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Opens a tunnel to `target_authority` (`host:port`, from [`sniff::authority`]) along
/// `route`. `target_addr` is used by `direct` only. Returns once every CONNECT hop has
/// answered 2xx, so no client byte is sent before the whole path is up.
pub async fn open(
    cfg: &TunnelConfig,
    route: Route,
    target_authority: &str,
    target_addr: SocketAddr,
) -> Result<Upstream, TunnelError> {
    let t = &cfg.timeouts;
    match route {
        Route::Direct => {
            let tcp = tcp_connect(HOP_TARGET, target_addr, target_addr.to_string(), t).await?;
            Ok(Upstream { io: Box::new(tcp), hops: Vec::new() })
        }
        Route::Proxy => {
            let proxy = cfg.proxy.as_ref().ok_or(TunnelError::NotConfigured { route, hop: HOP_PROXY })?;
            check_authority(HOP_PROXY, target_authority)?;
            let mut hops = Vec::with_capacity(1);
            let io = through_proxy(proxy, target_authority, t, &mut hops).await?;
            Ok(Upstream { io, hops })
        }
        Route::Gateway => {
            let gw = cfg.gateway.as_ref().ok_or(TunnelError::NotConfigured { route, hop: HOP_GATEWAY })?;
            check_authority(HOP_GATEWAY, target_authority)?;
            let server_name = server_name(HOP_GATEWAY, &gw.server_name)?;
            // Everything local that can fail does so before we touch the network.
            let mut headers = Vec::with_capacity(gw.extra_headers.len() + 1);
            for (name, value) in &gw.extra_headers {
                check_header(name, value)
                    .map_err(|_| TunnelError::Request { hop: HOP_GATEWAY, detail: "invalid extra header" })?;
                headers.push((name.as_str(), Secret::new(value.as_str())));
            }
            if let Some(path) = &gw.bearer_token_file {
                let token = read_token(path)
                    .await
                    .map_err(|source| TunnelError::Credentials { hop: HOP_GATEWAY, source })?;
                headers.push(("Authorization", Secret(format!("Bearer {}", token.expose()))));
            }

            let mut hops = Vec::with_capacity(2);
            let io: Box<dyn Io> = match &cfg.proxy {
                Some(proxy) => through_proxy(proxy, &gw.authority(), t, &mut hops).await?,
                None => {
                    let addr = gw.authority();
                    Box::new(tcp_connect(HOP_GATEWAY, (gw.addr_host.as_str(), gw.port), addr, t).await?)
                }
            };
            let tls = tls_connect(HOP_GATEWAY, &gw.tls, server_name, io, t).await?;
            let (io, status) = connect_hop(HOP_GATEWAY, tls, target_authority, &headers, t).await?;
            hops.push(HopStatus { hop: HOP_GATEWAY, status });
            Ok(Upstream { io, hops })
        }
    }
}

/// TCP (plus TLS for `https://`) to the enterprise proxy and `CONNECT authority`.
async fn through_proxy(
    proxy: &ProxyConfig,
    authority: &str,
    t: &Timeouts,
    hops: &mut Vec<HopStatus>,
) -> Result<Box<dyn Io>, TunnelError> {
    let tls = match proxy.url.scheme {
        ProxyScheme::Http => None,
        ProxyScheme::Https => {
            let config = proxy.tls.as_ref().ok_or(TunnelError::Request {
                hop: HOP_PROXY,
                detail: "an https:// proxy needs a tls configuration",
            })?;
            Some((config, server_name(HOP_PROXY, &proxy.url.host)?))
        }
    };
    let mut headers = Vec::with_capacity(1);
    if let Some((user, pass)) = &proxy.credentials {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", pass.expose()));
        headers.push(("Proxy-Authorization", Secret(format!("Basic {basic}"))));
    }
    let addr = (proxy.url.host.as_str(), proxy.url.port);
    let tcp = tcp_connect(HOP_PROXY, addr, proxy.url.authority(), t).await?;
    let stream: Box<dyn Io> = match tls {
        None => Box::new(tcp),
        Some((config, name)) => Box::new(tls_connect(HOP_PROXY, config, name, tcp, t).await?),
    };
    let (io, status) = connect_hop(HOP_PROXY, stream, authority, &headers, t).await?;
    hops.push(HopStatus { hop: HOP_PROXY, status });
    Ok(io)
}

/// Refuses anything but `name:port` / `ip:port` / `[v6]:port`, so a bad caller cannot
/// inject request lines.
fn check_authority(hop: &'static str, authority: &str) -> Result<(), TunnelError> {
    let ok = !authority.is_empty()
        && authority.len() <= 260
        && authority.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b));
    if ok { Ok(()) } else { Err(TunnelError::Request { hop, detail: "invalid target authority" }) }
}

fn server_name(hop: &'static str, name: &str) -> Result<ServerName<'static>, TunnelError> {
    ServerName::try_from(name.to_owned())
        .map_err(|_| TunnelError::Request { hop, detail: "invalid tls server name" })
}

async fn tcp_connect<A: ToSocketAddrs>(
    hop: &'static str,
    addr: A,
    shown: String,
    t: &Timeouts,
) -> Result<TcpStream, TunnelError> {
    let stream = match timeout(t.connect, TcpStream::connect(addr)).await {
        Err(_elapsed) => return Err(TunnelError::ConnectTimeout { hop, addr: shown }),
        Ok(Err(source)) => return Err(TunnelError::Connect { hop, addr: shown, source }),
        Ok(Ok(s)) => s,
    };
    // Tunnels carry interactive traffic (TLS handshakes, websockets): no Nagle delay.
    if let Err(e) = stream.set_nodelay(true) {
        debug!(hop, error = %e, "cannot set TCP_NODELAY");
    }
    // Idle websocket tunnels must outlive NAT and proxy idle timers: probe well before them.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(t.keepalive_idle)
        .with_interval(t.keepalive_interval)
        .with_retries(t.keepalive_retries);
    if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
        debug!(hop, error = %e, "cannot enable TCP keepalive");
    }
    Ok(stream)
}

async fn tls_connect<S: Io + 'static>(
    hop: &'static str,
    config: &Arc<ClientConfig>,
    name: ServerName<'static>,
    io: S,
    t: &Timeouts,
) -> Result<tokio_rustls::client::TlsStream<S>, TunnelError> {
    let connector = TlsConnector::from(Arc::clone(config));
    match timeout(t.tls_handshake, connector.connect(name, io)).await {
        Err(_elapsed) => Err(TunnelError::TlsTimeout { hop }),
        Ok(Err(source)) => Err(TunnelError::Tls { hop, source }),
        Ok(Ok(s)) => Ok(s),
    }
}

/// Sends `CONNECT authority` with `headers` and waits for a 2xx. Bytes the peer sent
/// after the response head belong to the tunnel and are replayed first.
async fn connect_hop<S: Io + 'static>(
    hop: &'static str,
    mut stream: S,
    authority: &str,
    headers: &[(&str, Secret)],
    t: &Timeouts,
) -> Result<(Box<dyn Io>, u16), TunnelError> {
    let request = connect_request(authority, headers);
    let exchange = async {
        stream.write_all(&request).await.map_err(|source| TunnelError::Io { hop, source })?;
        stream.flush().await.map_err(|source| TunnelError::Io { hop, source })?;
        read_connect_response(hop, &mut stream).await
    };
    let (status, leftover) =
        timeout(t.connect_response, exchange).await.map_err(|_| TunnelError::ResponseTimeout { hop })??;
    debug!(hop, status, leftover = leftover.len(), "CONNECT established");
    Ok((Box::new(Replay::new(leftover, stream)), status))
}

fn connect_request(authority: &str, headers: &[(&str, Secret)]) -> Vec<u8> {
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    for (name, value) in headers {
        req.push_str(name);
        req.push_str(": ");
        req.push_str(value.expose());
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// Reads one final response head (skipping 1xx interim ones). Returns the status and the
/// bytes read past the head.
async fn read_connect_response<S: AsyncRead + Unpin>(
    hop: &'static str,
    stream: &mut S,
) -> Result<(u16, Vec<u8>), TunnelError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        match parse_response_head(&buf).map_err(|detail| TunnelError::Malformed { hop, detail })? {
            Some(head) if (100..200).contains(&head.status) && head.status != 101 => {
                buf.drain(..head.len);
                continue;
            }
            Some(head) if (200..300).contains(&head.status) => {
                // RFC 9110 9.3.6: a 2xx to CONNECT has no content; whatever follows is tunnel data.
                return Ok((head.status, buf.split_off(head.len)));
            }
            Some(head) => {
                return Err(TunnelError::Refused { hop, status: head.status, reason: head.reason });
            }
            None => {}
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(TunnelError::Malformed { hop, detail: "response head larger than 16 KiB" });
        }
        let start = buf.len();
        buf.resize(MAX_RESPONSE_HEAD, 0);
        let n = match stream.read(&mut buf[start..]).await {
            Ok(n) => n,
            Err(source) => return Err(TunnelError::Io { hop, source }),
        };
        buf.truncate(start + n);
        if n == 0 {
            return Err(TunnelError::Closed { hop });
        }
    }
}

struct ResponseHead {
    len: usize,
    status: u16,
    reason: String,
}

fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, &'static str> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) => {
            let status = resp.code.ok_or("missing status code")?;
            if !(100..=599).contains(&status) {
                return Err("status code out of range");
            }
            // The reason phrase is the peer's text: keep it printable and short for logs.
            let reason = resp
                .reason
                .unwrap_or("")
                .chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(80)
                .collect();
            Ok(Some(ResponseHead { len, status, reason }))
        }
        Err(httparse::Error::Version) => Err("not an HTTP/1.x status line"),
        Err(httparse::Error::TooManyHeaders) => Err("more than 64 headers"),
        Err(httparse::Error::Status) => Err("invalid status code"),
        Err(_) => Err("invalid header or line ending"),
    }
}

#[cfg(test)]
mod tests;
