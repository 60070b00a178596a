//! cgroup `connect4`/`connect6` hooks and a `sockops` program that together redirect the TCP
//! connections of enabled cgroups to the per-netns proxy listener and record each connection's
//! original destination so the proxy can recover it exactly.
//!
//! Flow for one redirected connection:
//! 1. `rdr_connect4`/`rdr_connect6` (at `connect()`): the task's cgroup or one of its ancestors
//!    is in `rdr_enabled`, the socket is TCP, the destination is not loopback and not in a skip
//!    range → store the destination and the socket's network-namespace cookie in
//!    `rdr_pending_v2` under the socket cookie and rewrite the destination to the workload's
//!    proxy port on loopback. A cgroup whose entry says
//!    "refuse" (its listener is not bound yet), or any enabled cgroup while the daemon has not
//!    configured the programs, gets EPERM instead: never a direct connection.
//! 2. `rdr_sockops` (at `ACTIVE_ESTABLISHED`, before the final ACK is sent, hence before the
//!    proxy can `accept()`): copy the record to `rdr_orig` keyed by (netns cookie, client
//!    address, client port): exactly what the proxy sees as the peer of the accepted socket.
//!    The netns cookie is the one the connect hook took (sockops programs have
//!    `bpf_get_netns_cookie` only from Linux 5.15; connect hooks from 5.7), so the pending
//!    record stays until the socket closes.
//! 3. `rdr_sockops` (at `STATE_CB` → `CLOSE`): drop the `rdr_orig` entry if this socket still
//!    owns it, so a reset connection's entry can never be handed to a later connection
//!    reusing the port, and the socket's pending record.
//!
//! A cgroup whose entry says "audit" is observed only: its connects go on unchanged and are
//! counted in `rdr_audit` (per destination) and `rdr_audit_tot` (per workload) with the verdict
//! enforcement would have given them. The audit branch sits where the redirect path never
//! goes (after a skip-range hit, and inside the "not redirecting" branch), so it costs the
//! redirect path nothing.
#![cfg_attr(target_arch = "bpf", no_std)]
// Not a workspace-lints crate (it builds for bpfel with its own profile): the one lint that
// matters here is set directly.
#![deny(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(target_arch = "bpf", no_main)]
// `atomic_xadd` for the shared audit counters (see `add_one`).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::{
            BPF_F_NO_PREALLOC, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
            BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, bpf_sock_addr,
        },
        btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
        helpers::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
            bpf_get_socket_cookie,
        },
        macros::{btf_map, cgroup_sock_addr, sock_ops},
        programs::{SockAddrContext, SockOpsContext},
    };
    use aya_log_ebpf::debug;
    use redirector_common::{
        AUDIT_DESTINATIONS, AUDIT_WORKLOADS, AuditKey, AuditTotals, CgroupEntry, Counters,
        MAX_CGROUP_DEPTH, OrigDst, Pending, RdrConfig, SockKey, counter, mode, v4_mapped, verdict,
    };

    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;
    const SOCK_STREAM: u32 = 1;
    const IPPROTO_TCP: u32 = 6;
    /// `BPF_ANY` for map updates.
    const ANY: u64 = 0;
    /// 0, or 1 in the test-only `variant` build: written into a reserved field of the pending
    /// record, which makes that build's programs differ (another instruction tag) while
    /// behaving the same. The upgrade tests replace one with the other.
    const DATAPATH_VARIANT: u32 = if cfg!(feature = "variant") { 1 } else { 0 };
    /// The `variant` build's port whose connects cannot be recorded (see `remember`).
    const UNRECORDABLE_PORT: u16 = 9;
    /// `BPF_NOEXIST`: insert only if the key is absent.
    const NOEXIST: u64 = 1;
    /// The audit maps allocate entries as they are used: most nodes audit nothing.
    const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

    // Map names are the static names (lower case on purpose: they are the kernel object names
    // that bpftool prints, see redirector_common::names).
    #[allow(non_upper_case_globals)]
    #[btf_map]
    static rdr_enabled: HashMap<u64, CgroupEntry, 65536> = HashMap::new();

    #[allow(non_upper_case_globals)]
    #[btf_map]
    static rdr_skip4: LpmTrie<[u8; 4], u32, 16384> = LpmTrie::new();

    #[allow(non_upper_case_globals)]
    #[btf_map]
    static rdr_skip6: LpmTrie<[u8; 16], u32, 16384> = LpmTrie::new();

    /// socket cookie -> a redirected socket's original destination and netns cookie, from its
    /// connect until it closes (sockops needs the netns cookie again at CLOSE).
    #[allow(non_upper_case_globals)]
    #[btf_map]
    static rdr_pending_v2: LruHashMap<u64, Pending, 65536> = LruHashMap::new();

    #[allow(non_upper_case_globals)]
    #[btf_map]
    static rdr_orig: LruHashMap<SockKey, OrigDst, 65536> = LruHashMap::new();

    #[allow(non_upper_case_globals)]
    #[btf_map]
    static rdr_stats: PerCpuArray<Counters, 1> = PerCpuArray::new();

    #[allow(non_upper_case_globals)]
    #[btf_map]
    static rdr_config: Array<RdrConfig, 1> = Array::new();

    #[allow(non_upper_case_globals)]
    #[btf_map]
    static rdr_audit: HashMap<AuditKey, u64, { AUDIT_DESTINATIONS as usize }, NO_PREALLOC> =
        HashMap::new();

    #[allow(non_upper_case_globals)]
    #[btf_map]
    static rdr_audit_tot: HashMap<u64, AuditTotals, { AUDIT_WORKLOADS as usize }, NO_PREALLOC> =
        HashMap::new();

    #[inline(always)]
    fn bump(which: u32) {
        let Some(c) = rdr_stats.get_ptr_mut(0) else {
            return;
        };
        // SAFETY: `get_ptr_mut(0)` returned a non-null, aligned pointer to this CPU's own
        // slot of a preallocated per-CPU array, valid while the program runs (programs run
        // with migration disabled; other CPUs have their own slots). The reference lives for
        // one increment. The one overlap possible is a sockops run in softirq interrupting a
        // connect hook on this CPU between its load and store: plain u64 counters, so at
        // worst one count is lost, never a torn or out-of-bounds write.
        let c = unsafe { &mut *c };
        match c.get_mut(which) {
            Some(n) => *n += 1,
            None => c.errors += 1,
        }
    }

    /// The entry of the calling task's cgroup or an ancestor, with that cgroup's id: walking
    /// from the root down, the first level that has one.
    #[inline(always)]
    fn cgroup_entry() -> Option<(u64, CgroupEntry)> {
        let mut level = 0;
        while level < MAX_CGROUP_DEPTH {
            // SAFETY: the helper takes only an integer and reads the current task's cgroup;
            // the kernel bounds-checks `level` and returns 0 past the task's depth.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if id == 0 {
                return None;
            }
            // SAFETY: `get` is unsafe because the reference points into the map, where the
            // daemon may update or delete the entry concurrently; we read the one `u32` at
            // once and keep no reference past this `if`.
            if let Some(e) = unsafe { rdr_enabled.get(id) } {
                return Some((id, *e));
            }
            level += 1;
        }
        None
    }

    /// What the connect hooks decided.
    enum Verdict {
        /// Leave the connect alone; the counter says why.
        Pass(u32),
        /// Rewrite to the proxy port.
        Redirect { port: u16 },
        /// Refuse the connect: it would be redirected, but the workload's listener is not
        /// bound (or the daemon has not configured the programs yet).
        Refuse,
        /// Leave the connect alone and count it for the audited workload `cgroup` with the
        /// verdict enforcement would have given it (one of `verdict`).
        Audit { cgroup: u64, would: u8 },
    }

    /// The shared decision of connect4 and connect6, so the two hooks cannot drift.
    /// `v4` is the IPv4 form of the destination when there is one (plain or IPv4-mapped).
    #[inline(always)]
    fn decide(sa: &bpf_sock_addr, v4: Option<[u8; 4]>, v6: &[u8; 16]) -> Verdict {
        if sa.type_ != SOCK_STREAM || (sa.protocol != IPPROTO_TCP && sa.protocol != 0) {
            return Verdict::Pass(counter::SKIP_NOT_TCP);
        }
        let Some((cgroup, entry)) = cgroup_entry() else {
            return Verdict::Pass(counter::SKIP_DISABLED);
        };
        // An enabled cgroup fails closed from here on: no config, not ready, or not
        // redirecting means refused, never sent on unchanged.
        let Some(cfg) = rdr_config.get(0) else {
            return Verdict::Refuse;
        };
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if cfg.ready != 0 && tgid == cfg.proxy_tgid {
            return Verdict::Pass(counter::SKIP_SELF);
        }
        match v4 {
            Some(a) => {
                // 127.0.0.0/8 (this includes the proxy's own listener) and 0.0.0.0.
                if a[0] == 127 || a == [0, 0, 0, 0] {
                    return Verdict::Pass(counter::SKIP_LOOPBACK);
                }
                if rdr_skip4.get(&Key::new(32, a)).is_some() {
                    return skipped(cgroup, entry);
                }
            }
            None => {
                let loopback = v6[..15].iter().all(|b| *b == 0) && (v6[15] == 1 || v6[15] == 0);
                if loopback {
                    return Verdict::Pass(counter::SKIP_LOOPBACK);
                }
                if rdr_skip6.get(&Key::new(128, *v6)).is_some() {
                    return skipped(cgroup, entry);
                }
            }
        }
        if cfg.ready == 0 || entry.mode != mode::REDIRECT {
            // Audited workloads are never refused: not for a missing listener (they have
            // none), not before the daemon is ready.
            if entry.mode == mode::AUDIT {
                return Verdict::Audit {
                    cgroup,
                    would: verdict::REDIRECT,
                };
            }
            return Verdict::Refuse;
        }
        Verdict::Redirect {
            port: if entry.port != 0 {
                entry.port
            } else {
                cfg.proxy_port
            },
        }
    }

    /// A destination in a skip range: direct, and counted as "would skip" when audited.
    #[inline(always)]
    fn skipped(cgroup: u64, entry: CgroupEntry) -> Verdict {
        if entry.mode == mode::AUDIT {
            Verdict::Audit {
                cgroup,
                would: verdict::SKIP,
            }
        } else {
            Verdict::Pass(counter::SKIP_CIDR)
        }
    }

    /// Adds one to the `u64` at `p` with an atomic add (`lock xadd`): the audit maps are
    /// shared by every CPU.
    ///
    /// # Safety
    /// `p` must point to a live, 8-byte aligned `u64` inside a map value.
    #[inline(always)]
    unsafe fn add_one(p: *mut u64) {
        // SAFETY: the caller guarantees a valid, aligned u64 (map values are 8-byte aligned
        // and every field we pass is a u64); only atomic operations touch it here.
        // (`AtomicU64::fetch_add` is not offered on bpf, whose target has no compare-and-swap;
        // the intrinsic is, and with its result unused it compiles to BPF_XADD, which every
        // kernel we support has.)
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                p, 1,
            );
        }
    }

    /// Counts one audited connect: in its workload's totals (exact) and under its
    /// destination and verdict (while `rdr_audit` has room; else as `untracked`).
    #[inline(always)]
    fn audit(cgroup: u64, would: u8, addr: [u8; 16], port: u16, family: u8) {
        let totals = match rdr_audit_tot.get_ptr_mut(cgroup) {
            Some(t) => t,
            None => {
                // First connect of this workload (or a race with another CPU's first one:
                // NOEXIST keeps the winner's counts).
                let _ = rdr_audit_tot.insert(cgroup, AuditTotals::default(), NOEXIST);
                match rdr_audit_tot.get_ptr_mut(cgroup) {
                    Some(t) => t,
                    None => return,
                }
            }
        };
        let key = AuditKey {
            cgroup,
            addr,
            port,
            family,
            verdict: would,
            reserved: 0,
        };
        let count = match rdr_audit.get_ptr_mut(key) {
            Some(c) => Some(c),
            None => {
                // A new destination. The insert fails when the map is full (then the lookup
                // finds nothing: untracked) or when another CPU inserted it just now (then
                // the lookup finds that entry).
                let _ = rdr_audit.insert(key, 0, NOEXIST);
                rdr_audit.get_ptr_mut(key)
            }
        };
        // SAFETY: `totals` and `count` came from `get_ptr_mut` on these maps just now: they
        // point at 8-byte aligned values (map values are), which stay valid while the program
        // runs (entries freed by the daemon are reclaimed after an RCU grace period). Only
        // atomic adds write through them.
        unsafe {
            use core::ptr::addr_of_mut;
            match count {
                Some(c) => add_one(c),
                None => add_one(addr_of_mut!((*totals).untracked)),
            }
            if would == verdict::SKIP {
                add_one(addr_of_mut!((*totals).skip));
            } else {
                add_one(addr_of_mut!((*totals).redirect));
            }
        }
    }

    /// Records the original destination under the socket cookie, with the netns cookie that
    /// the `rdr_orig` key will carry. False when the record could not be stored.
    #[inline(always)]
    fn remember(ctx: &SockAddrContext, dst: OrigDst) -> bool {
        // Test builds only (`variant`): a connect to port 9 cannot be recorded, so the tests
        // can reach the refusal that follows a failed record; the preallocated LRU insert
        // below cannot be made to fail on demand. Compiled out of every other build.
        if cfg!(feature = "variant") && dst.port == UNRECORDABLE_PORT {
            return false;
        }
        // SAFETY: `ctx.sock_addr` is the context pointer the kernel passed to this
        // cgroup/connect program, the argument bpf_get_socket_cookie and bpf_get_netns_cookie
        // take in these programs (the latter since 5.7; the verifier checks both); the helpers
        // only read the socket.
        let (cookie, netns) = unsafe {
            (
                bpf_get_socket_cookie(ctx.sock_addr.cast()),
                bpf_get_netns_cookie(ctx.sock_addr.cast()),
            )
        };
        let rec = Pending {
            dst: OrigDst {
                cookie,
                reserved: DATAPATH_VARIANT,
                ..dst
            },
            netns,
        };
        rdr_pending_v2.insert(cookie, rec, ANY).is_ok()
    }

    /// `cgroup/connect4`: every `connect()` of an AF_INET socket below the attach point.
    #[cgroup_sock_addr(connect4)]
    pub fn rdr_connect4(ctx: SockAddrContext) -> i32 {
        // SAFETY: the kernel passes a valid, non-null bpf_sock_addr for this invocation and
        // nothing else in the program refers to it while `sa` lives; the verifier checks
        // every field access (`user_ip4`/`user_port` are writable in connect4).
        let sa = unsafe { &mut *ctx.sock_addr };
        let octets = sa.user_ip4.to_ne_bytes();
        let mapped = v4_mapped(octets);
        match decide(sa, Some(octets), &mapped) {
            Verdict::Pass(why) => bump(why),
            Verdict::Refuse => return refuse(counter::REFUSED),
            Verdict::Audit { cgroup, would } => {
                audit(cgroup, would, mapped, u16::from_be(sa.user_port as u16), 4);
            }
            Verdict::Redirect { port } => {
                let dst = OrigDst {
                    addr: mapped,
                    port: u16::from_be(sa.user_port as u16),
                    family: 4,
                    reserved: 0,
                    cookie: 0,
                };
                if remember(&ctx, dst) {
                    debug!(
                        &ctx,
                        "redirect {:i}:{} to proxy port {}",
                        u32::from_be_bytes(octets),
                        dst.port,
                        port
                    );
                    sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
                    sa.user_port = u32::from(port.to_be());
                    bump(counter::REDIRECTED4);
                } else {
                    return refuse(counter::ERRORS);
                }
            }
        }
        // 1 = let the (possibly rewritten) connect proceed.
        1
    }

    /// A connect that should be redirected but cannot be: refused (`connect()` fails with
    /// EPERM) and counted under `why`. Never sent on unchanged: that would take a pod of an
    /// enabled workload past the proxy and its rules.
    #[inline(always)]
    fn refuse(why: u32) -> i32 {
        bump(why);
        0
    }

    /// `cgroup/connect6`: every `connect()` of an AF_INET6 socket below the attach point.
    /// IPv4-mapped destinations are judged and recorded by their IPv4 form.
    #[cgroup_sock_addr(connect6)]
    pub fn rdr_connect6(ctx: SockAddrContext) -> i32 {
        // SAFETY: as in `rdr_connect4`: the kernel's valid bpf_sock_addr for this
        // invocation, not otherwise referenced; `user_ip6`/`user_port` are writable in
        // connect6 and the verifier checks each access.
        let sa = unsafe { &mut *ctx.sock_addr };
        let w = sa.user_ip6;
        let mut v6 = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = w[i].to_ne_bytes();
            v6[i * 4] = b[0];
            v6[i * 4 + 1] = b[1];
            v6[i * 4 + 2] = b[2];
            v6[i * 4 + 3] = b[3];
            i += 1;
        }
        let is_mapped = v6[..10].iter().all(|b| *b == 0) && v6[10] == 0xff && v6[11] == 0xff;
        let v4 = if is_mapped {
            Some([v6[12], v6[13], v6[14], v6[15]])
        } else {
            None
        };
        match decide(sa, v4, &v6) {
            Verdict::Pass(why) => bump(why),
            Verdict::Refuse => return refuse(counter::REFUSED),
            Verdict::Audit { cgroup, would } => {
                let family = if is_mapped { 4 } else { 6 };
                audit(cgroup, would, v6, u16::from_be(sa.user_port as u16), family);
            }
            Verdict::Redirect { port } => {
                let dst = OrigDst {
                    addr: v6,
                    port: u16::from_be(sa.user_port as u16),
                    family: if is_mapped { 4 } else { 6 },
                    reserved: 0,
                    cookie: 0,
                };
                if remember(&ctx, dst) {
                    debug!(
                        &ctx,
                        "redirect {:i}:{} to proxy port {}", v6, dst.port, port
                    );
                    if is_mapped {
                        // ::ffff:127.0.0.1 reaches the IPv4 listener.
                        sa.user_ip6 = [
                            0,
                            0,
                            u32::from_ne_bytes([0, 0, 0xff, 0xff]),
                            u32::from_ne_bytes([127, 0, 0, 1]),
                        ];
                        bump(counter::REDIRECTED4);
                    } else {
                        sa.user_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
                        bump(counter::REDIRECTED6);
                    }
                    sa.user_port = u32::from(port.to_be());
                } else {
                    return refuse(counter::ERRORS);
                }
            }
        }
        1
    }

    /// The context fields the sockops program needs, read once at entry.
    ///
    /// Why volatile reads at the top: the verifier only accepts context loads at a constant
    /// offset from the unmodified context pointer. Left to itself, LLVM computes `ctx + off`
    /// once and reuses it across branches ("dereference of modified ctx ptr").
    struct OpsFields {
        op: u32,
        family: u32,
        local_ip4: u32,
        local_ip6: [u32; 4],
        local_port: u32,
        new_state: u32,
    }

    #[inline(always)]
    fn read_fields(ctx: &SockOpsContext) -> OpsFields {
        let o = ctx.ops;
        // SAFETY: `ops` is the non-null bpf_sock_ops the kernel passed for this invocation;
        // `addr_of!` takes each field's address without making a reference, and every field
        // read here is readable by sockops programs (the verifier rewrites and checks each
        // load). Volatile keeps each as one load of the field's own size, as it requires.
        unsafe {
            use core::ptr::{addr_of, read_volatile};
            OpsFields {
                op: read_volatile(addr_of!((*o).op)),
                family: read_volatile(addr_of!((*o).family)),
                local_ip4: read_volatile(addr_of!((*o).local_ip4)),
                local_ip6: [
                    read_volatile(addr_of!((*o).local_ip6[0])),
                    read_volatile(addr_of!((*o).local_ip6[1])),
                    read_volatile(addr_of!((*o).local_ip6[2])),
                    read_volatile(addr_of!((*o).local_ip6[3])),
                ],
                local_port: read_volatile(addr_of!((*o).local_port)),
                new_state: read_volatile(addr_of!((*o).__bindgen_anon_1.args[1])),
            }
        }
    }

    /// Client end of the socket as the proxy will see it from `getpeername()`, in the
    /// namespace whose cookie the connect hook recorded.
    #[inline(always)]
    fn sock_key(netns: u64, f: &OpsFields) -> Option<SockKey> {
        let addr = match f.family {
            AF_INET => v4_mapped(f.local_ip4.to_ne_bytes()),
            AF_INET6 => {
                let w = f.local_ip6;
                let mut a = [0u8; 16];
                let mut i = 0;
                while i < 4 {
                    let b = w[i].to_ne_bytes();
                    a[i * 4] = b[0];
                    a[i * 4 + 1] = b[1];
                    a[i * 4 + 2] = b[2];
                    a[i * 4 + 3] = b[3];
                    i += 1;
                }
                a
            }
            _ => return None,
        };
        Some(SockKey {
            netns,
            addr,
            port: f.local_port as u16,
            reserved: [0; 6],
        })
    }

    /// The record the connect hook left for this socket (by its cookie), if it was
    /// redirected.
    #[inline(always)]
    fn pending(cookie: u64) -> Option<Pending> {
        // SAFETY: the reference points into the map; it is copied out at once and no
        // reference is kept.
        unsafe { rdr_pending_v2.get(cookie) }.copied()
    }

    /// `sockops`: re-keys a redirected connection's original destination once it is
    /// established, and forgets it when the client socket closes.
    #[sock_ops]
    pub fn rdr_sockops(ctx: SockOpsContext) -> u32 {
        let f = read_fields(&ctx);
        match f.op {
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
                // SAFETY: `ctx.ops` is this sockops program's own context, which
                // bpf_get_socket_cookie accepts here; it only reads the socket.
                let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
                let Some(rec) = pending(cookie) else {
                    return 1;
                };
                let Some(key) = sock_key(rec.netns, &f) else {
                    return 1;
                };
                let dst = OrigDst {
                    reserved: DATAPATH_VARIANT,
                    ..rec.dst
                };
                if rdr_orig.insert(key, dst, ANY).is_ok() {
                    bump(counter::ESTABLISHED);
                    // Ask for state callbacks on this socket so the entry dies with it.
                    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
                } else {
                    bump(counter::ERRORS);
                }
            }
            BPF_SOCK_OPS_STATE_CB if f.new_state == BPF_TCP_CLOSE => {
                // SAFETY: as above: this program's own sockops context; read only.
                let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
                let Some(rec) = pending(cookie) else {
                    return 1;
                };
                let _ = rdr_pending_v2.remove(cookie);
                let Some(key) = sock_key(rec.netns, &f) else {
                    return 1;
                };
                // SAFETY: the reference into the map is used only to read `cookie` (a u64)
                // in the `map`, before the `remove` below; no reference outlives it.
                let owned = unsafe { rdr_orig.get(key) }.map(|d| d.cookie == cookie);
                if owned == Some(true) {
                    let _ = rdr_orig.remove(key);
                }
            }
            _ => {}
        }
        1
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
    // The real program is only built for bpfel-unknown-none (see redirector/build.rs).
}
