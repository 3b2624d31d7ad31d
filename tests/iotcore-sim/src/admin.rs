//! Control-plane operations behind the command line (what AWS's console and CLI do): creating an
//! emulator directory, certificates, temporary claims, names, templates, policies and CAs, and the
//! control-plane RegisterThing and bulk registration.
//!
//! Owns: validation of operator input before it reaches the registry, and the files these
//! operations write into the emulator directory (CA, server and claim keys and certificates,
//! temporary claims, certificates for test applications). No network: the running server is
//! reached through [`crate::control`], and served by [`crate::broker::serve`].

use crate::pki::{self, Ca};
use crate::provisioning;
use crate::registry::{
    self, CertStatus, MAX_TEMPLATE_VERSIONS, ProvisioningTemplate, Registry, Store, TemplateVersion,
};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

/// The registry of an emulator directory.
pub fn open(dir: &Path) -> Result<Store> {
    Ok(Store::open(dir)?)
}

/// The emulator CA of an emulator directory.
pub fn load_ca(dir: &Path) -> Result<Ca> {
    Ok(Ca::load_dir(dir)?)
}

/// An operator-supplied file (template body, policy document, CA certificate, input lines).
pub fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Write a private key readable by its owner only.
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

/// What `init` created.
pub struct Initialised {
    pub root_ca: PathBuf,
    pub claim_cert: PathBuf,
    pub claim_key: PathBuf,
}

/// Create an emulator in `dir`: the root CA, the server certificate (`localhost`, `127.0.0.1`),
/// the shared claim certificate and key with `ClaimPolicy`, and the registry.
pub fn init(dir: &Path) -> Result<Initialised> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if dir.join("registry.json").exists() {
        bail!("{} already holds an emulator", dir.display());
    }
    let (ca, ca_key) = Ca::generate("iotcore-sim Root CA")?;
    std::fs::write(dir.join("root-ca.pem"), &ca.cert_pem)?;
    write_private(&dir.join("root-ca.key"), &ca_key)?;
    let (server_pem, server_key) = ca.server_cert(&["localhost", "127.0.0.1"])?;
    std::fs::write(dir.join("server.pem"), server_pem)?;
    write_private(&dir.join("server.key"), &server_key)?;

    let (claim_key, claim_der) = ca.issue_with_new_key("iotcore-sim claim", None)?;
    let claim_pem = pki::pem_encode("CERTIFICATE", &claim_der);
    let claim_id = pki::cert_id(&claim_der);
    std::fs::write(dir.join("claim.pem"), &claim_pem)?;
    write_private(&dir.join("claim.key"), &claim_key.serialize_pem())?;

    let mut reg = Registry::default();
    reg.policies.insert(
        "ClaimPolicy".into(),
        registry::Policy {
            policy_name: "ClaimPolicy".into(),
            policy_document: CLAIM_POLICY.into(),
        },
    );
    reg.certificates.insert(claim_id.clone(), {
        let mut c = registry::Certificate::new(&claim_id, &claim_pem, CertStatus::Active, "claim");
        c.policy_names = vec!["ClaimPolicy".into()];
        c
    });
    Store::create(&dir, &reg)?;
    Ok(Initialised {
        root_ca: dir.join("root-ca.pem"),
        claim_cert: dir.join("claim.pem"),
        claim_key: dir.join("claim.key"),
    })
}

/// A temporary claim as CreateProvisioningClaim returns it.
pub struct ProvisioningClaim {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub certificate_id: String,
    /// Unix seconds (AWS returns a timestamp).
    pub expiration: u64,
}

/// CreateProvisioningClaim: a claim certificate for one template, valid `ttl_secs`, absent from
/// `certs list`, whose implicit policy allows that template's topics only.
pub fn create_provisioning_claim(
    dir: &Path,
    template: &str,
    ttl_secs: u64,
) -> Result<ProvisioningClaim> {
    let store = open(dir)?;
    if store.read(|r| !r.templates.contains_key(template))? {
        bail!("template {template} does not exist");
    }
    let expires_ms = registry::now_ms() + ttl_secs * 1000;
    let (key, der) =
        load_ca(dir)?.issue_with_new_key("AWS IoT Provisioning Claim", Some(expires_ms / 1000))?;
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
        let mut c = registry::Certificate::new(&id, &pem, CertStatus::Active, "trusted-user claim");
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
    Ok(ProvisioningClaim {
        cert_path,
        key_path,
        certificate_id: id,
        expiration: expires_ms / 1000,
    })
}

/// A certificate issued by [`create_keys_and_certificate`].
pub struct IssuedCertificate {
    pub certificate_id: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// CreateKeysAndCertificate --set-as-active (for test "cloud applications"): an ACTIVE
/// certificate and key written to `out` with the extensions `.pem` and `.key`, optionally with an
/// existing policy and a thing (created if missing) attached.
pub fn create_keys_and_certificate(
    dir: &Path,
    out: &Path,
    policy: Option<&str>,
    thing: Option<&str>,
) -> Result<IssuedCertificate> {
    let store = open(dir)?;
    let (key, der) = load_ca(dir)?.issue_with_new_key("AWS IoT Certificate", None)?;
    let id = pki::cert_id(&der);
    let pem = pki::pem_encode("CERTIFICATE", &der);
    store.update(|r| {
        if let Some(p) = policy
            && !r.policies.contains_key(p)
        {
            bail!("policy {p} does not exist");
        }
        if let Some(t) = thing
            && !r.things.contains_key(t)
        {
            r.things.insert(
                t.to_owned(),
                registry::Thing {
                    thing_name: t.to_owned(),
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
                CertStatus::Active,
                "CreateKeysAndCertificate (control plane)",
            ),
        );
        if let Some(p) = policy {
            r.attach_policy(&id, p);
        }
        if let Some(t) = thing {
            r.attach_thing(&id, t);
        }
        Ok(())
    })?;
    let cert_path = out.with_extension("pem");
    let key_path = out.with_extension("key");
    std::fs::write(&cert_path, &pem)?;
    write_private(&key_path, &key.serialize_pem())?;
    Ok(IssuedCertificate {
        certificate_id: id,
        cert_path,
        key_path,
    })
}

/// The registries of bare names a template may refer to.
#[derive(Debug, Clone, Copy)]
pub enum NameKind {
    ThingType,
    ThingGroup,
    BillingGroup,
}

impl NameKind {
    fn what(self) -> &'static str {
        match self {
            Self::ThingType => "thing type",
            Self::ThingGroup => "thing group",
            Self::BillingGroup => "billing group",
        }
    }

    fn names(self, r: &mut Registry) -> &mut Vec<String> {
        match self {
            Self::ThingType => &mut r.thing_types,
            Self::ThingGroup => &mut r.thing_groups,
            Self::BillingGroup => &mut r.billing_groups,
        }
    }
}

/// CreateThingType, CreateThingGroup, CreateBillingGroup (idempotent). The name is checked before
/// the emulator directory is opened.
pub fn add_name(dir: &Path, kind: NameKind, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":_-".contains(c))
    {
        bail!(
            "invalid {} name {name:?}: 1-128 characters of [a-zA-Z0-9:_-]",
            kind.what()
        );
    }
    open(dir)?.update(|r| {
        let v = kind.names(r);
        if !v.iter().any(|n| n == name) {
            v.push(name.to_owned());
        }
        Ok::<_, anyhow::Error>(())
    })
}

/// The names of one kind, in creation order.
pub fn list_names(dir: &Path, kind: NameKind) -> Result<Vec<String>> {
    let mut r = open(dir)?.read(|r| r.clone())?;
    Ok(std::mem::take(kind.names(&mut r)))
}

/// UpdateProvisioningTemplate: enable or disable a template.
pub fn set_template_enabled(store: &Store, name: &str, enabled: bool) -> Result<()> {
    store.update(|r| {
        let t = r
            .templates
            .get_mut(name)
            .with_context(|| format!("template {name} does not exist"))?;
        t.enabled = enabled;
        Ok::<_, anyhow::Error>(())
    })
}

/// `things list`.
pub fn list_things(r: &Registry) -> Vec<registry::Thing> {
    r.things.values().cloned().collect()
}

/// `policies list`.
pub fn list_policies(r: &Registry) -> Vec<registry::Policy> {
    r.policies.values().cloned().collect()
}

/// `template list`.
pub fn list_templates(r: &Registry) -> Vec<ProvisioningTemplate> {
    r.templates.values().cloned().collect()
}

/// `ca list`.
pub fn list_ca_certificates(r: &Registry) -> Vec<registry::CaCertificate> {
    r.ca_certificates.values().cloned().collect()
}

/// Control-plane RegisterThing with the template body in the file `template` and `params`, a JSON
/// object of strings. Returns AWS's response.
pub fn register_thing(dir: &Path, template: &Path, params: &str) -> Result<Value> {
    let body = read_file(template)?;
    let params: BTreeMap<String, String> =
        serde_json::from_str(params).context("--params must be a JSON object of strings")?;
    let ca = load_ca(dir)?;
    provisioning::register_thing_control_plane(&open(dir)?, &ca, &body, &params)
        .map_err(|e| anyhow::anyhow!("{} ({}): {}", e.code, e.status, e.message))
}

/// What a bulk registration did; `results` names the file of per-line results.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkSummary {
    pub success_count: usize,
    pub failure_count: usize,
    pub results: String,
}

/// StartThingRegistrationTask: one JSON object of parameters per line of `input`; writes
/// `out/results.ndjson`, one result or error line per input line.
pub fn bulk_register(dir: &Path, template: &Path, input: &Path, out: &Path) -> Result<BulkSummary> {
    let body = read_file(template)?;
    let lines = read_file(input)?;
    std::fs::create_dir_all(out)?;
    let results = out.join("results.ndjson");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&results)?);
    let (ok, failed) =
        provisioning::bulk_register(&open(dir)?, &load_ca(dir)?, &body, &lines, &mut f)?;
    std::io::Write::flush(&mut f)?;
    Ok(BulkSummary {
        success_count: ok,
        failure_count: failed,
        results: results.display().to_string(),
    })
}

/// AWS: template names are 1-36 characters of `[0-9A-Za-z_-]`.
pub fn valid_template_name(name: &str) -> bool {
    (1..=36).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Add a template, or a new default version of an existing one. Returns the version id.
pub fn add_template(
    store: &Store,
    name: &str,
    body: &str,
    hook: Option<String>,
    enabled: bool,
) -> Result<u32> {
    if !valid_template_name(name) {
        bail!("invalid template name {name:?}: 1-36 characters of [0-9A-Za-z_-]");
    }
    crate::template::Template::parse(body).context("template body rejected")?;
    store.update(|r| {
        let now = registry::now_ms();
        match r.templates.get_mut(name) {
            None => {
                r.templates.insert(
                    name.to_owned(),
                    ProvisioningTemplate {
                        template_name: name.to_owned(),
                        enabled,
                        default_version_id: 1,
                        versions: vec![TemplateVersion {
                            version_id: 1,
                            template_body: body.to_owned(),
                            creation_date_ms: now,
                        }],
                        pre_provisioning_hook: hook,
                    },
                );
                Ok(1)
            }
            Some(t) => {
                if t.versions.len() >= MAX_TEMPLATE_VERSIONS {
                    bail!(
                        "VersionsLimitExceededException: template {name} already has {MAX_TEMPLATE_VERSIONS} versions"
                    );
                }
                let id = t.versions.iter().map(|v| v.version_id).max().unwrap_or(0) + 1;
                t.versions.push(TemplateVersion {
                    version_id: id,
                    template_body: body.to_owned(),
                    creation_date_ms: now,
                });
                t.default_version_id = id;
                t.enabled = enabled;
                if hook.is_some() {
                    t.pre_provisioning_hook = hook;
                }
                Ok(id)
            }
        }
    })
}

pub fn add_policy(store: &Store, name: &str, document: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 {
        bail!("invalid policy name {name:?}");
    }
    crate::policy::PolicyDocument::parse(document)
        .with_context(|| format!("policy {name} rejected"))?;
    store.update(|r| {
        if let Some(p) = r.policies.get(name)
            && p.policy_document != document
        {
            bail!("ResourceAlreadyExistsException: policy {name} exists with another document");
        }
        r.policies.insert(
            name.to_owned(),
            registry::Policy {
                policy_name: name.to_owned(),
                policy_document: document.to_owned(),
            },
        );
        Ok(())
    })
}

pub fn set_cert_status(store: &Store, id: &str, status: CertStatus) -> Result<()> {
    store.update(|r| {
        let c = r
            .certificates
            .get_mut(id)
            .with_context(|| format!("certificate {id} does not exist"))?;
        if c.status == CertStatus::Revoked && status != CertStatus::Revoked {
            bail!("certificate {id} is REVOKED; AWS does not reactivate revoked certificates");
        }
        c.status = status;
        Ok(())
    })
}

/// `certs list`: every certificate except temporary (trusted-user) claims, as AWS lists them.
pub fn list_certs(r: &Registry) -> Vec<Value> {
    r.certificates
        .values()
        .filter(|c| c.expires_ms.is_none())
        .map(|c| {
            json!({
                "certificateId": c.certificate_id,
                "status": c.status,
                "creationDateMs": c.creation_date_ms,
                "thingNames": c.thing_names,
                "policyNames": c.policy_names,
                "origin": c.origin,
            })
        })
        .collect()
}

/// Attach a thing (created if missing) and/or a policy to a certificate.
pub fn attach(store: &Store, id: &str, thing: Option<&str>, policy: Option<&str>) -> Result<()> {
    store.update(|r| {
        if !r.certificates.contains_key(id) {
            bail!("certificate {id} does not exist");
        }
        if let Some(p) = policy {
            if !r.policies.contains_key(p) {
                bail!("policy {p} does not exist");
            }
            r.attach_policy(id, p);
        }
        if let Some(t) = thing {
            r.things
                .entry(t.to_owned())
                .or_insert_with(|| registry::Thing {
                    thing_name: t.to_owned(),
                    version: 1,
                    ..Default::default()
                });
            r.attach_thing(id, t);
        }
        Ok(())
    })
}

/// RegisterCACertificate with auto-registration on (SNI_ONLY mode: no verification certificate).
pub fn register_ca(store: &Store, pem: &str, template: Option<String>) -> Result<String> {
    use x509_parser::prelude::*;
    let der =
        crate::pki::pem_decode(pem, "CERTIFICATE").context("CA file is not a PEM certificate")?;
    let (_, x) =
        parse_x509_certificate(&der).map_err(|e| anyhow::anyhow!("CA certificate: {e}"))?;
    if !x.is_ca() {
        bail!("certificate is not a CA (basicConstraints CA:TRUE missing)");
    }
    let id = crate::pki::cert_id(&der);
    store.update(|r| {
        if let Some(t) = &template
            && !r.templates.contains_key(t)
        {
            bail!("template {t} does not exist");
        }
        r.ca_certificates.insert(
            id.clone(),
            registry::CaCertificate {
                certificate_id: id.clone(),
                certificate_pem: pem.to_owned(),
                auto_registration: true,
                template_name: template,
            },
        );
        Ok(())
    })?;
    Ok(id)
}
