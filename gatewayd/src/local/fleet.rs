//! The local fleet-provisioning endpoint: AWS's fleet-provisioning topic API
//! (`$aws/certificates/create-from-csr/<fmt>`, `$aws/certificates/create/<fmt>`,
//! `$aws/provisioning-templates/<name>/provision/<fmt>`, JSON and CBOR) served to onboarding
//! clients, so that an unmodified AWS SDK fleet-provisioning client pointed at the gateway gets
//! its own thing and certificate. The calls themselves go to the cloud over the gateway's
//! connection through a [`Proxy`] the daemon supplies (this module does not touch the cloud).
//!
//! Pure parts here: which topics are requests, which filters are their answers, payload
//! decoding and encoding. The session (`conn.rs`) answers on `<request>/accepted` or
//! `<request>/rejected` to the requesting client only, as AWS does.

use std::future::Future;
use std::pin::Pin;

use serde_json::{Value, json};

use crate::cloud::fleet::{FleetApi, Rejection};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Cbor,
}

/// A request topic, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub api: FleetApi,
    pub format: Format,
    /// The topic the request came on; answers go to `<topic>/accepted|rejected`.
    pub topic: String,
}

/// What the daemon plugs in: makes the call in the cloud for `client` (an onboarding client).
pub trait Proxy: Send + Sync {
    fn call<'a>(
        &'a self,
        client: &'a str,
        api: FleetApi,
        payload: Value,
    ) -> Pin<Box<dyn Future<Output = Result<Value, Rejection>> + Send + 'a>>;
}

fn format(s: &str) -> Option<Format> {
    match s {
        "json" => Some(Format::Json),
        "cbor" => Some(Format::Cbor),
        _ => None,
    }
}

/// The fleet-provisioning request `topic` names, if it is one.
pub fn parse_request(topic: &str) -> Option<Request> {
    let parts: Vec<&str> = topic.split('/').collect();
    let (api, fmt) = match parts.as_slice() {
        ["$aws", "certificates", "create-from-csr", f] => (FleetApi::CreateCertificateFromCsr, f),
        ["$aws", "certificates", "create", f] => (FleetApi::CreateKeysAndCertificate, f),
        ["$aws", "provisioning-templates", name, "provision", f] if valid_template(name) => (
            FleetApi::RegisterThing {
                template: (*name).to_owned(),
            },
            f,
        ),
        _ => return None,
    };
    Some(Request {
        api,
        format: format(fmt)?,
        topic: topic.to_owned(),
    })
}

/// AWS's template name rule: 1–36 of `[0-9A-Za-z_-]`.
fn valid_template(name: &str) -> bool {
    (1..=36).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Whether an onboarding client may subscribe to `filter`: the answer topics of a request
/// topic (`/accepted`, `/rejected`, or `/+` for both).
pub fn is_answer_filter(filter: &str) -> bool {
    let Some((request, last)) = filter.rsplit_once('/') else {
        return false;
    };
    matches!(last, "accepted" | "rejected" | "+") && parse_request(request).is_some()
}

/// The request payload as JSON, or the rejection AWS gives a payload it cannot read.
pub fn decode(format: Format, payload: &[u8]) -> Result<Value, Rejection> {
    let v: Result<Value, String> = match format {
        Format::Json => serde_json::from_slice(payload).map_err(|e| e.to_string()),
        Format::Cbor => ciborium::from_reader(payload).map_err(|e| e.to_string()),
    };
    match v {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(invalid("the payload is not an object")),
        Err(e) => Err(invalid(&format!("the payload cannot be read: {e}"))),
    }
}

fn invalid(message: &str) -> Rejection {
    Rejection {
        status_code: 400,
        error_code: "InvalidPayload".into(),
        error_message: message.into(),
    }
}

/// An answer payload in the request's format.
pub fn encode(format: Format, v: &Value) -> Vec<u8> {
    match format {
        Format::Json => serde_json::to_vec(v).unwrap_or_default(),
        Format::Cbor => {
            let mut out = Vec::new();
            // Writing a serde_json::Value into a Vec cannot fail.
            let _ = ciborium::into_writer(v, &mut out);
            out
        }
    }
}

/// The `/rejected` payload.
pub fn rejection_payload(r: &Rejection) -> Value {
    json!({
        "statusCode": r.status_code,
        "errorCode": r.error_code,
        "errorMessage": r.error_message,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn request_topics_and_answer_filters() {
        let r = parse_request("$aws/certificates/create-from-csr/cbor").unwrap();
        assert_eq!(
            (r.api, r.format),
            (FleetApi::CreateCertificateFromCsr, Format::Cbor)
        );
        let r = parse_request("$aws/provisioning-templates/Child_1/provision/json").unwrap();
        assert_eq!(
            r.api,
            FleetApi::RegisterThing {
                template: "Child_1".into()
            }
        );
        for bad in [
            "$aws/certificates/create/xml",
            "$aws/provisioning-templates/a b/provision/json",
            "$aws/provisioning-templates/+/provision/json",
            "$aws/things/x/shadow/update",
            "dt/c1/x",
        ] {
            assert!(parse_request(bad).is_none(), "{bad}");
        }
        assert!(is_answer_filter("$aws/certificates/create/json/accepted"));
        assert!(is_answer_filter(
            "$aws/provisioning-templates/T/provision/cbor/+"
        ));
        assert!(!is_answer_filter("$aws/certificates/create/json/#"));
        assert!(!is_answer_filter("$aws/certificates/+/json/accepted"));
        assert!(!is_answer_filter("$aws/certificates/create/json"));
    }

    #[test]
    fn payloads_in_both_formats() {
        let v = json!({"csr": "x", "n": 1});
        for f in [Format::Json, Format::Cbor] {
            assert_eq!(decode(f, &encode(f, &v)).unwrap(), v);
        }
        assert_eq!(
            decode(Format::Json, b"[1]").unwrap_err().error_code,
            "InvalidPayload"
        );
        assert_eq!(decode(Format::Cbor, b"\xff").unwrap_err().status_code, 400);
    }
}
