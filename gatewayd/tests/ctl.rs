//! What an admin sees when gatewayctl cannot ask, and when a second daemon is started on the same
//! state directory: plain words and distinct exit codes, from the real binaries.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// `gatewayctl status`, as root or as `nobody` (a user outside group `gatewayd`).
fn ctl(gw: &Gateway, as_nobody: bool) -> (i32, String) {
    if !as_nobody {
        return gatewayctl(gw, &["status"]);
    }
    run_to_end(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(gatewayctl_bin())
            .arg("--socket")
            .arg(&gw.socket)
            .arg("status"),
    )
}

#[test]
fn not_running_permission_denied_and_a_second_daemon_are_named_plainly() {
    let tmp = tempfile::tempdir().unwrap();
    let (_sim, mut gw) = serving_sim_and_gateway(tmp.path());

    let (code, text) = ctl(&gw, false);
    assert_eq!(code, 69, "{text}");
    assert!(text.contains("gatewayd is not running"), "{text}");
    assert!(!text.contains("os error"), "{text}");

    gw.start(&[]);
    gw.wait_active(Duration::from_secs(20));
    let (code, text) = ctl(&gw, false);
    assert_eq!(code, 0, "{text}");

    // `identity`: a table by default, the snapshot's identity object with --json.
    let identity = |json: bool| {
        let mut cmd = Command::new(gatewayctl_bin());
        cmd.arg("--socket").arg(&gw.socket).arg("identity");
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let table = identity(false);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("stage ") && l.ends_with(" active")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("thing ") && l.ends_with(" gw-0001")),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&identity(true)).unwrap();
    assert_eq!(json["thing_name"], "gw-0001", "{json}");
    assert_eq!(json["stage"], "active", "{json}");

    // Root runs the tests; a user outside the socket's group is refused by its mode (0660).
    let me = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    if me.unwrap() == 0 {
        let (code, text) = ctl(&gw, true);
        assert_eq!(code, 77, "{text}");
        assert!(text.contains("permission denied"), "{text}");
        assert!(text.contains("member of group `gatewayd`"), "{text}");
    }

    // A second daemon on the same state directory names the first and leaves it alone.
    let second = Command::new(gatewayd_bin())
        .args(["run", "--config"])
        .arg(&gw.config)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert!(!second.status.success());
    let text = String::from_utf8_lossy(&second.stderr);
    assert!(
        text.contains(&format!("another gatewayd (pid {}) uses", gw.pid())),
        "{text}"
    );
    assert!(gw.is_running());
    assert_eq!(
        ctl(&gw, false).0,
        0,
        "the first daemon's socket must survive"
    );
    gw.stop();
}
