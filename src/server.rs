//! The accept loop, per-connection tasks, and the drain on shutdown.
//!
//! [`Server::bind`] turns [`Settings`] into listening sockets and the shared state;
//! [`Server::run`] serves until the shutdown token fires, then drains: the proxy listener
//! closes, `/healthz` answers 503 (on the admin listener, which stays up through the drain),
//! keep-alive connections are told to close after their current request, open tunnels get
//! `SHUTDOWN_LIFETIME` to finish, and whatever is left then is closed.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::access_log::AccessLog;
use crate::client_acl::ClientAddr;
use crate::forward::{self, UpstreamClient};
use crate::framing::{FramingIo, Verdicts};
use crate::guard::AddressGuard;
use crate::idle::{Activity, ActivityIo};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::proxy;
use crate::proxy_protocol;
use crate::resolve::{Dialer, Resolver};
use crate::settings::Settings;
use crate::transaction::Observer;
use prometheus::IntGauge;

/// Largest request head accepted; a larger one gets 431 (hyper's answer) and a close.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Resolver(#[from] crate::resolve::ResolverError),
    #[error("invalid allowlist: {0}")]
    Allowlist(#[from] crate::allowlist::EntryError),
    #[error("cannot start the worker threads: {0}")]
    Workers(io::Error),
    #[error("cannot listen on {addr} ({var}): {source}")]
    Bind {
        addr: SocketAddr,
        var: &'static str,
        source: io::Error,
    },
}

/// State shared by every connection.
pub struct Shared {
    pub settings: Arc<Settings>,
    /// Metrics and the access log.
    pub observer: Arc<Observer>,
    /// The current policy; swapped whole on reload.
    pub policy: ArcSwap<Policy>,
    pub dialer: Arc<Dialer>,
    /// Set when the drain starts: `/healthz` answers 503.
    pub draining: AtomicBool,
    /// Connections and tunnels, waited on by the drain.
    pub tracker: TaskTracker,
    /// Fires at the end of the drain: everything still open is closed.
    pub hard_stop: CancellationToken,
}

/// Per-connection context handed to the request path.
pub struct Conn {
    pub shared: Arc<Shared>,
    /// The upstream client of the worker serving this connection (its pooled connections
    /// live on that worker).
    pub upstream: UpstreamClient,
    pub client: ClientAddr,
    pub activity: Arc<Activity>,
    /// What the framing watch found on this connection's request bytes.
    pub framing: Arc<Verdicts>,
    /// Accepted on the admin listener: only `/healthz` and `/metrics` are served.
    pub admin: bool,
    /// Keeps `cuttle_connections_active` up while the connection (or its tunnel) lives.
    _active: ActiveGuard,
    /// This connection's place under `CUTTLE_MAX_CONNECTIONS`, held until the connection and
    /// any tunnel over it are gone.
    _permit: OwnedSemaphorePermit,
}

/// A bound, ready server.
pub struct Server {
    /// The proxy listener's address (the workers hold the socket).
    local: SocketAddr,
    admin: Option<TcpListener>,
    shared: Arc<Shared>,
    /// `CUTTLE_MAX_CONNECTIONS`, both listeners together.
    limit: Arc<Semaphore>,
    workers: Workers,
    /// Stops the workers' accept loops and starts the drain of their connections.
    stop: CancellationToken,
}

impl Server {
    /// Compiles the policy, sets up the resolver and binds the listeners, with the access log
    /// on stdout. Everything that can fail on bad configuration fails here, before anything is
    /// served.
    pub async fn bind(settings: Settings) -> Result<Server, StartError> {
        Server::bind_with_log(settings, tokio::io::stdout()).await
    }

    /// [`Server::bind`] with the access log written to `access_log` instead of stdout.
    pub async fn bind_with_log<W>(settings: Settings, access_log: W) -> Result<Server, StartError>
    where
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let policy = Policy::new(&settings)?;
        let metrics = Arc::new(Metrics::new());
        metrics
            .allowlist_entries
            .set(policy.allowlist().len() as i64);
        let resolver = Resolver::new(&settings)?;
        let listener = bind(settings.listen, "CUTTLE_LISTEN").await?;
        let admin = match settings.admin_listen {
            Some(addr) => Some(bind(addr, "CUTTLE_ADMIN_LISTEN").await?),
            None => None,
        };
        let mut own: Vec<SocketAddr> = vec![local_addr(&listener)];
        own.extend(admin.as_ref().map(local_addr));
        let guard = AddressGuard::new(
            &settings.upstream_allow_cidrs,
            &settings.upstream_deny_cidrs,
            own,
        );
        let dialer = Arc::new(Dialer::new(
            resolver,
            guard,
            settings.connect_timeout,
            metrics.clone(),
            settings.max_pending_connects,
        ));
        let observer = Arc::new(Observer {
            access_log: AccessLog::start(
                settings.access_log,
                access_log,
                metrics.access_log_dropped.clone(),
            ),
            metrics,
        });
        let shared = Arc::new(Shared {
            observer,
            settings: Arc::new(settings),
            policy: ArcSwap::from_pointee(policy),
            dialer,
            draining: AtomicBool::new(false),
            tracker: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
        });
        let limit = Arc::new(Semaphore::new(shared.settings.max_connections));
        let stop = CancellationToken::new();
        let local = local_addr(&listener);
        let workers = Workers::start(listener, &shared, &limit, &stop).await?;
        Ok(Server {
            local,
            admin,
            shared,
            limit,
            workers,
            stop,
        })
    }

    /// The proxy listener's address (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The admin listener's address, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(local_addr)
    }

    /// The shared state (policy, settings).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` fires, then drains (see the module docs). Returns when every
    /// connection and tunnel is closed.
    pub async fn run(self, shutdown: CancellationToken) {
        let Server {
            admin,
            shared,
            limit,
            workers,
            stop,
            ..
        } = self;
        let admin_stop = CancellationToken::new();
        let admin_task = admin.map(|admin| {
            let upstream = forward::client(shared.dialer.clone(), shared.settings.idle_timeout);
            let with = Accepting {
                admin: true,
                shared: shared.clone(),
                limit: limit.clone(),
                upstream,
                drain: admin_stop.clone(),
            };
            tokio::spawn(accept_loop(admin, with, admin_stop.clone()))
        });

        // The workers accept until the shutdown; they end when this future ends, however it
        // ends (dropping them stops their threads).
        shutdown.cancelled().await;
        stop.cancel();
        workers.accepting.wait().await;

        shared.draining.store(true, Ordering::SeqCst);
        let lifetime = shared.settings.shutdown_lifetime;
        tracing::info!(lifetime = ?lifetime, "draining");
        shared.tracker.close();
        if tokio::time::timeout(lifetime, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::info!("drain deadline reached, closing what is left");
            shared.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), shared.tracker.wait()).await;
        }
        admin_stop.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        workers.stop().await;
        shared
            .observer
            .access_log
            .flush(Duration::from_secs(2))
            .await;
        tracing::info!("stopped");
    }
}

/// The threads that serve the proxy listener: each runs a single-threaded runtime with its own
/// accept loop (on its own copy of the listening socket) and its own upstream connection pool,
/// so a connection, its requests, its pooled upstream connections and its tunnel all stay on
/// one thread: no cross-thread wake-ups on the request path.
struct Workers {
    /// The accept loops, waited on before the drain starts.
    accepting: TaskTracker,
    /// Ends the workers' runtimes (and whatever still runs on them).
    exit: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Starts `CUTTLE_WORKERS` threads; returns once every one is accepting. They accept
    /// until `stop` fires, and run until [`Workers::stop`] or until dropped.
    async fn start(
        listener: TcpListener,
        shared: &Arc<Shared>,
        limit: &Arc<Semaphore>,
        stop: &CancellationToken,
    ) -> Result<Workers, StartError> {
        let mut workers = Workers {
            accepting: TaskTracker::new(),
            exit: CancellationToken::new(),
            threads: Vec::new(),
        };
        let listener = listener.into_std().map_err(StartError::Workers)?;
        let mut ready = Vec::new();
        for index in 0..shared.settings.worker_count() {
            let socket = listener.try_clone().map_err(StartError::Workers)?;
            let with = Accepting {
                admin: false,
                shared: shared.clone(),
                limit: limit.clone(),
                upstream: forward::client(shared.dialer.clone(), shared.settings.idle_timeout),
                drain: stop.clone(),
            };
            let accept =
                workers
                    .accepting
                    .track_future(accept_loop_std(socket, with, stop.clone()));
            let (started, is_ready) = tokio::sync::oneshot::channel::<io::Result<()>>();
            ready.push(is_ready);
            let exit = workers.exit.clone();
            let thread = std::thread::Builder::new()
                .name(format!("cuttle-worker-{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = started.send(Err(e));
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let _ = started.send(Ok(()));
                        tokio::select! {
                            () = accept => exit.cancelled().await,
                            () = exit.cancelled() => {}
                        }
                    });
                })
                .map_err(StartError::Workers)?;
            workers.threads.push(thread);
        }
        workers.accepting.close();
        for is_ready in ready {
            match is_ready.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(StartError::Workers(e)),
                Err(_) => return Err(StartError::Workers(io::Error::other("worker ended"))),
            }
        }
        Ok(workers)
    }

    /// Ends the workers and waits (briefly) for their threads.
    async fn stop(mut self) {
        self.exit.cancel();
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(5), joined).await;
    }
}

/// [`accept_loop`] on a socket handed over from another runtime (registered with this one).
async fn accept_loop_std(socket: std::net::TcpListener, with: Accepting, stop: CancellationToken) {
    match TcpListener::from_std(socket) {
        Ok(listener) => accept_loop(listener, with, stop).await,
        Err(e) => tracing::error!(error = %e, "a worker cannot accept"),
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.exit.cancel();
    }
}

async fn bind(addr: SocketAddr, var: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, var, source })
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// What an accept loop gives every connection it accepts.
#[derive(Clone)]
struct Accepting {
    /// The admin listener: only `/healthz` and `/metrics` are served.
    admin: bool,
    shared: Arc<Shared>,
    /// `CUTTLE_MAX_CONNECTIONS`, shared by every listener.
    limit: Arc<Semaphore>,
    /// The upstream client of the thread running the loop.
    upstream: UpstreamClient,
    /// Tells the connection to finish gracefully.
    drain: CancellationToken,
}

/// Accepts until `stop` fires; each connection is served on the tracker and told to finish
/// gracefully when `drain` fires.
async fn accept_loop(listener: TcpListener, with: Accepting, stop: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = &with.shared;
        let metrics = &shared.observer.metrics;
        metrics.connections_total.inc();
        let Ok(permit) = with.limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached (CUTTLE_MAX_CONNECTIONS)");
            metrics.connections_rejected.inc();
            shared.tracker.spawn(refuse_overloaded(stream));
            continue;
        };
        let active = ActiveGuard::new(&metrics.connections_active);
        let span = tracing::debug_span!("conn", client = tracing::field::Empty);
        let start = start_connection(stream, peer, with.clone(), active, permit);
        shared.tracker.spawn(start.instrument(span));
    }
}

/// Settles who the client is (the peer, or the address in its PROXY protocol header on the
/// proxy listener), then serves the connection.
async fn start_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    with: Accepting,
    active: ActiveGuard,
    permit: OwnedSemaphorePermit,
) {
    let Accepting {
        admin,
        shared,
        upstream,
        drain,
        ..
    } = with;
    let client = if admin {
        ClientAddr::new(peer)
    } else {
        match proxy_protocol::accept(&mut stream, peer, &shared).await {
            Some(client) => client,
            None => return,
        }
    };
    tracing::Span::current().record("client", tracing::field::display(client));
    let conn = Conn {
        shared,
        upstream,
        client,
        activity: Activity::new(),
        framing: Verdicts::new(),
        admin,
        _active: active,
        _permit: permit,
    };
    serve_connection(stream, Arc::new(conn), drain).await;
}

/// Holds a gauge one higher while alive.
pub struct ActiveGuard(IntGauge);

impl ActiveGuard {
    pub fn new(gauge: &IntGauge) -> ActiveGuard {
        gauge.inc();
        ActiveGuard(gauge.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Past `CUTTLE_MAX_CONNECTIONS`: a 503 and a close, without reading the request.
async fn refuse_overloaded(mut stream: TcpStream) {
    const BODY: &str = "cuttle: too many connections (CUTTLE_MAX_CONNECTIONS)\n";
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nX-Squid-Error: ERR_CANNOT_FORWARD 0\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// The client socket as hyper serves it: the framing watch over the activity clock.
/// [`crate::tunnel`] takes the raw socket back out of it after `CONNECT` by downcasting to
/// exactly this type, so `serve_connection` names it rather than letting it be inferred.
pub type ClientIo = TokioIo<FramingIo<ActivityIo<TcpStream>>>;

/// Serves one client connection: HTTP/1.1 with upgrades (CONNECT), the header timeout, the
/// idle timeout (which waits while a request waits for its response head: that wait answers
/// 504 on the same clock, see [`crate::idle`]), and a graceful close when the drain starts.
async fn serve_connection(stream: TcpStream, conn: Arc<Conn>, drain: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let settings = &conn.shared.settings;
    let io: ClientIo = TokioIo::new(FramingIo::new(
        ActivityIo::new(stream, conn.activity.clone()),
        conn.framing.clone(),
        MAX_HEADER_BYTES,
    ));
    let service_conn = conn.clone();
    let service =
        service_fn(move |req: hyper::Request<Incoming>| proxy::handle(service_conn.clone(), req));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let connection = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with error");
                }
                return;
            }
            _ = drain.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = conn.activity.idle(settings.idle_timeout) => {
                tracing::debug!("idle timeout");
                return;
            }
            _ = conn.shared.hard_stop.cancelled() => return,
        }
    }
}
