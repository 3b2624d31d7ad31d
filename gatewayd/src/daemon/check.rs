//! Check: offline checks of what the configuration points at, as the daemon's own user would see
//! it: the root CA, the claim or pre-installed certificate and key (readable, parseable, a pair,
//! not expired), and the serial-number source (the file is readable and not empty, the command
//! succeeds). `gatewayd check-config` reports every problem, one line each, naming the key and the
//! file that set it; `gatewayd run` refuses to start on the same problems (the claim only while
//! the gateway still needs it).
//!
//! Who reads: the current user, or, given a user name (`check-config --user gatewayd`, and by
//! default when root runs it and a `gatewayd` user exists), that user: then permissions are
//! judged from owner, group and mode bits of the file and of every directory above it (POSIX
//! ACLs are not read), while the contents are read with the caller's rights.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::config::{Config, ConfigError, ProvisioningMode};

/// Whose permissions the checks apply.
#[derive(Debug, Clone)]
pub struct Reader {
    pub name: String,
    uid: u32,
    gids: Vec<u32>,
    /// The checking process itself: reading is the test, no mode arithmetic.
    is_self: bool,
}

impl Reader {
    /// The user running this process.
    pub fn current() -> Reader {
        // The owner of /proc/self is the process's effective uid (no libc call needed).
        let uid = std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(0);
        let name = passwd()
            .into_iter()
            .find(|(_, u, _)| *u == uid)
            .map(|(n, _, _)| n)
            .unwrap_or_else(|| uid.to_string());
        Reader {
            name,
            uid,
            gids: Vec::new(),
            is_self: true,
        }
    }

    /// A named system user, from /etc/passwd and /etc/group.
    pub fn user(name: &str) -> Result<Reader, String> {
        let (_, uid, gid) = passwd()
            .into_iter()
            .find(|(n, _, _)| n == name)
            .ok_or_else(|| format!("no user `{name}` in /etc/passwd"))?;
        let mut gids = vec![gid];
        if let Ok(text) = std::fs::read_to_string("/etc/group") {
            for line in text.lines() {
                let f: Vec<&str> = line.split(':').collect();
                if f.len() >= 4
                    && f[3].split(',').any(|m| m == name)
                    && let Ok(g) = f[2].parse()
                {
                    gids.push(g);
                }
            }
        }
        let is_self = Reader::current().uid == uid;
        Ok(Reader {
            name: name.to_owned(),
            uid,
            gids,
            is_self,
        })
    }

    /// The reader `check-config` uses by default: root checks as the `gatewayd` service user
    /// when it exists (that is who reads the files under systemd), anyone else as themselves.
    pub fn default_for_check() -> Reader {
        let me = Reader::current();
        if me.uid == 0
            && let Ok(service) = Reader::user("gatewayd")
        {
            return service;
        }
        me
    }

    /// Whether the mode bits let this reader have `want` (4 read, 1 search) on `m`.
    fn allowed(&self, m: &std::fs::Metadata, want: u32) -> bool {
        if self.uid == 0 {
            return true;
        }
        let mode = m.permissions().mode();
        let bits = if m.uid() == self.uid {
            mode >> 6
        } else if self.gids.contains(&m.gid()) {
            mode >> 3
        } else {
            mode
        };
        bits & want == want
    }

    /// Reads `path` as this reader would, with a plain-words error.
    fn read(&self, path: &Path) -> Result<Vec<u8>, String> {
        let meta = std::fs::metadata(path).map_err(|e| io_words(path, &e))?;
        if meta.is_dir() {
            return Err(format!("{} is a directory, not a file", path.display()));
        }
        if !self.is_self {
            for dir in path
                .ancestors()
                .skip(1)
                .filter(|d| !d.as_os_str().is_empty())
            {
                if let Ok(m) = std::fs::metadata(dir)
                    && !self.allowed(&m, 1)
                {
                    return Err(format!(
                        "{}: user `{}` cannot enter directory {} (mode {:o})",
                        path.display(),
                        self.name,
                        dir.display(),
                        m.permissions().mode() & 0o7777
                    ));
                }
            }
            if !self.allowed(&meta, 4) {
                return Err(format!(
                    "{}: user `{}` cannot read it (owner {}, group {}, mode {:o})",
                    path.display(),
                    self.name,
                    meta.uid(),
                    meta.gid(),
                    meta.permissions().mode() & 0o7777
                ));
            }
        }
        std::fs::read(path).map_err(|e| io_words(path, &e))
    }
}

/// (name, uid, gid) of every /etc/passwd entry.
fn passwd() -> Vec<(String, u32, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((
                f.first()?.to_string(),
                f.get(2)?.parse().ok()?,
                f.get(3)?.parse().ok()?,
            ))
        })
        .collect()
}

/// An I/O error in plain words, without the OS error number.
fn io_words(path: &Path, e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    let what = match e.kind() {
        NotFound => "does not exist".to_owned(),
        PermissionDenied => "permission denied".to_owned(),
        IsADirectory => "is a directory, not a file".to_owned(),
        _ => {
            let s = e.to_string();
            s.split(" (os error").next().unwrap_or(&s).to_owned()
        }
    };
    format!("{} {what}", path.display())
}

/// One parsed certificate file: the DER chain and the first certificate's validity.
struct Certs {
    chain: Vec<CertificateDer<'static>>,
    not_after: i64,
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Certs, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    let first = chain
        .first()
        .ok_or_else(|| format!("{} holds no PEM certificate", path.display()))?;
    let mut not_after = i64::MAX;
    for (i, der) in chain.iter().enumerate() {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
            format!(
                "{}: certificate {} is not a valid X.509 certificate: {e}",
                path.display(),
                i + 1
            )
        })?;
        if std::ptr::eq(der, first) {
            not_after = cert.validity().not_after.timestamp();
        }
    }
    Ok(Certs { chain, not_after })
}

fn expired(path: &Path, not_after: i64, now: i64) -> Result<(), String> {
    if not_after < now {
        let when = x509_parser::time::ASN1Time::from_timestamp(not_after)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| not_after.to_string());
        return Err(format!("{} expired on {when}", path.display()));
    }
    Ok(())
}

/// A certificate and key file pair: both readable and parseable, the key the certificate's.
fn check_pair(
    reader: &Reader,
    cert: &Path,
    key: &Path,
    now: i64,
) -> (Result<(), String>, Result<(), String>) {
    let certs = reader
        .read(cert)
        .and_then(|pem| parse_certs(cert, &pem))
        .and_then(|c| expired(cert, c.not_after, now).map(|()| c));
    let signing = reader.read(key).and_then(|pem| {
        let der = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| format!("{} holds no usable private key: {e}", key.display()))?;
        rustls::crypto::ring::sign::any_supported_type(&der)
            .map_err(|e| format!("{}: unsupported private key: {e}", key.display()))
    });
    match (certs, signing) {
        (Ok(c), Ok(k)) => {
            let pair = rustls::sign::CertifiedKey::new(c.chain, k);
            let r = match pair.keys_match() {
                Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                    Err(format!(
                        "{} is not the private key of {} (they are not a pair)",
                        key.display(),
                        cert.display()
                    ))
                }
                _ => Ok(()),
            };
            (Ok(()), r)
        }
        (c, k) => (c.map(|_| ()), k.map(|_| ())),
    }
}

/// Runs the serial-number command as the daemon would (`/bin/sh -c`, 10 s).
fn run_serial_command(cmd: &str) -> Result<(), String> {
    let mut child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("`{cmd}` cannot be started: {e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("`{cmd}` took over 10 s"));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("`{cmd}`: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        return Err(format!(
            "`{cmd}` failed ({}){}",
            out.status,
            if err.is_empty() {
                String::new()
            } else {
                format!(": {err}")
            }
        ));
    }
    if trim_serial(&out.stdout).is_empty() {
        return Err(format!("`{cmd}` printed no serial number"));
    }
    Ok(())
}

/// Device-tree strings end in NUL; commands in newlines.
pub fn trim_serial(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .trim_matches(|c: char| c.is_whitespace() || c == '\0')
        .to_owned()
}

/// What `check` looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything configured (`check-config`).
    All,
    /// What a provisioned gateway still needs (`run` after its thing is registered): the claim
    /// and the serial source are no longer read.
    Provisioned,
}

/// Every problem found, one error per key.
pub fn check(config: &Config, reader: &Reader, scope: Scope) -> Vec<ConfigError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut errors = Vec::new();
    let mut report = |key: &str, r: Result<(), String>| {
        if let Err(m) = r {
            errors.push(config.key_error(key, m));
        }
    };
    let ca = &config.cloud.root_ca;
    report(
        "cloud.root_ca",
        reader
            .read(ca)
            .and_then(|pem| parse_certs(ca, &pem))
            .and_then(|c| expired(ca, c.not_after, now)),
    );
    let p = &config.provisioning;
    let provisioning = scope == Scope::All;
    if provisioning
        && matches!(p.mode, ProvisioningMode::Csr | ProvisioningMode::CreateKeys)
        && let (Some(cert), Some(key)) = (&p.claim_cert, &p.claim_key)
    {
        let (c, k) = check_pair(reader, cert, key, now);
        report("provisioning.claim_cert", c);
        report("provisioning.claim_key", k);
    }
    if p.mode == ProvisioningMode::Preinstalled
        && let Some(pre) = &p.preinstalled
    {
        let (c, k) = check_pair(reader, &pre.cert, &pre.key, now);
        report("provisioning.preinstalled.cert", c);
        report("provisioning.preinstalled.key", k);
    }
    if provisioning && let Some(src) = &p.serial {
        if let Some(f) = &src.file {
            report(
                "provisioning.serial.file",
                reader.read(f).and_then(|b| {
                    if trim_serial(&b).is_empty() {
                        Err(format!("{} holds no serial number (empty)", f.display()))
                    } else {
                        Ok(())
                    }
                }),
            );
        }
        if let Some(cmd) = &src.command {
            report("provisioning.serial.command", run_serial_command(cmd));
        }
        if let Some(v) = &src.value
            && v.trim().is_empty()
        {
            report("provisioning.serial.value", Err("is empty".into()));
        }
    }
    let l = &config.local;
    if let (Some(cert), Some(key)) = (&l.cert, &l.key) {
        let (c, k) = check_pair(reader, cert, key, now);
        report("local.cert", c);
        report("local.key", k);
    }
    if let Some(f) = &l.onboarding_password_file {
        report(
            "local.onboarding_password_file",
            reader.read(f).and_then(|b| {
                if b.trim_ascii().is_empty() {
                    Err(format!("{} holds no password (empty)", f.display()))
                } else {
                    Ok(())
                }
            }),
        );
    }
    errors
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::daemon::config::load;

    struct Pki {
        cert: String,
        key: String,
    }

    fn pki(expired: bool) -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["claim".to_owned()]).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.self_signed(&key).unwrap();
        Pki {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A config whose files live in `d`; `files` overrides what is written there.
    fn setup(d: &Path, files: &[(&str, Option<&[u8]>)], extra: &str) -> Config {
        let good = pki(false);
        let other = pki(false);
        let defaults: Vec<(&str, Vec<u8>)> = vec![
            ("ca.pem", good.cert.clone().into_bytes()),
            ("claim.pem", good.cert.clone().into_bytes()),
            ("claim.key", good.key.clone().into_bytes()),
            ("other.key", other.key.clone().into_bytes()),
            ("serial", b"0001\n".to_vec()),
        ];
        for (name, body) in defaults {
            std::fs::write(d.join(name), body).unwrap();
        }
        for (name, body) in files {
            let p = d.join(name);
            let _ = std::fs::remove_file(&p);
            if let Some(b) = body {
                std::fs::write(&p, b).unwrap();
            }
        }
        let main = d.join("gatewayd.toml");
        std::fs::write(
            &main,
            format!(
                "[cloud]\nendpoint = \"e\"\nroot_ca = \"{0}/ca.pem\"\n[provisioning]\ntemplate = \"T\"\n\
                 claim_cert = \"{0}/claim.pem\"\nclaim_key = \"{0}/claim.key\"\n{extra}",
                d.display()
            ),
        )
        .unwrap();
        load(&main).unwrap()
    }

    fn problems(c: &Config, reader: &Reader) -> Vec<String> {
        check(c, reader, Scope::All)
            .into_iter()
            .map(|e| e.to_string())
            .collect()
    }

    /// Every broken-file case: (what is broken, files, extra config, key named, words in the line).
    #[test]
    fn every_broken_file_is_one_line_naming_key_file_and_problem() {
        let expired = pki(true);
        let garbage_pem =
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec();
        type Case<'a> = (
            &'a str,
            Vec<(&'a str, Option<&'a [u8]>)>,
            &'a str,
            &'a str,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                "CA garbage",
                vec![("ca.pem", Some(b"hello"))],
                "",
                "cloud.root_ca",
                "holds no PEM certificate",
            ),
            (
                "CA missing",
                vec![("ca.pem", None)],
                "",
                "cloud.root_ca",
                "ca.pem does not exist",
            ),
            (
                "CA not X.509",
                vec![("ca.pem", Some(&garbage_pem))],
                "",
                "cloud.root_ca",
                "not a valid X.509",
            ),
            (
                "claim missing",
                vec![("claim.pem", None)],
                "",
                "provisioning.claim_cert",
                "claim.pem does not exist",
            ),
            (
                "claim garbage",
                vec![("claim.pem", Some(b"xx"))],
                "",
                "provisioning.claim_cert",
                "holds no PEM certificate",
            ),
            (
                "key missing",
                vec![("claim.key", None)],
                "",
                "provisioning.claim_key",
                "claim.key does not exist",
            ),
            (
                "key garbage",
                vec![(
                    "claim.key",
                    Some(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
                )],
                "",
                "provisioning.claim_key",
                "unsupported private key",
            ),
            (
                "key empty",
                vec![("claim.key", Some(b""))],
                "",
                "provisioning.claim_key",
                "no usable private key",
            ),
            (
                "claim expired",
                vec![
                    ("claim.pem", Some(expired.cert.as_bytes())),
                    ("claim.key", Some(expired.key.as_bytes())),
                ],
                "",
                "provisioning.claim_cert",
                "expired on",
            ),
            (
                "serial file missing",
                vec![("serial", None)],
                "[provisioning.serial]\nfile = \"DIR/serial\"\n",
                "provisioning.serial.file",
                "serial does not exist",
            ),
            (
                "serial file empty",
                vec![("serial", Some(b"\0\n"))],
                "[provisioning.serial]\nfile = \"DIR/serial\"\n",
                "provisioning.serial.file",
                "holds no serial number",
            ),
            (
                "serial command fails",
                vec![],
                "[provisioning.serial]\ncommand = \"echo nope >&2; exit 3\"\n",
                "provisioning.serial.command",
                "failed (exit status: 3): nope",
            ),
            (
                "serial command silent",
                vec![],
                "[provisioning.serial]\ncommand = \"true\"\n",
                "provisioning.serial.command",
                "printed no serial number",
            ),
        ];
        for (what, files, extra, key, words) in cases {
            let d = tempfile::tempdir().unwrap();
            let extra = extra.replace("DIR", &d.path().display().to_string());
            let c = setup(d.path(), &files, &extra);
            let p = problems(&c, &Reader::current());
            assert_eq!(p.len(), 1, "{what}: {p:?}");
            assert!(p[0].contains(&format!("key `{key}`")), "{what}: {p:?}");
            assert!(p[0].contains("gatewayd.toml"), "{what}: {p:?}");
            assert!(p[0].contains(words), "{what}: {p:?}");
            assert!(!p[0].contains("os error"), "{what}: {p:?}");
        }
        // The pair check itself: a valid key that belongs to another certificate.
        let d = tempfile::tempdir().unwrap();
        let c = setup(d.path(), &[], "");
        assert!(problems(&c, &Reader::current()).is_empty());
        std::fs::copy(d.path().join("other.key"), d.path().join("claim.key")).unwrap();
        let p = problems(&c, &Reader::current());
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("is not the private key of"), "{p:?}");
        // A directory where a file belongs.
        std::fs::remove_file(d.path().join("ca.pem")).unwrap();
        std::fs::create_dir(d.path().join("ca.pem")).unwrap();
        let p = problems(&c, &Reader::current());
        assert!(p[0].contains("is a directory"), "{p:?}");
    }

    #[test]
    fn files_are_judged_as_the_service_user_would_read_them() {
        let d = tempfile::tempdir().unwrap();
        let c = setup(d.path(), &[], "");
        let service = Reader {
            name: "gatewayd".into(),
            uid: 64_000,
            gids: vec![64_000],
            is_self: false,
        };
        let mode = |name: &str, m: u32| {
            std::fs::set_permissions(d.path().join(name), std::fs::Permissions::from_mode(m))
                .unwrap()
        };
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in ["ca.pem", "claim.pem", "claim.key"] {
            mode(f, 0o644);
        }
        assert!(problems(&c, &service).is_empty());
        // Owned by someone else, not readable by others: the service user cannot read the key.
        mode("claim.key", 0o600);
        let p = problems(&c, &service);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("key `provisioning.claim_key`"), "{p:?}");
        assert!(p[0].contains("user `gatewayd` cannot read it"), "{p:?}");
        // A directory it cannot enter hides everything below it.
        mode("claim.key", 0o644);
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let p = problems(&c, &service);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p.iter().all(|l| l.contains("cannot enter directory")),
            "{p:?}"
        );
    }

    #[test]
    fn a_value_from_a_dropin_names_the_dropin() {
        let d = tempfile::tempdir().unwrap();
        let _ = setup(d.path(), &[], "");
        std::fs::create_dir(d.path().join("conf.d")).unwrap();
        std::fs::write(d.path().join("bad-ca.pem"), "not a certificate").unwrap();
        std::fs::write(
            d.path().join("conf.d/10-site.toml"),
            format!("[cloud]\nroot_ca = \"{}/bad-ca.pem\"\n", d.path().display()),
        )
        .unwrap();
        let c = load(&d.path().join("gatewayd.toml")).unwrap();
        let p = problems(&c, &Reader::current());
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("10-site.toml: key `cloud.root_ca`"), "{p:?}");
    }

    #[test]
    fn log_levels_that_are_no_level_are_refused() {
        for ok in [
            "info",
            "WARN",
            "gatewayd=debug,info",
            "off",
            "gatewayd::cloud=trace",
        ] {
            assert!(crate::daemon::config::check_log_level(ok).is_ok(), "{ok}");
        }
        for (bad, words) in [
            ("warning", "did you mean `warn`"),
            ("", "is empty"),
            ("loud", "`loud` is not a log level"),
            ("gatewayd=warning", "did you mean `warn`"),
            ("=info", "names no target"),
        ] {
            let e = crate::daemon::config::check_log_level(bad).unwrap_err();
            assert!(e.contains(words), "{bad}: {e}");
        }
    }
}
