//! The emulator's persistent registry: certificates, things, thing types and groups, policies,
//! provisioning templates, ownership tokens.
//!
//! Owns: the file `registry.json` in the emulator directory. Every change goes through
//! [`Store::update`], which takes an exclusive lock on `registry.lock`, reloads the file if another
//! process (a CLI command while `serve` runs) changed it, applies the change and writes the file
//! atomically (temp file, fsync, rename). Reads go through [`Store::read`]. No network, no MQTT.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const REGION: &str = "us-east-1";
pub const ACCOUNT: &str = "123456789012";

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertStatus {
    Active,
    Inactive,
    PendingActivation,
    Revoked,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Certificate {
    pub certificate_id: String,
    pub certificate_pem: String,
    pub status: CertStatus,
    pub creation_date_ms: u64,
    #[serde(default)]
    pub policy_names: Vec<String>,
    #[serde(default)]
    pub thing_names: Vec<String>,
    /// How it came to exist: "claim", "CreateKeysAndCertificate", "CreateCertificateFromCsr", ...
    #[serde(default)]
    pub origin: String,
    /// Temporary (trusted-user) claims expire and are absent from `certs list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// A temporary claim's provisioning window, counted from when it connects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_window_ms: Option<u64>,
    /// The policy a temporary claim carries implicitly (not in `policies list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub implicit_policy: Option<String>,
    /// certificateId of the registered CA that signed it (JITP/JITR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaCertificate {
    pub certificate_id: String,
    pub certificate_pem: String,
    pub auto_registration: bool,
    /// JITP template; without one, a new device certificate goes the JITR way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_name: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Thing {
    pub thing_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thing_type_name: Option<String>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub thing_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing_group: Option<String>,
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub version: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub policy_name: String,
    pub policy_document: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateVersion {
    pub version_id: u32,
    pub template_body: String,
    pub creation_date_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningTemplate {
    pub template_name: String,
    pub enabled: bool,
    pub default_version_id: u32,
    pub versions: Vec<TemplateVersion>,
    /// Shell command standing in for the pre-provisioning hook Lambda.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_provisioning_hook: Option<String>,
}

impl ProvisioningTemplate {
    pub fn default_body(&self) -> Option<&str> {
        self.versions
            .iter()
            .find(|v| v.version_id == self.default_version_id)
            .map(|v| v.template_body.as_str())
    }
    pub fn arn(&self) -> String {
        format!(
            "arn:aws:iot:{REGION}:{ACCOUNT}:provisioningtemplate/{}",
            self.template_name
        )
    }
}

/// AWS keeps at most five versions of a template.
pub const MAX_TEMPLATE_VERSIONS: usize = 5;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnershipToken {
    pub certificate_id: String,
    /// certificateId of the principal (claim) that asked for the certificate.
    pub principal: String,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registry {
    #[serde(default)]
    pub certificates: BTreeMap<String, Certificate>,
    #[serde(default)]
    pub things: BTreeMap<String, Thing>,
    #[serde(default)]
    pub thing_types: Vec<String>,
    #[serde(default)]
    pub thing_groups: Vec<String>,
    #[serde(default)]
    pub billing_groups: Vec<String>,
    #[serde(default)]
    pub policies: BTreeMap<String, Policy>,
    #[serde(default)]
    pub templates: BTreeMap<String, ProvisioningTemplate>,
    #[serde(default)]
    pub tokens: BTreeMap<String, OwnershipToken>,
    #[serde(default)]
    pub ca_certificates: BTreeMap<String, CaCertificate>,
    /// Tokens that expired unused (token -> expiry), kept a day so a late RegisterThing is told
    /// "expired" rather than "invalid".
    #[serde(default)]
    pub expired_tokens: BTreeMap<String, u64>,
    /// Certificates issued but never registered, deleted when their token expired.
    #[serde(default)]
    pub orphaned_certificates: Vec<String>,
}

impl Certificate {
    /// A new certificate record with no attachments.
    pub fn new(id: &str, pem: &str, status: CertStatus, origin: &str) -> Certificate {
        Certificate {
            certificate_id: id.to_owned(),
            certificate_pem: pem.to_owned(),
            status,
            creation_date_ms: now_ms(),
            policy_names: vec![],
            thing_names: vec![],
            origin: origin.to_owned(),
            expires_ms: None,
            claim_window_ms: None,
            implicit_policy: None,
            ca_certificate_id: None,
        }
    }
}

impl Registry {
    /// AWS deletes a certificate whose ownership token expired before RegisterThing, and
    /// temporary claim certificates after their five minutes.
    pub fn sweep(&mut self, now: u64) -> bool {
        let mut changed = false;
        let expired: Vec<String> = self
            .tokens
            .iter()
            .filter(|(_, t)| t.expires_ms <= now)
            .map(|(k, _)| k.clone())
            .collect();
        const DAY_MS: u64 = 86_400_000;
        let before_expired = self.expired_tokens.len();
        self.expired_tokens.retain(|_, at| *at + DAY_MS > now);
        changed |= before_expired != self.expired_tokens.len();
        for tok in expired {
            changed = true;
            if let Some(t) = self.tokens.remove(&tok)
                && self.expired_tokens.insert(tok, t.expires_ms).is_none()
                && let Some(c) = self.certificates.get(&t.certificate_id)
                && c.status == CertStatus::PendingActivation
                && c.thing_names.is_empty()
                && c.policy_names.is_empty()
            {
                self.certificates.remove(&t.certificate_id);
                self.orphaned_certificates.push(t.certificate_id);
            }
        }
        let before = self.certificates.len();
        self.certificates
            .retain(|_, c| c.expires_ms.is_none_or(|e| e > now));
        changed || before != self.certificates.len()
    }

    /// Policies attached to a certificate, parsed.
    pub fn policies_of(&self, cert_id: &str) -> Vec<crate::policy::PolicyDocument> {
        let Some(c) = self.certificates.get(cert_id) else {
            return Vec::new();
        };
        c.policy_names
            .iter()
            .filter_map(|n| self.policies.get(n).map(|p| p.policy_document.as_str()))
            .chain(c.implicit_policy.as_deref())
            .filter_map(|doc| crate::policy::PolicyDocument::parse(doc).ok())
            .collect()
    }

    pub fn attach_policy(&mut self, cert_id: &str, policy: &str) {
        if let Some(c) = self.certificates.get_mut(cert_id)
            && !c.policy_names.iter().any(|p| p == policy)
        {
            c.policy_names.push(policy.to_owned());
        }
    }

    pub fn attach_thing(&mut self, cert_id: &str, thing: &str) {
        if let Some(c) = self.certificates.get_mut(cert_id)
            && !c.thing_names.iter().any(|p| p == thing)
        {
            c.thing_names.push(thing.to_owned());
        }
        if let Some(t) = self.things.get_mut(thing)
            && !t.principals.iter().any(|p| p == cert_id)
        {
            t.principals.push(cert_id.to_owned());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt registry: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0} does not hold an emulator (run `iotcore-sim init --dir DIR` first)")]
    NotInitialised(PathBuf),
}

/// Identity of the file on disk, to notice writes by other processes.
type Stamp = Option<(u64, i128)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.ino(),
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    ))
}

pub struct Store {
    dir: PathBuf,
    cache: Mutex<(Stamp, Registry)>,
    /// Bumped each time the registry changes (here or in another process, once noticed).
    generation: std::sync::atomic::AtomicU64,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("registry.json");
        if !path.exists() {
            return Err(StoreError::NotInitialised(dir.to_owned()));
        }
        let s = Store {
            dir: dir.to_owned(),
            cache: Mutex::new((None, Registry::default())),
            generation: std::sync::atomic::AtomicU64::new(0),
        };
        s.read(|_| ())?;
        Ok(s)
    }

    /// Create an empty registry file.
    pub fn create(dir: &Path, reg: &Registry) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
        write_atomic(&dir.join("registry.json"), reg)?;
        Store::open(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self) -> PathBuf {
        self.dir.join("registry.json")
    }

    fn lock(&self) -> Result<File, StoreError> {
        let p = self.dir.join("registry.lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|source| StoreError::Io {
                path: p.clone(),
                source,
            })?;
        f.lock()
            .map_err(|source| StoreError::Io { path: p, source })?;
        Ok(f)
    }

    fn refresh(&self, cache: &mut (Stamp, Registry)) -> Result<(), StoreError> {
        let path = self.path();
        let st = stamp(&path);
        if st.is_some() && st == cache.0 {
            return Ok(());
        }
        let text = std::fs::read_to_string(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        let reg: Registry =
            serde_json::from_str(&text).map_err(|source| StoreError::Corrupt { path, source })?;
        *cache = (st, reg);
        self.bump();
        Ok(())
    }

    fn bump(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Changes whenever the registry changed; call [`Store::read`] first to notice writes by
    /// other processes.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Read a consistent view of the registry (as of now, expired items swept in the view).
    pub fn read<T>(&self, f: impl FnOnce(&Registry) -> T) -> Result<T, StoreError> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(&mut cache)?;
        let now = now_ms();
        let needs_sweep = cache.1.tokens.values().any(|t| t.expires_ms <= now)
            || cache
                .1
                .certificates
                .values()
                .any(|c| c.expires_ms.is_some_and(|e| e <= now));
        if needs_sweep {
            let mut view = cache.1.clone();
            view.sweep(now);
            return Ok(f(&view));
        }
        Ok(f(&cache.1))
    }

    /// Apply a change atomically. The closure's error aborts the change (nothing is written).
    pub fn update<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut Registry) -> Result<T, E>,
    ) -> Result<T, E> {
        // The file lock first: waiting for another process (a CLI command) must not hold the
        // in-process cache, which every CONNECT reads.
        let _lock = self.lock()?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(&mut cache)?;
        let mut next = cache.1.clone();
        next.sweep(now_ms());
        let out = f(&mut next)?;
        let path = self.path();
        write_atomic(&path, &next)?;
        *cache = (stamp(&path), next);
        self.bump();
        Ok(out)
    }
}

fn write_atomic(path: &Path, reg: &Registry) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(reg).map_err(|e| io(std::io::Error::other(e)))?;
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(&text).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(parent) = path.parent()
        && let Ok(d) = File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cert(id: &str, status: CertStatus) -> Certificate {
        Certificate::new(id, "", status, "")
    }

    #[test]
    fn sweep_deletes_unregistered_certs_of_expired_tokens_only() {
        let mut r = Registry::default();
        r.certificates
            .insert("a".into(), cert("a", CertStatus::PendingActivation));
        r.certificates
            .insert("b".into(), cert("b", CertStatus::Active));
        for (tok, id) in [("t1", "a"), ("t2", "b")] {
            r.tokens.insert(
                tok.into(),
                OwnershipToken {
                    certificate_id: id.into(),
                    principal: "claim".into(),
                    expires_ms: 10,
                },
            );
        }
        assert!(r.sweep(11));
        assert!(!r.certificates.contains_key("a"));
        assert!(r.certificates.contains_key("b"));
        assert_eq!(r.orphaned_certificates, vec!["a".to_string()]);
        assert!(r.tokens.is_empty());
    }

    #[test]
    fn another_process_write_is_seen() {
        let d = tempfile::tempdir().unwrap();
        let a = Store::create(d.path(), &Registry::default()).unwrap();
        let b = Store::open(d.path()).unwrap();
        b.update(|r| {
            r.thing_types.push("Meter".into());
            Ok::<_, StoreError>(())
        })
        .unwrap();
        assert_eq!(a.read(|r| r.thing_types.clone()).unwrap(), vec!["Meter"]);
        // A failed update writes nothing.
        let e: Result<(), StoreError> = a.update(|r| {
            r.thing_types.clear();
            Err(StoreError::NotInitialised(PathBuf::new()))
        });
        assert!(e.is_err());
        assert_eq!(b.read(|r| r.thing_types.len()).unwrap(), 1);
    }
}
