//! Bridge (downstream): commands from the cloud to children, kept on disk until delivered.
//!
//! - **Intake** (`intake`): once the gateway knows its thing name, one route and one
//!   `Keep::Restore` subscription per `[[bridge.commands]]` rule (`commands`, pure). A matched
//!   command for a known child (thing → child id through the provisioner) is written to the
//!   queue on disk, and only then is the cloud's message acknowledged (the route hand-off:
//!   manual acks). An unmatched topic or an unknown thing is acknowledged, counted and logged
//!   once (it would come back on every resumed session otherwise); a command the disk refused
//!   is not acknowledged.
//! - **Queue** (`Downlink`): per child, FIFO, each command with an expiry
//!   (`[bridge] command_expiry_secs`) on the wall clock (it must survive a restart), from an
//!   injected clock so tests need no real waits.
//! - **Delivery**: MQTT children through their session in the local endpoint (`local/conn.rs`
//!   asks `pending`, writes the PUBLISH itself and calls `done` on the child's PUBACK: rumqttd
//!   gives no end-to-end acknowledgement through a link). Modbus children through `execute`
//!   (`Executor`, the telemetry write path): the result is appended to the outbox before the
//!   command leaves the disk.
//! - **Expiry** (`expire`): a command not delivered in time is dropped and an expiry notice
//!   `{"id", "topic", "error"}` appended to the outbox on `dt/<child>/command-expired` (the
//!   upstream bridge carries it to the cloud).
//!
//! Owns the `downlink` table through the store; must not touch the connection's session or the
//! local sockets.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::commands::CommandMapper;
use crate::cloud::{Cloud, Keep, LinkState};
use crate::daemon::status::{Board, DownlinkService, DownlinkStatus};
use crate::outbox::Outbox;
use crate::store::{Store, StoreError};

/// Unix milliseconds now (injected in tests).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(gatewayd_plugin::now_ms)
}

/// The local topic expiry notices go up on (`dt/<child>/command-expired`).
pub fn expired_topic(child: &str) -> String {
    format!("dt/{child}/command-expired")
}

/// One queued command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub child: String,
    pub seq: u64,
    /// The local topic it is delivered on.
    pub topic: String,
    pub payload: Vec<u8>,
    pub received_ms: u64,
    pub expires_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    topic: String,
    payload: Vec<u8>,
    received_ms: u64,
    expires_ms: u64,
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    delivered: AtomicU64,
    expired: AtomicU64,
    unknown_thing: AtomicU64,
    unmapped: AtomicU64,
    store_failures: AtomicU64,
}

struct Inner {
    store: Store,
    expiry_ms: u64,
    clock: Clock,
    queue: Mutex<BTreeMap<String, VecDeque<Command>>>,
    next_seq: AtomicU64,
    changed: watch::Sender<u64>,
    counters: Counters,
    subscribed: Mutex<Vec<String>>,
    last_error: Mutex<Option<String>>,
}

/// The durable queue of cloud commands; cheap to clone.
#[derive(Clone)]
pub struct Downlink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Downlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downlink").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Downlink {
    /// Opens the queue with what the store holds (commands kept across a restart).
    pub fn open(store: Store, expiry: Duration, clock: Clock) -> Result<Downlink, StoreError> {
        let mut queue: BTreeMap<String, VecDeque<Command>> = BTreeMap::new();
        let mut max = 0;
        for (child, seq, r) in store.list_commands::<Record>()? {
            max = max.max(seq);
            queue.entry(child.clone()).or_default().push_back(Command {
                child,
                seq,
                topic: r.topic,
                payload: r.payload,
                received_ms: r.received_ms,
                expires_ms: r.expires_ms,
            });
        }
        let (changed, _) = watch::channel(0);
        Ok(Downlink {
            inner: Arc::new(Inner {
                store,
                expiry_ms: u64::try_from(expiry.as_millis()).unwrap_or(u64::MAX),
                clock,
                queue: Mutex::new(queue),
                next_seq: AtomicU64::new(max + 1),
                changed,
                counters: Counters::default(),
                subscribed: Mutex::new(Vec::new()),
                last_error: Mutex::new(None),
            }),
        })
    }

    fn now(&self) -> u64 {
        (self.inner.clock)()
    }

    fn bump(&self) {
        self.inner.changed.send_modify(|n| *n += 1);
    }

    /// Changes to the queue (a command added or removed).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Writes a command for `child` durably (blocking: the store's commit), then queues it.
    pub fn push(&self, child: &str, topic: &str, payload: &[u8]) -> Result<Command, StoreError> {
        let now = self.now();
        let c = Command {
            child: child.to_owned(),
            seq: self.inner.next_seq.fetch_add(1, Ordering::Relaxed),
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            received_ms: now,
            expires_ms: now.saturating_add(self.inner.expiry_ms),
        };
        let r = Record {
            topic: c.topic.clone(),
            payload: c.payload.clone(),
            received_ms: c.received_ms,
            expires_ms: c.expires_ms,
        };
        if let Err(e) = self.inner.store.save_command(child, c.seq, &r) {
            self.inner
                .counters
                .store_failures
                .fetch_add(1, Ordering::Relaxed);
            *lock(&self.inner.last_error) = Some(format!("command not stored: {e}"));
            return Err(e);
        }
        self.inner.counters.received.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.queue)
            .entry(child.to_owned())
            .or_default()
            .push_back(c.clone());
        self.bump();
        Ok(c)
    }

    /// `child`'s commands not expired yet, in arrival order.
    pub fn pending(&self, child: &str) -> Vec<Command> {
        let now = self.now();
        lock(&self.inner.queue)
            .get(child)
            .map(|q| q.iter().filter(|c| c.expires_ms > now).cloned().collect())
            .unwrap_or_default()
    }

    /// Children with commands queued (expired or not).
    pub fn children(&self) -> Vec<String> {
        lock(&self.inner.queue).keys().cloned().collect()
    }

    fn remove(&self, which: &[(String, u64)]) -> Result<(), StoreError> {
        let refs: Vec<(&str, u64)> = which.iter().map(|(c, s)| (c.as_str(), *s)).collect();
        self.inner.store.remove_commands(&refs)?;
        let mut q = lock(&self.inner.queue);
        for (child, seq) in which {
            if let Some(list) = q.get_mut(child) {
                list.retain(|c| c.seq != *seq);
                if list.is_empty() {
                    q.remove(child);
                }
            }
        }
        drop(q);
        self.bump();
        Ok(())
    }

    /// The child has the command: it leaves the disk (blocking). Counted as delivered once.
    pub fn done(&self, child: &str, seq: u64) -> Result<(), StoreError> {
        let known = lock(&self.inner.queue)
            .get(child)
            .is_some_and(|q| q.iter().any(|c| c.seq == seq));
        self.remove(&[(child.to_owned(), seq)])?;
        if known {
            self.inner
                .counters
                .delivered
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Dropped without delivery (a Modbus child got a topic it cannot carry out).
    pub fn discard(&self, child: &str, seq: u64) -> Result<(), StoreError> {
        self.remove(&[(child.to_owned(), seq)])?;
        self.inner.counters.unmapped.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Every command whose expiry has passed (still queued: see `drop_expired`).
    pub fn expired(&self) -> Vec<Command> {
        let now = self.now();
        lock(&self.inner.queue)
            .values()
            .flatten()
            .filter(|c| c.expires_ms <= now)
            .cloned()
            .collect()
    }

    /// Removes expired commands (after their notices are in the outbox).
    pub fn drop_expired(&self, list: &[Command]) -> Result<(), StoreError> {
        let which: Vec<(String, u64)> = list.iter().map(|c| (c.child.clone(), c.seq)).collect();
        self.remove(&which)?;
        self.inner
            .counters
            .expired
            .fetch_add(list.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn set_error(&self, e: String) {
        *lock(&self.inner.last_error) = Some(e);
    }
}

impl DownlinkService for Downlink {
    fn status(&self) -> DownlinkStatus {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let per_child: BTreeMap<String, u64> = lock(&self.inner.queue)
            .iter()
            .map(|(k, v)| (k.clone(), v.len() as u64))
            .collect();
        DownlinkStatus {
            subscribed: lock(&self.inner.subscribed).clone(),
            received: get(&c.received),
            queued: per_child.values().sum(),
            per_child,
            delivered: get(&c.delivered),
            expired: get(&c.expired),
            unknown_thing: get(&c.unknown_thing),
            unmapped: get(&c.unmapped),
            store_failures: get(&c.store_failures),
            last_error: lock(&self.inner.last_error).clone(),
        }
    }
}

/// Which child a thing is (the provisioner in the daemon; a map in tests).
pub trait ChildOfThing: Send + Sync {
    fn child_of(&self, thing: &str) -> Option<String>;
}

impl ChildOfThing for crate::children::provision::Provisioner {
    fn child_of(&self, thing: &str) -> Option<String> {
        self.list()
            .into_iter()
            .find(|c| c.thing_name.as_deref() == Some(thing))
            .map(|c| c.id)
    }
}

/// How long a subscription the cloud refused waits before it is asked for again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(10);

/// Takes commands from the cloud into the queue. Runs until `cancel`.
pub async fn intake(
    cloud: Cloud,
    mapper: CommandMapper,
    queue: Downlink,
    children: Arc<dyn ChildOfThing>,
    board: Arc<Board>,
    cancel: CancellationToken,
) {
    // The gateway's thing name (known from the store at start once registered).
    let gateway = loop {
        if let Some(g) = board.identity().thing_name {
            break g;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    let filters = mapper.filters(&gateway);
    // Routes first, so nothing that arrives right after a SUBACK (or on a resumed session) is
    // acknowledged for want of a route.
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let mut guards = Vec::new();
    let mut forwarders = Vec::new();
    for f in &filters {
        match cloud.route(f, 64) {
            Ok((guard, mut r)) => {
                let tx = tx.clone();
                guards.push(guard);
                // One receiver for every rule's route (ends when its guard is dropped).
                forwarders.push(tokio::spawn(async move {
                    while let Some(d) = r.recv().await {
                        if tx.send(d).await.is_err() {
                            return;
                        }
                    }
                }));
            }
            Err(error) => {
                tracing::error!(filter = %f, %error, "cannot route cloud commands; commands on this filter are off");
            }
        }
    }
    drop(tx);
    let subscriber = tokio::spawn(subscribe(
        cloud.clone(),
        filters.clone(),
        queue.clone(),
        cancel.clone(),
    ));
    let mut unknown_logged: HashSet<String> = HashSet::new();
    let mut unmapped_logged: HashSet<String> = HashSet::new();
    let mut known: HashMap<String, String> = HashMap::new();
    loop {
        let d = tokio::select! {
            _ = cancel.cancelled() => break,
            d = rx.recv() => match d {
                Some(d) => d,
                None => break,
            },
        };
        let topic = d.topic().to_owned();
        let Some(m) = mapper.match_cloud(&topic, &gateway) else {
            queue
                .inner
                .counters
                .unmapped
                .fetch_add(1, Ordering::Relaxed);
            if unmapped_logged.insert(topic.clone()) {
                tracing::warn!(%topic, "no [[bridge.commands]] rule matches this cloud topic; acknowledged and dropped (logged once per topic)");
            }
            d.ack();
            continue;
        };
        let child = match known.get(&m.thing) {
            Some(c) => Some(c.clone()),
            None => {
                let (ch, thing) = (children.clone(), m.thing.clone());
                let found = tokio::task::spawn_blocking(move || ch.child_of(&thing))
                    .await
                    .ok()
                    .flatten();
                if let Some(c) = &found {
                    known.insert(m.thing.clone(), c.clone());
                }
                found
            }
        };
        let Some(child) = child else {
            queue
                .inner
                .counters
                .unknown_thing
                .fetch_add(1, Ordering::Relaxed);
            if unknown_logged.insert(m.thing.clone()) {
                tracing::warn!(%topic, thing = %m.thing, "cloud command for a thing that is no child of this gateway; acknowledged and dropped (logged once per thing)");
            }
            d.ack();
            continue;
        };
        let local = mapper.local_topic(&m, &child);
        let (q, c, l, payload) = (
            queue.clone(),
            child.clone(),
            local.clone(),
            d.payload().to_vec(),
        );
        match tokio::task::spawn_blocking(move || q.push(&c, &l, &payload)).await {
            Ok(Ok(cmd)) => {
                tracing::debug!(child = %child, thing = %m.thing, %topic, local_topic = %local, seq = cmd.seq, "cloud command queued");
                // On disk: now the cloud may forget it.
                d.ack();
            }
            Ok(Err(error)) => {
                tracing::error!(child = %child, %topic, %error, "cloud command not stored; not acknowledged (the cloud sends it again on a resumed session)");
                d.withhold();
            }
            Err(_) => d.withhold(),
        }
    }
    drop(guards);
    subscriber.abort();
    for f in forwarders {
        f.abort();
    }
}

/// Subscribes the command filters (`Keep::Restore`: made again after every reconnect that does
/// not resume the session) once the gateway is connected as its thing.
async fn subscribe(cloud: Cloud, filters: Vec<String>, queue: Downlink, cancel: CancellationToken) {
    let mut state = cloud.state();
    loop {
        let ready = cloud.role() == Some("thing") && *state.borrow() == LinkState::Connected;
        if ready {
            match cloud.subscribe(&filters, Keep::Restore).await {
                Ok(codes) => {
                    let refused: Vec<&String> = filters
                        .iter()
                        .zip(&codes)
                        .filter(|(_, c)| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        .map(|(f, _)| f)
                        .collect();
                    if refused.is_empty() {
                        tracing::info!(filters = ?filters, "subscribed to cloud commands");
                        *lock(&queue.inner.subscribed) = filters.clone();
                        return;
                    }
                    let e = format!(
                        "the cloud refused the command subscription(s) {refused:?} (the thing policy must allow iot:Subscribe and iot:Receive on them)"
                    );
                    tracing::error!("{e}");
                    queue.set_error(e);
                }
                Err(error) => tracing::debug!(%error, "command subscription not made yet"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
            }
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = state.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The expiry notice's payload: the command's `id` (when its payload is a JSON object with one),
/// its local topic and why.
pub fn expiry_notice(c: &Command, now_ms: u64) -> Vec<u8> {
    let id = serde_json::from_slice::<serde_json::Value>(&c.payload)
        .ok()
        .and_then(|v| v.get("id").cloned())
        .unwrap_or(serde_json::Value::Null);
    let body = serde_json::json!({
        "id": id,
        "topic": c.topic,
        "error": format!(
            "expired: not delivered within {} s (the child was not connected and subscribed)",
            c.expires_ms.saturating_sub(c.received_ms) / 1000
        ),
        "received": c.received_ms,
        "ts": now_ms,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Drops expired commands, each after its notice is in the outbox. Checks once a second.
pub async fn expire(queue: Downlink, outbox: Outbox, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        expire_once(&queue, &outbox).await;
    }
}

/// One round of `expire`: returns how many commands expired.
pub async fn expire_once(queue: &Downlink, outbox: &Outbox) -> usize {
    let list = queue.expired();
    if list.is_empty() {
        return 0;
    }
    let now = queue.now();
    let mut noticed = Vec::new();
    for c in list {
        let topic = expired_topic(&c.child);
        match outbox
            .append(&c.child, &topic, 1, &expiry_notice(&c, now))
            .await
        {
            Ok(_) => {
                tracing::warn!(child = %c.child, topic = %c.topic, seq = c.seq, "cloud command expired undelivered; the cloud is told on {topic}");
                noticed.push(c);
            }
            Err(error) => {
                // Kept until its notice can be stored (the outbox may be full).
                tracing::warn!(child = %c.child, %error, "expiry notice not stored; the expired command is kept until it is");
            }
        }
    }
    let n = noticed.len();
    let q = queue.clone();
    match tokio::task::spawn_blocking(move || q.drop_expired(&noticed)).await {
        Ok(Ok(())) => n,
        Ok(Err(error)) => {
            tracing::error!(%error, "expired commands not removed from disk");
            0
        }
        Err(_) => 0,
    }
}

/// The result a local executor gives back: (local topic, payload) for the outbox.
pub type Outcome = Option<(String, Vec<u8>)>;

/// Carries out commands for children that are not MQTT clients (Modbus children: the
/// telemetry write path).
pub trait Executor: Send + Sync {
    /// Whether `child` is this executor's.
    fn takes(&self, child: &str) -> bool;
    /// Carries out one command; `None` when the topic is not one it carries out.
    fn execute<'a>(
        &'a self,
        topic: &'a str,
        payload: &'a [u8],
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;
}

/// Hands the executor's children's commands to it, in order, one at a time; a result is in the
/// outbox before its command leaves the disk (a crash in between carries it out again).
pub async fn execute(
    queue: Downlink,
    executor: Arc<dyn Executor>,
    outbox: Outbox,
    cancel: CancellationToken,
) {
    let mut changes = queue.changes();
    loop {
        let mut worked = false;
        for child in queue.children() {
            if !executor.takes(&child) {
                continue;
            }
            for c in queue.pending(&child) {
                if cancel.is_cancelled() {
                    return;
                }
                worked = true;
                let outcome = executor.execute(&c.topic, &c.payload).await;
                let q = queue.clone();
                let Some((topic, payload)) = outcome else {
                    tracing::warn!(child = %c.child, topic = %c.topic, "command for a Modbus child on a topic other than cmd/<child>/write; dropped");
                    let _ = tokio::task::spawn_blocking(move || q.discard(&c.child, c.seq)).await;
                    continue;
                };
                if let Err(error) = outbox.append(&c.child, &topic, 1, &payload).await {
                    tracing::warn!(child = %c.child, %error, "command result not stored in the outbox; the result is lost");
                    queue.set_error(format!("result not stored: {error}"));
                }
                match tokio::task::spawn_blocking(move || q.done(&c.child, c.seq)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::error!(%error, "a carried-out command was not removed from disk; it will be carried out again");
                    }
                    Err(_) => {}
                }
            }
        }
        if worked {
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            // Children become the executor's when a scan binds them.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn clock() -> (Arc<AtomicU64>, Clock) {
        let t = Arc::new(AtomicU64::new(1_000_000));
        let t2 = t.clone();
        (t, Arc::new(move || t2.load(Ordering::Relaxed)))
    }

    #[test]
    fn commands_are_fifo_per_child_and_survive_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let (_, clk) = clock();
        {
            let q = Downlink::open(
                Store::open(d.path()).unwrap(),
                Duration::from_secs(60),
                clk.clone(),
            )
            .unwrap();
            q.push("c1", "cmd/c1/a", b"1").unwrap();
            q.push("c2", "cmd/c2/a", b"x").unwrap();
            q.push("c1", "cmd/c1/b", b"2").unwrap();
            q.push("c1", "cmd/c1/a", b"3").unwrap();
            let first = q.pending("c1")[0].clone();
            q.done("c1", first.seq).unwrap();
            let s = q.status();
            assert_eq!((s.received, s.delivered, s.queued), (4, 1, 3));
        }
        let q =
            Downlink::open(Store::open(d.path()).unwrap(), Duration::from_secs(60), clk).unwrap();
        let got: Vec<(String, Vec<u8>)> = q
            .pending("c1")
            .into_iter()
            .map(|c| (c.topic, c.payload))
            .collect();
        assert_eq!(
            got,
            vec![
                ("cmd/c1/b".into(), b"2".to_vec()),
                ("cmd/c1/a".into(), b"3".to_vec())
            ]
        );
        assert_eq!(q.pending("c2").len(), 1);
        // New commands after the reopen come after the old ones.
        q.push("c1", "cmd/c1/c", b"4").unwrap();
        assert_eq!(q.pending("c1").last().unwrap().payload, b"4");
        assert_eq!(q.status().per_child.get("c1"), Some(&3));
    }

    #[tokio::test]
    async fn expired_commands_leave_with_a_notice_in_the_outbox() {
        let d = tempfile::tempdir().unwrap();
        let (t, clk) = clock();
        let q =
            Downlink::open(Store::open(d.path()).unwrap(), Duration::from_secs(5), clk).unwrap();
        let outbox = Outbox::open(d.path().join("outbox"), Default::default())
            .await
            .unwrap();
        q.push("c1", "cmd/c1/write", br#"{"id":"k1","v":1}"#)
            .unwrap();
        t.fetch_add(3_000, Ordering::Relaxed);
        q.push("c1", "cmd/c1/write", b"not json").unwrap();
        // 4.999 s after the first: nothing expired.
        t.fetch_add(1_999, Ordering::Relaxed);
        assert_eq!(expire_once(&q, &outbox).await, 0);
        assert_eq!(q.pending("c1").len(), 2);
        // 5 s: the first expires, the second is still pending.
        t.fetch_add(1, Ordering::Relaxed);
        assert_eq!(q.pending("c1").len(), 1);
        assert_eq!(expire_once(&q, &outbox).await, 1);
        let s = q.status();
        assert_eq!((s.expired, s.queued, s.delivered), (1, 1, 0));
        let e = outbox.take(10).await.unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].topic, "dt/c1/command-expired");
        let v: serde_json::Value = serde_json::from_slice(&e[0].payload).unwrap();
        assert_eq!(v["id"], "k1");
        assert_eq!(v["topic"], "cmd/c1/write");
        assert!(v["error"].as_str().unwrap().starts_with("expired"), "{v}");
        // The second one has no id to echo.
        t.fetch_add(3_000, Ordering::Relaxed);
        assert_eq!(expire_once(&q, &outbox).await, 1);
        assert_eq!(q.status().queued, 0);
        // Gone from the disk too.
        drop(q);
        let (_, clk) = clock();
        let q =
            Downlink::open(Store::open(d.path()).unwrap(), Duration::from_secs(5), clk).unwrap();
        assert!(q.children().is_empty());
    }
}
