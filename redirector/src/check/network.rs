//! The network path: the enterprise proxy (TCP, TLS, CONNECT) and reaching the gateway.
use std::{path::Path, sync::Arc};

use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};
use tokio_rustls::TlsConnector;

use super::{
    Check,
    gateway_tls::{self, TrustStores, cert_facts, judge_gateway},
};
use crate::{
    config::Config,
    plan::{self, HopPlan},
    tunnel::{GatewayConfig, Io, ProxyConfig, ProxyScheme, Timeouts, connect},
};

/// The `proxy` lines, then the `gateway` and `tls interception` lines.
pub(super) async fn checks(config: &Config, extra_ca: Option<&Path>) -> Vec<Check> {
    let t = config.tunnel.timeouts;
    let gateway = config.tunnel.gateway.as_ref();
    let mut checks = Vec::new();
    let mut gw_stream: Option<Box<dyn Io>> = None;
    let mut proxy_issuer = None;
    let mut proxies: Vec<&ProxyConfig> = config.tunnel.proxy.iter().collect();
    if let Some(p) = config.tunnel_http.as_ref().and_then(|h| h.proxy.as_ref()) {
        proxies.push(p);
    }
    if proxies.is_empty() {
        checks.push(Check::ok(
            "proxy",
            "no enterprise proxy configured: the gateway and direct routes connect straight out",
        ));
    }
    for (i, p) in proxies.iter().enumerate() {
        let probe = check_proxy(p, gateway, &t).await;
        checks.push(probe.check);
        if i == 0 {
            // The first is the one the gateway hop goes through.
            gw_stream = probe.tunnel;
            proxy_issuer = probe.issuer;
        }
    }
    let Some(gw) = gateway else {
        checks.push(Check::ok(
            "gateway",
            "no --gateway-url configured: nothing to check",
        ));
        return checks;
    };
    let name = "gateway";
    let stream: Box<dyn Io> = match (&config.tunnel.proxy, gw_stream) {
        (Some(_), Some(s)) => s,
        (Some(p), None) => {
            checks.push(Check::fail(
                name,
                format!(
                    "{} not reached: the enterprise proxy {} did not open a tunnel to it",
                    gw.authority(),
                    p.url
                ),
                vec!["fix the proxy check above first".into()],
            ));
            checks.push(Check::warn(
                "tls interception",
                format!("not checked: no TLS session with {}", gw.server_name),
                Vec::new(),
            ));
            return checks;
        }
        (None, _) => match tcp(&gw.addr_host, gw.port, &t).await {
            Ok(s) => Box::new(s),
            Err(e) => {
                checks.push(Check::fail(name, format!("cannot connect to {}: {e}", gw.authority()), vec![
                    "check --gateway-url (and --gateway-connect-to) and that this node may reach the gateway through its firewall".into(),
                ]));
                checks.push(Check::warn(
                    "tls interception",
                    format!("not checked: no TLS session with {}", gw.server_name),
                    Vec::new(),
                ));
                return checks;
            }
        },
    };
    let via = match &config.tunnel.proxy {
        Some(p) => format!(" through {}", p.url),
        None => String::new(),
    };
    let trust = TrustStores::load(extra_ca);
    let probe = gateway_tls::handshake(gw, stream, &trust, &t).await;
    checks.extend(judge_gateway(
        gw,
        &via,
        &probe,
        proxy_issuer.as_deref(),
        extra_ca.is_some(),
    ));
    checks
}

async fn tcp(host: &str, port: u16, t: &Timeouts) -> Result<TcpStream, String> {
    match timeout(t.connect, TcpStream::connect((host, port))).await {
        Err(_) => Err(format!("timed out after {:?}", t.connect)),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(s)) => Ok(s),
    }
}

struct ProxyProbe {
    check: Check,
    /// The tunnel to the gateway, when the proxy opened one.
    tunnel: Option<Box<dyn Io>>,
    /// Issuer of the proxy's own certificate (https:// proxies).
    issuer: Option<String>,
}

async fn check_proxy(p: &ProxyConfig, gateway: Option<&GatewayConfig>, t: &Timeouts) -> ProxyProbe {
    let name = format!("proxy {}", p.url);
    let fail = |detail: String, fix: Vec<String>| ProxyProbe {
        check: Check::fail(name.clone(), detail, fix),
        tunnel: None,
        issuer: None,
    };
    let tcp = match tcp(&p.url.host, p.url.port, t).await {
        Ok(s) => s,
        Err(e) => {
            return fail(format!("cannot connect to {}: {e}", p.url.authority()), vec![
                "check the host and port in --proxy-https / --proxy-http and that this node may reach the proxy".into(),
            ]);
        }
    };
    let mut issuer = None;
    let mut stream: Box<dyn Io> = match (p.url.scheme, &p.tls) {
        (ProxyScheme::Http, _) => Box::new(tcp),
        (ProxyScheme::Https, None) => {
            return fail(
                "an https:// proxy without a TLS configuration".into(),
                Vec::new(),
            );
        }
        (ProxyScheme::Https, Some(tls)) => {
            let Ok(sni) = ServerName::try_from(p.url.host.clone()) else {
                return fail(
                    format!("{} is not a valid TLS server name", p.url.host),
                    Vec::new(),
                );
            };
            match timeout(t.tls_handshake, TlsConnector::from(Arc::clone(tls)).connect(sni, tcp)).await {
                Err(_) => return fail(format!("no TLS answer within {:?}", t.tls_handshake), vec!["is it an https:// proxy? use http:// in the proxy URL if it speaks plain HTTP".into()]),
                Ok(Err(e)) => {
                    let reason = crate::tls::refusal_reason(&e).map(|r| format!("{r}: ")).unwrap_or_default();
                    return fail(format!("TLS with the proxy failed: {reason}{e}"), vec![
                        "pass the proxy's CA with --proxy-ca (it is trusted for the proxy only)".into(),
                        "or use http:// in the proxy URL if it speaks plain HTTP".into(),
                    ]);
                }
                Ok(Ok(s)) => {
                    issuer = s.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| cert_facts(c)).map(|f| f.issuer_cn);
                    Box::new(s)
                }
            }
        }
    };
    let creds = if p.credentials.is_some() {
        "credentials accepted"
    } else {
        "no credentials needed"
    };
    let Some(gw) = gateway else {
        let detail = match p.credentials {
            Some(_) => format!(
                "{} reachable; credentials not verified (no gateway to CONNECT to)",
                p.url.authority()
            ),
            None => format!("{} reachable", p.url.authority()),
        };
        return ProxyProbe {
            check: Check::ok(name, detail),
            tunnel: None,
            issuer,
        };
    };
    let authority = gw.authority();
    let hop = match plan::proxy_hop(p, &authority) {
        Ok(hop) => hop,
        Err(e) => return fail(format!("cannot build CONNECT {authority}: {e}"), Vec::new()),
    };
    match timeout(t.connect_response, connect(&mut stream, &hop)).await {
        Err(_) => fail(
            format!(
                "no answer to CONNECT {authority} within {:?}",
                t.connect_response
            ),
            vec!["check that this is an HTTP proxy that supports CONNECT".into()],
        ),
        Ok(Err(e)) => fail(
            format!("CONNECT {authority} failed: {e}"),
            vec!["check that this is an HTTP proxy that supports CONNECT".into()],
        ),
        Ok(Ok((status, reason))) => match status {
            200..=299 => ProxyProbe {
                check: Check::ok(
                    name,
                    format!("CONNECT {authority} answered {status} ({creds})"),
                ),
                tunnel: Some(stream),
                issuer,
            },
            407 => {
                let fix = match &p.credentials {
                    Some(_) => {
                        "the proxy rejected the credentials: check the user and password in the proxy URL or in its credentials file (--proxy-https-credentials-file, --proxy-http-credentials-file or --proxy-credentials-file)"
                    }
                    None => {
                        "the proxy requires authentication: put user:password in the proxy URL or use --proxy-credentials-file"
                    }
                };
                fail(
                    format!("CONNECT {authority} answered 407 {reason}"),
                    vec![fix.into()],
                )
            }
            403 => fail(
                format!(
                    "CONNECT {authority} answered 403 {reason}: the proxy does not allow the gateway"
                ),
                vec![format!(
                    "ask the proxy administrators to allow CONNECT to {authority} (with long-lived connections)"
                )],
            ),
            _ => fail(
                format!("CONNECT {authority} answered {status} {reason}"),
                vec![format!(
                    "check the proxy's log for {authority}; the gateway name must resolve and be reachable from the proxy"
                )],
            ),
        },
    }
}

/// Sends hop 0 of a gateway tunnel's plan (`CONNECT` the gateway through the proxy, with
/// Basic credentials when configured: the request the proxy itself sends) and reads the
/// final response head. Returns status and reason.
async fn connect(stream: &mut Box<dyn Io>, hop: &HopPlan) -> std::io::Result<(u16, String)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let request = hop
        .request
        .as_ref()
        .ok_or_else(|| bad("no request to send"))?;
    stream.write_all(&request.encode_h1()).await?;
    stream.flush().await?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        match connect::read_response(&mut buf).map_err(bad)? {
            connect::Response::Established(h) | connect::Response::Refused(h) => {
                return Ok((h.status, h.reason));
            }
            connect::Response::Incomplete => {}
        }
        let mut chunk = [0u8; 1024];
        // One byte at a time past the head would be slow; a proxy sends nothing after a 2xx
        // head until we speak TLS, so reading in chunks cannot eat tunnel bytes.
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("the proxy closed the connection before answering"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        check::{Level, Report, find, render_text},
        config::Settings,
    };
    use test_pki::TestCa;
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    /// A TLS server for `name` with a leaf from `ca`; answers one handshake.
    async fn tls_server(ca: &TestCa, name: &str) -> std::net::SocketAddr {
        let cfg = ca
            .issue(&[name])
            .server_config_with(crate::tls::provider(), &[]);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(cfg);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let a = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = a.accept(s).await {
                        let _ = tls.read(&mut [0u8; 16]).await;
                    }
                });
            }
        });
        addr
    }

    fn settings_for(addr: std::net::SocketAddr, ca_file: Option<&Path>) -> Settings {
        Settings {
            gateway_url: Some(format!("https://gw.arc.test:{}", addr.port())),
            gateway_connect_to: Some("127.0.0.1".into()),
            gateway_ca: ca_file.map(Path::to_owned),
            pin_root: Some("/tmp/rdr-check-unit/pins".into()),
            cgroup_root: Some("/tmp".into()),
            connect_timeout: Some(2.0),
            tls_timeout: Some(2.0),
            ..Default::default()
        }
    }

    async fn run_network(s: &Settings) -> Vec<Check> {
        let config = Config::build(s.clone()).unwrap();
        checks(&config, s.gateway_ca.as_deref()).await
    }

    #[tokio::test]
    async fn gateway_trusted_through_gateway_ca_is_ok_with_a_note() {
        let ca = TestCa::temp("lab gateway ca");
        let ca_file = ca.write_ca(ca.dir());
        let addr = tls_server(&ca, "gw.arc.test").await;
        let checks = run_network(&settings_for(addr, Some(&ca_file))).await;
        let gw = find(&checks, "gateway");
        assert_eq!(gw.level, Level::Ok, "{gw:?}");
        assert!(
            gw.detail.contains("\"lab gateway ca\"") && gw.detail.contains("--gateway-ca"),
            "{gw:?}"
        );
        let tls = find(&checks, "tls interception");
        assert_eq!(tls.level, Level::Warn, "{tls:?}");
    }

    #[tokio::test]
    async fn untrusted_gateway_fails_with_the_verifier_error_and_the_gateway_ca_fix() {
        let trusted = TestCa::temp("lab gateway ca");
        let ca_file = trusted.write_ca(trusted.dir());
        let addr = tls_server(&TestCa::temp("someone else"), "gw.arc.test").await;
        let checks = run_network(&settings_for(addr, Some(&ca_file))).await;
        let gw = find(&checks, "gateway");
        assert_eq!(gw.level, Level::Fail, "{gw:?}");
        assert!(
            gw.detail
                .contains("certificate issued by a CA not trusted for this hop")
                && gw.detail.contains("UnknownIssuer")
                && gw.detail.contains("\"someone else\""),
            "{gw:?}"
        );
        assert!(
            gw.fix[0].contains("pass the gateway's CA with --gateway-ca"),
            "{gw:?}"
        );
        // A certificate for another name: check the URL.
        let addr = tls_server(&trusted, "other.example").await;
        let checks = run_network(&settings_for(addr, Some(&ca_file))).await;
        let gw = find(&checks, "gateway");
        assert!(
            gw.level == Level::Fail
                && gw.fix[0].contains("check --gateway-url")
                && gw.fix[0].contains("other.example"),
            "{gw:?}"
        );
    }

    #[tokio::test]
    async fn nothing_listening_is_a_clear_failure() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let checks = run_network(&settings_for(addr, None)).await;
        let gw = find(&checks, "gateway");
        assert_eq!(gw.level, Level::Fail);
        assert!(
            gw.detail.contains("cannot connect") && gw.fix[0].contains("--gateway-url"),
            "{gw:?}"
        );
    }

    /// A proxy that answers every CONNECT with `status` and records the request.
    async fn fake_proxy(status: &'static str) -> (std::net::SocketAddr, Arc<Mutex<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(String::new()));
        let s2 = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                s2.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn proxy_407_names_the_credentials_and_never_prints_them() {
        let (addr, seen) = fake_proxy("407 Proxy Authentication Required").await;
        let mut s = settings_for(addr, None);
        s.proxy_https = Some(format!("http://agent:Pw-sekrit@{addr}"));
        s.proxy_allow_basic_over_http = Some(true);
        let checks = run_network(&s).await;
        let p = checks
            .iter()
            .find(|c| c.name.starts_with("proxy "))
            .unwrap();
        assert_eq!(p.level, Level::Fail, "{p:?}");
        assert!(
            p.detail.contains("407") && p.fix[0].contains("rejected the credentials"),
            "{p:?}"
        );
        assert!(
            seen.lock().unwrap().contains("Proxy-Authorization: Basic "),
            "credentials were sent"
        );
        assert_eq!(find(&checks, "gateway").level, Level::Fail);
        let text = render_text(&Report::new(checks));
        assert!(!text.contains("Pw-sekrit"), "{text}");
        let (addr, _) = fake_proxy("403 Forbidden").await;
        let mut s = settings_for(addr, None);
        s.proxy_https = Some(format!("http://{addr}"));
        let checks = run_network(&s).await;
        let p = checks
            .iter()
            .find(|c| c.name.starts_with("proxy "))
            .unwrap();
        assert!(
            p.detail.contains("403") && p.fix[0].contains("allow CONNECT"),
            "{p:?}"
        );
    }
}
