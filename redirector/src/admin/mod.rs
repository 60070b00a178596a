//! Admin endpoint on loopback: `/metrics`, `/healthz`, `/readyz`, `/config_dump`, `/workloads`,
//! `/connections` (JSON in [`api`]) and `/logging`.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub mod client;

use crate::state::Shared;

/// Whether a request may change state: only `POST`, only with `Authorization: Bearer` and
/// the token in `token_file` (read now, so a rotated token applies at once). With no token
/// file configured nothing may change state. The refusal says why, never what was sent.
fn authorize(
    method: &hyper::Method,
    headers: &hyper::HeaderMap,
    token_file: Option<&std::path::Path>,
) -> Result<(), (StatusCode, &'static str)> {
    if method != hyper::Method::POST {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "changes need POST"));
    }
    check_token(headers, token_file.map(std::fs::read_to_string))
}

/// The token part of [`authorize`], with the token file already read (`None`: no token
/// file is configured).
pub(crate) fn check_token(
    headers: &hyper::HeaderMap,
    token_file: Option<std::io::Result<String>>,
) -> Result<(), (StatusCode, &'static str)> {
    let Some(token) = token_file else {
        return Err((
            StatusCode::FORBIDDEN,
            "changes are disabled: no --admin-token-file is configured",
        ));
    };
    let Ok(token) = token else {
        return Err((StatusCode::FORBIDDEN, "cannot read the admin token file"));
    };
    let token = token.trim();
    if token.is_empty() {
        return Err((StatusCode::FORBIDDEN, "the admin token file is empty"));
    }
    let sent = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match sent {
        Some(sent) if constant_time_eq(sent, token.as_bytes()) => Ok(()),
        _ => Err((StatusCode::UNAUTHORIZED, "missing or wrong admin token")),
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess
/// was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let diff = a
        .iter()
        .zip(b)
        .fold(a.len() ^ b.len(), |acc, (x, y)| acc | usize::from(x ^ y));
    diff == 0
}

/// What `/readyz` reports on.
#[derive(Default)]
pub struct Readiness {
    pub hooks_attached: AtomicBool,
    pub listeners_ready: AtomicBool,
    pub config_loaded: AtomicBool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.hooks_attached.load(Ordering::Relaxed)
            && self.listeners_ready.load(Ordering::Relaxed)
            && self.config_loaded.load(Ordering::Relaxed)
    }
    fn describe(&self) -> String {
        format!(
            "hooks_attached={} listeners_ready={} config_loaded={}\n",
            self.hooks_attached.load(Ordering::Relaxed),
            self.listeners_ready.load(Ordering::Relaxed),
            self.config_loaded.load(Ordering::Relaxed)
        )
    }
}

pub struct Admin {
    pub shared: Arc<Shared>,
    pub registry: Registry,
    pub readiness: Arc<Readiness>,
}

/// Binds first (so a port clash is a start-up error), then serves until shutdown.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("admin address {addr} is not loopback; the admin endpoint is local only"),
        ));
    }
    TcpListener::bind(addr).await
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { warn!(error = %e, "admin accept failed"); continue; }
            },
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(route(&admin, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}

fn json<T: serde::Serialize>(v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(v) {
        Ok(s) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(s + "\n")))
            .expect("static response"),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `?filter=<RUST_LOG directives>` (or `?level=`) from the query string, form-decoded:
/// `%2C` is a comma, `+` a space.
fn query_filter(q: Option<&str>) -> Option<String> {
    let v = q?.split('&').find_map(|kv| {
        kv.strip_prefix("filter=")
            .or_else(|| kv.strip_prefix("level="))
    })?;
    let v = v.replace('+', " ");
    percent_encoding::percent_decode_str(&v)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

fn route(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/workloads" => json(&*admin.shared.workloads()),
        "/connections" => {
            let mut v: Vec<crate::api::ConnView> = admin.shared.conns().values().cloned().collect();
            for c in &mut v {
                c.since_ms = c.started.elapsed().as_millis() as u64;
            }
            v.sort_by_key(|c| std::cmp::Reverse(c.since_ms));
            json(&v)
        }
        "/logging" => {
            if req.method() == hyper::Method::GET {
                return text(StatusCode::OK, crate::telemetry::log_filter() + "\n");
            }
            let token_file = admin.shared.config.load().admin_token_file.clone();
            if let Err((status, why)) =
                authorize(req.method(), req.headers(), token_file.as_deref())
            {
                warn!(method = %req.method(), path = "/logging", why, "admin request refused");
                return text(status, format!("{why}\n"));
            }
            match query_filter(req.uri().query()) {
                None => text(
                    StatusCode::BAD_REQUEST,
                    "use POST /logging?filter=<RUST_LOG directives>, e.g. ?filter=debug\n".into(),
                ),
                Some(f) => match crate::telemetry::set_log_filter(&f) {
                    Ok(()) => {
                        tracing::info!(filter = %f, "log filter changed");
                        text(StatusCode::OK, format!("log filter set to {f}\n"))
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, e + "\n"),
                },
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let status = if admin.readiness.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, admin.readiness.describe())
        }
        "/config_dump" => match serde_json::to_string_pretty(&**admin.shared.config.load()) {
            Ok(s) => text(StatusCode::OK, s + "\n"),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        "/metrics" => {
            let counters = admin.shared.maps().counters();
            if let Ok(c) = counters {
                admin.shared.metrics.set_ebpf(&c);
            }
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &admin.registry) {
                Ok(()) => Response::builder()
                    .header(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .body(Full::new(Bytes::from(out)))
                    .expect("static response"),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::query_filter;
    use super::{StatusCode, authorize};

    #[test]
    fn only_post_with_the_token_changes_state() {
        use hyper::Method as M;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret-token\n").expect("write");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        let missing = dir.path().join("missing");
        let headers = |v: Option<&str>| {
            let mut h = hyper::HeaderMap::new();
            if let Some(v) = v {
                h.insert(hyper::header::AUTHORIZATION, v.parse().expect("header"));
            }
            h
        };
        type Case<'a> = (
            M,
            Option<&'a str>,
            Option<&'a std::path::Path>,
            Result<(), StatusCode>,
        );
        let good = Some("Bearer s3cret-token");
        let cases: Vec<Case<'_>> = vec![
            (M::POST, good, Some(&file), Ok(())),
            (M::POST, None, Some(&file), Err(StatusCode::UNAUTHORIZED)),
            (
                M::POST,
                Some("Bearer s3cret-tokeN"),
                Some(&file),
                Err(StatusCode::UNAUTHORIZED),
            ),
            (
                M::POST,
                Some("Bearer s3cret-token2"),
                Some(&file),
                Err(StatusCode::UNAUTHORIZED),
            ),
            (
                M::POST,
                Some("Bearer "),
                Some(&file),
                Err(StatusCode::UNAUTHORIZED),
            ),
            (
                M::POST,
                Some("Basic s3cret-token"),
                Some(&file),
                Err(StatusCode::UNAUTHORIZED),
            ),
            (
                M::PUT,
                good,
                Some(&file),
                Err(StatusCode::METHOD_NOT_ALLOWED),
            ),
            (
                M::DELETE,
                good,
                Some(&file),
                Err(StatusCode::METHOD_NOT_ALLOWED),
            ),
            (M::POST, good, None, Err(StatusCode::FORBIDDEN)),
            (
                M::POST,
                Some("Bearer "),
                Some(&empty),
                Err(StatusCode::FORBIDDEN),
            ),
            (M::POST, good, Some(&missing), Err(StatusCode::FORBIDDEN)),
        ];
        for (method, auth, token_file, want) in cases {
            let got = authorize(&method, &headers(auth), token_file).map_err(|(s, why)| {
                assert!(!why.contains("s3cret"), "a refusal names the token: {why}");
                s
            });
            assert_eq!(got, want, "{method} {auth:?} {token_file:?}");
        }
    }

    #[test]
    fn filter_query_is_decoded() {
        assert_eq!(query_filter(Some("filter=debug")).as_deref(), Some("debug"));
        assert_eq!(
            query_filter(Some("x=1&filter=info%2Credirector%3Dtrace")).as_deref(),
            Some("info,redirector=trace")
        );
        assert_eq!(query_filter(Some("level=warn")).as_deref(), Some("warn"));
        assert_eq!(query_filter(Some("nothing=here")), None);
        assert_eq!(query_filter(None), None);
    }
}
