//! End to end against `iotcore-sim serve`: kill -9 (abort) after each provisioning step, expired
//! ownership tokens, permanent failures without a crash loop, and a cloud outage.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::{Gateway, Sim, serving_sim_and_gateway};
use gatewayd::daemon::status::Snapshot;

const T: Duration = Duration::from_secs(30);

/// Aborts right after `step` was flushed, restarts, and checks the cloud-side result.
fn crash_after(step: &str) -> (Sim, Gateway, tempfile::TempDir) {
    crash_after_with(step, "").0
}

fn crash_after_with(
    step: &str,
    provisioning: &str,
) -> ((Sim, Gateway, tempfile::TempDir), Snapshot) {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    sim.serve(&[]);
    let mut gw = Gateway::configure(&tmp.path().join("gw"), &sim, provisioning, "");
    gw.start(&[("GATEWAYD_CRASH_AFTER", step)]);
    let st = gw.wait_exit(T);
    assert_eq!(
        st.signal(),
        Some(6),
        "expected SIGABRT at {step}; log:\n{}",
        gw.log_text()
    );
    assert!(
        gw.log_text()
            .contains(&format!("GATEWAYD_CRASH_AFTER={step}"))
    );

    gw.start(&[]);
    let s = gw.wait_active(T);
    let things = sim.things();
    assert_eq!(
        things.len(),
        1,
        "exactly one thing after a crash at {step}: {things:?}"
    );
    let cert = s.identity.certificate_id.clone().unwrap();
    let certs = sim.device_certs();
    let ours: Vec<_> = certs
        .iter()
        .filter(|c| c["certificateId"] == cert.as_str())
        .collect();
    assert_eq!(ours.len(), 1);
    assert_eq!(ours[0]["status"], "ACTIVE");
    assert!(
        things[0]["principals"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == cert.as_str())
    );
    let others = certs.len() - 1;
    assert!(
        others <= 1,
        "at most one certificate besides ours after a crash at {step}: {certs:#?}"
    );
    // "Orphaned" means never activated: an ACTIVE certificate is never listed as orphaned.
    for id in &s.identity.orphaned_certificates {
        let c = certs
            .iter()
            .find(|c| c["certificateId"] == id.as_str())
            .unwrap_or_else(|| panic!("orphan {id} unknown to the cloud: {certs:#?}"));
        assert_ne!(
            c["status"], "ACTIVE",
            "ACTIVE certificate listed as orphaned: {c}"
        );
    }
    eprintln!(
        "crash after {step}: others in cloud {others}, recorded orphaned {:?}, possibly active {:?} (+{} unconfirmed)",
        s.identity.orphaned_certificates,
        s.identity.possibly_active_certificates,
        s.identity.unconfirmed_certificate_requests
    );
    assert!(gw.stop().success());
    ((sim, gw, tmp), s)
}

#[test]
fn crash_after_key_generated() {
    let (sim, _gw, _t) = crash_after("key-generated");
    assert_eq!(sim.device_certs().len(), 1);
}

#[test]
fn crash_after_csr_sent() {
    let (_sim, gw, _t) = crash_after("csr-sent");
    // The answer to the first request was lost: the daemon says so instead of hiding it.
    assert!(gw.log_text().contains("its answer was never saved"));
}

#[test]
fn crash_after_certificate_saved_redeems_the_saved_token() {
    let (sim, gw, _t) = crash_after("certificate-saved");
    // The young token was redeemed: no second certificate.
    assert_eq!(sim.device_certs().len(), 1);
    assert_eq!(
        gw.log_text()
            .matches("certificate issued and saved")
            .count(),
        1
    );
}

/// RegisterThing went through but its answer was lost with the process: without an expected
/// thing name the first certificate (ACTIVE, attached) is reported as possibly active.
#[test]
fn crash_after_register_sent() {
    let ((sim, gw, _t), s) = crash_after_with("register-sent", "");
    let certs = sim.device_certs();
    assert_eq!(certs.len(), 2, "{certs:#?}");
    let first = certs
        .iter()
        .find(|c| c["certificateId"] != s.identity.certificate_id.as_deref().unwrap())
        .unwrap();
    assert_eq!(first["status"], "ACTIVE");
    assert_eq!(
        s.identity.possibly_active_certificates,
        vec![first["certificateId"].as_str().unwrap().to_owned()]
    );
    assert!(
        s.identity.orphaned_certificates.is_empty(),
        "{:?}",
        s.identity
    );
    let id = first["certificateId"].as_str().unwrap();
    let warns = gw.log_lines_with(" WARN ", id);
    assert_eq!(warns.len(), 1, "{warns:#?}");
    assert!(warns[0].contains("revoke"), "{}", warns[0]);
}

/// The same crash with `expected_thing_name`: the daemon connects with the certificate it has
/// as that thing and carries on; no second certificate.
#[test]
fn crash_after_register_sent_with_expected_thing_name() {
    let ((sim, gw, _t), s) =
        crash_after_with("register-sent", "expected_thing_name = \"gw-{serial}\"");
    let certs = sim.device_certs();
    assert_eq!(certs.len(), 1, "{certs:#?}");
    assert_eq!(s.identity.thing_name.as_deref(), Some("gw-0001"));
    assert!(s.identity.possibly_active_certificates.is_empty());
    assert!(s.identity.orphaned_certificates.is_empty());
    assert!(
        gw.log_text()
            .contains("the earlier RegisterThing had completed")
    );
}

/// RegisterThing completes in the cloud but its answer comes after the daemon's call timeout
/// (`fault delay` > `call_timeout_secs`). The certificate is saved first (crash switch), so only
/// RegisterThing meets the delay. Returns the first certificate's id and the final status.
fn register_answer_lost_to_timeout(
    provisioning: &str,
) -> (Sim, Gateway, String, Snapshot, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    sim.serve(&[]);
    let mut gw = Gateway::configure(&tmp.path().join("gw"), &sim, provisioning, "");
    gw.dropin("50-timeout.toml", "[provisioning]\ncall_timeout_secs = 2\n");
    gw.start(&[("GATEWAYD_CRASH_AFTER", "certificate-saved")]);
    assert_eq!(gw.wait_exit(T).signal(), Some(6), "{}", gw.log_text());
    let certs = sim.device_certs();
    assert_eq!(certs.len(), 1);
    let first = certs[0]["certificateId"].as_str().unwrap().to_owned();

    sim.fault("delay", &["--ms", "3500"]);
    gw.start(&[]);
    common::wait_until(T, "RegisterThing to time out", || {
        gw.log_text()
            .contains("RegisterThing: no answer within 2s")
            .then_some(())
    });
    // The sim did register the thing with the first certificate; only the answer was late.
    let things = sim.things();
    assert_eq!(things.len(), 1, "{things:?}");
    assert_eq!(things[0]["principals"], serde_json::json!([first]));
    sim.fault("clear", &[]);
    let s = gw.wait_active(T);
    assert_eq!(sim.things().len(), 1);
    (sim, gw, first, s, tmp)
}

#[test]
fn register_answer_lost_to_timeout_with_expected_thing_name_keeps_the_certificate() {
    let (sim, mut gw, first, s, _t) =
        register_answer_lost_to_timeout("expected_thing_name = \"gw-{serial}\"");
    let certs = sim.device_certs();
    assert_eq!(certs.len(), 1, "exactly one certificate: {certs:#?}");
    assert_eq!(certs[0]["certificateId"], first.as_str());
    assert_eq!(certs[0]["status"], "ACTIVE");
    assert_eq!(s.identity.certificate_id.as_deref(), Some(first.as_str()));
    assert_eq!(s.identity.thing_name.as_deref(), Some("gw-0001"));
    assert_eq!(s.uplink.as_ref().unwrap().client_id, "gw-0001");
    assert!(s.identity.orphaned_certificates.is_empty());
    assert!(s.identity.possibly_active_certificates.is_empty());
    assert_eq!(
        gw.log_text()
            .matches("certificate issued and saved")
            .count(),
        1
    );
    assert!(gw.error_lines().is_empty(), "{}", gw.log_text());
    // A restart comes back as the same thing, without provisioning.
    assert!(gw.stop().success());
    gw.start(&[]);
    let s2 = gw.wait_active(T);
    assert_eq!(s2.identity.certificate_id.as_deref(), Some(first.as_str()));
    assert_eq!(sim.device_certs().len(), 1);
    assert!(gw.stop().success());
}

#[test]
fn register_answer_lost_to_timeout_without_expected_name_reports_possibly_active() {
    let (sim, mut gw, first, s, _t) = register_answer_lost_to_timeout("");
    let certs = sim.device_certs();
    assert_eq!(certs.len(), 2, "{certs:#?}");
    let c = certs
        .iter()
        .find(|c| c["certificateId"] == first.as_str())
        .unwrap();
    assert_eq!(c["status"], "ACTIVE");
    assert_ne!(s.identity.certificate_id.as_deref(), Some(first.as_str()));
    assert_eq!(s.identity.possibly_active_certificates, vec![first.clone()]);
    assert!(
        s.identity.orphaned_certificates.is_empty(),
        "an ACTIVE certificate is not orphaned: {:?}",
        s.identity
    );
    let warns = gw.log_lines_with(" WARN ", &first);
    assert_eq!(warns.len(), 1, "{warns:#?}");
    assert!(warns[0].contains("revoke"), "{}", warns[0]);
    let out = std::process::Command::new(common::gatewayctl_bin())
        .args(["--socket", gw.socket.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("possibly active, revoke") && text.contains(&first),
        "{text}"
    );
    // Reported to the cloud as well, once: an event on the gateway's own topic.
    let events = || {
        sim.counters()["publishes_by_topic"]["gw/gw-0001/events"]
            .as_u64()
            .unwrap_or(0)
    };
    common::wait_until(T, "the possibly-active event", || {
        (events() == 1).then_some(())
    });
    let reported = gw.log_lines_with("reported to the cloud", &first);
    assert_eq!(reported.len(), 1, "{}", gw.log_text());
    // Not again after a restart.
    assert!(gw.stop().success());
    gw.start(&[]);
    gw.wait_active(T);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(events(), 1);
    assert!(gw.stop().success());
}

#[test]
fn crash_after_thing_registered() {
    let (sim, _gw, _t) = crash_after("thing-registered");
    assert_eq!(sim.device_certs().len(), 1);
}

#[test]
fn crash_after_active() {
    let (sim, _gw, _t) = crash_after("active");
    assert_eq!(sim.device_certs().len(), 1);
}

#[test]
fn expired_token_after_crash_starts_over_and_records_orphan() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    sim.serve(&["--token-ttl", "2"]);
    let mut gw = Gateway::configure(&tmp.path().join("gw"), &sim, "", "");
    gw.start(&[("GATEWAYD_CRASH_AFTER", "certificate-saved")]);
    assert_eq!(gw.wait_exit(T).signal(), Some(6));
    std::thread::sleep(Duration::from_secs(3));
    gw.start(&[]);
    let s = gw.wait_active(T);
    assert_eq!(sim.things().len(), 1);
    assert_eq!(
        s.identity.orphaned_certificates.len(),
        1,
        "{:?}",
        s.identity
    );
    assert_ne!(
        s.identity.orphaned_certificates[0],
        s.identity.certificate_id.clone().unwrap()
    );
    assert!(sim.device_certs().len() <= 2);
    assert!(gw.stop().success());
}

/// Starts a gateway expected to fail permanently; checks one ERROR line, no exit, socket alive.
fn permanent_failure(gw: &mut Gateway, expect: &str) {
    gw.start(&[]);
    let s = gw.wait_status(T, "a permanent error", |s| {
        s.identity.last_error.as_ref().is_some_and(|e| e.permanent)
    });
    let e = s.identity.last_error.unwrap();
    assert!(e.message.contains(expect), "{e:?}");
    // Stays up, keeps serving status, does not retry in a loop.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        gw.is_running(),
        "daemon must not exit on a permanent provisioning failure"
    );
    let s = gw.status().expect("status socket still answers");
    assert!(s.identity.last_error.unwrap().retry_at_unix.is_some());
    let errors = gw.error_lines();
    assert_eq!(
        errors.len(),
        1,
        "exactly one clear error line: {errors:#?}\n{}",
        gw.log_text()
    );
    eprintln!("error line: {}", errors[0]);
    assert!(gw.stop().success());
}

#[test]
fn deactivated_claim_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    sim.admin(&["certs", "deactivate"], &["--id", &sim.claim_id()]);
    sim.serve(&[]);
    let mut gw = Gateway::configure(&tmp.path().join("gw"), &sim, "", "");
    permanent_failure(&mut gw, "claim");
    assert!(sim.things().is_empty());
}

#[test]
fn hook_denial_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let hook = r#"cat >/dev/null; echo '{"allowProvisioning": false}'"#;
    let mut sim = Sim::init(&tmp.path().join("sim"), Some(hook));
    sim.serve(&[]);
    let mut gw = Gateway::configure(&tmp.path().join("gw"), &sim, "", "");
    permanent_failure(&mut gw, "AccessDenied");
    assert!(sim.things().is_empty());
}

#[test]
fn unknown_template_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = serving_sim_and_gateway(tmp.path());
    // A conf.d drop-in overrides the template name.
    gw.dropin(
        "50-template.toml",
        "[provisioning]\ntemplate = \"NoSuchTemplate\"\n",
    );
    permanent_failure(&mut gw, "NoSuchTemplate");
    assert!(sim.things().is_empty());
}

#[test]
fn cloud_outage_is_ridden_out_with_backoff() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut sim, mut gw) = serving_sim_and_gateway(tmp.path());
    gw.start(&[]);
    let before = gw.wait_active(T).uplink.unwrap();
    assert_eq!(before.connects, 1);

    sim.kill();
    let down = gw.wait_status(T, "uplink down", |s| {
        s.uplink.as_ref().is_some_and(|u| u.state != "connected")
    });
    let attempts0 = down.uplink.unwrap().connect_attempts;
    let outage = Duration::from_secs(8);
    std::thread::sleep(outage);
    let during = gw.status().unwrap().uplink.unwrap().connect_attempts - attempts0;
    // Backoff 0.5 s doubling to 4 s with jitter, floor 1 s: 3-6 attempts in 8 s, not hundreds.
    assert!(
        (2..=8).contains(&during),
        "{during} CONNECT attempts in {outage:?}"
    );

    let t0 = Instant::now();
    sim.serve(&[]);
    let after = gw.wait_status(T, "reconnected", |s| {
        s.uplink
            .as_ref()
            .is_some_and(|u| u.state == "connected" && u.connects == 2)
    });
    eprintln!(
        "MEASURE outage: {during} CONNECT attempts in {outage:?}; reconnected {:?} after the sim returned",
        t0.elapsed()
    );
    assert!(gw.is_running());
    assert_eq!(after.identity.stage, "active");
    assert_eq!(after.uplink.unwrap().client_id, "gw-0001");
    // The identity survived: no re-provisioning after the outage.
    assert_eq!(sim.device_certs().len(), 1);
    // One WARN for the whole outage, whatever the failing attempts said; no OS error numbers.
    let warns = gw.log_lines_with(" WARN ", "");
    assert_eq!(warns.len(), 1, "{warns:#?}");
    assert!(warns[0].contains("connection lost"), "{warns:#?}");
    assert!(!gw.log_text().contains("os error"), "{}", gw.log_text());
    assert_eq!(gw.log_lines_with("connection restored", "").len(), 1);
    assert!(gw.stop().success());
}

#[test]
fn dropped_and_refused_connections_are_ridden_out_without_connect_storms() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = serving_sim_and_gateway(tmp.path());
    gw.start(&[]);
    gw.wait_active(T);
    sim.admin(&["counters", "--reset"], &[]);

    // 1. The broker drops every connection: one reconnect, promptly.
    sim.fault("drop-all", &[]);
    gw.wait_status(T, "reconnected after drop-all", |s| {
        s.uplink
            .as_ref()
            .is_some_and(|u| u.state == "connected" && u.connects == 2)
    });
    assert_eq!(sim.counter("connections"), 1);

    // 2. The broker refuses new connections for a while and drops the current one.
    let refuse = Duration::from_secs(8);
    // t0 before the refusal starts, so a reconnect after its end is `refuse` or more after t0
    // (taken after `fault refuse` returned, t0 left only that command's exit time as slack).
    let t0 = Instant::now();
    sim.fault("refuse", &["--seconds", &refuse.as_secs().to_string()]);
    sim.fault("drop-all", &[]);
    let back = gw.wait_status(T, "reconnected after the refusal ended", |s| {
        s.uplink
            .as_ref()
            .is_some_and(|u| u.state == "connected" && u.connects == 3)
    });
    let took = t0.elapsed();
    assert!(took >= refuse, "reconnected during the refusal? {took:?}");
    // Backoff 0.5 s doubling to 4 s: the retry after the refusal ends comes within ~4 s; a
    // daemon that took the hang-ups for a credential refusal would wait permanent_retry (1 h).
    assert!(
        took < refuse + Duration::from_secs(6),
        "reconnected {took:?} after the drop"
    );
    let c = sim.counters();
    let refused = c["refused_connections"].as_u64().unwrap();
    assert!(
        (2..=8).contains(&refused),
        "{refused} CONNECT attempts refused in {refuse:?}"
    );
    assert_eq!(c["connections"].as_u64().unwrap(), 2, "{c:#}");
    assert_eq!(c["throttled_connects"].as_u64().unwrap(), 0, "{c:#}");
    assert_eq!(c["connected_clients"], serde_json::json!(["gw-0001"]));
    assert!(back.uplink.unwrap().last_error.is_none());
    assert_eq!(back.identity.stage, "active");
    assert_eq!(sim.device_certs().len(), 1);
    assert!(gw.error_lines().is_empty(), "{}", gw.log_text());
    assert!(gw.stop().success());
}

/// `retry_in_ms=` of each "provisioning step failed; retrying" line.
fn provisioning_retries(gw: &Gateway) -> Vec<(String, u64)> {
    gw.log_text()
        .lines()
        .filter(|l| l.contains("provisioning step failed; retrying"))
        .map(|l| {
            let ms = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("retry_in_ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no retry_in_ms in {l}"));
            (l.to_owned(), ms)
        })
        .collect()
}

#[test]
fn transient_provisioning_rejections_are_retried_with_backoff() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    sim.serve(&[]);
    sim.fault(
        "reject-next",
        &[
            "--count",
            "2",
            "--status",
            "503",
            "--code",
            "ServiceUnavailableException",
        ],
    );
    let mut gw = Gateway::configure(&tmp.path().join("gw"), &sim, "", "");
    gw.start(&[]);
    let s = gw.wait_active(T);
    let c = sim.counters();
    assert_eq!(c["injected_rejections"], 2, "{c:#}");
    assert_eq!(
        c["publishes_by_topic"]["$aws/certificates/create-from-csr/json"], 3,
        "{c:#}"
    );
    let retries = provisioning_retries(&gw);
    assert_eq!(retries.len(), 2, "{retries:#?}");
    for (line, ms) in &retries {
        assert!(line.contains("ServiceUnavailableException"), "{line}");
        // Engine backoff: 2 s doubling, equal jitter, so never under 1 s.
        assert!(*ms >= 1000, "{line}");
    }
    assert!(gw.error_lines().is_empty(), "{}", gw.log_text());
    assert_eq!(sim.things().len(), 1);
    assert_eq!(sim.device_certs().len(), 1);
    assert!(s.identity.orphaned_certificates.is_empty());
    assert!(gw.stop().success());
}

#[test]
fn throttled_provisioning_is_retried_until_the_quota_allows() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    // One CreateCertificateFromCsr per 4 s. The first call takes the only token and then gets
    // the injected ThrottlingException, so the retry (backoff 1-2 s) meets the quota for sure.
    sim.serve(&["--create-from-csr-tps", "0.25"]);
    // And the very first call gets AWS's ThrottlingException injected.
    sim.fault(
        "reject-next",
        &[
            "--count",
            "1",
            "--status",
            "429",
            "--code",
            "ThrottlingException",
            "--message",
            "Rate exceeded",
        ],
    );
    let mut gw = Gateway::configure(&tmp.path().join("gw"), &sim, "", "");
    gw.start(&[]);
    let s = gw.wait_active(Duration::from_secs(60));
    let c = sim.counters();
    assert_eq!(c["injected_rejections"], 1, "{c:#}");
    assert!(
        c["throttled_provisioning_calls"].as_u64().unwrap() >= 1,
        "{c:#}"
    );
    let retries = provisioning_retries(&gw);
    assert!(retries.len() >= 2, "{retries:#?}");
    for (line, ms) in &retries {
        assert!(line.contains("ThrottlingException"), "{line}");
        assert!(*ms >= 1000, "{line}");
    }
    assert!(gw.error_lines().is_empty(), "{}", gw.log_text());
    assert_eq!(sim.things().len(), 1);
    assert_eq!(
        sim.device_certs().len(),
        1,
        "throttled calls create nothing"
    );
    assert!(s.identity.orphaned_certificates.is_empty());
    assert!(gw.stop().success());
}
