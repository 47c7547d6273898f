//! Idempotency keys: exact for the newest segment, fingerprints for sealed segments confirmed
//! on disk; a retry gets its original seq wherever the original is retained.

use super::*;

fn small_segments() -> ShardConfig {
    ShardConfig {
        wal_segment_bytes_max: 1_500,
        retention_bytes_max: 1 << 30,
        log_cache_bytes_max: 0,
        ..ShardConfig::default()
    }
}

fn conv_keys(n: &Node, conv: &str) -> usize {
    n.shard.convs[&(Arc::from("m"), Arc::from(conv))].keys.len()
}

fn seq_of(out: &[Output], r: u64) -> Option<u64> {
    oks(out)
        .into_iter()
        .find(|(x, _, _)| *x == r)
        .and_then(|(_, _, s)| s)
}

#[test]
fn a_retry_whose_original_is_in_a_sealed_segment_gets_the_original_seq_from_disk() {
    // Proves a key that left memory (its segment was sealed) is still found: the retry is
    // answered with the original seq after a lookup on disk, and appends sent behind it to
    // the same conversation get the next seqs in the order they came.
    let mut n = Node::new(small_segments());
    n.append(1, 1, "c", "\"first\"", Some("k1"));
    assert_eq!(seq_of(&n.pump(), 1), Some(1));
    for i in 2..=80u64 {
        n.append(1, i, "c", "\"filler\"", Some(&format!("f{i}")));
        n.pump();
    }
    assert!(n.shard.segment_count() > 3);
    assert!(conv_keys(&n, "c") < 20, "sealed segments' keys left memory");
    n.append(2, 100, "c", "\"retry\"", Some("k1"));
    n.append(2, 101, "c", "\"after\"", None);
    n.append(3, 102, "c", "\"other session\"", Some("fresh"));
    let out = n.pump();
    assert_eq!(seq_of(&out, 100), Some(1), "the original seq");
    assert_eq!(seq_of(&out, 101), Some(81));
    assert_eq!(seq_of(&out, 102), Some(82));
    assert_eq!(n.shard.stats().key_lookups_found, 1);
    assert_eq!(n.shard.keys.parked_count, 0);
}

#[test]
fn a_fresh_key_that_matches_no_fingerprint_needs_no_disk_read() {
    // Proves the fingerprints keep new keys off the disk: appends with keys never used do
    // not look anything up (a lookup only follows a fingerprint match).
    let mut n = Node::new(small_segments());
    for i in 1..60u64 {
        n.append(1, i, "c", "\"x\"", Some(&format!("k{i}")));
        n.pump();
    }
    assert_eq!(n.shard.stats().key_lookups, 0);
    assert!(n.shard.keys.sealed_fingerprints() > 30);
}

#[test]
fn keys_survive_a_restart_as_fingerprints_and_are_still_found() {
    // Proves recovery rebuilds the same split (exact keys for the newest segment,
    // fingerprints for the rest) and a retry after a restart still gets its original seq.
    let mut n = Node::new(small_segments());
    for i in 1..50u64 {
        n.append(1, i, "c", "\"x\"", Some(&format!("k{i}")));
        n.pump();
    }
    let (exact, sealed) = (conv_keys(&n, "c"), n.shard.keys.sealed_fingerprints());
    n.restart();
    assert_eq!(
        conv_keys(&n, "c") + n.shard.keys.sealed_fingerprints(),
        exact + sealed
    );
    n.append(2, 200, "c", "\"retry\"", Some("k3"));
    assert_eq!(seq_of(&n.pump(), 200), Some(3));
}

#[test]
fn memory_for_keys_is_the_newest_segment_not_retention() {
    // Proves exact keys in memory stay bounded by what the newest segment holds while the
    // retained keyed entries grow: the rest is 4 bytes a key.
    let mut n = Node::new(ShardConfig {
        wal_segment_bytes_max: 4_000,
        ..small_segments()
    });
    for i in 1..=600u64 {
        n.append(1, i, "c", "\"x\"", Some(&format!("key-{i}")));
        if i % 10 == 0 {
            n.pump();
        }
    }
    n.pump();
    assert!(
        conv_keys(&n, "c") <= 60,
        "{} exact keys",
        conv_keys(&n, "c")
    );
    assert_eq!(conv_keys(&n, "c"), n.shard.keys.open_keys());
    assert_eq!(
        n.shard.keys.open_keys() + n.shard.keys.sealed_fingerprints(),
        600
    );
}

fn pos_of(out: &[Output], r: u64) -> Option<u64> {
    oks(out)
        .into_iter()
        .find(|(x, _, _)| *x == r)
        .and_then(|(_, p, _)| p)
}

/// A mesh of a sender and a recipient, with small segments and no log cache.
fn send_node() -> Node {
    let mut n = Node::new(small_segments());
    n.setup_mesh(&[("a", &[]), ("b", &[])]);
    n
}

#[test]
fn a_retried_send_with_its_key_gets_the_original_pos_and_is_stored_once() {
    // Proves a send's key dedupes like an append's: a retry answers with the original
    // position and writes nothing, so the recipient's inbox holds the message once.
    let mut n = send_node();
    n.send_keyed(1, 1, "a", "b", "\"hi\"", Some("s1"));
    assert_eq!(pos_of(&n.pump(), 1), Some(1));
    let records = n.shard.stats().records_written;
    n.send_keyed(1, 2, "a", "b", "\"hi again\"", Some("s1"));
    assert_eq!(pos_of(&n.pump(), 2), Some(1), "the original position");
    assert_eq!(n.shard.stats().records_written, records, "nothing written");
    n.send_keyed(1, 3, "a", "b", "\"new\"", Some("s2"));
    assert_eq!(pos_of(&n.pump(), 3), Some(2));
    let welcome = n.hello(9, "b");
    assert_eq!(deliveries(&welcome, 9), vec![1, 2]);
}

#[test]
fn a_send_key_is_scoped_to_its_sender() {
    // Proves two peers may use the same key: each gets a message of its own (the key is the
    // sender's, not the mesh's), and an append's key never answers a send.
    let mut n = send_node();
    n.send_keyed(1, 1, "a", "b", "\"from a\"", Some("same"));
    n.send_keyed(2, 2, "b", "a", "\"from b\"", Some("same"));
    n.append(1, 3, "c", "\"entry\"", Some("same"));
    let out = n.pump();
    assert_eq!(pos_of(&out, 1), Some(1));
    assert_eq!(pos_of(&out, 2), Some(2));
    assert_eq!(seq_of(&out, 3), Some(1));
}

#[test]
fn a_retried_send_whose_original_is_in_a_sealed_segment_is_found_on_disk() {
    // Proves a send key that left memory is confirmed by a disk read, across a restart too,
    // and that sends of the same sender behind the lookup keep their order.
    let mut n = send_node();
    n.send_keyed(1, 1, "a", "b", "\"first\"", Some("k1"));
    assert_eq!(pos_of(&n.pump(), 1), Some(1));
    for i in 2..=60u64 {
        n.send_keyed(1, i, "a", "b", "\"filler\"", Some(&format!("f{i}")));
        n.pump();
    }
    assert!(n.shard.segment_count() > 3);
    assert!(
        n.shard.keys.sent.len() < 20,
        "sealed segments' keys left memory"
    );
    n.restart();
    n.send_keyed(2, 100, "a", "b", "\"retry\"", Some("k1"));
    n.send_keyed(2, 101, "a", "b", "\"after\"", None);
    let out = n.pump();
    assert_eq!(pos_of(&out, 100), Some(1), "the original position");
    assert_eq!(pos_of(&out, 101), Some(61));
    assert_eq!(n.shard.stats().key_lookups_found, 1);
    assert_eq!(n.shard.keys.parked_count, 0);
}

#[test]
fn a_send_key_outlives_its_segment_while_retention_copies_the_message_forward() {
    // Proves the key travels with an unacknowledged message that retention copies into a new
    // segment: once the original's segment is deleted, a retry still gets the same position.
    let mut n = Node::new(ShardConfig {
        wal_segment_bytes_max: 1_500,
        retention_bytes_max: 6_000,
        log_cache_bytes_max: 0,
        ..ShardConfig::default()
    });
    n.setup_mesh(&[("a", &[]), ("b", &[]), ("c", &[])]);
    n.send_keyed(1, 1, "a", "b", "\"keep me\"", Some("k1"));
    n.pump();
    let first = *n.disk.segments().keys().next().unwrap();
    for i in 2..=200u64 {
        // Traffic to c, which c acknowledges, pushes retention forward.
        n.send(1, i, "a", "c", "\"filler\"");
        n.pump();
        n.req(
            0,
            ShardOp::Ack {
                mesh: MeshId::must("m"),
                peer: PeerId::must("c"),
                upto: i,
            },
        );
        n.pump();
    }
    assert!(
        !n.disk.segments().contains_key(&first),
        "the first segment is gone"
    );
    n.send_keyed(2, 500, "a", "b", "\"retry\"", Some("k1"));
    assert_eq!(pos_of(&n.pump(), 500), Some(1));
}

/// Sends `from` a to c at position `r` and has c acknowledge it: WAL traffic that retention
/// never has to keep.
fn acked_filler(n: &mut Node, r: u64) {
    n.send(1, r, "a", "c", "\"filler\"");
    n.pump();
    let (mesh, peer) = (MeshId::must("m"), PeerId::must("c"));
    n.req(
        0,
        ShardOp::Ack {
            mesh,
            peer,
            upto: r,
        },
    );
    n.pump();
}

#[test]
fn a_send_key_copied_forward_after_a_restart_survives_the_deletion_of_its_segment() {
    // Proves a copy forward keeps a send's key exact even when the segment sealed under it
    // holds the original at the same position: after a restart whose newest segments hold no
    // key (the original's segment is still the one with exact keys), the first round copies
    // the unacknowledged message forward and deletes its segment, and a retry gets pos 1.
    let mut n = Node::new(ShardConfig {
        wal_segment_bytes_max: 1_500,
        retention_bytes_max: 1 << 30,
        log_cache_bytes_max: 0,
        ..ShardConfig::default()
    });
    n.setup_mesh(&[("a", &[]), ("b", &[]), ("c", &[])]);
    n.send_keyed(1, 1, "a", "b", "\"keep me\"", Some("k1"));
    assert_eq!(pos_of(&n.pump(), 1), Some(1));
    let original = n.last_segment();
    let mut r = 2;
    while n.last_segment() < original + 2 {
        acked_filler(&mut n, r);
        r += 1;
    }
    // Restarted with a lower limit, so that the next write starts a round (before any new
    // segment seals the original's keys).
    n.shard.config.retention_bytes_max = 1_000;
    n.restart();
    while n.disk.segments().contains_key(&original) {
        acked_filler(&mut n, r);
        r += 1;
    }
    assert!(n.shard.stats().records_copied_forward > 0);
    n.send_keyed(2, 500, "a", "b", "\"retry\"", Some("k1"));
    assert_eq!(pos_of(&n.pump(), 500), Some(1), "the original position");
}
