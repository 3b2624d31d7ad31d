//! Which publishes one take's entries become (pure): alone or packed into envelopes, never a
//! child's message ahead of an earlier one of the same child, in at most `room` publishes.
//!
//! Entries come in take order (each child's FIFO). An entry whose rule batches joins the newest
//! open envelope of its rule unless that envelope comes before a publish already holding one of
//! the same child's messages; else (or when full) it opens a new one. When `room` publishes are made, an
//! entry needing another one is left out, and so is every later entry of its child.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::batch::{Envelope, Message};
use super::mapping::Batch;
use crate::outbox::{Entry, Seq};

/// Where an entry goes, as the bridge resolved it.
#[derive(Debug)]
pub enum Route<'m> {
    /// Its child has no thing name yet.
    Waiting,
    /// No rule matches its topic.
    Unmapped,
    Mapped {
        thing: String,
        topic: String,
        rule: usize,
        batch: Option<&'m Batch>,
    },
}

/// One publish.
#[derive(Debug)]
pub enum Unit {
    Single {
        entry: Entry,
        topic: String,
    },
    Batch {
        topic: String,
        payload: Vec<u8>,
        entries: Vec<Entry>,
    },
}

impl Unit {
    pub fn entries(&self) -> &[Entry] {
        match self {
            Unit::Single { entry, .. } => std::slice::from_ref(entry),
            Unit::Batch { entries, .. } => entries,
        }
    }
}

/// What to do with one take.
#[derive(Debug, Default)]
pub struct Plan {
    /// Publishes, in the order they must be started.
    pub units: Vec<Unit>,
    /// Entries to put back (no thing name yet, or no room): taken again in order.
    pub release: Vec<Seq>,
    /// Entries no rule maps: dropped.
    pub unmapped: Vec<Seq>,
    /// Children with no thing name, with how many of their entries this take held.
    pub waiting: BTreeMap<String, u64>,
}

struct Open {
    rule: usize,
    topic: String,
    envelope: Envelope,
    entries: Vec<Entry>,
    closed: bool,
}

enum Building {
    Single { entry: Entry, topic: String },
    Batch(Open),
}

/// Plans `entries` into at most `room` publishes.
pub fn plan<'m>(
    entries: Vec<Entry>,
    room: usize,
    gateway: &str,
    mut route: impl FnMut(&Entry) -> Route<'m>,
) -> Plan {
    let mut out = Plan::default();
    let mut units: Vec<Building> = Vec::new();
    // Per child, the last unit holding one of its entries.
    let mut last_unit: HashMap<Arc<str>, usize> = HashMap::new();
    let mut left_out: HashSet<Arc<str>> = HashSet::new();
    for entry in entries {
        if left_out.contains(&entry.child_id) {
            out.release.push(entry.seq);
            continue;
        }
        let (thing, topic, rule, batch) = match route(&entry) {
            Route::Waiting => {
                *out.waiting.entry(entry.child_id.to_string()).or_default() += 1;
                out.release.push(entry.seq);
                continue;
            }
            Route::Unmapped => {
                out.unmapped.push(entry.seq);
                continue;
            }
            Route::Mapped {
                thing,
                topic,
                rule,
                batch,
            } => (thing, topic, rule, batch),
        };
        let after = last_unit.get(&entry.child_id).copied();
        if let Some(b) = batch {
            let message = Message {
                child: &entry.child_id,
                thing: &thing,
                topic: &topic,
                ts: entry.appended_ms,
                payload: &entry.payload,
            };
            let open = units
                .iter_mut()
                .enumerate()
                .rev()
                .find_map(|(i, u)| match u {
                    Building::Batch(o)
                        if !o.closed && o.rule == rule && after.is_none_or(|a| a <= i) =>
                    {
                        Some((i, o))
                    }
                    _ => None,
                });
            if let Some((i, o)) = open {
                if o.envelope.push(message) {
                    last_unit.insert(entry.child_id.clone(), i);
                    o.entries.push(entry);
                    continue;
                }
                o.closed = true;
            }
            let mut envelope = Envelope::new(gateway, b.max_messages, b.max_bytes);
            if envelope.push(message) {
                if units.len() >= room {
                    left_out.insert(entry.child_id.clone());
                    out.release.push(entry.seq);
                    continue;
                }
                last_unit.insert(entry.child_id.clone(), units.len());
                units.push(Building::Batch(Open {
                    rule,
                    topic: b.topic(gateway),
                    envelope,
                    entries: vec![entry],
                    closed: false,
                }));
                continue;
            }
            // Bigger than an envelope may be: it goes alone, on its own topic.
        }
        if units.len() >= room {
            left_out.insert(entry.child_id.clone());
            out.release.push(entry.seq);
            continue;
        }
        last_unit.insert(entry.child_id.clone(), units.len());
        units.push(Building::Single { entry, topic });
    }
    out.units = units
        .into_iter()
        .map(|u| match u {
            Building::Single { entry, topic } => Unit::Single { entry, topic },
            Building::Batch(o) => Unit::Batch {
                topic: o.topic,
                payload: o.envelope.finish(),
                entries: o.entries,
            },
        })
        .collect();
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::bridge::batch::unpack;
    use crate::bridge::mapping::{BatchRule, Mapper, MappingRule, Names};
    use proptest::prelude::*;

    fn entry(seq: u64, child: &str, topic: &str, payload: &str) -> Entry {
        Entry {
            seq: Seq(seq),
            child_id: Arc::from(child),
            topic: topic.into(),
            qos: 1,
            payload: payload.as_bytes().to_vec(),
            appended_ms: 1000 + seq,
        }
    }

    /// `dt/{child}/b/..` batched (rule 0), `dt/{child}/c/..` batched by another rule (rule 1),
    /// everything else alone; child `w` has no thing; topics under `x/` are unmapped.
    fn mapper(max_messages: usize) -> Mapper {
        let batch = |topic: &str| {
            Some(BatchRule {
                topic: topic.into(),
                max_messages,
                ..BatchRule::default()
            })
        };
        Mapper::new(&[
            MappingRule {
                local: "dt/{child}/b/{suffix}".into(),
                cloud: "gw/{gateway}/{thing}/b/{suffix}".into(),
                batch: batch("gw/{gateway}/batch"),
                ..MappingRule::default()
            },
            MappingRule {
                local: "dt/{child}/c/{suffix}".into(),
                cloud: "gw/{gateway}/{thing}/c/{suffix}".into(),
                batch: batch("gw/{gateway}/batch2"),
                ..MappingRule::default()
            },
            MappingRule::default(),
        ])
        .unwrap()
    }

    fn run(m: &Mapper, entries: Vec<Entry>, room: usize) -> Plan {
        plan(entries, room, "g", |e| {
            if &*e.child_id == "w" {
                return Route::Waiting;
            }
            let thing = format!("T{}", e.child_id);
            let names = Names {
                child: &e.child_id,
                thing: &thing,
                gateway: "g",
                profile: None,
            };
            match m.route(&e.topic, names) {
                Some(r) => Route::Mapped {
                    thing: thing.clone(),
                    topic: r.topic,
                    rule: r.rule,
                    batch: r.batch,
                },
                None => Route::Unmapped,
            }
        })
    }

    fn seqs(u: &Unit) -> Vec<u64> {
        u.entries().iter().map(|e| e.seq.0).collect()
    }

    #[test]
    fn batched_entries_share_envelopes_and_others_go_alone() {
        let m = mapper(3);
        let p = run(
            &m,
            vec![
                entry(1, "a", "dt/a/b/t", "1"),
                entry(2, "b", "dt/b/b/t", "2"),
                entry(3, "a", "dt/a/plain", "3"),
                entry(4, "b", "dt/b/b/t", "4"),
                entry(5, "c", "dt/c/b/t", "5"),
                entry(6, "c", "dt/c/b/t", "6"),
                entry(7, "w", "dt/w/b/t", "7"),
                entry(8, "a", "x/a", "8"),
            ],
            10,
        );
        let got: Vec<Vec<u64>> = p.units.iter().map(seqs).collect();
        // b's second joins the first envelope (b has nothing after it); a's later batched ones
        // could not (a's plain message comes after it); c's fill a second envelope once the
        // first holds three.
        assert_eq!(got, vec![vec![1, 2, 4], vec![3], vec![5, 6]]);
        assert_eq!(p.release, vec![Seq(7)]);
        assert_eq!(p.unmapped, vec![Seq(8)]);
        assert_eq!(p.waiting.get("w"), Some(&1));
        let Unit::Batch { topic, payload, .. } = &p.units[0] else {
            panic!("not an envelope")
        };
        assert_eq!(topic, "gw/g/batch");
        let back = unpack(payload).unwrap();
        assert_eq!(back[0].topic, "gw/g/Ta/b/t");
        assert_eq!(back[0].thing, "Ta");
        assert_eq!(back[0].ts, 1001);
        assert_eq!(back[2].payload, b"4");
    }

    #[test]
    fn a_child_in_two_batch_rules_keeps_its_order() {
        let m = mapper(10);
        let p = run(
            &m,
            vec![
                entry(1, "a", "dt/a/b/t", "1"),
                entry(2, "a", "dt/a/c/t", "2"),
                entry(3, "a", "dt/a/b/t", "3"),
            ],
            10,
        );
        let got: Vec<Vec<u64>> = p.units.iter().map(seqs).collect();
        assert_eq!(got, vec![vec![1], vec![2], vec![3]]);
    }

    #[test]
    fn no_more_than_room_publishes_and_a_left_out_child_keeps_the_rest_out() {
        let m = mapper(5);
        let p = run(
            &m,
            vec![
                entry(1, "a", "dt/a/plain", "1"),
                entry(2, "c", "dt/c/b/t", "2"),
                entry(3, "a", "dt/a/plain", "3"),
                // Would fit c's envelope, but must not overtake a's 3, left out.
                entry(4, "a", "dt/a/b/t", "4"),
                entry(5, "c", "dt/c/b/t", "5"),
            ],
            2,
        );
        let got: Vec<Vec<u64>> = p.units.iter().map(seqs).collect();
        assert_eq!(got, vec![vec![1], vec![2, 5]]);
        assert_eq!(p.release, vec![Seq(3), Seq(4)]);
    }

    proptest! {
        /// Every entry is planned once; no more than `room` publishes; each child's entries, in
        /// publish order then envelope order, are a prefix-free subsequence in take order (never
        /// one ahead of an earlier one); an entry left out keeps its child's later ones out.
        #[test]
        fn every_child_keeps_its_order(
            picks in proptest::collection::vec((0u8..4, 0u8..4), 1..60),
            room in 1usize..8,
            max_messages in 1usize..5,
        ) {
            let m = mapper(max_messages);
            let topics = ["dt/{}/b/t", "dt/{}/c/t", "dt/{}/plain", "x/{}"];
            let children = ["a", "b", "c", "w"];
            let entries: Vec<Entry> = picks
                .iter()
                .enumerate()
                .map(|(i, (c, t))| {
                    let child = children[*c as usize];
                    entry(i as u64, child, &topics[*t as usize].replace("{}", child), &i.to_string())
                })
                .collect();
            let by_seq: HashMap<u64, Arc<str>> =
                entries.iter().map(|e| (e.seq.0, e.child_id.clone())).collect();
            let n = entries.len();
            let p = run(&m, entries, room);
            prop_assert!(p.units.len() <= room);
            let mut all: Vec<u64> = p.units.iter().flat_map(seqs).collect();
            let published = all.clone();
            all.extend(p.release.iter().map(|s| s.0));
            all.extend(p.unmapped.iter().map(|s| s.0));
            all.sort_unstable();
            prop_assert_eq!(all, (0..n as u64).collect::<Vec<_>>());
            let released: HashSet<u64> = p.release.iter().map(|s| s.0).collect();
            for child in children {
                let order: Vec<u64> = published
                    .iter()
                    .copied()
                    .filter(|s| &*by_seq[s] == child)
                    .collect();
                let mut sorted = order.clone();
                sorted.sort_unstable();
                prop_assert_eq!(&order, &sorted, "child {} out of order", child);
                // Nothing of this child published after one of its entries was put back.
                if let Some(first_back) = released.iter().filter(|s| &*by_seq[s] == child).min() {
                    prop_assert!(order.iter().all(|s| s < first_back), "child {} skipped ahead", child);
                }
            }
            for u in &p.units {
                if let Unit::Batch { payload, entries, .. } = u {
                    let back = unpack(payload).unwrap();
                    prop_assert!(back.len() <= max_messages);
                    let originals: Vec<Vec<u8>> = entries.iter().map(|e| e.payload.clone()).collect();
                    let unpacked: Vec<Vec<u8>> = back.into_iter().map(|b| b.payload).collect();
                    prop_assert_eq!(unpacked, originals);
                }
            }
        }
    }
}
