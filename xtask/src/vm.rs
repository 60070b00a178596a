//! `cargo xtask vm`: the privileged capture scenario (`rdr-vm-scenario run`) on Debian's own
//! cloud kernels, each booted under qemu (TCG: no KVM needed) with a minimal initramfs that
//! carries the built redirector, the test peers and the tools the lab uses; `--all` adds the
//! host kernel (the scenario run directly here).
//!
//! Kernels are downloaded once with `apt-get download` through a private sources list and
//! apt state under `~/.cache/redirector/` (the system's apt configuration is not touched) and
//! kept there, like the kube-apiserver of the Kubernetes tests. Results come back over the
//! serial console: `RDR-STEP`, `RDR-PROG` and `RDR-RESULT` lines, and the VM's exit code
//! (the init writes the scenario's exit code to qemu's `isa-debug-exit` port).
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;

use crate::exec;

#[derive(Args)]
pub struct VmArgs {
    /// Every Debian kernel below and the host kernel.
    #[arg(long)]
    all: bool,
    /// Kernel series to boot (5.10, 6.1, 6.12); repeatable. Default: the oldest supported.
    #[arg(long = "kernel")]
    kernels: Vec<String>,
    /// Do not build first (use the binaries already in target/debug).
    #[arg(long)]
    no_build: bool,
}

/// A Debian cloud kernel: the series and the suite whose `linux-image-cloud-amd64`
/// meta-package points at it.
pub struct Kernel {
    pub series: &'static str,
    pub suite: &'static str,
}

/// Oldest first: the first is the oldest supported kernel, the one `cargo xtask test` boots.
pub const KERNELS: [Kernel; 3] = [
    Kernel {
        series: "5.10",
        suite: "bullseye",
    },
    Kernel {
        series: "6.1",
        suite: "bookworm",
    },
    Kernel {
        series: "6.12",
        suite: "trixie",
    },
];

/// Modules the lab needs that Debian's cloud kernels build as modules, in load order
/// (bridge needs stp, which needs llc). Everything else (cgroup BPF, BTF, netns, IPv6) is
/// built in.
const MODULES: [&str; 4] = ["llc", "stp", "bridge", "veth"];

/// Loaded when the kernel builds kTLS as a module (`CONFIG_TLS=m`): the `tls` upper layer
/// protocol, which the gateway session's records move into, and the AEAD it asks the crypto
/// API for (`gcm(aes)`: the gcm template, ghash, and ctr where that is a module too), with
/// everything they depend on (each module's `depends=`). A node loads these on demand
/// through modprobe; the VM has no modprobe. bullseye's cloud kernel has no kTLS, and the
/// scenario then checks the user-space fallback instead.
const KTLS_MODULES: [&str; 4] = ["tls", "ctr", "ghash-generic", "gcm"];

/// The cache's list of kTLS modules, in load order.
const KTLS_ORDER: &str = "ktls-order";

/// One boot (or the host run) may take this long under TCG before it counts as hung.
const VM_TIMEOUT: Duration = Duration::from_secs(900);

/// The outcome of one kernel's run.
pub struct Outcome {
    pub kernel: String,
    pub programs: Vec<(String, String)>,
    pub steps: Vec<(String, bool, String)>,
    pub passed: bool,
    pub note: String,
    /// The scenario's kTLS line: whether kTLS was expected, and 16 MiB through the gateway
    /// with kTLS allowed and with user-space records, side by side.
    pub ktls: Option<String>,
}

pub fn run(a: VmArgs) -> anyhow::Result<()> {
    if !a.no_build {
        crate::setup::run()?;
        exec::build_all()?;
    }
    let mut series: Vec<&Kernel> = if a.all {
        KERNELS.iter().collect()
    } else if a.kernels.is_empty() {
        vec![&KERNELS[0]]
    } else {
        a.kernels
            .iter()
            .map(|s| {
                KERNELS
                    .iter()
                    .find(|k| k.series == s)
                    .with_context(|| format!("unknown kernel series {s} (5.10, 6.1, 6.12)"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    series.dedup_by_key(|k| k.series);
    let mut outcomes = Vec::new();
    for k in series {
        outcomes.push(boot(k)?);
    }
    if a.all {
        outcomes.push(host()?);
    }
    let table = render(&outcomes);
    print!("{table}");
    let dir = target_dir().join("vm");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("report.txt"), &table)?;
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.kernel.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("scenario failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Boots the oldest supported kernel: `cargo xtask test` calls this after building.
pub fn oldest() -> anyhow::Result<()> {
    let o = boot(&KERNELS[0])?;
    print!("{}", render(std::slice::from_ref(&o)));
    if !o.passed {
        bail!("scenario failed on {}", o.kernel);
    }
    Ok(())
}

fn cache_root() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
        .join(".cache/redirector")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A kernel unpacked in the cache.
struct Fetched {
    release: String,
    vmlinuz: PathBuf,
    config: PathBuf,
    modules: Vec<PathBuf>,
    /// The kTLS modules in load order, when the kernel builds kTLS as a module.
    ktls: Vec<(String, PathBuf)>,
}

/// The kernel was built with kTLS (`CONFIG_TLS=m` or `=y`).
fn has_ktls(config: &Path) -> bool {
    fs::read_to_string(config)
        .unwrap_or_default()
        .lines()
        .any(|l| l == "CONFIG_TLS=m" || l == "CONFIG_TLS=y")
}

/// The kernel builds kTLS as a module.
fn ktls_module(config: &Path) -> bool {
    fs::read_to_string(config)
        .unwrap_or_default()
        .lines()
        .any(|l| l == "CONFIG_TLS=m")
}

/// The kernel of `k`, from the cache or downloaded into it.
fn fetch(k: &Kernel) -> anyhow::Result<Fetched> {
    let dir = cache_root()
        .join("kernels")
        .join(format!("{}-cloud-amd64", k.suite));
    let release_file = dir.join("release");
    if let Ok(release) = fs::read_to_string(&release_file) {
        let release = release.trim().to_owned();
        let config = dir.join(format!("config-{release}"));
        let order = fs::read_to_string(dir.join(KTLS_ORDER)).unwrap_or_default();
        let ktls: Vec<(String, PathBuf)> = order
            .lines()
            .map(|m| (m.to_owned(), dir.join(format!("{m}.ko"))))
            .collect();
        let ktls_cached = !ktls_module(&config) || !ktls.is_empty();
        let f = Fetched {
            vmlinuz: dir.join(format!("vmlinuz-{release}")),
            ktls,
            config,
            modules: MODULES
                .iter()
                .map(|m| dir.join(format!("{m}.ko")))
                .collect(),
            release,
        };
        if f.vmlinuz.is_file()
            && f.config.is_file()
            && ktls_cached
            && f.modules.iter().all(|m| m.is_file())
            && f.ktls.iter().all(|(_, p)| p.is_file())
        {
            return Ok(f);
        }
    }
    let pkg = resolve(k)?;
    println!(
        "vm: downloading {pkg} (Debian {}) into {}",
        k.suite,
        dir.display()
    );
    let work = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    exec::run(
        apt(Command::new("apt-get"))
            .args(["download", &pkg])
            .current_dir(&work),
    )?;
    let deb = fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let root = work.join("root");
    exec::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)?
        .flatten()
        .map(|e| e.path())
        .find(|p| file_name(p).starts_with("vmlinuz-"))
        .context("no vmlinuz in the package")?;
    let release = file_name(&vmlinuz)
        .trim_start_matches("vmlinuz-")
        .to_owned();
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    fs::copy(&vmlinuz, dir.join(format!("vmlinuz-{release}")))?;
    fs::copy(
        boot.join(format!("config-{release}")),
        dir.join(format!("config-{release}")),
    )?;
    // Modules are under lib/modules (bullseye, bookworm) or usr/lib/modules (trixie), and
    // compressed on trixie; busybox insmod takes plain .ko only.
    let mut found = Vec::new();
    find_files(&root, &mut found);
    let ktls_order = if ktls_module(&dir.join(format!("config-{release}"))) {
        // The package has no modules.dep (depmod makes it at install): each module's own
        // `depends=` line says what it needs.
        let by_name: std::collections::HashMap<String, &PathBuf> = found
            .iter()
            .filter(|p| file_name(p).contains(".ko"))
            .map(|p| (module_name(&file_name(p)), p))
            .collect();
        let order = load_order(
            &KTLS_MODULES,
            |m| by_name.contains_key(m),
            |m| Ok(modinfo_depends(&module_bytes(by_name[m])?)),
        )?;
        // Back from the kernel's module names to the files' names in the package.
        order
            .iter()
            .map(|m| {
                let f = file_name(by_name[m.as_str()]);
                f.split(".ko").next().unwrap_or(&f).to_owned()
            })
            .collect()
    } else {
        Vec::new()
    };
    for m in MODULES
        .iter()
        .copied()
        .chain(ktls_order.iter().map(String::as_str))
    {
        let src = found
            .iter()
            .find(|p| {
                let n = file_name(p);
                n == format!("{m}.ko") || n.starts_with(&format!("{m}.ko."))
            })
            .with_context(|| format!("module {m} not in the package"))?;
        fs::write(dir.join(format!("{m}.ko")), module_bytes(src)?)?;
    }
    if !ktls_order.is_empty() {
        fs::write(dir.join(KTLS_ORDER), ktls_order.join("\n") + "\n")?;
    }
    fs::write(&release_file, &release)?;
    let _ = fs::remove_dir_all(&work);
    fetch(k)
}

/// A module's name as the kernel knows it: the file name without `.ko…`, `-` as `_`.
fn module_name(file: &str) -> String {
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// A module file's bytes, decompressed (trixie's are `.ko.xz`; busybox insmod takes plain
/// `.ko` only).
fn module_bytes(src: &Path) -> anyhow::Result<Vec<u8>> {
    let name = file_name(src);
    if !(name.ends_with(".xz") || name.ends_with(".zst")) {
        return Ok(fs::read(src)?);
    }
    let tool = if name.ends_with(".xz") { "xz" } else { "zstd" };
    let out = Command::new(tool)
        .args(["-dc"])
        .arg(src)
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed", src.display());
    }
    Ok(out.stdout)
}

/// The `depends=` entry of a module's `.modinfo` strings: the modules it needs loaded.
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    ko.split(|b| *b == 0)
        .find_map(|field| field.strip_prefix(b"depends="))
        .map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(module_name)
                .collect()
        })
        .unwrap_or_default()
}

/// The modules of `wanted` that exist as modules (`exists`; one built in does not) and every
/// module they depend on (`depends`), in an order that loads each after its dependencies.
fn load_order(
    wanted: &[&str],
    exists: impl Fn(&str) -> bool,
    depends: impl Fn(&str) -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<Vec<String>> {
    fn visit(
        m: &str,
        exists: &dyn Fn(&str) -> bool,
        depends: &dyn Fn(&str) -> anyhow::Result<Vec<String>>,
        out: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        if out.iter().any(|o| o == m) || !exists(m) {
            return Ok(());
        }
        for d in depends(m)? {
            visit(&d, exists, depends, out)?;
        }
        out.push(m.to_owned());
        Ok(())
    }
    let mut out = Vec::new();
    for w in wanted {
        visit(&module_name(w), &exists, &depends, &mut out)?;
    }
    Ok(out)
}

fn find_files(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                find_files(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `apt-get`/`apt-cache` on our private sources list and state (never the system's).
fn apt(mut c: Command) -> Command {
    let d = cache_root().join("apt");
    c.arg("-o")
        .arg(format!(
            "Dir::Etc::sourcelist={}",
            d.join("sources.list").display()
        ))
        .args(["-o", "Dir::Etc::sourceparts=-"])
        .arg("-o")
        .arg(format!("Dir::State::Lists={}", d.join("lists").display()))
        .arg("-o")
        .arg(format!("Dir::Cache={}", d.join("cache").display()))
        .args(["-o", "APT::Sandbox::User=root", "-qq"]);
    c
}

/// The versioned image package the suite's `linux-image-cloud-amd64` depends on.
fn resolve(k: &Kernel) -> anyhow::Result<String> {
    let d = cache_root().join("apt");
    for sub in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(d.join(sub))?;
    }
    let mut list = String::new();
    for s in KERNELS.iter().map(|k| k.suite) {
        writeln!(
            list,
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {s} main"
        )?;
    }
    fs::write(d.join("sources.list"), list)?;
    exec::run(apt(Command::new("apt-get")).arg("update"))?;
    let show =
        exec::output(apt(Command::new("apt-cache")).args(["show", "linux-image-cloud-amd64"]))?;
    for stanza in show.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
        };
        let (Some(version), Some(depends)) = (field("Version:"), field("Depends:")) else {
            continue;
        };
        if version.starts_with(&format!("{}.", k.series)) {
            let pkg = depends
                .split([' ', ','])
                .next()
                .unwrap_or_default()
                .to_owned();
            if pkg.starts_with("linux-image-") {
                return Ok(pkg);
            }
        }
    }
    bail!(
        "Debian {} has no linux-image-cloud-amd64 {}.x",
        k.suite,
        k.series
    )
}

/// A `newc` cpio archive (what the kernel unpacks as the initramfs), built in memory.
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            buf: Vec::new(),
            ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let name = name.trim_start_matches('/');
        self.parents(name);
        self.raw(name, mode, data);
    }

    fn raw(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn parents(&mut self, name: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = name.split('/').collect();
        for p in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            if self.dirs.insert(acc.clone()) {
                let a = acc.clone();
                self.raw(&a, 0o040755, &[]);
            }
        }
    }

    fn dir(&mut self, name: &str) {
        let name = name.trim_start_matches('/').to_owned();
        self.parents(&format!("{name}/x"));
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, data);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        self.raw("TRAILER!!!", 0, &[]);
        self.buf
    }
}

/// The shared libraries `bin` loads (and its interpreter), as `ldd` reports them.
fn libraries(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let o = Command::new("ldd").arg(bin).output()?;
    let text = String::from_utf8_lossy(&o.stdout);
    if text.contains("not a dynamic executable") || !o.status.success() {
        return Ok(Vec::new());
    }
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, r)) => r.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn which(tool: &str) -> anyhow::Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{tool} not found (cargo xtask setup installs it)")
}

/// The init: mounts, modules, the scenario, its exit code to qemu, power off.
const INIT: &str = r#"#!/bin/busybox sh
export PATH=/sbin:/usr/sbin:/bin:/usr/bin:/bb
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mount -t bpf bpf /sys/fs/bpf
mkdir -p /dev/shm && mount -t tmpfs shm /dev/shm
for m in llc stp bridge veth; do
  insmod /modules/$m.ko || echo "RDR-VM insmod $m failed"
done
for m in $(cat /modules/ktls-order); do
  insmod /modules/$m.ko || echo "RDR-VM insmod $m failed"
done
/sbin/ip link set lo up
echo "RDR-VM booted $(uname -r)"
RDR_BIN_REDIRECTOR=/bin/redirector RDR_BIN_RDR_TESTSRV=/bin/rdr-testsrv \
  RDR_BIN_RDR_GATEWAY_SIM=/bin/rdr-gateway-sim CI=true RUST_BACKTRACE=0 \
  /bin/rdr-vm-scenario run
rc=$?
echo "RDR-VM-EXIT $rc"
# isa-debug-exit: qemu exits with (value << 1) | 1.
/bin/rdr-vm-scenario exit-qemu $rc
poweroff -f
"#;

/// Builds the initramfs for `k` under target/vm/.
fn initramfs(k: &Fetched) -> anyhow::Result<PathBuf> {
    let dir = target_dir().join("vm");
    fs::create_dir_all(&dir)?;
    let bins = target_dir().join("debug");
    let mut c = Cpio::new();
    for d in ["proc", "sys", "dev", "tmp", "run", "etc/netns", "root"] {
        c.dir(d);
    }
    c.file("init", 0o755, INIT.as_bytes());
    // `proxy`: the user Debian's Squid runs as (the tests' Squid fixture switches to it).
    c.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nproxy:x:13:13:proxy:/bin:/usr/sbin/nologin\n",
    );
    c.file("etc/group", 0o644, b"root:x:0:\nproxy:x:13:\n");
    c.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n");
    let busybox = which("busybox")?;
    c.file("bin/busybox", 0o755, &fs::read(&busybox)?);
    let applets = exec::output(Command::new(&busybox).arg("--list"))?;
    for a in applets.lines().filter(|a| !a.is_empty()) {
        c.symlink(&format!("bb/{a}"), "/bin/busybox");
    }
    // Host tools at their own paths; the lab calls `ip` and `sh` by name, and busybox's own
    // `ip` applet lacks netns and veth: iproute2 and dash come first on PATH.
    let mut elfs: Vec<(String, PathBuf, bool)> = vec![
        ("bin/sh".into(), which("dash")?, false),
        ("sbin/ip".into(), which("ip")?, false),
        ("usr/sbin/bpftool".into(), which("bpftool")?, false),
        ("usr/bin/nsenter".into(), which("nsenter")?, false),
        // The enterprise proxy of the gateway step, and what its fixture checks for.
        ("usr/sbin/squid".into(), which("squid")?, false),
        ("usr/bin/openssl".into(), which("openssl")?, false),
    ];
    for b in [
        "redirector",
        "rdr-testsrv",
        "rdr-gateway-sim",
        "rdr-vm-scenario",
    ] {
        let p = bins.join(b);
        if !p.is_file() {
            bail!("{} not built", p.display());
        }
        elfs.push((format!("bin/{b}"), p, true));
    }
    let mut libs = BTreeSet::new();
    for (at, src, strip) in &elfs {
        let data = if *strip {
            // Debug info is most of a debug build's size; the VM needs none of it.
            let tmp = dir.join(format!("{}.stripped", file_name(src)));
            exec::run(
                Command::new("objcopy")
                    .arg("--strip-debug")
                    .arg(src)
                    .arg(&tmp),
            )?;
            let d = fs::read(&tmp)?;
            let _ = fs::remove_file(&tmp);
            d
        } else {
            fs::read(src)?
        };
        c.file(at, 0o755, &data);
        libs.extend(libraries(src)?);
    }
    // Squid's error pages, MIME table and icons (errors/ is a link into squid-langpack), and
    // its helper programs (unlinkd, basic_ncsa_auth).
    for d in [
        "/usr/share/squid",
        "/usr/share/squid-langpack",
        "/usr/lib/squid",
    ] {
        for exe in tree(&mut c, Path::new(d))? {
            libs.extend(libraries(&exe)?);
        }
    }
    for l in libs {
        let data = fs::read(&l).with_context(|| format!("reading {}", l.display()))?;
        c.file(&l.to_string_lossy(), 0o755, &data);
    }
    c.file(
        &format!("boot/config-{}", k.release),
        0o644,
        &fs::read(&k.config)?,
    );
    for (m, p) in MODULES.iter().zip(&k.modules) {
        c.file(&format!("modules/{m}.ko"), 0o644, &fs::read(p)?);
    }
    for (m, p) in &k.ktls {
        c.file(&format!("modules/{m}.ko"), 0o644, &fs::read(p)?);
    }
    let order: Vec<&str> = k.ktls.iter().map(|(m, _)| m.as_str()).collect();
    c.file(
        "modules/ktls-order",
        0o644,
        (order.join(" ") + "\n").as_bytes(),
    );
    let out = dir.join(format!("initramfs-{}.cpio", k.release));
    fs::write(&out, c.finish())?;
    Ok(out)
}

/// Copies the directory `dir` (files, directories, symbolic links as links) to the same path;
/// returns the executables in it (their libraries go in too).
fn tree(c: &mut Cpio, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    let mut exes = Vec::new();
    c.dir(&dir.to_string_lossy());
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let p = e.path();
        let at = p.to_string_lossy().into_owned();
        let t = e.file_type()?;
        if t.is_symlink() {
            c.symlink(&at, &fs::read_link(&p)?.to_string_lossy());
        } else if t.is_dir() {
            exes.extend(tree(c, &p)?);
        } else {
            let mode = e.metadata()?.permissions().mode() & 0o7777;
            if mode & 0o111 != 0 {
                exes.push(p.clone());
            }
            c.file(&at, mode, &fs::read(&p)?);
        }
    }
    Ok(exes)
}

/// Boots `k` with the scenario as init and reads its verdict from the console.
fn boot(k: &Kernel) -> anyhow::Result<Outcome> {
    let f = fetch(k)?;
    let initrd = initramfs(&f)?;
    println!(
        "vm: booting {} under qemu (TCG) with {}",
        f.release,
        initrd.display()
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "1536", "-smp", "2"])
        .args(["-nic", "none", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-kernel")
        .arg(&f.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(if has_ktls(&f.config) {
            // The scenario then requires kTLS to be used, so a module that failed to load
            // fails the run instead of passing on the user-space fallback.
            "console=ttyS0 panic=-1 quiet rdr.ktls=1"
        } else {
            "console=ttyS0 panic=-1 quiet"
        });
    let (lines, code) = supervise(cmd, &format!("[{}] ", k.series))?;
    // The init writes the scenario's exit code e to isa-debug-exit: qemu exits 2e+1.
    let scenario_rc = code.filter(|c| c % 2 == 1).map(|c| c >> 1);
    let mut o = parse(&f.release, &lines);
    if scenario_rc != Some(0) {
        o.passed = false;
        if o.note.is_empty() {
            o.note = format!("VM exit {code:?}");
        }
    }
    Ok(o)
}

/// The scenario on the host kernel.
fn host() -> anyhow::Result<Outcome> {
    let mut cmd = Command::new(target_dir().join("debug/rdr-vm-scenario"));
    cmd.arg("run").env("CI", "true");
    let (lines, code) = supervise(cmd, "[host] ")?;
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    let mut o = parse(&format!("{release} (host)"), &lines);
    if code != Some(0) {
        o.passed = false;
    }
    Ok(o)
}

/// Runs `cmd`, echoing its output with `prefix`, killing it after [`VM_TIMEOUT`]; returns
/// its lines and exit code (None when killed).
fn supervise(mut cmd: Command, prefix: &str) -> anyhow::Result<(Vec<String>, Option<i32>)> {
    let line = exec::describe(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    let pid = child.id();
    let done = Arc::new(Mutex::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let end = Instant::now() + VM_TIMEOUT;
            while Instant::now() < end {
                if *done.lock().expect("flag") {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            eprintln!("vm: no verdict after {VM_TIMEOUT:?}; killing pid {pid}");
            // SAFETY: kill(2) on the child we spawned and have not reaped (the reader
            // below reaps it only after its stdout closes, which this kill causes).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        })
    };
    let mut lines = Vec::new();
    let stdout = child.stdout.take().context("stdout")?;
    for l in BufReader::new(stdout).split(b'\n') {
        let l = String::from_utf8_lossy(&l?)
            .trim_end_matches('\r')
            .to_owned();
        println!("{prefix}{l}");
        lines.push(l);
    }
    let status = child.wait()?;
    *done.lock().expect("flag") = true;
    let _ = watchdog.join();
    Ok((lines, status.code()))
}

fn parse(kernel: &str, lines: &[String]) -> Outcome {
    let mut o = Outcome {
        kernel: kernel.to_owned(),
        programs: Vec::new(),
        steps: Vec::new(),
        passed: false,
        note: String::new(),
        ktls: None,
    };
    for l in lines {
        if let Some(at) = l.find("RDR-VM ktls ") {
            o.ktls = Some(l[at + "RDR-VM ktls ".len()..].trim().to_owned());
        }
        // Console lines can carry kernel messages before the marker.
        let Some(at) = l.find("RDR-") else { continue };
        let mut w = l[at..].splitn(4, ' ');
        match (w.next(), w.next(), w.next(), w.next()) {
            (Some("RDR-PROG"), Some(name), Some(v), _) => {
                o.programs.push((name.to_owned(), v.to_owned()))
            }
            (Some("RDR-STEP"), Some(name), Some(v), why) => o.steps.push((
                name.to_owned(),
                v == "PASS",
                why.unwrap_or_default().to_owned(),
            )),
            (Some("RDR-RESULT"), Some(v), _, _) => o.passed = v == "PASS",
            _ => {}
        }
    }
    if o.steps.is_empty() {
        o.note = "no scenario output (boot failed?)".into();
    }
    o
}

fn render(outcomes: &[Outcome]) -> String {
    let mut s = String::from("\nkernel matrix (cargo xtask vm)\n");
    for o in outcomes {
        let _ = writeln!(
            s,
            "{}: {}{}",
            o.kernel,
            if o.passed { "PASS" } else { "FAIL" },
            if o.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", o.note)
            }
        );
        let progs: Vec<String> = o.programs.iter().map(|(n, v)| format!("{n} {v}")).collect();
        let _ = writeln!(s, "  programs: {}", progs.join(", "));
        if let Some(k) = &o.ktls {
            let _ = writeln!(s, "  ktls: {k}");
        }
        for (name, ok, why) in &o.steps {
            let _ = writeln!(
                s,
                "  {:<4} {name}{}",
                if *ok { "pass" } else { "FAIL" },
                if why.is_empty() {
                    String::new()
                } else {
                    format!(": {why}")
                }
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dependencies load first, each module once, and a wanted module the kernel builds in
    /// (no such file) is skipped; `depends=` is read from the `.modinfo` strings.
    #[test]
    fn ktls_modules_load_after_their_dependencies() {
        let info = |deps: &str| format!("license=GPL\0depends={deps}\0intree=Y\0").into_bytes();
        let files: std::collections::HashMap<&str, Vec<u8>> = [
            ("tls", info("")),
            ("gcm", info("aead")),
            ("ghash_generic", info("gf128mul")),
            ("gf128mul", info("")),
            ("aead", info("")),
        ]
        .into();
        let order = load_order(
            &KTLS_MODULES,
            |m| files.contains_key(m),
            |m| Ok(modinfo_depends(&files[m])),
        )
        .expect("order");
        assert_eq!(order, ["tls", "gf128mul", "ghash_generic", "aead", "gcm"]);
        assert_eq!(module_name("ghash-generic.ko.xz"), "ghash_generic");
    }

    #[test]
    fn parse_reads_markers_after_console_noise() {
        let lines: Vec<String> = [
            "[    1.2] random: crng init done",
            "RDR-PROG rdr_connect4 accepted",
            "RDR-STEP redirect-ipv4 PASS",
            "[    3.4] foo RDR-STEP server-first FAIL status=1 stdout=x",
            "RDR-RESULT FAIL",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let o = parse("5.10", &lines);
        assert_eq!(o.programs, vec![("rdr_connect4".into(), "accepted".into())]);
        assert_eq!(o.steps.len(), 2);
        assert!(o.steps[0].1);
        assert!(!o.steps[1].1);
        assert_eq!(o.steps[1].2, "status=1 stdout=x");
        assert!(!o.passed);
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::new();
        c.file("a/b/c", 0o644, b"xyz");
        let b = c.finish();
        assert_eq!(b.len() % 4, 0);
        let text = String::from_utf8_lossy(&b);
        // a, a/b, a/b/c, trailer.
        assert_eq!(text.matches("070701").count(), 4);
        assert!(text.contains("TRAILER!!!"));
    }
}
