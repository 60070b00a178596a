//! Network namespaces and cgroups: find a cgroup's netns, bind listeners inside it.
use std::{
    fs,
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd, AsRawFd},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// `statfs` magic of cgroup v2 (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `statfs` magic of bpffs (`BPF_FS_MAGIC`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("failed to open the network namespace of pid {pid}")]
    Open {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to enter the network namespace of pid {pid}")]
    Enter {
        pid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("failed to bind {addr} in the network namespace of pid {pid}")]
    Bind {
        pid: u32,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no free proxy port in the workload's network namespace (pid {pid}): \
         {first}-{last} are all taken by the pod's own sockets"
    )]
    NoFreePort { pid: u32, first: u16, last: u16 },
    #[error("failed to learn the netns cookie of the workload's network namespace (pid {pid})")]
    Cookie {
        pid: u32,
        #[source]
        source: crate::kernel::KernelError,
    },
    #[error("helper thread for netns of pid {pid} panicked")]
    Thread { pid: u32 },
}

/// Identity of a network namespace: the (device, inode) of `/proc/<pid>/ns/net`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

/// Checks that `f` is a network namespace (an nsfs file of type network, whatever it was
/// opened as) and returns its identity. How a namespace handed over by the CNI plugin is
/// accepted: by what it is, never by a path.
pub fn check_netns_file(f: &fs::File) -> std::io::Result<NetnsId> {
    let sfs = nix::sys::statfs::fstatfs(f).map_err(std::io::Error::from)?;
    if sfs.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a namespace file",
        ));
    }
    // NS_GET_NSTYPE (_IO(0xb7, 0x3)): the namespace's CLONE_NEW* type.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: the ioctl takes no argument and only reads the namespace the fd refers to.
    let t = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    if t != libc::CLONE_NEWNET {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a network namespace",
        ));
    }
    let m = f.metadata()?;
    Ok(NetnsId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// A network namespace held open by the daemon (one the CNI plugin handed over), compared by
/// identity.
#[derive(Clone, Debug)]
pub struct NetnsFile {
    pub id: NetnsId,
    pub file: std::sync::Arc<fs::File>,
}

impl PartialEq for NetnsFile {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for NetnsFile {}

/// `NSFS_MAGIC` from linux/magic.h.
const NSFS_MAGIC: i64 = 0x6e73_6673;

pub fn netns_of(pid: u32) -> std::io::Result<NetnsId> {
    let m = fs::metadata(format!("/proc/{pid}/ns/net"))?;
    Ok(NetnsId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// Binds the proxy listeners (127.0.0.1 and ::1) inside the network namespace of `pid`, on
/// the first of `ports` that is free on both; returns the port, the listeners and the
/// namespace's cookie (the `netns` part of the `rdr_orig` keys of its connections).
///
/// Why a helper thread: `setns(CLONE_NEWNET)` changes the namespace of the calling thread
/// only. A short-lived thread enters the pod's netns, binds, and exits; the sockets stay in
/// the namespace they were created in, while the daemon's other threads never move.
///
/// A port that something in the pod already holds (on loopback or a wildcard address, on
/// either family) is passed over: the pod's own listener would otherwise receive connections
/// meant for us. Our sockets do not set SO_REUSEPORT, so nothing in the pod can join them
/// later either. `::1` is optional only where the pod has no IPv6 loopback.
pub type Bound = (u16, Vec<TcpListener>, u64);

pub fn bind_in_netns(pid: u32, ports: Vec<u16>) -> Result<Bound, NetnsError> {
    let ns = fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|source| NetnsError::Open { pid, source })?;
    bind_in(ns, pid, ports)
}

/// [`bind_in_netns`] for a namespace file the daemon already holds (one the container
/// runtime made and handed over through the CNI plugin, before any process is in it).
/// `pid` (0 here) only names the namespace in errors.
pub fn bind_in(ns: fs::File, pid: u32, ports: Vec<u16>) -> Result<Bound, NetnsError> {
    let handle = std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|source| NetnsError::Enter { pid, source })?;
        // Learned here, on the thread inside the namespace (the netns probe answers for
        // the namespace of the thread that connects).
        let cookie = crate::kernel::netns_cookie_here()
            .map_err(|source| NetnsError::Cookie { pid, source })?;
        for &port in &ports {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
            let l4 = match bind_listener(v4) {
                Ok(l) => l,
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => continue,
                Err(source) => {
                    return Err(NetnsError::Bind {
                        pid,
                        addr: v4,
                        source,
                    });
                }
            };
            let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
            match bind_listener(v6) {
                Ok(l6) => return Ok((port, vec![l4, l6], cookie)),
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => continue,
                Err(e) => {
                    // No ::1 in this namespace (IPv6 disabled): nothing can be redirected
                    // there, nor squatted.
                    tracing::debug!(%v6, pid, error = %e, "no IPv6 loopback listener");
                    return Ok((port, vec![l4], cookie));
                }
            }
        }
        Err(NetnsError::NoFreePort {
            pid,
            first: ports.first().copied().unwrap_or(0),
            last: ports.last().copied().unwrap_or(0),
        })
    });
    handle.join().map_err(|_| NetnsError::Thread { pid })?
}

fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) takes integers only and touches no memory of ours; the new fd is
    // checked below and then owned by the TcpListener.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a just-created, open TCP socket that nothing else owns or closes;
    // the TcpListener takes sole ownership and closes it on every return path below.
    let listener = unsafe { <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let set = |level, opt| {
        // SAFETY: `fd` is open (owned by `listener`, which outlives this closure's calls);
        // the option value points to a live c_int and the length passed is its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // A restarted daemon must be able to bind while old connections sit in TIME_WAIT.
    // No SO_REUSEPORT: a process in the pod (as root, like us) could then join the port's
    // group and take a share of the connections. During a rolling update the new daemon
    // takes the next free port and points the pod's entry at it.
    set(libc::SOL_SOCKET, libc::SO_REUSEADDR)?;
    if addr.is_ipv6() {
        set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?;
    }
    let sa = nix::sys::socket::SockaddrStorage::from(addr);
    // SAFETY: `fd` is open; the pointer and length come from the same SockaddrStorage,
    // which stays alive for the call, so the kernel reads only initialized bytes of it.
    let rc = unsafe {
        libc::bind(
            fd,
            nix::sys::socket::SockaddrLike::as_ptr(&sa),
            nix::sys::socket::SockaddrLike::len(&sa),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: listen(2) on `fd`, open and owned by `listener`; no memory is passed.
    if unsafe { libc::listen(fd, 4096) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The cgroup v2 id of a cgroup directory: its inode number (what
/// `bpf_get_current_cgroup_id()` returns for tasks in it).
pub fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

fn fs_magic(path: &Path) -> std::io::Result<i64> {
    let st = nix::sys::statfs::statfs(path).map_err(std::io::Error::from)?;
    Ok(st.filesystem_type().0 as i64)
}

/// Is `path` a directory on a cgroup v2 filesystem?
pub fn is_cgroup2(path: &Path) -> std::io::Result<bool> {
    Ok(fs_magic(path)? == CGROUP2_SUPER_MAGIC)
}

/// Is `path` on a bpf filesystem?
pub fn is_bpffs(path: &Path) -> std::io::Result<bool> {
    Ok(fs_magic(path)? == BPF_FS_MAGIC)
}

/// Pids of every process in `cgroup` and its descendants.
pub fn cgroup_pids(cgroup: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = vec![cgroup.to_owned()];
    while let Some(dir) = stack.pop() {
        if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}
