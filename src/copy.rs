//! Relaying a tunnel's bytes between two TCP sockets.
//!
//! [`Relay`] is one hand-written future for both directions, polling socket readiness
//! directly: an idle tunnel's relay state is a few hundred bytes, with no buffer, pipe or
//! stored sub-future of its own.
//!
//! Every direction starts with a burst copy through the worker thread's scratch buffer: read
//! what is ready, write it straight on. A tunnel that exchanges a few small messages (a TLS
//! handshake, a request, a response) costs two system calls per message. Bytes the destination
//! cannot take at once are copied into a buffer of their own, freed once written. When a read
//! fills the scratch buffer the direction carries bulk data, and on Linux it moves to
//! `splice(2)`: socket → pipe → socket through `nix`'s safe wrapper, the kernel moving pages
//! instead of copying them twice through user space. Elsewhere the burst copy continues.
//!
//! Each direction ends at end of stream: the write half of the other socket is shut down (the
//! half-close is passed on) and the other direction keeps flowing until it ends too. Every
//! transfer is counted and stamps the connection's activity clock (`CUTTLE_IDLE_TIMEOUT`).

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::net::TcpStream;

use crate::idle::Activity;
use crate::transaction::ByteCounter;

/// Size of the scratch buffer: the most one read moves in the burst copy.
const CHUNK: usize = 64 * 1024;

thread_local! {
    /// The burst copy's buffer: one per thread, never held across a wait.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; CHUNK].into_boxed_slice());
}

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

/// Relays between `client` and `upstream` until both directions have ended; resolves to the
/// bytes moved client → upstream and upstream → client.
pub fn relay<'a>(
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    up: Meter,
    down: Meter,
) -> Relay<'a> {
    Relay {
        client,
        upstream,
        up: Flow::new(up),
        down: Flow::new(down),
    }
}

/// The future of [`relay`].
pub struct Relay<'a> {
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    up: Flow,
    down: Flow,
}

impl Relay<'_> {
    /// Bytes the client sent before the relay started: they go upstream first.
    pub fn with_early(mut self, bytes: Vec<u8>) -> Self {
        if !bytes.is_empty() {
            self.up.state = State::Pending { bytes, written: 0 };
        }
        self
    }
}

impl Future for Relay<'_> {
    type Output = io::Result<(u64, u64)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let up = this
            .up
            .poll(this.client, this.upstream, this.down.is_done(), cx)?;
        let down = this
            .down
            .poll(this.upstream, this.client, this.up.is_done(), cx)?;
        match (up, down) {
            (Poll::Ready(up), Poll::Ready(down)) => Poll::Ready(Ok((up, down))),
            _ => Poll::Pending,
        }
    }
}

/// One direction.
struct Flow {
    meter: Meter,
    moved: u64,
    state: State,
}

enum State {
    /// Reading into the scratch buffer and writing straight on.
    Burst,
    /// Bytes read that the destination has not taken yet.
    Pending { bytes: Vec<u8>, written: usize },
    /// Bulk: through a pipe (boxed: only directions that carry bulk pay for it).
    #[cfg(target_os = "linux")]
    Splice(Box<splice::Pipe>),
    /// End of stream seen and passed on.
    Done,
}

/// The result of one burst step.
enum Step {
    Eof,
    /// Read and fully written.
    Moved(usize),
    /// Read; only `written` bytes taken by the destination, the rest is here.
    Partial {
        written: usize,
        rest: Vec<u8>,
    },
    NotReady,
}

impl Flow {
    fn new(meter: Meter) -> Flow {
        Flow {
            meter,
            moved: 0,
            state: State::Burst,
        }
    }

    fn moved(&mut self, n: usize) {
        self.moved += n as u64;
        self.meter.moved(n);
    }

    fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Moves what can be moved now; ready with the total once the direction has ended.
    /// `last`: the other direction has ended, so this one's end ends the relay.
    fn poll(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        last: bool,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<u64>> {
        loop {
            match &mut self.state {
                State::Done => return Poll::Ready(Ok(self.moved)),
                State::Burst => {
                    ready!(src.poll_read_ready(cx))?;
                    match burst(src, dst)? {
                        Step::NotReady => {}
                        Step::Eof => self.finish(dst, last),
                        Step::Moved(n) => {
                            self.moved(n);
                            #[cfg(target_os = "linux")]
                            if n == CHUNK {
                                self.state = State::Splice(Box::default());
                            }
                        }
                        Step::Partial { written, rest } => {
                            self.moved(written);
                            self.state = State::Pending {
                                bytes: rest,
                                written: 0,
                            };
                        }
                    }
                }
                State::Pending { bytes, written } => {
                    ready!(dst.poll_write_ready(cx))?;
                    match dst.try_write(&bytes[*written..]) {
                        Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                        Ok(n) => {
                            *written += n;
                            if *written == bytes.len() {
                                let total = bytes.len();
                                self.state = State::Burst;
                                self.moved(total);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                #[cfg(target_os = "linux")]
                State::Splice(pipe) => {
                    ready!(pipe.poll(src, dst, cx, &self.meter, &mut self.moved))?;
                    self.finish(dst, last);
                }
            }
        }
    }

    /// End of stream: the half-close is passed on (the peer may already be gone; the other
    /// direction will notice). When it is the `last` direction to end, the relay is over and
    /// both sockets are about to be closed, which sends the FIN: one system call less.
    fn finish(&mut self, dst: &TcpStream, last: bool) {
        if !last {
            let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
        }
        self.state = State::Done;
    }
}

/// Reads what is ready into the scratch buffer and writes as much of it as `dst` takes now.
fn burst(src: &TcpStream, dst: &TcpStream) -> io::Result<Step> {
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
                    return Ok(Step::Partial {
                        written,
                        rest: buf[written..n].to_vec(),
                    })
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Step::Moved(n))
    })
}

#[cfg(target_os = "linux")]
mod splice {
    //! splice(2) through a pipe, for bulk transfers.

    use std::io;
    use std::os::fd::OwnedFd;
    use std::task::{Context, Poll};

    use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{Meter, CHUNK};

    fn flags() -> SpliceFFlags {
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
    }

    /// Pipe size asked for (`/proc/sys/fs/pipe-max-size` is 1 MiB by default): 16 times fewer
    /// splices per byte than the default 64 KiB pipe.
    const BULK_PIPE: usize = 1024 * 1024;

    /// One direction's pipe, created on first use.
    #[derive(Default)]
    pub struct Pipe {
        fds: Option<(OwnedFd, OwnedFd)>,
        capacity: usize,
        /// Bytes in the pipe, not yet written to the destination.
        pending: usize,
        eof: bool,
    }

    impl Pipe {
        /// Moves bytes src → pipe → dst, reading while earlier bytes are still being written,
        /// so neither socket waits on the other. Ready at end of stream, once the pipe is empty.
        pub fn poll(
            &mut self,
            src: &TcpStream,
            dst: &TcpStream,
            cx: &mut Context<'_>,
            meter: &Meter,
            moved: &mut u64,
        ) -> Poll<io::Result<()>> {
            if self.fds.is_none() {
                let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
                // Best effort: a limit on pipe memory just keeps the default size.
                self.capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(BULK_PIPE as i32))
                    .ok()
                    .and_then(|size| usize::try_from(size).ok())
                    .unwrap_or(CHUNK)
                    .max(CHUNK);
                self.fds = Some((read, write));
            }
            let Some((pipe_r, pipe_w)) = &self.fds else {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            };
            loop {
                if self.eof && self.pending == 0 {
                    return Poll::Ready(Ok(()));
                }
                // Anything done (or a readiness that turned out stale) means look again: a
                // wait is only registered by a readiness poll that returns Pending.
                let mut again = false;
                if !self.eof && self.pending < self.capacity {
                    if let Poll::Ready(ready) = src.poll_read_ready(cx) {
                        ready?;
                        again = true;
                        let room = self.capacity - self.pending;
                        match src.try_io(Interest::READABLE, || {
                            splice(src, None, pipe_w, None, room, flags()).map_err(io::Error::from)
                        }) {
                            Ok(0) => self.eof = true,
                            Ok(n) => self.pending += n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                }
                if self.pending > 0 {
                    if let Poll::Ready(ready) = dst.poll_write_ready(cx) {
                        ready?;
                        again = true;
                        match dst.try_io(Interest::WRITABLE, || {
                            splice(pipe_r, None, dst, None, self.pending, flags())
                                .map_err(io::Error::from)
                        }) {
                            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                            Ok(n) => {
                                self.pending -= n;
                                *moved += n as u64;
                                meter.moved(n);
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                }
                if !again {
                    return Poll::Pending;
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
        let (up, down) = meters();
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
        let metrics = Arc::new(Metrics::new());
        let observer = Arc::new(Observer {
            access_log: crate::access_log::AccessLog::start(
                crate::settings::AccessLogFormat::Off,
                tokio::io::sink(),
                metrics.access_log_dropped.clone(),
            ),
            metrics,
        });
        let tx = Transaction::begin(
            observer,
            crate::client_acl::ClientAddr::new("127.0.0.1:1".parse().unwrap()),
            &http::Method::CONNECT,
            "x:1".into(),
        );
        let activity = Activity::new();
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
