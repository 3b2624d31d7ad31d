//! AWS IoT provisioning-template engine: parses, validates and evaluates the JSON body of a
//! fleet-provisioning (or JITP) template into the typed resources and device configuration a
//! RegisterThing call must apply.
//!
//! Owns: the template grammar (sections, `Parameters`, pseudo-parameters, `Mappings`, `Resources`,
//! `OverrideSettings`, `DeviceConfiguration`), the intrinsic functions AWS documents (`Ref`,
//! `Fn::Join`, `Fn::Select`, `Fn::Split`, `Fn::FindInMap`, `Fn::Sub`), which pseudo-parameters
//! each provisioning flow fills in ([`PseudoParameters`]), the errors that go on the wire when a
//! template or a request is bad, and the resource limits that keep evaluation total.
//!
//! Must not touch: registry state (whether a thing, group, type or policy exists, or what an
//! override does to an existing one), certificates, the clock or the network. This is pure logic:
//! no I/O, so it is unit-tested, property-tested and fuzzed (`fuzz/fuzz_targets/template.rs`).
//!
//! AWS behaviour follows the fleet-provisioning research notes, section 2; choices where AWS is
//! silent are marked `[design]` below.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Largest template body AWS accepts, in characters (botocore `TemplateBody`).
pub const MAX_TEMPLATE_CHARS: usize = 10_240;
/// [design] Deepest JSON nesting accepted inside evaluated sections; bounds evaluator recursion.
pub const MAX_NESTING_DEPTH: usize = 32;
/// [design] Most bytes of values one evaluation may produce: text, plus the size of a
/// `serde_json::Value` per list element. Functions can multiply their input (a `Fn::Join` whose
/// delimiter is itself a `Fn::Join`), so this bounds memory whatever the template.
pub const MAX_EVALUATED_BYTES: usize = 1024 * 1024;

const CERTIFICATE_ID: &str = "AWS::IoT::Certificate::Id";
/// Every pseudo-parameter AWS documents for provisioning templates (the JITP list). AWS fills in
/// the ones of its flow whether or not `Parameters` declares them (the fleet examples of the
/// developer guide, CloudFormation and Terraform refer to `AWS::IoT::Certificate::Id` without
/// declaring it); a declaration is accepted and changes nothing.
const PSEUDO_PARAMETERS: [&str; 8] = [
    CERTIFICATE_ID,
    "AWS::IoT::Certificate::Country",
    "AWS::IoT::Certificate::Organization",
    "AWS::IoT::Certificate::OrganizationalUnit",
    "AWS::IoT::Certificate::DistinguishedNameQualifier",
    "AWS::IoT::Certificate::StateName",
    "AWS::IoT::Certificate::CommonName",
    "AWS::IoT::Certificate::SerialNumber",
];
const SUPPORTED_FUNCTIONS: &str = "Ref, Fn::Join, Fn::Select, Fn::Split, Fn::FindInMap, Fn::Sub";
const THING: &str = "AWS::IoT::Thing";
const CERTIFICATE: &str = "AWS::IoT::Certificate";
const POLICY: &str = "AWS::IoT::Policy";
const NAME_RULE: &str = "must be 1-128 characters of [a-zA-Z0-9:_-]";
const POLICY_NAME_RULE: &str = "must be 1-128 characters of [a-zA-Z0-9_+=,.@-]";

/// Why a template was rejected (by [`Template::parse`]) or could not be evaluated for one request
/// (by [`Template::evaluate`]). Every message names the section, resource, property, function or
/// parameter at fault; paths read like `Resources.thing.Properties.ThingName`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    #[error("template body is {chars} characters long; the maximum is {max}", max = MAX_TEMPLATE_CHARS)]
    TooLong { chars: usize },
    #[error("template body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error(
        "unknown top-level section {0:?}; allowed sections: Parameters, Mappings, Resources, DeviceConfiguration"
    )]
    UnknownSection(String),
    #[error("{at}: {reason}")]
    Malformed { at: String, reason: String },
    #[error(
        "{at}: intrinsic function {function} is not supported in provisioning templates (supported: {supported})",
        supported = SUPPORTED_FUNCTIONS
    )]
    UnsupportedFunction { at: String, function: String },
    #[error(
        "Resources.{resource}: unknown resource Type {type_name:?}; allowed: AWS::IoT::Thing, AWS::IoT::Certificate, AWS::IoT::Policy"
    )]
    UnknownResourceType { resource: String, type_name: String },
    #[error(
        "Resources.{resource}: unknown property {property:?} for a resource of Type {type_name}"
    )]
    UnknownProperty {
        resource: String,
        type_name: &'static str,
        property: String,
    },
    #[error("Resources.{resource}: missing required property {property}")]
    MissingProperty {
        resource: String,
        property: &'static str,
    },
    #[error(
        "Resources.{resource}: property {property} cannot be used; only CertificateId can be used with a fleet provisioning template"
    )]
    OnlyCertificateId { resource: String, property: String },
    #[error(
        "Resources.{resource}: a policy must have exactly one of PolicyName or PolicyDocument, but has {found}"
    )]
    PolicyNameXorDocument {
        resource: String,
        found: &'static str,
    },
    #[error(
        "Resources: at most one resource of Type {type_name} is allowed, but {first} and {second} are both of that Type"
    )]
    DuplicateResource {
        type_name: &'static str,
        first: String,
        second: String,
    },
    /// AWS's own wording (CloudTrail, JITP).
    #[error("Invalid registration template. Cannot resolve reference value: {{Ref={name}}}")]
    UnresolvedReference { name: String },
    /// A `Ref` (or `${...}`) to an `AWS::` name that this flow does not fill in, or that is not a
    /// pseudo-parameter at all: AWS's wording, then why.
    #[error("Invalid registration template. Cannot resolve reference value: {{Ref={name}}}: {why}")]
    PseudoParameterUnavailable { name: String, why: &'static str },
    #[error(
        "Invalid registration template. Cannot resolve mapping value: {{Fn::FindInMap=[{map}, {top_key}, {second_key}]}}"
    )]
    UnresolvedMapping {
        map: String,
        top_key: String,
        second_key: String,
    },
    #[error("{at}: {function}: {reason}")]
    FunctionFailed {
        at: String,
        function: &'static str,
        reason: String,
    },
    #[error("{at}: expected {expected}, got {found}")]
    WrongType {
        at: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("{at}: invalid {what} {value:?}: {rule}")]
    InvalidValue {
        at: String,
        what: &'static str,
        value: String,
        rule: &'static str,
    },
    #[error("{at}: nested more than {max} levels deep", max = MAX_NESTING_DEPTH)]
    TooDeep { at: String },
    #[error(
        "evaluating the template would produce more than {max} bytes of values",
        max = MAX_EVALUATED_BYTES
    )]
    OutputTooLarge,
}

impl TemplateError {
    /// The AWS `errorCode` to put on the wire (the control-plane exception name).
    ///
    /// Everything here is the caller's fault (a bad template, a parameter missing from the
    /// request, a name AWS would refuse), which AWS reports as `InvalidRequestException`.
    /// Conflicts with existing resources (`ResourceConflictsException`) and missing thing types
    /// (`ResourceRegistrationFailureException`) are decided by the registry, not here.
    pub fn error_code(&self) -> &'static str {
        "InvalidRequestException"
    }

    /// The HTTP-like `statusCode` that goes with [`Self::error_code`].
    pub fn status_code(&self) -> u16 {
        400
    }

    /// True when a `Ref`, `${...}` or `Fn::FindInMap` lookup failed: this request, its certificate
    /// or its flow did not supply what the template needs.
    pub fn is_unresolved_reference(&self) -> bool {
        matches!(
            self,
            Self::UnresolvedReference { .. }
                | Self::UnresolvedMapping { .. }
                | Self::PseudoParameterUnavailable { .. }
        )
    }
}

/// How to treat a property of a resource that already exists. Absent means [`Override::DoNothing`]
/// ([design]: AWS does not state the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Override {
    #[default]
    DoNothing,
    Replace,
    Fail,
    Merge,
}

impl Override {
    /// The template spelling (`DO_NOTHING`, `REPLACE`, `FAIL`, `MERGE`).
    pub fn as_aws_str(self) -> &'static str {
        match self {
            Self::DoNothing => "DO_NOTHING",
            Self::Replace => "REPLACE",
            Self::Fail => "FAIL",
            Self::Merge => "MERGE",
        }
    }

    fn from_aws_str(s: &str) -> Option<Self> {
        match s {
            "DO_NOTHING" => Some(Self::DoNothing),
            "REPLACE" => Some(Self::Replace),
            "FAIL" => Some(Self::Fail),
            "MERGE" => Some(Self::Merge),
            _ => None,
        }
    }
}

/// Status a certificate resource asks for. The docs write both `ACTIVE` and `Active`, so it is
/// read case-insensitively ([design]); absent means `Active`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CertStatus {
    #[default]
    Active,
    Inactive,
}

impl CertStatus {
    /// The registry spelling (`ACTIVE`, `INACTIVE`).
    pub fn as_aws_str(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::Inactive => "INACTIVE",
        }
    }
}

/// Per-property override settings of a thing resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ThingOverrides {
    pub attribute_payload: Override,
    pub thing_type_name: Override,
    pub thing_groups: Override,
}

/// An evaluated `AWS::IoT::Thing` resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThingResource {
    pub logical_name: String,
    /// 1-128 characters of `[a-zA-Z0-9:_-]`.
    pub thing_name: String,
    pub attributes: BTreeMap<String, String>,
    pub thing_type_name: Option<String>,
    pub thing_groups: Vec<String>,
    pub billing_group: Option<String>,
    pub overrides: ThingOverrides,
}

/// How an `AWS::IoT::Certificate` resource names its certificate. Fleet-provisioning and JITP
/// templates may only use `CertificateId`; control-plane templates (RegisterThing API, bulk
/// registration) may also give a CSR to sign or a PEM certificate to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateRef {
    Id(String),
    SigningRequest(String),
    Pem(String),
}

/// Which API a template is evaluated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TemplateKind {
    /// Fleet provisioning over MQTT and JITP: certificates only by `CertificateId`.
    #[default]
    FleetProvisioning,
    /// The control-plane RegisterThing API and bulk registration.
    ControlPlane,
}

/// An evaluated `AWS::IoT::Certificate` resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateResource {
    pub logical_name: String,
    pub certificate: CertificateRef,
    pub status: CertStatus,
    pub status_override: Override,
}

/// An evaluated `AWS::IoT::Policy` resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyResource {
    pub logical_name: String,
    pub source: PolicySource,
}

/// Where a policy comes from: an existing policy's name, or a document to create (AWS then names
/// the policy after a hash of the document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    Name(String),
    /// Compact JSON text of the document (`serde_json::to_string`), whichever form the template used.
    Document(String),
}

/// What one RegisterThing request supplies to [`Template::evaluate`].
#[derive(Debug, Clone, Copy)]
pub struct EvalInput<'a> {
    /// Request parameters, already merged with pre-provisioning hook overrides (strings only, as AWS).
    pub parameters: &'a BTreeMap<String, String>,
    /// The pseudo-parameters AWS fills in for this request's flow.
    pub pseudo: PseudoParameters<'a>,
}

/// The pseudo-parameters AWS fills in, by provisioning flow. They come from the certificate only,
/// never from request parameters: a device must not be able to name someone else's certificate
/// ([design]; AWS documents them as extracted from the certificate).
#[derive(Debug, Clone, Copy)]
pub enum PseudoParameters<'a> {
    /// Fleet provisioning (RegisterThing over MQTT): `AWS::IoT::Certificate::Id`, the certificate
    /// of the ownership token. The subject fields are JITP's (AWS issued this certificate).
    Fleet { certificate_id: &'a str },
    /// Just-in-time provisioning: `AWS::IoT::Certificate::Id` and the subject fields of the device
    /// certificate, keyed by full name (`AWS::IoT::Certificate::CommonName`, ...); a field the
    /// subject lacks fails the request, as AWS documents.
    Jitp {
        certificate_id: &'a str,
        subject: &'a BTreeMap<String, String>,
    },
    /// The RegisterThing API and bulk registration: none ([design]: AWS documents the
    /// pseudo-parameters for JITP and uses the certificate ID in fleet provisioning only; here the
    /// certificate is named by the template itself).
    ControlPlane,
}

const ONLY_IN_JITP: &str = "fleet provisioning fills in AWS::IoT::Certificate::Id only; the \
    certificate subject fields are filled in by just-in-time provisioning (JITP) from the device \
    certificate";
const NONE_IN_CONTROL_PLANE: &str = "the RegisterThing API and bulk registration fill in no \
    pseudo-parameters; name the certificate with a parameter of your own (CertificateId, \
    CertificateSigningRequest or CertificatePem)";
const NOT_A_PSEUDO_PARAMETER: &str = "not a pseudo-parameter of provisioning templates; AWS fills \
    in AWS::IoT::Certificate::Id and, in just-in-time provisioning, \
    AWS::IoT::Certificate::CommonName, Country, Organization, OrganizationalUnit, \
    DistinguishedNameQualifier, StateName and SerialNumber";

/// A template evaluated for one request. Resources are in logical-name order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluated {
    /// At most one (AWS allows one thing per template).
    pub things: Vec<ThingResource>,
    /// At most one.
    pub certificates: Vec<CertificateResource>,
    /// Zero or more.
    pub policies: Vec<PolicyResource>,
    /// The evaluated `DeviceConfiguration`: a flat map of strings, numbers and booleans.
    pub device_configuration: Map<String, Value>,
}

/// A parsed and validated template body; evaluate it once per request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Template {
    parameters: BTreeMap<String, ParameterDecl>,
    mappings: BTreeMap<String, BTreeMap<String, BTreeMap<String, Value>>>,
    thing: Option<ThingDecl>,
    certificate: Option<CertificateDecl>,
    policies: Vec<PolicyDecl>,
    device_configuration: Vec<(String, Expr)>,
}

#[derive(Debug, Clone, PartialEq)]
struct ParameterDecl {
    default: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct ThingDecl {
    logical_name: String,
    thing_name: Expr,
    attribute_payload: Option<Expr>,
    thing_type_name: Option<Expr>,
    thing_groups: Option<Expr>,
    billing_group: Option<Expr>,
    overrides: ThingOverrides,
}

#[derive(Debug, Clone, PartialEq)]
struct CertificateDecl {
    logical_name: String,
    /// The naming property (`CertificateId`, `CertificateSigningRequest`, `CertificatePem`).
    key: &'static str,
    certificate_id: Expr,
    status: Option<Expr>,
    status_override: Override,
}

#[derive(Debug, Clone, PartialEq)]
struct PolicyDecl {
    logical_name: String,
    name: Option<Expr>,
    document: Option<Expr>,
}

/// A template value with its intrinsic functions recognised.
#[derive(Debug, Clone, PartialEq)]
enum Expr {
    /// A JSON scalar.
    Lit(Value),
    List(Vec<Expr>),
    Object(Vec<(String, Expr)>),
    Ref(String),
    Join {
        delimiter: Box<Expr>,
        values: Box<Expr>,
    },
    Select {
        index: Box<Expr>,
        list: Box<Expr>,
    },
    Split {
        delimiter: Box<Expr>,
        source: Box<Expr>,
    },
    FindInMap {
        map: Box<Expr>,
        top_key: Box<Expr>,
        second_key: Box<Expr>,
    },
    Sub {
        parts: Vec<SubPart>,
        variables: Vec<(String, Expr)>,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum SubPart {
    Text(String),
    Variable(String),
}

impl Expr {
    /// The JSON kind this expression always evaluates to, when that is known without evaluating.
    fn static_kind(&self) -> Option<&'static str> {
        match self {
            Self::Lit(v) => Some(kind_name(v)),
            Self::List(_) | Self::Split { .. } => Some(LIST),
            Self::Object(_) => Some(OBJECT),
            Self::Ref(_) | Self::Join { .. } | Self::Sub { .. } => Some(STRING),
            Self::Select { .. } | Self::FindInMap { .. } => None,
        }
    }

    fn is_literal(&self) -> bool {
        match self {
            Self::Lit(_) => true,
            Self::List(items) => items.iter().all(Self::is_literal),
            Self::Object(entries) => entries.iter().all(|(_, e)| e.is_literal()),
            _ => false,
        }
    }

    /// The value of a literal expression (functions, which callers exclude, become null).
    fn literal_value(&self) -> Value {
        match self {
            Self::Lit(v) => v.clone(),
            Self::List(items) => Value::Array(items.iter().map(Self::literal_value).collect()),
            Self::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, e)| (k.clone(), e.literal_value()))
                    .collect(),
            ),
            _ => Value::Null,
        }
    }
}

const STRING: &str = "a string";
const LIST: &str = "a list";
const OBJECT: &str = "an object";

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => STRING,
        Value::Array(_) => LIST,
        Value::Object(_) => OBJECT,
    }
}

fn malformed(at: impl Into<String>, reason: impl Into<String>) -> TemplateError {
    TemplateError::Malformed {
        at: at.into(),
        reason: reason.into(),
    }
}

/// At most 64 characters of a value, for error messages.
fn preview(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_owned(),
    }
}

fn is_function_key(key: &str) -> bool {
    // "Fn:" rather than "Fn::" so the docs' own typo `Fn:Join` is reported as an unknown function.
    key == "Ref" || key.starts_with("Fn:")
}

/// The single intrinsic-function key of an object, if it is (or tries to be) a function call.
fn function_key(map: &Map<String, Value>) -> Option<&str> {
    map.keys().map(String::as_str).find(|k| is_function_key(k))
}

fn is_aws_name(s: &str) -> bool {
    (1..=128).contains(&s.chars().count())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-'))
}

fn is_policy_name(s: &str) -> bool {
    (1..=128).contains(&s.chars().count())
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '=' | ',' | '.' | '@' | '-')
        })
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

impl Template {
    /// Parse and validate a template body (AWS JSON).
    ///
    /// Rejects bodies over [`MAX_TEMPLATE_CHARS`] characters, invalid JSON, unknown top-level
    /// sections, resources of unknown `Type`, malformed `Parameters`/`Mappings`/`OverrideSettings`,
    /// intrinsic functions AWS does not document (`Fn::If`, `Fn::GetAtt`, `Fn::Base64`, ...), a
    /// policy with both or neither of `PolicyName`/`PolicyDocument`, a certificate without
    /// `CertificateId`, and literal values that could never evaluate correctly (a `ThingName` that
    /// is not a valid name, a list where a string is needed, ...).
    pub fn parse(body: &str) -> Result<Template, TemplateError> {
        Template::parse_kind(body, TemplateKind::FleetProvisioning)
    }

    /// Parse a template for `kind`; see [`TemplateKind`].
    pub fn parse_kind(body: &str, kind: TemplateKind) -> Result<Template, TemplateError> {
        let chars = body.chars().count();
        if chars > MAX_TEMPLATE_CHARS {
            return Err(TemplateError::TooLong { chars });
        }
        let root: Value =
            serde_json::from_str(body).map_err(|e| TemplateError::InvalidJson(e.to_string()))?;
        let Value::Object(root) = root else {
            return Err(malformed(
                "template",
                format!("the body must be a JSON object, not {}", kind_name(&root)),
            ));
        };
        // Report an unknown section before anything inside a known one.
        for key in root.keys() {
            if !matches!(
                key.as_str(),
                "Parameters"
                    | "Mappings"
                    | "Resources"
                    | "DeviceConfiguration"
                    | "AWSTemplateFormatVersion"
                    | "Description"
            ) {
                return Err(TemplateError::UnknownSection(key.clone()));
            }
        }
        let mut template = Template::default();
        for (key, value) in &root {
            match key.as_str() {
                "Parameters" => template.parameters = parse_parameters(value)?,
                "Mappings" => template.mappings = parse_mappings(value)?,
                "Resources" => template.parse_resources(value, kind)?,
                "DeviceConfiguration" => {
                    template.device_configuration = parse_device_configuration(value)?;
                }
                // [design] Tolerated CloudFormation-style metadata, as long as it is a string.
                _ => {
                    if !value.is_string() {
                        return Err(TemplateError::WrongType {
                            at: key.clone(),
                            expected: STRING,
                            found: kind_name(value),
                        });
                    }
                }
            }
        }
        if !root.contains_key("Resources") {
            return Err(malformed("template", "missing section Resources"));
        }
        Ok(template)
    }

    /// Names declared in `Parameters` (including `AWS::IoT::Certificate::*` pseudo-parameters),
    /// in sorted order.
    pub fn declared_parameters(&self) -> impl Iterator<Item = &str> {
        self.parameters.keys().map(String::as_str)
    }

    fn parse_resources(&mut self, value: &Value, kind: TemplateKind) -> Result<(), TemplateError> {
        let Value::Object(resources) = value else {
            return Err(TemplateError::WrongType {
                at: "Resources".into(),
                expected: OBJECT,
                found: kind_name(value),
            });
        };
        for (logical, resource) in resources {
            let at = format!("Resources.{logical}");
            if logical.is_empty() {
                return Err(malformed(at, "a resource's logical name must not be empty"));
            }
            let Value::Object(resource) = resource else {
                return Err(TemplateError::WrongType {
                    at,
                    expected: OBJECT,
                    found: kind_name(resource),
                });
            };
            if let Some(key) = resource
                .keys()
                .find(|k| !matches!(k.as_str(), "Type" | "Properties" | "OverrideSettings"))
            {
                return Err(malformed(
                    at,
                    format!("unknown key {key:?}; allowed: Type, Properties, OverrideSettings"),
                ));
            }
            let type_name = match resource.get("Type") {
                None => return Err(malformed(at, "missing Type")),
                Some(Value::String(t)) => t.as_str(),
                Some(other) => {
                    return Err(TemplateError::WrongType {
                        at: format!("{at}.Type"),
                        expected: STRING,
                        found: kind_name(other),
                    });
                }
            };
            let properties = match resource.get("Properties") {
                None => return Err(malformed(at, "missing Properties")),
                Some(Value::Object(p)) => p,
                Some(other) => {
                    return Err(TemplateError::WrongType {
                        at: format!("{at}.Properties"),
                        expected: OBJECT,
                        found: kind_name(other),
                    });
                }
            };
            let overrides = resource.get("OverrideSettings");
            match type_name {
                THING => {
                    let thing = parse_thing(logical, properties, overrides)?;
                    if let Some(first) = &self.thing {
                        return Err(TemplateError::DuplicateResource {
                            type_name: THING,
                            first: first.logical_name.clone(),
                            second: logical.clone(),
                        });
                    }
                    self.thing = Some(thing);
                }
                CERTIFICATE => {
                    let certificate = parse_certificate(logical, properties, overrides, kind)?;
                    if let Some(first) = &self.certificate {
                        return Err(TemplateError::DuplicateResource {
                            type_name: CERTIFICATE,
                            first: first.logical_name.clone(),
                            second: logical.clone(),
                        });
                    }
                    self.certificate = Some(certificate);
                }
                POLICY => {
                    if overrides.is_some() {
                        return Err(malformed(
                            format!("{at}.OverrideSettings"),
                            "OverrideSettings are not available for policy resources",
                        ));
                    }
                    self.policies.push(parse_policy(logical, properties)?);
                }
                other => {
                    return Err(TemplateError::UnknownResourceType {
                        resource: logical.clone(),
                        type_name: other.to_owned(),
                    });
                }
            }
        }
        self.policies
            .sort_by(|a, b| a.logical_name.cmp(&b.logical_name));
        Ok(())
    }
}

fn parse_parameters(value: &Value) -> Result<BTreeMap<String, ParameterDecl>, TemplateError> {
    let Value::Object(params) = value else {
        return Err(TemplateError::WrongType {
            at: "Parameters".into(),
            expected: OBJECT,
            found: kind_name(value),
        });
    };
    let mut out = BTreeMap::new();
    for (name, decl) in params {
        let at = format!("Parameters.{name}");
        if name.is_empty() {
            return Err(malformed(at, "a parameter name must not be empty"));
        }
        let pseudo = name.starts_with("AWS::");
        if pseudo && !PSEUDO_PARAMETERS.contains(&name.as_str()) {
            return Err(malformed(
                at,
                format!(
                    "unknown pseudo-parameter {name:?}; the AWS:: names are reserved for: {}",
                    PSEUDO_PARAMETERS.join(", ")
                ),
            ));
        }
        let Value::Object(decl) = decl else {
            return Err(TemplateError::WrongType {
                at,
                expected: OBJECT,
                found: kind_name(decl),
            });
        };
        let mut default = None;
        let mut has_type = false;
        for (key, v) in decl {
            let at = format!("{at}.{key}");
            match key.as_str() {
                "Type" => {
                    if v.as_str() != Some("String") {
                        return Err(malformed(
                            at,
                            format!("the only parameter Type is \"String\", not {v}"),
                        ));
                    }
                    has_type = true;
                }
                "Default" => {
                    let Value::String(d) = v else {
                        return Err(TemplateError::WrongType {
                            at,
                            expected: STRING,
                            found: kind_name(v),
                        });
                    };
                    // [design] Pseudo-parameters come from the certificate only: AWS fails when
                    // the certificate lacks a declared field, so a default would be dead or wrong.
                    if pseudo {
                        return Err(malformed(
                            at,
                            "a pseudo-parameter takes its value from the certificate and cannot have a Default",
                        ));
                    }
                    default = Some(d.clone());
                }
                "Description" => {
                    if !v.is_string() {
                        return Err(TemplateError::WrongType {
                            at,
                            expected: STRING,
                            found: kind_name(v),
                        });
                    }
                }
                _ => {
                    return Err(malformed(
                        at,
                        format!(
                            "unknown parameter attribute {key:?}; allowed: Type, Default, Description"
                        ),
                    ));
                }
            }
        }
        if !has_type {
            return Err(malformed(at, "missing Type (the only Type is \"String\")"));
        }
        out.insert(name.clone(), ParameterDecl { default });
    }
    Ok(out)
}

type Mappings = BTreeMap<String, BTreeMap<String, BTreeMap<String, Value>>>;

fn parse_mappings(value: &Value) -> Result<Mappings, TemplateError> {
    fn level<'v>(value: &'v Value, at: &str) -> Result<&'v Map<String, Value>, TemplateError> {
        match value {
            Value::Object(map) => {
                if let Some(function) = function_key(map) {
                    return Err(malformed(
                        at,
                        format!("intrinsic function {function} is not allowed in Mappings"),
                    ));
                }
                Ok(map)
            }
            other => Err(TemplateError::WrongType {
                at: at.to_owned(),
                expected: OBJECT,
                found: kind_name(other),
            }),
        }
    }
    let mut out = Mappings::new();
    for (name, top) in level(value, "Mappings")? {
        let at = format!("Mappings.{name}");
        let mut tops = BTreeMap::new();
        for (top_key, second) in level(top, &at)? {
            let at = format!("{at}.{top_key}");
            let mut seconds = BTreeMap::new();
            for (second_key, v) in level(second, &at)? {
                let at = format!("{at}.{second_key}");
                let literal = match v {
                    Value::String(_) | Value::Number(_) | Value::Bool(_) => true,
                    Value::Array(items) => items.iter().all(Value::is_string),
                    Value::Null => false,
                    Value::Object(map) => {
                        if let Some(function) = function_key(map) {
                            return Err(malformed(
                                at,
                                format!("intrinsic function {function} is not allowed in Mappings"),
                            ));
                        }
                        false
                    }
                };
                if !literal {
                    return Err(malformed(
                        at,
                        format!(
                            "Mappings are two-level maps of literal values (a string, number, boolean or list of strings), not {}",
                            kind_name(v)
                        ),
                    ));
                }
                seconds.insert(second_key.clone(), v.clone());
            }
            tops.insert(top_key.clone(), seconds);
        }
        out.insert(name.clone(), tops);
    }
    Ok(out)
}

fn parse_device_configuration(value: &Value) -> Result<Vec<(String, Expr)>, TemplateError> {
    let at = "DeviceConfiguration";
    let Value::Object(map) = value else {
        return Err(TemplateError::WrongType {
            at: at.into(),
            expected: OBJECT,
            found: kind_name(value),
        });
    };
    if let Some(function) = function_key(map) {
        return Err(malformed(
            at,
            format!("the section must be an object of key/value pairs, not a call to {function}"),
        ));
    }
    map.iter()
        .map(|(key, v)| {
            let at = format!("{at}.{key}");
            let expr = parse_expr(v, &at, 1)?;
            check_static(&expr, Shape::Scalar, &at)?;
            Ok((key.clone(), expr))
        })
        .collect()
}

fn parse_thing(
    logical: &str,
    properties: &Map<String, Value>,
    overrides: Option<&Value>,
) -> Result<ThingDecl, TemplateError> {
    let mut thing_name = None;
    let mut attribute_payload = None;
    let mut thing_type_name = None;
    let mut thing_groups = None;
    let mut billing_group = None;
    for (key, v) in properties {
        let at = format!("Resources.{logical}.Properties.{key}");
        let (slot, shape) = match key.as_str() {
            "ThingName" => (&mut thing_name, Shape::Str(StrRule::Name("thing name"))),
            "AttributePayload" => (&mut attribute_payload, Shape::StrMap),
            "ThingTypeName" => (
                &mut thing_type_name,
                Shape::Str(StrRule::Name("thing type name")),
            ),
            "ThingGroups" => (&mut thing_groups, Shape::StrList("thing group name")),
            "BillingGroup" => (
                &mut billing_group,
                Shape::Str(StrRule::Name("billing group name")),
            ),
            _ => {
                return Err(TemplateError::UnknownProperty {
                    resource: logical.to_owned(),
                    type_name: THING,
                    property: key.clone(),
                });
            }
        };
        let expr = parse_expr(v, &at, 3)?;
        check_static(&expr, shape, &at)?;
        *slot = Some(expr);
    }
    let thing_name = thing_name.ok_or_else(|| TemplateError::MissingProperty {
        resource: logical.to_owned(),
        property: "ThingName",
    })?;
    let overrides = match overrides {
        None => ThingOverrides::default(),
        Some(v) => parse_thing_overrides(logical, v)?,
    };
    Ok(ThingDecl {
        logical_name: logical.to_owned(),
        thing_name,
        attribute_payload,
        thing_type_name,
        thing_groups,
        billing_group,
        overrides,
    })
}

fn override_settings<'v>(
    logical: &str,
    value: &'v Value,
) -> Result<(String, &'v Map<String, Value>), TemplateError> {
    let at = format!("Resources.{logical}.OverrideSettings");
    match value {
        Value::Object(map) => Ok((at, map)),
        other => Err(TemplateError::WrongType {
            at,
            expected: OBJECT,
            found: kind_name(other),
        }),
    }
}

fn parse_override(at: &str, value: &Value, merge_allowed: bool) -> Result<Override, TemplateError> {
    let Value::String(s) = value else {
        return Err(TemplateError::WrongType {
            at: at.to_owned(),
            expected: "one of the strings DO_NOTHING, REPLACE, FAIL, MERGE",
            found: kind_name(value),
        });
    };
    match Override::from_aws_str(s) {
        Some(Override::Merge) if !merge_allowed => Err(malformed(
            at,
            "MERGE is valid only for a thing's AttributePayload and ThingGroups",
        )),
        Some(o) => Ok(o),
        None => Err(malformed(
            at,
            format!(
                "unknown override {:?}; allowed: DO_NOTHING, REPLACE, FAIL{}",
                preview(s),
                if merge_allowed { ", MERGE" } else { "" }
            ),
        )),
    }
}

fn parse_thing_overrides(logical: &str, value: &Value) -> Result<ThingOverrides, TemplateError> {
    let (at, map) = override_settings(logical, value)?;
    let mut out = ThingOverrides::default();
    // The docs' prose spells the keys in upper case, every example uses the property names.
    let mut seen: [Option<&str>; 3] = [None; 3];
    for (key, v) in map {
        let (slot, merge_allowed) = match key.as_str() {
            "AttributePayload" | "ATTRIBUTE_PAYLOAD" => (0, true),
            "ThingTypeName" | "THING_TYPE_NAME" => (1, false),
            "ThingGroups" | "THING_GROUPS" => (2, true),
            _ => {
                return Err(malformed(
                    at,
                    format!(
                        "unknown override key {key:?}; allowed: AttributePayload, ThingTypeName, ThingGroups"
                    ),
                ));
            }
        };
        if let Some(previous) = seen[slot] {
            return Err(malformed(
                at,
                format!("{previous} and {key} set the same override twice"),
            ));
        }
        seen[slot] = Some(key.as_str());
        let o = parse_override(&format!("{at}.{key}"), v, merge_allowed)?;
        match slot {
            0 => out.attribute_payload = o,
            1 => out.thing_type_name = o,
            _ => out.thing_groups = o,
        }
    }
    Ok(out)
}

fn parse_certificate(
    logical: &str,
    properties: &Map<String, Value>,
    overrides: Option<&Value>,
    kind: TemplateKind,
) -> Result<CertificateDecl, TemplateError> {
    let mut certificate_id = None;
    let mut naming: Option<&'static str> = None;
    let mut status = None;
    for (key, v) in properties {
        let at = format!("Resources.{logical}.Properties.{key}");
        let (slot, shape) = match key.as_str() {
            name @ ("CertificateId" | "CertificatePem" | "CertificateSigningRequest")
                if name == "CertificateId" || kind == TemplateKind::ControlPlane =>
            {
                if let Some(first) = naming {
                    return Err(malformed(
                        format!("Resources.{logical}.Properties"),
                        format!("give only one of {first} and {name}"),
                    ));
                }
                naming = Some(match name {
                    "CertificateId" => "CertificateId",
                    "CertificatePem" => "CertificatePem",
                    _ => "CertificateSigningRequest",
                });
                (
                    &mut certificate_id,
                    Shape::Str(StrRule::NonEmpty("certificate ID")),
                )
            }
            "Status" => (&mut status, Shape::Str(StrRule::Status)),
            "CertificatePem" | "CertificateSigningRequest" | "CACertificatePem" => {
                return Err(TemplateError::OnlyCertificateId {
                    resource: logical.to_owned(),
                    property: key.clone(),
                });
            }
            _ => {
                return Err(TemplateError::UnknownProperty {
                    resource: logical.to_owned(),
                    type_name: CERTIFICATE,
                    property: key.clone(),
                });
            }
        };
        let expr = parse_expr(v, &at, 3)?;
        check_static(&expr, shape, &at)?;
        *slot = Some(expr);
    }
    let certificate_id = certificate_id.ok_or_else(|| TemplateError::MissingProperty {
        resource: logical.to_owned(),
        property: "CertificateId",
    })?;
    let key = naming.unwrap_or("CertificateId");
    let mut status_override = Override::default();
    if let Some(v) = overrides {
        let (at, map) = override_settings(logical, v)?;
        for (key, v) in map {
            if key != "Status" {
                return Err(malformed(
                    at,
                    format!("unknown override key {key:?}; a certificate only has Status"),
                ));
            }
            status_override = parse_override(&format!("{at}.{key}"), v, false)?;
        }
    }
    Ok(CertificateDecl {
        logical_name: logical.to_owned(),
        key,
        certificate_id,
        status,
        status_override,
    })
}

fn parse_policy(
    logical: &str,
    properties: &Map<String, Value>,
) -> Result<PolicyDecl, TemplateError> {
    let mut name = None;
    let mut document = None;
    for (key, v) in properties {
        let at = format!("Resources.{logical}.Properties.{key}");
        let (slot, shape) = match key.as_str() {
            "PolicyName" => (&mut name, Shape::Str(StrRule::PolicyName)),
            "PolicyDocument" => (&mut document, Shape::PolicyDocument),
            _ => {
                return Err(TemplateError::UnknownProperty {
                    resource: logical.to_owned(),
                    type_name: POLICY,
                    property: key.clone(),
                });
            }
        };
        let expr = parse_expr(v, &at, 3)?;
        check_static(&expr, shape, &at)?;
        *slot = Some(expr);
    }
    let found = match (&name, &document) {
        (Some(_), Some(_)) => "both",
        (None, None) => "neither",
        _ => {
            return Ok(PolicyDecl {
                logical_name: logical.to_owned(),
                name,
                document,
            });
        }
    };
    Err(TemplateError::PolicyNameXorDocument {
        resource: logical.to_owned(),
        found,
    })
}

/// Turns a JSON value of an evaluated section into an expression, recognising functions.
/// `depth` counts JSON nesting from the top of the template.
fn parse_expr(value: &Value, at: &str, depth: usize) -> Result<Expr, TemplateError> {
    if depth > MAX_NESTING_DEPTH {
        return Err(TemplateError::TooDeep { at: at.to_owned() });
    }
    match value {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| parse_expr(item, &format!("{at}[{i}]"), depth + 1))
            .collect::<Result<_, _>>()
            .map(Expr::List),
        Value::Object(map) => match function_key(map) {
            Some(function) => {
                if map.len() != 1 {
                    return Err(malformed(
                        at,
                        format!("{function} must be the only key of its object"),
                    ));
                }
                parse_function(function, &map[function], at, depth)
            }
            None => map
                .iter()
                .map(|(k, v)| Ok((k.clone(), parse_expr(v, &format!("{at}.{k}"), depth + 1)?)))
                .collect::<Result<_, _>>()
                .map(Expr::Object),
        },
        scalar => Ok(Expr::Lit(scalar.clone())),
    }
}

/// The arguments of a function that takes a fixed-length list.
fn fixed_args<'v, const N: usize>(
    args: &'v Value,
    at: &str,
    usage: &str,
) -> Result<[&'v Value; N], TemplateError> {
    let wrong = || malformed(at, format!("expects a list of {N} arguments: {usage}"));
    let Value::Array(items) = args else {
        return Err(wrong());
    };
    let refs: Vec<&Value> = items.iter().collect();
    refs.try_into().map_err(|_| wrong())
}

fn parse_function(
    function: &str,
    args: &Value,
    at: &str,
    depth: usize,
) -> Result<Expr, TemplateError> {
    let at = format!("{at}.{function}");
    let arg = |v: &Value, i: usize| parse_expr(v, &format!("{at}[{i}]"), depth + 2);
    match function {
        "Ref" => match args {
            Value::String(name) => Ok(Expr::Ref(name.clone())),
            other => Err(TemplateError::WrongType {
                at,
                expected: "a parameter name string",
                found: kind_name(other),
            }),
        },
        "Fn::Join" => {
            let [d, l] = fixed_args(args, &at, "[delimiter, [values]]")?;
            let (delimiter, values) = (arg(d, 0)?, arg(l, 1)?);
            expect_kind(&delimiter, STRING, &format!("{at}[0]"))?;
            expect_kind(&values, LIST, &format!("{at}[1]"))?;
            Ok(Expr::Join {
                delimiter: Box::new(delimiter),
                values: Box::new(values),
            })
        }
        "Fn::Select" => {
            let [i, l] = fixed_args(args, &at, "[index, list]")?;
            let (index, list) = (arg(i, 0)?, arg(l, 1)?);
            if let Some(kind) = index.static_kind()
                && kind != STRING
                && kind != "a number"
            {
                return Err(TemplateError::WrongType {
                    at: format!("{at}[0]"),
                    expected: "an index (a number or a string of digits)",
                    found: kind,
                });
            }
            expect_kind(&list, LIST, &format!("{at}[1]"))?;
            Ok(Expr::Select {
                index: Box::new(index),
                list: Box::new(list),
            })
        }
        "Fn::Split" => {
            let [d, s] = fixed_args(args, &at, "[delimiter, string]")?;
            let (delimiter, source) = (arg(d, 0)?, arg(s, 1)?);
            expect_kind(&delimiter, STRING, &format!("{at}[0]"))?;
            if delimiter == Expr::Lit(Value::String(String::new())) {
                return Err(malformed(
                    format!("{at}[0]"),
                    "the delimiter must not be empty",
                ));
            }
            expect_kind(&source, STRING, &format!("{at}[1]"))?;
            Ok(Expr::Split {
                delimiter: Box::new(delimiter),
                source: Box::new(source),
            })
        }
        "Fn::FindInMap" => {
            let [m, t, s] = fixed_args(args, &at, "[MapName, TopLevelKey, SecondLevelKey]")?;
            let (map, top_key, second_key) = (arg(m, 0)?, arg(t, 1)?, arg(s, 2)?);
            for (i, e) in [&map, &top_key, &second_key].into_iter().enumerate() {
                expect_kind(e, STRING, &format!("{at}[{i}]"))?;
            }
            Ok(Expr::FindInMap {
                map: Box::new(map),
                top_key: Box::new(top_key),
                second_key: Box::new(second_key),
            })
        }
        "Fn::Sub" => {
            let (text, variables) = match args {
                Value::String(text) => (text, Vec::new()),
                Value::Array(items) => {
                    let [Value::String(text), Value::Object(vars)] = items.as_slice() else {
                        return Err(malformed(
                            at,
                            "expects a string or a list [string, {name: value, ...}]",
                        ));
                    };
                    let variables = vars
                        .iter()
                        .map(|(name, v)| {
                            let at = format!("{at}[1].{name}");
                            let e = parse_expr(v, &at, depth + 3)?;
                            expect_kind(&e, STRING, &at)?;
                            Ok((name.clone(), e))
                        })
                        .collect::<Result<_, TemplateError>>()?;
                    (text, variables)
                }
                _ => {
                    return Err(malformed(
                        at,
                        "expects a string or a list [string, {name: value, ...}]",
                    ));
                }
            };
            Ok(Expr::Sub {
                parts: parse_sub_text(text, &at)?,
                variables,
            })
        }
        other => Err(TemplateError::UnsupportedFunction {
            at,
            function: other.to_owned(),
        }),
    }
}

/// Splits an `Fn::Sub` string into text and `${Name}` variables; `${!X}` stands for `${X}`.
fn parse_sub_text(text: &str, at: &str) -> Result<Vec<SubPart>, TemplateError> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        literal.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        if let Some(escaped) = after.strip_prefix('!') {
            literal.push_str("${");
            rest = escaped;
            continue;
        }
        let Some(end) = after.find('}') else {
            return Err(malformed(
                at,
                format!("unterminated ${{ in {:?}", preview(&rest[start..])),
            ));
        };
        let name = &after[..end];
        if name.is_empty() {
            return Err(malformed(at, "empty variable ${} in string"));
        }
        if !literal.is_empty() {
            parts.push(SubPart::Text(std::mem::take(&mut literal)));
        }
        parts.push(SubPart::Variable(name.to_owned()));
        rest = &after[end + 1..];
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        parts.push(SubPart::Text(literal));
    }
    Ok(parts)
}

fn expect_kind(expr: &Expr, expected: &'static str, at: &str) -> Result<(), TemplateError> {
    match expr.static_kind() {
        Some(found) if found != expected => Err(TemplateError::WrongType {
            at: at.to_owned(),
            expected,
            found,
        }),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Property shapes, shared by parse-time checks of literals and evaluation-time conversion
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum StrRule {
    /// A thing, thing type, thing group or billing group name (botocore patterns).
    Name(&'static str),
    PolicyName,
    NonEmpty(&'static str),
    Status,
    Any,
}

#[derive(Debug, Clone, Copy)]
enum Shape {
    Str(StrRule),
    /// An object of name → string (`AttributePayload`).
    StrMap,
    /// A list of names (`ThingGroups`).
    StrList(&'static str),
    /// An object, or a string holding a JSON object.
    PolicyDocument,
    /// A `DeviceConfiguration` value: a string, number or boolean.
    Scalar,
}

/// Rejects at parse time what could never evaluate correctly; leaves the rest to evaluation.
fn check_static(expr: &Expr, shape: Shape, at: &str) -> Result<(), TemplateError> {
    match shape {
        Shape::Str(rule) => match expr {
            Expr::Lit(v) => string_property(v.clone(), rule, at).map(drop),
            _ => expect_kind(expr, STRING, at),
        },
        Shape::StrMap => match expr {
            Expr::Object(entries) => entries.iter().try_for_each(|(k, e)| {
                check_static(e, Shape::Str(StrRule::Any), &format!("{at}.{k}"))
            }),
            _ => expect_kind(expr, OBJECT, at),
        },
        Shape::StrList(what) => match expr {
            Expr::List(items) => items.iter().enumerate().try_for_each(|(i, e)| {
                check_static(e, Shape::Str(StrRule::Name(what)), &format!("{at}[{i}]"))
            }),
            _ => expect_kind(expr, LIST, at),
        },
        Shape::PolicyDocument if expr.is_literal() => {
            policy_document(expr.literal_value(), at).map(drop)
        }
        Shape::PolicyDocument => match expr.static_kind() {
            Some(found) if found != STRING && found != OBJECT => Err(TemplateError::WrongType {
                at: at.to_owned(),
                expected: "an object or a string of JSON",
                found,
            }),
            _ => Ok(()),
        },
        Shape::Scalar => match expr {
            Expr::Lit(v) => scalar(v.clone(), at).map(drop),
            _ => match expr.static_kind() {
                Some(found) if found == LIST || found == OBJECT => Err(scalar_error(at, found)),
                _ => Ok(()),
            },
        },
    }
}

fn string_property(value: Value, rule: StrRule, at: &str) -> Result<String, TemplateError> {
    let Value::String(s) = value else {
        return Err(TemplateError::WrongType {
            at: at.to_owned(),
            expected: STRING,
            found: kind_name(&value),
        });
    };
    let invalid = |what, rule| TemplateError::InvalidValue {
        at: at.to_owned(),
        what,
        value: preview(&s),
        rule,
    };
    match rule {
        StrRule::Name(what) if !is_aws_name(&s) => Err(invalid(what, NAME_RULE)),
        StrRule::PolicyName if !is_policy_name(&s) => Err(invalid("policy name", POLICY_NAME_RULE)),
        StrRule::NonEmpty(what) if s.is_empty() => Err(invalid(what, "must not be empty")),
        StrRule::Status if parse_status(&s).is_none() => Err(invalid(
            "certificate status",
            "must be ACTIVE or INACTIVE (any case)",
        )),
        _ => Ok(s),
    }
}

fn parse_status(s: &str) -> Option<CertStatus> {
    if s.eq_ignore_ascii_case("ACTIVE") {
        Some(CertStatus::Active)
    } else if s.eq_ignore_ascii_case("INACTIVE") {
        Some(CertStatus::Inactive)
    } else {
        None
    }
}

fn policy_document(value: Value, at: &str) -> Result<String, TemplateError> {
    let document = match value {
        Value::Object(_) => value,
        Value::String(text) => {
            let parsed: Value = serde_json::from_str(&text).map_err(|e| {
                malformed(at, format!("the policy document is not valid JSON: {e}"))
            })?;
            if !parsed.is_object() {
                return Err(malformed(
                    at,
                    format!(
                        "the policy document must be a JSON object, not {}",
                        kind_name(&parsed)
                    ),
                ));
            }
            parsed
        }
        other => {
            return Err(TemplateError::WrongType {
                at: at.to_owned(),
                expected: "an object or a string of JSON",
                found: kind_name(&other),
            });
        }
    };
    serde_json::to_string(&document)
        .map_err(|e| malformed(at, format!("the policy document cannot be serialised: {e}")))
}

fn scalar_error(at: &str, found: &'static str) -> TemplateError {
    TemplateError::WrongType {
        at: at.to_owned(),
        expected: "a string, number or boolean (DeviceConfiguration is a flat map)",
        found,
    }
}

fn scalar(value: Value, at: &str) -> Result<Value, TemplateError> {
    match value {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(value),
        other => Err(scalar_error(at, kind_name(&other))),
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

impl Template {
    /// Evaluates the template for one request: resolves parameters and pseudo-parameters, runs
    /// the functions and checks every value against what its property needs.
    pub fn evaluate(&self, input: &EvalInput<'_>) -> Result<Evaluated, TemplateError> {
        let mut ev = Evaluator {
            template: self,
            input,
            remaining: MAX_EVALUATED_BYTES,
        };
        let mut things = Vec::new();
        if let Some(decl) = &self.thing {
            things.push(ev.thing(decl)?);
        }
        let mut certificates = Vec::new();
        if let Some(decl) = &self.certificate {
            certificates.push(ev.certificate(decl)?);
        }
        let policies = self
            .policies
            .iter()
            .map(|decl| ev.policy(decl))
            .collect::<Result<_, _>>()?;
        let mut device_configuration = Map::new();
        for (key, expr) in &self.device_configuration {
            let at = format!("DeviceConfiguration.{key}");
            let value = ev.eval(expr, &at)?;
            device_configuration.insert(key.clone(), scalar(value, &at)?);
        }
        Ok(Evaluated {
            things,
            certificates,
            policies,
            device_configuration,
        })
    }
}

struct Evaluator<'t> {
    template: &'t Template,
    input: &'t EvalInput<'t>,
    /// Bytes of text this evaluation may still produce.
    remaining: usize,
}

fn property_path(logical: &str, property: &str) -> String {
    format!("Resources.{logical}.Properties.{property}")
}

impl<'t> Evaluator<'t> {
    fn thing(&mut self, decl: &ThingDecl) -> Result<ThingResource, TemplateError> {
        let path = |p| property_path(&decl.logical_name, p);
        let at = path("ThingName");
        let thing_name = string_property(
            self.eval(&decl.thing_name, &at)?,
            StrRule::Name("thing name"),
            &at,
        )?;
        let mut attributes = BTreeMap::new();
        if let Some(expr) = &decl.attribute_payload {
            let at = path("AttributePayload");
            match self.eval(expr, &at)? {
                Value::Object(map) => {
                    for (k, v) in map {
                        let value = string_property(v, StrRule::Any, &format!("{at}.{k}"))?;
                        attributes.insert(k, value);
                    }
                }
                other => {
                    return Err(TemplateError::WrongType {
                        at,
                        expected: OBJECT,
                        found: kind_name(&other),
                    });
                }
            }
        }
        let thing_type_name = match &decl.thing_type_name {
            None => None,
            Some(expr) => {
                let at = path("ThingTypeName");
                let v = self.eval(expr, &at)?;
                Some(string_property(v, StrRule::Name("thing type name"), &at)?)
            }
        };
        let mut thing_groups = Vec::new();
        if let Some(expr) = &decl.thing_groups {
            let at = path("ThingGroups");
            match self.eval(expr, &at)? {
                Value::Array(items) => {
                    for (i, v) in items.into_iter().enumerate() {
                        let rule = StrRule::Name("thing group name");
                        thing_groups.push(string_property(v, rule, &format!("{at}[{i}]"))?);
                    }
                }
                other => {
                    return Err(TemplateError::WrongType {
                        at,
                        expected: LIST,
                        found: kind_name(&other),
                    });
                }
            }
        }
        let billing_group = match &decl.billing_group {
            None => None,
            Some(expr) => {
                let at = path("BillingGroup");
                let v = self.eval(expr, &at)?;
                Some(string_property(
                    v,
                    StrRule::Name("billing group name"),
                    &at,
                )?)
            }
        };
        Ok(ThingResource {
            logical_name: decl.logical_name.clone(),
            thing_name,
            attributes,
            thing_type_name,
            thing_groups,
            billing_group,
            overrides: decl.overrides,
        })
    }

    fn certificate(
        &mut self,
        decl: &CertificateDecl,
    ) -> Result<CertificateResource, TemplateError> {
        let at = property_path(&decl.logical_name, decl.key);
        let value = string_property(
            self.eval(&decl.certificate_id, &at)?,
            StrRule::NonEmpty("certificate ID"),
            &at,
        )?;
        let certificate = match decl.key {
            "CertificatePem" => CertificateRef::Pem(value),
            "CertificateSigningRequest" => CertificateRef::SigningRequest(value),
            _ => CertificateRef::Id(value),
        };
        let status = match &decl.status {
            None => CertStatus::default(),
            Some(expr) => {
                let at = property_path(&decl.logical_name, "Status");
                let s = string_property(self.eval(expr, &at)?, StrRule::Status, &at)?;
                parse_status(&s).unwrap_or_default()
            }
        };
        Ok(CertificateResource {
            logical_name: decl.logical_name.clone(),
            certificate,
            status,
            status_override: decl.status_override,
        })
    }

    fn policy(&mut self, decl: &PolicyDecl) -> Result<PolicyResource, TemplateError> {
        let source = match (&decl.name, &decl.document) {
            (Some(expr), _) => {
                let at = property_path(&decl.logical_name, "PolicyName");
                let v = self.eval(expr, &at)?;
                PolicySource::Name(string_property(v, StrRule::PolicyName, &at)?)
            }
            (None, Some(expr)) => {
                let at = property_path(&decl.logical_name, "PolicyDocument");
                let v = self.eval(expr, &at)?;
                PolicySource::Document(policy_document(v, &at)?)
            }
            // Parsing guarantees exactly one of the two.
            (None, None) => {
                return Err(TemplateError::PolicyNameXorDocument {
                    resource: decl.logical_name.clone(),
                    found: "neither",
                });
            }
        };
        Ok(PolicyResource {
            logical_name: decl.logical_name.clone(),
            source,
        })
    }

    fn charge(&mut self, bytes: usize) -> Result<(), TemplateError> {
        self.remaining = self
            .remaining
            .checked_sub(bytes)
            .ok_or(TemplateError::OutputTooLarge)?;
        Ok(())
    }

    /// The value of a declared parameter, or of a pseudo-parameter (declared or not).
    fn resolve(&self, name: &str) -> Result<&'t str, TemplateError> {
        let unresolved = || TemplateError::UnresolvedReference {
            name: name.to_owned(),
        };
        if name.starts_with("AWS::") {
            return self.pseudo_parameter(name);
        }
        let decl = self.template.parameters.get(name).ok_or_else(unresolved)?;
        self.input
            .parameters
            .get(name)
            .or(decl.default.as_ref())
            .map(String::as_str)
            .ok_or_else(unresolved)
    }

    /// A pseudo-parameter as this request's flow fills it in.
    fn pseudo_parameter(&self, name: &str) -> Result<&'t str, TemplateError> {
        let unavailable = |why| TemplateError::PseudoParameterUnavailable {
            name: name.to_owned(),
            why,
        };
        let unresolved = || TemplateError::UnresolvedReference {
            name: name.to_owned(),
        };
        if !PSEUDO_PARAMETERS.contains(&name) {
            return Err(unavailable(NOT_A_PSEUDO_PARAMETER));
        }
        let certificate_id = |id: &'t str| Some(id).filter(|id| !id.is_empty());
        match self.input.pseudo {
            PseudoParameters::Fleet { certificate_id: id } if name == CERTIFICATE_ID => {
                certificate_id(id).ok_or_else(unresolved)
            }
            PseudoParameters::Fleet { .. } => Err(unavailable(ONLY_IN_JITP)),
            PseudoParameters::Jitp {
                certificate_id: id,
                subject,
            } => {
                let value = if name == CERTIFICATE_ID {
                    certificate_id(id)
                } else {
                    subject.get(name).map(String::as_str)
                };
                value.ok_or_else(unresolved)
            }
            PseudoParameters::ControlPlane => Err(unavailable(NONE_IN_CONTROL_PLANE)),
        }
    }

    fn eval_string(
        &mut self,
        expr: &Expr,
        at: &str,
        function: &'static str,
        argument: &str,
    ) -> Result<String, TemplateError> {
        match self.eval(expr, at)? {
            Value::String(s) => Ok(s),
            other => Err(TemplateError::FunctionFailed {
                at: at.to_owned(),
                function,
                reason: format!("{argument} must be a string, got {}", kind_name(&other)),
            }),
        }
    }

    fn eval(&mut self, expr: &Expr, at: &str) -> Result<Value, TemplateError> {
        let failed = |function, reason| TemplateError::FunctionFailed {
            at: at.to_owned(),
            function,
            reason,
        };
        match expr {
            Expr::Lit(v) => Ok(v.clone()),
            Expr::List(items) => items
                .iter()
                .map(|e| self.eval(e, at))
                .collect::<Result<_, _>>()
                .map(Value::Array),
            Expr::Object(entries) => entries
                .iter()
                .map(|(k, e)| Ok((k.clone(), self.eval(e, at)?)))
                .collect::<Result<_, _>>()
                .map(Value::Object),
            Expr::Ref(name) => {
                let value = self.resolve(name)?;
                self.charge(value.len())?;
                Ok(Value::String(value.to_owned()))
            }
            Expr::Join { delimiter, values } => {
                const F: &str = "Fn::Join";
                let delimiter = self.eval_string(delimiter, at, F, "the delimiter")?;
                let Value::Array(items) = self.eval(values, at)? else {
                    return Err(failed(F, "the values must be a list".into()));
                };
                let mut strings = Vec::with_capacity(items.len());
                let mut total = delimiter
                    .len()
                    .saturating_mul(items.len().saturating_sub(1));
                for (i, item) in items.into_iter().enumerate() {
                    let Value::String(s) = item else {
                        return Err(failed(
                            F,
                            format!("value {i} is {}, not a string", kind_name(&item)),
                        ));
                    };
                    total = total.saturating_add(s.len());
                    strings.push(s);
                }
                self.charge(total)?;
                Ok(Value::String(strings.join(&delimiter)))
            }
            Expr::Select { index, list } => {
                const F: &str = "Fn::Select";
                let index = match self.eval(index, at)? {
                    Value::Number(n) => n.as_u64().and_then(|n| usize::try_from(n).ok()),
                    Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                        s.parse::<usize>().ok()
                    }
                    _ => None,
                }
                .ok_or_else(|| {
                    failed(
                        F,
                        "the index must be a non-negative integer or a string of digits".into(),
                    )
                })?;
                let Value::Array(items) = self.eval(list, at)? else {
                    return Err(failed(F, "the second argument must be a list".into()));
                };
                let len = items.len();
                match items.into_iter().nth(index) {
                    None => Err(failed(
                        F,
                        format!("index {index} is out of range for a list of {len} values"),
                    )),
                    Some(Value::Null) => {
                        Err(failed(F, format!("the value at index {index} is null")))
                    }
                    Some(v) => Ok(v),
                }
            }
            Expr::Split { delimiter, source } => {
                const F: &str = "Fn::Split";
                let delimiter = self.eval_string(delimiter, at, F, "the delimiter")?;
                if delimiter.is_empty() {
                    return Err(failed(F, "the delimiter must not be empty".into()));
                }
                let source = self.eval_string(source, at, F, "the source")?;
                let pieces = source.matches(delimiter.as_str()).count().saturating_add(1);
                let element = std::mem::size_of::<Value>();
                self.charge(source.len().saturating_add(pieces.saturating_mul(element)))?;
                Ok(Value::Array(
                    source
                        .split(delimiter.as_str())
                        .map(|s| Value::String(s.to_owned()))
                        .collect(),
                ))
            }
            Expr::FindInMap {
                map,
                top_key,
                second_key,
            } => {
                const F: &str = "Fn::FindInMap";
                let map = self.eval_string(map, at, F, "the map name")?;
                let top_key = self.eval_string(top_key, at, F, "the top-level key")?;
                let second_key = self.eval_string(second_key, at, F, "the second-level key")?;
                let found = self
                    .template
                    .mappings
                    .get(&map)
                    .and_then(|m| m.get(&top_key))
                    .and_then(|m| m.get(&second_key));
                let Some(value) = found else {
                    return Err(TemplateError::UnresolvedMapping {
                        map: preview(&map),
                        top_key: preview(&top_key),
                        second_key: preview(&second_key),
                    });
                };
                let element = std::mem::size_of::<Value>();
                let size = match value {
                    Value::String(s) => s.len(),
                    Value::Array(items) => items.iter().fold(0usize, |n, v| {
                        n.saturating_add(v.as_str().map_or(0, str::len))
                            .saturating_add(element)
                    }),
                    _ => element,
                };
                self.charge(size)?;
                Ok(value.clone())
            }
            Expr::Sub { parts, variables } => {
                let mut values = BTreeMap::new();
                for (name, e) in variables {
                    let v = self.eval_string(e, at, "Fn::Sub", &format!("variable {name}"))?;
                    values.insert(name.as_str(), v);
                }
                let mut pieces = Vec::with_capacity(parts.len());
                for part in parts {
                    pieces.push(match part {
                        SubPart::Text(t) => t.as_str(),
                        SubPart::Variable(name) => match values.get(name.as_str()) {
                            Some(v) => v.as_str(),
                            None => self.resolve(name)?,
                        },
                    });
                }
                let total = pieces.iter().fold(0usize, |n, p| n.saturating_add(p.len()));
                self.charge(total)?;
                Ok(Value::String(pieces.concat()))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const CERT_ID: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

    /// The provisioning flow a test evaluates for (JITP with the subject fields of its certificate).
    #[derive(Clone, Copy)]
    enum Flow<'a> {
        Fleet,
        Jitp(&'a [(&'a str, &'a str)]),
        ControlPlane,
    }

    const FLEET: Flow<'static> = Flow::Fleet;

    fn eval_with(
        body: &str,
        params: &[(&str, &str)],
        flow: Flow<'_>,
    ) -> Result<Evaluated, TemplateError> {
        let parameters = strings(params);
        let subject;
        let pseudo = match flow {
            Flow::Fleet => PseudoParameters::Fleet {
                certificate_id: CERT_ID,
            },
            Flow::Jitp(fields) => {
                subject = strings(fields);
                PseudoParameters::Jitp {
                    certificate_id: CERT_ID,
                    subject: &subject,
                }
            }
            Flow::ControlPlane => PseudoParameters::ControlPlane,
        };
        Template::parse_kind(
            body,
            match flow {
                Flow::ControlPlane => TemplateKind::ControlPlane,
                _ => TemplateKind::FleetProvisioning,
            },
        )?
        .evaluate(&EvalInput {
            parameters: &parameters,
            pseudo,
        })
    }

    fn eval(body: &Value, params: &[(&str, &str)]) -> Result<Evaluated, TemplateError> {
        eval_with(&body.to_string(), params, FLEET)
    }

    /// A template with one declared parameter `P` (and `Q` with a default) and the given
    /// DeviceConfiguration, so a function can be tried in isolation.
    fn config_template(config: Value) -> Value {
        json!({
            "Parameters": {
                "P": {"Type": "String"},
                "Q": {"Type": "String", "Default": "q-default"}
            },
            "Mappings": {"M": {"top": {"second": "found", "list": ["x", "y"]}}},
            "Resources": {},
            "DeviceConfiguration": config
        })
    }

    fn config_value(function: Value, params: &[(&str, &str)]) -> Result<Value, TemplateError> {
        let out = eval(&config_template(json!({"out": function})), params)?;
        Ok(out.device_configuration["out"].clone())
    }

    fn parse_err(body: &Value) -> TemplateError {
        Template::parse(&body.to_string()).unwrap_err()
    }

    fn thing_template(properties: Value) -> Value {
        json!({
            "Parameters": {"P": {"Type": "String"}},
            "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": properties}}
        })
    }

    /// The fleet-provisioning example of the AWS developer guide (provision-template.md). Two
    /// edits make it valid as AWS itself must read it: the stray closing brace after
    /// `DeviceConfiguration` is gone; and the thing gets the `ThingName` it needs (the docs'
    /// Fn::Join, which they apply to `ThingTypeName`). As published, it refers to
    /// `AWS::IoT::Certificate::Id` without declaring it.
    const DOCS_FLEET_EXAMPLE: &str = r#"{
        "Parameters" : {
            "SerialNumber": { "Type": "String" },
            "DeviceLocation": { "Type": "String" }
        },
        "Mappings": {
            "LocationTable": {
                "Seattle": { "LocationUrl": "https://example.aws" }
            }
        },
        "Resources" : {
            "thing" : {
                "Type" : "AWS::IoT::Thing",
                "Properties" : {
                    "ThingName" : {"Fn::Join":["",["ThingPrefix_",{"Ref":"SerialNumber"}]]},
                    "AttributePayload" : { "version" : "v1", "serialNumber" : "serialNumber" },
                    "ThingTypeName" : {"Fn::Join":["",["ThingPrefix_",{"Ref":"SerialNumber"}]]},
                    "ThingGroups" : ["v1-lightbulbs", "WA"],
                    "BillingGroup": "LightBulbBillingGroup"
                },
                "OverrideSettings" : {
                    "AttributePayload" : "MERGE",
                    "ThingTypeName" : "REPLACE",
                    "ThingGroups" : "DO_NOTHING"
                }
            },
            "certificate" : {
                "Type" : "AWS::IoT::Certificate",
                "Properties" : {
                    "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                    "Status" : "Active"
                }
            },
            "policy" : {
                "Type" : "AWS::IoT::Policy",
                "Properties" : {
                    "PolicyDocument" : {
                        "Version": "2012-10-17",
                        "Statement": [{
                            "Effect": "Allow",
                            "Action":["iot:Publish"],
                            "Resource": ["arn:aws:iot:us-east-1:123456789012:topic/foo/bar"]
                        }]
                    }
                }
            }
        },
        "DeviceConfiguration": {
            "FallbackUrl": "https://www.example.com/test-site",
            "LocationUrl": {
                "Fn::FindInMap": ["LocationTable",{"Ref": "DeviceLocation"}, "LocationUrl"]}
        }
    }"#;

    #[test]
    fn docs_fleet_example_evaluates_to_exact_values() {
        let template = Template::parse(DOCS_FLEET_EXAMPLE).unwrap();
        assert_eq!(
            template.declared_parameters().collect::<Vec<_>>(),
            ["DeviceLocation", "SerialNumber"]
        );
        let out = eval_with(
            DOCS_FLEET_EXAMPLE,
            &[("SerialNumber", "123"), ("DeviceLocation", "Seattle")],
            FLEET,
        )
        .unwrap();
        assert_eq!(
            out.things,
            [ThingResource {
                logical_name: "thing".into(),
                thing_name: "ThingPrefix_123".into(),
                attributes: strings(&[("serialNumber", "serialNumber"), ("version", "v1")]),
                thing_type_name: Some("ThingPrefix_123".into()),
                thing_groups: vec!["v1-lightbulbs".into(), "WA".into()],
                billing_group: Some("LightBulbBillingGroup".into()),
                overrides: ThingOverrides {
                    attribute_payload: Override::Merge,
                    thing_type_name: Override::Replace,
                    thing_groups: Override::DoNothing,
                },
            }]
        );
        assert_eq!(
            out.certificates,
            [CertificateResource {
                logical_name: "certificate".into(),
                certificate: CertificateRef::Id(CERT_ID.into()),
                status: CertStatus::Active,
                status_override: Override::DoNothing,
            }]
        );
        assert_eq!(out.policies.len(), 1);
        assert_eq!(out.policies[0].logical_name, "policy");
        let PolicySource::Document(text) = &out.policies[0].source else {
            panic!("expected a document, got {:?}", out.policies[0].source);
        };
        assert!(!text.contains(char::is_whitespace), "not compact: {text}");
        assert_eq!(
            serde_json::from_str::<Value>(text).unwrap(),
            json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
                "Action": ["iot:Publish"],
                "Resource": ["arn:aws:iot:us-east-1:123456789012:topic/foo/bar"]}]})
        );
        assert_eq!(
            Value::Object(out.device_configuration),
            json!({"FallbackUrl": "https://www.example.com/test-site",
                   "LocationUrl": "https://example.aws"})
        );
    }

    #[test]
    fn docs_fleet_example_needs_its_location_in_the_mapping() {
        let err = eval_with(
            DOCS_FLEET_EXAMPLE,
            &[("SerialNumber", "123"), ("DeviceLocation", "Paris")],
            FLEET,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid registration template. Cannot resolve mapping value: \
             {Fn::FindInMap=[LocationTable, Paris, LocationUrl]}"
        );
        assert!(err.is_unresolved_reference());
    }

    #[test]
    fn supplied_value_wins_over_default() {
        let config = json!({"p": {"Ref": "P"}, "q": {"Ref": "Q"}});
        let out = eval(&config_template(config.clone()), &[("P", "p1")]).unwrap();
        assert_eq!(
            Value::Object(out.device_configuration),
            json!({"p": "p1", "q": "q-default"})
        );
        let out = eval(&config_template(config), &[("P", "p1"), ("Q", "q1")]).unwrap();
        assert_eq!(out.device_configuration["q"], "q1");
    }

    #[test]
    fn join_concatenates_with_delimiter() {
        let f = json!({"Fn::Join": ["-", ["a", {"Ref": "P"}, {"Ref": "Q"}]]});
        assert_eq!(config_value(f, &[("P", "b")]).unwrap(), "a-b-q-default");
        let f = json!({"Fn::Join": ["", ["x", "y"]]});
        assert_eq!(config_value(f, &[]).unwrap(), "xy");
        let f = json!({"Fn::Join": [",", []]});
        assert_eq!(config_value(f, &[]).unwrap(), "");
    }

    #[test]
    fn select_takes_number_string_or_function_index() {
        for index in [json!(1), json!("1"), json!({"Ref": "P"})] {
            let f = json!({"Fn::Select": [index, ["a", "b", "c"]]});
            assert_eq!(config_value(f, &[("P", "1")]).unwrap(), "b");
        }
    }

    #[test]
    fn select_out_of_range_or_null_is_an_error() {
        let f = json!({"Fn::Select": [3, ["a", "b", "c"]]});
        assert_eq!(
            config_value(f, &[]).unwrap_err().to_string(),
            "DeviceConfiguration.out: Fn::Select: index 3 is out of range for a list of 3 values"
        );
        let f = json!({"Fn::Select": [0, [null]]});
        let err = config_value(f, &[]).unwrap_err().to_string();
        assert!(
            err.contains("Fn::Select: the value at index 0 is null"),
            "{err}"
        );
        let f = json!({"Fn::Select": ["-1", ["a"]]});
        let err = config_value(f, &[]).unwrap_err().to_string();
        assert!(err.contains("Fn::Select: the index must be"), "{err}");
        let f = json!({"Fn::Select": [0.5, ["a"]]});
        assert!(config_value(f, &[]).is_err());
    }

    #[test]
    fn split_yields_a_list_for_select_and_join() {
        let f = json!({"Fn::Select": [2, {"Fn::Split": [",", {"Ref": "P"}]}]});
        assert_eq!(config_value(f, &[("P", "a,b,c")]).unwrap(), "c");
        let f = json!({"Fn::Join": ["/", {"Fn::Split": [",", "a,,b"]}]});
        assert_eq!(config_value(f, &[]).unwrap(), "a//b");
        let body = json!({"Parameters": {"P": {"Type": "String"}},
            "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {
                "ThingName": "t", "ThingGroups": {"Fn::Split": [";", {"Ref": "P"}]}}}}});
        let out = eval(&body, &[("P", "g1;g2")]).unwrap();
        assert_eq!(out.things[0].thing_groups, ["g1", "g2"]);
    }

    #[test]
    fn split_with_empty_delimiter_is_an_error() {
        let err = parse_err(&config_template(json!({"o": {"Fn::Split": ["", "abc"]}})));
        assert_eq!(
            err.to_string(),
            "DeviceConfiguration.o.Fn::Split[0]: the delimiter must not be empty"
        );
        let f = json!({"Fn::Split": [{"Ref": "P"}, "abc"]});
        let err = config_value(json!({"Fn::Join": ["", f]}), &[("P", "")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("Fn::Split: the delimiter must not be empty")
        );
    }

    #[test]
    fn sub_substitutes_parameters_variables_and_escapes() {
        let f = json!({"Fn::Sub": "dev-${P}-${Q}"});
        assert_eq!(config_value(f, &[("P", "7")]).unwrap(), "dev-7-q-default");
        let f = json!({"Fn::Sub": ["${P}:${Local}", {"Local": {"Fn::Join": ["+", ["a", "b"]]}}]});
        assert_eq!(config_value(f, &[("P", "7")]).unwrap(), "7:a+b");
        // A variable of the map shadows a parameter of the same name.
        let f = json!({"Fn::Sub": ["${P}", {"P": "local"}]});
        assert_eq!(config_value(f, &[("P", "7")]).unwrap(), "local");
        let f = json!({"Fn::Sub": "${!Literal} and ${!P}"});
        assert_eq!(config_value(f, &[]).unwrap(), "${Literal} and ${P}");
    }

    #[test]
    fn sub_reads_pseudo_parameters() {
        let body = json!({
            "Parameters": {"AWS::IoT::Certificate::Id": {"Type": "String"}},
            "Resources": {},
            "DeviceConfiguration": {"id": {"Fn::Sub": "cert-${AWS::IoT::Certificate::Id}"}}
        });
        let out = eval(&body, &[]).unwrap();
        assert_eq!(out.device_configuration["id"], format!("cert-{CERT_ID}"));
    }

    #[test]
    fn sub_errors_name_the_problem() {
        let err = parse_err(&config_template(json!({"o": {"Fn::Sub": "a ${P"}})));
        assert!(
            err.to_string()
                .starts_with("DeviceConfiguration.o.Fn::Sub: unterminated ${")
        );
        let err = parse_err(&config_template(json!({"o": {"Fn::Sub": "${}"}})));
        assert!(err.to_string().contains("empty variable"));
        let err = config_value(json!({"Fn::Sub": "${Nope}"}), &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid registration template. Cannot resolve reference value: {Ref=Nope}"
        );
    }

    #[test]
    fn find_in_map_reads_two_level_maps() {
        let f = json!({"Fn::FindInMap": ["M", {"Ref": "P"}, "second"]});
        assert_eq!(config_value(f, &[("P", "top")]).unwrap(), "found");
        let f = json!({"Fn::Select": [1, {"Fn::FindInMap": ["M", "top", "list"]}]});
        assert_eq!(config_value(f, &[]).unwrap(), "y");
        let f = json!({"Fn::FindInMap": ["M", "top", "absent"]});
        assert_eq!(
            config_value(f, &[]).unwrap_err().to_string(),
            "Invalid registration template. Cannot resolve mapping value: {Fn::FindInMap=[M, top, absent]}"
        );
        let f = json!({"Fn::FindInMap": ["Nope", "top", "second"]});
        assert!(config_value(f, &[]).unwrap_err().is_unresolved_reference());
    }

    #[test]
    fn functions_nest() {
        let f = json!({"Fn::Join": ["_", [
            {"Fn::Select": [0, {"Fn::Split": ["-", {"Fn::Sub": "${P}-rest"}]}]},
            {"Fn::FindInMap": ["M", "top", "second"]}
        ]]});
        assert_eq!(config_value(f, &[("P", "head")]).unwrap(), "head_found");
    }

    #[test]
    fn unresolvable_references_use_aws_wording() {
        let msg = |name: &str| {
            format!("Invalid registration template. Cannot resolve reference value: {{Ref={name}}}")
        };
        // Declared without a Default, and not supplied.
        let err = config_value(json!({"Ref": "P"}), &[]).unwrap_err();
        assert_eq!(err.to_string(), msg("P"));
        assert!(err.is_unresolved_reference());
        assert_eq!(err.error_code(), "InvalidRequestException");
        // Supplied, but not declared.
        let err = config_value(json!({"Ref": "Undeclared"}), &[("Undeclared", "x")]).unwrap_err();
        assert_eq!(err.to_string(), msg("Undeclared"));
    }

    #[test]
    fn jitp_subject_fields_resolve_or_fail_like_aws() {
        let body = json!({
            "Parameters": {
                "AWS::IoT::Certificate::CommonName": {"Type": "String"},
                "AWS::IoT::Certificate::Country": {"Type": "String"},
                "AWS::IoT::Certificate::Id": {"Type": "String"}
            },
            "Resources": {
                "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                    "ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"},
                    "AttributePayload": {"country": {"Ref": "AWS::IoT::Certificate::Country"}}}},
                "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                    "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}}
            }
        })
        .to_string();
        let cn = "AWS::IoT::Certificate::CommonName";
        let out = eval_with(
            &body,
            &[],
            Flow::Jitp(&[(cn, "dev-1"), ("AWS::IoT::Certificate::Country", "FR")]),
        )
        .unwrap();
        assert_eq!(out.things[0].thing_name, "dev-1");
        assert_eq!(out.things[0].attributes["country"], "FR");
        let err = eval_with(&body, &[], Flow::Jitp(&[(cn, "dev-1")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid registration template. Cannot resolve reference value: \
             {Ref=AWS::IoT::Certificate::Country}"
        );
    }

    #[test]
    fn pseudo_parameters_ignore_request_parameters() {
        let body = json!({
            "Parameters": {"AWS::IoT::Certificate::Id": {"Type": "String"}},
            "Resources": {"certificate": {"Type": "AWS::IoT::Certificate",
                "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}}}}
        });
        let out = eval(&body, &[(CERTIFICATE_ID, "someone-elses")]).unwrap();
        assert_eq!(
            out.certificates[0].certificate,
            CertificateRef::Id(CERT_ID.into())
        );
        let err = parse_err(&json!({"Parameters": {
            "AWS::IoT::Certificate::Country": {"Type": "String", "Default": "US"}}, "Resources": {}}));
        assert!(
            err.to_string()
                .starts_with("Parameters.AWS::IoT::Certificate::Country.Default:")
        );
        let err =
            parse_err(&json!({"Parameters": {"AWS::Region": {"Type": "String"}}, "Resources": {}}));
        assert!(
            err.to_string()
                .contains("unknown pseudo-parameter \"AWS::Region\""),
            "{err}"
        );
    }

    /// The subject pseudo-parameters AWS documents for JITP, with a value for each.
    const SUBJECT: [(&str, &str); 7] = [
        ("AWS::IoT::Certificate::CommonName", "bulb-8"),
        ("AWS::IoT::Certificate::Country", "US"),
        ("AWS::IoT::Certificate::Organization", "Acme"),
        ("AWS::IoT::Certificate::OrganizationalUnit", "Lighting"),
        ("AWS::IoT::Certificate::DistinguishedNameQualifier", "dq8"),
        ("AWS::IoT::Certificate::StateName", "WA"),
        ("AWS::IoT::Certificate::SerialNumber", "SN8"),
    ];

    /// A template with no `Parameters` whose thing carries one attribute per name, by `Ref`.
    fn undeclared_refs(names: &[&str]) -> String {
        let attributes: serde_json::Map<String, Value> = names
            .iter()
            .map(|n| ((*n).to_owned(), json!({"Ref": n})))
            .collect();
        json!({"Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {
            "ThingName": "t", "AttributePayload": attributes}}}})
        .to_string()
    }

    #[test]
    fn fleet_fills_an_undeclared_certificate_id() {
        // The shape of the CloudFormation, Terraform and developer-guide fleet examples.
        let body = json!({
            "Parameters": {"SerialNumber": {"Type": "String"}},
            "Resources": {"certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "Active"}}},
            "DeviceConfiguration": {"cert": {"Fn::Sub": "cert-${AWS::IoT::Certificate::Id}"}}
        });
        let template = Template::parse(&body.to_string()).unwrap();
        assert_eq!(
            template.declared_parameters().collect::<Vec<_>>(),
            ["SerialNumber"]
        );
        // A request parameter of the same name changes nothing, declared or not.
        let out = eval(&body, &[(CERTIFICATE_ID, "someone-elses")]).unwrap();
        assert_eq!(
            out.certificates[0].certificate,
            CertificateRef::Id(CERT_ID.into())
        );
        assert_eq!(out.device_configuration["cert"], format!("cert-{CERT_ID}"));
    }

    #[test]
    fn jitp_fills_every_documented_pseudo_parameter_declared_or_not() {
        let mut names: Vec<&str> = SUBJECT.iter().map(|(n, _)| *n).collect();
        names.push(CERTIFICATE_ID);
        let out = eval_with(&undeclared_refs(&names), &[], Flow::Jitp(&SUBJECT)).unwrap();
        let mut expected = strings(&SUBJECT);
        expected.insert(CERTIFICATE_ID.into(), CERT_ID.into());
        assert_eq!(out.things[0].attributes, expected);
        // Declaring some of them changes nothing.
        let mut body: Value = serde_json::from_str(&undeclared_refs(&names)).unwrap();
        body["Parameters"] = json!({
            "AWS::IoT::Certificate::CommonName": {"Type": "String"},
            "AWS::IoT::Certificate::Id": {"Type": "String"}});
        let out = eval_with(&body.to_string(), &[], Flow::Jitp(&SUBJECT)).unwrap();
        assert_eq!(out.things[0].attributes, expected);
        // Request parameters never stand in for the certificate.
        let body = undeclared_refs(&["AWS::IoT::Certificate::Country"]);
        let err = eval_with(
            &body,
            &[("AWS::IoT::Certificate::Country", "FR")],
            Flow::Jitp(&[]),
        )
        .unwrap_err();
        assert_eq!(
            err,
            TemplateError::UnresolvedReference {
                name: "AWS::IoT::Certificate::Country".into()
            }
        );
    }

    #[test]
    fn jitp_subject_without_an_undeclared_field_fails_like_a_declared_one() {
        // AWS: provisioning fails when the certificate lacks a field the template uses.
        for (name, _) in SUBJECT {
            let subject: Vec<(&str, &str)> = SUBJECT
                .iter()
                .copied()
                .filter(|(n, _)| *n != name)
                .collect();
            let err = eval_with(&undeclared_refs(&[name]), &[], Flow::Jitp(&subject)).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "Invalid registration template. Cannot resolve reference value: {{Ref={name}}}"
                )
            );
            assert!(err.is_unresolved_reference());
        }
    }

    #[test]
    fn pseudo_parameters_a_flow_does_not_fill_are_errors_that_say_so() {
        let prefix = |name: &str| {
            format!(
                "Invalid registration template. Cannot resolve reference value: {{Ref={name}}}: "
            )
        };
        // Fleet provisioning: the subject fields are JITP's, declared or not.
        for (name, _) in SUBJECT {
            let undeclared = undeclared_refs(&[name]);
            let mut declared: Value = serde_json::from_str(&undeclared).unwrap();
            declared["Parameters"] = json!({name: {"Type": "String"}});
            for body in [undeclared, declared.to_string()] {
                let err = eval_with(&body, &[(name, "from-the-request")], FLEET).unwrap_err();
                assert_eq!(
                    err,
                    TemplateError::PseudoParameterUnavailable {
                        name: name.into(),
                        why: ONLY_IN_JITP
                    }
                );
                let text = err.to_string();
                assert!(text.starts_with(&prefix(name)), "{text}");
                assert!(
                    text.contains("filled in by just-in-time provisioning (JITP)"),
                    "{text}"
                );
                assert!(err.is_unresolved_reference());
                assert_eq!(
                    (err.error_code(), err.status_code()),
                    ("InvalidRequestException", 400)
                );
            }
        }
        // The RegisterThing API and bulk registration: none, not even the certificate ID.
        for name in [CERTIFICATE_ID, "AWS::IoT::Certificate::CommonName"] {
            let err = eval_with(&undeclared_refs(&[name]), &[], Flow::ControlPlane).unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with(&prefix(name)), "{text}");
            assert!(
                text.contains(
                    "the RegisterThing API and bulk registration fill in no pseudo-parameters"
                ),
                "{text}"
            );
        }
        let body = json!({"Resources": {"certificate": {"Type": "AWS::IoT::Certificate",
            "Properties": {"CertificateId": {"Ref": CERTIFICATE_ID}}}}});
        let err = eval_with(&body.to_string(), &[], Flow::ControlPlane).unwrap_err();
        assert!(
            matches!(err, TemplateError::PseudoParameterUnavailable { why, .. } if why == NONE_IN_CONTROL_PLANE)
        );
        // Names AWS does not document as template pseudo-parameters fail in every flow, even when
        // the certificate has such a field (Locality, subject alternative names and the other
        // `iot:Certificate.*` policy variables are not template parameters).
        let locality = "AWS::IoT::Certificate::Locality";
        let mut subject = SUBJECT.to_vec();
        subject.push((locality, "Seattle"));
        for name in [
            locality,
            "AWS::IoT::Certificate::SubjectAlternativeName",
            "AWS::IoT::Certificate::SubjectAlternativeName.DNSName",
            "AWS::Region",
            "AWS::AccountId",
        ] {
            for flow in [FLEET, Flow::Jitp(&subject), Flow::ControlPlane] {
                let err = eval_with(&undeclared_refs(&[name]), &[], flow).unwrap_err();
                assert_eq!(
                    err,
                    TemplateError::PseudoParameterUnavailable {
                        name: name.into(),
                        why: NOT_A_PSEUDO_PARAMETER
                    }
                );
                assert!(
                    err.to_string()
                        .contains("not a pseudo-parameter of provisioning templates"),
                    "{err}"
                );
            }
        }
        // `${...}` in Fn::Sub resolves the same way.
        let f = json!({"Fn::Sub": "x-${AWS::IoT::Certificate::CommonName}"});
        let err = config_value(f, &[]).unwrap_err();
        assert!(
            matches!(err, TemplateError::PseudoParameterUnavailable { why, .. } if why == ONLY_IN_JITP)
        );
        let body = json!({"Resources": {}, "DeviceConfiguration": {
            "o": {"Fn::Sub": "x-${AWS::IoT::Certificate::CommonName}"}}});
        let out = eval_with(&body.to_string(), &[], Flow::Jitp(&SUBJECT)).unwrap();
        assert_eq!(out.device_configuration["o"], "x-bulb-8");
    }

    #[test]
    fn template_size_limit_counts_characters() {
        let base = json!({"Resources": {}}).to_string();
        let padded = |n: usize| format!("{base}{}", " ".repeat(n - base.len()));
        assert!(Template::parse(&padded(MAX_TEMPLATE_CHARS)).is_ok());
        let err = Template::parse(&padded(MAX_TEMPLATE_CHARS + 1)).unwrap_err();
        assert_eq!(
            err,
            TemplateError::TooLong {
                chars: MAX_TEMPLATE_CHARS + 1
            }
        );
        assert_eq!(
            err.to_string(),
            "template body is 10241 characters long; the maximum is 10240"
        );
        // Characters, not bytes: 10,240 two-byte characters fit.
        let prefix = r#"{"Resources":{},"Description":""#;
        let fill = MAX_TEMPLATE_CHARS - prefix.len() - 2;
        let wide = format!("{prefix}{}\"}}", "é".repeat(fill));
        assert_eq!(wide.chars().count(), MAX_TEMPLATE_CHARS);
        assert!(Template::parse(&wide).is_ok());
    }

    #[test]
    fn invalid_json_and_non_objects_are_rejected() {
        let err = Template::parse("{\"Resources\": {}").unwrap_err();
        assert!(matches!(err, TemplateError::InvalidJson(_)), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("template body is not valid JSON: ")
        );
        let err = Template::parse("[]").unwrap_err();
        assert!(err.to_string().contains("must be a JSON object"), "{err}");
        let err = Template::parse("{}").unwrap_err();
        assert_eq!(err.to_string(), "template: missing section Resources");
    }

    #[test]
    fn unknown_sections_are_named() {
        for section in ["Conditions", "Outputs", "parameters"] {
            let err = parse_err(&json!({"Resources": {}, section: {}}));
            assert_eq!(err, TemplateError::UnknownSection(section.into()));
            assert!(err.to_string().contains(&format!("{section:?}")));
        }
        let body =
            json!({"AWSTemplateFormatVersion": "2010-09-09", "Description": "d", "Resources": {}});
        assert!(Template::parse(&body.to_string()).is_ok());
        let err = parse_err(&json!({"Description": 1, "Resources": {}}));
        assert_eq!(
            err.to_string(),
            "Description: expected a string, got a number"
        );
    }

    #[test]
    fn unknown_resource_types_and_keys_are_named() {
        let err = parse_err(
            &json!({"Resources": {"bucket": {"Type": "AWS::S3::Bucket", "Properties": {}}}}),
        );
        assert!(
            err.to_string()
                .starts_with("Resources.bucket: unknown resource Type \"AWS::S3::Bucket\"")
        );
        let err = parse_err(&json!({"Resources": {"thing": {"Type": "AWS::IoT::Thing",
            "Properties": {"ThingName": "t"}, "DependsOn": "x"}}}));
        assert!(
            err.to_string()
                .starts_with("Resources.thing: unknown key \"DependsOn\"")
        );
        let err = parse_err(&json!({"Resources": {"thing": {"Properties": {}}}}));
        assert_eq!(err.to_string(), "Resources.thing: missing Type");
        let err = parse_err(&json!({"Resources": {"thing": {"Type": "AWS::IoT::Thing"}}}));
        assert_eq!(err.to_string(), "Resources.thing: missing Properties");
    }

    #[test]
    fn unknown_properties_are_named() {
        let err = parse_err(&thing_template(
            json!({"ThingName": "t", "PackageVersions": {}}),
        ));
        assert_eq!(
            err.to_string(),
            "Resources.thing: unknown property \"PackageVersions\" for a resource of Type AWS::IoT::Thing"
        );
        let err = parse_err(&json!({"Resources": {"c": {"Type": "AWS::IoT::Certificate",
            "Properties": {"CertificateId": "x", "CertificateMode": "DEFAULT"}}}}));
        assert!(
            err.to_string()
                .contains("unknown property \"CertificateMode\""),
            "{err}"
        );
        let err = parse_err(&json!({"Resources": {"p": {"Type": "AWS::IoT::Policy",
            "Properties": {"PolicyName": "x", "Tags": []}}}}));
        assert!(
            err.to_string()
                .starts_with("Resources.p: unknown property \"Tags\""),
            "{err}"
        );
    }

    #[test]
    fn undocumented_functions_are_named() {
        for function in [
            "Fn::If",
            "Fn::GetAtt",
            "Fn::Base64",
            "Fn::Equals",
            "Fn:Join",
        ] {
            let err = parse_err(&thing_template(
                json!({"ThingName": {function: ["a", "b"]}}),
            ));
            assert_eq!(
                err,
                TemplateError::UnsupportedFunction {
                    at: format!("Resources.thing.Properties.ThingName.{function}"),
                    function: function.into()
                }
            );
            assert!(
                err.to_string()
                    .contains(&format!("function {function} is not supported"))
            );
        }
        // Also inside lists and DeviceConfiguration.
        let err = parse_err(&config_template(
            json!({"o": {"Fn::Join": ["", [{"Fn::GetAZs": ""}]]}}),
        ));
        assert!(
            err.to_string()
                .starts_with("DeviceConfiguration.o.Fn::Join[1][0].Fn::GetAZs:")
        );
        let err = parse_err(&thing_template(
            json!({"ThingName": {"Ref": "P", "Extra": 1}}),
        ));
        assert!(
            err.to_string()
                .contains("Ref must be the only key of its object"),
            "{err}"
        );
    }

    #[test]
    fn malformed_function_arguments_are_named() {
        let cases = [
            (
                json!({"Ref": ["P"]}),
                "Ref: expected a parameter name string",
            ),
            (
                json!({"Fn::Join": ["-"]}),
                "Fn::Join: expects a list of 2 arguments",
            ),
            (
                json!({"Fn::Join": ["-", "ab"]}),
                "Fn::Join[1]: expected a list, got a string",
            ),
            (
                json!({"Fn::Select": [0, "ab"]}),
                "Fn::Select[1]: expected a list",
            ),
            (
                json!({"Fn::Select": [[0], ["a"]]}),
                "Fn::Select[0]: expected an index",
            ),
            (
                json!({"Fn::Split": [",", ["a"]]}),
                "Fn::Split[1]: expected a string, got a list",
            ),
            (
                json!({"Fn::FindInMap": ["M", "top"]}),
                "Fn::FindInMap: expects a list of 3",
            ),
            (json!({"Fn::Sub": 5}), "Fn::Sub: expects a string or a list"),
            (
                json!({"Fn::Sub": ["${X}", {"X": ["a"]}]}),
                "Fn::Sub[1].X: expected a string",
            ),
        ];
        for (function, expected) in cases {
            let err = parse_err(&config_template(json!({"o": function})));
            assert!(
                err.to_string().contains(expected),
                "{err} (wanted {expected})"
            );
        }
    }

    #[test]
    fn parameters_must_be_strings() {
        let err = parse_err(&json!({"Parameters": {"N": {"Type": "Number"}}, "Resources": {}}));
        assert_eq!(
            err.to_string(),
            "Parameters.N.Type: the only parameter Type is \"String\", not \"Number\""
        );
        let err = parse_err(&json!({"Parameters": {"N": {"Default": "x"}}, "Resources": {}}));
        assert!(err.to_string().starts_with("Parameters.N: missing Type"));
        let err = parse_err(
            &json!({"Parameters": {"N": {"Type": "String", "Default": 3}}, "Resources": {}}),
        );
        assert_eq!(
            err.to_string(),
            "Parameters.N.Default: expected a string, got a number"
        );
        let err = parse_err(
            &json!({"Parameters": {"N": {"Type": "String", "AllowedValues": []}}, "Resources": {}}),
        );
        assert!(
            err.to_string()
                .starts_with("Parameters.N.AllowedValues: unknown parameter attribute")
        );
        let err = parse_err(&json!({"Parameters": {"N": "String"}, "Resources": {}}));
        assert_eq!(
            err.to_string(),
            "Parameters.N: expected an object, got a string"
        );
        let err = parse_err(&json!({"Parameters": [], "Resources": {}}));
        assert_eq!(
            err.to_string(),
            "Parameters: expected an object, got a list"
        );
    }

    #[test]
    fn mappings_hold_literals_only() {
        let err =
            parse_err(&json!({"Mappings": {"M": {"t": {"s": {"Ref": "P"}}}}, "Resources": {}}));
        assert_eq!(
            err.to_string(),
            "Mappings.M.t.s: intrinsic function Ref is not allowed in Mappings"
        );
        let err =
            parse_err(&json!({"Mappings": {"M": {"t": {"Fn::Join": ["", []]}}}, "Resources": {}}));
        assert!(
            err.to_string()
                .starts_with("Mappings.M.t: intrinsic function Fn::Join"),
            "{err}"
        );
        let err =
            parse_err(&json!({"Mappings": {"M": {"t": {"s": {"deeper": "x"}}}}, "Resources": {}}));
        assert!(
            err.to_string()
                .starts_with("Mappings.M.t.s: Mappings are two-level maps"),
            "{err}"
        );
        let err = parse_err(&json!({"Mappings": {"M": {"t": "flat"}}, "Resources": {}}));
        assert_eq!(
            err.to_string(),
            "Mappings.M.t: expected an object, got a string"
        );
        let err = parse_err(&json!({"Mappings": {"M": {"t": {"s": null}}}, "Resources": {}}));
        assert!(err.to_string().starts_with("Mappings.M.t.s:"), "{err}");
    }

    #[test]
    fn override_settings_are_validated() {
        let thing = |overrides: Value| {
            json!({"Resources": {"thing": {"Type": "AWS::IoT::Thing",
                "Properties": {"ThingName": "t"}, "OverrideSettings": overrides}}})
        };
        let err = parse_err(&thing(json!({"ThingTypeName": "MERGE"})));
        assert_eq!(
            err.to_string(),
            "Resources.thing.OverrideSettings.ThingTypeName: MERGE is valid only for a thing's AttributePayload and ThingGroups"
        );
        let err = parse_err(&thing(json!({"ThingGroups": "OVERWRITE"})));
        assert!(err.to_string().starts_with(
            "Resources.thing.OverrideSettings.ThingGroups: unknown override \"OVERWRITE\""
        ));
        let err = parse_err(&thing(json!({"Status": "REPLACE"})));
        assert!(
            err.to_string().contains("unknown override key \"Status\""),
            "{err}"
        );
        let err = parse_err(&thing(
            json!({"ThingGroups": "MERGE", "THING_GROUPS": "FAIL"}),
        ));
        assert!(
            err.to_string().contains("set the same override twice"),
            "{err}"
        );
        let err = parse_err(&thing(json!("MERGE")));
        assert_eq!(
            err.to_string(),
            "Resources.thing.OverrideSettings: expected an object, got a string"
        );
        // Upper-case spelling from the docs' prose.
        let t = Template::parse(
            &thing(json!({"ATTRIBUTE_PAYLOAD": "REPLACE", "THING_TYPE_NAME": "FAIL", "THING_GROUPS": "MERGE"}))
                .to_string(),
        )
        .unwrap();
        let out = t
            .evaluate(&EvalInput {
                parameters: &BTreeMap::new(),
                pseudo: PseudoParameters::Fleet {
                    certificate_id: CERT_ID,
                },
            })
            .unwrap();
        assert_eq!(
            out.things[0].overrides,
            ThingOverrides {
                attribute_payload: Override::Replace,
                thing_type_name: Override::Fail,
                thing_groups: Override::Merge
            }
        );
        let cert = |overrides: Value| {
            json!({"Resources": {"c": {"Type": "AWS::IoT::Certificate",
                "Properties": {"CertificateId": "abc"}, "OverrideSettings": overrides}}})
        };
        let err = parse_err(&cert(json!({"Status": "MERGE"})));
        assert!(
            err.to_string()
                .starts_with("Resources.c.OverrideSettings.Status: MERGE is valid only")
        );
        let out = eval(&cert(json!({"Status": "REPLACE"})), &[]).unwrap();
        assert_eq!(out.certificates[0].status_override, Override::Replace);
        let err = parse_err(&json!({"Resources": {"p": {"Type": "AWS::IoT::Policy",
            "Properties": {"PolicyName": "x"}, "OverrideSettings": {}}}}));
        assert_eq!(
            err.to_string(),
            "Resources.p.OverrideSettings: OverrideSettings are not available for policy resources"
        );
    }

    #[test]
    fn policy_needs_exactly_one_of_name_or_document() {
        let policy = |properties: Value| json!({"Resources": {"pol": {"Type": "AWS::IoT::Policy", "Properties": properties}}});
        let err = parse_err(&policy(json!({"PolicyName": "a", "PolicyDocument": {}})));
        assert_eq!(
            err.to_string(),
            "Resources.pol: a policy must have exactly one of PolicyName or PolicyDocument, but has both"
        );
        let err = parse_err(&policy(json!({})));
        assert!(err.to_string().ends_with("but has neither"), "{err}");
        let out = eval(&policy(json!({"PolicyName": "Existing_Policy"})), &[]).unwrap();
        assert_eq!(
            out.policies[0].source,
            PolicySource::Name("Existing_Policy".into())
        );
        let err = parse_err(&policy(json!({"PolicyName": "bad name"})));
        assert!(
            err.to_string().starts_with(
                "Resources.pol.Properties.PolicyName: invalid policy name \"bad name\""
            )
        );
    }

    #[test]
    fn policy_document_string_and_object_give_the_same_compact_text() {
        let document = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Action": ["iot:Connect"], "Resource": ["arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}"]}]});
        let policy = |doc: Value| json!({"Resources": {"pol": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": doc}}}});
        let from_object = eval(&policy(document.clone()), &[]).unwrap();
        let pretty = serde_json::to_string_pretty(&document).unwrap();
        let from_string = eval(&policy(Value::String(pretty)), &[]).unwrap();
        assert_eq!(from_object.policies, from_string.policies);
        assert_eq!(
            from_object.policies[0].source,
            PolicySource::Document(serde_json::to_string(&document).unwrap())
        );
        // Functions inside an object document are evaluated; a string document is taken as is.
        let with_ref = json!({"Resource": {"Fn::Sub": "arn:${P}"}});
        let body = json!({"Parameters": {"P": {"Type": "String"}}, "Resources": {"pol": {
            "Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": with_ref}}}});
        let out = eval(&body, &[("P", "x")]).unwrap();
        assert_eq!(
            out.policies[0].source,
            PolicySource::Document(r#"{"Resource":"arn:x"}"#.into())
        );
    }

    #[test]
    fn policy_document_must_be_a_json_object() {
        let policy = |doc: Value| {
            json!({"Parameters": {"P": {"Type": "String"}}, "Resources": {"pol": {"Type": "AWS::IoT::Policy",
                "Properties": {"PolicyDocument": doc}}}})
        };
        let err = parse_err(&policy(json!("{\"Version\": ")));
        assert!(
            err.to_string().starts_with(
                "Resources.pol.Properties.PolicyDocument: the policy document is not valid JSON:"
            ),
            "{err}"
        );
        let err = parse_err(&policy(json!("[1]")));
        assert!(
            err.to_string()
                .contains("must be a JSON object, not a list"),
            "{err}"
        );
        let err = parse_err(&policy(json!(["x"])));
        assert!(
            err.to_string()
                .contains("expected an object or a string of JSON, got a list")
        );
        // A document built at evaluation time is checked then.
        let err = eval(&policy(json!({"Ref": "P"})), &[("P", "not json")]).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "Resources.pol.Properties.PolicyDocument: the policy document is not valid JSON"
            ),
            "{err}"
        );
    }

    #[test]
    fn control_plane_templates_may_name_a_csr_or_pem_but_only_one() {
        let body = |props: serde_json::Value| {
            serde_json::json!({"Parameters": {"C": {"Type": "String"}}, "Resources": {
                "cert": {"Type": "AWS::IoT::Certificate", "Properties": props}}})
            .to_string()
        };
        let t = Template::parse_kind(
            &body(serde_json::json!({"CertificateSigningRequest": {"Ref": "C"}})),
            TemplateKind::ControlPlane,
        )
        .unwrap();
        let params = BTreeMap::from([("C".to_string(), "csr-text".to_string())]);
        let out = t
            .evaluate(&EvalInput {
                parameters: &params,
                pseudo: PseudoParameters::ControlPlane,
            })
            .unwrap();
        assert_eq!(
            out.certificates[0].certificate,
            CertificateRef::SigningRequest("csr-text".into())
        );
        let both = body(serde_json::json!({"CertificatePem": "a", "CertificateId": "b"}));
        let err = Template::parse_kind(&both, TemplateKind::ControlPlane).unwrap_err();
        assert!(err.to_string().contains("give only one of"), "{err}");
        assert!(Template::parse(&body(serde_json::json!({"CertificatePem": "a"}))).is_err());
    }

    #[test]
    fn certificate_must_use_certificate_id() {
        let cert = |properties: Value| json!({"Resources": {"cert": {"Type": "AWS::IoT::Certificate", "Properties": properties}}});
        let err = parse_err(&cert(json!({"Status": "ACTIVE"})));
        assert_eq!(
            err.to_string(),
            "Resources.cert: missing required property CertificateId"
        );
        for property in [
            "CertificatePem",
            "CertificateSigningRequest",
            "CACertificatePem",
        ] {
            let err = parse_err(&cert(json!({"CertificateId": "x", property: "pem"})));
            assert_eq!(
                err.to_string(),
                format!(
                    "Resources.cert: property {property} cannot be used; only CertificateId can be used with a fleet provisioning template"
                )
            );
        }
        let err = parse_err(&cert(json!({"CertificateId": ""})));
        assert!(
            err.to_string()
                .contains("invalid certificate ID \"\": must not be empty")
        );
    }

    #[test]
    fn certificate_status_is_case_insensitive() {
        let cert = |status: &str| {
            json!({"Resources": {"cert": {"Type": "AWS::IoT::Certificate",
                "Properties": {"CertificateId": "abc", "Status": status}}}})
        };
        for (text, status) in [
            ("ACTIVE", CertStatus::Active),
            ("Active", CertStatus::Active),
            ("inactive", CertStatus::Inactive),
            ("INACTIVE", CertStatus::Inactive),
        ] {
            assert_eq!(
                eval(&cert(text), &[]).unwrap().certificates[0].status,
                status
            );
        }
        let err = parse_err(&cert("PENDING_ACTIVATION"));
        assert!(err.to_string().starts_with(
            "Resources.cert.Properties.Status: invalid certificate status \"PENDING_ACTIVATION\""
        ));
        let no_status = json!({"Resources": {"cert": {"Type": "AWS::IoT::Certificate",
            "Properties": {"CertificateId": "abc"}}}});
        assert_eq!(
            eval(&no_status, &[]).unwrap().certificates[0].status,
            CertStatus::Active
        );
    }

    #[test]
    fn at_most_one_thing_and_one_certificate() {
        let thing = json!({"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "t"}});
        let err = parse_err(&json!({"Resources": {"a": thing.clone(), "b": thing}}));
        assert_eq!(
            err.to_string(),
            "Resources: at most one resource of Type AWS::IoT::Thing is allowed, but a and b are both of that Type"
        );
        let cert = json!({"Type": "AWS::IoT::Certificate", "Properties": {"CertificateId": "x"}});
        let err = parse_err(&json!({"Resources": {"c1": cert.clone(), "c2": cert}}));
        assert!(matches!(
            err,
            TemplateError::DuplicateResource {
                type_name: CERTIFICATE,
                ..
            }
        ));
        let policy =
            |name: &str| json!({"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": name}});
        let out = eval(
            &json!({"Resources": {"p2": policy("two"), "p1": policy("one")}}),
            &[],
        )
        .unwrap();
        let names: Vec<_> = out
            .policies
            .iter()
            .map(|p| p.logical_name.as_str())
            .collect();
        assert_eq!(names, ["p1", "p2"]);
    }

    #[test]
    fn thing_requires_a_valid_name() {
        let err = parse_err(&thing_template(json!({"AttributePayload": {}})));
        assert_eq!(
            err.to_string(),
            "Resources.thing: missing required property ThingName"
        );
        let err = parse_err(&thing_template(json!({"ThingName": "has space"})));
        assert_eq!(
            err.to_string(),
            "Resources.thing.Properties.ThingName: invalid thing name \"has space\": must be 1-128 characters of [a-zA-Z0-9:_-]"
        );
        // From a parameter, at evaluation time.
        let body = thing_template(json!({"ThingName": {"Ref": "P"}}));
        for bad in ["", "a/b", &"x".repeat(129)] {
            let err = eval(&body, &[("P", bad)]).unwrap_err();
            assert!(
                matches!(
                    err,
                    TemplateError::InvalidValue {
                        what: "thing name",
                        ..
                    }
                ),
                "{err:?}"
            );
            assert_eq!(err.error_code(), "InvalidRequestException");
        }
        assert_eq!(
            eval(&body, &[("P", &"x".repeat(128))]).unwrap().things[0]
                .thing_name
                .len(),
            128
        );
        let err = parse_err(&thing_template(
            json!({"ThingName": "t", "ThingGroups": ["ok", "not ok"]}),
        ));
        assert!(
            err.to_string().starts_with(
                "Resources.thing.Properties.ThingGroups[1]: invalid thing group name \"not ok\""
            ),
            "{err}"
        );
    }

    #[test]
    fn list_where_a_string_is_needed_names_the_property() {
        let body = thing_template(json!({"ThingName": {"Fn::Split": [",", {"Ref": "P"}]}}));
        let err = parse_err(&body);
        assert_eq!(
            err.to_string(),
            "Resources.thing.Properties.ThingName: expected a string, got a list"
        );
        // Only known once evaluated: Fn::Select of a list of lists.
        let body = thing_template(json!({"ThingName": "t",
            "AttributePayload": {"a": {"Fn::Select": [0, [["x"]]]}}}));
        let err = eval(&body, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Resources.thing.Properties.AttributePayload.a: expected a string, got a list"
        );
        let body = thing_template(json!({"ThingName": "t", "ThingGroups": "g"}));
        assert_eq!(
            parse_err(&body).to_string(),
            "Resources.thing.Properties.ThingGroups: expected a list, got a string"
        );
        let body = thing_template(json!({"ThingName": "t", "AttributePayload": {"n": 1}}));
        assert_eq!(
            parse_err(&body).to_string(),
            "Resources.thing.Properties.AttributePayload.n: expected a string, got a number"
        );
    }

    #[test]
    fn device_configuration_is_a_flat_map() {
        let out = eval(&config_template(json!({"s": "x", "n": 3, "b": true})), &[]).unwrap();
        assert_eq!(
            Value::Object(out.device_configuration),
            json!({"s": "x", "n": 3, "b": true})
        );
        let err = parse_err(&config_template(json!({"nested": {"a": "b"}})));
        assert!(
            err.to_string()
                .starts_with("DeviceConfiguration.nested: expected a string, number or boolean")
        );
        let err = config_value(json!({"Fn::FindInMap": ["M", "top", "list"]}), &[]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("DeviceConfiguration.out: expected a string, number or boolean")
        );
        let err = parse_err(&config_template(json!({"Ref": "P"})));
        assert!(err.to_string().contains("not a call to Ref"), "{err}");
    }

    #[test]
    fn deep_nesting_is_rejected_not_overflowed() {
        let mut deep = json!("x");
        for _ in 0..MAX_NESTING_DEPTH {
            deep = json!({"Fn::Join": ["", [deep]]});
        }
        let err = parse_err(&config_template(json!({"o": deep})));
        assert!(matches!(err, TemplateError::TooDeep { .. }), "{err:?}");
        assert!(err.to_string().contains("nested more than 32 levels deep"));
        // Deeper than serde_json's own limit: an error, not a stack overflow.
        let body = format!("{{\"Resources\":{}{}}}", "[".repeat(5000), "]".repeat(5000));
        assert!(matches!(
            Template::parse(&body),
            Err(TemplateError::InvalidJson(_))
        ));
    }

    #[test]
    fn amplifying_functions_are_bounded() {
        // Each level joins 64 copies of the previous one: 64^4 bytes without the budget.
        let mut expr = json!({"Ref": "P"});
        for _ in 0..4 {
            expr = json!({"Fn::Join": [expr, {"Fn::Split": [",", {"Ref": "Commas"}]}]});
        }
        let body = json!({"Parameters": {"P": {"Type": "String"}, "Commas": {"Type": "String"}},
            "Resources": {}, "DeviceConfiguration": {"o": expr}});
        let commas = ",".repeat(63);
        let err = eval(&body, &[("P", "0123456789"), ("Commas", &commas)]).unwrap_err();
        assert_eq!(err, TemplateError::OutputTooLarge);
        let f = json!({"Fn::Sub": ["${A}${A}${A}${A}${A}${A}${A}${A}", {"A": {"Ref": "P"}}]});
        let big = "x".repeat(200_000);
        assert_eq!(
            config_value(f, &[("P", &big)]).unwrap_err(),
            TemplateError::OutputTooLarge
        );
    }

    #[test]
    fn every_error_is_an_invalid_request() {
        let errors = [
            Template::parse("x").unwrap_err(),
            parse_err(&json!({"Conditions": {}, "Resources": {}})),
            config_value(json!({"Ref": "P"}), &[]).unwrap_err(),
            TemplateError::OutputTooLarge,
        ];
        for err in errors {
            assert_eq!(err.error_code(), "InvalidRequestException");
            assert_eq!(err.status_code(), 400);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Property tests
    // -----------------------------------------------------------------------------------------

    /// Words that steer random JSON towards the template grammar.
    const VOCABULARY: &[&str] = &[
        "Parameters",
        "Mappings",
        "Resources",
        "DeviceConfiguration",
        "Type",
        "Default",
        "String",
        "Properties",
        "OverrideSettings",
        "AWS::IoT::Thing",
        "AWS::IoT::Certificate",
        "AWS::IoT::Policy",
        "ThingName",
        "AttributePayload",
        "ThingGroups",
        "ThingTypeName",
        "BillingGroup",
        "CertificateId",
        "Status",
        "ACTIVE",
        "PolicyName",
        "PolicyDocument",
        "MERGE",
        "REPLACE",
        "Ref",
        "Fn::Join",
        "Fn::Select",
        "Fn::Split",
        "Fn::FindInMap",
        "Fn::Sub",
        "Fn::If",
        "P",
        "M",
        "k",
        "AWS::IoT::Certificate::Id",
        "${P}",
        "${",
        ",",
        "",
        "0",
        "1",
        "{}",
    ];

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => proptest::sample::select(VOCABULARY).prop_map(str::to_owned),
            1 => ".{0,6}",
        ]
    }

    fn arbitrary_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (0u64..4).prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            word().prop_map(Value::String),
        ];
        leaf.prop_recursive(8, 96, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(word(), inner.clone(), 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                (word(), inner).prop_map(|(k, v)| json!({ k: v })),
            ]
        })
    }

    /// Type-directed expressions: every function with arguments of roughly the right kind, so
    /// most templates parse and evaluation (success and failure) is what gets exercised.
    fn arbitrary_expr() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            3 => word().prop_map(Value::String),
            3 => prop_oneof![Just("P"), Just("k"), Just("Nope"), Just(CERTIFICATE_ID)]
                .prop_map(|n| json!({"Ref": n})),
            1 => "([a-z,]|\\$\\{P\\}|\\$\\{!x\\}){0,6}".prop_map(|s| json!({"Fn::Sub": s})),
        ];
        leaf.prop_recursive(6, 64, 4, |string| {
            let list = prop_oneof![
                prop::collection::vec(string.clone(), 0..4).prop_map(Value::Array),
                (string.clone(), string.clone()).prop_map(|(d, s)| json!({"Fn::Split": [d, s]})),
                Just(json!({"Fn::FindInMap": ["M", "k", "l"]})),
            ];
            let index = prop_oneof![(0u64..4).prop_map(Value::from), string.clone()];
            prop_oneof![
                (string.clone(), list.clone()).prop_map(|(d, l)| json!({"Fn::Join": [d, l]})),
                (index, list).prop_map(|(i, l)| json!({"Fn::Select": [i, l]})),
                (string.clone(), string.clone())
                    .prop_map(|(t, k)| json!({"Fn::FindInMap": ["M", t, k]})),
                (word(), string).prop_map(|(n, v)| json!({"Fn::Sub": ["${P}-${k}", {n: v}]})),
            ]
        })
    }

    fn no_panic(body: &str) {
        if let Ok(template) = Template::parse(body) {
            let names: Vec<String> = template.declared_parameters().map(str::to_owned).collect();
            for value in ["", "a,b", "0", "Seattle"] {
                let parameters = names
                    .iter()
                    .map(|n| (n.clone(), value.to_owned()))
                    .collect();
                let subject = names
                    .iter()
                    .map(|n| (n.clone(), value.to_owned()))
                    .collect();
                for pseudo in [
                    PseudoParameters::Fleet {
                        certificate_id: value,
                    },
                    PseudoParameters::Jitp {
                        certificate_id: value,
                        subject: &subject,
                    },
                    PseudoParameters::ControlPlane,
                ] {
                    let _ = template.evaluate(&EvalInput {
                        parameters: &parameters,
                        pseudo,
                    });
                }
            }
        }
    }

    #[test]
    fn fuzz_seeds_evaluate_in_every_flow() {
        // The fuzzer's seeds (run on nightly in CI) also run here, on every build.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/template");
        let mut parsed = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let body = std::fs::read_to_string(&path).unwrap();
            no_panic(&body);
            if Template::parse(&body).is_ok() {
                parsed.push(path.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
        parsed.sort();
        assert_eq!(
            parsed,
            [
                "docs-fleet-example.json",
                "functions.json",
                "greengrass-fleet.json",
                "jitp-undeclared-subject.json",
                "terraform-undeclared-certificate-id.json"
            ]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics_on_arbitrary_strings(body in ".{0,300}") {
            no_panic(&body);
        }

        #[test]
        fn never_panics_on_arbitrary_json(value in arbitrary_json()) {
            no_panic(&value.to_string());
        }

        #[test]
        fn never_panics_on_template_shaped_json(
            parameters in arbitrary_json(),
            mappings in arbitrary_json(),
            thing_name in arbitrary_json(),
            groups in arbitrary_json(),
            document in arbitrary_json(),
            config in arbitrary_json(),
        ) {
            let body = json!({
                "Parameters": parameters,
                "Mappings": mappings,
                "Resources": {
                    "thing": {"Type": "AWS::IoT::Thing",
                        "Properties": {"ThingName": thing_name, "ThingGroups": groups}},
                    "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": document}}
                },
                "DeviceConfiguration": {"k": config}
            });
            no_panic(&body.to_string());
            // Again with well-formed declarations, so evaluation runs more often.
            let body = json!({
                "Parameters": {"P": {"Type": "String"}, "k": {"Type": "String", "Default": "d"}},
                "Mappings": {"M": {"k": {"k": "v"}}},
                "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": thing_name}}},
                "DeviceConfiguration": {"k": config}
            });
            no_panic(&body.to_string());
        }

        #[test]
        fn generated_expressions_evaluate_totally_and_soundly(
            name in arbitrary_expr(),
            attribute in arbitrary_expr(),
            config in arbitrary_expr(),
            p in prop_oneof![Just("k".to_owned()), Just("a,b".to_owned()), ".{0,8}"],
        ) {
            let body = json!({
                "Parameters": {
                    "P": {"Type": "String"},
                    "k": {"Type": "String", "Default": "d"},
                    "AWS::IoT::Certificate::Id": {"Type": "String"}
                },
                "Mappings": {"M": {"k": {"k": "v", "l": ["a", "b"]}}},
                "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {
                    "ThingName": name, "AttributePayload": {"a": attribute}}}},
                "DeviceConfiguration": {"c": config}
            });
            let Ok(template) = Template::parse(&body.to_string()) else { return Ok(()) };
            let parameters = strings(&[("P", &p)]);
            let input = EvalInput {
                parameters: &parameters,
                pseudo: PseudoParameters::Fleet { certificate_id: "id" },
            };
            let first = template.evaluate(&input);
            prop_assert_eq!(&first, &template.evaluate(&input));
            match first {
                Ok(out) => {
                    prop_assert!(is_aws_name(&out.things[0].thing_name));
                    prop_assert!(out.device_configuration.values().all(|v| !v.is_array() && !v.is_object()));
                }
                Err(err) => {
                    prop_assert!(!err.to_string().is_empty());
                    prop_assert_eq!(err.error_code(), "InvalidRequestException");
                }
            }
        }

        #[test]
        fn join_of_split_round_trips(s in ".{0,200}", delimiter in ".{1,4}") {
            let f = json!({"Fn::Join": [delimiter.clone(), {"Fn::Split": [delimiter, {"Ref": "P"}]}]});
            prop_assert_eq!(config_value(f, &[("P", &s)]).unwrap(), Value::String(s));
        }

        #[test]
        fn sub_without_variables_is_identity(s in "([^$]|\\$[^{]?|[${}]){0,200}") {
            // Dropping the "{" of every "${" (each drop shortens s, so this ends) keeps the
            // lone "$" and "{" the generator is biased towards.
            let mut s = s;
            while let Some(i) = s.find("${") {
                s.remove(i + 1);
            }
            let out = config_value(json!({"Fn::Sub": s.clone()}), &[]).unwrap();
            prop_assert_eq!(out, Value::String(s));
        }
    }
}
