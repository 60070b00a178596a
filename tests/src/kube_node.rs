//! A kubelet stand-in on top of [`Lab`]: pods laid out the way a kubelet and a container
//! runtime lay them out, so the daemon's `--kubernetes` mode finds them as it would on a node.
//!
//! For each pod (UID, QoS class, cgroup driver) [`KubeNode::add_pod`] does what the kubelet
//! and the runtime do before the first app container starts:
//!
//! 1. creates the pod cgroup under the lab's cgroup root, with every level above it
//!    (`kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice` for the systemd
//!    driver, `kubepods/<qos>/pod<uid>` for cgroupfs; Guaranteed pods sit directly under
//!    `kubepods.slice` / `kubepods`);
//! 2. creates the sandbox network namespace and plugs it into the node with a veth (the
//!    CNI's job): pod `198.51.100.(128+4s+2)/30`, node side `.(128+4s+1)/30` for slot `s`
//!    (0..32), i.e. the upper half 198.51.100.128/25, disjoint from `Lab::add_pod`'s
//!    `198.51.100.(4k+1..2)` for small `k`. Like lab pods, a kube pod has **no default
//!    route** and no other route: anything beyond its /30 is reachable only through the
//!    redirector;
//! 3. starts the sandbox's pause process in a sandbox container cgroup below the pod cgroup
//!    (`cri-containerd-<id>.scope` for systemd, `<id>` for cgroupfs), inside that netns.
//!
//! App containers are child cgroups of the pod cgroup too ([`KubePod::container_cmd`]).
//! Deleting a pod kills its processes (by pid, through a pidfd taken only after checking the
//! pid still belongs to the pod's cgroup), removes its cgroups and its network (veth and
//! netns). Drop deletes every pod and the kubepods levels, then the [`Lab`] it owns; this
//! also runs on panic.
//!
//! The cgroup layout is written out here independently of the daemon's `kubelet.rs`, so a
//! test using it checks the daemon against the kubelet's layout, not against itself.
use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use crate::lab::{Lab, Proc};

/// First address of the kube pods' range (198.51.100.128/25, one /30 per pod).
pub const POD_NET_BASE: u8 = 128;
/// How many pods can exist at once (32 /30s in a /25).
pub const POD_SLOTS: u8 = 32;

static CONTAINER_IDS: AtomicU64 = AtomicU64::new(1);

/// The chained CNI plugin as the runtime runs it: the plugin binary with the CNI
/// environment, the network configuration (with the previous plugin's result) on stdin.
pub struct CniPlugin {
    pub bin: PathBuf,
    pub socket: PathBuf,
}

impl CniPlugin {
    /// `CNI_COMMAND=ADD`, retried (as the kubelet retries a sandbox) while the plugin says
    /// "try again later" (code 11), for at most a minute. Panics on any other failure.
    pub fn add(
        &self,
        netns: &str,
        namespace: &str,
        name: &str,
        uid: &str,
        before_retry: &mut dyn FnMut(),
    ) {
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"lab","type":"egress-redirector","socket":"{}","prevResult":{{"cniVersion":"1.0.0","interfaces":[{{"name":"eth0","sandbox":"{netns}"}}]}}}}"#,
            self.socket.display()
        );
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let mut child = Command::new(&self.bin)
                .env_clear()
                .env("CNI_COMMAND", "ADD")
                .env("CNI_CONTAINERID", format!("sandbox-{uid}"))
                .env("CNI_NETNS", netns)
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", "/opt/cni/bin")
                .env(
                    "CNI_ARGS",
                    format!(
                        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=sandbox-{uid};K8S_POD_UID={uid}"
                    ),
                )
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run the CNI plugin");
            std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), conf.as_bytes())
                .expect("CNI config to the plugin");
            let o = child.wait_with_output().expect("CNI plugin");
            let stdout = String::from_utf8_lossy(&o.stdout);
            if o.status.success() {
                assert!(
                    stdout.contains("eth0"),
                    "previous result not passed on: {stdout}"
                );
                return;
            }
            assert!(
                stdout.contains("\"code\":11") && Instant::now() < end,
                "CNI ADD for {namespace}/{name} failed: {stdout} {}",
                String::from_utf8_lossy(&o.stderr)
            );
            before_retry();
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The kubelet's cgroup driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// A pod's QoS class (`status.qosClass`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    /// The value of `status.qosClass`.
    pub fn as_str(self) -> &'static str {
        match self {
            Qos::Guaranteed => "Guaranteed",
            Qos::Burstable => "Burstable",
            Qos::BestEffort => "BestEffort",
        }
    }
}

/// The pod cgroup relative to the kubelet's cgroup root, as the kubelet names it.
pub fn pod_cgroup_rel(driver: Driver, qos: Qos, uid: &str) -> PathBuf {
    match (driver, qos) {
        (Driver::Systemd, Qos::Guaranteed) => PathBuf::from(format!(
            "kubepods.slice/kubepods-pod{}.slice",
            uid.replace('-', "_")
        )),
        (Driver::Systemd, Qos::Burstable) => PathBuf::from(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        )),
        (Driver::Systemd, Qos::BestEffort) => PathBuf::from(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        )),
        (Driver::Cgroupfs, Qos::Guaranteed) => PathBuf::from(format!("kubepods/pod{uid}")),
        (Driver::Cgroupfs, Qos::Burstable) => PathBuf::from(format!("kubepods/burstable/pod{uid}")),
        (Driver::Cgroupfs, Qos::BestEffort) => {
            PathBuf::from(format!("kubepods/besteffort/pod{uid}"))
        }
    }
}

/// A container's cgroup directory name below the pod cgroup, as containerd names it.
pub fn container_cgroup_name(driver: Driver, id: &str) -> String {
    match driver {
        Driver::Systemd => format!("cri-containerd-{id}.scope"),
        Driver::Cgroupfs => id.to_owned(),
    }
}

/// A made-up pod UID in the API server's format (a version-4 UUID), unique per `n`.
pub fn pod_uid(n: u64) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        n & 0xffff_ffff,
        (n >> 32) & 0xffff,
        n & 0xfff,
        (n >> 12) & 0xfff,
        n & 0xffff_ffff_ffff
    )
}

/// A fresh 64-hex-digit container id, as containerd makes them.
fn container_id() -> String {
    let n = CONTAINER_IDS.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}{:048x}", std::process::id(), n)
}

/// `program` run inside netns `netns` and cgroup `cgroup`, no proxy variables.
fn cmd_in(netns: &str, cgroup: &Path, program: &str) -> Command {
    crate::lab::in_pod_cmd(netns, cgroup, program)
}

/// One pod on the stand-in node.
pub struct KubePod {
    pub uid: String,
    pub driver: Driver,
    pub qos: Qos,
    /// The sandbox network namespace (`ip netns` name).
    pub netns: String,
    /// The pod cgroup (what the daemon enables).
    pub cgroup: PathBuf,
    /// The sandbox container's cgroup (holds the pause process).
    pub sandbox_cgroup: PathBuf,
    /// The pod's address and the node's address on the pod's /30.
    pub v4: Ipv4Addr,
    pub node_v4: Ipv4Addr,
    veth: String,
    slot: u8,
    pause: Option<Proc>,
    containers: Vec<PathBuf>,
}

impl KubePod {
    /// The pod cgroup's id (its inode number, what the daemon puts into `rdr_enabled`).
    pub fn cgroup_id(&self) -> u64 {
        fs::metadata(&self.cgroup)
            .map(|m| m.ino())
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.cgroup.display()))
    }

    pub fn pause_pid(&self) -> u32 {
        self.pause.as_ref().map(Proc::pid).unwrap_or(0)
    }

    /// Creates a new app container (a child cgroup of the pod cgroup, as the runtime does)
    /// and returns a command that runs `program` in it, in the pod's netns, with no proxy
    /// variable. The caller owns the process; pod deletion kills it if it still runs.
    pub fn container_cmd(&mut self, program: &str) -> Command {
        let i = self.create_container();
        self.exec_cmd(i, program)
    }

    /// Like `kubectl exec`: `program` in existing app container number `container` (in the
    /// order [`KubePod::container_cmd`] created them), in the pod's netns.
    pub fn exec_cmd(&self, container: usize, program: &str) -> Command {
        let dir = self
            .containers
            .get(container)
            .unwrap_or_else(|| panic!("pod {} has no container {container}", self.uid));
        cmd_in(&self.netns, dir, program)
    }

    /// Creates an app container cgroup with no process yet (the runtime's CreateContainer);
    /// returns its index for [`KubePod::exec_cmd`].
    pub fn create_container(&mut self) -> usize {
        let dir = self
            .cgroup
            .join(container_cgroup_name(self.driver, &container_id()));
        fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("create container cgroup {}: {e}", dir.display()));
        self.containers.push(dir);
        self.containers.len() - 1
    }

    /// The container cgroups created so far.
    pub fn containers(&self) -> &[PathBuf] {
        &self.containers
    }
}

/// The kubelet stand-in. Owns the [`Lab`] so that its pods are always torn down first.
pub struct KubeNode {
    pub lab: Lab,
    /// When set, the runtime stand-in runs this CNI plugin chain step for every new pod,
    /// after the sandbox network is up and before any process starts in the pod, as
    /// containerd and CRI-O do; an ADD that fails is retried, as the kubelet does.
    pub cni: Option<CniPlugin>,
    pods: BTreeMap<String, KubePod>,
    free_slots: Vec<u8>,
    next: u64,
    /// kubepods levels this node created, in creation order (removed in reverse).
    levels: Vec<PathBuf>,
}

impl KubeNode {
    pub fn new(lab: Lab) -> KubeNode {
        KubeNode {
            lab,
            cni: None,
            pods: BTreeMap::new(),
            free_slots: (0..POD_SLOTS).rev().collect(),
            next: 0,
            levels: Vec::new(),
        }
    }

    pub fn pod(&self, uid: &str) -> &KubePod {
        self.pods
            .get(uid)
            .unwrap_or_else(|| panic!("no pod {uid} on the node"))
    }

    pub fn pod_mut(&mut self, uid: &str) -> &mut KubePod {
        self.pods
            .get_mut(uid)
            .unwrap_or_else(|| panic!("no pod {uid} on the node"))
    }

    pub fn pods(&self) -> impl Iterator<Item = &KubePod> {
        self.pods.values()
    }

    /// Creates the directory and every missing level above it, remembering the levels
    /// (not `leaf`) for removal at drop.
    fn create_levels(&mut self, leaf: &Path) {
        let root = self.lab.cg_root.clone();
        let rel = leaf
            .strip_prefix(&root)
            .expect("pod cgroup below the cgroup root");
        let mut dir = root;
        let parts: Vec<_> = rel.components().collect();
        for (i, part) in parts.iter().enumerate() {
            dir.push(part);
            if dir.is_dir() {
                continue;
            }
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("create cgroup {}: {e}", dir.display()));
            if i + 1 < parts.len() {
                self.levels.push(dir.clone());
            }
        }
    }

    /// Sets up pod `uid` as the kubelet and the runtime would (module docs: cgroup, network,
    /// pause process) and returns it. Returns once the pause process is in its cgroup.
    pub fn add_pod(&mut self, uid: &str, qos: Qos, driver: Driver) -> &mut KubePod {
        self.add_named_pod(uid, qos, driver, "", "")
    }

    /// [`KubeNode::add_pod`] for pod `namespace/name` (what the CNI plugin is told).
    pub fn add_named_pod(
        &mut self,
        uid: &str,
        qos: Qos,
        driver: Driver,
        namespace: &str,
        name: &str,
    ) -> &mut KubePod {
        self.add_named_pod_with(uid, qos, driver, namespace, name, &mut || {})
    }

    /// [`KubeNode::add_named_pod`], calling `before_retry` each time the CNI plugin said
    /// "try again later" (e.g. to start the daemon it was waiting for).
    pub fn add_named_pod_with(
        &mut self,
        uid: &str,
        qos: Qos,
        driver: Driver,
        namespace: &str,
        name: &str,
        before_retry: &mut dyn FnMut(),
    ) -> &mut KubePod {
        assert!(
            !self.pods.contains_key(uid),
            "pod {uid} already on the node"
        );
        let slot = self
            .free_slots
            .pop()
            .expect("no free pod address slot (at most 32 kube pods at once)");
        self.next += 1;
        let n = self.next;
        let (id, node) = (self.lab.id.clone(), self.lab.node.clone());

        // 1. The pod cgroup and the levels above it.
        let cgroup = self.lab.cg_root.join(pod_cgroup_rel(driver, qos, uid));
        self.create_levels(&cgroup);

        // 2. Sandbox netns + CNI: veth to the node, a /30, no route beyond it.
        let netns = format!("{id}-k{n}");
        let veth = format!("{id}k{n}");
        assert!(veth.len() <= 15, "interface name {veth} too long");
        let base = POD_NET_BASE + 4 * slot;
        let node_v4 = Ipv4Addr::new(198, 51, 100, base + 1);
        let v4 = Ipv4Addr::new(198, 51, 100, base + 2);
        let pod = KubePod {
            uid: uid.to_owned(),
            driver,
            qos,
            netns: netns.clone(),
            sandbox_cgroup: cgroup.join(container_cgroup_name(driver, &container_id())),
            cgroup,
            v4,
            node_v4,
            veth: veth.clone(),
            slot,
            pause: None,
            containers: Vec::new(),
        };
        let net = format!(
            "ip netns add {netns} && ip -n {netns} link set lo up && \
             ip link add {veth} netns {node} type veth peer name eth0 netns {netns} && \
             ip -n {node} addr add {node_v4}/30 dev {veth} && ip -n {node} link set {veth} up && \
             ip -n {netns} addr add {v4}/30 dev eth0 && ip -n {netns} link set eth0 up"
        );
        // Registered first, so that a half-made pod is still torn down (Drop).
        self.pods.insert(uid.to_owned(), pod);
        if let Err(e) = sh_status(&net) {
            panic!("pod {uid} network: {e}");
        }
        if let Some(cni) = &self.cni {
            cni.add(
                &format!("/run/netns/{netns}"),
                namespace,
                name,
                uid,
                before_retry,
            );
        }
        let pod = self.pods.get_mut(uid).expect("just inserted");

        // 3. The sandbox container with its pause process.
        fs::create_dir(&pod.sandbox_cgroup)
            .unwrap_or_else(|e| panic!("create sandbox cgroup: {e}"));
        let log = self.lab.dir.join(format!("kpause{n}.log"));
        let child = cmd_in(&pod.netns, &pod.sandbox_cgroup, "sleep")
            .arg("1000000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("pause log"))
            .spawn()
            .expect("spawn pause");
        pod.pause = Some(Proc {
            name: format!("kpause{n}"),
            child,
            log,
        });
        let pid = pod.pause_pid().to_string();
        let procs = pod.sandbox_cgroup.join("cgroup.procs");
        let end = Instant::now() + Duration::from_secs(5);
        while !fs::read_to_string(&procs)
            .unwrap_or_default()
            .lines()
            .any(|l| l == pid)
        {
            assert!(
                Instant::now() < end,
                "pause process {pid} never joined {}",
                procs.display()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        self.pods.get_mut(uid).expect("just inserted")
    }

    /// Tears pod `uid` down as the kubelet does: kills its processes, removes its cgroups,
    /// then its network (veth and netns). Panics if something is left behind.
    pub fn delete_pod(&mut self, uid: &str) {
        let pod = self
            .pods
            .remove(uid)
            .unwrap_or_else(|| panic!("no pod {uid} on the node"));
        if let Err(e) = self.teardown(pod) {
            panic!("deleting pod {uid}: {e}");
        }
    }

    fn teardown(&mut self, mut pod: KubePod) -> Result<(), String> {
        let mut problems = Vec::new();
        // 1. Processes: the pause process (ours: killed and reaped), then whatever else runs
        //    in the pod's cgroups, by pid.
        pod.pause = None;
        let rel = pod
            .cgroup
            .strip_prefix(&self.lab.cg_mount)
            .map(|r| Path::new("/").join(r))
            .ok();
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = pids_below(&pod.cgroup);
            if pids.is_empty() {
                break;
            }
            if Instant::now() > end {
                problems.push(format!(
                    "processes {pids:?} did not leave {}",
                    pod.cgroup.display()
                ));
                break;
            }
            if let Some(rel) = &rel {
                for pid in pids {
                    kill_if_in(pid, rel);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // 2. Cgroups, children first.
        let mut dirs = pod.containers.clone();
        dirs.push(pod.sandbox_cgroup.clone());
        dirs.push(pod.cgroup.clone());
        for d in dirs {
            if let Err(e) = rmdir_retry(&d) {
                problems.push(e);
            }
        }
        // 3. Network: the veth pair first (a listener may keep the netns itself alive for a
        //    while; its veth must not outlive the pod), then the netns name.
        let node = &self.lab.node;
        let _ = sh_status(&format!("ip -n {node} link del {} 2>/dev/null", pod.veth));
        if let Err(e) = sh_status(&format!("ip netns del {}", pod.netns)) {
            problems.push(e);
        }
        self.free_slots.push(pod.slot);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            if let Some(pod) = self.pods.remove(&uid)
                && let Err(e) = self.teardown(pod)
            {
                eprintln!("kube node cleanup: pod {uid}: {e}");
            }
        }
        for dir in self.levels.drain(..).rev() {
            if let Err(e) = rmdir_retry(&dir) {
                eprintln!("kube node cleanup: {e}");
            }
        }
        // `lab` drops after this: daemon, servers, pins, its own netns and the cgroup mount.
    }
}

/// Runs a shell command; `Err` carries its status and output.
fn sh_status(cmd: &str) -> Result<(), String> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map_err(|e| format!("spawn sh: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "command failed: {cmd}: {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Pids in `cgroup` and every cgroup below it.
fn pids_below(cgroup: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![cgroup.to_owned()];
    while let Some(dir) = stack.pop() {
        if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(rd) = fs::read_dir(&dir) {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    out
}

/// SIGKILLs `pid` if, once pinned by a pidfd, it is still in a cgroup at or below `rel`
/// (path relative to the cgroup2 mount): a pid reused by an unrelated process is never hit.
fn kill_if_in(pid: u32, rel: &Path) {
    // SAFETY: pidfd_open(2) with a pid and no flags; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) } as libc::c_int;
    if fd < 0 {
        return;
    }
    let line = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let inside = line
        .lines()
        .filter_map(|l| l.strip_prefix("0::"))
        .any(|p| Path::new(p.trim()).starts_with(rel));
    if inside {
        // SAFETY: pidfd_send_signal(2) on the fd we own, no siginfo, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
}

/// Removes an (empty) cgroup directory, retrying while dying tasks still hold it.
fn rmdir_retry(dir: &Path) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > end => return Err(format!("rmdir {}: {e}", dir.display())),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_kubelet() {
        let uid = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
        let cases = [
            (
                Driver::Systemd,
                Qos::Guaranteed,
                "kubepods.slice/kubepods-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice",
            ),
            (
                Driver::Systemd,
                Qos::Burstable,
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice",
            ),
            (
                Driver::Systemd,
                Qos::BestEffort,
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice",
            ),
            (
                Driver::Cgroupfs,
                Qos::Guaranteed,
                "kubepods/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789",
            ),
            (
                Driver::Cgroupfs,
                Qos::Burstable,
                "kubepods/burstable/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789",
            ),
            (
                Driver::Cgroupfs,
                Qos::BestEffort,
                "kubepods/besteffort/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789",
            ),
        ];
        for (driver, qos, want) in cases {
            assert_eq!(
                pod_cgroup_rel(driver, qos, uid),
                PathBuf::from(want),
                "{driver:?} {qos:?}"
            );
        }
        assert_eq!(
            container_cgroup_name(Driver::Systemd, "ab12"),
            "cri-containerd-ab12.scope"
        );
        assert_eq!(container_cgroup_name(Driver::Cgroupfs, "ab12"), "ab12");
    }

    #[test]
    fn uids_look_like_the_api_servers() {
        for n in [1u64, 0xabc, 0x1_2345_6789, u64::MAX >> 16] {
            let u = pod_uid(n);
            let lens: Vec<usize> = u.split('-').map(str::len).collect();
            assert_eq!(lens, [8, 4, 4, 4, 12], "{u}");
            assert!(u.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()), "{u}");
        }
        assert_ne!(pod_uid(1), pod_uid(2));
    }
}
