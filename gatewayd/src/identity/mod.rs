//! Identity: gives a subject (the gateway, and each child) its own AWS IoT identity.
//!
//! - `record`: the persisted state and its transitions, pure (`next_step`, `recover`, `abandon`,
//!   one function per transition) with tests of their own;
//! - `driver`: runs those steps for any subject over the shared cloud connection, with the crash
//!   rules (pending marker flushed before a request, a saved token under an hour old redeemed);
//! - `files`: subject names, keys, certificates and CSRs on disk;
//! - `gateway`: the gateway-only parts: claim, trusted-user claim, pre-installed certificate,
//!   serial number, reconnecting as its thing, probing a lost RegisterThing answer.
//!
//! It owns the identity records in the store and the files under `<state_dir>/identity/`; it
//! never opens a connection itself (the cloud service does).

pub mod driver;
pub mod files;
pub mod gateway;
pub mod record;

pub use files::{GATEWAY, Paths, Subject, certificate_id, generate_key, make_csr, write_file};
pub use gateway::{Engine, TEMPORARY_CLAIM_SECS};
pub use record::{IdentityRecord, Stage};

use crate::cloud::UplinkError;
use crate::cloud::fleet::FleetError;
use crate::store::StoreError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} {}: {source}", .path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key or CSR: {0}")]
    Crypto(String),
    #[error("the cloud refused the {role} certificate: {message}")]
    Refused { role: &'static str, message: String },
    #[error(
        "the system clock ({}) is before the {role} certificate's validity start ({}); set the clock \
         (NTP, RTC): gatewayd tries again as soon as the clock passes that time",
        files::utc(*now),
        files::utc(*not_before)
    )]
    ClockBehind {
        role: &'static str,
        not_before: u64,
        now: u64,
    },
    #[error("cannot connect with the {role} certificate: {source}")]
    Connect {
        role: &'static str,
        source: UplinkError,
    },
    #[error(
        "the temporary claim expired before provisioning finished; install a new one with `gatewayctl claim install`"
    )]
    TemporaryClaimExpired,
    #[error("RegisterThing returned no thing name; the template needs an AWS::IoT::Thing resource")]
    NoThingName,
    #[error(transparent)]
    Subject(#[from] files::BadSubject),
    #[error("serial number: {0}")]
    Serial(String),
    #[error("stopped")]
    Cancelled,
}

impl IdentityError {
    pub fn is_transient(&self) -> bool {
        match self {
            IdentityError::Fleet(e) => e.is_transient(),
            IdentityError::Store(e) => e.is_transient(),
            IdentityError::Connect { .. }
            | IdentityError::Cancelled
            | IdentityError::ClockBehind { .. } => true,
            _ => false,
        }
    }
}

/// Test-only fault switch: `GATEWAYD_CRASH_AFTER=<step>` aborts the process right after that
/// step's state was flushed (steps: key-generated, csr-sent, certificate-saved, register-sent,
/// thing-registered, active). Used by the crash-recovery tests; never set it in production.
pub fn crash_point(step: &str) {
    static WANT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let want = WANT.get_or_init(|| std::env::var("GATEWAYD_CRASH_AFTER").ok());
    if want.as_deref() == Some(step) {
        eprintln!("gatewayd: GATEWAYD_CRASH_AFTER={step}: aborting (test fault injection)");
        std::process::abort();
    }
}
