//! AWS IoT Core's limits (quotas), injected faults and counters, and the admin socket through
//! which tests drive them while `serve` runs.
//!
//! Owns: rate limiters, fault switches, counters, `DIR/admin.sock`. Must not touch connections
//! directly: the broker asks this module what to do (throttle, refuse, reject, skip an ack).

use crate::provisioning::ApiError;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// AWS's historical defaults; each is a `serve` option.
#[derive(Debug, Clone)]
pub struct Limits {
    pub register_thing_tps: f64,
    pub create_from_csr_tps: f64,
    pub create_keys_tps: f64,
    pub publishes_per_second: f64,
    pub bytes_per_second: f64,
    pub max_subscriptions: usize,
    pub filters_per_subscribe: usize,
    /// Minimum time between CONNECTs of one client id (AWS: 1 per second).
    pub connect_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            register_thing_tps: 10.0,
            create_from_csr_tps: 15.0,
            create_keys_tps: 10.0,
            publishes_per_second: 100.0,
            bytes_per_second: 512.0 * 1024.0,
            max_subscriptions: 50,
            filters_per_subscribe: 8,
            connect_interval: Duration::from_secs(1),
        }
    }
}

/// A token bucket holding at most one second's worth of tokens.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Starts full: one second's worth, and never less than one token.
    pub fn new(rate: f64, now: Instant) -> Bucket {
        Bucket {
            rate,
            tokens: rate.max(1.0),
            last: now,
        }
    }
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.rate.max(1.0));
        self.last = now;
    }
    /// Take one token if available.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
    /// Take `n` tokens, going into debt; returns how long the caller must wait to pay it back.
    pub fn take_delay(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 || self.rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[derive(Debug, Default)]
struct Faults {
    refuse_until: Option<Instant>,
    reply_delay: Duration,
    reject_next: u32,
    reject_with: Option<ApiError>,
    stall_acks_until: Option<Instant>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    pub connections: u64,
    pub refused_connections: u64,
    pub publishes_received: u64,
    pub publishes_by_topic: BTreeMap<String, u64>,
    pub publishes_by_client: BTreeMap<String, u64>,
    pub throttled_publishes: u64,
    pub throttled_provisioning_calls: u64,
    pub throttled_connects: u64,
    pub dropped_messages: u64,
    pub unacknowledged_publishes: u64,
    pub bad_packets: u64,
    pub denied: u64,
    pub injected_rejections: u64,
}

/// Distinct keys a per-topic or per-client counter keeps; the rest add up under "(other)".
pub const MAX_COUNTER_KEYS: usize = 10_000;

fn bump_key(m: &mut BTreeMap<String, u64>, key: &str) {
    if let Some(n) = m.get_mut(key) {
        *n += 1;
    } else if m.len() < MAX_COUNTER_KEYS {
        m.insert(key.to_owned(), 1);
    } else {
        *m.entry("(other)".to_owned()).or_default() += 1;
    }
}

pub struct Control {
    pub limits: Limits,
    faults: Mutex<Faults>,
    stats: Mutex<Stats>,
    prov_buckets: Mutex<HashMap<&'static str, Bucket>>,
    last_connect: Mutex<HashMap<String, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Control {
    pub fn new(limits: Limits) -> Control {
        Control {
            limits,
            faults: Mutex::default(),
            stats: Mutex::default(),
            prov_buckets: Mutex::default(),
            last_connect: Mutex::default(),
        }
    }

    pub fn stat(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut lock(&self.stats));
    }

    pub fn stats(&self) -> Stats {
        lock(&self.stats).clone()
    }

    /// An accepted publish: counted per topic and per client.
    pub fn count_publish(&self, client: &str, topic: &str) {
        let mut s = lock(&self.stats);
        s.publishes_received += 1;
        bump_key(&mut s.publishes_by_topic, topic);
        bump_key(&mut s.publishes_by_client, client);
    }

    /// Whether new connections are being refused (fault).
    pub fn refusing(&self) -> bool {
        lock(&self.faults)
            .refuse_until
            .is_some_and(|t| t > Instant::now())
    }

    pub fn acks_stalled(&self) -> bool {
        lock(&self.faults)
            .stall_acks_until
            .is_some_and(|t| t > Instant::now())
    }

    pub fn reply_delay(&self) -> Duration {
        lock(&self.faults).reply_delay
    }

    /// An injected rejection for the next fleet-provisioning call, if any are armed.
    pub fn take_injected_rejection(&self) -> Option<ApiError> {
        let mut f = lock(&self.faults);
        if f.reject_next == 0 {
            return None;
        }
        f.reject_next -= 1;
        let e = f.reject_with.clone();
        drop(f);
        self.stat(|s| s.injected_rejections += 1);
        e
    }

    /// Account-wide fleet-provisioning TPS limit for `api`; false means throttled.
    pub fn provisioning_allowed(&self, api: &'static str) -> bool {
        let rate = match api {
            "RegisterThing" => self.limits.register_thing_tps,
            "CreateCertificateFromCsr" => self.limits.create_from_csr_tps,
            _ => self.limits.create_keys_tps,
        };
        let now = Instant::now();
        let ok = lock(&self.prov_buckets)
            .entry(api)
            .or_insert_with(|| Bucket::new(rate, now))
            .try_take(now);
        if !ok {
            self.stat(|s| s.throttled_provisioning_calls += 1);
        }
        ok
    }

    /// AWS allows one CONNECT per second per client id.
    pub fn connect_allowed(&self, client_id: &str) -> bool {
        let now = Instant::now();
        let mut m = lock(&self.last_connect);
        if m.len() > 100_000 {
            m.retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        }
        let ok = m
            .get(client_id)
            .is_none_or(|t| now.duration_since(*t) >= self.limits.connect_interval);
        if ok {
            m.insert(client_id.to_owned(), now);
        } else {
            drop(m);
            self.stat(|s| s.throttled_connects += 1);
        }
        ok
    }

    /// Apply one admin command; returns its JSON answer.
    pub fn command(&self, req: &Value) -> Result<Value, String> {
        let cmd = req
            .get("cmd")
            .and_then(Value::as_str)
            .ok_or("request lacks \"cmd\"")?;
        let secs = |k: &str| {
            req.get(k)
                .and_then(Value::as_f64)
                .filter(|v| *v >= 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| format!("{cmd}: \"{k}\" must be a non-negative number"))
        };
        let mut f = lock(&self.faults);
        match cmd {
            "refuse" => f.refuse_until = Some(Instant::now() + secs("seconds")?),
            "stall-acks" => f.stall_acks_until = Some(Instant::now() + secs("seconds")?),
            "delay" => f.reply_delay = secs("seconds")?,
            "reject-next" => {
                let n = req
                    .get("count")
                    .and_then(Value::as_u64)
                    .ok_or("reject-next: \"count\" must be a number")?;
                f.reject_next = u32::try_from(n).map_err(|_| "count too large")?;
                f.reject_with = Some(ApiError::new(
                    req.get("status")
                        .and_then(Value::as_u64)
                        .and_then(|s| u16::try_from(s).ok())
                        .unwrap_or(503),
                    req.get("code")
                        .and_then(Value::as_str)
                        .unwrap_or("ServiceUnavailableException"),
                    req.get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("Injected fault"),
                ));
            }
            "clear" => *f = Faults::default(),
            "counters" => {
                drop(f);
                return serde_json::to_value(self.stats()).map_err(|e| e.to_string());
            }
            "reset-counters" => {
                drop(f);
                *lock(&self.stats) = Stats::default();
            }
            // "drop-all" is handled by the broker, which owns the connections.
            other => return Err(format!("unknown command {other:?}")),
        }
        Ok(json!({"ok": true}))
    }
}

pub fn admin_socket_path(dir: &Path) -> PathBuf {
    dir.join("admin.sock")
}

/// A fault to inject into a running `serve` (or `Clear` to end them all).
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Drop every connection now.
    DropAll,
    /// Refuse new connections for a while.
    Refuse {
        seconds: f64,
    },
    /// Delay every fleet-provisioning response (0 to stop).
    Delay {
        ms: u64,
    },
    /// Reject the next `count` fleet-provisioning calls with this error.
    RejectNext {
        count: u32,
        status: u16,
        code: String,
        message: String,
    },
    /// Deliver publishes but withhold their PUBACKs for a while.
    StallAcks {
        seconds: f64,
    },
    Clear,
}

impl Fault {
    /// The admin-socket command for this fault.
    pub fn request(&self) -> Value {
        match self {
            Fault::DropAll => json!({"cmd": "drop-all"}),
            Fault::Refuse { seconds } => json!({"cmd": "refuse", "seconds": seconds}),
            Fault::Delay { ms } => json!({"cmd": "delay", "seconds": *ms as f64 / 1000.0}),
            Fault::RejectNext {
                count,
                status,
                code,
                message,
            } => {
                json!({"cmd": "reject-next", "count": count, "status": status, "code": code, "message": message})
            }
            Fault::StallAcks { seconds } => json!({"cmd": "stall-acks", "seconds": seconds}),
            Fault::Clear => json!({"cmd": "clear"}),
        }
    }
}

/// Apply `fault` to the server running in `dir`; returns its answer.
pub fn inject(dir: &Path, fault: &Fault) -> Result<Value, String> {
    admin_request(dir, &fault.request())
}

/// The running server's counters, zeroed afterwards when `reset`.
pub fn counters(dir: &Path, reset: bool) -> Result<Value, String> {
    let v = admin_request(dir, &json!({"cmd": "counters"}))?;
    if reset {
        admin_request(dir, &json!({"cmd": "reset-counters"}))?;
    }
    Ok(v)
}

/// Send one command to a running `serve` over its admin socket (used by the CLI).
pub fn admin_request(dir: &Path, req: &Value) -> Result<Value, String> {
    use std::io::{BufRead, BufReader, Write};
    let path = admin_socket_path(dir);
    let mut s = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        format!(
            "cannot reach the running server at {}: {e} (is `iotcore-sim serve` running?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    s.write_all(&line).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&answer).map_err(|e| format!("bad answer: {e}"))?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        return Err(err.to_owned());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bucket_allows_rate_per_second() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, t0);
        let taken = (0..20).filter(|_| b.try_take(t0)).count();
        assert_eq!(taken, 10);
        assert!(!b.try_take(t0 + Duration::from_millis(50)));
        assert!(b.try_take(t0 + Duration::from_millis(120)));
    }

    #[test]
    fn slow_rates_still_allow_a_first_call() {
        let t0 = Instant::now();
        let mut b = Bucket::new(0.25, t0);
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0 + Duration::from_secs(3)));
        assert!(b.try_take(t0 + Duration::from_secs(4)));
    }

    #[test]
    fn byte_bucket_delays_instead_of_refusing() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000.0, t0);
        assert_eq!(b.take_delay(1000.0, t0), Duration::ZERO);
        let d = b.take_delay(500.0, t0);
        assert!((d.as_secs_f64() - 0.5).abs() < 1e-9, "{d:?}");
    }

    #[test]
    fn injected_rejections_run_out() {
        let c = Control::new(Limits::default());
        c.command(&json!({"cmd": "reject-next", "count": 2, "code": "ThrottlingException", "status": 429}))
            .unwrap();
        assert_eq!(
            c.take_injected_rejection().unwrap().code,
            "ThrottlingException"
        );
        assert!(c.take_injected_rejection().is_some());
        assert!(c.take_injected_rejection().is_none());
        assert_eq!(c.stats().injected_rejections, 2);
        assert!(
            c.command(&json!({"cmd": "bogus"}))
                .unwrap_err()
                .contains("bogus")
        );
        assert!(c.command(&json!({"cmd": "refuse", "seconds": -1})).is_err());
    }

    #[test]
    fn one_connect_per_second_per_client_id() {
        let c = Control::new(Limits::default());
        assert!(c.connect_allowed("a"));
        assert!(!c.connect_allowed("a"));
        assert!(c.connect_allowed("b"));
        assert_eq!(c.stats().throttled_connects, 1);
    }
}
