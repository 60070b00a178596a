//! Route-table entries and whole config files: the parsers never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use redirector::{
    config::Settings,
    policy::RawRoute,
    policy::RouteRule,
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mid = text.char_indices().map(|(i, _)| i).nth(text.chars().count() / 2).unwrap_or(text.len());
    let (a, b) = text.split_at(mid);
    let _ = RouteRule::from_raw(&RawRoute { host: Some(a.to_owned()), route: b.to_owned(), ..Default::default() });
    let _ = RouteRule::from_raw(&RawRoute { cidr: Some(a.to_owned()), port: Some(443), route: "proxy".into(), ..Default::default() });
    let _ = Settings::parse(std::path::Path::new("fuzz.yaml"), &text);
    let _ = Settings::parse(std::path::Path::new("fuzz.toml"), &text);
});
