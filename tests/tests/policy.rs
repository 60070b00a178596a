//! Privileged end-to-end tests of routing policy and configuration (issue: routing policy):
//! kernel skip ranges, `proxy` and `direct` routes from a config file, the name/IP check
//! for `direct`, the metadata safety rule, and live reload.
use std::{net::IpAddr, path::PathBuf, process::Output, time::Duration};
use tests::describe as out;
use tests::ready_with_squid as ready;

use tests::chain::{Chain, Gateway, TARGETS};

fn curl(c: &Chain, args: &[&str]) -> Output {
    c.curl(args)
}

fn write_config(c: &Chain, text: &str) -> PathBuf {
    let p = c.lab.dir.join("config.yaml");
    // Write-then-rename so the daemon never reads half a file.
    let tmp = c.lab.dir.join("config.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    p
}

fn wait_log(c: &Chain, needle: &str, count: usize) -> String {
    let end = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let log = c.daemon_log();
        if log.matches(needle).count() >= count {
            return log;
        }
        assert!(
            std::time::Instant::now() < end,
            "{needle:?} (x{count}) not logged:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const ROUTES: &str = "proxy-skip-range: 203.0.113.200/32\nroutes:\n  - host: '*.vault.azure.test'\n    route: proxy\n  - host: portal.azure.test\n    route: direct\n  - cidr: 169.254.0.0/16\n    route: direct\n  - cidr: 168.63.129.16/32\n    route: direct\n";

/// Squid (auth) + gateway + daemon with `config` as its config file, and a node resolver
/// that knows the target names.
fn chain_with_config(config: &str) -> (Chain, PathBuf) {
    let mut c = Chain::new(1);
    c.start_squid(true);
    c.start_gateway(Gateway::Normal);
    let hosts: Vec<(&str, IpAddr)> = TARGETS
        .iter()
        .map(|(n, ip)| (*n, IpAddr::V4(*ip)))
        .collect();
    c.lab.set_node_hosts(&hosts);
    let path = write_config(&c, config);
    let p = path.display().to_string();
    c.start_daemon(&["--config", &p], "info");
    (c, path)
}

#[test]
fn skip_cidr_never_reaches_the_proxy() {
    if !ready("skip_cidr_never_reaches_the_proxy") {
        return;
    }
    let (c, _) = chain_with_config("proxy-skip-range: 203.0.113.200/32\n");
    let series = |n: &str| format!("redirector_ebpf_events{{name=\"{n}\"}}");
    let (skip0, est0) = (
        c.lab.metric(&series("skip_cidr")),
        c.lab.metric(&series("established")),
    );
    // 203.0.113.200 is the pod's directly routed service address; in this network nobody
    // answers there, so a direct connect fails at once (a redirected one would connect to
    // the proxy listener first).
    let o = c.lab.pods[0].cmd("python3").args(["-c", "import socket\ntry:\n  socket.create_connection(('203.0.113.200', 443), 5)\n  print('connected')\nexcept OSError as e:\n  print('failed', e.errno)"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("failed"),
        "{}",
        out(&o)
    );
    assert_eq!(c.lab.metric(&series("skip_cidr")), skip0 + 1.0);
    assert_eq!(
        c.lab.metric(&series("established")),
        est0,
        "a skipped connection reached the proxy path"
    );
    assert!(
        !c.daemon_log().contains("orig_dst=203.0.113.200"),
        "{}",
        c.daemon_log()
    );
}

#[test]
fn proxy_route_goes_through_squid_without_the_gateway() {
    if !ready("proxy_route_goes_through_squid_without_the_gateway") {
        return;
    }
    let (c, _) = chain_with_config(ROUTES);
    let o = curl(&c, &["https://kv1.vault.azure.test/secret"]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("sni=kv1.vault.azure.test"),
        "{}",
        out(&o)
    );
    let squid = c.squid.as_ref().unwrap();
    let line = squid.wait_access_log("kv1.vault.azure.test:443", Duration::from_secs(5));
    assert!(line.contains("CONNECT") && line.contains(" 200 "), "{line}");
    assert!(
        !c.gateway_log().contains("kv1"),
        "the gateway saw a proxy-route connection:\n{}",
        c.gateway_log()
    );
    let log = wait_log(&c, "host=kv1.vault.azure.test host_source", 1);
    let audit = log
        .lines()
        .find(|l| l.contains("audit") && l.contains("host=kv1.vault.azure.test"))
        .unwrap_or_else(|| panic!("{log}"));
    for n in [
        "route=proxy",
        "rule=route:*.vault.azure.test->proxy",
        "hops=proxy=200",
    ] {
        assert!(audit.contains(n), "{n}: {audit}");
    }
    // Everything else still goes through the gateway.
    assert!(curl(&c, &["http://web.azure.test/"]).status.success());
    assert!(
        c.gateway_log()
            .contains("tunnel CONNECT web.azure.test:80 -> 200"),
        "{}",
        c.gateway_log()
    );
}

#[test]
fn direct_by_name_only_when_the_ip_belongs_to_the_name() {
    if !ready("direct_by_name_only_when_the_ip_belongs_to_the_name") {
        return;
    }
    let (c, _) = chain_with_config(ROUTES);
    // portal.azure.test resolves (from the node) to 203.0.113.10: direct, dialed by the node.
    let o = curl(&c, &["https://portal.azure.test/d"]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("peer=203.0.113.1:"),
        "not dialed by the node: {}",
        out(&o)
    );
    assert!(
        !c.gateway_log().contains("portal.azure.test"),
        "{}",
        c.gateway_log()
    );
    // The same name claimed for 203.0.113.11: not its address, so no direct dial — the
    // default route (gateway) takes it, and the log says why.
    let o = curl(
        &c,
        &[
            "--resolve",
            "portal.azure.test:443:203.0.113.11",
            "https://portal.azure.test/m",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    // Twice: the warning when the route is chosen, and the audit line when the relay ends
    // (which may come after curl has its answer).
    let log = wait_log(&c, "name/ip mismatch", 2);
    assert!(
        log.contains("security: host name does not resolve to the original destination"),
        "{log}"
    );
    let audit = log
        .lines()
        .find(|l| l.contains("audit") && l.contains("orig_dst=203.0.113.11:443"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        audit.contains("route=gateway") && audit.contains("name/ip mismatch"),
        "{audit}"
    );
    assert!(
        c.gateway_log()
            .contains("tunnel CONNECT portal.azure.test:443 -> 200"),
        "{}",
        c.gateway_log()
    );
    // A route that would dial the metadata address directly is refused, not followed.
    let o = c.lab.pods[0].cmd("python3").args(["-c", "import socket\ntry:\n  s = socket.create_connection(('169.254.169.254', 80), 5)\n  s.settimeout(5)\n  print('data' if s.recv(10) else 'eof')\nexcept ConnectionResetError:\n  print('reset')"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "reset",
        "{}",
        out(&o)
    );
    let log = wait_log(&c, "rule=safety:link-local/metadata", 2);
    assert!(
        log.contains("security: refusing to dial this address directly"),
        "{log}"
    );
    assert!(log.contains("rule=safety:link-local/metadata"), "{log}");
    // Azure's platform endpoint (wireserver: DHCP, DNS, the VM agent) neither.
    let o = c.lab.pods[0].cmd("python3").args(["-c", "import socket\ntry:\n  s = socket.create_connection(('168.63.129.16', 80), 5)\n  s.settimeout(5)\n  print('data' if s.recv(10) else 'eof')\nexcept ConnectionResetError:\n  print('reset')"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "reset",
        "{}",
        out(&o)
    );
    let log = wait_log(&c, "orig_dst=168.63.129.16:80", 1);
    assert!(
        log.contains("rule=safety:platform-endpoint"),
        "168.63.129.16 was not refused by the safety rule:\n{log}"
    );
}

#[test]
fn reload_keeps_old_config_on_error_and_applies_a_good_one() {
    if !ready("reload_keeps_old_config_on_error_and_applies_a_good_one") {
        return;
    }
    let (c, _) = chain_with_config(ROUTES);
    let pid = c
        .lab
        .procs
        .iter()
        .find(|p| p.name == "redirector")
        .unwrap()
        .pid();
    // 1. A broken file: rejected with the reason; the old routes stay.
    write_config(
        &c,
        "routes:\n  - host: '*.vault.azure.test'\n    route: sideways\n",
    );
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    let log = wait_log(&c, "config reload rejected", 1);
    let line = log
        .lines()
        .find(|l| l.contains("config reload rejected"))
        .unwrap();
    assert!(
        line.contains("routes[0]") && line.contains("sideways"),
        "{line}"
    );
    assert!(
        curl(&c, &["https://kv1.vault.azure.test/"])
            .status
            .success()
    );
    assert!(
        !c.gateway_log().contains("kv1"),
        "old proxy route no longer in force"
    );

    // 2. A good file, no signal: the file watch picks it up. The vault route is gone (so
    //    it goes to the gateway now) and a new kernel skip range appears.
    write_config(&c, "proxy-skip-range: 203.0.113.200/32,203.0.113.192/29\n");
    wait_log(&c, "configuration reloaded", 1);
    assert!(
        curl(&c, &["https://kv1.vault.azure.test/"])
            .status
            .success()
    );
    assert!(
        c.gateway_log()
            .contains("tunnel CONNECT kv1.vault.azure.test:443 -> 200"),
        "{}",
        c.gateway_log()
    );
    // The new kernel skip range is in the LPM map next to the old one.
    let s = c.lab.status();
    let text = String::from_utf8_lossy(&s.stdout);
    assert!(
        text.contains("203.0.113.192/29") && text.contains("203.0.113.200/32"),
        "{text}"
    );
    let (_, metrics) = c.lab.node_http_get("/metrics").unwrap();
    assert!(
        metrics.contains("redirector_config_reloads_total{result=\"rejected\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("redirector_config_reloads_total{result=\"applied\"}"),
        "{metrics}"
    );
}

/// The proxy never lends its identity for a direct dial into the cluster's pod and service
/// ranges (`cluster-ranges`: NetworkPolicy would judge the pod's own connection there; a
/// name rule must not bypass it, e.g. through an ExternalName Service's name) nor to an
/// address of the node itself, read from the node's network namespace (`--node-netns`), not
/// only from the daemon's own.
#[test]
fn direct_dials_never_reach_cluster_ranges_or_the_nodes_own_addresses() {
    if !ready("direct_dials_never_reach_cluster_ranges_or_the_nodes_own_addresses") {
        return;
    }
    let mut c = Chain::new(1);
    c.start_squid(true);
    c.start_gateway(Gateway::Normal);
    // The node: a namespace of its own with an address the daemon's namespace does not have.
    let node_v4: std::net::Ipv4Addr = "203.0.113.150".parse().unwrap();
    let node_ns = c.lab.add_host("nodeaddr", &[node_v4], &[]);
    // A cluster-internal name that resolves (on the node) into the cluster's service range.
    let internal: std::net::Ipv4Addr = "203.0.113.100".parse().unwrap();
    c.lab
        .set_node_hosts(&[("evil.svc.cluster.test", IpAddr::V4(internal))]);
    let config = format!(
        "proxy-skip-range: .svc.cluster.test\ncluster-ranges: 203.0.113.96/28\n\
         routes:\n  - cidr: {node_v4}/32\n    route: direct\n"
    );
    let path = write_config(&c, &config);
    let node_netns = format!("/run/netns/{node_ns}");
    c.start_daemon(
        &[
            "--config",
            &path.display().to_string(),
            "--node-netns",
            &node_netns,
        ],
        "info",
    );
    let connect = |ip: &str, port: u16| {
        let code = format!(
            "import socket\ntry:\n  s = socket.create_connection(('{ip}', {port}), 5)\n  \
             s.settimeout(5)\n  s.sendall(b'GET / HTTP/1.1\\r\\nHost: evil.svc.cluster.test\\r\\n\\r\\n')\n  \
             print('data' if s.recv(10) else 'eof')\nexcept ConnectionResetError:\n  print('reset')"
        );
        c.lab.pods[0]
            .cmd("python3")
            .args(["-c", &code])
            .output()
            .unwrap()
    };
    // The name matches the skip entry and resolves to the destination, but the destination
    // is in the cluster's ranges: refused, not dialed.
    let o = connect(&internal.to_string(), 80);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "reset",
        "{}",
        out(&o)
    );
    let log = wait_log(&c, &format!("orig_dst={internal}:80"), 1);
    assert!(
        log.contains("rule=safety:cluster-range"),
        "a name-direct dial into the cluster ranges was not refused:\n{log}"
    );
    // The node's own address, known only in the node's namespace: refused as well.
    let o = connect(&node_v4.to_string(), 80);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "reset",
        "{}",
        out(&o)
    );
    let log = wait_log(&c, &format!("orig_dst={node_v4}:80"), 1);
    assert!(
        log.contains("rule=safety:node-address"),
        "the node's own address (from --node-netns) was dialed directly:\n{log}"
    );
}

/// A name rule's check asks the node's DNS once per TTL, not once per connection: five
/// connections that a name skip entry sends direct cost one A query at a real DNS server
/// (dnsmasq, answering with a 300 s TTL and logging every query it receives).
#[test]
fn name_checks_are_cached_for_the_answers_ttl() {
    if !tests::priv_check::privileged("name_checks_are_cached_for_the_answers_ttl") {
        return;
    }
    use std::net::{Ipv4Addr, SocketAddr};
    use tests::lab::{Lab, NODE_V4};
    let mut lab = Lab::new();
    lab.add_pod();
    let (inet, _) = lab.add_internet(2, 8080);
    lab.start_testsrv(
        &inet,
        "http",
        &[SocketAddr::from((Ipv4Addr::UNSPECIFIED, 80))],
    );
    let dns_v4 = Ipv4Addr::new(203, 0, 113, 53);
    let dns = lab.add_host("dns", &[dns_v4], &[]);
    let hosts = lab.dir.join("dns-hosts");
    let target = Lab::inet_v4(0);
    std::fs::write(&hosts, format!("{target} cached.example.test\n")).unwrap();
    let dnsmasq = lab.spawn_in(
        &dns,
        "dnsmasq",
        std::path::Path::new("dnsmasq"),
        &[
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            &format!("--addn-hosts={}", hosts.display()),
            "--local-ttl=300",
            "--log-queries",
            "--log-facility=-",
            &format!("--listen-address={dns_v4}"),
            "--bind-interfaces",
            "--pid-file=",
            "--user=root",
        ],
    );
    lab.procs[dnsmasq].wait_for_log("started", Duration::from_secs(10));
    lab.set_node_resolver(IpAddr::V4(dns_v4));
    lab.start_daemon(&["--proxy-skip-range", "cached.example.test"]);

    for i in 0..5 {
        let o = lab.pods[0]
            .cmd("curl")
            .args(["-sS", "--max-time", "10", "--resolve"])
            .arg(format!("cached.example.test:80:{target}"))
            .arg(format!("http://cached.example.test/{i}"))
            .output()
            .unwrap();
        assert!(o.status.success(), "request {i}: {}", out(&o));
        let body = String::from_utf8_lossy(&o.stdout);
        assert!(
            body.contains(&format!("peer={NODE_V4}:")),
            "request {i} not dialed directly by the node: {body}"
        );
    }
    lab.wait_daemon_log("rule=skip:cached.example.test");
    let queries = lab.procs[dnsmasq]
        .log()
        .lines()
        .filter(|l| l.contains("query[A] cached.example.test"))
        .count();
    assert_eq!(
        queries,
        1,
        "one A query for five connections within the TTL:\n{}",
        lab.procs[dnsmasq].log()
    );
}
