//! Relaying a tunnel's bytes between two TCP sockets.
//!
//! Every direction starts with a burst copy through the worker thread's scratch buffer: read
//! what is ready, write it straight on. A tunnel that exchanges a few small messages (a TLS
//! handshake, a request, a response) costs two system calls per message and holds no buffer or
//! pipe of its own. When a read fills the scratch buffer the direction carries bulk data, and on
//! Linux it moves to `splice(2)`: socket → pipe → socket through `nix`'s safe wrapper, the
//! kernel moving pages instead of copying them twice through user space. Elsewhere the burst
//! copy simply continues.
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
    let moved = match burst::pump(src, dst, &meter).await? {
        burst::Ended::Eof(moved) => moved,
        // Bulk: the rest goes through the kernel-side copy.
        #[cfg(target_os = "linux")]
        burst::Ended::Bulk(moved) => moved + splice::pump(src, dst, &meter).await?,
    };
    // The peer may already be gone; the other direction will notice.
    let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
    Ok(moved)
}

mod burst {
    //! The start of every direction: bytes are read into this thread's scratch buffer and
    //! written straight on, so a tunnel that exchanges a few small messages (most of them: a
    //! TLS handshake, a request, a response) costs two system calls per message and no pipe or
    //! buffer of its own. A read that fills the scratch buffer means bulk data: the caller
    //! switches to the kernel-side copy (splice) from then on.
    //!
    //! The scratch buffer is never held across an await, so an idle tunnel holds no buffer;
    //! only bytes the destination cannot take at once are copied into a buffer of their own
    //! (and freed as soon as they are written).

    use std::cell::RefCell;
    use std::io;

    use tokio::net::TcpStream;

    use super::{write_all, Meter, CHUNK};

    thread_local! {
        static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; CHUNK].into_boxed_slice());
    }

    pub enum Ended {
        /// End of stream after this many bytes.
        Eof(u64),
        /// This many bytes moved, and more are waiting: bulk transfer.
        #[cfg(target_os = "linux")]
        Bulk(u64),
    }

    enum Step {
        Eof,
        /// Read and fully written.
        Moved(usize),
        /// Read; only part written, the rest is here.
        Partial(usize, Vec<u8>),
        NotReady,
    }

    /// Reads what is ready and writes as much of it as the destination takes now.
    fn step(src: &TcpStream, dst: &TcpStream) -> io::Result<Step> {
        SCRATCH.with(|scratch| {
            let mut guard = scratch.borrow_mut();
            let buf = &mut guard[..];
            let n = match src.try_read(buf) {
                Ok(0) => return Ok(Step::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::NotReady),
                Err(e) => return Err(e),
            };
            let mut written = 0;
            while written < n {
                match dst.try_write(&buf[written..n]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(w) => written += w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(Step::Partial(n, buf[written..n].to_vec()))
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(Step::Moved(n))
        })
    }

    pub async fn pump(src: &TcpStream, dst: &TcpStream, meter: &Meter) -> io::Result<Ended> {
        let mut total = 0u64;
        loop {
            src.readable().await?;
            let n = match step(src, dst)? {
                Step::NotReady => continue,
                Step::Eof => return Ok(Ended::Eof(total)),
                Step::Moved(n) => n,
                Step::Partial(n, rest) => {
                    write_all(dst, &rest).await?;
                    n
                }
            };
            total += n as u64;
            meter.moved(n);
            #[cfg(target_os = "linux")]
            if n == CHUNK {
                return Ok(Ended::Bulk(total));
            }
        }
    }
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
mod splice {
    //! splice(2) through a pipe, for bulk transfers.

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
    /// that neither socket waits on the other. The pipe is created here, once the direction
    /// has shown bulk data.
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

    /// Messages smaller than the scratch buffer, sent to a destination that cannot take them
    /// at once (tiny socket buffers, a reader that starts late): the burst copy keeps what was
    /// not written and every byte arrives in order.
    #[tokio::test]
    async fn burst_copy_survives_partial_writes() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, mut upstream) = pair().await;
        // Reads stay below the scratch size (so the copy never turns to splice) and writes
        // fill the destination's buffers.
        socket2::SockRef::from(&proxy_client)
            .set_recv_buffer_size(16 * 1024)
            .unwrap();
        socket2::SockRef::from(&proxy_upstream)
            .set_send_buffer_size(16 * 1024)
            .unwrap();
        socket2::SockRef::from(&upstream)
            .set_recv_buffer_size(64 * 1024)
            .unwrap();
        let (up, down) = meters();
        let relay =
            tokio::spawn(async move { relay(&proxy_client, &proxy_upstream, up, down).await });
        // 40 messages of 30 000 bytes, each below the scratch size, each its own burst.
        let message: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
        let expected: Vec<u8> = message.repeat(40);
        let writer = tokio::spawn(async move {
            for _ in 0..40 {
                client.write_all(&message).await.unwrap();
            }
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
        });
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 1000];
        loop {
            let n = upstream.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes arrived out of order or changed");
        drop(upstream);
        writer.await.unwrap();
        let (up, _) = relay.await.unwrap().unwrap();
        assert_eq!(up, 1_200_000);
    }

    fn meters() -> (Meter, Meter) {
        let activity = Activity::new();
        let counter = || {
            let metrics = Arc::new(Metrics::new());
            let observer = Arc::new(Observer {
                access_log: crate::access_log::AccessLog::start(
                    crate::settings::AccessLogFormat::Off,
                    tokio::io::sink(),
                    metrics.access_log_dropped.clone(),
                ),
                metrics,
            });
            Transaction::begin(
                observer,
                crate::client_acl::ClientAddr::new("127.0.0.1:1".parse().unwrap()),
                &http::Method::CONNECT,
                "x:1".into(),
            )
        };
        let tx = counter();
        (
            Meter {
                counter: tx.counter(Direction::ClientToUpstream),
                activity: activity.clone(),
            },
            Meter {
                counter: tx.counter(Direction::UpstreamToClient),
                activity,
            },
        )
    }
}
