//! Telemetry and commands for plugin-found children (today Modbus): which device each child is
//! (`Bindings`, persisted in the store by discovery), a poll loop per admitted child that turns
//! its register map into a JSON document on `dt/<child>/telemetry`, and the write commands the
//! gateway takes on `cmd/<child>/write`, answered on `dt/<child>/write-result`.
//!
//! Every document goes two ways: appended to the outbox as that child's upstream message (the
//! bridge carries it to the cloud), and published on the local router for local subscribers,
//! through the gateway's own router link (`local::Endpoint::internal_link`). Commands come in
//! through the same link (subscribed to `cmd/+/write`), so a local application and the bridge
//! reach a Modbus child the same way an MQTT child is reached.
//!
//! Pure parts (the document, on-change reporting, back-off, command parsing) have no I/O.
//! Must not touch: the plugin's wire (only the `Plugin` trait), the provisioning queue (read
//! only), the cloud.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatewayd_plugin::{DeviceId, Plugin, PluginError, Telemetry, Value, WriteCommand, now_ms};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::children::provision::Provisioner;
use crate::daemon::config::{DiscoveryConfig, Report};
use crate::daemon::status::{PluginService, PluginStatus};
use crate::local::router::{Delivery, LinkReceiver, LinkSender};
use crate::outbox::Outbox;
use crate::store::{Store, StoreError};

/// The local filter the gateway takes commands for plugin children on.
pub const COMMAND_FILTER: &str = "cmd/+/write";

/// Job states whose children are polled and take writes: admitted by policy or by an operator.
/// A queued child is polled before its thing exists, so its first readings wait in the outbox
/// instead of being lost; a child awaiting approval, denied or failed is left alone.
const ADMITTED: [&str; 2] = ["queued", "provisioned"];

/// How often the set of polled children is brought in line with the queue and the bindings.
const SUPERVISE_EVERY: Duration = Duration::from_secs(1);

/// Which device a child is, as its plugin addresses it, and the profile it matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBinding {
    pub plugin: String,
    pub device: DeviceId,
    #[serde(default)]
    pub profile: Option<String>,
}

/// Child id → device binding, read from the store at start and written through on change.
#[derive(Debug, Clone)]
pub struct Bindings {
    store: Store,
    map: Arc<Mutex<BTreeMap<String, DeviceBinding>>>,
}

impl Bindings {
    pub fn open(store: Store) -> Result<Bindings, StoreError> {
        let map = store.list_devices::<DeviceBinding>()?.into_iter().collect();
        Ok(Bindings {
            store,
            map: Arc::new(Mutex::new(map)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DeviceBinding>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records durably that `child` is `binding`; true when it was new or changed. Blocking.
    pub fn bind(&self, child: &str, binding: DeviceBinding) -> Result<bool, StoreError> {
        let mut map = self.lock();
        if map.get(child) == Some(&binding) {
            return Ok(false);
        }
        self.store.save_device(child, &binding)?;
        map.insert(child.to_owned(), binding);
        Ok(true)
    }

    pub fn get(&self, child: &str) -> Option<DeviceBinding> {
        self.lock().get(child).cloned()
    }

    pub fn all(&self) -> Vec<(String, DeviceBinding)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// One point's value in a telemetry document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointValue {
    pub value: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// What `dt/<child>/telemetry` carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// Milliseconds since the Unix epoch, when the poll finished.
    pub ts: u64,
    pub values: BTreeMap<String, PointValue>,
    /// Points that could not be read, with what went wrong (a Modbus exception, a timeout).
    pub errors: BTreeMap<String, String>,
    /// The whole poll failed (the device could not be addressed at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Document {
    pub fn from_poll(poll: &Result<Telemetry, PluginError>, now_ms: u64) -> Document {
        let mut doc = Document {
            ts: now_ms,
            values: BTreeMap::new(),
            errors: BTreeMap::new(),
            error: None,
        };
        match poll {
            Ok(t) => {
                doc.ts = t.timestamp_ms;
                for r in &t.readings {
                    match &r.value {
                        Ok(v) => {
                            doc.values.insert(
                                r.name.clone(),
                                PointValue {
                                    value: v.clone(),
                                    unit: r.unit.clone(),
                                },
                            );
                        }
                        Err(e) => {
                            doc.errors.insert(r.name.clone(), e.to_string());
                        }
                    }
                }
            }
            Err(e) => doc.error = Some(e.to_string()),
        }
        doc
    }

    /// Same values and errors, whatever the timestamp.
    fn same_content(&self, other: &Document) -> bool {
        self.values == other.values && self.errors == other.errors && self.error == other.error
    }
}

/// The device did not answer at all: the poll failed for a transient reason, or every point
/// failed with one (a silent device times out on each point). Polling backs off.
pub fn unreachable(poll: &Result<Telemetry, PluginError>) -> bool {
    match poll {
        Err(e) => e.is_transient(),
        Ok(t) => {
            !t.readings.is_empty()
                && t.readings
                    .iter()
                    .all(|r| r.value.as_ref().is_err_and(PluginError::is_transient))
        }
    }
}

/// Decides which documents are published.
#[derive(Debug)]
pub struct Reporter {
    mode: Report,
    heartbeat: Duration,
    last: Option<(Document, Instant)>,
}

impl Reporter {
    pub fn new(mode: Report, heartbeat: Duration) -> Reporter {
        Reporter {
            mode,
            heartbeat,
            last: None,
        }
    }

    /// True when `doc` is to be published now (and it becomes the last published).
    pub fn offer(&mut self, doc: &Document, now: Instant) -> bool {
        let publish = match (&self.last, self.mode) {
            (None, _) | (_, Report::Always) => true,
            (Some((last, at)), Report::OnChange) => {
                !doc.same_content(last) || now.duration_since(*at) >= self.heartbeat
            }
        };
        if publish {
            self.last = Some((doc.clone(), now));
        }
        publish
    }
}

/// The wait before the next poll after `failures` unanswered polls in a row: the interval,
/// doubled per failure, at most `max`.
pub fn next_delay(interval: Duration, max: Duration, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX);
    interval.saturating_mul(factor).min(max.max(interval))
}

/// A parsed write command.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub child: String,
    /// The caller's request id, echoed in the result (any JSON value; absent is null).
    pub id: serde_json::Value,
    /// The write, or why the command could not be understood.
    pub write: Result<WriteCommand, String>,
}

/// `cmd/<child>/write` with `{"point": .., "value": .., "id": ..}`; None for another topic.
pub fn parse_command(topic: &str, payload: &[u8]) -> Option<Command> {
    let mut parts = topic.split('/');
    let (Some("cmd"), Some(child), Some("write"), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let mut cmd = Command {
        child: child.to_owned(),
        id: serde_json::Value::Null,
        write: Err(String::new()),
    };
    let json: serde_json::Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => {
            cmd.write = Err(format!("refused: the command is not JSON: {e}"));
            return Some(cmd);
        }
    };
    cmd.id = json.get("id").cloned().unwrap_or_default();
    let point = json.get("point").and_then(|p| p.as_str());
    let value = match json.get("value") {
        Some(serde_json::Value::Bool(b)) => Some(Value::Bool(*b)),
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .map(Value::Int)
            .or_else(|| n.as_f64().map(Value::Float)),
        Some(serde_json::Value::String(s)) => Some(Value::Text(s.clone())),
        _ => None,
    };
    cmd.write = match (point, value) {
        (Some(p), Some(v)) => Ok(WriteCommand {
            point: p.to_owned(),
            value: v,
        }),
        (None, _) => Err("refused: the command has no \"point\" string".into()),
        (_, None) => Err("refused: the command's \"value\" is not a bool, number or string".into()),
    };
    Some(cmd)
}

/// What `dt/<child>/write-result` carries.
pub fn write_result(id: &serde_json::Value, result: &Result<WriteCommand, String>) -> Vec<u8> {
    let doc = match result {
        Ok(w) => serde_json::json!({
            "id": id, "ok": true, "point": w.point, "value": w.value, "ts": now_ms(),
        }),
        Err(e) => serde_json::json!({"id": id, "ok": false, "error": e, "ts": now_ms()}),
    };
    doc.to_string().into_bytes()
}

/// A message for one child's upstream and for local subscribers.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub child: String,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Figures shown by `gatewayctl status`.
#[derive(Debug, Default)]
pub struct Counters {
    pub polls: AtomicU64,
    pub unreachable: AtomicU64,
    pub point_errors: AtomicU64,
    pub published: AtomicU64,
    pub publish_failed: AtomicU64,
    pub writes: AtomicU64,
    pub writes_refused: AtomicU64,
    pub writes_failed: AtomicU64,
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// How one child is polled.
#[derive(Debug, Clone, Copy)]
pub struct PollConfig {
    pub interval: Duration,
    pub backoff_max: Duration,
    pub report: Report,
    pub heartbeat: Duration,
}

impl PollConfig {
    pub fn from_config(d: &DiscoveryConfig) -> PollConfig {
        PollConfig {
            interval: Duration::from_millis(d.poll_interval_ms),
            backoff_max: Duration::from_millis(d.poll_backoff_max_ms),
            report: d.report,
            heartbeat: Duration::from_secs(d.heartbeat_secs),
        }
    }
}

/// Child id → its thing name once known, for the children being polled now.
type Active = Arc<Mutex<HashMap<String, Option<String>>>>;

fn thing_of(active: &Active, child: &str) -> String {
    active
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(child)
        .cloned()
        .flatten()
        .unwrap_or_else(|| "-".into())
}

/// Polls one child until cancelled: a poll every `interval` (from the start of one poll to the
/// start of the next), slower while it does not answer.
#[allow(clippy::too_many_arguments)]
pub async fn poll_child<P: Plugin>(
    plugin: Arc<P>,
    child: String,
    device: DeviceId,
    cfg: PollConfig,
    out: mpsc::Sender<Message>,
    counters: Arc<Counters>,
    active: Active,
    cancel: CancellationToken,
) {
    let mut reporter = Reporter::new(cfg.report, cfg.heartbeat);
    let mut failures = 0u32;
    let topic = format!("dt/{child}/telemetry");
    loop {
        let started = Instant::now();
        let poll = tokio::select! {
            _ = cancel.cancelled() => return,
            p = plugin.poll(&device) => p,
        };
        bump(&counters.polls, 1);
        let doc = Document::from_poll(&poll, now_ms());
        bump(&counters.point_errors, doc.errors.len() as u64);
        if unreachable(&poll) {
            failures = failures.saturating_add(1);
            bump(&counters.unreachable, 1);
            if failures == 1 {
                let error = doc
                    .error
                    .clone()
                    .or_else(|| doc.errors.values().next().cloned())
                    .unwrap_or_default();
                tracing::warn!(child = %child, thing = %thing_of(&active, &child), %device, %error,
                    "Modbus child does not answer; polling backs off until it does");
            }
        } else {
            if failures > 0 {
                tracing::info!(child = %child, thing = %thing_of(&active, &child), %device, failures,
                    "Modbus child answers again; polling at the normal period");
            }
            failures = 0;
            if let Some(error) = &doc.error {
                tracing::debug!(child = %child, %device, %error, "poll failed");
            }
        }
        if reporter.offer(&doc, Instant::now()) {
            // A document of strings and finite numbers always encodes; the error is named anyway
            // and the loop keeps its period.
            match serde_json::to_vec(&doc) {
                Ok(payload) => {
                    let m = Message {
                        child: child.clone(),
                        topic: topic.clone(),
                        payload,
                    };
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = out.send(m) => if r.is_err() { return },
                    }
                }
                Err(error) => {
                    tracing::error!(child = %child, %error, "telemetry document not encodable")
                }
            }
        }
        let delay = next_delay(cfg.interval, cfg.backoff_max, failures);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(started + delay) => {}
        }
    }
}

/// Appends each message to the outbox (durable on return) and routes it to local subscribers.
async fn publish_loop(
    mut rx: mpsc::Receiver<Message>,
    outbox: Outbox,
    link: Arc<tokio::sync::Mutex<LinkSender>>,
    counters: Arc<Counters>,
) {
    while let Some(m) = rx.recv().await {
        match outbox.append(&m.child, &m.topic, 1, &m.payload).await {
            Ok(_) => bump(&counters.published, 1),
            Err(error) => {
                bump(&counters.publish_failed, 1);
                tracing::warn!(child = %m.child, topic = %m.topic, %error,
                    "message not stored in the outbox; it is still routed to local subscribers");
            }
        }
        if !link
            .lock()
            .await
            .publish(&m.topic, &m.payload, 0, 0, false)
            .await
        {
            tracing::warn!(child = %m.child, topic = %m.topic, "local router link closed; message not routed locally");
        }
    }
}

/// The parts the loops share.
pub struct Service<P> {
    pub plugin: Arc<P>,
    pub bindings: Bindings,
    pub provisioner: Provisioner,
    pub outbox: Outbox,
    pub poll: PollConfig,
    counters: Arc<Counters>,
    active: Active,
}

impl<P> std::fmt::Debug for Service<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("telemetry::Service").finish_non_exhaustive()
    }
}

impl<P: Plugin + 'static> Service<P> {
    pub fn new(
        plugin: Arc<P>,
        bindings: Bindings,
        provisioner: Provisioner,
        outbox: Outbox,
        poll: PollConfig,
    ) -> Arc<Service<P>> {
        Arc::new(Service {
            plugin,
            bindings,
            provisioner,
            outbox,
            poll,
            counters: Arc::default(),
            active: Arc::default(),
        })
    }

    /// Starts the publisher, the command listener and the supervisor of the poll loops on
    /// `tracker`, over the gateway's own router link.
    pub fn spawn(
        self: &Arc<Self>,
        (tx, rx): (LinkSender, LinkReceiver),
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) {
        let (out_tx, out_rx) = mpsc::channel(256);
        let link = Arc::new(tokio::sync::Mutex::new(tx));
        tracker.spawn(publish_loop(
            out_rx,
            self.outbox.clone(),
            link.clone(),
            self.counters.clone(),
        ));
        tracker.spawn(
            self.clone()
                .commands(rx, link, out_tx.clone(), cancel.clone()),
        );
        tracker.spawn(
            self.clone()
                .supervise(out_tx, cancel.clone(), tracker.clone()),
        );
    }

    /// Keeps one poll loop per admitted, bound child with a profile.
    async fn supervise(
        self: Arc<Self>,
        out: mpsc::Sender<Message>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) {
        // Child → the device its loop polls, and the loop's stop.
        let mut running: HashMap<String, (DeviceId, CancellationToken)> = HashMap::new();
        let mut tick = tokio::time::interval(SUPERVISE_EVERY);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let name = self.plugin.name().to_owned();
            let bound: Vec<(String, DeviceBinding)> = self
                .bindings
                .all()
                .into_iter()
                .filter(|(_, b)| b.plugin == name && b.profile.is_some())
                .collect();
            let p = self.provisioner.clone();
            let Ok(views) = tokio::task::spawn_blocking(move || {
                bound
                    .into_iter()
                    .map(|(c, b)| {
                        let v = p.show(&c).ok();
                        (c, b, v)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            else {
                continue;
            };
            let mut admitted = HashMap::new();
            for (child, b, view) in views {
                let Some(view) = view.filter(|v| ADMITTED.contains(&v.state.as_str())) else {
                    continue;
                };
                admitted.insert(child.clone(), view.thing_name.clone());
                match running.get(&child) {
                    Some((device, _)) if *device == b.device => continue,
                    // A scan found the child at another address: poll it there.
                    Some((_, stop)) => stop.cancel(),
                    None => {}
                }
                tracing::info!(child = %child, thing = view.thing_name.as_deref().unwrap_or("-"),
                    device = %b.device, profile = b.profile.as_deref().unwrap_or("-"),
                    "polling Modbus child");
                let stop = cancel.child_token();
                running.insert(child.clone(), (b.device.clone(), stop.clone()));
                tracker.spawn(poll_child(
                    self.plugin.clone(),
                    child,
                    b.device,
                    self.poll,
                    out.clone(),
                    self.counters.clone(),
                    self.active.clone(),
                    stop,
                ));
            }
            running.retain(|child, (_, stop)| {
                let keep = admitted.contains_key(child);
                if !keep {
                    tracing::info!(child = %child, "child no longer admitted; polling stops");
                    stop.cancel();
                }
                keep
            });
            *self.active.lock().unwrap_or_else(|e| e.into_inner()) = admitted;
        }
    }

    /// Takes write commands from the router link, one at a time.
    async fn commands(
        self: Arc<Self>,
        mut rx: LinkReceiver,
        link: Arc<tokio::sync::Mutex<LinkSender>>,
        out: mpsc::Sender<Message>,
        cancel: CancellationToken,
    ) {
        if !link
            .lock()
            .await
            .subscribe(1, &[(COMMAND_FILTER.to_owned(), 1)])
            .await
        {
            tracing::error!(
                filter = COMMAND_FILTER,
                "cannot subscribe on the local router; commands to Modbus children are off"
            );
            return;
        }
        loop {
            let d = tokio::select! {
                _ = cancel.cancelled() => return,
                d = rx.next() => match d {
                    Some(d) => d,
                    None => {
                        tracing::error!("local router link closed; commands to Modbus children stop");
                        return;
                    }
                },
            };
            if d.qos > 0 && !link.lock().await.ack(d.pkid).await {
                tracing::error!("local router link closed; commands to Modbus children stop");
                return;
            }
            if let Some(m) = self.command(&d).await
                && out.send(m).await.is_err()
            {
                return;
            }
        }
    }

    /// Carries one command out; the result message, or None when the child is not ours (an
    /// MQTT child's command is routed to it by the router, not handled here).
    async fn command(&self, d: &Delivery) -> Option<Message> {
        self.command_on(&d.topic, &d.payload).await
    }

    /// Carries out a command given by topic and payload (the router's, or the bridge's queue of
    /// cloud commands).
    async fn command_on(&self, topic: &str, payload: &[u8]) -> Option<Message> {
        let cmd = parse_command(topic, payload)?;
        let binding = self
            .bindings
            .get(&cmd.child)
            .filter(|b| b.plugin == self.plugin.name())?;
        let child = cmd.child.clone();
        let thing = thing_of(&self.active, &child);
        let admitted = self
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&child);
        let result = match cmd.write {
            Err(e) => {
                bump(&self.counters.writes_refused, 1);
                Err(e)
            }
            Ok(_) if !admitted => {
                bump(&self.counters.writes_refused, 1);
                Err(format!(
                    "refused: child `{child}` is not admitted for polling and commands"
                ))
            }
            Ok(w) => match self.plugin.write(&binding.device, &w).await {
                Ok(done) => {
                    bump(&self.counters.writes, 1);
                    Ok(WriteCommand {
                        point: done.point,
                        value: done.value,
                    })
                }
                Err(e) => {
                    if e.is_refusal() {
                        bump(&self.counters.writes_refused, 1);
                    } else {
                        bump(&self.counters.writes_failed, 1);
                    }
                    Err(e.to_string())
                }
            },
        };
        match &result {
            Ok(w) => {
                tracing::info!(child = %child, %thing, point = %w.point, value = ?w.value, "write done")
            }
            Err(error) => tracing::warn!(child = %child, %thing, %error, "write not done"),
        }
        Some(Message {
            topic: format!("dt/{child}/write-result"),
            payload: write_result(&cmd.id, &result),
            child,
        })
    }
}

/// Cloud commands for this plugin's children come from the bridge's queue on disk (not through
/// the router), so that a command leaves the disk only once its result is in the outbox.
impl<P: Plugin + 'static> crate::bridge::downlink::Executor for Service<P> {
    fn takes(&self, child: &str) -> bool {
        self.bindings
            .get(child)
            .is_some_and(|b| b.plugin == self.plugin.name())
    }

    fn execute<'a>(
        &'a self,
        topic: &'a str,
        payload: &'a [u8],
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = crate::bridge::downlink::Outcome> + Send + 'a>,
    > {
        Box::pin(async move {
            self.command_on(topic, payload)
                .await
                .map(|m| (m.topic, m.payload))
        })
    }
}

impl<P: Plugin + 'static> PluginService for Service<P> {
    fn status(&self) -> PluginStatus {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = self.plugin.stats();
        PluginStatus {
            name: self.plugin.name().to_owned(),
            children: self.active.lock().unwrap_or_else(|e| e.into_inner()).len() as u64,
            polls: get(&c.polls),
            unreachable: get(&c.unreachable),
            point_errors: get(&c.point_errors),
            published: get(&c.published),
            publish_failed: get(&c.publish_failed),
            writes: get(&c.writes),
            writes_refused: get(&c.writes_refused),
            writes_failed: get(&c.writes_failed),
            requests: s.requests,
            timeouts: s.timeouts,
            reconnects: s.reconnects,
            connects: s.connects,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use gatewayd_plugin::{FoundDevice, Identity, PluginStats, Reading, WriteOutcome};

    fn reading(name: &str, value: Result<Value, PluginError>) -> Reading {
        Reading {
            name: name.into(),
            value,
            unit: Some("V".into()),
        }
    }

    fn telemetry(readings: Vec<Reading>) -> Result<Telemetry, PluginError> {
        Ok(Telemetry {
            device: DeviceId("d".into()),
            timestamp_ms: 7,
            readings,
        })
    }

    fn timeout() -> PluginError {
        PluginError::Timeout { after_ms: 300 }
    }

    #[test]
    fn documents_carry_values_units_and_errors() {
        let poll = telemetry(vec![
            reading("v", Ok(Value::Float(229.5))),
            reading(
                "x",
                Err(PluginError::Exception {
                    code: 2,
                    name: "Illegal Data Address".into(),
                }),
            ),
        ]);
        let doc = Document::from_poll(&poll, 1);
        assert_eq!(
            serde_json::to_value(&doc).unwrap(),
            serde_json::json!({"ts": 7, "values": {"v": {"value": 229.5, "unit": "V"}},
                "errors": {"x": "device exception 0x02 (Illegal Data Address)"}})
        );
        assert!(!unreachable(&poll));
        let silent = telemetry(vec![
            reading("v", Err(timeout())),
            reading("x", Err(timeout())),
        ]);
        assert!(unreachable(&silent));
        assert!(unreachable(&Err(PluginError::Transport("refused".into()))));
        let whole = Document::from_poll(&Err(PluginError::NoMap("d".into())), 5);
        assert_eq!(whole.ts, 5);
        assert_eq!(whole.error.as_deref(), Some("no register map for d"));
    }

    #[test]
    fn commands_parse_or_say_what_is_wrong() {
        let c = parse_command("cmd/m-1/write", br#"{"point":"sp","value":75,"id":"r1"}"#).unwrap();
        assert_eq!(c.child, "m-1");
        assert_eq!(c.id, "r1");
        assert_eq!(
            c.write,
            Ok(WriteCommand {
                point: "sp".into(),
                value: Value::Int(75)
            })
        );
        let c = parse_command("cmd/m-1/write", br#"{"point":"sp","value":7.5}"#).unwrap();
        assert_eq!(c.write.unwrap().value, Value::Float(7.5));
        let c = parse_command("cmd/m-1/write", br#"{"value":1,"id":3}"#).unwrap();
        assert_eq!(c.id, 3);
        assert!(c.write.unwrap_err().contains("no \"point\""));
        let c = parse_command("cmd/m-1/write", b"nope").unwrap();
        assert!(c.write.unwrap_err().contains("not JSON"));
        assert!(parse_command("cmd/m-1/other", b"{}").is_none());
        assert!(parse_command("cmd/m-1/write/x", b"{}").is_none());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = Duration::from_secs(1);
        let d: Vec<u64> = (0..7)
            .map(|n| next_delay(s, Duration::from_secs(10), n).as_secs())
            .collect();
        assert_eq!(d, [1, 2, 4, 8, 10, 10, 10]);
        assert_eq!(next_delay(s, s, 1000), s);
    }

    /// A plugin whose polls follow a script (the last entry repeats), recording when each came.
    struct Scripted {
        script: Vec<Result<Telemetry, PluginError>>,
        calls: Mutex<Vec<Instant>>,
    }

    impl Plugin for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        async fn discover(&self) -> Result<Vec<FoundDevice>, PluginError> {
            Ok(Vec::new())
        }
        async fn identify(&self, _: &DeviceId) -> Result<Identity, PluginError> {
            Ok(Identity::unidentified())
        }
        async fn poll(&self, _: &DeviceId) -> Result<Telemetry, PluginError> {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Instant::now());
            let i = (calls.len() - 1).min(self.script.len() - 1);
            self.script[i].clone()
        }
        async fn write(&self, _: &DeviceId, _: &WriteCommand) -> Result<WriteOutcome, PluginError> {
            Err(PluginError::RefusedNotWritable("x".into()))
        }
        fn stats(&self) -> PluginStats {
            PluginStats::default()
        }
    }

    fn value(v: i64) -> Result<Telemetry, PluginError> {
        telemetry(vec![reading("v", Ok(Value::Int(v)))])
    }

    /// Runs a poll loop over `script` for `secs` of paused time; the poll instants (seconds
    /// from the start) and the values of the published documents.
    async fn run(
        script: Vec<Result<Telemetry, PluginError>>,
        report: Report,
        secs: u64,
    ) -> (Vec<u64>, Vec<Document>) {
        let plugin = Arc::new(Scripted {
            script,
            calls: Mutex::new(Vec::new()),
        });
        let (tx, mut rx) = mpsc::channel(1000);
        let cancel = CancellationToken::new();
        let cfg = PollConfig {
            interval: Duration::from_secs(1),
            backoff_max: Duration::from_secs(8),
            report,
            heartbeat: Duration::from_secs(5),
        };
        let start = Instant::now();
        let task = tokio::spawn(poll_child(
            plugin.clone(),
            "c".into(),
            DeviceId("d".into()),
            cfg,
            tx,
            Arc::default(),
            Arc::default(),
            cancel.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(secs * 1000 + 500)).await;
        cancel.cancel();
        task.await.unwrap();
        let at = plugin
            .calls
            .lock()
            .unwrap()
            .iter()
            .map(|i| i.duration_since(start).as_secs())
            .collect();
        let mut docs = Vec::new();
        while let Ok(m) = rx.try_recv() {
            assert_eq!(m.topic, "dt/c/telemetry");
            docs.push(serde_json::from_slice(&m.payload).unwrap());
        }
        (at, docs)
    }

    fn ints(docs: &[Document]) -> Vec<i64> {
        docs.iter()
            .map(|d| match d.values.get("v").map(|p| &p.value) {
                Some(Value::Int(i)) => *i,
                _ => -1,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn always_publishes_every_poll_on_the_period() {
        let (at, docs) = run(vec![value(1)], Report::Always, 4).await;
        assert_eq!(at, [0, 1, 2, 3, 4]);
        assert_eq!(ints(&docs), [1, 1, 1, 1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn on_change_publishes_changes_and_a_heartbeat() {
        // Polls at 0..=12 s: 1 1 2 2 2 2 2 2 2 2 2 2 2; heartbeat 5 s.
        let script = vec![value(1), value(1), value(2)];
        let (at, docs) = run(script, Report::OnChange, 12).await;
        assert_eq!(at.len(), 13);
        // 0 s (first), 2 s (changed), 7 s and 12 s (heartbeats).
        assert_eq!(ints(&docs), [1, 2, 2, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_device_is_reported_polled_less_often_and_recovers() {
        let silent = telemetry(vec![reading("v", Err(timeout()))]);
        let mut script = vec![value(1)];
        script.extend(std::iter::repeat_n(silent, 5));
        script.push(value(2));
        let (at, docs) = run(script, Report::OnChange, 34).await;
        // ok at 0; silent at 1, 3 (+2), 7 (+4), 15 (+8), 23 (+8, the cap); answers at 31; then 32..
        assert_eq!(at, [0, 1, 3, 7, 15, 23, 31, 32, 33, 34]);
        // Published: the value; the error when it starts; the unchanged error again only as
        // heartbeats (5 s: not at 3 s, then at 7, 15, 23 s); the new value when it answers.
        assert_eq!(ints(&docs), [1, -1, -1, -1, -1, 2]);
        assert_eq!(
            docs[1].errors.get("v").map(String::as_str),
            Some("no answer within 300 ms")
        );
    }
}
