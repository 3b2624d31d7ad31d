//! gatewayd: an edge gateway daemon that provisions itself in AWS IoT Core by claim and keeps a
//! resilient, quota-aware cloud connection.
//!
//! `run(config, shutdown)` is the whole daemon; the binaries only parse arguments, set up logging
//! and map results to exit codes. Modules, one per subsystem:
//! `config` (TOML schema), `store` (sled), `identity` (persisted provisioning state machine),
//! `fleet` (fleet-provisioning call helper), `uplink` (rumqttc connection, backoff, limiter),
//! `notify` (sd_notify), `status` (status board and socket), `logging` (journald/stderr).

pub mod config;
pub mod fleet;
pub mod identity;
pub mod logging;
pub mod notify;
pub mod status;
pub mod store;
pub mod uplink;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ProvisioningMode};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("state directory {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Status(#[from] status::StatusError),
    #[error("critical task `{0}` stopped unexpectedly")]
    TaskDied(&'static str),
}

impl DaemonError {
    pub fn is_transient(&self) -> bool {
        match self {
            DaemonError::Store(e) => e.is_transient(),
            DaemonError::TaskDied(_) => true,
            _ => false,
        }
    }
}

/// Runs the daemon until `shutdown` resolves (or a critical task dies), then drains within
/// `daemon.shutdown_grace_secs`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let started = Instant::now();
    let config = Arc::new(config);
    let notifier = notify::Notifier::from_env();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();

    let state_dir = &config.daemon.state_dir;
    std::fs::create_dir_all(state_dir).map_err(|source| DaemonError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    let store = store::Store::open(state_dir)?;
    let board = status::Board::new();
    let listener = status::bind(&config.daemon.status_socket)?;
    let (claim_tx, claim_rx) = if config.provisioning.mode == ProvisioningMode::TrustedUser {
        let (tx, rx) = mpsc::channel(1);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    tracker.spawn(status::serve(
        listener,
        board.clone(),
        claim_tx,
        cancel.clone(),
        tracker.clone(),
    ));

    if let Some(interval) = notify::watchdog_interval() {
        let n = notifier.clone();
        let c = cancel.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tick.tick() => n.notify("WATCHDOG=1\n"),
                }
            }
        });
    }

    let engine = identity::Engine {
        config: config.clone(),
        store: store.clone(),
        board: board.clone(),
        pacer: Arc::new(uplink::ConnectPacer::default()),
        notifier: notifier.clone(),
        cancel: cancel.clone(),
        claims: claim_rx,
        fresh_claim: None,
    };
    let mut engine_task = tracker.spawn(engine.run());

    // Local services are up: READY does not wait for the cloud.
    notifier.notify("READY=1\nSTATUS=running; connecting to the cloud\n");
    tracing::info!(
        startup_ms = started.elapsed().as_millis() as u64,
        status_socket = %config.daemon.status_socket.display(),
        endpoint = %config.cloud.endpoint,
        "gatewayd {} ready",
        env!("CARGO_PKG_VERSION")
    );

    let mut result = Ok(());
    tokio::select! {
        _ = shutdown => tracing::info!("shutdown requested; draining"),
        r = &mut engine_task => {
            if !cancel.is_cancelled() {
                tracing::error!(panicked = r.is_err(), "identity engine stopped unexpectedly; exiting so systemd restarts gatewayd");
                result = Err(DaemonError::TaskDied("identity"));
            }
        }
    }
    notifier.notify("STOPPING=1\nSTATUS=stopping\n");
    cancel.cancel();
    tracker.close();
    let grace = Duration::from_secs(config.daemon.shutdown_grace_secs);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "drain timed out; exiting anyway"
        );
    }
    if let Err(error) = store.flush() {
        tracing::error!(%error, "final flush of the state database failed");
    }
    let _ = std::fs::remove_file(&config.daemon.status_socket);
    tracing::info!("stopped");
    result
}
