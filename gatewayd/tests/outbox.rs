//! Outbox integration tests: reopen, torn tails, damage in the middle, bounds and overflow
//! policies, fairness, ack and reclaim, group commit. Each test uses its own temp directory.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use gatewayd::outbox::{Clock, Entry, Outbox, OutboxError, OutboxOptions, OverflowPolicy, Seq};

fn opts() -> OutboxOptions {
    OutboxOptions::default()
}

/// Segment files, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

async fn take_all(ob: &Outbox) -> Vec<Entry> {
    ob.take(usize::MAX).await.unwrap()
}

/// Appends `n` entries for `child` from `n` concurrent tasks (group commit keeps this fast);
/// payload = the index as text, zero-padded to `width`.
async fn append_concurrently(ob: &Outbox, child: &str, n: usize, width: usize) -> Vec<Seq> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let ob = ob.clone();
        let child = child.to_string();
        tasks.spawn(async move {
            ob.append(&child, "dt/t", 1, format!("{i:0width$}").as_bytes())
                .await
                .unwrap()
        });
    }
    let mut seqs: Vec<Seq> = tasks.join_all().await;
    seqs.sort();
    seqs
}

#[tokio::test]
async fn reopen_recovers_every_unacked_entry_in_order_per_child() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), opts()).await.unwrap();
    let mut appended = Vec::new();
    for i in 0..30u32 {
        let child = format!("c{}", i % 3);
        let seq = ob
            .append(&child, &format!("dt/{child}"), 1, &i.to_be_bytes())
            .await
            .unwrap();
        appended.push((seq, child, i));
    }
    // Five acked, five in flight when the process goes away.
    let taken = ob.take(10).await.unwrap();
    let acked: Vec<Seq> = taken[..5].iter().map(|e| e.seq).collect();
    ob.ack_many(&acked).await.unwrap();
    drop(ob);

    let ob = Outbox::open(dir.path(), opts()).await.unwrap();
    let s = ob.stats();
    assert_eq!((s.entries, s.recovery.entries, s.in_flight), (25, 25, 0));
    assert_eq!(s.per_child.len(), 3);
    let got = take_all(&ob).await;
    let want: Vec<_> = appended
        .iter()
        .filter(|(s, ..)| !acked.contains(s))
        .collect();
    assert_eq!(got.len(), want.len());
    for (e, (seq, child, i)) in {
        let mut g = got.clone();
        g.sort_by_key(|e| e.seq);
        g
    }
    .iter()
    .zip(want)
    {
        assert_eq!(
            (e.seq, &*e.child_id, e.payload.as_slice()),
            (*seq, child.as_str(), &i.to_be_bytes()[..])
        );
        assert_eq!(e.topic, format!("dt/{child}"));
    }
    for c in ["c0", "c1", "c2"] {
        let seqs: Vec<Seq> = got
            .iter()
            .filter(|e| &*e.child_id == c)
            .map(|e| e.seq)
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{c}: {seqs:?}");
    }
    // New seqs continue above every seq ever handed out.
    let next = ob.append("c0", "t", 1, b"x").await.unwrap();
    assert!(next > appended.last().unwrap().0);
}

#[tokio::test]
async fn a_torn_tail_is_truncated_and_the_store_opens() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), opts()).await.unwrap();
    for i in 0..10u8 {
        ob.append("c", "t", 1, &[i; 40]).await.unwrap();
    }
    ob.close().await.unwrap();
    let seg = segments(dir.path()).into_iter().next().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 3)
        .unwrap();

    let ob = Outbox::open(dir.path(), opts()).await.unwrap();
    let r = ob.stats().recovery;
    assert_eq!(
        (r.entries, r.truncated_tails, r.corrupt_regions),
        (9, 1, 0),
        "{r:?}"
    );
    let got = take_all(&ob).await;
    assert_eq!(
        got.iter().map(|e| e.payload[0]).collect::<Vec<_>>(),
        (0..9).collect::<Vec<_>>()
    );
    ob.append("c", "t", 1, b"after").await.unwrap();
    ob.close().await.unwrap();
    // The repair is on disk: the next open finds nothing to repair.
    let ob = Outbox::open(dir.path(), opts()).await.unwrap();
    let r = ob.stats().recovery;
    assert_eq!((r.entries, r.truncated_tails), (10, 0), "{r:?}");
}

#[tokio::test]
async fn damage_in_the_middle_is_skipped_and_later_records_kept() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), opts()).await.unwrap();
    for i in 0..10u8 {
        ob.append("c", "t", 1, &[i; 40]).await.unwrap();
    }
    ob.close().await.unwrap();
    let seg = segments(dir.path()).into_iter().next().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let rec = (bytes.len() - 24) / 10;
    let at = 24 + 4 * rec + rec / 2; // inside the fifth entry
    bytes[at] ^= 0x5A;
    std::fs::write(&seg, &bytes).unwrap();

    let ob = Outbox::open(dir.path(), opts()).await.unwrap();
    let r = ob.stats().recovery;
    assert_eq!(
        (r.entries, r.corrupt_regions, r.truncated_tails),
        (9, 1, 0),
        "{r:?}"
    );
    assert_eq!(r.bytes_discarded, rec as u64);
    let got: Vec<u8> = take_all(&ob).await.iter().map(|e| e.payload[0]).collect();
    assert_eq!(got, vec![0, 1, 2, 3, 5, 6, 7, 8, 9]);
}

#[tokio::test]
async fn an_unreadable_segment_header_is_quarantined_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), opts()).await.unwrap();
    let last = ob.append("c", "t", 1, b"x").await.unwrap();
    ob.close().await.unwrap();
    let seg = segments(dir.path()).into_iter().next().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[3] ^= 0xFF;
    std::fs::write(&seg, &bytes).unwrap();

    let ob = Outbox::open(dir.path(), opts()).await.unwrap();
    let s = ob.stats();
    assert_eq!((s.entries, s.recovery.quarantined_segments), (0, 1));
    assert!(seg.with_extension("seg.quarantined").exists());
    assert!(ob.append("c", "t", 1, b"y").await.unwrap() > last);
}

#[tokio::test]
async fn drop_oldest_keeps_the_newest_within_max_bytes_and_counts_drops() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Outbox::open(dir.path().join("probe"), opts())
        .await
        .unwrap();
    probe.append("c", "t", 1, &[0; 100]).await.unwrap();
    let one = probe.stats().bytes;
    let ob = Outbox::open(
        dir.path().join("ob"),
        OutboxOptions {
            max_bytes: 10 * one,
            overflow: OverflowPolicy::DropOldest,
            ..opts()
        },
    )
    .await
    .unwrap();
    let mut seqs = Vec::new();
    for i in 0..15u8 {
        let child = if i % 2 == 0 { "a" } else { "b" };
        seqs.push(ob.append(child, "t", 1, &[i; 100]).await.unwrap());
    }
    let s = ob.stats();
    assert_eq!(
        (s.entries, s.bytes, s.drops.overflow, s.refused),
        (10, 10 * one, 5, 0)
    );
    let mut got: Vec<Seq> = take_all(&ob).await.iter().map(|e| e.seq).collect();
    got.sort();
    assert_eq!(got, seqs[5..]);
    drop(ob);
    // The drops are on disk too.
    let ob = Outbox::open(dir.path().join("ob"), opts()).await.unwrap();
    assert_eq!(ob.stats().entries, 10);
}

#[tokio::test]
async fn refuse_new_answers_full_until_space_is_acked() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Outbox::open(dir.path().join("probe"), opts())
        .await
        .unwrap();
    probe.append("c", "t", 1, &[0; 100]).await.unwrap();
    let one = probe.stats().bytes;
    let ob = Outbox::open(
        dir.path().join("ob"),
        OutboxOptions {
            max_bytes: 10 * one,
            overflow: OverflowPolicy::RefuseNew,
            ..opts()
        },
    )
    .await
    .unwrap();
    let mut seqs = Vec::new();
    for _ in 0..10 {
        seqs.push(ob.append("c", "t", 1, &[1; 100]).await.unwrap());
    }
    let err = ob.append("c", "t", 1, &[2; 100]).await.unwrap_err();
    assert!(
        matches!(err, OutboxError::Full { .. }) && err.is_transient(),
        "{err:?}"
    );
    let s = ob.stats();
    assert_eq!((s.entries, s.refused, s.drops.overflow), (10, 1, 0));
    assert!(ob.ack(seqs[0]).await.unwrap());
    ob.append("c", "t", 1, &[3; 100]).await.unwrap();
    let got: Vec<Seq> = take_all(&ob).await.iter().map(|e| e.seq).collect();
    assert_eq!(&got[..9], &seqs[1..]);
}

#[tokio::test]
async fn the_age_bound_drops_old_entries_and_never_hands_them_out() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(1_700_000_000_000);
    let o = OutboxOptions {
        max_age: Duration::from_secs(60),
        clock: clock.clone(),
        ..opts()
    };
    let ob = Outbox::open(dir.path(), o.clone()).await.unwrap();
    ob.append("a", "t", 1, b"old-a").await.unwrap();
    ob.append("b", "t", 1, b"old-b").await.unwrap();
    clock.advance(Duration::from_secs(30));
    let young = ob.append("a", "t", 1, b"young").await.unwrap();
    clock.advance(Duration::from_secs(31));
    let s = ob.stats();
    assert_eq!(
        (s.entries, s.drops.age, s.oldest_age_ms),
        (1, 2, Some(31_000))
    );
    let got = take_all(&ob).await;
    assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![young]);
    ob.release_all();
    ob.close().await.unwrap();

    // Entries keep their age across a reopen.
    clock.advance(Duration::from_secs(30));
    let ob = Outbox::open(dir.path(), o).await.unwrap();
    assert_eq!(ob.stats().recovery.entries, 1);
    assert!(take_all(&ob).await.is_empty());
    let s = ob.stats();
    assert_eq!((s.entries, s.drops.age), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_with_one_entry_is_served_within_two_takes_of_a_10000_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), opts()).await.unwrap();
    let mut oldest = None;
    for _ in 0..20 {
        let seqs = append_concurrently(&ob, "busy", 500, 1).await;
        oldest = oldest.or(seqs.first().copied());
    }
    let lone = ob.append("lone", "t", 1, b"me").await.unwrap();
    assert_eq!(ob.stats().per_child["busy"].entries, 10_000);
    let first = ob.take(1).await.unwrap();
    let second = ob.take(1).await.unwrap();
    let seqs: Vec<Seq> = first.iter().chain(&second).map(|e| e.seq).collect();
    assert!(
        seqs.contains(&lone),
        "lone entry not among the first two: {seqs:?}"
    );
    // The busy child's first entry is its oldest.
    let busy = first
        .iter()
        .chain(&second)
        .find(|e| &*e.child_id == "busy")
        .unwrap();
    assert_eq!(Some(busy.seq), oldest);
}

#[tokio::test]
async fn released_entries_are_handed_out_again_first_and_once() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), opts()).await.unwrap();
    for i in 0..4u8 {
        ob.append("c", "t", 1, &[i]).await.unwrap();
    }
    let first: Vec<Seq> = ob.take(2).await.unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(ob.stats().in_flight, 2);
    let rest: Vec<Seq> = ob.take(1).await.unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(ob.release_all(), 3);
    let again: Vec<Seq> = take_all(&ob).await.iter().map(|e| e.seq).collect();
    let want: Vec<Seq> = first.iter().chain(&rest).copied().collect();
    assert_eq!(&again[..3], &want[..]);
    assert_eq!(again.len(), 4);
    assert!(ob.take(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn wait_pending_wakes_when_an_entry_is_appended() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), opts()).await.unwrap();
    let waiter = tokio::spawn({
        let ob = ob.clone();
        async move { ob.wait_pending().await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiter.is_finished());
    ob.append("c", "t", 1, b"x").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_is_deleted_once_every_entry_in_it_is_acked() {
    let dir = tempfile::tempdir().unwrap();
    let o = OutboxOptions {
        segment_bytes: 4096,
        ..opts()
    };
    let ob = Outbox::open(dir.path(), o.clone()).await.unwrap();
    append_concurrently(&ob, "c", 200, 100).await;
    let before = ob.stats();
    assert!(before.segments >= 5, "{before:?}");
    assert_eq!(segments(dir.path()).len() as u64, before.segments);
    let all = take_all(&ob).await;
    // Keep the oldest entry: its segment must stay, every other full one goes.
    let (keep, rest) = all.split_first().unwrap();
    let rest: Vec<Seq> = rest.iter().map(|e| e.seq).collect();
    assert_eq!(ob.ack_many(&rest).await.unwrap(), 199);
    ob.ack_many(&[]).await.unwrap();
    // Deletion happens in the writer's next round; an ack round-trip guarantees one has run.
    ob.ack(Seq(0)).await.unwrap();
    let mid = ob.stats();
    assert_eq!((mid.entries, mid.segments), (1, 2), "{mid:?}");
    assert_eq!(segments(dir.path()).len(), 2);
    ob.ack(keep.seq).await.unwrap();
    ob.append("c", "t", 1, b"poke").await.unwrap();
    let after = ob.stats();
    assert_eq!((after.entries, after.segments), (1, 1), "{after:?}");
    // Only the active segment is left (it is reclaimed once a newer one takes over).
    assert!(after.disk_bytes < before.disk_bytes / 4, "{after:?}");
    ob.close().await.unwrap();
    let ob = Outbox::open(dir.path(), o).await.unwrap();
    assert_eq!(ob.stats().entries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_syncs() {
    const N: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let grouped = Outbox::open(dir.path().join("grouped"), opts())
        .await
        .unwrap();
    let base = grouped.stats().syncs;
    append_concurrently(&grouped, "c", N, 1).await;
    let grouped_syncs = grouped.stats().syncs - base;

    let single = Outbox::open(
        dir.path().join("single"),
        OutboxOptions {
            max_batch: 1,
            ..opts()
        },
    )
    .await
    .unwrap();
    let base = single.stats().syncs;
    append_concurrently(&single, "c", N, 1).await;
    let single_syncs = single.stats().syncs - base;
    eprintln!(
        "{N} concurrent appends: {grouped_syncs} syncs grouped, {single_syncs} with max_batch 1"
    );
    assert!(single_syncs >= N as u64, "{single_syncs}");
    assert!(
        grouped_syncs * 10 <= N as u64,
        "{grouped_syncs} syncs for {N} appends"
    );
}
