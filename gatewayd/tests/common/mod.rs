//! Test harness: the real `iotcore-sim` and `gatewayd` processes, temp dirs, port 0.
//!
//! `iotcore-sim` is another workspace crate's binary; `cargo test --workspace` (or
//! `cargo build -p iotcore-sim` first) puts it next to this test executable.

#![allow(clippy::unwrap_used, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use gatewayd::daemon::status::{self, Request, Snapshot};
use serde_json::Value;

pub fn sim_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/e2e-HASH → target/debug/iotcore-sim
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("iotcore-sim");
    assert!(
        bin.exists(),
        "iotcore-sim not found at {}: run `cargo test --workspace` or `cargo build -p iotcore-sim` first \
         (with the same CARGO_TARGET_DIR)",
        bin.display()
    );
    bin
}

pub fn gatewayd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_gatewayd")
}

pub fn gatewayctl_bin() -> &'static str {
    env!("CARGO_BIN_EXE_gatewayctl")
}

/// Runs a command to its end: (exit code, or -1 for a signal; stdout followed by stderr).
pub fn run_to_end(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `gatewayctl --socket <gw's> ARGS`.
pub fn gatewayctl(gw: &Gateway, args: &[&str]) -> (i32, String) {
    run_to_end(
        Command::new(gatewayctl_bin())
            .arg("--socket")
            .arg(&gw.socket)
            .args(args),
    )
}

pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub const TEMPLATE: &str = r#"{
  "Parameters": {
    "SerialNumber": {"Type": "String"},
    "AWS::IoT::Certificate::Id": {"Type": "String"}
  },
  "Resources": {
    "thing": {
      "Type": "AWS::IoT::Thing",
      "Properties": {
        "ThingName": {"Fn::Join": ["", ["gw-", {"Ref": "SerialNumber"}]]},
        "AttributePayload": {"serial": {"Ref": "SerialNumber"}}
      },
      "OverrideSettings": {"AttributePayload": "MERGE", "ThingTypeName": "REPLACE", "ThingGroups": "DO_NOTHING"}
    },
    "certificate": {
      "Type": "AWS::IoT::Certificate",
      "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}
    },
    "policy": {
      "Type": "AWS::IoT::Policy",
      "Properties": {"PolicyDocument": "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":\"iot:Connect\",\"Resource\":\"arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}\"},{\"Effect\":\"Allow\",\"Action\":[\"iot:Publish\",\"iot:Subscribe\",\"iot:Receive\"],\"Resource\":\"*\"}]}"}
    }
  },
  "DeviceConfiguration": {"site": "sim"}
}"#;

pub struct Sim {
    pub dir: PathBuf,
    pub root_ca: PathBuf,
    pub claim_cert: PathBuf,
    pub claim_key: PathBuf,
    pub port: u16,
    child: Option<Child>,
    _stdout: Option<BufReader<ChildStdout>>,
}

impl Sim {
    /// `iotcore-sim init` in `dir` plus template `GatewayTemplate` (with an optional hook).
    pub fn init(dir: &Path, hook: Option<&str>) -> Sim {
        let out = Command::new(sim_bin())
            .args(["init", "--dir"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "iotcore-sim init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let get = |k: &str| {
            PathBuf::from(
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{k}=")))
                    .unwrap_or_else(|| panic!("init printed no {k}: {text}")),
            )
        };
        let sim = Sim {
            dir: dir.to_path_buf(),
            root_ca: get("root_ca"),
            claim_cert: get("claim_cert"),
            claim_key: get("claim_key"),
            port: 0,
            child: None,
            _stdout: None,
        };
        let body = dir.join("template.json");
        std::fs::write(&body, TEMPLATE).unwrap();
        let mut args = vec!["template", "add", "--name", "GatewayTemplate"];
        if let Some(h) = hook {
            args.extend(["--hook", h]);
        }
        sim.admin(&args, &["--body", body.to_str().unwrap()]);
        sim
    }

    pub fn admin(&self, args: &[&str], more: &[&str]) -> String {
        let out = Command::new(sim_bin())
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .args(more)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "iotcore-sim {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, what: &str) -> Vec<Value> {
        serde_json::from_str(&self.admin(&[what, "list"], &[])).unwrap()
    }

    pub fn things(&self) -> Vec<Value> {
        self.json("things")
    }

    /// All certificates except the claim.
    pub fn device_certs(&self) -> Vec<Value> {
        let claim = self.claim_id();
        self.json("certs")
            .into_iter()
            .filter(|c| c["certificateId"] != claim.as_str())
            .collect()
    }

    pub fn claim_id(&self) -> String {
        gatewayd::identity::certificate_id(&std::fs::read(&self.claim_cert).unwrap()).unwrap()
    }

    /// `iotcore-sim counters` (JSON) of the running `serve`.
    pub fn counters(&self) -> Value {
        serde_json::from_str(&self.admin(&["counters"], &[])).unwrap()
    }

    /// A counter as a number (0 when absent).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters()[name].as_u64().unwrap_or(0)
    }

    /// `iotcore-sim fault <what> ...` against the running `serve`.
    pub fn fault(&self, what: &str, more: &[&str]) {
        self.admin(&["fault", what], more);
    }

    /// `iotcore-sim claim create` for `GatewayTemplate`: (certificate, key, certificate id).
    pub fn claim_create(&self, ttl_secs: u64) -> (PathBuf, PathBuf, String) {
        let ttl = ttl_secs.to_string();
        let text = self.admin(
            &["claim", "create"],
            &["--template", "GatewayTemplate", "--ttl-secs", &ttl],
        );
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("claim create printed no {k}: {text}"))
                .to_owned()
        };
        (
            PathBuf::from(get("claim_cert")),
            PathBuf::from(get("claim_key")),
            get("certificate_id"),
        )
    }

    /// Starts `serve` (port 0 the first time, the same port on restarts).
    pub fn serve(&mut self, extra: &[&str]) {
        let listen = format!("127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("sim.log"))
            .unwrap();
        let mut child = Command::new(sim_bin())
            .args(["serve", "--dir"])
            .arg(&self.dir)
            .args(["--listen", &listen])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from iotcore-sim: {line:?}"));
        self.port = addr.rsplit(':').next().unwrap().parse().unwrap();
        self.child = Some(child);
        self._stdout = Some(out);
        // `serve` binds its admin socket before it prints "listening on": `fault` and
        // `counters` work from here on.
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self._stdout = None;
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The usual start: an emulator serving under `dir/sim` and a gateway configured for it under
/// `dir/gw` (not started).
pub fn serving_sim_and_gateway(dir: &Path) -> (Sim, Gateway) {
    let mut sim = Sim::init(&dir.join("sim"), None);
    sim.serve(&[]);
    let gw = Gateway::configure(&dir.join("gw"), &sim, "", "");
    (sim, gw)
}

pub struct Gateway {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Gateway {
    /// Writes a config for `sim` under `dir`; `provisioning` and `extra` are appended TOML.
    pub fn configure(dir: &Path, sim: &Sim, provisioning: &str, extra: &str) -> Gateway {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("run/status.sock");
        let state_dir = dir.join("state");
        let config = dir.join("gatewayd.toml");
        let text = format!(
            r#"
[cloud]
endpoint = "localhost"
port = {port}
root_ca = "{ca}"

[provisioning]
template = "GatewayTemplate"
claim_cert = "{cc}"
claim_key = "{ck}"
call_timeout_secs = 5
permanent_retry_secs = 3600
{provisioning}

[provisioning.serial]
value = "0001"

[daemon]
state_dir = "{state}"
status_socket = "{socket}"
log_level = "info,rustls=warn,rumqttc=warn"
log_target = "stderr"
shutdown_grace_secs = 5

[local]
tls_listen = ["127.0.0.1:0"]

[uplink]
backoff_initial_ms = 500
backoff_max_secs = 4
{extra}
"#,
            port = sim.port,
            ca = sim.root_ca.display(),
            cc = sim.claim_cert.display(),
            ck = sim.claim_key.display(),
            state = state_dir.display(),
            socket = socket.display(),
        );
        std::fs::write(&config, text).unwrap();
        Gateway {
            log: dir.join("gatewayd.log"),
            dir: dir.to_path_buf(),
            config,
            socket,
            state_dir,
            child: None,
        }
    }

    /// Writes `conf.d/<name>` beside the config (read after it, key by key).
    pub fn dropin(&self, name: &str, text: &str) {
        let path = self.dir.join("conf.d").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    pub fn start(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(gatewayd_bin());
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .env_remove("GATEWAYD_CRASH_AFTER");
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    /// `gatewayctl claim install`; returns (success, stdout + stderr).
    pub fn claim_install(&self, cert: &Path, key: &Path) -> (bool, String) {
        let out = Command::new(gatewayctl_bin())
            .args([
                "--socket",
                self.socket.to_str().unwrap(),
                "claim",
                "install",
            ])
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn status(&self) -> Option<Snapshot> {
        status::request(&self.socket, &Request::Status).ok()?.status
    }

    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&Snapshot) -> bool,
    ) -> Snapshot {
        wait_until(timeout, what, || self.status().filter(|s| f(s))).clone()
    }

    /// Waits for the identity to be active and the thing connection up.
    pub fn wait_active(&mut self, timeout: Duration) -> Snapshot {
        let end = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                panic!(
                    "gatewayd exited before becoming active; log:\n{}",
                    self.log_text()
                );
            }
            if let Some(s) = self.status().filter(|s| {
                s.identity.stage == "active"
                    && s.uplink
                        .as_ref()
                        .is_some_and(|u| u.state == "connected" && u.role == "thing")
            }) {
                return s;
            }
            assert!(
                Instant::now() < end,
                "not active after {timeout:?}; status {:?}; log:\n{}",
                self.status(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let st = wait_until(timeout, "gatewayd to exit", || child.try_wait().unwrap());
        self.child = None;
        st
    }

    pub fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(10))
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Log lines containing both `a` and `b`.
    pub fn log_lines_with(&self, a: &str, b: &str) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(a) && l.contains(b))
            .map(str::to_owned)
            .collect()
    }

    /// Lines of the log at ERROR level.
    pub fn error_lines(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(" ERROR "))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A block of the README between its marker and the end of its ```json fence (templates and
/// policies the tests use as written).
pub fn readme_block(marker: &str) -> String {
    let readme = include_str!("../../../README.md");
    let start = readme.find(marker).expect("README block");
    let block = &readme[start..];
    let body = &block[block.find("```json").unwrap() + 7..];
    body[..body.find("```").unwrap()].to_owned()
}

/// iotcore-sim with the README's templates (`(name, marker)`), serving.
pub fn sim_with_readme_templates(dir: &Path, templates: &[(&str, &str)], extra: &[&str]) -> Sim {
    let mut sim = Sim::init(&dir.join("sim"), None);
    for (name, marker) in templates {
        let body = dir.join(format!("{name}.json"));
        std::fs::write(&body, readme_block(marker)).unwrap();
        sim.admin(
            &["template", "add", "--name", name],
            &["--body", body.to_str().unwrap()],
        );
    }
    sim.serve(extra);
    sim
}

/// A child process killed (and reaped) when dropped.
pub struct Killed(pub Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pymodbus simulator (`plugins/modbus/tests/sim.py`) serving `spec`; returns it and its TCP
/// port.
pub fn modbus_sim(dir: &Path, spec: &str) -> (Killed, u16) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let py = root.join(".venv/bin/python");
    assert!(
        py.exists(),
        "{}: tests/run-all creates the venv with pymodbus",
        py.display()
    );
    let path = dir.join("modbus.json");
    std::fs::write(&path, spec).unwrap();
    let mut child = Command::new(py)
        .arg(root.join("plugins/modbus/tests/sim.py"))
        .arg(&path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("READY ")
        .expect(&line)
        .parse()
        .unwrap();
    (Killed(child), port)
}

/// Whether the mosquitto clients are installed (`tests/run-all` installs them).
#[allow(dead_code)]
pub fn have_mosquitto() -> bool {
    Command::new("mosquitto_pub").arg("--help").output().is_ok()
}

/// An emulator with the README's gateway and child templates, and a gateway configured with
/// them (children admitted automatically, quick retries) plus `extra`, in a drop-in.
#[allow(dead_code)]
pub fn readme_gateway(dir: &Path, extra: &str) -> (Sim, Gateway) {
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
        "50-readme-templates.toml",
        &format!(
            "[provisioning]\ntemplate = \"ReadmeTemplate\"\n\n[children]\ntemplate = \"ChildTemplate\"\nadmission = \"auto\"\nretry_initial_ms = 200\nretry_max_secs = 2\n\n{extra}\n"
        ),
    );
    (sim, gw)
}

/// A cloud application's emulator certificate (cert, key): it may connect as `app-*`, send
/// commands (`cmd/*`) and read what gateways publish (`gw/*`).
#[allow(dead_code)]
pub fn cloud_app_credentials(sim: &Sim, dir: &Path) -> (PathBuf, PathBuf) {
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

/// Starts `cmd` with its stdout read line by line on a thread: (the process, killed on drop;
/// the lines as they come).
#[allow(dead_code)]
pub fn spawn_lines(cmd: &mut Command) -> (Killed, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (tests/run-all installs the peers)"));
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Killed(child), rx)
}
