//! The health and metrics HTTP endpoint: `/healthz` (the process serves),
//! `/readyz` (the component can do its job; 503 with the reason otherwise) and
//! `/metrics` (Prometheus text); on the admin listener also `/debug/...`
//! (the component's diagnostics as JSON). Served with hyper's HTTP/1 server.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Readiness check: `Ok(())` when ready, or the reason it is not.
pub type ReadyFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Diagnostics under `/debug/`: given the path and raw query, `None` for an
/// unknown path, `Some(Err(why))` for a bad request, `Some(Ok(json))`.
pub type DebugFn = Arc<dyn Fn(&str, Option<&str>) -> Option<Result<String, String>> + Send + Sync>;

/// What the endpoint serves.
#[derive(Clone)]
pub struct AdminState {
    /// Metrics to expose.
    pub registry: Arc<Registry>,
    /// Readiness check.
    pub ready: ReadyFn,
    /// `/debug/...` JSON, on the admin listener only.
    pub debug: Option<DebugFn>,
}

/// The most recent `cap` items, the oldest dropped first: the admin
/// endpoint's event lists (refusals, dial failures), bounded whatever peers do.
pub struct Recent<T> {
    cap: usize,
    items: std::sync::Mutex<std::collections::VecDeque<T>>,
}

impl<T: Clone> Recent<T> {
    /// An empty list keeping at most `cap` items.
    pub fn new(cap: usize) -> Self {
        Recent {
            cap,
            items: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(cap)),
        }
    }

    /// Adds an item, dropping the oldest when full.
    pub fn push(&self, item: T) {
        let mut q = self.items.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == self.cap {
            q.pop_front();
        }
        q.push_back(item);
    }

    /// The items, oldest first.
    pub fn snapshot(&self) -> Vec<T> {
        let q = self.items.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().cloned().collect()
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" | "/livez" => text(StatusCode::OK, "ok"),
        "/readyz" => match (state.ready)() {
            Ok(()) => text(StatusCode::OK, "ok"),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
        },
        "/metrics" => {
            let mut out = Vec::new();
            let encoder = TextEncoder::new();
            match encoder.encode(&state.registry.gather(), &mut out) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, out);
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(prometheus::TEXT_FORMAT),
                    );
                    r
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        p if p.starts_with("/debug/") && state.debug.is_some() => {
            let debug = state.debug.as_ref().expect("checked");
            match debug(p, req.uri().query()) {
                Some(Ok(json)) => {
                    let mut r = text(StatusCode::OK, json);
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    r
                }
                Some(Err(why)) => text(StatusCode::BAD_REQUEST, why),
                None => text(StatusCode::NOT_FOUND, "not found"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Serves the health listener and, when separate, the admin listener until
/// `stop`; `debug` (the `/debug/` diagnostics) only on the admin listener, or
/// on the health listener when it is also the admin one.
pub fn spawn(
    health: TcpListener,
    admin: Option<TcpListener>,
    state: AdminState,
    debug: DebugFn,
    stop: CancellationToken,
) {
    let with_debug = AdminState {
        debug: Some(debug),
        ..state.clone()
    };
    match admin {
        Some(a) => {
            tokio::spawn(serve(health, state, stop.clone()));
            tokio::spawn(serve(a, with_debug, stop));
        }
        None => {
            tokio::spawn(serve(health, with_debug, stop));
        }
    }
}

/// Serves the endpoint on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: AdminState, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin endpoint accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let r = handle(&state, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
