//! The demo's cloud: iotcore-sim served in this process (its own code, driven through its public
//! API only), set up as the README tells an operator to set up AWS IoT (the README's gateway and
//! child templates, taken from the README itself so the demo cannot drift from the docs), and a
//! "cloud application" subscribed to `gw/#` with a certificate of its own, counting what arrives
//! per child thing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use iotcore_sim::{admin, broker, control};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The gateway's provisioning template, as the README names it.
pub const GATEWAY_TEMPLATE: &str = "GatewayTemplate";
/// The children's template, as the README's gateway policy names it.
pub const CHILD_TEMPLATE: &str = "ChildTemplate";

/// A cloud application may read every gateway's upstream topics (and connect as `app-*`).
const APP_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[
  {"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:*:*:client/app-*"},
  {"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:*:*:topic/cmd/*"},
  {"Effect":"Allow","Action":"iot:Subscribe","Resource":"arn:aws:iot:*:*:topicfilter/gw/*"},
  {"Effect":"Allow","Action":"iot:Receive","Resource":"arn:aws:iot:*:*:topic/gw/*"}]}"#;

/// The JSON block of the README after `marker` (the same blocks gatewayd's tests load).
pub fn readme_block(marker: &str) -> Result<&'static str> {
    let readme = include_str!("../../../README.md");
    let block = &readme[readme
        .find(marker)
        .ok_or_else(|| anyhow!("README block {marker} missing"))?..];
    let body = &block[block
        .find("```json")
        .ok_or_else(|| anyhow!("README block {marker} has no json fence"))?
        + 7..];
    Ok(&body[..body
        .find("```")
        .ok_or_else(|| anyhow!("README block {marker} is not closed"))?])
}

/// The emulator directory's credentials.
pub struct Emulator {
    pub root_ca: PathBuf,
    pub claim_cert: PathBuf,
    pub claim_key: PathBuf,
    pub app_cert: PathBuf,
    pub app_key: PathBuf,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<Result<()>>,
}

/// Creates the emulator in `dir` (unless it is there from an earlier run with `--dir`): CA,
/// claim, the README's templates, the application's policy and certificate.
fn prepare(dir: &Path) -> Result<()> {
    if dir.join("registry.json").exists() {
        return Ok(());
    }
    admin::init(dir).context("creating the emulator")?;
    let store = admin::open(dir)?;
    for (name, marker) in [
        (GATEWAY_TEMPLATE, "<!-- gateway-template"),
        (CHILD_TEMPLATE, "<!-- child-template"),
    ] {
        admin::add_template(&store, name, readme_block(marker)?, None, true)
            .with_context(|| format!("template {name}"))?;
    }
    admin::add_policy(&store, "AppPolicy", APP_POLICY)?;
    admin::create_keys_and_certificate(dir, &dir.join("app"), Some("AppPolicy"), None)?;
    Ok(())
}

/// Serves the emulator of `dir` on a free loopback port until `cancel`.
pub async fn start(dir: &Path, cancel: CancellationToken) -> Result<Emulator> {
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || prepare(&d)).await??;
    let dir = dir.canonicalize()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let opts = broker::ServeOptions {
        token_ttl: Duration::from_secs(3600),
        hook_timeout: Duration::from_secs(5),
        limits: control::Limits::default(),
    };
    let d = dir.clone();
    let task = tokio::spawn(async move {
        let ready = move |addr| {
            let _ = tx.send(addr);
            Ok(())
        };
        broker::serve(&d, "127.0.0.1:0", opts, ready, cancel.cancelled_owned()).await
    });
    let addr = match rx.await {
        Ok(a) => a,
        Err(_) => {
            return Err(match task.await {
                Ok(Err(e)) => e.context("the emulator did not start"),
                _ => anyhow!("the emulator did not start"),
            });
        }
    };
    Ok(Emulator {
        root_ca: dir.join("root-ca.pem"),
        claim_cert: dir.join("claim.pem"),
        claim_key: dir.join("claim.key"),
        app_cert: dir.join("app.pem"),
        app_key: dir.join("app.key"),
        addr,
        task,
    })
}

impl Emulator {
    /// Waits for the emulator to stop (after its cancel token fired).
    pub async fn stopped(self) -> Result<()> {
        self.task.await?
    }
}

/// What the cloud application received for one thing.
#[derive(Debug, Clone, Default)]
pub struct Received {
    /// Telemetry messages (anything but command results).
    pub count: u64,
    pub last: Value,
    /// Commands the application sent this thing, and results that came back.
    pub commands: u64,
    pub answered: u64,
    /// When the first message arrived.
    pub first: Option<Instant>,
}

/// What the cloud application saw, shared with the status view.
#[derive(Debug, Default)]
pub struct Inbox {
    pub things: BTreeMap<String, Received>,
    /// The gateway's thing name, from the first bridged topic.
    pub gateway: Option<String>,
    pub first_at: Option<Instant>,
    pub connected: bool,
}

pub type SharedInbox = Arc<Mutex<Inbox>>;

/// A TLS client configuration with `ca` as the only trust anchor and, optionally, a client
/// certificate.
pub fn tls(ca: &[u8], client: Option<(&[u8], &[u8])>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(Arc::new(match client {
        Some((cert, key)) => b.with_client_auth_cert(
            CertificateDer::pem_slice_iter(cert).collect::<Result<_, _>>()?,
            PrivateKeyDer::from_pem_slice(key)?,
        )?,
        None => b.with_no_client_auth(),
    }))
}

/// The thing a bridged topic `gw/<gateway>/<thing>/<suffix>` belongs to.
fn thing_of(topic: &str) -> Option<&str> {
    let mut parts = topic.split('/');
    (parts.next() == Some("gw")).then_some(())?;
    parts.next()?;
    let thing = parts.next().filter(|t| !t.is_empty())?;
    parts.next().map(|_| thing)
}

/// How often the application sends each sensor a command.
const COMMAND_EVERY: Duration = Duration::from_secs(3);

/// Sends every sensor thing that has published telemetry a command through the gateway:
/// `cmd/<gateway>/<thing>/led` with `{"id": "demo-N", "on": ..}`; the sensor answers on
/// `dt/<id>/cmd-result`, which the gateway bridges up as `gw/<gateway>/<thing>/cmd-result`.
fn send_commands(client: &AsyncClient, inbox: &SharedInbox, sent: &mut u64) {
    let mut i = inbox.lock().unwrap_or_else(|p| p.into_inner());
    let Some(gateway) = i.gateway.clone() else {
        return;
    };
    for (thing, r) in i.things.iter_mut() {
        // Sensors report a temperature; meters have no command to take here.
        if r.count == 0 || r.last.get("temperature").is_none() {
            continue;
        }
        *sent += 1;
        let body = serde_json::json!({ "id": format!("demo-{sent}"), "on": *sent % 2 == 1 });
        let topic = format!("cmd/{gateway}/{thing}/led");
        if client
            .try_publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .is_ok()
        {
            r.commands += 1;
        }
    }
}

/// The cloud application: connects to the emulator with its own certificate, subscribes to
/// `gw/#` and records each message per thing, until `cancel`.
pub fn application(
    emu: &Emulator,
    inbox: SharedInbox,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let tls = tls(
        &std::fs::read(&emu.root_ca)?,
        Some((
            &std::fs::read(&emu.app_cert)?,
            &std::fs::read(&emu.app_key)?,
        )),
    )?;
    let mut opts = MqttOptions::new("app-demo", "localhost", emu.addr.port());
    opts.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 64);
    let mut commands = tokio::time::interval(COMMAND_EVERY);
    let mut sent = 0u64;
    Ok(tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = commands.tick() => {
                    send_commands(&client, &inbox, &mut sent);
                    continue;
                }
                ev = events.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    inbox.lock().unwrap_or_else(|p| p.into_inner()).connected = true;
                    let _ = client.try_subscribe("gw/#", QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let Some(thing) = thing_of(&p.topic) else {
                        continue;
                    };
                    if p.topic.ends_with("/cmd-result") {
                        let mut i = inbox.lock().unwrap_or_else(|p| p.into_inner());
                        i.things.entry(thing.to_owned()).or_default().answered += 1;
                        continue;
                    }
                    let last = serde_json::from_slice(&p.payload).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&p.payload).into_owned())
                    });
                    let mut i = inbox.lock().unwrap_or_else(|p| p.into_inner());
                    if i.gateway.is_none() {
                        i.gateway = p.topic.split('/').nth(1).map(str::to_owned);
                    }
                    i.first_at.get_or_insert_with(Instant::now);
                    let r = i.things.entry(thing.to_owned()).or_default();
                    r.first.get_or_insert_with(Instant::now);
                    r.count += 1;
                    r.last = last;
                }
                Ok(_) => {}
                Err(error) => {
                    inbox.lock().unwrap_or_else(|p| p.into_inner()).connected = false;
                    tracing::debug!(%error, "demo cloud application: connection lost; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let _ = client.try_disconnect();
        // Let the DISCONNECT go out.
        let _ = tokio::time::timeout(Duration::from_millis(500), events.poll()).await;
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn readme_templates_are_found() {
        assert!(
            readme_block("<!-- gateway-template")
                .unwrap()
                .contains("gw-")
        );
        assert!(
            readme_block("<!-- child-template")
                .unwrap()
                .contains("ParentThing")
        );
    }

    #[test]
    fn bridged_topics_name_their_thing() {
        assert_eq!(thing_of("gw/gw-1/gw-1-SN/telemetry"), Some("gw-1-SN"));
        assert_eq!(thing_of("gw/gw-1/events"), None);
        assert_eq!(thing_of("cmd/x/y"), None);
    }
}
