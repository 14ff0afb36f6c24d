//! Layered configuration, validated once into an immutable [`Settings`].
//!
//! Layers, lowest first: built-in defaults < config file (TOML, `--config` or `CUTTLE_CONFIG`) <
//! `CUTTLE_*` environment variables < the Squid image's variable names (`SQUID_WHITELIST`,
//! `AWS_REGIONS`, `ALLOWED_CIDRS`, `NO_WHITELIST`, `SHUTDOWN_LIFETIME`) < command-line flags.
//!
//! The file and environment layers are read with the `config` crate, but every value is taken
//! as a string and parsed here, layer by layer, so that an error can name where the bad value
//! came from (variable, file key or flag), quote it, and say what was expected. The `config`
//! crate's own conversion errors drop the value.
//!
//! Environment values that are empty count as unset (as `${VAR:-default}` in the Squid image's
//! entrypoint did).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use crate::allowlist::{aws_defaults, Entry, EntrySource, Pattern, Region};

/// Every setting: its config-file key, its environment name, its default.
///
/// The environment name is the Squid image's for the five settings it had, `CUTTLE_<KEY>`
/// for the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Listen,
    AdminListen,
    SquidWhitelist,
    AwsRegions,
    AllowedCidrs,
    NoWhitelist,
    ShutdownLifetime,
    ConnectPorts,
    HttpPorts,
    AllowlistFile,
    HostsFile,
    DnsServers,
    UpstreamAllowCidrs,
    UpstreamDenyCidrs,
    ConnectTimeout,
    HeaderTimeout,
    IdleTimeout,
    MaxConnections,
    MaxPendingConnects,
    Workers,
    AccessLog,
    AccessLogHealthz,
    Log,
    LogFormat,
    Mode,
    SniCheck,
    NonTlsPorts,
    ProxyProtocol,
    ProxyProtocolFrom,
}

impl Key {
    /// All keys, in the order `cuttle config` prints them.
    pub const ALL: [Key; 29] = [
        Key::Listen,
        Key::AdminListen,
        Key::AllowedCidrs,
        Key::AwsRegions,
        Key::SquidWhitelist,
        Key::AllowlistFile,
        Key::NoWhitelist,
        Key::ConnectPorts,
        Key::HttpPorts,
        Key::HostsFile,
        Key::DnsServers,
        Key::UpstreamAllowCidrs,
        Key::UpstreamDenyCidrs,
        Key::ConnectTimeout,
        Key::HeaderTimeout,
        Key::IdleTimeout,
        Key::MaxConnections,
        Key::MaxPendingConnects,
        Key::Workers,
        Key::ShutdownLifetime,
        Key::AccessLog,
        Key::AccessLogHealthz,
        Key::Log,
        Key::LogFormat,
        Key::Mode,
        Key::SniCheck,
        Key::NonTlsPorts,
        Key::ProxyProtocol,
        Key::ProxyProtocolFrom,
    ];

    /// The key in the config file.
    pub fn file_key(self) -> &'static str {
        match self {
            Key::Listen => "listen",
            Key::AdminListen => "admin_listen",
            Key::SquidWhitelist => "squid_whitelist",
            Key::AwsRegions => "aws_regions",
            Key::AllowedCidrs => "allowed_cidrs",
            Key::NoWhitelist => "no_whitelist",
            Key::ShutdownLifetime => "shutdown_lifetime",
            Key::ConnectPorts => "connect_ports",
            Key::HttpPorts => "http_ports",
            Key::AllowlistFile => "allowlist_file",
            Key::HostsFile => "hosts_file",
            Key::DnsServers => "dns_servers",
            Key::UpstreamAllowCidrs => "upstream_allow_cidrs",
            Key::UpstreamDenyCidrs => "upstream_deny_cidrs",
            Key::ConnectTimeout => "connect_timeout",
            Key::HeaderTimeout => "header_timeout",
            Key::IdleTimeout => "idle_timeout",
            Key::MaxConnections => "max_connections",
            Key::MaxPendingConnects => "max_pending_connects",
            Key::Workers => "workers",
            Key::AccessLog => "access_log",
            Key::AccessLogHealthz => "access_log_healthz",
            Key::Log => "log",
            Key::LogFormat => "log_format",
            Key::Mode => "mode",
            Key::SniCheck => "sni_check",
            Key::NonTlsPorts => "non_tls_ports",
            Key::ProxyProtocol => "proxy_protocol",
            Key::ProxyProtocolFrom => "proxy_protocol_from",
        }
    }

    /// The environment variable.
    pub fn env_name(self) -> &'static str {
        match self {
            Key::SquidWhitelist => "SQUID_WHITELIST",
            Key::AwsRegions => "AWS_REGIONS",
            Key::AllowedCidrs => "ALLOWED_CIDRS",
            Key::NoWhitelist => "NO_WHITELIST",
            Key::ShutdownLifetime => "SHUTDOWN_LIFETIME",
            Key::Listen => "CUTTLE_LISTEN",
            Key::AdminListen => "CUTTLE_ADMIN_LISTEN",
            Key::ConnectPorts => "CUTTLE_CONNECT_PORTS",
            Key::HttpPorts => "CUTTLE_HTTP_PORTS",
            Key::AllowlistFile => "CUTTLE_ALLOWLIST_FILE",
            Key::HostsFile => "CUTTLE_HOSTS_FILE",
            Key::DnsServers => "CUTTLE_DNS_SERVERS",
            Key::UpstreamAllowCidrs => "CUTTLE_UPSTREAM_ALLOW_CIDRS",
            Key::UpstreamDenyCidrs => "CUTTLE_UPSTREAM_DENY_CIDRS",
            Key::ConnectTimeout => "CUTTLE_CONNECT_TIMEOUT",
            Key::HeaderTimeout => "CUTTLE_HEADER_TIMEOUT",
            Key::IdleTimeout => "CUTTLE_IDLE_TIMEOUT",
            Key::MaxConnections => "CUTTLE_MAX_CONNECTIONS",
            Key::MaxPendingConnects => "CUTTLE_MAX_PENDING_CONNECTS",
            Key::Workers => "CUTTLE_WORKERS",
            Key::AccessLog => "CUTTLE_ACCESS_LOG",
            Key::AccessLogHealthz => "CUTTLE_ACCESS_LOG_HEALTHZ",
            Key::Log => "CUTTLE_LOG",
            Key::LogFormat => "CUTTLE_LOG_FORMAT",
            Key::Mode => "CUTTLE_MODE",
            Key::SniCheck => "CUTTLE_SNI_CHECK",
            Key::NonTlsPorts => "CUTTLE_NON_TLS_PORTS",
            Key::ProxyProtocol => "CUTTLE_PROXY_PROTOCOL",
            Key::ProxyProtocolFrom => "CUTTLE_PROXY_PROTOCOL_FROM",
        }
    }

    /// The built-in default, as text ("" for unset).
    pub fn default_value(self) -> &'static str {
        match self {
            Key::Listen => "0.0.0.0:3128",
            Key::AdminListen => "",
            Key::SquidWhitelist => "",
            Key::AwsRegions => "us-west-2",
            Key::AllowedCidrs => "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,127.0.0.0/8,::1/128",
            Key::NoWhitelist => "false",
            Key::ShutdownLifetime => "20",
            Key::ConnectPorts => "443",
            Key::HttpPorts => "80,21,443,70,210,1025-65535,280,488,591,777,3128",
            Key::AllowlistFile => "",
            Key::HostsFile => "/etc/hosts",
            Key::DnsServers => "",
            Key::UpstreamAllowCidrs => "",
            Key::UpstreamDenyCidrs => "",
            Key::ConnectTimeout => "10s",
            Key::HeaderTimeout => "30s",
            Key::IdleTimeout => "15m",
            Key::MaxConnections => "10000",
            Key::MaxPendingConnects => "100",
            Key::Workers => "auto",
            Key::AccessLog => "squid",
            Key::AccessLogHealthz => "false",
            Key::Log => "info",
            Key::LogFormat => "text",
            Key::Mode => "enforce",
            Key::SniCheck => "match",
            Key::NonTlsPorts => "",
            Key::ProxyProtocol => "off",
            Key::ProxyProtocolFrom => "",
        }
    }

    fn from_file_key(key: &str) -> Option<Key> {
        Key::ALL.into_iter().find(|k| k.file_key() == key)
    }
}

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default(Key),
    /// A key of the config file.
    File { path: PathBuf, key: &'static str },
    /// An environment variable.
    Env(&'static str),
    /// A command-line flag.
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default(key) => write!(f, "default of {}", key.env_name()),
            Origin::File { path, key } => write!(f, "{} key {key}", path.display()),
            Origin::Env(name) => f.write_str(name),
            Origin::Flag(flag) => f.write_str(flag),
        }
    }
}

/// A configuration error: what is wrong, where it came from, the value and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A value that does not parse or is out of range.
    #[error("{origin}: {message}")]
    Invalid { origin: Origin, message: String },
    /// The config file cannot be read or is not valid TOML.
    #[error("config file {}: {message}", path.display())]
    File { path: PathBuf, message: String },
    /// A key in the config file that cuttle does not know (a typo would otherwise be ignored).
    #[error("config file {}: unknown key {key:?} (known keys: {known})", path.display())]
    UnknownKey {
        path: PathBuf,
        key: String,
        known: String,
    },
}

/// Where the settings come from: the caller hands in the environment (tests pass a map; the
/// binary passes `std::env::vars()`), never read from the process here.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// `--config`; falls back to `CUTTLE_CONFIG` in `env`.
    pub config_file: Option<PathBuf>,
    /// The environment.
    pub env: HashMap<String, String>,
    /// Command-line flags that set a value, with the flag's name (`--listen`).
    pub flags: Vec<(Key, &'static str, String)>,
}

impl Sources {
    /// Sources from an environment map alone.
    pub fn from_env<I, K, V>(vars: I) -> Sources
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Sources {
            env: vars
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            ..Sources::default()
        }
    }
}

/// Output format of the access log on stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessLogFormat {
    Squid,
    Json,
    Off,
}

/// Whether allowlist refusals are enforced or only reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Refusals are enforced.
    Enforce,
    /// Refusals by the allowlist are logged and counted as `would_deny` and let through; client
    /// networks, ports and the destination address guard stay enforced.
    Report,
}

/// What the CONNECT tunnel checks in the client's TLS ClientHello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SniCheck {
    /// Nothing: bytes are relayed as they come.
    Off,
    /// The SNI must equal the CONNECT host (no domain fronting).
    Match,
    /// The SNI must itself be allowed by the policy.
    Allowlist,
}

/// Whether connections start with a PROXY protocol header (v1 or v2) from a load balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyProtocol {
    Off,
    /// Used when present (from `CUTTLE_PROXY_PROTOCOL_FROM`), not required.
    Optional,
    /// Every connection must start with one, from `CUTTLE_PROXY_PROTOCOL_FROM`.
    Required,
}

/// Output format of the diagnostic log on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A set of TCP ports, from a list such as `80,443,1025-65535`.
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet {
    bits: Box<[u64; 1024]>,
    text: String,
}

impl PortSet {
    /// True if `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.bits[usize::from(port / 64)] & (1u64 << (port % 64)) != 0
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortSet({})", self.text)
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for PortSet {
    type Err = String;

    fn from_str(s: &str) -> Result<PortSet, String> {
        let mut bits = Box::new([0u64; 1024]);
        let mut parts = Vec::new();
        for item in list_items(s) {
            let bad =
                || format!("{item:?} is not a port or port range (expected e.g. 443 or 8000-8999)");
            let (lo, hi) = match item.split_once('-') {
                Some((lo, hi)) => (lo.parse::<u16>(), hi.parse::<u16>()),
                None => (item.parse::<u16>(), item.parse::<u16>()),
            };
            let (lo, hi) = (lo.map_err(|_| bad())?, hi.map_err(|_| bad())?);
            if lo == 0 || lo > hi {
                return Err(bad());
            }
            for port in lo..=hi {
                bits[usize::from(port / 64)] |= 1u64 << (port % 64);
            }
            parts.push(item.to_string());
        }
        if parts.is_empty() {
            return Err(format!(
                "{s:?} lists no port (expected e.g. 443 or 8000-8999)"
            ));
        }
        Ok(PortSet {
            bits,
            text: parts.join(","),
        })
    }
}

/// The validated, immutable configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Proxy listener.
    pub listen: SocketAddr,
    /// Optional separate listener for `/metrics` and `/healthz`.
    pub admin_listen: Option<SocketAddr>,
    /// Client networks allowed to use the proxy.
    pub allowed_cidrs: Vec<IpNet>,
    /// Regions whose endpoints are allowed.
    pub aws_regions: Vec<Region>,
    /// `NO_WHITELIST`: every destination allowed (client CIDRs and ports still enforced).
    pub no_whitelist: bool,
    /// The allowlist file, if any (reloaded on change).
    pub allowlist_file: Option<PathBuf>,
    /// Every allowlist entry with its source: regional defaults, global defaults,
    /// `SQUID_WHITELIST`, then the allowlist file.
    pub allowlist: Vec<Entry>,
    /// Extra entries for some client networks (`[[client_rules]]` of the config file), in
    /// file order.
    pub client_rules: Vec<ClientRule>,
    /// Ports CONNECT may reach.
    pub connect_ports: PortSet,
    /// Ports plain HTTP may reach.
    pub http_ports: PortSet,
    /// Static name overrides consulted before DNS.
    pub hosts_file: PathBuf,
    /// DNS servers; empty means the system's (`/etc/resolv.conf`).
    pub dns_servers: Vec<SocketAddr>,
    /// Destination ranges let through the address guard.
    pub upstream_allow_cidrs: Vec<IpNet>,
    /// Extra destination ranges the address guard refuses.
    pub upstream_deny_cidrs: Vec<IpNet>,
    /// Upstream connect timeout, per address.
    pub connect_timeout: Duration,
    /// Time a client has to send its request head.
    pub header_timeout: Duration,
    /// A connection or tunnel idle this long is closed; a request with no response head this
    /// long after the client's last byte gets 504.
    pub idle_timeout: Duration,
    /// Client connections held at once.
    pub max_connections: usize,
    /// Upstream connects in progress to one destination (`host:port`) at once.
    pub max_pending_connects: usize,
    /// Threads serving the proxy listener; `None` is one per CPU available to the process.
    pub workers: Option<usize>,
    /// Time to drain after SIGTERM.
    pub shutdown_lifetime: Duration,
    /// Access log format.
    pub access_log: AccessLogFormat,
    /// Log `/healthz` requests too (load balancer probes are left out by default).
    pub access_log_healthz: bool,
    /// Diagnostic log filter (`tracing_subscriber::EnvFilter` syntax).
    pub log: String,
    /// Diagnostic log format.
    pub log_format: LogFormat,
    /// Enforce, or only report, allowlist refusals.
    pub mode: Mode,
    /// The TLS SNI check on CONNECT tunnels.
    pub sni_check: SniCheck,
    /// CONNECT ports whose tunnels need not start with TLS (the SNI check is skipped there).
    pub non_tls_ports: Option<PortSet>,
    /// PROXY protocol on the proxy listener.
    pub proxy_protocol: ProxyProtocol,
    /// Peers (load balancers) trusted to send a PROXY protocol header.
    pub proxy_protocol_from: Vec<IpNet>,
    /// Where each setting's value came from.
    pub origins: BTreeMap<Key, Origin>,
    /// Things worth a warning once logging is up (unknown `CUTTLE_*` variables).
    pub warnings: Vec<String>,
}

/// Extra allowlist entries that apply only to clients in some networks: one
/// `[[client_rules]]` table of the config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRule {
    /// `name`, shown as the source of its entries (`client rule "build subnet"`).
    pub name: Option<String>,
    /// `cidrs`: the client networks the rule applies to.
    pub cidrs: Vec<IpNet>,
    /// `allow`: the entries, each with [`EntrySource::ClientRule`] as its source.
    pub entries: Vec<Entry>,
}

/// One value before parsing, with its origin.
struct Raw {
    text: String,
    origin: Origin,
}

impl Raw {
    fn invalid(&self, message: impl Into<String>) -> SettingsError {
        SettingsError::Invalid {
            origin: self.origin.clone(),
            message: message.into(),
        }
    }
}

/// The layers, read.
struct Layers {
    file: Option<(PathBuf, HashMap<String, String>)>,
    env: HashMap<String, String>,
    flags: Vec<(Key, &'static str, String)>,
}

impl Layers {
    /// The highest-priority value of `key`.
    fn get(&self, key: Key) -> Raw {
        if let Some((_, flag, text)) = self.flags.iter().rev().find(|(k, _, _)| *k == key) {
            return Raw {
                text: text.clone(),
                origin: Origin::Flag(flag),
            };
        }
        if let Some(text) = self
            .env
            .get(key.env_name())
            .filter(|v| !v.trim().is_empty())
        {
            return Raw {
                text: text.clone(),
                origin: Origin::Env(key.env_name()),
            };
        }
        if let Some((path, map)) = &self.file {
            if let Some(text) = map.get(key.file_key()) {
                return Raw {
                    text: text.clone(),
                    origin: Origin::File {
                        path: path.clone(),
                        key: key.file_key(),
                    },
                };
            }
        }
        Raw {
            text: key.default_value().to_string(),
            origin: Origin::Default(key),
        }
    }
}

impl Settings {
    /// Reads every layer and validates every value. Reads the config file and the allowlist
    /// file; touches nothing else.
    pub fn load(sources: &Sources) -> Result<Settings, SettingsError> {
        let config_path = sources.config_file.clone().or_else(|| {
            sources
                .env
                .get("CUTTLE_CONFIG")
                .filter(|v| !v.trim().is_empty())
                .map(PathBuf::from)
        });
        let (file, client_rules) = match config_path {
            Some(path) => {
                let (path, values, client_rules) = read_config_file(&path)?;
                (Some((path, values)), client_rules)
            }
            None => (None, Vec::new()),
        };
        let env = read_env(&sources.env);
        let layers = Layers {
            file,
            env: env.values,
            flags: sources.flags.clone(),
        };
        let mut origins = BTreeMap::new();
        let mut get = |key: Key| {
            let raw = layers.get(key);
            origins.insert(key, raw.origin.clone());
            raw
        };

        let listen = parse_socket_addr(&get(Key::Listen))?;
        let admin_listen = optional(get(Key::AdminListen), |raw| parse_socket_addr(&raw))?;
        let allowed_cidrs = parse_list(&get(Key::AllowedCidrs), parse_net)?;
        if allowed_cidrs.is_empty() {
            let raw = layers.get(Key::AllowedCidrs);
            return Err(raw.invalid(format!(
                "{:?} lists no network (expected e.g. 10.0.0.0/8,127.0.0.0/8)",
                raw.text
            )));
        }
        let aws_regions = parse_list(&get(Key::AwsRegions), |s| {
            Region::from_str(s).map_err(|e| e.to_string())
        })?;
        let no_whitelist = parse_bool(&get(Key::NoWhitelist))?;
        let shutdown_lifetime = parse_duration(&get(Key::ShutdownLifetime), true)?;
        let connect_ports = parse_ports(&get(Key::ConnectPorts))?;
        let http_ports = parse_ports(&get(Key::HttpPorts))?;
        let allowlist_file = optional(get(Key::AllowlistFile), |raw| Ok(PathBuf::from(raw.text)))?;
        let hosts_file = PathBuf::from(get(Key::HostsFile).text);
        let dns_servers = parse_list(&get(Key::DnsServers), parse_dns_server)?;
        let upstream_allow_cidrs = parse_list(&get(Key::UpstreamAllowCidrs), parse_net)?;
        let upstream_deny_cidrs = parse_list(&get(Key::UpstreamDenyCidrs), parse_net)?;
        let connect_timeout = parse_duration(&get(Key::ConnectTimeout), false)?;
        let header_timeout = parse_duration(&get(Key::HeaderTimeout), false)?;
        let idle_timeout = parse_duration(&get(Key::IdleTimeout), false)?;
        let max_connections = parse_count(&get(Key::MaxConnections))?;
        let max_pending_connects = parse_count(&get(Key::MaxPendingConnects))?;
        let workers = parse_workers(&get(Key::Workers))?;
        let access_log = parse_choice(
            &get(Key::AccessLog),
            &[
                ("squid", AccessLogFormat::Squid),
                ("json", AccessLogFormat::Json),
                ("off", AccessLogFormat::Off),
            ],
        )?;
        let access_log_healthz = parse_bool(&get(Key::AccessLogHealthz))?;
        let log_raw = get(Key::Log);
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_raw.text) {
            return Err(log_raw.invalid(format!(
                "{:?} is not a log filter ({e}; expected e.g. info or cuttle=debug,info)",
                log_raw.text
            )));
        }
        let log_format = parse_choice(
            &get(Key::LogFormat),
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        )?;

        let mode = parse_choice(
            &get(Key::Mode),
            &[("enforce", Mode::Enforce), ("report", Mode::Report)],
        )?;
        let sni_check = parse_choice(
            &get(Key::SniCheck),
            &[
                ("off", SniCheck::Off),
                ("match", SniCheck::Match),
                ("allowlist", SniCheck::Allowlist),
            ],
        )?;
        let non_tls_ports = optional(get(Key::NonTlsPorts), |raw| parse_ports(&raw))?;
        let proxy_protocol_raw = get(Key::ProxyProtocol);
        let proxy_protocol = parse_choice(
            &proxy_protocol_raw,
            &[
                ("off", ProxyProtocol::Off),
                ("optional", ProxyProtocol::Optional),
                ("required", ProxyProtocol::Required),
            ],
        )?;
        let proxy_protocol_from = parse_list(&get(Key::ProxyProtocolFrom), parse_net)?;
        if proxy_protocol != ProxyProtocol::Off && proxy_protocol_from.is_empty() {
            return Err(proxy_protocol_raw.invalid(format!(
                "{:?} needs CUTTLE_PROXY_PROTOCOL_FROM (expected the load balancer CIDRs allowed to send the header, e.g. 10.0.0.0/16)",
                proxy_protocol_raw.text
            )));
        }

        let mut allowlist = aws_defaults(&aws_regions);
        let whitelist = get(Key::SquidWhitelist);
        for item in list_items(&whitelist.text) {
            let pattern = Pattern::from_str(item).map_err(|e| whitelist.invalid(e.to_string()))?;
            allowlist.push(Entry {
                pattern,
                source: EntrySource::SquidWhitelist,
            });
        }
        if let Some(path) = &allowlist_file {
            let origin = layers.get(Key::AllowlistFile);
            allowlist.extend(read_allowlist_file(path).map_err(|message| origin.invalid(message))?);
        }

        Ok(Settings {
            listen,
            admin_listen,
            allowed_cidrs,
            aws_regions,
            no_whitelist,
            allowlist_file,
            allowlist,
            client_rules,
            connect_ports,
            http_ports,
            hosts_file,
            dns_servers,
            upstream_allow_cidrs,
            upstream_deny_cidrs,
            connect_timeout,
            header_timeout,
            idle_timeout,
            max_connections,
            max_pending_connects,
            workers,
            shutdown_lifetime,
            access_log,
            access_log_healthz,
            log: log_raw.text,
            log_format,
            mode,
            sni_check,
            non_tls_ports,
            proxy_protocol,
            proxy_protocol_from,
            origins,
            warnings: env.warnings,
        })
    }
}

impl Settings {
    /// Threads serving the proxy listener: `CUTTLE_WORKERS`, or one per CPU this process may
    /// use (cgroup CPU quotas included).
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(std::num::NonZeroUsize::get)
                .unwrap_or(1)
        })
    }

    /// The effective value of `key`, as text (for `cuttle config` and reload comparisons).
    pub fn value_text(&self, key: Key) -> String {
        fn join<T: fmt::Display>(items: &[T]) -> String {
            items
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        }
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let entries = |source: fn(&EntrySource) -> bool| {
            join(
                &self
                    .allowlist
                    .iter()
                    .filter(|e| source(&e.source))
                    .map(|e| e.pattern.to_string())
                    .collect::<Vec<_>>(),
            )
        };
        match key {
            Key::Listen => self.listen.to_string(),
            Key::AdminListen => opt(self.admin_listen.map(|a| a.to_string())),
            Key::SquidWhitelist => entries(|s| matches!(s, EntrySource::SquidWhitelist)),
            Key::AwsRegions => join(&self.aws_regions),
            Key::AllowedCidrs => join(&self.allowed_cidrs),
            Key::NoWhitelist => self.no_whitelist.to_string(),
            Key::ShutdownLifetime => humantime::format_duration(self.shutdown_lifetime).to_string(),
            Key::ConnectPorts => self.connect_ports.to_string(),
            Key::HttpPorts => self.http_ports.to_string(),
            Key::AllowlistFile => opt(self
                .allowlist_file
                .as_ref()
                .map(|p| p.display().to_string())),
            Key::HostsFile => self.hosts_file.display().to_string(),
            Key::DnsServers => {
                if self.dns_servers.is_empty() {
                    "system (/etc/resolv.conf)".into()
                } else {
                    join(&self.dns_servers)
                }
            }
            Key::UpstreamAllowCidrs => join(&self.upstream_allow_cidrs),
            Key::UpstreamDenyCidrs => join(&self.upstream_deny_cidrs),
            Key::ConnectTimeout => humantime::format_duration(self.connect_timeout).to_string(),
            Key::HeaderTimeout => humantime::format_duration(self.header_timeout).to_string(),
            Key::IdleTimeout => humantime::format_duration(self.idle_timeout).to_string(),
            Key::MaxConnections => self.max_connections.to_string(),
            Key::MaxPendingConnects => self.max_pending_connects.to_string(),
            Key::Workers => match self.workers {
                Some(n) => n.to_string(),
                None => "auto".to_string(),
            },
            Key::AccessLog => format!("{:?}", self.access_log).to_lowercase(),
            Key::AccessLogHealthz => self.access_log_healthz.to_string(),
            Key::Log => self.log.clone(),
            Key::LogFormat => format!("{:?}", self.log_format).to_lowercase(),
            Key::Mode => format!("{:?}", self.mode).to_lowercase(),
            Key::SniCheck => format!("{:?}", self.sni_check).to_lowercase(),
            Key::NonTlsPorts => opt(self.non_tls_ports.as_ref().map(|p| p.to_string())),
            Key::ProxyProtocol => format!("{:?}", self.proxy_protocol).to_lowercase(),
            Key::ProxyProtocolFrom => join(&self.proxy_protocol_from),
        }
    }
}

/// Reads an allowlist file: one entry a line, `#` starts a comment, blank lines skipped. An
/// invalid entry fails the whole file with `path:line: ...`.
pub fn read_allowlist_file(path: &Path) -> Result<Vec<Entry>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read allowlist file {}: {e}", path.display()))?;
    parse_allowlist(path, &text)
}

/// Parses the text of an allowlist file (see [`read_allowlist_file`]).
pub fn parse_allowlist(path: &Path, text: &str) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let content = line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let pattern =
            Pattern::from_str(content).map_err(|e| format!("{}:{line_no}: {e}", path.display()))?;
        entries.push(Entry {
            pattern,
            source: EntrySource::AllowlistFile {
                path: path.to_path_buf(),
                line: line_no,
            },
        });
    }
    Ok(entries)
}

/// The config file: the value of each setting as text, and the client rules.
type ConfigFile = (PathBuf, HashMap<String, String>, Vec<ClientRule>);

fn read_config_file(path: &Path) -> Result<ConfigFile, SettingsError> {
    let file_err = |message: String| SettingsError::File {
        path: path.to_path_buf(),
        message,
    };
    if !path.is_file() {
        return Err(file_err("no such file".into()));
    }
    let table = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<HashMap<String, config::Value>>())
        .map_err(|e| file_err(e.to_string()))?;
    let mut values = HashMap::new();
    let mut client_rules = Vec::new();
    for (key, value) in table {
        if key == CLIENT_RULES {
            client_rules = parse_client_rules(path, value)?;
            continue;
        }
        if Key::from_file_key(&key).is_none() {
            let mut known: Vec<&str> = Key::ALL.iter().map(|k| k.file_key()).collect();
            known.push(CLIENT_RULES);
            return Err(SettingsError::UnknownKey {
                path: path.to_path_buf(),
                key,
                known: known.join(", "),
            });
        }
        let text = match value.kind {
            config::ValueKind::Array(items) => items
                .into_iter()
                .map(|v| v.into_string())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_err(format!("key {key}: {e}")))?
                .join(","),
            config::ValueKind::Table(_) => {
                return Err(file_err(format!(
                    "key {key}: expected a value, found a table"
                )))
            }
            kind => config::Value::new(None, kind)
                .into_string()
                .map_err(|e| file_err(format!("key {key}: {e}")))?,
        };
        values.insert(key, text);
    }
    Ok((path.to_path_buf(), values, client_rules))
}

/// The config file's array of tables of per-client rules (a file-only setting: a list of
/// tables has no sensible environment form).
const CLIENT_RULES: &str = "client_rules";

/// The keys of one `[[client_rules]]` table.
const CLIENT_RULE_KEYS: [&str; 3] = ["name", "cidrs", "allow"];

/// Parses `[[client_rules]]`. Every error names the file and the key as
/// `client_rules[N].cidrs` (N from 0, in file order), quotes the value and says what was
/// expected.
fn parse_client_rules(path: &Path, value: config::Value) -> Result<Vec<ClientRule>, SettingsError> {
    let invalid = |key: String, message: String| SettingsError::File {
        path: path.to_path_buf(),
        message: format!("key {key}: {message}"),
    };
    let config::ValueKind::Array(items) = value.kind else {
        return Err(invalid(
            CLIENT_RULES.into(),
            "expected an array of tables ([[client_rules]] with cidrs and allow)".into(),
        ));
    };
    let mut rules = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let at = |field: &str| format!("{CLIENT_RULES}[{index}]{field}");
        let config::ValueKind::Table(mut table) = item.kind else {
            return Err(invalid(
                at(""),
                "expected a table with cidrs and allow (write [[client_rules]])".into(),
            ));
        };
        let mut unknown: Vec<&String> = table
            .keys()
            .filter(|k| !CLIENT_RULE_KEYS.contains(&k.as_str()))
            .collect();
        unknown.sort();
        if let Some(key) = unknown.first() {
            return Err(invalid(
                at(""),
                format!(
                    "unknown key {key:?} (known keys: {})",
                    CLIENT_RULE_KEYS.join(", ")
                ),
            ));
        }
        let name = match table.remove("name") {
            None => None,
            Some(v) => {
                let name = v
                    .into_string()
                    .map_err(|e| invalid(at(".name"), format!("{e} (expected a string)")))?;
                Some(name.trim().to_string()).filter(|n| !n.is_empty())
            }
        };
        let cidrs = string_list(table.remove("cidrs"))
            .map_err(|m| invalid(at(".cidrs"), m))?
            .iter()
            .map(|item| parse_net(item).map_err(|m| invalid(at(".cidrs"), m)))
            .collect::<Result<Vec<_>, _>>()?;
        if cidrs.is_empty() {
            return Err(invalid(
                at(".cidrs"),
                "lists no network (expected client networks such as [\"10.20.0.0/16\"])".into(),
            ));
        }
        let source = EntrySource::ClientRule {
            name: name.clone(),
            index,
        };
        let entries = string_list(table.remove("allow"))
            .map_err(|m| invalid(at(".allow"), m))?
            .iter()
            .map(|item| {
                Pattern::from_str(item)
                    .map(|pattern| Entry {
                        pattern,
                        source: source.clone(),
                    })
                    .map_err(|e| invalid(at(".allow"), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if entries.is_empty() {
            return Err(invalid(
                at(".allow"),
                "lists no entry (expected allowlist entries such as [\".github.com\", \"pypi.org\"])"
                    .into(),
            ));
        }
        rules.push(ClientRule {
            name,
            cidrs,
            entries,
        });
    }
    Ok(rules)
}

/// The items of a list value: an array of strings, or one comma- or space-separated string
/// (as every list setting accepts). Missing is an empty list.
fn string_list(value: Option<config::Value>) -> Result<Vec<String>, String> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    match value.kind {
        config::ValueKind::Array(items) => items
            .into_iter()
            .map(|item| match item.kind {
                config::ValueKind::String(s) => Ok(s.trim().to_string()),
                kind => Err(format!(
                    "{kind} is not a string (expected a list of strings)"
                )),
            })
            .collect(),
        config::ValueKind::String(s) => Ok(list_items(&s).map(str::to_string).collect()),
        kind => Err(format!("{kind} is not a list (expected a list of strings)")),
    }
}

struct EnvLayer {
    values: HashMap<String, String>,
    warnings: Vec<String>,
}

/// Keeps the variables cuttle knows; warns of unknown `CUTTLE_*` ones (likely typos). The
/// `CUTTLE_*` names are collected through the `config` crate's environment source.
fn read_env(env: &HashMap<String, String>) -> EnvLayer {
    let mut values = HashMap::new();
    let mut warnings = Vec::new();
    let prefixed = config::Config::builder()
        .add_source(
            config::Environment::with_prefix("CUTTLE")
                .prefix_separator("_")
                .source(Some(
                    env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                )),
        )
        .build()
        .and_then(|c| c.try_deserialize::<HashMap<String, String>>())
        .unwrap_or_default();
    for (key, value) in prefixed {
        let name = format!("CUTTLE_{}", key.to_uppercase());
        match Key::ALL.into_iter().find(|k| k.env_name() == name) {
            Some(k) => {
                values.insert(k.env_name().to_string(), value);
            }
            None if name == "CUTTLE_CONFIG" => {}
            None => warnings.push(format!("unknown variable {name} ignored")),
        }
    }
    for key in Key::ALL {
        let name = key.env_name();
        if !name.starts_with("CUTTLE_") {
            if let Some(value) = env.get(name) {
                values.insert(name.to_string(), value.clone());
            }
        }
    }
    warnings.sort();
    EnvLayer { values, warnings }
}

/// Items of a comma- or whitespace-separated list, empty items skipped.
fn list_items(s: &str) -> impl Iterator<Item = &str> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

fn parse_list<T>(
    raw: &Raw,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, SettingsError> {
    list_items(&raw.text)
        .map(|item| parse(item).map_err(|m| raw.invalid(m)))
        .collect()
}

fn optional<T>(
    raw: Raw,
    parse: impl FnOnce(Raw) -> Result<T, SettingsError>,
) -> Result<Option<T>, SettingsError> {
    if raw.text.trim().is_empty() {
        Ok(None)
    } else {
        parse(raw).map(Some)
    }
}

fn parse_socket_addr(raw: &Raw) -> Result<SocketAddr, SettingsError> {
    raw.text.trim().parse().map_err(|_| {
        raw.invalid(format!(
            "{:?} is not a listen address (expected IP:PORT such as 0.0.0.0:3128 or [::]:3128)",
            raw.text
        ))
    })
}

/// An IP network; a bare address is a /32 or /128. Host bits are cleared.
fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "{s:?} is not a CIDR (expected e.g. 10.0.0.0/8, 2001:db8::/32 or a single address)"
    ))
}

/// A DNS server: `IP` (port 53) or `IP:PORT` / `[IPv6]:PORT`.
fn parse_dns_server(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(format!(
        "{s:?} is not a DNS server address (expected e.g. 10.0.0.2 or 127.0.0.1:5353)"
    ))
}

fn parse_bool(raw: &Raw) -> Result<bool, SettingsError> {
    match raw.text.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(raw.invalid(format!(
            "{:?} is not a boolean (expected true or false)",
            raw.text
        ))),
    }
}

/// A duration: `500ms`, `10s`, `15m`, `1h` or a bare number of seconds.
fn parse_duration(raw: &Raw, zero_ok: bool) -> Result<Duration, SettingsError> {
    let text = raw.text.trim();
    let parsed = match text.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(text).ok(),
    };
    match parsed {
        Some(d) if zero_ok || !d.is_zero() => Ok(d),
        Some(_) => Err(raw.invalid(format!(
            "{text:?} is zero (expected a positive duration such as 500ms, 10s, 15m or a number of seconds)"
        ))),
        None => Err(raw.invalid(format!(
            "{text:?} is not a duration (expected e.g. 500ms, 10s, 15m, 1h or a non-negative number of seconds)"
        ))),
    }
}

fn parse_count(raw: &Raw) -> Result<usize, SettingsError> {
    match raw.text.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(raw.invalid(format!("{:?} is not a positive whole number", raw.text))),
    }
}

/// `auto` or a count from 1 to 1024.
fn parse_workers(raw: &Raw) -> Result<Option<usize>, SettingsError> {
    let text = raw.text.trim();
    if text.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    match text.parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(Some(n)),
        _ => Err(raw.invalid(format!(
            "{:?} is not \"auto\" or a thread count from 1 to 1024",
            raw.text
        ))),
    }
}

fn parse_ports(raw: &Raw) -> Result<PortSet, SettingsError> {
    raw.text.parse().map_err(|m: String| raw.invalid(m))
}

fn parse_choice<T: Copy>(raw: &Raw, choices: &[(&str, T)]) -> Result<T, SettingsError> {
    let text = raw.text.trim().to_ascii_lowercase();
    choices
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            raw.invalid(format!("{:?} is not one of {}", raw.text, names.join(", ")))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        Settings::load(&Sources::from_env(vars.iter().copied()))
    }

    fn err(vars: &[(&str, &str)]) -> String {
        match load(vars) {
            Ok(_) => panic!("{vars:?} should be refused"),
            Err(e) => e.to_string(),
        }
    }

    /// Every setting has its documented default with an empty environment.
    #[test]
    fn defaults() {
        let s = load(&[]).expect("defaults load");
        assert_eq!(s.listen, "0.0.0.0:3128".parse().unwrap());
        assert_eq!(s.admin_listen, None);
        assert_eq!(s.allowed_cidrs.len(), 5);
        assert_eq!(s.aws_regions, vec!["us-west-2".parse::<Region>().unwrap()]);
        assert!(!s.no_whitelist);
        assert_eq!(s.shutdown_lifetime, Duration::from_secs(20));
        assert!(s.connect_ports.contains(443) && !s.connect_ports.contains(80));
        for port in [
            80, 21, 443, 70, 210, 1025, 8080, 65535, 280, 488, 591, 777, 3128,
        ] {
            assert!(s.http_ports.contains(port), "http port {port}");
        }
        for port in [22, 25, 1024, 1] {
            assert!(!s.http_ports.contains(port), "http port {port}");
        }
        assert_eq!(s.hosts_file, PathBuf::from("/etc/hosts"));
        assert_eq!(s.connect_timeout, Duration::from_secs(10));
        assert_eq!(s.header_timeout, Duration::from_secs(30));
        assert_eq!(s.idle_timeout, Duration::from_secs(900));
        assert_eq!(s.max_connections, 10000);
        assert_eq!(s.access_log, AccessLogFormat::Squid);
        assert_eq!(s.log, "info");
        assert_eq!(s.log_format, LogFormat::Text);
        assert!(s.dns_servers.is_empty());
        assert_eq!(s.origins[&Key::Listen], Origin::Default(Key::Listen));
    }

    /// Each bad value names its variable, quotes the value and says what was expected.
    #[test]
    fn bad_values_name_variable_value_and_expectation() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "AWS_REGIONS",
                "us-west2",
                &["AWS_REGIONS", "\"us-west2\"", "expected e.g. us-west-2"],
            ),
            (
                "ALLOWED_CIDRS",
                "10.0.0.0/33",
                &["ALLOWED_CIDRS", "\"10.0.0.0/33\"", "expected"],
            ),
            (
                "SQUID_WHITELIST",
                "https://x.com/",
                &["SQUID_WHITELIST", "\"https://x.com/\"", "scheme"],
            ),
            (
                "CUTTLE_LISTEN",
                "nonsense",
                &["CUTTLE_LISTEN", "\"nonsense\"", "expected IP:PORT"],
            ),
            (
                "SHUTDOWN_LIFETIME",
                "-1",
                &["SHUTDOWN_LIFETIME", "\"-1\"", "expected"],
            ),
            (
                "NO_WHITELIST",
                "maybe",
                &["NO_WHITELIST", "\"maybe\"", "true or false"],
            ),
            (
                "CUTTLE_CONNECT_PORTS",
                "0",
                &["CUTTLE_CONNECT_PORTS", "\"0\""],
            ),
            (
                "CUTTLE_HTTP_PORTS",
                "90-80",
                &["CUTTLE_HTTP_PORTS", "\"90-80\""],
            ),
            (
                "CUTTLE_CONNECT_TIMEOUT",
                "0",
                &["CUTTLE_CONNECT_TIMEOUT", "zero"],
            ),
            (
                "CUTTLE_IDLE_TIMEOUT",
                "soon",
                &["CUTTLE_IDLE_TIMEOUT", "\"soon\""],
            ),
            (
                "CUTTLE_MAX_CONNECTIONS",
                "-5",
                &["CUTTLE_MAX_CONNECTIONS", "\"-5\""],
            ),
            (
                "CUTTLE_ACCESS_LOG",
                "xml",
                &["CUTTLE_ACCESS_LOG", "\"xml\"", "squid, json, off"],
            ),
            (
                "CUTTLE_LOG_FORMAT",
                "yaml",
                &["CUTTLE_LOG_FORMAT", "text, json"],
            ),
            ("CUTTLE_LOG", "[[[", &["CUTTLE_LOG", "\"[[[\""]),
            (
                "CUTTLE_UPSTREAM_DENY_CIDRS",
                "10.0.0/8",
                &["CUTTLE_UPSTREAM_DENY_CIDRS", "\"10.0.0/8\""],
            ),
            (
                "CUTTLE_DNS_SERVERS",
                "dns.local",
                &["CUTTLE_DNS_SERVERS", "\"dns.local\""],
            ),
            (
                "CUTTLE_ADMIN_LISTEN",
                "9090",
                &["CUTTLE_ADMIN_LISTEN", "\"9090\""],
            ),
        ];
        for (var, value, needles) in cases {
            let message = err(&[(var, value)]);
            for needle in *needles {
                assert!(
                    message.contains(needle),
                    "{var}={value}: {message:?} lacks {needle:?}"
                );
            }
        }
    }

    /// Squid names beat CUTTLE_* and file values; flags beat everything.
    #[test]
    fn layering_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cuttle.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:1000\"\nallowed_cidrs = [\"10.9.0.0/16\"]\nconnect_ports = \"443,8443\"\nshutdown_lifetime = 7\n",
        )
        .unwrap();
        let mut sources = Sources::from_env([
            ("CUTTLE_CONFIG", path.to_str().unwrap()),
            ("CUTTLE_LISTEN", "127.0.0.1:2000"),
            ("ALLOWED_CIDRS", "10.8.0.0/16"),
        ]);
        let s = Settings::load(&sources).unwrap();
        assert_eq!(
            s.listen,
            "127.0.0.1:2000".parse().unwrap(),
            "env beats file"
        );
        assert_eq!(
            s.allowed_cidrs,
            vec!["10.8.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert!(s.connect_ports.contains(8443), "file beats default");
        assert_eq!(
            s.shutdown_lifetime,
            Duration::from_secs(7),
            "file integer value"
        );
        assert_eq!(s.origins[&Key::Listen], Origin::Env("CUTTLE_LISTEN"));
        sources
            .flags
            .push((Key::Listen, "--listen", "127.0.0.1:3000".into()));
        let s = Settings::load(&sources).unwrap();
        assert_eq!(
            s.listen,
            "127.0.0.1:3000".parse().unwrap(),
            "flag beats env"
        );
        assert_eq!(s.origins[&Key::Listen], Origin::Flag("--listen"));
    }

    /// A bad value in the file names the file and the key.
    #[test]
    fn file_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cuttle.toml");
        std::fs::write(&path, "idle_timeout = \"forever\"\n").unwrap();
        let message = err(&[("CUTTLE_CONFIG", path.to_str().unwrap())]);
        assert!(
            message.contains("cuttle.toml key idle_timeout"),
            "{message}"
        );
        assert!(message.contains("\"forever\""), "{message}");
        std::fs::write(&path, "idle_timeot = \"1m\"\n").unwrap();
        let message = err(&[("CUTTLE_CONFIG", path.to_str().unwrap())]);
        assert!(message.contains("unknown key \"idle_timeot\""), "{message}");
        let message = err(&[("CUTTLE_CONFIG", "/nonexistent/cuttle.toml")]);
        assert!(message.contains("/nonexistent/cuttle.toml"), "{message}");
    }

    /// `[[client_rules]]` tables become client rules, their entries sourced to the rule.
    #[test]
    fn client_rules_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cuttle.toml");
        std::fs::write(
            &path,
            r#"
listen = "127.0.0.1:3128"

[[client_rules]]
name = "build subnet"
cidrs = ["10.20.0.0/16", "fd00:20::/32"]
allow = [".github.com", "files.pythonhosted.org", "*.pypi.org"]

[[client_rules]]
cidrs = "10.30.1.7"
allow = "pypi.org, 203.0.113.0/24"
"#,
        )
        .unwrap();
        let s = load(&[("CUTTLE_CONFIG", path.to_str().unwrap())]).unwrap();
        assert_eq!(s.client_rules.len(), 2);
        let build = &s.client_rules[0];
        assert_eq!(build.name.as_deref(), Some("build subnet"));
        assert_eq!(
            build.cidrs,
            vec![
                "10.20.0.0/16".parse::<IpNet>().unwrap(),
                "fd00:20::/32".parse().unwrap()
            ]
        );
        let texts: Vec<String> = build.entries.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            texts,
            [
                ".github.com (client rule \"build subnet\")",
                "files.pythonhosted.org (client rule \"build subnet\")",
                "*.pypi.org (client rule \"build subnet\")",
            ]
        );
        let unnamed = &s.client_rules[1];
        assert_eq!(unnamed.name, None);
        assert_eq!(
            unnamed.cidrs,
            vec!["10.30.1.7/32".parse::<IpNet>().unwrap()]
        );
        let texts: Vec<String> = unnamed.entries.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            texts,
            [
                "pypi.org (client_rules[1])",
                "203.0.113.0/24 (client_rules[1])"
            ]
        );
        // The global allowlist is untouched; without a file there are no rules.
        assert!(s
            .allowlist
            .iter()
            .all(|e| !matches!(e.source, EntrySource::ClientRule { .. })));
        assert!(load(&[]).unwrap().client_rules.is_empty());
    }

    /// A bad client rule names the file and `client_rules[N].key`, quotes the value and says
    /// what was expected.
    #[test]
    fn client_rule_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cuttle.toml");
        let ok = "[[client_rules]]\ncidrs = [\"10.0.0.0/8\"]\nallow = [\"a.com\"]\n";
        let cases: &[(&str, &[&str])] = &[
            (
                "[[client_rules]]\ncidrs = [\"10.0.0/8\"]\nallow = [\"a.com\"]\n",
                &["client_rules[0].cidrs", "\"10.0.0/8\"", "expected"],
            ),
            (
                "[[client_rules]]\ncidrs = [\"10.0.0.0/8\"]\nallow = [\"https://a.com/\"]\n",
                &[
                    "client_rules[0].allow",
                    "\"https://a.com/\"",
                    "scheme",
                    "expected",
                ],
            ),
            (
                "[[client_rules]]\ncidrs = []\nallow = [\"a.com\"]\n",
                &["client_rules[0].cidrs", "lists no network", "expected"],
            ),
            (
                "[[client_rules]]\ncidrs = [\"10.0.0.0/8\"]\n",
                &["client_rules[0].allow", "lists no entry", "expected"],
            ),
            (
                "[[client_rules]]\ncidrs = [\"10.0.0.0/8\"]\nalow = [\"a.com\"]\n",
                &[
                    "client_rules[0]",
                    "unknown key \"alow\"",
                    "name, cidrs, allow",
                ],
            ),
            (
                "[[client_rules]]\ncidrs = [\"10.0.0.0/8\"]\nallow = [7]\n",
                &["client_rules[0].allow", "7", "expected a list of strings"],
            ),
            (
                "client_rules = \"10.0.0.0/8\"\n",
                &["client_rules", "expected an array of tables"],
            ),
            (
                "client_rules = [\"10.0.0.0/8\"]\n",
                &["client_rules[0]", "expected a table"],
            ),
        ];
        for (text, needles) in cases {
            // A valid rule first, so that the bad one is number 1 (top-level values alone).
            let prefix = if text.starts_with("[[") { ok } else { "" };
            std::fs::write(&path, format!("{prefix}{text}")).unwrap();
            let message = err(&[("CUTTLE_CONFIG", path.to_str().unwrap())]);
            let message = message.replace("client_rules[1]", "client_rules[0]");
            assert!(message.contains("cuttle.toml"), "{text}: {message}");
            for needle in *needles {
                assert!(
                    message.contains(needle),
                    "{text}: {message:?} lacks {needle:?}"
                );
            }
        }
    }

    /// The allowlist holds regional defaults, then SQUID_WHITELIST, then the file, with sources.
    #[test]
    fn allowlist_sources() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allow.txt");
        std::fs::write(
            &path,
            "# comment\n\n.github.com  # trailing comment\npypi.org\n",
        )
        .unwrap();
        let s = load(&[
            ("AWS_REGIONS", "eu-west-1, cn-north-1"),
            ("SQUID_WHITELIST", ".example.com,foo.org,"),
            ("CUTTLE_ALLOWLIST_FILE", path.to_str().unwrap()),
        ])
        .unwrap();
        let texts: Vec<String> = s.allowlist.iter().map(|e| e.to_string()).collect();
        assert!(
            texts.contains(&".eu-west-1.amazonaws.com (AWS_REGIONS=eu-west-1)".to_string()),
            "{texts:?}"
        );
        assert!(
            texts.contains(&".example.com (SQUID_WHITELIST)".to_string()),
            "{texts:?}"
        );
        let github = format!(".github.com ({}:3)", path.display());
        assert!(texts.contains(&github), "{texts:?}");
        let pypi = format!("pypi.org ({}:4)", path.display());
        assert!(texts.contains(&pypi), "{texts:?}");

        std::fs::write(&path, "ok.com\nhttp://bad.com\n").unwrap();
        let message = err(&[("CUTTLE_ALLOWLIST_FILE", path.to_str().unwrap())]);
        assert!(
            message.contains(&format!("{}:2", path.display())),
            "{message}"
        );
        assert!(message.contains("http://bad.com"), "{message}");
    }

    /// Empty variables count as unset; unknown CUTTLE_ variables are warned about.
    #[test]
    fn empty_and_unknown_variables() {
        let s = load(&[("AWS_REGIONS", ""), ("CUTTLE_LISTN", "x")]).unwrap();
        assert_eq!(s.aws_regions.len(), 1);
        assert_eq!(
            s.warnings,
            vec!["unknown variable CUTTLE_LISTN ignored".to_string()]
        );
    }

    #[test]
    fn port_sets() {
        let p: PortSet = "443, 8000-8999".parse().unwrap();
        for (port, want) in [
            (443, true),
            (8000, true),
            (8999, true),
            (9000, false),
            (80, false),
        ] {
            assert_eq!(p.contains(port), want, "port {port}");
        }
        for bad in ["", "x", "0", "1-", "70000", "5-1"] {
            assert!(bad.parse::<PortSet>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn durations() {
        let raw = |t: &str| Raw {
            text: t.into(),
            origin: Origin::Env("X"),
        };
        for (text, want) in [
            ("500ms", 500),
            ("10s", 10_000),
            ("15m", 900_000),
            ("1h", 3_600_000),
            ("20", 20_000),
        ] {
            assert_eq!(
                parse_duration(&raw(text), true).unwrap(),
                Duration::from_millis(want),
                "{text}"
            );
        }
        assert!(parse_duration(&raw("0"), true).is_ok());
        assert!(parse_duration(&raw("0"), false).is_err());
        assert!(parse_duration(&raw("-1"), true).is_err());
    }
}
