//! The identity step driver serves any subject over one `Cloud` handle: the gateway over its
//! claim session, then a child over the gateway's thing session (the same handle after the
//! switch), against a real iotcore-sim. The child's interrupted provisioning resumes by redeeming
//! its saved token, so the cloud holds exactly one certificate for it.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use gatewayd::cloud::{Cloud, ConnectPacer, UplinkParams};
use gatewayd::daemon::config::{KeyAlgorithm, UplinkConfig};
use gatewayd::daemon::health::Health;
use gatewayd::daemon::status::Board;
use gatewayd::identity::driver::{Driver, Host, Outcome, Spec};
use gatewayd::identity::record::{CertificateApi, IdentityRecord, PendingCall, Stage};
use gatewayd::identity::{IdentityError, Paths, Subject};
use gatewayd::store::Store;
use tokio_util::sync::CancellationToken;

const CHILD_TEMPLATE: &str = r#"{
  "Parameters": {
    "SerialNumber": {"Type": "String"},
    "ParentThing": {"Type": "String"},
    "AWS::IoT::Certificate::Id": {"Type": "String"}
  },
  "Resources": {
    "thing": {
      "Type": "AWS::IoT::Thing",
      "Properties": {
        "ThingName": {"Fn::Join": ["-", [{"Ref": "ParentThing"}, {"Ref": "SerialNumber"}]]},
        "AttributePayload": {"parent": {"Ref": "ParentThing"}}
      }
    },
    "certificate": {
      "Type": "AWS::IoT::Certificate",
      "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}
    }
  }
}"#;

/// A host whose session is already up (the cloud handle is connected); it can be told to fail
/// before a given call, as a crash or an outage would stop the driver there.
struct Connected {
    fail_before_register: bool,
    timeout: Duration,
}

impl Host for Connected {
    async fn ready(&mut self, rec: &mut IdentityRecord) -> Result<(), IdentityError> {
        if self.fail_before_register && rec.stage == Stage::CertificateIssued {
            return Err(IdentityError::Cancelled);
        }
        Ok(())
    }
    fn call_timeout(&self, _: &IdentityRecord) -> Duration {
        self.timeout
    }
    fn activity(&self, _: &str) {}
    fn show(&self, _: &IdentityRecord) {}
}

fn params(
    sim: &Sim,
    role: &'static str,
    client_id: &str,
    cert: Vec<u8>,
    key: Vec<u8>,
) -> UplinkParams {
    UplinkParams {
        role,
        endpoint: "localhost".into(),
        port: sim.port,
        root_ca_pem: std::fs::read(&sim.root_ca).unwrap(),
        cert_pem: cert,
        key_pem: key,
        client_id: client_id.into(),
        clean_session: role != "thing",
        config: UplinkConfig {
            connect_floor_ms: 100,
            ..UplinkConfig::default()
        },
        permanent_retry: Duration::from_secs(60),
    }
}

fn spec(subject: Subject, template: &str, parameters: &[(&str, &str)]) -> Spec {
    Spec {
        subject,
        api: CertificateApi::FromCsr,
        key_algorithm: KeyAlgorithm::EcdsaP256,
        template: template.into(),
        parameters: parameters
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        common_name: "test".into(),
    }
}

async fn provision(
    store: &Store,
    cloud: &Cloud,
    state: &std::path::Path,
    spec: &Spec,
    host: &mut Connected,
) -> (Result<Outcome, IdentityError>, IdentityRecord) {
    let paths = Paths::new(state, &spec.subject);
    let mut rec: IdentityRecord = store
        .load_identity(&spec.subject.key())
        .unwrap()
        .unwrap_or_default();
    let r = Driver {
        store,
        fleet: &cloud.fleet(),
        paths: &paths,
        spec,
        host,
    }
    .provision(&mut rec)
    .await;
    (r, rec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_then_child_over_one_cloud_handle_and_a_child_resumes_with_its_token() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = Sim::init(&tmp.path().join("sim"), None);
    let body = tmp.path().join("child.json");
    std::fs::write(&body, CHILD_TEMPLATE).unwrap();
    sim.admin(
        &["template", "add", "--name", "ChildTemplate"],
        &["--body", body.to_str().unwrap()],
    );
    sim.serve(&[]);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let store = Store::open(&state).unwrap();
    let cancel = CancellationToken::new();
    let cloud = Cloud::new(
        Arc::new(ConnectPacer::default()),
        Board::new(),
        Health::new(None),
        &cancel,
    );
    let mut host = Connected {
        fail_before_register: false,
        timeout: Duration::from_secs(10),
    };

    // The gateway, over the claim session.
    cloud
        .connect(params(
            &sim,
            "claim",
            "claim-0001",
            std::fs::read(&sim.claim_cert).unwrap(),
            std::fs::read(&sim.claim_key).unwrap(),
        ))
        .await
        .unwrap();
    cloud.wait_connected(Duration::from_secs(10)).await.unwrap();
    let gw = spec(
        Subject::Gateway,
        "GatewayTemplate",
        &[("SerialNumber", "0001")],
    );
    let (r, rec) = provision(&store, &cloud, &state, &gw, &mut host).await;
    assert_eq!(r.unwrap(), Outcome::Registered);
    assert_eq!(rec.thing_name.as_deref(), Some("gw-0001"));

    // The same handle switches to the thing session.
    let gw_paths = Paths::new(&state, &Subject::Gateway);
    cloud
        .connect(params(
            &sim,
            "thing",
            "gw-0001",
            std::fs::read(&gw_paths.cert).unwrap(),
            std::fs::read(&gw_paths.key).unwrap(),
        ))
        .await
        .unwrap();
    cloud.wait_connected(Duration::from_secs(10)).await.unwrap();
    assert_eq!(cloud.role(), Some("thing"));

    // A child, stopped after its certificate was saved (as a crash would), then resumed.
    let child = spec(
        Subject::child("meter-7").unwrap(),
        "ChildTemplate",
        &[("SerialNumber", "meter-7"), ("ParentThing", "gw-0001")],
    );
    host.fail_before_register = true;
    let (r, rec) = provision(&store, &cloud, &state, &child, &mut host).await;
    assert!(matches!(r, Err(IdentityError::Cancelled)), "{r:?}");
    assert_eq!(rec.stage, Stage::CertificateIssued);
    assert_eq!(rec.pending, None);
    let issued = rec.certificate_id.clone().unwrap();

    host.fail_before_register = false;
    let (r, rec) = provision(&store, &cloud, &state, &child, &mut host).await;
    assert_eq!(r.unwrap(), Outcome::Registered);
    assert_eq!(rec.thing_name.as_deref(), Some("gw-0001-meter-7"));
    assert_eq!(rec.certificate_id.as_deref(), Some(issued.as_str()));
    assert_eq!(rec.pending, Option::<PendingCall>::None);
    assert!(rec.orphaned_certificates.is_empty());

    // Stored under its own key, files in its own directory, its own key in the certificate.
    let mut subjects = store.list_identities().unwrap();
    subjects.sort();
    assert_eq!(
        subjects,
        vec!["child/meter-7".to_owned(), "gateway".to_owned()]
    );
    let child_paths = Paths::new(&state, &child.subject);
    assert!(child_paths.dir.ends_with("identity/children/meter-7"));
    assert_eq!(
        gatewayd::identity::certificate_id(&std::fs::read(&child_paths.cert).unwrap()).as_deref(),
        Some(issued.as_str())
    );
    assert_ne!(
        std::fs::read(&child_paths.key).unwrap(),
        std::fs::read(&gw_paths.key).unwrap()
    );

    // The cloud: two things, each with exactly its one certificate.
    let things = sim.things();
    let names: Vec<&str> = things
        .iter()
        .filter_map(|t| t["thingName"].as_str())
        .collect();
    assert!(
        names.contains(&"gw-0001") && names.contains(&"gw-0001-meter-7"),
        "{things:?}"
    );
    let certs = sim.device_certs();
    assert_eq!(certs.len(), 2, "{certs:?}");
    assert!(
        certs.iter().any(|c| c["certificateId"] == issued.as_str()),
        "{certs:?}"
    );

    // The child rule for a lost RegisterThing answer (the gateway cannot connect as a child to
    // probe it): the answer comes too late, the retry finds the token used, the certificate is
    // recorded as possibly active and the child starts over onto the same thing.
    let other = spec(
        Subject::child("meter-8").unwrap(),
        "ChildTemplate",
        &[("SerialNumber", "meter-8"), ("ParentThing", "gw-0001")],
    );
    host.fail_before_register = true;
    let (_, rec) = provision(&store, &cloud, &state, &other, &mut host).await;
    let first = rec.certificate_id.clone().unwrap();
    host.fail_before_register = false;
    host.timeout = Duration::from_secs(1);
    sim.fault("delay", &["--ms", "2500"]);
    let (r, rec) = provision(&store, &cloud, &state, &other, &mut host).await;
    assert!(r.is_err(), "the answer should have been too late: {r:?}");
    assert_eq!(rec.pending, Some(PendingCall::RegisterThing));
    sim.fault("delay", &["--ms", "0"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    host.timeout = Duration::from_secs(10);
    let (r, mut rec) = provision(&store, &cloud, &state, &other, &mut host).await;
    assert_eq!(r.unwrap(), Outcome::RegistrationLost);
    let paths = Paths::new(&state, &other.subject);
    Driver {
        store: &store,
        fleet: &cloud.fleet(),
        paths: &paths,
        spec: &other,
        host: &mut host,
    }
    .settle_without_probe(&mut rec)
    .unwrap();
    let (r, rec) = provision(&store, &cloud, &state, &other, &mut host).await;
    assert_eq!(r.unwrap(), Outcome::Registered);
    assert_eq!(rec.thing_name.as_deref(), Some("gw-0001-meter-8"));
    assert_eq!(rec.possibly_active_certificates, vec![first.clone()]);
    assert!(rec.orphaned_certificates.is_empty());
    assert_ne!(rec.certificate_id.as_deref(), Some(first.as_str()));
    let meter8 = sim
        .things()
        .into_iter()
        .filter(|t| t["thingName"] == "gw-0001-meter-8")
        .count();
    assert_eq!(meter8, 1, "one thing, never a second");
    cloud.disconnect().await;
}
