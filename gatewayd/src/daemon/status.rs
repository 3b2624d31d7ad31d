//! Status: the in-memory status board and the Unix status socket `gatewayctl` talks to.
//!
//! Owns the snapshot types shared by daemon and ctl, the socket (created with mode 0660) and its
//! one-line JSON protocol. Other modules write to the board; they never touch the socket. The
//! socket also carries `claim install` (trusted-user mode) to the identity engine through a
//! channel; it does not provision anything itself.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub version: String,
    pub pid: u32,
    pub started_at_unix: u64,
    pub uptime_secs: u64,
    pub identity: IdentityStatus,
    pub uplink: Option<UplinkStatus>,
    /// The local MQTT endpoint (`crate::local`), once started.
    #[serde(default)]
    pub local: Option<LocalStatus>,
    /// Children offered for provisioning, by state (`crate::children::provision`).
    #[serde(default)]
    pub children: Option<ChildrenSummary>,
    /// Device plugins polling children (`crate::telemetry`), one entry per plugin.
    #[serde(default)]
    pub plugins: Vec<PluginStatus>,
    /// The upstream bridge (`crate::bridge`), once started.
    #[serde(default)]
    pub bridge: Option<BridgeStatus>,
}

/// One device plugin's figures since start.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PluginStatus {
    pub name: String,
    /// Children polled now.
    pub children: u64,
    pub polls: u64,
    /// Polls the device did not answer at all (polling backs off).
    pub unreachable: u64,
    /// Points reported in a document's `errors` (exceptions, timeouts, malformed answers).
    pub point_errors: u64,
    /// Telemetry documents and write results stored in the outbox, and those it refused.
    pub published: u64,
    pub publish_failed: u64,
    /// Writes done, refused before the wire, and failed on the wire (exception, timeout).
    pub writes: u64,
    pub writes_refused: u64,
    pub writes_failed: u64,
    /// The plugin's own counters: requests on the wire, timeouts, reconnects, connects.
    pub requests: u64,
    pub timeouts: u64,
    pub reconnects: u64,
    pub connects: u64,
}

/// A device plugin's poller as the status socket sees it.
pub trait PluginService: Send + Sync + std::fmt::Debug {
    fn status(&self) -> PluginStatus;
}

/// The upstream bridge's figures (since start, except `backlog` and `in_flight`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BridgeStatus {
    /// Messages handed to the cloud connection (first sends and resends), alone or in envelopes.
    pub published: u64,
    /// Entries the cloud acknowledged (PUBACK), deleted from the outbox.
    pub acked: u64,
    /// Publishes sent again after a failure (lost connection, no PUBACK): possible duplicates.
    pub resent: u64,
    /// Entries dropped because no `[[bridge.mappings]]` rule matched their topic.
    pub dropped_unmapped: u64,
    pub ack_timeouts: u64,
    /// Times the publishes in flight failed and were released.
    pub failures: u64,
    /// Entries published and waiting for their PUBACK.
    pub in_flight: u64,
    /// Batch envelopes published (`[[bridge.mappings]] batch`), and the messages they carried.
    #[serde(default)]
    pub envelopes: u64,
    #[serde(default)]
    pub batched: u64,
    /// Outbox entries (waiting and in flight).
    pub backlog: u64,
    /// Children whose entries wait in the outbox for a thing name (not provisioned yet).
    pub waiting_for_thing: Vec<String>,
    /// Time publishes waited for the connection's quota (the uplink limiter, all lanes).
    pub throttled_ms: u64,
    pub last_error: Option<String>,
    /// The downstream half: cloud commands to children (`crate::bridge::downlink`).
    #[serde(default)]
    pub downlink: Option<DownlinkStatus>,
}

/// Cloud commands to children (since start, except `queued`, `per_child` and `subscribed`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DownlinkStatus {
    /// The cloud subscriptions the command rules made (once the gateway is its thing).
    pub subscribed: Vec<String>,
    /// Commands from the cloud written to the queue on disk.
    pub received: u64,
    /// Commands on disk now, and per child.
    pub queued: u64,
    pub per_child: std::collections::BTreeMap<String, u64>,
    /// Handed to a child: PUBACKed by an MQTT child (or sent, QoS 0), or carried out for a
    /// Modbus child.
    pub delivered: u64,
    /// Dropped undelivered after `[bridge] command_expiry_secs`; an expiry notice went up.
    pub expired: u64,
    /// Acknowledged and dropped: the thing is no child of this gateway.
    pub unknown_thing: u64,
    /// Acknowledged and dropped: no `[[bridge.commands]]` rule matches the topic (or a Modbus
    /// child got a topic other than `cmd/<child>/write`).
    pub unmapped: u64,
    /// Commands that could not be written to disk (not acknowledged to the cloud).
    pub store_failures: u64,
    pub last_error: Option<String>,
}

/// The downlink queue as the status socket sees it.
pub trait DownlinkService: Send + Sync + std::fmt::Debug {
    fn status(&self) -> DownlinkStatus;
}

/// The bridge as the status socket sees it.
pub trait BridgeService: Send + Sync + std::fmt::Debug {
    fn status(&self) -> BridgeStatus;
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChildrenSummary {
    pub awaiting_approval: u64,
    pub queued: u64,
    pub provisioned: u64,
    pub denied: u64,
    pub failed: u64,
    /// Fleet calls for children answered with ThrottlingException since start.
    pub throttled: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LocalStatus {
    pub listeners: Vec<String>,
    /// Client ids connected now.
    pub clients: Vec<String>,
    pub accepted: u64,
    /// Connections refused or dropped before CONNACK, by reason.
    pub refusals: std::collections::BTreeMap<String, u64>,
    /// ACL denials by action (publish, subscribe, will).
    pub acl_denials: std::collections::BTreeMap<String, u64>,
    /// Publishes allowed in (those on `upstream` topics stored in the outbox), and publishes the
    /// outbox refused.
    pub publishes: u64,
    pub outbox_refused: u64,
    /// Messages routed to local clients (their subscriptions).
    #[serde(default)]
    pub delivered: u64,
    pub outbox: Option<OutboxSummary>,
}

/// The outbox figures `gatewayctl outbox` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OutboxSummary {
    pub entries: u64,
    pub bytes: u64,
    pub disk_bytes: u64,
    pub in_flight: u64,
    pub oldest_age_ms: Option<u64>,
    pub per_child: std::collections::BTreeMap<String, u64>,
    pub drops_age: u64,
    pub drops_overflow: u64,
    pub drops_corrupt: u64,
    pub refused: u64,
    pub appended: u64,
    pub syncs: u64,
}

/// The local endpoint as the status socket sees it: figures for the snapshot, and the requests
/// only it can answer (children registry, local CA, outbox).
pub trait LocalService: Send + Sync + std::fmt::Debug {
    fn status(&self) -> LocalStatus;
    fn control(&self, req: &Request) -> Response;
}

/// The children provisioner as the status socket sees it: offers, approvals, denials, retries
/// and what each child's provisioning came to.
pub trait ProvisionService: Send + Sync + std::fmt::Debug {
    fn summary(&self) -> ChildrenSummary;
    fn control(&self, req: &Request) -> Response;
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IdentityStatus {
    pub mode: String,
    pub stage: String,
    /// What the engine is doing or waiting for, in words.
    pub activity: String,
    pub thing_name: Option<String>,
    pub certificate_id: Option<String>,
    /// Certificates we obtained and then abandoned (token expired before RegisterThing): never
    /// registered, so never activated.
    pub orphaned_certificates: Vec<String>,
    /// Certificates abandoned after a RegisterThing whose answer was lost: the cloud may have
    /// activated them and attached them to a thing. Revoke them.
    #[serde(default)]
    pub possibly_active_certificates: Vec<String>,
    /// Trusted-user mode: the engine is waiting for (or would use at once) a temporary claim.
    #[serde(default)]
    pub waiting_for_claim: bool,
    /// Create calls sent whose answer was lost in a crash: the cloud may hold that many
    /// certificates we never learned of (they expire with their token if never registered).
    pub unconfirmed_certificate_requests: u32,
    pub temporary_claim_deadline_unix: Option<u64>,
    pub last_error: Option<ErrorStatus>,
    /// The engine is waiting to retry after a failure (`gatewayctl retry` or SIGHUP cut the wait).
    #[serde(default)]
    pub waiting_to_retry: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ErrorStatus {
    pub message: String,
    pub permanent: bool,
    pub error_code: Option<String>,
    pub at_unix: u64,
    pub retry_at_unix: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UplinkStatus {
    pub role: String,
    pub client_id: String,
    pub endpoint: String,
    pub state: String,
    pub session_present: bool,
    /// CONNECT attempts (successful or not); with `connects`, shows the backoff at work.
    pub connect_attempts: u64,
    pub connects: u64,
    pub disconnects: u64,
    pub publishes: u64,
    pub publish_bytes: u64,
    /// Time callers spent waiting in the AWS-quota limiter, and how often.
    pub throttled_ms: u64,
    pub throttled_events: u64,
    /// Publishes waiting in the limiter now, per lane.
    #[serde(default)]
    pub waiting: LaneCounts,
    /// Incoming QoS 1 messages left unacknowledged because their receiver was busy (the
    /// broker resends them on a resumed session).
    #[serde(default)]
    pub incoming_not_acked: u64,
    pub last_error: Option<String>,
}

/// A count per limiter lane.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LaneCounts {
    pub control: usize,
    pub provisioning: usize,
    pub telemetry: usize,
}

/// Shared, cheap-to-update status; read by the socket.
#[derive(Debug)]
pub struct Board {
    inner: Mutex<Snapshot>,
    /// `gatewayctl retry` / SIGHUP → the identity engine.
    retry: tokio::sync::Notify,
    /// `gatewayctl retry` / SIGHUP → the cloud session, when the cloud refused it for good.
    link_retry: tokio::sync::Notify,
    local: Mutex<Option<Arc<dyn LocalService>>>,
    provisioner: Mutex<Option<Arc<dyn ProvisionService>>>,
    plugins: Mutex<Vec<Arc<dyn PluginService>>>,
    bridge: Mutex<Option<Arc<dyn BridgeService>>>,
    downlink: Mutex<Option<Arc<dyn DownlinkService>>>,
}

impl Board {
    pub fn new() -> Arc<Board> {
        Arc::new(Board {
            inner: Mutex::new(Snapshot {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
                started_at_unix: unix_now(),
                ..Default::default()
            }),
            retry: tokio::sync::Notify::new(),
            link_retry: tokio::sync::Notify::new(),
            local: Mutex::new(None),
            provisioner: Mutex::new(None),
            plugins: Mutex::new(Vec::new()),
            bridge: Mutex::new(None),
            downlink: Mutex::new(None),
        })
    }

    /// Asks the identity engine to try again now. Accepted only while it waits to retry;
    /// otherwise the answer says what it is doing.
    pub fn request_retry(&self) -> Result<String, String> {
        let snap = self.snapshot();
        let id = snap.identity;
        if let Some(u) = snap.uplink.filter(|u| u.state == "refused")
            && !id.waiting_to_retry
        {
            self.link_retry.notify_one();
            return Ok(format!(
                "connecting now (the cloud refused {} as {}: {})",
                u.role,
                u.client_id,
                u.last_error.unwrap_or_default()
            ));
        }
        if !id.waiting_to_retry {
            return Err(format!(
                "nothing to retry: identity {} ({})",
                id.stage, id.activity
            ));
        }
        self.retry.notify_one();
        Ok(format!("retrying now (was: {})", id.activity))
    }

    /// Resolves when a retry was requested (a request made before the wait began counts once).
    pub async fn retry_requested(&self) {
        self.retry.notified().await;
    }

    /// Resolves when a retry of a refused cloud connection was requested.
    pub async fn link_retry_requested(&self) {
        self.link_retry.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> Snapshot {
        let local = self.local_service();
        let mut s = self.lock().clone();
        s.local = local.map(|l| l.status());
        s.children = self.provisioner().map(|p| p.summary());
        let plugins = self
            .plugins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        s.plugins = plugins.iter().map(|p| p.status()).collect();
        let downlink = self
            .downlink
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        s.bridge = self.bridge().map(|b| {
            let mut st = b.status();
            st.downlink = downlink.map(|d| d.status());
            st
        });
        s.uptime_secs = unix_now().saturating_sub(s.started_at_unix);
        s
    }

    /// Set once the local endpoint is up.
    pub fn set_local_service(&self, service: Arc<dyn LocalService>) {
        *self.local.lock().unwrap_or_else(|e| e.into_inner()) = Some(service);
    }

    pub fn local_service(&self) -> Option<Arc<dyn LocalService>> {
        self.local.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_provisioner(&self, service: Arc<dyn ProvisionService>) {
        *self.provisioner.lock().unwrap_or_else(|e| e.into_inner()) = Some(service);
    }

    /// A device plugin's poller, once started.
    pub fn add_plugin(&self, service: Arc<dyn PluginService>) {
        self.plugins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(service);
    }

    pub fn provisioner(&self) -> Option<Arc<dyn ProvisionService>> {
        self.provisioner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The gateway's identity as shown (cheaper than a whole snapshot).
    pub fn identity(&self) -> IdentityStatus {
        self.lock().identity.clone()
    }

    pub fn update_identity(&self, f: impl FnOnce(&mut IdentityStatus)) {
        f(&mut self.lock().identity);
    }

    /// The uplink's figures (cheaper than a whole snapshot).
    pub fn uplink(&self) -> Option<UplinkStatus> {
        self.lock().uplink.clone()
    }

    pub fn set_bridge(&self, service: Arc<dyn BridgeService>) {
        *self.bridge.lock().unwrap_or_else(|e| e.into_inner()) = Some(service);
    }

    pub fn set_downlink(&self, service: Arc<dyn DownlinkService>) {
        *self.downlink.lock().unwrap_or_else(|e| e.into_inner()) = Some(service);
    }

    fn bridge(&self) -> Option<Arc<dyn BridgeService>> {
        self.bridge
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_uplink(&self, u: UplinkStatus) {
        self.lock().uplink = Some(u);
    }

    pub fn update_uplink(&self, f: impl FnOnce(&mut UplinkStatus)) {
        if let Some(u) = self.lock().uplink.as_mut() {
            f(u);
        }
    }

    pub fn add_throttled(&self, d: Duration) {
        self.update_uplink(|u| {
            u.throttled_ms += d.as_millis() as u64;
            u.throttled_events += 1;
        });
    }

    pub fn count_publish(&self, bytes: usize) {
        self.update_uplink(|u| {
            u.publishes += 1;
            u.publish_bytes += bytes as u64;
        });
    }
}

/// A temporary claim handed over by a trusted user (`gatewayctl claim install`).
#[derive(Clone, Serialize, Deserialize)]
pub struct TemporaryClaim {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TemporaryClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TemporaryClaim { .. }")
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    ClaimInstall(TemporaryClaim),
    /// Try a failed provisioning step again now instead of at its scheduled time.
    Retry,
    /// Register a child (or add a certificate pin / a new password to it).
    ChildrenAdd(crate::children::AddChild),
    ChildrenRemove {
        id: String,
    },
    ChildrenList,
    /// The gateway-local CA certificate (PEM).
    LocalCa,
    Outbox,
    /// A child found (by hand or by a plugin) to be provisioned as its own thing.
    ChildrenOffer(crate::children::provision::FoundChild),
    ChildrenShow {
        id: String,
    },
    ChildrenApprove {
        id: String,
    },
    ChildrenDeny {
        id: String,
    },
    ChildrenRetry {
        id: String,
    },
    /// Every child known to the provisioner, with its state.
    ChildrenQueue,
    /// AWS bulk registration input for the children awaiting approval (one JSON line each).
    ChildrenExportBulk,
    /// The bulk registration task's results: certificates installed for their children.
    ChildrenImportBulk {
        results: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Snapshot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Answers that are neither a snapshot nor a sentence (children list, outbox figures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("status socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("status socket protocol: {0}")]
    Protocol(String),
}

impl StatusError {
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// Binds the socket (replacing a stale one), mode 0660. Done before READY=1.
///
/// The socket is bound inside a fresh mode-0700 directory beside `path`, set to 0660 there, and
/// only then renamed into place, so it is never reachable with the umask's looser bits (the
/// umask is process-wide, so it is left alone).
pub fn bind(path: &Path) -> Result<UnixListener, StatusError> {
    let err = |source| StatusError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let private = private_dir(dir).map_err(err)?;
    let staged = private.join("status.sock");
    let bound = (|| {
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))?;
        // rename() replaces a stale socket atomically.
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound.map_err(err)
}

/// A new directory `dir/.<name>.XXXX` with mode 0700 (created so, not chmodded afterwards).
fn private_dir(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    loop {
        let p = dir.join(format!(".status-sock.{:08x}", rand::random::<u32>()));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Large enough for a bulk registration report of a few thousand certificates.
const MAX_REQUEST: u64 = 16 * 1024 * 1024;

/// Serves the socket until cancelled.
pub async fn serve(
    listener: UnixListener,
    board: Arc<Board>,
    claims: Option<mpsc::Sender<TemporaryClaim>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(error) => {
                    tracing::warn!(%error, "status socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let board = board.clone();
        let claims = claims.clone();
        tracker.spawn(async move {
            let work = handle(stream, board, claims);
            if tokio::time::timeout(Duration::from_secs(5), work)
                .await
                .is_err()
            {
                tracing::debug!("status client timed out");
            }
        });
    }
}

async fn handle(
    stream: tokio::net::UnixStream,
    board: Arc<Board>,
    claims: Option<mpsc::Sender<TemporaryClaim>>,
) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST));
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Status) => Response {
            ok: true,
            status: Some(board.snapshot()),
            message: None,
            data: None,
        },
        Ok(Request::ClaimInstall(claim)) => claim_install(claim, &board, claims.as_ref()),
        Ok(Request::Retry) => {
            let (ok, message) = match board.request_retry() {
                Ok(m) => (true, m),
                Err(m) => (false, m),
            };
            Response {
                ok,
                status: None,
                message: Some(message),
                data: None,
            }
        }
        Ok(
            req @ (Request::ChildrenAdd(_)
            | Request::ChildrenRemove { .. }
            | Request::ChildrenList
            | Request::LocalCa
            | Request::Outbox),
        ) => {
            // Registry writes are durable (fsync): off the async threads.
            let service = board.local_service();
            off_thread(
                service.map(|l| move || l.control(&req)),
                "the local endpoint",
            )
            .await
        }
        Ok(
            req @ (Request::ChildrenOffer(_)
            | Request::ChildrenShow { .. }
            | Request::ChildrenApprove { .. }
            | Request::ChildrenDeny { .. }
            | Request::ChildrenRetry { .. }
            | Request::ChildrenQueue
            | Request::ChildrenExportBulk
            | Request::ChildrenImportBulk { .. }),
        ) => {
            // Job writes are durable (fsync): off the async threads.
            let service = board.provisioner();
            off_thread(
                service.map(|p| move || p.control(&req)),
                "the children provisioner",
            )
            .await
        }
        Err(e) => Response {
            ok: false,
            status: None,
            message: Some(format!("bad request: {e}")),
            data: None,
        },
    };
    if let Ok(mut text) = serde_json::to_string(&resp) {
        text.push('\n');
        let _ = w.write_all(text.as_bytes()).await;
    }
}

/// Runs a service's answer on the blocking pool, or says the service is not running.
async fn off_thread(
    call: Option<impl FnOnce() -> Response + Send + 'static>,
    service: &str,
) -> Response {
    let fail = |message: String| Response {
        ok: false,
        status: None,
        message: Some(message),
        data: None,
    };
    match call {
        Some(f) => tokio::task::spawn_blocking(f)
            .await
            .unwrap_or_else(|e| fail(format!("request failed: {e}"))),
        None => fail(format!("{service} is not running")),
    }
}

fn claim_install(
    claim: TemporaryClaim,
    board: &Board,
    claims: Option<&mpsc::Sender<TemporaryClaim>>,
) -> Response {
    let fail = |m: String| Response {
        ok: false,
        status: None,
        message: Some(m),
        data: None,
    };
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    if CertificateDer::from_pem_slice(claim.cert_pem.as_bytes()).is_err() {
        return fail("the certificate file holds no PEM certificate".into());
    }
    if PrivateKeyDer::from_pem_slice(claim.key_pem.as_bytes()).is_err() {
        return fail("the key file holds no PEM private key".into());
    }
    let Some(tx) = claims else {
        return fail("this gateway is not in trusted-user mode (provisioning.mode)".into());
    };
    let id = board.snapshot().identity;
    if !id.waiting_for_claim {
        return fail(format!(
            "not waiting for a claim: identity {} ({})",
            id.stage, id.activity
        ));
    }
    match tx.try_send(claim) {
        Ok(()) => Response {
            ok: true,
            status: None,
            message: Some(
                "temporary claim accepted; provisioning must finish within five minutes".into(),
            ),
            data: None,
        },
        Err(_) => fail("a temporary claim is already being processed; try again shortly".into()),
    }
}

/// Client side, used by `gatewayctl` (blocking; one request per connection).
pub fn request(path: &Path, req: &Request) -> Result<Response, StatusError> {
    let err = |source| StatusError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    let mut text = serde_json::to_string(req).map_err(|e| StatusError::Protocol(e.to_string()))?;
    text.push('\n');
    s.write_all(text.as_bytes()).map_err(err)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(err)?;
    serde_json::from_str(&line).map_err(|e| StatusError::Protocol(e.to_string()))
}

/// Human-readable rendering for `gatewayctl status`.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let id = &s.identity;
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    out += &format!(
        "gatewayd {} (pid {}, up {}s)\n",
        s.version, s.pid, s.uptime_secs
    );
    out += &format!(
        "identity:  {} ({} mode): {}\n",
        id.stage, id.mode, id.activity
    );
    out += &format!("  thing:        {}\n", opt(&id.thing_name));
    out += &format!("  certificate:  {}\n", opt(&id.certificate_id));
    if !id.possibly_active_certificates.is_empty() {
        out += &format!(
            "  possibly active, revoke: {}\n",
            id.possibly_active_certificates.join(", ")
        );
    }
    if !id.orphaned_certificates.is_empty() || id.unconfirmed_certificate_requests > 0 {
        out += &format!(
            "  orphaned:     {} (+{} unconfirmed)\n",
            id.orphaned_certificates.join(", "),
            id.unconfirmed_certificate_requests
        );
    }
    if let Some(e) = &id.last_error {
        out += &format!(
            "  last error:   {}{}\n",
            if e.permanent { "[permanent] " } else { "" },
            e.message
        );
        if let Some(at) = e.retry_at_unix.filter(|_| id.waiting_to_retry) {
            out += &format!(
                "  next attempt: in {} s (`gatewayctl retry` tries now)\n",
                at.saturating_sub(unix_now())
            );
        }
    }
    match &s.uplink {
        None => out += "uplink:    none yet\n",
        Some(u) => {
            out += &format!(
                "uplink:    {} as {} ({}) to {}\n",
                u.state, u.client_id, u.role, u.endpoint
            );
            out += &format!(
                "  connects {} / disconnects {}; publishes {} ({} bytes); throttled {} ms in {} waits\n",
                u.connects,
                u.disconnects,
                u.publishes,
                u.publish_bytes,
                u.throttled_ms,
                u.throttled_events
            );
            let w = &u.waiting;
            if w.control + w.provisioning + w.telemetry > 0 || u.incoming_not_acked > 0 {
                out += &format!(
                    "  waiting: control {}, provisioning {}, telemetry {}; incoming not acknowledged {}\n",
                    w.control, w.provisioning, w.telemetry, u.incoming_not_acked
                );
            }
            if let Some(e) = &u.last_error {
                out += &format!("  last error:   {e}\n");
            }
        }
    }
    if let Some(l) = &s.local {
        let counts = |m: &std::collections::BTreeMap<String, u64>| {
            if m.is_empty() {
                "none".to_owned()
            } else {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        out += &format!("local:     {}\n", l.listeners.join(" "));
        out += &format!(
            "  {} connected ({} since start); {} publishes taken in, {} refused by the outbox; {} delivered to local subscribers\n",
            l.clients.len(),
            l.accepted,
            l.publishes,
            l.outbox_refused,
            l.delivered
        );
        out += &format!("  refusals:     {}\n", counts(&l.refusals));
        out += &format!("  ACL denials:  {}\n", counts(&l.acl_denials));
        if let Some(o) = &l.outbox {
            out += &format!(
                "outbox:    {} entries, {} bytes; drops: {} age, {} overflow\n",
                o.entries, o.bytes, o.drops_age, o.drops_overflow
            );
        }
    }
    if let Some(b) = &s.bridge {
        out += &format!(
            "bridge:    {} published, {} acked, {} resent after failures, {} in flight, backlog {}; {} dropped (no mapping); throttled {} ms\n",
            b.published,
            b.acked,
            b.resent,
            b.in_flight,
            b.backlog,
            b.dropped_unmapped,
            b.throttled_ms
        );
        if b.envelopes > 0 {
            out += &format!(
                "  batched:      {} messages in {} envelopes\n",
                b.batched, b.envelopes
            );
        }
        if !b.waiting_for_thing.is_empty() {
            out += &format!(
                "  waiting for a thing name (not provisioned): {}\n",
                b.waiting_for_thing.join(", ")
            );
        }
        if let Some(e) = &b.last_error {
            out += &format!("  last error:   {e}\n");
        }
        if let Some(d) = &b.downlink {
            out += &format!(
                "commands:  {} received, {} delivered, {} queued{}; {} expired, {} unknown thing, {} unmapped, {} not stored\n",
                d.received,
                d.delivered,
                d.queued,
                if d.per_child.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({})",
                        d.per_child
                            .iter()
                            .map(|(c, n)| format!("{c}: {n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
                d.expired,
                d.unknown_thing,
                d.unmapped,
                d.store_failures
            );
            if let Some(e) = &d.last_error {
                out += &format!("  last command error: {e}\n");
            }
        }
    }
    if let Some(c) = &s.children {
        out += &format!(
            "children:  {} provisioned, {} queued, {} awaiting approval, {} failed, {} denied; {} throttled calls\n",
            c.provisioned, c.queued, c.awaiting_approval, c.failed, c.denied, c.throttled
        );
    }
    for p in &s.plugins {
        out += &format!(
            "{:<10} {} children polled; {} polls, {} unanswered, {} point errors; {} published ({} refused by the outbox)\n",
            format!("{}:", p.name),
            p.children,
            p.polls,
            p.unreachable,
            p.point_errors,
            p.published,
            p.publish_failed
        );
        out += &format!(
            "  writes: {} done, {} refused, {} failed; wire: {} requests, {} timeouts, {} reconnects, {} connects\n",
            p.writes,
            p.writes_refused,
            p.writes_failed,
            p.requests,
            p.timeouts,
            p.reconnects,
            p.connects
        );
    }
    out
}

/// "N s ago" / "in N s" relative to `now`, for the human tables.
fn relative(at: u64, now: u64) -> String {
    if at <= now {
        format!("{} s ago", now - at)
    } else {
        format!("in {} s", at - now)
    }
}

/// Human table for `gatewayctl identity`: every field of the gateway's identity, "-" when empty
/// (unlike `render`, which shows only what needs attention). `now` is the caller's clock.
pub fn render_identity(id: &IdentityStatus, now: u64) -> String {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let list = |v: &[String]| dash(&v.join(", "));
    let claim = match (id.temporary_claim_deadline_unix, id.waiting_for_claim) {
        (Some(at), _) if at > now => format!("installed; its window closes {}", relative(at, now)),
        (Some(at), _) => format!("installed; its window closed {}", relative(at, now)),
        (None, true) => "waiting for `gatewayctl claim install`".to_owned(),
        (None, false) => "-".to_owned(),
    };
    let (error, next) = match &id.last_error {
        None => ("-".to_owned(), "-".to_owned()),
        Some(e) => {
            let mut text = format!(
                "{}{} ({})",
                if e.permanent { "[permanent] " } else { "" },
                e.message,
                relative(e.at_unix, now)
            );
            if let Some(code) = &e.error_code {
                text += &format!(" [{code}]");
            }
            let next = match e.retry_at_unix.filter(|_| id.waiting_to_retry) {
                Some(at) => format!("{} (`gatewayctl retry` tries now)", relative(at, now)),
                None => "-".to_owned(),
            };
            (text, next)
        }
    };
    let rows = [
        ("subject", "gateway".to_owned()),
        ("mode", dash(&id.mode)),
        ("stage", dash(&id.stage)),
        ("activity", dash(&id.activity)),
        ("thing", id.thing_name.as_deref().map_or("-".into(), dash)),
        (
            "certificate",
            id.certificate_id.as_deref().map_or("-".into(), dash),
        ),
        (
            "possibly active (revoke)",
            list(&id.possibly_active_certificates),
        ),
        ("orphaned", list(&id.orphaned_certificates)),
        (
            "unconfirmed requests",
            id.unconfirmed_certificate_requests.to_string(),
        ),
        ("temporary claim", claim),
        ("last error", error),
        ("next attempt", next),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn socket_serves_snapshot_and_refuses_claim_outside_trusted_user_mode() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("run/status.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let board = Board::new();
        board.update_identity(|i| i.stage = "active".into());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let server = tokio::spawn(serve(
            listener,
            board,
            None,
            cancel.clone(),
            tracker.clone(),
        ));
        let p = path.clone();
        let resp = tokio::task::spawn_blocking(move || request(&p, &Request::Status))
            .await
            .unwrap()
            .unwrap();
        assert!(resp.ok);
        assert_eq!(resp.status.unwrap().identity.stage, "active");
        let install = |claim: TemporaryClaim| {
            let p = path.clone();
            tokio::task::spawn_blocking(move || request(&p, &Request::ClaimInstall(claim)))
        };
        // Files that hold no PEM are refused before anything else is looked at.
        let resp = install(TemporaryClaim {
            cert_pem: "junk".into(),
            key_pem: "junk".into(),
        })
        .await
        .unwrap()
        .unwrap();
        assert!(!resp.ok);
        let m = resp.message.unwrap();
        assert!(m.contains("no PEM certificate"), "{m}");
        // A well-formed claim reaches the mode check: no claim channel, not trusted-user mode.
        let resp = install(pem_pair()).await.unwrap().unwrap();
        assert!(!resp.ok);
        let m = resp.message.unwrap();
        assert!(m.contains("not in trusted-user mode"), "{m}");
        cancel.cancel();
        server.await.unwrap();
    }

    #[test]
    fn socket_is_never_more_open_than_0660_and_replaces_a_stale_one() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        // The directory is open to everyone, as /run/gatewayd might be by mistake.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = dir.join("status.sock");
        std::fs::write(&path, "stale").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _listener = rt.block_on(async { bind(&path).unwrap() });
        let meta = std::fs::symlink_metadata(&path).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        // Bound in a private staging directory that is gone afterwards.
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("status.sock")]);
        let p = private_dir(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // The renamed socket still accepts connections.
        std::os::unix::net::UnixStream::connect(&path).unwrap();
    }

    #[test]
    fn identity_table_names_every_field_and_counts_relative_to_now() {
        let mut id = IdentityStatus {
            mode: "csr".into(),
            stage: "certificate-issued".into(),
            activity: "waiting to retry RegisterThing".into(),
            certificate_id: Some("ab12".into()),
            possibly_active_certificates: vec!["cd34".into(), "ef56".into()],
            waiting_to_retry: true,
            last_error: Some(ErrorStatus {
                message: "template GatewayTemplate does not exist".into(),
                permanent: true,
                error_code: Some("ResourceNotFoundException".into()),
                at_unix: 1_000,
                retry_at_unix: Some(1_060),
            }),
            ..Default::default()
        };
        let t = render_identity(&id, 1_010);
        let row = |name: &str| {
            t.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no row {name}: {t}"))
                .to_owned()
        };
        assert!(row("stage").ends_with("  certificate-issued"), "{t}");
        assert!(row("thing").ends_with("  -"), "{t}");
        assert!(
            row("possibly active (revoke)").ends_with("cd34, ef56"),
            "{t}"
        );
        assert!(row("unconfirmed requests").ends_with("  0"), "{t}");
        let e = row("last error");
        assert!(e.contains("[permanent] template GatewayTemplate"), "{e}");
        assert!(e.contains("(10 s ago) [ResourceNotFoundException]"), "{e}");
        assert!(row("next attempt").contains("in 50 s"), "{t}");
        // Values start in one column.
        let col = |l: String| l.len() - l.split("  ").last().unwrap().len();
        assert_eq!(col(row("mode")), col(row("possibly active (revoke)")));

        id.waiting_to_retry = false;
        id.last_error = None;
        id.waiting_for_claim = true;
        let t = render_identity(&id, 1_010);
        assert!(t.contains("waiting for `gatewayctl claim install`"), "{t}");
        assert!(
            t.lines()
                .any(|l| l.starts_with("next attempt") && l.ends_with("  -"))
        );
        id.temporary_claim_deadline_unix = Some(1_300);
        let t = render_identity(&id, 1_010);
        assert!(t.contains("installed; its window closes in 290 s"), "{t}");
        let t = render_identity(&id, 1_400);
        assert!(t.contains("installed; its window closed 100 s ago"), "{t}");
    }

    fn pem_pair() -> TemporaryClaim {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["claim".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        TemporaryClaim {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    #[test]
    fn claim_is_accepted_only_while_the_engine_waits_for_one() {
        let board = Board::new();
        let (tx, mut rx) = mpsc::channel(1);
        board.update_identity(|i| {
            i.stage = "active".into();
            i.activity = "connected as gw-0001".into();
        });
        let r = claim_install(pem_pair(), &board, Some(&tx));
        assert!(!r.ok);
        let m = r.message.unwrap();
        assert!(m.contains("not waiting for a claim"), "{m}");
        assert!(m.contains("active"), "{m}");
        assert!(rx.try_recv().is_err(), "nothing handed to the engine");

        board.update_identity(|i| {
            i.stage = "new".into();
            i.waiting_for_claim = true;
        });
        let r = claim_install(pem_pair(), &board, Some(&tx));
        assert!(r.ok, "{:?}", r.message);
        assert!(r.message.unwrap().contains("accepted"));
        assert!(rx.try_recv().is_ok());
    }
}
