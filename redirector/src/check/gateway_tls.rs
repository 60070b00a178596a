//! The gateway's certificate: facts, trust stores, and a TLS-inspecting proxy in between.
use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::Check;
use crate::tunnel::Io;
use crate::tunnel::{GatewayConfig, Timeouts};

/// Root stores: the system's (public roots) and the system's plus `--gateway-ca`.
pub(super) struct TrustStores {
    system: Arc<RootCertStore>,
    all: Arc<RootCertStore>,
    extra_error: Option<String>,
}

impl TrustStores {
    pub(super) fn load(extra_ca: Option<&Path>) -> TrustStores {
        let mut system = RootCertStore::empty();
        system.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let mut all = system.clone();
        let mut extra_error = None;
        if let Some(p) = extra_ca {
            match CertificateDer::pem_file_iter(p).and_then(|it| it.collect::<Result<Vec<_>, _>>())
            {
                Ok(certs) => {
                    all.add_parsable_certificates(certs);
                }
                Err(e) => extra_error = Some(format!("cannot read {}: {e}", p.display())),
            }
        }
        TrustStores {
            system: Arc::new(system),
            all: Arc::new(all),
            extra_error,
        }
    }
}

/// Wraps the real verifier and remembers the chain it was shown and what it said: a
/// failed handshake does not expose the peer's certificates otherwise.
#[derive(Debug)]
struct Recorder {
    inner: Arc<WebPkiServerVerifier>,
    seen: Mutex<Option<Seen>>,
}

/// The chain a server presented (leaf first) and the verifier's verdict on it.
type Seen = (Vec<CertificateDer<'static>>, Result<(), rustls::Error>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let r = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        *self.seen.lock().expect("recorder lock") =
            Some((chain, r.as_ref().map(|_| ()).map_err(Clone::clone)));
        r
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What the leaf certificate says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertFacts {
    /// Issuer common name (or the whole issuer DN when it has no CN).
    pub issuer_cn: String,
    pub issuer: String,
    pub dns_names: Vec<String>,
}

pub fn cert_facts(der: &CertificateDer<'_>) -> Option<CertFacts> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let issuer = cert.issuer().to_string();
    let issuer_cn = cert
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| issuer.clone());
    let dns_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                x509_parser::extensions::GeneralName::DNSName(n) => Some((*n).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                    16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Some(CertFacts {
        issuer_cn,
        issuer,
        dns_names,
    })
}

/// How the gateway's chain is trusted.
#[derive(Clone, Debug, PartialEq)]
pub enum Trust {
    /// Chains to a system (public) root.
    Public,
    /// Chains only to a CA from --gateway-ca.
    ExtraOnly,
    /// Does not verify; the verifier's error.
    Untrusted(rustls::Error),
}

/// Result of the TLS handshake with the gateway.
pub struct GatewayProbe {
    /// Facts about the leaf and how it is trusted, when a certificate arrived.
    pub cert: Option<(CertFacts, Trust)>,
    /// The handshake error, verbatim (`None`: handshake completed).
    pub error: Option<String>,
    pub alpn: Option<String>,
    /// Problems loading --gateway-ca.
    pub extra_error: Option<String>,
}

/// The TLS handshake with the gateway over `stream`, recording the chain it presents.
pub(super) async fn handshake(
    gw: &GatewayConfig,
    stream: Box<dyn Io>,
    trust: &TrustStores,
    t: &Timeouts,
) -> GatewayProbe {
    let mut probe = GatewayProbe {
        cert: None,
        error: None,
        alpn: None,
        extra_error: trust.extra_error.clone(),
    };
    let provider = crate::tls::provider();
    let inner = match WebPkiServerVerifier::builder_with_provider(
        Arc::clone(&trust.all),
        Arc::clone(&provider),
    )
    .build()
    {
        Ok(v) => v,
        Err(e) => {
            probe.error = Some(format!("no trusted CA certificates at all ({e})"));
            return probe;
        }
    };
    let recorder = Arc::new(Recorder {
        inner,
        seen: Mutex::new(None),
    });
    // The daemon's own TLS settings (ALPN, client certificate), with the recording verifier.
    let mut cfg: ClientConfig = (*gw.tls).clone();
    cfg.dangerous()
        .set_certificate_verifier(Arc::clone(&recorder) as Arc<dyn ServerCertVerifier>);
    let Ok(sni) = ServerName::try_from(gw.server_name.clone()) else {
        probe.error = Some(format!("{} is not a valid TLS server name", gw.server_name));
        return probe;
    };
    match timeout(
        t.tls_handshake,
        TlsConnector::from(Arc::new(cfg)).connect(sni.clone(), stream),
    )
    .await
    {
        Err(_) => probe.error = Some(format!("no TLS answer within {:?}", t.tls_handshake)),
        Ok(Err(e)) => probe.error = Some(e.to_string()),
        Ok(Ok(s)) => {
            probe.alpn = s
                .get_ref()
                .1
                .alpn_protocol()
                .map(|a| String::from_utf8_lossy(a).into_owned())
        }
    }
    let seen = recorder.seen.lock().expect("recorder lock").take();
    if let Some((chain, result)) = seen {
        let trust_kind = match result {
            Err(e) => Trust::Untrusted(e),
            Ok(()) => {
                let public = WebPkiServerVerifier::builder_with_provider(
                    Arc::clone(&trust.system),
                    provider,
                )
                .build()
                .is_ok_and(|v| {
                    v.verify_server_cert(&chain[0], &chain[1..], &sni, &[], UnixTime::now())
                        .is_ok()
                });
                if public {
                    Trust::Public
                } else {
                    Trust::ExtraOnly
                }
            }
        };
        if let Some(facts) = cert_facts(&chain[0]) {
            probe.cert = Some((facts, trust_kind));
        }
    }
    probe
}

/// Issuer names of common TLS-inspection products (matched case-insensitively).
const INSPECTORS: &[&str] = &[
    "zscaler",
    "netskope",
    "palo alto",
    "fortinet",
    "fortigate",
    "blue coat",
    "bluecoat",
    "forcepoint",
    "websense",
    "skyhigh",
    "mcafee web gateway",
    "sophos",
    "check point",
    "checkpoint",
    "umbrella",
    "symantec web",
    "iboss",
    "barracuda",
    "mitmproxy",
    "cloudflare gateway",
    "squid",
];

/// Gateway names whose real certificate chains to a public root (the Arc gateway).
fn expects_public_cert(server_name: &str) -> bool {
    let n = server_name.to_ascii_lowercase();
    n.ends_with(".azure.com") || n.ends_with(".microsoft.com")
}

/// The `gateway` and `tls interception` lines from a handshake's outcome.
pub fn judge_gateway(
    gw: &GatewayConfig,
    via: &str,
    probe: &GatewayProbe,
    proxy_issuer: Option<&str>,
    have_extra_ca: bool,
) -> Vec<Check> {
    let server = &gw.server_name;
    let target = format!("{} (SNI {server}){via}", gw.authority());
    let mut out = Vec::new();
    let intercepted = |issuer: &str| {
        format!(
            "the certificate for {server} was issued by {issuer}: a TLS-inspecting proxy is intercepting the gateway name; exempt {server} from TLS inspection"
        )
    };
    let exempt = vec![format!(
        "exempt {server} from TLS inspection on the enterprise proxy: the redirector's CONNECT to the target travels inside this TLS session"
    )];
    let Some((facts, trust)) = &probe.cert else {
        let err = probe
            .error
            .clone()
            .unwrap_or_else(|| "no certificate".into());
        out.push(Check::fail(
            "gateway",
            format!("TLS with {target} failed: {err}"),
            vec![format!(
                "check --gateway-url: {}:{} must be the gateway's HTTPS endpoint",
                gw.addr_host, gw.port
            )],
        ));
        out.push(Check::warn(
            "tls interception",
            format!("not checked: no certificate from {server}"),
            Vec::new(),
        ));
        return out;
    };
    let lower = facts.issuer.to_ascii_lowercase();
    let vendor = INSPECTORS.iter().find(|v| lower.contains(*v));
    let same_as_proxy = proxy_issuer.is_some_and(|p| p == facts.issuer_cn);
    let issuer = format!("\"{}\"", facts.issuer_cn);

    // 1. The gateway line: did the handshake (and verification) succeed?
    match (trust, &probe.error) {
        (Trust::Untrusted(e), _) => {
            let mut fix = Vec::new();
            match e {
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
                ) => fix.push(format!(
                    "check --gateway-url: the certificate is for {}, not {server}",
                    if facts.dns_names.is_empty() { "other names".to_owned() } else { facts.dns_names.join(", ") }
                )),
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired
                    | rustls::CertificateError::ExpiredContext { .. }
                    | rustls::CertificateError::NotValidYet
                    | rustls::CertificateError::NotValidYetContext { .. },
                ) => fix.push("the certificate is outside its validity period: check this node's clock, or have the gateway's certificate renewed".into()),
                _ => {
                    fix.push(format!("pass the gateway's CA with --gateway-ca (the certificate was issued by {issuer})"));
                    fix.push("check --gateway-url".into());
                }
            }
            if let Some(x) = &probe.extra_error {
                fix.push(format!("--gateway-ca could not be used: {x}"));
            }
            let reason = crate::tls::refusal_reason(e).map(|r| format!("{r}: ")).unwrap_or_default();
            out.push(Check::fail("gateway", format!("TLS with {target}: {reason}{e} (issuer {issuer})"), fix));
        }
        (_, Some(err)) => out.push(Check::fail("gateway", format!("TLS with {target} failed after the certificate was accepted: {err}"), vec![
            "if the gateway requires a client certificate, pass --gateway-client-cert and --gateway-client-key".into(),
        ])),
        (t, None) => {
            let how = match t {
                Trust::Public => "chains to a public root",
                _ => "trusted through --gateway-ca",
            };
            let alpn = probe.alpn.as_deref().unwrap_or("none");
            let offered_h2 = gw.tls.alpn_protocols.iter().any(|p| p == b"h2");
            let (alpn_ok, speaks) = match probe.alpn.as_deref() {
                None | Some("http/1.1") => (true, "HTTP/1.1 CONNECT, one TLS session per tunnel"),
                Some("h2") if offered_h2 => (true, "HTTP/2 CONNECT streams on a shared session"),
                Some(_) => (false, ""),
            };
            if alpn_ok {
                let detail = format!("TLS with {target} ok: certificate issued by {issuer} ({how}), ALPN {alpn}: {speaks}");
                out.push(Check::ok("gateway", detail));
            } else {
                let detail = format!("TLS with {target} ok: certificate issued by {issuer} ({how}), ALPN {alpn}");
                out.push(Check::fail("gateway", detail, vec!["the gateway chose an ALPN protocol the redirector did not offer (it speaks http/1.1 and, unless --gateway-http2=false, h2)".into()]));
            }
        }
    }

    // 2. Is somebody in the middle?
    let name = "tls interception";
    let definite = vendor.is_some()
        || same_as_proxy
        || (expects_public_cert(server) && *trust != Trust::Public);
    if definite {
        let mut detail = intercepted(&issuer);
        if same_as_proxy {
            detail += " (the same CA issued the enterprise proxy's own certificate)";
        } else if expects_public_cert(server) {
            detail += &format!(" ({server}'s real certificate chains to a public root)");
        }
        out.push(Check::fail(name, detail, exempt));
        return out;
    }
    match trust {
        Trust::Public => out.push(Check::ok(name, format!("none seen: the certificate for {server} chains to a public root (issuer {issuer})"))),
        Trust::ExtraOnly => out.push(Check::warn(
            name,
            format!(
                "the certificate for {server} was issued by {issuer}, a CA that is not a public root and is trusted only through --gateway-ca: expected for a self-hosted gateway"
            ),
            vec![format!("if {issuer} is your TLS-inspecting proxy's CA, the proxy is intercepting the gateway name: exempt {server} from TLS inspection")],
        )),
        Trust::Untrusted(_) => out.push(Check::warn(
            name,
            format!("cannot tell: the certificate for {server} was issued by {issuer}, which nothing here trusts"),
            vec![if have_extra_ca {
                format!("if {issuer} is your TLS-inspecting proxy's CA, exempt {server} from TLS inspection; if it is the gateway's real CA, add it to --gateway-ca")
            } else {
                format!("if {issuer} is your TLS-inspecting proxy's CA, exempt {server} from TLS inspection; if it is the gateway's real CA, pass it with --gateway-ca")
            }],
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{Level, find};

    fn gw_config(name: &str) -> GatewayConfig {
        let tls = crate::tls::client_config(None, None, &[b"http/1.1"]).unwrap();
        GatewayConfig::from_url(&format!("https://{name}"), tls).unwrap()
    }

    fn probe(issuer: &str, trust: Trust) -> GatewayProbe {
        let error = match &trust {
            Trust::Untrusted(e) => Some(e.to_string()),
            _ => None,
        };
        GatewayProbe {
            cert: Some((
                CertFacts {
                    issuer_cn: issuer.into(),
                    issuer: format!("CN={issuer}"),
                    dns_names: Vec::new(),
                },
                trust,
            )),
            error,
            alpn: Some("http/1.1".into()),
            extra_error: None,
        }
    }

    #[test]
    fn gateway_alpn_h2_is_fine_when_offered_and_named() {
        let mut p = probe("Corp CA", Trust::ExtraOnly);
        p.alpn = Some("h2".into());
        let both = crate::tls::client_config(None, None, &[b"h2", b"http/1.1"]).unwrap();
        let gw = GatewayConfig::from_url("https://gw.corp.example", both).unwrap();
        let c = find(&judge_gateway(&gw, "", &p, None, true), "gateway").clone();
        assert_eq!(c.level, Level::Ok, "{c:?}");
        assert!(
            c.detail
                .ends_with("ALPN h2: HTTP/2 CONNECT streams on a shared session"),
            "{c:?}"
        );
        // h2 without having offered it (--gateway-http2=false) is a gateway fault.
        let c = find(
            &judge_gateway(&gw_config("gw.corp.example"), "", &p, None, true),
            "gateway",
        )
        .clone();
        assert_eq!(c.level, Level::Fail, "{c:?}");
    }

    #[test]
    fn interception_is_named_for_public_gateways_inspector_cas_and_the_proxys_own_ca() {
        let unknown = Trust::Untrusted(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        let cases = [
            (
                "pfx.gw.arc.azure.com",
                "Corp Inspection CA",
                unknown.clone(),
                None,
                Level::Fail,
            ),
            (
                "pfx.gw.arc.azure.com",
                "Corp Inspection CA",
                Trust::ExtraOnly,
                None,
                Level::Fail,
            ),
            (
                "pfx.gw.arc.azure.com",
                "Microsoft Azure RSA TLS Issuing CA 03",
                Trust::Public,
                None,
                Level::Ok,
            ),
            (
                "gw.corp.example",
                "Zscaler Intermediate Root CA",
                Trust::ExtraOnly,
                None,
                Level::Fail,
            ),
            (
                "gw.corp.example",
                "Corp CA",
                Trust::ExtraOnly,
                Some("Corp CA"),
                Level::Fail,
            ),
            (
                "gw.corp.example",
                "Corp CA",
                Trust::ExtraOnly,
                None,
                Level::Warn,
            ),
            ("gw.corp.example", "Corp CA", unknown, None, Level::Warn),
        ];
        for (name, issuer, trust, proxy, want) in cases {
            let checks = judge_gateway(&gw_config(name), "", &probe(issuer, trust), proxy, true);
            let c = find(&checks, "tls interception");
            assert_eq!(c.level, want, "{name} {issuer}: {c:?}");
            if want == Level::Fail {
                assert!(
                    c.detail.starts_with(&format!("the certificate for {name} was issued by \"{issuer}\": a TLS-inspecting proxy is intercepting the gateway name; exempt {name} from TLS inspection")),
                    "{c:?}"
                );
            }
        }
    }
}
