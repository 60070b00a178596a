//! `cargo xtask demo`: the product in one minute, on a closed network built for the purpose:
//! pod `curl https://portal.azure.test` with no proxy variables → redirector → Squid →
//! gateway simulator → target.
use anyhow::bail;
use tests::chain::{Chain, Gateway};

use crate::{exec, setup};

fn step(s: &str) {
    println!("\n==> {s}");
}

fn show(title: &str, o: &std::process::Output) {
    println!(
        "{title}: exit {}\n{}{}",
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn run() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        bail!("the demo creates network namespaces and attaches eBPF programs: run it as root");
    }
    setup::run()?;
    step(
        "building the redirector (with its embedded eBPF programs), the gateway simulator and the demo servers",
    );
    exec::build_all()?;

    step(
        "laying out a closed network: node, pod, internet targets, Squid (203.0.113.50), gateway simulator gw.arc.test (203.0.113.60)",
    );
    let mut c = Chain::new(1);
    let plain = c.lab.add_plain_cgroup("not-enabled");
    c.start_squid(true);
    c.start_gateway(Gateway::Normal);
    let pod = &c.lab.pods[0];
    println!("pod netns {} cgroup {}", pod.netns, pod.cgroup.display());
    println!(
        "pod routes (no default route):\n{}",
        tests::lab::sh(&format!("ip -n {} route", pod.netns))
    );

    step(
        "starting `redirector run --gateway-url https://gw.arc.test --gateway-ca <test ca> --proxy-https http://agent:***@203.0.113.50:3128 --proxy-allow-basic-over-http --cgroup <pod>`",
    );
    c.start_daemon(&[], "info");

    step("pod: env has no proxy variables");
    let env = c.lab.pods[0]
        .cmd("sh")
        .args(["-c", "env | grep -i _proxy || echo '(none)'"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&env.stdout));

    step("pod: curl https://portal.azure.test/hello  (end-to-end TLS with the target)");
    let o = c.curl(&["https://portal.azure.test/hello"]);
    show("curl", &o);
    step("pod: curl http://web.azure.test/plain");
    let o = c.curl(&["http://web.azure.test/plain"]);
    show("curl", &o);
    step("pod: curl https://denied.example.test/  (not on the gateway's allowlist)");
    let o = c.curl(&["https://denied.example.test/"]);
    show("curl", &o);
    step("same pod netns, a cgroup that is not enabled: untouched, so no route");
    let o = c.lab.pods[0]
        .cmd_in_cgroup(&plain, "curl")
        .args(["-sS", "--max-time", "5", "https://portal.azure.test/"])
        .output()?;
    show("curl", &o);

    step("Squid access log (the enterprise proxy sees only the gateway)");
    print!(
        "{}",
        c.squid.as_ref().map(|s| s.access_log()).unwrap_or_default()
    );
    step("gateway simulator log (tunnels by host name)");
    print!("{}", c.gateway_log());
    step("redirector audit lines");
    for l in c.daemon_log().lines().filter(|l| l.contains("audit")) {
        println!("{l}");
    }
    step("redirector status (from the pins)");
    print!("{}", String::from_utf8_lossy(&c.lab.status().stdout));

    step("cleaning up (processes, namespaces, cgroups, pins)");
    drop(c);
    println!("done");
    Ok(())
}

unsafe extern "C" {
    fn geteuid() -> u32;
}
