//! Pacer: token buckets that keep the children's fleet-provisioning calls under the account's
//! quotas (CreateCertificateFromCsr and RegisterThing per second). On tokio's clock, so tests
//! run it under paused time.
//!
//! GCRA (the virtual-scheduling form): each call books the next slot one interval on, and may
//! leave up to `BURST - 1` intervals ahead of its slot. So a child that took longer than one
//! interval (an fsync stall on an SD card) is made up by the next ones, and the long-run rate
//! stays at the quota; an idle pacer saves up at most `BURST` calls, never a second's worth. A
//! cloud bucket that holds a second of calls (AWS's token buckets; iotcore-sim's) never runs dry.

use std::time::Duration;

use tokio::time::Instant;

/// Calls that may leave back to back after an idle spell or a slow child.
pub const BURST: u32 = 3;

#[derive(Debug)]
pub struct Bucket {
    interval: Duration,
    tolerance: Duration,
    /// Theoretical arrival time of the next call.
    tat: Option<Instant>,
}

impl Bucket {
    pub fn new(per_sec: f64) -> Bucket {
        let interval = Duration::from_secs_f64(1.0 / per_sec.max(1e-3));
        Bucket {
            interval,
            tolerance: interval * (BURST - 1),
            tat: None,
        }
    }

    /// Waits for this call's slot and books it.
    pub async fn take(&mut self) {
        let now = Instant::now();
        let tat = self.tat.map_or(now, |t| t.max(now));
        let at = tat.checked_sub(self.tolerance).map_or(now, |t| t.max(now));
        self.tat = Some(tat + self.interval);
        tokio::time::sleep_until(at).await;
    }

    /// After a throttling answer: the cloud's bucket is emptier than ours thought; hold the
    /// next call back by `by`, with no burst credit left.
    pub fn push_back(&mut self, by: Duration) {
        let now = Instant::now();
        let tat = self.tat.map_or(now, |t| t.max(now));
        self.tat = Some(tat.max(now + self.tolerance) + by);
    }
}

/// One bucket per quota.
#[derive(Debug)]
pub struct Pacer {
    pub create: Bucket,
    pub register: Bucket,
}

impl Pacer {
    pub fn new(create_per_sec: f64, register_per_sec: f64) -> Pacer {
        Pacer {
            create: Bucket::new(create_per_sec),
            register: Bucket::new(register_per_sec),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls in any window of `len` starting at a call.
    fn most_in_window(at: &[Duration], len: Duration) -> usize {
        (0..at.len())
            .map(|i| at[i..].iter().take_while(|t| **t - at[i] < len).count())
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn calls_are_spaced_to_the_rate_after_a_small_burst() {
        let mut b = Bucket::new(10.0);
        let t0 = Instant::now();
        let mut at = Vec::new();
        for _ in 0..103 {
            b.take().await;
            at.push(t0.elapsed());
        }
        // Three at once, then one every 100 ms: 103 calls in 10 s, at most 12 in any second
        // (a cloud bucket of 10 refilling at 10/s is never empty).
        assert_eq!(at[2], Duration::ZERO);
        assert_eq!(at[3], Duration::from_millis(100));
        assert_eq!(at[102], Duration::from_secs(10));
        assert!(most_in_window(&at, Duration::from_secs(1)) <= 12, "{at:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_bucket_saves_up_only_a_burst() {
        let mut b = Bucket::new(10.0);
        b.take().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let t0 = Instant::now();
        for _ in 0..BURST + 1 {
            b.take().await;
        }
        assert_eq!(t0.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_call_is_made_up_by_the_next_ones() {
        let mut b = Bucket::new(10.0);
        let t0 = Instant::now();
        let mut at = Vec::new();
        // Every fourth call's work takes 250 ms, the others 50 ms: on average 100 ms, the
        // quota's interval. Without catching up the rate would fall to 1/137.5 ms = 7.3/s.
        for i in 0..40 {
            b.take().await;
            at.push(t0.elapsed());
            let work = if i % 4 == 0 { 250 } else { 50 };
            tokio::time::sleep(Duration::from_millis(work)).await;
        }
        let rate = 39.0 / (at[39] - at[0]).as_secs_f64();
        assert!(rate >= 9.5, "{rate:.2}/s: {at:?}");
        assert!(most_in_window(&at, Duration::from_secs(1)) <= 12, "{at:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_two_quotas_are_independent_and_push_back_delays() {
        let mut p = Pacer::new(15.0, 10.0);
        let t0 = Instant::now();
        for _ in 0..BURST {
            p.create.take().await;
            p.register.take().await;
        }
        assert_eq!(t0.elapsed(), Duration::ZERO);
        p.create.take().await;
        // Tokio's timer has millisecond steps: 66.7 ms becomes 67 ms.
        let e = t0.elapsed();
        assert!(
            e >= Duration::from_secs_f64(1.0 / 15.0) && e <= Duration::from_millis(67),
            "{e:?}"
        );
        p.register.push_back(Duration::from_secs(1));
        p.register.take().await;
        // No burst credit after a throttle: the next slot is a full second away.
        assert!(
            t0.elapsed() >= Duration::from_millis(1067),
            "{:?}",
            t0.elapsed()
        );
    }
}
