//! An operator's first hour: a cause fixed in the cloud is picked up at once on request
//! (`gatewayctl retry` or SIGHUP), and otherwise within a minute, not a quarter hour.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(20);

/// A gateway whose template does not exist yet in the cloud: it fails permanently.
fn missing_template(tmp: &std::path::Path) -> (Sim, Gateway) {
    let mut sim = Sim::init(&tmp.join("sim"), None);
    sim.serve(&[]);
    let mut gw = Gateway::configure(&tmp.join("gw"), &sim, "", "");
    let text = std::fs::read_to_string(&gw.config).unwrap().replace(
        "template = \"GatewayTemplate\"",
        "template = \"SiteTemplate\"",
    );
    std::fs::write(&gw.config, text).unwrap();
    gw.start(&[]);
    let s = gw.wait_status(T, "a permanent error and a scheduled retry", |s| {
        s.identity.waiting_to_retry && s.identity.last_error.as_ref().is_some_and(|e| e.permanent)
    });
    let e = s.identity.last_error.unwrap();
    assert!(e.message.contains("SiteTemplate"), "{e:?}");
    // The first retry comes within a minute, not after `permanent_retry_secs` (3600 here).
    let wait = e.retry_at_unix.unwrap() - e.at_unix;
    assert!(
        (30..=60).contains(&wait),
        "first permanent retry in {wait} s"
    );
    (sim, gw)
}

fn add_template(sim: &Sim) {
    let body = sim.dir.join("template.json");
    sim.admin(
        &["template", "add", "--name", "SiteTemplate"],
        &["--body", body.to_str().unwrap()],
    );
}

#[test]
fn template_fixed_in_the_cloud_then_gatewayctl_retry_recovers_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = missing_template(tmp.path());
    let (code, text) = gatewayctl(&gw, &["status"]);
    assert_eq!(code, 0);
    assert!(text.contains("next attempt: in"), "{text}");
    add_template(&sim);
    let fixed = Instant::now();
    let (code, text) = gatewayctl(&gw, &["retry"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("retrying now"), "{text}");
    let s = gw.wait_active(T);
    let took = fixed.elapsed();
    eprintln!("MEASURE template fixed + gatewayctl retry: active {took:?} later");
    assert!(
        took < Duration::from_secs(10),
        "recovered {took:?} after the fix"
    );
    assert_eq!(s.identity.thing_name.as_deref(), Some("gw-0001"));
    assert!(!s.identity.waiting_to_retry);
    // Nothing left to retry: said so, exit 1.
    let (code, text) = gatewayctl(&gw, &["retry"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("nothing to retry"), "{text}");
    assert_eq!(gw.error_lines().len(), 1, "{}", gw.log_text());
    gw.stop();
}

#[test]
fn sighup_retries_now_and_keeps_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = missing_template(tmp.path());
    add_template(&sim);
    let fixed = Instant::now();
    gw.signal("HUP");
    gw.wait_active(T);
    eprintln!(
        "MEASURE template fixed + SIGHUP: active {:?} later",
        fixed.elapsed()
    );
    assert!(fixed.elapsed() < Duration::from_secs(10));
    assert!(gw.is_running());
    let hup = gw.log_lines_with("SIGHUP: retrying now", "not reloaded");
    assert_eq!(hup.len(), 1, "{}", gw.log_text());
    // Once active, SIGHUP is harmless and says why nothing happens.
    gw.signal("HUP");
    wait_until(T, "the SIGHUP line", || {
        (!gw.log_lines_with("SIGHUP", "nothing to retry").is_empty()).then_some(())
    });
    assert!(gw.is_running());
    assert!(gw.stop().success());
}

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// A board without a real-time clock boots two days behind; NTP then sets the clock. The daemon
/// names the clock (not the cloud) and goes on within seconds of the clock being set.
#[test]
fn clock_behind_the_certificate_is_named_and_retried_when_the_clock_moves() {
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing: install the `faketime` package (tests/run-all does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let (_sim, mut gw) = serving_sim_and_gateway(tmp.path());
    let clock = tmp.path().join("clock");
    std::fs::write(&clock, "-2d\n").unwrap();
    let clock_s = clock.display().to_string();
    gw.start(&[
        ("LD_PRELOAD", LIBFAKETIME),
        ("FAKETIME_TIMESTAMP_FILE", &clock_s),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]);
    let s = gw.wait_status(T, "the clock named as the cause", |s| {
        s.identity
            .last_error
            .as_ref()
            .is_some_and(|e| e.message.contains("system clock"))
    });
    let e = s.identity.last_error.unwrap();
    assert!(
        e.message
            .contains("before the claim certificate's validity start"),
        "{e:?}"
    );
    assert!(!e.permanent, "{e:?}");
    assert!(
        !e.message.contains("refused"),
        "not blamed on the cloud: {e:?}"
    );
    assert_eq!(
        e.retry_at_unix, None,
        "it waits for the clock, not a timer: {e:?}"
    );
    // NTP sets the clock.
    std::fs::write(&clock, "+0\n").unwrap();
    let set = Instant::now();
    gw.wait_active(T);
    eprintln!("MEASURE clock set: active {:?} later", set.elapsed());
    assert!(
        set.elapsed() < Duration::from_secs(5),
        "active {:?} after the clock was set",
        set.elapsed()
    );
    let errors = gw.error_lines();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("system clock"), "{errors:#?}");
    gw.stop();
}

/// The template block of the README, as an operator copies it.
fn readme_template() -> String {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("<!-- gateway-template")
        .expect("README has the gateway template block");
    let block = &readme[start..];
    let body = &block[block.find("```json").unwrap() + 7..];
    body[..body.find("```").unwrap()].to_owned()
}

/// The shipped pair, copied as is: the README's template and the example config's
/// `expected_thing_name`. A RegisterThing whose answer is lost to a crash ends with one
/// certificate, recovered by connecting as the thing the template names.
#[test]
fn readme_template_and_example_config_recover_a_lost_answer_with_one_certificate() {
    let example = include_str!("../gatewayd.example.toml");
    let expected = example
        .lines()
        .find_map(|l| l.strip_prefix("expected_thing_name = "))
        .expect("the example config sets expected_thing_name");
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    let body = tmp.path().join("readme-template.json");
    std::fs::write(&body, readme_template()).unwrap();
    sim.admin(
        &["template", "add", "--name", "ReadmeTemplate"],
        &["--body", body.to_str().unwrap()],
    );
    sim.serve(&[]);
    let mut gw = Gateway::configure(&tmp.path().join("gw"), &sim, "", "");
    gw.dropin(
        "50-readme.toml",
        &format!(
            "[provisioning]\ntemplate = \"ReadmeTemplate\"\nexpected_thing_name = {expected}\n"
        ),
    );
    gw.start(&[("GATEWAYD_CRASH_AFTER", "register-sent")]);
    assert_eq!(gw.wait_exit(T).signal(), Some(6), "{}", gw.log_text());
    gw.start(&[]);
    let s = gw.wait_active(T);
    assert_eq!(s.identity.thing_name.as_deref(), Some("gw-0001"));
    let certs = sim.device_certs();
    assert_eq!(certs.len(), 1, "{certs:#?}");
    assert!(s.identity.possibly_active_certificates.is_empty());
    assert!(
        gw.log_text()
            .contains("the earlier RegisterThing had completed")
    );
    let things = sim.things();
    assert_eq!(things.len(), 1, "{things:?}");
    gw.stop();
}

/// A restart within a second of the last CONNECT waits out the rest of the cloud's
/// one-CONNECT-per-second rule instead of being throttled.
#[test]
fn a_quick_restart_is_not_throttled_by_the_connect_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = serving_sim_and_gateway(tmp.path());
    gw.start(&[]);
    gw.wait_active(T);
    for _ in 0..3 {
        assert!(gw.stop().success());
        gw.start(&[]);
        gw.wait_active(T);
    }
    assert_eq!(sim.counter("throttled_connects"), 0, "{}", gw.log_text());
    gw.stop();
}

/// A CreateCertificateFromCsr whose PUBACK never comes may still have made a certificate in the
/// cloud: it is counted as an unconfirmed request, like an answer lost to a crash.
#[test]
fn a_lost_puback_during_provisioning_is_counted_as_unconfirmed() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = serving_sim_and_gateway(tmp.path());
    gw.dropin("50-timeout.toml", "[provisioning]\ncall_timeout_secs = 2\n");
    sim.fault("stall-acks", &["--seconds", "3"]);
    gw.start(&[]);
    let s = gw.wait_active(T);
    assert!(
        gw.log_text()
            .contains("CreateCertificateFromCsr: no PUBACK within 2s"),
        "{}",
        gw.log_text()
    );
    assert_eq!(
        s.identity.unconfirmed_certificate_requests, 1,
        "{:?}",
        s.identity
    );
    // The cloud did make a certificate for the unacknowledged request: it stays pending.
    let certs = sim.device_certs();
    assert_eq!(certs.len(), 2, "{certs:#?}");
    assert_eq!(
        certs.iter().filter(|c| c["status"] == "ACTIVE").count(),
        1,
        "{certs:#?}"
    );
    gw.stop();
}

/// A claim deactivated in the cloud, then activated again by the operator: `gatewayctl retry`
/// picks it up at once. Before, the refusal counted as permanent for 900 s.
#[test]
fn claim_activated_again_then_retry_recovers_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    sim.admin(&["certs", "deactivate"], &["--id", &sim.claim_id()]);
    sim.serve(&[]);
    let mut gw = Gateway::configure(&tmp.path().join("gw"), &sim, "", "");
    gw.start(&[]);
    let s = gw.wait_status(T, "the claim refused, a retry scheduled", |s| {
        s.identity.waiting_to_retry && s.identity.last_error.as_ref().is_some_and(|e| e.permanent)
    });
    assert!(s.identity.last_error.unwrap().message.contains("claim"));
    sim.admin(&["certs", "activate"], &["--id", &sim.claim_id()]);
    let fixed = Instant::now();
    let (code, text) = gatewayctl(&gw, &["retry"]);
    assert_eq!(code, 0, "{text}");
    gw.wait_active(T);
    eprintln!(
        "MEASURE claim activated + gatewayctl retry: active {:?} later",
        fixed.elapsed()
    );
    assert!(
        fixed.elapsed() < Duration::from_secs(10),
        "{:?}",
        fixed.elapsed()
    );
    assert_eq!(gw.error_lines().len(), 1, "{}", gw.log_text());
    gw.stop();
}

/// The gateway's own certificate deactivated in the cloud, then activated again: the refusal is
/// retried within a minute (not `permanent_retry_secs`), and `gatewayctl retry` connects at once.
#[test]
fn thing_certificate_activated_again_then_retry_reconnects_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = serving_sim_and_gateway(tmp.path());
    gw.start(&[]);
    let s = gw.wait_active(T);
    let cert = s.identity.certificate_id.unwrap();
    sim.admin(&["certs", "deactivate"], &["--id", &cert]);
    let refused = gw.wait_status(T, "the thing connection refused", |s| {
        s.uplink.as_ref().is_some_and(|u| u.state == "refused")
    });
    assert!(refused.uplink.unwrap().last_error.is_some());
    let warn = gw.log_lines_with(" WARN ", "permanent=true");
    assert_eq!(warn.len(), 1, "{}", gw.log_text());
    let wait: u64 = warn[0]
        .split("retry_in_ms=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(wait <= 60_000, "first retry of a refusal in {wait} ms");
    sim.admin(&["certs", "activate"], &["--id", &cert]);
    let fixed = Instant::now();
    let (code, text) = gatewayctl(&gw, &["retry"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("connecting now"), "{text}");
    gw.wait_status(T, "connected again", |s| {
        s.uplink.as_ref().is_some_and(|u| u.state == "connected")
    });
    eprintln!(
        "MEASURE thing certificate activated + gatewayctl retry: connected {:?} later",
        fixed.elapsed()
    );
    assert!(fixed.elapsed() < Duration::from_secs(10));
    assert_eq!(sim.device_certs().len(), 1, "no re-provisioning");
    gw.stop();
}
