//! Outbox figures, each beside a baseline measured in the same run:
//! - durable append throughput and p50/p99 latency for 1, 10 and 100 concurrent appenders:
//!   the outbox (group commit), the outbox with `max_batch = 1` (one sync per append),
//!   redb 4 (one `Durability::Immediate` write transaction per append), sled 0.34 (insert +
//!   `flush()` per append);
//! - disk bytes per entry for the same entries in each engine;
//! - reopen time (and resident memory) with 1,000,000 small entries, page cache warm and with
//!   the segment files' pages dropped (`dd iflag=nocache`).
//!
//! `outbox_bench [--secs S] [--reopen-entries N] [--dir D] [--engines outbox,nogroup,redb,sled]
//! [--tasks 1,10,100]` (release build: `tests/bench/outbox`); `--reopen-entries 0` skips the
//! reopen part.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatewayd::outbox::{Outbox, OutboxOptions};

const PAYLOAD: usize = 200;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn payload(i: u64) -> Vec<u8> {
    let mut p = format!("{{\"seq\":{i},\"v\":").into_bytes();
    p.resize(PAYLOAD - 1, b'7');
    p.push(b'}');
    p
}

/// (apparent bytes, allocated bytes) of every file under `dir`.
fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        if m.is_dir() {
            let (a, b) = disk_usage(&e.path());
            total.0 += a;
            total.1 += b;
        } else {
            total.0 += m.len();
            total.1 += m.blocks() * 512;
        }
    }
    total
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

struct Run {
    appends: u64,
    secs: f64,
    lat_us: Vec<u32>,
    syncs: Option<u64>,
    bytes_per_entry: (f64, f64),
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

#[derive(Clone, Copy, Debug)]
enum Engine {
    Outbox,
    OutboxNoGroup,
    Redb,
    Sled,
}

impl Engine {
    fn label(self) -> &'static str {
        match self {
            Engine::Outbox => "outbox (group commit)",
            Engine::OutboxNoGroup => "outbox, max_batch=1",
            Engine::Redb => "redb, 1 txn/append",
            Engine::Sled => "sled, flush/append",
        }
    }
}

fn run_outbox(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    conc: usize,
    secs: f64,
    max_batch: usize,
) -> Run {
    rt.block_on(async {
        let ob = Outbox::open(
            dir,
            OutboxOptions {
                max_batch,
                ..OutboxOptions::default()
            },
        )
        .await
        .unwrap();
        let syncs0 = ob.stats().syncs;
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for t in 0..conc {
            let ob = ob.clone();
            set.spawn(async move {
                let child = format!("c{t}");
                let mut lat = Vec::new();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let p = payload(i);
                    let t0 = Instant::now();
                    ob.append(&child, "dt/gw/telemetry", 1, &p).await.unwrap();
                    lat.push(t0.elapsed().as_micros() as u32);
                    i += 1;
                }
                lat
            });
        }
        let mut lat_us = Vec::new();
        while let Some(l) = set.join_next().await {
            lat_us.extend(l.unwrap());
        }
        let secs = start.elapsed().as_secs_f64();
        let s = ob.stats();
        ob.close().await.unwrap();
        let (a, b) = disk_usage(dir);
        Run {
            appends: lat_us.len() as u64,
            secs,
            lat_us,
            syncs: Some(s.syncs - syncs0),
            bytes_per_entry: (a as f64 / s.entries as f64, b as f64 / s.entries as f64),
        }
    })
}

fn run_threads(
    conc: usize,
    secs: f64,
    op: Arc<dyn Fn(usize, u64) + Send + Sync>,
) -> (u64, f64, Vec<u32>) {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let lat: Vec<Vec<u32>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..conc)
            .map(|t| {
                let op = op.clone();
                s.spawn(move || {
                    let mut lat = Vec::new();
                    let mut i = 0u64;
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        op(t, i);
                        lat.push(t0.elapsed().as_micros() as u32);
                        i += 1;
                    }
                    lat
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let lat: Vec<u32> = lat.into_iter().flatten().collect();
    (lat.len() as u64, start.elapsed().as_secs_f64(), lat)
}

const TABLE: redb::TableDefinition<(u64, u64), &[u8]> = redb::TableDefinition::new("outbox");

fn run_redb(dir: &Path, conc: usize, secs: f64) -> Run {
    std::fs::create_dir_all(dir).unwrap();
    let db = Arc::new(redb::Database::create(dir.join("db.redb")).unwrap());
    let d = db.clone();
    let (appends, secs, lat_us) = run_threads(
        conc,
        secs,
        Arc::new(move |t, i| {
            let tx = d.begin_write().unwrap(); // default durability: Immediate
            {
                let mut table = tx.open_table(TABLE).unwrap();
                table.insert((t as u64, i), payload(i).as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }),
    );
    drop(db);
    let (a, b) = disk_usage(dir);
    Run {
        appends,
        secs,
        lat_us,
        syncs: None,
        bytes_per_entry: (a as f64 / appends as f64, b as f64 / appends as f64),
    }
}

fn run_sled(dir: &Path, conc: usize, secs: f64) -> Run {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(8 << 20)
        .open()
        .unwrap();
    let d = db.clone();
    let (appends, secs, lat_us) = run_threads(
        conc,
        secs,
        Arc::new(move |t, i| {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&(t as u64).to_be_bytes());
            key[8..].copy_from_slice(&i.to_be_bytes());
            d.insert(key, payload(i)).unwrap();
            d.flush().unwrap();
        }),
    );
    drop(db);
    let (a, b) = disk_usage(dir);
    Run {
        appends,
        secs,
        lat_us,
        syncs: None,
        bytes_per_entry: (a as f64 / appends as f64, b as f64 / appends as f64),
    }
}

fn drop_page_cache(dir: &Path) -> bool {
    let mut ok = true;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let r = std::process::Command::new("dd")
            .arg(format!("if={}", p.display()))
            .args(["iflag=nocache", "count=0", "status=none"])
            .status();
        ok &= r.is_ok_and(|s| s.success());
    }
    ok
}

fn main() {
    let secs: f64 = arg("--secs").map_or(3.0, |v| v.parse().unwrap());
    let reopen_entries: u64 = arg("--reopen-entries").map_or(1_000_000, |v| v.parse().unwrap());
    let tmp =
        tempfile::tempdir_in(arg("--dir").map_or_else(std::env::temp_dir, PathBuf::from)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "durable appends of {PAYLOAD}-byte payloads, {secs} s per cell, directory {}",
        tmp.path().display()
    );
    println!(
        "{:<24} {:>5} {:>10} {:>9} {:>9} {:>12} {:>14}",
        "engine", "tasks", "appends/s", "p50 ms", "p99 ms", "syncs/append", "disk B/entry"
    );
    let engines = arg("--engines").unwrap_or_else(|| "outbox,nogroup,redb,sled".into());
    let tasks = arg("--tasks").unwrap_or_else(|| "1,10,100".into());
    for conc in tasks.split(',').map(|t| t.parse::<usize>().unwrap()) {
        for engine in engines.split(',') {
            let engine = match engine {
                "outbox" => Engine::Outbox,
                "nogroup" => Engine::OutboxNoGroup,
                "redb" => Engine::Redb,
                "sled" => Engine::Sled,
                other => panic!("unknown engine {other}"),
            };
            let dir = tmp.path().join(format!("{engine:?}-{conc}"));
            let mut r = match engine {
                Engine::Outbox => run_outbox(&rt, &dir, conc, secs, 1024),
                Engine::OutboxNoGroup => run_outbox(&rt, &dir, conc, secs, 1),
                Engine::Redb => run_redb(&dir, conc, secs),
                Engine::Sled => run_sled(&dir, conc, secs),
            };
            r.lat_us.sort_unstable();
            println!(
                "{:<24} {:>5} {:>10.0} {:>9.2} {:>9.2} {:>12} {:>7.0} ({:.0})",
                engine.label(),
                conc,
                r.appends as f64 / r.secs,
                pct(&r.lat_us, 0.50),
                pct(&r.lat_us, 0.99),
                r.syncs.map_or("-".to_string(), |s| format!(
                    "{:.3}",
                    s as f64 / r.appends as f64
                )),
                r.bytes_per_entry.0,
                r.bytes_per_entry.1,
            );
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
    println!(
        "(disk B/entry: apparent size of the files / entries stored, allocated blocks in brackets)"
    );

    if reopen_entries == 0 {
        return;
    }
    // Reopen with a large backlog.
    let dir = tmp.path().join("reopen");
    let small = |i: u64| format!("{{\"t\":{i}}}").into_bytes();
    let fill = Instant::now();
    rt.block_on(async {
        let ob = Outbox::open(&dir, OutboxOptions::default()).await.unwrap();
        let tasks = 1000u64;
        let mut set = tokio::task::JoinSet::new();
        for t in 0..tasks {
            let ob = ob.clone();
            set.spawn(async move {
                let child = format!("child-{:03}", t % 100);
                let topic = format!("dt/gw/{child}/telemetry");
                let mut i = t;
                while i < reopen_entries {
                    ob.append(&child, &topic, 1, &small(i)).await.unwrap();
                    i += tasks;
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
        let s = ob.stats();
        println!(
            "\nfilled {} entries (100 children, payload ~12 B) in {:.1} s: {} segments, {} bytes on disk = {:.1} B/entry, {:.0} appends/sync",
            s.entries,
            fill.elapsed().as_secs_f64(),
            s.segments,
            s.disk_bytes,
            s.disk_bytes as f64 / s.entries as f64,
            s.appended as f64 / s.syncs as f64,
        );
        ob.close().await.unwrap();
    });
    for cold in [false, true, false, true, false, true] {
        let dropped = cold && drop_page_cache(&dir);
        if cold && !dropped {
            println!("reopen (cold): could not drop the page cache with dd; skipped");
            continue;
        }
        let rss0 = rss_kib();
        let t0 = Instant::now();
        rt.block_on(async {
            let ob = Outbox::open(&dir, OutboxOptions::default()).await.unwrap();
            let open = t0.elapsed();
            let s = ob.stats();
            let rss = rss_kib().saturating_sub(rss0);
            let t1 = Instant::now();
            let first = ob.take(100).await.unwrap();
            println!(
                "reopen ({}): {} entries in {:.0} ms (RSS +{} MiB), first take of {} in {:.1} ms",
                if cold {
                    "segment pages dropped"
                } else {
                    "page cache warm"
                },
                s.recovery.entries,
                open.as_secs_f64() * 1000.0,
                rss / 1024,
                first.len(),
                t1.elapsed().as_secs_f64() * 1000.0,
            );
            ob.release_all();
            ob.close().await.unwrap();
        });
    }
}
