//! Uplink: one MQTT connection to AWS IoT Core (rumqttc over rustls/ring), kept alive.
//!
//! Owns the rumqttc event loop, its reconnect policy and the per-connection quotas. It adds what
//! rumqttc lacks (NOTES.md): backoff with jitter and a floor between CONNECTs of one client id
//! (rumqttc reconnects instantly), acknowledgement tracking per request (rumqttc gives no delivery
//! token), and a limiter for AWS's 100 publishes/s and 512 KiB/s. It never relies on rumqttc's
//! replay queue: on every disconnect waiting callers fail and the queue is dropped, so durable
//! delivery is the caller's job (the outbox, later). It does not know about provisioning.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, Incoming, MqttOptions,
    Outgoing, Publish, QoS, SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::daemon::config::UplinkConfig;
use crate::daemon::health::{Beat, Health};
use crate::daemon::status::{Board, UplinkStatus};

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
    /// Delay before retrying a CONNECT the broker refused for good (bad certificate, ...).
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
/// across uplink instances (AWS throttles CONNECTs per client id).
#[derive(Debug, Default)]
pub struct ConnectPacer {
    last: Mutex<HashMap<String, Instant>>,
}

impl ConnectPacer {
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
    }
}

/// Token buckets for publishes/s and bytes/s, each with one second of burst.
#[derive(Debug)]
pub struct Limiter {
    msg_rate: f64,
    byte_rate: f64,
    msgs: f64,
    bytes: f64,
    at: Instant,
}

impl Limiter {
    pub fn new(publishes_per_sec: u32, bytes_per_sec: u32, now: Instant) -> Limiter {
        Limiter {
            msg_rate: publishes_per_sec as f64,
            byte_rate: bytes_per_sec as f64,
            msgs: publishes_per_sec as f64,
            bytes: bytes_per_sec as f64,
            at: now,
        }
    }

    /// Takes one publish of `size` bytes and returns how long the caller must wait before
    /// sending it. Buckets may go negative, so later callers queue behind earlier ones.
    pub fn reserve(&mut self, size: usize, now: Instant) -> Duration {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now.max(self.at);
        self.msgs = (self.msgs + dt * self.msg_rate).min(self.msg_rate);
        self.bytes = (self.bytes + dt * self.byte_rate).min(self.byte_rate);
        self.msgs -= 1.0;
        self.bytes -= size as f64;
        let wait_m = if self.msgs < 0.0 {
            -self.msgs / self.msg_rate
        } else {
            0.0
        };
        let wait_b = if self.bytes < 0.0 {
            -self.bytes / self.byte_rate
        } else {
            0.0
        };
        Duration::from_secs_f64(wait_m.max(wait_b))
    }

    /// Gives back what `reserve` took for a publish that was never sent (not connected, queue
    /// full, caller gave up while waiting), so it does not delay later publishes.
    pub fn refund(&mut self, size: usize) {
        self.msgs = (self.msgs + 1.0).min(self.msg_rate);
        self.bytes = (self.bytes + size as f64).min(self.byte_rate);
    }
}

/// Refunds a limiter reservation when dropped, unless `sent` was called: covers both an enqueue
/// error and a caller cancelled while it waited for its turn.
struct Reservation<'a> {
    limiter: &'a Mutex<Limiter>,
    size: usize,
    sent: bool,
}

impl Reservation<'_> {
    fn sent(mut self) {
        self.sent = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.sent {
            lock(self.limiter).refund(self.size);
        }
    }
}

/// MQTT topic-filter matching (`+` one level, `#` the rest, including the parent level per
/// MQTT; AWS differs only for `#`, which we never subscribe to here).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

type AckResult = Result<Option<Vec<SubscribeReasonCode>>, UplinkError>;

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Kind {
    Publish,
    Subscribe,
    Unsubscribe,
}

struct Waiter {
    kind: Kind,
    tx: oneshot::Sender<AckResult>,
}

struct Route {
    id: u64,
    filter: String,
    tx: mpsc::Sender<Publish>,
}

#[derive(Default)]
struct Shared {
    connected: bool,
    /// Requests handed to rumqttc, in order, not yet written (rumqttc emits Outgoing in order).
    fifo: VecDeque<Waiter>,
    /// Written requests waiting for their PUBACK/SUBACK/UNSUBACK.
    acks: HashMap<u16, Waiter>,
    routes: Vec<Route>,
    next_route: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere; the data is still usable for our purposes.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Handle to a running connection. Dropping it does not stop the driver; call `shutdown`.
pub struct Uplink {
    role: &'static str,
    client: AsyncClient,
    shared: Arc<Mutex<Shared>>,
    state: watch::Receiver<LinkState>,
    limiter: Mutex<Limiter>,
    max_payload: usize,
    max_packet: usize,
    board: Arc<Board>,
    cancel: CancellationToken,
    driver: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Removes its route when dropped.
pub struct RouteGuard {
    shared: Arc<Mutex<Shared>>,
    id: u64,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        lock(&self.shared).routes.retain(|r| r.id != self.id);
    }
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
    pub fn start(
        params: UplinkParams,
        pacer: Arc<ConnectPacer>,
        board: Arc<Board>,
        health: &Arc<Health>,
        parent: &CancellationToken,
        state_tx: Arc<watch::Sender<LinkState>>,
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
            .set_inflight(100);
        let (client, eventloop) = AsyncClient::new(opts, 256);
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
        let driver = Driver {
            client: client.clone(),
            params: params.clone(),
            eventloop,
            shared: shared.clone(),
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
        Ok(Arc::new(Uplink {
            role: params.role,
            client,
            shared,
            state: state_rx,
            limiter: Mutex::new(Limiter::new(
                params.config.publishes_per_sec,
                params.config.bytes_per_sec,
                Instant::now(),
            )),
            max_payload: params.config.max_payload_bytes,
            max_packet: outgoing_packet,
            board,
            cancel,
            driver: Mutex::new(Some(handle)),
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

    /// Registers a route for incoming publishes matching `filter` (before subscribing, so nothing
    /// that arrives right after the SUBACK is lost).
    pub fn route(&self, filter: &str, capacity: usize) -> (RouteGuard, mpsc::Receiver<Publish>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let mut s = lock(&self.shared);
        s.next_route += 1;
        let id = s.next_route;
        s.routes.push(Route {
            id,
            filter: filter.to_owned(),
            tx,
        });
        (
            RouteGuard {
                shared: self.shared.clone(),
                id,
            },
            rx,
        )
    }

    fn enqueue(
        &self,
        kind: Kind,
        send: impl FnOnce(&AsyncClient) -> Result<(), rumqttc::ClientError>,
    ) -> Result<oneshot::Receiver<AckResult>, UplinkError> {
        let mut s = lock(&self.shared);
        if !s.connected {
            return Err(UplinkError::NotConnected);
        }
        let (tx, rx) = oneshot::channel();
        // Pushed and handed over under one lock, so the FIFO order is rumqttc's order.
        s.fifo.push_back(Waiter { kind, tx });
        if let Err(e) = send(&self.client) {
            s.fifo.pop_back();
            return Err(match e {
                rumqttc::ClientError::TryRequest(_) => UplinkError::Busy,
                _ => UplinkError::Closed,
            });
        }
        Ok(rx)
    }

    async fn await_ack(rx: oneshot::Receiver<AckResult>) -> AckResult {
        rx.await.unwrap_or(Err(UplinkError::Closed))
    }

    /// Publishes after the limiter allows it; for QoS 1 returns once the PUBACK arrived.
    pub async fn publish(
        &self,
        topic: &str,
        qos: QoS,
        payload: Vec<u8>,
    ) -> Result<(), UplinkError> {
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
        let wait = lock(&self.limiter).reserve(size, Instant::now());
        let reservation = Reservation {
            limiter: &self.limiter,
            size,
            sent: false,
        };
        if !wait.is_zero() {
            self.board.add_throttled(wait);
            tracing::debug!(
                wait_ms = wait.as_millis() as u64,
                topic,
                "publish throttled by limiter"
            );
            tokio::time::sleep(wait).await;
        }
        let rx = self.enqueue(Kind::Publish, |c| c.try_publish(topic, qos, false, payload))?;
        reservation.sent();
        Self::await_ack(rx).await?;
        self.board.count_publish(size);
        Ok(())
    }

    /// Subscribes (QoS 1) and returns the broker's per-filter answers from the SUBACK.
    pub async fn subscribe(
        &self,
        filters: &[String],
    ) -> Result<Vec<SubscribeReasonCode>, UplinkError> {
        let list: Vec<SubscribeFilter> = filters
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
            .collect();
        let rx = self.enqueue(Kind::Subscribe, |c| c.try_subscribe_many(list))?;
        Ok(Self::await_ack(rx).await?.unwrap_or_default())
    }

    pub async fn unsubscribe(&self, filter: &str) -> Result<(), UplinkError> {
        let rx = self.enqueue(Kind::Unsubscribe, |c| c.try_unsubscribe(filter))?;
        Self::await_ack(rx).await.map(|_| ())
    }

    /// Sends DISCONNECT (if connected) and waits, bounded, for the driver to end.
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
    client: AsyncClient,
    params: UplinkParams,
    eventloop: EventLoop,
    shared: Arc<Mutex<Shared>>,
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
        let mut last_error = String::new();
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
                ev = self.eventloop.poll() => ev,
            };
            match event {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    self.pacer.mark(&self.params.client_id, Instant::now());
                    lock(&self.shared).connected = true;
                    connected_at = Some(Instant::now());
                    hangups = 0;
                    last_error.clear();
                    tracing::info!(
                        session_present = ack.session_present,
                        endpoint = %self.params.endpoint,
                        port = self.params.port,
                        "connected"
                    );
                    self.board.update_uplink(|u| {
                        u.connects += 1;
                        u.session_present = ack.session_present;
                        u.last_error = None;
                    });
                    self.set_state(LinkState::Connected, "connected");
                }
                Ok(Event::Incoming(Incoming::Publish(publish))) => self.route(publish),
                Ok(Event::Incoming(Incoming::PubAck(a))) => self.resolve(a.pkid, Ok(None)),
                Ok(Event::Incoming(Incoming::SubAck(a))) => {
                    self.resolve(a.pkid, Ok(Some(a.return_codes)));
                }
                Ok(Event::Incoming(Incoming::UnsubAck(a))) => self.resolve(a.pkid, Ok(None)),
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => self.emitted(Kind::Publish, pkid),
                Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                    self.emitted(Kind::Subscribe, pkid)
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
                             (certificate inactive or revoked, or its policy denies iot:Connect for this client id); last: {e}"
                        )
                    } else {
                        e.to_string()
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
                        self.params.permanent_retry
                    } else {
                        backoff.next_delay()
                    };
                    if error != last_error {
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
                    last_error = error.clone();
                    self.board
                        .update_uplink(|u| u.last_error = Some(error.clone()));
                    self.set_state(
                        LinkState::Down { error, permanent },
                        if permanent { "refused" } else { "down" },
                    );
                    tokio::select! {
                        _ = self.cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
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

    fn route(&self, publish: Publish) {
        let s = lock(&self.shared);
        for r in s
            .routes
            .iter()
            .filter(|r| topic_matches(&r.filter, &publish.topic))
        {
            if r.tx.try_send(publish.clone()).is_err() {
                tracing::warn!(topic = %publish.topic, "incoming message dropped: receiver busy or gone");
            }
        }
    }

    fn emitted(&self, kind: Kind, pkid: u16) {
        let mut s = lock(&self.shared);
        let Some(w) = s.fifo.pop_front() else {
            tracing::debug!(pkid, "untracked outgoing packet");
            return;
        };
        if w.kind != kind {
            tracing::error!(pkid, ?kind, expected = ?w.kind, "uplink bookkeeping out of step");
            let _ = w.tx.send(Err(UplinkError::ConnectionLost));
            return;
        }
        if kind == Kind::Publish && pkid == 0 {
            // QoS 0: written is all there is.
            let _ = w.tx.send(Ok(None));
        } else {
            s.acks.insert(pkid, w);
        }
    }

    fn resolve(&self, pkid: u16, r: AckResult) {
        if let Some(w) = lock(&self.shared).acks.remove(&pkid) {
            let _ = w.tx.send(r);
        }
    }

    /// On disconnect: everyone waiting is told, and rumqttc's replay queue (including requests
    /// still in its channel) is dropped, so no stale packet can be matched to a new waiter.
    fn fail_all(&mut self) {
        let mut s = lock(&self.shared);
        s.connected = false;
        for w in s.fifo.drain(..) {
            let _ = w.tx.send(Err(UplinkError::ConnectionLost));
        }
        for (_, w) in s.acks.drain() {
            let _ = w.tx.send(Err(UplinkError::ConnectionLost));
        }
        self.eventloop.clean();
        self.eventloop.pending.clear();
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

    #[test]
    fn limiter_allows_burst_then_paces_messages() {
        let t0 = Instant::now();
        let mut l = Limiter::new(100, 512 * 1024, t0);
        for _ in 0..100 {
            assert_eq!(l.reserve(10, t0), Duration::ZERO);
        }
        let w = l.reserve(10, t0);
        assert!((w.as_secs_f64() - 0.01).abs() < 1e-6, "{w:?}");
        let w = l.reserve(10, t0);
        assert!((w.as_secs_f64() - 0.02).abs() < 1e-6, "{w:?}");
        // After a quiet second the bucket is full again.
        assert_eq!(l.reserve(10, t0 + Duration::from_secs(2)), Duration::ZERO);
    }

    #[test]
    fn limiter_paces_bytes() {
        let t0 = Instant::now();
        let mut l = Limiter::new(100, 512 * 1024, t0);
        for _ in 0..4 {
            assert_eq!(l.reserve(128 * 1024, t0), Duration::ZERO);
        }
        let w = l.reserve(128 * 1024, t0);
        assert!((w.as_secs_f64() - 0.25).abs() < 1e-6, "{w:?}");
        // Sustained: 100 publishes of 128 KiB take ~25 s, i.e. 512 KiB/s.
        let mut l = Limiter::new(100, 512 * 1024, t0);
        let mut last = Duration::ZERO;
        for _ in 0..100 {
            last = l.reserve(128 * 1024, t0);
        }
        assert!((last.as_secs_f64() - 24.0).abs() < 0.01, "{last:?}");
    }

    #[test]
    fn limiter_refund_returns_the_reservation() {
        let t0 = Instant::now();
        let mut l = Limiter::new(100, 512 * 1024, t0);
        for _ in 0..100 {
            assert_eq!(l.reserve(10, t0), Duration::ZERO);
        }
        let w = l.reserve(10, t0);
        assert!((w.as_secs_f64() - 0.01).abs() < 1e-6, "{w:?}");
        l.refund(10);
        // The refunded slot is free again: the next caller waits 10 ms, not 20 ms.
        let w = l.reserve(10, t0);
        assert!((w.as_secs_f64() - 0.01).abs() < 1e-6, "{w:?}");
        // A refund never lifts a bucket above its burst.
        let mut l = Limiter::new(100, 512 * 1024, t0);
        l.refund(1000);
        for _ in 0..100 {
            assert_eq!(l.reserve(10, t0), Duration::ZERO);
        }
        assert!(l.reserve(10, t0) > Duration::ZERO);
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
        )
        .unwrap()
    }

    #[tokio::test]
    async fn failed_or_cancelled_publishes_give_their_limiter_tokens_back() {
        let up = unconnected();
        // Three times the per-second burst of publishes that cannot be sent.
        for _ in 0..300 {
            let r = up.publish("t", QoS::AtLeastOnce, vec![0; 1000]).await;
            assert!(matches!(r, Err(UplinkError::NotConnected)), "{r:?}");
        }
        let snap = up.board.snapshot().uplink.unwrap();
        assert_eq!(
            snap.throttled_events, 0,
            "failed publishes must not throttle later ones"
        );
        assert_eq!(
            lock(&up.limiter).reserve(10, Instant::now()),
            Duration::ZERO
        );
        lock(&up.limiter).refund(10);

        // A caller dropped while it waits for its turn gives its tokens back too.
        let now = Instant::now();
        for _ in 0..100 {
            lock(&up.limiter).reserve(10, now);
        }
        let before = lock(&up.limiter).msgs;
        let r = tokio::time::timeout(
            Duration::from_millis(1),
            up.publish("t", QoS::AtLeastOnce, vec![0; 1000]),
        )
        .await;
        assert!(r.is_err(), "the publish should still be waiting: {r:?}");
        let after = lock(&up.limiter).msgs;
        assert!(
            (after - before).abs() < 0.5,
            "before {before}, after {after}"
        );
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
                "dt/plant-3/gw-0001/telemetry",
                QoS::AtLeastOnce,
                vec![0; 128 * 1024],
            )
            .await;
        assert!(matches!(r, Err(UplinkError::NotConnected)), "{r:?}");
        let r = up
            .publish("t", QoS::AtLeastOnce, vec![0; 128 * 1024 + 1])
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

    #[test]
    fn topic_filters() {
        assert!(topic_matches("a/b", "a/b"));
        assert!(!topic_matches("a/b", "a/b/c"));
        assert!(topic_matches("a/+/c", "a/x/c"));
        assert!(!topic_matches("a/+/c", "a/x/d"));
        assert!(topic_matches("a/#", "a/x/y"));
        assert!(topic_matches(
            "$aws/certificates/create-from-csr/json/accepted",
            "$aws/certificates/create-from-csr/json/accepted"
        ));
        assert!(!topic_matches(
            "$aws/certificates/create-from-csr/json/accepted",
            "$aws/certificates/create-from-csr/json/rejected"
        ));
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
