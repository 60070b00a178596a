//! Addresses and names: host validation, `host:port` authorities, ports, IP ranges.
//!
//! The vocabulary every other module speaks, so it imports nothing from the crate. Canonical
//! forms everywhere: names in lower case without a trailing dot, IPv6 without brackets,
//! IPv4-mapped IPv6 as IPv4 (`IpAddr::to_canonical`), so `::ffff:10.0.0.1` and `10.0.0.1` are
//! one address to every rule.
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// A host name or address that is not safe to route on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid host name {input:?}: {reason}")]
pub struct InvalidHost {
    /// The offending input, cut to 80 characters.
    pub input: String,
    pub reason: &'static str,
}

/// Accepts a DNS name (LDH labels plus `_`) or an IP literal and returns its canonical
/// form: lower case, no trailing dot, IPv6 without brackets, IPv4-mapped IPv6 as IPv4.
pub fn validate_host(s: &str) -> Result<String, InvalidHost> {
    let err = |reason| InvalidHost {
        input: s.chars().take(80).collect(),
        reason,
    };
    if s.is_empty() {
        return Err(err("empty"));
    }
    if let Some(inner) = s.strip_prefix('[') {
        return match inner.strip_suffix(']').map(str::parse::<Ipv6Addr>) {
            Some(Ok(v6)) => Ok(IpAddr::V6(v6).to_canonical().to_string()),
            _ => Err(err("not a bracketed IPv6 address")),
        };
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ip.to_canonical().to_string());
    }
    validate_name(s.strip_suffix('.').unwrap_or(s)).map_err(err)
}

/// A DNS name (without its trailing dot) in canonical form: ASCII (internationalized names
/// in their `xn--` form), at most 253 bytes, labels of 1-63 letters, digits, `-` (not first
/// or last) and `_`, and a last label that is not all digits (resolvers read `127.1` or
/// `1.2.3.4.5`-like names as IPv4 forms; no real TLD is numeric).
pub fn validate_name(name: &str) -> Result<String, &'static str> {
    if !name.is_ascii() {
        return Err("not ASCII (use the xn-- form)");
    }
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > 253 {
        return Err("longer than 253 bytes");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > 63 {
            return Err("label longer than 63 bytes");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("only letters, digits, '-', '_' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("label starts or ends with '-'");
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("numeric top-level label but not an IP address");
    }
    Ok(name.to_ascii_lowercase())
}

/// `host:port` for a CONNECT request line: IPv6 bracketed, IPv4-mapped IPv6 as IPv4.
pub fn authority(host: &str, port: u16) -> String {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match bare.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip.to_canonical(), port).to_string(),
        Err(_) => format!("{host}:{port}"),
    }
}

/// A TCP port as configured: 1-65535, decimal digits only.
pub fn parse_port(p: &str) -> Result<u16, &'static str> {
    match p.parse::<u16>() {
        Ok(n) if n != 0 && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err("port must be 1-65535"),
    }
}

/// Splits an optional `:port` off `host[:port]`; an IPv6 address needs brackets for a port
/// (`[::1]:80`), and a bare IPv6 address (several colons) has none.
pub fn split_port(item: &str) -> Result<(&str, Option<u16>), &'static str> {
    if let Some(rest) = item.strip_prefix('[') {
        let (addr, tail) = rest.split_once(']').ok_or("unclosed '['")?;
        return match tail {
            "" => Ok((addr, None)),
            t => {
                let p = t.strip_prefix(':').ok_or("expected ':port' after ']'")?;
                Ok((addr, Some(parse_port(p)?)))
            }
        };
    }
    if item.matches(':').count() == 1 {
        let (h, p) = item.split_once(':').expect("one colon");
        return Ok((h, Some(parse_port(p)?)));
    }
    Ok((item, None))
}

/// An address range written as a CIDR or a single address (a host route), in canonical form.
pub fn parse_ip_or_cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .ok()
        .map(canonical_net)
}

/// `::ffff:a.b.c.d/(96+n)` becomes `a.b.c.d/n`, so v4 and v4-mapped rules are one rule.
pub fn canonical_net(n: IpNet) -> IpNet {
    if let IpNet::V6(v6) = n
        && let (Some(v4), true) = (v6.network().to_ipv4_mapped(), v6.prefix_len() >= 96)
        && let Ok(net) = IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96)
    {
        return net;
    }
    n.trunc()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        for (input, want) in [
            ("1", Ok(1)),
            ("443", Ok(443)),
            ("65535", Ok(65535)),
            ("0", Err(())),
            ("65536", Err(())),
            ("+80", Err(())),
            ("", Err(())),
            ("080080", Err(())),
            ("8a", Err(())),
        ] {
            assert_eq!(parse_port(input).map_err(|_| ()), want, "{input:?}");
        }
    }

    #[test]
    fn split_ports() {
        assert_eq!(split_port("a.example:443"), Ok(("a.example", Some(443))));
        assert_eq!(split_port("a.example"), Ok(("a.example", None)));
        assert_eq!(
            split_port("[2001:db8::1]:80"),
            Ok(("2001:db8::1", Some(80)))
        );
        assert_eq!(split_port("[2001:db8::1]"), Ok(("2001:db8::1", None)));
        assert_eq!(split_port("2001:db8::1"), Ok(("2001:db8::1", None)));
        assert!(split_port("[2001:db8::1").is_err());
        assert!(split_port("[2001:db8::1]x").is_err());
        assert!(split_port("a.example:0").is_err());
    }

    #[test]
    fn ip_or_cidr() {
        let net = |s: &str| s.parse::<IpNet>().expect("net");
        assert_eq!(parse_ip_or_cidr("10.1.2.3/8"), Some(net("10.0.0.0/8")));
        assert_eq!(parse_ip_or_cidr("10.1.2.3"), Some(net("10.1.2.3/32")));
        assert_eq!(
            parse_ip_or_cidr("::ffff:10.0.0.0/104"),
            Some(net("10.0.0.0/8"))
        );
        assert_eq!(
            parse_ip_or_cidr("2001:db8::1"),
            Some(net("2001:db8::1/128"))
        );
        assert_eq!(parse_ip_or_cidr("example.com"), None);
        assert_eq!(parse_ip_or_cidr("10.0.0.0/33"), None);
    }
}
