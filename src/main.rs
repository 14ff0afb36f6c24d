//! The `cuttle` binary: parse the command line, load settings (exit 2 with the message), then
//! run the proxy and drain, or run one operator command. Everything else lives in the library.

use std::io::{IsTerminal, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cuttle::allowlist::EntrySource;
use cuttle::commands;
use cuttle::server::Server;
use cuttle::settings::{Key, LogFormat, Settings, Sources};
use tokio_util::sync::CancellationToken;

/// An allowlisting egress proxy, configured like the Squid egress image.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (TOML); also CUTTLE_CONFIG.
    #[arg(long, value_name = "PATH", global = true)]
    config: Option<PathBuf>,
    /// Proxy listen address (overrides CUTTLE_LISTEN).
    #[arg(long, value_name = "ADDR", global = true)]
    listen: Option<String>,
    /// Admin listen address for /metrics and /healthz (overrides CUTTLE_ADMIN_LISTEN).
    #[arg(long, value_name = "ADDR", global = true)]
    admin_listen: Option<String>,
    /// Allowlist file (overrides CUTTLE_ALLOWLIST_FILE).
    #[arg(long, value_name = "PATH", global = true)]
    allowlist_file: Option<String>,
    /// Diagnostic log filter (overrides CUTTLE_LOG).
    #[arg(long, value_name = "FILTER", global = true)]
    log: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Print the decision and the rule that made it for one destination; exit 0 allowed, 1
    /// refused. Example: cuttle check s3.us-west-2.amazonaws.com --from 10.0.3.7
    Check {
        /// HOST[:PORT]; the port defaults to 443 for CONNECT, 80 otherwise.
        target: String,
        /// CONNECT (HTTPS through HTTPS_PROXY) or a plain HTTP method such as GET.
        #[arg(long, default_value = "CONNECT")]
        method: String,
        /// Client address to check against ALLOWED_CIDRS (otherwise any admitted client).
        #[arg(long, value_name = "IP")]
        from: Option<IpAddr>,
    },
    /// Print the effective settings, where each came from, and the allowlist with the source
    /// of every entry.
    Config,
    /// Probe /healthz; exit 0 when it answers 200 (the image's HEALTHCHECK).
    Healthcheck {
        /// URL to probe (default: /healthz on the admin listener if set, else the proxy port).
        #[arg(long)]
        url: Option<String>,
    },
    /// Read an access log (Squid or JSON lines) and print the hosts that report mode let
    /// through but the allowlist would have refused: sorted, one a line, ready for the
    /// allowlist file. Example: cuttle report access.log >> allowlist
    Report {
        /// Access log file; standard input when absent or `-`.
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        /// Prefix each host with its number of requests.
        #[arg(long)]
        counts: bool,
    },
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
    // `report` reads a log, not the configuration.
    if let Some(Command::Report { file, counts }) = &cli.command {
        return report(file.as_deref(), *counts);
    }
    let sources = cli.sources();
    let settings = match Settings::load(&sources) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("cuttle: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Run = command {
        init_tracing(&settings);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cuttle: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match command {
        Command::Run => runtime.block_on(run(settings, sources)),
        Command::Check {
            target,
            method,
            from,
        } => match commands::check(&settings, &target, &method, from) {
            Ok(outcome) => {
                println!("{}", outcome.text);
                ExitCode::from(if outcome.allowed { 0 } else { 1 })
            }
            Err(e) => {
                eprintln!("cuttle check: {e}");
                ExitCode::from(2)
            }
        },
        Command::Config => match commands::config(&settings) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cuttle config: {e}");
                ExitCode::from(2)
            }
        },
        Command::Healthcheck { url } => {
            let url = url.unwrap_or_else(|| commands::default_health_url(&settings));
            match runtime.block_on(commands::healthcheck(&url, Duration::from_secs(5))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cuttle healthcheck: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Report { file, counts } => report(file.as_deref(), counts),
    }
}

/// `cuttle report [FILE] [--counts]`: exit 0 with the list, 2 when the log cannot be read.
fn report(file: Option<&Path>, counts: bool) -> ExitCode {
    let result = match file.filter(|f| *f != Path::new("-")) {
        Some(path) => std::fs::File::open(path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|f| {
                commands::report(std::io::BufReader::new(f), counts)
                    .map_err(|e| format!("{}: {e}", path.display()))
            }),
        None => commands::report(std::io::stdin().lock(), counts)
            .map_err(|e| format!("standard input: {e}")),
    };
    match result {
        Ok(text) => {
            // A closed pipe (`cuttle report log | head`) is not an error.
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cuttle report: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(settings: Settings, sources: Sources) -> ExitCode {
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
    let origins = format!(
        "regional defaults {}, global defaults {}, SQUID_WHITELIST {}, allowlist file {}",
        count(|s| matches!(s, EntrySource::AwsRegion(_))),
        count(|s| matches!(s, EntrySource::AwsGlobal)),
        count(|s| matches!(s, EntrySource::SquidWhitelist)),
        count(|s| matches!(s, EntrySource::AllowlistFile { .. })),
    );
    let server = match Server::bind(settings).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("cuttle: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    let shared = server.shared();
    // Signal handlers and the file watch are in place before the line that says cuttle is up.
    let shutdown = CancellationToken::new();
    let signals = cuttle::signals::spawn_shutdown_listener(shutdown.clone())
        .and_then(|()| cuttle::reload::spawn(shared.clone(), sources, shutdown.clone()));
    if let Err(e) = signals {
        eprintln!("cuttle: cannot install signal handlers: {e}");
        return ExitCode::from(1);
    }
    let admin = server
        .admin_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "-".into());
    tracing::info!(
        listen = %server.local_addr(),
        admin = %admin,
        allowlist_entries = shared.policy.load().allowlist().len(),
        allowlist_sources = %origins,
        aws_regions = %regions.join(","),
        no_whitelist = shared.settings.no_whitelist,
        access_log = ?shared.settings.access_log,
        "cuttle listening"
    );
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
