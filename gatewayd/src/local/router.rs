//! rumqttd behind the front door: routes what the ACL allowed among local clients (a child's
//! subscription to its commands, a local application's subscription to child telemetry, retained
//! messages). rumqttd never sees a socket, a credential or a topic the ACL refused: each
//! authenticated session gets one in-process link (`rumqttd::local::LinkBuilder`), the session
//! forwards its allowed PUBLISH/SUBSCRIBE/UNSUBSCRIBE/PUBACK packets over it, and writes what the
//! link delivers to its client.
//!
//! This is the only file that names rumqttd. What it works around (crates.md §1, read in the
//! rumqttd 0.20 source):
//! - `Publish`'s QoS and packet id are crate-private; a QoS 1 publish is built, and a delivery's
//!   QoS and packet id read, through `Publish::{deserialize, serialize}` (public, MQTT-independent).
//! - The router disconnects an older link when a newer one names the same client id, and reuses
//!   connection ids; our sessions already end older sessions themselves (newest wins), so each link
//!   gets a router client id of its own (`<client>.<session>`) and closes itself.
//! - After `Notification::Unschedule` the link must call `ready()` or deliveries stop.
//! - The router upgrades a delivery to the subscription's QoS (a QoS 0 publish reaches a QoS 1
//!   subscriber as QoS 1) and expects PUBACKs in order; a client's out-of-order PUBACK makes the
//!   router drop the link, which ends the session (the client reconnects).
//! - Deliveries live in memory: a subscriber that stops reading while the filter's segment ring
//!   (`SEGMENT_BYTES` × `SEGMENTS`) wraps loses the oldest of them (crates.md §0.3). Upstream data
//!   does not depend on this: it is in the outbox before the PUBACK.
//! - `LinkTx::send` blocks while the router's event queue (1,000 events) is full; the router
//!   thread drains it without waiting on anyone, so the wait is short.

use bytes::Bytes;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, PubAck, PubAckReason, Publish, QoS,
    RetainForwardRule, Subscribe, Unsubscribe,
};
use rumqttd::{Notification, Router, RouterConfig};

/// Bytes per segment of a filter's in-memory log, and segments kept per filter.
const SEGMENT_BYTES: usize = 256 * 1024;
const SEGMENTS: usize = 4;

type Connect = dyn Fn(&str) -> Result<(LinkTx, LinkRx), String> + Send + Sync;

/// The router thread and a way to open links to it.
pub struct LocalRouter {
    connect: Box<Connect>,
}

impl std::fmt::Debug for LocalRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRouter").finish_non_exhaustive()
    }
}

/// A message the router delivers to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub pkid: u16,
    pub retain: bool,
}

impl LocalRouter {
    /// Spawns rumqttd's router on its own thread (it has no shutdown; it lives as long as the
    /// process, like the endpoint).
    pub fn start(max_connections: usize) -> LocalRouter {
        let config = RouterConfig {
            // Every session and a few internal links (the bridge's, later).
            max_connections: max_connections + 16,
            max_outgoing_packet_count: 200,
            max_segment_size: SEGMENT_BYTES,
            max_segment_count: SEGMENTS,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let tx = Router::new(0, config).spawn();
        LocalRouter {
            connect: Box::new(move |id| {
                let (ltx, lrx, _connack) = LinkBuilder::new(id, tx.clone())
                    .clean_session(true)
                    .build()
                    .map_err(|e: LinkError| e.to_string())?;
                Ok((ltx, lrx))
            }),
        }
    }

    /// Opens a link for one session. Blocks on the router's answer, so callers in async code
    /// use `spawn_blocking`.
    pub fn link(&self, client: &str, session: u64) -> Result<(LinkSender, LinkReceiver), String> {
        let (tx, rx) = (self.connect)(&format!("{client}.{session}"))?;
        Ok((LinkSender { tx }, LinkReceiver { rx }))
    }
}

/// The session's half that hands packets to the router.
pub struct LinkSender {
    tx: LinkTx,
}

impl LinkSender {
    async fn send(&mut self, p: Packet) -> bool {
        self.tx.send(p).await.is_ok()
    }

    /// An allowed publish. QoS 1 keeps the client's packet id (the router acknowledges it on the
    /// link; the client's PUBACK comes from the outbox, not from here).
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: u8,
        pkid: u16,
        retain: bool,
    ) -> bool {
        let p = if qos == 0 {
            Publish::new(
                Bytes::copy_from_slice(topic.as_bytes()),
                Bytes::copy_from_slice(payload),
                retain,
            )
        } else {
            Publish::deserialize(serialized(topic, payload, 1, pkid, retain))
        };
        self.send(Packet::Publish(p, None)).await
    }

    /// Allowed filters only (the ACL has already answered the client's SUBSCRIBE).
    pub async fn subscribe(&mut self, pkid: u16, filters: &[(String, u8)]) -> bool {
        if filters.is_empty() {
            return true;
        }
        let filters = filters
            .iter()
            .map(|(path, qos)| Filter {
                path: path.clone(),
                qos: if *qos == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                },
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            })
            .collect();
        self.send(Packet::Subscribe(Subscribe { pkid, filters }, None))
            .await
    }

    pub async fn unsubscribe(&mut self, pkid: u16, filters: Vec<String>) -> bool {
        self.send(Packet::Unsubscribe(Unsubscribe { pkid, filters }, None))
            .await
    }

    /// The client acknowledged a QoS 1 delivery.
    pub async fn ack(&mut self, pkid: u16) -> bool {
        let ack = PubAck {
            pkid,
            reason: PubAckReason::Success,
        };
        self.send(Packet::PubAck(ack, None)).await
    }

    /// Ends the link (the session is over).
    pub async fn close(mut self) {
        let d = Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        };
        let _ = self.send(Packet::Disconnect(d, None)).await;
    }
}

/// The session's half that receives deliveries.
pub struct LinkReceiver {
    rx: LinkRx,
}

impl LinkReceiver {
    /// The next delivery; None when the router dropped the link.
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            match self.rx.next().await {
                Err(_) => return None,
                Ok(None) => continue,
                Ok(Some(Notification::Forward(f))) => return Some(delivery(&f.publish)),
                Ok(Some(Notification::Unschedule)) => {
                    if self.rx.wake().await.is_err() {
                        return None;
                    }
                }
                Ok(Some(Notification::Disconnect(..))) => return None,
                // Acks of what the session sent, and kinds a local link never gets.
                Ok(Some(_)) => continue,
            }
        }
    }
}

/// `Publish::serialize`'s layout: header (type, dup, QoS, retain), packet id, topic length,
/// topic, payload.
fn serialized(topic: &str, payload: &[u8], qos: u8, pkid: u16, retain: bool) -> Bytes {
    let mut o = Vec::with_capacity(5 + topic.len() + payload.len());
    o.push(0x30 | (qos << 1) | u8::from(retain));
    o.extend_from_slice(&pkid.to_be_bytes());
    o.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    o.extend_from_slice(topic.as_bytes());
    o.extend_from_slice(payload);
    Bytes::from(o)
}

fn delivery(p: &Publish) -> Delivery {
    let s = p.serialize();
    Delivery {
        topic: String::from_utf8_lossy(&p.topic).into_owned(),
        payload: p.payload.to_vec(),
        qos: (s[0] >> 1) & 0x03,
        pkid: u16::from_be_bytes([s[1], s[2]]),
        retain: p.retain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qos1_publish_round_trips_through_rumqttd_serialization() {
        let p = Publish::deserialize(serialized("dt/c1/t", b"x", 1, 7, true));
        let d = delivery(&p);
        assert_eq!(
            d,
            Delivery {
                topic: "dt/c1/t".into(),
                payload: b"x".to_vec(),
                qos: 1,
                pkid: 7,
                retain: true
            }
        );
    }

    async fn next(rx: &mut LinkReceiver) -> Delivery {
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.next())
            .await
            .expect("delivery within 5 s")
            .expect("link open")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn routes_between_links_with_retained_messages_and_qos1_acks() {
        let r = LocalRouter::start(8);
        let (mut a_tx, _a_rx) = tokio::task::block_in_place(|| r.link("a", 1)).expect("link a");
        // Retained before anyone subscribes.
        assert!(a_tx.publish("cmd/b/r", b"kept", 1, 3, true).await);
        let (mut b_tx, mut b_rx) = tokio::task::block_in_place(|| r.link("b", 2)).expect("link b");
        assert!(b_tx.subscribe(1, &[("cmd/b/#".into(), 1)]).await);
        let d = next(&mut b_rx).await;
        assert_eq!((d.topic.as_str(), d.retain), ("cmd/b/r", true));
        assert!(b_tx.ack(d.pkid).await);
        assert!(a_tx.publish("cmd/b/x", b"live", 1, 9, false).await);
        let d = next(&mut b_rx).await;
        assert_eq!(
            (d.topic.as_str(), d.payload.as_slice(), d.qos, d.retain),
            ("cmd/b/x", &b"live"[..], 1, false)
        );
        assert!(b_tx.ack(d.pkid).await);
        // Not subscribed: nothing else arrives.
        assert!(a_tx.publish("dt/a/x", b"no", 1, 10, false).await);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(300), b_rx.next())
                .await
                .is_err()
        );
    }
}
