//! The operator subcommands: `cuttle check`, `cuttle config`, `cuttle healthcheck` (each reads
//! the same settings sources as the server) and `cuttle report` (reads an access log). Each
//! returns its text and outcome; `main` prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::allowlist::Allowlist;
use crate::client_acl::ClientAddr;
use crate::guard::AddressGuard;
use crate::host::Host;
use crate::policy::{Decision, Policy, Request, Target};
use crate::settings::{Key, Mode, Origin, Settings};

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
    if !allowed
        && settings.mode == Mode::Report
        && matches!(decision, Decision::Deny(d) if d.reportable())
    {
        text.push_str(
            "\n(CUTTLE_MODE=report: the proxy lets this request through and logs it as would_deny)",
        );
    }
    if from.is_none() {
        if settings.client_rules.is_empty() {
            text.push_str("\n(client not checked: add --from IP to check ALLOWED_CIDRS too)");
        } else {
            text.push_str(
                "\n(client not checked: add --from IP to check ALLOWED_CIDRS and the client rules too)",
            );
        }
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
    if !settings.client_rules.is_empty() {
        let _ = writeln!(
            out,
            "\n# Client rules: {} (consulted when the allowlist has no entry, for clients in the rule's networks)",
            settings.client_rules.len()
        );
    }
    for (index, rule) in settings.client_rules.iter().enumerate() {
        let cidrs: Vec<String> = rule.cidrs.iter().map(ToString::to_string).collect();
        let name = match &rule.name {
            Some(name) => format!("{name:?}"),
            None => format!("client_rules[{index}]"),
        };
        let _ = writeln!(out, "## {name}: clients in {}", cidrs.join(","));
        for entry in &rule.entries {
            let _ = writeln!(out, "{:<44} {}", entry.pattern.to_string(), entry.source);
        }
    }
    Ok(out)
}

/// `cuttle report`: the hosts of the access log lines marked would-deny (report mode let them
/// through, the allowlist would have refused them), sorted and de-duplicated, one a line, ready
/// for the allowlist file. `counts` prefixes each with its number of requests. Lines in either
/// format (Squid or JSON, told apart line by line) are read; other lines are skipped.
pub fn report(input: impl BufRead, counts: bool) -> std::io::Result<String> {
    let mut hosts: BTreeMap<String, u64> = BTreeMap::new();
    for line in input.split(b'\n') {
        let line = line?;
        if let Some(host) = would_deny_host(&String::from_utf8_lossy(&line)) {
            *hosts.entry(host).or_default() += 1;
        }
    }
    let width = hosts.values().max().map_or(0, |n| n.to_string().len());
    let mut out = String::new();
    for (host, n) in &hosts {
        if counts {
            let _ = writeln!(out, "{n:>width$} {host}");
        } else {
            let _ = writeln!(out, "{host}");
        }
    }
    Ok(out)
}

/// The host of one access log line if it is a would-deny line: JSON with `"decision":
/// "would_deny"`, or Squid format with a result code ending in `_WOULD_DENY`. The host is
/// normalised as the proxy judged it (IPv6 in brackets, which the allowlist file accepts).
pub fn would_deny_host(line: &str) -> Option<String> {
    let line = line.trim();
    if line.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        if value.get("decision")?.as_str()? != "would_deny" {
            return None;
        }
        if let Some(host) = value.get("host").and_then(|h| h.as_str()) {
            return Host::parse(host).ok().map(|h| h.to_string());
        }
        let method = value.get("method")?.as_str()?;
        return url_host(method, value.get("url")?.as_str()?);
    }
    // `time elapsed client code/status bytes method url - hierarchy/peer type`
    let mut fields = line.split_whitespace();
    let (code, _status) = fields.nth(3)?.split_once('/')?;
    if !code.ends_with("_WOULD_DENY") {
        return None;
    }
    let method = fields.nth(1)?;
    url_host(method, fields.next()?)
}

/// The host of a logged URL: `host:port` for CONNECT, `http://host[:port]/path` otherwise.
fn url_host(method: &str, url: &str) -> Option<String> {
    let (authority, default_port) = if method.eq_ignore_ascii_case("CONNECT") {
        (url, 443)
    } else {
        let rest = url.split_once("://")?.1;
        (rest.split(['/', '?', '#']).next()?, 80)
    };
    Target::parse_authority(authority, Some(default_port))
        .ok()
        .map(|t| t.host.to_string())
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

    /// `check --from` applies the client's rules and names the rule; `config` lists each rule
    /// with its networks after the allowlist; report mode is mentioned on a refusal.
    #[test]
    fn client_rules_in_check_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cuttle.toml");
        std::fs::write(
            &path,
            "mode = \"report\"\n[[client_rules]]\nname = \"build subnet\"\ncidrs = [\"10.20.0.0/16\"]\nallow = [\".github.com\"]\n",
        )
        .unwrap();
        let s = settings(&[("CUTTLE_CONFIG", path.to_str().unwrap())]);
        let from = |ip: &str| Some(ip.parse().unwrap());
        let inside = check(&s, "api.github.com", "CONNECT", from("10.20.0.9")).unwrap();
        assert!(inside.allowed, "{}", inside.text);
        assert!(
            inside
                .text
                .contains("allowed by .github.com (client rule \"build subnet\")"),
            "{}",
            inside.text
        );
        let outside = check(&s, "api.github.com", "CONNECT", from("10.30.0.9")).unwrap();
        assert!(!outside.allowed, "{}", outside.text);
        assert!(
            outside.text.contains("refused (allowlist)")
                && outside.text.contains("CUTTLE_MODE=report"),
            "{}",
            outside.text
        );
        let anyone = check(&s, "api.github.com", "CONNECT", None).unwrap();
        assert!(!anyone.allowed, "{}", anyone.text);
        assert!(anyone.text.contains("client rules"), "{}", anyone.text);

        let text = config(&s).unwrap();
        let rules = text.find("# Client rules: 1").expect(&text);
        assert!(text.find("# Allowlist:").expect(&text) < rules, "{text}");
        for needle in [
            "## \"build subnet\": clients in 10.20.0.0/16",
            ".github.com",
            "client rule \"build subnet\"",
        ] {
            assert!(
                text[rules..].contains(needle),
                "missing {needle:?}:\n{text}"
            );
        }
    }

    /// The report reads would-deny lines of both formats and nothing else, normalising hosts.
    #[test]
    fn would_deny_hosts_of_log_lines() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "1733300000.123     42 10.1.2.3 TCP_TUNNEL_WOULD_DENY/200 4711 CONNECT github.com:443 - HIER_DIRECT/140.82.1.1 -",
                Some("github.com"),
            ),
            (
                "1733300000.123      5 10.1.2.3 TCP_MISS_WOULD_DENY/404 12 GET http://Files.Example.com.:8080/a/b - HIER_DIRECT/1.2.3.4 text/plain",
                Some("files.example.com"),
            ),
            (
                "1733300000.123      5 10.1.2.3 TCP_MISS_WOULD_DENY/200 12 GET http://[2001:db8::1]/x - HIER_DIRECT/2001:db8::1 -",
                Some("[2001:db8::1]"),
            ),
            (
                "1733300000.123     42 10.1.2.3 TCP_TUNNEL/200 4711 CONNECT sts.amazonaws.com:443 - HIER_DIRECT/52.94.1.1 -",
                None,
            ),
            (
                "1733300000.123      1 10.1.2.3 TCP_DENIED/403 80 CONNECT evil.com:443 - HIER_NONE/- text/plain",
                None,
            ),
            (
                r#"{"decision":"would_deny","reason":"allowlist","method":"CONNECT","url":"pypi.org:443","host":"pypi.org","port":443}"#,
                Some("pypi.org"),
            ),
            (
                r#"{"decision":"would_deny","method":"GET","url":"http://a.example.org:81/"}"#,
                Some("a.example.org"),
            ),
            (
                r#"{"decision":"denied","reason":"allowlist","method":"CONNECT","url":"evil.com:443","host":"evil.com"}"#,
                None,
            ),
            (r#"{"decision":"would_deny""#, None),
            ("", None),
            ("2024-12-04T10:00:00Z INFO cuttle listening", None),
            ("TCP_MISS_WOULD_DENY/200", None),
        ];
        for (line, want) in cases {
            assert_eq!(would_deny_host(line).as_deref(), *want, "{line}");
        }
    }

    /// Hosts come out sorted and once each; `--counts` prefixes the number of requests.
    #[test]
    fn report_sorts_dedups_and_counts() {
        let log = [
            "1 1 10.0.0.1 TCP_TUNNEL_WOULD_DENY/200 0 CONNECT pypi.org:443 - HIER_DIRECT/1.1.1.1 -",
            r#"{"decision":"would_deny","method":"CONNECT","url":"github.com:443","host":"github.com"}"#,
            "not a log line",
            "1 1 10.0.0.2 TCP_TUNNEL_WOULD_DENY/200 0 CONNECT pypi.org:443 - HIER_DIRECT/1.1.1.1 -",
            "1 1 10.0.0.1 TCP_TUNNEL/200 0 CONNECT sts.amazonaws.com:443 - HIER_DIRECT/1.1.1.1 -",
        ]
        .join("\n");
        assert_eq!(
            report(log.as_bytes(), false).unwrap(),
            "github.com\npypi.org\n"
        );
        assert_eq!(
            report(log.as_bytes(), true).unwrap(),
            "1 github.com\n2 pypi.org\n"
        );
        assert_eq!(report(&b""[..], false).unwrap(), "");
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
