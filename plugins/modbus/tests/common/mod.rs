//! Real peers for the Modbus tests: the pymodbus 3.16.1 simulator in `tests/sim.py`, run from the
//! repository's `.venv` (made by `tests/run-all`), over TCP on a kernel-chosen port or over a socat
//! pseudo-terminal pair for RTU.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    let p = std::env::var_os("GATEWAYD_PEERS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} is missing: run tests/run-all once, or `python3 -m venv .venv && .venv/bin/pip install -r tests/peers/requirements.txt`",
        p.display()
    );
    p
}

/// A running simulator; killed when dropped.
pub struct Sim {
    child: Child,
    _dir: tempfile::TempDir,
    /// TCP port, 0 for a serial simulator.
    pub port: u16,
    /// The plugin's end of the pty pair (RTU only).
    pub serial: Option<String>,
    _socat: Option<Child>,
}

async fn start(
    spec: &serde_json::Value,
    serial: Option<String>,
) -> (Child, tempfile::TempDir, u16) {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).expect("write spec");
    let mut cmd = Command::new(python());
    cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sim.py"))
        .arg(&spec_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if let Some(s) = &serial {
        cmd.arg("--serial").arg(s);
    }
    let mut child = cmd.spawn().expect("start the pymodbus simulator");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("simulator ready within 30 s")
        .expect("read simulator stdout")
        .expect("simulator printed READY");
    let port = line
        .strip_prefix("READY")
        .expect("READY line")
        .trim()
        .parse()
        .unwrap_or(0);
    (child, dir, port)
}

impl Sim {
    pub async fn tcp(spec: serde_json::Value) -> Self {
        let (child, dir, port) = start(&spec, None).await;
        assert_ne!(port, 0, "TCP simulator gave no port");
        Self {
            child,
            _dir: dir,
            port,
            serial: None,
            _socat: None,
        }
    }

    /// A socat pty pair: the simulator on one end, the returned `serial` is the other.
    pub async fn rtu(spec: serde_json::Value) -> Self {
        let mut socat = Command::new("socat")
            .args(["-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"])
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("socat (apt package socat; tests/run-all installs it)");
        let mut lines = BufReader::new(socat.stderr.take().expect("stderr")).lines();
        let mut ptys = Vec::new();
        while ptys.len() < 2 {
            let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
                .await
                .expect("socat names its ptys within 10 s")
                .expect("read socat")
                .expect("socat printed its ptys");
            if let Some((_, pty)) = line.split_once("PTY is ") {
                ptys.push(pty.trim().to_string());
            }
        }
        // Keep draining socat's log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (child, dir, _) = start(&spec, Some(ptys[0].clone())).await;
        Self {
            child,
            _dir: dir,
            port: 0,
            serial: Some(ptys[1].clone()),
            _socat: Some(socat),
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// ASCII text as big-endian registers, NUL padded to `n` registers.
pub fn ascii_words(s: &str, n: usize) -> Vec<u16> {
    let mut b = s.as_bytes().to_vec();
    b.resize(n * 2, 0);
    b.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}
