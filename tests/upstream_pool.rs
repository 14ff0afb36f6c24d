//! The keep-alive pool of upstream connections: reused when a response was read to its end,
//! never reused after a response cut short, closed after the idle timeout, and an origin
//! closing its side of kept-alive connections costs the client nothing.
//!
//! One worker (`CUTTLE_WORKERS=1`): each worker has its own pool, and a new client connection
//! may land on either.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::*;

/// Connections an origin accepted, and how many of them have ended.
#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    ended: AtomicUsize,
}

impl Counts {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn ended(&self) -> usize {
        self.ended.load(Ordering::SeqCst)
    }
}

/// A keep-alive HTTP/1.1 origin: `/big` answers 8 MiB, anything else `hello`.
async fn counting_origin() -> (SocketAddr, Arc<Counts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("origin addr");
    let counts = Arc::new(Counts::default());
    let seen = counts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            seen.accepted.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = if req.uri().path() == "/big" {
                        Bytes::from(vec![b'x'; 8 << 20])
                    } else {
                        Bytes::from_static(b"hello")
                    };
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(body)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                seen.ended.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

/// Waits until `done` holds, up to `WAIT`.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get_text(client: &reqwest::Client, url: &str) -> (u16, String) {
    let response = client.get(url).send().await.expect("request through proxy");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// Ten requests one after the other over one client connection go over one upstream
/// connection.
#[tokio::test]
async fn upstream_connections_are_reused() {
    let (origin, counts) = counting_origin().await;
    let proxy = TestProxy::start(&[("CUTTLE_WORKERS", "1")]).await;
    let client = client(&proxy.url(), None);
    let url = format!("http://sts.amazonaws.com:{}/hello", origin.port());
    for _ in 0..10 {
        assert_eq!(get_text(&client, &url).await, (200, "hello".to_string()));
    }
    assert_eq!(counts.accepted(), 1, "one upstream connection for all ten");
    proxy.stop().await;
}

/// A client that goes away in the middle of a response: that upstream connection is closed
/// (it still carries the rest of the body), and the next request gets its own answer whole
/// over a new one.
#[tokio::test]
async fn a_response_cut_short_is_not_reused() {
    let (origin, counts) = counting_origin().await;
    let proxy = TestProxy::start(&[("CUTTLE_WORKERS", "1")]).await;
    let port = origin.port();

    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect proxy");
    let request = format!(
        "GET http://sts.amazonaws.com:{port}/big HTTP/1.1\r\nHost: sts.amazonaws.com\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut first = vec![0u8; 64 * 1024];
    let mut read = 0;
    while read < first.len() {
        let n = stream.read(&mut first[read..]).await.expect("read");
        assert!(n > 0, "the proxy closed early");
        read += n;
    }
    assert!(first.starts_with(b"HTTP/1.1 200"), "{:?}", &first[..32]);
    drop(stream);
    eventually("the cut connection is closed", || counts.ended() == 1).await;

    let client = client(&proxy.url(), None);
    let url = format!("http://sts.amazonaws.com:{port}/hello");
    assert_eq!(get_text(&client, &url).await, (200, "hello".to_string()));
    assert_eq!(counts.accepted(), 2);
    proxy.stop().await;
}

/// Pooled connections are closed once idle for the idle timeout; the next request opens a
/// new one.
#[tokio::test]
async fn idle_upstream_connections_are_closed() {
    let (origin, counts) = counting_origin().await;
    let proxy = TestProxy::start(&[("CUTTLE_WORKERS", "1"), ("CUTTLE_IDLE_TIMEOUT", "1s")]).await;
    let url = format!("http://sts.amazonaws.com:{}/hello", origin.port());
    let first = client(&proxy.url(), None);
    assert_eq!(get_text(&first, &url).await, (200, "hello".to_string()));
    drop(first);
    eventually("the idle upstream connection is closed", || {
        counts.ended() == 1
    })
    .await;
    let second = client(&proxy.url(), None);
    assert_eq!(get_text(&second, &url).await, (200, "hello".to_string()));
    assert_eq!(counts.accepted(), 2);
    proxy.stop().await;
}

/// An origin that closes each connection right after its response, without saying so
/// (`Connection: close` absent): every request still gets its answer.
#[tokio::test]
async fn origin_closing_kept_alive_connections_is_not_an_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let origin = listener.local_addr().expect("origin addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if read_head(&mut stream).await.is_empty() {
                    return;
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                    .await;
            });
        }
    });
    let proxy = TestProxy::start(&[("CUTTLE_WORKERS", "1")]).await;
    let client = client(&proxy.url(), None);
    let url = format!("http://sts.amazonaws.com:{}/hello", origin.port());
    for i in 0..30 {
        assert_eq!(
            get_text(&client, &url).await,
            (200, "hello".to_string()),
            "request {i}"
        );
    }
    proxy.stop().await;
}
