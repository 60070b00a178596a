//! Logging setup and Prometheus metrics.
use std::fmt::Write as _;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Handle to change the log filter at runtime (admin `/logging`).
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// `LOG_FORMAT=json|plain` (default plain) and `RUST_LOG` (default `info`). Records of the
/// `log` crate (aya, aya-log's eBPF messages) are bridged into tracing.
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::{EnvFilter, fmt, prelude::*, reload};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let json = std::env::var("LOG_FORMAT")
        .map(|v| v.eq_ignore_ascii_case("json"))
        .unwrap_or(false);
    let ansi = std::io::stderr().is_terminal();
    let json_layer = json.then(|| {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_target(false)
    });
    let plain_layer = (!json).then(|| {
        fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_target(false)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(json_layer)
        .with(plain_layer)
        .init();
    let _ = LOG_FILTER.set(handle);
}

/// The current log filter, as `RUST_LOG` syntax.
pub fn log_filter() -> String {
    LOG_FILTER
        .get()
        .and_then(|h| h.with_current(|f| f.to_string()).ok())
        .unwrap_or_else(|| "unknown".into())
}

/// Replaces the log filter (`RUST_LOG` syntax, e.g. `debug` or `info,redirector=trace`).
pub fn set_log_filter(directives: &str) -> Result<(), String> {
    let f = tracing_subscriber::EnvFilter::try_new(directives)
        .map_err(|e| format!("invalid filter {directives:?}: {e}"))?;
    let h = LOG_FILTER.get().ok_or("logging is not initialized")?;
    h.reload(f).map_err(|e| e.to_string())
}

/// A closed set of label values: an enum, its text, and its encoding as a label value, so a
/// metric can only ever carry one of the values listed here.
macro_rules! label_values {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name { $($(#[$vm])* $v),+ }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                e.write_str(self.as_str())
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

label_values!(
    /// How a relayed connection ended.
    ConnResult { Ok => "ok", RelayError => "relay_error", Refused => "refused" }
);
label_values!(
    /// Why a connection was refused before relaying.
    Refusal {
        /// The pod already holds `max-connections-per-pod` connections.
        PodLimit => "pod_limit",
        /// The node already holds `max-connections` connections.
        NodeLimit => "node_limit",
        /// `max-pending` connections are already being sniffed or set up.
        SetupLimit => "setup_limit",
        /// No `rdr_orig` record: not a connection our hook redirected, or its record is gone.
        NoOriginalDestination => "no_original_destination",
        /// The map lookup itself failed.
        MapError => "map_error",
    }
);
label_values!(
    /// `tx` = pod to upstream, `rx` = upstream to pod.
    Direction { Tx => "tx", Rx => "rx" }
);
label_values!(
    /// Who a failure is attributed to: the pod, the upstream (proxy, gateway, target), or us.
    Side { Downstream => "downstream", Upstream => "upstream", Internal => "internal" }
);
label_values!(
    /// How a configuration reload ended.
    ReloadResult { Applied => "applied", Rejected => "rejected" }
);
label_values!(
    /// The gateway session protocol of a tunnel.
    Proto { H1 => "h1", H2 => "h2" }
);
label_values!(
    /// Pooled gateway sessions: warm HTTP/1.1 ones not used yet, or shared HTTP/2 ones.
    PooledProto { H1Idle => "h1_idle", H2 => "h2" }
);
label_values!(
    /// How the gateway session of a tunnel came about, for the audit line and metrics.
    Reuse {
        /// Dialed for this connection.
        Fresh => "fresh",
        /// Dialed ahead of demand (TLS and the proxy hop already done), used once.
        Warm => "warm",
        /// A stream on an HTTP/2 session other tunnels share.
        Shared => "shared",
    }
);
label_values!(
    /// A TLS handshake: a full one or a resumed session.
    Handshake { Full => "full", Resumed => "resumed" }
);
label_values!(
    /// Who seals and opens a gateway session's TLS records.
    RecordLayer {
        /// The kernel (kTLS).
        Kernel => "kernel",
        /// The redirector itself.
        User => "user",
    }
);
label_values!(
    /// Values in pod objects not believed (`redirector_k8s_rejected_total`).
    K8sRejection {
        /// `metadata.uid` is not a UUID: the pod is ignored.
        Uid => "uid",
        /// The mirror annotation is not the kubelet's hash on a pod the kubelet owns, or
        /// another pod claims the same hash: the pod's own uid names its cgroup.
        MirrorAnnotation => "mirror_annotation",
    }
);

impl EncodeLabelValue for crate::policy::Route {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        e.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: crate::policy::Route,
    pub result: ConnResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: Refusal,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct K8sRejectedLabels {
    pub reason: K8sRejection,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SideLabels {
    pub side: Side,
}

/// A request of the CNI plugin: its command and how the daemon answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CniLabels {
    pub command: &'static str,
    pub outcome: &'static str,
}

/// A failed tunnel: the hop (`target`, `proxy`, `gateway`) and the error's kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelFailureLabels {
    pub hop: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HopLabels {
    /// `target` (direct), `proxy` or `gateway`.
    pub hop: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: ReloadResult,
}

/// One eBPF counter, by its name in `redirector-common`'s counter list.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    pub name: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    pub reuse: Reuse,
    pub proto: Proto,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub hop: &'static str,
    pub kind: Handshake,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordsLabels {
    pub records: RecordLayer,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtoLabels {
    pub proto: PooledProto,
}

/// An audited workload (`namespace/pod` or cgroup path) and a verdict (`redirect`, `skip`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    pub workload: String,
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabels {
    pub workload: String,
}

/// One of an audited workload's top destinations (`addr:port`, or `other` for the rest).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditDestLabels {
    pub workload: String,
    pub destination: String,
    pub verdict: String,
}

/// Lets one log line through per second and counts the ones it held back, so that a flood
/// of refusals costs one line a second, not one per connection.
#[derive(Debug, Default)]
pub struct LogLimiter {
    /// Seconds since the Unix epoch of the last line let through.
    last: std::sync::atomic::AtomicU64,
    held_back: std::sync::atomic::AtomicU64,
}

impl LogLimiter {
    /// `Some(n)`: log now, mentioning the `n` lines held back since the last one.
    pub fn allow(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.allow_at(now)
    }

    /// [`LogLimiter::allow`] at `now` (seconds since the epoch).
    fn allow_at(&self, now: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.last.load(Relaxed);
        if now > last
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            Some(self.held_back.swap(0, Relaxed))
        } else {
            self.held_back.fetch_add(1, Relaxed);
            None
        }
    }
}

fn setup_histogram() -> Histogram {
    // 1 ms .. ~16 s: loopback hops are sub-millisecond, intercontinental TLS is seconds.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 15,
    ))
}

/// Every metric the daemon exports. Labels are bounded: no per-destination or per-pod labels,
/// except the audit metrics, which exist to show them and are bounded per audited workload:
/// two verdict series, one untracked series, and at most `audit::TOP` destinations plus
/// `other` per verdict (a pod choosing many destinations moves counts into `other`, it
/// does not add series).
pub struct Metrics {
    pub tunnel_setup: Family<HopLabels, Histogram, fn() -> Histogram>,
    pub connections: Family<RouteLabels, Counter>,
    pub refused: Family<ReasonLabels, Counter>,
    pub k8s_rejected: Family<K8sRejectedLabels, Counter>,
    pub bytes: Family<DirectionLabels, Counter>,
    pub errors: Family<SideLabels, Counter>,
    pub tunnel_failures: Family<TunnelFailureLabels, Counter>,
    pub active: Gauge,
    pub runtime_workers: Gauge,
    pub enabled_cgroups: Gauge,
    pub listeners: Gauge,
    pub listener_failures: Counter,
    pub listener_restarts: Counter,
    pub cni_requests: Family<CniLabels, Counter>,
    pub refusing_workloads: Gauge,
    pub reloads: Family<ResultLabels, Counter>,
    pub ebpf: Family<NameLabels, Gauge>,
    pub gateway_tunnels: Family<SessionLabels, Counter>,
    pub gateway_sessions: Family<ProtoLabels, Gauge>,
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    pub gateway_tls_sessions: Family<RecordsLabels, Counter>,
    pub audit_connections: Family<AuditLabels, Counter>,
    pub audit_untracked: Family<WorkloadLabels, Counter>,
    pub audit_destinations: Family<AuditDestLabels, Gauge>,
    pub audit_workloads: Gauge,
    /// The destination series the last audit pass wrote (the next removes those it does
    /// not write again).
    audit_series: std::sync::Mutex<Vec<AuditDestLabels>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            tunnel_setup: Family::new_with_constructor(setup_histogram as fn() -> Histogram),
            connections: Default::default(),
            refused: Default::default(),
            k8s_rejected: Default::default(),
            bytes: Default::default(),
            errors: Default::default(),
            tunnel_failures: Default::default(),
            active: Default::default(),
            runtime_workers: Default::default(),
            enabled_cgroups: Default::default(),
            listeners: Default::default(),
            listener_failures: Default::default(),
            listener_restarts: Default::default(),
            cni_requests: Default::default(),
            refusing_workloads: Default::default(),
            reloads: Default::default(),
            ebpf: Default::default(),
            gateway_tunnels: Default::default(),
            gateway_sessions: Default::default(),
            tls_handshakes: Default::default(),
            gateway_tls_sessions: Default::default(),
            audit_connections: Default::default(),
            audit_untracked: Default::default(),
            audit_destinations: Default::default(),
            audit_workloads: Default::default(),
            audit_series: Default::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("redirector");
        r.register(
            "connections",
            "Finished connections by route and result",
            self.connections.clone(),
        );
        r.register(
            "refused",
            "Connections refused before relaying, by reason",
            self.refused.clone(),
        );
        r.register(
            "k8s_rejected",
            "Values in pod objects not believed, by reason (uid: pod ignored; mirror_annotation: the pod's own uid used)",
            self.k8s_rejected.clone(),
        );
        r.register("bytes", "Bytes relayed, by direction", self.bytes.clone());
        r.register(
            "tunnel_setup_seconds",
            "Time to set up each hop (TCP, TLS, CONNECT answered)",
            self.tunnel_setup.clone(),
        );
        r.register(
            "errors",
            "Failed connections by side (downstream, upstream, internal)",
            self.errors.clone(),
        );
        r.register(
            "tunnel_failures",
            "Tunnel setup failures by hop and kind",
            self.tunnel_failures.clone(),
        );
        r.register(
            "active_connections",
            "Connections being relayed now",
            self.active.clone(),
        );
        r.register(
            "runtime_workers",
            "Worker threads of the async runtime that runs connections (worker-threads, or one per CPU the daemon may use)",
            self.runtime_workers.clone(),
        );
        r.register(
            "enabled_cgroups",
            "Cgroups enabled in the eBPF map",
            self.enabled_cgroups.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads by result (applied, rejected)",
            self.reloads.clone(),
        );
        r.register(
            "listeners",
            "Network namespaces with a proxy listener",
            self.listeners.clone(),
        );
        r.register(
            "listener_failures",
            "Workload network namespaces where no listener could be bound (every candidate port taken, or the namespace gone)",
            self.listener_failures.clone(),
        );
        r.register(
            "listener_restarts",
            "Listener accept loops restarted after a panic",
            self.listener_restarts.clone(),
        );
        r.register(
            "cni_requests",
            "Requests of the CNI plugin, by command and outcome (redirected, not ours, error)",
            self.cni_requests.clone(),
        );
        r.register(
            "refusing_workloads",
            "Workloads whose connects the hooks refuse because they have no listener (yet)",
            self.refusing_workloads.clone(),
        );
        r.register(
            "ebpf_events",
            "eBPF per-CPU counters summed (rdr_stats), by counter name",
            self.ebpf.clone(),
        );
        r.register(
            "gateway_tunnels",
            "Tunnels opened through the gateway, by session reuse and protocol",
            self.gateway_tunnels.clone(),
        );
        r.register(
            "gateway_sessions",
            "Pre-established gateway sessions: idle HTTP/1.1 ones and shared HTTP/2 ones",
            self.gateway_sessions.clone(),
        );
        r.register(
            "tls_handshakes",
            "TLS handshakes by hop and kind (full, resumed)",
            self.tls_handshakes.clone(),
        );
        r.register(
            "gateway_tls_sessions",
            "Gateway TLS sessions made, by who seals and opens their records: the kernel (kTLS) or the redirector",
            self.gateway_tls_sessions.clone(),
        );
        r.register(
            "audit_connections",
            "Connects of audited workloads, by workload and what enforcement would do (redirect, skip)",
            self.audit_connections.clone(),
        );
        r.register(
            "audit_untracked",
            "Connects of audited workloads whose destination the full rdr_audit map could not track (counted in audit_connections)",
            self.audit_untracked.clone(),
        );
        r.register(
            "audit_destination_connections",
            "Connects of audited workloads to their top destinations (the rest as destination=\"other\"), by verdict",
            self.audit_destinations.clone(),
        );
        r.register(
            "audit_workloads",
            "Audited workloads with counts",
            self.audit_workloads.clone(),
        );
    }

    /// Applies one audit pass: counters grow by the pass's deltas; destination gauges are
    /// rewritten; series of workloads gone (and destinations out of the top) are removed.
    pub fn set_audit(&self, pass: &crate::audit::Pass) {
        const VERDICTS: [&str; 2] = ["redirect", "skip"];
        for workload in &pass.gone {
            for verdict in VERDICTS {
                self.audit_connections.remove(&AuditLabels {
                    workload: workload.clone(),
                    verdict: verdict.to_owned(),
                });
            }
            self.audit_untracked.remove(&WorkloadLabels {
                workload: workload.clone(),
            });
        }
        let mut series = Vec::new();
        for r in &pass.reports {
            for (verdict, d) in [("redirect", r.delta.redirect), ("skip", r.delta.skip)] {
                self.audit_connections
                    .get_or_create(&AuditLabels {
                        workload: r.label.clone(),
                        verdict: verdict.to_owned(),
                    })
                    .inc_by(d);
            }
            self.audit_untracked
                .get_or_create(&WorkloadLabels {
                    workload: r.label.clone(),
                })
                .inc_by(r.delta.untracked);
            let named = r
                .top
                .iter()
                .map(|d| (d.destination.clone(), d.verdict.clone(), d.count));
            let other = VERDICTS
                .iter()
                .map(|v| ("other".to_owned(), (*v).to_owned(), r.other(v)))
                .filter(|(_, _, n)| *n > 0);
            for (destination, verdict, n) in named.chain(other) {
                let l = AuditDestLabels {
                    workload: r.label.clone(),
                    destination,
                    verdict,
                };
                self.audit_destinations
                    .get_or_create(&l)
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
                series.push(l);
            }
        }
        let mut last = self
            .audit_series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let keep: std::collections::HashSet<&AuditDestLabels> = series.iter().collect();
        for old in last.iter().filter(|l| !keep.contains(l)) {
            self.audit_destinations.remove(old);
        }
        *last = series;
        self.audit_workloads.set(pass.reports.len() as i64);
    }

    pub fn set_ebpf(&self, c: &redirector_common::Counters) {
        for (name, v) in c.named() {
            self.ebpf.get_or_create(&NameLabels { name }).set(v as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limiter_lets_one_line_a_second_through_and_counts_the_rest() {
        let l = LogLimiter::default();
        assert_eq!(l.allow_at(100), Some(0));
        assert_eq!(l.allow_at(100), None);
        assert_eq!(l.allow_at(100), None);
        // The next second's line says how many were held back.
        assert_eq!(l.allow_at(101), Some(2));
        assert_eq!(l.allow_at(101), None);
        assert!(l.allow().is_some(), "the clock's now is later than 101");
    }

    #[test]
    fn label_values_keep_their_metric_text() {
        assert_eq!(Refusal::PodLimit.as_str(), "pod_limit");
        assert_eq!(Direction::Tx.to_string(), "tx");
        assert_eq!(
            serde_json::to_string(&Side::Downstream).expect("json"),
            "\"downstream\""
        );
    }
}
