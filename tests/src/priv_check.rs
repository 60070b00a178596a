//! Whether privileged tests can run here, and the loud-skip rule.
use std::process::Command;

/// Returns true when the privileged tests can run. In CI (`CI=true`) a missing prerequisite
/// is a failure, never a skip; elsewhere the skip is printed with the reason.
pub fn privileged(test: &str) -> bool {
    let missing = missing_prerequisites();
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!("{test}: privileged prerequisites missing in CI: {why}");
    }
    eprintln!("skipped {test}: {why} (run as root with `cargo xtask test`)");
    false
}

fn missing_prerequisites() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        out.push("not running as root".to_owned());
    }
    for tool in ["ip", "nsenter", "curl", "python3", "bpftool"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            out.push(format!(
                "{tool} not installed (cargo xtask setup installs it)"
            ));
        }
    }
    out
}
