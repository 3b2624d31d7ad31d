//! End to end against `iotcore-sim serve` over real mTLS: first boot, restart, systemd notify,
//! other provisioning modes (trusted user and JITP/JITR: `modes.rs`). Timing and memory figures
//! come from `tests/bench/gatewayd-startup`, not from these tests.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::{Gateway, Sim, serving_sim_and_gateway};
use gatewayd::daemon::status::Snapshot;
use rcgen::PublicKeyData;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::traits::PublicKeyParts;

const T: Duration = Duration::from_secs(30);

const CREATE_FROM_CSR: &str = "$aws/certificates/create-from-csr/json";
const CREATE_KEYS: &str = "$aws/certificates/create/json";

/// Publishes the sim accepted on `topic` (0 when none).
fn published(sim: &Sim, topic: &str) -> u64 {
    sim.counters()["publishes_by_topic"][topic]
        .as_u64()
        .unwrap_or(0)
}

/// The saved private key (PEM) and the public key (SubjectPublicKeyInfo, DER) of the saved
/// certificate, after checking that this certificate is the one the daemon reports and the
/// only thing holds.
fn saved_key_and_certificate(gw: &Gateway, sim: &Sim, s: &Snapshot) -> (String, Vec<u8>) {
    let dir = gw.state_dir.join("identity/gateway");
    let key = std::fs::read_to_string(dir.join("private.key")).unwrap();
    let pem = std::fs::read(dir.join("certificate.pem")).unwrap();
    let id = gatewayd::identity::certificate_id(&pem).unwrap();
    assert_eq!(s.identity.certificate_id.as_deref(), Some(id.as_str()));
    let things = sim.things();
    assert_eq!(things.len(), 1, "{things:?}");
    assert_eq!(things[0]["principals"], serde_json::json!([id]));
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    (key, cert.public_key().raw.to_vec())
}

#[test]
fn first_boot_provisions_then_restart_reuses_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, mut gw) = serving_sim_and_gateway(tmp.path());
    gw.start(&[]);
    let s = gw.wait_active(T);

    // Reconnected with the permanent certificate, client id = thing name.
    let thing = s.identity.thing_name.clone().unwrap();
    assert_eq!(thing, "gw-0001");
    let u = s.uplink.as_ref().unwrap();
    assert_eq!(u.client_id, thing);
    let cert_id = s.identity.certificate_id.clone().unwrap();
    let things = sim.things();
    assert_eq!(things.len(), 1, "{things:?}");
    assert_eq!(things[0]["thingName"], thing.as_str());
    assert_eq!(things[0]["principals"], serde_json::json!([cert_id]));
    let certs = sim.device_certs();
    assert_eq!(certs.len(), 1, "{certs:?}");
    assert_eq!(certs[0]["status"], "ACTIVE");
    assert!(s.identity.orphaned_certificates.is_empty());

    // Key material on disk: private key 0600, never sent (CSR mode): only a CSR went out, and
    // the certificate carries the public half of the P-256 key made here.
    let key = gw.state_dir.join("identity/gateway/private.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(published(&sim, CREATE_FROM_CSR), 1);
    assert_eq!(published(&sim, CREATE_KEYS), 0);
    let (key, cert_spki) = saved_key_and_certificate(&gw, &sim, &s);
    let pair = rcgen::KeyPair::from_pem(&key).unwrap();
    assert_eq!(pair.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    assert_eq!(pair.subject_public_key_info(), cert_spki);
    let log = gw.log_text();
    assert!(log.contains("claim session closed"), "{log}");
    assert_eq!(log.matches("certificate issued and saved").count(), 1);

    // gatewayctl reads the same snapshot.
    let out = std::process::Command::new(common::gatewayctl_bin())
        .args(["--socket", gw.socket.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("gw-0001") && text.contains("connected"),
        "{text}"
    );
    // Not in trusted-user mode: `gatewayctl claim install` is refused, exit status 1.
    let out = std::process::Command::new(common::gatewayctl_bin())
        .args(["--socket", gw.socket.to_str().unwrap(), "claim", "install"])
        .arg("--cert")
        .arg(&sim.claim_cert)
        .arg("--key")
        .arg(&sim.claim_key)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not in trusted-user mode"), "{err}");
    assert_eq!(gw.status().unwrap().uplink.unwrap().connects, 1);

    assert!(gw.stop().success());
    assert!(!gw.socket.exists(), "status socket removed on shutdown");

    // Restart: no new certificate, same thing, straight to the thing connection.
    gw.start(&[]);
    let s2 = gw.wait_active(T);
    assert_eq!(
        s2.identity.certificate_id.as_deref(),
        Some(cert_id.as_str())
    );
    assert_eq!(sim.device_certs().len(), 1);
    assert_eq!(sim.things().len(), 1);
    let log = gw.log_text();
    assert_eq!(
        log.matches("certificate issued and saved").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("claim session closed").count(), 1, "{log}");
    assert!(gw.stop().success());
}

#[test]
fn notify_ready_without_cloud_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    // The sim is initialised but not serving: READY must not wait for the cloud.
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    sim.port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut gw = Gateway::configure(&tmp.path().join("gw"), &sim, "", "");
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    gw.start(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ]);
    let mut buf = [0u8; 4096];
    let mut recv = || {
        let n = sock.recv(&mut buf).expect("notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut msgs = Vec::new();
    loop {
        let m = recv();
        msgs.push(m.clone());
        if m.lines().any(|l| l == "READY=1") {
            break;
        }
    }
    // Status socket is up by READY time.
    assert!(gw.status().is_some());
    let mut watchdogs = 0;
    while watchdogs < 3 {
        let m = recv();
        if m.contains("WATCHDOG=1") {
            watchdogs += 1;
        }
        msgs.push(m);
    }
    gw.signal("TERM");
    // Collect everything up to the daemon's exit (recv times out once it is gone).
    let before_term = msgs.len();
    while let Ok(n) = sock.recv(&mut buf) {
        msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        if msgs.last().unwrap().lines().any(|l| l == "STOPPING=1") {
            break;
        }
    }
    assert!(
        msgs[before_term..]
            .iter()
            .any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "no STOPPING=1 after SIGTERM: {msgs:?}"
    );
    assert!(gw.wait_exit(Duration::from_secs(10)).success());
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("STATUS=") || m.contains("\nSTATUS=")),
        "{msgs:?}"
    );
}

#[test]
fn create_keys_mode_provisions() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    sim.serve(&[]);
    let mut gw = Gateway::configure(&tmp.path().join("gw"), &sim, "mode = \"create-keys\"", "");
    gw.start(&[]);
    let s = gw.wait_active(T);
    assert_eq!(s.identity.thing_name.as_deref(), Some("gw-0001"));
    // CreateKeysAndCertificate was the call made, once; no CSR went out.
    assert_eq!(published(&sim, CREATE_KEYS), 1);
    assert_eq!(published(&sim, CREATE_FROM_CSR), 0);
    // The key on disk is the cloud's: RSA 2048 as PKCS#1 (the daemon itself only writes
    // PKCS#8), and the public half of the issued certificate.
    let (key, cert_spki) = saved_key_and_certificate(&gw, &sim, &s);
    assert!(
        key.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "not the cloud's PKCS#1 key: {:?}",
        key.lines().next()
    );
    let key = rsa::RsaPrivateKey::from_pkcs1_pem(&key).unwrap();
    assert_eq!(key.size() * 8, 2048);
    let cert_key = rsa::RsaPublicKey::from_public_key_der(&cert_spki).unwrap();
    assert_eq!(cert_key, key.to_public_key());
    assert!(gw.stop().success());
}

#[test]
fn rsa_key_csr_mode_provisions() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    sim.serve(&[]);
    let mut gw = Gateway::configure(
        &tmp.path().join("gw"),
        &sim,
        "key_algorithm = \"rsa-2048\"",
        "",
    );
    gw.start(&[]);
    let s = gw.wait_active(T);
    assert_eq!(published(&sim, CREATE_FROM_CSR), 1);
    assert_eq!(published(&sim, CREATE_KEYS), 0);
    // Our key: RSA 2048 in PKCS#8, and the issued certificate carries its public half.
    let (key, cert_spki) = saved_key_and_certificate(&gw, &sim, &s);
    assert!(
        key.starts_with("-----BEGIN PRIVATE KEY-----"),
        "not PKCS#8: {:?}",
        key.lines().next()
    );
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(&key)
        .unwrap_or_else(|e| panic!("not an RSA key in PKCS#8: {e}"));
    assert_eq!(key.size() * 8, 2048);
    let cert_key = rsa::RsaPublicKey::from_public_key_der(&cert_spki)
        .unwrap_or_else(|e| panic!("the certificate's key is not RSA: {e}"));
    assert_eq!(cert_key, key.to_public_key());
    assert!(gw.stop().success());
}

#[test]
fn preinstalled_certificate_connects_without_provisioning() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    sim.serve(&[]);
    // A certificate registered out of band (single-thing registration), with a thing.
    let out = tmp.path().join("dev");
    let policy = tmp.path().join("policy.json");
    std::fs::write(&policy, r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:*","Resource":"*"}]}"#).unwrap();
    sim.admin(
        &["policies", "add"],
        &[
            "--name",
            "DevPolicy",
            "--document",
            policy.to_str().unwrap(),
        ],
    );
    sim.admin(
        &["certs", "create"],
        &[
            "--out",
            out.to_str().unwrap(),
            "--policy",
            "DevPolicy",
            "--thing",
            "pre-1",
        ],
    );
    let pre = format!(
        "mode = \"preinstalled\"\n[provisioning.preinstalled]\ncert = \"{}.pem\"\nkey = \"{}.key\"\nthing_name = \"pre-1\"\n",
        out.display(),
        out.display()
    );
    let mut gw = Gateway::configure(&tmp.path().join("gw"), &sim, &pre, "");
    gw.start(&[]);
    let s = gw.wait_active(T);
    assert_eq!(s.uplink.unwrap().client_id, "pre-1");
    assert!(sim.device_certs().len() == 1, "no certificate was created");
    assert!(!gw.log_text().contains("certificate issued"));
    assert!(gw.stop().success());
}
