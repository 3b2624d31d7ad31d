//! The bulk path for devices known in advance: children offered with manual admission wait;
//! `gatewayctl children export-bulk` writes AWS bulk registration input (their parameters and a
//! CSR for a key the gateway keeps); iotcore-sim's `bulk-register` (StartThingRegistrationTask)
//! runs it with the README's bulk template; `gatewayctl children import-bulk-results` installs
//! each certificate for the child whose key it certifies and pins it. A results line the task
//! failed, a certificate for nobody's key and a line that is not JSON are counted, not fatal.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

#[test]
fn children_known_in_advance_are_registered_in_bulk_and_installed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sim = sim_with_readme_templates(dir, &[("ReadmeTemplate", "<!-- gateway-template")], &[]);
    let mut gw = Gateway::configure(&dir.join("gw"), &sim, "", "");
    gw.dropin(
        "50-children.toml",
        "[provisioning]\ntemplate = \"ReadmeTemplate\"\n\n[children]\ntemplate = \"ChildTemplate\"\nadmission = \"manual\"\n",
    );
    gw.start(&[]);
    let parent = gw.wait_active(T).identity.thing_name.unwrap();
    for (id, serial) in [("m1", "S1"), ("m2", "S2"), ("m3", "S3")] {
        let (code, out) = gatewayctl(
            &gw,
            &[
                "children",
                "add",
                id,
                "--provision",
                "--serial",
                serial,
                "--vendor",
                "Acme",
            ],
        );
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("awaiting-approval"), "{out}");
    }
    let input = dir.join("input.ndjson");
    let (code, out) = gatewayctl(&gw, &["children", "export-bulk", input.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<Value> = std::fs::read_to_string(&input)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        assert_eq!(l["ParentThing"], parent.as_str());
        assert!(
            l["CSR"].as_str().unwrap().contains("CERTIFICATE REQUEST"),
            "{l}"
        );
    }
    // The operator's side: the bulk registration task, with the README's bulk template.
    let template = dir.join("bulk.json");
    std::fs::write(&template, readme_block("<!-- child-bulk-template")).unwrap();
    let out_dir = dir.join("task");
    sim.admin(
        &["bulk-register"],
        &[
            "--template",
            template.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    let mut results = std::fs::read_to_string(out_dir.join("results.ndjson")).unwrap();
    // What else a report can hold: a failed line, a certificate nobody here asked for, garbage.
    results.push_str(
        "{\"lineNumber\": 9, \"errorCode\": \"InvalidRequest\", \"errorMessage\": \"x\"}\n",
    );
    sim.admin(
        &["certs", "create"],
        &["--out", dir.join("stranger").to_str().unwrap()],
    );
    let pem = std::fs::read_to_string(dir.join("stranger.pem")).unwrap();
    results.push_str(&format!(
        "{}\n",
        serde_json::json!({ "response": { "certificatePem": pem } })
    ));
    results.push_str("not json\n");
    let report = dir.join("results.ndjson");
    std::fs::write(&report, results).unwrap();

    let (code, out) = gatewayctl(
        &gw,
        &["children", "import-bulk-results", report.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("3 children installed and pinned; 1 failed lines in the results; 1 certificates matched no waiting child"),
        "{out}"
    );
    assert!(out.contains("1 unreadable lines"), "{out}");

    let certs = sim.device_certs();
    for (id, serial) in [("m1", "S1"), ("m2", "S2"), ("m3", "S3")] {
        let (code, show) = gatewayctl(&gw, &["children", "show", id, "--json"]);
        assert_eq!(code, 0, "{show}");
        let v: Value = serde_json::from_str(&show).unwrap();
        assert_eq!(v["state"], "provisioned", "{v}");
        assert_eq!(v["pinned"], true, "{v}");
        assert_eq!(
            v["thing_name"],
            format!("{parent}-{serial}").as_str(),
            "{v}"
        );
        let c = v["certificate_id"].as_str().unwrap();
        let cert = certs.iter().find(|x| x["certificateId"] == c).unwrap();
        assert_eq!(cert["status"], "ACTIVE", "{cert}");
    }
    // Exported again: nothing waits any more.
    let (code, out) = gatewayctl(&gw, &["children", "export-bulk", input.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::read_to_string(&input).unwrap(), "");
}
