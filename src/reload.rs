//! Live reload: SIGHUP, and any change to the allowlist file or the config file, rebuild the
//! policy from the same sources the process started with and swap it in atomically.
//!
//! New requests see the new policy at once; requests in flight and open tunnels keep the one
//! they started with. An invalid new configuration keeps the old policy, logs the exact error
//! and counts a failed reload. Files are watched through their directory, so that a Kubernetes
//! ConfigMap update (a symlink swap of `..data`) is seen as well as an in-place edit.
//!
//! What a reload changes: the client networks, the allowlist (regions, `SQUID_WHITELIST`, the
//! file), `NO_WHITELIST` and the port lists. Other settings (listeners, timeouts, DNS, logs)
//! need a restart; a reload that finds them changed says so in a warning.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::ReloadResult;
use crate::policy::Policy;
use crate::server::Shared;
use crate::settings::{Key, Settings, Sources};

/// Settings a reload applies; the others need a restart.
const RELOADABLE: [Key; 7] = [
    Key::AllowedCidrs,
    Key::AwsRegions,
    Key::SquidWhitelist,
    Key::AllowlistFile,
    Key::NoWhitelist,
    Key::ConnectPorts,
    Key::HttpPorts,
];

/// Quiet time after a file event before reloading, so that one update (several events) is one
/// reload.
const SETTLE: Duration = Duration::from_millis(250);

/// Rebuilds the policy from `sources` and swaps it in. Returns the number of allowlist entries,
/// or the error that kept the old policy.
pub fn reload(shared: &Shared, sources: &Sources) -> Result<usize, String> {
    let metrics = &shared.observer.metrics;
    let result = Settings::load(sources)
        .map_err(|e| e.to_string())
        .and_then(|settings| {
            let policy = Policy::new(&settings).map_err(|e| format!("invalid allowlist: {e}"))?;
            Ok((settings, policy))
        });
    match result {
        Ok((settings, policy)) => {
            let restart: Vec<&str> = Key::ALL
                .into_iter()
                .filter(|k| !RELOADABLE.contains(k))
                .filter(|k| settings.value_text(*k) != shared.settings.value_text(*k))
                .map(Key::env_name)
                .collect();
            if !restart.is_empty() {
                tracing::warn!(settings = %restart.join(","), "changed settings need a restart to apply");
            }
            let entries = policy.allowlist().len();
            shared.policy.store(Arc::new(policy));
            metrics.allowlist_entries.set(entries as i64);
            metrics.reload(ReloadResult::Success);
            Ok(entries)
        }
        Err(message) => {
            metrics.reload(ReloadResult::Failure);
            Err(message)
        }
    }
}

/// Starts the reload task: SIGHUP and file changes until `stop` fires.
pub fn spawn(
    shared: Arc<Shared>,
    sources: Sources,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, mut changes) = mpsc::channel::<()>(16);
    let watched: Vec<PathBuf> = [
        shared.settings.allowlist_file.clone(),
        sources.config_file.clone().or_else(|| {
            sources
                .env
                .get("CUTTLE_CONFIG")
                .filter(|v| !v.trim().is_empty())
                .map(PathBuf::from)
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    let watcher = watch(&watched, tx);
    tokio::spawn(async move {
        let _watcher = watcher;
        loop {
            let trigger = tokio::select! {
                _ = stop.cancelled() => return,
                _ = hup.recv() => "SIGHUP",
                Some(()) = changes.recv() => {
                    // Let the update settle, then take every event it caused as one.
                    tokio::time::sleep(SETTLE).await;
                    while changes.try_recv().is_ok() {}
                    "file change"
                }
            };
            match reload(&shared, &sources) {
                Ok(entries) => {
                    tracing::info!(trigger, allowlist_entries = entries, "policy reloaded")
                }
                Err(error) => {
                    tracing::error!(trigger, %error, "reload failed, keeping the current policy")
                }
            }
        }
    });
    Ok(())
}

/// Watches the directories of `files`; every event in them is a possible change.
fn watch(files: &[PathBuf], tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    if files.is_empty() {
        return None;
    }
    let names: Vec<PathBuf> = files.to_vec();
    let mut watcher =
        match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                if !event.kind.is_access() {
                    let _ = tx.try_send(());
                }
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch files; reload with SIGHUP");
                return None;
            }
        };
    for file in &names {
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => tracing::debug!(path = %file.display(), "watching for changes"),
            Err(e) => {
                tracing::warn!(path = %file.display(), error = %e, "cannot watch; reload with SIGHUP")
            }
        }
    }
    Some(watcher)
}
