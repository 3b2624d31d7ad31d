//! Control-plane operations behind the command line (what AWS's console and CLI do).
//!
//! Owns: validation of operator input before it reaches the registry. No network.

use crate::registry::{
    self, CertStatus, MAX_TEMPLATE_VERSIONS, ProvisioningTemplate, Registry, Store, TemplateVersion,
};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

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
