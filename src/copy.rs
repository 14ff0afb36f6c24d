//! Relaying a tunnel's bytes between two TCP sockets.
//!
//! On Linux the bytes never enter user space: each direction moves them socket → pipe → socket
//! with `splice(2)` (through `nix`'s safe wrapper). A pipe is created only when its direction
//! first has data, so an idle tunnel holds no buffer at all, and the kernel moves pages instead
//! of copying them twice through a user-space buffer. Elsewhere a buffered copy is used, its
//! buffer also taken only once data is ready.
//!
//! Each direction ends at end of stream: the write half of the other socket is shut down (the
//! half-close is passed on) and the other direction keeps flowing until it ends too. Every
//! transfer is counted and stamps the connection's activity clock (`CUTTLE_IDLE_TIMEOUT`).

use std::io;
use std::net::Shutdown;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::idle::Activity;
use crate::transaction::ByteCounter;

/// Largest amount moved by one splice or read.
const CHUNK: usize = 64 * 1024;

/// What a direction reports as it moves bytes.
#[derive(Clone)]
pub struct Meter {
    pub counter: ByteCounter,
    pub activity: Arc<Activity>,
}

impl Meter {
    fn moved(&self, n: usize) {
        self.counter.add(n);
        self.activity.touch();
    }
}

/// Relays between `client` and `upstream` until both directions have ended. Returns the bytes
/// moved client → upstream and upstream → client.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    up: Meter,
    down: Meter,
) -> io::Result<(u64, u64)> {
    tokio::try_join!(pump(client, upstream, up), pump(upstream, client, down))
}

/// One direction, until end of stream; then the half-close is passed on.
async fn pump(src: &TcpStream, dst: &TcpStream, meter: Meter) -> io::Result<u64> {
    let moved = imp::pump(src, dst, &meter).await?;
    // The peer may already be gone; the other direction will notice.
    let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
    Ok(moved)
}

/// Writes all of `bytes` to `dst` (data that arrived before the relay started).
pub async fn write_all(dst: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        dst.writable().await?;
        match dst.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
mod imp {
    //! splice(2) through a pipe.

    use std::io;
    use std::os::fd::OwnedFd;

    use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{Meter, CHUNK};

    fn flags() -> SpliceFFlags {
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
    }

    /// Pipe size once a direction turns out to carry bulk data (`/proc/sys/fs/pipe-max-size`
    /// is 1 MiB by default): 16 times fewer splices per byte than the default 64 KiB pipe.
    const BULK_PIPE: usize = 1024 * 1024;

    /// Moves bytes src → pipe → dst, reading while earlier bytes are still being written, so
    /// that neither socket waits on the other.
    pub async fn pump(src: &TcpStream, dst: &TcpStream, meter: &Meter) -> io::Result<u64> {
        let mut pipe: Option<(OwnedFd, OwnedFd)> = None;
        let mut capacity = CHUNK;
        let mut pending = 0usize;
        let mut eof = false;
        let mut total = 0u64;
        loop {
            if eof && pending == 0 {
                return Ok(total);
            }
            let room = !eof && pending < capacity;
            tokio::select! {
                ready = src.readable(), if room => {
                    ready?;
                    // Created on first data: an idle direction holds no pipe.
                    if pipe.is_none() {
                        pipe = Some(nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?);
                    }
                    let Some((_, pipe_w)) = &pipe else { continue };
                    // The pipe has room for what is asked, so WouldBlock means no data.
                    match src.try_io(Interest::READABLE, || {
                        splice(src, None, pipe_w, None, capacity - pending, flags()).map_err(io::Error::from)
                    }) {
                        Ok(0) => eof = true,
                        Ok(n) => {
                            pending += n;
                            // A full pipe means bulk transfer: grow it once (best effort; a
                            // limit on pipe memory just keeps the default size).
                            if pending == capacity && capacity < BULK_PIPE {
                                if let Ok(size) = fcntl(pipe_w, FcntlArg::F_SETPIPE_SZ(BULK_PIPE as i32)) {
                                    capacity = usize::try_from(size).unwrap_or(CHUNK).max(CHUNK);
                                }
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                ready = dst.writable(), if pending > 0 => {
                    ready?;
                    let Some((pipe_r, _)) = &pipe else { continue };
                    match dst.try_io(Interest::WRITABLE, || {
                        splice(pipe_r, None, dst, None, pending, flags()).map_err(io::Error::from)
                    }) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => {
                            pending -= n;
                            total += n as u64;
                            meter.moved(n);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    //! A buffered copy, the buffer taken once data is ready.

    use std::io;

    use tokio::net::TcpStream;

    use super::{write_all, Meter, CHUNK};

    pub async fn pump(src: &TcpStream, dst: &TcpStream, meter: &Meter) -> io::Result<u64> {
        let mut buf: Vec<u8> = Vec::new();
        let mut total = 0u64;
        loop {
            src.readable().await?;
            if buf.is_empty() {
                buf = vec![0u8; CHUNK];
            }
            let n = match src.try_read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            write_all(dst, &buf[..n]).await?;
            total += n as u64;
            meter.moved(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Direction, Metrics};
    use crate::transaction::{Observer, Transaction};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (b, _) = listener.accept().await.unwrap();
        (a, b)
    }

    /// Bytes cross intact both ways, half-closes are passed on, and the counts are right.
    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, mut upstream) = pair().await;
        let metrics = Arc::new(Metrics::new());
        let observer = Arc::new(Observer {
            access_log: crate::access_log::AccessLog::start(
                crate::settings::AccessLogFormat::Off,
                tokio::io::sink(),
                metrics.access_log_dropped.clone(),
            ),
            metrics: metrics.clone(),
        });
        let tx = Transaction::begin(
            observer,
            crate::client_acl::ClientAddr::new("127.0.0.1:1".parse().unwrap()),
            &http::Method::CONNECT,
            "x:1".into(),
        );
        let activity = Activity::new();
        let up = Meter {
            counter: tx.counter(Direction::ClientToUpstream),
            activity: activity.clone(),
        };
        let down = Meter {
            counter: tx.counter(Direction::UpstreamToClient),
            activity,
        };
        let relay =
            tokio::spawn(async move { relay(&proxy_client, &proxy_upstream, up, down).await });

        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "upstream got different bytes");
        upstream.write_all(b"reply after half-close").await.unwrap();
        upstream.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after half-close");
        let (up, down) = relay.await.unwrap().unwrap();
        assert_eq!((up, down), (3_000_000, 22));
    }
}
