//! Hostile clients: request-target tricks, request smuggling and header limits.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// === A recording origin ===

/// One request as the origin received it.
#[derive(Clone, Debug)]
struct Received {
    /// The request head, as sent on the wire.
    head: String,
    /// The decoded body.
    body: Vec<u8>,
    /// False when the connection ended before the message did.
    complete: bool,
}

/// A raw TCP origin that parses requests itself (no hyper, so nothing is normalised on its way
/// in) and records each one, answering `200 recorded`.
struct Recorder {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Received>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind recorder");
        let addr = listener.local_addr().expect("recorder addr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let task_log = log.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(record_connection(stream, task_log.clone()));
            }
        });
        Recorder { addr, log }
    }

    fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }
}

async fn record_connection(mut stream: TcpStream, log: Arc<Mutex<Vec<Received>>>) {
    let mut buf = Vec::new();
    loop {
        match parse_message(&buf) {
            Parsed::Complete(received, used) => {
                buf.drain(..used);
                log.lock().unwrap().push(received);
                let answer = "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nrecorded";
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            Parsed::Invalid => {
                log.lock().unwrap().push(Received {
                    head: String::from_utf8_lossy(&buf).into_owned(),
                    body: Vec::new(),
                    complete: false,
                });
                return;
            }
            Parsed::Partial => {}
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(WAIT, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => {
                if !buf.is_empty() {
                    log.lock().unwrap().push(Received {
                        head: String::from_utf8_lossy(&buf).into_owned(),
                        body: Vec::new(),
                        complete: false,
                    });
                }
                return;
            }
        }
    }
}

enum Parsed {
    Complete(Received, usize),
    Partial,
    Invalid,
}

/// Parses one request at the start of `buf`: the head with httparse, the body by
/// `Content-Length` or chunked framing. Anything with both, or several lengths, is `Invalid`.
fn parse_message(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Invalid,
    };
    let named = |name: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
            .collect::<Vec<_>>()
    };
    let lengths = named("content-length");
    let encodings = named("transfer-encoding");
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let rest = &buf[head_len..];
    let (body, used) = match (lengths.as_slice(), encodings.as_slice()) {
        ([], []) => (Vec::new(), 0),
        ([len], []) => {
            let Ok(len) = len.parse::<usize>() else {
                return Parsed::Invalid;
            };
            if rest.len() < len {
                return Parsed::Partial;
            }
            (rest[..len].to_vec(), len)
        }
        ([], [te]) if te.eq_ignore_ascii_case("chunked") => match dechunk(rest) {
            Some(Some(done)) => done,
            Some(None) => return Parsed::Partial,
            None => return Parsed::Invalid,
        },
        _ => return Parsed::Invalid,
    };
    Parsed::Complete(
        Received {
            head,
            body,
            complete: true,
        },
        head_len + used,
    )
}

/// Decodes a chunked body: `None` if malformed, `Some(None)` if incomplete, else the body and the
/// bytes it took.
fn dechunk(mut rest: &[u8]) -> Option<Option<(Vec<u8>, usize)>> {
    let total = rest.len();
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Some(None);
        };
        let line = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // No trailers from hyper: the final CRLF.
            if rest.len() < 2 {
                return Some(None);
            }
            if &rest[..2] != b"\r\n" {
                return None;
            }
            return Some(Some((body, total - rest.len() + 2)));
        }
        if rest.len() < size + 2 {
            return Some(None);
        }
        body.extend_from_slice(&rest[..size]);
        if &rest[size..size + 2] != b"\r\n" {
            return None;
        }
        rest = &rest[size + 2..];
    }
}

// === A raw client ===

/// A response as the client saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// `X-Squid-Error`, present on cuttle's own answers and absent on hyper's automatic ones.
    squid_error: Option<String>,
    connection_close: bool,
    body: String,
    /// The connection, to check whether the proxy closes it.
    stream: TcpStream,
}

/// Sends `request` on a fresh connection and reads one response. Write errors are ignored: the proxy may close before it has read everything.
async fn ask(proxy: SocketAddr, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
    let _ = stream.write_all(request).await;
    read_answer(stream).await
}

async fn read_answer(mut stream: TcpStream) -> Answer {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let (status, squid_error, connection_close, head_len, length) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = response.parse(&buf) {
            let get = |name: &str| {
                response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned())
            };
            let length = get("content-length").and_then(|l| l.parse::<usize>().ok());
            break (
                response.code.expect("status"),
                get("x-squid-error"),
                get("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")),
                n,
                length,
            );
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            other => panic!(
                "no response head: {other:?} after {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    };
    let length = length.expect("responses here have a Content-Length");
    while buf.len() < head_len + length {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            other => panic!("short body: {other:?}"),
        }
    }
    let body = String::from_utf8_lossy(&buf[head_len..head_len + length]).into_owned();
    Answer {
        status,
        squid_error,
        connection_close,
        body,
        stream,
    }
}

impl Answer {
    /// True once the proxy closes the connection (EOF or reset), false if it stays open for
    /// `WAIT`. Any bytes still coming are skipped.
    async fn closes(&self) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut buf = [0u8; 4096];
        loop {
            if tokio::time::timeout_at(deadline, self.stream.readable())
                .await
                .is_err()
            {
                return false;
            }
            match self.stream.try_read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return true,
            }
        }
    }
}

/// Asserts cuttle's own refusal: `status`, `X-Squid-Error: NAME 0`, and a body containing each
/// of `words`.
fn assert_refusal(answer: &Answer, status: u16, name: &str, words: &[&str], what: &str) {
    assert_eq!(answer.status, status, "{what}: {answer:?}");
    assert_eq!(
        answer.squid_error.as_deref(),
        Some(format!("{name} 0").as_str()),
        "{what}: {answer:?}"
    );
    for word in words {
        assert!(answer.body.contains(word), "{what}: {word:?} in {answer:?}");
    }
}

/// Asserts hyper's automatic answer to an unparsable request: `status` with an empty body, no
/// `X-Squid-Error` (the request never reached cuttle's code), and the connection closed.
async fn assert_hyper_refusal(answer: &Answer, status: u16, what: &str) {
    assert_eq!(answer.status, status, "{what}: {answer:?}");
    assert_eq!(answer.squid_error, None, "{what}: {answer:?}");
    assert!(answer.body.is_empty(), "{what}: {answer:?}");
    assert!(
        answer.connection_close && answer.closes().await,
        "{what}: {answer:?}"
    );
}

/// A hosts file with the test names plus IDNA names, all on 127.0.0.1.
fn hosts_with_idna(dir: &std::path::Path) -> String {
    let path = dir.join("hosts");
    let text = format!(
        "{HOSTS}127.0.0.1 xn--bcher-kva.example xn--bcher-8eb.example xn--ts-doc.amazonaws.com\n"
    );
    std::fs::write(&path, text).expect("write hosts");
    path.display().to_string()
}

// === Request-target tricks ===

/// User information before the host is refused, whatever the host after it: it is how
/// `http://allowed@evil/` fools naive matching.
#[tokio::test]
async fn userinfo_in_request_target_is_refused() {
    let rec = Recorder::start().await;
    let proxy = TestProxy::start(&[]).await;
    let p = rec.addr.port();
    for target in [
        format!("http://sts.amazonaws.com@evil.com:{p}/"),
        format!("http://sts.amazonaws.com:{p}@evil.com:{p}/"),
        format!("http://user:pass@sts.amazonaws.com:{p}/"),
        format!("http://@sts.amazonaws.com:{p}/"),
    ] {
        let answer = ask(
            proxy.addr,
            format!("GET {target} HTTP/1.1\r\nHost: sts.amazonaws.com\r\n\r\n").as_bytes(),
        )
        .await;
        assert_refusal(
            &answer,
            400,
            "ERR_INVALID_REQ",
            &["user information"],
            &target,
        );
        assert!(answer.closes().await, "{target}: {answer:?}");
    }
    let answer = ask(
        proxy.addr,
        format!("CONNECT sts.amazonaws.com@evil.com:{p} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_refusal(
        &answer,
        400,
        "ERR_INVALID_REQ",
        &[],
        "CONNECT with userinfo",
    );
    assert!(rec.received().is_empty(), "{:?}", rec.received());
    proxy.stop().await;
}

/// The absolute URI decides where a request goes and what `Host` the origin sees; a disagreeing
/// (or repeated) `Host` header is replaced. For CONNECT, the request target decides.
#[tokio::test]
async fn host_header_disagreeing_with_uri_is_replaced() {
    let origin = start_origin().await;
    let echo = start_echo().await;
    let proxy = TestProxy::start(&[]).await;
    let authority = format!("sts.amazonaws.com:{}", origin.port());
    for hosts in [
        "Host: evil.com\r\n",
        "Host: evil.com\r\nHost: other.example\r\n",
        "",
    ] {
        let answer = ask(
            proxy.addr,
            format!("GET http://{authority}/headers HTTP/1.1\r\n{hosts}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(answer.status, 200, "{hosts:?}: {answer:?}");
        let host_lines: Vec<&str> = answer
            .body
            .lines()
            .filter(|l| l.starts_with("host:"))
            .collect();
        assert_eq!(host_lines, [format!("host: {authority}")], "{hosts:?}");
    }
    // CONNECT: the tunnel goes to the request target, not to the Host header.
    let target = format!("sts.amazonaws.com:{}", echo.port());
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: evil.com:443\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(echo_through(stream, b"ping".to_vec()).await, b"ping");
    proxy.stop().await;
}

/// Percent-encoded, empty, over-long, `..` and leading-dot hosts are refused with 400 before
/// any lookup; an unparsable authority is hyper's 400.
#[tokio::test]
async fn malformed_hosts_are_refused() {
    let rec = Recorder::start().await;
    let proxy = TestProxy::start(&[("SQUID_WHITELIST", ".example.com")]).await;
    let p = rec.addr.port();
    let long_label = format!("{}.example.com", "a".repeat(64));
    let long_name = format!("{}.example.com", vec!["a".repeat(60); 5].join("."));
    assert!(long_name.len() > 253);
    let cases: Vec<(String, &str)> = vec![
        (format!(":{p}"), "empty host"),
        (format!("{long_label}:{p}"), "longer than 63"),
        (format!("{long_name}:{p}"), "too long"),
        (format!("sts..amazonaws.com:{p}"), "empty label"),
        (format!("..:{p}"), "empty label"),
        (format!(".sts.amazonaws.com:{p}"), "empty label"),
        (format!("sts.amazonaws.com..:{p}"), "empty label"),
        (format!("www_.example.com!:{p}"), "character not allowed"),
        (format!("www.example.com$:{p}"), "character not allowed"),
        ("sts.amazonaws.com:99999999".to_string(), "invalid port"),
    ];
    for (authority, why) in &cases {
        for request in [
            format!("GET http://{authority}/ HTTP/1.1\r\nHost: sts.amazonaws.com\r\n\r\n"),
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
        ] {
            let answer = ask(proxy.addr, request.as_bytes()).await;
            assert_refusal(&answer, 400, "ERR_INVALID_REQ", &[why], authority);
            assert!(answer.closes().await, "{authority}: {answer:?}");
        }
    }
    // Percent-encoding in a host, an empty authority, a bad port or bracket: not even a URI
    // (the `http` crate refuses it), so hyper answers 400 itself.
    for authority in [
        format!("sts%2eamazonaws.com:{p}"),
        format!("%73ts.amazonaws.com:{p}"),
        format!("sts.amazonaws.com%00.evil.com:{p}"),
        format!("sts.amazonaws.com:{p}:{p}"),
        "[::1".to_string(),
    ] {
        for request in [
            format!("GET http://{authority}/ HTTP/1.1\r\nHost: sts.amazonaws.com\r\n\r\n"),
            format!("CONNECT {authority} HTTP/1.1\r\nHost: sts.amazonaws.com\r\n\r\n"),
        ] {
            let answer = ask(proxy.addr, request.as_bytes()).await;
            assert_hyper_refusal(&answer, 400, &request).await;
        }
    }
    let answer = ask(proxy.addr, b"GET http:/// HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_hyper_refusal(&answer, 400, "http:///").await;
    assert!(rec.received().is_empty(), "{:?}", rec.received());
    proxy.stop().await;
}

/// IDNA: an allowlisted internationalised name is reached through its punycode form; a
/// look-alike of an allowed name (another Unicode letter, a Cyrillic `ѕ`) is a different name
/// and refused; raw UTF-8 in the request line is not a URI (hyper's 400).
#[tokio::test]
async fn idna_hosts_match_by_punycode_and_look_alikes_are_refused() {
    let rec = Recorder::start().await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_with_idna(dir.path());
    let proxy = TestProxy::start(&[
        ("SQUID_WHITELIST", ".bücher.example"),
        ("CUTTLE_HOSTS_FILE", &hosts),
    ])
    .await;
    let p = rec.addr.port();
    for host in [
        "xn--bcher-kva.example",
        "www.xn--bcher-kva.example",
        "XN--BCHER-KVA.example.",
    ] {
        let answer = ask(
            proxy.addr,
            format!("GET http://{host}:{p}/idna HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        )
        .await;
        // www.xn--bcher-kva.example is not in the hosts file and the test DNS says NXDOMAIN.
        if host.starts_with("www.") {
            assert_refusal(&answer, 502, "ERR_DNS_FAIL", &[], host);
        } else {
            assert_eq!(answer.status, 200, "{host}: {answer:?}");
            assert_eq!(answer.body, "recorded", "{host}");
        }
    }
    let seen = rec.received();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0]
        .head
        .contains(&format!("host: xn--bcher-kva.example:{p}\r\n")));
    for host in ["xn--bcher-8eb.example", "xn--ts-doc.amazonaws.com"] {
        let answer = ask(
            proxy.addr,
            format!("GET http://{host}:{p}/ HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_refusal(
            &answer,
            403,
            "ERR_ACCESS_DENIED",
            &[host, "not on the allowlist"],
            host,
        );
        let answer = ask(
            proxy.addr,
            format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n").as_bytes(),
        )
        .await;
        assert_refusal(&answer, 403, "ERR_ACCESS_DENIED", &[host], host);
    }
    // Invalid punycode is refused as such.
    let answer = ask(
        proxy.addr,
        format!("GET http://xn--a.example:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_refusal(
        &answer,
        400,
        "ERR_INVALID_REQ",
        &["internationalised"],
        "xn--a",
    );
    // Raw UTF-8 is not valid in a request line.
    let answer = ask(
        proxy.addr,
        format!("GET http://bücher.example:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_hyper_refusal(&answer, 400, "raw UTF-8 host").await;
    assert_eq!(rec.received().len(), 2, "{:?}", rec.received());
    proxy.stop().await;
}

/// IP literals: non-standard numeric forms are 400 (resolvers disagree on what they mean);
/// dotted IPv4 and bracketed IPv6 (IPv4-mapped included) need an IP/CIDR entry, else 403.
#[tokio::test]
async fn ip_literal_forms() {
    let rec = Recorder::start().await;
    let proxy = TestProxy::start(&[]).await;
    let p = rec.addr.port();
    for host in [
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "0x7f.0.0.1",
        "127.1",
        "127.0.1",
        "127.0.0.1.1",
        "017700000001",
    ] {
        for request in [
            format!("GET http://{host}:{p}/ HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            format!("CONNECT {host}:{p} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        ] {
            let answer = ask(proxy.addr, request.as_bytes()).await;
            assert_refusal(
                &answer,
                400,
                "ERR_INVALID_REQ",
                &["numeric IP address"],
                host,
            );
        }
    }
    for host in [
        "127.0.0.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[0:0:0:0:0:ffff:127.0.0.1]",
        "[64:ff9b::7f00:1]",
        "169.254.169.254",
    ] {
        for request in [
            format!("GET http://{host}:{p}/ HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            format!("CONNECT {host}:{p} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        ] {
            let answer = ask(proxy.addr, request.as_bytes()).await;
            assert_refusal(
                &answer,
                403,
                "ERR_ACCESS_DENIED",
                &["not on the allowlist"],
                host,
            );
        }
    }
    // A zone id is not a host.
    let answer = ask(
        proxy.addr,
        format!("CONNECT [fe80::1%25eth0]:{p} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(rec.received().is_empty(), "{:?}", rec.received());
    proxy.stop().await;
}

/// With a CIDR entry, dotted and IPv4-mapped literals in it reach the origin (the base test
/// environment lets loopback through the guard).
#[tokio::test]
async fn ip_literals_with_a_cidr_entry_are_allowed() {
    let rec = Recorder::start().await;
    let echo = start_echo().await;
    let proxy = TestProxy::start(&[("SQUID_WHITELIST", "127.0.0.0/8")]).await;
    let p = rec.addr.port();
    for host in ["127.0.0.1", "[::ffff:127.0.0.1]"] {
        let answer = ask(
            proxy.addr,
            format!("GET http://{host}:{p}/ip HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(answer.status, 200, "{host}: {answer:?}");
    }
    assert_eq!(rec.received().len(), 2, "{:?}", rec.received());
    let stream = tunnel(proxy.addr, &format!("127.0.0.1:{}", echo.port())).await;
    assert_eq!(echo_through(stream, b"v4".to_vec()).await, b"v4");
    // Not in the entry.
    let answer = ask(
        proxy.addr,
        format!("GET http://[::1]:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_refusal(
        &answer,
        403,
        "ERR_ACCESS_DENIED",
        &["not on the allowlist"],
        "[::1]",
    );
    // The proxy's own listener is never a destination (no request loops).
    let own = proxy.addr.port();
    let answer = ask(
        proxy.addr,
        format!("GET http://127.0.0.1:{own}/healthz HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_refusal(
        &answer,
        403,
        "ERR_ACCESS_DENIED",
        &["own listen address"],
        "self",
    );
    proxy.stop().await;
}

/// The address guard refuses loopback even when a CIDR entry allows the literal, and whatever
/// name leads there, unless `CUTTLE_UPSTREAM_ALLOW_CIDRS` lets it through (here it is unset).
#[tokio::test]
async fn guard_refuses_loopback_even_when_allowlisted() {
    let rec = Recorder::start().await;
    let proxy = TestProxy::start(&[
        ("SQUID_WHITELIST", "127.0.0.0/8,::1,.example.com"),
        ("CUTTLE_UPSTREAM_ALLOW_CIDRS", ""),
    ])
    .await;
    let p = rec.addr.port();
    let cases = [
        ("127.0.0.1", "a loopback address"),
        ("127.9.9.9", "a loopback address"),
        ("[::ffff:127.0.0.1]", "a loopback address"),
        ("[::1]", "a loopback address"),
        ("sts.amazonaws.com", "a loopback address"),
        ("www.example.com", "a loopback address"),
        ("imds.example.com", "the instance metadata service"),
        ("v6.example.com", "a loopback address"),
    ];
    for (host, why) in cases {
        for request in [
            format!("GET http://{host}:{p}/ HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            format!("CONNECT {host}:{p} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        ] {
            let answer = ask(proxy.addr, request.as_bytes()).await;
            assert_refusal(
                &answer,
                403,
                "ERR_ACCESS_DENIED",
                &["resolves to", why],
                host,
            );
        }
    }
    assert!(rec.received().is_empty(), "{:?}", rec.received());
    let metrics = ask(proxy.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        metrics
            .body
            .lines()
            .any(|l| l.starts_with("cuttle_requests_total")
                && l.contains("reason=\"upstream_address\"")
                && l.contains("decision=\"denied\"")),
        "{}",
        metrics.body
    );
    proxy.stop().await;
}

/// CONNECT needs exactly `host:port` and no body: no port, a path, a scheme, `*` or a body are
/// 400.
#[tokio::test]
async fn connect_target_must_be_host_and_port() {
    let proxy = TestProxy::start(&[]).await;
    for target in [
        "sts.amazonaws.com",
        "sts.amazonaws.com:",
        "sts.amazonaws.com:443/path",
        "sts.amazonaws.com:443?q",
        "http://sts.amazonaws.com:443",
        "/sts.amazonaws.com:443",
        "*",
        "sts.amazonaws.com:0",
        "sts.amazonaws.com:65536",
        "sts.amazonaws.com:+443",
        "[::1]",
    ] {
        let answer = ask(
            proxy.addr,
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(answer.status, 400, "{target}: {answer:?}");
        if answer.squid_error.is_some() {
            assert_refusal(&answer, 400, "ERR_INVALID_REQ", &[], target);
        }
        assert!(answer.closes().await, "{target}: {answer:?}");
    }
    // A CONNECT request has no body: one in front of the tunnel data is refused.
    let echo = start_echo().await;
    let target = format!("sts.amazonaws.com:{}", echo.port());
    for framing in [
        "Content-Length: 5\r\n\r\nhello",
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        let answer = ask(
            proxy.addr,
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{framing}").as_bytes(),
        )
        .await;
        assert_refusal(
            &answer,
            400,
            "ERR_INVALID_REQ",
            &["cannot have a body"],
            framing,
        );
        assert!(answer.closes().await, "{framing}: {answer:?}");
    }
    let stream = tunnel(proxy.addr, &target).await;
    assert_eq!(echo_through(stream, b"no body".to_vec()).await, b"no body");
    proxy.stop().await;
}

/// `OPTIONS *` and other origin-form requests that are not local endpoints are 400; TRACE is
/// 405 in any case; absolute-form `https://` and other schemes are 501.
#[tokio::test]
async fn methods_and_forms_the_proxy_refuses() {
    let rec = Recorder::start().await;
    let proxy = TestProxy::start(&[]).await;
    let p = rec.addr.port();
    let a = format!("sts.amazonaws.com:{p}");
    let cases: Vec<(String, u16, &str, &str)> = vec![
        (
            format!("OPTIONS * HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            400,
            "ERR_INVALID_REQ",
            "not absolute-form",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            400,
            "ERR_INVALID_REQ",
            "not a proxy request",
        ),
        (
            format!("POST /healthz HTTP/1.1\r\nHost: {a}\r\nContent-Length: 0\r\n\r\n"),
            400,
            "ERR_INVALID_REQ",
            "not a proxy request",
        ),
        (
            format!("GET {a} HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            400,
            "ERR_INVALID_REQ",
            "not absolute-form",
        ),
        (
            format!("TRACE http://{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            405,
            "ERR_UNSUP_REQ",
            "TRACE",
        ),
        (
            format!("trace http://{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            405,
            "ERR_UNSUP_REQ",
            "TRACE",
        ),
        (
            format!("TRACE / HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            405,
            "ERR_UNSUP_REQ",
            "TRACE",
        ),
        (
            format!("GET https://{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            501,
            "ERR_UNSUP_REQ",
            "use CONNECT",
        ),
        (
            format!("GET HTTPS://{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            501,
            "ERR_UNSUP_REQ",
            "use CONNECT",
        ),
        (
            format!("GET ftp://{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            501,
            "ERR_UNSUP_REQ",
            "ftp",
        ),
        (
            format!("GET ws://{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            501,
            "ERR_UNSUP_REQ",
            "ws",
        ),
    ];
    for (request, status, name, why) in &cases {
        let answer = ask(proxy.addr, request.as_bytes()).await;
        assert_refusal(&answer, *status, name, &[why], request);
    }
    assert!(rec.received().is_empty(), "{:?}", rec.received());
    proxy.stop().await;
}

/// HTTP/1.0 without `Host`: an absolute URI is enough; origin-form is not a proxy request.
#[tokio::test]
async fn http10_without_host() {
    let origin = start_origin().await;
    let proxy = TestProxy::start(&[]).await;
    let authority = format!("sts.amazonaws.com:{}", origin.port());
    let answer = ask(
        proxy.addr,
        format!("GET http://{authority}/hello HTTP/1.0\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, "hello from origin");
    assert!(
        answer.closes().await,
        "HTTP/1.0 without keep-alive closes: {answer:?}"
    );
    let answer = ask(
        proxy.addr,
        format!("GET http://{authority}/headers HTTP/1.0\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(
        answer.body.contains(&format!("host: {authority}\n")),
        "{answer:?}"
    );
    let answer = ask(proxy.addr, b"GET /hello HTTP/1.0\r\n\r\n").await;
    assert_refusal(
        &answer,
        400,
        "ERR_INVALID_REQ",
        &["not a proxy request"],
        "1.0 origin-form",
    );
    proxy.stop().await;
}

// === Request smuggling ===

/// What happens to a framing trick.
enum Framing {
    /// Refused by hyper's parser: 400, no `X-Squid-Error`, connection closed; nothing reaches
    /// the origin.
    Refused,
    /// Refused by cuttle: 400 `ERR_INVALID_REQ` with a reason containing this text, connection
    /// closed; nothing reaches the origin.
    RefusedByCuttle(&'static str),
}

/// Smuggling attempts. Every request carries a second request after the body as the attacker
/// would frame it; nothing at all reaches the origin.
#[tokio::test]
async fn smuggling_attempts_are_refused() {
    let rec = Recorder::start().await;
    let proxy = TestProxy::start(&[]).await;
    let p = rec.addr.port();
    let a = format!("sts.amazonaws.com:{p}");
    let smuggled = format!("GET http://{a}/smuggled HTTP/1.1\r\nHost: {a}\r\n\r\n");
    let post = |headers: &str, body: &str| {
        format!("POST http://{a}/post HTTP/1.1\r\nHost: {a}\r\n{headers}\r\n{body}{smuggled}")
    };
    use Framing::*;
    let both = "Content-Length with Transfer-Encoding";
    let cases: Vec<(&str, String, Framing)> = vec![
        // hyper would drop Content-Length and forward chunked (RFC 9112 §6.3); the framing
        // watch saw both headers on the wire and cuttle refuses (RFC 9112 §6.1).
        (
            "Content-Length then Transfer-Encoding",
            post("Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
            RefusedByCuttle(both),
        ),
        (
            "Transfer-Encoding then Content-Length",
            post("Transfer-Encoding: chunked\r\nContent-Length: 80\r\n", "0\r\n\r\n"),
            RefusedByCuttle(both),
        ),
        (
            "chunked body with Content-Length",
            post("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
            RefusedByCuttle(both),
        ),
        (
            "lower case, Transfer-Encoding then an invalid Content-Length",
            post("transfer-encoding: chunked\r\ncontent-length: x\r\n", "0\r\n\r\n"),
            RefusedByCuttle(both),
        ),
        (
            "two different Content-Length",
            post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"),
            Refused,
        ),
        ("Content-Length list", post("Content-Length: 5, 5\r\n", "hello"), Refused),
        ("Content-Length +5", post("Content-Length: +5\r\n", "hello"), Refused),
        ("Content-Length -1", post("Content-Length: -1\r\n", "hello"), Refused),
        ("Content-Length 0x5", post("Content-Length: 0x5\r\n", "hello"), Refused),
        ("Content-Length empty", post("Content-Length: \r\n", "hello"), Refused),
        ("Content-Length 5 5", post("Content-Length: 5 5\r\n", "hello"), Refused),
        (
            "Content-Length overflow",
            post("Content-Length: 99999999999999999999999\r\n", "hello"),
            Refused,
        ),
        (
            "invalid Content-Length then Transfer-Encoding",
            post("Content-Length: x\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
            Refused,
        ),
        ("Transfer-Encoding gzip", post("Transfer-Encoding: gzip\r\n", "hello"), Refused),
        (
            "Transfer-Encoding chunked, identity",
            post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"),
            Refused,
        ),
        ("Transfer-Encoding xchunked", post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"), Refused),
        (
            "Transfer-Encoding chunked + identity headers",
            post("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", "0\r\n\r\n"),
            Refused,
        ),
        (
            "space before colon",
            post("Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", "hello"),
            Refused,
        ),
        (
            "vertical tab before chunked",
            post("Transfer-Encoding:\x0bchunked\r\nContent-Length: 5\r\n", "hello"),
            Refused,
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            format!("POST http://{a}/post HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
            Refused,
        ),
        (
            "obsolete line folding",
            post("X-Folded: a\r\n b\r\nContent-Length: 0\r\n", ""),
            Refused,
        ),
        (
            "folded Transfer-Encoding",
            post("X-A: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "hello"),
            Refused,
        ),
        ("bare CR", format!("GET http://{a}/cr HTTP/1.1\rHost: {a}\r\n\r\n"), Refused),
        ("NUL in a header", post("X-A: a\0b\r\nContent-Length: 0\r\n", ""), Refused),
        // A transfer coding cuttle cannot pass on as is (it forwards re-chunked): 400 and a
        // close, rather than the gzip coding silently dropped.
        (
            "Transfer-Encoding gzip, chunked",
            post("Transfer-Encoding: gzip, chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
            RefusedByCuttle("transfer codings other than a single chunked"),
        ),
        (
            "Transfer-Encoding chunked twice",
            post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
            RefusedByCuttle("transfer codings other than a single chunked"),
        ),
    ];
    for (what, request, want) in cases {
        let answer = ask(proxy.addr, request.as_bytes()).await;
        match want {
            Refused => assert_hyper_refusal(&answer, 400, what).await,
            RefusedByCuttle(reason) => {
                assert_refusal(&answer, 400, "ERR_INVALID_REQ", &[reason], what);
                assert!(
                    answer.connection_close && answer.closes().await,
                    "{what}: {answer:?}"
                );
            }
        }
    }
    // Give a wrongly forwarded request time to arrive before judging.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(rec.received().is_empty(), "origin got {:?}", rec.received());
    proxy.stop().await;
}

/// Content-Length with Transfer-Encoding, in both orders, on a keep-alive connection after a
/// valid request: the valid one is answered 200, the ambiguous one 400 `ERR_INVALID_REQ` with
/// the reason, then the connection is closed; only the valid request reaches the origin.
/// Sent pipelined in one write, and again with the second request in a later write.
#[tokio::test]
async fn content_length_with_transfer_encoding_after_a_valid_request_is_refused() {
    let rec = Recorder::start().await;
    let proxy = TestProxy::start(&[]).await;
    let p = rec.addr.port();
    let a = format!("sts.amazonaws.com:{p}");
    let valid = format!("GET http://{a}/first HTTP/1.1\r\nHost: {a}\r\n\r\n");
    let mut expected = 0;
    for (headers, pipelined) in [
        ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", true),
        ("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", true),
        ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", false),
    ] {
        let what = format!("{headers:?} pipelined={pipelined}");
        let ambiguous = format!(
            "POST http://{a}/second HTTP/1.1\r\nHost: {a}\r\n{headers}\r\n0\r\n\r\n\
             GET http://{a}/smuggled HTTP/1.1\r\nHost: {a}\r\n\r\n"
        );
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        if pipelined {
            stream
                .write_all(format!("{valid}{ambiguous}").as_bytes())
                .await
                .unwrap();
        } else {
            stream.write_all(valid.as_bytes()).await.unwrap();
        }
        let first = read_answer_keep_alive(&mut stream).await;
        assert_eq!(first, (200, "recorded".to_string()), "{what}");
        if !pipelined {
            stream.write_all(ambiguous.as_bytes()).await.unwrap();
        }
        let second = read_answer(stream).await;
        assert_refusal(
            &second,
            400,
            "ERR_INVALID_REQ",
            &["Content-Length with Transfer-Encoding"],
            &what,
        );
        assert!(
            second.connection_close && second.closes().await,
            "{what}: {second:?}"
        );
        expected += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = rec.received();
        assert_eq!(seen.len(), expected, "{what}: {seen:?}");
        assert!(
            seen[expected - 1].head.starts_with("GET /first "),
            "{what}: {seen:?}"
        );
    }
    // Counted and logged like any other bad request.
    let metrics = scrape(proxy.addr).await;
    let bad = "cuttle_requests_total{decision=\"error\",kind=\"http\",reason=\"bad_request\"}";
    assert_eq!(metrics.get(bad), Some(&3.0), "{bad}");
    proxy.stop().await;
}

/// No false refusals: one keep-alive connection carries a chunked request (with chunk
/// extensions and a trailer), a Content-Length request, a GET and a request with identical
/// duplicate Content-Length, each written in small pieces; all are forwarded with their
/// bodies intact.
#[tokio::test]
async fn valid_keep_alive_mix_is_not_refused() {
    let rec = Recorder::start().await;
    let proxy = TestProxy::start(&[]).await;
    let p = rec.addr.port();
    let a = format!("sts.amazonaws.com:{p}");
    let requests = [
        format!(
            "POST http://{a}/chunked HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;ext=1\r\nhello\r\n7 \r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
        ),
        format!("POST http://{a}/length HTTP/1.1\r\nHost: {a}\r\nContent-Length: 11\r\n\r\nhello\r\n\r\nxy"),
        format!("GET http://{a}/get HTTP/1.1\r\nHost: {a}\r\n\r\n"),
        format!(
            "PUT http://{a}/dup HTTP/1.1\r\nHost: {a}\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
        ),
    ];
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    for (i, request) in requests.iter().enumerate() {
        // Odd piece sizes so that heads and chunk lines straddle reads.
        for piece in request.as_bytes().chunks(7 + i) {
            stream.write_all(piece).await.unwrap();
            stream.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        let answer = read_answer_keep_alive(&mut stream).await;
        assert_eq!(answer, (200, "recorded".to_string()), "request {i}");
    }
    let seen = wait_for_received(&rec, requests.len()).await;
    let bodies: Vec<&[u8]> = seen.iter().map(|r| r.body.as_slice()).collect();
    assert_eq!(
        bodies,
        [&b"hello, world"[..], b"hello\r\n\r\nxy", b"", b"abc"],
        "{seen:?}"
    );
    proxy.stop().await;
}

/// Lenient forms hyper accepts, and that reach the origin re-serialised (so the origin never
/// sees the form itself): identical duplicate `Content-Length` (merged, RFC 9110 §8.6) and bare
/// LF line endings (RFC 9112 §2.2). A request pipelined after a correctly framed body is a
/// request of its own, judged by the policy like any other.
#[tokio::test]
async fn lenient_forms_are_forwarded_normalised() {
    let rec = Recorder::start().await;
    let proxy = TestProxy::start(&[]).await;
    let p = rec.addr.port();
    let a = format!("sts.amazonaws.com:{p}");

    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!(
        "POST http://{a}/dup HTTP/1.1\r\nHost: {a}\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello\
         GET http://evil.com:{p}/next HTTP/1.1\r\nHost: {a}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let first = read_answer_keep_alive(&mut stream).await;
    assert_eq!(first.0, 200, "{first:?}");
    let second = read_answer_keep_alive(&mut stream).await;
    assert_eq!(
        second.0, 403,
        "the pipelined request is judged on its own: {second:?}"
    );
    let seen = wait_for_received(&rec, 1).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].head.matches("content-length: 5\r\n").count(),
        1,
        "{:?}",
        seen[0]
    );
    assert_eq!(seen[0].body, b"hello");

    let answer = ask(
        proxy.addr,
        format!("GET http://{a}/lf HTTP/1.1\nHost: evil.com\nX-A: b\nConnection: close\n\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = wait_for_received(&rec, 2).await;
    assert!(seen[1].complete, "{:?}", seen[1]);
    assert_eq!(
        seen[1].head,
        format!("GET /lf HTTP/1.1\r\nhost: {a}\r\nx-a: b\r\nvia: 1.1 cuttle\r\n\r\n"),
        "re-serialised with CRLF, Host from the URI"
    );
    proxy.stop().await;
}

/// An invalid chunk size (or a chunk longer than announced) in a request body is the client's
/// fault: 400 and the connection closed. The origin never receives a complete message: at most
/// the head and the chunks before the bad one, then a close.
#[tokio::test]
async fn invalid_chunked_body_is_refused_and_never_completed_upstream() {
    let rec = Recorder::start().await;
    let proxy = TestProxy::start(&[]).await;
    let p = rec.addr.port();
    let a = format!("sts.amazonaws.com:{p}");
    for body in [
        "zz\r\nhello\r\n0\r\n\r\n",
        "-5\r\nhello\r\n0\r\n\r\n",
        "fffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        "3\r\nhello\r\n0\r\n\r\n",
        "5\r\nhello\r\nxyz\r\n0\r\n\r\n",
    ] {
        let answer = ask(
            proxy.addr,
            format!("POST http://{a}/chunks HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n{body}")
                .as_bytes(),
        )
        .await;
        assert!(answer.closes().await, "{body:?}: {answer:?}");
        assert_refusal(&answer, 400, "ERR_INVALID_REQ", &[], body);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = rec.received();
    assert!(seen.iter().all(|r| !r.complete), "{seen:?}");
    proxy.stop().await;
}

// === Limits ===

/// A request head over 64 KiB gets hyper's 431 and a close; so does one with more than 100
/// header fields (hyper's default). Nothing reaches the origin; a modest head still works.
#[tokio::test]
async fn oversized_heads_get_431() {
    let rec = Recorder::start().await;
    let proxy = TestProxy::start(&[]).await;
    let p = rec.addr.port();
    let a = format!("sts.amazonaws.com:{p}");
    let big = "x".repeat(100 * 1024);
    let answer = ask(
        proxy.addr,
        format!("GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_hyper_refusal(&answer, 431, "100 KiB header").await;
    let answer = ask(
        proxy.addr,
        format!("GET http://{a}/{big} HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_hyper_refusal(&answer, 431, "100 KiB URI").await;
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let answer = ask(
        proxy.addr,
        format!("GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert_hyper_refusal(&answer, 431, "200 headers").await;
    assert!(rec.received().is_empty(), "{:?}", rec.received());

    // Just under both limits: forwarded.
    let some: String = (0..90).map(|i| format!("X-H{i}: v\r\n")).collect();
    let medium = "y".repeat(60 * 1024);
    let answer = ask(
        proxy.addr,
        format!("GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\n{some}X-Medium: {medium}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(wait_for_received(&rec, 1).await.len(), 1);
    proxy.stop().await;
}

// === helpers ===

/// Waits (up to `WAIT`) until the recorder holds at least `n` requests; returns them all.
async fn wait_for_received(rec: &Recorder, n: usize) -> Vec<Received> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let seen = rec.received();
        if seen.len() >= n || tokio::time::Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads one response on a connection that stays open: status and body.
async fn read_answer_keep_alive(stream: &mut TcpStream) -> (u16, String) {
    let head = read_head(stream).await;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    response.parse(head.as_bytes()).expect("response head");
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
        .expect("content-length");
    let mut body = vec![0u8; length];
    tokio::time::timeout(WAIT, stream.read_exact(&mut body))
        .await
        .expect("body in time")
        .expect("body");
    (
        response.code.expect("status"),
        String::from_utf8_lossy(&body).into_owned(),
    )
}
