//! The gateway hop: a TLS session with the gateway (through the enterprise proxy when there
//! is one), made ahead of demand by the pool or for one tunnel, and the CONNECT inside it.
use std::{
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use serde::Serialize;
use tokio::io::ReadBuf;

use crate::telemetry::Proto;

use super::{
    HOP_GATEWAY, HOP_PROXY, HopStatus, Io, Timeouts, Transport, TunnelConfig, TunnelError,
    Upstream, add_setup, connect::ConnectRequest, connect_hop, gateway_of, ktls, record,
    request_error, server_name, tcp_connect, through_proxy,
};
use tracing::debug;

pub use crate::telemetry::Reuse;

/// The gateway session behind one tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SessionInfo {
    pub reuse: Reuse,
    /// `h1` (one CONNECT per TLS session) or `h2` (CONNECT streams multiplexed).
    pub proto: Proto,
    /// The gateway TLS handshake was a resumption (no certificate exchange).
    pub resumed: bool,
    /// The kernel seals and opens the session's records (kTLS).
    pub kernel_tls: bool,
}

/// A TLS session with the gateway (through the enterprise proxy when one is configured),
/// ready for CONNECT requests.
pub struct GatewaySession {
    pub(super) io: Box<dyn Io>,
    /// The gateway chose ALPN `h2`: CONNECT requests are streams on this session.
    pub h2: bool,
    /// The windows to grant the gateway if this session speaks HTTP/2.
    pub h2_windows: super::H2Windows,
    /// The TLS handshake resumed an earlier session.
    pub resumed: bool,
    /// The session's records are sealed and opened by the kernel (kTLS).
    pub kernel_tls: bool,
    /// The enterprise proxy's CONNECT status, when there is one.
    pub hops: Vec<HopStatus>,
    /// Set-up time of the proxy hop and of the gateway TLS handshake.
    pub setup: Vec<(&'static str, Duration)>,
}

impl GatewaySession {
    /// Ends an unused session in order: TLS close_notify, flushed within
    /// [`crate::relay::SHUTDOWN_GRACE`], then the connection is dropped.
    pub async fn close(mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = tokio::time::timeout(crate::relay::SHUTDOWN_GRACE, self.io.shutdown()).await;
    }
}

impl fmt::Debug for GatewaySession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewaySession")
            .field("h2", &self.h2)
            .field("resumed", &self.resumed)
            .field("hops", &self.hops)
            .finish_non_exhaustive()
    }
}

/// TCP (and the enterprise proxy's CONNECT) to the gateway, then TLS with it. No inner
/// CONNECT yet: the session can be made ahead of demand.
pub async fn dial_gateway(cfg: &TunnelConfig) -> Result<GatewaySession, TunnelError> {
    let gw = gateway_of(cfg)?;
    let t = &cfg.timeouts;
    let server_name = server_name(HOP_GATEWAY, &gw.server_name)?;
    let mut hops = Vec::with_capacity(2);
    let mut setup = Vec::with_capacity(2);
    let io = match &cfg.proxy {
        Some(proxy) => {
            let request = ConnectRequest::to_proxy(&gw.authority(), proxy)
                .map_err(|e| request_error(HOP_PROXY, e))?;
            through_proxy(proxy, &request, t, &mut hops, &mut setup).await?
        }
        None => {
            let addr = gw.authority();
            Transport::Tcp(
                tcp_connect(HOP_GATEWAY, (gw.addr_host.as_str(), gw.port), addr, t).await?,
            )
        }
    };
    let started = std::time::Instant::now();
    // Through a proxy, shutting down the write side must not send a FIN: proxies such as
    // Squid tear the whole CONNECT tunnel down on the first FIN (they do not keep TCP
    // half-closed tunnels), which would cut off the rest of the target's answer after the
    // pod half-closes. close_notify carries the half-close to the gateway instead; the TCP
    // connection ends when the gateway closes its side.
    let fin_on_shutdown = cfg.proxy.is_none();
    let handshake = record::handshake(Arc::clone(&gw.tls), server_name, io);
    let hs = match tokio::time::timeout(t.tls_handshake, handshake).await {
        Err(_elapsed) => return Err(TunnelError::TlsTimeout { hop: HOP_GATEWAY }),
        Ok(Err(source)) => {
            return Err(TunnelError::Tls {
                hop: HOP_GATEWAY,
                source,
            });
        }
        Ok(Ok(done)) => done,
    };
    let negotiated = hs.negotiated.clone();
    let tls_error = |source| TunnelError::Tls {
        hop: HOP_GATEWAY,
        source,
    };
    // The records go to the kernel when it can take them, else to `record.rs`.
    let (io, kernel_tls): (Box<dyn Io>, bool) = match hs.replace_io(()) {
        (Transport::Tcp(tcp), hs) if gw.kernel_tls => {
            match ktls::enable(hs.replace_io(tcp).1, fin_on_shutdown).map_err(tls_error)? {
                ktls::Outcome::Kernel(k) => (k, true),
                ktls::Outcome::UserSpace(hs, why) => {
                    debug!(why, "gateway tls records stay in user space");
                    (
                        Box::new(hs.records(fin_on_shutdown).map_err(tls_error)?),
                        false,
                    )
                }
            }
        }
        (io, hs) => (
            Box::new(
                hs.replace_io(io)
                    .1
                    .records(fin_on_shutdown)
                    .map_err(tls_error)?,
            ),
            false,
        ),
    };
    let h2 = match negotiated.alpn.as_deref() {
        None | Some(b"http/1.1") => false,
        // Only offered when the configuration allows it (`gateway-http2`).
        Some(b"h2") if gw.tls.alpn_protocols.iter().any(|p| p == b"h2") => true,
        // A protocol we did not offer: the gateway must not get bytes it would misread.
        Some(_) => {
            return Err(TunnelError::Request {
                hop: HOP_GATEWAY,
                detail: "the gateway chose an ALPN protocol that was not offered",
            });
        }
    };
    let resumed = negotiated.resumed;
    setup.push((HOP_GATEWAY, started.elapsed()));
    Ok(GatewaySession {
        io,
        h2,
        h2_windows: gw.h2_windows,
        resumed,
        kernel_tls,
        hops,
        setup,
    })
}

impl GatewaySession {
    /// A session over an established stream (for the fuzz targets: no TCP, no TLS).
    pub(crate) fn over(io: Box<dyn Io>, h2: bool, h2_windows: super::H2Windows) -> Self {
        Self {
            io,
            h2,
            h2_windows,
            resumed: false,
            kernel_tls: false,
            hops: Vec::new(),
            setup: Vec::new(),
        }
    }

    /// One tunnel on this session, which is used up either way (a session is never reused
    /// after a refusal). HTTP/2 sessions get a private connection that ends with the stream.
    pub async fn open_once(
        self,
        request: &ConnectRequest,
        t: &Timeouts,
    ) -> Result<Upstream, TunnelError> {
        if self.h2 {
            let shared = super::H2Session::handshake(self, t).await?;
            shared.connect(request, t).await
        } else {
            self.connect_h1(Reuse::Fresh, request, t).await
        }
    }

    /// The HTTP/1.1 inner CONNECT; consumes the session. `reuse` says how the session came
    /// about, for the audit line.
    pub async fn connect_h1(
        self,
        reuse: Reuse,
        request: &ConnectRequest,
        t: &Timeouts,
    ) -> Result<Upstream, TunnelError> {
        let started = std::time::Instant::now();
        let GatewaySession {
            io,
            resumed,
            kernel_tls,
            mut hops,
            mut setup,
            ..
        } = self;
        let (io, status) = connect_hop(HOP_GATEWAY, io, request, t).await?;
        hops.push(HopStatus {
            hop: HOP_GATEWAY,
            status,
        });
        add_setup(&mut setup, HOP_GATEWAY, started.elapsed());
        Ok(Upstream {
            io,
            hops,
            setup,
            session: Some(SessionInfo {
                reuse,
                proto: Proto::H1,
                resumed,
                kernel_tls,
            }),
        })
    }

    /// Still usable: the gateway has not closed it and sent nothing unasked. Never blocks.
    pub fn is_alive(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        // Pending = nothing to read: idle and open. Reading also processes TLS session
        // tickets, which is what lets the next handshake resume.
        matches!(
            Pin::new(&mut *self.io).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }
}
