//! ClientHellos of a rustls client for the `sniff` seed corpus (run by ../make_seeds.py):
//! with a real ECH extension (an ECHConfig made here; the outer SNI is its public name) and
//! with GREASE ECH, plus plain TLS 1.3 and TLS 1.2 hellos. Prints `label<TAB>hex` lines:
//! the bytes rustls writes to the socket first.
use std::sync::Arc;

use rustls::{
    ClientConfig, ClientConnection, RootCertStore,
    client::{EchConfig, EchGreaseConfig, EchMode},
    crypto::{aws_lc_rs, hpke::HpkePublicKey},
    pki_types::{EchConfigListBytes, ServerName},
};

/// X25519's base point: a valid public key whose private key nobody needs here.
fn x25519_key() -> Vec<u8> {
    let mut k = vec![0u8; 32];
    k[0] = 9;
    k
}

/// An ECHConfigList (RFC 9849 §4) with one X25519/HKDF-SHA256/AES-128-GCM config.
fn ech_config_list(public_name: &str) -> Vec<u8> {
    let mut contents = vec![0x2a]; // config_id
    contents.extend(0x0020u16.to_be_bytes()); // DHKEM(X25519, HKDF-SHA256)
    contents.extend(32u16.to_be_bytes());
    contents.extend(x25519_key());
    contents.extend(4u16.to_be_bytes()); // one cipher suite
    contents.extend(0x0001u16.to_be_bytes()); // HKDF-SHA256
    contents.extend(0x0001u16.to_be_bytes()); // AES-128-GCM
    contents.push(64); // maximum_name_length
    contents.push(public_name.len() as u8);
    contents.extend(public_name.as_bytes());
    contents.extend(0u16.to_be_bytes()); // no extensions
    let mut config = 0xfe0du16.to_be_bytes().to_vec();
    config.extend((contents.len() as u16).to_be_bytes());
    config.extend(contents);
    let mut list = (config.len() as u16).to_be_bytes().to_vec();
    list.extend(config);
    list
}

fn hello(config: ClientConfig, name: &str) -> Vec<u8> {
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = ServerName::try_from(name.to_owned()).expect("server name");
    let mut conn = ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write");
    }
    out
}

fn main() {
    let provider = || Arc::new(aws_lc_rs::default_provider());
    let roots = || RootCertStore::empty();
    let suites = aws_lc_rs::hpke::ALL_SUPPORTED_SUITES;

    let list = ech_config_list("public.ech.example");
    let ech = EchConfig::new(EchConfigListBytes::from(list.as_slice()), suites).expect("ech");
    let real = ClientConfig::builder_with_provider(provider())
        .with_ech(EchMode::Enable(ech))
        .expect("ech mode")
        .with_root_certificates(roots())
        .with_no_client_auth();
    println!("rustls-ech\t{}", hex(&hello(real, "inner.ech.example")));

    let grease = EchGreaseConfig::new(
        aws_lc_rs::hpke::DH_KEM_X25519_HKDF_SHA256_AES_128,
        HpkePublicKey(x25519_key()),
    );
    let grease = ClientConfig::builder_with_provider(provider())
        .with_ech(EchMode::Grease(grease))
        .expect("grease mode")
        .with_root_certificates(roots())
        .with_no_client_auth();
    println!("rustls-grease-ech\t{}", hex(&hello(grease, "grease.ech.example")));

    for (label, versions) in [
        ("rustls-tls13", &[&rustls::version::TLS13][..]),
        ("rustls-tls12", &[&rustls::version::TLS12][..]),
    ] {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots())
            .with_no_client_auth();
        println!("{label}\t{}", hex(&hello(config, "rustls.example")));
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
