//! The read path: entries older than the log cache come back from disk through the host's
//! positioned reads, checked record by record; memory follows the cache, not retention.

use super::*;
use crate::read::READ_ATTEMPTS_MAX;

/// A shard whose cache holds nothing durable: every older entry is read from disk, in reads
/// small enough that records cross them, from segments small enough that reads cross them.
fn disk_only() -> ShardConfig {
    ShardConfig {
        log_cache_bytes_max: 0,
        log_index_stride_records: 4,
        log_read_bytes_max: 300,
        wal_segment_bytes_max: 2_000,
        retention_bytes_max: 1 << 30,
        ..ShardConfig::default()
    }
}

/// `count` appends to each of `convs`, interleaved, in writes of a few records.
fn appended(n: &mut Node, convs: &[&str], count: u64) {
    for i in 0..count {
        for c in convs {
            n.append(1, i, c, &format!("\"{c}-{i}\""), None);
        }
        if i % 3 == 0 {
            n.pump();
        }
    }
    n.pump();
}

fn subscribe(n: &mut Node, session: SessionId, conv: &str, from: u64) {
    n.req(
        session,
        ShardOp::Subscribe {
            r: 1,
            mesh: MeshId::must("m"),
            conv: ConvId::must(conv),
            from,
        },
    );
}

fn read(n: &mut Node, conv: &str, from: u64, limit: u32) -> Vec<(u64, String)> {
    n.req(
        7,
        ShardOp::Read {
            r: 5,
            mesh: MeshId::must("m"),
            conv: ConvId::must(conv),
            from,
            limit,
            local: false,
        },
    );
    let out = n.pump();
    let msgs: Vec<_> = out
        .iter()
        .filter_map(|o| match &o.reply {
            Reply::Messages { events, .. } => Some(events.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(msgs.len(), 1, "one answer: {out:?}");
    msgs[0]
        .iter()
        .map(|e| (e.seq, e.body.as_str().to_string()))
        .collect()
}

#[test]
fn a_subscriber_behind_the_cache_gets_every_entry_from_disk_in_order() {
    // Proves a subscription from seq 1 over entries no longer in memory yields each entry
    // exactly once, in order, with its own body, across reads, records cut by a read's end,
    // interleaved conversations and segment boundaries; then it tails new entries.
    let mut n = Node::new(ShardConfig {
        push_credit_frames_max: 7,
        ..disk_only()
    });
    appended(&mut n, &["x", "y", "z"], 60);
    assert!(n.shard.segment_count() > 3, "the entries span segments");
    assert_eq!(n.shard.cache_bytes(), 0, "nothing durable stays cached");
    subscribe(&mut n, 2, "y", 1);
    let mut got = Vec::new();
    for _ in 0..100 {
        let out = n.pump();
        got.extend(events(&out, 2));
        n.req(2, ShardOp::Flushed { frames: 7 });
    }
    assert_eq!(got, (1..=60).collect::<Vec<_>>());
    assert!(n.shard.stats().disk_reads > 10, "{:?}", n.shard.stats());
    n.append(1, 99, "y", "\"new\"", None);
    let mut out = n.pump();
    n.req(2, ShardOp::Flushed { frames: 7 });
    out.extend(n.pump());
    assert_eq!(events(&out, 2), vec![61]);
}

#[test]
fn a_read_older_than_the_cache_is_answered_from_disk() {
    // Proves a read of evicted entries answers exactly the asked range with the stored
    // bodies, and a read past the durable head stops at it; after a restart too.
    let mut n = Node::new(disk_only());
    appended(&mut n, &["x", "y"], 40);
    let got = read(&mut n, "x", 5, 20);
    let want: Vec<(u64, String)> = (5..25).map(|s| (s, format!("\"x-{}\"", s - 1))).collect();
    assert_eq!(got, want);
    assert_eq!(read(&mut n, "y", 35, 100).len(), 6);
    n.restart();
    assert_eq!(read(&mut n, "x", 5, 20), want);
    assert!(n.shard.cache_bytes() <= n.shard.config().log_cache_bytes_max);
}

#[test]
fn a_read_that_fails_once_is_tried_again() {
    // Proves one failed disk read costs a retry, not the shard.
    let mut n = Node::new(disk_only());
    appended(&mut n, &["x"], 20);
    n.disk.fail_next("read_at", StoreErrorKind::Io);
    assert_eq!(read(&mut n, "x", 1, 20).len(), 20);
    assert_eq!(n.shard.stats().disk_read_retries, 1);
    assert!(n.shard.read_failure().is_none());
}

#[test]
fn bytes_that_do_not_verify_fail_the_shard_after_its_retries() {
    // Proves a record whose checksum no longer matches is never served: the read is tried
    // READ_ATTEMPTS_MAX times, then the shard fails (its host recovers it from disk, which
    // refuses the corruption), and the read gets no answer with wrong data.
    let mut n = Node::new(disk_only());
    appended(&mut n, &["x"], 20);
    let first = *n.disk.segments().keys().next().unwrap();
    let seg = n.disk.segment_mut(first).unwrap();
    let at = wal::SEGMENT_HEADER_BYTES + wal::FRAME_HEADER_BYTES + wal::RECORD_HEADER_BYTES + 3;
    seg[at] ^= 0x40;
    n.req(
        7,
        ShardOp::Read {
            r: 5,
            mesh: MeshId::must("m"),
            conv: ConvId::must("x"),
            from: 1,
            limit: 5,
            local: false,
        },
    );
    let out = n.pump();
    assert!(
        !out.iter()
            .any(|o| matches!(o.reply, Reply::Messages { .. })),
        "{out:?}"
    );
    assert!(n.shard.is_failed());
    let why = n.shard.read_failure().expect("a failure").to_string();
    assert!(why.contains("checksum"), "{why}");
    assert_eq!(
        n.shard.stats().disk_read_retries,
        READ_ATTEMPTS_MAX as u64,
        "{why}"
    );
}

#[test]
fn a_lagging_subscriber_continues_from_the_oldest_retained_entry_after_retention() {
    // Proves retention moves a subscriber that fell behind to the oldest entry still
    // retained, and from there it gets every entry once, in order.
    let mut n = Node::new(ShardConfig {
        retention_bytes_max: 6_000,
        ..disk_only()
    });
    appended(&mut n, &["x", "y"], 150);
    assert!(n.shard.stats().segments_deleted > 0);
    subscribe(&mut n, 2, "x", 1);
    let mut got = Vec::new();
    for _ in 0..200 {
        let out = n.pump();
        got.extend(events(&out, 2));
        n.req(2, ShardOp::Flushed { frames: 1024 });
    }
    let first = got[0];
    assert!(first > 1, "the oldest entries are gone");
    assert_eq!(got, (first..=150).collect::<Vec<_>>());
}

#[test]
fn memory_follows_the_cache_and_the_stride_not_retention() {
    // Proves what a conversation keeps in memory for its retained entries is the cache
    // budget plus one index entry per stride (or segment), however much is retained.
    let stride = 16;
    let mut n = Node::new(ShardConfig {
        log_cache_bytes_max: 4_000,
        log_index_stride_records: stride,
        wal_segment_bytes_max: 1 << 20,
        ..disk_only()
    });
    for i in 0..2_000u64 {
        n.append(
            1,
            i,
            "x",
            "\"0123456789012345678901234567890123456789\"",
            None,
        );
        if i % 50 == 0 {
            n.pump();
        }
    }
    n.pump();
    let c = &n.shard.convs[&(Arc::from("m"), Arc::from("x"))];
    assert!(n.shard.cache_bytes() <= 4_000, "{}", n.shard.cache_bytes());
    assert!(c.cached.len() < 50, "{}", c.cached.len());
    let marks_max = 2_000 / stride as usize + n.shard.segment_count() + 1;
    assert!(c.marks.len() <= marks_max, "{} marks", c.marks.len());
    assert_eq!(read(&mut n, "x", 1, 1000).len(), 1000);
}

fn delivered_bodies(out: &[Output], session: SessionId) -> Vec<(u64, String)> {
    out.iter()
        .filter(|o| o.session == session)
        .filter_map(|o| match &o.reply {
            Reply::Frame(ServerOp::Deliver { pos, body, .. }) => {
                Some((*pos, body.as_str().to_string()))
            }
            _ => None,
        })
        .collect()
}

/// Everything delivered to `peer` on a new session: its hello, then flushes until the drain
/// (and the disk reads it waits for) has nothing more, in at most 20 rounds.
fn inbox_of(n: &mut Node, session: SessionId, peer: &str) -> Vec<(u64, String)> {
    let mut got = delivered_bodies(&n.hello(session, peer), session);
    for _ in 0..20 {
        n.req(session, ShardOp::Flushed { frames: 1024 });
        got.extend(delivered_bodies(&n.pump(), session));
    }
    got
}

#[test]
fn an_inbox_backlog_older_than_the_cache_is_delivered_from_disk() {
    // Proves unacknowledged inbox messages whose bodies left memory are read back for their
    // recipient: every one, in position order, with its own body, and no body stays in memory
    // once durable (the cache holds nothing).
    let mut n = Node::new(disk_only());
    n.setup_mesh(&[("a", &[]), ("b", &[])]);
    for i in 1..=50u64 {
        n.send(1, i, "a", "b", &format!("\"m{i}\""));
        if i % 4 == 0 {
            n.pump();
        }
    }
    n.pump();
    assert!(n.shard.meshes["m"].log.values().all(|m| m.body.is_none()));
    let got = inbox_of(&mut n, 2, "b");
    let want: Vec<(u64, String)> = (1..=50).map(|i| (i, format!("\"m{i}\""))).collect();
    assert_eq!(got, want);
    assert!(n.shard.stats().disk_reads > 0);
}

#[test]
fn retention_reads_back_the_bodies_it_copies_forward() {
    // Proves a retention round whose oldest segments hold unacknowledged messages with
    // bodies on disk only reads them back, copies them forward, deletes the segments, and
    // the recipient still gets every message, before and after a restart.
    let mut n = Node::new(ShardConfig {
        retention_bytes_max: 6_000,
        ..disk_only()
    });
    n.setup_mesh(&[("a", &[]), ("b", &[])]);
    for i in 1..=20u64 {
        n.send(1, i, "a", "b", &format!("\"kept {i}\""));
        n.pump();
    }
    for i in 0..300u64 {
        n.append(1, 100 + i, "c", "\"filler filler filler\"", None);
        if i % 5 == 0 {
            n.pump();
        }
    }
    n.pump();
    assert!(n.shard.stats().records_copied_forward >= 20);
    assert!(n.shard.stats().segments_deleted > 0);
    n.restart();
    let got = inbox_of(&mut n, 2, "b");
    let want: Vec<(u64, String)> = (1..=20).map(|i| (i, format!("\"kept {i}\""))).collect();
    assert_eq!(got, want);
}
