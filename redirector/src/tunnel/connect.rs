//! HTTP CONNECT without I/O: the one definition of the request each hop is sent, and the
//! reading of an HTTP/1.1 response head.
//!
//! The proxy sends these requests, `redirector explain` prints them (secrets redacted) and
//! `redirector check` sends the enterprise proxy's; all three build them here, so a header
//! added here shows up everywhere at once.
use bytes::Bytes;
use http_body_util::Empty;
use hyper::{
    Method, Request,
    header::{HeaderName, HeaderValue},
};

use super::{GatewayConfig, ProxyConfig, Secret, check_header};

/// Upper bound for a CONNECT response head (status line plus headers).
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Upper bound for the number of headers in a CONNECT response head.
pub const MAX_RESPONSE_HEADERS: usize = 64;

/// One header of a CONNECT request. Its value is a secret: it is never logged or printed,
/// only its visible `scheme` (`Basic`, `Bearer`) is.
#[derive(Clone)]
pub struct Header {
    pub name: String,
    pub scheme: Option<&'static str>,
    pub value: Secret,
}

impl Header {
    fn wire_value(&self) -> String {
        match self.scheme {
            Some(s) => format!("{s} {}", self.value.expose()),
            None => self.value.expose().to_owned(),
        }
    }
}

/// `CONNECT authority` and its headers, for HTTP/1.1 (request line, `Host`, headers) or as an
/// HTTP/2 CONNECT stream (`:authority` and the headers).
#[derive(Clone)]
pub struct ConnectRequest {
    authority: String,
    headers: Vec<Header>,
}

/// Why a request could not be built (the values themselves are never named).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("invalid target authority")]
    Authority,
    #[error("invalid extra header")]
    Header,
}

impl ConnectRequest {
    /// A bare request; `authority` must be `name:port`, `ip:port` or `[v6]:port`, so that no
    /// caller can inject request lines.
    pub fn new(authority: &str) -> Result<ConnectRequest, RequestError> {
        let ok = !authority.is_empty()
            && authority.len() <= 260
            && authority
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b));
        if !ok {
            return Err(RequestError::Authority);
        }
        Ok(ConnectRequest {
            authority: authority.to_owned(),
            headers: Vec::new(),
        })
    }

    /// The request to the enterprise proxy: Basic credentials when it has some.
    pub fn to_proxy(authority: &str, proxy: &ProxyConfig) -> Result<ConnectRequest, RequestError> {
        use base64::Engine as _;
        let mut r = ConnectRequest::new(authority)?;
        if let Some((user, pass)) = &proxy.credentials {
            let basic = base64::engine::general_purpose::STANDARD
                .encode(format!("{user}:{}", pass.expose()));
            r.headers.push(Header {
                name: "Proxy-Authorization".into(),
                scheme: Some("Basic"),
                value: Secret::new(basic),
            });
        }
        Ok(r)
    }

    /// The request inside the gateway session: the configured extra headers, then the bearer
    /// token (read by the caller from its file for each tunnel, so a rotated token applies to
    /// the next one).
    pub fn to_gateway(
        authority: &str,
        gw: &GatewayConfig,
        token: Option<Secret>,
    ) -> Result<ConnectRequest, RequestError> {
        let mut r = ConnectRequest::new(authority)?;
        for (name, value) in &gw.extra_headers {
            check_header(name, value).map_err(|_| RequestError::Header)?;
            r.headers.push(Header {
                name: name.clone(),
                scheme: None,
                value: Secret::new(value.as_str()),
            });
        }
        if let Some(token) = token {
            r.headers.push(Header {
                name: "Authorization".into(),
                scheme: Some("Bearer"),
                value: token,
            });
        }
        Ok(r)
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// The HTTP/1.1 bytes on the wire.
    pub fn encode_h1(&self) -> Vec<u8> {
        let a = &self.authority;
        let mut req = format!("CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n");
        for h in &self.headers {
            req.push_str(&h.name);
            req.push_str(": ");
            req.push_str(&h.wire_value());
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        req.into_bytes()
    }

    /// The HTTP/1.1 request head line by line, every header value as `<redacted>` (after its
    /// scheme): what `explain` prints.
    pub fn redacted_lines(&self) -> Vec<String> {
        let a = &self.authority;
        let mut out = vec![format!("CONNECT {a} HTTP/1.1"), format!("Host: {a}")];
        for h in &self.headers {
            out.push(match h.scheme {
                Some(s) => format!("{}: {s} <redacted>", h.name),
                None => format!("{}: <redacted>", h.name),
            });
        }
        out
    }

    /// The same request as an HTTP/2 CONNECT stream: `:method CONNECT` and `:authority` only
    /// (RFC 9113 §8.5). Header values are marked sensitive, so HPACK never puts them in its
    /// dynamic table.
    pub fn to_h2(&self) -> Result<Request<Empty<Bytes>>, RequestError> {
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(self.authority.as_str())
            .body(Empty::new())
            .map_err(|_| RequestError::Authority)?;
        for h in &self.headers {
            let name =
                HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| RequestError::Header)?;
            let mut value =
                HeaderValue::from_str(&h.wire_value()).map_err(|_| RequestError::Header)?;
            value.set_sensitive(true);
            request.headers_mut().append(name, value);
        }
        Ok(request)
    }
}

/// A complete response head: its length in the buffer, status and (sanitized) reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub reason: String,
}

/// Parses one response head at the start of `buf`: `Ok(None)` until it is complete.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, &'static str> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) => {
            let status = resp.code.ok_or("missing status code")?;
            if !(100..=599).contains(&status) {
                return Err("status code out of range");
            }
            // The reason phrase is the peer's text: keep it printable and short for logs.
            let reason = resp
                .reason
                .unwrap_or("")
                .chars()
                .map(|c| if c == '\t' { ' ' } else { c })
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(80)
                .collect();
            Ok(Some(ResponseHead {
                len,
                status,
                reason,
            }))
        }
        Err(httparse::Error::Version) => Err("not an HTTP/1.x status line"),
        Err(httparse::Error::TooManyHeaders) => Err("more than 64 headers"),
        Err(httparse::Error::Status) => Err("invalid status code"),
        Err(_) => Err("invalid header or line ending"),
    }
}

/// What the bytes read so far say about a CONNECT exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// Read more (the head is not complete yet).
    Incomplete,
    /// A final 2xx: the tunnel is up; bytes from `head.len` on belong to it.
    Established(ResponseHead),
    /// A final non-2xx.
    Refused(ResponseHead),
}

/// Reads the CONNECT response at the start of `buf`, dropping interim 1xx heads (except 101)
/// from it as they complete.
pub fn read_response(buf: &mut Vec<u8>) -> Result<Response, &'static str> {
    loop {
        match parse_response_head(buf)? {
            Some(head) if (100..200).contains(&head.status) && head.status != 101 => {
                buf.drain(..head.len);
            }
            // RFC 9110 9.3.6: a 2xx to CONNECT has no content; whatever follows is tunnel data.
            Some(head) if (200..300).contains(&head.status) => {
                return Ok(Response::Established(head));
            }
            Some(head) => return Ok(Response::Refused(head)),
            None if buf.len() >= MAX_RESPONSE_HEAD => {
                return Err("response head larger than 16 KiB");
            }
            None => return Ok(Response::Incomplete),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_and_their_redacted_lines() {
        let mut r = ConnectRequest::new("kv1.vault.azure.test:443").expect("authority");
        r.headers.push(Header {
            name: "Proxy-Authorization".into(),
            scheme: Some("Basic"),
            value: Secret::new("dTpw"),
        });
        r.headers.push(Header {
            name: "X-Tenant".into(),
            scheme: None,
            value: Secret::new("t1"),
        });
        assert_eq!(
            String::from_utf8(r.encode_h1()).expect("utf-8"),
            "CONNECT kv1.vault.azure.test:443 HTTP/1.1\r\nHost: kv1.vault.azure.test:443\r\n\
             Proxy-Authorization: Basic dTpw\r\nX-Tenant: t1\r\n\r\n"
        );
        assert_eq!(
            r.redacted_lines(),
            vec![
                "CONNECT kv1.vault.azure.test:443 HTTP/1.1",
                "Host: kv1.vault.azure.test:443",
                "Proxy-Authorization: Basic <redacted>",
                "X-Tenant: <redacted>",
            ]
        );
        let h2 = r.to_h2().expect("h2");
        assert_eq!(h2.method(), Method::CONNECT);
        assert!(h2.headers().values().all(HeaderValue::is_sensitive));
    }

    #[test]
    fn connect_request_has_authority_only_and_sensitive_headers() {
        let mut r = ConnectRequest::new("kv1.vault.azure.test:443").expect("authority");
        r.headers.push(Header {
            name: "Authorization".into(),
            scheme: Some("Bearer"),
            value: Secret::new("t0ken"),
        });
        let r = r.to_h2().expect("request");
        assert_eq!(r.method(), Method::CONNECT);
        assert_eq!(
            r.uri().authority().map(|a| a.as_str()),
            Some("kv1.vault.azure.test:443")
        );
        assert!(r.uri().scheme().is_none() && r.uri().path_and_query().is_none());
        let v = r.headers().get("authorization").expect("header");
        assert!(v.is_sensitive());
        assert_eq!(v.to_str().ok(), Some("Bearer t0ken"));
    }

    #[test]
    fn bad_authority_or_header_is_a_request_error() {
        let kind = |e| super::super::request_error("gateway", e).kind();
        let e = ConnectRequest::new("exa mple:443").err().expect("refused");
        assert_eq!(kind(e), "bad_request");
        for (name, value) in [("Bad Name", "v"), ("X-A", "a\nb")] {
            let mut r = ConnectRequest::new("example:443").expect("authority");
            r.headers.push(Header {
                name: name.into(),
                scheme: None,
                value: Secret::new(value),
            });
            let e = r.to_h2().expect_err("refused");
            assert_eq!(kind(e), "bad_request");
        }
    }

    #[test]
    fn authorities_that_could_inject_lines_are_refused() {
        for bad in [
            "",
            "a b:443",
            "a:443\r\nX: y",
            "a/b:443",
            "a".repeat(261).as_str(),
        ] {
            assert_eq!(
                ConnectRequest::new(bad).err(),
                Some(RequestError::Authority),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn responses() {
        let mut b = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\ntunnel".to_vec();
        match read_response(&mut b) {
            Ok(Response::Established(h)) => {
                assert_eq!(h.status, 200);
                assert_eq!(&b[h.len..], b"tunnel");
            }
            other => panic!("{other:?}"),
        }
        let mut b = b"HTTP/1.1 407 Proxy Auth\tRequired\r\n\r\n".to_vec();
        assert_eq!(
            read_response(&mut b),
            Ok(Response::Refused(ResponseHead {
                len: b.len(),
                status: 407,
                reason: "Proxy Auth Required".into()
            }))
        );
        let mut b = b"HTTP/1.1 200 OK\r\nX: y".to_vec();
        assert_eq!(read_response(&mut b), Ok(Response::Incomplete));
        let mut b = vec![b'a'; MAX_RESPONSE_HEAD];
        assert!(read_response(&mut b).is_err());
        let mut b = b"SSH-2.0-x\r\n\r\n".to_vec();
        assert!(read_response(&mut b).is_err());
    }
}
