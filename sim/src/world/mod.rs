//! The simulated world: its nodes (`options.nodes`, each the shared sans-IO host of its
//! shards, their disks, and the edge sessions and routers the glue keeps per connection), the
//! clients, each attached to a node, the network between them, and the event queue that moves
//! simulated time. Everything here is the glue's job done by hand, one thread, no I/O: the
//! decisions stay in the real cores.
//!
//! This file holds the world and its event loop; the rest is split by concern:
//!
//! - `event`: the queue's events and their order (and their part of the run's hash);
//! - `trace`: the run's trace (hash and lines);
//! - `links`: network wiring: packets between endpoints, the ends of connections taking them;
//! - `node`: a node and its glue (shard loops, session tasks, routers), and its setup;
//! - `storage`: a node's WAL writes, their faults, recovery from its disks;
//! - `client` and `workload`: the clients' connections, and what they ask for;
//! - `http`: the HTTP client beside each node;
//! - `audit`: the checks hooked into the world (frames leaving a shard, recovered shards,
//!   the final checks);
//! - `faults`: a schedule's events applied to the node, shard, link or client they name.

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
use fabric_proto::internal::{Output, Placement, Reply, Request, SessionId, ShardIdx, ShardOp};
use fabric_proto::{codec, Body, ClientOp, ErrorCode, ServerOp, Target};
use fabric_router::host::{
    CloseReason, Effect, ReadJob, RecoverJob, ShardDriver, Time, WriteJob, PUMP_BATCHES_MAX,
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

mod audit;
mod client;
mod event;
mod faults;
mod http;
mod links;
mod node;
mod storage;
mod trace;
mod workload;

use client::{Client, Req};
use event::{Event, Queued};
use http::HttpCall;
use node::{new_driver, ArmedFlip, Inflight, Node, NodeConn};
use trace::Trace;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Setup,
    Faults,
    Liveness,
}

/// Counters for the summary.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counters {
    pub(crate) events: u64,
    pub(crate) crashes: u64,
    pub(crate) restarts: u64,
    pub(crate) faults: u64,
    pub(crate) wal_writes: u64,
    pub(crate) log_reads: u64,
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
    nodes: Vec<Node>,
    net: Network,
    placement: Router,
    mesh_shard: ShardIdx,
    session_config: SessionConfig,
    /// Capacity of each session's reply queue (`SimOptions::reply_queue_batches_max`, or the
    /// node's rule).
    reply_queue_batches_max: usize,
    /// The node's own rule for that capacity, which holds from the liveness phase on.
    reply_queue_rule: usize,
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
                Node::new(n, &options, &placement, peers, mine)
            })
            .collect();
        let mesh_shard = placement
            .shard_of(Placement::Mesh(MESH))
            .expect("a mesh has a shard");
        let reply_queue_batches_max = reply_queue_batches_max(&options);
        let reply_queue_rule = reply_queue_rule(&options);
        // The node's derivation from the run's limits (`Limits::session_config`).
        let session_config = options.session_config();
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
            reply_queue_rule,
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
            log_reads: self.counters.log_reads,
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
            self.schedule_http_call(n);
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
        clients && self.nodes.iter().all(Node::quiescent)
    }

    fn pending_summary(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(Node::pending_summary).collect();
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

    pub(crate) fn faults_on(&self) -> bool {
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
            Event::ReadDone {
                node,
                shard,
                epoch,
                job,
            } => self.read_done(node, shard, epoch, job)?,
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
            Event::HttpCall { node } => self.http_call(node)?,
            Event::HttpTimeout { node, session } => self.http_timeout(node, session)?,
        }
        Ok(())
    }
}

/// Capacity of each session's reply queue during the fault phase: the options', or the
/// node's own rule.
fn reply_queue_batches_max(options: &SimOptions) -> usize {
    match options.reply_queue_batches_max {
        0 => reply_queue_rule(options),
        n => n,
    }
}

/// The node's rule for a session's reply queue (`session_reply_queue_batches_min`).
fn reply_queue_rule(options: &SimOptions) -> usize {
    fabric_router::host::session_reply_queue_batches_min(
        options.push_credit_frames_max,
        options.shards,
        options.session_inflight_requests_max,
    )
    .unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests;
