//! The one test PKI of the workspace: a throwaway CA (rcgen) that issues leaf certificates
//! for test hosts and writes them as PEM files, plus rustls configs built from them. The
//! daemon's unit tests (a dev-dependency of `redirector`) and the end-to-end tests (`tests`,
//! re-exported as `tests::pki`) both use it.
//!
//! Every certificate is ECDSA P-256 and valid from 2020 to 2100, so tests never depend on the
//! clock (except the deliberately [`Flaw`]ed ones: expired in 2021, valid from 2099). Leaves carry both `serverAuth` and `clientAuth`, so one leaf can serve as a
//! gateway certificate or as a client certificate on the gateway hop.
use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, date_time_ymd,
};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};

/// The crypto provider of every config built here (unless one is passed, as in
/// [`Leaf::server_config_with`]). Passed explicitly so that a workspace build that also
/// enables another rustls provider cannot make `ClientConfig::builder()` ambiguous.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority that exists only for one test run.
pub struct TestCa {
    name: String,
    dir: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
    issued: AtomicU32,
    /// Set by [`TestCa::temp`]: the directory removed when the CA is dropped.
    _temp: Option<tempfile::TempDir>,
}

/// A certificate issued by a [`TestCa`], kept in memory and written as PEM files.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// The leaf certificate alone (no chain: the CA is the trust anchor).
    pub cert_pem_path: PathBuf,
    /// The PKCS#8 private key.
    pub key_pem_path: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl TestCa {
    /// A fresh CA named "rdr test ca"; its leaves are written into `dir` (created if missing).
    pub fn new(dir: &Path) -> TestCa {
        TestCa::with_name("rdr test ca", dir)
    }

    /// A second, unrelated CA for negative tests: nothing that trusts [`TestCa::new`]
    /// trusts its leaves.
    pub fn untrusted(dir: &Path) -> TestCa {
        TestCa::with_name("rdr untrusted ca", dir)
    }

    /// A CA with the given common name whose leaves (and, through [`TestCa::write_ca`] with
    /// [`TestCa::dir`], its own certificate) go into a fresh temporary directory that is
    /// removed when the CA is dropped.
    pub fn temp(name: &str) -> TestCa {
        let temp = tempfile::tempdir().expect("tempdir");
        let mut ca = TestCa::with_name(name, temp.path());
        ca._temp = Some(temp);
        ca
    }

    /// A CA with the given common name (also used, slugged, in file names).
    pub fn with_name(name: &str, dir: &Path) -> TestCa {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "redirector tests");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2100, 1, 1);
        let key = KeyPair::generate().expect("generate ca key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-sign ca");
        TestCa {
            name: name.to_owned(),
            dir: dir.to_owned(),
            issuer,
            issued: AtomicU32::new(0),
            _temp: None,
        }
    }

    /// The directory the leaves' PEM files are written into.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate as DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Writes the CA certificate (the file curl's `--cacert` / `--proxy-cacert` and the
    /// redirector's `--proxy-ca` / `--gateway-ca` take) into `dir` and returns its path.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let path = dir.join(format!("{}.pem", slug(&self.name)));
        write(&path, &self.cert_pem());
        path
    }

    /// Issues a leaf for `names`: each is an IP SAN if it parses as an IP address, else a
    /// DNS SAN (wildcards such as `*.example.test` allowed). The first name is the subject CN
    /// and names the files, which go into the CA's directory.
    pub fn issue(&self, names: &[&str]) -> Leaf {
        self.issue_flawed(names, None)
    }

    /// [`TestCa::issue`] with one thing wrong (`None`: nothing), for verification tests.
    pub fn issue_flawed(&self, names: &[&str], flaw: Option<Flaw>) -> Leaf {
        let (params, key) = leaf_params(names, flaw);
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let stem = format!("{}-{n}-{}", slug(&self.name), slug(names[0]));
        Leaf::write(&self.dir, &stem, cert, key)
    }

    /// A leaf for `names` that signs itself: no CA vouches for it. Written into the CA's
    /// directory like the others (the CA plays no part in it).
    pub fn self_signed(&self, names: &[&str]) -> Leaf {
        let (mut params, key) = leaf_params(names, None);
        // Its own issuer: a name no trust store holds (a system root may well be called
        // just `CN=localhost`, and would then be taken for its issuer).
        params
            .distinguished_name
            .push(DnType::OrganizationName, "rdr self-signed test leaf");
        let cert = params.self_signed(&key).expect("self-sign leaf");
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let stem = format!("self-signed-{n}-{}", slug(names[0]));
        Leaf::write(&self.dir, &stem, cert, key)
    }

    /// A root store holding only this CA.
    pub fn root_store(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.cert_der())
            .expect("add test ca to root store");
        roots
    }

    /// A TLS 1.2/1.3 client config that trusts only this CA and offers `alpn`.
    pub fn client_config(&self, alpn: &[&str]) -> Arc<ClientConfig> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(self.root_store())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }
}

/// One thing wrong with a leaf, for the TLS verification matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flaw {
    /// Valid from 2020 to 2021 only.
    Expired,
    /// Valid from 2099 on.
    NotYetValid,
    /// Extended key usage `clientAuth` only: not for a TLS server.
    ClientAuthOnly,
    /// No subjectAltName at all: the name is only in the subject CN (which TLS clients
    /// no longer look at).
    CnOnly,
    /// Every name as a DNS SAN, IP literals included (`DNS:203.0.113.60`), so an IP literal
    /// is presented as a name rather than as an `IP:` SAN.
    IpAsDns,
}

/// The parameters and key of a leaf for `names` with `flaw`.
fn leaf_params(names: &[&str], flaw: Option<Flaw>) -> (CertificateParams, KeyPair) {
    assert!(!names.is_empty(), "a leaf needs at least one name");
    let mut params = CertificateParams::default();
    let dns = |n: &str| {
        SanType::DnsName(
            n.try_into()
                .unwrap_or_else(|e| panic!("bad dns name {n:?}: {e}")),
        )
    };
    params.subject_alt_names = match flaw {
        Some(Flaw::CnOnly) => Vec::new(),
        Some(Flaw::IpAsDns) => names.iter().map(|n| dns(n)).collect(),
        _ => names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => dns(n),
            })
            .collect(),
    };
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = match flaw {
        Some(Flaw::ClientAuthOnly) => vec![ExtendedKeyUsagePurpose::ClientAuth],
        _ => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    // OpenSSL 3 (curl) wants an authority key identifier on every non-root certificate.
    params.use_authority_key_identifier_extension = true;
    (params.not_before, params.not_after) = match flaw {
        Some(Flaw::Expired) => (date_time_ymd(2020, 1, 1), date_time_ymd(2021, 1, 1)),
        Some(Flaw::NotYetValid) => (date_time_ymd(2099, 1, 1), date_time_ymd(2100, 1, 1)),
        _ => (date_time_ymd(2020, 1, 1), date_time_ymd(2100, 1, 1)),
    };
    let key = KeyPair::generate().expect("generate leaf key");
    (params, key)
}

impl Leaf {
    /// Writes `cert` and its `key` as `<stem>.pem` and `<stem>.key.pem` into `dir`.
    fn write(dir: &Path, stem: &str, cert: rcgen::Certificate, key: KeyPair) -> Leaf {
        let cert_pem_path = dir.join(format!("{stem}.pem"));
        let key_pem_path = dir.join(format!("{stem}.key.pem"));
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        write(&cert_pem_path, &cert_pem);
        write(&key_pem_path, &key_pem);
        Leaf {
            cert_pem_path,
            key_pem_path,
            cert_pem,
            key_pem,
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// A TLS 1.2/1.3 server config presenting this leaf and offering `alpn`.
    pub fn server_config(&self, alpn: &[&str]) -> Arc<ServerConfig> {
        self.server_config_with(provider(), alpn)
    }

    /// [`Leaf::server_config`] with the caller's crypto provider (the daemon's unit tests
    /// pass the daemon's own, which the `crypto-aws-lc` feature changes).
    pub fn server_config_with(
        &self,
        provider: Arc<CryptoProvider>,
        alpn: &[&str],
    ) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der()], self.key_der())
            .expect("leaf key matches certificate");
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }
}

/// File-name-safe form of a CA or host name (`*.example.test` → `wild.example.test`).
fn slug(name: &str) -> String {
    name.replace('*', "wild")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn write(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{ServerName, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    /// Runs one handshake over an in-memory pipe; returns the client's result (and the ALPN
    /// protocol the client saw) after a one-byte exchange.
    async fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
        name: &str,
    ) -> Result<Option<Vec<u8>>, std::io::Error> {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(server);
        let server_task = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await?;
            tls.write_all(&b).await?;
            tls.shutdown().await?;
            Ok::<_, std::io::Error>(())
        });
        let connector = TlsConnector::from(client);
        let server_name = ServerName::try_from(name.to_owned()).expect("server name");
        let result = async {
            let mut tls = connector.connect(server_name, c).await?;
            tls.write_all(b"x").await?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await?;
            assert_eq!(&b, b"x");
            Ok(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
        }
        .await;
        // The server side fails too when the client rejects the certificate; only the client
        // result matters here.
        let _ = server_task.await;
        result
    }

    #[tokio::test]
    async fn leaf_verifies_against_its_ca_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new(dir.path());
        let other = TestCa::untrusted(dir.path());
        let leaf = ca.issue(&["gw.example.test", "*.wild.example.test", "127.0.0.1", "::1"]);

        // DNS names, a wildcard and IP SANs all verify against the issuing CA.
        for name in ["gw.example.test", "a.wild.example.test", "127.0.0.1", "::1"] {
            let alpn = handshake(
                ca.client_config(&["http/1.1"]),
                leaf.server_config(&["http/1.1"]),
                name,
            )
            .await
            .unwrap_or_else(|e| panic!("handshake for {name} failed: {e}"));
            assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]), "{name}");
        }

        // A name the leaf does not carry is rejected.
        let err = handshake(
            ca.client_config(&[]),
            leaf.server_config(&[]),
            "other.example.test",
        )
        .await
        .expect_err("wrong name must fail");
        assert!(err.to_string().contains("not valid for name"), "{err}");

        // A client trusting only the untrusted CA rejects the leaf.
        let err = handshake(
            other.client_config(&[]),
            leaf.server_config(&[]),
            "gw.example.test",
        )
        .await
        .expect_err("untrusted ca must fail");
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    }

    #[test]
    fn files_are_written_as_parseable_pem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new(&dir.path().join("pki"));
        let untrusted = TestCa::untrusted(&dir.path().join("pki"));
        let ca_path = ca.write_ca(dir.path());
        let other_path = untrusted.write_ca(dir.path());
        assert_ne!(ca_path, other_path);
        let a = ca.issue(&["same.test"]);
        let b = ca.issue(&["same.test"]);
        assert_ne!(
            a.cert_pem_path, b.cert_pem_path,
            "leaves never overwrite each other"
        );

        let ca_certs: Vec<_> = CertificateDer::pem_file_iter(&ca_path)
            .expect("open ca")
            .collect::<Result<_, _>>()
            .expect("parse ca");
        assert_eq!(ca_certs, vec![ca.cert_der()]);
        let leaf_certs: Vec<_> = CertificateDer::pem_file_iter(&a.cert_pem_path)
            .expect("open leaf")
            .collect::<Result<_, _>>()
            .expect("parse leaf");
        assert_eq!(leaf_certs, vec![a.cert_der()]);
        let key = PrivateKeyDer::from_pem_file(&a.key_pem_path).expect("parse key");
        assert_eq!(key.secret_der(), a.key_der().secret_der());
    }

    #[test]
    fn temp_ca_owns_its_directory() {
        let ca = TestCa::temp("temp ca");
        let dir = ca.dir().to_owned();
        let ca_path = ca.write_ca(ca.dir());
        let leaf = ca.issue(&["t.test"]);
        assert!(ca_path.starts_with(&dir) && leaf.cert_pem_path.starts_with(&dir));
        assert!(ca_path.is_file() && leaf.key_pem_path.is_file());
        drop(ca);
        assert!(!dir.exists(), "{} outlived its CA", dir.display());
    }
}
