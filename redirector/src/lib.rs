//! Egress redirector daemon and CLI as a library; `main.rs` only parses and dispatches.
pub mod addr;
pub mod admin;
pub mod api;
pub mod audit;
pub mod bpf;
pub mod budget;
pub mod check;
pub mod cli;
pub mod cni;
pub mod config;
pub mod daemon;
pub mod explain;
#[doc(hidden)]
pub mod fuzzing;
pub mod k8s;
pub mod kernel;
pub mod kubelet;
pub mod names;
pub mod netns;
pub mod node;
pub mod plan;
pub mod policy;
pub mod preflight;
pub mod proxy;
pub mod relay;
pub mod sniff;
pub mod state;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod tunnel;
pub mod workloads;

/// Renders an error and its sources on one line: `outer: inner: root cause`. Any
/// `scheme://user:password@` an error quotes is shown as `scheme://<redacted>@` (see
/// [`redact_userinfo`]).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    redact_userinfo(&s)
}

/// Replaces the userinfo of every URL in `text` (`http://user:pass@host` becomes
/// `http://<redacted>@host`). The URL runs from `://` to the next whitespace or quote, and
/// everything up to its last `@` is userinfo, so a password holding `/` or `@` is covered too.
/// The last line of defence for messages that quote what an operator typed: errors never
/// mean to echo a value that can hold a password, this catches the ones that still do.
pub fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`'))
            .unwrap_or(tail.len());
        let url = &tail[..end];
        match url.rfind('@') {
            Some(at) => {
                out.push_str("<redacted>");
                out.push_str(&url[at..]);
            }
            None => out.push_str(url),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn userinfo_is_redacted_wherever_it_appears() {
        for (text, want) in [
            ("http://u:p@h:1", "http://<redacted>@h:1"),
            (
                "invalid value 'https://u:p/@x@h/' for x",
                "invalid value 'https://<redacted>@h/' for x",
            ),
            ("a `socks5://u@h` b", "a `socks5://<redacted>@h` b"),
            ("http://h:1/path and x://y", "http://h:1/path and x://y"),
            ("no url: user:pass@host", "no url: user:pass@host"),
            (
                "two http://a:b@c, \"ftp://d:e@f\"",
                "two http://<redacted>@c, \"ftp://<redacted>@f\"",
            ),
        ] {
            assert_eq!(super::redact_userinfo(text), want, "{text}");
        }
    }
}
