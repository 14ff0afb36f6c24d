//! Observability: Prometheus counters after a known sequence, the Squid and JSON access logs,
//! the non-blocking log writer, and the admin listener.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn value(metrics: &HashMap<String, f64>, series: &str) -> f64 {
    *metrics
        .get(series)
        .unwrap_or_else(|| panic!("no series {series}"))
}

/// 2 allowed HTTP requests, 1 allowed tunnel, 3 refusals by the allowlist and 1 by client CIDR:
/// `/metrics` shows exactly those increments, the byte totals match what was sent, the tunnel
/// gauge returns to 0, and each Squid-format access log line carries the right result code,
/// status, client, method and URL.
#[tokio::test]
async fn known_sequence_counts_and_squid_log() {
    let origin = start_origin().await;
    let echo = start_echo().await;
    let mut cuttle =
        CuttleProcess::start_with(&[("ALLOWED_CIDRS", "127.0.0.1/32")], Stdout::Capture).await;
    let proxy = format!("http://{}", cuttle.addr);
    let client = client(&proxy, None);
    let port = origin.port();

    // 2 allowed plain HTTP: 0 + 1000 bytes up, 17 + 1000 bytes down.
    let hello = client
        .get(format!("http://sts.amazonaws.com:{port}/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(hello.text().await.unwrap().len(), 17);
    let echoed = client
        .post(format!("http://s3.us-west-2.amazonaws.com:{port}/echo"))
        .body(vec![7u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.bytes().await.unwrap().len(), 1000);

    // 1 allowed tunnel: 5000 bytes each way.
    let stream = tunnel(cuttle.addr, &format!("sts.amazonaws.com:{}", echo.port())).await;
    let back = echo_through(stream, random_bytes(5000, 7)).await;
    assert_eq!(back.len(), 5000);

    // 3 refused by the allowlist: 2 plain, 1 CONNECT.
    for path in ["a", "b"] {
        let r = client
            .get(format!("http://evil.com:{port}/{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }
    let (_, head) = connect_raw(cuttle.addr, "evil.com:443").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    // 1 refused by client CIDR.
    let outside = client_builder(&proxy, None)
        .local_address(IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let r = outside
        .get(format!("http://sts.amazonaws.com:{port}/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // The tunnel gauge goes back to 0 once the tunnel is closed on both sides.
    let deadline = Instant::now() + WAIT;
    let metrics = loop {
        let m = scrape(cuttle.addr).await;
        if value(&m, "cuttle_tunnels_active") == 0.0 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "tunnel gauge stuck at {}",
            value(&m, "cuttle_tunnels_active")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let requests = |kind: &str, decision: &str, reason: &str| {
        value(
            &metrics,
            &format!("cuttle_requests_total{{decision=\"{decision}\",kind=\"{kind}\",reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(requests("http", "allowed", "allowlist"), 2.0);
    assert_eq!(requests("connect", "allowed", "allowlist"), 1.0);
    assert_eq!(requests("http", "denied", "allowlist"), 2.0);
    assert_eq!(requests("connect", "denied", "allowlist"), 1.0);
    assert_eq!(requests("http", "denied", "client_cidr"), 1.0);
    for (kind, decision, reason) in [
        ("http", "denied", "port"),
        ("connect", "denied", "client_cidr"),
        ("http", "error", "dns"),
        ("connect", "denied", "upstream_address"),
    ] {
        assert_eq!(
            requests(kind, decision, reason),
            0.0,
            "{kind} {decision} {reason}"
        );
    }
    assert_eq!(
        value(
            &metrics,
            "cuttle_bytes_total{direction=\"client_to_upstream\"}"
        ),
        6000.0
    );
    assert_eq!(
        value(
            &metrics,
            "cuttle_bytes_total{direction=\"upstream_to_client\"}"
        ),
        6017.0
    );
    assert!(value(&metrics, "cuttle_upstream_connect_seconds_count") >= 2.0);
    assert!(value(&metrics, "cuttle_dns_lookup_seconds_count") >= 2.0);
    assert_eq!(value(&metrics, "cuttle_allowlist_entries"), 10.0);
    assert_eq!(value(&metrics, "cuttle_build_info{version=\"0.1.0\"}"), 1.0);
    assert!(value(&metrics, "process_resident_memory_bytes") > 0.0);

    // The access log: one Squid-format line per request (the /metrics scrapes are logged too).
    let re = regex::Regex::new(SQUID_LINE).unwrap();
    let lines = cuttle.access_lines(7);
    let parsed: Vec<regex::Captures> = lines
        .iter()
        .map(|l| {
            re.captures(l)
                .unwrap_or_else(|| panic!("not Squid format: {l:?}"))
        })
        .collect();
    let find = |method: &str, url: &str| {
        parsed
            .iter()
            .find(|c| &c[8] == method && &c[9] == url)
            .unwrap_or_else(|| panic!("no line for {method} {url} in {lines:#?}"))
    };
    let check = |c: &regex::Captures, client: &str, code: &str, status: &str| {
        assert_eq!((&c[4], &c[5], &c[6]), (client, code, status), "{}", &c[0]);
    };
    let line = find("GET", &format!("http://sts.amazonaws.com:{port}/hello"));
    check(line, "127.0.0.1", "TCP_MISS", "200");
    assert_eq!(
        (&line[7], &line[11], &line[12]),
        ("17", "HIER_DIRECT", "127.0.0.1")
    );
    check(
        find(
            "POST",
            &format!("http://s3.us-west-2.amazonaws.com:{port}/echo"),
        ),
        "127.0.0.1",
        "TCP_MISS",
        "200",
    );
    let line = find("CONNECT", &format!("sts.amazonaws.com:{}", echo.port()));
    check(line, "127.0.0.1", "TCP_TUNNEL", "200");
    assert_eq!(&line[7], "5000");
    check(
        find("GET", &format!("http://evil.com:{port}/a")),
        "127.0.0.1",
        "TCP_DENIED",
        "403",
    );
    check(
        find("GET", &format!("http://evil.com:{port}/b")),
        "127.0.0.1",
        "TCP_DENIED",
        "403",
    );
    let line = find("CONNECT", "evil.com:443");
    check(line, "127.0.0.1", "TCP_DENIED", "403");
    assert_eq!((&line[11], &line[12]), ("HIER_NONE", "-"));
    let outside_line = parsed
        .iter()
        .find(|c| &c[4] == "127.0.0.2")
        .unwrap_or_else(|| panic!("no line for the outside client in {lines:#?}"));
    check(outside_line, "127.0.0.2", "TCP_DENIED", "403");
}

/// With CUTTLE_ACCESS_LOG=json each line is a JSON object with every documented field.
#[tokio::test]
async fn json_access_log() {
    let origin = start_origin().await;
    let mut cuttle =
        CuttleProcess::start_with(&[("CUTTLE_ACCESS_LOG", "json")], Stdout::Capture).await;
    let client = client(&format!("http://{}", cuttle.addr), None);
    let port = origin.port();
    client
        .get(format!("http://sts.amazonaws.com:{port}/hello"))
        .send()
        .await
        .unwrap();
    client
        .get(format!("http://evil.com:{port}/"))
        .send()
        .await
        .unwrap();
    let lines = cuttle.access_lines(2);
    let objects: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    for object in &objects {
        for field in [
            "time",
            "duration_ms",
            "client",
            "method",
            "url",
            "host",
            "port",
            "status",
            "decision",
            "reason",
            "rule",
            "bytes_up",
            "bytes_down",
            "upstream",
            "dns_ms",
            "connect_ms",
        ] {
            assert!(object.get(field).is_some(), "{field} missing in {object}");
        }
    }
    let allowed = objects
        .iter()
        .find(|o| o["status"] == 200)
        .expect("allowed line");
    assert_eq!(allowed["decision"], "allowed");
    assert_eq!(allowed["host"], "sts.amazonaws.com");
    assert_eq!(allowed["port"], port);
    assert_eq!(allowed["rule"], "sts.amazonaws.com (AWS global default)");
    assert_eq!(allowed["upstream"], format!("127.0.0.1:{port}"));
    assert!(
        allowed["connect_ms"].is_number() && allowed["dns_ms"].is_number(),
        "{allowed}"
    );
    let denied = objects
        .iter()
        .find(|o| o["status"] == 403)
        .expect("denied line");
    assert_eq!(denied["decision"], "denied");
    assert_eq!(denied["reason"], "allowlist");
    assert_eq!(denied["host"], "evil.com");
}

/// A stdout nobody reads does not slow requests: they keep completing, and the lines that
/// cannot be written are dropped and counted.
///
/// What can be absorbed before dropping starts: the pipe and the writer's buffers (under 1000
/// lines), the batch the writer took from the queue (up to the queue's 4096) and a full queue
/// again (4096); 16 000 requests are well past that whatever the timing.
#[tokio::test]
async fn stalled_stdout_drops_lines_without_stalling_requests() {
    const CONNECTIONS: usize = 8;
    const PER_CONNECTION: usize = 2000;
    let cuttle = CuttleProcess::start_with(&[], Stdout::Stall).await;
    let addr = cuttle.addr;
    let started = Instant::now();
    // Keep-alive connections, each pipelining refused requests.
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        tasks.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = b"GET http://evil.com/ HTTP/1.1\r\nHost: evil.com\r\n\r\n";
            let mut answered = 0;
            let mut buf = vec![0u8; 64 * 1024];
            let mut seen = Vec::new();
            let mut sent = 0;
            while answered < PER_CONNECTION {
                // Up to 500 requests ahead of the answers, so neither side's buffers fill.
                while sent < PER_CONNECTION && sent < answered + 500 {
                    stream.write_all(request).await.unwrap();
                    sent += 1;
                }
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "proxy closed after {answered} answers");
                seen.extend_from_slice(&buf[..n]);
                answered = seen.windows(12).filter(|w| w == b"HTTP/1.1 403").count();
            }
            answered
        }));
    }
    for task in tasks {
        let answered = tokio::time::timeout(WAIT * 2, task)
            .await
            .expect("requests keep completing")
            .unwrap();
        assert_eq!(answered, PER_CONNECTION);
    }
    let metrics = scrape(cuttle.addr).await;
    let dropped = value(&metrics, "cuttle_access_log_dropped_total");
    assert!(dropped > 0.0, "nothing dropped");
    assert_eq!(
        value(
            &metrics,
            "cuttle_requests_total{decision=\"denied\",kind=\"http\",reason=\"allowlist\"}"
        ),
        (CONNECTIONS * PER_CONNECTION) as f64
    );
    assert!(started.elapsed() < WAIT * 2);
}

/// The admin listener serves /metrics and /healthz to anyone who reaches it, refuses to proxy,
/// answers /healthz 503 while draining, and health checks are not access-logged by default.
#[tokio::test]
async fn admin_listener_and_healthz_during_drain() {
    let echo = start_echo().await;
    let mut cuttle = CuttleProcess::start_with(
        &[
            ("CUTTLE_ADMIN_LISTEN", "127.0.0.1:0"),
            ("ALLOWED_CIDRS", "10.0.0.0/8"),
            ("SHUTDOWN_LIFETIME", "60"),
        ],
        Stdout::Capture,
    )
    .await;
    let line = cuttle.wait_for_line("cuttle listening");
    // The startup line says where the allowlist came from.
    assert!(line.contains("allowlist_entries=10"), "{line}");
    assert!(
        line.contains("regional defaults 2, global defaults 9, SQUID_WHITELIST 0"),
        "{line}"
    );
    let admin: SocketAddr = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("admin="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no admin address in {line}"));
    let http = direct_client();
    let health = http
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics
        .text()
        .await
        .unwrap()
        .contains("cuttle_requests_total"));
    let proxied = raw_exchange(admin, b"GET http://sts.amazonaws.com/ HTTP/1.1\r\nHost: sts.amazonaws.com\r\nConnection: close\r\n\r\n").await;
    assert!(proxied.starts_with("HTTP/1.1 400"), "{proxied}");

    // Loopback is outside ALLOWED_CIDRS here but may still ask the proxy port for /healthz;
    // it may not proxy.
    assert_eq!(
        http.get(format!("http://{}/healthz", cuttle.addr))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (_, head) = connect_raw(cuttle.addr, &format!("sts.amazonaws.com:{}", echo.port())).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    // Keep a connection open so the drain lasts, then check /healthz on the admin port.
    let _held = tokio::net::TcpStream::connect(cuttle.addr).await.unwrap();
    cuttle.signal("TERM");
    cuttle.wait_for_line("draining");
    let health = http
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 503);
    assert_eq!(health.text().await.unwrap(), "draining\n");

    let lines = cuttle.access_lines(3);
    assert!(
        !lines.iter().any(|l| l.contains("/healthz")),
        "health checks logged: {lines:#?}"
    );
    assert!(lines.iter().any(|l| l.contains("/metrics")), "{lines:#?}");
}

/// CUTTLE_LOG_FORMAT=json turns diagnostics on stderr into JSON objects; CUTTLE_LOG filters them.
#[tokio::test]
async fn json_diagnostics() {
    let mut cuttle = CuttleProcess::start(&[
        ("CUTTLE_LOG_FORMAT", "json"),
        ("CUTTLE_LOG", "cuttle=debug"),
    ])
    .await;
    let (_, head) = connect_raw(cuttle.addr, "evil.com:443").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let refused = cuttle.wait_for_line("request failed");
    let object: serde_json::Value =
        serde_json::from_str(&refused).unwrap_or_else(|e| panic!("{refused}: {e}"));
    assert_eq!(object["level"], "DEBUG");
    assert_eq!(object["fields"]["reason"], "allowlist");
    let listening = cuttle.wait_for_line("cuttle listening");
    let listening: serde_json::Value =
        serde_json::from_str(&listening).expect("startup line is JSON");
    assert_eq!(listening["fields"]["allowlist_entries"], 10);
    for line in &cuttle.stderr {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
}
