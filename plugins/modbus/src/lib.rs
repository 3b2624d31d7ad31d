//! gatewayd's Modbus plugin: bounded discovery over TCP and RTU lines, identity from Read Device
//! Identification or profile registers, polling by register map, validated writes.
//!
//! The daemon builds one [`ModbusPlugin`] from its `[modbus]` config and calls it through
//! [`gatewayd_plugin::Plugin`]. This crate owns the Modbus wire; it does not touch the registry,
//! the store or the cloud.
//!
//! Files: `config` (strict config), `decode` (pure register decoding), `line` (the per-line call
//! wrapper: timeouts, reconnect after a timeout, pacing), `identify` (0x2B/0x0E and profile
//! registers).
#![forbid(unsafe_code)]

pub mod config;
pub mod decode;
pub mod identify;
pub mod line;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use gatewayd_plugin::{
    DeviceId, FoundDevice, Identity, IdentitySource, Plugin, PluginError, PluginStats, Reading,
    Telemetry, Value, WriteCommand, WriteOutcome, now_ms,
};
use tokio::sync::Semaphore;
use tokio_modbus::{Request, Response};

pub use config::{ConfigError, ModbusConfig};
use config::{Function, Point, Profile, Register, UnitRange};
use decode::{DataType, Raw};
use line::{Endpoint, Line, Stats};

/// How many lines one discover scans at once (each line is paced on its own).
const LINES_AT_ONCE: usize = 32;

pub struct ModbusPlugin {
    config: Arc<ModbusConfig>,
    lines: BTreeMap<String, Arc<Line>>,
    stats: Arc<Stats>,
    /// What identify last learnt per device: its identity and the index of its profile.
    known: std::sync::Mutex<HashMap<DeviceId, (Identity, Option<usize>)>>,
}

fn units(ranges: &[UnitRange]) -> Vec<u8> {
    let mut v: Vec<u8> = ranges.iter().flat_map(|r| r.first..=r.last).collect();
    v.sort_unstable();
    v.dedup();
    v
}

impl ModbusPlugin {
    /// Validates the config and sets up one line per TCP host:port and per serial port. Opens
    /// nothing: connections are made on the first request.
    pub fn new(config: ModbusConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let stats = Arc::new(Stats::default());
        let mut lines = BTreeMap::new();
        let mut add = |endpoint: Endpoint, u: Vec<u8>| {
            let line = Line::new(
                endpoint,
                u,
                config.max_concurrent_per_line,
                config.delay(),
                config.request_timeout(),
                stats.clone(),
            );
            lines.insert(line.endpoint.id_prefix(), Arc::new(line));
        };
        for t in &config.tcp {
            let u = units(t.unit_ids.as_deref().unwrap_or(&config.unit_ids));
            for entry in &t.hosts {
                for host in config::expand_host(entry)? {
                    for port in &t.ports {
                        add(
                            Endpoint::Tcp {
                                host: host.trim_matches(['[', ']']).to_string(),
                                port: *port,
                            },
                            u.clone(),
                        );
                    }
                }
            }
        }
        for r in &config.rtu {
            let u = units(r.unit_ids.as_deref().unwrap_or(&config.unit_ids));
            add(Endpoint::Rtu(r.clone()), u);
        }
        Ok(Self {
            config: Arc::new(config),
            lines,
            stats,
            known: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The id of a unit on a line, as discover reports it.
    pub fn device_id(endpoint: &Endpoint, unit: u8) -> DeviceId {
        DeviceId(format!("{}/{unit}", endpoint.id_prefix()))
    }

    /// Tells the plugin which profile a device matched at an earlier scan (the daemon keeps it
    /// across restarts), so `poll` and `write` use that map without identifying the device first.
    /// A device already identified in this process keeps what identify found. False when no
    /// profile has that name (the configuration changed since).
    pub fn remember(&self, device: &DeviceId, profile: &str) -> bool {
        let Some(index) = self.config.profiles.iter().position(|p| p.name == profile) else {
            return false;
        };
        let mut identity = Identity::unidentified();
        identity.source = IdentitySource::ProfileRegisters {
            profile: profile.to_owned(),
        };
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(device.clone())
            .or_insert((identity, Some(index)));
        true
    }

    fn resolve(&self, device: &DeviceId) -> Result<(Arc<Line>, u8), PluginError> {
        let unknown = || PluginError::UnknownDevice(device.0.clone());
        let (prefix, unit) = device.0.rsplit_once('/').ok_or_else(unknown)?;
        let unit: u8 = unit.parse().map_err(|_| unknown())?;
        let line = self.lines.get(prefix).ok_or_else(unknown)?;
        Ok((line.clone(), unit))
    }

    fn profile_for(&self, identity: &Identity) -> Option<usize> {
        if let IdentitySource::ProfileRegisters { profile } = &identity.source {
            return self.config.profiles.iter().position(|p| &p.name == profile);
        }
        if identity.source == IdentitySource::Unidentified {
            return None;
        }
        self.config
            .profiles
            .iter()
            .position(|p| profile_matches(p, identity))
    }

    async fn identify_known(
        &self,
        device: &DeviceId,
    ) -> Result<(Identity, Option<usize>), PluginError> {
        let (line, unit) = self.resolve(device)?;
        let identity = identify::identify(&line, unit, &self.config).await?;
        let profile = self.profile_for(&identity);
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(device.clone(), (identity.clone(), profile));
        Ok((identity, profile))
    }

    async fn profile_of(&self, device: &DeviceId) -> Result<&Profile, PluginError> {
        let cached = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
            .map(|(_, p)| *p);
        let index = match cached {
            Some(p) => p,
            None => self.identify_known(device).await?.1,
        };
        index
            .and_then(|i| self.config.profiles.get(i))
            .ok_or_else(|| PluginError::NoMap(device.0.clone()))
    }

    async fn scan_line(&self, line: Arc<Line>) -> Vec<FoundDevice> {
        let mut found = Vec::new();
        for &unit in &line.units {
            let id = Self::device_id(&line.endpoint, unit);
            match self.identify_known(&id).await {
                Ok((identity, profile)) => {
                    let profile = profile.and_then(|i| self.config.profiles.get(i));
                    found.push(FoundDevice {
                        id,
                        identity,
                        profile: profile.map(|p| p.name.clone()),
                        template: profile.map(|p| p.template.clone()),
                        parameters: profile.map(|p| p.parameters.clone()).unwrap_or_default(),
                    });
                }
                Err(PluginError::Transport(e)) => {
                    // The line itself is down (refused, no port): its other units cannot answer.
                    tracing::info!(line = %line.endpoint.id_prefix(), error = %e, "modbus line unreachable; scan skips it");
                    break;
                }
                Err(e) => {
                    tracing::debug!(device = %id, error = %e, "no device");
                }
            }
        }
        found
    }
}

fn profile_matches(p: &Profile, id: &Identity) -> bool {
    let one = |pat: &Option<String>, val: &Option<String>| match (pat, val) {
        (None, _) => true,
        (Some(pat), Some(v)) => config::glob_match(pat, v),
        (Some(_), None) => false,
    };
    one(&p.matches.vendor, &id.vendor)
        && one(&p.matches.product_code, &id.product_code)
        && one(&p.matches.model, &id.model)
}

/// Builds the read request for a register.
pub(crate) fn read_request(reg: &Register) -> Request<'static> {
    let n = reg.layout().registers();
    match reg.function {
        Function::Coils => Request::ReadCoils(reg.address, n),
        Function::DiscreteInputs => Request::ReadDiscreteInputs(reg.address, n),
        Function::Holding => Request::ReadHoldingRegisters(reg.address, n),
        Function::Input => Request::ReadInputRegisters(reg.address, n),
    }
}

/// Reads and decodes one register (before scale and offset).
pub(crate) async fn read_raw(line: &Line, unit: u8, reg: &Register) -> Result<Raw, PluginError> {
    let want = usize::from(reg.layout().registers());
    let response = line.request(unit, read_request(reg)).await?;
    let words: Vec<u16> = match response {
        Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits) => {
            // Coil replies are padded to whole bytes: keep what was asked for.
            if bits.len() < want {
                return Err(PluginError::Malformed(format!(
                    "{} bits for {want}",
                    bits.len()
                )));
            }
            bits.into_iter().take(want).map(u16::from).collect()
        }
        Response::ReadHoldingRegisters(w) | Response::ReadInputRegisters(w) => w,
        other => {
            return Err(PluginError::Malformed(format!(
                "unexpected reply {other:?}"
            )));
        }
    };
    decode::decode(&words, &reg.layout()).map_err(|e| PluginError::Malformed(e.to_string()))
}

impl Plugin for ModbusPlugin {
    fn name(&self) -> &str {
        "modbus"
    }

    async fn discover(&self) -> Result<Vec<FoundDevice>, PluginError> {
        let lines_at_once = Semaphore::new(LINES_AT_ONCE);
        let scans = self.lines.values().map(|line| async {
            let _permit = lines_at_once.acquire().await;
            self.scan_line(line.clone()).await
        });
        // Lines are independent and each is paced on its own: scan them side by side.
        let mut found = Vec::new();
        for devices in join_all(scans).await {
            found.extend(devices);
        }
        Ok(found)
    }

    async fn identify(&self, device: &DeviceId) -> Result<Identity, PluginError> {
        Ok(self.identify_known(device).await?.0)
    }

    async fn poll(&self, device: &DeviceId) -> Result<Telemetry, PluginError> {
        let (line, unit) = self.resolve(device)?;
        let profile = self.profile_of(device).await?;
        if profile.points.is_empty() {
            return Err(PluginError::NoMap(device.0.clone()));
        }
        let mut readings = Vec::with_capacity(profile.points.len());
        for point in &profile.points {
            let value = read_raw(&line, unit, &point.register())
                .await
                .map(|raw| decode::scaled(raw, point.scale, point.offset));
            readings.push(Reading {
                name: point.name.clone(),
                value,
                unit: point.unit.clone(),
            });
        }
        Ok(Telemetry {
            device: device.clone(),
            timestamp_ms: now_ms(),
            readings,
        })
    }

    async fn write(
        &self,
        device: &DeviceId,
        command: &WriteCommand,
    ) -> Result<WriteOutcome, PluginError> {
        let (line, unit) = self.resolve(device)?;
        let profile = self.profile_of(device).await?;
        let request = validate_write(profile, command)?;
        let response = line.request(unit, request).await?;
        match response {
            Response::WriteSingleCoil(..)
            | Response::WriteMultipleCoils(..)
            | Response::WriteSingleRegister(..)
            | Response::WriteMultipleRegisters(..) => Ok(WriteOutcome {
                device: device.clone(),
                point: command.point.clone(),
                value: command.value.clone(),
                timestamp_ms: now_ms(),
            }),
            other => Err(PluginError::Malformed(format!(
                "unexpected reply {other:?}"
            ))),
        }
    }

    fn stats(&self) -> PluginStats {
        self.stats.snapshot()
    }
}

/// Checks a command against the profile's map and builds the request; nothing is sent here.
pub fn validate_write(
    profile: &Profile,
    command: &WriteCommand,
) -> Result<Request<'static>, PluginError> {
    let point: &Point = profile
        .points
        .iter()
        .find(|p| p.name == command.point)
        .ok_or_else(|| PluginError::RefusedUnknownPoint(command.point.clone()))?;
    if !point.writable || !matches!(point.function, Function::Holding | Function::Coils) {
        return Err(PluginError::RefusedNotWritable(point.name.clone()));
    }
    let refuse = |why: String| PluginError::RefusedValue(format!("{}: {why}", point.name));
    let numeric = match (&command.value, point.data_type) {
        (Value::Bool(_), DataType::Bool) | (Value::Text(_), DataType::String) => None,
        (Value::Int(i), t) if !matches!(t, DataType::Bool | DataType::String) => Some(*i as f64),
        (Value::Float(f), t) if !matches!(t, DataType::Bool | DataType::String) => Some(*f),
        (v, t) => return Err(refuse(format!("{v:?} is not a {t:?}"))),
    };
    if let Some(v) = numeric {
        if !v.is_finite() {
            return Err(refuse(format!("{v} is not finite")));
        }
        if point.min.is_some_and(|lo| v < lo) || point.max.is_some_and(|hi| v > hi) {
            return Err(refuse(format!(
                "{v} outside [{}, {}]",
                point.min.map_or("-inf".into(), |x| x.to_string()),
                point.max.map_or("inf".into(), |x| x.to_string())
            )));
        }
    }
    let layout = point.register().layout();
    let raw = decode::unscaled(&command.value, &layout, point.scale, point.offset)
        .map_err(|e| refuse(e.to_string()))?;
    if point.function == Function::Coils {
        let Raw::Bool(b) = raw else {
            return Err(refuse("a coil takes a bool".into()));
        };
        return Ok(Request::WriteSingleCoil(point.address, b));
    }
    let words = decode::encode(&raw, &layout).map_err(|e| refuse(e.to_string()))?;
    Ok(match words.as_slice() {
        [w] => Request::WriteSingleRegister(point.address, *w),
        _ => Request::WriteMultipleRegisters(point.address, words.into()),
    })
}

/// Awaits futures side by side on the current task (no spawn: they borrow the plugin).
async fn join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
