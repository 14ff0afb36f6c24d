//! Plain HTTP forwarding over the worker's keep-alive pool ([`crate::pool`]).
//!
//! The request goes out in origin form with the hop-by-hop headers removed (RFC 9110 §7.6.1:
//! `Connection` and every header it names, plus `Proxy-Connection`, `Keep-Alive`, `TE`,
//! `Transfer-Encoding`, `Upgrade`, `Proxy-Authorization`, `Proxy-Authenticate`, `Trailer`),
//! `Host` set from the request URI (the URI decides, not a disagreeing `Host` header), and `Via`
//! added. Bodies stream both ways: hyper's `Incoming` is handed straight to the other side, so
//! a 1 GiB upload or download passes in constant memory.
//!
//! An upstream that takes the request and sends no response head gets until
//! `CUTTLE_IDLE_TIMEOUT` after the client connection last moved a byte (request body bytes
//! restart the clock, so a slow upload is never cut); then the client gets 504
//! `ERR_READ_TIMEOUT` and the upstream connection is dropped. The connection's own idle check
//! waits for that answer (see [`crate::idle`]).

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::error::ProxyError;
use crate::metrics::Direction;
use crate::policy::Target;
use crate::proxy::{Body, Relayed};
use crate::server::Conn;
use crate::transaction::{CountedBody, Transaction};

/// The `Via` value cuttle adds.
const VIA: &str = "1.1 cuttle";

/// Forwards an absolute-form request to `target` (already allowed by the policy).
pub async fn forward(
    conn: &Arc<Conn>,
    req: Request<Incoming>,
    target: Target,
    tx: &Transaction,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let authority = if target.port == 80 {
        target.host.to_string()
    } else {
        target.to_string()
    };
    let host = HeaderValue::try_from(authority)
        .map_err(|e| ProxyError::BadRequest(format!("request host: {e}")))?;
    parts.uri = Uri::from(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    remove_hop_by_hop(&mut parts.headers);
    parts.headers.insert(header::HOST, host);
    append_via(&mut parts.headers);

    let request = Request::from_parts(
        parts,
        CountedBody::counted(body, tx.counter(Direction::ClientToUpstream)),
    );
    // No response head within CUTTLE_IDLE_TIMEOUT of the client's last byte (a slow upload
    // keeps the clock running): 504. Dropping the request drops the upstream connection.
    let exchange = tokio::select! {
        exchange = conn.upstream.send(&target, request) => exchange?,
        _ = conn.activity.quiet_for(conn.shared.settings.idle_timeout) => {
            return Err(ProxyError::ReadTimeout {
                target: target.to_string(),
            });
        }
    };
    tx.upstream(exchange.addr, exchange.opened);
    let (mut parts, body) = exchange.response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    append_via(&mut parts.headers);
    parts.extensions.insert(Relayed);
    let body = CountedBody::counted(body, tx.counter(Direction::UpstreamToClient));
    Ok(Response::from_parts(parts, body.boxed()))
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including every header `Connection` names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TRAILER,
    ] {
        headers.remove(name);
    }
}

/// Appends cuttle to `Via` (RFC 9110 §7.6.3), keeping earlier hops.
fn append_via(headers: &mut HeaderMap) {
    let via = match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(existing) => HeaderValue::from_str(&format!("{existing}, {VIA}"))
            .unwrap_or(HeaderValue::from_static(VIA)),
        None => HeaderValue::from_static(VIA),
    };
    headers.insert(header::VIA, via);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hop-by-hop headers and those named in Connection go; end-to-end headers stay.
    #[test]
    fn hop_by_hop_removal() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("proxy-connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("trailer", "x-checksum"),
            ("content-type", "text/plain"),
            ("authorization", "Bearer t"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        remove_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, vec!["authorization", "content-type"]);
    }

    #[test]
    fn via_is_appended() {
        let mut headers = HeaderMap::new();
        append_via(&mut headers);
        assert_eq!(headers[header::VIA], "1.1 cuttle");
        headers.insert(header::VIA, HeaderValue::from_static("1.0 fred"));
        append_via(&mut headers);
        assert_eq!(headers[header::VIA], "1.0 fred, 1.1 cuttle");
    }
}
