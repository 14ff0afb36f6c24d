//! Operator commands (`check`, `config`, `healthcheck`) and live reload (SIGHUP, allowlist file
//! changes, Kubernetes ConfigMap symlink swaps) against the binary.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

/// `cuttle check` prints the decision and the rule with its source; exit 0 allowed, 1 refused.
#[test]
fn check_command() {
    let env = [
        ("SQUID_WHITELIST", ".example.com"),
        ("AWS_REGIONS", "us-west-2"),
    ];
    let (code, out) = run_stdout(&env, &["check", "s3.us-west-2.amazonaws.com"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("allowed by .us-west-2.amazonaws.com (AWS_REGIONS=us-west-2)"),
        "{out}"
    );
    let (code, out) = run_stdout(
        &env,
        &[
            "check",
            "www.example.com:80",
            "--method",
            "GET",
            "--from",
            "10.0.0.7",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("allowed by .example.com (SQUID_WHITELIST)"),
        "{out}"
    );
    let (code, out) = run_stdout(&env, &["check", "evil.com"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("refused (allowlist)"), "{out}");
    let (code, out) = run_stdout(&env, &["check", "sts.amazonaws.com", "--from", "8.8.8.8"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("client_cidr"), "{out}");
}

/// `cuttle config` shows each setting's origin and each entry's source, file lines included.
#[test]
fn config_command() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("allow");
    std::fs::write(&file, "# builds\n.github.com\n").unwrap();
    let file = file.display().to_string();
    let env = [
        ("SQUID_WHITELIST", "pypi.org"),
        ("CUTTLE_ALLOWLIST_FILE", file.as_str()),
    ];
    let (code, out) = run_stdout(&env, &["config"]);
    assert_eq!(code, Some(0), "{out}");
    for needle in [
        ".github.com",
        &format!("{file}:2"),
        "pypi.org",
        "SQUID_WHITELIST",
        "AWS_REGIONS=us-west-2",
        "AWS global default",
        "CUTTLE_LISTEN",
        "0.0.0.0:3128",
    ] {
        assert!(out.contains(needle), "missing {needle:?}:\n{out}");
    }
}

/// `cuttle healthcheck` exits 0 against a healthy proxy and 1 when nothing answers.
#[tokio::test]
async fn healthcheck_command() {
    let cuttle = CuttleProcess::start(&[]).await;
    let url = format!("http://{}/healthz", cuttle.addr);
    let listen = cuttle.addr.to_string();
    let (ok, by_listen, dead) = tokio::task::spawn_blocking(move || {
        (
            run_to_exit(&[], &["healthcheck", "--url", &url]),
            run_to_exit(&[("CUTTLE_LISTEN", &listen)], &["healthcheck"]),
            run_to_exit(&[("CUTTLE_LISTEN", "127.0.0.1:9")], &["healthcheck"]),
        )
    })
    .await
    .unwrap();
    assert_eq!(ok.0, Some(0), "{}", ok.1);
    assert_eq!(by_listen.0, Some(0), "{}", by_listen.1);
    assert_eq!(dead.0, Some(1), "{}", dead.1);
    assert!(dead.1.contains("127.0.0.1:9"), "{}", dead.1);
}

/// Editing the allowlist file changes decisions for new requests within 2 s, without a restart,
/// while data keeps flowing intact through a tunnel opened before (to a host the new file no
/// longer allows); an invalid file keeps the old policy, logs the exact error and counts a
/// failure; SIGHUP reloads too.
#[tokio::test]
async fn allowlist_file_reload() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = start_echo().await;
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("allowlist");
    std::fs::write(&file, "www.example.com\n").unwrap();
    let file_text = file.display().to_string();
    let mut cuttle = CuttleProcess::start(&[
        ("CUTTLE_ALLOWLIST_FILE", &file_text),
        ("AWS_REGIONS", "eu-west-1"),
    ])
    .await;
    let proxy = format!("http://{}", cuttle.addr);
    let client = client(&proxy, None);
    let status = |host: &'static str| {
        let client = client.clone();
        let port = origin.port();
        async move {
            client
                .get(format!("http://{host}:{port}/hello"))
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }
    };
    assert_eq!(status("www.example.com").await, 200);
    assert_eq!(status("evil.com").await, 403);

    // A tunnel with data flowing through the reload: 200 chunks of 32 KiB, echoed back.
    let tunnel_stream = tunnel(cuttle.addr, &format!("www.example.com:{}", echo.port())).await;
    let data = random_bytes(200 * 32 * 1024, 99);
    let sent = data.clone();
    let (mut reader, mut writer) = tunnel_stream.into_split();
    let flowing = tokio::spawn(async move {
        for chunk in sent.chunks(32 * 1024) {
            writer.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        writer.shutdown().await.unwrap();
    });
    let echoed = tokio::spawn(async move {
        let mut back = Vec::new();
        reader.read_to_end(&mut back).await.unwrap();
        back
    });

    // An edit: evil.com in, www.example.com out; allowed within 2 s.
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&file, "evil.com\n").unwrap();
    let edited = Instant::now();
    wait_until(|| async { status("evil.com").await == 200 }).await;
    assert!(
        edited.elapsed() < Duration::from_secs(2),
        "reload took {:?}",
        edited.elapsed()
    );
    assert_eq!(status("www.example.com").await, 403);
    cuttle.wait_for_line("policy reloaded");
    // The tunnel opened under the old policy is untouched: every byte comes back.
    flowing.await.unwrap();
    let back = tokio::time::timeout(WAIT, echoed)
        .await
        .expect("echo done")
        .unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "tunnel data corrupted across the reload");

    // An invalid file: the old policy stays, the error is logged, a failure counted.
    std::fs::write(&file, "evil.com\nhttps://bad.example/\n").unwrap();
    let line = cuttle.wait_for_line("reload failed");
    assert!(
        line.contains(&format!("{file_text}:2")) && line.contains("https://bad.example/"),
        "{line}"
    );
    assert_eq!(status("evil.com").await, 200);
    let metrics = metrics_text(cuttle.addr).await;
    assert!(
        metrics.contains("cuttle_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cuttle_config_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );

    // SIGHUP after a fix reloads as well.
    std::fs::write(&file, "www.example.com\n").unwrap();
    cuttle.signal("HUP");
    wait_until(|| async { status("www.example.com").await == 200 }).await;
    assert_eq!(status("evil.com").await, 403);
    let entries = metrics_text(cuttle.addr).await;
    assert!(entries.contains("cuttle_allowlist_entries 12"), "{entries}");
}

/// A Kubernetes ConfigMap update (the `..data` symlink swapped to a new directory) is seen.
#[tokio::test]
async fn configmap_symlink_swap_reload() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_configmap(root, "v1", "www.example.com\n");
    std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/allowlist", root.join("allowlist")).unwrap();
    let file = root.join("allowlist").display().to_string();
    let cuttle = CuttleProcess::start(&[("CUTTLE_ALLOWLIST_FILE", &file)]).await;
    let client = client(&format!("http://{}", cuttle.addr), None);
    let url = format!("http://evil.com:{}/hello", origin.port());
    assert_eq!(client.get(&url).send().await.unwrap().status(), 403);

    // What the kubelet does: write a new directory, point a temporary link at it, rename the
    // link over ..data.
    write_configmap(root, "v2", "evil.com\n");
    std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    wait_until(|| async { client.get(&url).send().await.unwrap().status() == 200 }).await;
}

fn write_configmap(root: &Path, version: &str, content: &str) {
    let dir = root.join(format!("..{version}"));
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("allowlist"), content).unwrap();
}

async fn wait_until<F, Fut>(mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !condition().await {
        assert!(Instant::now() < deadline, "condition not met in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a subcommand and returns its exit code and stdout.
fn run_stdout(env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cuttle"))
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run cuttle");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}
