//! Test support: the real proxy on an ephemeral port (in-process or as the built binary), local
//! origins (HTTP, HTTPS with a test CA, raw TCP echo), a fake DNS server that answers NXDOMAIN,
//! and clients. Everything listens on loopback only.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use cuttle::server::Server;
use cuttle::settings::{Settings, Sources};

/// Generous bound for anything a test waits on (loaded 2-core CI machines).
pub const WAIT: Duration = Duration::from_secs(30);

/// Names the test hosts file maps. AWS names and `www.example.com` go to 127.0.0.1, the
/// `imds.example.com` name to the metadata service address, `v6.example.com` to ::1.
pub const HOSTS: &str = "\
127.0.0.1 sts.amazonaws.com s3.us-west-2.amazonaws.com ec2.us-west-2.amazonaws.com www.example.com evil.com
169.254.169.254 imds.example.com
::1 v6.example.com
";

// === Proxy (in-process) ===

/// The real proxy server, in this process, on 127.0.0.1:0.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    _dns: FakeDns,
}

/// The environment every test proxy starts from; `extra` entries override it.
pub fn base_env(dir: &std::path::Path, dns: SocketAddr) -> HashMap<String, String> {
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, HOSTS).expect("write hosts file");
    [
        ("CUTTLE_LISTEN", "127.0.0.1:0".to_string()),
        ("CUTTLE_HOSTS_FILE", hosts.display().to_string()),
        (
            "CUTTLE_UPSTREAM_ALLOW_CIDRS",
            "127.0.0.0/8,::1/128".to_string(),
        ),
        ("CUTTLE_DNS_SERVERS", dns.to_string()),
        ("CUTTLE_CONNECT_PORTS", "443,1025-65535".to_string()),
        // Most tunnels in the tests carry plain bytes to an echo server; the SNI tests turn the
        // check back on.
        ("CUTTLE_SNI_CHECK", "off".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl TestProxy {
    /// Starts the proxy with the base environment plus `extra`.
    pub async fn start(extra: &[(&str, &str)]) -> TestProxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let dns = FakeDns::start().await;
        let mut env = base_env(dir.path(), dns.addr);
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        let settings = Settings::load(&Sources::from_env(env)).expect("test settings load");
        let server = Server::bind_with_log(settings, tokio::io::sink())
            .await
            .expect("proxy binds");
        let addr = server.local_addr();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server.run(shutdown.clone()));
        TestProxy {
            addr,
            shutdown,
            handle,
            _dir: dir,
            _dns: dns,
        }
    }

    /// `http://127.0.0.1:PORT`, for client proxy settings.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the proxy and waits for its drain to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("proxy drains in time")
            .expect("proxy task");
    }
}

/// A reqwest client that sends everything through `proxy` (trusting `ca` if given).
pub fn client(proxy: &str, ca: Option<&TestCa>) -> reqwest::Client {
    client_builder(proxy, ca).build().expect("reqwest client")
}

/// A reqwest client that ignores any proxy settings of the environment.
pub fn direct_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("reqwest client")
}

/// The builder behind [`client`], for tests that need more settings.
pub fn client_builder(proxy: &str, ca: Option<&TestCa>) -> reqwest::ClientBuilder {
    let mut builder = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy).expect("proxy url"))
        .timeout(WAIT);
    if let Some(ca) = ca {
        builder = builder
            .add_root_certificate(reqwest::Certificate::from_der(&ca.cert_der).expect("ca cert"))
            .tls_built_in_root_certs(false);
    }
    builder
}

// === Metrics and logs ===

/// Squid's native access log format (`logformat squid`), field by field: time, elapsed, client,
/// code/status, bytes, method, URL, user, hierarchy/peer, type.
pub const SQUID_LINE: &str = r"^(\d+)\.(\d{3}) +(\d+) (\S+) ([A-Z_]+)/(\d{3}) (\d+) (\S+) (\S+) (\S+) ([A-Z_]+)/(\S+) (\S+)$";

/// The proxy's `/metrics` text.
pub async fn metrics_text(addr: SocketAddr) -> String {
    direct_client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text")
}

/// The proxy's `/metrics` as `series -> value` (series as printed, labels sorted by the
/// encoder).
pub async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    metrics_text(addr)
        .await
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// One gauge or counter from `/metrics`, fetched over a fresh connection that closes (that
/// connection is counted in `cuttle_connections_active`, the same way at every scrape).
pub async fn gauge(proxy: SocketAddr, name: &str) -> i64 {
    let text = raw_exchange(
        proxy,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

// === Origins ===

type Body = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// The origin's routes:
/// - `GET /hello`: `hello from origin`;
/// - `POST /echo`: the request body, streamed back;
/// - `POST /sha256`: `LEN HEX` of the request body, read as a stream;
/// - `GET /bytes?n=N`: N bytes of [`pattern`], streamed in 64 KiB chunks;
/// - `GET /headers`: the request headers, one `name: value` a line, sorted.
async fn origin_service(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let response = match (req.method().as_str(), path.as_str()) {
        ("GET", "/hello") => Response::new(full("hello from origin")),
        ("POST", "/echo") => Response::new(req.into_body().boxed()),
        ("POST", "/sha256") => {
            let mut body = req.into_body();
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Some(data) = frame.data_ref() {
                            len += data.len() as u64;
                            hasher.update(data);
                        }
                    }
                    Err(e) => return Ok(Response::new(full(format!("error {e}")))),
                }
            }
            Response::new(full(format!("{len} {}", hex(&hasher.finalize()))))
        }
        ("GET", "/bytes") => {
            let n: u64 = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let chunks = futures_util::stream::unfold(0u64, move |sent| async move {
                if sent >= n {
                    return None;
                }
                let len = (n - sent).min(64 * 1024);
                let chunk = Bytes::from(pattern(sent, len as usize));
                Some((Ok::<_, hyper::Error>(Frame::data(chunk)), sent + len))
            });
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
            response
                .headers_mut()
                .insert("content-length", n.to_string().parse().expect("header"));
            response
        }
        ("GET", "/headers") => {
            let mut lines: Vec<String> = req
                .headers()
                .iter()
                .map(|(k, v)| format!("{}: {}", k, v.to_str().unwrap_or("?")))
                .collect();
            lines.sort();
            Response::new(full(lines.join("\n") + "\n"))
        }
        _ => {
            let mut r = Response::new(full("not found"));
            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
            r
        }
    };
    Ok(response)
}

/// `len` bytes of a fixed pattern (byte `i` of the stream is `i % 251`) starting at stream
/// offset `offset`.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    static TABLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    const SPAN: usize = 256 * 1024;
    if len > SPAN {
        return (0..len as u64)
            .map(|i| ((offset + i) % 251) as u8)
            .collect();
    }
    let table = TABLE.get_or_init(|| (0..(SPAN + 251) as u64).map(|i| (i % 251) as u8).collect());
    let start = (offset % 251) as usize;
    table[start..start + len].to_vec()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A plain HTTP origin on 127.0.0.1:0.
pub async fn start_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("origin addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(origin_service))
                    .await;
            });
        }
    });
    addr
}

/// A test certificate authority and one leaf certificate signed by it.
pub struct TestCa {
    pub cert_der: Vec<u8>,
    pub cert_pem: String,
    leaf_der: Vec<u8>,
    leaf_key_der: Vec<u8>,
}

impl TestCa {
    /// A CA and a leaf for `names`.
    pub fn new(names: &[&str]) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "cuttle test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let leaf = CertificateParams::new(names)
            .expect("leaf params")
            .signed_by(&leaf_key, &ca_cert, &ca_key)
            .expect("leaf cert");
        TestCa {
            cert_der: ca_cert.der().to_vec(),
            cert_pem: ca_cert.pem(),
            leaf_der: leaf.der().to_vec(),
            leaf_key_der: leaf_key.serialize_der(),
        }
    }
}

/// An HTTPS origin (same routes as [`start_origin`]) on 127.0.0.1:0 with the leaf of `ca`.
pub async fn start_tls_origin(ca: &TestCa) -> SocketAddr {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(ca.leaf_der.clone())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ca.leaf_key_der.clone())),
    )
    .expect("tls config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind tls origin");
    let addr = listener.local_addr().expect("tls origin addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service_fn(origin_service))
                    .await;
            });
        }
    });
    addr
}

/// A TCP echo server: copies what it reads back until the client half-closes, then
/// half-closes itself.
pub async fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A port on 127.0.0.1 where nothing listens (bound, then released).
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").port()
}

// === Raw proxy clients ===

/// Sends `CONNECT target` and reads the response head. Returns the stream and the head.
pub async fn connect_raw(proxy: SocketAddr, target: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send CONNECT");
    let head = read_head(&mut stream).await;
    (stream, head)
}

/// Opens a tunnel and asserts it was established.
pub async fn tunnel(proxy: SocketAddr, target: &str) -> TcpStream {
    let (stream, head) = connect_raw(proxy, target).await;
    assert!(
        head.starts_with("HTTP/1.1 200 Connection established\r\n"),
        "CONNECT {target}: {head}"
    );
    stream
}

/// Reads a response head (up to the blank line), byte by byte so nothing after it is lost.
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(WAIT, async {
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
    })
    .await
    .expect("response head in time");
    String::from_utf8_lossy(&head).into_owned()
}

/// Sends `request` raw and returns everything the proxy answers until it closes or `WAIT`.
pub async fn raw_exchange(proxy: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
    stream.write_all(request).await.expect("send");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Pushes `data` through an echo tunnel while reading the echo concurrently, half-closes, and
/// returns what came back once the far side closed.
pub async fn echo_through(stream: TcpStream, data: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(61 * 1024) {
            w.write_all(chunk).await.expect("write into tunnel");
        }
        w.shutdown().await.expect("half-close");
        w
    });
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, r.read_to_end(&mut back))
        .await
        .expect("echo completes in time")
        .expect("read from tunnel");
    let _ = writer.await;
    back
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// === Fake DNS ===

/// A UDP DNS server on 127.0.0.1:0 that answers every query NXDOMAIN, so no test ever sends a
/// query off the machine and DNS failures are immediate.
pub struct FakeDns {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FakeDns {
    pub async fn start() -> FakeDns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let addr = socket.local_addr().expect("dns addr");
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                if let Some(answer) = nxdomain(&buf[..n]) {
                    let _ = socket.send_to(&answer, peer).await;
                }
            }
        });
        FakeDns { addr, task }
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An NXDOMAIN answer to `query`: same id and question, no records.
fn nxdomain(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut end = 12;
    loop {
        let len = *query.get(end)? as usize;
        end += 1;
        if len == 0 {
            break;
        }
        end += len;
    }
    end += 4;
    if end > query.len() {
        return None;
    }
    let mut answer = Vec::with_capacity(end);
    answer.extend_from_slice(&query[..2]);
    answer.extend_from_slice(&[0x81, 0x83, 0, 1, 0, 0, 0, 0, 0, 0]);
    answer.extend_from_slice(&query[12..end]);
    Some(answer)
}

// === The binary ===

/// What happens to the binary's stdout (the access log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdout {
    /// Discarded.
    Null,
    /// Read line by line, available through [`CuttleProcess::access_lines`].
    Capture,
    /// A pipe nobody reads: it fills up and writes block.
    Stall,
}

/// The `cuttle` binary, started with a clean environment.
pub struct CuttleProcess {
    child: Child,
    pub addr: SocketAddr,
    lines: mpsc::Receiver<String>,
    access: Option<mpsc::Receiver<String>>,
    /// Access log lines received so far.
    pub access_log: Vec<String>,
    pub stderr: Vec<String>,
    _dir: tempfile::TempDir,
    _dns: FakeDns,
}

impl CuttleProcess {
    /// Starts the binary with the base environment plus `extra` and waits until it listens.
    pub async fn start(extra: &[(&str, &str)]) -> CuttleProcess {
        CuttleProcess::start_with(extra, Stdout::Null).await
    }

    /// [`CuttleProcess::start`] with a choice of what happens to stdout.
    pub async fn start_with(extra: &[(&str, &str)], stdout: Stdout) -> CuttleProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let dns = FakeDns::start().await;
        let mut env = base_env(dir.path(), dns.addr);
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_cuttle"))
            .env_clear()
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(match stdout {
                Stdout::Null => Stdio::null(),
                Stdout::Capture | Stdout::Stall => Stdio::piped(),
            })
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cuttle");
        let access = match stdout {
            Stdout::Capture => {
                let out = child.stdout.take().expect("stdout");
                let (tx, rx) = mpsc::channel();
                std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                });
                Some(rx)
            }
            _ => None,
        };
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut process = CuttleProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            lines,
            access,
            access_log: Vec::new(),
            stderr: Vec::new(),
            _dir: dir,
            _dns: dns,
        };
        let line = process.wait_for_line("cuttle listening");
        // Text (`listen=ADDR`) or JSON (`"listen":"ADDR"`) diagnostics.
        let addr = line
            .split([' ', ','])
            .find_map(|field| {
                field
                    .strip_prefix("listen=")
                    .or_else(|| field.strip_prefix("\"listen\":"))
            })
            .and_then(|a| a.trim_matches('"').parse().ok())
            .unwrap_or_else(|| panic!("no listen address in {line:?}"));
        process.addr = addr;
        process
    }

    /// Waits (up to `WAIT`) until at least `n` access log lines arrived; returns them all.
    pub fn access_lines(&mut self, n: usize) -> Vec<String> {
        let rx = self.access.as_ref().expect("stdout captured");
        let deadline = Instant::now() + WAIT;
        while self.access_log.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match rx.recv_timeout(left) {
                Ok(line) => self.access_log.push(line),
                Err(_) => break,
            }
        }
        assert!(
            self.access_log.len() >= n,
            "expected {n} access log lines, got {:?}",
            self.access_log
        );
        self.access_log.clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (up to `WAIT`) for a stderr line containing `needle`; returns it.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        if let Some(line) = self.stderr.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stderr.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no stderr line with {needle:?}; got {:?}", self.stderr);
    }

    /// Sends a signal (`TERM`, `INT`, `HUP`) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The kernel's peak resident set size of the process, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmHWM")
    }
}

impl Drop for CuttleProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary with exactly `env` (nothing inherited) and expects it to exit on its own;
/// returns the exit code and stderr.
pub fn run_to_exit(env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cuttle"))
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cuttle");
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("cuttle with {env:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("output");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Streams `total` bytes of [`pattern`] as a request body in uneven chunks.
pub fn streamed_body(total: u64) -> reqwest::Body {
    let chunks = futures_util::stream::unfold(0u64, move |sent| async move {
        if sent >= total {
            return None;
        }
        let len = (total - sent).min(40_000 + sent % 30_000);
        Some((
            Ok::<_, std::io::Error>(pattern(sent, len as usize)),
            sent + len,
        ))
    });
    reqwest::Body::wrap_stream(chunks.boxed())
}
