//! The one apply path: replaying the log rebuilds exactly the state the live path built.

use super::*;
use fabric_proto::{MeshId, PeerId};

/// Everything a record describes, in a fixed order (maps sorted), without what is not durable
/// (sessions, subscribers, credit, delivery progress, building flags).
fn durable_state(s: &Shard) -> String {
    let mut out = String::new();
    let mut meshes: Vec<_> = s.meshes.iter().collect();
    meshes.sort_by(|a, b| a.0.cmp(b.0));
    for (id, m) in meshes {
        out += &format!(
            "mesh {id} exists={} head={} durable={} backlog={}\n",
            m.exists, m.head, m.durable_pos, m.backlog_bytes
        );
        // Peer indexes are memory's own (a replay may meet a peer as a message's target
        // before the checkpoint that defines the others): peers by id, senders by id.
        let mut peers: Vec<_> = m.peers.iter().collect();
        peers.sort_by(|a, b| a.id.cmp(&b.id));
        for p in peers {
            out += &format!(
                "  peer {} placeholder={} groups={:?} acked={} backlog={} token={} key={}\n",
                p.id,
                p.placeholder,
                p.groups,
                p.acked,
                p.backlog_bytes,
                p.token_hash.is_some(),
                p.public_key.is_some()
            );
        }
        for (pos, msg) in &m.log {
            out += &format!(
                "  msg {pos} from={} lsn={} pending={} body={:?}\n",
                m.peers[msg.from as usize].id, msg.lsn, msg.pending, msg.body
            );
        }
    }
    let mut convs: Vec<_> = s.convs.iter().filter(|(_, c)| c.head > 0).collect();
    convs.sort_by(|a, b| a.0.cmp(b.0));
    for (ck, c) in convs {
        out += &format!(
            "conv {ck:?} head={} durable={} first={} keys={}\n",
            c.head,
            c.durable_seq,
            c.first_seq,
            c.keys.len()
        );
        for m in &c.marks {
            out += &format!("  mark {m:?}\n");
        }
        for e in &c.cached {
            out += &format!("  cached {} lsn={} key={:?}\n", e.seq, e.lsn, e.key);
        }
    }
    let mut mesh_convs: Vec<_> = s.mesh_convs.iter().collect();
    mesh_convs.sort();
    out += &format!("mesh_convs {mesh_convs:?}\n");
    out += &format!("inbox_by_lsn {:?}\n", s.inbox_by_lsn);
    out += &format!("convs_by_lsn {:?}\n", s.convs_by_lsn);
    out += &format!("cache_bytes {}\n", s.cache_bytes);
    out += &format!(
        "keys open {} sealed {}\n",
        s.keys.open_keys(),
        s.keys.sealed_fingerprints()
    );
    out += &format!("next_lsn {} durable_lsn {}\n", s.next_lsn, s.durable_lsn);
    out
}

#[test]
fn replaying_the_log_rebuilds_the_state_the_live_path_built() {
    // Proves live handlers and recovery share one apply path: after sends to peers, groups
    // and everyone, partial acks, keyed appends, and retention rounds (copies forward,
    // checkpoints, deleted segments), a restart rebuilds the same durable state, field by field.
    replay_matches_live(ShardConfig {
        wal_segment_bytes_max: 4_000,
        retention_bytes_max: 12_000,
        ..ShardConfig::default()
    });
}

#[test]
fn replaying_the_log_rebuilds_the_disk_index_and_cache_the_live_path_built() {
    // Proves the conversations' disk index (marks) and the log cache after a restart are the
    // ones the live path built, when most entries live only on disk.
    replay_matches_live(ShardConfig {
        wal_segment_bytes_max: 4_000,
        retention_bytes_max: 12_000,
        log_cache_bytes_max: 1_000,
        log_index_stride_records: 4,
        ..ShardConfig::default()
    });
}

fn replay_matches_live(config: ShardConfig) {
    let mut n = Node::new(config);
    n.setup_mesh(&[
        ("a", &["ops"]),
        ("b", &["ops"]),
        ("c", &[]),
        ("d", &["ops"]),
    ]);
    for i in 0..400u64 {
        let to = ["b", "group:ops", "*", "c"][(i % 4) as usize];
        n.send(1, i, "a", to, &format!("\"m{i}\""));
        let conv = ["x", "y", "z"][(i % 3) as usize];
        let key = (i % 5 == 0).then(|| format!("k{i}"));
        n.append(1, i, conv, "\"e\"", key.as_deref());
        if i % 40 == 0 {
            // Most of the backlog is acknowledged (so retention can free segments), but not
            // all: d lags, so some messages are copied forward.
            for (peer, upto) in [("b", i), ("c", i), ("d", i.saturating_sub(60))] {
                n.req(
                    2,
                    ShardOp::Ack {
                        mesh: MeshId::must("m"),
                        peer: PeerId::must(peer),
                        upto,
                    },
                );
            }
        }
        n.pump();
    }
    assert!(n.shard.stats().segments_deleted > 0, "retention ran");
    assert!(n.shard.stats().records_copied_forward > 0, "copies ran");
    let live = durable_state(&n.shard);
    n.restart();
    assert_eq!(durable_state(&n.shard), live);
}

#[test]
fn a_live_checkpoint_restates_state_and_makes_nothing_visible_early() {
    // Proves applying a checkpoint on the live path (a retention round) leaves heads and
    // visibility alone: a send framed in the same batch is not visible before it is durable.
    let mut n = Node::new(ShardConfig::default());
    n.setup_mesh(&[("a", &[]), ("b", &[])]);
    n.send(1, 1, "a", "b", "\"one\"");
    n.pump();
    let before = durable_state(&n.shard);
    let mut parts = n.shard.checkpoint_parts_for_test();
    n.send(1, 2, "a", "b", "\"two\"");
    for p in parts.drain(..) {
        n.shard.propose(Record::CheckpointPart(p)).expect("framed");
    }
    let m = &n.shard.meshes["m"];
    assert_eq!((m.head, m.durable_pos), (2, 1), "pos 2 waits for its write");
    n.pump();
    assert_ne!(durable_state(&n.shard), before);
    assert_eq!(n.shard.meshes["m"].durable_pos, 2);
}

/// One frame of a test segment: its first LSN, its records with their terms, its flags.
type TestFrame = (u64, Vec<(u64, Record)>, u32);

/// A segment file of shard 0 starting at `first_lsn`: one frame per entry of `frames`.
fn segment_file(id: u64, first_lsn: u64, frames: &[TestFrame]) -> Vec<u8> {
    let header = wal::SegmentHeader {
        shard: 0,
        segment: id,
        first_lsn,
    };
    let mut out = header.encode().to_vec();
    for (first, records, flags) in frames {
        let start = out.len();
        out.extend_from_slice(&[0; wal::FRAME_HEADER_BYTES]);
        for (i, (term, rec)) in records.iter().enumerate() {
            wal::encode_record(first + i as u64, *term, rec, &mut out).expect("small");
        }
        wal::FrameHeader::seal_flags(&mut out[start..], *first, records.len() as u32, *flags);
    }
    out
}

fn mesh_rec(name: &str) -> Record {
    Record::MeshCreated(crate::record::MeshRec { mesh: name.into() })
}

#[test]
fn replica_recovery_applies_to_the_commit_hint_and_drops_what_a_rewind_replaced() {
    // Proves a replica's recovery applies records up to the manifest's commit hint only, keeps
    // the rest unapplied in order, and never applies a record a later segment's rewind frame
    // replaced (mesh "dead" exists only in the replaced suffix).
    let one = segment_file(
        1,
        1,
        &[(
            1,
            vec![
                (1, mesh_rec("a")),
                (1, mesh_rec("b")),
                (1, mesh_rec("dead")),
            ],
            0,
        )],
    );
    let two = segment_file(
        2,
        4,
        &[(
            3,
            vec![(2, mesh_rec("c")), (2, Record::Noop)],
            wal::FRAME_FLAG_REWIND,
        )],
    );
    let mut r = Recoverer::replica(ShardConfig::default(), 3, 16);
    r.handle_segment(1, "one", &one, false).expect("segment 1");
    r.handle_segment(2, "two", &two, true).expect("segment 2");
    let manifest = wal::Manifest {
        oldest: 1,
        newest: 2,
        commit: 3,
        ..wal::Manifest::empty(0)
    };
    let (shard, _, log) = r.finish_replica(manifest);
    assert!(shard.meshes.contains_key("a") && shard.meshes.contains_key("b"));
    assert!(
        shard.meshes.contains_key("c"),
        "lsn 3 (the rewind's) is committed"
    );
    assert!(!shard.meshes.contains_key("dead"));
    assert_eq!(log.applied, 3);
    let tail: Vec<(u64, u64)> = log.tail.iter().map(|t| (t.lsn, t.term)).collect();
    assert_eq!(tail, vec![(4, 2)]);
    let runs: Vec<(u64, u64)> = log
        .term_runs
        .iter()
        .map(|r| (r.first_index, r.term))
        .collect();
    assert_eq!(runs, vec![(1, 1), (3, 2)]);
    assert_eq!(shard.next_lsn, 5);
}

#[test]
fn recovery_refuses_a_rewind_into_applied_records() {
    // Proves a rewind frame that would replace records already applied (committed, or a shard
    // without replication) refuses to start, naming the segment.
    let one = segment_file(
        1,
        1,
        &[(1, vec![(1, mesh_rec("a")), (1, mesh_rec("b"))], 0)],
    );
    let two = segment_file(
        2,
        3,
        &[(2, vec![(2, mesh_rec("c"))], wal::FRAME_FLAG_REWIND)],
    );
    let mut r = Recoverer::new(ShardConfig::default());
    r.handle_segment(1, "one", &one, false).expect("segment 1");
    let err = r.handle_segment(2, "two", &two, true).expect_err("refused");
    let msg = err.to_string();
    assert!(msg.contains("two") && msg.contains("rewind"), "{msg}");
}
