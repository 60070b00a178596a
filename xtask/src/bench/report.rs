//! The benchmark's results: Markdown, JSON, a hand-written SVG chart and the printed summary.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::{Value, json};

use super::{GATEWAY_PATHS, PATHS, PathId};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
    Neither,
}

pub struct MetricDef {
    pub key: &'static str,
    pub title: &'static str,
    pub unit: &'static str,
    pub better: Better,
    pub chart: bool,
}

const fn m(
    key: &'static str,
    title: &'static str,
    unit: &'static str,
    better: Better,
    chart: bool,
) -> MetricDef {
    MetricDef {
        key,
        title,
        unit,
        better,
        chart,
    }
}

pub const METRICS: &[MetricDef] = &[
    m(
        "bulk1",
        "Bulk download, 1 connection",
        "MB/s",
        Better::Higher,
        true,
    ),
    m(
        "bulk8",
        "Bulk download, 8 connections",
        "MB/s",
        Better::Higher,
        true,
    ),
    m(
        "up1",
        "Bulk upload, 1 connection",
        "MB/s",
        Better::Higher,
        false,
    ),
    m(
        "rr",
        "Request/response, 1 KiB each way, one open connection",
        "ops/s",
        Better::Higher,
        true,
    ),
    m(
        "rr_p50",
        "Request/response latency p50",
        "µs",
        Better::Lower,
        false,
    ),
    m(
        "conn_p50",
        "New connection p50 (connect + GET + close, 1 worker)",
        "ms",
        Better::Lower,
        true,
    ),
    m(
        "conn_p99",
        "New connection p99 (1 worker)",
        "ms",
        Better::Lower,
        false,
    ),
    m(
        "conn_rate",
        "New connections per second (8 workers)",
        "conn/s",
        Better::Higher,
        true,
    ),
    m(
        "cpu_per_gib",
        "Proxy CPU per GiB moved in the bulk downloads (redirector; redsocks+stunnel)",
        "s/GiB",
        Better::Lower,
        true,
    ),
    m(
        "cpu_per_gib_up",
        "Proxy CPU per GiB moved in the bulk upload (redirector; redsocks+stunnel)",
        "s/GiB",
        Better::Lower,
        false,
    ),
    m(
        "curl_bulk1",
        "curl: bulk download, 1 connection (env = curl --proxy https://gw, no Squid)",
        "MB/s",
        Better::Higher,
        false,
    ),
    m(
        "curl_conn_p50",
        "curl: new connection p50 of time_total (env = curl --proxy https://gw, no Squid)",
        "ms",
        Better::Lower,
        true,
    ),
    m(
        "idle_rss",
        "Idle daemon RSS (fresh, before any traffic)",
        "MiB",
        Better::Lower,
        false,
    ),
    m(
        "idle_rss_direct_gw",
        "Idle daemon RSS after restart without Squid (memory scenario)",
        "MiB",
        Better::Lower,
        false,
    ),
    m(
        "idle_conn_bytes",
        "Daemon memory per idle tunneled connection (VmRSS delta / N)",
        "B",
        Better::Lower,
        true,
    ),
    m(
        "idle_conns_open",
        "Idle connections held for that measurement",
        "",
        Better::Neither,
        false,
    ),
    m(
        "rss_after_close",
        "Daemon RSS 2 s after those connections closed",
        "MiB",
        Better::Lower,
        false,
    ),
    m(
        "hook_ns",
        "connect4 hook run time per call (kernel BPF stats)",
        "ns",
        Better::Lower,
        false,
    ),
    m(
        "hook_ns_calls",
        "connect4 hook calls in the new-connection scenarios",
        "",
        Better::Neither,
        false,
    ),
    m(
        "sockops_ns",
        "sockops run time per call (kernel BPF stats)",
        "ns",
        Better::Lower,
        false,
    ),
    m(
        "sockops_ns_calls",
        "sockops calls in the new-connection scenarios",
        "",
        Better::Neither,
        false,
    ),
];

/// Samples (one per round) and errors per metric and path.
#[derive(Default)]
pub struct Results {
    pub samples: BTreeMap<String, BTreeMap<PathId, Vec<f64>>>,
    pub errors: BTreeMap<String, BTreeMap<PathId, String>>,
    /// The round each sample was taken in, index for index with `samples` (a failed
    /// scenario leaves a round out, so the n-th sample is not always round n). `--against`
    /// pairs the two builds' samples by it.
    pub rounds: BTreeMap<String, BTreeMap<PathId, Vec<usize>>>,
    /// The round [`Results::push`] tags samples with.
    pub round: usize,
}

impl Results {
    pub fn push(&mut self, metric: &str, p: PathId, v: f64) {
        self.samples
            .entry(metric.to_owned())
            .or_default()
            .entry(p)
            .or_default()
            .push(v);
        self.rounds
            .entry(metric.to_owned())
            .or_default()
            .entry(p)
            .or_default()
            .push(self.round);
    }

    /// `(round, sample)` of a metric and path, in the order taken.
    pub fn tagged(&self, metric: &str, p: PathId) -> Vec<(usize, f64)> {
        let (Some(v), Some(r)) = (
            self.samples.get(metric).and_then(|m| m.get(&p)),
            self.rounds.get(metric).and_then(|m| m.get(&p)),
        ) else {
            return Vec::new();
        };
        r.iter().copied().zip(v.iter().copied()).collect()
    }

    pub fn error(&mut self, metric: &str, p: PathId, e: String) {
        self.errors
            .entry(metric.to_owned())
            .or_default()
            .insert(p, e);
    }

    pub fn get(&self, metric: &str, p: PathId) -> Option<&[f64]> {
        self.samples
            .get(metric)?
            .get(&p)
            .map(Vec::as_slice)
            .filter(|v| !v.is_empty())
    }

    pub fn median(&self, metric: &str, p: PathId) -> Option<f64> {
        self.get(metric, p).map(|v| stats(v).median)
    }
}

pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stats(v: &[f64]) -> Stats {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Stats {
        median,
        min: s[0],
        max: s[n - 1],
    }
}

pub struct Ratio {
    pub name: String,
    pub shown: String,
    pub value: Option<f64>,
    pub target: &'static str,
    pub meets: Option<bool>,
}

impl Ratio {
    /// A ratio row: `value` shown as `1.23×` and checked with `ok`.
    fn of(name: String, value: Option<f64>, target: &'static str, ok: fn(f64) -> bool) -> Ratio {
        Ratio {
            name,
            shown: value
                .map(|v| format!("{v:.2}×"))
                .unwrap_or_else(|| "n/a".into()),
            value,
            target,
            meets: value.map(ok),
        }
    }

    fn verdict(&self, misses: &'static str) -> &'static str {
        match self.meets {
            Some(true) => "meets",
            Some(false) => misses,
            None => "n/a",
        }
    }

    fn json(&self) -> Value {
        json!({"name": self.name, "value": self.value, "shown": self.shown, "target": self.target, "meets": self.meets})
    }
}

/// `a / b` when both are known and `b` is not zero.
fn div(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

pub struct Report {
    pub date: String,
    pub machine: Vec<(String, String)>,
    pub config: Vec<(String, String)>,
    pub results: Results,
    pub aes_gcm_bytes_per_s: Option<f64>,
    pub notes: Vec<String>,
    /// One line per gateway path: how its tunnels were opened (the daemon's metrics).
    pub tunnels: Vec<String>,
    pub configs: Vec<(String, String)>,
    pub path_errors: BTreeMap<String, String>,
    pub duration_s: f64,
}

impl Report {
    pub fn new(machine: Vec<(String, String)>) -> Report {
        Report {
            date: cmd_line(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
                .unwrap_or_default(),
            machine,
            config: Vec::new(),
            results: Results::default(),
            aes_gcm_bytes_per_s: None,
            notes: Vec::new(),
            tunnels: Vec::new(),
            configs: Vec::new(),
            path_errors: BTreeMap::new(),
            duration_s: 0.0,
        }
    }

    fn aes_s_per_gib(&self) -> Option<f64> {
        self.aes_gcm_bytes_per_s.map(|b| (1u64 << 30) as f64 / b)
    }

    /// The issue's targets, computed from the medians. Every target that involves the
    /// gateway has one row per gateway path (`gateway`, then `gateway-h2`).
    pub fn ratios(&self) -> Vec<Ratio> {
        let r = &self.results;
        let med = |k: &str, p: PathId| r.median(k, p);
        let abs = |name: String,
                   value: Option<f64>,
                   shown: Option<String>,
                   target,
                   ok: fn(f64) -> bool| Ratio {
            name,
            shown: shown.unwrap_or_else(|| "n/a".into()),
            value,
            target,
            meets: value.map(ok),
        };
        // (name with `{gw}` for the gateway path, metric, divided by that metric of this path
        // (None: by the AES-128-GCM cost per GiB), target, test)
        type Row = (
            &'static str,
            &'static str,
            Option<PathId>,
            &'static str,
            fn(f64) -> bool,
        );
        let against: [Row; 9] = [
            (
                "bulk {gw} / classic, 1 connection",
                "bulk1",
                Some(PathId::Classic),
                "≥ 1.5×",
                |v| v >= 1.5,
            ),
            (
                "bulk {gw} / classic, 8 connections",
                "bulk8",
                Some(PathId::Classic),
                "≥ 1.5×",
                |v| v >= 1.5,
            ),
            (
                "bulk {gw} / direct, 1 connection",
                "bulk1",
                Some(PathId::Direct),
                "≥ 0.5×",
                |v| v >= 0.5,
            ),
            (
                "bulk {gw} / direct, 8 connections",
                "bulk8",
                Some(PathId::Direct),
                "≥ 0.5×",
                |v| v >= 0.5,
            ),
            (
                "proxy CPU per GiB ({gw}) / AES-128-GCM per GiB",
                "cpu_per_gib",
                None,
                "≤ 3×",
                |v| v <= 3.0,
            ),
            (
                "request rate {gw} / relay",
                "rr",
                Some(PathId::Relay),
                "≥ 0.85×",
                |v| v >= 0.85,
            ),
            (
                "new-connection p50 {gw} / relay",
                "conn_p50",
                Some(PathId::Relay),
                "≤ 2×",
                |v| v <= 2.0,
            ),
            (
                "new-connection p50 {gw} / env",
                "conn_p50",
                Some(PathId::Env),
                "< 1× (below env)",
                |v| v < 1.0,
            ),
            (
                "new-connection p50 {gw} / env (curl, env without Squid)",
                "curl_conn_p50",
                Some(PathId::Env),
                "< 1× (below env)",
                |v| v < 1.0,
            ),
        ];
        let mut out = Vec::new();
        for (name, metric, reference, target, ok) in against {
            for gw in GATEWAY_PATHS {
                let divisor = match reference {
                    Some(p) => med(metric, p),
                    None => self.aes_s_per_gib(),
                };
                out.push(Ratio::of(
                    name.replace("{gw}", gw.name()),
                    div(med(metric, gw), divisor),
                    target,
                    ok,
                ));
            }
        }
        for gw in GATEWAY_PATHS {
            let b = med("idle_conn_bytes", gw);
            out.push(abs(
                format!("bytes per idle tunneled connection ({})", gw.name()),
                b,
                b.map(|v| format!("{:.1} KiB", v / 1024.0)),
                "≤ 16 KiB",
                |v| v <= 16384.0,
            ));
        }
        for gw in GATEWAY_PATHS {
            let rss = med("idle_rss", gw);
            out.push(abs(
                format!("idle daemon RSS ({})", gw.name()),
                rss,
                rss.map(|v| format!("{v:.1} MiB")),
                "≤ 15 MiB",
                |v| v <= 15.0,
            ));
        }
        // The same program in every lab. The relay lab's pod is enabled, so every call there
        // takes the whole redirect path (the gateway lab also counts the early exits of its
        // pods that are not enabled, which would flatter the number): that is the target row.
        let hook = med("hook_ns", PathId::Relay).or(med("hook_ns", PathId::GatewayH2));
        out.push(abs(
            "connect hook per redirected call".into(),
            hook,
            hook.map(|v| format!("{v:.0} ns")),
            "≤ 1 µs",
            |v| v <= 1000.0,
        ));
        out
    }

    /// The targets of issue 16 (performance, round 2), from the medians: the gateway path's
    /// CPU close to the crypto floor, HTTP/2 tunnels at least as fast as HTTP/1.1 ones, the
    /// gateway path at least as fast as a client doing TLS-in-TLS itself (`env`), and new
    /// connections on a warm tunnel.
    pub fn targets_16(&self) -> Vec<Ratio> {
        let med = |k: &str, p: PathId| self.results.median(k, p);
        let conns = [("bulk1", "1 connection"), ("bulk8", "8 connections")];
        let mut out = Vec::new();
        for gw in GATEWAY_PATHS {
            out.push(Ratio::of(
                format!("proxy CPU per GiB ({}) / AES-128-GCM per GiB", gw.name()),
                div(med("cpu_per_gib", gw), self.aes_s_per_gib()),
                "≤ 2.5×",
                |v| v <= 2.5,
            ));
        }
        for (k, n) in conns {
            out.push(Ratio::of(
                format!("bulk gateway-h2 / gateway, {n}"),
                div(med(k, PathId::GatewayH2), med(k, PathId::Gateway)),
                "≥ 1×",
                |v| v >= 1.0,
            ));
        }
        for (k, n) in conns {
            for gw in GATEWAY_PATHS {
                out.push(Ratio::of(
                    format!("bulk {} / env, {n}", gw.name()),
                    div(med(k, gw), med(k, PathId::Env)),
                    "≥ 1×",
                    |v| v >= 1.0,
                ));
            }
        }
        for gw in GATEWAY_PATHS {
            out.push(Ratio::of(
                format!("new-connection p50 {} / relay", gw.name()),
                div(med("conn_p50", gw), med("conn_p50", PathId::Relay)),
                "≤ 2×",
                |v| v <= 2.0,
            ));
        }
        out
    }

    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "=== cargo xtask bench: summary ({}, {} round(s), {:.0} s) ===",
            self.date,
            self.config_value("rounds"),
            self.duration_s
        );
        let line = |s: &mut String, label: &str, value: String| {
            let _ = writeln!(s, "  {label:<62} {value}");
        };
        for (issue, rows) in [(7, self.ratios()), (16, self.targets_16())] {
            let _ = writeln!(s, "  targets of issue {issue}:");
            for r in rows {
                line(
                    &mut s,
                    &format!("  {}", r.name),
                    format!(
                        "{:<12} target {:<18} {}",
                        r.shown,
                        r.target,
                        r.verdict("MISSES")
                    ),
                );
            }
        }
        let names: Vec<&str> = PATHS.iter().map(|p| p.name()).collect();
        let _ = writeln!(s, "  medians ({}):", names.join(" / "));
        for k in [
            "bulk1",
            "bulk8",
            "up1",
            "rr",
            "conn_p50",
            "conn_rate",
            "cpu_per_gib",
            "cpu_per_gib_up",
        ] {
            let def = METRICS.iter().find(|d| d.key == k).expect("metric");
            let cells: Vec<String> = PATHS
                .iter()
                .map(|p| {
                    self.results
                        .median(k, *p)
                        .map(fmt_num)
                        .unwrap_or_else(|| "-".into())
                })
                .collect();
            line(
                &mut s,
                &format!("    {k} ({})", def.unit),
                cells.join(" / "),
            );
        }
        if let Some(a) = self.aes_s_per_gib() {
            line(
                &mut s,
                "    AES-128-GCM (openssl speed, 16 KiB)",
                format!(
                    "{:.0} MB/s = {a:.3} s/GiB",
                    self.aes_gcm_bytes_per_s.unwrap_or(0.0) / 1e6
                ),
            );
        }
        for t in &self.tunnels {
            let _ = writeln!(s, "  {t}");
        }
        for (p, e) in &self.path_errors {
            let _ = writeln!(s, "  path {p} broken: {e}");
        }
        s
    }

    fn config_value(&self, k: &str) -> String {
        self.config
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    pub fn markdown(&self, svg_name: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Egress redirector benchmark\n");
        let _ = writeln!(
            s,
            "`cargo xtask bench` on {} (took {:.0} s). Every path runs in the same invocation, on the same machine, in the closed test network (tests/README.md); the scenarios interleave the paths, rotating their order every round. Numbers are medians over rounds with [min–max] when there is more than one round. The benchmark reports; it never fails on a number.\n",
            self.date, self.duration_s
        );
        let _ = writeln!(s, "## Machine\n\n| | |\n|---|---|");
        for (k, v) in &self.machine {
            let _ = writeln!(s, "| {k} | {} |", v.replace('|', "\\|"));
        }
        let _ = writeln!(s, "\n## Run\n\n| | |\n|---|---|");
        for (k, v) in &self.config {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        if let Some(b) = self.aes_gcm_bytes_per_s {
            let _ = writeln!(
                s,
                "| openssl speed -evp aes-128-gcm (16384-byte blocks) | {:.0} MB/s ({:.3} CPU s/GiB) |",
                b / 1e6,
                self.aes_s_per_gib().unwrap_or(0.0)
            );
        }
        for (issue, rows) in [(7, self.ratios()), (16, self.targets_16())] {
            let _ = writeln!(
                s,
                "\n## Against the targets of issue {issue}\n\n| | value | target | |\n|---|---|---|---|"
            );
            for r in rows {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} |",
                    r.name,
                    r.shown,
                    r.target,
                    r.verdict("**misses**")
                );
            }
        }
        let _ = writeln!(s, "\n![paths side by side]({svg_name})\n");
        let _ = writeln!(s, "## Results\n");
        let _ = write!(s, "| metric | unit |");
        for p in PATHS {
            let _ = write!(s, " {} |", p.name());
        }
        let _ = write!(s, "\n|---|---|");
        for _ in PATHS {
            let _ = write!(s, "---|");
        }
        let _ = writeln!(s);
        let mut errors = Vec::new();
        for d in METRICS {
            let has =
                self.results.samples.contains_key(d.key) || self.results.errors.contains_key(d.key);
            if !has {
                continue;
            }
            let better = match d.better {
                Better::Higher => " (higher is better)",
                Better::Lower => " (lower is better)",
                Better::Neither => "",
            };
            let _ = write!(s, "| {}{better} | {} |", d.title, d.unit);
            for p in PATHS {
                let cell = match (
                    self.results.get(d.key, p),
                    self.results.errors.get(d.key).and_then(|e| e.get(&p)),
                ) {
                    (Some(v), _) => {
                        let st = stats(v);
                        if v.len() > 1 {
                            format!(
                                "{} [{}–{}]",
                                fmt_num(st.median),
                                fmt_num(st.min),
                                fmt_num(st.max)
                            )
                        } else {
                            fmt_num(st.median)
                        }
                    }
                    (None, Some(e)) => {
                        errors.push(format!("{} / {}: {e}", d.key, p.name()));
                        "error¹".into()
                    }
                    (None, None) => "–".into(),
                };
                let _ = write!(s, " {cell} |");
            }
            let _ = writeln!(s);
        }
        if !errors.is_empty() {
            let _ = writeln!(s, "\n¹ Errors:\n");
            for e in errors {
                let _ = writeln!(s, "- {e}");
            }
        }
        if !self.path_errors.is_empty() {
            let _ = writeln!(s, "\nPaths that could not be measured:\n");
            for (p, e) in &self.path_errors {
                let _ = writeln!(s, "- `{p}`: {e}");
            }
        }
        let _ = writeln!(s, "\n## Paths\n");
        for p in PATHS {
            let _ = writeln!(s, "- **{}**: {}", p.name(), p.description());
        }
        let _ = writeln!(
            s,
            "\nEvery client is `rdr-bench-client` (Rust, tokio) started in the pod's netns and cgroup with no proxy variables, \
             against `rdr-bench-client serve` at 203.0.113.14:8080 (`bulk.azure.test:8080`), a keep-alive HTTP/1.1 server \
             (`GET /down/<n>`, `POST /echo`, `GET /small`). The client speaks first, so the redirector reads the `Host` header \
             at once and never waits for its sniff timeout. A probe before the rounds checks the address the target sees \
             (pod, node, or gateway simulator) so that each path is the path it claims to be.\n\n\
             Scenarios: **bulk** — the connections are opened and warmed first, then all download their share of the bytes \
             at once; **request/response** — `POST /echo` of 1 KiB, answered with the same 1 KiB, back to back on one \
             connection; **new connection** — connect, `GET /small`, close, back to back (1 worker: latency; 8 workers: \
             rate); **CPU** — utime+stime from /proc/<pid>/stat of the redirector (or of redsocks and stunnel) around the \
             two bulk scenarios, divided by the bytes moved; **hook** — `kernel.bpf_stats_enabled=1` during the \
             new-connection scenarios only (previous value restored), then run_time_ns / run_cnt deltas of the lab's pinned \
             `rdr_connect4` and `rdr_sockops` (`bpftool prog show pinned … -j`); the count includes the connects of the \
             pods that are not enabled (they take the hook's early exit); **memory** — VmRSS of the daemon before and 2 s \
             after N idle connections that each completed one request, delta / N; for `gateway` and `gateway-h2` (one lab \
             after the other) the daemon is restarted without Squid first (the test Squid is configured for 1024 \
             descriptors), dialing the gateway directly (`--gateway-connect-to`); the per-connection state in the daemon is \
             the same TLS session (gateway) or HTTP/2 stream (gateway-h2) either way.\n\n\
             `gateway` and `gateway-h2` run the same redirector with the same flags (defaults: `--gateway-http2`, \
             `--gateway-warm 2`, `--gateway-h2-streams 100`) in two labs that differ only in the gateway simulator: \
             HTTP/1.1 only (one TLS session per tunnel, pre-established ones when ready) or offering h2 (`--offer-h2`: \
             tunnels are HTTP/2 CONNECT streams on shared sessions). The notes say how each path's tunnels were opened \
             (`redirector_gateway_tunnels_total` of the daemon, read before its restart for the memory scenario and after it)."
        );
        let _ = writeln!(s, "\n## Generated configuration\n");
        for (name, text) in &self.configs {
            let _ = writeln!(s, "**{name}**\n\n```\n{}\n```\n", text.trim_end());
        }
        if !self.notes.is_empty() || !self.tunnels.is_empty() {
            let _ = writeln!(s, "## Notes\n");
            for n in self.tunnels.iter().chain(&self.notes) {
                let _ = writeln!(s, "- {n}");
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(
            s,
            "## Known limitations\n\n\
             - Everything (clients, proxies, Squid, the simulator, targets) shares the machine's cores, as on a real node; \
             a path that burns more CPU elsewhere (Squid, the simulator) shows it as lower throughput.\n\
             - `env` (Rust client) goes through Squid like `gateway` and `classic`; the curl rows measure `env` the way \
             `curl --proxy https://gw.arc.test:443 --proxytunnel` does it, which cannot chain Squid in front, so curl's `env` has \
             one hop less than curl's `gateway`.\n\
             - The rustls client of `env` keeps TLS session tickets within one process (as curl does), so its new \
             connections resume TLS sessions; the redirector's behaviour is whatever it does today.\n\
             - CPU time comes from /proc/<pid>/stat in clock ticks (10 ms): with `--quick` (64 MiB per bulk scenario) \
             the CPU-per-GiB figures carry roughly ±10 %; the full run moves 512 MiB per path per round.\n\
             - Memory is user-space VmRSS only (kernel socket buffers are not counted); the gateway and gateway-h2 memory runs have no Squid hop.\n\
             - `kernel.bpf_stats_enabled` is a global switch: while it is on, every BPF program on the host pays for its \
             accounting; it is restored after each new-connection scenario, but not if the benchmark is killed hard."
        );
        s
    }

    pub fn json(&self) -> Value {
        let mut metrics = Vec::new();
        for d in METRICS {
            let mut per = serde_json::Map::new();
            for p in PATHS {
                if let Some(v) = self.results.get(d.key, p) {
                    let st = stats(v);
                    per.insert(
                        p.name().into(),
                        json!({"samples": v, "median": st.median, "min": st.min, "max": st.max}),
                    );
                } else if let Some(e) = self.results.errors.get(d.key).and_then(|e| e.get(&p)) {
                    per.insert(p.name().into(), json!({"error": e}));
                }
            }
            if per.is_empty() {
                continue;
            }
            let better = match d.better {
                Better::Higher => "higher",
                Better::Lower => "lower",
                Better::Neither => "",
            };
            metrics.push(json!({"key": d.key, "title": d.title, "unit": d.unit, "better": better, "paths": per}));
        }
        let ratios: Vec<Value> = self.ratios().iter().map(Ratio::json).collect();
        let targets_16: Vec<Value> = self.targets_16().iter().map(Ratio::json).collect();
        let kv = |v: &[(String, String)]| {
            Value::Object(
                v.iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            )
        };
        json!({
            "date": self.date,
            "duration_s": self.duration_s,
            "machine": kv(&self.machine),
            "run": kv(&self.config),
            "aes_128_gcm_16k_bytes_per_s": self.aes_gcm_bytes_per_s,
            "paths": Value::Object(PATHS.iter().map(|p| (p.name().to_owned(), Value::String(p.description().to_owned()))).collect()),
            "path_errors": self.path_errors,
            "metrics": metrics,
            "targets": ratios,
            "targets_16": targets_16,
            "configs": kv(&self.configs),
            "gateway_tunnels": self.tunnels,
            "notes": self.notes,
        })
    }

    /// Writes `bench-<stamp>.{md,json,svg}` and `latest.{md,json,svg}` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        fs::create_dir_all(dir)?;
        let stamp: String = self
            .date
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let mut written = Vec::new();
        for base in [format!("bench-{stamp}"), "latest".to_owned()] {
            let svg_name = format!("{base}.svg");
            let files = [
                (format!("{base}.md"), self.markdown(&svg_name)),
                (
                    format!("{base}.json"),
                    serde_json::to_string_pretty(&self.json())?,
                ),
                (svg_name.clone(), self.svg()),
            ];
            for (name, text) in files {
                let p = dir.join(name);
                fs::write(&p, text)?;
                written.push(p);
            }
        }
        Ok(written)
    }

    /// One panel per charted metric, one bar per path (median), a whisker for min–max.
    pub fn svg(&self) -> String {
        const COLORS: [&str; PATHS.len()] = [
            "#7f7f7f", "#1f77b4", "#2ca02c", "#17becf", "#d62728", "#ff7f0e",
        ];
        let panels: Vec<&MetricDef> = METRICS
            .iter()
            .filter(|d| d.chart && self.results.samples.contains_key(d.key))
            .collect();
        let (pw, ph, cols) = (350.0, 230.0, 3usize);
        let rows = panels.len().div_ceil(cols).max(1);
        let (w, h) = (pw * cols as f64 + 20.0, ph * rows as f64 + 70.0);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="10" y="20" font-size="14" font-weight="bold">cargo xtask bench — {} ({} round(s); bars: median, whiskers: min–max)</text>"#,
            esc(&self.date),
            esc(&self.config_value("rounds"))
        );
        for (i, p) in PATHS.iter().enumerate() {
            let x = 10.0 + i as f64 * 95.0;
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="32" width="12" height="12" fill="{}"/><text x="{}" y="42">{}</text>"#,
                COLORS[i],
                x + 16.0,
                p.name()
            );
        }
        for (k, d) in panels.iter().enumerate() {
            let (px, py) = (10.0 + (k % cols) as f64 * pw, 60.0 + (k / cols) as f64 * ph);
            let better = match d.better {
                Better::Higher => "higher is better",
                Better::Lower => "lower is better",
                Better::Neither => "",
            };
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" font-weight="bold">{}</text>"#,
                px + 5.0,
                py + 12.0,
                esc(&short_title(d))
            );
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" fill="#555">{} — {better}</text>"##,
                px + 5.0,
                py + 26.0,
                esc(d.unit)
            );
            let (top, base) = (py + 48.0, py + ph - 30.0);
            let _ = writeln!(
                s,
                r##"<line x1="{}" y1="{base}" x2="{}" y2="{base}" stroke="#333"/>"##,
                px + 5.0,
                px + pw - 15.0
            );
            // The CPU panel carries the raw AES-128-GCM cost (openssl speed) as a reference line.
            let aes = if d.key == "cpu_per_gib" {
                self.aes_s_per_gib()
            } else {
                None
            };
            let max = PATHS
                .iter()
                .filter_map(|p| self.results.get(d.key, *p).map(|v| stats(v).max))
                .fold(aes.unwrap_or(0.0), f64::max);
            let bw = (pw - 30.0) / PATHS.len() as f64;
            // Drawn after the bars so that it stays visible; labelled on the left.
            let mut reference = String::new();
            if let Some(a) = aes.filter(|_| max > 0.0) {
                let y = base - (base - top) * a / max;
                let _ = writeln!(
                    reference,
                    r##"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="#000" stroke-dasharray="4 3"/>"##,
                    px + 5.0,
                    px + pw - 15.0
                );
                let _ = writeln!(
                    reference,
                    r#"<text x="{}" y="{}" font-size="10" paint-order="stroke" stroke="white" stroke-width="3">AES-GCM {}</text>"#,
                    px + 8.0,
                    y - 3.0,
                    fmt_num(a)
                );
            }
            for (i, p) in PATHS.iter().enumerate() {
                let x = px + 10.0 + i as f64 * bw;
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{}" text-anchor="middle" font-size="10">{}</text>"#,
                    x + bw / 2.0 - 4.0,
                    base + 14.0,
                    p.name()
                );
                let Some(v) = self.results.get(d.key, *p) else {
                    let _ = writeln!(
                        s,
                        r##"<text x="{}" y="{}" text-anchor="middle" fill="#999">n/a</text>"##,
                        x + bw / 2.0 - 4.0,
                        base - 4.0
                    );
                    continue;
                };
                let st = stats(v);
                let scale = |v: f64| {
                    if max > 0.0 {
                        (base - top) * v / max
                    } else {
                        0.0
                    }
                };
                let bh = scale(st.median);
                let _ = writeln!(
                    s,
                    r#"<rect x="{x}" y="{}" width="{}" height="{bh}" fill="{}"/>"#,
                    base - bh,
                    bw - 8.0,
                    COLORS[i]
                );
                if v.len() > 1 {
                    let cx = x + bw / 2.0 - 4.0;
                    let _ = writeln!(
                        s,
                        r##"<line x1="{cx}" y1="{}" x2="{cx}" y2="{}" stroke="#000"/>"##,
                        base - scale(st.min),
                        base - scale(st.max)
                    );
                }
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{}" text-anchor="middle" font-size="10">{}</text>"#,
                    x + bw / 2.0 - 4.0,
                    base - scale(st.max) - 4.0,
                    fmt_num(st.median)
                );
            }
            s.push_str(&reference);
        }
        s.push_str("</svg>\n");
        s
    }
}

fn short_title(d: &MetricDef) -> String {
    match d.key {
        "bulk1" => "Bulk download, 1 connection".into(),
        "bulk8" => "Bulk download, 8 connections".into(),
        "rr" => "Request/response 1 KiB, open conn".into(),
        "conn_p50" => "New connection p50".into(),
        "conn_rate" => "New connections/s (8 workers)".into(),
        "cpu_per_gib" => "Proxy CPU per GiB".into(),
        "curl_conn_p50" => "curl new connection p50 (env: no Squid)".into(),
        "idle_conn_bytes" => "Memory per idle connection".into(),
        _ => d.title.into(),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub fn cmd_line(c: &mut Command) -> Option<String> {
    let o = c.output().ok()?;
    let text = if o.stdout.is_empty() {
        o.stderr
    } else {
        o.stdout
    };
    let text = String::from_utf8_lossy(&text);
    // stunnel -version starts with chatter; prefer the line naming the program.
    let name = c.get_program().to_string_lossy().into_owned();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.clone().next().map(str::to_owned);
    lines
        .find(|l| l.to_lowercase().starts_with(&name))
        .map(str::to_owned)
        .or(first)
}

/// Where reports go: `<target dir>/bench`.
pub fn out_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or(root.join("target"))
        .join("bench")
}

pub fn machine_info() -> Vec<(String, String)> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    let mut m = vec![
        (
            "kernel".to_owned(),
            cmd_line(Command::new("uname").args(["-srm"])).unwrap_or_default(),
        ),
        ("cpu".into(), format!("{model} × {cores}")),
        ("memory".into(), mem),
    ];
    let tools: [(&str, &[&str]); 8] = [
        ("rustc", &["rustc", "-V"]),
        ("openssl", &["openssl", "version"]),
        ("squid", &["squid", "-v"]),
        ("redsocks", &["redsocks", "-v"]),
        ("stunnel", &["stunnel", "-version"]),
        ("iptables", &["iptables", "--version"]),
        ("curl", &["curl", "--version"]),
        ("commit", &["git", "rev-parse", "--short", "HEAD"]),
    ];
    for (name, argv) in tools {
        let v = cmd_line(
            Command::new(argv[0])
                .args(&argv[1..])
                .current_dir(env!("CARGO_MANIFEST_DIR")),
        )
        .unwrap_or_else(|| "not found".into());
        m.push((name.into(), v));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_formatting() {
        let s = stats(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert_eq!(stats(&[5.0]).median, 5.0);
        assert_eq!(fmt_num(1234.4), "1234");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(1.234), "1.23");
    }

    /// The upload scenario has rows of its own: throughput, and the proxy's CPU per GiB
    /// uploaded (apart from the download's).
    #[test]
    fn upload_rows_are_reported() {
        let mut r = Report::new(vec![("kernel".into(), "x".into())]);
        r.results.push("up1", PathId::Gateway, 400.0);
        r.results.push("cpu_per_gib", PathId::Gateway, 0.6);
        r.results.push("cpu_per_gib_up", PathId::Gateway, 0.9);
        let md = r.markdown("x.svg");
        assert!(md.contains(
            "| Bulk upload, 1 connection (higher is better) | MB/s | – | – | 400 | – | – | – |"
        ));
        assert!(md.contains(
            "| Proxy CPU per GiB moved in the bulk upload (redirector; redsocks+stunnel) \
             (lower is better) | s/GiB | – | – | 0.90 | – | – | – |"
        ));
        let sum = r.summary();
        let row = |k: &str| {
            sum.lines()
                .find(|l| l.trim_start().starts_with(k))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        };
        assert_eq!(
            row("up1 ").as_deref(),
            Some("up1 (MB/s) - / - / 400 / - / - / -")
        );
        assert_eq!(
            row("cpu_per_gib ").as_deref(),
            Some("cpu_per_gib (s/GiB) - / - / 0.60 / - / - / -")
        );
        assert_eq!(
            row("cpu_per_gib_up ").as_deref(),
            Some("cpu_per_gib_up (s/GiB) - / - / 0.90 / - / - / -")
        );
        let j = r.json();
        let metric = |k: &str| {
            j["metrics"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["key"] == k))
                .map(|m| m["paths"]["gateway"]["median"].clone())
        };
        assert_eq!(metric("up1"), Some(400.0.into()));
        assert_eq!(metric("cpu_per_gib"), Some(0.6.into()));
        assert_eq!(metric("cpu_per_gib_up"), Some(0.9.into()));
    }

    #[test]
    fn report_renders_with_missing_values() {
        let mut r = Report::new(vec![("kernel".into(), "x".into())]);
        r.results.push("bulk1", PathId::Gateway, 100.0);
        r.results.push("bulk1", PathId::GatewayH2, 75.0);
        r.results.push("bulk1", PathId::Classic, 50.0);
        r.results.error("bulk1", PathId::Env, "boom".into());
        r.tunnels
            .push("gateway-h2 tunnels: shared/h2 12 (probe and rounds, via Squid)".into());
        let ratios = r.ratios();
        assert_eq!(ratios[0].name, "bulk gateway / classic, 1 connection");
        assert_eq!(ratios[0].value, Some(2.0));
        assert_eq!(ratios[0].meets, Some(true));
        assert_eq!(ratios[1].name, "bulk gateway-h2 / classic, 1 connection");
        assert_eq!(ratios[1].value, Some(1.5));
        assert_eq!(ratios[1].meets, Some(true));
        assert!(ratios.iter().any(|x| x.value.is_none()));
        let md = r.markdown("x.svg");
        assert!(md.contains("error¹") && md.contains("bulk1 / env: boom"));
        assert!(
            md.contains(
                "| metric | unit | direct | relay | gateway | gateway-h2 | classic | env |"
            )
        );
        assert!(md.contains("| bulk gateway-h2 / classic, 1 connection | 1.50× |"));
        assert!(md.contains("- **gateway-h2**: "));
        assert!(md.contains("- gateway-h2 tunnels: shared/h2 12"));
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(">gateway-h2</text>"));
        let j = r.json();
        assert!(j["metrics"][0]["paths"]["gateway"]["median"] == 100.0);
        assert!(j["metrics"][0]["paths"]["gateway-h2"]["median"] == 75.0);
        assert!(j["paths"]["gateway-h2"].is_string());
        assert!(
            j["gateway_tunnels"][0]
                == "gateway-h2 tunnels: shared/h2 12 (probe and rounds, via Squid)"
        );
        let sum = r.summary();
        assert!(sum.contains("2.00×") && sum.contains("1.50×"));
        assert!(sum.contains("medians (direct / relay / gateway / gateway-h2 / classic / env)"));
        assert!(sum.contains("  gateway-h2 tunnels: shared/h2 12"));
    }

    /// Issue 16's targets come from the same medians: CPU against AES per gateway path, h2
    /// against HTTP/1.1 bulk, each gateway path against `env` (the client doing TLS-in-TLS
    /// itself) and new connections against the relay; the report and the JSON carry them.
    #[test]
    fn issue_16_targets_are_computed_from_the_medians() {
        let mut r = Report::new(Vec::new());
        r.aes_gcm_bytes_per_s = Some((1u64 << 30) as f64);
        for k in ["bulk1", "bulk8"] {
            r.results.push(k, PathId::Env, 100.0);
            r.results.push(k, PathId::Gateway, 80.0);
            r.results.push(k, PathId::GatewayH2, 120.0);
        }
        r.results.push("cpu_per_gib", PathId::Gateway, 2.0);
        r.results.push("cpu_per_gib", PathId::GatewayH2, 3.0);
        r.results.push("conn_p50", PathId::Relay, 1.0);
        r.results.push("conn_p50", PathId::Gateway, 4.0);
        r.results.push("conn_p50", PathId::GatewayH2, 1.5);
        let rows = r.targets_16();
        let row = |n: &str| {
            let names: Vec<&str> = rows.iter().map(|x| x.name.as_str()).collect();
            rows.iter()
                .find(|x| x.name == n)
                .map(|x| (x.value, x.meets))
                .unwrap_or_else(|| panic!("target row {n:?} missing from {names:?}"))
        };
        assert_eq!(
            row("proxy CPU per GiB (gateway) / AES-128-GCM per GiB"),
            (Some(2.0), Some(true))
        );
        assert_eq!(
            row("proxy CPU per GiB (gateway-h2) / AES-128-GCM per GiB"),
            (Some(3.0), Some(false))
        );
        assert_eq!(
            row("bulk gateway-h2 / gateway, 1 connection"),
            (Some(1.5), Some(true))
        );
        assert_eq!(
            row("bulk gateway-h2 / gateway, 8 connections"),
            (Some(1.5), Some(true))
        );
        assert_eq!(
            row("bulk gateway / env, 1 connection"),
            (Some(0.8), Some(false))
        );
        assert_eq!(
            row("bulk gateway-h2 / env, 8 connections"),
            (Some(1.2), Some(true))
        );
        assert_eq!(
            row("new-connection p50 gateway / relay"),
            (Some(4.0), Some(false))
        );
        assert_eq!(
            row("new-connection p50 gateway-h2 / relay"),
            (Some(1.5), Some(true))
        );
        assert_eq!(rows.len(), 10);
        let md = r.markdown("x.svg");
        assert!(md.contains("## Against the targets of issue 16"));
        assert!(md.contains("| bulk gateway-h2 / gateway, 1 connection | 1.50× | ≥ 1× | meets |"));
        assert!(r.summary().contains("bulk gateway / env, 1 connection"));
        let j = r.json();
        assert!(j["targets_16"][0]["name"] == "proxy CPU per GiB (gateway) / AES-128-GCM per GiB");
    }

    /// Every target row about `gateway` has a `gateway-h2` twin computed from gateway-h2's
    /// own numbers, and the `gateway` rows keep their texts.
    #[test]
    fn every_gateway_target_has_a_gateway_h2_row() {
        let mut r = Report::new(Vec::new());
        r.aes_gcm_bytes_per_s = Some((1u64 << 30) as f64);
        for (k, base) in [
            ("bulk1", 100.0),
            ("bulk8", 100.0),
            ("cpu_per_gib", 1.0),
            ("rr", 100.0),
            ("conn_p50", 1.0),
            ("curl_conn_p50", 1.0),
            ("idle_conn_bytes", 1024.0),
            ("idle_rss", 10.0),
        ] {
            for p in [PathId::Direct, PathId::Relay, PathId::Classic, PathId::Env] {
                r.results.push(k, p, base);
            }
            r.results.push(k, PathId::Gateway, base * 2.0);
            r.results.push(k, PathId::GatewayH2, base * 3.0);
        }
        let ratios = r.ratios();
        let names: Vec<&str> = ratios.iter().map(|x| x.name.as_str()).collect();
        let gateway_rows = [
            "bulk gateway / classic, 1 connection",
            "bulk gateway / classic, 8 connections",
            "bulk gateway / direct, 1 connection",
            "bulk gateway / direct, 8 connections",
            "proxy CPU per GiB (gateway) / AES-128-GCM per GiB",
            "request rate gateway / relay",
            "new-connection p50 gateway / relay",
            "new-connection p50 gateway / env",
            "new-connection p50 gateway / env (curl, env without Squid)",
            "bytes per idle tunneled connection (gateway)",
            "idle daemon RSS (gateway)",
        ];
        for g in gateway_rows {
            let h2 = g.replacen("gateway", "gateway-h2", 1);
            let row = |n: &str| {
                ratios
                    .iter()
                    .find(|x| x.name == n)
                    .unwrap_or_else(|| panic!("target row {n:?} missing from {names:?}"))
            };
            let (a, b) = (row(g), row(&h2));
            assert!(
                a.value.is_some() && b.value.is_some(),
                "{g}: {:?} / {h2}: {:?}",
                a.value,
                b.value
            );
            // gateway-h2's numbers are 1.5× gateway's in every metric above.
            let q = b.value.unwrap() / a.value.unwrap();
            assert!(
                (q - 1.5).abs() < 1e-9,
                "{h2} is not computed from gateway-h2: {q}"
            );
            assert_eq!(a.target, b.target);
        }
        // Any other row naming the gateway also has its twin.
        for n in &names {
            if n.contains("gateway") && !n.contains("gateway-h2") {
                let h2 = n.replacen("gateway", "gateway-h2", 1);
                assert!(names.contains(&h2.as_str()), "no {h2:?} row");
            }
        }
        assert_eq!(names.len(), 2 * gateway_rows.len() + 1);
    }
}
