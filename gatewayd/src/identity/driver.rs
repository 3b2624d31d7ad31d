//! Driver: runs a subject's provisioning steps (`record`) over the shared cloud connection.
//!
//! The same code and the same crash rules serve the gateway and every child: the record is saved
//! and flushed before each request (pending marker) and after each answer; a saved token under an
//! hour old is redeemed; a certificate that can no longer be registered is recorded as orphaned.
//! What differs per subject comes through `Host`: which session makes the calls (the gateway's
//! claim session, or the gateway's thing session for a child), the call timeout, and where
//! progress is shown. The one case the driver cannot settle alone, a RegisterThing whose answer
//! was lost and whose token is now refused or expired, is returned as `RegistrationLost`: the
//! gateway probes it by connecting as the thing; a child cannot be probed (the gateway does not
//! connect as its children), so `settle_without_probe` applies the documented rule.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;

use super::files::{Paths, Subject, certificate_id, generate_key, make_csr, read, write};
use super::record::{self, CertificateApi, IdentityRecord, Rejected, Step};
use super::{IdentityError, crash_point};
use crate::cloud::fleet::{
    self, CertificateAnswer, FleetApi, FleetClient, FleetError, RegisterAnswer,
};
use crate::daemon::config::KeyAlgorithm;
use crate::daemon::status::unix_now;
use crate::store::Store;

/// What is provisioned, and how.
#[derive(Debug, Clone)]
pub struct Spec {
    pub subject: Subject,
    pub api: CertificateApi,
    pub key_algorithm: KeyAlgorithm,
    /// Fleet-provisioning template for RegisterThing.
    pub template: String,
    pub parameters: BTreeMap<String, String>,
    /// Subject CN of the CSR.
    pub common_name: String,
}

/// What the driver needs from the subject's owner.
pub trait Host {
    /// Makes sure a session that may call the fleet-provisioning API for this subject is up.
    fn ready(
        &mut self,
        rec: &mut IdentityRecord,
    ) -> impl std::future::Future<Output = Result<(), IdentityError>>;
    /// Timeout for one call (request, PUBACK and answer).
    fn call_timeout(&self, rec: &IdentityRecord) -> Duration;
    /// What is happening now (status, STATUS= line).
    fn activity(&self, what: &str);
    /// The record as saved (status).
    fn show(&self, rec: &IdentityRecord);
}

/// Where provisioning stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The thing is registered with the subject's certificate: connect (gateway) or use it.
    Registered,
    /// A RegisterThing answer was lost and its token can no longer be redeemed: the thing may
    /// exist with this certificate ACTIVE. The record still holds the certificate.
    RegistrationLost,
}

pub struct Driver<'a, H: Host> {
    pub store: &'a Store,
    pub fleet: &'a FleetClient,
    pub paths: &'a Paths,
    pub spec: &'a Spec,
    pub host: &'a mut H,
}

impl<H: Host> Driver<'_, H> {
    fn save(&self, rec: &IdentityRecord) -> Result<(), IdentityError> {
        self.store.save_identity(&self.spec.subject.key(), rec)?;
        self.host.show(rec);
        Ok(())
    }

    /// Runs steps until the thing is registered or a lost registration needs its owner.
    pub async fn provision(&mut self, rec: &mut IdentityRecord) -> Result<Outcome, IdentityError> {
        let spec = self.spec;
        let subject = &spec.subject;
        loop {
            let step = record::next_step(rec, spec.api, unix_now());
            tracing::debug!(?step, %subject, stage = rec.stage.label(), "identity step");
            match step {
                Step::ConnectAsThing => return Ok(Outcome::Registered),
                Step::GenerateKey => {
                    self.host.activity("generating a private key");
                    let alg = spec.key_algorithm;
                    let pem = tokio::task::spawn_blocking(move || generate_key(alg))
                        .await
                        .map_err(|e| IdentityError::Crypto(e.to_string()))??;
                    write("private key", &self.paths.key, pem.as_bytes(), 0o600)?;
                    record::key_generated(rec, alg);
                    self.save(rec)?;
                    tracing::info!(%subject, algorithm = ?alg, path = %self.paths.key.display(), "private key generated");
                    crash_point("key-generated");
                }
                Step::Abandon if rec.pending == Some(record::PendingCall::RegisterThing) => {
                    // The token ran out, but a RegisterThing with it may have completed.
                    return Ok(Outcome::RegistrationLost);
                }
                Step::Abandon => {
                    tracing::warn!(
                        %subject,
                        certificate_id = rec.certificate_id.as_deref().unwrap_or(""),
                        "ownership token is older than allowed; abandoning that certificate (orphaned) and starting over"
                    );
                    record::abandon(rec, spec.api, false);
                    self.save(rec)?;
                }
                Step::CreateCertificateFromCsr | Step::CreateKeysAndCertificate => {
                    self.create(rec, step).await?;
                }
                Step::RegisterThing => {
                    if let Some(outcome) = self.register(rec).await? {
                        return Ok(outcome);
                    }
                }
            }
        }
    }

    async fn create(&mut self, rec: &mut IdentityRecord, step: Step) -> Result<(), IdentityError> {
        let spec = self.spec;
        let (api, payload) = if step == Step::CreateCertificateFromCsr {
            let key = String::from_utf8_lossy(&read("private key", &self.paths.key)?).into_owned();
            let alg = rec.key_algorithm.unwrap_or(spec.key_algorithm);
            let csr = make_csr(&key, alg, &spec.common_name)?;
            (
                FleetApi::CreateCertificateFromCsr,
                json!({ "certificateSigningRequest": csr }),
            )
        } else {
            (FleetApi::CreateKeysAndCertificate, json!({}))
        };
        self.host.ready(rec).await?;
        self.host
            .activity(&format!("{}: requesting a certificate", api.name()));
        record::create_sent(rec);
        self.save(rec)?;
        let acknowledged = AtomicBool::new(false);
        let answer = self
            .fleet
            .call(&api, &payload, self.host.call_timeout(rec), || {
                acknowledged.store(true, Ordering::SeqCst);
                crash_point("csr-sent");
            })
            .await;
        let answer = match answer {
            Ok(v) => v,
            Err(e) => {
                let rejected = matches!(e, FleetError::Rejected { .. });
                // A PUBACK that never came (timeout, connection lost after sending) leaves the
                // cloud possibly holding a certificate, as an answer that never came does.
                let reached = acknowledged.load(Ordering::SeqCst) || e.may_have_reached_the_cloud();
                record::create_failed(rec, reached, rejected);
                self.save(rec)?;
                return Err(e.into());
            }
        };
        let cert: CertificateAnswer = fleet::parse(&api, answer)?;
        if let Some(key) = &cert.private_key {
            write("private key", &self.paths.key, key.as_bytes(), 0o600)?;
        }
        write(
            "certificate",
            &self.paths.cert,
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
        record::certificate_issued(
            rec,
            cert.certificate_id.clone(),
            cert.certificate_ownership_token,
            unix_now(),
        );
        self.save(rec)?;
        tracing::info!(subject = %spec.subject, certificate_id = %cert.certificate_id, api = api.name(), "certificate issued and saved");
        crash_point("certificate-saved");
        Ok(())
    }

    /// One RegisterThing; `Some` when provisioning stops here.
    async fn register(
        &mut self,
        rec: &mut IdentityRecord,
    ) -> Result<Option<Outcome>, IdentityError> {
        let spec = self.spec;
        self.host.ready(rec).await?;
        let api = FleetApi::RegisterThing {
            template: spec.template.clone(),
        };
        let payload = json!({
            "certificateOwnershipToken": rec.ownership_token.clone().unwrap_or_default(),
            "parameters": spec.parameters,
        });
        self.host
            .activity(&format!("RegisterThing with template {}", spec.template));
        let lost_before = record::register_sent(rec);
        self.save(rec)?;
        let r = self
            .fleet
            .call(&api, &payload, self.host.call_timeout(rec), || {
                crash_point("register-sent");
            })
            .await;
        match r {
            Err(FleetError::Rejected { rejection, api }) => {
                let token_refused = rejection.error_code.to_ascii_lowercase().contains("token");
                match record::register_rejected(rec, spec.api, token_refused, lost_before) {
                    Rejected::RegistrationLost => {
                        tracing::info!(
                            subject = %spec.subject,
                            error_code = %rejection.error_code,
                            error_message = %rejection.error_message,
                            "RegisterThing refused the saved ownership token after an earlier RegisterThing whose answer was lost"
                        );
                        Ok(Some(Outcome::RegistrationLost))
                    }
                    Rejected::Abandoned => {
                        tracing::warn!(
                            subject = %spec.subject,
                            error_code = %rejection.error_code,
                            error_message = %rejection.error_message,
                            certificate_id = rec.orphaned_certificates.last().map(String::as_str).unwrap_or(""),
                            "RegisterThing refused the saved ownership token; abandoning that certificate and starting over"
                        );
                        self.save(rec)?;
                        Ok(None)
                    }
                    Rejected::Failed => {
                        self.save(rec)?;
                        Err(FleetError::Rejected { api, rejection }.into())
                    }
                }
            }
            // Timeout or lost connection: the cloud may have registered the thing and consumed
            // the token. `pending` stays RegisterThing.
            Err(e) => Err(e.into()),
            Ok(v) => {
                let ans: RegisterAnswer = fleet::parse(&api, v)?;
                let thing = ans
                    .thing_name
                    .filter(|t| !t.is_empty())
                    .ok_or(IdentityError::NoThingName)?;
                record::registered(rec, thing.clone(), ans.device_configuration);
                self.save(rec)?;
                tracing::info!(subject = %spec.subject, thing = %thing, certificate_id = rec.certificate_id.as_deref().unwrap_or(""), "thing registered");
                crash_point("thing-registered");
                Ok(Some(Outcome::Registered))
            }
        }
    }

    /// The rule for a subject the gateway cannot probe by connecting as it (every child): the
    /// certificate is given up and recorded as possibly active (status, and an event for a cloud
    /// rule to revoke it), and provisioning starts over with the same key. The template names
    /// the thing from the child's parameters, so the next RegisterThing reaches the same thing
    /// and attaches the new certificate: one thing, at worst one extra certificate to revoke,
    /// never a second thing.
    pub fn settle_without_probe(&mut self, rec: &mut IdentityRecord) -> Result<(), IdentityError> {
        tracing::warn!(
            subject = %self.spec.subject,
            certificate_id = rec.certificate_id.as_deref().unwrap_or(""),
            "a RegisterThing answer was lost and cannot be confirmed; the certificate is possibly ACTIVE and attached: revoke it. Starting over"
        );
        record::abandon(rec, self.spec.api, true);
        self.save(rec)
    }
}
