//! `CONNECT`: dial first (a failure is a 502/504, never a 200 followed by a reset), answer
//! `200 Connection established`, then copy bytes both ways until both sides have finished.
//! A side that closes its write half has that half-close passed on, and the other direction
//! keeps flowing (`copy_bidirectional`).

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::ext::ReasonPhrase;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;

use crate::error::ProxyError;
use crate::policy::Target;
use crate::proxy::{full, Body};
use crate::resolve::Upstream;
use crate::server::{ActiveGuard, Conn};
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
    let on_upgrade = hyper::upgrade::on(&mut req);
    let tunnel_conn = conn.clone();
    let tx = tx.clone();
    conn.shared.tracker.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => relay(tunnel_conn, upgraded, upstream, target, tx).await,
            Err(e) => tracing::debug!(error = %e, "client left before the tunnel started"),
        }
    });
    let mut response = Response::new(full(""));
    response
        .extensions_mut()
        .insert(ReasonPhrase::from_static(b"Connection established"));
    Ok(response)
}

/// Copies until both directions finish, the tunnel is idle for `CUTTLE_IDLE_TIMEOUT`, or the
/// drain deadline passes.
async fn relay(
    conn: Arc<Conn>,
    upgraded: Upgraded,
    upstream: Upstream,
    target: Target,
    tx: Transaction,
) {
    let _active = ActiveGuard::new(&conn.shared.observer.metrics.tunnels_active);
    let mut client = TokioIo::new(upgraded);
    let mut upstream = CountedIo::new(upstream.stream, &tx);
    let idle_timeout = conn.shared.settings.idle_timeout;
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match result {
            Ok((up, down)) => tracing::debug!(%target, up, down, "tunnel closed"),
            Err(e) => tracing::debug!(%target, error = %e, "tunnel failed"),
        },
        _ = conn.activity.idle(idle_timeout) => tracing::debug!(%target, "tunnel idle timeout"),
        _ = conn.shared.hard_stop.cancelled() => tracing::debug!(%target, "tunnel closed at drain deadline"),
    }
}
