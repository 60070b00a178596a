//! Upstream tunnels: direct TCP, enterprise-proxy CONNECT, nested CONNECT in TLS to the gateway.
use std::{fmt, io, net::SocketAddr, sync::Arc, time::Duration};

use rustls::{ClientConfig, pki_types::ServerName};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, ToSocketAddrs},
    time::timeout,
};
use tokio_rustls::TlsConnector;
use tracing::debug;

/// Implements every `AsyncWrite` method by forwarding it to the field `$field`.
macro_rules! forward_async_write {
    ($field:ident) => {
        fn poll_write(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            buf: &[u8],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
        }
        fn poll_write_vectored(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            bufs: &[::std::io::IoSlice<'_>],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
        }
        fn is_write_vectored(&self) -> bool {
            self.$field.is_write_vectored()
        }
        fn poll_flush(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut self.$field).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
        }
    };
}

pub mod connect;
mod gateway;
mod h2;
pub(crate) mod ktls;
pub mod pool;
mod read_ahead;
mod record;
mod settings;
mod stream;
use connect::{ConnectRequest, RequestError};
pub use gateway::*;
pub use h2::H2Session;
use read_ahead::ReadAhead;
pub use settings::*;
pub use stream::*;

pub const HOP_TARGET: &str = "target";
pub const HOP_PROXY: &str = "proxy";
pub const HOP_GATEWAY: &str = "gateway";

pub use crate::policy::Route;

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
    #[error("tls handshake with the {hop} failed{}", crate::tls::refusal_reason(.source).map(|r| format!(": {r}")).unwrap_or_default())]
    Tls {
        hop: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("timed out in the tls handshake with the {hop}")]
    TlsTimeout { hop: &'static str },
    #[error("the {hop} refused the CONNECT: {status} {reason}")]
    Refused {
        hop: &'static str,
        status: u16,
        reason: String,
    },
    #[error("timed out waiting for the {hop} to answer the CONNECT")]
    ResponseTimeout { hop: &'static str },
    #[error("malformed CONNECT response from the {hop}: {detail}")]
    Malformed {
        hop: &'static str,
        detail: &'static str,
    },
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
    Request {
        hop: &'static str,
        detail: &'static str,
    },
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
    pub fn side(&self) -> crate::telemetry::Side {
        use crate::telemetry::Side;
        match self {
            TunnelError::Credentials { .. }
            | TunnelError::Request { .. }
            | TunnelError::NotConfigured { .. } => Side::Internal,
            _ => Side::Upstream,
        }
    }
}

/// Opens a tunnel to `target_authority` (`host:port`, from [`crate::addr::authority`]) along
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
            let started = std::time::Instant::now();
            let tcp = tcp_connect(HOP_TARGET, target_addr, target_addr.to_string(), t).await?;
            Ok(Upstream {
                io: Box::new(tcp),
                hops: Vec::new(),
                setup: vec![(HOP_TARGET, started.elapsed())],
                session: None,
            })
        }
        Route::Proxy => {
            let proxy = cfg.proxy.as_ref().ok_or(TunnelError::NotConfigured {
                route,
                hop: HOP_PROXY,
            })?;
            let request = ConnectRequest::to_proxy(target_authority, proxy)
                .map_err(|e| request_error(HOP_PROXY, e))?;
            let mut hops = Vec::with_capacity(1);
            let mut setup = Vec::with_capacity(1);
            let io = through_proxy(proxy, &request, t, &mut hops, &mut setup).await?;
            Ok(Upstream {
                io: io.boxed(),
                hops,
                setup,
                session: None,
            })
        }
        Route::Gateway => {
            let gw = gateway_of(cfg)?;
            // Everything local that can fail does so before we touch the network.
            let request = gateway_request(gw, target_authority).await?;
            let session = dial_gateway(cfg).await?;
            session.open_once(&request, t).await
        }
    }
}

/// The configured gateway, or the error that names the missing hop.
pub(crate) fn gateway_of(cfg: &TunnelConfig) -> Result<&GatewayConfig, TunnelError> {
    cfg.gateway.as_ref().ok_or(TunnelError::NotConfigured {
        route: Route::Gateway,
        hop: HOP_GATEWAY,
    })
}

/// The inner CONNECT for `target_authority`, with the bearer token read from its file now
/// (so a rotated Secret applies to the next tunnel).
pub(crate) async fn gateway_request(
    gw: &GatewayConfig,
    target_authority: &str,
) -> Result<ConnectRequest, TunnelError> {
    // The authority first: a bad one fails before the token file is read.
    ConnectRequest::new(target_authority).map_err(|e| request_error(HOP_GATEWAY, e))?;
    let token = match &gw.bearer_token_file {
        None => None,
        Some(path) => Some(
            read_token(path)
                .await
                .map_err(|source| TunnelError::Credentials {
                    hop: HOP_GATEWAY,
                    source,
                })?,
        ),
    };
    ConnectRequest::to_gateway(target_authority, gw, token)
        .map_err(|e| request_error(HOP_GATEWAY, e))
}

/// A request that could not be built, as the hop's error.
pub(crate) fn request_error(hop: &'static str, e: RequestError) -> TunnelError {
    TunnelError::Request {
        hop,
        detail: match e {
            RequestError::Authority => "invalid target authority",
            RequestError::Header => "invalid extra header",
        },
    }
}

/// Adds `took` to the set-up time already recorded for `hop` (a session's TLS time plus the
/// CONNECT on it), or records it.
fn add_setup(setup: &mut Vec<(&'static str, Duration)>, hop: &'static str, took: Duration) {
    match setup.iter_mut().find(|(h, _)| *h == hop) {
        Some((_, d)) => *d += took,
        None => setup.push((hop, took)),
    }
}

/// TCP (plus TLS for `https://`) to the enterprise proxy and `CONNECT authority`.
async fn through_proxy(
    proxy: &ProxyConfig,
    request: &ConnectRequest,
    t: &Timeouts,
    hops: &mut Vec<HopStatus>,
    setup: &mut Vec<(&'static str, std::time::Duration)>,
) -> Result<Transport, TunnelError> {
    let started = std::time::Instant::now();
    let addr = (proxy.url.host.as_str(), proxy.url.port);
    let (io, status) = match proxy.url.scheme {
        ProxyScheme::Http => {
            let tcp = tcp_connect(HOP_PROXY, addr, proxy.url.authority(), t).await?;
            let (tcp, leftover, status) = connect_exchange(HOP_PROXY, tcp, request, t).await?;
            (Transport::after_connect(tcp, leftover), status)
        }
        ProxyScheme::Https => {
            let config = proxy.tls.as_ref().ok_or(TunnelError::Request {
                hop: HOP_PROXY,
                detail: "an https:// proxy needs a tls configuration",
            })?;
            let name = server_name(HOP_PROXY, &proxy.url.host)?;
            let tcp = tcp_connect(HOP_PROXY, addr, proxy.url.authority(), t).await?;
            let tls = tls_connect(HOP_PROXY, config, name, ReadAhead::new(tcp), t).await?;
            let (io, status) = connect_hop(HOP_PROXY, Box::new(tls), request, t).await?;
            (Transport::Other(io), status)
        }
    };
    hops.push(HopStatus {
        hop: HOP_PROXY,
        status,
    });
    setup.push((HOP_PROXY, started.elapsed()));
    Ok(io)
}

fn server_name(hop: &'static str, name: &str) -> Result<ServerName<'static>, TunnelError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TunnelError::Request {
        hop,
        detail: "invalid tls server name",
    })
}

async fn tcp_connect<A: ToSocketAddrs>(
    hop: &'static str,
    addr: A,
    shown: String,
    t: &Timeouts,
) -> Result<TcpStream, TunnelError> {
    let stream = match timeout(t.connect, TcpStream::connect(addr)).await {
        Err(_elapsed) => return Err(TunnelError::ConnectTimeout { hop, addr: shown }),
        Ok(Err(source)) => {
            return Err(TunnelError::Connect {
                hop,
                addr: shown,
                source,
            });
        }
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
    // Data left unacknowledged as long as the keepalive would wait ends the connection too:
    // an upstream that vanished mid-transfer (a full send buffer never probes) is noticed.
    if let Err(e) = socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(user_timeout(t))) {
        debug!(hop, error = %e, "cannot set TCP_USER_TIMEOUT");
    }
    Ok(stream)
}

/// How long an upstream may leave data unacknowledged: the keepalive's whole patience.
fn user_timeout(t: &Timeouts) -> Duration {
    t.keepalive_idle + t.keepalive_interval * t.keepalive_retries
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
/// after the response head belong to the tunnel and are replayed first; without them the
/// stream is returned as it came (a kTLS session stays one, so the relay can splice it).
async fn connect_hop(
    hop: &'static str,
    stream: Box<dyn Io>,
    request: &ConnectRequest,
    t: &Timeouts,
) -> Result<(Box<dyn Io>, u16), TunnelError> {
    let (mut stream, leftover, status) = connect_exchange(hop, stream, request, t).await?;
    if leftover.is_empty() {
        return Ok((stream, status));
    }
    // A kTLS session takes them back into its own buffer, and stays one.
    if let Some(k) = (&mut *stream as &mut dyn std::any::Any).downcast_mut::<ktls::KernelTls>() {
        k.unread(leftover);
        return Ok((stream, status));
    }
    Ok((Box::new(Replay::new(leftover, stream)), status))
}

/// [`connect_hop`]'s exchange: the stream, the bytes read past the response head, the
/// status.
async fn connect_exchange<S: Io + 'static>(
    hop: &'static str,
    mut stream: S,
    request: &ConnectRequest,
    t: &Timeouts,
) -> Result<(S, Vec<u8>, u16), TunnelError> {
    let request = request.encode_h1();
    let exchange = async {
        stream
            .write_all(&request)
            .await
            .map_err(|source| TunnelError::Io { hop, source })?;
        stream
            .flush()
            .await
            .map_err(|source| TunnelError::Io { hop, source })?;
        read_connect_response(hop, &mut stream).await
    };
    let (status, leftover) = timeout(t.connect_response, exchange)
        .await
        .map_err(|_| TunnelError::ResponseTimeout { hop })??;
    debug!(
        hop,
        status,
        leftover = leftover.len(),
        "CONNECT established"
    );
    Ok((stream, leftover, status))
}

/// Reads one final response head (skipping 1xx interim ones). Returns the status and the
/// bytes read past the head.
pub(crate) async fn read_connect_response<S: AsyncRead + Unpin>(
    hop: &'static str,
    stream: &mut S,
) -> Result<(u16, Vec<u8>), TunnelError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        match connect::read_response(&mut buf)
            .map_err(|detail| TunnelError::Malformed { hop, detail })?
        {
            connect::Response::Established(head) => {
                return Ok((head.status, buf.split_off(head.len)));
            }
            connect::Response::Refused(head) => {
                return Err(TunnelError::Refused {
                    hop,
                    status: head.status,
                    reason: head.reason,
                });
            }
            connect::Response::Incomplete => {}
        }
        let start = buf.len();
        buf.resize(connect::MAX_RESPONSE_HEAD, 0);
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

#[cfg(test)]
pub(crate) mod tests {
    use std::{path::PathBuf, sync::Mutex};

    use tokio::io::AsyncWrite;

    use rustls::ServerConfig;
    use test_pki::TestCa;
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::error_chain;

    const PASSWORD: &str = "s3cr3t-p@ss:word";

    /// A test CA (the shared `test-pki` one) whose certificate is written to a PEM file for
    /// `tls::client_config`.
    pub(crate) struct Pki {
        ca: TestCa,
        pub(crate) ca_path: PathBuf,
    }

    impl Pki {
        pub(crate) fn new(name: &str) -> Self {
            let ca = TestCa::temp(name);
            let ca_path = ca.write_ca(ca.dir());
            Self { ca, ca_path }
        }

        /// A server config with a leaf for `names` (DNS or IP SANs), offering HTTP/1.1.
        pub(crate) fn server(&self, names: &[&str]) -> Arc<ServerConfig> {
            self.ca
                .issue(names)
                .server_config_with(crate::tls::provider(), &["http/1.1"])
        }

        fn client(&self) -> Arc<ClientConfig> {
            crate::tls::client_config(Some(&self.ca_path), None, &[b"http/1.1"])
                .expect("client config")
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Behavior {
        /// 200, then relay to the requested target.
        Allow,
        /// 200 in the same write as the target's first bytes.
        AllowWithLeftover,
        Refuse(u16),
        /// Reads the request, never answers.
        Silent,
        /// Answers 200, one byte every 100 ms (a slow-loris peer: always almost done).
        Drip,
        Garbage,
        Hangup,
    }

    /// A CONNECT server (enterprise proxy or gateway stand-in) recording each request head.
    pub(crate) struct StandIn {
        pub(crate) addr: SocketAddr,
        seen: Arc<Mutex<Vec<String>>>,
    }

    impl StandIn {
        fn seen(&self) -> Vec<String> {
            self.seen.lock().expect("seen lock").clone()
        }
    }

    pub(crate) async fn spawn_connect_server(
        tls: Option<Arc<ServerConfig>>,
        behavior: Behavior,
        required_auth: Option<String>,
    ) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (tls, seen, auth) = (tls.clone(), Arc::clone(&seen2), required_auth.clone());
                tokio::spawn(async move {
                    match tls {
                        None => serve_connect(tcp, behavior, auth, seen).await,
                        Some(config) => {
                            if let Ok(s) = TlsAcceptor::from(config).accept(tcp).await {
                                serve_connect(s, behavior, auth, seen).await;
                            }
                        }
                    }
                });
            }
        });
        StandIn { addr, seen }
    }

    /// Reads up to and including the blank line, one byte at a time so nothing past it is lost.
    pub(crate) async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if s.read(&mut b).await.unwrap_or(0) == 0 {
                break;
            }
            head.push(b[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    async fn serve_connect<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        behavior: Behavior,
        required_auth: Option<String>,
        seen: Arc<Mutex<Vec<String>>>,
    ) {
        let head = read_head(&mut s).await;
        seen.lock().expect("seen lock").push(head.clone());
        let authorized =
            |auth: &String| head.contains(&format!("\r\nProxy-Authorization: {auth}\r\n"));
        if required_auth.as_ref().is_some_and(|auth| !authorized(auth)) {
            let reply = b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                Proxy-Authenticate: Basic realm=\"t\"\r\nContent-Length: 0\r\n\r\n";
            let _ = s.write_all(reply).await;
            let _ = s.shutdown().await;
            return;
        }
        match behavior {
            Behavior::Refuse(code) => {
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 {code} Not\tallowed here\r\nContent-Length: 0\r\n\r\n")
                            .as_bytes(),
                    )
                    .await;
                let _ = s.shutdown().await;
            }
            Behavior::Silent => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(s);
            }
            Behavior::Drip => {
                for b in b"HTTP/1.1 200 Connection established\r\n\r\n" {
                    if s.write_all(&[*b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Behavior::Garbage => {
                let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
            }
            Behavior::Hangup => drop(s),
            Behavior::Allow | Behavior::AllowWithLeftover => {
                let target = head
                    .split_whitespace()
                    .nth(1)
                    .expect("request target")
                    .to_owned();
                let mut upstream = TcpStream::connect(&target)
                    .await
                    .expect("stand-in connects to target");
                let mut reply =
                    b"HTTP/1.1 200 Connection established\r\nContent-Length: 5\r\n\r\n".to_vec();
                if behavior == Behavior::AllowWithLeftover {
                    let mut banner = [0u8; 64];
                    let n = upstream.read(&mut banner).await.expect("banner");
                    reply.extend_from_slice(&banner[..n]);
                }
                s.write_all(&reply).await.expect("reply");
                let _ = tokio::io::copy_bidirectional(&mut s, &mut upstream).await;
            }
        }
    }

    /// A target that optionally greets first, then answers `got:<everything read>` once the
    /// client half-closes, then closes.
    pub(crate) async fn spawn_target(banner: Option<&'static [u8]>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Some(b) = banner {
                        s.write_all(b).await.expect("banner");
                    }
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).await.expect("read to eof");
                    let mut reply = b"got:".to_vec();
                    reply.extend_from_slice(&got);
                    s.write_all(&reply).await.expect("reply");
                    s.shutdown().await.expect("shutdown");
                });
            }
        });
        addr
    }

    /// Accepts TCP and never says anything.
    async fn spawn_silent_tcp() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        addr
    }

    #[tokio::test]
    async fn upstream_sockets_get_keepalive_and_a_user_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let t = timeouts();
        let s = tcp_connect(HOP_TARGET, addr, addr.to_string(), &t)
            .await
            .expect("connect");
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            sock.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
            Some(Duration::from_secs(60 + 15 * 4))
        );
        assert!(s.nodelay().expect("TCP_NODELAY"));
    }

    pub(crate) fn timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(5),
            tls_handshake: Duration::from_secs(5),
            connect_response: Duration::from_secs(5),
            ..Timeouts::default()
        }
    }

    pub(crate) fn gateway(
        addr: SocketAddr,
        server_name: &str,
        tls: Arc<ClientConfig>,
    ) -> GatewayConfig {
        let mut gw = GatewayConfig::from_url(&format!("https://{addr}"), tls).expect("gateway url");
        gw.server_name = server_name.to_owned();
        gw
    }

    fn plain_proxy(addr: SocketAddr, credentials: Option<(&str, &str)>) -> ProxyConfig {
        let mut p = ProxyConfig::new(format!("http://{addr}").parse().expect("proxy url"), None);
        p.credentials = credentials.map(|(u, pw)| (u.to_owned(), Secret::new(pw)));
        p
    }

    fn basic(user: &str, pass: &str) -> String {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    }

    /// Writes `msg`, half-closes, and reads the reply to EOF.
    async fn exchange(up: &mut Upstream, msg: &[u8]) -> Vec<u8> {
        up.write_all(msg).await.expect("write");
        up.shutdown().await.expect("half-close");
        let mut reply = Vec::new();
        up.read_to_end(&mut reply).await.expect("read reply");
        reply
    }

    fn unreachable_addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    #[tokio::test]
    async fn gateway_through_proxy_relays_both_ways_with_half_close() {
        let pki = Pki::new("test ca");
        let target = spawn_target(None).await;
        let gw = spawn_connect_server(Some(pki.server(&["gw.test"])), Behavior::Allow, None).await;
        let proxy =
            spawn_connect_server(None, Behavior::Allow, Some(basic("alice", PASSWORD))).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "tok-123\n").expect("write token");

        let mut gw_cfg = gateway(gw.addr, "gw.test", pki.client());
        gw_cfg.extra_headers = vec![("X-Arc-Test".into(), "yes".into())];
        gw_cfg.bearer_token_file = Some(token_file);
        let cfg = TunnelConfig {
            gateway: Some(gw_cfg),
            proxy: Some(plain_proxy(proxy.addr, Some(("alice", PASSWORD)))),
            timeouts: timeouts(),
        };
        let authority = crate::addr::authority("127.0.0.1", target.port());
        let mut up = open(&cfg, Route::Gateway, &authority, unreachable_addr())
            .await
            .expect("open");
        assert_eq!(
            up.hops,
            vec![
                HopStatus {
                    hop: HOP_PROXY,
                    status: 200
                },
                HopStatus {
                    hop: HOP_GATEWAY,
                    status: 200
                }
            ]
        );
        assert_eq!(exchange(&mut up, b"hello").await, b"got:hello");

        let proxy_seen = proxy.seen().join("");
        let gw_authority = gw.addr.to_string();
        assert!(
            proxy_seen.starts_with(&format!(
                "CONNECT {gw_authority} HTTP/1.1\r\nHost: {gw_authority}\r\n"
            )),
            "{proxy_seen}"
        );
        assert!(
            proxy_seen.contains(&basic("alice", PASSWORD)),
            "{proxy_seen}"
        );
        assert!(
            !proxy_seen.contains("tok-123"),
            "the bearer token goes to the gateway only"
        );

        let gw_seen = gw.seen().join("");
        assert!(
            gw_seen.starts_with(&format!(
                "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
            )),
            "{gw_seen}"
        );
        assert!(gw_seen.contains("\r\nX-Arc-Test: yes\r\n"), "{gw_seen}");
        assert!(
            gw_seen.contains("\r\nAuthorization: Bearer tok-123\r\n"),
            "{gw_seen}"
        );
        assert!(
            !gw_seen.to_ascii_lowercase().contains("proxy-authorization"),
            "{gw_seen}"
        );
        assert!(
            !gw_seen.contains(PASSWORD) && !gw_seen.contains(&basic("alice", PASSWORD)),
            "{gw_seen}"
        );
    }

    #[tokio::test]
    async fn gateway_through_https_proxy_nests_tls_in_tls() {
        let pki = Pki::new("test ca");
        let target = spawn_target(None).await;
        let gw = spawn_connect_server(Some(pki.server(&["gw.test"])), Behavior::Allow, None).await;
        let proxy =
            spawn_connect_server(Some(pki.server(&["127.0.0.1"])), Behavior::Allow, None).await;
        let url: ProxyUrl = format!("https://{}", proxy.addr)
            .parse()
            .expect("proxy url");
        let cfg = TunnelConfig {
            gateway: Some(gateway(gw.addr, "gw.test", pki.client())),
            proxy: Some(ProxyConfig::new(url, Some(pki.client()))),
            timeouts: timeouts(),
        };
        let authority = crate::addr::authority("127.0.0.1", target.port());
        let mut up = open(&cfg, Route::Gateway, &authority, unreachable_addr())
            .await
            .expect("open");
        assert_eq!(up.hops.len(), 2);
        assert_eq!(exchange(&mut up, b"nested").await, b"got:nested");
    }

    #[tokio::test]
    async fn proxy_and_direct_routes() {
        let target = spawn_target(None).await;
        let proxy = spawn_connect_server(None, Behavior::Allow, None).await;
        let cfg = TunnelConfig {
            gateway: None,
            proxy: Some(plain_proxy(proxy.addr, None)),
            timeouts: timeouts(),
        };
        let authority = target.to_string();

        let mut up = open(&cfg, Route::Proxy, &authority, unreachable_addr())
            .await
            .expect("proxy route");
        assert_eq!(
            up.hops,
            vec![HopStatus {
                hop: HOP_PROXY,
                status: 200
            }]
        );
        assert_eq!(exchange(&mut up, b"via proxy").await, b"got:via proxy");
        let seen = proxy.seen().join("");
        assert_eq!(
            seen,
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n")
        );

        let mut up = open(&cfg, Route::Direct, "ignored:1", target)
            .await
            .expect("direct route");
        assert!(up.hops.is_empty());
        assert_eq!(exchange(&mut up, b"direct").await, b"got:direct");

        let e = open(&cfg, Route::Gateway, &authority, target)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                TunnelError::NotConfigured {
                    route: Route::Gateway,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn leftover_bytes_after_the_200_are_delivered_first() {
        let pki = Pki::new("test ca");
        let target = spawn_target(Some(b"SSH-2.0-banner\r\n")).await;
        let gw = spawn_connect_server(
            Some(pki.server(&["gw.test"])),
            Behavior::AllowWithLeftover,
            None,
        )
        .await;
        let cfg = TunnelConfig {
            gateway: Some(gateway(gw.addr, "gw.test", pki.client())),
            proxy: None,
            timeouts: timeouts(),
        };
        let mut up = open(&cfg, Route::Gateway, &target.to_string(), target)
            .await
            .expect("open");
        assert_eq!(
            up.hops,
            vec![HopStatus {
                hop: HOP_GATEWAY,
                status: 200
            }]
        );
        // The 200 carried `Content-Length: 5`, which a CONNECT 2xx must not honour.
        assert_eq!(exchange(&mut up, b"x").await, b"SSH-2.0-banner\r\ngot:x");
    }

    #[tokio::test]
    async fn proxy_407_is_refused_without_leaking_credentials() {
        let proxy =
            spawn_connect_server(None, Behavior::Allow, Some(basic("alice", "right"))).await;
        for creds in [None, Some(("alice", PASSWORD))] {
            let cfg = TunnelConfig {
                gateway: None,
                proxy: Some(plain_proxy(proxy.addr, creds)),
                timeouts: timeouts(),
            };
            let e = open(&cfg, Route::Proxy, "example.com:443", unreachable_addr())
                .await
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    TunnelError::Refused {
                        hop: "proxy",
                        status: 407,
                        ..
                    }
                ),
                "{e:?}"
            );
            assert_eq!(
                (e.hop(), e.kind(), e.status(), e.side().as_str()),
                ("proxy", "refused", Some(407), "upstream")
            );
            let shown = format!("{} {e:?}", error_chain(&e));
            assert!(
                !shown.contains(PASSWORD) && !shown.contains(&basic("alice", PASSWORD)),
                "{shown}"
            );
            assert!(
                shown.contains("407 Proxy Authentication Required"),
                "{shown}"
            );
        }
    }

    #[tokio::test]
    async fn gateway_403_is_refused_with_a_clean_reason() {
        let pki = Pki::new("test ca");
        let gw =
            spawn_connect_server(Some(pki.server(&["gw.test"])), Behavior::Refuse(403), None).await;
        let cfg = TunnelConfig {
            gateway: Some(gateway(gw.addr, "gw.test", pki.client())),
            proxy: None,
            timeouts: timeouts(),
        };
        let e = open(
            &cfg,
            Route::Gateway,
            "not-allowed.example:443",
            unreachable_addr(),
        )
        .await
        .unwrap_err();
        let TunnelError::Refused {
            hop,
            status,
            reason,
        } = &e
        else {
            panic!("want refused, got {e:?}")
        };
        assert_eq!(
            (*hop, *status, reason.as_str()),
            ("gateway", 403, "Not allowed here")
        );
        assert_eq!(
            e.to_string(),
            "the gateway refused the CONNECT: 403 Not allowed here"
        );
    }

    fn rustls_error(e: &TunnelError) -> &rustls::Error {
        let TunnelError::Tls { source, .. } = e else {
            panic!("want a tls error, got {e:?}")
        };
        source
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .expect("rustls error inside")
    }

    #[tokio::test]
    async fn gateway_certificate_is_verified() {
        let pki = Pki::new("gateway ca");
        let stranger = Pki::new("some other ca");
        let gw = spawn_connect_server(Some(pki.server(&["gw.test"])), Behavior::Allow, None).await;

        let cfg = TunnelConfig {
            gateway: Some(gateway(gw.addr, "gw.test", stranger.client())),
            proxy: None,
            timeouts: timeouts(),
        };
        let e = open(&cfg, Route::Gateway, "example.com:443", unreachable_addr())
            .await
            .unwrap_err();
        assert!(
            matches!(
                rustls_error(&e),
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{e:?}"
        );
        assert_eq!((e.hop(), e.kind()), ("gateway", "tls"));

        let cfg = TunnelConfig {
            gateway: Some(gateway(gw.addr, "other.test", pki.client())),
            proxy: None,
            timeouts: timeouts(),
        };
        let e = open(&cfg, Route::Gateway, "example.com:443", unreachable_addr())
            .await
            .unwrap_err();
        assert!(
            matches!(
                rustls_error(&e),
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{e:?}"
        );
        assert!(
            gw.seen().is_empty(),
            "no CONNECT may be sent over an unverified session"
        );
    }

    #[tokio::test]
    async fn gateway_choosing_h2_gets_no_http1_bytes() {
        // The stand-in speaks HTTP/1.1 only but negotiates h2: what it receives must be the
        // HTTP/2 preface, never an HTTP/1.1 CONNECT line it could misread.
        let pki = Pki::new("test ca");
        let mut h2_only = (*pki.server(&["gw.test"])).clone();
        h2_only.alpn_protocols = vec![b"h2".to_vec()];
        let gw = spawn_connect_server(Some(Arc::new(h2_only)), Behavior::Hangup, None).await;
        let tls = crate::tls::client_config(Some(&pki.ca_path), None, &[b"h2", b"http/1.1"])
            .expect("client config");
        let cfg = TunnelConfig {
            gateway: Some(gateway(gw.addr, "gw.test", tls)),
            proxy: None,
            timeouts: timeouts(),
        };
        let e = open(&cfg, Route::Gateway, "example.com:443", unreachable_addr())
            .await
            .unwrap_err();
        assert_eq!(e.hop(), "gateway", "{e:?}");
        let seen = gw.seen();
        assert!(
            seen.iter().all(|h| h.starts_with("PRI * HTTP/2.0\r\n")),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn gateway_without_h2_in_the_offer_stays_http1() {
        let pki = Pki::new("test ca");
        let mut both = (*pki.server(&["gw.test"])).clone();
        both.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let target = spawn_target(None).await;
        let gw = spawn_connect_server(Some(Arc::new(both)), Behavior::Allow, None).await;
        let cfg = TunnelConfig {
            gateway: Some(gateway(gw.addr, "gw.test", pki.client())),
            proxy: None,
            timeouts: timeouts(),
        };
        let up = open(
            &cfg,
            Route::Gateway,
            &target.to_string(),
            unreachable_addr(),
        )
        .await
        .expect("tunnel");
        let s = up.session.expect("session info");
        assert_eq!((s.proto.as_str(), s.reuse), ("h1", Reuse::Fresh));
        assert!(gw.seen()[0].starts_with("CONNECT "), "{:?}", gw.seen());
    }

    /// Opens a tunnel through a CONNECT stand-in that behaves as `behavior`, as the proxy or
    /// as the gateway, with 300 ms deadlines; returns the error.
    async fn open_against(pki: &Pki, behavior: Behavior, route: Route) -> TunnelError {
        let short = Timeouts {
            tls_handshake: Duration::from_millis(300),
            connect_response: Duration::from_millis(300),
            ..timeouts()
        };
        let cfg = match route {
            Route::Gateway => {
                let gw = spawn_connect_server(Some(pki.server(&["gw.test"])), behavior, None).await;
                TunnelConfig {
                    gateway: Some(gateway(gw.addr, "gw.test", pki.client())),
                    proxy: None,
                    timeouts: short,
                }
            }
            _ => {
                let proxy = spawn_connect_server(None, behavior, None).await;
                TunnelConfig {
                    gateway: None,
                    proxy: Some(plain_proxy(proxy.addr, None)),
                    timeouts: short,
                }
            }
        };
        open(&cfg, route, "example.com:443", unreachable_addr())
            .await
            .unwrap_err()
    }

    /// A silent peer, and one that keeps the CONNECT response coming a byte at a time (the
    /// deadline is a total, not per read), are cut at the response deadline with the hop
    /// named; a silent TLS peer at the handshake deadline.
    #[tokio::test]
    async fn silent_and_dripping_peers_hit_their_own_timeouts() {
        let pki = Pki::new("test ca");
        for (route, hop) in [(Route::Gateway, "gateway"), (Route::Proxy, "proxy")] {
            for behavior in [Behavior::Silent, Behavior::Drip] {
                let name = format!("{behavior:?}");
                let e = open_against(&pki, behavior, route).await;
                assert!(
                    matches!(e, TunnelError::ResponseTimeout { hop: h } if h == hop),
                    "{name} {hop}: {e:?}"
                );
            }
        }

        let silent = spawn_silent_tcp().await;
        let cfg = TunnelConfig {
            gateway: Some(gateway(silent, "gw.test", pki.client())),
            proxy: None,
            timeouts: Timeouts {
                tls_handshake: Duration::from_millis(300),
                ..timeouts()
            },
        };
        let e = open(&cfg, Route::Gateway, "example.com:443", unreachable_addr())
            .await
            .unwrap_err();
        assert!(
            matches!(e, TunnelError::TlsTimeout { hop: "gateway" }),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn broken_peers_are_named() {
        for (behavior, want) in [
            (Behavior::Garbage, "malformed_response"),
            (Behavior::Hangup, "closed"),
        ] {
            let proxy = spawn_connect_server(None, behavior, None).await;
            let cfg = TunnelConfig {
                gateway: None,
                proxy: Some(plain_proxy(proxy.addr, None)),
                timeouts: timeouts(),
            };
            let e = open(&cfg, Route::Proxy, "example.com:443", unreachable_addr())
                .await
                .unwrap_err();
            assert_eq!((e.hop(), e.kind()), ("proxy", want), "{e:?}");
        }

        // Nothing listens on a port we just released.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let pki = Pki::new("test ca");
        let cfg = TunnelConfig {
            gateway: Some(gateway(
                SocketAddr::from(([127, 0, 0, 1], port)),
                "gw.test",
                pki.client(),
            )),
            proxy: None,
            timeouts: timeouts(),
        };
        let e = open(&cfg, Route::Gateway, "example.com:443", unreachable_addr())
            .await
            .unwrap_err();
        let TunnelError::Connect { hop, addr, .. } = &e else {
            panic!("want connect error: {e:?}")
        };
        assert_eq!(
            (*hop, addr.as_str()),
            ("gateway", format!("127.0.0.1:{port}").as_str())
        );
    }

    #[tokio::test]
    async fn local_problems_fail_before_any_connection() {
        let pki = Pki::new("test ca");
        let gw = spawn_connect_server(Some(pki.server(&["gw.test"])), Behavior::Allow, None).await;
        let mut gw_cfg = gateway(gw.addr, "gw.test", pki.client());
        gw_cfg.bearer_token_file = Some(PathBuf::from("/nonexistent/redirector-token"));
        let cfg = TunnelConfig {
            gateway: Some(gw_cfg.clone()),
            proxy: None,
            timeouts: timeouts(),
        };
        let e = open(&cfg, Route::Gateway, "example.com:443", unreachable_addr())
            .await
            .unwrap_err();
        assert_eq!((e.kind(), e.side().as_str()), ("credentials", "internal"));
        assert!(
            error_chain(&e).contains("/nonexistent/redirector-token"),
            "{}",
            error_chain(&e)
        );

        gw_cfg.bearer_token_file = None;
        let cfg = TunnelConfig {
            gateway: Some(gw_cfg),
            proxy: None,
            timeouts: timeouts(),
        };
        for bad in ["example.com:443\r\nX-Evil: 1", "a b:1", ""] {
            let e = open(&cfg, Route::Gateway, bad, unreachable_addr())
                .await
                .unwrap_err();
            assert_eq!(e.kind(), "bad_request", "{bad:?}");
        }
        assert!(gw.seen().is_empty());
    }

    #[test]
    fn debug_and_serialize_redact_secrets() {
        let pki = Pki::new("test ca");
        let url: ProxyUrl = "http://alice:s3cr3t-p%40ss%3Aword@proxy.corp:3128"
            .parse()
            .expect("url");
        assert_eq!(
            url.credentials.as_ref().map(|(_, p)| p.expose()),
            Some(PASSWORD)
        );
        let mut gw = gateway(
            SocketAddr::from(([127, 0, 0, 1], 443)),
            "gw.test",
            pki.client(),
        );
        gw.extra_headers = vec![("X-Api-Key".into(), "key-material-42".into())];
        let cfg = TunnelConfig {
            gateway: Some(gw),
            proxy: Some(ProxyConfig::new(url.clone(), None)),
            timeouts: timeouts(),
        };
        let debug = format!("{cfg:?} {:?} {url} {url:?}", cfg.proxy);
        let json = serde_json::to_string(&cfg).expect("json");
        for shown in [&debug, &json] {
            assert!(
                !shown.contains("s3cr3t") && !shown.contains("key-material-42"),
                "{shown}"
            );
            assert!(
                shown.contains("<redacted>") && shown.contains("X-Api-Key"),
                "{shown}"
            );
            assert!(
                shown.contains("alice") && shown.contains("proxy.corp"),
                "{shown}"
            );
        }
        assert_eq!(url.to_string(), "http://proxy.corp:3128");
        assert_eq!(
            serde_json::to_string(&Route::Gateway).expect("json"),
            r#""gateway""#
        );
    }

    #[test]
    fn proxy_urls() {
        let ok = [
            ("http://proxy:3128", ProxyScheme::Http, "proxy", 3128, None),
            (
                "HTTP://Proxy.Corp/",
                ProxyScheme::Http,
                "proxy.corp",
                80,
                None,
            ),
            (
                "https://proxy.corp",
                ProxyScheme::Https,
                "proxy.corp",
                443,
                None,
            ),
            (
                "http://[2001:db8::1]:8080",
                ProxyScheme::Http,
                "2001:db8::1",
                8080,
                None,
            ),
            (
                "http://u%40corp:p%3A%2F@10.0.0.1:3128",
                ProxyScheme::Http,
                "10.0.0.1",
                3128,
                Some(("u@corp", "p:/")),
            ),
            (
                "http://user:pa@ss@proxy:1",
                ProxyScheme::Http,
                "proxy",
                1,
                Some(("user", "pa@ss")),
            ),
            (
                "http://user@proxy:1",
                ProxyScheme::Http,
                "proxy",
                1,
                Some(("user", "")),
            ),
        ];
        for (input, scheme, host, port, creds) in ok {
            let u: ProxyUrl = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(
                (u.scheme, u.host.as_str(), u.port),
                (scheme, host, port),
                "{input}"
            );
            let got = u
                .credentials
                .as_ref()
                .map(|(user, p)| (user.as_str(), p.expose()));
            assert_eq!(got, creds, "{input}");
        }
        let bad = [
            "proxy:3128",
            "ftp://proxy",
            "http://",
            "http://:80",
            "http://proxy:0",
            "http://proxy:99999",
            "http://proxy:+80",
            "http://proxy:",
            "http://proxy/path",
            "http://proxy?x",
            "http://a b:1",
            "http://[2001:db8::1",
            "http://[2001:db8::1]x",
            "http://:secret-pw@proxy",
            "http://%ff:x@proxy",
            "http://proxy:8o",
            "http://[2001:db8::1]:1x",
            "http://proxy:80:80",
        ];
        for input in bad {
            let e = input.parse::<ProxyUrl>().expect_err(input);
            assert!(!e.to_string().contains("secret-pw"), "{e}");
        }
        let e = "http://user:secret-pw@bad host:1"
            .parse::<ProxyUrl>()
            .unwrap_err();
        assert!(!e.to_string().contains("secret-pw"), "{e}");
    }

    #[test]
    fn gateway_urls() {
        let pki = Pki::new("test ca");
        let gw =
            GatewayConfig::from_url("https://Prefix.GW.arc.azure.com", pki.client()).expect("url");
        assert_eq!(
            (gw.addr_host.as_str(), gw.port, gw.server_name.as_str()),
            ("prefix.gw.arc.azure.com", 443, "prefix.gw.arc.azure.com")
        );
        assert_eq!(gw.authority(), "prefix.gw.arc.azure.com:443");
        let gw = GatewayConfig::from_url("https://[2001:db8::5]:8443/", pki.client()).expect("url");
        assert_eq!(gw.authority(), "[2001:db8::5]:8443");
        for bad in [
            "http://gw.example",
            "https://u:p@gw.example",
            "https://gw.example/path",
            "gw.example",
        ] {
            assert!(GatewayConfig::from_url(bad, pki.client()).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("creds");
        std::fs::write(&path, "  alice:pa:ss word \n").expect("write");
        let (user, pass) = load_credentials_file(&path).expect("load");
        assert_eq!((user.as_str(), pass.expose()), ("alice", "pa:ss word"));
        // The secret is searched for in the message with the (random) path taken out: a
        // temporary directory's name may contain any short string by chance.
        const SECRET: &str = "S3cret-Pass";
        for (content, reason) in [
            ("".to_owned(), "is empty"),
            ("alice\n".to_owned(), "no ':'"),
            (format!(":{SECRET}"), "empty user"),
            (format!("alice:{SECRET}\nbob:{SECRET}2\n"), "single"),
            (format!("alice:{SECRET}\x07"), "control"),
        ] {
            std::fs::write(&path, &content).expect("write");
            let e = load_credentials_file(&path).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(reason) && msg.contains("creds"),
                "{content:?}: {msg}"
            );
            let without_path = msg.replace(&path.display().to_string(), "<path>");
            assert!(
                !without_path.contains(SECRET) && !without_path.contains("alice"),
                "content must not leak: {msg}"
            );
        }
        let e = load_credentials_file(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, CredentialsError::Read { .. }));
    }

    #[test]
    fn extra_headers() {
        assert_eq!(
            parse_header("X-Tenant:  abc "),
            Ok(("X-Tenant".into(), "abc".into()))
        );
        for bad in [
            "Host: evil",
            "proxy-authorization: x",
            "Bad Name: x",
            ": x",
            "X-A: a\r\nX-B: b",
            "X-A: a\0",
        ] {
            assert!(parse_header(bad).is_err(), "{bad:?}");
        }
    }

    async fn response_of(bytes: &[u8]) -> Result<(u16, Vec<u8>), TunnelError> {
        let mut reader = bytes;
        read_connect_response("proxy", &mut reader).await
    }

    #[tokio::test]
    async fn connect_response_parsing() {
        let ok = response_of(b"HTTP/1.0 200 OK\r\nVia: squid\r\n\r\n\x16\x03\x03")
            .await
            .expect("200");
        assert_eq!(ok, (200, b"\x16\x03\x03".to_vec()));
        let ok = response_of(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\ntail")
            .await
            .expect("1xx skipped");
        assert_eq!(ok, (204, b"tail".to_vec()));

        let kind = |r: Result<(u16, Vec<u8>), TunnelError>| r.expect_err("must fail").kind();
        assert_eq!(
            kind(response_of(b"HTTP/2 200\r\n\r\n").await),
            "malformed_response"
        );
        assert_eq!(
            kind(response_of(b"HTTP/1.1 999 What\r\n\r\n").await),
            "malformed_response"
        );
        assert_eq!(
            kind(response_of(b"HTTP/1.1 200 OK\r\nVia: x").await),
            "closed"
        );
        assert_eq!(kind(response_of(b"").await), "closed");
        assert_eq!(
            kind(response_of(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await),
            "refused"
        );
        let many: String = std::iter::once("HTTP/1.1 200 OK\r\n".to_owned())
            .chain((0..65).map(|i| format!("X-{i}: v\r\n")))
            .chain(std::iter::once("\r\n".to_owned()))
            .collect();
        assert_eq!(
            kind(response_of(many.as_bytes()).await),
            "malformed_response"
        );
        let huge = format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n",
            "a".repeat(connect::MAX_RESPONSE_HEAD)
        );
        let e = response_of(huge.as_bytes()).await.unwrap_err();
        assert!(e.to_string().contains("16 KiB"), "{e}");
    }
}
