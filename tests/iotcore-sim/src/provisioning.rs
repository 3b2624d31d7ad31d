//! The fleet-provisioning MQTT API: CreateKeysAndCertificate, CreateCertificateFromCsr and
//! RegisterThing, in JSON and CBOR, with ownership tokens and the pre-provisioning hook.
//!
//! Owns: turning one request (topic, payload, caller) into one reply (topic, payload) and the
//! registry changes behind it. Must not touch connections: the broker decides who receives the reply.

use crate::pki::{self, Ca};
use crate::registry::{self, CertStatus, Certificate, OwnershipToken, Registry, Store, StoreError};
use crate::template::{self, Template};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Cbor,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Api {
    CreateKeysAndCertificate,
    CreateCertificateFromCsr,
    RegisterThing { template: String },
}

/// Recognise a fleet-provisioning request topic.
pub fn parse_topic(topic: &str) -> Option<(Api, Format)> {
    let fmt = |s: &str| match s {
        "json" => Some(Format::Json),
        "cbor" => Some(Format::Cbor),
        _ => None,
    };
    let parts: Vec<&str> = topic.split('/').collect();
    match parts.as_slice() {
        ["$aws", "certificates", "create", f] => Some((Api::CreateKeysAndCertificate, fmt(f)?)),
        ["$aws", "certificates", "create-from-csr", f] => {
            Some((Api::CreateCertificateFromCsr, fmt(f)?))
        }
        ["$aws", "provisioning-templates", name, "provision", f] => Some((
            Api::RegisterThing {
                template: (*name).to_owned(),
            },
            fmt(f)?,
        )),
        _ => None,
    }
}

/// An error answered on `.../rejected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }
    fn bad(code: &str, message: impl Into<String>) -> Self {
        Self::new(400, code, message)
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(500, "InternalFailure", e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal(e)
    }
}

/// Who is asking: the connection's certificate and client id.
pub struct Caller<'a> {
    pub cert_id: &'a str,
    pub client_id: &'a str,
}

pub struct Reply {
    pub topic: String,
    pub payload: Vec<u8>,
}

pub struct Provisioner {
    pub store: Arc<Store>,
    pub ca: Ca,
    pub token_ttl: Duration,
    pub hook_timeout: Duration,
}

pub fn decode_payload(fmt: Format, payload: &[u8]) -> Result<Value, ApiError> {
    match fmt {
        Format::Json => serde_json::from_slice(payload)
            .map_err(|e| ApiError::bad("InvalidPayload", format!("Invalid JSON payload: {e}"))),
        Format::Cbor => ciborium::from_reader::<Value, _>(payload)
            .map_err(|e| ApiError::bad("InvalidPayload", format!("Invalid CBOR payload: {e}"))),
    }
}

pub fn encode_payload(fmt: Format, v: &Value) -> Vec<u8> {
    match fmt {
        Format::Json => serde_json::to_vec(v).unwrap_or_default(),
        Format::Cbor => {
            let mut out = Vec::new();
            // Serialising a serde_json::Value into a Vec cannot fail.
            let _ = ciborium::into_writer(v, &mut out);
            out
        }
    }
}

fn random_token() -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut b = [0u8; 96];
    rand::thread_rng().fill_bytes(&mut b);
    base64::engine::general_purpose::STANDARD.encode(b)
}

impl Api {
    /// The operation's name, as AWS's quota tables name it.
    pub fn name(&self) -> &'static str {
        match self {
            Api::CreateKeysAndCertificate => "CreateKeysAndCertificate",
            Api::CreateCertificateFromCsr => "CreateCertificateFromCsr",
            Api::RegisterThing { .. } => "RegisterThing",
        }
    }
}

/// The reply to a request: `.../accepted` with the answer, or `.../rejected` with AWS's error shape.
pub fn reply(fmt: Format, request_topic: &str, result: Result<Value, ApiError>) -> Reply {
    match result {
        Ok(v) => Reply {
            topic: format!("{request_topic}/accepted"),
            payload: encode_payload(fmt, &v),
        },
        Err(e) => {
            tracing::info!(topic = request_topic, status = e.status, code = %e.code, message = %e.message, "request rejected");
            Reply {
                topic: format!("{request_topic}/rejected"),
                payload: encode_payload(
                    fmt,
                    &json!({"statusCode": e.status, "errorCode": e.code, "errorMessage": e.message}),
                ),
            }
        }
    }
}

impl Provisioner {
    /// Handle one request published on `topic`; returns the reply to send to the caller.
    pub async fn handle(
        &self,
        api: &Api,
        fmt: Format,
        request_topic: &str,
        payload: &[u8],
        caller: &Caller<'_>,
    ) -> Reply {
        let result = match api {
            Api::CreateKeysAndCertificate => self.create_keys(fmt, payload, caller).await,
            Api::CreateCertificateFromCsr => self.create_from_csr(fmt, payload, caller).await,
            Api::RegisterThing { template } => {
                self.register_thing(template, fmt, payload, caller).await
            }
        };
        reply(fmt, request_topic, result)
    }

    async fn create_keys(
        &self,
        fmt: Format,
        payload: &[u8],
        caller: &Caller<'_>,
    ) -> Result<Value, ApiError> {
        // AWS documents an empty payload; the SDKs send `{}`. Both are accepted.
        if !payload.is_empty() {
            let v = decode_payload(fmt, payload)?;
            if !v.is_object() {
                return Err(ApiError::bad(
                    "InvalidPayload",
                    "CreateKeysAndCertificate payload must be empty or an object",
                ));
            }
        }
        let (key_pem, spki) = tokio::task::spawn_blocking(pki::generate_rsa_2048)
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?;
        let (id, pem, token) = self.issue(&spki, caller, "CreateKeysAndCertificate")?;
        Ok(json!({
            "certificateId": id,
            "certificatePem": pem,
            "privateKey": key_pem,
            "certificateOwnershipToken": token,
        }))
    }

    async fn create_from_csr(
        &self,
        fmt: Format,
        payload: &[u8],
        caller: &Caller<'_>,
    ) -> Result<Value, ApiError> {
        let v = decode_payload(fmt, payload)?;
        let csr = v
            .get("certificateSigningRequest")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ApiError::bad(
                    "InvalidPayload",
                    "certificateSigningRequest is missing or not a string",
                )
            })?;
        let checked =
            pki::check_csr(csr).map_err(|e| ApiError::bad("InvalidCsr", e.to_string()))?;
        let (id, pem, token) = self.issue(&checked.spki_der, caller, "CreateCertificateFromCsr")?;
        Ok(json!({
            "certificateId": id,
            "certificatePem": pem,
            "certificateOwnershipToken": token,
        }))
    }

    fn issue(
        &self,
        spki: &[u8],
        caller: &Caller<'_>,
        origin: &str,
    ) -> Result<(String, String, String), ApiError> {
        let der = self
            .ca
            .issue(spki, "AWS IoT Certificate", &[], false)
            .map_err(ApiError::internal)?;
        let id = pki::cert_id(&der);
        let pem = pki::pem_encode("CERTIFICATE", &der);
        let token = random_token();
        let now = registry::now_ms();
        let expires = now + self.token_ttl.as_millis() as u64;
        self.store.update(|r: &mut Registry| {
            r.certificates.insert(
                id.clone(),
                Certificate::new(&id, &pem, CertStatus::PendingActivation, origin),
            );
            r.tokens.insert(
                token.clone(),
                OwnershipToken {
                    certificate_id: id.clone(),
                    principal: caller.cert_id.to_owned(),
                    expires_ms: expires,
                },
            );
            Ok::<_, ApiError>(())
        })?;
        Ok((id, pem, token))
    }

    async fn register_thing(
        &self,
        template_name: &str,
        fmt: Format,
        payload: &[u8],
        caller: &Caller<'_>,
    ) -> Result<Value, ApiError> {
        let v = decode_payload(fmt, payload)?;
        let Some(obj) = v.as_object() else {
            return Err(ApiError::bad(
                "InvalidPayload",
                "RegisterThing payload must be an object",
            ));
        };
        let token = match obj.get("certificateOwnershipToken") {
            None | Some(Value::Null) => "",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(ApiError::bad(
                    "InvalidPayload",
                    "certificateOwnershipToken must be a string",
                ));
            }
        };
        let mut parameters = BTreeMap::new();
        match obj.get("parameters") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let Some(s) = v.as_str() else {
                        return Err(ApiError::bad(
                            "InvalidPayload",
                            format!("parameter {k} must be a string"),
                        ));
                    };
                    parameters.insert(k.clone(), s.to_owned());
                }
            }
            Some(_) => {
                return Err(ApiError::bad(
                    "InvalidPayload",
                    "parameters must be an object of strings",
                ));
            }
        }
        if token.is_empty() {
            return Err(ApiError::bad(
                "InvalidCertificateOwnershipToken",
                "Certificate ownership token cannot be empty.",
            ));
        }
        let (tok, tpl, cert_pem, expired) = self.store.read(|r| {
            let tok = r.tokens.get(token).cloned();
            let expired = r.expired_tokens.contains_key(token);
            let cert_pem = tok
                .as_ref()
                .and_then(|t| r.certificates.get(&t.certificate_id))
                .map(|c| c.certificate_pem.clone());
            (
                tok,
                r.templates.get(template_name).cloned(),
                cert_pem,
                expired,
            )
        })?;
        if expired {
            return Err(token_expired());
        }
        let tok = check_token(tok.as_ref(), caller)?;
        let tpl = tpl.ok_or_else(|| {
            ApiError::new(
                404,
                "ResourceNotFoundException",
                format!("Template {template_name} does not exist"),
            )
        })?;
        if !tpl.enabled {
            return Err(ApiError::bad(
                "InvalidRequestException",
                format!("Template {template_name} is not enabled"),
            ));
        }
        let body = tpl
            .default_body()
            .ok_or_else(|| ApiError::internal("template has no default version"))?;
        let parsed = Template::parse(body).map_err(|e| template_error(&e))?;
        if let Some(cmd) = &tpl.pre_provisioning_hook {
            let input = json!({
                "claimCertificateId": caller.cert_id,
                "certificateId": tok.certificate_id,
                "certificatePem": cert_pem.unwrap_or_default(),
                "templateArn": tpl.arn(),
                "clientId": caller.client_id,
                "parameters": parameters,
            });
            let overrides = run_hook(cmd, &input, self.hook_timeout)
                .await
                .map_err(|why| {
                    ApiError::new(
                        403,
                        "AccessDeniedException",
                        format!("Pre-provisioning hook denied the request: {why}"),
                    )
                })?;
            parameters.extend(overrides);
        }
        let evaluated = parsed
            .evaluate(&template::EvalInput {
                parameters: &parameters,
                pseudo: template::PseudoParameters::Fleet {
                    certificate_id: &tok.certificate_id,
                },
            })
            .map_err(|e| template_error(&e))?;
        let token_owned = token.to_owned();
        self.store.update(|r| {
            // Re-check under the lock: tokens are single-use.
            let t = r.tokens.get(&token_owned).cloned();
            let t = check_token(t.as_ref(), caller)?;
            let thing = apply_resources(r, &evaluated, &t.certificate_id)?;
            r.tokens.remove(&token_owned);
            Ok(json!({
                "deviceConfiguration": Value::Object(evaluated.device_configuration.clone()),
                "thingName": thing,
            }))
        })
    }
}

fn check_token(
    tok: Option<&OwnershipToken>,
    caller: &Caller<'_>,
) -> Result<OwnershipToken, ApiError> {
    let invalid = || {
        ApiError::bad(
            "InvalidCertificateOwnershipToken",
            "Certificate ownership token is invalid or has already been used.",
        )
    };
    let t = tok.ok_or_else(invalid)?;
    if t.expires_ms <= registry::now_ms() {
        return Err(token_expired());
    }
    if t.principal != caller.cert_id {
        return Err(ApiError::bad(
            "InvalidCertificateOwnershipToken",
            "Certificate ownership token was issued to a different principal.",
        ));
    }
    Ok(t.clone())
}

fn token_expired() -> ApiError {
    ApiError::bad(
        "InvalidCertificateOwnershipToken",
        "Certificate ownership token has expired.",
    )
}

fn template_error(e: &template::TemplateError) -> ApiError {
    ApiError::bad(e.error_code(), e.to_string())
}

/// Name AWS gives a policy created from a document alone: a hash of the document (40 hex digits).
pub fn policy_name_for_document(doc: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode_upper(&Sha256::digest(doc.as_bytes())[..20])
}

/// Create or update the thing, policies and certificate the evaluated template describes, as
/// RegisterThing does. Returns the thing name ("" when the template has no thing).
pub fn apply_resources(
    r: &mut Registry,
    ev: &template::Evaluated,
    cert_id: &str,
) -> Result<String, ApiError> {
    use template::Override;
    let conflict = |what: String| ApiError::new(409, "ResourceConflictsException", what);
    let missing = |what: String| ApiError::bad("ResourceRegistrationFailureException", what);
    let mut thing_name = String::new();
    for th in &ev.things {
        if let Some(tt) = &th.thing_type_name
            && !r.thing_types.contains(tt)
        {
            return Err(missing(format!("Thing type {tt} not found")));
        }
        for g in &th.thing_groups {
            if !r.thing_groups.contains(g) {
                return Err(missing(format!("Thing group {g} not found")));
            }
        }
        if let Some(bg) = &th.billing_group
            && !r.billing_groups.contains(bg)
        {
            return Err(missing(format!("Billing group {bg} not found")));
        }
        match r.things.get_mut(&th.thing_name) {
            None => {
                r.things.insert(
                    th.thing_name.clone(),
                    registry::Thing {
                        thing_name: th.thing_name.clone(),
                        thing_type_name: th.thing_type_name.clone(),
                        attributes: th.attributes.clone(),
                        thing_groups: th.thing_groups.clone(),
                        billing_group: th.billing_group.clone(),
                        principals: vec![],
                        version: 1,
                    },
                );
            }
            Some(existing) => {
                match th.overrides.attribute_payload {
                    Override::DoNothing => {}
                    Override::Replace => existing.attributes = th.attributes.clone(),
                    Override::Merge => existing.attributes.extend(th.attributes.clone()),
                    Override::Fail => {
                        if existing.attributes != th.attributes {
                            return Err(conflict(format!(
                                "Thing {} exists with a different AttributePayload",
                                th.thing_name
                            )));
                        }
                    }
                }
                match th.overrides.thing_type_name {
                    Override::Replace | Override::Merge => {
                        existing.thing_type_name = th.thing_type_name.clone()
                    }
                    Override::Fail if existing.thing_type_name != th.thing_type_name => {
                        return Err(conflict(format!(
                            "Thing {} exists with a different ThingTypeName",
                            th.thing_name
                        )));
                    }
                    _ => {}
                }
                match th.overrides.thing_groups {
                    Override::DoNothing => {}
                    Override::Replace => existing.thing_groups = th.thing_groups.clone(),
                    Override::Merge => {
                        for g in &th.thing_groups {
                            if !existing.thing_groups.contains(g) {
                                existing.thing_groups.push(g.clone());
                            }
                        }
                    }
                    Override::Fail => {
                        if existing.thing_groups != th.thing_groups {
                            return Err(conflict(format!(
                                "Thing {} exists with different ThingGroups",
                                th.thing_name
                            )));
                        }
                    }
                }
                if th.billing_group.is_some() {
                    existing.billing_group = th.billing_group.clone();
                }
                existing.version += 1;
            }
        }
        r.attach_thing(cert_id, &th.thing_name);
        thing_name = th.thing_name.clone();
    }
    for p in &ev.policies {
        let name = match &p.source {
            template::PolicySource::Name(n) => {
                if !r.policies.contains_key(n) {
                    return Err(missing(format!("Policy {n} not found")));
                }
                n.clone()
            }
            template::PolicySource::Document(doc) => {
                crate::policy::PolicyDocument::parse(doc).map_err(|e| {
                    ApiError::bad(
                        "InvalidRequestException",
                        format!("Policy resource {}: {e}", p.logical_name),
                    )
                })?;
                let name = policy_name_for_document(doc);
                r.policies
                    .entry(name.clone())
                    .or_insert_with(|| registry::Policy {
                        policy_name: name.clone(),
                        policy_document: doc.clone(),
                    });
                name
            }
        };
        r.attach_policy(cert_id, &name);
    }
    for c in &ev.certificates {
        // A control-plane template's CSR or PEM was turned into `cert_id` by the caller.
        if let template::CertificateRef::Id(id) = &c.certificate
            && id != cert_id
        {
            return Err(ApiError::bad(
                "InvalidRequestException",
                format!(
                    "Certificate resource {}: CertificateId {id} is not the certificate of the ownership token",
                    c.logical_name
                ),
            ));
        }
        if let Some(cert) = r.certificates.get_mut(cert_id) {
            cert.status = match c.status {
                template::CertStatus::Active => CertStatus::Active,
                template::CertStatus::Inactive => CertStatus::Inactive,
            };
        }
    }
    Ok(thing_name)
}

/// The control-plane RegisterThing API (single-thing provisioning, and each line of a bulk
/// registration): evaluate `body` with `parameters`, sign the template's CSR or register its PEM
/// certificate (or use an existing certificate by id), then create the resources.
/// Returns AWS's response: `{"certificatePem", "resourceArns": {logical name: ARN}}`.
pub fn register_thing_control_plane(
    store: &Store,
    ca: &Ca,
    body: &str,
    parameters: &BTreeMap<String, String>,
) -> Result<Value, ApiError> {
    use template::{CertificateRef, TemplateKind};
    let tpl =
        Template::parse_kind(body, TemplateKind::ControlPlane).map_err(|e| template_error(&e))?;
    let ev = tpl
        .evaluate(&template::EvalInput {
            parameters,
            pseudo: template::PseudoParameters::ControlPlane,
        })
        .map_err(|e| template_error(&e))?;
    let cert = ev.certificates.first().ok_or_else(|| {
        ApiError::bad(
            "InvalidRequestException",
            "the template has no AWS::IoT::Certificate resource",
        )
    })?;
    let (cert_id, pem, origin) = match &cert.certificate {
        CertificateRef::SigningRequest(csr) => {
            let checked = pki::check_csr(csr)
                .map_err(|e| ApiError::bad("InvalidRequestException", e.to_string()))?;
            let der = ca
                .issue(&checked.spki_der, "AWS IoT Certificate", &[], false)
                .map_err(ApiError::internal)?;
            (
                pki::cert_id(&der),
                pki::pem_encode("CERTIFICATE", &der),
                Some("RegisterThing (CSR)"),
            )
        }
        CertificateRef::Pem(text) => {
            let der = pki::pem_decode(text, "CERTIFICATE")
                .filter(|d| x509_parser::parse_x509_certificate(d).is_ok())
                .ok_or_else(|| {
                    ApiError::bad(
                        "InvalidRequestException",
                        format!(
                            "Certificate resource {}: CertificatePem is not a PEM certificate",
                            cert.logical_name
                        ),
                    )
                })?;
            (
                pki::cert_id(&der),
                text.clone(),
                Some("RegisterThing (PEM)"),
            )
        }
        CertificateRef::Id(id) => {
            let pem = store
                .read(|r| r.certificates.get(id).map(|c| c.certificate_pem.clone()))?
                .ok_or_else(|| {
                    ApiError::new(
                        404,
                        "ResourceNotFoundException",
                        format!("Certificate {id} does not exist"),
                    )
                })?;
            (id.clone(), pem, None)
        }
    };
    let arn = |kind: &str, name: &str| {
        format!(
            "arn:aws:iot:{}:{}:{kind}/{name}",
            registry::REGION,
            registry::ACCOUNT
        )
    };
    store.update(|r| {
        if let Some(origin) = origin
            && !r.certificates.contains_key(&cert_id)
        {
            r.certificates.insert(
                cert_id.clone(),
                Certificate::new(&cert_id, &pem, CertStatus::PendingActivation, origin),
            );
        }
        apply_resources(r, &ev, &cert_id)?;
        let mut arns = serde_json::Map::new();
        for t in &ev.things {
            arns.insert(t.logical_name.clone(), json!(arn("thing", &t.thing_name)));
        }
        arns.insert(cert.logical_name.clone(), json!(arn("cert", &cert_id)));
        for p in &ev.policies {
            let name = match &p.source {
                template::PolicySource::Name(n) => n.clone(),
                template::PolicySource::Document(d) => policy_name_for_document(d),
            };
            arns.insert(p.logical_name.clone(), json!(arn("policy", &name)));
        }
        Ok(json!({"certificatePem": pem, "resourceArns": arns}))
    })
}

/// Bulk registration (StartThingRegistrationTask): one JSON object of parameters per input line;
/// one result line per input line, in order. Returns (successes, failures).
pub fn bulk_register(
    store: &Store,
    ca: &Ca,
    body: &str,
    input: &str,
    out: &mut impl std::io::Write,
) -> std::io::Result<(usize, usize)> {
    /// AWS: each input line is at most 256 KiB.
    const MAX_LINE: usize = 256 * 1024;
    let (mut ok, mut failed) = (0, 0);
    for (i, line) in input.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_number = i + 1;
        let result = if line.len() > MAX_LINE {
            Err(ApiError::bad(
                "InvalidRequestException",
                "input line longer than 256 KiB",
            ))
        } else {
            match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(m)) => {
                    let params: BTreeMap<String, String> = m
                        .into_iter()
                        .map(|(k, v)| match v {
                            Value::String(s) => (k, s),
                            other => (k, other.to_string()),
                        })
                        .collect();
                    register_thing_control_plane(store, ca, body, &params)
                }
                Ok(_) => Err(ApiError::bad(
                    "InvalidRequestException",
                    "input line is not a JSON object",
                )),
                Err(e) => Err(ApiError::bad(
                    "InvalidRequestException",
                    format!("input line is not JSON: {e}"),
                )),
            }
        };
        let record = match result {
            Ok(response) => {
                ok += 1;
                json!({"lineNumber": line_number, "response": response})
            }
            Err(e) => {
                failed += 1;
                json!({"lineNumber": line_number, "errorCode": e.code, "errorMessage": e.message})
            }
        };
        writeln!(out, "{record}")?;
    }
    Ok((ok, failed))
}

/// Run the pre-provisioning hook command: AWS hook input on stdin, answer on stdout.
/// Returns the parameter overrides when provisioning is allowed, else why not.
pub async fn run_hook(
    cmd: &str,
    input: &Value,
    timeout: Duration,
) -> Result<BTreeMap<String, String>, String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("hook could not start: {e}"))?;
    let input_bytes = serde_json::to_vec(input).unwrap_or_default();
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A hook that does not read its input is allowed.
            let _ = stdin.write_all(&input_bytes).await;
        }
        child.wait_with_output().await
    };
    let out = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| format!("hook did not answer within {} s", timeout.as_secs_f32()))?
        .map_err(|e| format!("hook failed: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "hook failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("hook answer is not JSON: {e}"))?;
    let allowed = match v.get("allowProvisioning") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => return Err("hook answer lacks a boolean allowProvisioning".into()),
    };
    if !allowed {
        return Err("allowProvisioning is false".into());
    }
    let mut overrides = BTreeMap::new();
    if let Some(m) = v.get("parameterOverrides").and_then(Value::as_object) {
        for (k, val) in m {
            let s = match val {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            overrides.insert(k.clone(), s);
        }
    }
    Ok(overrides)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn topics() {
        assert_eq!(
            parse_topic("$aws/certificates/create/json"),
            Some((Api::CreateKeysAndCertificate, Format::Json))
        );
        assert_eq!(
            parse_topic("$aws/certificates/create-from-csr/cbor"),
            Some((Api::CreateCertificateFromCsr, Format::Cbor))
        );
        assert_eq!(
            parse_topic("$aws/provisioning-templates/T1/provision/json"),
            Some((
                Api::RegisterThing {
                    template: "T1".into()
                },
                Format::Json
            ))
        );
        assert_eq!(parse_topic("$aws/certificates/create/xml"), None);
        assert_eq!(parse_topic("$aws/certificates/create/json/accepted"), None);
    }

    #[test]
    fn cbor_and_json_payloads_decode_alike() {
        let v = json!({"certificateSigningRequest": "x", "n": 1});
        let c = encode_payload(Format::Cbor, &v);
        assert_eq!(decode_payload(Format::Cbor, &c).unwrap(), v);
        let e = decode_payload(Format::Cbor, b"\xff\xff").unwrap_err();
        assert_eq!(e.code, "InvalidPayload");
        assert!(
            decode_payload(Format::Json, b"{")
                .unwrap_err()
                .message
                .contains("Invalid JSON")
        );
    }

    #[tokio::test]
    async fn hook_answers() {
        let input = json!({"parameters": {}});
        let t = Duration::from_secs(5);
        let ok = run_hook(
            r#"cat >/dev/null; echo '{"allowProvisioning": true, "parameterOverrides": {"A": "1"}}'"#,
            &input,
            t,
        )
        .await
        .unwrap();
        assert_eq!(ok.get("A").map(String::as_str), Some("1"));
        let denied = run_hook(r#"echo '{"allowProvisioning": false}'"#, &input, t)
            .await
            .unwrap_err();
        assert!(denied.contains("allowProvisioning is false"), "{denied}");
        let failed = run_hook("echo boom >&2; exit 3", &input, t)
            .await
            .unwrap_err();
        assert!(failed.contains("boom"), "{failed}");
        let slow = run_hook("sleep 5", &input, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(slow.contains("did not answer"), "{slow}");
        let garbage = run_hook("echo nope", &input, t).await.unwrap_err();
        assert!(garbage.contains("not JSON"), "{garbage}");
    }
}
