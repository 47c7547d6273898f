//! Fabric's deterministic simulator: the real shard core (`fabric_shard::Shard`, never a copy)
//! driven by simulated clients against a simulated disk that crashes, tears writes, corrupts
//! reads and runs out of space, with checkers that fail the run when a promise breaks.
//!
//! # Why it is deterministic
//!
//! One seeded `ChaCha8Rng` is the only source of randomness; time is a simulated clock in ms
//! that jumps to the next event; everything runs on one thread; every collection whose order
//! reaches an output is ordered (`BTreeMap`, `Vec`, `VecDeque`). So a seed replays the same run
//! exactly, and a failure is reproduced by its `SEED=` line alone. Every step writes a trace
//! line; their hash ([`RunSummary::trace_hash`]) proves two runs were the same.
//!
//! # A run
//!
//! 1. Setup, without faults: one mesh, one peer per client (in groups `g0`/`g1`).
//! 2. The fault phase: each client connects (`Hello`), then issues its budget of `Send`s and
//!    `Append`s (keyed appends are retried with the same key after a disconnect), acks what
//!    it received and returns push credit. WAL writes complete after an fsync latency drawn
//!    from the RNG. After any event the node may lose power; a write may fail (ENOSPC, EIO).
//!    Each restart recovers with `Recoverer` from the disk's segments exactly as the glue
//!    does (segments in id order, `is_last` for the newest, then the report's truncation),
//!    and an audit then reads every conversation and replays every inbox (checkers 1, 2, 6).
//! 3. The liveness phase, without faults: every client reconnects and drains; all requests
//!    must complete within [`LIVENESS_BOUND_MS`], and every acknowledged message must have
//!    reached every recipient (checkers 3, 4).
//!
//! The simulated glue differs from `fabric/src/storage.rs` in one respect, on purpose: after
//! recovery it fsyncs what it read, not only when it truncates. A restart after a failed write
//! reads records that exist only in the page cache and serves them as durable; without the
//! fsync a later power loss takes them ([`SimOptions::sync_after_recovery`] turns it off, and
//! `tests/planted.rs` shows what breaks).
//!
//! One node for now, with 1-3 shards: `fabric_router::Router` places the mesh (its peers,
//! cursors and inbox) on one shard and each conversation on its own, every client batches
//! through a router of its own as a session does, and a power loss takes every shard at once
//! while a failed write restarts only its shard. Networks and replication come later.
//!
//! # Example
//!
//! ```
//! let options = fabric_sim::swarm(7);
//! let summary = fabric_sim::run(7, &options).expect("the shard keeps its promises");
//! assert_eq!(summary.trace_hash, fabric_sim::run(7, &options).unwrap().trace_hash);
//! ```

pub mod check;
pub mod disk;

use check::{fail, Checked, Failure, Model, OpKind, ViolationKind};
use disk::{CrashFaults, Disk};
use fabric_proto::internal::{
    Output, Placement, Reply, Request, Route, SessionId, ShardIdx, ShardOp,
};
use fabric_proto::{Body, ErrorCode, ServerOp, Target};
use fabric_router::Router;
use fabric_shard::{
    wal, PlantedBugs, RecoverError, Recoverer, RecoveryReport, Shard, ShardConfig, WalWrite,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;

/// The mesh every simulated client belongs to.
pub const MESH: &str = "m";
/// Simulated time the liveness phase may take once faults stop, in ms.
pub const LIVENESS_BOUND_MS: u64 = 60_000;
/// Events one run may process; more means a loop that does not advance simulated time (a WAL
/// that rewrites itself on every commit with zero fsync latency, say): a liveness failure.
pub const RUN_EVENTS_MAX: u64 = 2_000_000;
/// Trace lines a violation carries.
pub const TRACE_RING_LINES: usize = 50;
/// Longest wait before the glue restarts a shard whose storage failed, in ms.
const RESTART_DELAY_MAX_MS: u64 = 20;
/// Longest wait before a disconnected client reconnects, in ms.
const RECONNECT_DELAY_MAX_MS: u64 = 20;
/// Longest padding in a message body, in bytes (varies record sizes, so tears land anywhere).
const BODY_PAD_BYTES_MAX: usize = 160;
/// A retention limit this large never triggers in a run.
pub const RETENTION_OFF_BYTES: u64 = 1 << 40;
/// Whether [`swarm`] turns retention on for some seeds. A switch, so that a retention bug in
/// the core can be set aside while the rest of the swarm keeps running: before commit 9630917
/// the copy-forward scan stopped at the first message an earlier round had copied (a
/// `take_while` in position order), losing acknowledged messages (seeds 16, 35, 63, 105, 113
/// and 242 of 0..300 found it), and could rewrite its backlog on every commit forever.
pub const SWARM_RETENTION: bool = true;

/// Everything a run varies, chosen from the seed by [`swarm`] (swarm testing: each seed also
/// picks which features and faults are on, so rare combinations get runs of their own).
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    /// Shards of the node; keys are placed by `fabric_router::Router`.
    pub shards: u32,
    /// Placement partitions (at least `shards`).
    pub partitions: u32,
    pub clients: usize,
    /// New operations each client issues during the fault phase.
    pub requests_per_client: u32,
    /// Requests one client keeps in flight.
    pub inflight_requests_max: usize,
    pub convs: usize,
    pub fsync_latency_min_ms: u64,
    pub fsync_latency_max_ms: u64,
    pub network_delay_max_ms: u64,
    pub think_time_max_ms: u64,
    /// Chance of a power loss after each event of the fault phase.
    pub crash_probability: f64,
    /// Chance a crash tears the unsynced write at a sector boundary (rather than losing or
    /// keeping all of it).
    pub torn_write_probability: f64,
    /// Chance a crash flips a bit in the unsynced bytes that survived.
    pub tail_corruption_probability: f64,
    /// Chance a recovery first reads a flipped bit in a segment that is not the last.
    pub read_corruption_probability: f64,
    /// Chance a WAL write fails: ENOSPC part-way, or EIO from its fdatasync after the bytes
    /// reached the page cache. The shard is then restarted.
    pub enospc_probability: f64,
    /// Chance a client acks after a batch of deliveries (always in the liveness phase).
    pub ack_probability: f64,
    /// Chance a client drops its session and reconnects when it wakes.
    pub reconnect_probability: f64,
    pub wal_segment_bytes_max: u64,
    pub retention_bytes_max: u64,
    pub wal_batch_bytes_max: usize,
    pub push_credit_frames_max: u32,
    pub drain_scan_entries_max: usize,
    pub pending_acks_max: usize,
    /// The glue fsyncs the segments after recovery, not only when it truncates. Without it,
    /// records a restart read from the page cache (after a failed write) are served as durable
    /// but die with the next power loss.
    pub sync_after_recovery: bool,
    pub planted: PlantedBugs,
}

impl SimOptions {
    fn shard_config(&self, shard: ShardIdx) -> ShardConfig {
        ShardConfig {
            shard,
            wal_segment_bytes_max: self.wal_segment_bytes_max,
            wal_batch_bytes_max: self.wal_batch_bytes_max,
            retention_bytes_max: self.retention_bytes_max,
            push_credit_frames_max: self.push_credit_frames_max,
            drain_scan_entries_max: self.drain_scan_entries_max,
            pending_acks_max: self.pending_acks_max,
            planted: self.planted,
        }
    }
}

impl fmt::Display for SimOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.planted;
        let planted: Vec<&str> = [
            (p.ack_before_fsync, "ack_before_fsync"),
            (p.skip_crc_on_recovery, "skip_crc_on_recovery"),
            (p.lose_cursor_update, "lose_cursor_update"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
        write!(
            f,
            "shards={} partitions={} clients={} requests={} inflight_requests_max={} convs={} fsync_ms={}..={} net_ms=0..={} \
             think_ms=0..={} crash_p={} torn_p={} tail_flip_p={} read_flip_p={} enospc_p={} \
             ack_p={} reconnect_p={} segment_bytes={} retention_bytes={} batch_bytes={} \
             credit={} scan={} pending={} sync_after_recovery={} planted={}",
            self.shards,
            self.partitions,
            self.clients,
            self.requests_per_client,
            self.inflight_requests_max,
            self.convs,
            self.fsync_latency_min_ms,
            self.fsync_latency_max_ms,
            self.network_delay_max_ms,
            self.think_time_max_ms,
            self.crash_probability,
            self.torn_write_probability,
            self.tail_corruption_probability,
            self.read_corruption_probability,
            self.enospc_probability,
            self.ack_probability,
            self.reconnect_probability,
            self.wal_segment_bytes_max,
            self.retention_bytes_max,
            self.wal_batch_bytes_max,
            self.push_credit_frames_max,
            self.drain_scan_entries_max,
            self.pending_acks_max,
            self.sync_after_recovery,
            if planted.is_empty() { "none".to_string() } else { planted.join(",") },
        )
    }
}

/// The options for `seed`: drawn from their own RNG stream, so they are independent of the
/// run's draws and a planted bug can be added to them without changing them. Retention is on
/// for some seeds only if [`SWARM_RETENTION`].
pub fn swarm(seed: u64) -> SimOptions {
    let mut options = swarm_with_retention(seed);
    if !SWARM_RETENTION {
        options.retention_bytes_max = RETENTION_OFF_BYTES;
    }
    options
}

/// [`swarm`] with retention (a WAL limit of 3 or 8 segments) on for two thirds of the seeds.
pub fn swarm_with_retention(seed: u64) -> SimOptions {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5357_4152_4d00_0000);
    let pick = |rng: &mut ChaCha8Rng, xs: &[f64]| xs[rng.random_range(0..xs.len())];
    let fsync_min = rng.random_range(0..=2);
    let segment = [1_024, 4_096, 16_384, 64 << 20][rng.random_range(0..4)];
    let retention = match rng.random_range(0..3) {
        0 => segment * 3,
        1 => segment * 8,
        _ => RETENTION_OFF_BYTES,
    };
    let shards = rng.random_range(1..=3);
    SimOptions {
        shards,
        partitions: [shards, 4, 8][rng.random_range(0..3)],
        clients: rng.random_range(1..=5),
        requests_per_client: rng.random_range(8..=30),
        inflight_requests_max: rng.random_range(1..=4),
        convs: rng.random_range(1..=3),
        fsync_latency_min_ms: fsync_min,
        fsync_latency_max_ms: fsync_min + rng.random_range(1..=12),
        network_delay_max_ms: rng.random_range(0..=4),
        think_time_max_ms: rng.random_range(0..=8),
        crash_probability: pick(&mut rng, &[0.0, 0.003, 0.01, 0.02, 0.04]),
        torn_write_probability: pick(&mut rng, &[0.0, 0.3, 0.7, 1.0]),
        tail_corruption_probability: pick(&mut rng, &[0.0, 0.3, 0.7]),
        read_corruption_probability: pick(&mut rng, &[0.0, 0.3, 0.7]),
        enospc_probability: pick(&mut rng, &[0.0, 0.0, 0.01, 0.04]),
        ack_probability: pick(&mut rng, &[0.2, 0.6, 1.0]),
        reconnect_probability: pick(&mut rng, &[0.0, 0.01, 0.05]),
        wal_segment_bytes_max: segment,
        retention_bytes_max: retention,
        wal_batch_bytes_max: [256, 4_096, 4 << 20][rng.random_range(0..3)],
        push_credit_frames_max: [2, 8, 1_024][rng.random_range(0..3)],
        drain_scan_entries_max: [3, 64, 4_096][rng.random_range(0..3)],
        pending_acks_max: [2, 16, 65_536][rng.random_range(0..3)],
        sync_after_recovery: true,
        planted: PlantedBugs::default(),
    }
}

/// A broken promise, with what is needed to replay and understand it.
#[derive(Debug, Clone)]
pub struct Violation {
    pub seed: u64,
    pub kind: ViolationKind,
    pub message: String,
    /// The options line ([`SimOptions`]' `Display`).
    pub options: String,
    /// The last trace lines before the violation, oldest first.
    pub last_events: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "SEED={} {}", self.seed, self.options)?;
        writeln!(f, "violation {}: {}", self.kind, self.message)?;
        writeln!(f, "last events:")?;
        for l in &self.last_events {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// What a passing run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSummary {
    pub seed: u64,
    /// FNV-1a over every trace line: equal hashes mean equal runs.
    pub trace_hash: u64,
    pub sim_ms: u64,
    pub events: u64,
    pub requests_acked: u64,
    pub crashes: u64,
    /// Restarts after a failed WAL write, crashes not counted.
    pub restarts: u64,
    /// Torn writes, tail bit flips, read corruptions and failed writes.
    pub faults_injected: u64,
    pub wal_writes: u64,
}

/// Runs one seed with `options`.
pub fn run(seed: u64, options: &SimOptions) -> Result<RunSummary, Violation> {
    Simulation::new(seed, options.clone()).run()
}

/// 64-bit FNV-1a, written out so that the trace hash never depends on a library's version.
#[derive(Debug, Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[derive(Debug)]
struct Trace {
    hash: Fnv,
    ring: VecDeque<String>,
}

impl Trace {
    fn line(&mut self, now: u64, text: String) {
        let line = format!("{now:>6}ms {text}");
        self.hash.write(line.as_bytes());
        self.hash.write(b"\n");
        if self.ring.len() == TRACE_RING_LINES {
            self.ring.pop_front();
        }
        self.ring.push_back(line);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Faults,
    Liveness,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    Down,
    /// Hello sent on this session, welcome not yet seen.
    Hello(SessionId),
    Up(SessionId),
}

impl Conn {
    fn session(self) -> Option<SessionId> {
        match self {
            Conn::Down => None,
            Conn::Hello(s) | Conn::Up(s) => Some(s),
        }
    }
}

#[derive(Debug)]
struct Client {
    peer: Arc<str>,
    token: String,
    conn: Conn,
    next_r: u64,
    /// Ref -> operation, on the current session.
    inflight: BTreeMap<u64, usize>,
    retry: VecDeque<usize>,
    budget: u32,
    max_received: u64,
    acked_sent: u64,
    wake_pending: bool,
    /// Requests arrive in order: none before this time.
    link_free_ms: u64,
    /// After an `unavailable`, the client sends nothing before this time (a client that
    /// retried at once would spin without simulated time passing).
    backoff_until_ms: u64,
    /// Places this client's requests on shards; in the node each session owns one.
    router: Router,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Admin,
    Client(usize),
    /// Reads that find the first retained seq of each conversation (see `probe_retention`).
    Probe,
}

#[derive(Debug)]
enum Event {
    Wake(usize),
    /// A request reaches incarnation `epoch` of a shard (lost if it restarted meanwhile).
    Arrive {
        shard: ShardIdx,
        epoch: u64,
        req: Request,
    },
    WalDone {
        shard: ShardIdx,
        write: u64,
    },
    Restart {
        shard: ShardIdx,
        epoch: u64,
    },
    FaultsEnd,
}

#[derive(Debug)]
struct Inflight {
    id: u64,
    write: WalWrite,
    /// The acks taken in before the write was polled (checker 6), for the mesh's shard.
    acks: Vec<u64>,
}

/// One shard of the node, with what the glue keeps for it.
struct Host {
    shard: Shard,
    disk: Disk,
    /// Bumped by every restart; requests in transit to an older incarnation are lost.
    epoch: u64,
    inflight: Option<Inflight>,
    /// The glue's input channel while the shard wants no input (backpressure).
    input: VecDeque<Request>,
}

/// One simulated node: its shards and their disks, its clients, the checkers and the event
/// queue.
pub struct Simulation {
    seed: u64,
    options: SimOptions,
    rng: ChaCha8Rng,
    now: u64,
    queue: BTreeMap<(u64, u64), Event>,
    next_event: u64,
    phase: Phase,
    deadline_ms: u64,
    hosts: Vec<Host>,
    /// Placement only (`shard_of`); clients batch through routers of their own.
    placement: Router,
    /// The shard that owns the mesh: its peers, cursors and inbox.
    mesh_shard: ShardIdx,
    next_write: u64,
    clients: Vec<Client>,
    owners: BTreeMap<SessionId, Owner>,
    refs: BTreeMap<(SessionId, u64), usize>,
    next_session: SessionId,
    probe: Option<SessionId>,
    model: Model,
    trace: Trace,
    events: u64,
    crashes: u64,
    restarts: u64,
    faults: u64,
    wal_writes: u64,
}

impl Simulation {
    /// A simulation of `seed`. Panics if the options' shard and partition counts are invalid
    /// (see `fabric_router::Router::new`).
    pub fn new(seed: u64, options: SimOptions) -> Simulation {
        let placement = Router::new(options.partitions, options.shards).expect("valid placement");
        let clients: Vec<Client> = (0..options.clients)
            .map(|i| Client {
                peer: format!("p{i}").into(),
                token: format!("tok-p{i}"),
                conn: Conn::Down,
                next_r: 1,
                inflight: BTreeMap::new(),
                retry: VecDeque::new(),
                budget: options.requests_per_client,
                max_received: 0,
                acked_sent: 0,
                wake_pending: false,
                link_free_ms: 0,
                backoff_until_ms: 0,
                router: placement.clone(),
            })
            .collect();
        let peers = clients.iter().map(|c| c.peer.clone()).collect();
        let groups = (0..options.clients).map(groups_of).collect();
        let retention = options.retention_bytes_max < RETENTION_OFF_BYTES;
        let hosts = (0..options.shards)
            .map(|s| Host {
                shard: Shard::new(options.shard_config(s)),
                disk: Disk::new(),
                epoch: 0,
                inflight: None,
                input: VecDeque::new(),
            })
            .collect();
        let mesh_shard = placement
            .shard_of(Placement::Mesh(MESH))
            .expect("a mesh has a shard");
        Simulation {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            now: 0,
            queue: BTreeMap::new(),
            next_event: 0,
            phase: Phase::Setup,
            deadline_ms: u64::MAX,
            hosts,
            placement,
            mesh_shard,
            next_write: 0,
            clients,
            owners: BTreeMap::new(),
            refs: BTreeMap::new(),
            next_session: 1,
            probe: None,
            model: Model::new(peers, groups, retention),
            trace: Trace {
                hash: Fnv::new(),
                ring: VecDeque::new(),
            },
            events: 0,
            crashes: 0,
            restarts: 0,
            faults: 0,
            wal_writes: 0,
            options,
        }
    }

    /// Runs to the end; a panic in the shard core is a violation too.
    pub fn run(mut self) -> Result<RunSummary, Violation> {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_inner()));
        let failure = match result {
            Ok(Ok(())) => {
                return Ok(RunSummary {
                    seed: self.seed,
                    trace_hash: self.trace.hash.0,
                    sim_ms: self.now,
                    events: self.events,
                    requests_acked: self.model.acks(),
                    crashes: self.crashes,
                    restarts: self.restarts,
                    faults_injected: self.faults,
                    wal_writes: self.wal_writes,
                })
            }
            Ok(Err(f)) => f,
            Err(panic) => Failure {
                kind: ViolationKind::Panic,
                message: panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a non-string panic".into()),
            },
        };
        Err(Violation {
            seed: self.seed,
            kind: failure.kind,
            message: failure.message,
            options: self.options.to_string(),
            last_events: self.trace.ring.iter().cloned().collect(),
        })
    }

    fn trace(&mut self, text: String) {
        self.trace.line(self.now, text);
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.queue.insert((at, self.next_event), event);
        self.next_event += 1;
    }

    fn conv_shard(&self, conv: &str) -> ShardIdx {
        self.placement
            .shard_of(Placement::Conversation(MESH, conv))
            .expect("a conversation has a shard")
    }

    fn run_inner(&mut self) -> Checked {
        self.trace(format!("start seed={} {}", self.seed, self.options));
        self.setup()?;
        self.phase = Phase::Faults;
        for c in 0..self.clients.len() {
            let delay = self.rng.random_range(0..=self.options.think_time_max_ms);
            self.wake(c, delay);
        }
        if self.budget_left() == 0 {
            self.schedule(self.now, Event::FaultsEnd);
        }
        while let Some(((at, _), event)) = self.queue.pop_first() {
            if self.phase == Phase::Liveness && at > self.deadline_ms {
                return fail(
                    ViolationKind::Liveness,
                    format!(
                        "still busy {LIVENESS_BOUND_MS} ms after faults stopped: {}",
                        self.pending_summary()
                    ),
                );
            }
            self.now = at;
            self.events += 1;
            if self.events > RUN_EVENTS_MAX {
                return fail(
                    ViolationKind::Liveness,
                    format!(
                        "{RUN_EVENTS_MAX} events without finishing: {}",
                        self.pending_summary()
                    ),
                );
            }
            self.handle(event)?;
            self.pump()?;
            if self.phase == Phase::Faults && self.rng.random_bool(self.options.crash_probability) {
                self.crash()?;
            }
        }
        self.finish()
    }

    fn budget_left(&self) -> u64 {
        self.clients.iter().map(|c| u64::from(c.budget)).sum()
    }

    fn pending_summary(&self) -> String {
        let shards: Vec<String> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(s, h)| {
                format!(
                    "s{s} idle={} failed={} input={}",
                    h.shard.is_idle(),
                    h.shard.is_failed(),
                    h.input.len()
                )
            })
            .collect();
        let clients: Vec<String> = self
            .clients
            .iter()
            .filter(|c| !c.inflight.is_empty() || !c.retry.is_empty() || c.conn != Conn::Down)
            .map(|c| {
                format!(
                    "{} {:?} inflight={:?} retry={:?}",
                    c.peer, c.conn, c.inflight, c.retry
                )
            })
            .collect();
        format!("{}; clients: {}", shards.join(", "), clients.join("; "))
    }

    /// Checkers 3 and 4 once the queue ran dry.
    fn finish(&mut self) -> Checked {
        if self.phase != Phase::Liveness {
            return fail(
                ViolationKind::Liveness,
                format!(
                    "the run stalled during the fault phase: {}",
                    self.pending_summary()
                ),
            );
        }
        let stuck = self.clients.iter().any(|c| {
            !c.inflight.is_empty() || !c.retry.is_empty() || !matches!(c.conn, Conn::Up(_))
        });
        let busy = self
            .hosts
            .iter()
            .any(|h| !h.shard.is_idle() || !h.input.is_empty());
        if stuck || busy {
            return fail(
                ViolationKind::Liveness,
                format!(
                    "nothing left to do but requests pending: {}",
                    self.pending_summary()
                ),
            );
        }
        self.model.final_delivery()?;
        self.trace(format!(
            "end acked={} crashes={} restarts={} faults={}",
            self.model.acks(),
            self.crashes,
            self.restarts,
            self.faults
        ));
        Ok(())
    }

    /// Creates the mesh and its peers on the mesh's shard, without faults.
    fn setup(&mut self) -> Checked {
        let admin = self.new_session(Owner::Admin);
        let mut ops = vec![ShardOp::CreateMesh {
            r: 0,
            mesh: MESH.into(),
        }];
        for (i, c) in self.clients.iter().enumerate() {
            ops.push(ShardOp::AddPeer {
                r: i as u64 + 1,
                mesh: MESH.into(),
                peer: c.peer.clone(),
                groups: groups_of(i),
                token_hash: fabric_shard::token_hash(&c.token),
            });
        }
        let want = ops.len();
        let now = self.now;
        let host = &mut self.hosts[self.mesh_shard as usize];
        for op in ops {
            host.shard
                .handle_request(now, Request { session: admin, op });
        }
        let mut oks = 0;
        loop {
            while let Some(o) = host.shard.poll_output() {
                match o.reply {
                    Reply::Frame(ServerOp::Ok { .. }) => oks += 1,
                    r => return fail(ViolationKind::UnexpectedReply, format!("setup got {r:?}")),
                }
            }
            let Some(w) = host.shard.poll_wal() else {
                break;
            };
            host.disk.begin_write(&w);
            host.disk.complete_write(&w);
            self.now += self.options.fsync_latency_max_ms;
            self.wal_writes += 1;
            host.shard.handle_wal_done(self.now, w.last_lsn);
        }
        if oks != want {
            return fail(
                ViolationKind::Liveness,
                format!("setup got {oks} of {want} oks"),
            );
        }
        self.trace(format!(
            "setup done: mesh {MESH} on shard {} with {} peers",
            self.mesh_shard,
            self.clients.len()
        ));
        Ok(())
    }

    fn new_session(&mut self, owner: Owner) -> SessionId {
        let s = self.next_session;
        self.next_session += 1;
        self.owners.insert(s, owner);
        s
    }

    fn wake(&mut self, c: usize, delay: u64) {
        if !self.clients[c].wake_pending {
            self.clients[c].wake_pending = true;
            self.schedule(self.now + delay, Event::Wake(c));
        }
    }

    /// Sends a request from client `c` over its link (in order, after a network delay) to the
    /// shard(s) its router places it on.
    fn transmit(&mut self, c: usize, session: SessionId, op: ShardOp, route: Route) {
        let delay = self.rng.random_range(0..=self.options.network_delay_max_ms);
        let at = (self.now + delay).max(self.clients[c].link_free_ms);
        self.clients[c].link_free_ms = at;
        let router = &mut self.clients[c].router;
        router.handle_request(self.now, route, Request { session, op });
        let mut batches = Vec::new();
        while let Some(batch) = router.poll_batch() {
            batches.push(batch);
        }
        for (shard, requests) in batches {
            let epoch = self.hosts[shard as usize].epoch;
            for req in requests {
                self.schedule(at, Event::Arrive { shard, epoch, req });
            }
        }
    }

    fn handle(&mut self, event: Event) -> Checked {
        match event {
            Event::Wake(c) => {
                self.clients[c].wake_pending = false;
                self.client_wake(c);
            }
            Event::Arrive { shard, epoch, req } => {
                let host = &mut self.hosts[shard as usize];
                if epoch == host.epoch {
                    host.input.push_back(req);
                } else {
                    self.trace(format!(
                        "lost in transit to s{shard}: session {} {}",
                        req.session,
                        op_name(&req.op)
                    ));
                }
            }
            Event::WalDone { shard, write } => self.wal_done(shard, write)?,
            Event::Restart { shard, epoch } => {
                if epoch == self.hosts[shard as usize].epoch {
                    self.restart_after_failure(shard)?;
                }
            }
            Event::FaultsEnd => {
                self.phase = Phase::Liveness;
                self.deadline_ms = self.now + LIVENESS_BOUND_MS;
                self.trace("faults end: every client reconnects and drains".into());
                for c in 0..self.clients.len() {
                    self.hang_up(c);
                    self.disconnect(c);
                }
            }
        }
        Ok(())
    }

    /// Closes client `c`'s session on every shard, as the node does when a connection ends.
    fn hang_up(&mut self, c: usize) {
        if let Some(s) = self.clients[c].conn.session() {
            self.transmit(c, s, ShardOp::Closed, Route::AllShards);
        }
    }

    /// The client lost its session: requests in flight have an unknown outcome. Keyed appends
    /// and sends are retried (a send may then be stored twice, which at-least-once allows);
    /// keyless appends are abandoned, since a retry could store them twice.
    fn disconnect(&mut self, c: usize) {
        let client = &mut self.clients[c];
        client.conn = Conn::Down;
        let lost: Vec<usize> = std::mem::take(&mut client.inflight).into_values().collect();
        for op in lost.into_iter().rev() {
            let retryable = match &self.model.ops[op].kind {
                OpKind::Send { .. } => true,
                OpKind::Append { key, .. } => key.is_some(),
            };
            if retryable {
                self.clients[c].retry.push_front(op);
            }
        }
        let delay = self.rng.random_range(1..=RECONNECT_DELAY_MAX_MS);
        self.wake(c, delay);
    }

    fn client_wake(&mut self, c: usize) {
        let session = match self.clients[c].conn {
            Conn::Down => {
                let s = self.new_session(Owner::Client(c));
                self.clients[c].conn = Conn::Hello(s);
                let op = ShardOp::Hello {
                    mesh: MESH.into(),
                    peer: self.clients[c].peer.clone(),
                    token: self.clients[c].token.clone(),
                };
                self.trace(format!("{} hello session={s}", self.clients[c].peer));
                self.transmit(c, s, op, Route::ByKey);
                return;
            }
            Conn::Hello(_) => return,
            Conn::Up(s) => s,
        };
        if self.phase == Phase::Faults && self.rng.random_bool(self.options.reconnect_probability) {
            self.trace(format!("{} drops session {session}", self.clients[c].peer));
            self.hang_up(c);
            self.disconnect(c);
            return;
        }
        if self.now < self.clients[c].backoff_until_ms {
            let delay = self.clients[c].backoff_until_ms - self.now;
            self.wake(c, delay);
            return;
        }
        if self.clients[c].inflight.len() >= self.options.inflight_requests_max {
            return;
        }
        let op = if let Some(op) = self.clients[c].retry.pop_front() {
            op
        } else if self.phase == Phase::Faults && self.clients[c].budget > 0 {
            self.clients[c].budget -= 1;
            if self.budget_left() == 0 {
                self.schedule(self.now, Event::FaultsEnd);
            }
            self.new_op(c)
        } else {
            return;
        };
        self.issue(c, session, op);
        let more = !self.clients[c].retry.is_empty()
            || (self.phase == Phase::Faults && self.clients[c].budget > 0);
        if more && self.clients[c].inflight.len() < self.options.inflight_requests_max {
            let delay = self.rng.random_range(0..=self.options.think_time_max_ms);
            self.wake(c, delay);
        }
    }

    /// A new operation for client `c`, with a body unique to it (its id twice, and padding).
    fn new_op(&mut self, c: usize) -> usize {
        let id = self.model.ops.len();
        let pad = "x".repeat(self.rng.random_range(0..=BODY_PAD_BYTES_MAX));
        let body =
            Body::from_trusted(format!("{{\"op\":{id},\"pad\":\"{pad}\",\"again\":{id}}}").into());
        let kind = if self.rng.random_bool(0.5) {
            let n = self.clients.len();
            let to = match self.rng.random_range(0..10) {
                0 | 1 => Target::Group(format!("g{}", self.rng.random_range(0..2)).into()),
                2 => Target::All,
                _ => Target::Peer(self.clients[self.rng.random_range(0..n)].peer.clone()),
            };
            let recipients = self.model.recipients(c, &to);
            OpKind::Send { to, recipients }
        } else {
            let conv: Arc<str> =
                format!("c{}", self.rng.random_range(0..self.options.convs)).into();
            let key = self
                .rng
                .random_bool(0.8)
                .then(|| Arc::from(format!("k{id}")));
            OpKind::Append { conv, key }
        };
        self.model.add_op(c, kind, body)
    }

    fn issue(&mut self, c: usize, session: SessionId, op: usize) {
        let r = self.clients[c].next_r;
        self.clients[c].next_r += 1;
        self.clients[c].inflight.insert(r, op);
        self.refs.insert((session, r), op);
        let o = &self.model.ops[op];
        let from = self.clients[c].peer.clone();
        let (shard_op, what) = match &o.kind {
            OpKind::Send { to, .. } => (
                ShardOp::Send {
                    r,
                    mesh: MESH.into(),
                    from,
                    to: to.clone(),
                    body: o.body.clone(),
                },
                format!("send to {}", to.to_wire()),
            ),
            OpKind::Append { conv, key } => (
                ShardOp::Append {
                    r,
                    mesh: MESH.into(),
                    conv: conv.clone(),
                    from,
                    body: o.body.clone(),
                    key: key.clone(),
                },
                format!("append {conv} key={key:?}"),
            ),
        };
        self.trace(format!("{} op {op} r={r} {what}", self.clients[c].peer));
        self.transmit(c, session, shard_op, Route::ByKey);
    }

    /// The glue's loop body, shard by shard: feed input while the shard wants it, start a WAL
    /// write if none is in flight, route every output.
    fn pump(&mut self) -> Checked {
        let mut outputs = Vec::new();
        for s in 0..self.hosts.len() {
            let shard = s as ShardIdx;
            while self.hosts[s].shard.wants_input() {
                let Some(req) = self.hosts[s].input.pop_front() else {
                    break;
                };
                if let ShardOp::Ack { peer, upto, .. } = &req.op {
                    if let Some(i) = self.clients.iter().position(|c| c.peer == *peer) {
                        self.model.ack_handled(i, *upto);
                    }
                }
                self.hosts[s].shard.handle_request(self.now, req);
            }
            if self.hosts[s].inflight.is_none() && !self.hosts[s].shard.is_failed() {
                if let Some(w) = self.hosts[s].shard.poll_wal() {
                    self.start_write(shard, w);
                }
            }
            while let Some(o) = self.hosts[s].shard.poll_output() {
                outputs.push((shard, o));
            }
        }
        let mut pushed: BTreeMap<(usize, ShardIdx), u32> = BTreeMap::new();
        for (shard, o) in outputs {
            self.route(shard, o, &mut pushed)?;
        }
        let mut to_ack = Vec::new();
        for ((c, shard), frames) in pushed {
            let Conn::Up(s) = self.clients[c].conn else {
                continue;
            };
            self.transmit(c, s, ShardOp::Flushed { frames }, Route::Shard(shard));
            if to_ack.last() != Some(&c) {
                to_ack.push(c);
            }
        }
        for c in to_ack {
            let Conn::Up(s) = self.clients[c].conn else {
                continue;
            };
            let ack =
                self.phase == Phase::Liveness || self.rng.random_bool(self.options.ack_probability);
            let upto = self.clients[c].max_received;
            if ack && upto > self.clients[c].acked_sent {
                self.clients[c].acked_sent = upto;
                let op = ShardOp::Ack {
                    mesh: MESH.into(),
                    peer: self.clients[c].peer.clone(),
                    upto,
                };
                self.trace(format!("{} ack upto {upto}", self.clients[c].peer));
                self.transmit(c, s, op, Route::ByKey);
            }
        }
        Ok(())
    }

    fn start_write(&mut self, shard: ShardIdx, w: WalWrite) {
        let id = self.next_write;
        self.next_write += 1;
        self.wal_writes += 1;
        let latency = self
            .rng
            .random_range(self.options.fsync_latency_min_ms..=self.options.fsync_latency_max_ms);
        self.trace(format!(
            "s{shard} wal write {id} seg={}{} lsn={}..={} bytes={} delete={:?} done in {latency}ms",
            w.segment,
            if w.create { " (new)" } else { "" },
            w.first_lsn,
            w.last_lsn,
            w.bytes.len(),
            w.delete
        ));
        let acks = if shard == self.mesh_shard {
            self.model.ack_snapshot()
        } else {
            Vec::new()
        };
        let host = &mut self.hosts[shard as usize];
        host.disk.begin_write(&w);
        host.inflight = Some(Inflight { id, write: w, acks });
        self.schedule(self.now + latency, Event::WalDone { shard, write: id });
    }

    fn route(
        &mut self,
        shard: ShardIdx,
        o: Output,
        pushed: &mut BTreeMap<(usize, ShardIdx), u32>,
    ) -> Checked {
        let c = match self.owners.get(&o.session).copied() {
            Some(Owner::Client(c)) => c,
            Some(Owner::Probe) => {
                let Reply::Messages { r, events, head } = o.reply else {
                    return fail(
                        ViolationKind::UnexpectedReply,
                        format!("probe got {:?}", o.reply),
                    );
                };
                let conv = self.model.conv_names()[r as usize].clone();
                self.model.note_retained(&conv, &events, head);
                return Ok(());
            }
            _ => {
                self.trace(format!("reply for gone session {} dropped", o.session));
                return Ok(());
            }
        };
        // Replies on a session the client has left still count as the shard's promises.
        let current = self.clients[c].conn.session() == Some(o.session);
        let peer = self.clients[c].peer.clone();
        let Reply::Frame(frame) = o.reply else {
            return fail(
                ViolationKind::UnexpectedReply,
                format!("{peer} got {:?}", o.reply),
            );
        };
        match frame {
            ServerOp::Welcome { acked, head, .. } => {
                self.trace(format!(
                    "{peer} welcome session={} acked={acked} head={head}",
                    o.session
                ));
                self.model.on_welcome(c, acked, head)?;
                if self.clients[c].conn == Conn::Hello(o.session) {
                    self.clients[c].conn = Conn::Up(o.session);
                    self.wake(c, 0);
                }
            }
            ServerOp::Ok { r, pos, seq } => {
                let Some(op) = self.refs.remove(&(o.session, r)) else {
                    return fail(
                        ViolationKind::UnexpectedReply,
                        format!("{peer} ok for unknown r={r}"),
                    );
                };
                self.trace(format!("{peer} ok op {op} r={r} pos={pos:?} seq={seq:?}"));
                self.model.on_ok(op, pos, seq)?;
                if current {
                    self.clients[c].inflight.remove(&r);
                    let delay = self.rng.random_range(0..=self.options.think_time_max_ms);
                    self.wake(c, delay);
                }
            }
            ServerOp::Error { r, code, message } => {
                self.trace(format!("{peer} error r={r:?} {code:?} {message}"));
                let (Some(r), ErrorCode::Unavailable) = (r, code) else {
                    return fail(
                        ViolationKind::UnexpectedReply,
                        format!("{peer} got error r={r:?} {code:?}: {message}"),
                    );
                };
                if self.refs.remove(&(o.session, r)).is_none() {
                    return fail(
                        ViolationKind::UnexpectedReply,
                        format!("{peer} error for unknown r={r}"),
                    );
                }
                // Unavailable: refused, or its WAL write failed (and may yet survive in the page
                // cache). Keyed appends and sends are retried; keyless appends abandoned.
                if current {
                    if let Some(op) = self.clients[c].inflight.remove(&r) {
                        let keyless =
                            matches!(&self.model.ops[op].kind, OpKind::Append { key: None, .. });
                        if !keyless {
                            self.clients[c].retry.push_back(op);
                        }
                    }
                    let delay = self.rng.random_range(1..=RECONNECT_DELAY_MAX_MS);
                    self.clients[c].backoff_until_ms = self.now + delay;
                    self.wake(c, delay);
                }
            }
            ServerOp::Deliver {
                pos,
                from,
                to,
                body,
                ..
            } => {
                self.model.on_deliver(c, pos, &from, &to, &body)?;
                if current {
                    self.trace(format!("{peer} deliver pos={pos}"));
                    self.model.delivered[c].insert(pos);
                    let client = &mut self.clients[c];
                    client.max_received = client.max_received.max(pos);
                    *pushed.entry((c, shard)).or_default() += 1;
                }
            }
            f => return fail(ViolationKind::UnexpectedReply, format!("{peer} got {f:?}")),
        }
        Ok(())
    }

    fn wal_done(&mut self, shard: ShardIdx, id: u64) -> Checked {
        let s = shard as usize;
        let Some(inflight) = self.hosts[s].inflight.take_if(|i| i.id == id) else {
            return Ok(()); // the write died with a crashed incarnation
        };
        let w = &inflight.write;
        if self.phase == Phase::Faults && self.rng.random_bool(self.options.enospc_probability) {
            let written = self.hosts[s].disk.failed_write_cut(w, &mut self.rng);
            self.hosts[s].disk.fail_write(w, written);
            self.faults += 1;
            self.trace(format!(
                "s{shard} wal write {id} failed (ENOSPC/EIO) after {written} of {} bytes reached the page cache",
                w.bytes.len()
            ));
            self.hosts[s].shard.handle_wal_failed(self.now, "ENOSPC");
            let delay = self.rng.random_range(1..=RESTART_DELAY_MAX_MS);
            let epoch = self.hosts[s].epoch;
            self.schedule(self.now + delay, Event::Restart { shard, epoch });
            return Ok(());
        }
        self.hosts[s].disk.complete_write(w);
        self.model.ack_durable(&inflight.acks);
        self.trace(format!(
            "s{shard} wal write {id} durable up to lsn {}",
            w.last_lsn
        ));
        self.hosts[s].shard.handle_wal_done(self.now, w.last_lsn);
        self.probe_retention(shard);
        Ok(())
    }

    /// Retention starts (and evicts conversation entries, and their idempotency keys, from
    /// memory) only in `handle_wal_done`; a one-entry read from seq 1 right after shows what is
    /// left, so the checker knows which keys the shard may have forgotten.
    fn probe_retention(&mut self, shard: ShardIdx) {
        if self.options.retention_bytes_max >= RETENTION_OFF_BYTES {
            return;
        }
        let probe = match self.probe {
            Some(s) => s,
            None => {
                let s = self.new_session(Owner::Probe);
                self.probe = Some(s);
                s
            }
        };
        for (i, conv) in self.model.conv_names().into_iter().enumerate() {
            if self.conv_shard(&conv) != shard {
                continue;
            }
            let read = ShardOp::Read {
                r: i as u64,
                mesh: MESH.into(),
                conv,
                from: 1,
                limit: 1,
            };
            self.hosts[shard as usize].shard.handle_request(
                self.now,
                Request {
                    session: probe,
                    op: read,
                },
            );
        }
    }

    /// Power loss: every shard of the node, its in-flight write, its input and every session
    /// die together.
    fn crash(&mut self) -> Checked {
        self.crashes += 1;
        let faults = CrashFaults {
            torn_write_probability: self.options.torn_write_probability,
            tail_corruption_probability: self.options.tail_corruption_probability,
        };
        for s in 0..self.hosts.len() {
            let report = self.hosts[s].disk.crash(&mut self.rng, faults);
            self.faults += report.faults();
            self.trace(format!("CRASH s{s} {report:?}"));
        }
        for s in 0..self.hosts.len() {
            self.reincarnate(s as ShardIdx)?;
        }
        for c in 0..self.clients.len() {
            self.disconnect(c);
        }
        Ok(())
    }

    /// The glue restarts a shard whose WAL write failed, and closes the sessions attached to
    /// the old incarnation; their clients reconnect.
    fn restart_after_failure(&mut self, shard: ShardIdx) -> Checked {
        self.restarts += 1;
        self.trace(format!("s{shard} restart after storage failure"));
        for c in 0..self.clients.len() {
            self.hang_up(c);
        }
        self.reincarnate(shard)?;
        for c in 0..self.clients.len() {
            self.disconnect(c);
        }
        Ok(())
    }

    /// A new incarnation of `shard`, recovered from its disk and audited.
    fn reincarnate(&mut self, shard: ShardIdx) -> Checked {
        let host = &mut self.hosts[shard as usize];
        host.epoch += 1;
        host.inflight = None;
        host.input.clear();
        if shard == self.mesh_shard {
            self.model.restart();
        }
        self.recover(shard)?;
        self.audit(shard)
    }

    /// Recovery exactly as the glue does it, after maybe one corrupted read that must be
    /// refused.
    fn recover(&mut self, shard: ShardIdx) -> Checked {
        let s = shard as usize;
        let config = self.options.shard_config(shard);
        if self.phase == Phase::Faults
            && self
                .rng
                .random_bool(self.options.read_corruption_probability)
        {
            if let Some(flip) = self.hosts[s].disk.pick_read_flip(&mut self.rng) {
                self.faults += 1;
                let segments = self.hosts[s].disk.read_flipped(flip);
                match recover_from(config.clone(), segments.iter().map(|(id, b)| (*id, &b[..]))) {
                    Err(RecoverError::Corrupt { file, offset, .. }) => {
                        self.trace(format!(
                            "s{shard} read corruption {flip:?} refused: {file} at {offset}"
                        ));
                    }
                    Err(e) => {
                        return fail(
                            ViolationKind::RecoveryRefused,
                            format!(
                            "s{shard} read corruption {flip:?} refused with the wrong error: {e}"
                        ),
                        )
                    }
                    Ok(_) => {
                        return fail(
                            ViolationKind::CorruptionAccepted,
                            format!(
                            "s{shard} recovery accepted {flip:?} in a segment that is not the last"
                        ),
                        )
                    }
                }
            }
        }
        let result = recover_from(config, self.hosts[s].disk.segments().into_iter());
        let (recovered, report) = match result {
            Ok(x) => x,
            Err(e) => {
                return fail(
                    ViolationKind::RecoveryRefused,
                    format!("s{shard} recovery refused a sound disk: {e}"),
                )
            }
        };
        let host = &mut self.hosts[s];
        if let Some((id, len)) = report.truncate {
            host.disk.truncate(id, len);
        }
        if self.options.sync_after_recovery {
            host.disk.sync_all();
        }
        host.shard = recovered;
        self.trace(format!("s{shard} recovered {report:?}"));
        Ok(())
    }

    /// Reads back every conversation of a fresh incarnation and, on the mesh's shard, replays
    /// every inbox (checkers 1, 2 and 6), on sessions of its own that it closes again.
    fn audit(&mut self, shard: ShardIdx) -> Checked {
        let s = shard as usize;
        let audit = self.next_session;
        self.next_session += 1;
        for conv in self.model.conv_names() {
            if self.conv_shard(&conv) != shard {
                continue;
            }
            let read = ShardOp::Read {
                r: 0,
                mesh: MESH.into(),
                conv: conv.clone(),
                from: 1,
                limit: fabric_proto::READ_LIMIT_MAX,
            };
            self.hosts[s].shard.handle_request(
                self.now,
                Request {
                    session: audit,
                    op: read,
                },
            );
            let mut got = None;
            while let Some(o) = self.hosts[s].shard.poll_output() {
                match o.reply {
                    Reply::Messages { events, head, .. } => got = Some((events, head)),
                    r => {
                        return fail(
                            ViolationKind::UnexpectedReply,
                            format!("audit read got {r:?}"),
                        )
                    }
                }
            }
            let Some((events, head)) = got else {
                return fail(ViolationKind::UnexpectedReply, "audit read got no reply");
            };
            self.model.audit_conv(&conv, &events, head)?;
        }
        if shard == self.mesh_shard {
            for c in 0..self.clients.len() {
                self.audit_inbox(c)?;
            }
        }
        self.trace(format!("s{shard} audit passed"));
        Ok(())
    }

    /// Replays peer `c`'s inbox from its cursor on a fresh incarnation of the mesh's shard.
    fn audit_inbox(&mut self, c: usize) -> Checked {
        let s = self.mesh_shard as usize;
        let session = self.next_session;
        self.next_session += 1;
        let hello = ShardOp::Hello {
            mesh: MESH.into(),
            peer: self.clients[c].peer.clone(),
            token: self.clients[c].token.clone(),
        };
        self.hosts[s]
            .shard
            .handle_request(self.now, Request { session, op: hello });
        let mut cursor = None;
        let mut shown = BTreeSet::new();
        loop {
            let mut frames = 0;
            while let Some(o) = self.hosts[s].shard.poll_output() {
                match o.reply {
                    Reply::Frame(ServerOp::Welcome { acked, head, .. }) => {
                        self.model.on_welcome(c, acked, head)?;
                        cursor = Some(acked);
                    }
                    Reply::Frame(ServerOp::Deliver {
                        pos,
                        from,
                        to,
                        body,
                        ..
                    }) => {
                        self.model.on_deliver(c, pos, &from, &to, &body)?;
                        if shown.last().is_some_and(|l| *l >= pos) {
                            return fail(
                                ViolationKind::WrongRecord,
                                format!(
                                    "audit replay of {} out of order at pos {pos}",
                                    self.clients[c].peer
                                ),
                            );
                        }
                        shown.insert(pos);
                        frames += 1;
                    }
                    r => {
                        return fail(
                            ViolationKind::UnexpectedReply,
                            format!("audit hello got {r:?}"),
                        )
                    }
                }
            }
            if frames == 0 {
                break;
            }
            let flushed = ShardOp::Flushed { frames };
            self.hosts[s].shard.handle_request(
                self.now,
                Request {
                    session,
                    op: flushed,
                },
            );
        }
        let Some(acked) = cursor else {
            return fail(ViolationKind::UnexpectedReply, "audit hello got no welcome");
        };
        self.model.audit_inbox(c, acked, &shown)?;
        self.hosts[s].shard.handle_request(
            self.now,
            Request {
                session,
                op: ShardOp::Closed,
            },
        );
        Ok(())
    }
}

/// Feeds segments to a `Recoverer` as the glue does: in id order, `is_last` for the newest.
fn recover_from<'a>(
    config: ShardConfig,
    segments: impl ExactSizeIterator<Item = (u64, &'a [u8])>,
) -> Result<(Shard, RecoveryReport), RecoverError> {
    let mut r = Recoverer::new(config);
    let n = segments.len();
    for (i, (id, bytes)) in segments.enumerate() {
        r.handle_segment(id, &wal::segment_file_name(id), bytes, i + 1 == n)?;
    }
    Ok(r.finish())
}

/// Peer `i`'s groups: `g0` for even peers, `g1` for every third (so some peers are in both,
/// some in neither).
#[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; the MSRV is 1.85
fn groups_of(i: usize) -> Vec<Arc<str>> {
    let mut g = Vec::new();
    if i % 2 == 0 {
        g.push(Arc::from("g0"));
    }
    if i % 3 == 0 {
        g.push(Arc::from("g1"));
    }
    g
}

fn op_name(op: &ShardOp) -> &'static str {
    match op {
        ShardOp::CreateMesh { .. } => "create_mesh",
        ShardOp::AddPeer { .. } => "add_peer",
        ShardOp::Hello { .. } => "hello",
        ShardOp::Auth { .. } => "auth",
        ShardOp::Send { .. } => "send",
        ShardOp::Append { .. } => "append",
        ShardOp::Subscribe { .. } => "subscribe",
        ShardOp::Unsubscribe { .. } => "unsubscribe",
        ShardOp::Read { .. } => "read",
        ShardOp::Ack { .. } => "ack",
        ShardOp::Flushed { .. } => "flushed",
        ShardOp::Closed => "closed",
    }
}
