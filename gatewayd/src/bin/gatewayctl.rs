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
    /// Devices allowed to connect to the local MQTT endpoint.
    Children {
        #[command(subcommand)]
        command: ChildrenCommand,
    },
    /// The local MQTT endpoint.
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
    /// Messages waiting for the cloud: entries, bytes, oldest age, per child, drops.
    Outbox {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ChildrenCommand {
    /// Register a child (client id = child id). Give a certificate to pin, a password to
    /// generate, or neither (then only a certificate from the local CA naming it is accepted).
    Add {
        id: String,
        /// Pin this certificate (PEM file): accepted whichever CA issued it.
        #[arg(long, conflicts_with = "certificate_id")]
        cert: Option<PathBuf>,
        /// Pin a certificateId (SHA-256 of the DER, hex), as AWS IoT shows it.
        #[arg(long)]
        certificate_id: Option<String>,
        /// Generate a password (shown once; replaces an earlier one).
        #[arg(long)]
        password: bool,
        /// Provision it as its own AWS IoT thing (admission policy permitting); its
        /// certificate is pinned once issued.
        #[arg(long, conflicts_with_all = ["cert", "certificate_id", "password"])]
        provision: bool,
        /// Serial number (RegisterThing `SerialNumber`; the id when absent).
        #[arg(long, requires = "provision")]
        serial: Option<String>,
        #[arg(long, requires = "provision")]
        model: Option<String>,
        #[arg(long, requires = "provision")]
        vendor: Option<String>,
        /// Fleet-provisioning template other than children.template.
        #[arg(long, requires = "provision")]
        template: Option<String>,
        /// More RegisterThing parameters, KEY=VALUE (repeatable).
        #[arg(long = "param", requires = "provision", value_parser = key_value)]
        params: Vec<(String, String)>,
    },
    /// A child's provisioning: state, thing name, certificate, deviceConfiguration, last
    /// error, certificates to revoke.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Provision a child that waits for approval.
    Approve {
        id: String,
    },
    /// Never provision this child.
    Deny {
        id: String,
    },
    /// Try a failed child again now.
    Retry {
        id: String,
    },
    /// Every child offered for provisioning, with its state.
    Queue {
        #[arg(long)]
        json: bool,
    },
    /// Writes AWS bulk registration input (one JSON line per child awaiting approval: its
    /// RegisterThing parameters and a CSR for a key the gateway keeps) to FILE.
    ExportBulk {
        file: PathBuf,
    },
    /// Installs the certificates of a bulk registration task's results FILE for the children
    /// whose keys they certify, pins them and marks the children provisioned.
    ImportBulkResults {
        file: PathBuf,
    },
    Remove {
        id: String,
    },
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum LocalCommand {
    /// Print the gateway-local CA certificate (PEM), to install on devices.
    Ca,
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
        Command::Children {
            command:
                ChildrenCommand::Add {
                    id,
                    cert,
                    certificate_id,
                    password,
                    provision: false,
                    ..
                },
        } => {
            let certificate_id = match cert {
                Some(p) => match std::fs::read(p)
                    .map_err(|e| format!("{}: {e}", p.display()))
                    .and_then(|pem| {
                        gatewayd::identity::certificate_id(&pem)
                            .ok_or_else(|| format!("{}: no PEM certificate", p.display()))
                    }) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        eprintln!("gatewayctl: {e}");
                        return ExitCode::from(EX_NOINPUT);
                    }
                },
                None => certificate_id.clone(),
            };
            Request::ChildrenAdd(gatewayd::children::AddChild {
                id: id.clone(),
                certificate_id,
                password: *password,
            })
        }
        Command::Children {
            command:
                ChildrenCommand::Add {
                    id,
                    serial,
                    model,
                    vendor,
                    template,
                    params,
                    ..
                },
        } => Request::ChildrenOffer(gatewayd::children::provision::FoundChild {
            id: id.clone(),
            serial: serial.clone(),
            vendor: vendor.clone(),
            model: model.clone(),
            found_by: "manual".into(),
            template: template.clone(),
            parameters: params.iter().cloned().collect(),
        }),
        Command::Children {
            command: ChildrenCommand::Show { id, .. },
        } => Request::ChildrenShow { id: id.clone() },
        Command::Children {
            command: ChildrenCommand::Approve { id },
        } => Request::ChildrenApprove { id: id.clone() },
        Command::Children {
            command: ChildrenCommand::Deny { id },
        } => Request::ChildrenDeny { id: id.clone() },
        Command::Children {
            command: ChildrenCommand::Retry { id },
        } => Request::ChildrenRetry { id: id.clone() },
        Command::Children {
            command: ChildrenCommand::Queue { .. },
        } => Request::ChildrenQueue,
        Command::Children {
            command: ChildrenCommand::ExportBulk { .. },
        } => Request::ChildrenExportBulk,
        Command::Children {
            command: ChildrenCommand::ImportBulkResults { file },
        } => match std::fs::read_to_string(file) {
            Ok(results) => Request::ChildrenImportBulk { results },
            Err(e) => {
                eprintln!("gatewayctl: {}: {e}", file.display());
                return ExitCode::from(EX_NOINPUT);
            }
        },
        Command::Children {
            command: ChildrenCommand::Remove { id },
        } => Request::ChildrenRemove { id: id.clone() },
        Command::Children {
            command: ChildrenCommand::List { .. },
        } => Request::ChildrenList,
        Command::Local {
            command: LocalCommand::Ca,
        } => Request::LocalCa,
        Command::Outbox { .. } => Request::Outbox,
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
        (
            Command::Children {
                command: ChildrenCommand::List { json },
            },
            _,
        ) => print_data(resp.data, json, render_children),
        (
            Command::Children {
                command: ChildrenCommand::Show { json, .. },
            },
            _,
        ) => print_data(resp.data, json, render_child),
        (
            Command::Children {
                command: ChildrenCommand::Queue { json },
            },
            _,
        ) => print_data(resp.data, json, render_queue),
        (Command::Outbox { json }, _) => print_data(resp.data, json, render_outbox),
        (
            Command::Children {
                command: ChildrenCommand::ExportBulk { file },
            },
            _,
        ) => {
            let lines: Vec<String> = resp
                .data
                .and_then(|d| serde_json::from_value(d).ok())
                .unwrap_or_default();
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            match std::fs::write(&file, text) {
                Ok(()) => {
                    println!(
                        "{}: {} (run the bulk registration task with it, then `gatewayctl children import-bulk-results RESULTS`)",
                        file.display(),
                        resp.message.unwrap_or_default()
                    );
                    Ok(())
                }
                Err(e) => {
                    eprintln!("gatewayctl: {}: {e}", file.display());
                    return ExitCode::from(73); // EX_CANTCREAT
                }
            }
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

fn print_data(
    data: Option<serde_json::Value>,
    json: bool,
    human: fn(&serde_json::Value) -> String,
) -> Result<(), serde_json::Error> {
    let data = data.unwrap_or_default();
    if json {
        return print_json(&data);
    }
    print!("{}", human(&data));
    Ok(())
}

fn render_children(v: &serde_json::Value) -> String {
    let Ok(list) = serde_json::from_value::<Vec<gatewayd::children::ChildView>>(v.clone()) else {
        return "no children\n".into();
    };
    if list.is_empty() {
        return "no children registered (gatewayctl children add ID)\n".into();
    }
    let mut out = String::new();
    for c in list {
        let mut how = Vec::new();
        if c.password {
            how.push("password".to_owned());
        }
        for id in &c.certificate_ids {
            how.push(format!("certificate {}", &id[..id.len().min(16)]));
        }
        if how.is_empty() {
            how.push("local-CA certificate".into());
        }
        out.push_str(&format!("{}  {}\n", c.id, how.join(", ")));
    }
    out
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

fn render_child(v: &serde_json::Value) -> String {
    use gatewayd::children::provision::ChildProvisioning;
    let Ok(c) = serde_json::from_value::<ChildProvisioning>(v.clone()) else {
        return "no such child\n".into();
    };
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let mut out = format!("child {}\n", c.id);
    out.push_str(&format!(
        "  state:          {} (identity stage {})\n",
        c.state, c.stage
    ));
    out.push_str(&format!("  thing:          {}\n", opt(&c.thing_name)));
    out.push_str(&format!(
        "  certificate:    {}{}\n",
        opt(&c.certificate_id),
        if c.pinned {
            " (pinned for the local endpoint)"
        } else {
            ""
        }
    ));
    out.push_str(&format!(
        "  found by:       {} (serial {}, vendor {}, model {})\n",
        c.found.found_by,
        opt(&c.found.serial),
        opt(&c.found.vendor),
        opt(&c.found.model)
    ));
    out.push_str(&format!(
        "  deviceConfiguration: {}\n",
        serde_json::Value::Object(c.device_configuration)
    ));
    out.push_str(&format!("  attempts:       {}\n", c.attempts));
    out.push_str(&format!("  last error:     {}\n", opt(&c.last_error)));
    if !c.orphaned_certificates.is_empty() {
        out.push_str(&format!(
            "  orphaned certificates (never activated; expire with their token): {}\n",
            c.orphaned_certificates.join(", ")
        ));
    }
    if !c.possibly_active_certificates.is_empty() {
        out.push_str(&format!(
            "  possibly active certificates (revoke): {}\n",
            c.possibly_active_certificates.join(", ")
        ));
    }
    if c.unconfirmed_certificate_requests > 0 {
        out.push_str(&format!(
            "  certificate requests whose answer was lost: {}\n",
            c.unconfirmed_certificate_requests
        ));
    }
    out
}

fn render_queue(v: &serde_json::Value) -> String {
    use gatewayd::children::provision::ChildProvisioning;
    let Ok(list) = serde_json::from_value::<Vec<ChildProvisioning>>(v.clone()) else {
        return "no children\n".into();
    };
    if list.is_empty() {
        return "no children offered for provisioning (gatewayctl children add ID --provision)\n"
            .into();
    }
    let mut out = String::new();
    for c in list {
        out.push_str(&format!(
            "{}  {}  {}\n",
            c.id,
            c.state,
            c.thing_name.unwrap_or_else(|| "-".into())
        ));
    }
    out
}

fn render_outbox(v: &serde_json::Value) -> String {
    let Ok(o) = serde_json::from_value::<status::OutboxSummary>(v.clone()) else {
        return "outbox: not open\n".into();
    };
    let mut out = format!(
        "outbox: {} entries, {} bytes ({} on disk), {} in flight, oldest {}\n",
        o.entries,
        o.bytes,
        o.disk_bytes,
        o.in_flight,
        o.oldest_age_ms
            .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into())
    );
    out.push_str(&format!(
        "  drops: {} age, {} overflow, {} corrupt; {} refused; {} appended since start\n",
        o.drops_age, o.drops_overflow, o.drops_corrupt, o.refused, o.appended
    ));
    for (child, n) in &o.per_child {
        out.push_str(&format!("  {child}: {n}\n"));
    }
    out
}
