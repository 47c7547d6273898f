//! The heartbeat batching of a node pair's link.

use super::*;
use fabric_shard::raft::Message;

fn beat(shard: u32, from: u64, to: u64) -> (u32, NodeFrame) {
    let body = MessageBody::Heartbeat {
        commit: u64::from(shard),
        read_seq: 1,
    };
    let m = Message {
        from,
        to,
        term: 3,
        body,
    };
    (shard, NodeFrame::Peer(PeerMessage::Raft(m)))
}

fn answer(shard: u32) -> (u32, NodeFrame) {
    let m = Message {
        from: 2,
        to: 1,
        term: 3,
        body: MessageBody::HeartbeatResponse { read_seq: 1 },
    };
    (shard, NodeFrame::Peer(PeerMessage::Raft(m)))
}

fn append(shard: u32) -> (u32, NodeFrame) {
    let m = Message {
        from: 1,
        to: 2,
        term: 3,
        body: MessageBody::Append {
            prev_index: 1,
            prev_term: 3,
            entries: Vec::new(),
            commit: 1,
        },
    };
    (shard, NodeFrame::Peer(PeerMessage::Raft(m)))
}

#[test]
fn heartbeats_of_many_shards_to_one_node_leave_as_one_frame() {
    // Proves a batch's heartbeats and heartbeat answers of every shard become one Beats frame
    // on BEATS_GROUP where the first was, the other frames keeping their order, and that the
    // receiver gives each back to its shard unchanged.
    let original = vec![
        append(0),
        beat(0, 1, 2),
        append(1),
        beat(1, 1, 2),
        answer(2),
    ];
    let mut batch = original.clone();
    coalesce(&mut batch);
    assert_eq!(batch.len(), 3, "{batch:?}");
    assert_eq!(batch[0], append(0));
    assert_eq!(batch[1].0, BEATS_GROUP);
    assert_eq!(batch[2], append(1));
    let (group, frame) = batch.remove(1);
    let back = expand(group, frame);
    let beats: Vec<(u32, NodeFrame)> = original.into_iter().filter(|(_, f)| is_beat(f)).collect();
    assert_eq!(back, beats);
}

#[test]
fn a_lone_heartbeat_stays_on_its_shard_and_big_batches_split() {
    // Proves a batch with one heartbeat is left alone (nothing to save), and one with more
    // than BEATS_PER_FRAME_MAX heartbeats makes several frames, none over the limit.
    let mut one = vec![append(0), beat(1, 1, 2)];
    let before = one.clone();
    coalesce(&mut one);
    assert_eq!(one, before);
    let n = BEATS_PER_FRAME_MAX + 10;
    let mut many: Vec<(u32, NodeFrame)> = (0..n as u32).map(|s| beat(s, 1, 2)).collect();
    coalesce(&mut many);
    let sizes: Vec<usize> = many
        .iter()
        .map(|(g, f)| match f {
            NodeFrame::Beats(b) if *g == BEATS_GROUP => b.len(),
            _ => 0,
        })
        .collect();
    assert_eq!(sizes, vec![BEATS_PER_FRAME_MAX, 10]);
}

#[test]
fn a_beats_frame_out_of_place_or_holding_other_messages_is_dropped() {
    // Proves the receiver takes a Beats frame only on BEATS_GROUP and only its heartbeats:
    // an append smuggled into one, a Beats frame on a shard's stream, or another frame on the
    // beats stream gives nothing to any shard.
    let NodeFrame::Peer(m) = append(0).1 else {
        unreachable!()
    };
    let NodeFrame::Peer(b) = beat(1, 1, 2).1 else {
        unreachable!()
    };
    let mixed = NodeFrame::Beats(vec![(0, m), (1, b.clone())]);
    assert_eq!(expand(BEATS_GROUP, mixed), vec![beat(1, 1, 2)]);
    assert!(expand(0, NodeFrame::Beats(vec![(1, b)])).is_empty());
    assert!(expand(BEATS_GROUP, append(0).1).is_empty());
    assert_eq!(expand(4, append(4).1), vec![append(4)]);
}
