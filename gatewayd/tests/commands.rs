//! The downstream bridge end to end: a real gatewayd and iotcore-sim with the README's gateway
//! and child templates (so the README's gateway policy is what allows the gateway to subscribe
//! to `cmd/<its thing>/...`), and a "cloud application" with an emulator certificate that
//! publishes commands with `mosquitto_pub` on `cmd/<gateway>/<child thing>/...` and reads results
//! with `mosquitto_sub` on `gw/#`. Commands reach a Modbus child (pymodbus `sim.py`) as validated
//! register writes and MQTT children (`mosquitto_sub`) that were offline when they were sent,
//! in order, after a kill -9 of the gateway too; results and expiry notices come back.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use gatewayd::daemon::status::DownlinkStatus;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn have_mosquitto() -> bool {
    Command::new("mosquitto_pub").arg("--help").output().is_ok()
}

/// Prints the gateway's log when the test fails.
struct LogOnPanic(PathBuf);
impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("gatewayd log tail (newest first):\n{}", tail.join("\n"));
        }
    }
}

fn setup(dir: &Path, extra: &str) -> (Sim, Gateway) {
    let sim = sim_with_readme_templates(
        dir,
        &[
            ("ReadmeTemplate", "<!-- gateway-template"),
            ("ChildTemplate", "<!-- child-template"),
        ],
        &[],
    );
    let gw = Gateway::configure(&dir.join("gw"), &sim, "", "");
    gw.dropin(
        "50-commands.toml",
        &format!(
            "[provisioning]\ntemplate = \"ReadmeTemplate\"\n\n[children]\ntemplate = \"ChildTemplate\"\nadmission = \"auto\"\nretry_initial_ms = 200\nretry_max_secs = 2\n\n{extra}\n"
        ),
    );
    (sim, gw)
}

/// A cloud application: an emulator certificate whose policy allows sending commands and
/// reading what the gateways publish.
fn app_credentials(sim: &Sim, dir: &Path) -> (PathBuf, PathBuf) {
    let policy = dir.join("app-policy.json");
    std::fs::write(
        &policy,
        r#"{"Version":"2012-10-17","Statement":[
          {"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:*:*:client/app-*"},
          {"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:*:*:topic/cmd/*"},
          {"Effect":"Allow","Action":"iot:Subscribe","Resource":"arn:aws:iot:*:*:topicfilter/gw/*"},
          {"Effect":"Allow","Action":"iot:Receive","Resource":"arn:aws:iot:*:*:topic/gw/*"}]}"#,
    )
    .unwrap();
    sim.admin(
        &["policies", "add", "--name", "AppPolicy"],
        &["--document", policy.to_str().unwrap()],
    );
    let prefix = dir.join("app");
    let text = sim.admin(
        &["certs", "create", "--out", prefix.to_str().unwrap()],
        &["--policy", "AppPolicy"],
    );
    let get = |k: &str| -> PathBuf {
        PathBuf::from(
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("certs create printed no {k}: {text}")),
        )
    };
    (get("cert"), get("key"))
}

/// Lines of a `mosquitto_sub -v` ("topic payload"), read as they come.
struct Lines {
    _proc: Killed,
    rx: mpsc::Receiver<String>,
}

impl Lines {
    fn spawn(cmd: &mut Command) -> Lines {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            _proc: Killed(child),
            rx,
        }
    }

    /// The next line on `topic` whose payload `f` accepts, within `timeout`.
    fn wait<R>(
        &self,
        topic: &str,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&str) -> Option<R>,
    ) -> R {
        let end = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            let Ok(line) = self.rx.recv_timeout(left) else {
                break;
            };
            let (t, payload) = line.split_once(' ').unwrap_or((&line, ""));
            if t == topic
                && let Some(r) = f(payload)
            {
                return r;
            }
            seen.push(line);
        }
        panic!("no {what} on {topic} within {timeout:?}; saw {seen:?}");
    }

    /// The next `n` lines, within `timeout` in all.
    fn take(&self, n: usize, timeout: Duration) -> Vec<String> {
        let end = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n
            && let Some(left) = end.checked_duration_since(Instant::now())
        {
            match self.rx.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(_) => break,
            }
        }
        out
    }

    /// Every line that arrives within `d`.
    fn drain(&self, d: Duration) -> Vec<String> {
        let end = Instant::now() + d;
        let mut out = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(_) => break,
            }
        }
        out
    }
}

fn cloud_sub(sim: &Sim, (cert, key): &(PathBuf, PathBuf)) -> Lines {
    Lines::spawn(
        Command::new("mosquitto_sub")
            .args(["-h", "localhost", "-p", &sim.port.to_string(), "--cafile"])
            .arg(&sim.root_ca)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(["-i", "app-sub", "-q", "1", "-t", "gw/#", "-v"]),
    )
}

/// One `mosquitto_pub` per command, each with a client id of its own (the emulator, like AWS,
/// allows one CONNECT per second per client id).
fn cloud_pub(sim: &Sim, (cert, key): &(PathBuf, PathBuf), topic: &str, msg: &str) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let id = format!(
        "app-pub-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let o = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &sim.port.to_string(), "--cafile"])
        .arg(&sim.root_ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(["-i", &id, "-q", "1", "-t", topic, "-m", msg])
        .output()
        .unwrap();
    assert!(o.status.success(), "mosquitto_pub to the cloud: {o:?}");
}

fn thing_of(gw: &Gateway, id: &str) -> Option<String> {
    let (code, out) = gatewayctl(gw, &["children", "show", id, "--json"]);
    if code != 0 {
        return None;
    }
    let v: Value = serde_json::from_str(&out).ok()?;
    v["thing_name"].as_str().map(str::to_owned)
}

fn downlink(gw: &Gateway) -> DownlinkStatus {
    gw.status()
        .and_then(|s| s.bridge)
        .and_then(|b| b.downlink)
        .unwrap_or_default()
}

fn wait_downlink(gw: &Gateway, what: &str, f: impl Fn(&DownlinkStatus) -> bool) -> DownlinkStatus {
    wait_until(T, what, || {
        let d = downlink(gw);
        f(&d).then_some(d)
    })
}

/// The gateway's thing name once it is active and subscribed to its commands.
fn ready(gw: &mut Gateway) -> (String, String) {
    let s = gw.wait_active(T);
    let gateway = s.identity.thing_name.unwrap();
    let want = format!("cmd/{gateway}/+/#");
    wait_downlink(gw, "the command subscription", |d| {
        d.subscribed == [want.clone()]
    });
    let tls = s
        .local
        .unwrap()
        .listeners
        .iter()
        .find(|l| l.starts_with("mqtts://"))
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    (gateway, tls)
}

const PROFILE: &str = r#"
[[modbus.profiles]]
name = "meter"
template = "ChildTemplate"
match = { vendor = "Acme*" }

[[modbus.profiles.points]]
name = "setpoint"
function = "holding"
address = 0
data_type = "uint16"
unit = "%"
writable = true
min = 0.0
max = 100.0
"#;

#[test]
fn cloud_commands_reach_a_modbus_child_as_validated_writes_and_results_come_back() {
    if !have_mosquitto() {
        eprintln!("SKIP: mosquitto-clients not installed (tests/run-all installs them)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_device, port) = modbus_sim(
        dir,
        r#"{"1": {"holding": [50],
                  "identity": {"0": "Acme Meters", "1": "AM-3", "2": "1.2", "128": "SN-0042"}}}"#,
    );
    let (sim, mut gw) = setup(
        dir,
        &format!(
            "[discovery]\npoll_interval_ms = 200\n\n[modbus]\nrequest_timeout_ms = 500\nunit_ids = [\"1\"]\n\n[[modbus.tcp]]\nhosts = [\"127.0.0.1\"]\nports = [{port}]\n{PROFILE}"
        ),
    );
    let _log = LogOnPanic(gw.log.clone());
    gw.start(&[]);
    let (gateway, _) = ready(&mut gw);
    let child = "meter-SN-0042";
    let thing = wait_until(T, "the meter provisioned", || thing_of(&gw, child));
    let app = app_credentials(&sim, dir);
    let cloud = cloud_sub(&sim, &app);
    std::thread::sleep(Duration::from_millis(1000));
    let cmd = format!("cmd/{gateway}/{thing}/write");
    let results = format!("gw/{gateway}/{thing}/write-result");

    cloud_pub(
        &sim,
        &app,
        &cmd,
        r#"{"point":"setpoint","value":75,"id":"c1"}"#,
    );
    let r: Value = cloud.wait(&results, T, "the result of c1", |p| {
        serde_json::from_str::<Value>(p)
            .ok()
            .filter(|v| v["id"] == "c1")
    });
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["point"], "setpoint", "{r}");
    assert_eq!(r["value"], 75, "{r}");
    // The device has it: the next poll reads 75 back (the document goes up too).
    cloud.wait(
        &format!("gw/{gateway}/{thing}/telemetry"),
        T,
        "setpoint 75 read back",
        |p| {
            let v: Value = serde_json::from_str(p).ok()?;
            (v["values"]["setpoint"]["value"] == 75).then_some(())
        },
    );
    // Out of range: refused with the reason, the register unchanged.
    cloud_pub(
        &sim,
        &app,
        &cmd,
        r#"{"point":"setpoint","value":101,"id":"c2"}"#,
    );
    let r: Value = cloud.wait(&results, T, "the result of c2", |p| {
        serde_json::from_str::<Value>(p)
            .ok()
            .filter(|v| v["id"] == "c2")
    });
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap_or_default();
    assert!(e.contains("refused") && e.contains("101"), "{r}");
    let d = wait_downlink(&gw, "both commands delivered", |d| d.delivered == 2);
    assert_eq!((d.received, d.queued, d.expired), (2, 0, 0), "{d:?}");
    // A command for a thing that is no child of this gateway: acknowledged, counted, logged.
    cloud_pub(&sim, &app, &format!("cmd/{gateway}/stranger/write"), "{}");
    wait_downlink(&gw, "the unknown thing counted", |d| d.unknown_thing == 1);
    assert_eq!(
        gw.log_lines_with("no child of this gateway", "stranger")
            .len(),
        1
    );
    let (code, text) = gatewayctl(&gw, &["status"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("commands:  2 received, 2 delivered, 0 queued"),
        "{text}"
    );
}

/// A child as a `mosquitto_sub` on `cmd/<id>/#` (QoS 1).
fn child_sub(port: &str, ca: &Path, id: &str, pw: &str) -> Lines {
    Lines::spawn(
        Command::new("mosquitto_sub")
            .args(["-h", "localhost", "-p", port, "--cafile"])
            .arg(ca)
            .args(["-i", id, "-u", id, "-P", pw, "-q", "1", "-v", "-t"])
            .arg(format!("cmd/{id}/#")),
    )
}

/// Registers `id` as a password child and offers it for provisioning; returns the password.
fn add_child(gw: &Gateway, id: &str, serial: &str) -> String {
    let (code, text) = gatewayctl(gw, &["children", "add", id, "--password"]);
    assert_eq!(code, 0, "{text}");
    let pw = text
        .lines()
        .find_map(|l| l.split("): ").nth(1))
        .unwrap()
        .trim()
        .to_owned();
    let (code, text) = gatewayctl(
        gw,
        &["children", "add", id, "--provision", "--serial", serial],
    );
    assert_eq!(code, 0, "{text}");
    pw
}

#[test]
fn offline_mqtt_children_get_their_commands_in_order_after_a_kill_9_and_expired_ones_are_reported()
{
    if !have_mosquitto() {
        eprintln!("SKIP: mosquitto-clients not installed (tests/run-all installs them)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    const EXPIRY: u64 = 6;
    let (sim, mut gw) = setup(dir, &format!("[bridge]\ncommand_expiry_secs = {EXPIRY}\n"));
    let _log = LogOnPanic(gw.log.clone());
    gw.start(&[]);
    let (gateway, port) = ready(&mut gw);
    let (_, ca) = gatewayctl(&gw, &["local", "ca"]);
    let ca_file = dir.join("local-ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let pw1 = add_child(&gw, "c1", "SN-1");
    let pw2 = add_child(&gw, "c2", "SN-2");
    let t1 = wait_until(T, "c1 provisioned", || thing_of(&gw, "c1"));
    let t2 = wait_until(T, "c2 provisioned", || thing_of(&gw, "c2"));
    let app = app_credentials(&sim, dir);
    let cloud = cloud_sub(&sim, &app);
    std::thread::sleep(Duration::from_millis(1000));

    // c2 is away past the expiry: its command is dropped and the cloud told.
    cloud_pub(
        &sim,
        &app,
        &format!("cmd/{gateway}/{t2}/reboot"),
        r#"{"id":"r9"}"#,
    );
    let notice: Value = cloud.wait(
        &format!("gw/{gateway}/{t2}/command-expired"),
        T,
        "the expiry notice",
        |p| serde_json::from_str(p).ok(),
    );
    assert_eq!(notice["id"], "r9", "{notice}");
    assert_eq!(notice["topic"], "cmd/c2/reboot", "{notice}");
    assert!(
        notice["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("expired"),
        "{notice}"
    );
    let d = wait_downlink(&gw, "the expiry counted", |d| d.expired == 1);
    assert_eq!(d.queued, 0, "{d:?}");
    let c2 = child_sub(&port, &ca_file, "c2", &pw2);
    let late = c2.drain(Duration::from_millis(1500));
    assert!(
        late.is_empty(),
        "an expired command was delivered: {late:?}"
    );

    // c1 is offline while two commands are sent; it gets both, in order, when it connects.
    cloud_pub(&sim, &app, &format!("cmd/{gateway}/{t1}/set"), "one");
    cloud_pub(&sim, &app, &format!("cmd/{gateway}/{t1}/set/fan"), "two");
    wait_downlink(&gw, "c1's commands queued", |d| {
        d.per_child.get("c1") == Some(&2)
    });
    let c1 = child_sub(&port, &ca_file, "c1", &pw1);
    let got = c1.take(2, T);
    assert_eq!(got, ["cmd/c1/set one", "cmd/c1/set/fan two"], "in order");
    let d = wait_downlink(&gw, "c1's commands off the disk", |d| {
        !d.per_child.contains_key("c1")
    });
    assert_eq!(d.delivered, 2, "{d:?}");
    drop(c1);

    // A command arrives while c1 is away, the gateway is killed; after the restart c1 gets it.
    cloud_pub(&sim, &app, &format!("cmd/{gateway}/{t1}/set"), "three");
    wait_downlink(&gw, "the third command queued", |d| {
        d.per_child.get("c1") == Some(&1)
    });
    gw.kill9();
    gw.start(&[]);
    gw.wait_active(T);
    assert_eq!(downlink(&gw).per_child.get("c1"), Some(&1));
    let c1 = child_sub(&port_after_restart(&gw), &ca_file, "c1", &pw1);
    c1.wait(
        "cmd/c1/set",
        T,
        "the command kept across the kill -9",
        |p| (p == "three").then_some(()),
    );
    wait_downlink(&gw, "delivered after the restart", |d| {
        d.delivered == 1 && d.queued == 0
    });
    let (code, text) = gatewayctl(&gw, &["status"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("commands:  ") && text.contains("1 delivered"),
        "{text}"
    );
}

fn port_after_restart(gw: &Gateway) -> String {
    gw.status()
        .and_then(|s| s.local)
        .unwrap()
        .listeners
        .iter()
        .find(|l| l.starts_with("mqtts://"))
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned()
}
