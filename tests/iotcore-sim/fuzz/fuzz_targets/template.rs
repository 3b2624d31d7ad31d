//! Fuzzes the provisioning-template engine: any UTF-8 body must parse or be rejected, and any
//! template that parses must evaluate or be rejected, without panicking, overflowing the stack or
//! allocating without bound.
#![no_main]

use std::collections::BTreeMap;

use iotcore_sim::template::{EvalInput, Template};
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
    // (lists for Fn::Split, indexes for Fn::Select, a mapping key of the docs' example).
    let fixed: BTreeMap<String, String> = [("SerialNumber", "123"), ("DeviceLocation", "Seattle")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let none = BTreeMap::new();
    let _ = template.evaluate(&EvalInput {
        parameters: &fixed,
        certificate_id: CERTIFICATE_ID,
        certificate_fields: &none,
    });
    for value in ["a,b,c", "1", ""] {
        let all: BTreeMap<String, String> = template
            .declared_parameters()
            .map(|name| (name.to_owned(), value.to_owned()))
            .collect();
        let _ = template.evaluate(&EvalInput {
            parameters: &all,
            certificate_id: value,
            certificate_fields: &all,
        });
    }
});
