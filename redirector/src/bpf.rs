//! eBPF datapath: load or adopt the pinned programs and maps, attach them, and read/write maps.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use ipnet::IpNet;
use redirector_common::{CgroupEntry, Counters, OrigDst, RdrConfig, SockKey, mode, names};

/// The compiled programs, embedded at build time (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rdr-ebpf"));

/// Default pin directory: our own directory under the node's bpffs, so `uninstall` and
/// `bpftool` find every object of ours in one place (ARCHITECTURE.md, pinned objects).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/redirector";

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("failed to load the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("failed to load program {name} into the kernel")]
    ProgramLoad {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("failed to attach {name} to cgroup {cgroup}")]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("failed to pin {what} at {path}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("failed to open pinned map {path}")]
    OpenMap {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("map operation on {map} failed")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("failed to open cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to create the pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Paths of every pinned object, all under one root.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    /// True when every link pin exists: a previous daemon attached the programs.
    pub fn links_pinned(&self) -> bool {
        names::LINKS.iter().all(|l| self.path(l).exists())
    }
}

/// How the datapath came up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Programs were loaded and attached by this process.
    Attached,
    /// Programs attached by an earlier daemon were found pinned and kept.
    Adopted,
}

/// Load (or adopt) the programs, attach them to `cgroup_root`, and pin everything.
///
/// Adoption: when all link pins exist, the programs are already attached; attaching again
/// would stack a second copy on the hook, so only the maps are reopened.
/// The eBPF programs' own log records (aya-log), forwarded to the daemon's log.
pub type ProgramLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

pub fn load_and_attach(
    pins: &PinLayout,
    cgroup_root: &Path,
) -> Result<(Maps, Origin, Option<ProgramLogger>), BpfError> {
    fs::create_dir_all(&pins.root).map_err(|source| BpfError::PinDir {
        path: pins.root.clone(),
        source,
    })?;
    let mut loader = EbpfLoader::new();
    let map_paths: Vec<(&'static str, PathBuf)> =
        names::MAPS.iter().map(|m| (*m, pins.path(m))).collect();
    for (name, path) in &map_paths {
        // Reuses the pinned map when it exists, creates and pins it otherwise.
        loader.map_pin_path(name, path.as_path());
    }
    // The programs' debug messages cost a ring-buffer write per redirect; they are compiled
    // in but enabled in the kernel only when the daemon starts with debug logging (aya-log
    // levels: 2 = warn, 4 = debug).
    let level: u8 = if tracing::enabled!(tracing::Level::DEBUG) {
        4
    } else {
        2
    };
    loader.override_global("AYA_LOG_LEVEL", &level, false);
    let logs_pin = pins.path(names::PIN_LOGS);
    loader.map_pin_path("AYA_LOGS", logs_pin.as_path());
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(BpfError::Load)?;

    let origin = if pins.links_pinned() {
        Origin::Adopted
    } else {
        // A partial set of link pins is left over from a crash mid-attach: drop them (which
        // detaches those links) and attach a complete, fresh set.
        for l in names::LINKS {
            let _ = fs::remove_file(pins.path(l));
        }
        for p in names::PROGRAMS {
            let _ = fs::remove_file(pins.path(p));
        }
        attach_all(&mut ebpf, pins, cgroup_root)?;
        Origin::Attached
    };
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!(error = %e, "eBPF program logs unavailable");
            None
        }
    };
    drop(ebpf);
    Ok((Maps::open(pins)?, origin, logger))
}

fn attach_all(ebpf: &mut Ebpf, pins: &PinLayout, cgroup_root: &Path) -> Result<(), BpfError> {
    let cgroup = fs::File::open(cgroup_root).map_err(|source| BpfError::Cgroup {
        path: cgroup_root.to_owned(),
        source,
    })?;
    // Attachment goes through bpf_link_create (kernel >= 5.7), which rejects any attach flag
    // (EINVAL) and always attaches in multi mode: other tools' programs on the same hooks keep
    // running next to ours. Hence the "Single" (= no flags) mode here.
    let mode = CgroupAttachMode::Single;
    for (i, name) in names::PROGRAMS.iter().copied().enumerate() {
        let prog = ebpf
            .program_mut(name)
            .ok_or(BpfError::MissingProgram { name })?;
        let attach_err = |source| BpfError::Attach {
            name,
            cgroup: cgroup_root.to_owned(),
            source,
        };
        let load_err = |source| BpfError::ProgramLoad { name, source };
        let fd_link: FdLink = if name == names::PROG_SOCKOPS {
            let p: &mut SockOps = prog.try_into().map_err(load_err)?;
            p.load().map_err(load_err)?;
            let id = p.attach(&cgroup, mode).map_err(attach_err)?;
            let link = p.take_link(id).map_err(attach_err)?;
            FdLink::try_from(link).map_err(|e| BpfError::Pin {
                what: "link",
                path: pins.path(names::LINKS[i]),
                source: Box::new(e),
            })?
        } else {
            let p: &mut CgroupSockAddr = prog.try_into().map_err(load_err)?;
            p.load().map_err(load_err)?;
            let id = p.attach(&cgroup, mode).map_err(attach_err)?;
            let link = p.take_link(id).map_err(attach_err)?;
            FdLink::try_from(link).map_err(|e| BpfError::Pin {
                what: "link",
                path: pins.path(names::LINKS[i]),
                source: Box::new(e),
            })?
        };
        let prog_path = pins.path(name);
        prog.pin(&prog_path).map_err(|e| BpfError::Pin {
            what: "program",
            path: prog_path,
            source: Box::new(e),
        })?;
        let link_path = pins.path(names::LINKS[i]);
        fd_link.pin(&link_path).map_err(|e| BpfError::Pin {
            what: "link",
            path: link_path,
            source: Box::new(e),
        })?;
    }
    Ok(())
}

/// Remove every pin: links are detached when their last reference (the pin) goes away.
/// Only our own objects are touched; other programs on the same hooks stay attached.
pub fn uninstall(pins: &PinLayout) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for name in names::LINKS
        .iter()
        .chain(names::PROGRAMS.iter())
        .chain(names::MAPS.iter())
        .chain([names::PIN_LOGS].iter())
        .chain(names::LEGACY_PINS.iter())
    {
        let p = pins.path(name);
        match fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    match fs::remove_dir(&pins.root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(removed)
}

/// Typed handles on the pinned maps. Works the same for the daemon and for `redirector status`
/// (which only reads).
pub struct Maps {
    enabled: HashMap<MapData, u64, CgroupEntry>,
    skip4: LpmTrie<MapData, [u8; 4], u32>,
    skip6: LpmTrie<MapData, [u8; 16], u32>,
    orig: HashMap<MapData, SockKey, OrigDst>,
    stats: PerCpuArray<MapData, Counters>,
    config: Array<MapData, RdrConfig>,
}

fn open_map(pins: &PinLayout, name: &'static str) -> Result<Map, BpfError> {
    let path = pins.path(name);
    let data = MapData::from_pin(&path).map_err(|source| BpfError::OpenMap {
        path: path.clone(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| BpfError::OpenMap { path, source })
}

macro_rules! typed {
    ($pins:expr, $name:expr) => {
        open_map($pins, $name)?
            .try_into()
            .map_err(|source| BpfError::Map { map: $name, source })?
    };
}

impl Maps {
    /// Opens every map from its pin.
    pub fn open(pins: &PinLayout) -> Result<Self, BpfError> {
        Ok(Self {
            enabled: typed!(pins, names::MAP_ENABLED),
            skip4: typed!(pins, names::MAP_SKIP4),
            skip6: typed!(pins, names::MAP_SKIP6),
            orig: typed!(pins, names::MAP_ORIG),
            stats: typed!(pins, names::MAP_STATS),
            config: typed!(pins, names::MAP_CONFIG),
        })
    }

    /// Writes the daemon's settings; the hooks redirect nothing until this has happened.
    pub fn set_config(&mut self, proxy_port: u16, proxy_tgid: u32) -> Result<(), BpfError> {
        let cfg = RdrConfig {
            proxy_port,
            reserved0: 0,
            proxy_tgid,
            ready: 1,
            reserved1: 0,
        };
        self.config.set(0, cfg, 0).map_err(|source| BpfError::Map {
            map: names::MAP_CONFIG,
            source,
        })
    }

    pub fn config(&self) -> Result<RdrConfig, BpfError> {
        self.config.get(&0, 0).map_err(|source| BpfError::Map {
            map: names::MAP_CONFIG,
            source,
        })
    }

    /// Puts `cgroup_id` into `rdr_enabled` (or changes its mode): from now on none of its TCP
    /// connects go past the proxy.
    pub fn enable(&mut self, cgroup_id: u64, mode: CgroupMode) -> Result<(), BpfError> {
        self.enabled
            .insert(cgroup_id, CgroupEntry::from(mode), 0)
            .map_err(|source| BpfError::Map {
                map: names::MAP_ENABLED,
                source,
            })
    }

    pub fn disable(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        match self.enabled.remove(&cgroup_id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(BpfError::Map {
                map: names::MAP_ENABLED,
                source,
            }),
        }
    }

    /// The mode of `cgroup_id`, if it is in `rdr_enabled`.
    pub fn mode(&self, cgroup_id: u64) -> Option<CgroupMode> {
        self.enabled.get(&cgroup_id, 0).ok().map(CgroupMode::from)
    }

    /// Every entry of `rdr_enabled` with its mode.
    pub fn enabled_entries(&self) -> BTreeMap<u64, CgroupMode> {
        self.enabled
            .iter()
            .filter_map(Result::ok)
            .map(|(id, e)| (id, CgroupMode::from(e)))
            .collect()
    }

    pub fn enabled_ids(&self) -> BTreeSet<u64> {
        self.enabled.keys().filter_map(Result::ok).collect()
    }

    /// Replaces the skip ranges: new ranges are inserted before stale ones are removed, so no
    /// range that is in both the old and the new set is ever missing.
    pub fn set_skip_ranges(&mut self, ranges: &[IpNet]) -> Result<(), BpfError> {
        let mut want4 = BTreeSet::new();
        let mut want6 = BTreeSet::new();
        for r in ranges {
            match r.trunc() {
                IpNet::V4(n) => {
                    // IPv4-mapped IPv6 destinations are judged by their IPv4 form in the
                    // hook, so one IPv4 entry covers both.
                    want4.insert((u32::from(n.prefix_len()), n.network().octets()));
                }
                IpNet::V6(n) => {
                    want6.insert((u32::from(n.prefix_len()), n.network().octets()));
                }
            }
        }
        let e4 = |source| BpfError::Map {
            map: names::MAP_SKIP4,
            source,
        };
        let e6 = |source| BpfError::Map {
            map: names::MAP_SKIP6,
            source,
        };
        for (len, a) in &want4 {
            self.skip4.insert(&Key::new(*len, *a), 1, 0).map_err(e4)?;
        }
        for (len, a) in &want6 {
            self.skip6.insert(&Key::new(*len, *a), 1, 0).map_err(e6)?;
        }
        let stale4: Vec<Key<[u8; 4]>> = self
            .skip4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want4.contains(&(k.prefix_len(), k.data())))
            .collect();
        for k in stale4 {
            self.skip4.remove(&k).map_err(e4)?;
        }
        let stale6: Vec<Key<[u8; 16]>> = self
            .skip6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want6.contains(&(k.prefix_len(), k.data())))
            .collect();
        for k in stale6 {
            self.skip6.remove(&k).map_err(e6)?;
        }
        Ok(())
    }

    /// Skip ranges currently in the kernel (IPv4 first; mapped duplicates left out).
    pub fn skip_ranges(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self
            .skip4
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| IpNet::new(IpAddr::from(k.data()), k.prefix_len() as u8).ok())
            .collect();
        out.extend(self.skip6.keys().filter_map(Result::ok).filter_map(|k| {
            IpNet::new(IpAddr::V6(Ipv6Addr::from(k.data())), k.prefix_len() as u8).ok()
        }));
        out
    }

    /// Takes (looks up and deletes) the original destination of an accepted connection.
    pub fn take_orig(&mut self, key: &SockKey) -> Result<Option<OrigDst>, BpfError> {
        match self.orig.get(key, 0) {
            Ok(v) => {
                let _ = self.orig.remove(key);
                Ok(Some(v))
            }
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(BpfError::Map {
                map: names::MAP_ORIG,
                source,
            }),
        }
    }

    /// Number of recorded-but-not-yet-accepted connections.
    pub fn orig_len(&self) -> usize {
        self.orig.keys().count()
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, BpfError> {
        let per_cpu = self.stats.get(&0, 0).map_err(|source| BpfError::Map {
            map: names::MAP_STATS,
            source,
        })?;
        let mut total = Counters::default();
        for c in per_cpu.iter() {
            total.add(c);
        }
        Ok(total)
    }
}

/// The socket address an [`OrigDst`] stands for; IPv4-mapped addresses come back as IPv4.
/// What an `rdr_enabled` entry does to its cgroup's connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupMode {
    /// Redirected to the listener on this port in the connecting process's network namespace.
    Redirect { port: u16 },
    /// Refused (EPERM): the workload's listener is not bound (yet).
    Refuse,
}

impl From<CgroupMode> for CgroupEntry {
    fn from(m: CgroupMode) -> Self {
        match m {
            CgroupMode::Redirect { port } => CgroupEntry {
                mode: mode::REDIRECT,
                port,
                reserved: 0,
            },
            CgroupMode::Refuse => CgroupEntry {
                mode: mode::REFUSE,
                port: 0,
                reserved: 0,
            },
        }
    }
}

impl From<CgroupEntry> for CgroupMode {
    /// As the programs read it: anything but a redirect refuses.
    fn from(e: CgroupEntry) -> Self {
        if e.mode == mode::REDIRECT {
            CgroupMode::Redirect { port: e.port }
        } else {
            CgroupMode::Refuse
        }
    }
}

pub fn orig_to_socket_addr(d: &OrigDst) -> SocketAddr {
    let v6 = Ipv6Addr::from(d.addr);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, d.port)
}

/// The map key for a peer as seen from a listener in the namespace with `netns_cookie`.
pub fn sock_key(netns_cookie: u64, peer: SocketAddr) -> SockKey {
    let addr = match peer.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    SockKey {
        netns: netns_cookie,
        addr,
        port: peer.port(),
        reserved: [0; 6],
    }
}

/// Is a pinned link still there and attached? Used by readiness and `status`.
pub fn link_alive(pins: &PinLayout, link: &str) -> bool {
    PinnedLink::from_pin(pins.path(link)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_key_canonicalizes_v4() {
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let b: SocketAddr = "[::ffff:127.0.0.1]:4000".parse().unwrap();
        assert_eq!(sock_key(7, a), sock_key(7, b));
        assert_ne!(sock_key(7, a), sock_key(8, a), "netns is part of the key");
    }

    #[test]
    fn orig_round_trips_v4_and_v6() {
        for s in ["203.0.113.9:443", "[2001:db8::9]:8443"] {
            let sa: SocketAddr = s.parse().unwrap();
            let addr = match sa.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            let d = OrigDst {
                addr,
                port: sa.port(),
                family: 4,
                reserved: 0,
                cookie: 1,
            };
            assert_eq!(orig_to_socket_addr(&d), sa);
        }
    }
}
