//! ACL: may this client publish to this topic, subscribe to this filter? Pure, no I/O; property
//! tested here and fuzzed from raw bytes (`gatewayd/fuzz`).
//!
//! Rules are MQTT topic filters with two placeholders, `%c` (the client's child id) and `%g` (the
//! gateway's thing name; a rule naming `%g` matches nothing while the name is unknown). A child
//! id cannot hold `/`, `+`, `#` or `$` (`identity::Subject::child`), so a substituted rule never
//! widens. Topics and filters starting with `$` are refused whatever the rules say, and a
//! wildcard in the first level never matches a `$` topic (MQTT §4.7.2).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish,
    Subscribe,
    /// The will is published by the server on the client's behalf: checked like a publish.
    Will,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::Will => "will",
        }
    }
}

/// The rules one client is held to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// Replaces `%c` and `%g`; `None` when the rule needs a gateway name not known yet.
pub fn expand(rule: &str, child: &str, gateway: Option<&str>) -> Option<String> {
    let mut s = rule.replace("%c", child);
    if s.contains("%g") {
        s = s.replace("%g", gateway?);
    }
    Some(s)
}

/// A valid MQTT topic filter: `#` only as the whole last level, `+` only as a whole level.
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return false;
        }
        if l.contains('+') && *l != "+" {
            return false;
        }
    }
    true
}

/// Does `filter` match `topic` (MQTT semantics, `$` rule included)? The one authorization
/// matcher of the crate (`cloud::topic`), without AWS's size limits.
pub fn matches(filter: &str, topic: &str) -> bool {
    crate::cloud::topic::wildcard_grants(filter, topic)
}

/// Is every topic `inner` matches also matched by `outer`? (A subscription is allowed when the
/// rule covers all it could receive.)
pub fn covers(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b && a != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `$`-topic (reserved for the server and AWS).
    Reserved,
    Invalid,
    NotPermitted,
}

/// The decision for one action of `child` on `topic` (a topic for publish and will, a filter for
/// subscribe).
pub fn decide(
    rules: &Rules,
    child: &str,
    gateway: Option<&str>,
    action: Action,
    topic: &str,
) -> Decision {
    if topic.starts_with('$') {
        return Decision::Reserved;
    }
    let list = match action {
        Action::Publish | Action::Will => {
            if topic.is_empty() || topic.contains(['+', '#', '\0']) {
                return Decision::Invalid;
            }
            &rules.publish
        }
        Action::Subscribe => {
            if !valid_filter(topic) || topic.contains('\0') {
                return Decision::Invalid;
            }
            &rules.subscribe
        }
    };
    let ok = list.iter().any(|rule| {
        let Some(rule) = expand(rule, child, gateway) else {
            return false;
        };
        match action {
            Action::Subscribe => covers(&rule, topic),
            _ => matches(&rule, topic),
        }
    });
    if ok {
        Decision::Allow
    } else {
        Decision::NotPermitted
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn defaults() -> Rules {
        Rules {
            publish: vec!["dt/%c/#".into()],
            subscribe: vec!["cmd/%c/#".into()],
        }
    }

    #[test]
    fn a_child_stays_in_its_namespace() {
        let r = defaults();
        let d = |a, t| decide(&r, "c1", None, a, t);
        assert_eq!(d(Action::Publish, "dt/c1/temp"), Decision::Allow);
        assert_eq!(d(Action::Publish, "dt/c1"), Decision::Allow);
        assert_eq!(d(Action::Publish, "dt/c2/temp"), Decision::NotPermitted);
        assert_eq!(d(Action::Publish, "dt/c10/temp"), Decision::NotPermitted);
        assert_eq!(d(Action::Will, "dt/c2/x"), Decision::NotPermitted);
        assert_eq!(
            d(Action::Publish, "$aws/things/c1/shadow/update"),
            Decision::Reserved
        );
        assert_eq!(d(Action::Subscribe, "cmd/c1/#"), Decision::Allow);
        assert_eq!(d(Action::Subscribe, "cmd/c1/+/x"), Decision::Allow);
        assert_eq!(d(Action::Subscribe, "cmd/+/#"), Decision::NotPermitted);
        assert_eq!(d(Action::Subscribe, "#"), Decision::NotPermitted);
        assert_eq!(d(Action::Subscribe, "cmd/#"), Decision::NotPermitted);
        assert_eq!(d(Action::Subscribe, "$SYS/#"), Decision::Reserved);
        assert_eq!(d(Action::Subscribe, "cmd/c1/#/x"), Decision::Invalid);
    }

    #[test]
    fn gateway_placeholder_needs_the_name() {
        let r = Rules {
            publish: vec!["gw/%g/%c/#".into()],
            subscribe: vec![],
        };
        assert_eq!(
            decide(&r, "c", None, Action::Publish, "gw/%g/c/x"),
            Decision::NotPermitted
        );
        assert_eq!(
            decide(&r, "c", Some("gw-1"), Action::Publish, "gw/gw-1/c/x"),
            Decision::Allow
        );
    }

    #[test]
    fn first_level_wildcards_never_match_dollar_topics() {
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/#", "a"));
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("+".to_string()),
            Just("c1".to_string())
        ]
    }
    fn filter() -> impl Strategy<Value = String> {
        (prop::collection::vec(level(), 1..4), any::<bool>()).prop_map(|(l, hash)| {
            let mut s = l.join("/");
            if hash {
                s.push_str("/#");
            }
            s
        })
    }
    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c1")], 1..6)
            .prop_map(|l| l.join("/"))
    }

    proptest! {
        /// `covers` is sound: whenever it allows a subscription, every topic the subscription
        /// matches is matched by the rule.
        #[test]
        fn covers_is_sound(outer in filter(), inner in filter(), t in topic()) {
            if covers(&outer, &inner) && matches(&inner, &t) {
                prop_assert!(matches(&outer, &t), "{outer} covers {inner} but not {t}");
            }
        }

        /// Nothing a child publishes outside `dt/<itself>/` is allowed by the defaults.
        #[test]
        fn defaults_confine_publishes(t in "[a-z$/+#]{0,12}", child in "[a-z0-9]{1,4}") {
            let ok = decide(&defaults(), &child, None, Action::Publish, &t) == Decision::Allow;
            let prefix = format!("dt/{child}");
            prop_assert_eq!(ok, t == prefix || t.starts_with(&format!("{prefix}/")) && !t.contains(['+', '#']));
        }
    }
}
