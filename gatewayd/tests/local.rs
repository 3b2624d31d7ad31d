//! The local endpoint against clients nobody here wrote: mosquitto_pub / mosquitto_sub (MQTT
//! 3.1.1 and 5) over plain TCP and TLS. The endpoint runs in-process on port 0 with a temporary
//! state directory; what the children sent is read back from the outbox.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use gatewayd::children::{AddChild, Registry};
use gatewayd::daemon::config::LocalConfig;
use gatewayd::daemon::status::LocalService;
use gatewayd::local::Endpoint;
use gatewayd::local::ca::LocalCa;
use gatewayd::outbox::{Outbox, OutboxOptions, OverflowPolicy};
use gatewayd::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct Gw {
    dir: tempfile::TempDir,
    ep: Endpoint,
    outbox: Outbox,
    registry: Registry,
    cancel: CancellationToken,
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The tests speak to the endpoint with mosquitto's clients; without them they cannot run, and
/// a silent pass would hide that (`tests/run-all` installs them).
fn need_mosquitto() {
    let found = std::process::Command::new("mosquitto_pub")
        .arg("--help")
        .output()
        .is_ok();
    assert!(
        found,
        "mosquitto_pub/mosquitto_sub are missing: install mosquitto-clients (tests/run-all does)"
    );
}

/// An endpoint with the onboarding credential `onboarding` / `s3cret` (the file lives as long as
/// the returned handle).
async fn start_with_onboarding_password() -> (Gw, tempfile::NamedTempFile) {
    let pwfile = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pwfile.path(), "s3cret\n").unwrap();
    let p = pwfile.path().to_path_buf();
    let gw = start(
        move |c| {
            c.onboarding_username = Some("onboarding".into());
            c.onboarding_password_file = Some(p);
        },
        OutboxOptions::default(),
    )
    .await;
    (gw, pwfile)
}

async fn start(tweak: impl FnOnce(&mut LocalConfig), opts: OutboxOptions) -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let registry = Registry::open(store).unwrap();
    let outbox = Outbox::open(dir.path().join("outbox"), opts).await.unwrap();
    let mut cfg = LocalConfig {
        tls_listen: vec!["127.0.0.1:0".parse().unwrap()],
        tcp_listen: vec!["127.0.0.1:0".parse().unwrap()],
        ..LocalConfig::default()
    };
    tweak(&mut cfg);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let ep = Endpoint::start(
        &cfg,
        dir.path(),
        registry.clone(),
        outbox.clone(),
        &cancel,
        &tracker,
    )
    .await
    .unwrap();
    std::fs::write(dir.path().join("ca.pem"), ep.ca_pem()).unwrap();
    Gw {
        dir,
        ep,
        outbox,
        registry,
        cancel,
    }
}

impl Gw {
    fn password_child(&self, id: &str) -> String {
        self.registry
            .add(&AddChild {
                id: id.into(),
                password: true,
                ..Default::default()
            })
            .unwrap()
            .unwrap()
    }

    /// A child registered with no credential but its name: a local-CA certificate naming it.
    fn cert_child(&self, id: &str) -> (PathBuf, PathBuf) {
        self.registry
            .add(&AddChild {
                id: id.into(),
                ..Default::default()
            })
            .unwrap();
        let (cert, key) = LocalCa::issue_client(self.dir.path(), id).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{id}.crt")),
            self.dir.path().join(format!("{id}.key")),
        );
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        (c, k)
    }

    fn tcp_port(&self) -> String {
        self.ep.tcp_addrs()[0].port().to_string()
    }

    fn tls_port(&self) -> String {
        self.ep.tls_addrs()[0].port().to_string()
    }

    fn ca(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }

    async fn stored(&self) -> Vec<(String, String, Vec<u8>)> {
        let e = self.outbox.take(10_000).await.unwrap();
        self.outbox.release_all();
        e.into_iter()
            .map(|e| (e.child_id.to_string(), e.topic, e.payload))
            .collect()
    }

    fn refusals(&self, reason: &str) -> u64 {
        self.ep.status().refusals.get(reason).copied().unwrap_or(0)
    }

    fn denials(&self, action: &str) -> u64 {
        self.ep
            .status()
            .acl_denials
            .get(action)
            .copied()
            .unwrap_or(0)
    }
}

async fn run(cmd: &str, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(cmd)
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(20), child)
        .await
        .expect("client hung")
        .unwrap()
}

/// A mosquitto client (`mosquitto_pub`/`mosquitto_sub`) over plain TCP with a password, then
/// `rest`.
#[allow(clippy::too_many_arguments)]
async fn mosquitto(
    cmd: &str,
    port: &str,
    version: &str,
    id: &str,
    user: &str,
    password: &str,
    rest: &[&str],
) -> Output {
    let mut args = vec![
        "-h",
        "127.0.0.1",
        "-p",
        port,
        "-V",
        version,
        "-i",
        id,
        "-u",
        user,
        "-P",
        password,
    ];
    args.extend_from_slice(rest);
    run(cmd, &args).await
}

/// `mosquitto_sub` as password child `c1` on the plain listener, for `secs` seconds.
async fn sub_as_c1(port: &str, version: &str, password: &str, filter: &str, secs: &str) -> Output {
    let rest = ["-t", filter, "-W", secs];
    mosquitto("mosquitto_sub", port, version, "c1", "c1", password, &rest).await
}

/// A running `mosquitto_sub` (`-v`: each line is "topic payload") whose lines are read as they
/// come.
struct Sub {
    _child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Sub {
    async fn spawn(port: &str, version: &str, id: &str, password: &str, filter: &str) -> Sub {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                port,
                "-V",
                version,
                "-i",
                id,
                "-u",
                id,
                "-P",
                password,
                "-q",
                "1",
                "-v",
                "-t",
                filter,
                "-W",
                "20",
            ])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        Sub {
            _child: child,
            lines: tokio::io::BufReader::new(stdout).lines(),
        }
    }

    async fn line(&mut self) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(15), self.lines.next_line())
            .await
            .ok()
            .and_then(|l| l.ok().flatten())
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}; stdout {}; stderr {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// mosquitto_pub over plain TCP with a password.
async fn pub_tcp(gw: &Gw, v: &str, id: &str, user: &str, pass: &str, topic: &str) -> Output {
    let rest = ["-q", "1", "-t", topic, "-m", "hello"];
    mosquitto("mosquitto_pub", &gw.tcp_port(), v, id, user, pass, &rest).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_child_publishes_in_its_namespace_and_nowhere_else() {
    need_mosquitto();
    let gw = start(|_| {}, OutboxOptions::default()).await;
    let pw = gw.password_child("c1");
    let other = gw.password_child("c2");

    for v in ["mqttv311", "mqttv5"] {
        let o = pub_tcp(&gw, v, "c1", "c1", &pw, "dt/c1/temp").await;
        assert!(o.status.success(), "{v}: {}", text(&o));
    }
    let stored = gw.stored().await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(
        stored
            .iter()
            .all(|(c, t, p)| c == "c1" && t == "dt/c1/temp" && p == b"hello")
    );

    // Refused at CONNECT: spoofed client id, wrong password, unknown child.
    let o = pub_tcp(&gw, "mqttv311", "c2", "c1", &pw, "dt/c2/x").await;
    assert!(!o.status.success(), "spoofed client id: {}", text(&o));
    assert!(text(&o).contains("identifier rejected"), "{}", text(&o));
    let o = pub_tcp(&gw, "mqttv5", "c1", "c1", &other, "dt/c1/x").await;
    assert!(!o.status.success(), "wrong password: {}", text(&o));
    assert!(
        text(&o)
            .to_lowercase()
            .contains("bad user name or password"),
        "{}",
        text(&o)
    );
    let o = pub_tcp(&gw, "mqttv311", "nobody", "nobody", &pw, "dt/nobody/x").await;
    assert!(!o.status.success(), "unknown child: {}", text(&o));
    assert_eq!(gw.refusals("client_id"), 1);
    assert_eq!(gw.refusals("bad_password"), 2);

    // Another child's topic and `$aws/…`: 3.1.1 is disconnected, 5 gets 0x87.
    for topic in ["dt/c2/temp", "$aws/things/c1/shadow/update", "cmd/c1/x"] {
        let o = pub_tcp(&gw, "mqttv311", "c1", "c1", &pw, topic).await;
        assert!(!o.status.success(), "{topic} 3.1.1: {}", text(&o));
        let o = pub_tcp(&gw, "mqttv5", "c1", "c1", &pw, topic).await;
        assert!(
            text(&o).contains("not authorized") || text(&o).contains("Not authorized"),
            "{topic} 5: {}",
            text(&o)
        );
    }
    assert_eq!(gw.denials("publish"), 6);
    assert!(gw.stored().await.len() == 2, "nothing refused was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_held_to_the_child_namespace() {
    need_mosquitto();
    let gw = start(|_| {}, OutboxOptions::default()).await;
    let pw = gw.password_child("c1");
    let port = gw.tcp_port();
    for v in ["mqttv311", "mqttv5"] {
        // Allowed: runs until -W ends it, having printed nothing (exit 27 = timed out in 2.0).
        let o = sub_as_c1(&port, v, &pw, "cmd/c1/#", "1").await;
        assert!(!text(&o).contains("denied"), "{v}: {}", text(&o));
        for filter in ["cmd/c2/#", "#", "$aws/things/#", "dt/c1/#"] {
            let o = sub_as_c1(&port, v, &pw, filter, "2").await;
            assert!(text(&o).contains("denied"), "{v} {filter}: {}", text(&o));
        }
    }
    assert_eq!(gw.denials("subscribe"), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_local_ca_pinned_untrusted_and_expired_over_tls() {
    need_mosquitto();
    let gw = start(|_| {}, OutboxOptions::default()).await;
    let (crt, key) = gw.cert_child("c1");
    let (crt, key) = (crt.display().to_string(), key.display().to_string());
    let (port, ca) = (gw.tls_port(), gw.ca());
    let tls_pub = |id: &str, crt: &str, key: &str, topic: &str| {
        let a: Vec<String> = [
            "-h",
            "localhost",
            "-p",
            &port,
            "--cafile",
            &ca,
            "--cert",
            crt,
            "--key",
            key,
            "-i",
            id,
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            "hi",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        async move {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            run("mosquitto_pub", &a).await
        }
    };
    let o = tls_pub("c1", &crt, &key, "dt/c1/t").await;
    assert!(o.status.success(), "local-CA child: {}", text(&o));
    // Its certificate under another client id.
    gw.password_child("c2");
    let o = tls_pub("c2", &crt, &key, "dt/c2/t").await;
    assert!(text(&o).contains("identifier rejected"), "{}", text(&o));

    // A certificate from a CA the gateway does not know: refused, unless its certificateId is
    // pinned for the child (as for a certificate AWS issued).
    let other = tempfile::tempdir().unwrap();
    LocalCa::load_or_create(other.path(), &["x".into()], None).unwrap();
    let (fcert, fkey) = LocalCa::issue_client(other.path(), "c3").unwrap();
    let (fc, fk) = (other.path().join("c.crt"), other.path().join("c.key"));
    std::fs::write(&fc, &fcert).unwrap();
    std::fs::write(&fk, &fkey).unwrap();
    let (fc, fk) = (fc.display().to_string(), fk.display().to_string());
    gw.registry
        .add(&AddChild {
            id: "c3".into(),
            ..Default::default()
        })
        .unwrap();
    let o = tls_pub("c3", &fc, &fk, "dt/c3/t").await;
    assert!(
        text(&o).contains("not authorised") || text(&o).contains("not authorized"),
        "untrusted: {}",
        text(&o)
    );
    gw.registry
        .add(&AddChild {
            id: "c3".into(),
            certificate_id: gatewayd::identity::certificate_id(fcert.as_bytes()),
            password: false,
        })
        .unwrap();
    let o = tls_pub("c3", &fc, &fk, "dt/c3/t").await;
    assert!(o.status.success(), "pinned: {}", text(&o));
    // An expired certificate from the local CA, naming a registered child: refused.
    let expired = {
        let d = gw.dir.path().join("local");
        let ca_key =
            rcgen::KeyPair::from_pem(&std::fs::read_to_string(d.join("ca.key")).unwrap()).unwrap();
        let ca_pem = std::fs::read_to_string(d.join("ca.crt")).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "c1");
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let cert = p.signed_by(&key, &issuer).unwrap();
        let (c, k) = (d.join("old.crt"), d.join("old.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    };
    let o = tls_pub("c1", &expired.0, &expired.1, "dt/c1/t").await;
    assert!(
        text(&o).contains("not authorised") || text(&o).contains("not authorized"),
        "expired: {}",
        text(&o)
    );
    let stored = gw.stored().await;
    assert_eq!(
        stored
            .iter()
            .map(|(c, _, _)| c.as_str())
            .collect::<Vec<_>>(),
        ["c1", "c3"]
    );
    assert_eq!(gw.refusals("not_authorized"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_onboarding_credential_is_limited_to_onboarding_topics() {
    need_mosquitto();
    let (gw, _pwfile) = start_with_onboarding_password().await;
    let o = pub_tcp(
        &gw,
        "mqttv5",
        "dev9",
        "onboarding",
        "s3cret",
        "onboarding/dev9/hello",
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let o = pub_tcp(&gw, "mqttv5", "dev9", "onboarding", "s3cret", "dt/dev9/t").await;
    assert!(text(&o).contains("ot authori"), "{}", text(&o));
    let o = pub_tcp(
        &gw,
        "mqttv311",
        "dev9",
        "onboarding",
        "wrong",
        "onboarding/dev9/x",
    )
    .await;
    assert!(!o.status.success(), "{}", text(&o));
    // Onboarding topics are not upstream ones (`[local] upstream`, default `dt/#`): routed
    // among local clients only, never stored for the cloud.
    assert_eq!(gw.stored().await.len(), 0);
}

/// A refuse-new outbox that is full: 3.1.1 gets no PUBACK, 5 gets 0x97.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_withholds_the_puback() {
    need_mosquitto();
    let gw = start(
        |_| {},
        OutboxOptions {
            max_bytes: 600,
            overflow: OverflowPolicy::RefuseNew,
            ..Default::default()
        },
    )
    .await;
    let pw = gw.password_child("c1");
    let port = gw.tcp_port();
    let big = "x".repeat(400);
    let pubw = |v: &'static str| {
        let (port, pw, big) = (port.clone(), pw.clone(), big.clone());
        async move {
            let rest = ["-q", "1", "-t", "dt/c1/t", "-m", &big];
            mosquitto("mosquitto_pub", &port, v, "c1", "c1", &pw, &rest).await
        }
    };
    let o = pubw("mqttv5").await;
    assert!(o.status.success(), "first fits: {}", text(&o));
    let o = pubw("mqttv5").await;
    assert!(
        text(&o).to_lowercase().contains("quota exceeded"),
        "{}",
        text(&o)
    );
    // 3.1.1: mosquitto_pub waits for the PUBACK that never comes.
    let child = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            "c1",
            "-u",
            "c1",
            "-P",
            &pw,
            "-q",
            "1",
            "-t",
            "dt/c1/t",
            "-m",
            &big,
        ])
        .kill_on_drop(true)
        .output();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), child)
            .await
            .is_err(),
        "a 3.1.1 client got a PUBACK for a refused message"
    );
    assert_eq!(gw.stored().await.len(), 1);
    assert_eq!(gw.ep.status().outbox_refused, 2);
}

/// One misbehaving address must not keep a child out: 1,000 idle TCP sockets and 100 stalled
/// TLS handshakes from 127.0.0.2, then a TLS child from 127.0.0.1 connects within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_and_stalled_handshakes_do_not_keep_a_child_out() {
    need_mosquitto();
    let gw = start(|_| {}, OutboxOptions::default()).await;
    let (crt, key) = gw.cert_child("c1");
    let mut held = Vec::new();
    let src: std::net::SocketAddr = "127.0.0.2:0".parse().unwrap();
    for (n, addr) in [(1000, gw.ep.tcp_addrs()[0]), (100, gw.ep.tls_addrs()[0])] {
        for _ in 0..n {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(src).unwrap();
            if let Ok(c) = s.connect(addr).await {
                held.push(c);
            }
        }
    }
    // The TLS ones send half a ClientHello and stall.
    for c in held.iter_mut().skip(1000) {
        let _ = c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
    }
    let started = Instant::now();
    let port = gw.tls_port();
    let o = run(
        "mosquitto_pub",
        &[
            "-A",
            "127.0.0.1",
            "-h",
            "localhost",
            "-p",
            &port,
            "--cafile",
            &gw.ca(),
            "--cert",
            &crt.display().to_string(),
            "--key",
            &key.display().to_string(),
            "-i",
            "c1",
            "-q",
            "1",
            "-t",
            "dt/c1/t",
            "-m",
            "through",
        ],
    )
    .await;
    let took = started.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(
        gw.refusals("max_connections_per_address") + gw.refusals("max_handshakes_per_address")
            > 1000
    );
    drop(held);
}

/// Random bytes, an oversized remaining length, invalid UTF-8 topics and a second CONNECT, on
/// many connections at once: each offender is dropped, a child keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_packet_flood_leaves_the_endpoint_serving_others() {
    need_mosquitto();
    let gw = start(|_| {}, OutboxOptions::default()).await;
    let pw = gw.password_child("c1");
    let pw2 = gw.password_child("bad");
    let addr = gw.ep.tcp_addrs()[0];
    let connect = {
        let mut b = vec![0x10, 0];
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60, 0, 3];
        body.extend_from_slice(b"bad");
        body.extend_from_slice(&[0, 3]);
        body.extend_from_slice(b"bad");
        body.extend_from_slice(&(pw2.len() as u16).to_be_bytes());
        body.extend_from_slice(pw2.as_bytes());
        b[1] = body.len() as u8;
        b.extend(body);
        b
    };
    let payloads: Vec<Vec<u8>> = vec![
        (0..4096).map(|i| (i * 7919 % 251) as u8).collect(),
        [connect.clone(), vec![0x30, 0xff, 0xff, 0xff, 0x7f]].concat(),
        [
            connect.clone(),
            vec![0x30, 0x05, 0x00, 0x02, 0xc3, 0x28, b'x'],
        ]
        .concat(),
        [connect.clone(), connect.clone()].concat(),
        vec![0x10, 0xff, 0xff, 0xff, 0x7f],
    ];
    let flood = tokio::spawn(async move {
        let mut n = 0;
        for round in 0..200 {
            let p = payloads[round % payloads.len()].clone();
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                let _ = s.write_all(&p).await;
                let mut sink = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
                n += 1;
            }
        }
        n
    });
    let mut ok = 0;
    while !flood.is_finished() || ok < 3 {
        let o = pub_tcp(&gw, "mqttv311", "c1", "c1", &pw, "dt/c1/t").await;
        assert!(o.status.success(), "{}", text(&o));
        ok += 1;
    }
    assert_eq!(flood.await.unwrap(), 200);
    assert!(
        gw.refusals("malformed_packet")
            + gw.refusals("malformed_connect")
            + gw.refusals("connect_too_large")
            >= 150
    );
    assert_eq!(gw.stored().await.len(), ok);
}

/// With paused time, a socket that never starts its TLS handshake is dropped at
/// `handshake_timeout_ms`, and one that never sends CONNECT at `connect_timeout_ms`.
#[tokio::test(start_paused = true)]
async fn silent_sockets_are_dropped_at_their_timeouts() {
    let gw = start(|_| {}, OutboxOptions::default()).await;
    let mut tls = tokio::net::TcpStream::connect(gw.ep.tls_addrs()[0])
        .await
        .unwrap();
    let mut tcp = tokio::net::TcpStream::connect(gw.ep.tcp_addrs()[0])
        .await
        .unwrap();
    let mut b = [0u8; 8];
    // Both reads end (EOF) only because the server closed them at its deadline (the outer
    // bound is virtual time, far past both).
    let started = tokio::time::Instant::now();
    let bound = Duration::from_secs(600);
    let r = tokio::time::timeout(bound, tls.read(&mut b)).await;
    assert_eq!(r.expect("TLS socket never closed").unwrap(), 0);
    let r = tokio::time::timeout(bound, tcp.read(&mut b)).await;
    assert_eq!(r.expect("TCP socket never closed").unwrap(), 0);
    assert!(started.elapsed() >= Duration::from_millis(5000));
    assert_eq!(gw.refusals("handshake_timeout"), 1);
    assert_eq!(gw.refusals("connect_timeout"), 1);
}

/// Wills are checked like publishes (at CONNECT), and QoS 0 publishes are stored too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_are_checked_like_publishes_and_qos0_is_stored() {
    need_mosquitto();
    let gw = start(|_| {}, OutboxOptions::default()).await;
    let pw = gw.password_child("c1");
    let port = gw.tcp_port();
    let with_will = |v: &'static str, will: &'static str| {
        let (port, pw) = (port.clone(), pw.clone());
        async move {
            let rest = [
                "--will-topic",
                will,
                "--will-payload",
                "gone",
                "-q",
                "0",
                "-t",
                "dt/c1/q0",
                "-m",
                "zero",
            ];
            mosquitto("mosquitto_pub", &port, v, "c1", "c1", &pw, &rest).await
        }
    };
    for v in ["mqttv311", "mqttv5"] {
        let o = with_will(v, "dt/c2/status").await;
        assert!(!o.status.success(), "{v}: {}", text(&o));
        let o = with_will(v, "dt/c1/status").await;
        assert!(o.status.success(), "{v}: {}", text(&o));
    }
    assert_eq!(gw.denials("will"), 2);
    assert_eq!(gw.refusals("will_not_permitted"), 2);
    // A clean DISCONNECT: the will is not sent; the two QoS 0 publishes are stored. QoS 0 has no
    // ack, so the client may exit before the gateway has read its publish: wait (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.outbox.stats().entries < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stored = gw.stored().await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(
        stored
            .iter()
            .all(|(_, t, p)| t == "dt/c1/q0" && p == b"zero")
    );
}

/// rumqttd behind the front door routes what the ACL allowed among local clients: a child gets
/// the commands a local application publishes (a retained one on subscribing, then a live one),
/// a dashboard application gets children's telemetry; nobody else gets them; only upstream topics
/// (`dt/#`) are stored for the cloud. Each subscriber's first line is a retained message, so the
/// next publish is sent only once its subscription is known to be in place (no sleeps). A client
/// id is one session (the newest wins), so each publisher and subscriber is its own client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_traffic_is_routed_among_local_clients_with_retained_messages() {
    need_mosquitto();
    let gw = start(
        |c| {
            let rules = |p: &str, s: &str| gatewayd::daemon::config::ClientRules {
                publish: Some(vec![p.into()]),
                subscribe: Some(vec![s.into()]),
            };
            c.clients.insert("ops".into(), rules("cmd/+/#", "ops/#"));
            c.clients.insert("dash".into(), rules("dash/#", "dt/#"));
        },
        OutboxOptions::default(),
    )
    .await;
    let pw: std::collections::HashMap<&str, String> = ["c1", "c2", "c3", "ops", "dash"]
        .into_iter()
        .map(|id| (id, gw.password_child(id)))
        .collect();
    let port = gw.tcp_port();
    let publish = |v: &'static str, id: &'static str, args: Vec<&'static str>| {
        let (port, pw) = (port.clone(), pw[id].clone());
        async move {
            let mut rest = vec!["-q", "1", "-t"];
            rest.extend(args);
            let o = mosquitto("mosquitto_pub", &port, v, id, id, &pw, &rest).await;
            assert!(o.status.success(), "{id}: {}", text(&o));
        }
    };
    publish(
        "mqttv311",
        "ops",
        vec!["cmd/c1/setpoint", "-r", "-m", "21.5"],
    )
    .await;
    publish("mqttv5", "c2", vec!["dt/c2/status", "-r", "-m", "up"]).await;

    let mut c1 = Sub::spawn(&port, "mqttv311", "c1", &pw["c1"], "cmd/c1/#").await;
    let mut c3 = Sub::spawn(&port, "mqttv5", "c3", &pw["c3"], "cmd/c3/#").await;
    let mut dash = Sub::spawn(&port, "mqttv5", "dash", &pw["dash"], "dt/#").await;
    assert_eq!(c1.line().await.as_deref(), Some("cmd/c1/setpoint 21.5"));
    assert_eq!(dash.line().await.as_deref(), Some("dt/c2/status up"));

    publish("mqttv5", "ops", vec!["cmd/c1/go", "-m", "1"]).await;
    assert_eq!(c1.line().await.as_deref(), Some("cmd/c1/go 1"));
    publish("mqttv311", "c2", vec!["dt/c2/temp", "-m", "20"]).await;
    assert_eq!(dash.line().await.as_deref(), Some("dt/c2/temp 20"));
    // A command for c3 proves c3's subscription works and that it got nothing of c1's before.
    publish("mqttv5", "ops", vec!["cmd/c3/go", "-m", "3"]).await;
    assert_eq!(c3.line().await.as_deref(), Some("cmd/c3/go 3"));
    // And c1 may not ask for c3's.
    let o = sub_as_c1(&port, "mqttv5", &pw["c1"], "cmd/c3/#", "2").await;
    assert!(text(&o).contains("denied"), "{}", text(&o));

    let mut topics: Vec<String> = gw.stored().await.into_iter().map(|e| e.1).collect();
    topics.sort();
    assert_eq!(topics, ["dt/c2/status", "dt/c2/temp"]);
    assert!(gw.ep.status().delivered >= 5, "{:?}", gw.ep.status());
}

/// A device maker's CA (rcgen), issuing device certificates written as chain files (device
/// certificate, then the CA) with their keys.
struct Maker {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: Vec<u8>,
    pem: String,
}

impl Maker {
    fn new(name: &str) -> Maker {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        let (der, pem) = (cert.der().to_vec(), cert.pem());
        Maker {
            issuer: rcgen::Issuer::new(p, key),
            der,
            pem,
        }
    }

    /// The device's certificate and key files; the chain file ends with `presented` (normally
    /// this CA's own certificate).
    fn device(&self, dir: &std::path::Path, id: &str, presented: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, id);
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{id}.chain")),
            dir.join(format!("{id}.key")),
        );
        std::fs::write(&c, format!("{}{presented}", cert.pem())).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    }

    /// As `openssl x509 -fingerprint -sha256` prints it: upper case, colons.
    fn fingerprint(&self) -> String {
        use sha2::Digest;
        let d = sha2::Sha256::digest(&self.der);
        d.iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

async fn tls_pub(gw: &Gw, v: &str, id: &str, (crt, key): &(String, String), topic: &str) -> Output {
    let (port, ca) = (gw.tls_port(), gw.ca());
    let args = [
        "-h",
        "localhost",
        "-p",
        &port,
        "--cafile",
        &ca,
        "--cert",
        crt,
        "--key",
        key,
        "-V",
        v,
        "-i",
        id,
        "-q",
        "1",
        "-t",
        topic,
        "-m",
        "hi",
    ];
    run("mosquitto_pub", &args).await
}

/// Onboarding by certificate: a device certificate from a maker CA whose fingerprint is pinned
/// (the device presents the CA in its chain; the gateway needs only the fingerprint), or a
/// certificate pinned by its certificateId, may use the onboarding topics and nothing else. A
/// device signed by a look-alike CA (same name, other key) that presents the real maker CA's
/// certificate is refused, and an unpinned gateway refuses the same devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_by_maker_ca_fingerprint_or_pinned_certificate() {
    need_mosquitto();
    let files = tempfile::tempdir().unwrap();
    let (maker, fake) = (
        Maker::new("Maker Devices CA"),
        Maker::new("Maker Devices CA"),
    );
    let dev7 = maker.device(files.path(), "dev7", &maker.pem);
    // Signed by the look-alike, presenting the real maker CA's certificate (which is public).
    let dev8 = fake.device(files.path(), "dev8", &maker.pem);
    // A lone self-signed device certificate, pinned by certificateId.
    let solo = Maker::new("dev9");
    let solo_id = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&solo.der));
    let dev9 = (
        files.path().join("dev9.crt").display().to_string(),
        files.path().join("dev9.key").display().to_string(),
    );
    std::fs::write(&dev9.0, &solo.pem).unwrap();
    std::fs::write(&dev9.1, solo.issuer.key().serialize_pem()).unwrap();

    let fp = maker.fingerprint();
    let gw = start(
        move |c| {
            c.onboarding_ca_fingerprints = vec![fp];
            c.onboarding_certificate_ids = vec![solo_id];
        },
        OutboxOptions::default(),
    )
    .await;
    let o = tls_pub(&gw, "mqttv5", "dev7", &dev7, "onboarding/dev7/hello").await;
    assert!(o.status.success(), "maker CA device: {}", text(&o));
    let o = tls_pub(&gw, "mqttv5", "dev7", &dev7, "dt/dev7/x").await;
    assert!(
        text(&o).contains("ot authori"),
        "outside onboarding: {}",
        text(&o)
    );
    let o = tls_pub(&gw, "mqttv311", "dev9", &dev9, "onboarding/dev9/hello").await;
    assert!(o.status.success(), "pinned certificate: {}", text(&o));
    for v in ["mqttv311", "mqttv5"] {
        let o = tls_pub(&gw, v, "dev8", &dev8, "onboarding/dev8/hello").await;
        assert!(!o.status.success(), "look-alike CA {v}: {}", text(&o));
    }
    assert_eq!(gw.refusals("not_authorized"), 2);

    let unpinned = start(|_| {}, OutboxOptions::default()).await;
    let o = tls_pub(&unpinned, "mqttv5", "dev7", &dev7, "onboarding/dev7/hello").await;
    assert!(!o.status.success(), "unpinned: {}", text(&o));
    let o = tls_pub(&unpinned, "mqttv5", "dev9", &dev9, "onboarding/dev9/hello").await;
    assert!(!o.status.success(), "unpinned: {}", text(&o));
}

/// A constrained device announces itself with the onboarding credential (mosquitto_rr: publish,
/// then wait for the answer): it is registered with a password the gateway makes, gets it back
/// once on its onboarding topic, connects with it as a child, and is handed to the provisioning
/// hook with what it said. Announcing an id already registered is refused (it must not reset
/// another device's credential).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constrained_device_announces_itself_and_gets_a_credential() {
    need_mosquitto();
    let (gw, _pwfile) = start_with_onboarding_password().await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    gw.ep
        .set_announce_hook(std::sync::Arc::new(move |a| s2.lock().unwrap().push(a)));
    let port = gw.tcp_port();
    let rr = |id: &'static str, answer: &'static str| {
        let port = port.clone();
        async move {
            let topic = format!("onboarding/{id}/announce");
            let resp = format!("onboarding/{id}/{answer}");
            let rest = [
                "-t",
                &topic,
                "-e",
                &resp,
                "-q",
                "1",
                "-W",
                "10",
                "-m",
                r#"{"serial":"SN-5","model":"TH-1","vendor":"Acme"}"#,
            ];
            mosquitto(
                "mosquitto_rr",
                &port,
                "mqttv5",
                id,
                "onboarding",
                "s3cret",
                &rest,
            )
            .await
        }
    };
    let o = rr("dev5", "credential").await;
    assert!(o.status.success(), "{}", text(&o));
    let cred: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(cred["username"], "dev5");
    let pw = cred["password"].as_str().unwrap().to_owned();
    assert_eq!(pw.len(), 32, "{cred}");
    let o = pub_tcp(&gw, "mqttv311", "dev5", "dev5", &pw, "dt/dev5/temp").await;
    assert!(o.status.success(), "the credential works: {}", text(&o));
    assert_eq!(
        *seen.lock().unwrap(),
        [gatewayd::local::Announced {
            id: "dev5".into(),
            serial: Some("SN-5".into()),
            model: Some("TH-1".into()),
            vendor: Some("Acme".into()),
        }]
    );
    // Again, for the same id: refused, and the first password still works.
    let o = rr("dev5", "rejected").await;
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("already registered"),
        "{}",
        text(&o)
    );
    let o = pub_tcp(&gw, "mqttv311", "dev5", "dev5", &pw, "dt/dev5/temp").await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(seen.lock().unwrap().len(), 1);
    // The announcement is not upstream data.
    let topics: Vec<String> = gw.stored().await.into_iter().map(|e| e.1).collect();
    assert_eq!(topics, ["dt/dev5/temp", "dt/dev5/temp"]);
}
