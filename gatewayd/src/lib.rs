//! gatewayd: an edge gateway daemon that provisions itself and its child devices in AWS IoT Core
//! and carries their traffic over one resilient, quota-aware cloud connection.
//!
//! The folders are the data flow (child → local endpoint → outbox → cloud, and back):
//! - `daemon`: wiring and supervision (`run`), config, health/watchdog, sd_notify, status socket,
//!   logging;
//! - `store`: small durable state (identities), flushed before anything depends on it;
//! - `identity`: the per-subject provisioning state machine (pure `record`), its step `driver`,
//!   and the gateway-only parts (`gateway`: claim, trusted user, pre-installed, serial);
//! - `cloud`: the one connection to AWS IoT (`Cloud`, a handle that outlives session switches),
//!   its limiter lanes, backoff, topic rules and the fleet-provisioning client;
//! - `outbox`: the durable at-least-once queue of upstream messages (segment log, group commit);
//! - `local`: the front door for local MQTT devices (TLS, auth, ACL, durable ingest);
//! - `children`: the registry of devices allowed to connect;
//! - `demo` (feature `demo`): `gatewayd demo`, the whole flow in one process against the
//!   embedded emulator, with simulated Modbus meters and MQTT devices.
//!
//! The binaries only parse arguments, set up logging and map results to exit codes.

pub mod bridge;
pub mod children;
pub mod cloud;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod discovery;
pub mod identity;
pub mod local;
pub mod outbox;
pub mod store;
pub mod telemetry;
