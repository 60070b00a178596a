//! Reload: the configuration is read again on SIGHUP and when the config file's content
//! changes; a bad one is rejected and the running one stays in force.
use std::{sync::Arc, time::Duration};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    cli::RunArgs,
    config::ConfigError,
    state::Shared,
    telemetry::{ReloadResult, ResultLabels},
};

/// The signals `redirector run` answers: SIGTERM and SIGINT stop it, SIGHUP reloads.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers (before anything is loaded, so a failure changes nothing).
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Reloads on SIGHUP and when the config file changes (checked every second) until SIGTERM
/// or SIGINT arrives.
/// `applied` is called with each configuration a reload puts in force.
pub async fn until_stopped(
    shared: &Shared,
    args: &RunArgs,
    mut signals: Signals,
    applied: &dyn Fn(&crate::config::Config),
) {
    let mut last_stamp = args.config.as_ref().map(|p| file_stamp(p));
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = signals.term.recv() => { info!("SIGTERM received, draining"); break; }
            _ = signals.int.recv() => { info!("SIGINT received, draining"); break; }
            _ = signals.hup.recv() => reload(shared, args, "SIGHUP", applied),
            _ = poll.tick() => {
                if let Some(p) = &args.config {
                    let now = file_stamp(p);
                    if last_stamp.as_ref() != Some(&now) {
                        last_stamp = Some(now);
                        reload(shared, args, "config file changed", applied);
                    }
                }
            }
        }
    }
}

/// Content fingerprint of the config file (ConfigMap mounts swap symlinks, so mtime alone
/// is not trustworthy; the content is small).
fn file_stamp(p: &std::path::Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(p).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

/// Re-reads the configuration; a bad one is rejected and the running one stays in force.
fn reload(shared: &Shared, args: &RunArgs, why: &str, applied: &dyn Fn(&crate::config::Config)) {
    let old = shared.config.load_full();
    let mut new = match args.load() {
        Ok(c) => c,
        Err(e) => {
            count(shared, ReloadResult::Rejected);
            error!(reason = why, error = %crate::error_chain(&e as &ConfigError), "config reload rejected; the previous configuration stays in force");
            return;
        }
    };
    let restart_only = old.restart_only_changes(&new);
    if !restart_only.is_empty() {
        warn!(settings = ?restart_only, "these settings change only on restart; keeping the running values");
        new.pin_root = old.pin_root.clone();
        new.cgroup_root = old.cgroup_root.clone();
        new.cgroups = old.cgroups.clone();
        new.kubernetes = old.kubernetes;
        new.proxy_port = old.proxy_port;
        new.admin_addr = old.admin_addr;
    }
    // Kernel skip ranges: new entries go in before stale ones come out (no gap).
    if let Err(e) = shared.maps().set_skip_ranges(&new.skip_cidrs()) {
        count(shared, ReloadResult::Rejected);
        error!(reason = why, error = %crate::error_chain(&e), "config reload failed updating the skip ranges; keeping the previous configuration");
        let _ = shared.maps().set_skip_ranges(&old.skip_cidrs());
        return;
    }
    shared
        .node_addrs
        .store(Arc::new(crate::node::node_addresses(&new.node_netns)));
    info!(reason = why, config = %serde_json::to_string(&new).unwrap_or_default(), "configuration reloaded");
    // New tunnels use sessions made with the new settings; old sessions are let go (tunnels
    // running on them are not affected).
    let pool = crate::tunnel::pool::GatewayPool::start(
        new.tunnel.clone(),
        new.pool,
        Arc::clone(&shared.metrics),
        &shared.shutdown,
    );
    applied(&new);
    shared.config.store(Arc::new(new));
    if let Some(old) = shared.gateway.swap(Some(pool)) {
        tokio::spawn(async move { old.close().await });
    }
    count(shared, ReloadResult::Applied);
}

/// Counts one reload by its result (`redirector_config_reloads_total`).
fn count(shared: &Shared, result: ReloadResult) {
    shared
        .metrics
        .reloads
        .get_or_create(&ResultLabels { result })
        .inc();
}
