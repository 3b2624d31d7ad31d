//! Store: the daemon's on-disk state (sled), behind this one module.
//!
//! Owns the database handle, the tree layout and the schema version. Every write that the outside
//! world will act on is flushed (fsync) before this module returns: sled 0.34 otherwise keeps
//! writes in memory for up to 500 ms and loses them on a crash (see NOTES.md). Nothing else in the
//! crate names sled, so the engine can be swapped if crash tests ever say so.

use std::path::Path;

use serde::{Serialize, de::DeserializeOwned};

/// Bumped whenever a stored record changes incompatibly.
pub const SCHEMA_VERSION: u32 = 1;

const META: &str = "meta";
const IDENTITIES: &str = "identities";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database: {0}")]
    Db(#[from] sled::Error),
    #[error("state database record `{key}` is unreadable: {source}")]
    Decode {
        key: String,
        source: serde_json::Error,
    },
    #[error(
        "state database has schema version {found}, this gatewayd understands {SCHEMA_VERSION}; \
         restore a matching gatewayd or move the state directory aside"
    )]
    Schema { found: u32 },
    #[error("state database key {key:?} is not UTF-8")]
    Key { key: String },
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Db(sled::Error::Io(_)))
    }
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    identities: sled::Tree,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) `dir/db`, checking the schema version.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir.join("db"))
            // A gateway has little memory; the default cache is 1 GiB.
            .cache_capacity(8 * 1024 * 1024)
            .open()?;
        let meta = db.open_tree(META)?;
        match meta.get("schema_version")? {
            Some(v) => {
                let found = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse::<u32>().ok())
                    .unwrap_or(0);
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema { found });
                }
            }
            None => {
                meta.insert("schema_version", SCHEMA_VERSION.to_string().as_bytes())?;
                db.flush()?;
            }
        }
        let identities = db.open_tree(IDENTITIES)?;
        Ok(Store { db, identities })
    }

    /// Reads the identity record of `subject` ("gateway", later one per child).
    pub fn load_identity<T: DeserializeOwned>(
        &self,
        subject: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.identities.get(subject)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StoreError::Decode {
                        key: subject.to_owned(),
                        source,
                    })
            }
        }
    }

    /// Writes and flushes: when this returns, the record survives a crash.
    pub fn save_identity<T: Serialize>(&self, subject: &str, record: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|source| StoreError::Decode {
            key: subject.to_owned(),
            source,
        })?;
        self.identities.insert(subject, bytes)?;
        self.db.flush()?;
        Ok(())
    }

    /// All subjects that have an identity record, sorted.
    pub fn list_identities(&self) -> Result<Vec<String>, StoreError> {
        self.identities
            .iter()
            .keys()
            .map(|key| {
                let key = key?;
                String::from_utf8(key.to_vec()).map_err(|_| StoreError::Key {
                    key: String::from_utf8_lossy(&key).into_owned(),
                })
            })
            .collect()
    }

    /// Removes and flushes: when this returns, the record stays gone after a crash. Removing a
    /// subject that has no record is not an error.
    pub fn remove_identity(&self, subject: &str) -> Result<(), StoreError> {
        self.identities.remove(subject)?;
        self.db.flush()?;
        Ok(())
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn roundtrip_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            assert_eq!(s.load_identity::<Vec<u32>>("gateway").unwrap(), None);
            s.save_identity("gateway", &vec![1u32, 2]).unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        assert_eq!(
            s.load_identity::<Vec<u32>>("gateway").unwrap(),
            Some(vec![1, 2])
        );
    }

    #[test]
    fn lists_sorted_and_removes_durably() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            assert_eq!(s.list_identities().unwrap(), Vec::<String>::new());
            for subject in ["gateway", "child:b", "child:a", "child:10"] {
                s.save_identity(subject, &subject.len()).unwrap();
            }
            s.save_identity("child:a", &99u32).unwrap();
            assert_eq!(
                s.list_identities().unwrap(),
                ["child:10", "child:a", "child:b", "gateway"]
            );
            s.remove_identity("child:b").unwrap();
            s.remove_identity("child:never").unwrap();
            assert_eq!(s.load_identity::<u32>("child:b").unwrap(), None);
        }
        let s = Store::open(d.path()).unwrap();
        assert_eq!(
            s.list_identities().unwrap(),
            ["child:10", "child:a", "gateway"]
        );
        assert_eq!(s.load_identity::<u32>("child:a").unwrap(), Some(99));
        assert_eq!(s.load_identity::<u32>("child:b").unwrap(), None);
    }

    #[test]
    fn refuses_other_schema() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            s.db.open_tree(META)
                .unwrap()
                .insert("schema_version", "99")
                .unwrap();
            s.flush().unwrap();
        }
        let e = Store::open(d.path()).unwrap_err();
        assert!(matches!(e, StoreError::Schema { found: 99 }), "{e}");
    }
}
