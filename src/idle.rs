//! Idle detection: an activity clock on a client connection (a timestamp, not a byte count),
//! and [`watched`], which runs a connection beside its watchdog.
//!
//! The client socket (`crate::server::ClientStream`) stamps [`Activity::touch`] on every read
//! or write that moved bytes; [`Activity::idle`] completes once nothing moved for the idle
//! timeout. The same clock covers a keep-alive connection and, after `CONNECT`, the tunnel
//! running over it (the upgraded stream still reads and writes through the same socket
//! wrapper, and the splice relay stamps the clock itself), so one mechanism enforces
//! `CUTTLE_IDLE_TIMEOUT` on both.
//!
//! A request waiting for its response head holds a [`Busy`] mark: the connection is not idle
//! meanwhile, because the wait has its own deadline on the same clock
//! ([`Activity::quiet_for`], the 504 of `crate::forward`), which must answer before the
//! connection is closed. When the mark goes, the clock is stamped, so the idle timeout runs
//! from the end of the wait at the earliest.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use tokio::time::Instant;

/// When bytes last moved on a connection, and whether a request is waiting for its answer.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    /// Milliseconds since `base` of the last activity.
    last_ms: AtomicU64,
    /// Requests waiting for their response head.
    busy: AtomicUsize,
}

impl Activity {
    /// A clock that starts now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        })
    }

    /// Records activity now.
    pub fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Marks a request waiting for its response head until the mark is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Completes once nothing moved for `timeout`, whatever requests wait.
    pub async fn quiet_for(&self, timeout: Duration) {
        loop {
            let deadline = self.last() + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// Completes once nothing moved for `timeout` and no request is waiting for its response
    /// head (see the module docs).
    pub async fn idle(&self, timeout: Duration) {
        loop {
            self.quiet_for(timeout).await;
            if self.busy.load(Ordering::Relaxed) == 0 {
                return;
            }
            // The wait ends with its own answer; look again a timeout from now at the latest.
            tokio::time::sleep(timeout).await;
        }
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A request waiting for its response head (see [`Activity::busy`]).
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs `main` with a watchdog beside it (`side`: timeouts, drain and stop signals), polling
/// the watchdog only when its own waker fired. A connection's task wakes several times per
/// request; polling its timers and cancellation tokens on every one of those wake-ups (as a
/// `select!` does) costs more than the work they guard.
pub fn watched<M, S>(main: M, side: S) -> Watched<M, S>
where
    M: Future + Unpin,
    S: Future + Unpin,
{
    Watched {
        main,
        side,
        wake: Arc::new(SideWake {
            // The watchdog is polled on the first poll, to arm it.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        }),
    }
}

/// Which of the two completed first.
#[derive(Debug, PartialEq, Eq)]
pub enum First<A, B> {
    Main(A),
    Side(B),
}

/// The future of [`watched`].
pub struct Watched<M, S> {
    main: M,
    side: S,
    wake: Arc<SideWake>,
}

/// The watchdog's waker: notes that the watchdog has something to look at, then wakes the task.
struct SideWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<M, S> Future for Watched<M, S>
where
    M: Future + Unpin,
    S: Future + Unpin,
{
    type Output = First<M::Output, S::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.wake.task.register(cx.waker());
        if let Poll::Ready(out) = Pin::new(&mut this.main).poll(cx) {
            return Poll::Ready(First::Main(out));
        }
        if this.wake.woken.swap(false, Ordering::AcqRel) {
            let waker = Waker::from(this.wake.clone());
            let mut side_cx = Context::from_waker(&waker);
            if let Poll::Ready(out) = Pin::new(&mut this.side).poll(&mut side_cx) {
                return Poll::Ready(First::Side(out));
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_fires_after_quiet_period_and_touch_postpones_it() {
        let activity = Activity::new();
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        activity.touch();
        activity.idle(Duration::from_secs(10)).await;
        assert!(
            start.elapsed() >= Duration::from_secs(15),
            "{:?}",
            start.elapsed()
        );
    }

    /// The watchdog fires through its own waker while the main future keeps waking the task
    /// (every 10 ms), and the main future's result wins when it comes first.
    #[tokio::test(start_paused = true)]
    async fn watchdog_fires_beside_a_busy_main_future() {
        let busy = Box::pin(async {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
            }
        });
        let timeout = Box::pin(tokio::time::sleep(Duration::from_secs(3)));
        let start = Instant::now();
        let first = tokio::time::timeout(Duration::from_secs(60), watched(busy, timeout)).await;
        assert_eq!(first, Ok(First::Side(())), "the watchdog never fired");
        assert_eq!(start.elapsed(), Duration::from_secs(3));

        let quick = Box::pin(async { 7 });
        let never = Box::pin(std::future::pending::<()>());
        assert_eq!(watched(quick, never).await, First::Main(7));

        let slow = Box::pin(async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            "done"
        });
        let later = Box::pin(tokio::time::sleep(Duration::from_secs(2)));
        assert_eq!(watched(slow, later).await, First::Main("done"));
    }

    /// While a request waits for its response, the connection is not idle (the wait's own
    /// `quiet_for` deadline fires on time); the idle timeout then runs from the end of the wait.
    #[tokio::test(start_paused = true)]
    async fn busy_connection_is_not_idle_and_the_clock_restarts_after() {
        let activity = Activity::new();
        let start = Instant::now();
        let busy = activity.busy();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move {
                activity.idle(Duration::from_secs(10)).await;
                Instant::now()
            }
        });
        activity.quiet_for(Duration::from_secs(10)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!idle.is_finished(), "idle while a request waits");
        drop(busy);
        let idle_at = idle.await.unwrap();
        assert_eq!(idle_at - start, Duration::from_secs(25));
    }
}
