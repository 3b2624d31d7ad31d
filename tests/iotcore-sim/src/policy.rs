//! AWS IoT policy documents: parsing them and deciding whether a request is allowed.
//!
//! Owns: the policy JSON grammar we accept (Version, Statement, Effect, Action, Resource), AWS's
//! 2048-character size limit, IAM-style `*`/`?` glob matching, substitution of the IoT policy
//! variables that live in `Resource` (`${iot:ClientId}`, `${iot:Connection.Thing.*}`,
//! `${iot:Certificate.Subject.*}`), and the explicit-deny / allow / implicit-deny decision.
//!
//! Must not touch: I/O, the registry of certificates, things and policy attachments, MQTT, or
//! logging. The broker builds a [`RequestContext`] and the full resource ARN and asks
//! [`is_allowed`]; how an unauthorised request is answered is the broker's business.
//!
//! Not modelled: `NotAction`, `NotResource` and `Condition` (rejected at parse time so a test never
//! silently gets looser rules than AWS), `${key, 'default'}` default values, issuer and
//! alternative-name certificate variables (they resolve to nothing, so the element never matches).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// AWS's limit on a policy document, counted in characters with whitespace excluded
/// (`CreatePolicy`: "maximum length of 2048, excluding whitespace").
pub const MAX_POLICY_DOCUMENT_CHARS: usize = 2048;

/// Certificate attributes longer than this are not substituted by AWS ("All string values are
/// limited to 1024 characters").
const MAX_CERT_ATTRIBUTE_CHARS: usize = 1024;

/// The policy-language version in which `${...}` policy variables exist. In the older `2008-10-17`
/// language, and when `Version` is absent, IAM treats `${...}` as literal text.
const VERSION_WITH_VARIABLES: &str = "2012-10-17";
const VERSION_LEGACY: &str = "2008-10-17";

/// Why a policy document was rejected. Every message names the offending element, and the
/// statement by its index in `Statement` where there is one.
#[derive(thiserror::Error, Debug)]
pub enum PolicyError {
    #[error("policy document is not valid JSON: {0}")]
    InvalidJson(#[from] serde_json::Error),
    #[error(
        "policy document is {chars} characters long excluding whitespace; AWS allows at most {MAX_POLICY_DOCUMENT_CHARS}"
    )]
    TooLong { chars: usize },
    #[error("policy document must be a JSON object")]
    NotAnObject,
    #[error("policy document has no Statement element (or it is empty)")]
    MissingStatement,
    #[error(
        "policy Version {0:?} is not supported: use \"2012-10-17\" (or the legacy \"2008-10-17\")"
    )]
    InvalidVersion(String),
    #[error("{location}: missing Effect")]
    MissingEffect { location: String },
    #[error("{location}: Effect must be \"Allow\" or \"Deny\", not {found}")]
    InvalidEffect { location: String, found: String },
    #[error("{location}: missing Action (or it is empty)")]
    MissingAction { location: String },
    #[error("{location}: missing Resource (or it is empty)")]
    MissingResource { location: String },
    #[error("{location}: element {element} is not supported by this emulator")]
    UnsupportedElement { location: String, element: String },
    #[error("{location}: unknown element {element:?}")]
    UnknownElement { location: String, element: String },
    #[error("{location}: {element} must be {expected}")]
    InvalidValue {
        location: String,
        element: &'static str,
        expected: &'static str,
    },
}

/// A parsed AWS IoT policy document.
#[derive(Debug, Clone)]
pub struct PolicyDocument {
    statements: Vec<Statement>,
}

#[derive(Debug, Clone)]
struct Statement {
    effect: Effect,
    /// Lower-cased action patterns: actions are matched case-insensitively, as in IAM.
    actions: Vec<Vec<Tok>>,
    resources: Vec<Vec<Part>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

/// One element of a compiled glob: a literal character, `*` or `?`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Lit(char),
    AnyRun,
    AnyOne,
}

/// One element of a resource pattern before policy variables are substituted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Tok(Tok),
    Var(Variable),
}

/// A policy variable, recognised by name at parse time and resolved per request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Variable {
    ClientId,
    ThingName,
    ThingIsAttached,
    /// `iot:Certificate.Subject.<attribute>[.<index>]`.
    Subject {
        attribute: String,
        index: usize,
    },
    /// Anything else: never resolvable here, so the element containing it matches nothing.
    Unsupported,
}

/// What is known about the requesting connection, for policy variables.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    pub client_id: &'a str,
    /// Thing attached to the certificate whose name equals the client id, if any (AWS sets
    /// iot:Connection.Thing.ThingName only in that case).
    pub thing_name: Option<&'a str>,
    /// Whether any thing is attached to the principal (for ${iot:Connection.Thing.IsAttached}).
    pub thing_attached: bool,
    /// Certificate subject fields for ${iot:Certificate.Subject.CommonName} etc. (may be empty)
    pub subject: &'a BTreeMap<String, String>,
}

impl PolicyDocument {
    /// Parse an AWS IoT policy document (JSON text). Errors name the problem: invalid JSON, missing
    /// Statement, Effect other than Allow/Deny, missing Action/Resource, unsupported element
    /// (NotAction, NotResource, Condition), document over 2048 characters excluding whitespace.
    pub fn parse(json: &str) -> Result<PolicyDocument, PolicyError> {
        let chars = json.chars().filter(|c| !c.is_whitespace()).count();
        if chars > MAX_POLICY_DOCUMENT_CHARS {
            return Err(PolicyError::TooLong { chars });
        }
        let Value::Object(doc) = serde_json::from_str::<Value>(json)? else {
            return Err(PolicyError::NotAnObject);
        };

        let mut variables = false;
        let mut statement = None;
        for (key, value) in &doc {
            match key.as_str() {
                "Version" => match value.as_str() {
                    Some(VERSION_WITH_VARIABLES) => variables = true,
                    Some(VERSION_LEGACY) => variables = false,
                    Some(other) => return Err(PolicyError::InvalidVersion(other.to_owned())),
                    None => return Err(PolicyError::InvalidVersion(value.to_string())),
                },
                "Id" => require_string(value, "policy document", "Id")?,
                "Statement" => statement = Some(value),
                other => {
                    return Err(PolicyError::UnknownElement {
                        location: "policy document".to_owned(),
                        element: other.to_owned(),
                    });
                }
            }
        }

        let statements = match statement {
            None => return Err(PolicyError::MissingStatement),
            Some(Value::Object(one)) => vec![parse_statement(one, 0, variables)?],
            Some(Value::Array(many)) if many.is_empty() => {
                return Err(PolicyError::MissingStatement);
            }
            Some(Value::Array(many)) => many
                .iter()
                .enumerate()
                .map(|(i, s)| match s {
                    Value::Object(s) => parse_statement(s, i, variables),
                    _ => Err(PolicyError::InvalidValue {
                        location: format!("Statement[{i}]"),
                        element: "Statement",
                        expected: "an object",
                    }),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(PolicyError::InvalidValue {
                    location: "policy document".to_owned(),
                    element: "Statement",
                    expected: "an object or a list of objects",
                });
            }
        };
        Ok(PolicyDocument { statements })
    }
}

fn require_string(value: &Value, location: &str, element: &'static str) -> Result<(), PolicyError> {
    if value.is_string() {
        Ok(())
    } else {
        Err(PolicyError::InvalidValue {
            location: location.to_owned(),
            element,
            expected: "a string",
        })
    }
}

fn parse_statement(
    st: &Map<String, Value>,
    index: usize,
    variables: bool,
) -> Result<Statement, PolicyError> {
    let location = format!("Statement[{index}]");
    let mut effect = None;
    let mut actions = None;
    let mut resources = None;
    for (key, value) in st {
        match key.as_str() {
            "Sid" => require_string(value, &location, "Sid")?,
            "Effect" => {
                effect = Some(match value.as_str() {
                    Some("Allow") => Effect::Allow,
                    Some("Deny") => Effect::Deny,
                    _ => {
                        return Err(PolicyError::InvalidEffect {
                            location,
                            found: value.to_string(),
                        });
                    }
                });
            }
            "Action" => actions = Some(string_list(value, &location, "Action")?),
            "Resource" => resources = Some(string_list(value, &location, "Resource")?),
            "NotAction" | "NotResource" | "Condition" | "Principal" | "NotPrincipal" => {
                return Err(PolicyError::UnsupportedElement {
                    location,
                    element: key.clone(),
                });
            }
            other => {
                return Err(PolicyError::UnknownElement {
                    location,
                    element: other.to_owned(),
                });
            }
        }
    }
    let Some(effect) = effect else {
        return Err(PolicyError::MissingEffect { location });
    };
    let actions = match actions {
        Some(a) if !a.is_empty() => a,
        _ => return Err(PolicyError::MissingAction { location }),
    };
    let resources = match resources {
        Some(r) if !r.is_empty() => r,
        _ => return Err(PolicyError::MissingResource { location }),
    };
    Ok(Statement {
        effect,
        actions: actions
            .iter()
            .map(|a| compile_glob(&a.to_lowercase()))
            .collect(),
        resources: resources
            .iter()
            .map(|r| compile_resource(r, variables))
            .collect(),
    })
}

/// `Action` and `Resource` are each a string or a list of strings.
fn string_list<'v>(
    value: &'v Value,
    location: &str,
    element: &'static str,
) -> Result<Vec<&'v str>, PolicyError> {
    let invalid = || PolicyError::InvalidValue {
        location: location.to_owned(),
        element,
        expected: "a string or a list of strings",
    };
    match value {
        Value::String(s) => Ok(vec![s.as_str()]),
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().ok_or_else(invalid))
            .collect(),
        _ => Err(invalid()),
    }
}

fn glob_tok(c: char) -> Tok {
    match c {
        '*' => Tok::AnyRun,
        '?' => Tok::AnyOne,
        c => Tok::Lit(c),
    }
}

fn compile_glob(pattern: &str) -> Vec<Tok> {
    pattern.chars().map(glob_tok).collect()
}

/// Split a Resource string into glob tokens and policy variables. `${*}`, `${?}` and `${$}` are
/// IAM's escapes for a literal `*`, `?` and `$`. A `${` without a closing `}` is literal text.
fn compile_resource(pattern: &str, variables: bool) -> Vec<Part> {
    if !variables {
        return pattern.chars().map(|c| Part::Tok(glob_tok(c))).collect();
    }
    let mut parts = Vec::with_capacity(pattern.len());
    let mut rest = pattern;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            break;
        };
        parts.extend(rest[..start].chars().map(|c| Part::Tok(glob_tok(c))));
        let name = &rest[start + 2..start + 2 + len];
        parts.push(match name {
            "*" => Part::Tok(Tok::Lit('*')),
            "?" => Part::Tok(Tok::Lit('?')),
            "$" => Part::Tok(Tok::Lit('$')),
            name => Part::Var(Variable::parse(name)),
        });
        rest = &rest[start + 2 + len + 1..];
    }
    parts.extend(rest.chars().map(|c| Part::Tok(glob_tok(c))));
    parts
}

impl Variable {
    /// Variable names are case-insensitive, like IAM condition keys.
    fn parse(name: &str) -> Variable {
        const SUBJECT: &str = "iot:certificate.subject.";
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "iot:clientid" => Variable::ClientId,
            "iot:connection.thing.thingname" => Variable::ThingName,
            "iot:connection.thing.isattached" => Variable::ThingIsAttached,
            _ if lower.starts_with(SUBJECT) && name.len() > SUBJECT.len() => {
                let attribute = &name[SUBJECT.len()..];
                // `Country.1` asks for the second value of a multi-valued attribute.
                match attribute.rsplit_once('.') {
                    Some((attr, idx))
                        if !attr.is_empty() && idx.bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        match idx.parse() {
                            Ok(index) => Variable::Subject {
                                attribute: attr.to_owned(),
                                index,
                            },
                            Err(_) => Variable::Unsupported,
                        }
                    }
                    // `.List` is for Condition blocks only, and other dotted names
                    // (AlternativeName.*) are not in the context.
                    Some(_) => Variable::Unsupported,
                    None => Variable::Subject {
                        attribute: attribute.to_owned(),
                        index: 0,
                    },
                }
            }
            _ => Variable::Unsupported,
        }
    }

    /// The value to substitute, or `None` when AWS would leave the variable unresolved.
    fn resolve<'c>(&self, ctx: &RequestContext<'c>) -> Option<&'c str> {
        match self {
            Variable::ClientId => Some(ctx.client_id),
            Variable::ThingName => ctx.thing_name,
            Variable::ThingIsAttached => Some(if ctx.thing_attached { "true" } else { "false" }),
            Variable::Subject { attribute, index } => {
                // The context carries one value per attribute, so only index 0 exists.
                if *index != 0 {
                    return None;
                }
                let subject: &'c BTreeMap<String, String> = ctx.subject;
                let value = subject
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(attribute))
                    .map(|(_, v)| v.as_str())?;
                // AWS does not substitute certificate attributes that contain wildcard
                // characters or exceed 1024 characters.
                let usable = !value.contains(['*', '?'])
                    && value.chars().count() <= MAX_CERT_ATTRIBUTE_CHARS;
                usable.then_some(value)
            }
            Variable::Unsupported => None,
        }
    }
}

/// Substitute variables into `out`; substituted text is literal, never a wildcard. Returns false
/// when a variable cannot be resolved, in which case the pattern matches nothing.
fn resolve_into(parts: &[Part], ctx: &RequestContext<'_>, out: &mut Vec<Tok>) -> bool {
    out.clear();
    for part in parts {
        match part {
            Part::Tok(t) => out.push(*t),
            Part::Var(v) => match v.resolve(ctx) {
                Some(value) => out.extend(value.chars().map(Tok::Lit)),
                None => return false,
            },
        }
    }
    true
}

/// Greedy two-pointer glob match: on a mismatch, retry from the most recent `*` consuming one
/// more character. Backtracking only to the last star is enough because an earlier star can
/// never need to absorb more than the last one can. O(|pattern| * |text|) worst case.
fn glob(pattern: &[Tok], text: &[char]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut last_star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(Tok::AnyRun) => {
                last_star = Some((p, t));
                p += 1;
            }
            Some(Tok::AnyOne) => {
                p += 1;
                t += 1;
            }
            Some(Tok::Lit(c)) if *c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match last_star {
                Some((sp, st)) => {
                    last_star = Some((sp, st + 1));
                    p = sp + 1;
                    t = st + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|tok| *tok == Tok::AnyRun)
}

/// Glob match of an IAM-style pattern: `*` matches any run of characters (including `/` and
/// empty), `?` exactly one character. Case-sensitive. No exponential backtracking.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    glob(&compile_glob(pattern), &text)
}

/// Effective decision over all policies attached to a principal: an explicit Deny in any matching
/// statement wins, else any matching Allow, else implicit deny.
pub fn is_allowed(
    policies: &[PolicyDocument],
    action: &str,
    resource: &str,
    ctx: &RequestContext<'_>,
) -> bool {
    let action: Vec<char> = action.to_lowercase().chars().collect();
    let resource: Vec<char> = resource.chars().collect();
    let mut scratch = Vec::new();
    let mut allowed = false;
    for statement in policies.iter().flat_map(|p| &p.statements) {
        if statement.effect == Effect::Allow && allowed {
            continue;
        }
        let action_matches = statement.actions.iter().any(|a| glob(a, &action));
        let matches = action_matches
            && statement
                .resources
                .iter()
                .any(|r| resolve_into(r, ctx, &mut scratch) && glob(&scratch, &resource));
        if matches {
            match statement.effect {
                Effect::Deny => return false,
                Effect::Allow => allowed = true,
            }
        }
    }
    allowed
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ARN: &str = "arn:aws:iot:eu-west-1:123456789012";

    fn doc(json: &str) -> PolicyDocument {
        PolicyDocument::parse(json).unwrap()
    }

    fn err(json: &str) -> PolicyError {
        PolicyDocument::parse(json).unwrap_err()
    }

    fn no_subject() -> &'static BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        &EMPTY
    }

    fn ctx(client_id: &str) -> RequestContext<'_> {
        RequestContext {
            client_id,
            thing_name: None,
            thing_attached: false,
            subject: no_subject(),
        }
    }

    fn topic(t: &str) -> String {
        format!("{ARN}:topic/{t}")
    }

    fn filter(f: &str) -> String {
        format!("{ARN}:topicfilter/{f}")
    }

    fn client(c: &str) -> String {
        format!("{ARN}:client/{c}")
    }

    /// Section 1.6 of the research notes, REGION/ACCOUNT/TEMPLATE filled in.
    fn claim_policy(create_prefixes: &[&str]) -> String {
        let topics = |kind: &str| {
            let mut list: Vec<String> = create_prefixes
                .iter()
                .map(|p| format!("\"{ARN}:{kind}/$aws/certificates/{p}/*\""))
                .collect();
            list.push(format!(
                "\"{ARN}:{kind}/$aws/provisioning-templates/GatewayTemplate/provision/*\""
            ));
            list.join(",")
        };
        format!(
            r#"{{"Version":"2012-10-17","Statement":[
             {{"Effect":"Allow","Action":["iot:Connect"],"Resource":"*"}},
             {{"Effect":"Allow","Action":["iot:Publish","iot:Receive"],"Resource":[{}]}},
             {{"Effect":"Allow","Action":"iot:Subscribe","Resource":[{}]}}]}}"#,
            topics("topic"),
            topics("topicfilter")
        )
    }

    #[test]
    fn documented_claim_policy_allows_only_the_listed_provisioning_topics() {
        let documented = [doc(&claim_policy(&["create"]))];
        let c = ctx("mqtt5-sample-1234");
        let allowed = |action: &str, res: &str| is_allowed(&documented, action, res, &c);

        assert!(allowed("iot:Connect", &client("anything")));
        assert!(allowed(
            "iot:Publish",
            &topic("$aws/certificates/create/json")
        ));
        assert!(allowed(
            "iot:Receive",
            &topic("$aws/certificates/create/json/accepted")
        ));
        assert!(allowed(
            "iot:Subscribe",
            &filter("$aws/certificates/create/json/rejected")
        ));
        assert!(allowed(
            "iot:Publish",
            &topic("$aws/provisioning-templates/GatewayTemplate/provision/json")
        ));
        // Not listed in the documented example: CSR topics, other templates, telemetry.
        assert!(!allowed(
            "iot:Publish",
            &topic("$aws/certificates/create-from-csr/json")
        ));
        assert!(!allowed(
            "iot:Publish",
            &topic("$aws/provisioning-templates/Other/provision/json")
        ));
        assert!(!allowed("iot:Publish", &topic("dt/x")));
        assert!(!allowed(
            "iot:Subscribe",
            &topic("$aws/certificates/create/json")
        ));
        assert!(!allowed(
            "iot:RetainPublish",
            &topic("$aws/certificates/create/json")
        ));

        let with_csr = [doc(&claim_policy(&["create", "create-from-csr"]))];
        let allowed = |action: &str, res: &str| is_allowed(&with_csr, action, res, &c);
        assert!(allowed(
            "iot:Publish",
            &topic("$aws/certificates/create-from-csr/json")
        ));
        assert!(allowed(
            "iot:Publish",
            &topic("$aws/certificates/create/json")
        ));
        assert!(!allowed("iot:Publish", &topic("dt/x")));
    }

    #[test]
    fn thing_policy_connects_only_as_the_thing() {
        let policy = [doc(&format!(
            r#"{{"Version":"2012-10-17","Statement":{{"Effect":"Allow","Action":"iot:Connect",
                "Resource":"{ARN}:client/${{iot:Connection.Thing.ThingName}}"}}}}"#
        ))];
        let as_thing = RequestContext {
            thing_name: Some("gw-1"),
            thing_attached: true,
            ..ctx("gw-1")
        };
        assert!(is_allowed(
            &policy,
            "iot:Connect",
            &client("gw-1"),
            &as_thing
        ));
        assert!(!is_allowed(
            &policy,
            "iot:Connect",
            &client("gw-2"),
            &as_thing
        ));
        // No thing named like the client id: the variable is unresolved and nothing matches,
        // not even the literal text "${iot:Connection.Thing.ThingName}".
        let no_thing = RequestContext {
            thing_attached: true,
            ..ctx("gw-1")
        };
        assert!(!is_allowed(
            &policy,
            "iot:Connect",
            &client("gw-1"),
            &no_thing
        ));
        assert!(!is_allowed(
            &policy,
            "iot:Connect",
            &client("${iot:Connection.Thing.ThingName}"),
            &no_thing
        ));
    }

    #[test]
    fn unresolved_variable_disables_only_its_own_resource_entry() {
        let policy = [doc(&format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"iot:Connect",
                "Resource":["{ARN}:client/${{iot:Connection.Thing.ThingName}}","{ARN}:client/spare"]}}]}}"#
        ))];
        assert!(is_allowed(
            &policy,
            "iot:Connect",
            &client("spare"),
            &ctx("spare")
        ));
        assert!(!is_allowed(
            &policy,
            "iot:Connect",
            &client("other"),
            &ctx("other")
        ));
    }

    #[test]
    fn is_attached_and_subject_variables() {
        let policy = [doc(&format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"iot:Publish",
                "Resource":["{ARN}:topic/attached/${{iot:Connection.Thing.IsAttached}}",
                            "{ARN}:topic/cn/${{iot:Certificate.Subject.CommonName}}",
                            "{ARN}:topic/o/${{iot:Certificate.Subject.Organization.0}}",
                            "{ARN}:topic/o1/${{iot:Certificate.Subject.Organization.1}}"]}}]}}"#
        ))];
        let mut subject = BTreeMap::new();
        subject.insert("CommonName".to_owned(), "dev-7".to_owned());
        subject.insert("Organization".to_owned(), "Acme".to_owned());
        let c = RequestContext {
            thing_attached: true,
            subject: &subject,
            ..ctx("c")
        };
        let allowed =
            |t: &str, c: &RequestContext<'_>| is_allowed(&policy, "iot:Publish", &topic(t), c);
        assert!(allowed("attached/true", &c));
        assert!(!allowed("attached/false", &c));
        assert!(allowed("attached/false", &ctx("c")));
        assert!(allowed("cn/dev-7", &c));
        assert!(!allowed("cn/dev-8", &c));
        assert!(!allowed("cn/dev-7", &ctx("c")), "no CommonName: unresolved");
        assert!(allowed("o/Acme", &c));
        assert!(!allowed("o1/Acme", &c), "only one value per attribute");

        // AWS leaves attributes containing wildcards unsubstituted.
        let mut wild = BTreeMap::new();
        wild.insert("CommonName".to_owned(), "*".to_owned());
        let w = RequestContext {
            subject: &wild,
            ..ctx("c")
        };
        assert!(!allowed("cn/*", &w));
        assert!(!allowed("cn/x", &w));
    }

    #[test]
    fn explicit_deny_beats_allow_across_documents() {
        let allow = doc(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:*","Resource":"*"}]}"#,
        );
        let deny = doc(&format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Deny","Action":"iot:Publish","Resource":"{ARN}:topic/secret/*"}}]}}"#
        ));
        let c = ctx("c");
        for policies in [[allow.clone(), deny.clone()], [deny.clone(), allow.clone()]] {
            assert!(!is_allowed(
                &policies,
                "iot:Publish",
                &topic("secret/a"),
                &c
            ));
            assert!(is_allowed(&policies, "iot:Publish", &topic("public/a"), &c));
            assert!(is_allowed(
                &policies,
                "iot:Subscribe",
                &filter("secret/a"),
                &c
            ));
        }
        assert!(
            !is_allowed(&[], "iot:Connect", &client("c"), &c),
            "implicit deny"
        );
    }

    #[test]
    fn actions_are_case_insensitive_resources_are_not() {
        let policy = [doc(&format!(
            r#"{{"Version":"2012-10-17","Statement":[
                {{"Effect":"Allow","Action":"IOT:connect","Resource":"*"}},
                {{"Effect":"Allow","Action":"iot:Pub*","Resource":"{ARN}:topic/Dt/*"}}]}}"#
        ))];
        let c = ctx("c");
        assert!(is_allowed(&policy, "iot:Connect", &client("c"), &c));
        assert!(is_allowed(&policy, "IoT:CONNECT", &client("c"), &c));
        assert!(is_allowed(&policy, "iot:publish", &topic("Dt/1"), &c));
        assert!(!is_allowed(&policy, "iot:Publish", &topic("dt/1"), &c));
        assert!(!is_allowed(&policy, "iot:Receive", &topic("Dt/1"), &c));

        let everything = [doc(
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"*","Resource":"*"}}"#,
        )];
        assert!(is_allowed(
            &everything,
            "iot:RetainPublish",
            &topic("x"),
            &c
        ));
    }

    #[test]
    fn string_and_list_forms_are_equivalent() {
        let c = ctx("c");
        let forms = [
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:eu-west-1:123456789012:topic/a"}}"#,
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["iot:Publish"],"Resource":["arn:aws:iot:eu-west-1:123456789012:topic/a"]}]}"#,
        ];
        for json in forms {
            let p = [doc(json)];
            assert!(is_allowed(&p, "iot:Publish", &topic("a"), &c), "{json}");
            assert!(!is_allowed(&p, "iot:Publish", &topic("b"), &c), "{json}");
            assert!(!is_allowed(&p, "iot:Receive", &topic("a"), &c), "{json}");
        }
        let several = [doc(&format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":["iot:Publish","iot:Receive"],
                "Resource":["{ARN}:topic/a","{ARN}:topic/b"]}}]}}"#
        ))];
        for (action, t) in [("iot:Publish", "a"), ("iot:Receive", "b")] {
            assert!(is_allowed(&several, action, &topic(t), &c));
        }
    }

    #[test]
    fn substituted_client_id_is_literal() {
        let policy = [doc(&format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":["iot:Connect","iot:Publish"],
                "Resource":["{ARN}:client/${{iot:ClientId}}","{ARN}:topic/dev/${{iot:ClientId}}/data"]}}]}}"#
        ))];
        for id in ["*", "?", "a*", "*/x"] {
            let c = ctx(id);
            assert!(is_allowed(&policy, "iot:Connect", &client(id), &c), "{id}");
            assert!(
                !is_allowed(&policy, "iot:Connect", &client("ab"), &c),
                "{id}"
            );
            assert!(is_allowed(
                &policy,
                "iot:Publish",
                &topic(&format!("dev/{id}/data")),
                &c
            ));
            assert!(
                !is_allowed(&policy, "iot:Publish", &topic("dev/a/data"), &c),
                "{id}"
            );
            assert!(!is_allowed(
                &policy,
                "iot:Publish",
                &topic("dev/victim/x/data"),
                &c
            ));
        }
    }

    #[test]
    fn mqtt_wildcards_and_escapes_are_literal() {
        let policy = [doc(&format!(
            r#"{{"Version":"2012-10-17","Statement":[
                {{"Effect":"Allow","Action":"iot:Subscribe","Resource":["{ARN}:topicfilter/a/*","{ARN}:topicfilter/b/+"]}},
                {{"Effect":"Allow","Action":"iot:Publish","Resource":"{ARN}:topic/star/${{*}}${{?}}${{$}}"}}]}}"#
        ))];
        let c = ctx("c");
        assert!(is_allowed(&policy, "iot:Subscribe", &filter("a/#"), &c));
        assert!(is_allowed(&policy, "iot:Subscribe", &filter("b/+"), &c));
        assert!(!is_allowed(&policy, "iot:Subscribe", &filter("b/x"), &c));
        assert!(!is_allowed(&policy, "iot:Subscribe", &filter("b/#"), &c));
        assert!(is_allowed(&policy, "iot:Publish", &topic("star/*?$"), &c));
        assert!(!is_allowed(&policy, "iot:Publish", &topic("star/x?$"), &c));
    }

    #[test]
    fn without_2012_version_variables_are_literal_text() {
        for version in [r#""Version":"2008-10-17","#, ""] {
            let policy = [doc(&format!(
                r#"{{{version}"Statement":[{{"Effect":"Allow","Action":"iot:Connect","Resource":"{ARN}:client/${{iot:ClientId}}"}}]}}"#
            ))];
            assert!(!is_allowed(&policy, "iot:Connect", &client("c"), &ctx("c")));
            assert!(is_allowed(
                &policy,
                "iot:Connect",
                &client("${iot:ClientId}"),
                &ctx("c")
            ));
        }
    }

    #[test]
    fn every_parse_error_names_its_culprit() {
        let stmt = |body: &str| format!(r#"{{"Version":"2012-10-17","Statement":[{body}]}}"#);
        let cases: Vec<(String, &str)> = vec![
            ("{not json".to_owned(), "JSON"),
            ("[]".to_owned(), "JSON object"),
            (r#"{"Version":"2012-10-17"}"#.to_owned(), "Statement"),
            (
                r#"{"Version":"2012-10-17","Statement":[]}"#.to_owned(),
                "Statement",
            ),
            (
                r#"{"Version":"2012-10-17","Statement":"x"}"#.to_owned(),
                "Statement",
            ),
            (
                r#"{"Version":"2012-10-18","Statement":[]}"#.to_owned(),
                "2012-10-18",
            ),
            (
                r#"{"Version":"2012-10-17","Statment":[]}"#.to_owned(),
                "Statment",
            ),
            (stmt(r#"{"Action":"iot:*","Resource":"*"}"#), "Effect"),
            (
                stmt(r#"{"Effect":"allow","Action":"iot:*","Resource":"*"}"#),
                "\"allow\"",
            ),
            (stmt(r#"{"Effect":"Allow","Resource":"*"}"#), "Action"),
            (
                stmt(r#"{"Effect":"Allow","Action":[],"Resource":"*"}"#),
                "Action",
            ),
            (stmt(r#"{"Effect":"Allow","Action":"iot:*"}"#), "Resource"),
            (
                stmt(r#"{"Effect":"Allow","Action":"iot:*","Resource":7}"#),
                "Resource",
            ),
            (
                stmt(r#"{"Effect":"Allow","Action":[1],"Resource":"*"}"#),
                "Action",
            ),
            (
                stmt(r#"{"Effect":"Allow","NotAction":"iot:*","Resource":"*"}"#),
                "NotAction",
            ),
            (
                stmt(r#"{"Effect":"Allow","Action":"iot:*","NotResource":"*"}"#),
                "NotResource",
            ),
            (
                stmt(r#"{"Effect":"Allow","Action":"iot:*","Resource":"*","Condition":{}}"#),
                "Condition",
            ),
            (
                stmt(r#"{"Effect":"Allow","Action":"iot:*","Resource":"*","Actoin":"x"}"#),
                "Actoin",
            ),
        ];
        for (json, culprit) in cases {
            let message = err(&json).to_string();
            assert!(message.contains(culprit), "{json} -> {message}");
        }
        // The statement is located by index.
        let two = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Allow","Action":"*"}]}"#;
        assert!(
            matches!(err(two), PolicyError::MissingResource { location } if location == "Statement[1]")
        );
        assert!(matches!(err("{x"), PolicyError::InvalidJson(_)));
    }

    #[test]
    fn size_limit_is_2048_characters_excluding_whitespace() {
        let with_topic = |len: usize| {
            format!(
                r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"iot:Publish","Resource":"{}"}}]}}"#,
                "a".repeat(len)
            )
        };
        let overhead = with_topic(0).len();
        let exact = with_topic(MAX_POLICY_DOCUMENT_CHARS - overhead);
        // Whitespace does not count, even a lot of it.
        let padded = exact.replace(',', " ,\n\t ");
        assert!(PolicyDocument::parse(&padded).is_ok());
        let over = with_topic(MAX_POLICY_DOCUMENT_CHARS - overhead + 1);
        let message = err(&over).to_string();
        assert!(matches!(err(&over), PolicyError::TooLong { chars: 2049 }));
        assert!(
            message.contains("2049") && message.contains("2048"),
            "{message}"
        );
    }

    /// Plain backtracking matcher: exponential in the worst case, obviously correct.
    fn reference_match(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| reference_match(rest, &t[i..])),
            Some(('?', rest)) => !t.is_empty() && reference_match(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && reference_match(rest, &t[1..]),
        }
    }

    fn deny_statement() -> impl Strategy<Value = serde_json::Value> {
        let action =
            prop::sample::select(vec!["*", "iot:*", "iot:Connect", "iot:Pub*", "IOT:?eceive"]);
        let resource = "(\\*|arn:aws:iot:[a-z0-9*?-]{0,12}:[0-9*]{0,4}:(topic|client|topicfilter)/[a-z/*?+#]{0,8})(\\$\\{iot:ClientId\\})?";
        (prop::collection::vec(action, 1..3), prop::collection::vec(resource, 1..3)).prop_map(
            |(actions, resources)| serde_json::json!({"Effect": "Deny", "Action": actions, "Resource": resources}),
        )
    }

    proptest! {
        #[test]
        fn agrees_with_reference(p in "[ab/*?]{0,10}", t in "[ab/*?]{0,12}") {
            let pc: Vec<char> = p.chars().collect();
            let tc: Vec<char> = t.chars().collect();
            prop_assert_eq!(wildcard_match(&p, &t), reference_match(&pc, &tc));
        }

        #[test]
        fn pattern_without_wildcards_matches_only_itself(p in "[ab/+#$]{0,8}", t in "[ab/+#$]{0,8}") {
            prop_assert!(wildcard_match(&p, &p));
            prop_assert_eq!(wildcard_match(&p, &t), p == t);
        }

        #[test]
        fn star_matches_everything(t in any::<String>()) {
            prop_assert!(wildcard_match("*", &t));
        }

        #[test]
        fn prefix_star_matches_any_suffix(p in "[ab/+#]{0,8}", suffix in any::<String>()) {
            let pattern = format!("{p}*");
            let text = format!("{p}{suffix}");
            prop_assert!(wildcard_match(&pattern, &text));
        }

        #[test]
        fn appending_star_keeps_matches(p in "[ab/*?]{0,8}", t in "[ab/]{0,10}", suffix in "[ab/]{0,4}") {
            if wildcard_match(&p, &t) {
                let (pattern, text) = (format!("{p}*"), format!("{t}{suffix}"));
                prop_assert!(wildcard_match(&pattern, &text));
            }
        }

        #[test]
        fn deny_only_policies_never_allow(
            statements in prop::collection::vec(deny_statement(), 1..4),
            action in prop::sample::select(vec!["iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive", "iot:RetainPublish"]),
            resource in "arn:aws:iot:[a-z0-9-]{0,6}:[0-9]{0,4}:(topic|client|topicfilter)/[a-z/*?+#]{0,8}",
            client_id in "[a-z*?]{0,4}",
        ) {
            let json = serde_json::json!({"Version": "2012-10-17", "Statement": statements}).to_string();
            let policy = [PolicyDocument::parse(&json).unwrap()];
            prop_assert!(!is_allowed(&policy, action, &resource, &ctx(&client_id)));
        }

        #[test]
        fn client_id_variable_matches_only_that_id(id in "[ab*?/]{0,6}", other in "[ab*?/]{0,6}") {
            let policy = [doc(&format!(
                r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"iot:Connect","Resource":"{ARN}:client/${{iot:ClientId}}"}}]}}"#
            ))];
            prop_assert_eq!(is_allowed(&policy, "iot:Connect", &client(&other), &ctx(&id)), id == other);
        }
    }

    #[test]
    fn pathological_pattern_finishes() {
        let text = "a".repeat(100_000);
        assert!(!wildcard_match("*a*a*a*a*a*a*b", &text));
        assert!(wildcard_match("*a*a*a*a*a*a*", &text));
        let policy = [doc(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*a*a*a*a*a*a*b"}]}"#,
        )];
        assert!(!is_allowed(&policy, "iot:Publish", &text, &ctx("c")));
    }
}
