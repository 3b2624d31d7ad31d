//! Simulated energy meters: one Modbus TCP server per meter (tokio-modbus's server half, real
//! frames over loopback), unit 1, answering Read Device Identification (0x2B/0x0E) and holding
//! register reads whose values move with time. The register layout is [`PROFILE`], the device
//! profile the demo's gateway is configured with.

use std::future::Ready;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio_modbus::prelude::{
    ConformityLevel, DeviceIdObject, ExceptionCode, ReadCode, ReadDeviceIdentificationResponse,
    Request, Response, SlaveRequest,
};
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_util::sync::CancellationToken;

/// The meters' vendor, which the demo profile matches.
pub const VENDOR: &str = "Demo Meters";
pub const PRODUCT_CODE: &str = "DM-3";
/// The Modbus unit id each meter answers as.
pub const UNIT: u8 = 1;

/// The device profile (TOML, `[[modbus.profiles]]`) describing the meters' registers: voltage
/// (0.1 V), current (0.01 A), power (float32, W) and energy (uint32, Wh).
pub const PROFILE: &str = r#"
[[modbus.profiles]]
name = "meter"
template = "ChildTemplate"
match = { vendor = "Demo Meters" }

[[modbus.profiles.points]]
name = "voltage"
function = "holding"
address = 0
data_type = "uint16"
scale = 0.1
unit = "V"

[[modbus.profiles.points]]
name = "current"
function = "holding"
address = 1
data_type = "uint16"
scale = 0.01
unit = "A"

[[modbus.profiles.points]]
name = "power"
function = "holding"
address = 2
data_type = "float32"
unit = "W"

[[modbus.profiles.points]]
name = "energy"
function = "holding"
address = 4
data_type = "uint32"
unit = "Wh"
"#;

/// One meter's state: its serial number and the moment its readings started.
#[derive(Debug)]
pub struct Meter {
    pub serial: String,
    index: usize,
    started: Instant,
}

impl Meter {
    pub fn new(index: usize) -> Meter {
        Meter {
            serial: format!("DM-{}", 1001 + index),
            index,
            started: Instant::now(),
        }
    }

    /// The six holding registers at `secs` seconds after start: voltage around 230 V, current
    /// around 4-6 A, power = U·I·0.95, energy accumulating from a per-meter starting value.
    pub fn registers_at(&self, secs: f64) -> [u16; 6] {
        let phase = self.index as f64;
        let volts = 230.0 + 3.0 * (secs / 7.0 + phase).sin();
        let amps = 5.0 + 1.5 * (secs / 11.0 + 2.0 * phase).sin();
        let watts = (volts * amps * 0.95) as f32;
        let energy = 12_000 * (self.index as u32 + 1) + (secs * 1_100.0 / 3_600.0) as u32;
        let p = watts.to_bits();
        [
            (volts * 10.0).round() as u16,
            (amps * 100.0).round() as u16,
            (p >> 16) as u16,
            p as u16,
            (energy >> 16) as u16,
            energy as u16,
        ]
    }

    fn registers(&self) -> [u16; 6] {
        self.registers_at(self.started.elapsed().as_secs_f64())
    }

    fn objects(&self) -> [(u8, String); 4] {
        [
            (0x00, VENDOR.to_owned()),
            (0x01, PRODUCT_CODE.to_owned()),
            (0x02, "1.0".to_owned()),
            (0x80, self.serial.clone()),
        ]
    }

    /// Answers one request as a meter does: reads of its registers and its identification;
    /// anything else is refused with a Modbus exception.
    pub fn answer(&self, req: &Request<'_>) -> Result<Response, ExceptionCode> {
        match req {
            Request::ReadHoldingRegisters(addr, count) => {
                let regs = self.registers();
                let (a, n) = (*addr as usize, *count as usize);
                if n == 0 || a + n > regs.len() {
                    return Err(ExceptionCode::IllegalDataAddress);
                }
                Ok(Response::ReadHoldingRegisters(regs[a..a + n].to_vec()))
            }
            Request::ReadDeviceIdentification(code, first) => {
                let objects = self.objects();
                let wanted: Vec<DeviceIdObject> = objects
                    .iter()
                    .filter(|(id, _)| match code {
                        ReadCode::Basic => *id <= 0x02 && *id >= *first,
                        ReadCode::Regular => *id <= 0x7F && *id >= *first,
                        ReadCode::Extended => *id >= *first,
                        ReadCode::Specific => *id == *first,
                    })
                    .map(|(id, v)| DeviceIdObject {
                        id: *id,
                        value: Bytes::from(v.clone().into_bytes()),
                    })
                    .collect();
                if wanted.is_empty() {
                    return Err(ExceptionCode::IllegalDataAddress);
                }
                Ok(Response::ReadDeviceIdentification(
                    ReadDeviceIdentificationResponse {
                        read_code: *code,
                        conformity_level: ConformityLevel::ExtendedIdentification,
                        more_follows: false,
                        next_object_id: 0,
                        device_id_objects: wanted,
                    },
                ))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }
}

/// The Modbus service of one meter: unit [`UNIT`] answers, other unit ids get Gateway Target
/// Device Failed To Respond, as behind a Modbus gateway.
struct Service(Arc<Meter>);

impl tokio_modbus::server::Service for Service {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        std::future::ready(if req.slave == UNIT {
            self.0.answer(&req.request)
        } else {
            Err(ExceptionCode::GatewayTargetDevice)
        })
    }
}

/// Binds `127.0.0.1:0` and serves `meter` until `cancel`; returns the bound address and the
/// server's task, which ends (closing the listener and every connection) after `cancel`.
pub async fn serve(
    meter: Arc<Meter>,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = Server::new(listener);
    let task = tokio::spawn(async move {
        let on_connected = |stream, peer| {
            let meter = meter.clone();
            async move { accept_tcp_connection(stream, peer, |_| Ok(Some(Service(meter.clone())))) }
        };
        let on_error = |error| tracing::debug!(%error, "demo meter: connection ended");
        // Dropping the server on cancel also ends its connections.
        if let Err(error) = server
            .serve_until(&on_connected, on_error, cancel.cancelled_owned())
            .await
        {
            tracing::warn!(%error, "demo meter stopped");
        }
    });
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn readings_are_plausible_and_move() {
        let m = Meter::new(0);
        let a = m.registers_at(0.0);
        let b = m.registers_at(10.0);
        let volts = a[0] as f64 / 10.0;
        assert!((220.0..240.0).contains(&volts), "{volts}");
        let power = f32::from_bits(((a[2] as u32) << 16) | a[3] as u32);
        assert!((800.0..1600.0).contains(&power), "{power}");
        assert_ne!(a, b);
        let energy = |r: [u16; 6]| ((r[4] as u32) << 16) | r[5] as u32;
        assert!(energy(b) > energy(a));
    }
}
