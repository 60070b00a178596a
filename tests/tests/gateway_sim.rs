//! rdr-gateway-sim over real sockets on loopback: curl uses it as a standard HTTPS proxy,
//! tunnels relay with half-close, and everything not allowed is refused with the right status.
//! Over HTTP/2, an independent client (hyper-h2, `scripts/h2_connect.py`) proves it speaks
//! standard RFC 9113 CONNECT: many streams per connection, same policy, half-close both ways.
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tests::pki::{Leaf, TestCa};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};

const SIM: &str = env!("CARGO_BIN_EXE_rdr-gateway-sim");
const WAIT: Duration = Duration::from_secs(10);

/// A running simulator; its stdout lines are collected, and it is killed (by pid) on drop.
struct Sim {
    child: Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Sim {
    fn start(args: &[String]) -> Sim {
        let mut child = Command::new(SIM)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rdr-gateway-sim");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (stream, prefix) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, ""),
            (Box::new(stderr), "stderr: "),
        ] {
            let sink = lines.clone();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    sink.lock().unwrap().push(format!("{prefix}{line}"));
                }
            });
        }
        let mut sim = Sim {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
        };
        let listening = sim.wait_line("listening ");
        sim.addr = listening["listening ".len()..]
            .parse()
            .expect("listening address");
        sim
    }

    /// Waits for a stdout line containing `needle` and returns it.
    fn wait_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("rdr-gateway-sim exited ({status}) before printing {needle:?}");
            }
            assert!(
                Instant::now() < deadline,
                "no line containing {needle:?}; got:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Waits until `n` stdout lines contain `needle` and returns them.
    fn wait_lines(&mut self, needle: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let found: Vec<String> = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .cloned()
                .collect();
            if found.len() >= n {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} lines containing {needle:?}; got:\n{}",
                found.len(),
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything printed so far, for failure messages.
    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Pki {
    _dir: tempfile::TempDir,
    ca: TestCa,
    ca_pem: PathBuf,
    gw: Leaf,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(dir.path());
    let ca_pem = ca.write_ca(dir.path());
    let gw = ca.issue(&["gw.test", "127.0.0.1"]);
    Pki {
        _dir: dir,
        ca,
        ca_pem,
        gw,
    }
}

fn tls_args(gw: &Leaf) -> Vec<String> {
    vec![
        "--cert".into(),
        path(&gw.cert_pem_path),
        "--key".into(),
        path(&gw.key_pem_path),
    ]
}

fn path(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_owned()
}

/// Loopback echo server: echoes until EOF, then half-closes.
async fn echo_target() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = conn.into_split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    addr
}

/// Opens TLS to the simulator and sends one request head; returns the stream and the
/// response head.
async fn request(pki: &Pki, sim: &Sim, head: &str) -> (TlsStream<TcpStream>, String) {
    let tcp = TcpStream::connect(sim.addr).await.expect("connect sim");
    let connector = TlsConnector::from(pki.ca.client_config(&["http/1.1"]));
    let name = ServerName::try_from("gw.test").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("tls to sim");
    tls.write_all(head.as_bytes()).await.expect("send request");
    let response = read_response_head(&mut tls).await;
    (tls, response)
}

/// Reads byte by byte up to the blank line, so no tunnel byte is consumed.
async fn read_response_head<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        match timeout(WAIT, s.read(&mut b))
            .await
            .expect("response in time")
        {
            Ok(1) => head.push(b[0]),
            other => panic!(
                "response head ended early ({other:?}): {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8(head).expect("utf-8 head")
}

fn status_of(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("")
}

/// True when `tool` is on PATH; otherwise a failure in CI and a printed skip elsewhere.
fn have_tool(test: &str, tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {tool} not installed in CI");
    }
    eprintln!("skipped: {test}: {tool} not installed");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_uses_sim_as_https_proxy() {
    if !have_tool("curl_uses_sim_as_https_proxy", "curl") {
        return;
    }
    let pki = pki();
    // The target is an HTTPS server with its own certificate from the test CA, so curl does
    // end-to-end TLS with it inside the tunnel, exactly like an agent behind the redirector.
    let target_leaf = pki.ca.issue(&["example.test"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(target_leaf.server_config(&["http/1.1"]));
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(conn).await else {
                    return;
                };
                let _ = read_response_head(&mut tls).await; // the GET head
                let body = "hello through the gateway";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });

    let mut args = tls_args(&pki.gw);
    args.extend([
        "--allow".into(),
        format!("example.test:{}", target.port()),
        "--resolve".into(),
        "example.test=127.0.0.1".into(),
        "--resolve".into(),
        "denied.test=127.0.0.1".into(),
    ]);
    let mut sim = Sim::start(&args);
    let gw_port = sim.port();

    let ca_pem = path(&pki.ca_pem);
    let curl = move |url: String| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(["--proxy", &format!("https://gw.test:{gw_port}")])
            .args(["--proxy-cacert", &ca_pem])
            .args(["--resolve", &format!("gw.test:{gw_port}:127.0.0.1")])
            .args(["--cacert", &ca_pem])
            .args(["-w", "\n%{http_connect}", &url])
            .env_remove("no_proxy")
            .env_remove("NO_PROXY")
            .output()
            .expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = stdout.rsplit_once('\n').expect("curl -w output");
        (
            code.to_owned(),
            body.to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let url = format!("https://example.test:{}/", target.port());
    let (code, body, err) = tokio::task::spawn_blocking({
        let curl = curl.clone();
        move || curl(url)
    })
    .await
    .unwrap();
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", "hello through the gateway"),
        "{err}"
    );

    let authority = format!("example.test:{}", target.port());
    sim.wait_line(&format!(
        "tunnel CONNECT {authority} -> 200 from=127.0.0.1:"
    ));
    let headers = sim.wait_line(&format!("headers {authority}: "));
    assert!(headers.contains("Host"), "{headers}");
    assert!(
        !headers.to_ascii_lowercase().contains("proxy-authorization"),
        "{headers}"
    );
    let closed = sim.wait_line(&format!("tunnel closed {authority} up="));
    let counts: Vec<u64> = closed
        .split_whitespace()
        .filter_map(|f| f.split_once('=').and_then(|(_, v)| v.parse().ok()))
        .collect();
    assert!(
        counts.len() == 2 && counts.iter().all(|&n| n > 0),
        "{closed}"
    );

    // A name that resolves but is not on the allowlist: 403, and curl gives up.
    let denied = format!("https://denied.test:{}/", target.port());
    let (code, _, _) = tokio::task::spawn_blocking(move || curl(denied))
        .await
        .unwrap();
    assert_eq!(code, "403");
    sim.wait_line(&format!(
        "tunnel CONNECT denied.test:{} -> 403 from=",
        target.port()
    ));
}

#[tokio::test]
async fn tunnel_propagates_half_close_both_ways() {
    let pki = pki();
    let echo = echo_target().await;

    // A server-first target: sends a banner, closes its write side, then still reads.
    let banner_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let banner = banner_listener.local_addr().unwrap();
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (conn, _) = banner_listener.accept().await.unwrap();
        let (mut rd, mut wr) = conn.into_split();
        wr.write_all(b"banner\n").await.unwrap();
        wr.shutdown().await.unwrap();
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        let _ = got_tx.send(got);
    });

    let mut args = tls_args(&pki.gw);
    args.extend([
        "--allow".into(),
        "*.loop.test".into(),
        "--resolve".into(),
        "*.loop.test=127.0.0.1".into(),
    ]);
    let mut sim = Sim::start(&args);

    // Client closes first: the echo target sees EOF, flushes and closes; we read it all.
    let connect = format!(
        "CONNECT echo.loop.test:{0} HTTP/1.1\r\nHost: echo.loop.test:{0}\r\n\r\n",
        echo.port()
    );
    let (mut tls, head) = request(&pki, &sim, &connect).await;
    assert_eq!(head, "HTTP/1.1 200 Connection established\r\n\r\n");
    let payload = vec![b'x'; 100_000];
    tls.write_all(&payload).await.unwrap();
    tls.shutdown().await.unwrap();
    let mut back = Vec::new();
    timeout(WAIT, tls.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(back.len(), payload.len());
    sim.wait_line(&format!(
        "tunnel closed echo.loop.test:{} up=100000 down=100000",
        echo.port()
    ));

    // Target closes first: we see the banner and EOF, and can still send afterwards.
    let connect = format!(
        "CONNECT banner.loop.test:{} HTTP/1.1\r\n\r\n",
        banner.port()
    );
    let (mut tls, head) = request(&pki, &sim, &connect).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let mut got = Vec::new();
    timeout(WAIT, tls.read_to_end(&mut got))
        .await
        .expect("banner in time")
        .unwrap();
    assert_eq!(got, b"banner\n");
    tls.write_all(b"after the target's EOF").await.unwrap();
    tls.shutdown().await.unwrap();
    let got = timeout(WAIT, got_rx)
        .await
        .expect("target finished")
        .unwrap();
    assert_eq!(got, b"after the target's EOF");
}

#[tokio::test]
async fn refusals_have_the_right_status() {
    let pki = pki();
    let echo = echo_target().await;
    let p = echo.port();
    let mut args = tls_args(&pki.gw);
    args.extend([
        "--allow".into(),
        format!("echo.test:{p}"),
        "--allow".into(),
        "unresolved.test".into(),
        "--resolve".into(),
        "echo.test=127.0.0.1".into(),
        "--resolve".into(),
        "other.test=127.0.0.1".into(),
    ]);
    let mut sim = Sim::start(&args);

    let cases: Vec<(String, &str)> = vec![
        (format!("CONNECT echo.test:{p} HTTP/1.1\r\n\r\n"), "200"),
        (format!("CONNECT ECHO.test.:{p} HTTP/1.1\r\n\r\n"), "200"),
        (format!("CONNECT other.test:{p} HTTP/1.1\r\n\r\n"), "403"),
        (
            format!("CONNECT echo.test:{} HTTP/1.1\r\n\r\n", p.wrapping_add(1)),
            "403",
        ),
        (format!("CONNECT 127.0.0.1:{p} HTTP/1.1\r\n\r\n"), "403"),
        ("CONNECT unresolved.test:443 HTTP/1.1\r\n\r\n".into(), "502"),
        (
            "GET http://echo.test/ HTTP/1.1\r\nHost: echo.test\r\n\r\n".into(),
            "405",
        ),
        ("CONNECT echo.test HTTP/1.1\r\n\r\n".into(), "400"),
        ("CONNECT [::1 HTTP/1.1\r\n\r\n".into(), "400"),
        ("this is not http\r\n\r\n".into(), "400"),
        (
            format!(
                "CONNECT echo.test:{p} HTTP/1.1\r\nX-Big: {}\r\n\r\n",
                "a".repeat(17_000)
            ),
            "431",
        ),
    ];
    for (head, want) in cases {
        let (_tls, response) = request(&pki, &sim, &head).await;
        assert_eq!(status_of(&response), want, "{head:.60}: {response}");
    }
    sim.wait_line("tunnel GET http://echo.test/ -> 405 from=");
    sim.wait_line("tunnel - - -> 400 from=");
    sim.wait_line("tunnel CONNECT 127.0.0.1:");

    // A client that trusts another CA never gets to send a request.
    let other = TestCa::untrusted(pki._dir.path());
    let tcp = TcpStream::connect(sim.addr).await.unwrap();
    let connector = TlsConnector::from(other.client_config(&["http/1.1"]));
    let err = connector
        .connect(ServerName::try_from("gw.test").unwrap(), tcp)
        .await
        .expect_err("untrusted gateway certificate");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    sim.wait_line("tls error from=127.0.0.1:");
}

#[tokio::test]
async fn bearer_token_is_required_when_configured() {
    let pki = pki();
    let echo = echo_target().await;
    let p = echo.port();
    let mut args = tls_args(&pki.gw);
    args.extend([
        "--allow".into(),
        "echo.test".into(),
        "--resolve".into(),
        "echo.test=127.0.0.1".into(),
        "--require-bearer".into(),
        "t0ken".into(),
    ]);
    let sim = Sim::start(&args);

    let (_tls, r) = request(
        &pki,
        &sim,
        &format!("CONNECT echo.test:{p} HTTP/1.1\r\n\r\n"),
    )
    .await;
    assert_eq!(status_of(&r), "407", "{r}");
    assert!(r.contains("Proxy-Authenticate: Bearer"), "{r}");
    let head = format!("CONNECT echo.test:{p} HTTP/1.1\r\nAuthorization: Bearer nope\r\n\r\n");
    assert_eq!(status_of(&request(&pki, &sim, &head).await.1), "407");
    let head = format!("CONNECT echo.test:{p} HTTP/1.1\r\nAuthorization: Bearer t0ken\r\n\r\n");
    let (mut tls, r) = request(&pki, &sim, &head).await;
    assert_eq!(status_of(&r), "200", "{r}");
    tls.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    timeout(WAIT, tls.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"ping");
}

#[tokio::test]
async fn silent_mode_accepts_and_never_answers() {
    let mut sim = Sim::start(&["--silent".into()]);
    let mut tcp = TcpStream::connect(sim.addr).await.unwrap();
    tcp.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
    let mut b = [0u8; 1];
    let read = timeout(Duration::from_millis(500), tcp.read(&mut b)).await;
    assert!(read.is_err(), "silent sim answered: {read:?}");
    sim.wait_line("silent from=127.0.0.1:");
}

#[test]
fn help_and_bad_arguments() {
    let out = Command::new(SIM).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--allow",
        "--resolve",
        "--require-bearer",
        "--silent",
        "--offer-h2",
        "--alpn",
        "--h2-max-streams",
        "proto=h2",
        "RFC 9113",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    assert!(!help.contains("not implemented"), "{help}");
    for bad in [
        vec![
            "--listen",
            "127.0.0.1:0",
            "--cert",
            "c",
            "--key",
            "k",
            "--allow",
            "*.",
        ],
        vec![
            "--listen",
            "127.0.0.1:0",
            "--cert",
            "c",
            "--key",
            "k",
            "--resolve",
            "x.test",
        ],
        vec!["--listen", "127.0.0.1:0"],
        vec![
            "--listen",
            "127.0.0.1:0",
            "--cert",
            "/nonexistent",
            "--key",
            "/nonexistent",
        ],
        vec!["--listen", "127.0.0.1:0", "--silent", "--alpn", ""],
        vec![
            "--listen",
            "127.0.0.1:0",
            "--silent",
            "--h2-max-streams",
            "x",
        ],
    ] {
        let out = Command::new(SIM).args(&bad).output().unwrap();
        assert!(!out.status.success(), "{bad:?} should fail");
        assert!(!out.stderr.is_empty(), "{bad:?} should say why");
    }
}

// ---------------------------------------------------------------------------------------
// HTTP/2 CONNECT, driven by an independent client: Python hyper-h2 (Debian python3-h2).

/// A python3 that can import hyper-h2. Debian's python3-h2 installs for /usr/bin/python3,
/// which a pyenv or venv `python3` earlier on PATH does not see, so both are tried. None
/// means skipped (printed); in CI a missing module is a failure.
fn python_with_h2(test: &str) -> Option<String> {
    for python in ["python3", "/usr/bin/python3"] {
        let imports = Command::new(python)
            .args(["-c", "import h2.connection"])
            .output()
            .is_ok_and(|o| o.status.success());
        if imports {
            return Some(python.to_owned());
        }
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: python3-h2 not installed in CI (cargo xtask setup installs it)");
    }
    eprintln!("skipped: {test}: python3-h2 not installed");
    None
}

/// Runs `scripts/h2_connect.py` against the simulator (one TLS connection, ALPN h2 only,
/// verified against the test CA as `gw.test`) and returns its JSON report.
async fn h2_client(python: &str, pki: &Pki, sim: &Sim, plan: Value) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/h2_connect.py");
    let mut cmd = Command::new(python);
    cmd.arg(script).args([
        "127.0.0.1".to_owned(),
        sim.port().to_string(),
        "gw.test".to_owned(),
        path(&pki.ca_pem),
        plan.to_string(),
    ]);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("run h2_connect.py");
    assert!(
        out.status.success(),
        "h2_connect.py failed ({}):\n{}\nsimulator:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        sim.log()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "h2_connect.py printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Simulator arguments: TLS, `--offer-h2`, then `extra`.
fn h2_args(pki: &Pki, extra: &[String]) -> Vec<String> {
    let mut args = tls_args(&pki.gw);
    args.push("--offer-h2".into());
    args.extend_from_slice(extra);
    args
}

/// The `from=<peer>` field of a log line.
fn from_field(line: &str) -> &str {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("from="))
        .unwrap_or_else(|| panic!("no from= in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connect_tunnel_carries_bytes_both_ways() {
    let Some(python) = python_with_h2("h2_connect_tunnel_carries_bytes_both_ways") else {
        return;
    };
    let pki = pki();
    let echo = echo_target().await;
    let authority = format!("echo.test:{}", echo.port());
    let mut sim = Sim::start(&h2_args(
        &pki,
        &[
            "--allow".into(),
            authority.clone(),
            "--resolve".into(),
            "echo.test=127.0.0.1".into(),
        ],
    ));

    let report = h2_client(
        &python,
        &pki,
        &sim,
        json!({"streams": [{
            "authority": authority,
            "steps": [["echo", "ping"], ["echo", "pong over h2"], ["end"], ["read_to_end"]],
        }]}),
    )
    .await;
    assert_eq!(report["alpn"], "h2", "{report}");
    // Our SETTINGS and the connection WINDOW_UPDATE, as the client saw them.
    assert_eq!(report["max_concurrent_streams"], 1000, "{report}");
    assert_eq!(report["initial_window_size"], 1024 * 1024, "{report}");
    assert_eq!(report["connection_window"], 16 * 1024 * 1024, "{report}");
    let stream = &report["streams"][0];
    assert_eq!(stream["status"], 200, "{report}");
    assert!(
        stream["headers"].get("content-length").is_none(),
        "a 2xx CONNECT answer has no content-length: {report}"
    );
    assert_eq!(
        stream["echoes"],
        json!(["ping", "pong over h2"]),
        "{report}"
    );
    assert_eq!(stream["text"], "pingpong over h2", "{report}");
    assert_eq!(stream["ended"], true, "{report}");
    assert_eq!(stream["reset"], Value::Null, "{report}");

    sim.wait_line(&format!("headers {authority}: "));
    let open = sim.wait_line(&format!(
        "tunnel CONNECT {authority} -> 200 from=127.0.0.1:"
    ));
    assert!(open.ends_with(" proto=h2"), "{open}");
    sim.wait_line(&format!("tunnel closed {authority} up=16 down=16"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_on_one_connection_are_independent() {
    let Some(python) = python_with_h2("h2_streams_on_one_connection_are_independent") else {
        return;
    };
    let pki = pki();
    let echo = echo_target().await;
    let p = echo.port();
    let mut sim = Sim::start(&h2_args(
        &pki,
        &[
            "--allow".into(),
            format!("echo.test:{p}"),
            "--resolve".into(),
            "echo.test=127.0.0.1".into(),
            "--resolve".into(),
            "denied.test=127.0.0.1".into(),
            "--h2-max-streams".into(),
            "8".into(),
        ],
    ));

    // Both HEADERS go out together; the allowed tunnel is used only after both answers.
    let report = h2_client(
        &python,
        &pki,
        &sim,
        json!({"streams": [
            {
                "authority": format!("echo.test:{p}"),
                "steps": [["echo", "still open after the 403"], ["end"], ["read_to_end"]],
            },
            {"authority": format!("denied.test:{p}")},
        ]}),
    )
    .await;
    assert_eq!(report["max_concurrent_streams"], 8, "{report}");
    let (allowed, denied) = (&report["streams"][0], &report["streams"][1]);
    assert_eq!(allowed["status"], 200, "{report}");
    assert_eq!(denied["status"], 403, "{report}");
    let body = denied["text"].as_str().unwrap_or_default();
    assert!(body.contains("is not in the allowlist"), "{report}");
    assert_eq!(denied["ended"], true, "{report}");
    assert_eq!(
        allowed["echoes"],
        json!(["still open after the 403"]),
        "{report}"
    );
    assert_eq!(allowed["ended"], true, "{report}");
    assert_eq!(allowed["reset"], Value::Null, "{report}");

    let refused = sim.wait_line(&format!("tunnel CONNECT denied.test:{p} -> 403 from="));
    assert!(refused.ends_with(" proto=h2"), "{refused}");
    let open = sim.wait_line(&format!("tunnel CONNECT echo.test:{p} -> 200 from="));
    assert_eq!(
        from_field(&open),
        from_field(&refused),
        "both streams came over one TLS connection"
    );
    sim.wait_line(&format!("tunnel closed echo.test:{p} up=24 down=24"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_half_close_both_ways() {
    let Some(python) = python_with_h2("h2_half_close_both_ways") else {
        return;
    };
    let pki = pki();

    // Client closes first. This target answers only after it has read EOF, and then sends
    // everything back: the client's END_STREAM must reach it as a FIN, and its whole answer
    // (several flow-control windows) must still come back on the half-closed stream.
    let answer_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let answer = answer_listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (conn, _) = answer_listener.accept().await.unwrap();
        let (mut rd, mut wr) = conn.into_split();
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        wr.write_all(&got).await.unwrap();
        wr.shutdown().await.unwrap();
    });

    // Target closes first: a banner, its FIN, then it still reads what the client sends.
    let banner_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let banner = banner_listener.local_addr().unwrap();
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (conn, _) = banner_listener.accept().await.unwrap();
        let (mut rd, mut wr) = conn.into_split();
        wr.write_all(b"banner\n").await.unwrap();
        wr.shutdown().await.unwrap();
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        let _ = got_tx.send(got);
    });

    let mut sim = Sim::start(&h2_args(
        &pki,
        &[
            "--allow".into(),
            "*.loop.test".into(),
            "--resolve".into(),
            "*.loop.test=127.0.0.1".into(),
        ],
    ));
    let report = h2_client(
        &python,
        &pki,
        &sim,
        json!({"streams": [
            {
                "authority": format!("answer.loop.test:{}", answer.port()),
                "steps": [["send", "0123456789", 30000], ["end"], ["read_to_end"]],
            },
            {
                "authority": format!("banner.loop.test:{}", banner.port()),
                "steps": [["read_to_end"], ["send", "after the target's EOF", 1], ["end"]],
            },
        ]}),
    )
    .await;
    let client_first = &report["streams"][0];
    assert_eq!(client_first["status"], 200, "{report}");
    assert_eq!(client_first["sent"], 300_000, "{report}");
    assert_eq!(client_first["received"], 300_000, "{report}");
    assert_eq!(
        client_first["sha256"], client_first["sent_sha256"],
        "{report}"
    );
    assert_eq!(client_first["ended"], true, "{report}");
    assert_eq!(client_first["reset"], Value::Null, "{report}");
    sim.wait_line(&format!(
        "tunnel closed answer.loop.test:{} up=300000 down=300000",
        answer.port()
    ));

    let target_first = &report["streams"][1];
    assert_eq!(target_first["status"], 200, "{report}");
    assert_eq!(target_first["text"], "banner\n", "{report}");
    assert_eq!(target_first["ended"], true, "{report}");
    let got = timeout(WAIT, got_rx)
        .await
        .expect("banner target finished")
        .unwrap();
    assert_eq!(got, b"after the target's EOF");
    sim.wait_line(&format!(
        "tunnel closed banner.loop.test:{} up=22 down=7",
        banner.port()
    ));
}

/// A client's RST_STREAM(CANCEL) ends only that tunnel. hyper reads a CANCEL or NO_ERROR
/// reset as EOF, so the target sees a FIN (like END_STREAM); the echo target then closes
/// and the tunnel is logged as closed. The other stream on the connection keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_stream_reset_ends_only_that_tunnel() {
    let Some(python) = python_with_h2("h2_stream_reset_ends_only_that_tunnel") else {
        return;
    };
    let pki = pki();
    let reset_echo = echo_target().await;
    let echo = echo_target().await;
    let mut sim = Sim::start(&h2_args(
        &pki,
        &[
            "--allow".into(),
            "*.loop.test".into(),
            "--resolve".into(),
            "*.loop.test=127.0.0.1".into(),
        ],
    ));
    let report = h2_client(
        &python,
        &pki,
        &sim,
        json!({"streams": [
            {
                "authority": format!("reset.loop.test:{}", reset_echo.port()),
                "steps": [["echo", "hi"], ["reset"]],
            },
            {
                "authority": format!("echo.loop.test:{}", echo.port()),
                "steps": [["echo", "after the reset"], ["end"], ["read_to_end"]],
            },
        ]}),
    )
    .await;
    assert_eq!(report["streams"][0]["echoes"], json!(["hi"]), "{report}");
    let other = &report["streams"][1];
    assert_eq!(other["echoes"], json!(["after the reset"]), "{report}");
    assert_eq!(other["ended"], true, "{report}");
    sim.wait_line(&format!(
        "tunnel closed reset.loop.test:{} up=2 down=2",
        reset_echo.port()
    ));
    sim.wait_line(&format!(
        "tunnel closed echo.loop.test:{} up=15 down=15",
        echo.port()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_refusals_have_the_right_status() {
    let Some(python) = python_with_h2("h2_refusals_have_the_right_status") else {
        return;
    };
    let pki = pki();
    let echo = echo_target().await;
    let p = echo.port();
    let mut sim = Sim::start(&h2_args(
        &pki,
        &[
            "--allow".into(),
            format!("echo.test:{p}"),
            "--allow".into(),
            "unresolved.test".into(),
            "--resolve".into(),
            "echo.test=127.0.0.1".into(),
            "--resolve".into(),
            "other.test=127.0.0.1".into(),
            "--require-bearer".into(),
            "t0ken".into(),
        ],
    ));
    let auth = json!([["proxy-authorization", "Bearer t0ken"]]);
    let report = h2_client(
        &python,
        &pki,
        &sim,
        json!({"streams": [
            {
                "authority": format!("echo.test:{p}"),
                "headers": auth,
                "steps": [["echo", "authorized"], ["end"], ["read_to_end"]],
            },
            {"authority": format!("echo.test:{p}")},
            {"authority": format!("echo.test:{p}"), "headers": [["authorization", "Bearer no"]]},
            {"authority": format!("other.test:{p}"), "headers": auth},
            {"authority": "unresolved.test:443", "headers": auth},
            {"method": "GET", "scheme": "https", "authority": "echo.test", "path": "/",
             "headers": auth},
            {"authority": "echo.test", "headers": auth},
            {"authority": null, "headers": [["host", format!("echo.test:{p}")],
                                            ["proxy-authorization", "Bearer t0ken"]]},
            // :scheme and :path on a plain CONNECT are malformed (RFC 9113 section 8.5):
            // the HTTP/2 layer resets the stream with PROTOCOL_ERROR before any policy.
            {"authority": format!("echo.test:{p}"), "scheme": "https", "path": "/",
             "headers": auth},
            // Over SETTINGS_MAX_HEADER_LIST_SIZE (16 KiB): 431 from the HTTP/2 layer.
            {"authority": format!("echo.test:{p}"),
             "headers": [["proxy-authorization", "Bearer t0ken"], ["x-big", "a".repeat(17_000)]]},
        ]}),
    )
    .await;
    let streams = report["streams"].as_array().expect("streams");
    let statuses: Vec<Value> = streams.iter().map(|s| s["status"].clone()).collect();
    assert_eq!(
        statuses,
        json!([200, 407, 407, 403, 502, 405, 400, 400, null, 431])
            .as_array()
            .unwrap()
            .clone(),
        "{report}"
    );
    assert_eq!(streams[0]["echoes"], json!(["authorized"]), "{report}");
    assert_eq!(
        streams[1]["headers"]["proxy-authenticate"], "Bearer realm=\"rdr-gateway-sim\"",
        "{report}"
    );
    assert_eq!(streams[5]["headers"]["allow"], "CONNECT", "{report}");
    assert_eq!(streams[8]["reset"], 1, "PROTOCOL_ERROR: {report}");
    for refused in &streams[1..8] {
        assert_eq!(refused["ended"], true, "{report}");
        let body = refused["text"].as_str().unwrap_or_default();
        assert!(body.ends_with('\n') && body.len() > 1, "{report}");
    }

    for line in [
        format!("tunnel CONNECT echo.test:{p} -> 407 from="),
        format!("tunnel CONNECT other.test:{p} -> 403 from="),
        "tunnel CONNECT unresolved.test:443 -> 502 from=".to_owned(),
        "tunnel GET https://echo.test/ -> 405 from=".to_owned(),
        "tunnel CONNECT echo.test -> 400 from=".to_owned(),
        "tunnel CONNECT - -> 400 from=".to_owned(),
        format!("tunnel CONNECT echo.test:{p} -> 200 from="),
    ] {
        let got = sim.wait_line(&line);
        assert!(got.ends_with(" proto=h2"), "{got}");
    }
    sim.wait_line("headers -: host,proxy-authorization");
}

/// With h2 offered, clients that do not ask for it still get the unchanged HTTP/1.1 path;
/// `--alpn h2` alone turns HTTP/1.1-only clients away at the handshake.
// Multi-threaded: the echo target must keep running while `wait_lines` blocks this thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_clients_still_work_when_h2_is_offered() {
    let pki = pki();
    let echo = echo_target().await;
    let p = echo.port();
    let policy = [
        "--allow".to_owned(),
        format!("echo.test:{p}"),
        "--resolve".into(),
        "echo.test=127.0.0.1".into(),
    ];
    let mut sim = Sim::start(&h2_args(&pki, &policy));
    let connect = format!("CONNECT echo.test:{p} HTTP/1.1\r\nHost: echo.test:{p}\r\n\r\n");

    // Offering only http/1.1, or no ALPN at all: the HTTP/1.1 CONNECT path.
    for alpn in [&["http/1.1"][..], &[]] {
        let tcp = TcpStream::connect(sim.addr).await.unwrap();
        let connector = TlsConnector::from(pki.ca.client_config(alpn));
        let name = ServerName::try_from("gw.test").unwrap();
        let mut tls = connector.connect(name, tcp).await.expect("tls to sim");
        let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        assert_eq!(
            negotiated,
            alpn.first().map(|p| p.as_bytes().to_vec()),
            "{alpn:?}"
        );
        tls.write_all(connect.as_bytes()).await.unwrap();
        let head = read_response_head(&mut tls).await;
        assert_eq!(head, "HTTP/1.1 200 Connection established\r\n\r\n");
        tls.write_all(b"h1 ping").await.unwrap();
        let mut b = [0u8; 7];
        timeout(WAIT, tls.read_exact(&mut b))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(&b, b"h1 ping");
        tls.shutdown().await.unwrap();
    }
    sim.wait_lines(&format!("tunnel closed echo.test:{p} up=7 down=7"), 2);
    let opened = sim.wait_lines(&format!("tunnel CONNECT echo.test:{p} -> 200 "), 2);
    assert!(
        opened.iter().all(|l| !l.contains("proto=")),
        "HTTP/1.1 lines are unchanged: {opened:?}"
    );
    let lines = sim.log();
    assert!(!lines.contains("warning"), "{lines}");

    // A client preferring h2 gets it (h2 is offered first).
    let tcp = TcpStream::connect(sim.addr).await.unwrap();
    let connector = TlsConnector::from(pki.ca.client_config(&["h2", "http/1.1"]));
    let tls = connector
        .connect(ServerName::try_from("gw.test").unwrap(), tcp)
        .await
        .expect("tls to sim");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    drop(tls);

    // `--alpn h2` only: an HTTP/1.1-only client fails the handshake instead of being
    // answered in the wrong protocol; an h2 client is served.
    let mut args = tls_args(&pki.gw);
    args.extend(["--alpn".into(), "h2".into()]);
    args.extend_from_slice(&policy);
    let h2_only = Sim::start(&args);
    let tcp = TcpStream::connect(h2_only.addr).await.unwrap();
    let connector = TlsConnector::from(pki.ca.client_config(&["http/1.1"]));
    let result = connector
        .connect(ServerName::try_from("gw.test").unwrap(), tcp)
        .await;
    assert!(result.is_err(), "http/1.1-only client must not negotiate");
    let tcp = TcpStream::connect(h2_only.addr).await.unwrap();
    let connector = TlsConnector::from(pki.ca.client_config(&["h2"]));
    let tls = connector
        .connect(ServerName::try_from("gw.test").unwrap(), tcp)
        .await
        .expect("h2 client negotiates");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
}
