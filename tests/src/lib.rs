//! Closed test network harness (DESIGN.md §6) and helpers for privileged end-to-end tests.
//!
//! Everything a test builds (network namespaces, cgroups under a privately mounted cgroup2
//! hierarchy, a bpffs pin directory, processes) is owned by a guard and torn down in `Drop`,
//! which also runs when the test panics.
pub mod lab;
pub mod priv_check;
pub mod pki;
pub mod squid;
pub mod chain;
pub mod kube_api;
pub mod kube_node;
