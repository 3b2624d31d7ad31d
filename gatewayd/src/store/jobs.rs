//! Child provisioning jobs: one JSON record per child id (table `child_jobs`): the persisted
//! queue the provisioner works through. The record type belongs to
//! `crate::children::provision`. Like `children`, a database without the table reads as empty.

use redb::{ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

use super::{Store, StoreError};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("child_jobs");

impl Store {
    /// Writes durably: when this returns, the record survives a crash.
    pub fn save_job<T: Serialize>(&self, id: &str, record: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|source| StoreError::Decode {
            key: format!("child_jobs/{id}"),
            source,
        })?;
        self.write(|txn| {
            txn.open_table(JOBS)?.insert(id, bytes.as_slice())?;
            Ok(())
        })
    }

    /// Every job, sorted by child id.
    pub fn list_jobs<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StoreError> {
        let txn = self.read()?;
        let table = match txn.open_table(JOBS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let key = k.value().to_owned();
            let rec = serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode {
                key: format!("child_jobs/{key}"),
                source,
            })?;
            out.push((key, rec));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn jobs_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            assert!(s.list_jobs::<u32>().unwrap().is_empty());
            s.save_job("b", &2u32).unwrap();
            s.save_job("a", &1u32).unwrap();
            s.save_job("a", &3u32).unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        assert_eq!(
            s.list_jobs::<u32>().unwrap(),
            vec![("a".to_owned(), 3), ("b".to_owned(), 2)]
        );
    }
}
