//! Linearizable reads on the leader (ReadIndex, Raft dissertation §6.4). A batch holding a
//! read (an HTTP page, a subscribe's replay) does not run when it arrives: the leader asks its
//! core for a read point, the core confirms with a quorum (one batched heartbeat round) that
//! this node still leads, and the batch runs once everything up to that point is applied. A
//! leader cut off from its quorum therefore never serves a stale page: a newer leader may have
//! committed writes it has not seen. No clocks are involved (no lease reads).
//!
//! Batches that arrive behind a held one wait behind it, so a session's requests still run in
//! the order it sent them. A leader that loses its leadership answers every held batch
//! `unavailable` (a client retries; reads change nothing).

use std::collections::VecDeque;

use fabric_proto::internal::{Request, ShardOp};

use super::{Mode, Replica};
use crate::raft::ReadState;

/// Batches a leader holds for read points before it takes no more input: past it the host
/// keeps requests in its own bounded queue.
pub const HELD_BATCHES_MAX: usize = 256;

/// A batch waiting for its read point (or for an earlier batch's).
#[derive(Debug)]
struct Held {
    /// Its read's id in the core (0: it holds no read and only waits its turn).
    ctx: u64,
    /// The commit index a quorum confirmed for it.
    index: Option<u64>,
    unix_ms: u64,
    batch: Vec<Request>,
}

#[derive(Debug, Default)]
pub(super) struct Reads {
    held: VecDeque<Held>,
    last_ctx: u64,
}

impl Reads {
    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub(super) fn is_full(&self) -> bool {
        self.held.len() >= HELD_BATCHES_MAX
    }
}

/// An op whose answer shows committed state and must not come from a deposed leader (a
/// `?consistency=local` read may: it asked for this node's state, however old).
fn is_read(req: &Request) -> bool {
    matches!(
        req.op,
        ShardOp::Read { local: false, .. } | ShardOp::Subscribe { .. } | ShardOp::Attach { .. }
    )
}

impl Replica {
    /// A leader's batch: handed back if it may run now, else held for a read point.
    pub(super) fn hold_for_read(
        &mut self,
        now: u64,
        unix_ms: u64,
        batch: Vec<Request>,
    ) -> Option<Vec<Request>> {
        let reads = batch.iter().any(is_read) && !self.planted.read_without_quorum;
        if !reads && self.reads.is_empty() {
            return Some(batch);
        }
        let mut ctx = 0;
        if reads {
            ctx = self.reads.last_ctx + 1;
            if let Err(e) = self.raft.read_index(now, ctx) {
                self.answer_unavailable(batch, &format!("no read point: {e}"));
                return None;
            }
            self.reads.last_ctx = ctx;
        }
        self.reads.held.push_back(Held {
            ctx,
            index: None,
            unix_ms,
            batch,
        });
        None
    }

    /// The core's answers: read points confirmed, or reads it dropped (it no longer leads).
    pub(super) fn take_read_states(&mut self, states: Vec<ReadState>, dropped: &[u64]) {
        for s in states {
            if let Some(h) = self.reads.held.iter_mut().find(|h| h.ctx == s.ctx) {
                h.index = Some(s.index);
            }
        }
        if !dropped.is_empty() {
            self.fail_held("this node stopped leading the shard before it could confirm a read");
        }
    }

    /// Runs held batches, in order, whose read point is applied (and those waiting behind
    /// them), while the shard takes input.
    pub(super) fn release_held(&mut self) {
        while self.mode == Mode::Leading && self.shard.wants_input() {
            let ready =
                self.reads.held.front().is_some_and(|h| {
                    h.ctx == 0 || h.index.is_some_and(|index| self.applied >= index)
                });
            if !ready {
                return;
            }
            let h = self.reads.held.pop_front().expect("a front");
            self.shard.handle_requests(h.unix_ms, h.batch);
        }
    }

    /// Every held batch is answered `unavailable` (the replica no longer leads).
    pub(super) fn fail_held(&mut self, reason: &str) {
        while let Some(h) = self.reads.held.pop_front() {
            self.answer_unavailable(h.batch, reason);
        }
    }

    fn answer_unavailable(&mut self, batch: Vec<Request>, reason: &str) {
        for req in batch {
            if let Some(o) = crate::unavailable_reply(&req, reason) {
                self.shard.out.push_back(o);
            }
        }
    }
}
