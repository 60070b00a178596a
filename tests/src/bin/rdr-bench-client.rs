//! rdr-bench-client: load generator and target server for `cargo xtask bench`.
//!
//! One binary, two roles, one tiny HTTP/1.1 protocol (client speaks first, so the
//! redirector learns the host name from the `Host` header at once and never waits for its
//! sniff timeout):
//!
//! - `serve --listen ADDR`: the target. Keep-alive; `GET /small` answers `peer=<addr>\n`
//!   (so a probe proves which way a connection came), `GET /down/<n>` answers `n` bytes,
//!   `POST /echo` answers its own body, `POST /up` reads its body (of any length, without
//!   holding it) and answers how many bytes it read.
//! - `probe`, `bulk`, `rr`, `connect`, `idle`: the client. It dials `--target` as a plain
//!   application would (whatever captures the connect — the redirector's hook, iptables —
//!   decides the path), or, with `--env-gateway`, does what a proxy-aware client does with
//!   `https_proxy=https://gw…`: CONNECT gw:443 through `--env-proxy` (Basic auth from
//!   `BENCH_PROXY_AUTH=user:password`), TLS to the gateway, CONNECT `--host` inside, then the
//!   same HTTP. Every client mode prints one JSON object on stdout.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde_json::json;
use tokio::{
    io::{
        AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _,
        BufReader,
    },
    net::{TcpSocket, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::TlsConnector;

#[derive(Parser)]
#[command(name = "rdr-bench-client")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Run the target server.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// One connection, one `GET /small`; prints what the server saw as our address.
    Probe {
        #[command(flatten)]
        path: PathOpts,
    },
    /// `--conns` connections download `--bytes` in total, all at once (with `--up`, upload).
    Bulk {
        #[command(flatten)]
        path: PathOpts,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long)]
        bytes: u64,
        /// Upload instead: each connection sends its share as a `POST /up` body.
        #[arg(long)]
        up: bool,
    },
    /// Request/response ping-pong of `--size` bytes each way on one open connection.
    Rr {
        #[command(flatten)]
        path: PathOpts,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
    /// New connections (connect, `GET /small`, close) from `--concurrency` workers.
    Connect {
        #[command(flatten)]
        path: PathOpts,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    /// Opens `--conns` connections (each does one `GET /small`), prints them, and holds them
    /// open until stdin closes.
    Idle {
        #[command(flatten)]
        path: PathOpts,
        #[arg(long)]
        conns: usize,
        #[arg(long, default_value_t = 128)]
        parallel: usize,
    },
}

#[derive(Args, Clone)]
struct PathOpts {
    /// Address the application dials.
    #[arg(long)]
    target: SocketAddr,
    /// Host header (and, with --env-gateway, the CONNECT authority).
    #[arg(long, default_value = "bulk.azure.test:8080")]
    host: String,
    /// Proxy-aware client: the HTTPS proxy (gateway) address to dial, e.g. 203.0.113.60:443.
    #[arg(long)]
    env_gateway: Option<SocketAddr>,
    /// Name of the gateway (SNI, certificate, CONNECT authority through --env-proxy).
    #[arg(long, default_value = "gw.arc.test")]
    env_gateway_name: String,
    /// CA bundle (PEM) that signs the gateway certificate.
    #[arg(long)]
    env_ca: Option<PathBuf>,
    /// HTTP proxy in front of the gateway (credentials from BENCH_PROXY_AUTH).
    #[arg(long)]
    env_proxy: Option<SocketAddr>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Conn = BufReader<Box<dyn Io>>;

/// How to open a connection to the target.
struct Dialer {
    opts: PathOpts,
    env: Option<Env>,
}

struct Env {
    gateway: SocketAddr,
    name: ServerName<'static>,
    tls: TlsConnector,
    proxy: Option<(SocketAddr, Option<String>)>,
}

impl Dialer {
    fn new(opts: PathOpts) -> anyhow::Result<Dialer> {
        let env = match opts.env_gateway {
            None => None,
            Some(gateway) => {
                let ca = opts
                    .env_ca
                    .as_ref()
                    .context("--env-gateway needs --env-ca")?;
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca)
                    .with_context(|| format!("read {}", ca.display()))?
                {
                    roots.add(c?)?;
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
                let auth = std::env::var("BENCH_PROXY_AUTH")
                    .ok()
                    .map(|a| base64_encode(a.as_bytes()));
                Some(Env {
                    gateway,
                    name: ServerName::try_from(opts.env_gateway_name.clone())?,
                    tls: TlsConnector::from(Arc::new(cfg)),
                    proxy: opts.env_proxy.map(|p| (p, auth)),
                })
            }
        };
        Ok(Dialer { opts, env })
    }

    async fn open(&self) -> anyhow::Result<Conn> {
        let io: Box<dyn Io> = match &self.env {
            None => Box::new(tcp(self.opts.target).await?),
            Some(env) => {
                let s = match &env.proxy {
                    None => tcp(env.gateway).await?,
                    Some((proxy, auth)) => {
                        let mut s = tcp(*proxy).await?;
                        let authority =
                            format!("{}:{}", self.opts.env_gateway_name, env.gateway.port());
                        connect_request(&mut s, &authority, auth.as_deref())
                            .await
                            .context("CONNECT via the proxy")?;
                        s
                    }
                };
                s.set_nodelay(true)?;
                let mut tls = env
                    .tls
                    .connect(env.name.clone(), s)
                    .await
                    .context("TLS to the gateway")?;
                connect_request(&mut tls, &self.opts.host, None)
                    .await
                    .context("CONNECT via the gateway")?;
                Box::new(tls)
            }
        };
        Ok(BufReader::with_capacity(16 * 1024, io))
    }
}

async fn tcp(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends `CONNECT authority` and reads the answer; anything but 2xx is an error.
async fn connect_request<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    authority: &str,
    basic: Option<&str>,
) -> anyhow::Result<()> {
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(b) = basic {
        req.push_str(&format!("Proxy-Authorization: Basic {b}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    s.flush().await?;
    // The proxy sends nothing after its answer until we speak, so reading in chunks never
    // swallows tunnel bytes; check it anyway.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed during the CONNECT answer");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            if end + 4 != buf.len() {
                bail!("bytes after the CONNECT answer");
            }
            break;
        }
        if buf.len() > 16 * 1024 {
            bail!("CONNECT answer too long");
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        bail!("CONNECT {authority}: {}", line.lines().next().unwrap_or(""));
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Reads a response (or request) head: the first line and the content length.
async fn read_head<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    line: &mut String,
) -> anyhow::Result<Option<(String, u64)>> {
    line.clear();
    if r.read_line(line).await? == 0 {
        return Ok(None);
    }
    let first = line.trim_end().to_owned();
    let mut len = 0u64;
    loop {
        line.clear();
        if r.read_line(line).await? == 0 {
            bail!("closed inside a head");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().context("content-length")?;
        }
    }
    Ok(Some((first, len)))
}

/// Reads an answer's head; returns its body length, or an error for anything but a 200.
async fn ok_answer(c: &mut Conn) -> anyhow::Result<u64> {
    let mut line = String::new();
    let (first, len) = read_head(c, &mut line)
        .await?
        .context("closed before the answer")?;
    if !first.starts_with("HTTP/1.1 200") {
        bail!("answer: {first}");
    }
    Ok(len)
}

/// Sends one request and reads the whole answer; returns the body length. The body lands in
/// `body` when `keep` (else it is read through `body` as scratch space and dropped).
async fn request(
    c: &mut Conn,
    host: &str,
    method: &str,
    path: &str,
    payload: &[u8],
    body: &mut Vec<u8>,
    keep: bool,
) -> anyhow::Result<u64> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n",
        payload.len()
    )
    .into_bytes();
    req.extend_from_slice(payload);
    c.get_mut().write_all(&req).await?;
    c.get_mut().flush().await?;
    let len = ok_answer(c).await?;
    if keep {
        body.resize(len as usize, 0);
        c.read_exact(body).await?;
    } else {
        if body.len() < 256 * 1024 {
            body.resize(256 * 1024, 0);
        }
        let mut left = len;
        while left > 0 {
            let want = left.min(body.len() as u64) as usize;
            let n = c.read(&mut body[..want]).await?;
            if n == 0 {
                bail!("closed with {left} bytes of the body missing");
            }
            left -= n as u64;
        }
    }
    Ok(len)
}

/// Sends `n` bytes as the body of `POST /up`, in writes of 256 KiB, and returns how many the
/// server says it read (an error if that is not `n`).
async fn upload(c: &mut Conn, host: &str, n: u64) -> anyhow::Result<u64> {
    let chunk = pattern(256 * 1024);
    let head = format!("POST /up HTTP/1.1\r\nHost: {host}\r\nContent-Length: {n}\r\n\r\n");
    c.get_mut().write_all(head.as_bytes()).await?;
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        c.get_mut().write_all(&chunk[..k]).await?;
        left -= k as u64;
    }
    c.get_mut().flush().await?;
    let len = ok_answer(c).await?;
    let mut body = vec![0; len as usize];
    c.read_exact(&mut body).await?;
    let got: u64 = String::from_utf8_lossy(&body)
        .trim()
        .parse()
        .context("the count in /up's answer")?;
    if got != n {
        bail!("the server read {got} bytes of an upload of {n}");
    }
    Ok(n)
}

/// `len` bytes that do not look repetitive (xorshift), the bulk scenarios' payload.
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn small(c: &mut Conn, host: &str) -> anyhow::Result<String> {
    let mut body = Vec::new();
    request(c, host, "GET", "/small", &[], &mut body, true).await?;
    Ok(String::from_utf8_lossy(&body).trim().to_owned())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn raise_nofile() {
    // SAFETY: rlimit is plain integers, so the zeroed value is valid; getrlimit writes into
    // and setrlimit reads from that live local only.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn main() -> anyhow::Result<()> {
    raise_nofile();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.mode {
            Mode::Serve { listen } => serve(listen).await,
            Mode::Probe { path } => {
                let d = Dialer::new(path)?;
                let t = Instant::now();
                let mut c = d.open().await?;
                let seen = small(&mut c, &d.opts.host).await?;
                let peer = seen.strip_prefix("peer=").unwrap_or(&seen).to_owned();
                print_json(
                    json!({"mode": "probe", "peer": peer, "ms": t.elapsed().as_secs_f64() * 1e3}),
                );
                Ok(())
            }
            Mode::Bulk {
                path,
                conns,
                bytes,
                up,
            } => bulk(Dialer::new(path)?, conns, bytes, up).await,
            Mode::Rr {
                path,
                seconds,
                size,
            } => rr(Dialer::new(path)?, seconds, size).await,
            Mode::Connect {
                path,
                seconds,
                concurrency,
            } => connect(Arc::new(Dialer::new(path)?), seconds, concurrency).await,
            Mode::Idle {
                path,
                conns,
                parallel,
            } => idle(Arc::new(Dialer::new(path)?), conns, parallel).await,
        }
    })
}

fn print_json(v: serde_json::Value) {
    println!("{v}");
}

async fn bulk(d: Dialer, conns: usize, bytes: u64, up: bool) -> anyhow::Result<()> {
    // Open and warm every connection first, so the clock measures the transfer only.
    let mut open = Vec::new();
    for _ in 0..conns.max(1) {
        let mut c = d.open().await?;
        small(&mut c, &d.opts.host).await?;
        open.push(c);
    }
    let each = bytes / open.len() as u64;
    let host = d.opts.host.clone();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut c in open {
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            if up {
                return upload(&mut c, &host, each).await;
            }
            let mut scratch = Vec::new();
            request(
                &mut c,
                &host,
                "GET",
                &format!("/down/{each}"),
                &[],
                &mut scratch,
                false,
            )
            .await
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    print_json(
        json!({"mode": "bulk", "direction": if up { "up" } else { "down" }, "conns": conns, "bytes": total, "seconds": secs, "mb_per_s": total as f64 / secs / 1e6}),
    );
    Ok(())
}

async fn rr(d: Dialer, seconds: f64, size: usize) -> anyhow::Result<()> {
    let mut c = d.open().await?;
    let payload: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
    let mut body = Vec::new();
    for _ in 0..20 {
        request(
            &mut c,
            &d.opts.host,
            "POST",
            "/echo",
            &payload,
            &mut body,
            true,
        )
        .await?;
    }
    let mut lat = Vec::new();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let t = Instant::now();
        request(
            &mut c,
            &d.opts.host,
            "POST",
            "/echo",
            &payload,
            &mut body,
            true,
        )
        .await?;
        if body != payload {
            bail!("echo mismatch");
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    print_json(
        json!({"mode": "rr", "ops": lat.len(), "seconds": secs, "ops_per_s": lat.len() as f64 / secs,
        "p50_us": percentile(&lat, 0.5), "p99_us": percentile(&lat, 0.99)}),
    );
    Ok(())
}

async fn connect(d: Arc<Dialer>, seconds: f64, concurrency: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (d, errors) = (d.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut last_err = None;
            while Instant::now() < end {
                let t = Instant::now();
                let r = async {
                    let mut c = d.open().await?;
                    small(&mut c, &d.opts.host).await
                }
                .await;
                match r {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        last_err = Some(format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (lat, last_err)
        }));
    }
    let mut lat = Vec::new();
    let mut last_err = None;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        last_err = last_err.or(e);
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let errors = errors.load(Ordering::Relaxed);
    if lat.is_empty() {
        bail!(
            "no connection succeeded ({errors} errors; last: {})",
            last_err.unwrap_or_default()
        );
    }
    print_json(
        json!({"mode": "connect", "count": lat.len(), "errors": errors, "last_error": last_err,
        "seconds": secs, "per_s": lat.len() as f64 / secs,
        "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99), "mean_ms": lat.iter().sum::<f64>() / lat.len() as f64}),
    );
    Ok(())
}

async fn idle(d: Arc<Dialer>, conns: usize, parallel: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    let sem = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (d, sem) = (d.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let mut c = d.open().await?;
            small(&mut c, &d.opts.host).await?;
            anyhow::Ok(c)
        }));
    }
    let mut held = Vec::new();
    let mut errors = 0;
    let mut last_err = None;
    for t in tasks {
        match t.await? {
            Ok(c) => held.push(c),
            Err(e) => {
                errors += 1;
                last_err = Some(format!("{e:#}"));
            }
        }
    }
    print_json(
        json!({"mode": "idle", "open": held.len(), "errors": errors, "last_error": last_err, "seconds": start.elapsed().as_secs_f64()}),
    );
    // Hold until the caller closes our stdin.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    drop(held);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Server.

async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let sock = if listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(listen)
        .with_context(|| format!("bind {listen}"))?;
    let l = sock.listen(4096)?;
    // 256 KiB of non-repeating-looking bytes, sent over and over for /down.
    let data: Arc<Vec<u8>> = Arc::new(pattern(256 * 1024));
    println!("ready {listen}");
    loop {
        let (s, peer) = match l.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let data = data.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(s, peer, &data).await {
                eprintln!("conn {peer}: {e:#}");
            }
        });
    }
}

async fn serve_conn(s: TcpStream, peer: SocketAddr, data: &[u8]) -> anyhow::Result<()> {
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let mut line = String::new();
    let mut body = Vec::new();
    while let Some((first, len)) = read_head(&mut r, &mut line).await? {
        let mut parts = first.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if (method, path) == ("POST", "/up") {
            // Any length: read through a fixed buffer, counted, not kept.
            body.resize(256 * 1024, 0);
            let mut read = 0u64;
            while read < len {
                let want = (len - read).min(body.len() as u64) as usize;
                let n = r.read(&mut body[..want]).await?;
                if n == 0 {
                    bail!("closed {read} bytes into an upload of {len}");
                }
                read += n as u64;
            }
            let b = read.to_string();
            w.write_all(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{b}", b.len()).as_bytes(),
            )
            .await?;
            continue;
        }
        body.resize(len as usize, 0);
        r.read_exact(&mut body).await?;
        match (method, path) {
            ("GET", "/small") => {
                let b = format!("peer={peer}\n");
                w.write_all(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{b}", b.len()).as_bytes(),
                )
                .await?;
            }
            ("POST", "/echo") => {
                let mut out =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").into_bytes();
                out.extend_from_slice(&body);
                w.write_all(&out).await?;
            }
            ("GET", p) if p.starts_with("/down/") => {
                let n: u64 = p["/down/".len()..].parse().context("size")?;
                w.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes())
                    .await?;
                let mut left = n;
                while left > 0 {
                    let k = left.min(data.len() as u64) as usize;
                    w.write_all(&data[..k]).await?;
                    left -= k as u64;
                }
            }
            _ => {
                w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    .await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(i.as_bytes()), o);
        }
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
