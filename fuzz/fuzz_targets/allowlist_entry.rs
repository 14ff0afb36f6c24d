//! `Pattern::from_str` on arbitrary text: never panics; an accepted entry prints as an entry that
//! parses back to itself and always compiles into an allowlist; looking hosts up in it never
//! panics.

#![no_main]

use cuttle::allowlist::{Allowlist, Entry, EntrySource, Pattern};
use cuttle::host::Host;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // One entry per line, like an allowlist file; the last line is also tried alone.
    let mut entries = Vec::new();
    for line in text.lines() {
        let Ok(pattern) = line.parse::<Pattern>() else {
            continue;
        };
        let printed = pattern.to_string();
        assert_eq!(
            printed.parse::<Pattern>().as_ref(),
            Ok(&pattern),
            "{line:?} printed as {printed:?}"
        );
        entries.push(Entry {
            pattern,
            source: EntrySource::SquidWhitelist,
        });
    }
    let list = Allowlist::new(entries).expect("parsed entries always compile");
    for host in text.split([',', '\n', ' ']) {
        if let Ok(host) = Host::parse(host) {
            let _ = list.find(&host);
        }
    }
});
