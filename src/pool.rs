//! The keep-alive pool of upstream HTTP/1 connections, one per worker thread.
//!
//! Each worker has its own pool (see [`crate::server`]), so a forwarded request, the upstream
//! connection it goes over and that connection's task all run on one thread, with nothing
//! spawned per request. A connection leaves the pool for one exchange and goes back once the
//! response body has been read to its end (the [`PooledBody`] carries it); a connection whose
//! response was cut short is closed instead, as hyper cannot reuse it. Pooled connections are
//! reused most recently used first, so a quieter period lets the others expire: a connection
//! idle for longer than the pool's timeout is closed, on the next checkout for its destination
//! or by a sweep that runs while the pool holds any.
//!
//! A request that finds its pooled connection closed by the origin meanwhile (the race of
//! every keep-alive client: the origin's idle timer fires as the request goes out) goes out
//! again on another connection when hyper hands it back unwritten; a request that may have
//! been written is never sent twice.
//!
//! New connections come from [`Dialer::connect`], so they go to guarded addresses only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::policy::Target;
use crate::resolve::Dialer;
use crate::transaction::CountedBody;

/// The body of a forwarded request.
pub type RequestBody = CountedBody<Incoming>;

/// One worker's pooled upstream connections, by destination.
pub struct Pool {
    dialer: Arc<Dialer>,
    /// How long a connection may stay idle in the pool.
    idle_timeout: Duration,
    idle: Mutex<HashMap<Target, Vec<Idle>>>,
    /// Whether the sweep task runs.
    sweeping: AtomicBool,
}

/// A connection waiting in the pool.
struct Idle {
    sender: SendRequest<RequestBody>,
    addr: SocketAddr,
    since: Instant,
}

/// A response from upstream and where it came from.
pub struct Exchange {
    /// The response; its body holds the connection until read to its end.
    pub response: Response<PooledBody>,
    /// The address the connection reached.
    pub addr: SocketAddr,
    /// DNS and connect times, when this exchange opened the connection.
    pub opened: Option<(Duration, Duration)>,
}

impl Pool {
    /// An empty pool whose connections are closed after `idle_timeout` unused.
    pub fn new(dialer: Arc<Dialer>, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            dialer,
            idle_timeout,
            idle: Mutex::new(HashMap::new()),
            sweeping: AtomicBool::new(false),
        })
    }

    /// Sends `request` to `target` over a pooled connection, or a new one; resolves once the
    /// response head has arrived.
    pub async fn send(
        self: &Arc<Self>,
        target: &Target,
        mut request: Request<RequestBody>,
    ) -> Result<Exchange, ProxyError> {
        loop {
            let (mut sender, addr, opened) = match self.checkout(target) {
                Some(idle) => (idle.sender, idle.addr, None),
                None => {
                    let (sender, addr, opened) = self.open(target).await?;
                    (sender, addr, Some(opened))
                }
            };
            // A pooled connection may have been closed meanwhile: try another.
            if let Err(error) = sender.ready().await {
                if opened.is_some() {
                    return Err(upstream_error(&error, target));
                }
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lease = Lease {
                        pool: Arc::downgrade(self),
                        target: Some(target.clone()),
                        sender: Some(sender),
                        addr,
                    };
                    let response = response.map(|inner| PooledBody { inner, lease });
                    return Ok(Exchange {
                        response,
                        addr,
                        opened,
                    });
                }
                Err(mut error) => match error.take_message() {
                    // Not written: a pooled connection closed as it was taken; go again.
                    Some(unsent) if opened.is_none() => request = unsent,
                    _ => return Err(upstream_error(&error.into_error(), target)),
                },
            }
        }
    }

    /// Opens a new connection to `target` and starts its task.
    async fn open(
        &self,
        target: &Target,
    ) -> Result<(SendRequest<RequestBody>, SocketAddr, (Duration, Duration)), ProxyError> {
        let upstream = self.dialer.connect(target).await?;
        let (sender, connection) = http1::handshake(TokioIo::new(upstream.stream))
            .await
            .map_err(|e| upstream_error(&e, target))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with error");
            }
        });
        Ok((sender, upstream.addr, (upstream.dns, upstream.connect)))
    }

    /// The most recently used live connection to `target`, closing expired ones on the way.
    fn checkout(&self, target: &Target) -> Option<Idle> {
        let mut idle = self.lock();
        let waiting = idle.get_mut(target)?;
        let now = Instant::now();
        while let Some(connection) = waiting.pop() {
            if now.duration_since(connection.since) < self.idle_timeout
                && !connection.sender.is_closed()
            {
                return Some(connection);
            }
        }
        idle.remove(target);
        None
    }

    /// Puts a connection back, after its response body ended.
    fn checkin(
        self: &Arc<Self>,
        target: Target,
        sender: SendRequest<RequestBody>,
        addr: SocketAddr,
    ) {
        if sender.is_closed() {
            return;
        }
        let connection = Idle {
            sender,
            addr,
            since: Instant::now(),
        };
        self.lock().entry(target).or_default().push(connection);
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self), self.idle_timeout));
        }
    }

    /// Closes the connections idle for longer than the timeout (or closed by the origin);
    /// returns how many stay.
    fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut idle = self.lock();
        idle.retain(|_, waiting| {
            waiting.retain(|c| {
                now.duration_since(c.since) < self.idle_timeout && !c.sender.is_closed()
            });
            !waiting.is_empty()
        });
        idle.values().map(Vec::len).sum()
    }

    /// Connections waiting in the pool.
    pub fn idle_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Target, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sweeps the pool every half idle timeout while it holds connections (and stops when it is
/// empty, or gone; the next checkin starts it again).
async fn sweep(pool: Weak<Pool>, idle_timeout: Duration) {
    let period = (idle_timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        if pool.sweep() == 0 {
            pool.sweeping.store(false, Ordering::Relaxed);
            // A checkin between the sweep and the store may have seen the flag still set.
            if pool.idle_count() == 0 || pool.sweeping.swap(true, Ordering::Relaxed) {
                return;
            }
        }
    }
}

/// A connection out of the pool for one exchange.
struct Lease {
    pool: Weak<Pool>,
    target: Option<Target>,
    sender: Option<SendRequest<RequestBody>>,
    addr: SocketAddr,
}

impl Lease {
    /// The exchange is complete: the connection goes back to the pool.
    fn release(&mut self) {
        if let (Some(pool), Some(target), Some(sender)) =
            (self.pool.upgrade(), self.target.take(), self.sender.take())
        {
            pool.checkin(target, sender, self.addr);
        }
    }
}

/// A response body from upstream, holding its connection: back to the pool once the body has
/// been read to its end, closed if the body is dropped before.
pub struct PooledBody {
    inner: Incoming,
    lease: Lease,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = poll {
            this.lease.release();
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

impl Drop for PooledBody {
    fn drop(&mut self) {
        // hyper stops polling a body that says it has ended (and never polls an empty one):
        // that one is complete too.
        if self.inner.is_end_stream() {
            self.lease.release();
        }
    }
}

/// The error of an upstream exchange: the client's own request body failing (a bad chunk: the
/// client's fault, 400) or a failure of the upstream connection.
pub fn upstream_error(error: &hyper::Error, target: &Target) -> ProxyError {
    if error.is_user() {
        return ProxyError::BadRequest(format!("request body: {}", error_chain(error)));
    }
    ProxyError::Upstream {
        target: target.to_string(),
        detail: error_chain(error),
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
