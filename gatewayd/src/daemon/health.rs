//! Health: heartbeats of the critical task loops, and the watchdog decision built on them.
//!
//! Each critical task (the identity engine, every running uplink driver) holds a `Beat` and
//! touches it from its own loop (`run_beating`), so a beat proves that task is being polled, not
//! merely that the runtime is alive. The watchdog timer (`crate::daemon::run`) sends WATCHDOG=1 only when
//! every registered beat is younger than the watchdog interval (`stale`). A task that ends drops
//! its `Beat` and is no longer expected.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock (the real one outside tests): the beats are driven by tokio timers, and a test
// with paused time can then tell a blocked task from a waiting one without real-time margins.
use tokio::time::Instant;

/// The registry of critical tasks.
#[derive(Debug)]
pub struct Health {
    origin: Instant,
    /// How often a task beats; well below the watchdog interval.
    period: Duration,
    next_id: AtomicU64,
    tasks: Mutex<BTreeMap<u64, (String, Arc<AtomicU64>)>>,
}

impl Health {
    /// `watchdog`: the WATCHDOG=1 interval, if systemd asked for one. Tasks beat four times per
    /// interval (at most once a second without a watchdog), so one late tick is not fatal.
    pub fn new(watchdog: Option<Duration>) -> Arc<Health> {
        let period = watchdog
            .map(|w| (w / 4).clamp(Duration::from_millis(5), Duration::from_secs(1)))
            .unwrap_or(Duration::from_secs(1));
        Arc::new(Health {
            origin: Instant::now(),
            period,
            next_id: AtomicU64::new(0),
            tasks: Mutex::new(BTreeMap::new()),
        })
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// Registers a critical task; it is expected to beat until the returned `Beat` is dropped.
    pub fn register(self: &Arc<Self>, name: impl Into<String>) -> Beat {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let last = Arc::new(AtomicU64::new(self.now_ms()));
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (name.into(), last.clone()));
        Beat {
            health: self.clone(),
            id,
            last,
        }
    }

    /// Names of the registered tasks whose last beat is older than `window`.
    pub fn stale_tasks(&self, window: Duration) -> Vec<String> {
        let now = self.now_ms();
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let beats: Vec<(&str, u64)> = tasks
            .values()
            .map(|(n, l)| (n.as_str(), l.load(Ordering::Relaxed)))
            .collect();
        stale(&beats, now, window.as_millis() as u64)
    }
}

/// The watchdog decision: the tasks whose last beat (ms) is more than `window_ms` before `now_ms`.
/// WATCHDOG=1 is sent only when this is empty.
pub fn stale(beats: &[(&str, u64)], now_ms: u64, window_ms: u64) -> Vec<String> {
    beats
        .iter()
        .filter(|(_, last)| now_ms.saturating_sub(*last) > window_ms)
        .map(|(n, _)| (*n).to_owned())
        .collect()
}

/// One task's heartbeat; unregisters itself when dropped.
#[derive(Debug)]
pub struct Beat {
    health: Arc<Health>,
    id: u64,
    last: Arc<AtomicU64>,
}

impl Beat {
    pub fn beat(&self) {
        self.last.store(self.health.now_ms(), Ordering::Relaxed);
    }
}

impl Drop for Beat {
    fn drop(&mut self) {
        self.health
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Runs `fut` in the current task while beating every `period`: the timer and `fut` are polled by
/// the same task, so a poll of `fut` that blocks (a deadlock, blocking I/O) stops the beats.
pub async fn run_beating<F: Future>(beat: &Beat, fut: F) -> F::Output {
    let mut tick = tokio::time::interval(beat.health.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            out = &mut fut => return out,
            _ = tick.tick() => beat.beat(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn decision_needs_every_task_recent() {
        assert!(stale(&[], 10_000, 200).is_empty());
        let beats = [("identity", 9_900), ("uplink thing", 9_850)];
        assert!(stale(&beats, 10_000, 200).is_empty());
        let beats = [("identity", 9_900), ("uplink thing", 9_700)];
        assert_eq!(stale(&beats, 10_000, 200), vec!["uplink thing".to_owned()]);
        // A beat "from the future" (clock read race) is fresh, not a panic.
        assert!(stale(&[("identity", 10_050)], 10_000, 200).is_empty());
    }

    /// Stands for a poll that blocks its thread for `d`: the paused clock moves by `d` within one
    /// poll, so no timer of the polling task can fire meanwhile.
    fn block_for(d: Duration) {
        use std::future::Future;
        use std::task::{Context, Waker};
        let mut advance = std::pin::pin!(tokio::time::advance(d));
        let _ = advance
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()));
    }

    // Paused time: the windows are exact, not a few milliseconds of real-time slack.
    #[tokio::test(start_paused = true)]
    async fn blocked_task_goes_stale_and_dropped_task_is_forgotten() {
        let h = Health::new(Some(Duration::from_millis(40)));
        assert_eq!(h.period(), Duration::from_millis(10));
        let beat = h.register("identity");
        let window = Duration::from_millis(40);
        // A task that keeps being polled keeps beating while it waits, far past the window.
        run_beating(&beat, tokio::time::sleep(Duration::from_secs(10))).await;
        assert!(h.stale_tasks(window).is_empty());
        // A task whose poll blocks the thread cannot beat.
        run_beating(&beat, async { block_for(Duration::from_millis(100)) }).await;
        assert_eq!(h.stale_tasks(window), vec!["identity".to_owned()]);
        drop(beat);
        assert!(h.stale_tasks(window).is_empty());
    }
}
