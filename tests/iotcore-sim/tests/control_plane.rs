//! The control-plane paths onto AWS IoT, through the real `iotcore-sim` binary: single-thing
//! RegisterThing (CSR and PEM), bulk registration with per-line results, certificate
//! deactivation and revocation.
#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;

fn sim(dir: &Path, args: &[&str]) -> std::process::Output {
    let (verb, rest) = args.split_at(match args[0] {
        "certs" | "things" | "policies" | "thing-types" | "thing-groups" | "template" => 2,
        _ => 1,
    });
    Command::new(env!("CARGO_BIN_EXE_iotcore-sim"))
        .args(verb)
        .arg("--dir")
        .arg(dir)
        .args(rest)
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let o = sim(dir, args);
    assert!(
        o.status.success(),
        "iotcore-sim {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn csr_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::new(vec![])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

const THING_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"*"}]}"#;

fn template(cert_property: &str) -> String {
    json!({
        "Parameters": {"ThingName": {"Type": "String"}, "Cert": {"Type": "String"},
                       "Kind": {"Type": "String", "Default": "meter"}},
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                "ThingName": {"Ref": "ThingName"},
                "ThingTypeName": "Meter",
                "AttributePayload": {"kind": {"Ref": "Kind"}}}},
            "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                cert_property: {"Ref": "Cert"}, "Status": "ACTIVE"}},
            "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": THING_POLICY}}
        }
    })
    .to_string()
}

fn setup() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    ok(&d.path().join("sim"), &["init"]);
    d
}

#[test]
fn single_thing_from_csr_and_from_pem() {
    let d = setup();
    let dir = d.path().join("sim");
    let tpl = d.path().join("t.json");
    std::fs::write(&tpl, template("CertificateSigningRequest")).unwrap();
    let params = json!({"ThingName": "meter-1", "Cert": csr_pem()}).to_string();
    // The thing type must exist first: a clear rejection naming it.
    let o = sim(
        &dir,
        &[
            "register-thing",
            "--template",
            tpl.to_str().unwrap(),
            "--params",
            &params,
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Thing type Meter not found"), "{err}");
    ok(&dir, &["thing-types", "add", "--name", "Meter"]);
    let out: Value = serde_json::from_str(&ok(
        &dir,
        &[
            "register-thing",
            "--template",
            tpl.to_str().unwrap(),
            "--params",
            &params,
        ],
    ))
    .unwrap();
    let arns = &out["resourceArns"];
    assert_eq!(
        arns["thing"],
        "arn:aws:iot:us-east-1:123456789012:thing/meter-1"
    );
    let cert_arn = arns["certificate"].as_str().unwrap();
    let cert_id = cert_arn.rsplit('/').next().unwrap();
    assert!(arns["policy"].as_str().unwrap().contains(":policy/"));
    assert!(
        out["certificatePem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    let certs: Vec<Value> = serde_json::from_str(&ok(&dir, &["certs", "list"])).unwrap();
    let c = certs
        .iter()
        .find(|c| c["certificateId"] == cert_id)
        .unwrap();
    assert_eq!(c["status"], "ACTIVE");
    assert_eq!(c["thingNames"], json!(["meter-1"]));

    // Registering an existing PEM certificate (CertificatePem) for a second thing.
    let pem_tpl = d.path().join("pem.json");
    std::fs::write(&pem_tpl, template("CertificatePem")).unwrap();
    let pem = out["certificatePem"].as_str().unwrap();
    let params = json!({"ThingName": "meter-2", "Cert": pem}).to_string();
    ok(
        &dir,
        &[
            "register-thing",
            "--template",
            pem_tpl.to_str().unwrap(),
            "--params",
            &params,
        ],
    );
    let things: Vec<Value> = serde_json::from_str(&ok(&dir, &["things", "list"])).unwrap();
    let m2 = things.iter().find(|t| t["thingName"] == "meter-2").unwrap();
    assert_eq!(m2["principals"], json!([cert_id]));
    assert_eq!(m2["attributes"], json!({"kind": "meter"}));

    // Fleet-provisioning templates may not name certificates by CSR.
    let o = sim(
        &dir,
        &[
            "template",
            "add",
            "--name",
            "T",
            "--body",
            tpl.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("only CertificateId"), "{err}");
}

#[test]
fn bulk_registration_reports_each_line() {
    let d = setup();
    let dir = d.path().join("sim");
    ok(&dir, &["thing-types", "add", "--name", "Meter"]);
    let tpl = d.path().join("t.json");
    std::fs::write(&tpl, template("CertificateSigningRequest")).unwrap();
    let mut input = String::new();
    for i in 0..3 {
        input.push_str(&json!({"ThingName": format!("bulk-{i}"), "Cert": csr_pem()}).to_string());
        input.push('\n');
    }
    input.push_str("{not json\n");
    input.push_str(&json!({"ThingName": "bad name!", "Cert": csr_pem()}).to_string());
    input.push('\n');
    input.push_str(&json!({"ThingName": "bulk-9", "Cert": "garbage"}).to_string());
    input.push('\n');
    let input_path = d.path().join("in.ndjson");
    std::fs::write(&input_path, input).unwrap();
    let out_dir = d.path().join("out");
    let summary: Value = serde_json::from_str(&ok(
        &dir,
        &[
            "bulk-register",
            "--template",
            tpl.to_str().unwrap(),
            "--input",
            input_path.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ],
    ))
    .unwrap();
    assert_eq!(summary["successCount"], 3);
    assert_eq!(summary["failureCount"], 3);
    let lines: Vec<Value> = std::fs::read_to_string(out_dir.join("results.ndjson"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["lineNumber"], i + 1);
    }
    assert!(
        lines[0]["response"]["resourceArns"]["thing"]
            .as_str()
            .unwrap()
            .ends_with("thing/bulk-0")
    );
    assert!(
        lines[3]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("not JSON")
    );
    assert!(
        lines[4]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("bad name!"),
        "{}",
        lines[4]
    );
    assert!(
        lines[5]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("not PEM"),
        "{}",
        lines[5]
    );
    let things: Vec<Value> = serde_json::from_str(&ok(&dir, &["things", "list"])).unwrap();
    assert_eq!(things.len(), 3, "failed lines created nothing");
}

#[test]
fn deactivate_and_revoke() {
    let d = setup();
    let dir = d.path().join("sim");
    let certs: Vec<Value> = serde_json::from_str(&ok(&dir, &["certs", "list"])).unwrap();
    let id = certs[0]["certificateId"].as_str().unwrap().to_owned();
    ok(&dir, &["certs", "deactivate", "--id", &id]);
    ok(&dir, &["certs", "activate", "--id", &id]);
    ok(&dir, &["certs", "revoke", "--id", &id]);
    let o = sim(&dir, &["certs", "activate", "--id", &id]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("REVOKED"));
    let o = sim(&dir, &["certs", "deactivate", "--id", "nope"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("certificate nope does not exist"));
}
