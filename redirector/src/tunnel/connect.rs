//! HTTP CONNECT without I/O: the one definition of the request each hop is sent, and the
//! reading of an HTTP/1.1 response head.
//!
//! The proxy sends these requests, `redirector explain` prints them (secrets redacted) and
//! `redirector check` sends the enterprise proxy's; all three build them here, so a header
//! added here shows up everywhere at once.
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
    /// A bare request; `authority` must be `name:port`, `ip:port` or `[v6]:port` (port
    /// 1-65535), so that no caller can inject request lines and every HTTP parser reads the
    /// same authority.
    pub fn new(authority: &str) -> Result<ConnectRequest, RequestError> {
        if !valid_authority(authority) {
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
    pub fn to_h2(&self) -> Result<Request<()>, RequestError> {
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(self.authority.as_str())
            .body(())
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

/// `host:port` as a CONNECT request target (RFC 9110 §9.3.6): a name or IPv4 address without
/// `:`, `[`, `]`, or a bracketed IPv6 address; a decimal port 1-65535.
fn valid_authority(authority: &str) -> bool {
    let charset = authority
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b));
    if authority.is_empty() || authority.len() > 260 || !charset {
        return false;
    }
    let Some((host, port)) = authority.rsplit_once(':') else {
        return false;
    };
    let port_ok = (1..=5).contains(&port.len())
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !host.is_empty() && !host.contains([':', '[', ']']),
    };
    port_ok && host_ok
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
            // Found by the differential test: accepted, then refused by hyper's parser.
            "]",
            "a",
            "a:",
            ":443",
            "a:b:443",
            "::1:443",
            "[::1]",
            "[::1]:",
            "[a]:443",
            "a]:443",
            "[::1]x:443",
            "a:0",
            "a:65536",
            "a:+443",
            "a:000443",
        ] {
            assert_eq!(
                ConnectRequest::new(bad).err(),
                Some(RequestError::Authority),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn authorities_of_every_form_are_accepted() {
        for good in [
            "example.com:443",
            "a:1",
            "a:65535",
            "203.0.113.7:443",
            "[2001:db8::1]:443",
            "[::ffff:192.0.2.1]:8443",
            "under_score.example.:443",
        ] {
            assert!(ConnectRequest::new(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn header_values_with_surrounding_whitespace_are_refused() {
        // Found by the differential test: HTTP/1.1 parsers drop a value's leading and
        // trailing whitespace, so the gateway would get another value than configured
        // (and HTTP/2 would send it as is).
        let tls = std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        );
        let mut gw = GatewayConfig::from_url("https://gw.test", tls).expect("gateway");
        for value in ["v\t", " v", "\tv", "v ", " "] {
            gw.extra_headers = vec![("X-A".into(), value.into())];
            assert_eq!(
                ConnectRequest::to_gateway("a:443", &gw, None).err(),
                Some(RequestError::Header),
                "{value:?}"
            );
        }
        for value in ["", "v", "a b\tc"] {
            gw.extra_headers = vec![("X-A".into(), value.into())];
            assert!(
                ConnectRequest::to_gateway("a:443", &gw, None).is_ok(),
                "{value:?}"
            );
        }
        // From the command line or the file the value is trimmed first, as before.
        assert_eq!(
            super::super::parse_header("X-A:  v \t"),
            Ok(("X-A".to_owned(), "v".to_owned()))
        );
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

/// Every CONNECT request we emit, read back by two parsers that are not ours: `httparse`
/// directly and hyper's HTTP/1 server. Both must see the method, the authority and the
/// headers (names case-insensitively, values byte for byte) that the request holds.
#[cfg(test)]
mod differential {
    use std::{net::IpAddr, sync::Arc};

    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper::{Response, service::service_fn};
    use hyper_util::rt::TokioIo;
    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::tunnel::{GatewayConfig, ProxyConfig};

    /// A request as a parser saw it; header names lowercased, same-name values in order.
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        method: String,
        authority: String,
        headers: Vec<(String, Vec<u8>)>,
    }

    fn sorted(mut headers: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
        // Stable: values of one name keep their order.
        headers.sort_by(|a, b| a.0.cmp(&b.0));
        headers
    }

    fn expected(r: &ConnectRequest) -> Seen {
        let mut headers = vec![("host".to_owned(), r.authority().as_bytes().to_vec())];
        headers.extend(
            r.headers()
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.wire_value().into_bytes())),
        );
        Seen {
            method: "CONNECT".into(),
            authority: r.authority().to_owned(),
            headers: sorted(headers),
        }
    }

    fn with_httparse(bytes: &[u8]) -> Seen {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let n = match req.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("httparse: {other:?}"),
        };
        assert_eq!(n, bytes.len(), "httparse: bytes after the head");
        assert_eq!(req.version, Some(1), "httparse: HTTP/1.1");
        Seen {
            method: req.method.expect("method").to_owned(),
            authority: req.path.expect("request target").to_owned(),
            headers: sorted(
                req.headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                    .collect(),
            ),
        }
    }

    async fn with_hyper(bytes: &[u8]) -> Seen {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let serve = hyper::server::conn::http1::Builder::new().serve_connection(
            TokioIo::new(server),
            service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let headers = req
                    .headers()
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                    .collect::<Vec<_>>();
                let _ = tx.send(Seen {
                    method: req.method().as_str().to_owned(),
                    authority: req
                        .uri()
                        .authority()
                        .map(|a| a.as_str().to_owned())
                        .unwrap_or_default(),
                    headers: sorted(headers),
                });
                async { Ok::<_, hyper::Error>(Response::new(Empty::<Bytes>::new())) }
            }),
        );
        client.write_all(bytes).await.expect("write");
        client.shutdown().await.expect("half-close");
        // The connection ends after the response (the client sent EOF).
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), serve)
            .await
            .expect("hyper answered");
        let seen = rx.try_recv();
        assert!(
            rx.try_recv().is_err(),
            "hyper saw more than one request ({result:?})"
        );
        seen.unwrap_or_else(|_| panic!("hyper refused the request: {result:?}"))
    }

    async fn check(r: &ConnectRequest) {
        let bytes = r.encode_h1();
        let want = expected(r);
        assert_eq!(with_httparse(&bytes), want, "httparse");
        assert_eq!(with_hyper(&bytes).await, want, "hyper");
    }

    fn tls() -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
    }

    fn proxy(credentials: Option<(&str, &str)>) -> ProxyConfig {
        let mut p = ProxyConfig::new("http://proxy.test:3128".parse().expect("url"), None);
        p.credentials = credentials.map(|(u, pw)| (u.to_owned(), Secret::new(pw)));
        p
    }

    fn gateway(headers: &[(&str, &str)]) -> GatewayConfig {
        let mut g = GatewayConfig::from_url("https://gw.test", tls()).expect("gateway");
        g.extra_headers = headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        g
    }

    /// Every way an authority is made: names, IPv4, IPv6 (bracketed), ports at the edges.
    fn authorities() -> Vec<String> {
        let mut out: Vec<String> = [
            "example.com:443",
            "a:1",
            "kv1.vault.azure.test:65535",
            "xn--bcher-kva.example:443",
            "under_score.example:8443",
            "trailing.dot.example.:443",
            "203.0.113.10:443",
            "0.0.0.0:80",
            "[2001:db8::1]:443",
            "[::1]:8443",
            "[fe80::1]:443",
        ]
        .map(String::from)
        .to_vec();
        out.push(format!("{}:443", vec!["a".repeat(63); 4].join(".")));
        for ip in [
            "2001:db8:0:0:0:0:0:1",
            "::ffff:192.0.2.1",
            "255.255.255.255",
        ] {
            out.push(crate::addr::authority(ip, 443));
        }
        out
    }

    #[tokio::test]
    async fn every_request_form_parses_the_same_everywhere() {
        let headers: &[(&str, &str)] = &[
            ("X-Tenant", "t1"),
            ("x-lower", "v"),
            ("X-Dup", "one"),
            ("X-Dup", "two"),
            ("X-Spaces", "a  b\tc"),
            ("X-Utf8", "caf\u{e9} \u{2603}"),
            ("X-Empty", ""),
            ("X-Token-Chars", "!#$%&'*+-.^_`|~"),
        ];
        for a in authorities() {
            check(&ConnectRequest::new(&a).expect("authority")).await;
            for creds in [
                None,
                Some(("user", "pass")),
                Some(("u", "p:with:colons")),
                Some(("\u{fc}ser", "p\u{e4}ss w\u{f6}rd")),
            ] {
                check(&ConnectRequest::to_proxy(&a, &proxy(creds)).expect("to_proxy")).await;
            }
            for token in [None, Some("t0ken"), Some("eyJ.a-b_c~d+e/f=")] {
                let token = token.map(Secret::new);
                let r = ConnectRequest::to_gateway(&a, &gateway(headers), token).expect("gw");
                check(&r).await;
                let r = ConnectRequest::to_gateway(&a, &gateway(&[]), None).expect("gw");
                check(&r).await;
            }
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever `ConnectRequest::new` accepts is one authority to both parsers.
        #[test]
        fn accepted_authorities_parse_the_same(a in "[a-zA-Z0-9._:\\[\\]-]{1,40}") {
            if let Ok(r) = ConnectRequest::new(&a) {
                runtime().block_on(check(&r));
            }
        }

        #[test]
        fn generated_requests_parse_the_same(
            name in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,3}",
            ip in any::<[u8; 16]>(),
            port in 1u16..,
            user in "[^:\\p{C}]{1,12}",
            pass in "\\PC{0,24}",
            header_name in "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}",
            header_value in "[ -~\\t\u{80}-\u{10ffff}]{0,32}",
            token in "[!-~]{1,40}",
        ) {
            let rt = runtime();
            let v6 = IpAddr::from(ip).to_string();
            for a in [format!("{name}:{port}"), crate::addr::authority(&v6, port)] {
                let r = ConnectRequest::to_proxy(&a, &proxy(Some((&user, &pass)))).expect("proxy");
                rt.block_on(check(&r));
                let gw = gateway(&[(&header_name, &header_value)]);
                match ConnectRequest::to_gateway(&a, &gw, Some(Secret::new(token.as_str()))) {
                    Ok(r) => rt.block_on(check(&r)),
                    // Names we set ourselves are refused, not sent.
                    Err(e) => prop_assert_eq!(e, RequestError::Header),
                }
            }
        }
    }
}
