//! Discovery to things, end to end: a real gatewayd with `[modbus]` scans a pymodbus TCP
//! simulator (`plugins/modbus/tests/sim.py`: one unit with Read Device Identification, one
//! without, one silent), and a constrained MQTT device announces itself with the onboarding
//! credential (mosquitto_rr). Each becomes its own thing in iotcore-sim through the README's
//! child template, as the gateway's child (`parent` attribute), found by `modbus` or `mqtt`;
//! the silent unit becomes nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

#[test]
fn modbus_and_announced_mqtt_devices_become_things_of_their_own() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_modbus, port) = modbus_sim(
        dir,
        r#"{"1": {"holding": [1, 2, 3], "identity": {"0": "Acme Meters", "1": "AM-3", "2": "1.2", "128": "SN-0042"}},
            "2": {"holding": [17, 0, 0, 0, 21326, 11575, 14135, 0], "identity": null},
            "3": {"silent": true}}"#,
    );
    let sim = sim_with_readme_templates(
        dir,
        &[
            ("ReadmeTemplate", "<!-- gateway-template"),
            ("ChildTemplate", "<!-- child-template"),
        ],
        &[],
    );
    let pw = dir.join("onboarding.pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let mut gw = Gateway::configure(&dir.join("gw"), &sim, "", "");
    gw.dropin(
        "50-discovery.toml",
        &format!(
            r#"[provisioning]
template = "ReadmeTemplate"

[children]
template = "ChildTemplate"
admission = "auto"

[local]
tcp_listen = ["127.0.0.1:0"]
onboarding_username = "onboarding"
onboarding_password_file = "{pw}"

[modbus]
request_timeout_ms = 300
unit_ids = ["1-3"]

[[modbus.tcp]]
hosts = ["127.0.0.1"]
ports = [{port}]

[[modbus.profiles]]
name = "meter"
template = "ChildTemplate"
match = {{ vendor = "Acme*" }}

[[modbus.profiles]]
name = "legacy"
template = "ChildTemplate"

[modbus.profiles.identity]
vendor = "Legacy Co"
serial = {{ function = "holding", address = 4, data_type = "string", count = 4 }}
"#,
            pw = pw.display()
        ),
    );
    gw.start(&[]);
    let s = gw.wait_active(T);
    let parent = s.identity.thing_name.unwrap();
    let local = s.local.unwrap();
    let mqtt = local
        .listeners
        .iter()
        .find(|l| l.starts_with("mqtt://"))
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let o = Command::new("mosquitto_rr")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt,
            "-i",
            "sensor-9",
            "-u",
            "onboarding",
        ])
        .args(["-P", "s3cret", "-t", "onboarding/sensor-9/announce"])
        .args(["-e", "onboarding/sensor-9/credential", "-W", "10"])
        .args(["-m", r#"{"serial":"TH-9","model":"TH-1","vendor":"Acme"}"#])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");

    let want = |t: &Value| t["attributes"]["parent"] == parent.as_str();
    let things = wait_until(T, "three child things", || {
        let t: Vec<Value> = sim.things().into_iter().filter(want).collect();
        (t.len() >= 3).then_some(t)
    });
    let by = |serial: &str| {
        things
            .iter()
            .find(|t| t["attributes"]["serial"] == serial)
            .unwrap_or_else(|| panic!("no thing with serial {serial}: {things:?}"))
    };
    assert_eq!(by("SN-0042")["attributes"]["foundBy"], "modbus");
    assert_eq!(by("SN-0042")["attributes"]["vendor"], "Acme Meters");
    assert_eq!(by("SN-777")["attributes"]["foundBy"], "modbus");
    assert_eq!(by("TH-9")["attributes"]["foundBy"], "mqtt");
    // A scan offers what it found once it is over, so with the Modbus children provisioned the
    // scan is done: the silent unit was never offered, and nothing was provisioned twice.
    let (code, queue) = gatewayctl(&gw, &["children", "queue", "--json"]);
    assert_eq!(code, 0, "{queue}");
    let queue: Vec<Value> = serde_json::from_str(&queue).unwrap();
    assert_eq!(queue.len(), 3, "{queue:?}");
    let n = sim.things().into_iter().filter(want).count();
    assert_eq!(n, 3, "{:?}", sim.things());
    let (code, out) = gatewayctl(&gw, &["children", "show", "meter-SN-0042", "--json"]);
    assert_eq!(code, 0, "{out}");
}
