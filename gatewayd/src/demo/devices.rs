//! Simulated MQTT devices: rumqttc clients in this process that meet the gateway's local endpoint
//! over TLS (its local CA as trust anchor) the way the README's "Connect local devices" says a
//! constrained device does: with the onboarding credential they announce themselves on
//! `onboarding/<id>/announce`, receive their own password on `onboarding/<id>/credential`, then
//! connect as themselves, subscribe to `cmd/<id>/#` and publish telemetry on
//! `dt/<id>/telemetry` every second. A command from the cloud is answered on
//! `dt/<id>/cmd-result` (`{"id", "ok", "command"}`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub const VENDOR: &str = "Demo Sensors";
pub const MODEL: &str = "TH-1";

/// One simulated device and what it did.
#[derive(Debug)]
pub struct Device {
    pub id: String,
    pub serial: String,
    index: usize,
    /// Telemetry messages the gateway acknowledged (PUBACK).
    pub acked: AtomicU64,
    /// Commands received on `cmd/<id>/#`.
    pub commands: AtomicU64,
    /// 0 onboarding, 1 connected with its own credential.
    pub stage: AtomicU64,
}

/// Where the device connects: the gateway's local TLS listener and its CA.
#[derive(Clone)]
pub struct Endpoint {
    pub port: u16,
    pub tls: Arc<rustls::ClientConfig>,
    pub onboarding_user: String,
    pub onboarding_password: String,
    /// Where a device keeps the credential it was given (so a `--dir` demo run again finds it).
    pub keep: PathBuf,
}

impl Device {
    pub fn new(index: usize) -> Device {
        Device {
            id: format!("sensor-{}", index + 1),
            serial: format!("TH-{}", 2001 + index),
            index,
            acked: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            stage: AtomicU64::new(0),
        }
    }

    /// A reading at `secs` seconds: a room's temperature and humidity, drifting slowly.
    pub fn reading_at(&self, secs: f64, seq: u64) -> serde_json::Value {
        let phase = self.index as f64;
        let t = 21.0 + (self.index % 4) as f64 + 1.5 * (secs / 13.0 + phase).sin();
        let h = 45.0 + 8.0 * (secs / 17.0 + 2.0 * phase).sin();
        json!({
            "temperature": (t * 100.0).round() / 100.0,
            "humidity": (h * 10.0).round() / 10.0,
            "seq": seq,
        })
    }

    fn options(&self, ep: &Endpoint, user: &str, password: &str) -> MqttOptions {
        let mut o = MqttOptions::new(self.id.clone(), "localhost", ep.port);
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(ep.tls.clone())));
        o.set_credentials(user, password);
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Onboards (or takes the kept credential), then publishes until `cancel`.
    pub async fn run(self: Arc<Self>, ep: Endpoint, cancel: CancellationToken) {
        let password = loop {
            match self.credential(&ep, &cancel).await {
                Ok(p) => break p,
                Err(error) => {
                    tracing::warn!(device = %self.id, %error, "demo device: onboarding failed; trying again");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        };
        self.stage.store(1, Ordering::Relaxed);
        self.publish(&ep, &password, &cancel).await;
    }

    async fn credential(&self, ep: &Endpoint, cancel: &CancellationToken) -> Result<String> {
        let kept = ep.keep.join(format!("{}.password", self.id));
        if let Ok(p) = std::fs::read_to_string(&kept) {
            return Ok(p.trim().to_owned());
        }
        let opts = self.options(ep, &ep.onboarding_user, &ep.onboarding_password);
        let (client, mut events) = AsyncClient::new(opts, 16);
        let answer = format!("onboarding/{}/credential", self.id);
        let rejected = format!("onboarding/{}/rejected", self.id);
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut announced = false;
        let password = loop {
            let ev = tokio::select! {
                _ = cancel.cancelled() => bail!("stopped"),
                _ = tokio::time::sleep_until(deadline.into()) => bail!("no credential within 15 s"),
                ev = events.poll() => ev?,
            };
            match ev {
                Event::Incoming(Incoming::ConnAck(_)) => {
                    // One SUBSCRIBE for both answers, then one announcement: a device announces
                    // itself once.
                    client.try_subscribe_many(
                        [&answer, &rejected]
                            .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)),
                    )?;
                }
                Event::Incoming(Incoming::SubAck(_)) if !announced => {
                    announced = true;
                    let me = json!({"serial": self.serial, "model": MODEL, "vendor": VENDOR});
                    client.try_publish(
                        format!("onboarding/{}/announce", self.id),
                        QoS::AtLeastOnce,
                        false,
                        me.to_string(),
                    )?;
                }
                Event::Incoming(Incoming::Publish(p)) if p.topic == answer => {
                    let v: serde_json::Value = serde_json::from_slice(&p.payload)?;
                    break v["password"]
                        .as_str()
                        .ok_or_else(|| anyhow!("credential without a password"))?
                        .to_owned();
                }
                Event::Incoming(Incoming::Publish(p)) if p.topic == rejected => {
                    bail!("refused: {}", String::from_utf8_lossy(&p.payload));
                }
                _ => {}
            }
        };
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(300), events.poll()).await;
        std::fs::create_dir_all(&ep.keep)?;
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&kept)?;
            writeln!(f, "{password}")?;
        }
        Ok(password)
    }

    async fn publish(&self, ep: &Endpoint, password: &str, cancel: &CancellationToken) {
        let (client, mut events) = AsyncClient::new(self.options(ep, &self.id, password), 64);
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut seq = 0;
        let mut connected = false;
        let topic = format!("dt/{}/telemetry", self.id);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick(), if connected => {
                    seq += 1;
                    let reading = self.reading_at(started.elapsed().as_secs_f64(), seq);
                    let _ = client.try_publish(&topic, QoS::AtLeastOnce, false, reading.to_string());
                }
                ev = events.poll() => match ev {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        connected = true;
                        let _ = client.try_subscribe(format!("cmd/{}/#", self.id), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        self.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        // A command from the cloud: carried out (a sensor's LED) and answered.
                        self.commands.fetch_add(1, Ordering::Relaxed);
                        let id = serde_json::from_slice::<serde_json::Value>(&p.payload)
                            .ok()
                            .and_then(|v| v.get("id").cloned())
                            .unwrap_or(serde_json::Value::Null);
                        let result = json!({ "id": id, "ok": true, "command": p.topic });
                        let _ = client.try_publish(
                            format!("dt/{}/cmd-result", self.id),
                            QoS::AtLeastOnce,
                            false,
                            result.to_string(),
                        );
                    }
                    Ok(_) => {}
                    Err(error) => {
                        connected = false;
                        tracing::debug!(device = %self.id, %error, "demo device: connection lost; reconnecting");
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                },
            }
        }
        if connected {
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(300), events.poll()).await;
        }
    }
}
