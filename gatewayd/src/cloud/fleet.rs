//! Fleet: the AWS IoT fleet-provisioning MQTT call helper (JSON encoding).
//!
//! One call = route + subscribe to `<request>/accepted` and `/rejected`, wait for the SUBACK,
//! publish the request at QoS 1, wait for its PUBACK and for one answer, under one timeout. The
//! API carries no correlation id, so at most one call runs per connection (the uplink's call
//! lock). This module knows the topics and payload shapes, never what is done with the answers:
//! the same helper serves the gateway's own identity and, later, its children.

use std::time::Duration;

use rumqttc::{QoS, SubscribeReasonCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cloud::{Cloud, Keep, Lane, UplinkError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetApi {
    CreateKeysAndCertificate,
    CreateCertificateFromCsr,
    RegisterThing { template: String },
}

impl FleetApi {
    pub fn name(&self) -> &'static str {
        match self {
            FleetApi::CreateKeysAndCertificate => "CreateKeysAndCertificate",
            FleetApi::CreateCertificateFromCsr => "CreateCertificateFromCsr",
            FleetApi::RegisterThing { .. } => "RegisterThing",
        }
    }

    pub fn request_topic(&self) -> String {
        match self {
            FleetApi::CreateKeysAndCertificate => "$aws/certificates/create/json".into(),
            FleetApi::CreateCertificateFromCsr => "$aws/certificates/create-from-csr/json".into(),
            FleetApi::RegisterThing { template } => {
                format!("$aws/provisioning-templates/{template}/provision/json")
            }
        }
    }
}

/// The `/rejected` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejection {
    #[serde(default)]
    pub status_code: u16,
    #[serde(default)]
    pub error_code: String,
    #[serde(default)]
    pub error_message: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FleetError {
    #[error("{api} rejected: {} {}: {}", .rejection.status_code, .rejection.error_code, .rejection.error_message)]
    Rejected {
        api: &'static str,
        rejection: Rejection,
    },
    #[error("{api}: no {step} within {timeout:?}")]
    Timeout {
        api: &'static str,
        step: &'static str,
        timeout: Duration,
    },
    #[error("{api}: subscription to {topic} refused by the broker (policy does not allow it)")]
    SubscribeDenied { api: &'static str, topic: String },
    #[error("{api}: {source}")]
    Uplink {
        api: &'static str,
        source: UplinkError,
    },
    #[error("{api}: malformed answer: {message}")]
    BadAnswer { api: &'static str, message: String },
}

impl FleetError {
    pub fn is_transient(&self) -> bool {
        match self {
            FleetError::Rejected { rejection, .. } => rejection.is_transient(),
            FleetError::Timeout { .. } => true,
            FleetError::Uplink { source, .. } => source.is_transient(),
            FleetError::SubscribeDenied { .. } | FleetError::BadAnswer { .. } => false,
        }
    }

    pub fn error_code(&self) -> Option<&str> {
        match self {
            FleetError::Rejected { rejection, .. } => Some(&rejection.error_code),
            _ => None,
        }
    }
}

impl Rejection {
    /// Throttling and service-side failures are worth retrying; everything else (bad token,
    /// access denied, unknown template, invalid CSR) needs an operator or a new attempt.
    pub fn is_transient(&self) -> bool {
        let code = self.error_code.to_ascii_lowercase();
        self.status_code == 429
            || self.status_code >= 500
            || code.contains("throttl")
            || code.contains("serviceunavailable")
            || code.contains("internalfailure")
            || code.contains("internalerror")
    }
}

/// Fleet-provisioning calls over the shared cloud connection, one at a time.
#[derive(Debug, Clone)]
pub struct FleetClient {
    cloud: Cloud,
}

impl FleetClient {
    pub fn new(cloud: Cloud) -> FleetClient {
        FleetClient { cloud }
    }

    /// Runs one call. `after_sent` runs once the broker acknowledged the request (PUBACK), before
    /// the answer is awaited: the point from which the cloud may have acted on it.
    pub async fn call(
        &self,
        api: &FleetApi,
        payload: &Value,
        timeout: Duration,
        after_sent: impl FnOnce(),
    ) -> Result<Value, FleetError> {
        call(&self.cloud, api, payload, timeout, after_sent).await
    }
}

async fn call(
    uplink: &Cloud,
    api: &FleetApi,
    payload: &Value,
    timeout: Duration,
    after_sent: impl FnOnce(),
) -> Result<Value, FleetError> {
    let name = api.name();
    let _one_at_a_time = uplink.call_lock().await;
    let request = api.request_topic();
    let accepted = format!("{request}/accepted");
    let rejected = format!("{request}/rejected");
    let up = |source| FleetError::Uplink { api: name, source };
    let (_g1, mut acc_rx) = uplink.route(&accepted, 4).map_err(up)?;
    let (_g2, mut rej_rx) = uplink.route(&rejected, 4).map_err(up)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = |step| FleetError::Timeout {
        api: name,
        step,
        timeout,
    };

    let filters = vec![accepted.clone(), rejected.clone()];
    let codes = tokio::time::timeout_at(deadline, uplink.subscribe(&filters, Keep::Transient))
        .await
        .map_err(|_| timed_out("SUBACK"))?
        .map_err(up)?;
    for (topic, code) in filters.iter().zip(codes.iter()) {
        if matches!(code, SubscribeReasonCode::Failure) {
            return Err(FleetError::SubscribeDenied {
                api: name,
                topic: topic.clone(),
            });
        }
    }

    let body = serde_json::to_vec(payload).map_err(|e| FleetError::BadAnswer {
        api: name,
        message: e.to_string(),
    })?;
    tracing::debug!(api = name, topic = %request, "fleet-provisioning request");
    tokio::time::timeout_at(
        deadline,
        uplink.publish(Lane::Provisioning, &request, QoS::AtLeastOnce, body),
    )
    .await
    .map_err(|_| timed_out("PUBACK"))?
    .map_err(up)?;
    after_sent();

    let answer = tokio::time::timeout_at(deadline, async {
        tokio::select! {
            m = acc_rx.recv() => m.map(|p| (true, p)),
            m = rej_rx.recv() => m.map(|p| (false, p)),
        }
    })
    .await
    .map_err(|_| timed_out("answer"))?
    .ok_or(FleetError::Uplink {
        api: name,
        source: UplinkError::Closed,
    })?;

    // Best effort: leave no subscriptions behind (AWS allows 50 per connection).
    let _ = tokio::time::timeout(Duration::from_secs(2), uplink.unsubscribe(&filters)).await;

    let (ok, publish) = answer;
    let bad = |message: String| FleetError::BadAnswer { api: name, message };
    let value: Value = serde_json::from_slice(publish.payload()).map_err(|e| bad(e.to_string()))?;
    if ok {
        Ok(value)
    } else {
        let rejection: Rejection = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        Err(FleetError::Rejected {
            api: name,
            rejection,
        })
    }
}

/// Typed answers.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateAnswer {
    pub certificate_id: String,
    pub certificate_pem: String,
    pub certificate_ownership_token: String,
    /// Only CreateKeysAndCertificate sends a key.
    #[serde(default)]
    pub private_key: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterAnswer {
    #[serde(default)]
    pub thing_name: Option<String>,
    #[serde(default)]
    pub device_configuration: serde_json::Map<String, Value>,
}

pub fn parse<T: serde::de::DeserializeOwned>(api: &FleetApi, v: Value) -> Result<T, FleetError> {
    serde_json::from_value(v).map_err(|e| FleetError::BadAnswer {
        api: api.name(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn topics() {
        assert_eq!(
            FleetApi::RegisterThing {
                template: "T1".into()
            }
            .request_topic(),
            "$aws/provisioning-templates/T1/provision/json"
        );
        assert_eq!(
            FleetApi::CreateCertificateFromCsr.request_topic(),
            "$aws/certificates/create-from-csr/json"
        );
    }

    #[test]
    fn rejection_classes() {
        let r: Rejection = serde_json::from_str(
            r#"{"statusCode":400,"errorCode":"InvalidCertificateOwnershipToken","errorMessage":"x"}"#,
        )
        .unwrap();
        assert!(!r.is_transient());
        let t = Rejection {
            status_code: 429,
            error_code: "ThrottlingException".into(),
            error_message: String::new(),
        };
        assert!(t.is_transient());
        let e = FleetError::Rejected {
            api: "RegisterThing",
            rejection: r,
        };
        assert_eq!(
            e.to_string(),
            "RegisterThing rejected: 400 InvalidCertificateOwnershipToken: x"
        );
    }

    #[test]
    fn answers_parse() {
        let a: CertificateAnswer = parse(
            &FleetApi::CreateCertificateFromCsr,
            serde_json::json!({"certificateId":"ab","certificatePem":"P","certificateOwnershipToken":"t"}),
        )
        .unwrap();
        assert_eq!(a.private_key, None);
        let r: RegisterAnswer = parse(
            &FleetApi::RegisterThing {
                template: "T".into(),
            },
            serde_json::json!({"thingName":"gw-1","deviceConfiguration":{"k":"v"}}),
        )
        .unwrap();
        assert_eq!(r.thing_name.as_deref(), Some("gw-1"));
    }
}
