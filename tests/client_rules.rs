//! Per-client rules (`[[client_rules]]` in the config file): extra allowlist entries for the
//! clients in given networks only, through the real proxy binary; `cuttle check --from` and
//! `cuttle config` show them; bad rules stop the start with exit 2 naming the key; a reload
//! picks up new rules.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// `www.example.com` (not on the default allowlist; the test hosts file maps it to 127.0.0.1)
/// for the client 127.0.0.2 alone.
const RULE: &str = r#"
[[client_rules]]
name = "second loopback"
cidrs = ["127.0.0.2/32"]
allow = ["www.example.com"]
"#;

/// The client 127.0.0.1 is the rest of the network.
const OTHER: [u8; 4] = [127, 0, 0, 1];
const RULED: [u8; 4] = [127, 0, 0, 2];

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("cuttle.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

/// A plain HTTP GET through `proxy` from the local address `from`; returns the status.
async fn get_from(proxy: SocketAddr, from: [u8; 4], url: &str) -> u16 {
    client_builder(&format!("http://{proxy}"), None)
        .local_address(IpAddr::from(from))
        .build()
        .expect("client")
        .get(url)
        .send()
        .await
        .expect("response")
        .status()
        .as_u16()
}

/// `CONNECT target` from the local address `from`; returns the stream and the response head.
async fn connect_from(proxy: SocketAddr, from: [u8; 4], target: &str) -> (TcpStream, String) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind client address");
    let mut stream = socket.connect(proxy).await.expect("connect to proxy");
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .expect("send CONNECT");
    let head = read_head(&mut stream).await;
    (stream, head)
}

/// Runs the binary with exactly `env` and `args`; returns the exit code, stdout and stderr.
fn run(env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_cuttle"))
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cuttle");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The same host is allowed from the rule's client (plain HTTP and CONNECT, logged with the
/// rule as the allowing entry) and refused from another client by the allowlist.
#[tokio::test]
async fn same_host_allowed_from_one_client_refused_from_another() {
    let origin = start_origin().await;
    let echo = start_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), RULE);
    let mut cuttle = CuttleProcess::start_with(
        &[("CUTTLE_CONFIG", &config), ("CUTTLE_ACCESS_LOG", "json")],
        Stdout::Capture,
    )
    .await;
    let url = format!("http://www.example.com:{}/hello", origin.port());

    assert_eq!(get_from(cuttle.addr, RULED, &url).await, 200);
    assert_eq!(get_from(cuttle.addr, OTHER, &url).await, 403);

    let target = format!("www.example.com:{}", echo.port());
    let (stream, head) = connect_from(cuttle.addr, RULED, &target).await;
    assert!(
        head.starts_with("HTTP/1.1 200 Connection established\r\n"),
        "{head}"
    );
    let data = random_bytes(2000, 3);
    assert_eq!(echo_through(stream, data.clone()).await, data);
    let (_, head) = connect_from(cuttle.addr, OTHER, &target).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-squid-error: err_access_denied 0"),
        "{head}"
    );

    let lines = cuttle.access_lines(4);
    let objects: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    for (client, method, decision, rule) in [
        (
            "127.0.0.2",
            "GET",
            "allowed",
            serde_json::json!("www.example.com (client rule \"second loopback\")"),
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "allowed",
            serde_json::json!("www.example.com (client rule \"second loopback\")"),
        ),
        ("127.0.0.1", "GET", "denied", serde_json::Value::Null),
        ("127.0.0.1", "CONNECT", "denied", serde_json::Value::Null),
    ] {
        let line = objects
            .iter()
            .find(|o| o["client"] == client && o["method"] == method)
            .unwrap_or_else(|| panic!("no {method} line from {client} in {lines:#?}"));
        assert_eq!(line["decision"], decision, "{line}");
        assert_eq!(line["reason"], "allowlist", "{line}");
        assert_eq!(line["rule"], rule, "{line}");
    }
}

/// `cuttle check --from` applies the rule for its clients only and names it; `cuttle config`
/// lists the rule with its networks after the global allowlist.
#[test]
fn check_from_and_config_show_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), RULE);
    let env = [("CUTTLE_CONFIG", config.as_str())];

    let (code, out, err) = run(&env, &["check", "www.example.com", "--from", "127.0.0.2"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("allowed by www.example.com (client rule \"second loopback\")"),
        "{out}"
    );
    let (code, out, err) = run(&env, &["check", "www.example.com", "--from", "127.0.0.1"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("refused (allowlist)"), "{out}");
    let (code, out, _) = run(&env, &["check", "www.example.com"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("client rules"), "{out}");

    let (code, out, err) = run(&env, &["config"]);
    assert_eq!(code, Some(0), "{err}");
    let allowlist = out.find("# Allowlist:").expect(&out);
    let rules = out.find("# Client rules: 1").expect(&out);
    assert!(allowlist < rules, "{out}");
    assert!(
        out[rules..].contains("## \"second loopback\": clients in 127.0.0.2/32"),
        "{out}"
    );
    assert!(
        out[rules..].contains("www.example.com")
            && out[rules..].contains("client rule \"second loopback\""),
        "{out}"
    );
}

/// Bad rules exit 2 before listening, naming the file, `client_rules[N].key` and the value.
#[test]
fn bad_rules_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        (
            "[[client_rules]]\ncidrs = [\"10.20.0.0/33\"]\nallow = [\".github.com\"]\n",
            &["client_rules[0].cidrs", "\"10.20.0.0/33\"", "expected"],
        ),
        (
            "[[client_rules]]\ncidrs = [\"10.20.0.0/16\"]\nallow = [\".github.com\"]\n\n[[client_rules]]\ncidrs = [\"10.30.0.0/16\"]\nallow = [\"github.com:443\"]\n",
            &["client_rules[1].allow", "\"github.com:443\"", "port", "expected"],
        ),
        (
            "[[client_rules]]\ncidrs = [\"10.20.0.0/16\"]\n",
            &["client_rules[0].allow", "lists no entry"],
        ),
        (
            "[[client_rules]]\ncidr = [\"10.20.0.0/16\"]\nallow = [\"a.com\"]\n",
            &["client_rules[0]", "unknown key \"cidr\""],
        ),
    ];
    for (text, needles) in cases {
        let config = write_config(dir.path(), text);
        for args in [&[][..], &["config"][..]] {
            let (code, out, err) = run(&[("CUTTLE_CONFIG", &config)], args);
            assert_eq!(code, Some(2), "{text}: {out}{err}");
            let message = err.trim();
            assert_eq!(message.lines().count(), 1, "{message}");
            assert!(message.contains(&config), "{text}: {message}");
            for needle in *needles {
                assert!(
                    message.contains(needle),
                    "{text}: {message} lacks {needle:?}"
                );
            }
            assert!(!message.contains("listening"), "{message}");
        }
    }
}

/// Rules added to the config file apply after a reload (SIGHUP), without a restart.
#[tokio::test]
async fn rules_apply_after_reload() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "log = \"info\"\n");
    let mut cuttle = CuttleProcess::start(&[("CUTTLE_CONFIG", &config)]).await;
    let url = format!("http://www.example.com:{}/hello", origin.port());
    assert_eq!(get_from(cuttle.addr, RULED, &url).await, 403);

    write_config(dir.path(), &format!("log = \"info\"\n{RULE}"));
    cuttle.signal("HUP");
    cuttle.wait_for_line("policy reloaded");
    // A file change may trigger a second reload; either way the rule is in force.
    assert_eq!(get_from(cuttle.addr, RULED, &url).await, 200);
    assert_eq!(get_from(cuttle.addr, OTHER, &url).await, 403);
}
