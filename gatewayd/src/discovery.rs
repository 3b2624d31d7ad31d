//! Discovery: runs the device plugins' bounded scans and offers what they find to the children
//! provisioning queue (admission decides what happens next). Today one plugin, Modbus
//! (`plugins/modbus`): a scan at start, then every `[discovery] modbus_interval_secs`.
//!
//! A found device's child id is stable across scans and restarts, so the queue recognises it
//! (a known child keeps its state): `<profile or "modbus">-<serial>` when the device reports a
//! serial number, else `modbus-<address>` from where it answered (host, port, unit), with every
//! character AWS does not allow in a thing name replaced by `-`.
//!
//! Each offered child's device address and matched profile are kept (`telemetry::Bindings`, in
//! the store, not in the job: those fields go to RegisterThing), so polling and commands know
//! which device a child is, after a restart too.

use std::sync::Arc;
use std::time::Duration;

use gatewayd_plugin::{FoundDevice, Plugin};
use tokio_util::sync::CancellationToken;

use crate::children::provision::{FoundChild, Provisioner};
use crate::telemetry::{Bindings, DeviceBinding};

/// Keeps what AWS allows in a thing name (`[A-Za-z0-9_:-]`), replacing the rest.
fn clean(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out.trim_matches('-').chars().take(100).collect()
}

/// The child a found device becomes.
pub fn child(d: &FoundDevice) -> FoundChild {
    let serial = d.identity.serial.clone().filter(|s| !s.trim().is_empty());
    let id = match &serial {
        Some(s) => format!(
            "{}-{}",
            clean(d.profile.as_deref().unwrap_or("modbus")),
            clean(s)
        ),
        None => {
            let addr = d.id.0.split_once("://").map_or(d.id.0.as_str(), |x| x.1);
            format!("modbus-{}", clean(addr))
        }
    };
    FoundChild {
        id,
        serial,
        vendor: d.identity.vendor.clone(),
        model: d
            .identity
            .model
            .clone()
            .or_else(|| d.identity.product_code.clone()),
        found_by: "modbus".into(),
        template: d.template.clone(),
        parameters: d.parameters.clone(),
    }
}

/// Scans now and every `interval` until cancelled; each found device is offered, and which
/// device the child is recorded.
pub async fn run<P: Plugin>(
    plugin: Arc<P>,
    provisioner: Provisioner,
    bindings: Bindings,
    interval: Duration,
    cancel: CancellationToken,
) {
    loop {
        let scan = tokio::select! {
            _ = cancel.cancelled() => return,
            r = plugin.discover() => r,
        };
        match scan {
            Ok(found) => {
                tracing::info!(
                    plugin = plugin.name(),
                    found = found.len(),
                    "discovery scan done"
                );
                for d in &found {
                    let c = child(d);
                    let (p, id, device) = (provisioner.clone(), c.id.clone(), d.id.0.clone());
                    let binding = DeviceBinding {
                        plugin: plugin.name().to_owned(),
                        device: d.id.clone(),
                        profile: d.profile.clone(),
                    };
                    let (b, bind_id) = (bindings.clone(), id.clone());
                    let offered = tokio::task::spawn_blocking(move || {
                        let state = p.offer(c).map_err(|e| e.to_string())?;
                        let bound = b.bind(&bind_id, binding).map_err(|e| e.to_string());
                        Ok::<_, String>((state, bound))
                    });
                    match offered.await {
                        Ok(Ok((state, bound))) => {
                            tracing::debug!(child = %id, %device, state = state.label(), "found device offered");
                            match bound {
                                Ok(true) => {
                                    tracing::info!(child = %id, %device, profile = d.profile.as_deref().unwrap_or("-"), "child bound to its device")
                                }
                                Ok(false) => {}
                                Err(error) => {
                                    tracing::warn!(child = %id, %device, %error, "which device this child is was not saved; it is not polled until the next scan")
                                }
                            }
                        }
                        Ok(Err(error)) => {
                            tracing::warn!(child = %id, %device, %error, "found device not offered")
                        }
                        Err(_) => {}
                    }
                }
            }
            Err(error) => tracing::warn!(plugin = plugin.name(), %error, "discovery scan failed"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatewayd_plugin::{DeviceId, Identity};

    fn found(serial: Option<&str>, profile: Option<&str>) -> FoundDevice {
        let mut identity = Identity::unidentified();
        identity.serial = serial.map(str::to_owned);
        identity.product_code = Some("AM-3".into());
        FoundDevice {
            id: DeviceId("modbus+tcp://10.0.0.7:502/3".into()),
            identity,
            profile: profile.map(str::to_owned),
            template: None,
            parameters: Default::default(),
        }
    }

    #[test]
    fn child_ids_are_stable_and_valid_thing_names() {
        let c = child(&found(Some("SN 00/42"), Some("acme-meter")));
        assert_eq!(c.id, "acme-meter-SN-00-42");
        assert_eq!(c.model.as_deref(), Some("AM-3"));
        assert_eq!(c.found_by, "modbus");
        assert_eq!(child(&found(None, None)).id, "modbus-10-0-0-7-502-3");
        assert_eq!(child(&found(Some("  "), None)).id, "modbus-10-0-0-7-502-3");
        for c in [
            child(&found(Some("Ä/ß:x"), None)),
            child(&found(None, None)),
        ] {
            assert!(crate::identity::Subject::child(&c.id).is_ok(), "{}", c.id);
        }
    }
}
