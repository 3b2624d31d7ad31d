//! Provisioner: makes each admitted child a thing of its own in AWS IoT, by proxy, over the
//! gateway's thing session: a key kept under the child's state directory (0600), a CSR from it,
//! CreateCertificateFromCsr, then RegisterThing with the child template and the child's
//! parameters (serial, vendor, model, `ParentThing`, how it was found, configured constants).
//!
//! Children wait in a persisted queue (store table `child_jobs`), one record per child: offered
//! → awaiting approval or queued → provisioned (or denied, or failed until retried). Each child
//! runs through the same `identity::driver::Driver` and crash rules as the gateway (subject
//! `child/<id>`), one call in flight at a time (the fleet client's call lock; NOTES "Children
//! provisioning" says why), paced to the account's quotas (`pacer`) on the provisioning lane of
//! the uplink limiter. A provisioned child's certificateId is pinned in the children registry so
//! the local endpoint accepts it.
//!
//! Never twice: a child whose job says provisioned is never sent again; a child whose identity
//! record says registered (a crash after RegisterThing was saved, before the job was) is only
//! pinned and marked. A denied child is never sent. Must not touch: the local endpoint (only the
//! registry's own API), the gateway's identity record.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::admission::{self, Decision, Identity};
use super::pacer::Pacer;
use super::{AddChild, Registry};
use crate::cloud::fleet::FleetError;
use crate::cloud::{Cloud, LinkState};
use crate::daemon::config::Config;
use crate::daemon::status::{
    Board, ChildrenSummary, ProvisionService, Request, Response, unix_now,
};
use crate::identity::driver::{Driver, Host, Outcome, Spec};
use crate::identity::files::BadSubject;
use crate::identity::record::{self, CertificateApi, IdentityRecord, Stage};
use crate::identity::{IdentityError, Paths, Subject};
use crate::store::{Store, StoreError};

/// A child someone found: `gatewayctl children add --provision`, or a discovery plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoundChild {
    pub id: String,
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub vendor: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    /// How it was found: `manual`, `modbus`, `mqtt`, …
    #[serde(default = "manual")]
    pub found_by: String,
    /// A template other than `children.template` (a device profile may name one).
    #[serde(default)]
    pub template: Option<String>,
    /// More RegisterThing parameters (a device profile's).
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

fn manual() -> String {
    "manual".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    AwaitingApproval,
    Queued,
    Provisioned,
    Denied,
    /// A permanent failure (template, parameters, hook): waits for `gatewayctl children retry`.
    Failed,
}

impl JobState {
    pub fn label(self) -> &'static str {
        match self {
            JobState::AwaitingApproval => "awaiting-approval",
            JobState::Queued => "queued",
            JobState::Provisioned => "provisioned",
            JobState::Denied => "denied",
            JobState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub found: FoundChild,
    pub state: JobState,
    /// Queue order (offer order; a retry goes to the back).
    pub seq: u64,
    pub offered_unix: u64,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// What `gatewayctl children show` prints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChildProvisioning {
    pub id: String,
    pub state: String,
    pub found: FoundChild,
    pub stage: String,
    pub thing_name: Option<String>,
    pub certificate_id: Option<String>,
    pub device_configuration: serde_json::Map<String, serde_json::Value>,
    pub pinned: bool,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub orphaned_certificates: Vec<String>,
    pub possibly_active_certificates: Vec<String>,
    pub unconfirmed_certificate_requests: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    BadId(#[from] BadSubject),
    #[error(
        "child `{0}` was never offered for provisioning (gatewayctl children add ID --provision)"
    )]
    Unknown(String),
    #[error("child `{id}` is {state}; {what}")]
    WrongState {
        id: String,
        state: &'static str,
        what: &'static str,
    },
    #[error("{field} of child `{id}` is not usable: {why}")]
    BadField {
        id: String,
        field: &'static str,
        why: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Bulk(String),
}

#[derive(Debug, Default)]
struct Queue {
    jobs: BTreeMap<String, Job>,
    /// Transient failures wait until then (not persisted: after a restart everything is due).
    not_before: HashMap<String, Instant>,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    wake: tokio::sync::Notify,
    seq: AtomicU64,
    throttled: AtomicU64,
}

/// The provisioner's handle: offers and operator requests come in here; `run` works the queue.
#[derive(Clone)]
pub struct Provisioner {
    config: Arc<Config>,
    store: Store,
    registry: Registry,
    cloud: Cloud,
    board: Arc<Board>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioner").finish_non_exhaustive()
    }
}

fn check_field(id: &str, field: &'static str, v: &Option<String>) -> Result<(), ProvisionError> {
    if let Some(v) = v
        && (v.is_empty() || v.len() > 800 || v.chars().any(char::is_control))
    {
        return Err(ProvisionError::BadField {
            id: id.to_owned(),
            field,
            why: "empty, over 800 bytes, or holding control characters".into(),
        });
    }
    Ok(())
}

impl Provisioner {
    /// Loads the persisted queue.
    pub fn open(
        config: Arc<Config>,
        store: Store,
        registry: Registry,
        cloud: Cloud,
        board: Arc<Board>,
    ) -> Result<Provisioner, StoreError> {
        let jobs: BTreeMap<String, Job> = store.list_jobs::<Job>()?.into_iter().collect();
        let seq = jobs.values().map(|j| j.seq).max().unwrap_or(0) + 1;
        Ok(Provisioner {
            config,
            store,
            registry,
            cloud,
            board,
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    jobs,
                    not_before: HashMap::new(),
                }),
                wake: tokio::sync::Notify::new(),
                seq: AtomicU64::new(seq),
                throttled: AtomicU64::new(0),
            }),
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, id: &str, job: &Job) -> Result<(), StoreError> {
        self.store.save_job(id, job)
    }

    /// A child was found. A child already known keeps its state (a provisioned one is never
    /// provisioned again, a denied one stays denied); a new one is admitted by policy.
    pub fn offer(&self, found: FoundChild) -> Result<JobState, ProvisionError> {
        Subject::child(&found.id)?;
        check_field(&found.id, "serial", &found.serial)?;
        check_field(&found.id, "vendor", &found.vendor)?;
        check_field(&found.id, "model", &found.model)?;
        if let Some(t) = &found.template
            && !crate::daemon::config::valid_template_name(t)
        {
            return Err(ProvisionError::BadField {
                id: found.id.clone(),
                field: "template",
                why: format!("`{t}` is not 1-36 characters of [0-9A-Za-z_-]"),
            });
        }
        let mut q = self.queue();
        if let Some(j) = q.jobs.get(&found.id) {
            return Ok(j.state);
        }
        let c = &self.config.children;
        let state = match admission::decide(
            c.admission,
            &c.allow,
            Identity {
                serial: found.serial.as_deref(),
                model: found.model.as_deref(),
                vendor: found.vendor.as_deref(),
            },
        ) {
            Decision::Queue => JobState::Queued,
            Decision::AwaitApproval => JobState::AwaitingApproval,
        };
        let id = found.id.clone();
        let job = Job {
            found,
            state,
            seq: self.shared.seq.fetch_add(1, Ordering::SeqCst),
            offered_unix: unix_now(),
            attempts: 0,
            last_error: None,
        };
        self.save(&id, &job)?;
        tracing::info!(child = %id, found_by = %job.found.found_by, state = state.label(), "child offered for provisioning");
        q.jobs.insert(id, job);
        drop(q);
        self.shared.wake.notify_one();
        Ok(state)
    }

    /// Operator decisions: `to` from the states in `from`.
    fn decide(
        &self,
        id: &str,
        from: &[JobState],
        to: JobState,
        what: &'static str,
    ) -> Result<(), ProvisionError> {
        Subject::child(id)?;
        let mut q = self.queue();
        let Some(job) = q.jobs.get(id) else {
            return Err(ProvisionError::Unknown(id.to_owned()));
        };
        if !from.contains(&job.state) {
            return Err(ProvisionError::WrongState {
                id: id.to_owned(),
                state: job.state.label(),
                what,
            });
        }
        let mut job = job.clone();
        job.state = to;
        if to == JobState::Queued {
            job.seq = self.shared.seq.fetch_add(1, Ordering::SeqCst);
            job.last_error = None;
            job.attempts = 0;
        }
        self.save(id, &job)?;
        q.jobs.insert(id.to_owned(), job);
        q.not_before.remove(id);
        drop(q);
        tracing::info!(child = %id, state = to.label(), "child {}", to.label());
        self.shared.wake.notify_one();
        Ok(())
    }

    pub fn approve(&self, id: &str) -> Result<(), ProvisionError> {
        self.decide(
            id,
            &[JobState::AwaitingApproval, JobState::Denied],
            JobState::Queued,
            "only a child awaiting approval (or denied) can be approved",
        )
    }

    /// A denied child is never provisioned. One already provisioned cannot be denied here: its
    /// thing exists (delete it in AWS IoT and `gatewayctl children remove` it).
    pub fn deny(&self, id: &str) -> Result<(), ProvisionError> {
        self.decide(
            id,
            &[
                JobState::AwaitingApproval,
                JobState::Queued,
                JobState::Failed,
            ],
            JobState::Denied,
            "a provisioned child's thing exists: delete it in AWS IoT, then `gatewayctl children remove`",
        )
    }

    /// A failed child is tried again now (a queued one waiting after a transient failure too).
    pub fn retry(&self, id: &str) -> Result<(), ProvisionError> {
        {
            let mut q = self.queue();
            if q.jobs.get(id).is_some_and(|j| j.state == JobState::Queued) {
                q.not_before.remove(id);
                drop(q);
                self.shared.wake.notify_one();
                return Ok(());
            }
        }
        self.decide(
            id,
            &[JobState::Failed],
            JobState::Queued,
            "only a failed or queued child can be retried",
        )
    }

    pub fn show(&self, id: &str) -> Result<ChildProvisioning, ProvisionError> {
        Subject::child(id)?;
        let job = self
            .queue()
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| ProvisionError::Unknown(id.to_owned()))?;
        Ok(self.view(id, &job))
    }

    fn view(&self, id: &str, job: &Job) -> ChildProvisioning {
        let rec: IdentityRecord = Subject::child(id)
            .ok()
            .and_then(|s| self.store.load_identity(&s.key()).ok().flatten())
            .unwrap_or_default();
        let pinned = rec.certificate_id.as_ref().is_some_and(|c| {
            self.registry
                .get(id)
                .is_some_and(|r| r.certificate_ids.contains(c))
        });
        ChildProvisioning {
            id: id.to_owned(),
            state: job.state.label().to_owned(),
            found: job.found.clone(),
            stage: rec.stage.label().to_owned(),
            thing_name: rec.thing_name,
            certificate_id: rec.certificate_id,
            device_configuration: rec.device_configuration,
            pinned,
            attempts: job.attempts,
            last_error: job.last_error.clone(),
            orphaned_certificates: rec.orphaned_certificates,
            possibly_active_certificates: rec.possibly_active_certificates,
            unconfirmed_certificate_requests: rec.unconfirmed_certificate_requests,
        }
    }

    /// Every known child, in id order.
    pub fn list(&self) -> Vec<ChildProvisioning> {
        let jobs: Vec<(String, Job)> = self
            .queue()
            .jobs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        jobs.iter().map(|(id, j)| self.view(id, j)).collect()
    }

    /// The gateway's thing name while its thing session is connected; children are provisioned
    /// only then (over that session, with it as `ParentThing`).
    fn parent(&self) -> Option<String> {
        if self.cloud.role() != Some("thing") {
            return None;
        }
        if *self.cloud.state().borrow() != LinkState::Connected {
            return None;
        }
        let id = self.board.identity();
        if id.stage != Stage::Active.label() {
            return None;
        }
        id.thing_name
    }

    /// The queued child that is due first (queue order), or how long until one is.
    fn next_due(&self) -> Result<(String, Job), Option<Duration>> {
        let q = self.queue();
        let now = Instant::now();
        let mut wait: Option<Duration> = None;
        let mut best: Option<(&String, &Job)> = None;
        for (id, job) in &q.jobs {
            if job.state != JobState::Queued {
                continue;
            }
            if let Some(nb) = q.not_before.get(id)
                && *nb > now
            {
                let w = *nb - now;
                wait = Some(wait.map_or(w, |x| x.min(w)));
                continue;
            }
            if best.is_none_or(|(_, b)| job.seq < b.seq) {
                best = Some((id, job));
            }
        }
        match best {
            Some((id, job)) => Ok((id.clone(), job.clone())),
            None => Err(wait),
        }
    }

    fn state_of(&self, id: &str) -> Option<JobState> {
        self.queue().jobs.get(id).map(|j| j.state)
    }

    /// Works the queue until cancelled.
    pub async fn run(self, cancel: CancellationToken) {
        let c = &self.config.children;
        let mut pacer = Pacer::new(c.create_certificate_per_sec, c.register_thing_per_sec);
        let mut waiting_logged = false;
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let wait = match self.parent() {
                None => Some(Duration::from_millis(200)),
                Some(parent) => match self.next_due() {
                    Ok((id, job)) => {
                        waiting_logged = false;
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = self.provision_one(&id, &job, &parent, &mut pacer) => {}
                        }
                        continue;
                    }
                    Err(w) => w,
                },
            };
            if !waiting_logged && self.next_due().is_ok() {
                tracing::info!("children wait for the gateway's own thing connection");
                waiting_logged = true;
            }
            let sleep = wait.unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.shared.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    fn spec(&self, id: &str, job: &Job, parent: &str) -> Result<Spec, String> {
        let c = &self.config.children;
        let subject = Subject::child(id).map_err(|e| e.to_string())?;
        let template = job.found.template.clone().or_else(|| c.template.clone()).ok_or(
            "no child template: set children.template in the configuration (the gateway's thing policy must allow its fleet-provisioning topics)",
        )?;
        let f = &job.found;
        let mut parameters = c.parameters.clone();
        parameters.extend(f.parameters.clone());
        parameters.insert(
            "SerialNumber".into(),
            f.serial.clone().unwrap_or_else(|| id.to_owned()),
        );
        if let Some(v) = &f.vendor {
            parameters.insert("Vendor".into(), v.clone());
        }
        if let Some(m) = &f.model {
            parameters.insert("Model".into(), m.clone());
        }
        parameters.insert("FoundBy".into(), f.found_by.clone());
        parameters.insert("ChildId".into(), id.to_owned());
        // Last: a device cannot name another parent.
        parameters.insert("ParentThing".into(), parent.to_owned());
        let common_name = c
            .common_name
            .replace("{id}", id)
            .replace("{serial}", f.serial.as_deref().unwrap_or(id));
        Ok(Spec {
            subject,
            api: CertificateApi::FromCsr,
            key_algorithm: c.key_algorithm,
            template,
            parameters,
            common_name,
        })
    }

    /// Records the outcome of an attempt on the job.
    fn settle_job(&self, id: &str, f: impl FnOnce(&mut Job)) {
        let mut q = self.queue();
        let Some(job) = q.jobs.get_mut(id) else {
            return;
        };
        f(job);
        let job = job.clone();
        drop(q);
        if let Err(error) = self.save(id, &job) {
            tracing::error!(child = %id, %error, "cannot save the child's provisioning job");
        }
    }

    async fn provision_one(&self, id: &str, job: &Job, parent: &str, pacer: &mut Pacer) {
        let spec = match self.spec(id, job, parent) {
            Ok(s) => s,
            Err(message) => {
                tracing::error!(child = %id, error = %message, "child cannot be provisioned");
                self.settle_job(id, |j| {
                    j.state = JobState::Failed;
                    j.last_error = Some(message);
                });
                return;
            }
        };
        let key = spec.subject.key();
        let paths = Paths::new(&self.config.daemon.state_dir, &spec.subject);
        let loaded = self.store.load_identity::<IdentityRecord>(&key);
        let mut rec = match loaded {
            Ok(r) => r.unwrap_or_default(),
            Err(error) => {
                tracing::error!(child = %id, %error, "child's identity record is unreadable");
                self.settle_job(id, |j| {
                    j.state = JobState::Failed;
                    j.last_error = Some(error.to_string());
                });
                return;
            }
        };
        // A create call cut short by a crash (or shutdown) is counted; see `record::recover`.
        if record::recover(&mut rec)
            && let Err(error) = self.store.save_identity(&key, &rec)
        {
            self.failed(
                id,
                format!("saving the identity record: {error}"),
                error.is_transient(),
            );
            return;
        }
        let fleet = self.cloud.fleet();
        let mut host = ChildHost {
            provisioner: self,
            id,
            pacer,
            timeout: Duration::from_secs(self.config.children.call_timeout_secs),
        };
        let mut driver = Driver {
            store: &self.store,
            fleet: &fleet,
            paths: &paths,
            spec: &spec,
            host: &mut host,
        };
        let mut result = driver.provision(&mut rec).await;
        if let Ok(Outcome::RegistrationLost) = result {
            // The gateway cannot connect as its child to learn whether the lost RegisterThing
            // completed: the documented rule, then once more with the same key (the template
            // names the same thing).
            result = match driver.settle_without_probe(&mut rec) {
                Ok(()) => driver.provision(&mut rec).await,
                Err(e) => Err(e),
            };
        }
        match result {
            Ok(Outcome::Registered) => self.finish(id, &key, &mut rec),
            Ok(Outcome::RegistrationLost) => {
                self.failed(id, "RegisterThing answer lost twice; retrying".into(), true)
            }
            Err(_) if self.state_of(id) == Some(JobState::Denied) => {
                tracing::info!(child = %id, "child denied while queued; not provisioned");
            }
            Err(e) => {
                let throttled = matches!(
                    &e,
                    IdentityError::Fleet(FleetError::Rejected { rejection, .. }) if rejection.status_code == 429
                        || rejection.error_code.contains("Throttling")
                );
                if throttled {
                    self.shared.throttled.fetch_add(1, Ordering::Relaxed);
                    // The cloud's bucket is emptier than ours: slow every child, not just this one.
                    let by = Duration::from_millis(self.config.children.retry_initial_ms);
                    if rec.stage == Stage::CertificateIssued {
                        pacer.register.push_back(by);
                    } else {
                        pacer.create.push_back(by);
                    }
                }
                let message = if matches!(e, IdentityError::Cancelled) {
                    "interrupted: the gateway's thing session went down; resuming once it is back"
                        .to_owned()
                } else {
                    e.to_string()
                };
                self.failed(id, message, e.is_transient());
            }
        }
    }

    fn failed(&self, id: &str, message: String, transient: bool) {
        let c = &self.config.children;
        let mut attempts = 0;
        self.settle_job(id, |j| {
            j.attempts += 1;
            attempts = j.attempts;
            j.last_error = Some(message.clone());
            if !transient {
                j.state = JobState::Failed;
            }
        });
        if transient {
            // Equal jitter: uniform in [cap/2, cap], cap doubling from retry_initial_ms.
            let cap = Duration::from_millis(c.retry_initial_ms)
                .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
                .min(Duration::from_secs(c.retry_max_secs));
            let wait = cap / 2 + cap.mul_f64(rand::random::<f64>() / 2.0);
            self.queue()
                .not_before
                .insert(id.to_owned(), Instant::now() + wait);
            tracing::warn!(child = %id, error = %message, attempts, retry_in_ms = wait.as_millis() as u64, "child provisioning failed; retrying");
        } else {
            tracing::error!(child = %id, error = %message, "child provisioning failed; fix the cause, then `gatewayctl children retry {id}`");
        }
    }

    /// Registered: pin the certificate for the local endpoint, mark the record and the job.
    /// Each step is idempotent, so a crash between them is finished on the next start.
    fn finish(&self, id: &str, key: &str, rec: &mut IdentityRecord) {
        let thing = rec.thing_name.clone().unwrap_or_default();
        if self.state_of(id) == Some(JobState::Denied) {
            tracing::warn!(child = %id, thing = %thing, "child was denied while its RegisterThing was in flight: the thing exists; delete it in AWS IoT");
            return;
        }
        let cert = rec.certificate_id.clone().unwrap_or_default();
        let pinned = self.registry.add(&AddChild {
            id: id.to_owned(),
            certificate_id: Some(cert.clone()),
            password: false,
        });
        if let Err(error) = pinned {
            tracing::error!(child = %id, thing = %thing, %error, "cannot pin the child's certificate");
            self.settle_job(id, |j| {
                j.state = JobState::Failed;
                j.last_error = Some(format!("pinning the certificate: {error}"));
            });
            return;
        }
        if record::activated(rec)
            && let Err(error) = self.store.save_identity(key, rec)
        {
            tracing::error!(child = %id, thing = %thing, %error, "cannot save the child's identity record");
        }
        self.settle_job(id, |j| {
            j.state = JobState::Provisioned;
            j.last_error = None;
        });
        self.queue().not_before.remove(id);
        tracing::info!(child = %id, thing = %thing, certificate_id = %cert, "child provisioned; certificate pinned for the local endpoint");
    }
}

/// A child as a driver host: calls go over the gateway's thing session, paced.
struct ChildHost<'a> {
    provisioner: &'a Provisioner,
    id: &'a str,
    pacer: &'a mut Pacer,
    timeout: Duration,
}

impl Host for ChildHost<'_> {
    async fn ready(&mut self, rec: &mut IdentityRecord) -> Result<(), IdentityError> {
        if rec.stage == Stage::CertificateIssued {
            self.pacer.register.take().await;
        } else {
            self.pacer.create.take().await;
        }
        // Checked after the wait: a deny or a lost gateway session during it counts.
        if self.provisioner.state_of(self.id) != Some(JobState::Queued)
            || self.provisioner.parent().is_none()
        {
            return Err(IdentityError::Cancelled);
        }
        Ok(())
    }

    fn call_timeout(&self, _: &IdentityRecord) -> Duration {
        self.timeout
    }

    fn activity(&self, what: &str) {
        tracing::debug!(child = %self.id, "{what}");
    }

    fn show(&self, _: &IdentityRecord) {}
}

fn answer(ok: bool, message: Option<String>, data: Option<serde_json::Value>) -> Response {
    Response {
        ok,
        status: None,
        message,
        data,
    }
}

impl ProvisionService for Provisioner {
    fn summary(&self) -> ChildrenSummary {
        let mut c = ChildrenSummary {
            throttled: self.shared.throttled.load(Ordering::Relaxed),
            ..Default::default()
        };
        for j in self.queue().jobs.values() {
            *match j.state {
                JobState::AwaitingApproval => &mut c.awaiting_approval,
                JobState::Queued => &mut c.queued,
                JobState::Provisioned => &mut c.provisioned,
                JobState::Denied => &mut c.denied,
                JobState::Failed => &mut c.failed,
            } += 1;
        }
        c
    }

    fn control(&self, req: &Request) -> Response {
        let done = |r: Result<(), ProvisionError>, m: String| match r {
            Ok(()) => answer(true, Some(m), None),
            Err(e) => answer(false, Some(e.to_string()), None),
        };
        match req {
            Request::ChildrenOffer(found) => match self.offer(found.clone()) {
                Ok(state) => answer(
                    true,
                    Some(format!("child `{}` {}", found.id, state.label())),
                    None,
                ),
                Err(e) => answer(false, Some(e.to_string()), None),
            },
            Request::ChildrenShow { id } => match self.show(id) {
                Ok(v) => answer(true, None, serde_json::to_value(v).ok()),
                Err(e) => answer(false, Some(e.to_string()), None),
            },
            Request::ChildrenApprove { id } => done(
                self.approve(id),
                format!("child `{id}` approved and queued"),
            ),
            Request::ChildrenDeny { id } => done(
                self.deny(id),
                format!("child `{id}` denied; it will not be provisioned"),
            ),
            Request::ChildrenRetry { id } => {
                done(self.retry(id), format!("child `{id}` queued again"))
            }
            Request::ChildrenQueue => answer(true, None, serde_json::to_value(self.list()).ok()),
            Request::ChildrenExportBulk => match self.export_bulk() {
                Ok(lines) => answer(
                    true,
                    Some(format!(
                        "{} children exported for bulk registration",
                        lines.len()
                    )),
                    Some(serde_json::Value::from(lines)),
                ),
                Err(e) => answer(false, Some(e.to_string()), None),
            },
            Request::ChildrenImportBulk { results } => match self.import_bulk(results) {
                Ok(r) => answer(true, Some(r.message()), serde_json::to_value(&r).ok()),
                Err(e) => answer(false, Some(e.to_string()), None),
            },
            _ => answer(false, Some("not a provisioner request".into()), None),
        }
    }
}

impl Provisioner {
    /// A device that provisioned itself through the gateway's local fleet-provisioning endpoint
    /// (its key stays on the device): recorded as a provisioned child with its thing and
    /// certificate, so the bridge maps its traffic and `children show` lists it. Never queued:
    /// the gateway has nothing to send for it.
    pub fn record_onboarded(
        &self,
        id: &str,
        thing: &str,
        certificate_id: &str,
    ) -> Result<(), ProvisionError> {
        let subject = Subject::child(id)?;
        let key = subject.key();
        let mut rec = self
            .store
            .load_identity::<IdentityRecord>(&key)?
            .unwrap_or_default();
        rec.thing_name = Some(thing.to_owned());
        rec.certificate_id = Some(certificate_id.to_owned());
        rec.stage = Stage::Active;
        self.store.save_identity(&key, &rec)?;
        let mut q = self.queue();
        let job = Job {
            found: FoundChild {
                id: id.to_owned(),
                found_by: "mqtt-fleet-provisioning".into(),
                ..Default::default()
            },
            state: JobState::Provisioned,
            seq: self.shared.seq.fetch_add(1, Ordering::SeqCst),
            offered_unix: unix_now(),
            attempts: 0,
            last_error: None,
        };
        self.save(id, &job)?;
        q.jobs.insert(id.to_owned(), job);
        Ok(())
    }
}

/// What `import-bulk-results` did.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BulkImport {
    /// Children whose certificate was installed and pinned.
    pub installed: Vec<String>,
    /// Result lines that are errors (the task failed them), with their text.
    pub failed_lines: Vec<String>,
    /// Certificates that certify no waiting child's key (another gateway's, or already used).
    pub unmatched_certificates: usize,
    /// Lines that are not JSON.
    pub unreadable_lines: usize,
}

impl BulkImport {
    fn message(&self) -> String {
        format!(
            "{} children installed and pinned; {} failed lines in the results; {} certificates matched no waiting child; {} unreadable lines",
            self.installed.len(),
            self.failed_lines.len(),
            self.unmatched_certificates,
            self.unreadable_lines
        )
    }
}

/// Every string in `v` (certificates, ARNs), depth first.
fn strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match v {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// The SubjectPublicKeyInfo (DER) of a PEM certificate.
fn certificate_spki(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.public_key().raw.to_vec())
}

/// Bulk path, for devices known in advance (AWS bulk registration, StartThingRegistrationTask,
/// with a control-plane template that takes a `CSR` parameter): `export_bulk` gives one line per
/// child awaiting approval: the RegisterThing parameters it would get (the same as the fleet
/// path's, `ParentThing` included) plus `CSR` for a key the gateway makes and keeps (0600).
/// `import_bulk` installs each certificate of the task's results for the child whose key it
/// certifies, matched by public key, so line order and the report's shape do not matter; the
/// certificate is pinned and the child provisioned. Nothing goes to the cloud from the gateway.
impl Provisioner {
    pub fn export_bulk(&self) -> Result<Vec<String>, ProvisionError> {
        let parent = self.board.identity().thing_name.ok_or_else(|| {
            ProvisionError::Bulk(
                "the gateway has no thing name yet: the children's ParentThing is unknown until it is provisioned".into(),
            )
        })?;
        let waiting: Vec<(String, Job)> = self
            .queue()
            .jobs
            .iter()
            .filter(|(_, j)| j.state == JobState::AwaitingApproval)
            .map(|(i, j)| (i.clone(), j.clone()))
            .collect();
        let mut lines = Vec::new();
        for (id, job) in waiting {
            let spec = self
                .spec(&id, &job, &parent)
                .map_err(ProvisionError::Bulk)?;
            let paths = Paths::new(&self.config.daemon.state_dir, &spec.subject);
            let bulk =
                |e: &dyn std::fmt::Display| ProvisionError::Bulk(format!("child `{id}`: {e}"));
            let key = match std::fs::read_to_string(&paths.key) {
                Ok(k) => k,
                Err(_) => {
                    let k =
                        crate::identity::generate_key(spec.key_algorithm).map_err(|e| bulk(&e))?;
                    crate::identity::write_file(&paths.key, k.as_bytes(), 0o600)
                        .map_err(|e| bulk(&e))?;
                    k
                }
            };
            let csr = crate::identity::make_csr(&key, spec.key_algorithm, &spec.common_name)
                .map_err(|e| bulk(&e))?;
            let mut line: serde_json::Map<String, serde_json::Value> = spec
                .parameters
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            line.insert("CSR".into(), serde_json::Value::String(csr));
            lines.push(serde_json::Value::Object(line).to_string());
        }
        Ok(lines)
    }

    pub fn import_bulk(&self, results: &str) -> Result<BulkImport, ProvisionError> {
        // The public key of every child still waiting that has a key on disk.
        let mut by_key: HashMap<Vec<u8>, String> = HashMap::new();
        let candidates: Vec<String> = self
            .queue()
            .jobs
            .iter()
            .filter(|(_, j)| j.state != JobState::Provisioned && j.state != JobState::Denied)
            .map(|(i, _)| i.clone())
            .collect();
        for id in candidates {
            let subject = Subject::child(&id)?;
            let paths = Paths::new(&self.config.daemon.state_dir, &subject);
            let Ok(pem) = std::fs::read_to_string(&paths.key) else {
                continue;
            };
            if let Ok(k) = rcgen::KeyPair::from_pem(&pem) {
                by_key.insert(rcgen::PublicKeyData::subject_public_key_info(&k), id);
            }
        }
        let mut r = BulkImport::default();
        for line in results.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                r.unreadable_lines += 1;
                continue;
            };
            let mut all = Vec::new();
            strings(&v, &mut all);
            let certs: Vec<&str> = all
                .iter()
                .copied()
                .filter(|s| s.starts_with("-----BEGIN CERTIFICATE-----"))
                .collect();
            if certs.is_empty() {
                r.failed_lines.push(line.chars().take(300).collect());
                continue;
            }
            let thing = all
                .iter()
                .find_map(|s| {
                    s.strip_prefix("arn:aws:iot:")
                        .and_then(|a| a.split_once(":thing/"))
                })
                .map(|(_, name)| name.to_owned());
            for pem in certs {
                let id = certificate_spki(pem).and_then(|k| by_key.remove(&k));
                let Some(id) = id else {
                    r.unmatched_certificates += 1;
                    continue;
                };
                self.install_bulk(&id, pem, thing.clone())?;
                r.installed.push(id);
            }
        }
        Ok(r)
    }

    fn install_bulk(
        &self,
        id: &str,
        pem: &str,
        thing: Option<String>,
    ) -> Result<(), ProvisionError> {
        let subject = Subject::child(id)?;
        let key = subject.key();
        let paths = Paths::new(&self.config.daemon.state_dir, &subject);
        let fail = |e: &dyn std::fmt::Display| ProvisionError::Bulk(format!("child `{id}`: {e}"));
        crate::identity::write_file(&paths.cert, pem.as_bytes(), 0o644).map_err(|e| fail(&e))?;
        let mut rec = self
            .store
            .load_identity::<IdentityRecord>(&key)?
            .unwrap_or_default();
        rec.certificate_id = crate::identity::certificate_id(pem.as_bytes());
        rec.key_algorithm = Some(self.config.children.key_algorithm);
        rec.thing_name = thing;
        rec.ownership_token = None;
        rec.token_expires_at = None;
        rec.pending = None;
        rec.stage = Stage::ThingRegistered;
        self.store.save_identity(&key, &rec)?;
        // Approved by the import itself: the operator registered it.
        self.settle_job(id, |j| {
            j.found.found_by = format!("{} (bulk)", j.found.found_by);
        });
        self.finish(id, &key, &mut rec);
        Ok(())
    }
}
