//! The few `bpf(2)` commands aya does not offer for cgroup links: open a pin as a raw fd, read
//! a link's or a program's info, and replace a link's program in place (`BPF_LINK_UPDATE`).
//! Struct layouts come from aya-obj's generated kernel bindings.
use std::{
    ffi::CString,
    io,
    mem::{size_of, zeroed},
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya_obj::generated::{BPF_F_REPLACE, bpf_attr, bpf_cmd, bpf_link_info, bpf_prog_info};

/// One `bpf(2)` call. `attr` is fully initialised (zeroed, then the command's fields set).
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised bpf_attr that outlives the call, and we pass
    // its exact size; every pointer stored in it (paths, info buffers) points to memory the
    // caller keeps alive and large enough for the lengths it set.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a C union of plain integer structs; all zeroes is valid for every
    // member and is what the kernel requires of unused bytes.
    unsafe { zeroed() }
}

/// `BPF_OBJ_GET`: a new fd on the object pinned at `path` (a link, a program or a map).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a pin path"))?;
    let mut attr = zeroed_attr();
    // Writing plain integer fields of the obj_pin/obj_get member of a zeroed union.
    attr.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    // SAFETY: a successful BPF_OBJ_GET returns a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_GET_INFO_BY_FD` into a zeroed `T` (a kernel info struct).
fn obj_info<T: Copy>(fd: BorrowedFd<'_>) -> io::Result<T> {
    // SAFETY: T is one of the kernel's plain-integer info structs; zeroes are valid.
    let mut info: T = unsafe { zeroed() };
    let mut attr = zeroed_attr();
    // Writing plain integer fields of the `info` member of a zeroed union; the
    // buffer is `info`, of the length we state, alive until `bpf` returns.
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = size_of::<T>() as u32;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// Whether `fd` is a BPF link (not a map or a program pinned under a link's name): the
/// kernel names a link fd's anonymous inode `bpf-link` (`bpf_link` when just created).
pub fn is_link(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|t| {
            let t = t.as_os_str().as_bytes();
            t == b"anon_inode:bpf-link" || t == b"anon_inode:bpf_link"
        })
        .unwrap_or(false)
}

/// What the kernel says about one of our cgroup links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLink {
    pub id: u32,
    pub prog_id: u32,
    /// The cgroup it is attached to; 0 once that cgroup is gone (the link is defunct).
    pub cgroup_id: u64,
}

pub fn cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLink> {
    let info: bpf_link_info = obj_info(link)?;
    Ok(CgroupLink {
        id: info.id,
        prog_id: info.prog_id,
        // SAFETY: reading the cgroup member of the union; the kernel fills it for cgroup
        // links, and for any other link type it is plain integers (zeroed by us).
        cgroup_id: unsafe { info.__bindgen_anon_1.cgroup.cgroup_id },
    })
}

/// A loaded program's id and tag (a hash of its instructions, map references left out).
pub fn prog_id_tag(prog: BorrowedFd<'_>) -> io::Result<(u32, [u8; 8])> {
    let info: bpf_prog_info = obj_info(prog)?;
    Ok((info.id, info.tag))
}

/// `BPF_PROG_GET_FD_BY_ID`.
pub fn prog_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = zeroed_attr();
    // Writing a plain integer field of the get-by-id member of a zeroed union.
    attr.__bindgen_anon_6.__bindgen_anon_1.prog_id = id;
    let fd = bpf(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: a successful call returns a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE` with `BPF_F_REPLACE`: the link runs `new` from the next hook
/// invocation on, with no moment where the hook runs neither program. Fails (EPERM) if the
/// link no longer runs `old`, so two daemons racing cannot undo each other's update.
pub fn link_replace(
    link: BorrowedFd<'_>,
    new: BorrowedFd<'_>,
    old: BorrowedFd<'_>,
) -> io::Result<()> {
    let mut attr = zeroed_attr();
    // Writing plain integer fields of the link_update member of a zeroed union.
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = new.as_raw_fd() as u32;
    attr.link_update.flags = BPF_F_REPLACE;
    attr.link_update.__bindgen_anon_2.old_prog_fd = old.as_raw_fd() as u32;
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Every key of a hash map whose keys are u64 (`BPF_MAP_GET_NEXT_KEY`), whatever its value
/// layout: how a map of an older layout is read during an upgrade.
pub fn map_keys_u64(map: BorrowedFd<'_>) -> io::Result<Vec<u64>> {
    let mut keys = Vec::new();
    let mut key: Option<u64> = None;
    loop {
        let mut next: u64 = 0;
        let mut attr = zeroed_attr();
        // Writing plain integer fields of the element member of a zeroed union; `key`
        // (when set) and `next` are u64s alive until `bpf` returns, the map's key size.
        attr.__bindgen_anon_2.map_fd = map.as_raw_fd() as u32;
        attr.__bindgen_anon_2.key = key.as_ref().map_or(0, |k| std::ptr::from_ref(k) as u64);
        attr.__bindgen_anon_2.__bindgen_anon_1.next_key = std::ptr::from_mut(&mut next) as u64;
        match bpf(bpf_cmd::BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                keys.push(next);
                key = Some(next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
        if keys.len() > 1 << 20 {
            return Err(io::Error::other(
                "map has more keys than any map of ours can",
            ));
        }
    }
}

/// Whether a link with this id still exists (`BPF_LINK_GET_FD_BY_ID`): a link is freed, and
/// its program detached, shortly after its last reference goes (the kernel defers the work).
pub fn link_exists(id: u32) -> bool {
    let mut attr = zeroed_attr();
    // Writing a plain integer field of the get-by-id member of a zeroed union.
    attr.__bindgen_anon_6.__bindgen_anon_1.link_id = id;
    match bpf(bpf_cmd::BPF_LINK_GET_FD_BY_ID, &mut attr) {
        Ok(fd) => {
            // SAFETY: a successful call returns a new fd that nothing else owns; dropped here.
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            true
        }
        Err(_) => false,
    }
}
