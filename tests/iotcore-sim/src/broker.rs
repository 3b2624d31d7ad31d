//! The MQTT-over-mTLS front of the emulator: TLS with a required client certificate, a client is
//! its certificate, IoT policies on connect/publish/subscribe/receive, sessions, routing, and the
//! hand-off of fleet-provisioning requests to [`crate::provisioning`].
//!
//! Owns: sockets, connection tasks, subscriptions, persistent sessions, retained messages.
//! Must not touch registry files directly: it reads and changes them through [`Store`].

use crate::control::{Bucket, Control};
use crate::mqtt::{
    self, CodecError, Encoder, Framed, Packet, PropValue, Properties, Publish, Version, prop,
};
use crate::policy::{self, PolicyDocument, RequestContext};
use crate::provisioning::{self, Caller, Provisioner};
use crate::registry::{ACCOUNT, CertStatus, REGION, Store};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// AWS IoT Core limits (historical defaults; see the research notes in the README).
pub const MAX_PAYLOAD: usize = 128 * 1024;
pub const MAX_TOPIC_BYTES: usize = 256;
pub const MAX_TOPIC_SLASHES: usize = 7;
pub const MAX_CLIENT_ID_BYTES: usize = 128;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const OUTBOUND_QUEUE: usize = 1_000;
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_RETAINED: usize = 10_000;
/// AWS resends stored messages of a resumed session at 10 per second.
const BACKLOG_INTERVAL: Duration = Duration::from_millis(100);
/// AWS keeps at most 100 unacknowledged QoS 1 messages towards a client.
const MAX_INFLIGHT: usize = 100;
const SESSION_QUEUE: usize = 1_000;
const MAX_SESSION_EXPIRY: Duration = Duration::from_secs(3600);

pub struct ServeOptions {
    pub token_ttl: Duration,
    pub hook_timeout: Duration,
    pub limits: crate::control::Limits,
}

/// How often the registry file is checked for changes made by other processes.
const REGISTRY_POLL: Duration = Duration::from_millis(250);

/// Serve the emulator of `dir` on `listen` (port 0 allowed) until `shutdown` completes: mTLS
/// MQTT, the fleet-provisioning API and the admin socket `DIR/admin.sock`. `ready` is called with
/// the bound address once both sockets accept; then every connection is dropped on shutdown.
pub async fn serve(
    dir: &std::path::Path,
    listen: &str,
    opts: ServeOptions,
    ready: impl FnOnce(SocketAddr) -> std::io::Result<()>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let store = Arc::new(Store::open(dir)?);
    let ca = crate::pki::Ca::load_dir(dir)?;
    let cert = std::fs::read_to_string(dir.join("server.pem"))?;
    let key = std::fs::read_to_string(dir.join("server.key"))?;
    let tls = tls_config(&cert, &key).map_err(anyhow::Error::msg)?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let prov = Arc::new(Provisioner {
        store: store.clone(),
        ca,
        token_ttl: opts.token_ttl,
        hook_timeout: opts.hook_timeout,
    });
    let control = Arc::new(Control::new(opts.limits));
    let broker = Broker::new(store.clone(), prov, control);
    let admin_path = crate::control::admin_socket_path(dir);
    let _ = std::fs::remove_file(&admin_path);
    let admin_listener = tokio::net::UnixListener::bind(&admin_path)
        .with_context(|| format!("binding {}", admin_path.display()))?;
    let admin = broker.clone().admin(admin_listener);
    ready(addr)?;
    tracing::info!(%addr, "serving");
    // Registry changes (a CLI command, a RegisterThing) reach live connections.
    let watcher = {
        let broker = broker.clone();
        async move {
            let mut seen = store.generation();
            loop {
                tokio::time::sleep(REGISTRY_POLL).await;
                if let Err(e) = store.read(|_| ()) {
                    tracing::warn!(error = %e, "registry unreadable");
                    continue;
                }
                let g = store.generation();
                if g != seen {
                    seen = g;
                    broker.refresh_principals();
                }
            }
        }
    };
    tokio::select! {
        _ = broker.clone().serve(listener, tls) => {}
        _ = watcher => {}
        r = admin => r.with_context(|| format!("admin socket {}", admin_path.display()))?,
        _ = shutdown => {}
    }
    broker.kick_all();
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}

struct ConnEntry {
    principal: Principal,
    tx: mpsc::Sender<Publish>,
    /// Disconnects the connection; separate from `tx` so a full queue cannot swallow it.
    kick: Option<oneshot::Sender<(u8, &'static str)>>,
    subs: Vec<(String, u8)>,
    /// A newer connection took this client id over: route nothing more here, and on exit hand
    /// unacknowledged messages to that connection when it resumed the session.
    retired: bool,
    handoff: Option<u64>,
}

impl ConnEntry {
    /// The QoS this connection subscribed with for `topic`, if any filter matches.
    fn granted_qos(&self, topic: &str) -> Option<u8> {
        self.subs
            .iter()
            .filter(|(f, _)| mqtt::filter_matches(f, topic))
            .map(|(_, q)| *q)
            .max()
    }

    fn may_receive(&self, topic_arn: &str) -> bool {
        self.principal.allowed("iot:Receive", topic_arn)
    }

    fn kick(&mut self, code: u8, why: &'static str) {
        if let Some(k) = self.kick.take() {
            let _ = k.send((code, why));
        }
    }
}

struct Session {
    subs: Vec<(String, u8)>,
    queue: VecDeque<Publish>,
    expires: Instant,
    /// Who owned the session: messages are queued only if it may receive them.
    principal: Principal,
}

#[derive(Default)]
struct State {
    next_conn: u64,
    conns: HashMap<u64, ConnEntry>,
    by_client: HashMap<String, u64>,
    sessions: HashMap<String, Session>,
    retained: BTreeMap<String, Publish>,
}

pub struct Broker {
    store: Arc<Store>,
    prov: Arc<Provisioner>,
    state: Mutex<State>,
    pub control: Arc<Control>,
    /// Bumped whenever principals were refreshed from a changed registry.
    generation: AtomicU64,
}

fn arn(kind: &str, name: &str) -> String {
    format!("arn:aws:iot:{REGION}:{ACCOUNT}:{kind}/{name}")
}

/// The identity of a connected client as the policy engine sees it.
#[derive(Clone)]
struct Principal {
    cert_id: String,
    client_id: String,
    policies: Arc<Vec<PolicyDocument>>,
    thing_name: Option<String>,
    thing_attached: bool,
    subject: Arc<BTreeMap<String, String>>,
}

impl Principal {
    fn allowed(&self, action: &str, resource: &str) -> bool {
        let ctx = RequestContext {
            client_id: &self.client_id,
            thing_name: self.thing_name.as_deref(),
            thing_attached: self.thing_attached,
            subject: &self.subject,
        };
        policy::is_allowed(&self.policies, action, resource, &ctx)
    }
}

/// What the registry says about a principal: its policies, the thing named like its client id,
/// and whether any thing is attached.
fn registry_view(
    r: &crate::registry::Registry,
    cert_id: &str,
    client_id: &str,
) -> (Vec<PolicyDocument>, Option<String>, bool) {
    let things = r
        .certificates
        .get(cert_id)
        .map(|c| c.thing_names.clone())
        .unwrap_or_default();
    let thing_name = things.iter().find(|t| *t == client_id).cloned();
    (r.policies_of(cert_id), thing_name, !things.is_empty())
}

/// Topics only AWS itself publishes on: fleet-provisioning answers and registry events.
fn service_only_topic(t: &str) -> bool {
    (t.starts_with("$aws/certificates/")
        || t.starts_with("$aws/provisioning-templates/")
        || t.starts_with("$aws/events/"))
        && provisioning::parse_topic(t).is_none()
}

async fn write(tls: &mut Tls, bytes: &[u8]) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, tls.write_all(bytes)).await {
        Ok(r) => r.map_err(|e| format!("write: {e}")),
        Err(_) => Err(format!(
            "client read nothing for {} s (write timed out)",
            WRITE_TIMEOUT.as_secs()
        )),
    }
}

fn valid_aws_topic(t: &str) -> Result<(), &'static str> {
    if !mqtt::valid_topic(t) {
        return Err("topic is empty or contains wildcards");
    }
    if t.len() > MAX_TOPIC_BYTES {
        return Err("topic longer than 256 bytes");
    }
    let counted = t
        .strip_prefix("$aws/rules/")
        .and_then(|r| r.split_once('/').map(|(_, rest)| rest))
        .unwrap_or(t);
    if counted.matches('/').count() > MAX_TOPIC_SLASHES {
        return Err("topic has more than 7 slashes");
    }
    Ok(())
}

impl Broker {
    pub fn new(store: Arc<Store>, prov: Arc<Provisioner>, control: Arc<Control>) -> Arc<Broker> {
        Arc::new(Broker {
            store,
            prov,
            state: Mutex::new(State::default()),
            control,
            generation: AtomicU64::new(0),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accept connections until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if self.control.refusing() {
                self.control.stat(|s| s.refused_connections += 1);
                drop(sock);
                continue;
            }
            let me = self.clone();
            let acceptor = acceptor.clone();
            // The handshake runs in the connection's own task so a silent socket blocks nobody.
            tokio::spawn(async move {
                me.control.stat(|s| s.connections += 1);
                if let Err(why) = me.connection(acceptor, sock, peer).await {
                    tracing::info!(%peer, reason = %why, "connection closed");
                }
            });
        }
    }

    async fn connection(
        self: &Arc<Self>,
        acceptor: tokio_rustls::TlsAcceptor,
        sock: TcpStream,
        peer: SocketAddr,
    ) -> Result<(), String> {
        let _ = sock.set_nodelay(true);
        let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let (sni, cert_der) = {
            let (_, conn) = tls.get_ref();
            (
                conn.server_name().map(str::to_owned),
                conn.peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.as_ref().to_vec()),
            )
        };
        if sni.is_none() {
            return Err("no SNI in ClientHello (AWS IoT requires SNI)".into());
        }
        let cert_der = cert_der.ok_or("no client certificate")?;
        let cert_id = crate::pki::cert_id(&cert_der);
        if !crate::pki::cert_currently_valid(&cert_der) {
            return Err(format!(
                "certificate {cert_id} is outside its validity period"
            ));
        }
        let known = self
            .store
            .read(|r| {
                r.certificates
                    .get(&cert_id)
                    .map(|c| (c.status, c.claim_window_ms, c.ca_certificate_id.clone()))
            })
            .map_err(|e| e.to_string())?;
        let claim_window = match known {
            Some((CertStatus::Active, window, _)) => window.map(Duration::from_millis),
            Some((CertStatus::PendingActivation, _, Some(ca))) => {
                // JITR: AWS publishes the event again and drops the client until activated.
                self.publish_registered_event(&cert_id, &ca);
                return Err(format!(
                    "certificate {cert_id} is PENDING_ACTIVATION (JITR); event published, client disconnected"
                ));
            }
            Some((s, _, _)) => return Err(format!("certificate {cert_id} is {s:?}, not ACTIVE")),
            None => return Err(self.just_in_time(&cert_der, &cert_id)),
        };

        // CONNECT
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let first = tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut tls, &mut buf, None))
            .await
            .map_err(|_| "no CONNECT within 10 s".to_string())?;
        let connect = match first {
            Ok(Some(Packet::Connect(c))) => c,
            Ok(Some(p)) => return Err(format!("first packet was {}", p.name())),
            Ok(None) => return Err("closed before CONNECT".into()),
            Err(e) => {
                self.control.stat(|s| s.bad_packets += 1);
                return Err(format!("malformed CONNECT: {e}"));
            }
        };
        let enc = Encoder {
            version: connect.version,
        };
        let refuse = |code_v4: u8, code_v5: u8| match connect.version {
            Version::V311 => enc.connack(false, code_v4, &Properties::default()),
            Version::V5 => enc.connack(false, code_v5, &Properties::default()),
        };
        let mut client_id = connect.client_id.clone();
        let mut assigned = None;
        if client_id.is_empty() {
            if !connect.clean_start && connect.version == Version::V311 {
                let _ = tls.write_all(&refuse(2, 0x85)).await;
                return Err("empty client id with a persistent session".into());
            }
            client_id = format!("auto-{}", hex::encode(rand::random::<[u8; 8]>()));
            assigned = Some(client_id.clone());
        }
        if client_id.len() > MAX_CLIENT_ID_BYTES || client_id.starts_with('$') {
            let _ = tls.write_all(&refuse(2, 0x85)).await;
            return Err(format!(
                "client id {client_id:?} rejected (over 128 bytes or starts with $)"
            ));
        }
        if !self.control.connect_allowed(&client_id) {
            let _ = tls.write_all(&refuse(3, 0x9F)).await;
            return Err(format!(
                "CONNECT throttled: client id {client_id} connected less than 1 s ago"
            ));
        }
        let principal = self.principal(&cert_id, &cert_der, &client_id)?;
        if !principal.allowed("iot:Connect", &arn("client", &client_id)) {
            self.control.stat(|s| s.denied += 1);
            // AWS closes the connection; MQTT 5 clients get a reason code first.
            if connect.version == Version::V5 {
                let _ = tls.write_all(&refuse(5, 0x87)).await;
            }
            return Err(format!(
                "iot:Connect denied for client id {client_id} (certificate {cert_id})"
            ));
        }

        let keep_alive = match connect.keep_alive {
            0 => 1200,
            1..=29 => 30,
            k if k > 1200 => 1200,
            k => k,
        };
        let session_expiry = match connect.version {
            Version::V311 if !connect.clean_start => MAX_SESSION_EXPIRY,
            Version::V311 => Duration::ZERO,
            Version::V5 => Duration::from_secs(u64::from(
                connect.properties.u32(prop::SESSION_EXPIRY).unwrap_or(0),
            ))
            .min(MAX_SESSION_EXPIRY),
        };

        let (tx, mut rx) = mpsc::channel::<Publish>(OUTBOUND_QUEUE);
        let (kick_tx, mut kick_rx) = oneshot::channel();
        let (conn_id, session_present, queued) =
            self.register(connect.clean_start, tx, kick_tx, &principal);
        let mut props = Properties::default();
        if connect.version == Version::V5 {
            props.push(prop::MAXIMUM_QOS, PropValue::Byte(1));
            props.push(prop::RETAIN_AVAILABLE, PropValue::Byte(1));
            props.push(prop::RECEIVE_MAXIMUM, PropValue::U16(100));
            props.push(
                prop::MAXIMUM_PACKET_SIZE,
                PropValue::U32((MAX_PAYLOAD + 1024) as u32),
            );
            props.push(prop::SUB_ID_AVAILABLE, PropValue::Byte(0));
            props.push(prop::SHARED_SUB_AVAILABLE, PropValue::Byte(0));
            props.push(prop::WILDCARD_SUB_AVAILABLE, PropValue::Byte(1));
            if keep_alive != connect.keep_alive {
                props.push(prop::SERVER_KEEP_ALIVE, PropValue::U16(keep_alive));
            }
            if let Some(a) = &assigned {
                props.push(prop::ASSIGNED_CLIENT_ID, PropValue::Str(a.clone()));
            }
        }
        if let Err(e) = write(&mut tls, &enc.connack(session_present, 0, &props)).await {
            self.unregister(conn_id, session_expiry, queued.into_iter());
            return Err(e);
        }
        tracing::info!(%peer, client = %client_id, cert = %cert_id, version = %connect.version, session_present, "connected");

        let mut conn = Conn {
            broker: self.clone(),
            conn_id,
            client_id: client_id.clone(),
            principal,
            enc,
            version: connect.version,
            next_pkid: 0,
            inflight: BTreeMap::new(),
            backlog: queued.into(),
            generation: self.generation.load(Ordering::Acquire),
            prov_tx: None,
            claim_deadline: claim_window.map(|w| tokio::time::Instant::now() + w),
            publishes: Bucket::new(self.control.limits.publishes_per_second, Instant::now()),
            bytes: Bucket::new(self.control.limits.bytes_per_second, Instant::now()),
        };
        let idle = Duration::from_millis(u64::from(keep_alive) * 1500);
        let result = conn
            .run(&mut tls, &mut buf, &mut rx, &mut kick_rx, idle)
            .await;
        let graceful = matches!(result, Ok(true));
        let unacked = std::mem::take(&mut conn.inflight)
            .into_values()
            .chain(std::mem::take(&mut conn.backlog));
        self.unregister(conn_id, session_expiry, unacked);
        if !graceful && let Some(will) = &connect.will {
            self.publish_will(&conn.principal, will);
        }
        let _ = tls.shutdown().await;
        match result {
            Ok(_) => Err(format!("client {client_id} disconnected")),
            Err(e) => Err(format!("client {client_id}: {e}")),
        }
    }

    fn principal(&self, cert_id: &str, der: &[u8], client_id: &str) -> Result<Principal, String> {
        let (policies, thing_name, thing_attached) = self
            .store
            .read(|r| registry_view(r, cert_id, client_id))
            .map_err(|e| e.to_string())?;
        let subject = crate::pki::subject_fields(der)
            .into_iter()
            .map(|(k, v)| {
                (
                    k.trim_start_matches("AWS::IoT::Certificate::").to_owned(),
                    v,
                )
            })
            .collect();
        Ok(Principal {
            cert_id: cert_id.to_owned(),
            client_id: client_id.to_owned(),
            policies: Arc::new(policies),
            thing_name,
            thing_attached,
            subject: Arc::new(subject),
        })
    }

    /// A certificate the registry does not know: if a registered CA with auto-registration signed
    /// it, register it just in time (JITP with the CA's template, else JITR). The first connection
    /// is always dropped. Returns why the connection ends.
    fn just_in_time(&self, der: &[u8], cert_id: &str) -> String {
        use x509_parser::prelude::*;
        let not_registered = format!("certificate {cert_id} is not registered");
        let Ok((_, x)) = parse_x509_certificate(der) else {
            return not_registered;
        };
        let cas = match self.store.read(|r| {
            r.ca_certificates
                .values()
                .filter(|c| c.auto_registration)
                .cloned()
                .collect::<Vec<_>>()
        }) {
            Ok(c) => c,
            Err(e) => return e.to_string(),
        };
        let Some(ca) = cas.into_iter().find(|ca| {
            crate::pki::pem_decode(&ca.certificate_pem, "CERTIFICATE").is_some_and(|ca_der| {
                parse_x509_certificate(&ca_der).is_ok_and(|(_, cax)| {
                    x.issuer() == cax.subject()
                        && x.verify_signature(Some(cax.public_key())).is_ok()
                })
            })
        }) else {
            return not_registered;
        };
        let pem = crate::pki::pem_encode("CERTIFICATE", der);
        let Some(template_name) = ca.template_name.clone() else {
            let r = self.store.update(|r| {
                let mut c = crate::registry::Certificate::new(
                    cert_id,
                    &pem,
                    CertStatus::PendingActivation,
                    "JITR",
                );
                c.ca_certificate_id = Some(ca.certificate_id.clone());
                r.certificates.insert(cert_id.to_owned(), c);
                Ok::<_, crate::registry::StoreError>(())
            });
            if let Err(e) = r {
                return e.to_string();
            }
            self.publish_registered_event(cert_id, &ca.certificate_id);
            return format!(
                "certificate {cert_id} registered just in time (JITR) as PENDING_ACTIVATION; first connection dropped"
            );
        };
        match self.jitp(der, cert_id, &pem, &ca.certificate_id, &template_name) {
            Ok(thing) => format!(
                "certificate {cert_id} provisioned just in time (JITP, template {template_name}, thing {thing:?}); first connection dropped"
            ),
            Err(e) => format!(
                "JITP failed for certificate {cert_id} (CA {}, template {template_name}): {} {}",
                ca.certificate_id, e.code, e.message
            ),
        }
    }

    fn jitp(
        &self,
        der: &[u8],
        cert_id: &str,
        pem: &str,
        ca_id: &str,
        template_name: &str,
    ) -> Result<String, provisioning::ApiError> {
        let body = self
            .store
            .read(|r| {
                r.templates
                    .get(template_name)
                    .and_then(|t| t.default_body().map(str::to_owned))
            })?
            .ok_or_else(|| {
                provisioning::ApiError::new(
                    404,
                    "ResourceNotFoundException",
                    format!("Template {template_name} does not exist"),
                )
            })?;
        let bad = |e: crate::template::TemplateError| {
            provisioning::ApiError::new(400, e.error_code(), e.to_string())
        };
        let tpl = crate::template::Template::parse(&body).map_err(bad)?;
        let subject = crate::pki::subject_fields(der);
        let ev = tpl
            .evaluate(&crate::template::EvalInput {
                parameters: &BTreeMap::new(),
                pseudo: crate::template::PseudoParameters::Jitp {
                    certificate_id: cert_id,
                    subject: &subject,
                },
            })
            .map_err(bad)?;
        self.store.update(|r| {
            let mut c = crate::registry::Certificate::new(
                cert_id,
                pem,
                CertStatus::PendingActivation,
                "JITP",
            );
            c.ca_certificate_id = Some(ca_id.to_owned());
            r.certificates.insert(cert_id.to_owned(), c);
            provisioning::apply_resources(r, &ev, cert_id)
        })
    }

    fn publish_registered_event(&self, cert_id: &str, ca_id: &str) {
        let now = crate::registry::now_ms();
        let payload = serde_json::json!({
            "certificateId": cert_id,
            "caCertificateId": ca_id,
            "timestamp": now,
            "certificateStatus": "PENDING_ACTIVATION",
            "awsAccountId": ACCOUNT,
            "certificateRegistrationTimestamp": now.to_string(),
        });
        self.route(&Publish {
            dup: false,
            qos: 1,
            retain: false,
            topic: format!("$aws/events/certificates/registered/{ca_id}"),
            pkid: 0,
            properties: Properties::default(),
            payload: payload.to_string().into_bytes(),
        });
    }

    /// Register a connection; kicks an older one with the same client id (AWS behaviour).
    /// Returns (connection id, session present, queued messages to deliver).
    fn register(
        &self,
        clean: bool,
        tx: mpsc::Sender<Publish>,
        kick: oneshot::Sender<(u8, &'static str)>,
        p: &Principal,
    ) -> (u64, bool, Vec<Publish>) {
        let client_id = p.client_id.as_str();
        let mut st = self.state();
        st.next_conn += 1;
        let id = st.next_conn;
        let mut subs = Vec::new();
        let mut queued = Vec::new();
        let mut present = false;
        if let Some(old) = st.by_client.remove(client_id)
            && let Some(e) = st.conns.get_mut(&old)
        {
            e.kick(0x8E, "session taken over");
            e.retired = true;
            tracing::info!(
                client = client_id,
                "duplicate client id: older connection disconnected"
            );
            // A session is resumed only by the certificate that owns it, and only with the
            // subscriptions the new principal may hold.
            if !clean && e.principal.cert_id == p.cert_id {
                subs = e
                    .subs
                    .iter()
                    .filter(|(f, _)| p.allowed("iot:Subscribe", &arn("topicfilter", f)))
                    .cloned()
                    .collect();
                e.handoff = Some(id);
                present = true;
            }
        }
        if let Some(s) = st.sessions.remove(client_id)
            && !clean
            && s.expires > Instant::now()
            && s.principal.cert_id == p.cert_id
        {
            subs = s
                .subs
                .into_iter()
                .filter(|(f, _)| p.allowed("iot:Subscribe", &arn("topicfilter", f)))
                .collect();
            queued = s.queue.into_iter().collect();
            present = true;
        }
        st.conns.insert(
            id,
            ConnEntry {
                principal: p.clone(),
                tx,
                kick: Some(kick),
                subs,
                retired: false,
                handoff: None,
            },
        );
        st.by_client.insert(client_id.to_owned(), id);
        (id, present, queued)
    }

    fn unregister(&self, conn_id: u64, expiry: Duration, unacked: impl Iterator<Item = Publish>) {
        let mut st = self.state();
        let Some(entry) = st.conns.remove(&conn_id) else {
            return;
        };
        let client_id = entry.principal.client_id.clone();
        let unacked = unacked.map(|mut p| {
            p.dup = true;
            p
        });
        if st.by_client.get(&client_id) == Some(&conn_id) {
            st.by_client.remove(&client_id);
            if !expiry.is_zero() {
                st.sessions.insert(
                    client_id,
                    Session {
                        subs: entry.subs,
                        queue: unacked.take(SESSION_QUEUE).collect(),
                        expires: Instant::now() + expiry,
                        principal: entry.principal,
                    },
                );
            }
        } else if let Some(next) = entry.handoff.and_then(|h| st.conns.get(&h)) {
            // Taken over by a connection that resumed the session: it gets what was in flight.
            for p in unacked {
                if next.tx.try_send(p).is_err() {
                    self.control.stat(|s| s.dropped_messages += 1);
                }
            }
        }
        let now = Instant::now();
        st.sessions.retain(|_, s| s.expires > now);
    }

    /// Re-read every connected principal after the registry changed: AWS disconnects a client
    /// whose certificate is no longer ACTIVE, and applies policy changes to live connections.
    pub fn refresh_principals(&self) {
        let views = {
            let st = self.state();
            let ids: Vec<(u64, String, String)> = st
                .conns
                .iter()
                .map(|(id, e)| {
                    (
                        *id,
                        e.principal.cert_id.clone(),
                        e.principal.client_id.clone(),
                    )
                })
                .collect();
            drop(st);
            match self.store.read(|r| {
                ids.into_iter()
                    .map(|(id, cert, client)| {
                        let active = r
                            .certificates
                            .get(&cert)
                            .is_some_and(|c| c.status == CertStatus::Active);
                        (id, active, registry_view(r, &cert, &client))
                    })
                    .collect::<Vec<_>>()
            }) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "registry unreadable; principals not refreshed");
                    return;
                }
            }
        };
        let mut st = self.state();
        for (id, active, (policies, thing_name, thing_attached)) in views {
            let Some(e) = st.conns.get_mut(&id) else {
                continue;
            };
            if !active {
                tracing::info!(client = %e.principal.client_id, cert = %e.principal.cert_id, "certificate no longer ACTIVE: disconnecting");
                e.kick(0x87, "certificate is not active");
                continue;
            }
            e.principal.policies = Arc::new(policies);
            e.principal.thing_name = thing_name;
            e.principal.thing_attached = thing_attached;
        }
        drop(st);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The current principal of a connection (after a refresh), if it is still registered.
    fn current_principal(&self, conn_id: u64) -> Option<Principal> {
        self.state()
            .conns
            .get(&conn_id)
            .map(|e| e.principal.clone())
    }

    fn publish_will(&self, p: &Principal, will: &mqtt::Will) {
        let topic = arn("topic", &will.topic);
        if valid_aws_topic(&will.topic).is_ok()
            && !service_only_topic(&will.topic)
            && p.allowed("iot:Publish", &topic)
            && (!will.retain
                || (!will.topic.starts_with('$') && p.allowed("iot:RetainPublish", &topic)))
        {
            self.route(&Publish {
                dup: false,
                qos: will.qos.min(1),
                retain: will.retain,
                topic: will.topic.clone(),
                pkid: 0,
                properties: Properties::default(),
                payload: will.payload.clone(),
            });
        }
    }

    /// Deliver a message to every subscriber allowed to receive it, and to offline persistent
    /// sessions (QoS 1 only).
    fn route(&self, p: &Publish) {
        let mut st = self.state();
        if p.retain {
            if p.payload.is_empty() {
                st.retained.remove(&p.topic);
            } else if st.retained.len() < MAX_RETAINED || st.retained.contains_key(&p.topic) {
                st.retained.insert(p.topic.clone(), p.clone());
            } else {
                self.control.stat(|s| s.dropped_messages += 1);
            }
        }
        let resource = arn("topic", &p.topic);
        for e in st.conns.values().filter(|e| !e.retired) {
            let Some(qos) = e.granted_qos(&p.topic) else {
                continue;
            };
            if !e.may_receive(&resource) {
                continue;
            }
            let mut out = p.clone();
            out.qos = p.qos.min(qos);
            out.retain = false;
            out.dup = false;
            out.properties = forwardable(&p.properties);
            if e.tx.try_send(out).is_err() {
                self.control.stat(|s| s.dropped_messages += 1);
            }
        }
        if p.qos == 1 {
            for s in st.sessions.values_mut() {
                if s.subs
                    .iter()
                    .any(|(f, q)| *q >= 1 && mqtt::filter_matches(f, &p.topic))
                    && s.principal.allowed("iot:Receive", &resource)
                {
                    if s.queue.len() >= SESSION_QUEUE {
                        s.queue.pop_front();
                        self.control.stat(|s| s.dropped_messages += 1);
                    }
                    let mut out = p.clone();
                    out.retain = false;
                    s.queue.push_back(out);
                }
            }
        }
    }

    /// Send a fleet-provisioning reply to the requesting connection only, if it is subscribed.
    fn reply_to(&self, conn_id: u64, topic: &str, payload: Vec<u8>) {
        let st = self.state();
        let Some(e) = st.conns.get(&conn_id) else {
            return;
        };
        let Some(qos) = e.granted_qos(topic) else {
            tracing::info!(client = %e.principal.client_id, topic, "reply dropped: requester is not subscribed");
            return;
        };
        if !e.may_receive(&arn("topic", topic)) {
            tracing::info!(client = %e.principal.client_id, topic, "reply dropped: iot:Receive denied");
            return;
        }
        let _ = e.tx.try_send(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.to_owned(),
            pkid: 0,
            properties: Properties::default(),
            payload,
        });
    }

    /// Serve the admin socket: one JSON command per line, one JSON answer per line.
    pub async fn admin(self: Arc<Self>, listener: tokio::net::UnixListener) -> std::io::Result<()> {
        use tokio::io::{AsyncBufReadExt, BufReader};
        loop {
            let (sock, _) = listener.accept().await?;
            let me = self.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let answer = match serde_json::from_str::<serde_json::Value>(&line) {
                        Err(e) => serde_json::json!({"error": format!("request is not JSON: {e}")}),
                        Ok(req) => match me.admin_command(&req) {
                            Ok(v) => v,
                            Err(e) => serde_json::json!({"error": e}),
                        },
                    };
                    let mut out = answer.to_string();
                    out.push('\n');
                    if w.write_all(out.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    }

    fn admin_command(&self, req: &serde_json::Value) -> Result<serde_json::Value, String> {
        match req.get("cmd").and_then(serde_json::Value::as_str) {
            Some("drop-all") => {
                let n = self.state().conns.len();
                self.kick_all();
                tracing::info!(connections = n, "fault: dropped every connection");
                Ok(serde_json::json!({"ok": true, "dropped": n}))
            }
            Some("counters") => {
                let mut v =
                    serde_json::to_value(self.control.stats()).map_err(|e| e.to_string())?;
                let orphaned = self
                    .store
                    .read(|r| r.orphaned_certificates.clone())
                    .map_err(|e| e.to_string())?;
                v["orphaned_certificates"] = serde_json::json!(orphaned);
                v["connected_clients"] =
                    serde_json::json!(self.state().by_client.keys().cloned().collect::<Vec<_>>());
                Ok(v)
            }
            _ => {
                let v = self.control.command(req)?;
                tracing::info!(request = %req, "fault/admin command applied");
                Ok(v)
            }
        }
    }

    /// Drop every connection now (used by tests and fault injection).
    pub fn kick_all(&self) {
        let mut st = self.state();
        for e in st.conns.values_mut() {
            e.kick(0x88, "server unavailable");
        }
    }
}

/// Properties a broker forwards with an application message (MQTT 5 §3.3.2.3).
fn forwardable(p: &Properties) -> Properties {
    Properties(
        p.0.iter()
            .filter(|(id, _)| {
                matches!(
                    *id,
                    prop::PAYLOAD_FORMAT
                        | prop::MESSAGE_EXPIRY
                        | prop::CONTENT_TYPE
                        | prop::RESPONSE_TOPIC
                        | prop::CORRELATION_DATA
                        | prop::USER_PROPERTY
                )
            })
            .cloned()
            .collect(),
    )
}

type Tls = tokio_rustls::server::TlsStream<TcpStream>;

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Read one packet; Ok(None) on a clean EOF between packets.
async fn read_packet(
    tls: &mut Tls,
    buf: &mut Vec<u8>,
    version: Option<Version>,
) -> Result<Option<Packet>, CodecError> {
    loop {
        // Refuse a first packet that is not CONNECT, or a CONNECT with reserved flags set
        // ([MQTT-2.2.2-2]), as soon as its first byte arrives: not after waiting for the rest of
        // a length that may never come.
        if version.is_none()
            && let Some(&b) = buf.first()
        {
            if b >> 4 != 1 {
                return Err(CodecError::NotConnect("another packet"));
            }
            if b & 0x0f != 0 {
                return Err(CodecError::BadFlags {
                    packet: "CONNECT",
                    flags: b & 0x0f,
                });
            }
        }
        if let Some(p) = take_packet(buf, version)? {
            return Ok(Some(p));
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = tls
            .read(&mut chunk)
            .await
            .map_err(|_| CodecError::Truncated {
                packet: "stream",
                field: "socket read",
            })?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(CodecError::Truncated {
                packet: "stream",
                field: "packet (connection closed mid-packet)",
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn max_packet() -> usize {
    // Room for a 128 KiB payload plus topic, properties and headers; larger is refused.
    MAX_PAYLOAD + 2048
}

fn take_packet(buf: &mut Vec<u8>, version: Option<Version>) -> Result<Option<Packet>, CodecError> {
    match mqtt::frame(buf, max_packet())? {
        Framed::Incomplete => Ok(None),
        Framed::Packet {
            header,
            body_start,
            total,
        } => {
            let p = mqtt::decode(header, &buf[body_start..total], version);
            buf.drain(..total);
            p.map(Some)
        }
    }
}

/// A fleet-provisioning request queued for the connection's worker: API, format, topic, payload.
type ProvRequest = (provisioning::Api, provisioning::Format, String, Vec<u8>);

struct Conn {
    broker: Arc<Broker>,
    conn_id: u64,
    client_id: String,
    principal: Principal,
    enc: Encoder,
    version: Version,
    next_pkid: u16,
    inflight: BTreeMap<u16, Publish>,
    /// QoS 1 messages waiting for an inflight slot (a resumed session's store, or overflow),
    /// sent at most 10 per second.
    backlog: VecDeque<Publish>,
    /// The broker generation this connection's principal was read at.
    generation: u64,
    prov_tx: Option<mpsc::Sender<ProvRequest>>,
    /// A temporary (trusted-user) claim must finish within its window from connecting.
    claim_deadline: Option<tokio::time::Instant>,
    /// AWS: 100 publishes per second per connection, inbound plus outbound; excess dropped.
    publishes: Bucket,
    /// AWS: 512 KiB/s per connection; excess delayed.
    bytes: Bucket,
}

enum Step {
    Continue,
    /// Clean DISCONNECT from the client.
    Done,
}

impl Conn {
    /// Serve the connection; Ok(true) on a clean DISCONNECT, Ok(false) when kicked.
    async fn run(
        &mut self,
        tls: &mut Tls,
        buf: &mut Vec<u8>,
        rx: &mut mpsc::Receiver<Publish>,
        kick: &mut oneshot::Receiver<(u8, &'static str)>,
        idle: Duration,
    ) -> Result<bool, String> {
        let mut chunk = vec![0u8; 16 * 1024];
        let mut deadline = tokio::time::Instant::now() + idle;
        let mut backlog_tick = tokio::time::interval(BACKLOG_INTERVAL);
        loop {
            // Handle every whole packet already buffered.
            loop {
                match take_packet(buf, Some(self.version)) {
                    Ok(Some(p)) => {
                        deadline = tokio::time::Instant::now() + idle;
                        match self.handle(tls, p).await? {
                            Step::Continue => {}
                            Step::Done => return Ok(true),
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.broker.control.stat(|s| s.bad_packets += 1);
                        let reason = match e {
                            CodecError::TooLarge { .. } => 0x95,
                            _ => 0x81,
                        };
                        self.disconnect(tls, reason, &e.to_string()).await;
                        return Err(format!("protocol error: {e}"));
                    }
                }
            }
            tokio::select! {
                r = tls.read(&mut chunk) => {
                    let n = r.map_err(|e| format!("read: {e}"))?;
                    if n == 0 {
                        return Err("connection closed without DISCONNECT".into());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let wait = self.bytes.take_delay(n as f64, Instant::now());
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
                out = rx.recv() => match out {
                    Some(p) => self.send_publish(tls, p).await?,
                    None => return Err("broker dropped the connection".into()),
                },
                k = &mut *kick => {
                    let (code, why) = k.unwrap_or((0x88, "server unavailable"));
                    self.disconnect(tls, code, why).await;
                    return Ok(false);
                }
                _ = backlog_tick.tick(), if !self.backlog.is_empty() => {
                    self.send_backlog(tls).await?;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(format!("keep-alive expired ({} s without traffic)", idle.as_secs()));
                }
                _ = sleep_until_opt(self.claim_deadline) => {
                    self.disconnect(tls, 0x89, "temporary claim window is over").await;
                    return Err("temporary claim's provisioning window is over".into());
                }
            }
        }
    }

    async fn disconnect(&self, tls: &mut Tls, code: u8, why: &str) {
        if let Some(bytes) = self.enc.disconnect(code, why) {
            let _ = write(tls, &bytes).await;
        }
    }

    async fn send_publish(&mut self, tls: &mut Tls, mut p: Publish) -> Result<(), String> {
        if !self.publishes.try_take(Instant::now()) {
            self.broker.control.stat(|s| s.throttled_publishes += 1);
            return Ok(());
        }
        if p.qos > 0 {
            if self.inflight.len() >= MAX_INFLIGHT {
                // Held back until the client acknowledges; dropped only when that store is full.
                if self.backlog.len() >= SESSION_QUEUE {
                    self.broker.control.stat(|s| s.dropped_messages += 1);
                } else {
                    self.backlog.push_back(p);
                }
                return Ok(());
            }
            loop {
                self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
                if !self.inflight.contains_key(&self.next_pkid) {
                    break;
                }
            }
            p.pkid = self.next_pkid;
            self.inflight.insert(p.pkid, p.clone());
        }
        write(tls, &self.enc.publish(&p)).await
    }

    /// Send the oldest held-back message, if a slot is free and the client may still receive it.
    async fn send_backlog(&mut self, tls: &mut Tls) -> Result<(), String> {
        if self.inflight.len() >= MAX_INFLIGHT {
            return Ok(());
        }
        let Some(p) = self.backlog.pop_front() else {
            return Ok(());
        };
        self.refresh_principal()?;
        if self
            .principal
            .allowed("iot:Receive", &arn("topic", &p.topic))
        {
            self.send_publish(tls, p).await?;
        }
        Ok(())
    }

    /// Pick up policy or thing changes made to the registry while connected.
    fn refresh_principal(&mut self) -> Result<(), String> {
        let g = self.broker.generation.load(Ordering::Acquire);
        if g != self.generation {
            self.generation = g;
            self.principal = self
                .broker
                .current_principal(self.conn_id)
                .ok_or("connection was removed")?;
        }
        Ok(())
    }

    async fn handle(&mut self, tls: &mut Tls, p: Packet) -> Result<Step, String> {
        self.refresh_principal()?;
        match p {
            Packet::Connect(_) => {
                self.disconnect(tls, 0x82, "second CONNECT").await;
                Err("second CONNECT".into())
            }
            Packet::Publish(p) => self.on_publish(tls, p).await,
            Packet::PubAck { pkid } => {
                self.inflight.remove(&pkid);
                Ok(Step::Continue)
            }
            Packet::PubRec { .. } | Packet::PubRel { .. } | Packet::PubComp { .. } => {
                // QoS 2 is not supported by AWS IoT: ignore its handshake.
                Ok(Step::Continue)
            }
            Packet::Subscribe(s) => self.on_subscribe(tls, s).await,
            Packet::Unsubscribe { pkid, filters } => {
                {
                    let mut st = self.broker.state();
                    if let Some(e) = st.conns.get_mut(&self.conn_id) {
                        e.subs.retain(|(f, _)| !filters.contains(f));
                    }
                }
                write(tls, &self.enc.unsuback(pkid, filters.len())).await?;
                Ok(Step::Continue)
            }
            Packet::PingReq => {
                write(tls, &self.enc.pingresp()).await?;
                Ok(Step::Continue)
            }
            Packet::Disconnect { .. } => Ok(Step::Done),
            Packet::Auth => {
                self.disconnect(tls, 0x8C, "enhanced authentication not supported")
                    .await;
                Err("AUTH not supported".into())
            }
        }
    }

    async fn on_publish(&mut self, tls: &mut Tls, p: Publish) -> Result<Step, String> {
        if p.qos == 2 {
            // AWS IoT: no PUBACK/PUBREC for QoS 2, and the message is not delivered.
            tracing::info!(client = %self.client_id, topic = %p.topic, "QoS 2 publish ignored");
            return Ok(Step::Continue);
        }
        if p.properties.get(prop::TOPIC_ALIAS).is_some() {
            self.disconnect(tls, 0x94, "topic aliases are not supported")
                .await;
            return Err("topic alias used though maximum is 0".into());
        }
        if let Err(why) = valid_aws_topic(&p.topic) {
            self.disconnect(tls, 0x90, why).await;
            return Err(format!("invalid topic {:?}: {why}", p.topic));
        }
        if p.payload.len() > MAX_PAYLOAD {
            self.disconnect(tls, 0x95, "payload larger than 128 KB")
                .await;
            return Err(format!(
                "payload of {} bytes exceeds 128 KB",
                p.payload.len()
            ));
        }
        let topic_arn = arn("topic", &p.topic);
        if service_only_topic(&p.topic)
            || !self.principal.allowed("iot:Publish", &topic_arn)
            || (p.retain
                && (p.topic.starts_with('$')
                    || !self.principal.allowed("iot:RetainPublish", &topic_arn)))
        {
            self.broker.control.stat(|s| s.denied += 1);
            self.disconnect(tls, 0x87, "not authorized").await;
            return Err(format!("iot:Publish denied on {}", p.topic));
        }
        if !self.publishes.try_take(Instant::now()) {
            // AWS discards publishes over the per-connection rate.
            self.broker.control.stat(|s| s.throttled_publishes += 1);
        } else {
            self.broker.control.count_publish(&self.client_id, &p.topic);
            if let Some((api, fmt)) = provisioning::parse_topic(&p.topic) {
                self.enqueue_provisioning(api, fmt, p.topic.clone(), p.payload.clone());
            } else {
                self.broker.route(&p);
            }
        }
        if p.qos == 1 && self.broker.control.acks_stalled() {
            self.broker
                .control
                .stat(|s| s.unacknowledged_publishes += 1);
        } else if p.qos == 1 {
            write(tls, &self.enc.puback(p.pkid, 0)).await?;
        }
        Ok(Step::Continue)
    }

    /// Requests on one connection are answered one at a time, in order (FIFO), by a worker.
    fn enqueue_provisioning(
        &mut self,
        api: provisioning::Api,
        fmt: provisioning::Format,
        topic: String,
        payload: Vec<u8>,
    ) {
        let tx = self.prov_tx.get_or_insert_with(|| {
            let (tx, mut rx) = mpsc::channel::<ProvRequest>(64);
            let broker = self.broker.clone();
            let conn_id = self.conn_id;
            let cert_id = self.principal.cert_id.clone();
            let client_id = self.client_id.clone();
            tokio::spawn(async move {
                while let Some((api, fmt, topic, payload)) = rx.recv().await {
                    if !broker.state().conns.contains_key(&conn_id) {
                        // The requester is gone: AWS would not answer it either.
                        break;
                    }
                    let caller = Caller {
                        cert_id: &cert_id,
                        client_id: &client_id,
                    };
                    let control = &broker.control;
                    // Admission (the TPS quota) comes first: an injected service error
                    // stands for a request AWS admitted and then failed.
                    let reply = if !control.provisioning_allowed(api.name()) {
                        let err = provisioning::ApiError::new(
                            429,
                            "ThrottlingException",
                            "Rate exceeded",
                        );
                        provisioning::reply(fmt, &topic, Err(err))
                    } else if let Some(err) = control.take_injected_rejection() {
                        provisioning::reply(fmt, &topic, Err(err))
                    } else {
                        broker
                            .prov
                            .handle(&api, fmt, &topic, &payload, &caller)
                            .await
                    };
                    let delay = control.reply_delay();
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    broker.reply_to(conn_id, &reply.topic, reply.payload);
                }
            });
            tx
        });
        if tx.try_send((api, fmt, topic, payload)).is_err() {
            self.broker.control.stat(|s| s.dropped_messages += 1);
        }
    }

    async fn on_subscribe(&mut self, tls: &mut Tls, s: mqtt::Subscribe) -> Result<Step, String> {
        if self.version == Version::V311 && s.filters.iter().any(|(_, o)| o & 3 == 2) {
            // AWS IoT sends no SUBACK when QoS 2 is requested.
            tracing::info!(client = %self.client_id, "SUBSCRIBE with QoS 2 ignored (no SUBACK)");
            return Ok(Step::Continue);
        }
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut granted = Vec::new();
        let limits = &self.broker.control.limits;
        let mut room = {
            let st = self.broker.state();
            let have = st.conns.get(&self.conn_id).map_or(0, |e| e.subs.len());
            limits.max_subscriptions.saturating_sub(have)
        };
        let failure = if self.version == Version::V5 {
            0x97
        } else {
            0x80
        };
        for (i, (filter, opts)) in s.filters.iter().enumerate() {
            let qos = (opts & 3).min(1);
            if i >= limits.filters_per_subscribe {
                // AWS: at most 8 topic filters per SUBSCRIBE.
                codes.push(failure);
            } else if room == 0 {
                // AWS: at most 50 subscriptions per connection.
                codes.push(failure);
            } else if !mqtt::valid_filter(filter) || valid_aws_filter(filter).is_err() {
                codes.push(if self.version == Version::V5 {
                    0x8F
                } else {
                    0x80
                });
            } else if !self
                .principal
                .allowed("iot:Subscribe", &arn("topicfilter", filter))
            {
                self.broker.control.stat(|s| s.denied += 1);
                codes.push(if self.version == Version::V5 {
                    0x87
                } else {
                    0x80
                });
            } else if filter.starts_with("$share/") {
                codes.push(if self.version == Version::V5 {
                    0x9E
                } else {
                    0x80
                });
            } else {
                codes.push(qos);
                granted.push((filter.clone(), qos));
                room -= 1;
            }
        }
        let retained: Vec<Publish> = {
            let mut st = self.broker.state();
            let e = st.conns.get_mut(&self.conn_id);
            if let Some(e) = e {
                for (f, q) in &granted {
                    e.subs.retain(|(x, _)| x != f);
                    e.subs.push((f.clone(), *q));
                }
            }
            granted
                .iter()
                .filter(|(f, _)| !f.contains(['+', '#']))
                .filter_map(|(f, q)| {
                    st.retained.get(f).map(|p| {
                        let mut p = p.clone();
                        p.qos = p.qos.min(*q);
                        p
                    })
                })
                .collect()
        };
        write(tls, &self.enc.suback(s.pkid, &codes)).await?;
        for p in retained {
            if self
                .principal
                .allowed("iot:Receive", &arn("topic", &p.topic))
            {
                self.send_publish(tls, p).await?;
            }
        }
        Ok(Step::Continue)
    }
}

fn valid_aws_filter(f: &str) -> Result<(), &'static str> {
    if f.len() > MAX_TOPIC_BYTES {
        return Err("filter longer than 256 bytes");
    }
    if f.matches('/').count() > MAX_TOPIC_SLASHES && !f.starts_with("$aws/rules/") {
        return Err("filter has more than 7 slashes");
    }
    Ok(())
}

/// A client-certificate verifier that accepts any well-formed certificate: AWS IoT authenticates
/// the client by looking its certificate up in the registry after the handshake, not by chain.
#[derive(Debug)]
pub struct AnyClientCert {
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::server::danger::ClientCertVerifier for AnyClientCert {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// TLS 1.2/1.3 server config: the emulator's server certificate, a required client certificate,
/// ALPN `x-amzn-mqtt-ca` for clients on port 443.
pub fn tls_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<rustls_pki_types::CertificateDer<'static>> =
        rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("server certificate: {e}"))?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("server key: {e}"))?;
    let verifier = Arc::new(AnyClientCert {
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("server certificate/key: {e}"))?;
    cfg.alpn_protocols = vec![b"x-amzn-mqtt-ca".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_topic_rules() {
        assert!(valid_aws_topic("a/b/c/d/e/f/g/h").is_ok());
        assert!(valid_aws_topic("a/b/c/d/e/f/g/h/i").is_err());
        assert!(valid_aws_topic("$aws/rules/r/a/b/c/d/e/f/g/h").is_ok());
        assert!(valid_aws_topic(&"x".repeat(257)).is_err());
        assert!(valid_aws_topic("a/+").is_err());
    }
}
