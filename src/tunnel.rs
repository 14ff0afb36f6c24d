//! `CONNECT`: dial first (a failure is a 502/504, never a 200 followed by a reset), answer
//! `200 Connection established`, let the SNI check ([`crate::sni`]) judge the client's
//! ClientHello, then copy bytes both ways until both sides have finished.
//! A side that closes its write half has that half-close passed on, and the other direction
//! keeps flowing (`copy_bidirectional`).

use std::io;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::ext::ReasonPhrase;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::copy::{self, Meter};
use crate::error::ProxyError;
use crate::idle::{watched, First};
use crate::metrics::Direction;
use crate::policy::Target;
use crate::proxy::{full, Body};
use crate::server::{ActiveGuard, ClientIo, Conn};
use crate::sni;
use crate::transaction::{CountedIo, Transaction};

/// Opens a tunnel to `target` (already allowed by the policy).
pub async fn open(
    conn: &Arc<Conn>,
    mut req: Request<Incoming>,
    target: Target,
    tx: &Transaction,
) -> Result<Response<Body>, ProxyError> {
    let upstream = conn.shared.dialer.connect(&target).await?;
    tx.upstream(upstream.addr, Some((upstream.dns, upstream.connect)));
    let upstream = upstream.stream;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let tunnel_conn = conn.clone();
    let tx = tx.clone();
    conn.shared.tracker.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut upstream = upstream;
                let mut client = TokioIo::new(upgraded);
                // CUTTLE_SNI_CHECK: the ClientHello is judged before a byte goes upstream.
                if sni::screen(&tunnel_conn, &mut client, &mut upstream, &target, &tx).await {
                    relay(tunnel_conn, client.into_inner(), upstream, target, tx).await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "client left before the tunnel started"),
        }
    });
    let mut response = Response::new(full(""));
    response
        .extensions_mut()
        .insert(ReasonPhrase::from_static(b"Connection established"));
    Ok(response)
}

/// Relays between the client and the upstream until both directions finish, the tunnel is
/// idle for `CUTTLE_IDLE_TIMEOUT`, or the drain deadline passes. The client's raw socket is
/// taken back from hyper so that [`copy::relay`] can move bytes socket to socket; bytes the
/// client sent before the upgrade completed go first.
async fn relay(
    conn: Arc<Conn>,
    upgraded: Upgraded,
    upstream: TcpStream,
    target: Target,
    tx: Transaction,
) {
    let _active = ActiveGuard::new(&conn.shared.observer.metrics.tunnels_active);
    let result = match take_socket(upgraded) {
        Ok((client, early)) => {
            let up = Meter {
                counter: tx.counter(Direction::ClientToUpstream),
                activity: conn.activity.clone(),
            };
            let down = Meter {
                counter: tx.counter(Direction::UpstreamToClient),
                activity: conn.activity.clone(),
            };
            let copy = copy::relay(&client, &upstream, up, down).with_early(early);
            tokio::pin!(copy);
            watch(&conn, copy).await
        }
        // Not a plain socket (never the case for the listeners cuttle opens): copy through
        // hyper. Boxed, so this path takes no room in every tunnel's state.
        Err(upgraded) => {
            let mut copy = Box::pin(async move {
                let mut client = TokioIo::new(upgraded);
                let mut upstream = CountedIo::new(upstream, &tx);
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await
            });
            watch(&conn, copy.as_mut()).await
        }
    };
    match result {
        Ended::Copied(Ok((up, down))) => tracing::debug!(%target, up, down, "tunnel closed"),
        Ended::Copied(Err(e)) => tracing::debug!(%target, error = %e, "tunnel failed"),
        Ended::Idle => tracing::debug!(%target, "tunnel idle timeout"),
        Ended::Drained => tracing::debug!(%target, "tunnel closed at drain deadline"),
    }
}

/// The client's socket as hyper accepted it, and the bytes hyper had already read from it;
/// taken apart at once, so neither hyper's wrappers nor its read buffer (which even empty bytes
/// keep alive) stay in the tunnel's state for its lifetime.
fn take_socket(upgraded: Upgraded) -> Result<(TcpStream, Vec<u8>), Upgraded> {
    let parts = upgraded.downcast::<ClientIo>()?;
    let early = parts.read_buf.to_vec();
    Ok((parts.io.into_inner().into_inner(), early))
}

/// How a tunnel ended.
enum Ended {
    Copied(io::Result<(u64, u64)>),
    Idle,
    Drained,
}

/// Runs `copy` until it ends, the connection is idle for `CUTTLE_IDLE_TIMEOUT`, or the drain
/// deadline passes. `copy` is borrowed, pinned where the caller keeps it: moved in, it would
/// be stored twice in this future's state.
async fn watch<F>(conn: &Conn, copy: std::pin::Pin<&mut F>) -> Ended
where
    F: std::future::Future<Output = io::Result<(u64, u64)>> + ?Sized,
{
    let watchdog = async {
        tokio::select! {
            _ = conn.activity.idle(conn.shared.settings.idle_timeout) => Ended::Idle,
            _ = conn.shared.hard_stop.cancelled() => Ended::Drained,
        }
    };
    tokio::pin!(watchdog);
    match watched(copy, watchdog).await {
        First::Main(result) => Ended::Copied(result),
        First::Side(ended) => ended,
    }
}
