//! Kernel TLS for the gateway session: after rustls' handshake, the kernel's `tls` upper
//! layer protocol seals and opens the records, and the socket carries plaintext.
//!
//! Used when the session runs on a plain TCP connection (no proxy, or an `http://` proxy
//! whose CONNECT answer left nothing buffered), the handshake ended on a record boundary,
//! the kernel has the `tls` module, and `--gateway-ktls` is not `false`. Anything else
//! falls back to the record layer in `record.rs`; nothing is lost either way.
//!
//! The kernel does the AEAD and the framing; what stays here is what it cannot do:
//! - **Records that are not data.** With a control buffer, `recvmsg` names each record's
//!   type (`TLS_GET_RECORD_TYPE`); a session ticket goes to rustls (later handshakes
//!   resume), close_notify is the end of the stream, any other alert an error.
//! - **Key updates.** The new key is computed by rustls and handed to the kernel again
//!   (`TLS_RX`/`TLS_TX`); a kernel that cannot rekey refuses, and the session ends with
//!   that error rather than going on under a stale key.
//! - **close_notify** on shutdown, sent as an alert record (`TLS_SET_RECORD_TYPE`).
use std::{
    io::{self, IoSlice},
    os::fd::{AsFd, AsRawFd, RawFd},
    pin::Pin,
    sync::atomic::{AtomicBool, Ordering},
    task::{Context, Poll, ready},
};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, TlsGetRecordType, recvmsg, setsockopt,
    sockopt::{TcpTlsRx, TcpTlsTx, TcpUlp, TlsCryptoInfo},
};
use rustls::{ConnectionTrafficSecrets, client::ClientConnectionData, kernel::KernelConnection};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
};
use zeroize::Zeroize as _;

use super::record::{
    CONTENT_ALERT, CONTENT_APP_DATA, CONTENT_HANDSHAKE, Handshake, MAX_PLAINTEXT,
    MAX_POST_HANDSHAKE, RECORDS_PER_KEY, Version, post_handshake_messages, rustls_error, tls_error,
};

/// `TLS_SET_RECORD_TYPE`, the control message that sends a record of another type.
const TLS_SET_RECORD_TYPE: libc::c_int = 1;

/// Set once a kernel refused the `tls` upper layer protocol: later sessions do not ask again
/// (each refused ask may make the kernel try to load the module).
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);

/// The gateway session with its records in the kernel.
pub struct KernelTls {
    tcp: TcpStream,
    kernel: KernelConnection<ClientConnectionData>,
    version: Version,
    fin_on_shutdown: bool,
    read_closed: bool,
    close_notify_sent: bool,
    /// A post-handshake message that spans records.
    handshake: Vec<u8>,
    /// Records sent under the current key, at most: every write is at least one.
    tx_records: u64,
    /// Plaintext read for a caller with less room than a record, or that came with the
    /// handshake or past a CONNECT answer.
    pending: Held,
}

/// Plaintext held for a later read: `buf[pos..end]`; `buf` may be longer (a record-sized
/// buffer kept for the next small read).
#[derive(Default)]
struct Held {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

impl Held {
    fn of(buf: Vec<u8>) -> Held {
        Held {
            end: buf.len(),
            buf,
            pos: 0,
        }
    }

    fn left(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }
}

/// Why kTLS was not used for a session, or `Ok` with the kernel's session.
pub(crate) enum Outcome {
    Kernel(Box<KernelTls>),
    /// Left to user space: the handshake as it was, and why.
    UserSpace(Box<Handshake<TcpStream>>, &'static str),
}

/// Hands the session to the kernel if it can take it.
pub(crate) fn enable(hs: Handshake<TcpStream>, fin_on_shutdown: bool) -> io::Result<Outcome> {
    if UNAVAILABLE.load(Ordering::Relaxed) {
        return Ok(Outcome::UserSpace(
            Box::new(hs),
            "the kernel has no tls module",
        ));
    }
    if !hs.at_record_boundary() {
        return Ok(Outcome::UserSpace(
            Box::new(hs),
            "bytes past the handshake were read",
        ));
    }
    let (Some(tx), Some(rx)) = (
        crypto_info(hs.version, &hs.secrets.tx.1, hs.secrets.tx.0),
        crypto_info(hs.version, &hs.secrets.rx.1, hs.secrets.rx.0),
    ) else {
        return Ok(Outcome::UserSpace(
            Box::new(hs),
            "a cipher suite the kernel does not take",
        ));
    };
    if let Err(e) = setsockopt(&hs.io, TcpUlp::default(), b"tls") {
        // ENOENT: no such module; others (a socket that is not established) are ours.
        if e == nix::errno::Errno::ENOENT {
            UNAVAILABLE.store(true, Ordering::Relaxed);
        }
        return Ok(Outcome::UserSpace(
            Box::new(hs),
            "the kernel has no tls module",
        ));
    }
    // Receive first: if the kernel refuses the key, the socket still passes bytes through
    // unchanged and user space can take over.
    if setsockopt(&hs.io, TcpTlsRx, &rx.0).is_err() {
        return Ok(Outcome::UserSpace(
            Box::new(hs),
            "the kernel refused the receive key",
        ));
    }
    if let Err(e) = setsockopt(&hs.io, TcpTlsTx, &tx.0) {
        // Receiving is the kernel's now: this session cannot go back to user space.
        UNAVAILABLE.store(true, Ordering::Relaxed);
        return Err(io::Error::other(format!(
            "the kernel took the receive key but refused the send key: {e}"
        )));
    }
    let mut hs = hs;
    let early = hs.take_early();
    let Handshake {
        io,
        version,
        kernel,
        ..
    } = hs;
    Ok(Outcome::Kernel(Box::new(KernelTls {
        tcp: io,
        kernel,
        version,
        fin_on_shutdown,
        read_closed: false,
        close_notify_sent: false,
        handshake: Vec::new(),
        tx_records: 0,
        // Data that came with the handshake goes out first.
        pending: Held::of(early),
    })))
}

/// One direction's key as the kernel takes it (`crypto_info`), wiped when dropped. The
/// kernel keeps its own copy and rustls wipes the keys it hands over, so without this the
/// key would stay in freed memory (and in a core dump) after the session. Moves of the
/// value may leave copies on the stack: this is best effort, as it is in rustls.
struct KernelKey(TlsCryptoInfo);

impl KernelKey {
    /// Overwrites the key, IV, salt and sequence number with zeros.
    fn wipe(&mut self) {
        match &mut self.0 {
            TlsCryptoInfo::Aes128Gcm(c) => {
                c.key.zeroize();
                c.iv.zeroize();
                c.salt.zeroize();
                c.rec_seq.zeroize();
            }
            TlsCryptoInfo::Aes256Gcm(c) => {
                c.key.zeroize();
                c.iv.zeroize();
                c.salt.zeroize();
                c.rec_seq.zeroize();
            }
            TlsCryptoInfo::Chacha20Poly1305(c) => {
                c.key.zeroize();
                c.iv.zeroize();
                c.rec_seq.zeroize();
            }
        }
    }
}

impl Drop for KernelKey {
    fn drop(&mut self) {
        self.wipe();
    }
}

/// The kernel's crypto_info for one direction (`linux/tls.h`); `None` for a suite it has
/// no layout for.
fn crypto_info(
    version: Version,
    secrets: &ConnectionTrafficSecrets,
    seq: u64,
) -> Option<KernelKey> {
    let info = libc::tls_crypto_info {
        version: match version {
            Version::Tls13 => 0x0304,
            Version::Tls12 => 0x0303,
        },
        cipher_type: 0,
    };
    let rec_seq = seq.to_be_bytes();
    Some(KernelKey(match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            let (iv, key) = (iv.as_ref(), key.as_ref());
            TlsCryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                info: libc::tls_crypto_info {
                    cipher_type: libc::TLS_CIPHER_AES_GCM_128,
                    ..info
                },
                salt: iv.get(..4)?.try_into().ok()?,
                iv: iv.get(4..)?.try_into().ok()?,
                key: key.try_into().ok()?,
                rec_seq,
            })
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            let (iv, key) = (iv.as_ref(), key.as_ref());
            TlsCryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                info: libc::tls_crypto_info {
                    cipher_type: libc::TLS_CIPHER_AES_GCM_256,
                    ..info
                },
                salt: iv.get(..4)?.try_into().ok()?,
                iv: iv.get(4..)?.try_into().ok()?,
                key: key.try_into().ok()?,
                rec_seq,
            })
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            TlsCryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                info: libc::tls_crypto_info {
                    cipher_type: libc::TLS_CIPHER_CHACHA20_POLY1305,
                    ..info
                },
                iv: iv.as_ref().try_into().ok()?,
                key: key.as_ref().try_into().ok()?,
                salt: [],
                rec_seq,
            })
        }
        _ => return None,
    }))
}

/// One `recvmsg` on a kTLS socket: the bytes and the type of the record they came from
/// (`None` without a record: the peer closed TCP).
fn recv_record(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<u8>)> {
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(u8);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)?;
    let mut typ = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::TlsGetRecordType(t) = c {
            typ = Some(match t {
                TlsGetRecordType::ChangeCipherSpec => 20,
                TlsGetRecordType::Alert => 21,
                TlsGetRecordType::Handshake => 22,
                TlsGetRecordType::ApplicationData => 23,
                TlsGetRecordType::Unknown(x) => x,
                _ => 0,
            });
        }
    }
    Ok((msg.bytes, typ))
}

/// Sends `data` as one record of type `typ` (an alert, a handshake message).
fn send_record(fd: RawFd, typ: u8, data: &[u8]) -> io::Result<usize> {
    // Room for one control message with a one-byte payload, aligned as cmsghdr wants.
    let mut space = [0u64; 4];
    let iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below points into `iov` or `space`,
    // which outlive the sendmsg call, and `space` is larger than CMSG_SPACE(1) (24 bytes).
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = (&raw const iov).cast_mut();
        msg.msg_iovlen = 1;
        msg.msg_control = space.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(1) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_TLS;
        (*c).cmsg_type = TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(c) = typ;
        libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl KernelTls {
    /// Handles a record that is not application data; `Ok(true)` when it ended the stream.
    fn control(&mut self, typ: u8, body: &[u8]) -> io::Result<bool> {
        match typ {
            CONTENT_ALERT => match body {
                [_, 0] => Ok(true),
                [1, 90] => Ok(false),
                [_, desc] => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("the peer sent TLS alert {desc}"),
                )),
                _ => Err(tls_error("the peer sent a malformed TLS alert")),
            },
            CONTENT_HANDSHAKE if self.version == Version::Tls13 => {
                if self.handshake.len() + body.len() > MAX_POST_HANDSHAKE {
                    return Err(tls_error("the peer sent an oversized handshake message"));
                }
                let mut msgs = std::mem::take(&mut self.handshake);
                msgs.extend_from_slice(body);
                let fd = self.tcp.as_raw_fd();
                let (used, answer) = post_handshake_messages(
                    &msgs,
                    &mut self.kernel,
                    |kernel, requested| {
                        let (seq, secrets) = kernel.update_rx_secret().map_err(rustls_error)?;
                        let info = crypto_info(Version::Tls13, &secrets, seq)
                            .ok_or_else(|| tls_error("a key the kernel cannot take"))?;
                        setsockopt(&self.tcp, TcpTlsRx, &info.0).map_err(|e| {
                            io::Error::other(format!(
                                "the gateway updated its key and this kernel's TLS cannot follow: {e}"
                            ))
                        })?;
                        Ok(requested)
                    },
                )?;
                msgs.drain(..used);
                self.handshake = msgs;
                if answer {
                    self.update_tx_key(fd)?;
                }
                Ok(false)
            }
            _ => Err(tls_error("the peer sent a record of an unexpected type")),
        }
    }

    /// Announces our next key (KeyUpdate, update_not_requested) and gives it to the kernel.
    fn update_tx_key(&mut self, fd: RawFd) -> io::Result<()> {
        // Sent without waiting: a socket with no room for five bytes fails the update,
        // and the session ends with that error.
        let msg = [24, 0, 0, 1, 0];
        if send_record(fd, CONTENT_HANDSHAKE, &msg)? != msg.len() {
            return Err(tls_error("could not send a whole key update"));
        }
        let (seq, secrets) = self.kernel.update_tx_secret().map_err(rustls_error)?;
        let info = crypto_info(self.version, &secrets, seq)
            .ok_or_else(|| tls_error("a key the kernel cannot take"))?;
        setsockopt(&self.tcp, TcpTlsTx, &info.0).map_err(|e| {
            io::Error::other(format!("this kernel's TLS cannot move to a new key: {e}"))
        })?;
        self.tx_records = 0;
        Ok(())
    }

    /// Puts plaintext back in front of what is still to be read: bytes a reader took past
    /// the end of its message (a CONNECT answer's head).
    pub(crate) fn unread(&mut self, mut bytes: Vec<u8>) {
        bytes.extend_from_slice(self.pending.left());
        self.pending = Held::of(bytes);
    }

    fn count_records(&mut self, n: usize) -> io::Result<()> {
        self.tx_records += n.div_ceil(MAX_PLAINTEXT).max(1) as u64;
        if self.tx_records >= RECORDS_PER_KEY {
            if self.version != Version::Tls13 {
                return Err(tls_error(
                    "the session's key is used up (TLS 1.2 cannot renew it)",
                ));
            }
            let fd = self.tcp.as_raw_fd();
            self.update_tx_key(fd)?;
        }
        Ok(())
    }
}

impl AsyncRead for KernelTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let left = this.pending.left();
            if !left.is_empty() {
                let n = left.len().min(buf.remaining());
                buf.put_slice(&left[..n]);
                this.pending.pos += n;
                return Poll::Ready(Ok(()));
            }
            if this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.tcp.poll_read_ready(cx)?.is_pending() {
                // Nothing waiting: an idle session holds no buffer.
                this.pending = Held::default();
                return Poll::Pending;
            }
            let fd = this.tcp.as_raw_fd();
            // The kernel hands out a control record only whole, and data past the caller's
            // room stays with us: a small read goes through a record-sized buffer, kept
            // while data keeps coming.
            let small = buf.remaining() < MAX_PLAINTEXT;
            let held = &mut this.pending.buf;
            if small && held.len() < MAX_PLAINTEXT {
                held.resize(MAX_PLAINTEXT, 0);
            }
            let dst: &mut [u8] = if small {
                held
            } else {
                buf.initialize_unfilled()
            };
            let (n, typ) = match this.tcp.try_io(Interest::READABLE, || recv_record(fd, dst)) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            match typ {
                None if n == 0 => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection without sending TLS close_notify",
                    )));
                }
                None | Some(CONTENT_APP_DATA) if n == 0 => continue,
                None | Some(CONTENT_APP_DATA) => {
                    if small {
                        (this.pending.pos, this.pending.end) = (0, n);
                        continue;
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Some(typ) => {
                    let ended = if small {
                        // Control records are rare (tickets, key updates, the end): a copy
                        // frees the held buffer for `control`.
                        let body = this.pending.buf[..n].to_vec();
                        this.control(typ, &body)?
                    } else {
                        this.control(typ, &buf.initialize_unfilled()[..n])?
                    };
                    if ended {
                        this.read_closed = true;
                    }
                }
            }
        }
    }
}

impl AsyncWrite for KernelTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, buf))?;
        self.count_records(n)?;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs))?;
        self.count_records(n)?;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    /// Sends close_notify; with `fin_on_shutdown`, TCP's write side is shut down after it.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while !this.close_notify_sent {
            ready!(this.tcp.poll_write_ready(cx))?;
            let fd = this.tcp.as_fd().as_raw_fd();
            match this.tcp.try_io(Interest::WRITABLE, || {
                send_record(fd, CONTENT_ALERT, &[1, 0])
            }) {
                Ok(_) => this.close_notify_sent = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if this.fin_on_shutdown {
            Pin::new(&mut this.tcp).poll_shutdown(cx)
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

/// The relay splices a kTLS session's plaintext (`relay/splice.rs`): records that are not
/// data come back to `poll_read` above, and so does plaintext held here.
impl crate::relay::splice::Splice for KernelTls {
    fn socket(&self) -> &TcpStream {
        &self.tcp
    }

    fn buffered(&self) -> bool {
        !self.pending.left().is_empty() || self.read_closed
    }

    fn spliced_in(&mut self, n: usize) -> io::Result<()> {
        self.count_records(n)
    }
}

#[cfg(test)]
mod tests {
    use rustls::crypto::cipher::{AeadKey, Iv};

    use super::*;

    /// What a kernel key holds of the secrets: key, salt, IV and sequence number.
    fn secret_bytes(k: &KernelKey) -> Vec<u8> {
        match &k.0 {
            TlsCryptoInfo::Aes128Gcm(c) => [&c.key[..], &c.salt, &c.iv, &c.rec_seq].concat(),
            TlsCryptoInfo::Aes256Gcm(c) => [&c.key[..], &c.salt, &c.iv, &c.rec_seq].concat(),
            TlsCryptoInfo::Chacha20Poly1305(c) => [&c.key[..], &c.iv, &c.rec_seq].concat(),
        }
    }

    #[test]
    fn a_kernel_key_is_wiped() {
        for secrets in [
            ConnectionTrafficSecrets::Aes256Gcm {
                key: AeadKey::from([0xa5; 32]),
                iv: Iv::from([0x5a; 12]),
            },
            ConnectionTrafficSecrets::Chacha20Poly1305 {
                key: AeadKey::from([0xa5; 32]),
                iv: Iv::from([0x5a; 12]),
            },
        ] {
            let mut key = crypto_info(Version::Tls13, &secrets, u64::MAX).expect("a layout");
            let before = secret_bytes(&key);
            assert!(
                before.iter().all(|&b| b != 0),
                "the key was built from the secrets"
            );
            key.wipe();
            let after = secret_bytes(&key);
            assert_eq!(after, vec![0; before.len()], "every secret byte is zero");
        }
    }
}
