//! Destination host names and IP literals, normalised once.
//!
//! Every host the proxy judges goes through [`Host::parse`]: lowercase, trailing dot stripped,
//! IDNA (Unicode) names converted to punycode, IP literals (dotted IPv4, bracketed or bare IPv6)
//! recognised, and anything that is not a valid DNS name refused. Matching code then compares
//! normalised names only, never raw request text.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// A destination host, normalised.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name: lowercase ASCII (punycode), no trailing dot, labels 1..=63 bytes of
    /// `[a-z0-9_-]`, at most 253 bytes in all.
    Name(String),
    /// An IP literal (`10.1.2.3`, `[::1]` or `::1`). IPv4-mapped IPv6 literals are kept as IPv6.
    Ip(IpAddr),
}

/// Why a host was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host")]
    Empty,
    #[error("host {0:?} is too long (at most 253 characters)")]
    TooLong(String),
    #[error("host {0:?} has an empty label")]
    EmptyLabel(String),
    #[error("host {0:?} has a label longer than 63 characters")]
    LabelTooLong(String),
    #[error("host {0:?} has a character not allowed in a host name")]
    BadChar(String),
    #[error("host {0:?} is not a valid internationalised name")]
    Idna(String),
    #[error("host {0:?} looks like a numeric IP address in a non-standard form")]
    AmbiguousNumeric(String),
}

impl Host {
    /// Parses and normalises a host as it appears in a request target or an allowlist entry
    /// (without port). Accepts `[v6]` and bare IPv6; refuses names whose last label is all
    /// digits or `0x`-hex (`2130706433`, `127.1`, `0x7f.1`: numeric forms that some resolvers
    /// and libraries read as IPv4 addresses).
    pub fn parse(s: &str) -> Result<Host, HostError> {
        if s.is_empty() {
            return Err(HostError::Empty);
        }
        let body = s.strip_suffix('.').unwrap_or(s);
        if body.is_empty() {
            return Err(HostError::Empty);
        }
        if let Some(inner) = body.strip_prefix('[') {
            // `[v6]` is the only bracketed form (RFC 3986 IP-literal); no zone ids.
            return match inner.strip_suffix(']').map(str::parse::<Ipv6Addr>) {
                Some(Ok(ip)) => Ok(Host::Ip(IpAddr::V6(ip))),
                _ => Err(HostError::BadChar(s.to_owned())),
            };
        }
        // std accepts only the plain dotted-quad IPv4 form; `127.1`, `0x7f.0.0.1` and `017.0.0.1`
        // fall through and are refused as names below.
        if let Ok(ip) = body.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        let mut name = body.to_ascii_lowercase();
        if !name.is_ascii() || name.contains("xn--") {
            name = idna::domain_to_ascii(&name).map_err(|_| HostError::Idna(s.to_owned()))?;
        }
        validate_name(&name, s)?;
        Ok(Host::Name(name))
    }

    /// The name, if this is a DNS name.
    pub fn as_name(&self) -> Option<&str> {
        match self {
            Host::Name(n) => Some(n),
            Host::Ip(_) => None,
        }
    }
}

impl fmt::Display for Host {
    /// Names as they are; IPv6 in brackets (ready for `host:port`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

/// Checks a lowercased ASCII name against the DNS rules cuttle enforces; `given` is the caller's
/// text, quoted in the error.
fn validate_name(name: &str, given: &str) -> Result<(), HostError> {
    if name.len() > 253 {
        return Err(HostError::TooLong(given.to_owned()));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostError::EmptyLabel(given.to_owned()));
        }
        if label.len() > 63 {
            return Err(HostError::LabelTooLong(given.to_owned()));
        }
        if !label.bytes().all(is_name_byte) {
            return Err(HostError::BadChar(given.to_owned()));
        }
    }
    if name.rsplit('.').next().is_some_and(is_numeric_label) {
        return Err(HostError::AmbiguousNumeric(given.to_owned()));
    }
    Ok(())
}

/// `[a-z0-9_-]`: letters, digits, hyphen, and the underscore real-world names use (`_dmarc`,
/// some CDN hosts).
pub(crate) fn is_name_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}

/// A label that WHATWG URL parsing, `inet_aton` and friends read as an IPv4 number when it is the
/// last one: all decimal digits, or `0x` followed by hex digits (possibly none).
pub(crate) fn is_numeric_label(label: &str) -> bool {
    if let Some(hex) = label.strip_prefix("0x") {
        return hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn name(s: &str) -> Result<Host, HostError> {
        Ok(Host::Name(s.to_owned()))
    }

    /// Valid names are normalised: lowercase, one trailing dot dropped, IDNA to punycode.
    #[test]
    fn names_are_normalised() {
        let long_label = "a".repeat(63);
        let max_name = format!("{0}.{0}.{0}.{1}", long_label, "b".repeat(61));
        assert_eq!(max_name.len(), 253);
        let cases: &[(&str, Result<Host, HostError>)] = &[
            ("example.com", name("example.com")),
            ("EXAMPLE.Com", name("example.com")),
            ("example.com.", name("example.com")),
            ("Example.COM.", name("example.com")),
            ("localhost", name("localhost")),
            ("_dmarc.example.com", name("_dmarc.example.com")),
            ("a-b.example.com", name("a-b.example.com")),
            ("1.2.3.4a", name("1.2.3.4a")),
            ("123.example.com", name("123.example.com")),
            (
                "s3.us-west-2.amazonaws.com",
                name("s3.us-west-2.amazonaws.com"),
            ),
            ("bücher.example", name("xn--bcher-kva.example")),
            ("BÜCHER.example", name("xn--bcher-kva.example")),
            ("xn--bcher-kva.example", name("xn--bcher-kva.example")),
            ("XN--BCHER-KVA.example.", name("xn--bcher-kva.example")),
            (&long_label, Ok(Host::Name(long_label.clone()))),
            (&max_name, Ok(Host::Name(max_name.clone()))),
        ];
        for (input, want) in cases {
            assert_eq!(&Host::parse(input), want, "Host::parse({input:?})");
        }
    }

    /// IP literals: dotted IPv4, bare or bracketed IPv6; mapped IPv6 stays IPv6.
    #[test]
    fn ip_literals() {
        let v4 = |a, b, c, d| Ok(Host::Ip(IpAddr::V4(Ipv4Addr::new(a, b, c, d))));
        let v6 = |s: &str| Ok(Host::Ip(IpAddr::V6(s.parse().unwrap())));
        let cases: &[(&str, Result<Host, HostError>)] = &[
            ("10.1.2.3", v4(10, 1, 2, 3)),
            ("127.0.0.1", v4(127, 0, 0, 1)),
            ("10.1.2.3.", v4(10, 1, 2, 3)),
            ("::1", v6("::1")),
            ("[::1]", v6("::1")),
            ("[2001:DB8::1]", v6("2001:db8::1")),
            ("::ffff:127.0.0.1", v6("::ffff:127.0.0.1")),
            ("[::ffff:10.1.2.3]", v6("::ffff:10.1.2.3")),
            ("[10.1.2.3]", Err(HostError::BadChar("[10.1.2.3]".into()))),
            ("[::1", Err(HostError::BadChar("[::1".into()))),
            (
                "[fe80::1%eth0]",
                Err(HostError::BadChar("[fe80::1%eth0]".into())),
            ),
            (
                "fe80::1%eth0",
                Err(HostError::BadChar("fe80::1%eth0".into())),
            ),
            ("[]", Err(HostError::BadChar("[]".into()))),
        ];
        for (input, want) in cases {
            assert_eq!(&Host::parse(input), want, "Host::parse({input:?})");
        }
    }

    /// Everything that is not a valid DNS name or IP literal is refused with the right reason.
    #[test]
    fn invalid_hosts_are_refused() {
        use HostError::*;
        let long_label = "a".repeat(64);
        let long_name = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(62));
        assert_eq!(long_name.len(), 254);
        let long_label_name = format!("{long_label}.com");
        type Reason = fn(String) -> HostError;
        let cases: Vec<(&str, Reason)> = vec![
            ("a..b", EmptyLabel),
            (".a", EmptyLabel),
            (".example.com", EmptyLabel),
            ("example.com..", EmptyLabel),
            ("..", EmptyLabel),
            (&long_label_name, LabelTooLong),
            (&long_name, TooLong),
            ("exa mple.com", BadChar),
            (" example.com", BadChar),
            ("example.com ", BadChar),
            ("example%2ecom", BadChar),
            ("%65xample.com", BadChar),
            ("user@example.com", BadChar),
            ("example.com/path", BadChar),
            ("example.com:443", BadChar),
            ("exa*mple.com", BadChar),
            ("2130706433", AmbiguousNumeric),
            ("127.1", AmbiguousNumeric),
            ("0x7f.0.0.1", AmbiguousNumeric),
            ("0x7f000001", AmbiguousNumeric),
            ("0X7F.0.0.1", AmbiguousNumeric),
            ("1.2.3", AmbiguousNumeric),
            ("017.0.0.1", AmbiguousNumeric),
            ("010.0.0.1", AmbiguousNumeric),
            ("1.2.3.4.5", AmbiguousNumeric),
            ("example.0x", AmbiguousNumeric),
            ("example.123", AmbiguousNumeric),
            ("１２７.0.0.1", AmbiguousNumeric),
            ("xn--zz-", Idna),
            ("xn--a.example", Idna),
        ];
        for (input, want) in cases {
            assert_eq!(
                Host::parse(input),
                Err(want(input.to_owned())),
                "Host::parse({input:?})"
            );
        }
        for input in ["", "."] {
            assert_eq!(Host::parse(input), Err(Empty), "Host::parse({input:?})");
        }
    }

    /// Display gives names as they are and brackets IPv6 for `host:port`.
    #[test]
    fn display() {
        let cases = [
            ("Example.com.", "example.com"),
            ("10.1.2.3", "10.1.2.3"),
            ("::1", "[::1]"),
            ("[::ffff:10.1.2.3]", "[::ffff:10.1.2.3]"),
        ];
        for (input, want) in cases {
            let host = Host::parse(input).unwrap();
            assert_eq!(host.to_string(), want, "display of {input:?}");
        }
    }

    /// `as_name` is the name for names only.
    #[test]
    fn as_name() {
        assert_eq!(Host::parse("A.b").unwrap().as_name(), Some("a.b"));
        assert_eq!(Host::parse("::1").unwrap().as_name(), None);
    }
}
