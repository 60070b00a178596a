//! The readers of secret files: proxy credentials (`user:pass`), the gateway bearer token and
//! the admin token. Never panic; what they accept is exactly what goes on the wire.
//!
//! Input: the file's bytes; for the admin token, the first byte splits the input into the
//! token file and the `Authorization` header the request carries.
#![no_main]
use libfuzzer_sys::fuzz_target;
use redirector::fuzzing::{admin_authorized, credentials, gateway_token};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok((user, pass)) = credentials(text) {
            assert!(!user.is_empty() && !user.contains(':'));
            assert!(!user.chars().chain(pass.chars()).any(char::is_control));
            assert_eq!(format!("{user}:{pass}"), text.trim(), "credentials changed");
        }
        if let Ok(token) = gateway_token(text) {
            assert_eq!(token, text.trim());
            assert!(!token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()));
            // It becomes `Authorization: Bearer <token>` on the CONNECT.
            let value = format!("Bearer {token}");
            assert!(value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()));
        }
    }
    let Some((&split, rest)) = data.split_first() else { return };
    let (file, header) = rest.split_at(usize::from(split).min(rest.len()));
    let ok = admin_authorized(file, Some(header));
    let token = std::str::from_utf8(file).map(str::trim).unwrap_or("");
    let expected = !token.is_empty() && header.strip_prefix(b"Bearer ") == Some(token.as_bytes());
    // A header value cannot hold every byte; a token that cannot be sent cannot match.
    let sendable = hyper_value_ok(header);
    assert_eq!(ok, expected && sendable, "admin token decision");
    assert!(!admin_authorized(file, None), "no header, no change");
});

/// What `HeaderValue::from_bytes` accepts: visible ASCII, space, tab and obs-text.
fn hyper_value_ok(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}
