//! The emulator's certificate authority: the stand-in for Amazon's roots and for the CA that signs
//! device certificates, CSR checking, RSA key generation for CreateKeysAndCertificate.
//!
//! Owns: key and certificate bytes. Must not touch the registry (callers record what is issued).
//! Device certificates are built here with a small DER writer (not rcgen) because they must carry
//! any public key a CSR may hold, including P-521, which rcgen cannot sign for with ring.

use rand::RngCore;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use sha2::{Digest, Sha256};
use std::path::Path;
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

/// AWS: a certificateId is the lowercase hex SHA-256 of the certificate's DER.
pub fn cert_id(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// AWS's CreateCertificateFromCsr limit on the CSR text (control-plane value; see README).
pub const MAX_CSR_CHARS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate signing request is not PEM: {0}")]
    CsrNotPem(String),
    #[error("certificate signing request is longer than {MAX_CSR_CHARS} characters")]
    CsrTooLong,
    #[error("certificate signing request is not valid DER: {0}")]
    CsrNotDer(String),
    #[error("certificate signing request signature does not verify")]
    CsrBadSignature,
    #[error(
        "unsupported key in certificate signing request: {0} (RSA of at least 2048 bits or EC P-256, P-384, P-521 required)"
    )]
    CsrKey(String),
    #[error("{0}")]
    Other(String),
}

fn other(e: impl std::fmt::Display) -> PkiError {
    PkiError::Other(e.to_string())
}

/// The CA, loaded from its PEM files.
pub struct Ca {
    pub cert_der: Vec<u8>,
    pub cert_pem: String,
    key_pkcs8: Vec<u8>,
    subject_der: Vec<u8>,
}

pub fn pem_encode(tag: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {tag}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        s.push('\n');
    }
    s.push_str(&format!("-----END {tag}-----\n"));
    s
}

/// Decode the first PEM block with the given tag.
pub fn pem_decode(text: &str, tag: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let begin = format!("-----BEGIN {tag}-----");
    let end = format!("-----END {tag}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let b64: String = text[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

impl Ca {
    /// Create a new root CA (ECDSA P-256, like Amazon Root CA 3).
    pub fn generate(common_name: &str) -> Result<(Ca, String), PkiError> {
        let key = rcgen::KeyPair::generate().map_err(other)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(other)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "iotcore-sim");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let cert = params.self_signed(&key).map_err(other)?;
        let key_pem = key.serialize_pem();
        let ca = Ca::from_pem(&cert.pem(), &key_pem)?;
        Ok((ca, key_pem))
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let cert_der = pem_decode(cert_pem, "CERTIFICATE").ok_or_else(|| other("CA not PEM"))?;
        let key_pkcs8 =
            pem_decode(key_pem, "PRIVATE KEY").ok_or_else(|| other("CA key not PKCS#8 PEM"))?;
        let (_, x509) = parse_x509_certificate(&cert_der).map_err(other)?;
        let subject_der = x509.tbs_certificate.subject.as_raw().to_vec();
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            key_pkcs8,
            subject_der,
        })
    }

    pub fn load(cert: &Path, key: &Path) -> Result<Ca, PkiError> {
        let c = std::fs::read_to_string(cert).map_err(other)?;
        let k = std::fs::read_to_string(key).map_err(other)?;
        Ca::from_pem(&c, &k)
    }

    /// The CA of an emulator directory (`root-ca.pem`, `root-ca.key`).
    pub fn load_dir(dir: &Path) -> Result<Ca, PkiError> {
        Ca::load(&dir.join("root-ca.pem"), &dir.join("root-ca.key"))
    }

    /// A fresh P-256 key and a client certificate for it signed by this CA, valid until
    /// `not_after` (Unix seconds) or 2049-12-31. Returns the key and the certificate DER.
    pub fn issue_with_new_key(
        &self,
        common_name: &str,
        not_after: Option<u64>,
    ) -> Result<(rcgen::KeyPair, Vec<u8>), PkiError> {
        let key = rcgen::KeyPair::generate().map_err(other)?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let der = self.issue_until(&spki, common_name, &[], false, not_after)?;
        Ok((key, der))
    }

    /// A TLS server certificate for `localhost` and `127.0.0.1`, signed by this CA.
    /// Returns (certificate PEM, private key PEM).
    pub fn server_cert(&self, names: &[&str]) -> Result<(String, String), PkiError> {
        let key = rcgen::KeyPair::generate().map_err(other)?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let mut sans = Vec::new();
        for n in names {
            if let Ok(ip) = n.parse::<std::net::IpAddr>() {
                sans.push(San::Ip(ip));
            } else {
                sans.push(San::Dns((*n).to_owned()));
            }
        }
        let der = self.issue(
            &spki,
            names.first().copied().unwrap_or("localhost"),
            &sans,
            true,
        )?;
        Ok((pem_encode("CERTIFICATE", &der), key.serialize_pem()))
    }

    /// Issue a certificate for `spki_der` (a DER SubjectPublicKeyInfo, any algorithm), signed by
    /// this CA with ecdsa-with-SHA256, valid until 2049-12-31 as AWS's are.
    pub fn issue(
        &self,
        spki_der: &[u8],
        common_name: &str,
        sans: &[San],
        server: bool,
    ) -> Result<Vec<u8>, PkiError> {
        self.issue_until(spki_der, common_name, sans, server, None)
    }

    /// [`Ca::issue`] with an explicit notAfter (Unix seconds) instead of 2049-12-31.
    pub fn issue_until(
        &self,
        spki_der: &[u8],
        common_name: &str,
        sans: &[San],
        server: bool,
        not_after: Option<u64>,
    ) -> Result<Vec<u8>, PkiError> {
        let not_after = match not_after {
            Some(t) => utc_time_at(t),
            None => utc_time("491231235959Z"),
        };
        let mut serial = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut serial);
        serial[0] &= 0x7f;
        serial[0] |= 0x01;
        let not_before = utc_time_now_minus_hour();
        let tbs = yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next()
                    .write_tagged(yasna::Tag::context(0), |w| w.write_u8(2));
                w.next().write_bigint_bytes(&serial, true);
                write_ecdsa_sha256_alg(w.next());
                w.next().write_der(&self.subject_der);
                w.next().write_sequence(|w| {
                    w.next().write_der(&not_before);
                    w.next().write_der(&not_after);
                });
                w.next().write_sequence(|w| {
                    w.next().write_set(|w| {
                        w.next().write_sequence(|w| {
                            w.next()
                                .write_oid(&yasna::models::ObjectIdentifier::from_slice(&[
                                    2, 5, 4, 3,
                                ]));
                            w.next().write_utf8_string(common_name);
                        })
                    })
                });
                w.next().write_der(spki_der);
                w.next().write_tagged(yasna::Tag::context(3), |w| {
                    w.write_sequence(|w| {
                        // basicConstraints, critical, CA:FALSE
                        write_ext(w.next(), &[2, 5, 29, 19], true, &[0x30, 0x00]);
                        // keyUsage, critical: digitalSignature (+ keyEncipherment for RSA peers)
                        write_ext(w.next(), &[2, 5, 29, 15], true, &[0x03, 0x02, 0x05, 0xa0]);
                        // extendedKeyUsage: clientAuth or serverAuth
                        let eku: &[u64] = if server {
                            &[1, 3, 6, 1, 5, 5, 7, 3, 1]
                        } else {
                            &[1, 3, 6, 1, 5, 5, 7, 3, 2]
                        };
                        let eku_der = yasna::construct_der(|w| {
                            w.write_sequence(|w| {
                                w.next()
                                    .write_oid(&yasna::models::ObjectIdentifier::from_slice(eku))
                            })
                        });
                        write_ext(w.next(), &[2, 5, 29, 37], false, &eku_der);
                        if !sans.is_empty() {
                            let san_der = yasna::construct_der(|w| {
                                w.write_sequence(|w| {
                                    for s in sans {
                                        match s {
                                            San::Dns(d) => w.next().write_tagged_implicit(
                                                yasna::Tag::context(2),
                                                |w| w.write_ia5_string(d),
                                            ),
                                            San::Ip(ip) => {
                                                let b = match ip {
                                                    std::net::IpAddr::V4(v) => v.octets().to_vec(),
                                                    std::net::IpAddr::V6(v) => v.octets().to_vec(),
                                                };
                                                w.next().write_tagged_implicit(
                                                    yasna::Tag::context(7),
                                                    |w| w.write_bytes(&b),
                                                )
                                            }
                                        }
                                    }
                                })
                            });
                            write_ext(w.next(), &[2, 5, 29, 17], false, &san_der);
                        }
                    })
                });
            })
        });
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &self.key_pkcs8, &rng)
            .map_err(|e| other(format!("CA key: {e}")))?;
        let sig = key
            .sign(&rng, &tbs)
            .map_err(|e| other(format!("signing: {e}")))?;
        Ok(yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_der(&tbs);
                write_ecdsa_sha256_alg(w.next());
                w.next()
                    .write_bitvec_bytes(sig.as_ref(), sig.as_ref().len() * 8);
            })
        }))
    }
}

pub enum San {
    Dns(String),
    Ip(std::net::IpAddr),
}

fn write_ecdsa_sha256_alg(w: yasna::DERWriter<'_>) {
    w.write_sequence(|w| {
        w.next()
            .write_oid(&yasna::models::ObjectIdentifier::from_slice(&[
                1, 2, 840, 10045, 4, 3, 2,
            ]))
    });
}

fn write_ext(w: yasna::DERWriter<'_>, oid: &[u64], critical: bool, value: &[u8]) {
    w.write_sequence(|w| {
        w.next()
            .write_oid(&yasna::models::ObjectIdentifier::from_slice(oid));
        if critical {
            w.next().write_bool(true);
        }
        w.next().write_bytes(value);
    });
}

fn utc_time(s: &str) -> Vec<u8> {
    let mut v = vec![0x17, s.len() as u8];
    v.extend_from_slice(s.as_bytes());
    v
}

fn utc_time_now_minus_hour() -> Vec<u8> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .saturating_sub(3600);
    utc_time_at(secs)
}

/// UTCTime for a Unix time before 2050.
fn utc_time_at(secs: u64) -> Vec<u8> {
    let (y, mo, d, h, mi, s) = civil_from_unix(secs);
    utc_time(&format!(
        "{:02}{:02}{:02}{:02}{:02}{:02}Z",
        y % 100,
        mo,
        d,
        h,
        mi,
        s
    ))
}

/// Gregorian calendar fields from a Unix timestamp (Howard Hinnant's days_from_civil inverse).
pub fn civil_from_unix(secs: u64) -> (u64, u64, u64, u64, u64, u64) {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (
        y as u64,
        m as u64,
        d as u64,
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
    )
}

/// A checked CSR: its public key (DER SubjectPublicKeyInfo) and a description of the key.
pub struct CheckedCsr {
    pub spki_der: Vec<u8>,
    pub key_desc: String,
}

const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_P521: &str = "1.3.132.0.35";

/// Parse a PEM CSR, verify its self-signature and check the key is one AWS accepts.
pub fn check_csr(pem: &str) -> Result<CheckedCsr, PkiError> {
    if pem.chars().count() > MAX_CSR_CHARS {
        return Err(PkiError::CsrTooLong);
    }
    let der = pem_decode(pem, "CERTIFICATE REQUEST")
        .or_else(|| pem_decode(pem, "NEW CERTIFICATE REQUEST"))
        .ok_or_else(|| {
            PkiError::CsrNotPem("no -----BEGIN CERTIFICATE REQUEST----- block".into())
        })?;
    let (rest, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| PkiError::CsrNotDer(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::CsrNotDer(
            "trailing bytes after the request".into(),
        ));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let parsed = spki
        .parsed()
        .map_err(|e| PkiError::CsrKey(format!("unreadable public key: {e}")))?;
    let key_desc = match parsed {
        PublicKey::RSA(rsa) => {
            let bits = rsa.key_size();
            if bits < 2048 {
                return Err(PkiError::CsrKey(format!("RSA {bits} bits")));
            }
            format!("RSA {bits}")
        }
        PublicKey::EC(_) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            match curve.as_str() {
                OID_P256 => "EC P-256".to_owned(),
                OID_P384 => "EC P-384".to_owned(),
                OID_P521 => "EC P-521".to_owned(),
                other => return Err(PkiError::CsrKey(format!("EC curve {other}"))),
            }
        }
        PublicKey::Unknown(_) => {
            return Err(PkiError::CsrKey(format!(
                "algorithm {}",
                spki.algorithm.algorithm.to_id_string()
            )));
        }
        _ => {
            return Err(PkiError::CsrKey(format!(
                "algorithm {}",
                spki.algorithm.algorithm.to_id_string()
            )));
        }
    };
    if key_desc == "EC P-521" {
        verify_p521(&csr)?;
    } else {
        csr.verify_signature()
            .map_err(|_| PkiError::CsrBadSignature)?;
    }
    Ok(CheckedCsr {
        spki_der: spki.raw.to_vec(),
        key_desc,
    })
}

fn verify_p521(csr: &X509CertificationRequest<'_>) -> Result<(), PkiError> {
    use p521::ecdsa::signature::hazmat::PrehashVerifier;
    use sha2::{Sha384, Sha512};
    let info = &csr.certification_request_info;
    let point = &info.subject_pki.subject_public_key.data;
    let vk = p521::ecdsa::VerifyingKey::from_sec1_bytes(point)
        .map_err(|_| PkiError::CsrKey("invalid P-521 point".into()))?;
    let sig = p521::ecdsa::Signature::from_der(&csr.signature_value.data)
        .map_err(|_| PkiError::CsrBadSignature)?;
    let msg = info.raw;
    let digest: Vec<u8> = match csr.signature_algorithm.algorithm.to_id_string().as_str() {
        "1.2.840.10045.4.3.2" => Sha256::digest(msg).to_vec(),
        "1.2.840.10045.4.3.3" => Sha384::digest(msg).to_vec(),
        "1.2.840.10045.4.3.4" => Sha512::digest(msg).to_vec(),
        other => return Err(PkiError::CsrKey(format!("signature algorithm {other}"))),
    };
    // ECDSA uses the digest as an integer; the ecdsa crate refuses digests shorter than half the
    // field (SHA-256 with P-521, which openssl produces by default), so widen it with zeros.
    let mut field = vec![0u8; 66usize.saturating_sub(digest.len())];
    field.extend_from_slice(&digest);
    vk.verify_prehash(&field, &sig)
        .map_err(|_| PkiError::CsrBadSignature)
}

/// An RSA-2048 key pair as AWS's CreateKeysAndCertificate returns it: the private key as PKCS#1 PEM,
/// and the public key as a DER SubjectPublicKeyInfo.
pub fn generate_rsa_2048() -> Result<(String, Vec<u8>), PkiError> {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::EncodePublicKey;
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).map_err(other)?;
    let pem = key
        .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
        .map_err(other)?
        .to_string();
    let spki = key
        .to_public_key()
        .to_public_key_der()
        .map_err(other)?
        .into_vec();
    Ok((pem, spki))
}

/// Subject fields of a certificate, keyed by AWS's pseudo-parameter names
/// (`AWS::IoT::Certificate::CommonName`, ...), for JITP and policy variables.
pub fn subject_fields(der: &[u8]) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let Ok((_, x509)) = parse_x509_certificate(der) else {
        return out;
    };
    for attr in x509.subject().iter_attributes() {
        let name = match attr.attr_type().to_id_string().as_str() {
            "2.5.4.3" => "CommonName",
            "2.5.4.6" => "Country",
            "2.5.4.10" => "Organization",
            "2.5.4.11" => "OrganizationalUnit",
            "2.5.4.46" => "DistinguishedNameQualifier",
            "2.5.4.8" => "StateName",
            "2.5.4.5" => "SerialNumber",
            "2.5.4.7" => "Locality",
            "2.5.4.12" => "Title",
            "2.5.4.4" => "Surname",
            "2.5.4.42" => "GivenName",
            "2.5.4.43" => "Initials",
            "2.5.4.65" => "Pseudonym",
            "2.5.4.44" => "GenerationQualifier",
            _ => continue,
        };
        if let Ok(v) = attr.as_str() {
            out.insert(format!("AWS::IoT::Certificate::{name}"), v.to_owned());
        }
    }
    out
}

/// Whether `der` is currently within its validity period.
pub fn cert_currently_valid(der: &[u8]) -> bool {
    match parse_x509_certificate(der) {
        Ok((_, x)) => x.validity().is_valid(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn csr_for(key: &rcgen::KeyPair) -> String {
        let params = rcgen::CertificateParams::new(vec!["dev".to_string()]).unwrap();
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn issues_for_p256_and_p384_csrs_and_rejects_tampering() {
        let (ca, _) = Ca::generate("Test Root").unwrap();
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let csr = check_csr(&csr_for(&key)).unwrap();
            let der = ca
                .issue(&csr.spki_der, "AWS IoT Certificate", &[], false)
                .unwrap();
            let (_, x) = parse_x509_certificate(&der).unwrap();
            assert_eq!(x.public_key().raw, csr.spki_der.as_slice());
            assert!(x.validity().is_valid());
            // The issued certificate verifies under the CA key.
            let (_, cax) = parse_x509_certificate(&ca.cert_der).unwrap();
            x.verify_signature(Some(cax.public_key())).unwrap();
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = csr_for(&key);
        let mut der = pem_decode(&pem, "CERTIFICATE REQUEST").unwrap();
        let n = der.len();
        der[n - 5] ^= 0x40; // flip a bit in the signature
        let bad = pem_encode("CERTIFICATE REQUEST", &der);
        assert!(matches!(check_csr(&bad), Err(PkiError::CsrBadSignature)));
        assert!(matches!(check_csr("hello"), Err(PkiError::CsrNotPem(_))));
        assert!(matches!(
            check_csr(&pem_encode("CERTIFICATE REQUEST", b"\x30\x03junk")),
            Err(PkiError::CsrNotDer(_))
        ));
    }

    #[test]
    fn rsa_key_is_pkcs1_and_certifiable() {
        let (ca, _) = Ca::generate("Test Root").unwrap();
        let (pem, spki) = generate_rsa_2048().unwrap();
        assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        let der = ca.issue(&spki, "AWS IoT Certificate", &[], false).unwrap();
        assert_eq!(cert_id(&der).len(), 64);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_unix(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil_from_unix(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil_from_unix(1_798_761_599), (2026, 12, 31, 23, 59, 59));
    }
}
