//! Store: the daemon's on-disk state (redb), behind this one module.
//!
//! Owns the database file, the table layout and the schema version. Every write is one redb
//! transaction committed with `Durability::Immediate` (redb's default): when a store call returns,
//! the change survives a crash, with no separate flush to forget. The engine was chosen with a
//! crash harness (`examples/store-torture.rs`, `tests/slow/store-crash`); see NOTES.md. Nothing
//! else in the crate names redb.
//!
//! Layout: one file `<state_dir>/state.redb`; table `meta` (`schema_version`), table
//! `identities` (subject → JSON record, `identities.rs`), table `children` (child id → JSON
//! registry record, `children.rs`), table `child_jobs` (child id → JSON provisioning job,
//! `jobs.rs`), table `child_devices` (child id → JSON device binding, `devices.rs`), table `downlink`
//! (`<child>\n<seq>` → JSON pending cloud command, `downlink.rs`).

mod children;
mod devices;
mod downlink;
mod identities;
mod jobs;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{ReadableDatabase, TableDefinition};

/// Bumped whenever a stored record changes incompatibly.
pub const SCHEMA_VERSION: u32 = 1;

/// Database file inside the state directory.
const FILE: &str = "state.redb";
/// A database being created; renamed to `FILE` once whole.
const TMP_FILE: &str = "state.redb.new";
/// Directory of the sled database of earlier gatewayd builds.
const LEGACY_SLED_DIR: &str = "db";
/// Bound on redb's page cache (its default is 1 GiB); the state is a few MiB at most.
const CACHE_BYTES: usize = 8 * 1024 * 1024;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const IDENTITIES: TableDefinition<&str, &[u8]> = TableDefinition::new("identities");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database: {0}")]
    Db(#[from] redb::Error),
    #[error("state database {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
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
    #[error(
        "{} holds the state database of an earlier gatewayd (sled), which this gatewayd cannot \
         read; restore the earlier gatewayd, or move that directory aside to provision afresh",
        path.display()
    )]
    Legacy { path: PathBuf },
}

impl StoreError {
    /// I/O errors, and a database still held by another process (a previous gatewayd that has
    /// not exited yet), may pass; everything else needs a person, including a file that is not
    /// a database (redb reports it as I/O `InvalidData`).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Io { .. } => true,
            StoreError::Db(redb::Error::Io(e)) => e.kind() != std::io::ErrorKind::InvalidData,
            StoreError::Db(redb::Error::DatabaseAlreadyOpen) => true,
            _ => false,
        }
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[derive(Clone)]
pub struct Store {
    db: Arc<redb::Database>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) `dir/state.redb`, checking the schema version. After a crash, redb
    /// checks the last commit and rebuilds its allocator state here (milliseconds at our sizes).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        // Starting empty beside an earlier gatewayd's database would provision a second identity.
        let legacy = dir.join(LEGACY_SLED_DIR);
        if legacy.is_dir() {
            return Err(StoreError::Legacy { path: legacy });
        }
        let path = dir.join(FILE);
        if !path.exists() {
            create(dir, &path)?;
        }
        // `open`, never `create`: the file is whole or absent (see `create`).
        let db = builder().open(&path)?;
        let found = {
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            let v = meta.get("schema_version")?;
            v.and_then(|v| std::str::from_utf8(v.value()).ok()?.parse::<u32>().ok())
        };
        if found != Some(SCHEMA_VERSION) {
            return Err(StoreError::Schema {
                found: found.unwrap_or(0),
            });
        }
        Ok(Store { db: Arc::new(db) })
    }

    /// Every write is durable when it returns, so there is nothing to flush; kept so that callers
    /// (the final flush at shutdown) need not know the engine.
    pub fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Runs `f` in one write transaction and commits it durably.
    fn write<R>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let txn = self.db.begin_write()?;
        let r = f(&txn)?;
        txn.commit()?;
        Ok(r)
    }

    /// One JSON record per id in table `name`, written durably (the registry's, the
    /// provisioning jobs' and the device bindings' tables).
    fn save_record<T: serde::Serialize>(
        &self,
        table: redb::TableDefinition<&str, &[u8]>,
        id: &str,
        record: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|source| StoreError::Decode {
            key: format!("{}/{id}", redb::TableHandle::name(&table)),
            source,
        })?;
        self.write(|txn| {
            txn.open_table(table)?.insert(id, bytes.as_slice())?;
            Ok(())
        })
    }

    /// Every record of table `name`, sorted by id; a database without the table (older than
    /// it) reads as empty.
    fn list_records<T: serde::de::DeserializeOwned>(
        &self,
        table: redb::TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(String, T)>, StoreError> {
        use redb::ReadableTable;
        let txn = self.read()?;
        let t = match txn.open_table(table) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            let key = k.value().to_owned();
            let rec = serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode {
                key: format!("{}/{key}", redb::TableHandle::name(&table)),
                source,
            })?;
            out.push((key, rec));
        }
        Ok(out)
    }

    fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        Ok(self.db.begin_read()?)
    }
}

fn builder() -> redb::Builder {
    let mut b = redb::Builder::new();
    b.set_cache_size(CACHE_BYTES);
    b
}

/// Creates an initialised database at `path`. redb initialises a new file in steps (size, header,
/// magic number, each synced); a crash between them leaves a file that no later open accepts
/// ("Not a redb database: magic number mismatch", found by the crash harness; see NOTES.md). So
/// the database is made whole under a temporary name, synced, and renamed into place, like the
/// identity files. A later schema that adds a table creates it here and in its migration.
fn create(dir: &Path, path: &Path) -> Result<(), StoreError> {
    let tmp = dir.join(TMP_FILE);
    let io = |source| StoreError::Io {
        path: tmp.clone(),
        source,
    };
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    {
        let db = builder().create(&tmp)?;
        let txn = db.begin_write()?;
        txn.open_table(META)?
            .insert("schema_version", SCHEMA_VERSION.to_string().as_bytes())?;
        // Every table exists from here on, so readers never meet a missing one.
        txn.open_table(IDENTITIES)?;
        txn.commit()?;
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn refuses_other_schema() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            s.write(|txn| {
                txn.open_table(META)?
                    .insert("schema_version", b"99".as_slice())?;
                Ok(())
            })
            .unwrap();
        }
        let e = Store::open(d.path()).unwrap_err();
        assert!(matches!(e, StoreError::Schema { found: 99 }), "{e}");
        assert!(!e.is_transient());
        // The refusal changed nothing.
        let e = Store::open(d.path()).unwrap_err();
        assert!(matches!(e, StoreError::Schema { found: 99 }), "{e}");
    }

    #[test]
    fn refuses_an_earlier_sled_database() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("db")).unwrap();
        std::fs::write(d.path().join("db/conf"), "segment_size: 524288\n").unwrap();
        let e = Store::open(d.path()).unwrap_err();
        assert!(matches!(e, StoreError::Legacy { .. }), "{e}");
        assert!(!e.is_transient());
        assert!(!d.path().join(FILE).exists());
    }

    #[test]
    fn a_creation_cut_short_is_started_again() {
        let d = tempfile::tempdir().unwrap();
        // What a kill during redb's initialisation leaves: sized, no magic number.
        std::fs::write(d.path().join(TMP_FILE), vec![0u8; 73728]).unwrap();
        let s = Store::open(d.path()).unwrap();
        s.save_identity("gateway", &1u32).unwrap();
        drop(s);
        assert!(!d.path().join(TMP_FILE).exists());
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.load_identity::<u32>("gateway").unwrap(), Some(1));
    }

    #[test]
    fn a_file_that_is_no_database_is_permanent() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(FILE), vec![0u8; 73728]).unwrap();
        let e = Store::open(d.path()).unwrap_err();
        assert!(!e.is_transient(), "{e}");
    }

    #[test]
    fn a_database_held_elsewhere_is_transient() {
        let d = tempfile::tempdir().unwrap();
        let _held = Store::open(d.path()).unwrap();
        let e = Store::open(d.path()).unwrap_err();
        assert!(e.is_transient(), "{e}");
    }
}
