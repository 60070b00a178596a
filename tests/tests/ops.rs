//! Privileged end-to-end tests of operations (issue: operations): audit lines and metric
//! deltas for every route and refusal kind, JSON logs, the eBPF programs' debug messages,
//! runtime log-level change and the live connection list.
use std::{net::IpAddr, process::Output, time::Duration};
use tests::describe as out;
use tests::ready_with_squid as ready;

use redirector_common::DEFAULT_PROXY_PORT as PROXY_PORT;
use tests::chain::{Chain, Gateway, TARGETS};

const CONFIG: &str = "routes:\n  - host: '*.vault.azure.test'\n    route: proxy\n  - host: portal.azure.test\n    route: direct\n  - cidr: 169.254.0.0/16\n    route: direct\n";

fn chain(env: &[(&str, &str)]) -> Chain {
    chain_opts(env, false)
}

/// [`chain`], with `admin_token`: `--admin-token-file` (through its environment variable)
/// set to a 0600 file in the lab directory holding [`ADMIN_TOKEN`].
fn chain_opts(env: &[(&str, &str)], admin_token: bool) -> Chain {
    let mut c = Chain::new(1);
    c.start_squid(true);
    c.start_gateway(Gateway::Normal);
    let hosts: Vec<(&str, IpAddr)> = TARGETS
        .iter()
        .map(|(n, ip)| (*n, IpAddr::V4(*ip)))
        .collect();
    c.lab.set_node_hosts(&hosts);
    let cfg = c.lab.dir.join("config.yaml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let mut flags = c.daemon_flags(tests::chain::PROXY_PASSWORD);
    flags.extend(["--config".to_owned(), cfg.display().to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut env = env.to_vec();
    let token_file = c.lab.dir.join("admin-token");
    let token_path = token_file.display().to_string();
    if admin_token {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).expect("write token");
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod token");
        env.push(("REDIRECTOR_ADMIN_TOKEN_FILE", &token_path));
    }
    c.lab.start_daemon_env(&flags, &env);
    c
}

/// The admin token the token-file tests write, and the header that carries it.
const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";
const AUTH: &str = "Authorization: Bearer admin-token-for-tests-0123456789";

fn chain_with_admin_token(env: &[(&str, &str)]) -> Chain {
    chain_opts(env, true)
}

/// Changing state on the admin endpoint (the log filter) needs POST and the admin token;
/// reading stays open on loopback. Without a configured token, nothing can change state.
#[test]
fn admin_changes_need_post_and_the_token() {
    if !ready("admin_changes_need_post_and_the_token") {
        return;
    }
    let c = chain_with_admin_token(&[]);
    let filter = || c.lab.node_http_get("/logging").unwrap().1.trim().to_owned();
    let before = filter();
    let cases: &[(&str, &[&str], u16)] = &[
        ("POST", &[], 401),
        ("POST", &["Authorization: Bearer wrong-token"], 401),
        ("POST", &["Authorization: Basic YWRtaW46YWRtaW4="], 401),
        ("PUT", &[AUTH], 405),
        ("DELETE", &[AUTH], 405),
    ];
    for (method, headers, want) in cases {
        let (status, body) = c
            .lab
            .node_http_with(method, "/logging?filter=off", headers)
            .unwrap();
        assert_eq!(status, *want, "{method} {headers:?}: {body}");
        assert_eq!(filter(), before, "{method} {headers:?} changed the filter");
    }
    for path in [
        "/metrics",
        "/healthz",
        "/readyz",
        "/workloads",
        "/connections",
        "/config_dump",
    ] {
        let (status, _) = c.lab.node_http_get(path).unwrap();
        assert!(status == 200 || status == 503, "GET {path}: {status}");
    }
    let (_, dump) = c.lab.node_http_get("/config_dump").unwrap();
    assert!(
        !dump.contains(ADMIN_TOKEN),
        "the token leaked into /config_dump"
    );
    let (status, body) = c
        .lab
        .node_http_with("POST", "/logging?filter=warn", &[AUTH])
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(filter(), "warn");
    assert!(
        !c.daemon_log().contains(ADMIN_TOKEN),
        "the token leaked into the log"
    );

    // A daemon without a token file: no request changes anything, whatever it carries.
    let c = chain(&[]);
    let before = c.lab.node_http_get("/logging").unwrap().1;
    let (status, body) = c
        .lab
        .node_http_with("POST", "/logging?filter=off", &[AUTH])
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(c.lab.node_http_get("/logging").unwrap().1, before);
}

fn curl(c: &Chain, url: &str) -> Output {
    c.curl(&[url])
}

fn py(c: &Chain, code: &str) -> Output {
    c.lab.pods[0]
        .cmd("python3")
        .args(["-c", code])
        .output()
        .expect("python3")
}

/// JSON audit records from the daemon's log (`LOG_FORMAT=json`).
fn audits(c: &Chain) -> Vec<serde_json::Value> {
    c.daemon_log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("audit"))
        })
        .collect()
}

fn wait_audits(c: &Chain, n: usize) -> Vec<serde_json::Value> {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = audits(c);
        if a.len() >= n || std::time::Instant::now() > end {
            return a;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_route_and_refusal_has_an_audit_line_and_metric_delta() {
    if !ready("every_route_and_refusal_has_an_audit_line_and_metric_delta") {
        return;
    }
    let c = chain(&[("RUST_LOG", "info"), ("LOG_FORMAT", "json")]);
    let m = |s: &str| c.lab.metric(s);
    let conn = |route: &str, result: &str| {
        format!("redirector_connections_total{{route=\"{route}\",result=\"{result}\"}}")
    };
    assert_eq!(m(&conn("gateway", "ok")), 0.0);

    // gateway, proxy and direct routes.
    assert!(curl(&c, "https://web.azure.test/").status.success());
    assert!(curl(&c, "http://web.azure.test/g").status.success());
    assert!(curl(&c, "https://kv1.vault.azure.test/p").status.success());
    assert!(curl(&c, "https://portal.azure.test/d").status.success());
    // Refusals: the gateway says 403; a safety rule; a connection with no record.
    assert!(!curl(&c, "https://denied.example.test/").status.success());
    // (On loopback the reset may arrive before connect() returns: both are fine.)
    let o = py(
        &c,
        "import socket\ntry:\n  s=socket.create_connection(('169.254.169.254', 80), 5)\n  s.recv(1)\nexcept OSError:\n  pass",
    );
    assert!(o.status.success(), "{}", out(&o));
    let o = py(
        &c,
        &format!(
            "import socket\ntry:\n  s=socket.create_connection(('127.0.0.1', {PROXY_PORT}), 5)\n  s.recv(1)\nexcept OSError:\n  pass"
        ),
    );
    assert!(o.status.success(), "{}", out(&o));

    let a = wait_audits(&c, 6);
    let find = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        a.iter()
            .find(|v| pred(v))
            .cloned()
            .unwrap_or_else(|| panic!("no such audit record in {a:#?}"))
    };
    let gw = find(&|v| {
        v["host"] == "web.azure.test" && v["route"] == "gateway" && v["host_source"] == "host"
    });
    for f in [
        "workload",
        "src",
        "orig_dst",
        "host",
        "host_source",
        "rule",
        "route",
        "hops",
        "bytes_tx",
        "bytes_rx",
        "duration_ms",
        "close",
    ] {
        assert!(!gw[f].is_null(), "audit record lacks {f}: {gw}");
    }
    assert_eq!(gw["hops"], "proxy=200,gateway=200");
    assert!(
        gw["bytes_rx"].as_u64().unwrap() > 0 && gw["close"] == "eof",
        "plain HTTP closes cleanly: {gw}"
    );
    assert!(gw["workload"].as_str().unwrap().ends_with("/pod1"), "{gw}");
    let px = find(&|v| v["host"] == "kv1.vault.azure.test");
    assert_eq!(
        (px["route"].as_str(), px["hops"].as_str()),
        (Some("proxy"), Some("proxy=200")),
        "{px}"
    );
    let dr = find(&|v| v["host"] == "portal.azure.test");
    assert_eq!(
        (dr["route"].as_str(), dr["rule"].as_str()),
        (Some("direct"), Some("route:portal.azure.test->direct")),
        "{dr}"
    );
    let denied = find(&|v| v["host"] == "denied.example.test");
    assert_eq!(denied["level"], "WARN", "{denied}");
    assert!(
        denied["cause"].as_str().unwrap().contains("403"),
        "{denied}"
    );
    let safety = find(&|v| v["orig_dst"] == "169.254.169.254:80");
    assert_eq!(
        (safety["kind"].as_str(), safety["level"].as_str()),
        (Some("safety"), Some("WARN")),
        "{safety}"
    );

    // Metric deltas (from zero at start).
    // A TLS client may close with unread bytes in flight (a reset on the way back): that
    // connection is counted as relay_error, not ok. Either way both were relayed.
    assert_eq!(
        m(&conn("gateway", "ok")) + m(&conn("gateway", "relay_error")),
        2.0
    );
    assert_eq!(
        m(&conn("proxy", "ok")) + m(&conn("proxy", "relay_error")),
        1.0
    );
    assert_eq!(
        m(&conn("direct", "ok")) + m(&conn("direct", "relay_error")),
        1.0
    );
    assert_eq!(m(&conn("gateway", "refused")), 1.0);
    assert_eq!(m(&conn("direct", "refused")), 1.0);
    assert_eq!(
        m("redirector_tunnel_failures_total{hop=\"gateway\",kind=\"refused\"}"),
        1.0
    );
    assert_eq!(
        m("redirector_refused_total{reason=\"no_original_destination\"}"),
        1.0
    );
    assert_eq!(m("redirector_errors_total{side=\"upstream\"}"), 1.0);
    assert_eq!(m("redirector_errors_total{side=\"internal\"}"), 1.0);
    assert_eq!(
        m("redirector_tunnel_setup_seconds_count{hop=\"gateway\"}"),
        2.0
    );
    assert_eq!(
        m("redirector_tunnel_setup_seconds_count{hop=\"proxy\"}"),
        3.0
    );
    assert_eq!(
        m("redirector_tunnel_setup_seconds_count{hop=\"target\"}"),
        1.0
    );
    assert!(m("redirector_bytes_total{direction=\"rx\"}") > 0.0);
    assert!(m("redirector_ebpf_events{name=\"redirected4\"}") >= 6.0);
    assert_eq!(m("redirector_enabled_cgroups"), 1.0);
    assert_eq!(m("redirector_active_connections"), 0.0);
}

#[test]
fn program_debug_messages_log_level_change_and_live_connections() {
    if !ready("program_debug_messages_log_level_change_and_live_connections") {
        return;
    }
    let c = chain_with_admin_token(&[("RUST_LOG", "debug")]);
    assert!(curl(&c, "http://web.azure.test/").status.success());
    // aya-log records from the connect hook reach the daemon's log.
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while !c.daemon_log().contains(&format!(
        "redirect 203.0.113.11:80 to proxy port {PROXY_PORT}"
    )) {
        assert!(
            std::time::Instant::now() < end,
            "no eBPF debug message:\n{}",
            c.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Runtime log filter change: to warn, then debug lines stop.
    let (status, body) = c
        .lab
        .node_http_with("POST", "/logging?filter=warn", &[AUTH])
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.lab.node_http_get("/logging").unwrap().1.trim(), "warn");
    let before = c
        .daemon_log()
        .matches("redirected connection accepted")
        .count();
    assert!(curl(&c, "http://web.azure.test/").status.success());
    // An event instead of a wait: an unmatched connection to the proxy port logs a warning
    // after that request; once it is in the log, any debug line of the request would be too.
    let _ = py(
        &c,
        &format!(
            "import socket\ntry:\n  s=socket.create_connection(('127.0.0.1', {PROXY_PORT}), 5)\n  s.recv(1)\nexcept OSError:\n  pass"
        ),
    );
    c.lab
        .wait_daemon_log("refused connection with no recorded original destination");
    assert_eq!(
        c.daemon_log()
            .matches("redirected connection accepted")
            .count(),
        before,
        "debug lines after switching to warn"
    );
    let (status, _) = c
        .lab
        .node_http_with("POST", "/logging?filter=not%20a%20filter%3D%3D", &[AUTH])
        .unwrap();
    assert_eq!(status, 400);

    // A held-open connection is listed under /connections while it lives.
    let mut hold = c.lab.pods[0]
        .cmd("python3")
        .args(["-c", "import socket,time\ns=socket.create_connection(('203.0.113.12', 2525), 5)\nprint(s.recv(100).decode().strip(), flush=True)\ntime.sleep(30)"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hold.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("220 banner"), "{line}");
    let (_, conns) = c.lab.node_http_get("/connections").unwrap();
    let v: serde_json::Value = serde_json::from_str(&conns).unwrap();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|c| c["orig_dst"] == "203.0.113.12:2525" && c["route"] == "gateway"),
        "{conns}"
    );
    let _ = hold.kill();
    let _ = hold.wait();
    let (_, workloads) = c.lab.node_http_get("/workloads").unwrap();
    let w: serde_json::Value = serde_json::from_str(&workloads).unwrap();
    assert_eq!(w[0]["listening"], true, "{workloads}");
}
