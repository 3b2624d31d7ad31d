//! Fleet: the AWS IoT fleet-provisioning MQTT call helper (JSON encoding).
//!
//! One call = route + subscribe to `<request>/accepted` and `/rejected`, wait for the SUBACK,
//! publish the request at QoS 1 on the provisioning lane, wait for its PUBACK and for one
//! answer, under one timeout; then unsubscribe, on every path (AWS allows 50 subscriptions per
//! connection, and a call that failed must not leave two behind). The API carries no
//! correlation id, so at most one call runs per connection (the handle's call lock), and the
//! unsubscribe is queued before the lock is released. This module owns that discipline and
//! knows the topics and payload shapes, never what is done with the answers: the same client
//! serves the gateway's own identity and its children.

use std::time::Duration;

use rumqttc::{QoS, SubscribeReasonCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::cloud::{Cloud, Delivery, Keep, Lane, UplinkError};

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
    /// The request was handed to the connection, which was lost before its PUBACK: the cloud
    /// may or may not have it.
    #[error("{api}: the connection was lost before the request was acknowledged ({source})")]
    Unacknowledged {
        api: &'static str,
        source: UplinkError,
    },
}

impl FleetError {
    pub fn is_transient(&self) -> bool {
        match self {
            FleetError::Rejected { rejection, .. } => rejection.is_transient(),
            FleetError::Timeout { .. } | FleetError::Unacknowledged { .. } => true,
            FleetError::Uplink { source, .. } => source.is_transient(),
            FleetError::SubscribeDenied { .. } | FleetError::BadAnswer { .. } => false,
        }
    }

    /// Whether the cloud may have received (and acted on) the request although no answer came:
    /// a PUBACK or answer that never arrived, or a connection lost after the request was sent.
    /// A rejection is an answer; failures before the publish (subscribe refused, not connected,
    /// invalid topic) never sent it.
    pub fn may_have_reached_the_cloud(&self) -> bool {
        matches!(
            self,
            FleetError::Timeout {
                step: "PUBACK" | "answer",
                ..
            } | FleetError::Unacknowledged { .. }
        )
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

/// How long a call waits for the UNSUBACKs of its answer topics after it is over.
pub const UNSUBSCRIBE_WAIT: Duration = Duration::from_secs(2);

impl FleetClient {
    pub fn new(cloud: Cloud) -> FleetClient {
        FleetClient { cloud }
    }

    /// Runs one call: one at a time per connection, under `timeout` (SUBACK, PUBACK and the
    /// answer), on the provisioning lane. `after_sent` runs once the broker acknowledged the
    /// request (PUBACK), before the answer is awaited: the point from which the cloud may have
    /// acted on it. Whatever the outcome (answer, rejection, refused subscription, timeout,
    /// lost connection, or the caller dropping the call), the answer topics are unsubscribed
    /// before the next call may start; that wait is bounded by `UNSUBSCRIBE_WAIT`.
    pub async fn call(
        &self,
        api: &FleetApi,
        payload: &Value,
        timeout: Duration,
        after_sent: impl FnOnce(),
    ) -> Result<Value, FleetError> {
        let name = api.name();
        let cloud = &self.cloud;
        let _one_at_a_time = cloud.call_lock().await;
        let request = api.request_topic();
        let accepted = format!("{request}/accepted");
        let rejected = format!("{request}/rejected");
        let up = |source| FleetError::Uplink { api: name, source };
        // Routes before the SUBSCRIBE, so an answer right after the SUBACK is not missed; they
        // outlive the UNSUBACK, so a late answer is still taken (and acknowledged).
        let (_accepted_route, mut acc_rx) = cloud.route(&accepted, 4).map_err(up)?;
        let (_rejected_route, mut rej_rx) = cloud.route(&rejected, 4).map_err(up)?;
        let filters = vec![accepted, rejected];
        // Dropped (if the call is dropped) before the call lock: the UNSUBSCRIBEs are queued
        // ahead of anything the next call sends.
        let subscription = Subscription {
            cloud,
            filters: &filters,
            armed: true,
        };
        let answer = exchange(
            cloud,
            api,
            &request,
            &filters,
            payload,
            timeout,
            after_sent,
            (&mut acc_rx, &mut rej_rx),
        )
        .await;
        subscription.release(name).await;
        answer
    }
}

/// The answer topics' subscription: released (UNSUBSCRIBE, UNSUBACK awaited, bounded) at the
/// end of every call; if the call is dropped instead, the UNSUBSCRIBEs are still queued.
struct Subscription<'a> {
    cloud: &'a Cloud,
    filters: &'a [String],
    armed: bool,
}

impl Subscription<'_> {
    async fn release(mut self, api: &'static str) {
        self.armed = false;
        match tokio::time::timeout(UNSUBSCRIBE_WAIT, self.cloud.unsubscribe(self.filters)).await {
            Ok(Ok(())) => {}
            // Not connected: a clean session is gone with its subscriptions; a resumed one
            // gets the UNSUBSCRIBE after its CONNACK (the subscription record owes it).
            Ok(Err(error)) => {
                tracing::debug!(api, %error, "answer topics not unsubscribed now; owed to a resumed session");
            }
            Err(_) => {
                tracing::warn!(
                    api,
                    wait_ms = UNSUBSCRIBE_WAIT.as_millis() as u64,
                    "no UNSUBACK for the answer topics; owed to a resumed session"
                );
            }
        }
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.cloud.unsubscribe_now(self.filters);
        }
    }
}

type Answers<'a> = (
    &'a mut mpsc::Receiver<Delivery>,
    &'a mut mpsc::Receiver<Delivery>,
);

/// Subscribe, publish, await one answer, all before `timeout`.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    cloud: &Cloud,
    api: &FleetApi,
    request: &str,
    filters: &[String],
    payload: &Value,
    timeout: Duration,
    after_sent: impl FnOnce(),
    (acc_rx, rej_rx): Answers<'_>,
) -> Result<Value, FleetError> {
    let name = api.name();
    let up = |source| FleetError::Uplink { api: name, source };
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = |step| FleetError::Timeout {
        api: name,
        step,
        timeout,
    };

    let codes = tokio::time::timeout_at(deadline, cloud.subscribe(filters, Keep::Transient))
        .await
        .map_err(|_| timed_out("SUBACK"))?
        .map_err(up)?;
    for (i, topic) in filters.iter().enumerate() {
        if !matches!(codes.get(i), Some(SubscribeReasonCode::Success(_))) {
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
        cloud.publish(Lane::Provisioning, request, QoS::AtLeastOnce, body),
    )
    .await
    .map_err(|_| timed_out("PUBACK"))?
    .map_err(|source| match source {
        UplinkError::ConnectionLost => FleetError::Unacknowledged { api: name, source },
        source => up(source),
    })?;
    after_sent();

    let (ok, delivery) = tokio::time::timeout_at(deadline, async {
        tokio::select! {
            m = acc_rx.recv() => m.map(|d| (true, d)),
            m = rej_rx.recv() => m.map(|d| (false, d)),
        }
    })
    .await
    .map_err(|_| timed_out("answer"))?
    .ok_or(FleetError::Uplink {
        api: name,
        source: UplinkError::Closed,
    })?;

    let bad = |message: String| FleetError::BadAnswer { api: name, message };
    let value: Value =
        serde_json::from_slice(delivery.payload()).map_err(|e| bad(e.to_string()))?;
    delivery.ack();
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
