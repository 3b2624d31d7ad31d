//! Cloud: the gateway's one connection to AWS IoT Core, as a service the daemon owns.
//!
//! `Cloud` is the stable handle that identity, the child provisioner and the bridge share. It
//! outlives the switch from the claim session to the thing session: `connect` replaces the
//! current session (one rumqttc connection, `session`), while the state watch, the routes, the
//! subscription record and the one-call-at-a-time fleet discipline stay with the handle (`Hub`).
//! So a route registered before any session exists keeps receiving across the switch, and a
//! `Keep::Restore` subscription is made again after every CONNACK that did not resume it.
//!
//! What rumqttc lacks lives in `session` and the pure cores beside it: `acks` (acknowledgement
//! bookkeeping by packet kind and id), `lanes` + `limiter` (AWS's per-connection quotas with
//! priority lanes), `routes` (incoming messages with their manual acknowledgement),
//! `subscriptions` (what to restore, what is owed), `topic` (routing vs authorization matching,
//! AWS's topic rules). Every timer is on tokio's clock, so tests can pause time.
//! This module does not know what the traffic means: provisioning is `fleet`'s, telemetry the
//! bridge's.

pub mod acks;
pub mod fleet;
pub mod lanes;
pub mod limiter;
pub mod routes;
pub mod session;
pub mod subscriptions;
pub mod topic;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{QoS, SubscribeReasonCode};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::daemon::health::Health;
use crate::daemon::status::Board;
pub use lanes::Lane;
pub use routes::{Delivery, RouteGuard};
pub use session::{
    Backoff, ConnectPacer, LinkState, PendingAck, Uplink, UplinkError, UplinkParams,
};
pub use subscriptions::Keep;

/// What the handle keeps across sessions and shares with the current one.
#[derive(Default)]
pub(crate) struct Hub {
    pub(crate) routes: Arc<Mutex<routes::Routes>>,
    pub(crate) subs: Mutex<subscriptions::Subscriptions>,
}

struct Inner {
    pacer: Arc<ConnectPacer>,
    board: Arc<Board>,
    health: Arc<Health>,
    cancel: CancellationToken,
    current: Mutex<Option<Arc<Uplink>>>,
    state: Arc<watch::Sender<LinkState>>,
    hub: Arc<Hub>,
    /// One fleet-provisioning call in flight per connection (the API has no correlation id).
    call_lock: tokio::sync::Mutex<()>,
}

/// The shared handle; cheap to clone.
#[derive(Clone)]
pub struct Cloud {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cloud")
            .field("role", &self.role())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cloud {
    pub fn new(
        pacer: Arc<ConnectPacer>,
        board: Arc<Board>,
        health: Arc<Health>,
        parent: &CancellationToken,
    ) -> Cloud {
        let (state, _) = watch::channel(LinkState::Down {
            error: "no session".into(),
            permanent: false,
        });
        Cloud {
            inner: Arc::new(Inner {
                pacer,
                board,
                health,
                cancel: parent.child_token(),
                current: Mutex::new(None),
                state: Arc::new(state),
                hub: Arc::new(Hub::default()),
                call_lock: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Ends the current session (DISCONNECT, bounded) and starts one with `params`; returns at
    /// once, the connection comes up in the background (`wait_connected`, `state`). Routes and
    /// `Keep::Restore` subscriptions carry over: the new session's first CONNACK makes them.
    pub async fn connect(&self, params: UplinkParams) -> Result<(), UplinkError> {
        self.disconnect().await;
        let i = &self.inner;
        lock(&i.hub.subs).new_session();
        let up = Uplink::start(
            params,
            i.pacer.clone(),
            i.board.clone(),
            &i.health,
            &i.cancel,
            i.state.clone(),
            i.hub.clone(),
        )?;
        *lock(&i.current) = Some(up);
        Ok(())
    }

    /// Ends the current session, if any.
    pub async fn disconnect(&self) {
        let old = lock(&self.inner.current).take();
        if let Some(up) = old {
            up.shutdown().await;
        }
    }

    fn session(&self) -> Result<Arc<Uplink>, UplinkError> {
        lock(&self.inner.current)
            .clone()
            .ok_or(UplinkError::NotConnected)
    }

    /// "claim" or "thing" while a session exists.
    pub fn role(&self) -> Option<&'static str> {
        lock(&self.inner.current).as_ref().map(|u| u.role())
    }

    /// The state of whichever session is current; survives session switches.
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.inner.state.subscribe()
    }

    /// Waits until the current session is connected, refused for good, or `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), UplinkError> {
        self.session()?.wait_connected(timeout).await
    }

    /// Publishes when the limiter serves `lane` (a lane goes only when every higher one has
    /// nothing waiting); for QoS 1 returns once the PUBACK arrived. An invalid topic fails at
    /// once with `UplinkError::InvalidTopic` (not transient).
    pub async fn publish(
        &self,
        lane: Lane,
        topic: &str,
        qos: QoS,
        payload: Vec<u8>,
    ) -> Result<(), UplinkError> {
        session::check_topic(topic)?;
        self.session()?.publish(lane, topic, qos, payload).await
    }

    /// Like `publish`, but returns once the publish is handed to the connection, with its
    /// acknowledgement to wait for: publishes started one after another go out in that order.
    pub async fn start_publish(
        &self,
        lane: Lane,
        topic: &str,
        qos: QoS,
        payload: Vec<u8>,
    ) -> Result<PendingAck, UplinkError> {
        session::check_topic(topic)?;
        self.session()?
            .start_publish(lane, topic, qos, payload)
            .await
    }

    /// Drops the current connection and connects again (see `Uplink::recycle`).
    pub fn recycle(&self) {
        if let Ok(up) = self.session() {
            up.recycle();
        }
    }

    /// Subscribes (QoS 1); returns the broker's per-filter answers from the SUBACK(s).
    /// `Keep::Restore` filters are recorded even when this fails for want of a connection: the
    /// next CONNACK makes them, and every CONNACK that does not resume the session again.
    /// A restore filter the broker refuses here is forgotten (the caller sees the refusal).
    pub async fn subscribe(
        &self,
        filters: &[String],
        keep: Keep,
    ) -> Result<Vec<SubscribeReasonCode>, UplinkError> {
        for f in filters {
            session::check_filter(f)?;
        }
        match self.session() {
            Ok(up) => up.subscribe(filters, keep).await,
            Err(e) => {
                lock(&self.inner.hub.subs).subscribing(filters, keep);
                Err(e)
            }
        }
    }

    /// Unsubscribes (and forgets restore filters). An UNSUBSCRIBE that is not acknowledged is
    /// sent again after a CONNACK that resumes the session.
    pub async fn unsubscribe(&self, filters: &[String]) -> Result<(), UplinkError> {
        match self.session() {
            Ok(up) => up.unsubscribe(filters).await,
            Err(e) => {
                lock(&self.inner.hub.subs).unsubscribing(filters);
                Err(e)
            }
        }
    }

    /// Queues the UNSUBSCRIBEs now, without waiting for their UNSUBACKs (for drop guards).
    pub(crate) fn unsubscribe_now(&self, filters: &[String]) {
        match self.session() {
            Ok(up) => {
                let _ = up.start_unsubscribe(filters);
            }
            Err(_) => lock(&self.inner.hub.subs).unsubscribing(filters),
        }
    }

    /// Registers a route for incoming publishes matching `filter` (register before subscribing,
    /// so nothing that arrives right after the SUBACK is lost). The route belongs to the handle
    /// and works with or without a session, until the guard is dropped. A QoS 1 message is
    /// acknowledged when its `Delivery` is acknowledged or dropped (`routes` says when not).
    pub fn route(
        &self,
        filter: &str,
        capacity: usize,
    ) -> Result<(RouteGuard, mpsc::Receiver<Delivery>), UplinkError> {
        session::check_filter(filter)?;
        Ok(routes::add(&self.inner.hub.routes, filter, capacity))
    }

    /// The recorded `Keep::Restore` filters.
    pub fn restored_filters(&self) -> Vec<String> {
        lock(&self.inner.hub.subs).restore_filters()
    }

    /// The fleet-provisioning client over this connection.
    pub fn fleet(&self) -> fleet::FleetClient {
        fleet::FleetClient::new(self.clone())
    }

    pub(crate) async fn call_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.call_lock.lock().await
    }
}
