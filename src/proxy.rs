//! The request path: classify the request, ask the policy, then tunnel, forward or answer
//! locally. [`handle`] is the whole story on one screen; each step returns
//! `Result<_, ProxyError>` and [`ProxyError::into_response`] is the only place errors become
//! responses.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::error::ProxyError;
use crate::policy::{Decision, Request as PolicyRequest, Target};
use crate::server::Conn;
use crate::{forward, local, tunnel};

/// The body of every response the proxy sends.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// What a request is, before any policy.
#[derive(Debug)]
enum Kind {
    /// `CONNECT host:port`.
    Connect(Target),
    /// Absolute-form `http://host[:port]/path`.
    Http(Target),
    /// Origin-form `/path`: for the proxy itself.
    Local,
}

/// Serves one request. Never fails: errors become responses.
pub async fn handle(conn: Arc<Conn>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    Ok(route(&conn, req)
        .await
        .unwrap_or_else(ProxyError::into_response))
}

async fn route(conn: &Arc<Conn>, req: Request<Incoming>) -> Result<Response<Body>, ProxyError> {
    let kind = classify(&req)?;
    let policy = conn.shared.policy.load_full();
    let (policy_request, target) = match &kind {
        Kind::Connect(t) => (PolicyRequest::Connect(t), Some(t)),
        Kind::Http(t) => (PolicyRequest::Http(t), Some(t)),
        Kind::Local => (PolicyRequest::Local, None),
    };
    if let Decision::Deny(denial) = policy.decide(conn.client, policy_request) {
        let message = denial.explain(conn.client, target);
        tracing::debug!(client = %conn.client, reason = denial.label(), %message, "refused");
        return Err(ProxyError::Denied { denial, message });
    }
    match kind {
        Kind::Connect(target) => tunnel::open(conn, req, target).await,
        Kind::Http(target) => forward::forward(conn, req, target).await,
        Kind::Local => local::serve(&conn.shared, &req),
    }
}

/// Sorts a request into CONNECT, absolute-form HTTP, or a local request, refusing what a
/// forward proxy should not accept.
fn classify<B>(req: &Request<B>) -> Result<Kind, ProxyError> {
    let uri = req.uri();
    if req.method() == Method::CONNECT {
        // CONNECT sts.amazonaws.com:443 HTTP/1.1
        // Host: sts.amazonaws.com:443
        let authority = uri
            .authority()
            .filter(|_| uri.scheme().is_none() && uri.path_and_query().is_none())
            .ok_or_else(|| {
                ProxyError::BadRequest(format!("CONNECT target {uri} is not host:port"))
            })?;
        let target = Target::parse_authority(authority.as_str(), None)
            .map_err(|e| ProxyError::BadRequest(format!("CONNECT target: {e}")))?;
        return Ok(Kind::Connect(target));
    }
    if req.method() == Method::TRACE {
        return Err(ProxyError::MethodNotAllowed("TRACE is not proxied".into()));
    }
    match uri.scheme_str() {
        // GET http://example.com/path HTTP/1.1
        Some(scheme) if scheme.eq_ignore_ascii_case("http") => {
            let authority = uri
                .authority()
                .ok_or_else(|| ProxyError::BadRequest(format!("{uri} has no host")))?;
            let target = Target::parse_authority(authority.as_str(), Some(80))
                .map_err(|e| ProxyError::BadRequest(format!("request target: {e}")))?;
            Ok(Kind::Http(target))
        }
        Some(scheme) if scheme.eq_ignore_ascii_case("https") => Err(ProxyError::NotImplemented(
            "https:// URIs are not proxied in absolute form; use CONNECT (HTTPS_PROXY)".into(),
        )),
        Some(scheme) => Err(ProxyError::NotImplemented(format!(
            "scheme {scheme}:// is not proxied"
        ))),
        // GET /healthz HTTP/1.1
        None if uri.path().starts_with('/') => Ok(Kind::Local),
        // OPTIONS * HTTP/1.1, or an authority without CONNECT.
        None => Err(ProxyError::BadRequest(format!(
            "request target {uri} is not absolute-form"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(method: &str, uri: &str) -> Result<String, String> {
        let req = Request::builder().method(method).uri(uri).body(()).unwrap();
        classify(&req)
            .map(|k| match k {
                Kind::Connect(t) => format!("connect {t}"),
                Kind::Http(t) => format!("http {t}"),
                Kind::Local => "local".into(),
            })
            .map_err(|e| e.status().0.as_str().to_string())
    }

    /// Each request form lands where it should, with the documented status otherwise.
    #[test]
    fn classification() {
        let cases = [
            (
                "CONNECT",
                "sts.amazonaws.com:443",
                Ok("connect sts.amazonaws.com:443"),
            ),
            ("CONNECT", "[::1]:443", Ok("connect [::1]:443")),
            ("CONNECT", "sts.amazonaws.com", Err("400")),
            ("GET", "http://Example.COM/x", Ok("http example.com:80")),
            (
                "POST",
                "http://example.com:8080/x?q",
                Ok("http example.com:8080"),
            ),
            ("GET", "http://sts.amazonaws.com@evil.com/", Err("400")),
            ("GET", "https://example.com/", Err("501")),
            ("GET", "ftp://example.com/", Err("501")),
            ("GET", "/healthz", Ok("local")),
            ("OPTIONS", "*", Err("400")),
            ("TRACE", "http://example.com/", Err("405")),
        ];
        for (method, uri, want) in cases {
            assert_eq!(
                kind(method, uri),
                want.map(str::to_string).map_err(str::to_string),
                "{method} {uri}"
            );
        }
    }
}
