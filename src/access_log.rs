//! The access log: one line per request or tunnel when it ends, on stdout.
//!
//! Formats: Squid's native `logformat squid`
//! (`%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`) so that existing Squid log
//! parsers read it unchanged, or one JSON object a line.
//!
//! In report mode a request the allowlist refuses but lets through is logged with the result
//! code of what happened (`TCP_TUNNEL`, `TCP_MISS`) suffixed `_WOULD_DENY`, the way Squid
//! suffixes its own variants (`TCP_MISS_ABORTED`): still one `[A-Z_]+/NNN` token for Squid log
//! parsers, never `TCP_DENIED` (it was not refused). The JSON line says `"decision":
//! "would_deny"`.
//!
//! Lines never hold up traffic: the request path formats its line (on its own thread, into a
//! reused buffer, so the record's strings are freed where they were allocated), appends it to
//! a bounded queue of text and returns. Only the line that finds the queue empty wakes the
//! writer task, which lets 10 ms of lines gather, then takes the whole text and writes it in
//! one go: one wake-up and one write per batch, none while idle, and small batches (a long one
//! holds a core in one go, which shows in the latency of requests waiting for it). When the
//! queue is full (stdout cannot keep up), the line is dropped and counted in
//! `cuttle_access_log_dropped_total`.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::metrics::{Kind, Outcome, Reason};
use crate::settings::AccessLogFormat;

/// Lines waiting for the writer; past this, lines are dropped.
const QUEUE: usize = 4096;
/// Bytes waiting for the writer (long URLs); past this, lines are dropped.
const QUEUE_BYTES: usize = 4 << 20;

/// One finished request or tunnel.
#[derive(Clone, Debug)]
pub struct Record {
    /// When it ended.
    pub end: SystemTime,
    pub duration: Duration,
    pub client: IpAddr,
    pub kind: Kind,
    pub method: String,
    /// `host:port` for CONNECT, the absolute URI for plain HTTP, the path for local requests.
    pub url: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub status: u16,
    pub outcome: Outcome,
    pub reason: Reason,
    /// The rule that allowed it (`.us-west-2.amazonaws.com (AWS_REGIONS=us-west-2)`).
    pub rule: Option<String>,
    /// Bytes from the client to the upstream (request body or tunnel data).
    pub bytes_up: u64,
    /// Bytes sent to the client (response body or tunnel data).
    pub bytes_down: u64,
    pub upstream: Option<SocketAddr>,
    pub dns: Option<Duration>,
    pub connect: Option<Duration>,
    pub content_type: Option<String>,
}

impl Record {
    /// Squid's result code (`%Ss`).
    pub fn squid_code(&self) -> &'static str {
        match (self.outcome, self.kind) {
            (Outcome::Denied, _) => "TCP_DENIED",
            (_, Kind::Local) => "NONE",
            (Outcome::Error, _)
                if self.reason == Reason::BadRequest || self.reason == Reason::NotImplemented =>
            {
                "NONE"
            }
            (Outcome::WouldDeny, Kind::Connect) => "TCP_TUNNEL_WOULD_DENY",
            (Outcome::WouldDeny, _) => "TCP_MISS_WOULD_DENY",
            (_, Kind::Connect) => "TCP_TUNNEL",
            (_, Kind::Http) => "TCP_MISS",
        }
    }

    /// The line in Squid's native format (no newline).
    pub fn squid_line(&self) -> String {
        let mut line = String::with_capacity(160);
        self.write_squid_line(&mut line);
        line
    }

    /// Appends the Squid line to `out`, formatting straight into it (the writer reuses one
    /// buffer for every line).
    pub fn write_squid_line(&self, out: &mut String) {
        let since_epoch = self.end.duration_since(UNIX_EPOCH).unwrap_or_default();
        let _ = write!(
            out,
            "{}.{:03} {:>6} {} {}/{:03} {} {} {} - ",
            since_epoch.as_secs(),
            since_epoch.subsec_millis(),
            self.duration.as_millis(),
            self.client,
            self.squid_code(),
            self.status,
            self.bytes_down,
            self.method,
            self.url,
        );
        let _ = match self.upstream {
            Some(addr) => write!(out, "HIER_DIRECT/{}", addr.ip()),
            None => write!(out, "HIER_NONE/-"),
        };
        let _ = write!(out, " {}", media_type(self.content_type.as_deref()));
    }

    /// The line as one JSON object (no newline).
    pub fn json_line(&self) -> String {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        let value = serde_json::json!({
            "time": humantime::format_rfc3339_millis(self.end).to_string(),
            "duration_ms": self.duration.as_secs_f64() * 1000.0,
            "client": self.client.to_string(),
            "kind": self.kind.label(),
            "method": self.method,
            "url": self.url,
            "host": self.host,
            "port": self.port,
            "status": self.status,
            "decision": self.outcome.label(),
            "reason": self.reason.label(),
            "rule": self.rule,
            "squid_code": self.squid_code(),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "upstream": self.upstream.map(|a| a.to_string()),
            "dns_ms": ms(self.dns),
            "connect_ms": ms(self.connect),
            "content_type": self.content_type,
        });
        value.to_string()
    }
}

/// The media type alone (`text/html` of `text/html; charset=utf-8`), so that the Squid line
/// keeps its space-separated fields; `-` when absent.
fn media_type(content_type: Option<&str>) -> &str {
    let media = content_type
        .and_then(|t| t.split(';').next())
        .map(str::trim)
        .unwrap_or("");
    if media.is_empty() || media.contains(char::is_whitespace) {
        "-"
    } else {
        media
    }
}

/// The lines waiting for the writer, shared with the request path.
struct Queue {
    pending: Mutex<Pending>,
    /// Told when a line lands in an empty queue.
    filled: Notify,
}

/// Formatted lines waiting for the writer.
struct Pending {
    text: String,
    lines: usize,
}

thread_local! {
    /// Where a thread formats its line before taking the queue's lock.
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(256));
}

/// The access log's sending side.
pub struct AccessLog {
    queue: Option<Arc<Queue>>,
    /// Asks the writer to write at once (shutdown), with a reply when done.
    flushes: Option<mpsc::Sender<oneshot::Sender<()>>>,
    dropped: IntCounter,
    format: AccessLogFormat,
}

/// How long the writer lets lines gather once woken. Requests do not wake it each: a
/// cross-thread wake-up per request costs more than the line itself.
const GATHER: Duration = Duration::from_millis(10);

impl AccessLog {
    /// Starts the writer task over `out` (stdout in the binary). `Off` writes nothing.
    pub fn start<W>(format: AccessLogFormat, out: W, dropped: IntCounter) -> AccessLog
    where
        W: AsyncWrite + Send + Unpin + 'static,
    {
        if format == AccessLogFormat::Off {
            return AccessLog {
                queue: None,
                flushes: None,
                dropped,
                format,
            };
        }
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending {
                text: String::with_capacity(64 << 10),
                lines: 0,
            }),
            filled: Notify::new(),
        });
        let (flushes, requests) = mpsc::channel(4);
        tokio::spawn(write_loop(queue.clone(), requests, out));
        AccessLog {
            queue: Some(queue),
            flushes: Some(flushes),
            dropped,
            format,
        }
    }

    /// Whether lines show the host and the rule that allowed a request (JSON; only then are
    /// their texts built).
    pub fn detailed(&self) -> bool {
        self.format == AccessLogFormat::Json
    }

    /// Formats a record's line and queues it; drops (and counts) it if the writer is behind.
    pub fn log(&self, record: Record) {
        let Some(queue) = &self.queue else {
            return;
        };
        LINE.with_borrow_mut(|line| {
            if line.capacity() > 64 << 10 {
                // The last line had a very long URL: do not keep its buffer for good.
                *line = String::with_capacity(256);
            }
            line.clear();
            match self.format {
                AccessLogFormat::Json => line.push_str(&record.json_line()),
                _ => record.write_squid_line(line),
            }
            line.push('\n');
            let mut pending = queue.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.lines >= QUEUE || pending.text.len() + line.len() > QUEUE_BYTES {
                drop(pending);
                self.dropped.inc();
                return;
            }
            pending.text.push_str(line);
            pending.lines += 1;
            let first = pending.lines == 1;
            drop(pending);
            if first {
                queue.filled.notify_one();
            }
        });
    }

    /// Waits (up to `limit`) until everything queued so far is written.
    pub async fn flush(&self, limit: Duration) {
        if let Some(flushes) = &self.flushes {
            let (done, wait) = oneshot::channel();
            let sent = tokio::time::timeout(limit, flushes.send(done)).await;
            if matches!(sent, Ok(Ok(()))) {
                let _ = tokio::time::timeout(limit, wait).await;
            }
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    queue: Arc<Queue>,
    mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
    mut out: W,
) {
    // The batch being written; swapped with the queue's text, so both buffers are reused.
    let mut batch = String::with_capacity(64 << 10);
    let mut broken = false;
    loop {
        let flush = tokio::select! {
            () = queue.filled.notified() => {
                tokio::time::sleep(GATHER).await;
                None
            }
            request = flushes.recv() => match request {
                Some(done) => Some(done),
                None => return,
            },
        };
        {
            let mut pending = queue.pending.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::swap(&mut batch, &mut pending.text);
            pending.lines = 0;
        }
        if !broken && !batch.is_empty() {
            let written = async {
                out.write_all(batch.as_bytes()).await?;
                out.flush().await
            };
            if let Err(e) = written.await {
                tracing::warn!(error = %e, "access log output failed; lines are discarded from now on");
                broken = true;
            }
        }
        batch.clear();
        if batch.capacity() > 1 << 20 {
            // A burst of long lines: give the memory back rather than keep it for good.
            batch.shrink_to(64 << 10);
        }
        if let Some(done) = flush {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            end: UNIX_EPOCH + Duration::from_millis(1_733_300_000_123),
            duration: Duration::from_millis(42),
            client: "10.1.2.3".parse().unwrap(),
            kind: Kind::Connect,
            method: "CONNECT".into(),
            url: "sts.amazonaws.com:443".into(),
            host: Some("sts.amazonaws.com".into()),
            port: Some(443),
            status: 200,
            outcome: Outcome::Allowed,
            reason: Reason::Allowlist,
            rule: Some("sts.amazonaws.com (AWS global default)".into()),
            bytes_up: 517,
            bytes_down: 4711,
            upstream: Some("52.94.1.1:443".parse().unwrap()),
            dns: Some(Duration::from_micros(1500)),
            connect: Some(Duration::from_millis(3)),
            content_type: None,
        }
    }

    /// 3000 lines every 12 ms (250 000 a second, more than any worker count here serves)
    /// into an output that keeps up: nothing is dropped, every line is written, and each one
    /// within one gathering period of the last.
    #[tokio::test(start_paused = true)]
    async fn high_rates_lose_no_lines_while_the_output_keeps_up() {
        use tokio::io::AsyncReadExt;
        let (output, mut written) = tokio::io::duplex(64 << 20);
        let dropped = IntCounter::new("dropped", "dropped").unwrap();
        let log = AccessLog::start(AccessLogFormat::Squid, output, dropped.clone());
        for _ in 0..10 {
            for _ in 0..3000 {
                log.log(record());
            }
            tokio::time::sleep(Duration::from_millis(12)).await;
        }
        let started = tokio::time::Instant::now();
        log.flush(Duration::from_secs(5)).await;
        assert!(started.elapsed() <= GATHER, "{:?}", started.elapsed());
        assert_eq!(dropped.get(), 0);
        let mut lines = 0;
        let mut buf = vec![0u8; 1 << 16];
        while lines < 30_000 {
            let n = written.read(&mut buf).await.unwrap();
            assert!(n > 0, "output ended after {lines} lines");
            lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
        }
        assert_eq!(lines, 30_000);
    }

    /// The Squid line matches Squid's own layout field by field.
    #[test]
    fn squid_line_layout() {
        assert_eq!(
            record().squid_line(),
            "1733300000.123     42 10.1.2.3 TCP_TUNNEL/200 4711 CONNECT sts.amazonaws.com:443 - HIER_DIRECT/52.94.1.1 -"
        );
        let mut denied = record();
        denied.kind = Kind::Http;
        denied.outcome = Outcome::Denied;
        denied.status = 403;
        denied.method = "GET".into();
        denied.url = "http://evil.com/".into();
        denied.upstream = None;
        denied.bytes_down = 80;
        denied.content_type = Some("text/plain; charset=utf-8".into());
        assert_eq!(
            denied.squid_line(),
            "1733300000.123     42 10.1.2.3 TCP_DENIED/403 80 GET http://evil.com/ - HIER_NONE/- text/plain"
        );
    }

    /// Report mode: what was let through keeps its result code, suffixed `_WOULD_DENY`, in both
    /// formats.
    #[test]
    fn would_deny_lines() {
        let mut tunnel = record();
        tunnel.outcome = Outcome::WouldDeny;
        tunnel.rule = None;
        assert_eq!(
            tunnel.squid_line(),
            "1733300000.123     42 10.1.2.3 TCP_TUNNEL_WOULD_DENY/200 4711 CONNECT sts.amazonaws.com:443 - HIER_DIRECT/52.94.1.1 -"
        );
        let value: serde_json::Value = serde_json::from_str(&tunnel.json_line()).unwrap();
        assert_eq!(value["decision"], "would_deny");
        assert_eq!(value["reason"], "allowlist");
        assert_eq!(value["squid_code"], "TCP_TUNNEL_WOULD_DENY");
        let mut http = tunnel.clone();
        http.kind = Kind::Http;
        http.method = "GET".into();
        assert_eq!(http.squid_code(), "TCP_MISS_WOULD_DENY");
    }

    /// The JSON line carries every documented field.
    #[test]
    fn json_line_fields() {
        let value: serde_json::Value = serde_json::from_str(&record().json_line()).unwrap();
        for field in [
            "time",
            "duration_ms",
            "client",
            "kind",
            "method",
            "url",
            "host",
            "port",
            "status",
            "decision",
            "reason",
            "rule",
            "squid_code",
            "bytes_up",
            "bytes_down",
            "upstream",
            "dns_ms",
            "connect_ms",
            "content_type",
        ] {
            assert!(value.get(field).is_some(), "missing {field}");
        }
        assert_eq!(value["decision"], "allowed");
        assert_eq!(value["upstream"], "52.94.1.1:443");
    }

    /// An output that never accepts bytes (a stalled stdout).
    struct Stuck;

    impl AsyncWrite for Stuck {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Pending
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }
    }

    /// Long URLs fill the queue by bytes long before its line count: what waits for a stalled
    /// stdout stays within `QUEUE_BYTES` whatever the lines, and the rest is dropped and
    /// counted.
    #[tokio::test]
    async fn long_lines_are_bounded_by_bytes() {
        let dropped = IntCounter::new("d", "d").unwrap();
        let log = AccessLog::start(AccessLogFormat::Squid, Stuck, dropped.clone());
        let mut long = record();
        long.url = format!("http://example.com/{}", "a".repeat(60_000));
        let line = long.squid_line().len() + 1;
        for _ in 0..200 {
            log.log(long.clone());
        }
        let kept = QUEUE_BYTES / line;
        assert!(kept < 100, "{kept}");
        assert_eq!(dropped.get(), (200 - kept) as u64);
        let pending = log.queue.as_ref().unwrap().pending.lock().unwrap();
        assert_eq!((pending.lines, pending.text.len()), (kept, kept * line));
    }

    /// A writer that never accepts bytes does not block `log`: records are dropped and counted.
    #[tokio::test]
    async fn full_queue_drops_and_counts() {
        let dropped = IntCounter::new("d", "d").unwrap();
        let log = AccessLog::start(AccessLogFormat::Squid, Stuck, dropped.clone());
        for _ in 0..(QUEUE * 2 + 100) {
            log.log(record());
        }
        assert!(dropped.get() >= QUEUE as u64, "dropped {}", dropped.get());
    }
}
