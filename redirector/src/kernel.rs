//! What the running kernel can do, learned at start by loading small probe programs (never by
//! comparing version numbers), and the network-namespace cookie of a listener on kernels
//! that have no `SO_NETNS_COOKIE` (before 5.14).
use std::{
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock, PoisonError},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use redirector_common::PROBE_PORT;

/// The probe programs (redirector-ebpf/src/probe.rs), embedded at build time.
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rdr-probe"));

/// `SO_NETNS_COOKIE` (Linux 5.14+); not in every libc crate release.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// A kernel capability the redirector cannot work without.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Required {
    /// `bpf_get_netns_cookie` in cgroup connect programs: the namespace of a redirected
    /// connection, so its record can never be taken by a connection in another pod.
    ConnectNetnsCookie,
    /// Ring buffer maps: the programs' log records (aya-log) travel in one.
    RingBuf,
}

impl Required {
    /// What it is, in the words of the error message.
    pub fn describe(self) -> &'static str {
        match self {
            Required::ConnectNetnsCookie => {
                "cgroup connect programs with bpf_get_netns_cookie (cgroup/connect4, connect6)"
            }
            Required::RingBuf => "BPF ring buffer maps (BPF_MAP_TYPE_RINGBUF)",
        }
    }

    /// The first Linux release that has it.
    pub fn since(self) -> &'static str {
        match self {
            Required::ConnectNetnsCookie => "5.7",
            Required::RingBuf => "5.8",
        }
    }
}

/// The oldest kernel the redirector is tested on (in a VM, `cargo xtask vm`); every
/// [`Required`] feature is older.
pub const MIN_KERNEL: &str = "5.10";

/// What the probes found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Features {
    /// `uname -r`.
    pub release: String,
    /// Required features the kernel lacks (empty: the redirector can run).
    pub missing: Vec<Required>,
    /// `SO_NETNS_COOKIE` (5.14): a listener's netns cookie from a socket option. Without it
    /// the daemon asks the netns probe program once per pod namespace.
    pub netns_cookie_sockopt: bool,
    /// BPF maps and programs are charged to `RLIMIT_MEMLOCK` (no memory-cgroup accounting
    /// for BPF: before 5.11). The limit is raised before anything is loaded.
    pub memlock_charged: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "kernel {release} lacks {}, which Linux {} and later have; the redirector needs it \
         (it supports Linux {MIN_KERNEL} and newer): run on a newer kernel",
        .feature.describe(), .feature.since()
    )]
    Missing { release: String, feature: Required },
    #[error("failed to load the kernel feature probes")]
    ProbeLoad(#[source] aya::EbpfError),
    #[error("failed to attach the network-namespace probe to cgroup {path}")]
    ProbeAttach {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the network-namespace probe did not answer")]
    ProbeSilent,
    #[error("the network-namespace probe failed")]
    ProbeIo(#[source] std::io::Error),
}

/// Refuses a kernel that lacks a required feature, naming the first one and the release.
pub fn require(f: &Features) -> Result<(), KernelError> {
    match f.missing.first() {
        None => Ok(()),
        Some(&feature) => Err(KernelError::Missing {
            release: f.release.clone(),
            feature,
        }),
    }
}

/// Probes the running kernel. Raises `RLIMIT_MEMLOCK` first where the kernel charges BPF
/// memory to it, so this and every later load fits.
pub fn probe() -> Result<(Features, Option<Ebpf>), KernelError> {
    let memlock_charged = !has_memcg_accounting();
    if memlock_charged {
        raise_memlock();
    }
    let mut f = Features {
        release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        missing: Vec::new(),
        netns_cookie_sockopt: netns_cookie_sockopt_works(),
        memlock_charged,
    };
    let mut loader = EbpfLoader::new();
    let tgid = std::process::id();
    loader.override_global("PROBE_TGID", &tgid, true);
    let mut ebpf = match loader.load(PROBE_OBJECT) {
        Ok(e) => e,
        Err(aya::EbpfError::MapError(aya::maps::MapError::CreateError { name, .. }))
            if name == "rdr_p_rb" =>
        {
            f.missing.push(Required::RingBuf);
            return Ok((f, None));
        }
        Err(e) => return Err(KernelError::ProbeLoad(e)),
    };
    let loaded = ebpf
        .program_mut("rdr_p_netns")
        .and_then(|p| <&mut CgroupSockAddr>::try_from(p).ok())
        .is_some_and(|p| p.load().is_ok());
    if !loaded {
        f.missing.push(Required::ConnectNetnsCookie);
    }
    Ok((f, Some(ebpf)))
}

/// Memory-cgroup accounting of BPF memory came with Linux 5.11, in the same release as the
/// `bpf_ktime_get_coarse_ns` helper; libbpf detects it the same way. A three-instruction
/// socket filter that calls it loads only where it exists.
fn has_memcg_accounting() -> bool {
    // struct bpf_insn: code, dst/src registers, offset, immediate.
    let insns: [u64; 3] = [
        insn(0x85, 0, 160), // call bpf_ktime_get_coarse_ns
        insn(0xb7, 0, 0),   // r0 = 0
        insn(0x95, 0, 0),   // exit
    ];
    let license = b"GPL\0";
    // union bpf_attr for BPF_PROG_LOAD, zeroed past the fields set: prog_type,
    // insn_cnt, insns, license.
    let mut attr = [0u8; 72];
    attr[0..4].copy_from_slice(&1u32.to_ne_bytes()); // BPF_PROG_TYPE_SOCKET_FILTER
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // SAFETY: bpf(BPF_PROG_LOAD = 5) reads `attr` (72 live bytes, the size passed), and
    // through it `insns` and `license`, both alive for the call; it writes nothing of ours.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_ptr(), attr.len() as libc::c_uint) };
    if fd < 0 {
        return false;
    }
    // SAFETY: a new fd the kernel just returned to us; OwnedFd closes it.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    true
}

const fn insn(code: u8, regs: u8, imm: i32) -> u64 {
    // Little-endian layout of struct bpf_insn (x86_64, arm64): code, regs, off (0), imm.
    (code as u64) | ((regs as u64) << 8) | ((imm as u32 as u64) << 32)
}

/// Before 5.11 every map and program counts against `RLIMIT_MEMLOCK` (64 KiB by default on
/// older kernels: not even one of our maps fits).
fn raise_memlock() {
    let inf = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads one live rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &inf) } == 0 {
        tracing::info!("kernel charges BPF memory to RLIMIT_MEMLOCK: raised it to unlimited");
        return;
    }
    // Without CAP_SYS_RESOURCE only the soft limit can go up, to the hard one.
    let e = std::io::Error::last_os_error();
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct, `cur`, which is live.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur) } == 0 {
        let up = libc::rlimit {
            rlim_cur: cur.rlim_max,
            rlim_max: cur.rlim_max,
        };
        // SAFETY: setrlimit reads one live rlimit struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &up) } == 0 {
            tracing::warn!(error = %e, hard_limit = cur.rlim_max, "kernel charges BPF memory to RLIMIT_MEMLOCK, which cannot go past its hard limit (grant CAP_SYS_RESOURCE or raise the limit if loading fails)");
            return;
        }
    }
    tracing::warn!(error = %e, "kernel charges BPF memory to RLIMIT_MEMLOCK and it cannot be raised; loading may fail");
}

fn netns_cookie_sockopt_works() -> bool {
    // SAFETY: socket(2) takes integers only; the fd is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: a new fd nothing else owns.
    let s = unsafe { OwnedFd::from_raw_fd(fd) };
    sockopt_cookie(&s).is_ok()
}

fn sockopt_cookie(sock: &impl AsRawFd) -> std::io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the fd is open for the call (borrowed from `sock`); the kernel writes at most
    // `len` = 8 bytes into `v`, a live u64, and updates `len` in place.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// The netns probe, attached while the daemon runs (not pinned: it goes with the process).
struct NetnsProbe {
    /// Holds the program and its attachment.
    _ebpf: Ebpf,
    out: HashMap<MapData, u64, u64>,
}

/// Set once at start on kernels without `SO_NETNS_COOKIE`.
static PROBE: OnceLock<Mutex<NetnsProbe>> = OnceLock::new();

/// Attaches the netns probe (from [`probe`]'s object) to the daemon's own cgroup — it acts
/// only on the daemon's connects to `127.0.0.1:PROBE_PORT`, and there only the daemon pays
/// its few instructions — or, when that cgroup is not visible under `cgroup_root`'s mount,
/// to `cgroup_root` itself.
pub fn start_netns_probe(mut ebpf: Ebpf, cgroup_root: &Path) -> Result<(), KernelError> {
    let at = own_cgroup(cgroup_root).unwrap_or_else(|| cgroup_root.to_owned());
    let attach_err = |source: Box<dyn std::error::Error + Send + Sync>| KernelError::ProbeAttach {
        path: at.clone(),
        source,
    };
    let file = fs::File::open(&at).map_err(|e| attach_err(Box::new(e)))?;
    let prog: &mut CgroupSockAddr = ebpf
        .program_mut("rdr_p_netns")
        .ok_or_else(|| attach_err("rdr_p_netns missing from the probe object".into()))?
        .try_into()
        .map_err(|e| attach_err(Box::new(e)))?;
    prog.attach(&file, CgroupAttachMode::Single)
        .map_err(|e| attach_err(Box::new(e)))?;
    let map = ebpf
        .take_map("rdr_p_out")
        .ok_or_else(|| attach_err("rdr_p_out missing from the probe object".into()))?;
    let out = HashMap::try_from(map).map_err(|e| attach_err(Box::new(e)))?;
    let probe = NetnsProbe { _ebpf: ebpf, out };
    let _ = PROBE.set(Mutex::new(probe));
    tracing::info!(cgroup = %at.display(), "no SO_NETNS_COOKIE: pod namespaces are identified by the netns probe");
    // The probe must answer here before any pod depends on it.
    netns_cookie_here().map(|_| ())
}

/// The daemon's own cgroup v2 directory as seen under the mount that holds `cgroup_root`.
fn own_cgroup(cgroup_root: &Path) -> Option<PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    // No cgroup v2 line: the v2 hierarchy is mounted only privately (a cgroup v1 host), and
    // every process sits at its root.
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .trim()
        .to_owned();
    let root = cgroup_root.canonicalize().ok()?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    // mountinfo: id parent major:minor root mount-point options … - fstype source options
    let (mount_root, mount_point) = mounts
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let f: Vec<&str> = pre.split_whitespace().collect();
            Some((f.get(3)?.to_string(), PathBuf::from(f.get(4)?)))
        })
        .filter(|(_, mp)| root.starts_with(mp))
        .max_by_key(|(_, mp)| mp.as_os_str().len())?;
    let rel = own.strip_prefix(mount_root.trim_end_matches('/'))?;
    let dir = mount_point.join(rel.trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

/// The cookie of the network namespace the calling thread is in: `SO_NETNS_COOKIE` where
/// the kernel has it, else the netns probe. Call it on a thread that entered the namespace.
pub fn netns_cookie_here() -> Result<u64, KernelError> {
    // SAFETY: socket(2) takes integers only; the fd is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(KernelError::ProbeIo(std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let Some(probe) = PROBE.get() else {
        return sockopt_cookie(&sock).map_err(KernelError::ProbeIo);
    };
    // SAFETY: gettid/getpid take nothing and cannot fail.
    let id = (u64::from(unsafe { libc::getpid() } as u32) << 32)
        | u64::from(unsafe { libc::gettid() } as u32);
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: PROBE_PORT.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connect(2) on our open socket with a live sockaddr_in of the size passed. The
    // probe program refuses it (EPERM); nothing is sent.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let connect_err = std::io::Error::last_os_error();
    let mut p = probe.lock().unwrap_or_else(PoisonError::into_inner);
    let cookie = p.out.get(&id, 0).ok();
    let _ = p.out.remove(&id);
    match cookie {
        Some(c) if rc < 0 => Ok(c),
        _ if rc < 0 && connect_err.raw_os_error() != Some(libc::EPERM) => {
            Err(KernelError::ProbeIo(connect_err))
        }
        _ => Err(KernelError::ProbeSilent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_feature_is_named_with_the_release() {
        for feature in [Required::ConnectNetnsCookie, Required::RingBuf] {
            let f = Features {
                release: "5.4.0-150-generic".into(),
                missing: vec![feature],
                netns_cookie_sockopt: false,
                memlock_charged: true,
            };
            let msg = require(&f).unwrap_err().to_string();
            assert!(msg.contains("kernel 5.4.0-150-generic lacks"), "{msg}");
            assert!(msg.contains(feature.describe()), "{msg}");
            assert!(
                msg.contains(&format!("Linux {} and later", feature.since())),
                "{msg}"
            );
        }
        let ok = Features {
            release: "5.10.0-32-cloud-amd64".into(),
            missing: vec![],
            netns_cookie_sockopt: false,
            memlock_charged: true,
        };
        assert!(require(&ok).is_ok());
    }

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        // call 160: opcode 0x85, no registers, imm 160 in the high half.
        assert_eq!(
            insn(0x85, 0, 160).to_le_bytes(),
            [0x85, 0, 0, 0, 160, 0, 0, 0]
        );
        assert_eq!(insn(0x95, 0, 0).to_le_bytes(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
    }
}
