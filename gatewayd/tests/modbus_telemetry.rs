//! Modbus telemetry and commands, end to end: a real gatewayd scans a pymodbus TCP simulator
//! (`plugins/modbus/tests/sim.py`), the meter becomes a child (a thing in iotcore-sim), and the
//! gateway polls its profile's map. A local application (`mosquitto_sub`/`mosquitto_pub` as
//! `[local.clients.app]`) sees the telemetry documents on `dt/<child>/telemetry` with the right
//! decoded values (int16 with scale, uint32, float32 with word swap and offset), the Modbus
//! exception of one point in `errors`, writes a setpoint through `cmd/<child>/write` (read back
//! by the next poll) and gets refusals for writes outside the map. The documents are also in the
//! outbox, as the child's messages. After a restart whose scan no longer finds the meter, it is
//! still polled: which device the child is was kept.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const CHILD: &str = "meter-SN-0042";

/// Prints the gateway's log when the test fails.
struct LogOnPanic(PathBuf);
impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "gatewayd log:\n{}",
                std::fs::read_to_string(&self.0).unwrap_or_default()
            );
        }
    }
}

/// `mosquitto_sub -v` as client `app`: each line "topic payload", read as they come.
struct Sub {
    _proc: Killed,
    lines: mpsc::Receiver<String>,
}

impl Sub {
    fn start(port: &str, password: &str, filter: &str) -> Sub {
        let (proc, lines) = spawn_lines(
            Command::new("mosquitto_sub")
                .args(["-h", "127.0.0.1", "-p", port, "-i", "app", "-u", "app"])
                .args(["-P", password, "-q", "1", "-v", "-t", filter]),
        );
        Sub { _proc: proc, lines }
    }

    /// The next message on `topic` for which `f` gives Some, within `timeout`.
    fn wait<R>(&self, topic: &str, what: &str, mut f: impl FnMut(&Value) -> Option<R>) -> R {
        let end = Instant::now() + T;
        let mut seen = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else {
                break;
            };
            let Some((t, payload)) = line.split_once(' ') else {
                continue;
            };
            if t != topic {
                continue;
            }
            let v: Value = serde_json::from_str(payload)
                .unwrap_or_else(|e| panic!("{t}: not JSON ({e}): {payload}"));
            if let Some(r) = f(&v) {
                return r;
            }
            seen.push(v);
        }
        panic!("no {what} on {topic} within {T:?}; saw {seen:?}");
    }
}

/// `mosquitto_pub` as client `ops`.
fn publish(port: &str, password: &str, topic: &str, message: &str) {
    let o = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", port, "-i", "ops", "-u", "ops"])
        .args(["-P", password, "-q", "1", "-t", topic, "-m", message])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
}

fn close(v: &Value, want: f64) -> bool {
    v.as_f64().is_some_and(|x| (x - want).abs() < 1e-9)
}

const PROFILE: &str = r#"
[[modbus.profiles]]
name = "meter"
template = "ChildTemplate"
match = { vendor = "Acme*" }

[[modbus.profiles.points]]
name = "temperature"
function = "holding"
address = 0
data_type = "int16"
scale = 0.1
unit = "°C"

[[modbus.profiles.points]]
name = "energy"
function = "holding"
address = 1
data_type = "uint32"
unit = "Wh"

[[modbus.profiles.points]]
name = "voltage"
function = "holding"
address = 3
data_type = "float32"
word_order = "little"
offset = 0.5
unit = "V"

[[modbus.profiles.points]]
name = "setpoint"
function = "holding"
address = 5
data_type = "uint16"
unit = "%"
writable = true
min = 0.0
max = 100.0

[[modbus.profiles.points]]
name = "missing"
function = "holding"
address = 500
data_type = "int16"
"#;

#[test]
fn modbus_children_are_polled_and_take_validated_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Unit 1, holding registers: -125 (int16), 3000000000 as two words, 229.5 as a float32 with
    // its words swapped (CDAB), setpoint 50. Address 500 does not exist: Illegal Data Address.
    let (device, port) = modbus_sim(
        dir,
        r#"{"1": {"holding": [65411, 45776, 24064, 32768, 17253, 50],
                  "identity": {"0": "Acme Meters", "1": "AM-3", "2": "1.2", "128": "SN-0042"}}}"#,
    );
    let sim = sim_with_readme_templates(
        dir,
        &[
            ("ReadmeTemplate", "<!-- gateway-template"),
            ("ChildTemplate", "<!-- child-template"),
        ],
        &[],
    );
    let mut gw = Gateway::configure(&dir.join("gw"), &sim, "", "");
    let modbus = |units: &str| {
        format!(
            r#"[provisioning]
template = "ReadmeTemplate"

[children]
template = "ChildTemplate"
admission = "auto"

[local]
tcp_listen = ["127.0.0.1:0"]

[local.clients.app]
publish = []
subscribe = ["dt/#"]

[local.clients.ops]
publish = ["cmd/+/write"]
subscribe = []

[discovery]
poll_interval_ms = 200
report = "on-change"
heartbeat_secs = 1

[modbus]
request_timeout_ms = 500
unit_ids = ["{units}"]

[[modbus.tcp]]
hosts = ["127.0.0.1"]
ports = [{port}]
{PROFILE}"#
        )
    };
    gw.dropin("50-modbus.toml", &modbus("1"));
    let _log = LogOnPanic(gw.log.clone());
    gw.start(&[]);
    let s = gw.wait_active(T);
    let mqtt = s
        .local
        .unwrap()
        .listeners
        .iter()
        .find(|l| l.starts_with("mqtt://"))
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let password = |id: &str| {
        let (code, text) = gatewayctl(&gw, &["children", "add", id, "--password"]);
        assert_eq!(code, 0, "{text}");
        text.lines()
            .find_map(|l| l.split("): ").nth(1))
            .unwrap()
            .to_owned()
    };
    let (pw, ops) = (password("app"), password("ops"));
    let sub = Sub::start(&mqtt, &pw, "dt/#");
    let telemetry = format!("dt/{CHILD}/telemetry");
    let results = format!("dt/{CHILD}/write-result");
    let commands = format!("cmd/{CHILD}/write");

    // Decoded values with their units; the bad point's exception in `errors`.
    let doc = sub.wait(&telemetry, "a telemetry document", |d| {
        d["values"].get("setpoint").map(|_| d.clone())
    });
    let v = &doc["values"];
    assert!(close(&v["temperature"]["value"], -12.5), "{doc}");
    assert_eq!(v["temperature"]["unit"], "°C", "{doc}");
    assert_eq!(v["energy"]["value"], 3_000_000_000u64, "{doc}");
    assert_eq!(v["energy"]["unit"], "Wh", "{doc}");
    assert!(close(&v["voltage"]["value"], 230.0), "{doc}");
    assert_eq!(v["voltage"]["unit"], "V", "{doc}");
    assert_eq!(v["setpoint"]["value"], 50, "{doc}");
    assert!(doc["ts"].as_u64().unwrap() > 1_700_000_000_000, "{doc}");
    assert!(v.get("missing").is_none(), "{doc}");
    assert_eq!(
        doc["errors"]["missing"], "device exception 0x02 (IllegalDataAddress)",
        "{doc}"
    );

    // A write in range reaches the register; the next poll reads it back.
    publish(
        &mqtt,
        &ops,
        &commands,
        r#"{"point": "setpoint", "value": 75, "id": "w1"}"#,
    );
    let r = sub.wait(&results, "the result of w1", |r| {
        (r["id"] == "w1").then(|| r.clone())
    });
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["value"], 75, "{r}");
    sub.wait(&telemetry, "setpoint 75 read back", |d| {
        (d["values"]["setpoint"]["value"] == 75).then_some(())
    });

    // Refused before the wire: out of range, not writable, not in the map.
    for (id, cmd, why) in [
        (
            "w2",
            r#""point": "setpoint", "value": 101"#,
            "outside [0, 100]",
        ),
        ("w3", r#""point": "energy", "value": 1"#, "is not writable"),
        ("w4", r#""point": "nope", "value": 1"#, "no point \"nope\""),
    ] {
        publish(
            &mqtt,
            &ops,
            &commands,
            &format!(r#"{{{cmd}, "id": "{id}"}}"#),
        );
        let r = sub.wait(&results, "a refusal", |r| {
            (r["id"] == id).then(|| r.clone())
        });
        assert_eq!(r["ok"], false, "{r}");
        let e = r["error"].as_str().unwrap();
        assert!(e.starts_with("refused") && e.contains(why), "{id}: {r}");
    }
    // Later documents (heartbeats) still read 75: nothing was written.
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut later = 0;
    while Instant::now() < deadline {
        sub.wait(&telemetry, "a later document", |d| {
            assert_eq!(d["values"]["setpoint"]["value"], 75, "{d}");
            Some(())
        });
        later += 1;
    }
    assert!(later >= 1);

    // Figures: status and the outbox (the documents wait there for the bridge).
    let st = gw.status().unwrap();
    let p = st.plugins.iter().find(|p| p.name == "modbus").unwrap();
    eprintln!("status: {p:?}");
    assert_eq!(p.children, 1, "{p:?}");
    assert_eq!(
        (p.writes, p.writes_refused, p.writes_failed),
        (1, 3, 0),
        "{p:?}"
    );
    assert!(p.polls >= 3 && p.point_errors >= p.polls - 1, "{p:?}");
    assert!(p.published >= 6, "{p:?}");
    let (code, out) = gatewayctl(&gw, &["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("modbus:") && out.contains("writes: 1 done, 3 refused"),
        "{out}"
    );
    let (code, out) = gatewayctl(&gw, &["outbox", "--json"]);
    assert_eq!(code, 0, "{out}");
    let ob: Value = serde_json::from_str(&out).unwrap();
    // Stored in the outbox (the bridge may already have taken them up to the cloud).
    assert!(ob["appended"].as_u64().unwrap() >= 6, "{ob}");

    // A restart whose scan finds no meter (unit 2 only): the child is polled anyway.
    drop(sub);
    assert!(gw.stop().success());
    gw.dropin("50-modbus.toml", &modbus("2"));
    gw.start(&[]);
    gw.wait_active(T);
    let sub = Sub::start(&mqtt_port(&gw), &pw, "dt/#");
    sub.wait(&telemetry, "telemetry after the restart", |d| {
        (d["values"]["setpoint"]["value"] == 75).then_some(())
    });
    let log = gw.log_text();
    assert!(
        log.contains("found=0"),
        "the second scan found the meter: {log}"
    );

    // The device goes away: reported in the documents, counted, logged once, polling backs off.
    drop(device);
    let doc = sub.wait(&telemetry, "a document without values", |d| {
        d["values"]
            .as_object()
            .unwrap()
            .is_empty()
            .then(|| d.clone())
    });
    let e = doc["errors"]["setpoint"].as_str().unwrap();
    assert!(
        e.starts_with("transport") || e.starts_with("no answer"),
        "{doc}"
    );
    let st = gw.wait_status(T, "unanswered polls counted", |s| {
        s.plugins.iter().any(|p| p.unreachable >= 2)
    });
    let lines = gw.log_lines_with("does not answer", CHILD);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("thing="),
        "{lines:?}"
    );
    eprintln!("after the device went away: {:?}", st.plugins);
    assert!(gw.error_lines().is_empty(), "{:?}", gw.error_lines());
}

/// The plain-TCP local listener's port, once the endpoint reports it (the status socket may
/// answer before the endpoint is up).
fn mqtt_port(gw: &Gateway) -> String {
    wait_until(T, "the local endpoint's listeners", || {
        let l = gw.status()?.local?.listeners;
        let tcp = l.iter().find(|l| l.starts_with("mqtt://"))?;
        Some(tcp.rsplit(':').next()?.to_owned())
    })
}
