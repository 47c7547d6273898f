//! The node's shard host, sans-IO: everything that drives one shard, written once for the node
//! (`fabric/src/shard_actor.rs`) and the simulator (`sim/src/world/`), so the simulator checks
//! the code the node runs (TigerBeetle's replica generic over its storage and bus).
//!
//! A [`ShardDriver`] owns one shard's incarnations and decides:
//! - its input queue of request batches and the queue's bound (`input_batches_max`), fed
//!   batch by batch into `Shard::handle_requests` while the shard wants input (asked between
//!   batches, never inside one: a batch is always taken whole);
//! - the one WAL write in flight, and what a failed one means (the restart policy of
//!   [`crate::supervise`]: recover after a backoff, at once refusing writes when the disk is
//!   full, or stay down);
//! - recovery: a new incarnation is asked for ([`Effect::Recover`]) and installed when it
//!   arrives; while there is none, every request is answered `unavailable` (a stand-in);
//! - routing of the shard's outputs to sessions, grouped per session, in order; the sessions
//!   this incarnation knows, told when it ends; a session whose replies cannot be queued is
//!   closed (`overloaded`), never silently forgotten.
//!
//! I/O stays with the host's adapter: it performs [`Effect::Write`] ([`WriteJob::perform`]) and
//! [`Effect::Recover`] ([`RecoverJob::perform`]) on its `SegmentStore` (files, or the
//! simulated disk), at whatever time that takes, and reports back. The file steps themselves
//! are decided here and in `fabric_shard::store`, never by an adapter. Time comes in as [`Time`]: wall-clock ms for what the shard stamps into
//! messages, monotonic ms for the host's own timers.

pub mod beats;
mod forward;
mod incarnation;
pub mod placement;

pub use forward::{
    session_counter_start, session_home, session_id, NodeFrame, FORWARDED_REQUESTS_MAX,
    REMOTE_SESSIONS_MAX, SESSION_NODE_SHIFT,
};
pub use incarnation::Core;

use crate::supervise::{Decision, RestartPolicy, ShardFailure, Supervision};
use fabric_proto::internal::{Reply, Request, SessionId, ShardIdx, ShardOp};
use fabric_shard::raft::NodeId;
use fabric_shard::raft::{Entry, LogReadError};
use fabric_shard::replica::{self, LogReadJob, PeerMessage, Replica, ReplicaConfig};
use fabric_shard::store::{self, SegmentStore, StoreError, StoreErrorKind, WriteFailure};
use fabric_shard::{
    PlantedBugs, ReadRequest, RecoverError, RecoveryReport, Shard, ShardConfig, WalWrite,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Batches taken from the input queue per pump before the driver writes and answers.
pub const PUMP_BATCHES_MAX: usize = 256;

/// Reply batches a session's reply queue holds beyond every reply it can be owed (a welcome,
/// errors without a ref): slack, not a bound anything relies on.
pub const SESSION_REPLY_SLACK_BATCHES: usize = 64;

/// The capacity a session's reply queue needs (in batches; a batch holds at least one reply)
/// so that a full queue can only mean the session stopped taking replies: every reply it can
/// be owed at once ([`session_replies_owed_max`]), plus slack. `None` if that does not
/// fit in a `usize`.
pub fn session_reply_queue_batches_min(
    push_credit_frames_max: u32,
    shards: u32,
    inflight_requests_max: u32,
) -> Option<usize> {
    session_replies_owed_max(push_credit_frames_max, shards, inflight_requests_max)?
        .checked_add(SESSION_REPLY_SLACK_BATCHES)
}

/// Replies one session can be owed at once: its in-flight requests up to the hard limit
/// (`inflight_requests_max` plus one batch frame's ops, which `wants_read` cannot split) and
/// every shard's push credit. `None` if that does not fit in a `usize`.
pub fn session_replies_owed_max(
    push_credit_frames_max: u32,
    shards: u32,
    inflight_requests_max: u32,
) -> Option<usize> {
    (push_credit_frames_max as usize)
        .checked_mul(shards as usize)?
        .checked_add(inflight_requests_max as usize)?
        .checked_add(fabric_proto::BATCH_OPS_MAX)
}

/// The two clocks a host reads: wall-clock ms (stamped into messages, compared with clients'
/// clocks) and monotonic ms (timers: backoffs, stall deadlines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time {
    pub unix_ms: u64,
    pub mono_ms: u64,
}

/// Where a host gets its time; the node reads the system clocks, the simulator its own.
pub trait Clock {
    fn time(&self) -> Time;
}

/// Bugs planted in the host, for the simulator's checkers. Reachable only from `fabric sim`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlantedGlueBugs {
    /// A session whose replies cannot be queued is dropped silently instead of closed.
    pub glue_drop_reply_on_full_queue: bool,
    /// After a failed write the same incarnation goes on serving (no recovery from disk).
    pub glue_restart_without_recovery: bool,
    /// A batch fed while the shard wants no more input loses its remaining requests.
    pub glue_batch_drops_rest_under_backpressure: bool,
    /// The host's write job skips the directory fsync that makes a new segment's name (and the
    /// manifest listing it) durable.
    pub glue_no_dir_fsync_on_segment_create: bool,
}

/// One WAL write for the adapter to perform on its store, on whatever thread and at whatever
/// time; its result goes back through [`ShardDriver::handle_write_done`].
#[derive(Debug)]
pub struct WriteJob {
    pub write: WalWrite,
    steps: PlantedBugs,
}

impl WriteJob {
    /// A write outside a driver (benchmarks, tools): the file steps of `config`'s shard.
    pub fn new(write: WalWrite, config: &ShardConfig) -> WriteJob {
        WriteJob {
            write,
            steps: config.planted,
        }
    }

    /// The file steps (`fabric_shard::store::perform`): create, manifest, append, fdatasync,
    /// cut back after a failure, delete.
    pub fn perform<S: SegmentStore>(&self, store: &mut S) -> Result<(), WriteFailure> {
        store::perform(store, &self.write, &self.steps)
    }

    /// The written buffer, for `handle_write_done`'s caller to hand back for reuse.
    pub fn into_buffer(self) -> Vec<u8> {
        self.write.bytes
    }
}

/// One recovery for the adapter to run on the shard's store (blocking: it reads every
/// segment); its result goes back through [`ShardDriver::handle_recovered`].
#[derive(Debug, Clone)]
pub struct RecoverJob {
    pub config: ShardConfig,
    /// Set for a replica of a Raft group.
    pub replica: Option<ReplicaConfig>,
}

impl RecoverJob {
    /// Recovery (`fabric_shard::store::recover`): reads, verifies, cuts only a torn final
    /// write, syncs what it read. A replica applies up to the manifest's commit hint and
    /// starts as a follower (`fabric_shard::store::recover_replica_log`).
    pub fn perform<S: SegmentStore>(
        &self,
        store: &mut S,
    ) -> Result<(Core, RecoveryReport), RecoverError> {
        let Some(rc) = &self.replica else {
            let (shard, report) = store::recover(store, self.config.clone())?;
            return Ok((Core::Single(Box::new(shard)), report));
        };
        let window = replica::recovery_window(&rc.raft);
        // With other voters to fetch from, damage a bit flip leaves is repaired, not refused.
        let repairable = rc.voters.len() > 1;
        let (shard, report, log) =
            store::recover_replica_log(store, self.config.clone(), window, repairable)?;
        let r = Replica::new(shard, log, rc.clone()).map_err(|e| {
            RecoverError::Manifest(format!("the recovered log does not start a replica: {e}"))
        })?;
        Ok((Core::Replica(Box::new(r)), report))
    }
}

/// A leader's read of entries for a follower, for the adapter to perform on its store; its
/// result goes back through [`ShardDriver::handle_log_read_done`].
#[derive(Debug, Clone)]
pub struct LogReadEffect {
    pub incarnation: u64,
    pub job: LogReadJob,
}

impl LogReadEffect {
    pub fn perform<S: SegmentStore>(&self, store: &mut S) -> Result<Vec<Entry>, LogReadError> {
        replica::read_entries(store, &self.job)
    }
}

/// One positioned read of the log for the adapter to perform on its store (`pread`), on
/// whatever thread and at whatever time; its result goes back through
/// [`ShardDriver::handle_read_done`]. Reads of an ended incarnation are ignored there.
#[derive(Debug, Clone, Copy)]
pub struct ReadJob {
    pub incarnation: u64,
    pub request: ReadRequest,
}

/// A performed [`ReadJob`].
#[derive(Debug)]
pub struct ReadDone {
    pub incarnation: u64,
    pub id: u64,
    pub result: Result<Vec<u8>, StoreError>,
}

impl ReadJob {
    /// The read (`SegmentStore::read_at`): never mmap, so a file cut back meanwhile is an
    /// error, not a signal.
    pub fn perform<S: SegmentStore>(&self, store: &mut S) -> ReadDone {
        let r = self.request;
        ReadDone {
            incarnation: self.incarnation,
            id: r.id,
            result: store.read_at(r.segment, r.offset, r.len),
        }
    }

    /// The read, answered with an I/O error instead of performed (a full reader queue, a
    /// reader that could not start, a fault the simulator injects): the shard retries it.
    pub fn failed(&self, message: impl Into<String>) -> ReadDone {
        let r = self.request;
        ReadDone {
            incarnation: self.incarnation,
            id: r.id,
            result: Err(StoreError {
                kind: StoreErrorKind::Io,
                op: "read_at",
                file: fabric_shard::wal::segment_file_name(r.segment),
                message: message.into(),
            }),
        }
    }
}

/// What the adapter must do.
#[derive(Debug)]
pub enum Effect {
    /// Perform this write, then call `handle_write_done`.
    Write(WriteJob),
    /// Perform this read (any number may be in flight, in any order), then call
    /// `handle_read_done`.
    Read(ReadJob),
    /// Recover a new incarnation, then call `handle_recovered`. A write still in flight from
    /// the ended incarnation finishes first (the adapter waits for it).
    Recover(RecoverJob),
    /// Hand these replies to the session, in order, then go on; if they cannot be queued,
    /// call `handle_reply_refused`.
    Replies {
        session: SessionId,
        replies: Vec<Reply>,
    },
    /// This shard forgot the session (it said `Closed`): the adapter may drop its reply sink.
    Forget { session: SessionId },
    /// Close the session: the incarnation it was attached to ended (`restarted`), or its
    /// replies could not be queued (`overloaded`). Its client reconnects and resumes.
    CloseSession {
        session: SessionId,
        why: CloseReason,
    },
    /// Send this to the replica of the same shard on node `msg.to()` (a replica only; lost
    /// messages are Raft's to repeat).
    Peer(PeerMessage),
    /// Perform this log read, then call `handle_log_read_done` (a replica's leader only).
    LogRead(LogReadEffect),
    /// Send this batch of a local session to node `to`, which leads the shard there
    /// (`handle_forwarded`).
    Forward {
        to: NodeId,
        session: SessionId,
        batch: Vec<Request>,
        /// Counts the session's batches to `to` (see `handle_forwarded`).
        seq: u64,
    },
    /// Send these replies to node `to`, where the session lives (`handle_remote_replies`).
    Remote {
        to: NodeId,
        session: SessionId,
        replies: Vec<Reply>,
        /// 1, 2, 3, ... per session and incarnation of the sending driver: the session's node
        /// closes the session at a gap (a frame the link dropped held deliveries).
        seq: u64,
    },
    /// Tell node `to` to close its session (`handle_remote_close`).
    RemoteClose {
        to: NodeId,
        session: SessionId,
        why: CloseReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CloseReason {
    Restarted,
    Overloaded,
    /// The shard's leader changed (this node's replica was deposed, or the leader a session
    /// was forwarded to was replaced): the shard's state for the session is gone, but the
    /// session is not. Its node attaches it again at the new leader (`ShardOp::Attach`).
    /// Last, so the encodings of the variants before it are unchanged.
    LeaderChanged,
}

/// Where the shard is in its life.
enum State {
    Serving(Core),
    /// A recovery is under way (asked for with `Effect::Recover`).
    Recovering,
    /// Failed; recovery is asked for at `until_mono_ms`.
    Waiting {
        until_mono_ms: u64,
    },
    /// Down until an operator looks.
    Stopped,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            State::Serving(s) => write!(f, "Serving(lsn {})", s.shard().durable_lsn()),
            State::Recovering => f.write_str("Recovering"),
            State::Waiting { until_mono_ms } => write!(f, "Waiting(until {until_mono_ms})"),
            State::Stopped => f.write_str("Stopped"),
        }
    }
}

/// What an operator sees of a shard (`/readyz`, metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverStatus {
    /// Serving and its writes go through.
    pub serving: bool,
    /// Down for good (a failure that could not be cleaned up, or a refused recovery).
    pub stopped: bool,
    /// The last write failed for lack of space and none has landed since.
    pub disk_full: bool,
    /// The write in flight has taken longer than the stall limit.
    pub wal_stalled: bool,
    pub restarts: u64,
    pub last_error: Option<String>,
}

/// One shard's host.
#[derive(Debug)]
pub struct ShardDriver {
    idx: ShardIdx,
    config: ShardConfig,
    input: VecDeque<Vec<Request>>,
    input_batches_max: usize,
    state: State,
    writing: Option<WriteInFlight>,
    /// An ended incarnation's write is still being performed: its completion is ignored.
    orphaned_writes: u32,
    wal_sync_stall_ms_max: u64,
    supervision: Supervision,
    /// After ENOSPC: the new incarnation refuses writes until this wall-clock ms.
    writes_from_unix_ms: Option<u64>,
    /// Sessions that sent this incarnation a batch (told when it ends).
    sessions: BTreeSet<SessionId>,
    effects: VecDeque<Effect>,
    status: DriverStatus,
    planted: PlantedGlueBugs,
    /// Counts the incarnations installed: a read carries the one that asked for it.
    incarnation: u64,
    /// Set for a replica of a Raft group: who it is, and the seeded source of its election
    /// jitter (splitmix64 state); when it ticks next (monotonic ms).
    replica: Option<ReplicaConfig>,
    jitter: u64,
    tick_at_mono_ms: Option<u64>,
    /// Requests of local sessions forwarded to the leader's node, by (session, ref).
    forwarded: BTreeMap<(SessionId, u64), forward::Waiting>,
    forward_timeout_ms: u64,
    /// The term of the leader this follower last forwarded its local sessions' batches to: a
    /// newer term closes those sessions (the old leader's state of them is gone).
    forward_term: Option<u64>,
    /// Leader side: the last remote-reply frame's seq sent to each session of another node.
    remote_sent: BTreeMap<SessionId, u64>,
    /// Session side: the leader node each local session follows, and the last remote-reply
    /// frame's seq received from it.
    remote_seen: BTreeMap<SessionId, (NodeId, u64)>,
    /// Follower side: the node each local session's batches go to and the last batch's seq.
    forward_sent: BTreeMap<SessionId, (NodeId, u64)>,
    /// Leader side: the last forwarded batch's seq taken for each session of another node.
    forward_seen: BTreeMap<SessionId, u64>,
    /// Entries each of those two maps holds at most ([`REMOTE_SESSIONS_MAX`]).
    remote_sessions_max: usize,
    /// The nodes that should hold this shard's replicas (empty: none set): its leader moves
    /// the group's membership there one change at a time ([`placement`]).
    members_target: BTreeSet<NodeId>,
}

#[derive(Debug, Clone, Copy)]
struct WriteInFlight {
    last_lsn: u64,
    started_mono_ms: u64,
}

impl ShardDriver {
    /// A driver whose first effect asks for the shard's recovery from its store.
    pub fn new(
        idx: ShardIdx,
        config: ShardConfig,
        policy: RestartPolicy,
        input_batches_max: usize,
        wal_sync_stall_ms_max: u64,
    ) -> ShardDriver {
        let mut d = ShardDriver {
            idx,
            config,
            input: VecDeque::new(),
            input_batches_max: input_batches_max.max(1),
            state: State::Recovering,
            writing: None,
            orphaned_writes: 0,
            wal_sync_stall_ms_max,
            supervision: Supervision::new(policy),
            writes_from_unix_ms: None,
            sessions: BTreeSet::new(),
            effects: VecDeque::new(),
            status: DriverStatus::default(),
            planted: PlantedGlueBugs::default(),
            incarnation: 0,
            replica: None,
            jitter: 0,
            tick_at_mono_ms: None,
            forwarded: BTreeMap::new(),
            forward_timeout_ms: 0,
            forward_term: None,
            remote_sent: BTreeMap::new(),
            forward_sent: BTreeMap::new(),
            forward_seen: BTreeMap::new(),
            remote_seen: BTreeMap::new(),
            remote_sessions_max: forward::REMOTE_SESSIONS_MAX,
            members_target: BTreeSet::new(),
        };
        d.request_recovery();
        d
    }

    /// A driver of one replica of the shard's Raft group; `jitter_seed` seeds its election
    /// jitter (the node draws it at start, the simulator from its seed). Its first effect asks
    /// for the replica's recovery from its store.
    pub fn replicated(
        idx: ShardIdx,
        config: ShardConfig,
        policy: RestartPolicy,
        input_batches_max: usize,
        wal_sync_stall_ms_max: u64,
        replica: ReplicaConfig,
        jitter_seed: u64,
    ) -> ShardDriver {
        let mut d = ShardDriver::new(
            idx,
            config,
            policy,
            input_batches_max,
            wal_sync_stall_ms_max,
        );
        d.forward_timeout_ms = replica.raft.raft_election_timeout_ms;
        d.replica = Some(replica.clone());
        d.jitter = jitter_seed;
        // The recovery asked for by `new` must recover a replica.
        for e in d.effects.iter_mut() {
            if let Effect::Recover(job) = e {
                job.replica = Some(replica.clone());
            }
        }
        d
    }

    /// Plants host bugs (the simulator only).
    pub fn with_planted(mut self, planted: PlantedGlueBugs) -> ShardDriver {
        self.planted = planted;
        self
    }

    pub fn idx(&self) -> ShardIdx {
        self.idx
    }

    pub fn status(&self) -> &DriverStatus {
        &self.status
    }

    /// The serving incarnation (metrics, and the simulator's audits, which read it directly).
    pub fn shard(&self) -> Option<&Shard> {
        match &self.state {
            State::Serving(s) => Some(s.shard()),
            _ => None,
        }
    }

    pub fn shard_mut(&mut self) -> Option<&mut Shard> {
        match &mut self.state {
            State::Serving(s) => Some(s.shard_mut()),
            _ => None,
        }
    }

    /// The serving replica, if this driver serves one (role, term, commit for operators).
    pub fn replica(&self) -> Option<&Replica> {
        match &self.state {
            State::Serving(s) => s.replica(),
            _ => None,
        }
    }

    /// Room in the input queue for another batch: false is the adapter's backpressure (stop
    /// reading the channel; the sessions behind it stop reading their sockets).
    pub fn wants_batch(&self) -> bool {
        self.input.len() < self.input_batches_max
    }

    /// A batch handed in now is taken at once: fed whole into a serving shard that wants
    /// input, or answered by the stand-in while there is no incarnation (a recovery under way
    /// holds it instead).
    pub fn feeds_now(&self) -> bool {
        self.input.is_empty()
            && match &self.state {
                State::Serving(s) => s.wants_input(),
                State::Recovering => false,
                State::Waiting { .. } | State::Stopped => true,
            }
    }

    /// Moves what the serving shard produced since the last call (after requests put to it
    /// directly through `shard_mut`, as the simulator's audits do) and starts the next write.
    pub fn flush(&mut self, t: Time) {
        self.pump(t);
    }

    /// A write is in flight.
    pub fn is_writing(&self) -> bool {
        self.writing.is_some()
    }

    /// Everything taken in is written, synced and answered (graceful shutdown waits for it).
    pub fn is_idle(&self) -> bool {
        self.input.is_empty()
            && self.writing.is_none()
            && self.effects.is_empty()
            && self.shard().is_none_or(|s| s.is_idle())
    }

    /// One session's batch of requests. The adapter checks `wants_batch` first; a batch past
    /// the bound is still taken (a channel already held it), never dropped.
    pub fn handle_batch(&mut self, t: Time, session: SessionId, batch: Vec<Request>) {
        self.sessions.insert(session);
        self.input.push_back(batch);
        self.pump(t);
    }

    /// The write handed out as `Effect::Write` finished.
    pub fn handle_write_done(&mut self, t: Time, result: Result<(), WriteFailure>) {
        let Some(w) = self.writing.take() else {
            // Only an ended incarnation's write can finish with none in flight.
            assert!(
                self.orphaned_writes > 0,
                "a write finished that was never started"
            );
            self.orphaned_writes -= 1;
            return;
        };
        self.status.wal_stalled = false;
        let State::Serving(shard) = &mut self.state else {
            return;
        };
        match result {
            Ok(()) => {
                shard.handle_wal_done(t, w.last_lsn);
                self.status.disk_full = false;
                self.status.serving = true;
            }
            Err(f) => self.write_failed(t, f),
        }
        self.pump(t);
    }

    /// A read handed out as `Effect::Read` finished. A read the shard cannot verify after its
    /// retries fails the incarnation (the restart policy then recovers it from disk, which
    /// checks every record).
    pub fn handle_read_done(&mut self, t: Time, done: ReadDone) {
        if done.incarnation != self.incarnation {
            return;
        }
        let State::Serving(shard) = &mut self.state else {
            return;
        };
        shard.handle_read_done(t.unix_ms, done.id, done.result);
        if let Some(why) = shard.shard().read_failure() {
            self.status.last_error = Some(format!("reading the WAL failed: {why}"));
            self.status.serving = false;
            self.route_outputs();
            self.end_incarnation(t, ShardFailure::Storage);
        }
        self.pump(t);
    }

    /// Hands back the buffer of a finished write (optional; see `Shard::recycle_wal_buffer`).
    pub fn recycle_wal_buffer(&mut self, buffer: Vec<u8>) {
        if let State::Serving(s) = &mut self.state {
            s.shard_mut().recycle_wal_buffer(buffer);
        }
    }

    fn write_failed(&mut self, t: Time, f: WriteFailure) {
        let no_space = f.error.kind == StoreErrorKind::NoSpace;
        let reason = f.error.to_string();
        if let State::Serving(shard) = &mut self.state {
            shard.handle_wal_failed(t, no_space, &reason);
        }
        self.route_outputs();
        self.status.last_error = Some(match &f.cleanup_error {
            Some(e) => format!("{reason}; then cutting the write back failed: {e}"),
            None => reason,
        });
        self.status.disk_full = no_space;
        self.status.serving = false;
        if self.planted.glue_restart_without_recovery && f.cleaned {
            if let State::Serving(shard) = &mut self.state {
                // The bug: the failed incarnation (memory ahead of the disk) goes on.
                shard.shard_mut().revive_for_planted_bug();
                self.status.serving = true;
                return;
            }
        }
        let failure = match (f.cleaned, no_space) {
            (false, _) => ShardFailure::Unrecoverable,
            (true, true) => ShardFailure::NoSpace,
            (true, false) => ShardFailure::Storage,
        };
        self.end_incarnation(t, failure);
    }

    /// The incarnation is gone: tell its sessions, then follow the restart policy.
    fn end_incarnation(&mut self, t: Time, failure: ShardFailure) {
        self.state = State::Stopped;
        if self.writing.take().is_some() {
            self.orphaned_writes += 1;
        }
        self.status.restarts += 1;
        for session in std::mem::take(&mut self.sessions) {
            self.effects.push_back(Effect::CloseSession {
                session,
                why: CloseReason::Restarted,
            });
        }
        match self.supervision.handle_failure(t.mono_ms, failure) {
            Decision::RecoverRefusingWrites { writes_from_ms } => {
                let wait = writes_from_ms.saturating_sub(t.mono_ms);
                self.writes_from_unix_ms = Some(t.unix_ms + wait);
                self.request_recovery();
            }
            Decision::RestartAt { at_ms } => {
                self.state = State::Waiting {
                    until_mono_ms: at_ms,
                }
            }
            Decision::StayDown => self.state = State::Stopped,
        }
    }

    fn request_recovery(&mut self) {
        self.state = State::Recovering;
        self.tick_at_mono_ms = None;
        self.effects.push_back(Effect::Recover(RecoverJob {
            config: self.config.clone(),
            replica: self.replica.clone(),
        }));
    }

    /// The incarnation failed outside its writes (a panic in the core, an operator's crash
    /// drill): it ends as after a failed write, and the restart policy decides what next.
    pub fn handle_crash(&mut self, t: Time, why: &str) {
        if !matches!(self.state, State::Serving(_)) {
            return;
        }
        self.status.last_error = Some(why.to_string());
        self.status.serving = false;
        self.end_incarnation(t, ShardFailure::Crashed);
        self.pump(t);
    }

    /// The recovery asked for with `Effect::Recover` finished.
    pub fn handle_recovered(
        &mut self,
        t: Time,
        result: Result<(Core, RecoveryReport), RecoverError>,
    ) {
        if !matches!(self.state, State::Recovering) {
            debug_assert!(false, "a recovery arrived that was not asked for");
            return;
        }
        // The adapter finished every ended incarnation's write before it recovered.
        self.orphaned_writes = 0;
        match result {
            Ok((mut core, _)) => {
                if let Some(until) = self.writes_from_unix_ms.take() {
                    core.shard_mut().handle_storage_full(t.unix_ms, until);
                }
                if core.replica().is_some() {
                    self.tick_at_mono_ms = Some(t.mono_ms);
                }
                self.state = State::Serving(core);
                self.incarnation += 1;
                self.status.serving = !self.status.disk_full;
                self.status.stopped = false;
            }
            Err(e) => {
                // Corruption or a missing segment: an operator must look.
                self.status.last_error = Some(format!("recovery refused: {e}"));
                self.status.stopped = true;
                self.state = State::Stopped;
            }
        }
        self.pump(t);
    }

    /// The adapter could not queue an `Effect::Replies` for `session` (its reply channel is
    /// full: the session stopped draining it). The session is closed as `overloaded` and the
    /// shard forgets it; its client reconnects and resumes.
    pub fn handle_reply_refused(&mut self, t: Time, session: SessionId) {
        self.sessions.remove(&session);
        if self.planted.glue_drop_reply_on_full_queue {
            return;
        }
        self.effects.push_back(Effect::CloseSession {
            session,
            why: CloseReason::Overloaded,
        });
        if let State::Serving(shard) = &mut self.state {
            shard.shard_mut().handle_request(
                t.unix_ms,
                Request {
                    session,
                    op: ShardOp::Closed,
                },
            );
        }
        self.effects.push_back(Effect::Forget { session });
    }

    /// The next time `handle_timeout` has something to do (monotonic ms).
    pub fn poll_timeout(&self) -> Option<u64> {
        let stall = self
            .writing
            .filter(|_| !self.status.wal_stalled)
            .map(|w| w.started_mono_ms + self.wal_sync_stall_ms_max);
        let restart = match self.state {
            State::Waiting { until_mono_ms } => Some(until_mono_ms),
            _ => None,
        };
        stall
            .into_iter()
            .chain(restart)
            .chain(self.tick_at_mono_ms)
            .chain(self.forward_deadline())
            .min()
    }

    pub fn handle_timeout(&mut self, t: Time) {
        if let Some(w) = self.writing {
            if t.mono_ms >= w.started_mono_ms + self.wal_sync_stall_ms_max {
                self.status.wal_stalled = true;
            }
        }
        if let State::Waiting { until_mono_ms } = self.state {
            if t.mono_ms >= until_mono_ms {
                self.request_recovery();
            }
        }
        self.tick(t);
        self.pump(t);
    }

    /// The next effect for the adapter (replies and closes for sessions of other nodes are
    /// addressed to them).
    pub fn poll_effect(&mut self) -> Option<Effect> {
        let e = self.effects.pop_front()?;
        Some(self.route_effect(e))
    }

    /// Moves work: input into the shard while it wants it (or into `unavailable` answers
    /// while it is down), the next WAL write, the shard's outputs to their sessions.
    fn pump(&mut self, t: Time) {
        match &self.state {
            State::Serving(_) => self.feed(t),
            _ => self.answer_down(),
        }
        self.restart_if_deposed(t);
        self.expire_forwarded(t);
        if self.writing.is_none() {
            if let State::Serving(shard) = &mut self.state {
                if let Some(w) = shard.poll_wal(t) {
                    self.writing = Some(WriteInFlight {
                        last_lsn: w.last_lsn,
                        started_mono_ms: t.mono_ms,
                    });
                    let mut steps = self.config.planted;
                    steps.no_dir_fsync_on_segment_create |=
                        self.planted.glue_no_dir_fsync_on_segment_create;
                    self.effects
                        .push_back(Effect::Write(WriteJob { write: w, steps }));
                }
            }
        }
        self.route_outputs();
        // After the outputs: drains (run by `poll_output`) are what ask for most reads.
        if let State::Serving(shard) = &mut self.state {
            while let Some(request) = shard.poll_reads() {
                self.effects.push_back(Effect::Read(ReadJob {
                    incarnation: self.incarnation,
                    request,
                }));
            }
        }
        self.replica_effects();
    }

    /// Input batches into the serving shard, each whole, while it wants input (a follower
    /// replica's driver forwards its local sessions' batches to the leader instead).
    fn feed(&mut self, t: Time) {
        let mut taken = 0;
        while taken < PUMP_BATCHES_MAX && self.core_wants_input() {
            let Some(mut batch) = self.input.pop_front() else {
                break;
            };
            taken += 1;
            let session = batch.first().map_or(0, |r| r.session);
            if self.forward(t, session, &mut batch) {
                continue;
            }
            self.feed_batch(t, batch);
        }
    }

    fn core_wants_input(&self) -> bool {
        matches!(&self.state, State::Serving(core) if core.wants_input())
    }

    fn feed_batch(&mut self, t: Time, batch: Vec<Request>) {
        let State::Serving(shard) = &mut self.state else {
            return;
        };
        let closing: Vec<SessionId> = batch
            .iter()
            .filter(|r| matches!(r.op, ShardOp::Closed))
            .map(|r| r.session)
            .collect();
        if self.planted.glue_batch_drops_rest_under_backpressure {
            for req in batch {
                if !shard.wants_input() {
                    break; // the bug: the rest of the batch is lost
                }
                shard.handle_requests(t, vec![req]);
            }
        } else {
            shard.handle_requests(t, batch);
        }
        for session in closing {
            self.sessions.remove(&session);
            // Replies already owed go out before the sink is forgotten.
            route(shard, &mut self.effects);
            self.effects.push_back(Effect::Forget { session });
        }
    }

    /// A replica's tick, when due: elections and heartbeats (jitter from the seeded source).
    fn tick(&mut self, t: Time) {
        if self.tick_at_mono_ms.is_none_or(|at| t.mono_ms < at) {
            return;
        }
        let jitter = self.next_jitter();
        let State::Serving(core) = &mut self.state else {
            return;
        };
        let Some(r) = core.replica_mut() else {
            return;
        };
        r.handle_tick(t.mono_ms, jitter);
        if r.mode() == fabric_shard::replica::Mode::Leading {
            // A step the core refuses (a change still pending, a term without a committed
            // entry yet) is tried again at the next tick.
            match placement::next_step(r.raft(), &self.members_target) {
                Some(placement::Step::Propose(cc)) => {
                    let _ = r.propose_conf_change(t.mono_ms, cc);
                }
                Some(placement::Step::Transfer(to)) => {
                    let _ = r.transfer_leadership(t.mono_ms, to);
                }
                None => {}
            }
        }
        // On a grid of the interval, the same for every shard of the node (one monotonic
        // clock): their leaders heartbeat in the same instant, so the link finds a peer's
        // heartbeats queued together and sends them as one frame (`beats`).
        self.tick_at_mono_ms = Some(next_on_grid(t.mono_ms, r.tick_interval_ms()));
    }

    /// The nodes that should hold this shard's replicas, from the node's placement: when this
    /// replica leads, it brings the group there ([`placement`]).
    pub fn set_members_target(&mut self, target: BTreeSet<NodeId>) {
        self.members_target = target;
    }

    /// splitmix64 over the driver's seed.
    fn next_jitter(&mut self) -> u64 {
        self.jitter = self.jitter.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.jitter;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A message from the replica of this shard on another node.
    pub fn handle_peer_message(&mut self, t: Time, msg: PeerMessage) {
        if let State::Serving(core) = &mut self.state {
            if let Some(r) = core.replica_mut() {
                r.handle_peer_message(t.mono_ms, msg);
            }
        }
        self.pump(t);
    }

    /// A log read handed out as `Effect::LogRead` finished.
    pub fn handle_log_read_done(
        &mut self,
        t: Time,
        effect: &LogReadEffect,
        result: Result<Vec<Entry>, LogReadError>,
    ) {
        if effect.incarnation != self.incarnation {
            return;
        }
        if let State::Serving(core) = &mut self.state {
            if let Some(r) = core.replica_mut() {
                r.handle_log_read(t.mono_ms, effect.job.id, result);
            }
        }
        self.pump(t);
    }

    /// A replica's messages and log reads become effects.
    fn replica_effects(&mut self) {
        let State::Serving(core) = &mut self.state else {
            return;
        };
        let Some(r) = core.replica_mut() else {
            return;
        };
        for m in r.poll_messages() {
            self.effects.push_back(Effect::Peer(m));
        }
        for job in r.poll_log_reads() {
            self.effects.push_back(Effect::LogRead(LogReadEffect {
                incarnation: self.incarnation,
                job,
            }));
        }
    }

    /// A replica that must start again from disk (deposed with applied records that may never
    /// commit): its answers go out, its sessions are told, and it recovers at once (no
    /// backoff: nothing failed).
    fn restart_if_deposed(&mut self, t: Time) {
        let deposed = matches!(&self.state, State::Serving(c) if c.needs_restart());
        if !deposed {
            return;
        }
        self.route_outputs();
        self.replica_effects();
        if self.writing.take().is_some() {
            self.orphaned_writes += 1;
        }
        for session in std::mem::take(&mut self.sessions) {
            self.effects.push_back(Effect::CloseSession {
                session,
                why: CloseReason::LeaderChanged,
            });
        }
        // Whoever forwards here again after attaching numbers its batches from 1.
        self.forward_seen.clear();
        self.status.serving = false;
        let _ = t;
        self.request_recovery();
    }

    /// While there is no serving incarnation: every request answered `unavailable`.
    fn answer_down(&mut self) {
        let reason = match &self.state {
            State::Stopped => format!(
                "shard {} is down: {}",
                self.idx,
                self.status.last_error.as_deref().unwrap_or("stopped")
            ),
            _ => format!("shard {} is recovering; retry shortly", self.idx),
        };
        let mut out = Grouped::default();
        for batch in self.input.drain(..) {
            for req in &batch {
                if let Some(o) = fabric_shard::unavailable_reply(req, &reason) {
                    out.push(o.session, o.reply);
                }
                if matches!(req.op, ShardOp::Closed) {
                    self.sessions.remove(&req.session);
                }
            }
        }
        out.into_effects(&mut self.effects);
    }

    fn route_outputs(&mut self) {
        if let State::Serving(shard) = &mut self.state {
            route(shard, &mut self.effects);
        }
    }
}

/// The shard's outputs, grouped per session in the order each session first appears.
fn route(shard: &mut Core, effects: &mut VecDeque<Effect>) {
    let mut out = Grouped::default();
    while let Some(o) = shard.poll_output() {
        out.push(o.session, o.reply);
    }
    out.into_effects(effects);
}

/// Replies grouped per session, sessions in the order they first appear (a drain after a group
/// commit touches every attached session: an index keeps grouping linear).
#[derive(Default)]
struct Grouped {
    order: Vec<(SessionId, Vec<Reply>)>,
    index: HashMap<SessionId, usize>,
}

impl Grouped {
    fn push(&mut self, session: SessionId, reply: Reply) {
        match self.index.get(&session) {
            Some(&i) => self.order[i].1.push(reply),
            None => {
                self.index.insert(session, self.order.len());
                self.order.push((session, vec![reply]));
            }
        }
    }

    fn into_effects(self, effects: &mut VecDeque<Effect>) {
        for (session, replies) in self.order {
            effects.push_back(Effect::Replies { session, replies });
        }
    }
}

/// The first multiple of `interval_ms` after `now_ms`.
fn next_on_grid(now_ms: u64, interval_ms: u64) -> u64 {
    let i = interval_ms.max(1);
    (now_ms / i + 1) * i
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_replicated;
