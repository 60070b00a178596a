//! The node's own addresses, for the safety rule that never dials them directly.
use std::net::IpAddr;

/// Addresses of the daemon's network namespace (the node's, in a DaemonSet with
/// hostNetwork; the pod's otherwise).
pub fn node_addresses() -> Vec<IpAddr> {
    let mut v = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(sa) = a.address else { continue };
            if let Some(s) = sa.as_sockaddr_in() {
                v.push(IpAddr::V4(s.ip()));
            } else if let Some(s) = sa.as_sockaddr_in6() {
                v.push(IpAddr::V6(s.ip()));
            }
        }
    }
    v.sort();
    v.dedup();
    v
}
