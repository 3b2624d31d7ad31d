//! iotcore-sim: an AWS IoT Core stand-in for tests.
//!
//! Module map: `mqtt` (packet codec), `broker` (mTLS listener, sessions, routing, policy
//! enforcement), `provisioning` (fleet-provisioning MQTT API), `template` (template engine),
//! `policy` (IoT policy evaluation), `pki` (CA, CSR checks, certificate issuing), `registry`
//! (persistent state), `admin` (control-plane operations behind the CLI).
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
