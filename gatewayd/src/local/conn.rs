//! One client connection: TLS handshake (bounded in time), CONNECT (bounded in time and size),
//! authentication, then the session: every PUBLISH and SUBSCRIBE checked against the ACL, every
//! allowed PUBLISH appended to the outbox, and its PUBACK written only once the append is on disk.
//!
//! PUBACKs leave in the order the PUBLISHes came (MQTT 3.1.1 §4.6): the reader hands each
//! append's future to the writer in arrival order; many appends can be in flight at once and
//! share one sync (the outbox's group commit), up to `MAX_IN_FLIGHT` per connection, after which
//! the reader stops reading (backpressure on the client).
//!
//! Cloud commands (the bridge's downlink queue) are delivered by the session itself, not through
//! rumqttd: only the session sees the child's PUBACK, and a command leaves the disk only then
//! (at once for a QoS 0 subscription). They go out in the child's queue order, one at a time,
//! when a filter the child subscribed to (and the ACL allowed) matches; their packet ids are
//! from `DOWNLINK_PKIDS`, above the ones rumqttd gives its deliveries (1-100), so the reader
//! tells the two kinds of PUBACK apart.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::acl::{self, Action, Decision};
use super::auth::{self, Role};
use super::codec::{self, DecodeError, Packet, Version};
use super::fleet;
use super::router::{LinkReceiver, LinkSender};
use super::{Shared, Slot, ca};
use crate::outbox::{OutboxError, Seq};

/// Unacknowledged publishes one connection may have in the outbox's queue.
const MAX_IN_FLIGHT: usize = 64;
/// Room in a PUBLISH besides its payload (fixed header, topic, packet id, properties).
const PACKET_OVERHEAD: usize = 2048;
/// Packet ids of cloud-command deliveries; rumqttd numbers its deliveries 1-100.
const DOWNLINK_PKIDS: std::ops::RangeInclusive<u16> = 0x8000..=0xFFFF;

/// What the reader shares with the session's command delivery.
struct DownState {
    /// The session's allowed subscriptions with their QoS.
    subs: std::sync::Mutex<Vec<(String, u8)>>,
    changed: tokio::sync::Notify,
    /// PUBACKs of command deliveries.
    acks: mpsc::Sender<u16>,
}

/// Accepts any well-formed client certificate, and none: who the certificate belongs to is
/// decided after the handshake (`ca::inspect`, `auth::authenticate`), so that a device can be
/// refused with a CONNACK code instead of a bare TLS alert, and a certificate the cloud issued
/// (pinned by certificateId) is accepted whatever CA signed it. The handshake signature still
/// proves the client holds the certificate's key.
#[derive(Debug)]
pub(crate) struct OptionalClientCert {
    pub(crate) algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::server::danger::ClientCertVerifier for OptionalClientCert {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn verify_client_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

pub(crate) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    is_tls: bool,
    slot: Slot,
    cancel: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    if !is_tls {
        return session(shared, tcp, peer, None, slot, cancel).await;
    }
    let Some(acceptor) = shared.tls.clone() else {
        return;
    };
    let hs = Duration::from_millis(shared.cfg.handshake_timeout_ms);
    let tls = tokio::select! {
        _ = cancel.cancelled() => return,
        r = tokio::time::timeout(hs, acceptor.accept(tcp)) => r,
    };
    let stream = match tls {
        Ok(Ok(s)) => s,
        Ok(Err(error)) => {
            shared.refuse("tls_error");
            tracing::debug!(%peer, %error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shared.refuse("handshake_timeout");
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let chain: Vec<Vec<u8>> = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.as_ref().to_vec()).collect())
        .unwrap_or_default();
    let cert = match chain.split_first() {
        None => None,
        Some((der, rest)) => match ca::inspect(der, &shared.ca_der) {
            Some(mut p) => {
                p.onboarding = shared
                    .onboarding_certificate_ids
                    .contains(&p.certificate_id)
                    || ca::signed_by_pinned_ca(der, rest, &shared.onboarding_ca_fingerprints);
                Some(p)
            }
            None => {
                shared.refuse("bad_certificate");
                return;
            }
        },
    };
    session(shared, stream, peer, cert, slot, cancel).await
}

/// Reads one whole packet into `buf` (which may already hold bytes), bounded by `max`.
async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Option<(u8, Vec<u8>)>, DecodeError> {
    loop {
        if let Some((h, end, start)) = codec::frame(buf, max)? {
            let body = buf[start..end].to_vec();
            buf.drain(..end);
            return Ok(Some((h, body)));
        }
        let mut chunk = [0u8; 8192];
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

type Append = Pin<Box<dyn Future<Output = Result<Seq, OutboxError>> + Send>>;

enum Out {
    Bytes(Vec<u8>),
    /// Write a PUBACK for `pkid` once the append is durable (QoS 1), or just wait for it
    /// (QoS 0, `pkid` None) so that its failures are counted in order.
    Ack(Option<u16>, Append),
    /// Write, then close the connection.
    Close(Vec<u8>),
}

async fn session<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    cert: Option<ca::PeerCert>,
    mut slot: Slot,
    cancel: CancellationToken,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = Vec::new();
    let wait = Duration::from_millis(shared.cfg.connect_timeout_ms);
    let first = tokio::select! {
        _ = cancel.cancelled() => return,
        r = tokio::time::timeout(wait, read_packet(&mut rd, &mut buf, shared.cfg.max_connect_bytes)) => r,
    };
    let (h, body) = match first {
        Err(_) => return shared.refuse("connect_timeout"),
        Ok(Ok(None)) => return shared.refuse("closed_before_connect"),
        Ok(Err(DecodeError::TooLarge(_))) => return shared.refuse("connect_too_large"),
        Ok(Err(_)) => return shared.refuse("malformed_connect"),
        Ok(Ok(Some(x))) => x,
    };
    let c = match codec::decode_connect(h, &body) {
        Ok(c) => c,
        Err(DecodeError::Protocol(..)) => {
            // 3.1.1 §3.1.2.2: answer 0x01 (unacceptable protocol level), then close.
            shared.refuse("protocol_version");
            let _ = wr.write_all(&codec::connack(Version::V4, 1)).await;
            return;
        }
        Err(_) => return shared.refuse("malformed_connect"),
    };
    let v = c.version;
    let verdict = {
        let (c2, cert2, sh) = (c.clone(), cert.clone(), shared.clone());
        // PBKDF2 takes tens of milliseconds: off the async threads.
        tokio::task::spawn_blocking(move || {
            auth::authenticate(&c2, cert2.as_ref(), &sh.registry, sh.onboarding.as_ref())
        })
        .await
    };
    let role = match verdict {
        Ok(Ok(role)) => role,
        Ok(Err(refusal)) => {
            tracing::info!(%peer, client_id = %c.client_id, reason = refusal.as_str(), "local client refused at CONNECT");
            // Counted before the client is told: a client that saw its refusal finds it in
            // status (counted after the CONNACK, a test read 1 of 2 refusals).
            shared.refuse(refusal.as_str());
            let _ = wr.write_all(&codec::connack(v, refusal.code(v))).await;
            return;
        }
        Err(_) => return,
    };
    let child = c.client_id.clone();
    let rules = match role {
        Role::Child => shared
            .client_rules
            .get(&child)
            .unwrap_or(&shared.child_rules),
        Role::Onboarding => &shared.onboarding_rules,
    };
    let gw = shared.gateway_name();
    if let Some(w) = &c.will
        && acl::decide(rules, &child, gw.as_deref(), Action::Will, &w.topic) != Decision::Allow
    {
        shared.acl_denied(&child, Action::Will, &w.topic);
        shared.refuse("will_not_permitted");
        let _ = wr
            .write_all(&codec::connack(v, auth::Refusal::NotAuthorized.code(v)))
            .await;
        return;
    }
    let stop = cancel.child_token();
    let session_no = shared.connected(&child, stop.clone());
    // The session's link to the local router (rumqttd), before CONNACK: a client that is told it
    // is connected can subscribe.
    let link = {
        let (sh, id) = (shared.clone(), child.clone());
        tokio::task::spawn_blocking(move || sh.router.link(&id, session_no)).await
    };
    let (mut link, deliveries) = match link {
        Ok(Ok(l)) => l,
        Ok(Err(error)) => {
            tracing::warn!(%peer, child = %child, %error, "local router refused a session");
            let code = if v == Version::V5 { 0x88 } else { 3 };
            shared.disconnected(&child, session_no);
            shared.refuse("router_unavailable");
            let _ = wr.write_all(&codec::connack(v, code)).await;
            return;
        }
        Err(_) => {
            shared.disconnected(&child, session_no);
            return;
        }
    };
    slot.handshake_done();
    if wr.write_all(&codec::connack(v, 0)).await.is_err() {
        link.close().await;
        shared.disconnected(&child, session_no);
        return;
    }
    tracing::debug!(%peer, child = %child, ?role, "local client connected");

    let (tx, rx) = mpsc::channel::<Out>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(write_loop(wr, rx, v, shared.clone(), child.clone()));
    let forwarder = tokio::spawn(forward_loop(
        deliveries,
        tx.clone(),
        v,
        shared.clone(),
        stop.clone(),
    ));
    let down = (role == Role::Child).then(|| {
        let (ack_tx, ack_rx) = mpsc::channel(16);
        let st = Arc::new(DownState {
            subs: Default::default(),
            changed: tokio::sync::Notify::new(),
            acks: ack_tx,
        });
        let task = tokio::spawn(downlink_loop(
            shared.clone(),
            child.clone(),
            st.clone(),
            ack_rx,
            tx.clone(),
            v,
            stop.clone(),
        ));
        (st, task)
    });
    let onboarding = (role == Role::Onboarding)
        .then(|| shared.fleet_proxy())
        .flatten()
        .map(|proxy| FleetSession {
            proxy,
            issued: Default::default(),
            busy: Default::default(),
        });
    let graceful = read_loop(
        &shared,
        &mut rd,
        buf,
        &tx,
        &mut link,
        rules,
        role == Role::Onboarding,
        onboarding.as_ref(),
        &child,
        v,
        c.keep_alive,
        &stop,
        down.as_ref().map(|(st, _)| &**st),
    )
    .await;
    forwarder.abort();
    let _ = forwarder.await;
    if let Some((_, task)) = down {
        task.abort();
        let _ = task.await;
    }
    drop(tx);
    let _ = writer.await;
    if !graceful && let Some(w) = c.will.filter(|_| !stop.is_cancelled()) {
        // The will goes where any publish from this child goes: to local subscribers, and
        // upstream when its topic is an upstream one.
        link.publish(&w.topic, &w.payload, w.qos.min(1), 0, w.retain)
            .await;
        if shared.is_upstream(&w.topic) {
            let _ = shared
                .outbox
                .append(&child, &w.topic, w.qos.min(1), &w.payload)
                .await;
        }
    }
    link.close().await;
    shared.disconnected(&child, session_no);
    tracing::debug!(%peer, child = %child, graceful, "local client disconnected");
}

/// Starts an append and polls it once, so that its record is queued to the outbox writer now,
/// in this connection's order (per-child FIFO), before the next packet is read.
fn start_append(shared: &Shared, child: &str, p: codec::Publish) -> Append {
    let outbox = shared.outbox.clone();
    let child = child.to_owned();
    let mut fut: Append =
        Box::pin(async move { outbox.append(&child, &p.topic, p.qos, &p.payload).await });
    // `Outbox::append` hands the record to the writer before its first await; the waker is
    // replaced when the writer task awaits the future.
    if let Poll::Ready(r) = fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        return Box::pin(std::future::ready(r));
    }
    fut
}

/// Writes what the local router delivers (the client's subscriptions) to the client. A router
/// that drops the link ends the session.
async fn forward_loop(
    mut deliveries: LinkReceiver,
    tx: mpsc::Sender<Out>,
    v: Version,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    while let Some(d) = deliveries.next().await {
        let bytes = codec::publish(v, &d.topic, &d.payload, d.qos, d.pkid, d.retain);
        if tx.send(Out::Bytes(bytes)).await.is_err() {
            return;
        }
        shared.delivered.fetch_add(1, Ordering::Relaxed);
    }
    stop.cancel();
}

/// Delivers the child's cloud commands (see the module header) while the session lasts.
async fn downlink_loop(
    shared: Arc<Shared>,
    child: String,
    st: Arc<DownState>,
    mut acks: mpsc::Receiver<u16>,
    tx: mpsc::Sender<Out>,
    v: Version,
    stop: CancellationToken,
) {
    let mut pkid = *DOWNLINK_PKIDS.start();
    let queue = loop {
        if let Some(q) = shared.downlink() {
            break q;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    let mut changes = queue.changes();
    loop {
        let subs = st.subs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let next = queue.pending(&child).into_iter().find_map(|c| {
            let qos = subs
                .iter()
                .filter(|(f, _)| crate::cloud::topic::route_matches(f, &c.topic))
                .map(|(_, q)| *q)
                .max()?;
            Some((c, qos))
        });
        let Some((c, qos)) = next else {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
                _ = st.changed.notified() => {}
                // Expiry is on the wall clock: look again now and then.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        let id = pkid;
        pkid = if pkid == *DOWNLINK_PKIDS.end() {
            *DOWNLINK_PKIDS.start()
        } else {
            pkid + 1
        };
        let bytes = codec::publish(v, &c.topic, &c.payload, qos, id, false);
        if tx.send(Out::Bytes(bytes)).await.is_err() {
            return;
        }
        if qos > 0 {
            // Its PUBACK, or the session ends and the command stays on disk for the next one.
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    a = acks.recv() => match a {
                        Some(a) if a == id => break,
                        Some(_) => continue,
                        None => return,
                    },
                }
            }
        }
        shared.delivered.fetch_add(1, Ordering::Relaxed);
        let q = queue.clone();
        let (ch, seq) = (child.clone(), c.seq);
        match tokio::task::spawn_blocking(move || q.done(&ch, seq)).await {
            Ok(Ok(())) => {
                tracing::debug!(child = %child, topic = %c.topic, seq, "cloud command delivered")
            }
            Ok(Err(error)) => {
                // Delivered again on the next session: at least once.
                tracing::error!(child = %child, %error, "a delivered command was not removed from disk");
                return;
            }
            Err(_) => return,
        }
    }
}

/// An onboarding session's use of the local fleet-provisioning endpoint.
struct FleetSession {
    proxy: Arc<dyn fleet::Proxy>,
    /// The certificateId the cloud last issued to this session (pinned for the client when its
    /// RegisterThing is accepted).
    issued: Arc<std::sync::Mutex<Option<String>>>,
    /// One call at a time per session.
    busy: Arc<std::sync::atomic::AtomicBool>,
}

/// Runs one fleet-provisioning request of an onboarding client in the cloud and writes the
/// answer to that client (QoS 0, on `<request>/accepted` or `/rejected`).
fn fleet_request(
    shared: &Arc<Shared>,
    fs: &FleetSession,
    tx: &mpsc::Sender<Out>,
    v: Version,
    client: &str,
    req: fleet::Request,
    payload: Vec<u8>,
) {
    let (shared, tx, client) = (shared.clone(), tx.clone(), client.to_owned());
    let (proxy, issued, busy) = (fs.proxy.clone(), fs.issued.clone(), fs.busy.clone());
    if busy.swap(true, Ordering::AcqRel) {
        let r = crate::cloud::fleet::Rejection {
            status_code: 429,
            error_code: "ThrottlingException".into(),
            error_message: "one fleet-provisioning request at a time per client".into(),
        };
        let body = fleet::encode(req.format, &fleet::rejection_payload(&r));
        let topic = format!("{}/rejected", req.topic);
        let _ = tx.try_send(Out::Bytes(codec::publish(v, &topic, &body, 0, 0, false)));
        return;
    }
    tokio::spawn(async move {
        let answer = match fleet::decode(req.format, &payload) {
            Err(r) => Err(r),
            Ok(_) if !shared.template_offered(&req.api) => Err(crate::cloud::fleet::Rejection {
                status_code: 403,
                error_code: "AccessDenied".into(),
                error_message: "this template is not offered to devices onboarding through \
                                this gateway ([local] onboarding_templates)"
                    .into(),
            }),
            Ok(body) => proxy.call(&client, req.api.clone(), body).await,
        };
        let (suffix, body) = match answer {
            Ok(a) => {
                onboarded(&shared, &client, &req.api, &a, &issued).await;
                ("accepted", a)
            }
            Err(r) => {
                tracing::info!(child = %client, api = req.api.name(), error_code = %r.error_code, error = %r.error_message, "local fleet-provisioning request rejected");
                ("rejected", fleet::rejection_payload(&r))
            }
        };
        busy.store(false, Ordering::Release);
        let topic = format!("{}/{suffix}", req.topic);
        let body = fleet::encode(req.format, &body);
        let _ = tx
            .send(Out::Bytes(codec::publish(v, &topic, &body, 0, 0, false)))
            .await;
    });
}

/// After an accepted answer: remembers an issued certificate; on an accepted RegisterThing,
/// pins that certificate for the client, which may then connect with it as a child.
async fn onboarded(
    shared: &Arc<Shared>,
    client: &str,
    api: &crate::cloud::fleet::FleetApi,
    answer: &serde_json::Value,
    issued: &std::sync::Mutex<Option<String>>,
) {
    let lock = |m: &std::sync::Mutex<Option<String>>| -> Option<String> {
        m.lock().unwrap_or_else(|e| e.into_inner()).clone()
    };
    if let Some(id) = answer.get("certificateId").and_then(|c| c.as_str()) {
        *issued.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.to_owned());
        return;
    }
    if !matches!(api, crate::cloud::fleet::FleetApi::RegisterThing { .. }) {
        return;
    }
    let thing = answer
        .get("thingName")
        .and_then(|t| t.as_str())
        .unwrap_or_default()
        .to_owned();
    let Some(cert) = lock(issued) else {
        tracing::warn!(child = %client, %thing, "RegisterThing accepted for a certificate issued in an earlier session: not pinned (gatewayctl children add ID --certificate-id)");
        return;
    };
    let (registry, id) = (shared.registry.clone(), client.to_owned());
    let add = crate::children::AddChild {
        id: id.clone(),
        certificate_id: Some(cert.clone()),
        password: false,
    };
    match tokio::task::spawn_blocking(move || registry.add(&add)).await {
        Ok(Ok(_)) => {
            tracing::info!(child = %client, %thing, certificate_id = %cert, "device onboarded through the local fleet-provisioning endpoint; its certificate is pinned");
            if let Some(hook) = shared.onboarded_hook() {
                hook(client, &thing, &cert);
            }
        }
        Ok(Err(error)) => {
            tracing::warn!(child = %client, %thing, %error, "device registered in the cloud but its certificate could not be pinned")
        }
        Err(_) => {}
    }
}

/// A constrained device announces itself (`onboarding/<id>/announce`, JSON with `serial`,
/// `model`, `vendor`): it is registered as a child with a password the gateway makes, sent back
/// on `onboarding/<id>/credential` to this session only (never logged), and offered for
/// provisioning (the gateway makes and keeps its key). An id already registered is refused on
/// `onboarding/<id>/rejected`: announcing must not reset another device's credential.
fn announce(
    shared: &Arc<Shared>,
    tx: &mpsc::Sender<Out>,
    v: Version,
    child: &str,
    payload: Vec<u8>,
) {
    let (shared, tx, child) = (shared.clone(), tx.clone(), child.to_owned());
    tokio::spawn(async move {
        let reply = |suffix: &str, body: serde_json::Value| {
            let topic = format!("onboarding/{child}/{suffix}");
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            Out::Bytes(codec::publish(v, &topic, &bytes, 0, 0, false))
        };
        let found = match announcement(&shared, &child, &payload) {
            Ok(f) => f,
            Err(why) => {
                tracing::info!(child = %child, "onboarding announcement refused: {why}");
                let _ = tx
                    .send(reply("rejected", serde_json::json!({ "error": why })))
                    .await;
                return;
            }
        };
        let (registry, id) = (shared.registry.clone(), child.clone());
        let add = crate::children::AddChild {
            id,
            certificate_id: None,
            password: true,
        };
        // Checked again as one step with the write: a second announcement of this id may have
        // passed the check above at the same time.
        let password = match tokio::task::spawn_blocking(move || registry.add_new(&add)).await {
            Ok(Ok(Some(p))) => p,
            Ok(Err(error @ crate::children::RegistryError::AlreadyRegistered(_))) => {
                tracing::info!(child = %child, "onboarding announcement refused: {error}");
                let body = serde_json::json!({ "error": error.to_string() });
                let _ = tx.send(reply("rejected", body)).await;
                return;
            }
            Ok(Err(error)) => {
                tracing::warn!(child = %child, %error, "onboarding announcement: cannot register the device");
                let body = serde_json::json!({ "error": error.to_string() });
                let _ = tx.send(reply("rejected", body)).await;
                return;
            }
            _ => return,
        };
        tracing::info!(child = %child, serial = ?found.serial, model = ?found.model, "device announced itself: registered with a local password credential");
        let body =
            serde_json::json!({ "clientId": child, "username": child, "password": password });
        let _ = tx.send(reply("credential", body)).await;
        if let Some(hook) = shared.announce_hook() {
            hook(found);
        }
    });
}

/// What an announcement says, or why it is refused.
fn announcement(shared: &Shared, child: &str, payload: &[u8]) -> Result<Announced, &'static str> {
    let Ok(a @ serde_json::Value::Object(_)) = serde_json::from_slice(payload) else {
        return Err("the announcement is not a JSON object");
    };
    if shared.registry.get(child).is_some() {
        return Err("this id is already registered");
    }
    let text = |k: &str| a.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    Ok(Announced {
        id: child.to_owned(),
        serial: text("serial"),
        model: text("model"),
        vendor: text("vendor"),
    })
}

/// What a constrained device said about itself when it announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    pub id: String,
    pub serial: Option<String>,
    pub model: Option<String>,
    pub vendor: Option<String>,
}

/// Returns true on a client DISCONNECT (no will), false on anything else.
#[allow(clippy::too_many_arguments)]
async fn read_loop<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    rd: &mut R,
    mut buf: Vec<u8>,
    tx: &mpsc::Sender<Out>,
    link: &mut LinkSender,
    rules: &acl::Rules,
    is_onboarding: bool,
    fleet_session: Option<&FleetSession>,
    child: &str,
    v: Version,
    keep_alive: u16,
    stop: &CancellationToken,
    down: Option<&DownState>,
) -> bool {
    let max = shared.cfg.max_payload_bytes + PACKET_OVERHEAD;
    let idle = if keep_alive == 0 {
        Duration::from_secs(24 * 3600)
    } else {
        Duration::from_millis(u64::from(keep_alive) * 1500)
    };
    let per_sec = f64::from(shared.cfg.client_publishes_per_sec);
    let mut tokens = per_sec;
    let mut last = tokio::time::Instant::now();
    let close = |bytes: Vec<u8>| async move {
        let _ = tx.send(Out::Close(bytes)).await;
        false
    };
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => return false,
            r = tokio::time::timeout(idle, read_packet(rd, &mut buf, max)) => r,
        };
        let (h, body) = match r {
            Err(_) => {
                shared.refuse("keep_alive_timeout");
                return false;
            }
            Ok(Ok(None)) => return false,
            Ok(Err(e)) => {
                shared.refuse("malformed_packet");
                tracing::info!(child, error = %e, "local client sent a malformed packet; disconnected");
                let reason = if matches!(e, DecodeError::TooLarge(_)) {
                    0x95
                } else {
                    0x81
                };
                return close(disconnect(v, reason)).await;
            }
            Ok(Ok(Some(x))) => x,
        };
        let p = match codec::decode(h, &body, v) {
            Ok(p) => p,
            Err(e) => {
                shared.refuse("malformed_packet");
                tracing::info!(child, error = %e, "local client sent a malformed packet; disconnected");
                return close(disconnect(v, 0x81)).await;
            }
        };
        let gw = shared.gateway_name();
        match p {
            Packet::Publish(p) => {
                // Rate limit: a token bucket; when empty, stop reading until it refills.
                let now = tokio::time::Instant::now();
                tokens = (tokens + now.duration_since(last).as_secs_f64() * per_sec).min(per_sec);
                last = now;
                if tokens < 1.0 {
                    let wait = Duration::from_secs_f64((1.0 - tokens) / per_sec);
                    tokio::time::sleep(wait).await;
                    tokens = 1.0;
                    last = tokio::time::Instant::now();
                }
                tokens -= 1.0;
                if p.qos == 2 {
                    shared.refuse("qos2");
                    return close(disconnect(v, 0x9B)).await;
                }
                if let Some(fs) = fleet_session
                    && let Some(req) = fleet::parse_request(&p.topic)
                {
                    // A request to the local fleet-provisioning endpoint: acknowledged now
                    // (as AWS does), answered on its answer topics when the cloud has.
                    fleet_request(shared, fs, tx, v, child, req, p.payload);
                    if p.qos == 1
                        && tx
                            .send(Out::Bytes(codec::puback(v, p.pkid, 0)))
                            .await
                            .is_err()
                    {
                        return false;
                    }
                    continue;
                }
                if acl::decide(rules, child, gw.as_deref(), Action::Publish, &p.topic)
                    != Decision::Allow
                {
                    shared.acl_denied(child, Action::Publish, &p.topic);
                    if v == Version::V5 && p.qos == 1 {
                        if tx
                            .send(Out::Bytes(codec::puback(v, p.pkid, 0x87)))
                            .await
                            .is_err()
                        {
                            return false;
                        }
                        continue;
                    }
                    return close(disconnect(v, 0x87)).await;
                }
                shared.publishes.fetch_add(1, Ordering::Relaxed);
                if is_onboarding && p.topic == format!("onboarding/{child}/announce") {
                    announce(shared, tx, v, child, p.payload);
                    if p.qos == 1
                        && tx
                            .send(Out::Bytes(codec::puback(v, p.pkid, 0)))
                            .await
                            .is_err()
                    {
                        return false;
                    }
                    continue;
                }
                if !link
                    .publish(&p.topic, &p.payload, p.qos, p.pkid, p.retain)
                    .await
                {
                    return false;
                }
                let out = if shared.is_upstream(&p.topic) {
                    let pkid = (p.qos == 1).then_some(p.pkid);
                    Out::Ack(pkid, start_append(shared, child, p))
                } else if p.qos == 1 {
                    // Routed in memory only, like any broker: acknowledged now (in order,
                    // behind the PUBACKs still waiting for the disk).
                    Out::Bytes(codec::puback(v, p.pkid, 0))
                } else {
                    continue;
                };
                if tx.send(out).await.is_err() {
                    return false;
                }
            }
            Packet::Subscribe { pkid, filters } => {
                let mut allowed = Vec::new();
                let codes: Vec<u8> = filters
                    .iter()
                    .map(|(f, qos)| {
                        if fleet_session.is_some() && fleet::is_answer_filter(f) {
                            // Answers are written to this session directly, not routed.
                            (*qos).min(1)
                        } else if acl::decide(rules, child, gw.as_deref(), Action::Subscribe, f)
                            == Decision::Allow
                        {
                            allowed.push((f.clone(), (*qos).min(1)));
                            (*qos).min(1)
                        } else {
                            shared.acl_denied(child, Action::Subscribe, f);
                            if v == Version::V5 { 0x87 } else { 0x80 }
                        }
                    })
                    .collect();
                // The router has the subscription before the client has its SUBACK.
                if !link.subscribe(pkid, &allowed).await {
                    return false;
                }
                if let Some(d) = down {
                    let mut subs = d.subs.lock().unwrap_or_else(|e| e.into_inner());
                    for (f, q) in &allowed {
                        subs.retain(|(g, _)| g != f);
                        subs.push((f.clone(), *q));
                    }
                }
                if tx
                    .send(Out::Bytes(codec::suback(v, 0x90, pkid, &codes)))
                    .await
                    .is_err()
                {
                    return false;
                }
                // Commands waiting for this filter go out after the SUBACK.
                if let Some(d) = down {
                    d.changed.notify_one();
                }
            }
            Packet::Unsubscribe { pkid, filters } => {
                let codes = vec![0u8; filters.len()];
                if let Some(d) = down {
                    d.subs
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|(g, _)| !filters.contains(g));
                }
                if !link.unsubscribe(pkid, filters).await {
                    return false;
                }
                if tx
                    .send(Out::Bytes(codec::suback(v, 0xB0, pkid, &codes)))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
            Packet::PingReq => {
                if tx.send(Out::Bytes(codec::PINGRESP.to_vec())).await.is_err() {
                    return false;
                }
            }
            Packet::PubAck(pkid) if DOWNLINK_PKIDS.contains(&pkid) => {
                if let Some(d) = down {
                    let _ = d.acks.try_send(pkid);
                }
            }
            Packet::PubAck(pkid) => {
                if !link.ack(pkid).await {
                    return false;
                }
            }
            Packet::Disconnect => return true,
            Packet::Connect(_) => return false,
        }
    }
}

/// What the server sends before closing: a DISCONNECT with a reason on MQTT 5, nothing on 3.1.1.
fn disconnect(v: Version, reason: u8) -> Vec<u8> {
    match v {
        Version::V5 => codec::disconnect_v5(reason),
        Version::V4 => Vec::new(),
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Out>,
    v: Version,
    shared: Arc<Shared>,
    child: String,
) {
    while let Some(out) = rx.recv().await {
        let bytes = match out {
            Out::Bytes(b) => b,
            Out::Close(b) => {
                let _ = wr.write_all(&b).await;
                let _ = wr.shutdown().await;
                return;
            }
            Out::Ack(pkid, fut) => match (fut.await, pkid) {
                (Ok(_), Some(pkid)) => codec::puback(v, pkid, 0),
                (Ok(_), None) => continue,
                (Err(e), pkid) => {
                    if matches!(e, OutboxError::Full { .. }) {
                        shared.outbox_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(child = %child, error = %e, "publish not stored; no PUBACK (MQTT 3.1.1) or a failure reason (MQTT 5)");
                    match (v, pkid) {
                        // 3.1.1 has no negative PUBACK: withhold it; the client resends.
                        (Version::V4, _) | (_, None) => continue,
                        (Version::V5, Some(pkid)) => {
                            let reason = match e {
                                OutboxError::Full { .. } => 0x97,
                                OutboxError::TooLarge { .. } => 0x95,
                                _ => 0x80,
                            };
                            codec::puback(v, pkid, reason)
                        }
                    }
                }
            },
        };
        if wr.write_all(&bytes).await.is_err() {
            return;
        }
        if rx.is_empty() && wr.flush().await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}
