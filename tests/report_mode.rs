//! Report mode (`CUTTLE_MODE=report`): refusals by the allowlist are let through, logged
//! `would_deny` and counted; client networks, ports and the destination address guard stay
//! enforced; `cuttle report` turns the access log into the list of hosts to allow.

mod support;

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};

use support::*;

fn requests(metrics: &HashMap<String, f64>, kind: &str, decision: &str, reason: &str) -> f64 {
    let series = format!(
        "cuttle_requests_total{{decision=\"{decision}\",kind=\"{kind}\",reason=\"{reason}\"}}"
    );
    *metrics
        .get(&series)
        .unwrap_or_else(|| panic!("no series {series}"))
}

/// Runs `cuttle report ARGS` with `stdin` and returns its exit code and stdout.
fn cuttle_report(args: &[&str], stdin: &str) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cuttle"))
        .env_clear()
        .arg("report")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cuttle report");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let output = child.wait_with_output().expect("cuttle report output");
    assert!(
        output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// The traffic of both tests: from 127.0.0.1 (the only allowed client), hosts the allowlist
/// refuses (`www.example.com`, `evil.com` twice) over plain HTTP and CONNECT, one it allows,
/// one that resolves to the metadata service, one on a refused port; and one request from a
/// client outside ALLOWED_CIDRS. Returns the number of access log lines it causes.
async fn traffic(proxy: SocketAddr) -> usize {
    let origin = start_origin().await;
    let echo = start_echo().await;
    let port = origin.port();
    let client = client(&format!("http://{proxy}"), None);

    // Refused by the allowlist, let through: plain HTTP reaches the origin...
    for host in ["www.example.com", "evil.com"] {
        let response = client
            .get(format!("http://{host}:{port}/hello"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{host}");
        assert_eq!(
            response.text().await.unwrap(),
            "hello from origin",
            "{host}"
        );
    }
    // ... and CONNECT opens a working tunnel.
    let stream = tunnel(proxy, &format!("evil.com:{}", echo.port())).await;
    let data = random_bytes(3000, 11);
    assert_eq!(echo_through(stream, data.clone()).await, data);

    // Allowed as usual.
    let allowed = client
        .get(format!("http://sts.amazonaws.com:{port}/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);

    // The metadata service stays closed, by name over plain HTTP and through CONNECT.
    let imds = client
        .get(format!("http://imds.example.com:{port}/latest/meta-data/"))
        .send()
        .await
        .unwrap();
    assert_eq!(imds.status(), 403);
    assert_eq!(imds.headers()["x-squid-error"], "ERR_ACCESS_DENIED 0");
    assert!(
        imds.text().await.unwrap().contains("169.254.169.254"),
        "names the refused address"
    );
    let (_, head) = connect_raw(proxy, "imds.example.com:443").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    // Ports stay enforced.
    let (_, head) = connect_raw(proxy, "evil.com:22").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    // A client outside ALLOWED_CIDRS stays refused, even for a host that would be reported.
    let outside = client_builder(&format!("http://{proxy}"), None)
        .local_address(IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let response = outside
        .get(format!("http://evil.com:{port}/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    8
}

/// In report mode a refused host passes over plain HTTP and CONNECT, is logged
/// `TCP_MISS_WOULD_DENY` / `TCP_TUNNEL_WOULD_DENY` in the Squid format (still read by a Squid
/// line parser) and counted `would_deny`; the metadata name, a refused port and an outside
/// client stay refused; `cuttle report` on the captured log lists exactly the would-deny hosts,
/// sorted, once each.
#[tokio::test]
async fn report_mode_lets_allowlist_refusals_through_squid_log() {
    let mut cuttle = CuttleProcess::start_with(
        &[("CUTTLE_MODE", "report"), ("ALLOWED_CIDRS", "127.0.0.1/32")],
        Stdout::Capture,
    )
    .await;
    let expected_lines = traffic(cuttle.addr).await;

    let metrics = scrape(cuttle.addr).await;
    for (kind, decision, reason, want) in [
        ("http", "would_deny", "allowlist", 2.0),
        ("connect", "would_deny", "allowlist", 1.0),
        ("http", "allowed", "allowlist", 1.0),
        ("http", "denied", "allowlist", 0.0),
        ("connect", "denied", "allowlist", 0.0),
        ("http", "denied", "upstream_address", 1.0),
        ("connect", "denied", "upstream_address", 1.0),
        ("connect", "denied", "port", 1.0),
        ("http", "denied", "client_cidr", 1.0),
    ] {
        assert_eq!(
            requests(&metrics, kind, decision, reason),
            want,
            "{kind} {decision} {reason}"
        );
    }

    // The /metrics scrape is logged too.
    let lines = cuttle.access_lines(expected_lines + 1);
    let re = regex::Regex::new(SQUID_LINE).unwrap();
    let code_of = |method: &str, url_start: &str| -> String {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!(" {method} {url_start}")))
            .unwrap_or_else(|| panic!("no line for {method} {url_start} in {lines:#?}"));
        let fields = re
            .captures(line)
            .unwrap_or_else(|| panic!("not Squid format: {line:?}"));
        format!("{}/{}", &fields[5], &fields[6])
    };
    assert_eq!(
        code_of("GET", "http://www.example.com:"),
        "TCP_MISS_WOULD_DENY/200"
    );
    assert_eq!(code_of("CONNECT", "evil.com:"), "TCP_TUNNEL_WOULD_DENY/200");
    assert_eq!(code_of("GET", "http://sts.amazonaws.com:"), "TCP_MISS/200");
    assert_eq!(code_of("GET", "http://imds.example.com:"), "TCP_DENIED/403");
    assert_eq!(code_of("CONNECT", "evil.com:22"), "TCP_DENIED/403");
    let outside = lines
        .iter()
        .find(|l| l.contains(" 127.0.0.2 "))
        .unwrap_or_else(|| panic!("no line for the outside client in {lines:#?}"));
    assert!(outside.contains(" TCP_DENIED/403 "), "{outside}");

    // `cuttle report FILE`, on the log as captured.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let (code, out) = cuttle_report(&[log.to_str().unwrap()], "");
    assert_eq!(code, Some(0));
    assert_eq!(out, "evil.com\nwww.example.com\n", "{lines:#?}");
    let (code, out) = cuttle_report(&["--counts", log.to_str().unwrap()], "");
    assert_eq!(code, Some(0));
    assert_eq!(out, "2 evil.com\n1 www.example.com\n", "{lines:#?}");
}

/// The same traffic with the JSON access log: would-deny lines say `"decision": "would_deny"`
/// with reason `allowlist` and no rule; the metadata name is `denied` / `upstream_address`;
/// `cuttle report` reads the JSON log from standard input.
#[tokio::test]
async fn report_mode_json_log_and_report_from_stdin() {
    let mut cuttle = CuttleProcess::start_with(
        &[
            ("CUTTLE_MODE", "report"),
            ("ALLOWED_CIDRS", "127.0.0.1/32"),
            ("CUTTLE_ACCESS_LOG", "json"),
        ],
        Stdout::Capture,
    )
    .await;
    let expected_lines = traffic(cuttle.addr).await;
    let lines = cuttle.access_lines(expected_lines);
    let objects: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let would_deny: Vec<&serde_json::Value> = objects
        .iter()
        .filter(|o| o["decision"] == "would_deny")
        .collect();
    assert_eq!(would_deny.len(), 3, "{lines:#?}");
    for object in &would_deny {
        assert_eq!(object["reason"], "allowlist", "{object}");
        assert_eq!(object["status"], 200, "{object}");
        assert!(object["rule"].is_null(), "{object}");
        assert_eq!(
            object["upstream"]
                .as_str()
                .map(|u| u.starts_with("127.0.0.1:")),
            Some(true),
            "{object}"
        );
    }
    let tunnel = would_deny
        .iter()
        .find(|o| o["method"] == "CONNECT")
        .expect("would-deny tunnel");
    assert_eq!(tunnel["host"], "evil.com");
    assert_eq!(tunnel["squid_code"], "TCP_TUNNEL_WOULD_DENY");
    assert_eq!(tunnel["bytes_up"], 3000);
    let imds = objects
        .iter()
        .find(|o| o["host"] == "imds.example.com" && o["method"] == "GET")
        .expect("metadata line");
    assert_eq!(
        (&imds["decision"], &imds["reason"], &imds["status"]),
        (
            &serde_json::json!("denied"),
            &serde_json::json!("upstream_address"),
            &serde_json::json!(403)
        )
    );

    let (code, out) = cuttle_report(&["-"], &(lines.join("\n") + "\n"));
    assert_eq!(code, Some(0));
    assert_eq!(out, "evil.com\nwww.example.com\n", "{lines:#?}");
    let (code, out) = cuttle_report(&[], &(lines.join("\n") + "\n"));
    assert_eq!(code, Some(0));
    assert_eq!(out, "evil.com\nwww.example.com\n");
}

/// Unit tests of the report parser through the library: both formats mixed in one input,
/// other lines ignored, hosts normalised, sorted and de-duplicated.
#[test]
fn report_parser_reads_both_formats() {
    let log = r#"1733300000.123     42 10.1.2.3 TCP_TUNNEL_WOULD_DENY/200 4711 CONNECT pypi.org:443 - HIER_DIRECT/151.101.0.223 -
1733300000.200      3 10.1.2.3 TCP_MISS_WOULD_DENY/301 0 GET http://GitHub.com./x - HIER_DIRECT/140.82.112.3 text/html
1733300000.300      1 10.1.2.3 TCP_DENIED/403 80 CONNECT denied.example:443 - HIER_NONE/- text/plain
1733300000.400     10 10.1.2.3 TCP_TUNNEL/200 10 CONNECT sts.amazonaws.com:443 - HIER_DIRECT/52.94.1.1 -
{"decision":"would_deny","reason":"allowlist","kind":"connect","method":"CONNECT","url":"files.pythonhosted.org:443","host":"files.pythonhosted.org","port":443}
{"decision":"allowed","reason":"allowlist","kind":"connect","method":"CONNECT","url":"sts.amazonaws.com:443","host":"sts.amazonaws.com","port":443}
{"decision":"would_deny","reason":"allowlist","kind":"connect","method":"CONNECT","url":"pypi.org:443","host":"pypi.org","port":443}
{"decision":"would_deny","reason":"allowlist","kind":"connect","method":"CONNECT","url":"[2001:db8::7]:443","host":"[2001:db8::7]","port":443}
garbage line
{"truncated":
"#;
    let out = cuttle::commands::report(log.as_bytes(), false).unwrap();
    assert_eq!(
        out,
        "[2001:db8::7]\nfiles.pythonhosted.org\ngithub.com\npypi.org\n"
    );
    let counted = cuttle::commands::report(log.as_bytes(), true).unwrap();
    assert_eq!(
        counted,
        "1 [2001:db8::7]\n1 files.pythonhosted.org\n1 github.com\n2 pypi.org\n"
    );
    // Every host printed is a valid allowlist entry.
    for host in out.lines() {
        host.parse::<cuttle::allowlist::Pattern>()
            .unwrap_or_else(|e| panic!("{host}: {e}"));
    }
    for (line, want) in [
        (
            "1 1 10.0.0.1 TCP_MISS_WOULD_DENY/200 5 POST http://a.example:8080/upload - HIER_DIRECT/1.2.3.4 -",
            Some("a.example"),
        ),
        ("1 1 10.0.0.1 NONE/400 5 GET / - HIER_NONE/- -", None),
        (r#"{"decision":"would_deny"}"#, None),
    ] {
        assert_eq!(cuttle::commands::would_deny_host(line).as_deref(), want, "{line}");
    }
}
