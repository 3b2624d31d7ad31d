//! Acknowledgement bookkeeping, pure: which waiter a PUBACK, SUBACK or UNSUBACK completes.
//!
//! rumqttc gives no delivery token. Requests are handed to it in order and it reports each one
//! as `Outgoing::{Publish, Subscribe, Unsubscribe}(pkid)` in that order, so a FIFO maps every
//! waiter to its packet id. The id alone does not name a request: rumqttc draws PUBLISH,
//! SUBSCRIBE and UNSUBSCRIBE ids from one counter that wraps at the in-flight limit
//! (`MqttState::next_pkid`), and checks collisions for publishes only, so a subscribe can get
//! the id of a publish still waiting for its PUBACK. Waiters are therefore keyed by kind and
//! id: a PUBACK completes only a publish, a SUBACK only a subscribe, an UNSUBACK only an
//! unsubscribe. No I/O here.

use std::collections::{HashMap, VecDeque};

/// What was sent, and so which acknowledgement completes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Completed by PUBACK (QoS 1) or by being written (QoS 0, packet id 0).
    Publish,
    /// Completed by SUBACK.
    Subscribe,
    /// Completed by UNSUBACK.
    Unsubscribe,
}

/// What became of a waiter when rumqttc reported its packet as written.
#[derive(Debug, PartialEq, Eq)]
pub enum Emitted<W> {
    /// A QoS 0 publish: written is all there is.
    Done(W),
    /// Now waiting for its acknowledgement. `displaced` is an older waiter of the same kind
    /// and id, which can no longer be told apart (fail it).
    Waiting { displaced: Option<W> },
    /// Nothing was queued: a packet that did not go through this bookkeeping.
    Untracked,
    /// The oldest queued waiter is of another kind: the bookkeeping is out of step with
    /// rumqttc. The waiter is returned to be failed.
    OutOfStep(W),
}

/// Waiters of type `W`, from hand-over to rumqttc until their acknowledgement.
#[derive(Debug)]
pub struct Acks<W> {
    /// Handed to rumqttc, not yet reported written, in hand-over order.
    queued: VecDeque<(Kind, W)>,
    /// Written, waiting for their acknowledgement.
    waiting: HashMap<(Kind, u16), W>,
}

impl<W> Default for Acks<W> {
    fn default() -> Self {
        Acks {
            queued: VecDeque::new(),
            waiting: HashMap::new(),
        }
    }
}

impl<W> Acks<W> {
    /// A request of `kind` was handed to rumqttc.
    pub fn queued(&mut self, kind: Kind, waiter: W) {
        self.queued.push_back((kind, waiter));
    }

    /// Takes back the last `queued` waiter (rumqttc refused the request).
    pub fn unqueue_last(&mut self) -> Option<W> {
        self.queued.pop_back().map(|(_, w)| w)
    }

    /// rumqttc reported a packet of `kind` written with `pkid`.
    pub fn emitted(&mut self, kind: Kind, pkid: u16) -> Emitted<W> {
        let Some((k, w)) = self.queued.pop_front() else {
            return Emitted::Untracked;
        };
        if k != kind {
            return Emitted::OutOfStep(w);
        }
        if kind == Kind::Publish && pkid == 0 {
            return Emitted::Done(w);
        }
        Emitted::Waiting {
            displaced: self.waiting.insert((kind, pkid), w),
        }
    }

    /// An acknowledgement arrived: PUBACK for `Kind::Publish`, SUBACK for `Kind::Subscribe`,
    /// UNSUBACK for `Kind::Unsubscribe`. Returns the waiter it completes, if any.
    pub fn acked(&mut self, kind: Kind, pkid: u16) -> Option<W> {
        self.waiting.remove(&(kind, pkid))
    }

    /// Every waiter, queued or written (the connection is gone).
    pub fn drain(&mut self) -> impl Iterator<Item = W> + '_ {
        self.queued
            .drain(..)
            .map(|(_, w)| w)
            .chain(self.waiting.drain().map(|(_, w)| w))
    }

    pub fn len(&self) -> usize {
        self.queued.len() + self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The collision rumqttc produces: a publish waits for PUBACK 7 while a subscribe is sent
    /// with id 7. Each acknowledgement completes only its own kind, in either order.
    #[test]
    fn suback_and_puback_with_one_id_complete_their_own_requests() {
        for suback_first in [true, false] {
            let mut a = Acks::default();
            a.queued(Kind::Publish, "publish");
            assert_eq!(
                a.emitted(Kind::Publish, 7),
                Emitted::Waiting { displaced: None }
            );
            a.queued(Kind::Subscribe, "subscribe");
            assert_eq!(
                a.emitted(Kind::Subscribe, 7),
                Emitted::Waiting { displaced: None },
                "a subscribe must not displace a publish with the same id"
            );
            if suback_first {
                assert_eq!(a.acked(Kind::Subscribe, 7), Some("subscribe"));
                assert_eq!(a.acked(Kind::Publish, 7), Some("publish"));
            } else {
                assert_eq!(a.acked(Kind::Publish, 7), Some("publish"));
                assert_eq!(a.acked(Kind::Subscribe, 7), Some("subscribe"));
            }
            assert!(a.is_empty());
        }
    }

    #[test]
    fn an_ack_of_another_kind_completes_nothing() {
        let mut a = Acks::default();
        a.queued(Kind::Subscribe, 1);
        a.emitted(Kind::Subscribe, 3);
        a.queued(Kind::Unsubscribe, 2);
        a.emitted(Kind::Unsubscribe, 4);
        // A PUBACK with a subscribe's id (a late or stray one) must not pass for its SUBACK.
        assert_eq!(a.acked(Kind::Publish, 3), None);
        assert_eq!(a.acked(Kind::Subscribe, 4), None);
        assert_eq!(a.acked(Kind::Unsubscribe, 3), None);
        assert_eq!(a.acked(Kind::Subscribe, 3), Some(1));
        assert_eq!(a.acked(Kind::Unsubscribe, 4), Some(2));
    }

    #[test]
    fn fifo_order_qos0_refusals_and_drain() {
        let mut a = Acks::default();
        a.queued(Kind::Publish, "q0");
        a.queued(Kind::Publish, "q1");
        a.queued(Kind::Subscribe, "refused");
        assert_eq!(a.unqueue_last(), Some("refused"));
        assert_eq!(a.emitted(Kind::Publish, 0), Emitted::Done("q0"));
        assert_eq!(
            a.emitted(Kind::Publish, 1),
            Emitted::Waiting { displaced: None }
        );
        assert_eq!(a.emitted(Kind::Publish, 2), Emitted::Untracked);
        a.queued(Kind::Subscribe, "s");
        assert_eq!(a.emitted(Kind::Unsubscribe, 2), Emitted::OutOfStep("s"));
        a.queued(Kind::Unsubscribe, "u");
        let mut left: Vec<_> = a.drain().collect();
        left.sort();
        assert_eq!(left, vec!["q1", "u"]);
        assert!(a.is_empty());
    }

    /// The premise, checked on rumqttc itself: one counter for publish and subscribe ids.
    #[test]
    fn rumqttc_gives_a_subscribe_the_id_of_an_unacknowledged_publish() {
        use rumqttc::{MqttState, Publish, QoS, Request, Subscribe};
        let mut state = MqttState::new(100, false);
        let publish = Publish::new("t", QoS::AtLeastOnce, vec![1]);
        let first = state
            .handle_outgoing_packet(Request::Publish(publish))
            .unwrap();
        let Some(rumqttc::Packet::Publish(p)) = first else {
            panic!("{first:?}")
        };
        let mut ids = Vec::new();
        for _ in 0..100 {
            let s = Subscribe::new("f", QoS::AtLeastOnce);
            if let Some(rumqttc::Packet::Subscribe(s)) =
                state.handle_outgoing_packet(Request::Subscribe(s)).unwrap()
            {
                ids.push(s.pkid);
            }
        }
        assert!(
            ids.contains(&p.pkid),
            "publish {} still waits for its PUBACK; subscribe ids {ids:?}",
            p.pkid
        );
    }
}
