//! Record codec for outbox segment files: pure, no I/O.
//!
//! A segment file is a header followed by records. Every record carries its own magic, format
//! version and CRC, so a reader can check each one alone and, after a damaged stretch, find the
//! next good record by looking for the magic and a record whose CRC holds (`resync`).
//!
//! Segment header (24 bytes): `b"GWOUTBOX"` | format version u8 | 3 zero bytes |
//! first seq u64 LE | CRC-32 of the 20 bytes before it (LE).
//!
//! Record: magic `B7 0C` | version u8 | kind u8 | body length u32 LE | body | CRC-32 (LE) of
//! everything before it. Bodies:
//! - entry (kind 1): seq u64 | appended-at ms u64 | qos u8 | child length u16 | topic length u16 |
//!   child | topic | payload (the rest);
//! - dead (kind 2): reason u8 | count u32 | count × seq u64. A dead record is written into the
//!   segment that holds the entries it names, so every segment can be read on its own.

use std::ops::Range;

pub const SEGMENT_MAGIC: [u8; 8] = *b"GWOUTBOX";
/// The one format version this code writes and reads (segment header and records).
pub const FORMAT_VERSION: u8 = 1;
pub const SEGMENT_HEADER_LEN: usize = 24;

pub const RECORD_MAGIC: [u8; 2] = [0xB7, 0x0C];
const HEAD_LEN: usize = 8;
const CRC_LEN: usize = 4;
/// Bytes a record adds around its body.
pub const FRAME_OVERHEAD: usize = HEAD_LEN + CRC_LEN;
/// A length field above this is corruption, not a record (the largest entry is far smaller).
pub const MAX_BODY: usize = 16 << 20;

const KIND_ENTRY: u8 = 1;
const KIND_DEAD: u8 = 2;
/// seq, appended-at, qos, child length, topic length.
const ENTRY_FIXED: usize = 8 + 8 + 1 + 2 + 2;

/// Why an entry left the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The cloud acknowledged it.
    Acked,
    /// Older than the age bound.
    Age,
    /// Dropped to make room under the `drop-oldest` policy.
    Overflow,
    /// Its record failed its CRC when read back.
    Corrupt,
}

impl Reason {
    fn to_byte(self) -> u8 {
        match self {
            Reason::Acked => 0,
            Reason::Age => 1,
            Reason::Overflow => 2,
            Reason::Corrupt => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Reason> {
        Some(match b {
            0 => Reason::Acked,
            1 => Reason::Age,
            2 => Reason::Overflow,
            3 => Reason::Corrupt,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    ChildTooLong,
    TopicTooLong,
    TooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    Short,
    Magic,
    Version(u8),
    Crc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    pub seq: u64,
    pub ts_ms: u64,
    pub qos: u8,
    pub child: &'a str,
    pub topic: &'a str,
    pub payload: &'a [u8],
}

/// The sequence numbers of a dead record, read lazily from its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadSeqs<'a>(&'a [u8]);

impl<'a> DeadSeqs<'a> {
    pub fn iter(&self) -> impl Iterator<Item = u64> + 'a {
        self.0.chunks_exact(8).map(le_u64)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    Entry(EntryRef<'a>),
    Dead { reason: Reason, seqs: DeadSeqs<'a> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole, valid record and the number of bytes it took.
    Record(Record<'a>, usize),
    /// The bytes so far could start a record, but it ends past the buffer.
    Incomplete,
    /// Not a valid record at this offset (magic, version, length, CRC or body).
    Corrupt,
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

pub fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8] = FORMAT_VERSION;
    h[12..20].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32fast::hash(&h[..20]);
    h[20..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header and returns the first sequence number it declares.
pub fn decode_segment_header(buf: &[u8]) -> Result<u64, HeaderError> {
    if buf.len() < SEGMENT_HEADER_LEN {
        return Err(HeaderError::Short);
    }
    if buf[..8] != SEGMENT_MAGIC {
        return Err(HeaderError::Magic);
    }
    if le_u32(&buf[20..24]) != crc32fast::hash(&buf[..20]) {
        return Err(HeaderError::Crc);
    }
    if buf[8] != FORMAT_VERSION {
        return Err(HeaderError::Version(buf[8]));
    }
    Ok(le_u64(&buf[12..20]))
}

/// Length of the encoded entry record.
pub fn entry_len(child: &str, topic: &str, payload: &[u8]) -> usize {
    FRAME_OVERHEAD + ENTRY_FIXED + child.len() + topic.len() + payload.len()
}

/// Appends an entry record to `out`. The seq and timestamp can be set later with
/// [`stamp_entry`], which also recomputes the CRC.
pub fn encode_entry(
    out: &mut Vec<u8>,
    seq: u64,
    ts_ms: u64,
    qos: u8,
    child: &str,
    topic: &str,
    payload: &[u8],
) -> Result<(), EncodeError> {
    let child_len = u16::try_from(child.len()).map_err(|_| EncodeError::ChildTooLong)?;
    let topic_len = u16::try_from(topic.len()).map_err(|_| EncodeError::TopicTooLong)?;
    let body = ENTRY_FIXED + child.len() + topic.len() + payload.len();
    if body > MAX_BODY {
        return Err(EncodeError::TooLarge);
    }
    let start = out.len();
    out.reserve(FRAME_OVERHEAD + body);
    out.extend_from_slice(&RECORD_MAGIC);
    out.push(FORMAT_VERSION);
    out.push(KIND_ENTRY);
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&ts_ms.to_le_bytes());
    out.push(qos);
    out.extend_from_slice(&child_len.to_le_bytes());
    out.extend_from_slice(&topic_len.to_le_bytes());
    out.extend_from_slice(child.as_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Sets the seq and timestamp of one encoded entry record (as produced by [`encode_entry`],
/// alone in `rec`) and recomputes its CRC.
pub fn stamp_entry(rec: &mut [u8], seq: u64, ts_ms: u64) {
    debug_assert!(rec.len() >= FRAME_OVERHEAD + ENTRY_FIXED && rec[3] == KIND_ENTRY);
    rec[HEAD_LEN..HEAD_LEN + 8].copy_from_slice(&seq.to_le_bytes());
    rec[HEAD_LEN + 8..HEAD_LEN + 16].copy_from_slice(&ts_ms.to_le_bytes());
    let end = rec.len() - CRC_LEN;
    let crc = crc32fast::hash(&rec[..end]);
    rec[end..].copy_from_slice(&crc.to_le_bytes());
}

/// Appends a dead record naming `seqs` to `out`.
pub fn encode_dead(out: &mut Vec<u8>, reason: Reason, seqs: &[u64]) {
    let body = 1 + 4 + 8 * seqs.len();
    let start = out.len();
    out.reserve(FRAME_OVERHEAD + body);
    out.extend_from_slice(&RECORD_MAGIC);
    out.push(FORMAT_VERSION);
    out.push(KIND_DEAD);
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.push(reason.to_byte());
    out.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
    for s in seqs {
        out.extend_from_slice(&s.to_le_bytes());
    }
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Decodes the record at the start of `buf`. Never panics, whatever the bytes.
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    let magic_seen = buf.len().min(RECORD_MAGIC.len());
    if buf[..magic_seen] != RECORD_MAGIC[..magic_seen] {
        return Decoded::Corrupt;
    }
    if buf.len() < HEAD_LEN {
        return Decoded::Incomplete;
    }
    if buf[2] != FORMAT_VERSION {
        return Decoded::Corrupt;
    }
    let body_len = le_u32(&buf[4..8]) as usize;
    if body_len > MAX_BODY {
        return Decoded::Corrupt;
    }
    let total = HEAD_LEN + body_len + CRC_LEN;
    if buf.len() < total {
        return Decoded::Incomplete;
    }
    let crc_at = HEAD_LEN + body_len;
    if le_u32(&buf[crc_at..total]) != crc32fast::hash(&buf[..crc_at]) {
        return Decoded::Corrupt;
    }
    let body = &buf[HEAD_LEN..crc_at];
    let record = match buf[3] {
        KIND_ENTRY => decode_entry(body).map(Record::Entry),
        KIND_DEAD => decode_dead(body),
        _ => None,
    };
    match record {
        Some(r) => Decoded::Record(r, total),
        None => Decoded::Corrupt,
    }
}

fn decode_entry(body: &[u8]) -> Option<EntryRef<'_>> {
    if body.len() < ENTRY_FIXED {
        return None;
    }
    let child_len = le_u16(&body[17..19]) as usize;
    let topic_len = le_u16(&body[19..21]) as usize;
    let rest = &body[ENTRY_FIXED..];
    if child_len + topic_len > rest.len() {
        return None;
    }
    let child = std::str::from_utf8(&rest[..child_len]).ok()?;
    let topic = std::str::from_utf8(&rest[child_len..child_len + topic_len]).ok()?;
    Some(EntryRef {
        seq: le_u64(&body[0..8]),
        ts_ms: le_u64(&body[8..16]),
        qos: body[16],
        child,
        topic,
        payload: &rest[child_len + topic_len..],
    })
}

fn decode_dead(body: &[u8]) -> Option<Record<'_>> {
    if body.len() < 5 {
        return None;
    }
    let reason = Reason::from_byte(body[0])?;
    let count = le_u32(&body[1..5]) as usize;
    let seqs = &body[5..];
    if count.checked_mul(8)? != seqs.len() {
        return None;
    }
    Some(Record::Dead {
        reason,
        seqs: DeadSeqs(seqs),
    })
}

/// The offset of the first valid record at or after `from`, if any.
pub fn resync(buf: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while at + RECORD_MAGIC.len() <= buf.len() {
        let rel = buf[at..]
            .windows(RECORD_MAGIC.len())
            .position(|w| w == RECORD_MAGIC)?;
        at += rel;
        if let Decoded::Record(..) = decode(&buf[at..]) {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// What [`scan`] found besides the records.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScanReport {
    /// Bytes up to here are whole records (or skipped damage followed by records); the rest is a
    /// torn or corrupt tail to truncate.
    pub end: usize,
    /// Damaged stretches followed by valid records: skipped, the records after them kept.
    pub skipped: Vec<Range<usize>>,
}

/// Walks the records in `buf` from `start`, calling `f(offset, length, record)` for each valid
/// one. Damage followed by a valid record is skipped and reported; damage with no valid record
/// after it ends the scan (`end`). Never panics, whatever the bytes.
pub fn scan<'a>(
    buf: &'a [u8],
    start: usize,
    mut f: impl FnMut(usize, usize, Record<'a>),
) -> ScanReport {
    let mut pos = start.min(buf.len());
    let mut skipped = Vec::new();
    while pos < buf.len() {
        match decode(&buf[pos..]) {
            Decoded::Record(r, n) => {
                f(pos, n, r);
                pos += n;
            }
            Decoded::Incomplete | Decoded::Corrupt => match resync(buf, pos + 1) {
                Some(next) => {
                    skipped.push(pos..next);
                    pos = next;
                }
                None => return ScanReport { end: pos, skipped },
            },
        }
    }
    ScanReport { end: pos, skipped }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn entry(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_entry(&mut v, seq, 7, 1, "child-1", "dt/child-1", payload).unwrap();
        v
    }

    #[test]
    fn header_roundtrip_and_damage() {
        let h = encode_segment_header(42);
        assert_eq!(decode_segment_header(&h), Ok(42));
        assert_eq!(decode_segment_header(&h[..10]), Err(HeaderError::Short));
        let mut bad = h;
        bad[0] ^= 1;
        assert_eq!(decode_segment_header(&bad), Err(HeaderError::Magic));
        let mut bad = h;
        bad[13] ^= 1;
        assert_eq!(decode_segment_header(&bad), Err(HeaderError::Crc));
    }

    #[test]
    fn stamp_sets_seq_and_keeps_crc_valid() {
        let mut rec = entry(0, b"hello");
        stamp_entry(&mut rec, 99, 1234);
        match decode(&rec) {
            Decoded::Record(Record::Entry(e), n) => {
                assert_eq!(
                    (e.seq, e.ts_ms, e.payload, n),
                    (99, 1234, &b"hello"[..], rec.len())
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_version_and_kind_are_corrupt_and_truncation_is_incomplete() {
        let rec = entry(1, b"x");
        let mut v = rec.clone();
        v[2] = 2;
        assert_eq!(decode(&v), Decoded::Corrupt);
        assert_eq!(decode(&rec[..rec.len() - 1]), Decoded::Incomplete);
        assert_eq!(decode(&rec[..1]), Decoded::Incomplete);
        assert_eq!(decode(&[]), Decoded::Incomplete);
        assert_eq!(decode(&[0xB7, 0x0D]), Decoded::Corrupt);
    }

    #[test]
    fn torn_tail_ends_the_scan_and_middle_damage_is_skipped() {
        let mut buf = Vec::new();
        for s in 1..=3 {
            buf.extend(entry(s, b"payload"));
        }
        let one = buf.len() / 3;
        // torn tail: the last record lost 3 bytes
        let torn = &buf[..buf.len() - 3];
        let mut seen = vec![];
        let r = scan(torn, 0, |_, _, rec| seen.push(rec));
        assert_eq!((seen.len(), r.end, r.skipped.len()), (2, 2 * one, 0));
        // middle damage: record 2 has a flipped payload byte
        let mut mid = buf.clone();
        mid[one + 30] ^= 0xFF;
        let mut seqs = vec![];
        let r = scan(&mid, 0, |_, _, rec| {
            if let Record::Entry(e) = rec {
                seqs.push(e.seq)
            }
        });
        assert_eq!(seqs, vec![1, 3]);
        assert_eq!(r.skipped, vec![one..2 * one]);
        assert_eq!(r.end, mid.len());
    }

    proptest! {
        #[test]
        fn entry_roundtrip(seq: u64, ts: u64, qos in 0u8..3, child in "[a-zA-Z0-9_:-]{1,64}",
                           topic in "\\PC{0,80}", payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut v = vec![0xAA];
            encode_entry(&mut v, seq, ts, qos, &child, &topic, &payload).unwrap();
            prop_assert_eq!(v.len() - 1, entry_len(&child, &topic, &payload));
            match decode(&v[1..]) {
                Decoded::Record(Record::Entry(e), n) => {
                    prop_assert_eq!(n, v.len() - 1);
                    prop_assert_eq!(e, EntryRef { seq, ts_ms: ts, qos, child: &child, topic: &topic, payload: &payload });
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn dead_roundtrip(seqs in proptest::collection::vec(any::<u64>(), 0..100), r in 0u8..4) {
            let reason = Reason::from_byte(r).unwrap();
            let mut v = Vec::new();
            encode_dead(&mut v, reason, &seqs);
            match decode(&v) {
                Decoded::Record(Record::Dead { reason: got, seqs: s }, n) => {
                    prop_assert_eq!(n, v.len());
                    prop_assert_eq!(got, reason);
                    prop_assert_eq!(s.iter().collect::<Vec<_>>(), seqs);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), start in 0usize..64) {
            let _ = decode(&bytes);
            let _ = decode_segment_header(&bytes);
            let _ = resync(&bytes, start);
            let r = scan(&bytes, start, |_, _, _| {});
            prop_assert!(r.end <= bytes.len());
        }

        /// Any one damaged byte costs at most the record that holds it: resync keeps the rest.
        #[test]
        fn one_damaged_byte_loses_at_most_its_record(n in 2usize..20, pick: prop::sample::Index,
                                                     flip in 1u8..=255, payload_len in 0usize..64) {
            let mut buf = Vec::new();
            let mut bounds = vec![];
            for s in 0..n as u64 {
                let start = buf.len();
                buf.extend(entry(s, &vec![s as u8; payload_len]));
                bounds.push(start..buf.len());
            }
            let at = pick.index(buf.len());
            buf[at] ^= flip;
            let hit = bounds.iter().position(|r| r.contains(&at)).unwrap() as u64;
            let mut seqs = vec![];
            scan(&buf, 0, |_, _, rec| if let Record::Entry(e) = rec { seqs.push(e.seq) });
            let want: Vec<u64> = (0..n as u64).filter(|s| *s != hit).collect();
            prop_assert_eq!(seqs, want);
        }
    }
}
