//! ReadIndex (Raft dissertation §6.4): a read is released at the leader's commit index once a
//! quorum confirmed, after the read arrived, that this node is still the leader. Reads are
//! batched: every read waiting when a round starts rides on the same heartbeat round, and
//! acknowledgements of a later round confirm earlier ones too. A new leader starts no round
//! until it committed its no-op (before that its commit index may trail the group's).

use std::collections::VecDeque;

use super::message::MessageBody;
use super::{NodeId, RaftCore, ReadIndexError, ReadState, Role};

#[derive(Debug, Clone, Copy)]
struct PendingRead {
    ctx: u64,
    /// The commit index when its round started (0 until then).
    index: u64,
    /// Its round (0: waiting for one to start).
    seq: u64,
}

#[derive(Debug, Default)]
pub(super) struct ReadIndex {
    /// The last round started.
    seq: u64,
    waiting: VecDeque<PendingRead>,
}

impl ReadIndex {
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn drop_all(&mut self) -> Vec<u64> {
        self.waiting.drain(..).map(|r| r.ctx).collect()
    }
}

impl RaftCore {
    /// Asks for a linearizable read point; `ctx` comes back in a `ReadState` (or in
    /// `dropped_reads` if this node loses leadership first). Leader only.
    pub fn read_index(&mut self, _now_ms: u64, ctx: u64) -> Result<(), ReadIndexError> {
        if self.role != Role::Leader {
            return Err(ReadIndexError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if self.reads.waiting.len() >= self.config.raft_pending_reads_max {
            return Err(ReadIndexError::Full);
        }
        self.reads.waiting.push_back(PendingRead {
            ctx,
            index: 0,
            seq: 0,
        });
        Ok(())
    }

    /// Starts one round for every read without one, if this leader may serve reads yet.
    pub(super) fn start_read_round(&mut self) {
        debug_assert_eq!(self.role, Role::Leader);
        let fresh = self.reads.waiting.back().is_some_and(|r| r.seq == 0);
        if !fresh || self.log.commit < self.term_start_index {
            return;
        }
        self.reads.seq += 1;
        let (seq, commit) = (self.reads.seq, self.log.commit);
        for r in self
            .reads
            .waiting
            .iter_mut()
            .rev()
            .take_while(|r| r.seq == 0)
        {
            *r = PendingRead {
                ctx: r.ctx,
                index: commit,
                seq,
            };
        }
        let peers: Vec<(NodeId, u64)> = self
            .progress
            .iter()
            .map(|(&id, p)| (id, p.match_index))
            .collect();
        for (to, matched) in peers {
            let body = MessageBody::Heartbeat {
                commit: commit.min(matched),
                read_seq: seq,
            };
            self.send(to, body);
        }
        self.release_reads();
    }

    /// Releases the reads of every round a quorum of voters has confirmed.
    pub(super) fn release_reads(&mut self) {
        if self.role != Role::Leader || self.log.commit < self.term_start_index {
            return;
        }
        let confirmed = self.quorum_value(self.reads.seq, |p| p.read_seq_acked);
        while let Some(r) = self.reads.waiting.front() {
            if r.seq == 0 || r.seq > confirmed {
                break;
            }
            debug_assert!(r.index >= self.term_start_index && r.index <= self.log.commit);
            self.out.read_states.push(ReadState {
                ctx: r.ctx,
                index: r.index,
            });
            self.reads.waiting.pop_front();
        }
    }
}
