//! The local endpoint in the real daemon, driven by an operator: `gatewayctl children add`,
//! `local ca`, `outbox`, `status`, and a device (mosquitto_pub) connecting over TLS with the
//! password it was shown once.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn ctl(gw: &Gateway, args: &[&str]) -> (bool, String) {
    let out = Command::new(gatewayctl_bin())
        .arg("--socket")
        .arg(&gw.socket)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn an_operator_registers_a_child_that_then_publishes_over_tls() {
    if Command::new("mosquitto_pub")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("SKIP: mosquitto-clients not installed (tests/run-all installs them)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_sim, mut gw) = serving_sim_and_gateway(tmp.path());
    gw.start(&[]);
    let listeners = wait_until(Duration::from_secs(20), "the local endpoint", || {
        gw.status()
            .and_then(|s| s.local)
            .map(|l| l.listeners)
            .filter(|l| !l.is_empty())
    });
    let port = listeners[0].rsplit(':').next().unwrap().to_owned();
    assert!(
        listeners[0].starts_with("mqtts://127.0.0.1:"),
        "{listeners:?}"
    );

    let (ok, text) = ctl(&gw, &["children", "add", "c1", "--password"]);
    assert!(ok, "{text}");
    let pw = text
        .lines()
        .find_map(|l| l.split("): ").nth(1))
        .unwrap()
        .trim()
        .to_owned();
    let (ok, text) = ctl(&gw, &["children", "list"]);
    assert!(ok && text.contains("c1  password"), "{text}");
    let (ok, text) = ctl(&gw, &["children", "add", "../x"]);
    assert!(!ok && text.contains("not usable"), "{text}");

    let (ok, ca) = ctl(&gw, &["local", "ca"]);
    assert!(ok && ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
    let ca_file = tmp.path().join("local-ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let publish = |topic: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "localhost", "-p", &port, "--cafile"])
            .arg(&ca_file)
            .args([
                "-i", "c1", "-u", "c1", "-P", &pw, "-q", "1", "-t", topic, "-m", "21.5",
            ])
            .output()
            .unwrap()
    };
    assert!(publish("dt/c1/temp").status.success());
    assert!(!publish("dt/c2/temp").status.success());

    let (ok, text) = ctl(&gw, &["outbox"]);
    assert!(
        ok && text.contains("outbox: 1 entries") && text.contains("c1: 1"),
        "{text}"
    );
    let (ok, text) = ctl(&gw, &["outbox", "--json"]);
    assert!(ok, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["per_child"]["c1"], 1, "{text}");
    let (ok, text) = ctl(&gw, &["status"]);
    assert!(ok && text.contains("ACL denials:  publish 1"), "{text}");

    let (ok, text) = ctl(&gw, &["children", "remove", "c1"]);
    assert!(ok, "{text}");
    assert!(!publish("dt/c1/temp").status.success());
    let s = gw.status().unwrap().local.unwrap();
    assert_eq!(s.refusals.get("bad_password"), Some(&1), "{s:?}");
    assert_eq!(gw.stop().code(), Some(0));
}
