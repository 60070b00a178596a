//! `redirector explain`: what would happen to one connection — enabled cgroup? skipped in
//! the kernel? which rule and route? — and the exact CONNECT lines each hop would get, with
//! every secret redacted. Reads the pins for the kernel's view, the config for the rest.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Serialize;

use crate::{
    admin::client::{self, Fetch},
    api::WorkloadView,
    bpf::{self, CgroupMode, Maps, PinLayout},
    cli::ExplainArgs,
    config::{Config, ConfigError},
    netns,
    plan::{self, Endpoint, HopPlan, NameCheck},
    policy::Route,
    sniff::HostSource,
};
use redirector_common::{MAX_CGROUP_DEPTH, names};

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("give one --cgroup (got {0})")]
    ManyCgroups(usize),
    #[error("invalid --host {host:?}: {reason}")]
    Host { host: String, reason: &'static str },
    #[error("invalid --pod {0:?}: expected NAMESPACE/NAME")]
    PodSyntax(String),
    #[error(
        "cannot resolve pod {pod}: the daemon is not running at {admin} (pods are resolved by \
         asking it); pass the pod's cgroup with --cgroup instead"
    )]
    PodNoDaemon { pod: String, admin: SocketAddr },
    #[error(
        "cannot resolve pod {pod}: the daemon at {admin} does not serve /workloads (an older \
         version); pass the pod's cgroup with --cgroup instead"
    )]
    PodOldDaemon { pod: String, admin: SocketAddr },
    #[error("cannot resolve pod {pod}: {detail}")]
    PodLookup { pod: String, detail: String },
    #[error("cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// The whole answer; `render_text` prints it, `--json` serializes it.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub dst: SocketAddr,
    pub host: Option<String>,
    /// Where the proxy would learn the host: `sni`, `host` (plain HTTP), or `ip` (none).
    pub host_source: HostSource,
    pub cgroup: Option<CgroupView>,
    pub kernel: KernelView,
    /// `None` when the kernel never hands the connection to the proxy.
    pub policy: Option<PolicyView>,
    /// The hops the proxy would open, in order.
    pub hops: Vec<Hop>,
    /// One line: what happens.
    pub verdict: String,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct CgroupView {
    pub path: PathBuf,
    pub pod: Option<String>,
    pub id: u64,
    /// `None`: unknown (no pins to read and no configuration that says).
    pub enabled: Option<bool>,
    /// The cgroup (itself or an ancestor) whose `rdr_enabled` entry applies.
    pub enabled_by: Option<PathBuf>,
    pub detail: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelState {
    /// The connect is rewritten to the local proxy listener.
    Redirected,
    /// Skipped by the hook (loopback or a skip range): the connect goes out unchanged.
    Skipped,
    /// The hook does not apply (cgroup not enabled, programs not attached).
    NotRedirected,
    /// The hook refuses the connect (EPERM): the workload's listener is not bound (yet), or no
    /// daemon has configured the hooks. Never sent on unchanged.
    Refused,
    /// The workload is audited: the connect goes out unchanged and is counted with the
    /// verdict enforcement would give it (the policy and hops shown are that verdict).
    Audited,
}

#[derive(Debug, Serialize)]
pub struct KernelView {
    pub state: KernelState,
    pub reason: String,
    /// `pins` when read from the pinned maps, `config` when judged from the configuration.
    pub source: &'static str,
}

#[derive(Debug, Serialize)]
pub struct PolicyView {
    /// `None`: refused by a safety rule.
    pub route: Option<Route>,
    pub rule: String,
    /// For a name-based `direct`: does the name resolve to the destination IP?
    pub name_check: Option<NameCheck>,
}

/// One upstream hop: where the proxy connects and what it sends there.
#[derive(Debug, Serialize)]
pub struct Hop {
    pub hop: &'static str,
    pub connect: String,
    /// The request head, one header per line; secrets as `<redacted>`.
    pub request: Vec<String>,
}

/// The kernel's state as read from the pins.
#[derive(Clone, Debug, Default)]
pub struct PinnedState {
    pub enabled: BTreeMap<u64, CgroupMode>,
    pub skip: Vec<IpNet>,
    pub ready: bool,
    pub proxy_port: u16,
    pub attached: bool,
}

/// The connecting cgroup and its ancestors (hierarchy root first), with their ids.
#[derive(Clone, Debug)]
pub struct CgroupChain {
    pub path: PathBuf,
    pub pod: Option<String>,
    pub chain: Vec<(PathBuf, u64)>,
    /// Is the cgroup at or below the attach point (`--cgroup-root`)?
    pub below_attach: bool,
}

/// What to explain, validated.
#[derive(Clone, Debug)]
pub struct Query {
    pub dst: SocketAddr,
    pub host: Option<String>,
    pub http: bool,
    pub cgroup: Option<CgroupChain>,
}

/// Reads everything (config, pins, daemon, resolver) and explains.
pub fn explain(args: &ExplainArgs) -> Result<Explanation, ExplainError> {
    let mut run = args.run.clone();
    // `--cgroup` names the connecting cgroup here; the config's own list stays the file's.
    let cgroup_flag = run.settings.cgroup.take().unwrap_or_default();
    if cgroup_flag.len() > 1 {
        return Err(ExplainError::ManyCgroups(cgroup_flag.len()));
    }
    let config = run.load()?;
    let host = match &args.host {
        None => None,
        Some(h) => Some(
            crate::addr::validate_host(h).map_err(|e| ExplainError::Host {
                host: h.clone(),
                reason: e.reason,
            })?,
        ),
    };
    let mut notes = Vec::new();
    let pins = PinLayout::new(&config.pin_root);
    let pinned = match Maps::open(&pins) {
        Ok(maps) => {
            let cfg = maps.config().ok();
            Some(PinnedState {
                enabled: maps.enabled_entries(),
                skip: maps.skip_ranges(),
                ready: cfg.is_some_and(|c| c.ready != 0),
                proxy_port: cfg.map(|c| c.proxy_port).unwrap_or(config.proxy_port),
                attached: names::LINKS.iter().all(|l| bpf::link_alive(&pins, l)),
            })
        }
        Err(e) => {
            notes.push(format!(
                "cannot read the pinned maps under {} ({}): the kernel's view is judged from the configuration",
                config.pin_root.display(),
                crate::error_chain(&e)
            ));
            None
        }
    };
    let (path, pod) = match (cgroup_flag.into_iter().next(), &args.pod) {
        (Some(p), _) => (Some(p), None),
        (None, Some(pod)) => (
            Some(resolve_pod(pod, config.admin_addr)?),
            Some(pod.clone()),
        ),
        (None, None) => (None, None),
    };
    let cgroup = match path {
        None => {
            notes.push(
                "no --cgroup or --pod: assuming the connection comes from an enabled cgroup".into(),
            );
            None
        }
        Some(path) => Some(cgroup_chain(&path, pod, &config.cgroup_root)?),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ExplainError::Runtime)?;
    let names = rt.block_on(async { crate::names::Resolver::from_system() });
    let resolve = |name: &str, _port: u16| rt.block_on(names.lookup(name));
    let query = Query {
        dst: args.dst,
        host,
        http: args.http,
        cgroup,
    };
    let mut e = analyze(
        &config,
        &query,
        pinned.as_ref(),
        &crate::node::node_addresses(&config.node_netns),
        &resolve,
    );
    notes.append(&mut e.notes);
    e.notes = notes;
    Ok(e)
}

/// `namespace/name` → its cgroup, from the daemon's `/workloads`.
fn resolve_pod(pod: &str, admin: SocketAddr) -> Result<PathBuf, ExplainError> {
    if pod.split('/').count() != 2 || pod.split('/').any(str::is_empty) {
        return Err(ExplainError::PodSyntax(pod.to_owned()));
    }
    let owned = || pod.to_owned();
    match client::fetch_json::<Vec<WorkloadView>>(admin, "/workloads") {
        Fetch::Down => Err(ExplainError::PodNoDaemon {
            pod: owned(),
            admin,
        }),
        Fetch::Missing => Err(ExplainError::PodOldDaemon {
            pod: owned(),
            admin,
        }),
        Fetch::Bad(detail) => Err(ExplainError::PodLookup {
            pod: owned(),
            detail,
        }),
        Fetch::Ok(list) => match list.iter().find(|w| w.label == pod) {
            Some(WorkloadView {
                cgroup: Some(c), ..
            }) => Ok(PathBuf::from(c)),
            Some(_) => Err(ExplainError::PodLookup {
                pod: owned(),
                detail: "the daemon knows it, but its cgroup does not exist yet".into(),
            }),
            None => {
                let known: Vec<&str> = list.iter().map(|w| w.label.as_str()).take(20).collect();
                let detail = if known.is_empty() {
                    "the daemon follows no workloads on this node".to_owned()
                } else {
                    format!(
                        "not among the daemon's workloads on this node ({})",
                        known.join(", ")
                    )
                };
                Err(ExplainError::PodLookup {
                    pod: owned(),
                    detail,
                })
            }
        },
    }
}

/// The cgroup and its ancestors up to the cgroup2 mount, root first, as the hook walks them
/// (`bpf_get_current_ancestor_cgroup_id(level)`; ids are directory inode numbers).
pub fn cgroup_chain(
    path: &Path,
    pod: Option<String>,
    attach_root: &Path,
) -> Result<CgroupChain, ExplainError> {
    let err = |source| ExplainError::Cgroup {
        path: path.to_owned(),
        source,
    };
    let path = path.canonicalize().map_err(err)?;
    if !netns::is_cgroup2(&path).map_err(err)? {
        return Err(err(std::io::Error::other("is not a cgroup v2 directory")));
    }
    let mut chain = Vec::new();
    let mut cur = Some(path.as_path());
    while let Some(dir) = cur {
        if !netns::is_cgroup2(dir).unwrap_or(false) {
            break;
        }
        chain.push((dir.to_owned(), netns::cgroup_id(dir).map_err(err)?));
        cur = dir.parent();
    }
    chain.reverse();
    let below_attach = attach_root
        .canonicalize()
        .is_ok_and(|r| path.starts_with(r));
    Ok(CgroupChain {
        path,
        pod,
        chain,
        below_attach,
    })
}

/// Name → addresses (or why not), as the daemon's resolver would answer.
pub type Resolver<'a> = dyn Fn(&str, u16) -> Result<Vec<IpAddr>, String> + 'a;

/// The pure part: every decision, no I/O except through `resolve` (name → addresses).
pub fn analyze(
    config: &Config,
    q: &Query,
    pinned: Option<&PinnedState>,
    node_addrs: &[IpAddr],
    resolve: &Resolver<'_>,
) -> Explanation {
    let host_source = match (&q.host, q.http) {
        (None, _) => HostSource::Ip,
        (Some(_), false) => HostSource::Sni,
        (Some(_), true) => HostSource::Host,
    };
    let mut e = Explanation {
        dst: q.dst,
        host: q.host.clone(),
        host_source,
        cgroup: None,
        kernel: KernelView {
            state: KernelState::Redirected,
            reason: String::new(),
            source: if pinned.is_some() { "pins" } else { "config" },
        },
        policy: None,
        hops: Vec::new(),
        verdict: String::new(),
        notes: Vec::new(),
    };

    // 1. Is the hook in force for this cgroup at all?
    if pinned.is_some_and(|p| !p.attached) {
        return not_redirected(
            e,
            format!(
                "our programs are not attached (link pins under {} missing or dead): no connect is redirected",
                config.pin_root.display()
            ),
        );
    }
    // The entry that decides for the connecting cgroup (its own or an ancestor's).
    let mut mode = None;
    if let Some(c) = &q.cgroup {
        mode = pinned.and_then(|p| entry_of(c, p)).map(|(_, m)| m);
        let view = cgroup_view(config, c, pinned);
        let enabled = view.enabled;
        e.cgroup = Some(view);
        if !c.below_attach {
            return not_redirected(
                e,
                format!(
                    "{} is not below the attach point {}: the hooks never see its connects",
                    c.path.display(),
                    config.cgroup_root.display()
                ),
            );
        }
        match enabled {
            Some(false) => return not_redirected(e, "neither the cgroup nor an ancestor is enabled: its connects go out unchanged".into()),
            None => e.notes.push("whether the cgroup is enabled is unknown (no pins, Kubernetes mode): assuming it is".into()),
            Some(true) => {}
        }
    }

    // 2. The hook's own skips: loopback, then the skip ranges in the LPM maps.
    let ip = q.dst.ip().to_canonical();
    let loopback = match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 127 || v4.is_unspecified(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified(),
    };
    if loopback {
        e.kernel = KernelView {
            state: KernelState::Skipped,
            reason: format!("{ip} is loopback: never redirected"),
            source: e.kernel.source,
        };
        e.verdict = format!(
            "skipped in the kernel: {ip} is loopback; the connect goes to {} unchanged",
            q.dst
        );
        return e;
    }
    // The pinned LPM maps are what the kernel does now; this configuration's ranges are what
    // it does once a daemon runs with it. Either one skips; the reason says which.
    let config_skip = config.skip_cidrs();
    let longest = |nets: &[IpNet]| {
        nets.iter()
            .filter(|n| n.contains(&ip))
            .max_by_key(|n| n.prefix_len())
            .copied()
    };
    let in_config = longest(&config_skip);
    let in_pins = pinned.and_then(|p| longest(&p.skip));
    if let Some(p) = pinned {
        let a: BTreeSet<IpNet> = p.skip.iter().map(|n| n.trunc()).collect();
        let b: BTreeSet<IpNet> = config_skip.iter().map(|n| n.trunc()).collect();
        if a != b {
            e.notes.push(format!(
                "the kernel's skip ranges ({}) differ from this configuration's ({}): the daemon runs with another configuration, or has not reloaded yet",
                join(&a),
                join(&b)
            ));
        }
    }
    let skip = match (in_pins, in_config) {
        (Some(net), _) => Some((net, "in rdr_skip4/rdr_skip6 now".to_owned())),
        (None, Some(net)) if pinned.is_some() => Some((
            net,
            "from this configuration; the pinned maps do not have it yet, so it applies once the daemon runs with this configuration".to_owned(),
        )),
        (None, Some(net)) => Some((net, "from the configuration".to_owned())),
        (None, None) => None,
    };
    if let Some((net, source)) = skip {
        e.kernel = KernelView {
            state: KernelState::Skipped,
            reason: format!("{ip} is in skip range {net} ({source})"),
            source: e.kernel.source,
        };
        if mode == Some(CgroupMode::Audit) {
            e.notes.push(
                "the workload is audited: this connect is counted as `skip` (rdr_audit)".into(),
            );
        }
        e.verdict = format!(
            "skipped in the kernel by skip range {net}: the connect goes direct to {} and the proxy never sees it",
            q.dst
        );
        return e;
    }
    // An audited workload's connect goes on unchanged (never refused); what follows is what
    // enforcement would do with it.
    let audited = mode == Some(CgroupMode::Audit);
    if audited {
        e.kernel = KernelView {
            state: KernelState::Audited,
            reason: "the workload's entry in rdr_enabled says audit: the connect goes out unchanged and is counted as `redirect`; the route below is what enforcement would do".into(),
            source: e.kernel.source,
        };
    }
    // The hook refuses what it would redirect while the workload has no listener, and
    // everything an enabled cgroup connects before a daemon configured it.
    if let Some(p) = pinned.filter(|_| !audited) {
        let why = if !p.ready {
            Some(
                "rdr_config.ready is 0: no daemon has configured the hooks yet, so the connects of enabled cgroups are refused",
            )
        } else if mode == Some(CgroupMode::Refuse) {
            Some("the workload's entry in rdr_enabled says refuse: its listener is not bound (yet)")
        } else {
            None
        };
        if let Some(why) = why {
            e.kernel = KernelView {
                state: KernelState::Refused,
                reason: why.to_owned(),
                source: e.kernel.source,
            };
            e.verdict = format!("refused in the kernel (connect fails with EPERM): {why}");
            return e;
        }
    }
    let port = match mode {
        Some(CgroupMode::Redirect { port }) if port != 0 => port,
        _ => pinned.map(|p| p.proxy_port).unwrap_or(config.proxy_port),
    };
    let listener = if ip.is_ipv4() {
        format!("127.0.0.1:{port}")
    } else {
        format!("[::1]:{port}")
    };
    if !audited {
        e.kernel.reason = format!(
            "not loopback, in no skip range: rewritten to the proxy listener {listener} in the pod's netns"
        );
    }

    // 3. The proxy's plan: rule, route, name check, tunnel and hops, as the proxy makes it.
    let facts = plan::Facts {
        orig: SocketAddr::new(ip, q.dst.port()),
        host: q.host.as_deref(),
        host_source,
    };
    let plan = plan::plan_with(config, node_addrs, &facts, |host, port| resolve(host, port));
    let Some(route) = plan.route else {
        e.policy = Some(PolicyView {
            route: None,
            rule: plan.rule.clone(),
            name_check: None,
        });
        e.verdict = format!(
            "refused by the proxy ({}): it never dials {ip} directly on a pod's behalf; allow it with allow-dial in the config file",
            plan.rule
        );
        if audited {
            e.verdict = audited_verdict(&q.dst, &e.verdict);
        }
        return e;
    };
    if let Some(check) = &plan.name_check {
        let host = plan.host.as_deref().unwrap_or_default();
        e.notes.push(format!(
            "a name rule chose direct: the daemon only goes direct when {host} resolves to {ip}; resolved here: {}",
            match &check.error {
                Some(err) => format!("failed ({err})"),
                None => check.resolved.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            }
        ));
    }
    e.policy = Some(PolicyView {
        route: Some(route),
        rule: plan.rule.clone(),
        name_check: plan.name_check.clone(),
    });

    // 4. The hops and their request heads.
    match plan.hops(config) {
        Ok(h) => {
            e.hops = h.iter().map(render_hop).collect();
            let via = match (route, &plan.tunnel(config).proxy) {
                (Route::Gateway, Some(p)) => format!(" via the enterprise proxy {}", p.url),
                _ => String::new(),
            };
            e.verdict = format!("redirected; route {route}{via} (rule {})", plan.rule);
        }
        Err(why) => e.verdict = format!("redirected, but the connection fails: {why}"),
    }
    if audited {
        e.verdict = audited_verdict(&q.dst, &e.verdict);
    }
    e
}

/// The verdict for an audited workload: what happens now, then what enforcement would do.
fn audited_verdict(dst: &SocketAddr, enforced: &str) -> String {
    format!(
        "audited: goes direct to {dst} now, counted as `redirect`; under enforcement: {enforced}"
    )
}

fn join(s: &BTreeSet<IpNet>) -> String {
    if s.is_empty() {
        "none".into()
    } else {
        s.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn not_redirected(mut e: Explanation, reason: String) -> Explanation {
    e.verdict = format!("not redirected: {reason}");
    e.kernel = KernelView {
        state: KernelState::NotRedirected,
        reason,
        source: e.kernel.source,
    };
    e
}

/// The entry the hook finds for `c`: walking from the root down its first
/// [`MAX_CGROUP_DEPTH`] levels, the first that is in `rdr_enabled`, with its mode.
fn entry_of<'a>(c: &'a CgroupChain, p: &PinnedState) -> Option<(&'a (PathBuf, u64), CgroupMode)> {
    c.chain
        .iter()
        .take(MAX_CGROUP_DEPTH as usize)
        .find_map(|hit| p.enabled.get(&hit.1).map(|m| (hit, *m)))
}

fn cgroup_view(config: &Config, c: &CgroupChain, pinned: Option<&PinnedState>) -> CgroupView {
    let id = c.chain.last().map(|(_, id)| *id).unwrap_or(0);
    let mut v = CgroupView {
        path: c.path.clone(),
        pod: c.pod.clone(),
        id,
        enabled: None,
        enabled_by: None,
        detail: String::new(),
    };
    match pinned {
        Some(p) => {
            let hit = entry_of(c, p).map(|(hit, _)| hit);
            v.enabled = Some(hit.is_some());
            v.enabled_by = hit.map(|(p, _)| p.clone());
            v.detail = match hit {
                Some((p, hid)) if *hid == id => {
                    format!("enabled in the kernel (rdr_enabled has its id {hid})")
                }
                Some((p, hid)) => format!(
                    "enabled in the kernel through its ancestor {} (id {hid})",
                    p.display()
                ),
                None if c.chain.len() > MAX_CGROUP_DEPTH as usize => format!(
                    "not enabled: no entry in rdr_enabled for its first {MAX_CGROUP_DEPTH} levels (it is {} levels deep)",
                    c.chain.len()
                ),
                None => "not enabled: neither it nor an ancestor is in rdr_enabled".into(),
            };
        }
        None if config.kubernetes => {
            v.detail =
                "unknown: Kubernetes mode decides per pod at run time and no pins could be read"
                    .into()
        }
        None => {
            let hit = config
                .cgroups
                .iter()
                .filter_map(|p| p.canonicalize().ok())
                .find(|p| c.path.starts_with(p));
            v.enabled = Some(hit.is_some());
            v.detail = match &hit {
                Some(p) => format!("the configuration enables it (--cgroup {})", p.display()),
                None => "not enabled by the configuration (no --cgroup at or above it)".into(),
            };
            v.enabled_by = hit;
        }
    }
    v
}

/// One planned hop as `explain` shows it: where it connects and its request head, secrets
/// redacted.
pub fn render_hop(h: &HopPlan) -> Hop {
    let mut request = h
        .request
        .as_ref()
        .map(|r| r.redacted_lines())
        .unwrap_or_default();
    let connect = match &h.endpoint {
        Endpoint::Target(dst) => format!("TCP to {dst} directly (no CONNECT)"),
        Endpoint::Proxy {
            authority,
            tls_name,
        } => {
            let tls = tls_name
                .as_ref()
                .map(|n| format!(", then TLS (SNI {n})"))
                .unwrap_or_default();
            format!("TCP to the enterprise proxy {authority}{tls}")
        }
        Endpoint::Gateway {
            authority,
            server_name,
            alpn,
            client_cert,
            through_proxy,
        } => {
            if alpn.iter().any(|a| a == "h2")
                && let Some(r) = &h.request
            {
                request.push(format!(
                    "(if the gateway picks h2: the same as a CONNECT stream, :authority {}, on a shared session)",
                    r.authority()
                ));
            }
            let through = if *through_proxy {
                "inside that tunnel".to_owned()
            } else {
                format!("over TCP to {authority}")
            };
            format!(
                "TLS to the gateway {authority} (SNI {server_name}, ALPN {}{}) {through}",
                if alpn.is_empty() {
                    "none".into()
                } else {
                    alpn.join(",")
                },
                if *client_cert {
                    ", client certificate"
                } else {
                    ""
                }
            )
        }
    };
    Hop {
        hop: h.hop,
        connect,
        request,
    }
}

pub fn render_text(e: &Explanation) -> String {
    let mut out = String::new();
    let host = match (&e.host, e.host_source) {
        (Some(h), HostSource::Host) => format!("host {h} (HTTP Host header)"),
        (Some(h), _) => format!("host {h} (TLS SNI)"),
        (None, _) => "no host name (the proxy tunnels by IP)".into(),
    };
    out += &format!("destination: {} — {host}\n", e.dst);
    if let Some(c) = &e.cgroup {
        let pod = c
            .pod
            .as_ref()
            .map(|p| format!(" (pod {p})"))
            .unwrap_or_default();
        out += &format!(
            "cgroup:      {}{pod}, id {}: {}\n",
            c.path.display(),
            c.id,
            c.detail
        );
    }
    let state = match e.kernel.state {
        KernelState::Redirected => "redirected",
        KernelState::Skipped => "SKIPPED",
        KernelState::NotRedirected => "NOT redirected",
        KernelState::Refused => "REFUSED",
        KernelState::Audited => "AUDITED (unchanged, counted)",
    };
    out += &format!(
        "kernel:      {state}: {} [from {}]\n",
        e.kernel.reason, e.kernel.source
    );
    if let Some(p) = &e.policy {
        match p.route {
            Some(r) => out += &format!("policy:      route {r}, rule {}\n", p.rule),
            None => out += &format!("policy:      REFUSED by safety rule {}\n", p.rule),
        }
    }
    if !e.hops.is_empty() {
        out += "hops:\n";
        for (i, h) in e.hops.iter().enumerate() {
            out += &format!("  {}. {}: {}\n", i + 1, h.hop, h.connect);
            for l in &h.request {
                out += &format!("       {l}\n");
            }
        }
        if e.hops.iter().any(|h| !h.request.is_empty()) {
            out += &format!(
                "  then the client's own bytes, end to end with {}\n",
                e.host
                    .as_deref()
                    .map(str::to_owned)
                    .unwrap_or_else(|| e.dst.to_string())
            );
        }
    }
    out += &format!("verdict:     {}\n", e.verdict);
    for n in &e.notes {
        out += &format!("note: {n}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RawRoute, Settings};

    const PASSWORD: &str = "hunter2-never-printed";

    fn config(extra: Settings) -> Config {
        let base = Settings {
            gateway_url: Some("https://gw.arc.test:443".into()),
            proxy_https: Some(format!("http://agent:{PASSWORD}@203.0.113.50:3128")),
            proxy_allow_basic_over_http: Some(true),
            proxy_skip_range: Some("203.0.113.200/32,10.0.0.0/8,.svc".into()),
            ..Default::default()
        };
        Config::build(base.overlay(extra)).unwrap()
    }

    fn chain(ids: &[u64]) -> CgroupChain {
        let mut path = PathBuf::from("/cg");
        let mut chain = vec![(path.clone(), 1)];
        for id in ids {
            path = path.join(format!("c{id}"));
            chain.push((path.clone(), *id));
        }
        CgroupChain {
            path,
            pod: None,
            chain,
            below_attach: true,
        }
    }

    fn pinned(enabled: &[u64], skip: &[&str]) -> PinnedState {
        PinnedState {
            enabled: enabled
                .iter()
                .map(|id| (*id, CgroupMode::Redirect { port: 0 }))
                .collect(),
            skip: skip.iter().map(|s| s.parse().unwrap()).collect(),
            ready: true,
            proxy_port: 15300,
            attached: true,
        }
    }

    fn no_dns(_: &str, _: u16) -> Result<Vec<IpAddr>, String> {
        Err("no resolver in unit tests".into())
    }

    fn q(dst: &str, host: Option<&str>, cgroup: Option<CgroupChain>) -> Query {
        Query {
            dst: dst.parse().unwrap(),
            host: host.map(str::to_owned),
            http: false,
            cgroup,
        }
    }

    #[test]
    fn audited_cgroup_goes_direct_and_shows_what_enforcement_would_do() {
        let c = config(Settings::default());
        let mut p = pinned(&[20], &["203.0.113.200/32"]);
        p.enabled.insert(20, CgroupMode::Audit);
        // Not ready (no daemon configured the hooks): an audited connect is still not refused.
        p.ready = false;
        let e = analyze(
            &c,
            &q("203.0.113.10:443", None, Some(chain(&[10, 20, 30]))),
            Some(&p),
            &[],
            &no_dns,
        );
        let t = render_text(&e);
        assert!(matches!(e.kernel.state, KernelState::Audited), "{t}");
        assert!(
            e.verdict
                .starts_with("audited: goes direct to 203.0.113.10:443 now, counted as `redirect`; under enforcement: redirected; route gateway"),
            "{t}"
        );
        let skipped = analyze(
            &c,
            &q("203.0.113.200:443", None, Some(chain(&[10, 20, 30]))),
            Some(&p),
            &[],
            &no_dns,
        );
        assert!(matches!(skipped.kernel.state, KernelState::Skipped));
        assert!(
            skipped
                .notes
                .iter()
                .any(|n| n.contains("counted as `skip`")),
            "{:?}",
            skipped.notes
        );
    }

    #[test]
    fn gateway_through_proxy_shows_both_connect_lines_redacted() {
        let c = config(Settings {
            gateway_header: Some(vec!["X-Tenant: secret-tenant".into()]),
            ..Default::default()
        });
        let p = pinned(&[20], &["203.0.113.200/32", "10.0.0.0/8"]);
        let e = analyze(
            &c,
            &q(
                "203.0.113.10:443",
                Some("portal.azure.test"),
                Some(chain(&[10, 20, 30])),
            ),
            Some(&p),
            &[],
            &no_dns,
        );
        let t = render_text(&e);
        assert!(matches!(e.kernel.state, KernelState::Redirected), "{t}");
        assert!(
            t.contains("enabled in the kernel through its ancestor /cg/c10/c20 (id 20)"),
            "{t}"
        );
        assert!(
            t.contains("policy:      route gateway, rule default"),
            "{t}"
        );
        let lines: Vec<&str> = t.lines().map(str::trim).collect();
        let at = |l: &str| {
            lines
                .iter()
                .position(|x| *x == l)
                .unwrap_or_else(|| panic!("{l:?} missing:\n{t}"))
        };
        assert!(
            at("CONNECT gw.arc.test:443 HTTP/1.1") < at("Proxy-Authorization: Basic <redacted>")
        );
        assert!(
            at("Proxy-Authorization: Basic <redacted>")
                < at("CONNECT portal.azure.test:443 HTTP/1.1")
        );
        assert!(at("CONNECT portal.azure.test:443 HTTP/1.1") < at("X-Tenant: <redacted>"));
        assert!(t.contains("TLS to the gateway gw.arc.test:443 (SNI gw.arc.test, ALPN h2,http/1.1) inside that tunnel"), "{t}");
        assert!(
            t.contains("(if the gateway picks h2: the same as a CONNECT stream, :authority portal.azure.test:443, on a shared session)"),
            "{t}"
        );
        let json = serde_json::to_string(&e).unwrap();
        for leak in [PASSWORD, "secret-tenant"] {
            assert!(
                !t.contains(leak) && !json.contains(leak),
                "{leak} leaked:\n{t}\n{json}"
            );
        }
    }

    #[test]
    fn kernel_skips_loopback_and_skip_ranges_from_pins_or_config() {
        let c = config(Settings::default());
        let p = pinned(&[1], &["203.0.113.0/24"]);
        let e = analyze(
            &c,
            &q("203.0.113.10:443", None, Some(chain(&[5]))),
            Some(&p),
            &[],
            &no_dns,
        );
        assert!(matches!(e.kernel.state, KernelState::Skipped), "{e:?}");
        assert!(
            e.verdict
                .contains("skipped in the kernel by skip range 203.0.113.0/24"),
            "{}",
            e.verdict
        );
        assert!(e.kernel.reason.contains("rdr_skip4"), "{}", e.kernel.reason);
        assert!(
            e.notes.iter().any(|n| n.contains("differ")),
            "pins and config disagree: {:?}",
            e.notes
        );
        // A range only this configuration has: skipped once a daemon runs with it.
        let e = analyze(
            &c,
            &q("10.9.9.9:443", None, Some(chain(&[5]))),
            Some(&p),
            &[],
            &no_dns,
        );
        assert!(
            e.verdict.contains("10.0.0.0/8") && e.kernel.reason.contains("once the daemon runs"),
            "{e:?}"
        );
        // Without pins the configuration's CIDRs decide; IPv4-mapped IPv6 is judged as IPv4.
        let e = analyze(
            &c,
            &q("[::ffff:10.1.2.3]:80", None, None),
            None,
            &[],
            &no_dns,
        );
        assert!(e.verdict.contains("10.0.0.0/8"), "{}", e.verdict);
        let e = analyze(&c, &q("127.0.0.53:53", None, None), None, &[], &no_dns);
        assert!(
            matches!(e.kernel.state, KernelState::Skipped) && e.verdict.contains("loopback"),
            "{}",
            e.verdict
        );
    }

    #[test]
    fn disabled_cgroup_is_not_redirected() {
        let c = config(Settings::default());
        let e = analyze(
            &c,
            &q(
                "203.0.113.10:443",
                Some("portal.azure.test"),
                Some(chain(&[7, 8])),
            ),
            Some(&pinned(&[9], &[])),
            &[],
            &no_dns,
        );
        assert!(matches!(e.kernel.state, KernelState::NotRedirected));
        assert!(e.verdict.starts_with("not redirected"), "{}", e.verdict);
        assert!(e.hops.is_empty() && e.policy.is_none());
        // Hooks configured by no daemon: nothing is redirected anywhere.
        let mut p = pinned(&[8], &[]);
        p.ready = false;
        let e = analyze(
            &c,
            &q("203.0.113.10:443", None, Some(chain(&[7, 8]))),
            Some(&p),
            &[],
            &no_dns,
        );
        assert!(e.verdict.contains("ready is 0"), "{}", e.verdict);
    }

    #[test]
    fn name_direct_is_checked_against_dns_and_safety_refusals_are_named() {
        let c = config(Settings {
            proxy_skip_range: Some("portal.azure.test".into()),
            ..Default::default()
        });
        let good = |_: &str, _: u16| Ok(vec!["203.0.113.10".parse().unwrap()]);
        let e = analyze(
            &c,
            &q("203.0.113.10:443", Some("portal.azure.test"), None),
            None,
            &[],
            &good,
        );
        let p = e.policy.as_ref().unwrap();
        assert_eq!(p.route, Some(Route::Direct));
        assert!(p.name_check.as_ref().unwrap().matches);
        assert!(
            render_text(&e).contains("TCP to 203.0.113.10:443 directly"),
            "{}",
            render_text(&e)
        );
        let bad = |_: &str, _: u16| Ok(vec!["198.51.100.1".parse().unwrap()]);
        let e = analyze(
            &c,
            &q("203.0.113.10:443", Some("portal.azure.test"), None),
            None,
            &[],
            &bad,
        );
        let p = e.policy.as_ref().unwrap();
        assert_eq!(
            p.route,
            Some(Route::Gateway),
            "mismatch falls back to the default route"
        );
        assert!(p.rule.contains("name/ip mismatch"), "{}", p.rule);

        let c = config(Settings {
            proxy_skip_range: Some("169.254.169.254:80".into()),
            ..Default::default()
        });
        let e = analyze(&c, &q("169.254.169.254:80", None, None), None, &[], &no_dns);
        assert!(e.policy.as_ref().unwrap().route.is_none());
        assert!(
            e.verdict.contains("refused") && e.verdict.contains("allow-dial"),
            "{}",
            e.verdict
        );
    }

    /// Serves `body` for `/workloads` (or 404 when `None`) to every request.
    fn admin(body: Option<&'static str>) -> SocketAddr {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let mut s = s.unwrap();
                let _ = s.read(&mut [0u8; 1024]);
                let resp = match body {
                    Some(b) => format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{b}", b.len()),
                    None => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".into(),
                };
                let _ = s.write_all(resp.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn pods_resolve_through_the_daemon() {
        let a = admin(Some(
            r#"[{"key":"u1","label":"agents/arc-1","cgroup":"/sys/fs/cgroup/kubepods/pod-u1","cgroup_id":77,"listening":true}]"#,
        ));
        assert_eq!(
            resolve_pod("agents/arc-1", a).unwrap(),
            PathBuf::from("/sys/fs/cgroup/kubepods/pod-u1")
        );
        let msg = resolve_pod("agents/other", a).unwrap_err().to_string();
        assert!(msg.contains("agents/arc-1"), "lists the known pods: {msg}");
        assert!(matches!(
            resolve_pod("no-slash", a),
            Err(ExplainError::PodSyntax(_))
        ));
        assert!(matches!(
            resolve_pod("a/b", admin(None)),
            Err(ExplainError::PodOldDaemon { .. })
        ));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let msg = resolve_pod("a/b", closed).unwrap_err().to_string();
        assert!(
            msg.contains("not running") && msg.contains("--cgroup"),
            "{msg}"
        );
    }

    #[test]
    fn proxy_route_and_token_header() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok-123").unwrap();
        let c = config(Settings {
            routes: Some(vec![RawRoute {
                host: Some("*.vault.azure.test".into()),
                route: "proxy".into(),
                ..Default::default()
            }]),
            gateway_token_file: Some(token),
            ..Default::default()
        });
        let e = analyze(
            &c,
            &q("203.0.113.10:443", Some("kv1.vault.azure.test"), None),
            None,
            &[],
            &no_dns,
        );
        let t = render_text(&e);
        assert!(t.contains("rule route:*.vault.azure.test->proxy"), "{t}");
        assert_eq!(e.hops.len(), 1);
        assert_eq!(
            e.hops[0].request[0],
            "CONNECT kv1.vault.azure.test:443 HTTP/1.1"
        );
        let e = analyze(
            &c,
            &q("203.0.113.10:443", Some("portal.azure.test"), None),
            None,
            &[],
            &no_dns,
        );
        assert!(
            e.hops[1]
                .request
                .contains(&"Authorization: Bearer <redacted>".to_owned()),
            "{:?}",
            e.hops
        );
        assert!(!render_text(&e).contains("tok-123"));
        // Nothing but a target IP: tunneled by IP.
        let e = analyze(&c, &q("[2001:db8::5]:8443", None, None), None, &[], &no_dns);
        assert_eq!(e.hops[1].request[0], "CONNECT [2001:db8::5]:8443 HTTP/1.1");
    }
}
