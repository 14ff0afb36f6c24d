//! The operator subcommands: `cuttle check`, `cuttle config`, `cuttle healthcheck`. Each reads
//! the same settings sources as the server and returns its text and outcome; `main` prints.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::allowlist::Allowlist;
use crate::client_acl::ClientAddr;
use crate::guard::AddressGuard;
use crate::host::Host;
use crate::policy::{Decision, Policy, Request, Target};
use crate::settings::{Key, Origin, Settings};

/// The verdict of `cuttle check`: the text to print and whether the request is allowed.
pub struct CheckOutcome {
    pub text: String,
    pub allowed: bool,
}

/// Evaluates the configured policy for `target` (`HOST[:PORT]`) as `method` from `from`
/// (any admitted client when `None`), plus the destination guard for IP literals.
pub fn check(
    settings: &Settings,
    target: &str,
    method: &str,
    from: Option<IpAddr>,
) -> Result<CheckOutcome, String> {
    let policy = Policy::new(settings).map_err(|e| e.to_string())?;
    let connect = method.eq_ignore_ascii_case("CONNECT");
    let target = Target::parse_authority(target, Some(if connect { 443 } else { 80 }))
        .map_err(|e| format!("target: {e}"))?;
    let request = if connect {
        Request::Connect(&target)
    } else {
        Request::Http(&target)
    };
    let method = method.to_ascii_uppercase();
    let client = from.map(|ip| ClientAddr::new(SocketAddr::new(ip, 0)));
    let decision = match client {
        Some(client) => policy.decide(client, request),
        None => policy.decide_destination(request),
    };
    let who = match from {
        Some(ip) => format!(" from {ip}"),
        None => String::new(),
    };
    let mut text = format!("{method} {target}{who}: ");
    let allowed = match decision {
        Decision::Allow(rule) => {
            let guard = AddressGuard::new(
                &settings.upstream_allow_cidrs,
                &settings.upstream_deny_cidrs,
                vec![settings.listen],
            );
            match &target.host {
                Host::Ip(ip) => match guard.check(SocketAddr::new(*ip, target.port)) {
                    Ok(()) => {
                        let _ = write!(text, "allowed by {rule}");
                        true
                    }
                    Err(refusal) => {
                        let _ = write!(text, "refused (upstream_address): {ip} is {refusal}");
                        false
                    }
                },
                Host::Name(_) => {
                    let _ = write!(
                        text,
                        "allowed by {rule}\n(the destination address guard still applies to the addresses the name resolves to)"
                    );
                    true
                }
            }
        }
        Decision::Deny(denial) => {
            let client =
                client.unwrap_or_else(|| ClientAddr::new(SocketAddr::from(([0, 0, 0, 0], 0))));
            let _ = write!(
                text,
                "refused ({}): {}",
                denial.reason().label(),
                denial.explain(client, Some(&target))
            );
            false
        }
    };
    if from.is_none() {
        text.push_str("\n(client not checked: add --from IP to check ALLOWED_CIDRS too)");
    }
    Ok(CheckOutcome { text, allowed })
}

/// The effective settings, each with where it came from, and the full allowlist with the
/// source of every entry (and the covered entries that were dropped).
pub fn config(settings: &Settings) -> Result<String, String> {
    let allowlist = Allowlist::new(settings.allowlist.clone()).map_err(|e| e.to_string())?;
    let mut out = String::from("# Settings (value, then where it came from)\n");
    for key in Key::ALL {
        let origin = match settings.origins.get(&key) {
            Some(Origin::Default(_)) | None => "default".to_string(),
            Some(origin) => origin.to_string(),
        };
        let _ = writeln!(
            out,
            "{:<28} {:<40} {origin}",
            key.env_name(),
            settings.value_text(key)
        );
    }
    if settings.no_whitelist {
        out.push_str("\n# NO_WHITELIST=true: every destination is allowed; the entries below are not consulted\n");
    }
    let _ = writeln!(
        out,
        "\n# Allowlist: {} entries in force (entry, then its source)",
        allowlist.len()
    );
    for entry in allowlist.entries() {
        let _ = writeln!(out, "{:<44} {}", entry.pattern.to_string(), entry.source);
    }
    let dropped: Vec<_> = settings
        .allowlist
        .iter()
        .filter(|e| !allowlist.entries().contains(e))
        .collect();
    if !dropped.is_empty() {
        let _ = writeln!(
            out,
            "\n# Covered by another entry, dropped: {}",
            dropped.len()
        );
        for entry in dropped {
            let _ = writeln!(out, "{:<44} {}", entry.pattern.to_string(), entry.source);
        }
    }
    Ok(out)
}

/// The URL `cuttle healthcheck` probes by default: `/healthz` on the admin listener if set,
/// else on the proxy listener, through loopback when bound to all addresses.
pub fn default_health_url(settings: &Settings) -> String {
    let mut addr = settings.admin_listen.unwrap_or(settings.listen);
    if addr.ip().is_unspecified() {
        let loopback: IpAddr = if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        addr.set_ip(loopback);
    }
    format!("http://{addr}/healthz")
}

/// GETs `url` (`http://HOST:PORT/PATH`, HOST an IP address) and succeeds on a 200.
pub async fn healthcheck(url: &str, timeout: Duration) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--url {url:?}: expected http://IP:PORT/PATH"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/healthz"),
    };
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| format!("--url {url:?}: expected http://IP:PORT/PATH"))?;
    let probe = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let mut head = vec![0u8; 256];
        let n = stream
            .read(&mut head)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status_line = String::from_utf8_lossy(&head[..n]);
        let status_line = status_line.lines().next().unwrap_or_default().to_string();
        if status_line.split_whitespace().nth(1) == Some("200") {
            Ok(())
        } else {
            Err(format!("{url}: {status_line}"))
        }
    };
    tokio::time::timeout(timeout, probe)
        .await
        .map_err(|_| format!("{url}: no answer within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Sources;

    fn settings(vars: &[(&str, &str)]) -> Settings {
        Settings::load(&Sources::from_env(vars.iter().copied())).unwrap()
    }

    /// `check` names the rule and its source, or the refusal and its reason.
    #[test]
    fn check_outcomes() {
        let s = settings(&[("SQUID_WHITELIST", ".example.com,203.0.113.0/24")]);
        let cases: &[(&str, &str, Option<&str>, bool, &str)] = &[
            (
                "s3.us-west-2.amazonaws.com",
                "CONNECT",
                None,
                true,
                "allowed by .us-west-2.amazonaws.com (AWS_REGIONS=us-west-2)",
            ),
            (
                "www.example.com:80",
                "GET",
                Some("10.1.2.3"),
                true,
                "allowed by .example.com (SQUID_WHITELIST)",
            ),
            (
                "evil.com",
                "CONNECT",
                None,
                false,
                "refused (allowlist): evil.com:443: host is not on the allowlist",
            ),
            (
                "sts.amazonaws.com:22",
                "CONNECT",
                None,
                false,
                "refused (port)",
            ),
            (
                "sts.amazonaws.com",
                "CONNECT",
                Some("8.8.8.8"),
                false,
                "refused (client_cidr): client 8.8.8.8",
            ),
            (
                "203.0.113.5",
                "CONNECT",
                None,
                true,
                "allowed by 203.0.113.0/24 (SQUID_WHITELIST)",
            ),
        ];
        for (target, method, from, allowed, needle) in cases {
            let outcome = check(&s, target, method, from.map(|f| f.parse().unwrap())).unwrap();
            assert_eq!(outcome.allowed, *allowed, "{target}: {}", outcome.text);
            assert!(outcome.text.contains(needle), "{target}: {}", outcome.text);
        }
        let s = settings(&[("SQUID_WHITELIST", "169.254.0.0/16")]);
        let outcome = check(&s, "169.254.169.254:443", "CONNECT", None).unwrap();
        assert!(
            !outcome.allowed && outcome.text.contains("instance metadata service"),
            "{}",
            outcome.text
        );
        assert!(check(&s, "bad host", "CONNECT", None).is_err());
    }

    /// `config` lists every setting with its origin and every entry with its source.
    #[test]
    fn config_listing() {
        let s = settings(&[
            ("SQUID_WHITELIST", ".example.com,a.example.com"),
            ("CUTTLE_LISTEN", "127.0.0.1:3999"),
        ]);
        let text = config(&s).unwrap();
        for needle in [
            "CUTTLE_LISTEN",
            "127.0.0.1:3999",
            "AWS_REGIONS",
            ".us-west-2.amazonaws.com",
            "AWS_REGIONS=us-west-2",
            ".example.com",
            "SQUID_WHITELIST",
            "Covered by another entry, dropped: 2",
            "a.example.com",
        ] {
            assert!(text.contains(needle), "missing {needle:?}:\n{text}");
        }
        for key in Key::ALL {
            assert!(text.contains(key.env_name()), "missing {key:?}");
        }
    }

    #[test]
    fn health_url_defaults_to_loopback() {
        assert_eq!(
            default_health_url(&settings(&[])),
            "http://127.0.0.1:3128/healthz"
        );
        let s = settings(&[("CUTTLE_ADMIN_LISTEN", "[::]:9090")]);
        assert_eq!(default_health_url(&s), "http://[::1]:9090/healthz");
    }
}
