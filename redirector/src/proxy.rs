//! The proxy: per-netns listeners, original-destination lookup, and the relay.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    bpf::{self, Maps},
    config::Config,
    netns::{self, NetnsError, NetnsId},
    telemetry::{DirectionLabels, Metrics, ReasonLabels, RouteLabels},
};

/// State shared by every listener and connection task.
pub struct Shared {
    pub config: Arc<Config>,
    pub maps: Mutex<Maps>,
    pub metrics: Arc<Metrics>,
    /// Cancelled on SIGTERM: listeners stop accepting, relays get the drain timeout.
    pub shutdown: CancellationToken,
    /// Every relay task, so shutdown can wait for them.
    pub tracker: TaskTracker,
}

/// A listener pair (127.0.0.1 and ::1) inside one network namespace.
pub struct NetnsListener {
    pub netns: NetnsId,
    pub cookie: u64,
    stop: CancellationToken,
}

impl Drop for NetnsListener {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds the proxy port inside the netns of `pid` and starts accepting.
pub fn spawn_listener(shared: &Arc<Shared>, pid: u32) -> Result<NetnsListener, NetnsError> {
    let port = shared.config.proxy_port;
    let netns = netns::netns_of(pid).map_err(|source| NetnsError::Open { pid, source })?;
    let addrs = vec![
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
        SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
    ];
    let std_listeners = netns::bind_in_netns(pid, addrs)?;
    let cookie = netns::netns_cookie(&std_listeners[0])?;
    let stop = shared.shutdown.child_token();
    for l in std_listeners {
        let local = l.local_addr().ok();
        let listener = TcpListener::from_std(l).map_err(|source| NetnsError::Bind {
            pid,
            addr: local.unwrap_or(SocketAddr::from(([127, 0, 0, 1], port))),
            source,
        })?;
        let shared = Arc::clone(shared);
        let stop = stop.clone();
        tokio::spawn(accept_loop(shared, listener, cookie, stop));
    }
    info!(pid, netns_cookie = cookie, port, "proxy listening in pod network namespace");
    Ok(NetnsListener { netns, cookie, stop })
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, cookie: u64, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => on_accept(&shared, cookie, stream, peer),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn on_accept(shared: &Arc<Shared>, cookie: u64, stream: TcpStream, peer: SocketAddr) {
    let key = bpf::sock_key(cookie, peer);
    let found = shared.maps.lock().expect("maps lock poisoned").take_orig(&key);
    let orig = match found {
        Ok(Some(d)) => bpf::orig_to_socket_addr(&d),
        Ok(None) => {
            // Not a connection our hook redirected (or its record was evicted): never guess.
            shared.metrics.refused.get_or_create(&ReasonLabels { reason: "no_original_destination" }).inc();
            warn!(%peer, netns_cookie = cookie, "refused connection with no recorded original destination");
            reset(stream);
            return;
        }
        Err(e) => {
            shared.metrics.refused.get_or_create(&ReasonLabels { reason: "map_error" }).inc();
            warn!(%peer, error = %crate::error_chain(&e), "refused connection: original destination lookup failed");
            reset(stream);
            return;
        }
    };
    let span = info_span!("conn", %peer, orig_dst = %orig);
    let shared2 = Arc::clone(shared);
    shared.tracker.spawn(relay(shared2, stream, orig).instrument(span));
}

/// Close with RST so the client sees "connection reset" at once rather than a clean EOF.
fn reset(stream: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

async fn relay(shared: Arc<Shared>, mut client: TcpStream, orig: SocketAddr) {
    let started = Instant::now();
    shared.metrics.active.inc();
    let _active = scopeguard(|| {
        shared.metrics.active.dec();
    });
    let route = "direct";
    info!(route, "redirected connection accepted");
    let upstream = tokio::time::timeout(shared.config.connect_timeout, TcpStream::connect(orig)).await;
    let mut upstream = match upstream {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            finish(&shared, route, "upstream_connect_error", 0, 0, started, Some(&e.to_string()));
            reset(client);
            return;
        }
        Err(_) => {
            finish(&shared, route, "upstream_connect_timeout", 0, 0, started, None);
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // copy_bidirectional propagates half-close: EOF from one side becomes shutdown(SHUT_WR)
    // towards the other, and it keeps relaying the other direction until that ends too.
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => r,
        _ = drain_deadline(&shared) => Err(std::io::Error::other("daemon shutting down")),
    };
    match result {
        Ok((tx, rx)) => finish(&shared, route, "ok", tx, rx, started, None),
        Err(e) => {
            let _ = client.shutdown().await;
            finish(&shared, route, "relay_error", 0, 0, started, Some(&e.to_string()));
        }
    }
}

/// Resolves `drain_timeout` after shutdown starts.
async fn drain_deadline(shared: &Shared) {
    shared.shutdown.cancelled().await;
    tokio::time::sleep(shared.config.drain_timeout).await;
}

fn finish(
    shared: &Shared,
    route: &'static str,
    result: &'static str,
    tx: u64,
    rx: u64,
    started: Instant,
    error: Option<&str>,
) {
    let m = &shared.metrics;
    m.connections.get_or_create(&RouteLabels { route, result }).inc();
    m.bytes.get_or_create(&DirectionLabels { direction: "tx" }).inc_by(tx);
    m.bytes.get_or_create(&DirectionLabels { direction: "rx" }).inc_by(rx);
    let duration_ms = started.elapsed().as_millis() as u64;
    if result == "ok" {
        info!(route, result, bytes_tx = tx, bytes_rx = rx, duration_ms, "connection closed");
    } else {
        warn!(route, result, error = error.unwrap_or(""), duration_ms, "connection failed");
    }
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
                debug!(?ns, "closing listener of a network namespace no longer in use");
            }
            keep
        });
    }
}
