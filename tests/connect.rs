//! CONNECT tunnels: HTTPS end to end through the proxy, refusals, and byte integrity.

mod support;

use std::process::Command;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// HTTPS through CONNECT to a local rustls server whose certificate names the AWS host; the
/// client verifies the certificate, so the tunnel is byte-transparent.
#[tokio::test]
async fn https_through_connect_with_reqwest() {
    let ca = TestCa::new(&["sts.amazonaws.com"]);
    let origin = start_tls_origin(&ca).await;
    let proxy = TestProxy::start(&[]).await;
    let client = client(&proxy.url(), Some(&ca));
    let url = format!("https://sts.amazonaws.com:{}/hello", origin.port());
    let response = client.get(&url).send().await.expect("https through proxy");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "hello from origin");
    // A second request with a body, on the same client.
    let total = 3 * 1024 * 1024;
    let response = client
        .post(format!(
            "https://sts.amazonaws.com:{}/sha256",
            origin.port()
        ))
        .body(streamed_body(total))
        .send()
        .await
        .expect("https post");
    let want = format!("{total} {}", sha256_hex(&pattern(0, total as usize)));
    assert_eq!(response.text().await.unwrap(), want);
    // The pooled tunnel stays open until the client goes; the drain would wait for it.
    drop(client);
    proxy.stop().await;
}

/// The same through curl, which uses CONNECT for https:// URLs behind `-x`.
#[tokio::test]
async fn https_through_connect_with_curl() {
    let ca = TestCa::new(&["s3.us-west-2.amazonaws.com"]);
    let origin = start_tls_origin(&ca).await;
    let proxy = TestProxy::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca.cert_pem).unwrap();
    let url = proxy.url();
    let port = origin.port();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--max-time", "30", "--cacert"])
            .arg(&ca_path)
            .args(["-x", &url])
            .arg(format!("https://s3.us-west-2.amazonaws.com:{port}/hello"))
            .output()
            .expect("run curl")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hello from origin");
    proxy.stop().await;
}

/// CONNECT to a host not on the allowlist, or to a port that is not a CONNECT port, gets 403
/// with the Squid error header; reqwest reports the failed tunnel.
#[tokio::test]
async fn connect_refusals() {
    let echo = start_echo().await;
    let proxy = TestProxy::start(&[("CUTTLE_CONNECT_PORTS", "443")]).await;
    for (target, needle) in [
        (format!("evil.com:{}", 443), "not on the allowlist"),
        (
            format!("sts.amazonaws.com:{}", echo.port()),
            "not a CONNECT port",
        ),
        ("sts.amazonaws.com:25".to_string(), "not a CONNECT port"),
    ] {
        let (mut stream, head) = connect_raw(proxy.addr, &target).await;
        assert!(head.starts_with("HTTP/1.1 403"), "{target}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("x-squid-error: err_access_denied 0"),
            "{target}: {head}"
        );
        let mut body = vec![0u8; 512];
        let n = tokio::time::timeout(WAIT, stream.read(&mut body))
            .await
            .unwrap()
            .unwrap();
        let body = String::from_utf8_lossy(&body[..n]);
        assert!(
            body.contains(needle) && body.contains(target.split(':').next().unwrap()),
            "{target}: {body}"
        );
    }
    let ca = TestCa::new(&["evil.com"]);
    let error = client(&proxy.url(), Some(&ca))
        .get("https://evil.com/")
        .send()
        .await
        .expect_err("refused tunnel fails the request");
    assert!(error.is_connect(), "{error:?}");
    proxy.stop().await;
}

/// CONNECT to an allowlisted name that resolves to the metadata service is refused.
#[tokio::test]
async fn connect_to_metadata_address_refused() {
    let proxy = TestProxy::start(&[
        ("SQUID_WHITELIST", ".example.com"),
        ("CUTTLE_UPSTREAM_ALLOW_CIDRS", "127.0.0.0/8"),
    ])
    .await;
    let (_, head) = connect_raw(proxy.addr, "imds.example.com:443").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    proxy.stop().await;
}

/// An upstream that is not listening: 502 before any 200, never a 200 followed by a reset.
#[tokio::test]
async fn connect_to_closed_port_is_502() {
    let port = closed_port().await;
    let proxy = TestProxy::start(&[]).await;
    let (_, head) = connect_raw(proxy.addr, &format!("sts.amazonaws.com:{port}")).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("err_connect_fail"),
        "{head}"
    );
    proxy.stop().await;
}

/// Several MiB each way through a tunnel arrive intact, and a half-close travels through in
/// both directions: the echo server only finishes after seeing our EOF, and we only see EOF
/// after it closes.
#[tokio::test]
async fn tunnel_data_integrity_with_half_close() {
    let echo = start_echo().await;
    let proxy = TestProxy::start(&[]).await;
    let data = random_bytes(7 * 1024 * 1024 + 3, 42);
    let stream = tunnel(proxy.addr, &format!("sts.amazonaws.com:{}", echo.port())).await;
    let back = echo_through(stream, data.clone()).await;
    assert_eq!(back.len(), data.len());
    assert_eq!(sha256_hex(&back), sha256_hex(&data));
    proxy.stop().await;
}

/// After the client half-closes, the upstream's reply still flows back (half-close is not a
/// full close).
#[tokio::test]
async fn half_close_keeps_the_other_direction_open() {
    use tokio::net::TcpListener;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        s.read_to_end(&mut request).await.unwrap();
        // Only after the client's EOF, answer.
        s.write_all(format!("got {} bytes", request.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    });
    let proxy = TestProxy::start(&[]).await;
    let mut stream = tunnel(proxy.addr, &format!("sts.amazonaws.com:{port}")).await;
    stream.write_all(b"question").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "got 8 bytes");
    server.await.unwrap();
    proxy.stop().await;
}

/// Bytes the client sends in the same write as its CONNECT (before the 200 arrives) reach the
/// upstream first and intact, followed by the rest of the stream.
#[tokio::test]
async fn bytes_sent_with_the_connect_go_first() {
    let echo = start_echo().await;
    let proxy = TestProxy::start(&[]).await;
    let target = format!("sts.amazonaws.com:{}", echo.port());
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nearly bytes|");
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let back = echo_through(stream, b"after the 200".to_vec()).await;
    assert_eq!(
        String::from_utf8_lossy(&back),
        "early bytes|after the 200",
        "echoed in order"
    );
}
