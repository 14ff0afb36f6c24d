//! Faults: broken upstreams, vanishing clients and a silent DNS server. Each gets the documented
//! status or a clean close, the proxy's connection and tunnel gauges return to their baseline,
//! and another client's request made meanwhile succeeds.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

// === Misbehaving upstreams ===

/// A TCP server on 127.0.0.1:0 running `serve` on every connection it accepts.
async fn start_raw<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve(stream));
        }
    });
    addr
}

/// Reads until the end of a request head (or EOF).
async fn read_request_head(stream: &mut TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
}

/// Closes `stream` with a TCP reset instead of a FIN.
fn reset(stream: TcpStream) {
    stream.set_zero_linger().expect("SO_LINGER 0");
    drop(stream);
}

// === Clients ===

/// `GET http://sts.amazonaws.com:PORT/PATH` (the test hosts file maps the name to 127.0.0.1).
fn get(port: u16, path: &str) -> String {
    format!("GET http://sts.amazonaws.com:{port}{path} HTTP/1.1\r\nHost: sts.amazonaws.com\r\n\r\n")
}

/// A response: status, `X-Squid-Error`, `Content-Length`, and the body bytes read until the
/// proxy closed the connection, reset it, or sent `Content-Length` bytes.
#[derive(Debug)]
struct Answer {
    status: u16,
    squid_error: Option<String>,
    length: Option<usize>,
    body: Vec<u8>,
    /// The read ended with EOF or an error (not by reaching `Content-Length`).
    ended_early: bool,
}

/// Sends `request` and reads the answer; panics if nothing ends it within `WAIT`.
async fn exchange(proxy: SocketAddr, request: impl AsRef<str>) -> Answer {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    stream
        .write_all(request.as_ref().as_bytes())
        .await
        .expect("send");
    let head = read_head(&mut stream).await;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    assert!(
        matches!(
            response.parse(head.as_bytes()),
            Ok(httparse::Status::Complete(_))
        ),
        "no response head: {head:?}"
    );
    let get = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    let length = get("content-length").and_then(|l| l.parse().ok());
    let squid_error = get("x-squid-error");
    let status = response.code.expect("status");
    let mut body = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let ended_early = loop {
        if length.is_some_and(|l| body.len() >= l) {
            break false;
        }
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => body.extend_from_slice(&buf[..n]),
            Err(_) => panic!("response body hangs after {} bytes", body.len()),
        }
    };
    Answer {
        status,
        squid_error,
        length,
        body,
        ended_early,
    }
}

/// Another client's request, through the same proxy to a healthy origin: must succeed.
async fn healthy_request(proxy: SocketAddr, origin: SocketAddr) {
    let answer = exchange(
        proxy,
        &format!(
            "GET http://s3.us-west-2.amazonaws.com:{}/hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            origin.port()
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "healthy request: {answer:?}");
    assert_eq!(answer.body, b"hello from origin");
}

// === Metrics ===

/// Polls until `cuttle_connections_active` and `cuttle_tunnels_active` are back to the given
/// values, for up to `limit`; returns the last values seen.
async fn settle(proxy: SocketAddr, connections: i64, tunnels: i64, limit: Duration) -> (i64, i64) {
    let deadline = Instant::now() + limit;
    loop {
        let now = (
            gauge(proxy, "cuttle_connections_active").await,
            gauge(proxy, "cuttle_tunnels_active").await,
        );
        if now == (connections, tunnels) || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// === Tests ===

/// An upstream that refuses connections: 502 `ERR_CONNECT_FAIL` with the errno, for plain HTTP
/// and CONNECT.
#[tokio::test]
async fn upstream_refusing_is_502() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[]).await;
    let port = closed_port().await;
    let (answer, _) = tokio::join!(
        exchange(proxy.addr, get(port, "/")),
        healthy_request(proxy.addr, origin)
    );
    assert_eq!(answer.status, 502, "{answer:?}");
    assert_eq!(answer.squid_error.as_deref(), Some("ERR_CONNECT_FAIL 111"));
    let (_, head) = connect_raw(proxy.addr, &format!("sts.amazonaws.com:{port}")).await;
    assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
    assert!(head.contains("ERR_CONNECT_FAIL 111"), "{head}");
    assert_eq!(settle(proxy.addr, 1, 0, WAIT).await, (1, 0));
    proxy.stop().await;
}

/// An upstream that resets the connection in the middle of a response body: the client gets
/// the head and a truncated body, then a close, never a hang. In a tunnel, the reset reaches
/// the client as a close after the bytes sent before it.
#[tokio::test]
async fn upstream_reset_mid_stream_truncates() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[]).await;
    let resetting = start_raw(|mut stream| async move {
        read_request_head(&mut stream).await;
        let mut response = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n".to_vec();
        response.extend(pattern(0, 100_000));
        let _ = stream.write_all(&response).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        reset(stream);
    })
    .await;
    let (answer, _) = tokio::join!(
        exchange(proxy.addr, get(resetting.port(), "/big")),
        healthy_request(proxy.addr, origin)
    );
    assert_eq!(answer.status, 200, "the head was already relayed");
    assert_eq!(answer.length, Some(1_000_000));
    assert!(answer.ended_early, "{answer:?}");
    assert!(answer.body.len() <= 100_000, "{}", answer.body.len());
    assert_eq!(
        answer.body,
        pattern(0, answer.body.len()),
        "bytes before the reset intact"
    );

    // A tunnel: the upstream answers, then resets.
    let tunnel_upstream = start_raw(|mut stream| async move {
        let mut buf = [0u8; 4];
        let _ = stream.read_exact(&mut buf).await;
        let _ = stream.write_all(b"partial").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        reset(stream);
    })
    .await;
    let mut stream = tunnel(
        proxy.addr,
        &format!("sts.amazonaws.com:{}", tunnel_upstream.port()),
    )
    .await;
    stream.write_all(b"ping").await.unwrap();
    let mut back = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("tunnel closes, not hangs")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => back.extend_from_slice(&buf[..n]),
        }
    }
    assert_eq!(back, b"partial");
    healthy_request(proxy.addr, origin).await;
    assert_eq!(settle(proxy.addr, 1, 0, WAIT).await, (1, 0));
    proxy.stop().await;
}

/// An upstream that reads the request and never answers: with `CUTTLE_IDLE_TIMEOUT=2s` the
/// client gets 504 `ERR_READ_TIMEOUT` about 2 s after its last byte (not a silent close when
/// the connection's idle timeout fires), counted as `reason="upstream_timeout"` and logged as
/// `TCP_MISS/504`; the upstream connection is dropped. Another client is served meanwhile.
#[tokio::test]
async fn upstream_never_answering_gets_504() {
    let origin = start_origin().await;
    let mut cuttle =
        CuttleProcess::start_with(&[("CUTTLE_IDLE_TIMEOUT", "2s")], Stdout::Capture).await;
    let (got_tx, got_rx) = tokio::sync::oneshot::channel::<()>();
    let (released_tx, released_rx) = tokio::sync::oneshot::channel::<Instant>();
    let signals = std::sync::Arc::new(std::sync::Mutex::new(Some((got_tx, released_tx))));
    let silent = start_raw(move |mut stream| {
        let signals = signals.clone();
        async move {
            read_request_head(&mut stream).await;
            let Some((got, released)) = signals.lock().unwrap().take() else {
                return;
            };
            let _ = got.send(());
            // Never answer; note when the proxy lets go of the connection.
            let mut buf = [0u8; 64];
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            let _ = released.send(Instant::now());
        }
    })
    .await;
    let started = Instant::now();
    let waiting = tokio::spawn(exchange(cuttle.addr, get(silent.port(), "/silent")));
    // Once the upstream holds the request, others are served meanwhile.
    tokio::time::timeout(WAIT, got_rx)
        .await
        .expect("upstream got the request")
        .unwrap();
    healthy_request(cuttle.addr, origin).await;
    let answer = waiting.await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(answer.status, 504, "{answer:?}");
    assert_eq!(
        answer.squid_error.as_deref(),
        Some("ERR_READ_TIMEOUT 0"),
        "{answer:?}"
    );
    assert!(
        String::from_utf8_lossy(&answer.body).contains("CUTTLE_IDLE_TIMEOUT"),
        "{answer:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(1800) && elapsed < Duration::from_secs(15),
        "{elapsed:?}"
    );
    let released = tokio::time::timeout(WAIT, released_rx)
        .await
        .expect("upstream connection dropped")
        .unwrap();
    assert!(released.duration_since(started) < Duration::from_secs(15));
    let series =
        "cuttle_requests_total{decision=\"error\",kind=\"http\",reason=\"upstream_timeout\"}";
    let deadline = Instant::now() + WAIT;
    loop {
        let count = scrape(cuttle.addr).await.get(series).copied();
        if count == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "{series} = {count:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines = cuttle.access_lines(2);
    let line = lines
        .iter()
        .find(|l| l.contains("/silent"))
        .unwrap_or_else(|| panic!("no access log line for /silent: {lines:?}"));
    assert!(line.contains(" TCP_MISS/504 "), "{line}");
    assert_eq!(settle(cuttle.addr, 1, 0, WAIT).await, (1, 0));
}

/// A request body uploaded slowly (a piece every 0.5 s for 4 s, longer than
/// `CUTTLE_IDLE_TIMEOUT=2s`) to an origin that answers once it has read it all: every byte
/// restarts the clock, so the answer is the origin's 200, not a 504 and not a close.
#[tokio::test]
async fn slow_upload_longer_than_the_idle_timeout_is_not_cut() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[("CUTTLE_IDLE_TIMEOUT", "2s")]).await;
    let pieces: Vec<Vec<u8>> = (0..8).map(|i| pattern(i * 1000, 1000)).collect();
    let body: Vec<u8> = pieces.concat();
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST http://sts.amazonaws.com:{}/sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        origin.port(),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut pace = tokio::time::interval(Duration::from_millis(500));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    pace.tick().await;
    for piece in &pieces {
        pace.tick().await;
        stream.write_all(piece).await.unwrap();
    }
    let uploading = started.elapsed();
    assert!(uploading > Duration::from_secs(3), "{uploading:?}");
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let want = format!("{} {}", body.len(), sha256_hex(&body));
    let mut answer = vec![0u8; want.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut answer))
        .await
        .expect("body in time")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&answer), want);
    proxy.stop().await;
}

/// An upstream that answers garbage, or closes without answering: 502 `ERR_READ_ERROR`.
#[tokio::test]
async fn upstream_garbage_is_502_read_error() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[]).await;
    let garbage = start_raw(|mut stream| async move {
        read_request_head(&mut stream).await;
        let _ = stream
            .write_all(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02 garbage\r\n\r\n")
            .await;
        let _ = stream.shutdown().await;
    })
    .await;
    let bad_status = start_raw(|mut stream| async move {
        read_request_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 2000 Huge\r\nContent-Length: 0\r\n\r\n")
            .await;
    })
    .await;
    let mute = start_raw(|mut stream| async move {
        read_request_head(&mut stream).await;
        let _ = stream.shutdown().await;
    })
    .await;
    for upstream in [garbage, bad_status, mute] {
        let (answer, _) = tokio::join!(
            exchange(proxy.addr, get(upstream.port(), "/")),
            healthy_request(proxy.addr, origin)
        );
        assert_eq!(answer.status, 502, "{answer:?}");
        assert_eq!(
            answer.squid_error.as_deref(),
            Some("ERR_READ_ERROR 0"),
            "{answer:?}"
        );
    }
    assert_eq!(settle(proxy.addr, 1, 0, WAIT).await, (1, 0));
    proxy.stop().await;
}

/// An upstream that closes half-way through a `Content-Length` body: the client sees the head,
/// the bytes sent, then a close before `Content-Length` (a truncation it can detect).
#[tokio::test]
async fn upstream_closing_half_way_truncates() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[]).await;
    let half = start_raw(|mut stream| async move {
        read_request_head(&mut stream).await;
        let mut response = b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n".to_vec();
        response.extend(pattern(0, 100_000));
        let _ = stream.write_all(&response).await;
        let _ = stream.shutdown().await;
    })
    .await;
    let (answer, _) = tokio::join!(
        exchange(proxy.addr, get(half.port(), "/half")),
        healthy_request(proxy.addr, origin)
    );
    assert_eq!(answer.status, 200);
    assert_eq!(answer.length, Some(200_000));
    assert!(answer.ended_early, "{answer:?}");
    assert_eq!(answer.body.len(), 100_000, "every byte sent arrives");
    assert_eq!(answer.body, pattern(0, 100_000));
    assert_eq!(settle(proxy.addr, 1, 0, WAIT).await, (1, 0));
    proxy.stop().await;
}

/// Clients that vanish in the middle of a request (half a head, half a body, with a FIN or a
/// reset, or while waiting for a slow answer): every connection is released within a few
/// seconds and others are served meanwhile.
#[tokio::test]
async fn clients_vanishing_mid_request_are_released() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[]).await;
    let slow = start_raw(|mut stream| async move {
        read_request_head(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
            .await;
    })
    .await;
    let baseline = gauge(proxy.addr, "cuttle_connections_active").await;
    let post = format!(
        "POST http://sts.amazonaws.com:{}/sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n",
        origin.port()
    );
    let mut clients = Vec::new();
    for (i, (head, body)) in [
        (post.clone(), pattern(0, 64 * 1024)),
        (post.clone(), pattern(0, 64 * 1024)),
        (
            "GET http://sts.amazonaws.com:1/ HTTP/1.1\r\nHost: sts".to_string(),
            Vec::new(),
        ),
        (get(slow.port(), "/slow"), Vec::new()),
        (get(slow.port(), "/slow"), Vec::new()),
    ]
    .into_iter()
    .enumerate()
    {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body).await.unwrap();
        clients.push((i, stream));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(gauge(proxy.addr, "cuttle_connections_active").await >= baseline + 5);
    for (i, stream) in clients {
        if i % 2 == 0 {
            drop(stream);
        } else {
            reset(stream);
        }
    }
    healthy_request(proxy.addr, origin).await;
    // The slow upstream would answer only after a minute: the proxy must notice the vanished
    // clients by itself.
    let now = settle(proxy.addr, baseline, 0, Duration::from_secs(5)).await;
    assert_eq!(now, (baseline, 0), "connections still held");
    proxy.stop().await;
}

/// Clients that vanish in the middle of a tunnel (FIN or reset, to an echo server or to an
/// upstream that never says anything): the tunnels and their connections are released within a
/// few seconds, and a new tunnel works meanwhile.
#[tokio::test]
async fn clients_vanishing_mid_tunnel_are_released() {
    let echo = start_echo().await;
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[]).await;
    let silent = start_raw(|mut stream| async move {
        // Reads and discards; never writes, never closes first.
        let mut buf = [0u8; 4096];
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let baseline = gauge(proxy.addr, "cuttle_connections_active").await;
    let mut tunnels = Vec::new();
    for (i, port) in [echo.port(), echo.port(), silent.port(), silent.port()]
        .into_iter()
        .enumerate()
    {
        let mut stream = tunnel(proxy.addr, &format!("sts.amazonaws.com:{port}")).await;
        stream.write_all(&pattern(0, 256 * 1024)).await.unwrap();
        tunnels.push((i, stream));
    }
    let (connections, open) = (
        gauge(proxy.addr, "cuttle_connections_active").await,
        gauge(proxy.addr, "cuttle_tunnels_active").await,
    );
    assert_eq!((connections, open), (baseline + 4, 4));
    for (i, stream) in tunnels {
        match i {
            // FIN to the echo server: it finishes and closes its side.
            0 => drop(stream),
            // Resets: the relay fails at once.
            _ => reset(stream),
        }
    }
    let fresh = tunnel(proxy.addr, &format!("sts.amazonaws.com:{}", echo.port())).await;
    assert_eq!(
        echo_through(fresh, b"still here".to_vec()).await,
        b"still here"
    );
    healthy_request(proxy.addr, origin).await;
    let now = settle(proxy.addr, baseline, 0, Duration::from_secs(5)).await;
    assert_eq!(now, (baseline, 0), "tunnels or connections still held");
    proxy.stop().await;
}

/// A DNS server that never answers: with `CUTTLE_CONNECT_TIMEOUT=1s` bounding lookups, the
/// client gets 502 `ERR_DNS_FAIL` within a few seconds, for plain HTTP and CONNECT; names from
/// the hosts file are served meanwhile.
#[tokio::test]
async fn dns_timeout_is_502_dns_fail() {
    let silent_dns = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dns_addr = silent_dns.local_addr().unwrap().to_string();
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[
        ("CUTTLE_DNS_SERVERS", &dns_addr),
        ("CUTTLE_CONNECT_TIMEOUT", "1s"),
    ])
    .await;
    let started = Instant::now();
    let request = "GET http://nowhere.us-west-2.amazonaws.com/ HTTP/1.1\r\nHost: x\r\n\r\n";
    let (answer, healthy_at) = tokio::join!(exchange(proxy.addr, request), async {
        healthy_request(proxy.addr, origin).await;
        started.elapsed()
    });
    let elapsed = started.elapsed();
    assert_eq!(answer.status, 502, "{answer:?}");
    assert_eq!(answer.squid_error.as_deref(), Some("ERR_DNS_FAIL 0"));
    assert!(
        String::from_utf8_lossy(&answer.body).contains("nowhere.us-west-2.amazonaws.com"),
        "{answer:?}"
    );
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(
        healthy_at < Duration::from_millis(900),
        "served while the lookup hangs: {healthy_at:?}"
    );
    let started = Instant::now();
    let (_, head) = connect_raw(proxy.addr, "sts.nowhere.us-west-2.amazonaws.com:443").await;
    assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
    assert!(head.contains("ERR_DNS_FAIL"), "{head}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(settle(proxy.addr, 1, 0, WAIT).await, (1, 0));
    drop(silent_dns);
    proxy.stop().await;
}
