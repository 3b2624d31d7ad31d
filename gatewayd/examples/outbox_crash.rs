//! Kill -9 harness for the outbox.
//!
//! `outbox_crash [--iterations N] [--max-secs S] [--tasks T] [--seed X] [--dir D]`
//!
//! Each iteration starts this program again as a child (`child` mode) on the same directory.
//! The child appends from T concurrent tasks (one child id each, payloads of random size) and
//! prints `A <seq> <task> <run> <counter>` after each `append` returned (acknowledged), while a
//! bridge task takes entries, acks some (printing `I <seq>` before `ack_many` and `K <seq>`
//! after it returned) and releases others. The parent SIGKILLs it at a random moment (possibly during open), reopens
//! the directory and checks:
//! - the store opens (repairs are counted, never an error);
//! - every acknowledged entry that was not acked is present, exactly once, with its payload;
//! - no acked entry comes back;
//! - entries of one child are in append order.
//!
//! Then it acks a random half of what it saw, keeps the rest (they must survive the next
//! iterations too) and goes on. It exits 1 on any violation.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gatewayd::outbox::{Outbox, OutboxOptions, Seq};
use rand::{Rng, SeedableRng};

fn options() -> OutboxOptions {
    OutboxOptions {
        // Small segments, so rolls and whole-segment deletion happen often.
        segment_bytes: 256 << 10,
        ..OutboxOptions::default()
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        child(&args);
        return;
    }
    std::process::exit(parent(&args));
}

fn child(args: &[String]) {
    let dir = PathBuf::from(arg(args, "--dir").unwrap());
    let tasks: usize = arg(args, "--tasks").unwrap().parse().unwrap();
    let run: u64 = arg(args, "--run").unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let ob = Outbox::open(&dir, options()).await.unwrap();
        let mut set = tokio::task::JoinSet::new();
        for task in 0..tasks {
            let ob = ob.clone();
            set.spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(run * 1000 + task as u64);
                let child = format!("t{task}");
                for counter in 0u64.. {
                    let mut payload = format!("{run}:{task}:{counter}:").into_bytes();
                    let filler = rng.gen_range(0..3000);
                    payload.resize(payload.len() + filler, b'x');
                    let seq = ob.append(&child, "dt/crash", 1, &payload).await.unwrap();
                    // One write per line (stdout is line-buffered): a line seen by the parent
                    // was printed after `append` returned.
                    println!("A {seq} {task} {run} {counter}");
                }
            });
        }
        set.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(run);
            loop {
                ob.wait_pending().await;
                let got = ob.take(64).await.unwrap();
                let (ack, rest): (Vec<Seq>, Vec<Seq>) =
                    got.iter().map(|e| e.seq).partition(|_| rng.gen_bool(0.5));
                // Announced before the ack: after a kill here, these may or may not be gone.
                {
                    let mut out = std::io::stdout().lock();
                    for s in &ack {
                        writeln!(out, "I {s}").unwrap();
                    }
                }
                ob.ack_many(&ack).await.unwrap();
                {
                    let mut out = std::io::stdout().lock();
                    for s in &ack {
                        writeln!(out, "K {s}").unwrap();
                    }
                }
                ob.release(&rest);
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..5))).await;
            }
        });
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    });
}

#[derive(Default)]
struct Totals {
    acknowledged: u64,
    acked_by_child: u64,
    acked_by_parent: u64,
    checked_max: usize,
    truncated_tails: u64,
    corrupt_regions: u64,
    quarantined: u64,
    max_open_ms: u64,
    failures: u64,
}

fn parent(args: &[String]) -> i32 {
    let iterations: u64 = arg(args, "--iterations").map_or(300, |v| v.parse().unwrap());
    let max_secs: u64 = arg(args, "--max-secs").map_or(60, |v| v.parse().unwrap());
    let tasks: usize = arg(args, "--tasks").map_or(16, |v| v.parse().unwrap());
    let seed: u64 = arg(args, "--seed").map_or_else(rand::random, |v| v.parse().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let dir = arg(args, "--dir").map_or_else(|| tmp.path().join("outbox"), PathBuf::from);
    println!(
        "outbox_crash: seed {seed}, up to {iterations} iterations or {max_secs} s, {tasks} appending tasks"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // seq -> (task, run, counter): acknowledged and not acked; must be present.
    let mut must: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    // Acked (by the child's bridge or by the parent): must never come back.
    let mut gone: HashSet<u64> = HashSet::new();
    // Being acked when the child was killed: may be present or not.
    let mut maybe_gone: HashSet<u64> = HashSet::new();
    let mut t = Totals::default();
    let start = Instant::now();
    let exe = std::env::current_exe().unwrap();
    let mut done = 0;
    for run in 0..iterations {
        if start.elapsed() > Duration::from_secs(max_secs) {
            break;
        }
        let mut child = Command::new(&exe)
            .args(["child", "--dir"])
            .arg(&dir)
            .args(["--tasks", &tasks.to_string(), "--run", &run.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stdout.read_to_end(&mut buf);
            buf
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(5..150)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        let out = reader.join().unwrap();
        if status.code().is_some() {
            eprintln!("run {run}: child exited on its own ({status}) before the kill");
            t.failures += 1;
        }
        // Only whole lines: the last one may have been cut by the kill.
        let whole = out.rsplitn(2, |b| *b == b'\n').nth(1).unwrap_or(&[]);
        for line in whole.lines() {
            let line = line.unwrap();
            let f: Vec<u64> = line
                .split(' ')
                .skip(1)
                .map(|x| x.parse().unwrap())
                .collect();
            match line.as_bytes()[0] {
                b'A' => {
                    t.acknowledged += 1;
                    if !gone.contains(&f[0]) && !maybe_gone.contains(&f[0]) {
                        must.insert(f[0], (f[1], f[2], f[3]));
                    }
                }
                b'I' => {
                    must.remove(&f[0]);
                    maybe_gone.insert(f[0]);
                }
                b'K' => {
                    t.acked_by_child += 1;
                    must.remove(&f[0]);
                    gone.insert(f[0]);
                }
                _ => {}
            }
        }
        let failures = rt.block_on(check(&dir, run, &mut must, &mut gone, &mut rng, &mut t));
        // Whatever was present has been re-classified by the check; the rest is gone.
        maybe_gone.clear();
        t.failures += failures;
        done = run + 1;
        if t.failures > 0 {
            break;
        }
    }
    println!(
        "outbox_crash: {done} kills in {:.1} s; {} appends acknowledged, {} acked by the child's \
         bridge, {} acked by the checker; largest reopened backlog {} entries; reopen max {} ms; \
         repairs: {} torn tails truncated, {} damaged regions skipped, {} segments quarantined",
        start.elapsed().as_secs_f64(),
        t.acknowledged,
        t.acked_by_child,
        t.acked_by_parent,
        t.checked_max,
        t.max_open_ms,
        t.truncated_tails,
        t.corrupt_regions,
        t.quarantined,
    );
    if t.failures > 0 || done == 0 {
        println!("outbox_crash: FAIL ({} violations)", t.failures);
        1
    } else {
        println!("outbox_crash: ok");
        0
    }
}

async fn check(
    dir: &Path,
    run: u64,
    must: &mut BTreeMap<u64, (u64, u64, u64)>,
    gone: &mut HashSet<u64>,
    rng: &mut rand::rngs::StdRng,
    t: &mut Totals,
) -> u64 {
    let ob = match Outbox::open(dir, options()).await {
        Ok(ob) => ob,
        Err(e) => {
            eprintln!("run {run}: the outbox did not open: {e}");
            return 1;
        }
    };
    let r = ob.stats().recovery;
    t.truncated_tails += r.truncated_tails;
    t.corrupt_regions += r.corrupt_regions;
    t.quarantined += r.quarantined_segments;
    t.max_open_ms = t.max_open_ms.max(r.open_ms);
    let entries = ob.take(usize::MAX).await.unwrap();
    t.checked_max = t.checked_max.max(entries.len());
    let mut failures = 0u64;
    let mut by_seq: HashMap<u64, (u64, u64, u64)> = HashMap::new();
    let mut keys = HashSet::new();
    let mut last_per_child: HashMap<String, (u64, u64, Seq)> = HashMap::new();
    for e in &entries {
        let text = String::from_utf8_lossy(&e.payload);
        let f: Vec<u64> = text
            .split(':')
            .take(3)
            .map(|x| x.parse().unwrap())
            .collect();
        let (key_run, task, counter) = (f[0], f[1], f[2]);
        if by_seq.insert(e.seq.0, (task, key_run, counter)).is_some() {
            eprintln!("run {run}: seq {} handed out twice", e.seq);
            failures += 1;
        }
        if !keys.insert((key_run, task, counter)) {
            eprintln!("run {run}: entry {key_run}:{task}:{counter} stored twice");
            failures += 1;
        }
        if gone.contains(&e.seq.0) {
            eprintln!("run {run}: seq {} was acked and came back", e.seq);
            failures += 1;
        }
        if let Some((r0, c0, s0)) = last_per_child.get(&*e.child_id)
            && (*s0 > e.seq || (*r0, *c0) >= (key_run, counter))
        {
            eprintln!(
                "run {run}: child {} out of order: {r0}:{c0} (seq {s0}) before {key_run}:{counter} (seq {})",
                e.child_id, e.seq
            );
            failures += 1;
        }
        last_per_child.insert(e.child_id.to_string(), (key_run, counter, e.seq));
    }
    for (seq, want) in must.iter() {
        match by_seq.get(seq) {
            None => {
                if failures < 20 {
                    eprintln!(
                        "run {run}: LOST acknowledged entry seq {seq} (task {} run {} counter {})",
                        want.0, want.1, want.2
                    );
                }
                failures += 1;
            }
            Some(got) if got != want => {
                eprintln!("run {run}: seq {seq} holds {got:?}, acknowledged as {want:?}");
                failures += 1;
            }
            Some(_) => {}
        }
    }
    // What is stored now must stay; ack a random half (it must never come back).
    let mut ack = Vec::new();
    for (seq, key) in by_seq {
        if rng.gen_bool(0.5) {
            ack.push(Seq(seq));
            must.remove(&seq);
            gone.insert(seq);
        } else {
            must.insert(seq, key);
        }
    }
    t.acked_by_parent += ack.len() as u64;
    ob.ack_many(&ack).await.unwrap();
    ob.close().await.unwrap();
    failures
}
