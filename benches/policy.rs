//! Policy-path micro-benchmarks (issue 7): allowlist lookup at 10, 1k and 100k entries (hits one
//! and five labels below the matching entry, and a miss), the client CIDR check for 3 and 1k
//! ranges, the full [`Policy::decide`], the Squid access-log line, and the request framing
//! watch over typical requests (the cost it adds to every request).
//!
//! Targets: allowlist lookup ≤ 100 ns at 100k entries and flat from 10 to 100k. Kept short
//! (`cargo bench --bench policy` well under two minutes): modest sample sizes and measurement
//! times; pass criterion flags after `--` for a longer run.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ipnet::IpNet;

use cuttle::access_log::Record;
use cuttle::allowlist::{Allowlist, Entry, EntrySource, Pattern};
use cuttle::client_acl::{ClientAcl, ClientAddr};
use cuttle::framing::Tracker;
use cuttle::host::Host;
use cuttle::metrics::{Kind, Outcome, Reason};
use cuttle::policy::{Policy, Request, Target};
use cuttle::settings::{Settings, Sources};

/// Allowlist sizes benchmarked.
const SIZES: [usize; 3] = [10, 1_000, 100_000];

/// `n` entries shaped like real allowlists: two thirds suffix entries
/// (`.svc17.team3.example.com`), one third exact names (`api17.team3.example.org`), none
/// covering another.
fn entries(n: usize) -> Vec<Entry> {
    (0..n)
        .map(|i| {
            let pattern = if i % 3 == 2 {
                Pattern::Exact(format!("api{i}.team{}.example.org", i % 97))
            } else {
                Pattern::Suffix(format!("svc{i}.team{}.example.com", i % 97))
            };
            Entry {
                pattern,
                source: EntrySource::SquidWhitelist,
            }
        })
        .collect()
}

fn host(s: &str) -> Host {
    Host::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn allowlist_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("allowlist_find");
    for n in SIZES {
        let list = Allowlist::new(entries(n)).expect("bench entries compile");
        // A suffix entry in the middle of the list, so no size favours an early insert.
        let i = (n / 2) / 3 * 3;
        let entry = format!("svc{i}.team{}.example.com", i % 97);
        let cases = [
            ("hit_depth1", host(&format!("a.{entry}"))),
            ("hit_depth5", host(&format!("a.b.c.d.e.{entry}"))),
            ("miss", host("a.b.c.d.nosuch.example.net")),
        ];
        for (name, h) in cases {
            let want = name.starts_with("hit");
            assert_eq!(list.find(&h).is_some(), want, "{n} entries, host {h}");
            group.bench_with_input(BenchmarkId::new(name, n), &h, |b, h| {
                b.iter(|| list.find(black_box(h)).is_some())
            });
        }
    }
    group.finish();

    // Building the 100k list: what a reload (or a start with a large allowlist file) pays.
    let mut group = c.benchmark_group("allowlist_build");
    group.sample_size(10);
    for n in [1_000, 100_000] {
        let list = entries(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &list, |b, list| {
            b.iter(|| Allowlist::new(list.clone()).expect("bench entries compile"))
        });
    }
    group.finish();
}

/// What the request path does once per request before the lookup.
fn host_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    group.bench_function("host_name", |b| {
        b.iter(|| Host::parse(black_box("ec2.us-west-2.amazonaws.com")))
    });
    group.bench_function("target_authority", |b| {
        b.iter(|| Target::parse_authority(black_box("sts.amazonaws.com:443"), None))
    });
    group.finish();
}

fn client_cidr(c: &mut Criterion) {
    let three: Vec<IpNet> = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
        .iter()
        .map(|s| s.parse().expect("CIDR"))
        .collect();
    // 1k ranges of mixed prefix lengths spread over 10.0.0.0/8 and 100.64.0.0/10.
    let thousand: Vec<IpNet> = (0..1_000u32)
        .map(|i| {
            let (base, len) = if i % 2 == 0 {
                (0x0a00_0000 | (i << 12), 20)
            } else {
                (0x6440_0000 | (i << 8), 24)
            };
            IpNet::new(IpAddr::V4(Ipv4Addr::from(base)), len)
                .expect("prefix length")
                .trunc()
        })
        .collect();
    let client = |s: &str| ClientAddr::new(SocketAddr::new(s.parse().expect("IP"), 40000));
    let hit3 = client("192.168.7.9");
    let hit1k = client("100.64.3.200"); // 100.64.3.0/24 is range i = 3
    let miss = client("203.0.113.7");
    let mapped = client("::ffff:10.1.2.3");

    let mut group = c.benchmark_group("client_acl");
    for (n, nets, hit) in [(3, &three, hit3), (1_000, &thousand, hit1k)] {
        let acl = ClientAcl::new(nets);
        assert!(acl.allows(hit), "{n} ranges, client {hit}");
        assert!(!acl.allows(miss), "{n} ranges, client {miss}");
        group.bench_with_input(BenchmarkId::new("hit", n), &hit, |b, c| {
            b.iter(|| acl.allows(black_box(*c)))
        });
        group.bench_with_input(BenchmarkId::new("miss", n), &miss, |b, c| {
            b.iter(|| acl.allows(black_box(*c)))
        });
    }
    let acl = ClientAcl::new(&three);
    group.bench_function("hit_v4_mapped/3", |b| {
        b.iter(|| acl.allows(black_box(mapped)))
    });
    group.finish();
}

fn policy_decide(c: &mut Criterion) {
    // The production shape: default regions and global endpoints, a few SQUID_WHITELIST
    // entries, default client networks and ports.
    let settings = Settings::load(&Sources::from_env([
        ("SQUID_WHITELIST", ".example.com,.github.com,pypi.org"),
        ("AWS_REGIONS", "us-west-2,eu-west-1"),
    ]))
    .expect("bench settings");
    let policy = Policy::new(&settings).expect("bench policy");
    let client = ClientAddr::new(SocketAddr::new("10.1.2.3".parse().expect("IP"), 40000));
    let outsider = ClientAddr::new(SocketAddr::new("203.0.113.7".parse().expect("IP"), 40000));
    let s3 = Target::parse_authority("bucket.s3.us-west-2.amazonaws.com:443", None).expect("t");
    let sts = Target::parse_authority("sts.amazonaws.com:443", None).expect("t");
    let http = Target::parse_authority("deb.example.com", Some(80)).expect("t");
    let evil = Target::parse_authority("evil.example.net:443", None).expect("t");

    let mut group = c.benchmark_group("policy_decide");
    let cases = [
        ("connect_suffix_allow", client, Request::Connect(&s3)),
        ("connect_exact_allow", client, Request::Connect(&sts)),
        ("http_allow", client, Request::Http(&http)),
        ("connect_deny_allowlist", client, Request::Connect(&evil)),
        ("deny_client_cidr", outsider, Request::Connect(&sts)),
    ];
    for (name, who, request) in cases {
        group.bench_function(name, |b| {
            b.iter(|| {
                matches!(
                    policy.decide(black_box(who), black_box(request)),
                    cuttle::policy::Decision::Allow(_)
                )
            })
        });
    }
    // Parse the authority and decide: the policy work of one CONNECT, end to end.
    group.bench_function("parse_and_decide_connect", |b| {
        b.iter(|| {
            let t = Target::parse_authority(black_box("ec2.us-west-2.amazonaws.com:443"), None)
                .expect("target");
            matches!(
                policy.decide(client, Request::Connect(&t)),
                cuttle::policy::Decision::Allow(_)
            )
        })
    });
    group.finish();
}

fn access_log_line(c: &mut Criterion) {
    let record = Record {
        end: UNIX_EPOCH + Duration::from_millis(1_733_300_000_123),
        duration: Duration::from_millis(42),
        client: "10.1.2.3".parse().expect("IP"),
        kind: Kind::Connect,
        method: "CONNECT".into(),
        url: "bucket.s3.us-west-2.amazonaws.com:443".into(),
        host: Some("bucket.s3.us-west-2.amazonaws.com".into()),
        port: Some(443),
        status: 200,
        outcome: Outcome::Allowed,
        reason: Reason::Allowlist,
        rule: Some(".us-west-2.amazonaws.com (AWS_REGIONS=us-west-2)".into()),
        bytes_up: 4_812,
        bytes_down: 1_048_576,
        upstream: Some("52.218.1.2:443".parse().expect("addr")),
        dns: Some(Duration::from_micros(350)),
        connect: Some(Duration::from_micros(900)),
        content_type: None,
    };
    let http = Record {
        kind: Kind::Http,
        method: "GET".into(),
        url: "http://deb.example.com/debian/dists/bookworm/InRelease".into(),
        content_type: Some("text/plain; charset=utf-8".into()),
        end: SystemTime::now(),
        ..record.clone()
    };
    let mut group = c.benchmark_group("access_log");
    group.bench_function("squid_line_connect", |b| {
        b.iter(|| black_box(&record).squid_line())
    });
    group.bench_function("squid_line_http", |b| {
        b.iter(|| black_box(&http).squid_line())
    });
    group.bench_function("json_line_connect", |b| {
        b.iter(|| black_box(&record).json_line())
    });
    group.finish();
}

/// The framing watch following typical requests as they arrive in one read each: a GET head
/// as the AWS CLI sends it, a PUT with a 16 KiB `Content-Length` body, and a chunked upload of
/// four 4 KiB chunks.
fn framing_watch(c: &mut Criterion) {
    let head = "GET http://s3.us-west-2.amazonaws.com/bucket/some/key.json HTTP/1.1\r\n\
        Host: s3.us-west-2.amazonaws.com\r\nAccept-Encoding: identity\r\n\
        User-Agent: aws-cli/2.15.0 md/Botocore#1.34.0 ua/2.0 os/linux#6.1 md/arch#x86_64\r\n\
        X-Amz-Date: 20240101T000000Z\r\nX-Amz-Content-SHA256: UNSIGNED-PAYLOAD\r\n\
        Authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101/us-west-2/s3/aws4_request, \
        SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=0123456789abcdef\r\n\r\n";
    let put = [
        b"PUT http://s3.us-west-2.amazonaws.com/bucket/obj HTTP/1.1\r\nHost: s3\r\nContent-Length: 16384\r\n\r\n".as_slice(),
        &[b'x'; 16384],
    ]
    .concat();
    let mut chunked =
        b"POST http://sts.amazonaws.com/ HTTP/1.1\r\nHost: sts\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..4 {
        chunked.extend_from_slice(b"1000\r\n");
        chunked.extend_from_slice(&[b'y'; 4096]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let mut group = c.benchmark_group("framing_watch");
    for (name, bytes) in [
        ("get_head", head.as_bytes()),
        ("put_16k", put.as_slice()),
        ("chunked_4x4k", chunked.as_slice()),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut tracker = Tracker::new(64 * 1024);
                tracker.feed(black_box(bytes));
                assert_eq!(tracker.heads(), 1);
                tracker
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1_000))
}

criterion_group! {
    name = benches;
    config = config();
    targets = allowlist_lookup, host_parse, client_cidr, policy_decide, access_log_line, framing_watch
}
criterion_main!(benches);
