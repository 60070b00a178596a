//! Egress redirector daemon and CLI as a library; `main.rs` only parses and dispatches.
pub mod addr;
pub mod admin;
pub mod api;
pub mod bpf;
pub mod budget;
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod explain;
#[doc(hidden)]
pub mod fuzzing;
pub mod k8s;
pub mod kubelet;
pub mod netns;
pub mod node;
pub mod plan;
pub mod policy;
pub mod preflight;
pub mod proxy;
pub mod relay;
pub mod sniff;
pub mod state;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod tunnel;
pub mod workloads;

/// Renders an error and its sources on one line: `outer: inner: root cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}
