//! The byte streams tunnels are made of: the finished `Upstream`, the gateway TLS session's
//! half-close through a proxy, and the replay of bytes read past a CONNECT response head.
use std::{
    fmt, io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{HopStatus, SessionInfo};

/// Any byte stream a tunnel layer can sit on.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open tunnel: write the client's bytes, read the target's.
pub struct Upstream {
    pub(super) io: Box<dyn Io>,
    /// The CONNECT status of each hop, in order (empty for `direct`).
    pub hops: Vec<HopStatus>,
    /// How long each hop took to set up (TCP, TLS, CONNECT), in order; `target` for direct.
    pub setup: Vec<(&'static str, std::time::Duration)>,
    /// The gateway session it runs on (`gateway` route only).
    pub session: Option<SessionInfo>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("hops", &self.hops)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upstream {
    forward_async_write!(io);
}

/// The gateway TLS session when it runs through an enterprise-proxy tunnel: shutting down
/// the write side sends TLS close_notify but leaves the TCP connection open.
///
/// Why: proxies such as Squid tear down the whole CONNECT tunnel on the first FIN (they do
/// not keep TCP half-closed tunnels), which would cut off the rest of the target's answer
/// after the pod half-closes. close_notify carries the half-close through the proxy to the
/// gateway instead; the TCP connection ends when the gateway closes its side.
pub(crate) struct TlsHalfClose<S> {
    pub(crate) inner: tokio_rustls::client::TlsStream<S>,
    pub(crate) close_notify_sent: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsHalfClose<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsHalfClose<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.close_notify_sent {
            self.inner.get_mut().1.send_close_notify();
            self.close_notify_sent = true;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
}

/// A stream whose first reads return bytes already read past a CONNECT response head.
pub(crate) struct Replay<S> {
    pending: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Replay<S> {
    pub(crate) fn new(pending: Vec<u8>, inner: S) -> Self {
        Self {
            pending,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.pending.len() {
            let n = buf.remaining().min(this.pending.len() - this.pos);
            buf.put_slice(&this.pending[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.pending.len() {
                this.pending = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    forward_async_write!(inner);
}
