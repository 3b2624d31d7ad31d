//! The Modbus plugin over RTU: a socat pseudo-terminal pair with the pymodbus 3.16.1 serial
//! server on one end and the plugin on the other.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Sim, ascii_words};
use gatewayd_modbus::config::{Parity, RtuLine};
use gatewayd_modbus::line::{Endpoint, Line, Stats};
use gatewayd_modbus::{ModbusConfig, ModbusPlugin};
use gatewayd_plugin::compliance::{self, Target};
use gatewayd_plugin::{DeviceId, IdentitySource, Plugin, PluginError, Value, WriteCommand};
use serde_json::json;
use tokio_modbus::{Request, Response};

const TIMEOUT_MS: u64 = 300;
const SLOW_ADDRESS: u16 = 20;
const SLOW_SECONDS: f64 = 1.0;
/// Longer than the slow unit's lateness (1.0 s − 0.3 s) with a wide margin.
const SLOW_MS_PAST_TIMEOUT: u64 = 700;
const SETTLE_MS: u64 = SLOW_MS_PAST_TIMEOUT + 800;

fn spec() -> serde_json::Value {
    let mut holding = vec![0u16; 32];
    holding[0] = 1234;
    holding[1] = 10;
    holding[SLOW_ADDRESS as usize] = 4242;
    let mut legacy = ascii_words("RTU-9", 4);
    legacy.push(7);
    json!({
        "1": {
            "holding": holding,
            "identity": {"0": "Acme Instruments", "1": "AM-RTU", "2": "1.0", "128": "SN-R1"},
            "slow": {"address": SLOW_ADDRESS, "seconds": SLOW_SECONDS}
        },
        "2": {"holding": legacy, "identity": null},
        "3": {"silent": true}
    })
}

fn config(device: &str) -> ModbusConfig {
    ModbusConfig::from_toml(&format!(
        r#"
request_timeout_ms = {TIMEOUT_MS}
delay_between_requests_ms = 10

[[rtu]]
device = "{device}"
baud = 19200
parity = "none"
unit_ids = ["1-4"]
settle_after_timeout_ms = {SETTLE_MS}

[[profiles]]
name = "acme-rtu"
template = "ModbusMeter"
match = {{ vendor = "Acme*" }}

[[profiles.points]]
name = "power"
function = "holding"
address = 0
data_type = "uint16"
unit = "W"

[[profiles.points]]
name = "setpoint"
function = "holding"
address = 1
data_type = "int16"
writable = true
min = -100
max = 100

[[profiles]]
name = "legacy"
template = "ModbusLegacy"

[profiles.identity]
vendor = "Oldco"
serial = {{ function = "holding", address = 0, data_type = "string", count = 4 }}

[[profiles.points]]
name = "level"
function = "holding"
address = 4
data_type = "uint16"
"#
    ))
    .expect("valid config")
}

fn dev(path: &str, unit: u8) -> DeviceId {
    DeviceId(format!("modbus+rtu://{path}/{unit}"))
}

#[tokio::test]
async fn rtu_discover_identify_poll_and_compliance() {
    let sim = Sim::rtu(spec()).await;
    let path = sim.serial.clone().expect("pty");
    let plugin = ModbusPlugin::new(config(&path)).expect("plugin");

    let t0 = Instant::now();
    let found = plugin.discover().await.expect("discover");
    let took = t0.elapsed();
    println!(
        "RTU discover took {took:?}: {found:?}; stats {:?}",
        plugin.stats()
    );
    let ids: Vec<_> = found.iter().map(|d| d.id.clone()).collect();
    assert_eq!(ids, [dev(&path, 1), dev(&path, 2)]);
    assert_eq!(found[0].identity.serial.as_deref(), Some("SN-R1"));
    assert_eq!(
        found[0].identity.source,
        IdentitySource::DeviceIdentification
    );
    assert_eq!(found[1].identity.serial.as_deref(), Some("RTU-9"));
    assert_eq!(
        found[1].identity.source,
        IdentitySource::ProfileRegisters {
            profile: "legacy".into()
        }
    );
    assert!(took < Duration::from_secs(5), "{took:?}");

    let t = plugin.poll(&dev(&path, 2)).await.expect("poll legacy");
    assert_eq!(t.readings[0].value, Ok(Value::Int(7)));

    compliance::check(
        &plugin,
        &Target {
            device: dev(&path, 1),
            absent: dev(&path, 3),
            refused_writes: vec![
                WriteCommand {
                    point: "power".into(),
                    value: Value::Int(1),
                },
                WriteCommand {
                    point: "setpoint".into(),
                    value: Value::Int(101),
                },
            ],
            valid_write: Some(WriteCommand {
                point: "setpoint".into(),
                value: Value::Int(-5),
            }),
            bound: Duration::from_secs(10),
        },
    )
    .await;
}

fn rtu_line(path: String, stats: Arc<Stats>) -> Line {
    Line::new(
        Endpoint::Rtu(RtuLine {
            device: path,
            baud: 19200,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
            unit_ids: None,
            settle_after_timeout_ms: SETTLE_MS,
        }),
        vec![1],
        1,
        Duration::ZERO,
        Duration::from_millis(TIMEOUT_MS),
        stats,
    )
}

/// RTU has no transaction id: without the reopen and flush, the late answer to a timed-out
/// request would be taken as the answer to the next one.
#[tokio::test]
async fn rtu_late_answer_does_not_desync_the_next_request() {
    let sim = Sim::rtu(spec()).await;
    let stats = Arc::new(Stats::default());
    let line = rtu_line(sim.serial.clone().expect("pty"), stats.clone());
    let first = line
        .request(1, Request::ReadHoldingRegisters(SLOW_ADDRESS, 1))
        .await;
    assert_eq!(
        first,
        Err(PluginError::Timeout {
            after_ms: TIMEOUT_MS
        })
    );
    tokio::time::sleep(Duration::from_secs_f64(SLOW_SECONDS + 0.5)).await;
    let next = line.request(1, Request::ReadHoldingRegisters(0, 1)).await;
    println!(
        "RTU: after a timeout, the next request got: {next:?}; stats {:?}",
        stats.snapshot()
    );
    assert_eq!(next, Ok(Response::ReadHoldingRegisters(vec![1234])));
}

/// The next request is asked for at once, before the late answer lands: the line settles first,
/// so neither it nor the one after reads the late answer.
#[tokio::test]
async fn rtu_request_right_after_a_timeout_is_not_answered_late() {
    let sim = Sim::rtu(spec()).await;
    let stats = Arc::new(Stats::default());
    let line = rtu_line(sim.serial.clone().expect("pty"), stats.clone());
    let first = line
        .request(1, Request::ReadHoldingRegisters(SLOW_ADDRESS, 1))
        .await;
    assert!(
        matches!(first, Err(PluginError::Timeout { .. })),
        "{first:?}"
    );
    let next = line.request(1, Request::ReadHoldingRegisters(0, 1)).await;
    // Whenever the late answer has landed by now, a request must not read it.
    tokio::time::sleep(Duration::from_secs_f64(SLOW_SECONDS + 0.5)).await;
    let third = line.request(1, Request::ReadHoldingRegisters(0, 1)).await;
    println!(
        "RTU: right after a timeout, the next requests got: {next:?}, then {third:?}; stats {:?}",
        stats.snapshot()
    );
    assert_eq!(next, Ok(Response::ReadHoldingRegisters(vec![1234])));
    assert_eq!(third, Ok(Response::ReadHoldingRegisters(vec![1234])));
    assert_eq!(stats.snapshot().reconnects, 1);
}
