//! DNS answers are cached for their TTL, in a bounded cache: repeated CONNECTs to one name ask
//! the DNS server once while the answer lives, and ask again once it has expired; past
//! `DNS_CACHE_NAMES` names, answers are asked for again. The DNS server is a fake on loopback
//! that answers names under `cache.example.com` with 127.0.0.1 and counts the queries.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use support::*;

/// A UDP DNS server answering `A` queries for every name with 127.0.0.1 and a fixed TTL (other
/// types: no records), counting the `A` queries per name.
struct CountingDns {
    addr: SocketAddr,
    queries: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingDns {
    async fn start(ttl: u32) -> CountingDns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let addr = socket.local_addr().expect("dns addr");
        let queries = Arc::new(Mutex::new(HashMap::new()));
        let counts = queries.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let Some((name, answer)) = answer(&buf[..n], ttl) else {
                    continue;
                };
                if let Some(name) = name {
                    *counts.lock().unwrap().entry(name).or_insert(0) += 1;
                }
                let _ = socket.send_to(&answer, peer).await;
            }
        });
        CountingDns {
            addr,
            queries,
            task,
        }
    }

    /// `A` queries seen for `name` (without the trailing dot).
    fn count(&self, name: &str) -> usize {
        self.queries.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

impl Drop for CountingDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer to `query`, and the name asked when it is an `A` query.
fn answer(query: &[u8], ttl: u32) -> Option<(Option<String>, Vec<u8>)> {
    let mut labels = Vec::new();
    let mut end = 12;
    loop {
        let len = *query.get(end)? as usize;
        end += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(end..end + len)?).to_lowercase());
        end += len;
    }
    let qtype = u16::from_be_bytes([*query.get(end)?, *query.get(end + 1)?]);
    end += 4;
    let is_a = qtype == 1;
    let mut out = Vec::with_capacity(end + 16);
    out.extend_from_slice(&query[..2]);
    // Response, recursion desired and available, no error; one question, one answer or none.
    out.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    out.extend_from_slice(&query[12..end]);
    if is_a {
        // The question's name (a pointer to offset 12), A, IN, TTL, 4 bytes: 127.0.0.1.
        out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&[0, 4, 127, 0, 0, 1]);
    }
    Some((is_a.then(|| labels.join(".")), out))
}

async fn proxy_with(dns: &CountingDns) -> TestProxy {
    TestProxy::start(&[
        ("CUTTLE_DNS_SERVERS", &dns.addr.to_string()),
        ("SQUID_WHITELIST", ".cache.example.com"),
    ])
    .await
}

/// One tunnel to `target`, with a byte echoed through it.
async fn one_tunnel(proxy: SocketAddr, target: &str) {
    let stream = tunnel(proxy, target).await;
    assert_eq!(echo_through(stream, b"x".to_vec()).await, b"x");
}

/// Five CONNECTs to one name within its 300 s TTL: the DNS server is asked once.
#[tokio::test]
async fn repeated_connects_ask_dns_once_within_the_ttl() {
    let dns = CountingDns::start(300).await;
    let echo = start_echo().await;
    let proxy = proxy_with(&dns).await;
    let target = format!("svc.cache.example.com:{}", echo.port());
    for _ in 0..5 {
        one_tunnel(proxy.addr, &target).await;
    }
    assert_eq!(dns.count("svc.cache.example.com"), 1);
    // Another name is a lookup of its own.
    one_tunnel(
        proxy.addr,
        &format!("other.cache.example.com:{}", echo.port()),
    )
    .await;
    assert_eq!(dns.count("other.cache.example.com"), 1);
    assert_eq!(dns.count("svc.cache.example.com"), 1);
    proxy.stop().await;
}

/// An answer with a 1 s TTL is asked for again once it has expired, not kept for good.
#[tokio::test]
async fn an_expired_answer_is_asked_again() {
    let dns = CountingDns::start(1).await;
    let echo = start_echo().await;
    let proxy = proxy_with(&dns).await;
    let target = format!("short.cache.example.com:{}", echo.port());
    let first = Instant::now();
    one_tunnel(proxy.addr, &target).await;
    assert_eq!(dns.count("short.cache.example.com"), 1);
    // A tunnel every 100 ms until the answer has been asked for again (bounded).
    while dns.count("short.cache.example.com") < 2 && first.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(100)).await;
        one_tunnel(proxy.addr, &target).await;
    }
    assert_eq!(dns.count("short.cache.example.com"), 2);
    assert!(
        first.elapsed() >= Duration::from_secs(1),
        "asked again after {:?}, within the TTL",
        first.elapsed()
    );
    proxy.stop().await;
}

/// The cache is bounded: of 8192 names each looked up twice, at most about `DNS_CACHE_NAMES`
/// (4096) are answered from the cache the second time; the rest are asked again. (The cache
/// evicts approximately, so a little slack.)
#[tokio::test]
async fn the_cache_holds_a_bounded_number_of_names() {
    use cuttle::host::Host;
    use cuttle::resolve::{Resolver, DNS_CACHE_NAMES};
    use cuttle::settings::{Settings, Sources};

    let dns = CountingDns::start(300).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = base_env(dir.path(), dns.addr);
    env.insert("SQUID_WHITELIST".into(), ".cache.example.com".into());
    let settings = Settings::load(&Sources::from_env(env)).expect("settings");
    let resolver = Resolver::new(&settings).expect("resolver");
    let names = 2 * DNS_CACHE_NAMES;
    let host = |i: usize| Host::parse(&format!("n{i}.cache.example.com")).expect("host");
    for _ in 0..2 {
        for i in 0..names {
            resolver.lookup(&host(i)).await.expect("lookup");
        }
    }
    let asked: usize = (0..names)
        .map(|i| dns.count(&format!("n{i}.cache.example.com")))
        .sum();
    let from_cache = 2 * names - asked;
    assert!(
        from_cache <= DNS_CACHE_NAMES + DNS_CACHE_NAMES / 8,
        "{from_cache} of {names} second lookups answered from the cache"
    );
    // And it is a cache: many second lookups were answered from it.
    assert!(
        from_cache >= DNS_CACHE_NAMES / 2,
        "{from_cache} second lookups answered from the cache"
    );
}
