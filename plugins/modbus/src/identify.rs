//! Who a unit is: Read Device Identification (0x2B/0x0E) first, a profile's identity registers
//! for devices that answer it with an exception. Read-only function codes only.

use std::collections::BTreeMap;

use gatewayd_plugin::{Identity, IdentitySource, PluginError};
use tokio_modbus::{Request, Response, prelude::ReadCode};

use crate::config::ModbusConfig;
use crate::decode::Raw;
use crate::line::Line;

/// A device whose object stream does not end after this many requests is misbehaving.
const MAX_ROUNDS: usize = 16;

/// Exceptions that say "this unit is here but has no 0x2B/0x0E (at this level)".
fn lacks_identification(e: &PluginError) -> bool {
    matches!(e, PluginError::Exception { code: 1..=3, .. })
}

/// Reads every object of one read code, following `more_follows` / `next_object_id`.
async fn stream(
    line: &Line,
    unit: u8,
    code: ReadCode,
) -> Result<BTreeMap<u8, Vec<u8>>, PluginError> {
    let mut objects = BTreeMap::new();
    let mut next = 0u8;
    for _ in 0..MAX_ROUNDS {
        let r = match line
            .request(unit, Request::ReadDeviceIdentification(code, next))
            .await?
        {
            Response::ReadDeviceIdentification(r) => r,
            other => {
                return Err(PluginError::Malformed(format!(
                    "unexpected reply {other:?}"
                )));
            }
        };
        for o in r.device_id_objects {
            objects.insert(o.id, o.value.to_vec());
        }
        if !r.more_follows {
            return Ok(objects);
        }
        if r.next_object_id <= next {
            return Err(PluginError::Malformed(format!(
                "device identification: next object id {:#04x} does not advance past {next:#04x}",
                r.next_object_id
            )));
        }
        next = r.next_object_id;
    }
    Err(PluginError::Malformed(format!(
        "device identification: more than {MAX_ROUNDS} requests"
    )))
}

/// All objects the unit gives: extended, else regular, else basic.
pub async fn read_objects(
    line: &Line,
    unit: u8,
    serial_object: u8,
) -> Result<BTreeMap<u8, Vec<u8>>, PluginError> {
    let mut result = Err(PluginError::Malformed("no read code tried".into()));
    for code in [ReadCode::Extended, ReadCode::Regular, ReadCode::Basic] {
        result = stream(line, unit, code).await;
        match &result {
            // 2 or 3: not this level, maybe a lower one. 1 (Illegal Function): no 0x2B at all.
            Err(PluginError::Exception { code: 2 | 3, .. }) if code != ReadCode::Basic => continue,
            _ => break,
        }
    }
    let mut objects = result?;
    if !objects.contains_key(&serial_object) {
        // Some devices give extended objects only by individual access.
        match line
            .request(
                unit,
                Request::ReadDeviceIdentification(ReadCode::Specific, serial_object),
            )
            .await
        {
            Ok(Response::ReadDeviceIdentification(r)) => {
                for o in r.device_id_objects {
                    objects.insert(o.id, o.value.to_vec());
                }
            }
            Ok(_) | Err(PluginError::Exception { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(objects)
}

fn text(bytes: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(bytes)
        .trim_matches(['\0', ' '])
        .to_string();
    (!s.is_empty()).then_some(s)
}

/// Maps 0x2B/0x0E objects to an identity: 0 vendor, 1 product code, 2 revision, 3 vendor URL,
/// 4 product name, 5 model name, 6 user application name, `serial_object` the serial.
pub fn identity_from_objects(objects: &BTreeMap<u8, Vec<u8>>, serial_object: u8) -> Identity {
    let mut id = Identity::unidentified();
    id.source = IdentitySource::DeviceIdentification;
    for (k, v) in objects {
        let Some(v) = text(v) else { continue };
        match *k {
            0 => id.vendor = Some(v),
            1 => id.product_code = Some(v),
            2 => id.revision = Some(v),
            3 => id.vendor_url = Some(v),
            4 => id.product_name = Some(v),
            5 => id.model = Some(v),
            6 => {
                id.extra.insert("user_application_name".into(), v);
            }
            k if k == serial_object => id.serial = Some(v),
            k => {
                id.extra.insert(format!("object_{k:#04x}"), v);
            }
        }
    }
    id
}

/// Identifies one unit. An error means no device answered sensibly at this address.
pub async fn identify(
    line: &Line,
    unit: u8,
    config: &ModbusConfig,
) -> Result<Identity, PluginError> {
    let serial_object = config.serial_object_id;
    match read_objects(line, unit, serial_object).await {
        Ok(objects) if objects.values().any(|v| text(v).is_some()) => {
            Ok(identity_from_objects(&objects, serial_object))
        }
        Ok(_) => from_profiles(line, unit, config).await,
        Err(e) if lacks_identification(&e) => from_profiles(line, unit, config).await,
        Err(e) => Err(e),
    }
}

/// Tries each profile's identity registers in config order; the first that reads a serial wins.
async fn from_profiles(
    line: &Line,
    unit: u8,
    config: &ModbusConfig,
) -> Result<Identity, PluginError> {
    for profile in &config.profiles {
        let Some(regs) = &profile.identity else {
            continue;
        };
        match crate::read_raw(line, unit, &regs.serial).await {
            Ok(raw) => {
                let serial = match raw {
                    Raw::Text(t) => t,
                    Raw::Int(i) => i.to_string(),
                    Raw::Float(f) => f.to_string(),
                    Raw::Bool(b) => b.to_string(),
                };
                if serial.is_empty() {
                    continue;
                }
                let mut id = Identity::unidentified();
                id.vendor = regs.vendor.clone();
                id.product_code = regs.product_code.clone();
                id.model = regs.model.clone();
                id.serial = Some(serial);
                id.source = IdentitySource::ProfileRegisters {
                    profile: profile.name.clone(),
                };
                return Ok(id);
            }
            // The line failed: no other profile can do better now.
            Err(e) if !matches!(e, PluginError::Exception { .. } | PluginError::Malformed(_)) => {
                return Err(e);
            }
            Err(_) => continue,
        }
    }
    // It answers, but nothing says who it is: reported so an operator can add a profile.
    Ok(Identity::unidentified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_map_to_fields() {
        let objects: BTreeMap<u8, Vec<u8>> = [
            (0, b"Acme".to_vec()),
            (1, b"AM-1".to_vec()),
            (2, b"1.2".to_vec()),
            (5, b"Meter 9".to_vec()),
            (0x80, b"SN-7 ".to_vec()),
            (0x81, b"2026".to_vec()),
            (3, Vec::new()),
        ]
        .into();
        let id = identity_from_objects(&objects, 0x80);
        assert_eq!(id.vendor.as_deref(), Some("Acme"));
        assert_eq!(id.model.as_deref(), Some("Meter 9"));
        assert_eq!(id.serial.as_deref(), Some("SN-7"));
        assert_eq!(id.vendor_url, None);
        assert_eq!(
            id.extra.get("object_0x81").map(String::as_str),
            Some("2026")
        );
    }
}
