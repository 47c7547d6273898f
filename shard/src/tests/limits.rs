//! Limits that input controls: batches under backpressure, write sizes, checkpoint size,
//! conversations per mesh, subscriptions per session, inbox backlogs, and retention with
//! segments smaller than a write.

use super::*;
use fabric_proto::{ConvId, MeshId, PeerId};

fn ack(n: &mut Node, peer: &str, upto: u64) {
    n.req(
        2,
        ShardOp::Ack {
            mesh: MeshId::must("m"),
            peer: PeerId::must(peer),
            upto,
        },
    );
}

#[test]
fn a_batch_is_taken_whole_under_backpressure() {
    // Proves `handle_requests` answers every request of a batch even when the shard stops
    // wanting input halfway through it (the glue checks `wants_input` between batches only).
    let mut n = Node::new(ShardConfig {
        wal_batch_bytes_max: 512,
        pending_acks_max: 4,
        ..ShardConfig::default()
    });
    let batch: Vec<Request> = (1..=50)
        .map(|r| Request {
            session: 1,
            op: ShardOp::Append {
                r,
                mesh: MeshId::must("m"),
                conv: ConvId::must("c"),
                from: PeerId::must("a"),
                body: Body::from_json_text("\"a body that fills the batch\"".to_string()).unwrap(),
                key: None,
            },
        })
        .collect();
    n.shard.handle_requests(n.now, batch);
    assert!(!n.shard.wants_input(), "the shard is past its limits");
    let out = n.pump();
    let mut answered: Vec<u64> = oks(&out).iter().map(|o| o.0).collect();
    answered.sort_unstable();
    assert_eq!(
        answered,
        (1..=50).collect::<Vec<_>>(),
        "every request answered"
    );
    let seqs: Vec<u64> = oks(&out).iter().filter_map(|o| o.2).collect();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>(), "in order, dense");
}

#[test]
fn no_write_is_longer_than_the_batch_limit_plus_one_record() {
    // Proves writes are cut at wal_batch_bytes_max: the records the shard makes itself (a big
    // checkpoint after many conversations) go into several writes, each within the bound
    // recovery relies on.
    let config = ShardConfig {
        wal_batch_bytes_max: 4_096,
        wal_segment_bytes_max: 8_192,
        retention_bytes_max: 8_192,
        ..ShardConfig::default()
    };
    let bound = config.wal_batch_bytes_max + wal::RECORD_BYTES_MAX;
    let mut n = Node::new(config);
    let mut largest = 0;
    let mut writes = 0;
    for i in 0..600u64 {
        n.append(1, i, &format!("conversation-{i:0>100}"), "1", None);
        while let Some(w) = n.shard.poll_wal() {
            largest = largest.max(w.bytes.len());
            writes += 1;
            n.write(&w);
            n.shard.handle_wal_done(n.now, w.last_lsn);
            while n.shard.poll_output().is_some() {}
        }
    }
    assert!(n.shard.stats().segments_deleted > 0, "checkpoints ran");
    assert!(largest <= bound, "a write of {largest} bytes");
    assert!(writes > 600, "checkpoints took writes of their own");
    n.restart();
    n.append(1, 1, &format!("conversation-{:0>100}", 7), "2", None);
    assert_eq!(oks(&n.pump()), vec![(1, None, Some(2))], "heads survive");
}

#[test]
fn a_checkpoint_larger_than_a_record_part_is_split_and_recovers() {
    // Proves the audit's crash: thousands of conversations with long ids make a checkpoint far
    // over one part; it is written in parts (no panic, no 503 loop) and a restart after the
    // segments it covers are deleted restores every head.
    let mut n = Node::new(ShardConfig {
        wal_segment_bytes_max: 256 * 1024,
        retention_bytes_max: 512 * 1024,
        ..ShardConfig::default()
    });
    let conv = |i: u64| format!("{i:0>120}");
    for i in 0..12_000u64 {
        n.append(1, i, &conv(i), "1", None);
        if i % 500 == 0 {
            n.pump();
        }
    }
    n.pump();
    // Keep writing into a few conversations until retention has deleted old segments.
    let mut r = 0;
    while n.shard.stats().segments_deleted < 3 {
        r += 1;
        n.append(1, r, &conv(r % 3), "\"filler filler filler filler\"", None);
        n.pump();
        assert!(r < 200_000, "retention never ran");
    }
    n.restart();
    for i in [0u64, 5_000, 11_999] {
        n.append(1, i, &conv(i), "2", None);
        let seq = oks(&n.pump())[0].2.unwrap();
        assert!(seq >= 2, "conversation {i} kept its head ({seq})");
    }
}

#[test]
fn conversations_per_mesh_are_bounded() {
    // Proves a mesh cannot grow conversations (and checkpoints) without limit: the first
    // append to one more than mesh_conversations_max is refused with too_large; existing ones
    // go on, also after a restart.
    let mut n = Node::new(ShardConfig {
        mesh_conversations_max: 3,
        ..ShardConfig::default()
    });
    for (r, c) in ["a", "b", "c"].iter().enumerate() {
        n.append(1, r as u64, c, "1", None);
    }
    assert_eq!(oks(&n.pump()).len(), 3);
    n.append(1, 9, "d", "1", None);
    assert_eq!(error_code(&n.pump()), Some(ErrorCode::TooLarge));
    n.restart();
    n.append(1, 10, "d", "1", None);
    assert_eq!(error_code(&n.pump()), Some(ErrorCode::TooLarge));
    n.append(1, 11, "a", "1", None);
    assert_eq!(oks(&n.pump()), vec![(11, None, Some(2))]);
}

#[test]
fn subscriptions_are_bounded_and_leave_nothing_behind() {
    // Proves subscriptions to conversations that do not exist keep no state once the session
    // unsubscribes or closes, and one session cannot hold more than
    // session_subscriptions_max of them.
    let mut n = Node::new(ShardConfig {
        session_subscriptions_max: 100,
        ..ShardConfig::default()
    });
    let sub = |n: &mut Node, r: u64, conv: String| {
        n.req(
            7,
            ShardOp::Subscribe {
                r,
                mesh: MeshId::must("m"),
                conv: ConvId::must(&conv),
                from: 1,
            },
        );
    };
    for i in 0..100 {
        sub(&mut n, i, format!("nothing-{i}"));
    }
    assert_eq!(oks(&n.pump()).len(), 100);
    sub(&mut n, 100, "one-more".into());
    assert_eq!(error_code(&n.pump()), Some(ErrorCode::TooLarge));
    assert_eq!(n.shard.conversation_count(), 100);
    n.req(
        7,
        ShardOp::Unsubscribe {
            r: 101,
            mesh: MeshId::must("m"),
            conv: ConvId::must("nothing-0"),
        },
    );
    n.pump();
    assert_eq!(n.shard.conversation_count(), 99);
    n.req(7, ShardOp::Closed);
    n.pump();
    assert_eq!(n.shard.conversation_count(), 0, "nothing kept after close");
    assert!(n.shard.session_ids().is_empty());
}

#[test]
fn a_silent_recipient_fills_its_inbox_backlog_and_sends_are_refused_not_dropped() {
    // Proves the audit's case: sends to a peer that never acknowledges are refused with
    // inbox_full once its backlog is at inbox_backlog_bytes_max; nothing accepted is dropped
    // (all of it is delivered when it connects), and acknowledging frees the backlog.
    let mut n = Node::new(ShardConfig {
        inbox_backlog_bytes_max: 10_000,
        ..ShardConfig::default()
    });
    n.setup_mesh(&[("a", &[]), ("silent", &[]), ("b", &[])]);
    let body = format!("\"{}\"", "x".repeat(998));
    let mut accepted = Vec::new();
    for r in 0..20 {
        n.send(1, r, "a", "silent", &body);
        let out = n.pump();
        match oks(&out).first() {
            Some((_, Some(pos), _)) => accepted.push(*pos),
            _ => assert_eq!(error_code(&out), Some(ErrorCode::InboxFull)),
        }
    }
    assert_eq!(accepted.len(), 10, "10 x 1000 bytes fit in 10,000");
    n.send(1, 50, "a", "b", "\"others still get mail\"");
    assert_eq!(oks(&n.pump()).len(), 1);
    n.send(
        1,
        51,
        "a",
        "*",
        "\"a broadcast reaches the silent peer too\"",
    );
    assert_eq!(error_code(&n.pump()), Some(ErrorCode::InboxFull));
    n.restart();
    let out = n.hello(3, "silent");
    assert_eq!(
        deliveries(&out, 3),
        accepted,
        "everything accepted is delivered"
    );
    ack(&mut n, "silent", accepted[4]);
    n.pump();
    n.send(1, 60, "a", "silent", &body);
    assert_eq!(oks(&n.pump()).len(), 1, "acknowledging frees room");
}

#[test]
fn the_mesh_backlog_counts_each_message_once_and_is_bounded() {
    // Proves mesh_inbox_backlog_bytes_max bounds a mesh's unacknowledged bytes (a broadcast
    // counts once, whatever its recipients), and a message acknowledged by every recipient
    // leaves memory and the backlog.
    let mut n = Node::new(ShardConfig {
        mesh_inbox_backlog_bytes_max: 3_000,
        ..ShardConfig::default()
    });
    n.setup_mesh(&[("a", &[]), ("b", &[]), ("c", &[])]);
    let body = format!("\"{}\"", "y".repeat(998));
    for r in 0..3 {
        n.send(1, r, "a", "*", &body);
    }
    assert_eq!(oks(&n.pump()).len(), 3);
    assert_eq!(n.shard.mesh_stats("m", 100).unwrap().backlog_bytes, 3_000);
    n.send(1, 4, "a", "*", &body);
    assert_eq!(error_code(&n.pump()), Some(ErrorCode::InboxFull));
    ack(&mut n, "b", 3);
    n.pump();
    let left = |n: &Node| n.shard.mesh_stats("m", 100).unwrap().backlog_bytes;
    assert_eq!(left(&n), 3_000, "c still needs them");
    ack(&mut n, "c", 2);
    n.pump();
    assert_eq!(left(&n), 1_000);
    n.restart();
    assert_eq!(left(&n), 1_000, "recounted after a restart");
}

#[test]
fn a_peer_added_later_starts_at_the_head() {
    // Proves recipients are fixed when a message is sent: a peer added afterwards does not
    // receive earlier broadcasts, before or after a restart.
    let mut n = Node::new(ShardConfig::default());
    n.setup_mesh(&[("a", &[]), ("b", &[])]);
    n.send(1, 1, "a", "*", "\"before\"");
    n.pump();
    n.req(
        0,
        ShardOp::AddPeer {
            r: 2,
            mesh: MeshId::must("m"),
            peer: PeerId::must("late"),
            groups: Vec::new(),
            token_hash: Some(token_hash("tok-late")),
            public_key: None,
        },
    );
    n.pump();
    n.send(1, 3, "a", "*", "\"after\"");
    n.pump();
    assert_eq!(deliveries(&n.hello(4, "late"), 4), vec![2]);
    n.restart();
    assert_eq!(deliveries(&n.hello(5, "late"), 5), vec![2]);
}

#[test]
fn retention_keeps_the_wal_bounded_with_segments_smaller_than_a_write() {
    // Proves the audit's case: 65,536-byte segments, one message that is never acknowledged,
    // and appends in writes of 100 x 1 KB: the WAL stays within 4x retention_bytes_max
    // (it grew to 47 segments where the limit allows 4).
    let retention = 4 * 65_536;
    let mut n = Node::new(ShardConfig {
        wal_segment_bytes_max: 65_536,
        retention_bytes_max: retention,
        ..ShardConfig::default()
    });
    n.setup_mesh(&[("a", &[]), ("never", &[])]);
    n.send(1, 0, "a", "never", "\"kept until acknowledged\"");
    n.pump();
    let body = format!("\"{}\"", "z".repeat(1_000));
    let mut most = 0;
    for round in 0..300u64 {
        for i in 0..100 {
            n.append(1, round * 100 + i, "c", &body, None);
        }
        n.pump();
        most = most.max(n.shard.wal_bytes());
    }
    assert!(
        n.shard.stats().segments_deleted > 100,
        "retention kept running"
    );
    assert!(most <= 4 * retention, "the WAL reached {most} bytes");
    n.restart();
    assert_eq!(deliveries(&n.hello(3, "never"), 3), vec![1]);
}
