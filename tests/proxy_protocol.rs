//! PROXY protocol v1/v2 on the proxy listener (`CUTTLE_PROXY_PROTOCOL`): the header's address
//! is the client the CIDR check and the access log see; untrusted, malformed and (in `required`
//! mode) missing headers close the connection without a response and are counted.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A v1 header naming `source` (IPv4 or IPv6) as the client.
fn v1(source: &str) -> Vec<u8> {
    let ip: IpAddr = source.parse().expect("ip");
    let (family, dest) = match ip {
        IpAddr::V4(_) => ("TCP4", "127.0.0.1"),
        IpAddr::V6(_) => ("TCP6", "::1"),
    };
    format!("PROXY {family} {source} {dest} 40000 3128\r\n").into_bytes()
}

/// A v2 PROXY header naming `source` as the client, with an AWS VPC endpoint TLV.
fn v2(source: &str) -> Vec<u8> {
    let ip: IpAddr = source.parse().expect("ip");
    let mut addresses = Vec::new();
    let family = match ip {
        IpAddr::V4(ip) => {
            addresses.extend(ip.octets());
            addresses.extend([127, 0, 0, 1]);
            0x11
        }
        IpAddr::V6(ip) => {
            addresses.extend(ip.octets());
            addresses.extend(std::net::Ipv6Addr::LOCALHOST.octets());
            0x21
        }
    };
    addresses.extend(40000u16.to_be_bytes());
    addresses.extend(3128u16.to_be_bytes());
    addresses.extend(b"\xea\x00\x17\x01vpce-08d2bf15fac5001c9");
    v2_raw(0x21, family, &addresses)
}

/// A v2 header from its version-command and family-protocol bytes and its payload.
fn v2_raw(version_command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.push(version_command);
    header.push(family);
    header.extend((payload.len() as u16).to_be_bytes());
    header.extend(payload);
    header
}

/// A v2 LOCAL header (the load balancer's own health check).
fn v2_local() -> Vec<u8> {
    v2_raw(0x20, 0x00, &[])
}

fn connect_request(target: &str) -> Vec<u8> {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes()
}

/// Sends `prefix` then `CONNECT target` on a new connection; returns the stream and the
/// response head.
async fn connect_with(proxy: SocketAddr, prefix: &[u8], target: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
    let mut bytes = prefix.to_vec();
    bytes.extend(connect_request(target));
    stream.write_all(&bytes).await.expect("send");
    let head = read_head(&mut stream).await;
    (stream, head)
}

/// The status line of the answer to `CONNECT target` behind `prefix`.
async fn connect_status(proxy: SocketAddr, prefix: &[u8], target: &str) -> String {
    let (_, head) = connect_with(proxy, prefix, target).await;
    head.lines().next().unwrap_or_default().to_string()
}

/// Sends `bytes` and asserts the proxy closes the connection without answering (a read gives
/// EOF or a reset).
async fn assert_closed(proxy: SocketAddr, bytes: &[u8], what: &str) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
    stream.write_all(bytes).await.expect("send");
    let mut got = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| panic!("{what}: connection still open"));
    assert!(
        got.is_empty(),
        "{what}: answered {:?} ({read:?})",
        String::from_utf8_lossy(&got)
    );
}

/// The value of `series` in `/metrics`, asked behind `prefix` (a header where one is required).
async fn metric(proxy: SocketAddr, prefix: &[u8], series: &str) -> f64 {
    let mut request = prefix.to_vec();
    request.extend(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let text = raw_exchange(proxy, &request).await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

fn rejected(reason: &str) -> String {
    format!("cuttle_proxy_protocol_rejected_total{{reason=\"{reason}\"}}")
}

const ESTABLISHED: &str = "HTTP/1.1 200 Connection established";
const FORBIDDEN: &str = "HTTP/1.1 403 Forbidden";

/// v1 and v2 headers from a trusted peer make their address the client: an address in
/// `ALLOWED_CIDRS` gets through where the peer (127.0.0.1) alone is refused, an IPv4-mapped
/// IPv6 address counts as IPv4, and LOCAL or UNKNOWN headers keep the peer's address.
#[tokio::test]
async fn header_address_is_the_client() {
    let echo = start_echo().await;
    let proxy = TestProxy::start(&[
        ("ALLOWED_CIDRS", "10.0.0.0/8"),
        ("CUTTLE_PROXY_PROTOCOL", "optional"),
        ("CUTTLE_PROXY_PROTOCOL_FROM", "127.0.0.0/8"),
    ])
    .await;
    let target = format!("sts.amazonaws.com:{}", echo.port());
    let cases: [(&str, Vec<u8>, &str); 7] = [
        ("no header", vec![], FORBIDDEN),
        ("v1 10.1.2.3", v1("10.1.2.3"), ESTABLISHED),
        ("v2 10.1.2.3", v2("10.1.2.3"), ESTABLISHED),
        ("v2 ::ffff:10.1.2.4", v2("::ffff:10.1.2.4"), ESTABLISHED),
        ("v1 ::ffff:10.1.2.5", v1("::ffff:10.1.2.5"), ESTABLISHED),
        ("v2 LOCAL", v2_local(), FORBIDDEN),
        ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n".to_vec(), FORBIDDEN),
    ];
    for (what, prefix, want) in cases {
        assert_eq!(
            connect_status(proxy.addr, &prefix, &target).await,
            want,
            "{what}"
        );
    }
    // The tunnel behind a header carries the client's bytes, and only those.
    let (stream, head) = connect_with(proxy.addr, &v2("10.1.2.3"), &target).await;
    assert!(head.starts_with(ESTABLISHED), "{head}");
    assert_eq!(echo_through(stream, b"payload".to_vec()).await, b"payload");
    for reason in ["untrusted", "malformed", "missing"] {
        assert_eq!(
            metric(proxy.addr, &[], &rejected(reason)).await,
            0.0,
            "{reason}"
        );
    }
    proxy.stop().await;
}

/// And the other way: a header claiming an address outside `ALLOWED_CIDRS` is refused 403
/// although the peer itself (127.0.0.1) is allowed.
#[tokio::test]
async fn header_address_outside_allowed_cidrs_is_refused() {
    let echo = start_echo().await;
    let proxy = TestProxy::start(&[
        ("ALLOWED_CIDRS", "127.0.0.0/8"),
        ("CUTTLE_PROXY_PROTOCOL", "optional"),
        ("CUTTLE_PROXY_PROTOCOL_FROM", "127.0.0.0/8"),
    ])
    .await;
    let target = format!("sts.amazonaws.com:{}", echo.port());
    assert_eq!(connect_status(proxy.addr, &[], &target).await, ESTABLISHED);
    for prefix in [v1("8.8.8.8"), v2("8.8.8.8"), v2("2001:db8::1")] {
        let (mut stream, head) = connect_with(proxy.addr, &prefix, &target).await;
        assert!(head.starts_with(FORBIDDEN), "{head}");
        let mut body = vec![0u8; 512];
        let n = stream.read(&mut body).await.unwrap_or(0);
        let body = String::from_utf8_lossy(&body[..n]);
        assert!(
            body.contains("is not in the allowed client networks"),
            "{body}"
        );
    }
    proxy.stop().await;
}

/// The access log shows the header's address, for an allowed tunnel and a refusal alike.
#[tokio::test]
async fn access_log_shows_header_address() {
    let echo = start_echo().await;
    let mut cuttle = CuttleProcess::start_with(
        &[
            ("ALLOWED_CIDRS", "10.0.0.0/8"),
            ("CUTTLE_PROXY_PROTOCOL", "required"),
            ("CUTTLE_PROXY_PROTOCOL_FROM", "127.0.0.0/8"),
        ],
        Stdout::Capture,
    )
    .await;
    let target = format!("sts.amazonaws.com:{}", echo.port());
    let (stream, head) = connect_with(cuttle.addr, &v1("10.1.2.3"), &target).await;
    assert!(head.starts_with(ESTABLISHED), "{head}");
    assert_eq!(echo_through(stream, b"x".to_vec()).await, b"x");
    let first = cuttle.access_lines(1)[0].clone();
    assert!(
        first.contains(&format!(" 10.1.2.3 TCP_TUNNEL/200 1 CONNECT {target} ")),
        "{first}"
    );
    let status = connect_status(cuttle.addr, &v2("8.8.8.8"), &target).await;
    assert_eq!(status, FORBIDDEN);
    let second = cuttle.access_lines(2)[1].clone();
    assert!(second.contains(" 8.8.8.8 TCP_DENIED/403 "), "{second}");
    assert!(second.contains(&format!(" CONNECT {target} ")), "{second}");
}

/// A header from a peer outside `CUTTLE_PROXY_PROTOCOL_FROM` closes the connection unanswered
/// (nobody else chooses the address cuttle judges); the same peer without a header is served.
#[tokio::test]
async fn untrusted_header_closes_the_connection() {
    let echo = start_echo().await;
    let proxy = TestProxy::start(&[
        ("CUTTLE_PROXY_PROTOCOL", "optional"),
        ("CUTTLE_PROXY_PROTOCOL_FROM", "10.0.0.0/8"),
    ])
    .await;
    let target = format!("sts.amazonaws.com:{}", echo.port());
    for (what, header) in [("v1", v1("10.1.2.3")), ("v2", v2("10.1.2.3"))] {
        let mut bytes = header;
        bytes.extend(connect_request(&target));
        assert_closed(proxy.addr, &bytes, what).await;
    }
    assert_eq!(connect_status(proxy.addr, &[], &target).await, ESTABLISHED);
    assert_eq!(metric(proxy.addr, &[], &rejected("untrusted")).await, 2.0);
    proxy.stop().await;
}

/// A malformed header from a trusted peer closes the connection unanswered and is counted.
#[tokio::test]
async fn malformed_header_closes_the_connection() {
    let proxy = TestProxy::start(&[
        ("CUTTLE_PROXY_PROTOCOL", "optional"),
        ("CUTTLE_PROXY_PROTOCOL_FROM", "127.0.0.0/8"),
        ("CUTTLE_HEADER_TIMEOUT", "1s"),
    ])
    .await;
    let request = connect_request("sts.amazonaws.com:443");
    let malformed: [(&str, Vec<u8>); 4] = [
        (
            "v1 bad address",
            b"PROXY TCP4 10.1.2.300 127.0.0.1 1 2\r\n".to_vec(),
        ),
        (
            "v1 no CRLF",
            b"PROXY TCP4 10.1.2.3 127.0.0.1 1 2\n".to_vec(),
        ),
        ("v2 version 3", v2_raw(0x31, 0x11, &[0; 12])),
        // Cut short, and nothing more before CUTTLE_HEADER_TIMEOUT.
        ("v2 truncated", v2("10.1.2.3")[..20].to_vec()),
    ];
    for (what, header) in &malformed {
        let mut bytes = header.clone();
        if *what != "v2 truncated" {
            bytes.extend(&request);
        }
        assert_closed(proxy.addr, &bytes, what).await;
    }
    assert_eq!(metric(proxy.addr, &[], &rejected("malformed")).await, 4.0);
    proxy.stop().await;
}

/// `required`: a connection without a header closes unanswered and is counted; a header
/// arriving in several segments is still read whole, and a LOCAL health check is served.
#[tokio::test]
async fn required_mode() {
    let echo = start_echo().await;
    let proxy = TestProxy::start(&[
        ("ALLOWED_CIDRS", "10.0.0.0/8"),
        ("CUTTLE_PROXY_PROTOCOL", "required"),
        ("CUTTLE_PROXY_PROTOCOL_FROM", "127.0.0.0/8"),
    ])
    .await;
    let target = format!("sts.amazonaws.com:{}", echo.port());
    assert_closed(proxy.addr, &connect_request(&target), "no header").await;
    assert_closed(
        proxy.addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        "no header, healthz",
    )
    .await;
    assert_eq!(
        metric(proxy.addr, &v2_local(), &rejected("missing")).await,
        2.0
    );

    // The header in three segments, then the request.
    for header in [v1("10.1.2.3"), v2("10.1.2.3")] {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        for piece in [&header[..3], &header[3..14], &header[14..]] {
            stream.write_all(piece).await.expect("send");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        stream
            .write_all(&connect_request(&target))
            .await
            .expect("send");
        let head = read_head(&mut stream).await;
        assert!(head.starts_with(ESTABLISHED), "{head}");
    }

    let healthz = raw_exchange(
        proxy.addr,
        &[
            v2_local(),
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        ]
        .concat(),
    )
    .await;
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    proxy.stop().await;
}
