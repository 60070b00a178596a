//! HTTP/2 CONNECT to the gateway (RFC 9113 §8.5): one TLS session, one stream per tunnel.
//!
//! The gateway picks `h2` by ALPN; then every tunnel is a `CONNECT host:port` stream on a
//! session shared with other tunnels, so a new connection costs one round trip and no
//! handshake, and idle tunnels cost a stream instead of a TLS session each. The rules of
//! the HTTP/1.1 path hold per stream: no client byte before a 2xx, a refusal names the hop
//! and status, bounded waits. A refused stream does not taint the session (its refusal is
//! the stream's); a session-level failure (GOAWAY, broken connection) closes the session,
//! which is then never used again.
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::telemetry::Proto;
use tokio::time::timeout;
use tracing::debug;

use super::{
    GatewaySession, HOP_GATEWAY, HopStatus, Reuse, SessionInfo, Timeouts, TunnelError, Upstream,
    add_setup, connect::ConnectRequest,
};

/// The largest DATA frame the gateway may send us: bulk streams cost fewer frames (and
/// fewer wake-ups of the relay); TLS still cuts records at 16 KiB.
const MAX_FRAME: u32 = 64 << 10;

/// A gateway session speaking HTTP/2; cheap to share (`SendRequest` is a handle).
pub struct H2Session {
    send: SendRequest<Empty<Bytes>>,
    /// Streams open now (tunnels not yet dropped).
    streams: Arc<AtomicUsize>,
    /// The enterprise proxy's CONNECT status of the underlying session.
    hops: Vec<HopStatus>,
    resumed: bool,
    /// Becomes true when the connection task has ended (the TLS session closed).
    ended: tokio::sync::watch::Receiver<bool>,
}

impl std::fmt::Debug for H2Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Session")
            .field("streams", &self.streams())
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl H2Session {
    /// The HTTP/2 connection preface and settings on a session whose ALPN is `h2`. The
    /// connection is driven by its own task until the gateway or the last handle ends it;
    /// pings keep it (and the enterprise proxy's tunnel under it) alive while idle.
    pub async fn handshake(session: GatewaySession, t: &Timeouts) -> Result<Self, TunnelError> {
        let GatewaySession {
            io,
            hops,
            resumed,
            h2_windows,
            ..
        } = session;
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(h2_windows.stream)
            .initial_connection_window_size(h2_windows.session)
            .max_frame_size(MAX_FRAME)
            .max_send_buf_size(h2_windows.send_buf as usize)
            .keep_alive_interval(t.keepalive_interval)
            .keep_alive_timeout(t.keepalive_interval)
            .keep_alive_while_idle(true);
        let (send, conn) = timeout(t.tls_handshake, builder.handshake(TokioIo::new(io)))
            .await
            .map_err(|_| TunnelError::TlsTimeout { hop: HOP_GATEWAY })?
            .map_err(|e| TunnelError::Io {
                hop: HOP_GATEWAY,
                source: io::Error::other(e),
            })?;
        let (ended_tx, ended) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "gateway http/2 session ended with an error");
            } else {
                debug!("gateway http/2 session ended");
            }
            let _ = ended_tx.send(true);
        });
        Ok(Self {
            send,
            streams: Arc::new(AtomicUsize::new(0)),
            hops,
            resumed,
            ended,
        })
    }

    /// Lets the session go and waits (bounded) until its connection has closed: once the
    /// last handle is gone, HTTP/2 says GOAWAY and the TLS session ends with close_notify.
    pub async fn close(self) {
        let mut ended = self.ended.clone();
        drop(self);
        let _ =
            tokio::time::timeout(crate::relay::SHUTDOWN_GRACE, ended.wait_for(|done| *done)).await;
    }

    /// The gateway or the network ended the session: it takes no more streams.
    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
    }

    /// Tunnels open on this session now.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// `CONNECT target_authority` as a new stream. Returns after the gateway answered 2xx.
    pub async fn connect(
        &self,
        request: &ConnectRequest,
        t: &Timeouts,
    ) -> Result<Upstream, TunnelError> {
        let started = std::time::Instant::now();
        let request = request
            .to_h2()
            .map_err(|e| super::request_error(HOP_GATEWAY, e))?;
        // Counted from before the request so concurrent opens see the stream.
        let guard = StreamGuard::new(&self.streams);
        let mut send = self.send.clone();
        let exchange = async {
            send.ready().await?;
            let response = send.send_request(request).await?;
            let status = response.status();
            if !status.is_success() {
                return Ok(Err(status));
            }
            let upgraded = hyper::upgrade::on(response).await?;
            Ok(Ok((status, upgraded)))
        };
        let result: Result<_, hyper::Error> = timeout(t.connect_response, exchange)
            .await
            .map_err(|_| TunnelError::ResponseTimeout { hop: HOP_GATEWAY })?;
        let (status, upgraded) = match result {
            Ok(Ok(ok)) => ok,
            Ok(Err(status)) => {
                return Err(TunnelError::Refused {
                    hop: HOP_GATEWAY,
                    status: status.as_u16(),
                    reason: status.canonical_reason().unwrap_or("").to_owned(),
                });
            }
            Err(e) if self.is_closed() || e.is_closed() || e.is_canceled() => {
                return Err(TunnelError::Closed { hop: HOP_GATEWAY });
            }
            Err(e) => {
                return Err(TunnelError::Io {
                    hop: HOP_GATEWAY,
                    source: io::Error::other(e),
                });
            }
        };
        let mut hops = self.hops.clone();
        hops.push(HopStatus {
            hop: HOP_GATEWAY,
            status: status.as_u16(),
        });
        let mut setup = Vec::with_capacity(1);
        add_setup(&mut setup, HOP_GATEWAY, started.elapsed());
        Ok(Upstream {
            io: Box::new(H2Stream {
                io: TokioIo::new(upgraded),
                _guard: guard,
            }),
            hops,
            setup,
            session: Some(SessionInfo {
                reuse: Reuse::Shared,
                proto: Proto::H2,
                resumed: self.resumed,
            }),
        })
    }
}

/// Decrements the session's stream count when the tunnel is dropped.
struct StreamGuard(Arc<AtomicUsize>);

impl StreamGuard {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One CONNECT stream as a byte stream. Shutting down the write side sends END_STREAM
/// (the HTTP/2 half-close); reading returns EOF when the gateway ends its side.
struct H2Stream {
    io: TokioIo<hyper::upgrade::Upgraded>,
    _guard: StreamGuard,
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for H2Stream {
    forward_async_write!(io);
}
