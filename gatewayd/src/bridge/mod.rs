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
//! This module owns none of the connection (`cloud`) or the storage (`outbox`).

pub mod commands;
pub mod downlink;
pub mod mapping;

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
pub use mapping::{Mapper, MappingRule, Names};

/// Where a child's thing name comes from (the provisioner in the daemon; a map in tests).
pub trait ThingNames: Send + Sync {
    fn thing_name(&self, child: &str) -> Option<String>;
}

impl ThingNames for crate::children::provision::Provisioner {
    fn thing_name(&self, child: &str) -> Option<String> {
        self.show(child).ok().and_then(|c| c.thing_name)
    }
}

/// How long a child without a thing name is not asked about again.
const THING_RECHECK: Duration = Duration::from_secs(1);
/// How long taking pauses after a take gave only entries of children without a thing (they
/// would be handed out again at once): bounds both the spinning and the delay it adds to others.
const IDLE_AFTER_NOTHING_SENT: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    acked: AtomicU64,
    resent: AtomicU64,
    dropped_unmapped: AtomicU64,
    ack_timeouts: AtomicU64,
    failures: AtomicU64,
    in_flight: AtomicU64,
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
    /// Known thing names (they never change once given), and when a miss may be asked again.
    names: HashMap<Arc<str>, String>,
    misses: HashMap<Arc<str>, Instant>,
    /// Topics already logged as unmapped (logged once each).
    unmapped_logged: HashSet<String>,
    /// Entries published once whose PUBACK never came: a second publish is a duplicate.
    sent_unacked: HashSet<Seq>,
}

struct InFlight {
    entry: Entry,
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

    fn thing_of(&mut self, child: &Arc<str>) -> Option<String> {
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
                self.names.insert(child.clone(), t.clone());
                Some(t)
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
                let entries = match self.outbox.take(room).await {
                    Ok(e) => e,
                    Err(e) => break Err(format!("outbox take failed: {e}")),
                };
                if !entries.is_empty() {
                    idle_until = None;
                    match self.send(gateway, entries, &mut inflight).await {
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
                                self.acked(vec![done.entry]).await;
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
                        done.push(d.entry);
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

    /// Publishes `entries` in order; returns how many were published. Entries of children
    /// without a thing name are released; unmapped ones dropped.
    async fn send(
        &mut self,
        gateway: &str,
        entries: Vec<Entry>,
        inflight: &mut VecDeque<InFlight>,
    ) -> Result<usize, String> {
        let mut waiting: BTreeMap<String, u64> = BTreeMap::new();
        let mut release = Vec::new();
        let mut unmapped = Vec::new();
        let mut sent = 0;
        let mut iter = entries.into_iter();
        let mut failure = None;
        for entry in iter.by_ref() {
            let Some(thing) = self.thing_of(&entry.child_id) else {
                *waiting.entry(entry.child_id.to_string()).or_default() += 1;
                release.push(entry.seq);
                continue;
            };
            let names = Names {
                child: &entry.child_id,
                thing: &thing,
                gateway,
            };
            let Some(topic) = self.mapper.map(&entry.topic, names) else {
                if self.unmapped_logged.insert(entry.topic.clone()) {
                    tracing::warn!(
                        child = %entry.child_id,
                        thing = %thing,
                        topic = %entry.topic,
                        "no [[bridge.mappings]] rule matches this topic; its messages are dropped (logged once per topic)"
                    );
                }
                unmapped.push(entry.seq);
                continue;
            };
            // QoS 0 entries too go up QoS 1: the outbox keeps them until the cloud has them.
            match self
                .cloud
                .start_publish(
                    Lane::Telemetry,
                    &topic,
                    QoS::AtLeastOnce,
                    entry.payload.clone(),
                )
                .await
            {
                Ok(ack) => {
                    if !self.sent_unacked.insert(entry.seq) {
                        self.counters.resent.fetch_add(1, Ordering::Relaxed);
                    }
                    self.counters.published.fetch_add(1, Ordering::Relaxed);
                    self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
                    inflight.push_back(InFlight { entry, ack });
                    sent += 1;
                }
                Err(UplinkError::InvalidTopic { topic, reason }) => {
                    // Permanent: the mapping made a topic the cloud refuses. Dropped like an
                    // unmapped one, and said why.
                    if self.unmapped_logged.insert(entry.topic.clone()) {
                        tracing::warn!(
                            child = %entry.child_id,
                            thing = %thing,
                            local_topic = %entry.topic,
                            cloud_topic = %topic,
                            %reason,
                            "mapped cloud topic is invalid; its messages are dropped (logged once per topic)"
                        );
                    }
                    unmapped.push(entry.seq);
                }
                Err(e) => {
                    release.push(entry.seq);
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        release.extend(iter.map(|e| e.seq));
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
            for e in inflight.iter() {
                s.waiting.remove(&*e.entry.child_id);
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
        let seqs: Vec<Seq> = inflight.drain(..).map(|f| f.entry.seq).collect();
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
