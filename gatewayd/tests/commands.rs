//! The downstream bridge end to end: a real gatewayd and iotcore-sim with the README's gateway
//! and child templates (so the README's gateway policy is what allows the gateway to subscribe
//! to `cmd/<its thing>/...`), and a "cloud application" with an emulator certificate that
//! publishes commands with `mosquitto_pub` on `cmd/<gateway>/<child thing>/...` and reads results
//! with `mosquitto_sub` on `gw/#`. Commands reach a Modbus child (pymodbus `sim.py`) as validated
//! register writes and MQTT children (`mosquitto_sub`) that were offline when they were sent,
//! in order, after a kill -9 of the gateway too; results and expiry notices come back.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use gatewayd::daemon::status::DownlinkStatus;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

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

/// Lines of a `mosquitto_sub -v` ("topic payload"), read as they come.
struct Lines {
    _proc: Killed,
    rx: mpsc::Receiver<String>,
}

impl Lines {
    fn spawn(cmd: &mut Command) -> Lines {
        let (proc, rx) = spawn_lines(cmd.stderr(Stdio::null()));
        Lines { _proc: proc, rx }
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
    let (sim, mut gw) = readme_gateway(
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
    let app = cloud_app_credentials(&sim, dir);
    let cloud = cloud_sub(&sim, &app);
    std::thread::sleep(Duration::from_millis(1000));
    let cmd = format!("cmd/{gateway}/{thing}/write");
    let results = format!("gw/{gateway}/{thing}/write-result");

    // Sends a setpoint write from the cloud; the result with its id, as the cloud receives it.
    let write = |id: &str, value: u32| -> Value {
        let body = format!(r#"{{"point":"setpoint","value":{value},"id":"{id}"}}"#);
        cloud_pub(&sim, &app, &cmd, &body);
        cloud.wait(&results, T, &format!("the result of {id}"), |p| {
            serde_json::from_str::<Value>(p)
                .ok()
                .filter(|v| v["id"] == id)
        })
    };
    let r = write("c1", 75);
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
    let r = write("c2", 101);
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
    let (sim, mut gw) = readme_gateway(dir, &format!("[bridge]\ncommand_expiry_secs = {EXPIRY}\n"));
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
    let app = cloud_app_credentials(&sim, dir);
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

/// A raw MQTT 3.1.1 client, so the test decides when (and whether) a PUBACK is sent.
mod raw {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        let mut n = body.len();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        out
    }

    pub async fn read(s: &mut TcpStream) -> (u8, Vec<u8>) {
        let first = s.read_u8().await.unwrap();
        let (mut len, mut mult) = (0usize, 1usize);
        loop {
            let b = s.read_u8().await.unwrap();
            len += (b & 0x7f) as usize * mult;
            mult *= 128;
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; len];
        s.read_exact(&mut body).await.unwrap();
        (first, body)
    }

    /// Connects as `id` with its password and subscribes to `filter` at `qos`.
    pub async fn session(
        addr: std::net::SocketAddr,
        id: &str,
        pw: &str,
        filter: &str,
        qos: u8,
    ) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut b = Vec::new();
        string(&mut b, b"MQTT");
        b.extend_from_slice(&[4, 0xC2, 0, 60]);
        string(&mut b, id.as_bytes());
        string(&mut b, id.as_bytes());
        string(&mut b, pw.as_bytes());
        s.write_all(&packet(0x10, &b)).await.unwrap();
        let (h, body) = read(&mut s).await;
        assert_eq!((h, body), (0x20, vec![0, 0]), "CONNACK");
        let mut b = vec![0, 1];
        string(&mut b, filter.as_bytes());
        b.push(qos);
        s.write_all(&packet(0x82, &b)).await.unwrap();
        let (h, body) = read(&mut s).await;
        assert_eq!((h, body), (0x90, vec![0, 1, qos]), "SUBACK");
        s
    }

    /// The next PUBLISH: (topic, payload, packet id if QoS 1).
    pub async fn publish(s: &mut TcpStream) -> (String, Vec<u8>, Option<u16>) {
        let (h, body) = read(s).await;
        assert_eq!(h & 0xF0, 0x30, "PUBLISH expected, got {h:#x}");
        let tl = u16::from_be_bytes([body[0], body[1]]) as usize;
        let topic = String::from_utf8(body[2..2 + tl].to_vec()).unwrap();
        let mut rest = &body[2 + tl..];
        let pkid = if (h >> 1) & 3 > 0 {
            let id = u16::from_be_bytes([rest[0], rest[1]]);
            rest = &rest[2..];
            Some(id)
        } else {
            None
        };
        (topic, rest.to_vec(), pkid)
    }

    pub async fn puback(s: &mut TcpStream, pkid: u16) {
        let p = pkid.to_be_bytes();
        s.write_all(&[0x40, 2, p[0], p[1]]).await.unwrap();
    }
}

async fn within_10s<F: std::future::Future>(
    f: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(10), f).await
}

/// In-process endpoint and queue: a command leaves the disk only on the child's PUBACK (QoS 1),
/// and at once when sent on a QoS 0 subscription; one sent but not acknowledged is sent again in
/// the child's next session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_leaves_the_disk_only_on_the_childs_puback() {
    use gatewayd::bridge::downlink::{Downlink, system_clock};
    use gatewayd::children::{AddChild, Registry};
    use gatewayd::daemon::config::LocalConfig;
    use gatewayd::daemon::status::DownlinkService;
    use gatewayd::local::Endpoint;
    use gatewayd::outbox::Outbox;
    use gatewayd::store::Store;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let registry = Registry::open(store.clone()).unwrap();
    let outbox = Outbox::open(dir.path().join("outbox"), Default::default())
        .await
        .unwrap();
    let cfg = LocalConfig {
        tls_listen: vec![],
        tcp_listen: vec!["127.0.0.1:0".parse().unwrap()],
        ..LocalConfig::default()
    };
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let ep = Endpoint::start(
        &cfg,
        dir.path(),
        registry.clone(),
        outbox,
        &cancel,
        &tracker,
    )
    .await
    .unwrap();
    let q = Downlink::open(store, Duration::from_secs(3600), system_clock()).unwrap();
    ep.set_downlink(q.clone());
    let pw = registry
        .add(&AddChild {
            id: "c1".into(),
            password: true,
            ..Default::default()
        })
        .unwrap()
        .unwrap();
    let addr = ep.tcp_addrs()[0];
    let queued = |q: &Downlink| q.status().queued;

    q.push("c1", "cmd/c1/x", b"first").unwrap();
    // Delivered, not acknowledged, the session ends: still on disk.
    let mut s = raw::session(addr, "c1", &pw, "cmd/c1/#", 1).await;
    let (topic, payload, pkid) = within_10s(raw::publish(&mut s)).await.unwrap();
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("cmd/c1/x", &b"first"[..])
    );
    assert!(pkid.is_some());
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(queued(&q), 1, "{:?}", q.status());
    // The next session gets it again and acknowledges it: gone.
    let mut s = raw::session(addr, "c1", &pw, "cmd/c1/#", 1).await;
    let (topic, _, pkid) = within_10s(raw::publish(&mut s)).await.unwrap();
    assert_eq!(topic, "cmd/c1/x");
    raw::puback(&mut s, pkid.unwrap()).await;
    within_10s(async {
        while queued(&q) != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(q.status().delivered, 1);
    drop(s);
    // QoS 0 subscription: off the disk once sent.
    let mut s = raw::session(addr, "c1", &pw, "cmd/c1/#", 0).await;
    q.push("c1", "cmd/c1/y", b"second").unwrap();
    let (topic, _, pkid) = within_10s(raw::publish(&mut s)).await.unwrap();
    assert_eq!((topic.as_str(), pkid), ("cmd/c1/y", None));
    within_10s(async {
        while queued(&q) != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    cancel.cancel();
}
