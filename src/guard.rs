//! The destination address guard (DESIGN step 5): which resolved addresses the proxy may dial.
//!
//! No allowlisted name should lead to loopback, link-local (the instance metadata service
//! 169.254.169.254 and fd00:ec2::254 among them), unspecified, multicast, broadcast or reserved
//! addresses, nor to IPv6 forms that embed such an IPv4 address (IPv4-mapped, IPv4-compatible,
//! NAT64 `64:ff9b::/96`, 6to4 `2002::/16`, Teredo `2001::/32`), nor back to the proxy's own
//! listener. Private and CGNAT ranges stay allowed: VPC interface endpoints and EKS pod ranges
//! live there.
//!
//! `CUTTLE_UPSTREAM_ALLOW_CIDRS` and `CUTTLE_UPSTREAM_DENY_CIDRS` adjust this: when an address is
//! in either list, the most specific listed prefix decides; otherwise the built-in rules do.
//! The self-connection check always applies.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

use crate::netset::NetSet;

/// Why an address is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Loopback,
    LinkLocal,
    MetadataService,
    Unspecified,
    Multicast,
    Broadcast,
    Reserved,
    /// In `CUTTLE_UPSTREAM_DENY_CIDRS`.
    DenyList,
    /// The proxy's own listen address.
    SelfConnection,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Loopback => "a loopback address",
            Refusal::LinkLocal => "a link-local address",
            Refusal::MetadataService => "the instance metadata service",
            Refusal::Unspecified => "an unspecified address",
            Refusal::Multicast => "a multicast address",
            Refusal::Broadcast => "the broadcast address",
            Refusal::Reserved => "a reserved address",
            Refusal::DenyList => "in CUTTLE_UPSTREAM_DENY_CIDRS",
            Refusal::SelfConnection => "the proxy's own listen address",
        })
    }
}

/// The guard: built-in refused ranges, operator overrides, the proxy's own addresses.
#[derive(Clone, Debug, Default)]
pub struct AddressGuard {
    /// true = allow, false = deny; longest prefix decides.
    overrides: NetSet<bool>,
    own: Vec<SocketAddr>,
}

impl AddressGuard {
    /// From the operator's allow and deny lists and the proxy's own listen addresses.
    pub fn new(allow: &[IpNet], deny: &[IpNet], own: Vec<SocketAddr>) -> AddressGuard {
        let mut overrides = NetSet::new();
        // Deny first: when the same prefix is in both lists, deny wins.
        for net in deny {
            overrides.insert(*net, false);
        }
        for net in allow {
            overrides.insert(*net, true);
        }
        AddressGuard { overrides, own }
    }

    /// Ok if the proxy may dial `addr`.
    pub fn check(&self, addr: SocketAddr) -> Result<(), Refusal> {
        let ip = addr.ip().to_canonical();
        let is_own = self.own.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip().to_canonical() == ip || (own.ip().is_unspecified() && is_local(ip)))
        });
        if is_own {
            return Err(Refusal::SelfConnection);
        }
        self.check_ip(ip)
    }

    fn check_ip(&self, ip: IpAddr) -> Result<(), Refusal> {
        if let Some((_, allowed)) = self.overrides.longest_match(ip) {
            return if *allowed {
                Ok(())
            } else {
                Err(Refusal::DenyList)
            };
        }
        match ip {
            IpAddr::V4(v4) => builtin_v4(v4),
            IpAddr::V6(v6) => match embedded_v4(v6) {
                Some(v4) => self.check_ip(IpAddr::V4(v4)),
                None => builtin_v6(v6),
            },
        }
    }
}

/// Addresses that are this machine whatever its interfaces (a listener on `0.0.0.0` is also
/// reached there).
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified()
}

fn builtin_v4(ip: Ipv4Addr) -> Result<(), Refusal> {
    let o = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) {
        Err(Refusal::MetadataService)
    } else if ip.is_loopback() {
        Err(Refusal::Loopback)
    } else if ip.is_link_local() {
        Err(Refusal::LinkLocal)
    } else if o[0] == 0 {
        // 0.0.0.0/8, "this network": 0.0.0.0 reaches the local host on Linux.
        Err(Refusal::Unspecified)
    } else if ip.is_broadcast() {
        Err(Refusal::Broadcast)
    } else if ip.is_multicast() {
        Err(Refusal::Multicast)
    } else if o[0] >= 240 {
        Err(Refusal::Reserved)
    } else {
        Ok(())
    }
}

fn builtin_v6(ip: Ipv6Addr) -> Result<(), Refusal> {
    let s = ip.segments();
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        Err(Refusal::MetadataService)
    } else if ip.is_loopback() {
        Err(Refusal::Loopback)
    } else if ip.is_unspecified() {
        Err(Refusal::Unspecified)
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Err(Refusal::LinkLocal)
    } else if ip.is_multicast() {
        Err(Refusal::Multicast)
    } else {
        Ok(())
    }
}

/// The IPv4 address an IPv6 address stands for or tunnels to, if any.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low32 = |a: u16, b: u16| Ipv4Addr::from((u32::from(a) << 16) | u32::from(b));
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    match s {
        // IPv4-compatible ::a.b.c.d (deprecated, still routed by some stacks); not :: or ::1.
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 => Some(low32(hi, lo)),
        // NAT64 well-known prefix 64:ff9b::/96.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(low32(hi, lo)),
        // 6to4 2002:AABB:CCDD::/48.
        [0x2002, hi, lo, ..] => Some(low32(hi, lo)),
        // Teredo 2001:0::/32: the client's IPv4 address is the last 32 bits, inverted.
        [0x2001, 0, .., hi, lo] => Some(low32(!hi, !lo)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 443)
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// The built-in rules: what no allowlisted name may lead to, and what stays reachable.
    #[test]
    fn builtin_rules() {
        let guard = AddressGuard::default();
        let cases: &[(&str, Result<(), Refusal>)] = &[
            ("169.254.169.254", Err(Refusal::MetadataService)),
            ("fd00:ec2::254", Err(Refusal::MetadataService)),
            ("127.0.0.1", Err(Refusal::Loopback)),
            ("127.5.6.7", Err(Refusal::Loopback)),
            ("::1", Err(Refusal::Loopback)),
            ("169.254.1.1", Err(Refusal::LinkLocal)),
            ("fe80::1", Err(Refusal::LinkLocal)),
            ("0.0.0.0", Err(Refusal::Unspecified)),
            ("0.1.2.3", Err(Refusal::Unspecified)),
            ("::", Err(Refusal::Unspecified)),
            ("224.0.0.1", Err(Refusal::Multicast)),
            ("ff02::1", Err(Refusal::Multicast)),
            ("255.255.255.255", Err(Refusal::Broadcast)),
            ("240.0.0.1", Err(Refusal::Reserved)),
            ("::ffff:127.0.0.1", Err(Refusal::Loopback)),
            ("::ffff:169.254.169.254", Err(Refusal::MetadataService)),
            ("::127.0.0.1", Err(Refusal::Loopback)),
            ("64:ff9b::a9fe:a9fe", Err(Refusal::MetadataService)),
            ("2002:7f00:1::1", Err(Refusal::Loopback)),
            ("2001:0:1:2:3:4:80ff:fffe", Err(Refusal::Loopback)),
            ("10.1.2.3", Ok(())),
            ("172.16.0.1", Ok(())),
            ("192.168.1.1", Ok(())),
            ("100.64.0.1", Ok(())),
            ("52.94.76.1", Ok(())),
            ("2600:1f14::1", Ok(())),
            ("64:ff9b::345e:4c01", Ok(())),
            ("2002:3400:1::1", Ok(())),
        ];
        for (ip, want) in cases {
            assert_eq!(guard.check(addr(ip)), *want, "{ip}");
        }
    }

    /// Operator lists: the most specific listed prefix decides.
    #[test]
    fn overrides_most_specific_wins() {
        let guard = AddressGuard::new(
            &nets(&["127.0.0.0/8", "10.0.0.0/8"]),
            &nets(&["10.0.0.0/16", "127.0.0.9/32", "203.0.113.0/24"]),
            vec![],
        );
        let cases: &[(&str, Result<(), Refusal>)] = &[
            ("127.0.0.1", Ok(())),
            ("::ffff:127.0.0.1", Ok(())),
            ("127.0.0.9", Err(Refusal::DenyList)),
            ("10.0.1.1", Err(Refusal::DenyList)),
            ("10.1.1.1", Ok(())),
            ("203.0.113.7", Err(Refusal::DenyList)),
            ("169.254.169.254", Err(Refusal::MetadataService)),
        ];
        for (ip, want) in cases {
            assert_eq!(guard.check(addr(ip)), *want, "{ip}");
        }
    }

    /// The proxy never dials its own listener, even where loopback is allowed.
    #[test]
    fn self_connection() {
        let own = vec![
            "127.0.0.1:3128".parse().unwrap(),
            "0.0.0.0:8080".parse().unwrap(),
        ];
        let guard = AddressGuard::new(&nets(&["127.0.0.0/8"]), &[], own);
        let check = |s: &str| guard.check(s.parse().unwrap());
        assert_eq!(check("127.0.0.1:3128"), Err(Refusal::SelfConnection));
        assert_eq!(check("127.0.0.1:8080"), Err(Refusal::SelfConnection));
        assert_eq!(
            check("[::ffff:127.0.0.1]:3128"),
            Err(Refusal::SelfConnection)
        );
        assert_eq!(check("127.0.0.1:3129"), Ok(()));
    }
}
