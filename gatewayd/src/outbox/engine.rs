//! The engine: recovery at open, the in-memory index and the writer thread.
//!
//! Layout: `<dir>/LOCK` (held with `flock` while open) and segment files `<first seq>.seg`
//! (20 digits). Only the newest segment takes entries; a new one is started at every open and
//! whenever the current one passes `segment_bytes`. A dead record (ack or drop) is appended to
//! the segment holding the entries it names, so each segment is read on its own at open and is
//! deleted as a whole once nothing in it is live.
//!
//! The index keeps, per entry, where its record is and its state; payloads stay on disk and are
//! read when taken. One writer thread does every write: it takes all commands waiting in its
//! channel (up to `max_batch` appends), writes them, syncs each touched file once, and only then
//! makes the new entries visible and answers the appenders.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

use super::bounds::{self, Admission, Limits};
use super::fair::FairQueue;
use super::record::{self, Decoded, Reason, Record, SEGMENT_HEADER_LEN};
use super::{
    ChildStats, Drops, Entry, OutboxError, OutboxOptions, OutboxStats, RecoveryReport, Seq,
};

/// Appender handles kept open on older segments (for their dead records).
const MAX_OPEN_APPENDERS: usize = 32;

pub(super) fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pending,
    InFlight,
    Dead,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    seq: u64,
    ts_ms: u64,
    off: u32,
    len: u32,
    child: u32,
    status: Status,
}

#[derive(Debug)]
struct Segment {
    file_len: u64,
    /// In seq order.
    metas: Vec<Meta>,
    live: usize,
    sealed: bool,
    /// Every meta before this index is dead.
    head: usize,
}

impl Segment {
    fn new(file_len: u64, sealed: bool) -> Segment {
        Segment {
            file_len,
            metas: Vec::new(),
            live: 0,
            sealed,
            head: 0,
        }
    }

    fn find(&self, seq: u64) -> Option<usize> {
        self.metas.binary_search_by_key(&seq, |m| m.seq).ok()
    }
}

/// A dead entry to record in its segment.
#[derive(Debug, Clone, Copy)]
pub(super) struct DeadItem {
    seg: u64,
    seq: u64,
    reason: Reason,
}

/// An entry handed out, to be read from disk.
#[derive(Debug, Clone)]
pub(super) struct Pick {
    pub seq: u64,
    seg: u64,
    off: u32,
    len: u32,
    child: Arc<str>,
}

#[derive(Debug, Default)]
struct Counters {
    appended: u64,
    acked: u64,
    refused: u64,
    drops: Drops,
}

#[derive(Debug, Default)]
pub(super) struct Index {
    segs: BTreeMap<u64, Segment>,
    children: Vec<Arc<str>>,
    child_ids: HashMap<Arc<str>, u32>,
    child_stats: Vec<ChildStats>,
    pub fair: FairQueue<u32>,
    /// seq → segment of every entry handed out and not yet acked or released.
    in_flight: BTreeMap<u64, u64>,
    live_entries: u64,
    live_bytes: u64,
    counters: Counters,
    recovery: RecoveryReport,
    /// Set after a failed write or sync: nothing more is written until reopened.
    failed: Option<String>,
}

impl Index {
    fn intern(&mut self, child: &str) -> u32 {
        if let Some(id) = self.child_ids.get(child) {
            return *id;
        }
        let id = self.children.len() as u32;
        let name: Arc<str> = Arc::from(child);
        self.children.push(name.clone());
        self.child_ids.insert(name, id);
        self.child_stats.push(ChildStats::default());
        id
    }

    fn seg_of(&self, seq: u64) -> Option<u64> {
        self.segs.range(..=seq).next_back().map(|(k, _)| *k)
    }

    /// Adds a live, waiting entry (in seq order within its segment).
    fn insert(&mut self, seg: u64, meta: Meta) {
        let Some(s) = self.segs.get_mut(&seg) else {
            return;
        };
        s.metas.push(meta);
        s.live += 1;
        self.live_entries += 1;
        self.live_bytes += u64::from(meta.len);
        self.child_stats[meta.child as usize].entries += 1;
        self.fair.push(meta.child, meta.seq);
    }

    /// Marks a live entry dead; returns what to record on disk, or None if it was not live.
    pub(super) fn kill(&mut self, seq: u64, reason: Reason) -> Option<DeadItem> {
        let key = self.seg_of(seq)?;
        let seg = self.segs.get_mut(&key)?;
        let i = seg.find(seq)?;
        let m = &mut seg.metas[i];
        match m.status {
            Status::Dead => return None,
            Status::Pending => {
                self.fair.remove(m.child, seq);
            }
            Status::InFlight => {
                self.in_flight.remove(&seq);
                self.child_stats[m.child as usize].in_flight -= 1;
            }
        }
        m.status = Status::Dead;
        seg.live -= 1;
        self.live_entries -= 1;
        self.live_bytes -= u64::from(m.len);
        self.child_stats[m.child as usize].entries -= 1;
        let c = &mut self.counters;
        match reason {
            Reason::Acked => c.acked += 1,
            Reason::Age => c.drops.age += 1,
            Reason::Overflow => c.drops.overflow += 1,
            Reason::Corrupt => c.drops.corrupt += 1,
        }
        Some(DeadItem {
            seg: key,
            seq,
            reason,
        })
    }

    /// The oldest live entry (of any child).
    fn oldest_live(&mut self) -> Option<Meta> {
        for seg in self.segs.values_mut() {
            if seg.live == 0 {
                continue;
            }
            while seg.head < seg.metas.len() && seg.metas[seg.head].status == Status::Dead {
                seg.head += 1;
            }
            if let Some(m) = seg.metas.get(seg.head) {
                return Some(*m);
            }
        }
        None
    }

    /// Drops the oldest entries until at least `free` bytes are freed; returns what was freed.
    fn drop_oldest(&mut self, free: u64, out: &mut Vec<DeadItem>) -> u64 {
        let mut freed = 0;
        while freed < free {
            let Some(m) = self.oldest_live() else { break };
            if let Some(item) = self.kill(m.seq, Reason::Overflow) {
                freed += u64::from(m.len);
                out.push(item);
            }
        }
        freed
    }

    /// Drops every entry past the age bound (entries are appended in time order).
    pub(super) fn expire(&mut self, now_ms: u64, max_age: Duration) -> Vec<DeadItem> {
        let mut out = Vec::new();
        while let Some(m) = self.oldest_live() {
            if !bounds::is_expired(max_age, now_ms, m.ts_ms) {
                break;
            }
            out.extend(self.kill(m.seq, Reason::Age));
        }
        out
    }

    /// Hands out up to `max` entries; entries found past the age bound on the way are dropped
    /// and added to `dropped`.
    pub(super) fn take(
        &mut self,
        max: usize,
        now_ms: u64,
        max_age: Duration,
        dropped: &mut Vec<DeadItem>,
    ) -> Vec<Pick> {
        let mut picks = Vec::new();
        while picks.len() < max {
            let Some((child, seq)) = self.fair.take() else {
                break;
            };
            let Some(key) = self.seg_of(seq) else {
                continue;
            };
            let Some(seg) = self.segs.get_mut(&key) else {
                continue;
            };
            let Some(i) = seg.find(seq) else { continue };
            let m = &mut seg.metas[i];
            if m.status != Status::Pending {
                continue;
            }
            m.status = Status::InFlight;
            let m = *m;
            self.in_flight.insert(seq, key);
            self.child_stats[child as usize].in_flight += 1;
            if bounds::is_expired(max_age, now_ms, m.ts_ms) {
                // Entries of one child can outlive older ones of another; never hand one out.
                dropped.extend(self.kill(seq, Reason::Age));
                continue;
            }
            picks.push(Pick {
                seq,
                seg: key,
                off: m.off,
                len: m.len,
                child: self.children[child as usize].clone(),
            });
        }
        picks
    }

    pub(super) fn release(&mut self, seq: u64) -> bool {
        let Some(key) = self.in_flight.remove(&seq) else {
            return false;
        };
        let Some(seg) = self.segs.get_mut(&key) else {
            return false;
        };
        let Some(i) = seg.find(seq) else { return false };
        let m = &mut seg.metas[i];
        m.status = Status::Pending;
        let child = m.child;
        self.child_stats[child as usize].in_flight -= 1;
        self.fair.push(child, seq);
        true
    }

    pub(super) fn release_all(&mut self) -> usize {
        let seqs: Vec<u64> = self.in_flight.keys().copied().collect();
        seqs.into_iter().filter(|s| self.release(*s)).count()
    }

    pub(super) fn stats(&mut self, now_ms: u64) -> OutboxStats {
        let oldest = self.oldest_live().map(|m| now_ms.saturating_sub(m.ts_ms));
        OutboxStats {
            entries: self.live_entries,
            bytes: self.live_bytes,
            in_flight: self.in_flight.len() as u64,
            disk_bytes: self.segs.values().map(|s| s.file_len).sum(),
            segments: self.segs.len() as u64,
            oldest_age_ms: oldest,
            per_child: self
                .children
                .iter()
                .zip(&self.child_stats)
                .filter(|(_, s)| s.entries > 0)
                .map(|(c, s)| (c.to_string(), s.clone()))
                .collect(),
            drops: self.counters.drops.clone(),
            refused: self.counters.refused,
            appended: self.counters.appended,
            acked: self.counters.acked,
            syncs: 0,
            recovery: self.recovery.clone(),
        }
    }
}

/// What the async handles and the writer share.
pub(super) struct Core {
    pub dir: PathBuf,
    index: Mutex<Index>,
    pub notify: Notify,
    readers: Mutex<HashMap<u64, Arc<File>>>,
    pub syncs: AtomicU64,
    /// Held (flock) for as long as the outbox is open.
    _lock: File,
}

type ReadResult = Result<(Vec<Entry>, Vec<u64>), (OutboxError, Vec<Pick>)>;

impl Core {
    pub(super) fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock leaves counters at worst off by one entry; keep serving.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reader(&self, seg: u64) -> std::io::Result<Arc<File>> {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = readers.get(&seg) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.dir.join(segment_name(seg)))?);
        readers.insert(seg, f.clone());
        Ok(f)
    }

    /// Reads handed-out entries. Returns them and the seqs whose record failed its check, or
    /// the first I/O error together with every pick (to be put back).
    pub(super) fn read_picks(&self, picks: Vec<Pick>) -> ReadResult {
        let mut entries = Vec::with_capacity(picks.len());
        let mut corrupt = Vec::new();
        let mut buf = Vec::new();
        for p in &picks {
            buf.resize(p.len as usize, 0);
            let read = self
                .reader(p.seg)
                .and_then(|f| f.read_exact_at(&mut buf, u64::from(p.off)));
            if let Err(e) = read {
                let path = self.dir.join(segment_name(p.seg));
                return Err((OutboxError::io("read", &path, e), picks));
            }
            match record::decode(&buf) {
                Decoded::Record(Record::Entry(e), n) if n == buf.len() && e.seq == p.seq => entries
                    .push(Entry {
                        seq: Seq(p.seq),
                        child_id: p.child.clone(),
                        topic: e.topic.to_string(),
                        qos: e.qos,
                        payload: e.payload.to_vec(),
                        appended_ms: e.ts_ms,
                    }),
                _ => {
                    tracing::warn!(
                        file = %self.dir.join(segment_name(p.seg)).display(),
                        offset = p.off,
                        seq = p.seq,
                        "outbox entry failed its check when read back (disk damage); dropped"
                    );
                    corrupt.push(p.seq);
                }
            }
        }
        Ok((entries, corrupt))
    }
}

pub(super) enum Cmd {
    Append {
        rec: Vec<u8>,
        child: Arc<str>,
        now_ms: u64,
        reply: oneshot::Sender<Result<Seq, OutboxError>>,
    },
    Dead {
        items: Vec<DeadItem>,
        now_ms: u64,
        reply: Option<oneshot::Sender<Result<(), OutboxError>>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// The writer thread's own state: the files it writes.
pub(super) struct Writer {
    dir: PathBuf,
    dir_file: File,
    active_key: u64,
    active: File,
    active_len: u64,
    next_seq: u64,
    last_ts: u64,
    appenders: HashMap<u64, File>,
    limits: Limits,
    segment_bytes: u64,
    max_batch: usize,
}

struct Accepted {
    rec: Vec<u8>,
    child: Arc<str>,
    seq: u64,
    ts_ms: u64,
    reply: oneshot::Sender<Result<Seq, OutboxError>>,
}

/// What a round wrote, to apply to the index.
#[derive(Default)]
struct Written {
    /// (segment, offset, length) per accepted append.
    placed: Vec<(u64, u32, u32)>,
    /// Segments started in this round, in order.
    started: Vec<u64>,
    /// New file lengths.
    lens: HashMap<u64, u64>,
    removed: Vec<u64>,
    syncs: u64,
}

fn copy_err(e: &OutboxError) -> OutboxError {
    match e {
        OutboxError::Io { op, path, source } => OutboxError::Io {
            op,
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        other => OutboxError::Stopped(other.to_string()),
    }
}

impl Writer {
    pub(super) fn run(mut self, core: &Core, rx: Receiver<Cmd>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            let mut appends = usize::from(matches!(batch[0], Cmd::Append { .. }));
            while appends < self.max_batch {
                match rx.try_recv() {
                    Ok(cmd) => {
                        appends += usize::from(matches!(cmd, Cmd::Append { .. }));
                        batch.push(cmd);
                    }
                    Err(_) => break,
                }
            }
            if self.round(core, batch) {
                break;
            }
        }
    }

    /// One group commit. Returns true when asked to close.
    fn round(&mut self, core: &Core, batch: Vec<Cmd>) -> bool {
        let mut appends = Vec::new();
        let mut items = Vec::new();
        let mut dead_replies = Vec::new();
        let mut close = None;
        let mut now = 0;
        for cmd in batch {
            match cmd {
                Cmd::Append {
                    rec,
                    child,
                    now_ms,
                    reply,
                } => {
                    now = now.max(now_ms);
                    appends.push((rec, child, now_ms, reply));
                }
                Cmd::Dead {
                    items: i,
                    now_ms,
                    reply,
                } => {
                    now = now.max(now_ms);
                    items.extend(i);
                    dead_replies.extend(reply);
                }
                Cmd::Close { reply } => close = Some(reply),
            }
        }

        // Phase 1, under the lock: bounds, seqs, and what to write where.
        let mut idx = core.lock();
        if let Some(why) = idx.failed.clone() {
            drop(idx);
            for (.., reply) in appends {
                let _ = reply.send(Err(OutboxError::Stopped(why.clone())));
            }
            for reply in dead_replies {
                let _ = reply.send(Err(OutboxError::Stopped(why.clone())));
            }
            if let Some(r) = close {
                let _ = r.send(());
            }
            return true;
        }
        if now > 0 {
            items.extend(idx.expire(now, self.limits.max_age));
        }
        let mut accepted = Vec::with_capacity(appends.len());
        let mut batch_bytes = 0u64;
        for (mut rec, child, now_ms, reply) in appends {
            let size = rec.len() as u64;
            let verdict = match bounds::admit(&self.limits, idx.live_bytes + batch_bytes, size) {
                Admission::Admit => Ok(()),
                Admission::MakeRoom { free } => {
                    // Entries of this same batch are not in the index yet and cannot be dropped;
                    // only a max_bytes smaller than one batch leaves this short.
                    if idx.drop_oldest(free, &mut items) >= free {
                        Ok(())
                    } else {
                        Err(OutboxError::Full {
                            live_bytes: idx.live_bytes + batch_bytes,
                            max_bytes: self.limits.max_bytes,
                        })
                    }
                }
                Admission::Refuse => {
                    idx.counters.refused += 1;
                    Err(OutboxError::Full {
                        live_bytes: idx.live_bytes + batch_bytes,
                        max_bytes: self.limits.max_bytes,
                    })
                }
                Admission::TooLarge => Err(OutboxError::TooLarge {
                    size,
                    max: self.limits.max_bytes,
                }),
            };
            if let Err(e) = verdict {
                let _ = reply.send(Err(e));
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let ts_ms = now_ms.max(self.last_ts);
            self.last_ts = ts_ms;
            record::stamp_entry(&mut rec, seq, ts_ms);
            batch_bytes += size;
            accepted.push(Accepted {
                rec,
                child,
                seq,
                ts_ms,
                reply,
            });
        }
        // Dead records go into the segment of their entries, unless that segment is about to be
        // deleted whole.
        let mut dead: BTreeMap<u64, BTreeMap<Reason, Vec<u64>>> = BTreeMap::new();
        for it in &items {
            if let Some(s) = idx.segs.get(&it.seg)
                && (!s.sealed || s.live > 0)
            {
                dead.entry(it.seg)
                    .or_default()
                    .entry(it.reason)
                    .or_default()
                    .push(it.seq);
            }
        }
        let gc: Vec<u64> = idx
            .segs
            .iter()
            .filter(|(_, s)| s.sealed && s.live == 0)
            .map(|(k, _)| *k)
            .collect();
        drop(idx);

        // Phase 2, without the lock: write and sync.
        let result = self.write(&accepted, &dead, &gc);

        // Phase 3: make it visible, then answer.
        let mut idx = core.lock();
        match result {
            Ok(w) => {
                core.syncs.fetch_add(w.syncs, Ordering::Relaxed);
                for k in &w.started {
                    for s in idx.segs.values_mut() {
                        s.sealed = true;
                    }
                    idx.segs
                        .insert(*k, Segment::new(SEGMENT_HEADER_LEN as u64, false));
                }
                for (k, len) in &w.lens {
                    if let Some(s) = idx.segs.get_mut(k) {
                        s.file_len = *len;
                    }
                }
                let n = accepted.len();
                let mut replies = Vec::with_capacity(n);
                for (a, (seg, off, len)) in accepted.into_iter().zip(w.placed) {
                    let child = idx.intern(&a.child);
                    idx.insert(
                        seg,
                        Meta {
                            seq: a.seq,
                            ts_ms: a.ts_ms,
                            off,
                            len,
                            child,
                            status: Status::Pending,
                        },
                    );
                    replies.push((a.reply, a.seq));
                }
                idx.counters.appended += n as u64;
                if !w.removed.is_empty() {
                    let mut readers = core.readers.lock().unwrap_or_else(|p| p.into_inner());
                    for k in &w.removed {
                        idx.segs.remove(k);
                        readers.remove(k);
                    }
                }
                drop(idx);
                if n > 0 {
                    core.notify.notify_waiters();
                }
                for (reply, seq) in replies {
                    let _ = reply.send(Ok(Seq(seq)));
                }
                for reply in dead_replies {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "outbox write failed; the outbox stops taking entries until it is reopened \
                     (check the disk)"
                );
                idx.failed = Some(e.to_string());
                drop(idx);
                for a in accepted {
                    let _ = a.reply.send(Err(copy_err(&e)));
                }
                for reply in dead_replies {
                    let _ = reply.send(Err(copy_err(&e)));
                }
                // A failed fsync may have dropped dirty pages; retrying it could report success
                // for data that is gone, so the writer stops here.
                if let Some(r) = close {
                    let _ = r.send(());
                }
                return true;
            }
        }
        if let Some(r) = close {
            let _ = r.send(());
            return true;
        }
        false
    }

    fn write(
        &mut self,
        accepted: &[Accepted],
        dead: &BTreeMap<u64, BTreeMap<Reason, Vec<u64>>>,
        gc: &[u64],
    ) -> Result<Written, OutboxError> {
        let mut w = Written::default();
        let mut buf = Vec::new();
        for (seg, reasons) in dead {
            let mut recs = Vec::new();
            for (reason, seqs) in reasons {
                record::encode_dead(&mut recs, *reason, seqs);
            }
            if *seg == self.active_key {
                buf.extend_from_slice(&recs);
                continue;
            }
            let path = self.dir.join(segment_name(*seg));
            if self.appenders.len() >= MAX_OPEN_APPENDERS && !self.appenders.contains_key(seg) {
                self.appenders.clear();
            }
            let f = match self.appenders.entry(*seg) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(
                    OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .map_err(|e| OutboxError::io("open", &path, e))?,
                ),
            };
            f.write_all(&recs)
                .map_err(|e| OutboxError::io("write", &path, e))?;
            f.sync_data()
                .map_err(|e| OutboxError::io("sync", &path, e))?;
            w.syncs += 1;
            let len = f
                .metadata()
                .map_err(|e| OutboxError::io("stat", &path, e))?
                .len();
            w.lens.insert(*seg, len);
        }
        for a in accepted {
            let used = self.active_len + buf.len() as u64;
            if used > SEGMENT_HEADER_LEN as u64 && used + a.rec.len() as u64 > self.segment_bytes {
                self.flush_active(&mut buf, &mut w)?;
                self.start_segment(a.seq)?;
                w.syncs += 2;
                w.started.push(a.seq);
            }
            let off = self.active_len + buf.len() as u64;
            w.placed
                .push((self.active_key, off as u32, a.rec.len() as u32));
            buf.extend_from_slice(&a.rec);
        }
        self.flush_active(&mut buf, &mut w)?;
        for seg in gc {
            let path = self.dir.join(segment_name(*seg));
            self.appenders.remove(seg);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(OutboxError::io("delete", &path, e)),
            }
            w.removed.push(*seg);
        }
        if !gc.is_empty() {
            // Without this a power cut could bring a deleted segment back (entries sent twice).
            self.dir_file
                .sync_all()
                .map_err(|e| OutboxError::io("sync", &self.dir, e))?;
            w.syncs += 1;
        }
        Ok(w)
    }

    fn flush_active(&mut self, buf: &mut Vec<u8>, w: &mut Written) -> Result<(), OutboxError> {
        if buf.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(segment_name(self.active_key));
        self.active
            .write_all(buf)
            .map_err(|e| OutboxError::io("write", &path, e))?;
        self.active
            .sync_data()
            .map_err(|e| OutboxError::io("sync", &path, e))?;
        w.syncs += 1;
        self.active_len += buf.len() as u64;
        w.lens.insert(self.active_key, self.active_len);
        buf.clear();
        Ok(())
    }

    /// Starts the segment `first_seq` and makes it the active one (header synced, then the
    /// directory synced, before any entry in it is acknowledged).
    fn start_segment(&mut self, first_seq: u64) -> Result<(), OutboxError> {
        let (file, len) = create_segment(&self.dir, &self.dir_file, first_seq)?;
        self.active = file;
        self.active_len = len;
        self.active_key = first_seq;
        Ok(())
    }
}

/// Writes `<first_seq>.seg` atomically (temporary file, sync, rename, directory sync) and opens
/// it for appending.
fn create_segment(dir: &Path, dir_file: &File, first_seq: u64) -> Result<(File, u64), OutboxError> {
    let path = dir.join(segment_name(first_seq));
    let tmp = dir.join(format!("{}.tmp", segment_name(first_seq)));
    let mut f = File::create(&tmp).map_err(|e| OutboxError::io("create", &tmp, e))?;
    f.write_all(&record::encode_segment_header(first_seq))
        .and_then(|()| f.sync_all())
        .map_err(|e| OutboxError::io("write", &tmp, e))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(|e| OutboxError::io("rename", &tmp, e))?;
    dir_file
        .sync_all()
        .map_err(|e| OutboxError::io("sync", dir, e))?;
    let f = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| OutboxError::io("open", &path, e))?;
    Ok((f, SEGMENT_HEADER_LEN as u64))
}

/// Opens the directory: takes the lock, reads every segment (repairing damage), starts a new
/// active segment and deletes segments with nothing live.
pub(super) fn open(dir: &Path, opts: &OutboxOptions) -> Result<(Core, Writer), OutboxError> {
    let started = Instant::now();
    fs::create_dir_all(dir).map_err(|e| OutboxError::io("create", dir, e))?;
    let lock_path = dir.join("LOCK");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| OutboxError::io("open", &lock_path, e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(OutboxError::Locked {
                path: dir.to_path_buf(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(OutboxError::io("lock", &lock_path, e)),
    }
    let dir_file = File::open(dir).map_err(|e| OutboxError::io("open", dir, e))?;

    let mut names = Vec::new();
    let mut max_named = 0u64;
    for de in fs::read_dir(dir).map_err(|e| OutboxError::io("list", dir, e))? {
        let de = de.map_err(|e| OutboxError::io("list", dir, e))?;
        let name = de.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".seg.tmp") {
            // A segment whose creation did not finish: it never held an entry.
            let _ = fs::remove_file(de.path());
            continue;
        }
        let first = name
            .strip_suffix(".seg")
            .or_else(|| {
                name.strip_suffix(".quarantined")
                    .and_then(|n| n.split('.').next())
            })
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            max_named = max_named.max(first);
            if name.ends_with(".seg") {
                names.push(first);
            }
        }
    }
    names.sort_unstable();

    let mut idx = Index::default();
    let mut max_seq = 0u64;
    let mut max_ts = 0u64;
    for (i, &first) in names.iter().enumerate() {
        let path = dir.join(segment_name(first));
        let upper = names.get(i + 1).copied().unwrap_or(u64::MAX);
        let seg = match recover_segment(&path, first, upper, &mut idx)? {
            Recovered::Segment(seg) => seg,
            Recovered::Quarantined { max_seq: m } => {
                max_seq = max_seq.max(m);
                continue;
            }
        };
        if let Some(last) = seg.metas.last() {
            max_seq = max_seq.max(last.seq);
        }
        max_ts = seg.metas.iter().map(|m| m.ts_ms).fold(max_ts, u64::max);
        idx.segs.insert(first, seg);
    }

    // Above every seq ever used, and above every segment name (an empty segment still names
    // one), so a new segment never takes an existing file name.
    let next_seq = max_seq.max(max_named) + 1;
    let (active, active_len) = create_segment(dir, &dir_file, next_seq)?;
    idx.segs.insert(next_seq, Segment::new(active_len, false));

    // Delete what has nothing live; queue the rest, oldest first.
    let dead: Vec<u64> = idx
        .segs
        .iter()
        .filter(|(_, s)| s.sealed && s.live == 0)
        .map(|(k, _)| *k)
        .collect();
    for k in &dead {
        let path = dir.join(segment_name(*k));
        fs::remove_file(&path).map_err(|e| OutboxError::io("delete", &path, e))?;
        idx.segs.remove(k);
    }
    if !dead.is_empty() {
        dir_file
            .sync_all()
            .map_err(|e| OutboxError::io("sync", dir, e))?;
    }
    let mut live = Vec::new();
    for seg in idx.segs.values() {
        for m in seg.metas.iter().filter(|m| m.status == Status::Pending) {
            live.push((m.child, m.seq, m.len));
        }
    }
    for (child, seq, len) in live {
        idx.fair.push(child, seq);
        idx.live_entries += 1;
        idx.live_bytes += u64::from(len);
        idx.child_stats[child as usize].entries += 1;
    }
    idx.recovery.segments = idx.segs.len() as u64;
    idx.recovery.entries = idx.live_entries;
    idx.recovery.open_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        dir = %dir.display(),
        entries = idx.live_entries,
        segments = idx.segs.len(),
        open_ms = idx.recovery.open_ms,
        "outbox opened"
    );

    let core = Core {
        dir: dir.to_path_buf(),
        index: Mutex::new(idx),
        notify: Notify::new(),
        readers: Mutex::new(HashMap::new()),
        syncs: AtomicU64::new(0),
        _lock: lock,
    };
    let writer = Writer {
        dir: dir.to_path_buf(),
        dir_file,
        active_key: next_seq,
        active,
        active_len,
        next_seq,
        last_ts: max_ts,
        appenders: HashMap::new(),
        limits: Limits {
            max_bytes: opts.max_bytes,
            max_age: opts.max_age,
            overflow: opts.overflow,
        },
        segment_bytes: opts.segment_bytes,
        max_batch: opts.max_batch,
    };
    Ok((core, writer))
}

enum Recovered {
    Segment(Segment),
    /// Set aside; the highest seq of any readable entry in it (so seqs are never reused).
    Quarantined {
        max_seq: u64,
    },
}

/// Reads one segment into a sealed `Segment` (entries left `Pending`, not yet counted or
/// queued). Repairs: a torn or damaged tail is truncated; damage followed by valid records is
/// skipped; an unreadable header sets the file aside (renamed, never deleted).
fn recover_segment(
    path: &Path,
    first: u64,
    upper: u64,
    idx: &mut Index,
) -> Result<Recovered, OutboxError> {
    let buf = fs::read(path).map_err(|e| OutboxError::io("read", path, e))?;
    match record::decode_segment_header(&buf) {
        Ok(f) if f == first => {}
        bad => {
            let mut max_seq = first;
            record::scan(&buf, 0, |_, _, rec| {
                if let Record::Entry(e) = rec {
                    max_seq = max_seq.max(e.seq);
                }
            });
            let mut to = path.with_extension("seg.quarantined");
            let mut n = 1;
            while to.exists() {
                to = path.with_extension(format!("seg.{n}.quarantined"));
                n += 1;
            }
            tracing::warn!(
                file = %path.display(),
                problem = ?bad.map(|f| format!("header names seq {f}")),
                moved_to = %to.display(),
                "outbox segment header unreadable; segment set aside, its entries are not sent"
            );
            fs::rename(path, &to).map_err(|e| OutboxError::io("rename", path, e))?;
            idx.recovery.quarantined_segments += 1;
            return Ok(Recovered::Quarantined { max_seq });
        }
    }
    let mut seg = Segment::new(buf.len() as u64, true);
    let mut dead = HashSet::new();
    let mut last_child: Option<(&str, u32)> = None;
    let mut out_of_range = 0u64;
    let report = record::scan(&buf, SEGMENT_HEADER_LEN, |off, len, rec| match rec {
        Record::Entry(e) => {
            let in_order = seg.metas.last().is_none_or(|m| m.seq < e.seq);
            if e.seq < first || e.seq >= upper || !in_order {
                out_of_range += 1;
                return;
            }
            let child = match last_child {
                Some((name, id)) if name == e.child => id,
                _ => {
                    let id = idx.intern(e.child);
                    last_child = Some((e.child, id));
                    id
                }
            };
            seg.metas.push(Meta {
                seq: e.seq,
                ts_ms: e.ts_ms,
                off: off as u32,
                len: len as u32,
                child,
                status: Status::Pending,
            });
        }
        Record::Dead { seqs, .. } => dead.extend(seqs.iter()),
    });
    if out_of_range > 0 {
        tracing::warn!(file = %path.display(), records = out_of_range,
            "outbox segment holds entries outside its sequence range; ignored");
    }
    for r in &report.skipped {
        tracing::warn!(
            file = %path.display(),
            offset = r.start,
            bytes = r.end - r.start,
            "outbox segment damaged in the middle; the damaged bytes are skipped and the records \
             after them kept"
        );
        idx.recovery.corrupt_regions += 1;
        idx.recovery.bytes_discarded += (r.end - r.start) as u64;
    }
    if report.end < buf.len() {
        tracing::warn!(
            file = %path.display(),
            offset = report.end,
            bytes = buf.len() - report.end,
            "outbox segment has a torn or damaged tail (an interrupted write); truncated"
        );
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| OutboxError::io("open", path, e))?;
        f.set_len(report.end as u64)
            .and_then(|()| f.sync_all())
            .map_err(|e| OutboxError::io("truncate", path, e))?;
        idx.recovery.truncated_tails += 1;
        idx.recovery.bytes_discarded += (buf.len() - report.end) as u64;
        seg.file_len = report.end as u64;
    }
    for m in &mut seg.metas {
        if dead.contains(&m.seq) {
            m.status = Status::Dead;
        } else {
            seg.live += 1;
        }
    }
    Ok(Recovered::Segment(seg))
}
