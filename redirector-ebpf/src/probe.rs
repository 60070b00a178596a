//! What the daemon loads at start to learn what the running kernel supports (the object
//! loads only where ring buffers exist; the program only where connect hooks have
//! `bpf_get_netns_cookie`), and the network-namespace probe: on kernels without `SO_NETNS_COOKIE` (before 5.14) it tells the
//! daemon the cookie of the namespace a listener lives in.
//!
//! The probe is a connect hook that acts only on the daemon's own threads (`PROBE_TGID`)
//! connecting to `127.0.0.1:PROBE_PORT`: it stores the caller's netns cookie under its
//! pid/tid and refuses the connect (EPERM), so the probe never leaves the host.
#![cfg_attr(target_arch = "bpf", no_std)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        btf_maps::{HashMap, RingBuf},
        helpers::{bpf_get_current_pid_tgid, bpf_get_netns_cookie},
        macros::{btf_map, cgroup_sock_addr},
        programs::SockAddrContext,
    };
    use redirector_common::PROBE_PORT;

    /// Thread group id of the daemon, set at load time: only its probes are answered.
    #[unsafe(no_mangle)]
    static PROBE_TGID: u32 = 0;

    /// pid_tgid of the probing thread -> its netns cookie.
    #[allow(non_upper_case_globals)]
    #[btf_map]
    static rdr_p_out: HashMap<u64, u64, 64> = HashMap::new();

    /// A ring buffer (5.8), only to see whether the kernel creates one: the programs' log
    /// records (aya-log) travel in one.
    #[allow(non_upper_case_globals)]
    #[btf_map]
    static rdr_p_rb: RingBuf<u8, 4096> = RingBuf::new();

    /// The netns probe (also: do connect hooks have bpf_get_netns_cookie? since 5.7).
    #[cgroup_sock_addr(connect4)]
    pub fn rdr_p_netns(ctx: SockAddrContext) -> i32 {
        let id = bpf_get_current_pid_tgid();
        // SAFETY: a volatile read of our own constant global (the loader may have set it);
        // the volatile read keeps the compiler from folding the default value in.
        let tgid = unsafe { core::ptr::read_volatile(&PROBE_TGID) };
        if (id >> 32) as u32 != tgid {
            return 1;
        }
        // SAFETY: the kernel passes a valid bpf_sock_addr for this invocation; the two
        // fields read are readable in connect4 (the verifier checks each access).
        let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
        if ip != u32::from_ne_bytes([127, 0, 0, 1]) || port != u32::from(PROBE_PORT.to_be()) {
            return 1;
        }
        // SAFETY: this program's own context, the argument bpf_get_netns_cookie takes here.
        let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
        let _ = rdr_p_out.insert(id, netns, 0);
        0
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // The real programs are only built for bpfel-unknown-none (see redirector/build.rs).
}
