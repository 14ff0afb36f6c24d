//! The request framing watch: a request that carries both `Content-Length` and
//! `Transfer-Encoding` is refused.
//!
//! hyper settles that conflict itself (RFC 9112 §6.3: chunked wins, `Content-Length` is dropped
//! before the handler sees the request, and the connection closes after the response), so the
//! request path cannot tell. Such a message is the raw material of request smuggling, and RFC
//! 9112 §6.1 lets a server refuse it: cuttle answers 400 and closes, and forwards nothing.
//!
//! A [`Watch`] sees the client socket's bytes as hyper reads them (`crate::server::ClientStream`)
//! and follows the raw request:
//! a head, then a body framed by `Content-Length` (skipped by counting) or chunked (a small
//! state machine over the size lines, chunk data skipped by counting), then the next head.
//! Each complete head is parsed with `httparse`, the parser hyper uses, with the same settings,
//! and the index of the first head that carries both headers is published in [`Verdicts`]. The
//! request path counts the requests hyper hands it ([`Verdicts::next_is_ambiguous`]); pipelined
//! requests keep their own indexes whatever the reads look like.
//!
//! Written by hand because no crate sees hyper's input bytes. The [`Tracker`] mirrors hyper
//! 1.x's request framing (`proto/h1/role.rs`, `proto/h1/decode.rs`) for every message hyper
//! accepts. Whenever it cannot follow (a head it cannot parse, a framing hyper refuses, bad
//! chunk syntax, a head over the size limit) it stops watching for the rest of the connection
//! and bytes pass untouched: hyper's own parser then refuses the malformed input, and a request
//! the watch is unsure of is never refused by it. After a `CONNECT` or `Upgrade` the watch goes
//! on as if the connection stayed HTTP; once hyper hands the connection over, no further request
//! is ever served on it, so whatever the watch makes of tunnel bytes is never consulted (and
//! the splice relay takes the socket out of hyper's hands anyway).

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// hyper's default limit on header fields in a request head (`DEFAULT_MAX_HEADERS`); a head
/// with more is refused by hyper, and the watch stops.
const HEADER_SLOTS: usize = 100;

/// Largest `Content-Length` hyper accepts (`DecodedLength::MAX_LEN`).
const MAX_LENGTH: u64 = u64::MAX - 2;

/// No ambiguous head (yet).
const NONE: u64 = u64::MAX;

/// What the watch found on one connection, shared with the request path.
#[derive(Debug)]
pub struct Verdicts {
    /// The index of the first request head with both `Content-Length` and
    /// `Transfer-Encoding`, or [`NONE`].
    ambiguous: AtomicU64,
    /// Requests handed to the request path so far.
    served: AtomicU64,
}

impl Verdicts {
    pub fn new() -> Arc<Verdicts> {
        Arc::new(Verdicts {
            ambiguous: AtomicU64::new(NONE),
            served: AtomicU64::new(0),
        })
    }

    /// Counts one request handed to the request path; true when it is the one whose head
    /// carried both `Content-Length` and `Transfer-Encoding`. Called exactly once per request,
    /// in the order hyper hands them over.
    pub fn next_is_ambiguous(&self) -> bool {
        let index = self.served.fetch_add(1, Ordering::Relaxed);
        // hyper parses a head only after reading it through the watch, so the verdict on
        // this index is already final.
        self.ambiguous.load(Ordering::Acquire) == index
    }

    fn flag(&self, index: u64) {
        self.ambiguous.store(index, Ordering::Release);
    }
}

// === impl Watch ===

/// One connection's watch: its tracker, and where it reports.
#[derive(Debug)]
pub struct Watch {
    tracker: Tracker,
    verdicts: Arc<Verdicts>,
}

impl Watch {
    /// Reports to `verdicts`; a head longer than `max_head` bytes ends the watch (hyper
    /// refuses it).
    pub fn new(verdicts: Arc<Verdicts>, max_head: usize) -> Watch {
        Watch {
            tracker: Tracker::new(max_head),
            verdicts,
        }
    }

    /// Follows bytes just read from the client (see `crate::server::ClientStream`).
    pub fn saw(&mut self, bytes: &[u8]) {
        if self.tracker.watching() {
            self.tracker.feed(bytes);
            if let Some(index) = self.tracker.ambiguous() {
                self.verdicts.flag(index);
            }
        }
    }
}

// === impl Tracker ===

/// Follows HTTP/1 message framing on the request direction of one connection.
#[derive(Debug)]
pub struct Tracker {
    state: State,
    /// Heads seen so far: the index of the next one.
    heads: u64,
    /// The first ambiguous head, once seen (the watch stops there).
    ambiguous: Option<u64>,
    /// A head that spans reads, kept until it is complete. Empty (and unallocated) in the
    /// usual case of a head that arrives in one read.
    partial: Vec<u8>,
    max_head: usize,
}

/// Where the next byte belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A request head (or the empty lines hyper skips before one).
    Head,
    /// A `Content-Length` body with this many bytes left.
    Length(u64),
    /// A chunked body.
    Chunked(Chunk),
    /// Not watching any more: an ambiguous head was found, or the watch could not follow.
    Off,
}

/// Position in a chunked body, as hyper's `ChunkedState` (the chunk size carried along).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// The first hex digit of a chunk size.
    Start,
    Size(u64),
    /// Spaces or tabs after the size.
    SizeLws(u64),
    /// `;` extensions, up to the CR.
    Extension(u64),
    SizeLf(u64),
    /// Chunk data with this many bytes left.
    Data(u64),
    DataCr,
    DataLf,
    /// A trailer field line.
    Trailer,
    TrailerLf,
    /// After the last chunk or a trailer line: CR of the final CRLF, or a trailer.
    EndCr,
    EndLf,
    /// The body is complete.
    End,
}

/// How a complete head frames its body, as hyper decides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Both `Content-Length` and `Transfer-Encoding`.
    Ambiguous,
    /// A framing hyper refuses (invalid or conflicting lengths, a transfer coding that does not
    /// end in chunked, `Transfer-Encoding` in HTTP/1.0).
    Refused,
}

/// One attempt at parsing a head.
enum Parsed {
    Partial,
    Complete { len: usize, framing: Framing },
    Invalid,
}

impl Tracker {
    /// A tracker at the start of a connection; heads over `max_head` bytes end the watch.
    pub fn new(max_head: usize) -> Tracker {
        Tracker {
            state: State::Head,
            heads: 0,
            ambiguous: None,
            partial: Vec::new(),
            max_head,
        }
    }

    /// False once the watch has stopped: further bytes are not looked at.
    pub fn watching(&self) -> bool {
        self.state != State::Off
    }

    /// The index of the first head with both `Content-Length` and `Transfer-Encoding`.
    pub fn ambiguous(&self) -> Option<u64> {
        self.ambiguous
    }

    /// Complete heads seen so far.
    pub fn heads(&self) -> u64 {
        self.heads
    }

    /// Follows the next bytes read from the client.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let used = match self.state {
                State::Off => return,
                State::Head => self.head(bytes),
                State::Length(left) => {
                    let n = left.min(bytes.len() as u64);
                    self.state = if n == left {
                        State::Head
                    } else {
                        State::Length(left - n)
                    };
                    n as usize
                }
                State::Chunked(chunk) => self.chunked(chunk, bytes),
            };
            if self.state == State::Off {
                return;
            }
            bytes = &bytes[used..];
        }
    }

    /// Reads (part of) a head; returns the bytes used.
    fn head(&mut self, bytes: &[u8]) -> usize {
        if self.partial.is_empty() {
            return match parse_head(bytes) {
                Parsed::Complete { len, framing } => {
                    self.finish_head(framing);
                    len
                }
                Parsed::Partial if bytes.len() < self.max_head => {
                    self.partial.extend_from_slice(bytes);
                    bytes.len()
                }
                Parsed::Partial | Parsed::Invalid => self.stop(),
            };
        }
        // The head spans reads: keep what fits under the limit, and parse again only once
        // the end of a head may have arrived (hyper does the same).
        let before = self.partial.len();
        let room = self.max_head.saturating_sub(before);
        self.partial
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
        let parsed = if head_may_end(&self.partial, before) {
            parse_head(&self.partial)
        } else {
            Parsed::Partial
        };
        match parsed {
            Parsed::Complete { len, framing } => match len.checked_sub(before) {
                Some(used) if used > 0 => {
                    self.partial.clear();
                    self.finish_head(framing);
                    used
                }
                _ => self.stop(),
            },
            Parsed::Partial if self.partial.len() < self.max_head => bytes.len(),
            Parsed::Partial | Parsed::Invalid => self.stop(),
        }
    }

    fn finish_head(&mut self, framing: Framing) {
        let index = self.heads;
        self.heads += 1;
        match framing {
            Framing::None | Framing::Length(0) => self.state = State::Head,
            Framing::Length(n) => self.state = State::Length(n),
            Framing::Chunked => self.state = State::Chunked(Chunk::Start),
            Framing::Ambiguous => {
                self.ambiguous = Some(index);
                self.stop();
            }
            Framing::Refused => {
                self.stop();
            }
        }
    }

    /// Follows a chunked body; returns the bytes used.
    fn chunked(&mut self, mut chunk: Chunk, bytes: &[u8]) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            if let Chunk::Data(left) = chunk {
                let n = left.min((bytes.len() - i) as u64);
                i += n as usize;
                chunk = if n == left {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left - n)
                };
                continue;
            }
            let Some(next) = chunk.step(bytes[i]) else {
                return self.stop();
            };
            i += 1;
            if next == Chunk::End {
                self.state = State::Head;
                return i;
            }
            chunk = next;
        }
        self.state = State::Chunked(chunk);
        i
    }

    /// Stops watching for good ([`Tracker::feed`] returns at once); returns 0 bytes used.
    fn stop(&mut self) -> usize {
        self.state = State::Off;
        self.partial = Vec::new();
        0
    }
}

impl Chunk {
    /// The state after byte `b`, or `None` where hyper's decoder fails.
    fn step(self, b: u8) -> Option<Chunk> {
        use Chunk::*;
        Some(match (self, b) {
            (Start, b) => Size(hex_digit(b)?),
            (Size(n), b) => match (hex_digit(b), b) {
                (Some(d), _) => Size(n.checked_mul(16)?.checked_add(d)?),
                (None, b'\t' | b' ') => SizeLws(n),
                (None, b';') => Extension(n),
                (None, b'\r') => SizeLf(n),
                _ => return None,
            },
            (SizeLws(n), b'\t' | b' ') => SizeLws(n),
            (SizeLws(n), b';') => Extension(n),
            (SizeLws(n), b'\r') => SizeLf(n),
            // hyper refuses a bare LF in extensions, and so does the watch.
            (Extension(n), b'\r') => SizeLf(n),
            (Extension(_), b'\n') => return None,
            (Extension(n), _) => Extension(n),
            (SizeLf(0), b'\n') => EndCr,
            (SizeLf(n), b'\n') => Data(n),
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Start,
            (Trailer, b'\r') => TrailerLf,
            (Trailer, b'\n') => return None,
            (Trailer, _) => Trailer,
            (TrailerLf, b'\n') => EndCr,
            (EndCr, b'\r') => EndLf,
            (EndCr, b'\n') => return None,
            (EndCr, _) => Trailer,
            (EndLf, b'\n') => End,
            _ => return None,
        })
    }
}

fn hex_digit(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

/// Parses a request head at the start of `bytes` as hyper does (`httparse`, default settings,
/// at most [`HEADER_SLOTS`] fields) and judges its framing.
fn parse_head(bytes: &[u8]) -> Parsed {
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); HEADER_SLOTS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(bytes, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Invalid,
    };
    let mut chunked = None;
    let mut length = None;
    let mut has_length = false;
    let mut lengths_agree = true;
    for header in req.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // As hyper: the last Transfer-Encoding field decides.
            chunked = Some(ends_in_chunked(header.value));
        } else if header.name.eq_ignore_ascii_case("content-length") {
            has_length = true;
            match (decimal(header.value), length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(first)) if n == first => {}
                _ => lengths_agree = false,
            }
        }
    }
    let http11 = req.version == Some(1);
    let framing = match (chunked, has_length) {
        (Some(_), true) => Framing::Ambiguous,
        (Some(true), false) if http11 => Framing::Chunked,
        (Some(_), false) => Framing::Refused,
        (None, true) => match length {
            Some(n) if lengths_agree && n <= MAX_LENGTH => Framing::Length(n),
            _ => Framing::Refused,
        },
        (None, false) => Framing::None,
    };
    Parsed::Complete { len, framing }
}

/// hyper's `is_chunked_`: the value is visible ASCII and its last coding is `chunked`.
fn ends_in_chunked(value: &[u8]) -> bool {
    let visible = value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    visible
        && value
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// hyper's `from_digits`: ASCII digits only, no sign, no overflow.
fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        let digit = (b as char).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// hyper's `is_complete_fast`: whether the bytes from `before` on (with the three before it)
/// hold the end of a head (`\r\n\r\n`, `\n\n` or `\n\r\n`).
fn head_may_end(bytes: &[u8], before: usize) -> bool {
    let bytes = &bytes[before.saturating_sub(3)..];
    bytes
        .windows(2)
        .enumerate()
        .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && bytes.get(i + 2) == Some(&b'\n')))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64 * 1024;

    /// What the tracker ends with: (ambiguous head, heads seen, still watching).
    type Outcome = (Option<u64>, u64, bool);

    /// The [`Outcome`] of feeding `parts` in order.
    fn run(parts: &[&[u8]]) -> Outcome {
        let mut tracker = Tracker::new(MAX);
        for part in parts {
            tracker.feed(part);
        }
        (tracker.ambiguous(), tracker.heads(), tracker.watching())
    }

    fn whole(stream: &[u8]) -> Outcome {
        run(&[stream])
    }

    /// Several pipelined requests that hyper accepts: CL bodies, chunked bodies with
    /// extensions, whitespace and trailers, a CONNECT, bare LF heads, leading empty lines;
    /// then one with both Content-Length and Transfer-Encoding, and another one after it.
    fn pipelined() -> Vec<u8> {
        [
            &b"POST http://a.example/one HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"[..],
            b"\r\n",
            b"POST http://a.example/two HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"5;name=value;x\r\nhe\r\nl\r\nA \t;y\r\n0123456789\r\n0\r\nX-Sum: 1\r\nX-Other: 2\r\n\r\n",
            b"GET http://a.example/three HTTP/1.1\nHost: a\nContent-Length: 3\nContent-Length: 3\n\nabc",
            b"POST http://a.example/four HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
            b"GET http://a.example/five HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"POST http://a.example/six HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET http://a.example/smuggled HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]
        .concat()
    }

    /// The pipelined stream gives the same verdict whole, split at every single boundary, and
    /// byte by byte: the ambiguous request is the seventh (index 6), after six clean ones.
    #[test]
    fn verdicts_do_not_depend_on_how_reads_split_the_stream() {
        let stream = pipelined();
        let want = (Some(6), 7, false);
        assert_eq!(whole(&stream), want);
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(run(&[a, b]), want, "split at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run(&bytes), want, "byte by byte");
        for size in [2, 3, 7, 64, 1000] {
            let parts: Vec<&[u8]> = stream.chunks(size).collect();
            assert_eq!(run(&parts), want, "reads of {size}");
        }
    }

    proptest::proptest! {
        /// Any way of cutting the pipelined stream into reads gives the same verdict.
        #[test]
        fn verdicts_hold_for_random_splits(cut_points in proptest::collection::vec(0usize..2000, 0..40)) {
            let stream = pipelined();
            let mut parts = Vec::new();
            let mut from = 0;
            for cut in cuts(cut_points, stream.len()) {
                parts.push(&stream[from..cut]);
                from = cut;
            }
            parts.push(&stream[from..]);
            proptest::prop_assert_eq!(run(&parts), (Some(6), 7, false));
        }
    }

    // === Against hyper itself ===

    /// A generated request message.
    #[derive(Clone, Debug)]
    enum Msg {
        Get {
            bare_lf: bool,
        },
        Length {
            body: usize,
            twice: bool,
        },
        Chunked {
            chunks: Vec<(usize, u8)>,
            trailers: u8,
        },
        Connect,
        Ambiguous {
            te_first: bool,
            length: u16,
            chunks: Vec<(usize, u8)>,
        },
    }

    fn msg() -> impl proptest::strategy::Strategy<Value = Msg> {
        use proptest::prelude::*;
        let chunks = || proptest::collection::vec((1usize..40, any::<u8>()), 0..4);
        prop_oneof![
            any::<bool>().prop_map(|bare_lf| Msg::Get { bare_lf }),
            (0usize..60, any::<bool>()).prop_map(|(body, twice)| Msg::Length { body, twice }),
            (chunks(), 0u8..3).prop_map(|(chunks, trailers)| Msg::Chunked { chunks, trailers }),
            Just(Msg::Connect),
            (any::<bool>(), any::<u16>(), chunks()).prop_map(|(te_first, length, chunks)| {
                Msg::Ambiguous {
                    te_first,
                    length,
                    chunks,
                }
            }),
        ]
    }

    /// A chunked body; `style` picks upper-case hex, whitespace after the size, extensions.
    fn chunked_body(chunks: &[(usize, u8)], trailers: u8) -> String {
        let mut body = String::new();
        for (size, style) in chunks {
            let hex = if style & 1 == 1 {
                format!("{size:X}")
            } else {
                format!("{size:x}")
            };
            let lws = if style & 2 == 2 { " \t" } else { "" };
            let ext = if style & 4 == 4 { ";a=b;c" } else { "" };
            body += &format!("{hex}{lws}{ext}\r\n{}\r\n", "z".repeat(*size));
        }
        body += "0\r\n";
        for t in 0..trailers {
            body += &format!("X-T{t}: v\r\n");
        }
        body + "\r\n"
    }

    fn render(i: usize, msg: &Msg, lead: bool) -> String {
        let lead = if lead { "\r\n" } else { "" };
        let path = format!("http://a.example/m{i}");
        lead.to_string()
            + &match msg {
                Msg::Get { bare_lf: false } => format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n"),
                Msg::Get { bare_lf: true } => format!("GET {path} HTTP/1.1\nHost: a\n\n"),
                Msg::Length { body, twice } => {
                    let second = if *twice {
                        format!("Content-Length: {body}\r\n")
                    } else {
                        String::new()
                    };
                    format!(
                        "POST {path} HTTP/1.1\r\nContent-Length: {body}\r\n{second}\r\n{}",
                        "y".repeat(*body)
                    )
                }
                Msg::Chunked { chunks, trailers } => format!(
                    "POST {path} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{}",
                    chunked_body(chunks, *trailers)
                ),
                Msg::Connect => {
                    format!("CONNECT a.example:{} HTTP/1.1\r\nHost: a\r\n\r\n", 1000 + i)
                }
                Msg::Ambiguous {
                    te_first,
                    length,
                    chunks,
                } => {
                    let (te, cl) = (
                        "Transfer-Encoding: chunked\r\n",
                        format!("Content-Length: {length}\r\n"),
                    );
                    let headers = if *te_first {
                        format!("{te}{cl}")
                    } else {
                        format!("{cl}{te}")
                    };
                    format!(
                        "POST {path} HTTP/1.1\r\n{headers}\r\n{}",
                        chunked_body(chunks, 0)
                    )
                }
            }
    }

    /// One request as hyper handed it over: its target, whether it has `Transfer-Encoding`,
    /// and the verdict of the watch on it.
    type Served = (String, bool, bool);

    /// Serves `stream`, cut into reads at `cuts`, with hyper over a watched stream; returns the
    /// requests in the order served.
    fn serve_with_hyper(stream: &[u8], cuts: &[usize]) -> Vec<Served> {
        use http_body_util::BodyExt;
        use tokio::io::AsyncWriteExt;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let verdicts = Verdicts::new();
            let served = Arc::new(std::sync::Mutex::new(Vec::new()));
            let io = hyper_util::rt::TokioIo::new(crate::server::ClientStream::new(
                server,
                crate::idle::Activity::new(),
                Watch::new(verdicts.clone(), MAX),
            ));
            let service_served = served.clone();
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let flagged = verdicts.next_is_ambiguous();
                    let target = req.uri().to_string();
                    let te = req.headers().contains_key(http::header::TRANSFER_ENCODING);
                    let connect = req.method() == http::Method::CONNECT;
                    service_served.lock().unwrap().push((target, te, flagged));
                    async move {
                        let _ = req.into_body().collect().await;
                        let mut response =
                            http::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                        if connect {
                            *response.status_mut() = http::StatusCode::FORBIDDEN;
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
            let connection = hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .serve_connection(io, service);
            let mut pieces = Vec::new();
            let mut from = 0;
            for &cut in cuts {
                pieces.push(stream[from..cut].to_vec());
                from = cut;
            }
            pieces.push(stream[from..].to_vec());
            let talk = async move {
                let (mut read, mut write) = tokio::io::split(&mut client);
                let send = async {
                    for piece in pieces {
                        if write.write_all(&piece).await.is_err() {
                            return;
                        }
                        tokio::task::yield_now().await;
                    }
                    let _ = write.shutdown().await;
                };
                let mut sink = Vec::new();
                let drain = tokio::io::AsyncReadExt::read_to_end(&mut read, &mut sink);
                let _ = tokio::join!(send, drain);
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(20), async {
                tokio::join!(connection, talk)
            })
            .await;
            let served = served.lock().unwrap().clone();
            served
        })
    }

    /// Random cut points turned into sorted offsets within a stream of `len` bytes.
    fn cuts(mut cuts: Vec<usize>, len: usize) -> Vec<usize> {
        cuts.iter_mut().for_each(|c| *c %= len + 1);
        cuts.sort_unstable();
        cuts
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Valid pipelines served by hyper through the watch: hyper serves every request up to
        /// and including the first ambiguous one, and exactly that one is flagged.
        #[test]
        fn watch_agrees_with_hyper(
            msgs in proptest::collection::vec((msg(), proptest::prelude::any::<bool>()), 1..7),
            cut_points in proptest::collection::vec(0usize..4000, 0..12),
        ) {
            let stream: String = msgs.iter().enumerate().map(|(i, (m, lead))| render(i, m, *lead)).collect();
            let served = serve_with_hyper(stream.as_bytes(), &cuts(cut_points, stream.len()));
            let last = msgs.iter().position(|(m, _)| matches!(m, Msg::Ambiguous { .. })).unwrap_or(msgs.len() - 1);
            let want: Vec<(String, bool)> = msgs[..=last]
                .iter()
                .enumerate()
                .map(|(i, (m, _))| {
                    let target = match m {
                        Msg::Connect => format!("a.example:{}", 1000 + i),
                        _ => format!("http://a.example/m{i}"),
                    };
                    (target, matches!(m, Msg::Ambiguous { .. }))
                })
                .collect();
            let got: Vec<(String, bool)> = served.iter().map(|(t, _, f)| (t.clone(), *f)).collect();
            proptest::prop_assert_eq!(got, want, "{:?}", stream);
        }

        /// The same with one byte of the stream replaced, so that hyper may refuse or read
        /// things differently: the watch may stop, but a request it flags is always one that
        /// hyper read with Transfer-Encoding and then closed the connection after.
        #[test]
        fn watch_never_flags_what_hyper_did_not_see_as_ambiguous(
            msgs in proptest::collection::vec((msg(), proptest::prelude::any::<bool>()), 1..7),
            cut_points in proptest::collection::vec(0usize..4000, 0..12),
            at in 0usize..4000,
            byte in proptest::prelude::any::<u8>(),
        ) {
            let mut stream: Vec<u8> = msgs
                .iter()
                .enumerate()
                .flat_map(|(i, (m, lead))| render(i, m, *lead).into_bytes())
                .collect();
            let at = at % stream.len();
            stream[at] = byte;
            let served = serve_with_hyper(&stream, &cuts(cut_points, stream.len()));
            if let Some(k) = served.iter().position(|(_, _, flagged)| *flagged) {
                proptest::prop_assert!(served[k].1, "{:?}: {:?}", String::from_utf8_lossy(&stream), served);
                proptest::prop_assert_eq!(served.len(), k + 1, "{:?}: {:?}", String::from_utf8_lossy(&stream), served);
            }
        }
    }

    /// Without the ambiguous request the watch follows every message to the end and keeps
    /// watching.
    #[test]
    fn clean_pipelines_are_followed_to_the_end() {
        let stream = pipelined();
        let six = b"POST http://a.example/six";
        let end = stream.windows(six.len()).position(|w| w == six).unwrap();
        let clean = &stream[..end];
        assert_eq!(whole(clean), (None, 6, true));
        for cut in 0..=clean.len() {
            let (a, b) = clean.split_at(cut);
            assert_eq!(run(&[a, b]), (None, 6, true), "split at {cut}");
        }
    }

    /// Each head alone: which framing the watch sees (or whether it stops), as hyper decides.
    #[test]
    fn heads_and_their_framing() {
        let cases: &[(&str, &[u8], Outcome)] = &[
            ("no body", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", (None, 1, true)),
            (
                "CL then TE",
                b"POST / HTTP/1.1\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n",
                (Some(0), 1, false),
            ),
            (
                "TE then CL",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n",
                (Some(0), 1, false),
            ),
            (
                "names in any case, TE not chunked",
                b"POST / HTTP/1.1\r\ncontent-LENGTH: 6\r\nTRANSFER-encoding: gzip\r\n\r\n",
                (Some(0), 1, false),
            ),
            (
                "TE then an invalid CL (hyper skips it)",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n",
                (Some(0), 1, false),
            ),
            (
                "HTTP/1.0 with both",
                b"POST / HTTP/1.0\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n",
                (Some(0), 1, false),
            ),
            (
                "differing lengths: hyper refuses, the watch stops",
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                (None, 1, false),
            ),
            (
                "a length list",
                b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello",
                (None, 1, false),
            ),
            (
                "signed length",
                b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello",
                (None, 1, false),
            ),
            (
                "TE not ending in chunked",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                (None, 1, false),
            ),
            (
                "TE in HTTP/1.0",
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                (None, 1, false),
            ),
            (
                "last TE field decides",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                (None, 1, true),
            ),
            ("unparsable head", b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", (None, 0, false)),
            ("TLS bytes", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", (None, 0, false)),
            ("obs-fold", b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", (None, 0, false)),
        ];
        for (what, bytes, want) in cases {
            assert_eq!(whole(bytes), *want, "{what}");
        }
    }

    /// Chunk syntax hyper refuses stops the watch; what hyper accepts is followed.
    #[test]
    fn chunk_syntax() {
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let next = b"GET /next HTTP/1.1\r\n\r\n";
        let cases: &[(&[u8], bool)] = &[
            (b"0\r\n\r\n", true),
            (b"5\r\nhello\r\n0\r\n\r\n", true),
            (b"5 \t ;a=b\r\nhello\r\n0;last\r\n\r\n", true),
            (b"A\r\n0123456789\r\n0\r\nT: 1\r\n\r\n", true),
            (b"zz\r\nhello\r\n0\r\n\r\n", false),
            (b"-5\r\nhello\r\n0\r\n\r\n", false),
            (b"fffffffffffffffffff\r\nhello\r\n0\r\n\r\n", false),
            (b"3\r\nhello\r\n0\r\n\r\n", false),
            (b"5\nhello\r\n0\r\n\r\n", false),
            (b"5;a\nb\r\nhello\r\n0\r\n\r\n", false),
            (b"5 5\r\nhello\r\n0\r\n\r\n", false),
            (b"0\r\nT: 1\n\r\n", false),
            (b"0\r\n\n", false),
        ];
        for (body, accepted) in cases {
            let stream = [&head[..], body, next].concat();
            let want = if *accepted {
                (None, 2, true)
            } else {
                (None, 1, false)
            };
            assert_eq!(whole(&stream), want, "{:?}", String::from_utf8_lossy(body));
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            assert_eq!(
                run(&bytes),
                want,
                "{:?} byte by byte",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// A head longer than the limit ends the watch, whether it arrives at once or in pieces.
    #[test]
    fn oversized_heads_stop_the_watch() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "x".repeat(MAX));
        assert_eq!(whole(big.as_bytes()), (None, 0, false));
        let parts: Vec<&[u8]> = big.as_bytes().chunks(1000).collect();
        assert_eq!(run(&parts), (None, 0, false));
        let mut tracker = Tracker::new(MAX);
        tracker.feed(&big.as_bytes()[..1000]);
        assert!(tracker.watching() && tracker.partial.len() == 1000);
    }

    /// Large bodies are skipped by counting, whatever the read size.
    #[test]
    fn large_bodies_are_counted_not_scanned() {
        let mut tracker = Tracker::new(MAX);
        tracker.feed(b"POST / HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n");
        let block = vec![b'\n'; 1 << 20];
        for _ in 0..953 {
            tracker.feed(&block);
        }
        assert_eq!(
            tracker.state,
            State::Length(1_000_000_000 - 953 * (1 << 20))
        );
        tracker.feed(&vec![0; 1_000_000_000 - 953 * (1 << 20)]);
        tracker.feed(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!((tracker.ambiguous(), tracker.heads()), (Some(1), 2));
    }

    /// The value checks behave as hyper's `from_digits`, `is_chunked_` and `is_complete_fast`.
    #[test]
    fn helpers_match_hyper() {
        assert_eq!(decimal(b"0"), Some(0));
        assert_eq!(decimal(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b"1 ",
            b"0x5",
            b"18446744073709551616",
        ] {
            assert_eq!(decimal(bad), None, "{bad:?}");
        }
        assert!(ends_in_chunked(b"chunked"));
        assert!(ends_in_chunked(b"gzip, Chunked "));
        assert!(!ends_in_chunked(b"chunked, gzip"));
        assert!(!ends_in_chunked(b"chunked\x80"));
        assert!(head_may_end(b"GET / HTTP/1.1\r\n\r\n", 10));
        assert!(head_may_end(b"GET / HTTP/1.1\n\n", 15));
        assert!(head_may_end(b"GET / HTTP/1.1\n\r\n", 16));
        assert!(!head_may_end(b"GET / HTTP/1.1\r\nA: b\r\n", 5));
    }
}
