//! `gatewayd`: parse arguments, load configuration, set up logging, run the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gatewayd::daemon::{check, config};

/// sysexits(3)
const EX_SOFTWARE: u8 = 70;
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(version, about = "Edge gateway daemon for AWS IoT Core")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (under systemd: Type=notify).
    Run {
        #[arg(long, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate the configuration and the files it names, offline; exit 78 naming each bad key.
    CheckConfig {
        #[arg(long, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Judge file permissions as this user (default: the `gatewayd` user when run as root,
        /// else the caller).
        #[arg(long)]
        user: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli: Cli = match gatewayd::daemon::parse_cli() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cli.command {
        Command::CheckConfig { config, user } => {
            let reader = match user.as_deref().map(check::Reader::user) {
                None => check::Reader::default_for_check(),
                Some(Ok(r)) => r,
                Some(Err(e)) => {
                    eprintln!("gatewayd: --user: {e}");
                    return ExitCode::from(gatewayd::daemon::EX_USAGE);
                }
            };
            let errors = match config::load(&config) {
                Ok(c) => check::check(&c, &reader, check::Scope::All),
                Err(e) => vec![e],
            };
            if errors.is_empty() {
                println!(
                    "{}: configuration OK (files checked as user {})",
                    config.display(),
                    reader.name
                );
                return ExitCode::SUCCESS;
            }
            for e in &errors {
                eprintln!("gatewayd: configuration error: {e}");
            }
            ExitCode::from(EX_CONFIG)
        }
        Command::Run { config } => {
            let cfg = match config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("gatewayd: configuration error: {e}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            let sink =
                gatewayd::daemon::logging::init(&cfg.daemon.log_level, cfg.daemon.log_target);
            tracing::debug!(sink, config = %config.display(), "logging initialised");
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(error) => {
                    tracing::error!(%error, "cannot start the async runtime");
                    return ExitCode::from(EX_SOFTWARE);
                }
            };
            let result = runtime.block_on(gatewayd::daemon::run(cfg, shutdown_signal()));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(gatewayd::daemon::DaemonError::Config(errors)) => {
                    for e in &errors {
                        tracing::error!(error = %e, "configuration error; fix it and start gatewayd again");
                    }
                    ExitCode::from(EX_CONFIG)
                }
                Err(e) => {
                    let mut msg = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(s) = src {
                        msg += &format!(": {s}");
                        src = s.source();
                    }
                    tracing::error!(error = %msg, "gatewayd failed");
                    ExitCode::from(EX_SOFTWARE)
                }
            }
        }
    }
}

/// SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers, Ctrl-C is all we can wait for.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
