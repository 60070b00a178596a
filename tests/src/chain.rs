//! The whole egress chain in a closed network: pods → redirector (node) → Squid (`proxy`
//! netns, 203.0.113.50:3128) → gateway simulator (`gw` netns, gw.arc.test = 203.0.113.60:443)
//! → targets (`inet` netns), with a test CA for every certificate.
//!
//! Target names (pods resolve them through their own /etc/hosts; the gateway through its
//! static table; nobody uses DNS):
//! - `portal.azure.test` 203.0.113.10: HTTPS on 443, HTTP on 80 (allowed);
//! - `web.azure.test` 203.0.113.11: HTTP on 80 (allowed);
//! - 203.0.113.12:2525: a server-first banner protocol, no name (allowed by IP);
//! - `denied.example.test` 203.0.113.13: HTTPS on 443 (NOT allowed: 403);
//! - `kv1.vault.azure.test` 203.0.113.10: HTTPS on 443 (a "Key Vault" for `proxy` routes);
//! - `bulk.azure.test` 203.0.113.14: server-first echo on 8080 (allowed by IP).
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::{
    lab::Lab,
    pki::TestCa,
    squid::{Squid, SquidOptions},
};

pub const GATEWAY_NAME: &str = "gw.arc.test";
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 60);
pub const SQUID_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 50);
pub const PROXY_USER: &str = "agent";
/// Distinctive so a test can grep every log for it.
pub const PROXY_PASSWORD: &str = "Pw-7c1f9e-never-log-me";

pub const TARGETS: [(&str, Ipv4Addr); 5] = [
    ("portal.azure.test", Ipv4Addr::new(203, 0, 113, 10)),
    ("kv1.vault.azure.test", Ipv4Addr::new(203, 0, 113, 10)),
    ("web.azure.test", Ipv4Addr::new(203, 0, 113, 11)),
    ("denied.example.test", Ipv4Addr::new(203, 0, 113, 13)),
    ("bulk.azure.test", Ipv4Addr::new(203, 0, 113, 14)),
];
pub const BANNER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 12)), 2525);

/// How the gateway simulator behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gateway {
    /// Certificate from the trusted test CA; HTTP/1.1 CONNECT only (ALPN `http/1.1`).
    Normal,
    /// As `Normal`, and offers ALPN `h2` first: HTTP/2 CONNECT streams.
    H2,
    /// Certificate from a CA the redirector does not trust.
    Untrusted,
    /// Accepts TCP, never answers.
    Silent,
    /// Nothing listens on the gateway address.
    Down,
}

pub struct Chain {
    pub lab: Lab,
    pub ca_pem: PathBuf,
    pub squid: Option<Squid>,
    gw_ns: String,
    proxy_ns: String,
    ca: TestCa,
    untrusted: TestCa,
}

impl Chain {
    /// Lab with `pods` pods, targets, and the gateway and proxy namespaces (nothing started
    /// in the latter two yet).
    pub fn new(pods: usize) -> Chain {
        let mut lab = Lab::new();
        for _ in 0..pods {
            lab.add_pod();
        }
        let pki_dir = lab.dir.join("pki");
        std::fs::create_dir_all(&pki_dir).expect("pki dir");
        let ca = TestCa::new(&pki_dir);
        let untrusted = TestCa::untrusted(&pki_dir.join("untrusted"));
        let ca_pem = ca.write_ca(&pki_dir);
        let mut v4: Vec<Ipv4Addr> = TARGETS.iter().map(|(_, ip)| *ip).collect();
        v4.push(Ipv4Addr::new(203, 0, 113, 12));
        v4.sort();
        v4.dedup();
        let inet = lab.add_host("inet", &v4, &[]);
        let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
        let leaf = ca.issue(&names);
        let any = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        let bin = crate::lab::workspace_bin("rdr-testsrv");
        let https_args = [
            "https",
            "--listen",
            "0.0.0.0:443",
            "--cert",
            leaf.cert_pem_path.to_str().expect("utf-8 path"),
            "--key",
            leaf.key_pem_path.to_str().expect("utf-8 path"),
        ];
        let i = lab.spawn_in(&inet, "testsrv-https", &bin, &https_args);
        lab.procs[i].wait_for_log("ready", Duration::from_secs(10));
        lab.start_testsrv(&inet, "http", &[any(80)]);
        lab.start_testsrv(&inet, "banner", &[BANNER]);
        lab.start_testsrv(&inet, "whoami", &[any(8080)]);
        let hosts: Vec<(&str, IpAddr)> = TARGETS
            .iter()
            .map(|(n, ip)| (*n, IpAddr::V4(*ip)))
            .collect();
        lab.set_pod_hosts(&hosts);
        let gw_ns = lab.add_host("gw", &[GATEWAY_V4], &[]);
        let proxy_ns = lab.add_host("proxy", &[SQUID_V4], &[]);
        Chain {
            lab,
            ca_pem,
            squid: None,
            gw_ns,
            proxy_ns,
            ca,
            untrusted,
        }
    }

    /// Starts Debian's Squid in the proxy namespace (Basic auth when `auth`), allowing
    /// CONNECT to 443 only.
    pub fn start_squid(&mut self, auth: bool) {
        let mut o = SquidOptions::new(
            SocketAddr::new(IpAddr::V4(SQUID_V4), 3128),
            self.lab.dir.join("squid"),
        );
        o.netns = Some(self.proxy_ns.clone());
        if auth {
            o.basic_auth = Some((PROXY_USER.into(), PROXY_PASSWORD.into()));
        }
        o.hosts = vec![(GATEWAY_NAME.into(), IpAddr::V4(GATEWAY_V4))];
        // For `proxy` routes Squid dials targets itself.
        o.hosts.extend(
            TARGETS
                .iter()
                .map(|(n, ip)| (n.to_string(), IpAddr::V4(*ip))),
        );
        self.squid = Some(Squid::start(o));
    }

    /// Starts the gateway simulator on gw.arc.test:443.
    pub fn start_gateway(&mut self, kind: Gateway) -> Option<usize> {
        self.start_gateway_with(kind, &[])
    }

    /// [`Chain::start_gateway`] with extra simulator arguments (e.g. `--require-bearer`).
    pub fn start_gateway_with(&mut self, kind: Gateway, extra: &[&str]) -> Option<usize> {
        let dir = self.lab.dir.join("pki");
        let leaf = match kind {
            Gateway::Down => return None,
            Gateway::Untrusted => self.untrusted.issue(&[GATEWAY_NAME]),
            Gateway::Normal | Gateway::H2 | Gateway::Silent => self.ca.issue(&[GATEWAY_NAME]),
        };
        let _ = dir;
        let mut args: Vec<String> = vec!["--listen".into(), format!("{GATEWAY_V4}:443")];
        if kind == Gateway::Silent {
            args.push("--silent".into());
        } else {
            args.extend(["--cert".into(), leaf.cert_pem_path.display().to_string()]);
            args.extend(["--key".into(), leaf.key_pem_path.display().to_string()]);
        }
        if kind == Gateway::H2 {
            args.push("--offer-h2".into());
        }
        for pat in [
            "*.azure.test:443",
            "portal.azure.test:80",
            "web.azure.test:80",
            "bulk.azure.test:8080",
            "203.0.113.12:2525",
            "203.0.113.10:443",
            "203.0.113.14:8080",
        ] {
            args.extend(["--allow".into(), pat.into()]);
        }
        for (name, ip) in TARGETS {
            args.extend(["--resolve".into(), format!("{name}={ip}")]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let bin = crate::lab::workspace_bin("rdr-gateway-sim");
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let ns = self.gw_ns.clone();
        let i = self.lab.spawn_in(&ns, "gateway-sim", &bin, &argv);
        self.lab.procs[i].wait_for_log("listening", Duration::from_secs(10));
        Some(i)
    }

    /// `curl -sS --max-time 15 --cacert <test CA> <args>` in pod 0, no proxy variables.
    pub fn curl(&self, args: &[&str]) -> std::process::Output {
        let ca = self.ca_pem.display().to_string();
        self.lab.pods[0]
            .cmd("curl")
            .args(["-sS", "--max-time", "15", "--cacert", &ca])
            .args(args)
            .output()
            .expect("curl")
    }

    /// TCP connections of the gateway's namespace still open on its side (established, or
    /// closed by the peer and not yet by the simulator): 0 once it has seen and handled the end
    /// of every session.
    pub fn gateway_open_connections(&self) -> usize {
        crate::lab::sh(&format!(
            "ip netns exec {} ss -Htn state established state close-wait",
            self.gw_ns
        ))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
    }

    /// The gateway simulator's log (one line per tunnel event).
    pub fn gateway_log(&self) -> String {
        self.lab
            .procs
            .iter()
            .filter(|p| p.name == "gateway-sim")
            .map(|p| p.log())
            .collect()
    }

    /// Everything the redirector wrote.
    pub fn daemon_log(&self) -> String {
        self.lab
            .procs
            .iter()
            .filter(|p| p.name == "redirector")
            .map(|p| p.log())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Target servers' logs.
    pub fn target_log(&self) -> String {
        self.lab
            .procs
            .iter()
            .filter(|p| p.name.starts_with("testsrv"))
            .map(|p| p.log())
            .collect()
    }

    /// The standard daemon flags for this chain: gateway URL and CA, and the Squid URL (with
    /// `password`) when Squid runs. Without Squid the daemon dials the gateway directly.
    pub fn daemon_flags(&self, password: &str) -> Vec<String> {
        let mut f = vec![
            "--gateway-url".to_owned(),
            format!("https://{GATEWAY_NAME}:443"),
            "--gateway-ca".into(),
            self.ca_pem.display().to_string(),
            "--sniff-timeout".into(),
            "0.3".into(),
            // Generous enough for a loaded 2-core CI machine running tests in parallel;
            // the timeout tests still finish well inside curl's own --max-time.
            "--connect-timeout".into(),
            "5".into(),
            "--tls-timeout".into(),
            "5".into(),
            "--connect-response-timeout".into(),
            "5".into(),
        ];
        match &self.squid {
            // Squid speaks plain http://: Basic over it needs the explicit opt-in.
            Some(s) => f.extend([
                "--proxy-https".into(),
                format!("http://{PROXY_USER}:{password}@{}", s.addr()),
                "--proxy-allow-basic-over-http".into(),
            ]),
            None => f.extend(["--gateway-connect-to".into(), GATEWAY_V4.to_string()]),
        }
        f
    }

    pub fn start_daemon(&mut self, extra: &[&str], rust_log: &str) -> usize {
        let mut flags = self.daemon_flags(PROXY_PASSWORD);
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        self.lab.start_daemon_env(&flags, &[("RUST_LOG", rust_log)])
    }
}
