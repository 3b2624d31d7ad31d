//! Authentication: who is this CONNECT? Decides from the CONNECT, the client certificate (if
//! any, already inspected against the local CA) and the registry; the caller turns a refusal
//! into the CONNACK code of the client's protocol version. No I/O besides the registry lookup
//! (in memory); the password hash is checked here, so call it off the async threads.

use super::ca::PeerCert;
use super::codec::{Connect, Version};
use crate::children::Registry;
use crate::identity::Subject;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Child,
    Onboarding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// Client id is no usable child id, or not the child the credential belongs to.
    ClientId,
    BadPassword,
    /// Unknown, untrusted or expired certificate; unknown child; no credential.
    NotAuthorized,
}

impl Refusal {
    pub fn code(self, v: Version) -> u8 {
        match (self, v) {
            (Refusal::ClientId, Version::V4) => 2,
            (Refusal::BadPassword, Version::V4) => 4,
            (Refusal::NotAuthorized, Version::V4) => 5,
            (Refusal::ClientId, Version::V5) => 0x85,
            (Refusal::BadPassword, Version::V5) => 0x86,
            (Refusal::NotAuthorized, Version::V5) => 0x87,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ClientId => "client_id",
            Refusal::BadPassword => "bad_password",
            Refusal::NotAuthorized => "not_authorized",
        }
    }
}

/// The configured onboarding credential.
#[derive(Clone)]
pub struct Onboarding {
    pub username: String,
    pub password: Vec<u8>,
}

impl std::fmt::Debug for Onboarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Onboarding")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    // Compare digests so the time depends on neither length nor content.
    let (x, y) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// Decides who the client is.
pub fn authenticate(
    c: &Connect,
    cert: Option<&PeerCert>,
    registry: &Registry,
    onboarding: Option<&Onboarding>,
) -> Result<Role, Refusal> {
    if Subject::child(&c.client_id).is_err() {
        return Err(Refusal::ClientId);
    }
    if let Some(cert) = cert {
        if !cert.valid_now {
            return Err(Refusal::NotAuthorized);
        }
        if let Some(owner) = registry.by_certificate(&cert.certificate_id) {
            return if owner == c.client_id {
                Ok(Role::Child)
            } else {
                Err(Refusal::ClientId)
            };
        }
        if let Some(cn) = &cert.local_cn {
            if registry.get(cn).is_none() {
                return Err(Refusal::NotAuthorized);
            }
            return if *cn == c.client_id {
                Ok(Role::Child)
            } else {
                Err(Refusal::ClientId)
            };
        }
        // An onboarding certificate (pinned, or from a pinned maker CA) of a device not
        // registered yet: the onboarding topics only.
        if cert.onboarding {
            return Ok(Role::Onboarding);
        }
        // A certificate nobody vouches for: a password does not rescue it (a device presenting
        // a foreign certificate is misconfigured or impersonating).
        return Err(Refusal::NotAuthorized);
    }
    let (Some(user), Some(pass)) = (&c.username, &c.password) else {
        return Err(Refusal::NotAuthorized);
    };
    if let Some(o) = onboarding
        && *user == o.username
    {
        return if ct_eq(pass, &o.password) {
            Ok(Role::Onboarding)
        } else {
            Err(Refusal::BadPassword)
        };
    }
    if *user != c.client_id {
        return Err(Refusal::ClientId);
    }
    match registry.get(user).and_then(|r| r.password) {
        Some(h) if h.verify(pass) => Ok(Role::Child),
        // Unknown child and wrong password answer alike: no registry probing.
        _ => Err(Refusal::BadPassword),
    }
}
