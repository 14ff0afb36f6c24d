//! `ProxyError` and its one mapping to responses.
//!
//! Every failure on the request path is a `ProxyError`; [`ProxyError::into_response`] is the only
//! place that turns one into a status, an `X-Squid-Error` header (existing tooling greps for
//! Squid's error names) and a one-line plain-text reason.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::guard::Refusal;
use crate::metrics::Reason;
use crate::policy::Denial;
use crate::proxy::{full, Body};

/// A failure on the request path.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProxyError {
    /// Refused by the policy (client, port or allowlist).
    #[error("access denied: {message}")]
    Denied { denial: Denial, message: String },
    /// Every address the name resolved to is refused by the destination guard.
    #[error("access denied: {host} resolves to {addr}, {refusal}")]
    AddressRefused {
        host: String,
        addr: SocketAddr,
        refusal: Refusal,
    },
    /// The request is malformed or not something a proxy accepts.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A method the proxy refuses outright.
    #[error("method not allowed: {0}")]
    MethodNotAllowed(String),
    /// A scheme or form cuttle does not proxy.
    #[error("not implemented: {0}")]
    NotImplemented(String),
    /// Name resolution failed.
    #[error("cannot resolve {host}: {detail}")]
    Dns { host: String, detail: String },
    /// Every address refused the connection (or failed otherwise).
    #[error("cannot connect to {target}: {detail}")]
    ConnectFailed {
        target: String,
        detail: String,
        /// The OS error number, shown in `X-Squid-Error` as Squid does.
        errno: Option<i32>,
    },
    /// Too many connects to this destination are in progress.
    #[error("too many connections to {target} are being opened (CUTTLE_MAX_PENDING_CONNECTS)")]
    ConnectLimit { target: String },
    /// Connecting timed out.
    #[error("timed out connecting to {target}")]
    ConnectTimeout { target: String },
    /// The upstream sent no response head within `CUTTLE_IDLE_TIMEOUT` of the client's last
    /// byte.
    #[error("timed out waiting for a response from {target} (CUTTLE_IDLE_TIMEOUT)")]
    ReadTimeout { target: String },
    /// The upstream failed after the connection was made.
    #[error("upstream {target} failed: {detail}")]
    Upstream { target: String, detail: String },
    /// The tunnel's TLS ClientHello failed the SNI check. The `200` was already sent: the
    /// tunnel is closed, and this is only recorded (logged as 403).
    #[error(
        "access denied: tunnel to {target} refused by the SNI check (CUTTLE_SNI_CHECK): {detail}"
    )]
    SniRefused { target: String, detail: String },
}

impl ProxyError {
    /// The fixed reason of this error for metrics and logs.
    pub fn reason(&self) -> Reason {
        match self {
            ProxyError::Denied { denial, .. } => denial.reason(),
            ProxyError::AddressRefused { .. } => Reason::UpstreamAddress,
            ProxyError::BadRequest(_) | ProxyError::MethodNotAllowed(_) => Reason::BadRequest,
            ProxyError::NotImplemented(_) => Reason::NotImplemented,
            ProxyError::Dns { .. } => Reason::Dns,
            ProxyError::ConnectFailed { .. } => Reason::ConnectFailed,
            ProxyError::ConnectTimeout { .. } => Reason::ConnectTimeout,
            ProxyError::ConnectLimit { .. } => Reason::ConnectLimit,
            ProxyError::ReadTimeout { .. } => Reason::UpstreamTimeout,
            ProxyError::Upstream { .. } => Reason::UpstreamFailed,
            ProxyError::SniRefused { .. } => Reason::Sni,
        }
    }

    /// True for refusals by policy or guard (as opposed to errors).
    pub fn is_denial(&self) -> bool {
        matches!(
            self,
            ProxyError::Denied { .. }
                | ProxyError::AddressRefused { .. }
                | ProxyError::SniRefused { .. }
        )
    }

    /// The status and Squid error name of this error.
    pub fn status(&self) -> (StatusCode, &'static str, i32) {
        match self {
            // Refused by policy, by the destination address guard, or (recorded only, the
            // tunnel is closed) by the SNI check.
            ProxyError::Denied { .. }
            | ProxyError::AddressRefused { .. }
            | ProxyError::SniRefused { .. } => (StatusCode::FORBIDDEN, "ERR_ACCESS_DENIED", 0),
            // Malformed request or a target the proxy cannot understand.
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "ERR_INVALID_REQ", 0),
            // TRACE and friends: refused whatever the destination.
            ProxyError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "ERR_UNSUP_REQ", 0),
            // https:// and other schemes in absolute form.
            ProxyError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "ERR_UNSUP_REQ", 0),
            // The name does not resolve.
            ProxyError::Dns { .. } => (StatusCode::BAD_GATEWAY, "ERR_DNS_FAIL", 0),
            // Refused or unreachable: carry the errno as Squid does.
            ProxyError::ConnectFailed { errno, .. } => (
                StatusCode::BAD_GATEWAY,
                "ERR_CONNECT_FAIL",
                errno.unwrap_or(0),
            ),
            // Connects to this destination are piling up (a blackholed host): shed load.
            ProxyError::ConnectLimit { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "ERR_CANNOT_FORWARD", 0)
            }
            // No answer within CUTTLE_CONNECT_TIMEOUT.
            ProxyError::ConnectTimeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "ERR_CONNECT_TIMEOUT", 0)
            }
            // Connected and sent the request, but no response head in time.
            ProxyError::ReadTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "ERR_READ_TIMEOUT", 0),
            // Connected, but the upstream broke the exchange.
            ProxyError::Upstream { .. } => (StatusCode::BAD_GATEWAY, "ERR_READ_ERROR", 0),
        }
    }

    /// The response the client gets.
    pub fn into_response(self) -> Response<Body> {
        let (status, name, errno) = self.status();
        let body = Bytes::from(format!("cuttle: {self}\n"));
        let mut response = Response::new(full(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Ok(value) = HeaderValue::from_str(&format!("{name} {errno}")) {
            headers.insert("x-squid-error", value);
        }
        if matches!(self, ProxyError::BadRequest(_)) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
