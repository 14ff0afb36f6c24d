//! One request's bookkeeping, from the request head to the end of its response body or tunnel:
//! what was decided, by which rule, bytes each way, the upstream reached and how long DNS and
//! connect took. When the last handle drops (the response body is finished or abandoned, the
//! tunnel closed), the request is counted in the metrics and written to the access log.
//!
//! Handles are cheap clones of one `Arc`: the response body holds one, a tunnel task another.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::access_log::{AccessLog, Record};
use crate::client_acl::ClientAddr;
use crate::error::ProxyError;
use crate::metrics::{Direction, Kind, Metrics, Outcome, Reason};
use crate::policy::{Rule, Target};

/// Where finished requests are reported.
pub struct Observer {
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
}

/// A handle on one request's record.
#[derive(Clone)]
pub struct Transaction(Arc<Inner>);

struct Inner {
    observer: Arc<Observer>,
    start: Instant,
    started_at: SystemTime,
    client: ClientAddr,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    state: Mutex<State>,
}

struct State {
    kind: Kind,
    method: String,
    url: String,
    target: Option<Target>,
    status: u16,
    outcome: Outcome,
    reason: Reason,
    rule: Option<String>,
    upstream: Option<SocketAddr>,
    dns: Option<Duration>,
    connect: Option<Duration>,
    content_type: Option<String>,
    log: bool,
}

impl Transaction {
    /// Starts the record of a request.
    pub fn begin(
        observer: Arc<Observer>,
        client: ClientAddr,
        method: &http::Method,
        url: String,
    ) -> Transaction {
        let kind = if method == http::Method::CONNECT {
            Kind::Connect
        } else {
            Kind::Http
        };
        Transaction(Arc::new(Inner {
            observer,
            start: Instant::now(),
            started_at: SystemTime::now(),
            client,
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            state: Mutex::new(State {
                kind,
                method: method.to_string(),
                url,
                target: None,
                status: 0,
                outcome: Outcome::Error,
                reason: Reason::BadRequest,
                rule: None,
                upstream: None,
                dns: None,
                connect: None,
                content_type: None,
                log: true,
            }),
        }))
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self
            .0
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut state)
    }

    /// Marks a request for the proxy itself; `log` false keeps it out of the access log.
    pub fn local(&self, log: bool) {
        self.with(|s| {
            s.kind = Kind::Local;
            s.log = log;
        });
    }

    /// Records the parsed target.
    pub fn target(&self, target: &Target) {
        self.with(|s| s.target = Some(target.clone()));
    }

    /// Records the rule that allowed the request.
    pub fn allowed(&self, rule: Rule<'_>) {
        let reason = match rule {
            Rule::Entry(_) => Reason::Allowlist,
            Rule::NoWhitelist => Reason::NoWhitelist,
            Rule::Local => Reason::Local,
        };
        let text = match rule {
            Rule::Local => None,
            rule if self.0.observer.access_log.detailed() => Some(rule.to_string()),
            _ => None,
        };
        self.with(|s| {
            s.outcome = Outcome::Allowed;
            s.reason = reason;
            s.rule = text;
        });
    }

    /// Records a refusal by the allowlist that report mode lets through: counted and logged as
    /// `would_deny` unless a later step (the address guard, DNS, connect) fails the request.
    pub fn would_deny(&self) {
        self.with(|s| {
            s.outcome = Outcome::WouldDeny;
            s.reason = Reason::Allowlist;
            s.rule = None;
        });
    }

    /// Records a refusal or failure.
    pub fn failed(&self, error: &ProxyError) {
        let outcome = if error.is_denial() {
            Outcome::Denied
        } else {
            Outcome::Error
        };
        self.with(|s| {
            s.outcome = outcome;
            s.reason = error.reason();
        });
    }

    /// Records the upstream reached, and the DNS and connect times when this request made the
    /// connection.
    pub fn upstream(&self, addr: SocketAddr, timing: Option<(Duration, Duration)>) {
        self.with(|s| {
            s.upstream = Some(addr);
            if let Some((dns, connect)) = timing {
                s.dns = Some(dns);
                s.connect = Some(connect);
            }
        });
    }

    /// Records the response status and content type.
    pub fn response(&self, status: u16, content_type: Option<&str>) {
        self.with(|s| {
            s.status = status;
            s.content_type = content_type.map(str::to_string);
        });
    }

    /// Adds bytes sent to the client that are not relayed payload (local and error answers):
    /// logged, not counted in `cuttle_bytes_total`.
    pub fn add_local_bytes(&self, n: u64) {
        self.0.bytes_down.fetch_add(n, Ordering::Relaxed);
    }

    /// A counter of relayed bytes in `direction` for this request and the metrics.
    pub fn counter(&self, direction: Direction) -> ByteCounter {
        ByteCounter {
            transaction: self.clone(),
            metric: self.0.observer.metrics.bytes(direction).clone(),
            direction,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let state = self
            .state
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let duration = self.start.elapsed();
        self.observer
            .metrics
            .request(state.kind, state.outcome, state.reason, duration);
        if !state.log {
            return;
        }
        let log = &self.observer.access_log;
        log.log(Record {
            end: self.started_at + duration,
            duration,
            client: self.client.ip(),
            kind: state.kind,
            method: std::mem::take(&mut state.method),
            url: std::mem::take(&mut state.url),
            host: match &state.target {
                Some(t) if log.detailed() => Some(t.host.to_string()),
                _ => None,
            },
            port: state.target.as_ref().map(|t| t.port),
            status: state.status,
            outcome: state.outcome,
            reason: state.reason,
            rule: state.rule.take(),
            bytes_up: *self.bytes_up.get_mut(),
            bytes_down: *self.bytes_down.get_mut(),
            upstream: state.upstream,
            dns: state.dns,
            connect: state.connect,
            content_type: state.content_type.take(),
        });
    }
}

/// Counts relayed bytes into a transaction and `cuttle_bytes_total`.
#[derive(Clone)]
pub struct ByteCounter {
    transaction: Transaction,
    metric: IntCounter,
    direction: Direction,
}

impl ByteCounter {
    /// Adds `n` bytes.
    pub fn add(&self, n: usize) {
        let n = n as u64;
        self.metric.inc_by(n);
        let slot = match self.direction {
            Direction::ClientToUpstream => &self.transaction.0.bytes_up,
            Direction::UpstreamToClient => &self.transaction.0.bytes_down,
        };
        slot.fetch_add(n, Ordering::Relaxed);
    }
}

/// A body that counts its data frames and keeps its transaction open until it is finished
/// or dropped.
pub struct CountedBody<B> {
    inner: B,
    counter: Option<ByteCounter>,
    _transaction: Transaction,
}

impl<B> CountedBody<B> {
    /// Counts `inner`'s bytes with `counter`.
    pub fn counted(inner: B, counter: ByteCounter) -> Self {
        CountedBody {
            _transaction: counter.transaction.clone(),
            inner,
            counter: Some(counter),
        }
    }

    /// Holds `transaction` open while `inner` is sent, counting nothing.
    pub fn holding(inner: B, transaction: Transaction) -> Self {
        CountedBody {
            inner,
            counter: None,
            _transaction: transaction,
        }
    }
}

impl<B> HttpBody for CountedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(counter)) = (&poll, &this.counter) {
            if let Some(data) = frame.data_ref() {
                counter.add(data.len());
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An upstream stream whose reads count as upstream-to-client and writes as client-to-upstream.
pub struct CountedIo<T> {
    inner: T,
    up: ByteCounter,
    down: ByteCounter,
}

impl<T> CountedIo<T> {
    pub fn new(inner: T, transaction: &Transaction) -> Self {
        CountedIo {
            inner,
            up: transaction.counter(Direction::ClientToUpstream),
            down: transaction.counter(Direction::UpstreamToClient),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.down.add(n);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            this.up.add(n);
        }
        poll
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
