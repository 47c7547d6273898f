//! Membership: voters and learners, changed one server at a time (Raft dissertation §4.1).
//! A configuration takes effect on a node as soon as its entry is in the node's log (not when
//! committed), so a cut conf entry must bring the previous configuration back: the configs of
//! uncommitted conf entries are kept in order above the committed one.

use std::collections::BTreeSet;

use super::message::ConfChange;
use super::NodeId;

/// Members (voters and learners) a group has at most: what `MEMBERS` holds
/// (`crate::members`). An add past it is refused like any change that does not apply.
pub const MEMBERS_MAX: usize = 64;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfChangeInvalid {
    #[error("node {0} is already a member")]
    AlreadyMember(NodeId),
    #[error("node {0} is not a learner")]
    NotLearner(NodeId),
    #[error("node {0} is not a member")]
    NotMember(NodeId),
    #[error("removing the last voter")]
    LastVoter,
    #[error("node id 0 is reserved")]
    ZeroId,
    #[error("the group has {MEMBERS_MAX} members, its limit")]
    TooMany,
}

impl Membership {
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id)
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// Every member other than `me`: who the leader replicates to.
    pub fn peers(&self, me: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.voters
            .iter()
            .chain(self.learners.iter())
            .copied()
            .filter(move |&id| id != me)
    }

    /// The configuration after `cc`, or why `cc` does not apply to this one.
    pub fn apply(&self, cc: ConfChange) -> Result<Membership, ConfChangeInvalid> {
        let mut next = self.clone();
        match cc {
            ConfChange::AddLearner(0)
            | ConfChange::PromoteLearner(0)
            | ConfChange::RemoveNode(0) => return Err(ConfChangeInvalid::ZeroId),
            ConfChange::AddLearner(id) if self.contains(id) => {
                return Err(ConfChangeInvalid::AlreadyMember(id))
            }
            ConfChange::AddLearner(_) if self.voters.len() + self.learners.len() >= MEMBERS_MAX => {
                return Err(ConfChangeInvalid::TooMany)
            }
            ConfChange::AddLearner(id) => {
                next.learners.insert(id);
            }
            ConfChange::PromoteLearner(id) => {
                if !next.learners.remove(&id) {
                    return Err(ConfChangeInvalid::NotLearner(id));
                }
                next.voters.insert(id);
            }
            ConfChange::RemoveNode(id) => {
                if !self.contains(id) {
                    return Err(ConfChangeInvalid::NotMember(id));
                }
                if self.voters.len() == 1 && self.is_voter(id) {
                    return Err(ConfChangeInvalid::LastVoter);
                }
                next.voters.remove(&id);
                next.learners.remove(&id);
            }
        }
        debug_assert!(next.voters.is_disjoint(&next.learners));
        debug_assert!(!next.voters.is_empty());
        Ok(next)
    }
}

/// The committed configuration and those of conf entries above the commit index, in log order.
#[derive(Debug, Clone)]
pub(super) struct MembershipLog {
    committed: Membership,
    pending: Vec<(u64, Membership)>,
}

impl MembershipLog {
    pub fn new(committed: Membership) -> MembershipLog {
        MembershipLog {
            committed,
            pending: Vec::new(),
        }
    }

    /// The configuration in effect: the one of the last conf entry in the log.
    pub fn current(&self) -> &Membership {
        self.pending.last().map_or(&self.committed, |p| &p.1)
    }

    pub fn committed(&self) -> &Membership {
        &self.committed
    }

    /// The index of the last uncommitted conf entry, if any.
    pub fn pending_index(&self) -> Option<u64> {
        self.pending.last().map(|p| p.0)
    }

    /// A conf entry at `index` was appended. A change that does not apply (a malformed entry
    /// from a peer) is no change.
    pub fn appended(&mut self, index: u64, cc: Option<ConfChange>) {
        debug_assert!(self.pending.last().is_none_or(|p| p.0 < index));
        let next = cc
            .and_then(|cc| self.current().apply(cc).ok())
            .unwrap_or_else(|| self.current().clone());
        self.pending.push((index, next));
    }

    /// The log was cut from `from`: configurations of cut entries are undone.
    pub fn truncated(&mut self, from: u64) {
        self.pending.retain(|p| p.0 < from);
    }

    pub fn committed_to(&mut self, commit: u64) {
        while self.pending.first().is_some_and(|p| p.0 <= commit) {
            self.committed = self.pending.remove(0).1;
        }
    }

    /// A snapshot replaced the log.
    pub fn reset(&mut self, conf: Membership) {
        self.committed = conf;
        self.pending.clear();
    }
}
