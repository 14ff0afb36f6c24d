//! A set of IP networks with longest-prefix lookup, each network carrying a value.
//!
//! One hash map per prefix length present, probed from the most specific length down: a lookup
//! costs at most one hash probe per distinct prefix length (33 for IPv4, 129 for IPv6, a handful
//! in practice), whatever the number of networks. IPv4-mapped IPv6 addresses are looked up as
//! IPv4.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// Networks with values, longest prefix wins.
#[derive(Clone, Debug)]
pub struct NetSet<V> {
    /// (prefix length, is IPv6) -> network -> value; kept sorted most specific first.
    levels: Vec<((u8, bool), HashMap<IpNet, V>)>,
    len: usize,
}

impl<V> Default for NetSet<V> {
    fn default() -> Self {
        NetSet {
            levels: Vec::new(),
            len: 0,
        }
    }
}

impl<V> NetSet<V> {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `net` (host bits cleared). An existing equal network keeps its first value.
    pub fn insert(&mut self, net: IpNet, value: V) {
        let net = net.trunc();
        let level = (net.prefix_len(), matches!(net, IpNet::V6(_)));
        let index = match self.levels.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => {
                self.levels.push((level, HashMap::new()));
                self.levels
                    .sort_by_key(|(level, _)| std::cmp::Reverse(level.0));
                self.levels
                    .iter()
                    .position(|(l, _)| *l == level)
                    .unwrap_or_default()
            }
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = self.levels[index].1.entry(net) {
            slot.insert(value);
            self.len += 1;
        }
    }

    /// The most specific network containing `ip`, with its value.
    pub fn longest_match(&self, ip: IpAddr) -> Option<(IpNet, &V)> {
        let ip = ip.to_canonical();
        let v6 = ip.is_ipv6();
        for ((prefix, level_v6), map) in &self.levels {
            if *level_v6 != v6 {
                continue;
            }
            let Ok(net) = IpNet::new(ip, *prefix) else {
                continue;
            };
            let net = net.trunc();
            if let Some(v) = map.get(&net) {
                return Some((net, v));
            }
        }
        None
    }

    /// True if some network contains `ip`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.longest_match(ip).is_some()
    }

    /// Number of networks.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<V: Clone> FromIterator<(IpNet, V)> for NetSet<V> {
    fn from_iter<I: IntoIterator<Item = (IpNet, V)>>(iter: I) -> Self {
        let mut set = NetSet::new();
        for (net, v) in iter {
            set.insert(net, v);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_mapped_addresses_match_v4() {
        let set: NetSet<&str> = [
            (net("10.0.0.0/8"), "wide"),
            (net("10.1.0.0/16"), "narrow"),
            (net("::1/128"), "v6 loopback"),
            (net("2001:db8::/32"), "doc"),
        ]
        .into_iter()
        .collect();
        let cases = [
            ("10.1.2.3", Some("narrow")),
            ("10.2.0.1", Some("wide")),
            ("11.0.0.1", None),
            ("::ffff:10.1.2.3", Some("narrow")),
            ("::1", Some("v6 loopback")),
            ("2001:db8:1::5", Some("doc")),
            ("2001:db9::1", None),
        ];
        for (ip, want) in cases {
            let got = set.longest_match(ip.parse().unwrap()).map(|(_, v)| *v);
            assert_eq!(got, want, "{ip}");
        }
        assert_eq!(set.len(), 4);
    }

    #[test]
    fn host_bits_are_cleared() {
        let mut set = NetSet::new();
        set.insert(net("192.168.1.77/24"), ());
        assert!(set.contains("192.168.1.1".parse().unwrap()));
        assert!(!set.contains("192.168.2.1".parse().unwrap()));
    }
}
