//! `gatewayd demo`: the whole flow on one machine, without an AWS account. In this process:
//! iotcore-sim as the cloud (`cloud`), simulated Modbus TCP meters (`meter`) and MQTT devices
//! (`devices`), a cloud application subscribed to what the gateway bridges, and the gateway
//! itself: the same [`crate::daemon::run`] the service runs, with a generated configuration
//! pointing at the emulator. A status view (`view`) redraws every second from the gateway's
//! status socket (what `gatewayctl status --json` reads) and what the application received.
//!
//! Owns: the demo directory (a temporary one unless `--dir`), the order things start and stop
//! in. It adds nothing to the daemon: the gateway provisions itself by claim, scans for the
//! meters, lets the devices onboard, provisions each child, and bridges their telemetry as it
//! would in a plant.

mod cloud;
mod devices;
mod meter;
mod view;

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use tokio_util::sync::CancellationToken;

use crate::daemon::{self, config, status};

/// What `gatewayd demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Keep everything here (and reuse it on the next run); `None`: a temporary directory,
    /// removed at exit.
    pub dir: Option<PathBuf>,
    pub modbus: usize,
    pub mqtt: usize,
    /// Redraw the view in place (a terminal) or append plain lines.
    pub tty: bool,
}

/// Upper bound for `--modbus` and `--mqtt`: a demo, not a load test.
pub const MAX_DEVICES: usize = 20;

/// The gateway's serial number: its thing is `gw-demo1`, its children `gw-demo1-<serial>`.
const SERIAL: &str = "demo1";
const ONBOARDING_USER: &str = "onboarding";

/// The demo's directory: a temporary one removed when dropped, or the one given.
enum Workspace {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Workspace {
    fn path(&self) -> &Path {
        match self {
            Workspace::Temp(t) => t.path(),
            Workspace::Kept(p) => p,
        }
    }
}

/// Runs the demo until `stop` resolves (Ctrl-C, SIGTERM, `--seconds`), prints the view to
/// `out` while it runs and a summary at the end; every part is stopped before this returns.
pub async fn run(
    opts: DemoOptions,
    stop: impl Future<Output = ()>,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let started = Instant::now();
    let ws = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            Workspace::Kept(d.canonicalize()?)
        }
        None => Workspace::Temp(
            tempfile::Builder::new()
                .prefix("gatewayd-demo-")
                .tempdir()
                .context("creating a temporary directory")?,
        ),
    };
    let dir = ws.path().to_path_buf();
    let log = dir.join("demo.log");
    init_logging(&log)?;
    let result = run_in(&opts, &dir, started, stop, out).await;
    if let Err(e) = &result {
        // The log goes with a temporary directory: show its end first.
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        eprintln!("gatewayd demo failed: {e:#}\nlast log lines:");
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
    }
    drop(ws);
    result
}

/// The daemon's and the emulator's logs go to `demo.log` in the demo directory, not over the
/// view.
fn init_logging(path: &Path) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let filter = EnvFilter::try_from_env("GATEWAYD_DEMO_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,rustls=warn,rumqttc=warn,rumqttd=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .try_init();
    Ok(())
}

/// The parts the demo started, for the view and the summary.
pub(crate) struct Parts {
    pub dir: PathBuf,
    pub started: Instant,
    pub cloud_addr: std::net::SocketAddr,
    pub meters: Vec<Arc<meter::Meter>>,
    pub devices: Vec<Arc<devices::Device>>,
    pub inbox: cloud::SharedInbox,
    pub socket: PathBuf,
}

async fn run_in(
    opts: &DemoOptions,
    dir: &Path,
    started: Instant,
    stop: impl Future<Output = ()>,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    // The cloud: the emulator, set up from the README, and an application listening on `gw/#`.
    let cloud_stop = CancellationToken::new();
    // An early return stops what was started so far.
    let _cloud_guard = cloud_stop.clone().drop_guard();
    let emu = cloud::start(&dir.join("cloud"), cloud_stop.clone()).await?;
    let inbox = cloud::SharedInbox::default();
    let app = cloud::application(&emu, inbox.clone(), cloud_stop.clone())?;

    // The plant: meters on free loopback ports.
    let meter_stop = CancellationToken::new();
    let _meter_guard = meter_stop.clone().drop_guard();
    let mut meters = Vec::new();
    let mut ports = Vec::new();
    let mut meter_tasks = Vec::new();
    for i in 0..opts.modbus {
        let m = Arc::new(meter::Meter::new(i));
        let (addr, task) = meter::serve(m.clone(), meter_stop.clone()).await?;
        ports.push(addr.port());
        meter_tasks.push(task);
        meters.push(m);
    }

    // The gateway, configured for all of this.
    let gw = dir.join("gateway");
    std::fs::create_dir_all(&gw)?;
    let onboarding_password = onboarding_password(&gw.join("onboarding.password"))?;
    let socket = gw.join("status.sock");
    let config_path = gw.join("gatewayd.toml");
    std::fs::write(&config_path, gateway_config(&emu, &gw, &socket, &ports))?;
    let cfg = config::load(&config_path).map_err(|e| anyhow!("demo configuration: {e}"))?;

    let parts = Parts {
        dir: dir.to_path_buf(),
        started,
        cloud_addr: emu.addr,
        meters,
        devices: (0..opts.mqtt)
            .map(|i| Arc::new(devices::Device::new(i)))
            .collect(),
        inbox,
        socket,
    };

    let gw_stop = CancellationToken::new();
    let gw_done = CancellationToken::new();
    let daemon = {
        let (stop, done) = (gw_stop.clone(), gw_done.clone());
        async move {
            let r = daemon::run(cfg, stop.cancelled_owned()).await;
            done.cancel();
            r
        }
    };
    let driver = drive(
        opts,
        &parts,
        onboarding_password,
        stop,
        gw_stop,
        gw_done,
        out,
    );
    let (gateway, last) = tokio::join!(daemon, driver);

    // The gateway has drained; now the cloud and the plant.
    cloud_stop.cancel();
    let _ = app.await;
    let emulator = emu.stopped().await;
    meter_stop.cancel();
    for t in meter_tasks {
        let _ = t.await;
    }
    let (last, timeline) = last?;
    gateway.context("the gateway failed")?;
    emulator.context("the emulator failed")?;
    match view::summary(&parts, &last, &timeline, out) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Starts the devices once the gateway's local endpoint is up, redraws the view every second
/// until `stop` (or the gateway ends), then stops the devices and the gateway. Returns the last
/// frame seen while the gateway ran and the timeline of what happened.
async fn drive(
    opts: &DemoOptions,
    parts: &Parts,
    onboarding_password: String,
    stop: impl Future<Output = ()>,
    gw_stop: CancellationToken,
    gw_done: CancellationToken,
    out: &mut (dyn Write + Send),
) -> Result<(view::Frame, view::Timeline)> {
    // Whatever ends this function (a closed stdout too) stops the devices and the gateway.
    let _gw_guard = gw_stop.clone().drop_guard();
    let devices_stop = CancellationToken::new();
    let _devices_guard = devices_stop.clone().drop_guard();
    let mut device_tasks = Vec::new();
    // Looked at four times a second so the timeline's times are close; drawn once a second.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut drawn = None;
    let mut timeline = view::Timeline::default();
    let mut last = view::Frame::default();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = gw_done.cancelled() => break,
            _ = tick.tick() => {}
        }
        let frame = view::Frame::fetch(parts).await;
        if device_tasks.is_empty() && !parts.devices.is_empty() {
            // The devices need the local TLS port and the gateway's local CA.
            if let Some(ep) =
                local_endpoint(&frame, &parts.socket, &onboarding_password, &parts.dir).await
            {
                for d in &parts.devices {
                    device_tasks.push(tokio::spawn(
                        d.clone().run(ep.clone(), devices_stop.clone()),
                    ));
                }
            }
        }
        timeline.note(&frame);
        let second = frame.elapsed.as_secs();
        if drawn != Some(second) {
            drawn = Some(second);
            match view::draw(parts, &frame, &timeline, opts.tty, out) {
                Ok(()) => {}
                // Whoever read the view is gone (`gatewayd demo | head`): stop as on Ctrl-C.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
                Err(e) => return Err(e.into()),
            }
        }
        last = frame;
    }
    devices_stop.cancel();
    for t in device_tasks {
        let _ = t.await;
    }
    // What the gateway says once the devices are gone, before it stops.
    if !gw_done.is_cancelled() {
        let frame = view::Frame::fetch(parts).await;
        if frame.snapshot.is_some() {
            last = frame;
        }
    }
    gw_stop.cancel();
    timeline.note(&last);
    Ok((last, timeline))
}

async fn local_endpoint(
    frame: &view::Frame,
    socket: &Path,
    onboarding_password: &str,
    dir: &Path,
) -> Option<devices::Endpoint> {
    let port = frame
        .snapshot
        .as_ref()?
        .local
        .as_ref()?
        .listeners
        .iter()
        .find_map(|l| l.strip_prefix("mqtts://"))?
        .rsplit(':')
        .next()?
        .parse()
        .ok()?;
    let s = socket.to_path_buf();
    let ca = tokio::task::spawn_blocking(move || status::request(&s, &status::Request::LocalCa))
        .await
        .ok()?
        .ok()?
        .message?;
    let tls = match cloud::tls(ca.as_bytes(), None) {
        Ok(t) => t,
        Err(error) => {
            tracing::warn!(%error, "demo: the gateway's local CA is not usable");
            return None;
        }
    };
    Some(devices::Endpoint {
        port,
        tls,
        onboarding_user: ONBOARDING_USER.to_owned(),
        onboarding_password: onboarding_password.to_owned(),
        keep: dir.join("devices"),
    })
}

/// The onboarding password the devices share (made once, kept 0600).
fn onboarding_password(path: &Path) -> Result<String> {
    if let Ok(p) = std::fs::read_to_string(path) {
        return Ok(p.trim().to_owned());
    }
    use rand::Rng;
    use std::os::unix::fs::OpenOptionsExt;
    let pw: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{pw}")?;
    Ok(pw)
}

/// The gateway's configuration: the emulator as its cloud with the README's templates, a claim,
/// the local endpoint on a free loopback port with an onboarding credential, automatic
/// admission of children, and a Modbus scan of the meters' ports with the meters' profile.
fn gateway_config(emu: &cloud::Emulator, gw: &Path, socket: &Path, ports: &[u16]) -> String {
    let modbus = if ports.is_empty() {
        String::new()
    } else {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        format!(
            r#"
[modbus]
request_timeout_ms = 500
unit_ids = ["{unit}"]

[[modbus.tcp]]
hosts = ["127.0.0.1"]
ports = [{ports}]
{profile}"#,
            unit = meter::UNIT,
            ports = ports.join(", "),
            profile = meter::PROFILE,
        )
    };
    format!(
        r#"# Written by `gatewayd demo`: a gateway whose "AWS IoT" is the emulator in the same process.
[cloud]
endpoint = "localhost"
port = {port}
root_ca = "{ca}"

[provisioning]
template = "{gateway_template}"
claim_cert = "{claim_cert}"
claim_key = "{claim_key}"
expected_thing_name = "gw-{{serial}}"
call_timeout_secs = 10

[provisioning.serial]
value = "{serial}"

[daemon]
state_dir = "{state}"
status_socket = "{socket}"
shutdown_grace_secs = 5

[uplink]
backoff_initial_ms = 500
backoff_max_secs = 4

[local]
tls_listen = ["127.0.0.1:0"]
onboarding_username = "{onboarding_user}"
onboarding_password_file = "{onboarding}"

[children]
template = "{child_template}"
admission = "auto"
retry_initial_ms = 500
retry_max_secs = 5

[discovery]
poll_interval_ms = 1000
report = "always"
{modbus}"#,
        port = emu.addr.port(),
        ca = emu.root_ca.display(),
        gateway_template = cloud::GATEWAY_TEMPLATE,
        claim_cert = emu.claim_cert.display(),
        claim_key = emu.claim_key.display(),
        serial = SERIAL,
        state = gw.join("state").display(),
        socket = socket.display(),
        onboarding_user = ONBOARDING_USER,
        onboarding = gw.join("onboarding.password").display(),
        child_template = cloud::CHILD_TEMPLATE,
    )
}
