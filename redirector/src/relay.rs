//! Byte relay between the pod and the upstream, with half-close and per-direction counts.
//! The bytes are copied through user space, except where `splice` can move them in the
//! kernel (`splice.rs`: a gateway session in kTLS).
pub mod splice;

use std::{
    io,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use futures::FutureExt as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Starts small (most connections are short request/response exchanges, and idle tunnels
/// should cost little) and doubles up to `MAX_BUF` each time a direction fills its buffer:
/// bulk transfers get large reads and writes.
pub(crate) const INITIAL_BUF: usize = 1024;
pub(crate) const MAX_BUF: usize = 64 * 1024;
/// Growth up to this size is free; beyond it a direction takes the extra from the
/// node-wide [`BufferBudget`], so a flood of bulk connections cannot each hold 64 KiB.
const FREE_BUF: usize = 16 * 1024;

/// Bytes of relay buffer above [`FREE_BUF`] per direction that all relays together may
/// hold: a few bulk transfers get full 64 KiB buffers, thousands of them do not.
pub struct BufferBudget {
    used: AtomicUsize,
    max: usize,
}

impl BufferBudget {
    pub const fn new(max: usize) -> BufferBudget {
        BufferBudget {
            used: AtomicUsize::new(0),
            max,
        }
    }

    fn take(&self, n: usize) -> bool {
        crate::budget::reserve(&self.used, n, self.max)
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes taken now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// The daemon's budget: 32 MiB, e.g. 256 directions at the full 64 KiB.
pub static BUFFERS: BufferBudget = BufferBudget::new(32 << 20);

/// What one direction's buffer holds of a [`BufferBudget`]; given back when it ends.
pub(crate) struct Borrowed<'a> {
    budget: Option<&'a BufferBudget>,
    bytes: usize,
}

impl<'a> Borrowed<'a> {
    pub(crate) fn new(budget: Option<&'a BufferBudget>) -> Self {
        Borrowed { budget, bytes: 0 }
    }

    /// The size for a buffer of `len` bytes that a read just filled: doubled up to
    /// [`MAX_BUF`], past [`FREE_BUF`] only with room in the budget.
    pub(crate) fn grow(&mut self, len: usize) -> usize {
        if len >= MAX_BUF {
            return len;
        }
        let grown = len * 2;
        let extra = grown.saturating_sub(FREE_BUF.max(len));
        let allowed = match self.budget {
            Some(b) if extra > 0 => b.take(extra),
            _ => true,
        };
        if !allowed {
            return len;
        }
        self.bytes += extra;
        grown
    }
}

impl Drop for Borrowed<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.budget {
            b.give(self.bytes);
        }
    }
}
/// Reads this large suggest a bulk transfer, where trying for more before writing pays;
/// after a small read (a request, a keystroke) the extra read attempt would be a wasted
/// syscall on the latency path.
pub(crate) const COALESCE_MIN: usize = 8 * 1024;

/// How one direction ended.
#[derive(Debug)]
pub enum DirEnd {
    /// Read EOF and propagated it with a write shutdown.
    Eof,
    /// A read or write failed.
    Error(io::Error),
}

/// Result of a whole relay.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes pod → upstream.
    pub tx: u64,
    /// Bytes upstream → pod.
    pub rx: u64,
    /// Human-readable close reason for the audit line: `eof`, or which direction failed.
    pub close: String,
    pub ok: bool,
}

/// Copies `r` into `w` until EOF (then shuts `w` down: half-close) or an error.
///
/// After a large read that leaves room in the buffer, reads that complete at once are
/// appended before writing: a TLS source yields one record (≤ 16 KiB) per read, and
/// coalescing them turns four writes (and four wake-ups of the reader on the other side)
/// into one. Nothing waits for more data: a read that would block ends the batch.
pub async fn pump<R, W>(r: R, mut w: W, count: &mut u64) -> DirEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    pump_with(r, &mut w, count, None, None).await
}

/// How long the end of a relay waits to close the upstream in order (TLS close_notify
/// flushed) before it drops it.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// When a relay last moved a byte either way, for its idle timeout.
pub(crate) struct Activity {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last read that returned data.
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

async fn pump_with<R, W>(
    mut r: R,
    w: &mut W,
    count: &mut u64,
    activity: Option<&Activity>,
    budget: Option<&BufferBudget>,
) -> DirEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; INITIAL_BUF];
    let mut borrowed = Borrowed::new(budget);
    loop {
        let mut n = match r.read(&mut buf).await {
            Ok(0) => {
                return shutdown(w).await;
            }
            Ok(n) => n,
            Err(e) => return DirEnd::Error(e),
        };
        if let Some(a) = activity {
            a.touch();
        }
        // What ended the batch early, reported after its bytes are written, in order.
        let mut end = None;
        while n >= COALESCE_MIN && n < buf.len() {
            match r.read(&mut buf[n..]).now_or_never() {
                Some(Ok(0)) => {
                    end = Some(Ok(()));
                    break;
                }
                Some(Ok(m)) => n += m,
                Some(Err(e)) => {
                    end = Some(Err(e));
                    break;
                }
                None => break,
            }
        }
        if let Err(e) = w.write_all(&buf[..n]).await {
            return DirEnd::Error(e);
        }
        *count += n as u64;
        match end {
            None => {}
            Some(Ok(())) => {
                return shutdown(w).await;
            }
            Some(Err(e)) => return DirEnd::Error(e),
        }
        if n == buf.len() {
            let grown = borrowed.grow(buf.len());
            buf.resize(grown, 0);
        }
    }
}

/// Passes an EOF on as a write shutdown, bounded by [`SHUTDOWN_GRACE`]: a TLS writer's
/// shutdown flushes its close_notify, which never completes if the peer stopped reading.
pub(crate) async fn shutdown<W: AsyncWrite + Unpin>(w: &mut W) -> DirEnd {
    match tokio::time::timeout(SHUTDOWN_GRACE, w.shutdown()).await {
        Ok(Ok(())) => DirEnd::Eof,
        Ok(Err(e)) => DirEnd::Error(e),
        Err(_) => DirEnd::Error(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer did not take the end of the stream",
        )),
    }
}

/// Relays both directions. A clean EOF in one direction is a half-close: the other keeps
/// going until it ends too. An error in one direction ends both, and so does `idle`: no byte
/// either way for that long.
pub async fn relay<A, B>(pod: A, upstream: B, idle: Duration) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (pr, mut pw) = tokio::io::split(pod);
    let (ur, mut uw) = tokio::io::split(upstream);
    let (mut tx, mut rx) = (0u64, 0u64);
    let activity = Activity::new();
    let ends = {
        // The futures borrow the counters; this block ends them before the totals are read.
        let up = pump_with(pr, &mut uw, &mut tx, Some(&activity), Some(&BUFFERS));
        let down = pump_with(ur, &mut pw, &mut rx, Some(&activity), Some(&BUFFERS));
        Ends::of(up, down, &activity, idle).await
    };
    ends.finish(&mut uw, tx, rx, idle).await
}

/// How the two directions of a relay ended.
pub(crate) struct Ends {
    up: Option<DirEnd>,
    down: Option<DirEnd>,
    idled_out: bool,
}

impl Ends {
    /// Runs both directions until both end, one fails, or `idle` passes without a byte.
    pub(crate) async fn of(
        up: impl std::future::Future<Output = DirEnd>,
        down: impl std::future::Future<Output = DirEnd>,
        activity: &Activity,
        idle: Duration,
    ) -> Ends {
        let mut ends = Ends {
            up: None,
            down: None,
            idled_out: false,
        };
        tokio::pin!(up, down);
        while ends.up.is_none() || ends.down.is_none() {
            tokio::select! {
                _ = tokio::time::sleep_until(activity.last() + idle) => {
                    // Re-armed from the last activity on every pass; fires only after a
                    // whole `idle` without a byte.
                    if activity.last() + idle <= Instant::now() {
                        ends.idled_out = true;
                        break;
                    }
                }
                e = &mut up, if ends.up.is_none() => {
                    let failed = matches!(e, DirEnd::Error(_));
                    ends.up = Some(e);
                    if failed { break; }
                }
                e = &mut down, if ends.down.is_none() => {
                    let failed = matches!(e, DirEnd::Error(_));
                    ends.down = Some(e);
                    if failed { break; }
                }
            }
        }
        ends
    }

    /// Ends the upstream in order unless its direction already did, and says how the relay
    /// ended.
    pub(crate) async fn finish<W: AsyncWrite + Unpin>(
        self,
        upstream: &mut W,
        tx: u64,
        rx: u64,
        idle: Duration,
    ) -> Relayed {
        let Ends {
            up: up_end,
            down: down_end,
            idled_out,
        } = self;
        // However the relay ended (error, idle timeout, the pod gone), the upstream gets an
        // orderly end: for a gateway session that is TLS close_notify, not a cut
        // connection. Bounded, since a peer that stopped reading never lets the flush
        // finish.
        if !matches!(up_end, Some(DirEnd::Eof)) {
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, upstream.shutdown()).await;
        }
        if idled_out {
            return Relayed {
                tx,
                rx,
                close: format!(
                    "idle timeout ({}s without a byte either way)",
                    idle.as_secs()
                ),
                ok: true,
            };
        }
        // One side finished cleanly and the other then found its peer gone (EPIPE/ECONNRESET
        // while forwarding the last bytes, e.g. a TLS close_notify after the server already
        // closed): an ordinary close, not a failure.
        let peer_gone = |e: &Option<DirEnd>| matches!(e, Some(DirEnd::Error(err)) if matches!(err.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset));
        let clean = |e: &Option<DirEnd>| matches!(e, Some(DirEnd::Eof));
        if (clean(&up_end) && peer_gone(&down_end)) || (clean(&down_end) && peer_gone(&up_end)) {
            let who = if clean(&down_end) { "upstream" } else { "pod" };
            return Relayed {
                tx,
                rx,
                close: format!("eof ({who} closed first)"),
                ok: true,
            };
        }
        let describe = |dir: &str, e: &Option<DirEnd>| match e {
            Some(DirEnd::Error(err)) => Some(format!("{dir}: {err}")),
            _ => None,
        };
        let errors: Vec<String> = [
            describe("pod->upstream", &up_end),
            describe("upstream->pod", &down_end),
        ]
        .into_iter()
        .flatten()
        .collect();
        let ok = errors.is_empty();
        Relayed {
            tx,
            rx,
            close: if ok { "eof".into() } else { errors.join("; ") },
            ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    /// A writer whose shutdown never completes (a TLS peer that stopped reading, so the
    /// close_notify never flushes).
    struct StuckShutdown;

    impl AsyncWrite for StuckShutdown {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Pending
        }
    }

    /// Passing an EOF on is bounded: a peer that never takes the end of the stream costs
    /// [`SHUTDOWN_GRACE`], not the connection's life.
    #[tokio::test(start_paused = true)]
    async fn a_shutdown_the_peer_never_takes_is_cut_after_the_grace() {
        let started = tokio::time::Instant::now();
        let mut count = 0;
        let end = pump(&b"last words"[..], StuckShutdown, &mut count).await;
        assert!(
            matches!(&end, DirEnd::Error(e) if e.kind() == io::ErrorKind::TimedOut),
            "{end:?}"
        );
        assert_eq!(count, 10);
        assert_eq!(started.elapsed(), SHUTDOWN_GRACE);
    }

    #[tokio::test]
    async fn counts_both_ways_and_propagates_half_close() {
        let (pod_app, pod_proxy) = duplex(1024);
        let (up_proxy, up_far) = duplex(1024);
        let relay = tokio::spawn(relay(pod_proxy, up_proxy, Duration::from_secs(3600)));
        let (mut app_r, mut app_w) = tokio::io::split(pod_app);
        let (mut far_r, mut far_w) = tokio::io::split(up_far);
        app_w.write_all(b"hello").await.unwrap();
        app_w.shutdown().await.unwrap();
        let mut got = Vec::new();
        far_r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello", "far end sees the bytes, then EOF");
        // After the pod's half-close the other direction still flows (written concurrently:
        // the duplex buffers are smaller than the payload).
        let writer = tokio::spawn(async move {
            far_w.write_all(&vec![7u8; 100_000]).await.unwrap();
            far_w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        app_r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        assert_eq!(back.len(), 100_000);
        let r = relay.await.unwrap();
        assert_eq!(
            (r.tx, r.rx, r.ok, r.close.as_str()),
            (5, 100_000, true, "eof")
        );
    }

    /// No byte either way for the idle timeout ends the relay (websocket-style tunnels get
    /// a generous default); any byte starts the wait over.
    #[tokio::test(start_paused = true)]
    async fn idle_relay_ends_after_the_idle_timeout_and_activity_restarts_it() {
        let (pod_app, pod_proxy) = duplex(1024);
        let (up_proxy, up_far) = duplex(1024);
        let started = Instant::now();
        let relay = tokio::spawn(relay(pod_proxy, up_proxy, Duration::from_secs(60)));
        let (_app_r, mut app_w) = tokio::io::split(pod_app);
        let (mut far_r, _far_w) = tokio::io::split(up_far);
        tokio::time::sleep(Duration::from_secs(50)).await;
        app_w.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        far_r.read_exact(&mut b).await.unwrap();
        let r = relay.await.unwrap();
        let took = started.elapsed();
        assert!(
            (Duration::from_secs(110)..Duration::from_secs(111)).contains(&took),
            "ended {took:?} after start, want 60 s after the byte at 50 s"
        );
        assert_eq!((r.tx, r.ok), (4, true));
        assert!(r.close.starts_with("idle timeout"), "{}", r.close);
    }

    /// Buffers grow past 16 KiB only with room in the budget, and give it back at the end.
    #[tokio::test]
    async fn buffers_grow_past_the_free_size_only_within_the_budget() {
        let data = vec![1u8; 1 << 20];
        for (budget, largest) in [(0, 16 << 10), (16 << 10, 32 << 10), (1 << 20, 64 << 10)] {
            let b = BufferBudget::new(budget);
            let mut w = Writes::default();
            let mut count = 0;
            let end = pump_with(&data[..], &mut w, &mut count, None, Some(&b)).await;
            assert!(matches!(end, DirEnd::Eof), "{end:?}");
            assert_eq!(count, 1 << 20);
            // The largest write is the buffer's size in use.
            assert_eq!(w.0.iter().max(), Some(&largest), "budget {budget}");
            assert_eq!(b.used(), 0, "given back");
        }
    }

    /// Yields its chunks one per read, all ready at once, then EOF.
    struct Chunks(std::collections::VecDeque<Vec<u8>>);
    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if let Some(c) = self.0.pop_front() {
                let n = c.len().min(buf.remaining());
                buf.put_slice(&c[..n]);
                if n < c.len() {
                    self.0.push_front(c[n..].to_vec());
                }
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Records the size of every write.
    #[derive(Default)]
    struct Writes(Vec<usize>, bool);
    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            b: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.0.push(b.len());
            std::task::Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            self.1 = true;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn ready_reads_are_coalesced_into_one_write_and_buffers_grow() {
        // Small reads are written as they come (no extra read on the latency path).
        let mut chunks: std::collections::VecDeque<Vec<u8>> =
            [vec![1u8; 100], vec![2; 100], vec![3; 100]].into();
        let mut w = Writes::default();
        let mut count = 0;
        let end = pump(Chunks(chunks.clone()), &mut w, &mut count).await;
        assert!(matches!(end, DirEnd::Eof) && w.1, "EOF is propagated");
        assert_eq!((w.0.as_slice(), count), (&[100usize, 100, 100][..], 300));
        // A stream of 16 KiB records: buffers double up to the maximum, and once they are
        // large, ready records are coalesced into one write.

        chunks.clear();
        for _ in 0..64 {
            chunks.push_back(vec![0u8; 16 * 1024]);
        }
        let mut w = Writes::default();
        let mut count = 0;
        pump(Chunks(chunks), &mut w, &mut count).await;
        assert_eq!(count, 1 << 20);
        assert_eq!(w.0[0], INITIAL_BUF);
        assert_eq!(w.0.iter().max(), Some(&MAX_BUF), "{:?}", w.0);
        assert!(w.0.len() < 64, "coalesced: {} writes", w.0.len());
    }

    #[tokio::test]
    async fn an_error_in_one_direction_ends_the_relay_and_is_named() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                std::task::Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")))
            }
        }
        impl AsyncWrite for Broken {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                b: &[u8],
            ) -> std::task::Poll<io::Result<usize>> {
                std::task::Poll::Ready(Ok(b.len()))
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
        }
        let (_app, pod_proxy) = duplex(1024);
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            relay(pod_proxy, Broken, Duration::from_secs(3600)),
        )
        .await
        .expect("relay must end");
        assert!(!r.ok);
        assert!(
            r.close.contains("upstream->pod") && r.close.contains("reset"),
            "{}",
            r.close
        );
    }
}
