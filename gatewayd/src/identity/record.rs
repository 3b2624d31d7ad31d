//! Record: the persisted provisioning state of one subject (the gateway or a child) and every
//! transition it goes through, as pure functions (no I/O, no clock: `now` is passed in).
//!
//! New → KeyGenerated → CertificateIssued → ThingRegistered → Active. The step driver saves (and
//! flushes) the record after each transition, and before any request that depends on it: the
//! crash rules live here, so the gateway and every child follow the same ones.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::daemon::config::KeyAlgorithm;

/// AWS: the ownership token must be redeemed within one hour.
pub const TOKEN_LIFETIME_SECS: u64 = 3600;
/// Do not start a RegisterThing with less than this left on the token.
const TOKEN_MARGIN_SECS: u64 = 60;

/// How a subject gets its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateApi {
    /// Our own key and CSR: CreateCertificateFromCsr (the key never leaves the gateway).
    FromCsr,
    /// The cloud makes the key: CreateKeysAndCertificate.
    CreateKeys,
}

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
    /// Possibly active certificates already reported to the cloud (an event the cloud
    /// acknowledged), so each is reported once.
    #[serde(default)]
    pub reported_certificates: Vec<String>,
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

pub fn next_step(rec: &IdentityRecord, api: CertificateApi, now: u64) -> Step {
    match rec.stage {
        Stage::ThingRegistered | Stage::Active => Step::ConnectAsThing,
        Stage::CertificateIssued if token_usable(rec, now) => Step::RegisterThing,
        Stage::CertificateIssued => Step::Abandon,
        Stage::KeyGenerated | Stage::New if api == CertificateApi::CreateKeys => {
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
pub fn abandon(rec: &mut IdentityRecord, api: CertificateApi, possibly_active: bool) {
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
    rec.stage = if api == CertificateApi::FromCsr && rec.key_algorithm.is_some() {
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

/// A key was generated and written.
pub fn key_generated(rec: &mut IdentityRecord, alg: KeyAlgorithm) {
    rec.key_algorithm = Some(alg);
    rec.stage = Stage::KeyGenerated;
}

/// Before a create call is published: marked pending, so a crash before its answer is saved is
/// counted (`recover`).
pub fn create_sent(rec: &mut IdentityRecord) {
    rec.pending = Some(PendingCall::CreateCertificate);
}

/// A create call failed. If the broker had acknowledged the request and the cloud did not
/// answer it with a rejection, it may hold a certificate we will never learn of: counted.
pub fn create_failed(rec: &mut IdentityRecord, acknowledged: bool, rejected: bool) {
    rec.pending = None;
    if acknowledged && !rejected {
        rec.unconfirmed_certificate_requests += 1;
    }
}

/// A certificate was issued and its files written; the token is good for one hour from `now`.
pub fn certificate_issued(
    rec: &mut IdentityRecord,
    certificate_id: String,
    token: String,
    now: u64,
) {
    rec.certificate_id = Some(certificate_id);
    rec.ownership_token = Some(token);
    rec.token_expires_at = Some(now + TOKEN_LIFETIME_SECS);
    rec.stage = Stage::CertificateIssued;
    rec.pending = None;
}

/// Before a RegisterThing is published. Returns whether an earlier RegisterThing with this token
/// went unanswered (its answer lost to a crash, a timeout or a dropped connection).
pub fn register_sent(rec: &mut IdentityRecord) -> bool {
    let lost_before = rec.pending == Some(PendingCall::RegisterThing);
    rec.pending = Some(PendingCall::RegisterThing);
    lost_before
}

/// What a RegisterThing rejection means for the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The token was refused after an earlier call whose answer was lost: that call most likely
    /// used it, so the thing may exist with this certificate ACTIVE. The subject decides
    /// (`lost_registration`); the record is unchanged.
    RegistrationLost,
    /// The token was refused and nothing else used it: the certificate is orphaned, start over.
    Abandoned,
    /// Refused for another reason (template, parameters, hook): a failure to report and retry.
    Failed,
}

/// A RegisterThing was answered with a rejection.
pub fn register_rejected(
    rec: &mut IdentityRecord,
    api: CertificateApi,
    token_refused: bool,
    lost_before: bool,
) -> Rejected {
    match (token_refused, lost_before) {
        (true, true) => Rejected::RegistrationLost,
        (true, false) => {
            abandon(rec, api, false);
            Rejected::Abandoned
        }
        (false, _) => {
            // The cloud answered this call and did not register; an earlier, unanswered one
            // still may have, so the marker stays in that case.
            if !lost_before {
                rec.pending = None;
            }
            Rejected::Failed
        }
    }
}

/// RegisterThing answered: the thing exists with our certificate attached.
pub fn registered(
    rec: &mut IdentityRecord,
    thing_name: String,
    device_configuration: serde_json::Map<String, Value>,
) {
    rec.thing_name = Some(thing_name);
    rec.device_configuration = device_configuration;
    rec.ownership_token = None;
    rec.token_expires_at = None;
    rec.pending = None;
    rec.stage = Stage::ThingRegistered;
}

/// The lost answer was recovered another way (the gateway connected as the thing): registered,
/// but the deviceConfiguration went with the answer.
pub fn registration_confirmed(rec: &mut IdentityRecord, thing_name: String) {
    registered(rec, thing_name, Default::default());
}

/// Possibly active certificates not yet reported to the cloud.
pub fn unreported(rec: &IdentityRecord) -> Vec<String> {
    rec.possibly_active_certificates
        .iter()
        .filter(|c| !rec.reported_certificates.contains(c))
        .cloned()
        .collect()
}

/// The cloud acknowledged the report of `certificate_id`.
pub fn reported(rec: &mut IdentityRecord, certificate_id: &str) {
    if !rec
        .reported_certificates
        .iter()
        .any(|c| c == certificate_id)
    {
        rec.reported_certificates.push(certificate_id.to_owned());
    }
}

/// The thing connection held: active. Returns whether the record changed.
pub fn activated(rec: &mut IdentityRecord) -> bool {
    if rec.stage == Stage::Active {
        return false;
    }
    rec.stage = Stage::Active;
    rec.temporary_claim_deadline = None;
    true
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
        assert_eq!(next_step(&r, CertificateApi::FromCsr, 0), Step::GenerateKey);
        assert_eq!(
            next_step(&r, CertificateApi::CreateKeys, 0),
            Step::CreateKeysAndCertificate
        );
        let r = IdentityRecord {
            stage: Stage::KeyGenerated,
            ..r
        };
        assert_eq!(
            next_step(&r, CertificateApi::FromCsr, 0),
            Step::CreateCertificateFromCsr
        );
        assert_eq!(
            next_step(&r, CertificateApi::FromCsr, 0),
            Step::CreateCertificateFromCsr
        );
    }

    #[test]
    fn young_token_is_redeemed_old_one_abandoned() {
        let now = 1_000_000;
        let r = issued(now);
        assert_eq!(
            next_step(&r, CertificateApi::FromCsr, now),
            Step::RegisterThing
        );
        assert_eq!(
            next_step(&r, CertificateApi::FromCsr, now + 3000),
            Step::RegisterThing
        );
        assert_eq!(
            next_step(&r, CertificateApi::FromCsr, now + 3560),
            Step::Abandon
        );
        assert_eq!(
            next_step(&r, CertificateApi::FromCsr, now + 7200),
            Step::Abandon
        );
        let no_token = IdentityRecord {
            ownership_token: None,
            ..r
        };
        assert_eq!(
            next_step(&no_token, CertificateApi::FromCsr, now),
            Step::Abandon
        );
    }

    #[test]
    fn abandon_records_orphan_once_and_keeps_key() {
        let mut r = issued(0);
        abandon(&mut r, CertificateApi::FromCsr, false);
        assert_eq!(r.stage, Stage::KeyGenerated);
        assert_eq!(r.orphaned_certificates, vec!["c1".to_owned()]);
        assert_eq!(r.ownership_token, None);
        assert_eq!(r.certificate_id, None);
        abandon(&mut r, CertificateApi::FromCsr, false);
        assert_eq!(r.orphaned_certificates.len(), 1);
        let mut r = issued(0);
        abandon(&mut r, CertificateApi::CreateKeys, false);
        assert_eq!(r.stage, Stage::New);
        // After a lost RegisterThing answer the certificate is not called orphaned.
        let mut r = issued(0);
        abandon(&mut r, CertificateApi::FromCsr, true);
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
            next_step(&r, CertificateApi::FromCsr, 10),
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
                next_step(&r, CertificateApi::FromCsr, 0),
                Step::ConnectAsThing
            );
        }
    }

    #[test]
    fn create_answer_lost_after_puback_is_counted_once() {
        let mut r = IdentityRecord {
            stage: Stage::KeyGenerated,
            ..Default::default()
        };
        create_sent(&mut r);
        // Not acknowledged by the broker: the cloud never saw it.
        create_failed(&mut r, false, false);
        assert_eq!((r.pending, r.unconfirmed_certificate_requests), (None, 0));
        // Rejected: the cloud answered, it holds nothing.
        create_sent(&mut r);
        create_failed(&mut r, true, true);
        assert_eq!(r.unconfirmed_certificate_requests, 0);
        // Acknowledged, then no answer: it may hold a certificate.
        create_sent(&mut r);
        create_failed(&mut r, true, false);
        assert_eq!((r.pending, r.unconfirmed_certificate_requests), (None, 1));
    }

    #[test]
    fn register_rejections_keep_the_lost_call_marker() {
        let api = CertificateApi::FromCsr;
        let mut r = issued(0);
        assert!(!register_sent(&mut r));
        // A template refusal clears the marker of this (answered) call.
        assert_eq!(
            register_rejected(&mut r, api, false, false),
            Rejected::Failed
        );
        assert_eq!(r.pending, None);
        // A call that went unanswered, then a retry refused for the template: the marker stays.
        register_sent(&mut r);
        assert!(register_sent(&mut r));
        assert_eq!(
            register_rejected(&mut r, api, false, true),
            Rejected::Failed
        );
        assert_eq!(r.pending, Some(PendingCall::RegisterThing));
        // The token refused after a lost answer: the subject must decide; record untouched.
        let before = r.clone();
        assert_eq!(
            register_rejected(&mut r, api, true, true),
            Rejected::RegistrationLost
        );
        assert_eq!(r, before);
        // The token refused with no earlier call: orphaned, start over with the same key.
        let mut r = issued(0);
        register_sent(&mut r);
        assert_eq!(
            register_rejected(&mut r, api, true, false),
            Rejected::Abandoned
        );
        assert_eq!(r.stage, Stage::KeyGenerated);
        assert_eq!(r.orphaned_certificates, vec!["c1".to_owned()]);
    }

    #[test]
    fn full_flow_to_active() {
        let mut r = IdentityRecord::default();
        let api = CertificateApi::FromCsr;
        key_generated(&mut r, KeyAlgorithm::EcdsaP256);
        assert_eq!(next_step(&r, api, 0), Step::CreateCertificateFromCsr);
        create_sent(&mut r);
        certificate_issued(&mut r, "c1".into(), "tok".into(), 100);
        assert_eq!(r.pending, None);
        assert_eq!(r.token_expires_at, Some(100 + TOKEN_LIFETIME_SECS));
        assert_eq!(next_step(&r, api, 100), Step::RegisterThing);
        register_sent(&mut r);
        registered(&mut r, "gw-1".into(), Default::default());
        assert_eq!(
            (r.stage, r.pending, r.ownership_token.as_deref()),
            (Stage::ThingRegistered, None, None)
        );
        assert_eq!(next_step(&r, api, 100), Step::ConnectAsThing);
        r.temporary_claim_deadline = Some(5);
        assert!(activated(&mut r));
        assert_eq!(r.temporary_claim_deadline, None);
        assert!(!activated(&mut r));
    }

    #[test]
    fn possibly_active_certificates_are_reported_once() {
        let mut r = issued(0);
        assert!(unreported(&r).is_empty());
        abandon(&mut r, CertificateApi::FromCsr, true);
        assert_eq!(unreported(&r), vec!["c1".to_owned()]);
        reported(&mut r, "c1");
        reported(&mut r, "c1");
        assert!(unreported(&r).is_empty());
        assert_eq!(r.reported_certificates, vec!["c1".to_owned()]);
    }
}
