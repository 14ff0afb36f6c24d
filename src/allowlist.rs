//! Destination rules: which hosts clients may reach.
//!
//! Squid `dstdomain` semantics: `.example.com` allows `example.com` and every subdomain,
//! `example.com` exactly that name; case-insensitive, a trailing dot ignored (both via
//! [`Host::parse`]). Entries with `*` are globs over labels (`*` within one label, `**` across
//! labels), compiled into one `globset::GlobSet`. IP and CIDR entries allow IP-literal
//! destinations inside them. The AWS regional defaults of the Squid image come from
//! [`aws_defaults`].
//!
//! Globs are matched over the host with `.` read as a path separator, so `*` never crosses a
//! dot. `**` stands for one or more whole labels: `**.example.com` allows `a.example.com` and
//! `a.b.example.com` but not the apex `example.com` (write `.example.com` for that), just as
//! `*.example.com` does not allow the apex.
//!
//! Lookup cost does not grow with the number of entries: exact names and suffixes live in one
//! hash map, with every parent domain of a listed name marked, probed once per label from the
//! top-level domain down to the first name nothing is listed under (so a host under no entry
//! costs one or two probes, and a deep host only as many as its matching entry has labels);
//! CIDRs live in one hash set per prefix length present.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::str::FromStr;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
// Keys come from the configuration only; a client chooses what is looked up, never what is
// stored, so a fast non-keyed hash is safe here and halves the per-label cost.
use ipnet::IpNet;
use rustc_hash::FxHashMap;

use crate::host::{is_name_byte, is_numeric_label, Host, HostError};

/// Where an allowlist entry came from, shown by `cuttle check` / `cuttle config` and in refusal
/// reasons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntrySource {
    /// A regional default for this region (`AWS_REGIONS`).
    AwsRegion(Region),
    /// One of the Squid image's global AWS endpoints.
    AwsGlobal,
    /// The `SQUID_WHITELIST` variable (or the config layer that set the same setting).
    SquidWhitelist,
    /// A line of `CUTTLE_ALLOWLIST_FILE` (1-based).
    AllowlistFile { path: PathBuf, line: usize },
    /// The `allow` list of `[[client_rules]]` number `index` (0-based) of the config file,
    /// which applies only to that rule's client networks.
    ClientRule { name: Option<String>, index: usize },
}

impl fmt::Display for EntrySource {
    /// `AWS_REGIONS=us-west-2`, `AWS global default`, `SQUID_WHITELIST`, `/etc/cuttle/allow:12`,
    /// `client rule "build subnet"` (`client_rules[0]` when the rule has no name).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntrySource::AwsRegion(region) => write!(f, "AWS_REGIONS={region}"),
            EntrySource::AwsGlobal => f.write_str("AWS global default"),
            EntrySource::SquidWhitelist => f.write_str("SQUID_WHITELIST"),
            EntrySource::AllowlistFile { path, line } => write!(f, "{}:{line}", path.display()),
            EntrySource::ClientRule {
                name: Some(name), ..
            } => write!(f, "client rule {name:?}"),
            EntrySource::ClientRule { name: None, index } => write!(f, "client_rules[{index}]"),
        }
    }
}

/// A parsed allowlist pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// `example.com`: exactly this (normalised) name.
    Exact(String),
    /// `.example.com`: this name and every subdomain; stored without the leading dot.
    Suffix(String),
    /// An entry containing `*`, normalised to lowercase without trailing dot.
    Glob(String),
    /// An IP address (as a /32 or /128) or CIDR, for IP-literal destinations.
    Net(IpNet),
}

impl fmt::Display for Pattern {
    /// The entry as an operator would write it: `example.com`, `.example.com`, `*.s3.amazonaws.com`,
    /// `10.0.0.0/8` (a single address without prefix length).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(name) | Pattern::Glob(name) => f.write_str(name),
            Pattern::Suffix(name) => write!(f, ".{name}"),
            Pattern::Net(net) if net.prefix_len() == net.max_prefix_len() => {
                write!(f, "{}", net.addr())
            }
            Pattern::Net(net) => write!(f, "{net}"),
        }
    }
}

impl FromStr for Pattern {
    type Err = EntryError;

    /// Parses one entry. Trims surrounding whitespace. Refuses an empty entry, a scheme
    /// (`https://x.com`), a path (`x.com/a`), a port (`x.com:443`), inner whitespace, an empty
    /// label (`a..b`, `..a`), and anything [`Host::parse`] refuses (IDNA names are converted).
    ///
    /// A CIDR with host bits set (`10.1.2.3/8`) means its network (`10.0.0.0/8`), as in Squid.
    fn from_str(s: &str) -> Result<Pattern, EntryError> {
        let err = |why: &str| EntryError {
            entry: s.to_owned(),
            why: why.to_owned(),
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(err("it is empty"));
        }
        if t.contains(char::is_whitespace) {
            return Err(err("it contains whitespace"));
        }
        if t.contains("://") {
            return Err(err("it has a scheme"));
        }
        if t.contains('/') {
            return match t.parse::<IpNet>() {
                Ok(net) => Ok(Pattern::Net(net.trunc())),
                Err(_) => Err(err("it has a path")),
            };
        }
        if let Some(ip) = parse_ip(t) {
            return Ok(Pattern::Net(IpNet::from(ip)));
        }
        if has_port(t) {
            return Err(err("it has a port"));
        }
        if t.contains('*') {
            return parse_glob(t).map(Pattern::Glob).map_err(err);
        }
        if let Some(rest) = t.strip_prefix('.') {
            return match Host::parse(rest) {
                Ok(Host::Name(name)) => Ok(Pattern::Suffix(name)),
                Ok(Host::Ip(_)) => Err(err(
                    "a leading dot needs a name, not an IP address (write the IP or a CIDR)",
                )),
                Err(HostError::Empty) => Err(err("it has an empty label")),
                Err(e) => Err(err(host_why(&e))),
            };
        }
        match Host::parse(t) {
            Ok(Host::Name(name)) => Ok(Pattern::Exact(name)),
            Ok(Host::Ip(ip)) => Ok(Pattern::Net(IpNet::from(ip))),
            Err(e) => Err(err(host_why(&e))),
        }
    }
}

/// A bare or bracketed IP address.
fn parse_ip(t: &str) -> Option<IpAddr> {
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Some(ip);
    }
    let inner = t.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// `host:443`, `[::1]:443`: a colon followed by digits (IPv6 addresses were tried before).
fn has_port(t: &str) -> bool {
    t.rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
}

/// The phrase for an [`EntryError`] when the entry is not a valid host.
fn host_why(e: &HostError) -> &'static str {
    match e {
        HostError::Empty => "it is empty",
        HostError::TooLong(_) => "it is longer than 253 characters",
        HostError::EmptyLabel(_) => "it has an empty label",
        HostError::LabelTooLong(_) => "it has a label longer than 63 characters",
        HostError::BadChar(_) => "it has a character not allowed in a host name",
        HostError::Idna(_) => "it is not a valid internationalised name",
        HostError::AmbiguousNumeric(_) => {
            "it looks like a numeric IP address in a non-standard form"
        }
    }
}

/// Validates and normalises a glob entry: lowercase, trailing dot stripped, Unicode labels without
/// `*` converted to punycode, labels of `[a-z0-9_-*]`, `**` only as a whole label.
fn parse_glob(t: &str) -> Result<String, &'static str> {
    if t.starts_with('.') {
        return Err("a glob cannot start with a dot (write *.example.com or **.example.com)");
    }
    let lower = t.to_lowercase();
    let body = lower.strip_suffix('.').unwrap_or(&lower);
    let mut labels = Vec::new();
    for label in body.split('.') {
        if label.is_empty() {
            return Err("it has an empty label");
        }
        let label = if label.is_ascii() || label.contains('*') {
            label.to_owned()
        } else {
            idna::domain_to_ascii(label).map_err(|_| "it is not a valid internationalised name")?
        };
        if !label.bytes().all(|b| is_name_byte(b) || b == b'*') {
            return Err("it has a character not allowed in a host name");
        }
        if label.contains("**") && label != "**" {
            return Err("** must be a whole label");
        }
        if label.len() > 63 {
            return Err("it has a label longer than 63 characters");
        }
        labels.push(label);
    }
    if labels.iter().all(|l| l.bytes().all(|b| b == b'*')) {
        return Err("it matches every name (NO_WHITELIST=true allows any destination)");
    }
    let numeric_or_wild = |l: &String| is_numeric_label(l) || l.bytes().all(|b| b == b'*');
    if labels.last().is_some_and(|l| is_numeric_label(l)) || labels.iter().all(numeric_or_wild) {
        return Err("a glob matches names only (use a CIDR like 10.0.0.0/24 for addresses)");
    }
    Ok(labels.join("."))
}

/// The glob over `/`-separated labels. `**` is one or more labels: globset's `**` also matches
/// zero components, so a `**` that is not the last label becomes `*/**` (one label, then any).
fn glob_path(glob: &str) -> String {
    let labels: Vec<&str> = glob.split('.').collect();
    let last = labels.len() - 1;
    labels
        .iter()
        .enumerate()
        .map(|(i, &l)| if l == "**" && i != last { "*/**" } else { l })
        .collect::<Vec<_>>()
        .join("/")
}

/// Why an allowlist entry was refused. The message quotes the entry and says what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} is not a valid allowlist entry: {why} (expected a host name like example.com or .example.com, a glob like *.example.com, or an IP/CIDR)")]
pub struct EntryError {
    /// The entry as given.
    pub entry: String,
    /// What is wrong with it, e.g. `it has a scheme`.
    pub why: String,
}

/// One allowlist entry with its provenance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub pattern: Pattern,
    pub source: EntrySource,
}

impl fmt::Display for Entry {
    /// `.us-west-2.amazonaws.com (AWS_REGIONS=us-west-2)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.pattern, self.source)
    }
}

/// An AWS region name of the form `xx-name-N` (`us-west-2`, `cn-north-1`, `us-gov-west-1`,
/// `ap-southeast-3`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Region(String);

/// Why a region name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a region name (expected e.g. us-west-2)")]
pub struct RegionError(pub String);

impl FromStr for Region {
    type Err = RegionError;
    /// Lowercase letters in two or more dash-separated alphabetic parts followed by a numeric
    /// part: `^[a-z]{2}(-[a-z]+)+-[0-9]+$`. Surrounding whitespace trimmed; case folded.
    fn from_str(s: &str) -> Result<Region, RegionError> {
        let name = s.trim().to_ascii_lowercase();
        let parts: Vec<&str> = name.split('-').collect();
        let alpha = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase());
        let ok = match parts.as_slice() {
            [first, middle @ .., number] if !middle.is_empty() => {
                first.len() == 2
                    && alpha(first)
                    && middle.iter().all(alpha)
                    && !number.is_empty()
                    && number.bytes().all(|b| b.is_ascii_digit())
            }
            _ => false,
        };
        if ok {
            Ok(Region(name))
        } else {
            Err(RegionError(s.to_owned()))
        }
    }
}

impl Region {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// China regions (`cn-*`) live under `amazonaws.com.cn`.
    pub fn is_china(&self) -> bool {
        self.0.starts_with("cn-")
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The Squid image's defaults: for each region `.REGION.amazonaws.com` and
/// `.s3-REGION.amazonaws.com` (`.amazonaws.com.cn` for `cn-*`), then the global endpoints
/// (`iam.amazonaws.com`, `sts.amazonaws.com`, `support.us-east-1.amazonaws.com`,
/// `waf.amazonaws.com`, `cloudfront.amazonaws.com`, `route53.amazonaws.com`,
/// `route53domains.us-east-1.amazonaws.com`, `devicefarm.us-west-2.amazonaws.com`,
/// `importexport.amazonaws.com`) as exact names.
///
/// A China region gets `.REGION.amazonaws.com.cn` only: its S3 endpoints are all under that
/// name, there is no legacy `s3-REGION` form.
pub fn aws_defaults(regions: &[Region]) -> Vec<Entry> {
    const GLOBAL: [&str; 9] = [
        "iam.amazonaws.com",
        "sts.amazonaws.com",
        "support.us-east-1.amazonaws.com",
        "waf.amazonaws.com",
        "cloudfront.amazonaws.com",
        "route53.amazonaws.com",
        "route53domains.us-east-1.amazonaws.com",
        "devicefarm.us-west-2.amazonaws.com",
        "importexport.amazonaws.com",
    ];
    let mut entries = Vec::new();
    for region in regions {
        let source = EntrySource::AwsRegion(region.clone());
        let suffixes = if region.is_china() {
            vec![format!("{region}.amazonaws.com.cn")]
        } else {
            vec![
                format!("{region}.amazonaws.com"),
                format!("s3-{region}.amazonaws.com"),
            ]
        };
        entries.extend(suffixes.into_iter().map(|name| Entry {
            pattern: Pattern::Suffix(name),
            source: source.clone(),
        }));
    }
    entries.extend(GLOBAL.iter().map(|name| Entry {
        pattern: Pattern::Exact((*name).to_owned()),
        source: EntrySource::AwsGlobal,
    }));
    entries
}

/// The compiled destination rules.
#[derive(Debug, Clone)]
pub struct Allowlist {
    /// Kept entries, in the order given; the maps below hold indices into it.
    entries: Vec<Entry>,
    /// `Exact` and `Suffix` entries (without the leading dot) by name, and every parent domain
    /// of one, so that a lookup walks down from the top-level domain and stops at the first
    /// name nothing is listed under: a few probes whatever the list's size and the host's
    /// depth.
    names: FxHashMap<String, Name>,
    globs: GlobSet,
    /// Entry index of each glob in `globs`, in glob order.
    glob_entries: Vec<usize>,
    /// `Net` entries by canonical network (see [`canonical_net`]).
    nets: HashMap<IpNet, usize>,
    /// Prefix lengths present in `nets`, longest first, per family.
    v4_prefixes: Vec<u8>,
    v6_prefixes: Vec<u8>,
}

impl Allowlist {
    /// Compiles entries. An entry covered by another (`a.example.com` or `.a.example.com` under
    /// `.example.com`, a duplicate, an address inside a listed CIDR) is dropped with a
    /// `tracing::debug!` naming both, whatever their order. Globs are never dropped.
    /// Fails only if a glob does not compile (then the error quotes it).
    pub fn new(entries: Vec<Entry>) -> Result<Allowlist, EntryError> {
        let covered = covering_entries(&entries);
        let mut list = Allowlist {
            entries: Vec::with_capacity(entries.len()),
            names: FxHashMap::default(),
            globs: GlobSet::empty(),
            glob_entries: Vec::new(),
            nets: HashMap::new(),
            v4_prefixes: Vec::new(),
            v6_prefixes: Vec::new(),
        };
        let mut globs = GlobSetBuilder::new();
        for (entry, covered_by) in entries.iter().zip(covered) {
            if let Some(by) = covered_by {
                tracing::debug!(
                    entry = %entry,
                    covered_by = %entries[by],
                    "allowlist entry covered by another, dropped"
                );
                continue;
            }
            let idx = list.entries.len();
            match &entry.pattern {
                Pattern::Exact(name) => list.add_name(name).exact = Some(idx),
                Pattern::Suffix(name) => list.add_name(name).suffix = Some(idx),
                Pattern::Glob(glob) => {
                    globs.add(compile_glob(glob)?);
                    list.glob_entries.push(idx);
                }
                Pattern::Net(net) => {
                    let net = canonical_net(net);
                    list.nets.insert(net, idx);
                    let prefixes = match net {
                        IpNet::V4(_) => &mut list.v4_prefixes,
                        IpNet::V6(_) => &mut list.v6_prefixes,
                    };
                    if !prefixes.contains(&net.prefix_len()) {
                        prefixes.push(net.prefix_len());
                    }
                }
            }
            list.entries.push(entry.clone());
        }
        list.v4_prefixes.sort_unstable_by(|a, b| b.cmp(a));
        list.v6_prefixes.sort_unstable_by(|a, b| b.cmp(a));
        list.globs = globs.build().map_err(|e| EntryError {
            entry: e.glob().unwrap_or_default().to_owned(),
            why: format!("it does not compile as a glob: {e}"),
        })?;
        Ok(list)
    }

    /// The node of `name`, with every parent domain marked as one.
    fn add_name(&mut self, name: &str) -> &mut Name {
        for (dot, _) in name.match_indices('.') {
            self.names
                .entry(name[dot + 1..].to_owned())
                .or_default()
                .parent = true;
        }
        self.names.entry(name.to_owned()).or_default()
    }

    /// The entry that allows `host`, if any. Names: the exact or suffix entry (kept entries
    /// never cover one another, so at most one matches), then globs. IPs: only `Net` entries
    /// (names never allow an IP literal).
    pub fn find(&self, host: &Host) -> Option<&Entry> {
        let idx = match host {
            Host::Name(name) => self.find_name(name),
            Host::Ip(ip) => {
                // `::ffff:10.1.2.3` reaches 10.1.2.3: judge it by the IPv4 entries first.
                let canonical = ip.to_canonical();
                self.find_ip(canonical)
                    .or_else(|| (canonical != *ip).then(|| self.find_ip(*ip)).flatten())
            }
        };
        idx.map(|i| &self.entries[i])
    }

    fn find_name(&self, name: &str) -> Option<usize> {
        // `com`, `example.com`, `a.example.com`: down from the top-level domain while something
        // is listed below.
        let starts = name.rmatch_indices('.').map(|(dot, _)| dot + 1);
        for start in starts.chain(std::iter::once(0)) {
            let Some(node) = self.names.get(&name[start..]) else {
                break;
            };
            if let Some(i) = node.suffix {
                return Some(i);
            }
            if start == 0 {
                if let Some(i) = node.exact {
                    return Some(i);
                }
            }
            if !node.parent {
                break;
            }
        }
        if self.glob_entries.is_empty() {
            return None;
        }
        let path = name.replace('.', "/");
        let first = self.globs.matches(path).into_iter().min()?;
        Some(self.glob_entries[first])
    }

    /// The most specific `Net` entry containing `ip`.
    fn find_ip(&self, ip: IpAddr) -> Option<usize> {
        let prefixes = match ip {
            IpAddr::V4(_) => &self.v4_prefixes,
            IpAddr::V6(_) => &self.v6_prefixes,
        };
        prefixes.iter().find_map(|&len| {
            let net = IpNet::new(ip, len).ok()?.trunc();
            self.nets.get(&net).copied()
        })
    }

    /// The entries kept after dropping covered ones, in the order given.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Number of entries kept.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// True when no entry is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// === helpers ===

/// A name in [`Allowlist::names`].
#[derive(Clone, Copy, Debug, Default)]
struct Name {
    /// The `Exact` entry for this name.
    exact: Option<usize>,
    /// The `Suffix` entry for this name: it and every name under it.
    suffix: Option<usize>,
    /// Some entry lies under this name.
    parent: bool,
}

/// `a.b.c`, `b.c`, `c`: the name and each parent, longest first.
fn suffixes(name: &str) -> impl Iterator<Item = &str> {
    std::iter::once(name).chain(name.match_indices('.').map(move |(i, _)| &name[i + 1..]))
}

/// The network as matched: host bits cleared, and an IPv4-mapped IPv6 network (`::ffff:0:0/96`
/// or longer) as the IPv4 network it denotes, since hosts are canonicalised the same way.
fn canonical_net(net: &IpNet) -> IpNet {
    let net = net.trunc();
    let IpNet::V6(v6) = net else { return net };
    let mapped = v6.addr().to_ipv4_mapped().filter(|_| v6.prefix_len() >= 96);
    mapped
        .and_then(|v4| ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).ok())
        .map_or(net, IpNet::V4)
}

fn compile_glob(glob: &str) -> Result<globset::Glob, EntryError> {
    let err = |why: String| EntryError {
        entry: glob.to_owned(),
        why,
    };
    // A `Pattern::Glob` built by hand skipped `parse_glob`; check it the same way.
    match parse_glob(glob) {
        Ok(normal) if normal == glob => {}
        Ok(_) => {
            return Err(err(
                "it is not a normalised glob (lowercase, no trailing dot)".into(),
            ))
        }
        Err(why) => return Err(err(why.into())),
    }
    GlobBuilder::new(&glob_path(glob))
        .literal_separator(true)
        .build()
        .map_err(|e| err(format!("it does not compile as a glob: {e}")))
}

/// For each entry, the index of the kept entry that covers it (so it is dropped), or `None`.
///
/// Independent of order: a name is covered by the shortest listed suffix it is under, which is
/// itself never covered; duplicates are covered by their first occurrence. Globs neither cover
/// nor are covered.
fn covering_entries(entries: &[Entry]) -> Vec<Option<usize>> {
    let mut first_exact: HashMap<&str, usize> = HashMap::new();
    let mut first_suffix: HashMap<&str, usize> = HashMap::new();
    let mut first_net: HashMap<IpNet, usize> = HashMap::new();
    let mut v4_prefixes: Vec<u8> = Vec::new();
    let mut v6_prefixes: Vec<u8> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        match &entry.pattern {
            Pattern::Exact(name) => {
                first_exact.entry(name).or_insert(i);
            }
            Pattern::Suffix(name) => {
                first_suffix.entry(name).or_insert(i);
            }
            Pattern::Net(net) => {
                let net = canonical_net(net);
                first_net.entry(net).or_insert(i);
                let prefixes = match net {
                    IpNet::V4(_) => &mut v4_prefixes,
                    IpNet::V6(_) => &mut v6_prefixes,
                };
                if !prefixes.contains(&net.prefix_len()) {
                    prefixes.push(net.prefix_len());
                }
            }
            Pattern::Glob(_) => {}
        }
    }
    v4_prefixes.sort_unstable();
    v6_prefixes.sort_unstable();

    let shortest_suffix = |name: &str| suffixes(name).filter_map(|s| first_suffix.get(s)).last();
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let by = match &entry.pattern {
                Pattern::Exact(name) => shortest_suffix(name).or(first_exact.get(name.as_str())),
                Pattern::Suffix(name) => shortest_suffix(name),
                Pattern::Net(net) => {
                    let net = canonical_net(net);
                    let prefixes = match net {
                        IpNet::V4(_) => &v4_prefixes,
                        IpNet::V6(_) => &v6_prefixes,
                    };
                    prefixes
                        .iter()
                        .take_while(|&&len| len <= net.prefix_len())
                        .find_map(|&len| {
                            let wider = IpNet::new(net.addr(), len).ok()?.trunc();
                            first_net.get(&wider)
                        })
                }
                Pattern::Glob(_) => None,
            };
            by.copied().filter(|&j| j != i)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(s: &str) -> Entry {
        Entry {
            pattern: s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}")),
            source: EntrySource::SquidWhitelist,
        }
    }

    fn list(entries: &[&str]) -> Allowlist {
        Allowlist::new(entries.iter().map(|s| entry(s)).collect())
            .unwrap_or_else(|e| panic!("{entries:?}: {e}"))
    }

    /// The pattern of the entry that allows `host`, as the operator wrote it.
    fn allowed_by(list: &Allowlist, host: &str) -> Option<String> {
        let host = Host::parse(host).unwrap_or_else(|e| panic!("{host:?}: {e}"));
        list.find(&host).map(|e| e.pattern.to_string())
    }

    /// Runs `(entries, host, allowing entry)` cases.
    fn check(cases: &[(&[&str], &str, Option<&str>)]) {
        for (entries, host, want) in cases {
            let got = allowed_by(&list(entries), host);
            assert_eq!(got.as_deref(), *want, "entries {entries:?}, host {host:?}");
        }
    }

    /// `.d` allows `d` and its subdomains, on label boundaries only, whatever the case or a
    /// trailing dot.
    #[test]
    fn suffix_entries_match_apex_and_subdomains_on_label_boundaries() {
        const EX: &[&str] = &[".example.com"];
        const AWS: &[&str] = &[".us-west-2.amazonaws.com"];
        check(&[
            (EX, "example.com", Some(".example.com")),
            (EX, "a.example.com", Some(".example.com")),
            (EX, "a.b.example.com", Some(".example.com")),
            (EX, "A.Example.COM.", Some(".example.com")),
            (EX, "example.com.", Some(".example.com")),
            (EX, "evilexample.com", None),
            (EX, "example.com.evil.com", None),
            (EX, "example.co", None),
            (EX, "com", None),
            (
                AWS,
                "ec2.us-west-2.amazonaws.com",
                Some(".us-west-2.amazonaws.com"),
            ),
            (
                AWS,
                "us-west-2.amazonaws.com",
                Some(".us-west-2.amazonaws.com"),
            ),
            (AWS, "evilus-west-2.amazonaws.com", None),
            (AWS, "us-west-2.amazonaws.com.evil.com", None),
            (AWS, "amazonaws.com", None),
            (&[".Example.COM."], "a.example.com", Some(".example.com")),
            (
                &[".bücher.example"],
                "www.xn--bcher-kva.example",
                Some(".xn--bcher-kva.example"),
            ),
            (
                &[".bücher.example"],
                "www.BÜCHER.example",
                Some(".xn--bcher-kva.example"),
            ),
        ]);
    }

    /// `d` allows exactly `d` (modulo case and a trailing dot), never a subdomain.
    #[test]
    fn exact_entries_match_only_that_name() {
        const EX: &[&str] = &["example.com"];
        check(&[
            (EX, "example.com", Some("example.com")),
            (EX, "EXAMPLE.com.", Some("example.com")),
            (EX, "a.example.com", None),
            (EX, "evilexample.com", None),
            (EX, "example.com.evil.com", None),
            (&["Example.COM."], "example.com", Some("example.com")),
        ]);
    }

    /// `*` stays within one label, `**` is one or more labels, and neither matches the apex.
    #[test]
    fn globs_match_over_labels() {
        const S3: &[&str] = &["*.s3.amazonaws.com"];
        const MID: &[&str] = &["s3.*.amazonaws.com"];
        const DEEP: &[&str] = &["**.example.com"];
        const DEEP_MID: &[&str] = &["s3.**.amazonaws.com"];
        const DEEP_END: &[&str] = &["example.**"];
        const PART: &[&str] = &["api-*.example.com"];
        check(&[
            (S3, "bucket.s3.amazonaws.com", Some("*.s3.amazonaws.com")),
            (S3, "BUCKET.S3.amazonaws.com.", Some("*.s3.amazonaws.com")),
            (S3, "s3.amazonaws.com", None),
            (S3, "a.b.s3.amazonaws.com", None),
            (S3, "bucket.s3.amazonaws.com.evil.com", None),
            (S3, "buckets3.amazonaws.com", None),
            (
                MID,
                "s3.us-west-2.amazonaws.com",
                Some("s3.*.amazonaws.com"),
            ),
            (MID, "s3.amazonaws.com", None),
            (MID, "s3.a.b.amazonaws.com", None),
            (MID, "x.s3.us-west-2.amazonaws.com", None),
            (DEEP, "a.example.com", Some("**.example.com")),
            (DEEP, "a.b.example.com", Some("**.example.com")),
            (DEEP, "example.com", None),
            (DEEP, "evilexample.com", None),
            (DEEP, "a.evilexample.com", None),
            (DEEP_MID, "s3.a.amazonaws.com", Some("s3.**.amazonaws.com")),
            (
                DEEP_MID,
                "s3.a.b.amazonaws.com",
                Some("s3.**.amazonaws.com"),
            ),
            (DEEP_MID, "s3.amazonaws.com", None),
            (DEEP_END, "example.com", Some("example.**")),
            (DEEP_END, "example.co.uk", Some("example.**")),
            (DEEP_END, "example", None),
            (DEEP_END, "www.example.com", None),
            (PART, "api-1.example.com", Some("api-*.example.com")),
            (PART, "api.example.com", None),
            (PART, "x.api-1.example.com", None),
            (
                &["*.S3.Amazonaws.COM."],
                "b.s3.amazonaws.com",
                Some("*.s3.amazonaws.com"),
            ),
            (S3, "10.1.2.3", None),
        ]);
    }

    /// IP and CIDR entries allow IP literals inside them (mapped IPv6 as IPv4); names never
    /// allow IPs and nets never allow names.
    #[test]
    fn ip_entries_match_ip_literals() {
        const NETS: &[&str] = &["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "::1"];
        check(&[
            (NETS, "10.9.8.7", Some("10.0.0.0/8")),
            (NETS, "10.0.0.0", Some("10.0.0.0/8")),
            (NETS, "11.0.0.1", None),
            (NETS, "192.168.1.7", Some("192.168.1.7")),
            (NETS, "192.168.1.8", None),
            (NETS, "[2001:db8:1::5]", Some("2001:db8::/32")),
            (NETS, "2001:db9::1", None),
            (NETS, "[::1]", Some("::1")),
            (NETS, "::2", None),
            (NETS, "[::ffff:10.1.2.3]", Some("10.0.0.0/8")),
            (NETS, "::ffff:192.168.1.7", Some("192.168.1.7")),
            (NETS, "::ffff:11.0.0.1", None),
            (
                &["::ffff:10.0.0.0/104"],
                "10.1.2.3",
                Some("::ffff:10.0.0.0/104"),
            ),
            (
                &["::ffff:10.0.0.0/104"],
                "[::ffff:10.1.2.3]",
                Some("::ffff:10.0.0.0/104"),
            ),
            (&["::/0"], "[::ffff:10.1.2.3]", Some("::/0")),
            (&["::/0"], "10.1.2.3", None),
            (&["10.1.2.3/8"], "10.200.0.1", Some("10.0.0.0/8")),
            (&["[::1]"], "::1", Some("::1")),
            (
                &[".example.com", "example.com", "*.example.com"],
                "10.0.0.1",
                None,
            ),
            (&["10.0.0.0/8", "0.0.0.0/0", "::/0"], "example.com", None),
        ]);
    }

    /// Lookup order: exact, then suffix, then the first matching glob in the order given.
    #[test]
    fn find_prefers_exact_then_suffix_then_first_glob() {
        check(&[
            (
                &["*.example.com", "a.example.com"],
                "a.example.com",
                Some("a.example.com"),
            ),
            (
                &["*.example.com", ".a.example.com"],
                "a.example.com",
                Some(".a.example.com"),
            ),
            (
                &["*.example.com", ".a.example.com"],
                "b.example.com",
                Some("*.example.com"),
            ),
            (
                &["**.example.com", "*.example.com"],
                "a.example.com",
                Some("**.example.com"),
            ),
            (
                &["*.example.com", "**.example.com"],
                "a.example.com",
                Some("*.example.com"),
            ),
            (
                &["*.example.com", "**.example.com"],
                "a.b.example.com",
                Some("**.example.com"),
            ),
        ]);
    }

    /// Covered entries and duplicates are dropped whatever the order; globs are kept.
    #[test]
    fn covered_entries_are_dropped_in_either_order() {
        let cases: &[(&[&str], &[&str])] = &[
            (&[".example.com", "a.example.com"], &[".example.com"]),
            (&[".example.com", ".a.example.com"], &[".example.com"]),
            (&[".example.com", "example.com"], &[".example.com"]),
            (&[".example.com", ".example.com"], &[".example.com"]),
            (&["example.com", "example.com"], &["example.com"]),
            (
                &[".example.com", "x.a.example.com", ".a.example.com"],
                &[".example.com"],
            ),
            (&["10.0.0.0/8", "10.1.2.3"], &["10.0.0.0/8"]),
            (&["10.0.0.0/8", "10.1.0.0/16"], &["10.0.0.0/8"]),
            (&["10.0.0.0/8", "10.0.0.0/8"], &["10.0.0.0/8"]),
            (
                &["::ffff:10.0.0.0/104", "10.1.2.3"],
                &["::ffff:10.0.0.0/104"],
            ),
            (&["2001:db8::/32", "2001:db8::1"], &["2001:db8::/32"]),
            (
                &["example.com", "a.example.com"],
                &["example.com", "a.example.com"],
            ),
            (
                &[".example.com", "evilexample.com"],
                &[".example.com", "evilexample.com"],
            ),
            (
                &[".a.example.com", "b.example.com"],
                &[".a.example.com", "b.example.com"],
            ),
            (
                &["*.example.com", "a.example.com"],
                &["*.example.com", "a.example.com"],
            ),
            (
                &[".example.com", "*.example.com"],
                &[".example.com", "*.example.com"],
            ),
            (
                &["*.example.com", "*.example.com"],
                &["*.example.com", "*.example.com"],
            ),
            (&["10.0.0.0/8", "11.0.0.0/8"], &["10.0.0.0/8", "11.0.0.0/8"]),
            (
                &["10.0.0.1", "::ffff:10.0.0.2"],
                &["10.0.0.1", "::ffff:10.0.0.2"],
            ),
        ];
        for (entries, kept) in cases {
            for reversed in [false, true] {
                let mut given = entries.to_vec();
                let mut want = kept.to_vec();
                if reversed {
                    given.reverse();
                    want.reverse();
                }
                let got: Vec<String> = list(&given)
                    .entries()
                    .iter()
                    .map(|e| e.pattern.to_string())
                    .collect();
                assert_eq!(got, want, "entries {given:?}");
            }
        }
    }

    /// Of duplicates the first one is kept, with its source.
    #[test]
    fn duplicate_keeps_first_source() {
        let file = EntrySource::AllowlistFile {
            path: "/etc/cuttle/allow".into(),
            line: 3,
        };
        let entries = vec![
            Entry {
                pattern: Pattern::Suffix("example.com".into()),
                source: file.clone(),
            },
            Entry {
                pattern: Pattern::Suffix("example.com".into()),
                source: EntrySource::SquidWhitelist,
            },
        ];
        let list = Allowlist::new(entries).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list.entries()[0].source, file);
        let host = Host::parse("a.example.com").unwrap();
        assert_eq!(
            list.find(&host).map(ToString::to_string).as_deref(),
            Some(".example.com (/etc/cuttle/allow:3)")
        );
    }

    /// Entries parse into the right pattern and print as an operator would write them.
    #[test]
    fn patterns_parse_and_display() {
        let net = |s: &str| Pattern::Net(s.parse().unwrap());
        let cases: &[(&str, Pattern, &str)] = &[
            (
                "example.com",
                Pattern::Exact("example.com".into()),
                "example.com",
            ),
            (
                " Example.COM. ",
                Pattern::Exact("example.com".into()),
                "example.com",
            ),
            (
                ".example.com",
                Pattern::Suffix("example.com".into()),
                ".example.com",
            ),
            (
                ".EXAMPLE.com.",
                Pattern::Suffix("example.com".into()),
                ".example.com",
            ),
            (
                "bücher.example",
                Pattern::Exact("xn--bcher-kva.example".into()),
                "xn--bcher-kva.example",
            ),
            (
                "*.s3.amazonaws.com",
                Pattern::Glob("*.s3.amazonaws.com".into()),
                "*.s3.amazonaws.com",
            ),
            (
                "S3.*.AmazonAWS.com.",
                Pattern::Glob("s3.*.amazonaws.com".into()),
                "s3.*.amazonaws.com",
            ),
            (
                "**.example.com",
                Pattern::Glob("**.example.com".into()),
                "**.example.com",
            ),
            (
                "*.bücher.example",
                Pattern::Glob("*.xn--bcher-kva.example".into()),
                "*.xn--bcher-kva.example",
            ),
            ("10.1.2.3", net("10.1.2.3/32"), "10.1.2.3"),
            ("10.0.0.0/8", net("10.0.0.0/8"), "10.0.0.0/8"),
            ("10.1.2.3/8", net("10.0.0.0/8"), "10.0.0.0/8"),
            ("10.1.2.3/32", net("10.1.2.3/32"), "10.1.2.3"),
            ("2001:db8::/32", net("2001:db8::/32"), "2001:db8::/32"),
            ("::1", net("::1/128"), "::1"),
            ("[::1]", net("::1/128"), "::1"),
            (
                "::ffff:10.1.2.3",
                net("::ffff:10.1.2.3/128"),
                "::ffff:10.1.2.3",
            ),
        ];
        for (input, pattern, shown) in cases {
            let got: Pattern = input.parse().unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(&got, pattern, "parse {input:?}");
            assert_eq!(got.to_string(), *shown, "display of {input:?}");
        }
    }

    /// Each malformed entry is refused with a phrase saying what is wrong.
    #[test]
    fn malformed_entries_are_refused() {
        let long_label = format!("{}.com", "a".repeat(64));
        let cases: &[(&str, &str)] = &[
            ("", "it is empty"),
            ("   ", "it is empty"),
            ("https://x.com/", "it has a scheme"),
            ("http://x.com", "it has a scheme"),
            ("x.com:443", "it has a port"),
            (".x.com:443", "it has a port"),
            ("10.1.2.3:80", "it has a port"),
            ("[::1]:443", "it has a port"),
            ("x.com/a", "it has a path"),
            ("x.com/", "it has a path"),
            ("10.0.0.0/33", "it has a path"),
            ("a b", "it contains whitespace"),
            ("a\tb.com", "it contains whitespace"),
            ("a..b", "it has an empty label"),
            ("..a", "it has an empty label"),
            (".", "it has an empty label"),
            ("x.com..", "it has an empty label"),
            ("*..example.com", "it has an empty label"),
            (&long_label, "it has a label longer than 63 characters"),
            (
                "user@x.com",
                "it has a character not allowed in a host name",
            ),
            ("x%2ecom", "it has a character not allowed in a host name"),
            ("x.com:", "it has a character not allowed in a host name"),
            (
                "*.ex%61mple.com",
                "it has a character not allowed in a host name",
            ),
            (
                "127.1",
                "it looks like a numeric IP address in a non-standard form",
            ),
            (
                "2130706433",
                "it looks like a numeric IP address in a non-standard form",
            ),
            (
                ".127.1",
                "it looks like a numeric IP address in a non-standard form",
            ),
            ("xn--a.example", "it is not a valid internationalised name"),
            (
                ".10.0.0.1",
                "a leading dot needs a name, not an IP address (write the IP or a CIDR)",
            ),
            (
                ".*.example.com",
                "a glob cannot start with a dot (write *.example.com or **.example.com)",
            ),
            ("a**.example.com", "** must be a whole label"),
            ("***.example.com", "** must be a whole label"),
            (
                "*",
                "it matches every name (NO_WHITELIST=true allows any destination)",
            ),
            (
                "**",
                "it matches every name (NO_WHITELIST=true allows any destination)",
            ),
            (
                "*.*",
                "it matches every name (NO_WHITELIST=true allows any destination)",
            ),
            (
                "10.0.0.*",
                "a glob matches names only (use a CIDR like 10.0.0.0/24 for addresses)",
            ),
            (
                "*.0.0.1",
                "a glob matches names only (use a CIDR like 10.0.0.0/24 for addresses)",
            ),
        ];
        for (input, why) in cases {
            let err = input.parse::<Pattern>().expect_err(input);
            assert_eq!(err.entry, *input, "entry quoted for {input:?}");
            assert_eq!(err.why, *why, "why for {input:?}");
        }
        let msg = "x.com:443".parse::<Pattern>().unwrap_err().to_string();
        assert!(
            msg.starts_with("\"x.com:443\" is not a valid allowlist entry: it has a port"),
            "{msg}"
        );
    }

    /// A hand-built glob that `Pattern::from_str` would refuse does not compile.
    #[test]
    fn invalid_hand_built_glob_is_refused() {
        for glob in ["a/*.com", "*.Example.com", "**"] {
            let entries = vec![Entry {
                pattern: Pattern::Glob(glob.into()),
                source: EntrySource::SquidWhitelist,
            }];
            let err = Allowlist::new(entries).expect_err(glob);
            assert_eq!(err.entry, glob, "entry quoted for {glob:?}");
        }
    }

    /// Region names: `xx-name-N`, case folded, whitespace trimmed.
    #[test]
    fn region_names() {
        for (input, want) in [
            ("us-west-2", "us-west-2"),
            ("us-gov-west-1", "us-gov-west-1"),
            ("cn-north-1", "cn-north-1"),
            ("cn-northwest-1", "cn-northwest-1"),
            ("ap-southeast-3", "ap-southeast-3"),
            ("eu-central-2", "eu-central-2"),
            ("US-WEST-2", "us-west-2"),
            (" us-east-1 ", "us-east-1"),
        ] {
            let region: Region = input.parse().unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(region.as_str(), want, "region {input:?}");
        }
        for input in [
            "",
            " ",
            "us-west2",
            "uswest-2",
            "us-west-",
            "us-2",
            "u-west-2",
            "usa-west-2",
            "us--west-2",
            "us-west-2a",
            "us-west-2-",
            "-us-west-2",
            "us_west_2",
            "us-wëst-2",
            "us-west-2.evil",
        ] {
            let err = input.parse::<Region>().expect_err(input);
            assert_eq!(err, RegionError(input.to_owned()), "region {input:?}");
        }
        assert_eq!(
            "us-west2".parse::<Region>().unwrap_err().to_string(),
            "\"us-west2\" is not a region name (expected e.g. us-west-2)"
        );
        let region = |s: &str| s.parse::<Region>().unwrap();
        assert!(region("cn-north-1").is_china());
        assert!(!region("us-west-2").is_china());
    }

    /// Each source prints as the operator knows it.
    #[test]
    fn entry_source_display() {
        let cases = [
            (
                EntrySource::AwsRegion("us-west-2".parse().unwrap()),
                "AWS_REGIONS=us-west-2",
            ),
            (EntrySource::AwsGlobal, "AWS global default"),
            (EntrySource::SquidWhitelist, "SQUID_WHITELIST"),
            (
                EntrySource::AllowlistFile {
                    path: "/etc/cuttle/allow".into(),
                    line: 12,
                },
                "/etc/cuttle/allow:12",
            ),
        ];
        for (source, want) in cases {
            assert_eq!(source.to_string(), want, "{source:?}");
        }
    }

    /// Regional suffixes per region (China under amazonaws.com.cn), then the global names.
    #[test]
    fn aws_defaults_per_region_then_globals() {
        let regions: Vec<Region> = ["us-west-2", "cn-north-1"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        let shown: Vec<String> = aws_defaults(&regions)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            shown,
            [
                ".us-west-2.amazonaws.com (AWS_REGIONS=us-west-2)",
                ".s3-us-west-2.amazonaws.com (AWS_REGIONS=us-west-2)",
                ".cn-north-1.amazonaws.com.cn (AWS_REGIONS=cn-north-1)",
                "iam.amazonaws.com (AWS global default)",
                "sts.amazonaws.com (AWS global default)",
                "support.us-east-1.amazonaws.com (AWS global default)",
                "waf.amazonaws.com (AWS global default)",
                "cloudfront.amazonaws.com (AWS global default)",
                "route53.amazonaws.com (AWS global default)",
                "route53domains.us-east-1.amazonaws.com (AWS global default)",
                "devicefarm.us-west-2.amazonaws.com (AWS global default)",
                "importexport.amazonaws.com (AWS global default)",
            ]
        );
        assert_eq!(aws_defaults(&[]).len(), 9, "globals without regions");
    }

    /// `find` returns the entry with its source, ready for a refusal/approval reason.
    #[test]
    fn find_names_the_rule_and_its_source() {
        let regions: Vec<Region> = ["us-west-2", "cn-north-1"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        let list = Allowlist::new(aws_defaults(&regions)).unwrap();
        let cases = [
            (
                "ec2.us-west-2.amazonaws.com",
                Some(".us-west-2.amazonaws.com (AWS_REGIONS=us-west-2)"),
            ),
            (
                "bucket.s3-us-west-2.amazonaws.com",
                Some(".s3-us-west-2.amazonaws.com (AWS_REGIONS=us-west-2)"),
            ),
            (
                "s3.cn-north-1.amazonaws.com.cn",
                Some(".cn-north-1.amazonaws.com.cn (AWS_REGIONS=cn-north-1)"),
            ),
            (
                "devicefarm.us-west-2.amazonaws.com",
                Some(".us-west-2.amazonaws.com (AWS_REGIONS=us-west-2)"),
            ),
            (
                "IAM.amazonaws.com.",
                Some("iam.amazonaws.com (AWS global default)"),
            ),
            ("ec2.us-east-1.amazonaws.com", None),
            ("s3.cn-north-1.amazonaws.com", None),
            ("evilus-west-2.amazonaws.com", None),
            ("us-west-2.amazonaws.com.evil.com", None),
            ("x.iam.amazonaws.com", None),
        ];
        for (host, want) in cases {
            let got = list
                .find(&Host::parse(host).unwrap())
                .map(ToString::to_string);
            assert_eq!(got.as_deref(), want, "host {host:?}");
        }
        // devicefarm.us-west-2 is covered by the us-west-2 suffix; with us-east-1 instead it
        // stays, and support.us-east-1 and route53domains.us-east-1 go.
        assert_eq!(list.len(), 2 + 1 + 8, "entries kept: {:?}", list.entries());
        let east = Allowlist::new(aws_defaults(&["us-east-1".parse().unwrap()])).unwrap();
        assert_eq!(east.len(), 2 + 7, "entries kept: {:?}", east.entries());
    }

    /// An empty allowlist allows nothing.
    #[test]
    fn empty_allowlist_allows_nothing() {
        let list = Allowlist::new(Vec::new()).unwrap();
        assert!(list.is_empty());
        for host in ["example.com", "10.0.0.1", "::1"] {
            assert_eq!(
                list.find(&Host::parse(host).unwrap()),
                None,
                "host {host:?}"
            );
        }
    }

    fn labels() -> impl Strategy<Value = Vec<String>> {
        // A small alphabet so that generated names often share labels; a letter first so that
        // no label reads as a number.
        prop::collection::vec("[ab][ab0-]{0,2}", 1..4)
    }

    prop_compose! {
        /// A host that is often `d`, under `d`, or a look-alike of `d`.
        fn host_near(d: Vec<String>)(
            kind in 0..4u8,
            prefix in labels(),
            other in labels(),
        ) -> Vec<String> {
            match kind {
                0 => d.clone(),
                1 => prefix.into_iter().chain(d.iter().cloned()).collect(),
                2 => {
                    // Glue a label onto the front of `d` without a dot: `evil` + `d`.
                    let mut h = d.clone();
                    h[0] = format!("{}{}", prefix[0], h[0]);
                    h
                }
                _ => other,
            }
        }
    }

    fn case_mix(s: &str, upper: &[bool]) -> String {
        s.chars()
            .zip(upper.iter().cycle())
            .map(|(c, &u)| if u { c.to_ascii_uppercase() } else { c })
            .collect()
    }

    proptest! {
        /// `.d` allows `h` iff `h == d` or `h` ends with `.d`; case and a trailing dot on `h`
        /// never change that.
        #[test]
        fn suffix_entry_matches_on_label_boundaries(
            (d, h) in labels().prop_flat_map(|d| (Just(d.clone()), host_near(d))),
            upper in prop::collection::vec(any::<bool>(), 1..8),
            trailing_dot in any::<bool>(),
        ) {
            let d = d.join(".");
            let h = h.join(".");
            let list = list(&[&format!(".{d}")]);
            let expected = h == d || h.ends_with(&format!(".{d}"));
            let plain = list.find(&Host::parse(&h).unwrap()).is_some();
            prop_assert_eq!(plain, expected, "entry .{} host {}", d, h);
            let mut variant = case_mix(&h, &upper);
            if trailing_dot {
                variant.push('.');
            }
            let host = Host::parse(&variant).unwrap();
            prop_assert_eq!(list.find(&host).is_some(), expected, "entry .{} host {}", d, variant);
        }
    }
}
