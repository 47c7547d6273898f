//! What a run varies, and the swarm that picks it from the seed.

use crate::net::{NetOptions, StreamConfig};
use fabric_proto::internal::ShardIdx;
use fabric_router::host::PlantedGlueBugs;
use fabric_router::limits::Limits;
use fabric_shard::{PlantedBugs, ShardConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Why simulator options, a schedule or a planted bug's name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimConfigError {
    #[error("{0}")]
    Rule(&'static str),
    /// A limit a node would refuse to start with.
    #[error("{0}")]
    Limits(String),
    #[error("unknown planted bug {name:?}; known: {known}")]
    UnknownBug { name: String, known: String },
    /// An event of a schedule that cannot run.
    #[error("event {index} ({event}): {why}")]
    Event {
        index: usize,
        event: String,
        why: &'static str,
    },
}

/// A retention limit this large never triggers in a run.
pub const RETENTION_OFF_BYTES: u64 = 1 << 40;

/// Everything a run varies, chosen from the seed by [`swarm`] (swarm testing: each seed also
/// picks which features and faults are on, so rare combinations get runs of their own). In a
/// schedule file every field is optional: what is left out takes [`SimOptions::default`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimOptions {
    /// Nodes of the world. The cores do not replicate yet, so each node is a cluster of its
    /// own, serving the clients attached to it (client `i` to node `i % nodes`).
    pub nodes: u32,
    /// Shards of the node; keys are placed by `fabric_router::Router`.
    pub shards: u32,
    /// Placement partitions (at least `shards`).
    pub partitions: u32,
    pub clients: usize,
    /// Chance each client speaks binary (postcard) frames rather than JSON text.
    pub binary_probability: f64,
    /// Length of the fault phase, in simulated ms; the liveness phase follows.
    pub duration_ms: u64,
    /// New operations each client issues at most (bounds a run's cost).
    pub client_ops_max: u32,
    /// Requests one client keeps in flight.
    pub inflight_requests_max: usize,
    /// The node's per-session in-flight limit (`fabric_edge::SessionConfig`): past it the
    /// session stops reading the connection (backpressure).
    pub session_inflight_requests_max: u32,
    pub convs: usize,
    pub fsync_latency_min_ms: u64,
    pub fsync_latency_max_ms: u64,
    pub net: NetOptions,
    pub stream: StreamConfig,
    /// Longest pause between a client's operations at the start (load events change it).
    pub think_time_max_ms: u64,
    /// Mean time between power losses (0: none). Drawn into the schedule.
    pub crash_interval_ms_mean: u64,
    /// Longest time a crashed node stays down.
    pub restart_delay_ms_max: u64,
    /// Mean time between partitions (0: none); each lasts up to `partition_ms_max`.
    pub partition_interval_ms_mean: u64,
    pub partition_ms_max: u64,
    /// Mean time between clogged links (0: none); each lasts up to `clog_ms_max`.
    pub clog_interval_ms_mean: u64,
    pub clog_ms_max: u64,
    /// Mean time between a shard's disk filling up (0: never); it stays full up to
    /// `disk_full_ms_max`.
    pub disk_full_interval_ms_mean: u64,
    pub disk_full_ms_max: u64,
    /// Mean time between load changes (0: none): bursts, slow phases, pauses.
    pub load_phase_ms_mean: u64,
    /// Mean time between a client dropping its connection on its own (0: never).
    pub disconnect_interval_ms_mean: u64,
    /// Chance a crash tears the unsynced write at a sector boundary (rather than losing or
    /// keeping all of it).
    pub torn_write_probability: f64,
    /// Chance a crash flips a bit in the unsynced bytes that survived.
    pub tail_corruption_probability: f64,
    /// Chance a crash is followed by a recovery that first reads a flipped bit in a segment
    /// that is not the last (a `corrupt_read` event in the schedule).
    pub read_corruption_probability: f64,
    /// Chance any WAL write fails: ENOSPC part-way, or EIO from its fdatasync after the bytes
    /// reached the page cache. The shard is then restarted.
    pub enospc_probability: f64,
    /// Chance a client acks after a frame of deliveries (always in the liveness phase).
    pub ack_probability: f64,
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
    #[serde(with = "planted_names")]
    pub planted: PlantedBugs,
    /// Bugs planted in the node's host (`fabric_router::host`), by name.
    #[serde(with = "planted_names::glue")]
    pub planted_glue: PlantedGlueBugs,
    /// Chance each client asks for batch frames (`options` with `batch`, of 2, 3 or 64 ops)
    /// before its hello, so the edge joins server ops into frames under every fault.
    pub batch_in_probability: f64,
    /// Chance each peer is registered with an ed25519 public key and says key hellos
    /// (`challenge`, then a `hello` signed over the session's nonce, which the glue draws from
    /// the run's RNG). Such peers keep a token too, which only the simulator's audits use.
    pub key_peer_probability: f64,
    /// Chance a client puts several requests (up to its free window, at most
    /// `CLIENT_BATCH_OPS_MAX`) into one batch frame: a binary `Batch` or a JSON array.
    pub client_batch_probability: f64,
    /// Chance a new request is a subscribe or an unsubscribe of a conversation.
    pub subscribe_probability: f64,
    /// Chance a frame a client sends carries a `ping` too.
    pub ping_probability: f64,
    /// Chance a new request resends a keyed append still waiting for its answer, with a new
    /// ref and the same key (a client whose request timer fired): the shard must answer it
    /// with the original seq, and only once that is durable.
    pub hedge_probability: f64,
    /// The shards' log cache, disk index stride and read size (`Limits`): small ones send
    /// subscribers and reads to disk.
    pub log_cache_bytes_max: u64,
    pub log_index_stride_records: u64,
    pub log_read_bytes_max: usize,
    /// Chance a disk read of the log (while faults are on) fails with EIO or returns a
    /// flipped bit: the shard must try again, never serve the flipped bytes, and after its
    /// retries fail and be recovered.
    pub log_read_fault_probability: f64,
    /// Mean time between calls of the HTTP client beside each node (0: none), half appends,
    /// half page reads, each run by the edge's `RestCall` as the node's HTTP handler runs it.
    pub http_call_interval_ms_mean: u64,
    /// Capacity of each session's reply queue, in batches (0: the node's own rule,
    /// `fabric_router::host::session_reply_queue_batches_min`). Smaller than that rule, a
    /// session that stops taking replies overflows it, and the host must close it
    /// (`overloaded`), never drop its replies in silence.
    pub reply_queue_batches_max: usize,
    /// A session takes no replies from its queue while this many frames it wrote are
    /// unacknowledged (its socket's send buffer is full: the node's session task is blocked
    /// in a write).
    pub socket_window_frames: usize,
}

impl Default for SimOptions {
    /// A small, calm cluster: one node with two shards, three clients, a minute of load, no
    /// faults. Hand-written schedules start from here.
    fn default() -> SimOptions {
        SimOptions {
            nodes: 1,
            shards: 2,
            partitions: 8,
            clients: 3,
            binary_probability: 0.5,
            duration_ms: 60_000,
            client_ops_max: 100,
            inflight_requests_max: 4,
            session_inflight_requests_max: 1024,
            convs: 2,
            fsync_latency_min_ms: 0,
            fsync_latency_max_ms: 3,
            net: NetOptions::default(),
            stream: StreamConfig::default(),
            think_time_max_ms: 20,
            crash_interval_ms_mean: 0,
            restart_delay_ms_max: 200,
            partition_interval_ms_mean: 0,
            partition_ms_max: 3_000,
            clog_interval_ms_mean: 0,
            clog_ms_max: 2_000,
            disk_full_interval_ms_mean: 0,
            disk_full_ms_max: 500,
            load_phase_ms_mean: 0,
            disconnect_interval_ms_mean: 0,
            torn_write_probability: 0.5,
            tail_corruption_probability: 0.3,
            read_corruption_probability: 0.0,
            enospc_probability: 0.0,
            ack_probability: 0.6,
            wal_segment_bytes_max: 16_384,
            retention_bytes_max: RETENTION_OFF_BYTES,
            wal_batch_bytes_max: 4_096,
            push_credit_frames_max: 8,
            drain_scan_entries_max: 64,
            pending_acks_max: 16,
            sync_after_recovery: true,
            planted: PlantedBugs::default(),
            planted_glue: PlantedGlueBugs::default(),
            batch_in_probability: 0.5,
            key_peer_probability: 0.3,
            client_batch_probability: 0.3,
            subscribe_probability: 0.1,
            ping_probability: 0.05,
            hedge_probability: 0.05,
            log_cache_bytes_max: 4_096,
            log_index_stride_records: 4,
            log_read_bytes_max: 4_096,
            log_read_fault_probability: 0.01,
            http_call_interval_ms_mean: 500,
            reply_queue_batches_max: 0,
            socket_window_frames: 1 << 16,
        }
    }
}

impl SimOptions {
    /// The node limits of this run: `Limits::default()` varied by this run's drawn fields
    /// (the one mapping from options to limits; every core config derives from its result).
    pub fn limits(&self) -> Limits {
        Limits {
            shards: self.shards,
            partitions: self.partitions,
            inflight_requests_max: self.session_inflight_requests_max,
            wal_segment_bytes_max: self.wal_segment_bytes_max,
            retention_bytes_max: self.retention_bytes_max,
            wal_batch_bytes_max: self.wal_batch_bytes_max,
            push_credit_frames_max: self.push_credit_frames_max,
            drain_scan_entries_max: self.drain_scan_entries_max,
            pending_acks_max: self.pending_acks_max,
            log_cache_bytes_max: self.log_cache_bytes_max,
            log_index_stride_records: self.log_index_stride_records,
            log_read_bytes_max: self.log_read_bytes_max,
            ..Limits::default()
        }
    }

    /// These options with their limits taken from `limits` (the inverse of [`Self::limits`]
    /// for the fields a run varies).
    fn with_limits(self, l: Limits) -> SimOptions {
        SimOptions {
            shards: l.shards,
            partitions: l.partitions,
            session_inflight_requests_max: l.inflight_requests_max,
            wal_segment_bytes_max: l.wal_segment_bytes_max,
            retention_bytes_max: l.retention_bytes_max,
            wal_batch_bytes_max: l.wal_batch_bytes_max,
            push_credit_frames_max: l.push_credit_frames_max,
            drain_scan_entries_max: l.drain_scan_entries_max,
            pending_acks_max: l.pending_acks_max,
            log_cache_bytes_max: l.log_cache_bytes_max,
            log_index_stride_records: l.log_index_stride_records,
            log_read_bytes_max: l.log_read_bytes_max,
            ..self
        }
    }

    /// The session core's config: the node's derivation (`Limits::session_config`).
    pub fn session_config(&self) -> fabric_edge::SessionConfig {
        self.limits().session_config()
    }

    /// Shard `shard`'s core config: the node's derivation (`Limits::shard_config`), plus this
    /// run's planted bugs.
    pub(crate) fn shard_config(&self, shard: ShardIdx) -> ShardConfig {
        ShardConfig {
            planted: fabric_shard::PlantedBugs {
                no_sync_after_recovery: self.planted.no_sync_after_recovery
                    || !self.sync_after_recovery,
                ..self.planted
            },
            ..self.limits().shard_config(shard)
        }
    }

    /// Every probability of the options (each must be within 0..=1).
    fn probabilities(&self) -> [f64; 16] {
        [
            self.binary_probability,
            self.batch_in_probability,
            self.key_peer_probability,
            self.client_batch_probability,
            self.subscribe_probability,
            self.ping_probability,
            self.hedge_probability,
            self.torn_write_probability,
            self.tail_corruption_probability,
            self.read_corruption_probability,
            self.enospc_probability,
            self.ack_probability,
            self.net.loss_probability,
            self.net.duplicate_probability,
            self.net.latency_tail_probability,
            self.log_read_fault_probability,
        ]
    }

    /// Why these options cannot run, if they cannot.
    pub fn validate(&self) -> Result<(), SimConfigError> {
        let checks: [(bool, &str); 10] = [
            (
                self.nodes >= 1 && self.nodes as usize <= self.clients,
                "nodes must be from 1 to clients (each node serves clients of its own)",
            ),
            (self.shards >= 1, "shards must be at least 1"),
            (
                self.partitions >= self.shards,
                "partitions must be >= shards",
            ),
            (self.clients >= 1, "clients must be at least 1"),
            (self.clients <= 64, "clients must be at most 64"),
            (self.convs >= 1, "convs must be at least 1"),
            (
                self.inflight_requests_max >= 1,
                "inflight_requests_max must be >= 1",
            ),
            (
                self.session_inflight_requests_max >= 1,
                "session_inflight_requests_max must be >= 1",
            ),
            (
                self.fsync_latency_min_ms <= self.fsync_latency_max_ms
                    && self.net.latency_min_ms <= self.net.latency_max_ms,
                "a latency's min exceeds its max",
            ),
            (
                self.stream.rto_initial_ms >= 1
                    && self.stream.keepalive_ms >= 1
                    && self.stream.idle_timeout_ms > self.stream.keepalive_ms,
                "stream timers must be positive, and the idle timeout longer than the keepalive",
            ),
        ];
        for (ok, why) in checks {
            if !ok {
                return Err(SimConfigError::Rule(why));
            }
        }
        // The node's own rules: a run never uses limits a node would refuse to start with
        // (`reply_queue_batches_max` is apart: a fault, below the rule on purpose).
        self.limits()
            .validate()
            .map_err(|e| SimConfigError::Limits(e.to_string()))?;
        let rule = |ok: bool, why| {
            if ok {
                Ok(())
            } else {
                Err(SimConfigError::Rule(why))
            }
        };
        rule(
            self.socket_window_frames > 0,
            "socket_window_frames must be at least 1",
        )?;
        let in_range = self.probabilities().iter().all(|p| (0.0..=1.0).contains(p));
        rule(in_range, "every probability must be within 0..=1")
    }
}

impl fmt::Display for SimOptions {
    /// One line, `key=value` pairs, for beside a `SEED=` line.
    // Over 70 lines: one line per option.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = &self.net;
        let s = &self.stream;
        write!(
            f,
            "nodes={} shards={} partitions={} clients={} binary_p={} duration_ms={} ops={} \
             inflight={} session_inflight={} convs={} fsync_ms={}..={} \
             net_ms={}..={} tail_p={} tail_ms={} loss_p={} dup_p={} rto_ms={}..{} keepalive_ms={} idle_ms={} \
             think_ms={} crash_every_ms={} down_ms={} partition_every_ms={} partition_ms={} \
             clog_every_ms={} clog_ms={} disk_full_every_ms={} disk_full_ms={} load_every_ms={} \
             disconnect_every_ms={} torn_p={} tail_flip_p={} read_flip_p={} enospc_p={} ack_p={} \
             segment_bytes={} retention_bytes={} batch_bytes={} credit={} scan={} pending={} \
             sync_after_recovery={} batch_in_p={} key_peer_p={} client_batch_p={} \
             subscribe_p={} ping_p={} hedge_p={} http_call_every_ms={} reply_queue={} \
             socket_window={} log_cache={} log_stride={} log_read={} log_read_fault_p={} \
             planted={}",
            self.nodes,
            self.shards,
            self.partitions,
            self.clients,
            self.binary_probability,
            self.duration_ms,
            self.client_ops_max,
            self.inflight_requests_max,
            self.session_inflight_requests_max,
            self.convs,
            self.fsync_latency_min_ms,
            self.fsync_latency_max_ms,
            n.latency_min_ms,
            n.latency_max_ms,
            n.latency_tail_probability,
            n.latency_tail_ms_max,
            n.loss_probability,
            n.duplicate_probability,
            s.rto_initial_ms,
            s.rto_max_ms,
            s.keepalive_ms,
            s.idle_timeout_ms,
            self.think_time_max_ms,
            self.crash_interval_ms_mean,
            self.restart_delay_ms_max,
            self.partition_interval_ms_mean,
            self.partition_ms_max,
            self.clog_interval_ms_mean,
            self.clog_ms_max,
            self.disk_full_interval_ms_mean,
            self.disk_full_ms_max,
            self.load_phase_ms_mean,
            self.disconnect_interval_ms_mean,
            self.torn_write_probability,
            self.tail_corruption_probability,
            self.read_corruption_probability,
            self.enospc_probability,
            self.ack_probability,
            self.wal_segment_bytes_max,
            self.retention_bytes_max,
            self.wal_batch_bytes_max,
            self.push_credit_frames_max,
            self.drain_scan_entries_max,
            self.pending_acks_max,
            self.sync_after_recovery,
            self.batch_in_probability,
            self.key_peer_probability,
            self.client_batch_probability,
            self.subscribe_probability,
            self.ping_probability,
            self.hedge_probability,
            self.http_call_interval_ms_mean,
            self.reply_queue_batches_max,
            self.socket_window_frames,
            self.log_cache_bytes_max,
            self.log_index_stride_records,
            self.log_read_bytes_max,
            self.log_read_fault_probability,
            planted_names::join_all(self.planted, self.planted_glue),
        )
    }
}

/// The options for `seed`: drawn from their own RNG stream, so they are independent of the
/// run's draws and a planted bug can be added to them without changing them.
// Over 70 lines: one draw per option, in the order the seeds depend on.
pub fn swarm(seed: u64) -> SimOptions {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5357_4152_4d00_0000);
    let pick_f = |rng: &mut ChaCha8Rng, xs: &[f64]| xs[rng.random_range(0..xs.len())];
    let pick = |rng: &mut ChaCha8Rng, xs: &[u64]| xs[rng.random_range(0..xs.len())];
    let fsync_min = rng.random_range(0..=2);
    let segment = pick(&mut rng, &[1_024, 4_096, 16_384, 64 << 20]);
    let retention = match rng.random_range(0..3) {
        0 => segment * 3,
        1 => segment * 8,
        _ => RETENTION_OFF_BYTES,
    };
    let shards = rng.random_range(1..=3);
    let latency_min = rng.random_range(0..=2);
    // The limits are drawn into the options' fields, in the order they always were (so a
    // seed's options stay as they were), then checked as the node checks its own.
    let drawn = SimOptions {
        nodes: 1,
        shards,
        partitions: [shards, 4, 8][rng.random_range(0..3)],
        clients: rng.random_range(1..=6),
        binary_probability: pick_f(&mut rng, &[0.0, 0.5, 1.0]),
        duration_ms: 60_000,
        // Most seeds issue over a thousand requests: 1-6 clients of 120-800 each.
        client_ops_max: rng.random_range(120..=800),
        inflight_requests_max: rng.random_range(1..=6),
        session_inflight_requests_max: [1, 2, 1024][rng.random_range(0..3)],
        convs: rng.random_range(1..=3),
        fsync_latency_min_ms: fsync_min,
        fsync_latency_max_ms: fsync_min + rng.random_range(1..=12),
        net: NetOptions {
            latency_min_ms: latency_min,
            latency_max_ms: latency_min + rng.random_range(0..=6),
            latency_tail_probability: pick_f(&mut rng, &[0.0, 0.01, 0.05]),
            latency_tail_ms_max: pick(&mut rng, &[50, 400]),
            loss_probability: pick_f(&mut rng, &[0.0, 0.0, 0.01, 0.05]),
            duplicate_probability: pick_f(&mut rng, &[0.0, 0.01, 0.05]),
        },
        stream: StreamConfig::default(),
        think_time_max_ms: pick(&mut rng, &[0, 5, 20, 100]),
        // Every restart recovers (and audits) the whole WAL, which thousands of requests make
        // long: crash storms and failing writes are rarer than with tens of requests.
        crash_interval_ms_mean: pick(&mut rng, &[0, 30_000, 10_000, 3_000, 1_000]),
        restart_delay_ms_max: pick(&mut rng, &[0, 50, 1_000]),
        partition_interval_ms_mean: pick(&mut rng, &[0, 0, 10_000, 2_000]),
        partition_ms_max: pick(&mut rng, &[500, 6_000]),
        clog_interval_ms_mean: pick(&mut rng, &[0, 5_000, 1_000]),
        clog_ms_max: pick(&mut rng, &[100, 3_000]),
        disk_full_interval_ms_mean: pick(&mut rng, &[0, 0, 10_000]),
        disk_full_ms_max: pick(&mut rng, &[50, 1_000]),
        load_phase_ms_mean: pick(&mut rng, &[0, 3_000]),
        disconnect_interval_ms_mean: pick(&mut rng, &[0, 5_000, 500]),
        torn_write_probability: pick_f(&mut rng, &[0.0, 0.3, 0.7, 1.0]),
        tail_corruption_probability: pick_f(&mut rng, &[0.0, 0.3, 0.7]),
        read_corruption_probability: pick_f(&mut rng, &[0.0, 0.3, 0.7]),
        enospc_probability: pick_f(&mut rng, &[0.0, 0.0, 0.003, 0.01]),
        ack_probability: pick_f(&mut rng, &[0.2, 0.6, 1.0]),
        wal_segment_bytes_max: segment,
        retention_bytes_max: retention,
        wal_batch_bytes_max: [256, 4_096, 4 << 20][rng.random_range(0..3)],
        push_credit_frames_max: [2, 8, 1_024][rng.random_range(0..3)],
        drain_scan_entries_max: [3, 64, 4_096][rng.random_range(0..3)],
        pending_acks_max: [2, 16, 65_536][rng.random_range(0..3)],
        sync_after_recovery: true,
        planted: PlantedBugs::default(),
        planted_glue: PlantedGlueBugs::default(),
        // Drawn last, so that every earlier option of a seed is as it was before it existed.
        batch_in_probability: pick_f(&mut rng, &[0.0, 0.5, 1.0]),
        key_peer_probability: pick_f(&mut rng, &[0.0, 0.2, 0.6]),
        client_batch_probability: pick_f(&mut rng, &[0.0, 0.3, 0.8]),
        subscribe_probability: pick_f(&mut rng, &[0.0, 0.02, 0.1]),
        ping_probability: pick_f(&mut rng, &[0.0, 0.05, 0.2]),
        hedge_probability: pick_f(&mut rng, &[0.0, 0.02, 0.1]),
        http_call_interval_ms_mean: pick(&mut rng, &[0, 250, 1_000]),
        reply_queue_batches_max: [0, 0, 0, 2, 8][rng.random_range(0..5)],
        socket_window_frames: [8, 64, 1 << 16][rng.random_range(0..3)],
        log_cache_bytes_max: pick(&mut rng, &[0, 512, 65_536, 8 << 20]),
        log_index_stride_records: pick(&mut rng, &[1, 4, 256]),
        log_read_bytes_max: [4_096, 262_144][rng.random_range(0..2)],
        log_read_fault_probability: pick_f(&mut rng, &[0.0, 0.0, 0.01, 0.05]),
    };
    let limits = valid_limits(drawn.limits());
    drawn.with_limits(limits)
}

/// `drawn` if `Limits::validate` takes it, else `drawn` made valid without randomness (so
/// the seed still decides the run): each limit clamped into its range, then each relation
/// mended by raising the lower side (or, for what a session can be owed, lowering the push
/// credit and the in-flight limit).
pub fn valid_limits(drawn: Limits) -> Limits {
    if drawn.validate().is_ok() {
        return drawn;
    }
    let mut l = drawn;
    for e in drawn.entries() {
        if !e.range.contains(e.value) {
            l.set(e.key, e.value.clamp(e.range.min, e.range.max));
        }
    }
    l.partitions = l.partitions.max(l.shards);
    l.inbox_backlog_bytes_max = l.inbox_backlog_bytes_max.max(l.body_bytes_max() as u64);
    l.mesh_inbox_backlog_bytes_max = l
        .mesh_inbox_backlog_bytes_max
        .max(l.inbox_backlog_bytes_max);
    if l.validate().is_err() {
        let d = Limits::default();
        l.push_credit_frames_max = l.push_credit_frames_max.min(d.push_credit_frames_max);
        l.inflight_requests_max = l.inflight_requests_max.min(d.inflight_requests_max);
    }
    l
}

/// Planted bugs as a list of names in files and on the command line.
pub mod planted_names {
    use super::SimConfigError;
    use fabric_shard::PlantedBugs;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Every bug the shard core can plant, by name.
    pub const ALL: [&str; 9] = [
        "ack_before_fsync",
        "skip_crc_on_recovery",
        "lose_cursor_update",
        "cut_any_damage_in_newest_segment",
        "no_dir_fsync_on_segment_create",
        "trust_page_cache_after_failed_sync",
        "no_sync_after_recovery",
        "skip_crc_on_log_reads",
        "forget_sealed_send_keys",
    ];

    pub fn names(p: PlantedBugs) -> Vec<&'static str> {
        let on = [
            p.ack_before_fsync,
            p.skip_crc_on_recovery,
            p.lose_cursor_update,
            p.cut_any_damage_in_newest_segment,
            p.no_dir_fsync_on_segment_create,
            p.trust_page_cache_after_failed_sync,
            p.no_sync_after_recovery,
            p.skip_crc_on_log_reads,
            p.forget_sealed_send_keys,
        ];
        ALL.iter()
            .zip(on)
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect()
    }

    /// Both kinds of planted bugs, for the options line.
    pub fn join_all(p: PlantedBugs, g: fabric_router::host::PlantedGlueBugs) -> String {
        let mut n = names(p);
        n.extend(glue::names(g));
        if n.is_empty() {
            "none".into()
        } else {
            n.join(",")
        }
    }

    /// Turns on the core or host bug called `name`.
    pub fn plant_any(
        p: &mut PlantedBugs,
        g: &mut fabric_router::host::PlantedGlueBugs,
        name: &str,
    ) -> Result<(), SimConfigError> {
        if glue::ALL.contains(&name) {
            return glue::plant(g, name);
        }
        plant(p, name).map_err(|_| SimConfigError::UnknownBug {
            name: name.into(),
            known: format!("{}, {}", ALL.join(", "), glue::ALL.join(", ")),
        })
    }

    /// Bugs planted in the node's host (`fabric_router::host::PlantedGlueBugs`).
    pub mod glue {
        use fabric_router::host::PlantedGlueBugs;
        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        pub const ALL: [&str; 4] = [
            "glue_drop_reply_on_full_queue",
            "glue_restart_without_recovery",
            "glue_no_dir_fsync_on_segment_create",
            "glue_batch_drops_rest_under_backpressure",
        ];

        pub fn names(g: PlantedGlueBugs) -> Vec<&'static str> {
            let on = [
                g.glue_drop_reply_on_full_queue,
                g.glue_restart_without_recovery,
                g.glue_no_dir_fsync_on_segment_create,
                g.glue_batch_drops_rest_under_backpressure,
            ];
            ALL.iter()
                .zip(on)
                .filter(|(_, on)| *on)
                .map(|(n, _)| *n)
                .collect()
        }

        pub fn plant(
            g: &mut PlantedGlueBugs,
            name: &str,
        ) -> Result<(), crate::options::SimConfigError> {
            match name {
                "glue_drop_reply_on_full_queue" => g.glue_drop_reply_on_full_queue = true,
                "glue_restart_without_recovery" => g.glue_restart_without_recovery = true,
                "glue_no_dir_fsync_on_segment_create" => {
                    g.glue_no_dir_fsync_on_segment_create = true
                }
                "glue_batch_drops_rest_under_backpressure" => {
                    g.glue_batch_drops_rest_under_backpressure = true
                }
                other => {
                    return Err(crate::options::SimConfigError::UnknownBug {
                        name: other.into(),
                        known: ALL.join(", "),
                    })
                }
            }
            Ok(())
        }

        pub fn serialize<S: Serializer>(g: &PlantedGlueBugs, s: S) -> Result<S::Ok, S::Error> {
            names(*g).serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PlantedGlueBugs, D::Error> {
            let mut g = PlantedGlueBugs::default();
            for n in Vec::<String>::deserialize(d)? {
                plant(&mut g, &n).map_err(serde::de::Error::custom)?;
            }
            Ok(g)
        }
    }

    pub fn join(p: PlantedBugs) -> String {
        let n = names(p);
        if n.is_empty() {
            "none".into()
        } else {
            n.join(",")
        }
    }

    /// Turns on the bug called `name`.
    pub fn plant(p: &mut PlantedBugs, name: &str) -> Result<(), SimConfigError> {
        match name {
            "ack_before_fsync" => p.ack_before_fsync = true,
            "skip_crc_on_recovery" => p.skip_crc_on_recovery = true,
            "lose_cursor_update" => p.lose_cursor_update = true,
            "cut_any_damage_in_newest_segment" => p.cut_any_damage_in_newest_segment = true,
            "no_dir_fsync_on_segment_create" => p.no_dir_fsync_on_segment_create = true,
            "trust_page_cache_after_failed_sync" => p.trust_page_cache_after_failed_sync = true,
            "no_sync_after_recovery" => p.no_sync_after_recovery = true,
            "skip_crc_on_log_reads" => p.skip_crc_on_log_reads = true,
            "forget_sealed_send_keys" => p.forget_sealed_send_keys = true,
            "none" => {}
            other => {
                return Err(SimConfigError::UnknownBug {
                    name: other.into(),
                    known: ALL.join(", "),
                })
            }
        }
        Ok(())
    }

    pub fn serialize<S: Serializer>(p: &PlantedBugs, s: S) -> Result<S::Ok, S::Error> {
        names(*p).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PlantedBugs, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        let mut p = PlantedBugs::default();
        for n in names {
            plant(&mut p, &n).map_err(serde::de::Error::custom)?;
        }
        Ok(p)
    }
}

#[cfg(test)]
mod limits_tests {
    use super::*;

    #[test]
    fn every_swarm_draw_is_a_set_of_limits_a_node_would_take() {
        // Proves the swarm only runs limits `Limits::validate` accepts, that it needs no
        // mending for any seed (so each seed's options are what it drew), and that the shard
        // config comes from `Limits::shard_config`.
        for seed in 0..5_000 {
            let o = swarm(seed);
            o.validate().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert_eq!(valid_limits(o.limits()), o.limits(), "seed {seed}");
            let c = o.shard_config(1);
            let l = o.limits().shard_config(1);
            assert_eq!(c.body_bytes_max, l.body_bytes_max);
            assert_eq!(c.pending_acks_max, o.pending_acks_max);
        }
    }

    #[test]
    fn a_draw_that_breaks_the_rules_is_mended_deterministically() {
        // Proves `valid_limits` turns limits out of range or out of relation into valid ones,
        // the same every time (no randomness), keeping what was already valid.
        let broken = Limits {
            shards: 3,
            partitions: 2,
            wal_segment_bytes_max: 10,
            push_credit_frames_max: 0,
            inbox_backlog_bytes_max: 5,
            ..Limits::default()
        };
        assert!(broken.validate().is_err());
        let mended = valid_limits(broken);
        mended.validate().expect("mended");
        assert_eq!(mended, valid_limits(broken));
        assert_eq!((mended.shards, mended.partitions), (3, 3));
        assert_eq!(mended.wal_segment_bytes_max, 1024);
        assert_eq!(mended.push_credit_frames_max, 1);
        let huge = Limits {
            shards: 1024,
            partitions: 1024,
            push_credit_frames_max: u32::MAX,
            ..Limits::default()
        };
        valid_limits(huge).validate().expect("mended");
    }

    #[test]
    fn options_with_limits_a_node_refuses_are_refused() {
        // Proves a schedule file's options go through the node's rules too, naming both limits.
        let o = SimOptions {
            shards: 3,
            partitions: 3,
            push_credit_frames_max: u32::MAX,
            ..SimOptions::default()
        };
        let e = o.validate().expect_err("refused").to_string();
        assert!(
            e.contains("push_credit_frames_max 4294967295 x shards 3"),
            "{e}"
        );
    }
}
