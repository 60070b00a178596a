//! rdr-gateway-sim: a stand-in for the Azure Arc gateway (outer TLS, a nested
//! HTTP CONNECT inside it) for tests and the demo.
//!
//! It terminates TLS, reads one `CONNECT host:port HTTP/1.1` request, allows it by host name
//! (exact names, `*.suffix` wildcards, optional port), connects to the target through a
//! static `--resolve` table (never DNS), answers `200 Connection established` and relays raw
//! bytes both ways, propagating half-closes. Anything else gets a plain HTTP error and the
//! connection is closed. Because this is plain HTTP CONNECT inside TLS, it also works as an
//! HTTPS proxy for `curl --proxy https://…`.
//!
//! With `--offer-h2` (or `--alpn h2`), a connection whose TLS handshake negotiates ALPN `h2`
//! is served as HTTP/2 instead (hyper's server): every stream is one request, and a standard
//! HTTP/2 CONNECT (RFC 9113 §8.5: `:method CONNECT`, `:authority host:port`, no `:scheme` or
//! `:path`) gets the same policy, status codes and log lines as over HTTP/1.1, many tunnels
//! per connection. The client's END_STREAM reaches the target as a FIN (the other direction
//! keeps flowing), and the target's FIN ends the response stream with END_STREAM.
//!
//! Stdout carries one line per event, flushed at once, for tests to grep:
//!
//! ```text
//! listening <addr>
//! headers <authority>: <name>,<name>,...
//! tunnel CONNECT <authority> -> <status> from=<peer>[ proto=h2]
//! tunnel closed <authority> up=<bytes> down=<bytes>
//! tls error from=<peer>: <error>
//! silent from=<peer>
//! ```
//!
//! `<authority>` is the request target as received (non-printable bytes shown as `?`, `-` when
//! an HTTP/2 CONNECT has no `:authority`); `up` counts client→target bytes, `down`
//! target→client. Requests other than CONNECT are logged as `tunnel <METHOD> <target> -> 405
//! ...`; unparseable ones as `tunnel - - -> 400 ...`. Lines about HTTP/2 streams end in
//! ` proto=h2`; HTTP/1.1 lines have no suffix. Over HTTP/2, header names are lowercase (that
//! is how they travel) and pseudo-headers are not listed.
use std::{
    convert::Infallible,
    fmt,
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::{
    HeaderMap, Method, Response, StatusCode, Uri, body::Incoming, server::conn::http2,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// Largest request head accepted (request line plus headers).
const MAX_HEAD: usize = 16 * 1024;
/// Largest number of request headers accepted.
const MAX_HEADERS: usize = 64;
/// A relay direction's buffer while bytes are moving (dropped while the direction is idle).
const PUMP_BUF: usize = 16 * 1024;
/// HTTP/2 flow-control windows we grant: per stream, and for the whole connection. One
/// stream can fill a fast path on its own; the connection window bounds what many streams
/// together can make us buffer.
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
const H2_MAX_FRAME: u32 = 64 * 1024;
const H2_CONN_WINDOW: u32 = 16 * 1024 * 1024;

const AFTER_HELP: &str = "\
PATTERNS (--allow):
  name              exactly this host name, any port
  *.suffix          one or more labels below suffix (not suffix itself), any port
  name:443          port-restricted; also *.suffix:80
  203.0.113.7       an IP literal in CONNECT is allowed only by a pattern naming it
  [2001:db8::7]:443 IPv6 literal with a port
  Names are case-insensitive and a trailing dot is ignored.

STATUS CODES:
  200 tunnel open, 400 malformed request, 403 not allowed, 405 not CONNECT,
  407 --require-bearer token missing or wrong (or --bearer-status; Proxy-Authorization or Authorization:
  Bearer TOKEN), 408 request head not received in time, 431 head over 16 KiB,
  502 no --resolve entry or target refused, 504 target connect timed out.

HTTP/2 (--offer-h2, or --alpn h2):
  A TLS connection that negotiates ALPN h2 is served as HTTP/2; any other (or no) ALPN
  gets HTTP/1.1. Each stream is one request: CONNECT with :authority host:port and no
  :scheme/:path (RFC 9113 section 8.5), same policy and status codes (400 also for a
  missing :authority; no 408; a header list over 16 KiB gets 431 from the HTTP/2 layer
  itself, without a log line; a malformed header block gets RST_STREAM PROTOCOL_ERROR).
  Many tunnels share one connection (at most --h2-max-streams at once). The client's
  END_STREAM half-closes the target (FIN) while the answer keeps flowing; the target's
  FIN ends the response stream (END_STREAM). Windows: 1 MiB per stream, 16 MiB per
  connection. No keep-alive pings.

STDOUT (one line per event, flushed at once):
  listening <addr>
  headers <authority>: <name>,<name>,...
  tunnel CONNECT <authority> -> <status> from=<peer>[ proto=h2]
  tunnel closed <authority> up=<bytes> down=<bytes>
  (HTTP/2 streams: ` proto=h2` ends every `tunnel <METHOD> ... -> <status>` line)";

/// Simulated Azure Arc gateway: TLS + HTTP/1.1 (and optionally HTTP/2) CONNECT with a
/// host-name allowlist.
#[derive(Parser, Debug)]
#[command(name = "rdr-gateway-sim", version, after_help = AFTER_HELP)]
struct Args {
    /// Address to listen on (repeatable). Port 0 picks a free port; the bound address is
    /// printed as `listening <addr>`.
    #[arg(long = "listen", value_name = "ADDR", required = true)]
    listen: Vec<SocketAddr>,
    /// PEM certificate chain presented to clients.
    #[arg(long, value_name = "PEM", required_unless_present = "silent")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, value_name = "PEM", required_unless_present = "silent")]
    key: Option<PathBuf>,
    /// ALPN protocol to offer, most preferred first (repeatable; replaces the default).
    /// `h2` serves HTTP/2 CONNECT on connections that negotiate it; every other protocol
    /// (and a client without ALPN) gets HTTP/1.1.
    #[arg(
        long = "alpn",
        value_name = "PROTO",
        default_value = "http/1.1",
        value_parser = parse_alpn
    )]
    alpn: Vec<String>,
    /// Offer HTTP/2 too: shorthand for `--alpn h2 --alpn http/1.1` (puts `h2` first in the
    /// --alpn list unless it is already there).
    #[arg(long)]
    offer_h2: bool,
    /// Most concurrent streams (tunnels) per HTTP/2 connection, announced as
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    h2_max_streams: u32,
    /// Allow CONNECT to targets matching PATTERN (repeatable); everything else gets 403.
    #[arg(long = "allow", value_name = "PATTERN", value_parser = Pattern::parse)]
    allow: Vec<Pattern>,
    /// Resolve NAME (exact or `*.suffix`) to IP (repeatable; several IPs are tried in order).
    /// There is no DNS: an allowed name without an entry gets 502.
    #[arg(long = "resolve", value_name = "NAME=IP", value_parser = parse_resolve)]
    resolve: Vec<(HostPattern, IpAddr)>,
    /// Require `Bearer TOKEN` in Proxy-Authorization or Authorization; 407 otherwise.
    #[arg(long, value_name = "TOKEN")]
    require_bearer: Option<String>,
    /// The status a missing or wrong --require-bearer token gets (401 as an origin-style
    /// gateway would answer, or 407 as a proxy would).
    #[arg(long, value_name = "STATUS", default_value_t = 407)]
    bearer_status: u16,
    /// Accept TCP connections and never answer (no TLS either): for timeout tests.
    #[arg(long)]
    silent: bool,
    /// Seconds allowed for the TLS handshake, and again for the request head.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    header_timeout: u64,
    /// Seconds allowed for connecting to the target.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    connect_timeout: u64,
}

/// Everything a connection needs, shared by all of them.
struct Gateway {
    policy: Policy,
    header_timeout: Duration,
    connect_timeout: Duration,
    h2_max_streams: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let alpn = alpn_list(&args.alpn, args.offer_h2);
    let acceptor = match (&args.cert, &args.key, args.silent) {
        (_, _, true) => None,
        (Some(cert), Some(key), false) => Some(TlsAcceptor::from(tls_config(cert, key, &alpn)?)),
        _ => bail!("--cert and --key are required"),
    };
    let gateway = Arc::new(Gateway {
        policy: Policy {
            allow: args.allow,
            resolve: args.resolve,
            bearer: args.require_bearer,
            bearer_status: args.bearer_status,
        },
        header_timeout: Duration::from_secs(args.header_timeout),
        connect_timeout: Duration::from_secs(args.connect_timeout),
        h2_max_streams: args.h2_max_streams,
    });

    let mut accept_loops = tokio::task::JoinSet::new();
    for addr in &args.listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind {addr}"))?;
        log_line(format_args!("listening {}", listener.local_addr()?));
        accept_loops.spawn(accept_loop(listener, acceptor.clone(), gateway.clone()));
    }
    // Accept loops only end on a listener error.
    while let Some(done) = accept_loops.join_next().await {
        done??;
    }
    Ok(())
}

/// The ALPN list to offer: `--alpn` in order, with `h2` put first for `--offer-h2`.
fn alpn_list(alpn: &[String], offer_h2: bool) -> Vec<String> {
    let mut list = alpn.to_vec();
    if offer_h2 && !list.iter().any(|p| p == "h2") {
        list.insert(0, "h2".to_owned());
    }
    list
}

/// An ALPN protocol id is 1..=255 bytes on the wire.
fn parse_alpn(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 255 {
        return Err(format!("{s:?}: an ALPN protocol id is 1 to 255 bytes"));
    }
    Ok(s.to_owned())
}

fn tls_config(cert: &PathBuf, key: &PathBuf, alpn: &[String]) -> anyhow::Result<Arc<ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("open {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse certificates in {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("read key {}", key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("certificate and key do not match")?;
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    gateway: Arc<Gateway>,
) -> io::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors or an aborted handshake: keep serving the others.
            Err(e) if is_transient_accept_error(&e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        match &acceptor {
            None => {
                tokio::spawn(stay_silent(stream, peer));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let handshake = timeout(gateway.header_timeout, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(tls)) => serve_tls(tls, peer, gateway).await,
                        Ok(Err(e)) => log_line(format_args!("tls error from={peer}: {e}")),
                        Err(_) => {
                            log_line(format_args!("tls error from={peer}: handshake timed out"))
                        }
                    }
                });
            }
        }
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || e.raw_os_error() == Some(libc::EMFILE)
        || e.raw_os_error() == Some(libc::ENFILE)
}

/// `--silent`: hold the connection open, read and drop whatever arrives, never answer.
async fn stay_silent(mut stream: TcpStream, peer: SocketAddr) {
    log_line(format_args!("silent from={peer}"));
    let mut sink = tokio::io::sink();
    let _ = tokio::io::copy(&mut stream, &mut sink).await;
}

/// After the TLS handshake: HTTP/2 when ALPN chose `h2`, otherwise one HTTP/1.1 request.
async fn serve_tls(tls: TlsStream<TcpStream>, peer: SocketAddr, gateway: Arc<Gateway>) {
    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
        serve_h2(tls, peer, gateway).await;
    } else {
        serve(TlsHalfClose { tls, sent: false }, peer, &gateway).await;
    }
}

/// The server end of an HTTP/1.1 TLS session whose write shutdown is TLS-only: close_notify,
/// no TCP FIN. A real gateway behind an enterprise proxy must do the same as the
/// redirector's own upstream streams: Squid tears a CONNECT tunnel down on the first FIN,
/// which would cut off the direction still flowing (and the client's close_notify with it).
struct TlsHalfClose {
    tls: TlsStream<TcpStream>,
    sent: bool,
}

impl AsyncRead for TlsHalfClose {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsHalfClose {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.sent {
            self.tls.get_mut().1.send_close_notify();
            self.sent = true;
        }
        Pin::new(&mut self.tls).poll_flush(cx)
    }
}

/// Which protocol a request came in on; it shows in the `tunnel <METHOD> ...` lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    fn suffix(self) -> &'static str {
        match self {
            Proto::H1 => "",
            Proto::H2 => " proto=h2",
        }
    }
}

fn log_tunnel(what: &str, status: u16, peer: SocketAddr, proto: Proto) {
    log_line(format_args!(
        "tunnel {what} -> {status} from={peer}{}",
        proto.suffix()
    ));
}

/// One HTTP/1.1 client connection after the TLS handshake: one request, then a tunnel or an
/// error.
async fn serve<S>(mut client: S, peer: SocketAddr, gateway: &Gateway)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let head = match timeout(gateway.header_timeout, read_head(&mut client)).await {
        Ok(Ok(head)) => head,
        Ok(Err(HeadError::Closed)) => return,
        Ok(Err(HeadError::Io(e))) => {
            eprintln!("read request from {peer}: {e}");
            return;
        }
        Ok(Err(HeadError::TooLarge)) => {
            let refusal = Refusal::new(431, "request head larger than 16 KiB");
            return refuse(client, "- -", peer, &refusal).await;
        }
        Ok(Err(HeadError::Malformed(why))) => {
            return refuse(client, "- -", peer, &Refusal::new(400, why)).await;
        }
        Err(_) => {
            let refusal = Refusal::new(408, "request head not received in time");
            return refuse(client, "- -", peer, &refusal).await;
        }
    };
    let request = head.request();
    let shown = shown_target(&request.target);
    let upstream = match admit(&request, &shown, gateway).await {
        Ok(upstream) => upstream,
        Err((what, refusal)) => return refuse(client, &what, peer, &refusal).await,
    };

    if let Err(e) = client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
    {
        eprintln!("write 200 to {peer}: {e}");
        return;
    }
    if let Err(e) = client.flush().await {
        eprintln!("write 200 to {peer}: {e}");
        return;
    }
    log_tunnel(&format!("CONNECT {shown}"), 200, peer, Proto::H1);
    run_tunnel(client, upstream, &head.buf[head.len..], &shown).await;
}

/// What both protocols do with a request: log its header names, apply the policy, connect
/// to the target. A refusal comes with the `<METHOD> <target>` its log line shows.
async fn admit(
    request: &Request,
    shown: &str,
    gateway: &Gateway,
) -> Result<TcpStream, (String, Refusal)> {
    log_line(format_args!(
        "headers {shown}: {}",
        request.header_names().join(",")
    ));
    let target = gateway
        .policy
        .decide(request)
        .map_err(|refusal| (format!("{} {shown}", printable(&request.method)), refusal))?;
    connect(&target, gateway.connect_timeout)
        .await
        .map_err(|refusal| (format!("CONNECT {shown}"), refusal))
}

/// Relays an open tunnel until both directions have ended, then logs the byte counts.
async fn run_tunnel<S>(client: S, upstream: TcpStream, early: &[u8], shown: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    if let Err(e) = relay(client, upstream, early, &up, &down).await {
        eprintln!("tunnel {shown}: {e}");
    }
    log_line(format_args!(
        "tunnel closed {shown} up={} down={}",
        up.load(Ordering::Relaxed),
        down.load(Ordering::Relaxed)
    ));
}

/// Answers with an error status, closes the connection and logs the outcome.
async fn refuse<S>(mut client: S, what: &str, peer: SocketAddr, refusal: &Refusal)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    log_tunnel(what, refusal.status, peer, Proto::H1);
    let _ = client.write_all(refusal.response().as_bytes()).await;
    let _ = client.shutdown().await;
    // Drain briefly so that unread request bytes do not turn our close into a reset that
    // destroys the response before the client reads it.
    let _ = timeout(Duration::from_secs(2), async {
        let mut sink = [0u8; 4096];
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// One HTTP/2 connection: hyper runs each stream as its own task, so one slow target
/// connect or refusal never holds up the other streams.
async fn serve_h2<S>(tls: S, peer: SocketAddr, gateway: Arc<Gateway>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .max_concurrent_streams(gateway.h2_max_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        // Bulk tunnels: fewer, larger DATA frames from clients (TLS records stay 16 KiB).
        .max_frame_size(H2_MAX_FRAME)
        // Tunnels may idle for a long time; never close a connection for missing PINGs.
        .keep_alive_interval(None);
    let service = service_fn(move |req| h2_stream(req, peer, gateway.clone()));
    if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
        eprintln!("h2 connection from {peer}: {e}");
    }
}

/// One HTTP/2 stream. The response must be returned before hyper hands out the tunnel, so
/// the policy and the target connect happen here and the relay runs in its own task.
async fn h2_stream(
    mut req: hyper::Request<Incoming>,
    peer: SocketAddr,
    gateway: Arc<Gateway>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let request = h2_request(req.method(), req.uri(), req.headers());
    let shown = shown_target(&request.target);
    let upstream = match admit(&request, &shown, &gateway).await {
        Ok(upstream) => upstream,
        Err((what, refusal)) => {
            log_tunnel(&what, refusal.status, peer, Proto::H2);
            return Ok(refusal.h2_response());
        }
    };
    // Resolves once hyper has queued our 200 HEADERS (without END_STREAM) on this stream.
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                log_tunnel(&format!("CONNECT {shown}"), 200, peer, Proto::H2);
                run_tunnel(TokioIo::new(upgraded), upstream, &[], &shown).await;
            }
            // The client reset the stream before the 200 went out.
            Err(e) => eprintln!("tunnel {shown}: h2 stream from {peer} ended before 200: {e}"),
        }
    });
    Ok(Response::new(Full::default()))
}

/// The policy's view of an HTTP/2 request (RFC 9113 §8.5). A CONNECT's target is its
/// `:authority` (empty when missing, which the policy refuses with 400); one that also
/// carries a scheme or path (extended CONNECT, not enabled here) keeps its whole URI, so
/// the authority check refuses it. Other methods show their URI, as over HTTP/1.1.
fn h2_request(method: &Method, uri: &Uri, headers: &HeaderMap) -> Request {
    let target = if method == Method::CONNECT
        && uri.scheme().is_none()
        && uri.path().is_empty()
        && uri.query().is_none()
    {
        uri.authority()
            .map_or_else(String::new, |a| a.as_str().to_owned())
    } else {
        uri.to_string()
    };
    Request {
        method: method.as_str().to_owned(),
        target,
        headers: headers
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect(),
    }
}

/// A request target as logged: printable, and `-` when there is none.
fn shown_target(target: &str) -> String {
    if target.is_empty() {
        "-".to_owned()
    } else {
        printable(target)
    }
}

async fn connect(target: &Target, limit: Duration) -> Result<TcpStream, Refusal> {
    let mut last = Refusal::new(502, "no address for target");
    for ip in &target.addrs {
        let addr = SocketAddr::new(*ip, target.port);
        match timeout(limit, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = Refusal::new(502, format!("connect {addr}: {e}")),
            Err(_) => last = Refusal::new(504, format!("connect {addr}: timed out")),
        }
    }
    Err(last)
}

/// Copies both directions until both have ended. When one side reaches EOF, the other
/// side's write half is shut down and the opposite direction keeps going. Over HTTP/2 the
/// client's EOF is its END_STREAM, and shutting the client's write half sends ours.
async fn relay<S>(
    client: S,
    upstream: TcpStream,
    early: &[u8],
    up: &AtomicU64,
    down: &AtomicU64,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut upstream_rd, mut upstream_wr) = upstream.into_split();
    // Bytes the client sent right behind the request head belong to the tunnel.
    if !early.is_empty() {
        upstream_wr.write_all(early).await?;
        up.fetch_add(early.len() as u64, Ordering::Relaxed);
    }
    tokio::try_join!(
        pump(&mut client_rd, &mut upstream_wr, up),
        pump(&mut upstream_rd, &mut client_wr, down),
    )?;
    Ok(())
}

/// Copies `from` to `to` until EOF, then shuts `to`'s write side down. The buffer exists
/// only while bytes are moving: it is dropped whenever a read has to wait, so thousands of
/// idle tunnels (HTTP/2 streams, typically) hold no buffers.
async fn pump<R, W>(from: &mut R, to: &mut W, count: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    loop {
        let n = std::future::poll_fn(|cx| {
            if buf.is_empty() {
                buf = vec![0u8; PUMP_BUF];
            }
            let mut read = ReadBuf::new(&mut buf);
            let polled = Pin::new(&mut *from).poll_read(cx, &mut read);
            let filled = read.filled().len();
            match polled {
                Poll::Ready(result) => Poll::Ready(result.map(|()| filled)),
                Poll::Pending => {
                    buf = Vec::new();
                    Poll::Pending
                }
            }
        })
        .await?;
        if n == 0 {
            // The other side may be gone entirely; the half-close is best effort.
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------
// Request head (sans-I/O apart from `read_head`).

#[derive(Debug)]
enum HeadError {
    /// The client closed before sending anything.
    Closed,
    TooLarge,
    Malformed(String),
    Io(io::Error),
}

/// A complete request head plus whatever arrived behind it.
struct Head {
    buf: Vec<u8>,
    len: usize,
}

/// The parts of a request the policy looks at.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, Vec<u8>)>,
}

impl Request {
    fn header_names(&self) -> Vec<&str> {
        self.headers.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn header(&self, name: &str) -> impl Iterator<Item = &[u8]> {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

impl Head {
    fn request(&self) -> Request {
        // `read_head` only returns heads that parsed completely.
        parse_head(&self.buf[..self.len])
            .ok()
            .flatten()
            .map(|(req, _)| req)
            .expect("head parsed before")
    }
}

async fn read_head<S: AsyncRead + Unpin>(client: &mut S) -> Result<Head, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = client.read(&mut chunk).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HeadError::Closed
            } else {
                HeadError::Malformed("connection closed inside the request head".into())
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_head(&buf[..buf.len().min(MAX_HEAD)])? {
            Some((_, len)) => return Ok(Head { buf, len }),
            None if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
            None => {}
        }
    }
}

/// Parses a request head strictly. `Ok(None)` means more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) => {
            let request = Request {
                method: req.method.unwrap_or_default().to_owned(),
                target: req.path.unwrap_or_default().to_owned(),
                headers: req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), h.value.to_vec()))
                    .collect(),
            };
            Ok(Some((request, len)))
        }
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(HeadError::Malformed(format!("malformed request: {e}"))),
    }
}

// ---------------------------------------------------------------------------------------
// Policy: pure decisions.

/// An error answer: status code and a one-line reason sent as the body.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    status: u16,
    reason: String,
}

impl Refusal {
    fn new(status: u16, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
        }
    }

    fn phrase(&self) -> &'static str {
        match self.status {
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            405 => "Method Not Allowed",
            407 => "Proxy Authentication Required",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            502 => "Bad Gateway",
            504 => "Gateway Timeout",
            _ => "Error",
        }
    }

    /// The header some statuses call for.
    fn extra_header(&self) -> Option<(&'static str, &'static str)> {
        match self.status {
            405 => Some(("Allow", "CONNECT")),
            401 => Some(("WWW-Authenticate", "Bearer realm=\"rdr-gateway-sim\"")),
            407 => Some(("Proxy-Authenticate", "Bearer realm=\"rdr-gateway-sim\"")),
            _ => None,
        }
    }

    fn body(&self) -> String {
        format!("{}\n", self.reason)
    }

    /// The HTTP/1.1 answer, closing the connection.
    fn response(&self) -> String {
        let extra = self
            .extra_header()
            .map_or_else(String::new, |(name, value)| format!("{name}: {value}\r\n"));
        let body = self.body();
        format!(
            "HTTP/1.1 {} {}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            self.status,
            self.phrase(),
            body.len()
        )
    }

    /// The HTTP/2 answer: the same status, header and body on this stream only (hyper adds
    /// content-length and ends the stream after the body).
    fn h2_response(&self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body())));
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain"),
        );
        if let Some((name, value)) = self.extra_header()
            && let Ok(name) = hyper::header::HeaderName::from_bytes(name.as_bytes())
        {
            headers.insert(name, hyper::header::HeaderValue::from_static(value));
        }
        response
    }
}

/// Where an allowed tunnel goes.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    addrs: Vec<IpAddr>,
    port: u16,
}

struct Policy {
    allow: Vec<Pattern>,
    resolve: Vec<(HostPattern, IpAddr)>,
    bearer: Option<String>,
    bearer_status: u16,
}

impl Policy {
    fn decide(&self, req: &Request) -> Result<Target, Refusal> {
        if req.method != "CONNECT" {
            return Err(Refusal::new(405, "only CONNECT is supported"));
        }
        let (host, port) = parse_authority(&req.target)
            .map_err(|why| Refusal::new(400, format!("bad CONNECT target: {why}")))?;
        // CONNECT carries no body; a framing header here means a confused or hostile client.
        if req.header("transfer-encoding").next().is_some()
            || req.header("content-length").any(|v| v != b"0")
        {
            return Err(Refusal::new(400, "CONNECT must not carry a body"));
        }
        if let Some(token) = &self.bearer {
            let presented = req
                .header("proxy-authorization")
                .chain(req.header("authorization"))
                .any(|v| bearer_token(v) == Some(token.as_bytes()));
            if !presented {
                return Err(Refusal::new(
                    self.bearer_status,
                    "bearer token missing or wrong",
                ));
            }
        }
        if !self.allow.iter().any(|p| p.matches(&host, port)) {
            return Err(Refusal::new(
                403,
                format!("{host}:{port} is not in the allowlist"),
            ));
        }
        let addrs = self.lookup(&host);
        if addrs.is_empty() {
            return Err(Refusal::new(502, format!("no --resolve entry for {host}")));
        }
        Ok(Target { addrs, port })
    }

    /// Static resolution: IP literals are themselves; exact entries beat wildcard ones.
    fn lookup(&self, host: &Host) -> Vec<IpAddr> {
        match host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(_) => {
                let exact: Vec<IpAddr> = self
                    .resolve
                    .iter()
                    .filter(|(p, _)| matches!(p, HostPattern::Exact(_)) && p.matches(host))
                    .map(|(_, ip)| *ip)
                    .collect();
                if !exact.is_empty() {
                    return exact;
                }
                self.resolve
                    .iter()
                    .filter(|(p, _)| p.matches(host))
                    .map(|(_, ip)| *ip)
                    .collect()
            }
        }
    }
}

fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ")).then(|| rest.trim_ascii())
}

/// A CONNECT target host, normalized: lowercase, no trailing dot.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Host {
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Parses an authority-form target (`host:port`, `[v6]:port`); the port is mandatory.
fn parse_authority(s: &str) -> Result<(Host, u16), &'static str> {
    let (host, port) = split_host_port(s)?;
    let port = port.ok_or("missing port")?;
    Ok((parse_host(host, is_bracketed(s))?, port))
}

/// Splits `host[:port]` / `[v6][:port]`. A bare IPv6 address (several colons, no brackets)
/// is returned whole without a port.
fn split_host_port(s: &str) -> Result<(&str, Option<u16>), &'static str> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed '['")?;
        return match after {
            "" => Ok((host, None)),
            _ => Ok((
                host,
                Some(parse_port(
                    after.strip_prefix(':').ok_or("junk after ']'")?,
                )?),
            )),
        };
    }
    match s.matches(':').count() {
        0 => Ok((s, None)),
        1 => {
            let (host, port) = s.split_once(':').expect("one colon");
            Ok((host, Some(parse_port(port)?)))
        }
        _ => Ok((s, None)),
    }
}

fn is_bracketed(s: &str) -> bool {
    s.starts_with('[')
}

fn parse_port(s: &str) -> Result<u16, &'static str> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("bad port");
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err("bad port"),
        Ok(port) => Ok(port),
    }
}

/// Parses a host: an IP literal (IPv6 only when it came in brackets) or a DNS name.
fn parse_host(s: &str, bracketed: bool) -> Result<Host, &'static str> {
    if bracketed {
        return match s.parse::<std::net::Ipv6Addr>() {
            Ok(ip) => Ok(Host::Ip(IpAddr::V6(ip))),
            Err(_) => Err("bad IPv6 literal"),
        };
    }
    if s.contains(':') {
        return Err("IPv6 literal must be in brackets");
    }
    if let Ok(ip) = s.parse::<std::net::Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    Ok(Host::Name(normalize_name(s)?))
}

/// Lowercases and validates a DNS name (letters, digits, '-', '_'; labels of 1..=63;
/// at most 253 bytes); one trailing dot is dropped.
fn normalize_name(s: &str) -> Result<String, &'static str> {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() || s.len() > 253 {
        return Err("bad host name length");
    }
    for label in s.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("bad label length in host name");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("bad character in host name");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("label starts or ends with '-'");
        }
    }
    if s.rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("numeric top-level label (not an IPv4 address)");
    }
    Ok(s.to_ascii_lowercase())
}

/// The host part of an --allow pattern or a --resolve name.
#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.suffix`, stored without the `*.`: matches one or more labels below it.
    Wildcard(String),
    Ip(IpAddr),
}

impl HostPattern {
    fn parse(s: &str, bracketed: bool) -> Result<HostPattern, String> {
        if let Some(suffix) = s.strip_prefix("*.") {
            return Ok(HostPattern::Wildcard(
                normalize_name(suffix).map_err(|e| format!("{s:?}: {e}"))?,
            ));
        }
        match parse_host(s, bracketed).map_err(|e| format!("{s:?}: {e}"))? {
            Host::Name(n) => Ok(HostPattern::Exact(n)),
            Host::Ip(ip) => Ok(HostPattern::Ip(ip)),
        }
    }

    fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (HostPattern::Exact(p), Host::Name(n)) => p == n,
            (HostPattern::Wildcard(suffix), Host::Name(n)) => n
                .strip_suffix(suffix.as_str())
                .and_then(|below| below.strip_suffix('.'))
                .is_some_and(|below| !below.is_empty()),
            (HostPattern::Ip(p), Host::Ip(ip)) => canonical(*p) == canonical(*ip),
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses compare equal to their IPv4 form.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An --allow pattern: a host pattern and an optional port.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pattern {
    host: HostPattern,
    port: Option<u16>,
}

impl Pattern {
    fn parse(s: &str) -> Result<Pattern, String> {
        let (host, port) = split_host_port(s).map_err(|e| format!("{s:?}: {e}"))?;
        let host = HostPattern::parse(host, is_bracketed(s) || host.contains(':'))?;
        Ok(Pattern { host, port })
    }

    fn matches(&self, host: &Host, port: u16) -> bool {
        self.port.is_none_or(|p| p == port) && self.host.matches(host)
    }
}

fn parse_resolve(s: &str) -> Result<(HostPattern, IpAddr), String> {
    let (name, ip) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=IP"))?;
    let host = HostPattern::parse(name, false)?;
    if matches!(host, HostPattern::Ip(_)) {
        return Err(format!("{s:?}: NAME must be a host name"));
    }
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    let ip = ip.parse::<IpAddr>().map_err(|e| format!("{s:?}: {e}"))?;
    Ok((host, ip))
}

// ---------------------------------------------------------------------------------------
// Output.

/// Writes one line to stdout and flushes it, so tests reading a pipe see it at once.
fn log_line(args: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{args}");
    let _ = out.flush();
}

/// Makes a client-supplied string safe for a one-line log: printable ASCII only, capped.
fn printable(s: &str) -> String {
    s.chars()
        .take(256)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        let (h, p) = split_host_port(s).expect("split");
        assert!(p.is_none());
        parse_host(h, s.starts_with('[')).expect("host")
    }

    #[test]
    fn pattern_matcher_table() {
        // (pattern, host, port, expected)
        let cases: &[(&str, &str, u16, bool)] = &[
            ("example.test", "example.test", 443, true),
            ("example.test", "example.test", 80, true),
            ("example.test", "EXAMPLE.Test.", 443, true),
            ("Example.TEST.", "example.test", 443, true),
            ("example.test", "a.example.test", 443, false),
            ("example.test", "example.test2", 443, false),
            ("example.test:443", "example.test", 443, true),
            ("example.test:443", "example.test", 8443, false),
            ("*.example.test", "a.example.test", 443, true),
            ("*.example.test", "a.b.c.example.test", 1, true),
            ("*.example.test", "A.Example.Test.", 443, true),
            ("*.example.test", "example.test", 443, false),
            ("*.example.test", "aexample.test", 443, false),
            ("*.example.test", "a.example.test.evil", 443, false),
            (
                "*.update.example.test:80",
                "x.update.example.test",
                80,
                true,
            ),
            (
                "*.update.example.test:80",
                "x.update.example.test",
                443,
                false,
            ),
            ("*.example.test", "203.0.113.7", 443, false),
            ("203.0.113.7", "203.0.113.7", 443, true),
            ("203.0.113.7:443", "203.0.113.7", 80, false),
            ("203.0.113.7", "203.0.113.8", 443, false),
            ("203.0.113.7", "[::ffff:203.0.113.7]", 443, true),
            ("[2001:db8::7]:443", "[2001:db8::7]", 443, true),
            ("[2001:db8::7]:443", "[2001:db8:0:0::7]", 443, true),
            ("[2001:db8::7]:443", "[2001:db8::7]", 80, false),
            ("2001:db8::7", "[2001:db8::7]", 80, true),
            ("[2001:db8::7]", "[2001:db8::8]", 80, false),
            ("example.test", "203.0.113.7", 443, false),
        ];
        for &(pattern, target, port, want) in cases {
            let p = Pattern::parse(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
            assert_eq!(
                p.matches(&host(target), port),
                want,
                "{pattern} vs {target}:{port}"
            );
        }
    }

    #[test]
    fn bad_patterns_are_rejected() {
        for bad in [
            "",
            "*",
            "*.",
            "**.example.test",
            "a*.example.test",
            "exa mple.test",
            "example.test:",
            "example.test:0",
            "example.test:65536",
            "example.test:+443",
            "[2001:db8::7",
            "[example.test]:443",
            "-a.example.test",
            "a..b",
            "1.2.3",
            "a/b",
            "a@b",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn authority_parsing() {
        let ok: &[(&str, Host, u16)] = &[
            ("example.test:443", Host::Name("example.test".into()), 443),
            (
                "Example.Test.:8443",
                Host::Name("example.test".into()),
                8443,
            ),
            ("203.0.113.7:1", Host::Ip("203.0.113.7".parse().unwrap()), 1),
            (
                "[2001:db8::1]:65535",
                Host::Ip("2001:db8::1".parse().unwrap()),
                65535,
            ),
        ];
        for (s, h, p) in ok {
            assert_eq!(parse_authority(s), Ok((h.clone(), *p)), "{s}");
        }
        for bad in [
            "example.test",
            "example.test:",
            ":443",
            "2001:db8::1:443",
            "[2001:db8::1]",
            "[2001:db8::1]443",
            "/index.html",
            "http://example.test:443",
            "user@example.test:443",
            "example.test:443/x",
            "example.test:99999",
            "[203.0.113.7]:443",
            "exa%6dple.test:443",
        ] {
            assert!(parse_authority(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    fn policy() -> Policy {
        Policy {
            allow: ["example.test:443", "*.wild.test", "203.0.113.9"]
                .into_iter()
                .map(|p| Pattern::parse(p).unwrap())
                .collect(),
            resolve: [
                "example.test=127.0.0.1",
                "*.wild.test=127.0.0.2",
                "a.wild.test=127.0.0.3",
            ]
            .into_iter()
            .map(|r| parse_resolve(r).unwrap())
            .collect(),
            bearer: None,
            bearer_status: 407,
        }
    }

    fn req(method: &str, target: &str, headers: &[(&str, &str)]) -> Request {
        Request {
            method: method.into(),
            target: target.into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    fn status(r: Result<Target, Refusal>) -> u16 {
        r.map_or_else(|e| e.status, |_| 200)
    }

    #[test]
    fn policy_decisions() {
        let p = policy();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            p.decide(&req(
                "CONNECT",
                "example.test:443",
                &[("Host", "example.test:443")]
            )),
            Ok(Target {
                addrs: vec![ip("127.0.0.1")],
                port: 443
            })
        );
        // Exact --resolve entries beat wildcard ones.
        assert_eq!(
            p.decide(&req("CONNECT", "a.wild.test:80", &[]))
                .unwrap()
                .addrs,
            vec![ip("127.0.0.3")]
        );
        assert_eq!(
            p.decide(&req("CONNECT", "b.wild.test:80", &[]))
                .unwrap()
                .addrs,
            vec![ip("127.0.0.2")]
        );
        // IP literals connect to themselves, but only when a pattern names them.
        assert_eq!(
            p.decide(&req("CONNECT", "203.0.113.9:22", &[]))
                .unwrap()
                .addrs,
            vec![ip("203.0.113.9")]
        );
        assert_eq!(status(p.decide(&req("CONNECT", "127.0.0.1:443", &[]))), 403);
        assert_eq!(
            status(p.decide(&req("CONNECT", "example.test:80", &[]))),
            403
        );
        assert_eq!(
            status(p.decide(&req("CONNECT", "other.test:443", &[]))),
            403
        );
        assert_eq!(
            status(p.decide(&req("GET", "http://example.test/", &[]))),
            405
        );
        assert_eq!(status(p.decide(&req("CONNECT", "example.test", &[]))), 400);
        assert_eq!(
            status(p.decide(&req(
                "CONNECT",
                "example.test:443",
                &[("Content-Length", "5")]
            ))),
            400
        );
        assert_eq!(
            status(p.decide(&req(
                "CONNECT",
                "example.test:443",
                &[("Transfer-Encoding", "chunked")]
            ))),
            400
        );

        // Allowed but not resolvable: 502, never DNS.
        let mut p = policy();
        p.allow.push(Pattern::parse("nores.test").unwrap());
        assert_eq!(
            status(p.decide(&req("CONNECT", "nores.test:443", &[]))),
            502
        );
    }

    #[test]
    fn bearer_token_is_checked() {
        let mut p = policy();
        p.bearer = Some("s3cret".into());
        let t = "example.test:443";
        assert_eq!(status(p.decide(&req("CONNECT", t, &[]))), 407);
        assert_eq!(
            status(p.decide(&req("CONNECT", t, &[("Authorization", "Bearer wrong")]))),
            407
        );
        assert_eq!(
            status(p.decide(&req("CONNECT", t, &[("Authorization", "Basic s3cret")]))),
            407
        );
        assert_eq!(
            status(p.decide(&req("CONNECT", t, &[("Authorization", "Bearer s3cret")]))),
            200
        );
        assert_eq!(
            status(p.decide(&req(
                "CONNECT",
                t,
                &[("proxy-authorization", "bearer  s3cret ")]
            ))),
            200
        );
        // Auth is checked before the allowlist, so a probe learns nothing without the token.
        assert_eq!(
            status(p.decide(&req("CONNECT", "other.test:443", &[]))),
            407
        );
    }

    #[test]
    fn resolve_entries_are_validated() {
        assert!(parse_resolve("example.test=127.0.0.1").is_ok());
        assert!(parse_resolve("*.example.test=::1").is_ok());
        assert!(parse_resolve("example.test=[::1]").is_ok());
        assert!(parse_resolve("example.test").is_err());
        assert!(parse_resolve("example.test=nope").is_err());
        assert!(parse_resolve("203.0.113.7=127.0.0.1").is_err());
    }

    async fn head_of(bytes: &[u8]) -> Result<Head, HeadError> {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let bytes = bytes.to_vec();
        let writer = tokio::spawn(async move {
            // Dribble the request in small pieces to exercise partial parses.
            for piece in bytes.chunks(7) {
                if a.write_all(piece).await.is_err() {
                    break;
                }
            }
            // Dropping `a` here is the client's EOF.
        });
        let head = read_head(&mut b).await;
        writer.await.expect("writer task");
        head
    }

    #[tokio::test]
    async fn request_head_reading() {
        let head =
            head_of(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\nEARLY")
                .await
                .expect("complete head");
        assert_eq!(&head.buf[head.len..], b"EARLY");
        let request = head.request();
        assert_eq!(request.method, "CONNECT");
        assert_eq!(request.header_names(), vec!["Host"]);

        assert!(matches!(head_of(b"").await, Err(HeadError::Closed)));
        assert!(matches!(
            head_of(b"CONNECT a:1 HTTP/1.1\r\n").await,
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            head_of(b"\x16\x03\x01\x02\x00junk\r\n\r\n").await,
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            head_of(b"CONNECT a:1 HTTP/2.0\r\n\r\n").await,
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            head_of(b"CONNECT a:1 HTTP/1.1\r\nBad Header: x\r\n\r\n").await,
            Err(HeadError::Malformed(_))
        ));

        let mut big = b"CONNECT a.test:1 HTTP/1.1\r\n".to_vec();
        while big.len() < MAX_HEAD + 100 {
            big.extend_from_slice(
                b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        big.extend_from_slice(b"\r\n");
        assert!(matches!(head_of(&big).await, Err(HeadError::TooLarge)));

        let mut many = b"CONNECT a.test:1 HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(head_of(&many).await, Err(HeadError::TooLarge)));
    }

    #[test]
    fn responses_are_well_formed() {
        let r = Refusal::new(407, "bearer token missing or wrong").response();
        assert!(r.starts_with("HTTP/1.1 407 Proxy Authentication Required\r\n"));
        assert!(r.contains("\r\nProxy-Authenticate: Bearer realm=\"rdr-gateway-sim\"\r\n"));
        assert!(r.ends_with("\r\n\r\nbearer token missing or wrong\n"));
        assert!(
            Refusal::new(405, "x")
                .response()
                .contains("\r\nAllow: CONNECT\r\n")
        );
        assert_eq!(printable("a b\r\n\u{e9}"), "a?b???");
    }

    #[test]
    fn h2_responses_match_the_http1_ones() {
        let r = Refusal::new(407, "bearer token missing or wrong").h2_response();
        assert_eq!(r.status(), StatusCode::PROXY_AUTHENTICATION_REQUIRED);
        assert_eq!(
            r.headers()["proxy-authenticate"],
            "Bearer realm=\"rdr-gateway-sim\""
        );
        assert_eq!(r.headers()["content-type"], "text/plain");
        let r = Refusal::new(405, "only CONNECT is supported").h2_response();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()["allow"], "CONNECT");
        let r = Refusal::new(403, "x").h2_response();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(!r.headers().contains_key("connection"));
        // HTTP/1.1 answers are unchanged by the shared helpers.
        assert_eq!(
            Refusal::new(403, "no").response(),
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\
             Connection: close\r\n\r\nno\n"
        );
    }

    #[test]
    fn alpn_list_and_offer_h2() {
        let list = |alpn: &[&str], offer| {
            alpn_list(
                &alpn.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                offer,
            )
        };
        assert_eq!(list(&["http/1.1"], false), ["http/1.1"]);
        assert_eq!(list(&["http/1.1"], true), ["h2", "http/1.1"]);
        assert_eq!(list(&["http/1.1", "h2"], true), ["http/1.1", "h2"]);
        assert_eq!(list(&["h2"], false), ["h2"]);
        assert!(parse_alpn("h2").is_ok());
        assert!(parse_alpn("").is_err());
        assert!(parse_alpn(&"x".repeat(256)).is_err());
        let args = Args::try_parse_from(["sim", "--listen", "127.0.0.1:0", "--silent"]).unwrap();
        assert_eq!(args.h2_max_streams, 1000);
        assert!(!args.offer_h2);
        assert_eq!(args.alpn, ["http/1.1"]);
    }

    fn h2_req(method: &str, uri: Uri, headers: &[(&str, &str)]) -> Request {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                hyper::header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h2_request(&method.parse().unwrap(), &uri, &map)
    }

    #[test]
    fn h2_request_target_is_the_authority() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        // A standard HTTP/2 CONNECT: :authority only.
        let r = h2_req(
            "CONNECT",
            uri("Example.Test:443"),
            &[("proxy-authorization", "Bearer t")],
        );
        assert_eq!(r.method, "CONNECT");
        assert_eq!(r.target, "Example.Test:443");
        assert_eq!(r.header_names(), vec!["proxy-authorization"]);
        assert_eq!(
            h2_req("CONNECT", uri("[2001:db8::1]:443"), &[]).target,
            "[2001:db8::1]:443"
        );
        // No :authority at all (h2 hands over an empty URI): empty target, shown as `-`.
        let empty = Uri::from_parts(hyper::http::uri::Parts::default()).unwrap();
        let r = h2_req("CONNECT", empty, &[("host", "example.test:443")]);
        assert_eq!(r.target, "");
        assert_eq!(shown_target(&r.target), "-");
        // A scheme or path on a CONNECT keeps the whole URI, so it cannot pass as authority.
        assert_eq!(
            h2_req("CONNECT", uri("https://example.test:443/x"), &[]).target,
            "https://example.test:443/x"
        );
        // Other methods show their URI, like an HTTP/1.1 request line.
        assert_eq!(
            h2_req("GET", uri("https://example.test/index.html"), &[]).target,
            "https://example.test/index.html"
        );
        assert_eq!(shown_target("a b"), "a?b");
    }

    #[test]
    fn h2_requests_get_the_same_policy() {
        let p = policy();
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        let decide = |method: &str, u: Uri, headers: &[(&str, &str)]| {
            status(p.decide(&h2_req(method, u, headers)))
        };
        assert_eq!(decide("CONNECT", uri("example.test:443"), &[]), 200);
        assert_eq!(decide("CONNECT", uri("a.wild.test:8080"), &[]), 200);
        assert_eq!(decide("CONNECT", uri("other.test:443"), &[]), 403);
        assert_eq!(decide("CONNECT", uri("example.test"), &[]), 400);
        assert_eq!(decide("CONNECT", uri("user@example.test:443"), &[]), 400);
        assert_eq!(
            decide("CONNECT", uri("https://example.test:443/"), &[]),
            400
        );
        let empty = Uri::from_parts(hyper::http::uri::Parts::default()).unwrap();
        assert_eq!(decide("CONNECT", empty, &[]), 400);
        assert_eq!(decide("GET", uri("https://example.test/"), &[]), 405);
        assert_eq!(decide("POST", uri("example.test:443"), &[]), 405);
        assert_eq!(
            decide(
                "CONNECT",
                uri("example.test:443"),
                &[("content-length", "5")]
            ),
            400
        );
        let mut p = policy();
        p.bearer = Some("s3cret".into());
        let with = |headers: &[(&str, &str)]| {
            status(p.decide(&h2_req("CONNECT", uri("example.test:443"), headers)))
        };
        assert_eq!(with(&[]), 407);
        assert_eq!(with(&[("proxy-authorization", "Bearer s3cret")]), 200);
        assert_eq!(with(&[("authorization", "Bearer nope")]), 407);
    }

    #[tokio::test]
    async fn pump_copies_across_waits_and_half_closes() {
        let (mut client, mut from) = tokio::io::duplex(1024);
        let (mut to, mut sink) = tokio::io::duplex(64 * 1024);
        let count = AtomicU64::new(0);
        let copier = async {
            pump(&mut from, &mut to, &count).await.unwrap();
            drop(to);
        };
        let feeder = async {
            // Trickle with pauses, so the pump waits (and drops its buffer) in between.
            for piece in [&b"abc"[..], &[b'x'; 5000][..], b"end"] {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
        };
        let reader = async {
            let mut got = Vec::new();
            sink.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), (), got) = tokio::join!(copier, feeder, reader);
        assert_eq!(got.len(), 3 + 5000 + 3);
        assert!(got.starts_with(b"abc") && got.ends_with(b"end"));
        assert_eq!(count.load(Ordering::Relaxed), 5006);
    }
}
