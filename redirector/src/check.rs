//! `redirector check`: preflight for this node and this configuration. One line per check
//! (`ok`, `warn`, `FAIL`) with a fix under every failure: kernel and its features, cgroup v2,
//! bpffs, other programs on our hooks, the enterprise proxy, the gateway's reachability and
//! certificate, and a TLS-inspecting proxy on the gateway name.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};
use tokio_rustls::TlsConnector;

use crate::{
    bpf::{DEFAULT_PIN_ROOT, PinLayout},
    config::{Config, ConfigError, Settings},
    preflight::{self, PreflightError},
    tunnel::{GatewayConfig, ProxyConfig, ProxyScheme, Timeouts},
};
use redirector_common::names;

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
    checks.push(kernel());
    let cgroup_ok = match preflight::check_cgroup(&cgroup_root) {
        Ok(()) => {
            checks.push(Check::ok(
                "cgroup v2",
                format!("{} is a cgroup v2 directory", cgroup_root.display()),
            ));
            true
        }
        Err(e) => {
            checks.push(from_preflight("cgroup v2", &e));
            false
        }
    };
    for c in settings.cgroup.iter().flatten() {
        let name = format!("cgroup {}", c.display());
        match preflight::check_cgroup(c).and_then(|()| preflight::check_below(&cgroup_root, c)) {
            Ok(()) => checks.push(Check::ok(
                name,
                format!("exists, cgroup v2, below {}", cgroup_root.display()),
            )),
            Err(e) => checks.push(from_preflight(&name, &e)),
        }
    }
    checks.push(bpffs(&pin_root));
    checks.push(btf(Path::new("/sys/kernel/btf/vmlinux")));
    let hooks = if cgroup_ok {
        hooks(&cgroup_root, &PinLayout::new(&pin_root))
    } else {
        HookScan {
            check: Check::warn(
                "hooks",
                "not checked: the cgroup root is unusable (see above)",
                Vec::new(),
            ),
            queried: false,
        }
    };
    checks.push(cgroup_bpf(hooks.queried));
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
    checks.extend(network(&config, settings.proxy_cert.as_deref()).await);
    Report::new(checks)
}

fn kernel() -> Check {
    let release = preflight::kernel_release();
    match preflight::check_kernel_release(&release) {
        Ok(_) => Check::ok(
            "kernel",
            format!(
                "{release} (>= {}.{}: cgroup connect4/connect6 and sockops hooks, bpf_get_netns_cookie, SO_NETNS_COOKIE)",
                preflight::MIN_KERNEL.0,
                preflight::MIN_KERNEL.1
            ),
        ),
        Err(e @ PreflightError::KernelUnparsable { .. }) => Check::warn(
            "kernel",
            e.to_string(),
            vec![format!(
                "make sure the kernel is {}.{} or newer",
                preflight::MIN_KERNEL.0,
                preflight::MIN_KERNEL.1
            )],
        ),
        Err(e) => from_preflight("kernel", &e),
    }
}

/// Preflight messages read "what is wrong; how to fix it": split them into the two.
fn from_preflight(name: &str, e: &PreflightError) -> Check {
    if let PreflightError::NotCgroup2(p) = e {
        return Check::fail(name, format!("{} is not on a cgroup v2 filesystem (the hooks attach to cgroup v2 only)", p.display()), vec![
            "mount cgroup v2 (`mount -t cgroup2 none <dir>`, or boot with systemd.unified_cgroup_hierarchy=1) and pass that directory as --cgroup-root".into(),
        ]);
    }
    let (detail, fix) = split_fix(&e.to_string());
    Check::fail(name, detail, fix)
}

fn split_fix(msg: &str) -> (String, Vec<String>) {
    match msg.split_once("; ") {
        Some((what, fix)) => (what.to_owned(), vec![fix.to_owned()]),
        None => (msg.to_owned(), Vec::new()),
    }
}

fn bpffs(pin_root: &Path) -> Check {
    match preflight::check_bpffs(pin_root) {
        Ok(()) => Check::ok(
            "bpffs",
            format!(
                "{} is on a bpf filesystem (pins: {})",
                probe_dir(pin_root).display(),
                pin_root.display()
            ),
        ),
        Err(PreflightError::NoBpffs { path, mount_hint }) => {
            let mount = format!("mount -t bpf bpf {}", mount_hint.display());
            let mount = if mount_hint.exists() {
                mount
            } else {
                format!("mkdir -p {} && {mount}", mount_hint.display())
            };
            Check::fail(
                "bpffs",
                format!(
                    "{} is not on a bpf filesystem, so the pins under {} cannot be created",
                    path.display(),
                    pin_root.display()
                ),
                vec![
                    mount,
                    "or pass a --pin-root on a mounted bpffs (default /sys/fs/bpf/redirector)"
                        .into(),
                    "in Kubernetes, mount the host's /sys/fs/bpf into the pod".into(),
                ],
            )
        }
        Err(e) => from_preflight("bpffs", &e),
    }
}

fn probe_dir(pin_root: &Path) -> &Path {
    if pin_root.exists() {
        pin_root
    } else {
        pin_root.parent().unwrap_or(pin_root)
    }
}

fn btf(path: &Path) -> Check {
    if path.exists() {
        Check::ok("btf", format!("kernel BTF at {}", path.display()))
    } else {
        Check::warn(
            "btf",
            format!("{} is missing: the kernel has no BTF, so bpftool cannot show map fields by name", path.display()),
            vec!["use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's kernel since 2021 is)".into()],
        )
    }
}

/// Where the kernel's build configuration says CONFIG_CGROUP_BPF is.
#[derive(Debug, PartialEq, Eq)]
pub enum Kconfig {
    Yes,
    No,
    Unknown,
}

pub fn kconfig_cgroup_bpf(text: &str) -> Kconfig {
    for l in text.lines().map(str::trim) {
        if l == "CONFIG_CGROUP_BPF=y" {
            return Kconfig::Yes;
        }
        if l == "# CONFIG_CGROUP_BPF is not set" || l == "CONFIG_CGROUP_BPF=n" {
            return Kconfig::No;
        }
    }
    Kconfig::Unknown
}

/// `/proc/config.gz` (through `gzip -dc`), else `/boot/config-<release>`.
fn read_kconfig() -> Option<(String, String)> {
    if Path::new("/proc/config.gz").exists()
        && let Ok(o) = Command::new("gzip")
            .args(["-dc", "/proc/config.gz"])
            .output()
        && o.status.success()
    {
        return Some((
            "/proc/config.gz".into(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ));
    }
    let boot = format!("/boot/config-{}", preflight::kernel_release());
    std::fs::read_to_string(&boot).ok().map(|t| (boot, t))
}

fn cgroup_bpf(queried: bool) -> Check {
    let name = "cgroup bpf";
    match read_kconfig() {
        Some((src, text)) => match kconfig_cgroup_bpf(&text) {
            Kconfig::Yes => Check::ok(name, format!("CONFIG_CGROUP_BPF=y ({src})")),
            Kconfig::No => from_preflight(name, &PreflightError::NoCgroupBpf),
            Kconfig::Unknown if queried => Check::ok(name, format!("{src} does not mention CONFIG_CGROUP_BPF, but the kernel answered a cgroup program query")),
            Kconfig::Unknown => Check::warn(name, format!("{src} does not mention CONFIG_CGROUP_BPF"), vec!["make sure the kernel is built with CONFIG_CGROUP_BPF=y".into()]),
        },
        None if queried => Check::ok(name, "present (the kernel answered a cgroup program query; no kernel config to read)"),
        None => Check::warn(
            name,
            "unknown: neither /proc/config.gz nor /boot/config-<release> is readable",
            vec!["make sure the kernel is built with CONFIG_CGROUP_BPF=y (`redirector run` fails to attach otherwise)".into()],
        ),
    }
}

/// One entry of `bpftool -j cgroup show`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Attached {
    pub id: u32,
    pub attach_type: String,
    #[serde(default)]
    pub attach_flags: String,
    #[serde(default)]
    pub name: String,
}

/// The attach types our programs use, as bpftool names them (old and new spellings).
const OUR_HOOKS: [&str; 4] = [
    "cgroup_inet4_connect",
    "cgroup_inet6_connect",
    "sock_ops",
    "cgroup_sock_ops",
];

pub fn parse_bpftool(out: &str) -> Result<Vec<Attached>, String> {
    let t = out.trim();
    if t.is_empty() {
        // bpftool prints nothing at all for a cgroup without programs.
        return Ok(Vec::new());
    }
    serde_json::from_str(t).map_err(|e| format!("unexpected bpftool output: {e}"))
}

struct HookScan {
    check: Check,
    /// The kernel answered a BPF_PROG_QUERY on a cgroup (so cgroup BPF is built in).
    queried: bool,
}

fn bpftool(args: &[&str]) -> Result<String, String> {
    let o = Command::new("bpftool")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_owned())
    }
}

/// Programs on connect4/connect6/sockops at the attach point. aya has no public cgroup
/// program query (BPF_PROG_QUERY) for these attach types, so this asks bpftool.
fn hooks(root: &Path, pins: &PinLayout) -> HookScan {
    let name = "hooks";
    let root_s = root.display().to_string();
    let direct = match bpftool(&["-j", "cgroup", "show", &root_s]) {
        Err(e) if e.contains("No such file") || e.contains("os error 2") => {
            return HookScan {
                check: Check::warn(
                    name,
                    format!("bpftool not found: cannot list the programs attached to {root_s}"),
                    vec![
                        "install bpftool (Debian: apt-get install bpftool) and run check again"
                            .into(),
                    ],
                ),
                queried: false,
            };
        }
        Err(e) => {
            return HookScan {
                check: Check::warn(
                    name,
                    format!("`bpftool cgroup show {root_s}` failed: {e}"),
                    Vec::new(),
                ),
                queried: false,
            };
        }
        Ok(out) => match parse_bpftool(&out) {
            Ok(v) => v,
            Err(e) => {
                return HookScan {
                    check: Check::warn(name, e, Vec::new()),
                    queried: true,
                };
            }
        },
    };
    let effective = bpftool(&["-j", "cgroup", "show", &root_s, "effective"])
        .ok()
        .and_then(|o| parse_bpftool(&o).ok())
        .unwrap_or_default();
    let ours: BTreeSet<u32> = names::PROGRAMS
        .iter()
        .filter_map(|p| aya::programs::ProgramInfo::from_pin(pins.path(p)).ok())
        .map(|i| i.id())
        .collect();
    HookScan {
        check: judge_hooks(root, &direct, &effective, &ours),
        queried: true,
    }
}

/// Ours (pinned under our pin root), another redirector's (`rdr_*`), or someone else's.
pub fn judge_hooks(
    root: &Path,
    direct: &[Attached],
    effective: &[Attached],
    ours: &BTreeSet<u32>,
) -> Check {
    let name = "hooks";
    let on_hooks = |a: &&Attached| OUR_HOOKS.contains(&a.attach_type.as_str());
    let describe = |a: &Attached| {
        let whose = if ours.contains(&a.id) {
            "ours"
        } else if a.name.starts_with("rdr_") {
            "a redirector with another pin root"
        } else {
            "not ours"
        };
        let flags = if a.attach_flags.is_empty() {
            "exclusive".to_owned()
        } else {
            a.attach_flags.clone()
        };
        format!(
            "{} id {} on {} [{flags}] ({whose})",
            if a.name.is_empty() { "?" } else { &a.name },
            a.id,
            a.attach_type
        )
    };
    let at_root: Vec<&Attached> = direct.iter().filter(on_hooks).collect();
    let inherited: Vec<&Attached> = effective
        .iter()
        .filter(on_hooks)
        .filter(|e| !direct.iter().any(|d| d.id == e.id))
        .collect();
    let foreign: Vec<&Attached> = at_root
        .iter()
        .chain(inherited.iter())
        .copied()
        .filter(|a| !ours.contains(&a.id))
        .collect();
    let mut detail = if at_root.is_empty() {
        format!(
            "nothing on connect4/connect6/sockops at {} (ours attach when the daemon starts)",
            root.display()
        )
    } else {
        format!(
            "at {}: {}",
            root.display(),
            at_root
                .iter()
                .map(|a| describe(a))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    if !inherited.is_empty() {
        detail += &format!(
            "; inherited from an ancestor: {}",
            inherited
                .iter()
                .map(|a| describe(a))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let exclusive: Vec<&&Attached> = foreign
        .iter()
        .filter(|a| a.attach_flags.is_empty() || a.attach_flags == "override")
        .collect();
    if let Some(a) = exclusive
        .iter()
        .find(|a| at_root.iter().any(|r| r.id == a.id))
    {
        return Check::fail(
            name,
            detail,
            vec![format!(
                "{} is attached without BPF_F_ALLOW_MULTI, so ours cannot attach next to it: detach it (`bpftool cgroup detach {} {} id {}`) or use another --cgroup-root",
                a.name,
                root.display(),
                a.attach_type,
                a.id
            )],
        );
    }
    if foreign.is_empty() {
        return Check::ok(name, detail);
    }
    let (rdr, others): (Vec<&Attached>, Vec<&Attached>) =
        foreign.iter().partition(|a| a.name.starts_with("rdr_"));
    let mut fix = Vec::new();
    if !rdr.is_empty() {
        fix.push(format!(
            "a redirector whose pins are not under {} is attached here: pass its --pin-root, or remove it with `redirector uninstall --pin-root <its pin root>` before starting another",
            pins_hint(ours)
        ));
    }
    if !others.is_empty() {
        let names: Vec<&str> = others.iter().map(|a| a.name.as_str()).collect();
        fix.push(format!(
            "{} run on the same hooks as ours (every program runs, in attach order): make sure none of them rewrites or blocks the connects of enabled pods",
            names.join(", ")
        ));
    }
    Check::warn(name, detail, fix)
}

fn pins_hint(ours: &BTreeSet<u32>) -> &'static str {
    if ours.is_empty() {
        "this --pin-root (none found there)"
    } else {
        "this --pin-root"
    }
}

// ---------------------------------------------------------------------------------------
// Network: enterprise proxy, gateway, TLS interception.

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn network(config: &Config, extra_ca: Option<&Path>) -> Vec<Check> {
    let t = config.tunnel.timeouts;
    let gateway = config.tunnel.gateway.as_ref();
    let mut checks = Vec::new();
    let mut gw_stream: Option<Box<dyn Io>> = None;
    let mut proxy_issuer = None;
    let mut proxies: Vec<&ProxyConfig> = config.tunnel.proxy.iter().collect();
    if let Some(p) = config.tunnel_http.as_ref().and_then(|h| h.proxy.as_ref()) {
        proxies.push(p);
    }
    if proxies.is_empty() {
        checks.push(Check::ok(
            "proxy",
            "no enterprise proxy configured: the gateway and direct routes connect straight out",
        ));
    }
    for (i, p) in proxies.iter().enumerate() {
        let probe = check_proxy(p, gateway, &t).await;
        checks.push(probe.check);
        if i == 0 {
            // The first is the one the gateway hop goes through.
            gw_stream = probe.tunnel;
            proxy_issuer = probe.issuer;
        }
    }
    let Some(gw) = gateway else {
        checks.push(Check::ok(
            "gateway",
            "no --gateway-url configured: nothing to check",
        ));
        return checks;
    };
    let name = "gateway";
    let stream: Box<dyn Io> = match (&config.tunnel.proxy, gw_stream) {
        (Some(_), Some(s)) => s,
        (Some(p), None) => {
            checks.push(Check::fail(
                name,
                format!(
                    "{} not reached: the enterprise proxy {} did not open a tunnel to it",
                    gw.authority(),
                    p.url
                ),
                vec!["fix the proxy check above first".into()],
            ));
            checks.push(Check::warn(
                "tls interception",
                format!("not checked: no TLS session with {}", gw.server_name),
                Vec::new(),
            ));
            return checks;
        }
        (None, _) => match tcp(&gw.addr_host, gw.port, &t).await {
            Ok(s) => Box::new(s),
            Err(e) => {
                checks.push(Check::fail(name, format!("cannot connect to {}: {e}", gw.authority()), vec![
                    "check --gateway-url (and --gateway-connect-to) and that this node may reach the gateway through its firewall".into(),
                ]));
                checks.push(Check::warn(
                    "tls interception",
                    format!("not checked: no TLS session with {}", gw.server_name),
                    Vec::new(),
                ));
                return checks;
            }
        },
    };
    let via = match &config.tunnel.proxy {
        Some(p) => format!(" through {}", p.url),
        None => String::new(),
    };
    let trust = TrustStores::load(extra_ca);
    let probe = gateway_tls(gw, stream, &trust, &t).await;
    checks.extend(judge_gateway(
        gw,
        &via,
        &probe,
        proxy_issuer.as_deref(),
        extra_ca.is_some(),
    ));
    checks
}

async fn tcp(host: &str, port: u16, t: &Timeouts) -> Result<TcpStream, String> {
    match timeout(t.connect, TcpStream::connect((host, port))).await {
        Err(_) => Err(format!("timed out after {:?}", t.connect)),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(s)) => Ok(s),
    }
}

struct ProxyProbe {
    check: Check,
    /// The tunnel to the gateway, when the proxy opened one.
    tunnel: Option<Box<dyn Io>>,
    /// Issuer of the proxy's own certificate (https:// proxies).
    issuer: Option<String>,
}

async fn check_proxy(p: &ProxyConfig, gateway: Option<&GatewayConfig>, t: &Timeouts) -> ProxyProbe {
    let name = format!("proxy {}", p.url);
    let fail = |detail: String, fix: Vec<String>| ProxyProbe {
        check: Check::fail(name.clone(), detail, fix),
        tunnel: None,
        issuer: None,
    };
    let tcp = match tcp(&p.url.host, p.url.port, t).await {
        Ok(s) => s,
        Err(e) => {
            return fail(format!("cannot connect to {}: {e}", p.url.authority()), vec![
                "check the host and port in --proxy-https / --proxy-http and that this node may reach the proxy".into(),
            ]);
        }
    };
    let mut issuer = None;
    let mut stream: Box<dyn Io> = match (p.url.scheme, &p.tls) {
        (ProxyScheme::Http, _) => Box::new(tcp),
        (ProxyScheme::Https, None) => {
            return fail(
                "an https:// proxy without a TLS configuration".into(),
                Vec::new(),
            );
        }
        (ProxyScheme::Https, Some(tls)) => {
            let Ok(sni) = ServerName::try_from(p.url.host.clone()) else {
                return fail(
                    format!("{} is not a valid TLS server name", p.url.host),
                    Vec::new(),
                );
            };
            match timeout(t.tls_handshake, TlsConnector::from(Arc::clone(tls)).connect(sni, tcp)).await {
                Err(_) => return fail(format!("no TLS answer within {:?}", t.tls_handshake), vec!["is it an https:// proxy? use http:// in the proxy URL if it speaks plain HTTP".into()]),
                Ok(Err(e)) => {
                    return fail(format!("TLS with the proxy failed: {e}"), vec![
                        "pass the proxy's CA with --proxy-cert".into(),
                        "or use http:// in the proxy URL if it speaks plain HTTP".into(),
                    ]);
                }
                Ok(Ok(s)) => {
                    issuer = s.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| cert_facts(c)).map(|f| f.issuer_cn);
                    Box::new(s)
                }
            }
        }
    };
    let creds = if p.credentials.is_some() {
        "credentials accepted"
    } else {
        "no credentials needed"
    };
    let Some(gw) = gateway else {
        let detail = match p.credentials {
            Some(_) => format!(
                "{} reachable; credentials not verified (no gateway to CONNECT to)",
                p.url.authority()
            ),
            None => format!("{} reachable", p.url.authority()),
        };
        return ProxyProbe {
            check: Check::ok(name, detail),
            tunnel: None,
            issuer,
        };
    };
    let authority = gw.authority();
    match timeout(t.connect_response, connect(&mut stream, &authority, p)).await {
        Err(_) => fail(
            format!(
                "no answer to CONNECT {authority} within {:?}",
                t.connect_response
            ),
            vec!["check that this is an HTTP proxy that supports CONNECT".into()],
        ),
        Ok(Err(e)) => fail(
            format!("CONNECT {authority} failed: {e}"),
            vec!["check that this is an HTTP proxy that supports CONNECT".into()],
        ),
        Ok(Ok((status, reason))) => match status {
            200..=299 => ProxyProbe {
                check: Check::ok(
                    name,
                    format!("CONNECT {authority} answered {status} ({creds})"),
                ),
                tunnel: Some(stream),
                issuer,
            },
            407 => {
                let fix = match &p.credentials {
                    Some(_) => {
                        "the proxy rejected the credentials: check the user and password in the proxy URL or in --proxy-credentials-file"
                    }
                    None => {
                        "the proxy requires authentication: put user:password in the proxy URL or use --proxy-credentials-file"
                    }
                };
                fail(
                    format!("CONNECT {authority} answered 407 {reason}"),
                    vec![fix.into()],
                )
            }
            403 => fail(
                format!(
                    "CONNECT {authority} answered 403 {reason}: the proxy does not allow the gateway"
                ),
                vec![format!(
                    "ask the proxy administrators to allow CONNECT to {authority} (with long-lived connections)"
                )],
            ),
            _ => fail(
                format!("CONNECT {authority} answered {status} {reason}"),
                vec![format!(
                    "check the proxy's log for {authority}; the gateway name must resolve and be reachable from the proxy"
                )],
            ),
        },
    }
}

/// Sends `CONNECT authority` (with Basic credentials when configured) and reads the
/// response head. Returns status and reason.
async fn connect(
    stream: &mut Box<dyn Io>,
    authority: &str,
    p: &ProxyConfig,
) -> std::io::Result<(u16, String)> {
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some((user, pass)) = &p.credentials {
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", pass.expose()));
        req += &format!("Proxy-Authorization: Basic {basic}\r\n");
    }
    req += "\r\n";
    stream.write_all(req.as_bytes()).await?;
    stream.flush().await?;
    let mut buf = Vec::with_capacity(1024);
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    loop {
        let mut chunk = [0u8; 1024];
        // One byte at a time past the head would be slow; a proxy sends nothing after a 2xx
        // head until we speak TLS, so reading in chunks cannot eat tunnel bytes.
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("the proxy closed the connection before answering"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let status = resp.code.ok_or_else(|| bad("no status code"))?;
                let reason: String = resp
                    .reason
                    .unwrap_or("")
                    .chars()
                    .filter(|c| c.is_ascii_graphic() || *c == ' ')
                    .take(80)
                    .collect();
                return Ok((status, reason));
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => {}
            _ => return Err(bad("malformed response head")),
        }
    }
}

/// Root stores: the system's (public roots) and the system's plus `--proxy-cert`.
struct TrustStores {
    system: Arc<RootCertStore>,
    all: Arc<RootCertStore>,
    extra_error: Option<String>,
}

impl TrustStores {
    fn load(extra_ca: Option<&Path>) -> TrustStores {
        let mut system = RootCertStore::empty();
        system.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let mut all = system.clone();
        let mut extra_error = None;
        if let Some(p) = extra_ca {
            match CertificateDer::pem_file_iter(p).and_then(|it| it.collect::<Result<Vec<_>, _>>())
            {
                Ok(certs) => {
                    all.add_parsable_certificates(certs);
                }
                Err(e) => extra_error = Some(format!("cannot read {}: {e}", p.display())),
            }
        }
        TrustStores {
            system: Arc::new(system),
            all: Arc::new(all),
            extra_error,
        }
    }
}

/// Wraps the real verifier and remembers the chain it was shown and what it said: a
/// failed handshake does not expose the peer's certificates otherwise.
#[derive(Debug)]
struct Recorder {
    inner: Arc<WebPkiServerVerifier>,
    seen: Mutex<Option<Seen>>,
}

/// The chain a server presented (leaf first) and the verifier's verdict on it.
type Seen = (Vec<CertificateDer<'static>>, Result<(), rustls::Error>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let r = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        *self.seen.lock().expect("recorder lock") =
            Some((chain, r.as_ref().map(|_| ()).map_err(Clone::clone)));
        r
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What the leaf certificate says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertFacts {
    /// Issuer common name (or the whole issuer DN when it has no CN).
    pub issuer_cn: String,
    pub issuer: String,
    pub dns_names: Vec<String>,
}

pub fn cert_facts(der: &CertificateDer<'_>) -> Option<CertFacts> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let issuer = cert.issuer().to_string();
    let issuer_cn = cert
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| issuer.clone());
    let dns_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                x509_parser::extensions::GeneralName::DNSName(n) => Some((*n).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                    16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Some(CertFacts {
        issuer_cn,
        issuer,
        dns_names,
    })
}

/// How the gateway's chain is trusted.
#[derive(Clone, Debug, PartialEq)]
pub enum Trust {
    /// Chains to a system (public) root.
    Public,
    /// Chains only to a CA from --proxy-cert.
    ExtraOnly,
    /// Does not verify; the verifier's error.
    Untrusted(rustls::Error),
}

/// Result of the TLS handshake with the gateway.
pub struct GatewayProbe {
    /// Facts about the leaf and how it is trusted, when a certificate arrived.
    pub cert: Option<(CertFacts, Trust)>,
    /// The handshake error, verbatim (`None`: handshake completed).
    pub error: Option<String>,
    pub alpn: Option<String>,
    /// Problems loading --proxy-cert.
    pub extra_error: Option<String>,
}

async fn gateway_tls(
    gw: &GatewayConfig,
    stream: Box<dyn Io>,
    trust: &TrustStores,
    t: &Timeouts,
) -> GatewayProbe {
    let mut probe = GatewayProbe {
        cert: None,
        error: None,
        alpn: None,
        extra_error: trust.extra_error.clone(),
    };
    let provider = crate::tls::provider();
    let inner = match WebPkiServerVerifier::builder_with_provider(
        Arc::clone(&trust.all),
        Arc::clone(&provider),
    )
    .build()
    {
        Ok(v) => v,
        Err(e) => {
            probe.error = Some(format!("no trusted CA certificates at all ({e})"));
            return probe;
        }
    };
    let recorder = Arc::new(Recorder {
        inner,
        seen: Mutex::new(None),
    });
    // The daemon's own TLS settings (ALPN, client certificate), with the recording verifier.
    let mut cfg: ClientConfig = (*gw.tls).clone();
    cfg.dangerous()
        .set_certificate_verifier(Arc::clone(&recorder) as Arc<dyn ServerCertVerifier>);
    let Ok(sni) = ServerName::try_from(gw.server_name.clone()) else {
        probe.error = Some(format!("{} is not a valid TLS server name", gw.server_name));
        return probe;
    };
    match timeout(
        t.tls_handshake,
        TlsConnector::from(Arc::new(cfg)).connect(sni.clone(), stream),
    )
    .await
    {
        Err(_) => probe.error = Some(format!("no TLS answer within {:?}", t.tls_handshake)),
        Ok(Err(e)) => probe.error = Some(e.to_string()),
        Ok(Ok(s)) => {
            probe.alpn = s
                .get_ref()
                .1
                .alpn_protocol()
                .map(|a| String::from_utf8_lossy(a).into_owned())
        }
    }
    let seen = recorder.seen.lock().expect("recorder lock").take();
    if let Some((chain, result)) = seen {
        let trust_kind = match result {
            Err(e) => Trust::Untrusted(e),
            Ok(()) => {
                let public = WebPkiServerVerifier::builder_with_provider(
                    Arc::clone(&trust.system),
                    provider,
                )
                .build()
                .is_ok_and(|v| {
                    v.verify_server_cert(&chain[0], &chain[1..], &sni, &[], UnixTime::now())
                        .is_ok()
                });
                if public {
                    Trust::Public
                } else {
                    Trust::ExtraOnly
                }
            }
        };
        if let Some(facts) = cert_facts(&chain[0]) {
            probe.cert = Some((facts, trust_kind));
        }
    }
    probe
}

/// Issuer names of common TLS-inspection products (matched case-insensitively).
const INSPECTORS: &[&str] = &[
    "zscaler",
    "netskope",
    "palo alto",
    "fortinet",
    "fortigate",
    "blue coat",
    "bluecoat",
    "forcepoint",
    "websense",
    "skyhigh",
    "mcafee web gateway",
    "sophos",
    "check point",
    "checkpoint",
    "umbrella",
    "symantec web",
    "iboss",
    "barracuda",
    "mitmproxy",
    "cloudflare gateway",
    "squid",
];

/// Gateway names whose real certificate chains to a public root (the Arc gateway).
fn expects_public_cert(server_name: &str) -> bool {
    let n = server_name.to_ascii_lowercase();
    n.ends_with(".azure.com") || n.ends_with(".microsoft.com")
}

/// The `gateway` and `tls interception` lines from a handshake's outcome.
pub fn judge_gateway(
    gw: &GatewayConfig,
    via: &str,
    probe: &GatewayProbe,
    proxy_issuer: Option<&str>,
    have_extra_ca: bool,
) -> Vec<Check> {
    let server = &gw.server_name;
    let target = format!("{} (SNI {server}){via}", gw.authority());
    let mut out = Vec::new();
    let intercepted = |issuer: &str| {
        format!(
            "the certificate for {server} was issued by {issuer}: a TLS-inspecting proxy is intercepting the gateway name; exempt {server} from TLS inspection"
        )
    };
    let exempt = vec![format!(
        "exempt {server} from TLS inspection on the enterprise proxy: the redirector's CONNECT to the target travels inside this TLS session"
    )];
    let Some((facts, trust)) = &probe.cert else {
        let err = probe
            .error
            .clone()
            .unwrap_or_else(|| "no certificate".into());
        out.push(Check::fail(
            "gateway",
            format!("TLS with {target} failed: {err}"),
            vec![format!(
                "check --gateway-url: {}:{} must be the gateway's HTTPS endpoint",
                gw.addr_host, gw.port
            )],
        ));
        out.push(Check::warn(
            "tls interception",
            format!("not checked: no certificate from {server}"),
            Vec::new(),
        ));
        return out;
    };
    let lower = facts.issuer.to_ascii_lowercase();
    let vendor = INSPECTORS.iter().find(|v| lower.contains(*v));
    let same_as_proxy = proxy_issuer.is_some_and(|p| p == facts.issuer_cn);
    let issuer = format!("\"{}\"", facts.issuer_cn);

    // 1. The gateway line: did the handshake (and verification) succeed?
    match (trust, &probe.error) {
        (Trust::Untrusted(e), _) => {
            let mut fix = Vec::new();
            match e {
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
                ) => fix.push(format!(
                    "check --gateway-url: the certificate is for {}, not {server}",
                    if facts.dns_names.is_empty() { "other names".to_owned() } else { facts.dns_names.join(", ") }
                )),
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired
                    | rustls::CertificateError::ExpiredContext { .. }
                    | rustls::CertificateError::NotValidYet
                    | rustls::CertificateError::NotValidYetContext { .. },
                ) => fix.push("the certificate is outside its validity period: check this node's clock, or have the gateway's certificate renewed".into()),
                _ => {
                    fix.push(format!("pass the gateway's CA with --proxy-cert (the certificate was issued by {issuer})"));
                    fix.push("check --gateway-url".into());
                }
            }
            if let Some(x) = &probe.extra_error {
                fix.push(format!("--proxy-cert could not be used: {x}"));
            }
            out.push(Check::fail("gateway", format!("TLS with {target}: {e} (issuer {issuer})"), fix));
        }
        (_, Some(err)) => out.push(Check::fail("gateway", format!("TLS with {target} failed after the certificate was accepted: {err}"), vec![
            "if the gateway requires a client certificate, pass --gateway-client-cert and --gateway-client-key".into(),
        ])),
        (t, None) => {
            let how = match t {
                Trust::Public => "chains to a public root",
                _ => "trusted through --proxy-cert",
            };
            let alpn = probe.alpn.as_deref().unwrap_or("none");
            let offered_h2 = gw.tls.alpn_protocols.iter().any(|p| p == b"h2");
            let (alpn_ok, speaks) = match probe.alpn.as_deref() {
                None | Some("http/1.1") => (true, "HTTP/1.1 CONNECT, one TLS session per tunnel"),
                Some("h2") if offered_h2 => (true, "HTTP/2 CONNECT streams on a shared session"),
                Some(_) => (false, ""),
            };
            if alpn_ok {
                let detail = format!("TLS with {target} ok: certificate issued by {issuer} ({how}), ALPN {alpn}: {speaks}");
                out.push(Check::ok("gateway", detail));
            } else {
                let detail = format!("TLS with {target} ok: certificate issued by {issuer} ({how}), ALPN {alpn}");
                out.push(Check::fail("gateway", detail, vec!["the gateway chose an ALPN protocol the redirector did not offer (it speaks http/1.1 and, unless --gateway-http2=false, h2)".into()]));
            }
        }
    }

    // 2. Is somebody in the middle?
    let name = "tls interception";
    let definite = vendor.is_some()
        || same_as_proxy
        || (expects_public_cert(server) && *trust != Trust::Public);
    if definite {
        let mut detail = intercepted(&issuer);
        if same_as_proxy {
            detail += " (the same CA issued the enterprise proxy's own certificate)";
        } else if expects_public_cert(server) {
            detail += &format!(" ({server}'s real certificate chains to a public root)");
        }
        out.push(Check::fail(name, detail, exempt));
        return out;
    }
    match trust {
        Trust::Public => out.push(Check::ok(name, format!("none seen: the certificate for {server} chains to a public root (issuer {issuer})"))),
        Trust::ExtraOnly => out.push(Check::warn(
            name,
            format!(
                "the certificate for {server} was issued by {issuer}, a CA that is not a public root and is trusted only through --proxy-cert: expected for a self-hosted gateway"
            ),
            vec![format!("if {issuer} is your TLS-inspecting proxy's CA, the proxy is intercepting the gateway name: exempt {server} from TLS inspection")],
        )),
        Trust::Untrusted(_) => out.push(Check::warn(
            name,
            format!("cannot tell: the certificate for {server} was issued by {issuer}, which nothing here trusts"),
            vec![if have_extra_ca {
                format!("if {issuer} is your TLS-inspecting proxy's CA, exempt {server} from TLS inspection; if it is the gateway's real CA, add it to --proxy-cert")
            } else {
                format!("if {issuer} is your TLS-inspecting proxy's CA, exempt {server} from TLS inspection; if it is the gateway's real CA, pass it with --proxy-cert")
            }],
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    use rustls::{ServerConfig, pki_types::PrivateKeyDer};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    fn ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }

    /// A TLS server for `name` with a leaf from `issuer`; answers one handshake.
    async fn tls_server(
        issuer: &CertifiedIssuer<'static, KeyPair>,
        name: &str,
    ) -> std::net::SocketAddr {
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
        let cfg = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let a = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = a.accept(s).await {
                        let _ = tls.read(&mut [0u8; 16]).await;
                    }
                });
            }
        });
        addr
    }

    fn settings_for(addr: std::net::SocketAddr, ca_file: Option<&Path>) -> Settings {
        Settings {
            gateway_url: Some(format!("https://gw.arc.test:{}", addr.port())),
            gateway_connect_to: Some("127.0.0.1".into()),
            proxy_cert: ca_file.map(Path::to_owned),
            pin_root: Some("/tmp/rdr-check-unit/pins".into()),
            cgroup_root: Some("/tmp".into()),
            connect_timeout: Some(2.0),
            tls_timeout: Some(2.0),
            ..Default::default()
        }
    }

    async fn run_network(s: &Settings) -> Vec<Check> {
        let config = Config::build(s.clone()).unwrap();
        network(&config, s.proxy_cert.as_deref()).await
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("{name} missing: {checks:#?}"))
    }

    #[tokio::test]
    async fn gateway_trusted_through_proxy_cert_is_ok_with_a_note() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("lab gateway ca");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let addr = tls_server(&ca, "gw.arc.test").await;
        let checks = run_network(&settings_for(addr, Some(&ca_file))).await;
        let gw = find(&checks, "gateway");
        assert_eq!(gw.level, Level::Ok, "{gw:?}");
        assert!(
            gw.detail.contains("\"lab gateway ca\"") && gw.detail.contains("--proxy-cert"),
            "{gw:?}"
        );
        let tls = find(&checks, "tls interception");
        assert_eq!(tls.level, Level::Warn, "{tls:?}");
    }

    #[tokio::test]
    async fn untrusted_gateway_fails_with_the_verifier_error_and_the_proxy_cert_fix() {
        let dir = tempfile::tempdir().unwrap();
        let trusted = ca("lab gateway ca");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, trusted.pem()).unwrap();
        let addr = tls_server(&ca("someone else"), "gw.arc.test").await;
        let checks = run_network(&settings_for(addr, Some(&ca_file))).await;
        let gw = find(&checks, "gateway");
        assert_eq!(gw.level, Level::Fail, "{gw:?}");
        assert!(
            gw.detail.contains("UnknownIssuer") && gw.detail.contains("\"someone else\""),
            "{gw:?}"
        );
        assert!(
            gw.fix[0].contains("pass the gateway's CA with --proxy-cert"),
            "{gw:?}"
        );
        // A certificate for another name: check the URL.
        let addr = tls_server(&trusted, "other.example").await;
        let checks = run_network(&settings_for(addr, Some(&ca_file))).await;
        let gw = find(&checks, "gateway");
        assert!(
            gw.level == Level::Fail
                && gw.fix[0].contains("check --gateway-url")
                && gw.fix[0].contains("other.example"),
            "{gw:?}"
        );
    }

    #[tokio::test]
    async fn nothing_listening_is_a_clear_failure() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let checks = run_network(&settings_for(addr, None)).await;
        let gw = find(&checks, "gateway");
        assert_eq!(gw.level, Level::Fail);
        assert!(
            gw.detail.contains("cannot connect") && gw.fix[0].contains("--gateway-url"),
            "{gw:?}"
        );
    }

    /// A proxy that answers every CONNECT with `status` and records the request.
    async fn fake_proxy(status: &'static str) -> (std::net::SocketAddr, Arc<Mutex<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(String::new()));
        let s2 = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                s2.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn proxy_407_names_the_credentials_and_never_prints_them() {
        let (addr, seen) = fake_proxy("407 Proxy Authentication Required").await;
        let mut s = settings_for(addr, None);
        s.proxy_https = Some(format!("http://agent:Pw-sekrit@{addr}"));
        let checks = run_network(&s).await;
        let p = checks
            .iter()
            .find(|c| c.name.starts_with("proxy "))
            .unwrap();
        assert_eq!(p.level, Level::Fail, "{p:?}");
        assert!(
            p.detail.contains("407") && p.fix[0].contains("rejected the credentials"),
            "{p:?}"
        );
        assert!(
            seen.lock().unwrap().contains("Proxy-Authorization: Basic "),
            "credentials were sent"
        );
        assert_eq!(find(&checks, "gateway").level, Level::Fail);
        let text = render_text(&Report::new(checks));
        assert!(!text.contains("Pw-sekrit"), "{text}");
        let (addr, _) = fake_proxy("403 Forbidden").await;
        let mut s = settings_for(addr, None);
        s.proxy_https = Some(format!("http://{addr}"));
        let checks = run_network(&s).await;
        let p = checks
            .iter()
            .find(|c| c.name.starts_with("proxy "))
            .unwrap();
        assert!(
            p.detail.contains("403") && p.fix[0].contains("allow CONNECT"),
            "{p:?}"
        );
    }

    fn gw_config(name: &str) -> GatewayConfig {
        let tls = crate::tls::client_config(None, None, &[b"http/1.1"]).unwrap();
        GatewayConfig::from_url(&format!("https://{name}"), tls).unwrap()
    }

    fn probe(issuer: &str, trust: Trust) -> GatewayProbe {
        let error = match &trust {
            Trust::Untrusted(e) => Some(e.to_string()),
            _ => None,
        };
        GatewayProbe {
            cert: Some((
                CertFacts {
                    issuer_cn: issuer.into(),
                    issuer: format!("CN={issuer}"),
                    dns_names: Vec::new(),
                },
                trust,
            )),
            error,
            alpn: Some("http/1.1".into()),
            extra_error: None,
        }
    }

    #[test]
    fn gateway_alpn_h2_is_fine_when_offered_and_named() {
        let mut p = probe("Corp CA", Trust::ExtraOnly);
        p.alpn = Some("h2".into());
        let both = crate::tls::client_config(None, None, &[b"h2", b"http/1.1"]).unwrap();
        let gw = GatewayConfig::from_url("https://gw.corp.example", both).unwrap();
        let c = find(&judge_gateway(&gw, "", &p, None, true), "gateway").clone();
        assert_eq!(c.level, Level::Ok, "{c:?}");
        assert!(
            c.detail
                .ends_with("ALPN h2: HTTP/2 CONNECT streams on a shared session"),
            "{c:?}"
        );
        // h2 without having offered it (--gateway-http2=false) is a gateway fault.
        let c = find(
            &judge_gateway(&gw_config("gw.corp.example"), "", &p, None, true),
            "gateway",
        )
        .clone();
        assert_eq!(c.level, Level::Fail, "{c:?}");
    }

    #[test]
    fn interception_is_named_for_public_gateways_inspector_cas_and_the_proxys_own_ca() {
        let unknown = Trust::Untrusted(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        let cases = [
            (
                "pfx.gw.arc.azure.com",
                "Corp Inspection CA",
                unknown.clone(),
                None,
                Level::Fail,
            ),
            (
                "pfx.gw.arc.azure.com",
                "Corp Inspection CA",
                Trust::ExtraOnly,
                None,
                Level::Fail,
            ),
            (
                "pfx.gw.arc.azure.com",
                "Microsoft Azure RSA TLS Issuing CA 03",
                Trust::Public,
                None,
                Level::Ok,
            ),
            (
                "gw.corp.example",
                "Zscaler Intermediate Root CA",
                Trust::ExtraOnly,
                None,
                Level::Fail,
            ),
            (
                "gw.corp.example",
                "Corp CA",
                Trust::ExtraOnly,
                Some("Corp CA"),
                Level::Fail,
            ),
            (
                "gw.corp.example",
                "Corp CA",
                Trust::ExtraOnly,
                None,
                Level::Warn,
            ),
            ("gw.corp.example", "Corp CA", unknown, None, Level::Warn),
        ];
        for (name, issuer, trust, proxy, want) in cases {
            let checks = judge_gateway(&gw_config(name), "", &probe(issuer, trust), proxy, true);
            let c = find(&checks, "tls interception");
            assert_eq!(c.level, want, "{name} {issuer}: {c:?}");
            if want == Level::Fail {
                assert!(
                    c.detail.starts_with(&format!("the certificate for {name} was issued by \"{issuer}\": a TLS-inspecting proxy is intercepting the gateway name; exempt {name} from TLS inspection")),
                    "{c:?}"
                );
            }
        }
    }

    #[test]
    fn hooks_ours_foreign_and_exclusive() {
        let a = |id, t: &str, flags: &str, name: &str| Attached {
            id,
            attach_type: t.into(),
            attach_flags: flags.into(),
            name: name.into(),
        };
        let ours: BTreeSet<u32> = [1, 2, 3].into();
        let mine = vec![
            a(1, "cgroup_inet4_connect", "multi", "rdr_connect4"),
            a(2, "cgroup_inet6_connect", "multi", "rdr_connect6"),
            a(3, "cgroup_sock_ops", "multi", "rdr_sockops"),
        ];
        let root = Path::new("/sys/fs/cgroup");
        let c = judge_hooks(root, &mine, &mine, &ours);
        assert_eq!(c.level, Level::Ok, "{c:?}");
        assert!(
            c.detail
                .contains("rdr_connect4 id 1 on cgroup_inet4_connect [multi] (ours)"),
            "{c:?}"
        );
        let mut more = mine.clone();
        more.push(a(9, "cgroup_inet4_connect", "multi", "cil_sock4_conne"));
        more.push(a(10, "cgroup_skb_ingress", "multi", "unrelated"));
        let c = judge_hooks(root, &more, &more, &ours);
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(
            c.detail.contains("cil_sock4_conne id 9")
                && c.detail.contains("not ours")
                && !c.detail.contains("unrelated"),
            "{c:?}"
        );
        let c = judge_hooks(
            root,
            &[a(7, "cgroup_inet4_connect", "", "legacy")],
            &[],
            &ours,
        );
        assert_eq!(c.level, Level::Fail, "{c:?}");
        assert!(
            c.fix[0].contains("bpftool cgroup detach /sys/fs/cgroup cgroup_inet4_connect id 7"),
            "{c:?}"
        );
        let c = judge_hooks(
            root,
            &[],
            &[a(5, "cgroup_inet4_connect", "multi", "rdr_connect4")],
            &ours,
        );
        assert!(
            c.level == Level::Warn
                && c.detail.contains("inherited")
                && c.detail.contains("a redirector with another pin root"),
            "{c:?}"
        );
        assert!(
            c.fix[0].contains("redirector uninstall --pin-root"),
            "{c:?}"
        );
        assert_eq!(parse_bpftool("").unwrap(), Vec::new());
        let parsed = parse_bpftool(r#"[{"id":236,"attach_type":"cgroup_inet4_connect","attach_flags":"multi","name":"rdr_connect4"}]"#).unwrap();
        assert_eq!(parsed[0].id, 236);
    }

    #[test]
    fn preflight_messages_split_into_detail_and_fix() {
        let c = bpffs(Path::new("/tmp/rdr-check-unit-nope/pins"));
        assert_eq!(c.level, Level::Fail);
        assert!(
            c.fix[0].contains("mount -t bpf bpf /tmp/rdr-check-unit-nope"),
            "{c:?}"
        );
        let c = from_preflight("cgroup v2", &PreflightError::NotCgroup2("/tmp".into()));
        assert!(
            c.detail
                .starts_with("/tmp is not on a cgroup v2 filesystem")
                && c.fix[0].contains("mount -t cgroup2"),
            "{c:?}"
        );
        let c = from_preflight(
            "kernel",
            &PreflightError::KernelTooOld {
                release: "5.10.0".into(),
            },
        );
        assert!(
            c.detail.contains("5.10.0") && c.fix == ["run on a newer kernel"],
            "{c:?}"
        );
        assert_eq!(
            kconfig_cgroup_bpf("CONFIG_BPF=y\nCONFIG_CGROUP_BPF=y\n"),
            Kconfig::Yes
        );
        assert_eq!(
            kconfig_cgroup_bpf("# CONFIG_CGROUP_BPF is not set\n"),
            Kconfig::No
        );
        assert_eq!(kconfig_cgroup_bpf("CONFIG_BPF=y\n"), Kconfig::Unknown);
        let r = Report::new(vec![
            Check::ok("kernel", "6.1"),
            Check::fail("bpffs", "x", vec!["mount it".into()]),
        ]);
        assert!(!r.ok);
        assert_eq!(
            render_text(&r),
            "ok    kernel: 6.1\nFAIL  bpffs: x\n      fix: mount it\n2 checks: 1 ok, 0 warn, 1 FAIL\n"
        );
    }
}
