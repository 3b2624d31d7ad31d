//! Topic mapping (pure): a child's local topic → the cloud topic the gateway publishes it on.
//!
//! A rule is a pair of templates. The local template is split on `/`; each level is a literal,
//! `{child}` (must be the publishing child's id) or, as the last level only, `{suffix}` (one or
//! more levels, `/` included). The cloud template may use `{gateway}` (the gateway's thing name),
//! `{thing}` (the child's thing name), `{child}` and, when the local template has it, `{suffix}`.
//! The first rule whose local template matches wins. No I/O here.

use std::fmt;

/// One configured rule, as written in `[[bridge.mappings]]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MappingRule {
    pub local: String,
    pub cloud: String,
}

impl Default for MappingRule {
    fn default() -> Self {
        MappingRule {
            local: "dt/{child}/{suffix}".into(),
            cloud: "gw/{gateway}/{thing}/{suffix}".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} template `{template}`: {reason}")]
pub struct MappingError {
    /// `local` or `cloud`.
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
    if t.is_empty() {
        return Err(bad("cloud", t, "is empty"));
    }
    if t.starts_with('$') {
        return Err(bad("cloud", t, "must not start with `$` (reserved topics)"));
    }
    if t.contains(['+', '#', '\0']) {
        return Err(bad("cloud", t, "has `+`, `#` or NUL"));
    }
    let mut parts = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_owned()));
        }
        let Some(close) = rest[open..].find('}') else {
            return Err(bad("cloud", t, "has `{` without `}`"));
        };
        let name = &rest[open + 1..open + close];
        parts.push(match name {
            "gateway" => Part::Gateway,
            "thing" => Part::Thing,
            "child" => Part::Child,
            "suffix" if has_suffix => Part::Suffix,
            "suffix" => {
                return Err(bad(
                    "cloud",
                    t,
                    "uses `{suffix}` but the local template has none",
                ));
            }
            other => {
                return Err(bad(
                    "cloud",
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
        return Err(bad("cloud", t, "has `}` without `{`"));
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
            out.push(Compiled { local, cloud });
        }
        Ok(Mapper { rules: out })
    }

    /// The cloud topic for a child's local `topic`, or `None` when no rule matches (or a
    /// rule's `{child}` level is not this child's id).
    pub fn map(&self, topic: &str, names: Names<'_>) -> Option<String> {
        self.rules.iter().find_map(|r| Self::apply(r, topic, names))
    }

    fn apply(r: &Compiled, topic: &str, names: Names<'_>) -> Option<String> {
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
        let mut out = String::with_capacity(topic.len() + names.gateway.len() + names.thing.len());
        for p in &r.cloud {
            match p {
                Part::Text(s) => out.push_str(s),
                Part::Gateway => out.push_str(names.gateway),
                Part::Thing => out.push_str(names.thing),
                Part::Child => out.push_str(names.child),
                Part::Suffix => out.push_str(suffix.unwrap_or_default()),
            }
        }
        Some(out)
    }
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
    };

    fn rule(local: &str, cloud: &str) -> MappingRule {
        MappingRule {
            local: local.into(),
            cloud: cloud.into(),
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
