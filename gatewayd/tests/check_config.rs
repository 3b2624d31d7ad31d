//! `check-config` catches what `run` would trip on, and `run` refuses the same way: the real
//! binaries, a real emulator's CA and claim, broken copies of them.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn check(gw: &Gateway) -> (i32, String) {
    run_to_end(
        Command::new(gatewayd_bin())
            .args(["check-config", "--config"])
            .arg(&gw.config),
    )
}

#[test]
fn broken_claim_is_refused_by_check_config_and_by_run_and_fixed_claim_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    sim.serve(&[]);
    let gw_dir = tmp.path().join("gw");
    let mut gw = Gateway::configure(&gw_dir, &sim, "", "");
    let (code, text) = check(&gw);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("configuration OK"), "{text}");

    // A claim key that is not the claim certificate's.
    let good = std::fs::read_to_string(&gw.config).unwrap();
    let other_key = gw_dir.join("other.key");
    std::fs::write(
        &other_key,
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    std::fs::write(
        &gw.config,
        good.replace(
            &sim.claim_key.display().to_string(),
            &other_key.display().to_string(),
        ),
    )
    .unwrap();
    // And a log level that is no level.
    std::fs::create_dir_all(gw_dir.join("conf.d")).unwrap();
    std::fs::write(
        gw_dir.join("conf.d/20-log.toml"),
        "[daemon]\nlog_level = \"warning\"\n",
    )
    .unwrap();
    let (code, text) = check(&gw);
    assert_eq!(code, 78, "{text}");
    assert!(
        text.contains("20-log.toml: key `daemon.log_level`"),
        "{text}"
    );
    assert!(text.contains("did you mean `warn`"), "{text}");
    std::fs::remove_file(gw_dir.join("conf.d/20-log.toml")).unwrap();
    let (code, text) = check(&gw);
    assert_eq!(code, 78, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].contains("gatewayd.toml: key `provisioning.claim_key`")
            && lines[0].contains("is not the private key of"),
        "{text}"
    );

    // `run` refuses the same way: exit 78, the same words, no state touched.
    gw.start(&[]);
    let status = gw.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(78));
    let log = std::fs::read_to_string(&gw.log).unwrap();
    assert!(log.contains("is not the private key of"), "{log}");
    assert!(!gw.state_dir.join("identity").exists());

    // Fixed: both pass.
    std::fs::write(&gw.config, good).unwrap();
    let (code, text) = check(&gw);
    assert_eq!(code, 0, "{text}");
}
