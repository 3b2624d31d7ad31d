//! Files: a subject's name, its key, certificate and CSR on disk. Keys are generated here, written
//! mode 0600 in a 0700 directory, atomically (temp, fsync, rename, fsync dir), and never leave the
//! gateway.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::Digest;

use super::IdentityError;
use crate::daemon::config::KeyAlgorithm;

/// Whom an identity belongs to: the gateway, or one of its children. The name becomes a store key
/// and a directory, so a child id is checked first: AWS thing-name characters only
/// (`[A-Za-z0-9_:-]`, 1–128), which rules out `/`, `..` and anything a shell would read.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    Gateway,
    Child(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("child id `{id}` is not usable: {why} (allowed: 1 to 128 of A-Z a-z 0-9 _ : -)")]
pub struct BadSubject {
    pub id: String,
    pub why: &'static str,
}

/// Store key of the gateway's own identity.
pub const GATEWAY: &str = "gateway";
const CHILD_PREFIX: &str = "child/";

impl Subject {
    pub fn child(id: &str) -> Result<Subject, BadSubject> {
        let bad = |why| BadSubject {
            id: id.chars().take(64).collect(),
            why,
        };
        if id.is_empty() {
            return Err(bad("empty"));
        }
        if id.len() > 128 {
            return Err(bad("longer than 128 characters"));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-'))
        {
            return Err(bad(
                "it holds a character AWS does not allow in a thing name",
            ));
        }
        Ok(Subject::Child(id.to_owned()))
    }

    /// The store key: `gateway` or `child/<id>`.
    pub fn key(&self) -> String {
        match self {
            Subject::Gateway => GATEWAY.to_owned(),
            Subject::Child(id) => format!("{CHILD_PREFIX}{id}"),
        }
    }

    /// Back from a store key (for listing); a key that is neither is refused, not guessed.
    pub fn from_key(key: &str) -> Result<Subject, BadSubject> {
        match key.strip_prefix(CHILD_PREFIX) {
            _ if key == GATEWAY => Ok(Subject::Gateway),
            Some(id) => Subject::child(id),
            None => Err(BadSubject {
                id: key.chars().take(64).collect(),
                why: "not a subject key",
            }),
        }
    }

    /// Its directory under the state directory.
    pub fn dir(&self, state_dir: &Path) -> PathBuf {
        match self {
            Subject::Gateway => state_dir.join("identity").join(GATEWAY),
            Subject::Child(id) => state_dir.join("identity").join("children").join(id),
        }
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Gateway => f.write_str("gateway"),
            Subject::Child(id) => write!(f, "child {id}"),
        }
    }
}

/// Files of one subject under its directory (`Subject::dir`).
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
    pub key: PathBuf,
    pub cert: PathBuf,
    pub temporary_claim_cert: PathBuf,
    pub temporary_claim_key: PathBuf,
}

impl Paths {
    pub fn new(state_dir: &Path, subject: &Subject) -> Paths {
        let dir = subject.dir(state_dir);
        Paths {
            key: dir.join("private.key"),
            cert: dir.join("certificate.pem"),
            temporary_claim_cert: dir.join("temporary-claim.pem"),
            temporary_claim_key: dir.join("temporary-claim.key"),
            dir,
        }
    }
}

/// The temporary name for an atomic write of `path`: the whole file name plus `.tmp`, so files
/// that differ only in extension (`temporary-claim.pem`, `temporary-claim.key`) never share one.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes atomically (temp file, fsync, rename, fsync dir) with the given mode.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let tmp = tmp_path(path);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Generates a private key (PKCS#8 PEM).
pub fn generate_key(alg: KeyAlgorithm) -> Result<String, IdentityError> {
    let crypto = |e: &dyn std::fmt::Display| IdentityError::Crypto(e.to_string());
    match alg {
        KeyAlgorithm::EcdsaP256 => Ok(rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| crypto(&e))?
            .serialize_pem()),
        KeyAlgorithm::Rsa2048 => {
            // rcgen cannot generate RSA keys with ring (crates.md); the rsa crate can.
            use rsa::pkcs8::EncodePrivateKey;
            let key =
                rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).map_err(|e| crypto(&e))?;
            Ok(key
                .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                .map_err(|e| crypto(&e))?
                .to_string())
        }
    }
}

/// Builds a PEM CSR for `key_pem`, subject CN = `common_name`.
pub fn make_csr(
    key_pem: &str,
    alg: KeyAlgorithm,
    common_name: &str,
) -> Result<String, IdentityError> {
    let crypto = |e: rcgen::Error| IdentityError::Crypto(e.to_string());
    let key = match alg {
        KeyAlgorithm::EcdsaP256 => rcgen::KeyPair::from_pem(key_pem).map_err(crypto)?,
        KeyAlgorithm::Rsa2048 => {
            rcgen::KeyPair::from_pem_and_sign_algo(key_pem, &rcgen::PKCS_RSA_SHA256)
                .map_err(crypto)?
        }
    };
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params
        .serialize_request(&key)
        .map_err(crypto)?
        .pem()
        .map_err(crypto)
}

/// certificateId as AWS computes it: SHA-256 of the DER, lowercase hex.
pub fn certificate_id(cert_pem: &[u8]) -> Option<String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::from_pem_slice(cert_pem).ok()?;
    Some(hex::encode(sha2::Sha256::digest(der.as_ref())))
}

/// notBefore of the first certificate in a PEM file (seconds since the epoch).
pub fn not_before(cert_pem: &[u8]) -> Option<u64> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::from_pem_slice(cert_pem).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    u64::try_from(cert.validity().not_before.timestamp()).ok()
}

/// A UTC time for messages (`2026-12-01 11:31:39 +00:00:00`).
pub fn utc(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| x509_parser::time::ASN1Time::from_timestamp(s).ok())
        .map(|t| t.to_string())
        .unwrap_or_else(|| format!("{secs} s after the epoch"))
}

pub(crate) fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::File {
        what,
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn write(
    what: &'static str,
    path: &Path,
    data: &[u8],
    mode: u32,
) -> Result<(), IdentityError> {
    write_file(path, data, mode).map_err(|source| IdentityError::File {
        what,
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use rcgen::PublicKeyData;

    /// SubjectPublicKeyInfo (DER) carried by a CSR.
    fn csr_public_key(csr: &str) -> Vec<u8> {
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(csr).unwrap();
        parsed.public_key.subject_public_key_info()
    }

    #[test]
    fn p256_key_and_csr() {
        let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
        assert!(key.contains("BEGIN PRIVATE KEY"));
        let csr = make_csr(&key, KeyAlgorithm::EcdsaP256, "GW-1").unwrap();
        assert!(csr.contains("BEGIN CERTIFICATE REQUEST"));
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        let cn = parsed
            .params
            .distinguished_name
            .get(&rcgen::DnType::CommonName);
        assert!(
            matches!(cn, Some(rcgen::DnValue::Utf8String(s)) if s == "GW-1"),
            "{cn:?}"
        );
        let pair = rcgen::KeyPair::from_pem(&key).unwrap();
        assert_eq!(csr_public_key(&csr), pair.subject_public_key_info());
    }

    #[test]
    fn rsa_key_and_csr() {
        use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
        use rsa::traits::PublicKeyParts;
        let key = generate_key(KeyAlgorithm::Rsa2048).unwrap();
        let private = rsa::RsaPrivateKey::from_pkcs8_pem(&key).unwrap();
        assert_eq!(private.size() * 8, 2048);
        let csr = make_csr(&key, KeyAlgorithm::Rsa2048, "GW-2").unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        assert_eq!(parsed.public_key.algorithm(), &rcgen::PKCS_RSA_SHA256);
        // The CSR carries this key's public half (SubjectPublicKeyInfo).
        let spki = rsa::RsaPublicKey::from(&private)
            .to_public_key_der()
            .unwrap();
        assert_eq!(csr_public_key(&csr), spki.as_bytes());
    }

    #[test]
    fn key_files_are_private() {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(d.path(), &Subject::Gateway);
        write_file(&p.key, b"secret", 0o600).unwrap();
        let mode = std::fs::metadata(&p.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(&p.dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        // Rewriting keeps the mode and replaces the content.
        write_file(&p.key, b"secret2", 0o600).unwrap();
        assert_eq!(std::fs::read(&p.key).unwrap(), b"secret2");
    }

    #[test]
    fn files_differing_in_extension_use_different_temporary_names() {
        let p = Paths::new(Path::new("/state"), &Subject::Gateway);
        assert_ne!(
            tmp_path(&p.temporary_claim_cert),
            tmp_path(&p.temporary_claim_key)
        );
        assert_eq!(
            tmp_path(&p.key),
            Path::new("/state/identity/gateway/private.key.tmp")
        );
    }

    #[test]
    fn subjects_are_checked_before_they_become_paths() {
        let c = Subject::child("meter-7:unit_3").unwrap();
        assert_eq!(c.key(), "child/meter-7:unit_3");
        assert_eq!(Subject::from_key(&c.key()).unwrap(), c);
        assert_eq!(Subject::from_key("gateway").unwrap(), Subject::Gateway);
        assert_eq!(
            c.dir(Path::new("/s")),
            Path::new("/s/identity/children/meter-7:unit_3")
        );
        for bad in ["", "../gateway", "a/b", "x y", "é", ".", &"a".repeat(129)] {
            let e = Subject::child(bad).unwrap_err();
            assert!(e.to_string().contains("is not usable"), "{bad}: {e}");
        }
        // A child cannot be named into the gateway's directory.
        assert!(Subject::from_key("child/../gateway").is_err());
        assert!(Subject::from_key("other").is_err());
    }
}
