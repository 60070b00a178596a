//! `cargo xtask demo`: the product in one minute, on a closed network built for the purpose.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::bail;
use tests::lab::Lab;

use crate::{exec, setup};

fn step(s: &str) {
    println!("\n==> {s}");
}

pub fn run() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        bail!("the demo creates network namespaces and attaches eBPF programs: run it as root");
    }
    setup::run()?;
    step("building the redirector (with its embedded eBPF programs) and the demo servers");
    exec::build_all()?;

    step("laying out a closed network: node, pod (netns + cgroup), internet host 203.0.113.10");
    let mut lab = Lab::new();
    lab.add_pod();
    let plain = lab.add_plain_cgroup("not-enabled");
    let inet = lab.add_host("inet", &[Lab::inet_v4(0)], &[]);
    lab.start_testsrv(&inet, "http", &[SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 80)]);
    let pod = &lab.pods[0];
    println!("pod netns {} cgroup {}", pod.netns, pod.cgroup.display());
    let routes = tests::lab::sh(&format!("ip -n {} route", pod.netns));
    println!("pod routes (no default route, nothing to 203.0.113.10):\n{routes}");

    step("starting `redirector run --cgroup <pod cgroup>` in the node namespace");
    let d = lab.start_daemon(&[]);

    step("pod: curl http://203.0.113.10/ with no proxy variables");
    let env = lab.pods[0].cmd("sh").args(["-c", "env | grep -i _proxy || echo '(no proxy variables)'"]).output()?;
    print!("{}", String::from_utf8_lossy(&env.stdout));
    let o = lab.pods[0].cmd("curl").args(["-sS", "--max-time", "10", "http://203.0.113.10/demo"]).output()?;
    println!("curl exit {}: {}{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));

    step("same pod netns, but a cgroup that is not enabled: untouched, so no route");
    let o = lab.pods[0].cmd_in_cgroup(&plain, "curl").args(["-sS", "--max-time", "5", "http://203.0.113.10/demo"]).output()?;
    println!("curl exit {}: {}", o.status, String::from_utf8_lossy(&o.stderr).trim());

    step("what the redirector logged");
    print!("{}", lab.procs[d].log());

    step("redirector status (from the pins)");
    print!("{}", String::from_utf8_lossy(&lab.status().stdout));

    step("cleaning up (namespaces, cgroups, pins)");
    drop(lab);
    println!("done");
    Ok(())
}

unsafe extern "C" {
    fn geteuid() -> u32;
}
