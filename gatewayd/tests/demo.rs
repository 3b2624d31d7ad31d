//! `gatewayd demo`, run as users run it: the built binary, stdout not a terminal. One run stops
//! by itself (`--seconds`) and must have provisioned the gateway, every simulated meter and
//! device as a thing of its own (checked in the emulator's registry as well as in the summary),
//! and delivered plausible decoded telemetry of each to the cloud application. Another is
//! interrupted (SIGINT) mid-run: exit 0, a summary, its listeners closed and its temporary
//! directory gone.

#![cfg(feature = "demo")]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

fn gatewayd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gatewayd"))
}

/// The summary's child lines: id → (found by, state, thing, cloud count, last values).
fn children(out: &str) -> BTreeMap<String, (String, String, String, u64, Value)> {
    let mut m = BTreeMap::new();
    for l in out.lines() {
        let Some(rest) = l.trim().strip_prefix("child ") else {
            continue;
        };
        // child ID found by X: STATE as THING; cloud received N, last {..}
        let (id, rest) = rest.split_once(" found by ").unwrap();
        let (by, rest) = rest.split_once(": ").unwrap();
        let (state, rest) = rest.split_once(" as ").unwrap();
        let (thing, rest) = rest.split_once("; cloud received ").unwrap();
        let (n, last) = rest.split_once(", last ").unwrap();
        m.insert(
            id.to_owned(),
            (
                by.to_owned(),
                state.to_owned(),
                thing.to_owned(),
                n.parse().unwrap(),
                serde_json::from_str(last).unwrap(),
            ),
        );
    }
    m
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("no number {k} in {v}"))
}

#[test]
fn the_demo_provisions_every_device_and_their_telemetry_reaches_the_cloud() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let started = Instant::now();
    let out = gatewayd()
        .args([
            "demo",
            "--seconds",
            "10",
            "--modbus",
            "2",
            "--mqtt",
            "2",
            "--dir",
        ])
        .arg(&dir)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{text}\n{err}", out.status);
    let summary = &text[text
        .find("summary after")
        .unwrap_or_else(|| panic!("no summary:\n{text}\n{err}"))..];
    eprintln!("{summary}(in {:?})", started.elapsed());
    assert!(summary.contains("gateway gw-demo1: active"), "{summary}");

    let kids = children(summary);
    let want = [
        ("meter-DM-1001", "modbus", "gw-demo1-DM-1001"),
        ("meter-DM-1002", "modbus", "gw-demo1-DM-1002"),
        ("sensor-1", "mqtt", "gw-demo1-TH-2001"),
        ("sensor-2", "mqtt", "gw-demo1-TH-2002"),
    ];
    assert_eq!(kids.len(), want.len(), "{summary}");
    for (id, by, thing) in want {
        let (found_by, state, t, n, last) = kids
            .get(id)
            .unwrap_or_else(|| panic!("no child {id} in the summary:\n{summary}"));
        assert_eq!(
            (found_by.as_str(), state.as_str(), t.as_str()),
            (by, "provisioned", thing),
            "{summary}"
        );
        assert!(*n >= 1, "nothing of {id} reached the cloud: {summary}");
        if by == "modbus" {
            let (v, a, p, e) = (
                num(last, "voltage"),
                num(last, "current"),
                num(last, "power"),
                num(last, "energy"),
            );
            assert!((220.0..=240.0).contains(&v), "{id}: voltage {v}");
            assert!((3.0..=7.0).contains(&a), "{id}: current {a}");
            // power = U·I·0.95 of the same instant (registers are read one after another).
            assert!(
                (p - v * a * 0.95).abs() < 0.05 * p,
                "{id}: power {p} for {v} V {a} A"
            );
            assert!(e >= 12_000.0, "{id}: energy {e}");
        } else {
            let (t, h) = (num(last, "temperature"), num(last, "humidity"));
            assert!((15.0..=30.0).contains(&t), "{id}: temperature {t}");
            assert!((30.0..=60.0).contains(&h), "{id}: humidity {h}");
            assert!(num(last, "seq") >= 1.0, "{last}");
        }
    }

    // Commands went down from the cloud to the sensors through the gateway, and their answers
    // came back up.
    let line = summary
        .lines()
        .find_map(|l| l.trim().strip_prefix("commands from the cloud: "))
        .unwrap_or_else(|| panic!("no commands line: {summary}"));
    let (sent, rest) = line.split_once(" sent to the sensors, ").unwrap();
    let answered = rest.split_once(" answered").unwrap().0;
    let (sent, answered): (u64, u64) = (sent.parse().unwrap(), answered.parse().unwrap());
    assert!(
        answered >= 2 && answered <= sent,
        "commands: {sent} sent, {answered} answered\n{summary}"
    );

    // The emulator's registry agrees: the gateway and four children of it.
    let reg: Value =
        serde_json::from_slice(&std::fs::read(dir.join("cloud/registry.json")).unwrap()).unwrap();
    let things = reg["things"].as_object().unwrap();
    assert!(things.contains_key("gw-demo1"), "{things:?}");
    for (_, by, thing) in want {
        let attrs = &things
            .get(thing)
            .unwrap_or_else(|| panic!("no thing {thing}: {things:?}"))["attributes"];
        assert_eq!(attrs["parent"], "gw-demo1", "{thing}: {attrs}");
        assert_eq!(attrs["foundBy"], by, "{thing}: {attrs}");
    }
}

/// A port nobody listens on any more.
fn closed(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1))
        .is_err()
}

#[test]
fn ctrl_c_stops_every_part_and_removes_the_temporary_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = gatewayd()
        .args(["demo", "--modbus", "1", "--mqtt", "1"])
        .env("TMPDIR", tmp.path())
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    // Until the cloud has telemetry of both children: then stop it mid-run.
    let mut seen = Vec::new();
    let end = Instant::now() + Duration::from_secs(30);
    let grab = |seen: &[String], prefix: &str| -> Option<String> {
        seen.iter()
            .rev()
            .find_map(|l| l.strip_prefix(prefix).map(str::to_owned))
    };
    loop {
        let left = end
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!(
                    "no telemetry of both children in the cloud within 30 s:\n{}",
                    seen.join("\n")
                )
            });
        let Ok(l) = rx.recv_timeout(left) else {
            continue;
        };
        seen.push(l);
        let cloud_line = seen.last().unwrap();
        let provisioned_with_data = seen
            .iter()
            .rev()
            .take(12)
            .filter(|l| l.contains(" provisioned ") && !l.contains(" cloud    0"))
            .count();
        if cloud_line.starts_with("bridge") && provisioned_with_data >= 2 {
            break;
        }
    }
    let dir = PathBuf::from(
        grab(&seen, "gatewayd demo, ")
            .and_then(|l| {
                l.split_once("files and log: ")
                    .map(|(_, d)| d.trim_end_matches(')').to_owned())
            })
            .unwrap(),
    );
    assert!(
        dir.starts_with(tmp.path()) && dir.exists(),
        "{}",
        dir.display()
    );
    let port = |prefix: &str, marker: &str| -> u16 {
        let l = grab(&seen, prefix).unwrap();
        let at = &l[l.find(marker).unwrap() + marker.len()..];
        at[..at.find(|c: char| !c.is_ascii_digit()).unwrap()]
            .parse()
            .unwrap()
    };
    let cloud_port = port("cloud ", "localhost:");
    let local_port = port("local ", "mqtts://127.0.0.1:");
    assert!(!closed(cloud_port) && !closed(local_port));

    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the demo did not stop within 15 s of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut rest = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        rest.push(l);
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let rest = rest.join("\n");
    eprintln!("stopped in {:?}:\n{rest}", t.elapsed());
    assert_eq!(status.code(), Some(0), "{rest}\n{err}");
    assert!(rest.contains("summary after"), "{rest}");
    assert!(rest.contains("gateway gw-demo1: active"), "{rest}");
    assert!(
        closed(cloud_port),
        "the emulator still listens on {cloud_port}"
    );
    assert!(
        closed(local_port),
        "the gateway still listens on {local_port}"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "left in TMPDIR"
    );
}
