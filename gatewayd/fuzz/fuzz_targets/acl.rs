//! From raw bytes to the ACL decision, the path every byte from a local device takes: framing,
//! CONNECT, then each packet; every PUBLISH topic, SUBSCRIBE filter and will topic is judged by
//! the default rules. Checks: nothing panics, and nothing outside `dt/<client id>` (publish, will)
//! or `cmd/<client id>` (subscribe) is ever allowed, `$` topics never.
//!
//! The pure cores (and the topic matcher they share with the cloud side) are compiled in by path instead of depending on the gatewayd crate: they
//! have no dependency but thiserror (that is the point of keeping them pure), and the fuzz build
//! stays seconds instead of building the whole daemon with sanitizers.
#![no_main]

#[path = "../../src/local/acl.rs"]
mod acl;
#[path = "../../src/local/codec.rs"]
mod codec;
#[path = "../../src/cloud/topic.rs"]
mod topic;
/// `acl.rs` reaches the topic matcher as `crate::cloud::topic`.
mod cloud {
    pub(crate) use super::topic;
}

use acl::{Action, Decision, Rules};
use libfuzzer_sys::fuzz_target;

fn check(rules: &Rules, child: &str, action: Action, topic: &str) {
    let d = acl::decide(rules, child, Some("gw-1"), action, topic);
    if d == Decision::Allow {
        let ns = match action {
            Action::Subscribe => format!("cmd/{child}"),
            _ => format!("dt/{child}"),
        };
        assert!(!topic.starts_with('$'), "{action:?} {topic} allowed");
        assert!(
            topic == ns || topic.starts_with(&format!("{ns}/")),
            "{child} {action:?} {topic} allowed outside {ns}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let rules = Rules {
        publish: vec!["dt/%c/#".into()],
        subscribe: vec!["cmd/%c/#".into()],
    };
    // First byte even: the rest is a byte stream from a device (framing, CONNECT, packets).
    // Odd: the rest is one (action, topic) judged directly, so the fuzzer reaches the matcher
    // without having to get MQTT length fields right.
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        let Some((&a, topic)) = data.split_first() else {
            return;
        };
        let action = [Action::Publish, Action::Subscribe, Action::Will][usize::from(a % 3)];
        check(&rules, "c1", action, &String::from_utf8_lossy(topic));
        return;
    }
    let mut buf = data;
    let Ok(Some((h, end, start))) = codec::frame(buf, 1 << 20) else {
        return;
    };
    let Ok(c) = codec::decode_connect(h, &buf[start..end]) else {
        return;
    };
    // The endpoint refuses client ids that are not child ids before any ACL check.
    let child = c.client_id.clone();
    if child.is_empty()
        || child.len() > 128
        || !child
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-'))
    {
        return;
    }
    if let Some(w) = &c.will {
        check(&rules, &child, Action::Will, &w.topic);
    }
    buf = &buf[end..];
    while let Ok(Some((h, end, start))) = codec::frame(buf, 1 << 20) {
        match codec::decode(h, &buf[start..end], c.version) {
            Ok(codec::Packet::Publish(p)) => check(&rules, &child, Action::Publish, &p.topic),
            Ok(codec::Packet::Subscribe { filters, .. }) => {
                for (f, _) in filters {
                    check(&rules, &child, Action::Subscribe, &f);
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
        buf = &buf[end..];
    }
});
