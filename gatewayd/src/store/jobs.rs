//! Child provisioning jobs: one JSON record per child id (table `child_jobs`): the persisted
//! queue the provisioner works through. The record type belongs to
//! `crate::children::provision`. Like `children`, a database without the table reads as empty.

use redb::TableDefinition;
use serde::{Serialize, de::DeserializeOwned};

use super::{Store, StoreError};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("child_jobs");

impl Store {
    /// Writes durably: when this returns, the record survives a crash.
    pub fn save_job<T: Serialize>(&self, id: &str, record: &T) -> Result<(), StoreError> {
        self.save_record(JOBS, id, record)
    }

    /// Every job, sorted by child id.
    pub fn list_jobs<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StoreError> {
        self.list_records(JOBS)
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
