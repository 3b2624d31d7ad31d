//! Local endpoint: the front door local MQTT devices meet. It owns the listeners (TLS and plain
//! TCP), the connection caps, authentication against the children registry, the per-client ACL
//! and durable ingest: an allowed PUBLISH is appended to the outbox and synced before its PUBACK.
//!
//! Files: `codec.rs` MQTT 3.1.1/5 packets (pure), `acl.rs` topic rules (pure), `auth.rs` who a
//! CONNECT is, `ca.rs` the gateway-local CA, `conn.rs` one client connection, this file the
//! listeners, caps, counters and the status/control service.
//!
//! Cloud commands for a child are delivered by its session (`conn.rs`) from the bridge's
//! downlink queue, which owns their storage.
//!
//! Must not touch: the cloud connection, the store beyond the children registry, files outside
//! `<state_dir>/local/`.

pub mod acl;
pub mod auth;
pub mod ca;
pub mod codec;
mod conn;
pub mod fleet;
pub mod router;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::children::{AddChild, Registry};
use crate::daemon::config::LocalConfig;
use crate::daemon::status::{self, LocalStatus, OutboxSummary, Request, Response};
use crate::outbox::Outbox;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error("local endpoint TLS setup: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("onboarding password file {}: {source}", path.display())]
    Onboarding {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl LocalError {
    /// A port in use may come free (a previous gatewayd still stopping); the rest needs a person.
    pub fn is_transient(&self) -> bool {
        matches!(self, LocalError::Bind { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse)
    }
}

/// Counters behind `LocalStatus`.
#[derive(Debug, Default)]
struct Counters {
    refusals: BTreeMap<String, u64>,
    acl_denials: BTreeMap<String, u64>,
    clients: BTreeMap<String, (u64, CancellationToken)>,
}

/// What every connection task shares.
pub(crate) struct Shared {
    cfg: LocalConfig,
    registry: Registry,
    outbox: Outbox,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ca_der: Vec<u8>,
    ca_pem: String,
    onboarding: Option<auth::Onboarding>,
    /// Onboarding by certificate (lowercase hex SHA-256): certificateIds, and CA fingerprints.
    onboarding_certificate_ids: Vec<String>,
    onboarding_ca_fingerprints: Vec<String>,
    child_rules: acl::Rules,
    /// `[local.clients.<id>]` rules, instead of `child_rules` for those clients.
    client_rules: BTreeMap<String, acl::Rules>,
    onboarding_rules: acl::Rules,
    /// Filters of the topics that go to the outbox (`[local] upstream`).
    upstream: Vec<String>,
    /// rumqttd: routes allowed traffic among local clients.
    router: router::LocalRouter,
    /// The local fleet-provisioning endpoint's way to the cloud (set by the daemon), and the
    /// templates devices may ask for. Off while either is missing.
    fleet_proxy: Mutex<Option<Arc<dyn fleet::Proxy>>>,
    /// Told of each device that announced itself (the provisioning queue).
    announce_hook: Mutex<Option<AnnounceHook>>,
    /// Told of each device registered through the local fleet-provisioning endpoint (child id,
    /// thing name, certificateId).
    onboarded_hook: Mutex<Option<OnboardedHook>>,
    onboarding_templates: Vec<String>,
    /// The gateway's thing name for `%g` rules, once known.
    gateway_name: Mutex<Option<String>>,
    /// Cloud commands kept on disk for children (set by the daemon): a session delivers its
    /// child's commands itself (`conn.rs`).
    downlink: Mutex<Option<crate::bridge::downlink::Downlink>>,
    /// (connections, handshakes) per source address.
    per_addr: Mutex<HashMap<IpAddr, (usize, usize)>>,
    connections: AtomicU64,
    handshakes: AtomicU64,
    accepted: AtomicU64,
    publishes: AtomicU64,
    outbox_refused: AtomicU64,
    /// Messages the router delivered to local clients.
    delivered: AtomicU64,
    session_ids: AtomicU64,
    counters: Mutex<Counters>,
    listeners: Vec<String>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn refuse(&self, reason: &str) {
        *self
            .counters()
            .refusals
            .entry(reason.to_owned())
            .or_default() += 1;
    }

    pub(crate) fn acl_denied(&self, child: &str, action: acl::Action, topic: &str) {
        tracing::warn!(
            child,
            action = action.as_str(),
            topic,
            "ACL: refused (outside this client's topics)"
        );
        *self
            .counters()
            .acl_denials
            .entry(action.as_str().to_owned())
            .or_default() += 1;
    }

    pub(crate) fn onboarded_hook(&self) -> Option<OnboardedHook> {
        self.onboarded_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn announce_hook(&self) -> Option<AnnounceHook> {
        self.announce_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The local fleet-provisioning endpoint, when it is on.
    pub(crate) fn fleet_proxy(&self) -> Option<Arc<dyn fleet::Proxy>> {
        if self.onboarding_templates.is_empty() {
            return None;
        }
        self.fleet_proxy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Certificate requests are always offered (with the endpoint on); RegisterThing only for
    /// the configured templates.
    pub(crate) fn template_offered(&self, api: &crate::cloud::fleet::FleetApi) -> bool {
        match api {
            crate::cloud::fleet::FleetApi::RegisterThing { template } => {
                self.onboarding_templates.contains(template)
            }
            _ => true,
        }
    }

    /// Whether an allowed publish on `topic` goes to the outbox.
    pub(crate) fn is_upstream(&self, topic: &str) -> bool {
        self.upstream
            .iter()
            .any(|f| crate::cloud::topic::route_matches(f, topic))
    }

    pub(crate) fn downlink(&self) -> Option<crate::bridge::downlink::Downlink> {
        self.downlink
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn gateway_name(&self) -> Option<String> {
        self.gateway_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records a connected client; an earlier session with the same client id is told to end
    /// (MQTT: the newer connection wins). Returns the session number for `disconnected`.
    pub(crate) fn connected(&self, client: &str, stop: CancellationToken) -> u64 {
        let n = self.session_ids.fetch_add(1, Ordering::Relaxed);
        self.accepted.fetch_add(1, Ordering::Relaxed);
        if let Some((_, old)) = self.counters().clients.insert(client.to_owned(), (n, stop)) {
            tracing::info!(
                child = client,
                "a new connection with this client id replaces the old one"
            );
            old.cancel();
        }
        n
    }

    pub(crate) fn disconnected(&self, client: &str, session: u64) {
        let mut c = self.counters();
        if c.clients.get(client).is_some_and(|(n, _)| *n == session) {
            c.clients.remove(client);
        }
    }

    /// Takes a connection slot and a handshake slot for `ip`, or names the cap that refused.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
        let mut map = self.per_addr.lock().unwrap_or_else(|e| e.into_inner());
        let e = map.entry(ip).or_default();
        if self.connections.load(Ordering::Relaxed) >= self.cfg.max_connections as u64 {
            return Err("max_connections");
        }
        if e.0 >= self.cfg.max_connections_per_address {
            return Err("max_connections_per_address");
        }
        if self.handshakes.load(Ordering::Relaxed) >= self.cfg.max_handshakes as u64 {
            return Err("max_handshakes");
        }
        if e.1 >= self.cfg.max_handshakes_per_address {
            return Err("max_handshakes_per_address");
        }
        e.0 += 1;
        e.1 += 1;
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            shared: self.clone(),
            ip,
            handshaking: true,
        })
    }
}

/// A connection's place under the caps; given back when dropped.
pub(crate) struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
    handshaking: bool,
}

impl Slot {
    /// The client is authenticated: it no longer counts against the handshake caps.
    pub(crate) fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.shared.handshakes.fetch_sub(1, Ordering::Relaxed);
            let mut map = self
                .shared
                .per_addr
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(e) = map.get_mut(&self.ip) {
                e.1 -= 1;
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.handshake_done();
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        let mut map = self
            .shared
            .per_addr
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get_mut(&self.ip) {
            e.0 -= 1;
            if *e == (0, 0) {
                map.remove(&self.ip);
            }
        }
    }
}

pub use conn::Announced;
pub type AnnounceHook = Arc<dyn Fn(Announced) + Send + Sync>;
pub type OnboardedHook = Arc<dyn Fn(&str, &str, &str) + Send + Sync>;

fn fingerprints(list: &[String]) -> Vec<String> {
    list.iter()
        .filter_map(|f| crate::daemon::config::fingerprint(f))
        .collect()
}

/// The running endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    shared: Arc<Shared>,
    tls_addrs: Vec<SocketAddr>,
    tcp_addrs: Vec<SocketAddr>,
}

fn tls_config(local_ca: &ca::LocalCa) -> Result<Arc<rustls::ServerConfig>, LocalError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(local_ca.server_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| LocalError::Tls(format!("server certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(local_ca.server_key_pem.as_bytes())
        .map_err(|e| LocalError::Tls(format!("server key: {e}")))?;
    let verifier = Arc::new(conn::OptionalClientCert {
        algs: provider.signature_verification_algorithms,
    });
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| LocalError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| LocalError::Tls(format!("server certificate/key: {e}")))?;
    Ok(Arc::new(cfg))
}

impl Endpoint {
    /// Creates the local CA if needed, binds every listener (so READY means they are bound) and
    /// spawns the accept loops on `tracker`.
    pub async fn start(
        cfg: &LocalConfig,
        state_dir: &Path,
        registry: Registry,
        outbox: Outbox,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Endpoint, LocalError> {
        let operator = cfg.cert.as_deref().zip(cfg.key.as_deref());
        let local_ca = ca::LocalCa::load_or_create(state_dir, &cfg.server_names, operator)?;
        let tls = if cfg.tls_listen.is_empty() {
            None
        } else {
            Some(tokio_rustls::TlsAcceptor::from(tls_config(&local_ca)?))
        };
        let onboarding = match (&cfg.onboarding_username, &cfg.onboarding_password_file) {
            (Some(u), Some(p)) => {
                let text = std::fs::read_to_string(p).map_err(|source| LocalError::Onboarding {
                    path: p.clone(),
                    source,
                })?;
                Some(auth::Onboarding {
                    username: u.clone(),
                    password: text.trim_end_matches(['\n', '\r']).as_bytes().to_vec(),
                })
            }
            _ => None,
        };
        let mut bound = Vec::new();
        for (addrs, is_tls) in [(&cfg.tls_listen, true), (&cfg.tcp_listen, false)] {
            for a in addrs {
                let l = TcpListener::bind(a)
                    .await
                    .map_err(|source| LocalError::Bind { addr: *a, source })?;
                let local = l
                    .local_addr()
                    .map_err(|source| LocalError::Bind { addr: *a, source })?;
                bound.push((l, local, is_tls));
            }
        }
        let listeners = bound
            .iter()
            .map(|(_, a, t)| format!("{}://{a}", if *t { "mqtts" } else { "mqtt" }))
            .collect();
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            registry,
            outbox,
            tls,
            ca_der: local_ca.cert_der.clone(),
            ca_pem: local_ca.cert_pem.clone(),
            onboarding,
            onboarding_certificate_ids: fingerprints(&cfg.onboarding_certificate_ids),
            onboarding_ca_fingerprints: fingerprints(&cfg.onboarding_ca_fingerprints),
            child_rules: acl::Rules {
                publish: cfg.publish.clone(),
                subscribe: cfg.subscribe.clone(),
            },
            client_rules: cfg
                .clients
                .iter()
                .map(|(id, r)| {
                    let rules = acl::Rules {
                        publish: r.publish.clone().unwrap_or_else(|| cfg.publish.clone()),
                        subscribe: r.subscribe.clone().unwrap_or_else(|| cfg.subscribe.clone()),
                    };
                    (id.clone(), rules)
                })
                .collect(),
            onboarding_rules: acl::Rules {
                publish: cfg.onboarding_publish.clone(),
                subscribe: cfg.onboarding_subscribe.clone(),
            },
            upstream: cfg.upstream.clone(),
            router: router::LocalRouter::start(cfg.max_connections),
            fleet_proxy: Mutex::new(None),
            announce_hook: Mutex::new(None),
            onboarded_hook: Mutex::new(None),
            onboarding_templates: cfg.onboarding_templates.clone(),
            gateway_name: Mutex::new(None),
            downlink: Mutex::new(None),
            per_addr: Mutex::new(HashMap::new()),
            connections: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            publishes: AtomicU64::new(0),
            outbox_refused: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            session_ids: AtomicU64::new(0),
            counters: Mutex::new(Counters::default()),
            listeners,
        });
        let mut ep = Endpoint {
            shared: shared.clone(),
            tls_addrs: Vec::new(),
            tcp_addrs: Vec::new(),
        };
        for (l, addr, is_tls) in bound {
            if is_tls {
                ep.tls_addrs.push(addr);
            } else {
                ep.tcp_addrs.push(addr);
            }
            tracing::info!(%addr, tls = is_tls, "local MQTT endpoint listening");
            tracker.spawn(accept_loop(
                l,
                is_tls,
                shared.clone(),
                cancel.clone(),
                tracker.clone(),
            ));
        }
        Ok(ep)
    }

    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_addrs
    }

    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    pub fn ca_pem(&self) -> &str {
        &self.shared.ca_pem
    }

    /// Hands each device that announced itself on `onboarding/<id>/announce` (and was registered
    /// with a password) to `hook`, e.g. the provisioning queue.
    pub fn set_announce_hook(&self, hook: AnnounceHook) {
        *self
            .shared
            .announce_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Hands each device registered through the local fleet-provisioning endpoint to `hook`
    /// (child id, thing name, certificateId), e.g. to record it as a provisioned child.
    pub fn set_onboarded_hook(&self, hook: OnboardedHook) {
        *self
            .shared
            .onboarded_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Turns on the local fleet-provisioning endpoint (with `[local] onboarding_templates`).
    pub fn set_fleet_proxy(&self, proxy: Arc<dyn fleet::Proxy>) {
        *self
            .shared
            .fleet_proxy
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(proxy);
    }

    /// A router link for the gateway itself (telemetry and commands of plugin children): it
    /// bypasses the ACL, which is for clients. `name` keeps links apart. A client's link is
    /// `<client id>.<session number>`, numbers counting up from 0; this one is
    /// `~gatewayd~<name>.<u64::MAX>` (`~` is outside a child id's alphabet; rumqttd refuses
    /// `+$#/` in link ids). Blocks on the router's answer, so async callers use `spawn_blocking`.
    pub fn internal_link(
        &self,
        name: &str,
    ) -> Result<(router::LinkSender, router::LinkReceiver), String> {
        self.shared
            .router
            .link(&format!("~gatewayd~{name}"), u64::MAX)
    }

    /// Cloud commands for children: each child's session delivers its own from this queue.
    pub fn set_downlink(&self, queue: crate::bridge::downlink::Downlink) {
        *self
            .shared
            .downlink
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(queue);
    }

    /// The gateway's thing name for `%g` rules (set when the identity becomes active).
    pub fn set_gateway_name(&self, name: Option<String>) {
        *self
            .shared
            .gateway_name
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = name;
    }
}

async fn accept_loop(
    l: TcpListener,
    is_tls: bool,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = l.accept() => match r {
                Ok(x) => x,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "local endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = match shared.admit(peer.ip()) {
            Ok(s) => s,
            Err(cap) => {
                shared.refuse(cap);
                tracing::debug!(%peer, cap, "connection refused at a cap");
                drop(stream);
                continue;
            }
        };
        let shared = shared.clone();
        let cancel = cancel.child_token();
        tracker.spawn(conn::serve(shared, stream, peer, is_tls, slot, cancel));
    }
}

impl status::LocalService for Endpoint {
    fn status(&self) -> LocalStatus {
        let s = &self.shared;
        let ob = s.outbox.stats();
        let c = s.counters();
        LocalStatus {
            listeners: s.listeners.clone(),
            clients: c.clients.keys().cloned().collect(),
            accepted: s.accepted.load(Ordering::Relaxed),
            refusals: c.refusals.clone(),
            acl_denials: c.acl_denials.clone(),
            publishes: s.publishes.load(Ordering::Relaxed),
            outbox_refused: s.outbox_refused.load(Ordering::Relaxed),
            delivered: s.delivered.load(Ordering::Relaxed),
            outbox: Some(OutboxSummary {
                entries: ob.entries,
                bytes: ob.bytes,
                disk_bytes: ob.disk_bytes,
                in_flight: ob.in_flight,
                oldest_age_ms: ob.oldest_age_ms,
                per_child: ob
                    .per_child
                    .iter()
                    .map(|(k, v)| (k.clone(), v.entries))
                    .collect(),
                drops_age: ob.drops.age,
                drops_overflow: ob.drops.overflow,
                drops_corrupt: ob.drops.corrupt,
                refused: ob.refused,
                appended: ob.appended,
                syncs: ob.syncs,
            }),
        }
    }

    fn control(&self, req: &Request) -> Response {
        let ok = |message: Option<String>, data: Option<serde_json::Value>| Response {
            ok: true,
            status: None,
            message,
            data,
        };
        let fail = |m: String| Response {
            ok: false,
            status: None,
            message: Some(m),
            data: None,
        };
        let reg = &self.shared.registry;
        match req {
            Request::ChildrenAdd(add) => {
                add_child(reg, add).map_or_else(fail, |m| ok(Some(m), None))
            }
            Request::ChildrenRemove { id } => match reg.remove(id) {
                Ok(()) => {
                    // A connected session of a removed child ends now.
                    if let Some((_, stop)) = self.shared.counters().clients.get(id) {
                        stop.cancel();
                    }
                    ok(Some(format!("child `{id}` removed")), None)
                }
                Err(e) => fail(e.to_string()),
            },
            Request::ChildrenList => ok(None, serde_json::to_value(reg.list()).ok()),
            Request::LocalCa => ok(Some(self.shared.ca_pem.clone()), None),
            Request::Outbox => ok(None, serde_json::to_value(self.status().outbox).ok()),
            _ => fail("not a local-endpoint request".into()),
        }
    }
}

fn add_child(reg: &Registry, add: &AddChild) -> Result<String, String> {
    let pw = reg.add(add).map_err(|e| e.to_string())?;
    let mut m = format!("child `{}` registered", add.id);
    if let Some(c) = &add.certificate_id {
        m.push_str(&format!("; certificateId {c} pinned"));
    }
    if let Some(p) = pw {
        m.push_str(&format!(
            "\npassword (shown once; username = client id = `{}`): {p}",
            add.id
        ));
    }
    Ok(m)
}
