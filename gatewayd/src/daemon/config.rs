//! Configuration: the strict TOML schema, `conf.d/` drop-in merging and offline validation.
//!
//! Owns parsing and checking only; it opens no sockets and touches no state. Every field has its
//! default beside it. Unknown keys are errors, and every error names the key and the file that
//! set it, so `gatewayd check-config` can tell an admin exactly what to fix.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the daemon looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/gatewayd/gatewayd.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: TOML syntax error: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{file}: key `{key}`: {message}")]
    Key {
        file: String,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// Configuration errors never fix themselves.
    pub fn is_transient(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub cloud: CloudConfig,
    pub provisioning: ProvisioningConfig,
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub uplink: UplinkConfig,
    #[serde(default)]
    pub local: LocalConfig,
    #[serde(default)]
    pub children: ChildrenConfig,
    /// Modbus TCP/RTU discovery (`plugins/modbus`; keys in its README). Absent: no Modbus.
    #[serde(default)]
    pub modbus: Option<gatewayd_modbus::ModbusConfig>,
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    #[serde(default)]
    pub bridge: BridgeConfig,
    /// Which file set each key (the main file or a `conf.d/` drop-in), for error messages.
    #[serde(skip)]
    origin: Provenance,
}

/// `[bridge]`: how children's messages go up to the cloud (`crate::bridge`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Publishes waiting for their PUBACK at once (1-90; the connection allows 100 in flight).
    #[serde(default = "default_bridge_window")]
    pub window: usize,
    /// A publish whose PUBACK has not come after this long is sent again (with the later ones).
    #[serde(default = "default_bridge_ack_timeout")]
    pub ack_timeout_secs: u64,
    /// Local topic → cloud topic templates, first match wins (see `bridge::mapping`). Default:
    /// `dt/{child}/{suffix}` → `gw/{gateway}/{thing}/{suffix}`.
    #[serde(default = "default_bridge_mappings")]
    pub mappings: Vec<crate::bridge::MappingRule>,
    /// Cloud command topic → local topic templates, first match wins, one cloud subscription
    /// each (see `bridge::commands`). Default: `cmd/{gateway}/{thing}/{suffix}` →
    /// `cmd/{child}/{suffix}`. Empty: no commands from the cloud.
    #[serde(default = "default_bridge_commands")]
    pub commands: Vec<crate::bridge::commands::CommandRule>,
    /// A command not delivered to its child within this long is dropped, and the cloud told.
    #[serde(default = "default_command_expiry")]
    pub command_expiry_secs: u64,
}

fn default_bridge_commands() -> Vec<crate::bridge::commands::CommandRule> {
    vec![crate::bridge::commands::CommandRule::default()]
}
fn default_command_expiry() -> u64 {
    3600
}

fn default_bridge_window() -> usize {
    32
}
fn default_bridge_ack_timeout() -> u64 {
    30
}
fn default_bridge_mappings() -> Vec<crate::bridge::MappingRule> {
    vec![crate::bridge::MappingRule::default()]
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            window: default_bridge_window(),
            ack_timeout_secs: default_bridge_ack_timeout(),
            mappings: default_bridge_mappings(),
            commands: default_bridge_commands(),
            command_expiry_secs: default_command_expiry(),
        }
    }
}

impl BridgeConfig {
    /// The compiled mappings (validated at load, so the daemon's call does not fail).
    pub fn mapper(
        &self,
    ) -> Result<crate::bridge::Mapper, (usize, crate::bridge::mapping::MappingError)> {
        crate::bridge::Mapper::new(&self.mappings)
    }

    /// The compiled command rules (validated at load).
    pub fn command_mapper(
        &self,
    ) -> Result<crate::bridge::commands::CommandMapper, (usize, crate::bridge::mapping::MappingError)>
    {
        crate::bridge::commands::CommandMapper::new(&self.commands)
    }

    fn validate(&self, bad: &dyn Fn(&str, String) -> ConfigError) -> Result<(), ConfigError> {
        if !(1..=90).contains(&self.window) {
            return Err(bad("bridge.window", "must be between 1 and 90".into()));
        }
        if self.ack_timeout_secs == 0 {
            return Err(bad("bridge.ack_timeout_secs", "must be positive".into()));
        }
        if self.mappings.is_empty() {
            return Err(bad(
                "bridge.mappings",
                "must have at least one rule (leave it out for the default)".into(),
            ));
        }
        if let Err((i, e)) = self.mapper() {
            return Err(bad(
                &format!("bridge.mappings[{i}].{}", e.field),
                e.to_string(),
            ));
        }
        if self.command_expiry_secs == 0 {
            return Err(bad("bridge.command_expiry_secs", "must be positive".into()));
        }
        if let Err((i, e)) = self.command_mapper() {
            return Err(bad(
                &format!("bridge.commands[{i}].{}", e.field),
                e.to_string(),
            ));
        }
        Ok(())
    }
}

/// `[discovery]`: how often the device plugins scan, and how found Modbus children are polled
/// (`crate::telemetry`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Seconds between two Modbus scans (the first runs at start).
    #[serde(default = "default_scan_interval")]
    pub modbus_interval_secs: u64,
    /// Milliseconds between two polls of one Modbus child's register map.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// `on-change`: a telemetry document only when a value or an error changed, or when
    /// `heartbeat_secs` passed since the last one; `always`: one per poll.
    #[serde(default)]
    pub report: Report,
    /// With `report = "on-change"`, the longest silence before an unchanged document is sent.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// A child that does not answer is polled again after `poll_interval_ms`, doubled after each
    /// failed poll up to this many milliseconds; the first answer resets it.
    #[serde(default = "default_poll_backoff_max_ms")]
    pub poll_backoff_max_ms: u64,
}

/// When a polled child's telemetry is published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Report {
    Always,
    #[default]
    OnChange,
}

fn default_scan_interval() -> u64 {
    600
}

fn default_poll_interval_ms() -> u64 {
    1000
}

fn default_heartbeat_secs() -> u64 {
    60
}

fn default_poll_backoff_max_ms() -> u64 {
    30_000
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            modbus_interval_secs: default_scan_interval(),
            poll_interval_ms: default_poll_interval_ms(),
            report: Report::default(),
            heartbeat_secs: default_heartbeat_secs(),
            poll_backoff_max_ms: default_poll_backoff_max_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// AWS IoT data endpoint (`xxxx-ats.iot.REGION.amazonaws.com`); also the TLS SNI name.
    pub endpoint: String,
    /// 8883, or 443 (then ALPN `x-amzn-mqtt-ca` is offered).
    #[serde(default = "default_port")]
    pub port: u16,
    /// PEM file with the root CA(s) that sign the endpoint's server certificate.
    pub root_ca: PathBuf,
}

fn default_port() -> u16 {
    8883
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProvisioningMode {
    /// Own key + CSR, CreateCertificateFromCsr, RegisterThing (default).
    Csr,
    /// CreateKeysAndCertificate: the cloud generates the key (RSA 2048).
    CreateKeys,
    /// A certificate installed beforehand (single-thing, bulk, JITP/JITR); no fleet provisioning.
    Preinstalled,
    /// A temporary claim handed over with `gatewayctl claim install` (valid for five minutes).
    TrustedUser,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    EcdsaP256,
    #[serde(rename = "rsa-2048")]
    Rsa2048,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningConfig {
    #[serde(default = "default_mode")]
    pub mode: ProvisioningMode,
    /// Fleet-provisioning template (1–36 of `[0-9A-Za-z_-]`). Required unless `preinstalled`.
    pub template: Option<String>,
    /// Claim certificate and key (PEM). Required for `csr` and `create-keys`.
    pub claim_cert: Option<PathBuf>,
    pub claim_key: Option<PathBuf>,
    #[serde(default = "default_key_algorithm")]
    pub key_algorithm: KeyAlgorithm,
    /// Extra template parameters, passed to RegisterThing as given.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Where the device serial number comes from; it is sent as parameter `serial_parameter`.
    pub serial: Option<SerialSource>,
    #[serde(default = "default_serial_parameter")]
    pub serial_parameter: String,
    /// Client id of the claim session (default `claim-<serial>`, or random without a serial).
    pub claim_client_id: Option<String>,
    /// Timeout of one fleet-provisioning call (subscribe, publish, answer).
    #[serde(default = "default_call_timeout")]
    pub call_timeout_secs: u64,
    /// Pause before retrying after a permanent failure (claim rejected, hook denial, ...).
    #[serde(default = "default_permanent_retry")]
    pub permanent_retry_secs: u64,
    /// For `preinstalled`: certificate, key and thing name (= MQTT client id).
    pub preinstalled: Option<PreinstalledConfig>,
    /// The thing name the template gives this gateway, e.g. `gw-{serial}` (`{serial}` is replaced
    /// by the serial number). Optional. Used only when a RegisterThing answer was lost: the daemon
    /// then connects with the certificate under this name before giving the certificate up.
    pub expected_thing_name: Option<String>,
}

fn default_mode() -> ProvisioningMode {
    ProvisioningMode::Csr
}
fn default_key_algorithm() -> KeyAlgorithm {
    KeyAlgorithm::EcdsaP256
}
fn default_serial_parameter() -> String {
    "SerialNumber".to_owned()
}
fn default_call_timeout() -> u64 {
    20
}
fn default_permanent_retry() -> u64 {
    900
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreinstalledConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub thing_name: String,
}

/// Exactly one of `value`, `file` or `command`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSource {
    pub value: Option<String>,
    pub file: Option<PathBuf>,
    /// Run with `/bin/sh -c`; its trimmed stdout is the serial.
    pub command: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_status_socket")]
    pub status_socket: PathBuf,
    /// tracing filter directive, e.g. `info` or `gatewayd=debug`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// `auto` (journald when started by systemd with JOURNAL_STREAM), `journald` or `stderr`.
    #[serde(default)]
    pub log_target: LogTarget,
    /// Grace period for the drain on SIGTERM/SIGINT.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogTarget {
    #[default]
    Auto,
    Journald,
    Stderr,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/gatewayd")
}
fn default_status_socket() -> PathBuf {
    PathBuf::from("/run/gatewayd/status.sock")
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn default_shutdown_grace() -> u64 {
    10
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            state_dir: default_state_dir(),
            status_socket: default_status_socket(),
            log_level: default_log_level(),
            log_target: LogTarget::Auto,
            shutdown_grace_secs: default_shutdown_grace(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// MQTT keep-alive; AWS clamps to 30–1200 s.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// First reconnect delay; doubles per failure up to `backoff_max_secs`, with equal jitter
    /// (each delay uniform in [cap/2, cap]).
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_secs: u64,
    /// Minimum time between two CONNECTs with one client id (AWS allows 1 per second).
    #[serde(default = "default_connect_floor_ms")]
    pub connect_floor_ms: u64,
    /// AWS per-connection limits.
    #[serde(default = "default_publishes_per_sec")]
    pub publishes_per_sec: u32,
    #[serde(default = "default_bytes_per_sec")]
    pub bytes_per_sec: u32,
    /// Largest message payload in either direction (AWS: 128 KiB). The MQTT packet limits add
    /// `PACKET_OVERHEAD_BYTES` for the fixed header, topic and packet id (`packet_limits`).
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
}

fn default_keep_alive() -> u64 {
    60
}
fn default_backoff_initial_ms() -> u64 {
    1000
}
fn default_backoff_max() -> u64 {
    120
}
fn default_connect_floor_ms() -> u64 {
    1000
}
fn default_publishes_per_sec() -> u32 {
    100
}
fn default_bytes_per_sec() -> u32 {
    512 * 1024
}
fn default_max_payload() -> usize {
    128 * 1024
}

/// Room for everything in a PUBLISH besides its payload: fixed header (≤ 5), topic length (2),
/// topic (AWS: ≤ 256 bytes, plus `$aws/...` reserved topics), packet id (2). Generous on purpose:
/// a legal 128 KiB payload must never make rumqttc fail the connection.
pub const PACKET_OVERHEAD_BYTES: usize = 2 * 1024;

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            keep_alive_secs: default_keep_alive(),
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_secs: default_backoff_max(),
            connect_floor_ms: default_connect_floor_ms(),
            publishes_per_sec: default_publishes_per_sec(),
            bytes_per_sec: default_bytes_per_sec(),
            max_payload_bytes: default_max_payload(),
        }
    }
}

impl UplinkConfig {
    pub fn connect_floor(&self) -> Duration {
        Duration::from_millis(self.connect_floor_ms)
    }

    /// (incoming, outgoing) MQTT packet limits handed to rumqttc: the payload limit plus the
    /// header/topic overhead. Payloads are checked against `max_payload_bytes` separately.
    pub fn packet_limits(&self) -> (usize, usize) {
        let packet = self.max_payload_bytes + PACKET_OVERHEAD_BYTES;
        (packet, packet)
    }
}

/// `[local]`: the MQTT endpoint local devices connect to (`crate::local`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// TLS listeners (empty list: none).
    #[serde(default = "default_tls_listen")]
    pub tls_listen: Vec<std::net::SocketAddr>,
    /// Plain-TCP listeners, for constrained devices on an isolated segment (off by default).
    #[serde(default)]
    pub tcp_listen: Vec<std::net::SocketAddr>,
    /// Host names and IP addresses put in the server certificate the local CA issues.
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
    /// Operator-supplied server certificate chain and key (PEM) instead of the local CA's.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Per-client topic rules (`%c` child id, `%g` gateway thing name).
    #[serde(default = "default_publish_rules")]
    pub publish: Vec<String>,
    #[serde(default = "default_subscribe_rules")]
    pub subscribe: Vec<String>,
    /// Rules of particular clients instead of `publish`/`subscribe` (a local application that
    /// reads every child's telemetry, say): `[local.clients.<client id>]`.
    #[serde(default)]
    pub clients: std::collections::BTreeMap<String, ClientRules>,
    /// Topics that go upstream: an allowed publish matching one of these filters is stored in the
    /// outbox (its PUBACK waits for the disk); any other allowed publish is only routed among
    /// local clients (PUBACK at once).
    #[serde(default = "default_upstream")]
    pub upstream: Vec<String>,
    /// Onboarding credential: username and a file holding its password; such a client may use
    /// `onboarding_publish` / `onboarding_subscribe` and nothing else.
    pub onboarding_username: Option<String>,
    pub onboarding_password_file: Option<PathBuf>,
    /// Onboarding by certificate: a client certificate whose certificateId (SHA-256 of the DER)
    /// is listed here, or one signed by a CA certificate the client presents in its chain whose
    /// SHA-256 fingerprint is listed in `onboarding_ca_fingerprints` (a maker's device CA).
    /// Hex, with or without colons (`openssl x509 -fingerprint -sha256` prints the latter).
    #[serde(default)]
    pub onboarding_certificate_ids: Vec<String>,
    #[serde(default)]
    pub onboarding_ca_fingerprints: Vec<String>,
    /// Templates an onboarding device may ask RegisterThing for through the gateway's local
    /// fleet-provisioning endpoint (AWS's topic API, proxied to the cloud over the gateway's
    /// connection). Empty: the endpoint is off.
    #[serde(default)]
    pub onboarding_templates: Vec<String>,
    #[serde(default = "default_onboarding_rules")]
    pub onboarding_publish: Vec<String>,
    #[serde(default = "default_onboarding_rules")]
    pub onboarding_subscribe: Vec<String>,
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Time allowed between the TCP (or TLS) connection and a complete CONNECT.
    #[serde(default = "default_handshake_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_max_connect_bytes")]
    pub max_connect_bytes: usize,
    /// Connections in TLS handshake or before CONNACK, in all and per source address.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    #[serde(default = "default_max_handshakes_per_address")]
    pub max_handshakes_per_address: usize,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// Publishes per second one client may send; beyond it the gateway stops reading from it.
    #[serde(default = "default_client_publishes_per_sec")]
    pub client_publishes_per_sec: u32,
    /// Outbox bound and what happens when it is reached (`drop-oldest` or `refuse-new`).
    #[serde(default = "default_outbox_max_bytes")]
    pub outbox_max_bytes: u64,
    #[serde(default)]
    pub outbox_overflow: crate::outbox::OverflowPolicy,
}

fn default_tls_listen() -> Vec<std::net::SocketAddr> {
    vec![std::net::SocketAddr::from(([0, 0, 0, 0], 8883))]
}
fn default_server_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}
fn default_publish_rules() -> Vec<String> {
    vec!["dt/%c/#".into()]
}
fn default_subscribe_rules() -> Vec<String> {
    vec!["cmd/%c/#".into()]
}
fn default_upstream() -> Vec<String> {
    vec!["dt/#".into()]
}

/// `[local.clients.<client id>]`: this client's topic rules; an absent list keeps the default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRules {
    pub publish: Option<Vec<String>>,
    pub subscribe: Option<Vec<String>>,
}
fn default_onboarding_rules() -> Vec<String> {
    vec!["onboarding/%c/#".into()]
}
fn default_handshake_timeout_ms() -> u64 {
    5000
}
fn default_max_connect_bytes() -> usize {
    16 * 1024
}
fn default_max_handshakes() -> usize {
    256
}
fn default_max_handshakes_per_address() -> usize {
    16
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_connections_per_address() -> usize {
    64
}
fn default_client_publishes_per_sec() -> u32 {
    1000
}
fn default_outbox_max_bytes() -> u64 {
    256 << 20
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            tls_listen: default_tls_listen(),
            tcp_listen: Vec::new(),
            server_names: default_server_names(),
            cert: None,
            key: None,
            publish: default_publish_rules(),
            subscribe: default_subscribe_rules(),
            clients: Default::default(),
            upstream: default_upstream(),
            onboarding_username: None,
            onboarding_password_file: None,
            onboarding_certificate_ids: Vec::new(),
            onboarding_ca_fingerprints: Vec::new(),
            onboarding_templates: Vec::new(),
            onboarding_publish: default_onboarding_rules(),
            onboarding_subscribe: default_onboarding_rules(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            connect_timeout_ms: default_handshake_timeout_ms(),
            max_connect_bytes: default_max_connect_bytes(),
            max_handshakes: default_max_handshakes(),
            max_handshakes_per_address: default_max_handshakes_per_address(),
            max_connections: default_max_connections(),
            max_connections_per_address: default_max_connections_per_address(),
            max_payload_bytes: default_max_payload(),
            client_publishes_per_sec: default_client_publishes_per_sec(),
            outbox_max_bytes: default_outbox_max_bytes(),
            outbox_overflow: crate::outbox::OverflowPolicy::default(),
        }
    }
}

/// A SHA-256 fingerprint in lowercase hex without colons, or None when `s` is not one.
pub fn fingerprint(s: &str) -> Option<String> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

impl LocalConfig {
    fn validate(&self, bad: &dyn Fn(&str, String) -> ConfigError) -> Result<(), ConfigError> {
        let mut lists = vec![
            ("local.publish".to_owned(), &self.publish),
            ("local.subscribe".to_owned(), &self.subscribe),
            (
                "local.onboarding_publish".to_owned(),
                &self.onboarding_publish,
            ),
            (
                "local.onboarding_subscribe".to_owned(),
                &self.onboarding_subscribe,
            ),
            ("local.upstream".to_owned(), &self.upstream),
        ];
        for (id, c) in &self.clients {
            if let Err(e) = crate::identity::Subject::child(id) {
                return Err(bad(&format!("local.clients.{id}"), e.to_string()));
            }
            for (what, list) in [("publish", &c.publish), ("subscribe", &c.subscribe)] {
                if let Some(l) = list {
                    lists.push((format!("local.clients.{id}.{what}"), l));
                }
            }
        }
        for (key, rules) in lists {
            let key = key.as_str();
            for r in rules {
                let probe = r.replace("%c", "c").replace("%g", "g");
                if probe.starts_with('$') || !crate::local::acl::valid_filter(&probe) {
                    return Err(bad(
                        key,
                        format!("`{r}` is not a topic filter outside `$` topics"),
                    ));
                }
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(bad(
                "local.cert",
                "local.cert and local.key go together".into(),
            ));
        }
        if self.onboarding_username.is_some() != self.onboarding_password_file.is_some() {
            return Err(bad(
                "local.onboarding_username",
                "needs local.onboarding_password_file (and the other way round)".into(),
            ));
        }
        for (key, list) in [
            (
                "local.onboarding_certificate_ids",
                &self.onboarding_certificate_ids,
            ),
            (
                "local.onboarding_ca_fingerprints",
                &self.onboarding_ca_fingerprints,
            ),
        ] {
            for f in list {
                if fingerprint(f).is_none() {
                    return Err(bad(
                        key,
                        format!(
                            "`{f}` is not a SHA-256 fingerprint (64 hex digits, colons allowed)"
                        ),
                    ));
                }
            }
        }
        for t in &self.onboarding_templates {
            if crate::local::fleet::parse_request(&format!(
                "$aws/provisioning-templates/{t}/provision/json"
            ))
            .is_none()
            {
                return Err(bad(
                    "local.onboarding_templates",
                    format!("`{t}` is not a template name (1-36 of A-Z a-z 0-9 _ -)"),
                ));
            }
        }
        if self.server_names.is_empty() && self.cert.is_none() {
            return Err(bad(
                "local.server_names",
                "needs at least one host name or IP address".into(),
            ));
        }
        for (key, value) in [
            ("local.handshake_timeout_ms", self.handshake_timeout_ms),
            ("local.connect_timeout_ms", self.connect_timeout_ms),
            ("local.max_connect_bytes", self.max_connect_bytes as u64),
            ("local.max_handshakes", self.max_handshakes as u64),
            (
                "local.max_handshakes_per_address",
                self.max_handshakes_per_address as u64,
            ),
            ("local.max_connections", self.max_connections as u64),
            (
                "local.max_connections_per_address",
                self.max_connections_per_address as u64,
            ),
            ("local.max_payload_bytes", self.max_payload_bytes as u64),
            (
                "local.client_publishes_per_sec",
                u64::from(self.client_publishes_per_sec),
            ),
            ("local.outbox_max_bytes", self.outbox_max_bytes),
        ] {
            if value == 0 {
                return Err(bad(key, "must be positive".into()));
            }
        }
        Ok(())
    }
}

/// How children are admitted and provisioned as things of their own (`crate::children::provision`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildrenConfig {
    /// `auto` (every child offered is provisioned), `allowlist` (a child matching `allow` is;
    /// others wait for `gatewayctl children approve`), `manual` (every child waits).
    #[serde(default)]
    pub admission: Admission,
    /// Allowlist rules: a child matches a rule when every pattern the rule gives matches
    /// (`*` and `?` globs on serial, model, vendor).
    #[serde(default)]
    pub allow: Vec<AllowRule>,
    /// Fleet-provisioning template for children (RegisterThing); none: children are not
    /// provisioned in the cloud (an offered child says so).
    #[serde(default)]
    pub template: Option<String>,
    /// Subject CN of each child's CSR; `{id}` and `{serial}` are filled in.
    #[serde(default = "default_child_common_name")]
    pub common_name: String,
    /// Constant RegisterThing parameters added for every child.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    #[serde(default = "default_key_algorithm")]
    pub key_algorithm: KeyAlgorithm,
    /// AWS quota for CreateCertificateFromCsr (per account, 15 TPS historically).
    #[serde(default = "default_create_per_sec")]
    pub create_certificate_per_sec: f64,
    /// AWS quota for RegisterThing (10 TPS historically).
    #[serde(default = "default_register_per_sec")]
    pub register_thing_per_sec: f64,
    /// Timeout of one fleet call (SUBACK, PUBACK and answer).
    #[serde(default = "default_call_timeout")]
    pub call_timeout_secs: u64,
    /// First wait after a transient failure (throttling, timeout); doubles up to `retry_max_secs`.
    #[serde(default = "default_child_retry_initial_ms")]
    pub retry_initial_ms: u64,
    #[serde(default = "default_child_retry_max_secs")]
    pub retry_max_secs: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Admission {
    #[default]
    Manual,
    Allowlist,
    Auto,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    pub serial: Option<String>,
    pub model: Option<String>,
    pub vendor: Option<String>,
}

fn default_child_common_name() -> String {
    "{id}".into()
}
fn default_create_per_sec() -> f64 {
    15.0
}
fn default_register_per_sec() -> f64 {
    10.0
}
fn default_child_retry_initial_ms() -> u64 {
    1000
}
fn default_child_retry_max_secs() -> u64 {
    60
}

impl Default for ChildrenConfig {
    fn default() -> Self {
        Self {
            admission: Admission::default(),
            allow: Vec::new(),
            template: None,
            common_name: default_child_common_name(),
            parameters: BTreeMap::new(),
            key_algorithm: default_key_algorithm(),
            create_certificate_per_sec: default_create_per_sec(),
            register_thing_per_sec: default_register_per_sec(),
            call_timeout_secs: default_call_timeout(),
            retry_initial_ms: default_child_retry_initial_ms(),
            retry_max_secs: default_child_retry_max_secs(),
        }
    }
}

impl ChildrenConfig {
    fn validate(&self, bad: &dyn Fn(&str, String) -> ConfigError) -> Result<(), ConfigError> {
        if let Some(t) = &self.template
            && !valid_template_name(t)
        {
            return Err(bad(
                "children.template",
                format!("`{t}` is not 1-36 characters of [0-9A-Za-z_-]"),
            ));
        }
        for (key, v) in [
            (
                "children.create_certificate_per_sec",
                self.create_certificate_per_sec,
            ),
            (
                "children.register_thing_per_sec",
                self.register_thing_per_sec,
            ),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 10_000.0) {
                return Err(bad(
                    key,
                    format!("must be a rate above 0 and at most 10000, not {v}"),
                ));
            }
        }
        if self.call_timeout_secs == 0 {
            return Err(bad(
                "children.call_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        if self.retry_initial_ms == 0 || self.retry_max_secs == 0 {
            return Err(bad(
                "children.retry_initial_ms",
                "retry_initial_ms and retry_max_secs must be positive".into(),
            ));
        }
        if self.common_name.is_empty() {
            return Err(bad("children.common_name", "must not be empty".into()));
        }
        if self.admission == Admission::Allowlist && self.allow.is_empty() {
            return Err(bad(
                "children.allow",
                "admission = \"allowlist\" needs at least one [[children.allow]] rule".into(),
            ));
        }
        for (i, r) in self.allow.iter().enumerate() {
            if r.serial.is_none() && r.model.is_none() && r.vendor.is_none() {
                return Err(bad(
                    &format!("children.allow[{i}]"),
                    "a rule needs at least one of serial, model, vendor".into(),
                ));
            }
        }
        Ok(())
    }
}

impl ProvisioningConfig {
    pub fn call_timeout(&self) -> Duration {
        Duration::from_secs(self.call_timeout_secs)
    }
    pub fn permanent_retry(&self) -> Duration {
        Duration::from_secs(self.permanent_retry_secs)
    }
}

/// Which file set each dotted key, so errors name the right file.
#[derive(Default, Clone)]
struct Provenance {
    keys: HashMap<String, PathBuf>,
    main: PathBuf,
}

impl Provenance {
    fn file_for(&self, key: &str) -> Option<&PathBuf> {
        // The longest recorded prefix of `key` (an error may point below or above a leaf).
        let mut k = key;
        loop {
            if let Some(p) = self.keys.get(k) {
                return Some(p);
            }
            match k.rfind('.') {
                Some(i) => k = &k[..i],
                None => return None,
            }
        }
    }
}

impl fmt::Debug for Provenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.keys.iter()).finish()
    }
}

/// The drop-in directory beside a main file: `/etc/gatewayd/gatewayd.toml` → `/etc/gatewayd/conf.d`.
pub fn dropin_dir(main: &Path) -> PathBuf {
    main.parent().unwrap_or(Path::new(".")).join("conf.d")
}

/// Loads the main file plus `conf.d/*.toml` (lexical order, later files win key by key) and
/// validates the result.
pub fn load(main: &Path) -> Result<Config, ConfigError> {
    let mut files = vec![main.to_path_buf()];
    let dir = dropin_dir(main);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut dropins: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        dropins.sort();
        files.extend(dropins);
    }
    let mut merged = toml::Table::new();
    let mut prov = Provenance {
        main: main.to_path_buf(),
        ..Provenance::default()
    };
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(|source| ConfigError::Read {
            path: f.clone(),
            source,
        })?;
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: f.clone(),
                    message: e.to_string().trim().replace('\n', " "),
                })?;
        merge(&mut merged, table, "", f, &mut prov);
    }
    let mut config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
            let key = e.path().to_string();
            let file = prov
                .file_for(&key)
                .unwrap_or(&files[0])
                .display()
                .to_string();
            // toml appends "\nin `key`" context; the key is already named.
            let message = e
                .into_inner()
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned();
            let key = if key == "." {
                "(top level)".to_owned()
            } else {
                key
            };
            ConfigError::Key { file, key, message }
        })?;
    config.origin = prov;
    config.validate()?;
    Ok(config)
}

fn merge(
    into: &mut toml::Table,
    from: toml::Table,
    prefix: &str,
    file: &Path,
    prov: &mut Provenance,
) {
    for (k, v) in from {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(dst)), toml::Value::Table(src)) => {
                merge(dst, src, &path, file, prov);
            }
            (_, v) => {
                prov.keys.insert(path, file.to_path_buf());
                into.insert(k, v);
            }
        }
    }
}

impl Config {
    /// An error about `key`, naming the file that set it (a `conf.d/` drop-in or the main file).
    pub fn key_error(&self, key: &str, message: String) -> ConfigError {
        let file = self.origin.file_for(key).unwrap_or(&self.origin.main);
        ConfigError::Key {
            file: file.display().to_string(),
            key: key.to_owned(),
            message,
        }
    }

    /// Cross-field checks serde cannot express.
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| self.key_error(key, message);
        if let Some(m) = &self.modbus
            && let Err(e) = m.validate()
        {
            return Err(bad("modbus", e.to_string()));
        }
        self.bridge.validate(&bad)?;
        if self.discovery.modbus_interval_secs == 0 {
            return Err(bad(
                "discovery.modbus_interval_secs",
                "must be positive".into(),
            ));
        }
        for (key, v) in [
            (
                "discovery.poll_interval_ms",
                self.discovery.poll_interval_ms,
            ),
            ("discovery.heartbeat_secs", self.discovery.heartbeat_secs),
        ] {
            if v == 0 {
                return Err(bad(key, "must be positive".into()));
            }
        }
        if self.discovery.poll_backoff_max_ms < self.discovery.poll_interval_ms {
            return Err(bad(
                "discovery.poll_backoff_max_ms",
                format!(
                    "{} is less than poll_interval_ms ({})",
                    self.discovery.poll_backoff_max_ms, self.discovery.poll_interval_ms
                ),
            ));
        }
        if self.cloud.endpoint.is_empty() || self.cloud.endpoint.contains(['/', ':', ' ']) {
            return Err(bad(
                "cloud.endpoint",
                "must be a bare host name (no scheme, port or path)".into(),
            ));
        }
        if self.cloud.port == 0 {
            return Err(bad(
                "cloud.port",
                "must be 8883 or 443 (or a test port)".into(),
            ));
        }
        let p = &self.provisioning;
        if p.mode != ProvisioningMode::Preinstalled {
            match &p.template {
                None => {
                    return Err(bad(
                        "provisioning.template",
                        "is required for fleet provisioning".into(),
                    ));
                }
                Some(t) if !valid_template_name(t) => {
                    return Err(bad(
                        "provisioning.template",
                        format!("`{t}` is not 1-36 characters of [0-9A-Za-z_-]"),
                    ));
                }
                Some(_) => {}
            }
        }
        if matches!(p.mode, ProvisioningMode::Csr | ProvisioningMode::CreateKeys) {
            if p.claim_cert.is_none() {
                return Err(bad(
                    "provisioning.claim_cert",
                    "is required in this mode".into(),
                ));
            }
            if p.claim_key.is_none() {
                return Err(bad(
                    "provisioning.claim_key",
                    "is required in this mode".into(),
                ));
            }
        }
        if p.mode == ProvisioningMode::Preinstalled && p.preinstalled.is_none() {
            return Err(bad(
                "provisioning.preinstalled",
                "is required with mode = \"preinstalled\" (cert, key, thing_name)".into(),
            ));
        }
        if p.mode == ProvisioningMode::CreateKeys && p.key_algorithm != KeyAlgorithm::EcdsaP256 {
            return Err(bad(
                "provisioning.key_algorithm",
                "has no effect with mode = \"create-keys\" (the cloud picks RSA 2048); remove it"
                    .into(),
            ));
        }
        if let Some(s) = &p.serial {
            let n = [s.value.is_some(), s.file.is_some(), s.command.is_some()]
                .iter()
                .filter(|b| **b)
                .count();
            if n != 1 {
                return Err(bad(
                    "provisioning.serial",
                    "needs exactly one of `value`, `file` or `command`".into(),
                ));
            }
        }
        if let Some(name) = &p.expected_thing_name {
            let rest = name.replace("{serial}", "");
            if name.is_empty() || rest.contains(['{', '}']) {
                return Err(bad(
                    "provisioning.expected_thing_name",
                    "must be a thing name; `{serial}` is the only placeholder".into(),
                ));
            }
            if name.contains("{serial}") && p.serial.is_none() {
                return Err(bad(
                    "provisioning.expected_thing_name",
                    "uses `{serial}` but provisioning.serial is not configured".into(),
                ));
            }
        }
        if p.call_timeout_secs == 0 {
            return Err(bad(
                "provisioning.call_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        let u = &self.uplink;
        if !(1..=1200).contains(&u.keep_alive_secs) {
            return Err(bad(
                "uplink.keep_alive_secs",
                "must be within 1..=1200".into(),
            ));
        }
        // Each zero is reported under its own key.
        for (key, value) in [
            ("uplink.backoff_initial_ms", u.backoff_initial_ms),
            ("uplink.backoff_max_secs", u.backoff_max_secs),
            ("uplink.publishes_per_sec", u64::from(u.publishes_per_sec)),
            ("uplink.bytes_per_sec", u64::from(u.bytes_per_sec)),
        ] {
            if value == 0 {
                return Err(bad(key, "must be positive".into()));
            }
        }
        if u.max_payload_bytes < 1024 {
            return Err(bad(
                "uplink.max_payload_bytes",
                "must be at least 1024".into(),
            ));
        }
        if let Err(message) = check_log_level(&self.daemon.log_level) {
            return Err(bad("daemon.log_level", message));
        }
        self.local.validate(&bad)?;
        self.children.validate(&bad)?;
        Ok(())
    }
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A log filter is a level (`info`) or comma-separated `target=level` directives. A bare word
/// that is no level would be read by tracing as a target name and silence every line (`warning`
/// did), so it is refused here, naming the levels.
pub fn check_log_level(filter: &str) -> Result<(), String> {
    let levels = "use one of off, error, warn, info, debug, trace, or target=level directives";
    if filter.trim().is_empty() {
        return Err(format!("is empty; {levels}"));
    }
    for directive in filter.split(',').map(str::trim) {
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            Some(_) => return Err(format!("`{directive}` names no target; {levels}")),
            None => directive,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            let hint = match level.to_ascii_lowercase().as_str() {
                "warning" => " (did you mean `warn`?)",
                "err" => " (did you mean `error`?)",
                _ => "",
            };
            return Err(format!("`{level}` is not a log level{hint}; {levels}"));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(|_| ())
        .map_err(|e| format!("`{filter}`: {e}"))
}

pub fn valid_template_name(t: &str) -> bool {
    (1..=36).contains(&t.len())
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BASE: &str = r#"
[cloud]
endpoint = "example-ats.iot.eu-west-1.amazonaws.com"
root_ca = "/etc/gatewayd/AmazonRootCA1.pem"
[provisioning]
template = "GatewayTemplate"
claim_cert = "/etc/gatewayd/claim.pem"
claim_key = "/etc/gatewayd/claim.key"
"#;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn defaults_apply() {
        let d = tempfile::tempdir().unwrap();
        let c = load(&write(d.path(), "g.toml", BASE)).unwrap();
        assert_eq!(c.cloud.port, 8883);
        assert_eq!(c.provisioning.mode, ProvisioningMode::Csr);
        assert_eq!(c.provisioning.key_algorithm, KeyAlgorithm::EcdsaP256);
        assert_eq!(c.uplink.max_payload_bytes, 128 * 1024);
        // A full 128 KiB payload plus its header and topic fits in an incoming packet.
        let (incoming, outgoing) = c.uplink.packet_limits();
        let largest_legal = 5 + 2 + 256 + 2 + 128 * 1024;
        assert!(incoming >= largest_legal, "{incoming}");
        assert_eq!(incoming, 128 * 1024 + 2048);
        assert_eq!(outgoing, incoming);
        assert_eq!(c.daemon.state_dir, PathBuf::from("/var/lib/gatewayd"));
    }

    #[test]
    fn bridge_defaults_and_bad_bridge_settings_are_named() {
        let d = tempfile::tempdir().unwrap();
        let c = load(&write(d.path(), "g.toml", BASE)).unwrap();
        assert_eq!(c.bridge.window, 32);
        assert_eq!(
            c.bridge.mappings,
            vec![crate::bridge::MappingRule::default()]
        );
        assert_eq!(
            c.bridge.commands,
            vec![crate::bridge::commands::CommandRule::default()]
        );
        assert_eq!(c.bridge.command_expiry_secs, 3600);
        for (text, key, says) in [
            (
                "[bridge]
window = 0
",
                "bridge.window",
                "between 1 and 90",
            ),
            (
                "[bridge]
window = 100
",
                "bridge.window",
                "between 1 and 90",
            ),
            (
                "[bridge]
ack_timeout_secs = 0
",
                "bridge.ack_timeout_secs",
                "positive",
            ),
            (
                "[bridge]
mappings = []
",
                "bridge.mappings",
                "at least one rule",
            ),
            (
                "[bridge]
speed = 3
",
                "speed",
                "unknown field",
            ),
            (
                "[[bridge.mappings]]
local = \"dt/{child}/{suffix}\"\ncloud = \"gw/{gateway}/{thingname}/{suffix}\"\n",
                "bridge.mappings[0].cloud",
                "unknown placeholder `{thingname}`",
            ),
            (
                "[[bridge.mappings]]\nlocal = \"dt/x/{suffix}\"\ncloud = \"gw/{suffix}\"\n",
                "bridge.mappings[0].local",
                "must contain `{child}`",
            ),
            (
                "[[bridge.mappings]]\nlocal = \"dt/{child}\"\n",
                "bridge.mappings[0]",
                "missing field `cloud`",
            ),
            (
                "[bridge]\ncommand_expiry_secs = 0\n",
                "bridge.command_expiry_secs",
                "positive",
            ),
            (
                "[[bridge.commands]]\ncloud = \"cmd/{gateway}/{suffix}\"\nlocal = \"cmd/{child}/{suffix}\"\n",
                "bridge.commands[0].cloud",
                "must contain `{thing}`",
            ),
            (
                "[[bridge.commands]]\ncloud = \"cmd/{gateway}/{thing}/{suffix}\"\nlocal = \"cmd/{child}\"\n",
                "bridge.commands[0].local",
                "must end with `{suffix}`",
            ),
        ] {
            let d = tempfile::tempdir().unwrap();
            let main = write(d.path(), "g.toml", &format!("{BASE}{text}"));
            let e = load(&main).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn children_defaults_and_bad_children_settings_are_named() {
        let d = tempfile::tempdir().unwrap();
        let c = load(&write(d.path(), "g.toml", BASE)).unwrap();
        assert_eq!(c.children.admission, Admission::Manual);
        assert_eq!(c.children.create_certificate_per_sec, 15.0);
        assert_eq!(c.children.register_thing_per_sec, 10.0);
        assert_eq!(c.children.template, None);
        for (text, key, says) in [
            (
                "[children]\nregister_thing_per_sec = 0\n",
                "children.register_thing_per_sec",
                "above 0",
            ),
            (
                "[children]\ntemplate = \"bad name\"\n",
                "children.template",
                "not 1-36",
            ),
            (
                "[children]\nadmission = \"allowlist\"\n",
                "children.allow",
                "at least one",
            ),
            (
                "[children]\nadmission = \"sometimes\"\n",
                "children.admission",
                "unknown variant",
            ),
            (
                "[children]\nallow = [{ colour = \"red\" }]\n",
                "colour",
                "unknown field",
            ),
            (
                "[children]\nallow = [{}]\n",
                "children.allow[0]",
                "at least one of",
            ),
        ] {
            let d = tempfile::tempdir().unwrap();
            let main = write(d.path(), "g.toml", &format!("{BASE}{text}"));
            let e = load(&main).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{text}: {e}");
        }
        let d = tempfile::tempdir().unwrap();
        let text = "[children]\nadmission = \"allowlist\"\nallow = [{ vendor = \"Acme*\" }]\n";
        let c = load(&write(d.path(), "g.toml", &format!("{BASE}{text}"))).unwrap();
        assert_eq!(c.children.allow[0].vendor.as_deref(), Some("Acme*"));
    }

    #[test]
    fn polling_defaults_and_bad_polling_settings_are_named() {
        let d = tempfile::tempdir().unwrap();
        let c = load(&write(d.path(), "g.toml", BASE)).unwrap();
        assert_eq!(c.discovery.poll_interval_ms, 1000);
        assert_eq!(c.discovery.report, Report::OnChange);
        assert_eq!(c.discovery.heartbeat_secs, 60);
        assert_eq!(c.discovery.poll_backoff_max_ms, 30_000);
        for (text, key, says) in [
            (
                "poll_interval_ms = 0",
                "discovery.poll_interval_ms",
                "positive",
            ),
            ("heartbeat_secs = 0", "discovery.heartbeat_secs", "positive"),
            (
                "poll_interval_ms = 5000\npoll_backoff_max_ms = 1000",
                "discovery.poll_backoff_max_ms",
                "less than poll_interval_ms (5000)",
            ),
            ("report = \"sometimes\"", "report", "unknown variant"),
        ] {
            let d = tempfile::tempdir().unwrap();
            let main = write(d.path(), "g.toml", &format!("{BASE}[discovery]\n{text}\n"));
            let e = load(&main).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn unknown_key_is_named_with_its_file() {
        let d = tempfile::tempdir().unwrap();
        let main = write(d.path(), "g.toml", BASE);
        write(
            d.path(),
            "conf.d/10-site.toml",
            "[uplink]\nkeepalive = 30\n",
        );
        let e = load(&main).unwrap_err().to_string();
        assert!(e.contains("10-site.toml"), "{e}");
        assert!(e.contains("uplink"), "{e}");
        assert!(e.contains("keepalive"), "{e}");
    }

    #[test]
    fn dropins_override_in_order() {
        let d = tempfile::tempdir().unwrap();
        let main = write(d.path(), "g.toml", BASE);
        write(
            d.path(),
            "conf.d/10-a.toml",
            "[cloud]\nport = 443\n[provisioning.parameters]\nSite = \"a\"\n",
        );
        write(
            d.path(),
            "conf.d/20-b.toml",
            "[provisioning.parameters]\nSite = \"b\"\nLine = \"3\"\n",
        );
        write(d.path(), "conf.d/README", "not toml");
        let c = load(&main).unwrap();
        assert_eq!(c.cloud.port, 443);
        assert_eq!(c.cloud.endpoint, "example-ats.iot.eu-west-1.amazonaws.com");
        assert_eq!(c.provisioning.parameters["Site"], "b");
        assert_eq!(c.provisioning.parameters["Line"], "3");
    }

    #[test]
    fn wrong_type_names_key() {
        let d = tempfile::tempdir().unwrap();
        let main = write(d.path(), "g.toml", BASE);
        write(d.path(), "conf.d/x.toml", "[cloud]\nport = \"eighty\"\n");
        let e = load(&main).unwrap_err().to_string();
        assert!(e.contains("cloud.port"), "{e}");
        assert!(e.contains("x.toml"), "{e}");
    }

    #[test]
    fn cross_field_checks() {
        let d = tempfile::tempdir().unwrap();
        let main = write(
            d.path(),
            "g.toml",
            &BASE.replace("GatewayTemplate", "bad name!"),
        );
        let e = load(&main).unwrap_err().to_string();
        assert!(e.contains("provisioning.template"), "{e}");

        let main = write(
            d.path(),
            "h.toml",
            &format!("{BASE}\n[provisioning.serial]\nvalue = \"1\"\nfile = \"/x\"\n"),
        );
        let e = load(&main).unwrap_err().to_string();
        assert!(e.contains("provisioning.serial"), "{e}");

        let no_claim =
            "[cloud]\nendpoint = \"e\"\nroot_ca = \"/ca\"\n[provisioning]\ntemplate = \"T\"\n";
        let e = load(&write(d.path(), "i.toml", no_claim))
            .unwrap_err()
            .to_string();
        assert!(e.contains("provisioning.claim_cert"), "{e}");
    }

    #[test]
    fn local_rules_and_fingerprints_are_checked_and_named() {
        let d = tempfile::tempdir().unwrap();
        let fp = "AB:".repeat(31) + "AB";
        let ok = format!(
            "{BASE}\n[local]\nonboarding_ca_fingerprints = [\"{fp}\"]\nupstream = [\"dt/#\", \"alarm/+\"]\n\
             [local.clients.dash]\nsubscribe = [\"dt/#\"]\n"
        );
        let c = load(&write(d.path(), "ok.toml", &ok)).unwrap();
        assert_eq!(
            fingerprint(&c.local.onboarding_ca_fingerprints[0]),
            Some("ab".repeat(32))
        );
        assert_eq!(c.local.clients["dash"].publish, None);
        for (bad, key) in [
            (
                "onboarding_certificate_ids = [\"abc\"]",
                "local.onboarding_certificate_ids",
            ),
            ("upstream = [\"dt/#/x\"]", "local.upstream"),
            (
                "[local.clients.dash]\nsubscribe = [\"$aws/#\"]",
                "local.clients.dash.subscribe",
            ),
            ("[local.clients.\"a b\"]\npublish = []", "local.clients.a b"),
        ] {
            let text = format!("{BASE}\n[local]\n{bad}\n");
            let e = load(&write(d.path(), "bad.toml", &text))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("key `{key}`")), "{bad}: {e}");
        }
    }

    #[test]
    fn each_zero_limit_is_named_by_its_own_key() {
        let d = tempfile::tempdir().unwrap();
        for key in [
            "backoff_initial_ms",
            "backoff_max_secs",
            "publishes_per_sec",
            "bytes_per_sec",
        ] {
            let main = write(
                d.path(),
                &format!("{key}.toml"),
                &format!("{BASE}\n[uplink]\n{key} = 0\n"),
            );
            let e = load(&main).unwrap_err().to_string();
            assert!(
                e.contains(&format!("key `uplink.{key}`: must be positive")),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn expected_thing_name_is_checked() {
        let d = tempfile::tempdir().unwrap();
        let with = |name: &str, serial: bool| {
            let mut t = BASE.replace(
                "[provisioning]\n",
                &format!("[provisioning]\nexpected_thing_name = \"{name}\"\n"),
            );
            if serial {
                t += "[provisioning.serial]\nvalue = \"0001\"\n";
            }
            load(&write(d.path(), "g.toml", &t))
        };
        let c = with("gw-{serial}", true).unwrap();
        assert_eq!(
            c.provisioning.expected_thing_name.as_deref(),
            Some("gw-{serial}")
        );
        assert!(with("lobby-gw", false).is_ok());
        let e = with("gw-{serial}", false).unwrap_err().to_string();
        assert!(e.contains("provisioning.expected_thing_name"), "{e}");
        let e = with("gw-{mac}", true).unwrap_err().to_string();
        assert!(e.contains("only placeholder"), "{e}");
    }

    #[test]
    fn syntax_error_names_file() {
        let d = tempfile::tempdir().unwrap();
        let e = load(&write(d.path(), "g.toml", "[cloud\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("g.toml") && e.contains("syntax"), "{e}");
    }

    #[test]
    fn example_file_is_valid() {
        let text = include_str!("../../gatewayd.example.toml");
        let d = tempfile::tempdir().unwrap();
        let c = load(&write(d.path(), "g.toml", text)).unwrap();
        assert_eq!(c.provisioning.template.as_deref(), Some("GatewayTemplate"));
    }
}
