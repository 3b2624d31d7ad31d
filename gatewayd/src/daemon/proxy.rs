//! The local fleet-provisioning endpoint's way to the cloud: an onboarding device's
//! CreateCertificateFromCsr / CreateKeysAndCertificate / RegisterThing request is made over the
//! gateway's own connection as its thing (the thing policy allows the child templates' topics),
//! one call at a time with the gateway's other fleet-provisioning calls, on the provisioning
//! lane. Nothing is kept here: the device holds its key and retries like against AWS.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::Value;

use crate::cloud::Cloud;
use crate::cloud::fleet::{FleetApi, FleetClient, FleetError, Rejection};
use crate::local::fleet::Proxy;

pub struct CloudProxy {
    pub cloud: Cloud,
    pub fleet: FleetClient,
    pub timeout: Duration,
    /// The gateway's thing name, once registered.
    pub thing_name: Box<dyn Fn() -> Option<String> + Send + Sync>,
}

/// A device onboarding through this gateway is this gateway's child: `ParentThing` is the
/// gateway's thing name whatever the device wrote (a device must not name another gateway), and
/// `FoundBy` says how it came, unless the device said.
fn child_parameters(mut payload: Value, parent: &str) -> Value {
    if let Some(obj) = payload.as_object_mut() {
        let params = obj
            .entry("parameters")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(p) = params.as_object_mut() {
            p.insert("ParentThing".into(), Value::String(parent.to_owned()));
            p.entry("FoundBy")
                .or_insert_with(|| Value::String("mqtt-onboarding".into()));
        }
    }
    payload
}

fn unavailable(message: String) -> Rejection {
    Rejection {
        status_code: 503,
        error_code: "ServiceUnavailable".into(),
        error_message: message,
    }
}

impl Proxy for CloudProxy {
    fn call<'a>(
        &'a self,
        client: &'a str,
        api: FleetApi,
        payload: Value,
    ) -> Pin<Box<dyn Future<Output = Result<Value, Rejection>> + Send + 'a>> {
        Box::pin(async move {
            let parent = (self.thing_name)().filter(|_| self.cloud.role() == Some("thing"));
            let Some(parent) = parent else {
                return Err(unavailable(
                    "the gateway is not connected to the cloud as its thing yet; try again later"
                        .into(),
                ));
            };
            let payload = match api {
                FleetApi::RegisterThing { .. } => child_parameters(payload, &parent),
                _ => payload,
            };
            tracing::info!(
                child = client,
                api = api.name(),
                "proxying a device's fleet-provisioning request to the cloud"
            );
            match self.fleet.call(&api, &payload, self.timeout, || {}).await {
                Ok(v) => Ok(v),
                Err(FleetError::Rejected { rejection, .. }) => Err(rejection),
                Err(e) => Err(unavailable(format!(
                    "the gateway's call to the cloud failed: {e}"
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_parent_is_always_this_gateway() {
        let p = child_parameters(
            json!({"certificateOwnershipToken": "t", "parameters": {"SerialNumber": "1", "ParentThing": "gw-other"}}),
            "gw-1",
        );
        assert_eq!(p["parameters"]["ParentThing"], "gw-1");
        assert_eq!(p["parameters"]["SerialNumber"], "1");
        assert_eq!(p["parameters"]["FoundBy"], "mqtt-onboarding");
        let p = child_parameters(json!({"certificateOwnershipToken": "t"}), "gw-1");
        assert_eq!(p["parameters"]["ParentThing"], "gw-1");
    }
}
