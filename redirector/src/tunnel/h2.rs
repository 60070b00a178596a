//! HTTP/2 CONNECT to the gateway (RFC 9113 §8.5): one TLS session, one stream per tunnel.
//!
//! The gateway picks `h2` by ALPN; then every tunnel is a `CONNECT host:port` stream on a
//! session shared with other tunnels, so a new connection costs one round trip and no
//! handshake, and idle tunnels cost a stream instead of a TLS session each. The rules of
//! the HTTP/1.1 path hold per stream: no client byte before a 2xx, a refusal names the hop
//! and status, bounded waits. A refused stream does not taint the session (its refusal is
//! the stream's); a session-level failure (GOAWAY, broken connection) closes the session,
//! which is then never used again.
//!
//! The streams use the `h2` crate directly rather than through hyper's upgrade: hyper hands
//! each write of an upgraded stream to a second task over a channel, boxed (a copy, an
//! allocation and a task wake-up per write), and wraps reads in two more adapters. Here a
//! write is copied once into a `Bytes` that goes straight into the stream's send queue (the
//! connection task sends it), and a read copies out of the DATA frame's `Bytes` as h2
//! parsed it.
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use std::{collections::VecDeque, future::poll_fn, io::IoSlice, time::Duration};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::FutureExt as _;
use h2::{
    Reason, RecvStream, SendStream,
    client::{Builder, SendRequest},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use crate::relay::{
    Activity, BUFFERS, Borrowed, DirEnd, Ends, INITIAL_BUF, MAX_BUF, Relayed, shutdown,
};

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
/// The most one write queues on a stream at once (h2 cuts it into frames of the gateway's
/// frame size).
const MAX_WRITE: usize = 64 << 10;

/// A gateway session speaking HTTP/2; cheap to share (`SendRequest` is a handle).
pub struct H2Session {
    send: SendRequest<Bytes>,
    /// Streams open now (tunnels not yet dropped).
    streams: Arc<AtomicUsize>,
    /// The enterprise proxy's CONNECT status of the underlying session.
    hops: Vec<HopStatus>,
    resumed: bool,
    kernel_tls: bool,
    /// Becomes true when the connection task has ended (the TLS session closed).
    ended: tokio::sync::watch::Receiver<bool>,
    /// The gateway said GOAWAY (or the connection broke): no new stream goes on this session,
    /// though its open streams may run on.
    refusing: std::sync::atomic::AtomicBool,
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
    /// a ping every keepalive interval keeps it (and the enterprise proxy's tunnel under it)
    /// alive while idle, and a ping unanswered for as long ends it.
    pub async fn handshake(session: GatewaySession, t: &Timeouts) -> Result<Self, TunnelError> {
        let GatewaySession {
            io,
            hops,
            resumed,
            kernel_tls,
            h2_windows,
            ..
        } = session;
        let mut builder = Builder::new();
        builder
            .initial_window_size(h2_windows.stream)
            .initial_connection_window_size(h2_windows.session)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(h2_windows.send_buf as usize)
            // We never accept pushed streams.
            .enable_push(false);
        let (send, mut conn) = timeout(t.tls_handshake, builder.handshake::<_, Bytes>(io))
            .await
            .map_err(|_| TunnelError::TlsTimeout { hop: HOP_GATEWAY })?
            .map_err(|e| TunnelError::Io {
                hop: HOP_GATEWAY,
                source: h2_io_error(e),
            })?;
        let mut pings = conn
            .ping_pong()
            .expect("the first call takes the ping handle");
        let interval = t.keepalive_interval;
        let (ended_tx, ended) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let keepalive = async move {
                loop {
                    tokio::time::sleep(interval).await;
                    match timeout(interval, pings.ping(h2::Ping::opaque())).await {
                        Ok(Ok(_pong)) => {}
                        Ok(Err(e)) => return format!("ping failed: {e}"),
                        Err(_) => return "a ping went unanswered".to_owned(),
                    }
                }
            };
            tokio::select! {
                r = &mut conn => match r {
                    Err(e) => debug!(error = %e, "gateway http/2 session ended with an error"),
                    Ok(()) => debug!("gateway http/2 session ended"),
                },
                why = keepalive => debug!(why, "gateway http/2 session dropped"),
            }
            let _ = ended_tx.send(true);
        });
        Ok(Self {
            send,
            streams: Arc::new(AtomicUsize::new(0)),
            hops,
            resumed,
            kernel_tls,
            ended,
            refusing: std::sync::atomic::AtomicBool::new(false),
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

    /// The gateway or the network ended the session, or the gateway said GOAWAY: it takes
    /// no more streams.
    pub fn is_closed(&self) -> bool {
        *self.ended.borrow() || self.refusing.load(Ordering::Relaxed)
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
        let send = self.send.clone();
        let exchange = async {
            let mut send = send.ready().await?;
            // Not the end of the stream: the tunnel's bytes follow the 2xx.
            let (response, stream) = send.send_request(request, false)?;
            let response = response.await?;
            Ok::<_, h2::Error>((response.status(), stream, response.into_body()))
        };
        let result = timeout(t.connect_response, exchange)
            .await
            .map_err(|_| TunnelError::ResponseTimeout { hop: HOP_GATEWAY })?;
        let (status, mut send, recv) = match result {
            Ok(ok) => ok,
            Err(e) if self.is_closed() || e.is_go_away() || e.is_io() => {
                self.refusing.store(true, Ordering::Relaxed);
                return Err(TunnelError::Closed { hop: HOP_GATEWAY });
            }
            Err(e) => {
                return Err(TunnelError::Io {
                    hop: HOP_GATEWAY,
                    source: h2_io_error(e),
                });
            }
        };
        if !status.is_success() {
            // The stream is over; the session is not.
            send.send_reset(Reason::CANCEL);
            return Err(TunnelError::Refused {
                hop: HOP_GATEWAY,
                status: status.as_u16(),
                reason: status.canonical_reason().unwrap_or("").to_owned(),
            });
        }
        let mut hops = self.hops.clone();
        hops.push(HopStatus {
            hop: HOP_GATEWAY,
            status: status.as_u16(),
        });
        let mut setup = Vec::with_capacity(1);
        add_setup(&mut setup, HOP_GATEWAY, started.elapsed());
        Ok(Upstream {
            io: Box::new(H2Stream {
                send,
                recv,
                received: Bytes::new(),
                ended: false,
                _guard: guard,
            }),
            hops,
            setup,
            session: Some(SessionInfo {
                reuse: Reuse::Shared,
                proto: Proto::H2,
                resumed: self.resumed,
                kernel_tls: self.kernel_tls,
            }),
        })
    }
}

/// An h2 error as an I/O error, keeping an I/O cause as it was.
fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().expect("is_io")
    } else {
        io::Error::other(e)
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
pub(crate) struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What is left of the last DATA frame.
    received: Bytes,
    /// END_STREAM was sent.
    ended: bool,
    _guard: StreamGuard,
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.received.is_empty() {
            match data_or_end(ready!(this.recv.poll_data(cx)))? {
                None => return Poll::Ready(Ok(())),
                Some(data) => this.received = data,
            }
        }
        let n = this.received.len().min(buf.remaining());
        buf.put_slice(&this.received[..n]);
        this.received.advance(n);
        // The window opens again as the pod takes the bytes: what it does not read stays
        // bounded by the window.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

/// A DATA frame, or `None` at the end of the stream.
fn data_or_end(polled: Option<Result<Bytes, h2::Error>>) -> io::Result<Option<Bytes>> {
    match polled {
        None => Ok(None),
        Some(Ok(data)) => Ok(Some(data)),
        // The gateway ended the stream with a reset that means "done".
        Some(Err(e)) if matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) => Ok(None),
        Some(Err(e)) if e.reason() == Some(Reason::STREAM_CLOSED) => {
            Err(io::Error::new(io::ErrorKind::BrokenPipe, e))
        }
        Some(Err(e)) => Err(h2_io_error(e)),
    }
}

/// Waits until the stream may queue bytes: the gateway's window, bounded by the send
/// buffer. Waiting for it is the back-pressure.
fn poll_send_capacity(
    send: &mut SendStream<Bytes>,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    loop {
        let cap = send.capacity();
        if cap > 0 {
            return Poll::Ready(Ok(cap));
        }
        send.reserve_capacity(want);
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
            None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }
}

impl H2Stream {
    /// Relays the pod's connection over this stream without a relay buffer: the pod's bytes
    /// are read into a `Bytes` that goes to h2 as it is, and each DATA frame's `Bytes` is
    /// written to the pod as it is (ready frames together, one vectored write). The copying
    /// relay would copy each way once more. Counts, idle timeout, half-close (END_STREAM)
    /// and the orderly end are the copying relay's.
    pub(crate) async fn relay(&mut self, pod: &mut TcpStream, idle: Duration) -> Relayed {
        let (mut pr, mut pw) = pod.split();
        let activity = Activity::new();
        let (mut tx, mut rx) = (0u64, 0u64);
        let ends = {
            let H2Stream {
                send,
                recv,
                received,
                ended,
                ..
            } = &mut *self;
            let up = upload(&mut pr, send, ended, &mut tx, &activity);
            let down = download(recv, received, &mut pw, &mut rx, &activity);
            Ends::of(up, down, &activity, idle).await
        };
        ends.finish(self, tx, rx, idle).await
    }
}

/// Pod → stream until the pod's EOF, then END_STREAM.
async fn upload(
    pod: &mut ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    ended: &mut bool,
    count: &mut u64,
    activity: &Activity,
) -> DirEnd {
    let mut borrowed = Borrowed::new(Some(&BUFFERS));
    let mut size = INITIAL_BUF;
    let mut buf = BytesMut::new();
    let moved: io::Result<()> = async {
        loop {
            // Room for `size` bytes: the last buffer's memory again once h2 has sent it.
            buf.reserve(size);
            let n = pod.read_buf(&mut (&mut buf).limit(size)).await?;
            if n == 0 {
                *ended = true;
                return send.send_data(Bytes::new(), true).map_err(h2_io_error);
            }
            activity.touch();
            if n == size {
                size = borrowed.grow(size);
            }
            let mut data = buf.split().freeze();
            while !data.is_empty() {
                let want = data.len();
                let cap = poll_fn(|cx| poll_send_capacity(send, want, cx)).await?;
                let chunk = data.split_to(cap.min(want));
                let len = chunk.len();
                send.send_data(chunk, false).map_err(h2_io_error)?;
                *count += len as u64;
            }
        }
    }
    .await;
    match moved {
        Ok(()) => DirEnd::Eof,
        Err(e) => DirEnd::Error(e),
    }
}

/// Stream → pod until the stream's end, then the pod's write side is shut down.
async fn download(
    recv: &mut RecvStream,
    received: &mut Bytes,
    pod: &mut WriteHalf<'_>,
    count: &mut u64,
    activity: &Activity,
) -> DirEnd {
    let mut frames: VecDeque<Bytes> = VecDeque::new();
    let moved: io::Result<()> = async {
        loop {
            // An empty DATA frame (END_STREAM's) carries nothing to write.
            while received.is_empty() {
                match data_or_end(poll_fn(|cx| recv.poll_data(cx)).await)? {
                    None => return Ok(()),
                    Some(data) => *received = data,
                }
            }
            activity.touch();
            let mut total = received.len();
            frames.push_back(std::mem::take(received));
            // Frames that are already here go out in the same write; what ends the batch
            // early is handled after its bytes are written, in order.
            let mut end = None;
            while total < MAX_BUF {
                match poll_fn(|cx| recv.poll_data(cx)).now_or_never() {
                    None => break,
                    Some(polled) => match data_or_end(polled) {
                        Ok(Some(data)) if data.is_empty() => {}
                        Ok(Some(data)) => {
                            total += data.len();
                            frames.push_back(data);
                        }
                        other => {
                            end = Some(other);
                            break;
                        }
                    },
                }
            }
            while !frames.is_empty() {
                let slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
                let mut n = pod.write_vectored(&slices).await?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                // A writer never reports more than it was given; if one did, stop here.
                while let Some(front) = frames.front_mut()
                    && n > 0
                {
                    let m = n.min(front.len());
                    front.advance(m);
                    n -= m;
                    if front.is_empty() {
                        frames.pop_front();
                    }
                }
            }
            *count += total as u64;
            // The window opens again as the pod takes the bytes.
            let _ = recv.flow_control().release_capacity(total);
            match end {
                None => {}
                Some(Ok(_)) => return Ok(()),
                Some(Err(e)) => return Err(e),
            }
        }
    }
    .await;
    match moved {
        Ok(()) => shutdown(pod).await,
        Err(e) => DirEnd::Error(e),
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.ended {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let want = buf.len().min(MAX_WRITE);
        let n = ready!(poll_send_capacity(&mut this.send, want, cx))?.min(want);
        // The one copy of a write: h2 keeps the bytes until the window lets them go.
        let data = Bytes::copy_from_slice(&buf[..n]);
        Poll::Ready(
            this.send
                .send_data(data, false)
                .map(|()| n)
                .map_err(h2_io_error),
        )
    }

    /// The connection task sends what is queued; there is nothing to push here.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.ended {
            this.ended = true;
            this.send
                .send_data(Bytes::new(), true)
                .map_err(h2_io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::tunnel::H2Windows;

    fn timeouts() -> Timeouts {
        Timeouts {
            keepalive_interval: Duration::from_secs(15),
            ..Timeouts::default()
        }
    }

    /// Sends `data` on an h2 server stream as the peer's window allows.
    async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Option<()> {
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let cap = std::future::poll_fn(|cx| send.poll_capacity(cx))
                .await?
                .ok()?;
            if cap > 0 {
                send.send_data(data.split_to(cap.min(data.len())), false)
                    .ok()?;
            }
        }
        Some(())
    }

    /// A session over an in-memory pipe to an h2 server (the `h2` crate's) that answers
    /// every CONNECT with 200 and echoes the stream. `answering` false: after the
    /// handshake the server stops reading (a gateway or proxy that hangs), so pings go
    /// unanswered.
    async fn session(answering: bool) -> H2Session {
        let (client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server)
                .await
                .expect("server handshake");
            if !answering {
                // Hold the connection without ever polling it again.
                std::future::pending::<()>().await;
            }
            while let Some(Ok((request, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let mut body = request.into_body();
                    let ok = hyper::Response::builder()
                        .status(200)
                        .body(())
                        .expect("200");
                    let mut send = respond.send_response(ok, false).expect("respond");
                    while let Some(Ok(data)) = body.data().await {
                        let _ = body.flow_control().release_capacity(data.len());
                        if send_all(&mut send, data).await.is_none() {
                            return;
                        }
                    }
                    let _ = send.send_data(Bytes::new(), true);
                });
            }
        });
        let gw = GatewaySession::over(Box::new(client), true, H2Windows::default());
        H2Session::handshake(gw, &timeouts())
            .await
            .expect("handshake")
    }

    /// A stream carries more than its windows each way (the writes wait for capacity, the
    /// reads give it back) and half-closes with END_STREAM.
    #[tokio::test]
    async fn a_stream_carries_more_than_its_windows_and_half_closes() {
        let s = session(true).await;
        let request = ConnectRequest::new("example.com:443").expect("request");
        let mut up = s.connect(&request, &timeouts()).await.expect("connect");
        assert_eq!(s.streams(), 1);
        let sent: Vec<u8> = (0..(9u32 << 20)).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = tokio::io::split(&mut up);
        let expected = sent.clone();
        let writer = async move {
            w.write_all(&sent).await.expect("write");
            w.shutdown().await.expect("END_STREAM");
        };
        let mut got = Vec::new();
        let reader = r.read_to_end(&mut got);
        let ((), read) = tokio::join!(writer, reader);
        read.expect("read");
        assert!(got == expected, "bytes changed, lost or reordered");
        drop(up);
        assert_eq!(s.streams(), 0);
    }

    /// The relay that hands frames through: a pod on real loopback TCP sends more than the
    /// stream's windows and half-closes; the echo comes back whole and in order, then
    /// END_STREAM ends the pod's side too, and both directions are counted.
    #[tokio::test]
    async fn the_frame_relay_carries_more_than_the_windows_and_half_closes() {
        let s = session(true).await;
        let request = ConnectRequest::new("example.com:443").expect("request");
        let mut up = s.connect(&request, &timeouts()).await.expect("connect");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut app = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut pod, _) = l.accept().await.expect("accept");
        let sent: Vec<u8> = (0..(9u32 << 20)).map(|i| (i % 251) as u8).collect();
        let app_side = async {
            let (mut r, mut w) = app.split();
            let writer = async {
                w.write_all(&sent).await.expect("write");
                w.shutdown().await.expect("half-close");
            };
            let mut got = Vec::new();
            let ((), read) = tokio::join!(writer, r.read_to_end(&mut got));
            read.expect("read");
            got
        };
        let relay = async {
            let stream = up.h2_stream().expect("an h2 stream");
            stream.relay(&mut pod, Duration::from_secs(3600)).await
        };
        // A lost window update would stall, not fail: bounded.
        let (relayed, got) = timeout(Duration::from_secs(60), async {
            tokio::join!(relay, app_side)
        })
        .await
        .expect("the relay finished");
        assert!(got == sent, "bytes changed, lost or reordered");
        let n = sent.len() as u64;
        assert_eq!(
            (relayed.tx, relayed.rx, relayed.ok, relayed.close.as_str()),
            (n, n, true, "eof")
        );
    }

    /// Pings keep an answering session open; one unanswered for the keepalive interval
    /// ends the session, which then takes no streams.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_ping_ends_the_session() {
        let alive = session(true).await;
        let hung = session(false).await;
        tokio::time::sleep(Duration::from_secs(4 * 15 + 1)).await;
        assert!(!alive.is_closed(), "answered pings keep the session");
        assert!(hung.is_closed(), "unanswered pings end the session");
        let request = ConnectRequest::new("example.com:443").expect("request");
        let e = hung
            .connect(&request, &timeouts())
            .await
            .expect_err("closed");
        assert!(matches!(e, TunnelError::Closed { .. }), "{e:?}");
    }

    /// After the gateway's GOAWAY, a new stream is refused as `Closed` and the session
    /// reports itself closed (so the pool stops choosing it), while the stream that was
    /// already open runs on.
    #[tokio::test]
    async fn after_goaway_the_session_takes_no_new_stream_but_open_ones_run_on() {
        let (client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server)
                .await
                .expect("server handshake");
            let Some(Ok((_request, mut respond))) = conn.accept().await else {
                return;
            };
            let ok = hyper::Response::builder()
                .status(200)
                .body(())
                .expect("200");
            let mut send = respond.send_response(ok, false).expect("respond");
            conn.graceful_shutdown();
            // Sent after the GOAWAY: once the client reads it, it has seen the GOAWAY.
            send.send_data(Bytes::from_static(b"after goaway"), false)
                .expect("data");
            while conn.accept().await.is_some() {}
            std::future::pending::<()>().await;
        });
        let gw = GatewaySession::over(Box::new(client), true, H2Windows::default());
        let s = H2Session::handshake(gw, &timeouts())
            .await
            .expect("handshake");
        let request = ConnectRequest::new("example.com:443").expect("request");
        let mut first = s
            .connect(&request, &timeouts())
            .await
            .expect("first stream");
        let mut got = [0u8; 12];
        first.read_exact(&mut got).await.expect("data after goaway");
        assert_eq!(&got, b"after goaway");
        let e = s.connect(&request, &timeouts()).await.expect_err("refused");
        assert!(matches!(e, TunnelError::Closed { .. }), "{e:?}");
        assert!(s.is_closed(), "a session past GOAWAY is not offered again");
        first
            .write_all(b"still open")
            .await
            .expect("the open stream runs on");
    }
}
