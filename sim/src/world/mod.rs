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

use http::HttpRead;

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

/// What a scripted client does next (see `crate::script`).
#[derive(Debug, Clone)]
pub(crate) enum Action {
    Send {
        to: Target,
        body: String,
    },
    Append {
        conv: Arc<str>,
        body: String,
        key: Option<Arc<str>>,
    },
}

/// A request a client waits for an answer to, by its ref.
#[derive(Debug, Clone)]
enum Req {
    /// A send or append; `ordered` if the ordering checker follows its answer (sends, and
    /// first attempts of appends).
    Op {
        op: usize,
        ordered: bool,
    },
    Subscribe {
        conv: Arc<str>,
    },
    Unsubscribe {
        conv: Arc<str>,
    },
}

#[derive(Debug)]
struct ClientConn {
    id: ConnId,
    stream: Stream,
    welcomed: bool,
    /// A key hello waits for the session's challenge nonce.
    awaiting_challenge: bool,
    timer_at: Option<u64>,
    /// Checker 8: the ordering promises on this connection.
    checks: ConnChecks,
}

#[derive(Debug)]
pub(crate) struct Client {
    pub(crate) peer: Arc<str>,
    token: String,
    /// A key peer's signing key: it says key hellos.
    key: Option<ed25519_dalek::SigningKey>,
    binary: bool,
    /// Server ops per frame this client asks for with `options` before each hello (0: none).
    batch_in: u32,
    conn: Option<ClientConn>,
    next_r: u64,
    /// Ref -> request, on the current connection.
    inflight: BTreeMap<u64, Req>,
    retry: VecDeque<usize>,
    ops_left: u32,
    pub(crate) script: VecDeque<Action>,
    /// False while the client stays away (scripted `go_offline`).
    pub(crate) online: bool,
    max_received: u64,
    acked_sent: u64,
    /// Inbox messages received, once per position: sender, target, body.
    pub(crate) received: BTreeMap<u64, (Arc<str>, Target, Body)>,
    wake_pending: bool,
    /// After an `unavailable` or a lost connection, the client waits until this time.
    backoff_until_ms: u64,
    /// The last event seq received per conversation: a new subscription starts after it.
    last_event: BTreeMap<Arc<str>, u64>,
}

/// A connection as the node's glue holds it: the socket (stream), the session core, and the
/// session's router.
#[derive(Debug)]
struct NodeConn {
    client: usize,
    stream: Stream,
    session: Session,
    router: Router,
    timer_at: Option<u64>,
    /// The session's reply queue (the node's bounded channel from the shards), in batches.
    replies: VecDeque<(ShardIdx, Vec<Reply>)>,
}

#[derive(Debug)]
struct Inflight {
    id: u64,
    write: WriteJob,
    /// The acks taken in before the write was polled (checker 6), for the mesh's shard.
    acks: Vec<u64>,
}

/// Where the next recovery of a shard reads a flipped bit.
#[derive(Debug, Clone, Copy)]
struct ArmedFlip {
    segment: Option<u64>,
    offset_min: Option<u64>,
    offset_max: Option<u64>,
}

/// What a shard's host hands the simulated node, in order.
#[derive(Debug)]
pub(super) enum HostOut {
    Replies(SessionId, Vec<Reply>),
    Close(SessionId, CloseReason),
}

/// One shard of the node: the node's own host (`fabric_router::host::ShardDriver`) and what the
/// simulated glue around it keeps.
struct Host {
    driver: ShardDriver,
    disk: Disk,
    /// Bumped by every restart; a timer for an older incarnation is stale.
    epoch: u64,
    inflight: Option<Inflight>,
    /// The glue's input channel: request batches, one per router hand-off, left there while
    /// the shard wants no input (backpressure).
    input: VecDeque<Vec<Request>>,
    disk_full: bool,
    flip: Option<ArmedFlip>,
    /// When the driver's next timer is scheduled (monotonic ms), if one is.
    timer_at: Option<u64>,
}

#[derive(Debug)]
enum Event {
    Wake(usize),
    ToNode {
        conn: ConnId,
        client: usize,
        seg: Segment,
    },
    ToClient {
        client: usize,
        conn: ConnId,
        seg: Segment,
    },
    NodeTimer(ConnId),
    ClientTimer(usize, ConnId),
    WalDone {
        shard: ShardIdx,
        write: u64,
    },
    /// The shard driver's timer (restart backoff, stall watchdog).
    ShardTimer {
        shard: ShardIdx,
        epoch: u64,
    },
    Fault(FaultEvent),
    FaultsEnd,
    /// An HTTP client reads a conversation.
    HttpRead,
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
    /// Feeds the event's kind and identity into the run's hash (`Trace`).
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
        match self {
            Event::Wake(c) => put(&[1, *c as u64]),
            Event::ToNode {
                conn,
                client,
                seg: s,
            } => {
                put(&[2, *conn, *client as u64]);
                put(&seg(s));
            }
            Event::ToClient {
                client,
                conn,
                seg: s,
            } => {
                put(&[3, *conn, *client as u64]);
                put(&seg(s));
            }
            Event::NodeTimer(id) => put(&[4, *id]),
            Event::ClientTimer(c, id) => put(&[5, *c as u64, *id]),
            Event::WalDone { shard, write } => put(&[6, u64::from(*shard), *write]),
            Event::ShardTimer { shard, epoch } => put(&[7, u64::from(*shard), *epoch]),
            Event::Fault(f) => {
                put(&[8]);
                h.write(format!("{f:?}").as_bytes());
            }
            Event::FaultsEnd => put(&[9]),
            Event::HttpRead => put(&[10]),
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
    node_up: bool,
    hosts: Vec<Host>,
    conns: BTreeMap<ConnId, NodeConn>,
    sessions: BTreeMap<SessionId, ConnId>,
    /// Every connection the node ever accepted, in any incarnation. It stands for what the
    /// client's end of a real connection knows and a reboot does not erase: the connection is
    /// established and its sequence numbers are in use. A rebooted node has no socket for it,
    /// so its stray packets (a retransmission, or a delayed or duplicated first packet) get a
    /// reset, as from a real stack: TCP never accepts a mid-stream segment as a new connection,
    /// and answers an old SYN with a SYN-ACK the client refuses. A connection whose first
    /// packet never reached the node may still open after a reboot (its handshake simply
    /// completes then). Forgetting this on `crash()` let an old connection reopen on the
    /// rebooted node with its sequence numbers starting over, replaying its hello and requests
    /// (swarm seeds 1335, 1346, 8383, 12983, 19926, 21929, 25111, 25749, 26067, 29274).
    known_conns: BTreeSet<ConnId>,
    dirty: BTreeSet<ConnId>,
    net: Network,
    placement: Router,
    mesh_shard: ShardIdx,
    session_config: SessionConfig,
    /// Capacity of each session's reply queue (`SimOptions::reply_queue_batches_max`, or the
    /// node's rule).
    reply_queue_batches_max: usize,
    next_write: u64,
    next_conn: ConnId,
    next_session: SessionId,
    pub(crate) clients: Vec<Client>,
    refs: BTreeMap<(ConnId, u64), Req>,
    /// Checker 7's oracle: what the disks hold synced.
    durable: Durable,
    /// HTTP reads in progress, by their session, and the router they go through.
    http: BTreeMap<SessionId, HttpRead>,
    http_router: Router,
    probe: Option<SessionId>,
    pub(crate) model: Model,
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
        let clients: Vec<Client> = peers
            .iter()
            .map(|(peer, _)| Client {
                peer: peer.clone(),
                token: format!("tok-{peer}"),
                key: rng
                    .random_bool(options.key_peer_probability)
                    .then(|| ed25519_dalek::SigningKey::from_bytes(&rng.random())),
                binary: rng.random_bool(options.binary_probability),
                batch_in: if rng.random_bool(options.batch_in_probability) {
                    [2, 3, 64][rng.random_range(0..3)]
                } else {
                    0
                },
                conn: None,
                next_r: 1,
                inflight: BTreeMap::new(),
                retry: VecDeque::new(),
                ops_left: if scripted { 0 } else { options.client_ops_max },
                script: VecDeque::new(),
                online: true,
                max_received: 0,
                acked_sent: 0,
                received: BTreeMap::new(),
                wake_pending: false,
                backoff_until_ms: 0,
                last_event: BTreeMap::new(),
            })
            .collect();
        let names = peers.iter().map(|(p, _)| p.clone()).collect();
        let groups = peers.iter().map(|(_, g)| g.clone()).collect();
        let retention = options.retention_bytes_max < RETENTION_OFF_BYTES;
        let hosts = (0..options.shards)
            .map(|s| Host {
                driver: new_driver(&options, s),
                disk: Disk::new(s),
                epoch: 0,
                inflight: None,
                input: VecDeque::new(),
                disk_full: false,
                flip: None,
                timer_at: None,
            })
            .collect();
        let http_router = placement.clone();
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
            node_up: true,
            hosts,
            conns: BTreeMap::new(),
            sessions: BTreeMap::new(),
            known_conns: BTreeSet::new(),
            dirty: BTreeSet::new(),
            net: Network::default(),
            placement,
            mesh_shard,
            session_config,
            reply_queue_batches_max,
            next_write: 0,
            next_conn: 1,
            next_session: 1,
            clients,
            refs: BTreeMap::new(),
            durable: Durable::new(options.shards as usize),
            http: BTreeMap::new(),
            http_router,
            probe: None,
            model: Model::new(names, groups, retention),
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
            requests_acked: self.model.acks(),
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
        self.schedule_http_read();
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
        for h in &mut self.hosts {
            h.disk_full = false;
            h.flip = None;
        }
        if !self.node_up {
            self.restart_node()?;
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
        clients
            && self.node_up
            && self.http.is_empty()
            && self
                .hosts
                .iter()
                .all(|h| h.driver.is_idle() && h.input.is_empty() && h.inflight.is_none())
            && self.conns.values().all(|k| k.stream.unacked() == 0)
    }

    fn pending_summary(&self) -> String {
        let shards: Vec<String> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(s, h)| {
                format!(
                    "s{s} idle={} status={:?} input={} writing={}",
                    h.driver.is_idle(),
                    h.driver.status(),
                    h.input.len(),
                    h.inflight.is_some()
                )
            })
            .collect();
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
        format!(
            "node_up={} {}; clients: {}",
            self.node_up,
            shards.join(", "),
            clients.join("; ")
        )
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

    /// Checker 9, once everything is quiet: no shard holds state for a session the node no
    /// longer has (every session that ends tells every shard `Closed`, through its router).
    fn check_no_leaked_sessions(&self) -> Checked {
        for (s, h) in self.hosts.iter().enumerate() {
            if let Some(id) = h
                .driver
                .shard()
                .map(|x| x.session_ids())
                .unwrap_or_default()
                .into_iter()
                .find(|id| !self.sessions.contains_key(id))
            {
                return fail(
                    ViolationKind::LeakedSession,
                    format!("s{s} holds state for session {id}, which the node closed"),
                );
            }
        }
        Ok(())
    }

    /// The final checks once everything is quiet (checkers 3 and 9).
    fn finish(&mut self) -> Checked {
        self.model.final_delivery()?;
        self.check_no_leaked_sessions()?;
        self.finished = true;
        trace!(
            self,
            "end acked={} crashes={} restarts={} faults={} connections={}",
            self.model.acks(),
            self.counters.crashes,
            self.counters.restarts,
            self.counters.faults,
            self.counters.connections
        );
        Ok(())
    }

    /// Creates the mesh and its peers on the mesh's shard, without faults.
    fn setup(&mut self) -> Checked {
        let admin = self.next_session;
        self.next_session += 1;
        let mut ops = vec![ShardOp::CreateMesh {
            r: 0,
            mesh: MESH.into(),
        }];
        for (i, c) in self.clients.iter().enumerate() {
            ops.push(ShardOp::AddPeer {
                r: i as u64 + 1,
                mesh: MESH.into(),
                peer: c.peer.clone(),
                groups: self.model.groups[i].clone(),
                token_hash: Some(fabric_shard::token_hash(&c.token)),
                public_key: c.key.as_ref().map(|k| k.verifying_key().to_bytes()),
            });
        }
        let want = ops.len();
        // Every shard recovers its (empty) disk, as a node does when it starts.
        for shard in 0..self.hosts.len() as ShardIdx {
            self.setup_effects(shard, admin)?;
        }
        // One admin call per batch, as the node's HTTP admin path sends them, and only while
        // the shard wants input.
        let mut oks = 0;
        let shard = self.mesh_shard;
        for op in ops {
            let t = self.time();
            let batch = vec![Request { session: admin, op }];
            self.hosts[shard as usize]
                .driver
                .handle_batch(t, admin, batch);
            oks += self.setup_effects(shard, admin)?;
        }
        if oks != want {
            return fail(
                ViolationKind::Liveness,
                format!("setup got {oks} of {want} oks"),
            );
        }
        trace!(
            self,
            "setup done: mesh {MESH} on shard {} with {} peers",
            self.mesh_shard,
            self.clients.len()
        );
        Ok(())
    }

    /// Performs a shard driver's effects at once, without faults (setup); returns the `ok`s.
    fn setup_effects(&mut self, shard: ShardIdx, admin: SessionId) -> Checked<usize> {
        let mut oks = 0;
        let t = self.time();
        let host = &mut self.hosts[shard as usize];
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

    /// The simulated clock as the host reads it: one clock serves as wall and monotonic time.
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
            Event::ToNode { conn, client, seg } => self.node_packet(conn, client, seg),
            Event::ToClient { client, conn, seg } => self.client_packet(client, conn, seg)?,
            Event::NodeTimer(id) => {
                if let Some(k) = self.conns.get_mut(&id) {
                    k.timer_at = None;
                    k.stream.handle_timeout(self.now);
                    k.session.handle_timeout(self.now);
                    self.dirty.insert(id);
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
            Event::WalDone { shard, write } => self.wal_done(shard, write)?,
            Event::ShardTimer { shard, epoch } => {
                let h = &mut self.hosts[shard as usize];
                if self.node_up && epoch == h.epoch {
                    h.timer_at = None;
                    let t = self.time();
                    self.hosts[shard as usize].driver.handle_timeout(t);
                }
            }
            Event::Fault(f) => self.apply(f)?,
            Event::FaultsEnd => self.end_faults()?,
            Event::HttpRead => self.http_read(),
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
            FaultEvent::Kill { .. } => {
                if self.node_up {
                    self.crash_process(false)?;
                    self.http.clear();
                }
            }
            FaultEvent::Crash { .. } => {
                if self.node_up {
                    self.crash()?;
                    // HTTP requests in progress fail with the node.
                    self.http.clear();
                }
            }
            FaultEvent::Restart { .. } => {
                if !self.node_up {
                    self.restart_node()?;
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
                shard,
                segment,
                offset_min,
                offset_max,
                ..
            } => {
                self.hosts[shard as usize].flip = Some(ArmedFlip {
                    segment,
                    offset_min,
                    offset_max,
                });
            }
            FaultEvent::DiskFull { shard, .. } => {
                self.counters.faults += 1;
                self.hosts[shard as usize].disk_full = true;
            }
            FaultEvent::DiskFree { shard, .. } => self.hosts[shard as usize].disk_full = false,
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
}

/// A frame for the simulated socket: its type byte, then its bytes.
fn frame_bytes(f: &OutFrame) -> Bytes {
    let mut b = Vec::with_capacity(f.bytes.len() + 1);
    b.push(if f.binary { FRAME_BINARY } else { FRAME_TEXT });
    b.extend_from_slice(&f.bytes);
    Bytes::from(b)
}

/// A shard's host as the node builds it (its restart policy, input bound and stall limit),
/// with the run's planted host bugs.
pub(super) fn new_driver(options: &SimOptions, shard: ShardIdx) -> ShardDriver {
    ShardDriver::new(
        shard,
        options.shard_config(shard),
        RestartPolicy::default(),
        SHARD_QUEUE_BATCHES_MAX,
        WAL_SYNC_STALL_MS_MAX,
    )
    .with_planted(options.planted_glue)
}

/// The node's defaults for a shard's input channel (batches) and the WAL stall watchdog.
const SHARD_QUEUE_BATCHES_MAX: usize = 1024;
const WAL_SYNC_STALL_MS_MAX: u64 = 10_000;

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
            .filter(
                |e| matches!(e, Event::ToClient { conn, seg: Segment::Reset, .. } if *conn == id),
            )
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
        assert!(sim.conns.contains_key(&old), "the node accepted it");
        sim.crash().unwrap();
        sim.restart_node().unwrap();
        let hello = hello_frame(&sim);
        let seg = Segment::Data {
            seq: 0,
            bytes: hello.clone(),
        };
        sim.node_packet(old, 0, seg.clone());
        assert!(!sim.conns.contains_key(&old), "an old connection reopened");
        assert_eq!(resets_queued(&sim, old), 1);
        let fresh = sim.next_conn;
        sim.next_conn += 1;
        sim.node_packet(fresh, 0, seg);
        assert!(
            sim.conns.contains_key(&fresh),
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
        sim.check_no_leaked_sessions().unwrap();
        let gone = sim.next_session + 1_000;
        let subscribe = ShardOp::Subscribe {
            r: 1,
            mesh: MESH.into(),
            conv: "c0".into(),
            from: 1,
        };
        let now = sim.now;
        sim.hosts[0].driver.shard_mut().unwrap().handle_requests(
            now,
            [Request {
                session: gone,
                op: subscribe,
            }],
        );
        let e = sim.check_no_leaked_sessions().unwrap_err();
        assert_eq!(e.kind, ViolationKind::LeakedSession, "{e:?}");
    }
}
