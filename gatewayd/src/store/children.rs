//! Children registry records: one JSON record per child id (table `children`). The record type
//! and its meaning belong to `crate::children`; here it is an opaque serde value. The table was
//! added after schema 1 shipped: a database without it reads as an empty registry, and the first
//! write creates it (redb creates a table when a write transaction opens it).

use redb::{ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

use super::{Store, StoreError};

const CHILDREN: TableDefinition<&str, &[u8]> = TableDefinition::new("children");

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        key: format!("children/{key}"),
        source,
    })
}

impl Store {
    /// Writes durably: when this returns, the record survives a crash.
    pub fn save_child<T: Serialize>(&self, id: &str, record: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|source| StoreError::Decode {
            key: format!("children/{id}"),
            source,
        })?;
        self.write(|txn| {
            txn.open_table(CHILDREN)?.insert(id, bytes.as_slice())?;
            Ok(())
        })
    }

    /// Removes durably; true when there was a record.
    pub fn remove_child(&self, id: &str) -> Result<bool, StoreError> {
        self.write(|txn| Ok(txn.open_table(CHILDREN)?.remove(id)?.is_some()))
    }

    /// Every child record, sorted by id.
    pub fn list_children<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StoreError> {
        let txn = self.read()?;
        let table = match txn.open_table(CHILDREN) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let key = k.value().to_owned();
            let rec = decode(&key, v.value())?;
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
