//! `redirector check`: preflight for this node and this configuration. One line per check
//! (`ok`, `warn`, `FAIL`) with a fix under every failure: kernel and its features, cgroup v2,
//! bpffs, other programs on our hooks, the enterprise proxy, the gateway's reachability and
//! certificate, and a TLS-inspecting proxy on the gateway name.
//!
//! This file holds the report and the order of the checks; each topic has its own file:
//! `kernel` (the node), `hooks` (other programs on our hooks), `network` (enterprise proxy and
//! gateway reachability) and `gateway_tls` (the gateway's certificate, TLS interception).
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{
    bpf::{DEFAULT_PIN_ROOT, PinLayout},
    config::{Config, ConfigError, Settings},
};

mod gateway_tls;
mod hooks;
mod kernel;
mod network;

pub use gateway_tls::{CertFacts, GatewayProbe, Trust, cert_facts, judge_gateway};
pub use hooks::{Attached, judge_hooks, parse_bpftool};
pub use kernel::{Kconfig, kconfig_cgroup_bpf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub level: Level,
    pub detail: String,
    /// What to do about it; empty for `ok`.
    pub fix: Vec<String>,
}

impl Check {
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            level: Level::Ok,
            detail: detail.into(),
            fix: Vec::new(),
        }
    }
    fn warn(name: impl Into<String>, detail: impl Into<String>, fix: Vec<String>) -> Check {
        Check {
            name: name.into(),
            level: Level::Warn,
            detail: detail.into(),
            fix,
        }
    }
    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: Vec<String>) -> Check {
        Check {
            name: name.into(),
            level: Level::Fail,
            detail: detail.into(),
            fix,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// No check failed (warnings allowed).
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    fn new(checks: Vec<Check>) -> Report {
        Report {
            ok: !checks.iter().any(|c| c.level == Level::Fail),
            checks,
        }
    }
}

pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    for c in &r.checks {
        out += &format!("{:<4}  {}: {}\n", c.level.word(), c.name, c.detail);
        for f in &c.fix {
            out += &format!("      fix: {f}\n");
        }
    }
    let count = |l| r.checks.iter().filter(|c| c.level == l).count();
    out += &format!(
        "{} checks: {} ok, {} warn, {} FAIL\n",
        r.checks.len(),
        count(Level::Ok),
        count(Level::Warn),
        count(Level::Fail)
    );
    out
}

/// Runs every check. `settings` are the merged settings (for paths the config does not
/// keep, and for the node checks when the config itself is invalid).
pub async fn run(settings: &Settings, config: Result<Config, ConfigError>) -> Report {
    let pin_root = settings
        .pin_root
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT));
    let cgroup_root = settings
        .cgroup_root
        .clone()
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"));
    let mut checks = Vec::new();

    // The node.
    checks.push(kernel::release());
    let cgroup_v2 = kernel::cgroup_v2(&cgroup_root);
    let cgroup_ok = cgroup_v2.level == Level::Ok;
    checks.push(cgroup_v2);
    for c in settings.cgroup.iter().flatten() {
        checks.push(kernel::enabled_cgroup(c, &cgroup_root));
    }
    checks.push(kernel::bpffs(&pin_root));
    checks.push(kernel::btf(Path::new("/sys/kernel/btf/vmlinux")));
    let hooks = if cgroup_ok {
        hooks::scan(&cgroup_root, &PinLayout::new(&pin_root))
    } else {
        hooks::HookScan::not_checked()
    };
    checks.push(kernel::cgroup_bpf(hooks.queried));
    checks.push(hooks.check);

    // The configuration and the network path.
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            checks.push(Check::fail(
                "config",
                crate::error_chain(&e),
                vec!["correct the named setting (flags, REDIRECTOR_* env or --config file); proxy and gateway checks need a valid configuration".into()],
            ));
            return Report::new(checks);
        }
    };
    checks.extend(network::checks(&config, settings.gateway_ca.as_deref()).await);
    Report::new(checks)
}

/// The check called `name` (tests of every topic use it).
#[cfg(test)]
fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
    checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("{name} missing: {checks:#?}"))
}
