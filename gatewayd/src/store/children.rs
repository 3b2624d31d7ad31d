//! Children registry records: one JSON record per child id (table `children`). The record type
//! and its meaning belong to `crate::children`; here it is an opaque serde value. The table was
//! added after schema 1 shipped: a database without it reads as an empty registry, and the first
//! write creates it (redb creates a table when a write transaction opens it).

use redb::TableDefinition;
use serde::{Serialize, de::DeserializeOwned};

use super::{Store, StoreError};

const CHILDREN: TableDefinition<&str, &[u8]> = TableDefinition::new("children");

impl Store {
    /// Writes durably: when this returns, the record survives a crash.
    pub fn save_child<T: Serialize>(&self, id: &str, record: &T) -> Result<(), StoreError> {
        self.save_record(CHILDREN, id, record)
    }

    /// Removes durably; true when there was a record.
    pub fn remove_child(&self, id: &str) -> Result<bool, StoreError> {
        self.write(|txn| Ok(txn.open_table(CHILDREN)?.remove(id)?.is_some()))
    }

    /// Every child record, sorted by id.
    pub fn list_children<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StoreError> {
        self.list_records(CHILDREN)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_old_database_reads_as_empty_and_records_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            assert!(s.list_children::<u32>().unwrap().is_empty());
            s.save_child("b", &2u32).unwrap();
            s.save_child("a", &1u32).unwrap();
            assert!(s.remove_child("b").unwrap());
            assert!(!s.remove_child("never").unwrap());
        }
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.list_children::<u32>().unwrap(), vec![("a".to_owned(), 1)]);
    }
}
