//! Children provisioned by proxy: a real gatewayd and iotcore-sim (MQTT over TLS, AWS's
//! fleet-provisioning protocol), with the README's gateway template (its thing policy must let
//! the gateway call the child template's topics) and the README's child template, as written.
//! Each child offered with `gatewayctl children add --provision` must become one thing in the
//! emulator with its own ACTIVE certificate, pinned in the children registry; admission, denial,
//! throttling, restarts and kill -9 must never make a second thing or a stuck child.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// The emulator with the README's two templates, and a gateway using them with `children`
/// (TOML lines for the `[children]` section).
fn setup(dir: &Path, children: &str, sim_extra: &[&str]) -> (Sim, Gateway) {
    let sim = sim_with_readme_templates(
        dir,
        &[
            ("ReadmeTemplate", "<!-- gateway-template"),
            ("ChildTemplate", "<!-- child-template"),
        ],
        sim_extra,
    );
    let gw = Gateway::configure(&dir.join("gw"), &sim, "", "");
    gw.dropin(
        "50-children.toml",
        &format!(
            "[provisioning]\ntemplate = \"ReadmeTemplate\"\n\n[children]\ntemplate = \"ChildTemplate\"\nparameters = {{ Site = \"plant-1\" }}\nretry_initial_ms = 200\nretry_max_secs = 2\n{children}\n"
        ),
    );
    (sim, gw)
}

fn offer(gw: &Gateway, id: &str, serial: &str) -> String {
    let (code, out) = gatewayctl(
        gw,
        &[
            "children",
            "add",
            id,
            "--provision",
            "--serial",
            serial,
            "--vendor",
            "Acme",
            "--model",
            "PM-5",
        ],
    );
    assert_eq!(code, 0, "{out}");
    out
}

fn show(gw: &Gateway, id: &str) -> Value {
    let (code, out) = gatewayctl(gw, &["children", "show", id, "--json"]);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(&out).unwrap()
}

fn wait_provisioned(gw: &Gateway, ids: &[String], timeout: Duration) {
    wait_until(timeout, "children provisioned", || {
        let (code, out) = gatewayctl(gw, &["children", "queue", "--json"]);
        assert_eq!(code, 0, "{out}");
        let list: Vec<Value> = serde_json::from_str(&out).unwrap();
        let done = list
            .iter()
            .filter(|c| c["state"] == "provisioned")
            .filter(|c| ids.iter().any(|i| c["id"] == i.as_str()))
            .count();
        (done == ids.len()).then_some(())
    });
}

/// Things whose `parent` attribute is the gateway: the children's.
fn child_things(sim: &Sim) -> Vec<Value> {
    sim.things()
        .into_iter()
        .filter(|t| t["attributes"]["parent"].is_string())
        .collect()
}

/// Certificates other than the claim's and the gateway's own.
fn child_certs(sim: &Sim, gateway_cert: &str) -> Vec<Value> {
    sim.device_certs()
        .into_iter()
        .filter(|c| c["certificateId"] != gateway_cert)
        .collect()
}

#[test]
fn an_offered_child_becomes_its_own_thing_with_an_active_certificate_pinned_locally() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = setup(tmp.path(), "admission = \"auto\"", &[]);
    gw.start(&[]);
    let s = gw.wait_active(T);
    let parent = s.identity.thing_name.unwrap();
    let gw_cert = s.identity.certificate_id.unwrap();
    let out = offer(&gw, "meter-1", "SN-0001");
    assert!(out.contains("queued"), "{out}");
    wait_provisioned(&gw, &["meter-1".into()], T);

    let things = child_things(&sim);
    assert_eq!(things.len(), 1, "{things:#?}");
    let t = &things[0];
    let name = format!("{parent}-SN-0001");
    assert_eq!(t["thingName"], name.as_str());
    let attrs: BTreeMap<String, String> = serde_json::from_value(t["attributes"].clone()).unwrap();
    assert_eq!(attrs["parent"], parent);
    assert_eq!(attrs["serial"], "SN-0001");
    assert_eq!(attrs["vendor"], "Acme");
    assert_eq!(attrs["model"], "PM-5");
    assert_eq!(attrs["foundBy"], "manual");
    assert_eq!(attrs["site"], "plant-1");
    let certs = child_certs(&sim, &gw_cert);
    assert_eq!(certs.len(), 1, "{certs:#?}");
    assert_eq!(certs[0]["status"], "ACTIVE");
    assert_eq!(certs[0]["thingNames"][0], name.as_str());
    let cert_id = certs[0]["certificateId"].as_str().unwrap();

    let v = show(&gw, "meter-1");
    assert_eq!(v["state"], "provisioned");
    assert_eq!(v["stage"], "active");
    assert_eq!(v["thing_name"], name.as_str());
    assert_eq!(v["certificate_id"], cert_id);
    assert_eq!(v["pinned"], true);
    assert_eq!(v["device_configuration"]["parent"], parent.as_str());
    assert_eq!(v["device_configuration"]["site"], "plant-1");
    let (_, human) = gatewayctl(&gw, &["children", "show", "meter-1"]);
    assert!(human.contains(&name) && human.contains("pinned"), "{human}");

    // The registry pins the certificate: the local endpoint accepts it for meter-1.
    let (code, list) = gatewayctl(&gw, &["children", "list", "--json"]);
    assert_eq!(code, 0);
    let list: Vec<Value> = serde_json::from_str(&list).unwrap();
    let entry = list.iter().find(|c| c["id"] == "meter-1").unwrap();
    assert_eq!(entry["certificate_ids"][0], cert_id);

    // The key stays on the gateway, 0600, under the child's directory.
    let key = gw.state_dir.join("identity/children/meter-1/private.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Journald fields: the line that says so carries the child and its thing.
    let lines = gw.log_lines_with("child provisioned", "child=meter-1");
    assert!(
        lines.iter().any(|l| l.contains(&format!("thing={name}"))),
        "{lines:#?}"
    );

    let (_, status) = gatewayctl(&gw, &["status"]);
    assert!(
        status.contains("children:  1 provisioned, 0 queued"),
        "{status}"
    );

    // Offered again (a rescan finds it again): never provisioned twice.
    let out = offer(&gw, "meter-1", "SN-0001");
    assert!(out.contains("provisioned"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(child_certs(&sim, &gw_cert).len(), 1);
    gw.stop();
}

#[test]
fn manual_admission_waits_for_approval_and_a_denied_child_never_reaches_the_cloud() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = setup(tmp.path(), "admission = \"manual\"", &[]);
    gw.start(&[]);
    let s = gw.wait_active(T);
    let gw_cert = s.identity.certificate_id.unwrap();
    assert!(offer(&gw, "plc-a", "A1").contains("awaiting-approval"));
    assert!(offer(&gw, "plc-b", "B1").contains("awaiting-approval"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(child_things(&sim).is_empty());
    assert!(child_certs(&sim, &gw_cert).is_empty());
    assert_eq!(show(&gw, "plc-a")["state"], "awaiting-approval");

    let (code, out) = gatewayctl(&gw, &["children", "deny", "plc-b"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = gatewayctl(&gw, &["children", "approve", "plc-a"]);
    assert_eq!(code, 0, "{out}");
    wait_provisioned(&gw, &["plc-a".into()], T);
    std::thread::sleep(Duration::from_secs(1));
    let things = child_things(&sim);
    assert_eq!(things.len(), 1, "{things:#?}");
    assert!(things[0]["thingName"].as_str().unwrap().ends_with("-A1"));
    assert_eq!(show(&gw, "plc-b")["state"], "denied");
    assert_eq!(child_certs(&sim, &gw_cert).len(), 1);
    // Offered again after the denial: still denied.
    assert!(offer(&gw, "plc-b", "B1").contains("denied"));

    // Bad input gets a clear error and the daemon keeps going.
    let (code, out) = gatewayctl(&gw, &["children", "add", "../x", "--provision"]);
    assert_ne!(code, 0);
    assert!(out.contains("child id `../x` is not usable"), "{out}");
    let (code, out) = gatewayctl(&gw, &["children", "approve", "nobody"]);
    assert_ne!(code, 0);
    assert!(out.contains("never offered"), "{out}");
    let (code, out) = gatewayctl(&gw, &["children", "deny", "plc-a"]);
    assert_ne!(code, 0);
    assert!(out.contains("is provisioned"), "{out}");
    assert!(gw.is_running());
    gw.stop();
}

#[test]
fn throttled_calls_are_retried_and_each_child_is_provisioned_once() {
    let tmp = tempfile::tempdir().unwrap();
    // The account's quota (1 RegisterThing/s) is below what gatewayd was told (10/s): even on a
    // loaded machine two of eight registrations fall within one second.
    let (sim, mut gw) = setup(
        tmp.path(),
        "admission = \"auto\"",
        &["--register-thing-tps", "1"],
    );
    gw.start(&[]);
    let s = gw.wait_active(T);
    let gw_cert = s.identity.certificate_id.unwrap();
    let throttled_before = sim.counter("throttled_provisioning_calls");
    // Two more injected ThrottlingExceptions on top.
    sim.fault(
        "reject-next",
        &[
            "--count",
            "2",
            "--status",
            "429",
            "--code",
            "ThrottlingException",
            "--message",
            "Rate exceeded",
        ],
    );
    let ids: Vec<String> = (0..8).map(|i| format!("dev-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        offer(&gw, id, &format!("S{i}"));
    }
    wait_provisioned(&gw, &ids, T);
    let throttled = sim.counter("throttled_provisioning_calls") - throttled_before;
    let things = child_things(&sim);
    assert_eq!(things.len(), 8, "{things:#?}");
    let certs = child_certs(&sim, &gw_cert);
    assert_eq!(certs.len(), 8, "{certs:#?}");
    assert!(certs.iter().all(|c| c["status"] == "ACTIVE"));
    let retried: u64 = ids
        .iter()
        .map(|id| show(&gw, id)["attempts"].as_u64().unwrap())
        .sum();
    eprintln!("quota throttles {throttled}, failed attempts retried {retried}");
    assert!(throttled >= 1, "the account's quota throttled some calls");
    assert!(
        retried >= throttled + 2,
        "every throttle (quota {throttled}, injected 2) was retried: {retried}"
    );
    assert_eq!(sim.counter("injected_rejections"), 2);
    let warns = gw.log_lines_with("ThrottlingException", "retrying");
    assert!(!warns.is_empty());
    gw.stop();
}

#[test]
fn a_restart_mid_queue_resumes_without_a_second_thing() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = setup(
        tmp.path(),
        "admission = \"auto\"\nregister_thing_per_sec = 3",
        &[],
    );
    gw.start(&[]);
    let s = gw.wait_active(T);
    let gw_cert = s.identity.certificate_id.unwrap();
    let ids: Vec<String> = (0..12).map(|i| format!("q-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        offer(&gw, id, &format!("Q{i}"));
    }
    wait_until(T, "a few children provisioned", || {
        (child_things(&sim).len() >= 3).then_some(())
    });
    gw.stop();
    let before = child_things(&sim).len();
    assert!(before < 12, "stopped mid-queue: {before}");
    gw.start(&[]);
    gw.wait_active(T);
    wait_provisioned(&gw, &ids, T);
    let things = child_things(&sim);
    assert_eq!(things.len(), 12);
    // One certificate per child: the stop cost nothing (a call cut short by SIGTERM can cost
    // one orphaned certificate, shown; none here means none was cut).
    let certs = child_certs(&sim, &gw_cert);
    let extra: u64 = ids
        .iter()
        .map(|id| {
            let v = show(&gw, id);
            v["orphaned_certificates"].as_array().unwrap().len() as u64
                + v["possibly_active_certificates"].as_array().unwrap().len() as u64
                + v["unconfirmed_certificate_requests"].as_u64().unwrap()
        })
        .sum();
    assert!(
        certs.len() as u64 <= 12 + extra.min(1),
        "{} certificates, {extra} accounted extra",
        certs.len()
    );
    assert!(extra <= 1, "{extra}");
    gw.stop();
}

/// The fast kill -9 run (the slow one is `tests/slow/children-crash`): 20 children, two kills at
/// random moments; no second thing, no stuck child, at most one extra certificate per kill.
#[test]
fn kill_9_twice_mid_queue_leaves_no_duplicate_and_no_stuck_child() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = setup(tmp.path(), "admission = \"auto\"", &[]);
    gw.start(&[]);
    let s = gw.wait_active(T);
    let gw_cert = s.identity.certificate_id.unwrap();
    let ids: Vec<String> = (0..20).map(|i| format!("k-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        offer(&gw, id, &format!("K{i}"));
    }
    let kills = 2;
    let seed = Instant::now().elapsed().subsec_nanos() as u64 ^ std::process::id() as u64;
    for k in 0..kills {
        let ms = 150 + ((seed ^ k).wrapping_mul(6364136223846793005) >> 33) % 500;
        std::thread::sleep(Duration::from_millis(ms));
        gw.kill9();
        eprintln!(
            "kill {k} after {ms} ms: {} child things",
            child_things(&sim).len()
        );
        gw.start(&[]);
        gw.wait_active(T);
    }
    wait_provisioned(&gw, &ids, T);
    let things = child_things(&sim);
    let mut names: Vec<&str> = things
        .iter()
        .map(|t| t["thingName"].as_str().unwrap())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(things.len(), 20);
    assert_eq!(names.len(), 20);
    let certs = child_certs(&sim, &gw_cert);
    assert!(
        certs.len() <= 20 + kills as usize,
        "{} certificates after {kills} kills",
        certs.len()
    );
    gw.stop();
}

/// Cloud refusals fail the child with the cloud's words and leave the daemon running: a template
/// the README's gateway policy does not allow is refused at the SUBSCRIBE (the policy confines
/// the gateway to its child template); a disabled template is rejected by RegisterThing, and once
/// the operator enables it, `gatewayctl children retry` provisions the child with the
/// certificate it already has.
#[test]
fn a_refused_child_shows_the_cloud_error_and_is_provisioned_after_retry() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = setup(tmp.path(), "admission = \"auto\"", &[]);
    gw.start(&[]);
    let s = gw.wait_active(T);
    let gw_cert = s.identity.certificate_id.unwrap();
    let (code, out) = gatewayctl(
        &gw,
        &[
            "children",
            "add",
            "other-1",
            "--provision",
            "--template",
            "OtherTemplate",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let failed = |id: &str| {
        wait_until(T, "the child failed", || {
            let v = show(&gw, id);
            (v["state"] == "failed").then_some(v)
        })
    };
    let v = failed("other-1");
    let err = v["last_error"].as_str().unwrap();
    assert!(
        err.contains("OtherTemplate") && err.contains("policy does not allow it"),
        "{err}"
    );

    // `template set` without `--enabled` disables it.
    sim.admin(&["template", "set", "--name", "ChildTemplate"], &[]);
    offer(&gw, "late-1", "L1");
    let v = failed("late-1");
    let err = v["last_error"].as_str().unwrap();
    assert!(err.contains("RegisterThing rejected"), "{err}");
    let (_, human) = gatewayctl(&gw, &["children", "show", "late-1"]);
    assert!(
        human.contains("last error:     RegisterThing rejected"),
        "{human}"
    );
    assert!(child_things(&sim).is_empty());
    assert!(gw.is_running());

    sim.admin(
        &["template", "set", "--name", "ChildTemplate"],
        &["--enabled"],
    );
    let (code, out) = gatewayctl(&gw, &["children", "retry", "late-1"]);
    assert_eq!(code, 0, "{out}");
    wait_provisioned(&gw, &["late-1".into()], T);
    assert_eq!(child_things(&sim).len(), 1);
    assert_eq!(show(&gw, "late-1")["last_error"], Value::Null);
    // The retry redeemed the saved token: one certificate for the child. other-1 got its
    // certificate before its RegisterThing was refused: PENDING_ACTIVATION, held in its record
    // (redeemed on a retry within the hour, else orphaned and shown).
    let certs = child_certs(&sim, &gw_cert);
    let v = show(&gw, "late-1");
    let late: Vec<_> = certs
        .iter()
        .filter(|c| c["thingNames"][0] == v["thing_name"])
        .collect();
    assert_eq!(late.len(), 1, "{certs:#?}");
    assert_eq!(late[0]["certificateId"], v["certificate_id"]);
    assert_eq!(certs.len(), 2, "{certs:#?}");
    let other = show(&gw, "other-1");
    assert_eq!(other["state"], "failed");
    assert_eq!(other["stage"], "certificate-issued");
    assert!(
        certs
            .iter()
            .any(|c| c["certificateId"] == other["certificate_id"]
                && c["status"] == "PENDING_ACTIVATION")
    );
    gw.stop();
}
