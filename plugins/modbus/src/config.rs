//! The Modbus plugin's configuration: strict serde types, defaults beside the fields, and
//! `validate` for what serde cannot say (ranges, sizes, duplicates).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::decode::{DataType, Layout, Order};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusConfig {
    /// How long one request may wait for its answer (also the TCP connect timeout).
    #[serde(default = "default_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Spacing between requests on one line (see `scan::Pacer`).
    #[serde(default = "default_delay_ms")]
    pub delay_between_requests_ms: u64,
    /// Requests in flight at once on one TCP host:port. RTU lines always use 1.
    #[serde(default = "default_concurrency")]
    pub max_concurrent_per_line: usize,
    /// Unit ids to scan on lines that do not name their own.
    #[serde(default = "default_units")]
    pub unit_ids: Vec<UnitRange>,
    /// The extended Read Device Identification object that holds the serial number.
    #[serde(default = "default_serial_object")]
    pub serial_object_id: u8,
    #[serde(default)]
    pub tcp: Vec<TcpTargets>,
    #[serde(default)]
    pub rtu: Vec<RtuLine>,
    #[serde(default)]
    pub profiles: Vec<Profile>,
}

fn default_timeout_ms() -> u64 {
    1000
}
fn default_delay_ms() -> u64 {
    20
}
fn default_concurrency() -> usize {
    1
}
fn default_units() -> Vec<UnitRange> {
    vec![UnitRange { first: 1, last: 10 }]
}
fn default_serial_object() -> u8 {
    0x80
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpTargets {
    /// Host names, IPv4/IPv6 addresses, or IPv4 CIDR ranges (`192.168.1.0/28`).
    pub hosts: Vec<String>,
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
    pub unit_ids: Option<Vec<UnitRange>>,
}

fn default_ports() -> Vec<u16> {
    vec![502]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtuLine {
    /// The serial device, e.g. `/dev/ttyUSB0`.
    pub device: String,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default = "default_parity")]
    pub parity: Parity,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    pub unit_ids: Option<Vec<UnitRange>>,
    /// After a timeout the line stays quiet this long before the port is reopened and its
    /// input flushed: RTU has no transaction id, so an answer arriving later than this could
    /// still be read as the next request's answer.
    #[serde(default = "default_settle_ms")]
    pub settle_after_timeout_ms: u64,
}

fn default_settle_ms() -> u64 {
    1000
}

fn default_baud() -> u32 {
    19200
}
fn default_parity() -> Parity {
    Parity::Even
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}

/// A unit id or an inclusive range: `5` or `"1-10"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "UnitRangeRepr", into = "String")]
pub struct UnitRange {
    pub first: u8,
    pub last: u8,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum UnitRangeRepr {
    One(u8),
    Range(String),
}

impl TryFrom<UnitRangeRepr> for UnitRange {
    type Error = String;
    fn try_from(r: UnitRangeRepr) -> Result<Self, String> {
        let (first, last) = match r {
            UnitRangeRepr::One(u) => (u, u),
            UnitRangeRepr::Range(s) => {
                let parse = |p: &str| {
                    p.trim()
                        .parse::<u8>()
                        .map_err(|_| format!("unit id range {s:?}: {p:?} is not 0-255"))
                };
                match s.split_once('-') {
                    Some((a, b)) => (parse(a)?, parse(b)?),
                    None => {
                        let u = parse(&s)?;
                        (u, u)
                    }
                }
            }
        };
        if first == 0 || last == 0 {
            return Err("unit id 0 is broadcast: a scan never sends it".into());
        }
        if first > last {
            return Err(format!("unit id range {first}-{last} is empty"));
        }
        if first <= 254 && last >= 248 {
            return Err(format!(
                "unit ids 248-254 are reserved by Modbus ({first}-{last})"
            ));
        }
        Ok(Self { first, last })
    }
}

impl From<UnitRange> for String {
    fn from(r: UnitRange) -> String {
        format!("{}-{}", r.first, r.last)
    }
}

/// Identity patterns: `*` matches any run of characters; a missing field matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    pub vendor: Option<String>,
    pub product_code: Option<String>,
    pub model: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Function {
    Coils,
    DiscreteInputs,
    Holding,
    Input,
}

/// Where a value lies and how to read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    pub function: Function,
    pub address: u16,
    pub data_type: DataType,
    /// Registers, for `string` only.
    pub count: Option<u16>,
    #[serde(default)]
    pub byte_order: Order,
    #[serde(default)]
    pub word_order: Order,
}

impl Register {
    pub fn layout(&self) -> Layout {
        Layout {
            data_type: self.data_type,
            byte_order: self.byte_order,
            word_order: self.word_order,
            string_registers: self.count.unwrap_or(1),
        }
    }
}

/// One point of a register map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    pub name: String,
    pub function: Function,
    pub address: u16,
    pub data_type: DataType,
    /// Registers, for `string` only.
    pub count: Option<u16>,
    #[serde(default)]
    pub byte_order: Order,
    #[serde(default)]
    pub word_order: Order,
    pub scale: Option<f64>,
    pub offset: Option<f64>,
    pub unit: Option<String>,
    #[serde(default)]
    pub writable: bool,
    /// Inclusive bounds on the value written (after scale and offset).
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Point {
    pub fn register(&self) -> Register {
        Register {
            function: self.function,
            address: self.address,
            data_type: self.data_type,
            count: self.count,
            byte_order: self.byte_order,
            word_order: self.word_order,
        }
    }
}

/// For devices without Read Device Identification: constants and registers that say who they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRegisters {
    pub vendor: Option<String>,
    pub product_code: Option<String>,
    pub model: Option<String>,
    /// Where the serial number is (usually an ASCII string in holding registers). Required: a
    /// device with no serial cannot be told from its neighbours.
    pub serial: Register,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    /// The fleet-provisioning template for children with this profile.
    pub template: String,
    #[serde(default, rename = "match")]
    pub matches: Match,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Tried, in profile order, for devices that answer 0x2B/0x0E with an exception.
    pub identity: Option<IdentityRegisters>,
    #[serde(default)]
    pub points: Vec<Point>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("modbus: {0}")]
    Invalid(String),
}

/// Largest CIDR range expanded into hosts: keeps one scan bounded.
pub const MAX_CIDR_HOSTS: u32 = 256;

/// Expands a host entry: a CIDR range into its hosts (network and broadcast addresses left out
/// for ranges wider than /31), anything else as is.
pub fn expand_host(entry: &str) -> Result<Vec<String>, ConfigError> {
    let Some((net, bits)) = entry.split_once('/') else {
        if entry.trim().is_empty() {
            return Err(ConfigError::Invalid("tcp: an empty host".into()));
        }
        return Ok(vec![entry.to_string()]);
    };
    let bad = |why: &str| ConfigError::Invalid(format!("tcp host {entry:?}: {why}"));
    let net: Ipv4Addr = net.parse().map_err(|_| bad("not an IPv4 CIDR range"))?;
    let bits: u32 = bits
        .parse()
        .map_err(|_| bad("prefix length is not a number"))?;
    if bits > 32 {
        return Err(bad("prefix length over 32"));
    }
    let size = 1u64 << (32 - bits);
    if size > u64::from(MAX_CIDR_HOSTS) {
        return Err(bad(&format!(
            "more than {MAX_CIDR_HOSTS} addresses; split it or list hosts"
        )));
    }
    let base = u32::from(net) & (u32::MAX.checked_shl(32 - bits).unwrap_or(0));
    let (first, last) = if size > 2 { (1, size - 1) } else { (0, size) };
    Ok((first..last)
        .map(|i| Ipv4Addr::from(base + i as u32).to_string())
        .collect())
}

impl ModbusConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_between_requests_ms)
    }

    /// Parses TOML and validates it; the error names the bad key.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml_from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError::Invalid(s));
        if self.request_timeout_ms == 0 {
            return bad("request_timeout_ms must be at least 1".into());
        }
        if self.max_concurrent_per_line == 0 {
            return bad("max_concurrent_per_line must be at least 1".into());
        }
        for t in &self.tcp {
            for h in &t.hosts {
                expand_host(h)?;
            }
            if t.ports.is_empty() || t.ports.contains(&0) {
                return bad(format!(
                    "tcp {:?}: ports must be non-empty and non-zero",
                    t.hosts
                ));
            }
        }
        for r in &self.rtu {
            if r.device.is_empty() {
                return bad("rtu: device is empty".into());
            }
            if !(5..=8).contains(&r.data_bits) {
                return bad(format!("rtu {}: data_bits must be 5-8", r.device));
            }
            if !(1..=2).contains(&r.stop_bits) {
                return bad(format!("rtu {}: stop_bits must be 1 or 2", r.device));
            }
            if r.baud == 0 {
                return bad(format!("rtu {}: baud must be non-zero", r.device));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for p in &self.profiles {
            if !names.insert(&p.name) {
                return bad(format!("profile {:?} is defined twice", p.name));
            }
            let mut points = std::collections::BTreeSet::new();
            for pt in &p.points {
                check_register(&p.name, &format!("point {:?}", pt.name), &pt.register())?;
            }
            if let Some(i) = &p.identity {
                check_register(&p.name, "identity.serial", &i.serial)?;
            }
            for pt in &p.points {
                if !points.insert(&pt.name) {
                    return bad(format!("profile {:?}: point {:?} twice", p.name, pt.name));
                }
                if pt.writable && !matches!(pt.function, Function::Holding | Function::Coils) {
                    return bad(format!(
                        "profile {:?}: point {:?}: only holding registers and coils are writable",
                        p.name, pt.name
                    ));
                }
                if pt.scale == Some(0.0) {
                    return bad(format!(
                        "profile {:?}: point {:?}: scale 0",
                        p.name, pt.name
                    ));
                }
                if let (Some(lo), Some(hi)) = (pt.min, pt.max)
                    && lo > hi
                {
                    return bad(format!(
                        "profile {:?}: point {:?}: min > max",
                        p.name, pt.name
                    ));
                }
            }
        }
        Ok(())
    }
}

fn check_register(profile: &str, what: &str, reg: &Register) -> Result<(), ConfigError> {
    let bad = |why: &str| {
        Err(ConfigError::Invalid(format!(
            "profile {profile:?}: {what}: {why}"
        )))
    };
    let bits = matches!(reg.function, Function::Coils | Function::DiscreteInputs);
    if bits && reg.data_type != DataType::Bool {
        return bad("coils and discrete inputs hold only bool");
    }
    match (reg.data_type, reg.count) {
        (DataType::String, None | Some(0)) => return bad("a string needs count (registers) ≥ 1"),
        (DataType::String, Some(n)) if n > 123 => return bad("a string is at most 123 registers"),
        (DataType::String, _) => {}
        (_, Some(_)) => return bad("count is only for string"),
        (_, None) => {}
    }
    if u32::from(reg.address) + u32::from(reg.layout().registers()) > 0x1_0000 {
        return bad("runs past address 65535");
    }
    Ok(())
}

fn toml_from_str(text: &str) -> Result<ModbusConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))
}

/// Matches `*` globs, nothing else special.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else if let Some(pos) = rest.find(part) {
            rest = &rest[pos + part.len()..];
        } else {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("Acme*", "Acme Corp"));
        assert!(glob_match("*", ""));
        assert!(glob_match("A*-*2", "AM-42"));
        assert!(!glob_match("A*-*3", "AM-42"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }

    #[test]
    fn cidr() {
        assert_eq!(
            expand_host("10.0.0.0/30").expect("valid"),
            ["10.0.0.1", "10.0.0.2"]
        );
        assert_eq!(expand_host("10.0.0.5/32").expect("valid"), ["10.0.0.5"]);
        assert!(expand_host("10.0.0.0/16").is_err());
        assert!(expand_host("host/x").is_err());
    }

    #[test]
    fn unit_ranges() {
        let c: ModbusConfig = toml::from_str("unit_ids = [3, \"5-7\"]").expect("valid unit ids");
        assert_eq!(
            c.unit_ids,
            [
                UnitRange { first: 3, last: 3 },
                UnitRange { first: 5, last: 7 }
            ]
        );
        for bad in [
            "unit_ids = [0]",
            "unit_ids = [\"7-5\"]",
            "unit_ids = [\"1-250\"]",
        ] {
            assert!(toml::from_str::<ModbusConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_name_the_bad_key() {
        let e = ModbusConfig::from_toml("request_timeout = 5").expect_err("unknown key");
        assert!(e.to_string().contains("request_timeout"), "{e}");
        let e = ModbusConfig::from_toml(
            "[[profiles]]\nname='m'\ntemplate='t'\n[[profiles.points]]\nname='v'\nfunction='coils'\naddress=0\ndata_type='int16'\n",
        )
        .expect_err("int16 in a coil");
        assert!(e.to_string().contains("\"v\""), "{e}");
        let e = ModbusConfig::from_toml(
            "[[profiles]]\nname='m'\ntemplate='t'\n[[profiles.points]]\nname='w'\nfunction='input'\naddress=0\ndata_type='int16'\nwritable=true\n",
        )
        .expect_err("writable input register");
        assert!(
            e.to_string().contains("only holding registers and coils"),
            "{e}"
        );
        let e = ModbusConfig::from_toml("[[rtu]]\ndevice='/dev/x'\nparity='mark'\n")
            .expect_err("bad parity");
        assert!(
            e.to_string().contains("parity") || e.to_string().contains("mark"),
            "{e}"
        );
    }
}
