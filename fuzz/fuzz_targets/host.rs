//! `Host::parse` and `Target::parse_authority` on arbitrary text: never panic, and a parsed host
//! is a fixed point of printing and parsing again (a DNS name: lowercase ASCII, at most 253
//! bytes, no trailing dot).

#![no_main]

use cuttle::host::Host;
use cuttle::policy::Target;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(host) = Host::parse(text) {
        let printed = host.to_string();
        assert_eq!(
            Host::parse(&printed).as_ref(),
            Ok(&host),
            "{text:?} printed as {printed:?}"
        );
        if let Host::Name(name) = &host {
            assert!(name.is_ascii() && name.len() <= 253 && !name.ends_with('.'));
            assert_eq!(&name.to_ascii_lowercase(), name);
        }
    }
    for default in [None, Some(80)] {
        if let Ok(target) = Target::parse_authority(text, default) {
            assert_ne!(target.port, 0);
            let printed = target.to_string();
            assert_eq!(
                Target::parse_authority(&printed, None).as_ref(),
                Ok(&target),
                "{text:?} printed as {printed:?}"
            );
        }
    }
});
