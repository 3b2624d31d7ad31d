//! Cloud: the gateway's one connection to AWS IoT Core, as a service the daemon owns.
//!
//! `Cloud` is the stable handle that identity, the child provisioner and the bridge share. It
//! outlives the switch from the claim session to the thing session: `connect` replaces the
//! current session (one rumqttc connection, `session`), while the state watch, the routes and the
//! one-call-at-a-time fleet discipline stay with the handle. What rumqttc lacks (backoff, CONNECT
//! pacing, acknowledgement bookkeeping, the limiter) lives in `session` and the pure cores beside
//! it. This module does not know what the traffic means: provisioning is `fleet`'s, telemetry the
//! bridge's.

pub mod acks;
pub mod fleet;
pub mod lanes;
pub mod session;
pub mod subscriptions;
pub mod topic;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{Publish, QoS, SubscribeReasonCode};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::daemon::health::Health;
use crate::daemon::status::Board;
pub use lanes::Lane;
pub use session::{
    Backoff, ConnectPacer, LinkState, RouteGuard, Uplink, UplinkError, UplinkParams,
};
pub use subscriptions::Keep;

struct Inner {
    pacer: Arc<ConnectPacer>,
    board: Arc<Board>,
    health: Arc<Health>,
    cancel: CancellationToken,
    current: Mutex<Option<Arc<Uplink>>>,
    state: Arc<watch::Sender<LinkState>>,
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
                call_lock: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Ends the current session (DISCONNECT, bounded) and starts one with `params`; returns at
    /// once, the connection comes up in the background (`wait_connected`, `state`).
    pub async fn connect(&self, params: UplinkParams) -> Result<(), UplinkError> {
        self.disconnect().await;
        let i = &self.inner;
        let up = Uplink::start(
            params,
            i.pacer.clone(),
            i.board.clone(),
            &i.health,
            &i.cancel,
            i.state.clone(),
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

    /// Publishes through the limiter lane; for QoS 1 returns once the PUBACK arrived.
    pub async fn publish(
        &self,
        lane: Lane,
        topic: &str,
        qos: QoS,
        payload: Vec<u8>,
    ) -> Result<(), UplinkError> {
        let _ = lane;
        self.session()?.publish(topic, qos, payload).await
    }

    /// Subscribes (QoS 1); returns the broker's per-filter answers from the SUBACK.
    pub async fn subscribe(
        &self,
        filters: &[String],
        keep: Keep,
    ) -> Result<Vec<SubscribeReasonCode>, UplinkError> {
        let _ = keep;
        self.session()?.subscribe(filters).await
    }

    pub async fn unsubscribe(&self, filters: &[String]) -> Result<(), UplinkError> {
        let up = self.session()?;
        for f in filters {
            up.unsubscribe(f).await?;
        }
        Ok(())
    }

    /// Registers a route for incoming publishes matching `filter` (before subscribing, so nothing
    /// that arrives right after the SUBACK is lost).
    pub fn route(
        &self,
        filter: &str,
        capacity: usize,
    ) -> Result<(RouteGuard, mpsc::Receiver<Publish>), UplinkError> {
        Ok(self.session()?.route(filter, capacity))
    }

    /// The fleet-provisioning client over this connection.
    pub fn fleet(&self) -> fleet::FleetClient {
        fleet::FleetClient::new(self.clone())
    }

    pub(crate) async fn call_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.call_lock.lock().await
    }
}
