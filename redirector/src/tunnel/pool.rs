//! Gateway sessions made ahead of demand.
//!
//! A new tunnel through the gateway costs TCP, the enterprise proxy's CONNECT, a TLS
//! handshake and the inner CONNECT: four round trips through two proxies before the pod's
//! first byte moves. The pool does all but the last ahead of demand:
//!
//! - **HTTP/1.1 gateways**: up to `warm` idle sessions (TLS up, proxy hop done) wait for a
//!   CONNECT. Each is used for exactly one tunnel: a refused CONNECT drops it (never reused
//!   after a refusal). Idle sessions the gateway (or the proxy) closed are found by a
//!   non-blocking read and replaced; sessions are also retired after `max_idle` so they
//!   never meet an idle timer on the way.
//! - **HTTP/2 gateways** (ALPN `h2`): tunnels are streams on a shared session, up to
//!   `h2_streams` each; a session the gateway closed (GOAWAY, reset) is dropped and a new
//!   one dialed.
//!
//! Sessions are made only while there is demand: from the first gateway tunnel until five
//! minutes after the last one (then shared HTTP/2 sessions without streams close too). Dial failures back off exponentially (1 s … 16 s) so a
//! gateway outage is not hammered; a tunnel that finds no ready session dials its own,
//! exactly as without the pool.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    telemetry::{Handshake, Metrics, PooledProto, RecordLayer, SessionLabels},
    tunnel::{
        self, GatewaySession, H2Session, HOP_GATEWAY, Reuse, TunnelConfig, TunnelError, Upstream,
    },
};

/// Pool sizing, from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PoolOptions {
    /// Idle HTTP/1.1 sessions kept ready (0 turns the pool off).
    pub warm: usize,
    /// Streams per HTTP/2 session before another session is opened.
    pub h2_streams: usize,
    /// Idle sessions older than this are closed and replaced.
    #[serde(with = "crate::tunnel::secs")]
    pub max_idle: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            warm: 2,
            h2_streams: 100,
            max_idle: Duration::from_secs(50),
        }
    }
}

struct Idle {
    session: GatewaySession,
    since: Instant,
}

struct State {
    idle: VecDeque<Idle>,
    h2: Vec<Arc<H2Session>>,
    dialing: usize,
    /// The last session the gateway gave us spoke h2: one session serves everyone.
    speaks_h2: bool,
    /// Whether any dial has told us the gateway's protocol yet.
    known: bool,
    /// A tunnel is dialing the session every later tunnel could share (h2, or not known yet).
    h2_dial_in_flight: bool,
    failures: u32,
    retry_at: Option<Instant>,
    /// The last tunnel asked of the pool. Sessions are made ahead of demand only while
    /// there is demand: not before the first gateway tunnel, and not after `COOL_DOWN`
    /// without one (a node without enabled pods keeps no sessions to the gateway).
    last_use: Option<Instant>,
    /// HTTP/1.1 sessions taken in the current one-second window, and the rate of the last.
    window: (Instant, u32),
    take_rate: f64,
    /// Moving average of how long a dial (proxy hop + TLS) takes.
    dial_secs: f64,
}

impl Default for State {
    fn default() -> Self {
        Self {
            idle: VecDeque::new(),
            h2: Vec::new(),
            dialing: 0,
            speaks_h2: false,
            known: false,
            h2_dial_in_flight: false,
            failures: 0,
            retry_at: None,
            last_use: None,
            window: (Instant::now(), 0),
            take_rate: 0.0,
            dial_secs: 0.0,
        }
    }
}

impl State {
    /// Closes the rate window once a second has passed (also when nothing was taken, so
    /// the rate decays).
    fn roll_window(&mut self) {
        let elapsed = self.window.0.elapsed().as_secs_f64();
        if elapsed >= 1.0 {
            self.take_rate = f64::from(self.window.1) / elapsed;
            self.window = (Instant::now(), 0);
        }
    }

    /// Sessions to keep ready: the configured number, or more when connections arrive
    /// faster than sessions can be dialed (Little's law, times two for bursts).
    fn warm_target(&self, configured: usize) -> usize {
        if configured == 0 {
            return 0;
        }
        let needed = (self.take_rate * self.dial_secs * 2.0).ceil() as usize;
        configured.max(needed.min(MAX_WARM))
    }
}

/// Upper bound of the demand-driven warm target.
const MAX_WARM: usize = 32;

/// How long after the last gateway tunnel the pool keeps sessions ready.
const COOL_DOWN: Duration = Duration::from_secs(300);

/// Ready gateway sessions for one tunnel configuration. Dropping the pool (on reload)
/// stops its refill task and closes its idle sessions; tunnels in use are unaffected.
pub struct GatewayPool {
    cfg: Arc<TunnelConfig>,
    opts: PoolOptions,
    state: Mutex<State>,
    wake: Arc<Notify>,
    /// Signalled when a tunnel's dial of a shareable session ends (either way).
    h2_dialed: Notify,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
}

impl Drop for GatewayPool {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl GatewayPool {
    /// A pool for `cfg`'s gateway, refilled by a background task until dropped or `stop`.
    pub fn start(
        cfg: TunnelConfig,
        opts: PoolOptions,
        metrics: Arc<Metrics>,
        stop: &CancellationToken,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            cfg: Arc::new(cfg),
            opts,
            state: Mutex::new(State::default()),
            wake: Arc::new(Notify::new()),
            h2_dialed: Notify::new(),
            stop: stop.child_token(),
            metrics,
        });
        if pool.cfg.gateway.is_some() && opts.warm > 0 {
            tokio::spawn(refill(Arc::downgrade(&pool), pool.stop.clone()));
        }
        pool
    }

    /// Stops refilling and closes the sessions it holds, each in order (TLS close_notify,
    /// HTTP/2 GOAWAY), within [`crate::relay::SHUTDOWN_GRACE`]: on reload, before the pool
    /// is replaced, and when the daemon stops. Tunnels already running are not affected.
    pub async fn close(&self) {
        self.stop.cancel();
        let (idle, h2) = match self.state.lock() {
            Ok(mut st) => (std::mem::take(&mut st.idle), std::mem::take(&mut st.h2)),
            Err(_) => return,
        };
        let idle = idle.into_iter().map(|i| i.session.close());
        let h2 = h2
            .into_iter()
            .filter_map(|s| Arc::try_unwrap(s).ok())
            .map(H2Session::close);
        futures::future::join(
            futures::future::join_all(idle),
            futures::future::join_all(h2),
        )
        .await;
    }

    /// A tunnel to `target_authority` through the gateway: on a shared HTTP/2 session, a
    /// warm HTTP/1.1 session, or a fresh one, in that order of preference.
    pub async fn open(&self, target_authority: &str) -> Result<Upstream, TunnelError> {
        let gw = tunnel::gateway_of(&self.cfg)?;
        let t = &self.cfg.timeouts;
        let request = tunnel::gateway_request(gw, target_authority).await?;
        if let Ok(mut st) = self.state.lock() {
            st.last_use = Some(Instant::now());
        }

        if let Some(h2) = self.shared_h2_or_wait(t).await {
            match h2.connect(&request, t).await {
                Err(TunnelError::Closed { .. }) => {
                    // The gateway ended that session between our check and the request
                    // (GOAWAY): nothing of the pod's was sent; go on with a new session.
                    debug!("gateway http/2 session closed under a new stream; redialing");
                    self.forget_closed_h2();
                }
                r => return self.count(r),
            }
        }
        // When a dial may produce the session everyone shares (h2, or not known yet), later
        // tunnels wait for it instead of dialing their own (a burst on a cold daemon would
        // otherwise open a session per connection); the claim lasts until its handshake.
        let (session, reuse, claim) = match self.take_idle() {
            Some(s) => (s, Reuse::Warm, None),
            None => {
                let claim = DialClaim::new(self);
                (self.dial_counted().await?, Reuse::Fresh, Some(claim))
            }
        };
        if session.h2 {
            let h2 = H2Session::handshake(session, t).await.map(Arc::new);
            if let Ok(h2) = &h2 {
                self.adopt_h2(Arc::clone(h2), true);
            }
            drop(claim);
            self.wake.notify_one();
            return self.count(h2?.connect(&request, t).await);
        }
        drop(claim);
        self.wake.notify_one();
        let r = match session.connect_h1(reuse, &request, t).await {
            // A warm session can die in the instant between the liveness check and the
            // CONNECT; that says nothing about the target. One fresh retry, no more.
            Err(TunnelError::Closed { .. } | TunnelError::Io { .. }) if reuse == Reuse::Warm => {
                debug!("warm gateway session was closed; dialing a fresh one");
                let fresh = self.dial_counted().await?;
                fresh.open_once(&request, t).await
            }
            r => r,
        };
        self.count(r)
    }

    fn count(&self, r: Result<Upstream, TunnelError>) -> Result<Upstream, TunnelError> {
        if let Ok(u) = &r
            && let Some(s) = u.session
        {
            self.metrics
                .gateway_tunnels
                .get_or_create(&SessionLabels {
                    reuse: s.reuse,
                    proto: s.proto,
                })
                .inc();
        }
        r
    }

    fn shared_h2(&self) -> Option<Arc<H2Session>> {
        let st = self.state.lock().ok()?;
        // The oldest session with room: tunnels pack onto as few sessions as possible.
        st.h2
            .iter()
            .find(|s| !s.is_closed() && s.streams() < self.opts.h2_streams)
            .cloned()
    }

    /// A shared session with room; if none but another tunnel is dialing one, waits for
    /// that dial (bounded by the dial's own timeouts) and looks again.
    async fn shared_h2_or_wait(&self, t: &tunnel::Timeouts) -> Option<Arc<H2Session>> {
        let dialed = self.h2_dialed.notified();
        tokio::pin!(dialed);
        dialed.as_mut().enable();
        if let Some(h2) = self.shared_h2() {
            return Some(h2);
        }
        let waiting = self
            .state
            .lock()
            .is_ok_and(|st| st.h2_dial_in_flight && (st.speaks_h2 || !st.known));
        if !waiting {
            return None;
        }
        let _ =
            tokio::time::timeout(t.connect + t.tls_handshake + t.connect_response, dialed).await;
        self.shared_h2()
    }

    /// Marks a dial as the one others wait for, when the gateway speaks h2 or nobody knows
    /// yet and no such dial is running. Returns whether this caller must end it (see
    /// [`DialClaim`]).
    fn claim_h2_dial(&self) -> bool {
        let Ok(mut st) = self.state.lock() else {
            return false;
        };
        if (st.speaks_h2 || !st.known) && !st.h2_dial_in_flight {
            st.h2_dial_in_flight = true;
            true
        } else {
            false
        }
    }

    fn end_h2_dial(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.h2_dial_in_flight = false;
        }
        self.h2_dialed.notify_waiters();
    }

    fn forget_closed_h2(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.h2.retain(|s| !s.is_closed());
        }
    }

    /// The end of an h2 session's handshake started by the refill task.
    fn h2_dialed(&self, r: Result<H2Session, TunnelError>) {
        if let Ok(mut st) = self.state.lock() {
            st.dialing -= 1;
        }
        match r {
            Ok(s) => self.adopt_h2(Arc::new(s), true),
            Err(e) => debug!(error = %e, "gateway http/2 handshake failed"),
        }
    }

    /// Adds a session for shared use, unless `spare` and an open one still has room (then
    /// the new one is closed: a single session serves everyone).
    fn adopt_h2(&self, s: Arc<H2Session>, spare: bool) {
        if let Ok(mut st) = self.state.lock() {
            st.speaks_h2 = true;
            st.known = true;
            st.h2.retain(|s| !s.is_closed());
            let room = st.h2.iter().any(|s| s.streams() < self.opts.h2_streams);
            if !(spare && room) {
                st.h2.push(s);
            }
        }
    }

    /// The newest idle session still open (older ones are closer to an idle timeout).
    fn take_idle(&self) -> Option<GatewaySession> {
        let mut st = self.state.lock().ok()?;
        st.roll_window();
        st.window.1 += 1;
        while let Some(mut idle) = st.idle.pop_back() {
            if idle.since.elapsed() < self.opts.max_idle && idle.session.is_alive() {
                return Some(idle.session);
            }
            tokio::spawn(idle.session.close());
        }
        None
    }

    async fn dial_counted(&self) -> Result<GatewaySession, TunnelError> {
        let started = Instant::now();
        let s = tunnel::dial_gateway(&self.cfg).await?;
        if let Ok(mut st) = self.state.lock() {
            let took = started.elapsed().as_secs_f64();
            st.dial_secs = if st.dial_secs == 0.0 {
                took
            } else {
                0.8 * st.dial_secs + 0.2 * took
            };
        }
        self.metrics
            .tls_handshakes
            .get_or_create(&crate::telemetry::HandshakeLabels {
                hop: HOP_GATEWAY,
                kind: if s.resumed {
                    Handshake::Resumed
                } else {
                    Handshake::Full
                },
            })
            .inc();
        self.metrics
            .gateway_tls_sessions
            .get_or_create(&crate::telemetry::RecordsLabels {
                records: if s.kernel_tls {
                    RecordLayer::Kernel
                } else {
                    RecordLayer::User
                },
            })
            .inc();
        Ok(s)
    }

    /// Sessions to dial now so the pool is full again, and the bookkeeping for them.
    fn plan(&self) -> usize {
        let Ok(mut st) = self.state.lock() else {
            return 0;
        };
        let max_idle = self.opts.max_idle;
        let all = std::mem::take(&mut st.idle);
        for mut i in all {
            if i.since.elapsed() < max_idle && i.session.is_alive() {
                st.idle.push_back(i);
            } else {
                // Ended in order (close_notify), off the lock and off this task.
                tokio::spawn(i.session.close());
            }
        }
        st.h2.retain(|s| !s.is_closed());
        if st.last_use.is_some_and(|t| t.elapsed() >= COOL_DOWN) {
            // No demand for a while: shared sessions without streams go too (their pings
            // would keep a gateway and a proxy connection busy for nothing).
            st.h2.retain(|s| s.streams() > 0);
        }
        let h2_open = st.h2.len();
        let idle = st.idle.len();
        self.metrics
            .gateway_sessions
            .get_or_create(&crate::telemetry::ProtoLabels {
                proto: PooledProto::H1Idle,
            })
            .set(idle as i64);
        self.metrics
            .gateway_sessions
            .get_or_create(&crate::telemetry::ProtoLabels {
                proto: PooledProto::H2,
            })
            .set(h2_open as i64);
        if st.retry_at.is_some_and(|at| Instant::now() < at)
            || st.last_use.is_none_or(|t| t.elapsed() >= COOL_DOWN)
        {
            return 0;
        }
        let want = if st.speaks_h2 {
            // One session with room for more streams is enough.
            let room = st.h2.iter().any(|s| s.streams() < self.opts.h2_streams);
            usize::from(!room)
        } else {
            st.roll_window();
            st.warm_target(self.opts.warm)
        };
        let n = want.saturating_sub(idle + h2_open.min(want) + st.dialing);
        if n > 0 {
            debug!(
                n,
                idle,
                h2_open,
                dialing = st.dialing,
                speaks_h2 = st.speaks_h2,
                "pre-establishing gateway sessions"
            );
        }
        st.dialing += n;
        n
    }

    fn dialed(&self, r: Result<GatewaySession, TunnelError>) -> Option<GatewaySession> {
        let mut st = self.state.lock().ok()?;
        match r {
            Ok(s) => {
                if st.failures > 0 {
                    info!(
                        failures = st.failures,
                        "gateway reachable again; pre-established sessions resume"
                    );
                }
                st.failures = 0;
                st.retry_at = None;
                st.speaks_h2 = s.h2;
                st.known = true;
                if s.h2 {
                    // Still counted as dialing until its handshake is done.
                    return Some(s);
                }
                st.dialing -= 1;
                st.idle.push_back(Idle {
                    session: s,
                    since: Instant::now(),
                });
                None
            }
            Err(e) => {
                st.dialing -= 1;
                st.failures += 1;
                let backoff = Duration::from_secs(1 << st.failures.min(5).saturating_sub(1));
                st.retry_at = Some(Instant::now() + backoff);
                if st.failures == 1 {
                    warn!(error = %crate::error_chain(&e), hop = e.hop(), kind = e.kind(),
                        "cannot pre-establish a gateway session; tunnels dial on demand, retrying with backoff");
                } else {
                    debug!(error = %crate::error_chain(&e), failures = st.failures, retry_in = ?backoff,
                        "gateway session dial failed again");
                }
                None
            }
        }
    }
}

/// The claim on "the dial others wait for", released however the dial ends (also when the
/// tunnel's task is dropped mid-dial), so waiters are never left waiting for nothing.
struct DialClaim<'a> {
    pool: &'a GatewayPool,
    claimed: bool,
}

impl<'a> DialClaim<'a> {
    fn new(pool: &'a GatewayPool) -> Self {
        Self {
            pool,
            claimed: pool.claim_h2_dial(),
        }
    }
}

impl Drop for DialClaim<'_> {
    fn drop(&mut self) {
        if self.claimed {
            self.pool.end_h2_dial();
        }
    }
}

/// Keeps the pool full: on every use (notify) and once a second (to notice sessions the
/// gateway closed and to retire old ones). Holds only a weak reference, so dropping the
/// pool ends it.
async fn refill(pool: std::sync::Weak<GatewayPool>, stop: CancellationToken) {
    loop {
        let Some(p) = pool.upgrade() else { return };
        let n = p.plan();
        for _ in 0..n {
            let weak = std::sync::Weak::clone(&pool);
            let stop = stop.clone();
            let p = Arc::clone(&p);
            tokio::spawn(async move {
                let r = tokio::select! {
                    () = stop.cancelled() => return,
                    r = p.dial_counted() => r,
                };
                if let Some(h2) = p.dialed(r) {
                    let r = H2Session::handshake(h2, &p.cfg.timeouts).await;
                    p.h2_dialed(r);
                }
                drop(p);
                if let Some(p) = weak.upgrade() {
                    p.wake.notify_one();
                }
            });
        }
        let wake = Arc::clone(&p.wake);
        // No strong reference while waiting: dropping the pool must end this task.
        drop(p);
        tokio::select! {
            () = stop.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{
            Mutex,
            atomic::{AtomicU64, Ordering},
        },
    };

    use http_body_util::Empty;
    use hyper::{Response, StatusCode, body::Bytes, service::service_fn};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::{
        io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
        net::TcpListener,
    };
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::tunnel::tests::{Pki, gateway, read_head, timeouts};

    /// What the stand-in gateway saw: (connection number, CONNECT authority, status).
    type Log = Arc<Mutex<Vec<(u64, String, u16)>>>;

    /// A gateway stand-in speaking HTTP/1.1 or h2 (by ALPN). CONNECT to `denied.*` gets
    /// 403 (an HTTP/1.1 connection stays open, so reuse after a refusal would show); anything
    /// else gets 200 and the stream echoes until the client half-closes. `kick` closes every
    /// connection waiting for a CONNECT at that moment, as a gateway's idle timer would.
    struct StandIn {
        addr: SocketAddr,
        log: Log,
        accepted: Arc<AtomicU64>,
        kick: Arc<Notify>,
    }

    impl StandIn {
        fn log(&self) -> Vec<(u64, String, u16)> {
            self.log.lock().expect("log").clone()
        }
    }

    async fn echo<S: AsyncRead + AsyncWrite>(s: S) {
        let (mut r, mut w) = tokio::io::split(s);
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    }

    fn status_for(authority: &str) -> u16 {
        if authority.starts_with("denied.") {
            403
        } else {
            200
        }
    }

    async fn spawn_gateway(pki: &Pki, alpn: &[&[u8]]) -> StandIn {
        let mut config = (*pki.server(&["gw.test"])).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let s = StandIn {
            addr: listener.local_addr().expect("addr"),
            log: Log::default(),
            accepted: Arc::new(AtomicU64::new(0)),
            kick: Arc::new(Notify::new()),
        };
        let (log, accepted, kick) = (s.log.clone(), s.accepted.clone(), s.kick.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let id = accepted.fetch_add(1, Ordering::SeqCst);
                let (acceptor, log, kick) = (acceptor.clone(), log.clone(), kick.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                        let service = service_fn(move |req: hyper::Request<_>| {
                            let log = log.clone();
                            async move {
                                let authority = req
                                    .uri()
                                    .authority()
                                    .map(|a| a.to_string())
                                    .unwrap_or_default();
                                let status = status_for(&authority);
                                log.lock().expect("log").push((id, authority, status));
                                if status == 200 {
                                    tokio::spawn(async move {
                                        if let Ok(up) = hyper::upgrade::on(req).await {
                                            echo(TokioIo::new(up)).await;
                                        }
                                    });
                                }
                                let mut resp = Response::new(Empty::<Bytes>::new());
                                *resp.status_mut() = StatusCode::from_u16(status).expect("status");
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                        return;
                    }
                    loop {
                        let head = tokio::select! {
                            () = kick.notified() => return,
                            h = read_head(&mut tls) => h,
                        };
                        let Some(authority) = head.split_whitespace().nth(1) else {
                            return;
                        };
                        let status = status_for(authority);
                        log.lock()
                            .expect("log")
                            .push((id, authority.to_owned(), status));
                        let reply = format!("HTTP/1.1 {status} X\r\n\r\n");
                        if tls.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                        if status == 200 {
                            echo(tls).await;
                            return;
                        }
                    }
                });
            }
        });
        s
    }

    fn pool_for(pki: &Pki, gw: &StandIn, alpn: &[&[u8]], warm: usize) -> Arc<GatewayPool> {
        let tls = crate::tls::client_config(Some(&pki.ca_path), None, alpn).expect("tls");
        let cfg = TunnelConfig {
            gateway: Some(gateway(gw.addr, "gw.test", tls)),
            proxy: None,
            timeouts: timeouts(),
        };
        let opts = PoolOptions {
            warm,
            ..PoolOptions::default()
        };
        GatewayPool::start(
            cfg,
            opts,
            Arc::new(Metrics::default()),
            &CancellationToken::new(),
        )
    }

    /// Waits (bounded) until `f` holds; the pool refills in the background.
    async fn until(what: &str, f: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn idle(p: &GatewayPool) -> usize {
        p.state.lock().expect("state").idle.len()
    }

    async fn round_trip(up: &mut Upstream, msg: &[u8]) -> Vec<u8> {
        up.write_all(msg).await.expect("write");
        up.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        up.read_to_end(&mut back).await.expect("read");
        back
    }

    #[test]
    fn warm_target_follows_the_arrival_rate_within_bounds() {
        let mut st = State::default();
        assert_eq!(
            st.warm_target(0),
            0,
            "0 turns the pool off whatever the demand"
        );
        assert_eq!(
            st.warm_target(2),
            2,
            "no demand measured: the configured number"
        );
        st.dial_secs = 0.002;
        st.take_rate = 1000.0;
        assert_eq!(st.warm_target(2), 4, "1000/s x 2 ms x 2");
        st.take_rate = 1e6;
        assert_eq!(st.warm_target(2), MAX_WARM);
        st.take_rate = 10.0;
        assert_eq!(st.warm_target(3), 3);
    }

    #[tokio::test]
    async fn warm_sessions_follow_demand_and_serve_one_tunnel_each() {
        let pki = Pki::new("pool ca");
        let gw = spawn_gateway(&pki, &[b"http/1.1"]).await;
        let pool = pool_for(&pki, &gw, &[b"h2", b"http/1.1"], 2);
        // No demand yet: the refill plan dials nothing ahead.
        assert_eq!(pool.plan(), 0);
        assert_eq!(gw.accepted.load(Ordering::SeqCst), 0);

        let mut up = pool.open("a.test:443").await.expect("first tunnel");
        assert_eq!(up.session.map(|s| s.reuse), Some(Reuse::Fresh));
        assert_eq!(round_trip(&mut up, b"one").await, b"one");
        until("two warm sessions", || idle(&pool) == 2).await;

        let mut up = pool.open("b.test:443").await.expect("warm tunnel");
        assert_eq!(
            up.session.map(|s| (s.reuse, s.proto.as_str())),
            Some((Reuse::Warm, "h1"))
        );
        assert_eq!(round_trip(&mut up, b"two").await, b"two");
        until("refilled", || idle(&pool) == 2).await;
        let log = gw.log();
        assert_eq!(log.len(), 2, "{log:?}");
        assert_ne!(
            log[0].0, log[1].0,
            "one tunnel per HTTP/1.1 session: {log:?}"
        );
    }

    #[tokio::test]
    async fn a_session_is_never_reused_after_a_refusal() {
        let pki = Pki::new("pool ca");
        let gw = spawn_gateway(&pki, &[b"http/1.1"]).await;
        let pool = pool_for(&pki, &gw, &[b"http/1.1"], 2);
        drop(pool.open("a.test:443").await.expect("first"));
        until("warm", || idle(&pool) == 2).await;
        let e = pool.open("denied.test:443").await.unwrap_err();
        assert_eq!((e.hop(), e.status()), ("gateway", Some(403)), "{e}");
        for name in ["b.test:443", "c.test:443", "d.test:443"] {
            until("warm", || idle(&pool) >= 1).await;
            let mut up = pool.open(name).await.expect("tunnel");
            assert_eq!(round_trip(&mut up, b"x").await, b"x");
        }
        let log = gw.log();
        let refused_on = log.iter().find(|l| l.2 == 403).expect("403 logged").0;
        let on_that = log.iter().filter(|l| l.0 == refused_on).count();
        assert_eq!(
            on_that, 1,
            "a refused session carried another CONNECT: {log:?}"
        );
    }

    #[tokio::test]
    async fn sessions_the_gateway_closes_are_replaced() {
        let pki = Pki::new("pool ca");
        let gw = spawn_gateway(&pki, &[b"http/1.1"]).await;
        let pool = pool_for(&pki, &gw, &[b"http/1.1"], 2);
        drop(pool.open("a.test:443").await.expect("first"));
        until("warm", || idle(&pool) == 2).await;
        let before = gw.accepted.load(Ordering::SeqCst);
        gw.kick.notify_waiters();
        // The refill task notices the closed sessions (non-blocking read: EOF) and redials.
        until("replacements", || {
            gw.accepted.load(Ordering::SeqCst) >= before + 2 && idle(&pool) == 2
        })
        .await;
        let mut up = pool.open("b.test:443").await.expect("tunnel");
        assert_eq!(round_trip(&mut up, b"after").await, b"after");
    }

    #[tokio::test]
    async fn a_burst_on_a_cold_pool_shares_one_h2_session() {
        let pki = Pki::new("pool ca");
        let gw = spawn_gateway(&pki, &[b"h2", b"http/1.1"]).await;
        let pool = pool_for(&pki, &gw, &[b"h2", b"http/1.1"], 2);
        let opens = (0..20).map(|i| {
            let pool = Arc::clone(&pool);
            async move { pool.open(&format!("b{i}.test:443")).await }
        });
        let ups = futures::future::join_all(opens).await;
        for up in ups {
            let mut up = up.expect("tunnel");
            assert_eq!(round_trip(&mut up, b"burst").await, b"burst");
        }
        let log = gw.log();
        let conns: std::collections::HashSet<u64> = log.iter().map(|l| l.0).collect();
        assert_eq!((log.len(), conns.len()), (20, 1), "{log:?}");
    }

    #[tokio::test]
    async fn without_demand_an_unused_h2_session_is_let_go() {
        let pki = Pki::new("pool ca");
        let gw = spawn_gateway(&pki, &[b"h2", b"http/1.1"]).await;
        let pool = pool_for(&pki, &gw, &[b"h2", b"http/1.1"], 2);
        let mut up = pool.open("a.test:443").await.expect("tunnel");
        assert_eq!(round_trip(&mut up, b"a").await, b"a");
        let h2_sessions = |p: &GatewayPool| p.state.lock().expect("state").h2.len();
        pool.plan();
        assert_eq!(h2_sessions(&pool), 1, "kept while there is demand");
        // Five minutes later, with the stream still open: kept.
        let long_ago = Instant::now().checked_sub(COOL_DOWN).expect("clock");
        pool.state.lock().expect("state").last_use = Some(long_ago);
        pool.plan();
        assert_eq!(h2_sessions(&pool), 1, "a session with a stream stays");
        drop(up);
        pool.plan();
        assert_eq!(h2_sessions(&pool), 0, "no demand, no streams: let go");
    }

    #[tokio::test]
    async fn h2_gateway_multiplexes_tunnels_and_survives_a_refused_stream() {
        let pki = Pki::new("pool ca");
        let gw = spawn_gateway(&pki, &[b"h2", b"http/1.1"]).await;
        let pool = pool_for(&pki, &gw, &[b"h2", b"http/1.1"], 2);
        let mut first = pool.open("a.test:443").await.expect("first");
        assert_eq!(first.session.map(|s| s.proto.as_str()), Some("h2"));
        // Several tunnels open at once share the session; each half-closes independently.
        let mut more = Vec::new();
        for i in 0..5 {
            more.push(pool.open(&format!("t{i}.test:443")).await.expect("stream"));
        }
        let e = pool.open("denied.test:443").await.unwrap_err();
        assert_eq!((e.hop(), e.status()), ("gateway", Some(403)), "{e}");
        for (i, up) in more.iter_mut().enumerate() {
            assert_eq!(up.session.map(|s| s.reuse), Some(Reuse::Shared));
            let msg = format!("stream {i}");
            assert_eq!(round_trip(up, msg.as_bytes()).await, msg.as_bytes());
        }
        assert_eq!(round_trip(&mut first, b"first").await, b"first");
        let mut after = pool
            .open("z.test:443")
            .await
            .expect("after a refused stream");
        assert_eq!(round_trip(&mut after, b"z").await, b"z");
        let log = gw.log();
        let conns: std::collections::HashSet<u64> = log.iter().map(|l| l.0).collect();
        assert_eq!(conns.len(), 1, "every stream on one session: {log:?}");
        assert_eq!(log.len(), 8, "{log:?}");
    }
}
