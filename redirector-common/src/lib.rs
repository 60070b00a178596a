//! Types and names shared by the eBPF programs (`redirector-ebpf`) and the daemon.
//!
//! Every type here is `#[repr(C)]` with explicit padding and no `bool`, so both sides agree on
//! the layout byte for byte and `bpftool map dump` can print the fields by name (BTF).
#![no_std]

/// Default first port the proxy tries to listen on inside each enabled pod's network
/// namespace. Away from the ports service meshes capture on (Istio and ztunnel 15000-15090,
/// Linkerd 4140-4191, Consul 15000/15001/20000+), so a mesh sidecar and the redirector can
/// share a pod.
pub const DEFAULT_PROXY_PORT: u16 = 15300;

/// How many consecutive ports, from the configured one, the daemon tries in a pod's network
/// namespace before it gives up and refuses the pod's connections. A pod that already holds
/// a port (by accident or on purpose) gets the next free one; the chosen port is written into
/// the pod's [`CgroupEntry`].
pub const PROXY_PORT_CHOICES: u16 = 16;

/// Port of the network-namespace probe (`rdr_p_netns`): the daemon's own connect to
/// `127.0.0.1:PROBE_PORT` is answered by the probe program (refused, never sent). Port 0: no
/// listener can ever be there.
pub const PROBE_PORT: u16 = 0;

/// How many cgroup ancestor levels the connect hooks examine (level 0 is the root).
///
/// Kubernetes pod cgroups sit at depth 3-5 (`kubepods.slice/kubepods-burstable.slice/…`),
/// containers one below; 16 leaves room for nested systemd slices.
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// Kernel object names and pin file names. Kernel names are cut at 15 bytes, so every name is
/// short and starts with `rdr_`; a unit test checks length and uniqueness.
pub mod names {
    /// cgroup id -> [`super::CgroupEntry`]: cgroups whose processes are redirected (or
    /// refused, until their listener is bound).
    pub const MAP_ENABLED: &str = "rdr_enabled";
    /// IPv4 LPM trie of destinations that always go direct (skip ranges).
    pub const MAP_SKIP4: &str = "rdr_skip4";
    /// IPv6 LPM trie of destinations that always go direct (skip ranges).
    pub const MAP_SKIP6: &str = "rdr_skip6";
    /// socket cookie -> [`super::Pending`]: a redirected socket's original destination and
    /// netns cookie, from its connect until it closes. (Renamed from `rdr_pending` when the
    /// value grew by the netns cookie, so a pin of the old layout is never reused.)
    pub const MAP_PENDING: &str = "rdr_pending_v2";
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
    /// [`super::AuditKey`] -> `u64`: connects of cgroups in [`super::mode::AUDIT`], counted
    /// per workload, destination and verdict (bounded: [`super::AUDIT_DESTINATIONS`]).
    pub const MAP_AUDIT: &str = "rdr_audit";
    /// cgroup id -> [`super::AuditTotals`]: per audited workload, its counts in total.
    pub const MAP_AUDIT_TOTALS: &str = "rdr_audit_tot";
    /// Pin file name of aya-log's ring buffer (kernel object name `AYA_LOGS`, set by
    /// aya-log-ebpf): debug messages of the programs.
    pub const PIN_LOGS: &str = "rdr_logs";

    /// All maps, in a stable order.
    pub const MAPS: [&str; 9] = [
        MAP_ENABLED,
        MAP_SKIP4,
        MAP_SKIP6,
        MAP_PENDING,
        MAP_ORIG,
        MAP_STATS,
        MAP_CONFIG,
        MAP_AUDIT,
        MAP_AUDIT_TOTALS,
    ];
    /// All programs, in a stable order.
    pub const PROGRAMS: [&str; 3] = [PROG_CONNECT4, PROG_CONNECT6, PROG_SOCKOPS];
    /// All link pins, matching [`PROGRAMS`] by index.
    pub const LINKS: [&str; 3] = [LINK_CONNECT4, LINK_CONNECT6, LINK_SOCKOPS];
}

/// Value of `rdr_enabled`: what happens to the TCP connects of a cgroup (and everything
/// below it) that would go past the proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupEntry {
    /// One of [`mode`].
    pub mode: u32,
    /// [`mode::REDIRECT`]: the port of the listener in the workload's network namespace
    /// (host byte order). 0 means [`RdrConfig::proxy_port`].
    pub port: u16,
    /// Reserved, zero.
    pub reserved: u16,
}

/// Values of [`CgroupEntry::mode`]. Any other value is treated as [`mode::REFUSE`]: a cgroup
/// in the map never has its connects sent on unchanged, except in [`mode::AUDIT`], where
/// that is the point.
pub mod mode {
    /// Rewrite to the proxy listener on loopback.
    pub const REDIRECT: u32 = 1;
    /// Refuse the connect (`EPERM`): the workload is known to be redirected but its listener
    /// is not bound yet, or cannot be.
    pub const REFUSE: u32 = 2;
    /// Observe, do not redirect: every connect goes on unchanged (never refused, no listener
    /// needed) and is counted in `rdr_audit` / `rdr_audit_tot` with the verdict enforcement
    /// would have given it ([`super::verdict`]). Programs older than audit mode read this
    /// value as "refuse": the daemon writes it only when the attached programs know it.
    pub const AUDIT: u32 = 3;
}

/// What enforcement would have done with an audited connect ([`AuditKey::verdict`]).
pub mod verdict {
    /// Redirected to the proxy.
    pub const REDIRECT: u8 = 1;
    /// Sent direct: the destination is in a skip range.
    pub const SKIP: u8 = 2;
}

/// Capacity of `rdr_audit`: distinct (workload, destination, verdict) triples tracked at
/// once, node-wide. A connect that finds the map full is still counted in its workload's
/// totals, as [`AuditTotals::untracked`]. The daemon frees entries idle for a while.
pub const AUDIT_DESTINATIONS: u32 = 16384;

/// Capacity of `rdr_audit_tot`: audited workloads (cgroup ids) at once.
pub const AUDIT_WORKLOADS: u32 = 16384;

/// Key of `rdr_audit`: one audited workload's connects to one destination with one verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuditKey {
    /// The id of the `rdr_enabled` entry that matched (the workload's cgroup, not the
    /// container's), so a pod cannot spread its counts over many keys.
    pub cgroup: u64,
    /// Destination address in network byte order, IPv4 stored IPv4-mapped.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// 4 or 6, as in [`OrigDst::family`].
    pub family: u8,
    /// One of [`verdict`].
    pub verdict: u8,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Value of `rdr_audit_tot`: one audited workload's counts (atomic adds; exact).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditTotals {
    /// Connects enforcement would have redirected.
    pub redirect: u64,
    /// Connects enforcement would have sent direct (skip range).
    pub skip: u64,
    /// Of those, connects whose destination could not be tracked in `rdr_audit` (full).
    pub untracked: u64,
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
    /// 1 once the daemon has filled this entry; until then the connects of cgroups in
    /// `rdr_enabled` are refused (fail closed).
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

/// Value of `rdr_pending_v2`: what the connect hook learned about a redirected socket, for
/// the sockops program to key `rdr_orig` with (at ESTABLISHED) and to find it again (at
/// CLOSE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// The original destination and the socket's cookie.
    pub dst: OrigDst,
    /// Cookie of the socket's network namespace, taken in the connect hook: sockops programs
    /// can read it themselves only from Linux 5.15 on.
    pub netns: u64,
}

/// Key of `rdr_orig`: the client end of a redirected connection as the proxy sees it
/// (`getpeername()` of the accepted socket) plus the network namespace it lives in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Cookie of the namespace (what `bpf_get_netns_cookie` returns; `SO_NETNS_COOKIE`).
    pub netns: u64,
    /// Client address in network byte order, IPv4 stored IPv4-mapped.
    pub addr: [u8; 16],
    /// Client port, host byte order.
    pub port: u16,
    /// Reserved, zero.
    pub reserved: [u8; 6],
}

/// Defines [`Counters`], the index of each field in [`counter`] and the names in
/// [`Counters::NAMES`] from one list (`field => INDEX_CONST`), so no other place has to name
/// the counters: the daemon's metrics and `redirector status` loop over [`Counters::named`].
macro_rules! counters {
    ($($(#[doc = $doc:literal])* $field:ident => $index:ident,)+) => {
        /// Per-CPU counters in `rdr_stats`. Sum over CPUs to get totals.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Counters {
            $($(#[doc = $doc])* pub $field: u64,)+
        }

        /// Indices into [`Counters`] used by the eBPF side (one `u64` per field, in order).
        pub mod counter {
            $(
                #[doc = concat!("[`super::Counters::", stringify!($field), "`].")]
                pub const $index: u32 =
                    (core::mem::offset_of!(super::Counters, $field) / 8) as u32;
            )+
            /// Number of counters.
            pub const COUNT: u32 = [$(stringify!($field)),+].len() as u32;
        }

        impl Counters {
            /// The counters' names (their field names, as BTF shows them), in index order.
            pub const NAMES: [&'static str; counter::COUNT as usize] = [$(stringify!($field)),+];

            /// Every counter with its name, in index order.
            pub fn named(&self) -> [(&'static str, u64); counter::COUNT as usize] {
                [$((stringify!($field), self.$field)),+]
            }

            /// The counter at `index` (one of [`counter`]); `None` for an unknown index.
            #[inline(always)]
            pub fn get_mut(&mut self, index: u32) -> Option<&mut u64> {
                match index {
                    $(counter::$index => Some(&mut self.$field),)+
                    _ => None,
                }
            }

            /// Adds `other` field by field (used to sum per-CPU values).
            pub fn add(&mut self, other: &Counters) {
                $(self.$field += other.$field;)+
            }
        }
    };
}

counters! {
    /// IPv4 connects rewritten to the proxy (including IPv4-mapped IPv6).
    redirected4 => REDIRECTED4,
    /// IPv6 connects rewritten to the proxy.
    redirected6 => REDIRECTED6,
    /// Connects in a cgroup that is not enabled (the common case on a node).
    skip_disabled => SKIP_DISABLED,
    /// Connects whose destination is in a skip range (LPM hit): they go direct.
    skip_cidr => SKIP_CIDR,
    /// Connects to loopback (which includes the proxy itself).
    skip_loopback => SKIP_LOOPBACK,
    /// Connects made by the daemon itself.
    skip_self => SKIP_SELF,
    /// Non-TCP connects (UDP `connect()`, e.g. DNS resolvers).
    skip_not_tcp => SKIP_NOT_TCP,
    /// Redirected connections whose original destination was handed to the proxy key.
    established => ESTABLISHED,
    /// Map update failures: a connect whose destination cannot be recorded is refused.
    errors => ERRORS,
    /// Connects refused because their cgroup is in [`mode::REFUSE`] (no listener yet) or the
    /// daemon has not configured the programs yet.
    refused => REFUSED,
}

/// Converts an IPv4 address (network-order octets) to the IPv4-mapped form used in maps.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(feature = "user")]
mod pod_impls {
    // `Pod` lets aya copy these to and from map values as raw bytes: they must be `Copy`,
    // valid for every bit pattern and free of padding (uninitialized bytes would reach the
    // kernel). The sizes are pinned by `layouts_have_no_implicit_padding` below.

    // SAFETY: `#[repr(C)]`, two `u32`: every bit pattern is valid, no padding (8 bytes).
    unsafe impl aya::Pod for super::CgroupEntry {}
    // SAFETY: `#[repr(C)]`, u16 + u16 (`reserved0`) + three u32: every field starts at its
    // alignment, so no padding (16 bytes); integers only, every bit pattern is valid.
    unsafe impl aya::Pod for super::RdrConfig {}
    // SAFETY: `#[repr(C)]`, [u8; 16] + u16 + u16 + u32 (`reserved`) + u64: `cookie` starts at
    // 24, a multiple of 8, so no padding (32 bytes); integers and bytes only.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: `#[repr(C)]`, u64 + [u8; 16] + u16 + [u8; 6] (`reserved`): the explicit
    // reserved bytes fill the tail to 32, so no padding; integers and bytes only.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: `#[repr(C)]`, `u64` fields only: no padding, every bit pattern is valid.
    unsafe impl aya::Pod for super::Counters {}
    // SAFETY: `#[repr(C)]`, u64 + [u8; 16] + u16 + u8 + u8 + u32 (`reserved`): every field
    // starts at its alignment and they fill 32 bytes exactly, so no padding; integers only.
    unsafe impl aya::Pod for super::AuditKey {}
    // SAFETY: `#[repr(C)]`, `u64` fields only: no padding, every bit pattern is valid.
    unsafe impl aya::Pod for super::AuditTotals {}
    // SAFETY: `#[repr(C)]`, OrigDst (32 bytes, no padding, see above) + u64: 40 bytes, no
    // padding; integers and bytes only.
    unsafe impl aya::Pod for super::Pending {}
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
        assert_eq!(core::mem::size_of::<AuditKey>(), 32);
        assert_eq!(core::mem::offset_of!(AuditKey, reserved), 28);
        assert_eq!(core::mem::size_of::<AuditTotals>(), 24);
        assert_eq!(core::mem::size_of::<Pending>(), 40);
        assert_eq!(
            core::mem::size_of::<Counters>(),
            8 * counter::COUNT as usize
        );
    }

    #[test]
    fn counter_list_covers_every_field_once() {
        let fields = core::mem::size_of::<Counters>() / 8;
        assert_eq!(counter::COUNT as usize, fields);
        assert_eq!(Counters::NAMES.len(), fields);
        let unique: HashSet<&str> = Counters::NAMES.iter().copied().collect();
        assert_eq!(unique.len(), fields, "a name is listed twice");
        // Index i is the i-th field: bumping it shows up there and nowhere else.
        for i in 0..counter::COUNT {
            let mut c = Counters::default();
            *c.get_mut(i).expect("every index below COUNT is a counter") += 1;
            for (j, (name, v)) in c.named().into_iter().enumerate() {
                assert_eq!(name, Counters::NAMES[j]);
                assert_eq!(v, u64::from(i as usize == j), "index {i}, field {name}");
            }
            let mut sum = c;
            sum.add(&c);
            assert_eq!(sum.named()[i as usize].1, 2);
        }
        assert!(Counters::default().get_mut(counter::COUNT).is_none());
        let c = Counters {
            skip_loopback: 7,
            ..Default::default()
        };
        assert_eq!(
            c.named()[counter::SKIP_LOOPBACK as usize],
            ("skip_loopback", 7)
        );
    }

    #[test]
    fn v4_mapped_matches_std() {
        let v4 = std::net::Ipv4Addr::new(203, 0, 113, 7);
        assert_eq!(v4_mapped(v4.octets()), v4.to_ipv6_mapped().octets());
    }
}
