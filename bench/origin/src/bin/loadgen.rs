//! Load generator for `bench/peers.sh`. Every command prints one `RESULT key=value ...` line.
//!
//! ```text
//! loadgen connect --to ADDR [--connect HOST:PORT] [--workers 64] [--secs 3] [--size 64]
//!     workers each loop: TCP connect to ADDR, (CONNECT HOST:PORT -> 200), write a ClientHello
//!     and SIZE bytes to the echo origin, read them back, close. Prints tunnels per second.
//! loadgen bulk --to ADDR [--connect HOST:PORT] --dir up|down [--bytes N]
//!     one connection (through one tunnel) to the sink origin; moves N bytes; prints MB/s.
//! loadgen idle --to ADDR --connect HOST:PORT --pid PID [--count 1000] [--settle-ms 500]
//!     opens COUNT tunnels to the echo origin (one small exchange each), holds them idle, and
//!     prints the VmRSS of PID before and after, and the difference per tunnel.
//! loadgen wait-port --to ADDR [--timeout-ms 5000]
//!     polls until a TCP connect to ADDR succeeds; prints that moment (µs since the epoch).
//! ```
//!
//! The first bytes a client sends through a tunnel are a minimal TLS ClientHello naming the
//! CONNECT host (no SNI for an IP literal), as a real HTTPS client's would be, so a proxy that
//! checks the SNI (cuttle's default `CUTTLE_SNI_CHECK=match`) sees the production path. The
//! echo origin sends it back; the sink origin skips it.
//!
//! Only loopback addresses are accepted for `--to`. Every loop is bounded in time.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Upper bound on any single network step, so a stuck proxy cannot hang the run.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

struct Args {
    command: String,
    flags: HashMap<String, String>,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut it = std::env::args().skip(1);
        let command = it.next().ok_or("missing command")?;
        let mut flags = HashMap::new();
        while let Some(flag) = it.next() {
            let name = flag
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {flag:?}"))?;
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            flags.insert(name.to_string(), value);
        }
        Ok(Args { command, flags })
    }

    fn get<T: std::str::FromStr>(&self, name: &str, default: Option<T>) -> Result<T, String> {
        match self.flags.get(name) {
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name}: cannot parse {v:?}")),
            None => default.ok_or_else(|| format!("--{name} is required")),
        }
    }

    fn to(&self) -> Result<SocketAddr, String> {
        let to: SocketAddr = self.get("to", None)?;
        if !to.ip().is_loopback() {
            return Err(format!("--to {to} is not a loopback address"));
        }
        Ok(to)
    }

    fn connect(&self) -> Option<String> {
        self.flags.get("connect").cloned()
    }
}

fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e} (see the module docs for usage)");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match args.command.as_str() {
            "connect" => connect_load(&args).await,
            "bulk" => bulk(&args).await,
            "idle" => idle(&args).await,
            "wait-port" => wait_port(&args).await,
            other => Err(format!("unknown command {other:?}")),
        }
    });
    match result {
        Ok(line) => {
            println!("RESULT {line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen {}: {e}", args.command);
            ExitCode::from(1)
        }
    }
}

/// Connects to `to`, and through `CONNECT authority` when given.
async fn open(to: SocketAddr, authority: Option<&str>) -> io::Result<TcpStream> {
    let mut stream = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(to))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    if let Some(authority) = authority {
        tokio::time::timeout(STEP_TIMEOUT, handshake(&mut stream, authority))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "CONNECT timed out"))??;
    }
    Ok(stream)
}

/// `CONNECT authority`, then reads the response head and checks for a 200. Nothing is sent
/// through the tunnel before the 200, so no tunnel data can be read with the head.
async fn handshake(stream: &mut TcpStream, authority: &str) -> io::Result<()> {
    let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut buf = [0u8; 2048];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "proxy closed before answering CONNECT",
            ));
        }
        len += n;
        if let Some(end) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]);
            let status = head.lines().next().unwrap_or("");
            let ok = status.split_whitespace().nth(1) == Some("200");
            if !ok || end + 4 != len {
                return Err(io::Error::other(format!("CONNECT answered {status:?}")));
            }
            return Ok(());
        }
        if len == buf.len() {
            return Err(io::Error::other("CONNECT response head too long"));
        }
    }
}

/// A minimal TLS 1.2/1.3 ClientHello record with `server_name` = `sni` (none when `None`).
fn client_hello(sni: Option<&str>) -> Vec<u8> {
    let mut body = vec![0x03, 0x03]; // legacy_version TLS 1.2
    body.extend((0..32u8).map(|i| i.wrapping_mul(37))); // random
    body.push(0); // session id
    body.extend([0x00, 0x06, 0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f]); // cipher suites
    body.extend([0x01, 0x00]); // compression: null
    let mut ext = Vec::new();
    if let Some(name) = sni {
        let n = name.len() as u16;
        ext.extend([0x00, 0x00]); // server_name
        ext.extend((n + 5).to_be_bytes());
        ext.extend((n + 3).to_be_bytes());
        ext.push(0); // host_name
        ext.extend(n.to_be_bytes());
        ext.extend(name.as_bytes());
    }
    ext.extend([0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]); // supported_versions: TLS 1.3
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut handshake = vec![0x01];
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

/// The ClientHello for a CONNECT `authority` (`host:port`): SNI unless the host is an IP.
fn hello_for(authority: Option<&str>) -> Vec<u8> {
    let host = authority
        .and_then(|a| a.rsplit_once(':'))
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'));
    let sni = host.filter(|h| h.parse::<std::net::IpAddr>().is_err());
    client_hello(sni)
}

/// Writes `payload`, reads the same number of bytes back from the echo origin.
async fn exchange(stream: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    stream.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await?;
    if back != payload {
        return Err(io::Error::other("echo mismatch"));
    }
    Ok(())
}

async fn connect_load(args: &Args) -> Result<String, String> {
    let to = args.to()?;
    let authority = args.connect();
    let workers: usize = args.get("workers", Some(64))?;
    let secs: f64 = args.get("secs", Some(3.0))?;
    let size: usize = args.get("size", Some(64))?;
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let (ok, errors, first_error) = (ok.clone(), errors.clone(), first_error.clone());
        let authority = authority.clone();
        let mut payload = hello_for(authority.as_deref());
        payload.extend((0..size).map(|i| b'a' + ((i + w) % 26) as u8));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let attempt = async {
                    let mut stream = open(to, authority.as_deref()).await?;
                    tokio::time::timeout(STEP_TIMEOUT, exchange(&mut stream, &payload))
                        .await
                        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "echo timed out"))?
                };
                match attempt.await {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error
                            .lock()
                            .expect("lock")
                            .get_or_insert_with(|| e.to_string());
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    let errors = errors.load(Ordering::Relaxed);
    if let Some(e) = first_error.lock().expect("lock").as_ref() {
        eprintln!("loadgen connect: {errors} errors, first: {e}");
    }
    Ok(format!(
        "ok={ok} errors={errors} secs={elapsed:.3} rate={:.1}",
        ok as f64 / elapsed
    ))
}

async fn bulk(args: &Args) -> Result<String, String> {
    let to = args.to()?;
    let authority = args.connect();
    let bytes: u64 = args.get("bytes", Some(1 << 30))?;
    let dir: String = args.get("dir", Some("down".to_string()))?;
    let op = match dir.as_str() {
        "up" => b'U',
        "down" => b'D',
        _ => return Err(format!("--dir {dir:?}: expected up or down")),
    };
    let mut stream = open(to, authority.as_deref())
        .await
        .map_err(|e| format!("open: {e}"))?;
    let mut head = hello_for(authority.as_deref());
    head.push(op);
    head.extend(bytes.to_be_bytes());
    // Generous bound for the whole transfer: 1 GiB at 50 MB/s.
    let limit = Duration::from_secs(5) + Duration::from_secs_f64(bytes as f64 / 50e6);
    let start = Instant::now();
    let transfer = async {
        stream.write_all(&head).await?;
        let mut buf = vec![0x5au8; 256 * 1024];
        let mut left = bytes;
        if op == b'U' {
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                stream.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            let mut ack = [0u8; 1];
            stream.read_exact(&mut ack).await?;
        } else {
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                let n = stream.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "short download",
                    ));
                }
                left -= n as u64;
            }
        }
        Ok::<(), io::Error>(())
    };
    tokio::time::timeout(limit, transfer)
        .await
        .map_err(|_| format!("transfer did not finish within {limit:?}"))?
        .map_err(|e| format!("transfer: {e}"))?;
    let secs = start.elapsed().as_secs_f64();
    Ok(format!(
        "bytes={bytes} secs={secs:.3} mbps={:.1}",
        bytes as f64 / secs / 1e6
    ))
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

async fn idle(args: &Args) -> Result<String, String> {
    let to = args.to()?;
    let authority = args.connect().ok_or("--connect is required")?;
    let pid: u32 = args.get("pid", None)?;
    let count: usize = args.get("count", Some(1000))?;
    let settle = Duration::from_millis(args.get("settle-ms", Some(500))?);
    let before = rss_kib(pid)?;
    let gate = Arc::new(Semaphore::new(32));
    let hello = Arc::new(hello_for(Some(&authority)));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let gate = gate.clone();
        let authority = authority.clone();
        let hello = hello.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            let mut stream = open(to, Some(&authority)).await?;
            tokio::time::timeout(STEP_TIMEOUT, exchange(&mut stream, &hello))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "echo timed out"))??;
            Ok::<TcpStream, io::Error>(stream)
        }));
    }
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    for task in tasks {
        match task.await {
            Ok(Ok(stream)) => held.push(stream),
            Ok(Err(e)) => {
                if failed == 0 {
                    eprintln!("loadgen idle: tunnel failed: {e}");
                }
                failed += 1;
            }
            Err(e) => return Err(format!("task: {e}")),
        }
    }
    tokio::time::sleep(settle).await;
    let after = rss_kib(pid)?;
    let open = held.len();
    drop(held);
    if open == 0 {
        return Err("no tunnel could be opened".into());
    }
    let per = (after as f64 - before as f64) / open as f64;
    Ok(format!(
        "open={open} failed={failed} before_kib={before} after_kib={after} per_tunnel_kib={per:.2}"
    ))
}

async fn wait_port(args: &Args) -> Result<String, String> {
    let to = args.to()?;
    let timeout = Duration::from_millis(args.get("timeout-ms", Some(5000))?);
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect(to).await.is_ok() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            return Ok(format!("epoch_us={}", now.as_micros()));
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Err(format!("{to} did not accept within {timeout:?}"))
}
