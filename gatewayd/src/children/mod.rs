//! Children: the registry of devices allowed to connect to the local endpoint, and how each one
//! proves who it is (pinned certificateIds, a password hash). Records live in the store (table
//! `children`); a copy is kept in memory for the endpoint's lookups. Registration by hand
//! (`gatewayctl children add`) is here; discovery, admission and provisioning arrive with the
//! children issue.
//!
//! Admission (`admission`, pure), the provisioning queue and its worker (`provision`) and the
//! quota pacer (`pacer`) make each admitted child a thing of its own.
//!
//! Passwords are generated here (128 random bits, shown once) and kept only as PBKDF2-HMAC-SHA256
//! with a per-child random salt. Must not touch: the network, files outside the store.

pub mod admission;
pub mod pacer;
pub mod provision;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::identity::Subject;
use crate::store::{Store, StoreError};

/// PBKDF2 rounds for child passwords. A connect costs one derivation (tens of milliseconds of one
/// core: OpenSSL's PBKDF2-HMAC-SHA256 took 33 ms for 100,000 rounds on the development VM; ring's
/// was not timed separately); the front door bounds concurrent handshakes, so a password-guessing
/// flood costs at most that many derivations at once. OWASP's 600,000 would make every reconnect of a constrained device
/// cost ~0.25 s of a Pi core; the passwords are 128-bit random, not human, so the rounds only
/// need to slow a stolen-database attack on a value that cannot be guessed anyway.
pub const PBKDF2_ROUNDS: u32 = 100_000;

#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PasswordHash {
    pub iterations: u32,
    pub salt: String,
    pub hash: String,
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHash { .. }")
    }
}

impl PasswordHash {
    pub fn new(password: &[u8]) -> PasswordHash {
        let salt: [u8; 16] = rand::random();
        let mut out = [0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            NonZeroU32::new(PBKDF2_ROUNDS).unwrap_or(NonZeroU32::MIN),
            &salt,
            password,
            &mut out,
        );
        PasswordHash {
            iterations: PBKDF2_ROUNDS,
            salt: hex::encode(salt),
            hash: hex::encode(out),
        }
    }

    /// Constant-time comparison (ring).
    pub fn verify(&self, password: &[u8]) -> bool {
        let (Ok(salt), Ok(hash), Some(n)) = (
            hex::decode(&self.salt),
            hex::decode(&self.hash),
            NonZeroU32::new(self.iterations),
        ) else {
            return false;
        };
        ring::pbkdf2::verify(ring::pbkdf2::PBKDF2_HMAC_SHA256, n, &salt, password, &hash).is_ok()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChildRecord {
    /// certificateIds (SHA-256 of the DER, lowercase hex) this child may present, whoever issued
    /// them. A certificate from the local CA naming the child (CN) needs no pin.
    #[serde(default)]
    pub certificate_ids: Vec<String>,
    #[serde(default)]
    pub password: Option<PasswordHash>,
    pub added_unix: u64,
}

/// What `gatewayctl children list` shows (no secrets).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChildView {
    pub id: String,
    pub certificate_ids: Vec<String>,
    pub password: bool,
    pub added_unix: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    BadId(#[from] crate::identity::files::BadSubject),
    #[error("certificateId `{0}` is not 64 hex digits")]
    BadCertificateId(String),
    #[error("certificateId {id} is already pinned for child `{child}`")]
    CertificateInUse { id: String, child: String },
    #[error("child `{0}` is not registered")]
    Unknown(String),
    #[error("this id is already registered")]
    AlreadyRegistered(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How to register a child.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AddChild {
    pub id: String,
    #[serde(default)]
    pub certificate_id: Option<String>,
    /// Generate a password (replacing an earlier one) and return it once.
    #[serde(default)]
    pub password: bool,
}

#[derive(Clone)]
pub struct Registry {
    store: Store,
    cache: Arc<RwLock<BTreeMap<String, ChildRecord>>>,
    /// Changes are read-modify-write of one record: one at a time, so two concurrent ones for
    /// one id cannot both act on what they read (two announcements of one device both
    /// registered it, the second password silently replacing the first).
    writer: Arc<std::sync::Mutex<()>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    pub fn open(store: Store) -> Result<Registry, StoreError> {
        let all = store.list_children::<ChildRecord>()?;
        Ok(Registry {
            store,
            cache: Arc::new(RwLock::new(all.into_iter().collect())),
            writer: Arc::default(),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ChildRecord>> {
        self.cache.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<ChildRecord> {
        self.read().get(id).cloned()
    }

    /// The child that pinned `certificate_id`, if any.
    pub fn by_certificate(&self, certificate_id: &str) -> Option<String> {
        self.read()
            .iter()
            .find(|(_, r)| r.certificate_ids.iter().any(|c| c == certificate_id))
            .map(|(id, _)| id.clone())
    }

    /// Registers (or extends) a child durably; returns the new password when one was asked for.
    pub fn add(&self, req: &AddChild) -> Result<Option<String>, RegistryError> {
        let _one = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.add_locked(req)
    }

    /// Registers a child that is not registered yet (checked and written as one step).
    pub fn add_new(&self, req: &AddChild) -> Result<Option<String>, RegistryError> {
        let _one = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if self.get(&req.id).is_some() {
            return Err(RegistryError::AlreadyRegistered(req.id.clone()));
        }
        self.add_locked(req)
    }

    fn add_locked(&self, req: &AddChild) -> Result<Option<String>, RegistryError> {
        Subject::child(&req.id)?;
        let mut rec = self.get(&req.id).unwrap_or(ChildRecord {
            certificate_ids: Vec::new(),
            password: None,
            added_unix: crate::daemon::status::unix_now(),
        });
        if let Some(c) = &req.certificate_id {
            let c = c.to_ascii_lowercase();
            if c.len() != 64 || !c.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(RegistryError::BadCertificateId(c));
            }
            if let Some(other) = self.by_certificate(&c).filter(|o| *o != req.id) {
                return Err(RegistryError::CertificateInUse {
                    id: c,
                    child: other,
                });
            }
            if !rec.certificate_ids.contains(&c) {
                rec.certificate_ids.push(c);
            }
        }
        let password = req.password.then(|| {
            let p = hex::encode(rand::random::<[u8; 16]>());
            rec.password = Some(PasswordHash::new(p.as_bytes()));
            p
        });
        self.store.save_child(&req.id, &rec)?;
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.id.clone(), rec);
        Ok(password)
    }

    pub fn remove(&self, id: &str) -> Result<(), RegistryError> {
        let _one = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if !self.store.remove_child(id)? {
            return Err(RegistryError::Unknown(id.to_owned()));
        }
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(())
    }

    pub fn list(&self) -> Vec<ChildView> {
        self.read()
            .iter()
            .map(|(id, r)| ChildView {
                id: id.clone(),
                certificate_ids: r.certificate_ids.clone(),
                password: r.password.is_some(),
                added_unix: r.added_unix,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Two announcements of one device at once: exactly one registers it (both did, the second
    /// password replacing the first).
    #[test]
    fn only_one_of_two_concurrent_new_registrations_of_an_id_wins() {
        let d = tempfile::tempdir().unwrap();
        let reg = Registry::open(Store::open(d.path()).unwrap()).unwrap();
        for i in 0..50 {
            let id = format!("dev-{i}");
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let (reg, id, barrier) = (reg.clone(), id.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        reg.add_new(&AddChild {
                            id,
                            password: true,
                            ..Default::default()
                        })
                    })
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let won: Vec<&String> = results
                .iter()
                .filter_map(|r| r.as_ref().ok().and_then(|p| p.as_ref()))
                .collect();
            assert_eq!(won.len(), 1, "{id}: {results:?}");
            assert!(
                results
                    .iter()
                    .any(|r| matches!(r, Err(RegistryError::AlreadyRegistered(x)) if *x == id)),
                "{results:?}"
            );
            assert!(
                reg.get(&id)
                    .unwrap()
                    .password
                    .unwrap()
                    .verify(won[0].as_bytes())
            );
        }
    }

    #[test]
    fn password_is_shown_once_and_stored_hashed() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let reg = Registry::open(store.clone()).unwrap();
        let pw = reg
            .add(&AddChild {
                id: "c1".into(),
                password: true,
                ..Default::default()
            })
            .unwrap()
            .unwrap();
        let raw = store.list_children::<serde_json::Value>().unwrap();
        assert!(!raw[0].1.to_string().contains(&pw));
        let reg = Registry::open(store).unwrap();
        let h = reg.get("c1").unwrap().password.unwrap();
        assert!(h.verify(pw.as_bytes()));
        assert!(!h.verify(b"wrong"));
        assert_eq!(format!("{h:?}"), "PasswordHash { .. }");
    }

    #[test]
    fn certificate_pins_are_unique_and_ids_checked() {
        let d = tempfile::tempdir().unwrap();
        let reg = Registry::open(Store::open(d.path()).unwrap()).unwrap();
        let id = "ab".repeat(32);
        let add = |child: &str, c: &str| {
            reg.add(&AddChild {
                id: child.into(),
                certificate_id: Some(c.into()),
                password: false,
            })
        };
        add("c1", &id).unwrap();
        assert_eq!(reg.by_certificate(&id).as_deref(), Some("c1"));
        assert!(matches!(
            add("c2", &id),
            Err(RegistryError::CertificateInUse { .. })
        ));
        assert!(matches!(
            add("c2", "xyz"),
            Err(RegistryError::BadCertificateId(_))
        ));
        assert!(matches!(add("../x", &id), Err(RegistryError::BadId(_))));
        reg.remove("c1").unwrap();
        assert!(matches!(reg.remove("c1"), Err(RegistryError::Unknown(_))));
        assert!(reg.list().is_empty());
    }
}
