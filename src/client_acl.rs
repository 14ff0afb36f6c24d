//! Client networks allowed to use the proxy (`ALLOWED_CIDRS`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::netset::NetSet;

/// The address of a client as the proxy judges it: canonical, so that an IPv4-mapped IPv6 peer
/// on a dual-stack listener (`::ffff:10.1.2.3`) is the IPv4 address it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(SocketAddr);

impl ClientAddr {
    /// From a peer address, canonicalised.
    pub fn new(peer: SocketAddr) -> ClientAddr {
        ClientAddr(SocketAddr::new(peer.ip().to_canonical(), peer.port()))
    }

    /// The client's IP.
    pub fn ip(&self) -> IpAddr {
        self.0.ip()
    }

    /// The client's socket address.
    pub fn socket_addr(&self) -> SocketAddr {
        self.0
    }
}

impl fmt::Display for ClientAddr {
    /// The IP alone, as Squid's access log shows it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.ip())
    }
}

/// The allowed client networks.
#[derive(Clone, Debug)]
pub struct ClientAcl {
    nets: NetSet<()>,
}

impl ClientAcl {
    /// From the configured networks.
    pub fn new(nets: &[IpNet]) -> ClientAcl {
        ClientAcl {
            nets: nets.iter().map(|n| (*n, ())).collect(),
        }
    }

    /// The network that admits `client`, if any.
    pub fn find(&self, client: ClientAddr) -> Option<IpNet> {
        self.nets.longest_match(client.ip()).map(|(net, _)| net)
    }

    /// True if `client` may use the proxy.
    pub fn allows(&self, client: ClientAddr) -> bool {
        self.find(client).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(s: &str) -> ClientAddr {
        ClientAddr::new(SocketAddr::new(s.parse().unwrap(), 40000))
    }

    /// IPv4, IPv6, and IPv4-mapped peers against the default ranges.
    #[test]
    fn default_ranges() {
        let nets: Vec<IpNet> = [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "127.0.0.0/8",
            "::1/128",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let acl = ClientAcl::new(&nets);
        let cases = [
            ("10.1.2.3", true),
            ("172.31.255.255", true),
            ("172.32.0.1", false),
            ("192.168.0.1", true),
            ("127.0.0.2", true),
            ("::1", true),
            ("::ffff:10.1.2.3", true),
            ("::ffff:8.8.8.8", false),
            ("8.8.8.8", false),
            ("fe80::1", false),
            ("2001:db8::1", false),
        ];
        for (ip, want) in cases {
            assert_eq!(acl.allows(client(ip)), want, "client {ip}");
        }
    }

    #[test]
    fn mapped_peer_is_displayed_as_ipv4() {
        assert_eq!(client("::ffff:10.1.2.3").to_string(), "10.1.2.3");
    }
}
