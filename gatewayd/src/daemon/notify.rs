//! Notify: the sd_notify(3) protocol (READY=1, STATUS=, WATCHDOG=1, STOPPING=1).
//!
//! A ~40-line datagram sender instead of the `systemd` crate, which needs libsystemd-dev to build
//! and failed to build here (NOTES.md). Owns nothing but the socket address; a missing
//! `NOTIFY_SOCKET` turns every call into a no-op, so the daemon runs the same off systemd.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct Notifier {
    addr: Option<String>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
    pub fn from_env() -> Notifier {
        Notifier {
            addr: std::env::var("NOTIFY_SOCKET")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.addr.is_some()
    }

    /// Sends one datagram of `KEY=VALUE\n` lines. Errors are returned, never fatal to the caller.
    pub fn send(&self, state: &str) -> std::io::Result<()> {
        let Some(addr) = &self.addr else {
            return Ok(());
        };
        let sock = UnixDatagram::unbound()?;
        let target = if let Some(name) = addr.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())?
        } else {
            SocketAddr::from_pathname(addr)?
        };
        sock.send_to_addr(state.as_bytes(), &target)?;
        Ok(())
    }

    /// Best effort: a lost notification must not stop the daemon, but it is logged.
    pub fn notify(&self, state: &str) {
        if let Err(error) = self.send(state) {
            tracing::warn!(%error, state = state.trim(), "sd_notify failed");
        }
    }

    pub fn status(&self, line: &str) {
        // A newline would start a new assignment; keep STATUS on one line.
        self.notify(&format!("STATUS={}\n", line.replace('\n', " ")));
    }
}

/// The watchdog ping interval (half of `WATCHDOG_USEC`), if systemd asked for one for this PID.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sends_to_path_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            addr: Some(path.display().to_string()),
        };
        n.notify("READY=1\n");
        n.status("provisioning\nstep 2");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\n");
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STATUS=provisioning step 2\n");
    }

    #[test]
    fn disabled_is_noop() {
        let n = Notifier { addr: None };
        assert!(!n.is_enabled());
        n.send("READY=1\n").unwrap();
    }
}
