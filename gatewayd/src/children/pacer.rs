//! Pacer: token buckets that keep the children's fleet-provisioning calls under the account's
//! quotas (CreateCertificateFromCsr and RegisterThing per second). On tokio's clock, so tests
//! run it under paused time. Burst is one call: calls leave at most `rate` per second, evenly
//! spaced, so a quota bucket on the cloud side (which starts full) never runs dry.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Bucket {
    interval: Duration,
    /// Earliest moment the next call may leave.
    next: Option<Instant>,
}

impl Bucket {
    pub fn new(per_sec: f64) -> Bucket {
        Bucket {
            interval: Duration::from_secs_f64(1.0 / per_sec.max(1e-3)),
            next: None,
        }
    }

    /// Waits for this call's slot and books it.
    pub async fn take(&mut self) {
        let now = Instant::now();
        let at = self.next.map_or(now, |n| n.max(now));
        self.next = Some(at + self.interval);
        tokio::time::sleep_until(at).await;
    }

    /// After a throttling answer: the cloud's bucket is emptier than ours thought; hold the
    /// next call back by `by`.
    pub fn push_back(&mut self, by: Duration) {
        let now = Instant::now();
        self.next = Some(self.next.map_or(now, |n| n.max(now)) + by);
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

    #[tokio::test(start_paused = true)]
    async fn calls_are_spaced_to_the_rate() {
        let mut b = Bucket::new(10.0);
        let t0 = Instant::now();
        let mut at = Vec::new();
        for _ in 0..21 {
            b.take().await;
            at.push(t0.elapsed());
        }
        // The first leaves at once, then one every 100 ms: 21 calls in 2 s, never 11 in a second.
        assert_eq!(at[0], Duration::ZERO);
        assert_eq!(at[20], Duration::from_secs(2));
        for w in at.windows(11) {
            assert!(w[10] - w[0] >= Duration::from_secs(1), "{at:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_bucket_does_not_save_up_a_burst() {
        let mut b = Bucket::new(10.0);
        b.take().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let t0 = Instant::now();
        b.take().await;
        b.take().await;
        assert_eq!(t0.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn the_two_quotas_are_independent_and_push_back_delays() {
        let mut p = Pacer::new(15.0, 10.0);
        let t0 = Instant::now();
        p.create.take().await;
        p.register.take().await;
        p.create.take().await;
        // Tokio's timer has millisecond steps: 66.7 ms becomes 67 ms.
        let e = t0.elapsed();
        assert!(
            e >= Duration::from_secs_f64(1.0 / 15.0) && e <= Duration::from_millis(67),
            "{e:?}"
        );
        p.register.push_back(Duration::from_secs(1));
        p.register.take().await;
        // Booked at 100 ms, pushed back by 1 s.
        assert_eq!(t0.elapsed(), Duration::from_millis(1100));
    }
}
