//! Client address checks: ALLOWED_CIDRS over IPv4, IPv6 and IPv4-mapped peers.

mod support;

use std::net::IpAddr;

use support::*;

/// A client bound to 127.0.0.2 is refused when only 127.0.0.1/32 is allowed; 127.0.0.1 is not.
#[tokio::test]
async fn client_outside_allowed_cidrs_gets_403() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[("ALLOWED_CIDRS", "127.0.0.1/32")]).await;
    let url = format!("http://sts.amazonaws.com:{}/hello", origin.port());
    let outside = client_builder(&proxy.url(), None)
        .local_address(IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let response = outside.get(&url).send().await.expect("request");
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-squid-error"], "ERR_ACCESS_DENIED 0");
    let body = response.text().await.unwrap();
    assert!(
        body.contains("127.0.0.2") && body.contains("ALLOWED_CIDRS"),
        "{body}"
    );

    let inside = client(&proxy.url(), None);
    assert_eq!(inside.get(&url).send().await.unwrap().status(), 200);

    // CONNECT is refused the same way.
    let outside_stream = tokio::net::TcpSocket::new_v4().unwrap();
    outside_stream.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut stream = outside_stream.connect(proxy.addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    stream
        .write_all(b"CONNECT sts.amazonaws.com:443 HTTP/1.1\r\nHost: sts.amazonaws.com:443\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    proxy.stop().await;
}

/// An IPv6 loopback client is judged by the IPv6 ranges: refused with IPv4-only ranges,
/// allowed once ::1/128 is listed.
#[tokio::test]
async fn ipv6_client_judged_by_ipv6_ranges() {
    let origin = start_origin().await;
    let url = format!("http://sts.amazonaws.com:{}/hello", origin.port());
    for (cidrs, want) in [("127.0.0.0/8", 403), ("127.0.0.0/8,::1/128", 200)] {
        let proxy =
            TestProxy::start(&[("CUTTLE_LISTEN", "[::1]:0"), ("ALLOWED_CIDRS", cidrs)]).await;
        let status = client(&proxy.url(), None)
            .get(&url)
            .send()
            .await
            .expect("request")
            .status();
        assert_eq!(status, want, "ALLOWED_CIDRS={cidrs}");
        proxy.stop().await;
    }
}

/// On a dual-stack listener an IPv4 client arrives as ::ffff:127.0.0.1 and still matches the
/// IPv4 range 127.0.0.0/8.
#[tokio::test]
async fn ipv4_mapped_peer_matches_ipv4_ranges() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[
        ("CUTTLE_LISTEN", "[::]:0"),
        ("ALLOWED_CIDRS", "127.0.0.0/8"),
    ])
    .await;
    let proxy_url = format!("http://127.0.0.1:{}", proxy.addr.port());
    let url = format!("http://sts.amazonaws.com:{}/hello", origin.port());
    let status = client(&proxy_url, None)
        .get(&url)
        .send()
        .await
        .expect("request")
        .status();
    assert_eq!(status, 200);
    proxy.stop().await;
}
