//! The closed test network: a `node` namespace running the redirector, pods (netns + cgroup
//! under a privately mounted cgroup2 hierarchy, each with a pause process), and host
//! namespaces ("internet" targets, later proxy and gateway) on a bridge in the node.
//!
//! Addresses (documentation ranges only; never 192.0.2.0/24, which is this machine's real
//! network):
//! - bridge in `node`: 203.0.113.1/24, 2001:db8:203::1/64; hosts take 203.0.113.10+;
//! - pod k (1-based): 198.51.100.(4k+2)/30 with the node at .(4k+1); 2001:db8:198:k::2/64;
//! - pods have NO default route: only a route to the "service" address 203.0.113.200 /
//!   2001:db8:203::200 (reachable directly, used for skip-range tests). Anything else is
//!   reachable from a pod only through the redirector.
use std::{
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// IPv4 address of the node on the host bridge.
pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Directly reachable "service" address (skip-range target).
pub const SERVICE_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);
pub const SERVICE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 0x200);
/// Admin address of the daemon inside the node namespace.
pub const ADMIN: &str = "127.0.0.1:15000";

/// Runs a shell command and panics with its output if it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .expect("spawn sh");
    if !out.status.success() {
        panic!(
            "command failed: {cmd}\nstatus: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh_ok(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", cmd])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Path of a workspace binary built by `cargo build` (xtask test builds them first).
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(format!("RDR_BIN_{}", name.to_uppercase().replace('-', "_"))) {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or(root.join("target"));
    let p = target.join("debug").join(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build --workspace --bins` (cargo xtask test does)",
        p.display()
    );
    p
}

fn ensure_bpffs() {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        sh("mount -t bpf bpf /sys/fs/bpf");
    }
}

/// `program` run inside network namespace `netns` and cgroup `cgroup` (joined before
/// `program` starts), with every proxy variable removed from its environment.
pub fn in_pod_cmd(netns: &str, cgroup: &Path, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        netns,
        "sh",
        "-c",
        "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"",
    ])
    .arg(cgroup)
    .arg(program);
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        c.env_remove(v);
    }
    c
}

/// A process the lab started; killed (by pid) and reaped when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    /// Sends `sig` to this process only.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
    pub fn wait_timeout(&mut self, t: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + t;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, t: Duration) {
        let end = Instant::now() + t;
        while Instant::now() < end {
            if self.log().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "{}: {needle:?} not in log after {t:?}:\n{}",
            self.name,
            self.log()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.alive() {
            self.signal(libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// A pod: network namespace + cgroup + pause process.
pub struct Pod {
    pub netns: String,
    pub cgroup: PathBuf,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pause: Option<Proc>,
}

impl Pod {
    /// A command that runs inside this pod (its netns and its cgroup), with every proxy
    /// variable removed from the environment.
    pub fn cmd(&self, program: &str) -> Command {
        self.cmd_in_cgroup(&self.cgroup, program)
    }

    /// Like [`Pod::cmd`] but joins another cgroup (e.g. a non-enabled one) in the same netns.
    pub fn cmd_in_cgroup(&self, cgroup: &Path, program: &str) -> Command {
        in_pod_cmd(&self.netns, cgroup, program)
    }

    pub fn pause_pid(&self) -> u32 {
        self.pause.as_ref().map(|p| p.pid()).unwrap_or(0)
    }
}

/// Starts `cmd` with its stdin and stdout piped and returns it with the first line it
/// prints: for a client that sets something up, reports, and holds it until its stdin
/// closes (drop the child's `stdin` to let it go).
pub fn spawn_until_first_line(mut cmd: Command) -> (Child, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("first line");
    (child, line)
}

/// An audited workload's counts as `redirector status --json` shows them: (would redirect,
/// would skip, destinations as (`addr:port`, verdict, count) in sorted order).
pub type AuditCounts = (u64, u64, Vec<(String, String, u64)>);

/// One closed test network. Drop tears everything down.
pub struct Lab {
    pub id: String,
    pub dir: PathBuf,
    pub cg_mount: PathBuf,
    /// The cgroup the hooks attach to (below our private cgroup2 mount).
    pub cg_root: PathBuf,
    pub pin_root: PathBuf,
    pub node: String,
    pub pods: Vec<Pod>,
    pub procs: Vec<Proc>,
    netns: Vec<String>,
    extra_cgroups: Vec<PathBuf>,
    hosts: u32,
    node_hosts: Option<PathBuf>,
    node_resolv: Option<PathBuf>,
    /// Admin address (in the node namespace) of the next daemon started and of the one
    /// `node_http*`, `metric` and `status` talk to.
    pub admin: String,
    /// The daemon binary [`Lab::start_daemon`] and [`Lab::start_daemon_env`] run; `None`:
    /// [`workspace_bin`]`("redirector")`. The bench's `--against` sets it to run another
    /// revision's daemon in this lab.
    pub daemon_bin: Option<PathBuf>,
    /// Environment every daemon this lab starts gets, after the caller's own (the bench
    /// sizes the daemon's runtime with it).
    pub daemon_env: Vec<(String, String)>,
}

impl Lab {
    /// Creates the node namespace, the bridge, a private cgroup2 mount and a pin directory.
    #[expect(
        clippy::new_without_default,
        reason = "creating a lab has side effects (namespaces, mounts); Default would hide them"
    )]
    pub fn new() -> Lab {
        ensure_bpffs();
        // The id names the directory, namespaces, links and pins, so it stays short. An id
        // whose directory exists is taken: by a lab running in another test process, or by
        // one kept after a failure, whose cgroup mount may still be there (that made an
        // unrelated test fail once). Creating the directory claims an id atomically.
        let (id, dir) = loop {
            let id = format!(
                "r{:x}{}",
                std::process::id() & 0xfff,
                COUNTER.fetch_add(1, Ordering::SeqCst)
            );
            let dir = PathBuf::from(format!("/tmp/rdr-lab-{id}"));
            match fs::create_dir(&dir) {
                Ok(()) => break (id, dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("lab dir {}: {e}", dir.display()),
            }
        };
        let cg_mount = dir.join("cg");
        fs::create_dir_all(&cg_mount).expect("cg mount dir");
        let mut lab = Lab {
            cg_root: cg_mount.join(format!("rdr-{id}")),
            pin_root: PathBuf::from(format!("/sys/fs/bpf/rdr-{id}")),
            node: format!("{id}-node"),
            id,
            dir,
            cg_mount,
            pods: Vec::new(),
            procs: Vec::new(),
            netns: Vec::new(),
            extra_cgroups: Vec::new(),
            hosts: 0,
            node_hosts: None,
            node_resolv: None,
            admin: ADMIN.to_owned(),
            daemon_bin: None,
            daemon_env: Vec::new(),
        };
        sh(&format!("mount -t cgroup2 none {}", lab.cg_mount.display()));
        fs::create_dir_all(&lab.cg_root).expect("cgroup root");
        let node = lab.node.clone();
        lab.add_netns(&node);
        let id = &lab.id;
        sh(&format!(
            "ip -n {node} link add {id}br type bridge && ip -n {node} link set {id}br up && \
             ip -n {node} addr add {NODE_V4}/24 dev {id}br && \
             ip -n {node} addr add 2001:db8:203::1/64 dev {id}br nodad && \
             ip netns exec {node} sysctl -qw net.ipv4.ip_forward=1 && \
             ip netns exec {node} sysctl -qw net.ipv6.conf.all.forwarding=1"
        ));
        lab
    }

    fn add_netns(&mut self, name: &str) {
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        self.netns.push(name.to_owned());
    }

    /// Adds a host namespace on the bridge with the given addresses (/24 and /64) and a
    /// route back to the pod networks via the node. Returns the namespace name.
    pub fn add_host(&mut self, short: &str, v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> String {
        self.hosts += 1;
        let ns = format!("{}-{short}", self.id);
        self.add_netns(&ns);
        let (id, node, h) = (&self.id, &self.node, self.hosts);
        sh(&format!(
            "ip link add {id}h{h} netns {node} type veth peer name eth0 netns {ns} && \
             ip -n {node} link set {id}h{h} master {id}br up && ip -n {ns} link set eth0 up"
        ));
        for a in v4 {
            sh(&format!("ip -n {ns} addr add {a}/24 dev eth0"));
        }
        for a in v6 {
            sh(&format!("ip -n {ns} addr add {a}/64 dev eth0 nodad"));
        }
        sh(&format!(
            "ip -n {ns} route add 198.51.100.0/24 via {NODE_V4}"
        ));
        if !v6.is_empty() {
            sh(&format!(
                "ip -n {ns} -6 route add 2001:db8:198::/48 via 2001:db8:203::1"
            ));
        }
        ns
    }

    /// Adds pod number `pods.len()+1`: netns, veth to the node, cgroup, pause process.
    pub fn add_pod(&mut self) -> usize {
        let k = self.pods.len() as u8 + 1;
        let ns = format!("{}-pod{k}", self.id);
        self.add_netns(&ns);
        let (id, node) = (&self.id, &self.node);
        let node_v4 = Ipv4Addr::new(198, 51, 100, 4 * k + 1);
        let pod_v4 = Ipv4Addr::new(198, 51, 100, 4 * k + 2);
        let node_v6 = Ipv6Addr::new(0x2001, 0xdb8, 0x198, k as u16, 0, 0, 0, 1);
        let pod_v6 = Ipv6Addr::new(0x2001, 0xdb8, 0x198, k as u16, 0, 0, 0, 2);
        sh(&format!(
            "ip link add {id}p{k} netns {node} type veth peer name eth0 netns {ns} && \
             ip -n {node} addr add {node_v4}/30 dev {id}p{k} && ip -n {node} link set {id}p{k} up && \
             ip -n {node} addr add {node_v6}/64 dev {id}p{k} nodad && \
             ip -n {ns} addr add {pod_v4}/30 dev eth0 && ip -n {ns} addr add {pod_v6}/64 dev eth0 nodad && \
             ip -n {ns} link set eth0 up && \
             ip -n {ns} route add {SERVICE_V4}/32 via {node_v4} && \
             ip -n {ns} -6 route add {SERVICE_V6}/128 via {node_v6}"
        ));
        let cgroup = self.cg_root.join(format!("pod{k}"));
        fs::create_dir_all(&cgroup).expect("pod cgroup");
        let mut pod = Pod {
            netns: ns,
            cgroup,
            v4: pod_v4,
            v6: pod_v6,
            pause: None,
        };
        self.start_pause(&mut pod, k);
        self.pods.push(pod);
        self.pods.len() - 1
    }

    /// Starts pod `k`'s pause process in its netns and cgroup and waits until it is in the
    /// cgroup (before anyone scans it).
    fn start_pause(&self, pod: &mut Pod, k: u8) {
        let log = self.dir.join(format!("pause{k}.log"));
        let child = pod
            .cmd("sleep")
            .arg("1000000")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn pause");
        pod.pause = Some(Proc {
            name: format!("pause{k}"),
            child,
            log,
        });
        let end = Instant::now() + Duration::from_secs(5);
        let pid = pod.pause_pid().to_string();
        while !fs::read_to_string(pod.cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .any(|l| l == pid)
        {
            assert!(
                Instant::now() < end,
                "pause process never joined {}",
                pod.cgroup.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes the cgroup root and every pod cgroup and creates them again (same paths, new
    /// cgroup ids), with new pause processes: what a node agent restart or a cgroup driver
    /// change can do. Links attached to the old root become defunct.
    pub fn recreate_cgroups(&mut self) {
        for p in &mut self.pods {
            p.pause = None;
        }
        let mut dirs: Vec<PathBuf> = self.pods.iter().map(|p| p.cgroup.clone()).collect();
        dirs.push(self.cg_root.clone());
        for d in &dirs {
            let end = Instant::now() + Duration::from_secs(5);
            while let Err(e) = fs::remove_dir(d) {
                assert!(Instant::now() < end, "cannot remove {}: {e}", d.display());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for d in dirs.iter().rev() {
            fs::create_dir(d).expect("recreate cgroup");
        }
        let mut pods = std::mem::take(&mut self.pods);
        for (i, p) in pods.iter_mut().enumerate() {
            self.start_pause(p, i as u8 + 1);
        }
        self.pods = pods;
    }

    /// Gives every pod an `/etc/hosts` with `entries` (name, address): the DNS stand-in.
    /// `ip netns exec` bind-mounts `/etc/netns/<netns>/hosts` over `/etc/hosts`, so curl and
    /// python in the pod resolve these names and nothing else changes.
    pub fn set_pod_hosts(&mut self, entries: &[(&str, IpAddr)]) {
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (name, ip) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        for p in &self.pods {
            let dir = PathBuf::from(format!("/etc/netns/{}", p.netns));
            fs::create_dir_all(&dir).expect("/etc/netns dir");
            fs::write(dir.join("hosts"), &text).expect("write pod hosts");
        }
    }

    /// Makes the daemon (started after this call) resolve names through `entries` — the
    /// node's DNS stand-in.
    pub fn set_node_hosts(&mut self, entries: &[(&str, IpAddr)]) {
        let mut text = String::from("127.0.0.1 localhost\n");
        for (name, ip) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        let p = self.dir.join("node-hosts");
        fs::write(&p, text).expect("write node hosts");
        self.node_hosts = Some(p);
    }

    /// Makes the daemon (started after this call) use the DNS server at `server` — its
    /// `/etc/resolv.conf`, bind-mounted like [`Lab::set_node_hosts`].
    pub fn set_node_resolver(&mut self, server: IpAddr) {
        let p = self.dir.join("node-resolv.conf");
        fs::write(&p, format!("nameserver {server}\n")).expect("write node resolv.conf");
        self.node_resolv = Some(p);
    }

    /// A cgroup next to the pods that is never enabled.
    pub fn add_plain_cgroup(&mut self, name: &str) -> PathBuf {
        let p = self.cg_root.join(name);
        fs::create_dir_all(&p).expect("cgroup");
        self.extra_cgroups.push(p.clone());
        p
    }

    /// Spawns `program args` inside namespace `ns` (via nsenter, so /sys stays the host's),
    /// logging stdout+stderr to a file in the lab directory.
    pub fn spawn_in(&mut self, ns: &str, name: &str, program: &Path, args: &[&str]) -> usize {
        self.spawn_in_env(ns, name, program, args, &[])
    }

    pub fn spawn_in_env(
        &mut self,
        ns: &str,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> usize {
        let log = self.dir.join(format!("{name}-{}.log", self.procs.len()));
        let f = fs::File::create(&log).expect("log");
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}"))
            .arg(program)
            .args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            log,
        });
        self.procs.len() - 1
    }

    /// Starts `rdr-testsrv <mode>` in `ns` and waits until it listens.
    pub fn start_testsrv(&mut self, ns: &str, mode: &str, listens: &[SocketAddr]) -> usize {
        let bin = workspace_bin("rdr-testsrv");
        let mut args = vec![mode.to_owned()];
        for l in listens {
            args.push("--listen".into());
            args.push(l.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let i = self.spawn_in(ns, &format!("testsrv-{mode}"), &bin, &args);
        self.procs[i].wait_for_log("ready", Duration::from_secs(10));
        i
    }

    /// The `redirector run` arguments every lab daemon gets (pins, cgroup root, admin).
    pub fn daemon_args(&self) -> Vec<String> {
        let mut a = vec![
            "run".to_owned(),
            "--pin-root".into(),
            self.pin_root.display().to_string(),
            "--cgroup-root".into(),
            self.cg_root.display().to_string(),
            "--admin-addr".into(),
            self.admin.clone(),
        ];
        for p in &self.pods {
            a.push("--cgroup".into());
            a.push(p.cgroup.display().to_string());
        }
        a
    }

    /// Starts the redirector in the node namespace with `extra` arguments and waits for
    /// `/readyz`. Returns the index into `procs`.
    pub fn start_daemon(&mut self, extra: &[&str]) -> usize {
        self.start_daemon_env(extra, &[("RUST_LOG", "info")])
    }

    pub fn start_daemon_env(&mut self, extra: &[&str], env: &[(&str, &str)]) -> usize {
        let bin = self
            .daemon_bin
            .clone()
            .unwrap_or_else(|| workspace_bin("redirector"));
        self.start_daemon_bin(&bin, extra, env)
    }

    /// [`Lab::start_daemon_env`] with another build of the daemon (e.g. `redirector-next`,
    /// whose eBPF programs differ). Its admin endpoint is [`Lab::admin`] at the time of the
    /// call: set that first to run two daemons side by side.
    pub fn start_daemon_bin(&mut self, bin: &Path, extra: &[&str], env: &[(&str, &str)]) -> usize {
        let i = self.spawn_daemon_bin(bin, extra, env);
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((200, _)) = self.node_http_get("/readyz") {
                return i;
            }
            if !self.procs[i].alive() || Instant::now() > end {
                panic!("redirector did not become ready:\n{}", self.procs[i].log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`Lab::start_daemon_bin`] without waiting for anything.
    pub fn spawn_daemon_bin(&mut self, bin: &Path, extra: &[&str], env: &[(&str, &str)]) -> usize {
        let bin = bin.to_owned();
        let daemon_env = self.daemon_env.clone();
        let env: Vec<(&str, &str)> = env
            .iter()
            .copied()
            .chain(daemon_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .collect();
        let env = env.as_slice();
        let mut args = self.daemon_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let node = self.node.clone();
        // The node's resolver files, each bind-mounted over its /etc path in a private mount
        // namespace, so the host's own files are untouched.
        let mounts: Vec<(PathBuf, &str)> = [
            (self.node_hosts.clone(), "/etc/hosts"),
            (self.node_resolv.clone(), "/etc/resolv.conf"),
        ]
        .into_iter()
        .filter_map(|(p, target)| p.map(|p| (p, target)))
        .collect();
        if mounts.is_empty() {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.spawn_in_env(&node, "redirector", &bin, &args, env)
        } else {
            let script: String = mounts
                .iter()
                .map(|(p, target)| format!("mount --bind '{}' {target} && ", p.display()))
                .collect();
            let mut full = vec![
                "--mount".to_owned(),
                "--propagation".into(),
                "private".into(),
                "sh".into(),
                "-c".into(),
                format!("{script}exec \"$@\""),
                "node-resolver".into(),
                bin.display().to_string(),
            ];
            full.extend(args);
            let full: Vec<&str> = full.iter().map(String::as_str).collect();
            self.spawn_in_env(&node, "redirector", Path::new("unshare"), &full, env)
        }
    }

    /// The logs of every daemon this lab started, in start order.
    pub fn daemon_log(&self) -> String {
        self.procs
            .iter()
            .filter(|p| p.name == "redirector")
            .map(|p| p.log())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits (bounded) until the daemon's log contains `needle`; returns the whole log. Audit
    /// lines are written when a relay ends, which can be just after the client is done.
    pub fn wait_daemon_log(&self, needle: &str) -> String {
        self.wait_daemon_log_for(&format!("{needle:?}"), |log| log.contains(needle))
    }

    /// As [`Lab::wait_daemon_log`], until `done` holds of the whole log (`what` names it in
    /// the failure). A log line sends no event: this polls, bounded.
    pub fn wait_daemon_log_for(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.daemon_log();
            if done(&log) {
                return log;
            }
            assert!(Instant::now() < end, "{what} not in the daemon log:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the daemon's admin endpoint inside the node namespace.
    pub fn node_http_get(&self, path: &str) -> Option<(u16, String)> {
        self.node_http("GET", path)
    }

    /// A request with no body to the daemon's admin endpoint inside the node namespace.
    pub fn node_http(&self, method: &str, path: &str) -> Option<(u16, String)> {
        self.node_http_with(method, path, &[])
    }

    /// [`Lab::node_http`] with extra request headers (`Name: value`).
    pub fn node_http_with(
        &self,
        method: &str,
        path: &str,
        headers: &[&str],
    ) -> Option<(u16, String)> {
        let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\n{extra}connection: close\r\n\r\n"
        );
        let admin = self.admin.clone();
        let resp = self.in_netns(&self.node, move || -> Option<String> {
            let mut s =
                TcpStream::connect_timeout(&admin.parse().ok()?, Duration::from_secs(1)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(req.as_bytes()).ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out)
        })?;
        let status = resp.split_whitespace().nth(1)?.parse().ok()?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((status, body))
    }

    /// A metric value from `/metrics` (exact series text before the value), or 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = self
            .node_http_get("/metrics")
            .expect("metrics endpoint unreachable");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// Runs `f` on a helper thread inside network namespace `ns`.
    pub fn in_netns<T: Send + 'static>(
        &self,
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let file = fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
        std::thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread panicked")
    }

    /// `redirector status` against this lab's pins, run in the node namespace.
    pub fn status(&self) -> Output {
        let bin = workspace_bin("redirector");
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node))
            .arg(bin)
            .args(["status", "--pin-root"])
            .arg(&self.pin_root)
            .args(["--cgroup-root"])
            .arg(&self.cg_root)
            .args(["--admin-addr", &self.admin])
            .output()
            .expect("run status")
    }

    /// `redirector status --json` against this lab's pins, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let o = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node))
            .arg(workspace_bin("redirector"))
            .args(["status", "--json", "--pin-root"])
            .arg(&self.pin_root)
            .args(["--cgroup-root"])
            .arg(&self.cg_root)
            .args(["--admin-addr", ADMIN])
            .output()
            .expect("run status --json");
        assert!(o.status.success(), "status --json: {}", crate::describe(&o));
        serde_json::from_slice(&o.stdout).expect("status --json output")
    }

    /// What `redirector status --json` says about the audited workload labeled `workload`
    /// ([`AuditCounts`]):
    /// (would redirect, would skip, its destinations as (`addr:port`, verdict, count) in
    /// sorted order), or `None` when it has no audit counts.
    pub fn audit_counts(&self, workload: &str) -> Option<AuditCounts> {
        let v = self.status_json();
        let a = v["audit"]
            .as_array()?
            .iter()
            .find(|a| a["workload"] == workload)?
            .clone();
        let mut dests: Vec<(String, String, u64)> = a["destinations"]
            .as_array()?
            .iter()
            .map(|d| {
                (
                    d["destination"].as_str().unwrap_or_default().to_owned(),
                    d["verdict"].as_str().unwrap_or_default().to_owned(),
                    d["count"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        dests.sort();
        Some((
            a["would_redirect"].as_u64()?,
            a["would_skip"].as_u64()?,
            dests,
        ))
    }

    /// Address of internet host address number `i` (203.0.113.10+i).
    pub fn inet_v4(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(203, 0, 113, 10 + i)
    }
    pub fn inet_v6(i: u8) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 0x10 + i as u16)
    }

    /// Standard "internet" host with `n` addresses plus the service address, running a
    /// whoami/echo server on `port` on all of them (v4 and v6). Returns the proc index.
    pub fn add_internet(&mut self, n: u8, port: u16) -> (String, usize) {
        let mut v4: Vec<Ipv4Addr> = (0..n).map(Lab::inet_v4).collect();
        v4.push(SERVICE_V4);
        let mut v6: Vec<Ipv6Addr> = (0..n).map(Lab::inet_v6).collect();
        v6.push(SERVICE_V6);
        let ns = self.add_host("inet", &v4, &v6);
        let srv = self.start_testsrv(
            &ns,
            "whoami",
            &[
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            ],
        );
        (ns, srv)
    }

    /// Output of `bpftool` with `args`.
    pub fn bpftool(&self, args: &str) -> String {
        sh(&format!("bpftool {args}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // 1. Our processes, by pid (daemon, servers, pause processes).
        self.procs.clear();
        for p in &mut self.pods {
            p.pause = None;
        }
        // 2. Pins: removing the link pins detaches our programs.
        let _ = fs::remove_dir_all(&self.pin_root);
        // 3. Cgroups (children first; a just-killed process may take a moment to leave).
        let mut dirs: Vec<PathBuf> = self.pods.iter().map(|p| p.cgroup.clone()).collect();
        dirs.extend(self.extra_cgroups.iter().cloned());
        dirs.push(self.cg_root.clone());
        for d in dirs {
            let end = Instant::now() + Duration::from_secs(3);
            while d.exists() && fs::remove_dir(&d).is_err() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // 4. Namespaces (deleting a netns also deletes its veth ends) and their /etc/netns.
        for ns in self.netns.iter().rev() {
            let _ = sh_ok(&format!("ip netns del {ns}"));
            let _ = fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
        // 5. The private cgroup2 mount and the scratch directory (logs kept on failure).
        let _ = sh_ok(&format!("umount {}", self.cg_mount.display()));
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "lab {} failed; logs kept in {}",
                self.id,
                self.dir.display()
            );
        }
    }
}
