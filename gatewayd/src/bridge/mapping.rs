//! Topic mapping (pure): a child's local topic → the cloud topic the gateway publishes it on.
//!
//! A rule is a pair of templates. The local template is split on `/`; each level is a literal,
//! `{child}` (must be the publishing child's id) or, as the last level only, `{suffix}` (one or
//! more levels, `/` included). The cloud template may use `{gateway}` (the gateway's thing name),
//! `{thing}` (the child's thing name), `{child}` and, when the local template has it, `{suffix}`.
//! A rule may be limited to children of one device `profile` (the Modbus profile a child's
//! device matched, or the model an announced device gave), and may `batch` its messages: then
//! they are packed into envelopes (`bridge::batch`) published on the batch's own topic, which may
//! only use `{gateway}` (one envelope carries many children).
//! The first rule whose local template matches (and whose profile, if any, is the child's) wins.
//! No I/O here.

use std::fmt;

/// One configured rule, as written in `[[bridge.mappings]]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MappingRule {
    pub local: String,
    pub cloud: String,
    /// Only children of this device profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Pack this rule's messages into envelopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchRule>,
}

impl Default for MappingRule {
    fn default() -> Self {
        MappingRule {
            local: "dt/{child}/{suffix}".into(),
            cloud: "gw/{gateway}/{thing}/{suffix}".into(),
            profile: None,
            batch: None,
        }
    }
}

/// `batch = { .. }` of a rule: where envelopes go and how much one may carry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRule {
    /// The envelope's cloud topic; may use `{gateway}` only.
    #[serde(default = "default_batch_topic")]
    pub topic: String,
    /// Messages per envelope, 1 to 10,000.
    #[serde(default = "default_batch_messages")]
    pub max_messages: usize,
    /// An envelope's size in bytes, 256 to 131,072 (AWS IoT's largest message: 128 KiB).
    #[serde(default = "default_batch_bytes")]
    pub max_bytes: usize,
}

fn default_batch_topic() -> String {
    "gw/{gateway}/batch".into()
}
fn default_batch_messages() -> usize {
    500
}
fn default_batch_bytes() -> usize {
    MAX_CLOUD_MESSAGE
}

/// AWS IoT Core's largest message payload.
pub const MAX_CLOUD_MESSAGE: usize = 128 * 1024;

impl Default for BatchRule {
    fn default() -> Self {
        BatchRule {
            topic: default_batch_topic(),
            max_messages: default_batch_messages(),
            max_bytes: default_batch_bytes(),
        }
    }
}

/// A rule's batching, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    topic: Vec<Part>,
    pub max_messages: usize,
    pub max_bytes: usize,
}

impl Batch {
    /// The envelope's cloud topic for this gateway.
    pub fn topic(&self, gateway: &str) -> String {
        fill(&self.topic, gateway, "", "", None)
    }
}

/// Where one message goes: its own cloud topic, and the rule's batching if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped<'m> {
    /// The topic it would have alone (also what an envelope names for it).
    pub topic: String,
    /// The index of the rule that matched.
    pub rule: usize,
    pub batch: Option<&'m Batch>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} template `{template}`: {reason}")]
pub struct MappingError {
    /// `local`, `cloud`, `profile` or `batch.*`.
    pub field: &'static str,
    pub template: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Child,
    Suffix,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Gateway,
    Thing,
    Child,
    Suffix,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Compiled {
    local: Vec<Level>,
    cloud: Vec<Part>,
    profile: Option<String>,
    batch: Option<Batch>,
}

/// The compiled rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapper {
    rules: Vec<Compiled>,
}

/// Who a message is from and for, for filling in a cloud template.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    pub child: &'a str,
    pub thing: &'a str,
    pub gateway: &'a str,
    /// The child's device profile, when it has one.
    pub profile: Option<&'a str>,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Level::Literal(s) => f.write_str(s),
            Level::Child => f.write_str("{child}"),
            Level::Suffix => f.write_str("{suffix}"),
        }
    }
}

fn bad(field: &'static str, template: &str, reason: impl Into<String>) -> MappingError {
    MappingError {
        field,
        template: template.to_owned(),
        reason: reason.into(),
    }
}

fn compile_local(t: &str) -> Result<Vec<Level>, MappingError> {
    if t.is_empty() {
        return Err(bad("local", t, "is empty"));
    }
    let levels: Vec<&str> = t.split('/').collect();
    let mut out = Vec::with_capacity(levels.len());
    for (i, l) in levels.iter().enumerate() {
        let level = match *l {
            "{child}" => Level::Child,
            "{suffix}" if i + 1 == levels.len() => Level::Suffix,
            "{suffix}" => return Err(bad("local", t, "`{suffix}` may only be the last level")),
            "" => return Err(bad("local", t, "has an empty level")),
            s if s.contains(['{', '}']) => {
                return Err(bad(
                    "local",
                    t,
                    format!(
                        "level `{s}`: a placeholder must be a whole level, `{{child}}` or `{{suffix}}`"
                    ),
                ));
            }
            s if s.contains(['+', '#', '\0']) => {
                return Err(bad("local", t, format!("level `{s}` has `+`, `#` or NUL")));
            }
            s => Level::Literal(s.to_owned()),
        };
        out.push(level);
    }
    if !out.contains(&Level::Child) {
        return Err(bad(
            "local",
            t,
            "must contain `{child}` (the publishing child's id)",
        ));
    }
    Ok(out)
}

fn compile_cloud(t: &str, has_suffix: bool) -> Result<Vec<Part>, MappingError> {
    compile_template("cloud", t, has_suffix)
}

fn compile_batch(b: &BatchRule) -> Result<Batch, MappingError> {
    let topic = compile_template("batch.topic", &b.topic, false)?;
    if let Some(p) = topic
        .iter()
        .find(|p| matches!(p, Part::Thing | Part::Child | Part::Suffix))
    {
        let name = match p {
            Part::Thing => "thing",
            Part::Child => "child",
            _ => "suffix",
        };
        return Err(bad(
            "batch.topic",
            &b.topic,
            format!(
                "may use `{{gateway}}` only, not `{{{name}}}` (one envelope carries many children)"
            ),
        ));
    }
    if !(1..=10_000).contains(&b.max_messages) {
        return Err(bad(
            "batch.max_messages",
            &b.max_messages.to_string(),
            "must be 1 to 10000",
        ));
    }
    if !(256..=MAX_CLOUD_MESSAGE).contains(&b.max_bytes) {
        return Err(bad(
            "batch.max_bytes",
            &b.max_bytes.to_string(),
            format!("must be 256 to {MAX_CLOUD_MESSAGE} (AWS IoT's largest message)"),
        ));
    }
    Ok(Batch {
        topic,
        max_messages: b.max_messages,
        max_bytes: b.max_bytes,
    })
}

fn compile_template(
    field: &'static str,
    t: &str,
    has_suffix: bool,
) -> Result<Vec<Part>, MappingError> {
    if t.is_empty() {
        return Err(bad(field, t, "is empty"));
    }
    if t.starts_with('$') {
        return Err(bad(field, t, "must not start with `$` (reserved topics)"));
    }
    if t.contains(['+', '#', '\0']) {
        return Err(bad(field, t, "has `+`, `#` or NUL"));
    }
    let mut parts = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_owned()));
        }
        let Some(close) = rest[open..].find('}') else {
            return Err(bad(field, t, "has `{` without `}`"));
        };
        let name = &rest[open + 1..open + close];
        parts.push(match name {
            "gateway" => Part::Gateway,
            "thing" => Part::Thing,
            "child" => Part::Child,
            "suffix" if has_suffix => Part::Suffix,
            "suffix" => {
                return Err(bad(
                    field,
                    t,
                    "uses `{suffix}` but the local template has none",
                ));
            }
            other => {
                return Err(bad(
                    field,
                    t,
                    format!(
                        "unknown placeholder `{{{other}}}` (known: {{gateway}}, {{thing}}, {{child}}, {{suffix}})"
                    ),
                ));
            }
        });
        rest = &rest[open + close + 1..];
    }
    if rest.contains('}') {
        return Err(bad(field, t, "has `}` without `{`"));
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    Ok(parts)
}

impl Mapper {
    /// Compiles `rules`; the error names the rule (0-based index) and what is wrong with it.
    pub fn new(rules: &[MappingRule]) -> Result<Mapper, (usize, MappingError)> {
        let mut out = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let local = compile_local(&r.local).map_err(|e| (i, e))?;
            let cloud = compile_cloud(&r.cloud, local.last() == Some(&Level::Suffix))
                .map_err(|e| (i, e))?;
            let profile = match &r.profile {
                Some(p) if p.is_empty() || p.contains(['/', '+', '#', '\0']) => {
                    return Err((
                        i,
                        bad(
                            "profile",
                            p,
                            "must be a profile name (not empty, no `/`, `+`, `#`)",
                        ),
                    ));
                }
                p => p.clone(),
            };
            let batch = r
                .batch
                .as_ref()
                .map(compile_batch)
                .transpose()
                .map_err(|e| (i, e))?;
            out.push(Compiled {
                local,
                cloud,
                profile,
                batch,
            });
        }
        Ok(Mapper { rules: out })
    }

    /// The cloud topic for a child's local `topic`, or `None` when no rule matches (or a
    /// rule's `{child}` level is not this child's id).
    pub fn map(&self, topic: &str, names: Names<'_>) -> Option<String> {
        self.route(topic, names).map(|m| m.topic)
    }

    /// Where a child's local `topic` goes: the first matching rule's cloud topic and batching.
    pub fn route(&self, topic: &str, names: Names<'_>) -> Option<Mapped<'_>> {
        self.rules.iter().enumerate().find_map(|(i, r)| {
            let topic = Self::apply(r, topic, names)?;
            Some(Mapped {
                topic,
                rule: i,
                batch: r.batch.as_ref(),
            })
        })
    }

    /// Whether any rule batches.
    pub fn batches(&self) -> bool {
        self.rules.iter().any(|r| r.batch.is_some())
    }

    /// The largest envelope any rule allows, in messages (1 when none batches).
    pub fn max_batch_messages(&self) -> usize {
        self.rules
            .iter()
            .filter_map(|r| r.batch.as_ref().map(|b| b.max_messages))
            .max()
            .unwrap_or(1)
    }

    fn apply(r: &Compiled, topic: &str, names: Names<'_>) -> Option<String> {
        if let Some(p) = &r.profile
            && names.profile != Some(p.as_str())
        {
            return None;
        }
        let mut rest = topic;
        let mut suffix = None;
        for (i, level) in r.local.iter().enumerate() {
            let last = i + 1 == r.local.len();
            match level {
                Level::Suffix => {
                    if rest.is_empty() {
                        return None;
                    }
                    suffix = Some(rest);
                    rest = "";
                    break;
                }
                _ => {
                    let (head, tail) = match rest.split_once('/') {
                        Some((h, t)) if !last => (h, t),
                        Some(_) => return None,
                        None if last => (rest, ""),
                        None => return None,
                    };
                    let ok = match level {
                        Level::Literal(s) => head == s,
                        Level::Child => head == names.child,
                        Level::Suffix => false,
                    };
                    if !ok {
                        return None;
                    }
                    rest = tail;
                }
            }
        }
        if !rest.is_empty() {
            return None;
        }
        Some(fill(
            &r.cloud,
            names.gateway,
            names.thing,
            names.child,
            suffix,
        ))
    }
}

fn fill(parts: &[Part], gateway: &str, thing: &str, child: &str, suffix: Option<&str>) -> String {
    let mut out = String::with_capacity(64 + gateway.len() + thing.len());
    for p in parts {
        match p {
            Part::Text(s) => out.push_str(s),
            Part::Gateway => out.push_str(gateway),
            Part::Thing => out.push_str(thing),
            Part::Child => out.push_str(child),
            Part::Suffix => out.push_str(suffix.unwrap_or_default()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    const N: Names<'static> = Names {
        child: "meter-1",
        thing: "gw1-SN-1",
        gateway: "gw1",
        profile: None,
    };

    fn rule(local: &str, cloud: &str) -> MappingRule {
        MappingRule {
            local: local.into(),
            cloud: cloud.into(),
            ..MappingRule::default()
        }
    }

    #[test]
    fn the_default_maps_the_suffix_with_its_slashes() {
        let m = Mapper::new(&[MappingRule::default()]).unwrap();
        assert_eq!(
            m.map("dt/meter-1/power/phase/1", N).as_deref(),
            Some("gw/gw1/gw1-SN-1/power/phase/1")
        );
        assert_eq!(
            m.map("dt/meter-1/x", N).as_deref(),
            Some("gw/gw1/gw1-SN-1/x")
        );
    }

    #[test]
    fn topics_that_do_not_match_map_to_nothing() {
        let m = Mapper::new(&[MappingRule::default()]).unwrap();
        for t in [
            "dt/meter-1",    // no suffix
            "dt/meter-1/",   // empty suffix
            "dt/meter-2/x",  // another child's topic
            "st/meter-1/x",  // other prefix
            "dt",            // too short
            "",              // empty
            "dtx/meter-1/x", // literal must be whole
        ] {
            assert_eq!(m.map(t, N), None, "{t}");
        }
    }

    #[test]
    fn the_first_matching_rule_wins_and_exact_templates_need_exact_topics() {
        let m = Mapper::new(&[
            rule("dt/{child}/alarm", "gw/{gateway}/alarms/{thing}"),
            MappingRule::default(),
            rule("status/{child}", "gw/{gateway}/{thing}/status/{child}"),
        ])
        .unwrap();
        assert_eq!(
            m.map("dt/meter-1/alarm", N).as_deref(),
            Some("gw/gw1/alarms/gw1-SN-1")
        );
        assert_eq!(
            m.map("dt/meter-1/alarm/x", N).as_deref(),
            Some("gw/gw1/gw1-SN-1/alarm/x")
        );
        assert_eq!(
            m.map("status/meter-1", N).as_deref(),
            Some("gw/gw1/gw1-SN-1/status/meter-1")
        );
        assert_eq!(m.map("status/meter-1/more", N), None);
    }

    #[test]
    fn bad_templates_are_named_with_what_is_wrong() {
        let err = |l: &str, c: &str| {
            let (i, e) = Mapper::new(&[MappingRule::default(), rule(l, c)]).unwrap_err();
            assert_eq!(i, 1);
            e.to_string()
        };
        let e = err("dt/{suffix}/{child}", "x");
        assert!(
            e.contains("local template") && e.contains("last level"),
            "{e}"
        );
        let e = err("dt/x/{suffix}", "x/{suffix}");
        assert!(e.contains("must contain `{child}`"), "{e}");
        let e = err("dt/{child}", "gw/{suffix}");
        assert!(e.contains("cloud template") && e.contains("no"), "{e}");
        let e = err("dt/{child}/#", "gw");
        assert!(e.contains("`#`"), "{e}");
        let e = err("dt/{child}", "gw/{thingname}");
        assert!(e.contains("unknown placeholder `{thingname}`"), "{e}");
        let e = err("dt/{child}", "gw/{thing");
        assert!(e.contains("without `}`"), "{e}");
        let e = err("dt/{child}", "$aws/things/{thing}/shadow/update");
        assert!(e.contains("`$`"), "{e}");
        let e = err("dt//{child}", "gw");
        assert!(e.contains("empty level"), "{e}");
        let e = err("dt/x{child}", "gw");
        assert!(e.contains("whole level"), "{e}");
        let e = err("", "gw");
        assert!(e.contains("is empty"), "{e}");
    }

    #[test]
    fn a_profile_rule_applies_only_to_children_of_that_profile() {
        let m = Mapper::new(&[
            MappingRule {
                local: "dt/{child}/{suffix}".into(),
                cloud: "meters/{thing}/{suffix}".into(),
                profile: Some("meter".into()),
                batch: None,
            },
            MappingRule::default(),
        ])
        .unwrap();
        let meter = Names {
            profile: Some("meter"),
            ..N
        };
        let pump = Names {
            profile: Some("pump"),
            ..N
        };
        assert_eq!(
            m.map("dt/meter-1/power", meter).as_deref(),
            Some("meters/gw1-SN-1/power")
        );
        assert_eq!(
            m.map("dt/meter-1/power", pump).as_deref(),
            Some("gw/gw1/gw1-SN-1/power")
        );
        assert_eq!(
            m.map("dt/meter-1/power", N).as_deref(),
            Some("gw/gw1/gw1-SN-1/power")
        );
    }

    #[test]
    fn batching_rules_name_their_envelope_topic_and_bad_batch_settings_are_named() {
        let batched = |b: BatchRule| MappingRule {
            batch: Some(b),
            ..MappingRule::default()
        };
        let m = Mapper::new(&[batched(BatchRule::default())]).unwrap();
        let r = m.route("dt/meter-1/power", N).unwrap();
        assert_eq!(r.topic, "gw/gw1/gw1-SN-1/power");
        assert_eq!(r.batch.unwrap().topic("gw1"), "gw/gw1/batch");
        assert!(m.batches());
        assert_eq!(m.max_batch_messages(), 500);
        assert!(!Mapper::new(&[MappingRule::default()]).unwrap().batches());

        let err = |b: BatchRule| {
            let (i, e) = Mapper::new(&[batched(b)]).unwrap_err();
            assert_eq!(i, 0);
            (e.field, e.to_string())
        };
        let (f, e) = err(BatchRule {
            topic: "gw/{gateway}/{thing}/batch".into(),
            ..BatchRule::default()
        });
        assert_eq!(f, "batch.topic");
        assert!(e.contains("`{gateway}` only, not `{thing}`"), "{e}");
        let (f, e) = err(BatchRule {
            max_messages: 0,
            ..BatchRule::default()
        });
        assert_eq!(f, "batch.max_messages");
        assert!(e.contains("1 to 10000"), "{e}");
        let (f, e) = err(BatchRule {
            max_bytes: 200_000,
            ..BatchRule::default()
        });
        assert_eq!(f, "batch.max_bytes");
        assert!(e.contains("largest message"), "{e}");
        let (f, e) = err(BatchRule {
            topic: "$aws/x".into(),
            ..BatchRule::default()
        });
        assert_eq!(f, "batch.topic");
        assert!(e.contains("`$`"), "{e}");
        let (i, e) = Mapper::new(&[MappingRule {
            profile: Some("a/b".into()),
            ..MappingRule::default()
        }])
        .unwrap_err();
        assert_eq!((i, e.field), (0, "profile"));
    }

    proptest! {
        /// Any suffix of valid levels comes back unchanged under the default rule, and only the
        /// publishing child's id matches `{child}`.
        #[test]
        fn default_rule_round_trips_the_suffix(
            levels in proptest::collection::vec("[a-z0-9_-]{1,8}", 1..5),
            other in "[a-z]{1,6}",
        ) {
            let m = Mapper::new(&[MappingRule::default()]).unwrap();
            let suffix = levels.join("/");
            let got = m.map(&format!("dt/meter-1/{suffix}"), N).unwrap();
            prop_assert_eq!(got, format!("gw/gw1/gw1-SN-1/{suffix}"));
            let other = format!("x{other}");
            let foreign = format!("dt/{other}/{suffix}");
            prop_assert!(m.map(&foreign, N).is_none());
        }
    }
}
