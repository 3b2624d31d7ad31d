//! The demo's live status view and its summary: the gateway's own status (the snapshot and
//! children queue `gatewayctl status --json` and `gatewayctl children queue --json` read from the
//! status socket) beside what the cloud application received per child thing.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Map, Value};

use super::Parts;
use super::cloud::Received;
use crate::children::provision::ChildProvisioning;
use crate::daemon::status::{self, Request, Snapshot};

/// One look at everything.
#[derive(Debug, Default, Clone)]
pub struct Frame {
    pub started: Option<std::time::Instant>,
    pub elapsed: Duration,
    pub snapshot: Option<Snapshot>,
    pub children: Vec<ChildProvisioning>,
    pub received: BTreeMap<String, Received>,
    pub first_in_cloud: Option<Duration>,
    pub app_connected: bool,
}

impl Frame {
    pub async fn fetch(parts: &Parts) -> Frame {
        let socket = parts.socket.clone();
        let (snapshot, children) = tokio::task::spawn_blocking(move || {
            let snapshot = status::request(&socket, &Request::Status)
                .ok()
                .and_then(|r| r.status);
            let children = status::request(&socket, &Request::ChildrenQueue)
                .ok()
                .and_then(|r| r.data)
                .and_then(|d| serde_json::from_value(d).ok())
                .unwrap_or_default();
            (snapshot, children)
        })
        .await
        .unwrap_or_default();
        let inbox = parts.inbox.lock().unwrap_or_else(|p| p.into_inner());
        Frame {
            started: Some(parts.started),
            elapsed: parts.started.elapsed(),
            snapshot,
            children,
            received: inbox.things.clone(),
            first_in_cloud: inbox.first_at.map(|t| t.duration_since(parts.started)),
            app_connected: inbox.connected,
        }
    }
}

/// What happened when, as first seen: the gateway's own provisioning, each child found and
/// provisioned, each child thing's first message in the cloud.
#[derive(Debug, Default, Clone)]
pub struct Timeline {
    events: Vec<(Duration, String)>,
    seen: std::collections::BTreeSet<String>,
}

impl Timeline {
    fn add(&mut self, key: String, at: Duration, what: String) {
        if self.seen.insert(key) {
            self.events.push((at, what));
            self.events.sort_by_key(|(t, _)| *t);
        }
    }

    /// Records what `f` shows for the first time.
    pub fn note(&mut self, f: &Frame) {
        let at = f.elapsed;
        if let Some(s) = &f.snapshot
            && let Some(t) = s.identity.thing_name.as_deref()
            && s.identity.stage == "active"
        {
            self.add(
                "gateway".into(),
                at,
                format!("the gateway provisioned itself by claim: thing {t}"),
            );
        }
        for c in &f.children {
            self.add(
                format!("found {}", c.id),
                at,
                format!(
                    "{} found by {} ({} {}), offered for provisioning",
                    c.id,
                    c.found.found_by,
                    c.found.vendor.as_deref().unwrap_or("?"),
                    c.found.model.as_deref().unwrap_or("?")
                ),
            );
            if let Some(t) = c.thing_name.as_deref().filter(|_| c.state == "provisioned") {
                self.add(
                    format!("provisioned {}", c.id),
                    at,
                    format!("{} provisioned as thing {t}", c.id),
                );
                if let Some(d) = f
                    .received
                    .get(t)
                    .and_then(|r| r.first)
                    .and_then(|first| first.checked_duration_since(f.started?))
                {
                    self.add(
                        format!("cloud {t}"),
                        d,
                        format!("first telemetry of {t} in the cloud"),
                    );
                }
            }
        }
    }

    pub fn events(&self) -> &[(Duration, String)] {
        &self.events
    }
}

/// The decoded values of a message: a Modbus telemetry document's `values` (each point's
/// `value`), or the fields of a device's JSON reading.
pub fn values(v: &Value) -> Map<String, Value> {
    match v.get("values").and_then(Value::as_object) {
        Some(points) => points
            .iter()
            .map(|(k, p)| (k.clone(), p.get("value").cloned().unwrap_or(Value::Null)))
            .collect(),
        None => v.as_object().cloned().unwrap_or_default(),
    }
}

/// `voltage=230.1 V current=5.02 A …` for the view.
fn brief(v: &Value) -> String {
    let units = v.get("values").and_then(Value::as_object);
    let mut s = String::new();
    for (k, x) in values(v) {
        let unit = units
            .and_then(|u| u.get(&k))
            .and_then(|p| p.get("unit"))
            .and_then(Value::as_str)
            .map(|u| format!(" {u}"))
            .unwrap_or_default();
        let x = match x.as_f64() {
            Some(f) if x.is_f64() => format!("{f:.2}"),
            _ => x.to_string(),
        };
        s += &format!("{k}={x}{unit}  ");
    }
    s.trim_end().to_owned()
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

impl Frame {
    /// Commands the cloud application sent, and answers that came back, over all things.
    fn commands(&self) -> (u64, u64) {
        self.received
            .values()
            .fold((0, 0), |(s, a), r| (s + r.commands, a + r.answered))
    }
}

/// The lines of one frame.
pub fn render(parts: &Parts, f: &Frame) -> Vec<String> {
    let mut lines = vec![format!(
        "gatewayd demo, {} s: Ctrl-C stops it (files and log: {})",
        f.elapsed.as_secs(),
        parts.dir.display()
    )];
    let total: u64 = f.received.values().map(|r| r.count).sum();
    let (sent, answered) = f.commands();
    lines.push(format!(
        "cloud     iotcore-sim in process on localhost:{}; application {}, {total} messages received{}; {sent} commands sent, {answered} answered",
        parts.cloud_addr.port(),
        if f.app_connected { "subscribed to gw/#" } else { "connecting" },
        f.first_in_cloud
            .map(|d| format!(" (first after {})", secs(d)))
            .unwrap_or_default()
    ));
    let Some(s) = &f.snapshot else {
        lines.push("gateway   starting".into());
        return lines;
    };
    let uplink = s
        .uplink
        .as_ref()
        .map(|u| format!("uplink {} as {}", u.state, u.role))
        .unwrap_or_else(|| "no uplink yet".into());
    lines.push(format!(
        "gateway   {}: {} ({}), {uplink}",
        s.identity.thing_name.as_deref().unwrap_or("(no thing yet)"),
        s.identity.stage,
        s.identity.activity,
    ));
    if let Some(c) = &s.children {
        lines.push(format!(
            "children  {} provisioned, {} queued, {} awaiting approval, {} failed, {} denied",
            c.provisioned, c.queued, c.awaiting_approval, c.failed, c.denied
        ));
    }
    for c in &f.children {
        let got = c
            .thing_name
            .as_ref()
            .and_then(|t| f.received.get(t))
            .cloned()
            .unwrap_or_default();
        lines.push(format!(
            "  {:<14} {:<7} {:<12} {:<20} cloud {:>4}  {}",
            c.id,
            c.found.found_by,
            c.state,
            c.thing_name.as_deref().unwrap_or("-"),
            got.count,
            brief(&got.last)
        ));
    }
    let offered = |id: &str| f.children.iter().any(|c| c.id == id);
    for m in &parts.meters {
        let id = format!("meter-{}", m.serial);
        if !offered(&id) {
            lines.push(format!("  {id:<14} modbus  not found by a scan yet"));
        }
    }
    for d in &parts.devices {
        if !offered(&d.id) {
            let what = if d.stage.load(Ordering::Relaxed) == 0 {
                "onboarding"
            } else {
                "connected, not offered yet"
            };
            lines.push(format!("  {:<14} mqtt    {what}", d.id));
        }
    }
    if let Some(l) = &s.local {
        let docs: u64 = s.plugins.iter().map(|p| p.published).sum();
        let backlog = l.outbox.as_ref().map(|o| o.entries).unwrap_or(0);
        lines.push(format!(
            "local     {}: {} clients, {} publishes from devices, {docs} Modbus documents, outbox backlog {backlog}",
            l.listeners.join(" "),
            l.clients.len(),
            l.publishes
        ));
    }
    if let Some(b) = &s.bridge {
        lines.push(format!(
            "bridge    published {}, acked {}, in flight {}, backlog {}, resent {}",
            b.published, b.acked, b.in_flight, b.backlog, b.resent
        ));
    }
    lines
}

/// How many of the latest timeline entries the live view shows.
const RECENT: usize = 6;

/// Redraws the view: in place on a terminal, appended lines otherwise.
pub fn draw(
    parts: &Parts,
    f: &Frame,
    timeline: &Timeline,
    tty: bool,
    out: &mut (dyn Write + Send),
) -> std::io::Result<()> {
    let mut lines = render(parts, f);
    let events = timeline.events();
    if tty && !events.is_empty() {
        lines.push("recently".into());
        for (at, what) in &events[events.len().saturating_sub(RECENT)..] {
            lines.push(format!("  {:>7}  {what}", secs(*at)));
        }
    }
    if tty {
        // Home, clear screen.
        write!(out, "\x1b[H\x1b[2J")?;
    } else {
        writeln!(out, "---")?;
    }
    for l in lines {
        writeln!(out, "{l}")?;
    }
    out.flush()
}

/// The summary printed after everything stopped.
pub fn summary(
    parts: &Parts,
    f: &Frame,
    timeline: &Timeline,
    out: &mut (dyn Write + Send),
) -> std::io::Result<()> {
    writeln!(out, "timeline:")?;
    for (at, what) in timeline.events() {
        writeln!(out, "  {:>7}  {what}", secs(*at))?;
    }
    writeln!(out, "summary after {}:", secs(parts.started.elapsed()))?;
    match &f.snapshot {
        Some(s) => writeln!(
            out,
            "  gateway {}: {}",
            s.identity.thing_name.as_deref().unwrap_or("(no thing)"),
            s.identity.stage
        )?,
        None => writeln!(out, "  gateway: never answered on its status socket")?,
    }
    for c in &f.children {
        let got = c
            .thing_name
            .as_ref()
            .and_then(|t| f.received.get(t))
            .cloned()
            .unwrap_or_default();
        writeln!(
            out,
            "  child {} found by {}: {} as {}; cloud received {}, last {}",
            c.id,
            c.found.found_by,
            c.state,
            c.thing_name.as_deref().unwrap_or("-"),
            got.count,
            Value::Object(values(&got.last))
        )?;
    }
    let (sent, answered) = f.commands();
    writeln!(
        out,
        "  commands from the cloud: {sent} sent to the sensors, {answered} answered (on gw/<gateway>/<thing>/cmd-result)"
    )?;
    match f.first_in_cloud {
        Some(d) => writeln!(
            out,
            "  first telemetry reached the cloud {} after start",
            secs(d)
        )?,
        None => writeln!(out, "  no telemetry reached the cloud")?,
    }
    if let Some(s) = &f.snapshot {
        let local = s.local.as_ref();
        let b = s.bridge.clone().unwrap_or_default();
        writeln!(
            out,
            "  local: {} publishes from devices, {} Modbus documents; bridge: published {}, acked {}; outbox backlog {}",
            local.map(|l| l.publishes).unwrap_or(0),
            s.plugins.iter().map(|p| p.published).sum::<u64>(),
            b.published,
            b.acked,
            local
                .and_then(|l| l.outbox.as_ref())
                .map(|o| o.entries)
                .unwrap_or(0)
        )?;
    }
    writeln!(
        out,
        "  stopped: {} devices, the gateway, the emulator, {} meters",
        parts.devices.len(),
        parts.meters.len()
    )?;
    out.flush()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn values_of_both_kinds_of_message() {
        let doc =
            json!({"ts": 1, "values": {"voltage": {"value": 230.1, "unit": "V"}}, "errors": {}});
        assert_eq!(Value::Object(values(&doc)), json!({"voltage": 230.1}));
        assert_eq!(brief(&doc), "voltage=230.10 V");
        let reading = json!({"temperature": 21.5, "seq": 3});
        assert_eq!(Value::Object(values(&reading)), reading);
        assert_eq!(brief(&reading), "seq=3  temperature=21.50");
    }
}
