//! The `cuttle` binary: parse the command line, load settings (exit 2 with the message), run,
//! drain. Everything else lives in the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cuttle::allowlist::EntrySource;
use cuttle::server::Server;
use cuttle::settings::{Key, LogFormat, Settings, Sources};
use tokio_util::sync::CancellationToken;

/// An allowlisting egress proxy, configured like the Squid egress image.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML); also CUTTLE_CONFIG.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Proxy listen address (overrides CUTTLE_LISTEN).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Admin listen address for /metrics and /healthz (overrides CUTTLE_ADMIN_LISTEN).
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Allowlist file (overrides CUTTLE_ALLOWLIST_FILE).
    #[arg(long, value_name = "PATH")]
    allowlist_file: Option<String>,
    /// Diagnostic log filter (overrides CUTTLE_LOG).
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

impl Cli {
    fn sources(&self) -> Sources {
        let mut flags = Vec::new();
        let mut flag = |key, name, value: &Option<String>| {
            if let Some(v) = value {
                flags.push((key, name, v.clone()));
            }
        };
        flag(Key::Listen, "--listen", &self.listen);
        flag(Key::AdminListen, "--admin-listen", &self.admin_listen);
        flag(Key::AllowlistFile, "--allowlist-file", &self.allowlist_file);
        flag(Key::Log, "--log", &self.log);
        Sources {
            config_file: self.config.clone(),
            env: std::env::vars().collect(),
            flags,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(&cli.sources()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("cuttle: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&settings);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cuttle: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(settings))
}

async fn run(settings: Settings) -> ExitCode {
    for warning in &settings.warnings {
        tracing::warn!("{warning}");
    }
    let regions: Vec<String> = settings
        .aws_regions
        .iter()
        .map(ToString::to_string)
        .collect();
    let count =
        |f: fn(&EntrySource) -> bool| settings.allowlist.iter().filter(|e| f(&e.source)).count();
    let sources = format!(
        "regional defaults {}, global defaults {}, SQUID_WHITELIST {}, allowlist file {}",
        count(|s| matches!(s, EntrySource::AwsRegion(_))),
        count(|s| matches!(s, EntrySource::AwsGlobal)),
        count(|s| matches!(s, EntrySource::SquidWhitelist)),
        count(|s| matches!(s, EntrySource::AllowlistFile { .. })),
    );
    let server = match Server::bind(settings).await {
        Ok(server) => server,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("cuttle: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    let shared = server.shared();
    let policy = shared.policy.load();
    let admin = server
        .admin_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "-".into());
    tracing::info!(
        listen = %server.local_addr(),
        admin = %admin,
        allowlist_entries = policy.allowlist().len(),
        allowlist_sources = %sources,
        aws_regions = %regions.join(","),
        no_whitelist = shared.settings.no_whitelist,
        access_log = ?shared.settings.access_log,
        "cuttle listening"
    );
    let shutdown = CancellationToken::new();
    if let Err(e) = cuttle::signals::spawn_shutdown_listener(shutdown.clone()) {
        eprintln!("cuttle: cannot install signal handlers: {e}");
        return ExitCode::from(1);
    }
    server.run(shutdown).await;
    ExitCode::SUCCESS
}

fn init_tracing(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match settings.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
