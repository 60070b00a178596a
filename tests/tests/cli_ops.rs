//! Privileged end-to-end tests of the operator commands (issue 6, item 4): `redirector
//! status`, `redirector check` and `redirector explain`, run in the lab's node namespace
//! against a real chain (Squid with Basic auth, the gateway simulator, the daemon).
use std::{
    path::Path,
    process::{Command, Output},
    time::Duration,
};
use tests::describe as out;
use tests::ready_with_squid as ready;

use tests::{
    chain::{Chain, GATEWAY_NAME, Gateway, PROXY_PASSWORD},
    lab::{ADMIN, workspace_bin},
};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `redirector <args>` in the node namespace (where the daemon, its admin port and the
/// route to Squid are), as `Lab::status` does.
fn cli(c: &Chain, args: &[String]) -> Output {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c.lab.node))
        .arg(workspace_bin("redirector"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run redirector")
}

/// `sub` with the chain's daemon flags (gateway, Squid URL with `password`, CA) and the lab's
/// pin root, cgroup root and admin address, then `extra`.
fn with_chain_flags(c: &Chain, sub: &str, password: &str, extra: &[&str]) -> Vec<String> {
    with_pin_root(
        c,
        sub,
        password,
        &c.lab.pin_root.display().to_string(),
        extra,
    )
}

fn with_pin_root(
    c: &Chain,
    sub: &str,
    password: &str,
    pin_root: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut a = vec![sub.to_owned()];
    a.extend(c.daemon_flags(password));
    a.extend([
        "--pin-root".into(),
        pin_root.to_owned(),
        "--cgroup-root".into(),
        c.lab.cg_root.display().to_string(),
        "--admin-addr".into(),
        ADMIN.into(),
    ]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Squid with auth, the gateway as given, and the daemon.
fn chain(gateway: Gateway, daemon: bool) -> Chain {
    let mut c = Chain::new(1);
    c.start_squid(true);
    c.start_gateway(gateway);
    if daemon {
        c.start_daemon(&[], "info");
    }
    c
}

fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?}:\n{text}"))
}

#[test]
fn status_while_running_and_after_the_daemon_is_killed() {
    if !ready("status_while_running_and_after_the_daemon_is_killed") {
        return;
    }
    let mut c = chain(Gateway::Normal, true);
    let o = c.curl(&["https://portal.azure.test/ok"]);
    assert!(o.status.success(), "{}", out(&o));
    // One connection held open while status runs (server-first echo, tunneled by IP).
    let mut held = c.lab.pods[0]
        .cmd("python3")
        .args(["-c", "import socket,time; s=socket.create_connection(('bulk.azure.test', 8080), 10); print('up', flush=True); time.sleep(30)"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut first = String::new();
        std::io::BufReader::new(held.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert_eq!(first.trim(), "up");
    }
    // The relay starts once the sniff deadline passed (server-first): wait for the daemon to
    // list the connection rather than for a fixed time.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !c
        .lab
        .node_http_get("/connections")
        .is_some_and(|(_, body)| body.contains("203.0.113.14:8080"))
    {
        assert!(
            std::time::Instant::now() < end,
            "the held connection never showed in /connections"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pod_cg = c.lab.pods[0].cgroup.display().to_string();

    let s = c.lab.status();
    let text = stdout(&s);
    assert!(s.status.success(), "{}", out(&s));
    println!("--- status while running ---\n{text}");
    assert!(line(&text, "daemon:").contains("running, ready"), "{text}");
    for l in ["rdr_link_c4", "rdr_link_c6", "rdr_link_so"] {
        assert!(
            text.contains(&format!("link {l:<12} attached")),
            "{l}: {text}"
        );
    }
    assert!(
        text.contains("enabled cgroups (1):") && text.contains(&pod_cg),
        "{text}"
    );
    let counters = line(&text, "counters:");
    assert!(
        !counters.contains("redirected4=0 "),
        "the curl was redirected: {counters}"
    );
    // Newer daemons list their live connections; older ones are reported as such.
    match c.lab.node_http_get("/connections") {
        Some((200, _)) => {
            let live = line(&text, "live connections (");
            assert!(!live.contains("(0)"), "{text}");
            assert!(
                text.contains("203.0.113.14:8080"),
                "the held connection is listed: {text}"
            );
        }
        _ => assert!(
            text.contains("live connections: unknown") && text.contains("/connections"),
            "{text}"
        ),
    }
    let _ = held.kill();
    let _ = held.wait();

    let d = c
        .lab
        .procs
        .iter()
        .position(|p| p.name == "redirector")
        .unwrap();
    c.lab.procs[d].signal(libc::SIGKILL);
    c.lab.procs[d]
        .wait_timeout(Duration::from_secs(5))
        .expect("daemon did not die");
    let s = c.lab.status();
    let text = stdout(&s);
    assert!(s.status.success(), "{}", out(&s));
    println!("--- status after SIGKILL ---\n{text}");
    assert!(line(&text, "daemon:").contains("NOT RUNNING"), "{text}");
    assert!(
        text.contains("link rdr_link_c4  attached"),
        "the pins keep the hooks attached: {text}"
    );
    assert!(
        text.contains(&pod_cg),
        "the enabled cgroup is still listed from the pins: {text}"
    );
    assert!(
        text.contains("live connections: unknown") && text.contains("not running"),
        "{text}"
    );
    // --json says the same.
    let mut json_args = vec![
        "status".to_owned(),
        "--json".into(),
        "--pin-root".into(),
        c.lab.pin_root.display().to_string(),
    ];
    json_args.extend([
        "--cgroup-root".into(),
        c.lab.cg_root.display().to_string(),
        "--admin-addr".into(),
        ADMIN.into(),
    ]);
    let o = cli(&c, &json_args);
    assert!(o.status.success(), "{}", out(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", out(&o)));
    assert_eq!(v["daemon"], "not_running");
    assert_eq!(v["enabled_cgroups"][0]["path"], pod_cg.as_str());
    assert!(v["connections"].is_null());
}

#[test]
fn check_passes_in_the_node_netns_and_names_the_fix_when_something_is_wrong() {
    if !ready("check_passes_in_the_node_netns_and_names_the_fix_when_something_is_wrong") {
        return;
    }
    let c = chain(Gateway::Normal, true);
    let pod_cg = c.lab.pods[0].cgroup.display().to_string();

    // Everything in order.
    let o = cli(
        &c,
        &with_chain_flags(&c, "check", PROXY_PASSWORD, &["--cgroup", &pod_cg]),
    );
    let text = stdout(&o);
    println!("--- check (good) ---\n{text}");
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(!text.lines().any(|l| l.starts_with("FAIL")), "{text}");
    assert!(text.ends_with(" 0 FAIL\n"), "{text}");
    for prefix in [
        "ok    kernel:",
        "ok    cgroup v2:",
        "ok    bpffs:",
        "ok    btf:",
        "ok    cgroup bpf:",
        "ok    hooks:",
    ] {
        line(&text, prefix);
    }
    let hooks = line(&text, "ok    hooks:");
    for p in ["rdr_connect4", "rdr_connect6", "rdr_sockops"] {
        assert!(hooks.contains(p), "{p} missing: {hooks}");
    }
    assert!(
        hooks.contains("(ours)") && !hooks.contains("not ours"),
        "{hooks}"
    );
    let proxy = line(&text, "ok    proxy http://203.0.113.50:3128:");
    assert!(
        proxy.contains(&format!(
            "CONNECT {GATEWAY_NAME}:443 answered 200 (credentials accepted)"
        )),
        "{proxy}"
    );
    let gw = line(&text, "ok    gateway:");
    assert!(
        gw.contains("rdr test ca") && gw.contains("--gateway-ca"),
        "{gw}"
    );
    assert!(
        !text.contains(PROXY_PASSWORD)
            && !String::from_utf8_lossy(&o.stderr).contains(PROXY_PASSWORD),
        "{}",
        out(&o)
    );

    // bpffs not mounted where the pins should go.
    let scratch = c.lab.dir.join("no-bpffs");
    let pins = scratch.join("pins").display().to_string();
    let o = cli(&c, &with_pin_root(&c, "check", PROXY_PASSWORD, &pins, &[]));
    let text = stdout(&o);
    println!("--- check (no bpffs) ---\n{text}");
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let fail = line(&text, "FAIL  bpffs:");
    assert!(fail.contains(&scratch.display().to_string()), "{fail}");
    assert!(
        text.contains(&format!(
            "fix: mkdir -p {0} && mount -t bpf bpf {0}",
            scratch.display()
        )),
        "{text}"
    );

    // Wrong proxy password: Squid's 407 is named as a credentials problem.
    let o = cli(&c, &with_chain_flags(&c, "check", "not-the-password", &[]));
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let fail = line(&text, "FAIL  proxy http://203.0.113.50:3128:");
    assert!(fail.contains("407"), "{fail}");
    assert!(
        text.contains("fix: the proxy rejected the credentials"),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");
}

#[test]
fn check_accepts_a_gateway_that_speaks_h2_and_says_how_tunnels_travel() {
    if !ready("check_accepts_a_gateway_that_speaks_h2_and_says_how_tunnels_travel") {
        return;
    }
    let c = chain(Gateway::H2, true);
    let pod_cg = c.lab.pods[0].cgroup.display().to_string();
    let o = cli(
        &c,
        &with_chain_flags(&c, "check", PROXY_PASSWORD, &["--cgroup", &pod_cg]),
    );
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let gw = line(&text, "ok    gateway:");
    assert!(
        gw.contains("ALPN h2: HTTP/2 CONNECT streams on a shared session"),
        "{gw}"
    );
    // With h2 turned off the same gateway is spoken to over HTTP/1.1.
    let o = cli(
        &c,
        &with_chain_flags(
            &c,
            "check",
            PROXY_PASSWORD,
            &["--cgroup", &pod_cg, "--gateway-http2=false"],
        ),
    );
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let gw = line(&text, "ok    gateway:");
    assert!(gw.contains("ALPN http/1.1: HTTP/1.1 CONNECT"), "{gw}");
}

#[test]
fn check_fails_with_the_gateway_ca_fix_when_the_gateway_certificate_is_untrusted() {
    if !ready("check_fails_with_the_gateway_ca_fix_when_the_gateway_certificate_is_untrusted") {
        return;
    }
    let c = chain(Gateway::Untrusted, false);
    let o = cli(&c, &with_chain_flags(&c, "check", PROXY_PASSWORD, &[]));
    let text = stdout(&o);
    println!("--- check (untrusted gateway) ---\n{text}");
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    // Squid still tunnels to the gateway; it is the certificate that fails.
    line(&text, "ok    proxy http://203.0.113.50:3128:");
    let fail = line(&text, "FAIL  gateway:");
    assert!(
        fail.contains("certificate issued by a CA not trusted for this hop")
            && fail.contains("UnknownIssuer")
            && fail.contains("rdr untrusted ca"),
        "{fail}"
    );
    assert!(
        text.contains("fix: pass the gateway's CA with --gateway-ca"),
        "{text}"
    );
    // The interception line names the issuer and what to do if it is an inspecting proxy.
    let tls = line(&text, "warn  tls interception:");
    assert!(tls.contains("rdr untrusted ca"), "{tls}");

    // --json carries the same verdicts.
    let o = cli(
        &c,
        &with_chain_flags(&c, "check", PROXY_PASSWORD, &["--json"]),
    );
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", out(&o)));
    assert_eq!(v["ok"], false);
    let gw = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "gateway")
        .unwrap();
    assert_eq!(gw["level"], "fail");
}

#[test]
fn explain_shows_the_route_the_connect_lines_and_kernel_skips() {
    if !ready("explain_shows_the_route_the_connect_lines_and_kernel_skips") {
        return;
    }
    let mut c = chain(Gateway::Normal, true);
    let plain = c.lab.add_plain_cgroup("plain").display().to_string();
    let pod_cg = c.lab.pods[0].cgroup.display().to_string();
    let base = ["--dst", "203.0.113.10:443", "--host", "portal.azure.test"];

    let mut args: Vec<&str> = base.to_vec();
    args.extend(["--cgroup", &pod_cg]);
    let o = cli(&c, &with_chain_flags(&c, "explain", PROXY_PASSWORD, &args));
    let text = stdout(&o);
    println!("--- explain (gateway) ---\n{text}");
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        line(&text, "cgroup:").contains("enabled in the kernel"),
        "{text}"
    );
    assert!(line(&text, "kernel:").contains("redirected"), "{text}");
    assert!(line(&text, "policy:").contains("route gateway"), "{text}");
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let at = |l: &str| {
        lines
            .iter()
            .position(|x| *x == l)
            .unwrap_or_else(|| panic!("{l:?} missing:\n{text}"))
    };
    let outer = at("CONNECT gw.arc.test:443 HTTP/1.1");
    let auth = at("Proxy-Authorization: Basic <redacted>");
    let inner = at("CONNECT portal.azure.test:443 HTTP/1.1");
    assert!(outer < auth && auth < inner, "hop order:\n{text}");
    assert!(!text.contains(PROXY_PASSWORD), "{text}");
    // The JSON form has the same two request lines and no password either.
    let mut json_args = args.clone();
    json_args.push("--json");
    let o = cli(
        &c,
        &with_chain_flags(&c, "explain", PROXY_PASSWORD, &json_args),
    );
    assert!(o.status.success(), "{}", out(&o));
    assert!(!stdout(&o).contains(PROXY_PASSWORD));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", out(&o)));
    assert_eq!(v["policy"]["route"], "gateway");
    assert_eq!(
        v["hops"][0]["request"][0],
        "CONNECT gw.arc.test:443 HTTP/1.1"
    );
    assert_eq!(
        v["hops"][1]["request"][0],
        "CONNECT portal.azure.test:443 HTTP/1.1"
    );

    // A skip range covering the target: the kernel leaves the connect alone.
    let mut skip = args.clone();
    skip.extend(["--proxy-skip-range", "203.0.113.0/24"]);
    let o = cli(&c, &with_chain_flags(&c, "explain", PROXY_PASSWORD, &skip));
    let text = stdout(&o);
    println!("--- explain (skip range) ---\n{text}");
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        line(&text, "verdict:").contains("skipped in the kernel by skip range 203.0.113.0/24"),
        "{text}"
    );
    assert!(!text.contains("CONNECT"), "{text}");

    // A cgroup nobody enabled: not redirected at all.
    let mut other: Vec<&str> = base.to_vec();
    other.extend(["--cgroup", &plain]);
    let o = cli(&c, &with_chain_flags(&c, "explain", PROXY_PASSWORD, &other));
    let text = stdout(&o);
    println!("--- explain (plain cgroup) ---\n{text}");
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        line(&text, "verdict:").starts_with("verdict:     not redirected"),
        "{text}"
    );
    assert!(line(&text, "cgroup:").contains("not enabled"), "{text}");
    assert!(!text.contains("CONNECT"), "{text}");
    assert!(Path::new(&plain).exists());
}
