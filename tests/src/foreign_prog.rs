//! A program of "another tool" on the same hook as ours, for the uninstall test: a
//! `cgroup/connect4` program that refuses connects to one port and lets every other one
//! through, attached the pre-link way (`BPF_PROG_ATTACH` with `BPF_F_ALLOW_MULTI`), as many
//! tools still do. Six instructions, loaded with `bpf(2)` directly: no compiler needed.
use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_ATTACH: i64 = 8;
const BPF_PROG_DETACH: i64 = 9;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// The `BPF_PROG_LOAD` part of `union bpf_attr` (up to `expected_attach_type`).
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The `BPF_PROG_ATTACH`/`BPF_PROG_DETACH` part of `union bpf_attr`.
#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

fn bpf<T>(cmd: i64, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is an initialised repr(C) prefix of bpf_attr for `cmd`, alive for the
    // call, and we pass its exact size (the kernel zero-fills the rest); pointers in it point
    // to memory the caller keeps alive.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Attached while it lives; detached when dropped.
pub struct ForeignProg {
    prog: OwnedFd,
    cgroup: File,
    attach_type: u32,
}

/// `ForeignProg` on the connect4 hook.
pub type ForeignConnect4 = ForeignProg;

impl ForeignProg {
    /// Loads `foreign_so`, a sockops program that does nothing, and attaches it to `cgroup`
    /// next to whatever is there (the kernel allows 64 programs per hook and cgroup).
    pub fn sockops_noop(cgroup: &Path) -> io::Result<Self> {
        let prog = [
            // r0 = 1; exit
            Insn {
                code: 0xb7,
                regs: 0,
                off: 0,
                imm: 1,
            },
            Insn {
                code: 0x95,
                regs: 0,
                off: 0,
                imm: 0,
            },
        ];
        Self::load_and_attach(
            cgroup,
            &prog,
            b"foreign_so",
            BPF_PROG_TYPE_SOCK_OPS,
            BPF_CGROUP_SOCK_OPS,
        )
    }

    /// Loads `foreign_c4`, which refuses (EPERM) IPv4 connects to `port`, and attaches it to
    /// `cgroup` next to whatever is there.
    pub fn deny_port(cgroup: &Path, port: u16) -> io::Result<Self> {
        let insn = |code, dst: u8, src: u8, off, imm| Insn {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        };
        let prog = [
            // r2 = ctx->user_port (u32 at offset 24, network byte order)
            insn(0x61, 2, 1, 24, 0),
            // if r2 != port goto allow
            insn(0x55, 2, 0, 2, i32::from(port.to_be())),
            // r0 = 0 (refuse); exit
            insn(0xb7, 0, 0, 0, 0),
            insn(0x95, 0, 0, 0, 0),
            // allow: r0 = 1; exit
            insn(0xb7, 0, 0, 0, 1),
            insn(0x95, 0, 0, 0, 0),
        ];
        Self::load_and_attach(
            cgroup,
            &prog,
            b"foreign_c4",
            BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            BPF_CGROUP_INET4_CONNECT,
        )
    }

    fn load_and_attach(
        cgroup: &Path,
        prog: &[Insn],
        name: &[u8],
        prog_type: u32,
        attach_type: u32,
    ) -> io::Result<Self> {
        let license = b"GPL\0";
        let mut prog_name = [0u8; 16];
        prog_name[..name.len()].copy_from_slice(name);
        let mut load = ProgLoad {
            prog_type,
            insn_cnt: prog.len() as u32,
            insns: prog.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name,
            prog_ifindex: 0,
            expected_attach_type: attach_type,
        };
        let fd = bpf(BPF_PROG_LOAD, &mut load)?;
        // SAFETY: a successful BPF_PROG_LOAD returns a new fd that nothing else owns.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let cgroup = File::open(cgroup)?;
        let mut attach = ProgAttach {
            target_fd: cgroup.as_raw_fd() as u32,
            attach_bpf_fd: prog.as_raw_fd() as u32,
            attach_type,
            attach_flags: BPF_F_ALLOW_MULTI,
        };
        bpf(BPF_PROG_ATTACH, &mut attach)?;
        Ok(Self {
            prog,
            cgroup,
            attach_type,
        })
    }
}

impl Drop for ForeignProg {
    fn drop(&mut self) {
        let mut detach = ProgAttach {
            target_fd: self.cgroup.as_raw_fd() as u32,
            attach_bpf_fd: self.prog.as_raw_fd() as u32,
            attach_type: self.attach_type,
            attach_flags: 0,
        };
        let _ = bpf(BPF_PROG_DETACH, &mut detach);
    }
}
