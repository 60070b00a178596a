//! The CONNECT response reader of both hops (enterprise proxy and gateway over HTTP/1.1):
//! never panics, a tunnel is only up on a final 2xx, and how the peer's bytes are cut into
//! reads changes nothing but how many tunnel bytes were read along with the head.
//!
//! Input: one byte `n`, then `n % 8` piece sizes (each byte + 1), then the peer's bytes,
//! delivered in pieces of those sizes in turn (one read each), then end of stream.
#![no_main]
use libfuzzer_sys::fuzz_target;
use redirector::{fuzzing::connect_response, tunnel::TunnelError};

/// What must not depend on the cutting: the outcome and, on a refusal, status and reason.
fn outcome(r: &Result<(u16, Vec<u8>), TunnelError>) -> String {
    match r {
        Ok((status, _)) => format!("established {status}"),
        Err(TunnelError::Refused { status, reason, .. }) => format!("refused {status} {reason}"),
        Err(TunnelError::Malformed { detail, .. }) => format!("malformed {detail}"),
        Err(e) => e.kind().to_owned(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let n = usize::from(n % 8).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let mut pieces = Vec::new();
    let mut left = stream;
    let mut i = 0;
    while !left.is_empty() {
        let size = sizes.get(i % sizes.len().max(1)).map_or(left.len(), |s| usize::from(*s) + 1);
        let (piece, more) = left.split_at(size.min(left.len()));
        pieces.push(piece);
        left = more;
        i += 1;
    }
    let cut = connect_response(&pieces);
    let whole = connect_response(&[stream]);
    assert_eq!(outcome(&cut), outcome(&whole), "the cutting changed the outcome");
    for r in [&cut, &whole] {
        match r {
            Ok((status, leftover)) => {
                assert!((200..300).contains(status), "tunnel up on {status}");
                assert!(leftover.len() < 16 * 1024);
                // Tunnel bytes are the stream's own bytes, in order, right after the head.
                assert!(follows_a_head(stream, leftover), "tunnel bytes are not the stream's");
            }
            Err(TunnelError::Refused { status, reason, .. }) => {
                assert!(!(200..300).contains(status));
                assert!(reason.len() <= 80 && reason.bytes().all(|b| b == b' ' || b.is_ascii_graphic()));
            }
            Err(_) => {}
        }
    }
    if let (Ok((_, a)), Ok((_, b))) = (&cut, &whole) {
        let n = a.len().min(b.len());
        assert_eq!(a[..n], b[..n], "different tunnel bytes");
    }
});

/// `leftover` occurs in `stream` right after a blank line (the end of a head; httparse takes
/// bare LF line ends too).
fn follows_a_head(stream: &[u8], leftover: &[u8]) -> bool {
    (0..=stream.len().saturating_sub(leftover.len())).any(|at| {
        stream[at..].starts_with(leftover)
            && (stream[..at].ends_with(b"\n\n") || stream[..at].ends_with(b"\n\r\n"))
    })
}
