//! Privileged end-to-end tests of the lifecycle (issue: lifecycle): programs replaced in
//! place by a newer release, pinned maps of another layout, defunct links, uninstall next to
//! another tool's program.
//!
//! "The next release" is `redirector-next`: this daemon built with the test-only `variant`
//! datapath (redirector-ebpf's `variant` feature), whose programs differ from the normal
//! build's by one constant and so have other instruction tags. `cargo xtask test` builds it.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tests::{
    describe as out,
    foreign_prog::{ForeignConnect4, ForeignProg},
    lab::{Lab, sh, workspace_bin},
    priv_check::privileged,
};

/// Port of the whoami/echo server on every internet host address.
const ECHO: u16 = 8080;

fn internet_lab(pods: usize) -> Lab {
    let mut lab = Lab::new();
    for _ in 0..pods {
        lab.add_pod();
    }
    lab.add_internet(20, ECHO);
    lab
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `traffic.py` running in a pod (see that script): new connections in a tight loop and
/// `long` long-lived echo connections, until [`Traffic::finish`].
struct Traffic {
    child: Child,
    stop: PathBuf,
    progress: PathBuf,
}

#[derive(Debug, Default, serde::Deserialize)]
struct Progress {
    new: u64,
    pings: Vec<u64>,
    broken: u64,
}

impl Traffic {
    fn start(lab: &Lab, pod: usize, host: &str, long: usize, tag: &str) -> Traffic {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/traffic.py");
        let stop = lab.dir.join(format!("traffic-{tag}.stop"));
        let progress = lab.dir.join(format!("traffic-{tag}.json"));
        let child = lab.pods[pod]
            .cmd("python3")
            .arg(script)
            .args([host, &ECHO.to_string(), &long.to_string()])
            .arg(&stop)
            .arg(&progress)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        Traffic {
            child,
            stop,
            progress,
        }
    }

    fn progress(&self) -> Progress {
        fs::read_to_string(&self.progress)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default()
    }

    /// Waits until `n` new connections have been made in total.
    fn wait_new(&self, n: u64) {
        wait_until(
            &format!("{n} new connections"),
            Duration::from_secs(60),
            || self.progress().new >= n,
        );
    }

    fn finish(self) -> serde_json::Value {
        fs::write(&self.stop, b"").expect("stop file");
        let o = self.child.wait_with_output().expect("traffic.py");
        assert!(o.status.success(), "traffic.py: {}", out(&o));
        let text = String::from_utf8_lossy(&o.stdout);
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {}", out(&o)))
    }
}

/// (link id, program id) of each of our pinned links, as bpftool reads them from the pins;
/// `None` for a link that is not pinned.
fn links(lab: &Lab) -> Links {
    LinkProbe {
        pin_root: lab.pin_root.clone(),
    }
    .read()
}

/// (link id, program id) per link, `None` when not pinned.
type Links = Vec<Option<(u64, u64)>>;

/// Samples [`links`] on a thread until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Links>>,
}

impl Sampler {
    fn start(lab: &Lab) -> Sampler {
        let pin_root = lab.pin_root.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let probe = LinkProbe { pin_root };
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                samples.push(probe.read());
            }
            samples
        });
        Sampler { stop, thread }
    }
    fn finish(self) -> Vec<Links> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler")
    }
}

struct LinkProbe {
    pin_root: PathBuf,
}

impl LinkProbe {
    fn read(&self) -> Links {
        ["rdr_link_c4", "rdr_link_c6", "rdr_link_so"]
            .iter()
            .map(|l| {
                let o = std::process::Command::new("bpftool")
                    .args(["-j", "link", "show", "pinned"])
                    .arg(self.pin_root.join(l))
                    .output()
                    .ok()?;
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
                Some((v["id"].as_u64()?, v["prog_id"].as_u64()?))
            })
            .collect()
    }
}

/// One connection from pod 0 to the echo server at `host` reached it (through the proxy:
/// pods have no route of their own).
fn connects(lab: &Lab, host: &str) -> bool {
    let o = lab.pods[0]
        .cmd("python3")
        .args([
            "-c",
            "import socket,sys\ns=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\nprint(s.makefile().readline().strip())",
            host,
            &ECHO.to_string(),
        ])
        .output()
        .expect("python3");
    String::from_utf8_lossy(&o.stdout).starts_with("local=")
}

#[test]
fn programs_are_replaced_in_place_while_connects_run() {
    if !privileged("programs_are_replaced_in_place_while_connects_run") {
        return;
    }
    let mut lab = internet_lab(1);
    lab.start_daemon(&[]);
    let before = links(&lab);
    assert!(before.iter().all(Option::is_some), "{before:?}");

    let sampler = Sampler::start(&lab);
    let traffic = Traffic::start(&lab, 0, &Lab::inet_v4(3).to_string(), 0, "upgrade");
    traffic.wait_new(100);

    // The next release starts beside the running one, as in a rolling update.
    lab.admin = "127.0.0.1:15001".into();
    lab.start_daemon_bin(
        &workspace_bin("redirector-next"),
        &[],
        &[("RUST_LOG", "info")],
    );
    let made = traffic.progress().new;
    traffic.wait_new(made + 300);
    let samples = sampler.finish();
    let result = traffic.finish();

    let new = &result["new"];
    assert_eq!(new["direct"], 0, "connects went past the proxy: {result}");
    assert_eq!(new["failed"], 0, "connects failed: {result}");
    assert!(new["ok"].as_u64().unwrap_or(0) >= 400, "{result}");

    let after = links(&lab);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let (b, a) = (b.expect("pinned"), a.expect("still pinned"));
        assert_eq!(b.0, a.0, "link {i} was replaced, not updated in place");
        assert_ne!(b.1, a.1, "link {i} still runs the old program");
    }
    // Never a moment without our programs, and each hook changed program exactly once.
    assert!(samples.len() > 3, "too few samples: {}", samples.len());
    for (i, s) in samples.iter().enumerate() {
        assert!(
            s.iter().all(Option::is_some),
            "sample {i}: a link was missing: {s:?}"
        );
    }
    for link in 0..3 {
        let mut progs: Vec<u64> = samples.iter().map(|s| s[link].expect("pinned").1).collect();
        progs.dedup();
        assert_eq!(
            progs,
            vec![before[link].unwrap().1, after[link].unwrap().1],
            "link {link}: programs over time"
        );
    }
    let log = lab.daemon_log();
    assert!(
        log.contains("replaced the pinned eBPF programs in place"),
        "{log}"
    );

    // Starting the same release again changes nothing.
    lab.admin = "127.0.0.1:15002".into();
    lab.start_daemon_bin(
        &workspace_bin("redirector-next"),
        &[],
        &[("RUST_LOG", "info")],
    );
    assert_eq!(
        links(&lab),
        after,
        "a restart of the same release replaced programs"
    );
}

#[test]
fn a_pinned_map_of_another_layout_is_recreated_not_misread() {
    if !privileged("a_pinned_map_of_another_layout_is_recreated_not_misread") {
        return;
    }
    let mut lab = internet_lab(1);
    // What an older release could have left: rdr_enabled with a 4-byte value (a flag), our
    // pod's cgroup in it.
    fs::create_dir_all(&lab.pin_root).expect("pin root");
    let map = lab.pin_root.join("rdr_enabled");
    sh(&format!(
        "bpftool map create {} type hash key 8 value 4 entries 65536 name rdr_enabled",
        map.display()
    ));
    let id = {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(&lab.pods[0].cgroup).expect("cgroup").ino()
    };
    // And a map only the older release used.
    sh(&format!(
        "bpftool map create {} type hash key 8 value 8 entries 16 name rdr_oldmap",
        lab.pin_root.join("rdr_oldmap").display()
    ));
    let key: Vec<String> = id.to_le_bytes().iter().map(u8::to_string).collect();
    sh(&format!(
        "bpftool map update pinned {} key {} value 1 0 0 0",
        map.display(),
        key.join(" ")
    ));

    lab.start_daemon(&[]);
    let log = lab.daemon_log();
    assert!(log.contains("pinned map has another layout"), "{log}");
    let show = lab.bpftool(&format!("-j map show pinned {}", map.display()));
    let v: serde_json::Value = serde_json::from_str(&show).expect("bpftool json");
    assert_eq!(v["bytes_value"], 8, "{show}");
    // The pod is enabled under the new layout and redirected.
    let traffic = Traffic::start(&lab, 0, &Lab::inet_v4(2).to_string(), 0, "layout");
    traffic.wait_new(20);
    let result = traffic.finish();
    assert_eq!(result["new"]["direct"], 0, "{result}");
    assert_eq!(result["new"]["failed"], 0, "{result}");
    assert!(!lab.pin_root.join("rdr_enabled_next").exists());
    assert!(
        !lab.pin_root.join("rdr_oldmap").exists(),
        "the older release's map is still pinned"
    );
}

#[test]
fn a_defunct_link_is_attached_again() {
    if !privileged("a_defunct_link_is_attached_again") {
        return;
    }
    let mut lab = internet_lab(1);
    lab.start_daemon(&[]);
    let before = links(&lab);
    // The cgroup root goes away and comes back (same path, new id): our links, still pinned,
    // are defunct and the new root has no program.
    lab.recreate_cgroups();
    let root = lab.cg_root.display().to_string();
    wait_until(
        "our programs on the new cgroup root",
        Duration::from_secs(15),
        || {
            let tree = lab.bpftool(&format!("cgroup show {root}"));
            ["rdr_connect4", "rdr_connect6", "rdr_sockops"]
                .iter()
                .all(|p| tree.matches(p).count() == 1)
        },
    );
    let after = links(&lab);
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(b.unwrap().0, a.unwrap().0, "a new link per hook");
    }
    let log = lab.daemon_log();
    assert!(log.contains("attached afresh"), "{log}");
    wait_until("the pod redirected again", Duration::from_secs(15), || {
        connects(&lab, &Lab::inet_v4(2).to_string())
    });
    let traffic = Traffic::start(&lab, 0, &Lab::inet_v4(2).to_string(), 0, "defunct");
    traffic.wait_new(20);
    let result = traffic.finish();
    assert_eq!(result["new"]["direct"], 0, "{result}");
    assert_eq!(result["new"]["failed"], 0, "{result}");
}

#[test]
fn uninstall_removes_ours_and_leaves_another_tools_program() {
    if !privileged("uninstall_removes_ours_and_leaves_another_tools_program") {
        return;
    }
    let mut lab = internet_lab(1);
    let foreign = ForeignConnect4::deny_port(&lab.cg_root, 9).expect("foreign program");
    let d = lab.start_daemon(&[]);
    let refused_9 = |lab: &Lab| {
        let o = lab.pods[0]
            .cmd("python3")
            .args([
                "-c",
                "import socket,sys\ns=socket.socket()\ntry:\n s.connect((sys.argv[1],9))\nexcept OSError as e:\n print(e.errno)",
                &Lab::inet_v4(1).to_string(),
            ])
            .output()
            .expect("python3");
        String::from_utf8_lossy(&o.stdout).trim() == "1"
    };
    assert!(refused_9(&lab), "the foreign program refuses port 9");
    let traffic = Traffic::start(&lab, 0, &Lab::inet_v4(2).to_string(), 0, "before");
    traffic.wait_new(5);
    assert_eq!(traffic.finish()["new"]["failed"], 0);

    lab.procs[d].signal(libc::SIGTERM);
    lab.procs[d]
        .wait_timeout(Duration::from_secs(20))
        .expect("daemon exit");
    let o = std::process::Command::new(workspace_bin("redirector"))
        .args(["uninstall", "--pin-root"])
        .arg(&lab.pin_root)
        .output()
        .expect("uninstall");
    assert!(o.status.success(), "{}", out(&o));
    assert!(!lab.pin_root.exists(), "pin directory left behind");
    let tree = lab.bpftool(&format!("cgroup show {}", lab.cg_root.display()));
    assert!(
        !tree.contains("rdr_"),
        "our programs still attached:\n{tree}"
    );
    assert_eq!(tree.matches("foreign_c4").count(), 1, "{tree}");
    assert!(refused_9(&lab), "the foreign program still runs");
    // Without our hooks the pod has no way to the internet host (no route): not redirected.
    let traffic = Traffic::start(&lab, 0, &Lab::inet_v4(2).to_string(), 0, "after");
    traffic.wait_new(5);
    let result = traffic.finish();
    assert_eq!(result["new"]["ok"], 0, "{result}");
    drop(foreign);
}

#[test]
fn a_failed_attach_leaves_no_hook_and_no_pin_behind() {
    if !privileged("a_failed_attach_leaves_no_hook_and_no_pin_behind") {
        return;
    }
    let mut lab = internet_lab(1);
    // The kernel allows 64 programs per hook and cgroup: with 64 of another tool's on the
    // sockops hook, our third attach fails after connect4 and connect6 succeeded.
    let foreign: Vec<ForeignProg> = (0..64)
        .map(|_| ForeignProg::sockops_noop(&lab.cg_root).expect("foreign sockops"))
        .collect();
    let bin = workspace_bin("redirector");
    let mut args = lab.daemon_args();
    let admin = args.iter().position(|a| a == "--admin-addr").unwrap() + 1;
    args[admin] = "127.0.0.1:15009".into();
    let o = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.node))
        .arg(&bin)
        .args(&args)
        .output()
        .expect("run");
    assert!(!o.status.success(), "{}", out(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("failed to attach rdr_sockops"), "{}", out(&o));
    // The links it made are released with the process; the kernel detaches them in deferred
    // work, so wait for that (bounded).
    let root = lab.cg_root.display().to_string();
    wait_until("no hook of ours left", Duration::from_secs(5), || {
        !lab.bpftool(&format!("cgroup show {root}")).contains("rdr_")
    });
    for l in ["rdr_link_c4", "rdr_link_c6", "rdr_link_so"] {
        assert!(!lab.pin_root.join(l).exists(), "{l} stayed pinned");
    }
    // With room on the hook, the next start attaches everything.
    drop(foreign);
    lab.start_daemon(&[]);
    assert!(connects(&lab, &Lab::inet_v4(2).to_string()));
}

/// Cilium's conn-disrupt check, for a rolling update: long-lived echo connections and a
/// steady stream of new ones while the running daemon (A) hands over to the next release (B,
/// whose programs differ) and is then stopped.
#[test]
fn rolling_upgrade_under_traffic_fails_no_connection() {
    if !privileged("rolling_upgrade_under_traffic_fails_no_connection") {
        return;
    }
    const LONG: usize = 10;
    let mut lab = internet_lab(1);
    let a = lab.start_daemon(&[]);
    let traffic = Traffic::start(&lab, 0, &Lab::inet_v4(4).to_string(), LONG, "disrupt");
    wait_until("traffic through A", Duration::from_secs(30), || {
        let p = traffic.progress();
        p.new >= 100 && p.pings.len() == LONG && p.pings.iter().all(|n| *n >= 3)
    });

    // B starts beside A, as `maxSurge: 1` does, and takes the pods over.
    lab.admin = "127.0.0.1:15001".into();
    lab.start_daemon_bin(
        &workspace_bin("redirector-next"),
        &[],
        &[("RUST_LOG", "info")],
    );
    traffic.wait_new(traffic.progress().new + 200);

    // A is stopped: it keeps its open connections until its drain deadline.
    let at_term = traffic.progress();
    assert_eq!(
        at_term.broken, 0,
        "a long-lived connection broke before A stopped"
    );
    let stopped = Instant::now();
    lab.procs[a].signal(libc::SIGTERM);
    lab.procs[a]
        .wait_timeout(Duration::from_secs(30))
        .expect("A exits after its drain deadline");
    let drain = stopped.elapsed();
    traffic.wait_new(traffic.progress().new + 200);
    let result = traffic.finish();

    let new = &result["new"];
    let longs = result["long"].as_array().expect("long");
    eprintln!(
        "conn-disrupt: new connections ok={} failed={} direct={}; long-lived {} (echoes at SIGTERM {:?}), ends {:?}; A drained in {:.2} s",
        new["ok"],
        new["failed"],
        new["direct"],
        longs.len(),
        at_term.pings,
        longs
            .iter()
            .map(|l| l["end"].as_str().unwrap_or("?"))
            .collect::<Vec<_>>(),
        drain.as_secs_f64()
    );
    assert_eq!(new["failed"], 0, "new connections failed: {result}");
    assert_eq!(
        new["direct"], 0,
        "new connections went past the proxy: {result}"
    );
    assert!(new["ok"].as_u64().unwrap_or(0) >= 500, "{result}");
    // Every long-lived connection went on after SIGTERM and was ended by A at its drain
    // deadline, each end logged.
    assert_eq!(longs.len(), LONG);
    for (i, l) in longs.iter().enumerate() {
        assert_eq!(l["end"], "broken", "connection {i}: {l}");
        assert!(
            l["pings"].as_u64().unwrap_or(0) > at_term.pings[i],
            "connection {i} did not outlive SIGTERM: {l}"
        );
    }
    let log_a = lab.procs[a].log();
    assert_eq!(
        log_a.matches("daemon shutting down").count(),
        LONG,
        "A's log of the connections it ended:\n{log_a}"
    );
}

/// Not ready yet: a pod the daemon cannot bind a listener in (here its loopback has no
/// 127.0.0.1, as while a CNI is still setting the namespace up) keeps `/readyz` at 503 while
/// every other pod is served; once a listener can be bound, the daemon turns ready. (A pod
/// that holds every candidate port itself is refused instead, and does not hold the node's
/// readiness hostage: see capture.rs's squatting test.)
#[test]
fn not_ready_until_every_pods_listener_is_bound() {
    if !privileged("not_ready_until_every_pods_listener_is_bound") {
        return;
    }
    let mut lab = internet_lab(2);
    let ns = lab.pods[1].netns.clone();
    sh(&format!("ip -n {ns} addr del 127.0.0.1/8 dev lo"));
    let d = lab.spawn_daemon_bin(&workspace_bin("redirector"), &[], &[("RUST_LOG", "info")]);
    lab.procs[d].wait_for_log("cannot start listener", Duration::from_secs(20));
    let (status, body) = lab.node_http_get("/readyz").expect("readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("listeners_ready=false"), "{body}");
    assert!(
        connects(&lab, &Lab::inet_v4(2).to_string()),
        "pod 0 is served meanwhile"
    );

    sh(&format!("ip -n {ns} addr add 127.0.0.1/8 dev lo"));
    wait_until(
        "ready once the listener is bound",
        Duration::from_secs(15),
        || matches!(lab.node_http_get("/readyz"), Some((200, _))),
    );
}

/// The daemon's async runtime runs `--worker-threads` workers; without the flag, one per CPU
/// the daemon may use: its CPU affinity, capped by its cgroup's CPU quota (a container's CPU
/// limit: the DaemonSet's 500m gives one worker, not one per node CPU). The count is the
/// runtime's own (`redirector_runtime_workers`), not the setting echoed back.
#[test]
fn the_runtime_runs_as_many_workers_as_the_daemon_may_use_cpus() {
    if !privileged("the_runtime_runs_as_many_workers_as_the_daemon_may_use_cpus") {
        return;
    }
    let mut lab = internet_lab(1);
    let workers = |lab: &Lab| lab.metric("redirector_runtime_workers");
    let stop = |lab: &mut Lab, d: usize| {
        lab.procs[d].signal(libc::SIGTERM);
        assert!(
            lab.procs[d].wait_timeout(Duration::from_secs(20)).is_some(),
            "the daemon did not stop on SIGTERM"
        );
    };

    let d = lab.start_daemon(&["--worker-threads", "3"]);
    assert_eq!(workers(&lab), 3.0, "{}", lab.daemon_log());
    stop(&mut lab, d);

    // The daemon inherits the CPU affinity of the thread that starts it: start it from a
    // thread allowed one CPU only, as a container's cpuset or `taskset` would.
    let one_cpu = std::thread::scope(|s| {
        s.spawn(|| {
            let mut set = nix::sched::CpuSet::new();
            set.set(0).expect("cpu 0");
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                .expect("sched_setaffinity");
            lab.start_daemon(&[])
        })
        .join()
        .expect("starting thread")
    });
    assert_eq!(workers(&lab), 1.0, "{}", lab.daemon_log());
    stop(&mut lab, one_cpu);

    // Every CPU allowed (what this test process may use).
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    lab.start_daemon(&[]);
    assert_eq!(workers(&lab), all as f64, "{}", lab.daemon_log());
}
