//! The CLI's side of the admin endpoint (`status`, `explain`): one blocking `GET` with hyper.
use std::{io, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, client::conn::http1, header};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::{net::TcpStream, time::timeout};

/// The endpoint is on loopback: a connect is answered at once or nobody listens.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// For the whole answer once connected.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// Refused, or no answer to the connect in time: the daemon is not running.
    #[error("nothing answers on {addr}: {source}")]
    Down {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("no complete answer from {addr} within {RESPONSE_TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
    /// Something answered, but not with HTTP/1.1.
    #[error("malformed HTTP response from the admin endpoint: {0}")]
    Malformed(#[source] hyper::Error),
    #[error("request to {addr} failed: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("{0:?} is not a request path")]
    Path(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
}

/// What one admin request brought back.
#[derive(Debug)]
pub enum Fetch<T> {
    Ok(T),
    /// 404: a daemon from before this endpoint existed.
    Missing,
    /// Nothing answers on the admin address.
    Down,
    /// It answered, but not with what we expected.
    Bad(String),
}

/// `GET path` on the admin endpoint with `connection: close`: the status and the body.
/// Blocking (it runs its own small runtime), so not for use inside async code.
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), GetError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(GetError::Runtime)?
        .block_on(request(addr, path))
}

async fn request(addr: SocketAddr, path: &str) -> Result<(u16, String), GetError> {
    let req = Request::get(path)
        .header(header::HOST, "localhost")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|_| GetError::Path(path.to_owned()))?;
    let stream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Err(_) => {
            let source = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
            return Err(GetError::Down { addr, source });
        }
        Ok(Err(source)) if source.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(GetError::Down { addr, source });
        }
        Ok(Err(source)) => return Err(GetError::Connect { addr, source }),
        Ok(Ok(s)) => s,
    };
    let exchange = async {
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        // Drives the connection; its errors reach `send_request` and the body.
        tokio::spawn(connection);
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    match timeout(RESPONSE_TIMEOUT, exchange).await {
        Err(_) => Err(GetError::Timeout { addr }),
        Ok(Err(e)) if e.is_parse() || e.is_incomplete_message() => Err(GetError::Malformed(e)),
        Ok(Err(source)) => Err(GetError::Http { addr, source }),
        Ok(Ok(answer)) => Ok(answer),
    }
}

/// `GET path` and parse the JSON body as `T`.
pub fn fetch_json<T: DeserializeOwned>(addr: SocketAddr, path: &str) -> Fetch<T> {
    match get(addr, path) {
        Err(GetError::Down { .. }) => Fetch::Down,
        Err(e) => Fetch::Bad(e.to_string()),
        Ok((404, _)) => Fetch::Missing,
        Ok((200, body)) => match serde_json::from_str(&body) {
            Ok(v) => Fetch::Ok(v),
            Err(e) => Fetch::Bad(format!("unexpected JSON from {path}: {e}")),
        },
        Ok((status, _)) => Fetch::Bad(format!("{path} answered {status}")),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Serves `raw` as the answer to one request and returns what [`get`] made of it.
    fn parse_response(raw: &'static [u8]) -> Option<(u16, String)> {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            s.write_all(raw).unwrap();
        });
        let answer = get(addr, "/workloads").ok();
        server.join().unwrap();
        answer
    }

    #[test]
    fn http_responses_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]";
        assert_eq!(parse_response(plain), Some((200, "[]".into())));
        let chunked =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n[{}\r\n1\r\n]\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Some((200, "[{}]".into())));
        assert_eq!(
            parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n").map(|r| r.0),
            Some(404)
        );
        assert_eq!(parse_response(b"garbage"), None);
    }

    #[test]
    fn garbage_is_malformed_and_a_closed_port_is_down() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = s.read(&mut [0u8; 1024]);
            s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").unwrap();
        });
        let r = get(addr, "/readyz");
        assert!(matches!(r, Err(GetError::Malformed(_))), "{r:?}");
        server.join().unwrap();
        assert!(matches!(get(addr, "/readyz"), Err(GetError::Down { .. })));
    }
}
