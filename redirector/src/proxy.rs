//! The proxy: per-netns listeners, original-destination lookup, and the relay.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering as AtomicOrdering},
    },
    time::{Duration, Instant},
};

use redirector_common::PROXY_PORT_CHOICES;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    api::ConnView,
    bpf,
    budget::reserve,
    netns::{self, NetnsError, NetnsId},
    plan,
    policy::Route,
    relay,
    sniff::{self, HostSource},
    state::Shared,
    telemetry::{
        ConnResult, Direction, DirectionLabels, ReasonLabels, Refusal, RouteLabels, Side,
        SideLabels, TunnelFailureLabels,
    },
    tunnel::{self, HopStatus},
};

/// Removes a connection from the live registry when the relay ends, however it ends.
struct ConnGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        {
            let mut c = self.shared.conns();
            c.remove(&self.id);
        }
    }
}

/// A listener pair (127.0.0.1 and ::1) inside one network namespace.
pub struct NetnsListener {
    pub netns: NetnsId,
    pub cookie: u64,
    /// The port it listens on (127.0.0.1 and ::1), the one the workload's entry points at.
    pub port: u16,
    stop: CancellationToken,
}

impl Drop for NetnsListener {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds the proxy listeners inside the netns of `pid`, on the first free port of the
/// configured range, and starts accepting.
/// `workload` names what uses this netns in the audit log (pod, or cgroup path).
pub fn spawn_listener(
    shared: &Arc<Shared>,
    at: &ListenAt,
    workload: Arc<str>,
) -> Result<NetnsListener, NetnsError> {
    let first = shared.config.load().proxy_port;
    let ports = (0..PROXY_PORT_CHOICES)
        .filter_map(|i| first.checked_add(i))
        .collect();
    let (pid, netns, (port, std_listeners, cookie)) = match at {
        ListenAt::Pid(pid) => {
            let pid = *pid;
            let netns = netns::netns_of(pid).map_err(|source| NetnsError::Open { pid, source })?;
            (pid, netns, netns::bind_in_netns(pid, ports)?)
        }
        ListenAt::File(ns) => {
            let file = ns
                .file
                .try_clone()
                .map_err(|source| NetnsError::Open { pid: 0, source })?;
            (0, ns.id, netns::bind_in(file, 0, ports)?)
        }
    };
    let stop = shared.shutdown.child_token();
    // One budget for the namespace: both listeners (v4, v6) count against it.
    let pod = Pod {
        workload: Arc::clone(&workload),
        open: Arc::default(),
        pending: Arc::default(),
        cookie,
    };
    for l in std_listeners {
        let local = l.local_addr().ok();
        let listener = TcpListener::from_std(l).map_err(|source| NetnsError::Bind {
            pid,
            addr: local.unwrap_or(SocketAddr::from(([127, 0, 0, 1], port))),
            source,
        })?;
        let (shared, stop, pod) = (Arc::clone(shared), stop.clone(), pod.clone());
        let listener = Arc::new(listener);
        // Tracked like relays: at exit the daemon waits for the accept loops to hand over
        // what they drained (see `accept_loop`) before it waits for the relays.
        let tracker = shared.tracker.clone();
        tracker.spawn(async move {
            let restarts = shared.metrics.listener_restarts.clone();
            let workload = Arc::clone(&pod.workload);
            supervised(&workload, &restarts, || {
                accept_loop(
                    Arc::clone(&shared),
                    Arc::clone(&listener),
                    stop.clone(),
                    pod.clone(),
                )
            })
            .await;
        });
    }
    info!(pid, netns_cookie = cookie, port, workload = %workload, "proxy listening in pod network namespace");
    Ok(NetnsListener {
        netns,
        cookie,
        port,
        stop,
    })
}

/// How to reach the namespace a listener is bound in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAt {
    /// Through a process in it (`/proc/<pid>/ns/net`).
    Pid(u32),
    /// Through the namespace the container runtime made, handed over by the CNI plugin
    /// before any process is in it.
    File(netns::NetnsFile),
}

/// The pod (network namespace) a listener serves: its name for the audit line, its netns
/// cookie (the key of its original destinations) and its open connections.
#[derive(Clone)]
struct Pod {
    workload: Arc<str>,
    open: Arc<AtomicUsize>,
    /// Its connections still being sniffed or set up.
    pending: Arc<AtomicUsize>,
    cookie: u64,
}

/// A connection's place in the node's and its pod's connection budgets, given back when the
/// connection ends, however it ends; and, until its tunnel is up, in the node's budget of
/// connections being sniffed or set up.
struct Slot {
    node: Arc<AtomicUsize>,
    pod: Arc<AtomicUsize>,
    /// The node's and the pod's pending counts, until the tunnel is up.
    pending: Option<(Arc<AtomicUsize>, Arc<AtomicUsize>)>,
}

impl Slot {
    /// Takes a place in the budgets, or says which one is full. A pod may hold at most a
    /// quarter of the node's pending budget, so that its silent connections cannot keep
    /// every other pod's new connections out.
    fn take(shared: &Shared, pod: &Pod) -> Result<Slot, Refusal> {
        let cfg = shared.config.load();
        if !reserve(&shared.open, 1, cfg.max_connections) {
            return Err(Refusal::NodeLimit);
        }
        if !reserve(&pod.open, 1, cfg.max_connections_per_pod) {
            shared.open.fetch_sub(1, AtomicOrdering::AcqRel);
            return Err(Refusal::PodLimit);
        }
        let pod_share = (cfg.max_pending / 4).max(1);
        if !reserve(&pod.pending, 1, pod_share) {
            shared.open.fetch_sub(1, AtomicOrdering::AcqRel);
            pod.open.fetch_sub(1, AtomicOrdering::AcqRel);
            return Err(Refusal::SetupLimit);
        }
        if !reserve(&shared.pending, 1, cfg.max_pending) {
            shared.open.fetch_sub(1, AtomicOrdering::AcqRel);
            pod.open.fetch_sub(1, AtomicOrdering::AcqRel);
            pod.pending.fetch_sub(1, AtomicOrdering::AcqRel);
            return Err(Refusal::SetupLimit);
        }
        Ok(Slot {
            node: Arc::clone(&shared.open),
            pod: Arc::clone(&pod.open),
            pending: Some((Arc::clone(&shared.pending), Arc::clone(&pod.pending))),
        })
    }

    /// The tunnel is up: the connection no longer counts as pending.
    fn established(&mut self) {
        if let Some((node, pod)) = self.pending.take() {
            node.fetch_sub(1, AtomicOrdering::AcqRel);
            pod.fetch_sub(1, AtomicOrdering::AcqRel);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.established();
        self.node.fetch_sub(1, AtomicOrdering::AcqRel);
        self.pod.fetch_sub(1, AtomicOrdering::AcqRel);
    }
}

/// Runs the task `make` returns until it ends on its own, restarting it each time it panics:
/// a listener's accept loop must never end silently, or its pod's connections would queue
/// unanswered. Each restart is logged and counted (`redirector_listener_restarts_total`).
async fn supervised<F, Fut>(
    workload: &str,
    restarts: &prometheus_client::metrics::counter::Counter,
    mut make: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match tokio::spawn(make()).await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                restarts.inc();
                tracing::error!(workload = %workload, "listener task panicked; restarting it");
                // A task that panics at once must not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Cancelled: the runtime is shutting down.
            Err(_) => return,
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: Arc<TcpListener>,
    stop: CancellationToken,
    pod: Pod,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => {
                let n = drain_queue(&shared, &listener, &pod);
                if n > 0 {
                    info!(workload = %pod.workload, connections = n, "listener closing: took the connections already queued on it");
                }
                break;
            }
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => on_accept(&shared, &pod, stream, peer),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// When a listener stops (shutdown, or its pod is gone): the connections the kernel already
/// completed and queued on it are taken and served, since closing the listener would reset
/// them; none is waited for. Returns how many were taken.
fn drain_queue(shared: &Arc<Shared>, listener: &TcpListener, pod: &Pod) -> usize {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let mut taken = 0;
    loop {
        let flags =
            nix::sys::socket::SockFlag::SOCK_NONBLOCK | nix::sys::socket::SockFlag::SOCK_CLOEXEC;
        match nix::sys::socket::accept4(listener.as_raw_fd(), flags) {
            Ok(fd) => {
                // SAFETY: accept4 returned a new connected socket that nothing else owns.
                let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
                let Ok(peer) = std.peer_addr() else {
                    continue;
                };
                if let Ok(stream) = TcpStream::from_std(std) {
                    on_accept(shared, pod, stream, peer);
                    taken += 1;
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            // EAGAIN: the queue is empty.
            Err(_) => return taken,
        }
    }
}

fn on_accept(shared: &Arc<Shared>, pod: &Pod, stream: TcpStream, peer: SocketAddr) {
    let (cookie, workload) = (pod.cookie, &pod.workload);
    // The budgets first: a pod past its share is refused before it costs anything more.
    let slot = match Slot::take(shared, pod) {
        Ok(slot) => slot,
        Err(reason) => {
            shared
                .metrics
                .refused
                .get_or_create(&ReasonLabels { reason })
                .inc();
            if let Some(held_back) = shared.refusal_log.allow() {
                let cfg = shared.config.load();
                warn!(workload = %workload, reason = %reason, max_connections = cfg.max_connections,
                    max_connections_per_pod = cfg.max_connections_per_pod, held_back,
                    "refusing connections over the connection budget");
            }
            reset(stream);
            return;
        }
    };
    let key = bpf::sock_key(cookie, peer);
    let found = shared.maps().take_orig(&key);
    let orig = match found {
        Ok(Some(d)) => bpf::orig_to_socket_addr(&d),
        Ok(None) => {
            // Not a connection our hook redirected (or its record was evicted): never guess.
            shared
                .metrics
                .refused
                .get_or_create(&ReasonLabels {
                    reason: Refusal::NoOriginalDestination,
                })
                .inc();
            warn!(%peer, netns_cookie = cookie, workload = %workload, "refused connection with no recorded original destination");
            reset(stream);
            return;
        }
        Err(e) => {
            shared
                .metrics
                .refused
                .get_or_create(&ReasonLabels {
                    reason: Refusal::MapError,
                })
                .inc();
            warn!(%peer, error = %crate::error_chain(&e), "refused connection: original destination lookup failed");
            reset(stream);
            return;
        }
    };
    debug!(%peer, orig_dst = %orig, "redirected connection accepted");
    shared.tracker.spawn(relay(
        Arc::clone(shared),
        stream,
        peer,
        orig,
        Arc::clone(workload),
        slot,
    ));
}

/// Close with RST so the client sees "connection reset" at once rather than a clean EOF.
fn reset(stream: TcpStream) {
    // SO_LINGER with a zero timeout: close() sends RST and drops unsent data.
    if let Err(e) = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)) {
        debug!(error = %e, "cannot set SO_LINGER for a reset");
    }
    drop(stream);
}

/// Everything the audit line says about one connection.
struct Audit {
    workload: Arc<str>,
    peer: SocketAddr,
    orig: SocketAddr,
    host: Option<String>,
    host_source: HostSource,
    rule: String,
    route: Route,
    hops: Vec<HopStatus>,
    /// The gateway session the tunnel ran on (`gateway` route).
    session: Option<tunnel::SessionInfo>,
    /// How the relay moved the bytes: `copy` through a relay buffer, `splice` (kTLS) or
    /// `frames` (HTTP/2 DATA frames handed through whole).
    relay: &'static str,
    tx: u64,
    rx: u64,
    started: Instant,
}

impl Audit {
    /// `warm/h1`, `fresh/h1`, `shared/h2`…, `-` off the gateway route; `+resumed` when the
    /// gateway TLS handshake resumed a session, `+ktls` when the kernel protects its records.
    fn session(&self) -> String {
        match self.session {
            None => "-".into(),
            Some(s) => format!(
                "{}/{}{}{}",
                s.reuse.as_str(),
                s.proto,
                if s.resumed { "+resumed" } else { "" },
                if s.kernel_tls { "+ktls" } else { "" }
            ),
        }
    }

    fn hops(&self) -> String {
        self.hops
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

async fn relay(
    shared: Arc<Shared>,
    mut client: TcpStream,
    peer: SocketAddr,
    orig: SocketAddr,
    workload: Arc<str>,
    // Held for the connection's life: its place in the budgets.
    mut slot: Slot,
) {
    let cfg = shared.config.load_full();
    shared.metrics.active.inc();
    let _active = scopeguard(|| {
        shared.metrics.active.dec();
    });
    let mut audit = Audit {
        workload,
        peer,
        orig,
        host: None,
        host_source: HostSource::Ip,
        rule: String::new(),
        route: cfg.default_route,
        hops: Vec::new(),
        session: None,
        relay: "copy",
        tx: 0,
        rx: 0,
        started: Instant::now(),
    };
    // 1. The host name: TLS SNI or HTTP Host, read with a deadline and a byte cap. The bytes
    //    are kept and replayed to the target unchanged once the tunnel is up. Skipped when
    //    no decision could depend on it.
    let peeked = if !plan::needs_host(&cfg) {
        Ok(sniff::Peeked {
            bytes: Vec::new(),
            host: None,
            source: HostSource::Ip,
        })
    } else {
        Box::pin(sniff::peek_host(
            &mut client,
            cfg.sniff_timeout,
            cfg.sniff_cap,
        ))
        .await
    };
    let peeked = match peeked {
        Ok(p) => p,
        Err(e) => {
            refuse(
                &shared,
                &audit,
                Side::Downstream,
                "client_error",
                &e.to_string(),
            );
            return;
        }
    };
    audit.host = peeked.host.clone();
    audit.host_source = peeked.source;

    // 2. The plan: rule, route (or a safety refusal), tunnel, target authority.
    let node_addrs = shared.node_addrs.load();
    let facts = plan::Facts {
        orig,
        host: audit.host.as_deref(),
        host_source: audit.host_source,
    };
    let plan = match plan::start(&cfg, &node_addrs, &facts) {
        plan::Step::Ready(p) => p,
        plan::Step::Resolve(pending) => {
            let (host, _) = pending.host();
            let answer = shared.names.lookup(host).await;
            pending.finish(answer, &cfg)
        }
    };
    audit.rule = plan.rule.clone();
    let Some(route) = plan.route else {
        // The safety rules only ever refuse a direct dial.
        audit.route = Route::Direct;
        warn!(orig_dst = %orig, rule = %audit.rule, "security: refusing to dial this address directly on a pod's behalf (allow it with allow-dial)");
        reset(client);
        refuse(
            &shared,
            &audit,
            Side::Internal,
            "safety",
            "destination may not be dialed directly",
        );
        return;
    };
    if plan.name_check.as_ref().is_some_and(|c| !c.matches) {
        warn!(host = %audit.host.as_deref().unwrap_or(""), orig_dst = %orig, rule = %audit.rule,
            "security: host name does not resolve to the original destination; using the default route instead of direct");
    }
    audit.route = route;

    // 3. The tunnel: every hop must answer 2xx before one client byte moves.
    // Boxed: the set-up futures are kilobytes, and a task keeps its largest state for its
    // whole life; unboxed, every idle tunnel would carry them.
    let opened = match (route, shared.gateway.load_full()) {
        (Route::Gateway, Some(pool)) => Box::pin(pool.open(&plan.authority)).await,
        _ => {
            Box::pin(tunnel::open(
                plan.tunnel(&cfg),
                route,
                &plan.authority,
                orig,
            ))
            .await
        }
    };
    let mut upstream = match opened {
        Ok(u) => u,
        Err(e) => {
            let status = e
                .status()
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into());
            shared
                .metrics
                .tunnel_failures
                .get_or_create(&TunnelFailureLabels {
                    hop: e.hop(),
                    kind: e.kind(),
                })
                .inc();
            let cause = format!(
                "{} (hop={} kind={} status={status})",
                crate::error_chain(&e),
                e.hop(),
                e.kind()
            );
            reset(client);
            refuse(&shared, &audit, e.side(), e.kind(), &cause);
            return;
        }
    };
    audit.hops = upstream.hops.clone();
    audit.session = upstream.session;
    for (hop, took) in &upstream.setup {
        shared
            .metrics
            .tunnel_setup
            .get_or_create(&crate::telemetry::HopLabels { hop })
            .observe(took.as_secs_f64());
    }
    let id = shared
        .next_conn
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    {
        let mut c = shared.conns();
        c.insert(
            id,
            ConnView {
                workload: audit.workload.to_string(),
                src: audit.peer.to_string(),
                orig_dst: audit.orig.to_string(),
                host: audit.host.clone(),
                route: audit.route.to_string(),
                started: audit.started,
                since_ms: 0,
            },
        );
    }
    let _conn = ConnGuard {
        shared: &shared,
        id,
    };
    if !peeked.bytes.is_empty()
        && let Err(e) = upstream.write_all(&peeked.bytes).await
    {
        refuse(
            &shared,
            &audit,
            Side::Upstream,
            "write_error",
            &e.to_string(),
        );
        return;
    }
    audit.tx = peeked.bytes.len() as u64;
    slot.established();
    // The peeked bytes are sent: their buffer must not live as long as an idle tunnel.
    drop(peeked);
    let _ = client.set_nodelay(true);

    // 4. Relay, half-close propagated: EOF from one side becomes a shutdown of the write
    //    half towards the other (for a tunnel: through every layer).
    //    A gateway session in kTLS is relayed with splice: its bytes stay in the kernel.
    let pipes = match upstream.kernel_tls() {
        None => None,
        Some(_) => relay::splice::Pipes::new()
            .inspect_err(|e| debug!(error = %e, "no pipes for splice: relaying by copy"))
            .ok(),
    };
    //    An HTTP/2 stream's DATA frames are handed through whole.
    audit.relay = match (&pipes, upstream.h2_stream().is_some()) {
        (Some(_), _) => "splice",
        (None, true) => "frames",
        (None, false) => "copy",
    };
    let relaying = async {
        if let Some(pipes) = pipes
            && let Some(k) = upstream.kernel_tls()
        {
            return relay::splice::relay(&mut client, k, pipes, cfg.idle_timeout).await;
        }
        if let Some(s) = upstream.h2_stream() {
            return s.relay(&mut client, cfg.idle_timeout).await;
        }
        relay::relay(&mut client, &mut upstream, cfg.idle_timeout).await
    };
    let relayed = tokio::select! {
        r = relaying => r,
        _ = drain_deadline(&shared) => relay::Relayed { tx: 0, rx: 0, close: "daemon shutting down".into(), ok: false },
    };
    audit.tx += relayed.tx;
    audit.rx += relayed.rx;
    let close = relayed.close;
    let result_label = if relayed.ok {
        ConnResult::Ok
    } else {
        ConnResult::RelayError
    };
    let m = &shared.metrics;
    m.connections
        .get_or_create(&RouteLabels {
            route: audit.route,
            result: result_label,
        })
        .inc();
    m.bytes
        .get_or_create(&DirectionLabels {
            direction: Direction::Tx,
        })
        .inc_by(audit.tx);
    m.bytes
        .get_or_create(&DirectionLabels {
            direction: Direction::Rx,
        })
        .inc_by(audit.rx);
    info!(
        workload = %audit.workload,
        src = %audit.peer,
        orig_dst = %audit.orig,
        host = %audit.host.as_deref().unwrap_or("-"),
        host_source = %audit.host_source,
        rule = %audit.rule,
        route = %audit.route,
        hops = %audit.hops(),
        session = %audit.session(),
        relay = %audit.relay,
        bytes_tx = audit.tx,
        bytes_rx = audit.rx,
        duration_ms = audit.started.elapsed().as_millis() as u64,
        close = %close,
        "audit"
    );
}

/// A connection closed before relaying: one warn-level audit line naming the cause.
fn refuse(shared: &Shared, a: &Audit, side: Side, kind: &'static str, cause: &str) {
    let m = &shared.metrics;
    m.connections
        .get_or_create(&RouteLabels {
            route: a.route,
            result: ConnResult::Refused,
        })
        .inc();
    m.errors.get_or_create(&SideLabels { side }).inc();
    warn!(
        workload = %a.workload,
        src = %a.peer,
        orig_dst = %a.orig,
        host = %a.host.as_deref().unwrap_or("-"),
        host_source = %a.host_source,
        rule = %a.rule,
        route = %a.route,
        side = %side.as_str(),
        kind = %kind,
        cause = %cause,
        duration_ms = a.started.elapsed().as_millis() as u64,
        "audit: connection refused"
    );
}

/// Resolves `drain_timeout` after shutdown starts.
async fn drain_deadline(shared: &Shared) {
    shared.shutdown.cancelled().await;
    tokio::time::sleep(shared.config.load().drain_timeout).await;
}

struct Guard<F: FnMut()>(F);
impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}

/// The listeners of the static (`--cgroup`) mode, one per network namespace in use.
#[derive(Default)]
pub struct ListenerSet {
    pub by_netns: HashMap<NetnsId, NetnsListener>,
}

impl ListenerSet {
    pub fn len(&self) -> usize {
        self.by_netns.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_netns.is_empty()
    }
    pub fn contains(&self, ns: &NetnsId) -> bool {
        self.by_netns.contains_key(ns)
    }
    pub fn insert(&mut self, l: NetnsListener) {
        self.by_netns.insert(l.netns, l);
    }
    /// Drops listeners of namespaces no longer in use (a listener keeps its netns alive).
    pub fn retain(&mut self, live: &std::collections::HashSet<NetnsId>) {
        self.by_netns.retain(|ns, _| {
            let keep = live.contains(ns);
            if !keep {
                debug!(
                    ?ns,
                    "closing listener of a network namespace no longer in use"
                );
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    /// A listener task that panics is restarted (and counted), not lost; one that ends on
    /// its own is not.
    #[tokio::test]
    async fn a_panicking_listener_task_is_restarted_and_counted() {
        let restarts = prometheus_client::metrics::counter::Counter::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&runs);
        supervised("ns/pod", &restarts, move || {
            let r = Arc::clone(&r);
            async move {
                if r.fetch_add(1, AtomicOrdering::SeqCst) < 2 {
                    panic!("poisoned lock");
                }
            }
        })
        .await;
        assert_eq!(runs.load(AtomicOrdering::SeqCst), 3);
        assert_eq!(restarts.get(), 2);
    }

    use super::*;
}
