//! End to end against `iotcore-sim serve`: trusted-user mode with real temporary claims
//! (`iotcore-sim claim create`), and a pre-installed certificate registered just in time
//! (JITP with a template on the maker CA, JITR with a manual activation).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Gateway, Sim};

const T: Duration = Duration::from_secs(30);

fn trusted_user(tmp: &Path) -> (Sim, Gateway) {
    let mut sim = Sim::init(&tmp.join("sim"), None);
    sim.serve(&[]);
    // The claim_cert/claim_key lines stay in the file; trusted-user mode ignores them.
    let mut gw = Gateway::configure(&tmp.join("gw"), &sim, "mode = \"trusted-user\"", "");
    gw.start(&[]);
    wait_for_claim_prompt(&gw);
    (sim, gw)
}

fn wait_for_claim_prompt(gw: &Gateway) {
    gw.wait_status(T, "waiting for a claim", |s| {
        s.identity.activity.contains("gatewayctl claim install") && s.identity.waiting_for_claim
    });
}

fn install(gw: &Gateway, cert: &Path, key: &Path) {
    let (ok, text) = gw.claim_install(cert, key);
    assert!(ok, "gatewayctl claim install: {text}");
}

#[test]
fn trusted_user_claim_finishes_within_its_window() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = trusted_user(tmp.path());
    let window = Duration::from_secs(8);
    // The claim's window starts between these two instants: "within the window" is measured
    // from the first, "past the window" from the second.
    let created = Instant::now();
    let (cert, key, claim_id) = sim.claim_create(window.as_secs());
    let created_by = Instant::now();
    // A temporary claim is not an account certificate.
    assert!(
        sim.json("certs")
            .iter()
            .all(|c| c["certificateId"] != claim_id.as_str())
    );
    install(&gw, &cert, &key);
    let s = gw.wait_active(window);
    assert!(
        created.elapsed() < window,
        "provisioned after {:?}, past the claim's {window:?}",
        created.elapsed()
    );
    assert_eq!(s.identity.thing_name.as_deref(), Some("gw-0001"));
    assert_eq!(s.identity.temporary_claim_deadline_unix, None);
    // Only the thing is connected: the claim session was closed, not left to be cut off.
    assert_eq!(
        sim.counters()["connected_clients"],
        serde_json::json!(["gw-0001"])
    );
    let cert_id = s.identity.certificate_id.clone().unwrap();
    // Past the window the permanent identity is unaffected: same connection, no error.
    std::thread::sleep(window.saturating_sub(created_by.elapsed()) + Duration::from_secs(1));
    let after = gw.status().unwrap();
    let u = after.uplink.unwrap();
    assert_eq!((u.state.as_str(), u.connects), ("connected", 1));
    assert!(after.identity.last_error.is_none());
    assert_eq!(
        after.identity.certificate_id.as_deref(),
        Some(cert_id.as_str())
    );
    assert!(gw.error_lines().is_empty(), "{}", gw.log_text());
    assert_eq!(sim.things().len(), 1);
    // Active: a further claim is refused, with a failing exit status, and not used.
    let (ok, text) = gw.claim_install(&cert, &key);
    assert!(!ok, "{text}");
    assert!(text.contains("not waiting for a claim"), "{text}");
    assert_eq!(gw.status().unwrap().uplink.unwrap().connects, 1);
    assert!(gw.stop().success());
}

/// The daemon could not use a claim: exactly one ERROR line, still up, back to waiting for a
/// claim, and a fresh claim completes.
fn then_fresh_claim_completes(sim: &Sim, gw: &mut Gateway, why: &str) {
    let s = gw.wait_status(T, "the claim to be given up", |s| {
        s.identity.last_error.is_some()
            && s.identity.activity.contains("gatewayctl claim install")
            && s.identity.waiting_for_claim
    });
    let e = s.identity.last_error.unwrap();
    assert!(e.permanent, "{why}: {e:?}");
    assert!(e.message.contains("claim"), "{why}: {e:?}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(gw.is_running(), "{why}: the daemon must stay up");
    let errors = gw.error_lines();
    assert_eq!(
        errors.len(),
        1,
        "{why}: exactly one clear error line: {errors:#?}\n{}",
        gw.log_text()
    );
    assert!(
        errors[0].contains("gatewayctl claim install"),
        "{why}: the line says what to do: {}",
        errors[0]
    );
    assert!(sim.things().is_empty());

    let (cert, key, _) = sim.claim_create(300);
    install(gw, &cert, &key);
    let s = gw.wait_active(T);
    assert_eq!(s.identity.thing_name.as_deref(), Some("gw-0001"));
    assert_eq!(sim.things().len(), 1);
    assert_eq!(gw.error_lines().len(), 1, "{}", gw.log_text());
    assert!(gw.stop().success());
}

#[test]
fn trusted_user_expired_claim_is_one_error_then_fresh_claim_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = trusted_user(tmp.path());
    let (cert, key, _) = sim.claim_create(1);
    std::thread::sleep(Duration::from_millis(1500));
    install(&gw, &cert, &key);
    then_fresh_claim_completes(&sim, &mut gw, "claim expired before install");
}

#[test]
fn trusted_user_window_closing_mid_provisioning_then_fresh_claim_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = trusted_user(tmp.path());
    // Answers take 4 s (under the 5 s call timeout) but the claim lasts 3 s: the sim cuts the
    // claim connection before CreateCertificateFromCsr is answered.
    sim.fault("delay", &["--ms", "4000"]);
    let (cert, key, _) = sim.claim_create(3);
    install(&gw, &cert, &key);
    let log = || gw.log_text();
    common::wait_until(T, "the claim connection to be cut", || {
        log().contains("provisioning step failed").then_some(())
    });
    let s = gw.status().unwrap();
    assert!(s.identity.stage != "active");
    // The fresh claim works even though answers are still slow.
    then_fresh_claim_completes(&sim, &mut gw, "claim window closed mid-call");
}

// ---- JITP / JITR -------------------------------------------------------------------------

struct Maker {
    ca_pem: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    cert_id: String,
}

/// A maker CA and one device certificate (X.509 v3, CN = `common_name`) it signed.
fn maker(dir: &Path, common_name: &str) -> Maker {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Example Maker Device CA");
    ca.distinguished_name
        .push(DnType::OrganizationName, "Example Maker");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut dev = CertificateParams::new(Vec::<String>::new()).unwrap();
    dev.distinguished_name.push(DnType::CommonName, common_name);
    dev.distinguished_name
        .push(DnType::OrganizationName, "Example Maker");
    let cert = dev.signed_by(&key, &Issuer::new(ca, &ca_key)).unwrap();
    let m = Maker {
        ca_pem: dir.join("maker-ca.pem"),
        cert: dir.join("device.pem"),
        key: dir.join("device.key"),
        cert_id: gatewayd::identity::certificate_id(cert.pem().as_bytes()).unwrap(),
    };
    std::fs::write(&m.ca_pem, ca_cert.pem()).unwrap();
    std::fs::write(&m.cert, cert.pem()).unwrap();
    std::fs::write(&m.key, key.serialize_pem()).unwrap();
    m
}

fn preinstalled(m: &Maker, thing: &str) -> String {
    format!(
        "mode = \"preinstalled\"\n[provisioning.preinstalled]\ncert = \"{}\"\nkey = \"{}\"\nthing_name = \"{thing}\"\n",
        m.cert.display(),
        m.key.display()
    )
}

const JITP_TEMPLATE: &str = r#"{
  "Parameters": {
    "AWS::IoT::Certificate::CommonName": {"Type": "String"},
    "AWS::IoT::Certificate::Id": {"Type": "String"}
  },
  "Resources": {
    "thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"}}},
    "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}},
    "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":\"iot:Connect\",\"Resource\":\"arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}\"},{\"Effect\":\"Allow\",\"Action\":[\"iot:Publish\",\"iot:Subscribe\",\"iot:Receive\"],\"Resource\":\"*\"}]}"}}
  }
}"#;

#[test]
fn jitp_first_connection_dropped_then_active_as_the_thing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    let body = tmp.path().join("jitp.json");
    std::fs::write(&body, JITP_TEMPLATE).unwrap();
    sim.admin(
        &["template", "add"],
        &["--name", "JitpTemplate", "--body", body.to_str().unwrap()],
    );
    let m = maker(&tmp.path().join("maker"), "jitp-dev-7");
    sim.admin(
        &["ca", "register"],
        &[
            "--ca",
            m.ca_pem.to_str().unwrap(),
            "--template",
            "JitpTemplate",
        ],
    );
    sim.serve(&[]);
    let mut gw = Gateway::configure(
        &tmp.path().join("gw"),
        &sim,
        &preinstalled(&m, "jitp-dev-7"),
        "",
    );
    gw.start(&[]);
    let s = gw.wait_active(T);
    let u = s.uplink.unwrap();
    assert_eq!(u.client_id, "jitp-dev-7");
    // The first connection was dropped (registration), the next one held.
    assert_eq!(u.connects, 1);
    assert!(u.connect_attempts >= 2, "{u:?}");
    assert!(sim.counter("connections") >= 2);
    assert_eq!(sim.counter("throttled_connects"), 0);
    let things = sim.things();
    assert_eq!(things.len(), 1, "{things:?}");
    assert_eq!(things[0]["thingName"], "jitp-dev-7");
    assert_eq!(things[0]["principals"], serde_json::json!([m.cert_id]));
    assert!(s.identity.last_error.is_none());
    assert!(gw.error_lines().is_empty(), "{}", gw.log_text());
    assert!(gw.stop().success());
}

#[test]
fn jitr_retried_with_backoff_until_activated() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    let m = maker(&tmp.path().join("maker"), "jitr-dev-3");
    sim.admin(&["ca", "register"], &["--ca", m.ca_pem.to_str().unwrap()]);
    let policy = tmp.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}"},{"Effect":"Allow","Action":["iot:Publish","iot:Subscribe","iot:Receive"],"Resource":"*"}]}"#,
    )
    .unwrap();
    sim.admin(
        &["policies", "add"],
        &[
            "--name",
            "DevPolicy",
            "--document",
            policy.to_str().unwrap(),
        ],
    );
    sim.serve(&[]);
    let mut gw = Gateway::configure(
        &tmp.path().join("gw"),
        &sim,
        &preinstalled(&m, "jitr-dev-3"),
        "",
    );
    gw.start(&[]);
    // Registered on first contact, then refused while PENDING_ACTIVATION.
    common::wait_until(T, "JITR registration", || {
        sim.json("certs")
            .into_iter()
            .find(|c| c["certificateId"] == m.cert_id.as_str())
            .filter(|c| c["status"] == "PENDING_ACTIVATION")
    });
    let pending = Duration::from_secs(10);
    std::thread::sleep(pending);
    assert!(gw.is_running());
    let s = gw.status().unwrap();
    let u = s.uplink.unwrap();
    assert_ne!(u.state, "connected");
    assert_eq!(u.connects, 0);
    // Backoff 0.5 s doubling to 4 s, then the refusal retried every 4 s: a handful of CONNECTs,
    // never faster than AWS's one per second per client id.
    let seen = sim.counter("connections");
    assert!(
        (3..=9).contains(&seen),
        "{seen} connections while pending for {pending:?}"
    );
    assert_eq!(sim.counter("throttled_connects"), 0);

    // The customer's JITR rule/Lambda: activate, attach policy and thing.
    sim.admin(
        &["certs", "activate"],
        &[
            "--id",
            &m.cert_id,
            "--thing",
            "jitr-dev-3",
            "--policy",
            "DevPolicy",
        ],
    );
    let t0 = Instant::now();
    let s = gw.wait_active(T);
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "took {:?} to notice the activation",
        t0.elapsed()
    );
    assert_eq!(s.uplink.unwrap().client_id, "jitr-dev-3");
    assert_eq!(sim.counter("throttled_connects"), 0);
    assert_eq!(sim.things().len(), 1);
    assert!(gw.stop().success());
}
