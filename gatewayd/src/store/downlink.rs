//! Pending cloud commands (table `downlink`): one JSON record per queued command, keyed
//! `<child>\n<seq, 20 digits>` so that a child's commands sort in arrival order. Written durably
//! before the cloud's message is acknowledged, removed when the child has it (or it expired).
//! The record type belongs to `crate::bridge::downlink`; here it is an opaque serde value. Added
//! after schema 1 shipped: a database without the table reads as empty.

use redb::TableDefinition;
use serde::{Serialize, de::DeserializeOwned};

use super::{Store, StoreError};

const DOWNLINK: TableDefinition<&str, &[u8]> = TableDefinition::new("downlink");

fn key(child: &str, seq: u64) -> String {
    format!("{child}\n{seq:020}")
}

impl Store {
    /// Writes durably: when this returns, the command survives a crash.
    pub fn save_command<T: Serialize>(
        &self,
        child: &str,
        seq: u64,
        record: &T,
    ) -> Result<(), StoreError> {
        self.save_record(DOWNLINK, &key(child, seq), record)
    }

    /// Every queued command as (child, seq, record), in child then seq order. A key that is not
    /// ours is skipped.
    pub fn list_commands<T: DeserializeOwned>(&self) -> Result<Vec<(String, u64, T)>, StoreError> {
        Ok(self
            .list_records::<T>(DOWNLINK)?
            .into_iter()
            .filter_map(|(k, v)| {
                let (child, seq) = k.split_once('\n')?;
                Some((child.to_owned(), seq.parse().ok()?, v))
            })
            .collect())
    }

    /// Removes the given commands in one durable transaction (absent ones are ignored).
    pub fn remove_commands(&self, which: &[(&str, u64)]) -> Result<(), StoreError> {
        if which.is_empty() {
            return Ok(());
        }
        self.write(|txn| {
            let mut t = txn.open_table(DOWNLINK)?;
            for (child, seq) in which {
                t.remove(key(child, *seq).as_str())?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn commands_keep_their_order_per_child_and_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            assert!(s.list_commands::<String>().unwrap().is_empty());
            s.save_command("c2", 3, &"c2-a".to_owned()).unwrap();
            s.save_command("c1", 10, &"c1-b".to_owned()).unwrap();
            s.save_command("c1", 9, &"c1-a".to_owned()).unwrap();
            s.save_command("c1", 11, &"c1-c".to_owned()).unwrap();
            s.remove_commands(&[("c1", 10), ("c9", 1)]).unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        assert_eq!(
            s.list_commands::<String>().unwrap(),
            vec![
                ("c1".into(), 9, "c1-a".into()),
                ("c1".into(), 11, "c1-c".into()),
                ("c2".into(), 3, "c2-a".into()),
            ]
        );
    }
}
