//! The byte streams tunnels are made of: the finished `Upstream` and the replay of bytes
//! read past a CONNECT response head.
use std::{
    fmt, io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{HopStatus, SessionInfo};

/// Any byte stream a tunnel layer can sit on. `Any`, so that the relay can find what an
/// upstream is: a kTLS session (spliced) or an HTTP/2 stream (its frames handed through).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + std::any::Any {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

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

impl Upstream {
    /// The gateway session in kTLS when the tunnel runs right on it (an HTTP/1.1 CONNECT
    /// on a session whose records the kernel protects): the relay can splice its plaintext.
    pub(crate) fn kernel_tls(&mut self) -> Option<&mut super::ktls::KernelTls> {
        (&mut *self.io as &mut dyn std::any::Any).downcast_mut()
    }

    /// The HTTP/2 stream when the tunnel is one: the relay hands its DATA frames through.
    pub(crate) fn h2_stream(&mut self) -> Option<&mut super::h2::H2Stream> {
        (&mut *self.io as &mut dyn std::any::Any).downcast_mut()
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

/// The stream under the gateway TLS session. A plain TCP connection stays visible as one,
/// so the session's records can move into the kernel (`ktls.rs`).
pub(crate) enum Transport {
    Tcp(tokio::net::TcpStream),
    Other(Box<dyn Io>),
}

impl Transport {
    /// A stream after a CONNECT answer: `leftover` are bytes read past the answer's head.
    pub(crate) fn after_connect(tcp: tokio::net::TcpStream, leftover: Vec<u8>) -> Transport {
        if leftover.is_empty() {
            Transport::Tcp(tcp)
        } else {
            Transport::Other(Box::new(Replay::new(leftover, tcp)))
        }
    }

    pub(crate) fn boxed(self) -> Box<dyn Io> {
        match self {
            Transport::Tcp(t) => Box::new(t),
            Transport::Other(o) => o,
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(t) => Pin::new(t).poll_read(cx, buf),
            Transport::Other(o) => Pin::new(o).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(t) => Pin::new(t).poll_write(cx, buf),
            Transport::Other(o) => Pin::new(o).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            Transport::Other(o) => Pin::new(o).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Tcp(t) => t.is_write_vectored(),
            Transport::Other(o) => o.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(t) => Pin::new(t).poll_flush(cx),
            Transport::Other(o) => Pin::new(o).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(t) => Pin::new(t).poll_shutdown(cx),
            Transport::Other(o) => Pin::new(o).poll_shutdown(cx),
        }
    }
}
