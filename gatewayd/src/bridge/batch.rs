//! The batch envelope (pure): many child messages in one cloud publish.
//!
//! AWS IoT Core allows one connection 100 publishes per second; a rule with `batch` packs its
//! messages into one JSON document so that more child messages than that fit one connection:
//!
//! ```json
//! {"gateway":"gw-1","messages":[
//!   {"child":"meter-1","thing":"gw-1-SN-1","topic":"gw/gw-1/gw-1-SN-1/power","ts":1764600000123,
//!    "payload":{"w":230.5}},
//!   {"child":"cam-2","thing":"gw-1-cam-2","topic":"gw/gw-1/gw-1-cam-2/raw","ts":1764600000125,
//!    "payload_base64":"AAEC"}]}
//! ```
//!
//! - `topic` is the cloud topic the message would have had alone (the rule's `cloud` template),
//!   so a consumer (an IoT rule, a Lambda) can republish each one where it belongs.
//! - `ts` is when the gateway stored it (ms since the Unix epoch).
//! - `payload` is the child's payload as it was sent, byte for byte, when it is a JSON document
//!   without surrounding whitespace; any other payload is `payload_base64` (standard alphabet,
//!   padded).
//! - Messages are in the order the gateway took them: each child's in the order it sent them.
//!
//! The envelope's size is counted exactly as it is built, so it never exceeds the rule's
//! `max_bytes` (at most AWS's 128 KiB).

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One message as an envelope carries it.
#[derive(Debug, Serialize)]
struct Item<'a> {
    child: &'a str,
    thing: &'a str,
    topic: &'a str,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

/// One message to pack.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub child: &'a str,
    pub thing: &'a str,
    pub topic: &'a str,
    pub ts: u64,
    pub payload: &'a [u8],
}

/// An envelope being filled.
#[derive(Debug)]
pub struct Envelope {
    buf: Vec<u8>,
    count: usize,
    max_messages: usize,
    max_bytes: usize,
}

const CLOSE: &[u8] = b"]}";

impl Envelope {
    pub fn new(gateway: &str, max_messages: usize, max_bytes: usize) -> Envelope {
        let mut buf = Vec::with_capacity(max_bytes.min(16 * 1024));
        buf.extend_from_slice(b"{\"gateway\":");
        // A string always serializes.
        buf.extend_from_slice(
            serde_json::to_string(gateway)
                .unwrap_or_default()
                .as_bytes(),
        );
        buf.extend_from_slice(b",\"messages\":[");
        Envelope {
            buf,
            count: 0,
            max_messages,
            max_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds `m` when it fits (in messages and bytes); `false` leaves the envelope unchanged.
    pub fn push(&mut self, m: Message<'_>) -> bool {
        if self.count >= self.max_messages {
            return false;
        }
        let item = encode(m);
        let comma = usize::from(self.count > 0);
        if self.buf.len() + comma + item.len() + CLOSE.len() > self.max_bytes {
            return false;
        }
        if comma == 1 {
            self.buf.push(b',');
        }
        self.buf.extend_from_slice(&item);
        self.count += 1;
        true
    }

    /// The finished document.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(CLOSE);
        self.buf
    }
}

/// A payload goes in as JSON when that keeps its bytes: valid JSON with no whitespace around it
/// (a JSON value is read back without the whitespace around it).
fn as_json(payload: &[u8]) -> Option<&RawValue> {
    let edge = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    if payload.first().is_none_or(edge) || payload.last().is_none_or(edge) {
        return None;
    }
    let text = std::str::from_utf8(payload).ok()?;
    serde_json::from_str::<&RawValue>(text).ok()
}

fn encode(m: Message<'_>) -> Vec<u8> {
    let raw = as_json(m.payload);
    let item = Item {
        child: m.child,
        thing: m.thing,
        topic: m.topic,
        ts: m.ts,
        payload: raw,
        payload_base64: match raw {
            Some(_) => None,
            None => Some(base64::engine::general_purpose::STANDARD.encode(m.payload)),
        },
    };
    // Strings, a number and a checked raw value: serializing cannot fail.
    serde_json::to_vec(&item).unwrap_or_default()
}

/// One message read back from an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    pub child: String,
    pub thing: String,
    pub topic: String,
    pub ts: u64,
    pub payload: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnedItem<'a> {
    child: String,
    thing: String,
    topic: String,
    ts: u64,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    payload_base64: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc<'a> {
    #[allow(dead_code)]
    gateway: String,
    #[serde(borrow)]
    messages: Vec<OwnedItem<'a>>,
}

/// Reads an envelope back into the original messages (what a cloud consumer does; used by the
/// tests and the benchmark).
pub fn unpack(doc: &[u8]) -> Result<Vec<Unpacked>, String> {
    let text = std::str::from_utf8(doc).map_err(|e| format!("envelope is not UTF-8: {e}"))?;
    let d: Doc<'_> = serde_json::from_str(text).map_err(|e| format!("envelope: {e}"))?;
    d.messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let payload = match (m.payload, m.payload_base64) {
                (Some(raw), None) => raw.get().as_bytes().to_vec(),
                (None, Some(b)) => base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| format!("messages[{i}].payload_base64: {e}"))?,
                _ => {
                    return Err(format!(
                        "messages[{i}]: exactly one of payload and payload_base64"
                    ));
                }
            };
            Ok(Unpacked {
                child: m.child,
                thing: m.thing,
                topic: m.topic,
                ts: m.ts,
                payload,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn msg<'a>(child: &'a str, payload: &'a [u8]) -> Message<'a> {
        Message {
            child,
            thing: "t",
            topic: "gw/g/t/x",
            ts: 7,
            payload,
        }
    }

    #[test]
    fn json_payloads_stay_json_and_others_are_base64() {
        let mut e = Envelope::new("g", 10, 4096);
        assert!(e.push(msg("a", br#"{"w": 1.50, "z":[1, 2]}"#)));
        assert!(e.push(msg("b", b"\x00\x01\xff")));
        assert!(e.push(msg("c", b" 42")));
        assert!(e.push(msg("d", b"")));
        let doc = e.finish();
        let v: serde_json::Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(v["gateway"], "g");
        assert_eq!(v["messages"][0]["payload"]["w"], 1.5);
        assert_eq!(v["messages"][1]["payload_base64"], "AAH/");
        assert_eq!(v["messages"][2]["payload_base64"], "IDQy");
        assert_eq!(v["messages"][3]["payload_base64"], "");
        let back = unpack(&doc).unwrap();
        assert_eq!(back[0].payload, br#"{"w": 1.50, "z":[1, 2]}"#);
        assert_eq!(back[2].payload, b" 42");
        assert_eq!(back[3].payload, b"");
    }

    #[test]
    fn limits_in_messages_and_bytes_are_kept_exactly() {
        let mut e = Envelope::new("g", 3, 10_000);
        for _ in 0..3 {
            assert!(e.push(msg("a", b"1")));
        }
        assert!(!e.push(msg("a", b"1")), "fourth message over max_messages");
        assert_eq!(e.len(), 3);

        // Fill to a byte limit: the finished document is never over it, and an item that no
        // longer fits is refused.
        let limit = 300;
        let mut e = Envelope::new("g", 100, limit);
        let mut n = 0;
        while e.push(msg("a", b"{\"v\":12345}")) {
            n += 1;
        }
        let doc = e.finish();
        assert!(doc.len() <= limit, "{} > {limit}", doc.len());
        assert!(
            limit - doc.len() < 80,
            "room left for another item: {}",
            doc.len()
        );
        assert_eq!(unpack(&doc).unwrap().len(), n);
        // One message bigger than the envelope can hold is refused even into an empty one.
        let big = vec![b'x'; 400];
        assert!(!Envelope::new("g", 100, limit).push(msg("a", &big)));
    }

    #[test]
    fn a_bad_envelope_is_named() {
        assert!(unpack(b"{}").unwrap_err().contains("missing field"));
        let e =
            unpack(br#"{"gateway":"g","messages":[{"child":"a","thing":"t","topic":"x","ts":1}]}"#)
                .unwrap_err();
        assert!(e.contains("messages[0]: exactly one"), "{e}");
    }

    proptest! {
        /// Whatever the payloads, the envelope unpacks to the originals in order, within its
        /// byte limit.
        #[test]
        fn envelopes_unpack_to_the_originals(
            payloads in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..40),
                    "[ -~]{0,30}".prop_map(|s| s.into_bytes()),
                    (any::<i64>(), "[a-z]{0,6}").prop_map(|(n, s)| format!("{{\"n\":{n},\"s\":\"{s}\"}}").into_bytes()),
                ],
                1..40,
            ),
            max_bytes in 256usize..4096,
        ) {
            let mut e = Envelope::new("gw-1", 1000, max_bytes);
            let mut packed = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                let child = format!("c{}", i % 3);
                if !e.push(Message { child: &child, thing: "t", topic: "gw/x", ts: i as u64, payload: p }) {
                    break;
                }
                packed.push((child, i as u64, p.clone()));
            }
            let doc = e.finish();
            prop_assert!(doc.len() <= max_bytes);
            let back = unpack(&doc).unwrap();
            prop_assert_eq!(back.len(), packed.len());
            for (b, (child, ts, p)) in back.iter().zip(&packed) {
                prop_assert_eq!(&b.child, child);
                prop_assert_eq!(b.ts, *ts);
                prop_assert_eq!(&b.payload, p);
            }
        }
    }
}
