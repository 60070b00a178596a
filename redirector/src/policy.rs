//! Routing policy: pure decisions, no I/O. Skip ranges (`--proxy-skip-range`) and the route
//! of a connection.
use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use serde::Serialize;

use crate::tunnel::Route;

/// What the policy decided for one connection, and why (for the audit line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub route: Route,
    /// The rule that matched, e.g. `skip:.svc.cluster.local`, or `default`.
    pub rule: String,
    /// True when the route depends on the host name only: `direct` is then allowed only if
    /// the name resolves to the original destination IP (checked by the caller).
    pub by_name: bool,
}

/// Decides the route of a connection to `dst` whose client named `host` (SNI / Host).
/// CIDR skips never get here (the kernel sends them direct); they are re-checked for
/// connections that reached the proxy anyway (e.g. a skip range added after connect).
pub fn decide(skip: &SkipRanges, default: Route, dst: IpAddr, host: Option<&str>) -> Decision {
    let dst = canonical_ip(dst);
    for e in &skip.entries {
        match e {
            SkipEntry::Cidr(n) if n.contains(&dst) => {
                return Decision { route: Route::Direct, rule: format!("skip:{n}"), by_name: false };
            }
            SkipEntry::Name { .. } => {
                if let Some(h) = host {
                    if e.matches_name(h) {
                        return Decision { route: Route::Direct, rule: format!("skip:{e}"), by_name: true };
                    }
                }
            }
            SkipEntry::Cidr(_) => {}
        }
    }
    Decision { route: default, rule: "default".into(), by_name: false }
}

/// One entry of a `--proxy-skip-range` value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum SkipEntry {
    /// An address range; a single IP is a /32 or /128. Enforced in the kernel.
    Cidr(IpNet),
    /// A host name (lower case, no trailing dot). `suffix` = leading dot in the input.
    Name { name: String, suffix: bool },
}

/// A parsed `--proxy-skip-range`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SkipRanges {
    pub entries: Vec<SkipEntry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid skip range entry {entry:?}: {reason}")]
pub struct SkipParseError {
    pub entry: String,
    pub reason: &'static str,
}

impl SkipRanges {
    pub fn cidrs(&self) -> Vec<IpNet> {
        self.entries
            .iter()
            .filter_map(|e| match e {
                SkipEntry::Cidr(n) => Some(canonical_net(*n)),
                SkipEntry::Name { .. } => None,
            })
            .collect()
    }

    /// Are there name rules (which need the host name from SNI / Host)?
    pub fn has_names(&self) -> bool {
        self.entries.iter().any(|e| matches!(e, SkipEntry::Name { .. }))
    }

    /// Does `ip` fall into a skip CIDR? (IPv4-mapped IPv6 is judged as IPv4.)
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.cidrs().iter().any(|n| n.contains(&ip))
    }
}

/// IPv4-mapped IPv6 addresses in their IPv4 form.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// `::ffff:a.b.c.d/(96+n)` becomes `a.b.c.d/n`, so v4 and v4-mapped rules are one rule.
pub fn canonical_net(n: IpNet) -> IpNet {
    if let IpNet::V6(v6) = n {
        if let (Some(v4), true) = (v6.network().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            if let Ok(net) = IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96) {
                return net;
            }
        }
    }
    n.trunc()
}

impl FromStr for SkipRanges {
    type Err = SkipParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut entries = Vec::new();
        for raw in s.split(',') {
            let item = raw.trim();
            if item.is_empty() {
                continue;
            }
            entries.push(parse_entry(item)?);
        }
        Ok(Self { entries })
    }
}

fn parse_entry(item: &str) -> Result<SkipEntry, SkipParseError> {
    let err = |reason| SkipParseError { entry: item.to_owned(), reason };
    if let Ok(net) = item.parse::<IpNet>() {
        return Ok(SkipEntry::Cidr(canonical_net(net)));
    }
    if let Ok(ip) = item.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(SkipEntry::Cidr(canonical_net(IpNet::from(ip))));
    }
    if item.contains('/') {
        return Err(err("not a valid CIDR (address/prefix-length)"));
    }
    let (suffix, name) = match item.strip_prefix('.') {
        Some(rest) => (true, rest),
        None => (false, item),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return Err(err("host name is empty or longer than 253 bytes"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !name.split('.').all(label_ok) {
        return Err(err("not an IP, CIDR or DNS name"));
    }
    Ok(SkipEntry::Name { name, suffix })
}

impl SkipEntry {
    /// Name matching, as Go's and curl's `NO_PROXY`: `example.com` matches `example.com` and
    /// every name below it; `.example.com` matches only names below it. Case-insensitive,
    /// a trailing dot on the host is ignored.
    pub fn matches_name(&self, host: &str) -> bool {
        let SkipEntry::Name { name, suffix } = self else { return false };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let below = host.len() > name.len()
            && host.ends_with(name.as_str())
            && host.as_bytes()[host.len() - name.len() - 1] == b'.';
        below || (!suffix && host == *name)
    }
}

impl fmt::Display for SkipEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipEntry::Cidr(n) => write!(f, "{n}"),
            SkipEntry::Name { name, suffix: true } => write!(f, ".{name}"),
            SkipEntry::Name { name, suffix: false } => write!(f, "{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_az_connectedk8s_example() {
        let s: SkipRanges =
            "10.0.0.0/16,kubernetes.default.svc,.svc.cluster.local,.svc".parse().unwrap();
        assert_eq!(s.cidrs(), vec!["10.0.0.0/16".parse::<IpNet>().unwrap()]);
        assert_eq!(s.entries.len(), 4);
        assert_eq!(s.entries[2], SkipEntry::Name { name: "svc.cluster.local".into(), suffix: true });
    }

    #[test]
    fn single_ips_and_mapped_forms_are_canonical() {
        let s: SkipRanges = "203.0.113.7, ::ffff:198.51.100.0/120 ,2001:db8::1".parse().unwrap();
        let want: Vec<IpNet> = ["203.0.113.7/32", "198.51.100.0/24", "2001:db8::1/128"]
            .iter()
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(s.cidrs(), want);
        assert!(s.contains_ip("::ffff:198.51.100.9".parse().unwrap()));
        assert!(s.contains_ip("198.51.100.9".parse().unwrap()));
        assert!(!s.contains_ip("198.51.101.9".parse().unwrap()));
    }

    #[test]
    fn name_matching_follows_no_proxy_conventions() {
        let s: SkipRanges = "kubernetes.default.svc,.svc.cluster.local,svc".parse().unwrap();
        let m = |h: &str| s.entries.iter().any(|e| e.matches_name(h));
        assert!(m("kubernetes.default.svc"));
        assert!(m("KUBERNETES.default.svc."));
        assert!(m("api.ns.svc.cluster.local"));
        assert!(!m("svc.cluster.local"), "leading dot: subdomains only");
        assert!(m("svc") && m("foo.svc"), "no dot: the name and below");
        assert!(!m("notsvc") && !m("svc.example.com"));
    }

    #[test]
    fn decide_prefers_skips_then_default() {
        let s: SkipRanges = "10.0.0.0/8,.svc".parse().unwrap();
        let ip = |x: &str| x.parse::<IpAddr>().unwrap();
        let d = decide(&s, Route::Gateway, ip("10.1.2.3"), None);
        assert_eq!((d.route, d.by_name), (Route::Direct, false));
        let d = decide(&s, Route::Gateway, ip("::ffff:10.1.2.3"), None);
        assert_eq!(d.route, Route::Direct, "v4-mapped gets the v4 decision");
        let d = decide(&s, Route::Gateway, ip("203.0.113.9"), Some("a.svc"));
        assert_eq!((d.route, d.by_name, d.rule.as_str()), (Route::Direct, true, "skip:.svc"));
        let d = decide(&s, Route::Gateway, ip("203.0.113.9"), Some("portal.azure.com"));
        assert_eq!((d.route, d.rule.as_str()), (Route::Gateway, "default"));
    }

    #[test]
    fn rejects_garbage_with_the_entry_named() {
        for bad in ["10.0.0.0/33", "a b", "exa@mple.com", "http://x", "..", "10.0.0.0/x"] {
            let e = bad.parse::<SkipRanges>().unwrap_err();
            assert_eq!(e.entry, bad, "error must name the entry");
        }
    }
}
