//! Test fixture that runs Debian's real Squid as the enterprise proxy:
//! no caching, CONNECT only to the configured ports, optional Basic auth, no DNS (names come
//! from a hosts file the caller fills), everything it writes kept in one work directory.
//!
//! Access log lines (`access.log` in the work directory) have the form
//! `<client-ip> <method> <url> <status> <squid-result-code> <user>`, e.g.
//! `127.0.0.1 CONNECT example.test:443 200 TCP_TUNNEL alice`. Squid writes the line of a
//! CONNECT when the tunnel *ends*; use [`Squid::wait_access_log`] to wait for it.
use std::{
    fs,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    os::unix::fs::{PermissionsExt as _, chown},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::{Pid, User},
};

/// The unprivileged user Debian's Squid switches to after binding its port.
const SQUID_USER: &str = "proxy";
const BASIC_NCSA_AUTH: &str = "/usr/lib/squid/basic_ncsa_auth";
const START_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run one Squid instance.
#[derive(Clone, Debug)]
pub struct SquidOptions {
    /// Run inside this network namespace (`ip netns exec`); the host's otherwise.
    pub netns: Option<String>,
    /// `http_port`: the address clients connect to.
    pub listen: SocketAddr,
    /// Config, logs, pid file, password and hosts files go here. Created if missing and
    /// handed to the `proxy` user; every ancestor must be searchable by `proxy` (o+x).
    pub workdir: PathBuf,
    /// Require Basic auth with this user and password (`basic_ncsa_auth`).
    pub basic_auth: Option<(String, String)>,
    /// Ports CONNECT may go to; any other gets 403.
    pub allow_connect_ports: Vec<u16>,
    /// Entries of Squid's private hosts file (Squid does no DNS in tests).
    pub hosts: Vec<(String, IpAddr)>,
}

impl SquidOptions {
    /// No auth, CONNECT to 443 only, host network namespace, empty hosts file.
    pub fn new(listen: SocketAddr, workdir: impl Into<PathBuf>) -> SquidOptions {
        SquidOptions {
            netns: None,
            listen,
            workdir: workdir.into(),
            basic_auth: None,
            allow_connect_ports: vec![443],
            hosts: Vec::new(),
        }
    }
}

/// A running Squid; stopped (by pid) and reaped when dropped.
pub struct Squid {
    child: Child,
    listen: SocketAddr,
    workdir: PathBuf,
}

impl Squid {
    /// Writes the configuration, starts `squid -N` and waits until it accepts connections
    /// on `opts.listen` (panics after 15 s with the tail of `cache.log`).
    pub fn start(opts: SquidOptions) -> Squid {
        let missing = missing_prerequisites();
        assert!(
            missing.is_empty(),
            "cannot start squid: {}",
            missing.join("; ")
        );
        assert!(
            !opts.allow_connect_ports.is_empty(),
            "allow_connect_ports must not be empty"
        );
        let proxy = User::from_name(SQUID_USER)
            .expect("look up the proxy user")
            .expect("user proxy exists");
        let wd = &opts.workdir;
        fs::create_dir_all(wd).unwrap_or_else(|e| panic!("create {}: {e}", wd.display()));
        let wd = wd
            .canonicalize()
            .unwrap_or_else(|e| panic!("canonicalize {}: {e}", wd.display()));
        check_searchable(&wd);

        let conf = wd.join("squid.conf");
        write_file(&conf, &config(&opts, &wd), 0o644);
        write_file(&wd.join("hosts"), &hosts_file(&opts.hosts), 0o644);
        if let Some((user, password)) = &opts.basic_auth {
            assert!(
                !user.is_empty() && !user.contains([':', '\n']),
                "bad basic auth user {user:?}"
            );
            write_file(
                &wd.join("passwd"),
                &format!("{user}:{}\n", apr1_hash(password)),
                0o640,
            );
        }
        // Squid opens its logs and pid file after switching to `proxy`; pre-create them so
        // that both the root and the unprivileged phase can write.
        for log in ["access.log", "cache.log"] {
            write_file(&wd.join(log), "", 0o644);
        }
        fs::set_permissions(&wd, fs::Permissions::from_mode(0o755)).expect("chmod workdir");
        for entry in fs::read_dir(&wd).expect("list workdir") {
            let path = entry.expect("workdir entry").path();
            chown(&path, Some(proxy.uid.as_raw()), Some(proxy.gid.as_raw()))
                .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        }
        chown(&wd, Some(proxy.uid.as_raw()), Some(proxy.gid.as_raw())).expect("chown workdir");

        let squid_bin = find_squid().expect("squid binary");
        let mut cmd = match &opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&squid_bin);
                c
            }
            None => Command::new(&squid_bin),
        };
        // -N: stay in the foreground as one process (no daemon, no kid), so the pid we hold is
        // Squid itself; `ip netns exec` execs it in place.
        cmd.arg("-N").arg("-d").arg("1").arg("-f").arg(&conf);
        let out = fs::File::create(wd.join("squid.out")).expect("create squid.out");
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup squid.out"))
            .stderr(out);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let mut squid = Squid {
            child,
            listen: opts.listen,
            workdir: wd,
        };
        squid.wait_ready();
        squid
    }

    /// The address Squid listens on.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// The proxy URL for clients, with the credentials when given.
    pub fn url(&self, auth: Option<(&str, &str)>) -> String {
        match auth {
            Some((user, password)) => format!("http://{user}:{password}@{}", self.listen),
            None => format!("http://{}", self.listen),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Everything in the access log so far.
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.workdir.join("access.log")).unwrap_or_default()
    }

    /// Squid's diagnostic log.
    pub fn cache_log(&self) -> String {
        fs::read_to_string(self.workdir.join("cache.log")).unwrap_or_default()
    }

    /// Waits until an access log line contains `needle` and returns that line; panics with
    /// the whole log after `limit`.
    pub fn wait_access_log(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.access_log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            if Instant::now() > deadline {
                panic!("no access log line containing {needle:?} after {limit:?}; log:\n{log}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_ready(&mut self) {
        // Squid prints this once the listening socket is open. Probing the port instead would
        // leave an `error:transaction-end-before-headers` line in the access log.
        let marker = "Accepting HTTP Socket connections at";
        let local = format!("local={}", self.listen);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log = self.cache_log();
            if log
                .lines()
                .any(|l| l.contains(marker) && l.contains(&local))
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "squid exited during startup ({status}):\n{}",
                    self.diagnostics()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "squid not accepting on {} after {START_TIMEOUT:?}:\n{}",
                    self.listen,
                    self.diagnostics()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn diagnostics(&self) -> String {
        let out = fs::read_to_string(self.workdir.join("squid.out")).unwrap_or_default();
        format!(
            "--- cache.log (tail) ---\n{}\n--- squid stdout/stderr (tail) ---\n{}",
            tail(&self.cache_log(), 40),
            tail(&out, 20)
        )
    }

    /// Auth helpers and other children of Squid, by pid and command line.
    fn children(&self) -> Vec<(i32, Vec<u8>)> {
        let me = self.child.id().to_string();
        let mut out = Vec::new();
        let Ok(procs) = fs::read_dir("/proc") else {
            return out;
        };
        for entry in procs.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The ppid is the second field after the parenthesized command name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if ppid == Some(me.as_str()) {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                out.push((pid, cmdline));
            }
        }
        out
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let helpers = self.children();
        let pid = Pid::from_raw(self.child.id() as i32);
        // SIGTERM lets Squid stop its helpers (shutdown_lifetime is 0); SIGKILL if it hangs.
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => thread::sleep(Duration::from_millis(50)),
            }
        }
        // Helpers exit when Squid closes their stdin; kill any straggler, checking its command
        // line first so that a recycled pid is never hit.
        for (pid, cmdline) in helpers {
            if fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == cmdline) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// What is missing on this machine to run Squid tests (empty when nothing is).
pub fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("not running as root (squid must switch to the proxy user)".to_owned());
    }
    if find_squid().is_none() {
        missing.push("squid not installed (apt-get install squid)".to_owned());
    }
    if !Path::new(BASIC_NCSA_AUTH).exists() {
        missing.push(format!("{BASIC_NCSA_AUTH} missing (apt-get install squid)"));
    }
    if !matches!(User::from_name(SQUID_USER), Ok(Some(_))) {
        missing.push(format!("user {SQUID_USER} missing (installed with squid)"));
    }
    if !on_path("openssl") {
        missing.push("openssl not installed (needed to hash the proxy password)".to_owned());
    }
    missing
}

/// True when Squid tests can run. In CI (`CI=true`) anything missing is a failure; elsewhere
/// the test prints why it is skipped and the caller returns.
pub fn available(test: &str, also_needs: &[&str]) -> bool {
    let mut missing = missing_prerequisites();
    for tool in also_needs {
        if !on_path(tool) {
            missing.push(format!("{tool} not installed"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: prerequisites missing in CI: {why}");
    }
    eprintln!("skipped: {test}: {why}");
    false
}

fn config(opts: &SquidOptions, wd: &Path) -> String {
    let wd = wd.display();
    let ports: Vec<String> = opts
        .allow_connect_ports
        .iter()
        .map(u16::to_string)
        .collect();
    let mut c = format!(
        "# Generated by tests::squid for one test; not for production.\n\
         http_port {listen}\n\
         visible_hostname rdr-test-proxy\n\
         cache_effective_user {SQUID_USER}\n\
         cache_effective_group {SQUID_USER}\n\
         pid_filename {wd}/squid.pid\n\
         cache_log {wd}/cache.log\n\
         coredump_dir {wd}\n\
         logformat rdr %>a %rm %ru %>Hs %Ss %un\n\
         access_log stdio:{wd}/access.log logformat=rdr\n\
         logfile_rotate 0\n\
         cache deny all\n\
         cache_mem 8 MB\n\
         max_filedescriptors 1024\n\
         netdb_filename none\n\
         pinger_enable off\n\
         icp_port 0\n\
         htcp_port 0\n\
         # No DNS: names come from the private hosts file; a lookup of anything else goes to\n\
         # a resolver that does not exist and fails fast.\n\
         hosts_file {wd}/hosts\n\
         dns_nameservers 127.0.0.1\n\
         dns_timeout 5 seconds\n\
         connect_timeout 10 seconds\n\
         shutdown_lifetime 0 seconds\n\
         acl SSL_ports port {ports}\n\
         acl CONNECT method CONNECT\n\
         http_access deny CONNECT !SSL_ports\n",
        listen = opts.listen,
        ports = ports.join(" "),
    );
    if opts.basic_auth.is_some() {
        c.push_str(&format!(
            "auth_param basic program {BASIC_NCSA_AUTH} {wd}/passwd\n\
             auth_param basic children 2 startup=1 idle=1\n\
             auth_param basic realm rdr-test-proxy\n\
             auth_param basic credentialsttl 1 minute\n\
             acl authenticated proxy_auth REQUIRED\n\
             http_access deny !authenticated\n"
        ));
    }
    // The proxy lives in a closed test network (or on loopback): every source is allowed.
    c.push_str("http_access allow all\n");
    c
}

fn hosts_file(hosts: &[(String, IpAddr)]) -> String {
    let mut s = String::from("127.0.0.1 localhost\n::1 localhost\n");
    for (name, ip) in hosts {
        assert!(
            !name.is_empty() && !name.contains(char::is_whitespace),
            "bad host name {name:?}"
        );
        s.push_str(&format!("{ip} {name}\n"));
    }
    s
}

/// `$apr1$` (Apache MD5) hash of `password`, which `basic_ncsa_auth` accepts. The password
/// goes through stdin, not argv.
fn apr1_hash(password: &str) -> String {
    assert!(!password.contains('\n'), "password must be one line");
    let mut child = Command::new("openssl")
        .args(["passwd", "-apr1", "-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl passwd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write password to openssl");
    let out = child.wait_with_output().expect("openssl passwd");
    assert!(
        out.status.success(),
        "openssl passwd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = String::from_utf8(out.stdout).expect("utf-8 hash");
    let hash = hash.trim();
    assert!(
        hash.starts_with("$apr1$"),
        "unexpected openssl passwd output {hash:?}"
    );
    hash.to_owned()
}

fn write_file(path: &Path, contents: &str, mode: u32) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Panics unless the `proxy` user can reach `dir` (every ancestor world-searchable).
fn check_searchable(dir: &Path) {
    for ancestor in dir.ancestors().skip(1) {
        let mode = fs::metadata(ancestor)
            .unwrap_or_else(|e| panic!("stat {}: {e}", ancestor.display()))
            .permissions()
            .mode();
        assert!(
            mode & 0o001 != 0,
            "squid (user {SQUID_USER}) cannot reach {}: {} is mode {:o}; \
             use a work directory whose parents are o+x (e.g. chmod 755 the tempdir)",
            dir.display(),
            ancestor.display(),
            mode & 0o7777
        );
    }
}

fn find_squid() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("squid"))
        .find(|p| p.is_file())
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(tool).is_file())
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_the_required_rules() {
        let mut opts = SquidOptions::new("127.0.0.1:3128".parse().unwrap(), "/w");
        opts.allow_connect_ports = vec![443, 8443];
        let c = config(&opts, Path::new("/w"));
        assert!(c.contains("http_port 127.0.0.1:3128\n"));
        assert!(c.contains("acl SSL_ports port 443 8443\n"));
        assert!(c.contains("http_access deny CONNECT !SSL_ports\n"));
        assert!(c.contains("cache deny all\n"));
        assert!(!c.contains("auth_param"));
        assert!(c.ends_with("http_access allow all\n"));

        opts.basic_auth = Some(("alice".into(), "pw".into()));
        opts.listen = "[2001:db8::1]:3128".parse().unwrap();
        let c = config(&opts, Path::new("/w"));
        assert!(c.contains("http_port [2001:db8::1]:3128\n"));
        // Port rule before auth, auth before the final allow.
        let port_rule = c.find("deny CONNECT !SSL_ports").unwrap();
        let auth_rule = c.find("deny !authenticated").unwrap();
        assert!(port_rule < auth_rule && auth_rule < c.find("allow all").unwrap());
        assert!(c.contains("basic_ncsa_auth /w/passwd\n"));
    }

    #[test]
    fn hosts_file_lists_entries() {
        let h = hosts_file(&[("example.test".into(), "203.0.113.10".parse().unwrap())]);
        assert!(h.ends_with("203.0.113.10 example.test\n"));
    }
}
