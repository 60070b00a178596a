//! Large reads under the TLS layer during bulk transfers.
//!
//! rustls asks its transport for at most 4 KiB per read, so a 16 KiB record costs four or
//! five `read()` system calls; at gigabytes per second that was a visible share of the
//! redirector's CPU on the gateway path (`cargo xtask bench --profile`). `ReadAhead` notices
//! when reads keep coming back full (a bulk transfer) and then reads up to 64 KiB at once,
//! serving the TLS layer's small reads from memory. When the data stops, the buffer is
//! released: an idle tunnel keeps nothing.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read at once in bulk mode.
const READ_AHEAD: usize = 64 * 1024;

pub(super) struct ReadAhead<S> {
    inner: S,
    /// Bytes read but not yet handed out are `buf[pos..len]`; empty outside bulk mode.
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    /// The last read filled what was asked: more is probably waiting.
    bulk: bool,
}

impl<S> ReadAhead<S> {
    pub(super) fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            pos: 0,
            len: 0,
            bulk: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.len {
            let n = out.remaining().min(this.len - this.pos);
            out.put_slice(&this.buf[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.len && !this.bulk {
                this.buf = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        if !this.bulk || out.remaining() >= READ_AHEAD {
            // Small reads (handshakes, interactive traffic) go straight to the caller.
            let asked = out.remaining();
            let before = out.filled().len();
            let r = Pin::new(&mut this.inner).poll_read(cx, out);
            if let Poll::Ready(Ok(())) = r {
                this.bulk = asked > 0 && out.filled().len() - before == asked;
            }
            return r;
        }
        if this.buf.len() < READ_AHEAD {
            this.buf.resize(READ_AHEAD, 0);
        }
        let mut fill = ReadBuf::new(&mut this.buf);
        match Pin::new(&mut this.inner).poll_read(cx, &mut fill) {
            Poll::Ready(Ok(())) => {
                let n = fill.filled().len();
                // A short fill means the sender paused: leave bulk mode once it is served.
                this.bulk = n == READ_AHEAD;
                this.pos = 0;
                this.len = n;
                let give = out.remaining().min(n);
                out.put_slice(&this.buf[..give]);
                this.pos = give;
                if this.pos == this.len && !this.bulk {
                    this.buf = Vec::new();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.bulk = false;
                this.buf = Vec::new();
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                // Nothing waiting after all: do not hold 64 KiB across the wait.
                this.bulk = false;
                this.buf = Vec::new();
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    forward_async_write!(inner);
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Counts the reads that reach the transport.
    struct Counted<S> {
        inner: S,
        reads: usize,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let r = Pin::new(&mut self.inner).poll_read(cx, buf);
            if r.is_ready() {
                self.reads += 1;
            }
            r
        }
    }

    #[tokio::test]
    async fn bulk_data_is_read_in_large_chunks_and_arrives_intact() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        tx.write_all(&data).await.expect("write");
        drop(tx);
        let mut r = ReadAhead::new(Counted {
            inner: rx,
            reads: 0,
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut calls = 0;
        loop {
            let n = r.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            calls += 1;
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got == data, "bytes changed or reordered");
        assert_eq!(calls, 256, "the caller still reads 4 KiB at a time");
        let transport = r.inner.reads;
        assert!(
            transport < 40,
            "{transport} transport reads for 1 MiB in 4 KiB requests"
        );
        assert!(r.buf.is_empty(), "the buffer is released at EOF");
    }

    #[tokio::test]
    async fn small_reads_pass_through_and_nothing_is_held_while_idle() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut r = ReadAhead::new(rx);
        tx.write_all(b"hello").await.expect("write");
        let mut chunk = [0u8; 4096];
        let n = r.read(&mut chunk).await.expect("read");
        assert_eq!(&chunk[..n], b"hello");
        assert!(!r.bulk && r.buf.capacity() == 0);
        // A full read switches to bulk mode; the next wait drops the buffer.
        tx.write_all(&[7u8; 4096 + 100]).await.expect("write");
        assert_eq!(r.read(&mut chunk).await.expect("read"), 4096);
        assert!(r.bulk);
        assert_eq!(r.read(&mut chunk).await.expect("read"), 100);
        let pending = futures::FutureExt::now_or_never(r.read(&mut chunk));
        assert!(pending.is_none(), "no data: the read waits");
        assert!(r.buf.capacity() == 0, "idle: no buffer kept");
    }
}
