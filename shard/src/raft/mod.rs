//! A sans-IO Raft core: one Raft group (one per shard), replication factor 1, 3 or 5, node ids
//! `1..=N`. No clocks, threads, sockets, files or randomness: time comes in as `now_ms`,
//! election jitter as a random `u64` the host drew from a seeded source, and everything the
//! core wants done comes out of [`RaftCore::poll_ready`].
//!
//! # The loop (raft-rs's Ready, "send only after persist")
//!
//! ```text
//! host                                   RaftCore
//! ----                                   --------
//! handle_tick(now, jitter)         ->    elections, heartbeats, check-quorum, transfer timeout
//! handle_message(now, msg)         ->    a peer's message (stale, malformed: ignored/answered)
//! propose / propose_conf_change /
//! transfer_leadership / read_index ->    leader requests (refused with a reason elsewhere)
//! poll_ready()                     <-    one Ready (the core forgets it handed it out):
//!   1. send `messages` now (a leader's appends may fly while its own fsync runs);
//!   2. in ONE WAL write, in Ready order: cut the log from `truncate_from`, append `entries`,
//!      write `hard_state` (term and vote together);
//!   3. when that write is durable: send `persisted_messages` (vote and append answers; a
//!      message addressed to this node itself goes back into handle_message), apply committed
//!      entries up to `commit`, and report handle_persisted(now, last entry index, its term);
//!   4. serve `log_reads` (answer with handle_log_read), send `snapshots_to_send` (answer with
//!      handle_snapshot_sent), release `read_states` once applied up to their index.
//! handle_persisted(now, index, term) ->  the leader counts its own copy; stale reports ignored
//! handle_log_read(id, entries)     ->    entries read for a follower behind the cache
//! handle_snapshot_sent(to, index)  ->    leader: the follower got a snapshot (taken at or
//!                                        below the commit index); probe it from there
//! handle_snapshot_installed(..)    ->    follower: the host installed one; the log restarts
//! compact(index)                   ->    the host dropped entries up to index (a snapshot
//!                                        covers them); followers needing them get snapshots
//! ```
//!
//! Readies must be written in the order they were polled (a FIFO WAL): a report for one Ready
//! covers every earlier one. A crash loses whatever was not durable; the host restarts the core
//! with [`RaftCore::new`] from its durable hard state and log, as a follower.
//!
//! Invariants, asserted on both sides of state changes: at most one leader per term on this
//! node's watch; the commit index never goes back and never passes the log; a committed entry
//! is never cut; terms in the log never go back; a vote is never changed within a term.
//!
//! Modules: `message` (wire and disk types), `log` (term index, entry cache, watermarks),
//! `progress` (per-follower flow control), `election` (pre-vote, vote, check-quorum, transfer),
//! `replication` (append, commit), `membership` (single-server changes), `read_index`.

mod election;
mod log;
mod membership;
mod message;
mod progress;
mod read_index;
mod replication;

#[cfg(test)]
mod tests;

pub use log::{LogState, TermRun};
pub use membership::{ConfChangeInvalid, Membership, MEMBERS_MAX};
pub use message::{
    ConfChange, Entry, EntryKind, HardState, Message, MessageBody, ENTRY_OVERHEAD_BYTES,
};
pub use progress::ProgressState;

use std::collections::BTreeMap;

use log::RaftLog;
use membership::MembershipLog;
use progress::Progress;
use read_index::ReadIndex;

pub type NodeId = u64;

/// Limits and timing of one Raft group. Units are last in every name.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// A leader sends heartbeats this often (they also carry commit and ReadIndex rounds).
    pub raft_heartbeat_ms: u64,
    /// A follower campaigns after hearing no leader for a random time in
    /// `[raft_election_timeout_ms, 2 * raft_election_timeout_ms)`; a leader that heard from no
    /// quorum for this long steps down; a leadership transfer gives up after it.
    pub raft_election_timeout_ms: u64,
    /// Entries sent to one follower and not yet acknowledged (pipelining window).
    pub raft_inflight_entries_max: u64,
    /// Entry bytes of one append message (at least one entry is sent whatever its size), and
    /// of one log read.
    pub raft_append_bytes_max: u64,
    /// Bytes of recent entries kept in memory for replication; older ones are read from disk.
    pub raft_entry_cache_bytes_max: u64,
    /// A follower lagging more bytes than this gets a snapshot instead of the log (only where
    /// a snapshot is the committed state: see `snapshot_is_committed_state`).
    pub raft_snapshot_lag_bytes_max: u64,
    /// What the host's snapshot holds. `true`: the committed state, so a snapshot spares a
    /// lagging follower every committed entry it lacks. `false`: the log from the compaction
    /// point on (a replicated shard's retained log), which spares it only compacted entries; a
    /// follower then gets one only when it needs those, never for lag (offering the retained
    /// log to a follower that holds its start would loop, offer after offer).
    pub snapshot_is_committed_state: bool,
    /// Uncommitted entries on the leader before proposals are refused with `Full`.
    pub raft_uncommitted_entries_max: u64,
    /// ReadIndex requests waiting on the leader before more are refused with `Full`.
    pub raft_pending_reads_max: usize,
    /// Planted bugs for the simulator's checkers. Always off in a node.
    pub planted: RaftPlanted,
}

impl Default for RaftConfig {
    fn default() -> RaftConfig {
        RaftConfig {
            raft_heartbeat_ms: 100,
            raft_election_timeout_ms: 1000,
            raft_inflight_entries_max: 256,
            raft_append_bytes_max: 1024 * 1024,
            raft_entry_cache_bytes_max: 16 * 1024 * 1024,
            raft_snapshot_lag_bytes_max: 256 * 1024 * 1024,
            snapshot_is_committed_state: true,
            raft_uncommitted_entries_max: 4096,
            raft_pending_reads_max: 4096,
            planted: RaftPlanted::default(),
        }
    }
}

/// Known Raft bugs the simulator plants one at a time to prove its checkers can fail. For the
/// simulator only: every flag is false in a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RaftPlanted {
    /// The leader commits an entry of an earlier term once a quorum holds it (Raft Figure 8).
    pub commit_old_term_by_count: bool,
    /// A vote is granted without being persisted: the hard state carries no vote and the grant
    /// leaves at once, so a restarted node can vote twice in a term.
    pub vote_not_persisted: bool,
    /// A follower replaces its whole suffix after `prev_index` with an append's entries, even
    /// entries that matched and were committed (a stale append shortens the log).
    pub truncate_committed_on_conflict: bool,
    /// No pre-vote, no check-quorum, no leader lease: a partitioned node that rejoins with a
    /// higher term deposes a healthy leader.
    pub no_prevote_checkquorum: bool,
    /// A replica in repair votes and campaigns with its shortened log.
    pub repair_votes_early: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("node id 0 is reserved")]
    ZeroId,
    #[error("no voters")]
    NoVoters,
    #[error("a node is both voter and learner")]
    VoterAndLearner,
    #[error("the log state is inconsistent: {0}")]
    LogState(&'static str),
    #[error("the hard state commit {commit} is beyond the last index {last_index}")]
    CommitBeyondLog { commit: u64, last_index: u64 },
    #[error("a limit is zero or the election timeout is not above the heartbeat")]
    Limits,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader (leader hint {leader_hint:?})")]
    NotLeader { leader_hint: Option<NodeId> },
    #[error("a leadership transfer is in progress")]
    TransferInProgress,
    #[error("too many uncommitted entries")]
    Full,
    #[error("a membership change is still uncommitted")]
    ConfChangePending,
    #[error("the leader has not yet committed an entry of its term")]
    TermNotCommitted,
    #[error("invalid membership change: {0}")]
    Invalid(#[from] ConfChangeInvalid),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("not the leader (leader hint {leader_hint:?})")]
    NotLeader { leader_hint: Option<NodeId> },
    #[error("node {0} is not a voter")]
    NotVoter(NodeId),
    #[error("a transfer to node {0} is already in progress")]
    InProgress(NodeId),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadIndexError {
    #[error("not the leader (leader hint {leader_hint:?})")]
    NotLeader { leader_hint: Option<NodeId> },
    #[error("too many reads waiting")]
    Full,
}

/// Why the host could not read entries for a log read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogReadError {
    /// The entries were compacted away: the follower needs a snapshot.
    #[error("compacted")]
    Compacted,
    #[error("read failed")]
    Io,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot transfer failed")]
    Failed,
}

/// Read entries `lo..=hi` (at most `bytes_max` bytes, at least one entry) from the WAL and
/// answer with `handle_log_read(id, ..)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRead {
    pub id: u64,
    pub to: NodeId,
    pub lo: u64,
    pub hi: u64,
    pub bytes_max: u64,
}

/// A read released by ReadIndex: serve it once applied up to `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadState {
    pub ctx: u64,
    pub index: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleChange {
    pub role: Role,
    pub term: u64,
    pub leader: Option<NodeId>,
}

/// Everything the core wants done; see the loop at the top of this module.
#[derive(Debug, Default)]
pub struct Ready {
    pub hard_state: Option<HardState>,
    /// Cut the log from here (a conflicting, uncommitted suffix) before appending `entries`.
    pub truncate_from: Option<u64>,
    pub entries: Vec<Entry>,
    /// May leave at once.
    pub messages: Vec<Message>,
    /// May leave only once this Ready's write (and every earlier one) is durable.
    pub persisted_messages: Vec<Message>,
    /// The new commit index: apply up to it once this Ready's write is durable.
    pub commit: Option<u64>,
    pub log_reads: Vec<LogRead>,
    pub snapshots_to_send: Vec<NodeId>,
    pub read_states: Vec<ReadState>,
    /// Reads this node will never release (it lost leadership): retry them elsewhere.
    pub dropped_reads: Vec<u64>,
    pub role: Option<RoleChange>,
}

impl Ready {
    fn is_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.truncate_from.is_none()
            && self.entries.is_empty()
            && self.messages.is_empty()
            && self.persisted_messages.is_empty()
            && self.commit.is_none()
            && self.log_reads.is_empty()
            && self.snapshots_to_send.is_empty()
            && self.read_states.is_empty()
            && self.dropped_reads.is_empty()
            && self.role.is_none()
    }
}

#[derive(Debug, Clone, Copy)]
struct PendingLogRead {
    to: NodeId,
    lo: u64,
    term: u64,
}

#[derive(Debug, Clone, Copy)]
struct Transfer {
    to: NodeId,
    started_ms: u64,
}

#[derive(Debug)]
pub struct RaftCore {
    config: RaftConfig,
    id: NodeId,
    term: u64,
    vote: Option<NodeId>,
    role: Role,
    leader: Option<NodeId>,
    log: RaftLog,
    conf: MembershipLog,
    /// The latest jitter the host drew; deadlines set between ticks use it.
    jitter: u64,
    /// When a follower or candidate campaigns; `None` until the first tick and on a leader.
    election_deadline_ms: Option<u64>,
    /// When this node last heard from its leader (check-quorum's lease on the follower side).
    leader_contact_ms: Option<u64>,
    /// Votes (or pre-votes) received in the current campaign.
    votes: BTreeMap<NodeId, bool>,
    // Leader state.
    progress: BTreeMap<NodeId, Progress>,
    heartbeat_due_ms: u64,
    quorum_check_due_ms: u64,
    /// The index of this leader's no-op: committing it opens reads and membership changes.
    term_start_index: u64,
    transfer: Option<Transfer>,
    log_reads: BTreeMap<u64, PendingLogRead>,
    next_log_read_id: u64,
    reads: ReadIndex,
    /// In repair ([`crate::repair`]): no vote, pre-vote, campaign or `TimeoutNow` until
    /// entries through this index are durable here.
    repair_through: Option<u64>,
    /// In repair: an append came since the last heartbeat (else a heartbeat answers with
    /// `LostEntries`, in case the leader's stale match keeps it from sending any).
    append_since_heartbeat: bool,
    // Output gathered for the next Ready.
    out: Ready,
    hard_state_written: HardState,
    commit_reported: u64,
    role_reported: RoleChange,
}

impl RaftCore {
    /// A core restarting (or starting) from the host's durable state, as a follower.
    /// `log.term_runs` and the conf entries above the commit index (`conf_entries`) come from
    /// the host's WAL; `membership` is the configuration committed at `hard_state.commit` (or
    /// the snapshot's).
    pub fn new(
        config: RaftConfig,
        id: NodeId,
        hard_state: HardState,
        log_state: LogState,
        membership: Membership,
        conf_entries: &[(u64, ConfChange)],
    ) -> Result<RaftCore, ConfigError> {
        check_new(&config, id, &hard_state, &log_state, &membership)?;
        let mut conf = MembershipLog::new(membership);
        for &(index, cc) in conf_entries.iter().filter(|c| c.0 > hard_state.commit) {
            conf.appended(index, Some(cc));
        }
        let log = RaftLog::new(
            &log_state,
            hard_state.commit,
            config.raft_entry_cache_bytes_max,
        );
        let role_reported = RoleChange {
            role: Role::Follower,
            term: hard_state.term,
            leader: None,
        };
        Ok(RaftCore {
            id,
            term: hard_state.term,
            vote: hard_state.vote,
            role: Role::Follower,
            leader: None,
            commit_reported: log.commit,
            log,
            conf,
            jitter: 0,
            election_deadline_ms: None,
            leader_contact_ms: None,
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            heartbeat_due_ms: 0,
            quorum_check_due_ms: 0,
            term_start_index: 0,
            transfer: None,
            log_reads: BTreeMap::new(),
            next_log_read_id: 1,
            reads: ReadIndex::default(),
            repair_through: None,
            append_since_heartbeat: false,
            out: Ready::default(),
            hard_state_written: hard_state,
            role_reported,
            config,
        })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }
    pub fn term(&self) -> u64 {
        self.term
    }
    pub fn vote(&self) -> Option<NodeId> {
        self.vote
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    pub fn commit(&self) -> u64 {
        self.log.commit
    }
    pub fn last_index(&self) -> u64 {
        self.log.last_index
    }
    pub fn last_term(&self) -> u64 {
        self.log.last_term()
    }
    pub fn term_at(&self, index: u64) -> Option<u64> {
        self.log.term_at(index)
    }
    pub fn persisted_index(&self) -> u64 {
        self.log.persisted
    }
    /// The configuration in effect (the last conf entry in the log, committed or not).
    pub fn membership(&self) -> &Membership {
        self.conf.current()
    }
    /// The configuration as of the commit index (what a snapshot at the commit index carries).
    pub fn committed_membership(&self) -> &Membership {
        self.conf.committed()
    }
    /// A leadership transfer is under way (it ends when the target leads, or gives up after an
    /// election timeout).
    pub fn transferring(&self) -> bool {
        self.transfer.is_some()
    }

    /// A follower's flow-control state and match index, on the leader.
    pub fn progress(&self, id: NodeId) -> Option<(ProgressState, u64)> {
        self.progress.get(&id).map(|p| (p.state, p.match_index))
    }

    /// The host made entries up to `index` (of `term`) durable. Stale reports are ignored.
    pub fn handle_persisted(&mut self, now_ms: u64, index: u64, term: u64) {
        if self.log.persist(index, term) && self.role == Role::Leader {
            self.maybe_commit(now_ms);
        }
        self.end_repair_if_done();
    }

    /// Starts this node in repair: its log lost entries it may have acknowledged, through
    /// `through` at most ([`crate::repair`]). Until entries through `through` are durable here
    /// (they can only come from a leader), it grants no vote or pre-vote, never campaigns and
    /// ignores `TimeoutNow`: a vote cast with the shortened log could elect a leader that
    /// lacks an entry this node's old acknowledgement helped commit.
    pub fn begin_repair(&mut self, through: u64) {
        if self.log.persisted < through {
            self.repair_through = Some(through);
        }
    }

    /// The index this node must hold durably before it may vote again, while in repair.
    pub fn repair_through(&self) -> Option<u64> {
        self.repair_through
    }

    pub(super) fn end_repair_if_done(&mut self) {
        if self.repair_through.is_some_and(|t| self.log.persisted >= t) {
            self.repair_through = None;
        }
    }

    /// Whether this node may campaign (a voter, not in repair).
    pub(super) fn may_elect(&self) -> bool {
        self.is_voter() && self.may_vote()
    }

    /// Whether this node may grant a vote: not in repair (its log may be shorter than what it
    /// acknowledged). Its own idea of its membership does not matter (see `handle_pre_vote`).
    pub(super) fn may_vote(&self) -> bool {
        self.repair_through.is_none() || self.config.planted.repair_votes_early
    }

    /// The host compacted its log through `index` (a snapshot now covers it); entries up to
    /// it can no longer be read. Refused (false) above the commit or persisted index.
    pub fn compact(&mut self, index: u64) -> bool {
        self.log.compact(index)
    }

    /// Everything the core wants done since the last call, or `None`.
    pub fn poll_ready(&mut self) -> Option<Ready> {
        if self.role == Role::Leader {
            self.start_read_round();
            let peers: Vec<NodeId> = self.progress.keys().copied().collect();
            for to in peers {
                self.send_append(to);
            }
        }
        let mut ready = std::mem::take(&mut self.out);
        let hs = self.hard_state_to_write();
        if hs != self.hard_state_written {
            self.hard_state_written = hs;
            ready.hard_state = Some(hs);
        }
        (ready.truncate_from, ready.entries) = self.log.take_unstable();
        if self.log.commit > self.commit_reported {
            self.commit_reported = self.log.commit;
            ready.commit = Some(self.log.commit);
        }
        let role = RoleChange {
            role: self.role,
            term: self.term,
            leader: self.leader,
        };
        if role != self.role_reported {
            self.role_reported = role;
            ready.role = Some(role);
        }
        (!ready.is_empty()).then_some(ready)
    }

    fn hard_state_to_write(&self) -> HardState {
        let vote = if self.config.planted.vote_not_persisted {
            None
        } else {
            self.vote
        };
        HardState {
            term: self.term,
            vote,
            commit: self.log.commit,
        }
    }

    /// The highest value a quorum of voters has reached, given this node's own and each
    /// follower's (from its progress): what commit counts with `match_index`, and what
    /// ReadIndex counts with acknowledged heartbeat rounds.
    fn quorum_value(&self, own: u64, of: impl Fn(&Progress) -> u64) -> u64 {
        let conf = self.conf.current();
        let mut values: Vec<u64> = conf
            .voters
            .iter()
            .map(|&v| {
                if v == self.id {
                    own
                } else {
                    self.progress.get(&v).map_or(0, &of)
                }
            })
            .collect();
        values.sort_unstable_by(|a, b| b.cmp(a));
        values[conf.quorum() - 1]
    }

    fn send(&mut self, to: NodeId, body: MessageBody) {
        let msg = self.message(to, body);
        self.out.messages.push(msg);
    }

    fn send_persisted(&mut self, to: NodeId, body: MessageBody) {
        let msg = self.message(to, body);
        self.out.persisted_messages.push(msg);
    }

    /// A message from this node in its current term.
    fn message(&self, to: NodeId, body: MessageBody) -> Message {
        Message {
            from: self.id,
            to,
            term: self.term,
            body,
        }
    }

    fn is_voter(&self) -> bool {
        self.conf.current().is_voter(self.id)
    }
}

fn check_new(
    config: &RaftConfig,
    id: NodeId,
    hs: &HardState,
    log: &LogState,
    membership: &Membership,
) -> Result<(), ConfigError> {
    if id == 0 || membership.contains(0) {
        return Err(ConfigError::ZeroId);
    }
    if membership.voters.is_empty() {
        return Err(ConfigError::NoVoters);
    }
    if !membership.voters.is_disjoint(&membership.learners) {
        return Err(ConfigError::VoterAndLearner);
    }
    let limits = [
        config.raft_heartbeat_ms,
        config.raft_inflight_entries_max,
        config.raft_append_bytes_max,
        config.raft_pending_reads_max as u64,
        config.raft_uncommitted_entries_max,
    ];
    if limits.contains(&0) || config.raft_election_timeout_ms <= config.raft_heartbeat_ms {
        return Err(ConfigError::Limits);
    }
    if log.first_index != log.snapshot_index + 1 || log.last_index < log.snapshot_index {
        return Err(ConfigError::LogState(
            "first_index is not snapshot_index + 1, or last below it",
        ));
    }
    let runs_ok = log
        .term_runs
        .windows(2)
        .all(|w| w[0].first_index < w[1].first_index && w[0].term < w[1].term)
        && log
            .term_runs
            .first()
            .is_none_or(|r| r.first_index == log.first_index && r.term >= log.snapshot_term)
        && log
            .term_runs
            .last()
            .is_none_or(|r| r.first_index <= log.last_index && r.term <= hs.term)
        && log.term_runs.is_empty() == (log.last_index == log.snapshot_index);
    if !runs_ok {
        return Err(ConfigError::LogState(
            "term runs do not cover the log in ascending order",
        ));
    }
    if hs.commit > log.last_index {
        return Err(ConfigError::CommitBeyondLog {
            commit: hs.commit,
            last_index: log.last_index,
        });
    }
    Ok(())
}
