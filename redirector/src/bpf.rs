//! eBPF datapath: load or adopt the pinned programs and maps, attach them, and read/write maps.
pub mod sys;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
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
use redirector_common::{
    AuditKey, AuditTotals, CgroupEntry, Counters, OrigDst, RdrConfig, SockKey, mode, names,
};

/// The compiled programs, embedded at build time (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rdr-ebpf"));

/// Default pin directory: our own directory under the node's bpffs, so `uninstall` and
/// `bpftool` find every object of ours in one place (ARCHITECTURE.md, pinned objects).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/redirector";

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("failed to load the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("the embedded eBPF object does not parse: {0}")]
    Object(String),
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("failed to replace the program of link {name} in place")]
    Replace {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
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
    /// Programs were loaded and attached by this process (no link was pinned).
    Attached,
    /// The pinned links already run this build's programs on the same maps: kept as they are.
    Adopted,
    /// The pinned links ran other programs (an earlier or later release) or used maps of
    /// another layout: their programs were replaced in place, or a defunct link re-attached.
    Upgraded,
}

/// The eBPF programs' own log records (aya-log), forwarded to the daemon's log.
pub type ProgramLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Kernel object name and pin file name of every pinned map, aya-log's ring buffer included.
fn pinned_maps() -> impl Iterator<Item = (&'static str, &'static str)> {
    names::MAPS
        .iter()
        .map(|m| (*m, *m))
        .chain([("AYA_LOGS", names::PIN_LOGS)])
}

/// Suffix of a pin being prepared: the object is pinned there first, then renamed over the
/// live pin, so the live name always refers to a complete object (bpffs renames atomically;
/// it refuses names with a dot).
const NEXT: &str = "_next";

/// The layout a map must have for this build's programs: what the kernel reports for a map
/// (type, key and value size, capacity, flags). A pinned map that differs is never reused:
/// the programs would misread it (or the verifier would reject them). A change of meaning
/// with the same sizes must rename the map (Cilium's `_v2` convention); the unit test
/// `map_layouts_are_the_reviewed_ones` makes every layout change a reviewed one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for MapSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} key {} value {} entries {} flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// The layouts this build's programs expect, read from the embedded object.
pub fn expected_map_specs() -> Result<BTreeMap<String, MapSpec>, BpfError> {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| BpfError::Object(e.to_string()))?;
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| {
            (
                name.clone(),
                MapSpec {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries: m.max_entries(),
                    flags: m.map_flags(),
                },
            )
        })
        .collect())
}

fn pinned_spec(path: &Path) -> Result<MapSpec, MapError> {
    let info = aya::maps::MapInfo::from_pin(path)?;
    Ok(MapSpec {
        map_type: info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// The state of one of our link pins.
enum LinkState {
    /// No pin.
    Missing,
    /// Pinned and attached to the cgroup root we were given.
    Live { fd: OwnedFd, info: sys::CgroupLink },
    /// Pinned, but its cgroup is gone (removed and recreated: the link is defunct) or it is
    /// another cgroup than the one we were given.
    Elsewhere { info: sys::CgroupLink },
}

fn link_state(pins: &PinLayout, link: &str, root_id: u64) -> LinkState {
    let Ok(fd) = sys::obj_get(&pins.path(link)) else {
        return LinkState::Missing;
    };
    // Something else pinned under our link's name is not a link of ours: replaced.
    if !sys::is_link(fd.as_fd()) {
        return LinkState::Missing;
    }
    match sys::cgroup_link_info(fd.as_fd()) {
        Ok(info) if info.cgroup_id == root_id => LinkState::Live { fd, info },
        Ok(info) => LinkState::Elsewhere { info },
        Err(_) => LinkState::Missing,
    }
}

/// A cgroup's id: the inode number of its directory in cgroup2.
fn cgroup_id(path: &Path) -> Result<u64, BpfError> {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| BpfError::Cgroup {
            path: path.to_owned(),
            source,
        })
}

/// Load this build's programs and maps and make the hooks under `cgroup_root` run them.
///
/// - No link pinned: attach and pin everything ([`Origin::Attached`]).
/// - Links pinned and running this build's programs (same instruction tag) on maps of this
///   build's layout: keep them ([`Origin::Adopted`]).
/// - Otherwise ([`Origin::Upgraded`]): each pinned link gets the new program with
///   `BPF_LINK_UPDATE` — the hook never runs without one of the two, so no connect slips past
///   — and a defunct link (its cgroup recreated) is attached afresh.
///
/// A pinned map whose layout differs from this build's ([`MapSpec`]) is never reused: a new
/// one is created, filled (cgroups in the old `rdr_enabled` are carried over as refused until
/// the reconciler re-enables them: fail closed), and pinned in its place once the programs
/// that use it run. Programs are verified before any hook changes; a failure while attaching
/// or replacing undoes what this call did, so the hooks are left as they were.
pub fn load_and_attach(
    pins: &PinLayout,
    cgroup_root: &Path,
) -> Result<(Maps, Origin, Option<ProgramLogger>), BpfError> {
    fs::create_dir_all(&pins.root).map_err(|source| BpfError::PinDir {
        path: pins.root.clone(),
        source,
    })?;
    let root_id = cgroup_id(cgroup_root)?;
    let specs = expected_map_specs()?;
    let mut stale: Vec<(&'static str, &'static str)> = Vec::new();
    let mut loader = EbpfLoader::new();
    for (obj_name, pin) in pinned_maps() {
        let path = pins.path(pin);
        let _ = fs::remove_file(pins.path(&format!("{pin}{NEXT}")));
        if path.exists() {
            let want = specs.get(obj_name).copied();
            match pinned_spec(&path) {
                Ok(have) if Some(have) == want => {}
                Ok(have) => {
                    tracing::warn!(map = pin, pinned = %have, expected = %want.map(|w| w.to_string()).unwrap_or_default(),
                        "pinned map has another layout: creating a new one instead of reusing it");
                    stale.push((obj_name, pin));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(map = pin, error = %crate::error_chain(&e), "pinned map unreadable: creating a new one");
                    stale.push((obj_name, pin));
                    continue;
                }
            }
        }
        // Reuses the pinned map when it exists, creates and pins it otherwise.
        loader.map_pin_path(obj_name, path);
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
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(BpfError::Load)?;

    // Every program through the verifier before any hook changes.
    for name in names::PROGRAMS {
        let prog = ebpf
            .program_mut(name)
            .ok_or(BpfError::MissingProgram { name })?;
        let load_err = |source| BpfError::ProgramLoad { name, source };
        if name == names::PROG_SOCKOPS {
            let p: &mut SockOps = prog.try_into().map_err(load_err)?;
            p.load().map_err(load_err)?;
        } else {
            let p: &mut CgroupSockAddr = prog.try_into().map_err(load_err)?;
            p.load().map_err(load_err)?;
        }
    }
    // New maps start with what the old ones knew, before a program can read them.
    for (obj_name, pin) in &stale {
        if *obj_name == names::MAP_ENABLED {
            carry_over_enabled(&mut ebpf, &pins.path(pin))?;
        }
    }

    let mut hooks = HookChange::default();
    if let Err(e) = change_hooks(
        &mut ebpf,
        pins,
        cgroup_root,
        root_id,
        !stale.is_empty(),
        &mut hooks,
    ) {
        hooks.undo();
        return Err(e);
    }
    // Pins, each renamed over the old one: programs, links, then replaced maps.
    let fresh = std::mem::take(&mut hooks.fresh);
    let changed: BTreeSet<usize> = hooks.changed.iter().copied().collect();
    let origin = if changed.is_empty() {
        Origin::Adopted
    } else if hooks.replaced.is_empty() && changed.len() == names::LINKS.len() && !hooks.repaired {
        Origin::Attached
    } else {
        Origin::Upgraded
    };
    for (i, name) in names::PROGRAMS.iter().copied().enumerate() {
        if changed.contains(&i) {
            let prog = ebpf
                .program_mut(name)
                .ok_or(BpfError::MissingProgram { name })?;
            pin_in_place(pins, name, "program", |p| prog.pin(p))?;
        }
    }
    for (i, link) in fresh {
        pin_in_place(pins, names::LINKS[i], "link", |p| link.pin(p).map(drop))?;
    }
    for (obj_name, pin) in &stale {
        let map = ebpf
            .map_mut(obj_name)
            .ok_or(BpfError::MissingMap { name: pin })?;
        pin_in_place(pins, pin, "map", |p| map.pin(p))?;
    }
    hooks.commit();
    if origin != Origin::Adopted {
        for p in remove_unused_pins(pins) {
            tracing::info!(pin = %p.display(), "removed a pin this release does not use");
        }
    }

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

/// Pins an object as `name` in place of whatever is pinned there: at `<name>_next` first,
/// then renamed over the live pin, so the name never refers to nothing or to half an update.
fn pin_in_place<E: std::error::Error + Send + Sync + 'static>(
    pins: &PinLayout,
    name: &str,
    what: &'static str,
    pin: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), BpfError> {
    let next = pins.path(&format!("{name}{NEXT}"));
    let _ = fs::remove_file(&next);
    let err = |path: &Path, e: Box<dyn std::error::Error + Send + Sync>| BpfError::Pin {
        what,
        path: path.to_owned(),
        source: e,
    };
    pin(&next).map_err(|e| err(&next, Box::new(e)))?;
    let live = pins.path(name);
    fs::rename(&next, &live).map_err(|e| err(&live, Box::new(e)))
}

/// Copies the keys of the old `rdr_enabled` (a cgroup id is a u64 in every layout) into the
/// new map as refused: those cgroups stay failed closed until the reconciler, which knows
/// their listeners, writes their real entries.
fn carry_over_enabled(ebpf: &mut Ebpf, old_pin: &Path) -> Result<(), BpfError> {
    let old = sys::obj_get(old_pin).map_err(|e| BpfError::Pin {
        what: "map",
        path: old_pin.to_owned(),
        source: Box::new(e),
    })?;
    let ids = sys::map_keys_u64(old.as_fd()).map_err(|e| BpfError::Pin {
        what: "map",
        path: old_pin.to_owned(),
        source: Box::new(e),
    })?;
    let map = ebpf
        .map_mut(names::MAP_ENABLED)
        .ok_or(BpfError::MissingMap {
            name: names::MAP_ENABLED,
        })?;
    let mut new: HashMap<&mut MapData, u64, CgroupEntry> =
        HashMap::try_from(map).map_err(|source| BpfError::Map {
            map: names::MAP_ENABLED,
            source,
        })?;
    let refuse = CgroupEntry {
        mode: mode::REFUSE,
        ..CgroupEntry::default()
    };
    for id in &ids {
        new.insert(id, refuse, 0).map_err(|source| BpfError::Map {
            map: names::MAP_ENABLED,
            source,
        })?;
    }
    tracing::info!(
        cgroups = ids.len(),
        "carried enabled cgroups over to the new rdr_enabled, refused until re-enabled"
    );
    Ok(())
}

/// What [`change_hooks`] did, so a failure can be undone and success made final.
#[derive(Default)]
struct HookChange {
    /// Links attached by this call, not yet pinned (dropping one detaches it).
    fresh: Vec<(usize, FdLink)>,
    /// Links whose program was replaced: (link, old program, new program), to put back.
    replaced: Vec<(OwnedFd, OwnedFd, OwnedFd)>,
    /// Indexes (into [`names::LINKS`]) of the hooks that now run a new program.
    changed: Vec<usize>,
    /// A defunct link was attached afresh.
    repaired: bool,
}

impl HookChange {
    fn undo(&mut self) {
        // Fresh links detach as they drop.
        self.fresh.clear();
        for (link, old, new) in self.replaced.drain(..) {
            if let Err(e) = sys::link_replace(link.as_fd(), old.as_fd(), new.as_fd()) {
                tracing::error!(error = %e, "could not put a replaced eBPF program back");
            }
        }
    }
    fn commit(&mut self) {
        self.replaced.clear();
    }
}

fn change_hooks(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    cgroup_root: &Path,
    root_id: u64,
    maps_replaced: bool,
    done: &mut HookChange,
) -> Result<(), BpfError> {
    let cgroup = fs::File::open(cgroup_root).map_err(|source| BpfError::Cgroup {
        path: cgroup_root.to_owned(),
        source,
    })?;
    for (i, name) in names::PROGRAMS.iter().copied().enumerate() {
        let prog = ebpf
            .program_mut(name)
            .ok_or(BpfError::MissingProgram { name })?;
        let new_fd: OwnedFd = prog
            .fd()
            .map_err(|source| BpfError::ProgramLoad { name, source })?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| replace_err(name, e))?;
        let attach_err = |source| BpfError::Attach {
            name,
            cgroup: cgroup_root.to_owned(),
            source,
        };
        match link_state(pins, names::LINKS[i], root_id) {
            LinkState::Live { fd, info } => {
                let old = sys::prog_by_id(info.prog_id).map_err(|e| replace_err(name, e))?;
                let (_, old_tag) =
                    sys::prog_id_tag(old.as_fd()).map_err(|e| replace_err(name, e))?;
                let (_, new_tag) =
                    sys::prog_id_tag(new_fd.as_fd()).map_err(|e| replace_err(name, e))?;
                if old_tag == new_tag && !maps_replaced {
                    continue;
                }
                sys::link_replace(fd.as_fd(), new_fd.as_fd(), old.as_fd())
                    .map_err(|e| replace_err(name, e))?;
                done.replaced.push((fd, old, new_fd));
                done.changed.push(i);
            }
            state => {
                if let LinkState::Elsewhere { info } = state {
                    tracing::warn!(
                        link = names::LINKS[i],
                        link_id = info.id,
                        cgroup_id = info.cgroup_id,
                        "pinned link is defunct (its cgroup was removed) or on another cgroup: attaching afresh"
                    );
                    done.repaired = true;
                }
                // bpf_link_create (kernel >= 5.7) rejects attach flags and always attaches in
                // multi mode, so other tools' programs on the hook keep running next to ours.
                let mode = CgroupAttachMode::Single;
                let link = if name == names::PROG_SOCKOPS {
                    let p: &mut SockOps = prog.try_into().map_err(attach_err)?;
                    let id = p.attach(&cgroup, mode).map_err(attach_err)?;
                    FdLink::try_from(p.take_link(id).map_err(attach_err)?)
                } else {
                    let p: &mut CgroupSockAddr = prog.try_into().map_err(attach_err)?;
                    let id = p.attach(&cgroup, mode).map_err(attach_err)?;
                    FdLink::try_from(p.take_link(id).map_err(attach_err)?)
                }
                .map_err(|e| BpfError::Pin {
                    what: "link",
                    path: pins.path(names::LINKS[i]),
                    source: Box::new(e),
                })?;
                done.fresh.push((i, link));
                done.changed.push(i);
            }
        }
    }
    Ok(())
}

fn replace_err(name: &'static str, source: std::io::Error) -> BpfError {
    BpfError::Replace { name, source }
}

/// Re-attaches, from the pinned programs, every link of ours whose cgroup is gone (a defunct
/// link: the cgroup was removed and created again) or that is on another cgroup than
/// `cgroup_root`. A missing pin is left alone: removing it is how `uninstall` detaches us.
/// Returns the links re-attached.
pub fn repair_defunct_links(
    pins: &PinLayout,
    cgroup_root: &Path,
) -> Result<Vec<&'static str>, BpfError> {
    use aya::programs::CgroupSockAddrAttachType as At;
    let root_id = cgroup_id(cgroup_root)?;
    let mut repaired = Vec::new();
    for (i, name) in names::PROGRAMS.iter().copied().enumerate() {
        let link_name = names::LINKS[i];
        let LinkState::Elsewhere { .. } = link_state(pins, link_name, root_id) else {
            continue;
        };
        let cgroup = fs::File::open(cgroup_root).map_err(|source| BpfError::Cgroup {
            path: cgroup_root.to_owned(),
            source,
        })?;
        let attach_err = |source| BpfError::Attach {
            name,
            cgroup: cgroup_root.to_owned(),
            source,
        };
        let mode = CgroupAttachMode::Single;
        let prog_pin = pins.path(name);
        let link = if name == names::PROG_SOCKOPS {
            let mut p = SockOps::from_pin(&prog_pin).map_err(attach_err)?;
            let id = p.attach(&cgroup, mode).map_err(attach_err)?;
            FdLink::try_from(p.take_link(id).map_err(attach_err)?)
        } else {
            let at = if name == names::PROG_CONNECT4 {
                At::Connect4
            } else {
                At::Connect6
            };
            let mut p = CgroupSockAddr::from_pin(&prog_pin, at).map_err(attach_err)?;
            let id = p.attach(&cgroup, mode).map_err(attach_err)?;
            FdLink::try_from(p.take_link(id).map_err(attach_err)?)
        }
        .map_err(|e| BpfError::Pin {
            what: "link",
            path: pins.path(link_name),
            source: Box::new(e),
        })?;
        pin_in_place(pins, link_name, "link", |p| link.pin(p).map(drop))?;
        repaired.push(link_name);
    }
    Ok(repaired)
}

/// Remove every pin: links are detached when their last reference (the pin) goes away.
/// Only our own objects are touched; other programs on the same hooks stay attached.
pub fn uninstall(pins: &PinLayout) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    // Links first (each removal detaches that program), then everything else of ours: every
    // object we pin is named `rdr_…`, this release's and those an older release left.
    let entries = match fs::read_dir(&pins.root) {
        Ok(d) => d
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    let ours = |p: &PathBuf| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("rdr_"))
    };
    let is_link = |p: &PathBuf| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| names::LINKS.iter().any(|l| n.starts_with(l)))
    };
    let (links, rest): (Vec<PathBuf>, Vec<PathBuf>) =
        entries.into_iter().filter(ours).partition(is_link);
    let link_ids: Vec<u32> = links
        .iter()
        .filter_map(|p| sys::obj_get(p).ok())
        .filter(|fd| sys::is_link(fd.as_fd()))
        .filter_map(|fd| sys::cgroup_link_info(fd.as_fd()).ok().map(|i| i.id))
        .collect();
    for p in links.into_iter().chain(rest) {
        match fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    // The kernel frees an unpinned link (detaching its program) in deferred work: done means
    // detached, so wait for it, bounded.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while let Some(id) = link_ids.iter().find(|id| sys::link_exists(**id)) {
        if std::time::Instant::now() > end {
            return Err(std::io::Error::other(format!(
                "link {id} is still attached 5 s after its pin was removed: a process holds it \
                 open (bpftool link show id {id}; a running daemon holds none)"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    match fs::remove_dir(&pins.root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(removed)
}

/// Removes the pins of maps and programs named like ours that this release does not use (an
/// older release's), once the hooks run this release's programs. Returns what was removed.
fn remove_unused_pins(pins: &PinLayout) -> Vec<PathBuf> {
    let used: BTreeSet<String> = names::LINKS
        .iter()
        .chain(names::PROGRAMS.iter())
        .chain(names::MAPS.iter())
        .chain([names::PIN_LOGS].iter())
        .map(|n| (*n).to_owned())
        .collect();
    let Ok(dir) = fs::read_dir(&pins.root) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in dir.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("rdr_") && !used.contains(&name) && fs::remove_file(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
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

/// Whether the attached connect programs know [`mode::AUDIT`]: both use `rdr_audit`. Programs
/// adopted from an older release do not, and would read an audit entry as "refuse"; the
/// daemon then leaves audited workloads out of `rdr_enabled` (they go direct, uncounted)
/// rather than refuse their connections.
pub fn audit_supported(pins: &PinLayout) -> bool {
    let Ok(map) = aya::maps::MapInfo::from_pin(pins.path(names::MAP_AUDIT)) else {
        return false;
    };
    [names::PROG_CONNECT4, names::PROG_CONNECT6]
        .iter()
        .all(|p| {
            aya::programs::ProgramInfo::from_pin(pins.path(p))
                .ok()
                .and_then(|info| info.map_ids().ok().flatten())
                .is_some_and(|ids| ids.contains(&map.id()))
        })
}

/// The audit maps (`rdr_audit`, `rdr_audit_tot`), opened on their own so that reading them
/// (up to [`redirector_common::AUDIT_DESTINATIONS`] entries) never holds the lock the proxy
/// takes on every accept.
pub struct AuditMaps {
    dests: HashMap<MapData, AuditKey, u64>,
    totals: HashMap<MapData, u64, AuditTotals>,
}

/// What the audit maps held at one moment (read entry by entry, so not atomic: a connect
/// during the read may be in one map and not yet in the other).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditSnapshot {
    /// Per audited workload (cgroup id): its totals.
    pub totals: BTreeMap<u64, AuditTotals>,
    /// Per (workload, destination, verdict): connects counted.
    pub dests: Vec<(AuditKey, u64)>,
}

impl AuditMaps {
    /// Opens both from their pins; an error when they are missing (pins of a release that
    /// predates audit mode).
    pub fn open(pins: &PinLayout) -> Result<Self, BpfError> {
        Ok(Self {
            dests: typed!(pins, names::MAP_AUDIT),
            totals: typed!(pins, names::MAP_AUDIT_TOTALS),
        })
    }

    pub fn snapshot(&self) -> AuditSnapshot {
        AuditSnapshot {
            totals: self.totals.iter().filter_map(Result::ok).collect(),
            dests: self.dests.iter().filter_map(Result::ok).collect(),
        }
    }

    /// Deletes the counts of destinations and workloads that are done with (see
    /// `audit::Tracker`). A connect that lands between the read and the delete of a
    /// destination is lost from that destination, never from its workload's totals.
    pub fn forget(&mut self, dests: &[AuditKey], workloads: &[u64]) {
        for k in dests {
            let _ = self.dests.remove(k);
        }
        for id in workloads {
            let _ = self.totals.remove(id);
        }
    }
}

/// What an `rdr_enabled` entry does to its cgroup's connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupMode {
    /// Redirected to the listener on this port in the connecting process's network namespace.
    Redirect { port: u16 },
    /// Refused (EPERM): the workload's listener is not bound (yet).
    Refuse,
    /// Observed: connects go on unchanged and are counted (audit mode).
    Audit,
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
            CgroupMode::Audit => CgroupEntry {
                mode: mode::AUDIT,
                port: 0,
                reserved: 0,
            },
        }
    }
}

impl From<CgroupEntry> for CgroupMode {
    /// As the programs read it: anything but a redirect or an audit refuses.
    fn from(e: CgroupEntry) -> Self {
        match e.mode {
            mode::REDIRECT => CgroupMode::Redirect { port: e.port },
            mode::AUDIT => CgroupMode::Audit,
            _ => CgroupMode::Refuse,
        }
    }
}

/// The socket address an [`OrigDst`] stands for; IPv4-mapped addresses come back as IPv4.
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
    fn cgroup_modes_round_trip_and_unknown_modes_refuse() {
        for m in [
            CgroupMode::Redirect { port: 15301 },
            CgroupMode::Refuse,
            CgroupMode::Audit,
        ] {
            assert_eq!(CgroupMode::from(CgroupEntry::from(m)), m);
        }
        assert_eq!(CgroupEntry::from(CgroupMode::Audit).mode, mode::AUDIT);
        let unknown = CgroupEntry {
            mode: 9,
            port: 0,
            reserved: 0,
        };
        assert_eq!(CgroupMode::from(unknown), CgroupMode::Refuse);
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

#[cfg(test)]
mod layout_tests {
    use super::*;

    /// Every pinned map's layout, as reviewed. A change here means a release whose programs
    /// cannot use the maps an older one pinned: the daemon then recreates the map (see
    /// `load_and_attach`). If only the meaning changed and the sizes did not, rename the map
    /// instead, or the new programs would misread the old entries.
    #[test]
    fn map_layouts_are_the_reviewed_ones() {
        let specs = expected_map_specs().expect("object parses");
        let got: Vec<String> = pinned_maps()
            .map(|(obj, pin)| format!("{pin}: {}", specs[obj]))
            .collect();
        let reviewed = [
            "rdr_enabled: type 1 key 8 value 8 entries 65536 flags 0x0",
            "rdr_skip4: type 11 key 8 value 4 entries 16384 flags 0x1",
            "rdr_skip6: type 11 key 20 value 4 entries 16384 flags 0x1",
            "rdr_pending_v2: type 9 key 8 value 40 entries 65536 flags 0x0",
            "rdr_orig: type 9 key 32 value 32 entries 65536 flags 0x0",
            "rdr_stats: type 6 key 4 value 80 entries 1 flags 0x0",
            "rdr_config: type 2 key 4 value 16 entries 1 flags 0x0",
            "rdr_audit: type 1 key 32 value 8 entries 16384 flags 0x1",
            "rdr_audit_tot: type 1 key 8 value 24 entries 16384 flags 0x1",
            "rdr_logs: type 27 key 0 value 0 entries 131072 flags 0x0",
        ];
        assert_eq!(got, reviewed);
    }
}
