//! Plain HTTP forwarding over a pooled keep-alive client.
//!
//! The request goes out with the hop-by-hop headers removed (RFC 9110 §7.6.1: `Connection` and
//! every header it names, plus `Proxy-Connection`, `Keep-Alive`, `TE`, `Transfer-Encoding`,
//! `Upgrade`, `Proxy-Authorization`, `Proxy-Authenticate`, `Trailer`), `Host` set from the
//! request URI (the URI decides, not a disagreeing `Host` header), and `Via` added. Bodies
//! stream both ways: hyper's `Incoming` is handed straight to the other side, so a 1 GiB upload
//! or download passes in constant memory.
//!
//! The pool's connector goes through [`Dialer::connect`], so pooled connections are made to
//! guarded addresses only.
//!
//! An upstream that takes the request and sends no response head gets until
//! `CUTTLE_IDLE_TIMEOUT` after the client connection last moved a byte (request body bytes
//! restart the clock, so a slow upload is never cut); then the client gets 504
//! `ERR_READ_TIMEOUT` and the upstream connection is dropped. The connection's own idle check
//! waits for that answer (see [`crate::idle`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::metrics::Direction;
use crate::policy::Target;
use crate::proxy::{Body, Relayed};
use crate::resolve::Dialer;
use crate::server::Conn;
use crate::transaction::{CountedBody, Transaction};

/// The `Via` value cuttle adds.
const VIA: &str = "1.1 cuttle";

/// The pooled upstream client.
pub type UpstreamClient = Client<Connector, CountedBody<Incoming>>;

/// Builds the pooled client; idle pooled connections are closed after `idle`.
pub fn client(dialer: Arc<Dialer>, idle: Duration) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle.min(Duration::from_secs(90)))
        .build(Connector { dialer })
}

/// Forwards an absolute-form request to `target` (already allowed by the policy).
pub async fn forward(
    conn: &Arc<Conn>,
    req: Request<Incoming>,
    target: Target,
    tx: &Transaction,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let authority = if target.port == 80 {
        target.host.to_string()
    } else {
        target.to_string()
    };
    parts.uri = Uri::try_from(format!("http://{authority}{path}"))
        .map_err(|e| ProxyError::BadRequest(format!("request target: {e}")))?;
    remove_hop_by_hop(&mut parts.headers);
    let host = HeaderValue::from_str(&authority)
        .map_err(|e| ProxyError::BadRequest(format!("request host: {e}")))?;
    parts.headers.insert(header::HOST, host);
    append_via(&mut parts.headers);

    let request = conn.upstream.request(Request::from_parts(
        parts,
        CountedBody::counted(body, tx.counter(Direction::ClientToUpstream)),
    ));
    // No response head within CUTTLE_IDLE_TIMEOUT of the client's last byte (a slow upload
    // keeps the clock running): 504. Dropping the request drops the upstream connection.
    let response = tokio::select! {
        response = request => response.map_err(|e| upstream_error(e, &target))?,
        _ = conn.activity.quiet_for(conn.shared.settings.idle_timeout) => {
            return Err(ProxyError::ReadTimeout {
                target: target.to_string(),
            });
        }
    };
    let (mut parts, body) = response.into_parts();
    if let Some(info) = parts.extensions.remove::<UpstreamInfo>() {
        // DNS and connect times belong to the request that opened the pooled connection.
        let fresh = info.fresh.swap(false, Ordering::Relaxed);
        tx.upstream(info.addr, fresh.then_some((info.dns, info.connect)));
    }
    remove_hop_by_hop(&mut parts.headers);
    append_via(&mut parts.headers);
    parts.extensions.insert(Relayed);
    let body = CountedBody::counted(body, tx.counter(Direction::UpstreamToClient));
    Ok(Response::from_parts(parts, body.boxed()))
}

/// The error behind a client failure: ours from the connector (DNS, guard, connect), the
/// client's own request body breaking (a bad chunk: the client's fault, 400), or a failure of
/// the upstream exchange.
fn upstream_error(error: hyper_util::client::legacy::Error, target: &Target) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(err) = source {
        if let Some(ours) = err.downcast_ref::<ProxyError>() {
            return ours.clone();
        }
        // The request body stream failed: it is the client's body that hyper could not read.
        if err
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user)
        {
            return ProxyError::BadRequest(format!("request body: {}", error_chain(err)));
        }
        source = err.source();
    }
    ProxyError::Upstream {
        target: target.to_string(),
        detail: error_chain(&error),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
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

// === impl Connector ===

/// The pool's connector: resolve, guard, dial, through the shared [`Dialer`].
#[derive(Clone)]
pub struct Connector {
    dialer: Arc<Dialer>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = self.dialer.clone();
        Box::pin(async move {
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
            let target = Target::parse_authority(authority, Some(80))
                .map_err(|e| ProxyError::BadRequest(format!("request target: {e}")))?;
            let upstream = dialer.connect(&target).await?;
            Ok(UpstreamIo {
                io: TokioIo::new(upstream.stream),
                info: UpstreamInfo {
                    addr: upstream.addr,
                    dns: upstream.dns,
                    connect: upstream.connect,
                    fresh: Arc::new(AtomicBool::new(true)),
                },
            })
        })
    }
}

/// A pooled upstream connection; remembers what it reached and what that took.
pub struct UpstreamIo {
    io: TokioIo<TcpStream>,
    info: UpstreamInfo,
}

/// Where a pooled connection goes, handed to each response over it (in its extensions).
#[derive(Clone, Debug)]
pub struct UpstreamInfo {
    addr: std::net::SocketAddr,
    dns: Duration,
    connect: Duration,
    /// True until the first response over the connection claims the DNS and connect times.
    fresh: Arc<AtomicBool>,
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new().extra(self.info.clone())
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
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
