//! Entry points for the fuzz targets in `fuzz/` (and their regression tests): each runs one
//! real code path on fuzzer-chosen bytes without sockets or files. Not a stable API.
use std::{collections::VecDeque, io, pin::Pin, task::Poll, time::Duration};

use hyper::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

use crate::tunnel::{self, GatewaySession, H2Session, H2Windows, Timeouts, TunnelError};

/// A peer whose bytes arrive in the given pieces (each read returns at most one piece, and
/// less when the reader's buffer is smaller), then end of stream. Never pending.
struct Script(VecDeque<Vec<u8>>);

impl AsyncRead for Script {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(mut piece) = self.0.pop_front() {
            let n = piece.len().min(buf.remaining());
            buf.put_slice(&piece[..n]);
            if n < piece.len() {
                self.0.push_front(piece.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Reads an HTTP/1.1 CONNECT response (as both hops do) from a peer that sends `pieces`
/// and then closes. Returns the final status and the tunnel bytes read past the head.
pub fn connect_response(pieces: &[&[u8]]) -> Result<(u16, Vec<u8>), TunnelError> {
    let mut peer = Script(pieces.iter().map(|p| p.to_vec()).collect());
    futures::executor::block_on(tunnel::read_connect_response(tunnel::HOP_PROXY, &mut peer))
}

/// Opens an HTTP/2 session and one `CONNECT example.com:443` stream to a gateway that,
/// once the request is out, answers with `server` and then ends its side (whatever the
/// client sends is read and dropped). Returns the status and, on a 2xx, the stream's bytes read to its end (at most
/// 1 MiB). Every wait is bounded.
pub fn h2_connect(server: &[u8]) -> Result<(u16, Vec<u8>), TunnelError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    let server = server.to_vec();
    rt.block_on(async move {
        let (client, mut gateway) = tokio::io::duplex(64 << 10);
        let peer = tokio::spawn(async move {
            // The gateway answers once the request is out (a HEADERS frame after the
            // client's preface), as a real one would, and then reads to the end.
            let mut seen = Vec::new();
            let mut sink = [0u8; 4096];
            while !has_headers_frame(&seen) {
                match gateway.read(&mut sink).await {
                    Ok(n) if n > 0 => seen.extend_from_slice(&sink[..n]),
                    _ => break,
                }
            }
            let _ = gateway.write_all(&server).await;
            let _ = gateway.shutdown().await;
            while matches!(gateway.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let t = Timeouts {
            tls_handshake: Duration::from_secs(2),
            connect_response: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(5),
            ..Timeouts::default()
        };
        let session = GatewaySession::over(Box::new(client), true, H2Windows::default());
        let result = async {
            let h2 = H2Session::handshake(session, &t).await?;
            let request = tunnel::connect::ConnectRequest::new("example.com:443")
                .map_err(|e| tunnel::request_error(tunnel::HOP_GATEWAY, e))?;
            let mut up = h2.connect(&request, &t).await?;
            let status = up.hops.last().map_or(0, |h| h.status);
            let mut data = Vec::new();
            let mut tunnel = (&mut up).take(1 << 20);
            // The tunnel ends with the gateway's side; a broken stream ends it as well.
            let read = tunnel.read_to_end(&mut data);
            let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
            Ok((status, data))
        }
        .await;
        peer.abort();
        result
    })
}

/// Whether the client's bytes (connection preface, then frames) hold a HEADERS frame.
fn has_headers_frame(client: &[u8]) -> bool {
    const PREFACE: usize = 24;
    let mut at = PREFACE;
    while let Some(head) = client.get(at..at + 9) {
        if head[3] == 1 {
            return true;
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        at += 9 + len;
    }
    false
}

/// Proxy credentials from the text of a `--proxy-credentials-file`: `(user, password)`.
pub fn credentials(text: &str) -> Result<(String, String), &'static str> {
    tunnel::parse_credentials(text).map(|(user, pass)| (user, pass.expose().to_owned()))
}

/// The gateway bearer token from the text of a `--gateway-token-file`.
pub fn gateway_token(text: &str) -> Result<String, &'static str> {
    tunnel::parse_token(text).map(|t| t.expose().to_owned())
}

/// Whether a `POST` with this `Authorization` header value (`None`: no header) may change
/// state when the admin token file holds `token_file`.
pub fn admin_authorized(token_file: &[u8], authorization: Option<&[u8]>) -> bool {
    let mut headers = HeaderMap::new();
    if let Some(v) = authorization.and_then(|v| HeaderValue::from_bytes(v).ok()) {
        headers.insert(AUTHORIZATION, v);
    }
    // As `read_to_string` reads it: a file that is not UTF-8 cannot be read.
    let text = String::from_utf8(token_file.to_vec())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData));
    crate::admin::check_token(&headers, Some(text)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP/2 frame.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// The gateway's preface: empty SETTINGS, then the ack of the client's.
    fn preface() -> Vec<u8> {
        let mut p = frame(4, 0, 0, b"");
        p.extend(frame(4, 1, 0, b""));
        p
    }

    #[test]
    fn connect_response_is_the_same_however_it_is_cut() {
        let bytes = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nVia: p\r\n\r\ntunnel";
        let whole = connect_response(&[bytes]).expect("established");
        assert_eq!(whole, (200, b"tunnel".to_vec()));
        for at in 1..bytes.len() {
            let (a, b) = bytes.split_at(at);
            let (status, leftover) = connect_response(&[a, b]).expect("established");
            assert_eq!(status, 200);
            assert!(b"tunnel".starts_with(&leftover), "cut at {at}");
        }
        let refused = connect_response(&[b"HTTP/1.1 407 Auth\r\nContent-Length: 2\r\n\r\nno"]);
        assert_eq!(refused.err().and_then(|e| e.status()), Some(407));
        let closed = connect_response(&[b"HTTP/1.1 200 OK\r\n"]);
        assert_eq!(closed.err().map(|e| e.kind()), Some("closed"));
    }

    #[test]
    fn h2_connect_reads_status_and_tunnel_data() {
        let mut server = preface();
        server.extend(frame(1, 4, 1, &[0x88])); // HEADERS :status 200, END_HEADERS
        server.extend(frame(0, 0, 1, b"hello"));
        server.extend(frame(0, 1, 1, b"")); // END_STREAM
        assert_eq!(h2_connect(&server).expect("up"), (200, b"hello".to_vec()));

        let mut refused = preface();
        refused.extend(frame(1, 5, 1, b"\x48\x03407")); // literal :status 407
        assert_eq!(
            h2_connect(&refused).err().and_then(|e| e.status()),
            Some(407)
        );

        for junk in [&b""[..], b"HTTP/1.1 200 OK\r\n\r\n", &[0xff; 9]] {
            assert!(h2_connect(junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn secret_file_readers() {
        assert_eq!(
            credentials("user:p:ss\n"),
            Ok(("user".into(), "p:ss".into()))
        );
        assert!(credentials(":pass").is_err());
        assert_eq!(gateway_token(" t0ken\n"), Ok("t0ken".into()));
        assert!(gateway_token("two words").is_err());
        assert!(admin_authorized(b"s3cret\n", Some(b"Bearer s3cret")));
        assert!(!admin_authorized(b"s3cret\n", Some(b"Bearer s3cre")));
        assert!(!admin_authorized(b"s3cret\n", None));
        assert!(!admin_authorized(b"\xff", Some(b"Bearer \xff")));
        assert!(!admin_authorized(b" \n", Some(b"Bearer ")));
    }
}
