//! Session: one MQTT connection to AWS IoT Core (rumqttc over rustls/ring), kept alive.
//!
//! Owns the rumqttc event loop, its reconnect policy and the per-connection quotas. It adds what
//! rumqttc lacks (NOTES.md): backoff with jitter and a floor between CONNECTs of one client id
//! (rumqttc reconnects instantly), acknowledgement bookkeeping by packet kind and id (`acks`;
//! rumqttc gives no delivery token and shares one id counter), the lane limiter for AWS's
//! 100 publishes/s and 512 KiB/s (`lanes`, `limiter`), topic checks before anything is queued
//! (`topic`), manual acknowledgement of incoming QoS 1 (`routes`), and the restoring of recorded
//! subscriptions after a CONNACK (`subscriptions`). It never relies on rumqttc's replay queue:
//! on every disconnect waiting callers fail and the queue is dropped, so durable delivery is the
//! caller's job (the outbox). Routes and the subscription record belong to the `Cloud` handle
//! (`Hub`), so they outlive the session. It does not know about provisioning.
//!
//! Lock order: `Hub::subs`, then `Shared`. `Hub::routes` is never held while taking another
//! lock, and nothing that may acknowledge (a `Delivery`) is dropped under a lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, Incoming, MqttOptions,
    Outgoing, Publish, QoS, SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Hub;
use super::acks::{Acks, Emitted, Kind};
use super::lanes::Lane;
use super::limiter::Limiter;
use super::routes::{self, Ack, Dispatched};
use super::subscriptions::Keep;
use super::topic;
use crate::daemon::config::UplinkConfig;
use crate::daemon::health::{Beat, Health};
use crate::daemon::status::{Board, LaneCounts, UplinkStatus};

#[derive(Debug, Clone, thiserror::Error)]
pub enum UplinkError {
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    #[error("not connected")]
    NotConnected,
    #[error("connection lost before the broker acknowledged the request")]
    ConnectionLost,
    #[error("request queue full")]
    Busy,
    #[error("uplink stopped")]
    Closed,
    #[error("{what} of {size} bytes exceeds the {max}-byte limit")]
    TooLarge {
        what: &'static str,
        size: usize,
        max: usize,
    },
    /// A topic (or filter) AWS IoT would refuse: retrying cannot help.
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic { topic: String, reason: &'static str },
    #[error("{0}")]
    Connect(String),
    #[error("connection refused permanently: {0}")]
    ConnectPermanent(String),
}

impl UplinkError {
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            UplinkError::NotConnected
                | UplinkError::ConnectionLost
                | UplinkError::Busy
                | UplinkError::Connect(_)
        )
    }
}

/// AWS IoT: at most 8 filters in one SUBSCRIBE.
const FILTERS_PER_SUBSCRIBE: usize = 8;

pub(crate) fn check_topic(t: &str) -> Result<(), UplinkError> {
    topic::check_topic(t).map_err(|reason| UplinkError::InvalidTopic {
        topic: t.to_owned(),
        reason,
    })
}

pub(crate) fn check_filter(f: &str) -> Result<(), UplinkError> {
    topic::check_filter(f).map_err(|reason| UplinkError::InvalidTopic {
        topic: f.to_owned(),
        reason,
    })
}

/// Who is connecting, with what.
#[derive(Clone)]
pub struct UplinkParams {
    /// "claim" or "thing"; shown in status and logs.
    pub role: &'static str,
    pub endpoint: String,
    pub port: u16,
    pub root_ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_id: String,
    /// `false` asks the broker for a persistent session.
    pub clean_session: bool,
    pub config: UplinkConfig,
    /// Longest delay before retrying a CONNECT the broker refused for good (bad certificate,
    /// ...): the first retry comes after at most a minute, then the wait doubles up to this.
    pub permanent_retry: Duration,
}

impl std::fmt::Debug for UplinkParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UplinkParams")
            .field("role", &self.role)
            .field("endpoint", &self.endpoint)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// Connection state as seen by users of the uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connecting,
    Connected,
    Down { error: String, permanent: bool },
}

/// Exponential backoff with "equal jitter": the delay is uniform in [cap/2, cap], where cap
/// doubles per failure from `initial` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// `unit` in [0, 1) is the random draw (injected so tests are deterministic).
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let factor = 2f64.powi(self.attempt.min(30) as i32);
        let cap = self.initial.mul_f64(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        cap / 2 + (cap / 2).mul_f64(unit.clamp(0.0, 1.0))
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }
}

/// Remembers the last CONNECT per client id so no client id connects more than once per floor,
/// across uplink instances (AWS throttles CONNECTs per client id). On tokio's clock.
#[derive(Debug, Default)]
pub struct ConnectPacer {
    last: Mutex<HashMap<String, Instant>>,
    /// Where the wall-clock time of each client id's last CONNECT is kept, so that a restart
    /// within the floor waits out the rest instead of being throttled by the cloud.
    file: Option<std::path::PathBuf>,
}

/// First wait after the broker refused a CONNECT for good; it doubles up to `permanent_retry`.
const REFUSED_RETRY_FIRST: Duration = Duration::from_secs(60);

/// How long a remembered CONNECT matters (AWS counts one per second per client id).
const REMEMBER_CONNECTS: Duration = Duration::from_secs(10);

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ConnectPacer {
    /// A pacer that remembers CONNECT times in `file` (JSON `{client_id: unix_ms}`) across
    /// restarts. An unreadable or missing file is an empty memory.
    pub fn persistent(file: std::path::PathBuf) -> ConnectPacer {
        let now_ms = unix_ms();
        let now = Instant::now();
        let saved: HashMap<String, u64> = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let last = saved
            .into_iter()
            .filter_map(|(id, at)| {
                let age = Duration::from_millis(now_ms.checked_sub(at)?);
                (age < REMEMBER_CONNECTS).then(|| Some((id, now.checked_sub(age)?)))?
            })
            .collect();
        ConnectPacer {
            last: Mutex::new(last),
            file: Some(file),
        }
    }

    fn save(&self, last: &HashMap<String, Instant>) {
        let Some(file) = &self.file else { return };
        let now = Instant::now();
        let now_ms = unix_ms();
        let recent: HashMap<&String, u64> = last
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) < REMEMBER_CONNECTS)
            .map(|(id, at)| {
                let ahead = at.saturating_duration_since(now).as_millis() as u64;
                let ago = now.saturating_duration_since(*at).as_millis() as u64;
                (id, now_ms + ahead - ago.min(now_ms))
            })
            .collect();
        if let Ok(text) = serde_json::to_vec(&recent) {
            // Best effort: losing it costs at most one throttled CONNECT after a restart.
            let tmp = file.with_extension("json.tmp");
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, file);
            }
        }
    }

    /// How long to wait before a CONNECT at `now` may go out; records the slot it takes.
    pub fn reserve(&self, client_id: &str, floor: Duration, now: Instant) -> Duration {
        let mut last = lock(&self.last);
        let at = match last.get(client_id) {
            Some(prev) => (*prev + floor).max(now),
            None => now,
        };
        last.insert(client_id.to_owned(), at);
        at - now
    }

    /// Moves the client id's last slot to `now` when a CONNECT attempt ends (CONNACK or failure).
    /// The slot taken by `reserve` is when the TCP+TLS work started; the broker counts from when
    /// the CONNECT packet arrives, after the handshake, so a slow first handshake followed by a
    /// fast second one could otherwise put two CONNECTs less than the floor apart at the broker.
    pub fn mark(&self, client_id: &str, now: Instant) {
        let mut last = lock(&self.last);
        let slot = last.entry(client_id.to_owned()).or_insert(now);
        *slot = (*slot).max(now);
        self.save(&last);
    }
}

type AckResult = Result<Option<Vec<SubscribeReasonCode>>, UplinkError>;

/// A publish handed to the connection, waiting for its acknowledgement (QoS 1: the PUBACK).
/// Dropping it abandons the wait, not the publish.
pub struct PendingAck {
    rx: oneshot::Receiver<AckResult>,
    size: usize,
    board: Arc<Board>,
}

impl std::fmt::Debug for PendingAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAck")
            .field("size", &self.size)
            .finish()
    }
}

impl PendingAck {
    /// Resolves with the PUBACK, or the error that ended the wait (`ConnectionLost`).
    pub async fn wait(self) -> Result<(), UplinkError> {
        self.await
    }

    /// The outcome if it is known now (without waiting).
    pub fn try_done(&mut self) -> Option<Result<(), UplinkError>> {
        let r = match self.rx.try_recv() {
            Ok(r) => r,
            Err(oneshot::error::TryRecvError::Empty) => return None,
            Err(oneshot::error::TryRecvError::Closed) => Err(UplinkError::Closed),
        };
        Some(self.finish(r))
    }

    fn finish(&self, r: AckResult) -> Result<(), UplinkError> {
        r?;
        self.board.count_publish(self.size);
        Ok(())
    }
}

/// Resolves once, like `wait`; not to be polled again after it resolved.
impl std::future::Future for PendingAck {
    type Output = Result<(), UplinkError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match std::pin::Pin::new(&mut self.rx).poll(cx) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(r) => {
                std::task::Poll::Ready(self.finish(r.unwrap_or(Err(UplinkError::Closed))))
            }
        }
    }
}

/// Who waits for a request's acknowledgement.
struct Waiter {
    /// The caller, if any (restoring subscribes and owed unsubscribes have none).
    tx: Option<oneshot::Sender<AckResult>>,
    /// The filters of a SUBSCRIBE or UNSUBSCRIBE.
    filters: Vec<String>,
    /// A SUBSCRIBE that restores recorded subscriptions.
    restore: bool,
}

impl Waiter {
    fn caller(filters: Vec<String>) -> (Waiter, oneshot::Receiver<AckResult>) {
        let (tx, rx) = oneshot::channel();
        (
            Waiter {
                tx: Some(tx),
                filters,
                restore: false,
            },
            rx,
        )
    }

    fn finish(self, r: AckResult) {
        if let Some(tx) = self.tx {
            let _ = tx.send(r);
        }
    }
}

#[derive(Default)]
struct Shared {
    connected: bool,
    /// Bumped on every disconnect: an acknowledgement is sent only on the connection its
    /// message came on (a packet id means nothing on the next one).
    epoch: u64,
    acks: Acks<Waiter>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere; the data is still usable for our purposes.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hands one request to rumqttc with its waiter; under `Shared`'s lock, so the FIFO order is
/// rumqttc's order.
fn enqueue(
    s: &mut Shared,
    client: &AsyncClient,
    kind: Kind,
    waiter: Waiter,
    send: impl FnOnce(&AsyncClient) -> Result<(), rumqttc::ClientError>,
) -> Result<(), UplinkError> {
    if !s.connected {
        return Err(UplinkError::NotConnected);
    }
    s.acks.queued(kind, waiter);
    if let Err(e) = send(client) {
        s.acks.unqueue_last();
        // Topics and filters are checked before this, so a refusal means the channel is full.
        return Err(match e {
            rumqttc::ClientError::TryRequest(_) => UplinkError::Busy,
            rumqttc::ClientError::Request(_) => UplinkError::Closed,
        });
    }
    Ok(())
}

fn subscribe_request(
    filters: &[String],
) -> impl FnOnce(&AsyncClient) -> Result<(), rumqttc::ClientError> + '_ {
    move |c| {
        c.try_subscribe_many(
            filters
                .iter()
                .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
        )
    }
}

/// Sends the PUBACK for an incoming message, if the connection it came on is still the current
/// one. Under `Shared`'s lock, so it cannot slip past a disconnect's `EventLoop::clean`.
fn send_ack(shared: &Mutex<Shared>, client: &AsyncClient, epoch: u64, pkid: u16, qos: QoS) {
    let s = lock(shared);
    if s.epoch != epoch {
        tracing::debug!(
            pkid,
            "not acknowledged: the connection it came on is gone (a resumed session resends it)"
        );
        return;
    }
    let mut p = Publish::new("", qos, Vec::new());
    p.pkid = pkid;
    if client.try_ack(&p).is_err() {
        tracing::warn!(
            pkid,
            "incoming message not acknowledged: request queue full; a resumed session resends it"
        );
    }
}

/// Handle to a running connection. Dropping it does not stop the driver; call `shutdown`.
pub struct Uplink {
    role: &'static str,
    client: AsyncClient,
    shared: Arc<Mutex<Shared>>,
    hub: Arc<Hub>,
    state: watch::Receiver<LinkState>,
    limiter: Limiter,
    max_payload: usize,
    max_packet: usize,
    board: Arc<Board>,
    cancel: CancellationToken,
    driver: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Asks the driver to drop the connection and make a new one (`recycle`).
    recycle: Arc<tokio::sync::Notify>,
}

pub fn tls_config(p: &UplinkParams) -> Result<Arc<rustls::ClientConfig>, UplinkError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| UplinkError::TlsSetup(format!("{what}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&p.root_ca_pem) {
        let cert = cert.map_err(|e| bad("root CA PEM", &e))?;
        roots.add(cert).map_err(|e| bad("root CA", &e))?;
    }
    if roots.is_empty() {
        return Err(UplinkError::TlsSetup(
            "root CA file holds no certificate".into(),
        ));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&p.cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad("client certificate PEM", &e))?;
    if chain.is_empty() {
        return Err(UplinkError::TlsSetup(
            "client certificate file holds no certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&p.key_pem).map_err(|e| bad("private key PEM", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS versions", &e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad("client certificate/key", &e))?;
    if p.port == 443 {
        cfg.alpn_protocols = vec![b"x-amzn-mqtt-ca".to_vec()];
    }
    Ok(Arc::new(cfg))
}

/// Whether a connection error will recur on every retry (credentials refused), as opposed to a
/// network or broker outage.
fn classify(e: &ConnectionError) -> bool {
    if clock_behind(e) {
        return false;
    }
    match e {
        ConnectionError::ConnectionRefused(code) => matches!(
            code,
            ConnectReturnCode::NotAuthorized
                | ConnectReturnCode::BadUserNamePassword
                | ConnectReturnCode::BadClientId
                | ConnectReturnCode::RefusedProtocolVersion
        ),
        other => {
            let s = other.to_string();
            // rustls reports a peer's rejection of our certificate as a fatal alert, and its own
            // rejection of the server certificate as InvalidCertificate.
            [
                "BadCertificate",
                "CertificateRevoked",
                "CertificateUnknown",
                "CertificateExpired",
                "UnsupportedCertificate",
                "UnknownCA",
                "AccessDenied",
                "CertificateRequired",
                "invalid peer certificate",
            ]
            .iter()
            .any(|needle| s.contains(needle))
        }
    }
}

/// The endpoint's certificate is "not valid yet" by our clock: the clock is behind (a board
/// without RTC before NTP), not a verdict of the cloud's.
fn clock_behind(e: &ConnectionError) -> bool {
    let s = e.to_string();
    s.contains("not valid yet") || s.contains("NotValidYet")
}

/// An error in words an admin can act on: the OS error number is dropped (`(os error 111)`),
/// and a clock behind the endpoint's certificate is named as such.
fn plain(e: &ConnectionError) -> String {
    if clock_behind(e) {
        return "the endpoint's certificate is not valid yet by this machine's clock: the system \
                clock is behind (set it: NTP, RTC); retrying"
            .to_owned();
    }
    plain_text(&e.to_string())
}

/// `plain` on the text: rumqttc's layer prefixes, OS error numbers and documentation links
/// dropped.
fn plain_text(s: &str) -> String {
    let mut s = s.to_owned();
    for prefix in [
        "Mqtt state: ",
        "Mqtt serialization/deserialization error: ",
        "I/O: ",
        "IO: ",
    ] {
        while let Some(rest) = s.strip_prefix(prefix) {
            s = rest.to_owned();
        }
    }
    if let Some(i) = s.find(" (os error ") {
        let end = s[i..].find(')').map(|j| i + j + 1).unwrap_or(s.len());
        s.replace_range(i..end, "");
    }
    if let Some(i) = s.find(": https://") {
        s.truncate(i);
    }
    s
}

/// AWS IoT (like iotcore-sim) answers a refused CONNECT by hanging up, not with a CONNACK code
/// (AWS_ERROR_MQTT_UNEXPECTED_HANGUP in the AWS SDKs). One hang-up can be a JITP/JITR first
/// connection or a broker restart; this many in a row, each after a good TCP+TLS handshake,
/// is treated as a refusal.
const HANGUPS_MEAN_REFUSED: u32 = 3;

/// A connection that reached the broker, completed TLS, and was then closed by it (reset, EOF),
/// as opposed to a broker that cannot be reached at all (refused, unreachable, timeout) or that
/// closes the socket during the TLS handshake. The latter is what an overloaded or draining
/// endpoint (and `iotcore-sim fault refuse`) does, and it is an outage, not a verdict on our
/// certificate: AWS decides on the certificate after the handshake (TLS 1.3 clients finish
/// theirs before the server has looked at the client certificate).
fn is_hangup(e: &ConnectionError) -> bool {
    if matches!(e, ConnectionError::Tls(_)) {
        return false;
    }
    let s = e.to_string().to_ascii_lowercase();
    [
        "reset by peer",
        "close_notify",
        "eof",
        "connection aborted",
        "broken pipe",
    ]
    .iter()
    .any(|n| s.contains(n))
}

impl Uplink {
    /// Starts the driver task; returns at once (the connection comes up in the background).
    pub(crate) fn start(
        params: UplinkParams,
        pacer: Arc<ConnectPacer>,
        board: Arc<Board>,
        health: &Arc<Health>,
        parent: &CancellationToken,
        state_tx: Arc<watch::Sender<LinkState>>,
        hub: Arc<Hub>,
    ) -> Result<Arc<Uplink>, UplinkError> {
        let tls = tls_config(&params)?;
        let (incoming_packet, outgoing_packet) = params.config.packet_limits();
        let mut opts = MqttOptions::new(
            params.client_id.clone(),
            params.endpoint.clone(),
            params.port,
        );
        opts.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)))
            .set_keep_alive(Duration::from_secs(params.config.keep_alive_secs.max(1)))
            .set_clean_session(params.clean_session)
            .set_max_packet_size(incoming_packet, outgoing_packet)
            .set_inflight(100)
            // Incoming QoS 1 is acknowledged once handed on (`routes`), never before.
            .set_manual_acks(true);
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        // rumqttc leaves Nagle on: a small request (SUBSCRIBE, a fleet call, its UNSUBSCRIBE)
        // then waits for the ACK of the previous segment, which the peer delays (~40 ms), so
        // every request-response exchange cost ~40 ms (NOTES "Children provisioning").
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let shared = Arc::new(Mutex::new(Shared::default()));
        state_tx.send_replace(LinkState::Connecting);
        let state_rx = state_tx.subscribe();
        let cancel = parent.child_token();
        board.set_uplink(UplinkStatus {
            role: params.role.to_owned(),
            client_id: params.client_id.clone(),
            endpoint: format!("{}:{}", params.endpoint, params.port),
            state: "connecting".into(),
            ..Default::default()
        });
        let recycle = Arc::new(tokio::sync::Notify::new());
        let driver = Driver {
            recycle: recycle.clone(),
            client: client.clone(),
            params: params.clone(),
            eventloop,
            shared: shared.clone(),
            hub: hub.clone(),
            state: state_tx,
            pacer,
            board: board.clone(),
            cancel: cancel.clone(),
        };
        let beat = health.register(format!("uplink {} ({})", params.role, params.client_id));
        let span = tracing::info_span!("uplink", role = params.role, client_id = %params.client_id);
        let handle = tokio::spawn(tracing::Instrument::instrument(
            driver.run_beating(beat),
            span,
        ));
        let lane_board = board.clone();
        Ok(Arc::new(Uplink {
            role: params.role,
            client,
            shared,
            hub,
            state: state_rx,
            limiter: Limiter::new(
                params.config.publishes_per_sec,
                params.config.bytes_per_sec,
                move |[control, provisioning, telemetry]| {
                    lane_board.update_uplink(|u| {
                        u.waiting = LaneCounts {
                            control,
                            provisioning,
                            telemetry,
                        }
                    });
                },
            ),
            max_payload: params.config.max_payload_bytes,
            max_packet: outgoing_packet,
            board,
            cancel,
            driver: Mutex::new(Some(handle)),
            recycle,
        }))
    }

    pub fn role(&self) -> &'static str {
        self.role
    }

    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }

    /// Waits until connected, a permanent refusal, or `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), UplinkError> {
        let mut rx = self.state.clone();
        let res = tokio::time::timeout(timeout, async {
            loop {
                match &*rx.borrow_and_update() {
                    LinkState::Connected => return Ok(()),
                    LinkState::Down {
                        error,
                        permanent: true,
                    } => return Err(UplinkError::ConnectPermanent(error.clone())),
                    _ => {}
                }
                if rx.changed().await.is_err() {
                    return Err(UplinkError::Closed);
                }
            }
        })
        .await;
        match res {
            Ok(r) => r,
            Err(_) => Err(match &*self.state.borrow() {
                LinkState::Down { error, .. } => UplinkError::Connect(error.clone()),
                _ => UplinkError::Connect("timed out waiting for CONNACK".into()),
            }),
        }
    }

    async fn await_ack(rx: oneshot::Receiver<AckResult>) -> AckResult {
        rx.await.unwrap_or(Err(UplinkError::Closed))
    }

    /// Waits for the limiter to let `lane` go and hands the publish to rumqttc; returns the
    /// acknowledgement to wait for. Publishes started one after another by one caller go out on
    /// the connection in that order (the bridge keeps a window of them in flight this way).
    pub async fn start_publish(
        &self,
        lane: Lane,
        topic: &str,
        qos: QoS,
        payload: Vec<u8>,
    ) -> Result<PendingAck, UplinkError> {
        check_topic(topic)?;
        if payload.len() > self.max_payload {
            return Err(UplinkError::TooLarge {
                what: "payload",
                size: payload.len(),
                max: self.max_payload,
            });
        }
        // Fixed header (≤5) + topic length prefix + topic + packet id.
        let size = 5 + 2 + topic.len() + 2 + payload.len();
        if size > self.max_packet {
            return Err(UplinkError::TooLarge {
                what: "packet",
                size,
                max: self.max_packet,
            });
        }
        // Waiting for tokens while disconnected would only queue failures.
        if !lock(&self.shared).connected {
            return Err(UplinkError::NotConnected);
        }
        let (permit, waited) = self.limiter.acquire(lane, size).await;
        if !waited.is_zero() {
            self.board.add_throttled(waited);
            tracing::debug!(
                wait_ms = waited.as_millis() as u64,
                ?lane,
                topic,
                "publish throttled by limiter"
            );
        }
        let (waiter, rx) = Waiter::caller(Vec::new());
        enqueue(
            &mut lock(&self.shared),
            &self.client,
            Kind::Publish,
            waiter,
            |c| c.try_publish(topic, qos, false, payload),
        )?;
        permit.sent();
        Ok(PendingAck {
            rx,
            size,
            board: self.board.clone(),
        })
    }

    /// Publishes after the limiter lets `lane` go; for QoS 1 returns once the PUBACK arrived.
    pub async fn publish(
        &self,
        lane: Lane,
        topic: &str,
        qos: QoS,
        payload: Vec<u8>,
    ) -> Result<(), UplinkError> {
        self.start_publish(lane, topic, qos, payload)
            .await?
            .wait()
            .await
    }

    /// Subscribes (QoS 1, at most 8 filters per SUBSCRIBE) and returns the broker's answers,
    /// one per filter. `Keep::Restore` filters are recorded first, connected or not.
    pub async fn subscribe(
        &self,
        filters: &[String],
        keep: Keep,
    ) -> Result<Vec<SubscribeReasonCode>, UplinkError> {
        for f in filters {
            check_filter(f)?;
        }
        let rxs = {
            let mut subs = lock(&self.hub.subs);
            subs.subscribing(filters, keep);
            let mut s = lock(&self.shared);
            let mut rxs = Vec::new();
            for chunk in filters.chunks(FILTERS_PER_SUBSCRIBE) {
                let (waiter, rx) = Waiter::caller(chunk.to_vec());
                enqueue(
                    &mut s,
                    &self.client,
                    Kind::Subscribe,
                    waiter,
                    subscribe_request(chunk),
                )?;
                rxs.push(rx);
            }
            rxs
        };
        let mut codes = Vec::with_capacity(filters.len());
        for rx in rxs {
            codes.extend(Self::await_ack(rx).await?.unwrap_or_default());
        }
        let answers: Vec<(String, bool)> = filters
            .iter()
            .zip(codes.iter())
            .map(|(f, c)| (f.clone(), !matches!(c, SubscribeReasonCode::Failure)))
            .collect();
        lock(&self.hub.subs).subscribed(&answers, keep);
        Ok(codes)
    }

    /// Queues an UNSUBSCRIBE per filter at once (synchronously, so it is ordered before
    /// anything the caller does next); the filters are owed until their UNSUBACK.
    pub(crate) fn start_unsubscribe(
        &self,
        filters: &[String],
    ) -> Result<Vec<oneshot::Receiver<AckResult>>, UplinkError> {
        let mut subs = lock(&self.hub.subs);
        subs.unsubscribing(filters);
        let mut s = lock(&self.shared);
        let mut rxs = Vec::new();
        for f in filters {
            let (waiter, rx) = Waiter::caller(vec![f.clone()]);
            enqueue(&mut s, &self.client, Kind::Unsubscribe, waiter, |c| {
                c.try_unsubscribe(f.clone())
            })?;
            rxs.push(rx);
        }
        Ok(rxs)
    }

    /// Unsubscribes and waits for every UNSUBACK.
    pub async fn unsubscribe(&self, filters: &[String]) -> Result<(), UplinkError> {
        for rx in self.start_unsubscribe(filters)? {
            Self::await_ack(rx).await?;
        }
        Ok(())
    }

    /// Sends DISCONNECT (if connected) and waits, bounded, for the driver to end.
    /// Drops the connection and connects again (after the CONNECT floor): what is waiting for
    /// an acknowledgement fails with `ConnectionLost`. For acknowledgements that never come
    /// (each one holds one of rumqttc's 100 in-flight slots until the connection is dropped).
    pub fn recycle(&self) {
        self.recycle.notify_one();
    }

    pub async fn shutdown(&self) {
        let _ = self.client.try_disconnect();
        let handle = lock(&self.driver).take();
        if let Some(handle) = handle {
            let abort = handle.abort_handle();
            if tokio::time::timeout(Duration::from_secs(3), handle)
                .await
                .is_err()
            {
                self.cancel.cancel();
                abort.abort();
            }
        }
        self.cancel.cancel();
    }
}

struct Driver {
    recycle: Arc<tokio::sync::Notify>,
    client: AsyncClient,
    params: UplinkParams,
    eventloop: EventLoop,
    shared: Arc<Mutex<Shared>>,
    hub: Arc<Hub>,
    state: Arc<watch::Sender<LinkState>>,
    pacer: Arc<ConnectPacer>,
    board: Arc<Board>,
    cancel: CancellationToken,
}

impl Driver {
    /// The driver loop, beating while it runs (the watchdog waits for its heartbeat).
    async fn run_beating(self, beat: Beat) {
        crate::daemon::health::run_beating(&beat, self.run()).await;
    }

    async fn run(mut self) {
        let p = &self.params;
        let mut backoff = Backoff::new(
            Duration::from_millis(p.config.backoff_initial_ms),
            Duration::from_secs(p.config.backoff_max_secs),
        );
        let mut connected_at: Option<Instant> = None;
        // A refusal is retried after at most a minute, then less and less often.
        let mut refused = Backoff::new(
            REFUSED_RETRY_FIRST.min(p.permanent_retry),
            p.permanent_retry,
        );
        // One WARN per outage: the first failure after being up (or at start) and the moment it
        // turns into a refusal; the rest at debug, whatever their text (TLS errors alternate).
        let mut warned = false;
        let mut warned_permanent = false;
        let mut disconnecting = false;
        // Consecutive hang-ups during CONNECT (TCP and TLS fine, then closed before CONNACK).
        let mut hangups = 0u32;
        loop {
            let connecting = self.eventloop.network.is_none();
            if self.eventloop.network.is_none() {
                let wait = self.pacer.reserve(
                    &self.params.client_id,
                    self.params.config.connect_floor(),
                    Instant::now(),
                );
                tokio::select! {
                    _ = self.cancel.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                self.set_state(LinkState::Connecting, "connecting");
                self.board.update_uplink(|u| u.connect_attempts += 1);
            }
            let event = tokio::select! {
                _ = self.cancel.cancelled() => {
                    self.disconnect_gracefully().await;
                    break;
                }
                () = self.recycle.notified(), if self.eventloop.network.is_some() => {
                    let error = "acknowledgements stopped coming on this connection (lost or stalled PUBACKs); reconnecting".to_owned();
                    tracing::warn!(%error, "dropping the connection");
                    self.eventloop.network = None;
                    self.fail_all();
                    if connected_at.take().is_some() {
                        self.board.update_uplink(|u| u.disconnects += 1);
                    }
                    self.board.update_uplink(|u| u.last_error = Some(error.clone()));
                    self.set_state(LinkState::Down { error, permanent: false }, "down");
                    continue;
                }
                ev = self.eventloop.poll() => ev,
            };
            match event {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    self.pacer.mark(&self.params.client_id, Instant::now());
                    connected_at = Some(Instant::now());
                    hangups = 0;
                    refused.reset();
                    if warned {
                        tracing::info!("connection restored");
                    }
                    warned = false;
                    warned_permanent = false;
                    tracing::info!(
                        session_present = ack.session_present,
                        endpoint = %self.params.endpoint,
                        port = self.params.port,
                        "connected"
                    );
                    self.connected(ack.session_present);
                    self.board.update_uplink(|u| {
                        u.connects += 1;
                        u.session_present = ack.session_present;
                        u.last_error = None;
                    });
                    self.set_state(LinkState::Connected, "connected");
                }
                Ok(Event::Incoming(Incoming::Publish(publish))) => self.route(publish),
                Ok(Event::Incoming(Incoming::PubAck(a))) => {
                    self.resolve(Kind::Publish, a.pkid, Ok(None));
                }
                Ok(Event::Incoming(Incoming::SubAck(a))) => {
                    self.resolve(Kind::Subscribe, a.pkid, Ok(Some(a.return_codes)));
                }
                Ok(Event::Incoming(Incoming::UnsubAck(a))) => {
                    self.resolve(Kind::Unsubscribe, a.pkid, Ok(None));
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => self.emitted(Kind::Publish, pkid),
                Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                    self.emitted(Kind::Subscribe, pkid);
                }
                Ok(Event::Outgoing(Outgoing::Unsubscribe(pkid))) => {
                    self.emitted(Kind::Unsubscribe, pkid);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    disconnecting = true;
                }
                Ok(_) => {}
                Err(e) => {
                    self.fail_all();
                    if disconnecting || matches!(e, ConnectionError::RequestsDone) {
                        break;
                    }
                    if connecting {
                        self.pacer.mark(&self.params.client_id, Instant::now());
                    }
                    if connecting && is_hangup(&e) {
                        hangups += 1;
                    } else {
                        hangups = 0;
                    }
                    let permanent = classify(&e) || hangups >= HANGUPS_MEAN_REFUSED;
                    let error = if hangups >= HANGUPS_MEAN_REFUSED {
                        format!(
                            "the broker closed the connection before CONNACK {hangups} times in a row \
                             (certificate inactive or revoked, or its policy denies iot:Connect for this client id); last: {}",
                            plain(&e)
                        )
                    } else {
                        plain(&e)
                    };
                    let was_up = connected_at.take();
                    if let Some(at) = was_up {
                        self.board.update_uplink(|u| u.disconnects += 1);
                        // Only a connection that held for a while proves the broker healthy.
                        if at.elapsed() >= Duration::from_secs(30) {
                            backoff.reset();
                        }
                    }
                    let delay = if permanent {
                        refused.next_delay()
                    } else {
                        backoff.next_delay()
                    };
                    if was_up.is_some() || !warned || (permanent && !warned_permanent) {
                        warned = true;
                        warned_permanent |= permanent;
                        tracing::warn!(
                            %error,
                            permanent,
                            retry_in_ms = delay.as_millis() as u64,
                            "{}",
                            if was_up.is_some() { "connection lost" } else { "connect failed" }
                        );
                    } else {
                        tracing::debug!(%error, retry_in_ms = delay.as_millis() as u64, "connect failed again");
                    }
                    self.board
                        .update_uplink(|u| u.last_error = Some(error.clone()));
                    self.set_state(
                        LinkState::Down { error, permanent },
                        if permanent { "refused" } else { "down" },
                    );
                    let board = self.board.clone();
                    tokio::select! {
                        _ = self.cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                        // `gatewayctl retry` / SIGHUP: an operator fixed the cause (activated the
                        // certificate, changed the policy).
                        () = board.link_retry_requested(), if permanent => {
                            tracing::info!("retry requested; connecting now");
                            refused.reset();
                        }
                    }
                }
            }
        }
        self.fail_all();
        self.set_state(
            LinkState::Down {
                error: "stopped".into(),
                permanent: false,
            },
            "stopped",
        );
        tracing::debug!("uplink driver stopped");
    }

    /// On shutdown: send DISCONNECT (so the broker drops no will and logs a clean close), bounded.
    async fn disconnect_gracefully(&mut self) {
        if self.eventloop.network.is_none() || self.client.try_disconnect().is_err() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match self.eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }

    fn set_state(&self, s: LinkState, label: &str) {
        self.board.update_uplink(|u| u.state = label.to_owned());
        let _ = self.state.send(s);
    }

    /// CONNACK: callers may queue requests again, and what the subscription record asks for
    /// is queued first (recorded subscriptions the broker may not hold, owed unsubscribes).
    fn connected(&self, session_present: bool) {
        let mut subs = lock(&self.hub.subs);
        let plan = subs.connack(session_present);
        let mut s = lock(&self.shared);
        s.connected = true;
        for chunk in plan.subscribe.chunks(FILTERS_PER_SUBSCRIBE) {
            let waiter = Waiter {
                tx: None,
                filters: chunk.to_vec(),
                restore: true,
            };
            if let Err(error) = enqueue(
                &mut s,
                &self.client,
                Kind::Subscribe,
                waiter,
                subscribe_request(chunk),
            ) {
                tracing::warn!(%error, filters = ?chunk, "cannot restore subscriptions; retried after the next reconnect");
            }
        }
        for f in &plan.unsubscribe {
            let waiter = Waiter {
                tx: None,
                filters: vec![f.clone()],
                restore: false,
            };
            let _ = enqueue(&mut s, &self.client, Kind::Unsubscribe, waiter, |c| {
                c.try_unsubscribe(f.clone())
            });
        }
        if !plan.subscribe.is_empty() || !plan.unsubscribe.is_empty() {
            tracing::info!(
                session_present,
                restore = plan.subscribe.len(),
                unsubscribe = plan.unsubscribe.len(),
                "restoring recorded subscriptions"
            );
        }
    }

    /// An incoming publish: handed to the routes, acknowledged as `routes` describes.
    fn route(&self, publish: Publish) {
        let ack = (publish.qos != QoS::AtMostOnce).then(|| {
            let shared = self.shared.clone();
            let client = self.client.clone();
            let epoch = lock(&self.shared).epoch;
            let (pkid, qos) = (publish.pkid, publish.qos);
            Ack::new(move || send_ack(&shared, &client, epoch, pkid, qos))
        });
        let topic = publish.topic.clone();
        match routes::dispatch(&self.hub.routes, publish, ack) {
            Dispatched::Taken => {}
            Dispatched::NoRoute => {
                tracing::warn!(%topic, "incoming message matches no route; acknowledged and dropped");
            }
            Dispatched::Refused { refused } => {
                self.board.update_uplink(|u| u.incoming_not_acked += 1);
                tracing::warn!(
                    %topic,
                    refused,
                    "incoming message not acknowledged: its receiver is busy or gone; the broker resends it on a resumed session"
                );
            }
        }
    }

    fn emitted(&self, kind: Kind, pkid: u16) {
        let r = lock(&self.shared).acks.emitted(kind, pkid);
        match r {
            Emitted::Waiting { displaced: None } => {}
            Emitted::Done(w) => w.finish(Ok(None)),
            Emitted::Waiting { displaced: Some(w) } => {
                tracing::warn!(pkid, ?kind, "packet id reused before its acknowledgement");
                w.finish(Err(UplinkError::ConnectionLost));
            }
            Emitted::Untracked => tracing::debug!(pkid, ?kind, "untracked outgoing packet"),
            Emitted::OutOfStep(w) => {
                tracing::error!(pkid, ?kind, "uplink bookkeeping out of step");
                w.finish(Err(UplinkError::ConnectionLost));
            }
        }
    }

    fn resolve(&self, kind: Kind, pkid: u16, r: AckResult) {
        let Some(w) = lock(&self.shared).acks.acked(kind, pkid) else {
            tracing::debug!(pkid, ?kind, "acknowledgement for an untracked packet");
            return;
        };
        match (kind, &r) {
            (Kind::Subscribe, Ok(Some(codes))) if w.restore => {
                let mut subs = lock(&self.hub.subs);
                for (f, code) in w.filters.iter().zip(codes) {
                    let granted = !matches!(code, SubscribeReasonCode::Failure);
                    subs.restored(f, granted);
                    if !granted {
                        tracing::warn!(filter = %f, "recorded subscription refused by the broker (policy?); tried again after the next reconnect");
                    }
                }
            }
            (Kind::Unsubscribe, Ok(_)) => lock(&self.hub.subs).unsubscribed(&w.filters),
            _ => {}
        }
        w.finish(r);
    }

    /// On disconnect: everyone waiting is told, acknowledgements of messages from this
    /// connection are void (`epoch`), and rumqttc's replay queue (including requests still in
    /// its channel) is dropped, so no stale packet can be matched to a new waiter.
    fn fail_all(&mut self) {
        let mut s = lock(&self.shared);
        s.connected = false;
        s.epoch += 1;
        let waiters: Vec<Waiter> = s.acks.drain().collect();
        self.eventloop.clean();
        self.eventloop.pending.clear();
        drop(s);
        for w in waiters {
            w.finish(Err(UplinkError::ConnectionLost));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        assert_eq!(b.next_with(0.0), Duration::from_millis(500));
        assert_eq!(b.next_with(1.0), Duration::from_secs(2));
        let d = b.next_with(0.5);
        assert!(
            d >= Duration::from_secs(2) && d <= Duration::from_secs(4),
            "{d:?}"
        );
        for _ in 0..40 {
            assert!(b.next_with(1.0) <= Duration::from_secs(10));
        }
        assert!(b.next_with(0.0) >= Duration::from_secs(5));
        b.reset();
        assert!(b.next_with(1.0) <= Duration::from_secs(1));
    }

    #[test]
    fn backoff_jitter_spreads() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut b = Backoff::new(Duration::from_secs(8), Duration::from_secs(8));
            seen.insert(b.next_delay().as_millis());
        }
        assert!(seen.len() > 5, "jitter should spread reconnects: {seen:?}");
    }

    #[test]
    fn pacer_keeps_floor_per_client_id() {
        let p = ConnectPacer::default();
        let t0 = Instant::now();
        let floor = Duration::from_secs(1);
        assert_eq!(p.reserve("a", floor, t0), Duration::ZERO);
        assert_eq!(p.reserve("a", floor, t0), floor);
        // A third attempt queues behind the second.
        assert_eq!(
            p.reserve("a", floor, t0 + Duration::from_millis(500)),
            Duration::from_millis(1500)
        );
        assert_eq!(p.reserve("b", floor, t0), Duration::ZERO);
        assert_eq!(
            p.reserve("b", floor, t0 + Duration::from_secs(5)),
            Duration::ZERO
        );
    }

    #[test]
    fn pacer_counts_the_floor_from_the_end_of_the_handshake() {
        let p = ConnectPacer::default();
        let t0 = Instant::now();
        let floor = Duration::from_secs(1);
        assert_eq!(p.reserve("a", floor, t0), Duration::ZERO);
        // The first attempt's TCP+TLS took 400 ms before its CONNECT reached the broker.
        p.mark("a", t0 + Duration::from_millis(400));
        assert_eq!(
            p.reserve("a", floor, t0 + Duration::from_millis(500)),
            Duration::from_millis(900)
        );
        // Marking never moves a slot backwards.
        p.mark("a", t0);
        assert_eq!(
            p.reserve("a", floor, t0 + Duration::from_millis(1400)),
            Duration::from_secs(1)
        );
    }
    /// An uplink that never connects (nothing listens on its port).
    fn unconnected() -> Arc<Uplink> {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut p = params(port);
        p.endpoint = "127.0.0.1".into();
        p.config.backoff_initial_ms = 60_000;
        Uplink::start(
            p,
            Arc::new(ConnectPacer::default()),
            Board::new(),
            &Health::new(None),
            &CancellationToken::new(),
            Arc::new(watch::channel(LinkState::Connecting).0),
            Arc::new(Hub::default()),
        )
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn failed_or_cancelled_publishes_give_their_limiter_tokens_back() {
        let up = unconnected();
        // Three times the per-second burst of publishes that cannot be sent.
        for _ in 0..300 {
            let r = up
                .publish(Lane::Telemetry, "t", QoS::AtLeastOnce, vec![0; 1000])
                .await;
            assert!(matches!(r, Err(UplinkError::NotConnected)), "{r:?}");
        }
        let snap = up.board.snapshot().uplink.unwrap();
        assert_eq!(
            snap.throttled_events, 0,
            "failed publishes must not throttle later ones"
        );
        // The whole burst is still there.
        for _ in 0..100 {
            let (p, waited) = up.limiter.acquire(Lane::Telemetry, 1000).await;
            assert_eq!(waited, Duration::ZERO);
            p.sent();
        }

        // A caller dropped while it waits for its turn gives its tokens back: the slot it
        // waited for goes to the next caller.
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_millis(1),
            up.limiter.acquire(Lane::Telemetry, 1000),
        )
        .await;
        assert!(r.is_err(), "the publish should still be waiting");
        assert_eq!(up.limiter.waiting(), [0, 0, 0]);
        let _p = up.limiter.acquire(Lane::Telemetry, 1000).await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(10));
        up.shutdown().await;
    }

    #[tokio::test]
    async fn payload_limit_is_separate_from_the_packet_limit() {
        let up = unconnected();
        assert_eq!(up.max_payload, 128 * 1024);
        assert_eq!(
            up.max_packet,
            128 * 1024 + crate::daemon::config::PACKET_OVERHEAD_BYTES
        );
        // A full 128 KiB payload passes the size checks (and fails only for want of a connection).
        let r = up
            .publish(
                Lane::Telemetry,
                "dt/plant-3/gw-0001/telemetry",
                QoS::AtLeastOnce,
                vec![0; 128 * 1024],
            )
            .await;
        assert!(matches!(r, Err(UplinkError::NotConnected)), "{r:?}");
        let r = up
            .publish(
                Lane::Telemetry,
                "t",
                QoS::AtLeastOnce,
                vec![0; 128 * 1024 + 1],
            )
            .await;
        assert!(
            matches!(
                r,
                Err(UplinkError::TooLarge {
                    what: "payload",
                    ..
                })
            ),
            "{r:?}"
        );
        up.shutdown().await;
    }

    /// rumqttc refuses an invalid topic with the same error as a full queue (`TryRequest`),
    /// which read as `Busy`, a transient error retried forever. Topics and filters are
    /// checked before anything is queued (connected or not) and fail for good.
    #[tokio::test]
    async fn invalid_topics_are_permanent_errors() {
        let up = unconnected();
        let long = format!("dt/{}", "x".repeat(254));
        for bad in ["", "dt/+/gw", "dt/#", "dt/a\0b", &long, "a/b/c/d/e/f/g/h/i"] {
            let r = up
                .publish(Lane::Telemetry, bad, QoS::AtLeastOnce, vec![1])
                .await;
            match r {
                Err(e @ UplinkError::InvalidTopic { .. }) => {
                    assert!(!e.is_transient(), "{e}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let r = up.subscribe(&["cmd/#/x".to_owned()], Keep::Transient).await;
        assert!(matches!(r, Err(UplinkError::InvalidTopic { .. })), "{r:?}");
        // A valid topic gets as far as the connection check.
        let r = up
            .publish(Lane::Telemetry, "dt/a/b", QoS::AtLeastOnce, vec![1])
            .await;
        assert!(matches!(r, Err(UplinkError::NotConnected)), "{r:?}");
        up.shutdown().await;
    }

    #[test]
    fn connect_times_survive_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("connects.json");
        let floor = Duration::from_secs(1);
        let before = ConnectPacer::persistent(file.clone());
        assert_eq!(
            before.reserve("gw-1", floor, Instant::now()),
            Duration::ZERO
        );
        before.mark("gw-1", Instant::now());
        drop(before);
        // The next process waits out (nearly) the whole floor for that client id only.
        let after = ConnectPacer::persistent(file.clone());
        let wait = after.reserve("gw-1", floor, Instant::now());
        assert!(wait > Duration::from_millis(500), "{wait:?}");
        assert_eq!(
            after.reserve("other", floor, Instant::now()),
            Duration::ZERO
        );
        // A garbage file is an empty memory, not an error.
        std::fs::write(&file, "not json").unwrap();
        let fresh = ConnectPacer::persistent(file);
        assert_eq!(fresh.reserve("gw-1", floor, Instant::now()), Duration::ZERO);
    }

    #[test]
    fn errors_are_put_in_plain_words() {
        assert_eq!(
            plain_text("I/O: Connection refused (os error 111)"),
            "Connection refused"
        );
        assert_eq!(
            plain_text(
                "Mqtt state: Mqtt serialization/deserialization error: IO: peer closed connection \
                 without sending TLS close_notify: https://docs.rs/rustls/latest/rustls/manual/"
            ),
            "peer closed connection without sending TLS close_notify"
        );
        let not_yet = ConnectionError::Io(std::io::Error::other(
            "invalid peer certificate: certificate not valid yet: verification time 1 (UNIX), \
             but certificate is not valid before 2 (1 seconds in future)",
        ));
        assert!(plain(&not_yet).contains("system clock is behind"));
        assert!(!classify(&not_yet), "a clock behind is not a refusal");
    }

    #[test]
    fn hangups_are_told_from_outages() {
        let reset = ConnectionError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "Connection reset by peer (os error 104)",
        ));
        assert!(is_hangup(&reset));
        let refused = ConnectionError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        ));
        assert!(!is_hangup(&refused));
        assert!(!is_hangup(&ConnectionError::NetworkTimeout));
        // Closed during the TLS handshake: an outage (load balancer, refusing broker).
        let in_handshake = ConnectionError::Tls(rumqttc::TlsError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "tls handshake eof",
        )));
        assert!(!is_hangup(&in_handshake));
    }

    fn params(port: u16) -> UplinkParams {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["dev".to_owned()])
            .unwrap()
            .signed_by(&key, &rcgen::Issuer::new(ca, &ca_key))
            .unwrap();
        UplinkParams {
            role: "thing",
            endpoint: "example-ats.iot.eu-west-1.amazonaws.com".into(),
            port,
            root_ca_pem: ca_cert.pem().into_bytes(),
            cert_pem: cert.pem().into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
            client_id: "dev".into(),
            clean_session: false,
            config: UplinkConfig::default(),
            permanent_retry: Duration::from_secs(1),
        }
    }

    #[test]
    fn alpn_only_on_443() {
        let c = tls_config(&params(443)).unwrap();
        assert_eq!(c.alpn_protocols, vec![b"x-amzn-mqtt-ca".to_vec()]);
        let c = tls_config(&params(8883)).unwrap();
        assert!(c.alpn_protocols.is_empty());
        let mut bad = params(8883);
        bad.key_pem = b"not a key".to_vec();
        assert!(matches!(tls_config(&bad), Err(UplinkError::TlsSetup(_))));
    }

    #[test]
    fn classification() {
        assert!(classify(&ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized
        )));
        assert!(!classify(&ConnectionError::ConnectionRefused(
            ConnectReturnCode::ServiceUnavailable
        )));
        assert!(!classify(&ConnectionError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused"
        ))));
        assert!(classify(&ConnectionError::Io(std::io::Error::other(
            "received fatal alert: CertificateRevoked"
        ))));
    }
}
