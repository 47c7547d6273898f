//! A simulated node: the host of its shards (`fabric_router::host::ShardDriver`, the same
//! sans-IO host `fabric` runs), their disks, the connections it accepted with their edge
//! sessions and routers, and the glue between them done by hand as `fabric` does it: shard
//! loops, session tasks, routers. Each node is its own machine: its own hosts, disks,
//! sessions and crashes; only the clock is shared.

use super::*;
use fabric_proto::MeshId;
use fabric_proto::{GroupId, PeerId};

/// One node of the world, at endpoint `Endpoint::Node(id)`.
pub(super) struct Node {
    pub(super) id: usize,
    pub(super) up: bool,
    pub(super) hosts: Vec<Host>,
    pub(super) conns: BTreeMap<ConnId, NodeConn>,
    pub(super) sessions: BTreeMap<SessionId, ConnId>,
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
    pub(super) known_conns: BTreeSet<ConnId>,
    pub(super) dirty: BTreeSet<ConnId>,
    /// Session ids are the node's own, as a real node numbers its sessions.
    pub(super) next_session: SessionId,
    /// The global indices of the clients attached to this node; a client's place here is its
    /// peer's index in `model`.
    pub(super) clients: Vec<usize>,
    /// What this node's clients were promised (checkers 1-6): with no replication, each node
    /// is a cluster of its own, with its own mesh, peers and conversations.
    pub(super) model: Model,
    /// Checker 7's oracle: what this node's disks hold synced.
    pub(super) durable: Durable,
    /// HTTP reads in progress, by their session, and the router they go through (the HTTP
    /// client beside this node).
    pub(super) http: BTreeMap<SessionId, HttpCall>,
    pub(super) http_router: Router,
}

impl Node {
    /// Node `id`, up, with empty disks, serving `clients` (global indices), whose peers and
    /// groups are `peers`.
    pub(super) fn new(
        id: usize,
        options: &SimOptions,
        placement: &Router,
        peers: Vec<(Arc<str>, Vec<Arc<str>>)>,
        clients: Vec<usize>,
    ) -> Node {
        let retention = options.retention_bytes_max < RETENTION_OFF_BYTES;
        let hosts = (0..options.shards)
            .map(|s| Host {
                driver: new_driver(options, s),
                disk: Disk::new(s),
                epoch: 0,
                inflight: None,
                input: VecDeque::new(),
                disk_full: false,
                flip: None,
                timer_at: None,
            })
            .collect();
        let (names, groups) = peers.into_iter().unzip();
        Node {
            id,
            up: true,
            hosts,
            conns: BTreeMap::new(),
            sessions: BTreeMap::new(),
            known_conns: BTreeSet::new(),
            dirty: BTreeSet::new(),
            next_session: 1,
            clients,
            model: Model::new(names, groups, retention),
            durable: Durable::new(options.shards as usize),
            http: BTreeMap::new(),
            http_router: placement.clone(),
        }
    }

    /// A fresh session id of this node.
    pub(super) fn new_session(&mut self) -> SessionId {
        let s = self.next_session;
        self.next_session += 1;
        s
    }

    /// Up, with no HTTP read in progress, every shard idle, and nothing unacknowledged on
    /// any of its connections.
    pub(super) fn quiescent(&self) -> bool {
        self.up
            && self.http.is_empty()
            && self
                .hosts
                .iter()
                .all(|h| h.driver.is_idle() && h.input.is_empty() && h.inflight.is_none())
            && self.conns.values().all(|k| k.stream.unacked() == 0)
    }

    pub(super) fn pending_summary(&self) -> String {
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
        format!("n{} up={} {}", self.id, self.up, shards.join(", "))
    }
}

/// A connection as the node's glue holds it: the socket (stream), the session core, and the
/// session's router.
#[derive(Debug)]
pub(super) struct NodeConn {
    pub(super) client: usize,
    pub(super) stream: Stream,
    pub(super) session: Session,
    pub(super) router: Router,
    pub(super) timer_at: Option<u64>,
    /// The session's reply queue (the node's bounded channel from the shards), in batches.
    pub(super) replies: VecDeque<(ShardIdx, Vec<Reply>)>,
}

#[derive(Debug)]
pub(super) struct Inflight {
    pub(super) id: u64,
    pub(super) write: WriteJob,
    /// The acks taken in before the write was polled (checker 6), for the mesh's shard.
    pub(super) acks: Vec<u64>,
}

/// Where the next recovery of a shard reads a flipped bit.
#[derive(Debug, Clone, Copy)]
pub(super) struct ArmedFlip {
    pub(super) segment: Option<u64>,
    pub(super) offset_min: Option<u64>,
    pub(super) offset_max: Option<u64>,
}

/// What a shard's host hands the simulated node, in order.
#[derive(Debug)]
pub(super) enum HostOut {
    Replies(SessionId, Vec<Reply>),
    Close(SessionId, CloseReason),
}

/// One shard of the node: the node's own host (`fabric_router::host::ShardDriver`) and what the
/// simulated glue around it keeps.
pub(super) struct Host {
    pub(super) driver: ShardDriver,
    pub(super) disk: Disk,
    /// Bumped by every restart; a timer for an older incarnation is stale.
    pub(super) epoch: u64,
    pub(super) inflight: Option<Inflight>,
    /// The glue's input channel: request batches, one per router hand-off, left there while
    /// the shard wants no input (backpressure).
    pub(super) input: VecDeque<Vec<Request>>,
    pub(super) disk_full: bool,
    pub(super) flip: Option<ArmedFlip>,
    /// When the driver's next timer is scheduled (monotonic ms), if one is.
    pub(super) timer_at: Option<u64>,
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

impl Simulation {
    /// Every node's glue, node by node, until nothing moves (see `pump_node`).
    pub(super) fn pump(&mut self) -> Checked {
        for n in 0..self.nodes.len() {
            self.pump_node(n)?;
        }
        Ok(())
    }

    /// Moves work between node `n`'s shards and sessions until nothing moves: shard input,
    /// WAL writes, shard outputs into sessions, sessions' requests into shard input, frames
    /// onto streams.
    fn pump_node(&mut self, n: usize) -> Checked {
        for _ in 0..PUMP_ROUNDS_MAX {
            let outputs = self.pump_shards(n)?;
            if outputs.is_empty() && self.nodes[n].dirty.is_empty() {
                return Ok(());
            }
            for (shard, o) in outputs {
                match o {
                    HostOut::Replies(session, replies) => {
                        self.queue_replies(n, shard, session, replies)?
                    }
                    HostOut::Close(session, why) if self.nodes[n].http.contains_key(&session) => {
                        self.http_closed(n, shard, session, why)?
                    }
                    HostOut::Close(session, why) => self.close_for_shard(n, shard, session, why),
                }
            }
            for id in std::mem::take(&mut self.nodes[n].dirty) {
                self.take_replies(n, id)?;
                self.pump_conn(n, id);
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

    /// The shard loop of the glue (`fabric/src/shard_actor.rs`), shard by shard: while the
    /// shard wants input, hand it whole batches from its channel (up to
    /// [`PUMP_BATCHES_MAX`] a round) through `Shard::handle_requests`, as the node does;
    /// `wants_input` is asked between batches, never inside one. Then start a WAL write if
    /// none is in flight, and collect outputs.
    pub(super) fn pump_shards(&mut self, n: usize) -> Checked<Vec<(ShardIdx, HostOut)>> {
        let mut outputs = Vec::new();
        if !self.nodes[n].up {
            return Ok(outputs);
        }
        for s in 0..self.nodes[n].hosts.len() {
            let shard = s as ShardIdx;
            // What the host asked for since (a write polled when the last one completed)
            // happens before new input is taken in.
            self.host_effects(n, shard, &mut outputs)?;
            let mut taken = 0;
            while taken < PUMP_BATCHES_MAX && self.nodes[n].hosts[s].driver.feeds_now() {
                let Some(batch) = self.nodes[n].hosts[s].input.pop_front() else {
                    break;
                };
                taken += 1;
                self.feed_batch(n, s, batch);
                // At once, as the node's adapter does: a write the host polled starts before
                // the next batch's acks are taken in (the cursor checker counts on it).
                self.host_effects(n, shard, &mut outputs)?;
            }
            self.host_effects(n, shard, &mut outputs)?;
        }
        Ok(outputs)
    }

    /// One batch from a shard's channel into its host, which takes it at once (the loop asks
    /// `feeds_now` first): the model learns the acks the shard took in.
    fn feed_batch(&mut self, n: usize, s: usize, batch: Vec<Request>) {
        let several = batch.len() > 1;
        let t = self.time();
        let node = &mut self.nodes[n];
        if node.hosts[s].driver.shard().is_some() {
            for req in &batch {
                if let ShardOp::Ack { peer, upto, .. } = &req.op {
                    if let Some(i) = node.model.peers.iter().position(|p| **p == **peer) {
                        node.model.ack_handled(i, *upto);
                    }
                }
            }
        }
        let session = batch.first().map_or(0, |r| r.session);
        let host = &mut node.hosts[s];
        host.driver.handle_batch(t, session, batch);
        self.counters.workload.shard_batches += 1;
        if several && host.driver.shard().is_some_and(|x| !x.wants_input()) {
            self.counters.workload.shard_batches_past_backpressure += 1;
        }
    }

    /// What the host asks of the glue, done as the node's adapter does it: writes started,
    /// recoveries run, replies and session closes routed (in order), the host's timer armed.
    pub(super) fn host_effects(
        &mut self,
        n: usize,
        shard: ShardIdx,
        outputs: &mut Vec<(ShardIdx, HostOut)>,
    ) -> Checked {
        let s = shard as usize;
        while let Some(e) = self.nodes[n].hosts[s].driver.poll_effect() {
            match e {
                Effect::Write(w) => self.start_write(n, shard, w),
                Effect::Read(job) => self.start_read(n, shard, job),
                Effect::Recover(job) => self.recover_effect(n, shard, job)?,
                Effect::Replies { session, replies } => {
                    outputs.push((shard, HostOut::Replies(session, replies)));
                }
                Effect::Forget { .. } => {}
                Effect::CloseSession { session, why } => {
                    outputs.push((shard, HostOut::Close(session, why)));
                }
                // The simulated nodes run unreplicated shards (`ShardDriver::new`): only a
                // replicated driver has messages for other nodes or log reads.
                Effect::Peer(_)
                | Effect::LogRead(_)
                | Effect::Forward { .. }
                | Effect::Remote { .. }
                | Effect::RemoteClose { .. } => {
                    unreachable!("an unreplicated shard's driver has no peers")
                }
            }
        }
        self.arm_host_timer(n, shard);
        Ok(())
    }

    fn arm_host_timer(&mut self, n: usize, shard: ShardIdx) {
        let h = &mut self.nodes[n].hosts[shard as usize];
        let Some(at) = h.driver.poll_timeout() else {
            return;
        };
        if h.timer_at.is_some_and(|t| t <= at) {
            return;
        }
        h.timer_at = Some(at);
        let epoch = h.epoch;
        self.schedule_at(
            at.max(self.now),
            Event::ShardTimer {
                node: n,
                shard,
                epoch,
            },
        );
    }

    /// The host closed a session (its shard incarnation ended, or its replies could not be
    /// queued): the session core decides how the client hears it.
    fn close_for_shard(&mut self, n: usize, shard: ShardIdx, session: SessionId, why: CloseReason) {
        let node = &mut self.nodes[n];
        let Some(&id) = node.sessions.get(&session) else {
            return;
        };
        if let Some(k) = node.conns.get_mut(&id) {
            match why {
                CloseReason::Restarted => k.session.handle_shard_restarted(self.now, shard),
                CloseReason::Overloaded => k.session.handle_shard_overloaded(self.now, shard),
                // Unreplicated shards have no leaders to change; the glue's answer is the
                // node's all the same.
                CloseReason::LeaderChanged => {
                    let router = &k.router;
                    k.session
                        .handle_shard_detached(self.now, shard, &|p| router.shard_of(p))
                }
            }
            node.dirty.insert(id);
        }
    }

    /// The glue's session task for one connection: read frames while the session wants them,
    /// forward its requests, write its frames (then report the flush), close when it closes.
    pub(super) fn pump_conn(&mut self, n: usize, id: ConnId) {
        let now = self.now;
        let Some(k) = self.nodes[n].conns.get_mut(&id) else {
            return;
        };
        session_io(now, k);
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
        self.forward_requests(n, id);
        for seg in segs {
            self.send_to_client(n, client, id, seg);
        }
        if let Some(t) = arm {
            self.schedule_at(t.max(now), Event::NodeTimer { node: n, conn: id });
        }
        if done {
            self.nodes[n].conns.remove(&id);
            self.nodes[n].sessions.remove(&session);
        }
    }

    /// A session's requests, batched by its router, into the shards' input channels.
    pub(super) fn forward_requests(&mut self, n: usize, id: ConnId) {
        let node = &mut self.nodes[n];
        let Some(k) = node.conns.get_mut(&id) else {
            return;
        };
        while let Some((route, req)) = k.session.poll_request() {
            k.router.handle_request(self.now, route, req);
        }
        while let Some((shard, requests)) = k.router.poll_batch() {
            node.hosts[shard as usize].input.push_back(requests);
        }
    }

    /// A batch of replies for one session, as the node's adapter hands it over: into the
    /// session's bounded reply queue, or, when the queue is full, back to the host as refused
    /// (which closes the session). The simulator's own sessions (HTTP calls) take
    /// theirs at once.
    fn queue_replies(
        &mut self,
        n: usize,
        shard: ShardIdx,
        session: SessionId,
        replies: Vec<Reply>,
    ) -> Checked {
        let node = &self.nodes[n];
        if node.http.contains_key(&session) {
            for reply in replies {
                self.route_output(n, shard, Output { session, reply })?;
            }
            return Ok(());
        }
        let Some(&id) = node.sessions.get(&session) else {
            return Ok(()); // the session is gone; the shard will hear `Closed`
        };
        // An undersized queue is a fault: it ends with the fault phase, when the node's rule
        // (under which no queue may overflow) takes over, so the liveness phase can drain.
        let cap = if self.faults_on() {
            self.reply_queue_batches_max
        } else {
            self.reply_queue_rule
        };
        let k = self.nodes[n]
            .conns
            .get_mut(&id)
            .expect("sessions and conns agree");
        if k.replies.len() >= cap {
            self.counters.workload.reply_queue_overflows += 1;
            trace!(
                self,
                "s{shard} cannot queue replies for session {session}: closing it"
            );
            let t = self.time();
            self.nodes[n].hosts[shard as usize]
                .driver
                .handle_reply_refused(t, session);
            return Ok(());
        }
        k.replies.push_back((shard, replies));
        self.nodes[n].dirty.insert(id);
        Ok(())
    }

    /// The session task takes reply batches from its queue unless it is blocked writing (its
    /// socket holds `socket_window_frames` unacknowledged frames).
    fn take_replies(&mut self, n: usize, id: ConnId) -> Checked {
        loop {
            let window = self.options.socket_window_frames;
            let Some(k) = self.nodes[n].conns.get_mut(&id) else {
                return Ok(());
            };
            if k.stream.unacked() >= window {
                return Ok(());
            }
            let Some((shard, replies)) = k.replies.pop_front() else {
                return Ok(());
            };
            let session = k.session.id();
            for reply in replies {
                self.route_output(n, shard, Output { session, reply })?;
            }
        }
    }

    /// A shard's output: the checkers see it first (what a shard says is its promise, whether
    /// or not the client ever reads it), then the session it is for.
    pub(super) fn route_output(&mut self, n: usize, shard: ShardIdx, o: Output) -> Checked {
        let node = &mut self.nodes[n];
        if node.http.contains_key(&o.session) {
            return self.http_reply(n, shard, o);
        }
        let Some(&id) = node.sessions.get(&o.session) else {
            return Ok(()); // the session is gone; the shard will hear `Closed`
        };
        if let Reply::Frame(frame) = &o.reply {
            self.check_frame(n, shard, id, frame)?;
        }
        let node = &mut self.nodes[n];
        let k = node.conns.get_mut(&id).expect("looked up above");
        k.session.handle_reply(self.now, shard, o.reply);
        node.dirty.insert(id);
        Ok(())
    }
}

/// The session task's socket work on one connection: frames in while the session wants
/// them, its frames out (then the flush reported), the socket closed behind a closed session.
fn session_io(now: u64, k: &mut NodeConn) {
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
}

impl Simulation {
    /// Creates each node's mesh and its peers on the mesh's shard, without faults.
    pub(super) fn setup(&mut self) -> Checked {
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
            mesh: MeshId::must(MESH),
        }];
        for (i, &c) in node.clients.iter().enumerate() {
            let c = &self.clients[c];
            ops.push(ShardOp::AddPeer {
                r: i as u64 + 1,
                mesh: MeshId::must(MESH),
                peer: PeerId::must(&c.peer),
                groups: node.model.groups[i]
                    .clone()
                    .iter()
                    .map(|g| GroupId::must(g))
                    .collect(),
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
                Effect::Read(job) => {
                    let done = job.perform(&mut host.disk);
                    host.driver.handle_read_done(t, done);
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
}

/// A frame for the simulated socket: its type byte, then its bytes.
fn frame_bytes(f: &OutFrame) -> Bytes {
    let mut b = Vec::with_capacity(f.bytes.len() + 1);
    b.push(if f.binary { FRAME_BINARY } else { FRAME_TEXT });
    b.extend_from_slice(&f.bytes);
    Bytes::from(b)
}
