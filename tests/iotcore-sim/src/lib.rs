//! iotcore-sim: an AWS IoT Core stand-in for tests.
//!
//! Module map: `mqtt` (packet codec), `broker` (mTLS listener, sessions, routing, policy
//! enforcement), `provisioning` (fleet-provisioning MQTT API), `template` (template engine),
//! `policy` (IoT policy evaluation), `pki` (CA, CSR checks, certificate issuing), `registry`
//! (persistent state), `admin` (control-plane operations behind the CLI: init, certificates,
//! claims, names, templates, RegisterThing and bulk registration), `control` (quotas, faults,
//! counters, the admin socket). `broker::serve` runs a server; `main.rs` only parses the command
//! line, calls these and prints the results.
#![forbid(unsafe_code)]

pub mod admin;
pub mod broker;
pub mod control;
pub mod mqtt;
pub mod pki;
pub mod policy;
pub mod provisioning;
pub mod registry;
pub mod template;
