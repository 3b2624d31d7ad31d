//! Command mapping (pure): a cloud command topic → the child's thing and the local topic the
//! command is delivered on.
//!
//! A rule is a pair of templates (`[[bridge.commands]]`). The cloud template is split on `/`;
//! each level is a literal, `{gateway}` (the gateway's thing name), `{thing}` (the child's thing
//! name, required, once) or, as the last level only, `{suffix}` (one or more levels, `/` kept).
//! Each rule is ONE wildcard subscription: `{gateway}` filled in, `{thing}` → `+`, `{suffix}` →
//! `#` (default `cmd/{gateway}/{thing}/{suffix}` → `cmd/<gateway>/+/#`). The local template may
//! use literals, `{child}` (required) and `{suffix}` (as its last level, exactly when the cloud
//! template has one). The first rule whose cloud template matches wins. Errors reuse
//! `mapping::MappingError`, so they read like the upstream rules' (`bridge.commands[0].cloud:
//! ...`). No I/O here.

use super::mapping::MappingError;

/// AWS IoT allows 50 subscriptions per connection; the gateway's fleet-provisioning calls hold
/// two (`accepted` and `rejected`) while one is in flight.
pub const MAX_COMMAND_SUBSCRIPTIONS: usize = 50 - 2;

/// One configured rule, as written in `[[bridge.commands]]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRule {
    pub cloud: String,
    pub local: String,
}

impl Default for CommandRule {
    fn default() -> Self {
        CommandRule {
            cloud: "cmd/{gateway}/{thing}/{suffix}".into(),
            local: "cmd/{child}/{suffix}".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Cloud {
    Literal(String),
    Gateway,
    Thing,
    Suffix,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Local {
    Literal(String),
    Child,
    Suffix,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Compiled {
    cloud: Vec<Cloud>,
    local: Vec<Local>,
}

/// The compiled rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandMapper {
    rules: Vec<Compiled>,
}

/// A cloud command topic a rule matched: whose thing it is for, and how to name it locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    pub thing: String,
    rule: usize,
    suffix: Option<String>,
}

fn bad(field: &'static str, template: &str, reason: impl Into<String>) -> MappingError {
    MappingError {
        field,
        template: template.to_owned(),
        reason: reason.into(),
    }
}

fn check_level(field: &'static str, t: &str, s: &str) -> Result<(), MappingError> {
    if s.is_empty() {
        return Err(bad(field, t, "has an empty level"));
    }
    if s.contains(['{', '}']) {
        return Err(bad(
            field,
            t,
            format!("level `{s}`: a placeholder must be a whole level"),
        ));
    }
    if s.contains(['+', '#', '\0']) {
        return Err(bad(field, t, format!("level `{s}` has `+`, `#` or NUL")));
    }
    Ok(())
}

fn compile_cloud(t: &str) -> Result<Vec<Cloud>, MappingError> {
    if t.is_empty() {
        return Err(bad("cloud", t, "is empty"));
    }
    if t.starts_with('$') {
        return Err(bad("cloud", t, "must not start with `$` (reserved topics)"));
    }
    let levels: Vec<&str> = t.split('/').collect();
    let mut out = Vec::with_capacity(levels.len());
    for (i, l) in levels.iter().enumerate() {
        out.push(match *l {
            "{gateway}" => Cloud::Gateway,
            "{thing}" if out.contains(&Cloud::Thing) => {
                return Err(bad("cloud", t, "has `{thing}` twice"));
            }
            "{thing}" => Cloud::Thing,
            "{suffix}" if i + 1 == levels.len() => Cloud::Suffix,
            "{suffix}" => return Err(bad("cloud", t, "`{suffix}` may only be the last level")),
            s if s.starts_with('{') && s.ends_with('}') => {
                return Err(bad(
                    "cloud",
                    t,
                    format!(
                        "unknown placeholder `{s}` (known: {{gateway}}, {{thing}}, {{suffix}})"
                    ),
                ));
            }
            s => {
                check_level("cloud", t, s)?;
                Cloud::Literal(s.to_owned())
            }
        });
    }
    if !out.contains(&Cloud::Thing) {
        return Err(bad(
            "cloud",
            t,
            "must contain `{thing}` (the child's thing name)",
        ));
    }
    Ok(out)
}

fn compile_local(t: &str, has_suffix: bool) -> Result<Vec<Local>, MappingError> {
    if t.is_empty() {
        return Err(bad("local", t, "is empty"));
    }
    if t.starts_with('$') {
        return Err(bad("local", t, "must not start with `$` (reserved topics)"));
    }
    let levels: Vec<&str> = t.split('/').collect();
    let mut out = Vec::with_capacity(levels.len());
    for (i, l) in levels.iter().enumerate() {
        out.push(match *l {
            "{child}" => Local::Child,
            "{suffix}" if !has_suffix => {
                return Err(bad(
                    "local",
                    t,
                    "uses `{suffix}` but the cloud template has none",
                ));
            }
            "{suffix}" if i + 1 == levels.len() => Local::Suffix,
            "{suffix}" => return Err(bad("local", t, "`{suffix}` may only be the last level")),
            s if s.starts_with('{') && s.ends_with('}') => {
                return Err(bad(
                    "local",
                    t,
                    format!("unknown placeholder `{s}` (known: {{child}}, {{suffix}})"),
                ));
            }
            s => {
                check_level("local", t, s)?;
                Local::Literal(s.to_owned())
            }
        });
    }
    if !out.contains(&Local::Child) {
        return Err(bad(
            "local",
            t,
            "must contain `{child}` (the receiving child's id)",
        ));
    }
    if has_suffix && out.last() != Some(&Local::Suffix) {
        return Err(bad(
            "local",
            t,
            "must end with `{suffix}` (the cloud template has one)",
        ));
    }
    Ok(out)
}

impl CommandMapper {
    /// Compiles `rules`; the error names the rule (0-based index) and what is wrong with it.
    /// More rules than the connection's subscriptions allow is an error of the last one.
    pub fn new(rules: &[CommandRule]) -> Result<CommandMapper, (usize, MappingError)> {
        let mut out = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let cloud = compile_cloud(&r.cloud).map_err(|e| (i, e))?;
            let local = compile_local(&r.local, cloud.last() == Some(&Cloud::Suffix))
                .map_err(|e| (i, e))?;
            out.push(Compiled { cloud, local });
        }
        if out.len() > MAX_COMMAND_SUBSCRIPTIONS {
            let i = out.len() - 1;
            return Err((
                i,
                bad(
                    "cloud",
                    &rules[i].cloud,
                    format!(
                        "{} rules would take {} subscriptions; AWS IoT allows 50 per connection \
                         and the gateway keeps 2 for fleet provisioning (at most {MAX_COMMAND_SUBSCRIPTIONS})",
                        out.len(),
                        out.len()
                    ),
                ),
            ));
        }
        Ok(CommandMapper { rules: out })
    }

    /// The cloud subscriptions for `gateway`, one per rule, duplicates left out.
    pub fn filters(&self, gateway: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.rules {
            let f = r
                .cloud
                .iter()
                .map(|l| match l {
                    Cloud::Literal(s) => s.as_str(),
                    Cloud::Gateway => gateway,
                    Cloud::Thing => "+",
                    Cloud::Suffix => "#",
                })
                .collect::<Vec<_>>()
                .join("/");
            if !out.contains(&f) {
                out.push(f);
            }
        }
        out
    }

    /// Which rule matches a cloud `topic` received by `gateway`, with the child's thing name.
    pub fn match_cloud(&self, topic: &str, gateway: &str) -> Option<Matched> {
        self.rules
            .iter()
            .enumerate()
            .find_map(|(i, r)| Self::apply(i, r, topic, gateway))
    }

    fn apply(i: usize, r: &Compiled, topic: &str, gateway: &str) -> Option<Matched> {
        let mut levels = topic.split('/');
        let mut thing = None;
        let mut suffix = None;
        for (n, l) in r.cloud.iter().enumerate() {
            if *l == Cloud::Suffix {
                // Everything left, at least one non-empty level.
                let consumed: usize = r.cloud[..n].len();
                let rest: Vec<&str> = topic.split('/').skip(consumed).collect();
                if rest.is_empty() || rest.iter().any(|s| s.is_empty()) {
                    return None;
                }
                suffix = Some(rest.join("/"));
                return Some(Matched {
                    thing: thing?,
                    rule: i,
                    suffix,
                });
            }
            let level = levels.next()?;
            match l {
                Cloud::Literal(s) if level == s => {}
                Cloud::Gateway if level == gateway => {}
                Cloud::Thing if !level.is_empty() => thing = Some(level.to_owned()),
                _ => return None,
            }
        }
        if levels.next().is_some() {
            return None;
        }
        Some(Matched {
            thing: thing?,
            rule: i,
            suffix,
        })
    }

    /// The local topic of a matched command for `child`.
    pub fn local_topic(&self, m: &Matched, child: &str) -> String {
        let Some(r) = self.rules.get(m.rule) else {
            return String::new();
        };
        r.local
            .iter()
            .map(|l| match l {
                Local::Literal(s) => s.as_str(),
                Local::Child => child,
                Local::Suffix => m.suffix.as_deref().unwrap_or_default(),
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn rule(cloud: &str, local: &str) -> CommandRule {
        CommandRule {
            cloud: cloud.into(),
            local: local.into(),
        }
    }

    #[test]
    fn the_default_is_one_wildcard_subscription_and_keeps_the_suffix() {
        let m = CommandMapper::new(&[CommandRule::default()]).unwrap();
        assert_eq!(m.filters("gw1"), vec!["cmd/gw1/+/#".to_owned()]);
        let got = m.match_cloud("cmd/gw1/gw1-SN-1/write", "gw1").unwrap();
        assert_eq!(got.thing, "gw1-SN-1");
        assert_eq!(m.local_topic(&got, "meter-1"), "cmd/meter-1/write");
        let got = m.match_cloud("cmd/gw1/t/a/b/c", "gw1").unwrap();
        assert_eq!(m.local_topic(&got, "c7"), "cmd/c7/a/b/c");
    }

    #[test]
    fn topics_that_do_not_match_map_to_nothing() {
        let m = CommandMapper::new(&[CommandRule::default()]).unwrap();
        for t in [
            "cmd/gw1/t",        // no suffix
            "cmd/gw1/t/",       // empty suffix
            "cmd/gw1//x",       // empty thing
            "cmd/gw2/t/x",      // another gateway's
            "dt/gw1/t/x",       // other prefix
            "cmd/gw1/t/a//b",   // empty level inside the suffix
            "",                 // empty
            "cmdx/gw1/t/write", // literal must be whole
        ] {
            assert_eq!(m.match_cloud(t, "gw1"), None, "{t}");
        }
    }

    #[test]
    fn exact_rules_first_match_wins_and_duplicate_filters_are_one() {
        let m = CommandMapper::new(&[
            rule("cmd/{gateway}/{thing}/reboot", "ctl/{child}/reboot"),
            CommandRule::default(),
            rule("cmd/{gateway}/{thing}/{suffix}", "other/{child}/{suffix}"),
        ])
        .unwrap();
        assert_eq!(
            m.filters("g"),
            vec!["cmd/g/+/reboot".to_owned(), "cmd/g/+/#".to_owned()]
        );
        let r = m.match_cloud("cmd/g/t/reboot", "g").unwrap();
        assert_eq!(m.local_topic(&r, "c"), "ctl/c/reboot");
        let r = m.match_cloud("cmd/g/t/reboot/now", "g").unwrap();
        assert_eq!(m.local_topic(&r, "c"), "cmd/c/reboot/now");
    }

    #[test]
    fn bad_templates_and_too_many_rules_are_named() {
        let err = |c: &str, l: &str| {
            let (i, e) = CommandMapper::new(&[CommandRule::default(), rule(c, l)]).unwrap_err();
            assert_eq!(i, 1);
            e.to_string()
        };
        let e = err("cmd/{gateway}/{suffix}", "cmd/{child}/{suffix}");
        assert!(e.contains("cloud template") && e.contains("{thing}"), "{e}");
        let e = err("cmd/{thing}/{suffix}/x", "cmd/{child}");
        assert!(e.contains("last level"), "{e}");
        let e = err("cmd/{thing}/{thingname}", "cmd/{child}");
        assert!(e.contains("unknown placeholder `{thingname}`"), "{e}");
        let e = err("cmd/{thing}/#", "cmd/{child}");
        assert!(e.contains("`#`"), "{e}");
        let e = err("$aws/{thing}", "cmd/{child}");
        assert!(e.contains("`$`"), "{e}");
        let e = err("cmd/{thing}/x", "cmd/{child}/{suffix}");
        assert!(
            e.contains("local template") && e.contains("has none"),
            "{e}"
        );
        let e = err("cmd/{thing}/{suffix}", "cmd/x/{suffix}");
        assert!(e.contains("must contain `{child}`"), "{e}");
        let e = err("cmd/{thing}/{suffix}", "cmd/{child}");
        assert!(e.contains("must end with `{suffix}`"), "{e}");
        let e = err("cmd//{thing}", "cmd/{child}");
        assert!(e.contains("empty level"), "{e}");
        let e = err("cmd/x{thing}", "cmd/{child}");
        assert!(e.contains("whole level"), "{e}");
        let many: Vec<CommandRule> = (0..=MAX_COMMAND_SUBSCRIPTIONS)
            .map(|i| rule(&format!("cmd/{{gateway}}/{{thing}}/r{i}"), "cmd/{child}/x"))
            .collect();
        let (i, e) = CommandMapper::new(&many).unwrap_err();
        assert_eq!(i, MAX_COMMAND_SUBSCRIPTIONS);
        assert!(e.to_string().contains("50 per connection"), "{e}");
        assert!(CommandMapper::new(&many[..MAX_COMMAND_SUBSCRIPTIONS]).is_ok());
    }

    proptest! {
        /// Any thing name and suffix of valid levels come back under the default rule, and the
        /// default filter matches exactly the topics the rule maps.
        #[test]
        fn default_rule_round_trips_thing_and_suffix(
            thing in "[A-Za-z0-9_-]{1,12}",
            levels in proptest::collection::vec("[a-z0-9_-]{1,8}", 1..5),
        ) {
            let m = CommandMapper::new(&[CommandRule::default()]).unwrap();
            let suffix = levels.join("/");
            let topic = format!("cmd/gw1/{thing}/{suffix}");
            let got = m.match_cloud(&topic, "gw1").unwrap();
            prop_assert_eq!(&got.thing, &thing);
            prop_assert_eq!(m.local_topic(&got, "c1"), format!("cmd/c1/{suffix}"));
            let f = &m.filters("gw1")[0];
            prop_assert!(crate::cloud::topic::route_matches(f, &topic));
        }
    }
}
