//! The worker threads, accept loops, per-connection tasks, and the drain on shutdown.
//!
//! [`Server::bind`] turns [`Settings`] into listening sockets and the shared state, and starts
//! the workers: `CUTTLE_WORKERS` threads, each a single-threaded runtime with its own accept
//! loop and upstream pool, kept evenly loaded by `Balance`. The admin listener, the access
//! log writer, signals and reload run on the main thread. [`Server::run`] serves until the shutdown token fires, then drains: the proxy listener
//! closes, `/healthz` answers 503 (on the admin listener, which stays up through the drain),
//! keep-alive connections are told to close after their current request, open tunnels get
//! `SHUTDOWN_LIFETIME` to finish, and whatever is left then is closed.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::access_log::AccessLog;
use crate::client_acl::ClientAddr;
use crate::framing::{Verdicts, Watch};
use crate::guard::AddressGuard;
use crate::idle::{watched, Activity, First};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::pool::Pool;
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
    /// The upstream pool of the worker serving this connection (its pooled connections
    /// live on that worker).
    pub upstream: Arc<Pool>,
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
    /// This connection's place in its worker's load, for [`Balance`].
    _load: Option<Load>,
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
            let upstream = pool(&shared);
            let with = Accepting {
                admin: true,
                shared: shared.clone(),
                limit: limit.clone(),
                upstream,
                drain: admin_stop.clone(),
                worker: None,
            };
            tokio::spawn(accept_loop(admin, with, None, admin_stop.clone()))
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
        let count = shared.settings.worker_count();
        let (balance, receivers) = Balance::new(count);
        for (index, handovers) in receivers.into_iter().enumerate() {
            let socket = listener.try_clone().map_err(StartError::Workers)?;
            let with = Accepting {
                admin: false,
                shared: shared.clone(),
                limit: limit.clone(),
                upstream: pool(shared),
                drain: stop.clone(),
                worker: Some((balance.clone(), index)),
            };
            let accept = workers.accepting.track_future(accept_loop_std(
                socket,
                with,
                handovers,
                stop.clone(),
            ));
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
async fn accept_loop_std(
    socket: std::net::TcpListener,
    with: Accepting,
    handovers: mpsc::UnboundedReceiver<Handover>,
    stop: CancellationToken,
) {
    match TcpListener::from_std(socket) {
        Ok(listener) => accept_loop(listener, with, Some(handovers), stop).await,
        Err(e) => tracing::error!(error = %e, "a worker cannot accept"),
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.exit.cancel();
    }
}

/// Binds a listening socket with Nagle turned off: accepted sockets inherit `TCP_NODELAY`
/// (Linux, the BSDs), which saves a system call per connection.
async fn bind(addr: SocketAddr, var: &'static str) -> Result<TcpListener, StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, var, source })?;
    let _ = socket2::SockRef::from(&listener).set_tcp_nodelay(true);
    Ok(listener)
}

/// A keep-alive pool for one thread; pooled connections are closed after the idle timeout (90 s
/// at most).
fn pool(shared: &Shared) -> Arc<Pool> {
    Pool::new(
        shared.dialer.clone(),
        shared.settings.idle_timeout.min(Duration::from_secs(90)),
    )
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
    /// The upstream pool of the thread running the loop.
    upstream: Arc<Pool>,
    /// Tells the connection to finish gracefully.
    drain: CancellationToken,
    /// For a worker: the balance between workers and this worker's place in it.
    worker: Option<(Arc<Balance>, usize)>,
}

/// Keeps the workers evenly loaded. Each worker accepts from the shared socket, and the kernel
/// wakes whichever is idle, so a burst of connections (a load balancer reconnecting, a client
/// pool starting) can land mostly on one; with no work stealing between threads, that worker
/// would carry them for their lifetime. A worker that accepts a connection while it serves
/// more than one more than the least busy worker hands the connection over to that one.
struct Balance {
    /// Connections each worker serves.
    loads: Box<[AtomicUsize]>,
    /// Each worker's queue of connections handed over to it.
    queues: Box<[mpsc::UnboundedSender<Handover>]>,
}

impl Balance {
    fn new(count: usize) -> (Arc<Balance>, Vec<mpsc::UnboundedReceiver<Handover>>) {
        let (queues, receivers): (Vec<_>, Vec<_>) =
            (0..count).map(|_| mpsc::unbounded_channel()).unzip();
        let balance = Balance {
            loads: (0..count).map(|_| AtomicUsize::new(0)).collect(),
            queues: queues.into_boxed_slice(),
        };
        (Arc::new(balance), receivers)
    }

    /// The worker to serve a connection accepted by worker `me`, with its place taken.
    fn pick(self: &Arc<Self>, me: usize) -> Load {
        let load = |i: usize| self.loads[i].load(Ordering::Relaxed);
        let least = (0..self.loads.len()).min_by_key(|&i| load(i)).unwrap_or(me);
        let index = if load(me) > load(least) + 1 {
            least
        } else {
            me
        };
        self.loads[index].fetch_add(1, Ordering::Relaxed);
        Load {
            balance: self.clone(),
            index,
        }
    }
}

/// One connection counted in a worker's load while alive.
struct Load {
    balance: Arc<Balance>,
    index: usize,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.balance.loads[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection accepted by one worker, to be served by another.
struct Handover {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    active: ActiveGuard,
    permit: OwnedSemaphorePermit,
    load: Load,
}

/// Accepts until `stop` fires; each connection is served on the tracker and told to finish
/// gracefully when `drain` fires. A worker also serves the connections handed over to it.
async fn accept_loop(
    listener: TcpListener,
    with: Accepting,
    mut handovers: Option<mpsc::UnboundedReceiver<Handover>>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            Some(handover) = recv(&mut handovers) => {
                match TcpStream::from_std(handover.stream) {
                    Ok(stream) => serve(stream, handover.peer, &with, handover.active, handover.permit, Some(handover.load)),
                    Err(e) => tracing::warn!(error = %e, "cannot take over a connection"),
                }
                continue;
            }
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
        let Some((balance, me)) = &with.worker else {
            serve(stream, peer, &with, active, permit, None);
            continue;
        };
        let load = balance.pick(*me);
        if load.index == *me {
            serve(stream, peer, &with, active, permit, Some(load));
            continue;
        }
        let target = load.index;
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand over a connection");
                continue;
            }
        };
        let handover = Handover {
            stream,
            peer,
            active,
            permit,
            load,
        };
        // The other worker is gone (shutting down): serve it here after all.
        if let Err(mpsc::error::SendError(handover)) = balance.queues[target].send(handover) {
            if let Ok(stream) = TcpStream::from_std(handover.stream) {
                let load = balance.pick(*me);
                serve(
                    stream,
                    peer,
                    &with,
                    handover.active,
                    handover.permit,
                    Some(load),
                );
            }
        }
    }
}

/// The next connection handed over, if this loop takes any.
async fn recv(handovers: &mut Option<mpsc::UnboundedReceiver<Handover>>) -> Option<Handover> {
    match handovers {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Serves `stream` on this thread.
fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    with: &Accepting,
    active: ActiveGuard,
    permit: OwnedSemaphorePermit,
    load: Option<Load>,
) {
    let span = tracing::debug_span!("conn", client = tracing::field::Empty);
    let start = start_connection(stream, peer, with.clone(), active, permit, load);
    with.shared.tracker.spawn(start.instrument(span));
}

/// Settles who the client is (the peer, or the address in its PROXY protocol header on the
/// proxy listener), then serves the connection.
async fn start_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    with: Accepting,
    active: ActiveGuard,
    permit: OwnedSemaphorePermit,
    load: Option<Load>,
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
        _load: load,
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

/// The client socket as hyper serves it. [`crate::tunnel`] takes the raw socket back out of it
/// after `CONNECT` by downcasting to exactly this type, so `serve_connection` names it rather
/// than letting it be inferred.
pub type ClientIo = TokioIo<ClientStream<TcpStream>>;

/// A client socket with its two observers: every read or write that moves bytes stamps the
/// activity clock (`CUTTLE_IDLE_TIMEOUT`, [`crate::idle`]), and every byte read goes past the
/// request framing watch ([`crate::framing`]).
#[derive(Debug)]
pub struct ClientStream<T> {
    inner: T,
    activity: Arc<Activity>,
    watch: Watch,
}

impl<T> ClientStream<T> {
    pub fn new(inner: T, activity: Arc<Activity>, watch: Watch) -> Self {
        ClientStream {
            inner,
            activity,
            watch,
        }
    }

    /// The wrapped stream (the tunnel relay takes the socket back and stamps the clock itself).
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// Stamps the clock when a write moved bytes.
    fn wrote(&self, poll: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            this.activity.touch();
            this.watch.saw(read);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Serves one client connection: HTTP/1.1 with upgrades (CONNECT), the header timeout, the
/// idle timeout (which waits while a request waits for its response head: that wait answers
/// 504 on the same clock, see [`crate::idle`]), and a graceful close when the drain starts.
async fn serve_connection(stream: TcpStream, conn: Arc<Conn>, drain: CancellationToken) {
    // Accepted sockets inherit TCP_NODELAY from the listener (see `bind`) on these systems.
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "macos"
    )))]
    let _ = stream.set_nodelay(true);
    let settings = &conn.shared.settings;
    let io: ClientIo = TokioIo::new(ClientStream::new(
        stream,
        conn.activity.clone(),
        Watch::new(conn.framing.clone(), MAX_HEADER_BYTES),
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
    let ended = |result: hyper::Result<()>| {
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with error");
        }
    };
    let watchdog = async {
        tokio::select! {
            _ = drain.cancelled() => Stop::Drain,
            _ = conn.activity.idle(settings.idle_timeout) => Stop::Idle,
            _ = conn.shared.hard_stop.cancelled() => Stop::Hard,
        }
    };
    tokio::pin!(watchdog);
    match watched(connection.as_mut(), watchdog).await {
        First::Main(result) => return ended(result),
        First::Side(Stop::Drain) => connection.as_mut().graceful_shutdown(),
        First::Side(Stop::Idle) => return tracing::debug!("idle timeout"),
        First::Side(Stop::Hard) => return,
    }
    // Draining: the connection finishes the request in hand, then closes.
    let watchdog = async {
        tokio::select! {
            _ = conn.activity.idle(settings.idle_timeout) => tracing::debug!("idle timeout"),
            _ = conn.shared.hard_stop.cancelled() => {}
        }
    };
    tokio::pin!(watchdog);
    if let First::Main(result) = watched(connection.as_mut(), watchdog).await {
        ended(result);
    }
}

/// Why a connection's watchdog fired.
enum Stop {
    /// The drain started: finish gracefully.
    Drain,
    Idle,
    /// The drain deadline passed.
    Hard,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections are accepted with Nagle off (small responses and tunnelled handshakes are
    /// not held back waiting for an ACK), though no call sets it per connection.
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "macos"
    ))]
    #[tokio::test]
    async fn accepted_sockets_have_nagle_off() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), "CUTTLE_LISTEN")
            .await
            .unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
        drop(client);
    }

    /// A worker keeps what it accepts while within one connection of the least busy worker;
    /// past that, the least busy one gets it. Places are given back when dropped.
    #[test]
    fn balance_hands_over_only_past_one_connection() {
        let (balance, _queues) = Balance::new(3);
        let first = balance.pick(0);
        let second = balance.pick(0);
        assert_eq!((first.index, second.index), (0, 0), "within one: kept");
        let third = balance.pick(0);
        assert_eq!(third.index, 1, "worker 0 has 2, the others 0: handed over");
        let fourth = balance.pick(0);
        assert_eq!(fourth.index, 2);
        let fifth = balance.pick(1);
        assert_eq!(fifth.index, 1, "worker 1 has 1, the least has 1: kept");
        drop((first, second));
        let sixth = balance.pick(1);
        assert_eq!(sixth.index, 0, "worker 1 has 2, worker 0 none: handed over");
        let loads: Vec<usize> = balance
            .loads
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect();
        assert_eq!(loads, [1, 2, 1]);
        drop((third, fourth, fifth, sixth));
        assert!(balance.loads.iter().all(|l| l.load(Ordering::Relaxed) == 0));
    }
}
