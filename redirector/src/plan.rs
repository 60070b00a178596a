//! One plan per connection: the configuration, the node's addresses, the original
//! destination and the sniffed host (with where it came from) become a [`Plan`] — the rule
//! and route (or the safety refusal), the tunnel settings, the target authority and the hops
//! with the exact request each is sent.
//!
//! The proxy executes plans, `redirector explain` renders them and `redirector check` sends
//! hop 0 of one, so the three cannot disagree. Planning does no I/O (sans-I/O, as
//! quinn-proto and rustls do it): when a name rule picks `direct`, [`start`] asks the caller
//! to resolve the name ([`Step::Resolve`]) and [`Pending::finish`] takes the answer. The
//! proxy answers with [`lookup`]; tests answer with a table.
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::{
    addr,
    config::Config,
    policy::{self, Route},
    sniff::HostSource,
    tunnel::{
        GatewayConfig, HOP_GATEWAY, HOP_PROXY, HOP_TARGET, ProxyConfig, ProxyScheme, Secret,
        TunnelConfig, connect::ConnectRequest,
    },
};

/// What the proxy knows about a connection when it plans it.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    pub orig: SocketAddr,
    /// The validated host name from TLS SNI or HTTP `Host`, if any.
    pub host: Option<&'a str>,
    pub host_source: HostSource,
}

/// For a name-based `direct`: does the name resolve to the destination IP?
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NameCheck {
    pub resolved: Vec<IpAddr>,
    pub matches: bool,
    pub error: Option<String>,
}

/// What happens to one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The original destination, IPv4-mapped IPv6 as IPv4.
    pub dst: SocketAddr,
    pub host: Option<String>,
    pub host_source: HostSource,
    /// The rule that decided: `default`, `skip:.svc`, `route:*.vault.azure.net->proxy`,
    /// `safety:metadata (default)`, with ` (name/ip mismatch)` when the name check failed.
    pub rule: String,
    /// `None`: refused by a safety rule (the proxy never dials it directly).
    pub route: Option<Route>,
    /// Present when a name rule chose `direct`.
    pub name_check: Option<NameCheck>,
    /// `host:port` the tunnel asks for: the sniffed name, else the IP.
    pub authority: String,
    /// The plain-HTTP proxy's settings apply (`proxy-http`, a `proxy` route, a `Host` header).
    pub http_tunnel: bool,
}

/// Either a finished plan, or the name the planner needs resolved first.
#[derive(Debug)]
pub enum Step {
    Ready(Plan),
    Resolve(Pending),
}

/// A plan waiting for a name check: resolve [`Pending::host`] and call [`Pending::finish`].
#[derive(Debug)]
pub struct Pending {
    plan: Plan,
    default: Route,
}

/// Whether any decision can depend on the host name. When none can (everything direct, no
/// name rules), the proxy does not wait for the client's first bytes: server-first
/// protocols would otherwise wait out the sniff deadline for nothing.
pub fn needs_host(config: &Config) -> bool {
    config.default_route != Route::Direct
        || config.skip.has_names()
        || !config.routes.rules.is_empty()
}

/// Plans a connection: skip ranges, route table, default, safety rules, tunnel.
pub fn start(config: &Config, node_addrs: &[IpAddr], facts: &Facts<'_>) -> Step {
    let ip = facts.orig.ip().to_canonical();
    let input = policy::PolicyInput {
        skip: &config.skip,
        routes: &config.routes,
        default: config.default_route,
        node_addrs,
        allow_dial: &config.allow_dial,
        cluster: &config.cluster_ranges,
    };
    let d = policy::decide(&input, ip, facts.orig.port(), facts.host);
    let authority = addr::authority(facts.host.unwrap_or(&ip.to_string()), facts.orig.port());
    let mut plan = Plan {
        dst: SocketAddr::new(ip, facts.orig.port()),
        host: facts.host.map(str::to_owned),
        host_source: facts.host_source,
        rule: d.rule,
        route: d.route,
        name_check: None,
        authority,
        http_tunnel: false,
    };
    plan.http_tunnel = http_tunnel(config, &plan);
    if d.by_name && d.route == Some(Route::Direct) {
        // A name rule may send a connection direct only to an address of that name: the
        // client chose the IP; the name is only what it claims.
        return Step::Resolve(Pending {
            plan,
            default: config.default_route,
        });
    }
    Step::Ready(plan)
}

impl Pending {
    /// The name to resolve and the port to resolve it for.
    pub fn host(&self) -> (&str, u16) {
        (
            self.plan.host.as_deref().unwrap_or(""),
            self.plan.dst.port(),
        )
    }

    /// Finishes the plan with the resolver's answer: `direct` stays only if the name
    /// resolves to the original destination; otherwise the default route applies.
    pub fn finish(self, resolved: Result<Vec<IpAddr>, String>, config: &Config) -> Plan {
        let mut plan = self.plan;
        let check = match resolved {
            Ok(addrs) => {
                let addrs: Vec<IpAddr> = addrs.into_iter().map(|a| a.to_canonical()).collect();
                NameCheck {
                    matches: addrs.contains(&plan.dst.ip()),
                    resolved: addrs,
                    error: None,
                }
            }
            Err(error) => NameCheck {
                resolved: Vec::new(),
                matches: false,
                error: Some(error),
            },
        };
        if !check.matches {
            plan.route = Some(self.default);
            plan.rule = format!("{} (name/ip mismatch)", plan.rule);
        }
        plan.name_check = Some(check);
        plan.http_tunnel = http_tunnel(config, &plan);
        plan
    }
}

/// Plans a connection, resolving with `resolve` when a name check is needed.
pub fn plan_with(
    config: &Config,
    node_addrs: &[IpAddr],
    facts: &Facts<'_>,
    resolve: impl FnOnce(&str, u16) -> Result<Vec<IpAddr>, String>,
) -> Plan {
    match start(config, node_addrs, facts) {
        Step::Ready(p) => p,
        Step::Resolve(pending) => {
            let (host, port) = pending.host();
            let answer = resolve(host, port);
            pending.finish(answer, config)
        }
    }
}

fn http_tunnel(config: &Config, plan: &Plan) -> bool {
    config.tunnel_http.is_some()
        && plan.route == Some(Route::Proxy)
        && plan.host_source == HostSource::Host
}

/// Where one hop connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP straight to the original destination.
    Target(SocketAddr),
    /// TCP to the enterprise proxy (`authority`), then TLS with `tls_name` for `https://`.
    Proxy {
        authority: String,
        tls_name: Option<String>,
    },
    /// TLS to the gateway, inside the previous hop's tunnel or over TCP.
    Gateway {
        authority: String,
        server_name: String,
        alpn: Vec<String>,
        client_cert: bool,
        through_proxy: bool,
    },
}

/// One upstream hop: where it connects and the CONNECT it sends (none for `direct`).
#[derive(Clone)]
pub struct HopPlan {
    pub hop: &'static str,
    pub endpoint: Endpoint,
    pub request: Option<ConnectRequest>,
}

impl Plan {
    /// The tunnel settings this plan uses.
    pub fn tunnel<'c>(&self, config: &'c Config) -> &'c TunnelConfig {
        match (&config.tunnel_http, self.http_tunnel) {
            (Some(t), true) => t,
            _ => &config.tunnel,
        }
    }

    /// The hops the tunnel opens, in order, with the request each is sent; the gateway's
    /// bearer token (read from its file when a tunnel opens) stands as an empty secret. An
    /// error names a route whose hop is not configured.
    pub fn hops(&self, config: &Config) -> Result<Vec<HopPlan>, String> {
        match self.route {
            None => Ok(Vec::new()),
            Some(route) => hops(self.tunnel(config), route, &self.authority, self.dst),
        }
    }
}

/// The hops of `route` to `target` (`host:port`; `dst` for `direct`) under `tunnel`.
pub fn hops(
    tunnel: &TunnelConfig,
    route: Route,
    target: &str,
    dst: SocketAddr,
) -> Result<Vec<HopPlan>, String> {
    let bad = |e| format!("cannot build the CONNECT request: {e}");
    match route {
        Route::Direct => Ok(vec![HopPlan {
            hop: HOP_TARGET,
            endpoint: Endpoint::Target(dst),
            request: None,
        }]),
        Route::Proxy => {
            let p = tunnel.proxy.as_ref().ok_or(
                "route proxy is used but no enterprise proxy is configured (--proxy-https / --proxy-http)",
            )?;
            Ok(vec![proxy_hop(p, target).map_err(bad)?])
        }
        Route::Gateway => {
            let g = tunnel
                .gateway
                .as_ref()
                .ok_or("route gateway is used but no --gateway-url is configured")?;
            let mut out = Vec::with_capacity(2);
            if let Some(p) = &tunnel.proxy {
                out.push(proxy_hop(p, &g.authority()).map_err(bad)?);
            }
            out.push(gateway_hop(g, tunnel.proxy.is_some(), target).map_err(bad)?);
            Ok(out)
        }
    }
}

/// The hop to the enterprise proxy `p` asking for `authority` (also what `redirector check`
/// sends to test the proxy).
pub fn proxy_hop(
    p: &ProxyConfig,
    authority: &str,
) -> Result<HopPlan, crate::tunnel::connect::RequestError> {
    Ok(HopPlan {
        hop: HOP_PROXY,
        endpoint: Endpoint::Proxy {
            authority: p.url.authority(),
            tls_name: match p.url.scheme {
                ProxyScheme::Https => Some(p.url.host.clone()),
                ProxyScheme::Http => None,
            },
        },
        request: Some(ConnectRequest::to_proxy(authority, p)?),
    })
}

fn gateway_hop(
    g: &GatewayConfig,
    through_proxy: bool,
    target: &str,
) -> Result<HopPlan, crate::tunnel::connect::RequestError> {
    let token = g.bearer_token_file.as_ref().map(|_| Secret::new(""));
    Ok(HopPlan {
        hop: HOP_GATEWAY,
        endpoint: Endpoint::Gateway {
            authority: g.authority(),
            server_name: g.server_name.clone(),
            alpn: g
                .tls
                .alpn_protocols
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect(),
            client_cert: g.tls.client_auth_cert_resolver.has_certs(),
            through_proxy,
        },
        request: Some(ConnectRequest::to_gateway(target, g, token)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RawRoute, Settings};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const PASSWORD: &str = "plan-test-password";

    fn config(extra: Settings) -> Config {
        let base = Settings {
            proxy_skip_range: Some("10.0.0.0/8,.svc,direct.example".into()),
            routes: Some(vec![
                RawRoute {
                    host: Some("*.vault.azure.test".into()),
                    route: "proxy".into(),
                    ..Default::default()
                },
                RawRoute {
                    cidr: Some("198.51.100.0/24".into()),
                    route: "direct".into(),
                    ..Default::default()
                },
                RawRoute {
                    cidr: Some("169.254.0.0/16".into()),
                    route: "direct".into(),
                    ..Default::default()
                },
                RawRoute {
                    cidr: Some("203.0.113.0/30".into()),
                    route: "direct".into(),
                    ..Default::default()
                },
                RawRoute {
                    cidr: Some("168.63.0.0/16".into()),
                    route: "direct".into(),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        Config::build(base.overlay(extra)).expect("config")
    }

    fn gateway_and_proxy() -> Settings {
        Settings {
            gateway_url: Some("https://gw.arc.test:443".into()),
            proxy_https: Some(format!("http://agent:{PASSWORD}@203.0.113.50:3128")),
            proxy_allow_basic_over_http: Some(true),
            ..Default::default()
        }
    }

    fn facts<'a>(orig: &str, host: Option<&'a str>, source: HostSource) -> Facts<'a> {
        Facts {
            orig: orig.parse().expect("addr"),
            host,
            host_source: source,
        }
    }

    /// A resolver table: names and their addresses; anything else fails.
    fn dns(
        table: &'static [(&'static str, &'static str)],
    ) -> impl Fn(&str, u16) -> Result<Vec<IpAddr>, String> {
        move |host, _| {
            let found: Vec<IpAddr> = table
                .iter()
                .filter(|(n, _)| *n == host)
                .map(|(_, a)| a.parse().expect("ip"))
                .collect();
            if found.is_empty() {
                Err("no such name".into())
            } else {
                Ok(found)
            }
        }
    }

    /// (what, (orig, host, source), route, rule, authority, hops)
    type Row = (
        &'static str,
        (&'static str, Option<&'static str>, HostSource),
        Option<Route>,
        &'static str,
        &'static str,
        &'static [&'static str],
    );

    /// The planner without sockets: (facts, resolver) → route, rule, authority, hops.
    #[test]
    fn plans_table() {
        use HostSource::*;
        let c = config(gateway_and_proxy());
        let node = ["203.0.113.1".parse().expect("ip")];
        let table: &[Row] = &[
            // (what, facts, route, rule, authority, hops)
            (
                "default gateway by name",
                ("203.0.113.10:443", Some("portal.azure.test"), Sni),
                Some(Route::Gateway),
                "default",
                "portal.azure.test:443",
                &["proxy", "gateway"],
            ),
            (
                "no name: the IP is the authority",
                ("203.0.113.10:8443", None, Ip),
                Some(Route::Gateway),
                "default",
                "203.0.113.10:8443",
                &["proxy", "gateway"],
            ),
            (
                "v4-mapped destination is judged and tunneled as IPv4",
                ("[::ffff:203.0.113.10]:443", None, Ip),
                Some(Route::Gateway),
                "default",
                "203.0.113.10:443",
                &["proxy", "gateway"],
            ),
            (
                "route rule by name",
                ("203.0.113.11:443", Some("kv1.vault.azure.test"), Sni),
                Some(Route::Proxy),
                "route:*.vault.azure.test->proxy",
                "kv1.vault.azure.test:443",
                &["proxy"],
            ),
            (
                "route rule by address",
                ("198.51.100.7:443", None, Ip),
                Some(Route::Direct),
                "route:198.51.100.0/24->direct",
                "198.51.100.7:443",
                &["target"],
            ),
            (
                "skip by name, and the name resolves to the destination",
                ("203.0.113.20:443", Some("direct.example"), Sni),
                Some(Route::Direct),
                "skip:direct.example",
                "direct.example:443",
                &["target"],
            ),
            (
                "skip by name, but the name resolves elsewhere: default route",
                ("203.0.113.21:443", Some("direct.example"), Sni),
                Some(Route::Gateway),
                "skip:direct.example (name/ip mismatch)",
                "direct.example:443",
                &["proxy", "gateway"],
            ),
            (
                "skip by name that does not resolve: default route",
                ("203.0.113.22:443", Some("api.svc"), Sni),
                Some(Route::Gateway),
                "skip:.svc (name/ip mismatch)",
                "api.svc:443",
                &["proxy", "gateway"],
            ),
            (
                "metadata address is never dialed direct, whatever the rule says",
                ("169.254.169.254:80", None, Ip),
                None,
                "safety:link-local/metadata (route:169.254.0.0/16->direct)",
                "169.254.169.254:80",
                &[],
            ),
            (
                "nor Azure's platform endpoint, also written v4-mapped",
                ("[::ffff:168.63.129.16]:80", None, Ip),
                None,
                "safety:platform-endpoint (route:168.63.0.0/16->direct)",
                "168.63.129.16:80",
                &[],
            ),
            (
                "nor the node's own address",
                ("203.0.113.1:10250", None, Ip),
                None,
                "safety:node-address (route:203.0.113.0/30->direct)",
                "203.0.113.1:10250",
                &[],
            ),
            (
                "the same address range off the node is fine",
                ("203.0.113.2:10250", None, Ip),
                Some(Route::Direct),
                "route:203.0.113.0/30->direct",
                "203.0.113.2:10250",
                &["target"],
            ),
        ];
        let resolve = dns(&[("direct.example", "203.0.113.20")]);
        for (what, (orig, host, source), route, rule, authority, hops) in table {
            let p = plan_with(&c, &node, &facts(orig, *host, *source), &resolve);
            assert_eq!(p.route, *route, "{what}");
            assert_eq!(p.rule, *rule, "{what}");
            assert_eq!(p.authority, *authority, "{what}");
            let got: Vec<&str> = p.hops(&c).expect("hops").iter().map(|h| h.hop).collect();
            assert_eq!(got, *hops, "{what}");
        }
    }

    #[test]
    fn name_check_is_asked_for_only_when_a_name_chooses_direct() {
        let c = config(gateway_and_proxy());
        let by_name = facts("203.0.113.20:443", Some("direct.example"), HostSource::Sni);
        let Step::Resolve(pending) = start(&c, &[], &by_name) else {
            panic!("a name rule chose direct: the planner must ask for the name");
        };
        assert_eq!(pending.host(), ("direct.example", 443));
        let p = pending.finish(Ok(vec!["::ffff:203.0.113.20".parse().expect("ip")]), &c);
        assert_eq!(p.route, Some(Route::Direct), "v4-mapped answers match");
        for f in [
            facts("198.51.100.7:443", Some("x.example"), HostSource::Sni),
            facts(
                "203.0.113.10:443",
                Some("portal.azure.test"),
                HostSource::Sni,
            ),
        ] {
            assert!(matches!(start(&c, &[], &f), Step::Ready(_)), "{f:?}");
        }
    }

    #[test]
    fn plain_http_proxy_settings_for_proxy_route_with_a_host_header_only() {
        let c = config(Settings {
            proxy_https: Some("http://203.0.113.50:3128".into()),
            proxy_http: Some("http://203.0.113.51:8080".into()),
            ..Default::default()
        });
        let cases = [
            (
                Some("kv1.vault.azure.test"),
                HostSource::Host,
                true,
                "203.0.113.51:8080",
            ),
            (
                Some("kv1.vault.azure.test"),
                HostSource::Sni,
                false,
                "203.0.113.50:3128",
            ),
        ];
        for (host, source, http, proxy) in cases {
            let p = plan_with(&c, &[], &facts("203.0.113.11:80", host, source), dns(&[]));
            assert_eq!(p.http_tunnel, http, "{source:?}");
            let hops = p.hops(&c).expect("hops");
            assert!(
                matches!(&hops[0].endpoint, Endpoint::Proxy { authority, .. } if authority == proxy),
                "{source:?}"
            );
        }
    }

    #[test]
    fn unconfigured_hop_is_named() {
        let c = config(Settings::default());
        let p = plan_with(
            &c,
            &[],
            &facts(
                "203.0.113.11:443",
                Some("kv1.vault.azure.test"),
                HostSource::Sni,
            ),
            dns(&[]),
        );
        let err = p.hops(&c).err().expect("no proxy configured");
        assert!(err.contains("no enterprise proxy is configured"), "{err}");
    }

    /// What `explain` renders for hop 0 is what the proxy sends: the plan's request, sent by
    /// the tunnel code to a test peer that captures it, redacted, equals `explain`'s lines.
    #[tokio::test]
    async fn explained_request_equals_the_bytes_sent() {
        let peer = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = peer.local_addr().expect("addr");
        let c = config(Settings {
            proxy_https: Some(format!("http://agent:{PASSWORD}@{addr}")),
            proxy_allow_basic_over_http: Some(true),
            ..Default::default()
        });
        let f = facts(
            "203.0.113.11:443",
            Some("kv1.vault.azure.test"),
            HostSource::Sni,
        );
        let p = plan_with(&c, &[], &f, dns(&[]));
        assert_eq!(p.route, Some(Route::Proxy));
        let hops = p.hops(&c).expect("hops");
        let shown = crate::explain::render_hop(&hops[0]).request;

        let captured = tokio::spawn(async move {
            let (mut s, _) = peer.accept().await.expect("accept");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut chunk).await.expect("read");
                assert!(n > 0, "closed before the request head ended");
                buf.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .expect("answer");
            buf
        });
        let upstream = crate::tunnel::open(p.tunnel(&c), Route::Proxy, &p.authority, f.orig)
            .await
            .expect("tunnel through the test peer");
        drop(upstream);
        let wire = captured.await.expect("peer task");
        assert_eq!(
            wire,
            hops[0].request.as_ref().expect("request").encode_h1(),
            "the proxy sent the planned request"
        );

        // Parse what was sent independently and redact every header value after its scheme.
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(&wire).expect("parse").is_complete());
        let mut lines = vec![format!(
            "{} {} HTTP/1.1",
            req.method.expect("method"),
            req.path.expect("authority")
        )];
        for h in req.headers.iter() {
            let v = std::str::from_utf8(h.value).expect("utf-8");
            lines.push(match (h.name, v.split_once(' ')) {
                ("Host", _) => format!("Host: {v}"),
                (name, Some((scheme @ ("Basic" | "Bearer"), _))) => {
                    format!("{name}: {scheme} <redacted>")
                }
                (name, _) => format!("{name}: <redacted>"),
            });
        }
        assert_eq!(shown, lines, "explain shows the request that was sent");
        assert!(!shown.concat().contains(PASSWORD));
    }
}
