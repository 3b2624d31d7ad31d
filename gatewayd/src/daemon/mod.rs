//! Daemon: wiring and supervision. `run(config, shutdown)` is the whole daemon: it prepares the
//! state directory, opens the store, binds the status socket, starts the watchdog, the cloud
//! service and the identity engine, reports READY without waiting for the cloud, and drains on
//! shutdown. It owns no protocol logic of its own.

pub mod check;
pub mod config;
pub mod health;
pub mod logging;
pub mod notify;
mod proxy;
pub mod status;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::daemon::config::{Config, ProvisioningMode};
use crate::{bridge, children, cloud, identity, local, outbox, store, telemetry};

/// sysexits: command-line usage error.
pub const EX_USAGE: u8 = 64;

/// Parse the command line of a binary; `--help`/`--version` exit 0, a usage error exits 64.
pub fn parse_cli<C: clap::Parser>() -> Result<C, std::process::ExitCode> {
    C::try_parse().map_err(|e| {
        let code = if e.use_stderr() { EX_USAGE } else { 0 };
        let _ = e.print();
        std::process::ExitCode::from(code)
    })
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("state directory {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another gatewayd{} uses {}; stop it first (`systemctl stop gatewayd`) or give this one \
         its own daemon.state_dir",
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        .path.display()
    )]
    AlreadyRunning {
        path: std::path::PathBuf,
        pid: Option<u32>,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Status(#[from] status::StatusError),
    #[error("configuration: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Config(Vec<config::ConfigError>),
    #[error(transparent)]
    Local(#[from] local::LocalError),
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
    #[error("critical task `{0}` stopped unexpectedly")]
    TaskDied(&'static str),
}

impl DaemonError {
    pub fn is_transient(&self) -> bool {
        match self {
            DaemonError::Store(e) => e.is_transient(),
            DaemonError::TaskDied(_) => true,
            DaemonError::Local(e) => e.is_transient(),
            DaemonError::Outbox(e) => e.is_transient(),
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
    let loose = prepare_state_dir(state_dir).map_err(|source| DaemonError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    if let Some(mode) = loose {
        tracing::warn!(
            path = %state_dir.display(),
            mode = format!("{mode:o}"),
            "state directory was accessible to other users; its mode is now 0700"
        );
    }
    let _lock = lock_state_dir(state_dir)?;
    let store = store::Store::open(state_dir)?;
    // What `check-config` checks, as this process reads it; the claim and serial only while the
    // gateway still needs them (an operator may remove the claim once the thing is registered).
    let registered = store
        .load_identity::<identity::IdentityRecord>(identity::GATEWAY)
        .ok()
        .flatten()
        .is_some_and(|r| r.stage >= identity::Stage::ThingRegistered);
    let scope = if registered {
        check::Scope::Provisioned
    } else {
        check::Scope::All
    };
    let problems = check::check(&config, &check::Reader::current(), scope);
    if !problems.is_empty() {
        return Err(DaemonError::Config(problems));
    }
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

    let watchdog = notify::watchdog_interval();
    let health = health::Health::new(watchdog);
    if let Some(interval) = watchdog {
        let n = notifier.clone();
        let c = cancel.clone();
        let h = health.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            let mut was_stale = false;
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tick.tick() => {}
                }
                // WATCHDOG=1 only when the engine and every uplink driver beat recently: a
                // wedged task lets systemd restart us even though this timer still runs.
                let stale = h.stale_tasks(interval);
                if stale.is_empty() {
                    n.notify("WATCHDOG=1\n");
                    if was_stale {
                        tracing::info!("all critical tasks beat again; watchdog pings resumed");
                    }
                    was_stale = false;
                } else if !was_stale {
                    was_stale = true;
                    tracing::warn!(
                        tasks = stale.join(", "),
                        "critical task(s) missed their heartbeat; withholding WATCHDOG=1"
                    );
                }
            }
        });
    }

    let cloud = cloud::Cloud::new(
        Arc::new(cloud::ConnectPacer::persistent(
            state_dir.join("connects.json"),
        )),
        board.clone(),
        health.clone(),
        &cancel,
    );
    let engine = identity::Engine {
        config: config.clone(),
        store: store.clone(),
        board: board.clone(),
        cloud: cloud.clone(),
        notifier: notifier.clone(),
        cancel: cancel.clone(),
        claims: claim_rx,
        fresh_claim: None,
    };
    // The local endpoint: devices are served whether or not the cloud is there.
    let outbox = outbox::Outbox::open(
        state_dir.join("outbox"),
        outbox::OutboxOptions {
            max_bytes: config.local.outbox_max_bytes,
            overflow: config.local.outbox_overflow,
            ..Default::default()
        },
    )
    .await?;
    let registry = children::Registry::open(store.clone())?;
    // Children become things of their own over the gateway's thing session, once it is up.
    let provisioner = children::provision::Provisioner::open(
        config.clone(),
        store.clone(),
        registry.clone(),
        cloud.clone(),
        board.clone(),
    )?;
    board.set_provisioner(Arc::new(provisioner.clone()));
    tracker.spawn(provisioner.clone().run(cancel.clone()));
    // The identity engine starts once the children's services are on the status board: the
    // gateway is never seen active while `gatewayctl children ...` still says "not running".
    let beat = health.register("identity engine");
    let mut engine_task =
        tracker.spawn(async move { health::run_beating(&beat, engine.run()).await });
    // Discovery offers what the device plugins find to the provisioning queue, and remembers
    // which device each child is.
    let bindings = telemetry::Bindings::open(store.clone())?;
    let mut modbus = None;
    if let Some(m) = &config.modbus {
        match gatewayd_modbus::ModbusPlugin::new(m.clone()) {
            Ok(plugin) => {
                let plugin = Arc::new(plugin);
                // Polling after a restart uses the profile each device matched, without a scan.
                for (child, b) in bindings.all() {
                    if let Some(profile) = b.profile.as_deref().filter(|_| b.plugin == "modbus")
                        && !plugin.remember(&b.device, profile)
                    {
                        tracing::warn!(child = %child, device = %b.device, profile,
                            "this child's profile is no longer configured; it is polled once a scan finds it again");
                    }
                }
                tracker.spawn(crate::discovery::run(
                    plugin.clone(),
                    provisioner.clone(),
                    bindings.clone(),
                    Duration::from_secs(config.discovery.modbus_interval_secs),
                    cancel.clone(),
                ));
                modbus = Some(plugin);
            }
            // `check-config` validated it; a failure here is named, and the rest runs.
            Err(error) => tracing::error!(%error, "[modbus]: Modbus discovery is off"),
        }
    }
    // The upstream bridge drains the outbox over the gateway's thing session.
    match config.bridge.mapper() {
        Ok(mapper) => {
            let b = bridge::Bridge::new(
                cloud.clone(),
                outbox.clone(),
                mapper,
                Arc::new(bridge::Directory {
                    provisioner: provisioner.clone(),
                    bindings: bindings.clone(),
                }),
                board.clone(),
                config.bridge.window,
                Duration::from_secs(config.bridge.ack_timeout_secs),
            );
            board.set_bridge(Arc::new(b.handle()));
            tracker.spawn(b.run(cancel.clone()));
        }
        // Validated at load; named here should it ever fail.
        Err((i, error)) => tracing::error!(rule = i, %error, "[bridge]: the bridge is off"),
    }
    // Cloud commands for children, kept on disk until delivered (the bridge's downstream half).
    let downlink = bridge::downlink::Downlink::open(
        store.clone(),
        Duration::from_secs(config.bridge.command_expiry_secs),
        bridge::downlink::system_clock(),
    )?;
    board.set_downlink(Arc::new(downlink.clone()));
    let endpoint = local::Endpoint::start(
        &config.local,
        state_dir,
        registry,
        outbox.clone(),
        &cancel,
        &tracker,
    )
    .await?;
    endpoint.set_downlink(downlink.clone());
    tracker.spawn(bridge::downlink::expire(
        downlink.clone(),
        outbox.clone(),
        cancel.clone(),
    ));
    match config.bridge.command_mapper() {
        Ok(_) if config.bridge.commands.is_empty() => {}
        Ok(mapper) => {
            tracker.spawn(bridge::downlink::intake(
                cloud.clone(),
                mapper,
                downlink.clone(),
                Arc::new(provisioner.clone()),
                board.clone(),
                cancel.clone(),
            ));
        }
        // Validated at load; named here should it ever fail.
        Err((i, error)) => {
            tracing::error!(rule = i, %error, "[bridge]: commands from the cloud are off")
        }
    }
    // Modbus children's telemetry and commands, through the gateway's own router link.
    if let Some(plugin) = modbus {
        let service = telemetry::Service::new(
            plugin,
            bindings.clone(),
            provisioner.clone(),
            outbox.clone(),
            telemetry::PollConfig::from_config(&config.discovery),
        );
        let ep = endpoint.clone();
        match tokio::task::spawn_blocking(move || ep.internal_link("modbus")).await {
            Ok(Ok(link)) => {
                service.spawn(link, &cancel, &tracker);
                // Cloud commands for Modbus children go to the same write path.
                tracker.spawn(bridge::downlink::execute(
                    downlink.clone(),
                    service.clone(),
                    outbox.clone(),
                    cancel.clone(),
                ));
                board.add_plugin(service);
            }
            Ok(Err(error)) => {
                tracing::error!(%error, "no local router link; Modbus telemetry and commands are off")
            }
            Err(error) => {
                tracing::error!(%error, "no local router link; Modbus telemetry and commands are off")
            }
        }
    }
    board.set_local_service(Arc::new(endpoint.clone()));
    // A device that registered itself through the local fleet-provisioning endpoint is a
    // provisioned child: the bridge maps its traffic to its thing.
    {
        let provisioner = provisioner.clone();
        endpoint.set_onboarded_hook(Arc::new(move |id: &str, thing: &str, cert: &str| {
            let (p, id, thing, cert) = (provisioner.clone(), id.to_owned(), thing.to_owned(), cert.to_owned());
            tokio::task::spawn_blocking(move || {
                if let Err(error) = p.record_onboarded(&id, &thing, &cert) {
                    tracing::warn!(child = %id, %thing, %error, "onboarded device not recorded as a provisioned child");
                }
            });
        }));
    }
    // A constrained device that announced itself (and got a local password) is offered for
    // provisioning: the gateway makes and keeps its key.
    {
        let provisioner = provisioner.clone();
        endpoint.set_announce_hook(Arc::new(move |a: local::Announced| {
            let p = provisioner.clone();
            let found = children::provision::FoundChild {
                id: a.id.clone(),
                serial: a.serial,
                vendor: a.vendor,
                model: a.model,
                found_by: "mqtt".into(),
                ..Default::default()
            };
            tokio::task::spawn_blocking(move || {
                if let Err(error) = p.offer(found) {
                    tracing::warn!(child = %a.id, %error, "announced device not offered for provisioning");
                }
            });
        }));
    }
    if !config.local.onboarding_templates.is_empty() {
        endpoint.set_fleet_proxy(Arc::new(proxy::CloudProxy {
            cloud: cloud.clone(),
            fleet: cloud::fleet::FleetClient::new(cloud.clone()),
            timeout: config.provisioning.call_timeout(),
            thing_name: {
                let board = board.clone();
                Box::new(move || board.snapshot().identity.thing_name)
            },
        }));
    }
    // `%g` in the local topic rules is the gateway's thing name, known once it is registered.
    {
        let board = board.clone();
        let c = cancel.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut known = None;
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let name = board.snapshot().identity.thing_name;
                if name != known {
                    endpoint.set_gateway_name(name.clone());
                    known = name;
                }
            }
        });
    }

    // SIGHUP: try a failed step again now. The configuration is not reloaded (restart for that);
    // without a handler SIGHUP would end the daemon without a word.
    {
        let board = board.clone();
        let c = cancel.clone();
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hup) => {
                tracker.spawn(async move {
                    loop {
                        tokio::select! {
                            _ = c.cancelled() => break,
                            r = hup.recv() => if r.is_none() { break },
                        }
                        match board.request_retry() {
                            Ok(m) => tracing::info!("SIGHUP: {m}; the configuration is not reloaded (restart gatewayd to apply changes)"),
                            Err(m) => tracing::info!("SIGHUP: {m}; the configuration is not reloaded (restart gatewayd to apply changes)"),
                        }
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "cannot handle SIGHUP"),
        }
    }

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

/// Takes the state directory for this process: an exclusive lock on `gatewayd.pid` inside it,
/// holding our pid, released when the returned file is dropped (or the process dies). A second
/// daemon on the same directory learns who holds it instead of a database's lock error.
pub fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, DaemonError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("gatewayd.pid");
    let io = |source| DaemonError::StateDir {
        path: path.clone(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            return Err(DaemonError::AlreadyRunning {
                path: dir.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    f.set_len(0).map_err(io)?;
    f.rewind().map_err(io)?;
    writeln!(f, "{}", std::process::id()).map_err(io)?;
    Ok(f)
}

/// Creates the state directory mode 0700 (keys, certificates and the database live there). An
/// existing directory open to group or others is tightened to 0700; its old mode is returned so
/// the caller can warn.
pub fn prepare_state_dir(path: &std::path::Path) -> std::io::Result<Option<u32>> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    Ok(Some(mode))
}

/// SIGTERM (systemd stop) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers, Ctrl-C is all we can wait for.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &std::path::Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_second_daemon_on_one_state_dir_is_told_who_holds_it() {
        let d = tempfile::tempdir().unwrap();
        let held = lock_state_dir(d.path()).unwrap();
        let e = lock_state_dir(d.path()).unwrap_err().to_string();
        let me = std::process::id();
        assert!(
            e.contains(&format!("another gatewayd (pid {me}) uses")),
            "{e}"
        );
        assert!(e.contains("systemctl stop gatewayd"), "{e}");
        drop(held);
        // Released with its holder (a killed daemon's lock goes with it).
        let again = lock_state_dir(d.path()).unwrap();
        drop(again);
    }

    #[test]
    fn state_dir_is_created_private_and_loose_modes_are_tightened() {
        let d = tempfile::tempdir().unwrap();
        let fresh = d.path().join("var/lib/gatewayd");
        assert_eq!(prepare_state_dir(&fresh).unwrap(), None);
        assert_eq!(mode(&fresh), 0o700);
        // Idempotent on a private directory.
        assert_eq!(prepare_state_dir(&fresh).unwrap(), None);

        let old = d.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(prepare_state_dir(&old).unwrap(), Some(0o755));
        assert_eq!(mode(&old), 0o700);
    }
}
