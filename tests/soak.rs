//! Soak and integrity: many concurrent clients mix CONNECT tunnels and plain HTTP (uploads,
//! echoes, downloads) with random payload sizes and random chunking against the built binary,
//! while some of them abort mid-body, mid-response or mid-tunnel. Every byte of every completed
//! exchange is checked end to end; afterwards the proxy's connection and tunnel gauges, its
//! open file descriptors and its resident memory are back near where they started.
//!
//! `CUTTLE_SOAK_SECS` sets how long the clients run (default 20 s, which keeps the test under a
//! minute in a debug build on two cores); `CUTTLE_SOAK_SEED` replays a run.

mod support;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Concurrent clients.
const CLIENTS: usize = 32;
/// Largest payload of one exchange.
const MAX_PAYLOAD: usize = 1024 * 1024;
/// Resident memory the proxy may keep after the soak, over its warmed-up baseline.
const RSS_SLACK_KIB: u64 = 32 * 1024;

// === Payloads ===

/// Random bytes every payload is a slice of (at a random offset, so payloads differ and any
/// reordering, loss or duplication inside one changes its checksum).
fn data() -> &'static [u8] {
    static DATA: OnceLock<Vec<u8>> = OnceLock::new();
    DATA.get_or_init(|| random_bytes(2 * MAX_PAYLOAD, 0x5eed_0fc0_ffee))
}

/// xorshift64*: small, deterministic, good enough to pick sizes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A payload: 40% under 16 KiB, 40% up to 256 KiB, 20% up to 1 MiB.
    fn payload(&mut self) -> &'static [u8] {
        let len = match self.below(10) {
            0..=3 => self.below(16 * 1024),
            4..=7 => self.below(256 * 1024),
            _ => self.below(MAX_PAYLOAD as u64 + 1),
        } as usize;
        let offset = self.below((data().len() - len) as u64) as usize;
        &data()[offset..offset + len]
    }

    /// Splits `len` into random chunk sizes: mostly up to 64 KiB, sometimes a few bytes.
    fn chunks(&mut self, len: usize) -> Vec<usize> {
        let mut sizes = Vec::new();
        let mut left = len;
        while left > 0 {
            let size = if self.below(10) == 0 {
                1 + self.below(16)
            } else {
                1 + self.below(64 * 1024)
            } as usize;
            let size = size.min(left);
            sizes.push(size);
            left -= size;
        }
        sizes
    }
}

// === Exchanges ===

/// What one client did.
#[derive(Debug, Default)]
struct Tally {
    exchanges: u64,
    tunnels: u64,
    uploads: u64,
    echoes: u64,
    downloads: u64,
    faults: u64,
    /// Payload bytes checked end to end (each direction counted).
    bytes: u64,
    failures: Vec<String>,
}

#[derive(Clone)]
struct Env {
    proxy: SocketAddr,
    echo: SocketAddr,
    origin: SocketAddr,
}

/// Opens a tunnel to the echo server; an error instead of a panic.
async fn open_tunnel(env: &Env) -> Result<TcpStream, String> {
    let target = format!("sts.amazonaws.com:{}", env.echo.port());
    let mut stream = TcpStream::connect(env.proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| format!("send CONNECT: {e}"))?;
    let head = read_head(&mut stream).await;
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(format!("CONNECT answered {head:?}"));
    }
    Ok(stream)
}

/// A payload through an echo tunnel, written in random chunks while the echo is read; the
/// echo must be the payload exactly.
async fn tunnel_echo(env: &Env, payload: &'static [u8], chunks: Vec<usize>) -> Result<u64, String> {
    let stream = open_tunnel(env).await?;
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut at = 0;
        for size in chunks {
            w.write_all(&payload[at..at + size]).await?;
            at += size;
        }
        w.shutdown().await
    });
    let mut back = Vec::with_capacity(payload.len());
    tokio::time::timeout(WAIT, r.read_to_end(&mut back))
        .await
        .map_err(|_| {
            format!(
                "echo stalled after {} of {} bytes",
                back.len(),
                payload.len()
            )
        })?
        .map_err(|e| format!("read echo: {e}"))?;
    writer
        .await
        .map_err(|e| format!("writer: {e}"))?
        .map_err(|e| format!("write into tunnel: {e}"))?;
    if back != payload {
        return Err(format!(
            "echo differs: sent {} bytes ({}), got {} ({})",
            payload.len(),
            sha256_hex(payload),
            back.len(),
            sha256_hex(&back)
        ));
    }
    Ok(2 * payload.len() as u64)
}

/// A request body: the whole payload with a `Content-Length`, or random chunks (chunked).
fn body(payload: &'static [u8], chunks: Option<Vec<usize>>) -> reqwest::Body {
    let Some(chunks) = chunks else {
        return reqwest::Body::from(Bytes::from_static(payload));
    };
    let mut at = 0;
    let parts: Vec<Result<Bytes, std::io::Error>> = chunks
        .into_iter()
        .map(|size| {
            let part = Bytes::from_static(&payload[at..at + size]);
            at += size;
            Ok(part)
        })
        .collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(parts).boxed())
}

/// `POST /sha256`: the origin's length and checksum of what arrived must be the payload's.
async fn upload(
    env: &Env,
    http: &reqwest::Client,
    payload: &'static [u8],
    chunks: Option<Vec<usize>>,
) -> Result<u64, String> {
    let url = format!(
        "http://s3.us-west-2.amazonaws.com:{}/sha256",
        env.origin.port()
    );
    let response = http
        .post(url)
        .body(body(payload, chunks))
        .send()
        .await
        .map_err(|e| format!("upload: {e:?}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| format!("upload answer: {e:?}"))?;
    let want = format!("{} {}", payload.len(), sha256_hex(payload));
    if status != 200 || text != want {
        return Err(format!("upload: {status} {text:?}, want {want:?}"));
    }
    Ok(payload.len() as u64)
}

/// `POST /echo`: the body streamed back must be the payload.
async fn echo(
    env: &Env,
    http: &reqwest::Client,
    payload: &'static [u8],
    chunks: Option<Vec<usize>>,
) -> Result<u64, String> {
    let url = format!(
        "http://ec2.us-west-2.amazonaws.com:{}/echo",
        env.origin.port()
    );
    let response = http
        .post(url)
        .body(body(payload, chunks))
        .send()
        .await
        .map_err(|e| format!("echo: {e:?}"))?;
    let status = response.status();
    let back = response
        .bytes()
        .await
        .map_err(|e| format!("echo answer: {e:?}"))?;
    if status != 200 || back != payload {
        return Err(format!(
            "echo: {status}, sent {} bytes ({}), got {} ({})",
            payload.len(),
            sha256_hex(payload),
            back.len(),
            sha256_hex(&back)
        ));
    }
    Ok(2 * payload.len() as u64)
}

/// `GET /bytes?n=N`: N bytes of the pattern.
async fn download(env: &Env, http: &reqwest::Client, len: usize) -> Result<u64, String> {
    let url = format!("http://www.example.com:{}/bytes?n={len}", env.origin.port());
    let response = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("download: {e:?}"))?;
    let status = response.status();
    let got = response
        .bytes()
        .await
        .map_err(|e| format!("download body: {e:?}"))?;
    if status != 200 || got.len() != len || got != pattern(0, len) {
        return Err(format!("download: {status}, {} of {len} bytes", got.len()));
    }
    Ok(len as u64)
}

/// Closes abruptly: a reset half the time, a FIN otherwise.
fn vanish(stream: TcpStream, reset: bool) {
    if reset {
        let _ = stream.set_zero_linger();
    }
    drop(stream);
}

/// A client that gives up part-way: through an upload body, a download or a tunnel.
async fn fault(env: &Env, rng: &mut Rng) -> Result<(), String> {
    let reset = rng.below(2) == 0;
    let payload = data();
    match rng.below(3) {
        0 => {
            let len = 2 + rng.below(MAX_PAYLOAD as u64) as usize;
            let mut stream = TcpStream::connect(env.proxy)
                .await
                .map_err(|e| e.to_string())?;
            let head = format!(
                "POST http://sts.amazonaws.com:{}/sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n",
                env.origin.port()
            );
            stream
                .write_all(head.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let _ = stream.write_all(&payload[..len / 2]).await;
            vanish(stream, reset);
        }
        1 => {
            let mut stream = TcpStream::connect(env.proxy)
                .await
                .map_err(|e| e.to_string())?;
            let head = format!(
                "GET http://sts.amazonaws.com:{}/bytes?n={MAX_PAYLOAD} HTTP/1.1\r\nHost: x\r\n\r\n",
                env.origin.port()
            );
            stream
                .write_all(head.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 1 + rng.below(64 * 1024) as usize];
            let _ = tokio::time::timeout(WAIT, stream.read_exact(&mut buf)).await;
            vanish(stream, reset);
        }
        _ => {
            let mut stream = open_tunnel(env).await?;
            let len = rng.below(MAX_PAYLOAD as u64) as usize;
            let _ = stream.write_all(&payload[..len]).await;
            vanish(stream, reset);
        }
    }
    Ok(())
}

/// One client: exchanges until `deadline`, about one in twenty a fault.
async fn client(id: usize, seed: u64, env: Env, deadline: Instant) -> Tally {
    let mut rng = Rng::new(
        seed ^ (id as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    // Idle pooled connections are dropped before the proxy's idle timeout could close them
    // under a request.
    let http = client_builder(&format!("http://{}", env.proxy), None)
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .expect("reqwest client");
    let mut tally = Tally::default();
    while Instant::now() < deadline {
        let n = tally.exchanges;
        tally.exchanges += 1;
        let roll = rng.below(100);
        let payload = rng.payload();
        let chunks = rng.chunks(payload.len());
        let streamed = rng.below(2) == 0;
        let (kind, result) = match roll {
            0..=34 => {
                tally.tunnels += 1;
                ("tunnel", tunnel_echo(&env, payload, chunks).await)
            }
            35..=59 => {
                tally.uploads += 1;
                let chunks = streamed.then_some(chunks);
                ("upload", upload(&env, &http, payload, chunks).await)
            }
            60..=79 => {
                tally.echoes += 1;
                let chunks = streamed.then_some(chunks);
                ("echo", echo(&env, &http, payload, chunks).await)
            }
            80..=94 => {
                tally.downloads += 1;
                ("download", download(&env, &http, payload.len()).await)
            }
            _ => {
                tally.faults += 1;
                ("fault", fault(&env, &mut rng).await.map(|()| 0))
            }
        };
        match result {
            Ok(bytes) => tally.bytes += bytes,
            Err(e) => tally.failures.push(format!(
                "client {id} exchange {n} ({kind}, {} bytes): {e}",
                payload.len()
            )),
        }
    }
    tally
}

/// `CLIENTS` clients for `duration`; their tallies summed.
async fn run_clients(seed: u64, env: &Env, duration: Duration) -> Tally {
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|id| tokio::spawn(client(id, seed, env.clone(), deadline)))
        .collect();
    let mut total = Tally::default();
    for task in tasks {
        let t = tokio::time::timeout(duration + 2 * WAIT, task)
            .await
            .expect("client finishes")
            .expect("client task");
        total.exchanges += t.exchanges;
        total.tunnels += t.tunnels;
        total.uploads += t.uploads;
        total.echoes += t.echoes;
        total.downloads += t.downloads;
        total.faults += t.faults;
        total.bytes += t.bytes;
        total.failures.extend(t.failures);
    }
    total
}

// === The proxy process ===

/// A field of `/proc/PID/status` in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count()
}

/// Polls `check` every 100 ms until it holds or `limit` passes; returns whether it held.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_traffic_with_faults_loses_nothing() {
    let secs: u64 = std::env::var("CUTTLE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("CUTTLE_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("soak: {CLIENTS} clients for {secs} s, CUTTLE_SOAK_SEED={seed}");
    data();
    let echo_addr = start_echo().await;
    let origin = start_origin().await;
    let cuttle = CuttleProcess::start(&[
        ("CUTTLE_IDLE_TIMEOUT", "5s"),
        ("SQUID_WHITELIST", ".example.com"),
    ])
    .await;
    let pid = cuttle.pid();
    let env = Env {
        proxy: cuttle.addr,
        echo: echo_addr,
        origin,
    };
    // One answered request: every worker thread and its event loop exist before fds are counted.
    let _ = gauge(cuttle.addr, "cuttle_connections_active").await;
    let fds_before = open_fds(pid);

    let rss_cold = status_kib(pid, "VmRSS:");

    // Warm up at full concurrency (thread pools, buffers, the allocator's arenas reach their
    // working size), then take the baseline: memory that grows with traffic after that is a
    // leak, memory the allocator keeps from the warm-up is not.
    let warm = run_clients(seed, &env, Duration::from_secs(3)).await;
    assert!(warm.failures.is_empty(), "warm-up: {:#?}", warm.failures);
    let rss_before = status_kib(pid, "VmRSS:");

    let started = Instant::now();
    let total = run_clients(seed.wrapping_add(1), &env, Duration::from_secs(secs)).await;
    let rss_peak = cuttle.peak_rss_kib();
    eprintln!(
        "soak: {} exchanges in {:?} ({} tunnels, {} uploads, {} echoes, {} downloads, {} faults), {} MiB checked; peak RSS {} MiB",
        total.exchanges,
        started.elapsed(),
        total.tunnels,
        total.uploads,
        total.echoes,
        total.downloads,
        total.faults,
        total.bytes / (1024 * 1024),
        rss_peak / 1024,
    );
    assert!(
        total.failures.is_empty(),
        "{} of {} exchanges failed (CUTTLE_SOAK_SEED={seed}); first ones: {:#?}",
        total.failures.len(),
        total.exchanges,
        &total.failures[..total.failures.len().min(10)]
    );
    assert!(total.exchanges >= CLIENTS as u64, "{total:?}");
    assert!(
        total.faults > 0 && total.tunnels > 0 && total.uploads > 0,
        "{total:?}"
    );

    // Everything is released: connections (the scrape's own aside) and tunnels, then the
    // sockets themselves once the upstream pool's idle connections expire.
    let proxy = cuttle.addr;
    let settled = eventually(Duration::from_secs(15), || async move {
        gauge(proxy, "cuttle_connections_active").await == 1
            && gauge(proxy, "cuttle_tunnels_active").await == 0
    })
    .await;
    assert!(
        settled,
        "gauges after the soak: {} connections, {} tunnels",
        gauge(proxy, "cuttle_connections_active").await,
        gauge(proxy, "cuttle_tunnels_active").await
    );
    let fds_back = eventually(Duration::from_secs(20), || async move {
        open_fds(pid) <= fds_before + 2
    })
    .await;
    assert!(
        fds_back,
        "open fds: {} before, {} after",
        fds_before,
        open_fds(pid)
    );
    let rss_after = status_kib(pid, "VmRSS:");
    eprintln!(
        "soak: RSS {} MiB cold, {} MiB warm, {} MiB after; fds {} before, {} after",
        rss_cold / 1024,
        rss_before / 1024,
        rss_after / 1024,
        fds_before,
        open_fds(pid)
    );
    assert!(
        rss_after < rss_before + RSS_SLACK_KIB,
        "RSS {rss_after} KiB after the soak, {rss_before} KiB after the warm-up"
    );

    // And the proxy still serves.
    let after = client(
        usize::MAX,
        seed,
        env.clone(),
        Instant::now() + Duration::from_millis(500),
    )
    .await;
    assert!(after.failures.is_empty(), "{:#?}", after.failures);
    let stream = tunnel(
        cuttle.addr,
        &format!("sts.amazonaws.com:{}", echo_addr.port()),
    )
    .await;
    assert_eq!(echo_through(stream, b"after".to_vec()).await, b"after");
}
