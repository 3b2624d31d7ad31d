//! The limiter's core, pure: AWS IoT's per-connection publish quotas (100 publishes/s and
//! 512 KiB/s, each with one second of burst) shared by priority lanes.
//!
//! Publishes wait in one FIFO per [`Lane`]. A lane is served only when every higher lane has
//! nothing waiting, so a telemetry backlog never delays a provisioning call by more than the
//! next free token. Tokens are taken when a waiter is granted, not when it arrives (the earlier
//! limiter handed out future slots in arrival order, so a provisioning publish queued behind
//! every telemetry publish before it). A granted publish that is never sent gives its tokens
//! back (`refund`, `cancel`).
//!
//! Both buckets are kept as GCRA "theoretical arrival times" in whole nanoseconds from a fixed
//! origin, so waits are exact and tests can compare them. Time comes in as `tokio::time::Instant`
//! (paused in tests). No I/O, no timers here: `limiter.rs` does the waiting.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// Which limiter lane a publish waits in, highest priority first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// The gateway's own control traffic (events, command results).
    Control,
    /// Fleet-provisioning calls, for the gateway and its children.
    Provisioning,
    /// Child telemetry and everything bulk.
    Telemetry,
}

impl Lane {
    pub const ALL: [Lane; 3] = [Lane::Control, Lane::Provisioning, Lane::Telemetry];

    fn index(self) -> usize {
        self as usize
    }
}

/// One second of burst in each bucket, as AWS allows.
const BURST: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Ticket {
    id: u64,
    size: usize,
}

/// Lanes of waiting publishes in front of two token buckets.
#[derive(Debug)]
pub struct Lanes {
    origin: Instant,
    /// Time one publish costs in the message bucket (1 s / publishes per second).
    msg_cost: Duration,
    bytes_per_sec: u64,
    /// Theoretical arrival times (from `origin`): a bucket is full when its TAT is not later
    /// than now, and empty when it is `BURST` ahead.
    msg_tat: Duration,
    byte_tat: Duration,
    queues: [VecDeque<Ticket>; 3],
    /// Granted, tokens taken, not yet collected by their waiter: id → size.
    granted: HashMap<u64, usize>,
    next_id: u64,
}

impl Lanes {
    pub fn new(publishes_per_sec: u32, bytes_per_sec: u32, now: Instant) -> Lanes {
        Lanes {
            origin: now,
            msg_cost: BURST / publishes_per_sec.max(1),
            bytes_per_sec: u64::from(bytes_per_sec.max(1)),
            msg_tat: Duration::ZERO,
            byte_tat: Duration::ZERO,
            queues: Default::default(),
            granted: HashMap::new(),
            next_id: 0,
        }
    }

    fn byte_cost(&self, size: usize) -> Duration {
        let ns = (size as u128 * 1_000_000_000).div_ceil(u128::from(self.bytes_per_sec));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// A publish of `size` bytes starts waiting in `lane`; returns its ticket id.
    pub fn push(&mut self, lane: Lane, size: usize) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.queues[lane.index()].push_back(Ticket { id, size });
        id
    }

    /// The waiter that is served next: the oldest of the highest lane with anyone waiting.
    pub fn head(&self) -> Option<u64> {
        self.queues.iter().find_map(|q| q.front()).map(|t| t.id)
    }

    /// Grants waiters in priority order for as long as the buckets allow. Returns the ids
    /// granted now and, if anyone still waits, the instant its head can be granted.
    pub fn grant(&mut self, now: Instant) -> (Vec<u64>, Option<Instant>) {
        let t = now.saturating_duration_since(self.origin);
        let mut out = Vec::new();
        loop {
            let Some(lane) = self.queues.iter().position(|q| !q.is_empty()) else {
                return (out, None);
            };
            let Some(&ticket) = self.queues[lane].front() else {
                return (out, None);
            };
            let m = conform(self.msg_tat, t, self.msg_cost);
            let b = conform(self.byte_tat, t, self.byte_cost(ticket.size));
            match (m, b) {
                (Ok(m), Ok(b)) => {
                    self.queues[lane].pop_front();
                    self.msg_tat = m;
                    self.byte_tat = b;
                    self.granted.insert(ticket.id, ticket.size);
                    out.push(ticket.id);
                }
                (m, b) => {
                    let wait = m.err().unwrap_or_default().max(b.err().unwrap_or_default());
                    return (out, Some(now + wait));
                }
            }
        }
    }

    /// Whether `id` was granted; collects the grant (its tokens stay spent).
    pub fn take_granted(&mut self, id: u64) -> bool {
        self.granted.remove(&id).is_some()
    }

    /// The waiter gave up: it leaves its lane, and if it had been granted without collecting
    /// the grant, its tokens are given back.
    pub fn cancel(&mut self, id: u64) {
        if let Some(size) = self.granted.remove(&id) {
            self.refund(size);
            return;
        }
        for q in &mut self.queues {
            q.retain(|t| t.id != id);
        }
    }

    /// Gives back the tokens of a granted publish that was never sent (not connected, request
    /// queue full). A bucket never fills beyond its burst: a TAT behind now counts as now.
    pub fn refund(&mut self, size: usize) {
        self.msg_tat = self.msg_tat.saturating_sub(self.msg_cost);
        self.byte_tat = self.byte_tat.saturating_sub(self.byte_cost(size));
    }

    /// Waiters per lane, in `Lane::ALL` order.
    pub fn waiting(&self) -> [usize; 3] {
        [
            self.queues[0].len(),
            self.queues[1].len(),
            self.queues[2].len(),
        ]
    }
}

/// GCRA: a request costing `cost` at `t` conforms if the bucket's TAT after it is at most
/// `BURST` ahead of `t`; a request larger than the whole bucket goes when the bucket is full.
/// `Ok(new TAT)`, or `Err(wait)` until it conforms.
fn conform(tat: Duration, t: Duration, cost: Duration) -> Result<Duration, Duration> {
    let new = tat.max(t) + cost;
    if new <= t + BURST || tat <= t {
        Ok(new)
    } else {
        Err((new - BURST).min(tat) - t)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn limiter_allows_burst_then_paces_messages() {
        let t0 = Instant::now();
        let mut l = Lanes::new(100, 512 * 1024, t0);
        let ids: Vec<u64> = (0..102).map(|_| l.push(Lane::Telemetry, 10)).collect();
        let (g, next) = l.grant(t0);
        assert_eq!(g, ids[..100].to_vec(), "one second of burst, in order");
        assert_eq!(next, Some(t0 + 10 * MS));
        // Not yet.
        assert_eq!(l.grant(t0 + 9 * MS), (vec![], Some(t0 + 10 * MS)));
        assert_eq!(l.grant(t0 + 10 * MS), (vec![ids[100]], Some(t0 + 20 * MS)));
        assert_eq!(l.grant(t0 + 20 * MS), (vec![ids[101]], None));
        // After a quiet second the bucket is full again.
        for _ in 0..100 {
            l.push(Lane::Telemetry, 10);
        }
        let (g, next) = l.grant(t0 + Duration::from_secs(2));
        assert_eq!((g.len(), next), (100, None));
    }

    #[test]
    fn limiter_paces_bytes() {
        let t0 = Instant::now();
        let mut l = Lanes::new(100, 512 * 1024, t0);
        for _ in 0..5 {
            l.push(Lane::Telemetry, 128 * 1024);
        }
        let (g, next) = l.grant(t0);
        assert_eq!(g.len(), 4);
        assert_eq!(next, Some(t0 + 250 * MS));
        // Sustained: 100 publishes of 128 KiB take ~25 s, i.e. 512 KiB/s.
        let mut l = Lanes::new(100, 512 * 1024, t0);
        for _ in 0..100 {
            l.push(Lane::Telemetry, 128 * 1024);
        }
        let mut now = t0;
        let mut granted = 0;
        loop {
            let (g, next) = l.grant(now);
            granted += g.len();
            match next {
                Some(n) => now = n,
                None => break,
            }
        }
        assert_eq!(granted, 100);
        assert_eq!(now - t0, Duration::from_secs(24));
    }

    #[test]
    fn limiter_refund_returns_the_reservation() {
        let t0 = Instant::now();
        let mut l = Lanes::new(100, 512 * 1024, t0);
        for _ in 0..100 {
            l.push(Lane::Telemetry, 10);
        }
        assert_eq!(l.grant(t0).0.len(), 100);
        let late = l.push(Lane::Telemetry, 10);
        assert_eq!(l.grant(t0), (vec![], Some(t0 + 10 * MS)));
        // One of the hundred was never sent: its slot is free again at once.
        l.refund(10);
        assert_eq!(l.grant(t0), (vec![late], None));
        // A waiter granted but gone before it collected the grant gives its tokens back.
        let gone = l.push(Lane::Telemetry, 10);
        l.refund(10);
        assert_eq!(l.grant(t0), (vec![gone], None));
        l.cancel(gone);
        let next = l.push(Lane::Telemetry, 10);
        assert_eq!(l.grant(t0), (vec![next], None));
        assert!(l.take_granted(next));
        // A cancelled waiter leaves its lane.
        let w = l.push(Lane::Telemetry, 10);
        assert_eq!(l.waiting(), [0, 0, 1]);
        l.cancel(w);
        assert_eq!(l.waiting(), [0, 0, 0]);
        assert_eq!(l.head(), None);
        // A refund never lifts a bucket above its burst.
        let mut l = Lanes::new(100, 512 * 1024, t0);
        l.refund(1000);
        for _ in 0..101 {
            l.push(Lane::Telemetry, 10);
        }
        assert_eq!(l.grant(t0).0.len(), 100);
    }

    /// A backlog of 1,000 telemetry publishes, then one provisioning publish: the provisioning
    /// publish is granted next, within one token interval.
    #[test]
    fn provisioning_overtakes_a_telemetry_backlog() {
        let t0 = Instant::now();
        let mut l = Lanes::new(100, 512 * 1024, t0);
        for _ in 0..1000 {
            l.push(Lane::Telemetry, 200);
        }
        let (g, next) = l.grant(t0);
        assert_eq!((g.len(), next), (100, Some(t0 + 10 * MS)));
        let asked = t0 + 3 * MS;
        let call = l.push(Lane::Provisioning, 300);
        assert_eq!(l.head(), Some(call));
        assert_eq!(l.waiting(), [0, 1, 900]);
        let (g, next) = l.grant(asked);
        assert!(g.is_empty());
        let at = next.unwrap();
        assert!(
            at - asked <= 10 * MS,
            "granted {:?} after asking",
            at - asked
        );
        assert_eq!(l.grant(at).0, vec![call], "next token goes to provisioning");
        // Control outranks provisioning; FIFO within a lane.
        let p1 = l.push(Lane::Provisioning, 1);
        let c = l.push(Lane::Control, 1);
        let p2 = l.push(Lane::Provisioning, 1);
        let mut order = Vec::new();
        let mut now = at;
        while order.len() < 3 {
            let (g, next) = l.grant(now);
            order.extend(g);
            now = next.unwrap();
        }
        assert_eq!(order, vec![c, p1, p2]);
        assert_eq!(l.waiting(), [0, 0, 900]);
    }

    #[test]
    fn a_publish_larger_than_the_byte_bucket_goes_when_it_is_full() {
        let t0 = Instant::now();
        let mut l = Lanes::new(100, 1000, t0);
        let a = l.push(Lane::Telemetry, 1500);
        let b = l.push(Lane::Telemetry, 10);
        assert_eq!(l.grant(t0).0, vec![a]);
        let (g, next) = l.grant(t0);
        assert!(g.is_empty());
        // The bucket is 1.5 s in debt; the next publish waits until it fits again.
        assert_eq!(next, Some(t0 + 510 * MS));
        assert_eq!(l.grant(t0 + 510 * MS).0, vec![b]);
    }
}
