//! The request path: check the client, classify the request, ask the policy, then tunnel,
//! forward or answer locally. `route` is the whole story on one screen; each step returns
//! `Result<_, ProxyError>` and [`ProxyError::into_response`] is the only place errors become
//! responses. Every request is one [`Transaction`], reported when its response ends.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};

use crate::error::ProxyError;
use crate::policy::{Decision, Request as PolicyRequest, Target};
use crate::server::Conn;
use crate::settings::Mode;
use crate::transaction::{CountedBody, Transaction};
use crate::{forward, local, tunnel};

/// The body of every response the proxy sends.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Marks a response whose body is relayed from upstream (and counted as it flows).
#[derive(Clone, Copy, Debug)]
pub struct Relayed;

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
    // Until the response head is ready the connection is not idle: the wait for it has its own
    // deadline (the 504 in `forward`), which must answer first.
    let _busy = conn.activity.busy();
    let tx = Transaction::begin(
        conn.shared.observer.clone(),
        conn.client,
        req.method(),
        log_url(&req),
    );
    let response = route(&conn, req, &tx).await.unwrap_or_else(|error| {
        tracing::debug!(client = %conn.client, reason = error.reason().label(), %error, "request failed");
        tx.failed(&error);
        error.into_response()
    });
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    tx.response(response.status().as_u16(), content_type);
    if response.extensions().get::<Relayed>().is_none() {
        tx.add_local_bytes(response.body().size_hint().exact().unwrap_or(0));
    }
    Ok(response.map(|body| CountedBody::holding(body, tx).boxed()))
}

async fn route(
    conn: &Arc<Conn>,
    req: Request<Incoming>,
    tx: &Transaction,
) -> Result<Response<Body>, ProxyError> {
    // Before anything else, as hyper's own framing refusals: a head that carried both
    // Content-Length and Transfer-Encoding (hyper dropped the length; the framing watch saw it
    // on the wire). RFC 9112 §6.1 lets a server refuse it; nothing is forwarded.
    if conn.framing.next_is_ambiguous() {
        return Err(ProxyError::BadRequest(
            "Content-Length with Transfer-Encoding".into(),
        ));
    }
    let wants_local = req.method() != Method::CONNECT && req.uri().scheme().is_none();
    if wants_local {
        let healthz = req.uri().path() == "/healthz";
        tx.local(!healthz || conn.shared.settings.access_log_healthz);
    }
    let policy = conn.shared.policy.load_full();
    if conn.admin {
        // The admin listener serves the local endpoints to anyone who can reach it, nothing else.
        return match classify(&req)? {
            Kind::Local => local::serve(&conn.shared, &req),
            _ => Err(ProxyError::BadRequest(
                "the admin listener serves only GET /healthz and GET /metrics".into(),
            )),
        };
    }
    // Step 1 comes first: a client outside ALLOWED_CIDRS learns nothing else.
    if !policy.admits(conn.client, wants_local) {
        let denial = crate::policy::Denial::ClientCidr;
        let message = denial.explain(conn.client, None);
        return Err(ProxyError::Denied { denial, message });
    }
    let kind = classify(&req)?;
    let (policy_request, target) = match &kind {
        Kind::Connect(t) => (PolicyRequest::Connect(t), Some(t)),
        Kind::Http(t) => (PolicyRequest::Http(t), Some(t)),
        Kind::Local => (PolicyRequest::Local, None),
    };
    if let Some(target) = target {
        tx.target(target);
    }
    match policy.decide(conn.client, policy_request) {
        Decision::Allow(rule) => tx.allowed(rule),
        // Report mode: an allowlist refusal is logged and counted, then served; the address
        // guard still judges where it goes.
        Decision::Deny(denial)
            if conn.shared.settings.mode == Mode::Report && denial.reportable() =>
        {
            let target = target.map_or_else(String::new, Target::to_string);
            tracing::debug!(client = %conn.client, %target, "refused by allowlist, let through in report mode");
            tx.would_deny();
        }
        Decision::Deny(denial) => {
            let message = denial.explain(conn.client, target);
            return Err(ProxyError::Denied { denial, message });
        }
    }
    match kind {
        Kind::Connect(target) => tunnel::open(conn, req, target, tx).await,
        Kind::Http(target) => forward::forward(conn, req, target, tx).await,
        Kind::Local => local::serve(&conn.shared, &req),
    }
}

/// The URL as logged: `host:port` for CONNECT, otherwise the request target without its query
/// (Squid's default `strip_query_terms on`: presigned URLs carry credentials in the query).
fn log_url<B>(req: &Request<B>) -> String {
    let uri = req.uri();
    if req.method() == Method::CONNECT {
        return uri.to_string();
    }
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => format!("{scheme}://{authority}{}", uri.path()),
        _ => uri.path().to_string(),
    }
}

/// Sorts a request into CONNECT, absolute-form HTTP, or a local request, refusing what a
/// forward proxy should not accept.
///
/// hyper has already refused what cannot be framed (conflicting or malformed
/// `Content-Length`, a `Transfer-Encoding` whose last coding is not `chunked`, obsolete line
/// folding, oversized heads), and [`route`] has refused a head with both `Content-Length` and
/// `Transfer-Encoding` (which hyper accepts, dropping the length: see [`crate::framing`]).
/// What is left to refuse here is what hyper accepts but cuttle cannot pass on faithfully.
fn classify<B>(req: &Request<B>) -> Result<Kind, ProxyError> {
    let uri = req.uri();
    check_transfer_coding(req)?;
    if req.method() == Method::CONNECT {
        // CONNECT sts.amazonaws.com:443 HTTP/1.1
        // Host: sts.amazonaws.com:443
        if has_body(req) {
            // RFC 9110 §9.3.6: a CONNECT request has no content. Bytes after the head are
            // tunnel data; a body in front of them would blur where one ends.
            return Err(ProxyError::BadRequest(
                "a CONNECT request cannot have a body".into(),
            ));
        }
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
    // Methods are case-sensitive, but some origins fold them: `trace` is refused as well.
    if req
        .method()
        .as_str()
        .eq_ignore_ascii_case(Method::TRACE.as_str())
    {
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

/// Refuses a transfer coding other than one `chunked`: the body is forwarded re-chunked, so
/// any other coding (`gzip, chunked`, `chunked` listed twice) would reach the origin changed.
/// A 400 rather than RFC 9112's 501: it closes the connection, so bytes after a body framed in
/// a way cuttle does not forward are never read as the next request.
fn check_transfer_coding<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let mut codings = req
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|c| c.trim_ascii())
        .filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => Ok(()),
        (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(ProxyError::BadRequest(
            "transfer codings other than a single chunked are not supported".into(),
        )),
    }
}

/// A request with content: any `Transfer-Encoding`, or a `Content-Length` other than 0.
fn has_body<B>(req: &Request<B>) -> bool {
    let headers = req.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes() != b"0")
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
            ("trace", "http://example.com/", Err("405")),
            ("Trace", "/", Err("405")),
        ];
        for (method, uri, want) in cases {
            assert_eq!(
                kind(method, uri),
                want.map(str::to_string).map_err(str::to_string),
                "{method} {uri}"
            );
        }
    }

    /// Only a single `chunked` transfer coding is forwarded; a CONNECT has no body.
    #[test]
    fn transfer_codings_and_connect_bodies() {
        let with = |method: &str, uri: &str, headers: &[(&str, &str)]| {
            let mut req = Request::builder().method(method).uri(uri);
            for (name, value) in headers {
                req = req.header(*name, *value);
            }
            classify(&req.body(()).unwrap()).map_err(|e| e.status().0.as_u16())
        };
        let post = "http://example.com/";
        for te in [
            &["chunked"][..],
            &["Chunked"],
            &[" chunked "],
            &["chunked,"],
        ] {
            let headers: Vec<_> = te.iter().map(|v| ("transfer-encoding", *v)).collect();
            assert!(with("POST", post, &headers).is_ok(), "{te:?}");
        }
        for te in [
            &["gzip, chunked"][..],
            &["chunked, chunked"],
            &["chunked", "chunked"],
            &["gzip", "chunked"],
            &["identity"],
        ] {
            let headers: Vec<_> = te.iter().map(|v| ("transfer-encoding", *v)).collect();
            assert_eq!(with("POST", post, &headers).err(), Some(400), "{te:?}");
        }
        let connect = "sts.amazonaws.com:443";
        assert!(with("CONNECT", connect, &[("content-length", "0")]).is_ok());
        for headers in [
            &[("content-length", "5")][..],
            &[("transfer-encoding", "chunked")],
        ] {
            assert_eq!(
                with("CONNECT", connect, headers).err(),
                Some(400),
                "{headers:?}"
            );
        }
    }

    /// Logged URLs drop the query, as Squid does by default.
    #[test]
    fn logged_url_strips_query() {
        let url = |method: &str, uri: &str| {
            log_url(&Request::builder().method(method).uri(uri).body(()).unwrap())
        };
        assert_eq!(
            url("GET", "http://s3.amazonaws.com/b/k?X-Amz-Signature=secret"),
            "http://s3.amazonaws.com/b/k"
        );
        assert_eq!(
            url("CONNECT", "sts.amazonaws.com:443"),
            "sts.amazonaws.com:443"
        );
        assert_eq!(url("GET", "/metrics?x"), "/metrics");
    }
}
