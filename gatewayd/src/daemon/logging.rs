//! Logging: one tracing subscriber, to journald (structured fields) or to stderr.
//!
//! journald is chosen when systemd connected our stderr to it (`JOURNAL_STREAM` is set) or when
//! asked for explicitly; if its socket cannot be opened we fall back to stderr and say so.

use tracing_subscriber::{EnvFilter, prelude::*};

use crate::daemon::config::LogTarget;

/// rumqttd (the local router behind the front door) logs benign link churn at ERROR, e.g. "no-
/// connection id N is already gone" when an event for a session's link arrives after the link
/// closed; the front door logs what matters about sessions itself. So rumqttd is silent unless
/// the configured filter names it (`log_level = "info,rumqttd=debug"`).
fn quiet_router(level: &str, filter: EnvFilter) -> EnvFilter {
    match "rumqttd=off".parse() {
        Ok(d) if !level.contains("rumqttd") => filter.add_directive(d),
        _ => filter,
    }
}

/// Installs the global subscriber. Returns which sink was chosen, for the first log line.
pub fn init(level: &str, target: LogTarget) -> &'static str {
    let filter = || {
        quiet_router(
            level,
            EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")),
        )
    };
    let want_journal = match target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
    };
    if want_journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_syslog_identifier("gatewayd".to_owned());
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .try_init();
                return "journald";
            }
            Err(error) => {
                eprintln!("gatewayd: journald unavailable ({error}); logging to stderr");
            }
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    "stderr"
}
