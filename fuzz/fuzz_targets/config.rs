//! The config file loader: YAML and TOML parsing into settings, then validation into the
//! running configuration. Never panics; what validates can be shown (`/config_dump`).
//!
//! Input: the file's text; the first byte picks the format. Paths to other files (credentials,
//! CA, client certificate, tokens) are dropped before validation, so the target reads no
//! files (those readers have their own target, `secret_files`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use redirector::config::{Config, Settings};

fuzz_target!(|data: &[u8]| {
    let Some((&format, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let name = if format & 1 == 0 { "fuzz.yaml" } else { "fuzz.toml" };
    let Ok(mut s) = Settings::parse(std::path::Path::new(name), text) else { return };
    s.proxy_credentials_file = None;
    s.proxy_cert = None;
    s.gateway_client_cert = None;
    s.gateway_client_key = None;
    // Layered under defaults and over itself, as files, environment and flags are.
    let s = Settings::default().overlay(s);
    if let Ok(config) = Config::build(s) {
        serde_json::to_string(&config).expect("a valid config serializes");
        let _ = config.skip_cidrs();
        let _ = config.restart_only_changes(&config);
    }
});
