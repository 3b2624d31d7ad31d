//! The interface every gatewayd device plugin implements.
//!
//! A plugin finds devices around the gateway (`discover`), says who a device is (`identify`),
//! reads its data (`poll`) and carries commands to it (`write`). Everything that can go wrong on a
//! field bus comes back as a [`PluginError`] value naming what was wrong; a plugin never panics on
//! a device's answer or on a command.
//!
//! This crate owns only the shapes shared by the daemon and the plugins, and the one
//! [`compliance`] test every plugin's tests run against a live target. It does no I/O itself.
#![forbid(unsafe_code)]

pub mod compliance;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A device as a plugin addresses it, e.g. `modbus+tcp://10.0.0.7:502/3`. Opaque to the daemon:
/// it stores it and hands it back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceId(pub String);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an identity came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IdentitySource {
    /// The device described itself (Modbus: Read Device Identification, 0x2B/0x0E).
    DeviceIdentification,
    /// Read from registers a configured device profile names.
    ProfileRegisters { profile: String },
    /// The device answers but could not be identified; only its address is known.
    Unidentified,
}

/// Who a device is. Fields a device does not report are `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub vendor: Option<String>,
    pub product_code: Option<String>,
    pub revision: Option<String>,
    pub serial: Option<String>,
    pub model: Option<String>,
    pub product_name: Option<String>,
    pub vendor_url: Option<String>,
    /// Other objects the device reported, by the plugin's name for them.
    pub extra: BTreeMap<String, String>,
    pub source: IdentitySource,
}

impl Identity {
    pub fn unidentified() -> Self {
        Self {
            vendor: None,
            product_code: None,
            revision: None,
            serial: None,
            model: None,
            product_name: None,
            vendor_url: None,
            extra: BTreeMap::new(),
            source: IdentitySource::Unidentified,
        }
    }
}

/// A device found by `discover`, with what the daemon needs to provision it as a child.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FoundDevice {
    pub id: DeviceId,
    pub identity: Identity,
    /// The matched device profile, if any.
    pub profile: Option<String>,
    /// The provisioning template for this child, from the profile.
    pub template: Option<String>,
    /// Parameters for the child's RegisterThing, from the profile.
    pub parameters: BTreeMap<String, String>,
}

/// A typed value read from or written to a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

/// One named point of a poll.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub name: String,
    /// The value, or what went wrong reading it: one bad register does not hide the others.
    pub value: Result<Value, PluginError>,
    pub unit: Option<String>,
}

/// The result of one poll.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub device: DeviceId,
    /// Milliseconds since the Unix epoch, taken when the poll finished.
    pub timestamp_ms: u64,
    pub readings: Vec<Reading>,
}

/// Milliseconds since the Unix epoch, 0 if the clock is before 1970.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A command for one point of a device's map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteCommand {
    pub point: String,
    pub value: Value,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteOutcome {
    pub device: DeviceId,
    pub point: String,
    pub value: Value,
    pub timestamp_ms: u64,
}

/// Counters a plugin keeps; the compliance test reads them to prove a refused command never
/// reached the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginStats {
    /// Requests put on the wire (sent, whatever their answer).
    pub requests: u64,
    /// Requests that got no answer in time.
    pub timeouts: u64,
    /// Connections dropped and reopened after a timeout or a transport/protocol error.
    pub reconnects: u64,
    /// Attempts to open a connection or port, successful or not.
    pub connects: u64,
}

/// What went wrong, as a value. `Refused*` variants are decided before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum PluginError {
    /// The device answered with a protocol exception (Modbus: exception code and its name).
    #[error("device exception {code:#04x} ({name})")]
    Exception { code: u8, name: String },
    /// No answer within the per-request timeout.
    #[error("no answer within {after_ms} ms")]
    Timeout { after_ms: u64 },
    /// An answer that does not fit the request (wrong length, wrong header, undecodable).
    #[error("malformed reply: {0}")]
    Malformed(String),
    /// The connection or port failed (refused, reset, cannot open).
    #[error("transport: {0}")]
    Transport(String),
    /// The device id is not one this plugin can address.
    #[error("unknown device {0}")]
    UnknownDevice(String),
    /// The device matched no profile with a register map.
    #[error("no register map for {0}")]
    NoMap(String),
    /// The device's map has no such point.
    #[error("refused: no point {0:?} in the device's map")]
    RefusedUnknownPoint(String),
    /// The point exists but is read-only.
    #[error("refused: point {0:?} is not writable")]
    RefusedNotWritable(String),
    /// The value is outside the point's configured range, or of the wrong type.
    #[error("refused: {0}")]
    RefusedValue(String),
}

impl PluginError {
    /// Worth retrying later (the device or the line may come back).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::Transport(_))
    }

    /// Decided by the plugin before anything was sent.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::UnknownDevice(_)
                | Self::RefusedUnknownPoint(_)
                | Self::RefusedNotWritable(_)
                | Self::RefusedValue(_)
        )
    }
}

/// A device plugin. The daemon owns one per configured bus family and calls it from its tasks.
pub trait Plugin: Send + Sync {
    /// Short name for logs and status (`modbus`).
    fn name(&self) -> &str;

    /// A bounded scan of what the configuration allows. Returns when the scan is done; devices
    /// that do not answer are left out, not waited for.
    fn discover(&self) -> impl Future<Output = Result<Vec<FoundDevice>, PluginError>> + Send;

    /// Asks one device who it is.
    fn identify(
        &self,
        device: &DeviceId,
    ) -> impl Future<Output = Result<Identity, PluginError>> + Send;

    /// Reads the device's register map. A point that fails is reported in its reading; the
    /// whole poll fails only when the device cannot be reached or has no map.
    fn poll(
        &self,
        device: &DeviceId,
    ) -> impl Future<Output = Result<Telemetry, PluginError>> + Send;

    /// Validates a command against the device's map, then sends it.
    fn write(
        &self,
        device: &DeviceId,
        command: &WriteCommand,
    ) -> impl Future<Output = Result<WriteOutcome, PluginError>> + Send;

    fn stats(&self) -> PluginStats;
}

/// How long a compliance check lets one plugin call run before calling it unbounded.
pub const DEFAULT_CALL_BOUND: Duration = Duration::from_secs(30);
