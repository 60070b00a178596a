//! Types and names shared by the eBPF programs (`redirector-ebpf`) and the daemon.
//!
//! Every type here is `#[repr(C)]` with explicit padding and no `bool`, so both sides agree on
//! the layout byte for byte and `bpftool map dump` can print the fields by name (BTF).
#![no_std]

/// Default port the proxy listens on inside each enabled pod's network namespace.
pub const DEFAULT_PROXY_PORT: u16 = 15001;

/// How many cgroup ancestor levels the connect hooks examine (level 0 is the root).
///
/// Kubernetes pod cgroups sit at depth 3-5 (`kubepods.slice/kubepods-burstable.slice/…`),
/// containers one below; 16 leaves room for nested systemd slices.
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// Kernel object names and pin file names. Kernel names are cut at 15 bytes, so every name is
/// short and starts with `rdr_`; a unit test checks length and uniqueness.
pub mod names {
    /// cgroup id -> [`super::CgroupEntry`]: cgroups whose processes are redirected.
    pub const MAP_ENABLED: &str = "rdr_enabled";
    /// IPv4 LPM trie of destinations that always go direct (skip ranges).
    pub const MAP_SKIP4: &str = "rdr_skip4";
    /// IPv6 LPM trie of destinations that always go direct (skip ranges).
    pub const MAP_SKIP6: &str = "rdr_skip6";
    /// socket cookie -> [`super::OrigDst`]: redirected connects not yet established.
    pub const MAP_PENDING: &str = "rdr_pending";
    /// [`super::SockKey`] -> [`super::OrigDst`]: established redirected connections,
    /// keyed the way the proxy sees them on accept.
    pub const MAP_ORIG: &str = "rdr_orig";
    /// Single-entry per-CPU [`super::Counters`].
    pub const MAP_STATS: &str = "rdr_stats";
    /// Single-entry [`super::RdrConfig`], written by the daemon.
    pub const MAP_CONFIG: &str = "rdr_config";
    /// `cgroup/connect4` program.
    pub const PROG_CONNECT4: &str = "rdr_connect4";
    /// `cgroup/connect6` program.
    pub const PROG_CONNECT6: &str = "rdr_connect6";
    /// `sockops` program that re-keys the original destination when a connection is up.
    pub const PROG_SOCKOPS: &str = "rdr_sockops";
    /// Pin file names of the cgroup links (one per program).
    pub const LINK_CONNECT4: &str = "rdr_link_c4";
    /// Pin file name of the connect6 link.
    pub const LINK_CONNECT6: &str = "rdr_link_c6";
    /// Pin file name of the sockops link.
    pub const LINK_SOCKOPS: &str = "rdr_link_so";
    /// Pin file name of aya-log's ring buffer (kernel object name `AYA_LOGS`, set by
    /// aya-log-ebpf): debug messages of the programs.
    pub const PIN_LOGS: &str = "rdr_logs";

    /// All maps, in a stable order.
    pub const MAPS: [&str; 7] = [
        MAP_ENABLED,
        MAP_SKIP4,
        MAP_SKIP6,
        MAP_PENDING,
        MAP_ORIG,
        MAP_STATS,
        MAP_CONFIG,
    ];
    /// All programs, in a stable order.
    pub const PROGRAMS: [&str; 3] = [PROG_CONNECT4, PROG_CONNECT6, PROG_SOCKOPS];
    /// All link pins, matching [`PROGRAMS`] by index.
    pub const LINKS: [&str; 3] = [LINK_CONNECT4, LINK_CONNECT6, LINK_SOCKOPS];
}

/// Value of `rdr_enabled`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupEntry {
    /// 1 when the cgroup (and everything below it) is redirected.
    pub enabled: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Value of `rdr_config` (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RdrConfig {
    /// Port of the per-netns proxy listener on 127.0.0.1 / ::1 (host byte order).
    pub proxy_port: u16,
    /// Reserved, zero.
    pub reserved0: u16,
    /// Thread group id of the daemon: its own connects are never redirected.
    pub proxy_tgid: u32,
    /// 1 once the daemon has filled this entry; until then nothing is redirected.
    pub ready: u32,
    /// Reserved, zero.
    pub reserved1: u32,
}

/// An original destination as the application asked for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Address in network byte order; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`).
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// 4 if the application used `connect4` or an IPv4-mapped IPv6 address, else 6.
    pub family: u16,
    /// Reserved, zero.
    pub reserved: u32,
    /// Socket cookie of the application's socket, so a stale entry is never taken for a
    /// newer connection that reused the same source port.
    pub cookie: u64,
}

/// Key of `rdr_orig`: the client end of a redirected connection as the proxy sees it
/// (`getpeername()` of the accepted socket) plus the network namespace it lives in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// `SO_NETNS_COOKIE` of the namespace (the same value `bpf_get_netns_cookie` returns).
    pub netns: u64,
    /// Client address in network byte order, IPv4 stored IPv4-mapped.
    pub addr: [u8; 16],
    /// Client port, host byte order.
    pub port: u16,
    /// Reserved, zero.
    pub reserved: [u8; 6],
}

/// Per-CPU counters in `rdr_stats`. Sum over CPUs to get totals.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// IPv4 connects rewritten to the proxy (including IPv4-mapped IPv6).
    pub redirected4: u64,
    /// IPv6 connects rewritten to the proxy.
    pub redirected6: u64,
    /// Connects in a cgroup that is not enabled (the common case on a node).
    pub skip_disabled: u64,
    /// Connects whose destination is in a skip range (LPM hit): they go direct.
    pub skip_cidr: u64,
    /// Connects to loopback (which includes the proxy itself).
    pub skip_loopback: u64,
    /// Connects made by the daemon itself.
    pub skip_self: u64,
    /// Non-TCP connects (UDP `connect()`, e.g. DNS resolvers).
    pub skip_not_tcp: u64,
    /// Redirected connections whose original destination was handed to the proxy key.
    pub established: u64,
    /// Map update failures (the connect still proceeds; the proxy will refuse it).
    pub errors: u64,
}

/// Indices into [`Counters`] used by the eBPF side (one `u64` per field, in order).
pub mod counter {
    /// [`super::Counters::redirected4`].
    pub const REDIRECTED4: u32 = 0;
    /// [`super::Counters::redirected6`].
    pub const REDIRECTED6: u32 = 1;
    /// [`super::Counters::skip_disabled`].
    pub const SKIP_DISABLED: u32 = 2;
    /// [`super::Counters::skip_cidr`].
    pub const SKIP_CIDR: u32 = 3;
    /// [`super::Counters::skip_loopback`].
    pub const SKIP_LOOPBACK: u32 = 4;
    /// [`super::Counters::skip_self`].
    pub const SKIP_SELF: u32 = 5;
    /// [`super::Counters::skip_not_tcp`].
    pub const SKIP_NOT_TCP: u32 = 6;
    /// [`super::Counters::established`].
    pub const ESTABLISHED: u32 = 7;
    /// [`super::Counters::errors`].
    pub const ERRORS: u32 = 8;
    /// Number of counters.
    pub const COUNT: u32 = 9;
}

impl Counters {
    /// Adds `other` field by field (used to sum per-CPU values).
    pub fn add(&mut self, other: &Counters) {
        self.redirected4 += other.redirected4;
        self.redirected6 += other.redirected6;
        self.skip_disabled += other.skip_disabled;
        self.skip_cidr += other.skip_cidr;
        self.skip_loopback += other.skip_loopback;
        self.skip_self += other.skip_self;
        self.skip_not_tcp += other.skip_not_tcp;
        self.established += other.established;
        self.errors += other.errors;
    }
}

/// Converts an IPv4 address (network-order octets) to the IPv4-mapped form used in maps.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all of these are `#[repr(C)]`, contain only integers and byte arrays, and have
    // explicit padding fields, so every bit pattern is valid and there are no holes.
    unsafe impl aya::Pod for super::CgroupEntry {}
    unsafe impl aya::Pod for super::RdrConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::Counters {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn kernel_names_fit_and_are_unique() {
        let all: std::vec::Vec<&str> = names::MAPS
            .iter()
            .chain(names::PROGRAMS.iter())
            .chain(names::LINKS.iter())
            .chain([names::PIN_LOGS].iter())
            .copied()
            .collect();
        let mut seen = HashSet::new();
        for n in &all {
            assert!(
                n.len() <= 15,
                "{n} is longer than the kernel's 15-byte object name"
            );
            assert!(n.starts_with("rdr_"), "{n} must start with rdr_");
            assert!(seen.insert(*n), "{n} is used twice");
        }
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<CgroupEntry>(), 8);
        assert_eq!(core::mem::size_of::<RdrConfig>(), 16);
        assert_eq!(core::mem::size_of::<OrigDst>(), 32);
        assert_eq!(core::mem::size_of::<SockKey>(), 32);
        assert_eq!(
            core::mem::size_of::<Counters>(),
            8 * counter::COUNT as usize
        );
    }

    #[test]
    fn v4_mapped_matches_std() {
        let v4 = std::net::Ipv4Addr::new(203, 0, 113, 7);
        assert_eq!(v4_mapped(v4.octets()), v4.to_ipv6_mapped().octets());
    }
}
