//! A device onboarding through the gateway's local fleet-provisioning endpoint: the AWS IoT Device
//! SDK v2 for Python, unmodified (`tests/peers/devices/fleet_onboard.py`), connects to a real
//! gatewayd with a factory certificate pinned as an onboarding credential, asks for a certificate
//! (CreateCertificateFromCsr) and its thing (RegisterThing with the README's child template); the
//! gateway makes both calls in iotcore-sim over its own connection as its thing. The device then
//! connects to the gateway with its new certificate, as a child, and publishes.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn python() -> PathBuf {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: tests/run-all creates the venv with the AWS IoT Device SDK",
        py.display()
    );
    py
}

/// A self-signed factory certificate (as a device leaves the factory with) and its certificateId.
fn factory_cert(dir: &Path) -> (PathBuf, PathBuf, String) {
    let (crt, key) = (dir.join("factory.crt"), dir.join("factory.key"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "30", "-subj", "/CN=factory", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let id = gatewayd::identity::certificate_id(&std::fs::read(&crt).unwrap()).unwrap();
    (crt, key, id)
}

#[test]
fn an_unmodified_aws_sdk_device_gets_its_thing_through_the_gateway_and_connects_as_a_child() {
    let py = python();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sim = sim_with_readme_templates(
        dir,
        &[
            ("ReadmeTemplate", "<!-- gateway-template"),
            ("ChildTemplate", "<!-- child-template"),
        ],
        &[],
    );
    let (fcrt, fkey, fid) = factory_cert(dir);
    let mut gw = Gateway::configure(&dir.join("gw"), &sim, "", "");
    gw.dropin(
        "50-onboarding.toml",
        &format!(
            "[provisioning]\ntemplate = \"ReadmeTemplate\"\n\n[local]\n\
             onboarding_templates = [\"ChildTemplate\"]\nonboarding_certificate_ids = [\"{fid}\"]\n"
        ),
    );
    gw.start(&[]);
    let s = gw.wait_active(T);
    let parent = s.identity.thing_name.unwrap();
    let port = s.local.unwrap().listeners[0]
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let (code, ca) = gatewayctl(&gw, &["local", "ca"]);
    assert_eq!(code, 0, "{ca}");
    let ca_file = dir.join("local-ca.pem");
    std::fs::write(&ca_file, ca).unwrap();

    let work = dir.join("device");
    std::fs::create_dir_all(&work).unwrap();
    // A device script from `tests/peers/devices/` (its last line is its JSON report).
    let device = |script: &str, id: &str, serial: &str| -> Value {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/peers/devices")
            .join(script);
        let out = Command::new(&py)
            .arg(&script)
            .args([&port, ca_file.to_str().unwrap(), fcrt.to_str().unwrap()])
            .args([fkey.to_str().unwrap(), id, "ChildTemplate", serial])
            .arg(&work)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{script:?}: {text}\ngateway log: {}",
            gw.log_text()
        );
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    };
    let got = device("fleet_onboard.py", "meter-42", "SN-42");
    // The thing is the gateway's child whatever the device claimed as its parent.
    let thing = format!("{parent}-SN-42");
    assert_eq!(got["thing_name"], thing.as_str(), "{got}");
    assert_eq!(got["puback"], "SUCCESS", "{got}");
    assert_eq!(
        got["device_configuration"]["parent"],
        parent.as_str(),
        "{got}"
    );

    let things = sim.things();
    let t = things
        .iter()
        .find(|t| t["thingName"] == thing.as_str())
        .unwrap();
    assert_eq!(t["attributes"]["parent"], parent.as_str());
    assert_eq!(t["attributes"]["foundBy"], "mqtt-onboarding");
    let cert = got["certificate_id"].as_str().unwrap();
    let c = sim
        .device_certs()
        .into_iter()
        .find(|c| c["certificateId"] == cert)
        .unwrap();
    assert_eq!(c["status"], "ACTIVE", "{c}");

    // Pinned for the child.
    let (code, list) = gatewayctl(&gw, &["children", "list", "--json"]);
    assert_eq!(code, 0, "{list}");
    assert!(list.contains("meter-42") && list.contains(cert), "{list}");
    // A provisioned child of the gateway: the bridge takes its message up to its thing.
    let (code, show) = gatewayctl(&gw, &["children", "show", "meter-42", "--json"]);
    assert_eq!(code, 0, "{show}");
    let show: Value = serde_json::from_str(&show).unwrap();
    assert_eq!(show["state"], "provisioned", "{show}");
    assert_eq!(show["thing_name"], thing.as_str(), "{show}");
    wait_until(T, "the child's message acknowledged by the cloud", || {
        gw.status()
            .and_then(|s| s.bridge)
            .filter(|b| b.acked >= 1 && b.waiting_for_thing.is_empty())
    });

    // The CBOR flavour of the same API (paho-mqtt + cbor2), and a malformed CBOR request.
    let got = device("fleet_cbor.py", "meter-43", "SN-43");
    assert_eq!(
        got["thing_name"],
        format!("{parent}-SN-43").as_str(),
        "{got}"
    );
    assert_eq!(
        got["bad_topic"], "$aws/certificates/create/cbor/rejected",
        "{got}"
    );
    assert_eq!(got["bad"]["statusCode"], 400, "{got}");
    assert_eq!(got["bad"]["errorCode"], "InvalidPayload", "{got}");
}
