//! Property tests of the pure policy: allowlist invariants, host normalisation, and the whole
//! decision, over generated hosts and entries. (`src/allowlist.rs` has the suffix invariant on
//! label boundaries; these add the rest.)

use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;

use cuttle::allowlist::{Allowlist, Entry, EntrySource, Pattern};
use cuttle::client_acl::ClientAddr;
use cuttle::host::Host;
use cuttle::policy::{Decision, Policy, Request, Target};
use cuttle::settings::{Settings, Sources};

// === Generators ===

/// Labels from a small alphabet, so generated names often share labels; a letter first so that
/// no label reads as a number, and no `x` so that none is punycode.
fn label() -> impl Strategy<Value = String> {
    "[abc][abc0-9-]{0,3}"
}

fn name(max_labels: usize) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(label(), 1..=max_labels)
}

/// A host that is `d`, under `d`, a look-alike of `d` or something else.
fn host_near(d: Vec<String>) -> impl Strategy<Value = Vec<String>> {
    (0..4u8, name(3), name(4)).prop_map(move |(kind, prefix, other)| match kind {
        0 => d.clone(),
        1 => prefix.into_iter().chain(d.iter().cloned()).collect(),
        2 => {
            let mut h = d.clone();
            h[0] = format!("{}{}", prefix[0], h[0]);
            h
        }
        _ => other,
    })
}

/// An allowlist entry as an operator might write it: exact, suffix, glob or CIDR.
fn entry_text() -> impl Strategy<Value = String> {
    prop_oneof![
        name(3).prop_map(|n| n.join(".")),
        name(3).prop_map(|n| format!(".{}", n.join("."))),
        name(2).prop_map(|n| format!("*.{}", n.join("."))),
        name(2).prop_map(|n| format!("**.{}", n.join("."))),
        (label(), name(2)).prop_map(|(l, n)| format!("{l}.*.{}", n.join("."))),
        (0..=255u8, 0..=32u8).prop_map(|(a, len)| format!("10.{a}.0.0/{len}")),
        Just("::1".to_string()),
        Just("2001:db8::/32".to_string()),
    ]
}

/// Hosts to ask about: names near the generated entries, IP literals, and junk.
fn host_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => name(5).prop_map(|n| n.join(".")),
        1 => (0..=255u8, 0..=255u8).prop_map(|(a, b)| format!("10.{a}.{b}.1")),
        1 => Just("[::1]".to_string()),
        1 => Just("[2001:db8::7]".to_string()),
        1 => (0..=255u8).prop_map(|a| format!("[::ffff:10.{a}.0.1]")),
    ]
}

fn entry(text: &str) -> Entry {
    Entry {
        pattern: text
            .parse()
            .unwrap_or_else(|e| panic!("generated entry {text:?}: {e}")),
        source: EntrySource::SquidWhitelist,
    }
}

fn allowlist(texts: &[String]) -> Allowlist {
    Allowlist::new(texts.iter().map(|t| entry(t)).collect()).expect("generated allowlist")
}

fn allows(list: &Allowlist, host: &str) -> bool {
    list.find(&Host::parse(host).expect("generated host parses"))
        .is_some()
}

/// `host` with letters upper-cased where `upper` says so.
fn case_mix(host: &str, upper: &[bool]) -> String {
    host.chars()
        .zip(upper.iter().cycle())
        .map(|(c, &u)| if u { c.to_ascii_uppercase() } else { c })
        .collect()
}

fn policy(whitelist: &str) -> Policy {
    let settings = Settings::load(&Sources::from_env([
        ("SQUID_WHITELIST", whitelist),
        ("CUTTLE_HTTP_PORTS", "80,443,8000-9000"),
    ]))
    .expect("settings");
    Policy::new(&settings).expect("policy")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    // === Allowlist invariants ===

    /// An exact entry `d` allows `h` iff `h == d`, never a subdomain, whatever the case or a
    /// trailing dot.
    #[test]
    fn exact_entry_allows_only_that_name(
        (d, h) in name(3).prop_flat_map(|d| (Just(d.clone()), host_near(d))),
        upper in prop::collection::vec(any::<bool>(), 1..8),
        dot in any::<bool>(),
    ) {
        let (d, h) = (d.join("."), h.join("."));
        let list = allowlist(std::slice::from_ref(&d));
        let mut variant = case_mix(&h, &upper);
        if dot {
            variant.push('.');
        }
        prop_assert_eq!(allows(&list, &variant), h == d, "entry {} host {}", d, variant);
    }

    /// `*.d` allows exactly one more label in front of `d`; `**.d` one or more; neither `d`.
    #[test]
    fn glob_entries_count_labels(
        (d, h) in name(2).prop_flat_map(|d| (Just(d.clone()), host_near(d))),
    ) {
        let (dn, hn) = (d.join("."), h.join("."));
        let under = hn.ends_with(&format!(".{dn}"));
        let extra = h.len().saturating_sub(d.len());
        let one = allowlist(&[format!("*.{dn}")]);
        prop_assert_eq!(allows(&one, &hn), under && extra == 1, "*.{} vs {}", dn, hn);
        let many = allowlist(&[format!("**.{dn}")]);
        prop_assert_eq!(allows(&many, &hn), under, "**.{} vs {}", dn, hn);
    }

    /// Case and a trailing dot never change a decision, whatever the entries.
    #[test]
    fn case_and_trailing_dot_never_change_a_decision(
        entries in prop::collection::vec(entry_text(), 0..8),
        host in name(5).prop_map(|n| n.join(".")),
        upper in prop::collection::vec(any::<bool>(), 1..8),
    ) {
        let list = allowlist(&entries);
        let plain = allows(&list, &host);
        for variant in [case_mix(&host, &upper), format!("{host}."), format!("{}.", host.to_uppercase())] {
            prop_assert_eq!(allows(&list, &variant), plain, "{:?}: {} vs {}", entries, host, variant);
        }
        // Entries are case-insensitive too.
        let upper_entries: Vec<String> = entries.iter().map(|e| e.to_uppercase()).collect();
        prop_assert_eq!(allows(&allowlist(&upper_entries), &host), plain, "{:?}", upper_entries);
    }

    /// Dropping covered entries never changes what is allowed: the decision is the same in any
    /// order, and adding an entry never takes anything away.
    #[test]
    fn order_does_not_matter_and_entries_only_add(
        entries in prop::collection::vec(entry_text(), 1..8),
        extra in entry_text(),
        hosts in prop::collection::vec(host_text(), 1..16),
        rotate in 0..8usize,
    ) {
        let list = allowlist(&entries);
        let mut reordered = entries.clone();
        reordered.reverse();
        let k = rotate % reordered.len();
        reordered.rotate_left(k);
        let reordered_list = allowlist(&reordered);
        let mut more = entries.clone();
        more.push(extra.clone());
        let more_list = allowlist(&more);
        for host in &hosts {
            let before = allows(&list, host);
            prop_assert_eq!(allows(&reordered_list, host), before, "{:?} vs {:?}: {}", entries, reordered, host);
            prop_assert!(!before || allows(&more_list, host), "{:?} + {}: {} lost", entries, extra, host);
        }
    }

    /// A host is allowed iff some single entry allows it (the compiled list is exactly the union
    /// of its entries).
    #[test]
    fn list_is_the_union_of_its_entries(
        entries in prop::collection::vec(entry_text(), 1..8),
        hosts in prop::collection::vec(host_text(), 1..16),
    ) {
        let list = allowlist(&entries);
        let singles: Vec<Allowlist> = entries.iter().map(|e| allowlist(std::slice::from_ref(e))).collect();
        for host in &hosts {
            let any = singles.iter().any(|l| allows(l, host));
            prop_assert_eq!(allows(&list, host), any, "{:?}: {}", entries, host);
        }
    }

    /// Names never allow IP literals and IP/CIDR entries never allow names; a CIDR allows an
    /// address (IPv4-mapped ones included) iff it contains it.
    #[test]
    fn names_and_addresses_never_mix(
        a in 0..=255u8,
        b in 0..=255u8,
        len in 0..=32u8,
        x in 0..=255u8,
        y in 0..=255u8,
        n in name(3),
    ) {
        let cidr = format!("10.{a}.{b}.0/{len}");
        let net: ipnet::Ipv4Net = cidr.parse().unwrap();
        let ip: std::net::Ipv4Addr = format!("10.{x}.{y}.1").parse().unwrap();
        let inside = net.trunc().contains(&ip);
        let nets = allowlist(std::slice::from_ref(&cidr));
        prop_assert_eq!(allows(&nets, &ip.to_string()), inside, "{} vs {}", cidr, ip);
        prop_assert_eq!(allows(&nets, &format!("[::ffff:{ip}]")), inside, "{} vs mapped {}", cidr, ip);
        prop_assert!(!allows(&nets, &n.join(".")));
        let n = n.join(".");
        let names = allowlist(&[n.clone(), format!(".{n}"), format!("*.{n}")]);
        prop_assert!(!allows(&names, &ip.to_string()));
    }

    // === Host normalisation ===

    /// `Host::parse` never panics, and what it returns is a fixed point: printing and parsing it
    /// again gives the same host.
    #[test]
    fn host_parse_never_panics_and_is_idempotent(s in any::<String>()) {
        if let Ok(host) = Host::parse(&s) {
            prop_assert_eq!(Host::parse(&host.to_string()), Ok(host.clone()), "{:?}", s);
        }
    }

    /// The same over host-like text: dots, digits, brackets, colons, percent signs, `xn--`,
    /// Unicode letters and look-alikes.
    #[test]
    fn host_parse_on_host_like_text(
        s in r"(xn--)?[a-zA-Z0-9.\-_\[\]:%@ üßİıѕ\u{200d}\u{ff0e}]{0,40}",
    ) {
        if let Ok(host) = Host::parse(&s) {
            let again = Host::parse(&host.to_string());
            prop_assert_eq!(again, Ok(host.clone()), "{:?}", s);
            if let Host::Name(n) = &host {
                prop_assert!(n.is_ascii() && n.len() <= 253 && !n.ends_with('.'), "{:?} -> {:?}", s, n);
                prop_assert_eq!(n.to_ascii_lowercase(), n.clone());
            }
        }
    }

    /// `Pattern::from_str` never panics, and an accepted entry prints as an entry that parses
    /// back to itself.
    #[test]
    fn entry_parse_never_panics_and_round_trips(
        s in prop_oneof![any::<String>(), r"[.*]?[a-zA-Z0-9.*\-_/:\[\]% ü]{0,30}"],
    ) {
        if let Ok(pattern) = s.parse::<Pattern>() {
            let printed = pattern.to_string();
            prop_assert_eq!(printed.parse::<Pattern>(), Ok(pattern.clone()), "{:?} -> {:?}", s, printed);
        }
    }

    // === The decision ===

    /// `Target::parse_authority` and `Policy::decide` never panic on arbitrary authorities and
    /// clients, and a decision never depends on case or a trailing dot.
    #[test]
    fn decide_never_panics(
        authority in prop_oneof![
            any::<String>(),
            r"[a-zA-Z0-9.\-\[\]:@%]{0,40}",
            (host_text(), 0..=65535u32).prop_map(|(h, p)| format!("{h}:{p}")),
        ],
        client in any::<[u8; 4]>(),
        v6 in any::<[u8; 16]>(),
        use_v6 in any::<bool>(),
        connect in any::<bool>(),
    ) {
        let policy = policy(".abc.ab,a0.b,*.c.ab,**.cc,10.0.0.0/8,::1,NO-SUCH-LABEL.example");
        let ip = if use_v6 { IpAddr::from(v6) } else { IpAddr::from(client) };
        let client = ClientAddr::new(SocketAddr::new(ip, 40000));
        for default in [None, Some(80)] {
            let Ok(target) = Target::parse_authority(&authority, default) else { continue };
            let request = if connect { Request::Connect(&target) } else { Request::Http(&target) };
            let decision = policy.decide(client, request);
            if let Host::Name(name) = &target.host {
                let shouted = Target { host: Host::parse(&format!("{}.", name.to_uppercase())).unwrap(), port: target.port };
                let request = if connect { Request::Connect(&shouted) } else { Request::Http(&shouted) };
                prop_assert_eq!(
                    matches!(policy.decide(client, request), Decision::Allow(_)),
                    matches!(decision, Decision::Allow(_)),
                    "{:?}", authority
                );
            }
        }
        let _ = policy.decide(client, Request::Local);
    }
}
