//! `cargo xtask bench`: the redirector against the classic alternatives, side by side, in the
//! closed test network (`tests::lab`). It never fails on a number; it reports.
//!
//! Three labs:
//! - **A** (`tests::chain::Chain`): pod1 (enabled) → redirector (gateway route via Squid) →
//!   gateway simulator speaking HTTP/1.1 only → target: `gateway`; pod2 (added after the
//!   daemon started, so never enabled, with a route to 203.0.113.0/24) hosts `direct` and
//!   `env`; pod3 (same) hosts `classic` (iptables REDIRECT + redsocks + stunnel through the
//!   same Squid and gateway).
//! - **B** (`tests::lab::Lab`): pod1 (enabled) → a redirector without a gateway or proxy
//!   (default route `direct`) → target: `relay`, the capture + relay cost alone.
//! - **C** (`tests::chain::Chain`, built like A by [`chain_lab`]): pod1 (enabled) →
//!   redirector → Squid → a gateway simulator offering ALPN h2 → target: `gateway-h2`, every
//!   tunnel an HTTP/2 CONNECT stream on a shared session.
//!
//! The target is `rdr-bench-client serve` at 203.0.113.14:8080 (`bulk.azure.test:8080`) in
//! each lab's `inet` namespace; the load generator is `rdr-bench-client` in the pods.
mod against;
mod classic;
mod report;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use ::tests::{
    chain::{self, Chain, GATEWAY_NAME, GATEWAY_V4, Gateway, PROXY_PASSWORD, PROXY_USER, SQUID_V4},
    lab::{Lab, Pod},
};
use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::Value;

use crate::{exec, setup};

pub use report::{Report, Results};

/// The bench target: `bulk.azure.test:8080` (allowed by the gateway simulator by name and IP).
const TARGET_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 14);
const TARGET_PORT: u16 = 8080;
const TARGET_HOST: &str = "bulk.azure.test:8080";

#[derive(Args)]
pub struct BenchArgs {
    /// Rounds of every scenario; medians and spread are over rounds [5; --quick: 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per timed scenario (request/response, new connections) [10; --quick: 2].
    #[arg(long)]
    seconds: Option<f64>,
    /// One short round of everything: a smoke check of the whole suite (~1-2 minutes).
    #[arg(long)]
    quick: bool,
    /// MiB per bulk download [256; --quick: 64].
    #[arg(long)]
    bulk_mib: Option<u64>,
    /// Idle tunneled connections for the memory scenario [10000].
    #[arg(long)]
    idle_conns: Option<usize>,
    /// Do not run `cargo build --release`; use the release binaries already built.
    #[arg(long)]
    no_build: bool,
    /// Record a CPU profile (`perf record -g`) of each proxy path's processes during the
    /// one-connection bulk download and upload; the top of `perf report` goes to
    /// `target/bench/profile-<path>.txt` and `profile-<path>-up.txt`.
    #[arg(long)]
    profile: bool,
    /// Cargo features for the redirector's release build (e.g. `alloc-jemalloc` or
    /// `alloc-mimalloc,crypto-aws-lc`), to compare allocator or crypto variants. The variant
    /// is built into `target/bench-build/<features>/`, so the default `target/release`
    /// binary stays as it is; the other binaries come from `target/release`.
    #[arg(long, value_name = "LIST", conflicts_with = "against")]
    features: Option<String>,
    /// Compare this tree with another revision (a commit, branch, tag, `HEAD~1`…) in one
    /// invocation: that revision's daemon is built in its own worktree under
    /// `target/bench-against/` (cached per commit) and runs in its own labs next to this
    /// tree's; the rounds alternate (rev, this tree, rev, this tree, …) and the report gives,
    /// per metric and path, this tree / rev as the median and min–max of the per-round
    /// ratios. Only the daemon is swapped: the labs, load generator, simulator and this
    /// harness are this tree's. Measures direct (a control: no daemon, so its ratio is the
    /// machine's noise), relay, gateway and gateway-h2; not classic or env.
    #[arg(long, value_name = "REV", conflicts_with = "profile")]
    against: Option<String>,
    /// Worker threads of every daemon the bench starts; 0 leaves the daemon's default (one
    /// per CPU it may use) [1: what the shipped DaemonSet runs, its 500m CPU limit giving one].
    #[arg(long, value_name = "N")]
    daemon_workers: Option<usize>,
}

/// The ways a pod's connection can reach the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathId {
    Direct,
    Relay,
    Gateway,
    GatewayH2,
    Classic,
    Env,
}

pub const PATHS: [PathId; 6] = [
    PathId::Direct,
    PathId::Relay,
    PathId::Gateway,
    PathId::GatewayH2,
    PathId::Classic,
    PathId::Env,
];

/// The paths through our full chain (Squid and a gateway simulator), one lab each.
pub const GATEWAY_PATHS: [PathId; 2] = [PathId::Gateway, PathId::GatewayH2];

impl PathId {
    pub fn name(self) -> &'static str {
        match self {
            PathId::Direct => "direct",
            PathId::Relay => "relay",
            PathId::Gateway => "gateway",
            PathId::GatewayH2 => "gateway-h2",
            PathId::Classic => "classic",
            PathId::Env => "env",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            PathId::Direct => {
                "pod netns with a route to the target via the node, cgroup not enabled: no capture, no proxy (the floor)"
            }
            PathId::Relay => {
                "second lab: redirector without --gateway-url/--proxy-* (default route `direct`): connect hook + listener in the pod netns + relay from the node"
            }
            PathId::Gateway => {
                "redirector → Squid (CONNECT gw.arc.test:443, Basic auth) → TLS to the gateway simulator, which speaks HTTP/1.1 only (ALPN http/1.1) → CONNECT bulk.azure.test:8080 inside; one TLS session per tunnel, taken from the daemon's pre-established (warm) sessions when one is ready"
            }
            PathId::GatewayH2 => {
                "third lab (C), as `gateway` but the gateway simulator offers ALPN h2 (`--offer-h2`): redirector → Squid (CONNECT gw.arc.test:443, Basic auth) → TLS (h2) to the gateway simulator → each tunnel an HTTP/2 CONNECT stream to bulk.azure.test:8080 on one shared session"
            }
            PathId::Classic => {
                "iptables REDIRECT in the pod netns → redsocks (http-connect) → local stunnel client (protocol=connect via Squid, Basic auth, TLS to the gateway) → redsocks' CONNECT 203.0.113.14:8080 inside TLS"
            }
            PathId::Env => {
                "no capture; the client itself does CONNECT gw.arc.test:443 via Squid (Basic auth), TLS (rustls) to the gateway, CONNECT bulk.azure.test:8080 inside — what `https_proxy=https://gw…` does, plus the Squid hop curl cannot chain"
            }
        }
    }
}

struct Cfg {
    rounds: usize,
    seconds: f64,
    quick: bool,
    bulk_bytes: u64,
    idle_conns: usize,
    curl_reps: usize,
    profile: bool,
    /// Environment of every daemon (its runtime's size).
    daemon_env: Vec<(String, String)>,
}

/// The environment that gives a daemon `n` runtime workers: its own setting, and tokio's
/// variable, which a revision older than `worker-threads` reads (`--against`). Empty for 0.
fn workers_env(n: usize) -> Vec<(String, String)> {
    if n == 0 {
        return Vec::new();
    }
    ["REDIRECTOR_WORKER_THREADS", "TOKIO_WORKER_THREADS"]
        .into_iter()
        .map(|k| (k.to_owned(), n.to_string()))
        .collect()
}

/// The paths `--against` measures: every path that runs the daemon, and `direct` as a
/// control (no daemon: its ratio is the machine's noise between the two sides' rounds).
pub const AGAINST_PATHS: [PathId; 4] = [
    PathId::Direct,
    PathId::Relay,
    PathId::Gateway,
    PathId::GatewayH2,
];

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    // A bad revision is refused before anything is built or set up.
    let against = a.against.as_deref().map(against::resolve).transpose()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmark creates network namespaces and attaches eBPF programs: run it as root"
        );
    }
    let daemon_workers = a.daemon_workers.unwrap_or(1);
    let mut cfg = Cfg {
        rounds: a.rounds.unwrap_or(if a.quick { 1 } else { 5 }).max(1),
        seconds: a.seconds.unwrap_or(if a.quick { 2.0 } else { 10.0 }),
        quick: a.quick,
        bulk_bytes: a.bulk_mib.unwrap_or(if a.quick { 64 } else { 256 }) << 20,
        idle_conns: a.idle_conns.unwrap_or(10_000),
        curl_reps: if a.quick { 10 } else { 30 },
        profile: a.profile,
        daemon_env: workers_env(daemon_workers),
    };
    let mut notes = Vec::new();
    notes.push(match daemon_workers {
        0 => "daemon runtime workers: the daemon's default (one per CPU it may use)".to_owned(),
        n => format!(
            "daemon runtime workers: {n} (REDIRECTOR_WORKER_THREADS, and TOKIO_WORKER_THREADS for revisions before that setting); the shipped DaemonSet's 500m CPU limit gives 1"
        ),
    });
    setup::run()?;
    if against.is_none() {
        notes.extend(ensure_classic_packages()?);
    }
    let features = a
        .features
        .as_deref()
        .map(normalize_features)
        .filter(|f| !f.is_empty());
    let bins = release_bins(a.no_build, features.as_deref())?;
    let rev_daemon = against.as_ref().map(against::daemon).transpose()?;
    let nofile = raise_nofile(&mut notes);
    let started = Instant::now();
    // Per process, the most descriptors per idle connection: the HTTP/1.1 daemon and
    // simulator hold two each (HTTP/2 ones fewer: a stream shares its session's socket); the
    // client and the server one. Each gateway lab has its own daemon and simulator and the
    // memory scenarios run one after the other, each closing its connections before the next
    // starts (`idle_conns` waits, bounded, for the daemon to release them), so one lab's
    // share is the whole limit.
    let fit = (nofile.saturating_sub(256) / 2) as usize;
    if cfg.idle_conns > fit {
        notes.push(format!(
            "idle connections: {} requested, {fit} measured: RLIMIT_NOFILE is capped at {nofile} here (no CAP_SYS_RESOURCE to raise the hard limit) and the daemon needs two descriptors per tunneled connection",
            cfg.idle_conns
        ));
        cfg.idle_conns = fit;
    }

    let mut rep = Report::new(report::machine_info());
    rep.config = vec![
        ("rounds".into(), cfg.rounds.to_string()),
        (
            "seconds per timed scenario".into(),
            format!("{}", cfg.seconds),
        ),
        (
            "bulk download".into(),
            format!(
                "{} MiB per scenario (split over the connections)",
                cfg.bulk_bytes >> 20
            ),
        ),
        ("idle connections".into(), cfg.idle_conns.to_string()),
        ("curl repetitions".into(), cfg.curl_reps.to_string()),
        ("quick".into(), cfg.quick.to_string()),
        (
            "redirector features".into(),
            features
                .clone()
                .unwrap_or_else(|| "default (no --features)".into()),
        ),
        ("binaries".into(), bins.describe()),
    ];
    println!("bench: AES-128-GCM reference (openssl speed -evp aes-128-gcm, 16384-byte blocks)");
    match openssl_aes_gcm() {
        Ok(v) => rep.aes_gcm_bytes_per_s = Some(v),
        Err(e) => notes.push(format!("openssl speed failed: {e:#}")),
    }

    if let (Some(rev), Some((bin, built))) = (&against, rev_daemon) {
        notes.push(built.clone());
        return run_against(&cfg, &bins, rep, notes, started, rev, &bin, built);
    }

    println!(
        "bench: building the closed networks (lab A: chain with Squid and an HTTP/1.1 gateway simulator; lab B: relay; lab C: chain with an h2 gateway simulator)"
    );
    let mut bench = Bench::new(&bins, &cfg, None, &PATHS)?;
    rep.configs = bench.configs.clone();
    bench.probe_paths();
    bench.idle_rss();
    for round in 0..cfg.rounds {
        println!("bench: round {}/{}", round + 1, cfg.rounds);
        bench.round(round);
    }
    println!(
        "bench: memory per idle connection ({} connections)",
        cfg.idle_conns
    );
    bench.memory();
    rep.results = std::mem::take(&mut bench.results);
    rep.path_errors = bench
        .broken
        .iter()
        .map(|(p, e)| (p.name().to_owned(), e.clone()))
        .collect();
    notes.append(&mut bench.notes);
    rep.tunnels = std::mem::take(&mut bench.tunnels);
    drop(bench);

    rep.notes = notes;
    rep.duration_s = started.elapsed().as_secs_f64();
    let dir = report::out_dir();
    let written = rep.write(&dir)?;
    println!("\n{}", rep.summary());
    for w in written {
        println!("bench: wrote {}", w.display());
    }
    Ok(())
}

/// `--against`: two sets of labs, one running the revision's daemon and one this tree's,
/// measured round by round in turn (rev, this, rev, this, …); then the comparison.
#[expect(
    clippy::too_many_arguments,
    reason = "the pieces `run` has already set up, handed over once"
)]
fn run_against(
    cfg: &Cfg,
    bins: &Bins,
    mut rep: Report,
    mut notes: Vec<String>,
    started: Instant,
    rev: &against::Rev,
    rev_bin: &Path,
    rev_built: String,
) -> anyhow::Result<()> {
    rep.config.push((
        "--against".into(),
        format!(
            "{} = {} ({}); its daemon: {}; paths: {}",
            rev.given,
            rev.sha,
            rev.title,
            rev_bin.display(),
            AGAINST_PATHS.map(PathId::name).join(", ")
        ),
    ));
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(against::workspace_root())
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    rep.config.push((
        "this tree".into(),
        format!(
            "{}{}",
            report::cmd_line(
                Command::new("git")
                    .args(["log", "-1", "--format=%h %s"])
                    .current_dir(against::workspace_root())
            )
            .unwrap_or_default(),
            if dirty { " + uncommitted changes" } else { "" }
        ),
    ));
    println!(
        "bench: building the closed networks twice: labs A, B, C with the daemon of {} ({}), then with this tree's",
        rev.given, rev.title
    );
    let mut base = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Bench::new(bins, cfg, Some(rev_bin), &AGAINST_PATHS)
    }))
    .map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or(p.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        anyhow::anyhow!(
            "the daemon of {} ({}) did not start in this tree's labs; only the daemon is swapped,              so a revision whose daemon does not take the flags this harness passes cannot be              compared: {msg}",
            rev.given,
            rev.title
        )
    })??;
    let mut this = Bench::new(bins, cfg, None, &AGAINST_PATHS)?;
    for (who, b) in [("rev", &mut base), ("this tree", &mut this)] {
        println!("bench: probing the paths of {who}");
        b.probe_paths();
    }
    base.idle_rss();
    this.idle_rss();
    for round in 0..cfg.rounds {
        println!(
            "bench: round {}/{}, rev {} (daemon {})",
            round + 1,
            cfg.rounds,
            rev.given,
            rev.short()
        );
        base.round(round);
        println!("bench: round {}/{}, this tree", round + 1, cfg.rounds);
        this.round(round);
    }
    println!(
        "bench: memory per idle connection ({} connections), rev then this tree",
        cfg.idle_conns
    );
    base.memory();
    this.memory();

    let mut sides = Vec::new();
    for (who, mut b) in [("rev", base), ("this tree", this)] {
        let mut r = Report::new(rep.machine.clone());
        r.config = rep.config.clone();
        r.aes_gcm_bytes_per_s = rep.aes_gcm_bytes_per_s;
        r.configs = b.configs.clone();
        r.results = std::mem::take(&mut b.results);
        r.path_errors = b
            .broken
            .iter()
            .map(|(p, e)| (p.name().to_owned(), e.clone()))
            .collect();
        for (p, e) in &r.path_errors {
            notes.push(format!("{who}: path {p} broken: {e}"));
        }
        notes.extend(b.notes.drain(..).map(|n| format!("{who}: {n}")));
        notes.extend(b.tunnels.iter().map(|n| format!("{who}: {n}")));
        r.tunnels = std::mem::take(&mut b.tunnels);
        drop(b);
        sides.push(r);
    }
    let rows = against::compare(&sides[0].results, &sides[1].results, &AGAINST_PATHS);
    let cmp = against::Comparison {
        rev,
        rev_daemon: rev_built,
        date: rep.date.clone(),
        duration_s: started.elapsed().as_secs_f64(),
        machine: &rep.machine,
        config: &rep.config,
        notes: &notes,
        rows,
    };
    let dir = report::out_dir();
    let mut written = cmp.write(&dir)?;
    // Each side's own full report, as a run without --against would write it.
    for (name, r) in ["rev", "this"].into_iter().zip(sides.iter_mut()) {
        r.notes = notes.clone();
        r.duration_s = cmp.duration_s;
        written.extend(r.write(&dir.join(format!("against-{}-{name}", rev.short())))?);
    }
    println!(
        "
=== cargo xtask bench --against {}: this tree / {} ({}), {} round(s), {:.0} s ===",
        rev.given, rev.title, rev.sha, cfg.rounds, cmp.duration_s
    );
    print!("{}", against::text_table(rev, &cmp.rows));
    for w in written {
        println!("bench: wrote {}", w.display());
    }
    Ok(())
}

/// The classic path needs redsocks, stunnel and iptables from Debian.
fn ensure_classic_packages() -> anyhow::Result<Vec<String>> {
    let want = [
        ("redsocks", &["redsocks"][..]),
        ("stunnel4", &["stunnel", "stunnel4"][..]),
        ("iptables", &["iptables"][..]),
    ];
    let missing: Vec<&str> = want
        .iter()
        .filter(|(_, bins)| classic::find_bin(bins).is_none())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let list = missing.join(" ");
    println!(
        "bench: installing {list} with apt-get (the `classic` comparison path: iptables REDIRECT + redsocks + stunnel)"
    );
    exec::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(vec![format!(
        "installed with apt-get for the classic path: {list}"
    )])
}

struct Bins {
    client: PathBuf,
    redirector: PathBuf,
    /// Where the release binaries other than a feature variant of the redirector live.
    release: PathBuf,
}

impl Bins {
    fn describe(&self) -> String {
        let mut s = format!("release profile ({})", self.release.display());
        if self.redirector.parent() != Some(self.release.as_path()) {
            let _ = write!(s, "; redirector: {}", self.redirector.display());
        }
        s
    }
}

/// A feature list in one canonical form (sorted, no duplicates, comma-separated), so that
/// `a,b` and `b a` share one build directory.
fn normalize_features(list: &str) -> String {
    let mut v: Vec<&str> = list
        .split([',', ' '])
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .collect();
    v.sort_unstable();
    v.dedup();
    v.join(",")
}

/// The build directory of a feature variant under `<target>/bench-build/`.
fn features_dir(features: &str) -> String {
    features
        .chars()
        .map(|c| match c {
            ',' => '+',
            c if c.is_ascii_alphanumeric() || c == '-' || c == '_' => c,
            _ => '_',
        })
        .collect()
}

/// The features the `redirector` package defines (`cargo metadata`), for error messages.
fn redirector_features() -> anyhow::Result<Vec<String>> {
    let out = exec::output(exec::cargo().args(["metadata", "--no-deps", "--format-version", "1"]))?;
    let v: Value = serde_json::from_str(&out)?;
    let pkg = v["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "redirector"))
        .context("no redirector package in cargo metadata")?;
    Ok(pkg["features"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default())
}

/// Builds the release binaries and points `tests::lab::workspace_bin` at them. With
/// `features`, the redirector is built a second time with them into its own target
/// directory, and that binary is the one the labs run.
fn release_bins(no_build: bool, features: Option<&str>) -> anyhow::Result<Bins> {
    if !no_build {
        println!(
            "bench: building release binaries (the daemon with its eBPF programs, simulator, bench client)"
        );
        exec::run(exec::cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_owned();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or(root.join("target"));
    let rel = target.join("release");
    let redirector = match features {
        None => rel.join("redirector"),
        Some(f) => {
            let dir = target.join("bench-build").join(features_dir(f));
            if !no_build {
                println!(
                    "bench: building the redirector with --features {f} into {}",
                    dir.display()
                );
                let built = exec::run(
                    exec::cargo()
                        .args(["build", "--release", "-p", "redirector", "--features", f])
                        .arg("--target-dir")
                        .arg(&dir),
                );
                if let Err(e) = built {
                    let known = match redirector_features() {
                        Ok(v) if v.is_empty() => "none".to_owned(),
                        Ok(v) => v.join(", "),
                        Err(e) => format!("unknown ({e:#})"),
                    };
                    bail!(
                        "the redirector does not build with --features {f:?} (cargo's message is above); \
                         features the redirector package defines: {known}\n{e:#}"
                    );
                }
            }
            dir.join("release").join("redirector")
        }
    };
    let bins = [
        (redirector.clone(), "RDR_BIN_REDIRECTOR"),
        (rel.join("rdr-testsrv"), "RDR_BIN_RDR_TESTSRV"),
        (rel.join("rdr-gateway-sim"), "RDR_BIN_RDR_GATEWAY_SIM"),
    ];
    for (p, var) in bins {
        if !p.exists() {
            bail!("{} missing; run without --no-build", p.display());
        }
        // SAFETY: still single-threaded here; nothing reads the environment concurrently.
        unsafe { std::env::set_var(var, &p) };
    }
    let client = rel.join("rdr-bench-client");
    if !client.exists() {
        bail!("{} missing; run without --no-build", client.display());
    }
    Ok(Bins {
        client,
        redirector,
        release: rel,
    })
}

/// 10,000 idle connections need two descriptors each in the daemon and in the simulator,
/// which inherit this limit. Returns the limit in force.
fn raise_nofile(notes: &mut Vec<String>) -> u64 {
    // SAFETY: rlimit is plain integers, so the zeroed value is valid; getrlimit writes into
    // and setrlimit reads from that live local only.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        let want: libc::rlim_t = 262_144;
        let raised = libc::rlimit {
            rlim_cur: want.max(r.rlim_cur),
            rlim_max: want.max(r.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return raised.rlim_cur;
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        notes.push(format!(
            "could not raise RLIMIT_NOFILE to {want}; using the hard limit {}",
            r.rlim_max
        ));
        r.rlim_cur
    }
}

/// `openssl speed -evp aes-128-gcm` on 16384-byte blocks, in bytes per second.
fn openssl_aes_gcm() -> anyhow::Result<f64> {
    let out = exec::output(Command::new("openssl").args([
        "speed",
        "-evp",
        "aes-128-gcm",
        "-seconds",
        "3",
        "-bytes",
        "16384",
        "-mr",
    ]))?;
    parse_openssl_mr(&out).context("no +F line for 16384 bytes in `openssl speed -mr` output")
}

/// Parses `openssl speed -mr`: `+H:<sizes…>` then `+F:<n>:<alg>:<bytes/s per size…>`.
fn parse_openssl_mr(out: &str) -> Option<f64> {
    let sizes: Vec<&str> = out
        .lines()
        .find_map(|l| l.strip_prefix("+H:"))?
        .split(':')
        .collect();
    let col = sizes.iter().position(|s| s.trim() == "16384")?;
    let f = out.lines().find_map(|l| l.strip_prefix("+F:"))?;
    f.split(':').nth(2 + col)?.trim().parse().ok()
}

// ---------------------------------------------------------------------------------------

struct Bench<'a> {
    cfg: &'a Cfg,
    client: String,
    a: Chain,
    b: Lab,
    c: Chain,
    classic: Option<classic::Classic>,
    broken: BTreeMap<PathId, String>,
    results: Results,
    notes: Vec<String>,
    /// How each gateway path's tunnels were opened (`redirector_gateway_tunnels_total`).
    tunnels: Vec<String>,
    configs: Vec<(String, String)>,
    ca: String,
    /// The paths this bench measures (all of [`PATHS`], or [`AGAINST_PATHS`]).
    paths: Vec<PathId>,
}

/// A chain lab with one (enabled) pod: the bench server in place of the chain's whoami echo
/// on 8080, Squid with Basic auth, the gateway simulator of `kind`, and the daemon dialing
/// the gateway through Squid. Returns it with the daemon's command line (password
/// redacted) for the report.
fn chain_lab(
    client: &str,
    kind: Gateway,
    daemon: Option<&Path>,
    env: &[(String, String)],
) -> (Chain, String) {
    let mut chain = Chain::new(1);
    chain.lab.daemon_bin = daemon.map(Path::to_path_buf);
    chain.lab.daemon_env = env.to_vec();
    if let Some(i) = chain
        .lab
        .procs
        .iter()
        .position(|p| p.name == "testsrv-whoami")
    {
        chain.lab.procs.remove(i);
    }
    let inet = format!("{}-inet", chain.lab.id);
    start_server(&mut chain.lab, &inet, client);
    chain.start_squid(true);
    chain.start_gateway(kind);
    chain.start_daemon(&[], "info");
    let mut flags = chain.lab.daemon_args();
    flags.extend(chain.daemon_flags("***"));
    (chain, format!("redirector {}", flags.join(" ")))
}

impl<'a> Bench<'a> {
    /// Three labs running `daemon` (None: this tree's), measuring `paths`.
    fn new(
        bins: &Bins,
        cfg: &'a Cfg,
        daemon: Option<&Path>,
        paths: &[PathId],
    ) -> anyhow::Result<Bench<'a>> {
        let client = bins.client.to_str().context("utf-8 path")?.to_owned();
        let mut configs = Vec::new();

        // Lab A: the chain with an HTTP/1.1 gateway.
        let (mut a, line) = chain_lab(&client, Gateway::Normal, daemon, &cfg.daemon_env);
        configs.push((
            "gateway: redirector (lab A node netns; the simulator offers http/1.1 only)".into(),
            line,
        ));
        // Pods 2 and 3 come after the daemon started, so its --cgroup list does not name them.
        let p2 = a.lab.add_pod();
        let p3 = a.lab.add_pod();
        for p in [p2, p3] {
            route_to_inet(&a.lab.pods[p]);
        }
        let mut hosts: Vec<(&str, IpAddr)> = chain::TARGETS
            .iter()
            .map(|(n, ip)| (*n, IpAddr::V4(*ip)))
            .collect();
        hosts.push((GATEWAY_NAME, IpAddr::V4(GATEWAY_V4)));
        a.lab.set_pod_hosts(&hosts);
        let ca = a.ca_pem.display().to_string();

        // Lab B: relay only.
        let mut b = Lab::new();
        b.add_pod();
        let inet_b = b.add_host("inet", &[TARGET_V4], &[]);
        start_server(&mut b, &inet_b, &client);
        let bulk = [("bulk.azure.test", IpAddr::V4(TARGET_V4))];
        b.set_node_hosts(&bulk);
        b.set_pod_hosts(&bulk);
        b.daemon_bin = daemon.map(Path::to_path_buf);
        b.daemon_env = cfg.daemon_env.clone();
        b.start_daemon(&[]);
        configs.push((
            "relay: redirector (lab B node netns)".into(),
            format!("redirector {}", b.daemon_args().join(" ")),
        ));

        // Lab C: the chain with a gateway offering h2.
        let (c, line) = chain_lab(&client, Gateway::H2, daemon, &cfg.daemon_env);
        configs.push((
            "gateway-h2: redirector (lab C node netns; the simulator offers h2, --offer-h2)".into(),
            line,
        ));

        // Many short connections: let TIME_WAIT ports be reused and widen the port range in
        // every namespace of ours (per-netns sysctls; the host's are untouched).
        let mut tuned = Vec::new();
        for id in [&a.lab.id, &b.id, &c.lab.id] {
            for ns in lab_netns(id) {
                let _ = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &ns,
                        "sysctl",
                        "-qw",
                        "net.ipv4.tcp_tw_reuse=1",
                        "net.ipv4.ip_local_port_range=10240 65000",
                    ])
                    .status();
                tuned.push(ns);
            }
        }
        configs.push((
            "sysctls in every lab netns".into(),
            format!(
                "net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range=\"10240 65000\"\n({})",
                tuned.join(", ")
            ),
        ));

        let mut bench = Bench {
            cfg,
            client,
            a,
            b,
            c,
            classic: None,
            broken: BTreeMap::new(),
            results: Results::default(),
            notes: Vec::new(),
            tunnels: Vec::new(),
            configs,
            ca,
            paths: paths.to_vec(),
        };
        if let Some(d) = daemon {
            bench
                .configs
                .push(("daemon binary (every lab)".into(), d.display().to_string()));
        }
        let ns3 = bench.a.lab.pods[2].netns.clone();
        let ca_path = bench.a.ca_pem.clone();
        if paths.contains(&PathId::Classic) {
            match classic::start(
                &mut bench.a.lab,
                &ns3,
                &ca_path,
                &TARGET_V4.to_string(),
                TARGET_PORT,
            ) {
                Ok(c) => {
                    bench.configs.extend(c.configs.iter().cloned());
                    bench.classic = Some(c);
                }
                Err(e) => {
                    bench
                        .broken
                        .insert(PathId::Classic, format!("setup failed: {e:#}"));
                }
            }
        }
        if paths.contains(&PathId::Env) {
            bench.configs.push((
                "env: client flags (pod2)".into(),
                format!("rdr-bench-client … --target {TARGET_V4}:{TARGET_PORT} --host {TARGET_HOST} {}  (BENCH_PROXY_AUTH={PROXY_USER}:***)", bench.env_flags().join(" ")),
            ));
        }
        Ok(bench)
    }

    fn env_flags(&self) -> Vec<String> {
        vec![
            "--env-gateway".into(),
            format!("{GATEWAY_V4}:443"),
            "--env-gateway-name".into(),
            GATEWAY_NAME.into(),
            "--env-ca".into(),
            self.ca.clone(),
            "--env-proxy".into(),
            format!("{SQUID_V4}:3128"),
        ]
    }

    fn pod(&self, p: PathId) -> &Pod {
        match p {
            PathId::Direct | PathId::Env => &self.a.lab.pods[1],
            PathId::Relay => &self.b.pods[0],
            PathId::Gateway => &self.a.lab.pods[0],
            PathId::GatewayH2 => &self.c.lab.pods[0],
            PathId::Classic => &self.a.lab.pods[2],
        }
    }

    /// The chain lab of a gateway path.
    fn chain(&mut self, p: PathId) -> &mut Chain {
        match p {
            PathId::GatewayH2 => &mut self.c,
            _ => &mut self.a,
        }
    }

    /// The lab whose daemon carries a path, with its pinned programs (hook cost).
    fn daemon_labs(&self) -> [(PathId, &Lab); 3] {
        [
            (PathId::Gateway, &self.a.lab),
            (PathId::GatewayH2, &self.c.lab),
            (PathId::Relay, &self.b),
        ]
    }

    fn client(&self, p: PathId, mode: &str, args: &[String]) -> Command {
        let mut c = self.pod(p).cmd(&self.client);
        c.arg(mode).args(args).args([
            "--target",
            &format!("{TARGET_V4}:{TARGET_PORT}"),
            "--host",
            TARGET_HOST,
        ]);
        if p == PathId::Env {
            c.args(self.env_flags());
            c.env("BENCH_PROXY_AUTH", format!("{PROXY_USER}:{PROXY_PASSWORD}"));
        }
        c
    }

    fn daemon_pid(lab: &Lab) -> Option<u32> {
        lab.procs
            .iter()
            .rev()
            .find(|p| p.name == "redirector")
            .map(|p| p.pid())
    }

    /// Processes whose CPU counts as "the proxy" of a path.
    fn proxy_pids(&self, p: PathId) -> Vec<u32> {
        match p {
            PathId::Relay => Self::daemon_pid(&self.b).into_iter().collect(),
            PathId::Gateway => Self::daemon_pid(&self.a.lab).into_iter().collect(),
            PathId::GatewayH2 => Self::daemon_pid(&self.c.lab).into_iter().collect(),
            PathId::Classic => self
                .classic
                .as_ref()
                .map(|c| {
                    vec![
                        self.a.lab.procs[c.redsocks].pid(),
                        self.a.lab.procs[c.stunnel].pid(),
                    ]
                })
                .unwrap_or_default(),
            PathId::Direct | PathId::Env => Vec::new(),
        }
    }

    fn live_paths(&self, round: usize) -> Vec<PathId> {
        // Rotate the order every round so no path always runs first (or last).
        let mut v: Vec<PathId> = self
            .paths
            .iter()
            .copied()
            .filter(|p| !self.broken.contains_key(p))
            .collect();
        if !v.is_empty() {
            let k = round % v.len();
            v.rotate_left(k);
        }
        v
    }

    /// One `GET /small` per path; the server's view of our address proves the way it came.
    fn probe_paths(&mut self) {
        let pod2 = self.a.lab.pods[1].v4.to_string();
        for p in self.paths.clone() {
            if self.broken.contains_key(&p) {
                continue;
            }
            let want = match p {
                PathId::Direct => pod2.clone(),
                PathId::Relay => ::tests::lab::NODE_V4.to_string(),
                _ => GATEWAY_V4.to_string(),
            };
            match run_json(self.client(p, "probe", &[]), Duration::from_secs(30)) {
                Ok(v) => {
                    let peer = v["peer"].as_str().unwrap_or("").to_owned();
                    let ip = peer.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(&peer);
                    if ip == want {
                        println!(
                            "bench: path {:<10} ok: target saw {peer} ({:.1} ms)",
                            p.name(),
                            v["ms"].as_f64().unwrap_or(f64::NAN)
                        );
                    } else {
                        self.broken.insert(p, format!("probe reached the target from {peer}, expected {want}: the path is not what it claims"));
                    }
                }
                Err(e) => {
                    self.broken.insert(p, format!("probe failed: {e:#}"));
                }
            }
            if let Some(e) = self.broken.get(&p) {
                println!("bench: path {:<10} BROKEN: {e}", p.name());
            }
        }
    }

    /// RSS of each fresh daemon before any measured traffic.
    fn idle_rss(&mut self) {
        std::thread::sleep(Duration::from_secs(1));
        let pids: Vec<(PathId, Option<u32>)> = self
            .daemon_labs()
            .iter()
            .map(|(p, lab)| (*p, Self::daemon_pid(lab)))
            .collect();
        for (p, pid) in pids {
            if let Some(kib) = pid.and_then(rss_kib) {
                self.results.push("idle_rss", p, kib as f64 / 1024.0);
            }
        }
    }

    fn record(&mut self, metric: &str, p: PathId, r: anyhow::Result<f64>) {
        match r {
            Ok(v) if v.is_finite() => self.results.push(metric, p, v),
            Ok(v) => self.results.error(metric, p, format!("not a number: {v}")),
            Err(e) => {
                println!("bench:   {metric} {}: {e:#}", p.name());
                self.results.error(metric, p, format!("{e:#}"));
            }
        }
    }

    fn round(&mut self, round: usize) {
        self.results.round = round;
        let paths = self.live_paths(round);
        let secs = self.cfg.seconds;
        let timed = Duration::from_secs_f64(secs + 90.0);

        // Bulk download on 1 and 8 connections, and upload on 1, with the proxy's CPU time
        // around each (per direction).
        let mut cpu: BTreeMap<(&str, PathId), (f64, u64)> = BTreeMap::new();
        for (metric, conns, up) in [
            ("bulk1", 1usize, false),
            ("bulk8", 8, false),
            ("up1", 1, true),
        ] {
            let cpu_metric = if up { "cpu_per_gib_up" } else { "cpu_per_gib" };
            for &p in &paths {
                let pids = self.proxy_pids(p);
                let before = if pids.is_empty() {
                    None
                } else {
                    cpu_secs(&pids)
                };
                let mut args = vec![
                    "--conns".to_owned(),
                    conns.to_string(),
                    "--bytes".into(),
                    self.cfg.bulk_bytes.to_string(),
                ];
                if up {
                    args.push("--up".into());
                }
                let perf = (self.cfg.profile && conns == 1 && round == 0 && !pids.is_empty())
                    .then(|| Profile::start(p, if up { "-up" } else { "" }, &pids))
                    .flatten();
                let r = run_json(self.client(p, "bulk", &args), Duration::from_secs(600));
                let after = cpu_secs(&pids);
                if let Some(perf) = perf {
                    match perf.finish() {
                        Ok(path) => {
                            println!(
                                "bench:   profile of {metric} {} in {}",
                                p.name(),
                                path.display()
                            )
                        }
                        Err(e) => self
                            .notes
                            .push(format!("profile of {metric} {}: {e:#}", p.name())),
                    }
                }
                if let (Ok(v), Some(b), Some(a)) = (&r, before, after) {
                    let e = cpu.entry((cpu_metric, p)).or_default();
                    e.0 += a - b;
                    e.1 += v["bytes"].as_u64().unwrap_or(0);
                }
                let mbps = r.and_then(|v| num(&v, "mb_per_s"));
                if let Ok(m) = &mbps {
                    println!("bench:   {metric:<6} {:<10} {m:>9.1} MB/s", p.name());
                }
                self.record(metric, p, mbps);
            }
        }
        for ((metric, p), (s, bytes)) in cpu {
            if bytes > 0 {
                self.results
                    .push(metric, p, s / (bytes as f64 / (1u64 << 30) as f64));
            }
        }

        // Request/response on one open connection.
        for &p in &paths {
            let args = [
                "--seconds".to_owned(),
                secs.to_string(),
                "--size".into(),
                "1024".into(),
            ];
            let r = run_json(self.client(p, "rr", &args), timed);
            if let Ok(v) = &r {
                println!(
                    "bench:   rr     {:<10} {:>9.0} ops/s  p50 {:.0} µs",
                    p.name(),
                    v["ops_per_s"].as_f64().unwrap_or(f64::NAN),
                    v["p50_us"].as_f64().unwrap_or(f64::NAN)
                );
                self.record("rr_p50", p, num(v, "p50_us"));
            }
            self.record("rr", p, r.and_then(|v| num(&v, "ops_per_s")));
        }

        // New connections, with the kernel's BPF run-time statistics on.
        let stats = BpfStats::enable();
        if let Err(e) = &stats {
            self.notes
                .push(format!("kernel.bpf_stats_enabled could not be set: {e:#}"));
        }
        let hooks_before = self.daemon_labs().map(|(_, lab)| prog_stats(&lab.pin_root));
        for &p in &paths {
            let args = [
                "--seconds".to_owned(),
                secs.to_string(),
                "--concurrency".into(),
                "1".into(),
            ];
            let r = run_json(self.client(p, "connect", &args), timed);
            if let Ok(v) = &r {
                println!(
                    "bench:   conn   {:<10} p50 {:>7.2} ms  p99 {:>7.2} ms  ({} errors)",
                    p.name(),
                    v["p50_ms"].as_f64().unwrap_or(f64::NAN),
                    v["p99_ms"].as_f64().unwrap_or(f64::NAN),
                    v["errors"]
                );
                self.record("conn_p99", p, num(v, "p99_ms"));
            }
            self.record("conn_p50", p, r.and_then(|v| num(&v, "p50_ms")));
        }
        for &p in &paths {
            let args = [
                "--seconds".to_owned(),
                secs.to_string(),
                "--concurrency".into(),
                "8".into(),
            ];
            let r = run_json(self.client(p, "connect", &args), timed);
            if let Ok(v) = &r {
                println!(
                    "bench:   conn/s {:<10} {:>9.0} /s  ({} errors)",
                    p.name(),
                    v["per_s"].as_f64().unwrap_or(f64::NAN),
                    v["errors"]
                );
            }
            self.record("conn_rate", p, r.and_then(|v| num(&v, "per_s")));
        }
        let hooks_after = self.daemon_labs().map(|(_, lab)| prog_stats(&lab.pin_root));
        drop(stats);
        let hook_paths = self.daemon_labs().map(|(p, _)| p);
        for (i, p) in hook_paths.into_iter().enumerate() {
            for (prog, metric) in [("rdr_connect4", "hook_ns"), ("rdr_sockops", "sockops_ns")] {
                let (Some(b), Some(a)) = (hooks_before[i].get(prog), hooks_after[i].get(prog))
                else {
                    self.results.error(
                        metric,
                        p,
                        "bpftool prog show: no run-time statistics".into(),
                    );
                    continue;
                };
                let (dt, dn) = (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1));
                if dn > 0 {
                    self.results.push(metric, p, dt as f64 / dn as f64);
                    self.results.push(&format!("{metric}_calls"), p, dn as f64);
                }
            }
        }

        // curl, the everyday client, on the paths where it applies.
        for p in [
            PathId::Direct,
            PathId::Relay,
            PathId::Gateway,
            PathId::GatewayH2,
            PathId::Env,
        ] {
            if !self.paths.contains(&p) || (self.broken.contains_key(&p) && p != PathId::Env) {
                continue;
            }
            let r = self.curl_bulk(p);
            if let Ok(m) = &r {
                println!("bench:   curl   {:<10} {m:>9.1} MB/s", p.name());
            }
            self.record("curl_bulk1", p, r);
            let r = self.curl_latency(p);
            if let Ok(m) = &r {
                println!("bench:   curl   {:<10} p50 {m:>7.2} ms", p.name());
            }
            self.record("curl_conn_p50", p, r);
        }
    }

    fn curl(&self, p: PathId, path: &str) -> Command {
        let mut c = self.pod(p).cmd("curl");
        c.args([
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "300",
            "-w",
            "%{http_code} %{speed_download} %{time_total}\\n",
        ]);
        if p == PathId::Env {
            // curl chains no HTTP proxy in front of an HTTPS proxy: straight to the gateway.
            c.args([
                "--proxy",
                &format!("https://{GATEWAY_NAME}:443"),
                "--proxy-cacert",
                &self.ca,
                "--proxytunnel",
            ]);
        }
        c.arg(format!("http://{TARGET_HOST}{path}"));
        c
    }

    fn curl_bulk(&self, p: PathId) -> anyhow::Result<f64> {
        let line = run_text(
            self.curl(p, &format!("/down/{}", self.cfg.bulk_bytes)),
            Duration::from_secs(600),
        )?;
        let (code, speed, _) = parse_curl_w(&line)?;
        if code != 200 {
            bail!("HTTP {code}");
        }
        Ok(speed / 1e6)
    }

    fn curl_latency(&self, p: PathId) -> anyhow::Result<f64> {
        let mut t = Vec::new();
        for _ in 0..self.cfg.curl_reps {
            let line = run_text(self.curl(p, "/small"), Duration::from_secs(60))?;
            let (code, _, total) = parse_curl_w(&line)?;
            if code != 200 {
                bail!("HTTP {code}");
            }
            t.push(total * 1e3);
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    }

    /// RSS of a daemon holding N idle tunneled connections: relay (lab B), then gateway
    /// (lab A) and gateway-h2 (lab C), each restarted without Squid, whose configuration caps
    /// it at 1024 descriptors. One lab at a time: each closes its connections before the next.
    fn memory(&mut self) {
        // A round of its own, after the others (`--against` pairs samples by round).
        self.results.round = self.cfg.rounds;
        let n = self.cfg.idle_conns;
        if self.paths.contains(&PathId::Relay) && !self.broken.contains_key(&PathId::Relay) {
            let pid = Self::daemon_pid(&self.b);
            self.idle_conns(PathId::Relay, pid, n);
        }
        for p in GATEWAY_PATHS {
            if !self.paths.contains(&p) {
                continue;
            }
            // The daemon that carried the probe and the rounds is about to go.
            let (rounds, rounds_tls) = self.tunnel_counts(p);
            if self.broken.contains_key(&p) {
                self.tunnels.push(format!(
                    "{} tunnels: {rounds} (path broken; gateway TLS handshakes: {rounds_tls})",
                    p.name()
                ));
                continue;
            }
            // Squid goes (classic and env are done), the daemon restarts dialing the gateway
            // directly; it adopts its pins.
            let chain = self.chain(p);
            chain.squid = None;
            if let Some(i) = chain.lab.procs.iter().position(|p| p.name == "redirector") {
                chain.lab.procs.remove(i);
            }
            chain.start_daemon(&[], "info");
            let pid = Self::daemon_pid(&chain.lab);
            std::thread::sleep(Duration::from_secs(1));
            if let Some(kib) = pid.and_then(rss_kib) {
                self.results
                    .push("idle_rss_direct_gw", p, kib as f64 / 1024.0);
            }
            self.idle_conns(p, pid, n);
            let (memory, memory_tls) = self.tunnel_counts(p);
            self.tunnels.push(format!(
                "{} tunnels: {rounds} (probe and rounds, via Squid; gateway TLS handshakes: {rounds_tls}); \
                 memory scenario, restarted without Squid: {memory} (gateway TLS handshakes: {memory_tls})",
                p.name()
            ));
        }
    }

    /// `reuse/proto N, …` from the daemon's `redirector_gateway_tunnels_total` (warm, shared,
    /// fresh), and its gateway TLS handshakes by kind.
    fn tunnel_counts(&mut self, p: PathId) -> (String, String) {
        let Some((200, body)) = self.chain(p).lab.node_http_get("/metrics") else {
            return ("/metrics unreachable".into(), "?".into());
        };
        let show = |v: Vec<(String, f64)>| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let mut tunnels = labelled_counts(
            &body,
            "redirector_gateway_tunnels_total",
            &["reuse", "proto"],
        );
        let rank = |k: &str| {
            ["warm/", "shared/", "fresh/"]
                .iter()
                .position(|r| k.starts_with(r))
        };
        tunnels.sort_by_key(|(k, _)| rank(k).unwrap_or(usize::MAX));
        let handshakes: Vec<(String, f64)> =
            labelled_counts(&body, "redirector_tls_handshakes_total", &["hop", "kind"])
                .into_iter()
                .filter_map(|(k, n)| Some((k.strip_prefix("gateway/")?.to_owned(), n)))
                .collect();
        (show(tunnels), show(handshakes))
    }

    fn idle_conns(&mut self, p: PathId, pid: Option<u32>, n: usize) {
        let r = (|| -> anyhow::Result<(f64, f64, usize)> {
            let pid = pid.context("no daemon pid")?;
            std::thread::sleep(Duration::from_secs(1));
            let base = rss_kib(pid).context("daemon RSS")?;
            let base_fds = fd_count(pid).unwrap_or(0);
            let mut child = self
                .client(
                    p,
                    "idle",
                    &[
                        "--conns".to_owned(),
                        n.to_string(),
                        "--parallel".into(),
                        "128".into(),
                    ],
                )
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            let guard = KillOnDrop(&mut child);
            let (tx, rx) = mpsc::channel();
            let stdout = guard.0.stdout.take().context("stdout")?;
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let line = rx
                .recv_timeout(Duration::from_secs(600))
                .context("idle client never reported its connections")?;
            let v: Value =
                serde_json::from_str(&line).with_context(|| format!("client output {line:?}"))?;
            let open = v["open"].as_u64().unwrap_or(0) as usize;
            if open == 0 {
                bail!("no connection opened: {}", v["last_error"]);
            }
            if v["errors"].as_u64().unwrap_or(0) > 0 {
                self.notes.push(format!(
                    "{}: {} of {n} idle connections failed (last: {})",
                    p.name(),
                    v["errors"],
                    v["last_error"]
                ));
            }
            std::thread::sleep(Duration::from_secs(2));
            let loaded = rss_kib(pid).context("daemon RSS")?;
            drop(guard.0.stdin.take());
            let end = Instant::now() + Duration::from_secs(60);
            while guard.0.try_wait()?.is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(guard);
            std::thread::sleep(Duration::from_secs(2));
            let after = rss_kib(pid).unwrap_or(0);
            // The next lab's scenario counts on these being closed (RLIMIT_NOFILE, ports).
            let end = Instant::now() + Duration::from_secs(15);
            let mut fds = fd_count(pid).unwrap_or(0);
            while fds > base_fds + 64 && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(200));
                fds = fd_count(pid).unwrap_or(0);
            }
            if fds > base_fds + 64 {
                self.notes.push(format!(
                    "{}: the daemon still held {fds} descriptors ({base_fds} before the idle connections) 17 s after they closed",
                    p.name()
                ));
            }
            println!(
                "bench:   idle   {:<10} {open} connections: RSS {:.1} → {:.1} MiB, {:.0} B/connection; {:.1} MiB after closing",
                p.name(),
                base as f64 / 1024.0,
                loaded as f64 / 1024.0,
                (loaded.saturating_sub(base) * 1024) as f64 / open as f64,
                after as f64 / 1024.0
            );
            Ok((
                (loaded.saturating_sub(base) * 1024) as f64 / open as f64,
                after as f64 / 1024.0,
                open,
            ))
        })();
        match r {
            Ok((per, after, open)) => {
                self.results.push("idle_conn_bytes", p, per);
                self.results.push("rss_after_close", p, after);
                self.results.push("idle_conns_open", p, open as f64);
            }
            Err(e) => self.results.error("idle_conn_bytes", p, format!("{e:#}")),
        }
    }
}

/// `perf record` on a path's proxy processes for the length of one scenario.
struct Profile {
    child: Child,
    data: std::path::PathBuf,
    /// The path's name and the scenario's suffix (`gateway`, `gateway-up`).
    name: String,
}

impl Profile {
    fn start(path: PathId, suffix: &str, pids: &[u32]) -> Option<Profile> {
        let dir = report::out_dir();
        std::fs::create_dir_all(&dir).ok()?;
        let name = format!("{}{suffix}", path.name());
        let data = dir.join(format!("perf-{name}.data"));
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let child = Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                "499",
                "--call-graph",
                "dwarf,16384",
                "-o",
            ])
            .arg(&data)
            .args(["-p", &pids.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        // perf needs a moment to attach; the scenario is long next to it.
        std::thread::sleep(Duration::from_millis(300));
        Some(Profile { child, data, name })
    }

    /// Stops perf (SIGINT to the pid we started) and writes the report's top entries.
    fn finish(mut self) -> anyhow::Result<std::path::PathBuf> {
        // SAFETY: kill with a pid we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait()?;
        // The flat top, then the call chains into the heaviest symbols.
        let mut text = Vec::new();
        for graph in [["-g", "none"], ["-g", "caller,2,callee,function,percent"]] {
            let out = Command::new("perf")
                .args(["report", "--stdio", "--no-children", "--percent-limit", "2"])
                .args(["--sort", "dso,symbol"])
                .args(graph)
                .arg("-i")
                .arg(&self.data)
                .output()?;
            text.extend_from_slice(&out.stdout);
        }
        let txt = report::out_dir().join(format!("profile-{}.txt", self.name));
        std::fs::write(&txt, &text)?;
        Ok(txt)
    }
}

fn start_server(lab: &mut Lab, ns: &str, client: &str) {
    let i = lab.spawn_in(
        ns,
        "bench-server",
        Path::new(client),
        &["serve", "--listen", &format!("0.0.0.0:{TARGET_PORT}")],
    );
    lab.procs[i].wait_for_log("ready", Duration::from_secs(10));
}

/// A route from a (never enabled) pod to the hosts' network via its node-side veth address.
fn route_to_inet(pod: &Pod) {
    let o = pod.v4.octets();
    let node_side = Ipv4Addr::new(o[0], o[1], o[2], o[3] - 1);
    ::tests::lab::sh(&format!(
        "ip -n {} route add 203.0.113.0/24 via {node_side}",
        pod.netns
    ));
}

/// Every network namespace of the lab with this id (`<id>-…`).
fn lab_netns(id: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{id}-")))
        .map(str::to_owned)
        .collect()
}

struct KillOnDrop<'a>(&'a mut Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Runs `c` (with a deadline; killed by pid when over) and returns its stdout.
fn run_text(mut c: Command, timeout: Duration) -> anyhow::Result<String> {
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .with_context(|| format!("spawn {}", exec::describe(&c)))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let ho = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let he = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let end = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = ho.join().unwrap_or_default();
    let stderr = he.join().unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        bail!(
            "{status}: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    Ok(stdout)
}

/// Runs a client mode and parses the JSON object it prints last.
fn run_json(c: Command, timeout: Duration) -> anyhow::Result<Value> {
    let out = run_text(c, timeout)?;
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("no output")?;
    serde_json::from_str(line).with_context(|| format!("client output {line:?}"))
}

fn num(v: &Value, key: &str) -> anyhow::Result<f64> {
    v[key].as_f64().with_context(|| format!("no {key} in {v}"))
}

fn parse_curl_w(out: &str) -> anyhow::Result<(u16, f64, f64)> {
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("no curl output")?;
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() != 3 {
        bail!("unexpected curl -w output {line:?}");
    }
    Ok((f[0].parse()?, f[1].parse()?, f[2].parse()?))
}

/// The series of `metric` in Prometheus text, keyed by the values of `labels` joined with
/// `/` (`reuse="warm",proto="h1"` → `warm/h1`), sorted by key.
fn labelled_counts(body: &str, metric: &str, labels: &[&str]) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = body
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(metric)?.strip_prefix('{')?;
            let (set, value) = rest.rsplit_once('}')?;
            let value: f64 = value.split_whitespace().next()?.parse().ok()?;
            let pairs: BTreeMap<&str, &str> = set
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.trim(), v.trim().trim_matches('"')))
                })
                .collect();
            let key: Option<Vec<&str>> = labels.iter().map(|l| pairs.get(l).copied()).collect();
            Some((key?.join("/"), value))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Open descriptors of `pid`.
fn fd_count(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// utime+stime of all `pids`, in seconds (None when any is gone).
fn cpu_secs(pids: &[u32]) -> Option<f64> {
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0u64;
    for pid in pids {
        let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesized name: state is field 3, utime 14, stime 15.
        let rest: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
        total += rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    }
    Some(total as f64 / tck)
}

/// run_time_ns and run_cnt per pinned program of one lab.
fn prog_stats(pin_root: &Path) -> BTreeMap<&'static str, (u64, u64)> {
    let mut m = BTreeMap::new();
    for prog in ["rdr_connect4", "rdr_sockops"] {
        let out = Command::new("bpftool")
            .args(["prog", "show", "pinned"])
            .arg(pin_root.join(prog))
            .arg("-j")
            .output();
        let Ok(out) = out else { continue };
        let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else {
            continue;
        };
        m.insert(
            prog,
            (
                v["run_time_ns"].as_u64().unwrap_or(0),
                v["run_cnt"].as_u64().unwrap_or(0),
            ),
        );
    }
    m
}

/// `kernel.bpf_stats_enabled=1` while alive; the previous value comes back on drop.
struct BpfStats {
    prev: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> anyhow::Result<BpfStats> {
        let prev = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("read {BPF_STATS}"))?
            .trim()
            .to_owned();
        fs::write(BPF_STATS, "1").with_context(|| format!("write {BPF_STATS}"))?;
        Ok(BpfStats { prev })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, &self.prev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openssl_machine_readable_output() {
        let out = "+DT:AES-128-GCM:1:16384\n+R:271813:AES-128-GCM:1.000000\n+H:16384\n+F:25:AES-128-GCM:4453384192.00\n";
        assert_eq!(parse_openssl_mr(out), Some(4453384192.0));
        let all = "+H:16:64:256:1024:8192:16384\n+F:22:AES-128-GCM:1.0:2.0:3.0:4.0:5.0:6.5\n";
        assert_eq!(parse_openssl_mr(all), Some(6.5));
        assert_eq!(parse_openssl_mr("nothing"), None);
    }

    #[test]
    fn prometheus_labelled_series() {
        let body = "# HELP redirector_gateway_tunnels Tunnels\n\
            # TYPE redirector_gateway_tunnels counter\n\
            redirector_gateway_tunnels_total{reuse=\"warm\",proto=\"h1\"} 7\n\
            redirector_gateway_tunnels_total{reuse=\"fresh\",proto=\"h1\"} 120\n\
            redirector_gateway_tunnels_totalx{reuse=\"shared\",proto=\"h2\"} 1\n\
            redirector_tls_handshakes_total{hop=\"gateway\",kind=\"resumed\"} 3\n";
        assert_eq!(
            labelled_counts(
                body,
                "redirector_gateway_tunnels_total",
                &["reuse", "proto"]
            ),
            vec![("fresh/h1".to_owned(), 120.0), ("warm/h1".to_owned(), 7.0)]
        );
        assert_eq!(
            labelled_counts(body, "redirector_tls_handshakes_total", &["hop", "kind"]),
            vec![("gateway/resumed".to_owned(), 3.0)]
        );
        assert!(labelled_counts(body, "redirector_gateway_tunnels_total", &["nope"]).is_empty());
    }

    #[test]
    fn feature_lists() {
        assert_eq!(
            normalize_features(" crypto-aws-lc, alloc-jemalloc crypto-aws-lc"),
            "alloc-jemalloc,crypto-aws-lc"
        );
        assert_eq!(normalize_features(" , "), "");
        assert_eq!(
            features_dir("alloc-jemalloc,crypto-aws-lc"),
            "alloc-jemalloc+crypto-aws-lc"
        );
        assert_eq!(features_dir("dep/feat,../x"), "dep_feat+___x");
    }

    #[test]
    fn curl_write_out() {
        assert_eq!(
            parse_curl_w("200 1234.5 0.012\n").unwrap(),
            (200, 1234.5, 0.012)
        );
        assert!(parse_curl_w("").is_err());
    }
}
