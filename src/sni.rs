//! The TLS SNI check on `CONNECT` tunnels (`CUTTLE_SNI_CHECK`).
//!
//! After `200 Connection established`, and before any byte reaches the upstream, cuttle reads the
//! client's first TLS records (no decryption: a ClientHello is plaintext) and takes the
//! `server_name` the client will present to the origin:
//! - `match` (default): the name must be the CONNECT host (case-insensitive, trailing dot
//!   ignored). This stops domain fronting: `CONNECT sts.amazonaws.com:443` followed by a
//!   ClientHello for `evil.com` on a shared CDN front would otherwise reach `evil.com`.
//! - `allowlist`: the name must itself be allowed by the current policy for this client and port.
//! - In both, a ClientHello without a name is refused unless the CONNECT host is an IP literal
//!   (clients send no SNI to an address), and a tunnel whose first byte is not a TLS handshake
//!   record is refused unless its port is in `CUTTLE_NON_TLS_PORTS` (where the check is skipped:
//!   server-speaks-first protocols such as SSH would otherwise wait forever).
//!
//! The read is bounded by size ([`MAX_HELLO_BYTES`], one full TLS record) and by
//! `CUTTLE_HEADER_TIMEOUT`. A ClientHello may arrive in any number of TCP segments and span
//! several TLS records within that bound. On success the bytes read are written to the upstream
//! unchanged and the buffer is freed before the copy starts; on refusal the client gets a fatal
//! `access_denied` TLS alert (when it spoke TLS), both sides are closed, and the tunnel is
//! recorded as denied with reason `sni` (logged as `TCP_DENIED/403`, although the client saw the
//! `200` before the close).
//!
//! Record and message framing use `tls-parser`; the extension walk reads the extension headers
//! with it too and decodes only `server_name`, so a ClientHello costs a few small allocations
//! (the cipher and compression lists) besides the read buffer.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use tls_parser::{
    parse_tls_extension_sni_content, parse_tls_extension_unknown, parse_tls_message_handshake,
    parse_tls_record_header, TlsExtension, TlsMessage, TlsMessageHandshake, TlsRecordType,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::client_acl::ClientAddr;
use crate::error::ProxyError;
use crate::host::Host;
use crate::metrics::Direction;
use crate::policy::{Decision, Policy, Request, Target};
use crate::server::Conn;
use crate::settings::SniCheck;
use crate::transaction::Transaction;

/// Largest TLS plaintext fragment (RFC 8446 §5.1: `length` MUST NOT exceed 2^14).
const MAX_FRAGMENT: usize = 1 << 14;
/// A TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;
/// The most cuttle reads looking for a ClientHello: one full record.
pub const MAX_HELLO_BYTES: usize = MAX_FRAGMENT + RECORD_HEADER;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Extension type of `server_name` (RFC 6066 §3).
const SERVER_NAME: u16 = 0;
/// `NameType` of a DNS host name in a `server_name` extension.
const HOST_NAME: u8 = 0;
/// Longest DNS name (without the trailing dot).
const MAX_NAME: usize = 253;
/// A fatal `access_denied` alert (RFC 8446 §6): record type 21, TLS 1.2 record version,
/// length 2, level fatal (2), description 49.
const ACCESS_DENIED_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49];
/// How long the refusal alert may take to leave.
const ALERT_TIMEOUT: Duration = Duration::from_secs(1);

// === Parsing ===

/// The `server_name` of a ClientHello: ASCII, lowercased, one trailing dot removed. Held inline
/// (a DNS name fits in 253 bytes) so that parsing allocates nothing for it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ServerName {
    len: u8,
    bytes: [u8; MAX_NAME],
}

impl ServerName {
    /// From the raw `HostName` bytes of the extension.
    fn new(raw: &[u8]) -> Result<ServerName, HelloError> {
        let raw = raw.strip_suffix(b".").unwrap_or(raw);
        if raw.is_empty() {
            return Err(HelloError::Malformed("empty server name"));
        }
        if raw.len() > MAX_NAME {
            return Err(HelloError::Malformed("server name longer than 253 bytes"));
        }
        // RFC 6066 §3: ASCII, no trailing dot; anything else cannot match an allowed host.
        if !raw.iter().all(|b| b.is_ascii_graphic()) {
            return Err(HelloError::Malformed("server name is not printable ASCII"));
        }
        let mut bytes = [0u8; MAX_NAME];
        bytes[..raw.len()].copy_from_slice(raw);
        bytes[..raw.len()].make_ascii_lowercase();
        Ok(ServerName {
            len: raw.len() as u8,
            bytes,
        })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Debug for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerName({:?})", self.as_str())
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the bytes read so far from a tunnel hold.
#[derive(Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // the name is inline on purpose: no allocation
pub enum Scan {
    /// The ClientHello is not complete yet; nothing more can be told before the buffer holds at
    /// least this many bytes (the end of the record in progress).
    NeedMore(usize),
    /// A complete ClientHello, with its server name if it has one.
    Hello(Option<ServerName>),
}

/// Why a tunnel's first bytes are not a ClientHello cuttle can judge.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("the tunnel does not start with a TLS handshake and its port is not in CUTTLE_NON_TLS_PORTS")]
    NotTls,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("the ClientHello is larger than {MAX_HELLO_BYTES} bytes")]
    TooLarge,
}

/// Looks for a complete ClientHello at the start of `buf`, which holds the first bytes of a
/// tunnel (possibly more than the ClientHello). Pure: the caller reads, calls again once it
/// has the bytes [`Scan::NeedMore`] asks for, and bounds the buffer. The cost is one step per
/// complete record, so a caller that waits for the hint scans each record boundary once.
pub fn scan(buf: &[u8]) -> Result<Scan, HelloError> {
    match buf.first() {
        None => return Ok(Scan::NeedMore(1)),
        Some(&byte) if byte != u8::from(TlsRecordType::Handshake) => {
            return Err(HelloError::NotTls)
        }
        Some(_) => {}
    }
    // The handshake header (type, 24-bit length) may itself be split across records.
    let mut head = [0u8; 4];
    let mut head_len = 0;
    let mut have = 0;
    let mut records = 0;
    let mut first: &[u8] = &[];
    let mut rest = buf;
    let need = loop {
        let (fragment, after) = match next_record(rest)? {
            Next::Record(fragment, after) => (fragment, after),
            Next::Missing(missing) => return Ok(Scan::NeedMore(buf.len() + missing)),
        };
        rest = after;
        if records == 0 {
            first = fragment;
        }
        records += 1;
        have += fragment.len();
        let take = (head.len() - head_len).min(fragment.len());
        head[head_len..head_len + take].copy_from_slice(&fragment[..take]);
        head_len += take;
        if head_len < head.len() {
            continue;
        }
        if head[0] != CLIENT_HELLO {
            return Err(HelloError::Malformed(
                "the first handshake message is not a ClientHello",
            ));
        }
        let need =
            4 + (usize::from(head[1]) << 16 | usize::from(head[2]) << 8 | usize::from(head[3]));
        if need + RECORD_HEADER > MAX_HELLO_BYTES {
            return Err(HelloError::TooLarge);
        }
        if have >= need {
            break need;
        }
    };
    if records == 1 {
        return client_hello(&first[..need]).map(Scan::Hello);
    }
    // Several records: join their fragments (rare: most clients send one record).
    let mut message = Vec::with_capacity(need);
    let mut rest = buf;
    while message.len() < need {
        let (fragment, after) = match next_record(rest)? {
            Next::Record(fragment, after) => (fragment, after),
            Next::Missing(missing) => return Ok(Scan::NeedMore(buf.len() + missing)),
        };
        let take = (need - message.len()).min(fragment.len());
        message.extend_from_slice(&fragment[..take]);
        rest = after;
    }
    client_hello(&message).map(Scan::Hello)
}

/// The next record of a buffer.
enum Next<'a> {
    /// A complete record's fragment, and the bytes after the record.
    Record(&'a [u8], &'a [u8]),
    /// The record is not complete: this many bytes are missing.
    Missing(usize),
}

/// The next handshake record at the start of `buf`.
fn next_record(buf: &[u8]) -> Result<Next<'_>, HelloError> {
    let (after, header) = match parse_tls_record_header(buf) {
        Ok(parsed) => parsed,
        Err(tls_parser::Err::Incomplete(_)) => return Ok(Next::Missing(RECORD_HEADER - buf.len())),
        Err(_) => return Err(HelloError::Malformed("record header")),
    };
    if header.record_type != TlsRecordType::Handshake {
        return Err(HelloError::Malformed(
            "a record other than handshake before the ClientHello is complete",
        ));
    }
    if header.version.0 >> 8 != 3 {
        return Err(HelloError::Malformed("record version is not TLS"));
    }
    let len = usize::from(header.len);
    if len == 0 || len > MAX_FRAGMENT {
        return Err(HelloError::Malformed("record length"));
    }
    if after.len() < len {
        return Ok(Next::Missing(len - after.len()));
    }
    let (fragment, after) = after.split_at(len);
    Ok(Next::Record(fragment, after))
}

/// The server name of one complete ClientHello handshake message (header included).
fn client_hello(message: &[u8]) -> Result<Option<ServerName>, HelloError> {
    let hello = match parse_tls_message_handshake(message) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => hello,
        _ => return Err(HelloError::Malformed("ClientHello body")),
    };
    let mut extensions = hello.ext.unwrap_or_default();
    let mut name = None;
    let mut seen = false;
    while !extensions.is_empty() {
        let (rest, extension) = parse_tls_extension_unknown(extensions)
            .map_err(|_| HelloError::Malformed("extension list"))?;
        extensions = rest;
        let TlsExtension::Unknown(kind, data) = extension else {
            return Err(HelloError::Malformed("extension list"));
        };
        if kind.0 != SERVER_NAME {
            continue;
        }
        // Two names would let cuttle judge one and the origin serve the other.
        if seen {
            return Err(HelloError::Malformed("more than one server_name extension"));
        }
        seen = true;
        name = server_name(data)?;
    }
    Ok(name)
}

/// The host name of a `server_name` extension body.
fn server_name(data: &[u8]) -> Result<Option<ServerName>, HelloError> {
    let Ok((_, TlsExtension::SNI(names))) = parse_tls_extension_sni_content(data) else {
        return Err(HelloError::Malformed("server_name extension"));
    };
    // RFC 6066 §3: no more than one name of the same type.
    let mut hosts = names.iter().filter(|(kind, _)| kind.0 == HOST_NAME);
    match (hosts.next(), hosts.next()) {
        (None, _) => Ok(None),
        (Some((_, raw)), None) => ServerName::new(raw).map(Some),
        (Some(_), Some(_)) => Err(HelloError::Malformed("more than one host name")),
    }
}

// === The decision ===

/// Why the SNI check refused a tunnel.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Hello(#[from] HelloError),
    #[error("no complete ClientHello within CUTTLE_HEADER_TIMEOUT")]
    Timeout,
    #[error("the ClientHello names no server (SNI), required for a CONNECT to a host name")]
    NoServerName,
    #[error("TLS server name {0} differs from the CONNECT host")]
    Mismatch(String),
    #[error("TLS server name {name} is not allowed: {why}")]
    NotAllowed { name: String, why: String },
}

impl Refusal {
    /// True when the client spoke TLS and is told so with an alert.
    fn alerts(&self) -> bool {
        matches!(
            self,
            Refusal::NoServerName | Refusal::Mismatch(_) | Refusal::NotAllowed { .. }
        )
    }
}

/// Judges a ClientHello's server name against the CONNECT `target` (already allowed for
/// `client`). Pure.
pub fn judge(
    check: SniCheck,
    policy: &Policy,
    client: ClientAddr,
    target: &Target,
    name: Option<&ServerName>,
) -> Result<(), Refusal> {
    if check == SniCheck::Off {
        return Ok(());
    }
    let Some(name) = name else {
        // Clients send no SNI to an IP address (RFC 6066 §3 forbids literal addresses).
        return match target.host {
            Host::Ip(_) => Ok(()),
            Host::Name(_) => Err(Refusal::NoServerName),
        };
    };
    if is_target(name, &target.host) {
        return Ok(());
    }
    match check {
        SniCheck::Off => Ok(()),
        SniCheck::Match => Err(Refusal::Mismatch(name.to_string())),
        SniCheck::Allowlist => {
            let not_allowed = |why: String| Refusal::NotAllowed {
                name: name.to_string(),
                why,
            };
            let host = Host::parse(name.as_str()).map_err(|e| not_allowed(e.to_string()))?;
            let sni_target = Target {
                host,
                port: target.port,
            };
            match policy.decide(client, Request::Connect(&sni_target)) {
                Decision::Deny(denial) => {
                    Err(not_allowed(denial.explain(client, Some(&sni_target))))
                }
                _ => Ok(()),
            }
        }
    }
}

/// True if `name` is the CONNECT host (both are normalised).
fn is_target(name: &ServerName, host: &Host) -> bool {
    match host {
        Host::Name(host) => host == name.as_str(),
        Host::Ip(ip) => name.as_str().parse::<IpAddr>().is_ok_and(|n| n == *ip),
    }
}

// === The tunnel side ===

/// How reading the ClientHello ended.
#[allow(clippy::large_enum_variant)] // as `Scan`
enum Read {
    Hello(Option<ServerName>),
    /// The client closed (or failed) before a complete ClientHello: nothing to judge.
    Closed,
}

/// Runs the SNI check on a tunnel whose `200` was just sent, before the copy: reads the
/// ClientHello from `client`, judges it, and writes the bytes read to `upstream`. Returns false
/// when the tunnel must end here (refused, client gone, drain deadline); a refusal is recorded
/// in `tx` and the client told with an alert when it spoke TLS.
pub async fn screen<C, U>(
    conn: &Conn,
    client: &mut C,
    upstream: &mut U,
    target: &Target,
    tx: &Transaction,
) -> bool
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncWrite + Unpin,
{
    let settings = &conn.shared.settings;
    let check = settings.sni_check;
    let non_tls = settings
        .non_tls_ports
        .as_ref()
        .is_some_and(|ports| ports.contains(target.port));
    if check == SniCheck::Off || non_tls {
        return true;
    }
    tokio::select! {
        passed = screen_hello(conn, check, client, upstream, target, tx) => passed,
        _ = conn.shared.hard_stop.cancelled() => false,
    }
}

async fn screen_hello<C, U>(
    conn: &Conn,
    check: SniCheck,
    client: &mut C,
    upstream: &mut U,
    target: &Target,
    tx: &Transaction,
) -> bool
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncWrite + Unpin,
{
    let mut buf = Vec::with_capacity(MAX_HELLO_BYTES);
    let timeout = conn.shared.settings.header_timeout;
    let verdict = match tokio::time::timeout(timeout, read_hello(client, &mut buf)).await {
        Err(_) => Err(Refusal::Timeout),
        Ok(Err(e)) => Err(Refusal::Hello(e)),
        Ok(Ok(Read::Closed)) => {
            tracing::debug!(%target, "client closed the tunnel before its ClientHello");
            return false;
        }
        Ok(Ok(Read::Hello(name))) => {
            let policy = conn.shared.policy.load();
            judge(check, &policy, conn.client, target, name.as_ref())
        }
    };
    if let Err(refusal) = verdict {
        refuse(conn, client, target, tx, &refusal).await;
        return false;
    }
    if let Err(e) = upstream.write_all(&buf).await {
        tracing::debug!(%target, error = %e, "upstream failed taking the ClientHello");
        return false;
    }
    tx.counter(Direction::ClientToUpstream).add(buf.len());
    true
}

/// Reads until `buf` holds a complete ClientHello (or proves it is not one), at most
/// [`MAX_HELLO_BYTES`].
async fn read_hello<C>(client: &mut C, buf: &mut Vec<u8>) -> Result<Read, HelloError>
where
    C: AsyncRead + Unpin,
{
    loop {
        let wanted = match scan(buf)? {
            Scan::Hello(name) => return Ok(Read::Hello(name)),
            Scan::NeedMore(wanted) => wanted,
        };
        if wanted > MAX_HELLO_BYTES {
            return Err(HelloError::TooLarge);
        }
        // Read up to the end of the record in progress before scanning again.
        while buf.len() < wanted {
            let room = MAX_HELLO_BYTES - buf.len();
            match (&mut *client).take(room as u64).read_buf(buf).await {
                Ok(0) | Err(_) => return Ok(Read::Closed),
                Ok(_) => {}
            }
        }
    }
}

/// Records a refusal, alerts a TLS client, and closes the client's side.
async fn refuse<C>(
    conn: &Conn,
    client: &mut C,
    target: &Target,
    tx: &Transaction,
    refusal: &Refusal,
) where
    C: AsyncWrite + Unpin,
{
    tracing::debug!(client = %conn.client, %target, %refusal, "SNI check refused the tunnel");
    tx.failed(&ProxyError::SniRefused {
        target: target.to_string(),
        detail: refusal.to_string(),
    });
    tx.response(403, None);
    let _ = tokio::time::timeout(ALERT_TIMEOUT, async {
        if refusal.alerts() && client.write_all(&ACCESS_DENIED_ALERT).await.is_ok() {
            tx.add_local_bytes(ACCESS_DENIED_ALERT.len() as u64);
        }
        let _ = client.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::settings::{Settings, Sources};

    /// The first flight of a real rustls client for `name` (no SNI when `name` is an address).
    fn rustls_hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// A ClientHello record with exactly `extensions` (type, body).
    fn hello_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]); // random
        body.push(0); // session id
        body.extend([0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend([0x01, 0x00]); // null compression
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend(kind.to_be_bytes());
            ext.extend((data.len() as u16).to_be_bytes());
            ext.extend(data);
        }
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut message = vec![CLIENT_HELLO];
        message.extend(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend(body);
        records(&message, MAX_FRAGMENT)
    }

    /// `message` framed as handshake records of at most `size` bytes each.
    fn records(message: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in message.chunks(size) {
            out.extend([0x16, 0x03, 0x01]);
            out.extend((chunk.len() as u16).to_be_bytes());
            out.extend(chunk);
        }
        out
    }

    /// A `server_name` extension body with `names` as host names.
    fn sni(names: &[&str]) -> Vec<u8> {
        let mut list = Vec::new();
        for name in names {
            list.push(HOST_NAME);
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(name.as_bytes());
        }
        let mut body = (list.len() as u16).to_be_bytes().to_vec();
        body.extend(list);
        body
    }

    fn name_of(buf: &[u8]) -> Result<Option<String>, HelloError> {
        match scan(buf)? {
            Scan::Hello(name) => Ok(name.map(|n| n.to_string())),
            Scan::NeedMore(_) => panic!("incomplete: {} bytes", buf.len()),
        }
    }

    /// A ClientHello produced by rustls yields its server name; an address yields none.
    #[test]
    fn rustls_client_hello() {
        let hello = rustls_hello("sts.amazonaws.com");
        assert_eq!(name_of(&hello), Ok(Some("sts.amazonaws.com".into())));
        assert_eq!(name_of(&rustls_hello("10.1.2.3")), Ok(None));
        // Bytes after the ClientHello (early data, the next flight) do not matter.
        let mut more = hello.clone();
        more.extend(b"\x17\x03\x03\x00\x01x");
        assert_eq!(name_of(&more), Ok(Some("sts.amazonaws.com".into())));
    }

    /// Every strict prefix of a ClientHello asks for more, never past the ClientHello's end;
    /// none is an error.
    #[test]
    fn truncated_input_needs_more() {
        let hello = rustls_hello("sts.amazonaws.com");
        for end in 0..hello.len() {
            let want = match end {
                0 => 1,
                1..RECORD_HEADER => RECORD_HEADER,
                _ => hello.len(),
            };
            assert_eq!(
                scan(&hello[..end]),
                Ok(Scan::NeedMore(want)),
                "prefix of {end} bytes"
            );
        }
    }

    /// A ClientHello split over several records, down to one byte each, is reassembled.
    #[test]
    fn multi_record_client_hello() {
        let hello = rustls_hello("s3.us-west-2.amazonaws.com");
        let message = &hello[RECORD_HEADER..];
        for size in [1, 3, 4, 100, message.len() - 1] {
            let framed = records(message, size);
            assert_eq!(
                name_of(&framed),
                Ok(Some("s3.us-west-2.amazonaws.com".into())),
                "records of {size} bytes"
            );
            for end in 0..framed.len() {
                match scan(&framed[..end]) {
                    Ok(Scan::NeedMore(want)) if want > end && want <= framed.len() => {}
                    other => panic!("records of {size} bytes cut at {end}: {other:?}"),
                }
            }
        }
    }

    /// What is not a ClientHello is refused as such.
    #[test]
    fn non_tls_and_malformed_input() {
        let not_tls: [&[u8]; 3] = [b"GET / HTTP/1.1\r\n", b"SSH-2.0-OpenSSH_9.6\r\n", b"\x00"];
        for input in not_tls {
            assert_eq!(scan(input), Err(HelloError::NotTls), "{input:?}");
        }
        let malformed: [(&str, &[u8]); 5] = [
            ("server hello", b"\x16\x03\x03\x00\x04\x02\x00\x00\x00"),
            ("record version", b"\x16\x07\x01\x00\x04\x01\x00\x00\x00"),
            ("empty record", b"\x16\x03\x01\x00\x00"),
            ("oversized record", b"\x16\x03\x01\x40\x01"),
            ("empty body", b"\x16\x03\x01\x00\x04\x01\x00\x00\x00"),
        ];
        for (what, input) in malformed {
            assert!(
                matches!(scan(input), Err(HelloError::Malformed(_))),
                "{what}: {:?}",
                scan(input)
            );
        }
        // An alert record in the middle of a split ClientHello.
        let hello = rustls_hello("sts.amazonaws.com");
        let mut mixed = records(&hello[RECORD_HEADER..RECORD_HEADER + 10], 10);
        mixed.extend(b"\x15\x03\x03\x00\x02\x02\x28");
        assert!(matches!(scan(&mixed), Err(HelloError::Malformed(_))));
    }

    /// Names are normalised; duplicates and bad names are refused; large hellos within the bound
    /// parse, larger ones are refused.
    #[test]
    fn server_name_extension() {
        type Case = (
            Vec<(u16, Vec<u8>)>,
            Result<Option<&'static str>, HelloError>,
        );
        let cases: [Case; 8] = [
            (vec![(0, sni(&["Example.COM."]))], Ok(Some("example.com"))),
            (vec![(0x0a0a, vec![]), (0, sni(&["a.b"]))], Ok(Some("a.b"))),
            (vec![(16, b"\x00\x03\x02h2".to_vec())], Ok(None)),
            (vec![(0, sni(&[]))], Ok(None)),
            (
                vec![(0, sni(&["a.com", "b.com"]))],
                Err(HelloError::Malformed("more than one host name")),
            ),
            (
                vec![(0, sni(&["a.com"])), (0, sni(&["b.com"]))],
                Err(HelloError::Malformed("more than one server_name extension")),
            ),
            (
                vec![(0, sni(&["bad name"]))],
                Err(HelloError::Malformed("server name is not printable ASCII")),
            ),
            (
                vec![(0, sni(&[&"a".repeat(254)]))],
                Err(HelloError::Malformed("server name longer than 253 bytes")),
            ),
        ];
        for (extensions, want) in cases {
            let got = name_of(&hello_with(&extensions));
            assert_eq!(
                got,
                want.map(|n| n.map(String::from)),
                "extensions {extensions:?}"
            );
        }
        let padded = hello_with(&[(21, vec![0; 12_000]), (0, sni(&["big.example.com"]))]);
        assert_eq!(name_of(&padded), Ok(Some("big.example.com".into())));
        let huge = [(21, vec![0; MAX_FRAGMENT]), (0, sni(&["big.example.com"]))];
        let mut message = hello_with(&huge)[RECORD_HEADER..].to_vec();
        message.truncate(MAX_FRAGMENT); // the rest would follow in later records
        assert_eq!(
            scan(&records(&message, MAX_FRAGMENT)),
            Err(HelloError::TooLarge)
        );
    }

    fn policy(check: &str) -> (Policy, SniCheck) {
        let settings = Settings::load(&Sources::from_env([
            ("SQUID_WHITELIST", ".allowed.example,10.0.0.0/8"),
            ("CUTTLE_SNI_CHECK", check),
        ]))
        .unwrap();
        (Policy::new(&settings).unwrap(), settings.sni_check)
    }

    /// `match` wants the CONNECT host; `allowlist` any allowed name; no name only for addresses.
    #[test]
    fn judgement() {
        let client = ClientAddr::new("10.1.2.3:40000".parse().unwrap());
        let name = |s: &str| ServerName::new(s.as_bytes()).unwrap();
        let target = |s: &str| Target::parse_authority(s, None).unwrap();
        let cases = [
            (
                "match",
                "sts.amazonaws.com:443",
                Some("STS.amazonaws.com."),
                true,
            ),
            ("match", "sts.amazonaws.com:443", Some("evil.com"), false),
            (
                "match",
                "sts.amazonaws.com:443",
                Some("a.allowed.example"),
                false,
            ),
            ("match", "sts.amazonaws.com:443", None, false),
            ("match", "10.1.1.1:443", None, true),
            ("match", "10.1.1.1:443", Some("10.1.1.1"), true),
            ("match", "10.1.1.1:443", Some("evil.com"), false),
            (
                "allowlist",
                "sts.amazonaws.com:443",
                Some("a.allowed.example"),
                true,
            ),
            (
                "allowlist",
                "sts.amazonaws.com:443",
                Some("iam.amazonaws.com"),
                true,
            ),
            (
                "allowlist",
                "sts.amazonaws.com:443",
                Some("evil.com"),
                false,
            ),
            ("allowlist", "sts.amazonaws.com:443", Some("10.9.9.9"), true),
            (
                "allowlist",
                "sts.amazonaws.com:443",
                Some("bad_name..com"),
                false,
            ),
            ("allowlist", "sts.amazonaws.com:443", None, false),
        ];
        for (check, connect, sni, want) in cases {
            let (policy, check_mode) = policy(check);
            let got = judge(
                check_mode,
                &policy,
                client,
                &target(connect),
                sni.map(name).as_ref(),
            );
            assert_eq!(
                got.is_ok(),
                want,
                "{check}: CONNECT {connect}, SNI {sni:?}: {got:?}"
            );
        }
    }
}
