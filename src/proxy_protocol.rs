//! PROXY protocol v1 and v2 on the proxy listener (`CUTTLE_PROXY_PROTOCOL`,
//! `CUTTLE_PROXY_PROTOCOL_FROM`).
//!
//! Behind a load balancer that does not keep the client's address (an AWS NLB with IP targets,
//! as on ECS Fargate) every connection comes from the balancer, and the client CIDR check, the
//! access log and the metrics would judge the balancer. The balancer can instead put a PROXY
//! protocol header in front of the client's bytes; cuttle reads it after `accept` and before
//! HTTP, and the address it names becomes the connection's client everywhere.
//!
//! - Only peers in `CUTTLE_PROXY_PROTOCOL_FROM` may send a header. A header from any other peer
//!   closes the connection: nobody else may choose the address cuttle judges.
//! - `optional`: a trusted peer may also send no header (its own address is then the client).
//!   `required`: a connection without a valid header from a trusted peer is closed.
//! - A v2 `LOCAL` header (the balancer's own health check), v2 without addresses and v1
//!   `PROXY UNKNOWN` keep the peer's address.
//! - A closed connection gets no response (it may not even be HTTP) and is counted in
//!   `cuttle_proxy_protocol_rejected_total{reason="untrusted|malformed|missing"}`.
//!
//! The header is peeked, parsed with `ppp`, then exactly its bytes are consumed, so the request
//! behind it reaches hyper untouched. The wait is bounded by `CUTTLE_HEADER_TIMEOUT`. The
//! admin listener never takes PROXY protocol.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use ppp::PartialResult;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::client_acl::ClientAddr;
use crate::metrics::ProxyProtocolRejection;
use crate::server::Shared;
use crate::settings::ProxyProtocol;

/// The v1 (text) signature.
const V1_SIGNATURE: &[u8] = b"PROXY ";
/// The v2 (binary) signature.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The v2 fixed part: signature, version and command, family and protocol, length.
const V2_FIXED: usize = 16;
/// Longest header accepted: a v1 line is at most 107 bytes, a v2 header 16 bytes plus the
/// addresses (at most 216, for Unix sockets) plus the TLVs balancers add (the AWS NLB adds its
/// VPC endpoint ID, a few dozen bytes).
pub const MAX_HEADER_BYTES: usize = 1024;
/// First pause between two peeks at an incomplete header; doubled up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const MAX_PAUSE: Duration = Duration::from_millis(100);

// === Parsing ===

/// What the first bytes of a connection hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Peeked {
    /// Too few bytes to tell.
    Incomplete,
    /// No PROXY protocol header: the connection starts with its request.
    NoHeader,
    /// A header of `len` bytes naming `source` as the client (`None`: keep the peer's address).
    Header {
        len: usize,
        source: Option<SocketAddr>,
    },
    /// Starts with a PROXY protocol signature but is not a valid header.
    Malformed(String),
}

/// Whether `buf` starts with a PROXY protocol signature (v1 or v2); `None` while too short to
/// tell.
pub fn has_signature(buf: &[u8]) -> Option<bool> {
    let mut undecided = false;
    for signature in [V1_SIGNATURE, V2_SIGNATURE] {
        let n = buf.len().min(signature.len());
        if buf[..n] == signature[..n] {
            if n == signature.len() {
                return Some(true);
            }
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(false)
    }
}

/// Parses the header at the start of `buf` (which may hold the request after it). Pure.
pub fn parse(buf: &[u8]) -> Peeked {
    match has_signature(buf) {
        None => return Peeked::Incomplete,
        Some(false) => return Peeked::NoHeader,
        Some(true) => {}
    }
    if buf.starts_with(V2_SIGNATURE) {
        parse_v2(buf)
    } else {
        parse_v1(buf)
    }
}

fn parse_v2(buf: &[u8]) -> Peeked {
    use ppp::v2::{Addresses, Command, Header, ParseError};
    match Header::try_from(buf) {
        Ok(header) => {
            let source = match (header.command, header.addresses) {
                (Command::Proxy, Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (Command::Proxy, Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                // LOCAL (the balancer's own connection), AF_UNSPEC, AF_UNIX.
                _ => None,
            };
            Peeked::Header {
                len: header.len(),
                source,
            }
        }
        Err(ParseError::Partial(_, len)) if V2_FIXED + len > MAX_HEADER_BYTES => {
            Peeked::Malformed(format!(
                "v2 header of {} bytes is longer than {MAX_HEADER_BYTES}",
                V2_FIXED + len
            ))
        }
        Err(e) if e.is_incomplete() => Peeked::Incomplete,
        Err(e) => Peeked::Malformed(format!("v2: {e}")),
    }
}

fn parse_v1(buf: &[u8]) -> Peeked {
    use ppp::v1::{Addresses, Header};
    match Header::try_from(buf) {
        Ok(header) => {
            let source = match header.addresses {
                Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                Addresses::Unknown => None,
            };
            Peeked::Header {
                len: header.header.len(),
                source,
            }
        }
        Err(e) if e.is_incomplete() => Peeked::Incomplete,
        Err(e) => Peeked::Malformed(format!("v1: {e}")),
    }
}

/// True if `peer` may send a header.
pub fn is_trusted(from: &[IpNet], peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    from.iter().any(|net| net.contains(&peer))
}

// === The connection side ===

/// How the wait for the first bytes ended.
enum Wait {
    /// The peer closed (or the socket failed) before sending anything.
    Closed,
    /// `CUTTLE_HEADER_TIMEOUT` passed; `bytes` had arrived.
    TimedOut { bytes: usize },
    /// Enough bytes to decide.
    Done(Peeked),
}

/// Reads the PROXY protocol header of a connection just accepted on the proxy listener from
/// `peer`, when `CUTTLE_PROXY_PROTOCOL` is on. Returns the client the connection speaks for, or
/// `None` when it must be closed (refusals are counted and logged at debug).
pub async fn accept(
    stream: &mut TcpStream,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<ClientAddr> {
    let settings = &shared.settings;
    let required = match settings.proxy_protocol {
        ProxyProtocol::Off => return Some(ClientAddr::new(peer)),
        ProxyProtocol::Optional => false,
        ProxyProtocol::Required => true,
    };
    let trusted = is_trusted(&settings.proxy_protocol_from, peer.ip());
    let mut buf = [0u8; MAX_HEADER_BYTES];
    // An untrusted peer is judged on the signature alone.
    let classify = |bytes: &[u8]| {
        if trusted {
            parse(bytes)
        } else {
            match has_signature(bytes) {
                None => Peeked::Incomplete,
                Some(false) => Peeked::NoHeader,
                Some(true) => Peeked::Header {
                    len: 0,
                    source: None,
                },
            }
        }
    };
    let deadline = Instant::now() + settings.header_timeout;
    let wait = tokio::select! {
        wait = peek(stream, &mut buf, deadline, classify) => wait,
        _ = shared.hard_stop.cancelled() => return None,
    };
    let rejection = match wait {
        Wait::Closed => return None,
        // Nothing at all: what hyper's own header timeout would have closed.
        Wait::TimedOut { bytes: 0 } if !required => return None,
        Wait::TimedOut { bytes: 0 } => {
            (ProxyProtocolRejection::Missing, "no header in time".into())
        }
        Wait::TimedOut { .. } => (
            ProxyProtocolRejection::Malformed,
            "header incomplete at CUTTLE_HEADER_TIMEOUT".into(),
        ),
        Wait::Done(Peeked::NoHeader) if !required => return Some(ClientAddr::new(peer)),
        Wait::Done(Peeked::NoHeader) => (ProxyProtocolRejection::Missing, "no header".into()),
        Wait::Done(_) if !trusted => (
            ProxyProtocolRejection::Untrusted,
            "header from a peer outside CUTTLE_PROXY_PROTOCOL_FROM".into(),
        ),
        Wait::Done(Peeked::Malformed(detail)) => (ProxyProtocolRejection::Malformed, detail),
        Wait::Done(Peeked::Header { len, source }) => {
            // Consume exactly the header: the bytes are already there.
            if stream.read_exact(&mut buf[..len]).await.is_err() {
                return None;
            }
            let client = ClientAddr::new(source.unwrap_or(peer));
            tracing::trace!(%peer, %client, "PROXY protocol header");
            return Some(client);
        }
        Wait::Done(Peeked::Incomplete) => return None,
    };
    let (reason, detail) = rejection;
    tracing::debug!(%peer, reason = reason.label(), %detail, "PROXY protocol: connection closed");
    shared.observer.metrics.proxy_protocol_rejected(reason);
    None
}

/// Peeks at the first bytes until `classify` can tell (anything but [`Peeked::Incomplete`]),
/// the buffer is full, the peer closes, or `deadline` passes. Nothing is consumed.
///
/// A peek does not clear the socket's readiness, so peeking again at an incomplete header
/// would spin; the loop pauses instead, from 1 ms doubling to 100 ms (a header normally
/// arrives whole in the first segment, so this is rare).
async fn peek(
    stream: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    classify: impl Fn(&[u8]) -> Peeked,
) -> Wait {
    let mut seen = 0;
    let mut pause = FIRST_PAUSE;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(buf)).await {
            Err(_) => return Wait::TimedOut { bytes: seen },
            Ok(Err(_)) | Ok(Ok(0)) => return Wait::Closed,
            Ok(Ok(n)) => n,
        };
        match classify(&buf[..n]) {
            Peeked::Incomplete if n == buf.len() => {
                return Wait::Done(Peeked::Malformed(format!(
                    "no complete header in {MAX_HEADER_BYTES} bytes"
                )))
            }
            Peeked::Incomplete => {}
            done => return Wait::Done(done),
        }
        if n > seen {
            pause = FIRST_PAUSE;
        } else {
            pause = (pause * 2).min(MAX_PAUSE);
        }
        seen = n;
        if Instant::now() + pause >= deadline {
            tokio::time::sleep_until(deadline).await;
            return Wait::TimedOut { bytes: seen };
        }
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(0x20 | command);
        header.push(family);
        header.extend(((addresses.len() + tlvs.len()) as u16).to_be_bytes());
        header.extend(addresses);
        header.extend(tlvs);
        header
    }

    fn header(len: usize, source: Option<&str>) -> Peeked {
        Peeked::Header {
            len,
            source: source.map(|s| s.parse().unwrap()),
        }
    }

    /// v1 lines: addresses, UNKNOWN, partial lines, and what follows the header.
    #[test]
    fn v1_headers() {
        let line = "PROXY TCP4 10.1.2.3 10.0.0.1 40000 3128\r\n";
        let cases: Vec<(String, Peeked)> = vec![
            (line.into(), header(line.len(), Some("10.1.2.3:40000"))),
            (
                format!("{line}CONNECT sts.amazonaws.com:443 HTTP/1.1\r\n"),
                header(line.len(), Some("10.1.2.3:40000")),
            ),
            (
                "PROXY TCP6 2001:db8::1 2001:db8::2 4000 3128\r\n".into(),
                header(46, Some("[2001:db8::1]:4000")),
            ),
            ("PROXY UNKNOWN\r\n".into(), header(15, None)),
            (
                "PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n".into(),
                header(35, None),
            ),
            ("P".into(), Peeked::Incomplete),
            ("PROXY".into(), Peeked::Incomplete),
            ("PROXY TCP4 10.1.2.3".into(), Peeked::Incomplete),
            (line[..line.len() - 1].into(), Peeked::Incomplete),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input.as_bytes()), want, "{input:?}");
        }
        let malformed = [
            "PROXY TCP4 10.1.2.3 10.0.0.1 40000 3128\n",
            "PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",
            "PROXY TCP5 10.1.2.3 10.0.0.1 1 2\r\n",
            "PROXY TCP4 10.1.2.3 10.0.0.1 99999 2\r\n",
        ];
        for input in malformed {
            assert!(
                matches!(parse(input.as_bytes()), Peeked::Malformed(_)),
                "{input:?}: {:?}",
                parse(input.as_bytes())
            );
        }
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(120));
        assert!(matches!(parse(long.as_bytes()), Peeked::Malformed(_)));
    }

    /// v2 headers: PROXY over IPv4 and IPv6, LOCAL, TLVs, partial and oversized headers.
    #[test]
    fn v2_headers() {
        let ipv4 = [10, 1, 2, 3, 10, 0, 0, 1, 0x9c, 0x40, 0x0c, 0x38];
        let mut ipv6 = [0u8; 36];
        ipv6[..16].copy_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        ipv6[32..34].copy_from_slice(&4000u16.to_be_bytes());
        let aws_tlv = b"\xea\x00\x17\x01vpce-08d2bf15fac5001c9";
        let cases = [
            (v2(1, 0x11, &ipv4, &[]), header(28, Some("10.1.2.3:40000"))),
            (
                v2(1, 0x11, &ipv4, aws_tlv),
                header(28 + aws_tlv.len(), Some("10.1.2.3:40000")),
            ),
            (
                v2(1, 0x21, &ipv6, &[]),
                header(52, Some("[2001:db8::1]:4000")),
            ),
            (v2(0, 0x00, &[], &[]), header(16, None)),
            (v2(0, 0x11, &ipv4, &[]), header(28, None)),
            (v2(1, 0x00, &[], &[]), header(16, None)),
        ];
        for (input, want) in cases {
            assert_eq!(parse(&input), want, "{input:?}");
            let mut with_request = input.clone();
            with_request.extend(b"GET /healthz HTTP/1.1\r\n\r\n");
            assert_eq!(parse(&with_request), want, "{input:?} + request");
            for end in 1..input.len() {
                assert_eq!(
                    parse(&input[..end]),
                    Peeked::Incomplete,
                    "{input:?} cut at {end}"
                );
            }
        }
        let malformed = [
            ("version 1", {
                let mut h = v2(1, 0x11, &ipv4, &[]);
                h[12] = 0x11;
                h
            }),
            ("command 2", v2(2, 0x11, &ipv4, &[])),
            ("family 4", v2(1, 0x41, &ipv4, &[])),
            ("short addresses", v2(1, 0x11, &ipv4[..8], &[])),
            ("too long", v2(1, 0x11, &ipv4, &[0; MAX_HEADER_BYTES])),
        ];
        for (what, input) in malformed {
            assert!(
                matches!(parse(&input[..input.len().min(64)]), Peeked::Malformed(_)),
                "{what}: {:?}",
                parse(&input)
            );
        }
    }

    /// Requests without a header are told apart from a header's first bytes.
    #[test]
    fn no_header() {
        for input in [
            &b"CONNECT sts.amazonaws.com:443 HTTP/1.1\r\n"[..],
            b"POST http://example.com/ HTTP/1.1\r\n",
            b"PUT ",
            b"PRI * HTTP/2.0\r\n",
            b"\r\nGET / HTTP/1.1\r\n",
            b"\x16\x03\x01",
        ] {
            assert_eq!(parse(input), Peeked::NoHeader, "{input:?}");
        }
        assert_eq!(has_signature(b""), None);
        assert_eq!(has_signature(b"\r\n\r\n"), None);
        assert_eq!(has_signature(b"PROXY "), Some(true));
    }

    /// Trusted peers by CIDR, IPv4-mapped peers canonicalised.
    #[test]
    fn trusted_peers() {
        let from: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        for (peer, want) in [
            ("10.9.8.7", true),
            ("::ffff:10.9.8.7", true),
            ("fd00::1", true),
            ("127.0.0.1", false),
            ("::ffff:127.0.0.1", false),
        ] {
            assert_eq!(is_trusted(&from, peer.parse().unwrap()), want, "{peer}");
        }
    }
}
