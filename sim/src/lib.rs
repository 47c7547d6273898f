//! Fabric's deterministic simulator: the real cores (`fabric_shard::Shard`,
//! `fabric_router::Router`, `fabric_edge::Session`, the `fabric_proto` codec; never copies)
//! driven by simulated clients over a simulated network, against simulated disks that crash,
//! tear writes, corrupt reads and fill up, with checkers that fail the run when a promise
//! breaks.
//!
//! # Why it is deterministic
//!
//! One seeded `ChaCha8Rng` is the only source of randomness (the swarm's options and the
//! schedule draw from streams of their own, derived from the same seed); time is a simulated
//! clock in ms that jumps to the next event; everything runs on one thread; every collection
//! whose order reaches an output is ordered (`BTreeMap`, `Vec`, `VecDeque`). So a seed replays
//! the same run exactly, and a failure is reproduced by its `SEED=` line alone, or by the
//! schedule file it writes. Every step writes a trace line; their hash
//! ([`RunSummary::trace_hash`]) proves two runs were the same.
//!
//! # A run
//!
//! 1. Setup, without faults: one mesh, one peer per client (in groups `g0`/`g1`).
//! 2. The fault phase (`duration_ms`, a minute in the swarm): each client connects over its
//!    own link (a reliable stream over lossy packets, [`net`]), says hello to a real edge
//!    session (with a token, or signed with its ed25519 key over the session's nonce), and
//!    issues sends, appends (keyed appends are retried with the same key after a lost
//!    connection, some resent while in flight), subscribes, unsubscribes and pings, often
//!    several in one batch frame; it acks what it received and reconnects when its connection
//!    dies. An HTTP client beside the node reads conversation pages through a router. The
//!    node's glue is simulated as `fabric` does it: per connection an edge session and a
//!    router, per shard an input channel of router batches taken through
//!    `Shard::handle_requests`, one WAL write in flight, fsync latency from the RNG. Every frame
//!    a shard sends is checked as it leaves (checkers 1, 2, 7), every frame a client receives
//!    as it arrives (checker 8).
//!    Meanwhile the [`schedule`] applies its timed faults: power loss and reboot, symmetric and
//!    one-way partitions, clogged links, read corruption of sealed segments, full disks, load
//!    bursts and pauses, clients dropping connections; packets are lost, duplicated and
//!    reordered; writes fail with ENOSPC or EIO. Each reboot recovers every shard with
//!    `Recoverer` from its disk exactly as the glue does, and an audit then reads every
//!    conversation and replays every inbox (checkers 1, 2, 6).
//! 3. The liveness phase: everything heals, every client reconnects and drains; the run must
//!    become quiet within [`LIVENESS_BOUND_MS`], and every acknowledged message must have
//!    reached every recipient over its connection, and no shard may hold a closed session
//!    (checkers 3, 4, 9).
//!
//! The simulated glue differs from `fabric/src/storage.rs` in one respect, on purpose: after
//! recovery it fsyncs what it read, not only when it truncates. A restart after a failed write
//! reads records that exist only in the page cache and serves them as durable; without the
//! fsync a later power loss takes them ([`SimOptions::sync_after_recovery`] turns it off, and
//! `tests/planted.rs` shows what breaks).
//!
//! The world is `nodes` nodes (one by default, and in the swarm), each with 1-3 shards and the
//! clients attached to it. The cores do not replicate yet, so several nodes are several
//! independent single-node clusters; the world already keeps an endpoint per node, links
//! between any two endpoints, and schedules whose events name their node, so replication adds
//! node-to-node traffic without changing the world's shape or the file format.
//!
//! # Example
//!
//! ```
//! let options = fabric_sim::swarm(7);
//! let summary = fabric_sim::run(7, &options).expect("the cores keep their promises");
//! assert_eq!(summary.trace_hash, fabric_sim::run(7, &options).unwrap().trace_hash);
//! ```
//!
//! For scripted tests of your own (peers that connect, send, go offline and come back under a
//! schedule of faults), see [`script::MeshSim`].

pub mod check;
pub mod cluster;
pub mod disk;
pub mod net;
pub mod options;
pub mod runner;
pub mod schedule;
pub mod script;
mod world;

pub use check::ViolationKind;
pub use options::{swarm, SimOptions, RETENTION_OFF_BYTES};
pub use schedule::{FaultEvent, Schedule, ScheduleError, Timed};
pub use world::{Simulation, CLIENT_BATCH_OPS_MAX, MESH};

use std::fmt;

/// Simulated time the liveness phase may take once faults stop, in ms.
pub const LIVENESS_BOUND_MS: u64 = 60_000;
/// Events one run may process; more means a loop that does not advance simulated time: a
/// liveness failure.
pub const RUN_EVENTS_MAX: u64 = 5_000_000;
/// Trace lines a violation carries.
pub const TRACE_RING_LINES: usize = 50;

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
    /// The schedule the run applied: written to a file, it replays the run.
    pub schedule: Schedule,
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
    /// Torn writes, tail bit flips, read corruptions, failed writes, partitions, clogs, full
    /// disks.
    pub faults_injected: u64,
    pub wal_writes: u64,
    /// Disk reads of the log the shards asked for (subscribers and reads behind the cache).
    pub log_reads: u64,
    /// Connections the clients opened.
    pub connections: u64,
    pub net: net::NetStats,
    pub workload: WorkloadStats,
}

/// What a run's clients and the node's glue did, beyond sends and appends acknowledged: the
/// swarm tests assert that each kind really happens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkloadStats {
    /// Sends and appends sent, retries and resends included.
    pub requests: u64,
    pub subscribes: u64,
    pub unsubscribes: u64,
    /// Conversation events the clients received.
    pub events_received: u64,
    pub pings: u64,
    /// Keyed appends resent while still waiting for their answer.
    pub hedges: u64,
    /// Hellos signed with a peer's key over its session's challenge nonce.
    pub key_hellos: u64,
    /// Frames a client sent with several ops in them.
    pub client_batches: u64,
    /// HTTP-style conversation reads answered.
    pub http_reads: u64,
    /// HTTP appends acknowledged.
    pub http_appends: u64,
    /// Request batches the shards took through `Shard::handle_requests`.
    pub shard_batches: u64,
    /// Of those, batches of several requests after which the shard wanted no more input:
    /// backpressure reached inside a batch, which the batch entry point must still finish.
    pub shard_batches_past_backpressure: u64,
    /// Reply batches a session's full reply queue refused (the session was then closed as
    /// `overloaded`).
    pub reply_queue_overflows: u64,
}

impl WorkloadStats {
    pub fn add(&mut self, o: &WorkloadStats) {
        self.requests += o.requests;
        self.subscribes += o.subscribes;
        self.unsubscribes += o.unsubscribes;
        self.events_received += o.events_received;
        self.pings += o.pings;
        self.hedges += o.hedges;
        self.key_hellos += o.key_hellos;
        self.client_batches += o.client_batches;
        self.http_reads += o.http_reads;
        self.http_appends += o.http_appends;
        self.shard_batches += o.shard_batches;
        self.shard_batches_past_backpressure += o.shard_batches_past_backpressure;
        self.reply_queue_overflows += o.reply_queue_overflows;
    }
}

/// Runs one random seed with `options` (its schedule generated from the seed).
pub fn run(seed: u64, options: &SimOptions) -> Result<RunSummary, Box<Violation>> {
    replay(&Schedule::generate(seed, options))
}

/// Runs the run a schedule describes. It runs without formatting trace lines; should it
/// fail, it runs again keeping the last lines for the report (the same run: a schedule
/// replays exactly).
pub fn replay(schedule: &Schedule) -> Result<RunSummary, Box<Violation>> {
    Simulation::from_schedule(schedule.clone())
        .run()
        .map_err(|_| {
            let again = Simulation::from_schedule(schedule.clone())
                .keeping_last_events()
                .run();
            again.expect_err("a failing run fails again with the same schedule")
        })
}

/// 64-bit FNV-1a, written out so that the trace hash never depends on a library's version.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv(pub(crate) u64);

impl Fnv {
    pub(crate) fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}
