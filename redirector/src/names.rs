//! The node's resolver, for the name checks of name-based `direct` rules: asynchronous (no
//! thread blocked per lookup) and with a cache that keeps each answer for its TTL, so a pod
//! opening many connections to one name costs one query per TTL, not one per connection.
//!
//! It reads the node's `/etc/resolv.conf` and `/etc/hosts` once, at start.
use std::{net::IpAddr, time::Duration};

use hickory_resolver::{
    TokioResolver,
    config::{ResolveHosts, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
};

/// How long a name check may hold a connection.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers kept at once (each for its TTL).
const CACHE_SIZE: u64 = 4096;

/// The name checks' resolver; cheap to clone (clones share the cache).
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// The node's resolver configuration. Without a readable `/etc/resolv.conf` only
    /// `/etc/hosts` answers (every other name check fails, so those connections take the
    /// default route).
    pub fn from_system() -> Resolver {
        let mut builder = TokioResolver::builder_tokio().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the node's resolver configuration; name checks use /etc/hosts only");
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), Vec::new()),
                TokioRuntimeProvider::default(),
            )
        });
        let o = builder.options_mut();
        o.cache_size = CACHE_SIZE;
        o.use_hosts_file = ResolveHosts::Always;
        o.timeout = LOOKUP_TIMEOUT;
        Resolver {
            inner: builder
                .build()
                .expect("a resolver with system or empty configuration builds"),
        }
    }

    /// The addresses of `host` (IPv4-mapped ones as IPv4), within [`LOOKUP_TIMEOUT`].
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        match tokio::time::timeout(LOOKUP_TIMEOUT, self.inner.lookup_ip(host)).await {
            Err(_) => Err(format!(
                "lookup timed out after {}s",
                LOOKUP_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(answer)) => Ok(answer.iter().map(|a| a.to_canonical()).collect()),
        }
    }
}
