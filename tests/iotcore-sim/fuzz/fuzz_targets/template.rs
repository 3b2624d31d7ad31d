//! Fuzzes the provisioning-template engine: any UTF-8 body must parse or be rejected, and any
//! template that parses must evaluate or be rejected, without panicking, overflowing the stack or
//! allocating without bound.
#![no_main]

use std::collections::BTreeMap;

use iotcore_sim::template::{EvalInput, PseudoParameters, Template};
use libfuzzer_sys::fuzz_target;

const CERTIFICATE_ID: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(template) = Template::parse(body) else {
        return;
    };
    // Fixed request parameters, then every declared name set to values that feed the functions
    // (lists for Fn::Split, indexes for Fn::Select, a mapping key of the docs' example). Each
    // set is evaluated as fleet provisioning, JITP (every documented subject field present, so
    // undeclared pseudo-parameters resolve) and the control-plane API.
    let fixed: BTreeMap<String, String> = [("SerialNumber", "123"), ("DeviceLocation", "Seattle")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let evaluate = |parameters: &BTreeMap<String, String>, value: &str| {
        let subject: BTreeMap<String, String> = [
            "CommonName",
            "Country",
            "Organization",
            "OrganizationalUnit",
            "DistinguishedNameQualifier",
            "StateName",
            "SerialNumber",
        ]
        .into_iter()
        .map(|f| (format!("AWS::IoT::Certificate::{f}"), value.to_owned()))
        .collect();
        for pseudo in [
            PseudoParameters::Fleet {
                certificate_id: value,
            },
            PseudoParameters::Jitp {
                certificate_id: value,
                subject: &subject,
            },
            PseudoParameters::ControlPlane,
        ] {
            let _ = template.evaluate(&EvalInput { parameters, pseudo });
        }
    };
    evaluate(&fixed, CERTIFICATE_ID);
    for value in ["a,b,c", "1", ""] {
        let all: BTreeMap<String, String> = template
            .declared_parameters()
            .map(|name| (name.to_owned(), value.to_owned()))
            .collect();
        evaluate(&all, value);
    }
});
