//! The whole decision over arbitrary request heads: parse the head with `httparse` (as hyper
//! does), turn the request target into a `Target` the way the proxy does (`CONNECT host:port`,
//! or the authority of an absolute `http://` URI), and decide. Never panics, and a decision
//! never depends on the case of the host or a trailing dot.

#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use cuttle::client_acl::ClientAddr;
use cuttle::host::Host;
use cuttle::policy::{Decision, Policy, Request, Target};
use cuttle::settings::{Settings, Sources};
use libfuzzer_sys::fuzz_target;

fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let settings = Settings::load(&Sources::from_env([
            (
                "SQUID_WHITELIST",
                ".example.com,api.test,*.s3.amazonaws.com,s3.**.example.net,10.0.0.0/8,::1,.bücher.example",
            ),
            ("AWS_REGIONS", "us-west-2,cn-north-1"),
        ]))
        .expect("fuzz settings");
        Policy::new(&settings).expect("fuzz policy")
    })
}

fn allowed(client: ClientAddr, connect: bool, target: &Target) -> bool {
    let request = if connect {
        Request::Connect(target)
    } else {
        Request::Http(target)
    };
    matches!(policy().decide(client, request), Decision::Allow(_))
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the client: inside or outside ALLOWED_CIDRS, v4 or v6.
    let Some((&pick, head)) = data.split_first() else {
        return;
    };
    let ip: IpAddr = match pick % 4 {
        0 => [10, 1, 2, 3].into(),
        1 => [203, 0, 113, 9].into(),
        2 => "::1".parse().unwrap(),
        _ => "::ffff:192.168.1.1".parse().unwrap(),
    };
    let client = ClientAddr::new(SocketAddr::new(ip, 50000));
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    if req.parse(head).is_err() {
        return;
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return;
    };
    let connect = method == "CONNECT";
    let target = if connect {
        Target::parse_authority(path, None)
    } else {
        let Ok(uri) = path.parse::<http::Uri>() else {
            return;
        };
        match (uri.scheme_str(), uri.authority()) {
            (Some(scheme), Some(authority)) if scheme.eq_ignore_ascii_case("http") => {
                Target::parse_authority(authority.as_str(), Some(80))
            }
            _ => {
                let _ = policy().decide(client, Request::Local);
                return;
            }
        }
    };
    let Ok(target) = target else {
        return;
    };
    let decision = allowed(client, connect, &target);
    if let Host::Name(name) = &target.host {
        let shouted = Target {
            host: Host::parse(&format!("{}.", name.to_uppercase())).expect("normalised name"),
            port: target.port,
        };
        assert_eq!(allowed(client, connect, &shouted), decision, "{name}");
    }
});
