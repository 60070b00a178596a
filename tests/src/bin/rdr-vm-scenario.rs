//! The privileged capture scenario as one program, for kernels in VMs (`cargo xtask vm`) and
//! the host kernel: redirect over IPv4 and IPv6, the exact original destination under port
//! reuse, a server-first protocol, fail closed when the daemon is killed, pins adopted on
//! restart, and the gateway route through Squid (enterprise proxy) and the gateway
//! simulator.
//!
//! `rdr-vm-scenario run`: builds the closed test network (`tests::lab`), runs every step and
//! prints one line per step, `RDR-STEP <name> PASS` or `RDR-STEP <name> FAIL <why>`, one line
//! per program, `RDR-PROG <name> accepted|rejected`, and last `RDR-RESULT PASS|FAIL`; the exit
//! code is 0 only when every step passed. `cargo xtask vm` reads these lines from the VM's
//! serial console.
//!
//! `rdr-vm-scenario client …`: the pod side of a step, run inside a pod (netns + cgroup).
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream},
    os::fd::FromRawFd,
    panic::AssertUnwindSafe,
    path::Path,
    process::Output,
    time::Duration,
};

use tests::lab::{Lab, NODE_V4, workspace_bin};

/// Port of the whoami/echo servers on the internet host.
const WHOAMI_PORT: u16 = 8080;
/// Port of the server-first (banner) server.
const BANNER_PORT: u16 = 2525;
/// RST-and-reuse rounds from one source port.
const REUSE_ROUNDS: u32 = 40;
/// The source port the reuse rounds share (inside the pod's netns, nothing else uses it).
const REUSE_PORT: u16 = 41_000;
/// Every client operation is bounded; a hang is a failure, not a stuck VM.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => std::process::exit(run()),
        Some("client") => std::process::exit(client(&args[1..])),
        Some("hookbench") => std::process::exit(hookbench(&args[1..])),
        Some("exit-qemu") => std::process::exit(exit_qemu(args.get(1).map(String::as_str))),
        _ => {
            eprintln!("usage: rdr-vm-scenario run | client <whoami|banner|refused|reuse> …");
            std::process::exit(2)
        }
    }
}

/// In a VM: hands `code` to qemu's `isa-debug-exit` device (I/O port 0xf4), which ends qemu
/// with exit status `code * 2 + 1`. Debian's cloud kernels have no /dev/port, so the port is
/// written directly (ioperm, then `out`).
fn exit_qemu(code: Option<&str>) -> i32 {
    let code: u8 = code.and_then(|c| c.parse().ok()).unwrap_or(255);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: ioperm(2) takes integers only; it grants this process access to one port.
        if unsafe { libc::ioperm(0xf4, 1, 1) } != 0 {
            println!(
                "RDR-VM ioperm for the exit port failed: {}",
                std::io::Error::last_os_error()
            );
            return 1;
        }
        // SAFETY: port 0xf4 is qemu's isa-debug-exit device (xtask vm adds it), to which
        // ioperm just gave us access; writing it ends the VM and touches no memory.
        unsafe {
            std::arch::asm!("out dx, al", in("dx") 0xf4u16, in("al") code, options(nomem, nostack));
        }
    }
    let _ = code;
    1
}

/// The outcome of each step, printed as it happens.
struct Steps {
    failed: u32,
}

impl Steps {
    /// Runs `f`; a panic (the lab's and the assertions' way of failing) is this step's FAIL.
    fn step(&mut self, name: &str, f: impl FnOnce() -> Result<(), String>) -> bool {
        let r = std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into()))
        });
        match r {
            Ok(()) => {
                println!("RDR-STEP {name} PASS");
                true
            }
            Err(why) => {
                self.failed += 1;
                // One line on the console: the marker must stay parseable.
                println!("RDR-STEP {name} FAIL {}", why.replace('\n', " | "));
                false
            }
        }
    }
}

fn out(o: &Output) -> String {
    tests::describe(o)
}

fn run() -> i32 {
    let mut s = Steps { failed: 0 };
    println!(
        "RDR-KERNEL {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let mut lab = Lab::new();
    lab.add_pod();
    let (inet, _) = lab.add_internet(4, WHOAMI_PORT);
    let banner_at = SocketAddr::new(IpAddr::V4(Lab::inet_v4(2)), BANNER_PORT);
    lab.start_testsrv(&inet, "banner", &[banner_at]);

    s.step("check", || check(&lab, &[]));
    let started = s.step("daemon-start", || {
        lab.start_daemon(&[]);
        Ok(())
    });
    report_programs(&lab);
    if started {
        // With our programs attached (bookworm's bpftool cannot list the directory on 5.10
        // then): every check about the kernel and the hooks passes.
        s.step("check-attached", || check(&lab, &["kernel", "hooks"]));
    }
    if !started {
        println!("RDR-RESULT FAIL");
        return 1;
    }
    let v4 = SocketAddr::new(IpAddr::V4(Lab::inet_v4(0)), WHOAMI_PORT);
    let v6 = SocketAddr::new(IpAddr::V6(Lab::inet_v6(0)), WHOAMI_PORT);
    s.step("redirect-ipv4", || whoami(&lab, v4));
    s.step("redirect-ipv6", || whoami(&lab, v6));
    let mapped = SocketAddr::new(IpAddr::V6(Lab::inet_v4(1).to_ipv6_mapped()), WHOAMI_PORT);
    s.step("redirect-v4-mapped", || {
        expect_client(&lab, &["whoami", &mapped.to_string()], |line| {
            line.contains(&format!("local={}:{WHOAMI_PORT} ", Lab::inet_v4(1)))
        })
    });
    s.step("port-reuse-exact-destination", || reuse(&lab));
    s.step("server-first", || {
        expect_client(&lab, &["banner", &banner_at.to_string()], |line| {
            line.starts_with(&format!("220 banner local={banner_at}"))
        })
    });
    s.step("fail-closed-daemon-killed", || fail_closed(&mut lab, v4));
    s.step("pins-adopted-on-restart", || adopt(&mut lab, v4));
    drop(lab);
    s.step("gateway-route-through-squid", gateway_route);
    s.step(
        "gateway-records-in-kernel-tls-or-user-space",
        gateway_records,
    );
    if s.failed == 0 {
        println!("RDR-RESULT PASS");
        0
    } else {
        println!("RDR-RESULT FAIL");
        1
    }
}

/// `redirector check --json`: no check may fail, and those named in `must_be_ok` must say
/// `ok` (not even `warn`). The proxy and gateway checks pass trivially: none is configured.
fn check(lab: &Lab, must_be_ok: &[&str]) -> Result<(), String> {
    let o = std::process::Command::new(workspace_bin("redirector"))
        .args(["check", "--json", "--cgroup-root"])
        .arg(&lab.cg_root)
        .arg("--pin-root")
        .arg(&lab.pin_root)
        .output()
        .map_err(|e| format!("run check: {e}"))?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .map_err(|e| format!("check printed no JSON ({e}): {}", out(&o)))?;
    let checks = v["checks"].as_array().cloned().unwrap_or_default();
    for c in &checks {
        println!(
            "RDR-CHECK {} {} {}",
            c["level"].as_str().unwrap_or("?"),
            c["name"].as_str().unwrap_or("?"),
            c["detail"].as_str().unwrap_or("")
        );
    }
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| {
            c["level"] == "fail"
                || (c["level"] != "ok"
                    && must_be_ok.contains(&c["name"].as_str().unwrap_or_default()))
        })
        .map(|c| format!("{}: {}", c["name"], c["detail"]))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// Which programs the kernel took: a program is pinned only after it loaded (the verifier
/// accepted it) and attached. A program the daemon could not load is named in its log.
fn report_programs(lab: &Lab) {
    let log: String = lab
        .procs
        .iter()
        .filter(|p| p.name == "redirector")
        .map(|p| p.log())
        .collect();
    for name in redirector_common::names::PROGRAMS {
        let verdict = if lab.pin_root.join(name).exists() {
            "accepted"
        } else if log.contains(&format!("program {name} into the kernel")) {
            "rejected"
        } else {
            "not-loaded"
        };
        println!("RDR-PROG {name} {verdict}");
    }
}

/// Runs `rdr-vm-scenario client args…` in pod 0 and returns its output.
fn pod_client(lab: &Lab, args: &[&str]) -> Output {
    let me = std::env::current_exe().expect("own path");
    lab.pods[0]
        .cmd(me.to_str().expect("UTF-8 path"))
        .arg("client")
        .args(args)
        .output()
        .expect("spawn pod client")
}

fn expect_client(lab: &Lab, args: &[&str], ok: impl Fn(&str) -> bool) -> Result<(), String> {
    let o = pod_client(lab, args);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    if o.status.success() && text.lines().next().is_some_and(&ok) {
        Ok(())
    } else {
        Err(out(&o))
    }
}

/// The target reports the address it was reached on (the original destination) and the
/// peer (the node: the redirector dialed it); the echo and the half-close come back.
fn whoami(lab: &Lab, dst: SocketAddr) -> Result<(), String> {
    let o = pod_client(lab, &["whoami", &dst.to_string()]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let want_peer = match dst {
        SocketAddr::V4(_) => NODE_V4.to_string(),
        SocketAddr::V6(_) => "[2001:db8:203::1]".into(),
    };
    let first = text.lines().next().unwrap_or_default();
    if !o.status.success()
        || !first.starts_with(&format!("local={dst} peer={want_peer}:"))
        || !text.contains("echo=ping eof=yes")
    {
        return Err(out(&o));
    }
    Ok(())
}

/// RST-and-reuse: every round reuses one source port for a different destination and ends
/// with an RST; each must reach exactly its own destination.
fn reuse(lab: &Lab) -> Result<(), String> {
    let dsts: Vec<String> = (0..4)
        .map(|i| SocketAddr::new(IpAddr::V4(Lab::inet_v4(i)), WHOAMI_PORT).to_string())
        .collect();
    let mut args = vec![
        "reuse".to_owned(),
        REUSE_PORT.to_string(),
        REUSE_ROUNDS.to_string(),
    ];
    args.extend(dsts);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = pod_client(lab, &args);
    let text = String::from_utf8_lossy(&o.stdout);
    if o.status.success() && text.contains(&format!("rounds={REUSE_ROUNDS} ok")) {
        Ok(())
    } else {
        Err(out(&o))
    }
}

fn accepted(lab: &Lab) -> usize {
    lab.procs
        .iter()
        .filter(|p| p.name.starts_with("testsrv"))
        .map(|p| p.log().matches("accept ").count())
        .sum()
}

/// SIGKILL the daemon: a redirected connect is refused at once (the listener is gone with
/// the daemon, the programs stay attached), never sent direct.
fn fail_closed(lab: &mut Lab, dst: SocketAddr) -> Result<(), String> {
    let d = lab
        .procs
        .iter()
        .position(|p| p.name == "redirector")
        .ok_or("no daemon")?;
    lab.procs[d].signal(libc::SIGKILL);
    lab.procs[d]
        .wait_timeout(Duration::from_secs(10))
        .ok_or("daemon did not die")?;
    let before = accepted(lab);
    let o = pod_client(lab, &["refused", &dst.to_string()]);
    if !o.status.success() {
        return Err(out(&o));
    }
    if accepted(lab) != before {
        return Err("a connection reached the target while the daemon was down".into());
    }
    Ok(())
}

/// The whole chain in its own lab: the pod's connections go redirector → Squid (CONNECT to
/// the gateway) → TLS to the gateway simulator → its CONNECT to the target. A server-first
/// target reached by IP, and an echo target whose answer names the address it was reached on.
fn gateway_route() -> Result<(), String> {
    use tests::chain::{BANNER, Chain, Gateway};
    let mut chain = Chain::new(1);
    chain.start_squid(false);
    chain.start_gateway(Gateway::Normal);
    chain.start_daemon(&[], "info");
    expect_client(&chain.lab, &["banner", &BANNER.to_string()], |line| {
        line.starts_with(&format!("220 banner local={BANNER} "))
    })?;
    let bulk = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 14)), WHOAMI_PORT);
    let o = pod_client(&chain.lab, &["whoami", &bulk.to_string()]);
    let text = String::from_utf8_lossy(&o.stdout);
    if !o.status.success()
        || !text.starts_with(&format!("local={bulk} "))
        || !text.contains("echo=ping eof=yes")
    {
        return Err(out(&o));
    }
    let access = chain
        .squid
        .as_ref()
        .ok_or("squid not started")?
        .wait_access_log("CONNECT gw.arc.test:443", Duration::from_secs(20));
    if !access.contains(" 200 ") {
        return Err(format!("squid access log: {access}"));
    }
    Ok(())
}

/// The gateway session's records: in the kernel (kTLS) where it has the `tls` module,
/// else sealed by the redirector. Either way 16 MiB go up and come back intact through
/// Squid and the gateway, half-closed with close_notify; with the records in the kernel the
/// relay moves them with `splice`, and the close_notify that ends the download is the
/// control record that splice hands back to `recvmsg`. Run three times, each in its own
/// lab: kTLS allowed, `--gateway-ktls=false`, and kTLS allowed with an HTTP/2 gateway (its
/// frames are read from the kTLS socket in small reads and handed through whole); the times
/// are printed side by side.
/// Expected: kTLS exactly when the kernel offers the `tls` upper layer protocol, or when
/// `cargo xtask vm` said on the kernel command line that this kernel was built with it
/// (`rdr.ktls=1`; then a module that failed to load fails the step, not a silent fallback).
fn gateway_records() -> Result<(), String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let ulps = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
    let expect_kernel = cmdline.split_whitespace().any(|w| w == "rdr.ktls=1")
        || ulps.split_whitespace().any(|u| u == "tls");
    let mut seconds = Vec::new();
    use tests::chain::{BANNER, Chain, Gateway};
    for (allow, gw) in [
        (true, Gateway::Normal),
        (false, Gateway::Normal),
        (true, Gateway::H2),
    ] {
        let mut chain = Chain::new(1);
        chain.start_squid(false);
        chain.start_gateway(gw);
        let flag = format!("--gateway-ktls={allow}");
        let label = format!("{flag} ({gw:?} gateway)");
        // The gateway module's debug lines say why a session's records stayed in user space.
        chain.start_daemon(&[&flag], "info,redirector::tunnel::gateway=debug");
        // A server-first target: its first bytes may come in the same read as the CONNECT
        // answer, and must still reach the pod first, spliced or not.
        expect_client(&chain.lab, &["banner", &BANNER.to_string()], |line| {
            line.starts_with(&format!("220 banner local={BANNER} "))
        })?;
        let bulk = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 14)), WHOAMI_PORT);
        let o = pod_client(&chain.lab, &["bulk", "16", &bulk.to_string()]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let took: f64 = text
            .trim()
            .strip_prefix("bulk ok seconds=")
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| format!("{label}: {}", out(&o)))?;
        seconds.push(took);
        // The audit line is written as the tunnel ends, after the client saw its end.
        let tunnels = |log: &str| -> Vec<String> {
            log.lines()
                .filter(|l| l.contains("session=") && !l.contains("session=-"))
                .map(str::to_owned)
                .collect()
        };
        let log = chain
            .lab
            .wait_daemon_log_for("two gateway audit lines", |log| tunnels(log).len() >= 2);
        let lines = tunnels(&log);
        let word = |l: &str, key: &str| {
            l.split_whitespace()
                .find(|w| w.starts_with(key))
                .unwrap_or("")
                .to_owned()
        };
        let sessions: Vec<String> = lines.iter().map(|l| word(l, "session=")).collect();
        if sessions.len() != 2 {
            return Err(format!(
                "{label}: {} gateway tunnels in the audit log, want 2 (banner, bulk)",
                sessions.len()
            ));
        }
        let in_kernel = sessions.iter().filter(|w| w.ends_with("+ktls")).count();
        let kernel = allow && expect_kernel;
        let want = if kernel { sessions.len() } else { 0 };
        if in_kernel != want {
            let why: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("stay in user space"))
                .collect();
            return Err(format!(
                "{label}: {in_kernel} of {} gateway tunnels had their records in the kernel, want {want} (tcp_available_ulp: {:?}; {why:?})",
                sessions.len(),
                ulps.trim()
            ));
        }
        // The metric says the same of every session the pool made.
        let made = |records: &str| {
            chain.lab.metric(&format!(
                "redirector_gateway_tls_sessions_total{{records=\"{records}\"}}"
            ))
        };
        let (in_kernel_made, in_user_made) = (made("kernel"), made("user"));
        if (in_kernel_made > 0.0) != kernel || (in_user_made > 0.0) == kernel {
            return Err(format!(
                "{label}: gateway sessions made with records in the kernel: {in_kernel_made}, in user space: {in_user_made}"
            ));
        }
        // With the records in the kernel an HTTP/1.1 tunnel is spliced (no byte through
        // user space); an HTTP/2 stream's frames are handed through; the rest is copied.
        let want_relay = match (gw, kernel) {
            (Gateway::H2, _) => "relay=frames",
            (_, true) => "relay=splice",
            (_, false) => "relay=copy",
        };
        let relays: Vec<String> = lines.iter().map(|l| word(l, "relay=")).collect();
        if relays.iter().any(|r| r != want_relay) {
            return Err(format!(
                "{label}: the tunnels were relayed as {relays:?} (sessions {sessions:?}), want {want_relay} for each"
            ));
        }
    }
    println!(
        "RDR-VM ktls kernel_tls_expected={expect_kernel} bulk16MiB_seconds_ktls_allowed={:.3} bulk16MiB_seconds_user_space={:.3} ratio_user_over_allowed={:.2} bulk16MiB_seconds_h2_ktls_allowed={:.3}",
        seconds[0],
        seconds[1],
        seconds[1] / seconds[0],
        seconds[2]
    );
    Ok(())
}

/// A restarted daemon adopts the pinned programs (one attachment each, not two) and traffic
/// flows again.
fn adopt(lab: &mut Lab, dst: SocketAddr) -> Result<(), String> {
    lab.start_daemon(&[]);
    lab.wait_daemon_log("adopted pinned eBPF programs");
    // `cgroup show DIR effective` works with every bpftool on every kernel we support.
    let shown = lab.bpftool(&format!(
        "-j cgroup show {} effective",
        lab.cg_root.display()
    ));
    for name in redirector_common::names::PROGRAMS {
        let n = shown.matches(&format!("\"{name}\"")).count();
        if n != 1 {
            return Err(format!("{name} attached {n} times: {shown}"));
        }
    }
    whoami(lab, dst)
}

// ---- connect hook cost, side by side ----

/// `hookbench ROUNDS CONNECTS BIN…`: one lab per redirector binary, all up at once; in each
/// round every lab's pod makes CONNECTS redirected connects, and the kernel's BPF run-time
/// statistics give the mean cost of `rdr_connect4` (and of `rdr_sockops`) per call. Prints
/// `RDR-HOOK <bin> <round> connect4_ns=… sockops_ns=…` and the median per binary.
fn hookbench(args: &[String]) -> i32 {
    let [rounds, connects, bins @ ..] = args else {
        eprintln!("usage: hookbench ROUNDS CONNECTS BIN…");
        return 2;
    };
    let rounds: usize = rounds.parse().expect("rounds");
    let connects: usize = connects.parse().expect("connects");
    let stats = "/proc/sys/kernel/bpf_stats_enabled";
    let prev = std::fs::read_to_string(stats).unwrap_or_else(|_| "0".into());
    let mut labs = Vec::new();
    for bin in bins {
        let mut lab = Lab::new();
        lab.add_pod();
        lab.add_internet(1, WHOAMI_PORT);
        let node = lab.node.clone();
        let args = lab.daemon_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let i = lab.spawn_in(&node, "redirector", Path::new(bin), &args);
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while lab.node_http_get("/readyz").map(|r| r.0) != Some(200) {
            assert!(lab.procs[i].alive(), "{bin} exited: {}", lab.procs[i].log());
            assert!(std::time::Instant::now() < end, "{bin} not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        labs.push((bin.clone(), lab));
    }
    std::fs::write(stats, "1").expect("enable bpf stats");
    let dst = SocketAddr::new(IpAddr::V4(Lab::inet_v4(0)), WHOAMI_PORT).to_string();
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); labs.len()];
    for r in 0..rounds {
        for (k, (bin, lab)) in labs.iter().enumerate() {
            let before = prog_stats(lab);
            let o = pod_client(lab, &["connects", &connects.to_string(), &dst]);
            assert!(o.status.success(), "{}", out(&o));
            let after = prog_stats(lab);
            let ns = |i: usize| {
                let (t, n) = (after[i].0 - before[i].0, after[i].1 - before[i].1);
                if n == 0 {
                    f64::NAN
                } else {
                    t as f64 / n as f64
                }
            };
            println!(
                "RDR-HOOK {bin} round={r} connect4_ns={:.0} calls={} sockops_ns={:.0}",
                ns(0),
                after[0].1 - before[0].1,
                ns(1)
            );
            per[k].push(ns(0));
        }
    }
    let _ = std::fs::write(stats, prev.trim());
    for (k, (bin, _)) in labs.iter().enumerate() {
        let mut v = per[k].clone();
        v.sort_by(f64::total_cmp);
        println!("RDR-HOOK-MEDIAN {bin} connect4_ns={:.0}", v[v.len() / 2]);
    }
    0
}

/// (run_time_ns, run_cnt) of rdr_connect4 and rdr_sockops under the lab's pins.
fn prog_stats(lab: &Lab) -> [(u64, u64); 2] {
    ["rdr_connect4", "rdr_sockops"].map(|p| {
        let v: serde_json::Value = serde_json::from_str(&lab.bpftool(&format!(
            "-j prog show pinned {}",
            lab.pin_root.join(p).display()
        )))
        .expect("bpftool json");
        (
            v["run_time_ns"].as_u64().unwrap_or(0),
            v["run_cnt"].as_u64().unwrap_or(0),
        )
    })
}

// ---- pod side ----

fn client(args: &[String]) -> i32 {
    let r = match args {
        [m, a] if m == "whoami" => client_whoami(parse(a)),
        [m, mib, a] if m == "bulk" => client_bulk(mib.parse().expect("MiB"), parse(a)),
        [m, a] if m == "banner" => client_banner(parse(a)),
        [m, a] if m == "refused" => client_refused(parse(a)),
        [m, n, a] if m == "connects" => client_connects(n.parse().expect("count"), parse(a)),
        [m, port, rounds, dsts @ ..] if m == "reuse" && !dsts.is_empty() => client_reuse(
            port.parse().expect("port"),
            rounds.parse().expect("rounds"),
            &dsts.iter().map(|d| parse(d)).collect::<Vec<_>>(),
        ),
        _ => Err("usage: client whoami|banner|refused ADDR | reuse PORT ROUNDS ADDR…".into()),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            println!("error: {e}");
            1
        }
    }
}

fn parse(a: &str) -> SocketAddr {
    a.parse().unwrap_or_else(|e| panic!("bad address {a}: {e}"))
}

fn connect(dst: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&dst, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).ok();
    s.set_write_timeout(Some(IO_TIMEOUT)).ok();
    Ok(s)
}

/// Sends `ping`, half-closes, prints the target's first line, then the echo and whether EOF
/// followed.
fn client_whoami(dst: SocketAddr) -> Result<(), String> {
    let mut s = connect(dst)?;
    s.write_all(b"ping").map_err(|e| format!("write: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut all = String::new();
    s.read_to_string(&mut all)
        .map_err(|e| format!("read: {e} after {all:?}"))?;
    let (first, rest) = all.split_once('\n').ok_or(format!("no line in {all:?}"))?;
    println!("{first}");
    println!("echo={rest} eof=yes");
    Ok(())
}

/// Sends `mib` MiB of a pattern while reading, half-closes, and checks that the target's
/// answer is its first line and then exactly the pattern, then EOF. Prints the seconds it
/// took.
fn client_bulk(mib: usize, dst: SocketAddr) -> Result<(), String> {
    let s = connect(dst)?;
    let data: Vec<u8> = (0..mib << 20).map(|i| (i % 251) as u8).collect();
    let started = std::time::Instant::now();
    let mut w = s.try_clone().map_err(|e| format!("clone: {e}"))?;
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent)?;
        w.shutdown(Shutdown::Write)
    });
    let mut all = Vec::with_capacity(data.len() + 128);
    (&s).read_to_end(&mut all)
        .map_err(|e| format!("read: {e} after {} bytes", all.len()))?;
    writer
        .join()
        .map_err(|_| "writer panicked".to_owned())?
        .map_err(|e| format!("write: {e}"))?;
    let took = started.elapsed().as_secs_f64();
    let nl = all
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no first line")?;
    if all[nl + 1..] != data[..] {
        return Err(format!(
            "echo differs: {} bytes back for {} sent",
            all.len() - nl - 1,
            data.len()
        ));
    }
    println!("bulk ok seconds={took:.3}");
    Ok(())
}

/// `n` connections one after the other, each closed at once.
fn client_connects(n: usize, dst: SocketAddr) -> Result<(), String> {
    for i in 0..n {
        connect(dst).map_err(|e| format!("connection {i}: {e}"))?;
    }
    Ok(())
}

/// Server-first: the client sends nothing and must still get the banner.
fn client_banner(dst: SocketAddr) -> Result<(), String> {
    let s = connect(dst)?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    print!("{line}");
    Ok(())
}

/// The connect must be refused (ECONNREFUSED: redirected to a port nobody listens on).
fn client_refused(dst: SocketAddr) -> Result<(), String> {
    match TcpStream::connect_timeout(&dst, IO_TIMEOUT) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            println!("refused");
            Ok(())
        }
        Err(e) => Err(format!("expected connection refused, got {e}")),
        Ok(s) => Err(format!(
            "connected to {:?}: not failed closed",
            s.peer_addr()
        )),
    }
}

/// `rounds` connections from source port `port`, round i to `dsts[i % len]`, each closed
/// with an RST (SO_LINGER 0) right after the target's first line, which must name the
/// round's own destination.
fn client_reuse(port: u16, rounds: u32, dsts: &[SocketAddr]) -> Result<(), String> {
    for i in 0..rounds {
        let dst = dsts[i as usize % dsts.len()];
        let mut s = bound_connect(port, dst).map_err(|e| format!("round {i}: {e}"))?;
        s.write_all(b"ping")
            .map_err(|e| format!("round {i}: write: {e}"))?;
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .map_err(|e| format!("round {i}: read: {e}"))?;
        if !line.starts_with(&format!("local={dst} ")) {
            return Err(format!("round {i} to {dst} reached {line:?}"));
        }
        rst_on_close(&s).map_err(|e| format!("round {i}: linger: {e}"))?;
        drop(s);
    }
    println!("rounds={rounds} ok");
    Ok(())
}

/// SO_LINGER with a zero timeout: close() sends an RST and leaves no TIME_WAIT.
fn rst_on_close(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is open (borrowed from `s`); the option points to a live `linger` of
    // the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A TCP connection from local port `port` (SO_REUSEADDR, so the next round can take it
/// again at once).
fn bound_connect(port: u16, dst: SocketAddr) -> Result<TcpStream, String> {
    let v6 = dst.is_ipv6();
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: socket(2) takes integers only; the fd is checked and then owned by the
    // TcpStream, which closes it on every path.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: `fd` is open (owned by `s`); the option points to a live c_int of its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let local = if v6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
    };
    let to = |a: SocketAddr| nix::sys::socket::SockaddrStorage::from(a);
    let la = to(local);
    // SAFETY: `fd` is open; pointer and length come from one live SockaddrStorage.
    let rc = unsafe {
        libc::bind(
            fd,
            nix::sys::socket::SockaddrLike::as_ptr(&la),
            nix::sys::socket::SockaddrLike::len(&la),
        )
    };
    if rc < 0 {
        return Err(format!("bind {local}: {}", std::io::Error::last_os_error()));
    }
    let ra = to(dst);
    // SAFETY: as for bind.
    let rc = unsafe {
        libc::connect(
            fd,
            nix::sys::socket::SockaddrLike::as_ptr(&ra),
            nix::sys::socket::SockaddrLike::len(&ra),
        )
    };
    if rc < 0 {
        return Err(format!(
            "connect {dst}: {}",
            std::io::Error::last_os_error()
        ));
    }
    s.set_read_timeout(Some(IO_TIMEOUT)).ok();
    s.set_write_timeout(Some(IO_TIMEOUT)).ok();
    Ok(s)
}
