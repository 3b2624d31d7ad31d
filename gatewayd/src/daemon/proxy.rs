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
            if self.cloud.role() != Some("thing") {
                return Err(unavailable(
                    "the gateway is not connected to the cloud as its thing yet; try again later"
                        .into(),
                ));
            }
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
