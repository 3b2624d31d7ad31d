//! `gatewayd-demo` (run as `gatewayd demo`): the whole flow in one process, no AWS account: the
//! AWS IoT Core emulator, simulated Modbus meters and MQTT devices, the gateway, a live view.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// sysexits(3)
const EX_SOFTWARE: u8 = 70;

/// Try gatewayd without AWS: an AWS IoT Core emulator, simulated Modbus meters and MQTT devices
/// and the gateway in this process, with a live status view; Ctrl-C stops it.
#[derive(Parser)]
#[command(name = "gatewayd demo", bin_name = "gatewayd demo", version)]
struct Cli {
    /// Keep the demo's files here (and reuse them next time); default: a temporary directory
    /// removed at exit.
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
}

/// Runs until Ctrl-C, SIGTERM or `--seconds`; exit 0 once every part stopped.
fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = gatewayd::demo::DemoOptions {
        dir: cli.dir,
        modbus: cli.modbus.into(),
        mqtt: cli.mqtt.into(),
        tty: std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    let seconds = cli.seconds;
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
    let shutdown = gatewayd::daemon::shutdown_signal;
    let stop = async move {
        match seconds {
            Some(s) => {
                tokio::select! {
                    _ = shutdown() => {}
                    _ = tokio::time::sleep(std::time::Duration::from_secs(s)) => {}
                }
            }
            None => shutdown().await,
        }
        // A second Ctrl-C while the parts stop: leave at once, as one expects of a terminal
        // program (the temporary directory stays behind then).
        tokio::spawn(async move {
            shutdown().await;
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
