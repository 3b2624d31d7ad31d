//! The Modbus plugin against pymodbus 3.16.1 TCP simulators (real processes, kernel-chosen ports).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Sim, ascii_words};
use gatewayd_modbus::line::{Endpoint, Line, Stats};
use gatewayd_modbus::{ModbusConfig, ModbusPlugin};
use gatewayd_plugin::compliance::{self, Target};
use gatewayd_plugin::{DeviceId, IdentitySource, Plugin, PluginError, Value, WriteCommand};
use serde_json::json;
use tokio_modbus::{Request, Response};

/// Holding registers 40 answers after this long (the "slow then late" device).
const SLOW_ADDRESS: u16 = 40;
const SLOW_SECONDS: f64 = 1.0;
const TIMEOUT_MS: u64 = 300;

fn meter_holding(serial_tag: &str) -> Vec<u16> {
    let mut h = vec![0u16; 64];
    h[0] = 215; // voltage 21.5 V (scale 0.1)
    h[1] = 0x0002; // energy, low word first (word order little): 0x0001_0002
    h[2] = 0x0001;
    h[3] = 0x42F6; // temperature 123.456 (float32, big/big)
    h[4] = 0xE979;
    let tag = ascii_words(serial_tag, 2);
    h[5] = tag[0];
    h[6] = tag[1];
    h[7] = 50; // setpoint
    h[SLOW_ADDRESS as usize] = 4242;
    h
}

fn spec() -> serde_json::Value {
    let mut legacy = ascii_words("LEG-77", 4);
    legacy.push(9); // level
    json!({
        "1": {
            "holding": meter_holding("T1"),
            "coils": [true, false, false, false, false, false, false, false],
            "identity": {"0": "Acme Instruments", "1": "AM-100", "2": "2.1", "5": "AM-100 Meter", "128": "SN-0001"},
            "slow": {"address": SLOW_ADDRESS, "seconds": SLOW_SECONDS}
        },
        "2": {
            "holding": meter_holding("T2"),
            "identity": {"0": "Acme Instruments", "1": "AM-100", "2": "2.1", "128": "SN-0002"}
        },
        "3": {"holding": legacy, "identity": null},
        "4": {"silent": true}
    })
}

fn config(port: u16) -> ModbusConfig {
    ModbusConfig::from_toml(&format!(
        r#"
request_timeout_ms = {TIMEOUT_MS}
delay_between_requests_ms = 5
unit_ids = ["1-6"]

[[tcp]]
hosts = ["127.0.0.1"]
ports = [{port}]

[[profiles]]
name = "acme-meter"
template = "ModbusMeter"
match = {{ vendor = "Acme*", product_code = "AM-*" }}
parameters = {{ Kind = "meter" }}

[[profiles.points]]
name = "voltage"
function = "holding"
address = 0
data_type = "int16"
scale = 0.1
unit = "V"

[[profiles.points]]
name = "energy"
function = "holding"
address = 1
data_type = "uint32"
word_order = "little"
unit = "Wh"

[[profiles.points]]
name = "temperature"
function = "holding"
address = 3
data_type = "float32"

[[profiles.points]]
name = "tag"
function = "holding"
address = 5
data_type = "string"
count = 2

[[profiles.points]]
name = "setpoint"
function = "holding"
address = 7
data_type = "uint16"
writable = true
min = 0
max = 100

[[profiles.points]]
name = "running"
function = "coils"
address = 0
data_type = "bool"
writable = true

[[profiles.points]]
name = "missing"
function = "holding"
address = 1000
data_type = "uint16"
writable = true

[[profiles]]
name = "legacy"
template = "ModbusLegacy"

[profiles.identity]
vendor = "Oldco"
product_code = "L-1"
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

fn dev(port: u16, unit: u8) -> DeviceId {
    DeviceId(format!("modbus+tcp://127.0.0.1:{port}/{unit}"))
}

/// Several units on one simulator: with 0x2B/0x0E, without it (identity from profile
/// registers), one that never answers, two that do not exist. The scan finishes, bounded.
#[tokio::test]
async fn discover_finds_units_with_and_without_identification() {
    let sim = Sim::tcp(spec()).await;
    let plugin = ModbusPlugin::new(config(sim.port)).expect("plugin");
    let t0 = Instant::now();
    let found = plugin.discover().await.expect("discover");
    let took = t0.elapsed();
    let ids: Vec<_> = found.iter().map(|d| d.id.clone()).collect();
    println!(
        "discover took {took:?}, found {ids:?}, stats {:?}",
        plugin.stats()
    );
    assert_eq!(ids, [dev(sim.port, 1), dev(sim.port, 2), dev(sim.port, 3)]);

    let one = &found[0];
    assert_eq!(one.identity.source, IdentitySource::DeviceIdentification);
    assert_eq!(one.identity.vendor.as_deref(), Some("Acme Instruments"));
    assert_eq!(one.identity.product_code.as_deref(), Some("AM-100"));
    assert_eq!(one.identity.revision.as_deref(), Some("2.1"));
    assert_eq!(one.identity.model.as_deref(), Some("AM-100 Meter"));
    assert_eq!(one.identity.serial.as_deref(), Some("SN-0001"));
    assert_eq!(one.profile.as_deref(), Some("acme-meter"));
    assert_eq!(one.template.as_deref(), Some("ModbusMeter"));
    assert_eq!(
        one.parameters.get("Kind").map(String::as_str),
        Some("meter")
    );
    assert_eq!(found[1].identity.serial.as_deref(), Some("SN-0002"));

    let legacy = &found[2];
    assert_eq!(
        legacy.identity.source,
        IdentitySource::ProfileRegisters {
            profile: "legacy".into()
        }
    );
    assert_eq!(legacy.identity.serial.as_deref(), Some("LEG-77"));
    assert_eq!(legacy.identity.vendor.as_deref(), Some("Oldco"));
    assert_eq!(legacy.template.as_deref(), Some("ModbusLegacy"));

    // One silent unit costs one timeout; nothing else waits.
    assert_eq!(plugin.stats().timeouts, 1, "{:?}", plugin.stats());
    assert!(took < Duration::from_secs(5), "scan took {took:?}");
}

/// A line where nothing answers: every configured unit costs one timeout plus the delay, and
/// the scan returns with nothing found.
#[tokio::test]
async fn scan_of_silent_units_is_bounded() {
    let sim =
        Sim::tcp(json!({"1": {"silent": true}, "2": {"silent": true}, "3": {"silent": true}}))
            .await;
    let mut cfg = config(sim.port);
    cfg.unit_ids = vec![gatewayd_modbus::config::UnitRange { first: 1, last: 3 }];
    let plugin = ModbusPlugin::new(cfg).expect("plugin");
    let t0 = Instant::now();
    let found = plugin.discover().await.expect("discover");
    let took = t0.elapsed();
    println!("silent scan took {took:?}, stats {:?}", plugin.stats());
    assert!(found.is_empty());
    assert_eq!(plugin.stats().timeouts, 3);
    // 3 × 300 ms of timeouts; bounded well under a few seconds.
    assert!(took >= Duration::from_millis(3 * TIMEOUT_MS), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

/// A line that refuses connections is skipped after its first unit: one connect attempt, not
/// one per configured unit id.
#[tokio::test]
async fn scan_skips_a_line_that_refuses_connections() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let plugin = ModbusPlugin::new(config(port)).expect("plugin");
    let found = plugin.discover().await.expect("discover");
    assert!(found.is_empty());
    let stats = plugin.stats();
    println!("refused line: {stats:?}");
    assert_eq!(stats.requests, 0, "no request is sent on a refused line");
    assert_eq!(
        stats.connects, 1,
        "one connect attempt, not one per unit id"
    );
}

#[tokio::test]
async fn poll_decodes_the_map_and_reports_exceptions_per_point() {
    let sim = Sim::tcp(spec()).await;
    let plugin = ModbusPlugin::new(config(sim.port)).expect("plugin");
    let t = plugin.poll(&dev(sim.port, 1)).await.expect("poll");
    println!("{}", serde_json::to_string(&t).expect("json"));
    let get = |name: &str| {
        t.readings
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .value
            .clone()
    };
    match get("voltage") {
        Ok(Value::Float(v)) => assert!((v - 21.5).abs() < 1e-9, "{v}"),
        other => panic!("voltage {other:?}"),
    }
    assert_eq!(get("energy"), Ok(Value::Int(0x0001_0002)));
    assert_eq!(get("temperature"), Ok(Value::Float(f64::from(123.456f32))));
    assert_eq!(get("tag"), Ok(Value::Text("T1".into())));
    assert_eq!(get("setpoint"), Ok(Value::Int(50)));
    assert_eq!(get("running"), Ok(Value::Bool(true)));
    // An address the device does not have: its exception, as a value.
    match get("missing") {
        Err(PluginError::Exception { code: 2, name }) => assert_eq!(name, "IllegalDataAddress"),
        other => panic!("missing {other:?}"),
    }
    assert!(t.timestamp_ms > 1_700_000_000_000);

    // The legacy unit polls by the profile its identity registers matched.
    let t = plugin.poll(&dev(sim.port, 3)).await.expect("poll legacy");
    assert_eq!(t.readings[0].value, Ok(Value::Int(9)));
}

#[tokio::test]
async fn writes_are_validated_before_the_wire_and_exceptions_come_back() {
    let sim = Sim::tcp(spec()).await;
    let plugin = ModbusPlugin::new(config(sim.port)).expect("plugin");
    let d = dev(sim.port, 1);
    plugin.identify(&d).await.expect("identify");
    let cmd = |point: &str, value: Value| WriteCommand {
        point: point.into(),
        value,
    };

    let before = plugin.stats().requests;
    for (c, want) in [
        (cmd("nope", Value::Int(1)), "unknown point"),
        (cmd("voltage", Value::Int(1)), "not writable"),
        (cmd("setpoint", Value::Int(101)), "outside"),
        (cmd("setpoint", Value::Text("x".into())), "is not a"),
        (cmd("running", Value::Int(1)), "is not a"),
    ] {
        let e = plugin.write(&d, &c).await.expect_err("refused");
        assert!(e.is_refusal(), "{c:?}: {e:?}");
        let text = e.to_string();
        assert!(
            text.contains(want) || format!("{e:?}").contains("RefusedUnknownPoint"),
            "{c:?}: {text}"
        );
    }
    assert_eq!(
        plugin.stats().requests,
        before,
        "a refused write sent something"
    );

    plugin
        .write(&d, &cmd("setpoint", Value::Int(75)))
        .await
        .expect("write setpoint");
    plugin
        .write(&d, &cmd("running", Value::Bool(false)))
        .await
        .expect("write coil");
    let t = plugin.poll(&d).await.expect("poll");
    let v = |n: &str| {
        t.readings
            .iter()
            .find(|r| r.name == n)
            .map(|r| r.value.clone())
    };
    assert_eq!(v("setpoint"), Some(Ok(Value::Int(75))));
    assert_eq!(v("running"), Some(Ok(Value::Bool(false))));

    // Valid by the map, refused by the device: the exception is the result.
    let e = plugin
        .write(&d, &cmd("missing", Value::Int(1)))
        .await
        .expect_err("device refuses");
    assert!(matches!(e, PluginError::Exception { code: 2, .. }), "{e:?}");
}

#[tokio::test]
async fn compliance_over_tcp() {
    let sim = Sim::tcp(spec()).await;
    let plugin = ModbusPlugin::new(config(sim.port)).expect("plugin");
    compliance::check(
        &plugin,
        &Target {
            device: dev(sim.port, 1),
            absent: dev(sim.port, 4),
            refused_writes: vec![
                WriteCommand {
                    point: "nope".into(),
                    value: Value::Int(1),
                },
                WriteCommand {
                    point: "temperature".into(),
                    value: Value::Float(1.0),
                },
                WriteCommand {
                    point: "setpoint".into(),
                    value: Value::Int(-1),
                },
            ],
            valid_write: Some(WriteCommand {
                point: "setpoint".into(),
                value: Value::Int(33),
            }),
            bound: Duration::from_secs(10),
        },
    )
    .await;
}

fn line(port: u16, stats: Arc<Stats>) -> Line {
    Line::new(
        Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        vec![1],
        1,
        Duration::ZERO,
        Duration::from_millis(TIMEOUT_MS),
        stats,
    )
}

/// The desync case through the plugin's wrapper: a request times out, its answer arrives late,
/// and the next request still gets its own answer (the wrapper reconnected).
#[tokio::test]
async fn late_answer_does_not_desync_the_next_request() {
    let sim = Sim::tcp(spec()).await;
    let stats = Arc::new(Stats::default());
    let line = line(sim.port, stats.clone());
    let first = line
        .request(1, Request::ReadHoldingRegisters(SLOW_ADDRESS, 1))
        .await;
    assert_eq!(
        first,
        Err(PluginError::Timeout {
            after_ms: TIMEOUT_MS
        })
    );
    // Let the late answer arrive (at 1.0 s) well before the next request.
    tokio::time::sleep(Duration::from_secs_f64(SLOW_SECONDS + 0.5)).await;
    let next = line.request(1, Request::ReadHoldingRegisters(0, 1)).await;
    println!(
        "after a timeout, the next request got: {next:?}; stats {:?}",
        stats.snapshot()
    );
    assert_eq!(next, Ok(Response::ReadHoldingRegisters(vec![215])));
    assert_eq!(stats.snapshot().reconnects, 1);
}

/// Documents the upstream bug the wrapper works around (tokio-modbus #324): with plain
/// tokio-modbus and `tokio::time::timeout`, the request after a timeout reads the late answer.
/// If this starts failing, upstream fixed it: the wrapper may then be simplified.
#[tokio::test]
async fn plain_tokio_modbus_desyncs_after_a_timeout() {
    use tokio_modbus::client::Reader;
    let sim = Sim::tcp(spec()).await;
    let addr = format!("127.0.0.1:{}", sim.port).parse().expect("addr");
    let mut ctx = tokio_modbus::client::tcp::connect_slave(addr, tokio_modbus::Slave(1))
        .await
        .expect("connect");
    let first = tokio::time::timeout(
        Duration::from_millis(TIMEOUT_MS),
        ctx.read_holding_registers(SLOW_ADDRESS, 1),
    )
    .await;
    assert!(
        first.is_err(),
        "the slow request should time out: {first:?}"
    );
    tokio::time::sleep(Duration::from_secs_f64(SLOW_SECONDS + 0.5)).await;
    let next = tokio::time::timeout(Duration::from_secs(2), ctx.read_holding_registers(0, 1)).await;
    println!("plain tokio-modbus, request after a timeout got: {next:?}");
    match next {
        Ok(Ok(Ok(words))) if words == [215] => panic!("no desync: upstream #324 looks fixed"),
        _ => {}
    }
}
