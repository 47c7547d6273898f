//! The simulated world: one node (its shards, their disks, the edge sessions and routers the
//! glue keeps per connection), the clients, the network between them, and the event queue that
//! moves simulated time. Everything here is the glue's job done by hand, one thread, no I/O:
//! the decisions stay in the real cores.

use crate::check::{fail, Checked, Failure, Model, OpKind, ViolationKind};
use crate::disk::{CrashFaults, Disk};
use crate::net::{Closed, ConnId, Endpoint, Network, Segment, Stream};
use crate::options::{SimOptions, RETENTION_OFF_BYTES};
use crate::schedule::{FaultEvent, Schedule, Timed};
use crate::{Fnv, RunSummary, Violation, LIVENESS_BOUND_MS, RUN_EVENTS_MAX, TRACE_RING_LINES};
use bytes::Bytes;
use fabric_edge::{InFrame, OutFrame, Session, SessionConfig};
use fabric_proto::internal::{Output, Placement, Reply, Request, SessionId, ShardIdx, ShardOp};
use fabric_proto::{codec, Body, ClientOp, ErrorCode, ServerOp, Target};
use fabric_router::Router;
use fabric_shard::{wal, RecoverError, Recoverer, RecoveryReport, Shard, ShardConfig, WalWrite};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// The mesh every simulated client belongs to.
pub const MESH: &str = "m";
/// Shortest and longest wait before the glue restarts a shard whose storage failed, in ms;
/// consecutive failures double it (as a supervisor backs off).
const RESTART_DELAY_MIN_MS: u64 = 1;
const RESTART_DELAY_MAX_MS: u64 = 2_000;
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

pub(crate) struct Trace {
    pub(crate) hash: Fnv,
    pub(crate) ring: VecDeque<String>,
    /// Every line also goes here (`fabric sim --trace`).
    pub(crate) sink: Option<TraceSink>,
}

impl Trace {
    fn line(&mut self, now: u64, text: String) {
        let line = format!("{now:>6}ms {text}");
        self.hash.write(line.as_bytes());
        self.hash.write(b"\n");
        if let Some(sink) = &mut self.sink {
            sink(&line);
        }
        if self.ring.len() == TRACE_RING_LINES {
            self.ring.pop_front();
        }
        self.ring.push_back(line);
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

#[derive(Debug)]
struct ClientConn {
    id: ConnId,
    stream: Stream,
    welcomed: bool,
    timer_at: Option<u64>,
}

#[derive(Debug)]
pub(crate) struct Client {
    pub(crate) peer: Arc<str>,
    token: String,
    binary: bool,
    /// Server ops per frame this client asks for with `options` before each hello (0: none).
    batch_in: u32,
    conn: Option<ClientConn>,
    next_r: u64,
    /// Ref -> operation, on the current connection.
    inflight: BTreeMap<u64, usize>,
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
}

#[derive(Debug)]
struct Inflight {
    id: u64,
    write: WalWrite,
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

/// One shard of the node, with what the glue keeps for it.
struct Host {
    shard: Shard,
    disk: Disk,
    /// Bumped by every restart; a restart timer for an older incarnation is stale.
    epoch: u64,
    inflight: Option<Inflight>,
    /// The glue's input channel while the shard wants no input (backpressure).
    input: VecDeque<Request>,
    disk_full: bool,
    flip: Option<ArmedFlip>,
    /// Failed writes since the last good one (the restart backoff).
    failures: u32,
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
    ShardRestart {
        shard: ShardIdx,
        epoch: u64,
    },
    Fault(FaultEvent),
    FaultsEnd,
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
}

/// One simulated cluster (one node for now) with its clients, checkers and event queue.
pub struct Simulation {
    seed: u64,
    pub(crate) options: SimOptions,
    rng: ChaCha8Rng,
    pub(crate) now: u64,
    queue: BTreeMap<(u64, u64), Event>,
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
    next_write: u64,
    next_conn: ConnId,
    next_session: SessionId,
    pub(crate) clients: Vec<Client>,
    refs: BTreeMap<(ConnId, u64), usize>,
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
            })
            .collect();
        let names = peers.iter().map(|(p, _)| p.clone()).collect();
        let groups = peers.iter().map(|(_, g)| g.clone()).collect();
        let retention = options.retention_bytes_max < RETENTION_OFF_BYTES;
        let hosts = (0..options.shards)
            .map(|s| Host {
                shard: Shard::new(options.shard_config(s)),
                disk: Disk::new(),
                epoch: 0,
                inflight: None,
                input: VecDeque::new(),
                disk_full: false,
                flip: None,
                failures: 0,
            })
            .collect();
        let mesh_shard = placement
            .shard_of(Placement::Mesh(MESH))
            .expect("a mesh has a shard");
        let session_config = SessionConfig {
            inflight_requests_max: options.session_inflight_requests_max,
            ..SessionConfig::default()
        };
        Simulation {
            seed,
            rng,
            now: 0,
            queue: BTreeMap::new(),
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
            next_write: 0,
            next_conn: 1,
            next_session: 1,
            clients,
            refs: BTreeMap::new(),
            probe: None,
            model: Model::new(names, groups, retention),
            trace: Trace {
                hash: Fnv::new(),
                ring: VecDeque::new(),
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
            last_events: self.trace.ring.iter().cloned().collect(),
            schedule: self.schedule.clone(),
        }))
    }

    fn trace(&mut self, text: String) {
        self.trace.line(self.now, text);
    }

    fn schedule_at(&mut self, at: u64, event: Event) {
        self.queue.insert((at, self.next_event), event);
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
        self.trace(format!("start seed={} {}", self.seed, self.options));
        self.setup()?;
        self.phase = Phase::Faults;
        let events: Vec<Timed> = self.schedule.events.clone();
        for t in events {
            self.schedule_at(t.at_ms, Event::Fault(t.event));
        }
        if !self.scripted {
            self.schedule_at(self.options.duration_ms, Event::FaultsEnd);
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
            let Some(entry) = self.queue.first_entry() else {
                return Ok(());
            };
            let at = entry.key().0;
            if at > until {
                self.now = self.now.max(until);
                return Ok(());
            }
            let event = entry.remove();
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
        self.trace(
            "faults end: the network and disks heal, every client reconnects and drains".into(),
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
            && self
                .hosts
                .iter()
                .all(|h| h.shard.is_idle() && h.input.is_empty() && h.inflight.is_none())
            && self.conns.values().all(|k| k.stream.unacked() == 0)
    }

    fn pending_summary(&self) -> String {
        let shards: Vec<String> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(s, h)| {
                format!(
                    "s{s} idle={} failed={} input={} writing={}",
                    h.shard.is_idle(),
                    h.shard.is_failed(),
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

    /// The final checks once everything is quiet (checker 3).
    fn finish(&mut self) -> Checked {
        self.model.final_delivery()?;
        self.finished = true;
        self.trace(format!(
            "end acked={} crashes={} restarts={} faults={} connections={}",
            self.model.acks(),
            self.counters.crashes,
            self.counters.restarts,
            self.counters.faults,
            self.counters.connections
        ));
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
                public_key: None,
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
            self.counters.wal_writes += 1;
            host.shard.handle_wal_done(now, w.last_lsn);
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
            Event::ShardRestart { shard, epoch } => {
                if self.node_up && epoch == self.hosts[shard as usize].epoch {
                    self.restart_after_failure(shard)?;
                }
            }
            Event::Fault(f) => self.apply(f)?,
            Event::FaultsEnd => self.end_faults()?,
        }
        Ok(())
    }

    /// One schedule event.
    pub(crate) fn apply(&mut self, event: FaultEvent) -> Checked {
        if self.phase != Phase::Faults {
            return Ok(());
        }
        self.trace(format!("FAULT {event:?}"));
        match event {
            FaultEvent::Crash { .. } => {
                if self.node_up {
                    self.crash()?;
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

    // ---- the network ----

    fn send_to_node(&mut self, c: usize, conn: ConnId, seg: Segment) {
        let faults = self.faults_on();
        let (at, n) = self.net.arrivals(
            self.now,
            &mut self.rng,
            &self.options.net,
            faults,
            Endpoint::Client(c as u32),
            Endpoint::Node(0),
        );
        for t in &at[..n] {
            let seg = seg.clone();
            self.schedule_at(
                *t,
                Event::ToNode {
                    conn,
                    client: c,
                    seg,
                },
            );
        }
    }

    fn send_to_client(&mut self, c: usize, conn: ConnId, seg: Segment) {
        let faults = self.faults_on();
        let (at, n) = self.net.arrivals(
            self.now,
            &mut self.rng,
            &self.options.net,
            faults,
            Endpoint::Node(0),
            Endpoint::Client(c as u32),
        );
        for t in &at[..n] {
            let seg = seg.clone();
            self.schedule_at(
                *t,
                Event::ToClient {
                    client: c,
                    conn,
                    seg,
                },
            );
        }
    }

    /// A packet reaches the node: an open connection takes it; the first frame of a connection
    /// the node never accepted opens it; anything else gets a reset, as from a host that has no
    /// socket for the connection (after a reboot, or after it closed it; see `known_conns`).
    fn node_packet(&mut self, id: ConnId, c: usize, seg: Segment) {
        if !self.node_up {
            return;
        }
        if let Some(k) = self.conns.get_mut(&id) {
            k.stream.handle_segment(self.now, seg);
            self.dirty.insert(id);
            return;
        }
        let opens = matches!(seg, Segment::Data { seq: 0, .. });
        if opens && self.known_conns.insert(id) {
            self.trace(format!("n0 accepts connection {id}"));
            let session = self.next_session;
            self.next_session += 1;
            let mut stream = Stream::new(self.now, self.options.stream.clone());
            stream.handle_segment(self.now, seg);
            self.conns.insert(
                id,
                NodeConn {
                    client: c,
                    stream,
                    session: Session::new(session, self.now, self.session_config.clone()),
                    router: self.placement.clone(),
                    timer_at: None,
                },
            );
            self.sessions.insert(session, id);
            self.dirty.insert(id);
        } else if seg != Segment::Reset {
            self.trace(format!("n0 resets connection {id}: no socket for it"));
            self.send_to_client(c, id, Segment::Reset);
        }
    }

    fn client_packet(&mut self, c: usize, id: ConnId, seg: Segment) -> Checked {
        let now = self.now;
        match self.clients[c].conn.as_mut().filter(|k| k.id == id) {
            Some(k) => {
                k.stream.handle_segment(now, seg);
                self.pump_client(c)
            }
            None => {
                // A connection the client has given up on: tell the node, as TCP would.
                if seg != Segment::Reset {
                    self.send_to_node(c, id, Segment::Reset);
                }
                Ok(())
            }
        }
    }

    // ---- the node's glue ----

    /// Moves work between shards and sessions until nothing moves: shard input, WAL writes,
    /// shard outputs into sessions, sessions' requests into shard input, frames onto streams.
    fn pump(&mut self) -> Checked {
        for _ in 0..PUMP_ROUNDS_MAX {
            let outputs = self.pump_shards();
            if outputs.is_empty() && self.dirty.is_empty() {
                return Ok(());
            }
            for (shard, o) in outputs {
                self.route_output(shard, o)?;
            }
            for id in std::mem::take(&mut self.dirty) {
                self.pump_conn(id);
            }
        }
        fail(
            ViolationKind::Liveness,
            format!(
                "{PUMP_ROUNDS_MAX} rounds between shards and sessions in one event: {}",
                self.pending_summary()
            ),
        )
    }

    /// The shard loop of the glue, shard by shard: feed input while the shard wants it, start
    /// a WAL write if none is in flight, collect outputs.
    fn pump_shards(&mut self) -> Vec<(ShardIdx, Output)> {
        let mut outputs = Vec::new();
        if !self.node_up {
            return outputs;
        }
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
        outputs
    }

    /// The glue's session task for one connection: read frames while the session wants them,
    /// forward its requests, write its frames (then report the flush), close when it closes.
    fn pump_conn(&mut self, id: ConnId) {
        let now = self.now;
        let Some(k) = self.conns.get_mut(&id) else {
            return;
        };
        while k.session.wants_read() {
            let Some(frame) = k.stream.poll_frame() else {
                break;
            };
            let (kind, bytes) = frame.split_first().unwrap_or((&FRAME_TEXT, &[]));
            k.session.handle_frame(
                now,
                InFrame {
                    binary: *kind == FRAME_BINARY,
                    bytes,
                },
            );
        }
        if k.stream.closed().is_some() {
            k.session.handle_transport_closed(now);
        }
        let mut wrote = false;
        while let Some(f) = k.session.poll_transmit() {
            k.stream.send(now, frame_bytes(&f));
            wrote = true;
        }
        if wrote {
            k.session.handle_flushed(now);
        }
        if k.session.is_closed() {
            k.stream.close();
        }
        let client = k.client;
        let mut segs = Vec::new();
        while let Some(seg) = k.stream.poll_segment() {
            segs.push(seg);
        }
        let timer = [k.stream.poll_timeout(), k.session.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        let arm = timer.filter(|t| k.timer_at.is_none_or(|a| *t < a));
        if let Some(t) = arm {
            k.timer_at = Some(t);
        }
        let done = k.session.is_closed() && k.stream.closed().is_some();
        let session = k.session.id();
        self.forward_requests(id);
        for seg in segs {
            self.send_to_client(client, id, seg);
        }
        if let Some(t) = arm {
            self.schedule_at(t.max(now), Event::NodeTimer(id));
        }
        if done {
            self.conns.remove(&id);
            self.sessions.remove(&session);
        }
    }

    /// A session's requests, batched by its router, into the shards' input channels.
    fn forward_requests(&mut self, id: ConnId) {
        let Some(k) = self.conns.get_mut(&id) else {
            return;
        };
        while let Some((route, req)) = k.session.poll_request() {
            k.router.handle_request(self.now, route, req);
        }
        while let Some((shard, requests)) = k.router.poll_batch() {
            self.hosts[shard as usize].input.extend(requests);
        }
    }

    /// A shard's output: the checkers see it first (what a shard says is its promise, whether
    /// or not the client ever reads it), then the session it is for.
    fn route_output(&mut self, shard: ShardIdx, o: Output) -> Checked {
        if Some(o.session) == self.probe {
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
        let Some(&id) = self.sessions.get(&o.session) else {
            return Ok(()); // the session is gone; the shard will hear `Closed`
        };
        let c = self.conns[&id].client;
        let peer = self.clients[c].peer.clone();
        if let Reply::Frame(frame) = &o.reply {
            match frame {
                ServerOp::Welcome { acked, head, .. } => {
                    self.model.on_welcome(c, *acked, *head)?;
                }
                ServerOp::Ok { r, pos, seq } => {
                    let Some(op) = self.refs.remove(&(id, *r)) else {
                        return fail(
                            ViolationKind::UnexpectedReply,
                            format!("{peer} ok for unknown r={r} on connection {id}"),
                        );
                    };
                    self.trace(format!(
                        "s{shard} ok {peer} op {op} r={r} pos={pos:?} seq={seq:?}"
                    ));
                    self.model.on_ok(op, *pos, *seq)?;
                }
                ServerOp::Error { r, code, message } => {
                    if *code != ErrorCode::Unavailable {
                        return fail(
                            ViolationKind::UnexpectedReply,
                            format!("s{shard} error to {peer} r={r:?} {code:?}: {message}"),
                        );
                    }
                    if let Some(r) = r {
                        self.refs.remove(&(id, *r));
                    }
                }
                ServerOp::Deliver {
                    pos,
                    from,
                    to,
                    body,
                    ..
                } => self.model.on_deliver(c, *pos, from, to, body)?,
                _ => {}
            }
        }
        let k = self.conns.get_mut(&id).expect("looked up above");
        k.session.handle_reply(self.now, shard, o.reply);
        self.dirty.insert(id);
        Ok(())
    }

    fn start_write(&mut self, shard: ShardIdx, w: WalWrite) {
        let id = self.next_write;
        self.next_write += 1;
        self.counters.wal_writes += 1;
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
        self.schedule_at(self.now + latency, Event::WalDone { shard, write: id });
    }

    fn wal_done(&mut self, shard: ShardIdx, id: u64) -> Checked {
        let s = shard as usize;
        if !self.node_up {
            return Ok(());
        }
        let Some(inflight) = self.hosts[s].inflight.take_if(|i| i.id == id) else {
            return Ok(()); // the write died with a crashed incarnation
        };
        let w = &inflight.write;
        let full = self.hosts[s].disk_full;
        if full
            || (self.phase == Phase::Faults
                && self.rng.random_bool(self.options.enospc_probability))
        {
            let written = self.hosts[s].disk.failed_write_cut(w, &mut self.rng);
            self.hosts[s].disk.fail_write(w, written);
            self.counters.faults += 1;
            self.trace(format!(
                "s{shard} wal write {id} failed ({}) after {written} of {} bytes reached the page cache",
                if full { "disk full" } else { "ENOSPC/EIO" },
                w.bytes.len()
            ));
            self.hosts[s].shard.handle_wal_failed(self.now, "ENOSPC");
            let failures = self.hosts[s].failures.min(16);
            self.hosts[s].failures += 1;
            let delay = (RESTART_DELAY_MIN_MS << failures).min(RESTART_DELAY_MAX_MS);
            let delay = self.rng.random_range(RESTART_DELAY_MIN_MS..=delay);
            let epoch = self.hosts[s].epoch;
            self.schedule_at(self.now + delay, Event::ShardRestart { shard, epoch });
            return Ok(());
        }
        self.hosts[s].failures = 0;
        self.hosts[s].disk.complete_write(w);
        self.model.ack_durable(&inflight.acks);
        self.trace(format!(
            "s{shard} wal write {id} durable up to lsn {}",
            w.last_lsn
        ));
        self.hosts[s].shard.handle_wal_done(self.now, w.last_lsn);
        // As the node's glue does: the next batch is framed into this write's buffer, so a
        // recycled buffer that kept old bytes would show up as corrupt WAL in the checkers.
        self.hosts[s].shard.recycle_wal_buffer(inflight.write.bytes);
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
        let probe = *self.probe.get_or_insert_with(|| {
            let s = self.next_session;
            self.next_session += 1;
            s
        });
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

    /// Power loss: every shard, its in-flight write, its input and every connection die
    /// together, silently: clients find out by their idle timeouts, or by a reset once the
    /// node is back.
    fn crash(&mut self) -> Checked {
        self.counters.crashes += 1;
        self.node_up = false;
        let faults = CrashFaults {
            torn_write_probability: self.options.torn_write_probability,
            tail_corruption_probability: self.options.tail_corruption_probability,
        };
        for s in 0..self.hosts.len() {
            let report = self.hosts[s].disk.crash(&mut self.rng, faults);
            self.counters.faults += report.faults();
            self.trace(format!("CRASH s{s} {report:?}"));
            let h = &mut self.hosts[s];
            h.epoch += 1;
            h.inflight = None;
            h.input.clear();
            h.failures = 0;
        }
        // `known_conns` survives: the clients' ends of those connections survive the crash.
        self.conns.clear();
        self.sessions.clear();
        self.dirty.clear();
        Ok(())
    }

    /// The node boots: every shard recovers from its disk and is audited.
    fn restart_node(&mut self) -> Checked {
        self.trace("node boots".into());
        for s in 0..self.hosts.len() {
            self.reincarnate(s as ShardIdx)?;
        }
        self.node_up = true;
        Ok(())
    }

    /// The glue restarts a shard whose WAL write failed and closes the sessions attached to the
    /// old incarnation (each session core decides how); their clients reconnect.
    fn restart_after_failure(&mut self, shard: ShardIdx) -> Checked {
        self.counters.restarts += 1;
        self.trace(format!("s{shard} restart after storage failure"));
        self.reincarnate(shard)?;
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            let k = self.conns.get_mut(&id).expect("listed");
            k.session.handle_shard_restarted(self.now, shard);
            self.dirty.insert(id);
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
        if let Some(armed) = self.hosts[s].flip.take() {
            let flip = self.hosts[s].disk.pick_read_flip_in(
                &mut self.rng,
                armed.segment,
                armed.offset_min.map(|o| o as usize),
                armed.offset_max.map(|o| o as usize),
            );
            if let Some(flip) = flip {
                self.counters.faults += 1;
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
            proof: None,
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

    // ---- the clients ----

    /// Client `c` abandons its connection (with a reset, which may or may not arrive): what was
    /// in flight has an unknown outcome. Keyed appends and sends are retried (a send may then
    /// be stored twice, which at-least-once allows); keyless appends are abandoned, since a
    /// retry could store them twice.
    pub(crate) fn drop_conn(&mut self, c: usize) {
        if let Some(mut k) = self.clients[c].conn.take() {
            self.trace(format!(
                "{} drops connection {}",
                self.clients[c].peer, k.id
            ));
            k.stream.close();
            while let Some(seg) = k.stream.poll_segment() {
                self.send_to_node(c, k.id, seg);
            }
        }
        self.lost_conn(c);
    }

    fn lost_conn(&mut self, c: usize) {
        let client = &mut self.clients[c];
        client.conn = None;
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
        self.clients[c].backoff_until_ms = self.now + delay;
        self.wake(c, delay);
    }

    fn client_wake(&mut self, c: usize) -> Checked {
        if !self.clients[c].online {
            return Ok(());
        }
        if self.now < self.clients[c].backoff_until_ms {
            let delay = self.clients[c].backoff_until_ms - self.now;
            self.wake(c, delay);
            return Ok(());
        }
        let Some(k) = &self.clients[c].conn else {
            return self.connect(c);
        };
        if !k.welcomed {
            return Ok(());
        }
        if self.clients[c].inflight.len() >= self.options.inflight_requests_max {
            return Ok(());
        }
        let op = if let Some(op) = self.clients[c].retry.pop_front() {
            op
        } else if let Some(action) = self.clients[c].script.pop_front() {
            self.scripted_op(c, action)
        } else if self.phase == Phase::Faults && !self.load_paused && self.clients[c].ops_left > 0 {
            self.clients[c].ops_left -= 1;
            self.new_op(c)
        } else {
            return Ok(());
        };
        self.issue(c, op)?;
        let client = &self.clients[c];
        let more = !client.retry.is_empty()
            || !client.script.is_empty()
            || (self.phase == Phase::Faults && !self.load_paused && client.ops_left > 0);
        if more && client.inflight.len() < self.options.inflight_requests_max {
            let delay = self.rng.random_range(0..=self.think_time_max_ms);
            self.wake(c, delay);
        }
        Ok(())
    }

    /// A new connection and its hello.
    fn connect(&mut self, c: usize) -> Checked {
        let id = self.next_conn;
        self.next_conn += 1;
        self.counters.connections += 1;
        let stream = Stream::new(self.now, self.options.stream.clone());
        self.clients[c].conn = Some(ClientConn {
            id,
            stream,
            welcomed: false,
            timer_at: None,
        });
        let hello = ClientOp::Hello {
            mesh: MESH.into(),
            peer: self.clients[c].peer.clone(),
            token: self.clients[c].token.clone(),
        };
        self.trace(format!(
            "{} connects: connection {id}",
            self.clients[c].peer
        ));
        let batch = self.clients[c].batch_in;
        if batch > 0 {
            self.client_send(
                c,
                &ClientOp::Options {
                    r: OPTIONS_REF,
                    batch,
                },
            );
        }
        self.client_send(c, &hello);
        self.pump_client(c)
    }

    fn client_send(&mut self, c: usize, op: &ClientOp) {
        let now = self.now;
        let client = &mut self.clients[c];
        let Some(k) = client.conn.as_mut() else {
            return;
        };
        let bytes = if client.binary {
            let mut b = vec![FRAME_BINARY];
            b.extend_from_slice(&codec::encode_client_binary(op));
            b
        } else {
            let mut b = vec![FRAME_TEXT];
            codec::encode_client_json(op, &mut b);
            b
        };
        k.stream.send(now, Bytes::from(bytes));
    }

    /// The client's socket loop: frames in, reactions out, packets onto the network.
    fn pump_client(&mut self, c: usize) -> Checked {
        let mut delivered = false;
        while let Some(frame) = self.clients[c]
            .conn
            .as_mut()
            .and_then(|k| k.stream.poll_frame())
        {
            let (kind, bytes) = frame.split_first().unwrap_or((&FRAME_TEXT, &[]));
            let ops = if *kind == FRAME_BINARY {
                codec::decode_server_binary(bytes)
            } else {
                codec::decode_server_json(bytes)
            };
            let ops = match ops {
                Ok(ops) => ops,
                Err(e) => {
                    return fail(
                        ViolationKind::UnexpectedReply,
                        format!("{} cannot decode a frame: {e}", self.clients[c].peer),
                    )
                }
            };
            for op in ops {
                delivered |= self.client_frame(c, op)?;
            }
        }
        let ack = self.phase == Phase::Liveness
            || self.scripted
            || self.rng.random_bool(self.options.ack_probability);
        let upto = self.clients[c].max_received;
        if delivered && ack && upto > self.clients[c].acked_sent {
            self.clients[c].acked_sent = upto;
            self.trace(format!("{} ack upto {upto}", self.clients[c].peer));
            self.client_send(c, &ClientOp::Ack { upto });
        }
        let now = self.now;
        let Some(k) = self.clients[c].conn.as_mut() else {
            return Ok(());
        };
        let id = k.id;
        let mut segs = Vec::new();
        while let Some(seg) = k.stream.poll_segment() {
            segs.push(seg);
        }
        let closed = k.stream.closed();
        let timer = k.stream.poll_timeout();
        let arm = timer.filter(|t| k.timer_at.is_none_or(|a| *t < a));
        if let Some(t) = arm {
            k.timer_at = Some(t);
        }
        for seg in segs {
            self.send_to_node(c, id, seg);
        }
        if let Some(t) = arm {
            self.schedule_at(t.max(now), Event::ClientTimer(c, id));
        }
        if let Some(why) = closed {
            let how = match why {
                Closed::Reset => "was reset",
                Closed::IdleTimeout => "timed out",
                Closed::Local => "closed",
            };
            self.trace(format!("{} connection {id} {how}", self.clients[c].peer));
            self.lost_conn(c);
        }
        Ok(())
    }

    /// One server frame at client `c`; true if it was a delivery.
    fn client_frame(&mut self, c: usize, op: ServerOp) -> Checked<bool> {
        let peer = self.clients[c].peer.clone();
        match op {
            ServerOp::Welcome {
                session,
                acked,
                head,
            } => {
                self.trace(format!(
                    "{peer} welcome session={session} acked={acked} head={head}"
                ));
                if let Some(k) = self.clients[c].conn.as_mut() {
                    k.welcomed = true;
                }
                // Anything received before was acknowledged or is redelivered from `acked`.
                self.clients[c].acked_sent = acked;
                self.clients[c].max_received = acked;
                self.wake(c, 0);
            }
            ServerOp::Ok { r: OPTIONS_REF, .. } if self.clients[c].batch_in > 0 => {}
            ServerOp::Ok { r, .. } => {
                if self.clients[c].inflight.remove(&r).is_none() {
                    return fail(
                        ViolationKind::UnexpectedReply,
                        format!("{peer} got ok for r={r}, which it is not waiting for"),
                    );
                }
                let delay = self.rng.random_range(0..=self.think_time_max_ms);
                self.wake(c, delay);
            }
            ServerOp::Error {
                r: Some(r),
                code: ErrorCode::Unavailable,
                message,
            } => {
                self.trace(format!("{peer} unavailable r={r}: {message}"));
                // Refused, or its WAL write failed (and may yet survive in the page cache).
                // Keyed appends and sends are retried; keyless appends abandoned.
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
            ServerOp::Error {
                r: None,
                code,
                message,
            } if code == ErrorCode::Unavailable
                || (code == ErrorCode::Unauthorized && message.contains("timed out")) =>
            {
                // The session ends (a shard restarted, or a hello the network delayed past
                // the deadline); the connection closes behind it.
                self.trace(format!("{peer} session error {code:?}: {message}"));
            }
            ServerOp::Deliver {
                pos,
                from,
                to,
                body,
                ..
            } => {
                self.trace(format!("{peer} deliver pos={pos}"));
                self.model.delivered[c].insert(pos);
                self.clients[c].received.insert(pos, (from, to, body));
                let client = &mut self.clients[c];
                client.max_received = client.max_received.max(pos);
                return Ok(true);
            }
            ServerOp::Batch(ops) => {
                let mut delivered = false;
                for op in ops {
                    delivered |= self.client_frame(c, op)?;
                }
                return Ok(delivered);
            }
            f => return fail(ViolationKind::UnexpectedReply, format!("{peer} got {f:?}")),
        }
        Ok(false)
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

    /// A scripted operation: the user's body inside an envelope that makes it unique, which
    /// the checkers need to tell operations apart (`crate::script` unwraps it again).
    fn scripted_op(&mut self, c: usize, action: Action) -> usize {
        let id = self.model.ops.len();
        let wrap = |body: &str| {
            Body::from_trusted(format!("{{\"op\":{id},\"user\":{body},\"again\":{id}}}").into())
        };
        let (kind, body) = match action {
            Action::Send { to, body } => {
                let recipients = self.model.recipients(c, &to);
                (OpKind::Send { to, recipients }, wrap(&body))
            }
            Action::Append { conv, body, key } => (OpKind::Append { conv, key }, wrap(&body)),
        };
        self.model.add_op(c, kind, body)
    }

    fn issue(&mut self, c: usize, op: usize) -> Checked {
        let Some(id) = self.clients[c].conn.as_ref().map(|k| k.id) else {
            self.clients[c].retry.push_front(op);
            return Ok(());
        };
        let r = self.clients[c].next_r;
        self.clients[c].next_r += 1;
        self.clients[c].inflight.insert(r, op);
        self.refs.insert((id, r), op);
        let o = &self.model.ops[op];
        let (client_op, what) = match &o.kind {
            OpKind::Send { to, .. } => (
                ClientOp::Send {
                    r,
                    to: to.clone(),
                    body: o.body.clone(),
                },
                format!("send to {}", to.to_wire()),
            ),
            OpKind::Append { conv, key } => (
                ClientOp::Append {
                    r,
                    conv: conv.clone(),
                    body: o.body.clone(),
                    key: key.clone(),
                },
                format!("append {conv} key={key:?}"),
            ),
        };
        self.trace(format!("{} op {op} r={r} {what}", self.clients[c].peer));
        self.client_send(c, &client_op);
        self.pump_client(c)
    }
}

/// A frame for the simulated socket: its type byte, then its bytes.
fn frame_bytes(f: &OutFrame) -> Bytes {
    let mut b = Vec::with_capacity(f.bytes.len() + 1);
    b.push(if f.binary { FRAME_BINARY } else { FRAME_TEXT });
    b.extend_from_slice(&f.bytes);
    Bytes::from(b)
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
            .values()
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
}
