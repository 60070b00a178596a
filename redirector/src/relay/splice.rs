//! The relay without a user-space copy: `splice(2)` moves the bytes socket → pipe → socket
//! inside the kernel. Used when the upstream is a gateway session whose records the kernel
//! seals and opens (kTLS, `tunnel/ktls.rs`): the tunnel's bytes then never pass through the
//! daemon's memory.
//!
//! - **Records that are not data.** A kTLS socket refuses to splice a record that is not
//!   application data (`EINVAL`: a session ticket, a key update, close_notify), and so does
//!   a socket at its end (`0`). Then one read goes through the stream's own `poll_read`,
//!   which handles the record as the copying relay would (tickets to rustls, the new key to
//!   the kernel, close_notify as EOF, a cut without it as an error) and hands over any
//!   plaintext after it; splicing then resumes. Plaintext the stream already holds (data
//!   that came with the handshake) is read the same way first.
//! - **Pipes.** One per direction, filled only when empty and drained before the next fill:
//!   a splice into it then never meets a full pipe, so `EAGAIN` always means the socket was
//!   not ready, and the socket's readiness is cleared only when it truly was not.
//! - **Counts, idle timeout, half-close, the end of the relay** are those of the copying
//!   relay (`relay.rs`); a byte is counted once it is in the other socket.
use std::{
    future::poll_fn,
    io,
    os::fd::{AsFd, OwnedFd},
    pin::Pin,
    sync::{Mutex, MutexGuard, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::{Activity, DirEnd, Ends, Relayed, shutdown};

/// Bytes asked of one splice: a pipe's default capacity (16 pages).
const CHUNK: usize = 64 * 1024;
/// The buffer of a read through the stream's own path: one TLS record's plaintext.
const FALLBACK_BUF: usize = 16 * 1024;

/// An upstream on a TCP socket that carries the tunnel's plaintext, so it can be spliced.
pub trait Splice: AsyncRead + AsyncWrite + Unpin + Send {
    /// The socket the bytes are spliced from and into.
    fn socket(&self) -> &TcpStream;
    /// The stream holds plaintext the socket no longer has: read it with `poll_read` first.
    fn buffered(&self) -> bool;
    /// `n` bytes were spliced into the socket (kTLS counts the records its key has sealed).
    fn spliced_in(&mut self, n: usize) -> io::Result<()>;
}

/// The two pipes of a spliced relay. Made before the relay starts, so a daemon out of file
/// descriptors relays by copying instead.
pub struct Pipes([Pipe; 2]);

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipes {
    pub fn new() -> io::Result<Pipes> {
        let pipe = || -> io::Result<Pipe> {
            let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
            Ok(Pipe { r, w })
        };
        Ok(Pipes([pipe()?, pipe()?]))
    }
}

/// One splice that never waits: the sockets are non-blocking, and so is the pipe side.
fn splice_once(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    Ok(splice(from, None, to, None, len, flags)?)
}

/// The upstream, shared by the two directions of one task; locked only inside a poll.
struct Shared<'a, U>(Mutex<&'a mut U>);

impl<'a, U> Shared<'a, U> {
    fn lock(&self) -> MutexGuard<'_, &'a mut U> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<U: Splice> Shared<'_, U> {
    /// Runs `f` on the upstream socket once it is ready for `interest`; a `WouldBlock` from
    /// `f` clears the readiness and waits again.
    async fn io<R>(
        &self,
        interest: Interest,
        mut f: impl FnMut(&TcpStream) -> io::Result<R>,
    ) -> io::Result<R> {
        loop {
            poll_fn(|cx| {
                let up = self.lock();
                if interest.is_readable() {
                    up.socket().poll_read_ready(cx)
                } else {
                    up.socket().poll_write_ready(cx)
                }
            })
            .await?;
            let up = self.lock();
            let s = up.socket();
            match s.try_io(interest, || f(s)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
}

/// The upstream as a plain stream, for its own reads and its shutdown.
impl<U: Splice> AsyncRead for &Shared<'_, U> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut **self.lock()).poll_read(cx, buf)
    }
}

impl<U: Splice> AsyncWrite for &Shared<'_, U> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut **self.lock()).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut **self.lock()).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut **self.lock()).poll_shutdown(cx)
    }
}

/// Pod → upstream until the pod's EOF, then the upstream's write side is shut down (for
/// kTLS: close_notify).
async fn upload<U: Splice>(
    pod: &ReadHalf<'_>,
    mut up: &Shared<'_, U>,
    pipe: &Pipe,
    count: &mut u64,
    activity: &Activity,
) -> DirEnd {
    let pod = pod.as_ref();
    let moved: io::Result<()> = async {
        loop {
            let n = pod
                .async_io(Interest::READABLE, || splice_once(pod, &pipe.w, CHUNK))
                .await?;
            if n == 0 {
                return Ok(());
            }
            activity.touch();
            let mut held = n;
            while held > 0 {
                let m = up
                    .io(Interest::WRITABLE, |s| splice_once(&pipe.r, s, held))
                    .await?;
                up.lock().spliced_in(m)?;
                held -= m;
                *count += m as u64;
            }
        }
    }
    .await;
    match moved {
        Ok(()) => shutdown(&mut up).await,
        Err(e) => DirEnd::Error(e),
    }
}

/// Upstream → pod until the upstream's end, then the pod's write side is shut down.
async fn download<U: Splice>(
    mut pod: WriteHalf<'_>,
    mut up: &Shared<'_, U>,
    pipe: &Pipe,
    count: &mut u64,
    activity: &Activity,
) -> DirEnd {
    let moved: io::Result<()> = async {
        let mut fallback = Vec::new();
        loop {
            let spliced = if up.lock().buffered() {
                None
            } else {
                match up
                    .io(Interest::READABLE, |s| splice_once(s, &pipe.w, CHUNK))
                    .await
                {
                    Ok(0) => None,
                    Ok(n) => Some(n),
                    // A record splice does not take: the stream's own read handles it.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
                    Err(e) => return Err(e),
                }
            };
            let Some(n) = spliced else {
                fallback.resize(FALLBACK_BUF, 0);
                let n = up.read(&mut fallback).await?;
                if n == 0 {
                    return Ok(());
                }
                activity.touch();
                pod.write_all(&fallback[..n]).await?;
                *count += n as u64;
                continue;
            };
            activity.touch();
            let sock = pod.as_ref();
            let mut held = n;
            while held > 0 {
                let m = sock
                    .async_io(Interest::WRITABLE, || splice_once(&pipe.r, sock, held))
                    .await?;
                held -= m;
                *count += m as u64;
            }
        }
    }
    .await;
    match moved {
        Ok(()) => shutdown(&mut pod).await,
        Err(e) => DirEnd::Error(e),
    }
}

/// Relays both directions with splice; ends as [`super::relay`] does.
pub async fn relay<U: Splice>(
    pod: &mut TcpStream,
    upstream: &mut U,
    pipes: Pipes,
    idle: Duration,
) -> Relayed {
    let Pipes([up_pipe, down_pipe]) = pipes;
    let (pr, pw) = pod.split();
    let up = Shared(Mutex::new(upstream));
    let activity = Activity::new();
    let (mut tx, mut rx) = (0u64, 0u64);
    let ends = {
        let upload = upload(&pr, &up, &up_pipe, &mut tx, &activity);
        let download = download(pw, &up, &down_pipe, &mut rx, &activity);
        Ends::of(upload, download, &activity, idle).await
    };
    ends.finish(&mut &up, tx, rx, idle).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A plain TCP upstream: what a kTLS socket is to the relay, minus the records.
    /// `buffered` bytes stand for plaintext the stream holds before the socket's (the data
    /// that comes with a kTLS handshake): they must reach the pod first.
    struct Plain {
        tcp: TcpStream,
        buffered: Vec<u8>,
        spliced_in: usize,
    }

    impl AsyncRead for Plain {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if !self.buffered.is_empty() {
                let n = self.buffered.len().min(buf.remaining());
                buf.put_slice(&self.buffered[..n]);
                self.buffered.drain(..n);
                return Poll::Ready(Ok(()));
            }
            Pin::new(&mut self.tcp).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Plain {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.tcp).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.tcp).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.tcp).poll_shutdown(cx)
        }
    }

    impl Splice for Plain {
        fn socket(&self) -> &TcpStream {
            &self.tcp
        }
        fn buffered(&self) -> bool {
            !self.buffered.is_empty()
        }
        fn spliced_in(&mut self, n: usize) -> io::Result<()> {
            self.spliced_in += n;
            Ok(())
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// The relay under test, with an idle timeout no test reaches.
    async fn spliced(pod: &mut TcpStream, up: &mut Plain) -> Relayed {
        relay(pod, up, Pipes::new().unwrap(), Duration::from_secs(3600)).await
    }

    /// Sends `data` and half-closes while reading everything that comes back.
    async fn send_and_receive(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, n) = tokio::join!(send, r.read_to_end(&mut got));
        n.unwrap();
        got
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// Both directions at once through real loopback sockets, several MiB each so the
    /// pipes fill and drain many times, with each side half-closing on its own; every byte
    /// arrives in order and is counted once, and the upstream is told what went into it.
    #[tokio::test]
    async fn spliced_bytes_arrive_intact_both_ways_with_half_close() {
        let (mut app, mut pod) = pair().await;
        let (up, mut far) = pair().await;
        let early = b"came with the handshake".to_vec();
        let mut upstream = Plain {
            tcp: up,
            buffered: early.clone(),
            spliced_in: 0,
        };
        let up_data = pattern(5 << 20, 1);
        let down_data = pattern(7 << 20, 2);
        let relay = async {
            let r = spliced(&mut pod, &mut upstream).await;
            (r, upstream.spliced_in)
        };
        let ((r, spliced_in), at_app, at_far) = tokio::join!(
            relay,
            send_and_receive(&mut app, &up_data),
            send_and_receive(&mut far, &down_data)
        );
        assert!(at_far == up_data, "pod → upstream bytes differ");
        let mut want = early.clone();
        want.extend_from_slice(&down_data);
        assert!(at_app == want, "upstream → pod bytes differ");
        assert_eq!(
            (r.tx, r.rx, r.ok, r.close.as_str()),
            (up_data.len() as u64, want.len() as u64, true, "eof")
        );
        assert_eq!(spliced_in, up_data.len());
    }

    /// An upstream that resets the connection ends the relay with that error, named by
    /// direction, although the pod's direction is still open.
    #[tokio::test]
    async fn a_reset_upstream_ends_the_relay_and_is_named() {
        let (_app, mut pod) = pair().await;
        let (up, far) = pair().await;
        let mut upstream = Plain {
            tcp: up,
            buffered: Vec::new(),
            spliced_in: 0,
        };
        // A zero linger makes the close a reset.
        socket2::SockRef::from(&far)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(far);
        let r = spliced(&mut pod, &mut upstream).await;
        assert!(!r.ok, "{}", r.close);
        assert!(
            r.close.starts_with("upstream->pod: ") && r.close.contains("reset"),
            "{}",
            r.close
        );
    }
}
