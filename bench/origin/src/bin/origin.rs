//! A fast local origin for `bench/peers.sh`, on one loopback address per process.
//!
//! ```text
//! origin ADDR          HTTP/1.1: any request gets 200 with a 1 KiB body, keep-alive
//! origin --tcp ADDR    raw TCP echo (the far end of CONNECT tunnels)
//! origin --sink ADDR   bulk sink/source: frames of `U|D` + u64 length (big endian);
//!                      `U`: read that many bytes, answer one byte `k`;
//!                      `D`: send that many bytes
//!                      (a TLS record first on the connection, e.g. a ClientHello, is skipped)
//! ```
//!
//! Refuses to bind anything but a loopback address: the benchmark never leaves the machine.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Response body size of the HTTP mode.
const BODY: usize = 1024;
/// Chunk size of the echo and sink loops.
const CHUNK: usize = 64 * 1024;

enum Mode {
    Http,
    Echo,
    Sink,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, addr) = match args.as_slice() {
        [addr] => (Mode::Http, addr),
        [flag, addr] if flag == "--tcp" => (Mode::Echo, addr),
        [flag, addr] if flag == "--sink" => (Mode::Sink, addr),
        _ => {
            eprintln!("usage: origin [--tcp|--sink] 127.0.0.1:PORT");
            return ExitCode::from(2);
        }
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("origin: {addr:?} is not IP:PORT: {e}");
            return ExitCode::from(2);
        }
    };
    if !addr.ip().is_loopback() {
        eprintln!("origin: {addr} is not a loopback address");
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("origin: cannot listen on {addr}: {e}");
                return ExitCode::from(1);
            }
        };
        let body = Bytes::from(vec![b'x'; BODY]);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            match mode {
                Mode::Http => {
                    let body = body.clone();
                    tokio::spawn(serve_http(stream, body));
                }
                Mode::Echo => {
                    tokio::spawn(echo(stream));
                }
                Mode::Sink => {
                    tokio::spawn(sink(stream));
                }
            }
        }
    })
}

async fn serve_http(stream: TcpStream, body: Bytes) {
    let service = service_fn(move |_req: Request<Incoming>| {
        let body = body.clone();
        async move {
            let mut response = Response::new(Full::new(body));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain"),
            );
            Ok::<_, Infallible>(response)
        }
    });
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn echo(mut stream: TcpStream) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
}

async fn sink(mut stream: TcpStream) {
    let mut buf = vec![0u8; CHUNK];
    let mut first = true;
    loop {
        let mut head = [0u8; 9];
        if stream.read_exact(&mut head[..1]).await.is_err() {
            break;
        }
        if std::mem::take(&mut first) && head[0] == 0x16 {
            // A TLS record (the client's ClientHello for an SNI-checking proxy): skip it.
            let mut record = [0u8; 4];
            if stream.read_exact(&mut record).await.is_err() {
                break;
            }
            let len = u16::from_be_bytes([record[2], record[3]]) as usize;
            if stream.read_exact(&mut buf[..len]).await.is_err() {
                break;
            }
            continue;
        }
        if stream.read_exact(&mut head[1..]).await.is_err() {
            break;
        }
        let mut left = u64::from_be_bytes(head[1..].try_into().expect("8 bytes"));
        let ok = match head[0] {
            b'U' => {
                while left > 0 {
                    let want = left.min(CHUNK as u64) as usize;
                    match stream.read(&mut buf[..want]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => left -= n as u64,
                    }
                }
                stream.write_all(b"k").await.is_ok()
            }
            b'D' => {
                let mut ok = true;
                while left > 0 && ok {
                    let n = left.min(CHUNK as u64) as usize;
                    ok = stream.write_all(&buf[..n]).await.is_ok();
                    left -= n as u64;
                }
                ok
            }
            _ => false,
        };
        if !ok {
            break;
        }
    }
    let _ = stream.shutdown().await;
}
