//! The shipped configuration files: `config/cuttle.toml` documents every setting at its default,
//! and `config/allowlist.example` is a valid allowlist file.

use std::path::PathBuf;

use cuttle::allowlist::Allowlist;
use cuttle::settings::{read_allowlist_file, Key, Origin, Settings, Sources};

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The documented config file loads, and every value in it is the built-in default: loading it
/// changes nothing.
#[test]
fn documented_config_file_holds_the_defaults() {
    let path = repo_file("config/cuttle.toml");
    let file = Settings::load(&Sources {
        config_file: Some(path.clone()),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
    let defaults = Settings::load(&Sources::default()).expect("defaults load");
    for key in Key::ALL {
        assert_eq!(
            file.value_text(key),
            defaults.value_text(key),
            "{}",
            key.file_key()
        );
    }

    // value_text covers every key; the entries themselves (with sources) are compared too.
    assert_eq!(file.allowlist, defaults.allowlist, "allowlist entries");
    assert!(file.warnings.is_empty(), "warnings: {:?}", file.warnings);

    // The file was really read: the keys set in it are credited to it.
    for key in [Key::Listen, Key::AllowedCidrs, Key::ShutdownLifetime] {
        assert_eq!(
            file.origins[&key],
            Origin::File {
                path: path.clone(),
                key: key.file_key()
            },
            "origin of {key:?}"
        );
    }
}

/// Every setting of `Key::ALL` is documented in `config/cuttle.toml`, set or commented out.
#[test]
fn documented_config_file_mentions_every_key() {
    let path = repo_file("config/cuttle.toml");
    let text = std::fs::read_to_string(&path).expect("config/cuttle.toml is readable");
    let keys: Vec<&str> = text
        .lines()
        .map(|line| line.trim_start().trim_start_matches('#').trim_start())
        .filter_map(|line| line.split_once('=').map(|(key, _)| key.trim()))
        .collect();
    let missing: Vec<&str> = Key::ALL
        .iter()
        .map(|key| key.file_key())
        .filter(|key| !keys.contains(key))
        .collect();
    assert!(
        missing.is_empty(),
        "{} lacks `key = value` lines for {missing:?}",
        path.display()
    );
}

/// `config/allowlist.example` parses as an allowlist file and every entry in it compiles.
#[test]
fn example_allowlist_parses_and_compiles() {
    let path = repo_file("config/allowlist.example");
    let entries = read_allowlist_file(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(!entries.is_empty(), "{} has no entries", path.display());
    for entry in &entries {
        Allowlist::new(vec![entry.clone()]).unwrap_or_else(|e| panic!("{entry}: {e}"));
    }
    let all = Allowlist::new(entries.clone()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        all.len(),
        entries.len(),
        "no entry of the example is covered by another"
    );
}
