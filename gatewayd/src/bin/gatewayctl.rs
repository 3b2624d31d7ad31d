//! `gatewayctl`: talk to a running gatewayd over its status socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gatewayd::daemon::status::{self, Request, TemporaryClaim};

const EX_UNAVAILABLE: u8 = 69;
const EX_NOINPUT: u8 = 66;

#[derive(Parser)]
#[command(version, about = "Control and inspect gatewayd")]
struct Cli {
    /// Status socket of the daemon.
    #[arg(long, global = true, default_value = "/run/gatewayd/status.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show identity and cloud-connection status.
    Status {
        /// Print the raw JSON snapshot.
        #[arg(long)]
        json: bool,
    },
    /// Temporary (trusted-user) claim handling.
    Claim {
        #[command(subcommand)]
        command: ClaimCommand,
    },
}

#[derive(Subcommand)]
enum ClaimCommand {
    /// Hand a temporary claim (from CreateProvisioningClaim) to the daemon; it must finish
    /// provisioning within five minutes.
    Install {
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli: Cli = match gatewayd::daemon::parse_cli() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = match &cli.command {
        Command::Status { .. } => Request::Status,
        Command::Claim {
            command: ClaimCommand::Install { cert, key },
        } => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
            };
            match (read(cert), read(key)) {
                (Ok(cert_pem), Ok(key_pem)) => {
                    Request::ClaimInstall(TemporaryClaim { cert_pem, key_pem })
                }
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("gatewayctl: {e}");
                    return ExitCode::from(EX_NOINPUT);
                }
            }
        }
    };
    let resp = match status::request(&cli.socket, &req) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gatewayctl: {e} (is gatewayd running?)");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    if !resp.ok {
        eprintln!("gatewayctl: {}", resp.message.unwrap_or_default());
        return ExitCode::FAILURE;
    }
    match (cli.command, resp.status) {
        (Command::Status { json: true }, Some(s)) => match serde_json::to_string_pretty(&s) {
            Ok(t) => println!("{t}"),
            Err(e) => {
                eprintln!("gatewayctl: {e}");
                return ExitCode::FAILURE;
            }
        },
        (Command::Status { json: false }, Some(s)) => print!("{}", status::render(&s)),
        _ => println!("{}", resp.message.unwrap_or_default()),
    }
    ExitCode::SUCCESS
}
