//! The simulated world: one node (its shards, their disks, the edge sessions and routers the
//! glue keeps per connection), the clients, the network between them, and the event queue that
//! moves simulated time. Everything here is the glue's job done by hand, one thread, no I/O:
//! the decisions stay in the real cores.

use crate::check::conn::ConnChecks;
use crate::check::durable::Durable;
use crate::check::{fail, Checked, Failure, Model, OpKind, ViolationKind};
use crate::disk::{CrashFaults, Disk, Fault};
use crate::net::{Closed, ConnId, Endpoint, Network, Segment, Stream};
use crate::options::{SimOptions, RETENTION_OFF_BYTES};
use crate::schedule::{FaultEvent, Schedule, Timed};
use crate::{
    Fnv, RunSummary, Violation, WorkloadStats, LIVENESS_BOUND_MS, RUN_EVENTS_MAX, TRACE_RING_LINES,
};
use bytes::Bytes;
use fabric_edge::{InFrame, OutFrame, Session, SessionConfig};
use fabric_proto::internal::{
    Output, Placement, Reply, Request, Route, SessionId, ShardIdx, ShardOp,
};
use fabric_proto::{codec, Body, ClientOp, ErrorCode, ServerOp, Target};
use fabric_router::host::{
    CloseReason, Effect, RecoverJob, ShardDriver, Time, WriteJob, PUMP_BATCHES_MAX,
};
use fabric_router::supervise::RestartPolicy;
use fabric_router::Router;
use fabric_shard::RecoverError;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::sync::Arc;

/// A trace line, formatted only if the run keeps lines.
macro_rules! trace {
    ($sim:expr, $($arg:tt)*) => {
        if $sim.trace.lines {
            let now = $sim.now;
            $sim.trace.line(now, format!($($arg)*));
        }
    };
}

mod client;
mod http;
mod links;
mod node;
mod storage;
mod workload;

use client::{Client, Req};
use http::HttpRead;
use node::{new_driver, ArmedFlip, Inflight, NodeConn};

pub(crate) use client::Action;

/// The mesh every simulated client belongs to.
pub const MESH: &str = "m";
/// Longest wait before a disconnected client reconnects, in ms.
const RECONNECT_DELAY_MAX_MS: u64 = 50;
/// Longest padding in a message body, in bytes (varies record sizes, so tears land anywhere).
const BODY_PAD_BYTES_MAX: usize = 160;
/// Rounds of shard-to-session-to-shard exchange one event may cause; more is a livelock.
const PUMP_ROUNDS_MAX: usize = 10_000;
/// Frame type bytes the simulated transport puts before each frame (WebSocket's opcodes).
const FRAME_TEXT: u8 = 0;
const FRAME_BINARY: u8 = 1;
/// The `ref` of the `options` a batching client sends before its hello (client refs start at 1).
const OPTIONS_REF: u64 = 0;
/// Most requests a client puts in one batch frame (its window bounds it too).
pub const CLIENT_BATCH_OPS_MAX: usize = 8;

/// Peer `i`'s groups in a swarm: `g0` for even peers, `g1` for every third (so some peers are
/// in both, some in neither).
#[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; the MSRV is 1.85
pub(crate) fn groups_of(i: usize) -> Vec<Arc<str>> {
    let mut g = Vec::new();
    if i % 2 == 0 {
        g.push(Arc::from("g0"));
    }
    if i % 3 == 0 {
        g.push(Arc::from("g1"));
    }
    g
}

/// Where `--trace` lines go.
pub(crate) type TraceSink = Box<dyn FnMut(&str) + Send>;

/// The run's trace. Its hash covers every event the run processes (its time, kind and ids:
/// `Event::hash_into`), whether or not lines are written, so a run has one hash with or
/// without `--trace`. Lines, which cost most of a fast run's time to format, are made only
/// for a sink (`--trace`) or for the ring of last lines a violation report carries; a fast
/// run that fails is run again with the ring on (`crate::run`), which determinism makes the
/// same run.
pub(crate) struct Trace {
    pub(crate) hash: Fnv,
    /// Whether lines are formatted at all.
    pub(crate) lines: bool,
    /// The last [`TRACE_RING_LINES`] lines, if kept.
    pub(crate) ring: Option<VecDeque<String>>,
    /// Every line also goes here (`fabric sim --trace`).
    pub(crate) sink: Option<TraceSink>,
}

impl Trace {
    fn line(&mut self, now: u64, text: String) {
        let line = format!("{now:>6}ms {text}");
        if let Some(sink) = &mut self.sink {
            sink(&line);
        }
        if let Some(ring) = &mut self.ring {
            if ring.len() == TRACE_RING_LINES {
                ring.pop_front();
            }
            ring.push_back(line);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Setup,
    Faults,
    Liveness,
}

#[derive(Debug)]
enum Event {
    Wake(usize),
    /// A packet of connection `conn` reaches `to` (from a client to its node, from a node to
    /// a client; a link between two nodes carries them too, once nodes talk to each other).
    Packet {
        from: Endpoint,
        to: Endpoint,
        conn: ConnId,
        seg: Segment,
    },
    NodeTimer {
        node: usize,
        conn: ConnId,
    },
    ClientTimer(usize, ConnId),
    WalDone {
        node: usize,
        shard: ShardIdx,
        write: u64,
    },
    /// The shard driver's timer (restart backoff, stall watchdog).
    ShardTimer {
        node: usize,
        shard: ShardIdx,
        epoch: u64,
    },
    Fault(FaultEvent),
    FaultsEnd,
    /// The HTTP client beside `node` reads a conversation.
    HttpRead {
        node: usize,
    },
}

/// An event in the queue. The heap pops the earliest first, and of events at the same time
/// the one queued first, so the order is a function of the run alone.
#[derive(Debug)]
struct Queued {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Queued) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Queued) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Queued) -> std::cmp::Ordering {
        // Reversed: `BinaryHeap` is a max-heap.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl Event {
    /// Feeds the event's kind and identity into the run's hash (`Trace`). An event at node
    /// 0 hashes as it did before events named their node, so a one-node run keeps its hash
    /// (and recorded hashes stay comparable); another node's events add its number last.
    fn hash_into(&self, h: &mut Fnv) {
        let mut put = |xs: &[u64]| {
            for x in xs {
                h.write(&x.to_le_bytes());
            }
        };
        let seg = |s: &Segment| match s {
            Segment::Data { seq, bytes } => [1, *seq, bytes.len() as u64],
            Segment::Ack { next } => [2, *next, 0],
            Segment::Ping => [3, 0, 0],
            Segment::Reset => [4, 0, 0],
        };
        let ends = |e: &Endpoint| match e {
            Endpoint::Node(n) => (0, u64::from(*n)),
            Endpoint::Client(c) => (1, u64::from(*c)),
        };
        let node = match self {
            Event::Wake(c) => {
                put(&[1, *c as u64]);
                0
            }
            Event::Packet {
                from,
                to,
                conn,
                seg: s,
            } => {
                let node = match (ends(from), ends(to)) {
                    ((1, c), (0, n)) => {
                        put(&[2, *conn, c]);
                        n
                    }
                    ((0, n), (1, c)) => {
                        put(&[3, *conn, c]);
                        n
                    }
                    // Between two nodes, or two clients (no such link is used yet).
                    ((k, a), (l, b)) => {
                        put(&[12, *conn, k, a, l, b]);
                        0
                    }
                };
                put(&seg(s));
                node
            }
            Event::NodeTimer { node, conn } => {
                put(&[4, *conn]);
                *node as u64
            }
            Event::ClientTimer(c, id) => {
                put(&[5, *c as u64, *id]);
                0
            }
            Event::WalDone { node, shard, write } => {
                put(&[6, u64::from(*shard), *write]);
                *node as u64
            }
            Event::ShardTimer { node, shard, epoch } => {
                put(&[7, u64::from(*shard), *epoch]);
                *node as u64
            }
            Event::Fault(f) => {
                put(&[8]);
                h.write(format!("{f:?}").as_bytes());
                return;
            }
            Event::FaultsEnd => {
                put(&[9]);
                0
            }
            Event::HttpRead { node } => {
                put(&[10]);
                *node as u64
            }
        };
        if node != 0 {
            put(&[11, node]);
        }
    }
}

/// Counters for the summary.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counters {
    pub(crate) events: u64,
    pub(crate) crashes: u64,
    pub(crate) restarts: u64,
    pub(crate) faults: u64,
    pub(crate) wal_writes: u64,
    pub(crate) connections: u64,
    pub(crate) workload: WorkloadStats,
}

/// One simulated cluster (one node for now) with its clients, checkers and event queue.
pub struct Simulation {
    seed: u64,
    pub(crate) options: SimOptions,
    rng: ChaCha8Rng,
    pub(crate) now: u64,
    /// Events by time, then by the order they were queued in (`Queued`'s order).
    queue: BinaryHeap<Queued>,
    next_event: u64,
    pub(crate) phase: Phase,
    deadline_ms: u64,
    /// One per node endpoint (`Endpoint::Node(i)` is `nodes[i]`): each its own hosts, disks,
    /// connections and checkers' view (see `node::Node`).
    nodes: Vec<node::Node>,
    net: Network,
    placement: Router,
    mesh_shard: ShardIdx,
    session_config: SessionConfig,
    /// Capacity of each session's reply queue (`SimOptions::reply_queue_batches_max`, or the
    /// node's rule).
    reply_queue_batches_max: usize,
    next_write: u64,
    /// Connection ids are unique over the run, across nodes (the network tells stray packets
    /// of old connections apart by them).
    next_conn: ConnId,
    pub(crate) clients: Vec<Client>,
    refs: BTreeMap<(ConnId, u64), Req>,
    pub(crate) trace: Trace,
    pub(crate) counters: Counters,
    /// The schedule this run applies (for writing out when it fails).
    schedule: Schedule,
    think_time_max_ms: u64,
    load_paused: bool,
    scripted: bool,
    /// The final checks passed.
    finished: bool,
}

impl Simulation {
    /// A random run of `seed`: the schedule is generated from the seed and the options.
    pub fn new(seed: u64, options: SimOptions) -> Simulation {
        let schedule = Schedule::generate(seed, &options);
        Simulation::from_schedule(schedule)
    }

    /// A run that applies `schedule` (a file's, or a generated one). Panics if the schedule
    /// does not validate; `Schedule::load` and `from_json` validate.
    pub fn from_schedule(schedule: Schedule) -> Simulation {
        let peers = (0..schedule.options.clients)
            .map(|i| (Arc::from(format!("p{i}")), groups_of(i)))
            .collect();
        Simulation::build(schedule, peers, false)
    }

    pub(crate) fn build(
        schedule: Schedule,
        peers: Vec<(Arc<str>, Vec<Arc<str>>)>,
        scripted: bool,
    ) -> Simulation {
        if let Err(why) = schedule.validate() {
            panic!("invalid schedule: {why}");
        }
        let seed = schedule.seed;
        let options = schedule.options.clone();
        let placement = Router::new(options.partitions, options.shards).expect("valid placement");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let nodes = options.nodes as usize;
        // Client `i` is attached to node `i % nodes` (all to node 0 with one node), in the
        // order of `peers`: their draws come in that order whatever the node count.
        let clients: Vec<Client> = peers
            .iter()
            .enumerate()
            .map(|(i, (peer, _))| {
                Client::new(peer, i % nodes, i / nodes, &options, scripted, &mut rng)
            })
            .collect();
        let nodes = (0..nodes)
            .map(|n| {
                let mine: Vec<usize> = (n..clients.len()).step_by(nodes).collect();
                let peers = mine.iter().map(|&i| peers[i].clone()).collect();
                node::Node::new(n, &options, &placement, peers, mine)
            })
            .collect();
        let mesh_shard = placement
            .shard_of(Placement::Mesh(MESH))
            .expect("a mesh has a shard");
        let reply_queue_batches_max = match options.reply_queue_batches_max {
            0 => fabric_router::host::session_reply_queue_batches_min(
                options.push_credit_frames_max,
                options.shards,
                options.session_inflight_requests_max,
            )
            .unwrap_or(usize::MAX),
            n => n,
        };
        let session_config = SessionConfig {
            inflight_requests_max: options.session_inflight_requests_max,
            ..SessionConfig::default()
        };
        Simulation {
            seed,
            rng,
            now: 0,
            queue: BinaryHeap::new(),
            next_event: 0,
            phase: Phase::Setup,
            deadline_ms: u64::MAX,
            nodes,
            net: Network::default(),
            placement,
            mesh_shard,
            session_config,
            reply_queue_batches_max,
            next_write: 0,
            next_conn: 1,
            clients,
            refs: BTreeMap::new(),
            trace: Trace {
                hash: Fnv::new(),
                lines: false,
                ring: None,
                sink: None,
            },
            counters: Counters::default(),
            think_time_max_ms: options.think_time_max_ms,
            load_paused: false,
            scripted,
            finished: false,
            schedule,
            options,
        }
    }

    /// Sends every trace line to `sink` as well (one line per event, with simulated time).
    pub fn with_trace(mut self, sink: impl FnMut(&str) + Send + 'static) -> Simulation {
        self.trace.sink = Some(Box::new(sink));
        self.trace.lines = true;
        self
    }

    /// Keeps the last [`TRACE_RING_LINES`] trace lines for a violation report (a run that
    /// does not keep them formats no lines, and is faster).
    pub fn keeping_last_events(mut self) -> Simulation {
        self.trace.ring = Some(VecDeque::with_capacity(TRACE_RING_LINES));
        self.trace.lines = true;
        self
    }

    /// The schedule this run applies.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Runs to the end: setup, the fault phase, the liveness phase, the final checks.
    pub fn run(mut self) -> Result<RunSummary, Box<Violation>> {
        let result = self.guard(|s| {
            s.start()?;
            s.run_until(u64::MAX)?;
            s.require_finished()
        });
        match result {
            Ok(()) => Ok(self.summary()),
            Err(v) => Err(v),
        }
    }

    pub(crate) fn summary(&self) -> RunSummary {
        RunSummary {
            seed: self.seed,
            trace_hash: self.trace.hash.0,
            sim_ms: self.now,
            events: self.counters.events,
            requests_acked: self.acks(),
            crashes: self.counters.crashes,
            restarts: self.counters.restarts,
            faults_injected: self.counters.faults,
            wal_writes: self.counters.wal_writes,
            connections: self.counters.connections,
            net: self.net.stats,
            workload: self.counters.workload,
        }
    }

    /// Runs `f`, turning a checker failure or a panic in a core into a violation.
    pub(crate) fn guard(
        &mut self,
        f: impl FnOnce(&mut Simulation) -> Checked,
    ) -> Result<(), Box<Violation>> {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        let failure = match result {
            Ok(Ok(())) => return Ok(()),
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
        Err(Box::new(Violation {
            seed: self.seed,
            kind: failure.kind,
            message: failure.message,
            options: self.options.to_string(),
            last_events: self
                .trace
                .ring
                .as_ref()
                .map_or_else(Vec::new, |r| r.iter().cloned().collect()),
            schedule: self.schedule.clone(),
        }))
    }

    fn schedule_at(&mut self, at: u64, event: Event) {
        self.queue.push(Queued {
            at,
            seq: self.next_event,
            event,
        });
        self.next_event += 1;
    }

    fn conv_shard(&self, conv: &str) -> ShardIdx {
        self.placement
            .shard_of(Placement::Conversation(MESH, conv))
            .expect("a conversation has a shard")
    }

    /// Setup (mesh and peers, without faults), then the fault phase begins: the schedule's
    /// events and its end are queued, and every client wakes.
    pub(crate) fn start(&mut self) -> Checked {
        trace!(self, "start seed={} {}", self.seed, self.options);
        self.setup()?;
        self.phase = Phase::Faults;
        let events: Vec<Timed> = self.schedule.events.clone();
        for t in events {
            self.schedule_at(t.at_ms, Event::Fault(t.event));
        }
        if !self.scripted {
            self.schedule_at(self.options.duration_ms, Event::FaultsEnd);
        }
        for n in 0..self.nodes.len() {
            self.schedule_http_read(n);
        }
        for c in 0..self.clients.len() {
            let delay = self.rng.random_range(0..=self.think_time_max_ms);
            self.wake(c, delay);
        }
        Ok(())
    }

    /// Processes events up to simulated time `until` (inclusive), or until the liveness phase
    /// finds everything quiet (then runs the final checks and returns).
    pub(crate) fn run_until(&mut self, until: u64) -> Checked {
        loop {
            if self.phase == Phase::Liveness && self.quiescent() {
                return self.finish();
            }
            let Some(next) = self.queue.peek() else {
                return Ok(());
            };
            let at = next.at;
            if at > until {
                self.now = self.now.max(until);
                return Ok(());
            }
            let event = self.queue.pop().expect("peeked").event;
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
            self.counters.events += 1;
            self.trace.hash.write(&at.to_le_bytes());
            event.hash_into(&mut self.trace.hash);
            if self.counters.events > RUN_EVENTS_MAX {
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
        }
    }

    /// Ends the fault phase now: everything heals, every client reconnects and drains.
    pub(crate) fn end_faults(&mut self) -> Checked {
        if self.phase == Phase::Liveness {
            return Ok(());
        }
        self.phase = Phase::Liveness;
        self.deadline_ms = self.now + LIVENESS_BOUND_MS;
        trace!(
            self,
            "faults end: the network and disks heal, every client reconnects and drains"
        );
        self.net.heal();
        for n in 0..self.nodes.len() {
            for h in &mut self.nodes[n].hosts {
                h.disk_full = false;
                h.flip = None;
            }
            if !self.nodes[n].up {
                self.restart_node(n)?;
            }
        }
        for c in 0..self.clients.len() {
            self.clients[c].online = true;
            self.drop_conn(c);
        }
        Ok(())
    }

    /// Nothing left to do: every client is welcomed with nothing in flight and everything it
    /// received acknowledged, no data is unacknowledged on any connection, and every shard is
    /// idle.
    fn quiescent(&self) -> bool {
        let clients = self.clients.iter().all(|c| {
            c.inflight.is_empty()
                && c.retry.is_empty()
                && c.script.is_empty()
                && c.acked_sent >= c.max_received
                && c.conn
                    .as_ref()
                    .is_some_and(|k| k.welcomed && k.stream.unacked() == 0)
        });
        clients && self.nodes.iter().all(node::Node::quiescent)
    }

    fn pending_summary(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(node::Node::pending_summary).collect();
        let clients: Vec<String> = self
            .clients
            .iter()
            .map(|c| {
                format!(
                    "{} conn={:?} welcomed={} inflight={:?} retry={:?} received={} acked={}",
                    c.peer,
                    c.conn.as_ref().map(|k| k.id),
                    c.conn.as_ref().is_some_and(|k| k.welcomed),
                    c.inflight,
                    c.retry,
                    c.max_received,
                    c.acked_sent
                )
            })
            .collect();
        format!("{}; clients: {}", nodes.join("; "), clients.join("; "))
    }

    /// Requests acknowledged so far, on every node.
    pub(crate) fn acks(&self) -> u64 {
        self.nodes.iter().map(|n| n.model.acks()).sum()
    }

    /// A run whose queue ran dry before it became quiet stalled.
    pub(crate) fn require_finished(&self) -> Checked {
        if self.finished {
            return Ok(());
        }
        fail(
            ViolationKind::Liveness,
            format!(
                "the run stalled in the {:?} phase: {}",
                self.phase,
                self.pending_summary()
            ),
        )
    }

    /// Adds an event applied now to the run's schedule (scripted runs).
    pub(crate) fn record(&mut self, event: FaultEvent) {
        self.schedule.events.push(Timed {
            at_ms: self.now,
            event,
        });
    }

    /// Checker 9 on node `n`, once everything is quiet: no shard holds state for a session
    /// the node no longer has (every session that ends tells every shard `Closed`, through
    /// its router).
    fn check_no_leaked_sessions(&self, n: usize) -> Checked {
        let node = &self.nodes[n];
        for (s, h) in node.hosts.iter().enumerate() {
            if let Some(id) = h
                .driver
                .shard()
                .map(|x| x.session_ids())
                .unwrap_or_default()
                .into_iter()
                .find(|id| !node.sessions.contains_key(id))
            {
                return fail(
                    ViolationKind::LeakedSession,
                    format!("n{n} s{s} holds state for session {id}, which the node closed"),
                );
            }
        }
        Ok(())
    }

    /// The final checks once everything is quiet (checkers 3 and 9), node by node.
    fn finish(&mut self) -> Checked {
        for n in 0..self.nodes.len() {
            self.nodes[n].model.final_delivery()?;
            self.check_no_leaked_sessions(n)?;
        }
        self.finished = true;
        trace!(
            self,
            "end acked={} crashes={} restarts={} faults={} connections={}",
            self.acks(),
            self.counters.crashes,
            self.counters.restarts,
            self.counters.faults,
            self.counters.connections
        );
        Ok(())
    }

    /// Creates each node's mesh and its peers on the mesh's shard, without faults.
    fn setup(&mut self) -> Checked {
        for n in 0..self.nodes.len() {
            self.setup_node(n)?;
        }
        Ok(())
    }

    /// Creates node `n`'s mesh and the peers of its clients.
    fn setup_node(&mut self, n: usize) -> Checked {
        let node = &mut self.nodes[n];
        let admin = node.next_session;
        node.next_session += 1;
        let mut ops = vec![ShardOp::CreateMesh {
            r: 0,
            mesh: MESH.into(),
        }];
        for (i, &c) in node.clients.iter().enumerate() {
            let c = &self.clients[c];
            ops.push(ShardOp::AddPeer {
                r: i as u64 + 1,
                mesh: MESH.into(),
                peer: c.peer.clone(),
                groups: node.model.groups[i].clone(),
                token_hash: Some(fabric_shard::token_hash(&c.token)),
                public_key: c.key.as_ref().map(|k| k.verifying_key().to_bytes()),
            });
        }
        let want = ops.len();
        // Every shard recovers its (empty) disk, as a node does when it starts.
        for shard in 0..self.nodes[n].hosts.len() as ShardIdx {
            self.setup_effects(n, shard, admin)?;
        }
        // One admin call per batch, as the node's HTTP admin path sends them, and only while
        // the shard wants input.
        let mut oks = 0;
        let shard = self.mesh_shard;
        for op in ops {
            let t = self.time();
            let batch = vec![Request { session: admin, op }];
            self.nodes[n].hosts[shard as usize]
                .driver
                .handle_batch(t, admin, batch);
            oks += self.setup_effects(n, shard, admin)?;
        }
        if oks != want {
            return fail(
                ViolationKind::Liveness,
                format!("n{n} setup got {oks} of {want} oks"),
            );
        }
        trace!(
            self,
            "setup done: mesh {MESH} on shard {} with {} peers{}",
            self.mesh_shard,
            self.nodes[n].clients.len(),
            if n > 0 {
                format!(" on n{n}")
            } else {
                String::new()
            }
        );
        Ok(())
    }

    /// Performs a shard driver's effects at once, without faults (setup); returns the `ok`s.
    fn setup_effects(&mut self, n: usize, shard: ShardIdx, admin: SessionId) -> Checked<usize> {
        let mut oks = 0;
        let t = self.time();
        let host = &mut self.nodes[n].hosts[shard as usize];
        while let Some(e) = host.driver.poll_effect() {
            match e {
                Effect::Write(w) => {
                    let r = w.perform(&mut host.disk);
                    if let Err(f) = &r {
                        return fail(
                            ViolationKind::Liveness,
                            format!("setup write failed: {f:?}"),
                        );
                    }
                    self.counters.wal_writes += 1;
                    host.driver.handle_write_done(t, r);
                }
                Effect::Recover(job) => {
                    let r = job.perform(&mut host.disk);
                    host.driver.handle_recovered(t, r);
                }
                Effect::Replies { session, replies } if session == admin => {
                    for r in replies {
                        match r {
                            Reply::Frame(ServerOp::Ok { .. }) => oks += 1,
                            r => {
                                return fail(
                                    ViolationKind::UnexpectedReply,
                                    format!("setup got {r:?}"),
                                )
                            }
                        }
                    }
                }
                e => return fail(ViolationKind::UnexpectedReply, format!("setup got {e:?}")),
            }
        }
        Ok(oks)
    }

    /// The simulated clock as the host reads it: one clock serves as wall and monotonic time
    /// (every node reads the same clock: the simulator has no clock skew yet).
    pub(super) fn time(&self) -> Time {
        Time {
            unix_ms: self.now,
            mono_ms: self.now,
        }
    }

    pub(crate) fn wake(&mut self, c: usize, delay: u64) {
        if !self.clients[c].wake_pending {
            self.clients[c].wake_pending = true;
            self.schedule_at(self.now + delay, Event::Wake(c));
        }
    }

    fn faults_on(&self) -> bool {
        self.phase == Phase::Faults
    }

    fn handle(&mut self, event: Event) -> Checked {
        match event {
            Event::Wake(c) => {
                self.clients[c].wake_pending = false;
                self.client_wake(c)?;
            }
            Event::Packet {
                from,
                to,
                conn,
                seg,
            } => self.deliver(from, to, conn, seg)?,
            Event::NodeTimer { node, conn } => {
                let node = &mut self.nodes[node];
                if let Some(k) = node.conns.get_mut(&conn) {
                    k.timer_at = None;
                    k.stream.handle_timeout(self.now);
                    k.session.handle_timeout(self.now);
                    node.dirty.insert(conn);
                }
            }
            Event::ClientTimer(c, id) => {
                let now = self.now;
                if let Some(k) = self.clients[c].conn.as_mut().filter(|k| k.id == id) {
                    k.timer_at = None;
                    k.stream.handle_timeout(now);
                    self.pump_client(c)?;
                }
            }
            Event::WalDone { node, shard, write } => self.wal_done(node, shard, write)?,
            Event::ShardTimer { node, shard, epoch } => {
                let t = self.time();
                let node = &mut self.nodes[node];
                let h = &mut node.hosts[shard as usize];
                if node.up && epoch == h.epoch {
                    h.timer_at = None;
                    h.driver.handle_timeout(t);
                }
            }
            Event::Fault(f) => self.apply(f)?,
            Event::FaultsEnd => self.end_faults()?,
            Event::HttpRead { node } => self.http_read(node),
        }
        Ok(())
    }

    /// One schedule event.
    pub(crate) fn apply(&mut self, event: FaultEvent) -> Checked {
        if self.phase != Phase::Faults {
            return Ok(());
        }
        trace!(self, "FAULT {event:?}");
        match event {
            FaultEvent::Kill { node } => self.kill(node as usize, false)?,
            FaultEvent::Crash { node } => self.kill(node as usize, true)?,
            FaultEvent::Restart { node } => {
                if !self.nodes[node as usize].up {
                    self.restart_node(node as usize)?;
                }
            }
            FaultEvent::Partition { a, b, one_way } => {
                self.counters.faults += 1;
                self.net.partition(&a, &b, one_way);
            }
            FaultEvent::Heal => self.net.heal(),
            FaultEvent::Clog { from, to, ms } => {
                self.counters.faults += 1;
                self.net.clog(from, to, self.now + ms);
            }
            FaultEvent::CorruptRead {
                node,
                shard,
                segment,
                offset_min,
                offset_max,
            } => {
                self.nodes[node as usize].hosts[shard as usize].flip = Some(ArmedFlip {
                    segment,
                    offset_min,
                    offset_max,
                });
            }
            FaultEvent::DiskFull { node, shard } => {
                self.counters.faults += 1;
                self.nodes[node as usize].hosts[shard as usize].disk_full = true;
            }
            FaultEvent::DiskFree { node, shard } => {
                self.nodes[node as usize].hosts[shard as usize].disk_full = false;
            }
            FaultEvent::Load {
                think_time_max_ms,
                paused,
            } => {
                self.think_time_max_ms = think_time_max_ms;
                self.load_paused = paused;
                for c in 0..self.clients.len() {
                    self.wake(c, 0);
                }
            }
            FaultEvent::Disconnect { client } => self.drop_conn(client as usize),
        }
        Ok(())
    }

    /// Node `n` goes down (power loss if `power_loss`, else its process only), if it is up;
    /// its HTTP requests in progress fail with it.
    fn kill(&mut self, n: usize, power_loss: bool) -> Checked {
        if self.nodes[n].up {
            self.crash_process(n, power_loss)?;
            self.nodes[n].http.clear();
        }
        Ok(())
    }
}

/// A frame for the simulated socket: its type byte, then its bytes.
fn frame_bytes(f: &OutFrame) -> Bytes {
    let mut b = Vec::with_capacity(f.bytes.len() + 1);
    b.push(if f.binary { FRAME_BINARY } else { FRAME_TEXT });
    b.extend_from_slice(&f.bytes);
    Bytes::from(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A calm run of one client and no scheduled faults.
    fn calm(seed: u64) -> Simulation {
        let options = SimOptions {
            clients: 1,
            ..SimOptions::default()
        };
        Simulation::from_schedule(Schedule {
            seed,
            options,
            events: Vec::new(),
        })
    }

    fn hello_frame(sim: &Simulation) -> Bytes {
        let mut b = vec![FRAME_TEXT];
        let hello = ClientOp::Hello {
            mesh: MESH.into(),
            peer: sim.clients[0].peer.clone(),
            token: sim.clients[0].token.clone(),
        };
        codec::encode_client_json(&hello, &mut b);
        Bytes::from(b)
    }

    fn resets_queued(sim: &Simulation, id: ConnId) -> usize {
        sim.queue
            .iter()
            .map(|q| &q.event)
            .filter(|e| matches!(e, Event::Packet { conn, seg: Segment::Reset, .. } if *conn == id))
            .count()
    }

    #[test]
    fn a_rebooted_node_resets_an_old_connection_and_accepts_a_new_one() {
        // Proves the network model is faithful across a reboot: a stray first packet of a
        // connection the node had accepted before the crash gets a reset (it would otherwise
        // reopen the connection with its sequence numbers starting over and replay its
        // requests), while a connection whose first packet never reached the node still opens.
        let mut sim = calm(1);
        sim.start().unwrap();
        sim.run_until(500).unwrap();
        let old = sim.clients[0].conn.as_ref().expect("connected").id;
        assert!(
            sim.nodes[0].conns.contains_key(&old),
            "the node accepted it"
        );
        sim.crash(0).unwrap();
        sim.restart_node(0).unwrap();
        let hello = hello_frame(&sim);
        let seg = Segment::Data {
            seq: 0,
            bytes: hello.clone(),
        };
        sim.node_packet(0, old, 0, seg.clone());
        assert!(
            !sim.nodes[0].conns.contains_key(&old),
            "an old connection reopened"
        );
        assert_eq!(resets_queued(&sim, old), 1);
        let fresh = sim.next_conn;
        sim.next_conn += 1;
        sim.node_packet(0, fresh, 0, seg);
        assert!(
            sim.nodes[0].conns.contains_key(&fresh),
            "a new connection was refused"
        );
        assert_eq!(resets_queued(&sim, fresh), 0);
    }

    #[test]
    fn a_shard_holding_a_closed_session_is_a_leak() {
        // Proves checker 9 can fail: after a calm run ends with every promise kept, a shard
        // that holds state for a session the node no longer has (a subscription whose
        // `Closed` never reached it) is reported as a leaked session.
        let mut sim = calm(2);
        sim.start().unwrap();
        sim.run_until(2_000).unwrap();
        sim.end_faults().unwrap();
        sim.run_until(u64::MAX).unwrap();
        sim.require_finished().unwrap();
        sim.check_no_leaked_sessions(0).unwrap();
        let gone = sim.nodes[0].next_session + 1_000;
        let subscribe = ShardOp::Subscribe {
            r: 1,
            mesh: MESH.into(),
            conv: "c0".into(),
            from: 1,
        };
        let now = sim.now;
        sim.nodes[0].hosts[0]
            .driver
            .shard_mut()
            .unwrap()
            .handle_requests(
                now,
                [Request {
                    session: gone,
                    op: subscribe,
                }],
            );
        let e = sim.check_no_leaked_sessions(0).unwrap_err();
        assert_eq!(e.kind, ViolationKind::LeakedSession, "{e:?}");
    }
}
