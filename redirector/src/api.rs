//! The JSON of the admin endpoint's `/workloads` and `/connections`, for server and clients.
//!
//! The daemon serves these types and `redirector status` / `explain` read them back, so the
//! wire format is written down once. Readers tolerate unknown fields and fill missing ones
//! with defaults, so a newer or older daemon still parses.
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One enabled (or waiting) workload, as `GET /workloads` lists it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct WorkloadView {
    pub key: String,
    /// `namespace/pod` in Kubernetes mode, the cgroup path otherwise.
    pub label: String,
    /// The cgroup directory, once it exists.
    pub cgroup: Option<String>,
    pub cgroup_id: Option<u64>,
    /// Redirected in the kernel, with a listener in every netns it uses.
    pub listening: bool,
    /// `waiting` (no cgroup or no process yet), `refused` (no listener could be bound: its
    /// connects fail with EPERM), `redirect`, or `audit` (observed and counted, not
    /// redirected).
    pub state: String,
    /// The listener port its entry points at, while redirected.
    pub port: Option<u16>,
}

/// One live connection, as `GET /connections` lists it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct ConnView {
    pub workload: String,
    pub src: String,
    pub orig_dst: String,
    pub host: Option<String>,
    pub route: String,
    /// When the relay started. Kept by the daemon only; what travels is `since_ms`.
    #[serde(skip)]
    pub started: Instant,
    /// Age in milliseconds, filled in when served.
    pub since_ms: u64,
}

impl Default for ConnView {
    fn default() -> Self {
        ConnView {
            workload: String::new(),
            src: String::new(),
            orig_dst: String::new(),
            host: None,
            route: String::new(),
            started: Instant::now(),
            since_ms: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_json_shapes_parse_and_tolerate_extras() {
        let w: Vec<WorkloadView> = serde_json::from_str(
            r#"[{"key":"k","label":"ns/p","cgroup":"/sys/fs/cgroup/x","cgroup_id":12,"listening":true,"future":1},
                {"key":"k2","label":"ns/q","cgroup":null,"cgroup_id":null,"listening":false}]"#,
        )
        .unwrap();
        assert_eq!(w[0].cgroup_id, Some(12));
        assert!(w[0].listening && w[1].cgroup.is_none());
        let c: Vec<ConnView> = serde_json::from_str(
            r#"[{"workload":"ns/p","src":"10.0.0.1:1","orig_dst":"1.2.3.4:443","host":null,"route":"proxy","since_ms":5}]"#,
        )
        .unwrap();
        assert_eq!(c[0].route, "proxy");
        assert_eq!(c[0].host, None);
    }

    #[test]
    fn served_connections_carry_their_age_not_their_start() {
        let c = ConnView {
            workload: "ns/p".into(),
            since_ms: 5,
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"workload":"ns/p","src":"","orig_dst":"","host":null,"route":"","since_ms":5}"#
        );
    }
}
