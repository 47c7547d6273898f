//! Bringing a group's membership to its target, one single-server change at a time, on the
//! group's leader. The target (the nodes that should hold a replica of the shard, all voters)
//! comes from the node's placement; the leader compares it with its configuration on every
//! tick and takes the next step:
//!
//! 1. a target node that is not a member is added as a learner (it does not count for
//!    commits while it catches up, so adding it never costs availability);
//! 2. a learner in the target whose log is caught up (in the replicate state, within
//!    [`PROMOTE_LAG_ENTRIES_MAX`] of the leader's commit index: as far along as the quorum,
//!    whose own matches trail the leader's log by what is in flight under load) is promoted;
//! 3. a member outside the target is removed (learners first); the leader never removes
//!    itself: it hands leadership to a caught-up voter of the target first, and the next
//!    leader removes it.
//!
//! Adds come before removals, so a replacement keeps the group's fault tolerance throughout.
//! The core's rules keep it safe whatever the target does meanwhile (one uncommitted change at
//! a time, only after the leader committed an entry of its term): a step it refuses is tried
//! again at the next tick.

use fabric_shard::raft::{ConfChange, Membership, NodeId, ProgressState, RaftCore, MEMBERS_MAX};
use std::collections::BTreeSet;

/// A learner is promoted once its log is within this many entries of the leader's commit
/// index (and its progress is `Replicate`): as far along as a quorum, so that as a voter it
/// does not hold commits back.
pub const PROMOTE_LAG_ENTRIES_MAX: u64 = 64;

/// What the leader does next towards the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Propose(ConfChange),
    /// Hand leadership to this voter: the leader itself is to leave the group.
    Transfer(NodeId),
}

/// The next step towards `target`, or `None` when there is none to take now (done, a change
/// still uncommitted, or a learner still catching up). An empty target is no target.
pub fn next_step(raft: &RaftCore, target: &BTreeSet<NodeId>) -> Option<Step> {
    let conf = raft.membership();
    if target.is_empty() || conf != raft.committed_membership() || raft.transferring() {
        return None;
    }
    // A full group makes room first (a member outside the target leaves, below).
    let full = conf.voters.len() + conf.learners.len() >= MEMBERS_MAX;
    if let Some(&id) = target.iter().find(|id| !conf.contains(**id) && !full) {
        return Some(Step::Propose(ConfChange::AddLearner(id)));
    }
    let caught_up = |id: NodeId| {
        raft.progress(id).is_some_and(|(state, matched)| {
            state == ProgressState::Replicate && matched + PROMOTE_LAG_ENTRIES_MAX >= raft.commit()
        })
    };
    let joining = conf.learners.iter().find(|id| target.contains(id));
    if let Some(&id) = joining.filter(|id| caught_up(**id)) {
        return Some(Step::Propose(ConfChange::PromoteLearner(id)));
    }
    if let Some(&id) = conf.learners.iter().find(|id| !target.contains(id)) {
        return Some(Step::Propose(ConfChange::RemoveNode(id)));
    }
    // No voter leaves while a replacement is still catching up.
    if joining.is_some() {
        return None;
    }
    removal(raft.id(), conf, target, caught_up)
}

/// Step 3 for voters: another voter outside the target is removed; the leader hands off.
fn removal(
    me: NodeId,
    conf: &Membership,
    target: &BTreeSet<NodeId>,
    caught_up: impl Fn(NodeId) -> bool,
) -> Option<Step> {
    let leaving = conf.voters.iter().filter(|id| !target.contains(id));
    if let Some(&id) = leaving.clone().find(|id| **id != me) {
        return Some(Step::Propose(ConfChange::RemoveNode(id)));
    }
    if leaving.clone().any(|id| *id == me) {
        let heir = conf
            .voters
            .iter()
            .find(|id| target.contains(id) && caught_up(**id));
        return heir.map(|&id| Step::Transfer(id));
    }
    None
}
