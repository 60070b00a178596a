//! The gateway's TLS session with our own record layer: rustls makes the handshake, then
//! hands over the traffic secrets, and records are sealed and opened here, in place.
//!
//! Why: rustls' buffered connection (and its unbuffered one, in this release) decrypts each
//! record and then copies the plaintext into an owned buffer, which the reader copies again;
//! under it, a read-ahead layer copied the ciphertext once more. A GiB through the gateway
//! tunnel paid three copies on top of the decryption. Here, when the reader's buffer has
//! room for a whole record, the ciphertext is read from the socket straight into it and
//! opened there, each record's plaintext moved up against the previous one's in the same
//! pass as its decryption: no copy at all. Only a record cut by the end of a read is copied
//! (its ciphertext, to the front of the next read). A smaller read (an HTTP/2 codec's) is
//! served from [`Records`]' own buffer: opened where it lies, copied once. Writes are sealed
//! into one buffer of up to four records and written with one system call.
//!
//! What stays with rustls: the handshake, certificate checks, session tickets (each one is
//! handed to [`KernelConnection::handle_new_session_ticket`], so later handshakes resume)
//! and new traffic secrets on a key update ([`KernelConnection::update_rx_secret`] and
//! `update_tx_secret`). The record protection itself (RFC 8446 §5.2-5.3 for TLS 1.3,
//! RFC 5288 and RFC 7905 for TLS 1.2's AEAD suites) is done with `ring`, the same AEAD
//! implementation rustls uses by default.
//!
//! Writes report bytes as written only once their records are in the socket: a write that
//! returns `Pending` half way keeps its records and reports them on the next call, which
//! must pass the same bytes again (as `write_all` and HTTP/2's writer do). So there is never
//! sealed data waiting for a flush that nobody calls.
use std::{
    io::{self, IoSlice},
    ops::Range,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use ring::aead;
use rustls::{
    ClientConfig, ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion,
    client::{ClientConnectionData, UnbufferedClientConnection},
    kernel::KernelConnection,
    pki_types::ServerName,
    unbuffered::{ConnectionState, EncodeError, UnbufferedStatus},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

pub(super) const CONTENT_ALERT: u8 = 21;
pub(super) const CONTENT_HANDSHAKE: u8 = 22;
pub(super) const CONTENT_APP_DATA: u8 = 23;
const HEADER: usize = 5;
const TAG: usize = 16;
/// The most plaintext one record may carry (RFC 8446 §5.1).
pub(super) const MAX_PLAINTEXT: usize = 1 << 14;
/// The most a record's protected payload may add to that: TLS 1.3 allows 256 bytes
/// (§5.2), TLS 1.2 2048 (RFC 5246 §6.2.3).
const MAX_EXPANSION: usize = 2048;
/// Plaintext sealed per write call: four full records, one system call.
const MAX_WRITE: usize = 4 * MAX_PLAINTEXT;
/// Ciphertext read at once in bulk mode, and the buffer for it (a partial record may wait
/// at its end).
const BULK_READ: usize = 64 * 1024;
const BULK_BUF: usize = BULK_READ + HEADER + MAX_PLAINTEXT + MAX_EXPANSION;
/// The buffer of one read outside bulk mode: a request or an answer fits.
const SMALL_BUF: usize = 8 * 1024;
/// A reader's buffer with this much room (past any part of a record waiting in `inb`) gets
/// the records read and opened in it: a whole record of the largest size fits.
const DIRECT_MIN: usize = HEADER + MAX_PLAINTEXT + MAX_EXPANSION;
/// The handshake may not make us hold more than this of the peer's bytes (certificate
/// chains included).
const MAX_HANDSHAKE_BUF: usize = 256 * 1024;
/// A post-handshake message (a session ticket, a key update) may not grow larger.
pub(super) const MAX_POST_HANDSHAKE: usize = 64 * 1024;
/// Records sealed under one key before we move to the next (RFC 8446 §5.5 puts AES-GCM's
/// limit at 2^24.5 full records; rustls uses the same figure).
pub(super) const RECORDS_PER_KEY: u64 = 1 << 24;

/// What the handshake settled, for the caller to check and report.
#[derive(Clone, Debug)]
pub(crate) struct Negotiated {
    pub(crate) alpn: Option<Vec<u8>>,
    pub(crate) resumed: bool,
}

/// A TLS client session after its handshake, with the record layer of this module.
pub(crate) struct Records<S> {
    io: S,
    version: Version,
    rx: Keys,
    tx: Keys,
    kernel: KernelConnection<ClientConnectionData>,
    /// Shutting the write side down also ends TCP's (see `fin_on_shutdown` in [`connect`]).
    fin_on_shutdown: bool,
    /// Bytes from the socket: `inb[..start]` is used up (or the plaintext being handed out),
    /// `inb[start..end]` waits to be opened. Its length is at least `end`; the next read goes
    /// into its spare capacity.
    inb: Vec<u8>,
    start: usize,
    end: usize,
    /// The last read filled all it was offered: more is probably waiting.
    bulk: bool,
    /// Plaintext bytes copied out of `inb` into readers' buffers (the rest was opened in
    /// the reader's buffer itself).
    copied: u64,
    /// Plaintext not yet handed out: inside `inb`, or (only before the first read) in
    /// `early`, which holds what arrived during the handshake.
    plain: Range<usize>,
    early: Vec<u8>,
    /// A post-handshake message that spans records.
    handshake: Vec<u8>,
    /// The peer's close_notify arrived: reads return EOF.
    read_closed: bool,
    /// An error met after plaintext that was handed out first; the next read returns it.
    failed: Option<io::Error>,
    /// Sealed records not yet in the socket: `out[sent..]`.
    out: Vec<u8>,
    sent: usize,
    /// Plaintext bytes whose records are in `out`, to report once they are sent.
    unreported: Option<usize>,
    close_notify_sealed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Version {
    Tls12,
    Tls13,
}

/// One direction's key, IV and record sequence number. The IV is wiped when the keys are
/// dropped (rustls wipes the keys it hands over, not the IVs); ring's expanded key offers
/// no wiping.
struct Keys {
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    /// TLS 1.2 AES-GCM: the record carries the nonce's last 8 bytes (RFC 5288 §3).
    explicit_nonce: bool,
}

impl Keys {
    fn new(version: Version, seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Keys> {
        let (alg, key, iv, gcm) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv, true),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv, true),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, false)
            }
            _ => {
                return Err(tls_error(
                    "the negotiated cipher suite has no record layer here",
                ));
            }
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| tls_error("the negotiated key does not fit its cipher"))?;
        let iv: [u8; aead::NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| tls_error("the negotiated IV does not fit its cipher"))?;
        Ok(Keys {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
            explicit_nonce: gcm && version == Version::Tls12,
        })
    }

    /// The per-record nonce: the IV with the sequence number XORed into its end.
    fn nonce(&self) -> [u8; aead::NONCE_LEN] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    fn next_seq(&mut self) -> io::Result<()> {
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| tls_error("record sequence number exhausted"))?;
        Ok(())
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.iv);
    }
}

pub(super) fn tls_error(detail: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, detail)
}

pub(super) fn rustls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The TLS 1.2 additional data: sequence number, type, version, plaintext length.
fn aad12(seq: u64, typ: u8, len: usize) -> [u8; 13] {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(&seq.to_be_bytes());
    a[8] = typ;
    a[9..11].copy_from_slice(&[3, 3]);
    a[11..].copy_from_slice(&(len as u16).to_be_bytes());
    a
}

/// A finished handshake whose records nobody protects yet: this module's [`Records`] or the
/// kernel's TLS (`super::ktls`) take it over.
pub(crate) struct Handshake<S> {
    pub(super) io: S,
    pub(crate) negotiated: Negotiated,
    pub(super) version: Version,
    pub(super) secrets: ExtractedSecrets,
    pub(super) kernel: KernelConnection<ClientConnectionData>,
    /// Bytes read past the handshake (part of a record).
    inb: Vec<u8>,
    /// Application data that came with the handshake.
    early: Vec<u8>,
}

impl<S> Handshake<S> {
    /// The handshake moved onto `io`, and the stream it was on (to look at what kind it is).
    pub(crate) fn replace_io<T>(self, io: T) -> (S, Handshake<T>) {
        let Handshake {
            io: old,
            negotiated,
            version,
            secrets,
            kernel,
            inb,
            early,
        } = self;
        let moved = Handshake {
            io,
            negotiated,
            version,
            secrets,
            kernel,
            inb,
            early,
        };
        (old, moved)
    }

    /// No part of a record was read past the handshake: the socket's next byte starts a
    /// record. (Whole records the peer sent with its handshake, such as an HTTP/2 server's
    /// SETTINGS, are already opened: [`Handshake::take_early`].)
    pub(crate) fn at_record_boundary(&self) -> bool {
        self.inb.is_empty()
    }

    /// Application data that came with the handshake, to hand out before anything else.
    pub(super) fn take_early(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.early)
    }

    /// This module's record layer over the handshake's stream. `fin_on_shutdown: false`
    /// keeps TCP open when the write side is shut down: the close_notify alone carries the
    /// half-close (proxies tear a CONNECT tunnel down on the first FIN).
    pub(crate) fn records(self, fin_on_shutdown: bool) -> io::Result<Records<S>> {
        let Handshake {
            io,
            version,
            secrets,
            kernel,
            inb,
            early,
            ..
        } = self;
        let rx = Keys::new(version, secrets.rx.0, secrets.rx.1)?;
        let tx = Keys::new(version, secrets.tx.0, secrets.tx.1)?;
        let end = inb.len();
        let plain = 0..early.len();
        Ok(Records {
            io,
            version,
            rx,
            tx,
            kernel,
            fin_on_shutdown,
            inb,
            start: 0,
            end,
            bulk: false,
            copied: 0,
            plain,
            early,
            handshake: Vec::new(),
            read_closed: false,
            failed: None,
            out: Vec::new(),
            sent: 0,
            unreported: None,
            close_notify_sealed: false,
        })
    }
}

/// [`handshake`], then [`Handshake::records`].
#[cfg(test)]
pub(crate) async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    io: S,
    fin_on_shutdown: bool,
) -> io::Result<(Records<S>, Negotiated)> {
    let hs = handshake(config, name, io).await?;
    let negotiated = hs.negotiated.clone();
    Ok((hs.records(fin_on_shutdown)?, negotiated))
}

/// Makes the TLS handshake over `io` with rustls, then takes its traffic secrets.
pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    mut io: S,
) -> io::Result<Handshake<S>> {
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(rustls_error)?;
    let mut inb = vec![0u8; SMALL_BUF];
    let mut filled = 0;
    let mut out: Vec<u8> = Vec::new();
    let mut early = Vec::new();
    loop {
        let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut inb[..filled]);
        let mut read_more = false;
        let mut done = false;
        match state.map_err(rustls_error)? {
            ConnectionState::EncodeTlsData(mut data) => {
                let used = out.len();
                let mut room = MAX_PLAINTEXT;
                loop {
                    out.resize(used + room, 0);
                    match data.encode(&mut out[used..]) {
                        Ok(n) => {
                            out.truncate(used + n);
                            break;
                        }
                        Err(EncodeError::InsufficientSize(s)) if s.required_size > room => {
                            if s.required_size > MAX_HANDSHAKE_BUF {
                                return Err(tls_error("a handshake message too large to send"));
                            }
                            room = s.required_size;
                        }
                        Err(_) => return Err(tls_error("could not encode a handshake message")),
                    }
                }
            }
            ConnectionState::TransmitTlsData(data) => {
                io.write_all(&out).await?;
                io.flush().await?;
                out.clear();
                data.done();
            }
            ConnectionState::BlockedHandshake => read_more = true,
            ConnectionState::WriteTraffic(_) => done = true,
            ConnectionState::ReadTraffic(mut records) => {
                // Data the server sent right after its handshake messages (TLS 1.3 allows
                // it before our Finished): kept and handed out first.
                while let Some(record) = records.next_record() {
                    let record = record.map_err(rustls_error)?;
                    if early.len() + record.payload.len() > MAX_HANDSHAKE_BUF {
                        return Err(tls_error("too much data before the handshake finished"));
                    }
                    early.extend_from_slice(record.payload);
                }
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the session during the handshake",
                ));
            }
            _ => return Err(tls_error("an unexpected TLS handshake state")),
        }
        inb.copy_within(discard..filled, 0);
        filled -= discard;
        if done {
            break;
        }
        if read_more {
            if filled == inb.len() {
                if inb.len() >= MAX_HANDSHAKE_BUF {
                    return Err(tls_error("the peer's handshake messages are too large"));
                }
                inb.resize(inb.len() * 2, 0);
            }
            let n = io.read(&mut inb[filled..]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the handshake",
                ));
            }
            filled += n;
        }
    }
    let negotiated = Negotiated {
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    };
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => Version::Tls13,
        Some(ProtocolVersion::TLSv1_2) => Version::Tls12,
        _ => return Err(tls_error("a TLS version without a record layer here")),
    };
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(rustls_error)?;
    if !out.is_empty() {
        return Err(tls_error("handshake data left unsent"));
    }
    inb.truncate(filled);
    Ok(Handshake {
        io,
        negotiated,
        version,
        secrets,
        kernel,
        inb,
        early,
    })
}

/// Walks the whole TLS 1.3 post-handshake messages at the start of `msgs`: session
/// tickets go to rustls (later handshakes resume), a KeyUpdate to `key_update(kernel,
/// update_requested)`, which moves the receive key. Returns the bytes used (a partial
/// message waits for the next record) and whether the peer asked us to move our key too.
pub(super) fn post_handshake_messages(
    msgs: &[u8],
    kernel: &mut KernelConnection<ClientConnectionData>,
    mut key_update: impl FnMut(&mut KernelConnection<ClientConnectionData>, bool) -> io::Result<bool>,
) -> io::Result<(usize, bool)> {
    let mut used = 0;
    let mut answer = false;
    while let [typ, a, b, c, rest @ ..] = &msgs[used..] {
        let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
        if rest.len() < len {
            break;
        }
        let body = &rest[..len];
        match *typ {
            4 => kernel
                .handle_new_session_ticket(body)
                .map_err(rustls_error)?,
            24 => {
                let requested = match body {
                    [0] => false,
                    [1] => true,
                    _ => return Err(tls_error("the peer sent a malformed key update")),
                };
                // The next key applies from the next record (RFC 8446 §5.1).
                if !rest[len..].is_empty() {
                    return Err(tls_error("a key update must end its record"));
                }
                answer |= key_update(kernel, requested)?;
            }
            _ => return Err(tls_error("the peer sent an unexpected handshake message")),
        }
        used += 4 + len;
    }
    Ok((used, answer))
}

/// One opened record: its content type, where its plaintext is, where the next record starts.
struct Record {
    typ: u8,
    plain: Range<usize>,
    next: usize,
}

/// Opens the record at `buf[at..]` in place, its plaintext moved to start at `to` (at most
/// where the record starts; `None`: where its sealed payload starts, so nothing moves).
/// `Ok(None)`: the record is not all in `buf` yet. Decryption and the move are one pass.
fn open_record(
    rx: &mut Keys,
    version: Version,
    buf: &mut [u8],
    at: usize,
    to: Option<usize>,
) -> io::Result<Option<Record>> {
    let avail = &buf[at..];
    if avail.len() < HEADER {
        return Ok(None);
    }
    let typ = avail[0];
    let len = u16::from_be_bytes([avail[3], avail[4]]) as usize;
    if avail[1] != 3 || !(TAG..=MAX_PLAINTEXT + MAX_EXPANSION).contains(&len) {
        return Err(tls_error("the peer sent a malformed TLS record"));
    }
    if avail.len() < HEADER + len {
        return Ok(None);
    }
    let header: [u8; HEADER] = avail[..HEADER].try_into().expect("five bytes");
    let body = at + HEADER..at + HEADER + len;
    // The additional data: TLS 1.3 the record header, TLS 1.2 13 bytes of its own.
    let mut aad = [0u8; 13];
    let (nonce, sealed, aad_len) = match version {
        Version::Tls13 => {
            if typ != CONTENT_APP_DATA {
                return Err(tls_error("the peer sent an unprotected record"));
            }
            aad[..HEADER].copy_from_slice(&header);
            (rx.nonce(), body.clone(), HEADER)
        }
        Version::Tls12 => {
            let (nonce, sealed) = if rx.explicit_nonce {
                if len < 8 + TAG {
                    return Err(tls_error("the peer sent a malformed TLS record"));
                }
                let mut n = rx.iv;
                n[4..].copy_from_slice(&buf[body.start..body.start + 8]);
                (n, body.start + 8..body.end)
            } else {
                (rx.nonce(), body.clone())
            };
            aad = aad12(rx.seq, typ, sealed.len() - TAG);
            (nonce, sealed, aad.len())
        }
    };
    let to = to.unwrap_or(sealed.start);
    debug_assert!(to <= sealed.start);
    let opened = rx
        .key
        .open_within(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(&aad[..aad_len]),
            &mut buf[to..sealed.end],
            sealed.start - to..,
        )
        .map_err(|_| tls_error("a TLS record failed its integrity check"))?;
    let (typ, plain) = match version {
        // Inner plaintext: content, the real type, then zero padding (§5.2).
        Version::Tls13 => {
            let Some(last) = opened.iter().rposition(|b| *b != 0) else {
                return Err(tls_error("the peer sent a record without a content type"));
            };
            (opened[last], to..to + last)
        }
        Version::Tls12 => (typ, to..to + opened.len()),
    };
    rx.next_seq()?;
    if plain.len() > MAX_PLAINTEXT {
        return Err(tls_error("the peer sent an oversized TLS record"));
    }
    Ok(Some(Record {
        typ,
        plain,
        next: body.end,
    }))
}

/// What opening one record found.
enum Opened {
    /// Application data, at this range of `inb`.
    Data(Range<usize>),
    /// A record for the session itself (a ticket, a key update, an alert), handled.
    Control,
    /// No whole record is buffered yet.
    Incomplete,
}

impl<S> Records<S> {
    /// Opens the record at `inb[start..]`, if it is all there.
    fn open_next(&mut self) -> io::Result<Opened> {
        let Some(rec) = open_record(
            &mut self.rx,
            self.version,
            &mut self.inb[..self.end],
            self.start,
            None,
        )?
        else {
            return Ok(Opened::Incomplete);
        };
        self.start = rec.next;
        if rec.typ == CONTENT_APP_DATA {
            return Ok(Opened::Data(rec.plain));
        }
        // Control records are rare and small: their bytes leave `inb` for the handling.
        let inb = std::mem::take(&mut self.inb);
        let handled = self.control(rec.typ, &inb[rec.plain]);
        self.inb = inb;
        handled.map(|()| Opened::Control)
    }

    /// The socket had nothing more: with no part of a record waiting, an idle session holds
    /// no buffer.
    fn ran_dry(&mut self) {
        if self.start == self.end {
            self.inb = Vec::new();
            (self.start, self.end) = (0, 0);
        }
        self.bulk = false;
    }

    /// Handles an opened record that is not application data: an alert, a post-handshake
    /// message (part).
    fn control(&mut self, typ: u8, plain: &[u8]) -> io::Result<()> {
        match typ {
            CONTENT_ALERT => match plain {
                // close_notify.
                [_, 0] => {
                    self.read_closed = true;
                    Ok(())
                }
                // user_canceled, a warning that precedes close_notify.
                [1, 90] => Ok(()),
                [_, desc] => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("the peer sent TLS alert {desc}"),
                )),
                _ => Err(tls_error("the peer sent a malformed TLS alert")),
            },
            CONTENT_HANDSHAKE if self.version == Version::Tls13 => {
                if self.handshake.len() + plain.len() > MAX_POST_HANDSHAKE {
                    return Err(tls_error("the peer sent an oversized handshake message"));
                }
                let mut buf = std::mem::take(&mut self.handshake);
                buf.extend_from_slice(plain);
                let used = self.post_handshake(&buf)?;
                buf.drain(..used);
                self.handshake = buf;
                Ok(())
            }
            // TLS 1.2: a HelloRequest asks for renegotiation, which rustls never does
            // either; it may be ignored (RFC 5246 §7.4.1.1).
            CONTENT_HANDSHAKE if plain == [0, 0, 0, 0] => Ok(()),
            _ => Err(tls_error("the peer sent a record of an unexpected type")),
        }
    }

    /// Handles the whole TLS 1.3 post-handshake messages at the start of `msgs`; returns
    /// how many bytes they took (a partial message waits for its next record).
    fn post_handshake(&mut self, msgs: &[u8]) -> io::Result<usize> {
        post_handshake_messages(msgs, &mut self.kernel, |kernel, requested| {
            let (seq, secrets) = kernel.update_rx_secret().map_err(rustls_error)?;
            self.rx = Keys::new(self.version, seq, secrets)?;
            Ok(requested)
        })
        .and_then(|(used, answer)| {
            if answer {
                self.update_tx_key()?;
            }
            Ok(used)
        })
    }

    /// Seals a KeyUpdate (update_not_requested) under the current key and moves to the next.
    fn update_tx_key(&mut self) -> io::Result<()> {
        self.seal(CONTENT_HANDSHAKE, &[&[24, 0, 0, 1, 0]])?;
        let (seq, secrets) = self.kernel.update_tx_secret().map_err(rustls_error)?;
        self.tx = Keys::new(self.version, seq, secrets)?;
        Ok(())
    }

    /// Seals `parts` (together at most [`MAX_PLAINTEXT`] bytes) as one record at the end of
    /// `out`.
    fn seal(&mut self, typ: u8, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        debug_assert!(len <= MAX_PLAINTEXT);
        let at = self.out.len();
        let (outer, explicit, inner) = match self.version {
            Version::Tls13 => (CONTENT_APP_DATA, 0, 1),
            Version::Tls12 => (typ, if self.tx.explicit_nonce { 8 } else { 0 }, 0),
        };
        let body = explicit + len + inner + TAG;
        self.out.reserve(HEADER + body);
        self.out.extend_from_slice(&[outer, 3, 3]);
        self.out.extend_from_slice(&(body as u16).to_be_bytes());
        let nonce = self.tx.nonce();
        if explicit > 0 {
            self.out.extend_from_slice(&nonce[4..]);
        }
        let plain_at = self.out.len();
        for p in parts {
            self.out.extend_from_slice(p);
        }
        if inner > 0 {
            self.out.push(typ);
        }
        let aad_header: [u8; HEADER] = self.out[at..at + HEADER].try_into().expect("five bytes");
        let tag = match self.version {
            Version::Tls13 => self.tx.key.seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad_header),
                &mut self.out[plain_at..],
            ),
            Version::Tls12 => self.tx.key.seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad12(self.tx.seq, typ, len)),
                &mut self.out[plain_at..],
            ),
        }
        .map_err(|_| tls_error("could not seal a TLS record"))?;
        self.out.extend_from_slice(tag.as_ref());
        self.tx.next_seq()
    }

    /// Seals up to [`MAX_WRITE`] bytes of `bufs` as application data; returns how many.
    fn seal_data(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut total = 0;
        let mut parts: Vec<&[u8]> = Vec::with_capacity(bufs.len().min(8));
        let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut carry: &[u8] = &[];
        while total < MAX_WRITE {
            // Gather one record's worth from the slices.
            parts.clear();
            let mut len = 0;
            while len < MAX_PLAINTEXT {
                if carry.is_empty() {
                    match slices.next() {
                        Some(s) => carry = s,
                        None => break,
                    }
                }
                let take = carry.len().min(MAX_PLAINTEXT - len);
                parts.push(&carry[..take]);
                carry = &carry[take..];
                len += take;
            }
            if len == 0 {
                break;
            }
            if self.tx.seq >= RECORDS_PER_KEY {
                if self.version != Version::Tls13 {
                    return Err(tls_error(
                        "the session's key is used up (TLS 1.2 cannot renew it)",
                    ));
                }
                self.update_tx_key()?;
            }
            self.seal(CONTENT_APP_DATA, &parts)?;
            total += len;
        }
        Ok(total)
    }
}

impl<S: AsyncWrite + Unpin> Records<S> {
    /// Writes `out` to the socket until it is all there.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.sent = 0;
        if self.out.capacity() > SMALL_BUF {
            // A bulk write's buffer is not kept for an idle session.
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(n) = self.unreported {
            ready!(self.poll_send(cx))?;
            self.unreported = None;
            let offered: usize = bufs.iter().map(|b| b.len()).sum();
            debug_assert!(offered >= n, "a write was retried with fewer bytes");
            return Poll::Ready(Ok(n.min(offered)));
        }
        // Records of our own (a key update's answer) go first.
        ready!(self.poll_send(cx))?;
        if self.close_notify_sealed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS session's write side is closed",
            )));
        }
        let n = self.seal_data(bufs)?;
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        match self.poll_send(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.unreported = Some(n);
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Records<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.plain.is_empty() {
                let from = if this.early.is_empty() {
                    &this.inb[this.plain.clone()]
                } else {
                    &this.early[this.plain.clone()]
                };
                let n = from.len().min(buf.remaining());
                buf.put_slice(&from[..n]);
                this.copied += n as u64;
                this.plain.start += n;
                if this.plain.is_empty() && !this.early.is_empty() {
                    this.early = Vec::new();
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = this.failed.take() {
                return Poll::Ready(Err(e));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            match this.open_next()? {
                Opened::Data(range) => {
                    this.plain = range;
                    continue;
                }
                Opened::Control => {
                    // A key update's answer goes out as soon as the socket takes it.
                    if !this.out.is_empty()
                        && this.unreported.is_none()
                        && let Poll::Ready(Err(e)) = this.poll_send(cx)
                    {
                        return Poll::Ready(Err(e));
                    }
                    continue;
                }
                Opened::Incomplete => {}
            }
            // Room for what waits and a whole record: read into the reader's buffer. (`early`
            // is empty here: it goes when its plaintext is handed out.)
            if buf.remaining() >= this.end - this.start + DIRECT_MIN {
                let before = buf.filled().len();
                ready!(this.poll_read_direct(cx, buf))?;
                if buf.filled().len() > before {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Records<S> {
    /// Reads ciphertext from the socket straight into the reader's buffer, after the part
    /// of a record that waits in `inb`, and opens the whole records there, each plaintext
    /// moved up against the previous one's (decryption and move in one pass). A record cut
    /// by the end of the read goes back to `inb`. An error after some plaintext is kept for
    /// the next read, so that plaintext is not lost.
    fn poll_read_direct(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let waiting = self.end - self.start;
        // SAFETY: nothing below de-initializes these bytes: the socket's read and `put_slice`
        // write into them, and only bytes written there are read or handed out.
        let unfilled = unsafe { buf.unfilled_mut() };
        let offered = unfilled.len() - waiting;
        let mut sock = ReadBuf::uninit(&mut unfilled[waiting..]);
        match Pin::new(&mut self.io).poll_read(cx, &mut sock) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                self.ran_dry();
                return Poll::Pending;
            }
        }
        let n = sock.filled().len();
        if n == 0 {
            return Poll::Ready(Err(eof_without_close_notify()));
        }
        self.bulk = n == offered;
        let mut whole = ReadBuf::uninit(unfilled);
        whole.put_slice(&self.inb[self.start..self.end]);
        // SAFETY: the socket's read initialized the `n` bytes after the waiting ones (the
        // first unfilled bytes now).
        unsafe { whole.assume_init(n) };
        whole.set_filled(waiting + n);
        (self.start, self.end) = (0, 0);
        let data = whole.filled_mut();
        let (mut at, mut to) = (0, 0);
        let mut failed = None;
        while !self.read_closed {
            match open_record(&mut self.rx, self.version, data, at, Some(to)) {
                Ok(Some(rec)) => {
                    at = rec.next;
                    if rec.typ == CONTENT_APP_DATA {
                        to = rec.plain.end;
                    } else if let Err(e) = self.control(rec.typ, &data[rec.plain]) {
                        failed = Some(e);
                        break;
                    }
                }
                Ok(None) => {
                    // The rest of a cut record comes with the next read.
                    let rest = &data[at..];
                    self.inb.clear();
                    self.inb.extend_from_slice(rest);
                    self.end = rest.len();
                    break;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // SAFETY: the plaintext, `data[..to]`, is initialized (`to` ≤ its length).
        unsafe { buf.assume_init(to) };
        buf.advance(to);
        // A key update's answer goes out as soon as the socket takes it.
        if failed.is_none()
            && !self.out.is_empty()
            && self.unreported.is_none()
            && let Poll::Ready(Err(e)) = self.poll_send(cx)
        {
            failed = Some(e);
        }
        match failed {
            Some(e) if to == 0 => Poll::Ready(Err(e)),
            Some(e) => {
                self.failed = Some(e);
                Poll::Ready(Ok(()))
            }
            None => Poll::Ready(Ok(())),
        }
    }
}

fn eof_without_close_notify() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the peer closed the connection without sending TLS close_notify",
    )
}

impl<S: AsyncRead + Unpin> Records<S> {
    /// Reads more ciphertext after the partial record at `inb[start..end]`.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Everything before `start` has been handed out: move the partial record to the front.
        if self.start > 0 {
            self.inb.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            self.plain = 0..0;
        }
        let want = if self.bulk { BULK_BUF } else { SMALL_BUF };
        // A partial record tells how much it needs.
        let need = match self.inb[..self.end] {
            [_, _, _, a, b, ..] => HEADER + u16::from_be_bytes([a, b]) as usize,
            _ => HEADER,
        };
        // The socket reads into the buffer's spare capacity, which is never zeroed first
        // (the buffer is freed whenever the socket runs dry, so this is a new allocation
        // on every wake-up of a busy session).
        self.inb.truncate(self.end);
        self.inb.reserve(want.max(need).saturating_sub(self.end));
        let spare = self.inb.spare_capacity_mut();
        let offered = spare.len();
        let mut rb = ReadBuf::uninit(spare);
        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(eof_without_close_notify()));
                }
                // SAFETY: the read initialized the `n` bytes after the buffer's length (a
                // `ReadBuf` reports only bytes it was given and that were written).
                unsafe { self.inb.set_len(self.end + n) };
                self.end += n;
                self.bulk = n == offered;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.ran_dry();
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Records<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_slices(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.unreported.is_none() {
            ready!(this.poll_send(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// Sends close_notify; with `fin_on_shutdown`, TCP's write side is shut down after it.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.unreported.is_some() {
            // Bytes reported not written yet: they go first, and stay unreported.
            ready!(this.poll_send(cx))?;
            this.unreported = None;
        }
        if !this.close_notify_sealed {
            ready!(this.poll_send(cx))?;
            this.seal(CONTENT_ALERT, &[&[1, 0]])?;
            this.close_notify_sealed = true;
        }
        ready!(this.poll_send(cx))?;
        if this.fin_on_shutdown {
            Pin::new(&mut this.io).poll_shutdown(cx)
        } else {
            Pin::new(&mut this.io).poll_flush(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use rustls::{ServerConfig, SupportedCipherSuite, crypto::CryptoProvider};
    use test_pki::TestCa;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, server::TlsStream};

    use super::*;

    const NAME: &str = "gw.example.test";

    struct Pki {
        ca: TestCa,
        client: Arc<ClientConfig>,
    }

    impl Pki {
        fn new() -> Pki {
            let ca = TestCa::temp("record-layer");
            let ca_path = ca.write_ca(ca.dir());
            let client = crate::tls::client_config(Some(&ca_path), None, &[b"http/1.1"])
                .expect("client config");
            Pki { ca, client }
        }

        /// A server that speaks only `version` and the suites whose name contains `cipher`.
        fn server(
            &self,
            version: &'static rustls::SupportedProtocolVersion,
            cipher: &str,
        ) -> Arc<ServerConfig> {
            let mut provider: CryptoProvider = (*crate::tls::provider()).clone();
            provider
                .cipher_suites
                .retain(|s: &SupportedCipherSuite| format!("{:?}", s.suite()).contains(cipher));
            assert!(!provider.cipher_suites.is_empty(), "no suite {cipher}");
            let leaf = self.ca.issue(&[NAME]);
            let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[version])
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(vec![leaf.cert_der()], leaf.key_der())
                .expect("leaf");
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(config)
        }
    }

    /// A client session and the server's end of it, over loopback TCP.
    async fn pair(
        client: &Arc<ClientConfig>,
        server: Arc<ServerConfig>,
        fin_on_shutdown: bool,
    ) -> (Records<TcpStream>, Negotiated, TlsStream<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .expect("server handshake")
        });
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from(NAME).expect("name");
        let (records, negotiated) = connect(Arc::clone(client), name, tcp, fin_on_shutdown)
            .await
            .expect("client handshake");
        (records, negotiated, accept.await.expect("accept task"))
    }

    /// [`pair`] with a TLS 1.3 AES-128-GCM server, TCP closed on shutdown.
    async fn tls13_pair(pki: &Pki) -> (Records<TcpStream>, Negotiated, TlsStream<TcpStream>) {
        let server = pki.server(&rustls::version::TLS13, "AES_128_GCM");
        pair(&pki.client, server, true).await
    }

    fn pattern(len: usize, salt: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ salt).collect()
    }

    /// Every AEAD suite of TLS 1.3 and 1.2 carries a mebibyte each way intact, in records
    /// the peer (rustls' own record layer) accepts, and a half-close either way is a
    /// close_notify: the other direction goes on after it.
    #[tokio::test]
    async fn every_suite_carries_a_mebibyte_each_way_across_half_closes() {
        let pki = Pki::new();
        let cases: [(&'static rustls::SupportedProtocolVersion, &str); 6] = [
            (&rustls::version::TLS13, "AES_128_GCM"),
            (&rustls::version::TLS13, "AES_256_GCM"),
            (&rustls::version::TLS13, "CHACHA20"),
            (&rustls::version::TLS12, "AES_128_GCM"),
            (&rustls::version::TLS12, "AES_256_GCM"),
            (&rustls::version::TLS12, "CHACHA20"),
        ];
        for (version, cipher) in cases {
            let case = format!("{:?} {cipher}", version.version);
            let (mut client, negotiated, mut server) =
                pair(&pki.client, pki.server(version, cipher), false).await;
            assert_eq!(negotiated.alpn.as_deref(), Some(&b"http/1.1"[..]), "{case}");
            let up = pattern(1 << 20, 1);
            let down = pattern(1 << 20, 2);
            let expect_up = up.clone();
            let send_down = down.clone();
            let far = tokio::spawn(async move {
                let mut got = Vec::new();
                // Ends only at the client's close_notify (a bare EOF is an error here).
                server.read_to_end(&mut got).await.expect("server read");
                assert!(got == expect_up, "bytes changed on the way up");
                server.write_all(&send_down).await.expect("server write");
                server.shutdown().await.expect("server shutdown");
            });
            client.write_all(&up).await.expect("client write");
            client.shutdown().await.expect("client shutdown");
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("client read");
            far.await.expect("server task");
            assert!(got == down, "{case}: bytes changed on the way down");
        }
    }

    /// The gateway moves its key and asks us to move ours (RFC 8446 §4.6.3): both
    /// directions go on under the new keys.
    #[tokio::test]
    async fn a_key_update_from_the_gateway_moves_both_directions_keys() {
        let pki = Pki::new();
        let (mut client, _, mut server) = tls13_pair(&pki).await;
        let far = tokio::spawn(async move {
            for round in 0..3u8 {
                let mut ping = [0u8; 5];
                server.read_exact(&mut ping).await.expect("ping");
                assert_eq!(ping, [b'p', b'i', b'n', b'g', round]);
                server
                    .get_mut()
                    .1
                    .refresh_traffic_keys()
                    .expect("key update");
                server
                    .write_all(&[b'p', b'o', b'n', b'g', round])
                    .await
                    .expect("pong");
            }
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.expect("end");
            rest
        });
        for round in 0..3u8 {
            client
                .write_all(&[b'p', b'i', b'n', b'g', round])
                .await
                .expect("ping");
            let mut pong = [0u8; 5];
            client.read_exact(&mut pong).await.expect("pong");
            assert_eq!(pong, [b'p', b'o', b'n', b'g', round]);
        }
        // Our own move (as when the gateway asks for one, or a key is used up): the
        // gateway reads what follows under our next key.
        client.update_tx_key().expect("our key update");
        client.write_all(b"after").await.expect("write");
        client.shutdown().await.expect("shutdown");
        assert_eq!(far.await.expect("server task"), b"after");
    }

    /// Session tickets that arrive after the handshake are handed to rustls: the next
    /// handshake with the same configuration resumes.
    #[tokio::test]
    async fn tickets_read_on_the_session_let_the_next_handshake_resume() {
        let pki = Pki::new();
        let server = pki.server(&rustls::version::TLS13, "AES_128_GCM");
        let (mut client, first, mut far) = pair(&pki.client, Arc::clone(&server), true).await;
        assert!(!first.resumed);
        far.write_all(b"hello").await.expect("write");
        let mut hello = [0u8; 5];
        // The tickets come before the data on the wire.
        client.read_exact(&mut hello).await.expect("read");
        drop((client, far));
        let (_client, second, _far) = pair(&pki.client, server, true).await;
        assert!(second.resumed, "the second handshake did not resume");
    }

    /// Vectored writes (HTTP/2's frame header and payload) are sealed together, across
    /// slices and record boundaries, in order.
    #[tokio::test]
    async fn vectored_writes_are_sealed_in_order_across_slices() {
        let pki = Pki::new();
        let (mut client, _, mut server) = tls13_pair(&pki).await;
        let a = pattern(9, 3);
        let b = pattern(30_000, 4);
        let c = pattern(100_000, 5);
        let mut want = [a.clone(), b.clone(), c.clone()].concat();
        let slices = [IoSlice::new(&a), IoSlice::new(&b), IoSlice::new(&c)];
        let n = client.write_vectored(&slices).await.expect("write");
        assert_eq!(n, MAX_WRITE, "one call seals up to four full records");
        client.write_all(&want[n..]).await.expect("rest");
        client.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert!(got == want, "bytes changed or reordered");
        want.clear();
    }

    /// A read with room for a whole record gets the records opened where the reader wants
    /// them: the only plaintext copied out of the session's own buffer is that of a record
    /// split across two socket reads. In every suite, across a key update and a ticket in
    /// the middle of the stream, the bytes arrive intact.
    #[tokio::test]
    async fn large_reads_open_records_in_the_readers_buffer() {
        let pki = Pki::new();
        let cases: [(&'static rustls::SupportedProtocolVersion, &str); 4] = [
            (&rustls::version::TLS13, "AES_128_GCM"),
            (&rustls::version::TLS13, "CHACHA20"),
            (&rustls::version::TLS12, "AES_128_GCM"),
            (&rustls::version::TLS12, "CHACHA20"),
        ];
        const HALF: usize = 4 << 20;
        for (version, cipher) in cases {
            let case = format!("{:?} {cipher}", version.version);
            let tls13 = version.version == rustls::ProtocolVersion::TLSv1_3;
            let (mut client, _, mut server) =
                pair(&pki.client, pki.server(version, cipher), false).await;
            let down = pattern(2 * HALF, 3);
            let send = down.clone();
            let far = tokio::spawn(async move {
                server.write_all(&send[..HALF]).await.expect("first half");
                if tls13 {
                    server
                        .get_mut()
                        .1
                        .refresh_traffic_keys()
                        .expect("key update");
                }
                server.write_all(&send[HALF..]).await.expect("second half");
                server.shutdown().await.expect("server shutdown");
                server
            });
            let mut got = Vec::with_capacity(down.len());
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = client.read(&mut buf).await.expect("client read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            far.await.expect("server task");
            assert!(got == down, "{case}: bytes changed on the way down");
            println!("{case}: {} of {} bytes copied", client.copied, down.len());
            assert!(
                client.copied < (down.len() / 2) as u64,
                "{case}: {} of {} plaintext bytes were copied out of the session's buffer",
                client.copied,
                down.len()
            );
        }
    }

    /// Bytes from a hostile or broken peer end the session with a clear error; nothing
    /// unauthenticated reaches the reader.
    #[tokio::test]
    async fn forged_or_malformed_records_are_refused() {
        let pki = Pki::new();
        let cases: [(&str, Vec<u8>); 4] = [
            (
                "integrity",
                [vec![23, 3, 3, 0, 40], vec![0x55; 40]].concat(),
            ),
            ("malformed", vec![23, 3, 3, 0x48, 0x01]),
            ("unprotected", [vec![22, 3, 3, 0, 20], vec![0; 20]].concat()),
            ("malformed", [vec![23, 2, 0, 0, 20], vec![0; 20]].concat()),
        ];
        // A small read opens records in the session's buffer, a large one in the reader's.
        for size in [64, 64 << 10] {
            for (want, bytes) in &cases {
                let (mut client, _, server) = tls13_pair(&pki).await;
                let (mut tcp, _) = server.into_inner();
                tcp.write_all(bytes).await.expect("write");
                let mut buf = vec![0u8; size];
                let e = client.read(&mut buf).await.expect_err("refused");
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{want} ({size}): {e}");
                assert!(e.to_string().contains(want), "{want} ({size}): {e}");
            }
        }
    }

    /// Small and large reads take turns, and a large one finds nothing waiting in between
    /// (as the relay's coalescing read does): every byte arrives in order.
    #[tokio::test]
    async fn small_and_large_reads_take_turns_across_an_empty_socket() {
        use futures::FutureExt as _;
        let pki = Pki::new();
        let (mut client, _, mut server) = tls13_pair(&pki).await;
        let data = pattern((3 * 40) << 10, 5);
        let mut got = Vec::new();
        let mut small = [0u8; 1000];
        let mut large = vec![0u8; 64 << 10];
        for part in data.chunks(40 << 10) {
            server.write_all(part).await.expect("server write");
            server.flush().await.expect("flush");
            let want = got.len() + part.len();
            // Small reads take everything (served from the session's buffer) ...
            while got.len() < want {
                let n = client.read(&mut small).await.expect("small read");
                assert!(n > 0, "EOF too early");
                got.extend_from_slice(&small[..n]);
            }
            // ... then a large read finds the socket empty.
            assert!(
                client.read(&mut large).now_or_never().is_none(),
                "nothing to read"
            );
        }
        server.write_all(&data[..1]).await.expect("last byte");
        server.flush().await.expect("flush");
        let n = client.read(&mut large).await.expect("large read");
        got.extend_from_slice(&large[..n]);
        let mut expect = data.clone();
        expect.push(data[0]);
        assert!(
            got == expect,
            "{} of {} bytes in order",
            got.len(),
            expect.len()
        );
    }

    /// Records opened before a forged one in the same socket read are handed out whole, then
    /// the forged record ends the session.
    #[tokio::test]
    async fn plaintext_before_a_forged_record_is_handed_out_then_the_error() {
        let pki = Pki::new();
        let (mut client, _, mut server) = tls13_pair(&pki).await;
        let good = pattern(40 << 10, 4);
        server.write_all(&good).await.expect("good records");
        server.flush().await.expect("flush");
        let (mut tcp, _) = server.into_inner();
        // No Nagle wait: the forged record joins the good ones in the client's socket.
        tcp.set_nodelay(true).expect("nodelay");
        tcp.write_all(&[[23, 3, 3, 0, 40].as_slice(), &[0x55; 40]].concat())
            .await
            .expect("forged record");
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let e = loop {
            match client.read(&mut buf).await {
                Ok(0) => panic!("EOF instead of the forged record's error"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert!(
            got == good,
            "{} of {} good bytes before the error",
            got.len(),
            good.len()
        );
        assert!(e.to_string().contains("integrity"), "{e}");
    }

    /// A bare TCP close without close_notify is not a clean end (a cut could otherwise
    /// truncate a response unnoticed).
    #[tokio::test]
    async fn a_close_without_close_notify_is_an_error() {
        let pki = Pki::new();
        let (mut client, _, server) = tls13_pair(&pki).await;
        drop(server.into_inner());
        let mut buf = [0u8; 64];
        let e = client.read(&mut buf).await.expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}
