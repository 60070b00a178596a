//! Logging setup and Prometheus metrics.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// `LOG_FORMAT=json|plain` (default plain) and `RUST_LOG` (default `info`).
pub fn init_logging() {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").map(|v| v.eq_ignore_ascii_case("json")).unwrap_or(false);
    use std::io::IsTerminal;
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `tx` = pod to upstream, `rx` = upstream to pod.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SideLabels {
    /// `downstream` (the pod), `upstream` (proxy, gateway, target) or `internal`.
    pub side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelFailureLabels {
    pub hop: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    pub name: &'static str,
}

/// Every metric the daemon exports. Labels are bounded: no per-destination or per-pod labels.
#[derive(Default)]
pub struct Metrics {
    pub connections: Family<RouteLabels, Counter>,
    pub refused: Family<ReasonLabels, Counter>,
    pub bytes: Family<DirectionLabels, Counter>,
    pub errors: Family<SideLabels, Counter>,
    pub tunnel_failures: Family<TunnelFailureLabels, Counter>,
    pub active: Gauge,
    pub enabled_cgroups: Gauge,
    pub listeners: Gauge,
    pub reloads: Family<ResultLabels, Counter>,
    pub ebpf: Family<NameLabels, Gauge>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("redirector");
        r.register("connections", "Finished connections by route and result", self.connections.clone());
        r.register("refused", "Connections refused before relaying, by reason", self.refused.clone());
        r.register("bytes", "Bytes relayed, by direction", self.bytes.clone());
        r.register("errors", "Failed connections by side (downstream, upstream, internal)", self.errors.clone());
        r.register("tunnel_failures", "Tunnel setup failures by hop and kind", self.tunnel_failures.clone());
        r.register("active_connections", "Connections being relayed now", self.active.clone());
        r.register("enabled_cgroups", "Cgroups enabled in the eBPF map", self.enabled_cgroups.clone());
        r.register("config_reloads", "Configuration reloads by result (applied, rejected)", self.reloads.clone());
        r.register("listeners", "Network namespaces with a proxy listener", self.listeners.clone());
        r.register(
            "ebpf_events",
            "eBPF per-CPU counters summed (rdr_stats), by counter name",
            self.ebpf.clone(),
        );
    }

    pub fn set_ebpf(&self, c: &redirector_common::Counters) {
        let set = |name: &'static str, v: u64| {
            self.ebpf.get_or_create(&NameLabels { name }).set(v as i64);
        };
        set("redirected4", c.redirected4);
        set("redirected6", c.redirected6);
        set("skip_disabled", c.skip_disabled);
        set("skip_cidr", c.skip_cidr);
        set("skip_loopback", c.skip_loopback);
        set("skip_self", c.skip_self);
        set("skip_not_tcp", c.skip_not_tcp);
        set("established", c.established);
        set("errors", c.errors);
    }
}
