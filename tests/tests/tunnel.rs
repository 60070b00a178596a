//! Privileged end-to-end tests of the gateway tunnel (issue: gateway tunnel): real Squid,
//! the gateway simulator, real TLS with a test CA, real clients in pods with no proxy
//! variables. See `tests::chain` for the network.
use std::{path::Path, process::Output, time::Duration};
use tests::describe as out;
use tests::ready_with_squid as ready;

use tests::base64_encode;
use tests::chain::{BANNER, Chain, GATEWAY_NAME, Gateway, PROXY_PASSWORD, PROXY_USER};

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
        .display()
        .to_string()
}

/// Squid with auth + a normal (HTTP/1.1) gateway + the daemon.
fn full_chain() -> Chain {
    chain_with(Gateway::Normal)
}

fn chain_with(gateway: Gateway) -> Chain {
    let mut c = Chain::new(1);
    c.start_squid(true);
    c.start_gateway(gateway);
    c.start_daemon(&[], "info");
    c
}

/// The audit lines of finished connections to `host`.
fn audits_for(log: &str, host: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" audit ") && l.contains(&format!("host={host} ")))
        .map(str::to_owned)
        .collect()
}

fn curl(c: &Chain, url: &str) -> Output {
    c.curl(&[url])
}

#[test]
fn https_and_http_by_name_go_through_squid_and_gateway() {
    if !ready("https_and_http_by_name_go_through_squid_and_gateway") {
        return;
    }
    let c = full_chain();
    let o = curl(&c, "https://portal.azure.test/ok");
    assert!(o.status.success(), "{}", out(&o));
    let body = String::from_utf8_lossy(&o.stdout);
    assert!(
        body.contains("local=203.0.113.10:443") && body.contains("sni=portal.azure.test"),
        "{body}"
    );

    let o = curl(&c, "http://web.azure.test/plain");
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("host=web.azure.test path=/plain"),
        "{}",
        out(&o)
    );

    // The gateway tunneled by name, not by IP.
    let gw = c.gateway_log();
    assert!(
        gw.contains("tunnel CONNECT portal.azure.test:443 -> 200"),
        "{gw}"
    );
    assert!(
        gw.contains("tunnel CONNECT web.azure.test:80 -> 200"),
        "{gw}"
    );
    // Squid saw only the gateway, and only after authenticating us.
    let squid = c.squid.as_ref().unwrap();
    let log = squid.wait_access_log(
        &format!("{GATEWAY_NAME}:443"),
        std::time::Duration::from_secs(5),
    );
    assert!(log.contains("CONNECT") && log.contains("200"), "{log}");
    assert!(
        !squid.access_log().contains("portal.azure.test"),
        "{}",
        squid.access_log()
    );
    // Proxy-Authorization went to Squid (it requires it and said 200) and never further.
    for line in gw.lines().filter(|l| l.starts_with("headers ")) {
        assert!(
            !line.to_ascii_lowercase().contains("proxy-authorization"),
            "{line}"
        );
    }
    // The audit line tells the whole story.
    c.lab
        .wait_daemon_log("host=web.azure.test host_source=host");
    let d = c
        .lab
        .wait_daemon_log("host=portal.azure.test host_source=sni");
    let audit = d
        .lines()
        .find(|l| l.contains("audit") && l.contains("host=portal.azure.test"))
        .unwrap_or_else(|| panic!("{d}"));
    for needle in [
        "host_source=sni",
        "route=gateway",
        "hops=proxy=200,gateway=200",
        "orig_dst=203.0.113.10:443",
        "rule=default",
    ] {
        assert!(audit.contains(needle), "{needle} missing: {audit}");
    }
    assert!(d.contains("host=web.azure.test host_source=host"), "{d}");
}

#[test]
fn server_first_protocol_is_tunneled_by_ip_after_the_deadline() {
    if !ready("server_first_protocol_is_tunneled_by_ip_after_the_deadline") {
        return;
    }
    let c = full_chain();
    let code = format!(
        "import socket; s=socket.create_connection(('{}', {}), 10); print(s.makefile().readline().strip())",
        BANNER.ip(),
        BANNER.port()
    );
    let o = c.lab.pods[0]
        .cmd("python3")
        .args(["-c", &code])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("220 banner local=203.0.113.12:2525"),
        "{}",
        out(&o)
    );
    assert!(
        c.gateway_log()
            .contains("tunnel CONNECT 203.0.113.12:2525 -> 200"),
        "{}",
        c.gateway_log()
    );
    // The audit line is written when the relay ends, which can be just after the client is done.
    c.lab.wait_daemon_log("host_source=ip");
}

#[test]
fn bulk_64_mib_each_way_arrives_byte_identical() {
    if !ready("bulk_64_mib_each_way_arrives_byte_identical") {
        return;
    }
    bulk_each_way(Gateway::Normal);
}

#[test]
fn bulk_64_mib_each_way_over_an_h2_gateway() {
    if !ready("bulk_64_mib_each_way_over_an_h2_gateway") {
        return;
    }
    let c = bulk_each_way(Gateway::H2);
    let d = c.lab.wait_daemon_log("session=shared/h2");
    assert!(d.contains("orig_dst=203.0.113.14:8080"), "{d}");
}

/// 64 MiB up, the same echoed back after the pod's half-close (bulk.py), through Squid and
/// the gateway; returns the chain for more checks.
fn bulk_each_way(gateway: Gateway) -> Chain {
    let c = chain_with(gateway);
    let o = c.lab.pods[0]
        .cmd("python3")
        .args([&script("bulk.py"), "bulk.azure.test", "8080", "64"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .unwrap_or_else(|| panic!("{s}"))
            .to_owned()
    };
    let sent = get("sent=");
    let recv = get("recv=");
    assert!(sent.ends_with(&format!("bytes={}", 64 << 20)), "{sent}");
    assert_eq!(
        sent.replace("sent=", ""),
        recv.replace("recv=", ""),
        "payload changed in transit"
    );
    // A server-first echo: no SNI/Host, so it is tunneled by IP.
    assert!(
        c.gateway_log()
            .contains("tunnel CONNECT 203.0.113.14:8080 -> 200"),
        "{}",
        c.gateway_log()
    );
    c
}

#[test]
fn warm_sessions_carry_later_connections_and_a_refusal_burns_its_session() {
    if !ready("warm_sessions_carry_later_connections_and_a_refusal_burns_its_session") {
        return;
    }
    let c = full_chain();
    // The first gateway tunnel dials its own session and starts the pool.
    assert!(curl(&c, "https://portal.azure.test/1").status.success());
    c.lab.wait_daemon_log("session=fresh/h1");
    // Two sessions made ahead of demand (proxy hop and TLS done, no CONNECT yet).
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while c
        .lab
        .metric("redirector_gateway_sessions{proto=\"h1_idle\"}")
        < 2.0
    {
        assert!(
            std::time::Instant::now() < end,
            "no warm sessions:\n{}",
            c.daemon_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(curl(&c, "https://portal.azure.test/2").status.success());
    let d = c.lab.wait_daemon_log("session=warm/h1");
    let warm = audits_for(&d, "portal.azure.test");
    assert!(
        warm.iter()
            .any(|l| l.contains("session=warm/h1") && l.contains("hops=proxy=200,gateway=200")),
        "{warm:?}"
    );
    // A refusal on a warm session: the gateway's 403 ends that session for good.
    assert!(!curl(&c, "https://denied.example.test/").status.success());
    c.lab.wait_daemon_log("audit: connection refused");
    assert!(curl(&c, "https://portal.azure.test/3").status.success());
    let gw = c.gateway_log();
    // Each gateway TCP connection (from= Squid's source port) carried one CONNECT at most.
    let mut froms: Vec<&str> = gw
        .lines()
        .filter(|l| l.starts_with("tunnel CONNECT"))
        .filter_map(|l| l.split(" from=").nth(1))
        .collect();
    let n = froms.len();
    froms.sort();
    froms.dedup();
    assert_eq!(
        froms.len(),
        n,
        "a gateway session carried two CONNECTs:\n{gw}"
    );
    assert!(
        c.lab
            .metric("redirector_gateway_tunnels_total{reuse=\"warm\",proto=\"h1\"}")
            >= 1.0
    );
    // Sessions dialed after the first resume its TLS session (no certificate exchange).
    assert!(
        c.lab
            .metric("redirector_tls_handshakes_total{hop=\"gateway\",kind=\"resumed\"}")
            >= 1.0,
        "{}",
        c.lab
            .node_http_get("/metrics")
            .map(|m| m.1)
            .unwrap_or_default()
    );
}

#[test]
fn h2_gateway_carries_every_tunnel_on_one_session_through_squid() {
    if !ready("h2_gateway_carries_every_tunnel_on_one_session_through_squid") {
        return;
    }
    let c = chain_with(Gateway::H2);
    for i in 0..3 {
        let o = curl(&c, &format!("https://portal.azure.test/{i}"));
        assert!(o.status.success(), "{}", out(&o));
    }
    let o = curl(&c, "http://web.azure.test/plain");
    assert!(o.status.success(), "{}", out(&o));
    // Refused streams leave the session alone.
    assert!(!curl(&c, "https://denied.example.test/").status.success());
    let o = curl(&c, "https://portal.azure.test/after");
    assert!(o.status.success(), "{}", out(&o));

    let gw = c.gateway_log();
    let lines: Vec<&str> = gw
        .lines()
        .filter(|l| l.starts_with("tunnel CONNECT"))
        .collect();
    assert_eq!(lines.len(), 6, "{gw}");
    assert!(lines.iter().all(|l| l.ends_with(" proto=h2")), "{gw}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("denied.example.test:443 -> 403")),
        "{gw}"
    );
    let from = |l: &str| {
        l.split(" from=")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .map(str::to_owned)
    };
    let sessions: std::collections::BTreeSet<_> = lines.iter().filter_map(|l| from(l)).collect();
    assert_eq!(
        sessions.len(),
        1,
        "one TLS session through Squid for all: {gw}"
    );
    // The audit says so; the proxy hop status comes from the session's own CONNECT.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let audits = loop {
        let a = audits_for(&c.daemon_log(), "portal.azure.test");
        if a.len() >= 4 || std::time::Instant::now() > end {
            break a;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(audits.len(), 4, "{audits:?}");
    for a in &audits {
        assert!(
            a.contains("session=shared/h2")
                && a.contains("hops=proxy=200,gateway=200")
                && a.contains(" relay=frames "),
            "{a}"
        );
    }
    assert_eq!(
        c.lab
            .metric("redirector_tls_handshakes_total{hop=\"gateway\",kind=\"full\"}")
            + c.lab
                .metric("redirector_tls_handshakes_total{hop=\"gateway\",kind=\"resumed\"}"),
        1.0,
        "one gateway handshake for every tunnel"
    );
    // Counted once by where its records are protected (the kernel where it has kTLS).
    assert_eq!(
        c.lab
            .metric("redirector_gateway_tls_sessions_total{records=\"kernel\"}")
            + c.lab
                .metric("redirector_gateway_tls_sessions_total{records=\"user\"}"),
        1.0,
        "the session is counted by its record layer"
    );
}

/// Runs one refusal scenario: the pod's curl must end with an error before its own
/// timeout (exit 28 would mean we left it hanging) and the daemon must log `expect`.
fn refusal(test: &str, setup: impl FnOnce(&mut Chain), url: &str, expect: &[&str]) {
    if !ready(test) {
        return;
    }
    let mut c = Chain::new(1);
    setup(&mut c);
    let o = curl(&c, url);
    let code = o.status.code();
    assert!(
        code != Some(0) && code != Some(28),
        "{test}: expected a prompt failure: {}",
        out(&o)
    );
    let d = c.lab.wait_daemon_log("audit: connection refused");
    let line = d
        .lines()
        .find(|l| l.contains("audit: connection refused"))
        .unwrap_or_else(|| panic!("{test}: no refusal line:\n{d}"));
    assert!(line.contains("WARN"), "{line}");
    for e in expect {
        assert!(line.contains(e), "{test}: {e:?} missing from: {line}");
    }
    assert!(
        !c.target_log().contains("request "),
        "{test}: a request reached a target:\n{}",
        c.target_log()
    );
    // The refusal is counted once, by route and result, and by hop and kind.
    assert_eq!(
        c.lab
            .metric("redirector_connections_total{route=\"gateway\",result=\"refused\"}"),
        1.0,
        "{test}"
    );
    let hop = expect
        .iter()
        .find_map(|e| e.strip_prefix("hop="))
        .expect("hop");
    let kind = expect
        .iter()
        .find_map(|e| e.strip_prefix("kind="))
        .expect("kind");
    let series = format!("redirector_tunnel_failures_total{{hop=\"{hop}\",kind=\"{kind}\"}}");
    assert_eq!(c.lab.metric(&series), 1.0, "{test}: {series}");
}

#[test]
fn refusal_squid_407_wrong_password() {
    refusal(
        "refusal_squid_407_wrong_password",
        |c| {
            c.start_squid(true);
            c.start_gateway(Gateway::Normal);
            let flags = c.daemon_flags("wrong-password");
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            c.lab.start_daemon(&flags);
        },
        "https://portal.azure.test/",
        &["hop=proxy", "kind=refused", "status=407"],
    );
}

#[test]
fn refusal_gateway_403_name_not_allowed() {
    refusal(
        "refusal_gateway_403_name_not_allowed",
        |c| {
            c.start_squid(true);
            c.start_gateway(Gateway::Normal);
            c.start_daemon(&[], "info");
        },
        "https://denied.example.test/",
        &[
            "hop=gateway",
            "kind=refused",
            "status=403",
            "host=denied.example.test",
        ],
    );
}

#[test]
fn refusal_gateway_certificate_from_untrusted_ca() {
    refusal(
        "refusal_gateway_certificate_from_untrusted_ca",
        |c| {
            c.start_squid(true);
            c.start_gateway(Gateway::Untrusted);
            c.start_daemon(&[], "info");
        },
        "https://portal.azure.test/",
        &[
            "hop=gateway",
            "kind=tls",
            "tls handshake with the gateway failed: certificate issued by a CA not trusted for this hop",
        ],
    );
}

#[test]
fn refusal_wrong_gateway_name() {
    refusal(
        "refusal_wrong_gateway_name",
        |c| {
            c.start_gateway(Gateway::Normal);
            // Dial the real gateway but expect another name: the certificate must not match.
            let ca = c.ca_pem.display().to_string();
            c.lab.start_daemon(&[
                "--gateway-url",
                "https://wrong.arc.test:443",
                "--gateway-connect-to",
                "203.0.113.60",
                "--gateway-ca",
                &ca,
                "--sniff-timeout",
                "0.3",
                "--tls-timeout",
                "2",
            ]);
        },
        "https://portal.azure.test/",
        &[
            "hop=gateway",
            "kind=tls",
            "tls handshake with the gateway failed: certificate not valid for the name",
        ],
    );
}

#[test]
fn refusal_gateway_down() {
    refusal(
        "refusal_gateway_down",
        |c| {
            c.start_gateway(Gateway::Down);
            c.start_daemon(&[], "info");
        },
        "https://portal.azure.test/",
        &["hop=gateway", "kind=connect"],
    );
}

#[test]
fn refusal_gateway_accepts_tcp_then_silent() {
    refusal(
        "refusal_gateway_accepts_tcp_then_silent",
        |c| {
            c.start_gateway(Gateway::Silent);
            c.start_daemon(&[], "info");
        },
        "https://portal.azure.test/",
        &["hop=gateway", "kind=tls_timeout"],
    );
}

#[test]
fn early_request_while_proxy_says_407_gets_nothing_through() {
    if !ready("early_request_while_proxy_says_407_gets_nothing_through") {
        return;
    }
    let mut c = Chain::new(1);
    c.start_squid(true);
    c.start_gateway(Gateway::Normal);
    let flags = c.daemon_flags("wrong-password");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    c.lab.start_daemon(&flags);
    // The request goes out in the same write as the connect completes, before any answer.
    let code = "import socket\n\
        s = socket.create_connection(('portal.azure.test', 80), 10)\n\
        s.sendall(b'GET /admin HTTP/1.1\\r\\nHost: portal.azure.test\\r\\n\\r\\n')\n\
        data = b''\n\
        try:\n\
        \x20   while True:\n\
        \x20       b = s.recv(4096)\n\
        \x20       if not b: break\n\
        \x20       data += b\n\
        except ConnectionResetError:\n\
        \x20   pass\n\
        print('got', len(data))";
    let o = c.lab.pods[0]
        .cmd("python3")
        .args(["-c", code])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "got 0",
        "{}",
        out(&o)
    );
    let squid = c.squid.as_ref().unwrap();
    squid.wait_access_log("407", std::time::Duration::from_secs(5));
    assert!(
        !squid.access_log().contains("/admin"),
        "{}",
        squid.access_log()
    );
    assert!(
        !c.gateway_log().contains("/admin") && !c.gateway_log().contains("tunnel CONNECT"),
        "{}",
        c.gateway_log()
    );
    assert!(!c.target_log().contains("/admin"), "{}", c.target_log());
}

#[test]
fn hostile_sni_values_never_reach_a_connect_line() {
    if !ready("hostile_sni_values_never_reach_a_connect_line") {
        return;
    }
    let c = full_chain();
    let hostile = [
        "evil\\r\\nX-Injected: 1.azure.test",
        "a b.azure.test",
        "x@y.azure.test",
        "a/b.azure.test",
        "nul\\x00.azure.test",
        "ok.azure.test trailing",
        &"a".repeat(300),
    ];
    for sni in hostile {
        let o = c.lab.pods[0]
            .cmd("python3")
            .args([&script("client_hello.py"), "203.0.113.10", "443", sni])
            .output()
            .unwrap();
        assert!(o.status.success(), "{sni}: {}", out(&o));
    }
    let gw = c.gateway_log();
    // Every one fell back to the IP; nothing of the hostile names reached the gateway.
    assert_eq!(
        gw.matches("tunnel CONNECT 203.0.113.10:443 -> 200").count(),
        hostile.len(),
        "{gw}"
    );
    for bad in [
        "evil",
        "X-Injected",
        "a b",
        "x@y",
        "a/b",
        "nul",
        "trailing",
        "aaaaaaaa",
    ] {
        assert!(!gw.contains(bad), "{bad} reached the gateway:\n{gw}");
    }
}

#[test]
fn trace_logs_and_config_dump_never_contain_the_proxy_password() {
    if !ready("trace_logs_and_config_dump_never_contain_the_proxy_password") {
        return;
    }
    let mut c = Chain::new(1);
    c.start_squid(true);
    c.start_gateway(Gateway::Normal);
    c.start_daemon(&[], "trace");
    assert!(curl(&c, "https://portal.azure.test/").status.success());
    let _ = curl(&c, "https://denied.example.test/");
    let (_, dump) = c.lab.node_http_get("/config_dump").expect("config_dump");
    let basic = base64_encode(format!("{PROXY_USER}:{PROXY_PASSWORD}").as_bytes());
    let log = c.daemon_log();
    assert!(
        log.lines().count() > 50,
        "expected trace output, got:\n{log}"
    );
    for (what, text) in [("trace log", &log), ("/config_dump", &dump)] {
        assert!(
            !text.contains(PROXY_PASSWORD),
            "{what} contains the proxy password"
        );
        assert!(
            !text.contains(&basic),
            "{what} contains the Basic credentials"
        );
    }
    assert!(dump.contains("redacted"), "{dump}");
}

/// Gateway sessions end with TLS close_notify, whichever side ends first and also when the
/// daemon stops with warm sessions open: the gateway never sees a TLS session just cut (which
/// it logs as "peer closed connection without sending TLS close_notify").
#[test]
fn gateway_sessions_end_with_close_notify() {
    if !ready("gateway_sessions_end_with_close_notify") {
        return;
    }
    for gateway in [Gateway::Normal, Gateway::H2] {
        let mut c = chain_with(gateway);
        for i in 0..3 {
            let o = curl(&c, &format!("https://portal.azure.test/{i}"));
            assert!(o.status.success(), "{}", out(&o));
        }
        let o = curl(&c, "http://web.azure.test/plain");
        assert!(o.status.success(), "{}", out(&o));
        // Stop the daemon (SIGTERM): its warm and shared sessions end too.
        let daemon = c
            .lab
            .procs
            .iter()
            .position(|p| p.name == "redirector")
            .expect("daemon");
        c.lab.procs[daemon].signal(libc::SIGTERM);
        let status = c.lab.procs[daemon].wait_timeout(Duration::from_secs(20));
        assert!(status.is_some(), "the daemon did not stop");
        // The gateway logs a session cut without close_notify when it reads the end of it:
        // wait until it has closed every connection on its side, then read its log.
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while c.gateway_open_connections() > 0 {
            assert!(
                std::time::Instant::now() < end,
                "{gateway:?}: the gateway still holds connections after the daemon stopped"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let gw = c.gateway_log();
        assert!(
            !gw.contains("close_notify"),
            "{gateway:?}: a gateway session was cut without close_notify:\n{gw}\n{}",
            audits_for(&c.daemon_log(), "portal.azure.test").join("\n")
        );
    }
}
