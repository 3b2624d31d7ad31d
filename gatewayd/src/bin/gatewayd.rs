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
    /// Try it without AWS: the whole flow in this process (an AWS IoT Core emulator, simulated
    /// Modbus meters and MQTT devices, the gateway) with a live status view; Ctrl-C stops it.
    #[cfg(feature = "demo")]
    Demo {
        /// Keep the demo's files here (and reuse them next time); default: a temporary
        /// directory removed at exit.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Simulated Modbus TCP meters.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=gatewayd::demo::MAX_DEVICES as i64))]
        modbus: u8,
        /// Simulated MQTT devices.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=gatewayd::demo::MAX_DEVICES as i64))]
        mqtt: u8,
        /// Stop by itself after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli: Cli = match gatewayd::daemon::parse_cli() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cli.command {
        #[cfg(feature = "demo")]
        Command::Demo {
            dir,
            modbus,
            mqtt,
            seconds,
        } => demo(
            gatewayd::demo::DemoOptions {
                dir,
                modbus: modbus.into(),
                mqtt: mqtt.into(),
                tty: std::io::IsTerminal::is_terminal(&std::io::stdout()),
            },
            seconds,
        ),
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

/// `gatewayd demo`: runs until Ctrl-C, SIGTERM or `--seconds`; exit 0 once every part stopped.
#[cfg(feature = "demo")]
fn demo(opts: gatewayd::demo::DemoOptions, seconds: Option<u64>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(error) => {
            eprintln!("gatewayd demo: cannot start the async runtime: {error}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let stop = async move {
        match seconds {
            Some(s) => {
                tokio::select! {
                    _ = shutdown_signal() => {}
                    _ = tokio::time::sleep(std::time::Duration::from_secs(s)) => {}
                }
            }
            None => shutdown_signal().await,
        }
        // A second Ctrl-C while the parts stop: leave at once, as one expects of a terminal
        // program (the temporary directory stays behind then).
        tokio::spawn(async {
            shutdown_signal().await;
            eprintln!("gatewayd demo: interrupted again; exiting without cleaning up");
            std::process::exit(130);
        });
    };
    let mut out = std::io::stdout();
    match runtime.block_on(gatewayd::demo::run(opts, stop, &mut out)) {
        Ok(()) => ExitCode::SUCCESS,
        // `demo::run` printed the cause and the log's last lines.
        Err(_) => ExitCode::from(EX_SOFTWARE),
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
