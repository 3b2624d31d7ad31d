//! Identity: the persisted state machine that gives a subject (the gateway now, children later)
//! its own AWS IoT identity, and the engine that drives it for the gateway.
//!
//! New → KeyGenerated → CertificateIssued → ThingRegistered → Active. Each transition is saved
//! and flushed (store) before anything that depends on it is sent, so a kill at any point
//! resumes: a saved ownership token younger than one hour is redeemed; an older one is abandoned
//! and its certificate id recorded as orphaned. The planning functions (`next_step`, `recover`,
//! `abandon`) are pure; the engine does the I/O through `fleet` and `uplink`. The private key is
//! generated here, written mode 0600, and never leaves the gateway.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Digest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, KeyAlgorithm, ProvisioningMode};
use crate::fleet::{self, CertificateAnswer, FleetApi, FleetError, RegisterAnswer};
use crate::health::Health;
use crate::notify::Notifier;
use crate::status::{Board, ErrorStatus, TemporaryClaim, unix_now};
use crate::store::{Store, StoreError};
use crate::uplink::{Backoff, ConnectPacer, LinkState, Uplink, UplinkError, UplinkParams};

/// Store key of the gateway's own identity.
pub const GATEWAY: &str = "gateway";
/// AWS: the ownership token must be redeemed within one hour.
pub const TOKEN_LIFETIME_SECS: u64 = 3600;
/// Do not start a RegisterThing with less than this left on the token.
const TOKEN_MARGIN_SECS: u64 = 60;
/// AWS: a trusted-user claim is valid for five minutes.
pub const TEMPORARY_CLAIM_SECS: u64 = 300;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    #[default]
    New,
    KeyGenerated,
    CertificateIssued,
    ThingRegistered,
    Active,
}

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Stage::New => "new",
            Stage::KeyGenerated => "key-generated",
            Stage::CertificateIssued => "certificate-issued",
            Stage::ThingRegistered => "thing-registered",
            Stage::Active => "active",
        }
    }
}

/// A request that was (about to be) sent and whose answer is not saved yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PendingCall {
    CreateCertificate,
    RegisterThing,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IdentityRecord {
    pub stage: Stage,
    pub key_algorithm: Option<KeyAlgorithm>,
    pub certificate_id: Option<String>,
    pub ownership_token: Option<String>,
    pub token_expires_at: Option<u64>,
    pub thing_name: Option<String>,
    pub device_configuration: serde_json::Map<String, Value>,
    pub orphaned_certificates: Vec<String>,
    /// Certificates given up after a RegisterThing whose answer was lost and which could not be
    /// confirmed by connecting: the cloud may have activated one and attached it to a thing, so
    /// an operator should revoke it. Never counted as orphaned.
    #[serde(default)]
    pub possibly_active_certificates: Vec<String>,
    pub unconfirmed_certificate_requests: u32,
    /// Set before a request is published; for RegisterThing it stays set until an answer to a
    /// RegisterThing is saved, so a lost answer (crash, timeout) is known on the next attempt.
    pub pending: Option<PendingCall>,
    pub temporary_claim_deadline: Option<u64>,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    GenerateKey,
    CreateCertificateFromCsr,
    CreateKeysAndCertificate,
    RegisterThing,
    /// The token is too old to redeem: drop the certificate and start over.
    Abandon,
    ConnectAsThing,
}

pub fn token_usable(rec: &IdentityRecord, now: u64) -> bool {
    rec.ownership_token.is_some()
        && rec
            .token_expires_at
            .is_some_and(|exp| now + TOKEN_MARGIN_SECS < exp)
}

pub fn next_step(rec: &IdentityRecord, mode: ProvisioningMode, now: u64) -> Step {
    match rec.stage {
        Stage::ThingRegistered | Stage::Active => Step::ConnectAsThing,
        Stage::CertificateIssued if token_usable(rec, now) => Step::RegisterThing,
        Stage::CertificateIssued => Step::Abandon,
        Stage::KeyGenerated | Stage::New if mode == ProvisioningMode::CreateKeys => {
            Step::CreateKeysAndCertificate
        }
        Stage::KeyGenerated => Step::CreateCertificateFromCsr,
        Stage::New => Step::GenerateKey,
    }
}

/// After a restart: a create call that was sent but whose answer was never saved may have left a
/// certificate in the cloud that we cannot name; count it. A pending RegisterThing is simply
/// retried with the saved token. Returns whether the record changed.
pub fn recover(rec: &mut IdentityRecord) -> bool {
    if rec.pending == Some(PendingCall::CreateCertificate) {
        rec.pending = None;
        rec.unconfirmed_certificate_requests += 1;
        return true;
    }
    false
}

/// Gives up the current certificate and goes back to the last step that needs no certificate.
/// Our own key is kept: a new CSR from it is as good as the first. The certificate is recorded
/// as orphaned (never registered: it stays PENDING_ACTIVATION), or, when a RegisterThing with it
/// may have completed (`possibly_active`), as possibly active.
pub fn abandon(rec: &mut IdentityRecord, mode: ProvisioningMode, possibly_active: bool) {
    if let Some(id) = rec.certificate_id.take() {
        let list = if possibly_active {
            &mut rec.possibly_active_certificates
        } else {
            &mut rec.orphaned_certificates
        };
        if !list.contains(&id) {
            list.push(id);
        }
    }
    rec.ownership_token = None;
    rec.token_expires_at = None;
    rec.pending = None;
    rec.stage = if mode == ProvisioningMode::Csr && rec.key_algorithm.is_some() {
        Stage::KeyGenerated
    } else {
        Stage::New
    };
}

/// Thing names under which a certificate whose RegisterThing answer was lost may be registered:
/// the configured `expected_thing_name` (with `{serial}` filled in) and a name learned from an
/// earlier answer. Without a serial, a pattern that needs one gives nothing.
pub fn thing_name_candidates(
    rec: &IdentityRecord,
    expected: Option<&str>,
    serial: Option<&str>,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(pattern) = expected {
        match serial {
            Some(s) => out.push(pattern.replace("{serial}", s)),
            None if !pattern.contains("{serial}") => out.push(pattern.to_owned()),
            None => {}
        }
    }
    if let Some(t) = rec.thing_name.as_ref().filter(|t| !t.is_empty())
        && !out.contains(t)
    {
        out.push(t.clone());
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} {}: {source}", .path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key or CSR: {0}")]
    Crypto(String),
    #[error("the cloud refused the {role} certificate: {message}")]
    Refused { role: &'static str, message: String },
    #[error("cannot connect with the {role} certificate: {source}")]
    Connect {
        role: &'static str,
        source: UplinkError,
    },
    #[error(
        "the temporary claim expired before provisioning finished; install a new one with `gatewayctl claim install`"
    )]
    TemporaryClaimExpired,
    #[error("RegisterThing returned no thing name; the template needs an AWS::IoT::Thing resource")]
    NoThingName,
    #[error("serial number: {0}")]
    Serial(String),
    #[error("stopped")]
    Cancelled,
}

impl IdentityError {
    pub fn is_transient(&self) -> bool {
        match self {
            IdentityError::Fleet(e) => e.is_transient(),
            IdentityError::Store(e) => e.is_transient(),
            IdentityError::Connect { .. } | IdentityError::Cancelled => true,
            _ => false,
        }
    }
}

/// Test-only fault switch: `GATEWAYD_CRASH_AFTER=<step>` aborts the process right after that
/// step's state was flushed (steps: key-generated, csr-sent, certificate-saved, register-sent,
/// thing-registered, active). Used by the crash-recovery tests; never set it in production.
pub fn crash_point(step: &str) {
    static WANT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let want = WANT.get_or_init(|| std::env::var("GATEWAYD_CRASH_AFTER").ok());
    if want.as_deref() == Some(step) {
        eprintln!("gatewayd: GATEWAYD_CRASH_AFTER={step}: aborting (test fault injection)");
        std::process::abort();
    }
}

/// Files of one subject under `<state_dir>/identity/<subject>/`.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
    pub key: PathBuf,
    pub cert: PathBuf,
    pub temporary_claim_cert: PathBuf,
    pub temporary_claim_key: PathBuf,
}

impl Paths {
    pub fn new(state_dir: &Path, subject: &str) -> Paths {
        let dir = state_dir.join("identity").join(subject);
        Paths {
            key: dir.join("private.key"),
            cert: dir.join("certificate.pem"),
            temporary_claim_cert: dir.join("temporary-claim.pem"),
            temporary_claim_key: dir.join("temporary-claim.key"),
            dir,
        }
    }
}

/// Writes atomically (temp file, fsync, rename, fsync dir) with the given mode.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Generates a private key (PKCS#8 PEM).
pub fn generate_key(alg: KeyAlgorithm) -> Result<String, IdentityError> {
    let crypto = |e: &dyn std::fmt::Display| IdentityError::Crypto(e.to_string());
    match alg {
        KeyAlgorithm::EcdsaP256 => Ok(rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| crypto(&e))?
            .serialize_pem()),
        KeyAlgorithm::Rsa2048 => {
            // rcgen cannot generate RSA keys with ring (crates.md); the rsa crate can.
            use rsa::pkcs8::EncodePrivateKey;
            let key =
                rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).map_err(|e| crypto(&e))?;
            Ok(key
                .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                .map_err(|e| crypto(&e))?
                .to_string())
        }
    }
}

/// Builds a PEM CSR for `key_pem`, subject CN = `common_name`.
pub fn make_csr(
    key_pem: &str,
    alg: KeyAlgorithm,
    common_name: &str,
) -> Result<String, IdentityError> {
    let crypto = |e: rcgen::Error| IdentityError::Crypto(e.to_string());
    let key = match alg {
        KeyAlgorithm::EcdsaP256 => rcgen::KeyPair::from_pem(key_pem).map_err(crypto)?,
        KeyAlgorithm::Rsa2048 => {
            rcgen::KeyPair::from_pem_and_sign_algo(key_pem, &rcgen::PKCS_RSA_SHA256)
                .map_err(crypto)?
        }
    };
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params
        .serialize_request(&key)
        .map_err(crypto)?
        .pem()
        .map_err(crypto)
}

/// certificateId as AWS computes it: SHA-256 of the DER, lowercase hex.
pub fn certificate_id(cert_pem: &[u8]) -> Option<String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::from_pem_slice(cert_pem).ok()?;
    Some(hex::encode(sha2::Sha256::digest(der.as_ref())))
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::File {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn write(what: &'static str, path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    write_file(path, data, mode).map_err(|source| IdentityError::File {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Everything the engine needs; built by `crate::run`.
pub struct Engine {
    pub config: Arc<Config>,
    pub store: Store,
    pub board: Arc<Board>,
    pub pacer: Arc<ConnectPacer>,
    pub notifier: Notifier,
    pub cancel: CancellationToken,
    pub claims: Option<mpsc::Receiver<TemporaryClaim>>,
    /// A claim handed over while the engine was waiting to retry; it replaces the saved one.
    pub fresh_claim: Option<TemporaryClaim>,
    /// Heartbeats of the uplink drivers this engine starts (the watchdog waits for them).
    pub health: Arc<Health>,
}

impl Engine {
    fn paths(&self) -> Paths {
        Paths::new(&self.config.daemon.state_dir, GATEWAY)
    }

    fn mode(&self) -> ProvisioningMode {
        self.config.provisioning.mode
    }

    fn activity(&self, what: &str) {
        self.board.update_identity(|i| i.activity = what.to_owned());
        self.notifier.status(what);
    }

    fn show(&self, rec: &IdentityRecord) {
        self.board.update_identity(|i| {
            i.stage = rec.stage.label().to_owned();
            i.thing_name = rec.thing_name.clone();
            i.certificate_id = rec.certificate_id.clone();
            i.orphaned_certificates = rec.orphaned_certificates.clone();
            i.possibly_active_certificates = rec.possibly_active_certificates.clone();
            i.unconfirmed_certificate_requests = rec.unconfirmed_certificate_requests;
            i.temporary_claim_deadline_unix = rec.temporary_claim_deadline;
        });
    }

    fn save(&self, rec: &IdentityRecord) -> Result<(), IdentityError> {
        self.store.save_identity(GATEWAY, rec)?;
        self.show(rec);
        Ok(())
    }

    /// Runs until cancelled: establishes the identity, keeps the thing connection, retries
    /// transient failures with backoff and permanent ones only after `permanent_retry_secs`.
    pub async fn run(mut self) {
        let mode = self.mode();
        self.board.update_identity(|i| {
            i.mode = serde_json::to_value(mode)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
        });
        let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(300));
        loop {
            let cancel = self.cancel.clone();
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.establish() => r,
            };
            match result {
                Ok(uplink) => {
                    backoff.reset();
                    self.board.update_identity(|i| i.last_error = None);
                    self.hold(uplink).await;
                    return;
                }
                Err(IdentityError::Cancelled) => return,
                Err(e) if mode == ProvisioningMode::TrustedUser && !e.is_transient() => {
                    // A temporary claim lives five minutes: retrying a permanent failure with it
                    // after `permanent_retry` is pointless. Drop it and wait for a new one.
                    let code = match &e {
                        IdentityError::Fleet(f) => f.error_code().map(str::to_owned),
                        _ => None,
                    };
                    tracing::error!(
                        error = %e,
                        error_code = code.as_deref(),
                        "provisioning with the temporary claim failed; it is dropped: install a new one with `gatewayctl claim install`"
                    );
                    self.record_error(&e, None);
                    if let Err(error) = self.forget_temporary_claim() {
                        tracing::warn!(%error, "cannot remove the temporary claim");
                    }
                    // Loop at once: establish() waits for the next claim.
                }
                Err(e) => {
                    let permanent = !e.is_transient();
                    let delay = if permanent {
                        self.config.provisioning.permanent_retry()
                    } else {
                        backoff.next_delay()
                    };
                    let code = match &e {
                        IdentityError::Fleet(f) => f.error_code().map(str::to_owned),
                        _ => None,
                    };
                    if permanent {
                        tracing::error!(
                            error = %e,
                            error_code = code.as_deref(),
                            retry_in_secs = delay.as_secs(),
                            "provisioning failed permanently; fix the cause (see error), it is retried only slowly"
                        );
                    } else {
                        tracing::warn!(
                            error = %e,
                            error_code = code.as_deref(),
                            retry_in_ms = delay.as_millis() as u64,
                            "provisioning step failed; retrying"
                        );
                    }
                    self.record_error(&e, Some(delay));
                    self.activity(&format!(
                        "{}: {e}; retry in {}s",
                        if permanent {
                            "failed permanently"
                        } else {
                            "failed"
                        },
                        delay.as_secs()
                    ));
                    // Trusted-user mode, still before the thing is registered: a claim installed
                    // now replaces the saved one and is used at once.
                    let wants_claim = self.claims.is_some()
                        && self
                            .store
                            .load_identity::<IdentityRecord>(GATEWAY)
                            .ok()
                            .flatten()
                            .is_none_or(|r| r.stage < Stage::ThingRegistered);
                    self.board
                        .update_identity(|i| i.waiting_for_claim = wants_claim);
                    let claims = self.claims.as_mut().filter(|_| wants_claim);
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                        // Trusted-user mode: a newly installed claim is tried at once.
                        Some(c) = async move {
                            match claims {
                                Some(rx) => rx.recv().await,
                                None => std::future::pending().await,
                            }
                        } => {
                            tracing::info!("a new temporary claim was installed; retrying now");
                            self.fresh_claim = Some(c);
                            backoff.reset();
                        }
                    }
                    self.board.update_identity(|i| i.waiting_for_claim = false);
                }
            }
        }
    }

    /// Trusted-user mode: forgets the saved temporary claim (record and files).
    fn forget_temporary_claim(&self) -> Result<(), IdentityError> {
        let paths = self.paths();
        let mut rec: IdentityRecord = self.store.load_identity(GATEWAY)?.unwrap_or_default();
        if rec.temporary_claim_deadline.take().is_some() {
            self.save(&rec)?;
        }
        for f in [&paths.temporary_claim_cert, &paths.temporary_claim_key] {
            match std::fs::remove_file(f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(IdentityError::File {
                        what: "temporary claim",
                        path: f.clone(),
                        source: e,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn record_error(&self, e: &IdentityError, retry: Option<Duration>) {
        let now = unix_now();
        let error_code = match e {
            IdentityError::Fleet(f) => f.error_code().map(str::to_owned),
            _ => None,
        };
        self.board.update_identity(|i| {
            i.last_error = Some(ErrorStatus {
                message: e.to_string(),
                permanent: !e.is_transient(),
                error_code,
                at_unix: now,
                retry_at_unix: retry.map(|d| now + d.as_secs()),
            });
        });
    }

    /// Watches the thing connection: marks the identity Active on the first CONNACK and mirrors
    /// the connection state into STATUS= lines, until shutdown.
    async fn hold(&self, uplink: Arc<Uplink>) {
        let mut state = uplink.state();
        let mut marked = false;
        loop {
            let s = state.borrow_and_update().clone();
            match s {
                LinkState::Connected => {
                    if !marked {
                        marked = true;
                        if let Err(error) = self.mark_active() {
                            tracing::error!(%error, "cannot record the active identity");
                        }
                    }
                    let thing = self
                        .board
                        .snapshot()
                        .identity
                        .thing_name
                        .unwrap_or_default();
                    self.activity(&format!("connected as {thing}"));
                }
                LinkState::Connecting => self.activity("connecting as thing"),
                LinkState::Down { error, .. } => {
                    self.activity(&format!("cloud connection down ({error}); retrying"));
                }
            }
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                r = state.changed() => if r.is_err() { break },
            }
        }
        uplink.shutdown().await;
    }

    fn mark_active(&self) -> Result<(), IdentityError> {
        let mut rec: IdentityRecord = self.store.load_identity(GATEWAY)?.unwrap_or_default();
        if rec.stage != Stage::Active {
            rec.stage = Stage::Active;
            rec.temporary_claim_deadline = None;
            self.save(&rec)?;
            tracing::info!(
                thing = rec.thing_name.as_deref().unwrap_or(""),
                "identity active"
            );
            crash_point("active");
        }
        Ok(())
    }

    async fn serial(&self) -> Result<Option<String>, IdentityError> {
        let Some(src) = &self.config.provisioning.serial else {
            return Ok(None);
        };
        let s = if let Some(v) = &src.value {
            v.clone()
        } else if let Some(f) = &src.file {
            String::from_utf8_lossy(&read("serial number file", f)?).into_owned()
        } else if let Some(cmd) = &src.command {
            let out = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::process::Command::new("/bin/sh")
                    .arg("-c")
                    .arg(cmd)
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .map_err(|_| IdentityError::Serial(format!("`{cmd}` took over 10 s")))?
            .map_err(|e| IdentityError::Serial(format!("`{cmd}`: {e}")))?;
            if !out.status.success() {
                return Err(IdentityError::Serial(format!(
                    "`{cmd}` exited with {}",
                    out.status
                )));
            }
            String::from_utf8_lossy(&out.stdout).into_owned()
        } else {
            return Ok(None);
        };
        // Device-tree strings end in NUL; commands in newlines.
        let s = s
            .trim_matches(|c: char| c.is_whitespace() || c == '\0')
            .to_owned();
        if s.is_empty() {
            return Err(IdentityError::Serial(
                "the source gave an empty serial number".into(),
            ));
        }
        Ok(Some(s))
    }

    fn uplink_params(
        &self,
        role: &'static str,
        client_id: String,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    ) -> Result<UplinkParams, IdentityError> {
        let c = &self.config;
        let permanent_retry = if c.provisioning.mode == ProvisioningMode::Preinstalled {
            // JITR/JITP: the certificate is refused until the cloud side has activated it.
            Duration::from_secs(c.uplink.backoff_max_secs)
        } else {
            c.provisioning.permanent_retry()
        };
        Ok(UplinkParams {
            role,
            endpoint: c.cloud.endpoint.clone(),
            port: c.cloud.port,
            root_ca_pem: read("root CA", &c.cloud.root_ca)?,
            cert_pem,
            key_pem,
            client_id,
            clean_session: role != "thing",
            config: c.uplink.clone(),
            permanent_retry,
        })
    }

    fn start_uplink(&self, params: UplinkParams) -> Result<Arc<Uplink>, IdentityError> {
        let role = params.role;
        Uplink::start(
            params,
            self.pacer.clone(),
            self.board.clone(),
            &self.health,
            &self.cancel,
        )
        .map_err(|e| match e {
            UplinkError::TlsSetup(m) => IdentityError::Crypto(format!("{role} certificate: {m}")),
            other => IdentityError::Connect {
                role,
                source: other,
            },
        })
    }

    /// Runs the state machine up to a started thing connection.
    async fn establish(&mut self) -> Result<Arc<Uplink>, IdentityError> {
        let paths = self.paths();
        if self.mode() == ProvisioningMode::Preinstalled {
            return self.connect_preinstalled();
        }
        let mut rec: IdentityRecord = self.store.load_identity(GATEWAY)?.unwrap_or_default();
        if recover(&mut rec) {
            tracing::warn!(
                unconfirmed = rec.unconfirmed_certificate_requests,
                "a certificate request was sent before the last stop but its answer was never saved; \
                 the cloud may hold a certificate we cannot name (it expires unregistered)"
            );
            self.save(&rec)?;
        }
        self.show(&rec);
        let serial = self.serial().await?;
        let mut claim: Option<Arc<Uplink>> = None;
        let result = self
            .provision(&mut rec, &paths, serial.as_deref(), &mut claim)
            .await;
        if let Some(c) = claim.take() {
            c.shutdown().await;
            tracing::info!("claim session closed");
        }
        if let Some(up) = result? {
            // A lost RegisterThing answer, confirmed by connecting as the thing: keep it.
            return Ok(up);
        }
        let thing = rec.thing_name.clone().ok_or(IdentityError::NoThingName)?;
        self.activity(&format!("connecting as {thing}"));
        let params = self.uplink_params(
            "thing",
            thing,
            read("certificate", &paths.cert)?,
            read("private key", &paths.key)?,
        )?;
        self.start_uplink(params)
    }

    fn connect_preinstalled(&mut self) -> Result<Arc<Uplink>, IdentityError> {
        let Some(pre) = self.config.provisioning.preinstalled.clone() else {
            return Err(IdentityError::Crypto(
                "provisioning.preinstalled is missing".into(),
            ));
        };
        let cert = read("certificate", &pre.cert)?;
        let key = read("private key", &pre.key)?;
        let rec = IdentityRecord {
            stage: Stage::ThingRegistered,
            certificate_id: certificate_id(&cert),
            thing_name: Some(pre.thing_name.clone()),
            ..self.store.load_identity(GATEWAY)?.unwrap_or_default()
        };
        let rec = IdentityRecord {
            stage: rec.stage.max(Stage::ThingRegistered),
            ..rec
        };
        self.save(&rec)?;
        self.activity(&format!(
            "connecting as {} (pre-installed certificate)",
            pre.thing_name
        ));
        let params = self.uplink_params("thing", pre.thing_name, cert, key)?;
        self.start_uplink(params)
    }

    async fn provision(
        &mut self,
        rec: &mut IdentityRecord,
        paths: &Paths,
        serial: Option<&str>,
        claim: &mut Option<Arc<Uplink>>,
    ) -> Result<Option<Arc<Uplink>>, IdentityError> {
        let mode = self.mode();
        let cfg = self.config.clone();
        let p = &cfg.provisioning;
        let template = p.template.clone().unwrap_or_default();
        loop {
            let step = next_step(rec, mode, unix_now());
            tracing::debug!(?step, stage = rec.stage.label(), "identity step");
            match step {
                Step::ConnectAsThing => return Ok(None),
                Step::GenerateKey => {
                    self.activity("generating the gateway's private key");
                    let alg = p.key_algorithm;
                    let pem = tokio::task::spawn_blocking(move || generate_key(alg))
                        .await
                        .map_err(|e| IdentityError::Crypto(e.to_string()))??;
                    write("private key", &paths.key, pem.as_bytes(), 0o600)?;
                    rec.key_algorithm = Some(alg);
                    rec.stage = Stage::KeyGenerated;
                    self.save(rec)?;
                    tracing::info!(algorithm = ?alg, path = %paths.key.display(), "private key generated");
                    crash_point("key-generated");
                }
                Step::Abandon if rec.pending == Some(PendingCall::RegisterThing) => {
                    // The token ran out, but a RegisterThing with it may have completed.
                    if let Some(up) = self.lost_registration(rec, paths, serial, claim).await? {
                        return Ok(Some(up));
                    }
                }
                Step::Abandon => {
                    tracing::warn!(
                        certificate_id = rec.certificate_id.as_deref().unwrap_or(""),
                        "ownership token is older than allowed; abandoning that certificate (orphaned) and starting over"
                    );
                    abandon(rec, mode, false);
                    self.save(rec)?;
                }
                Step::CreateCertificateFromCsr | Step::CreateKeysAndCertificate => {
                    let (api, payload) = if step == Step::CreateCertificateFromCsr {
                        let key =
                            String::from_utf8_lossy(&read("private key", &paths.key)?).into_owned();
                        let alg = rec.key_algorithm.unwrap_or(p.key_algorithm);
                        let csr = make_csr(&key, alg, serial.unwrap_or("gatewayd"))?;
                        (
                            FleetApi::CreateCertificateFromCsr,
                            json!({ "certificateSigningRequest": csr }),
                        )
                    } else {
                        (FleetApi::CreateKeysAndCertificate, json!({}))
                    };
                    let up = self.claim_session(claim, rec, paths, serial).await?;
                    self.activity(&format!("{}: requesting a certificate", api.name()));
                    rec.pending = Some(PendingCall::CreateCertificate);
                    self.save(rec)?;
                    let sent = AtomicBool::new(false);
                    let answer = fleet::call(&up, &api, &payload, self.call_timeout(rec), || {
                        sent.store(true, Ordering::SeqCst);
                        crash_point("csr-sent");
                    })
                    .await;
                    let answer = match answer {
                        Ok(v) => v,
                        Err(e) => {
                            rec.pending = None;
                            if sent.load(Ordering::SeqCst)
                                && !matches!(e, FleetError::Rejected { .. })
                            {
                                rec.unconfirmed_certificate_requests += 1;
                            }
                            self.save(rec)?;
                            return Err(e.into());
                        }
                    };
                    let cert: CertificateAnswer = fleet::parse(&api, answer)?;
                    if let Some(key) = &cert.private_key {
                        write("private key", &paths.key, key.as_bytes(), 0o600)?;
                    }
                    write(
                        "certificate",
                        &paths.cert,
                        cert.certificate_pem.as_bytes(),
                        0o644,
                    )?;
                    if certificate_id(cert.certificate_pem.as_bytes()).as_deref()
                        != Some(cert.certificate_id.as_str())
                    {
                        tracing::warn!(
                            certificate_id = %cert.certificate_id,
                            "certificateId is not the SHA-256 of the certificate; keeping the cloud's id"
                        );
                    }
                    rec.certificate_id = Some(cert.certificate_id.clone());
                    rec.ownership_token = Some(cert.certificate_ownership_token);
                    rec.token_expires_at = Some(unix_now() + TOKEN_LIFETIME_SECS);
                    rec.stage = Stage::CertificateIssued;
                    rec.pending = None;
                    self.save(rec)?;
                    tracing::info!(certificate_id = %cert.certificate_id, api = api.name(), "certificate issued and saved");
                    crash_point("certificate-saved");
                }
                Step::RegisterThing => {
                    let up = self.claim_session(claim, rec, paths, serial).await?;
                    let api = FleetApi::RegisterThing {
                        template: template.clone(),
                    };
                    let mut parameters = p.parameters.clone();
                    if let Some(s) = serial {
                        parameters.insert(p.serial_parameter.clone(), s.to_owned());
                    }
                    let payload = json!({
                        "certificateOwnershipToken": rec.ownership_token.clone().unwrap_or_default(),
                        "parameters": parameters,
                    });
                    self.activity(&format!("RegisterThing with template {template}"));
                    // An earlier RegisterThing with this token whose answer we never saw.
                    let lost_before = rec.pending == Some(PendingCall::RegisterThing);
                    rec.pending = Some(PendingCall::RegisterThing);
                    self.save(rec)?;
                    let r = fleet::call(&up, &api, &payload, self.call_timeout(rec), || {
                        crash_point("register-sent");
                    })
                    .await;
                    match r {
                        Err(FleetError::Rejected { rejection, .. })
                            if rejection.error_code.to_ascii_lowercase().contains("token")
                                && lost_before =>
                        {
                            // Most likely the token was used by the earlier call: the thing may
                            // exist with this certificate ACTIVE and attached.
                            tracing::info!(
                                error_code = %rejection.error_code,
                                error_message = %rejection.error_message,
                                "RegisterThing refused the saved ownership token after an earlier RegisterThing whose answer was lost"
                            );
                            if let Some(up) =
                                self.lost_registration(rec, paths, serial, claim).await?
                            {
                                return Ok(Some(up));
                            }
                        }
                        Err(FleetError::Rejected { rejection, .. })
                            if rejection.error_code.to_ascii_lowercase().contains("token") =>
                        {
                            tracing::warn!(
                                error_code = %rejection.error_code,
                                error_message = %rejection.error_message,
                                certificate_id = rec.certificate_id.as_deref().unwrap_or(""),
                                "RegisterThing refused the saved ownership token; abandoning that certificate and starting over"
                            );
                            abandon(rec, mode, false);
                            self.save(rec)?;
                        }
                        Err(e @ FleetError::Rejected { .. }) => {
                            // The cloud answered this call and did not register; an earlier,
                            // unanswered one still may have.
                            if !lost_before {
                                rec.pending = None;
                            }
                            self.save(rec)?;
                            return Err(e.into());
                        }
                        Err(e) => {
                            // Timeout or lost connection: the cloud may have registered the
                            // thing and consumed the token. `pending` stays RegisterThing.
                            return Err(e.into());
                        }
                        Ok(v) => {
                            let ans: RegisterAnswer = fleet::parse(&api, v)?;
                            let thing = ans
                                .thing_name
                                .filter(|t| !t.is_empty())
                                .ok_or(IdentityError::NoThingName)?;
                            rec.thing_name = Some(thing.clone());
                            rec.device_configuration = ans.device_configuration;
                            rec.ownership_token = None;
                            rec.pending = None;
                            rec.stage = Stage::ThingRegistered;
                            self.save(rec)?;
                            tracing::info!(thing = %thing, certificate_id = rec.certificate_id.as_deref().unwrap_or(""), "thing registered");
                            crash_point("thing-registered");
                        }
                    }
                }
            }
        }
    }

    /// A RegisterThing may have completed but its answer was lost, and the token can no longer
    /// be redeemed. Connects with the certificate under each name it may have been registered as
    /// (`thing_name_candidates`); a connection that holds means the thing exists with this
    /// certificate attached, and it becomes the thing connection. Only if every candidate is
    /// refused (the uplink's refusal verdict) is the certificate given up, recorded as possibly
    /// active, and provisioning starts over. A connection that neither holds nor is refused
    /// (outage) is a transient error: the record is kept and this is tried again.
    async fn lost_registration(
        &mut self,
        rec: &mut IdentityRecord,
        paths: &Paths,
        serial: Option<&str>,
        claim: &mut Option<Arc<Uplink>>,
    ) -> Result<Option<Arc<Uplink>>, IdentityError> {
        let candidates = thing_name_candidates(
            rec,
            self.config.provisioning.expected_thing_name.as_deref(),
            serial,
        );
        if !candidates.is_empty()
            && let Some(c) = claim.take()
        {
            // Not needed to probe; if the probe fails, starting over opens it again.
            c.shutdown().await;
            tracing::info!("claim session closed");
        }
        // Three refused CONNECTs with backoff and the per-client-id floor take a few seconds.
        let wait = self
            .config
            .provisioning
            .call_timeout()
            .max(Duration::from_secs(30));
        for name in candidates {
            self.activity(&format!(
                "RegisterThing answer was lost; checking whether the certificate is registered as {name}"
            ));
            let params = self.uplink_params(
                "thing",
                name.clone(),
                read("certificate", &paths.cert)?,
                read("private key", &paths.key)?,
            )?;
            let up = self.start_uplink(params)?;
            match up.wait_connected(wait).await {
                Ok(()) => {
                    rec.thing_name = Some(name.clone());
                    rec.device_configuration = Default::default();
                    rec.ownership_token = None;
                    rec.token_expires_at = None;
                    rec.pending = None;
                    rec.stage = Stage::ThingRegistered;
                    self.save(rec)?;
                    tracing::warn!(
                        thing = %name,
                        certificate_id = rec.certificate_id.as_deref().unwrap_or(""),
                        "the earlier RegisterThing had completed: connected as the expected thing; its deviceConfiguration was lost with the answer"
                    );
                    crash_point("thing-registered");
                    return Ok(Some(up));
                }
                Err(UplinkError::ConnectPermanent(message)) => {
                    up.shutdown().await;
                    tracing::info!(thing = %name, %message, "the certificate is not usable as this thing");
                }
                Err(source) => {
                    up.shutdown().await;
                    return Err(IdentityError::Connect {
                        role: "thing",
                        source,
                    });
                }
            }
        }
        tracing::warn!(
            certificate_id = rec.certificate_id.as_deref().unwrap_or(""),
            "a RegisterThing answer was lost and the certificate could not be confirmed under an expected thing name \
             (set provisioning.expected_thing_name); it is possibly ACTIVE and attached to a thing: revoke it. Starting over"
        );
        abandon(rec, self.mode(), true);
        self.save(rec)?;
        Ok(None)
    }

    /// Call timeout, shortened to what is left of a temporary claim.
    fn call_timeout(&self, rec: &IdentityRecord) -> Duration {
        let t = self.config.provisioning.call_timeout();
        match rec.temporary_claim_deadline {
            Some(dl) if self.mode() == ProvisioningMode::TrustedUser => {
                t.min(Duration::from_secs(dl.saturating_sub(unix_now()).max(1)))
            }
            _ => t,
        }
    }

    /// The claim connection, started on first use and waited for.
    async fn claim_session(
        &mut self,
        claim: &mut Option<Arc<Uplink>>,
        rec: &mut IdentityRecord,
        paths: &Paths,
        serial: Option<&str>,
    ) -> Result<Arc<Uplink>, IdentityError> {
        if self.mode() == ProvisioningMode::TrustedUser
            && let Some(dl) = rec.temporary_claim_deadline
            && unix_now() >= dl
        {
            rec.temporary_claim_deadline = None;
            self.save(rec)?;
            if let Some(c) = claim.take() {
                c.shutdown().await;
            }
            return Err(IdentityError::TemporaryClaimExpired);
        }
        if let Some(c) = claim.as_ref() {
            return Ok(c.clone());
        }
        let (cert, key) = match self.mode() {
            ProvisioningMode::TrustedUser => self.temporary_claim(rec, paths).await?,
            _ => {
                let p = &self.config.provisioning;
                let (Some(c), Some(k)) = (&p.claim_cert, &p.claim_key) else {
                    return Err(IdentityError::Crypto(
                        "claim_cert/claim_key not configured".into(),
                    ));
                };
                (read("claim certificate", c)?, read("claim key", k)?)
            }
        };
        let client_id = self
            .config
            .provisioning
            .claim_client_id
            .clone()
            .unwrap_or_else(|| match serial {
                Some(s) => format!("claim-{s}"),
                None => format!("claim-{:016x}", rand::random::<u64>()),
            });
        self.activity("connecting with the claim certificate");
        let up = self.start_uplink(self.uplink_params("claim", client_id, cert, key)?)?;
        *claim = Some(up.clone());
        let wait = self.config.provisioning.call_timeout();
        match up.wait_connected(wait).await {
            Ok(()) => Ok(up),
            Err(UplinkError::ConnectPermanent(message)) => Err(IdentityError::Refused {
                role: "claim",
                message,
            }),
            Err(source) => Err(IdentityError::Connect {
                role: "claim",
                source,
            }),
        }
    }

    /// Trusted-user mode: a saved, unexpired temporary claim, or wait for one from the socket.
    async fn temporary_claim(
        &mut self,
        rec: &mut IdentityRecord,
        paths: &Paths,
    ) -> Result<(Vec<u8>, Vec<u8>), IdentityError> {
        if self.fresh_claim.is_none()
            && let Some(dl) = rec.temporary_claim_deadline
            && unix_now() < dl
            && paths.temporary_claim_cert.exists()
        {
            return Ok((
                read("temporary claim", &paths.temporary_claim_cert)?,
                read("temporary claim key", &paths.temporary_claim_key)?,
            ));
        }
        let claim = match self.fresh_claim.take() {
            Some(c) => c,
            None => {
                // Flag first: a client that sees the prompt must find the claim accepted.
                self.board.update_identity(|i| i.waiting_for_claim = true);
                self.activity(
                    "waiting for a temporary claim (`gatewayctl claim install --cert F --key F`)",
                );
                tracing::info!("trusted-user mode: waiting for `gatewayctl claim install`");
                let Some(rx) = self.claims.as_mut() else {
                    return Err(IdentityError::Crypto("no claim channel".into()));
                };
                let got = tokio::select! {
                    _ = self.cancel.cancelled() => None,
                    c = rx.recv() => c,
                };
                self.board.update_identity(|i| i.waiting_for_claim = false);
                got.ok_or(IdentityError::Cancelled)?
            }
        };
        write(
            "temporary claim",
            &paths.temporary_claim_cert,
            claim.cert_pem.as_bytes(),
            0o600,
        )?;
        write(
            "temporary claim key",
            &paths.temporary_claim_key,
            claim.key_pem.as_bytes(),
            0o600,
        )?;
        rec.temporary_claim_deadline = Some(unix_now() + TEMPORARY_CLAIM_SECS);
        self.save(rec)?;
        tracing::info!("temporary claim installed; provisioning must finish within five minutes");
        Ok((claim.cert_pem.into_bytes(), claim.key_pem.into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn issued(now: u64) -> IdentityRecord {
        IdentityRecord {
            stage: Stage::CertificateIssued,
            key_algorithm: Some(KeyAlgorithm::EcdsaP256),
            certificate_id: Some("c1".into()),
            ownership_token: Some("tok".into()),
            token_expires_at: Some(now + TOKEN_LIFETIME_SECS),
            ..Default::default()
        }
    }

    #[test]
    fn fresh_csr_flow() {
        let r = IdentityRecord::default();
        assert_eq!(next_step(&r, ProvisioningMode::Csr, 0), Step::GenerateKey);
        assert_eq!(
            next_step(&r, ProvisioningMode::CreateKeys, 0),
            Step::CreateKeysAndCertificate
        );
        let r = IdentityRecord {
            stage: Stage::KeyGenerated,
            ..r
        };
        assert_eq!(
            next_step(&r, ProvisioningMode::Csr, 0),
            Step::CreateCertificateFromCsr
        );
        assert_eq!(
            next_step(&r, ProvisioningMode::TrustedUser, 0),
            Step::CreateCertificateFromCsr
        );
    }

    #[test]
    fn young_token_is_redeemed_old_one_abandoned() {
        let now = 1_000_000;
        let r = issued(now);
        assert_eq!(
            next_step(&r, ProvisioningMode::Csr, now),
            Step::RegisterThing
        );
        assert_eq!(
            next_step(&r, ProvisioningMode::Csr, now + 3000),
            Step::RegisterThing
        );
        assert_eq!(
            next_step(&r, ProvisioningMode::Csr, now + 3560),
            Step::Abandon
        );
        assert_eq!(
            next_step(&r, ProvisioningMode::Csr, now + 7200),
            Step::Abandon
        );
        let no_token = IdentityRecord {
            ownership_token: None,
            ..r
        };
        assert_eq!(
            next_step(&no_token, ProvisioningMode::Csr, now),
            Step::Abandon
        );
    }

    #[test]
    fn abandon_records_orphan_once_and_keeps_key() {
        let mut r = issued(0);
        abandon(&mut r, ProvisioningMode::Csr, false);
        assert_eq!(r.stage, Stage::KeyGenerated);
        assert_eq!(r.orphaned_certificates, vec!["c1".to_owned()]);
        assert_eq!(r.ownership_token, None);
        assert_eq!(r.certificate_id, None);
        abandon(&mut r, ProvisioningMode::Csr, false);
        assert_eq!(r.orphaned_certificates.len(), 1);
        let mut r = issued(0);
        abandon(&mut r, ProvisioningMode::CreateKeys, false);
        assert_eq!(r.stage, Stage::New);
        // After a lost RegisterThing answer the certificate is not called orphaned.
        let mut r = issued(0);
        abandon(&mut r, ProvisioningMode::Csr, true);
        assert!(r.orphaned_certificates.is_empty());
        assert_eq!(r.possibly_active_certificates, vec!["c1".to_owned()]);
        assert_eq!(r.pending, None);
    }

    #[test]
    fn thing_name_candidates_from_config_and_earlier_answer() {
        let r = issued(0);
        assert!(thing_name_candidates(&r, None, Some("0001")).is_empty());
        assert_eq!(
            thing_name_candidates(&r, Some("gw-{serial}"), Some("0001")),
            vec!["gw-0001".to_owned()]
        );
        // A pattern that needs a serial gives nothing without one; a fixed name is used as is.
        assert!(thing_name_candidates(&r, Some("gw-{serial}"), None).is_empty());
        assert_eq!(
            thing_name_candidates(&r, Some("lobby-gw"), None),
            vec!["lobby-gw".to_owned()]
        );
        let known = IdentityRecord {
            thing_name: Some("gw-old".into()),
            ..issued(0)
        };
        assert_eq!(
            thing_name_candidates(&known, Some("gw-{serial}"), Some("0001")),
            vec!["gw-0001".to_owned(), "gw-old".to_owned()]
        );
        assert_eq!(
            thing_name_candidates(&known, Some("gw-old"), None),
            vec!["gw-old".to_owned()]
        );
    }

    #[test]
    fn recover_counts_lost_create_answers() {
        let mut r = IdentityRecord {
            stage: Stage::KeyGenerated,
            pending: Some(PendingCall::CreateCertificate),
            ..Default::default()
        };
        assert!(recover(&mut r));
        assert_eq!(r.unconfirmed_certificate_requests, 1);
        assert_eq!(r.pending, None);
        assert!(!recover(&mut r));
        let mut r = IdentityRecord {
            pending: Some(PendingCall::RegisterThing),
            ..issued(0)
        };
        assert!(!recover(&mut r));
        assert_eq!(
            next_step(&r, ProvisioningMode::Csr, 10),
            Step::RegisterThing
        );
    }

    #[test]
    fn registered_and_active_connect() {
        for stage in [Stage::ThingRegistered, Stage::Active] {
            let r = IdentityRecord {
                stage,
                thing_name: Some("gw".into()),
                ..Default::default()
            };
            assert_eq!(
                next_step(&r, ProvisioningMode::Csr, 0),
                Step::ConnectAsThing
            );
        }
    }

    #[test]
    fn record_survives_store_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let r = issued(42);
        s.save_identity(GATEWAY, &r).unwrap();
        let back: IdentityRecord = s.load_identity(GATEWAY).unwrap().unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn p256_key_and_csr() {
        let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
        assert!(key.contains("BEGIN PRIVATE KEY"));
        let csr = make_csr(&key, KeyAlgorithm::EcdsaP256, "GW-1").unwrap();
        assert!(csr.contains("BEGIN CERTIFICATE REQUEST"));
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        let cn = parsed
            .params
            .distinguished_name
            .get(&rcgen::DnType::CommonName);
        assert!(
            matches!(cn, Some(rcgen::DnValue::Utf8String(s)) if s == "GW-1"),
            "{cn:?}"
        );
    }

    #[test]
    fn rsa_key_and_csr() {
        let key = generate_key(KeyAlgorithm::Rsa2048).unwrap();
        let csr = make_csr(&key, KeyAlgorithm::Rsa2048, "GW-2").unwrap();
        rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
    }

    #[test]
    fn key_files_are_private() {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(d.path(), GATEWAY);
        write_file(&p.key, b"secret", 0o600).unwrap();
        let mode = std::fs::metadata(&p.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(&p.dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        // Rewriting keeps the mode and replaces the content.
        write_file(&p.key, b"secret2", 0o600).unwrap();
        assert_eq!(std::fs::read(&p.key).unwrap(), b"secret2");
    }
}
