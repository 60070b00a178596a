//! Closed test network harness (see tests/README.md) and helpers for privileged end-to-end tests.
//!
//! Everything a test builds (network namespaces, cgroups under a privately mounted cgroup2
//! hierarchy, a bpffs pin directory, processes) is owned by a guard and torn down in `Drop`,
//! which also runs when the test panics.
pub mod lab;

/// One-line description of a finished command for assertion messages.
pub fn describe(o: &std::process::Output) -> String {
    format!(
        "status={} stdout={} stderr={}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Privileged and Squid prerequisites both present (see [`priv_check::privileged`]).
pub fn ready_with_squid(test: &str) -> bool {
    priv_check::privileged(test) && squid::available(test, &[])
}
/// Standard base64 (with padding), for looking for `Basic` credentials in output.
pub fn base64_encode(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

pub mod chain;
pub mod foreign_prog;
pub mod kube_api;
pub mod kube_apiserver;
pub mod kube_node;
/// The workspace's one test PKI (the `test-pki` crate), under its historical path.
pub use test_pki as pki;
pub mod priv_check;
pub mod squid;
