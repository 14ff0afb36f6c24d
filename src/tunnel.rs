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
use crate::metrics::Direction;
use crate::policy::Target;
use crate::proxy::{full, Body};
use crate::resolve::Upstream;
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
    let on_upgrade = hyper::upgrade::on(&mut req);
    let tunnel_conn = conn.clone();
    let tx = tx.clone();
    conn.shared.tracker.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut upstream = upstream;
                let mut client = TokioIo::new(upgraded);
                // CUTTLE_SNI_CHECK: the ClientHello is judged before a byte goes upstream.
                if sni::screen(
                    &tunnel_conn,
                    &mut client,
                    &mut upstream.stream,
                    &target,
                    &tx,
                )
                .await
                {
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

/// Relays between the client and the upstream. The client's raw socket is taken back from
/// hyper so that [`copy::relay`] can move bytes socket to socket; bytes the client sent before
/// the upgrade completed go first.
async fn copy_both_ways(
    conn: &Conn,
    upgraded: Upgraded,
    upstream: TcpStream,
    tx: &Transaction,
) -> io::Result<(u64, u64)> {
    match upgraded.downcast::<ClientIo>() {
        Ok(parts) => {
            let client = parts.io.into_inner().into_inner().into_inner();
            let up = Meter {
                counter: tx.counter(Direction::ClientToUpstream),
                activity: conn.activity.clone(),
            };
            let down = Meter {
                counter: tx.counter(Direction::UpstreamToClient),
                activity: conn.activity.clone(),
            };
            if !parts.read_buf.is_empty() {
                copy::write_all(&upstream, &parts.read_buf).await?;
                up.counter.add(parts.read_buf.len());
            }
            copy::relay(&client, &upstream, up, down).await
        }
        // Not a plain socket (never the case for the listeners cuttle opens): copy through hyper.
        Err(upgraded) => {
            let mut client = TokioIo::new(upgraded);
            let mut upstream = CountedIo::new(upstream, tx);
            tokio::io::copy_bidirectional(&mut client, &mut upstream).await
        }
    }
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
    let idle_timeout = conn.shared.settings.idle_timeout;
    tokio::select! {
        result = copy_both_ways(&conn, upgraded, upstream.stream, &tx) => match result {
            Ok((up, down)) => tracing::debug!(%target, up, down, "tunnel closed"),
            Err(e) => tracing::debug!(%target, error = %e, "tunnel failed"),
        },
        _ = conn.activity.idle(idle_timeout) => tracing::debug!(%target, "tunnel idle timeout"),
        _ = conn.shared.hard_stop.cancelled() => tracing::debug!(%target, "tunnel closed at drain deadline"),
    }
}
