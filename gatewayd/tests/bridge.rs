//! The upstream bridge end to end: a real gatewayd and iotcore-sim with the README's gateway and
//! child templates (so the README's gateway policy is what allows `gw/<thing>/...`), password
//! children that are also provisioned as things, `mosquitto_pub` children publishing on
//! `dt/<id>/...` to the local endpoint, and a "cloud application" (`mosquitto_sub` with an
//! emulator certificate, persistent session) subscribed to `gw/#`. Every message must arrive at
//! least once on its mapped topic, each child's first arrivals in the order published, through
//! `fault drop-all`, `fault stall-acks` and a kill -9 of the gateway.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// Starts the gateway and waits until it is active: (its thing name, the local TLS port, a file
/// with the local endpoint's CA).
fn start_active(gw: &mut Gateway, dir: &Path) -> (String, String, PathBuf) {
    gw.start(&[]);
    let s = gw.wait_active(T);
    let gateway = s.identity.thing_name.unwrap();
    let port = s.local.unwrap().listeners[0]
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let (code, ca) = gatewayctl(gw, &["local", "ca"]);
    assert_eq!(code, 0, "{ca}");
    let ca_file = dir.join("local-ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    (gateway, port, ca_file)
}

/// Registers `id` as a password child (no thing yet); returns the password.
fn add_password_child(gw: &Gateway, id: &str) -> String {
    let (code, text) = gatewayctl(gw, &["children", "add", id, "--password"]);
    assert_eq!(code, 0, "{text}");
    text.lines()
        .find_map(|l| l.split("): ").nth(1))
        .unwrap()
        .trim()
        .to_owned()
}

/// Registers `id` as a password child and offers it for provisioning; returns the password.
fn add_child(gw: &Gateway, id: &str, serial: &str) -> String {
    let pw = add_password_child(gw, id);
    let (code, text) = gatewayctl(
        gw,
        &["children", "add", id, "--provision", "--serial", serial],
    );
    assert_eq!(code, 0, "{text}");
    pw
}

fn thing_of(gw: &Gateway, id: &str) -> Option<String> {
    let (code, out) = gatewayctl(gw, &["children", "show", id, "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["thing_name"].as_str().map(str::to_owned)
}

/// `mosquitto_sub` as the application (persistent session, QoS 1) on `gw/#`, lines to `out`.
fn cloud_subscriber(sim: &Sim, (cert, key): &(PathBuf, PathBuf), out: &Path) -> Child {
    Command::new("mosquitto_sub")
        .args(["-h", "localhost", "-p", &sim.port.to_string(), "--cafile"])
        .arg(&sim.root_ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(["-i", "app-1", "-c", "-q", "1", "-t", "gw/#", "-v"])
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn publisher(gw_port: &str, ca: &Path, id: &str, pw: &str, lines: &[String]) -> Child {
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", gw_port, "--cafile"])
        .arg(ca)
        .args(["-i", id, "-u", id, "-P", pw, "-q", "1", "-l", "-t"])
        .arg(format!("dt/{id}/power/w"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for l in lines {
        writeln!(stdin, "{l}").unwrap();
    }
    drop(stdin);
    child
}

/// (first-arrival order per child, duplicates) from `mosquitto_sub -v` output.
fn arrivals(out: &Path, topics: &BTreeMap<String, String>) -> (BTreeMap<String, Vec<u64>>, u64) {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let mut seen = HashSet::new();
    let mut first: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut dups = 0;
    for line in text.lines() {
        let Some((topic, payload)) = line.split_once(' ') else {
            continue;
        };
        let Some((child, n)) = payload.split_once(' ') else {
            continue;
        };
        assert_eq!(
            topics.get(child).map(String::as_str),
            Some(topic),
            "message of {child} on the wrong topic: {line}"
        );
        if seen.insert(payload.to_owned()) {
            first
                .entry(child.to_owned())
                .or_default()
                .push(n.parse().unwrap());
        } else {
            dups += 1;
        }
    }
    (first, dups)
}

fn bridge_status(gw: &Gateway) -> gatewayd::daemon::status::BridgeStatus {
    gw.status().and_then(|s| s.bridge).unwrap_or_default()
}

/// Waits for the bridge's figures to satisfy `f`; on timeout shows them and the log's tail.
fn wait_bridge(
    gw: &Gateway,
    what: &str,
    f: impl Fn(&gatewayd::daemon::status::BridgeStatus) -> bool,
) -> gatewayd::daemon::status::BridgeStatus {
    let end = std::time::Instant::now() + T;
    loop {
        let b = bridge_status(gw);
        if f(&b) {
            return b;
        }
        if std::time::Instant::now() > end {
            let log = gw.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "timed out waiting for {what}: {b:?}\nuplink {:?}\nlog tail (newest first):\n{}",
                gw.status().and_then(|s| s.uplink),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn children_messages_reach_the_cloud_in_order_through_outages_stalls_and_a_kill_9() {
    if !have_mosquitto() {
        eprintln!("SKIP: mosquitto-clients not installed (tests/run-all installs them)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // 60 publishes/s keeps the gateway's connection, and the subscriber's (its deliveries
    // count against the emulator's 100/s too), under the quota; a short ack timeout for the
    // stalled acknowledgements.
    let (sim, mut gw) = readme_gateway(
        tmp.path(),
        "[uplink]\npublishes_per_sec = 60\n\n[bridge]\nack_timeout_secs = 2\n",
    );
    let (gateway, port, ca_file) = start_active(&mut gw, tmp.path());

    const M: u64 = 60;
    let ids = ["c1", "c2", "c3"];
    let mut pws = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        pws.insert(*id, add_child(&gw, id, &format!("SN-{i}")));
    }
    let mut topics = BTreeMap::new();
    for id in ids {
        let thing = wait_until(T, "child provisioned", || thing_of(&gw, id));
        assert_eq!(
            thing,
            format!("{gateway}-SN-{}", &id[1..].parse::<u32>().unwrap() - 1)
        );
        topics.insert(id.to_owned(), format!("gw/{gateway}/{thing}/power/w"));
    }

    // The application subscribes with a persistent session and goes away before the traffic:
    // the emulator keeps what arrives for it in order and hands it over when it comes back.
    // (Were it connected, `drop-all` would drop it too, and on resuming its session the
    // emulator, like AWS, resends what it had in flight at 10/s interleaved with live
    // messages: the application's own reordering, which would hide the bridge's.)
    let sub_out = tmp.path().join("cloud.txt");
    let app = cloud_app_credentials(&sim, tmp.path());
    let mut sub = cloud_subscriber(&sim, &app, &sub_out);
    std::thread::sleep(Duration::from_millis(1500));
    let _ = Command::new("kill")
        .args(["-TERM", &sub.id().to_string()])
        .status();
    let _ = sub.wait();

    let mut pubs: Vec<Child> = ids
        .iter()
        .map(|id| {
            let lines: Vec<String> = (0..M).map(|n| format!("{id} {n}")).collect();
            publisher(&port, &ca_file, id, &pws[id], &lines)
        })
        .collect();
    for p in &mut pubs {
        let st = p.wait().unwrap();
        assert!(st.success(), "mosquitto_pub failed: {st}");
    }
    // Everything is in the outbox (PUBACKed to the children); now the outages.
    wait_bridge(&gw, "first acks", |b| b.acked >= 30);
    sim.fault("drop-all", &[]);
    wait_bridge(&gw, "acks after drop-all", |b| b.acked >= 80);
    sim.fault("stall-acks", &["--seconds", "1"]);
    wait_bridge(&gw, "acks after stalled acks", |b| {
        b.acked >= 120 && b.ack_timeouts >= 1
    });
    let before_kill = bridge_status(&gw);
    assert!(before_kill.resent >= 1, "{before_kill:?}");
    assert!(before_kill.failures >= 2, "{before_kill:?}");
    gw.kill9();
    gw.start(&[]);
    gw.wait_active(T);
    wait_bridge(&gw, "the outbox drained after the restart", |b| {
        b.backlog == 0 && b.in_flight == 0
    });

    // The application comes back for what was kept for it.
    let sub_out = tmp.path().join("cloud-resumed.txt");
    let mut sub = cloud_subscriber(&sim, &app, &sub_out);
    // Every message at least once, first arrivals in order per child.
    let (first, dups) = wait_until(T, "every message at the cloud application", || {
        let (first, dups) = arrivals(&sub_out, &topics);
        (first.values().map(Vec::len).sum::<usize>() as u64 == 3 * M).then_some((first, dups))
    });
    for id in ids {
        let got = &first[id];
        let want: Vec<u64> = (0..M).collect();
        assert_eq!(got, &want, "first arrivals of {id} out of order or missing");
    }
    let after = bridge_status(&gw);
    eprintln!(
        "before kill: {before_kill:?}; after restart: {after:?}; duplicates at the application: {dups}"
    );
    assert_eq!(after.dropped_unmapped, 0);
    let (code, text) = gatewayctl(&gw, &["status"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("bridge:") && text.contains("acked"), "{text}");
    let _ = sub.kill();
    let _ = sub.wait();
}

#[test]
fn unprovisioned_children_wait_and_unmapped_topics_are_dropped_and_counted() {
    if !have_mosquitto() {
        eprintln!("SKIP: mosquitto-clients not installed (tests/run-all installs them)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // A second local namespace the children may publish on, with no mapping for `st/.../raw`.
    let (sim, mut gw) = readme_gateway(
        tmp.path(),
        "[local]\npublish = [\"dt/%c/#\", \"st/%c/#\"]\nupstream = [\"dt/#\", \"st/#\"]\n\n[[bridge.mappings]]\nlocal = \"dt/{child}/{suffix}\"\ncloud = \"gw/{gateway}/{thing}/{suffix}\"\n\n[[bridge.mappings]]\nlocal = \"st/{child}/state\"\ncloud = \"gw/{gateway}/{thing}/state\"\n",
    );
    let (gateway, port, ca_file) = start_active(&mut gw, tmp.path());
    // p1 is provisioned; p2 only has a local password (no thing).
    let pw1 = add_child(&gw, "p1", "SN-1");
    let pw2 = add_password_child(&gw, "p2");
    let thing = wait_until(T, "p1 provisioned", || thing_of(&gw, "p1"));
    let sub_out = tmp.path().join("cloud.txt");
    let app = cloud_app_credentials(&sim, tmp.path());
    let mut sub = cloud_subscriber(&sim, &app, &sub_out);
    std::thread::sleep(Duration::from_millis(1500));

    let send = |id: &str, pw: &str, topic: &str, msg: &str| {
        let st = Command::new("mosquitto_pub")
            .args(["-h", "localhost", "-p", &port, "--cafile"])
            .arg(&ca_file)
            .args([
                "-i", id, "-u", id, "-P", pw, "-q", "1", "-t", topic, "-m", msg,
            ])
            .status()
            .unwrap();
        assert!(st.success(), "{id} {topic}");
    };
    send("p2", &pw2, "dt/p2/x", "p2 0");
    send("p1", &pw1, "st/p1/raw", "p1 unmapped");
    send("p1", &pw1, "st/p1/raw", "p1 unmapped again");
    send("p1", &pw1, "dt/p1/x", "p1 0");
    send("p1", &pw1, "st/p1/state", "p1 1");
    let b = wait_until(T, "p1's messages acked, the unmapped dropped", || {
        let b = bridge_status(&gw);
        (b.acked == 2 && b.dropped_unmapped == 2).then_some(b)
    });
    // p2's entry waits in the outbox, named in status, and did not hold p1 back.
    assert_eq!(b.waiting_for_thing, vec!["p2".to_owned()], "{b:?}");
    assert_eq!(b.backlog, 1, "{b:?}");
    let (code, text) = gatewayctl(&gw, &["status"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("waiting for a thing name (not provisioned): p2")
            && text.contains("2 dropped (no mapping)"),
        "{text}"
    );
    let want = [
        format!("gw/{gateway}/{thing}/x p1 0"),
        format!("gw/{gateway}/{thing}/state p1 1"),
    ];
    let got = wait_until(T, "p1's messages at the application", || {
        let t = std::fs::read_to_string(&sub_out).unwrap_or_default();
        (t.lines().count() >= 2).then_some(t)
    });
    assert_eq!(got.lines().collect::<Vec<_>>(), want);
    // Logged once per topic, with the child and thing.
    let lines = gw.log_lines_with("no [[bridge.mappings]] rule matches", "st/p1/raw");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("child=p1") && lines[0].contains("thing="),
        "{lines:?}"
    );
    // Provisioned later, p2's message goes up.
    let (code, text) = gatewayctl(
        &gw,
        &["children", "add", "p2", "--provision", "--serial", "SN-2"],
    );
    assert_eq!(code, 0, "{text}");
    wait_until(T, "p2's message acked", || {
        let b = bridge_status(&gw);
        (b.acked == 3 && b.backlog == 0 && b.waiting_for_thing.is_empty()).then_some(())
    });
    let _ = sub.kill();
    let _ = sub.wait();
}

/// A rule for one device profile (children announced with model `meter`) batches their messages
/// into envelopes on `gw/<gateway>/batch`, at a quota of 10 publishes/s; the application unpacks
/// them to the originals, each child's in order, with the topic each would have had alone. A
/// child of no profile goes by the next rule, alone on its own topic.
#[test]
fn batched_messages_of_a_profile_unpack_to_the_originals_in_order() {
    if !have_mosquitto() {
        eprintln!("SKIP: mosquitto-clients not installed (tests/run-all installs them)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = readme_gateway(
        tmp.path(),
        "[uplink]\npublishes_per_sec = 10\n\n[[bridge.mappings]]\nlocal = \"dt/{child}/{suffix}\"\ncloud = \"gw/{gateway}/{thing}/{suffix}\"\nprofile = \"meter\"\nbatch = { max_messages = 100 }\n\n[[bridge.mappings]]\nlocal = \"dt/{child}/{suffix}\"\ncloud = \"gw/{gateway}/{thing}/{suffix}\"\n",
    );
    let (gateway, port, ca_file) = start_active(&mut gw, tmp.path());
    let mut pws = BTreeMap::new();
    for (id, serial, model) in [
        ("b1", "SN-1", Some("meter")),
        ("b2", "SN-2", Some("meter")),
        ("b3", "SN-3", None),
    ] {
        let pw = add_password_child(&gw, id);
        let mut args = vec!["children", "add", id, "--provision", "--serial", serial];
        if let Some(m) = model {
            args.extend(["--model", m]);
        }
        let (code, text) = gatewayctl(&gw, &args);
        assert_eq!(code, 0, "{text}");
        pws.insert(id, pw);
    }
    let mut things = BTreeMap::new();
    for id in ["b1", "b2", "b3"] {
        things.insert(
            id.to_owned(),
            wait_until(T, "children provisioned", || thing_of(&gw, id)),
        );
    }
    let sub_out = tmp.path().join("cloud.txt");
    let app = cloud_app_credentials(&sim, tmp.path());
    let mut sub = cloud_subscriber(&sim, &app, &sub_out);
    std::thread::sleep(Duration::from_millis(1500));

    let n = 150;
    // JSON payloads (kept byte for byte in the envelope), one with inner spaces.
    let lines = |id: &str, count: usize| -> Vec<String> {
        (0..count)
            .map(|i| format!("{{\"c\": \"{id}\", \"n\":{i}}}"))
            .collect()
    };
    let mut pubs = vec![
        publisher(&port, &ca_file, "b1", &pws["b1"], &lines("b1", n)),
        publisher(&port, &ca_file, "b2", &pws["b2"], &lines("b2", n)),
        publisher(&port, &ca_file, "b3", &pws["b3"], &lines("b3", 10)),
    ];
    for p in &mut pubs {
        assert!(p.wait().unwrap().success());
    }
    let b = wait_bridge(&gw, "every message acked", |b| {
        b.acked == 2 * n as u64 + 10 && b.backlog == 0
    });
    eprintln!("bridge: {b:?}");
    assert_eq!(b.batched, 2 * n as u64, "{b:?}");
    // At 10 publishes/s, 300 messages alone would take 30 s; in envelopes of up to 100 they
    // need a handful of publishes.
    assert!(
        b.envelopes >= 3 && b.envelopes <= 2 * n as u64 / 5,
        "envelopes: {b:?}"
    );
    let (code, text) = gatewayctl(&gw, &["status"]);
    assert_eq!(code, 0);
    assert!(
        text.contains(&format!(
            "batched:      {} messages in {} envelopes",
            b.batched, b.envelopes
        )),
        "{text}"
    );

    let text = wait_until(T, "everything at the application", || {
        let t = std::fs::read_to_string(&sub_out).unwrap_or_default();
        let plain = t
            .lines()
            .filter(|l| !l.starts_with(&format!("gw/{gateway}/batch ")))
            .count();
        (plain >= 10 && t.lines().count() as u64 >= b.envelopes + 10).then_some(t)
    });
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut envelopes = 0;
    for line in text.lines() {
        let (topic, payload) = line.split_once(' ').unwrap();
        if topic == format!("gw/{gateway}/batch") {
            envelopes += 1;
            for m in gatewayd::bridge::batch::unpack(payload.as_bytes()).unwrap() {
                assert_eq!(m.thing, things[&m.child], "{m:?}");
                assert_eq!(
                    m.topic,
                    format!("gw/{gateway}/{}/power/w", things[&m.child]),
                    "{m:?}"
                );
                assert!(m.ts > 1_700_000_000_000, "{m:?}");
                got.entry(m.child)
                    .or_default()
                    .push(String::from_utf8(m.payload).unwrap());
            }
        } else {
            assert_eq!(topic, format!("gw/{gateway}/{}/power/w", things["b3"]));
            got.entry("b3".into()).or_default().push(payload.to_owned());
        }
    }
    for (id, count) in [("b1", n), ("b2", n), ("b3", 10)] {
        let mut seen = HashSet::new();
        let firsts: Vec<String> = got[id]
            .iter()
            .filter(|p| seen.insert((*p).clone()))
            .cloned()
            .collect();
        assert_eq!(firsts, lines(id, count), "{id}: first arrivals");
    }
    assert!(
        envelopes >= b.envelopes,
        "{envelopes} envelopes seen, {b:?}"
    );
    let _ = sub.kill();
    let _ = sub.wait();
}
