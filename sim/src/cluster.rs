//! Replicated clusters: 3 or 5 nodes, each running the node's own replicated shard host
//! (`fabric_router::host::ShardDriver::replicated`: the Raft core, the replica, forwarding to
//! the leader, recovery of a deposed leader) over its own simulated [`Disk`], with a network
//! of node-link messages the run delays, drops, duplicates and partitions (symmetric, one-way
//! and partial), power losses of one or more nodes at once, and a clock per node (offset up to
//! 5 s, drift up to 0.1%). Clients on every node append to a conversation with idempotency
//! keys, through whichever node they are on, and retry an `unavailable` with the same key; a
//! closed session is followed by a new one. Power losses may flip a bit in a node's synced
//! log (it repairs). A session's frames keep their order between two nodes; Raft's may not.
//!
//! With `watch`, every member node also runs a watcher: a session of the node's own edge core
//! that takes the peer's inbox and a subscription through leader changes and lost session
//! frames (`watch`); a third of the writes are then keyed sends to that peer.
//!
//! What this level leaves out: client connections (the writing clients hand shard ops to
//! their node's driver), and the metadata group.
//!
//! Checkers ([`ClusterViolationKind`]): at most one leader per term; a node's commit index
//! never goes back within an incarnation; every acknowledged append is in the committed log of
//! every replica, with its body, at one seq per key; committed prefixes are identical; after
//! the heal a leader within two election timeouts and a second, and every request answered
//! within 10 s; no term increase when
//! a node that was cut off rejoins a group whose leader reached a quorum throughout (pre-vote
//! and check-quorum); a leader never advances its commit to an entry of an earlier term; a node
//! never grants its vote to two candidates in one term; watchers see each pos and seq once, in
//! order, and after the heal everything acknowledged (`watch`).

use crate::disk::{CrashFaults, Disk};
use fabric_proto::internal::{Reply, Request, ShardOp};
use fabric_proto::{Body, ConvId, ErrorCode, MeshId, PeerId, ServerOp};
use fabric_router::host::{session_id, Effect, NodeFrame, ShardDriver, Time, WriteJob};
use fabric_router::supervise::RestartPolicy;
use fabric_shard::raft::{NodeId, RaftConfig, RaftPlanted};
use fabric_shard::record::Record;
use fabric_shard::replica::{PeerMessage, ReplicaConfig, ReplicaPlanted};
use fabric_shard::store::{self, SegmentStore};
use fabric_shard::{wal, ShardConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};

mod watch;

/// The simulated time a step advances.
const STEP_MS: u64 = 5;
/// After the heal, a Raft leader must be elected within two election timeouts and this much
/// more: nodes rebooted at the heal start their election timers then (a timeout jittered up
/// to 2x), and one failed round (a candidate whose log is behind) may come first. The
/// failover bound for a leader's crash among live followers (2 s at the defaults) is
/// `fabric-bench`'s to measure.
pub const LEADER_AFTER_HEAL_SLACK_MS: u64 = 1_000;
/// After the heal, every request must be answered within this.
pub const ANSWERED_AFTER_HEAL_MS: u64 = 10_000;

/// Bugs a cluster run can plant (each must be caught within 500 seeds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterPlanted {
    pub replica: ReplicaPlanted,
    pub raft: RaftPlanted,
}

/// The planted bugs a cluster run knows, by name.
pub const CLUSTER_PLANTED_NAMES: [&str; 9] = [
    "ack_before_quorum",
    "follower_ack_before_fsync",
    "commit_old_term_by_count",
    "vote_not_persisted",
    "truncate_committed_on_conflict",
    "no_prevote_checkquorum",
    "read_without_quorum",
    "repair_votes_early",
    "members_not_persisted",
];

impl ClusterPlanted {
    pub fn by_name(name: &str) -> Option<ClusterPlanted> {
        let mut p = ClusterPlanted::default();
        match name {
            "ack_before_quorum" => p.replica.ack_before_quorum = true,
            "follower_ack_before_fsync" => p.replica.follower_ack_before_fsync = true,
            "commit_old_term_by_count" => p.raft.commit_old_term_by_count = true,
            "vote_not_persisted" => p.raft.vote_not_persisted = true,
            "truncate_committed_on_conflict" => p.raft.truncate_committed_on_conflict = true,
            "no_prevote_checkquorum" => p.raft.no_prevote_checkquorum = true,
            "read_without_quorum" => p.replica.read_without_quorum = true,
            "repair_votes_early" => p.raft.repair_votes_early = true,
            "members_not_persisted" => p.replica.members_not_persisted = true,
            _ => return None,
        }
        Some(p)
    }
}

/// What one run varies.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: u64,
    /// Simulated ms of the fault phase.
    pub duration_ms: u64,
    pub drop_pct: u64,
    pub dup_pct: u64,
    pub delay_ms_max: u64,
    /// Chances per step, in parts per ten thousand.
    pub crash_per_10k: u64,
    /// The serving leader's power is cut (parts per ten thousand per step).
    pub leader_kill_per_10k: u64,
    /// A node that is down comes back (parts per thousand per step: 50 is a fast reboot).
    pub reboot_per_1000: u64,
    /// Targeted faults, in percent: a node loses power right after it grants a vote (and
    /// comes back a few ms later); a new leader loses power within 50 ms of its election.
    pub crash_after_vote_pct: u64,
    pub kill_new_leader_pct: u64,
    pub partition_per_10k: u64,
    /// Raft's flow-control limits for the run: small ones split catch-up into many appends
    /// and send followers to log reads.
    pub raft_append_bytes_max: u64,
    pub raft_inflight_entries_max: u64,
    /// Retention's limit: small ones make leaders retire segments (followers retire theirs,
    /// and a follower left behind gets a snapshot).
    pub retention_bytes_max: u64,
    /// The election timeout (the defaults' 1,000 ms, or shorter: with a timeout near the
    /// network's delays, elections split and race), and a heartbeat of a tenth of it.
    pub raft_election_timeout_ms: u64,
    pub raft_entry_cache_bytes_max: u64,
    /// Of the power losses, the percent that also flip one bit in the node's synced log (in a
    /// record or frame header, never the final write, which a torn write explains): the node
    /// restarts in repair. One node at a time: the others hold every entry it may lose.
    pub bitrot_pct: u64,
    /// Membership changes: the chance per step (parts per ten thousand) that the group's
    /// target moves (one member out, one node in); with any, the run has one more node, which
    /// starts outside the group. 0: none, and the run is what it was before the option.
    pub membership_per_10k: u64,
    /// Watchers: every node runs a client session through its own edge core that takes the
    /// peer's inbox and a subscription, and a third of the workload sends to that peer
    /// (`watch`). Off: the run is what it was before the option.
    pub watch: bool,
    pub planted: ClusterPlanted,
}

/// The options of seed `seed` in the cluster swarm.
pub fn cluster_swarm(seed: u64) -> ClusterOptions {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xC1u64 << 56);
    let mut o = ClusterOptions {
        nodes: if rng.random_bool(0.3) { 5 } else { 3 },
        duration_ms: rng.random_range(3_000..8_000),
        drop_pct: rng.random_range(0..8),
        dup_pct: rng.random_range(0..4),
        delay_ms_max: rng.random_range(1..30),
        crash_per_10k: rng.random_range(0..40),
        leader_kill_per_10k: rng.random_range(0..30),
        reboot_per_1000: [5, 20, 80][rng.random_range(0..3)],
        crash_after_vote_pct: [0, 5, 30][rng.random_range(0..3)],
        kill_new_leader_pct: [0, 10, 40][rng.random_range(0..3)],
        partition_per_10k: rng.random_range(0..60),
        raft_append_bytes_max: [1_024, 16 * 1_024, 1 << 20][rng.random_range(0..3)],
        raft_election_timeout_ms: [1_000, 1_000, 200, 100][rng.random_range(0..4)],
        retention_bytes_max: [RETENTION_NEVER_BYTES, 96 * 1_024, 48 * 1_024]
            [rng.random_range(0..3)],
        raft_inflight_entries_max: [4, 32, 256][rng.random_range(0..3)],
        raft_entry_cache_bytes_max: [2_048, 64 * 1024, 16 << 20][rng.random_range(0..3)],
        // Drawn last, so every earlier option of a seed stays what it was.
        bitrot_pct: [0, 20, 60][rng.random_range(0..3)],
        membership_per_10k: [0, 0, 5, 20][rng.random_range(0..4)],
        watch: false,
        planted: ClusterPlanted::default(),
    };
    // Half the runs that change membership retire segments fast, so the segments that held
    // conf entries go within the run (the membership must then come from `MEMBERS`).
    if o.membership_per_10k > 0 && rng.random_bool(0.5) {
        o.retention_bytes_max = MEMBERSHIP_RETENTION_BYTES_MAX;
    }
    // Drawn after everything else, for the same reason.
    o.watch = rng.random_bool(0.5);
    o
}

/// A retention no run reaches: nothing is retired.
const RETENTION_NEVER_BYTES: u64 = 256 << 20;

/// Idempotency keys of the workload's sends start with this (appends' with `k`).
const SEND_KEY_PREFIX: &str = "s";

/// The retention of the membership runs that retire fast: a little over one 16 KiB segment.
const MEMBERSHIP_RETENTION_BYTES_MAX: u64 = 20 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClusterViolationKind {
    TwoLeaders,
    CommitWentBack,
    AckedLost,
    KeyTwoSeqs,
    PrefixDiverged,
    NoLeaderAfterHeal,
    Unanswered,
    Disruption,
    RecoveryRefused,
    /// A node granted its vote to two candidates in one term (its vote was not durable).
    VotedTwice,
    /// A leader advanced its commit index to an entry of an earlier term (Raft commits by
    /// counting only entries of the leader's own term).
    OldTermCommit,
    /// A core's own assertion failed (a Raft or replica invariant, checked where it holds).
    Assertion,
    /// A linearizable read's page missed an entry acknowledged before the read was asked.
    StaleRead,
    /// A page showed, at an acknowledged entry's seq, another body (data never committed).
    PageNotCommitted,
    /// After the heal, a member of the group holds another configuration than its leader's.
    MembershipDiverged,
    /// A watcher's session handed its client a pos or seq twice, out of order, with a gap,
    /// or with another body than the one acknowledged; or after the heal it lacks something
    /// acknowledged.
    WatchBroken,
}

#[derive(Debug, Clone)]
pub struct ClusterViolation {
    pub seed: u64,
    pub kind: ClusterViolationKind,
    pub message: String,
}

#[derive(Debug, Clone, Default)]
pub struct ClusterSummary {
    pub sim_ms: u64,
    pub acked: u64,
    pub crashes: u64,
    pub restarts: u64,
    pub partitions: u64,
    pub messages: u64,
    pub leader_changes: u64,
    /// Bits flipped in synced logs.
    pub bitrots: u64,
    /// Times the group's target membership moved.
    pub membership_changes: u64,
    /// Leader changes that reached a watcher's session (it attached again).
    pub watch_leader_changes: u64,
}

type Checked<T = ()> = Result<T, (ClusterViolationKind, String)>;

/// A node-link frame in flight (the node's own frame type and its checks on receipt).
struct Packet {
    at: u64,
    from: NodeId,
    to: NodeId,
    frame: NodeFrame,
}

struct Node {
    id: NodeId,
    driver: ShardDriver,
    disk: Disk,
    /// The write in flight and when its fsync completes.
    write: Option<(WriteJob, u64)>,
    up: bool,
    /// This node's clocks: mono = now * (1 + drift) + offset.
    drift_ppm: i64,
    offset_ms: u64,
    incarnation_commit: u64,
    /// A bit of its synced log was flipped (it restarts in repair).
    rotted: bool,
    /// The number of its client's current session (a reconnect opens the next).
    client_session: u64,
}

impl Node {
    /// A bit of its log was flipped and its repair has not been seen to end (it may be down,
    /// or not yet recovered).
    fn repairing(&self) -> bool {
        self.rotted
            && (!self.up
                || self
                    .driver
                    .replica()
                    .is_none_or(|r| r.raft().repair_through().is_some()))
    }
}

/// A page asked for and not answered yet.
struct PendingRead {
    /// The highest seq acknowledged when it was asked: a linearizable page reaches it.
    floor: u64,
    /// `?consistency=local`: the node's replica answers, and may lag.
    local: bool,
    node: usize,
}

/// One client request waiting for its answer (per node session, by ref).
struct Pending {
    key: String,
    body: String,
    issued_ms: u64,
    node: usize,
}

struct World {
    opts: ClusterOptions,
    rng: ChaCha8Rng,
    nodes: Vec<Node>,
    wire: Vec<Packet>,
    now: u64,
    /// Directed links that drop everything: (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
    next_r: u64,
    pending: BTreeMap<u64, Pending>,
    /// Keys not yet acknowledged, to retry (key, body).
    retry: Vec<(String, String)>,
    /// key -> (seq, body)
    acked: BTreeMap<String, (u64, String)>,
    /// The acknowledged appends by seq (body), for checking pages.
    acked_by_seq: BTreeMap<u64, String>,
    reads: BTreeMap<u64, PendingRead>,
    leaders: BTreeMap<u64, NodeId>,
    summary: ClusterSummary,
    healed_at: Option<u64>,
    /// A node was cut off alone while a leader kept its quorum: (node, leader, term) at heal.
    watch_disruption: Option<(NodeId, u64, u64)>,
    /// The node the last partition cut off alone, and its term then (if it was up).
    lone_term_at_cut: Option<(NodeId, u64)>,
    /// When the last session frame from one node to another arrives: later ones come after.
    session_frames_at: BTreeMap<(NodeId, NodeId), u64>,
    /// Votes seen leaving: (voter, term) -> candidate.
    votes: BTreeMap<(NodeId, u64), NodeId>,
    /// Each leader's commit index as last seen: (node, term) -> commit.
    leader_commits: BTreeMap<(NodeId, u64), u64>,
    /// Targeted faults to come: (at ms, node index, reboot: false = power loss).
    scheduled: Vec<(u64, usize, bool)>,
    faulting: bool,
    /// The group's voters at creation (every node's `ReplicaConfig`), and the nodes that
    /// should hold it now (what placement hands every driver).
    voters0: BTreeSet<NodeId>,
    target: BTreeSet<NodeId>,
    /// Candidates seen per term since the heal: two in one term split that term's vote.
    candidates_after_heal: BTreeMap<u64, BTreeSet<NodeId>>,
    /// Each node's watcher (`watch`), and how many watcher sessions were opened.
    watchers: Vec<Option<watch::Watcher>>,
    watch_sessions: u64,
    /// Acknowledged sends: key -> pos, and pos -> body.
    acked_sends: BTreeMap<String, u64>,
    acked_sends_by_pos: BTreeMap<u64, String>,
}

/// The run's timing and flow-control limits.
fn raft_config(opts: &ClusterOptions) -> RaftConfig {
    RaftConfig {
        raft_heartbeat_ms: opts.raft_election_timeout_ms / 10,
        raft_election_timeout_ms: opts.raft_election_timeout_ms,
        raft_append_bytes_max: opts.raft_append_bytes_max,
        raft_inflight_entries_max: opts.raft_inflight_entries_max,
        raft_entry_cache_bytes_max: opts.raft_entry_cache_bytes_max,
        planted: opts.planted.raft,
        ..RaftConfig::default()
    }
}

fn shard_config(opts: &ClusterOptions) -> ShardConfig {
    ShardConfig {
        wal_segment_bytes_max: 16 * 1024,
        wal_batch_bytes_max: 4 * 1024,
        retention_bytes_max: opts.retention_bytes_max,
        ..ShardConfig::default()
    }
}

/// Runs one seed of a replicated cluster.
pub fn run_cluster(
    seed: u64,
    opts: &ClusterOptions,
) -> Result<ClusterSummary, Box<ClusterViolation>> {
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut w = World::new(seed, opts.clone());
        w.run().map(|()| {
            w.summary.sim_ms = w.now;
            w.summary.leader_changes = w.leaders.len() as u64;
            w.summary
        })
    }));
    let violation = |kind, message| {
        Box::new(ClusterViolation {
            seed,
            kind,
            message,
        })
    };
    match run {
        Ok(Ok(summary)) => Ok(summary),
        Ok(Err((kind, message))) => Err(violation(kind, message)),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(violation(ClusterViolationKind::Assertion, message))
        }
    }
}

impl World {
    fn new(seed: u64, opts: ClusterOptions) -> World {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let voters: BTreeSet<NodeId> = (1..=opts.nodes).collect();
        let mut nodes: Vec<Node> = voters
            .iter()
            .map(|&id| new_node(id, &voters, &opts, &mut rng))
            .collect();
        if opts.membership_per_10k > 0 {
            // The spare draws from its own source: the other nodes' draws stay what they are.
            let mut spare_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5BA4E);
            let id = opts.nodes + 1;
            nodes.push(new_node(id, &voters, &opts, &mut spare_rng));
        }
        for n in nodes.iter_mut() {
            n.driver.set_members_target(voters.clone());
        }
        let nodes_len = nodes.len();
        World {
            opts,
            rng,
            nodes,
            wire: Vec::new(),
            now: 0,
            cut: BTreeSet::new(),
            next_r: 1_000,
            pending: BTreeMap::new(),
            retry: Vec::new(),
            acked: BTreeMap::new(),
            acked_by_seq: BTreeMap::new(),
            reads: BTreeMap::new(),
            leaders: BTreeMap::new(),
            summary: ClusterSummary::default(),
            healed_at: None,
            watch_disruption: None,
            lone_term_at_cut: None,
            session_frames_at: BTreeMap::new(),
            scheduled: Vec::new(),
            faulting: false,
            votes: BTreeMap::new(),
            leader_commits: BTreeMap::new(),
            target: voters.clone(),
            voters0: voters,
            candidates_after_heal: BTreeMap::new(),
            watchers: (0..nodes_len).map(|_| None).collect(),
            watch_sessions: 0,
            acked_sends: BTreeMap::new(),
            acked_sends_by_pos: BTreeMap::new(),
        }
    }

    fn time(&self, i: usize) -> Time {
        let n = &self.nodes[i];
        let drifted = (self.now as i64 + self.now as i64 * n.drift_ppm / 1_000_000) as u64;
        Time {
            unix_ms: 1_700_000_000_000 + drifted + n.offset_ms,
            mono_ms: drifted + n.offset_ms,
        }
    }

    fn run(&mut self) -> Checked {
        self.setup()?;
        let end = self.now + self.opts.duration_ms;
        while self.now < end {
            self.faults();
            if self.rng.random_bool(0.5) {
                self.issue();
            }
            self.step()?;
        }
        self.heal();
        self.liveness()?;
        // Watchers acknowledge what they take, which writes: they finish before the group
        // settles, so the final checks see a quiet group (seed 5018184).
        self.watch_liveness()?;
        self.settle()?;
        self.check_logs()
    }

    fn setup(&mut self) -> Checked {
        let served = self.run_until(5_000, |w| w.leader().is_some())?;
        if !served {
            return Err((
                ClusterViolationKind::NoLeaderAfterHeal,
                "no leader at start".into(),
            ));
        }
        let l = self.leader().expect("a leader");
        let session = session_id(l as NodeId + 1, self.nodes[l].client_session);
        let ops = [
            ShardOp::CreateMesh {
                r: 1,
                mesh: MeshId::must("m"),
            },
            ShardOp::AddPeer {
                r: 2,
                mesh: MeshId::must("m"),
                peer: PeerId::must("a"),
                groups: vec![],
                token_hash: Some(fabric_shard::token_hash(watch::WATCH_TOKEN)),
                public_key: None,
            },
        ];
        let batch = ops.into_iter().map(|op| Request { session, op }).collect();
        let t = self.time(l);
        self.nodes[l].driver.handle_batch(t, session, batch);
        self.run_until(2_000, |w| w.acked_setup())?;
        Ok(())
    }

    fn acked_setup(&self) -> bool {
        self.summary.acked >= 2
    }
}

fn new_node(
    id: NodeId,
    voters: &BTreeSet<NodeId>,
    opts: &ClusterOptions,
    rng: &mut ChaCha8Rng,
) -> Node {
    let mut disk = Disk::new(0);
    store::init(&mut disk, 0).expect("a new disk takes a manifest");
    let driver = new_driver(id, voters, opts, rng.random());
    Node {
        id,
        driver,
        disk,
        write: None,
        up: true,
        drift_ppm: rng.random_range(-1_000..=1_000),
        offset_ms: rng.random_range(0..=5_000),
        incarnation_commit: 0,
        rotted: false,
        client_session: 1,
    }
}

fn new_driver(
    id: NodeId,
    voters: &BTreeSet<NodeId>,
    opts: &ClusterOptions,
    seed: u64,
) -> ShardDriver {
    let config = ReplicaConfig {
        node: id,
        voters: voters.clone(),
        raft: raft_config(opts),
        planted: opts.planted.replica,
    };
    ShardDriver::replicated(
        0,
        shard_config(opts),
        RestartPolicy::default(),
        1_024,
        60_000,
        config,
        seed,
    )
}

impl World {
    /// The index of a node whose replica serves as leader, if any.
    fn leader(&self) -> Option<usize> {
        self.nodes.iter().position(|n| {
            n.up && n
                .driver
                .replica()
                .is_some_and(|r| r.mode() == fabric_shard::replica::Mode::Leading)
        })
    }

    /// A grant leaving `voter`: one candidate per voter per term.
    fn check_vote(&mut self, voter: NodeId, m: &PeerMessage) -> Checked {
        let (term, candidate) = (m.term(), m.to());
        match self.votes.insert((voter, term), candidate) {
            Some(other) if other != candidate => Err((
                ClusterViolationKind::VotedTwice,
                format!("node {voter} voted for {other} and for {candidate} in term {term}"),
            )),
            _ => Ok(()),
        }
    }

    fn chance(&mut self, pct: u64) -> bool {
        self.rng.random_range(0..100) < pct
    }

    /// Some up node's Raft core leads (it may still be catching up before it serves).
    fn raft_leader(&self) -> bool {
        self.nodes.iter().any(|n| {
            n.up && n
                .driver
                .replica()
                .is_some_and(|r| r.raft().role() == fabric_shard::raft::Role::Leader)
        })
    }

    /// Steps until `done` or `ms` of simulated time passed; whether `done` held.
    fn run_until(&mut self, ms: u64, done: impl Fn(&World) -> bool) -> Checked<bool> {
        let end = self.now + ms;
        while self.now < end {
            if done(self) {
                return Ok(true);
            }
            self.step()?;
        }
        Ok(done(self))
    }

    /// One step: packets due delivered, fsyncs due completed, timers fired, effects performed,
    /// then the checks every step makes.
    fn step(&mut self) -> Checked {
        self.now += STEP_MS;
        self.deliver();
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up {
                continue;
            }
            let t = self.time(i);
            if let Some((_, at)) = &self.nodes[i].write {
                if *at <= self.now {
                    let (job, _) = self.nodes[i].write.take().expect("a write");
                    let n = &mut self.nodes[i];
                    let r = job.perform(&mut n.disk);
                    n.driver.handle_write_done(t, r);
                }
            }
            if self.nodes[i]
                .driver
                .poll_timeout()
                .is_some_and(|at| at <= t.mono_ms)
            {
                self.nodes[i].driver.handle_timeout(t);
            }
            self.effects(i)?;
        }
        self.pump_watchers()?;
        self.check_step()
    }

    fn deliver(&mut self) {
        let now = self.now;
        let (due, later): (Vec<Packet>, Vec<Packet>) = std::mem::take(&mut self.wire)
            .into_iter()
            .partition(|p| p.at <= now);
        self.wire = later;
        for p in due {
            let i = p.to as usize - 1;
            if !self.nodes[i].up || self.cut.contains(&(p.from, p.to)) {
                if !matches!(p.frame, NodeFrame::Peer(_)) {
                    self.link_reset(p.from, p.to);
                }
                continue;
            }
            let t = self.time(i);
            self.nodes[i].driver.handle_node_frame(t, p.from, p.frame);
        }
    }

    fn send(&mut self, from: NodeId, to: NodeId, frame: NodeFrame) {
        self.summary.messages += 1;
        if self.rng.random_range(0..100) < self.opts.drop_pct {
            if !matches!(frame, NodeFrame::Peer(_)) {
                self.link_reset(from, to);
            }
            return;
        }
        let delay = self.rng.random_range(1..=self.opts.delay_ms_max.max(1));
        let dup = self.rng.random_range(0..100) < self.opts.dup_pct;
        if let (true, NodeFrame::Peer(_)) = (dup, &frame) {
            let again = Packet {
                at: self.now + delay + 3,
                from,
                to,
                frame: frame.clone(),
            };
            self.wire.push(again);
        }
        // A session's frames (forwarded batches, replies, closes) keep their order between two
        // nodes, as on the node link's stream; Raft's messages may be reordered (Raft does not
        // mind, and it tests more). Lost ones stay lost: a reply frame after a gap closes its
        // session (`handle_remote_replies`).
        let mut at = self.now + delay;
        if !matches!(frame, NodeFrame::Peer(_)) {
            let last = self.session_frames_at.entry((from, to)).or_insert(0);
            at = at.max(*last);
            *last = at;
        }
        self.wire.push(Packet {
            at,
            from,
            to,
            frame,
        });
    }

    /// A session frame between `a` and `b` was lost: on the node link that is a connection
    /// that ended (a stream loses nothing else), which both ends' links see, and tell their
    /// shards, as the node's `route_inbound` does (`NodeFrame::LinkReset`).
    fn link_reset(&mut self, a: NodeId, b: NodeId) {
        for (me, peer) in [(a, b), (b, a)] {
            let i = me as usize - 1;
            if self.nodes[i].up {
                let t = self.time(i);
                self.nodes[i]
                    .driver
                    .handle_node_frame(t, peer, NodeFrame::LinkReset);
            }
        }
    }

    /// Performs node `i`'s effects as the node's adapter does.
    fn effects(&mut self, i: usize) -> Checked {
        let id = i as NodeId + 1;
        while let Some(e) = self.nodes[i].driver.poll_effect() {
            let t = self.time(i);
            match e {
                Effect::Write(job) => {
                    let fsync_ms = self.rng.random_range(1..8);
                    self.nodes[i].write = Some((job, self.now + fsync_ms));
                }
                Effect::Recover(job) => {
                    self.summary.restarts += 1;
                    let n = &mut self.nodes[i];
                    // As the node's adapter does: the ended incarnation's write finishes first.
                    if let Some((old, _)) = n.write.take() {
                        let r = old.perform(&mut n.disk);
                        n.driver.handle_write_done(t, r);
                    }
                    let r = job.perform(&mut n.disk).map_err(|e| {
                        let msg = format!("node {id} recovery refused a sound disk: {e}");
                        (ClusterViolationKind::RecoveryRefused, msg)
                    })?;
                    n.incarnation_commit = 0;
                    n.driver.handle_recovered(t, Ok(r));
                }
                Effect::Read(job) => {
                    let n = &mut self.nodes[i];
                    let done = job.perform(&mut n.disk);
                    n.driver.handle_read_done(t, done);
                }
                Effect::LogRead(job) => {
                    let n = &mut self.nodes[i];
                    let r = job.perform(&mut n.disk);
                    n.driver.handle_log_read_done(t, &job, r);
                }
                Effect::Peer(m) => {
                    let granted = matches!(
                        &m,
                        PeerMessage::Raft(fabric_shard::raft::Message {
                            body: fabric_shard::raft::MessageBody::VoteResponse { granted: true },
                            ..
                        })
                    );
                    if granted {
                        self.check_vote(id, &m)?;
                    }
                    self.send(id, m.to(), NodeFrame::Peer(m));
                    if granted && self.faulting && self.chance(self.opts.crash_after_vote_pct) {
                        let back = self.now + self.rng.random_range(1..10);
                        self.scheduled.push((self.now, i, false));
                        self.scheduled.push((back, i, true));
                    }
                }
                e @ (Effect::Forward { .. }
                | Effect::Remote { .. }
                | Effect::RemoteClose { .. }) => {
                    if let Ok((to, frame)) = NodeFrame::from_effect(e) {
                        self.send(id, to, frame);
                    }
                }
                Effect::Replies { session, replies } if self.is_watcher(i, session) => {
                    self.watch_replies(i, replies)
                }
                Effect::Replies { replies, .. } => self.replies(replies)?,
                Effect::CloseSession { session, why } if self.is_watcher(i, session) => {
                    self.watch_closed(i, why)
                }
                // The session's client reconnects and sends its unanswered requests again,
                // with their keys (what the node tells a session whose shard restarted).
                Effect::CloseSession { .. } => self.client_reconnects(i),
                Effect::Forget { .. } => {}
            }
        }
        Ok(())
    }

    fn replies(&mut self, replies: Vec<Reply>) -> Checked {
        for reply in replies {
            match reply {
                Reply::Frame(ServerOp::Ok { r, seq, pos }) => self.ok(r, seq, pos)?,
                Reply::Messages { r, events, head } => self.page(r, &events, head)?,
                Reply::Frame(ServerOp::Error {
                    r: Some(r), code, ..
                }) => {
                    self.reads.remove(&r);
                    if let Some(p) = self.pending.remove(&r) {
                        if code == ErrorCode::Unavailable {
                            self.retry.push((p.key, p.body));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn ok(&mut self, r: u64, seq: Option<u64>, pos: Option<u64>) -> Checked {
        self.summary.acked += 1;
        if let (Some(pos), true) = (pos, self.pending.contains_key(&r)) {
            let p = self.pending.remove(&r).expect("pending");
            return self.sent(p, pos);
        }
        let (Some(p), Some(seq)) = (self.pending.remove(&r), seq) else {
            return Ok(());
        };
        match self.acked.get(&p.key) {
            Some((s, _)) if *s != seq => Err((
                ClusterViolationKind::KeyTwoSeqs,
                format!("key {} acknowledged at seq {s} and at seq {seq}", p.key),
            )),
            _ => {
                self.acked_by_seq.insert(seq, p.body.clone());
                self.acked.insert(p.key, (seq, p.body));
                Ok(())
            }
        }
    }

    /// A send's `ok`: one pos per key.
    fn sent(&mut self, p: Pending, pos: u64) -> Checked {
        match self.acked_sends.get(&p.key) {
            Some(at) if *at != pos => Err((
                ClusterViolationKind::KeyTwoSeqs,
                format!(
                    "send key {} acknowledged at pos {at} and at pos {pos}",
                    p.key
                ),
            )),
            _ => {
                self.acked_sends_by_pos.insert(pos, p.body);
                self.acked_sends.insert(p.key, pos);
                Ok(())
            }
        }
    }

    /// A page: a linearizable one reaches every seq acknowledged before it was asked, and
    /// any page shows at an acknowledged seq that append's body (committed data only).
    fn page(&mut self, r: u64, events: &[fabric_proto::DeliveredEvent], head: u64) -> Checked {
        let Some(read) = self.reads.remove(&r) else {
            return Ok(());
        };
        if !read.local && head < read.floor {
            return Err((
                ClusterViolationKind::StaleRead,
                format!(
                    "a linearizable page (ref {r}, asked through node {}) has head {head}, but \
                     seq {} was acknowledged before it was asked",
                    read.node + 1,
                    read.floor
                ),
            ));
        }
        let wrong = events.iter().find_map(|e| {
            let acked = self.acked_by_seq.get(&e.seq)?;
            (acked != e.body.as_str()).then_some((e, acked))
        });
        if let Some((e, acked)) = wrong {
            let local = read.local;
            return Err((
                ClusterViolationKind::PageNotCommitted,
                format!(
                    "a page (ref {r}, local: {local}) shows {} at seq {}, acknowledged as {acked}",
                    e.body.as_str(),
                    e.seq
                ),
            ));
        }
        Ok(())
    }

    /// A page of the conversation from the highest acknowledged seq, through node `i`:
    /// linearizable, or now and then `?consistency=local`.
    fn issue_read(&mut self, i: usize, r: u64) {
        let floor = self.acked_by_seq.keys().next_back().copied().unwrap_or(0);
        let local = self.rng.random_bool(0.3);
        let session = session_id(i as NodeId + 1, self.nodes[i].client_session);
        let op = ShardOp::Read {
            r,
            mesh: MeshId::must("m"),
            conv: ConvId::must("c"),
            from: floor.max(1),
            limit: 8,
            local,
        };
        self.reads.insert(
            r,
            PendingRead {
                floor,
                local,
                node: i,
            },
        );
        let t = self.time(i);
        self.nodes[i]
            .driver
            .handle_batch(t, session, vec![Request { session, op }]);
    }

    /// One append from a client on a random up node (a retry keeps its key and body).
    fn issue(&mut self) {
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].up)
            .collect();
        if up.is_empty() || self.pending.len() > 64 {
            return;
        }
        let i = up[self.rng.random_range(0..up.len())];
        let r = self.next_r;
        self.next_r += 1;
        if self.retry.is_empty() && self.reads.len() < 16 && self.rng.random_bool(0.2) {
            self.issue_read(i, r);
            return;
        }
        let (key, body) = match self.retry.pop() {
            Some(kb) => kb,
            // With watchers, a third of the writes are sends to the watched peer.
            None if self.opts.watch && self.rng.random_bool(0.3) => {
                (format!("{SEND_KEY_PREFIX}{r}"), format!("\"v{r}\""))
            }
            None => (format!("k{r}"), format!("\"v{r}\"")),
        };
        let session = session_id(i as NodeId + 1, self.nodes[i].client_session);
        let body_op = Body::from_json_text(body.clone()).expect("json");
        let op = if key.starts_with(SEND_KEY_PREFIX) {
            ShardOp::Send {
                r,
                mesh: MeshId::must("m"),
                from: PeerId::must("a"),
                to: fabric_proto::Target::Peer(PeerId::must("a")),
                body: body_op,
                key: Some(key.as_str().into()),
            }
        } else {
            ShardOp::Append {
                r,
                mesh: MeshId::must("m"),
                conv: ConvId::must("c"),
                from: PeerId::must("a"),
                body: body_op,
                key: Some(key.as_str().into()),
            }
        };
        self.pending.insert(
            r,
            Pending {
                key,
                body,
                issued_ms: self.now,
                node: i,
            },
        );
        let t = self.time(i);
        self.nodes[i]
            .driver
            .handle_batch(t, session, vec![Request { session, op }]);
    }
}

impl World {
    /// Power losses (one node, sometimes two or three at once), partitions (a node cut off, a
    /// one-way cut, a partial cut between two nodes), and reboots.
    fn faults(&mut self) {
        self.faulting = true;
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.scheduled)
            .into_iter()
            .partition(|f| f.0 <= now);
        self.scheduled = later;
        for (_, i, reboot) in due {
            if reboot {
                if !self.nodes[i].up {
                    self.reboot(i);
                }
            } else {
                self.crash(i);
            }
        }
        let n = self.nodes.len();
        if self.rng.random_range(0..10_000) < self.opts.crash_per_10k {
            let count = match self.rng.random_range(0..10) {
                0 => 3.min(n - 1),
                1 | 2 => 2,
                _ => 1,
            };
            for _ in 0..count {
                let i = self.rng.random_range(0..n);
                self.crash(i);
            }
        }
        if self.rng.random_range(0..10_000) < self.opts.leader_kill_per_10k {
            if let Some(l) = self.leader() {
                self.crash(l);
            }
        }
        for i in 0..n {
            if !self.nodes[i].up && self.rng.random_range(0..1_000) < self.opts.reboot_per_1000 {
                self.reboot(i);
            }
        }
        if self.rng.random_range(0..10_000) < self.opts.partition_per_10k {
            self.partition();
        }
        if self.rng.random_range(0..10_000) < self.opts.membership_per_10k {
            self.move_target();
        }
    }

    /// The group's target moves: one member out, one node that is not a member in (what
    /// placement does when an operator replaces a node). Every driver hears it, as every
    /// node applies the placement it reads.
    fn move_target(&mut self) {
        let outside: Vec<NodeId> = self
            .nodes
            .iter()
            .map(|n| n.id)
            .filter(|id| !self.target.contains(id))
            .collect();
        let Some(&joining) = outside.get(self.rng.random_range(0..outside.len().max(1))) else {
            return;
        };
        let members: Vec<NodeId> = self.target.iter().copied().collect();
        let leaving = members[self.rng.random_range(0..members.len())];
        self.target.remove(&leaving);
        self.target.insert(joining);
        self.summary.membership_changes += 1;
        for n in self.nodes.iter_mut() {
            n.driver.set_members_target(self.target.clone());
        }
    }

    fn partition(&mut self) {
        self.summary.partitions += 1;
        self.cut.clear();
        let n = self.nodes.len() as NodeId;
        let a = self.rng.random_range(1..=n);
        let b = 1 + (a + self.rng.random_range(0..n - 1)) % n;
        match self.rng.random_range(0..4) {
            0 => {} // healed
            1 => {
                // One node cut off, both ways.
                for o in (1..=n).filter(|o| *o != a) {
                    self.cut.insert((a, o));
                    self.cut.insert((o, a));
                }
                let node = &self.nodes[a as usize - 1];
                let term = node
                    .driver
                    .replica()
                    .filter(|_| node.up)
                    .map(|r| r.raft().term());
                self.lone_term_at_cut = term.map(|t| (a, t));
            }
            2 => {
                self.cut.insert((a, b)); // one way
            }
            _ => {
                // Partial: a and b cannot talk, both reach the rest.
                self.cut.insert((a, b));
                self.cut.insert((b, a));
            }
        }
    }

    fn crash(&mut self, i: usize) {
        if !self.nodes[i].up {
            return;
        }
        self.summary.crashes += 1;
        let faults = CrashFaults {
            torn_write_probability: 0.5,
            tail_corruption_probability: 0.1,
        };
        let n = &mut self.nodes[i];
        n.up = false;
        n.write = None;
        n.disk.crash(&mut self.rng, faults);
        if self.opts.bitrot_pct > 0 && self.chance(self.opts.bitrot_pct) {
            self.rot(i);
        }
        self.watch_crashed(i);
        // Its clients' requests are retried elsewhere, with their keys.
        self.client_reconnects(i);
    }

    /// Flips one bit in node `i`'s synced log (past the segment headers: a damaged oldest
    /// header refuses to start, by design), unless another node's damage is not repaired yet.
    fn rot(&mut self, i: usize) {
        if self
            .nodes
            .iter()
            .enumerate()
            .any(|(j, n)| j != i && n.repairing())
        {
            return;
        }
        let min = Some(wal::SEGMENT_HEADER_BYTES);
        let flip = self.nodes[i]
            .disk
            .pick_read_flip_in(&mut self.rng, None, min, None);
        // A segment of a header only has no byte past it: the pick falls back into it.
        if let Some(flip) = flip.filter(|f| f.offset >= wal::SEGMENT_HEADER_BYTES) {
            self.nodes[i].disk.rot(flip);
            self.nodes[i].rotted = true;
            self.summary.bitrots += 1;
        }
    }

    /// The client on node `i` lost its session: its unanswered requests are sent again.
    fn client_reconnects(&mut self, i: usize) {
        // A new connection is a new session, as on a real node.
        self.nodes[i].client_session += 1;
        let lost: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.node == i)
            .map(|(r, _)| *r)
            .collect();
        for r in lost {
            let p = self.pending.remove(&r).expect("pending");
            self.retry.push((p.key, p.body));
        }
        // Its pages are not asked again: nothing depends on them.
        self.reads.retain(|_, p| p.node != i);
    }

    fn reboot(&mut self, i: usize) {
        let seed = self.rng.random();
        let n = &mut self.nodes[i];
        n.driver = new_driver(n.id, &self.voters0, &self.opts, seed);
        n.driver.set_members_target(self.target.clone());
        n.up = true;
        n.incarnation_commit = 0;
    }

    /// Everything heals: links whole, every node up, no more faults.
    fn heal(&mut self) {
        // A lone node cut off while every other node stayed up: its group kept a quorum.
        let all_up = self.nodes.iter().all(|n| n.up);
        let lone = self.lone_cut_node().filter(|_| all_up);
        self.cut.clear();
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up {
                self.reboot(i);
            }
        }
        self.opts.drop_pct = 0;
        self.opts.dup_pct = 0;
        self.faulting = false;
        self.scheduled.clear();
        self.healed_at = Some(self.now);
        if let (Some(node), Some(l)) = (lone, self.leader()) {
            let leader = l as NodeId + 1;
            let term = self.nodes[l]
                .driver
                .replica()
                .map_or(0, |r| r.raft().term());
            // Healthy: every node but the lone one follows this leader (a node that rebooted
            // and has not heard from it yet may grant a pre-vote, as Raft allows).
            let members = &self.target;
            let healthy = self
                .nodes
                .iter()
                .filter(|n| n.id != node && members.contains(&n.id))
                .all(|n| {
                    n.driver.replica().is_some_and(|r| {
                        r.raft().leader() == Some(leader) && r.raft().term() == term
                    })
                });
            // A lone node whose term was already past the leader's when it was cut off (it
            // won a pre-vote and campaigned just before) deposes the leader on rejoining, as
            // Raft must: pre-vote only keeps a node from raising its term while cut off.
            let term_at_cut = self
                .lone_term_at_cut
                .filter(|(n, _)| *n == node)
                .map_or(u64::MAX, |(_, t)| t);
            // A leader outside the target hands its leadership on (a new term, by design).
            let staying = self.target.contains(&leader);
            if healthy && staying && leader != node && term_at_cut <= term {
                self.watch_disruption = Some((node, leader, term));
            }
        }
    }

    /// The node cut off alone, both ways, if that is the partition.
    fn lone_cut_node(&self) -> Option<NodeId> {
        let n = self.nodes.len() as NodeId;
        (1..=n).find(|a| {
            self.cut.len() == 2 * (n as usize - 1)
                && (1..=n)
                    .filter(|o| o != a)
                    .all(|o| self.cut.contains(&(*a, o)) && self.cut.contains(&(o, *a)))
        })
    }

    /// After the heal: a leader within 2 s; every request answered within 10 s (retries of
    /// `unavailable` included).
    fn liveness(&mut self) -> Checked {
        let mut bound = 2 * self.opts.raft_election_timeout_ms + LEADER_AFTER_HEAL_SLACK_MS;
        // A node in repair cannot vote: the others must agree, and a round one of them loses
        // (a term behind, a lost message) is no longer saved by its vote. One more round.
        if self.nodes.iter().any(Node::repairing) {
            bound += 2 * self.opts.raft_election_timeout_ms;
        }
        let mut elected = self.run_until(bound, |w| w.raft_leader())?;
        // Two candidates in one term split its vote (both timed out together): that round is
        // lost by design, and one more is allowed.
        let split = self.candidates_after_heal.values().any(|c| c.len() > 1);
        if !elected && split {
            let more = 2 * self.opts.raft_election_timeout_ms;
            bound += more;
            elected = self.run_until(more, |w| w.raft_leader())?;
        }
        if !elected {
            let state = self.describe();
            let later = self.run_until(10_000, |w| w.raft_leader())?;
            return Err((
                ClusterViolationKind::NoLeaderAfterHeal,
                format!(
                    "no leader {bound} ms after the heal (one {} within 10 s more): {state}",
                    if later { "came" } else { "did not come" }
                ),
            ));
        }
        let end = self.now + ANSWERED_AFTER_HEAL_MS;
        while self.now < end {
            if self.pending.is_empty() && self.retry.is_empty() {
                return Ok(());
            }
            if !self.retry.is_empty() {
                self.issue();
            }
            self.step()?;
        }
        let oldest = self.pending.values().map(|p| p.issued_ms).min();
        Err((
            ClusterViolationKind::Unanswered,
            format!(
                "{} requests unanswered and {} retries left {ANSWERED_AFTER_HEAL_MS} ms after \
                 the heal (oldest issued at {oldest:?} ms)",
                self.pending.len(),
                self.retry.len()
            ),
        ))
    }

    /// Runs until the group's membership is its target and every member applied what the
    /// leader committed.
    fn settle(&mut self) -> Checked {
        let settled = self.run_until(20_000, |w| {
            let Some(r) = w.leader().and_then(|l| w.nodes[l].driver.replica()) else {
                return false;
            };
            let conf = r.raft().committed_membership();
            let placed = conf.voters == w.target
                && conf.learners.is_empty()
                && r.raft().membership() == conf;
            let commit = Some(r.raft().commit());
            placed
                && w.nodes
                    .iter()
                    .filter(|n| w.target.contains(&n.id))
                    .all(|n| n.driver.replica().map(|r| r.applied()) == commit && n.write.is_none())
        })?;
        if settled {
            return Ok(());
        }
        Err((
            ClusterViolationKind::Unanswered,
            format!(
                "the replicas did not reach the target {:?} and catch up with the leader \
                 within 20 s of quiet: {}",
                self.target,
                self.describe()
            ),
        ))
    }

    /// Each node's replica, for a violation's message.
    fn describe(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| match n.driver.replica() {
                Some(r) => format!(
                    "node {} {:?} {:?} {:?} term {} commit {} applied {} last {} (last term {}) \
                     repair {:?} start {} {:?} {}",
                    n.id,
                    r.raft().membership(),
                    r.mode(),
                    r.raft().role(),
                    r.raft().term(),
                    r.raft().commit(),
                    r.applied(),
                    r.raft().last_index(),
                    r.raft().last_term(),
                    r.raft().repair_through(),
                    r.shard().log_start(),
                    r.stats(),
                    r.describe_waits()
                ),
                None => format!("node {} down ({:?})", n.id, n.driver.status()),
            })
            .collect();
        format!("target {:?}: {}", self.target, nodes.join("; "))
    }

    /// The checks of every step.
    fn check_step(&mut self) -> Checked {
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            let Some(r) = n.driver.replica().filter(|_| n.up) else {
                continue;
            };
            let (term, role, commit) = (r.raft().term(), r.raft().role(), r.raft().commit());
            if role == fabric_shard::raft::Role::Candidate && self.healed_at.is_some() {
                let id = n.id;
                self.candidates_after_heal
                    .entry(term)
                    .or_default()
                    .insert(id);
            }
            if role == fabric_shard::raft::Role::Leader {
                if !self.leaders.contains_key(&term)
                    && self.faulting
                    && self.rng.random_range(0..100) < self.opts.kill_new_leader_pct
                {
                    let at = self.now + self.rng.random_range(0..50);
                    self.scheduled.push((at, i, false));
                }
                let prev = *self.leaders.entry(term).or_insert(n.id);
                if prev != n.id {
                    return Err((
                        ClusterViolationKind::TwoLeaders,
                        format!("nodes {prev} and {} both lead term {term}", n.id),
                    ));
                }
            }
            if role == fabric_shard::raft::Role::Leader {
                let seen = self.leader_commits.insert((n.id, term), commit);
                let at = r.raft().term_at(commit);
                if seen.is_some_and(|c| commit > c) && at != Some(term) {
                    return Err((
                        ClusterViolationKind::OldTermCommit,
                        format!(
                            "node {} leading term {term} advanced its commit to {commit}, an \
                             entry of term {at:?}",
                            n.id
                        ),
                    ));
                }
            }
            if commit < n.incarnation_commit {
                return Err((
                    ClusterViolationKind::CommitWentBack,
                    format!(
                        "node {} commit {} after {}",
                        n.id, commit, n.incarnation_commit
                    ),
                ));
            }
            self.nodes[i].incarnation_commit = commit;
        }
        self.check_disruption()
    }

    /// A lone node that rejoins must not raise the term of a group whose leader kept its
    /// quorum (pre-vote and check-quorum), within two election timeouts of the heal.
    fn check_disruption(&mut self) -> Checked {
        let (Some((node, leader, term)), Some(healed)) = (self.watch_disruption, self.healed_at)
        else {
            return Ok(());
        };
        if self.now > healed + 2 * raft_config(&self.opts).raft_election_timeout_ms {
            self.watch_disruption = None;
            return Ok(());
        }
        let l = &self.nodes[leader as usize - 1];
        let now_term = l.driver.replica().map_or(term, |r| r.raft().term());
        if l.up && now_term > term {
            return Err((
                ClusterViolationKind::Disruption,
                format!(
                    "node {node} rejoined and the term went from {term} to {now_term} though \
                     node {leader} led with a quorum"
                ),
            ));
        }
        Ok(())
    }

    /// The final checks on every replica's disk.
    fn check_logs(&mut self) -> Checked {
        let l = self.leader().expect("settled with a leader");
        let commit = self.nodes[l].driver.replica().map_or(0, |r| r.applied());
        // A node outside the group is checked up to what it knew was committed (it may hold
        // an uncommitted suffix that the group replaced after it left).
        let target = self.target.clone();
        let logs: Vec<Vec<(u64, u64, Record)>> = self
            .nodes
            .iter_mut()
            .map(|n| {
                let own = n.driver.replica().map_or(0, |r| r.applied());
                let upto = if target.contains(&n.id) {
                    commit
                } else {
                    own.min(commit)
                };
                let log = live_log(&mut n.disk);
                log.into_iter().filter(|e| e.0 <= upto).collect()
            })
            .collect();
        let by_lsn: BTreeMap<u64, &(u64, u64, Record)> = logs[l].iter().map(|e| (e.0, e)).collect();
        for (i, log) in logs.iter().enumerate() {
            if let Some(e) = log
                .iter()
                .find(|e| by_lsn.get(&e.0).is_some_and(|o| *o != *e))
            {
                return Err((
                    ClusterViolationKind::PrefixDiverged,
                    format!(
                        "node {} holds {:?} at lsn {}; the leader another",
                        i + 1,
                        e.2,
                        e.0
                    ),
                ));
            }
            if target.contains(&(i as NodeId + 1)) && log.last().map(|e| e.0) != Some(commit) {
                return Err((
                    ClusterViolationKind::AckedLost,
                    format!(
                        "node {} does not hold the committed log up to {commit}",
                        i + 1
                    ),
                ));
            }
        }
        self.check_members(l)?;
        self.check_acked(&logs[l])
    }

    /// Every member of the settled group holds its leader's configuration (one restarted
    /// after the segments holding the changes were retired has it from `MEMBERS`).
    fn check_members(&self, l: usize) -> Checked {
        let conf = self.nodes[l]
            .driver
            .replica()
            .map(|r| r.raft().membership().clone());
        for n in self.nodes.iter().filter(|n| self.target.contains(&n.id)) {
            let own = n.driver.replica().map(|r| r.raft().membership().clone());
            if own != conf {
                return Err((
                    ClusterViolationKind::MembershipDiverged,
                    format!(
                        "node {} holds configuration {own:?}; its leader {conf:?}",
                        n.id
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The leader's committed log against the acknowledgements: each seq appended once, every
    /// member's head past the highest acknowledged seq, every retained acknowledged append at
    /// its seq with its body.
    fn check_acked(&self, committed: &[(u64, u64, Record)]) -> Checked {
        let target = &self.target;
        let appended: BTreeMap<u64, String> = committed
            .iter()
            .filter_map(|(_, _, rec)| match rec {
                Record::Appended(a) => Some((a.seq, a.body.as_str().to_string())),
                _ => None,
            })
            .collect();
        let mut seen: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for (lsn, term, rec) in committed {
            if let Record::Appended(a) = rec {
                if let Some((l0, t0)) = seen.insert(a.seq, (*lsn, *term)) {
                    return Err((
                        ClusterViolationKind::PrefixDiverged,
                        format!(
                            "seq {} is appended twice in the committed log: at lsn {l0} (term \
                             {t0}) and at lsn {lsn} (term {term})",
                            a.seq
                        ),
                    ));
                }
            }
        }
        // Retention drops a conversation's oldest entries: what is retained is checked whole,
        // and every replica's head covers every acknowledged seq.
        let retained_from = appended.keys().next().copied().unwrap_or(u64::MAX);
        let max_acked = self.acked.values().map(|(seq, _)| *seq).max().unwrap_or(0);
        for n in self.nodes.iter().filter(|n| target.contains(&n.id)) {
            let head = n.driver.shard().and_then(|s| s.conversation_head("m", "c"));
            if head.unwrap_or(0) < max_acked {
                return Err((
                    ClusterViolationKind::AckedLost,
                    format!(
                        "node {} has head {head:?} below acknowledged seq {max_acked}",
                        n.id
                    ),
                ));
            }
        }
        for (key, (seq, body)) in self
            .acked
            .iter()
            .filter(|(_, (seq, _))| *seq >= retained_from)
        {
            if appended.get(seq) != Some(body) {
                let with_key: Vec<(u64, u64, u64)> = committed
                    .iter()
                    .filter_map(|(lsn, term, rec)| match rec {
                        Record::Appended(a) if a.key.as_deref() == Some(key.as_str()) => {
                            Some((*lsn, *term, a.seq))
                        }
                        _ => None,
                    })
                    .collect();
                return Err((
                    ClusterViolationKind::AckedLost,
                    format!(
                        "key {key} was acknowledged at seq {seq} with {body}; the committed log \
                         holds {:?} there, and the key at (lsn, term, seq) {with_key:?}",
                        appended.get(seq)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The live log on a disk: the listed segments' records, minus what rewinds replaced.
fn live_log(disk: &mut Disk) -> Vec<(u64, u64, Record)> {
    let manifest = disk
        .read_manifest()
        .ok()
        .flatten()
        .and_then(|b| wal::Manifest::decode(&b).ok());
    let Some(manifest) = manifest else {
        return Vec::new();
    };
    let mut out: Vec<(u64, u64, Record)> = Vec::new();
    let segments: Vec<(u64, Vec<u8>)> = disk
        .segments()
        .into_iter()
        .map(|(id, b)| (id, b.to_vec()))
        .collect();
    for (id, bytes) in segments {
        if !manifest.lists(id) {
            continue;
        }
        let Ok(header) = wal::SegmentHeader::decode(&bytes) else {
            continue;
        };
        let scan = wal::scan_frames(&bytes, header.first_lsn, false);
        if let Some(to) = scan.rewound_to {
            out.retain(|e| e.0 < to);
        }
        out.extend(scan.records.into_iter().map(|r| (r.lsn, r.term, r.record)));
    }
    out
}

/// What a range of cluster seeds did.
#[derive(Debug, Default)]
pub struct ClusterReport {
    pub seeds: u64,
    pub passed: u64,
    pub sim_ms: u64,
    pub acked: u64,
    pub crashes: u64,
    pub restarts: u64,
    pub partitions: u64,
    pub messages: u64,
    pub leaders: u64,
    pub bitrots: u64,
    /// Failing seeds with their violations, lowest seed first (at most
    /// [`CLUSTER_FAILURES_KEPT_MAX`]).
    pub failures: Vec<ClusterViolation>,
    pub wall: std::time::Duration,
}

/// Failures a report keeps.
pub const CLUSTER_FAILURES_KEPT_MAX: usize = 1_000;

impl ClusterReport {
    fn add(&mut self, r: Result<ClusterSummary, Box<ClusterViolation>>) {
        self.seeds += 1;
        match r {
            Ok(s) => {
                self.passed += 1;
                self.sim_ms += s.sim_ms;
                self.acked += s.acked;
                self.crashes += s.crashes;
                self.restarts += s.restarts;
                self.partitions += s.partitions;
                self.messages += s.messages;
                self.leaders += s.leader_changes;
                self.bitrots += s.bitrots;
            }
            Err(v) if self.failures.len() < CLUSTER_FAILURES_KEPT_MAX => self.failures.push(*v),
            Err(_) => {}
        }
    }
}

/// Runs cluster seeds `first..first + count` on `threads` threads, each with
/// [`cluster_swarm`]'s options and `planted`.
pub fn run_cluster_seeds(
    first: u64,
    count: u64,
    threads: usize,
    planted: ClusterPlanted,
    progress: &(dyn Fn(u64) + Sync),
) -> ClusterReport {
    use std::sync::atomic::{AtomicU64, Ordering};
    let started = std::time::Instant::now();
    let next = AtomicU64::new(first);
    let done = AtomicU64::new(0);
    let end = first.saturating_add(count);
    let report = std::sync::Mutex::new(ClusterReport::default());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    break;
                }
                let mut opts = cluster_swarm(seed);
                opts.planted = planted;
                let r = run_cluster(seed, &opts);
                report.lock().expect("no thread panics holding it").add(r);
                progress(done.fetch_add(1, Ordering::Relaxed) + 1);
            });
        }
    });
    let mut report = report.into_inner().expect("threads joined");
    report.failures.sort_by_key(|v| v.seed);
    report.wall = started.elapsed();
    report
}
