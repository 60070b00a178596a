//! The node's own addresses, for the safety rule that never dials them directly.
use std::{net::IpAddr, os::fd::AsFd, path::Path};

/// Addresses of the daemon's own network namespace and of the node's (`node_netns`, e.g.
/// `/proc/1/ns/net` with hostPID): without hostNetwork the daemon's namespace is its pod's,
/// and the node's addresses (where the kubelet and other node services listen) are only in
/// the node's. A node namespace that cannot be read is logged and left out.
pub fn node_addresses(node_netns: &Path) -> Vec<IpAddr> {
    let mut v = local_addresses();
    match addresses_in(node_netns) {
        Ok(more) => v.extend(more),
        Err(e) => tracing::warn!(
            netns = %node_netns.display(),
            error = %e,
            "cannot read the node's addresses; only the daemon's own are never dialed directly"
        ),
    }
    v.sort();
    v.dedup();
    v
}

/// Addresses of the calling thread's network namespace.
fn local_addresses() -> Vec<IpAddr> {
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
    v
}

/// Addresses of the network namespace at `netns`, read on a short-lived thread that enters
/// it (`setns` moves only the calling thread).
fn addresses_in(netns: &Path) -> std::io::Result<Vec<IpAddr>> {
    let ns = std::fs::File::open(netns)?;
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        Ok(local_addresses())
    })
    .join()
    .map_err(|_| std::io::Error::other("address reader thread panicked"))?
}
