//! The bytes a pod sends first (TLS ClientHello, HTTP request head): parsers never panic and
//! every host they return passes strict validation.
#![no_main]
use libfuzzer_sys::fuzz_target;
use redirector::{
    addr::validate_host,
    sniff::{Parse, parse_client_hello_sni, parse_http_host},
};

fuzz_target!(|data: &[u8]| {
    for parsed in [parse_client_hello_sni(data), parse_http_host(data)] {
        if let Parse::Found(host) = parsed {
            // Whatever reaches a CONNECT line must be a valid host.
            if let Ok(valid) = validate_host(&host) {
                assert!(!valid.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b'@' || b == b'/'));
            }
        }
    }
});
