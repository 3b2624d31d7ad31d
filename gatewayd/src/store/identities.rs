//! Identity records: one JSON record per subject (`"gateway"`, `"child:<id>"`, …). Subject
//! strings are opaque keys here; the identity module validates them.

use redb::ReadableTable;
use serde::{Serialize, de::DeserializeOwned};

use super::{IDENTITIES, Store, StoreError};

impl Store {
    /// Reads the identity record of `subject`.
    pub fn load_identity<T: DeserializeOwned>(
        &self,
        subject: &str,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(IDENTITIES)?;
        let Some(bytes) = table.get(subject)? else {
            return Ok(None);
        };
        serde_json::from_slice(bytes.value())
            .map(Some)
            .map_err(|source| StoreError::Decode {
                key: subject.to_owned(),
                source,
            })
    }

    /// Writes durably: when this returns, the record survives a crash.
    pub fn save_identity<T: Serialize>(&self, subject: &str, record: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|source| StoreError::Decode {
            key: subject.to_owned(),
            source,
        })?;
        self.write(|txn| {
            txn.open_table(IDENTITIES)?
                .insert(subject, bytes.as_slice())?;
            Ok(())
        })
    }

    /// Removes durably: when this returns, the record stays gone after a crash. Removing a
    /// subject that has no record is not an error.
    pub fn remove_identity(&self, subject: &str) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(IDENTITIES)?.remove(subject)?;
            Ok(())
        })
    }

    /// All subjects that have an identity record, sorted (byte order of the UTF-8 key).
    pub fn list_identities(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(IDENTITIES)?;
        let mut subjects = Vec::new();
        for entry in table.iter()? {
            let (key, _) = entry?;
            subjects.push(key.value().to_owned());
        }
        Ok(subjects)
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
    fn an_undecodable_record_names_its_subject() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        s.save_identity("child:x", &"text").unwrap();
        let e = s.load_identity::<u32>("child:x").unwrap_err();
        assert!(
            matches!(&e, StoreError::Decode { key, .. } if key == "child:x"),
            "{e}"
        );
        assert!(!e.is_transient());
    }
}
