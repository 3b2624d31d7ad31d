//! Topic rules, pure: which route an incoming message goes to, what an access rule grants, and
//! which topic names and filters AWS IoT Core accepts.
//!
//! Routing and authorization match differently on purpose. A route sees what the broker chose
//! to deliver, so `#` there matches everything, `$aws/...` included (a route for `#` should see
//! a fleet-provisioning answer). An access rule must not: MQTT 3.1.1 §4.7.2 says a filter that
//! starts with a wildcard does not match a topic that starts with `$`, so a child allowed `#`
//! is not thereby allowed `$aws/...`. No I/O here.

/// AWS IoT: a topic name or filter is at most 256 bytes (UTF-8).
pub const MAX_TOPIC_BYTES: usize = 256;
/// AWS IoT: at most 7 forward slashes in a topic or filter, not counting the three of a Basic
/// Ingest prefix (`$aws/rules/<rule>/`).
pub const MAX_TOPIC_SLASHES: usize = 7;

/// Routing match (MQTT filter semantics: `+` one level, `#` the rest including the parent
/// level). Broader than AWS's own (`a/#` does not match `a` there), which is harmless for
/// routing: the broker delivers only what matched its stricter rule.
pub fn route_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Authorization match: like [`route_matches`], except that a filter starting with a wildcard
/// never matches a topic starting with `$` (MQTT 3.1.1 §4.7.2), and a malformed filter or a
/// topic name with wildcards matches nothing.
pub fn acl_matches(filter: &str, topic: &str) -> bool {
    if check_filter(filter).is_err() || check_topic(topic).is_err() {
        return false;
    }
    wildcard_grants(filter, topic)
}

/// The authorization rule without AWS's size limits (the local endpoint's ACL uses it too):
/// MQTT matching, except that a filter starting with a wildcard never matches a `$` topic.
pub fn wildcard_grants(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    route_matches(filter, topic)
}

/// Slashes AWS counts: a Basic Ingest prefix `$aws/rules/<rule>/` is not counted.
fn counted_slashes(s: &str) -> usize {
    let counted = s
        .strip_prefix("$aws/rules/")
        .and_then(|r| r.split_once('/').map(|(_, rest)| rest))
        .unwrap_or(s);
    counted.matches('/').count()
}

fn common(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    if s.contains('\0') {
        return Err("contains a NUL character");
    }
    if s.len() > MAX_TOPIC_BYTES {
        return Err("longer than 256 bytes (AWS IoT limit)");
    }
    if counted_slashes(s) > MAX_TOPIC_SLASHES {
        return Err("more than 7 slashes (AWS IoT limit)");
    }
    Ok(())
}

/// Whether `topic` may be published to AWS IoT: non-empty, no NUL, no wildcard, at most 256
/// bytes and 7 slashes. `Err` carries the reason.
pub fn check_topic(topic: &str) -> Result<(), &'static str> {
    common(topic)?;
    if topic.contains(['+', '#']) {
        return Err("contains a wildcard (+ or #)");
    }
    Ok(())
}

/// Whether `filter` may be subscribed to: the limits of [`check_topic`], with `+` only as a
/// whole level and `#` only as the whole last level.
pub fn check_filter(filter: &str) -> Result<(), &'static str> {
    common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err("# must be the whole last level");
        }
        if level.contains('+') && level != "+" {
            return Err("+ must be a whole level");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn topic_filters() {
        assert!(route_matches("a/b", "a/b"));
        assert!(!route_matches("a/b", "a/b/c"));
        assert!(route_matches("a/+/c", "a/x/c"));
        assert!(!route_matches("a/+/c", "a/x/d"));
        assert!(route_matches("a/#", "a/x/y"));
        assert!(route_matches("a/#", "a"));
        assert!(route_matches(
            "$aws/certificates/create-from-csr/json/accepted",
            "$aws/certificates/create-from-csr/json/accepted"
        ));
        assert!(!route_matches(
            "$aws/certificates/create-from-csr/json/accepted",
            "$aws/certificates/create-from-csr/json/rejected"
        ));
        // A route sees whatever the broker delivered, `$` topics included.
        assert!(route_matches("#", "$aws/things/gw/shadow/update"));
        assert!(route_matches("+/things/#", "$aws/things/gw"));
    }

    #[test]
    fn authorization_keeps_dollar_topics_out_of_leading_wildcards() {
        assert!(!acl_matches("#", "$aws/things/gw/shadow/update"));
        assert!(!acl_matches("+/things/gw/#", "$aws/things/gw/shadow"));
        assert!(!acl_matches("+", "$SYS"));
        // Named explicitly, a `$` topic is granted as usual.
        assert!(acl_matches(
            "$aws/things/gw/#",
            "$aws/things/gw/shadow/update"
        ));
        assert!(acl_matches("$aws/+/gw/shadow", "$aws/things/gw/shadow"));
        // Elsewhere the same as routing.
        assert!(acl_matches("#", "dt/plant/gw/child-1"));
        assert!(acl_matches("dt/+/gw/#", "dt/plant/gw/child-1/telemetry"));
        assert!(!acl_matches("dt/+/gw", "dt/plant/other"));
        // Malformed filters and wildcard "topics" grant nothing.
        assert!(!acl_matches("dt/#/x", "dt/a/x"));
        assert!(!acl_matches("dt/a+", "dt/a+"));
        assert!(!acl_matches("dt/+", "dt/+"));
    }

    #[test]
    fn topic_names() {
        assert_eq!(check_topic("dt/plant-3/gw-0001/telemetry"), Ok(()));
        assert_eq!(check_topic("$aws/certificates/create/json"), Ok(()));
        assert!(check_topic("").is_err());
        assert!(check_topic("a/+/b").is_err());
        assert!(check_topic("a/#").is_err());
        assert!(check_topic("a/b#").is_err());
        assert!(check_topic("a\0b").is_err());
        assert_eq!(check_topic(&"x".repeat(256)), Ok(()));
        assert!(check_topic(&"x".repeat(257)).is_err());
        assert_eq!(check_topic("1/2/3/4/5/6/7/8"), Ok(()));
        assert!(check_topic("1/2/3/4/5/6/7/8/9").is_err());
        // Basic Ingest: the `$aws/rules/<rule>/` prefix does not count.
        assert_eq!(check_topic("$aws/rules/r/1/2/3/4/5/6/7/8"), Ok(()));
    }

    #[test]
    fn filter_syntax() {
        assert_eq!(check_filter("a/+/b/#"), Ok(()));
        assert_eq!(check_filter("#"), Ok(()));
        assert_eq!(check_filter("+"), Ok(()));
        assert!(check_filter("a/#/b").is_err());
        assert!(check_filter("a/b#").is_err());
        assert!(check_filter("a/b+/c").is_err());
        assert!(check_filter("").is_err());
        assert!(check_filter(&format!("a/{}", "x".repeat(255))).is_err());
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("$aws".to_owned()),
            Just("$SYS".to_owned()),
            Just(String::new()),
        ]
    }

    fn topic() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..5)
            .prop_map(|l| l.join("/"))
            .prop_filter("a topic name is not empty", |t| !t.is_empty())
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            proptest::collection::vec(
                prop_oneof![level(), Just("+".to_owned()), Just("+".to_owned())],
                0..5,
            ),
            any::<bool>(),
        )
            .prop_filter_map("a filter has at least one level", |(mut l, hash)| {
                if hash {
                    l.push("#".to_owned());
                }
                (!l.is_empty()).then(|| l.join("/"))
            })
    }

    proptest! {
        #[test]
        fn leading_wildcards_never_authorize_dollar_topics(f in filter(), t in topic()) {
            if t.starts_with('$') && (f.starts_with('+') || f.starts_with('#')) {
                prop_assert!(!acl_matches(&f, &t));
            }
        }

        #[test]
        fn authorization_is_never_broader_than_routing(f in filter(), t in topic()) {
            if acl_matches(&f, &t) {
                prop_assert!(route_matches(&f, &t));
            }
        }

        #[test]
        fn outside_dollar_topics_authorization_is_routing(f in filter(), t in topic()) {
            if !t.starts_with('$') {
                prop_assert_eq!(acl_matches(&f, &t), route_matches(&f, &t));
            }
        }

        #[test]
        fn a_topic_is_a_filter_for_itself(t in topic()) {
            prop_assert!(route_matches(&t, &t));
            prop_assert!(acl_matches(&t, &t));
        }
    }
}
