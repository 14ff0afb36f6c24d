//! The decision: may this client make this request? Pure, no I/O.
//!
//! The order mirrors the Squid image's `http_access` rules (DESIGN "Decision order"):
//! 1. the client must be in the allowed networks (loopback may still reach the local endpoints);
//! 2. origin-form requests are for the proxy itself (the caller routes them, see [`Request::Local`]);
//! 3. `CONNECT`: the port must be a CONNECT port, the host allowed;
//! 4. other methods: the port must be a plain HTTP port, the host allowed.
//!
//! A host is allowed by the allowlist, or else by an entry of a per-client rule
//! (`[[client_rules]]`) whose networks contain the client.
//!
//! What happens after resolution (the destination address guard) lives in [`crate::guard`].
//! Report mode (`CUTTLE_MODE=report`) is not a decision: the policy decides the same way in both
//! modes, and the request path lets through the refusals that [`Denial::reportable`] names.

use std::fmt;

use crate::allowlist::{Allowlist, Entry, EntryError};
use crate::client_acl::{ClientAcl, ClientAddr};
use crate::host::{Host, HostError};
use crate::metrics::Reason;
use crate::netset::NetSet;
use crate::settings::{ClientRule, PortSet, Settings};

/// Where a request goes: a normalised host and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

/// Why a request target was not understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("{0:?} has no port")]
    MissingPort(String),
    #[error("{0:?} has an invalid port")]
    BadPort(String),
    #[error("{0:?} has user information before the host")]
    Userinfo(String),
    #[error(transparent)]
    Host(#[from] HostError),
}

impl Target {
    /// Parses an authority (`host:port`, `[v6]:port`; `host` alone when `default_port` is
    /// given). User information (`user@host`) is refused: it is how
    /// `http://allowed.com@evil.com/` fools naive matching.
    pub fn parse_authority(
        authority: &str,
        default_port: Option<u16>,
    ) -> Result<Target, TargetError> {
        if authority.contains('@') {
            return Err(TargetError::Userinfo(authority.to_string()));
        }
        let (host, port) = split_host_port(authority);
        let port = match port {
            // Digits only: `u16::from_str` would also take `+443`.
            Some(p) if !p.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(TargetError::BadPort(authority.to_string()))
            }
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(TargetError::BadPort(authority.to_string())),
            },
            None => default_port.ok_or_else(|| TargetError::MissingPort(authority.to_string()))?,
        };
        Ok(Target {
            host: Host::parse(host)?,
            port,
        })
    }
}

/// Splits `host:port`, `[v6]:port`, `[v6]`, `host`; a bare IPv6 address has no port.
fn split_host_port(s: &str) -> (&str, Option<&str>) {
    if s.starts_with('[') {
        return match s.find(']') {
            Some(end) => {
                let rest = &s[end + 1..];
                (
                    &s[..=end],
                    rest.strip_prefix(':')
                        .or(if rest.is_empty() { None } else { Some(rest) }),
                )
            }
            None => (s, None),
        };
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (s, None),
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// What the client asks for, as the policy sees it.
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    /// `CONNECT host:port`.
    Connect(&'a Target),
    /// Absolute-form plain HTTP (`GET http://host/`), any method but CONNECT.
    Http(&'a Target),
    /// Origin-form: a request to the proxy's own endpoints.
    Local,
}

/// What allowed a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule<'p> {
    /// An allowlist entry.
    Entry(&'p Entry),
    /// `NO_WHITELIST=true`.
    NoWhitelist,
    /// A local endpoint (`/healthz`, `/metrics`).
    Local,
}

impl fmt::Display for Rule<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Entry(e) => write!(f, "{e}"),
            Rule::NoWhitelist => f.write_str("NO_WHITELIST=true"),
            Rule::Local => f.write_str("local endpoint"),
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    /// The client is outside the allowed networks.
    ClientCidr,
    /// CONNECT to a port that is not a CONNECT port.
    ConnectPort,
    /// Plain HTTP to a port that is not an HTTP port.
    HttpPort,
    /// No allowlist entry matches the host.
    Allowlist,
}

impl Denial {
    /// True for the refusals that report mode lets through: the allowlist's alone. Client
    /// networks, ports (and, after resolution, the destination address guard) are enforced in
    /// both modes, so report mode never opens the proxy to outsiders or the metadata service.
    pub fn reportable(self) -> bool {
        matches!(self, Denial::Allowlist)
    }

    /// The fixed metric reason of this refusal.
    pub fn reason(self) -> Reason {
        match self {
            Denial::ClientCidr => Reason::ClientCidr,
            Denial::ConnectPort | Denial::HttpPort => Reason::Port,
            Denial::Allowlist => Reason::Allowlist,
        }
    }

    /// The one-line reason a client reads, naming the host and the rule.
    pub fn explain(self, client: ClientAddr, target: Option<&Target>) -> String {
        let target = target
            .map(|t| t.to_string())
            .unwrap_or_else(|| "the proxy".into());
        match self {
            Denial::ClientCidr => {
                format!("client {client} is not in the allowed client networks (ALLOWED_CIDRS)")
            }
            Denial::ConnectPort => {
                format!("{target}: port is not a CONNECT port (CUTTLE_CONNECT_PORTS)")
            }
            Denial::HttpPort => {
                format!("{target}: port is not a plain HTTP port (CUTTLE_HTTP_PORTS)")
            }
            Denial::Allowlist => {
                format!("{target}: host is not on the allowlist (no entry matches)")
            }
        }
    }
}

/// The outcome of [`Policy::decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision<'p> {
    Allow(Rule<'p>),
    Deny(Denial),
}

/// The compiled policy: one immutable value, swapped whole on reload.
#[derive(Debug)]
pub struct Policy {
    clients: ClientAcl,
    allowlist: Allowlist,
    client_rules: ClientRules,
    no_whitelist: bool,
    connect_ports: PortSet,
    http_ports: PortSet,
}

impl Policy {
    /// Compiles the policy of `settings`.
    pub fn new(settings: &Settings) -> Result<Policy, EntryError> {
        Ok(Policy {
            clients: ClientAcl::new(&settings.allowed_cidrs),
            allowlist: Allowlist::new(settings.allowlist.clone())?,
            client_rules: ClientRules::new(&settings.client_rules)?,
            no_whitelist: settings.no_whitelist,
            connect_ports: settings.connect_ports.clone(),
            http_ports: settings.http_ports.clone(),
        })
    }

    /// The compiled allowlist.
    pub fn allowlist(&self) -> &Allowlist {
        &self.allowlist
    }

    /// Step 1 alone: may `client` use the proxy at all? `local` says the request is for the
    /// proxy's own endpoints, which loopback may always ask (health checks from the same host).
    pub fn admits(&self, client: ClientAddr, local: bool) -> bool {
        self.clients.allows(client) || (local && client.ip().is_loopback())
    }

    /// Decides one request.
    pub fn decide(&self, client: ClientAddr, request: Request<'_>) -> Decision<'_> {
        if !self.admits(client, matches!(request, Request::Local)) {
            return Decision::Deny(Denial::ClientCidr);
        }
        match (self.decide_destination(request), request) {
            // The allowlist has no entry: the client's own rules may have one.
            (
                Decision::Deny(Denial::Allowlist),
                Request::Connect(target) | Request::Http(target),
            ) => match self.client_rules.find(client, &target.host) {
                Some(entry) => Decision::Allow(Rule::Entry(entry)),
                None => Decision::Deny(Denial::Allowlist),
            },
            (decision, _) => decision,
        }
    }

    /// Steps 2 to 4 alone: the decision for any admitted client by the allowlist, without the
    /// per-client rules (what `cuttle check` without `--from` shows).
    pub fn decide_destination(&self, request: Request<'_>) -> Decision<'_> {
        let (target, ports, port_denial) = match request {
            Request::Local => return Decision::Allow(Rule::Local),
            Request::Connect(t) => (t, &self.connect_ports, Denial::ConnectPort),
            Request::Http(t) => (t, &self.http_ports, Denial::HttpPort),
        };
        if !ports.contains(target.port) {
            return Decision::Deny(port_denial);
        }
        if self.no_whitelist {
            return Decision::Allow(Rule::NoWhitelist);
        }
        match self.allowlist.find(&target.host) {
            Some(entry) => Decision::Allow(Rule::Entry(entry)),
            None => Decision::Deny(Denial::Allowlist),
        }
    }
}

/// The per-client rules, compiled: one allowlist per rule, and a longest-prefix map from the
/// rules' networks to the rules that apply there.
#[derive(Debug, Default)]
struct ClientRules {
    /// Each rule's entries, compiled, in file order.
    allowlists: Vec<Allowlist>,
    /// Each network of each rule -> every rule (index, ascending) with a network containing it.
    /// The most specific network holding a client thus lists every rule that applies to the
    /// client (any network containing the client contains that one too): one lookup, then only
    /// those rules' allowlists are consulted.
    nets: NetSet<Vec<usize>>,
}

impl ClientRules {
    fn new(rules: &[ClientRule]) -> Result<ClientRules, EntryError> {
        let allowlists = rules
            .iter()
            .map(|rule| Allowlist::new(rule.entries.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let nets: Vec<(ipnet::IpNet, usize)> = rules
            .iter()
            .enumerate()
            .flat_map(|(i, rule)| rule.cidrs.iter().map(move |net| (net.trunc(), i)))
            .collect();
        let mut set = NetSet::new();
        for (net, _) in &nets {
            let mut applying: Vec<usize> = nets
                .iter()
                .filter(|(outer, _)| outer.contains(net))
                .map(|(_, i)| *i)
                .collect();
            applying.dedup();
            set.insert(*net, applying);
        }
        Ok(ClientRules {
            allowlists,
            nets: set,
        })
    }

    /// The first entry, in rule order, that allows `host` to `client`.
    fn find(&self, client: ClientAddr, host: &Host) -> Option<&Entry> {
        let (_, rules) = self.nets.longest_match(client.ip())?;
        rules.iter().find_map(|&i| self.allowlists[i].find(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Sources;
    use std::net::SocketAddr;

    fn policy(vars: &[(&str, &str)]) -> Policy {
        let settings = Settings::load(&Sources::from_env(vars.iter().copied())).unwrap();
        Policy::new(&settings).unwrap()
    }

    fn client(ip: &str) -> ClientAddr {
        ClientAddr::new(SocketAddr::new(ip.parse().unwrap(), 50000))
    }

    fn target(s: &str) -> Target {
        Target::parse_authority(s, Some(80)).unwrap()
    }

    /// The decision order of DESIGN.md over a table of requests, with the default settings.
    #[test]
    fn decision_table() {
        let p = policy(&[("SQUID_WHITELIST", ".example.com")]);
        type Case = (
            &'static str,
            &'static str,
            &'static str,
            Result<&'static str, Denial>,
        );
        let cases: &[Case] = &[
            (
                "10.0.0.5",
                "CONNECT",
                "sts.amazonaws.com:443",
                Ok("sts.amazonaws.com (AWS global default)"),
            ),
            (
                "10.0.0.5",
                "CONNECT",
                "s3.us-west-2.amazonaws.com:443",
                Ok(".us-west-2.amazonaws.com (AWS_REGIONS=us-west-2)"),
            ),
            (
                "10.0.0.5",
                "CONNECT",
                "sts.amazonaws.com:8443",
                Err(Denial::ConnectPort),
            ),
            (
                "10.0.0.5",
                "CONNECT",
                "evil.com:443",
                Err(Denial::Allowlist),
            ),
            (
                "10.0.0.5",
                "GET",
                "www.example.com:80",
                Ok(".example.com (SQUID_WHITELIST)"),
            ),
            (
                "10.0.0.5",
                "GET",
                "www.example.com:22",
                Err(Denial::HttpPort),
            ),
            (
                "10.0.0.5",
                "GET",
                "www.example.com:8080",
                Ok(".example.com (SQUID_WHITELIST)"),
            ),
            (
                "8.8.8.8",
                "CONNECT",
                "sts.amazonaws.com:443",
                Err(Denial::ClientCidr),
            ),
            (
                "::ffff:10.0.0.5",
                "CONNECT",
                "sts.amazonaws.com:443",
                Ok("sts.amazonaws.com (AWS global default)"),
            ),
            (
                "2001:db8::1",
                "GET",
                "www.example.com:80",
                Err(Denial::ClientCidr),
            ),
            (
                "::1",
                "GET",
                "www.example.com:80",
                Ok(".example.com (SQUID_WHITELIST)"),
            ),
        ];
        for (ip, method, t, want) in cases {
            let t = target(t);
            let request = if *method == "CONNECT" {
                Request::Connect(&t)
            } else {
                Request::Http(&t)
            };
            let got = match p.decide(client(ip), request) {
                Decision::Allow(rule) => Ok(rule.to_string()),
                Decision::Deny(d) => Err(d),
            };
            assert_eq!(got, want.map(str::to_string), "{ip} {method} {t}");
        }
    }

    /// Local endpoints: allowed clients and loopback; others refused.
    #[test]
    fn local_endpoints() {
        let p = policy(&[("ALLOWED_CIDRS", "10.0.0.0/8")]);
        assert_eq!(
            p.decide(client("10.1.1.1"), Request::Local),
            Decision::Allow(Rule::Local)
        );
        assert_eq!(
            p.decide(client("127.0.0.1"), Request::Local),
            Decision::Allow(Rule::Local)
        );
        assert_eq!(
            p.decide(client("::1"), Request::Local),
            Decision::Allow(Rule::Local)
        );
        assert_eq!(
            p.decide(client("192.168.1.1"), Request::Local),
            Decision::Deny(Denial::ClientCidr)
        );
        let t = target("sts.amazonaws.com:443");
        assert_eq!(
            p.decide(client("127.0.0.1"), Request::Connect(&t)),
            Decision::Deny(Denial::ClientCidr)
        );
    }

    /// NO_WHITELIST allows any host but still checks clients and ports.
    #[test]
    fn no_whitelist_keeps_client_and_port_checks() {
        let p = policy(&[("NO_WHITELIST", "true")]);
        let t = target("anything.example:443");
        assert_eq!(
            p.decide(client("10.0.0.1"), Request::Connect(&t)),
            Decision::Allow(Rule::NoWhitelist)
        );
        assert_eq!(
            p.decide(client("8.8.8.8"), Request::Connect(&t)),
            Decision::Deny(Denial::ClientCidr)
        );
        let t = target("anything.example:25");
        assert_eq!(
            p.decide(client("10.0.0.1"), Request::Connect(&t)),
            Decision::Deny(Denial::ConnectPort)
        );
    }

    /// A client rule allows its entries to clients in its networks only, after the allowlist
    /// missed; nested and overlapping rules all apply, the first in file order wins.
    #[test]
    fn client_rules_apply_to_their_networks() {
        let settings = Settings::load(&Sources::from_env([("SQUID_WHITELIST", ".example.com")]));
        let mut settings = settings.unwrap();
        let rule = |name: &str, cidrs: &[&str], allow: &[&str]| ClientRule {
            name: Some(name.into()),
            cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            entries: allow
                .iter()
                .map(|a| Entry {
                    pattern: a.parse().unwrap(),
                    source: crate::allowlist::EntrySource::ClientRule {
                        name: Some(name.into()),
                        index: 0,
                    },
                })
                .collect(),
        };
        settings.client_rules = vec![
            rule("build", &["10.20.0.0/16"], &[".github.com", "pypi.org"]),
            rule(
                "one host",
                &["10.20.1.7/32", "::1/128"],
                &["pypi.org", "a.test"],
            ),
            rule("wide", &["10.0.0.0/8"], &["b.test"]),
        ];
        let p = Policy::new(&settings).unwrap();
        let cases: &[(&str, &str, Result<&str, Denial>)] = &[
            (
                "10.20.3.4",
                "api.github.com:443",
                Ok(".github.com (client rule \"build\")"),
            ),
            (
                "10.20.3.4",
                "pypi.org:443",
                Ok("pypi.org (client rule \"build\")"),
            ),
            (
                "10.20.1.7",
                "pypi.org:443",
                Ok("pypi.org (client rule \"build\")"),
            ),
            (
                "10.20.1.7",
                "a.test:443",
                Ok("a.test (client rule \"one host\")"),
            ),
            (
                "10.20.1.7",
                "b.test:443",
                Ok("b.test (client rule \"wide\")"),
            ),
            ("10.20.1.8", "a.test:443", Err(Denial::Allowlist)),
            ("10.21.0.1", "api.github.com:443", Err(Denial::Allowlist)),
            (
                "10.21.0.1",
                "b.test:443",
                Ok("b.test (client rule \"wide\")"),
            ),
            (
                "::ffff:10.20.3.4",
                "pypi.org:443",
                Ok("pypi.org (client rule \"build\")"),
            ),
            ("::1", "a.test:443", Ok("a.test (client rule \"one host\")")),
            ("192.168.1.1", "pypi.org:443", Err(Denial::Allowlist)),
            // The allowlist comes first; ports and client networks still apply.
            (
                "10.20.3.4",
                "www.example.com:443",
                Ok(".example.com (SQUID_WHITELIST)"),
            ),
            ("10.20.3.4", "api.github.com:8443", Err(Denial::ConnectPort)),
            ("8.8.8.8", "api.github.com:443", Err(Denial::ClientCidr)),
        ];
        for (ip, t, want) in cases {
            let t = target(t);
            let got = match p.decide(client(ip), Request::Connect(&t)) {
                Decision::Allow(rule) => Ok(rule.to_string()),
                Decision::Deny(d) => Err(d),
            };
            assert_eq!(got, want.map(str::to_string), "{ip} {t}");
        }
        // Without a client, only the allowlist decides.
        let t = target("pypi.org:443");
        assert_eq!(
            p.decide_destination(Request::Connect(&t)),
            Decision::Deny(Denial::Allowlist)
        );
    }

    /// Report mode lets through the allowlist's refusals only.
    #[test]
    fn only_allowlist_refusals_are_reportable() {
        for (denial, reportable) in [
            (Denial::Allowlist, true),
            (Denial::ClientCidr, false),
            (Denial::ConnectPort, false),
            (Denial::HttpPort, false),
        ] {
            assert_eq!(denial.reportable(), reportable, "{denial:?}");
        }
    }

    /// IP-literal destinations need an IP/CIDR entry.
    #[test]
    fn ip_literals_need_a_net_entry() {
        let p = policy(&[("SQUID_WHITELIST", "203.0.113.0/24,.example.com")]);
        for (t, allowed) in [
            ("203.0.113.9:443", true),
            ("198.51.100.1:443", false),
            ("[2001:db8::1]:443", false),
        ] {
            let target = target(t);
            let got = matches!(
                p.decide(client("10.0.0.1"), Request::Connect(&target)),
                Decision::Allow(_)
            );
            assert_eq!(got, allowed, "{t}");
        }
    }

    #[test]
    fn authority_parsing() {
        let ok = [
            ("example.com:443", None, "example.com:443"),
            ("EXAMPLE.com.:443", None, "example.com:443"),
            ("example.com", Some(80), "example.com:80"),
            ("[::1]:8080", None, "[::1]:8080"),
            ("[::1]", Some(80), "[::1]:80"),
            ("10.0.0.1:80", None, "10.0.0.1:80"),
        ];
        for (input, default, want) in ok {
            let got = Target::parse_authority(input, default).map(|t| t.to_string());
            assert_eq!(got.as_deref(), Ok(want), "{input}");
        }
        let bad = [
            ("example.com", None),
            ("example.com:0", None),
            ("example.com:99999", None),
            ("example.com:x", None),
            ("example.com:+443", None),
            ("example.com:-1", None),
            ("example.com: 443", None),
            ("a@example.com:443", None),
            ("sts.amazonaws.com@evil.com", Some(80)),
            (":443", None),
        ];
        for (input, default) in bad {
            assert!(
                Target::parse_authority(input, default).is_err(),
                "{input} should be refused"
            );
        }
    }
}
