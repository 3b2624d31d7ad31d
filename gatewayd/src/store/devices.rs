//! Which device each plugin-found child is: one JSON record per child id (table
//! `child_devices`), written by discovery and read by telemetry so polling resumes after a
//! restart without a scan. Kept apart from the provisioning job: a job's fields go to
//! RegisterThing, these never leave the gateway. The record type belongs to `crate::telemetry`;
//! here it is an opaque serde value. Added after schema 1 shipped: a database without the table
//! reads as empty, and the first write creates it.

use redb::TableDefinition;
use serde::{Serialize, de::DeserializeOwned};

use super::{Store, StoreError};

const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("child_devices");

impl Store {
    /// Writes durably: when this returns, the record survives a crash.
    pub fn save_device<T: Serialize>(&self, child: &str, record: &T) -> Result<(), StoreError> {
        self.save_record(DEVICES, child, record)
    }

    /// Every device record, sorted by child id.
    pub fn list_devices<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StoreError> {
        self.list_records(DEVICES)
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
            assert!(s.list_devices::<String>().unwrap().is_empty());
            s.save_device("m-2", &"b".to_owned()).unwrap();
            s.save_device("m-1", &"a".to_owned()).unwrap();
            s.save_device("m-2", &"c".to_owned()).unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        assert_eq!(
            s.list_devices::<String>().unwrap(),
            vec![("m-1".into(), "a".into()), ("m-2".into(), "c".into())]
        );
    }
}
