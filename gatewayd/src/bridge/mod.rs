//! Bridge (upstream): drains the outbox to the cloud over the gateway's one connection.
//!
//! While the gateway is connected as its thing, entries are taken from the outbox (fair between
//! children, FIFO per child), mapped to their cloud topic (`mapping`, pure) and published QoS 1
//! on the limiter's telemetry lane, with up to `bridge.window` publishes waiting for their
//! PUBACK. Publishes are handed to the connection one after another, so one connection carries
//! each child's messages in order. An entry is acked in the outbox only on its PUBACK. When a
//! publish fails (the connection was lost) or its PUBACK does not come within
//! `bridge.ack_timeout_secs`, that entry and every later one in flight are released and taken
//! again, in order: the cloud may see some twice (counted as `resent`), never out of order for
//! their first arrival. Entries of a child with no thing name yet are released (they wait in the
//! outbox, counted in status) and do not hold the others back; entries whose topic matches no
//! mapping are dropped from the outbox, counted and logged once per topic.
//! A rule with `batch` packs its messages into envelopes (`batch`): one publish, acknowledged
//! for all of its entries on its PUBACK. An envelope never carries a child's message ahead of an
//! earlier one of the same child that goes in another publish.
//! This module owns none of the connection (`cloud`) or the storage (`outbox`).

pub mod batch;
pub mod commands;
pub mod downlink;
pub mod mapping;
pub mod plan;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::QoS;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cloud::{Cloud, Lane, LinkState, PendingAck, UplinkError};
use crate::daemon::status::{Board, BridgeStatus};
use crate::outbox::{Entry, Outbox, Seq};
pub use mapping::{BatchRule, Mapper, MappingRule, Names};

/// Where a child's thing name and device profile come from (the provisioner and the device
/// bindings in the daemon; a map in tests).
pub trait ThingNames: Send + Sync {
    fn thing_name(&self, child: &str) -> Option<String>;
    /// The child's device profile, for `[[bridge.mappings]] profile`.
    fn profile(&self, _child: &str) -> Option<String> {
        None
    }
}

impl ThingNames for crate::children::provision::Provisioner {
    fn thing_name(&self, child: &str) -> Option<String> {
        self.show(child).ok().and_then(|c| c.thing_name)
    }
}

/// The daemon's children: thing names from the provisioner; a profile from the device a child is
/// bound to (Modbus), else the model the child announced itself with.
pub struct Directory {
    pub provisioner: crate::children::provision::Provisioner,
    pub bindings: crate::telemetry::Bindings,
}

impl ThingNames for Directory {
    fn thing_name(&self, child: &str) -> Option<String> {
        self.provisioner.thing_name(child)
    }
    fn profile(&self, child: &str) -> Option<String> {
        self.bindings
            .get(child)
            .and_then(|b| b.profile)
            .or_else(|| self.provisioner.show(child).ok()?.found.model)
    }
}

/// How long a child without a thing name is not asked about again.
const THING_RECHECK: Duration = Duration::from_secs(1);
/// How long taking pauses after a take gave only entries of children without a thing (they
/// would be handed out again at once): bounds both the spinning and the delay it adds to others.
const IDLE_AFTER_NOTHING_SENT: Duration = Duration::from_millis(100);
/// The most entries one take reads when rules batch (bounds the memory a take holds).
const MAX_TAKE: usize = 2000;

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    acked: AtomicU64,
    resent: AtomicU64,
    dropped_unmapped: AtomicU64,
    ack_timeouts: AtomicU64,
    failures: AtomicU64,
    in_flight: AtomicU64,
    envelopes: AtomicU64,
    batched: AtomicU64,
}

#[derive(Debug, Default)]
struct Shared {
    /// Children whose entries wait for a thing name, with how many were released last time.
    waiting: BTreeMap<String, u64>,
    last_error: Option<String>,
}

/// The bridge's figures, shared with the status board.
#[derive(Debug, Clone)]
pub struct BridgeHandle {
    counters: Arc<Counters>,
    shared: Arc<Mutex<Shared>>,
    outbox: Outbox,
    board: Arc<Board>,
}

impl crate::daemon::status::BridgeService for BridgeHandle {
    fn status(&self) -> BridgeStatus {
        let c = &self.counters;
        let s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let o = self.outbox.stats();
        let throttled_ms = self.board.uplink().map(|u| u.throttled_ms).unwrap_or(0);
        BridgeStatus {
            published: c.published.load(Ordering::Relaxed),
            acked: c.acked.load(Ordering::Relaxed),
            resent: c.resent.load(Ordering::Relaxed),
            dropped_unmapped: c.dropped_unmapped.load(Ordering::Relaxed),
            ack_timeouts: c.ack_timeouts.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            in_flight: c.in_flight.load(Ordering::Relaxed),
            envelopes: c.envelopes.load(Ordering::Relaxed),
            batched: c.batched.load(Ordering::Relaxed),
            backlog: o.entries,
            waiting_for_thing: s.waiting.keys().cloned().collect(),
            throttled_ms,
            last_error: s.last_error.clone(),
            downlink: None,
        }
    }
}

/// The upstream drain.
pub struct Bridge {
    cloud: Cloud,
    outbox: Outbox,
    mapper: Mapper,
    things: Arc<dyn ThingNames>,
    board: Arc<Board>,
    window: usize,
    ack_timeout: Duration,
    counters: Arc<Counters>,
    shared: Arc<Mutex<Shared>>,
    /// Known thing names (they never change once given) with the child's profile, and when a
    /// miss may be asked again.
    names: HashMap<Arc<str>, (String, Option<String>)>,
    misses: HashMap<Arc<str>, Instant>,
    /// Topics already logged as unmapped (logged once each).
    unmapped_logged: HashSet<String>,
    /// Entries published once whose PUBACK never came: a second publish is a duplicate.
    sent_unacked: HashSet<Seq>,
}

/// One publish waiting for its PUBACK: one entry, or an envelope's entries.
struct InFlight {
    entries: Vec<Entry>,
    ack: PendingAck,
}

impl Bridge {
    pub fn new(
        cloud: Cloud,
        outbox: Outbox,
        mapper: Mapper,
        things: Arc<dyn ThingNames>,
        board: Arc<Board>,
        window: usize,
        ack_timeout: Duration,
    ) -> Bridge {
        Bridge {
            cloud,
            outbox,
            mapper,
            things,
            board,
            window: window.max(1),
            ack_timeout,
            counters: Arc::default(),
            shared: Arc::default(),
            names: HashMap::new(),
            misses: HashMap::new(),
            unmapped_logged: HashSet::new(),
            sent_unacked: HashSet::new(),
        }
    }

    pub fn handle(&self) -> BridgeHandle {
        BridgeHandle {
            counters: self.counters.clone(),
            shared: self.shared.clone(),
            outbox: self.outbox.clone(),
            board: self.board.clone(),
        }
    }

    fn set_error(&self, e: Option<String>) {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_error = e;
    }

    /// The gateway's thing name while it is connected as its thing.
    fn gateway_ready(&self) -> Option<String> {
        if self.cloud.role() != Some("thing")
            || *self.cloud.state().borrow() != LinkState::Connected
        {
            return None;
        }
        self.board.identity().thing_name
    }

    fn thing_of(&mut self, child: &Arc<str>) -> Option<(String, Option<String>)> {
        if let Some(t) = self.names.get(child) {
            return Some(t.clone());
        }
        let now = Instant::now();
        if self.misses.get(child).is_some_and(|at| *at > now) {
            return None;
        }
        match self.things.thing_name(child) {
            Some(t) => {
                self.misses.remove(child);
                let named = (t, self.things.profile(child));
                self.names.insert(child.clone(), named.clone());
                Some(named)
            }
            None => {
                self.misses.insert(child.clone(), now + THING_RECHECK);
                None
            }
        }
    }

    /// Runs until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut state = self.cloud.state();
        loop {
            let gateway = loop {
                if let Some(g) = self.gateway_ready() {
                    break g;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = state.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            };
            tracing::info!(gateway = %gateway, "bridge draining the outbox to the cloud");
            let failed = self.drain(&gateway, &cancel).await;
            if cancel.is_cancelled() {
                return;
            }
            if failed {
                // The connection may be going down: let its state settle before trying again.
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = state.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }

    /// Drains while the connection holds; returns after a failure (everything in flight
    /// released; `true`) or on cancel.
    async fn drain(&mut self, gateway: &str, cancel: &CancellationToken) -> bool {
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
        let mut idle_until: Option<Instant> = None;
        let result: Result<(), String> = loop {
            // Settle what is acknowledged, in order.
            if let Err(e) = self.settle(&mut inflight).await {
                break Err(e);
            }
            if cancel.is_cancelled() {
                break Ok(());
            }
            let room = self.window - inflight.len();
            let may_take = room > 0 && idle_until.is_none_or(|t| Instant::now() >= t);
            if may_take {
                // With batching rules, one publish per take: the next take comes once this
                // publish has its quota token, so its envelope holds what arrived meanwhile
                // (planning `room` envelopes at once left later ones waiting, stale, for the
                // quota: p99 420 ms against 21 ms at 1,500 msg/s, `tests/bench/batching`).
                let (want, units) = if self.mapper.batches() {
                    (self.mapper.max_batch_messages().min(MAX_TAKE), 1)
                } else {
                    (room, room)
                };
                let entries = match self.outbox.take(want).await {
                    Ok(e) => e,
                    Err(e) => break Err(format!("outbox take failed: {e}")),
                };
                if !entries.is_empty() {
                    idle_until = None;
                    match self.send(gateway, entries, units, &mut inflight).await {
                        Ok(0) => {
                            // Nothing publishable (every entry waits for a thing name): the
                            // outbox would hand the same ones out at once, so pause taking.
                            idle_until = Some(Instant::now() + IDLE_AFTER_NOTHING_SENT);
                        }
                        Ok(_) => {}
                        Err(e) => break Err(e),
                    }
                    continue;
                }
            }
            // Wait for an acknowledgement, new entries, a state change or the idle timer.
            let head = inflight.front_mut();
            let deadline = self.ack_timeout;
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                _ = self.outbox.wait_pending(), if room > 0 && idle_until.is_none() => {}
                _ = async { tokio::time::sleep_until(idle_until.unwrap_or_else(Instant::now)).await }, if idle_until.is_some() => {
                    idle_until = None;
                }
                r = async {
                    match head {
                        Some(h) => tokio::time::timeout(deadline, &mut h.ack).await,
                        None => std::future::pending().await,
                    }
                } => {
                    match r {
                        Ok(Ok(())) => {
                            if let Some(done) = inflight.pop_front() {
                                self.acked(done.entries).await;
                            }
                        }
                        Ok(Err(e)) => break Err(e.to_string()),
                        Err(_) => {
                            self.counters.ack_timeouts.fetch_add(1, Ordering::Relaxed);
                            // Each unacknowledged publish holds an in-flight slot of the
                            // connection until it is dropped: a new connection frees them.
                            self.cloud.recycle();
                            break Err(format!(
                                "no PUBACK within {} s (acknowledgements lost or stalled)",
                                deadline.as_secs()
                            ));
                        }
                    }
                }
            }
        };
        let failed = result.is_err();
        self.release_in_flight(&mut inflight, result.err());
        failed
    }

    /// Acks in the outbox every leading in-flight entry whose PUBACK arrived.
    async fn settle(&mut self, inflight: &mut VecDeque<InFlight>) -> Result<(), String> {
        let mut done = Vec::new();
        while let Some(h) = inflight.front_mut() {
            match h.ack.try_done() {
                None => break,
                Some(Ok(())) => {
                    if let Some(d) = inflight.pop_front() {
                        done.extend(d.entries);
                    }
                }
                Some(Err(e)) => {
                    self.acked(done).await;
                    return Err(e.to_string());
                }
            }
        }
        self.acked(done).await;
        Ok(())
    }

    async fn acked(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let seqs: Vec<Seq> = entries.iter().map(|e| e.seq).collect();
        for s in &seqs {
            self.sent_unacked.remove(s);
        }
        self.counters
            .in_flight
            .fetch_sub(seqs.len() as u64, Ordering::Relaxed);
        match self.outbox.ack_many(&seqs).await {
            Ok(_) => {
                self.counters
                    .acked
                    .fetch_add(seqs.len() as u64, Ordering::Relaxed);
            }
            // The cloud has them; the outbox will hand them out again after a restart
            // (a duplicate, which at-least-once allows).
            Err(error) => tracing::error!(%error, "outbox ack failed after the cloud's PUBACK"),
        }
    }

    /// Publishes `entries` in order, in at most `room` publishes; returns how many publishes
    /// were started. Entries of children without a thing name are released; unmapped ones
    /// dropped; those that did not fit into `room` publishes released (taken again in order).
    async fn send(
        &mut self,
        gateway: &str,
        entries: Vec<Entry>,
        room: usize,
        inflight: &mut VecDeque<InFlight>,
    ) -> Result<usize, String> {
        let mut unmapped_new: Vec<(Arc<str>, String, String)> = Vec::new();
        let mut resolved: HashMap<Arc<str>, Option<(String, Option<String>)>> = HashMap::new();
        for e in &entries {
            if !resolved.contains_key(&e.child_id) {
                let t = self.thing_of(&e.child_id);
                resolved.insert(e.child_id.clone(), t);
            }
        }
        let logged = &self.unmapped_logged;
        let mapper = &self.mapper;
        let plan::Plan {
            units,
            mut release,
            mut unmapped,
            waiting,
        } = plan::plan(entries, room, gateway, |e| {
            let Some(Some((thing, profile))) = resolved.get(&e.child_id) else {
                return plan::Route::Waiting;
            };
            let names = Names {
                child: &e.child_id,
                thing,
                gateway,
                profile: profile.as_deref(),
            };
            match mapper.route(&e.topic, names) {
                Some(m) => plan::Route::Mapped {
                    thing: thing.clone(),
                    topic: m.topic,
                    rule: m.rule,
                    batch: m.batch,
                },
                None => {
                    if !logged.contains(&e.topic) {
                        unmapped_new.push((e.child_id.clone(), thing.clone(), e.topic.clone()));
                    }
                    plan::Route::Unmapped
                }
            }
        });
        for (child, thing, topic) in unmapped_new {
            if self.unmapped_logged.insert(topic.clone()) {
                tracing::warn!(
                    child = %child,
                    thing = %thing,
                    topic = %topic,
                    "no [[bridge.mappings]] rule matches this topic; its messages are dropped (logged once per topic)"
                );
            }
        }

        let mut sent = 0;
        let mut failure = None;
        let mut units = units.into_iter();
        for unit in units.by_ref() {
            let (topic, payload, entries, is_batch) = match unit {
                plan::Unit::Single { entry, topic } => {
                    let payload = entry.payload.clone();
                    (topic, payload, vec![entry], false)
                }
                plan::Unit::Batch {
                    topic,
                    payload,
                    entries,
                } => (topic, payload, entries, true),
            };
            // QoS 0 entries too go up QoS 1: the outbox keeps them until the cloud has them.
            match self
                .cloud
                .start_publish(Lane::Telemetry, &topic, QoS::AtLeastOnce, payload)
                .await
            {
                Ok(ack) => {
                    for e in &entries {
                        if !self.sent_unacked.insert(e.seq) {
                            self.counters.resent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let n = entries.len() as u64;
                    self.counters.published.fetch_add(n, Ordering::Relaxed);
                    self.counters.in_flight.fetch_add(n, Ordering::Relaxed);
                    if is_batch {
                        self.counters.envelopes.fetch_add(1, Ordering::Relaxed);
                        self.counters.batched.fetch_add(n, Ordering::Relaxed);
                    }
                    inflight.push_back(InFlight { entries, ack });
                    sent += 1;
                }
                Err(UplinkError::InvalidTopic { topic, reason }) => {
                    // Permanent: the mapping made a topic the cloud refuses. Dropped like an
                    // unmapped one, and said why.
                    for e in &entries {
                        if self.unmapped_logged.insert(e.topic.clone()) {
                            tracing::warn!(
                                child = %e.child_id,
                                local_topic = %e.topic,
                                cloud_topic = %topic,
                                %reason,
                                "mapped cloud topic is invalid; its messages are dropped (logged once per topic)"
                            );
                        }
                        unmapped.push(e.seq);
                    }
                }
                Err(e) => {
                    release.extend(entries.iter().map(|e| e.seq));
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        for u in units {
            release.extend(u.entries().iter().map(|e| e.seq));
        }
        if !release.is_empty() {
            self.outbox.release(&release);
        }
        if !unmapped.is_empty() {
            match self.outbox.ack_many(&unmapped).await {
                Ok(n) => {
                    self.counters
                        .dropped_unmapped
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(error) => tracing::error!(%error, "outbox: dropping unmapped entries failed"),
            }
        }
        {
            let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            // Children seen waiting this round, plus those still waiting from before (a child
            // leaves the list once one of its entries is published).
            for f in inflight.iter() {
                for e in &f.entries {
                    s.waiting.remove(&*e.child_id);
                }
            }
            for (c, n) in waiting {
                if !s.waiting.contains_key(&c) {
                    tracing::info!(
                        child = %c,
                        thing = "",
                        entries = n,
                        "child has no thing name yet; its messages wait in the outbox until it is provisioned"
                    );
                }
                s.waiting.insert(c, n);
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(sent),
        }
    }

    /// After a failure: releases every entry in flight (they are taken again in order).
    fn release_in_flight(&mut self, inflight: &mut VecDeque<InFlight>, error: Option<String>) {
        let seqs: Vec<Seq> = inflight
            .drain(..)
            .flat_map(|f| f.entries.into_iter().map(|e| e.seq))
            .collect();
        if !seqs.is_empty() {
            self.outbox.release(&seqs);
            self.counters
                .in_flight
                .fetch_sub(seqs.len() as u64, Ordering::Relaxed);
        }
        if let Some(error) = &error {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                %error,
                released = seqs.len(),
                "bridge: publishes failed; released them to be sent again in order (the cloud may see some twice)"
            );
        }
        self.set_error(error);
    }
}
