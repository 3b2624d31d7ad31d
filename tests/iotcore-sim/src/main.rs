//! `iotcore-sim`: command line of the AWS IoT Core stand-in. Parses the command, calls the
//! library (`admin` for registry commands, `broker::serve`, `control` for the running server) and
//! prints what AWS would return; any error exits 1 with its cause chain on stderr.

use anyhow::Result;
use clap::{Parser, Subcommand};
use iotcore_sim::admin::{self, NameKind};
use iotcore_sim::{broker, control, registry};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "iotcore-sim",
    version,
    about = "AWS IoT Core stand-in for tests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the CA, server and claim certificates and an empty registry in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Serve MQTT over mutual TLS.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8883")]
        listen: String,
        /// Ownership-token lifetime in seconds (AWS: 3600).
        #[arg(long, default_value_t = 3600)]
        token_ttl: u64,
        /// Pre-provisioning hook time limit in milliseconds (AWS: 5000).
        #[arg(long, default_value_t = 5000)]
        hook_timeout_ms: u64,
        /// RegisterThing calls per second, account-wide (AWS historical default: 10).
        #[arg(long, default_value_t = 10.0)]
        register_thing_tps: f64,
        /// CreateCertificateFromCsr calls per second, account-wide (AWS historical default: 15).
        #[arg(long, default_value_t = 15.0)]
        create_from_csr_tps: f64,
        /// CreateKeysAndCertificate calls per second, account-wide.
        #[arg(long, default_value_t = 10.0)]
        create_keys_tps: f64,
        /// Publishes per second per connection, inbound plus outbound (AWS: 100).
        #[arg(long, default_value_t = 100.0)]
        publishes_per_second: f64,
        /// Bytes per second per connection (AWS: 512 KiB/s).
        #[arg(long, default_value_t = 524_288.0)]
        bytes_per_second: f64,
    },
    /// Control-plane RegisterThing (single-thing provisioning); prints AWS's response JSON.
    RegisterThing {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        template: PathBuf,
        /// Template parameters as a JSON object of strings.
        #[arg(long, default_value = "{}")]
        params: String,
    },
    /// Bulk registration: one JSON object of parameters per line of INPUT; writes
    /// OUT/results.ndjson (one result or error line per input line) and prints a summary.
    BulkRegister {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        template: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Trusted-user claims (CreateProvisioningClaim).
    Claim {
        #[command(subcommand)]
        cmd: ClaimCmd,
    },
    /// CA certificates for JITP and JITR.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Inject a fault into the running server of DIR.
    Fault {
        #[command(subcommand)]
        fault: FaultCmd,
    },
    /// Print the running server's counters as JSON.
    Counters {
        #[arg(long)]
        dir: PathBuf,
        /// Zero the counters after printing them.
        #[arg(long)]
        reset: bool,
    },
    /// Provisioning templates.
    Template {
        #[command(subcommand)]
        cmd: TemplateCmd,
    },
    /// Things.
    Things {
        #[command(subcommand)]
        cmd: ListCmd,
    },
    /// Certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// IoT policies.
    Policies {
        #[command(subcommand)]
        cmd: PoliciesCmd,
    },
    /// Thing types (must exist before a template names one).
    ThingTypes {
        #[command(subcommand)]
        cmd: NameCmd,
    },
    /// Thing groups (must exist before a template names one).
    ThingGroups {
        #[command(subcommand)]
        cmd: NameCmd,
    },
    /// Billing groups (must exist before a template names one).
    BillingGroups {
        #[command(subcommand)]
        cmd: NameCmd,
    },
}

#[derive(Subcommand)]
enum ClaimCmd {
    /// Issue a temporary claim certificate for one template (valid five minutes, not listed).
    Create {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        template: String,
        /// Lifetime and provisioning window in seconds (AWS: 300).
        #[arg(long, default_value_t = 300)]
        ttl_secs: u64,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Register a CA with auto-registration: JITP with --template, JITR without.
    Register {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        template: Option<String>,
    },
    List {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum FaultCmd {
    /// Drop every connection now.
    DropAll {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Refuse new connections for SECONDS.
    Refuse {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        seconds: f64,
    },
    /// Delay every fleet-provisioning response by MS milliseconds (0 to stop).
    Delay {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        ms: u64,
    },
    /// Reject the next COUNT fleet-provisioning calls with the given error.
    RejectNext {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 503)]
        status: u16,
        #[arg(long, default_value = "ServiceUnavailableException")]
        code: String,
        #[arg(long, default_value = "Injected fault")]
        message: String,
    },
    /// Stop acknowledging publishes for SECONDS (messages are still delivered).
    StallAcks {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        seconds: f64,
    },
    /// Clear every fault.
    Clear {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// Add a template, or a new default version of an existing one.
    Add {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        body: PathBuf,
        /// Shell command run as the pre-provisioning hook (AWS hook JSON on stdin, answer on stdout).
        #[arg(long)]
        hook: Option<String>,
        #[arg(long)]
        disabled: bool,
    },
    /// Enable or disable a template.
    Set {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        enabled: bool,
    },
    List {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ListCmd {
    List {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    List {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Create an ACTIVE certificate and key (what `aws iot create-keys-and-certificate
    /// --set-as-active` does), optionally attaching a policy and a thing; writes OUT.pem, OUT.key.
    Create {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        policy: Option<String>,
        #[arg(long)]
        thing: Option<String>,
    },
    /// Activate a certificate; with --thing/--policy it also attaches them (creating the thing),
    /// standing in for the customer's JITR rule and Lambda.
    Activate {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        thing: Option<String>,
        #[arg(long)]
        policy: Option<String>,
    },
    Deactivate {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: String,
    },
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand)]
enum PoliciesCmd {
    List {
        #[arg(long)]
        dir: PathBuf,
    },
    Add {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        document: PathBuf,
    },
}

#[derive(Subcommand)]
enum NameCmd {
    Add {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    List {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IOTCORE_SIM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iotcore-sim: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Init { dir } => {
            let out = admin::init(&dir)?;
            println!("root_ca={}", out.root_ca.display());
            println!("claim_cert={}", out.claim_cert.display());
            println!("claim_key={}", out.claim_key.display());
            Ok(())
        }
        Cmd::Serve {
            dir,
            listen,
            token_ttl,
            hook_timeout_ms,
            register_thing_tps,
            create_from_csr_tps,
            create_keys_tps,
            publishes_per_second,
            bytes_per_second,
        } => serve(
            dir,
            listen,
            broker::ServeOptions {
                token_ttl: Duration::from_secs(token_ttl),
                hook_timeout: Duration::from_millis(hook_timeout_ms),
                limits: control::Limits {
                    register_thing_tps,
                    create_from_csr_tps,
                    create_keys_tps,
                    publishes_per_second,
                    bytes_per_second,
                    ..control::Limits::default()
                },
            },
        ),
        Cmd::RegisterThing {
            dir,
            template,
            params,
        } => print_json(&admin::register_thing(&dir, &template, &params)?),
        Cmd::BulkRegister {
            dir,
            template,
            input,
            out,
        } => print_json(&admin::bulk_register(&dir, &template, &input, &out)?),
        Cmd::Claim {
            cmd:
                ClaimCmd::Create {
                    dir,
                    template,
                    ttl_secs,
                },
        } => {
            let claim = admin::create_provisioning_claim(&dir, &template, ttl_secs)?;
            println!("claim_cert={}", claim.cert_path.display());
            println!("claim_key={}", claim.key_path.display());
            println!("certificate_id={}", claim.certificate_id);
            println!("expiration={}", claim.expiration);
            Ok(())
        }
        Cmd::Ca { cmd } => match cmd {
            CaCmd::Register { dir, ca, template } => {
                let pem = admin::read_file(&ca)?;
                let id = admin::register_ca(&admin::open(&dir)?, &pem, template)?;
                println!("ca_certificate_id={id}");
                Ok(())
            }
            CaCmd::List { dir } => {
                print_json(&admin::open(&dir)?.read(admin::list_ca_certificates)?)
            }
        },
        Cmd::Fault { fault } => {
            let (dir, fault) = match fault {
                FaultCmd::DropAll { dir } => (dir, control::Fault::DropAll),
                FaultCmd::Refuse { dir, seconds } => (dir, control::Fault::Refuse { seconds }),
                FaultCmd::Delay { dir, ms } => (dir, control::Fault::Delay { ms }),
                FaultCmd::RejectNext {
                    dir,
                    count,
                    status,
                    code,
                    message,
                } => (
                    dir,
                    control::Fault::RejectNext {
                        count,
                        status,
                        code,
                        message,
                    },
                ),
                FaultCmd::StallAcks { dir, seconds } => {
                    (dir, control::Fault::StallAcks { seconds })
                }
                FaultCmd::Clear { dir } => (dir, control::Fault::Clear),
            };
            print_json(&control::inject(&dir, &fault).map_err(anyhow::Error::msg)?)
        }
        Cmd::Counters { dir, reset } => {
            print_json(&control::counters(&dir, reset).map_err(anyhow::Error::msg)?)
        }
        Cmd::Template { cmd } => match cmd {
            TemplateCmd::Add {
                dir,
                name,
                body,
                hook,
                disabled,
            } => {
                let text = admin::read_file(&body)?;
                let v = admin::add_template(&admin::open(&dir)?, &name, &text, hook, !disabled)?;
                println!("template {name} version {v} is the default");
                Ok(())
            }
            TemplateCmd::Set { dir, name, enabled } => {
                admin::set_template_enabled(&admin::open(&dir)?, &name, enabled)
            }
            TemplateCmd::List { dir } => {
                print_json(&admin::open(&dir)?.read(admin::list_templates)?)
            }
        },
        Cmd::Things {
            cmd: ListCmd::List { dir },
        } => print_json(&admin::open(&dir)?.read(admin::list_things)?),
        Cmd::Certs { cmd } => match cmd {
            CertsCmd::List { dir } => print_json(&admin::open(&dir)?.read(admin::list_certs)?),
            CertsCmd::Create {
                dir,
                out,
                policy,
                thing,
            } => {
                let c = admin::create_keys_and_certificate(
                    &dir,
                    &out,
                    policy.as_deref(),
                    thing.as_deref(),
                )?;
                println!("certificate_id={}", c.certificate_id);
                println!("cert={}", c.cert_path.display());
                println!("key={}", c.key_path.display());
                Ok(())
            }
            CertsCmd::Activate {
                dir,
                id,
                thing,
                policy,
            } => {
                let store = admin::open(&dir)?;
                admin::set_cert_status(&store, &id, registry::CertStatus::Active)?;
                admin::attach(&store, &id, thing.as_deref(), policy.as_deref())
            }
            CertsCmd::Deactivate { dir, id } => {
                admin::set_cert_status(&admin::open(&dir)?, &id, registry::CertStatus::Inactive)
            }
            CertsCmd::Revoke { dir, id } => {
                admin::set_cert_status(&admin::open(&dir)?, &id, registry::CertStatus::Revoked)
            }
        },
        Cmd::Policies { cmd } => match cmd {
            PoliciesCmd::List { dir } => {
                print_json(&admin::open(&dir)?.read(admin::list_policies)?)
            }
            PoliciesCmd::Add {
                dir,
                name,
                document,
            } => {
                let text = admin::read_file(&document)?;
                admin::add_policy(&admin::open(&dir)?, &name, &text)
            }
        },
        Cmd::ThingTypes { cmd } => names(cmd, NameKind::ThingType),
        Cmd::ThingGroups { cmd } => names(cmd, NameKind::ThingGroup),
        Cmd::BillingGroups { cmd } => names(cmd, NameKind::BillingGroup),
    }
}

fn names(cmd: NameCmd, kind: NameKind) -> Result<()> {
    match cmd {
        NameCmd::Add { dir, name } => admin::add_name(&dir, kind, &name),
        NameCmd::List { dir } => print_json(&admin::list_names(&dir, kind)?),
    }
}

/// Serve until SIGTERM or an interrupt; the first stdout line is "listening on HOST:PORT".
fn serve(dir: PathBuf, listen: String, opts: broker::ServeOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: stopping"),
            }
        };
        let ready = |addr| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {addr}")?;
            out.flush()
        };
        broker::serve(&dir, &listen, opts, ready, shutdown).await
    })
}
