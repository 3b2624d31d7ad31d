//! The limiter's waiting side: callers wait here, on tokio's clock, for `lanes` to grant them.
//!
//! Only the head waiter (the one `lanes` serves next) sleeps on a timer; everyone else sleeps
//! until woken, so a backlog of thousands costs one wake-up per grant. Whoever grants (a new
//! arrival, the head when its timer fires, a waiter giving up) wakes the waiters it granted and
//! the new head. A waiter dropped while waiting leaves its lane; one dropped after its grant,
//! or a `Permit` dropped without `sent`, gives its tokens back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::lanes::{Lane, Lanes};

struct State {
    lanes: Lanes,
    wakers: HashMap<u64, Arc<Notify>>,
}

impl State {
    /// Grants what can go now; wakes the granted and the head, except `me` (the caller, who
    /// looks for itself: a wake-up stored for it would make it spin). Returns the head's
    /// instant.
    fn grant(&mut self, now: Instant, me: Option<u64>) -> Option<Instant> {
        let (granted, next) = self.lanes.grant(now);
        let head = self.lanes.head();
        for id in granted.into_iter().chain(head) {
            if Some(id) != me
                && let Some(w) = self.wakers.get(&id)
            {
                w.notify_one();
            }
        }
        next
    }
}

/// The per-connection limiter; `on_change` reports the waiters per lane (for status).
pub struct Limiter {
    state: Mutex<State>,
    on_change: Box<dyn Fn([usize; 3]) + Send + Sync>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Limiter {
    pub fn new(
        publishes_per_sec: u32,
        bytes_per_sec: u32,
        on_change: impl Fn([usize; 3]) + Send + Sync + 'static,
    ) -> Limiter {
        Limiter {
            state: Mutex::new(State {
                lanes: Lanes::new(publishes_per_sec, bytes_per_sec, Instant::now()),
                wakers: HashMap::new(),
            }),
            on_change: Box::new(on_change),
        }
    }

    /// Waits for the lane's turn and the tokens for one publish of `size` bytes. Returns the
    /// permit and how long the caller waited. Cancel-safe: dropping the future leaves the lane
    /// (and gives back tokens granted meanwhile).
    pub async fn acquire(&self, lane: Lane, size: usize) -> (Permit<'_>, Duration) {
        let started = Instant::now();
        let me = Arc::new(Notify::new());
        let id = {
            let mut s = lock(&self.state);
            let id = s.lanes.push(lane, size);
            s.wakers.insert(id, me.clone());
            (self.on_change)(s.lanes.waiting());
            id
        };
        let mut waiting = Waiting {
            limiter: self,
            id,
            done: false,
        };
        loop {
            let (granted, head, next) = {
                let mut s = lock(&self.state);
                let next = s.grant(Instant::now(), Some(id));
                let granted = s.lanes.take_granted(id);
                if granted {
                    s.wakers.remove(&id);
                    (self.on_change)(s.lanes.waiting());
                }
                (granted, s.lanes.head() == Some(id), next)
            };
            if granted {
                waiting.done = true;
                let permit = Permit {
                    limiter: self,
                    size,
                    sent: false,
                };
                return (permit, started.elapsed());
            }
            match (head, next) {
                (true, Some(at)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = me.notified() => {}
                    }
                }
                _ => me.notified().await,
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn waiting(&self) -> [usize; 3] {
        lock(&self.state).lanes.waiting()
    }
}

/// Leaves the lane if the waiter is dropped before it collected its grant.
struct Waiting<'a> {
    limiter: &'a Limiter,
    id: u64,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut s = lock(&self.limiter.state);
        s.wakers.remove(&self.id);
        s.lanes.cancel(self.id);
        // Someone else may be head now, or tokens were given back: let them go.
        s.grant(Instant::now(), None);
        (self.limiter.on_change)(s.lanes.waiting());
    }
}

/// Tokens for one publish; given back when dropped unless `sent` was called (the publish was
/// never handed to rumqttc: not connected, request queue full, caller gone).
pub struct Permit<'a> {
    limiter: &'a Limiter,
    size: usize,
    sent: bool,
}

impl Permit<'_> {
    pub fn sent(mut self) {
        self.sent = true;
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.sent {
            let mut s = lock(&self.limiter.state);
            s.lanes.refund(self.size);
            s.grant(Instant::now(), None);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Under paused time: 1,000 telemetry publishes wait; a provisioning publish asked for
    /// afterwards is through within one token interval, and the telemetry backlog drains at
    /// 100 per second.
    #[tokio::test(start_paused = true)]
    async fn provisioning_is_not_starved_by_a_telemetry_backlog() {
        let limiter = Arc::new(Limiter::new(100, 512 * 1024, |_| {}));
        let t0 = Instant::now();
        let done = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..1000u32 {
            let (l, done) = (limiter.clone(), done.clone());
            tasks.spawn(async move {
                let (p, _) = l.acquire(Lane::Telemetry, 200).await;
                p.sent();
                lock(&done).push((i, Instant::now()));
            });
        }
        // Let every telemetry publish queue up (the first 100 go at once).
        tokio::time::sleep(3 * MS).await;
        assert_eq!(lock(&done).len(), 100);
        assert_eq!(limiter.waiting(), [0, 0, 900]);
        let asked = Instant::now();
        let (p, waited) = limiter.acquire(Lane::Provisioning, 300).await;
        p.sent();
        assert!(waited <= 10 * MS, "provisioning waited {waited:?}");
        assert_eq!(Instant::now() - t0, 10 * MS);
        assert_eq!(Instant::now() - asked, waited);
        assert_eq!(lock(&done).len(), 100, "no telemetry went before it");
        while tasks.join_next().await.is_some() {}
        let done = lock(&done);
        // FIFO within the lane, and 100 per second after the burst: 900 more take 9 s (+10 ms
        // for the provisioning publish that went first).
        assert!(done.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(done[999].1 - t0, Duration::from_millis(9010));
    }

    /// A waiter dropped while waiting takes nothing; one granted after giving up gives back.
    #[tokio::test(start_paused = true)]
    async fn cancelled_waiters_take_no_tokens() {
        let limiter = Limiter::new(100, 512 * 1024, |_| {});
        for _ in 0..100 {
            limiter.acquire(Lane::Telemetry, 10).await.0.sent();
        }
        let t0 = Instant::now();
        let r = tokio::time::timeout(5 * MS, limiter.acquire(Lane::Telemetry, 10)).await;
        assert!(r.is_err(), "the 101st publish must wait");
        assert_eq!(limiter.waiting(), [0, 0, 0]);
        // The slot at +10 ms is still free for the next caller.
        let (p, _) = limiter.acquire(Lane::Telemetry, 10).await;
        assert_eq!(Instant::now() - t0, 10 * MS);
        // Not sent: its tokens come back, so the next one goes at once.
        drop(p);
        let (_p, waited) = limiter.acquire(Lane::Telemetry, 10).await;
        assert_eq!(waited, Duration::ZERO);
    }
}
