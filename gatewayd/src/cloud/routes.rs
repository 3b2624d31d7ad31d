//! Routes: incoming publishes handed to whoever asked for them, each with its acknowledgement.
//!
//! The table belongs to the `Cloud` handle, not to a session, so a route registered before any
//! session exists, or before the claim → thing switch, keeps receiving. rumqttc runs with manual
//! acknowledgements, and a QoS 1 message is acknowledged only once it has been handed on:
//! - every matching route took it: the PUBACK goes out when the last consumer acknowledges
//!   (`Delivery::ack`) or drops its `Delivery` (dropping a receiver with deliveries in it drops
//!   them too);
//! - a matching route was full or closed: not acknowledged, with a WARN, so the broker sends
//!   it again on a resumed session (routes that did take it may then see it twice: at least
//!   once);
//! - no route matches at all: acknowledged and dropped, with a WARN. No route would take it on
//!   redelivery either, and an unacknowledged message holds one of the broker's 100 in-flight
//!   slots and comes back on every resumed session. Routes are registered before subscribing,
//!   so this is a late answer or a filter given up.

use std::sync::{Arc, Mutex};

use rumqttc::Publish;
use tokio::sync::mpsc;

use super::topic::route_matches;

/// Sends the PUBACK when the last holder drops it, unless disarmed.
pub(crate) struct Ack {
    send: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Ack {
    pub(crate) fn new(send: impl FnOnce() + Send + 'static) -> Arc<Ack> {
        Arc::new(Ack {
            send: Mutex::new(Some(Box::new(send))),
        })
    }

    fn disarm(&self) {
        lock(&self.send).take();
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        let send = self
            .send
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(send) = send {
            send();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An incoming publish and its acknowledgement: the PUBACK goes out when this is acknowledged
/// or dropped (QoS 0 has none). See the module header for when it never goes out.
pub struct Delivery {
    publish: Publish,
    ack: Option<Arc<Ack>>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.publish.topic)
            .field("qos", &self.publish.qos)
            .field("bytes", &self.publish.payload.len())
            .finish()
    }
}

impl Delivery {
    /// A delivery with nothing to acknowledge (tests, QoS 0).
    pub fn unacknowledged(publish: Publish) -> Delivery {
        Delivery { publish, ack: None }
    }

    pub fn topic(&self) -> &str {
        &self.publish.topic
    }

    pub fn payload(&self) -> &[u8] {
        &self.publish.payload
    }

    pub fn publish(&self) -> &Publish {
        &self.publish
    }

    /// Done with it: acknowledges, unless other routes still hold the message (the same as
    /// dropping it, said out loud).
    pub fn ack(self) {
        drop(self.ack);
    }

    /// Could not be handed on (the consumer's disk failed): no PUBACK goes out, so the broker
    /// sends it again on a resumed session. Other routes holding it lose their ack too.
    pub fn withhold(self) {
        if let Some(a) = &self.ack {
            a.disarm();
        }
    }
}

struct Route {
    id: u64,
    filter: String,
    tx: mpsc::Sender<Delivery>,
}

#[derive(Default)]
pub(crate) struct Routes {
    list: Vec<Route>,
    next: u64,
}

/// Removes its route when dropped.
pub struct RouteGuard {
    routes: Arc<Mutex<Routes>>,
    id: u64,
}

impl std::fmt::Debug for RouteGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteGuard").field("id", &self.id).finish()
    }
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        // Take the route out under the lock, drop its sender after: nothing is dropped (and
        // so nothing acknowledged) while the table is locked.
        let gone: Vec<Route> = {
            let mut r = lock(&self.routes);
            let (gone, kept) = std::mem::take(&mut r.list)
                .into_iter()
                .partition(|x| x.id == self.id);
            r.list = kept;
            gone
        };
        drop(gone);
    }
}

/// What became of an incoming publish.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Dispatched {
    /// Every matching route took it.
    Taken,
    /// No route matches: acknowledged and dropped.
    NoRoute,
    /// `refused` of the matching routes were full or closed: not acknowledged.
    Refused { refused: usize },
}

/// Registers a route for incoming publishes matching `filter`.
pub(crate) fn add(
    routes: &Arc<Mutex<Routes>>,
    filter: &str,
    capacity: usize,
) -> (RouteGuard, mpsc::Receiver<Delivery>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let mut r = lock(routes);
    r.next += 1;
    let id = r.next;
    r.list.push(Route {
        id,
        filter: filter.to_owned(),
        tx,
    });
    (
        RouteGuard {
            routes: routes.clone(),
            id,
        },
        rx,
    )
}

/// Hands `publish` to every matching route; `ack` (QoS 1) goes out as the module header says.
pub(crate) fn dispatch(
    routes: &Mutex<Routes>,
    publish: Publish,
    ack: Option<Arc<Ack>>,
) -> Dispatched {
    let matching: Vec<mpsc::Sender<Delivery>> = lock(routes)
        .list
        .iter()
        .filter(|r| route_matches(&r.filter, &publish.topic))
        .map(|r| r.tx.clone())
        .collect();
    if matching.is_empty() {
        return Dispatched::NoRoute;
    }
    let mut refused = 0;
    let mut bounced = Vec::new();
    for tx in matching {
        let d = Delivery {
            publish: publish.clone(),
            ack: ack.clone(),
        };
        if let Err(e) = tx.try_send(d) {
            refused += 1;
            bounced.push(e.into_inner());
        }
    }
    if refused > 0 {
        // Disarmed before anything that holds the ack can drop it: we still hold `ack`.
        if let Some(a) = &ack {
            a.disarm();
        }
        drop(bounced);
        return Dispatched::Refused { refused };
    }
    Dispatched::Taken
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rumqttc::QoS;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counted() -> (Arc<AtomicUsize>, impl Fn() -> Arc<Ack>) {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        (n, move || {
            let m = m.clone();
            Ack::new(move || {
                m.fetch_add(1, Ordering::SeqCst);
            })
        })
    }

    fn msg(topic: &str) -> Publish {
        Publish::new(topic, QoS::AtLeastOnce, vec![1])
    }

    #[test]
    fn acknowledged_when_the_consumer_is_done_not_before() {
        let routes = Arc::new(Mutex::new(Routes::default()));
        let (acks, ack) = counted();
        let (_g, mut rx) = add(&routes, "cmd/#", 4);
        assert_eq!(
            dispatch(&routes, msg("cmd/1"), Some(ack())),
            Dispatched::Taken
        );
        assert_eq!(
            acks.load(Ordering::SeqCst),
            0,
            "handed on, not yet consumed"
        );
        let d = rx.try_recv().unwrap();
        assert_eq!(d.topic(), "cmd/1");
        d.ack();
        assert_eq!(acks.load(Ordering::SeqCst), 1);
        // Dropping the receiver drops what it held: acknowledged.
        dispatch(&routes, msg("cmd/2"), Some(ack()));
        drop(rx);
        assert_eq!(acks.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_full_route_leaves_the_message_unacknowledged() {
        let routes = Arc::new(Mutex::new(Routes::default()));
        let (acks, ack) = counted();
        let (_g, mut rx) = add(&routes, "cmd/#", 1);
        let (_g2, mut rx2) = add(&routes, "cmd/+", 8);
        assert_eq!(
            dispatch(&routes, msg("cmd/1"), Some(ack())),
            Dispatched::Taken
        );
        assert_eq!(
            dispatch(&routes, msg("cmd/2"), Some(ack())),
            Dispatched::Refused { refused: 1 }
        );
        // The route with room got cmd/2 too; consuming it must not acknowledge it.
        rx2.try_recv().unwrap().ack();
        assert_eq!(rx2.try_recv().unwrap().topic(), "cmd/2");
        assert_eq!(acks.load(Ordering::SeqCst), 0);
        rx.try_recv().unwrap().ack();
        assert_eq!(acks.load(Ordering::SeqCst), 1, "cmd/1 once both are done");
        // A message matching no route is acknowledged and dropped.
        assert_eq!(
            dispatch(&routes, msg("other"), Some(ack())),
            Dispatched::NoRoute
        );
        assert_eq!(acks.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_dropped_guard_removes_its_route() {
        let routes = Arc::new(Mutex::new(Routes::default()));
        let (g, _rx) = add(&routes, "a", 1);
        let (_g2, _rx2) = add(&routes, "b", 1);
        drop(g);
        assert_eq!(dispatch(&routes, msg("a"), None), Dispatched::NoRoute);
        assert_eq!(lock(&routes).list.len(), 1);
    }
}
