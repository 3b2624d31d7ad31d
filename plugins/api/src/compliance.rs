//! The one compliance test every plugin runs against a live target (a simulator or a real line).
//!
//! A plugin's own tests build the plugin against a target, fill in a [`Target`] and call
//! [`check`]; it panics with a message naming the broken rule (it is test code).
//! The rules:
//! 1. `discover` returns within the bound and finds the expected device;
//! 2. `identify` gives the same identity on every call, and the same as `discover` found;
//! 3. `poll` of the device gives a timestamped reading for every point;
//! 4. `poll` and `identify` of an absent device return an error value within the bound;
//! 5. a write outside the map (unknown point, read-only point, value out of range) is refused
//!    with a `Refused*` error and puts nothing on the wire;
//! 6. a valid write, if the target has one, succeeds and the next poll reads the value back.

use std::future::Future;
use std::time::Duration;

use crate::{DeviceId, Plugin, PluginError, Value, WriteCommand};

/// What the plugin's tests know about their live target.
#[derive(Debug, Clone)]
pub struct Target {
    /// A device that is there and has a register map.
    pub device: DeviceId,
    /// An address on a reachable line where no device answers.
    pub absent: DeviceId,
    /// Writes the plugin must refuse before sending anything (unknown point, read-only point,
    /// value out of range...). At least one.
    pub refused_writes: Vec<WriteCommand>,
    /// A write that must succeed and read back (point, value), if the target has a writable point.
    pub valid_write: Option<WriteCommand>,
    /// The longest any one call may take.
    pub bound: Duration,
}

async fn bounded<F: Future>(what: &str, bound: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(bound, fut).await {
        Ok(out) => out,
        Err(_) => panic!("compliance: {what} did not return within {bound:?}"),
    }
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => (x - y).abs() <= 1e-6 * x.abs().max(1.0),
        (Value::Float(x), Value::Int(y)) | (Value::Int(y), Value::Float(x)) => {
            (x - *y as f64).abs() <= 1e-6 * x.abs().max(1.0)
        }
        _ => a == b,
    }
}

/// Runs every rule against `plugin`. Panics naming the first rule broken.
pub async fn check<P: Plugin>(plugin: &P, target: &Target) {
    let bound = target.bound;

    // 1. discover is bounded and finds the device.
    let found = bounded("discover", bound, plugin.discover())
        .await
        .unwrap_or_else(|e| panic!("compliance: discover failed: {e}"));
    let Some(found_dev) = found.iter().find(|d| d.id == target.device) else {
        panic!(
            "compliance: discover did not find {} (found {:?})",
            target.device,
            found.iter().map(|d| &d.id).collect::<Vec<_>>()
        );
    };
    assert!(
        !found.iter().any(|d| d.id == target.absent),
        "compliance: discover reported the absent device {}",
        target.absent
    );

    // 2. identify is stable and agrees with discover.
    let first = bounded("identify", bound, plugin.identify(&target.device))
        .await
        .unwrap_or_else(|e| panic!("compliance: identify failed: {e}"));
    let second = bounded("identify", bound, plugin.identify(&target.device))
        .await
        .unwrap_or_else(|e| panic!("compliance: second identify failed: {e}"));
    assert_eq!(
        first, second,
        "compliance: identify is not stable across calls"
    );
    assert_eq!(
        first, found_dev.identity,
        "compliance: identify disagrees with what discover found"
    );

    // 3. poll gives a timestamped reading per point.
    let telemetry = bounded("poll", bound, plugin.poll(&target.device))
        .await
        .unwrap_or_else(|e| panic!("compliance: poll failed: {e}"));
    assert_eq!(
        telemetry.device, target.device,
        "compliance: poll names another device"
    );
    assert!(
        telemetry.timestamp_ms > 0,
        "compliance: poll has no timestamp"
    );
    assert!(
        !telemetry.readings.is_empty(),
        "compliance: poll read no points"
    );

    // 4. an absent device is an error value, not a panic and not a hang.
    match bounded(
        "poll of an absent device",
        bound,
        plugin.poll(&target.absent),
    )
    .await
    {
        Err(_) => {}
        Ok(t) => {
            assert!(
                t.readings.iter().all(|r| r.value.is_err()),
                "compliance: poll of the absent device {} read values: {t:?}",
                target.absent
            );
        }
    }
    let absent_identity = bounded(
        "identify of an absent device",
        bound,
        plugin.identify(&target.absent),
    )
    .await;
    assert!(
        absent_identity.is_err(),
        "compliance: identify of the absent device {} gave {absent_identity:?}",
        target.absent
    );
    let unknown = DeviceId("no-such-scheme://nowhere".into());
    let e = bounded(
        "poll of an unaddressable device",
        bound,
        plugin.poll(&unknown),
    )
    .await
    .err();
    assert!(
        matches!(e, Some(PluginError::UnknownDevice(_))),
        "compliance: poll of {unknown} gave {e:?}, want UnknownDevice"
    );

    // 5. refused writes never touch the wire.
    assert!(
        !target.refused_writes.is_empty(),
        "compliance: the target names no write to refuse"
    );
    for cmd in &target.refused_writes {
        let before = plugin.stats().requests;
        let r = bounded("refused write", bound, plugin.write(&target.device, cmd)).await;
        let after = plugin.stats().requests;
        match r {
            Err(e) if e.is_refusal() => {}
            other => panic!("compliance: write {cmd:?} gave {other:?}, want a refusal"),
        }
        assert_eq!(
            before,
            after,
            "compliance: refused write {cmd:?} put {} request(s) on the wire",
            after - before
        );
    }

    // 6. a valid write succeeds and reads back.
    if let Some(cmd) = &target.valid_write {
        bounded("write", bound, plugin.write(&target.device, cmd))
            .await
            .unwrap_or_else(|e| panic!("compliance: write {cmd:?} failed: {e}"));
        let t = bounded("poll after write", bound, plugin.poll(&target.device))
            .await
            .unwrap_or_else(|e| panic!("compliance: poll after write failed: {e}"));
        let r = t
            .readings
            .iter()
            .find(|r| r.name == cmd.point)
            .unwrap_or_else(|| panic!("compliance: poll has no point {:?}", cmd.point));
        match &r.value {
            Ok(v) if same_value(v, &cmd.value) => {}
            other => panic!(
                "compliance: after writing {:?} to {:?}, poll read {other:?}",
                cmd.value, cmd.point
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The harness against an in-memory plugin, once well behaved and once per broken rule.
    use super::*;
    use crate::{FoundDevice, Identity, PluginStats, Reading, Telemetry, WriteOutcome, now_ms};
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Default)]
    struct Fake {
        hang_discover: bool,
        unstable_identify: bool,
        absent_answers: bool,
        refused_write_hits_wire: bool,
        calls: AtomicU64,
        requests: AtomicU64,
        stored: std::sync::Mutex<i64>,
    }

    fn id(n: &str) -> DeviceId {
        DeviceId(format!("fake://{n}"))
    }

    impl Fake {
        fn identity(&self) -> Identity {
            let mut i = Identity::unidentified();
            i.serial = Some("S1".into());
            if self.unstable_identify {
                i.revision = Some(self.calls.fetch_add(1, Ordering::SeqCst).to_string());
            }
            i
        }
    }

    impl Plugin for Fake {
        fn name(&self) -> &str {
            "fake"
        }
        async fn discover(&self) -> Result<Vec<FoundDevice>, PluginError> {
            if self.hang_discover {
                std::future::pending::<()>().await;
            }
            Ok(vec![FoundDevice {
                id: id("dev"),
                identity: self.identity(),
                profile: None,
                template: None,
                parameters: Default::default(),
            }])
        }
        async fn identify(&self, d: &DeviceId) -> Result<Identity, PluginError> {
            if *d == id("dev") || self.absent_answers {
                Ok(self.identity())
            } else {
                Err(PluginError::Timeout { after_ms: 1 })
            }
        }
        async fn poll(&self, d: &DeviceId) -> Result<Telemetry, PluginError> {
            if !d.0.starts_with("fake://") {
                return Err(PluginError::UnknownDevice(d.0.clone()));
            }
            if *d != id("dev") && !self.absent_answers {
                return Err(PluginError::Timeout { after_ms: 1 });
            }
            let v = *self.stored.lock().expect("lock");
            Ok(Telemetry {
                device: d.clone(),
                timestamp_ms: now_ms(),
                readings: vec![Reading {
                    name: "x".into(),
                    value: Ok(Value::Int(v)),
                    unit: None,
                }],
            })
        }
        async fn write(&self, d: &DeviceId, c: &WriteCommand) -> Result<WriteOutcome, PluginError> {
            if self.refused_write_hits_wire {
                self.requests.fetch_add(1, Ordering::SeqCst);
            }
            if c.point != "x" {
                return Err(PluginError::RefusedUnknownPoint(c.point.clone()));
            }
            let Value::Int(v) = c.value else {
                return Err(PluginError::RefusedValue("not an int".into()));
            };
            *self.stored.lock().expect("lock") = v;
            Ok(WriteOutcome {
                device: d.clone(),
                point: c.point.clone(),
                value: c.value.clone(),
                timestamp_ms: now_ms(),
            })
        }
        fn stats(&self) -> PluginStats {
            PluginStats {
                requests: self.requests.load(Ordering::SeqCst),
                ..Default::default()
            }
        }
    }

    fn target() -> Target {
        Target {
            device: id("dev"),
            absent: id("absent"),
            refused_writes: vec![WriteCommand {
                point: "y".into(),
                value: Value::Int(1),
            }],
            valid_write: Some(WriteCommand {
                point: "x".into(),
                value: Value::Int(7),
            }),
            bound: Duration::from_secs(5),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_well_behaved_plugin_passes() {
        check(&Fake::default(), &target()).await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "discover did not return within")]
    async fn an_unbounded_discover_fails() {
        check(
            &Fake {
                hang_discover: true,
                ..Default::default()
            },
            &target(),
        )
        .await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "identify is not stable")]
    async fn an_unstable_identity_fails() {
        check(
            &Fake {
                unstable_identify: true,
                ..Default::default()
            },
            &target(),
        )
        .await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "read values")]
    async fn an_absent_device_that_reads_fails() {
        check(
            &Fake {
                absent_answers: true,
                ..Default::default()
            },
            &target(),
        )
        .await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "put 1 request(s) on the wire")]
    async fn a_refused_write_on_the_wire_fails() {
        check(
            &Fake {
                refused_write_hits_wire: true,
                ..Default::default()
            },
            &target(),
        )
        .await;
    }
}
