//! The proxy's own endpoints, for origin-form requests: `GET /healthz` (200, or 503 while
//! draining) and `GET /metrics` (Prometheus text).

use std::sync::atomic::Ordering;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use crate::error::ProxyError;
use crate::proxy::{full, Body};
use crate::server::Shared;

/// Answers a local request.
pub fn serve<B>(shared: &Shared, req: &Request<B>) -> Result<Response<Body>, ProxyError> {
    let is_read = req.method() == Method::GET || req.method() == Method::HEAD;
    match req.uri().path() {
        "/healthz" if is_read => Ok(healthz(shared)),
        "/metrics" if is_read => Ok(metrics(shared)),
        path => Err(ProxyError::BadRequest(format!(
            "{} {path} is not a proxy request (send an absolute-form http:// URI or CONNECT; local endpoints: GET /healthz, GET /metrics)",
            req.method()
        ))),
    }
}

fn metrics(shared: &Shared) -> Response<Body> {
    let mut response = Response::new(full(shared.observer.metrics.render()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

fn healthz(shared: &Shared) -> Response<Body> {
    let (status, text) = if shared.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (StatusCode::OK, "ok\n")
    };
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
