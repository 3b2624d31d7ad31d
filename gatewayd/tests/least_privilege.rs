//! Least privilege, proven by the emulator's policy engine: two gateways provisioned with the
//! README's gateway template (its thing policy as written). With gateway 1's own certificate and
//! client id (what a compromised or misconfigured gateway 1 could do), mosquitto's clients may
//! publish under `gw/gw-0001/` (its own and its children's telemetry) and subscribe to
//! `cmd/gw-0001/…`, and are refused gateway 2's: the publish ends the connection (AWS closes an
//! MQTT 3.1.1 connection on an unauthorized publish) and the subscription gets SUBACK 0x80.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn text(o: &Output) -> String {
    format!(
        "exit {:?}; {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_gateway_may_use_its_own_topics_and_never_another_gateways() {
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
    let mut gws = Vec::new();
    for serial in ["0001", "0002"] {
        let mut gw = Gateway::configure(&dir.join(format!("gw{serial}")), &sim, "", "");
        gw.dropin(
            "50-template.toml",
            &format!(
                "[provisioning]\ntemplate = \"ReadmeTemplate\"\n\n[provisioning.serial]\nvalue = \"{serial}\"\n"
            ),
        );
        gw.start(&[]);
        assert_eq!(
            gw.wait_active(T).identity.thing_name.as_deref(),
            Some(format!("gw-{serial}").as_str())
        );
        gws.push(gw);
    }
    // Gateway 1's identity, used from outside the daemon (which is stopped so the client id is
    // free).
    let id = gws[0].state_dir.join("identity/gateway");
    let _ = gws[0].stop();
    let (cert, key) = (id.join("certificate.pem"), id.join("private.key"));
    let once = |cmd: &str, rest: &[&str]| {
        Command::new(cmd)
            .args(["-h", "localhost", "-p", &sim.port.to_string(), "--cafile"])
            .arg(&sim.root_ca)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(["-i", "gw-0001", "-V", "mqttv311"])
            .args(rest)
            .output()
            .unwrap()
    };
    // AWS allows one CONNECT per second per client id (the emulator answers "server
    // unavailable" to a faster one), and each call below connects anew: retry those.
    let client = |cmd: &str, rest: &[&str]| {
        for _ in 0..10 {
            let o = once(cmd, rest);
            if !text(&o).contains("broker unavailable") {
                return o;
            }
            std::thread::sleep(Duration::from_millis(1100));
        }
        once(cmd, rest)
    };
    // Publish: mosquitto_pub waits for the PUBACK of a QoS 1 message; a closed connection fails it.
    let o = client(
        "mosquitto_pub",
        &["-q", "1", "-t", "gw/gw-0001/meter-1/t", "-m", "1"],
    );
    assert!(o.status.success(), "own topic: {}", text(&o));
    let o = client(
        "mosquitto_pub",
        &["-q", "1", "-t", "gw/gw-0002/meter-1/t", "-m", "1"],
    );
    assert!(!o.status.success(), "another gateway's topic: {}", text(&o));
    // Subscribe: `-E` exits right after the SUBACK; mosquitto_sub reports a refused filter.
    let o = client("mosquitto_sub", &["-q", "1", "-t", "cmd/gw-0001/#", "-E"]);
    assert!(
        o.status.success() && !text(&o).contains("denied"),
        "own commands: {}",
        text(&o)
    );
    let o = client("mosquitto_sub", &["-q", "1", "-t", "cmd/gw-0002/#", "-E"]);
    assert!(
        text(&o).contains("denied"),
        "another gateway's commands: {}",
        text(&o)
    );
}
