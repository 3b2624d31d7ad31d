//! The gateway-local CA: created on first start in `<state_dir>/local/` (key mode 0600, written
//! atomically), it issues the endpoint's server certificate on every start (so `server_names`
//! changes apply at restart) and vouches for child certificates that name a registered child.
//! An operator may supply the server certificate and key instead; the CA still exists for
//! children.

use std::path::{Path, PathBuf};

use crate::identity::files::write_file;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("local CA {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("local CA: {0}")]
    Crypto(String),
}

/// The local CA and the server credential the TLS listeners use.
pub struct LocalCa {
    pub cert_pem: String,
    /// DER of the CA certificate, for chain checks of client certificates.
    pub cert_der: Vec<u8>,
    pub server_chain_pem: String,
    pub server_key_pem: String,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").finish_non_exhaustive()
    }
}

fn crypto(e: impl std::fmt::Display) -> CaError {
    CaError::Crypto(e.to_string())
}

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("local")
}

impl LocalCa {
    /// Loads the CA from `<state_dir>/local/` or creates it, then issues a server certificate
    /// (unless the operator supplied one).
    pub fn load_or_create(
        state_dir: &Path,
        server_names: &[String],
        operator: Option<(&Path, &Path)>,
    ) -> Result<LocalCa, CaError> {
        let d = dir(state_dir);
        let (cert_path, key_path) = (d.join("ca.crt"), d.join("ca.key"));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { path, source }
        };
        let (cert_pem, key_pem) = if key_path.exists() && cert_path.exists() {
            (
                std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?,
                std::fs::read_to_string(&key_path).map_err(io(&key_path))?,
            )
        } else {
            let key = rcgen::KeyPair::generate().map_err(crypto)?;
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(crypto)?;
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "gatewayd local CA");
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
            p.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            p.not_before = rcgen::date_time_ymd(2024, 1, 1);
            p.not_after = rcgen::date_time_ymd(2049, 12, 31);
            let cert = p.self_signed(&key).map_err(crypto)?;
            // Key first: a certificate without its key is never left behind.
            write_file(&key_path, key.serialize_pem().as_bytes(), 0o600).map_err(io(&key_path))?;
            write_file(&cert_path, cert.pem().as_bytes(), 0o644).map_err(io(&cert_path))?;
            tracing::info!(path = %cert_path.display(), "created the gateway-local CA");
            (cert.pem(), key.serialize_pem())
        };
        let cert_der = {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            CertificateDer::from_pem_slice(cert_pem.as_bytes())
                .map_err(crypto)?
                .to_vec()
        };
        let (server_chain_pem, server_key_pem) = match operator {
            Some((c, k)) => (
                std::fs::read_to_string(c).map_err(io(c))?,
                std::fs::read_to_string(k).map_err(io(k))?,
            ),
            None => {
                let ca_key = rcgen::KeyPair::from_pem(&key_pem).map_err(crypto)?;
                let issuer = rcgen::Issuer::from_ca_cert_pem(&cert_pem, ca_key).map_err(crypto)?;
                let key = rcgen::KeyPair::generate().map_err(crypto)?;
                let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(crypto)?;
                for n in server_names {
                    p.subject_alt_names
                        .push(match n.parse::<std::net::IpAddr>() {
                            Ok(ip) => rcgen::SanType::IpAddress(ip),
                            Err(_) => {
                                rcgen::SanType::DnsName(n.clone().try_into().map_err(crypto)?)
                            }
                        });
                }
                p.distinguished_name.push(
                    rcgen::DnType::CommonName,
                    server_names.first().map_or("gatewayd", String::as_str),
                );
                p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
                p.not_before = rcgen::date_time_ymd(2024, 1, 1);
                p.not_after = rcgen::date_time_ymd(2049, 12, 31);
                let cert = p.signed_by(&key, &issuer).map_err(crypto)?;
                (format!("{}{}", cert.pem(), cert_pem), key.serialize_pem())
            }
        };
        Ok(LocalCa {
            cert_pem,
            cert_der,
            server_chain_pem,
            server_key_pem,
        })
    }

    /// Issues a client certificate naming `child` (CN) with a fresh key: for tests and for
    /// devices whose key the gateway holds. Returns (certificate PEM, key PEM).
    pub fn issue_client(state_dir: &Path, child: &str) -> Result<(String, String), CaError> {
        let d = dir(state_dir);
        let cert_pem = std::fs::read_to_string(d.join("ca.crt")).map_err(|source| CaError::Io {
            path: d.join("ca.crt"),
            source,
        })?;
        let key_pem = std::fs::read_to_string(d.join("ca.key")).map_err(|source| CaError::Io {
            path: d.join("ca.key"),
            source,
        })?;
        let ca_key = rcgen::KeyPair::from_pem(&key_pem).map_err(crypto)?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&cert_pem, ca_key).map_err(crypto)?;
        let key = rcgen::KeyPair::generate().map_err(crypto)?;
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(crypto)?;
        p.distinguished_name.push(rcgen::DnType::CommonName, child);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &issuer).map_err(crypto)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// What a client certificate says about itself, as the endpoint judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub certificate_id: String,
    /// The Subject CN, when the certificate chains to the local CA (signature checked).
    pub local_cn: Option<String>,
    /// Within notBefore..notAfter now.
    pub valid_now: bool,
    /// Pinned as an onboarding certificate, or signed by a pinned onboarding CA.
    pub onboarding: bool,
}

/// Inspects a client's end-entity certificate against the local CA.
pub fn inspect(cert_der: &[u8], ca_der: &[u8]) -> Option<PeerCert> {
    use sha2::Digest;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let valid_now = cert.validity().is_valid();
    let local_cn = x509_parser::parse_x509_certificate(ca_der)
        .ok()
        .and_then(|(_, ca)| {
            (cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok())
                .then(|| {
                    cert.subject()
                        .iter_common_name()
                        .next()
                        .and_then(|cn| cn.as_str().ok())
                        .map(str::to_owned)
                })
                .flatten()
        });
    Some(PeerCert {
        certificate_id: hex::encode(sha2::Sha256::digest(cert_der)),
        local_cn,
        valid_now,
        onboarding: false,
    })
}

/// Whether `leaf_der` was signed by one of the certificates the client presented after it in
/// its chain whose SHA-256 fingerprint is pinned (lowercase hex), and that certificate names the
/// leaf's issuer. The pinned CA need not be on the gateway: its fingerprint is enough, the
/// client brings the certificate.
pub fn signed_by_pinned_ca(leaf_der: &[u8], chain: &[Vec<u8>], pins: &[String]) -> bool {
    use sha2::Digest;
    if pins.is_empty() {
        return false;
    }
    let Ok((_, leaf)) = x509_parser::parse_x509_certificate(leaf_der) else {
        return false;
    };
    chain.iter().any(|der| {
        let fp = hex::encode(sha2::Sha256::digest(der));
        if !pins.contains(&fp) {
            return false;
        }
        x509_parser::parse_x509_certificate(der).is_ok_and(|(_, ca)| {
            leaf.issuer() == ca.subject()
                && ca.validity().is_valid()
                && leaf.verify_signature(Some(ca.public_key())).is_ok()
        })
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_with_a_private_key_and_vouches_for_its_clients() {
        let d = tempfile::tempdir().unwrap();
        let names = vec!["gw.local".to_owned(), "10.0.0.1".to_owned()];
        let a = LocalCa::load_or_create(d.path(), &names, None).unwrap();
        let mode = std::fs::metadata(d.path().join("local/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = LocalCa::load_or_create(d.path(), &names, None).unwrap();
        assert_eq!(a.cert_pem, b.cert_pem, "the CA is kept across starts");
        let (cert, _) = LocalCa::issue_client(d.path(), "c1").unwrap();
        let der = {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            CertificateDer::from_pem_slice(cert.as_bytes())
                .unwrap()
                .to_vec()
        };
        let p = inspect(&der, &a.cert_der).unwrap();
        assert_eq!(p.local_cn.as_deref(), Some("c1"));
        assert!(p.valid_now);
        // Another CA's certificate is not vouched for.
        let other = tempfile::tempdir().unwrap();
        let o = LocalCa::load_or_create(other.path(), &names, None).unwrap();
        assert_eq!(inspect(&der, &o.cert_der).unwrap().local_cn, None);
    }
}
