//! TLS verification per hop (issue 12, item 3): certificates made here, each with one thing
//! wrong, presented by the gateway and by an `https://` enterprise proxy. Every one is refused
//! with the hop and the reason in the error the user sees (the audit line and `redirector
//! check` print this error chain). Trust is per hop: the proxy's CA (`proxy-ca`) is not trusted
//! for the gateway and the gateway's CA (`gateway-ca`) not for the proxy.
use std::{net::SocketAddr, path::PathBuf};

use test_pki::{Flaw, Leaf, TestCa};

use crate::tunnel::tests::{Behavior, spawn_connect_server, spawn_target};
use crate::{
    config::{Config, Settings},
    error_chain,
    tunnel::{HOP_GATEWAY, HOP_PROXY, Route, open},
};

const EXPIRED: &str = "certificate expired";
const NOT_YET: &str = "certificate not valid yet";
const NAME: &str = "certificate not valid for the name";
const EKU: &str = "certificate not meant for a TLS server (extended key usage)";
const SELF_SIGNED: &str = "self-signed certificate";
const UNKNOWN_CA: &str = "certificate issued by a CA not trusted for this hop";

/// The two CAs, each written to the PEM file its hop's setting names.
struct Pki {
    proxy_ca: TestCa,
    gateway_ca: TestCa,
    proxy_pem: PathBuf,
    gateway_pem: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let proxy_ca = TestCa::temp("proxy ca");
        let gateway_ca = TestCa::temp("gateway ca");
        let proxy_pem = proxy_ca.write_ca(proxy_ca.dir());
        let gateway_pem = gateway_ca.write_ca(gateway_ca.dir());
        Pki {
            proxy_ca,
            gateway_ca,
            proxy_pem,
            gateway_pem,
        }
    }

    /// Settings trusting each CA for its own hop only.
    fn settings(&self) -> Settings {
        Settings {
            proxy_ca: Some(self.proxy_pem.clone()),
            gateway_ca: Some(self.gateway_pem.clone()),
            connect_timeout: Some(5.0),
            tls_timeout: Some(5.0),
            connect_response_timeout: Some(5.0),
            ..Default::default()
        }
    }
}

/// A CONNECT stand-in presenting `leaf` that opens tunnels to whatever is asked.
async fn serve(leaf: &Leaf) -> SocketAddr {
    let tls = leaf.server_config_with(crate::tls::provider(), &["http/1.1"]);
    spawn_connect_server(Some(tls), Behavior::Allow, None)
        .await
        .addr
}

/// Opens a tunnel along `route` with `settings` to a live target: `Ok` when it worked,
/// else the error chain (checked to be a TLS failure of `hop`).
async fn tunnel(settings: Settings, route: Route, hop: &str) -> Result<(), String> {
    let config = Config::build(settings).expect("config");
    let target = spawn_target(None).await;
    let authority = crate::addr::authority("127.0.0.1", target.port());
    match open(&config.tunnel, route, &authority, target).await {
        Ok(_) => Ok(()),
        Err(e) => {
            assert_eq!((e.hop(), e.kind()), (hop, "tls"), "{}", error_chain(&e));
            Err(error_chain(&e))
        }
    }
}

fn expect(what: &str, hop: &str, got: Result<(), String>, want: Option<&str>) {
    match (got, want) {
        (Ok(()), None) => {}
        (Ok(()), Some(w)) => panic!("{hop}: {what} was accepted; want refused with {w:?}"),
        (Err(e), None) => panic!("{hop}: {what} was refused: {e}"),
        (Err(e), Some(w)) => {
            let prefix = format!("tls handshake with the {hop} failed: {w}");
            assert!(
                e.starts_with(&prefix),
                "{hop}: {what}: want {prefix:?}, got {e:?}"
            );
        }
    }
}

#[tokio::test]
async fn gateway_certificates_are_refused_with_the_hop_and_the_reason() {
    let pki = Pki::new();
    let gw = &pki.gateway_ca;
    let cases: Vec<(&str, Leaf, &str, Option<&str>)> = vec![
        (
            "a good certificate",
            gw.issue(&["gw.test"]),
            "gw.test",
            None,
        ),
        (
            "expired",
            gw.issue_flawed(&["gw.test"], Some(Flaw::Expired)),
            "gw.test",
            Some(EXPIRED),
        ),
        (
            "not yet valid",
            gw.issue_flawed(&["gw.test"], Some(Flaw::NotYetValid)),
            "gw.test",
            Some(NOT_YET),
        ),
        (
            "for another name",
            gw.issue(&["other.test"]),
            "gw.test",
            Some(NAME),
        ),
        (
            "for clients only (EKU)",
            gw.issue_flawed(&["gw.test"], Some(Flaw::ClientAuthOnly)),
            "gw.test",
            Some(EKU),
        ),
        (
            "self-signed",
            gw.self_signed(&["gw.test"]),
            "gw.test",
            Some(SELF_SIGNED),
        ),
        (
            "with the name in the CN only",
            gw.issue_flawed(&["gw.test"], Some(Flaw::CnOnly)),
            "gw.test",
            Some(NAME),
        ),
        (
            "an IP SAN for an IP",
            gw.issue(&["127.0.0.1"]),
            "127.0.0.1",
            None,
        ),
        (
            "a DNS SAN spelling the IP",
            gw.issue_flawed(&["127.0.0.1"], Some(Flaw::IpAsDns)),
            "127.0.0.1",
            Some(NAME),
        ),
        (
            "a DNS name for an IP",
            gw.issue(&["gw.test"]),
            "127.0.0.1",
            Some(NAME),
        ),
        (
            "an IP SAN for a DNS name",
            gw.issue(&["127.0.0.1"]),
            "gw.test",
            Some(NAME),
        ),
        (
            "from the proxy's CA",
            pki.proxy_ca.issue(&["gw.test"]),
            "gw.test",
            Some(UNKNOWN_CA),
        ),
    ];
    for (what, leaf, name, want) in cases {
        let addr = serve(&leaf).await;
        let settings = Settings {
            gateway_url: Some(format!(
                "https://{}",
                crate::addr::authority(name, addr.port())
            )),
            gateway_connect_to: Some("127.0.0.1".into()),
            gateway_warm: Some(0),
            ..pki.settings()
        };
        expect(
            what,
            HOP_GATEWAY,
            tunnel(settings, Route::Gateway, HOP_GATEWAY).await,
            want,
        );
    }
}

/// The gateway's certificate from the proxy's CA is refused even when the proxy itself (an
/// https:// proxy with a certificate from that CA) is trusted on the same path.
#[tokio::test]
async fn the_proxy_ca_is_not_trusted_for_the_gateway_behind_it() {
    let pki = Pki::new();
    let proxy = serve(&pki.proxy_ca.issue(&["127.0.0.1"])).await;
    let gateway = serve(&pki.proxy_ca.issue(&["gw.test"])).await;
    let with = |gateway_ca: Option<PathBuf>| Settings {
        proxy_https: Some(format!("https://{proxy}")),
        gateway_url: Some(format!("https://gw.test:{}", gateway.port())),
        gateway_connect_to: Some("127.0.0.1".into()),
        gateway_ca,
        ..pki.settings()
    };
    let refused = tunnel(
        with(Some(pki.gateway_pem.clone())),
        Route::Gateway,
        HOP_GATEWAY,
    )
    .await;
    expect(
        "from the proxy's CA",
        HOP_GATEWAY,
        refused,
        Some(UNKNOWN_CA),
    );
    // Given as the gateway's CA too (a proxy meant to inspect the gateway), it is accepted.
    let accepted = tunnel(
        with(Some(pki.proxy_pem.clone())),
        Route::Gateway,
        HOP_GATEWAY,
    )
    .await;
    expect(
        "from the proxy's CA, trusted for both",
        HOP_GATEWAY,
        accepted,
        None,
    );
}

#[tokio::test]
async fn https_proxy_certificates_are_refused_with_the_hop_and_the_reason() {
    let pki = Pki::new();
    let ca = &pki.proxy_ca;
    // `localhost` is the DNS name of the proxy (it resolves to 127.0.0.1 everywhere).
    let cases: Vec<(&str, Leaf, &str, Option<&str>)> = vec![
        (
            "a good certificate",
            ca.issue(&["localhost"]),
            "localhost",
            None,
        ),
        (
            "expired",
            ca.issue_flawed(&["localhost"], Some(Flaw::Expired)),
            "localhost",
            Some(EXPIRED),
        ),
        (
            "not yet valid",
            ca.issue_flawed(&["localhost"], Some(Flaw::NotYetValid)),
            "localhost",
            Some(NOT_YET),
        ),
        (
            "for another name",
            ca.issue(&["other.test"]),
            "localhost",
            Some(NAME),
        ),
        (
            "for clients only (EKU)",
            ca.issue_flawed(&["localhost"], Some(Flaw::ClientAuthOnly)),
            "localhost",
            Some(EKU),
        ),
        (
            "self-signed",
            ca.self_signed(&["localhost"]),
            "localhost",
            Some(SELF_SIGNED),
        ),
        (
            "with the name in the CN only",
            ca.issue_flawed(&["localhost"], Some(Flaw::CnOnly)),
            "localhost",
            Some(NAME),
        ),
        (
            "an IP SAN for an IP",
            ca.issue(&["127.0.0.1"]),
            "127.0.0.1",
            None,
        ),
        (
            "a DNS SAN spelling the IP",
            ca.issue_flawed(&["127.0.0.1"], Some(Flaw::IpAsDns)),
            "127.0.0.1",
            Some(NAME),
        ),
        (
            "a DNS name for an IP",
            ca.issue(&["localhost"]),
            "127.0.0.1",
            Some(NAME),
        ),
        (
            "an IP SAN for a DNS name",
            ca.issue(&["127.0.0.1"]),
            "localhost",
            Some(NAME),
        ),
        (
            "from the gateway's CA",
            pki.gateway_ca.issue(&["localhost"]),
            "localhost",
            Some(UNKNOWN_CA),
        ),
    ];
    for (what, leaf, host, want) in cases {
        let addr = serve(&leaf).await;
        let settings = Settings {
            proxy_https: Some(format!(
                "https://{}",
                crate::addr::authority(host, addr.port())
            )),
            ..pki.settings()
        };
        expect(
            what,
            HOP_PROXY,
            tunnel(settings, Route::Proxy, HOP_PROXY).await,
            want,
        );
    }
}
