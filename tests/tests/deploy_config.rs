//! The shipped manifests must work with the daemon as built: the DaemonSet's arguments parse
//! with the real CLI, and the ConfigMap's config.yaml is read by the real config loader (no
//! unknown keys, every route valid).
use std::path::Path;

use clap::Parser;
use redirector::{
    cli::{Cli, Command},
    config::Settings,
    policy::RouteRule,
};

fn deploy(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn daemonset_args_parse_with_the_real_cli() {
    let ds: serde_json::Value = serde_norway::from_str(&deploy("base/daemonset.yaml")).unwrap();
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let cli = Cli::try_parse_from(std::iter::once("redirector".to_owned()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("daemonset args {args:?} do not parse: {e}"));
    let Command::Run(run) = cli.command else {
        panic!("daemonset does not run `redirector run`")
    };
    assert_eq!(
        run.settings.kubernetes,
        Some(true),
        "the DaemonSet must run in Kubernetes mode"
    );
    assert_eq!(
        run.config.as_deref(),
        Some(Path::new("/etc/redirector/config.yaml"))
    );
}

#[test]
fn configmap_config_is_read_by_the_real_loader() {
    let cm: serde_json::Value = serde_norway::from_str(&deploy("base/configmap.yaml")).unwrap();
    let text = cm["data"]["config.yaml"].as_str().expect("config.yaml key");
    let s = Settings::parse(Path::new("config.yaml"), text)
        .unwrap_or_else(|e| panic!("{}", redirector::error_chain(&e)));
    assert!(s.gateway_url.is_some() && s.proxy_skip_range.is_some());
    let skip: redirector::policy::SkipRanges = s
        .proxy_skip_range
        .as_deref()
        .unwrap()
        .parse()
        .expect("skip range");
    assert!(
        !skip.cidrs().is_empty(),
        "the service CIDR must be skipped in the kernel"
    );
    let routes = s.routes.expect("routes");
    assert!(!routes.is_empty());
    for r in &routes {
        RouteRule::from_raw(r).unwrap_or_else(|e| panic!("{r:?}: {e}"));
    }
}

#[test]
fn a_broken_config_would_be_caught() {
    // The check above can fail: an unknown key and a bad route are rejected.
    assert!(Settings::parse(Path::new("c.yaml"), "gateway-ur1: https://x\n").is_err());
    let s = Settings::parse(
        Path::new("c.yaml"),
        "routes:\n  - host: a.example\n    route: elsewhere\n",
    )
    .unwrap();
    assert!(RouteRule::from_raw(&s.routes.unwrap()[0]).is_err());
}
