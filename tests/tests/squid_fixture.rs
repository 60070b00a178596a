//! The Squid fixture runs Debian's real Squid: Basic auth, the CONNECT port rule and the
//! private hosts file all behave as the end-to-end tests expect. Loopback only.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt,
    process::Command,
    thread,
    time::Duration,
};

use tests::squid::{self, Squid, SquidOptions};

/// A loopback HTTP server answering every request with `hello from target`.
fn http_target() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind target");
    let addr = listener.local_addr().expect("target addr");
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let body = "hello from target";
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `curl -p` (CONNECT tunnel, then a plain GET inside it); returns (CONNECT status, body).
fn curl_via(proxy: SocketAddr, user: Option<&str>, url: &str) -> (String, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "-p",
        "-x",
        &format!("http://{proxy}"),
    ]);
    if let Some(user) = user {
        cmd.args(["-U", user]);
    }
    cmd.args(["-w", "\n%{http_connect}", url]);
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ] {
        cmd.env_remove(var);
    }
    cmd.env_remove("no_proxy").env_remove("NO_PROXY");
    let out = cmd.output().expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').expect("curl -w output");
    (code.to_owned(), body.to_owned())
}

#[test]
fn squid_enforces_auth_and_connect_ports() {
    if !squid::available("squid_enforces_auth_and_connect_ports", &["curl"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // tempdir() is 0700; Squid runs as `proxy` and must reach its work directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod tempdir");
    let target = http_target();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut opts = SquidOptions::new(listen, dir.path().join("squid"));
    opts.basic_auth = Some(("alice".into(), "pa55word".into()));
    opts.allow_connect_ports = vec![443, target.port()];
    opts.hosts = vec![("target.test".into(), target.ip())];
    let proxy = Squid::start(opts);

    let url = format!("http://127.0.0.1:{}/", target.port());

    // No or wrong credentials: 407 before anything else.
    assert_eq!(curl_via(proxy.addr(), None, &url).0, "407");
    assert_eq!(curl_via(proxy.addr(), Some("alice:wrong"), &url).0, "407");

    // Right credentials, port not in SSL_ports: 403.
    let mut other = 8444;
    if other == target.port() {
        other += 1;
    }
    let (code, _) = curl_via(
        proxy.addr(),
        Some("alice:pa55word"),
        &format!("http://127.0.0.1:{other}/"),
    );
    assert_eq!(code, "403");

    // Right credentials, allowed port: the tunnel reaches the target, by IP and by a name
    // from the private hosts file.
    let (code, body) = curl_via(proxy.addr(), Some("alice:pa55word"), &url);
    assert_eq!((code.as_str(), body.as_str()), ("200", "hello from target"));
    let by_name = format!("http://target.test:{}/", target.port());
    let (code, body) = curl_via(proxy.addr(), Some("alice:pa55word"), &by_name);
    assert_eq!((code.as_str(), body.as_str()), ("200", "hello from target"));

    let limit = Duration::from_secs(10);
    let line = proxy.wait_access_log(&format!("CONNECT 127.0.0.1:{} 200", target.port()), limit);
    assert!(
        line.ends_with(" alice"),
        "authenticated user is logged: {line}"
    );
    proxy.wait_access_log(&format!("CONNECT target.test:{} 200", target.port()), limit);
    proxy.wait_access_log(&format!("CONNECT 127.0.0.1:{other} 403"), limit);
    proxy.wait_access_log(" 407 ", limit);
    let log = proxy.access_log();
    assert!(!log.contains("pa55word"), "password never logged:\n{log}");
}

#[test]
fn squid_without_auth_and_stop() {
    if !squid::available("squid_without_auth_and_stop", &["curl"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod tempdir");
    let target = http_target();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut opts = SquidOptions::new(listen, dir.path().join("squid"));
    opts.allow_connect_ports = vec![target.port()];
    let proxy = Squid::start(opts);
    let url = format!("http://127.0.0.1:{}/", target.port());
    assert_eq!(curl_via(proxy.addr(), None, &url).0, "200");

    // Dropping the fixture stops Squid: the pid is gone and the port is free again.
    let pid = proxy.pid();
    drop(proxy);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.contains("(squid)")),
        "squid {pid} still running"
    );
    TcpListener::bind(listen).expect("port released after drop");
}

/// Deletes the network namespace it names when dropped (also on panic).
struct NetNs(String);

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

#[test]
fn squid_runs_inside_a_netns() {
    if !squid::available("squid_runs_inside_a_netns", &["curl", "ip"]) {
        return;
    }
    let ns = NetNs(format!("rdrsq{}", std::process::id()));
    let ok = Command::new("sh")
        .args([
            "-c",
            &format!("ip netns add {0} && ip -n {0} link set lo up", ns.0),
        ])
        .status()
        .expect("run ip");
    assert!(ok.success(), "create netns {}", ns.0);

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod tempdir");
    // The namespace's own loopback: unreachable from the host's.
    let listen: SocketAddr = "127.0.0.1:3128".parse().unwrap();
    let mut opts = SquidOptions::new(listen, dir.path().join("squid"));
    opts.netns = Some(ns.0.clone());
    opts.basic_auth = Some(("bob".into(), "hunter2".into()));
    opts.allow_connect_ports = vec![443];
    let proxy = Squid::start(opts);

    let curl = |user: &[&str]| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.0,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "10",
            ])
            .args(["-w", "%{http_connect}", "-p", "-x", "http://127.0.0.1:3128"])
            .args(user)
            .arg("http://127.0.0.1:443/")
            .env_remove("no_proxy")
            .env_remove("NO_PROXY")
            .output()
            .expect("run curl in netns");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl(&[]), "407");
    // Authenticated, allowed port, nothing listening there: Squid's own 503.
    assert_eq!(curl(&["-U", "bob:hunter2"]), "503");
    proxy.wait_access_log("CONNECT 127.0.0.1:443 503", Duration::from_secs(10));
    drop(proxy);
}
