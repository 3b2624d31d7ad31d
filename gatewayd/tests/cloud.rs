//! The `Cloud` service against the real `iotcore-sim`: manual acknowledgement of incoming QoS 1,
//! routes and restored subscriptions across lost sessions and the claim → thing switch, the
//! fleet client leaving no subscriptions behind, topic checks before anything is queued.
//!
//! The daemon is not involved: each test drives `Cloud` handles in-process (the gateway, and a
//! second client standing in for a cloud application) against a sim on port 0.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::Sim;
use gatewayd::cloud::fleet::{FleetApi, FleetError};
use gatewayd::cloud::{Cloud, ConnectPacer, Delivery, Keep, Lane, UplinkError, UplinkParams};
use gatewayd::daemon::config::UplinkConfig;
use gatewayd::daemon::health::Health;
use gatewayd::daemon::status::{Board, UplinkStatus};
use rumqttc::{QoS, SubscribeReasonCode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// Everything allowed, except the `rejected` answer topic of template `Denied` (to make a
/// fleet call's SUBSCRIBE half-refused).
const POLICY: &str = r#"{"Version":"2012-10-17","Statement":[
  {"Effect":"Allow","Action":"iot:*","Resource":"*"},
  {"Effect":"Deny","Action":"iot:Subscribe","Resource":"arn:aws:iot:*:*:topicfilter/$aws/provisioning-templates/Denied/provision/json/rejected"}
]}"#;

struct Env {
    sim: Sim,
    _dir: tempfile::TempDir,
}

struct Creds {
    cert: PathBuf,
    key: PathBuf,
}

impl Env {
    /// A sim with policy `Open` and certificates for thing `gw-0001` and client `app`.
    fn start() -> (Env, Creds, Creds) {
        let dir = tempfile::tempdir().unwrap();
        let mut sim = Sim::init(dir.path(), None);
        let doc = dir.path().join("open.json");
        std::fs::write(&doc, POLICY).unwrap();
        sim.admin(
            &["policies", "add"],
            &["--name", "Open", "--document", doc.to_str().unwrap()],
        );
        let gw = create_cert(&sim, dir.path(), "gw-0001");
        let app = create_cert(&sim, dir.path(), "app");
        sim.serve(&[]);
        (Env { sim, _dir: dir }, gw, app)
    }

    fn params(&self, role: &'static str, c: &Creds, client_id: &str, clean: bool) -> UplinkParams {
        UplinkParams {
            role,
            endpoint: "localhost".into(),
            port: self.sim.port,
            root_ca_pem: std::fs::read(&self.sim.root_ca).unwrap(),
            cert_pem: std::fs::read(&c.cert).unwrap(),
            key_pem: std::fs::read(&c.key).unwrap(),
            client_id: client_id.into(),
            clean_session: clean,
            config: UplinkConfig {
                backoff_initial_ms: 200,
                backoff_max_secs: 1,
                ..UplinkConfig::default()
            },
            permanent_retry: Duration::from_secs(3600),
        }
    }

    fn claim(&self) -> Creds {
        Creds {
            cert: self.sim.claim_cert.clone(),
            key: self.sim.claim_key.clone(),
        }
    }
}

fn create_cert(sim: &Sim, dir: &Path, thing: &str) -> Creds {
    let out = dir.join(thing);
    sim.admin(
        &["certs", "create"],
        &[
            "--out",
            out.to_str().unwrap(),
            "--policy",
            "Open",
            "--thing",
            thing,
        ],
    );
    Creds {
        cert: out.with_extension("pem"),
        key: out.with_extension("key"),
    }
}

fn new_cloud() -> (Cloud, Arc<Board>) {
    let board = Board::new();
    let cloud = Cloud::new(
        Arc::new(ConnectPacer::default()),
        board.clone(),
        Health::new(None),
        &CancellationToken::new(),
    );
    (cloud, board)
}

async fn connected(cloud: &Cloud, params: UplinkParams) {
    cloud.connect(params).await.unwrap();
    cloud.wait_connected(WAIT).await.unwrap();
}

fn uplink(board: &Board) -> UplinkStatus {
    board.snapshot().uplink.unwrap()
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn recv(rx: &mut mpsc::Receiver<Delivery>) -> Delivery {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no message")
        .expect("route closed")
}

async fn publish(app: &Cloud, topic: &str) {
    app.publish(
        Lane::Control,
        topic,
        QoS::AtLeastOnce,
        topic.as_bytes().to_vec(),
    )
    .await
    .unwrap();
}

/// Five QoS 1 messages to a route that holds two and is not read. The two it holds are
/// acknowledged once consumed; the three it could not take are not acknowledged, so when the
/// gateway resumes its persistent session the broker sends exactly those three again. (With
/// rumqttc's automatic acknowledgements all five were acknowledged on arrival, and the three
/// were dropped for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_qos1_is_acknowledged_only_once_handed_on() {
    let (env, gw_creds, app_creds) = Env::start();
    let (gw, board) = new_cloud();
    let (_route, mut rx) = gw.route("cmd/gw-0001/#", 2).unwrap();
    let persistent = env.params("thing", &gw_creds, "gw-0001", false);
    connected(&gw, persistent.clone()).await;
    let codes = gw
        .subscribe(&["cmd/gw-0001/#".into()], Keep::Restore)
        .await
        .unwrap();
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    let (app, _) = new_cloud();
    connected(&app, env.params("thing", &app_creds, "app", true)).await;

    for i in 1..=5 {
        publish(&app, &format!("cmd/gw-0001/{i}")).await;
    }
    wait_for("three messages left unacknowledged", || {
        uplink(&board).incoming_not_acked == 3
    })
    .await;
    assert_eq!(rx.len(), 2);
    for i in 1..=2 {
        let d = recv(&mut rx).await;
        assert_eq!(d.topic(), format!("cmd/gw-0001/{i}"));
        d.ack();
    }

    // Resume the session: what was never acknowledged comes again, nothing else.
    gw.disconnect().await;
    connected(&gw, persistent).await;
    assert!(uplink(&board).session_present);
    let mut again = Vec::new();
    for _ in 0..3 {
        let d = recv(&mut rx).await;
        assert!(d.publish().dup, "{d:?} should be a redelivery");
        again.push(d.topic().to_owned());
    }
    assert_eq!(again, ["cmd/gw-0001/3", "cmd/gw-0001/4", "cmd/gw-0001/5"]);
    let extra = tokio::time::timeout(Duration::from_millis(700), rx.recv()).await;
    assert!(extra.is_err(), "nothing else is resent: {extra:?}");
    assert_eq!(env.sim.counter("dropped_messages"), 0);
    gw.disconnect().await;
    app.disconnect().await;
}

/// A route and a `Keep::Restore` subscription made before any session exists keep working
/// through a claim session (whose policy refuses the subscription), the switch to the thing
/// session, and a lost clean session (`fault drop-all`): after every CONNACK without a session
/// the subscription is made again. A `Keep::Transient` one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_subscriptions_survive_session_switches_and_lost_sessions() {
    let (env, gw_creds, app_creds) = Env::start();
    let (gw, board) = new_cloud();
    let (_route, mut rx) = gw.route("cmd/gw-0001/#", 16).unwrap();
    let (_tmp_route, mut tmp_rx) = gw.route("tmp/gw-0001/#", 16).unwrap();
    let r = gw.subscribe(&["cmd/gw-0001/#".into()], Keep::Restore).await;
    assert!(matches!(r, Err(UplinkError::NotConnected)), "{r:?}");
    assert_eq!(gw.restored_filters(), ["cmd/gw-0001/#"]);

    // The claim session may not subscribe there: refused, still recorded.
    connected(&gw, env.params("claim", &env.claim(), "claim-0001", true)).await;
    wait_for("the claim session's restoring SUBSCRIBE refused", || {
        env.sim.counter("denied") == 1
    })
    .await;
    assert_eq!(gw.restored_filters(), ["cmd/gw-0001/#"]);

    // The thing session: the record is made on its first CONNACK.
    connected(&gw, env.params("thing", &gw_creds, "gw-0001", true)).await;
    let (app, app_board) = new_cloud();
    connected(&app, env.params("thing", &app_creds, "app", true)).await;
    let codes = gw
        .subscribe(&["tmp/gw-0001/#".into()], Keep::Transient)
        .await
        .unwrap();
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    // The restoring SUBSCRIBE went out before the caller's, so it is in place by now.
    publish(&app, "cmd/gw-0001/a").await;
    publish(&app, "tmp/gw-0001/a").await;
    assert_eq!(recv(&mut rx).await.topic(), "cmd/gw-0001/a");
    assert_eq!(recv(&mut tmp_rx).await.topic(), "tmp/gw-0001/a");

    // The broker drops every connection; a clean session keeps nothing.
    env.sim.fault("drop-all", &[]);
    for (who, b) in [("gateway", &board), ("app", &app_board)] {
        wait_for(&format!("the {who} back with a new session"), || {
            let u = uplink(b);
            u.connects == 2 && u.state == "connected" && !u.session_present
        })
        .await;
    }
    // The restoring SUBSCRIBE is queued on the CONNACK, before anything of ours; give the
    // broker its SUBACK by a round trip of our own on the same connection.
    gw.subscribe(&["probe/gw-0001".into()], Keep::Transient)
        .await
        .unwrap();
    publish(&app, "tmp/gw-0001/b").await;
    publish(&app, "cmd/gw-0001/b").await;
    assert_eq!(recv(&mut rx).await.topic(), "cmd/gw-0001/b");
    assert!(
        tmp_rx.try_recv().is_err(),
        "a transient subscription is not restored"
    );
    gw.disconnect().await;
    app.disconnect().await;
}

/// A fleet call that fails (refused subscription, rejection, PUBACK timeout, answer timeout)
/// leaves no subscription behind. Measured at the broker: the connection holds 48 of its 50
/// subscriptions, so after each failed call a SUBSCRIBE of two more filters is granted only if
/// the call's two answer topics were given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_calls_leave_no_subscriptions_behind() {
    let (env, gw_creds, _) = Env::start();
    let (gw, _) = new_cloud();
    connected(&gw, env.params("thing", &gw_creds, "gw-0001", true)).await;
    let fill: Vec<String> = (0..48).map(|i| format!("fill/{i}")).collect();
    let codes = gw.subscribe(&fill, Keep::Transient).await.unwrap();
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
        "{codes:?}"
    );
    let probe = || async {
        let two = vec!["probe/a".to_owned(), "probe/b".to_owned()];
        let codes = gw.subscribe(&two, Keep::Transient).await.unwrap();
        gw.unsubscribe(&two).await.unwrap();
        codes
            .iter()
            .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
    };
    assert!(probe().await, "room for two at the start");
    let fleet = gw.fleet();
    let register = |template: &str| FleetApi::RegisterThing {
        template: template.into(),
    };
    let body = serde_json::json!({"certificateOwnershipToken": "t", "parameters": {}});
    let short = Duration::from_millis(800);

    // Half-refused SUBSCRIBE: `accepted` was granted.
    let r = fleet.call(&register("Denied"), &body, short, || {}).await;
    assert!(
        matches!(r, Err(FleetError::SubscribeDenied { .. })),
        "{r:?}"
    );
    assert!(probe().await, "after a refused subscription");

    // Rejected.
    env.sim.fault(
        "reject-next",
        &[
            "--count",
            "1",
            "--status",
            "400",
            "--code",
            "InvalidRequest",
        ],
    );
    let r = fleet
        .call(&register("GatewayTemplate"), &body, WAIT, || {})
        .await;
    assert!(matches!(r, Err(FleetError::Rejected { .. })), "{r:?}");
    assert!(probe().await, "after a rejection");

    // No PUBACK in time.
    env.sim.fault("stall-acks", &["--seconds", "2"]);
    let r = fleet
        .call(&register("GatewayTemplate"), &body, short, || {})
        .await;
    assert!(
        matches!(r, Err(FleetError::Timeout { step: "PUBACK", .. })),
        "{r:?}"
    );
    env.sim.fault("clear", &[]);
    assert!(probe().await, "after a PUBACK timeout");

    // No answer in time.
    env.sim.fault("delay", &["--ms", "3000"]);
    let r = fleet
        .call(&register("GatewayTemplate"), &body, short, || {})
        .await;
    assert!(
        matches!(r, Err(FleetError::Timeout { step: "answer", .. })),
        "{r:?}"
    );
    assert!(probe().await, "after an answer timeout");
    env.sim.fault("clear", &[]);
    gw.disconnect().await;
}

/// An invalid topic fails at once, for good, and the connection stays up (the sim, like AWS,
/// disconnects a client that publishes to one; rumqttc refused some with an error that read as
/// a full queue, `Busy`, retried forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_topics_fail_at_once_and_keep_the_connection() {
    let (env, gw_creds, _) = Env::start();
    let (gw, board) = new_cloud();
    connected(&gw, env.params("thing", &gw_creds, "gw-0001", true)).await;
    for bad in ["dt/+/gw-0001", "dt/gw-0001/#", "a/b/c/d/e/f/g/h/i", ""] {
        let r = gw
            .publish(Lane::Telemetry, bad, QoS::AtLeastOnce, vec![1])
            .await;
        match r {
            Err(e @ UplinkError::InvalidTopic { .. }) => assert!(!e.is_transient()),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    let r = gw
        .fleet()
        .call(
            &FleetApi::RegisterThing {
                template: "a+b".into(),
            },
            &serde_json::json!({}),
            WAIT,
            || {},
        )
        .await;
    match r {
        Err(e @ FleetError::Uplink { .. }) => assert!(!e.is_transient(), "{e}"),
        other => panic!("{other:?}"),
    }
    gw.publish(Lane::Telemetry, "dt/gw-0001/ok", QoS::AtLeastOnce, vec![1])
        .await
        .unwrap();
    let u = uplink(&board);
    assert_eq!((u.connects, u.disconnects), (1, 0));
    gw.disconnect().await;
}
