//! Name resolution and dialling: the hosts file, async DNS with a TTL cache, the destination
//! address guard, and connecting to exactly the addresses that passed it.
//!
//! [`Dialer::connect`] is the only way the proxy opens an upstream connection: it resolves
//! once, filters every address through the [`AddressGuard`], and dials the survivors in turn,
//! each with `CUTTLE_CONNECT_TIMEOUT`. It never resolves again between the check and the dial,
//! so a DNS answer that changes (rebinding) cannot slip past the guard.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::guard::AddressGuard;
use crate::host::Host;
use crate::metrics::Metrics;
use crate::policy::Target;
use crate::settings::{Key, Origin, Settings};

/// Names whose answers the DNS cache holds at once.
pub const DNS_CACHE_NAMES: usize = 4096;

/// Static name overrides (`/etc/hosts` format), consulted before DNS.
#[derive(Clone, Debug, Default)]
pub struct HostsFile {
    names: HashMap<String, Vec<IpAddr>>,
}

impl HostsFile {
    /// Parses hosts-file text: `ADDRESS NAME [NAME...]`, `#` comments; lines that do not parse
    /// are skipped (as the C library does). Names are normalised like request hosts.
    pub fn parse(text: &str) -> HostsFile {
        let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut fields = line.split_whitespace();
            let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else {
                continue;
            };
            for name in fields {
                if let Ok(Host::Name(name)) = Host::parse(name) {
                    let addrs = names.entry(name).or_default();
                    if !addrs.contains(&ip) {
                        addrs.push(ip);
                    }
                }
            }
        }
        HostsFile { names }
    }

    /// Reads a hosts file.
    pub fn load(path: &Path) -> io::Result<HostsFile> {
        std::fs::read_to_string(path).map(|text| HostsFile::parse(&text))
    }

    /// The addresses of `name`, if listed.
    pub fn get(&self, name: &str) -> Option<&[IpAddr]> {
        self.names.get(name).map(Vec::as_slice)
    }
}

/// Why the resolver could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("{origin}: cannot read hosts file {path:?}: {source}")]
    HostsFile {
        origin: Origin,
        path: String,
        source: io::Error,
    },
    #[error(
        "cannot read the system DNS configuration (/etc/resolv.conf): {0} (set CUTTLE_DNS_SERVERS)"
    )]
    SystemConfig(String),
}

/// Hosts file first, then DNS through hickory (which caches answers for their TTL).
pub struct Resolver {
    hosts: HostsFile,
    dns: TokioResolver,
    /// Bound on one whole lookup (all servers and retries): `CUTTLE_CONNECT_TIMEOUT`.
    timeout: Duration,
}

impl Resolver {
    /// Builds the resolver of `settings`. A missing hosts file at the default path is taken as
    /// empty (minimal images have none); a configured one must exist.
    pub fn new(settings: &Settings) -> Result<Resolver, ResolverError> {
        let hosts = match HostsFile::load(&settings.hosts_file) {
            Ok(hosts) => hosts,
            Err(e) => {
                let origin = settings
                    .origins
                    .get(&Key::HostsFile)
                    .cloned()
                    .unwrap_or(Origin::Default(Key::HostsFile));
                if e.kind() == io::ErrorKind::NotFound && origin == Origin::Default(Key::HostsFile)
                {
                    HostsFile::default()
                } else {
                    return Err(ResolverError::HostsFile {
                        origin,
                        path: settings.hosts_file.display().to_string(),
                        source: e,
                    });
                }
            }
        };
        let mut builder = if settings.dns_servers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|e| ResolverError::SystemConfig(e.to_string()))?
        } else {
            let mut config = ResolverConfig::new();
            for addr in &settings.dns_servers {
                config.add_name_server(NameServerConfig::new(*addr, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(*addr, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
        };
        // The hosts file is ours (CUTTLE_HOSTS_FILE), not hickory's view of /etc/hosts.
        builder.options_mut().use_hosts_file = ResolveHosts::Never;
        // Answers are cached for their TTL; the cache is bounded (hickory's default of 32
        // names is small for a fleet's worth of AWS endpoints).
        builder.options_mut().cache_size = DNS_CACHE_NAMES;
        Ok(Resolver {
            hosts,
            dns: builder.build(),
            timeout: settings.connect_timeout,
        })
    }

    /// The addresses of `host`: an IP literal as is, a listed name from the hosts file, other
    /// names from DNS.
    pub async fn lookup(&self, host: &Host) -> Result<Vec<IpAddr>, ProxyError> {
        let name = match host {
            Host::Ip(ip) => return Ok(vec![*ip]),
            Host::Name(name) => name,
        };
        if let Some(addrs) = self.hosts.get(name) {
            return Ok(addrs.to_vec());
        }
        // A trailing dot makes the name absolute: no search-domain expansion.
        let dns_error = |detail: String| ProxyError::Dns {
            host: name.clone(),
            detail,
        };
        let lookup = tokio::time::timeout(self.timeout, self.dns.lookup_ip(format!("{name}.")))
            .await
            .map_err(|_| dns_error(format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| dns_error(e.to_string()))?;
        let addrs: Vec<IpAddr> = lookup.iter().collect();
        if addrs.is_empty() {
            return Err(dns_error("no addresses".into()));
        }
        Ok(addrs)
    }
}

/// An upstream connection, the address it reached, and what it took.
#[derive(Debug)]
pub struct Upstream {
    pub stream: TcpStream,
    pub addr: SocketAddr,
    /// Time to resolve the name (zero for IP literals).
    pub dns: Duration,
    /// Time to connect, over every address tried.
    pub connect: Duration,
}

/// Resolve, guard, dial.
pub struct Dialer {
    resolver: Resolver,
    guard: AddressGuard,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Connects in progress per destination, bounded by `max_pending`.
    pending: Mutex<HashMap<Target, usize>>,
    max_pending: usize,
}

/// One place among a destination's connects in progress, given back on drop.
struct PendingConnect<'d> {
    dialer: &'d Dialer,
    target: Target,
}

impl Drop for PendingConnect<'_> {
    fn drop(&mut self) {
        let mut pending = self
            .dialer
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = pending.get_mut(&self.target) {
            *count -= 1;
            if *count == 0 {
                pending.remove(&self.target);
            }
        }
    }
}

impl Dialer {
    pub fn new(
        resolver: Resolver,
        guard: AddressGuard,
        connect_timeout: Duration,
        metrics: Arc<Metrics>,
        max_pending: usize,
    ) -> Dialer {
        Dialer {
            resolver,
            guard,
            connect_timeout,
            metrics,
            pending: Mutex::new(HashMap::new()),
            max_pending,
        }
    }

    /// Takes a place among `target`'s connects in progress, if one is free.
    fn reserve(&self, target: &Target) -> Result<PendingConnect<'_>, ProxyError> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let count = pending.entry(target.clone()).or_insert(0);
        if *count >= self.max_pending {
            return Err(ProxyError::ConnectLimit {
                target: target.to_string(),
            });
        }
        *count += 1;
        Ok(PendingConnect {
            dialer: self,
            target: target.clone(),
        })
    }

    /// Connects to `target` through the addresses that pass the guard, in resolver order.
    pub async fn connect(&self, target: &Target) -> Result<Upstream, ProxyError> {
        let _place = self.reserve(target)?;
        let started = Instant::now();
        let addrs = self.resolver.lookup(&target.host).await;
        let dns = started.elapsed();
        if matches!(target.host, Host::Name(_)) {
            self.metrics.dns_lookup_seconds.observe(dns.as_secs_f64());
        }
        let addrs = addrs?;
        let mut refused = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .map(|ip| SocketAddr::new(ip, target.port))
            .filter(|addr| match self.guard.check(*addr) {
                Ok(()) => true,
                Err(refusal) => {
                    tracing::debug!(host = %target.host, %addr, %refusal, "address refused by guard");
                    refused.get_or_insert((*addr, refusal));
                    false
                }
            })
            .collect();
        if let (true, Some((addr, refusal))) = (allowed.is_empty(), refused) {
            return Err(ProxyError::AddressRefused {
                host: target.host.to_string(),
                addr,
                refusal,
            });
        }
        let mut last = None;
        let connecting = Instant::now();
        for addr in allowed {
            let attempt = Instant::now();
            let result = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await;
            self.metrics
                .upstream_connect_seconds
                .observe(attempt.elapsed().as_secs_f64());
            match result {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(Upstream {
                        stream,
                        addr,
                        dns,
                        connect: connecting.elapsed(),
                    });
                }
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "upstream connect failed");
                    last = Some(ProxyError::ConnectFailed {
                        target: target.to_string(),
                        detail: e.to_string(),
                        errno: e.raw_os_error(),
                    });
                }
                Err(_) => {
                    tracing::debug!(%addr, "upstream connect timed out");
                    last = Some(ProxyError::ConnectTimeout {
                        target: target.to_string(),
                    });
                }
            }
        }
        Err(last.unwrap_or(ProxyError::ConnectTimeout {
            target: target.to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_parsing() {
        let hosts = HostsFile::parse(
            "127.0.0.1 localhost\n# comment\n10.0.0.1  STS.amazonaws.com. sts-alias # tail\n10.0.0.2 sts.amazonaws.com\nbad line\n::1 v6.local\n",
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            hosts.get("sts.amazonaws.com"),
            Some(&[ip("10.0.0.1"), ip("10.0.0.2")][..])
        );
        assert_eq!(hosts.get("sts-alias"), Some(&[ip("10.0.0.1")][..]));
        assert_eq!(hosts.get("v6.local"), Some(&[ip("::1")][..]));
        assert_eq!(hosts.get("bad"), None);
        assert_eq!(hosts.get("line"), None);
    }
}
