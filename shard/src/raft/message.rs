//! What travels between the cores of one group (postcard frames over the node links), and what
//! the host persists: entries and the hard state. Every field a peer sends is checked by the
//! receiver; nothing here is trusted.

use serde::{Deserialize, Serialize};

use super::NodeId;

/// What an entry holds. The core reads only `ConfChange` payloads; `Normal` data is opaque (a
/// WAL record payload for the host to apply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    Normal,
    /// Appended by every new leader: committing it commits everything before it (Raft §5.4.2)
    /// and opens ReadIndex and membership changes for the new term.
    Noop,
    /// `data` is a [`ConfChange`] in [`ConfChange::encode`] form.
    ConfChange,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub index: u64,
    pub term: u64,
    pub kind: EntryKind,
    pub data: Vec<u8>,
}

/// Bytes an entry costs beyond its data (index, term, kind and framing), so empty entries still
/// weigh something against the byte limits.
pub const ENTRY_OVERHEAD_BYTES: u64 = 24;

impl Entry {
    /// The weight of this entry against every `*_bytes_max` limit.
    pub fn size_bytes(&self) -> u64 {
        self.data.len() as u64 + ENTRY_OVERHEAD_BYTES
    }
}

/// What the host persists, in the same write as the entries of its Ready: term and vote
/// together (a vote must never survive without its term, nor a term without its vote).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    pub term: u64,
    /// The candidate this node voted for in `term`.
    pub vote: Option<NodeId>,
    /// The commit index known when this was written: a hint for a restart (never above what the
    /// log holds durably), not needed for safety.
    pub commit: u64,
}

/// One single-server membership change (Raft dissertation §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfChange {
    AddLearner(NodeId),
    PromoteLearner(NodeId),
    RemoveNode(NodeId),
}

impl ConfChange {
    /// A fixed 9-byte form (tag, id little-endian) for an entry's data: the core must decode
    /// conf entries it receives from peers without a serializer dependency.
    pub fn encode(&self) -> Vec<u8> {
        let (tag, id) = match *self {
            ConfChange::AddLearner(id) => (1u8, id),
            ConfChange::PromoteLearner(id) => (2, id),
            ConfChange::RemoveNode(id) => (3, id),
        };
        let mut b = Vec::with_capacity(9);
        b.push(tag);
        b.extend_from_slice(&id.to_le_bytes());
        b
    }

    /// `None` for bytes that are not a conf change (a malformed entry from a peer is applied as
    /// no change rather than trusted or asserted).
    pub fn decode(b: &[u8]) -> Option<ConfChange> {
        if b.len() != 9 {
            return None;
        }
        let id = u64::from_le_bytes(b[1..9].try_into().ok()?);
        match b[0] {
            1 => Some(ConfChange::AddLearner(id)),
            2 => Some(ConfChange::PromoteLearner(id)),
            3 => Some(ConfChange::RemoveNode(id)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    /// The sender's term; for a `PreVote` the term it would campaign in (its term plus one),
    /// which it has not adopted.
    pub term: u64,
    pub body: MessageBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// "Would you vote for me?" without anyone changing term (Raft dissertation §9.6).
    PreVote {
        last_index: u64,
        last_term: u64,
    },
    PreVoteResponse {
        granted: bool,
    },
    /// `transfer`: sent after a `TimeoutNow`, so it overrides the receivers' leader lease.
    Vote {
        last_index: u64,
        last_term: u64,
        transfer: bool,
    },
    VoteResponse {
        granted: bool,
    },
    Append {
        prev_index: u64,
        prev_term: u64,
        entries: Vec<Entry>,
        commit: u64,
    },
    /// On success `index` is the last index the follower now durably matches. On reject
    /// `index` is the rejected `prev_index` and (`hint_index`, `hint_term`) the follower's
    /// last entry whose term is at most the leader's `prev_term`: the leader skips back a whole
    /// term per round trip instead of one entry.
    AppendResponse {
        success: bool,
        index: u64,
        hint_index: u64,
        hint_term: u64,
    },
    /// `commit` is capped at what the follower matches; `read_seq` is the leader's latest
    /// ReadIndex round, echoed to confirm leadership.
    Heartbeat {
        commit: u64,
        read_seq: u64,
    },
    HeartbeatResponse {
        read_seq: u64,
    },
    /// Leadership transfer: campaign now, skipping pre-vote and the election timeout.
    TimeoutNow,
    /// A follower in repair (`crate::repair`) answers an append past its log with this: it
    /// lost entries the leader may count as matched, and its durable log ends at
    /// `last_index`. The leader forgets its match for it and probes from there. (Last, so the
    /// encodings of the variants before it are unchanged.)
    LostEntries {
        last_index: u64,
    },
}

impl MessageBody {
    /// Requests for a vote, which a node in touch with a live leader ignores (check-quorum's
    /// lease) unless sent for a leadership transfer.
    pub(super) fn is_vote_request(&self) -> bool {
        matches!(self, MessageBody::PreVote { .. } | MessageBody::Vote { .. })
    }
}
