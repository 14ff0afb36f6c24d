//! Plain HTTP through the proxy, with reqwest's proxy support and with curl.

mod support;

use std::process::Command;

use support::*;

/// Allowed GET reaches the origin; the answer comes back unchanged.
#[tokio::test]
async fn allowed_get_reaches_origin() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[]).await;
    let client = client(&proxy.url(), None);
    let response = client
        .get(format!("http://sts.amazonaws.com:{}/hello", origin.port()))
        .send()
        .await
        .expect("request through proxy");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["via"], "1.1 cuttle");
    assert_eq!(response.text().await.unwrap(), "hello from origin");
    proxy.stop().await;
}

/// A POST with a streamed body of several MiB arrives whole (length and checksum).
#[tokio::test]
async fn streamed_post_body_arrives_intact() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[]).await;
    let total: u64 = 5 * 1024 * 1024 + 17;
    let expected = format!("{total} {}", sha256_hex(&pattern(0, total as usize)));
    let response = client(&proxy.url(), None)
        .post(format!(
            "http://s3.us-west-2.amazonaws.com:{}/sha256",
            origin.port()
        ))
        .body(streamed_body(total))
        .send()
        .await
        .expect("post through proxy");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), expected);
    proxy.stop().await;
}

/// A host not on the allowlist gets 403, the Squid error header and a reason naming host and rule.
#[tokio::test]
async fn refused_host_gets_403_with_reason() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[]).await;
    let response = client(&proxy.url(), None)
        .get(format!("http://evil.com:{}/hello", origin.port()))
        .send()
        .await
        .expect("request through proxy");
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-squid-error"], "ERR_ACCESS_DENIED 0");
    let body = response.text().await.unwrap();
    assert_eq!(body.lines().count(), 1, "{body:?}");
    assert!(body.contains("evil.com"), "{body}");
    assert!(body.contains("not on the allowlist"), "{body}");
    proxy.stop().await;
}

/// An allowed host on a port that is not a plain HTTP port gets 403 naming the port rule.
#[tokio::test]
async fn refused_port_gets_403() {
    let proxy = TestProxy::start(&[]).await;
    let response = client(&proxy.url(), None)
        .get("http://sts.amazonaws.com:22/")
        .send()
        .await
        .expect("request through proxy");
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-squid-error"], "ERR_ACCESS_DENIED 0");
    let body = response.text().await.unwrap();
    assert!(
        body.contains("sts.amazonaws.com:22") && body.contains("CUTTLE_HTTP_PORTS"),
        "{body}"
    );
    proxy.stop().await;
}

/// SQUID_WHITELIST entries and the regional defaults decide together; look-alikes are refused.
#[tokio::test]
async fn squid_whitelist_adds_to_defaults() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[("SQUID_WHITELIST", ".example.com")]).await;
    let client = client(&proxy.url(), None);
    for (host, want) in [
        ("www.example.com", 200),
        ("ec2.us-west-2.amazonaws.com", 200),
        ("evil.com", 403),
    ] {
        let status = client
            .get(format!("http://{host}:{}/hello", origin.port()))
            .send()
            .await
            .expect("request")
            .status();
        assert_eq!(status, want, "{host}");
    }
    proxy.stop().await;
}

/// Hop-by-hop headers (and those named in Connection) are not forwarded; Host comes from the
/// URI; Via is added.
#[tokio::test]
async fn hop_by_hop_headers_removed_and_host_from_uri() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[]).await;
    let request = format!(
        "GET http://sts.amazonaws.com:{port}/headers HTTP/1.1\r\nHost: evil.com\r\nConnection: close, X-Hop\r\nX-Hop: secret\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nKeep-Alive: timeout=5\r\nX-End: kept\r\n\r\n",
        port = origin.port()
    );
    let answer = raw_exchange(proxy.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(
        body.contains(&format!("host: sts.amazonaws.com:{}", origin.port())),
        "{body}"
    );
    assert!(body.contains("x-end: kept"), "{body}");
    assert!(body.contains("via: 1.1 cuttle"), "{body}");
    for gone in ["x-hop", "proxy-authorization", "keep-alive", "evil.com"] {
        assert!(!body.contains(gone), "{gone} forwarded: {body}");
    }
    proxy.stop().await;
}

/// A name that does not resolve gets 502 ERR_DNS_FAIL.
#[tokio::test]
async fn dns_failure_is_502() {
    let proxy = TestProxy::start(&[("SQUID_WHITELIST", ".example.com")]).await;
    let response = client(&proxy.url(), None)
        .get("http://nowhere.example.com/")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["x-squid-error"], "ERR_DNS_FAIL 0");
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("nowhere.example.com"));
    proxy.stop().await;
}

/// An upstream that refuses the connection gets 502 ERR_CONNECT_FAIL with the errno.
#[tokio::test]
async fn refused_upstream_is_502() {
    let port = closed_port().await;
    let proxy = TestProxy::start(&[]).await;
    let response = client(&proxy.url(), None)
        .get(format!("http://sts.amazonaws.com:{port}/"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["x-squid-error"], "ERR_CONNECT_FAIL 111");
    proxy.stop().await;
}

/// An allowlisted name that resolves to the metadata service is refused after resolution.
#[tokio::test]
async fn metadata_address_refused_although_allowlisted() {
    let proxy = TestProxy::start(&[("SQUID_WHITELIST", ".example.com")]).await;
    let response = client(&proxy.url(), None)
        .get("http://imds.example.com/latest/meta-data/")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-squid-error"], "ERR_ACCESS_DENIED 0");
    let body = response.text().await.unwrap();
    assert!(
        body.contains("169.254.169.254") && body.contains("metadata"),
        "{body}"
    );
    proxy.stop().await;
}

/// Requests a forward proxy must not serve get the documented status.
#[tokio::test]
async fn malformed_and_unsupported_requests() {
    let proxy = TestProxy::start(&[]).await;
    let cases: &[(&str, &str)] = &[
        (
            "GET https://sts.amazonaws.com/ HTTP/1.1\r\nHost: sts.amazonaws.com\r\n\r\n",
            "HTTP/1.1 501",
        ),
        ("GET /somewhere HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 400"),
        (
            "GET http://sts.amazonaws.com@evil.com/ HTTP/1.1\r\nHost: evil.com\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "TRACE http://sts.amazonaws.com/ HTTP/1.1\r\nHost: sts.amazonaws.com\r\n\r\n",
            "HTTP/1.1 405",
        ),
        (
            "CONNECT sts.amazonaws.com HTTP/1.1\r\nHost: sts.amazonaws.com\r\n\r\n",
            "HTTP/1.1 400",
        ),
    ];
    for (request, want) in cases {
        let request = request.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert!(answer.starts_with(want), "{request:?} -> {answer:?}");
        assert!(
            answer.contains("x-squid-error: ERR_"),
            "{request:?} -> {answer:?}"
        );
    }
    proxy.stop().await;
}

/// `GET /healthz` on the proxy port answers 200.
#[tokio::test]
async fn healthz() {
    let proxy = TestProxy::start(&[]).await;
    let response = direct_client()
        .get(format!("{}/healthz", proxy.url()))
        .send()
        .await
        .expect("healthz");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok\n");
    proxy.stop().await;
}

/// curl with `-x` gets the origin's answer for an allowed host and a 403 for a refused one.
#[tokio::test]
async fn curl_plain_http() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[]).await;
    let url = proxy.url();
    let port = origin.port();
    let output = tokio::task::spawn_blocking(move || {
        let ok = Command::new("curl")
            .args(["-sS", "--max-time", "30", "-x", &url])
            .arg(format!("http://sts.amazonaws.com:{port}/hello"))
            .output()
            .expect("run curl");
        let denied = Command::new("curl")
            .args(["-sS", "-i", "--max-time", "30", "-x", &url])
            .arg(format!("http://evil.com:{port}/hello"))
            .output()
            .expect("run curl");
        (ok, denied)
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.0.stdout),
        "hello from origin"
    );
    let denied = String::from_utf8_lossy(&output.1.stdout);
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(
        denied
            .to_ascii_lowercase()
            .contains("x-squid-error: err_access_denied 0"),
        "{denied}"
    );
    proxy.stop().await;
}
