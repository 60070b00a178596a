//! Credentials stay contained (issue 12, item 4): a recognisable proxy password and gateway
//! token are driven through every path that prints something — `--help`, bad config files
//! and flags, a rejected reload, the proxy's 407 and the gateway's 401 and 403, TRACE logging,
//! `/config_dump`, `/metrics` and the other admin pages, `check`, `explain` and `status` — and
//! every byte of output is searched for them, plain and in their `Basic` (base64) form.
use std::{
    path::Path,
    process::{Command, Output},
};

use tests::{
    base64_encode,
    chain::{Chain, GATEWAY_NAME, Gateway, PROXY_PASSWORD, PROXY_USER},
    describe,
    lab::{ADMIN, workspace_bin},
    ready_with_squid as ready,
};

/// Never a real password: a distinctive string to search for.
const WRONG_PASSWORD: &str = "Wp-41d0be-also-never-log";
const TOKEN: &str = "Tk-9e2c55-bearer-never-log";
const WRONG_TOKEN: &str = "Tk-0b7a13-wrong-never-log";

/// The secrets of this file and the forms they may take on the wire.
fn secrets() -> Vec<String> {
    let mut v: Vec<String> = [PROXY_PASSWORD, WRONG_PASSWORD, TOKEN, WRONG_TOKEN]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for pass in [PROXY_PASSWORD, WRONG_PASSWORD] {
        let basic = base64_encode(format!("{PROXY_USER}:{pass}").as_bytes());
        // Also without padding, as a prefix that any line holding it would show.
        v.push(basic.trim_end_matches('=').to_owned());
    }
    v
}

/// Every place a secret showed: what was run, the secret and the line it was on.
#[derive(Default)]
struct Leaks(Vec<String>);

impl Leaks {
    /// Records each secret `text` holds, with the line it is on.
    fn check(&mut self, what: &str, text: &str) {
        for s in secrets() {
            for (at, _) in text.match_indices(&s) {
                let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
                self.0
                    .push(format!("{what}: {s} in: {}", &text[line_start..line_end]));
            }
        }
    }

    fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "{} leaks:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

fn all_output(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Arguments and environment of one `redirector` run.
type Invocation<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>);

/// `redirector <args>` with `env`, nothing inherited that could configure it.
fn redirector(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(workspace_bin("redirector"));
    c.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("REDIRECTOR_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "trace");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run redirector")
}

fn url_with(password: &str) -> String {
    format!("http://{PROXY_USER}:{password}@proxy.example.test:3128")
}

#[test]
fn help_never_shows_credentials_from_the_environment() {
    let url = url_with(PROXY_PASSWORD);
    let header = format!("X-Key: {TOKEN}");
    let env = [
        ("REDIRECTOR_PROXY_HTTPS", url.as_str()),
        ("REDIRECTOR_PROXY_HTTP", url.as_str()),
        ("REDIRECTOR_GATEWAY_HEADERS", header.as_str()),
    ];
    let mut leaks = Leaks::default();
    for sub in ["run", "check", "explain"] {
        let o = redirector(&[sub, "--help"], &env);
        let text = all_output(&o);
        assert!(
            o.status.success() && text.contains("--proxy-https"),
            "{sub} --help: {}",
            describe(&o)
        );
        leaks.check(&format!("redirector {sub} --help"), &text);
    }
    leaks.assert_none();
}

/// Config files and flags that are refused, each with the secret on the offending line.
#[test]
fn refused_config_files_and_flags_never_show_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = url_with(PROXY_PASSWORD);
    let files: Vec<(&str, String)> = vec![
        // TOML errors quote the offending line.
        ("type.toml", format!("proxy-port = \"{url}\"\n")),
        ("syntax.toml", format!("proxy-https = {url}\n")),
        (
            "header.toml",
            format!(
                "gateway-url = \"https://gw.example.test\"\ngateway-header = [\"X-Key {TOKEN}\"]\n"
            ),
        ),
        (
            "dup.toml",
            format!("proxy-https = \"{url}\"\nproxy-https = \"{url}\"\n"),
        ),
        // YAML (serde) errors quote the offending value.
        ("type.yaml", format!("proxy-port: {url}\n")),
        ("list.yaml", format!("cgroup: {url}\nproxy-port: [1]\n")),
        ("bool.yaml", format!("kubernetes: {url}\n")),
        (
            "route.yaml",
            format!("routes:\n  - host: \"{url}\"\n    route: proxy\n"),
        ),
        (
            "header.yaml",
            format!("gateway-url: https://gw.example.test\ngateway-header: [\"X-Key {TOKEN}\"]\n"),
        ),
        (
            "url.yaml",
            format!("proxy-https: ftp://{PROXY_USER}:{PROXY_PASSWORD}@x\n"),
        ),
        ("skip.yaml", format!("proxy-skip-range: \"{url}\"\n")),
    ];
    let mut leaks = Leaks::default();
    for (name, text) in &files {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        let p = path.display().to_string();
        for args in [
            vec!["run", "--config", &p],
            vec!["check", "--config", &p],
            vec!["explain", "--dst", "203.0.113.10:443", "--config", &p],
        ] {
            let o = redirector(&args, &[]);
            let text = all_output(&o);
            assert!(
                !o.status.success() && text.contains("invalid"),
                "{name} {args:?} was not refused: {}",
                describe(&o)
            );
            leaks.check(&format!("{args:?} with {name}"), &text);
        }
    }

    // The same through flags and the environment.
    let header = format!("X-Key {TOKEN}");
    let cases: Vec<Invocation> = vec![
        (vec!["run", "--proxy-port", &url], vec![]),
        (vec!["run"], vec![("REDIRECTOR_PROXY_PORT", &url)]),
        (vec!["run", "--sniff-timeout", &url], vec![]),
        (
            vec![
                "run",
                "--gateway-url",
                "https://gw.example.test",
                "--gateway-header",
                &header,
            ],
            vec![],
        ),
        (vec!["run", "--gateway-url", &url], vec![]),
        (vec!["check", "--proxy-skip-range", &url], vec![]),
    ];
    for (args, env) in cases {
        let o = redirector(&args, &env);
        let text = all_output(&o);
        assert!(
            !o.status.success(),
            "{args:?} was accepted: {}",
            describe(&o)
        );
        leaks.check(&format!("{args:?} {env:?}"), &text);
    }
    leaks.assert_none();
}

/// `redirector <args>` in the node namespace, as the daemon would see the network.
fn node_cli(c: &Chain, args: &[&str]) -> Output {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c.lab.node))
        .arg(workspace_bin("redirector"))
        .args(args)
        .env("RUST_LOG", "trace")
        .output()
        .expect("run redirector")
}

fn write_config(path: &Path, password: &str, ca: &Path, token_file: &Path) {
    let squid = "203.0.113.50:3128";
    let text = format!(
        "gateway-url: https://{GATEWAY_NAME}:443\n\
         proxy-https: http://{PROXY_USER}:{password}@{squid}\n\
         proxy-allow-basic-over-http: true\n\
         gateway-ca: {}\n\
         gateway-token-file: {}\n\
         gateway-header: [\"X-Trace: {TOKEN}\"]\n\
         sniff-timeout: 0.3\n\
         connect-timeout: 5\n\
         tls-timeout: 5\n\
         connect-response-timeout: 5\n",
        ca.display(),
        token_file.display()
    );
    // Written whole and renamed, so the reload poll never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

fn curl_out(c: &Chain, url: &str) -> String {
    all_output(&c.curl(&[url]))
}

#[test]
fn every_path_of_a_running_daemon_keeps_credentials_out_of_its_output() {
    if !ready("every_path_of_a_running_daemon_keeps_credentials_out_of_its_output") {
        return;
    }
    let mut c = Chain::new(1);
    c.start_squid(true);
    c.start_gateway_with(
        Gateway::Normal,
        &["--require-bearer", TOKEN, "--bearer-status", "401"],
    );
    let dir = c.lab.dir.join("creds");
    std::fs::create_dir_all(&dir).expect("dir");
    let (config, token_file) = (dir.join("config.yaml"), dir.join("token"));
    std::fs::write(&token_file, TOKEN).expect("token");
    let ca = c.ca_pem.clone();
    write_config(&config, PROXY_PASSWORD, &ca, &token_file);
    let config_arg = config.display().to_string();
    c.lab
        .start_daemon_env(&["--config", &config_arg], &[("RUST_LOG", "trace")]);
    let mut seen = String::new();
    let mut leaks = Leaks::default();

    // A tunnel through Squid (Basic) and the gateway (bearer), and the gateway's 403.
    let ok = c.curl(&["https://portal.azure.test/"]);
    assert!(ok.status.success(), "{}", describe(&ok));
    seen += &all_output(&ok);
    seen += &curl_out(&c, "https://denied.example.test/");
    c.lab.wait_daemon_log("status=403");

    // The gateway's 401: a wrong token (the file is re-read for every tunnel).
    std::fs::write(&token_file, WRONG_TOKEN).expect("token");
    seen += &curl_out(&c, "https://portal.azure.test/");
    c.lab.wait_daemon_log("status=401");
    std::fs::write(&token_file, TOKEN).expect("token");

    // The admin endpoint, every page.
    for page in [
        "/config_dump",
        "/metrics",
        "/connections",
        "/workloads",
        "/logging",
        "/healthz",
        "/readyz",
    ] {
        let (status, body) = c.lab.node_http_get(page).expect("admin");
        assert_eq!(status, 200, "{page}: {body}");
        leaks.check(page, &body);
    }
    let (_, dump) = c.lab.node_http_get("/config_dump").expect("admin");
    assert!(dump.contains("redacted"), "{dump}");

    // The operator commands, with the running daemon's file and with the password as a flag.
    let pins = c.lab.pin_root.display().to_string();
    let cg = c.lab.cg_root.display().to_string();
    let flag_url = format!("http://{PROXY_USER}:{PROXY_PASSWORD}@203.0.113.50:3128");
    for args in [
        vec![
            "check",
            "--config",
            &config_arg,
            "--pin-root",
            &pins,
            "--cgroup-root",
            &cg,
        ],
        vec![
            "check",
            "--json",
            "--config",
            &config_arg,
            "--pin-root",
            &pins,
        ],
        vec![
            "explain",
            "--dst",
            "203.0.113.10:443",
            "--host",
            "portal.azure.test",
            "--config",
            &config_arg,
            "--pin-root",
            &pins,
            "--admin-addr",
            ADMIN,
        ],
        vec![
            "explain",
            "--json",
            "--dst",
            "203.0.113.10:443",
            "--config",
            &config_arg,
            "--proxy-https",
            &flag_url,
            "--pin-root",
            &pins,
            "--admin-addr",
            ADMIN,
        ],
        vec![
            "status",
            "--pin-root",
            &pins,
            "--admin-addr",
            ADMIN,
            "--cgroup-root",
            &cg,
        ],
    ] {
        let o = node_cli(&c, &args);
        let text = all_output(&o);
        assert!(text.lines().count() > 3, "{args:?}: {}", describe(&o));
        leaks.check(&format!("{args:?}"), &text);
    }

    // The proxy's 407: the file changes to a wrong password and is reloaded.
    write_config(&config, WRONG_PASSWORD, &ca, &token_file);
    c.lab.wait_daemon_log("configuration reloaded");
    seen += &curl_out(&c, "https://portal.azure.test/");
    c.lab.wait_daemon_log("status=407");
    let o = node_cli(&c, &["check", "--config", &config_arg, "--pin-root", &pins]);
    let text = all_output(&o);
    assert!(text.contains("407"), "{}", describe(&o));
    leaks.check("check after a 407", &text);

    // A rejected reload: the offending line holds the password.
    std::fs::write(
        &config,
        format!("proxy-port: http://{PROXY_USER}:{PROXY_PASSWORD}@x\n"),
    )
    .expect("write");
    c.lab.wait_daemon_log("config reload rejected");

    leaks.check("curl output", &seen);
    let log = c.daemon_log();
    leaks.check("the daemon's log", &log);
    leaks.assert_none();
    assert!(
        log.lines().filter(|l| l.contains(" TRACE ")).count() > 10,
        "expected TRACE output, got:\n{log}"
    );
}
