//! rustls client configurations, one per hop: the system roots plus that hop's extra CA bundle
//! (`--proxy-ca` for an https:// enterprise proxy, `--gateway-ca` for the gateway), no way
//! around them; and the reason a peer's certificate was refused, in words.
use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse PEM in {}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("no PEM certificate found in {}", path.display())]
    NoCertificate { path: PathBuf },
    #[error("cannot trust a CA certificate from {}", path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("no PEM private key found in {}", path.display())]
    NoKey { path: PathBuf },
    #[error("cannot use client certificate {} with key {}", cert.display(), key.display())]
    ClientCert {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the tls client configuration")]
    Build(#[source] rustls::Error),
}

/// The one crypto provider of the daemon. Chosen explicitly rather than through the
/// process-wide default, which panics when a dependency enables a second provider.
/// `ring` by default; `aws-lc-rs` with the `crypto-aws-lc` feature (measured in the bench).
pub fn provider() -> Arc<CryptoProvider> {
    #[cfg(feature = "crypto-aws-lc")]
    return Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    #[cfg(not(feature = "crypto-aws-lc"))]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS 1.2/1.3 client configuration that trusts the system roots (none is fine) plus
/// every certificate in `extra_ca_pem`, optionally presents a client certificate
/// (`(cert chain PEM, private key PEM)`), and offers `alpn` in order.
pub fn client_config(
    extra_ca_pem: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = system_roots();
    if let Some(path) = extra_ca_pem {
        let certs = read_certs(path)?;
        let count = certs.len();
        for cert in certs {
            roots.add(cert).map_err(|source| TlsError::BadCa {
                path: path.to_owned(),
                source,
            })?;
        }
        debug!(path = %path.display(), count, "trusting extra CA certificates");
    }
    if roots.is_empty() {
        warn!(
            "no trusted root certificates: every tls handshake will fail until a CA bundle is given"
        );
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Build)?;
    let builder = if roots.is_empty() {
        // Nothing to verify against (the webpki verifier refuses to be built without a
        // root): every certificate is refused as from an unknown issuer, as warned above.
        builder.with_root_certificates(roots)
    } else {
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Build(rustls::Error::General(e.to_string())))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NamingVerifier(verifier)))
    };
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_certs(cert)?;
            let key_der = read_key(key)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|source| TlsError::ClientCert {
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                    source,
                })?
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // The gateway session protects its records itself once the handshake is made
    // (tunnel/record.rs); rustls hands the traffic secrets over only when this is set.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// Why the peer's certificate was refused, in words, when `e` (an error of a TLS handshake
/// with a hop) is one of rustls' verifier errors; `None` for every other failure.
pub fn refusal_reason(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let e: &rustls::Error = e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<io::Error>()?
            .get_ref()?
            .downcast_ref::<rustls::Error>()
    })?;
    let rustls::Error::InvalidCertificate(c) = e else {
        return None;
    };
    use CertificateError as C;
    Some(match c {
        C::Expired | C::ExpiredContext { .. } => "certificate expired",
        C::NotValidYet | C::NotValidYetContext { .. } => "certificate not valid yet",
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "certificate not valid for the name (no matching DNS or IP subjectAltName)"
        }
        C::UnknownIssuer => "certificate issued by a CA not trusted for this hop",
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "certificate not meant for a TLS server (extended key usage)"
        }
        C::BadSignature => "certificate signature does not verify",
        C::Revoked => "certificate revoked",
        C::Other(OtherError(o)) if o.is::<SelfSigned>() => "self-signed certificate",
        _ => "certificate refused",
    })
}

/// A leaf that issued itself, refused as an unknown issuer by webpki.
#[derive(Debug, thiserror::Error)]
#[error("self-signed certificate")]
struct SelfSigned;

/// The webpki verifier, unchanged in what it accepts: it only tells a self-signed leaf (an
/// unknown issuer that is its own issuer) apart, so that the refusal can say so.
#[derive(Debug)]
struct NamingVerifier(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for NamingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))
                if intermediates.is_empty() && self_issued(end_entity) =>
            {
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(SelfSigned)),
                )))
            }
            r => r,
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
    fn requires_raw_public_keys(&self) -> bool {
        self.0.requires_raw_public_keys()
    }
    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.0.root_hint_subjects()
    }
}

/// Issuer and subject are the same name.
fn self_issued(der: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(der.as_ref())
        .map(|(_, c)| c.issuer().as_raw() == c.subject().as_raw())
        .unwrap_or(false)
}

/// Whatever the system trust store holds; unreadable or unparsable entries are skipped,
/// as a partially broken store must not stop the daemon (the extra bundle may be enough).
fn system_roots() -> RootCertStore {
    let loaded = rustls_native_certs::load_native_certs();
    for e in &loaded.errors {
        debug!(error = %e, "skipping part of the system trust store");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
    debug!(added, ignored, "loaded system root certificates");
    roots
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_pem(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        source => TlsError::Pem {
            path: path.to_owned(),
            source,
        },
    })
}

#[cfg(test)]
mod tests {
    use test_pki::TestCa;

    use super::*;
    use crate::error_chain;

    fn ca_pem(name: &str) -> String {
        TestCa::temp(name).cert_pem()
    }

    #[test]
    fn extra_ca_bundle_and_alpn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("bundle.pem");
        fs::write(
            &bundle,
            format!("{}\n{}", ca_pem("ca one"), ca_pem("ca two")),
        )
        .expect("write");
        let config = client_config(Some(&bundle), None, &[b"http/1.1"]).expect("config");
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(!config.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let e = client_config(Some(&missing), None, &[]).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }));
        assert!(
            error_chain(&e).contains("missing.pem"),
            "{}",
            error_chain(&e)
        );

        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "not pem at all\n").expect("write");
        let e = client_config(Some(&empty), None, &[]).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");
        assert!(e.to_string().contains("empty.pem"));

        let broken = dir.path().join("broken.pem");
        fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let e = client_config(Some(&broken), None, &[]).unwrap_err();
        assert!(e.to_string().contains("broken.pem"), "{e}");
    }

    #[test]
    fn client_certificate_must_match_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::temp("client ca");
        let (leaf, other) = (ca.issue(&["client.test"]), ca.issue(&["other.test"]));
        let (cert_path, key_path, other_key) = (
            dir.path().join("c.pem"),
            dir.path().join("k.pem"),
            dir.path().join("o.pem"),
        );
        fs::write(&cert_path, &leaf.cert_pem).expect("write");
        fs::write(&key_path, &leaf.key_pem).expect("write");
        fs::write(&other_key, &other.key_pem).expect("write");

        let config = client_config(None, Some((&cert_path, &key_path)), &[]).expect("config");
        assert!(config.client_auth_cert_resolver.has_certs());

        let e = client_config(None, Some((&cert_path, &other_key)), &[]).unwrap_err();
        assert!(matches!(e, TlsError::ClientCert { .. }), "{e:?}");
        let e = client_config(None, Some((&cert_path, &cert_path)), &[]).unwrap_err();
        assert!(matches!(e, TlsError::NoKey { .. }), "{e:?}");
        assert!(e.to_string().contains("c.pem"));
    }
}
