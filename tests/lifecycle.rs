//! The binary's lifecycle: drain on SIGTERM/SIGINT, the drain deadline, timeouts, the connection
//! limit, and constant memory for large bodies.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// SIGTERM while a tunnel is open: new connections are refused at once, the open tunnel keeps
/// working until the client closes it, then the process exits 0 (well before the deadline).
#[tokio::test]
async fn sigterm_lets_open_tunnel_finish() {
    let echo = start_echo().await;
    let mut cuttle = CuttleProcess::start(&[("SHUTDOWN_LIFETIME", "60")]).await;
    let mut stream = tunnel(cuttle.addr, &format!("sts.amazonaws.com:{}", echo.port())).await;
    stream.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    stream.read_exact(&mut buf).await.unwrap();

    cuttle.signal("TERM");
    cuttle.wait_for_line("draining");
    let refused = TcpStream::connect(cuttle.addr).await;
    assert!(
        refused.is_err(),
        "new connections must be refused while draining"
    );

    // The tunnel still carries data both ways, then closes cleanly.
    let started = Instant::now();
    let back = echo_through(stream, b"after the signal".to_vec()).await;
    assert_eq!(back, b"after the signal");
    let status = tokio::task::spawn_blocking(move || {
        let status = cuttle.wait_exit(WAIT);
        (status, cuttle)
    })
    .await
    .unwrap();
    let (status, _cuttle) = status;
    let status = status.expect("cuttle exits once the tunnel is closed");
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "exit waited for the deadline"
    );
}

/// A tunnel still open at the deadline is closed and the process exits 0.
#[tokio::test]
async fn drain_deadline_closes_what_is_left() {
    let echo = start_echo().await;
    let mut cuttle = CuttleProcess::start(&[("SHUTDOWN_LIFETIME", "1")]).await;
    let mut stream = tunnel(cuttle.addr, &format!("sts.amazonaws.com:{}", echo.port())).await;
    cuttle.signal("INT");
    let (status, _cuttle) = tokio::task::spawn_blocking(move || (cuttle.wait_exit(WAIT), cuttle))
        .await
        .unwrap();
    assert_eq!(status.expect("exits after the deadline").code(), Some(0));
    // The tunnel was closed by the proxy: reading gives EOF (or a reset), not a hang.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .expect("tunnel closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

/// A client that never finishes its request head is disconnected after CUTTLE_HEADER_TIMEOUT;
/// other clients are served meanwhile.
#[tokio::test]
async fn header_timeout_drops_slow_clients() {
    let proxy = TestProxy::start(&[("CUTTLE_HEADER_TIMEOUT", "1s")]).await;
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET http://sts.amazonaws.com/ HTTP/1.1\r\nHost: sts")
        .await
        .unwrap();
    let healthy = direct_client()
        .get(format!("{}/healthz", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(healthy.status(), 200);
    let started = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, slow.read_to_end(&mut rest))
        .await
        .expect("slow client disconnected")
        .ok();
    assert!(started.elapsed() < Duration::from_secs(15));
    proxy.stop().await;
}

/// A tunnel with no bytes either way for CUTTLE_IDLE_TIMEOUT is closed; an active one is not.
#[tokio::test]
async fn idle_tunnel_is_closed() {
    let echo = start_echo().await;
    let proxy = TestProxy::start(&[("CUTTLE_IDLE_TIMEOUT", "1s")]).await;
    let target = format!("sts.amazonaws.com:{}", echo.port());

    // Active: a byte every 300 ms for 2.5 s keeps it open.
    let mut active = tunnel(proxy.addr, &target).await;
    for _ in 0..8 {
        active.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        active
            .read_exact(&mut b)
            .await
            .expect("active tunnel stays open");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Idle: closed after about a second.
    let mut idle = tunnel(proxy.addr, &target).await;
    let started = Instant::now();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(WAIT, idle.read(&mut buf))
        .await
        .expect("idle tunnel closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    drop(active);
    proxy.stop().await;
}

/// Past CUTTLE_MAX_CONNECTIONS a new client gets 503 and a close; when a place frees up, new
/// clients are served again.
#[tokio::test]
async fn connection_limit() {
    let echo = start_echo().await;
    let proxy = TestProxy::start(&[("CUTTLE_MAX_CONNECTIONS", "2")]).await;
    let target = format!("sts.amazonaws.com:{}", echo.port());
    let first = tunnel(proxy.addr, &target).await;
    let second = tunnel(proxy.addr, &target).await;
    let answer = raw_exchange(proxy.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("CUTTLE_MAX_CONNECTIONS"), "{answer}");
    drop(first);
    // The freed place is reused (the proxy notices the close asynchronously: retry briefly).
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = raw_exchange(
            proxy.addr,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "place never freed: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(second);
    proxy.stop().await;
}

/// 1 GiB up and 1 GiB down through the binary pass with the proxy's peak RSS staying small:
/// bodies are streamed, never buffered whole.
#[tokio::test]
async fn gigabyte_bodies_in_constant_memory() {
    const GIB: u64 = 1024 * 1024 * 1024;
    let origin = start_origin().await;
    let cuttle = CuttleProcess::start(&[]).await;
    let client = client(&format!("http://{}", cuttle.addr), None);

    let response = client
        .post(format!("http://sts.amazonaws.com:{}/sha256", origin.port()))
        .body(streamed_body(GIB))
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .expect("upload");
    let text = response.text().await.unwrap();
    assert!(text.starts_with(&format!("{GIB} ")), "{text}");

    let mut response = client
        .get(format!(
            "http://sts.amazonaws.com:{}/bytes?n={GIB}",
            origin.port()
        ))
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .expect("download");
    let mut received = 0u64;
    let mut mismatch = None;
    while let Some(chunk) = response.chunk().await.expect("download chunk") {
        if mismatch.is_none() && chunk[..] != pattern(received, chunk.len())[..] {
            mismatch = Some(received);
        }
        received += chunk.len() as u64;
    }
    assert_eq!(received, GIB);
    assert_eq!(mismatch, None, "download corrupted at offset");

    let peak = cuttle.peak_rss_kib();
    eprintln!("peak RSS after 1 GiB up and 1 GiB down: {peak} KiB");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB for 2 GiB of bodies");
}

/// Connects to one destination that does not answer pile up only to
/// CUTTLE_MAX_PENDING_CONNECTS: past it, requests for that destination get 503 at once, while
/// other destinations are served.
#[tokio::test]
async fn pending_connects_per_destination_are_bounded() {
    // A listener that never accepts, with a backlog of 0: once its queue is full, the kernel
    // drops further SYNs and connects to it hang.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(300),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let echo = start_echo().await;
    let proxy = TestProxy::start(&[
        ("CUTTLE_MAX_PENDING_CONNECTS", "1"),
        ("CUTTLE_CONNECT_TIMEOUT", "3s"),
    ])
    .await;
    let target = format!("sts.amazonaws.com:{port}");
    // Five at once: one takes the place and hangs until the connect timeout, four are shed.
    let attempts: Vec<_> = (0..5)
        .map(|_| {
            let (addr, target) = (proxy.addr, target.clone());
            tokio::spawn(async move { connect_raw(addr, &target).await.1 })
        })
        .collect();
    let mut heads = Vec::new();
    for attempt in attempts {
        heads.push(tokio::time::timeout(WAIT, attempt).await.unwrap().unwrap());
    }
    let shed = heads
        .iter()
        .filter(|h| h.starts_with("HTTP/1.1 503"))
        .count();
    let timed_out = heads
        .iter()
        .filter(|h| h.starts_with("HTTP/1.1 504"))
        .count();
    assert_eq!((shed, timed_out), (4, 1), "{heads:#?}");
    let shed_head = heads
        .iter()
        .find(|h| h.starts_with("HTTP/1.1 503"))
        .unwrap();
    assert!(
        shed_head
            .to_ascii_lowercase()
            .contains("x-squid-error: err_cannot_forward 0"),
        "{shed_head}"
    );
    // Another destination is not affected.
    tunnel(proxy.addr, &format!("sts.amazonaws.com:{}", echo.port())).await;
    drop(fillers);
    proxy.stop().await;
}

/// `CUTTLE_WORKERS=3`: three named worker threads serve the listener together; many tunnels
/// at once (small exchanges and bulk ones) all get their bytes back intact.
#[tokio::test]
async fn workers_share_the_listener() {
    let echo = start_echo().await;
    let cuttle = CuttleProcess::start(&[("CUTTLE_WORKERS", "3")]).await;
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", cuttle.pid()))
        .expect("task dir")
        .filter_map(|task| {
            let path = task.ok()?.path().join("comm");
            Some(std::fs::read_to_string(path).ok()?.trim().to_string())
        })
        .filter(|name| name.starts_with("cuttle-worker-"))
        .collect();
    assert_eq!(threads.len(), 3, "worker threads: {threads:?}");

    let target = format!("sts.amazonaws.com:{}", echo.port());
    let mut tunnels = tokio::task::JoinSet::new();
    for i in 0..24u64 {
        let target = target.clone();
        let proxy = cuttle.addr;
        tunnels.spawn(async move {
            // Every third tunnel carries 3 MiB (bulk: the splice path), the rest 300 bytes.
            let len = if i % 3 == 0 { 3 << 20 } else { 300 };
            let data = random_bytes(len, i);
            let stream = tunnel(proxy, &target).await;
            let back = echo_through(stream, data.clone()).await;
            assert!(
                back == data,
                "tunnel {i}: {} bytes back of {len}",
                back.len()
            );
        });
    }
    while let Some(done) = tunnels.join_next().await {
        done.expect("tunnel task");
    }
}
