//! Host-name recovery from a client's first bytes: TLS ClientHello SNI or HTTP/1.x `Host`.
use std::{fmt, io, time::Duration};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::debug;

#[cfg(test)]
use crate::addr::authority;
use crate::addr::validate_host;

/// Where the host name of a connection came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostSource {
    /// TLS ClientHello `server_name`.
    Sni,
    /// HTTP/1.x `Host` header.
    Host,
    /// No usable name: the original destination IP is all we have.
    Ip,
}

impl HostSource {
    pub fn as_str(self) -> &'static str {
        match self {
            HostSource::Sni => "sni",
            HostSource::Host => "host",
            HostSource::Ip => "ip",
        }
    }
}

impl fmt::Display for HostSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Verdict of a sans-I/O parser on the bytes seen so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse {
    /// A prefix of a message of this protocol: read more.
    NeedMore,
    /// Not this protocol, or a malformed message of it.
    NotThisProtocol,
    /// The raw (unvalidated) host name.
    Found(String),
    /// A complete message that names no host.
    Absent,
}

const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0x0000;
const SNI_HOST_NAME: u8 = 0x00;
/// RFC 8446 5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD_PAYLOAD: usize = 1 << 14;

/// Finds the SNI in a TLS ClientHello, which may span several records and reads.
pub fn parse_client_hello_sni(buf: &[u8]) -> Parse {
    let body = match client_hello_body(buf) {
        Ok(Some(body)) => body,
        Ok(None) => return Parse::NeedMore,
        Err(Malformed) => return Parse::NotThisProtocol,
    };
    match sni_of_client_hello(&body) {
        Ok(Some(name)) => Parse::Found(String::from_utf8_lossy(name).into_owned()),
        Ok(None) => Parse::Absent,
        Err(Malformed) => Parse::NotThisProtocol,
    }
}

struct Malformed;

/// Reassembles the ClientHello handshake message from the leading handshake records.
/// `Ok(None)`: a valid prefix that needs more bytes.
fn client_hello_body(buf: &[u8]) -> Result<Option<Vec<u8>>, Malformed> {
    let mut handshake = Vec::new();
    let mut rest = buf;
    loop {
        // Record header: type(1) version(2) length(2). Check what we have byte by byte so a
        // non-TLS first byte is rejected at once rather than after five bytes.
        match rest {
            [] => return Ok(None),
            [t, ..] if *t != CONTENT_HANDSHAKE => return Err(Malformed),
            [_, major, ..] if *major != 0x03 => return Err(Malformed),
            [_, _, minor, ..] if *minor > 0x04 => return Err(Malformed),
            [_, _, _, hi, lo, ..] => {
                let len = usize::from(u16::from_be_bytes([*hi, *lo]));
                if len == 0 || len > MAX_RECORD_PAYLOAD {
                    return Err(Malformed);
                }
                let Some(fragment) = rest.get(5..5 + len) else {
                    // A partial first record still tells us the handshake type.
                    if handshake.is_empty() && rest.len() > 5 && rest[5] != HANDSHAKE_CLIENT_HELLO {
                        return Err(Malformed);
                    }
                    return Ok(None);
                };
                handshake.extend_from_slice(fragment);
                rest = &rest[5 + len..];
            }
            _ => return Ok(None),
        }
        if let [kind, a, b, c, ..] = handshake[..] {
            if kind != HANDSHAKE_CLIENT_HELLO {
                return Err(Malformed);
            }
            let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            if handshake.len() >= 4 + len {
                handshake.truncate(4 + len);
                handshake.drain(..4);
                return Ok(Some(handshake));
            }
        }
    }
}

/// A bounds-checked cursor over TLS wire structures.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    fn vec16(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The `host_name` of the server_name extension of a ClientHello body (RFC 8446 4.1.2,
/// RFC 6066 3), checking every length on the way.
fn sni_of_client_hello(body: &[u8]) -> Result<Option<&[u8]>, Malformed> {
    let mut r = Reader(body);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    if r.vec8()?.len() > 32 {
        return Err(Malformed); // legacy_session_id
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(Malformed);
    }
    if r.vec8()?.is_empty() {
        return Err(Malformed); // legacy_compression_methods
    }
    if r.is_empty() {
        return Ok(None); // a pre-extensions ClientHello
    }
    let mut exts = Reader(r.vec16()?);
    if !r.is_empty() {
        return Err(Malformed);
    }
    let mut seen = Vec::new();
    let mut host = None;
    while !exts.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if seen.contains(&kind) {
            return Err(Malformed); // duplicate extension
        }
        seen.push(kind);
        if kind == EXT_SERVER_NAME {
            host = host_name_of_sni(data)?;
        }
    }
    Ok(host)
}

fn host_name_of_sni(data: &[u8]) -> Result<Option<&[u8]>, Malformed> {
    let mut outer = Reader(data);
    let mut list = Reader(outer.vec16()?);
    if !outer.is_empty() || list.is_empty() {
        return Err(Malformed);
    }
    let mut host = None;
    while !list.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind == SNI_HOST_NAME {
            if host.is_some() || name.is_empty() {
                return Err(Malformed);
            }
            host = Some(name);
        }
    }
    Ok(host)
}

/// More headers than any sane client sends; beyond it the request is not one we read.
const MAX_HTTP_HEADERS: usize = 128;

/// Finds the `Host` of an HTTP/1.x request head, port stripped. Two `Host` headers are
/// ambiguous and count as none.
pub fn parse_http_host(buf: &[u8]) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HTTP_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Parse::NeedMore,
        Ok(httparse::Status::Complete(_)) => {
            let mut hosts = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"));
            match (hosts.next(), hosts.next()) {
                (Some(h), None) => {
                    let value = String::from_utf8_lossy(h.value);
                    Parse::Found(strip_port(value.trim_matches([' ', '\t'])).to_owned())
                }
                _ => Parse::Absent,
            }
        }
        Err(_) => Parse::NotThisProtocol,
    }
}

/// `name:port` → `name`, `[v6]:port` → `v6`. Anything else is returned whole, so a
/// malformed value fails validation instead of being silently repaired.
fn strip_port(v: &str) -> &str {
    let is_port = |p: &str| p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = v.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((inner, "")) => inner,
            Some((inner, after)) if after.strip_prefix(':').is_some_and(is_port) => inner,
            _ => v,
        };
    }
    match v.split_once(':') {
        Some((name, port)) if is_port(port) => name,
        _ => v,
    }
}

/// What [`peek_host`] read and learned. `bytes` must be sent to the target first, unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peeked {
    pub bytes: Vec<u8>,
    /// A validated, canonical host name (see [`validate_host`]).
    pub host: Option<String>,
    pub source: HostSource,
}

/// Reads the client's first bytes until a ClientHello or HTTP request head names its host
/// (or cannot), `cap` bytes were read, the client closed, or `deadline` passed. Bytes are
/// consumed, not peeked, so a ClientHello split over several segments still parses; the
/// caller replays [`Peeked::bytes`]. A client that waits for the server (SSH, SMTP…) sends
/// nothing and yields no host after `deadline`.
pub async fn peek_host<S>(stream: &mut S, deadline: Duration, cap: usize) -> io::Result<Peeked>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let until = tokio::time::Instant::now() + deadline;
    let mut bytes = Vec::with_capacity(cap.min(4096));
    let verdict = loop {
        if let Some(v) = verdict(&bytes) {
            break v;
        }
        if bytes.len() >= cap {
            debug!(cap, "no host name within the peek limit");
            break (None, HostSource::Ip);
        }
        let start = bytes.len();
        bytes.resize(cap, 0);
        let read = tokio::time::timeout_at(until, stream.read(&mut bytes[start..])).await;
        let n = match read {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e),
            Err(_elapsed) => {
                bytes.truncate(start);
                debug!(
                    read = start,
                    hop = "pod",
                    "no host name from the pod before the sniff deadline; going on by IP"
                );
                break (None, HostSource::Ip);
            }
        };
        bytes.truncate(start + n);
        if n == 0 {
            debug!(read = start, "client closed before naming a host");
            break (None, HostSource::Ip);
        }
    };
    let (host, source) = verdict;
    Ok(Peeked {
        bytes,
        host,
        source,
    })
}

/// `None`: keep reading. Otherwise the (validated) host and where it came from.
fn verdict(bytes: &[u8]) -> Option<(Option<String>, HostSource)> {
    let tls = parse_client_hello_sni(bytes);
    match tls {
        Parse::Found(raw) => return Some(validated(raw, HostSource::Sni)),
        Parse::Absent => return Some((None, HostSource::Ip)),
        Parse::NeedMore | Parse::NotThisProtocol => {}
    }
    match parse_http_host(bytes) {
        Parse::Found(raw) => Some(validated(raw, HostSource::Host)),
        Parse::Absent => Some((None, HostSource::Ip)),
        Parse::NeedMore => None,
        Parse::NotThisProtocol if tls == Parse::NeedMore => None,
        Parse::NotThisProtocol => Some((None, HostSource::Ip)),
    }
}

fn validated(raw: String, source: HostSource) -> (Option<String>, HostSource) {
    match validate_host(&raw) {
        Ok(host) => (Some(host), source),
        Err(e) => {
            debug!(%source, error = %e, "ignoring invalid host name");
            (None, HostSource::Ip)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, pki_types::ServerName};
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Genuine ClientHello bytes as rustls sends them for `name`.
    fn client_hello_with(name: &str, sni: bool) -> Vec<u8> {
        let mut config = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.enable_sni = sni;
        let name = ServerName::try_from(name.to_owned()).expect("server name");
        let mut conn = ClientConnection::new(Arc::new(config), name).expect("client connection");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("write_tls");
        out
    }

    fn client_hello(name: &str) -> Vec<u8> {
        client_hello_with(name, true)
    }

    /// Re-frames one-record hello bytes as two handshake records split at `at`.
    fn in_two_records(hello: &[u8], at: usize) -> Vec<u8> {
        let payload = &hello[5..];
        let mut out = Vec::new();
        for part in [&payload[..at], &payload[at..]] {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    #[test]
    fn finds_sni_in_a_real_client_hello() {
        let hello = client_hello("Api.Example.COM");
        // rustls lowercases nothing: the parser returns the raw name, validation canonicalizes.
        let Parse::Found(raw) = parse_client_hello_sni(&hello) else {
            panic!("no sni found")
        };
        assert_eq!(validate_host(&raw).unwrap(), "api.example.com");
        assert_eq!(parse_http_host(&hello), Parse::NotThisProtocol);
    }

    #[test]
    fn every_prefix_of_a_client_hello_needs_more() {
        let hello = client_hello("gw.example.net");
        for cut in 0..hello.len() {
            assert_eq!(
                parse_client_hello_sni(&hello[..cut]),
                Parse::NeedMore,
                "prefix of {cut} bytes"
            );
        }
        // Trailing bytes (the client's next flight) do not matter.
        let mut more = hello.clone();
        more.extend_from_slice(b"\x14\x03\x03\x00\x01\x01");
        assert_eq!(
            parse_client_hello_sni(&more),
            Parse::Found("gw.example.net".into())
        );
    }

    #[test]
    fn handshake_fragmented_over_records_is_reassembled() {
        let hello = client_hello("frag.example.org");
        let payload_len = hello.len() - 5;
        for at in [1, 3, 4, 40, payload_len / 2, payload_len - 1] {
            let two = in_two_records(&hello, at);
            assert_eq!(
                parse_client_hello_sni(&two),
                Parse::Found("frag.example.org".into()),
                "split at {at}"
            );
            for cut in 0..two.len() {
                assert_eq!(
                    parse_client_hello_sni(&two[..cut]),
                    Parse::NeedMore,
                    "split {at}, cut {cut}"
                );
            }
        }
    }

    #[test]
    fn hello_without_sni_is_absent() {
        assert_eq!(
            parse_client_hello_sni(&client_hello_with("no-sni.example", false)),
            Parse::Absent
        );
        // rustls never sends an IP address as SNI.
        assert_eq!(
            parse_client_hello_sni(&client_hello("203.0.113.9")),
            Parse::Absent
        );
    }

    #[test]
    fn corrupted_lengths_are_rejected_not_panicking() {
        let hello = client_hello("corrupt.example");
        for i in 0..hello.len() {
            for delta in [1u8, 0x80, 0xff] {
                let mut bad = hello.clone();
                bad[i] = bad[i].wrapping_add(delta);
                // Any verdict is fine; it must not panic, and a length change must not
                // produce a different name out of thin air.
                if let Parse::Found(name) = parse_client_hello_sni(&bad) {
                    assert_eq!(
                        name.chars().count(),
                        "corrupt.example".len(),
                        "byte {i}: {name:?}"
                    );
                }
            }
        }
        for garbage in [
            &b"SSH-2.0-OpenSSH_9.6\r\n"[..],
            b"\x16\x02",
            b"\x16\x03\x09",
            b"\x16\x03\x01\x00\x00",
        ] {
            assert_eq!(
                parse_client_hello_sni(garbage),
                Parse::NotThisProtocol,
                "{garbage:?}"
            );
        }
        // Not a ClientHello (a ServerHello, type 2) in a handshake record.
        assert_eq!(
            parse_client_hello_sni(b"\x16\x03\x03\x00\x04\x02\x00\x00\x00"),
            Parse::NotThisProtocol
        );
        // Oversized record length.
        assert_eq!(
            parse_client_hello_sni(b"\x16\x03\x01\x40\x01\x01"),
            Parse::NotThisProtocol
        );
    }

    #[test]
    fn truncated_handshake_inside_a_complete_record_waits() {
        let hello = client_hello("trunc.example");
        // A record that ends before the handshake does: more records may follow.
        let two = in_two_records(&hello, 100);
        let first_record = &two[..5 + 100];
        assert_eq!(parse_client_hello_sni(first_record), Parse::NeedMore);
        // ...but a non-handshake record in between is malformed.
        let mut bad = first_record.to_vec();
        bad.extend_from_slice(b"\x17\x03\x03\x00\x01\x00");
        assert_eq!(parse_client_hello_sni(&bad), Parse::NotThisProtocol);
    }

    #[test]
    fn http_host_variants() {
        let cases: &[(&[u8], Parse)] = &[
            (
                b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
                Parse::Found("example.com".into()),
            ),
            (
                b"GET / HTTP/1.1\r\nhOsT:   Example.com:8080  \r\n\r\n",
                Parse::Found("Example.com".into()),
            ),
            (
                b"POST /x HTTP/1.0\r\nUser-Agent: t\r\nHOST: [2001:db8::1]:8080\r\n\r\nbody",
                Parse::Found("2001:db8::1".into()),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: [2001:db8::1]\r\n\r\n",
                Parse::Found("2001:db8::1".into()),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: 198.51.100.7:80\r\n\r\n",
                Parse::Found("198.51.100.7".into()),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: foo.com:443garbage\r\n\r\n",
                Parse::Found("foo.com:443garbage".into()),
            ),
            (b"GET / HTTP/1.0\r\n\r\n", Parse::Absent),
            (
                b"GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n",
                Parse::Absent,
            ),
            (b"GET / HTTP/1.1\r\nHost: example.com\r\n", Parse::NeedMore),
            (b"GE", Parse::NeedMore),
            (b"", Parse::NeedMore),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Parse::NotThisProtocol),
            (b"SSH-2.0-OpenSSH_9.6\r\n", Parse::NotThisProtocol),
            (b"\x16\x03\x01", Parse::NotThisProtocol),
        ];
        for (input, want) in cases {
            assert_eq!(
                &parse_http_host(input),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn validation_table() {
        let ok = [
            ("example.com", "example.com"),
            ("Example.COM.", "example.com"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("_dmarc.example.com", "_dmarc.example.com"),
            ("localhost", "localhost"),
            ("198.51.100.7", "198.51.100.7"),
            ("2001:DB8::1", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("::ffff:203.0.113.5", "203.0.113.5"),
            ("a-b.c", "a-b.c"),
        ];
        for (input, want) in ok {
            assert_eq!(validate_host(input).as_deref(), Ok(want), "{input:?}");
        }
        let long_label = format!("{}.com", "x".repeat(64));
        let long_name = ["abcdefghi"; 26].join("."); // 259 bytes
        let bad = [
            "",
            ".",
            "a\r\nb",
            "a\nb",
            "a\0b",
            "a b",
            "exa mple.com",
            "a@b",
            "a/b",
            "a\\b",
            "a:b",
            "foo.com:443garbage",
            "example.com..",
            "..",
            "a..b",
            "-a.com",
            "a-.com",
            "bücher.example",
            "[2001:db8::1",
            "[example.com]",
            "127.1",
            "1.2.3.4.5",
            "010.0.0.1",
            "a.b%2f",
        ];
        for input in bad {
            assert!(validate_host(input).is_err(), "{input:?} must be rejected");
        }
        for input in ["x".repeat(300), long_label, long_name] {
            assert!(
                validate_host(&input).is_err(),
                "{} bytes must be rejected",
                input.len()
            );
        }
        assert!(validate_host(&format!("{}.com", "x".repeat(63))).is_ok());
        let e = validate_host("a\r\nb").unwrap_err();
        assert!(
            !e.to_string().contains('\n'),
            "error must escape control characters: {e}"
        );
    }

    #[test]
    fn authorities() {
        assert_eq!(authority("example.com", 443), "example.com:443");
        assert_eq!(authority("203.0.113.5", 80), "203.0.113.5:80");
        assert_eq!(authority("2001:db8::1", 443), "[2001:db8::1]:443");
        assert_eq!(authority("[2001:db8::1]", 8443), "[2001:db8::1]:8443");
        assert_eq!(authority("::ffff:198.51.100.1", 22), "198.51.100.1:22");
    }

    #[test]
    fn host_source_renders_lowercase() {
        assert_eq!(HostSource::Sni.to_string(), "sni");
        assert_eq!(
            serde_json::to_string(&[HostSource::Sni, HostSource::Host, HostSource::Ip]).unwrap(),
            r#"["sni","host","ip"]"#
        );
    }

    /// Feeds `chunks` with pauses, so the peeker sees them as separate reads.
    async fn peek_chunks(
        chunks: Vec<Vec<u8>>,
        close: bool,
        deadline: Duration,
        cap: usize,
    ) -> Peeked {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            for c in chunks {
                client.write_all(&c).await.expect("write");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if close {
                drop(client);
            } else {
                // Keep the connection open past the deadline, as a server-first client would.
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        let peeked = peek_host(&mut server, deadline, cap).await.expect("peek");
        writer.abort();
        peeked
    }

    #[tokio::test]
    async fn peek_reassembles_a_split_client_hello_and_returns_every_byte() {
        let hello = client_hello("split.example.com");
        let chunks = vec![
            hello[..3].to_vec(),
            hello[3..100].to_vec(),
            hello[100..].to_vec(),
        ];
        let p = peek_chunks(chunks, false, Duration::from_secs(5), 16 * 1024).await;
        assert_eq!(p.host.as_deref(), Some("split.example.com"));
        assert_eq!(p.source, HostSource::Sni);
        assert_eq!(p.bytes, hello);
    }

    #[tokio::test]
    async fn peek_http_host_and_invalid_hosts() {
        let req = b"GET / HTTP/1.1\r\nHost: Web.Example:8080\r\n\r\n".to_vec();
        let p = peek_chunks(
            vec![req[..10].to_vec(), req[10..].to_vec()],
            false,
            Duration::from_secs(5),
            4096,
        )
        .await;
        assert_eq!(
            (p.host.as_deref(), p.source),
            (Some("web.example"), HostSource::Host)
        );
        assert_eq!(p.bytes, req);

        let bad = b"GET / HTTP/1.1\r\nHost: evil@example.com\r\n\r\n".to_vec();
        let p = peek_chunks(vec![bad.clone()], false, Duration::from_secs(5), 4096).await;
        assert_eq!((p.host, p.source, p.bytes), (None, HostSource::Ip, bad));
    }

    #[tokio::test]
    async fn peek_gives_up_on_silence_cap_and_eof() {
        // Server-first protocol: nothing arrives.
        let p = peek_chunks(vec![], false, Duration::from_millis(50), 4096).await;
        assert_eq!((p.host, p.source, p.bytes.len()), (None, HostSource::Ip, 0));
        // Unknown client-first protocol.
        let p = peek_chunks(
            vec![b"\x00\x01binary".to_vec()],
            false,
            Duration::from_secs(5),
            4096,
        )
        .await;
        assert_eq!(
            (p.host, p.source, p.bytes),
            (None, HostSource::Ip, b"\x00\x01binary".to_vec())
        );
        // A ClientHello longer than the cap.
        let hello = client_hello("cap.example.com");
        let p = peek_chunks(vec![hello.clone()], false, Duration::from_secs(5), 64).await;
        assert_eq!(
            (p.host, p.source, p.bytes),
            (None, HostSource::Ip, hello[..64].to_vec())
        );
        // The client closes halfway through.
        let p = peek_chunks(
            vec![hello[..50].to_vec()],
            true,
            Duration::from_secs(5),
            4096,
        )
        .await;
        assert_eq!(
            (p.host, p.source, p.bytes),
            (None, HostSource::Ip, hello[..50].to_vec())
        );
        // An HTTP head that never ends before the deadline.
        let p = peek_chunks(
            vec![b"GET / HTTP/1.1\r\nHost: a.b\r\n".to_vec()],
            false,
            Duration::from_millis(50),
            4096,
        )
        .await;
        assert_eq!((p.host, p.source), (None, HostSource::Ip));
    }

    /// A pod that drips its ClientHello at a byte a second never holds the proxy past the
    /// sniff deadline: the peek ends at the deadline with what arrived, and the connection
    /// goes on by IP (the caller's plan), its bytes kept.
    #[tokio::test(start_paused = true)]
    async fn a_client_hello_dripped_a_byte_a_second_is_cut_at_the_deadline() {
        let hello = client_hello("drip.example.com");
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let sent = hello.clone();
        let dripper = tokio::spawn(async move {
            for b in sent {
                if client.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let started = tokio::time::Instant::now();
        let p = peek_host(&mut server, Duration::from_millis(2500), 16 * 1024)
            .await
            .expect("peek");
        // Paused clock: time moves only by the sleeps, so this is exact, not wall-clock.
        assert_eq!(started.elapsed(), Duration::from_millis(2500));
        assert_eq!((p.host, p.source), (None, HostSource::Ip));
        assert_eq!(p.bytes, hello[..3], "the three bytes that arrived are kept");
        dripper.abort();
    }

    #[tokio::test]
    async fn peek_works_on_a_tcp_stream() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hello = client_hello("tcp.example");
        let sent = hello.clone();
        let client = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(&sent).await.expect("write");
            s
        });
        let (mut server, _) = listener.accept().await.expect("accept");
        let p = peek_host(&mut server, Duration::from_secs(5), 16 * 1024)
            .await
            .expect("peek");
        assert_eq!(
            (p.host.as_deref(), p.source),
            (Some("tcp.example"), HostSource::Sni)
        );
        assert_eq!(p.bytes, hello);
        drop(client.await);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_client_hello_sni(&bytes);
            let _ = parse_http_host(&bytes);
            let _ = verdict(&bytes);
        }

        #[test]
        fn parsers_never_panic_on_tls_shaped_input(
            len in 0u16..600,
            body in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut bytes = vec![0x16, 0x03, 0x01];
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.push(0x01);
            bytes.extend_from_slice(&body);
            let _ = parse_client_hello_sni(&bytes);
        }

        #[test]
        fn validated_hosts_are_fixed_points(s in "[a-zA-Z0-9._:\\[\\]-]{0,40}") {
            if let Ok(v) = validate_host(&s) {
                prop_assert_eq!(validate_host(&v), Ok(v.clone()));
            }
        }
    }
}
