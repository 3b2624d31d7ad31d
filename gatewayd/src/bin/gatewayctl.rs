//! `gatewayctl`: talk to a running gatewayd over its status socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gatewayd::daemon::status::{self, Request, TemporaryClaim};

const EX_UNAVAILABLE: u8 = 69;
const EX_NOINPUT: u8 = 66;
const EX_TEMPFAIL: u8 = 75;
const EX_NOPERM: u8 = 77;

/// Why the daemon could not be asked, in plain words, with a distinct exit code.
fn unreachable(socket: &std::path::Path, e: &status::StatusError) -> (String, u8) {
    use std::io::ErrorKind::*;
    let status::StatusError::Socket { source, .. } = e else {
        return (
            format!("gatewayd answered something unreadable: {e}"),
            EX_UNAVAILABLE,
        );
    };
    let path = socket.display();
    match source.kind() {
        NotFound | ConnectionRefused => (
            format!(
                "gatewayd is not running (nothing listens on {path}); start it with `systemctl start gatewayd`"
            ),
            EX_UNAVAILABLE,
        ),
        PermissionDenied => (
            format!("permission denied on {path}: run as root or as a member of group `gatewayd`"),
            EX_NOPERM,
        ),
        WouldBlock | TimedOut => (
            format!(
                "gatewayd did not answer on {path} within 10 s; it may be hung (see `journalctl -u gatewayd`)"
            ),
            EX_TEMPFAIL,
        ),
        _ => {
            let s = source.to_string();
            let s = s.split(" (os error").next().unwrap_or(&s).to_owned();
            (
                format!("cannot talk to gatewayd on {path}: {s}"),
                EX_UNAVAILABLE,
            )
        }
    }
}

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
    /// Show the gateway's own identity: stage, thing, certificate, certificates to revoke, errors.
    Identity {
        /// Print the identity part of the JSON snapshot.
        #[arg(long)]
        json: bool,
    },
    /// Try a failed provisioning step again now (after fixing its cause), instead of waiting.
    Retry,
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
        Command::Status { .. } | Command::Identity { .. } => Request::Status,
        Command::Retry => Request::Retry,
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
            let (message, code) = unreachable(&cli.socket, &e);
            eprintln!("gatewayctl: {message}");
            return ExitCode::from(code);
        }
    };
    if !resp.ok {
        eprintln!("gatewayctl: {}", resp.message.unwrap_or_default());
        return ExitCode::FAILURE;
    }
    let printed = match (cli.command, resp.status) {
        (Command::Status { json: true }, Some(s)) => print_json(&s),
        (Command::Status { json: false }, Some(s)) => {
            print!("{}", status::render(&s));
            Ok(())
        }
        (Command::Identity { json: true }, Some(s)) => print_json(&s.identity),
        (Command::Identity { json: false }, Some(s)) => {
            print!(
                "{}",
                status::render_identity(&s.identity, status::unix_now())
            );
            Ok(())
        }
        _ => {
            println!("{}", resp.message.unwrap_or_default());
            Ok(())
        }
    };
    match printed {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatewayctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<(), serde_json::Error> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
