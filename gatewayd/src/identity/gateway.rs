//! Gateway: the parts of identity that only the gateway has. It gets its certificate with a
//! claim (a fleet-provisioning claim, or a trusted-user temporary claim installed through the
//! status socket) or brings a pre-installed one; takes its serial number from the config, a file
//! or a command; reconnects as its thing; and, when a RegisterThing answer was lost, probes it by
//! connecting as each expected thing name. The provisioning steps themselves are the driver's.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::driver::{Driver, Host, Outcome, Spec};
use super::files::{GATEWAY, Paths, Subject, certificate_id, read, write};
use super::record::{self, CertificateApi, IdentityRecord, Stage, thing_name_candidates};
use super::{IdentityError, crash_point};
use crate::cloud::{Backoff, Cloud, Lane, LinkState, UplinkError, UplinkParams};
use crate::daemon::config::{Config, ProvisioningMode};
use crate::daemon::notify::Notifier;
use crate::daemon::status::{Board, ErrorStatus, TemporaryClaim, unix_now};
use crate::store::Store;

/// AWS: a trusted-user claim is valid for five minutes.
pub const TEMPORARY_CLAIM_SECS: u64 = 300;
/// First wait after a permanent failure; it doubles per failure up to `permanent_retry_secs`.
/// Operators fix causes in minutes (a template, a claim's status, the clock): the first retries
/// come soon, and `gatewayctl retry` (or SIGHUP) tries at once.
const PERMANENT_RETRY_FIRST: Duration = Duration::from_secs(60);

/// The gateway's own event topic.
pub fn events_topic(thing: &str) -> String {
    format!("gw/{thing}/events")
}

/// Resolves (with the time) once the wall clock reads `at` or later.
async fn clock_passes(at: u64) -> u64 {
    loop {
        let now = unix_now();
        if now >= at {
            return now;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Which certificate API a provisioning mode uses.
fn certificate_api(mode: ProvisioningMode) -> CertificateApi {
    match mode {
        ProvisioningMode::CreateKeys => CertificateApi::CreateKeys,
        _ => CertificateApi::FromCsr,
    }
}

/// The gateway as a driver host: calls go over its claim session.
struct GatewayHost<'a> {
    engine: &'a mut Engine,
    serial: Option<&'a str>,
}

impl Host for GatewayHost<'_> {
    async fn ready(&mut self, rec: &mut IdentityRecord) -> Result<(), IdentityError> {
        self.engine.claim_session(rec, self.serial).await
    }

    fn call_timeout(&self, rec: &IdentityRecord) -> Duration {
        self.engine.call_timeout(rec)
    }

    fn activity(&self, what: &str) {
        self.engine.activity(what);
    }

    fn show(&self, rec: &IdentityRecord) {
        self.engine.show(rec);
    }
}

/// Everything the engine needs; built by `crate::daemon::run`.
pub struct Engine {
    pub config: Arc<Config>,
    pub store: Store,
    pub board: Arc<Board>,
    /// The shared cloud connection: the engine switches it from the claim to the thing session.
    pub cloud: Cloud,
    pub notifier: Notifier,
    pub cancel: CancellationToken,
    pub claims: Option<mpsc::Receiver<TemporaryClaim>>,
    /// A claim handed over while the engine was waiting to retry; it replaces the saved one.
    pub fresh_claim: Option<TemporaryClaim>,
}

impl Engine {
    fn paths(&self) -> Paths {
        Paths::new(&self.config.daemon.state_dir, &Subject::Gateway)
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
        let mut slow = Backoff::new(
            PERMANENT_RETRY_FIRST.min(self.config.provisioning.permanent_retry()),
            self.config.provisioning.permanent_retry(),
        );
        loop {
            let cancel = self.cancel.clone();
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.establish() => r,
            };
            match result {
                Ok(()) => {
                    backoff.reset();
                    slow.reset();
                    self.board.update_identity(|i| i.last_error = None);
                    self.hold().await;
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
                        slow.next_delay()
                    } else {
                        backoff.next_delay()
                    };
                    let code = match &e {
                        IdentityError::Fleet(f) => f.error_code().map(str::to_owned),
                        _ => None,
                    };
                    // A clock behind a certificate's notBefore: wait for the clock, not a timer.
                    let clock = match &e {
                        IdentityError::ClockBehind { not_before, .. } => Some(*not_before),
                        _ => None,
                    };
                    if clock.is_some() {
                        tracing::error!(error = %e, "the system clock is wrong; waiting for it to be set");
                    } else if permanent {
                        tracing::error!(
                            error = %e,
                            error_code = code.as_deref(),
                            retry_in_secs = delay.as_secs(),
                            "provisioning failed and will not succeed until its cause is fixed (see error); \
                             retried on a growing schedule, or at once with `gatewayctl retry`"
                        );
                    } else {
                        tracing::warn!(
                            error = %e,
                            error_code = code.as_deref(),
                            retry_in_ms = delay.as_millis() as u64,
                            "provisioning step failed; retrying"
                        );
                    }
                    self.record_error(&e, clock.is_none().then_some(delay));
                    // The time of the next attempt is in `last_error.retry_at_unix` (status counts
                    // it down); a figure here would freeze.
                    self.activity(&format!(
                        "{}: {e}; waiting to retry",
                        if permanent {
                            "failed permanently"
                        } else {
                            "failed"
                        },
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
                    self.board.update_identity(|i| {
                        i.waiting_for_claim = wants_claim;
                        i.waiting_to_retry = true;
                    });
                    let claims = self.claims.as_mut().filter(|_| wants_claim);
                    let board = self.board.clone();
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay), if clock.is_none() => {}
                        // The wall clock is read once a second: an NTP step is seen at once.
                        at = clock_passes(clock.unwrap_or(0)), if clock.is_some() => {
                            tracing::info!(now = %super::files::utc(at), "the clock has moved past the certificate's validity start; retrying now");
                            backoff.reset();
                        }
                        () = board.retry_requested() => {
                            tracing::info!("retry requested (`gatewayctl retry` or SIGHUP); retrying now");
                            backoff.reset();
                        }
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
                    self.board.update_identity(|i| {
                        i.waiting_for_claim = false;
                        i.waiting_to_retry = false;
                    });
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
    async fn hold(&self) {
        let mut state = self.cloud.state();
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
                    self.report_possibly_active().await;
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
        self.cloud.disconnect().await;
    }

    /// Tells the cloud about certificates that may be ACTIVE and attached without the gateway
    /// using them (a RegisterThing answer lost and not confirmable), so that a rule can revoke
    /// them without a person: one QoS 1 event each on `gw/<thing>/events`, once the cloud
    /// acknowledged it (retried on the next connection otherwise). Documented in NOTES.md.
    async fn report_possibly_active(&self) {
        let Ok(Some(mut rec)) = self.store.load_identity::<IdentityRecord>(GATEWAY) else {
            return;
        };
        let Some(thing) = rec.thing_name.clone() else {
            return;
        };
        for id in record::unreported(&rec) {
            let event = serde_json::json!({
                "event": "possibly-active-certificate",
                "subject": "gateway",
                "thingName": thing,
                "certificateId": id,
                "inUseCertificateId": rec.certificate_id,
                "reason": "a RegisterThing answer was lost and the certificate could not be confirmed; \
                           it may be ACTIVE and attached to this thing without being used",
                "action": "revoke it unless it is inUseCertificateId",
                "at": unix_now(),
            });
            let topic = events_topic(&thing);
            let sent = tokio::time::timeout(
                Duration::from_secs(10),
                self.cloud.publish(
                    Lane::Control,
                    &topic,
                    rumqttc::QoS::AtLeastOnce,
                    event.to_string().into_bytes(),
                ),
            )
            .await;
            match sent {
                Ok(Ok(())) => {
                    record::reported(&mut rec, &id);
                    if let Err(error) = self.save(&rec) {
                        tracing::warn!(%error, "cannot record the reported certificate");
                    }
                    tracing::info!(certificate_id = %id, %topic, "possibly active certificate reported to the cloud");
                }
                Ok(Err(error)) => {
                    tracing::warn!(certificate_id = %id, %topic, %error, "cannot report the possibly active certificate; trying again on the next connection");
                    return;
                }
                Err(_) => {
                    tracing::warn!(certificate_id = %id, %topic, "no PUBACK for the possibly active certificate report within 10 s; trying again on the next connection");
                    return;
                }
            }
        }
    }

    fn mark_active(&self) -> Result<(), IdentityError> {
        let mut rec: IdentityRecord = self.store.load_identity(GATEWAY)?.unwrap_or_default();
        if record::activated(&mut rec) {
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
        let s = crate::daemon::check::trim_serial(s.as_bytes());
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

    /// Switches the cloud connection to a session with `params`.
    async fn connect(&self, params: UplinkParams) -> Result<(), IdentityError> {
        let role = params.role;
        // A clock behind the certificate's notBefore (a board without RTC before NTP) fails the
        // TLS handshake in ways that look like a refusal by the cloud; name it instead.
        let now = unix_now();
        if let Some(not_before) = super::files::not_before(&params.cert_pem)
            && now < not_before
        {
            return Err(IdentityError::ClockBehind {
                role,
                not_before,
                now,
            });
        }
        self.cloud.connect(params).await.map_err(|e| match e {
            UplinkError::TlsSetup(m) => IdentityError::Crypto(format!("{role} certificate: {m}")),
            other => IdentityError::Connect {
                role,
                source: other,
            },
        })
    }

    /// Runs the state machine up to a started thing session.
    async fn establish(&mut self) -> Result<(), IdentityError> {
        let paths = self.paths();
        if self.mode() == ProvisioningMode::Preinstalled {
            return self.connect_preinstalled().await;
        }
        let mut rec: IdentityRecord = self.store.load_identity(GATEWAY)?.unwrap_or_default();
        if record::recover(&mut rec) {
            tracing::warn!(
                unconfirmed = rec.unconfirmed_certificate_requests,
                "a certificate request was sent before the last stop but its answer was never saved; \
                 the cloud may hold a certificate we cannot name (it expires unregistered)"
            );
            self.save(&rec)?;
        }
        self.show(&rec);
        let serial = self.serial().await?;
        let result = self.provision(&mut rec, &paths, serial.as_deref()).await;
        if self.cloud.role() == Some("claim") {
            self.cloud.disconnect().await;
            tracing::info!("claim session closed");
        }
        if result? {
            // A lost RegisterThing answer, confirmed by connecting as the thing: keep it.
            return Ok(());
        }
        let thing = rec.thing_name.clone().ok_or(IdentityError::NoThingName)?;
        self.activity(&format!("connecting as {thing}"));
        let params = self.uplink_params(
            "thing",
            thing,
            read("certificate", &paths.cert)?,
            read("private key", &paths.key)?,
        )?;
        self.connect(params).await
    }

    async fn connect_preinstalled(&mut self) -> Result<(), IdentityError> {
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
        self.connect(params).await
    }

    /// The gateway's provisioning spec, from the config (its serial fills the serial parameter).
    fn spec(&self, serial: Option<&str>) -> Spec {
        let p = &self.config.provisioning;
        let mut parameters = p.parameters.clone();
        if let Some(s) = serial {
            parameters.insert(p.serial_parameter.clone(), s.to_owned());
        }
        Spec {
            subject: Subject::Gateway,
            api: certificate_api(p.mode),
            key_algorithm: p.key_algorithm,
            template: p.template.clone().unwrap_or_default(),
            parameters,
            common_name: serial.unwrap_or("gatewayd").to_owned(),
        }
    }

    /// Drives the steps; `true` when a lost registration was confirmed by connecting as the
    /// thing (that session is kept).
    async fn provision(
        &mut self,
        rec: &mut IdentityRecord,
        paths: &Paths,
        serial: Option<&str>,
    ) -> Result<bool, IdentityError> {
        let spec = self.spec(serial);
        let store = self.store.clone();
        let fleet = self.cloud.fleet();
        loop {
            let outcome = Driver {
                store: &store,
                fleet: &fleet,
                paths,
                spec: &spec,
                host: &mut GatewayHost {
                    engine: &mut *self,
                    serial,
                },
            }
            .provision(rec)
            .await?;
            match outcome {
                Outcome::Registered => return Ok(false),
                Outcome::RegistrationLost => {
                    if self.lost_registration(rec, paths, serial).await? {
                        return Ok(true);
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
    ) -> Result<bool, IdentityError> {
        let candidates = thing_name_candidates(
            rec,
            self.config.provisioning.expected_thing_name.as_deref(),
            serial,
        );
        if !candidates.is_empty() && self.cloud.role() == Some("claim") {
            // Not needed to probe; if the probe fails, starting over opens it again.
            self.cloud.disconnect().await;
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
            self.connect(params).await?;
            match self.cloud.wait_connected(wait).await {
                Ok(()) => {
                    record::registration_confirmed(rec, name.clone());
                    self.save(rec)?;
                    tracing::warn!(
                        thing = %name,
                        certificate_id = rec.certificate_id.as_deref().unwrap_or(""),
                        "the earlier RegisterThing had completed: connected as the expected thing; its deviceConfiguration was lost with the answer"
                    );
                    crash_point("thing-registered");
                    return Ok(true);
                }
                Err(UplinkError::ConnectPermanent(message)) => {
                    self.cloud.disconnect().await;
                    tracing::info!(thing = %name, %message, "the certificate is not usable as this thing");
                }
                Err(source) => {
                    self.cloud.disconnect().await;
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
        record::abandon(rec, certificate_api(self.mode()), true);
        self.save(rec)?;
        Ok(false)
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
        rec: &mut IdentityRecord,
        serial: Option<&str>,
    ) -> Result<(), IdentityError> {
        let paths = &self.paths();
        if self.mode() == ProvisioningMode::TrustedUser
            && let Some(dl) = rec.temporary_claim_deadline
            && unix_now() >= dl
        {
            rec.temporary_claim_deadline = None;
            self.save(rec)?;
            if self.cloud.role() == Some("claim") {
                self.cloud.disconnect().await;
            }
            return Err(IdentityError::TemporaryClaimExpired);
        }
        if self.cloud.role() == Some("claim") {
            return Ok(());
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
        self.connect(self.uplink_params("claim", client_id, cert, key)?)
            .await?;
        let wait = self.config.provisioning.call_timeout();
        match self.cloud.wait_connected(wait).await {
            Ok(()) => Ok(()),
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
