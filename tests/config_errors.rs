//! Bad configuration: the binary exits 2 before listening, with one message naming the
//! variable, the value and what was expected.

mod support;

use support::run_to_exit;

/// Each of the bad values, and a few more, exits 2 with its message.
#[test]
fn bad_values_exit_2_naming_variable_and_value() {
    let cases: &[(&str, &str, &str)] = &[
        ("AWS_REGIONS", "us-west2", "expected e.g. us-west-2"),
        ("ALLOWED_CIDRS", "10.0.0.0/33", "is not a CIDR"),
        ("SQUID_WHITELIST", "https://x.com/", "scheme"),
        ("CUTTLE_LISTEN", "nonsense", "expected IP:PORT"),
        ("SHUTDOWN_LIFETIME", "-1", "is not a duration"),
        ("CUTTLE_IDLE_TIMEOUT", "0", "zero"),
        ("CUTTLE_ACCESS_LOG", "xml", "squid, json, off"),
        ("NO_WHITELIST", "perhaps", "true or false"),
        ("CUTTLE_WORKERS", "0", "thread count from 1 to 1024"),
        ("CUTTLE_WORKERS", "many", "\"auto\""),
    ];
    for (var, value, expected) in cases {
        let (code, stderr) = run_to_exit(&[(var, value)], &[]);
        assert_eq!(code, Some(2), "{var}={value}: {stderr}");
        let message = stderr.trim();
        assert_eq!(
            message.lines().count(),
            1,
            "{var}={value}: one line, got {message:?}"
        );
        assert!(message.contains(var), "{var}={value}: {message}");
        assert!(
            message.contains(&format!("{value:?}")),
            "{var}={value}: {message}"
        );
        assert!(message.contains(expected), "{var}={value}: {message}");
        assert!(!message.contains("listening"), "{var}={value}: {message}");
    }
}

/// A listen address already in use exits 2 naming the variable.
#[test]
fn address_in_use_exits_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_to_exit(
        &[
            ("CUTTLE_LISTEN", &addr),
            ("CUTTLE_DNS_SERVERS", "127.0.0.1:9"),
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("CUTTLE_LISTEN") && stderr.contains(&addr),
        "{stderr}"
    );
}

/// A flag beats the environment, and a bad flag value names the flag.
#[test]
fn flags_are_named_in_errors() {
    let (code, stderr) = run_to_exit(&[("CUTTLE_LISTEN", "127.0.0.1:0")], &["--listen", "bogus"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--listen") && stderr.contains("\"bogus\""),
        "{stderr}"
    );
}
