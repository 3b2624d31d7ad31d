//! `iotcore-sim`: command line of the AWS IoT Core stand-in.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use iotcore_sim::{admin, broker, control, pki, provisioning, registry};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

/// The claim policy AWS documents, widened to the CSR topics and every template.
const CLAIM_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[
 {"Effect":"Allow","Action":["iot:Connect"],"Resource":"*"},
 {"Effect":"Allow","Action":["iot:Publish","iot:Receive"],"Resource":[
   "arn:aws:iot:us-east-1:123456789012:topic/$aws/certificates/create/*",
   "arn:aws:iot:us-east-1:123456789012:topic/$aws/certificates/create-from-csr/*",
   "arn:aws:iot:us-east-1:123456789012:topic/$aws/provisioning-templates/*/provision/*"]},
 {"Effect":"Allow","Action":"iot:Subscribe","Resource":[
   "arn:aws:iot:us-east-1:123456789012:topicfilter/$aws/certificates/create/*",
   "arn:aws:iot:us-east-1:123456789012:topicfilter/$aws/certificates/create-from-csr/*",
   "arn:aws:iot:us-east-1:123456789012:topicfilter/$aws/provisioning-templates/*/provision/*"]}]}"#;

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

fn open(dir: &Path) -> Result<registry::Store> {
    Ok(registry::Store::open(dir)?)
}

fn load_ca(dir: &Path) -> Result<pki::Ca> {
    Ok(pki::Ca::load(
        &dir.join("root-ca.pem"),
        &dir.join("root-ca.key"),
    )?)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Init { dir } => init(&dir),
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
            &dir,
            &listen,
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
        } => {
            let body = read(&template)?;
            let params: std::collections::BTreeMap<String, String> = serde_json::from_str(&params)
                .context("--params must be a JSON object of strings")?;
            let ca = load_ca(&dir)?;
            let v = provisioning::register_thing_control_plane(&open(&dir)?, &ca, &body, &params)
                .map_err(|e| anyhow::anyhow!("{} ({}): {}", e.code, e.status, e.message))?;
            print_json(&v)
        }
        Cmd::BulkRegister {
            dir,
            template,
            input,
            out,
        } => {
            let body = read(&template)?;
            let lines = read(&input)?;
            std::fs::create_dir_all(&out)?;
            let results = out.join("results.ndjson");
            let mut f = std::io::BufWriter::new(std::fs::File::create(&results)?);
            let (ok, failed) =
                provisioning::bulk_register(&open(&dir)?, &load_ca(&dir)?, &body, &lines, &mut f)?;
            std::io::Write::flush(&mut f)?;
            print_json(&json!({
                "successCount": ok,
                "failureCount": failed,
                "results": results.display().to_string(),
            }))
        }
        Cmd::Claim {
            cmd:
                ClaimCmd::Create {
                    dir,
                    template,
                    ttl_secs,
                },
        } => create_temporary_claim(&dir, &template, ttl_secs),
        Cmd::Ca { cmd } => match cmd {
            CaCmd::Register { dir, ca, template } => {
                let pem = std::fs::read_to_string(&ca)
                    .with_context(|| format!("reading {}", ca.display()))?;
                let id = admin::register_ca(&open(&dir)?, &pem, template)?;
                println!("ca_certificate_id={id}");
                Ok(())
            }
            CaCmd::List { dir } => print_json(
                &open(&dir)?.read(|r| r.ca_certificates.values().cloned().collect::<Vec<_>>())?,
            ),
        },
        Cmd::Fault { fault } => {
            let (dir, req) = match fault {
                FaultCmd::DropAll { dir } => (dir, json!({"cmd": "drop-all"})),
                FaultCmd::Refuse { dir, seconds } => {
                    (dir, json!({"cmd": "refuse", "seconds": seconds}))
                }
                FaultCmd::Delay { dir, ms } => {
                    (dir, json!({"cmd": "delay", "seconds": ms as f64 / 1000.0}))
                }
                FaultCmd::RejectNext {
                    dir,
                    count,
                    status,
                    code,
                    message,
                } => (
                    dir,
                    json!({"cmd": "reject-next", "count": count, "status": status, "code": code, "message": message}),
                ),
                FaultCmd::StallAcks { dir, seconds } => {
                    (dir, json!({"cmd": "stall-acks", "seconds": seconds}))
                }
                FaultCmd::Clear { dir } => (dir, json!({"cmd": "clear"})),
            };
            print_json(&control::admin_request(&dir, &req).map_err(anyhow::Error::msg)?)
        }
        Cmd::Counters { dir, reset } => {
            let v = control::admin_request(&dir, &json!({"cmd": "counters"}))
                .map_err(anyhow::Error::msg)?;
            if reset {
                control::admin_request(&dir, &json!({"cmd": "reset-counters"}))
                    .map_err(anyhow::Error::msg)?;
            }
            print_json(&v)
        }
        Cmd::Template { cmd } => match cmd {
            TemplateCmd::Add {
                dir,
                name,
                body,
                hook,
                disabled,
            } => {
                let text = std::fs::read_to_string(&body)
                    .with_context(|| format!("reading {}", body.display()))?;
                let v = admin::add_template(&open(&dir)?, &name, &text, hook, !disabled)?;
                println!("template {name} version {v} is the default");
                Ok(())
            }
            TemplateCmd::Set { dir, name, enabled } => open(&dir)?.update(|r| {
                let t = r
                    .templates
                    .get_mut(&name)
                    .with_context(|| format!("template {name} does not exist"))?;
                t.enabled = enabled;
                Ok::<_, anyhow::Error>(())
            }),
            TemplateCmd::List { dir } => print_json(
                &open(&dir)?.read(|r| r.templates.values().cloned().collect::<Vec<_>>())?,
            ),
        },
        Cmd::Things {
            cmd: ListCmd::List { dir },
        } => print_json(&open(&dir)?.read(|r| r.things.values().cloned().collect::<Vec<_>>())?),
        Cmd::Certs { cmd } => match cmd {
            CertsCmd::List { dir } => print_json(&open(&dir)?.read(admin::list_certs)?),
            CertsCmd::Create {
                dir,
                out,
                policy,
                thing,
            } => create_cert(&dir, &out, policy, thing),
            CertsCmd::Activate {
                dir,
                id,
                thing,
                policy,
            } => {
                let store = open(&dir)?;
                admin::set_cert_status(&store, &id, registry::CertStatus::Active)?;
                admin::attach(&store, &id, thing.as_deref(), policy.as_deref())
            }
            CertsCmd::Deactivate { dir, id } => {
                admin::set_cert_status(&open(&dir)?, &id, registry::CertStatus::Inactive)
            }
            CertsCmd::Revoke { dir, id } => {
                admin::set_cert_status(&open(&dir)?, &id, registry::CertStatus::Revoked)
            }
        },
        Cmd::Policies { cmd } => match cmd {
            PoliciesCmd::List { dir } => {
                print_json(&open(&dir)?.read(|r| r.policies.values().cloned().collect::<Vec<_>>())?)
            }
            PoliciesCmd::Add {
                dir,
                name,
                document,
            } => {
                let text = std::fs::read_to_string(&document)
                    .with_context(|| format!("reading {}", document.display()))?;
                admin::add_policy(&open(&dir)?, &name, &text)
            }
        },
        Cmd::ThingTypes { cmd } => name_cmd(cmd, |r| &mut r.thing_types, "thing type"),
        Cmd::ThingGroups { cmd } => name_cmd(cmd, |r| &mut r.thing_groups, "thing group"),
        Cmd::BillingGroups { cmd } => name_cmd(cmd, |r| &mut r.billing_groups, "billing group"),
    }
}

fn name_cmd(
    cmd: NameCmd,
    field: fn(&mut registry::Registry) -> &mut Vec<String>,
    what: &str,
) -> Result<()> {
    match cmd {
        NameCmd::Add { dir, name } => {
            if name.is_empty()
                || name.len() > 128
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ":_-".contains(c))
            {
                bail!("invalid {what} name {name:?}: 1-128 characters of [a-zA-Z0-9:_-]");
            }
            open(&dir)?.update(|r| {
                let v = field(r);
                if !v.contains(&name) {
                    v.push(name.clone());
                }
                Ok::<_, anyhow::Error>(())
            })
        }
        NameCmd::List { dir } => {
            let mut r = open(&dir)?.read(|r| r.clone())?;
            print_json(field(&mut r))
        }
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A fresh P-256 key and a certificate for it signed by the emulator CA.
fn new_cert(ca: &pki::Ca, cn: &str, not_after: Option<u64>) -> Result<(rcgen::KeyPair, Vec<u8>)> {
    let key = rcgen::KeyPair::generate()?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let der = ca.issue_until(&spki, cn, &[], false, not_after)?;
    Ok((key, der))
}

fn create_temporary_claim(dir: &Path, template: &str, ttl_secs: u64) -> Result<()> {
    let store = open(dir)?;
    if store.read(|r| !r.templates.contains_key(template))? {
        bail!("template {template} does not exist");
    }
    let expires_ms = registry::now_ms() + ttl_secs * 1000;
    let (key, der) = new_cert(
        &load_ca(dir)?,
        "AWS IoT Provisioning Claim",
        Some(expires_ms / 1000),
    )?;
    let id = pki::cert_id(&der);
    let pem = pki::pem_encode("CERTIFICATE", &der);
    let arn = |kind: &str, rest: &str| format!("arn:aws:iot:us-east-1:123456789012:{kind}/{rest}");
    // AWS does not publish the implicit policy; this one allows the template's topics only.
    let policy = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": [
            arn("topic", "$aws/certificates/create/*"),
            arn("topic", "$aws/certificates/create-from-csr/*"),
            arn("topic", &format!("$aws/provisioning-templates/{template}/provision/*"))]},
        {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": [
            arn("topicfilter", "$aws/certificates/create/*"),
            arn("topicfilter", "$aws/certificates/create-from-csr/*"),
            arn("topicfilter", &format!("$aws/provisioning-templates/{template}/provision/*"))]}]});
    store.update(|r| {
        let mut c = registry::Certificate::new(
            &id,
            &pem,
            registry::CertStatus::Active,
            "trusted-user claim",
        );
        c.expires_ms = Some(expires_ms);
        c.claim_window_ms = Some(ttl_secs * 1000);
        c.implicit_policy = Some(policy.to_string());
        r.certificates.insert(id.clone(), c);
        Ok::<_, anyhow::Error>(())
    })?;
    let claims = dir.join("claims");
    std::fs::create_dir_all(&claims)?;
    let cert_path = claims.join(format!("{}.pem", &id[..16]));
    let key_path = claims.join(format!("{}.key", &id[..16]));
    std::fs::write(&cert_path, &pem)?;
    write_private(&key_path, &key.serialize_pem())?;
    println!("claim_cert={}", cert_path.display());
    println!("claim_key={}", key_path.display());
    println!("certificate_id={id}");
    // CreateProvisioningClaim returns the expiration (Unix seconds here).
    println!("expiration={}", expires_ms / 1000);
    Ok(())
}

fn create_cert(
    dir: &Path,
    out: &Path,
    policy: Option<String>,
    thing: Option<String>,
) -> Result<()> {
    let store = open(dir)?;
    let (key, der) = new_cert(&load_ca(dir)?, "AWS IoT Certificate", None)?;
    let id = pki::cert_id(&der);
    let pem = pki::pem_encode("CERTIFICATE", &der);
    store.update(|r| {
        if let Some(p) = &policy
            && !r.policies.contains_key(p)
        {
            bail!("policy {p} does not exist");
        }
        if let Some(t) = &thing
            && !r.things.contains_key(t)
        {
            r.things.insert(
                t.clone(),
                registry::Thing {
                    thing_name: t.clone(),
                    version: 1,
                    ..Default::default()
                },
            );
        }
        r.certificates.insert(
            id.clone(),
            registry::Certificate::new(
                &id,
                &pem,
                registry::CertStatus::Active,
                "CreateKeysAndCertificate (control plane)",
            ),
        );
        if let Some(p) = &policy {
            r.attach_policy(&id, p);
        }
        if let Some(t) = &thing {
            r.attach_thing(&id, t);
        }
        Ok(())
    })?;
    let cert_path = out.with_extension("pem");
    let key_path = out.with_extension("key");
    std::fs::write(&cert_path, &pem)?;
    write_private(&key_path, &key.serialize_pem())?;
    println!("certificate_id={id}");
    println!("cert={}", cert_path.display());
    println!("key={}", key_path.display());
    Ok(())
}

fn init(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if dir.join("registry.json").exists() {
        bail!("{} already holds an emulator", dir.display());
    }
    let (ca, ca_key) = pki::Ca::generate("iotcore-sim Root CA")?;
    std::fs::write(dir.join("root-ca.pem"), &ca.cert_pem)?;
    write_private(&dir.join("root-ca.key"), &ca_key)?;
    let (server_pem, server_key) = ca.server_cert(&["localhost", "127.0.0.1"])?;
    std::fs::write(dir.join("server.pem"), server_pem)?;
    write_private(&dir.join("server.key"), &server_key)?;

    let (claim_key, claim_der) = new_cert(&ca, "iotcore-sim claim", None)?;
    let claim_pem = pki::pem_encode("CERTIFICATE", &claim_der);
    let claim_id = pki::cert_id(&claim_der);
    std::fs::write(dir.join("claim.pem"), &claim_pem)?;
    write_private(&dir.join("claim.key"), &claim_key.serialize_pem())?;

    let mut reg = registry::Registry::default();
    reg.policies.insert(
        "ClaimPolicy".into(),
        registry::Policy {
            policy_name: "ClaimPolicy".into(),
            policy_document: CLAIM_POLICY.into(),
        },
    );
    reg.certificates.insert(claim_id.clone(), {
        let mut c = registry::Certificate::new(
            &claim_id,
            &claim_pem,
            registry::CertStatus::Active,
            "claim",
        );
        c.policy_names = vec!["ClaimPolicy".into()];
        c
    });
    registry::Store::create(&dir, &reg)?;
    println!("root_ca={}", dir.join("root-ca.pem").display());
    println!("claim_cert={}", dir.join("claim.pem").display());
    println!("claim_key={}", dir.join("claim.key").display());
    Ok(())
}

fn serve(dir: &Path, listen: &str, opts: broker::ServeOptions) -> Result<()> {
    let store = Arc::new(open(dir)?);
    let ca = load_ca(dir)?;
    let cert = std::fs::read_to_string(dir.join("server.pem"))?;
    let key = std::fs::read_to_string(dir.join("server.key"))?;
    let tls = broker::tls_config(&cert, &key).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr()?;
        let store_for_watch = store.clone();
        let prov = Arc::new(provisioning::Provisioner {
            store: store.clone(),
            ca,
            token_ttl: opts.token_ttl,
            hook_timeout: opts.hook_timeout,
        });
        let control = Arc::new(control::Control::new(opts.limits));
        let broker = broker::Broker::new(store, prov, control);
        let admin_path = control::admin_socket_path(dir);
        let _ = std::fs::remove_file(&admin_path);
        let admin_listener = tokio::net::UnixListener::bind(&admin_path)
            .with_context(|| format!("binding {}", admin_path.display()))?;
        let admin = broker.clone().admin(admin_listener);
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {addr}")?;
            out.flush()?;
        }
        tracing::info!(%addr, "serving");
        // Registry changes (a CLI command, a RegisterThing) reach live connections.
        let watcher = {
            let broker = broker.clone();
            let store = store_for_watch;
            async move {
                let mut seen = store.generation();
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if let Err(e) = store.read(|_| ()) {
                        tracing::warn!(error = %e, "registry unreadable");
                        continue;
                    }
                    let g = store.generation();
                    if g != seen {
                        seen = g;
                        broker.refresh_principals();
                    }
                }
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = broker.clone().serve(listener, tls) => {}
            _ = watcher => {}
            r = admin => r.with_context(|| format!("admin socket {}", admin_path.display()))?,
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: stopping"),
        }
        broker.kick_all();
        let _ = std::fs::remove_file(&admin_path);
        Ok(())
    })
}
