//! Crash harness for the state database (driven by `tests/slow/store-crash`).
//!
//! `write`  opens the store and prints `ready`, then saves and removes identity-shaped records
//!          (1–3 KB of JSON) for many subjects in a tight loop. Before each operation it prints
//!          `try <op> <subject> <seq>`; after the store call returned (acknowledged durable) it
//!          prints `ack <op> <subject> <seq> <micros>`. The driver kills it with SIGKILL at a
//!          random moment.
//! `verify` reopens the database and checks it against the state recorded by the previous verify
//!          plus the acknowledged operations of the killed run: every acknowledged record is there
//!          with exactly the acknowledged value (or the one operation in flight at the kill),
//!          every acknowledged removal stays removed, and every record decodes to the value its
//!          sequence number defines. Prints one JSON line of results and rewrites the state file.
//! `bench`  writes N subjects, then overwrites them, and prints save latency, on-disk size and RSS.
//!
//! `--engine store` is gatewayd's own `store::Store` (the shipped engine, redb); `--engine sled` is
//! the comparison baseline: the previous store's exact use of sled 0.34 (8 MiB cache, insert or
//! remove, then `Db::flush`).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use gatewayd::store::Store;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Shaped like the identity module's record; every field is derived from (subject, seq), so a
/// reader can tell the exact value a sequence number stands for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Rec {
    subject: String,
    seq: u64,
    stage: String,
    key_path: String,
    certificate_id: String,
    certificate_pem: String,
    ownership_token: String,
    thing_name: Option<String>,
    device_configuration: BTreeMap<String, String>,
    orphaned_certificates: Vec<String>,
}

fn make(subject: &str, seq: u64) -> Rec {
    let seed: [u8; 32] = Sha256::digest(format!("{subject}\0{seq}")).into();
    let mut rng = StdRng::from_seed(seed);
    let mut text = |n: usize| -> String {
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        (0..n).map(|_| B64[rng.gen_range(0..64)] as char).collect()
    };
    let certificate_id = hex::encode(Sha256::digest(seed));
    let pem_len = 600 + (seed[0] as usize * 4); // 600..1620 base64 chars
    let token_len = 200 + (seed[1] as usize * 3); // 200..965
    let body = text(pem_len);
    let certificate_pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        body.as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let ownership_token = text(token_len);
    let stage = [
        "KeyGenerated",
        "CertificateIssued",
        "ThingRegistered",
        "Active",
    ][seed[2] as usize % 4]
        .to_owned();
    let mut device_configuration = BTreeMap::new();
    for i in 0..(seed[3] % 4) {
        device_configuration.insert(format!("k{i}"), text(16));
    }
    let orphaned_certificates = (0..(seed[4] % 3))
        .map(|i| hex::encode(Sha256::digest([seed.as_slice(), &[i]].concat())))
        .collect();
    Rec {
        subject: subject.to_owned(),
        seq,
        stage,
        key_path: format!("identity/{subject}/private.key"),
        certificate_id,
        certificate_pem,
        ownership_token,
        thing_name: seed[5]
            .is_multiple_of(2)
            .then(|| format!("gw-{}", &text(12))),
        device_configuration,
        orphaned_certificates,
    }
}

fn subject_name(i: usize) -> String {
    if i == 0 {
        "gateway".to_owned()
    } else {
        format!("child:{i:04}")
    }
}

/// Every record by subject; a record that does not decode is an `Err`.
type Records = Vec<(String, Result<Rec, String>)>;

/// What the harness needs from an engine.
trait Engine {
    fn save(&self, subject: &str, rec: &Rec) -> Result<(), String>;
    fn remove(&self, subject: &str) -> Result<(), String>;
    /// Every record, sorted by subject.
    fn all(&self) -> Result<Records, String>;
}

impl Engine for Store {
    fn save(&self, subject: &str, rec: &Rec) -> Result<(), String> {
        self.save_identity(subject, rec).map_err(|e| e.to_string())
    }
    fn remove(&self, subject: &str) -> Result<(), String> {
        self.remove_identity(subject).map_err(|e| e.to_string())
    }
    fn all(&self) -> Result<Records, String> {
        let subjects = self.list_identities().map_err(|e| e.to_string())?;
        Ok(subjects
            .into_iter()
            .map(|s| {
                let r = match self.load_identity::<Rec>(&s) {
                    Ok(Some(r)) => Ok(r),
                    Ok(None) => Err("listed but not found".to_owned()),
                    Err(e) => Err(e.to_string()),
                };
                (s, r)
            })
            .collect())
    }
}

/// Comparison baseline: the previous store's exact use of sled 0.34 (8 MiB cache, insert or
/// remove, then `Db::flush`).
struct Sled {
    db: sled::Db,
    identities: sled::Tree,
}

impl Sled {
    fn open(dir: &Path) -> Result<Sled, String> {
        let db = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(8 * 1024 * 1024)
            .open()
            .map_err(|e| e.to_string())?;
        let identities = db.open_tree("identities").map_err(|e| e.to_string())?;
        Ok(Sled { db, identities })
    }
    fn flush(&self) -> Result<(), String> {
        self.db.flush().map(|_| ()).map_err(|e| e.to_string())
    }
}

impl Engine for Sled {
    fn save(&self, subject: &str, rec: &Rec) -> Result<(), String> {
        let bytes = serde_json::to_vec(rec).unwrap();
        self.identities
            .insert(subject, bytes)
            .map_err(|e| e.to_string())?;
        self.flush()
    }
    fn remove(&self, subject: &str) -> Result<(), String> {
        self.identities.remove(subject).map_err(|e| e.to_string())?;
        self.flush()
    }
    fn all(&self) -> Result<Records, String> {
        let mut out = Vec::new();
        for item in self.identities.iter() {
            let (k, v) = item.map_err(|e| e.to_string())?;
            let rec = serde_json::from_slice::<Rec>(&v).map_err(|e| e.to_string());
            out.push((String::from_utf8_lossy(&k).into_owned(), rec));
        }
        Ok(out)
    }
}

fn open(engine: &str, dir: &Path) -> Result<Box<dyn Engine>, String> {
    match engine {
        "store" => Ok(Box::new(Store::open(dir).map_err(|e| e.to_string())?)),
        "sled" => Ok(Box::new(Sled::open(dir)?)),
        other => Err(format!("unknown engine {other:?}")),
    }
}

struct Args {
    mode: String,
    engine: String,
    dir: PathBuf,
    log: Option<PathBuf>,
    state: Option<PathBuf>,
    seed: u64,
    seq_base: u64,
    subjects: usize,
    records: usize,
    overwrites: usize,
}

fn args() -> Args {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        mode: it.next().unwrap_or_default(),
        engine: "store".to_owned(),
        dir: PathBuf::new(),
        log: None,
        state: None,
        seed: 1,
        seq_base: 0,
        subjects: 64,
        records: 1000,
        overwrites: 10,
    };
    while let Some(k) = it.next() {
        let v = it
            .next()
            .unwrap_or_else(|| usage(&format!("{k} needs a value")));
        let num = || {
            v.parse::<u64>()
                .unwrap_or_else(|_| usage(&format!("{k}: not a number")))
        };
        match k.as_str() {
            "--engine" => a.engine = v.clone(),
            "--dir" => a.dir = v.clone().into(),
            "--log" => a.log = Some(v.clone().into()),
            "--state" => a.state = Some(v.clone().into()),
            "--seed" => a.seed = num(),
            "--seq-base" => a.seq_base = num(),
            "--subjects" => a.subjects = num() as usize,
            "--records" => a.records = num() as usize,
            "--overwrites" => a.overwrites = num() as usize,
            _ => usage(&format!("unknown option {k}")),
        }
    }
    if a.dir.as_os_str().is_empty() {
        usage("--dir is required");
    }
    a
}

fn usage(why: &str) -> ! {
    eprintln!(
        "store-torture: {why}\n\
         usage: store-torture write  --engine E --dir D [--seed N] [--seq-base N] [--subjects N]\n\
         \x20      store-torture verify --engine E --dir D --log RUN.log --state STATE.json\n\
         \x20      store-torture bench  --engine E --dir D [--records N] [--overwrites N]"
    );
    std::process::exit(2)
}

fn main() {
    let a = args();
    match a.mode.as_str() {
        "write" => write(&a),
        "verify" => verify(&a),
        "bench" => bench(&a),
        _ => usage("mode must be write, verify or bench"),
    }
}

fn write(a: &Args) {
    let db = open(&a.engine, &a.dir).unwrap_or_else(|e| {
        eprintln!("open: {e}");
        std::process::exit(1)
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").unwrap();
    let mut rng = StdRng::seed_from_u64(a.seed);
    let mut seq = a.seq_base;
    loop {
        seq += 1;
        let subject = subject_name(rng.gen_range(0..a.subjects));
        let remove = rng.gen_ratio(1, 20);
        let op = if remove { "remove" } else { "save" };
        writeln!(out, "try {op} {subject} {seq}").unwrap();
        let t = Instant::now();
        let r = if remove {
            db.remove(&subject)
        } else {
            db.save(&subject, &make(&subject, seq))
        };
        let micros = t.elapsed().as_micros();
        if let Err(e) = r {
            eprintln!("{op} {subject}: {e}");
            std::process::exit(1);
        }
        writeln!(out, "ack {op} {subject} {seq} {micros}").unwrap();
    }
}

/// One operation of a write run's log.
struct Op {
    acked: bool,
    remove: bool,
    subject: String,
    seq: u64,
}

fn read_log(path: &Path) -> Vec<Op> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut ops: Vec<Op> = Vec::new();
    // A line cut by the kill has no newline: ignore it.
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let op = Op {
            acked: f[0] == "ack",
            remove: f[1] == "remove",
            subject: f[2].to_owned(),
            seq: f[3].parse().unwrap_or(0),
        };
        if op.acked
            && let Some(last) = ops.last_mut()
            && last.seq == op.seq
        {
            last.acked = true;
            continue;
        }
        ops.push(op);
    }
    ops
}

fn verify(a: &Args) {
    let state_path = a
        .state
        .clone()
        .unwrap_or_else(|| usage("--state is required"));
    let log_path = a.log.clone().unwrap_or_else(|| usage("--log is required"));
    // subject -> seq of the value it must hold (absent: must be absent).
    let mut expected: BTreeMap<String, u64> = std::fs::read(&state_path)
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap_or_default();
    let ops = read_log(&log_path);
    let acks = ops.iter().filter(|o| o.acked).count();
    let mut in_flight: Option<&Op> = None;
    let mut removed = std::collections::BTreeSet::new();
    for op in &ops {
        if op.acked {
            if op.remove {
                removed.insert(op.subject.as_str());
                expected.remove(&op.subject);
            } else {
                expected.insert(op.subject.clone(), op.seq);
            }
        } else {
            in_flight = Some(op);
        }
    }

    let t = Instant::now();
    let opened = open(&a.engine, &a.dir);
    let open_ms = t.elapsed().as_secs_f64() * 1000.0;
    let db = match opened {
        Ok(db) => db,
        Err(e) => {
            report(false, open_ms, acks, 0, 0, 0, 0, &[format!("open: {e}")]);
            std::process::exit(1);
        }
    };
    let found = match db.all() {
        Ok(f) => f,
        Err(e) => {
            report(false, open_ms, acks, 0, 0, 0, 0, &[format!("read: {e}")]);
            std::process::exit(1);
        }
    };

    let (mut lost, mut corrupt, mut unexpected) = (0, 0, 0);
    let mut problems = Vec::new();
    let mut actual: BTreeMap<String, u64> = BTreeMap::new();
    for (subject, rec) in &found {
        match rec {
            Ok(r) if r.subject == *subject && *r == make(subject, r.seq) => {
                actual.insert(subject.clone(), r.seq);
            }
            Ok(r) => {
                corrupt += 1;
                problems.push(format!(
                    "{subject}: value is not the one seq {} defines",
                    r.seq
                ));
            }
            Err(e) => {
                corrupt += 1;
                problems.push(format!("{subject}: {e}"));
            }
        }
    }
    let subjects: std::collections::BTreeSet<&String> =
        expected.keys().chain(actual.keys()).collect();
    for subject in &subjects {
        let want = expected.get(*subject).copied();
        let got = actual.get(*subject).copied();
        if want == got {
            continue;
        }
        // The operation in flight at the kill may or may not have landed.
        if let Some(op) = in_flight
            && op.subject == **subject
            && got == (!op.remove).then_some(op.seq)
        {
            continue;
        }
        if found.iter().any(|(s, r)| s == *subject && r.is_err()) {
            continue; // already counted as corrupt
        }
        match (want, got) {
            (Some(w), None) => {
                lost += 1;
                problems.push(format!("{subject}: acknowledged seq {w} is missing"));
            }
            (Some(w), Some(g)) if g < w => {
                lost += 1;
                problems.push(format!(
                    "{subject}: acknowledged seq {w}, found older seq {g}"
                ));
            }
            (None, Some(g)) if removed.contains(subject.as_str()) => {
                lost += 1;
                problems.push(format!(
                    "{subject}: acknowledged removal undone, found seq {g}"
                ));
            }
            (w, g) => {
                unexpected += 1;
                problems.push(format!("{subject}: expected {w:?}, found {g:?}"));
            }
        }
    }
    std::fs::write(&state_path, serde_json::to_vec(&actual).unwrap()).unwrap();
    let ok = lost == 0 && corrupt == 0 && unexpected == 0;
    report(
        true,
        open_ms,
        acks,
        subjects.len(),
        lost,
        corrupt,
        unexpected,
        &problems,
    );
    std::process::exit(if ok { 0 } else { 1 });
}

#[allow(clippy::too_many_arguments)]
fn report(
    opened: bool,
    open_ms: f64,
    acks: usize,
    subjects: usize,
    lost: usize,
    corrupt: usize,
    unexpected: usize,
    problems: &[String],
) {
    let line = serde_json::json!({
        "opened": opened,
        "open_ms": open_ms,
        "acks": acks,
        "subjects": subjects,
        "lost": lost,
        "corrupt": corrupt,
        "unexpected": unexpected,
        "problems": problems.iter().take(10).collect::<Vec<_>>(),
    });
    println!("{line}");
}

fn bench(a: &Args) {
    std::fs::create_dir_all(&a.dir).unwrap();
    let db = open(&a.engine, &a.dir).unwrap();
    let mut lat = Vec::new();
    let mut bytes = 0usize;
    let mut seq = 0;
    for _round in 0..=a.overwrites {
        for i in 0..a.records {
            seq += 1;
            let subject = subject_name(i);
            let rec = make(&subject, seq);
            bytes += serde_json::to_vec(&rec).unwrap().len();
            let t = Instant::now();
            db.save(&subject, &rec).unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let listed = db.all().unwrap();
    assert_eq!(listed.len(), a.records);
    assert!(listed.iter().all(|(_, r)| r.is_ok()));
    let (rss_kib, hwm_kib) = rss();
    drop(db);
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    let line = serde_json::json!({
        "engine": a.engine,
        "records": a.records,
        "saves": lat.len(),
        "avg_record_bytes": bytes / lat.len(),
        "save_ms_median": pct(0.5),
        "save_ms_p99": pct(0.99),
        "disk_bytes": disk_usage(&a.dir),
        "rss_kib": rss_kib,
        "rss_peak_kib": hwm_kib,
    });
    println!("{line}");
}

/// Allocated bytes (st_blocks * 512) of every file under `dir`.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        total += if meta.is_dir() {
            disk_usage(&entry.path())
        } else {
            meta.blocks() * 512
        };
    }
    total
}

/// (VmRSS, VmHWM) in KiB.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
