//! The TLS SNI check on CONNECT tunnels (`CUTTLE_SNI_CHECK`), end to end with real rustls
//! clients: matching names pass, fronted names are refused with an `access_denied` alert and
//! counted with reason `sni`, `allowlist` mode judges the name by the allowlist, non-TLS bytes
//! pass only on `CUTTLE_NON_TLS_PORTS`, and ClientHellos split over many segments or records, or
//! larger than one read, reach the upstream byte for byte.

mod support;

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Every name the test origin's certificate covers (the hosts file maps them to 127.0.0.1).
const NAMES: &[&str] = &[
    "sts.amazonaws.com",
    "www.example.com",
    "evil.com",
    "127.0.0.1",
];

const SNI_DENIED: &str = r#"cuttle_requests_total{decision="denied",kind="connect",reason="sni"}"#;

/// A rustls client trusting `ca`.
fn connector(ca: &TestCa) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert_der.clone()))
        .expect("ca cert");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// Opens `CONNECT connect` and runs a TLS handshake over it presenting `sni`; on success sends
/// `GET /hello` and returns the response.
async fn https_get<S>(ca: &TestCa, stream: S, sni: &str) -> io::Result<String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    let mut tls = tokio::time::timeout(WAIT, connector(ca).connect(name, stream))
        .await
        .expect("handshake ends in time")?;
    let request = format!("GET /hello HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await?;
    tls.flush().await?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    // Until the body arrived: whether the origin sends close_notify does not matter here.
    tokio::time::timeout(WAIT, async {
        while !response.ends_with(b"hello from origin") {
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("response in time");
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// Asserts the proxy closes `stream` without sending anything (a read gives EOF or a reset).
async fn assert_closed(mut stream: TcpStream, what: &str) {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: still open"));
    assert!(buf.is_empty(), "{what}: got {buf:?} ({read:?})");
}

/// The value of `series` in the proxy's `/metrics`.
async fn metric(proxy: SocketAddr, series: &str) -> f64 {
    let text = metrics_text(proxy).await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Waits until `series` reaches `want` (a tunnel is counted when its task ends).
async fn wait_for_metric(proxy: SocketAddr, series: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = metric(proxy, series).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A hand-made ClientHello (one cipher suite, no key share: enough for the proxy, which never
/// completes a handshake with it) naming `sni`, padded with `padding` bytes, framed in records
/// of at most `record` bytes.
fn client_hello(sni: &str, padding: usize, record: usize) -> Vec<u8> {
    let mut extensions = Vec::new();
    let mut names = vec![0u8];
    names.extend((sni.len() as u16).to_be_bytes());
    names.extend(sni.as_bytes());
    let mut server_name = (names.len() as u16).to_be_bytes().to_vec();
    server_name.extend(names);
    for (kind, data) in [(0u16, server_name), (21, vec![0; padding])] {
        extensions.extend(kind.to_be_bytes());
        extensions.extend((data.len() as u16).to_be_bytes());
        extensions.extend(data);
    }
    let mut body = vec![0x03, 0x03];
    body.extend([0x5a; 32]);
    body.push(0);
    body.extend([0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    body.extend((extensions.len() as u16).to_be_bytes());
    body.extend(extensions);
    let mut message = vec![1];
    message.extend(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend(body);
    let mut out = Vec::new();
    for chunk in message.chunks(record) {
        out.extend([0x16, 0x03, 0x01]);
        out.extend((chunk.len() as u16).to_be_bytes());
        out.extend(chunk);
    }
    out
}

/// A stream whose writes leave at most `chunk` bytes at a time, `pause` apart, so that a
/// ClientHello written through it arrives in many TCP segments and many reads.
struct Dribble {
    inner: TcpStream,
    chunk: usize,
    pause: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Dribble {
    fn new(inner: TcpStream, chunk: usize, pause: Duration) -> Dribble {
        inner.set_nodelay(true).expect("nodelay");
        Dribble {
            inner,
            chunk,
            pause,
            sleep: None,
        }
    }
}

impl AsyncRead for Dribble {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Dribble {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(sleep) = this.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            this.sleep = None;
        }
        let n = buf.len().min(this.chunk);
        let result = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..n]));
        if matches!(result, Ok(written) if written > 0) {
            this.sleep = Some(Box::pin(tokio::time::sleep(this.pause)));
        }
        Poll::Ready(result)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// `match` (the default): an HTTPS client whose SNI is the CONNECT host completes its handshake
/// and exchanges data, through reqwest and through a raw tunnel, and so does a client sending no
/// SNI to an IP address; nothing is counted as refused.
#[tokio::test]
async fn matching_sni_completes_https() {
    let ca = TestCa::new(NAMES);
    let origin = start_tls_origin(&ca).await;
    let proxy = TestProxy::start(&[
        ("CUTTLE_SNI_CHECK", "match"),
        ("SQUID_WHITELIST", "127.0.0.1"),
    ])
    .await;
    let url = format!("https://sts.amazonaws.com:{}/hello", origin.port());
    let body = client(&proxy.url(), Some(&ca))
        .get(&url)
        .send()
        .await
        .expect("GET through the proxy")
        .text()
        .await
        .expect("body");
    assert_eq!(body, "hello from origin");

    let target = format!("STS.amazonaws.com.:{}", origin.port());
    let stream = tunnel(proxy.addr, &target).await;
    let response = https_get(&ca, stream, "sts.amazonaws.com")
        .await
        .expect("handshake with a matching name (case and trailing dot ignored)");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let stream = tunnel(proxy.addr, &format!("127.0.0.1:{}", origin.port())).await;
    let response = https_get(&ca, stream, "127.0.0.1")
        .await
        .expect("no SNI to an IP address");
    assert!(response.contains("hello from origin"), "{response}");
    assert_eq!(metric(proxy.addr, SNI_DENIED).await, 0.0);
    proxy.stop().await;
}

/// Domain fronting: `CONNECT sts.amazonaws.com` then a ClientHello for `evil.com` is refused
/// with a fatal `access_denied` alert, closed, and counted with reason `sni`; so is a
/// ClientHello without a name.
#[tokio::test]
async fn fronted_sni_is_refused_and_counted() {
    let ca = TestCa::new(NAMES);
    let origin = start_tls_origin(&ca).await;
    let proxy = TestProxy::start(&[("CUTTLE_SNI_CHECK", "match")]).await;
    let target = format!("sts.amazonaws.com:{}", origin.port());

    let stream = tunnel(proxy.addr, &target).await;
    let error = https_get(&ca, stream, "evil.com")
        .await
        .expect_err("fronted handshake refused");
    assert!(error.to_string().contains("AccessDenied"), "{error}");
    wait_for_metric(proxy.addr, SNI_DENIED, 1.0).await;

    // No SNI at all (rustls sends none to an IP address) for a CONNECT to a name.
    let stream = tunnel(proxy.addr, &target).await;
    let error = https_get(&ca, stream, "127.0.0.1")
        .await
        .expect_err("nameless handshake refused");
    assert!(error.to_string().contains("AccessDenied"), "{error}");
    wait_for_metric(proxy.addr, SNI_DENIED, 2.0).await;
    proxy.stop().await;
}

/// `allowlist`: a name other than the CONNECT host passes when the allowlist allows it, and is
/// refused when it does not.
#[tokio::test]
async fn allowlist_mode_judges_the_name() {
    let ca = TestCa::new(NAMES);
    let origin = start_tls_origin(&ca).await;
    let proxy = TestProxy::start(&[
        ("CUTTLE_SNI_CHECK", "allowlist"),
        ("SQUID_WHITELIST", "www.example.com"),
    ])
    .await;
    let target = format!("sts.amazonaws.com:{}", origin.port());

    let stream = tunnel(proxy.addr, &target).await;
    let response = https_get(&ca, stream, "www.example.com")
        .await
        .expect("an allowed name passes");
    assert!(response.contains("hello from origin"), "{response}");

    let stream = tunnel(proxy.addr, &target).await;
    let error = https_get(&ca, stream, "evil.com")
        .await
        .expect_err("a name off the allowlist is refused");
    assert!(error.to_string().contains("AccessDenied"), "{error}");
    wait_for_metric(proxy.addr, SNI_DENIED, 1.0).await;
    proxy.stop().await;
}

/// A tunnel that does not start with TLS is refused, unless its port is in
/// `CUTTLE_NON_TLS_PORTS`; a ClientHello that never completes is refused at the header timeout.
#[tokio::test]
async fn non_tls_bytes_only_on_non_tls_ports() {
    let plain = start_echo().await;
    let listed = start_echo().await;
    let proxy = TestProxy::start(&[
        ("CUTTLE_SNI_CHECK", "match"),
        ("CUTTLE_NON_TLS_PORTS", &listed.port().to_string()),
        ("CUTTLE_HEADER_TIMEOUT", "1s"),
    ])
    .await;

    let mut stream = tunnel(proxy.addr, &format!("sts.amazonaws.com:{}", plain.port())).await;
    stream
        .write_all(b"SSH-2.0-client\r\n")
        .await
        .expect("write");
    assert_closed(stream, "non-TLS on an unlisted port").await;
    wait_for_metric(proxy.addr, SNI_DENIED, 1.0).await;

    let stream = tunnel(proxy.addr, &format!("sts.amazonaws.com:{}", listed.port())).await;
    let back = echo_through(stream, b"SSH-2.0-client\r\n".to_vec()).await;
    assert_eq!(back, b"SSH-2.0-client\r\n", "non-TLS on a listed port");

    let hello = client_hello("sts.amazonaws.com", 0, 16384);
    let mut stream = tunnel(proxy.addr, &format!("sts.amazonaws.com:{}", plain.port())).await;
    stream.write_all(&hello[..20]).await.expect("write");
    assert_closed(stream, "incomplete ClientHello").await;
    wait_for_metric(proxy.addr, SNI_DENIED, 2.0).await;
    proxy.stop().await;
}

/// `off`: fronted names and non-TLS bytes pass as they come.
#[tokio::test]
async fn sni_off_passes_everything() {
    let ca = TestCa::new(NAMES);
    let origin = start_tls_origin(&ca).await;
    let echo = start_echo().await;
    let proxy = TestProxy::start(&[("CUTTLE_SNI_CHECK", "off")]).await;

    let stream = tunnel(proxy.addr, &format!("sts.amazonaws.com:{}", origin.port())).await;
    let response = https_get(&ca, stream, "evil.com")
        .await
        .expect("fronting is not checked");
    assert!(response.contains("hello from origin"), "{response}");

    let stream = tunnel(proxy.addr, &format!("sts.amazonaws.com:{}", echo.port())).await;
    assert_eq!(echo_through(stream, b"plain".to_vec()).await, b"plain");
    assert_eq!(metric(proxy.addr, SNI_DENIED).await, 0.0);
    proxy.stop().await;
}

/// A ClientHello split over many TCP segments (and reads), over many TLS records, or larger than
/// one read is parsed, and everything read reaches the upstream unchanged.
#[tokio::test]
async fn split_and_large_client_hellos() {
    let ca = TestCa::new(NAMES);
    let origin = start_tls_origin(&ca).await;
    let echo = start_echo().await;
    let proxy = TestProxy::start(&[("CUTTLE_SNI_CHECK", "match")]).await;

    // A real handshake whose ClientHello leaves 16 bytes at a time, 5 ms apart.
    let stream = tunnel(proxy.addr, &format!("sts.amazonaws.com:{}", origin.port())).await;
    let dribble = Dribble::new(stream, 16, Duration::from_millis(5));
    let response = https_get(&ca, dribble, "sts.amazonaws.com")
        .await
        .expect("split ClientHello passes");
    assert!(response.contains("hello from origin"), "{response}");

    // The echo shows exactly what the upstream received.
    let echo_target = format!("sts.amazonaws.com:{}", echo.port());
    for (what, hello) in [
        (
            "one 12 KB record",
            client_hello("sts.amazonaws.com", 12_000, 16384),
        ),
        (
            "records of 100 bytes",
            client_hello("sts.amazonaws.com", 2_000, 100),
        ),
        ("records of 1 byte", client_hello("sts.amazonaws.com", 0, 1)),
    ] {
        let mut sent = hello.clone();
        sent.extend(b"\x17\x03\x03\x00\x05after");
        let stream = tunnel(proxy.addr, &echo_target).await;
        let back = echo_through(stream, sent.clone()).await;
        assert!(
            back == sent,
            "{what}: {} bytes back of {}",
            back.len(),
            sent.len()
        );
    }

    // The same, fronted, split over records: refused.
    let mut stream = tunnel(proxy.addr, &echo_target).await;
    stream
        .write_all(&client_hello("evil.com", 3_000, 500))
        .await
        .expect("write");
    let mut alert = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut alert)).await;
    assert_eq!(
        alert,
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49],
        "access_denied alert"
    );
    wait_for_metric(proxy.addr, SNI_DENIED, 1.0).await;
    proxy.stop().await;
}

/// The refusal is in the access log as a denial with reason `sni` and status 403.
#[tokio::test]
async fn refusal_is_logged() {
    let echo = start_echo().await;
    let mut cuttle = CuttleProcess::start_with(
        &[("CUTTLE_SNI_CHECK", "match"), ("CUTTLE_ACCESS_LOG", "json")],
        Stdout::Capture,
    )
    .await;
    let target = format!("sts.amazonaws.com:{}", echo.port());
    let mut stream = tunnel(cuttle.addr, &target).await;
    stream
        .write_all(&client_hello("evil.com", 0, 16384))
        .await
        .expect("write");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    let lines = cuttle.access_lines(1);
    let line: serde_json::Value = serde_json::from_str(&lines[0]).expect("json line");
    assert_eq!(line["method"], "CONNECT", "{line}");
    assert_eq!(line["url"], target, "{line}");
    assert_eq!(line["decision"], "denied", "{line}");
    assert_eq!(line["reason"], "sni", "{line}");
    assert_eq!(line["status"], 403, "{line}");
    assert_eq!(line["squid_code"], "TCP_DENIED", "{line}");
    assert_eq!(line["bytes_up"], 0, "{line}");
}
