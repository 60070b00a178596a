//! Routing policy: pure decisions, no I/O. Parses skip ranges (`--proxy-skip-range`) and
//! route tables, and decides per connection: skipped (direct), a route-table route, or the
//! default route — with the safety rules applied last.
//!
//! Name matching (skip ranges and routes, case-insensitive, trailing dot ignored):
//!
//! | pattern            | matches                                   | does not match     |
//! |--------------------|-------------------------------------------|--------------------|
//! | `svc`              | `svc`, `a.svc`, `a.b.svc`                  | `notsvc`           |
//! | `.svc`             | `a.svc`, `a.b.svc`                         | `svc`              |
//! | `*.svc`            | `a.svc`, `a.b.svc`                         | `svc`              |
//! | `name:443`         | `name` on port 443 only                    | `name` on port 80  |
//!
//! A bare name in a *route* (`host: data.policy.core.windows.net`) matches exactly that
//! name; in a *skip range* it also matches names below it, as `NO_PROXY` does in Go and
//! curl. `*` alone in a skip range skips everything. Internationalized names are matched in
//! their punycode (`xn--`) form, which is what SNI and Host carry.
use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
};

use ipnet::IpNet;
use serde::Serialize;

use crate::addr::{canonical_net, parse_ip_or_cidr, split_port, validate_name};

/// How a connection leaves the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Straight to the original destination.
    Direct,
    /// `CONNECT host:port` through the enterprise proxy.
    Proxy,
    /// (Enterprise proxy,) TLS to the gateway, `CONNECT host:port` inside it.
    Gateway,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Proxy => "proxy",
            Route::Gateway => "gateway",
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One route table entry as written in the configuration file.
#[derive(Clone, Debug, Default, serde::Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RawRoute {
    /// Host pattern: `name`, `*.suffix`, `.suffix`, optional `:port`.
    pub host: Option<String>,
    /// Address range (`10.0.0.0/8`, `2001:db8::/32`, or one IP).
    pub cidr: Option<String>,
    /// Port restriction (also expressible as `host: name:443`).
    pub port: Option<u16>,
    /// `direct`, `proxy` or `gateway`.
    pub route: String,
}

/// How a name pattern matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum NamePattern {
    /// Exactly this name.
    Exact(String),
    /// Names strictly below this suffix (`.svc`, `*.svc`).
    Below(String),
    /// This name and everything below it (a bare name in a skip range).
    SelfAndBelow(String),
}

impl NamePattern {
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let below = |suffix: &str| {
            host.len() > suffix.len()
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        };
        match self {
            NamePattern::Exact(n) => host == *n,
            NamePattern::Below(n) => below(n),
            NamePattern::SelfAndBelow(n) => host == *n || below(n),
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(n) | NamePattern::SelfAndBelow(n) => write!(f, "{n}"),
            NamePattern::Below(n) => write!(f, "*.{n}"),
        }
    }
}

/// What a rule matches on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Matcher {
    Name(NamePattern),
    Cidr(IpNet),
    /// `*` in a skip range.
    Everything,
}

/// One skip-range entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SkipEntry {
    pub matcher: Matcher,
    pub port: Option<u16>,
}

impl Matcher {
    /// Does a connection to `dst:port`, named `host`, match this matcher restricted to
    /// `only_port`? (Shared by skip entries and route rules.)
    fn matches(&self, only_port: Option<u16>, dst: IpAddr, port: u16, host: Option<&str>) -> bool {
        if only_port.is_some_and(|p| p != port) {
            return false;
        }
        match self {
            Matcher::Everything => true,
            Matcher::Cidr(n) => n.contains(&dst),
            Matcher::Name(p) => host.is_some_and(|h| p.matches(h)),
        }
    }
}

impl SkipEntry {
    fn matches(&self, dst: IpAddr, port: u16, host: Option<&str>) -> bool {
        self.matcher.matches(self.port, dst, port, host)
    }
}

impl fmt::Display for SkipEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.matcher, self.port) {
            // An IPv6 range with a port needs brackets to be read back: `[2001:db8::/32]:443`.
            (Matcher::Cidr(n @ IpNet::V6(_)), Some(p)) => return write!(f, "[{n}]:{p}"),
            (Matcher::Everything, _) => write!(f, "*")?,
            (Matcher::Cidr(n), _) => write!(f, "{n}")?,
            (Matcher::Name(NamePattern::Below(n)), _) => write!(f, ".{n}")?,
            (Matcher::Name(p), _) => write!(f, "{p}")?,
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// A parsed `--proxy-skip-range`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SkipRanges {
    pub entries: Vec<SkipEntry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid entry {entry:?}: {reason}")]
pub struct SkipParseError {
    pub entry: String,
    pub reason: &'static str,
}

impl SkipRanges {
    /// Port-less address ranges: these go into the kernel LPM maps, so such connections
    /// never reach the proxy. (`*` becomes 0.0.0.0/0 and ::/0.)
    pub fn cidrs(&self) -> Vec<IpNet> {
        let mut out = Vec::new();
        for e in self.entries.iter().filter(|e| e.port.is_none()) {
            match &e.matcher {
                Matcher::Cidr(n) => out.push(*n),
                Matcher::Everything => {
                    out.push("0.0.0.0/0".parse().expect("literal"));
                    out.push("::/0".parse().expect("literal"));
                }
                Matcher::Name(_) => {}
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Are there entries only userspace can decide (names, ports)?
    pub fn has_names(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e.matcher, Matcher::Name(_)) || e.port.is_some())
    }

    /// Does `ip` fall into a port-less skip CIDR? (IPv4-mapped IPv6 is judged as IPv4.)
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.cidrs().iter().any(|n| n.contains(&ip))
    }
}

impl FromStr for SkipRanges {
    type Err = SkipParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut entries = Vec::new();
        // NO_PROXY values are sometimes space-separated too.
        for item in s
            .split([',', ' ', '\t', '\n'])
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            entries.push(parse_skip_entry(item)?);
        }
        Ok(Self { entries })
    }
}

fn parse_skip_entry(item: &str) -> Result<SkipEntry, SkipParseError> {
    let err = |reason| SkipParseError {
        entry: item.to_owned(),
        reason,
    };
    if item == "*" {
        return Ok(SkipEntry {
            matcher: Matcher::Everything,
            port: None,
        });
    }
    // A bare IPv6 address or CIDR has several colons and no port.
    if let Ok(net) = item.parse::<IpNet>() {
        return Ok(SkipEntry {
            matcher: Matcher::Cidr(canonical_net(net)),
            port: None,
        });
    }
    if let Ok(ip) = item.parse::<IpAddr>() {
        return Ok(SkipEntry {
            matcher: Matcher::Cidr(canonical_net(IpNet::from(ip))),
            port: None,
        });
    }
    let (body, port) = split_port(item).map_err(err)?;
    if let Ok(net) = body.parse::<IpNet>() {
        return Ok(SkipEntry {
            matcher: Matcher::Cidr(canonical_net(net)),
            port,
        });
    }
    if let Ok(ip) = body.parse::<IpAddr>() {
        return Ok(SkipEntry {
            matcher: Matcher::Cidr(canonical_net(IpNet::from(ip))),
            port,
        });
    }
    if body.contains('/') {
        return Err(err("not a valid CIDR (address/prefix-length)"));
    }
    let pattern = if let Some(rest) = body.strip_prefix("*.") {
        NamePattern::Below(canonical_name(rest).map_err(err)?)
    } else if let Some(rest) = body.strip_prefix('.') {
        NamePattern::Below(canonical_name(rest).map_err(err)?)
    } else {
        NamePattern::SelfAndBelow(canonical_name(body).map_err(err)?)
    };
    Ok(SkipEntry {
        matcher: Matcher::Name(pattern),
        port,
    })
}

/// A name in a skip entry or route: every trailing dot removed, then [`validate_name`].
fn canonical_name(name: &str) -> Result<String, &'static str> {
    validate_name(name.trim_end_matches('.'))
}

/// One route-table rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteRule {
    pub matcher: Matcher,
    pub port: Option<u16>,
    pub route: Route,
}

impl RouteRule {
    pub fn from_raw(r: &RawRoute) -> Result<RouteRule, String> {
        let route = match r.route.to_ascii_lowercase().as_str() {
            "direct" => Route::Direct,
            "proxy" => Route::Proxy,
            "gateway" => Route::Gateway,
            other => {
                return Err(format!(
                    "route {other:?} is not one of direct, proxy, gateway"
                ));
            }
        };
        let (matcher, port) = match (&r.host, &r.cidr) {
            (Some(h), None) => {
                let (body, port) = split_port(h.trim()).map_err(|e| format!("host {h:?}: {e}"))?;
                let pattern = if let Some(rest) =
                    body.strip_prefix("*.").or_else(|| body.strip_prefix('.'))
                {
                    NamePattern::Below(
                        canonical_name(rest).map_err(|e| format!("host {h:?}: {e}"))?,
                    )
                } else {
                    NamePattern::Exact(
                        canonical_name(body).map_err(|e| format!("host {h:?}: {e}"))?,
                    )
                };
                (Matcher::Name(pattern), port)
            }
            (None, Some(c)) => {
                let net = parse_ip_or_cidr(c.trim())
                    .ok_or_else(|| format!("cidr {c:?} is not an IP or CIDR"))?;
                (Matcher::Cidr(net), None)
            }
            (Some(_), Some(_)) => return Err("give either host or cidr, not both".into()),
            (None, None) => return Err("needs a host or cidr".into()),
        };
        let port = match (port, r.port) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!("port {a} in host and port {b} disagree"));
            }
            (Some(0), _) | (_, Some(0)) => return Err("port must be 1-65535".into()),
            (a, b) => a.or(b),
        };
        Ok(RouteRule {
            matcher,
            port,
            route,
        })
    }

    fn matches(&self, dst: IpAddr, port: u16, host: Option<&str>) -> bool {
        self.matcher.matches(self.port, dst, port, host)
    }
}

impl fmt::Display for RouteRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.matcher {
            Matcher::Name(p) => write!(f, "{p}")?,
            Matcher::Cidr(n) => write!(f, "{n}")?,
            Matcher::Everything => write!(f, "*")?,
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write!(f, "->{}", self.route)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RouteTable {
    pub rules: Vec<RouteRule>,
}

/// Built-in route tables. `arc-not-covered`: Azure services the Arc gateway does not forward
/// (Container insights, Key Vault, Azure Policy), which must go through the enterprise proxy
/// directly.
pub const PRESETS: &[(&str, &[&str])] = &[(
    "arc-not-covered",
    &[
        "*.ods.opinsights.azure.com",
        "*.oms.opinsights.azure.com",
        "*.monitoring.azure.com",
        "*.vault.azure.net",
        "data.policy.core.windows.net",
        "store.policy.core.windows.net",
    ],
)];

pub fn preset(name: &str) -> Option<Vec<RouteRule>> {
    let (_, hosts) = PRESETS.iter().find(|(n, _)| *n == name)?;
    hosts
        .iter()
        .map(|h| {
            RouteRule::from_raw(&RawRoute {
                host: Some((*h).into()),
                route: "proxy".into(),
                ..Default::default()
            })
            .ok()
        })
        .collect()
}

/// What the policy decided for one connection, and why (for the audit line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// `None`: refuse the connection (safety rule).
    pub route: Option<Route>,
    /// The rule that matched: `skip:.svc`, `route:*.vault.azure.net->proxy`, `default`,
    /// `safety:metadata` …
    pub rule: String,
    /// True when `direct` was chosen by a host-name rule: the caller must then check that
    /// the name resolves to the original destination.
    pub by_name: bool,
}

/// Everything `decide` needs besides the connection.
pub struct PolicyInput<'a> {
    pub skip: &'a SkipRanges,
    pub routes: &'a RouteTable,
    pub default: Route,
    /// The node's own addresses (never dialed direct on a pod's behalf).
    pub node_addrs: &'a [IpAddr],
    /// Explicit exceptions to the safety rules.
    pub allow_dial: &'a [IpNet],
    /// The cluster's pod and service ranges (never dialed directly on a pod's behalf).
    pub cluster: &'a [IpNet],
}

/// Decides the route of a connection to `dst:port` whose client named `host` (SNI / Host).
pub fn decide(p: &PolicyInput<'_>, dst: IpAddr, port: u16, host: Option<&str>) -> Decision {
    let dst = dst.to_canonical();
    let mut d = Decision {
        route: Some(p.default),
        rule: "default".into(),
        by_name: false,
    };
    if let Some(e) = p.skip.entries.iter().find(|e| e.matches(dst, port, host)) {
        d = Decision {
            route: Some(Route::Direct),
            rule: format!("skip:{e}"),
            by_name: matches!(e.matcher, Matcher::Name(_)),
        };
    } else if let Some(r) = p.routes.rules.iter().find(|r| r.matches(dst, port, host)) {
        d = Decision {
            route: Some(r.route),
            rule: format!("route:{r}"),
            by_name: matches!(r.matcher, Matcher::Name(_)),
        };
    }
    // Safety: the proxy never dials link-local / metadata / loopback / the node itself / the
    // cluster's own ranges on a pod's behalf (that would lend the pod the node's identity, past
    // NetworkPolicy), unless explicitly allowed.
    if d.route == Some(Route::Direct)
        && let Some(why) = forbidden_direct(dst, p.node_addrs, p.cluster)
        && !p.allow_dial.iter().any(|n| n.contains(&dst))
    {
        return Decision {
            route: None,
            rule: format!("safety:{why} ({})", d.rule),
            by_name: false,
        };
    }
    d
}

/// Why `ip` may not be dialed directly by the proxy, if it may not.
pub fn forbidden_direct(
    ip: IpAddr,
    node_addrs: &[IpAddr],
    cluster: &[IpNet],
) -> Option<&'static str> {
    let ip = ip.to_canonical();
    let metadata_v6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    // Azure's platform endpoint (the "wireserver": DHCP, DNS, health probes, the VM agent's
    // channel), reachable from every VM and answering with the node's identity.
    let azure_platform = std::net::Ipv4Addr::new(168, 63, 129, 16);
    match ip {
        IpAddr::V4(v4) if v4 == azure_platform => return Some("platform-endpoint"),
        IpAddr::V4(v4) if v4.is_link_local() => return Some("link-local/metadata"),
        IpAddr::V4(v4) if v4.is_loopback() || v4.is_unspecified() => return Some("loopback"),
        IpAddr::V6(v6) if v6 == metadata_v6 => return Some("link-local/metadata"),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {
            return Some("link-local/metadata");
        }
        IpAddr::V6(v6) if v6.is_loopback() || v6.is_unspecified() => return Some("loopback"),
        _ => {}
    }
    if node_addrs.iter().any(|a| a.to_canonical() == ip) {
        return Some("node-address");
    }
    if cluster.iter().any(|n| n.contains(&ip)) {
        return Some("cluster-range");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_az_connectedk8s_example() {
        let s: SkipRanges = "10.0.0.0/16,kubernetes.default.svc,.svc.cluster.local,.svc"
            .parse()
            .unwrap();
        assert_eq!(s.cidrs(), vec!["10.0.0.0/16".parse::<IpNet>().unwrap()]);
        assert_eq!(s.entries.len(), 4);
        assert_eq!(
            s.entries[2].matcher,
            Matcher::Name(NamePattern::Below("svc.cluster.local".into()))
        );
        assert_eq!(s.entries[2].to_string(), ".svc.cluster.local");
    }

    #[test]
    fn single_ips_and_mapped_forms_are_canonical() {
        let s: SkipRanges = "203.0.113.7, ::ffff:198.51.100.0/120 ,2001:db8::1"
            .parse()
            .unwrap();
        let mut want: Vec<IpNet> = ["203.0.113.7/32", "198.51.100.0/24", "2001:db8::1/128"]
            .iter()
            .map(|x| x.parse().unwrap())
            .collect();
        want.sort();
        assert_eq!(s.cidrs(), want);
        assert!(s.contains_ip(ip("::ffff:198.51.100.9")));
        assert!(s.contains_ip(ip("198.51.100.9")));
        assert!(!s.contains_ip(ip("198.51.101.9")));
    }

    #[test]
    fn no_proxy_style_values() {
        let s: SkipRanges =
            "localhost 127.0.0.1:8080 [2001:db8::5]:443 *.corp.example .internal example.org:80 *"
                .parse()
                .unwrap();
        let strs: Vec<String> = s.entries.iter().map(ToString::to_string).collect();
        assert_eq!(
            strs,
            [
                "localhost",
                "127.0.0.1/32:8080",
                "[2001:db8::5/128]:443",
                ".corp.example",
                ".internal",
                "example.org:80",
                "*"
            ]
        );
        // Ported CIDRs are decided in userspace; only port-less ones go to the kernel.
        assert!(s.cidrs().contains(&"0.0.0.0/0".parse().unwrap()));
        assert!(!s.cidrs().contains(&"127.0.0.1/32".parse().unwrap()));
    }

    #[test]
    fn printed_entries_parse_back_the_same() {
        // `[::]:2` printed as `::/128:2` did not parse back (found by the fuzzer).
        for text in [
            "[::]:2",
            "[2001:db8::/32]:443",
            "10.0.0.0/8:80",
            ".svc:443",
            "*",
            "a.example",
        ] {
            let parsed: SkipRanges = text.parse().unwrap();
            let printed = parsed.entries[0].to_string();
            let again: SkipRanges = printed
                .parse()
                .unwrap_or_else(|e| panic!("{text} -> {printed}: {e}"));
            assert_eq!(again, parsed, "{text} -> {printed}");
        }
    }

    /// Matcher table: (pattern list, host, port, expected).
    #[test]
    fn matcher_table() {
        let table: &[(&str, &str, u16, bool)] = &[
            ("svc", "svc", 443, true),
            ("svc", "a.svc", 443, true),
            ("svc", "notsvc", 443, false),
            (".svc", "svc", 443, false),
            (".svc", "a.b.svc", 443, true),
            ("*.svc", "svc", 443, false),
            ("*.svc", "a.svc", 443, true),
            ("Example.COM", "example.com", 443, true),
            ("example.com", "EXAMPLE.com.", 443, true),
            ("example.com.", "a.example.com", 443, true),
            ("example.com:443", "example.com", 443, true),
            ("example.com:443", "example.com", 80, false),
            (
                "*.update.microsoft.com:80",
                "a.update.microsoft.com",
                80,
                true,
            ),
            (
                "*.update.microsoft.com:80",
                "a.update.microsoft.com",
                443,
                false,
            ),
            ("xn--bcher-kva.example", "xn--bcher-kva.example", 443, true),
            ("xn--bcher-kva.example", "bücher.example", 443, false),
        ];
        for (pat, host, port, want) in table {
            let s: SkipRanges = pat.parse().unwrap();
            let got = s.entries[0].matches(ip("203.0.113.1"), *port, Some(host));
            assert_eq!(got, *want, "{pat} vs {host}:{port}");
        }
    }

    #[test]
    fn cidr_table_v4_v6_mapped() {
        let table: &[(&str, &str, bool)] = &[
            ("10.0.0.0/8", "10.1.2.3", true),
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("::ffff:10.0.0.0/104", "10.1.2.3", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("2001:db8::/32", "2001:db8:1::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("203.0.113.5", "203.0.113.5", true),
            ("203.0.113.5:443", "203.0.113.5", true),
        ];
        for (pat, addr, want) in table {
            let s: SkipRanges = pat.parse().unwrap();
            let got = s.entries[0].matches(ip(addr).to_canonical(), 443, None);
            assert_eq!(got, *want, "{pat} vs {addr}");
        }
    }

    #[test]
    fn rejects_garbage_with_the_entry_named() {
        for bad in [
            "10.0.0.0/33",
            "exa@mple.com",
            "http://x",
            "..",
            "10.0.0.0/x",
            "a:0",
            "a:99999",
            "[::1",
            "-bad.example",
            "bücher.example",
            // Found by the fuzzer: printed back, these would parse as addresses.
            "1.6.6.1.",
            "127.1",
            "1.2.3.4.5",
        ] {
            let e = bad.parse::<SkipRanges>().unwrap_err();
            assert_eq!(e.entry, bad, "error must name the entry");
        }
    }

    fn input<'a>(
        skip: &'a SkipRanges,
        routes: &'a RouteTable,
        node: &'a [IpAddr],
        allow: &'a [IpNet],
    ) -> PolicyInput<'a> {
        PolicyInput {
            skip,
            routes,
            default: Route::Gateway,
            node_addrs: node,
            allow_dial: allow,
            cluster: &[],
        }
    }

    #[test]
    fn decide_skips_then_routes_then_default() {
        let skip: SkipRanges = "10.0.0.0/8,.svc".parse().unwrap();
        let mut rules = preset("arc-not-covered").unwrap();
        rules.push(
            RouteRule::from_raw(&RawRoute {
                cidr: Some("198.51.100.0/24".into()),
                route: "direct".into(),
                ..Default::default()
            })
            .unwrap(),
        );
        let routes = RouteTable { rules };
        let p = input(&skip, &routes, &[], &[]);
        let d = decide(&p, ip("10.1.2.3"), 443, None);
        assert_eq!((d.route, d.by_name), (Some(Route::Direct), false));
        assert_eq!(
            decide(&p, ip("::ffff:10.1.2.3"), 443, None).route,
            Some(Route::Direct),
            "v4-mapped gets the v4 decision"
        );
        let d = decide(&p, ip("203.0.113.9"), 443, Some("a.svc"));
        assert_eq!(
            (d.route, d.by_name, d.rule.as_str()),
            (Some(Route::Direct), true, "skip:.svc")
        );
        let d = decide(&p, ip("203.0.113.9"), 443, Some("kv1.vault.azure.net"));
        assert_eq!(
            (d.route, d.rule.as_str()),
            (Some(Route::Proxy), "route:*.vault.azure.net->proxy")
        );
        let d = decide(&p, ip("198.51.100.7"), 443, None);
        assert_eq!((d.route, d.by_name), (Some(Route::Direct), false));
        let d = decide(&p, ip("203.0.113.9"), 443, Some("portal.azure.com"));
        assert_eq!(
            (d.route, d.rule.as_str()),
            (Some(Route::Gateway), "default")
        );
    }

    #[test]
    fn safety_rules_refuse_direct_to_metadata_loopback_and_node() {
        let skip: SkipRanges = "169.254.0.0/16,*".parse().unwrap();
        let routes = RouteTable::default();
        let node = [ip("203.0.113.1")];
        let p = input(&skip, &routes, &node, &[]);
        for addr in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "fd00:ec2::254",
            "127.0.0.1",
            "203.0.113.1",
            "::ffff:203.0.113.1",
            "fe80::1",
        ] {
            let d = decide(&p, ip(addr), 80, None);
            assert_eq!(d.route, None, "{addr} must be refused: {d:?}");
            assert!(d.rule.starts_with("safety:"), "{d:?}");
        }
        assert_eq!(
            decide(&p, ip("203.0.113.9"), 80, None).route,
            Some(Route::Direct)
        );
        let cluster: [IpNet; 2] = [
            "10.244.0.0/16".parse().unwrap(),
            "fd00:10::/108".parse().unwrap(),
        ];
        let p = PolicyInput {
            cluster: &cluster,
            ..input(&skip, &routes, &node, &[])
        };
        for addr in ["10.244.3.4", "::ffff:10.244.3.4", "fd00:10::5"] {
            let d = decide(&p, ip(addr), 80, Some("evil.svc.cluster.local"));
            assert_eq!(d.route, None, "{addr} is in the cluster's ranges: {d:?}");
            assert!(d.rule.starts_with("safety:cluster-range"), "{d:?}");
        }
        let allow = ["169.254.169.254/32".parse().unwrap()];
        let p = input(&skip, &routes, &node, &allow);
        assert_eq!(
            decide(&p, ip("169.254.169.254"), 80, None).route,
            Some(Route::Direct),
            "explicitly allowed"
        );
        // Through the gateway the proxy never dials the address itself: allowed.
        let skip = SkipRanges::default();
        let p = input(&skip, &routes, &node, &[]);
        assert_eq!(
            decide(&p, ip("169.254.169.254"), 80, None).route,
            Some(Route::Gateway)
        );
    }

    #[test]
    fn route_rules_validate() {
        let bad = [
            RawRoute {
                route: "proxy".into(),
                ..Default::default()
            },
            RawRoute {
                host: Some("a.example".into()),
                cidr: Some("10.0.0.0/8".into()),
                route: "proxy".into(),
                ..Default::default()
            },
            RawRoute {
                host: Some("a.example:80".into()),
                port: Some(443),
                route: "proxy".into(),
                ..Default::default()
            },
            RawRoute {
                host: Some("a b".into()),
                route: "proxy".into(),
                ..Default::default()
            },
            RawRoute {
                cidr: Some("10.0.0.0/40".into()),
                route: "proxy".into(),
                ..Default::default()
            },
        ];
        for r in bad {
            assert!(RouteRule::from_raw(&r).is_err(), "{r:?}");
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::net::Ipv4Addr;

        proptest! {
            #[test]
            fn skip_parser_never_panics(s in "\\PC{0,80}") {
                let _ = s.parse::<SkipRanges>();
            }

            #[test]
            fn skip_parser_never_panics_on_plausible_input(s in "[a-z0-9.*:/\\[\\], -]{0,60}") {
                if let Ok(r) = s.parse::<SkipRanges>() {
                    // Whatever parsed must print back into something that parses the same.
                    let printed: Vec<String> = r.entries.iter().map(ToString::to_string).collect();
                    let again: SkipRanges = printed.join(",").parse().unwrap();
                    prop_assert_eq!(again.entries.len(), r.entries.len());
                }
            }

            #[test]
            fn route_parser_never_panics(h in "\\PC{0,40}", c in "\\PC{0,40}", r in "[a-z]{0,8}") {
                let _ = RouteRule::from_raw(&RawRoute { host: Some(h.clone()), route: r.clone(), ..Default::default() });
                let _ = RouteRule::from_raw(&RawRoute { cidr: Some(c), route: r, ..Default::default() });
            }

            #[test]
            fn v4_and_mapped_always_agree(a in any::<u32>(), port in 1u16..) {
                let skip: SkipRanges = "10.0.0.0/8,192.168.0.0/16".parse().unwrap();
                let routes = RouteTable { rules: preset("arc-not-covered").unwrap() };
                let node = [IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))];
                let p = PolicyInput { skip: &skip, routes: &routes, default: Route::Gateway, node_addrs: &node, allow_dial: &[], cluster: &[] };
                let v4 = Ipv4Addr::from(a);
                let d4 = decide(&p, IpAddr::V4(v4), port, None);
                let d6 = decide(&p, IpAddr::V6(v4.to_ipv6_mapped()), port, None);
                prop_assert_eq!(d4, d6);
            }
        }
    }
}
