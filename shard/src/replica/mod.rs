//! A shard as one replica of a Raft group ([`crate::raft`]): the WAL is the Raft log (an
//! entry's index and term are its record's LSN and term), `MANIFEST` holds the hard state, and
//! the shard's one apply path applies committed entries. Sans-IO like the shard: the host feeds
//! requests, peers' messages, ticks and finished writes, and performs what comes out.
//!
//! # The loop
//!
//! ```text
//! host                                  Replica
//! ----                                  -------
//! handle_tick(now, jitter)        ->    elections, heartbeats (jitter from a seeded source)
//! handle_message(now, msg)        ->    a peer's Raft message (entries checked to be records)
//! handle_requests(now, batch)     ->    the leader's shard runs them, proposing every record
//!                                       it frames; elsewhere each is answered `unavailable`
//! poll_wal(now)                   <-    one write (a frame of records, and the manifest when
//!                                       the hard state changed), one in flight at a time
//! handle_wal_done(now, last_lsn)  ->    Raft counts it; answers waiting on it may leave
//! poll_messages()                 <-    Raft messages to send (only what may leave now)
//! poll_log_reads()                <-    entries to read back for a follower ([`read_entries`])
//! poll_output()                   <-    the shard's replies: an `ok` only once committed
//! ```
//!
//! The rules:
//! - The ack rule: a leader's `ok` leaves only once its entry is committed (durable on a
//!   quorum, this node's own fsync included) and applied; deliveries and events show only
//!   committed entries.
//! - A leader applies records as it proposes them (so later requests see them, as on a single
//!   node) and makes them visible at commit. A leader that loses its leadership may hold
//!   applied records that will never commit: it stops ([`Replica::needs_restart`]) and the host
//!   recovers it from disk, which applies only committed records.
//! - A follower writes entries as received (a conflicting uncommitted suffix is replaced by a
//!   rewind frame, never cut) and answers only once they are durable (and its term and vote,
//!   in `MANIFEST`); it applies entries once committed, through the same apply path recovery
//!   runs, and stays in replay until it leads. A new leader serves requests once its no-op
//!   (and so every earlier entry) is committed and applied.
//! - Followers never append records of their own: copy-forwards, checkpoints and cursor
//!   records are the leader's proposals.

mod entries;
mod log_read;
mod members;
mod reads;
mod ready;
mod shard_side;
mod snapshot;

#[cfg(test)]
mod tests;

pub use log_read::{read_entries, LogReadJob};
pub use reads::HELD_BATCHES_MAX;
pub use snapshot::SnapshotOffer;

use crate::commit::Dirty;
use crate::members::MembersFile;
use crate::raft::{
    ConfigError, Entry, HardState, LogReadError, LogState, Membership, Message, MessageBody,
    NodeId, RaftConfig, RaftCore,
};
use crate::recovery::RecoveredLog;
use crate::Shard;
use fabric_proto::internal::{Output, Request};
use std::collections::{BTreeSet, VecDeque};

/// What the shard core keeps for its replica (`Shard::replica`).
#[derive(Debug, Default)]
pub(crate) struct Hooks {
    /// A leader's records framed since the replica took them: (LSN, entry data).
    pub(crate) proposals: Vec<(u64, Vec<u8>)>,
    /// Writes durable here and not yet committed: (last LSN, what they make visible).
    pub(crate) awaiting_commit: VecDeque<(u64, Dirty)>,
    /// A follower's records placed by the write just handed out: (LSN, (segment, frame
    /// offset, record offset)).
    pub(crate) placed: Vec<(u64, (u64, u64, u64))>,
}

impl Hooks {
    pub(crate) fn propose(&mut self, lsn: u64, framed: &[u8]) {
        self.proposals.push((lsn, entries::entry_data(framed)));
    }

    /// The oldest durable write (its last LSN and visibility set), once `commit` covers it.
    pub(crate) fn committed_write(&mut self, commit: u64) -> Option<(u64, Dirty)> {
        if self.awaiting_commit.front()?.0 > commit {
            return None;
        }
        self.awaiting_commit.pop_front()
    }
}

/// What replicas of one group send each other (postcard frames on the node link).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PeerMessage {
    Raft(Message),
    /// The leader's retained log starts after the offer's index ([`snapshot`]).
    Snapshot {
        from: NodeId,
        to: NodeId,
        term: u64,
        offer: SnapshotOffer,
    },
    /// A follower installed the offer (or held it already), or could not.
    SnapshotDone {
        from: NodeId,
        to: NodeId,
        term: u64,
        index: u64,
        installed: bool,
    },
}

impl PeerMessage {
    pub fn to(&self) -> NodeId {
        match self {
            PeerMessage::Raft(m) => m.to,
            PeerMessage::Snapshot { to, .. } | PeerMessage::SnapshotDone { to, .. } => *to,
        }
    }
    /// The sender's term.
    pub fn term(&self) -> u64 {
        match self {
            PeerMessage::Raft(m) => m.term,
            PeerMessage::Snapshot { term, .. } | PeerMessage::SnapshotDone { term, .. } => *term,
        }
    }
    pub fn from(&self) -> NodeId {
        match self {
            PeerMessage::Raft(m) => m.from,
            PeerMessage::Snapshot { from, .. } | PeerMessage::SnapshotDone { from, .. } => *from,
        }
    }
}

/// Who this replica is and the group it starts in.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub node: NodeId,
    /// The group's voters when it was created (membership changes are in the log).
    pub voters: BTreeSet<NodeId>,
    pub raft: RaftConfig,
    /// Planted bugs for the checkers. Always off in a node.
    pub planted: ReplicaPlanted,
}

/// Known replication bugs the tests (and the simulator) plant one at a time to prove their
/// checkers can fail. Every flag is false in a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaPlanted {
    /// A leader answers `ok` once its own write is durable, without waiting for a quorum.
    pub ack_before_quorum: bool,
    /// A follower answers appends (and votes) before its write is durable.
    pub follower_ack_before_fsync: bool,
    /// A leader serves reads from its state at once, without a quorum round confirming it
    /// still leads (a leader cut off from its quorum then serves stale pages).
    pub read_without_quorum: bool,
    /// A replica never writes `MEMBERS`: once the segments holding a group's conf entries are
    /// retired, a restart brings back the group's voters at creation.
    pub members_not_persisted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Applies committed entries; answers requests `unavailable`.
    Follower,
    /// Leads, but applies entries until its no-op at `noop` is committed and applied.
    CatchingUp { noop: u64 },
    /// Serves requests.
    Leading,
    /// Led and lost it with records applied that may never commit: recover it from disk.
    Deposed,
}

/// A follower's record framed and not yet applied.
#[derive(Debug)]
struct Unapplied {
    lsn: u64,
    term: u64,
    kind: u8,
    payload: Vec<u8>,
    /// Where the write put it: (segment, frame offset, record offset).
    at: Option<(u64, u64, u64)>,
}

/// Raft messages that may leave once the log is durable through `lsn` and the hard state
/// version `hard_state` is written.
#[derive(Debug)]
struct Waiting {
    lsn: u64,
    hard_state: u64,
    messages: Vec<Message>,
}

#[derive(Debug, Clone, Default)]
pub struct ReplicaStats {
    pub leader_changes: u64,
    pub entries_received: u64,
    pub entries_applied: u64,
    pub rewinds: u64,
    pub messages_dropped_invalid: u64,
    /// Snapshots offered to followers (as leader) and installed (as follower).
    pub snapshots_sent: u64,
    pub snapshots_installed: u64,
    /// Times the Raft log was compacted to the oldest retained segment.
    pub compactions: u64,
}

pub struct Replica {
    shard: Shard,
    raft: RaftCore,
    mode: Mode,
    /// The store holds a `REPAIR` marker ([`crate::repair`]): the first write after the
    /// repair ends removes it.
    repair_marker: bool,
    /// `MEMBERS` and the conf entries above it ([`members`]).
    members: members::MembersTrack,
    /// Entries received while a write was in flight (framed by the next one), and the lowest
    /// LSN from which they replace what was framed before.
    unframed: Vec<Entry>,
    rewind_from: Option<u64>,
    /// A truncation not yet written: the log counts as durable only up to here.
    rewind_floor: Option<u64>,
    /// The write in flight holds a rewind frame.
    rewind_in_write: bool,
    unapplied: VecDeque<Unapplied>,
    waiting: VecDeque<Waiting>,
    /// The hard state version last set, last handed to a write, and last written.
    hard_state: (u64, u64, u64),
    hard_state_in_write: Option<u64>,
    /// The write in flight: its last LSN and that entry's term.
    inflight: Option<(u64, u64, u64)>,
    outbox: Vec<PeerMessage>,
    /// A snapshot offer to install at the next write (from whom), and the one being written.
    installing: Option<(NodeId, SnapshotOffer)>,
    installed: Option<(NodeId, SnapshotOffer)>,
    /// A leader's offers not yet answered: to whom, and when (an offer or its answer may be
    /// lost: after `offer_timeout_ms` the core hears it failed and asks again).
    offers: std::collections::BTreeMap<NodeId, u64>,
    offer_timeout_ms: u64,
    tick_ms: u64,
    log_reads: Vec<LogReadJob>,
    /// A leader's batches waiting for a read point ([`reads`]).
    reads: reads::Reads,
    commit: u64,
    applied: u64,
    window: usize,
    uncommitted_max: u64,
    last_leader: Option<NodeId>,
    planted: ReplicaPlanted,
    stats: ReplicaStats,
}

/// How many records replica recovery holds back before applying them: a rewind replaces at
/// most the uncommitted suffix a leader had, which `raft_uncommitted_entries_max` bounds (twice
/// it: a deposed leader's suffix and the one that replaced it).
pub fn recovery_window(raft: &RaftConfig) -> usize {
    (raft.raft_uncommitted_entries_max as usize).saturating_mul(2)
}

impl Replica {
    /// A replica of an empty log (a new group), as a follower.
    pub fn empty(shard: crate::ShardConfig, config: ReplicaConfig) -> Result<Replica, ConfigError> {
        Replica::new(Shard::replaying(shard), RecoveredLog::default(), config)
    }

    /// A replica over a shard recovered from its store
    /// ([`crate::store::recover_replica_log`]), still in replay, as a follower.
    pub fn new(
        mut shard: Shard,
        log: RecoveredLog,
        config: ReplicaConfig,
    ) -> Result<Replica, ConfigError> {
        assert!(shard.replaying, "a replica starts in replay (a follower)");
        let m = shard.manifest;
        let first_index = shard.log_start();
        let log_state = LogState {
            first_index,
            last_index: shard.next_lsn - 1,
            term_runs: log.term_runs.clone(),
            snapshot_index: first_index - 1,
            snapshot_term: m.base_term,
        };
        // Everything before the retained log is committed (a checkpoint covers it).
        let applied = log.applied.max(first_index - 1);
        let hard_state = HardState {
            term: m.term,
            vote: (m.vote != 0).then_some(m.vote),
            commit: applied,
        };
        // The membership on disk (or the group's voters at creation), then the log's conf
        // entries above it: those applied are committed, the rest the core keeps pending.
        let on_disk = log.members.clone().unwrap_or(MembersFile {
            shard: shard.config.shard,
            index: 0,
            membership: Membership {
                voters: config.voters.clone(),
                learners: BTreeSet::new(),
            },
        });
        let floor = applied.max(on_disk.index);
        let members = members::MembersTrack::new(on_disk, &log.conf);
        let membership = members.at(applied);
        let conf_above: Vec<_> = log.conf.iter().filter(|c| c.0 > floor).copied().collect();
        let window = recovery_window(&config.raft);
        let uncommitted_max = config.raft.raft_uncommitted_entries_max;
        let offer_timeout_ms = 2 * config.raft.raft_election_timeout_ms;
        let tick_ms = (config.raft.raft_heartbeat_ms / 4).max(1);
        let planted = config.planted;
        // A replica's snapshot is its retained log (`snapshot`), not its committed state.
        let raft_config = RaftConfig {
            snapshot_is_committed_state: false,
            ..config.raft
        };
        let mut raft = RaftCore::new(
            raft_config,
            config.node,
            hard_state,
            log_state,
            membership,
            &conf_above,
        )?;
        if let Some(through) = log.repair_through {
            raft.begin_repair(through);
        }
        let repair_marker = log.repair_through.is_some();
        shard.replica = Some(Hooks::default());
        let unapplied = log.tail.into_iter().map(|t| {
            let mut payload = Vec::new();
            let kind = t.record.encode_into(&mut payload) as u8;
            Unapplied {
                lsn: t.lsn,
                term: t.term,
                kind,
                payload,
                at: Some(t.at),
            }
        });
        Ok(Replica {
            shard,
            raft,
            mode: Mode::Follower,
            unframed: Vec::new(),
            repair_marker,
            members,
            rewind_from: None,
            rewind_floor: None,
            rewind_in_write: false,
            unapplied: unapplied.collect(),
            waiting: VecDeque::new(),
            hard_state: (0, 0, 0),
            hard_state_in_write: None,
            inflight: None,
            outbox: Vec::new(),
            installing: None,
            installed: None,
            offers: std::collections::BTreeMap::new(),
            offer_timeout_ms,
            tick_ms,
            log_reads: Vec::new(),
            reads: reads::Reads::default(),
            commit: applied,
            applied,
            window,
            uncommitted_max,
            last_leader: None,
            planted,
            stats: ReplicaStats::default(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }
    pub fn raft(&self) -> &RaftCore {
        &self.raft
    }
    pub fn shard(&self) -> &Shard {
        &self.shard
    }
    pub fn stats(&self) -> &ReplicaStats {
        &self.stats
    }
    /// The last LSN applied (committed, durable here, and in the shard's state).
    pub fn applied(&self) -> u64 {
        self.applied
    }
    /// The replica led and lost its leadership with records applied that may never commit:
    /// the host recovers it from disk (once its write in flight is done).
    pub fn needs_restart(&self) -> bool {
        self.mode == Mode::Deposed
    }
    /// How many records recovery held back for this replica's group ([`recovery_window`]).
    pub fn window(&self) -> usize {
        self.window
    }

    /// What the replica waits for, for a checker's message.
    pub fn describe_waits(&self) -> String {
        format!(
            "durable {} floor {:?} rewind_from {:?} unframed {} unapplied {} waiting {} (first lsn {:?}, hs {:?}) hs {:?} inflight {:?} installing {}",
            self.shard.durable_lsn,
            self.rewind_floor,
            self.rewind_from,
            self.unframed.len(),
            self.unapplied.len(),
            self.waiting.len(),
            self.waiting.front().map(|w| w.lsn),
            self.waiting.front().map(|w| w.hard_state),
            self.hard_state,
            self.inflight,
            self.installing.is_some() || self.installed.is_some()
        )
    }

    /// The shard, for the host's disk reads, buffers and session bookkeeping.
    pub fn shard_mut(&mut self) -> &mut Shard {
        &mut self.shard
    }

    /// The host may hand in a batch now: a leader that wants input runs it; anywhere else it
    /// is answered `unavailable` at once (never queued behind a leader that may not come).
    pub fn takes_batch(&self) -> bool {
        self.mode != Mode::Leading || self.wants_input()
    }

    /// Nothing taken in waits for a write or an answer.
    pub fn is_idle(&self) -> bool {
        self.shard.is_idle()
            && self.unframed.is_empty()
            && self.inflight.is_none()
            && self.waiting.is_empty()
            && self.installing.is_none()
            && self.reads.is_empty()
    }

    /// The host could not write the WAL: nothing pending is acknowledged, and the replica is
    /// recovered from disk (its memory may be ahead of it).
    pub fn handle_wal_failed(&mut self, now: u64, no_space: bool, reason: &str) {
        self.inflight = None;
        self.shard.handle_wal_failed(now, no_space, reason);
        self.fail_held(reason);
        self.mode = Mode::Deposed;
    }

    /// How often the host should tick this replica (ms).
    pub fn tick_interval_ms(&self) -> u64 {
        self.tick_ms
    }

    /// Whether the host may hand in more requests now.
    pub fn wants_input(&self) -> bool {
        let uncommitted = self.raft.last_index() - self.raft.commit();
        self.mode == Mode::Leading
            && self.shard.wants_input()
            && uncommitted < self.uncommitted_max / 2
            && !self.reads.is_full()
    }

    pub fn handle_tick(&mut self, now: u64, jitter: u64) {
        self.raft.handle_tick(now, jitter);
        self.expire_offers(now);
        self.process_ready(now);
    }

    /// A message from another replica of the group.
    pub fn handle_peer_message(&mut self, now: u64, msg: PeerMessage) {
        match msg {
            PeerMessage::Raft(m) => self.handle_message(now, m),
            PeerMessage::Snapshot {
                from, term, offer, ..
            } => self.handle_offer(from, term, offer),
            PeerMessage::SnapshotDone {
                from,
                term,
                index,
                installed,
                ..
            } => {
                if term == self.raft.term() {
                    self.handle_offer_done(from, index, installed);
                }
            }
        }
        self.process_ready(now);
    }

    /// A peer's Raft message. An append whose entries are not all records this node could
    /// recover is dropped whole (the leader sends it again; a leader that keeps sending it is
    /// broken, and this node will not write what it cannot read back).
    pub fn handle_message(&mut self, now: u64, msg: Message) {
        let installing = self.installing.is_some() || self.installed.is_some();
        if installing
            && matches!(
                msg.body,
                MessageBody::Append { .. } | MessageBody::Heartbeat { .. }
            )
        {
            // The log is being replaced by a snapshot: the core must not move past it
            // meanwhile (the leader sends these again).
            return;
        }
        if let MessageBody::Append { entries, .. } = &msg.body {
            if !entries.iter().all(entries::entry_is_valid) {
                self.stats.messages_dropped_invalid += 1;
                return;
            }
            self.stats.entries_received += entries.len() as u64;
        }
        self.raft.handle_message(now, msg);
        self.process_ready(now);
    }

    /// A batch of requests: the leader's shard runs them (stamping `unix_ms`, the wall clock,
    /// into what it records; `now` is the monotonic clock every other input takes), a batch
    /// with a read once a quorum confirmed this node still leads ([`reads`]); anywhere else
    /// a `?consistency=local` read is answered from this replica's committed state and every
    /// other request `unavailable`, naming the leader if known (the router forwards there).
    pub fn handle_requests(
        &mut self,
        now: u64,
        unix_ms: u64,
        batch: impl IntoIterator<Item = Request>,
    ) {
        if self.mode != Mode::Leading {
            let reason = match self.raft.leader() {
                Some(l) if l != self.raft.id() => format!("not the leader (node {l} leads)"),
                _ => "no leader yet".to_string(),
            };
            // A local read is answered from what this replica applied, which is committed;
            // a deposed replica's state may hold more, so it answers nothing.
            let local = self.mode != Mode::Deposed;
            for req in batch {
                if local && req.op.is_local_read() {
                    self.shard.handle_request(unix_ms, req);
                } else if let Some(o) = crate::unavailable_reply(&req, &reason) {
                    self.shard.out.push_back(o);
                }
            }
            return;
        }
        if let Some(batch) = self.hold_for_read(now, unix_ms, batch.into_iter().collect()) {
            self.shard.handle_requests(unix_ms, batch);
        }
        self.process_ready(now);
    }

    pub fn transfer_leadership(
        &mut self,
        now: u64,
        to: NodeId,
    ) -> Result<(), crate::raft::TransferError> {
        let r = self.raft.transfer_leadership(now, to);
        self.process_ready(now);
        r
    }

    /// Proposes a single-server membership change (leader only, one at a time, once this
    /// term has a committed entry: the core's rules). The entry is framed like any record and
    /// takes effect here at once; it is committed like a client write.
    pub fn propose_conf_change(
        &mut self,
        now: u64,
        cc: crate::raft::ConfChange,
    ) -> Result<u64, crate::raft::ProposeError> {
        if self.mode != Mode::Leading {
            return Err(crate::raft::ProposeError::NotLeader {
                leader_hint: self.raft.leader(),
            });
        }
        // Records the shard framed take their indexes first.
        self.feed_proposals(now);
        if self.mode != Mode::Leading {
            return Err(crate::raft::ProposeError::NotLeader { leader_hint: None });
        }
        debug_assert_eq!(self.raft.last_index() + 1, self.shard.next_lsn);
        let index = self.raft.propose_conf_change(now, cc)?;
        let kind = crate::record::RecordType::ConfChange as u8;
        self.shard
            .log_raw(index, self.raft.term(), kind, &cc.encode());
        self.members.appended(index, Some(cc));
        self.process_ready(now);
        Ok(index)
    }

    /// Messages to other replicas that may leave now.
    pub fn poll_messages(&mut self) -> Vec<PeerMessage> {
        std::mem::take(&mut self.outbox)
    }

    /// Log reads to perform ([`read_entries`]) and answer with [`Replica::handle_log_read`].
    pub fn poll_log_reads(&mut self) -> Vec<LogReadJob> {
        std::mem::take(&mut self.log_reads)
    }

    pub fn handle_log_read(&mut self, now: u64, id: u64, result: Result<Vec<Entry>, LogReadError>) {
        self.raft.handle_log_read(id, result);
        self.process_ready(now);
    }

    /// The shard's replies (acks only once committed), deliveries and events.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.shard.poll_output()
    }
}
