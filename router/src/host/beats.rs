//! Heartbeats batched per node pair, not per shard group. Every shard's Raft leader
//! heartbeats each follower every `raft_heartbeat_ms`, and each follower answers: with S shards
//! that is S frames each way per pair and interval. The node link takes what is queued for a
//! peer in one batch; [`coalesce`] folds the batch's heartbeats and heartbeat answers into one
//! [`NodeFrame::Beats`] frame on [`BEATS_GROUP`], and the receiving node hands each back to its
//! shard ([`expand`]). Pure functions over the batch, so the node's link and a test run the
//! same decision.
//!
//! Raft takes messages in any order, so moving heartbeats off their shard's stream is safe: a
//! heartbeat's commit is capped at what the follower matches, and its ReadIndex round is
//! counted only for the term it names.

use super::NodeFrame;
use fabric_shard::raft::MessageBody;
use fabric_shard::replica::PeerMessage;

/// The link group that carries [`NodeFrame::Beats`] (below the link's control group; shard
/// indexes are far below it).
pub const BEATS_GROUP: u32 = u32::MAX - 1;

/// Heartbeats in one [`NodeFrame::Beats`] frame: a batch with more makes several frames. Each
/// is about 40 bytes, so a full frame stays far below `node_frame_bytes_max`.
pub const BEATS_PER_FRAME_MAX: usize = 4_096;

/// Whether `frame` is a Raft heartbeat or a heartbeat's answer.
pub fn is_beat(frame: &NodeFrame) -> bool {
    matches!(
        frame,
        NodeFrame::Peer(PeerMessage::Raft(m))
            if matches!(m.body, MessageBody::Heartbeat { .. } | MessageBody::HeartbeatResponse { .. })
    )
}

/// Folds the heartbeats of a batch of (group, frame) for one peer into [`NodeFrame::Beats`]
/// frames, placed where the first heartbeat was; every other frame keeps its order. A batch
/// with fewer than two heartbeats is left as it is.
pub fn coalesce(batch: &mut Vec<(u32, NodeFrame)>) {
    let beats = batch.iter().filter(|(_, f)| is_beat(f)).count();
    if beats < 2 {
        return;
    }
    let first = batch.iter().position(|(_, f)| is_beat(f)).unwrap_or(0);
    let mut folded: Vec<(u32, PeerMessage)> = Vec::with_capacity(beats);
    let mut rest: Vec<(u32, NodeFrame)> = Vec::with_capacity(batch.len() - beats);
    for (group, frame) in batch.drain(..) {
        match frame {
            NodeFrame::Peer(m) if is_beat_message(&m) => folded.push((group, m)),
            other => rest.push((group, other)),
        }
    }
    let frames = folded
        .chunks(BEATS_PER_FRAME_MAX)
        .map(|c| (BEATS_GROUP, NodeFrame::Beats(c.to_vec())));
    batch.extend(rest.drain(..first));
    batch.extend(frames);
    batch.extend(rest);
}

fn is_beat_message(m: &PeerMessage) -> bool {
    matches!(m, PeerMessage::Raft(r)
        if matches!(r.body, MessageBody::Heartbeat { .. } | MessageBody::HeartbeatResponse { .. }))
}

/// What a received frame holds, as (shard, frame): a [`NodeFrame::Beats`] frame gives each of
/// its messages to its shard; any other frame is its group's. A Beats frame on another group,
/// or anything but heartbeats inside one, is dropped: a peer that sends it is broken, and
/// heartbeats are resent.
pub fn expand(group: u32, frame: NodeFrame) -> Vec<(u32, NodeFrame)> {
    match frame {
        NodeFrame::Beats(beats) if group == BEATS_GROUP => beats
            .into_iter()
            .filter(|(_, m)| is_beat_message(m))
            .map(|(shard, m)| (shard, NodeFrame::Peer(m)))
            .collect(),
        NodeFrame::Beats(_) => Vec::new(),
        _ if group == BEATS_GROUP => Vec::new(),
        other => vec![(group, other)],
    }
}

#[cfg(test)]
mod tests;
