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
    /// Try it without AWS: the whole flow in one process (an AWS IoT Core emulator, simulated
    /// Modbus meters and MQTT devices, the gateway) with a live status view; Ctrl-C stops it.
    /// Runs `gatewayd-demo` (next to this binary) with these arguments: `gatewayd demo --help`.
    #[command(disable_help_flag = true)]
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    let cli: Cli = match gatewayd::daemon::parse_cli() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cli.command {
        Command::Demo { args } => demo(args),
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
                // Blocking work is PBKDF2 at CONNECT, store and file I/O: a few threads keep the
                // CPUs busy. Tokio's default of 512 let 100 devices logging in at once leave ~84
                // threads (stacks, malloc arenas) behind (`tests/bench/rss`).
                .max_blocking_threads(BLOCKING_THREADS)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(error) => {
                    tracing::error!(%error, "cannot start the async runtime");
                    return ExitCode::from(EX_SOFTWARE);
                }
            };
            let result = runtime.block_on(gatewayd::daemon::run(
                cfg,
                gatewayd::daemon::shutdown_signal(),
            ));
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

/// The daemon's blocking-pool bound.
const BLOCKING_THREADS: usize = 16;

/// `gatewayd demo`: becomes `gatewayd-demo` (the demo is a binary of its own, so that the
/// emulator and the simulators it carries are not pages of the daemon: they added 2.1 MB of
/// resident file-backed memory to the daemon's start, `tests/bench/rss`).
fn demo(args: Vec<std::ffi::OsString>) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let bin = std::env::current_exe()
        .map(|p| p.with_file_name("gatewayd-demo"))
        .unwrap_or_else(|_| PathBuf::from("gatewayd-demo"));
    let error = std::process::Command::new(&bin).args(args).exec();
    eprintln!(
        "gatewayd demo: cannot run {}: {error} (the package does not carry the demo; build it from the source: cargo build --release, then target/release/gatewayd demo)",
        bin.display()
    );
    ExitCode::from(EX_SOFTWARE)
}
