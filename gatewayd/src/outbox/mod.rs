//! Outbox: the durable at-least-once queue between local ingest and the cloud.
//!
//! Owns one directory of append-only segment files. An entry (child, topic, QoS, payload) is
//! `append`ed and on disk (fdatasync) before `append` returns, so the endpoint can PUBACK the
//! child; concurrent appends share one sync (group commit: the writer thread syncs whatever
//! arrived while the previous sync ran). The bridge `take`s entries, FIFO per child and
//! round-robin between children, and `ack`s each one when the cloud PUBACKs it (or `release`s
//! it when the connection is lost, so it is handed out again). A segment file is deleted once
//! every entry in it is gone. The store is bounded by bytes and age with an explicit overflow
//! policy, and it always opens: a torn tail is truncated, damage in the middle is skipped,
//! an unreadable segment is set aside (`*.quarantined`).
//!
//! Must not touch: the network, the state database (`store`), anything outside its directory.
//! Files: `record.rs` the on-disk format (pure), `fair.rs` the scheduler (pure), `bounds.rs`
//! the limits and overflow policy (pure), `engine.rs` recovery, the index and the writer thread.

mod bounds;
mod engine;
mod fair;
mod record;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::oneshot;

pub use bounds::OverflowPolicy;
pub use record::Reason;

use engine::{Cmd, Core, DeadItem};

/// An entry's sequence number: unique and increasing for the life of the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Seq(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Milliseconds since the Unix epoch, as entry timestamps and the age bound see them. Each
/// handle moves forward from the wall clock read when it was made, on a monotonic clock, so a
/// wall-clock step while running (NTP after boot on a board without RTC) does not age entries;
/// `manual` is for tests.
#[derive(Debug, Clone)]
pub struct Clock(ClockKind);

#[derive(Debug, Clone)]
enum ClockKind {
    System {
        wall_ms: u64,
        start: std::time::Instant,
    },
    Manual(Arc<AtomicU64>),
}

impl Clock {
    pub fn system() -> Clock {
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Clock(ClockKind::System {
            wall_ms,
            start: std::time::Instant::now(),
        })
    }

    pub fn manual(start_ms: u64) -> Clock {
        Clock(ClockKind::Manual(Arc::new(AtomicU64::new(start_ms))))
    }

    /// Moves a manual clock forward (no effect on the system clock).
    pub fn advance(&self, by: Duration) {
        if let ClockKind::Manual(ms) = &self.0 {
            ms.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
        }
    }

    pub fn now_ms(&self) -> u64 {
        match &self.0 {
            ClockKind::System { wall_ms, start } => wall_ms + start.elapsed().as_millis() as u64,
            ClockKind::Manual(ms) => ms.load(Ordering::SeqCst),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

#[derive(Debug, Clone)]
pub struct OutboxOptions {
    /// Bound on live entries, as their encoded size on disk.
    pub max_bytes: u64,
    /// Entries older than this are dropped (reason `age`).
    pub max_age: Duration,
    /// What an append does when `max_bytes` would be passed.
    pub overflow: OverflowPolicy,
    /// A segment file is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// Largest payload accepted (AWS IoT Core: 128 KiB).
    pub max_payload_bytes: usize,
    /// Most appends the writer puts under one sync; 1 turns group commit off (a baseline for the
    /// bench, not for production).
    pub max_batch: usize,
    pub clock: Clock,
}

impl Default for OutboxOptions {
    fn default() -> Self {
        OutboxOptions {
            max_bytes: 256 << 20,
            max_age: Duration::from_secs(7 * 24 * 3600),
            overflow: OverflowPolicy::DropOldest,
            segment_bytes: 8 << 20,
            max_payload_bytes: 128 << 10,
            max_batch: 1024,
            clock: Clock::system(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "outbox full: {live_bytes} of {max_bytes} bytes in use and the overflow policy is refuse-new"
    )]
    Full { live_bytes: u64, max_bytes: u64 },
    #[error("outbox entry of {size} bytes is larger than the limit of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    #[error("outbox: {0}")]
    Invalid(String),
    #[error(
        "outbox directory {} is in use by another process (lock file held)",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error("outbox: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "outbox stopped after a disk error (nothing more is written until it is reopened): {0}"
    )]
    Stopped(String),
}

impl OutboxError {
    /// True when trying again later can succeed without reopening the outbox.
    pub fn is_transient(&self) -> bool {
        matches!(self, OutboxError::Full { .. })
    }

    fn io(op: &'static str, path: &Path, source: std::io::Error) -> OutboxError {
        OutboxError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// An entry handed out by `take`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: Seq,
    pub child_id: Arc<str>,
    pub topic: String,
    pub qos: u8,
    pub payload: Vec<u8>,
    /// When it was appended (ms since the Unix epoch).
    pub appended_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChildStats {
    /// Live entries (waiting and in flight).
    pub entries: u64,
    pub in_flight: u64,
}

/// Entries that left without a cloud PUBACK, by reason (since open).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Drops {
    pub age: u64,
    pub overflow: u64,
    pub corrupt: u64,
}

/// What the last open found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RecoveryReport {
    pub segments: u64,
    pub entries: u64,
    /// Segment tails cut off (a record torn by a crash or damaged with nothing valid after it).
    pub truncated_tails: u64,
    /// Damaged stretches skipped inside a segment, with valid records after them kept.
    pub corrupt_regions: u64,
    /// Bytes lost to truncation and skipped stretches.
    pub bytes_discarded: u64,
    /// Segments whose header could not be read, renamed to `*.quarantined` and not read.
    pub quarantined_segments: u64,
    pub open_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OutboxStats {
    /// Live entries: waiting and in flight.
    pub entries: u64,
    /// Live entries' encoded size (what `max_bytes` bounds).
    pub bytes: u64,
    pub in_flight: u64,
    /// Size of the segment files (live and not yet reclaimed records, headers).
    pub disk_bytes: u64,
    pub segments: u64,
    pub oldest_age_ms: Option<u64>,
    pub per_child: BTreeMap<String, ChildStats>,
    pub drops: Drops,
    /// Appends refused under `refuse-new` (since open).
    pub refused: u64,
    pub appended: u64,
    pub acked: u64,
    /// fsync/fdatasync calls made by the writer (since open).
    pub syncs: u64,
    pub recovery: RecoveryReport,
}

/// A handle to an open outbox; clones share it.
#[derive(Clone)]
pub struct Outbox {
    core: Arc<Core>,
    writer: Arc<WriterHandle>,
    options: Arc<OutboxOptions>,
}

/// The writer thread's channel and handle. When the last `Outbox` clone goes, the channel closes
/// and the thread is joined, so the directory lock is free again when the drop returns.
struct WriterHandle {
    tx: Option<std::sync::mpsc::Sender<Cmd>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl WriterHandle {
    fn send(&self, cmd: Cmd) -> Result<(), ()> {
        match &self.tx {
            Some(tx) => tx.send(cmd).map_err(|_| ()),
            None => Err(()),
        }
    }

    fn take_thread(&self) -> Option<std::thread::JoinHandle<()>> {
        self.thread.lock().ok().and_then(|mut h| h.take())
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.take_thread() {
            // The writer finishes the round it is in (at most one sync) and exits.
            let _ = h.join();
        }
    }
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("dir", &self.core.dir)
            .finish_non_exhaustive()
    }
}

fn stopped(what: &str) -> OutboxError {
    OutboxError::Stopped(format!("the writer thread is gone ({what})"))
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`, recovering every entry that was appended and not
    /// acknowledged. Damage is repaired and reported in `stats().recovery`, never an error; errors
    /// are I/O failures on the directory itself, invalid options, or another process holding it.
    pub async fn open(
        dir: impl Into<PathBuf>,
        options: OutboxOptions,
    ) -> Result<Outbox, OutboxError> {
        if options.max_batch == 0 {
            return Err(OutboxError::Invalid("max_batch must be at least 1".into()));
        }
        if !(4096..=1 << 30).contains(&options.segment_bytes) {
            return Err(OutboxError::Invalid(
                "segment_bytes must be between 4 KiB and 1 GiB".into(),
            ));
        }
        let dir = dir.into();
        let opts = options.clone();
        let (core, writer) = tokio::task::spawn_blocking(move || engine::open(&dir, &opts))
            .await
            .map_err(|e| OutboxError::Invalid(format!("open task failed: {e}")))??;
        let core = Arc::new(core);
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn({
                let core = core.clone();
                move || writer.run(&core, rx)
            })
            .map_err(|e| OutboxError::io("start writer thread", &core.dir, e))?;
        Ok(Outbox {
            core,
            writer: Arc::new(WriterHandle {
                tx: Some(tx),
                thread: Mutex::new(Some(handle)),
            }),
            options: Arc::new(options),
        })
    }

    /// Appends one entry and returns once it is on disk: after `Ok`, a crash or power cut does
    /// not lose it. `Full` (policy refuse-new) and `TooLarge` leave nothing stored.
    pub async fn append(
        &self,
        child_id: &str,
        topic: &str,
        qos: u8,
        payload: &[u8],
    ) -> Result<Seq, OutboxError> {
        if qos > 2 {
            return Err(OutboxError::Invalid(format!("QoS {qos} is not 0, 1 or 2")));
        }
        if child_id.is_empty() {
            return Err(OutboxError::Invalid("empty child id".into()));
        }
        if payload.len() > self.options.max_payload_bytes {
            return Err(OutboxError::TooLarge {
                size: payload.len() as u64,
                max: self.options.max_payload_bytes as u64,
            });
        }
        let mut rec = Vec::with_capacity(record::entry_len(child_id, topic, payload));
        record::encode_entry(&mut rec, 0, 0, qos, child_id, topic, payload).map_err(|e| {
            OutboxError::Invalid(match e {
                record::EncodeError::ChildTooLong => "child id longer than 65535 bytes".into(),
                record::EncodeError::TopicTooLong => "topic longer than 65535 bytes".into(),
                record::EncodeError::TooLarge => "entry too large".into(),
            })
        })?;
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Cmd::Append {
                rec,
                child: Arc::from(child_id),
                now_ms: self.options.clock.now_ms(),
                reply,
            })
            .map_err(|_| stopped("append"))?;
        rx.await.map_err(|_| stopped("append"))?
    }

    /// Hands out up to `max` waiting entries, FIFO per child and round-robin between children.
    /// They stay stored, and are not handed out again, until `ack`ed or `release`d. Entries past
    /// the age bound are dropped instead of handed out. Returns at once (maybe empty); see
    /// [`Outbox::wait_pending`].
    pub async fn take(&self, max: usize) -> Result<Vec<Entry>, OutboxError> {
        let now = self.options.clock.now_ms();
        let (picks, expired) = {
            let mut idx = self.core.lock();
            let mut expired = idx.expire(now, self.options.max_age);
            let picks = idx.take(max, now, self.options.max_age, &mut expired);
            (picks, expired)
        };
        self.send_dead(expired, now);
        if picks.is_empty() {
            return Ok(Vec::new());
        }
        let core = self.core.clone();
        let read = tokio::task::spawn_blocking(move || core.read_picks(picks))
            .await
            .map_err(|e| OutboxError::Invalid(format!("read task failed: {e}")))?;
        let (entries, corrupt) = match read {
            Ok(r) => r,
            Err((e, picks)) => {
                // Hand the entries back: a failed read is not a reason to lose them.
                let mut idx = self.core.lock();
                for p in &picks {
                    idx.release(p.seq);
                }
                drop(idx);
                self.core.notify.notify_waiters();
                return Err(e);
            }
        };
        if !corrupt.is_empty() {
            let items = {
                let mut idx = self.core.lock();
                corrupt
                    .iter()
                    .filter_map(|seq| idx.kill(*seq, Reason::Corrupt))
                    .collect()
            };
            self.send_dead(items, now);
        }
        Ok(entries)
    }

    /// Resolves when at least one entry is waiting to be taken.
    pub async fn wait_pending(&self) {
        loop {
            let notified = self.core.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.core.lock().fair.is_empty() {
                return;
            }
            notified.await;
        }
    }

    /// Puts handed-out entries back (their connection was lost before the cloud's PUBACK): they
    /// are handed out again, first within their child. Returns how many were in flight.
    pub fn release(&self, seqs: &[Seq]) -> usize {
        let n = {
            let mut idx = self.core.lock();
            seqs.iter().filter(|s| idx.release(s.0)).count()
        };
        if n > 0 {
            self.core.notify.notify_waiters();
        }
        n
    }

    /// Puts every handed-out entry back (see [`Outbox::release`]).
    pub fn release_all(&self) -> usize {
        let n = self.core.lock().release_all();
        if n > 0 {
            self.core.notify.notify_waiters();
        }
        n
    }

    /// The cloud acknowledged `seq`: deletes it. Returns whether it was still stored.
    pub async fn ack(&self, seq: Seq) -> Result<bool, OutboxError> {
        Ok(self.ack_many(&[seq]).await? == 1)
    }

    /// Deletes the given entries; returns once the deletion is on disk (a segment whose entries
    /// are all gone is deleted as a whole). Unknown or already-deleted seqs are ignored; returns
    /// how many were deleted.
    pub async fn ack_many(&self, seqs: &[Seq]) -> Result<usize, OutboxError> {
        let items: Vec<DeadItem> = {
            let mut idx = self.core.lock();
            seqs.iter()
                .filter_map(|s| idx.kill(s.0, Reason::Acked))
                .collect()
        };
        let n = items.len();
        if n == 0 {
            return Ok(0);
        }
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Cmd::Dead {
                items,
                now_ms: self.options.clock.now_ms(),
                reply: Some(reply),
            })
            .map_err(|_| stopped("ack"))?;
        rx.await.map_err(|_| stopped("ack"))??;
        Ok(n)
    }

    /// Counters and sizes. Applies the age bound first, so what it reports is within bounds.
    pub fn stats(&self) -> OutboxStats {
        let now = self.options.clock.now_ms();
        let (stats, expired) = {
            let mut idx = self.core.lock();
            let expired = idx.expire(now, self.options.max_age);
            (idx.stats(now), expired)
        };
        self.send_dead(expired, now);
        let mut stats = stats;
        stats.syncs = self.core.syncs.load(Ordering::Relaxed);
        stats
    }

    /// Stops the writer after it has finished what was sent to it. Other clones of this handle
    /// get `Stopped` afterwards.
    pub async fn close(self) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        if self.writer.send(Cmd::Close { reply }).is_ok() {
            let _ = rx.await;
        }
        if let Some(h) = self.writer.take_thread() {
            tokio::task::spawn_blocking(move || h.join())
                .await
                .map_err(|e| OutboxError::Invalid(format!("close task failed: {e}")))?
                .map_err(|_| OutboxError::Stopped("the writer thread panicked".into()))?;
        }
        Ok(())
    }

    /// Persists drops decided on the caller's side (age, corrupt). Nobody waits: a drop that is
    /// lost in a crash only means the entry is dropped again after reopening.
    fn send_dead(&self, items: Vec<DeadItem>, now_ms: u64) {
        if !items.is_empty() {
            let _ = self.writer.send(Cmd::Dead {
                items,
                now_ms,
                reply: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn append_take_ack_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(dir.path(), OutboxOptions::default())
            .await
            .unwrap();
        let a = ob.append("c1", "dt/c1", 1, b"one").await.unwrap();
        let b = ob.append("c1", "dt/c1", 1, b"two").await.unwrap();
        assert!(b > a);
        let got = ob.take(10).await.unwrap();
        assert_eq!(
            got.iter().map(|e| e.payload.as_slice()).collect::<Vec<_>>(),
            [&b"one"[..], b"two"]
        );
        assert!(
            ob.take(10).await.unwrap().is_empty(),
            "in-flight entries are not handed out twice"
        );
        assert_eq!(ob.release(&[b]), 1);
        assert_eq!(ob.take(10).await.unwrap()[0].seq, b);
        assert_eq!(ob.ack_many(&[a, b, Seq(999)]).await.unwrap(), 2);
        let s = ob.stats();
        assert_eq!((s.entries, s.bytes, s.acked, s.appended), (0, 0, 2, 2));
        ob.close().await.unwrap();
    }

    #[tokio::test]
    async fn invalid_input_is_refused_before_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(dir.path(), OutboxOptions::default())
            .await
            .unwrap();
        assert!(matches!(
            ob.append("c", "t", 3, b"").await,
            Err(OutboxError::Invalid(_))
        ));
        assert!(matches!(
            ob.append("", "t", 1, b"").await,
            Err(OutboxError::Invalid(_))
        ));
        let big = vec![0u8; (128 << 10) + 1];
        assert!(matches!(
            ob.append("c", "t", 1, &big).await,
            Err(OutboxError::TooLarge { .. })
        ));
        assert_eq!(ob.stats().appended, 0);
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _ob = Outbox::open(dir.path(), OutboxOptions::default())
            .await
            .unwrap();
        let again = Outbox::open(dir.path(), OutboxOptions::default()).await;
        assert!(
            matches!(again, Err(OutboxError::Locked { .. })),
            "{again:?}"
        );
    }
}
