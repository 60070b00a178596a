//! HTTP/2 CONNECT to the gateway: the client side (session handshake, one CONNECT stream,
//! the tunnel's data) against a gateway sending fuzzer bytes. Never panics, never hangs, and
//! a tunnel is only up on a 2xx.
//!
//! Input: the gateway's bytes after its connection preface. With the first byte odd the
//! target sends a valid preface (an empty SETTINGS frame and a SETTINGS ack) first, so most
//! inputs reach the HEADERS of the response.
#![no_main]
use libfuzzer_sys::fuzz_target;
use redirector::fuzzing::h2_connect;

/// An empty SETTINGS frame, then the ack of the client's SETTINGS.
const PREFACE: [u8; 18] = [0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut server = Vec::with_capacity(data.len() + PREFACE.len());
    if mode & 1 == 1 {
        server.extend_from_slice(&PREFACE);
    }
    server.extend_from_slice(rest);
    if let Ok((status, tunnel)) = h2_connect(&server) {
        assert!((200..300).contains(&status), "tunnel up on {status}");
        // The tunnel's bytes came from DATA frames in the gateway's bytes.
        assert!(tunnel.len() <= server.len());
    }
});
