//! The fairness scheduler: pure, no I/O.
//!
//! One FIFO of sequence numbers per child and a ring of the children that have something queued.
//! `take` serves the child at the front of the ring and moves it to the back, so children are
//! served round-robin: a child with a large backlog gets one turn per round like any other.
//! Within a child, the smallest sequence number goes first, also after entries are put back.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

#[derive(Debug, Clone)]
pub struct FairQueue<K> {
    queues: HashMap<K, VecDeque<u64>>,
    /// Exactly the children whose queue is not empty, in serving order.
    ring: VecDeque<K>,
    len: usize,
}

impl<K: Copy + Eq + Hash> Default for FairQueue<K> {
    fn default() -> Self {
        FairQueue {
            queues: HashMap::new(),
            ring: VecDeque::new(),
            len: 0,
        }
    }
}

impl<K: Copy + Eq + Hash> FairQueue<K> {
    #[cfg(test)]
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `seq` for `child`, in sequence order (at the back when it is the newest, which is
    /// the usual case; a put-back entry goes to its place). A child that had nothing queued joins
    /// the back of the ring.
    pub fn push(&mut self, child: K, seq: u64) {
        let q = self.queues.entry(child).or_default();
        if q.is_empty() {
            self.ring.push_back(child);
        }
        match q.back() {
            Some(&last) if last > seq => {
                let at = q.partition_point(|&s| s < seq);
                if q.get(at) == Some(&seq) {
                    return;
                }
                q.insert(at, seq);
            }
            Some(&last) if last == seq => return,
            _ => q.push_back(seq),
        }
        self.len += 1;
    }

    /// The next entry: the oldest of the child whose turn it is.
    pub fn take(&mut self) -> Option<(K, u64)> {
        let child = self.ring.pop_front()?;
        let q = self.queues.get_mut(&child)?;
        let seq = q.pop_front()?;
        self.len -= 1;
        if q.is_empty() {
            self.queues.remove(&child);
        } else {
            self.ring.push_back(child);
        }
        Some((child, seq))
    }

    /// Removes a queued entry (dropped or acknowledged before it was taken).
    pub fn remove(&mut self, child: K, seq: u64) -> bool {
        let Some(q) = self.queues.get_mut(&child) else {
            return false;
        };
        let at = if q.front() == Some(&seq) {
            0
        } else {
            match q.binary_search(&seq) {
                Ok(at) => at,
                Err(_) => return false,
            }
        };
        q.remove(at);
        self.len -= 1;
        if q.is_empty() {
            self.queues.remove(&child);
            if let Some(pos) = self.ring.iter().position(|c| *c == child) {
                self.ring.remove(pos);
            }
        }
        true
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    pub fn len_of(&self, child: K) -> usize {
        self.queues.get(&child).map_or(0, VecDeque::len)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_small_child_is_served_within_one_round_of_a_large_backlog() {
        let mut f = FairQueue::new();
        for s in 0..10_000 {
            f.push('a', s);
        }
        f.push('b', 10_000);
        let first_two = [f.take().unwrap(), f.take().unwrap()];
        assert!(first_two.contains(&('b', 10_000)), "{first_two:?}");
        assert_eq!(f.len(), 9_999);
    }

    #[test]
    fn round_robin_and_fifo_per_child() {
        let mut f = FairQueue::new();
        for (c, s) in [('a', 1), ('a', 2), ('a', 3), ('b', 4), ('c', 5), ('b', 6)] {
            f.push(c, s);
        }
        let order: Vec<_> = std::iter::from_fn(|| f.take()).collect();
        assert_eq!(
            order,
            vec![('a', 1), ('b', 4), ('c', 5), ('a', 2), ('b', 6), ('a', 3)]
        );
        assert!(f.is_empty());
    }

    #[test]
    fn put_back_entries_go_first_within_their_child() {
        let mut f = FairQueue::new();
        for s in [1, 2, 3] {
            f.push('a', s);
        }
        let (_, one) = f.take().unwrap();
        let (_, two) = f.take().unwrap();
        f.push('a', two);
        f.push('a', one);
        f.push('a', one); // a second put-back of the same entry is ignored
        assert_eq!(f.len_of('a'), 3);
        let order: Vec<_> = std::iter::from_fn(|| f.take()).map(|(_, s)| s).collect();
        assert_eq!(order, vec![1, 2, 3]);
    }

    #[test]
    fn removing_the_last_entry_takes_the_child_out_of_the_ring() {
        let mut f = FairQueue::new();
        f.push('a', 1);
        f.push('b', 2);
        assert!(f.remove('a', 1));
        assert!(!f.remove('a', 1));
        f.push('a', 3);
        // 'a' rejoined behind 'b' exactly once
        let order: Vec<_> = std::iter::from_fn(|| f.take()).collect();
        assert_eq!(order, vec![('b', 2), ('a', 3)]);
    }

    proptest! {
        /// Whatever is pushed comes out exactly once, in order per child, and between two turns of
        /// one child every other child that was waiting gets a turn.
        #[test]
        fn everything_once_in_order_and_round_robin(pushes in proptest::collection::vec(0u8..5, 0..300)) {
            let mut f = FairQueue::new();
            for (seq, c) in pushes.iter().enumerate() {
                f.push(*c, seq as u64);
            }
            let out: Vec<_> = std::iter::from_fn(|| f.take()).collect();
            prop_assert_eq!(out.len(), pushes.len());
            for c in 0u8..5 {
                let mine: Vec<u64> = out.iter().filter(|(k, _)| *k == c).map(|(_, s)| *s).collect();
                let want: Vec<u64> = pushes.iter().enumerate().filter(|(_, k)| **k == c).map(|(s, _)| s as u64).collect();
                prop_assert_eq!(mine, want);
            }
            // in any window of `children` consecutive takes, no child appears twice while the
            // ring still held every child (all pushes happened before the first take)
            let mut left: HashMap<u8, usize> = HashMap::new();
            for c in &pushes { *left.entry(*c).or_default() += 1; }
            let mut i = 0;
            while i < out.len() {
                let n = left.values().filter(|v| **v > 0).count();
                let window = &out[i..(i + n).min(out.len())];
                let mut seen = std::collections::HashSet::new();
                for (c, _) in window { prop_assert!(seen.insert(*c)); }
                for (c, _) in window { *left.get_mut(c).unwrap() -= 1; }
                i += n.max(1);
            }
        }
    }
}
