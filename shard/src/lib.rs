//! The shard core: one shard's log, inboxes, conversations and drains, as a deterministic state
//! machine. It owns the WAL *format* and *policy* (what to write, when to rotate, what to
//! delete); the glue owns the files.
//!
//! # The loop (raft-rs's Ready, quinn-proto's poll style)
//!
//! ```text
//! glue                                   Shard
//! ----                                   -----
//! handle_requests(now, batch)      ->    validate, assign pos/seq, frame WAL records into the
//!                                        building batch, queue acks as *pending*
//! poll_wal()                       <-    the building batch (one write + one fdatasync), if no
//!                                        write is in flight: this is group commit
//! write, fdatasync, then
//! handle_wal_done(now, last_lsn)   ->    release the pending acks up to last_lsn, make the new
//!                                        data visible, queue drains, maybe start retention
//! poll_output() until None         <-    acks, errors, welcomes, deliveries, events
//! ```
//!
//! Invariants, asserted where they are cheap:
//! - An `Ok` for a write leaves `poll_output` only after `handle_wal_done` covered its LSN.
//! - Deliveries and events carry only durable data (at or below the durable pos/seq).
//! - At most one WAL write is in flight; LSNs are dense and strictly increasing.
//! - A segment is deleted only after a durable checkpoint that makes it unnecessary.

pub mod record;
pub mod wal;

use ed25519_dalek::{Signature, VerifyingKey};
use fabric_proto::hello::{hello_message, HELLO_SKEW_MS_MAX, SIGNATURE_BYTES};
use fabric_proto::internal::{HelloProof, Output, Reply, Request, SessionId, ShardIdx, ShardOp};
use fabric_proto::{Body, DeliveredEvent, ErrorCode, ProtoError, ServerOp, Target};
use record::*;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Limits of one shard. Units are last in every name.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub shard: ShardIdx,
    /// Rotate to a new segment once the current one holds this much.
    pub wal_segment_bytes_max: u64,
    /// Stop taking requests while the building batch is this large (the glue stops reading its
    /// input channel, which fills, which stops the sessions reading their sockets).
    pub wal_batch_bytes_max: usize,
    /// Delete the oldest segments once the WAL is larger than this, keeping unacknowledged
    /// inbox messages (copied forward) and all metadata (checkpointed).
    pub retention_bytes_max: u64,
    /// Frames pushed to a session before it must report them flushed.
    pub push_credit_frames_max: u32,
    /// Log entries one drain of one session may look at before yielding to the next session.
    pub drain_scan_entries_max: usize,
    /// Writes waiting for durability before the shard stops taking requests.
    pub pending_acks_max: usize,
    /// Planted bugs for the simulator's checkers. Always off in a node.
    pub planted: PlantedBugs,
}

impl Default for ShardConfig {
    fn default() -> ShardConfig {
        ShardConfig {
            shard: 0,
            wal_segment_bytes_max: 64 * 1024 * 1024,
            wal_batch_bytes_max: 4 * 1024 * 1024,
            retention_bytes_max: 256 * 1024 * 1024,
            push_credit_frames_max: 1024,
            drain_scan_entries_max: 4096,
            pending_acks_max: 65_536,
            planted: PlantedBugs::default(),
        }
    }
}

/// Known bugs the simulator plants one at a time to prove its checkers can fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlantedBugs {
    /// Acknowledge writes when they are framed, before the WAL reports them durable.
    pub ack_before_fsync: bool,
    /// Accept records whose checksum does not match during recovery.
    pub skip_crc_on_recovery: bool,
    /// Forget to log inbox cursor moves (acks are lost across restarts).
    pub lose_cursor_update: bool,
}

/// One write for the glue: append `bytes` to segment `segment` (creating the file, and fsyncing
/// its directory, if `create`), fdatasync, then report `handle_wal_done(last_lsn)`. Delete the
/// segments in `delete` after that (their deletion is already safe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalWrite {
    pub segment: u64,
    pub create: bool,
    pub bytes: Vec<u8>,
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub records: u64,
    pub delete: Vec<u64>,
}

/// Plain counters the glue exports as metrics.
#[derive(Debug, Clone, Default)]
pub struct ShardStats {
    pub records_written: u64,
    pub bytes_written: u64,
    pub wal_writes: u64,
    pub acks_released: u64,
    pub errors_sent: u64,
    pub deliveries: u64,
    pub events_pushed: u64,
    pub segments_deleted: u64,
    pub records_copied_forward: u64,
    /// Retention rounds skipped because unacknowledged inbox data filled the oldest segment.
    pub retention_blocked: u64,
    /// `ok`s released for sends (they carry a `pos`).
    pub sends_acked: u64,
    /// `ok`s sent for appends (they carry a `seq`), including answers to retried keys.
    pub appends_acked: u64,
    /// Deliveries of a position this shard incarnation had already delivered to that peer
    /// (a reconnect before the ack). Counted within `deliveries` too.
    pub redeliveries: u64,
}

/// Inbox messages waiting for their recipients' acknowledgement: messages addressed to a peer
/// beyond its acknowledged cursor, counted by walking the retained log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Summed over peers (a group or `*` message counts once per recipient).
    pub sum: u64,
    /// The largest single peer's.
    pub max: u64,
    /// The walk stopped at its entry budget: `sum` and `max` are lower bounds.
    pub truncated: bool,
}

/// One mesh's inbox figures, for the meshes an operator opted in to per-mesh metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshStats {
    /// The mesh's last durable inbox position (every send gets the next one).
    pub durable_pos: u64,
    pub peers: u64,
    /// Sessions attached to the mesh's inboxes.
    pub sessions: u64,
    pub backlog: Backlog,
}

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("WAL corrupt in {file} at byte {offset}: {reason}")]
    Corrupt {
        file: String,
        offset: u64,
        reason: String,
    },
    #[error("WAL segment {file} is out of order: segment {id} after {previous}")]
    OutOfOrder {
        file: String,
        id: u64,
        previous: u64,
    },
}

/// What recovery found and what the glue must do before serving.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: u64,
    pub records: u64,
    pub bytes: u64,
    /// Truncate this segment to this length (a torn tail was found).
    pub truncate: Option<(u64, u64)>,
    pub truncated_bytes: u64,
}

#[derive(Debug, Clone)]
struct SegmentInfo {
    id: u64,
    first_lsn: u64,
    last_lsn: u64,
    bytes: u64,
}

#[derive(Debug, Clone)]
enum StoredTarget {
    Peer(u32),
    Group(Arc<str>),
    All,
}

#[derive(Debug, Clone)]
struct InboxMsg {
    from: u32,
    to: StoredTarget,
    body: Body,
    ts: u64,
    lsn: u64,
}

#[derive(Debug, Clone)]
struct Peer {
    id: Arc<str>,
    groups: Vec<Arc<str>>,
    /// `None`: the peer has no token (it says hello with its key).
    token_hash: Option<[u8; 32]>,
    /// The ed25519 public key key hellos are verified with.
    public_key: Option<[u8; 32]>,
    acked: u64,
    /// Highest position delivered to this peer by this incarnation (for counting redeliveries;
    /// not persisted).
    delivered_upto: u64,
    /// `acked` moved since the last cursor record was framed.
    cursor_unlogged: bool,
    /// Seen only in data records so far (recovery before the checkpoint that names it).
    placeholder: bool,
}

#[derive(Debug, Default)]
struct Mesh {
    id: Arc<str>,
    exists: bool,
    peers: Vec<Peer>,
    peer_index: HashMap<Arc<str>, u32>,
    token_index: HashMap<[u8; 32], u32>,
    log: BTreeMap<u64, InboxMsg>,
    head: u64,
    durable_pos: u64,
    /// Sessions attached to this mesh's inboxes (in attach order).
    sessions: Vec<SessionId>,
    /// Listed in the building batch's `Dirty` (one entry per mesh per batch, not per send).
    in_building: bool,
}

impl Mesh {
    fn new(id: Arc<str>) -> Mesh {
        Mesh {
            id,
            ..Mesh::default()
        }
    }

    fn ensure_peer(&mut self, id: &Arc<str>) -> u32 {
        if let Some(i) = self.peer_index.get(id) {
            return *i;
        }
        let i = self.peers.len() as u32;
        self.peers.push(Peer {
            id: id.clone(),
            groups: Vec::new(),
            token_hash: None,
            public_key: None,
            acked: 0,
            delivered_upto: 0,
            cursor_unlogged: false,
            placeholder: true,
        });
        self.peer_index.insert(id.clone(), i);
        i
    }

    fn define_peer(
        &mut self,
        id: &Arc<str>,
        groups: Vec<Arc<str>>,
        token_hash: Option<[u8; 32]>,
        public_key: Option<[u8; 32]>,
    ) {
        let i = self.ensure_peer(id) as usize;
        let p = &mut self.peers[i];
        if p.placeholder {
            p.placeholder = false;
            p.groups = groups;
            p.token_hash = token_hash;
            p.public_key = public_key;
            if let Some(h) = token_hash {
                self.token_index.insert(h, i as u32);
            }
        }
    }

    fn stored_target(&mut self, t: &Target) -> StoredTarget {
        match t {
            Target::Peer(p) => StoredTarget::Peer(self.ensure_peer(p)),
            Target::Group(g) => StoredTarget::Group(g.clone()),
            Target::All => StoredTarget::All,
        }
    }

    fn wire_target(&self, t: &StoredTarget) -> Target {
        match t {
            StoredTarget::Peer(i) => Target::Peer(self.peers[*i as usize].id.clone()),
            StoredTarget::Group(g) => Target::Group(g.clone()),
            StoredTarget::All => Target::All,
        }
    }

    fn is_recipient(&self, msg: &InboxMsg, peer: u32) -> bool {
        match &msg.to {
            StoredTarget::Peer(p) => *p == peer,
            StoredTarget::Group(g) => self.peers[peer as usize].groups.iter().any(|x| x == g),
            StoredTarget::All => msg.from != peer,
        }
    }

    /// Adds each peer's count of durable messages addressed to it beyond its cursor.
    fn add_backlog(&self, b: &mut Backlog, budget: &mut usize) {
        for (i, p) in self.peers.iter().enumerate() {
            if p.placeholder || p.acked >= self.durable_pos {
                continue;
            }
            let mut n = 0;
            for (_, msg) in self.log.range(p.acked + 1..=self.durable_pos) {
                if *budget == 0 {
                    b.truncated = true;
                    break;
                }
                *budget -= 1;
                if self.is_recipient(msg, i as u32) {
                    n += 1;
                }
            }
            b.sum += n;
            b.max = b.max.max(n);
        }
    }

    /// Some recipient has not acknowledged this message yet.
    fn is_needed(&self, pos: u64, msg: &InboxMsg) -> bool {
        (0..self.peers.len() as u32)
            .any(|p| self.peers[p as usize].acked < pos && self.is_recipient(msg, p))
    }
}

#[derive(Debug, Clone)]
struct StoredEvent {
    seq: u64,
    from: Arc<str>,
    body: Body,
    ts: u64,
    lsn: u64,
    key: Option<Arc<str>>,
}

type ConvKey = (Arc<str>, Arc<str>);

#[derive(Debug)]
struct Conv {
    events: VecDeque<StoredEvent>,
    /// Seq of `events[0]`, or `head + 1` when empty.
    first_seq: u64,
    head: u64,
    durable_seq: u64,
    keys: HashMap<Arc<str>, u64>,
    subscribers: Vec<SessionId>,
    /// Listed in the building batch's `Dirty` (one entry per conversation per batch).
    in_building: bool,
}

impl Default for Conv {
    fn default() -> Conv {
        // An empty conversation's next seq is 1, so its (empty) events start there.
        Conv {
            events: VecDeque::new(),
            first_seq: 1,
            head: 0,
            durable_seq: 0,
            keys: HashMap::new(),
            subscribers: Vec::new(),
            in_building: false,
        }
    }
}

impl Conv {
    fn push(&mut self, e: StoredEvent) {
        debug_assert!(e.seq > self.head);
        if self.events.is_empty() {
            self.first_seq = e.seq;
        }
        self.head = e.seq;
        if let Some(k) = &e.key {
            self.keys.insert(k.clone(), e.seq);
        }
        self.events.push_back(e);
    }

    fn get(&self, seq: u64) -> Option<&StoredEvent> {
        let i = seq.checked_sub(self.first_seq)? as usize;
        self.events.get(i)
    }
}

#[derive(Debug)]
struct Sub {
    key: ConvKey,
    next_seq: u64,
}

#[derive(Debug)]
struct SessionState {
    credit: u32,
    queued: bool,
    inbox: Option<(Arc<str>, u32, u64)>, // mesh, peer, next pos to look at
    subs: Vec<Sub>,
    /// The nonce of the last key hello on this session (each nonce proves one hello only).
    hello_nonce: Option<[u8; 32]>,
}

/// The set of entities a WAL batch made durable, applied on `handle_wal_done`: each mesh and
/// conversation once, in the order it was first written, with its head when the batch was
/// cut (`poll_wal` fills the heads in). Per-message entries would make `handle_wal_done`
/// queue every attached session once per message.
#[derive(Debug, Default)]
struct Dirty {
    meshes: Vec<(Arc<str>, u64)>,
    convs: Vec<(ConvKey, u64)>,
}

#[derive(Debug)]
struct Inflight {
    last_lsn: u64,
    dirty: Dirty,
}

#[derive(Debug)]
enum Retention {
    Idle,
    /// A checkpoint at `checkpoint_lsn` makes segment `segment` unnecessary once durable.
    AwaitingCheckpoint {
        checkpoint_lsn: u64,
        segment: u64,
    },
}

pub struct Shard {
    config: ShardConfig,
    meshes: HashMap<Arc<str>, Mesh>,
    convs: HashMap<ConvKey, Conv>,
    sessions: HashMap<SessionId, SessionState>,
    drain_queue: VecDeque<SessionId>,

    segments: VecDeque<SegmentInfo>,
    wal_bytes: u64,
    next_lsn: u64,
    durable_lsn: u64,
    building: Vec<u8>,
    building_first_lsn: u64,
    building_records: u64,
    building_dirty: Dirty,
    /// An emptied buffer of an earlier write, handed back by the glue
    /// ([`Shard::recycle_wal_buffer`]): the next batch is framed into memory that is already
    /// allocated and faulted in, instead of growing a new `Vec` by doubling every commit.
    spare_buffer: Vec<u8>,
    inflight: Option<Inflight>,
    pending: VecDeque<(u64, Output)>,
    deletes: Vec<u64>,
    retention: Retention,
    /// Peers whose cursor moved since their last cursor record, in the order they first moved.
    unlogged_cursors: Vec<(Arc<str>, u32)>,
    /// While the WAL is below this size, retention does not retry (see maybe_start_retention).
    retention_blocked_bytes: u64,
    failed: bool,

    out: VecDeque<Output>,
    stats: ShardStats,
}

fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The SHA-256 of a peer token, as stored (tokens themselves are never stored).
pub fn token_hash(token: &str) -> [u8; 32] {
    hash_token(token)
}

impl Shard {
    /// A shard with an empty WAL.
    pub fn new(config: ShardConfig) -> Shard {
        Shard {
            config,
            meshes: HashMap::new(),
            convs: HashMap::new(),
            sessions: HashMap::new(),
            drain_queue: VecDeque::new(),
            segments: VecDeque::new(),
            wal_bytes: 0,
            next_lsn: 1,
            durable_lsn: 0,
            building: Vec::new(),
            building_first_lsn: 1,
            building_records: 0,
            building_dirty: Dirty::default(),
            spare_buffer: Vec::new(),
            inflight: None,
            pending: VecDeque::new(),
            deletes: Vec::new(),
            retention: Retention::Idle,
            unlogged_cursors: Vec::new(),
            retention_blocked_bytes: 0,
            failed: false,
            out: VecDeque::new(),
            stats: ShardStats::default(),
        }
    }

    pub fn config(&self) -> &ShardConfig {
        &self.config
    }

    pub fn stats(&self) -> &ShardStats {
        &self.stats
    }

    /// The last LSN reported durable.
    pub fn durable_lsn(&self) -> u64 {
        self.durable_lsn
    }

    pub fn wal_bytes(&self) -> u64 {
        self.wal_bytes
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Total unacknowledged inbox messages retained, summed over peers, and the largest one.
    pub fn inbox_backlog(&self) -> (u64, u64) {
        let mut sum = 0;
        let mut max = 0;
        for m in self.meshes.values() {
            for p in &m.peers {
                let b = m.head.saturating_sub(p.acked);
                sum += b;
                max = max.max(b);
            }
        }
        (sum, max)
    }

    /// Inbox figures of one mesh, if this shard holds it. Walks the mesh's peers: meant for a
    /// few opted-in meshes at a metrics refresh, not for every request.
    pub fn mesh_stats(&self, mesh: &str, scan_entries_max: usize) -> Option<MeshStats> {
        let m = self.meshes.get(mesh).filter(|m| m.exists)?;
        let mut backlog = Backlog::default();
        let mut budget = scan_entries_max;
        m.add_backlog(&mut backlog, &mut budget);
        Some(MeshStats {
            durable_pos: m.durable_pos,
            peers: m.peers.iter().filter(|p| !p.placeholder).count() as u64,
            sessions: m.sessions.len() as u64,
            backlog,
        })
    }

    /// Every mesh's inbox backlog, walking at most `scan_entries_max` log entries in all (a
    /// metrics refresh, not a per-request call).
    pub fn inbox_backlog_scan(&self, scan_entries_max: usize) -> Backlog {
        let mut backlog = Backlog::default();
        let mut budget = scan_entries_max;
        for m in self.meshes.values().filter(|m| m.exists) {
            m.add_backlog(&mut backlog, &mut budget);
        }
        backlog
    }

    /// False while the shard wants no more requests (its batch or pending acks are full). The
    /// glue then leaves requests in its bounded input channel: backpressure.
    pub fn wants_input(&self) -> bool {
        self.building.len() < self.config.wal_batch_bytes_max
            && self.pending.len() < self.config.pending_acks_max
    }

    pub fn handle_requests(&mut self, now: u64, batch: impl IntoIterator<Item = Request>) {
        for req in batch {
            self.handle_request(now, req);
        }
    }

    pub fn handle_request(&mut self, now: u64, req: Request) {
        let session = req.session;
        let r = match &req.op {
            ShardOp::CreateMesh { r, .. }
            | ShardOp::AddPeer { r, .. }
            | ShardOp::Auth { r, .. }
            | ShardOp::Send { r, .. }
            | ShardOp::Append { r, .. }
            | ShardOp::Subscribe { r, .. }
            | ShardOp::Unsubscribe { r, .. }
            | ShardOp::Read { r, .. } => Some(*r),
            _ => None,
        };
        if let Err(e) = self.apply_request(now, req) {
            self.stats.errors_sent += 1;
            self.emit(session, Reply::Frame(ServerOp::error(r, e)));
        }
    }

    fn apply_request(&mut self, now: u64, req: Request) -> Result<(), ProtoError> {
        let session = req.session;
        let writes = matches!(
            req.op,
            ShardOp::CreateMesh { .. }
                | ShardOp::AddPeer { .. }
                | ShardOp::Send { .. }
                | ShardOp::Append { .. }
        );
        if writes && self.failed {
            return Err(ProtoError::new(
                ErrorCode::Unavailable,
                "this shard's storage failed; it is restarting",
            ));
        }
        match req.op {
            ShardOp::CreateMesh { r, mesh } => {
                if self.meshes.get(&mesh).is_some_and(|m| m.exists) {
                    return Err(ProtoError::new(
                        ErrorCode::Conflict,
                        format!("mesh {mesh:?} already exists"),
                    ));
                }
                let m = self
                    .meshes
                    .entry(mesh.clone())
                    .or_insert_with(|| Mesh::new(mesh.clone()));
                m.exists = true;
                let lsn = self.log(Record::MeshCreated(MeshRec { mesh }));
                self.ack_at(lsn, session, Reply::Frame(ok(r, None, None)));
            }
            ShardOp::AddPeer {
                r,
                mesh,
                peer,
                groups,
                token_hash,
                public_key,
            } => {
                if token_hash.is_none() && public_key.is_none() {
                    return Err(ProtoError::bad_request(
                        "a peer needs a token, a public key, or both",
                    ));
                }
                if let Some(k) = &public_key {
                    VerifyingKey::from_bytes(k).map_err(|_| {
                        ProtoError::bad_request("the public key is not a valid ed25519 point")
                    })?;
                }
                let m = self.mesh_mut(&mesh)?;
                if m.peer_index
                    .get(&peer)
                    .is_some_and(|i| !m.peers[*i as usize].placeholder)
                {
                    return Err(ProtoError::new(
                        ErrorCode::Conflict,
                        format!("peer {peer:?} already exists in mesh {mesh:?}"),
                    ));
                }
                m.define_peer(&peer, groups.clone(), token_hash, public_key);
                // Token-only peers keep the original record type, so a WAL without keys stays
                // readable by an older node.
                let record = match (token_hash, public_key) {
                    (Some(token_hash), None) => Record::PeerAdded(PeerRec {
                        mesh,
                        peer,
                        groups,
                        token_hash,
                    }),
                    (token_hash, Some(public_key)) => Record::PeerKeyAdded(PeerKeyRec {
                        mesh,
                        peer,
                        groups,
                        token_hash,
                        public_key,
                    }),
                    (None, None) => unreachable!("refused above"),
                };
                let lsn = self.log(record);
                self.ack_at(lsn, session, Reply::Frame(ok(r, None, None)));
            }
            ShardOp::Hello {
                mesh,
                peer,
                token,
                proof,
            } => {
                let (acked, head, idx) = match proof {
                    None => self.authenticate(&mesh, Some(&peer), &token)?,
                    Some(proof) => self.authenticate_key(now, session, &mesh, &peer, &proof)?,
                };
                let m = self
                    .meshes
                    .get_mut(&mesh)
                    .expect("authenticated mesh exists");
                if !m.sessions.contains(&session) {
                    m.sessions.push(session);
                }
                let s = self.session_state(session);
                s.inbox = Some((mesh, idx, acked + 1));
                self.emit(
                    session,
                    Reply::Frame(ServerOp::Welcome {
                        session,
                        acked,
                        head,
                    }),
                );
                self.queue_drain(session);
            }
            ShardOp::Auth { r, mesh, token } => {
                let (_, _, idx) = self.authenticate(&mesh, None, &token)?;
                let peer = self.meshes[&mesh].peers[idx as usize].id.clone();
                self.emit(session, Reply::Authed { r, peer });
            }
            ShardOp::Send {
                r,
                mesh,
                from,
                to,
                body,
            } => {
                let lsn = self.next_lsn;
                let m = self.mesh_mut(&mesh)?;
                if let Target::Peer(p) = &to {
                    if m.peer_index
                        .get(p)
                        .is_none_or(|i| m.peers[*i as usize].placeholder)
                    {
                        return Err(ProtoError::new(
                            ErrorCode::NotFound,
                            format!("peer {p:?} is not a member of mesh {mesh:?}"),
                        ));
                    }
                }
                let from_idx = m.ensure_peer(&from);
                let stored_to = m.stored_target(&to);
                m.head += 1;
                let pos = m.head;
                m.log.insert(
                    pos,
                    InboxMsg {
                        from: from_idx,
                        to: stored_to,
                        body: body.clone(),
                        ts: now,
                        lsn,
                    },
                );
                if !m.in_building {
                    m.in_building = true;
                    self.building_dirty.meshes.push((mesh.clone(), 0));
                }
                let logged = self.log(Record::Sent(SentRec {
                    mesh,
                    pos,
                    from,
                    to,
                    body,
                    ts: now,
                }));
                debug_assert_eq!(logged, lsn);
                self.ack_at(lsn, session, Reply::Frame(ok(r, Some(pos), None)));
            }
            ShardOp::Append {
                r,
                mesh,
                conv,
                from,
                body,
                key,
            } => {
                let ck = (mesh.clone(), conv.clone());
                let c = self.convs.entry(ck.clone()).or_default();
                if let Some(k) = &key {
                    if let Some(&seq) = c.keys.get(k) {
                        // A retry: answer with the original seq once the original is durable.
                        let reply = Reply::Frame(ok(r, None, Some(seq)));
                        if seq <= c.durable_seq {
                            self.stats.appends_acked += 1;
                            self.emit(session, reply);
                        } else {
                            let lsn = self.next_lsn - 1;
                            self.ack_at(lsn, session, reply);
                        }
                        return Ok(());
                    }
                }
                let seq = c.head + 1;
                let lsn = self.next_lsn;
                c.push(StoredEvent {
                    seq,
                    from: from.clone(),
                    body: body.clone(),
                    ts: now,
                    lsn,
                    key: key.clone(),
                });
                if !c.in_building {
                    c.in_building = true;
                    self.building_dirty.convs.push((ck, 0));
                }
                self.log(Record::Appended(AppendedRec {
                    mesh,
                    conv,
                    seq,
                    from,
                    body,
                    key,
                    ts: now,
                }));
                self.ack_at(lsn, session, Reply::Frame(ok(r, None, Some(seq))));
            }
            ShardOp::Subscribe {
                r,
                mesh,
                conv,
                from,
            } => {
                let ck = (mesh, conv);
                let c = self.convs.entry(ck.clone()).or_default();
                if !c.subscribers.contains(&session) {
                    c.subscribers.push(session);
                }
                let s = self.session_state(session);
                let next_seq = from.max(1);
                match s.subs.iter_mut().find(|x| x.key == ck) {
                    Some(sub) => sub.next_seq = next_seq,
                    None => s.subs.push(Sub { key: ck, next_seq }),
                }
                // The ok goes out before any event of the subscription.
                self.emit(session, Reply::Frame(ok(r, None, None)));
                self.queue_drain(session);
            }
            ShardOp::Unsubscribe { r, mesh, conv } => {
                let ck = (mesh, conv);
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.subs.retain(|x| x.key != ck);
                }
                if let Some(c) = self.convs.get_mut(&ck) {
                    c.subscribers.retain(|x| *x != session);
                }
                self.emit(session, Reply::Frame(ok(r, None, None)));
            }
            ShardOp::Read {
                r,
                mesh,
                conv,
                from,
                limit,
            } => {
                let limit = limit.min(fabric_proto::READ_LIMIT_MAX) as u64;
                let (events, head) = match self.convs.get(&(mesh, conv.clone())) {
                    None => (Vec::new(), 0),
                    Some(c) => {
                        let start = from.max(c.first_seq);
                        let end = c
                            .durable_seq
                            .min(start.saturating_add(limit).saturating_sub(1));
                        let events = (start..=end)
                            .filter_map(|seq| c.get(seq))
                            .map(|e| delivered(&conv, e))
                            .collect();
                        (events, c.durable_seq)
                    }
                };
                self.emit(session, Reply::Messages { r, events, head });
            }
            ShardOp::Ack { mesh, peer, upto } => {
                let lose_cursor_update = self.config.planted.lose_cursor_update;
                let m = self.mesh_mut(&mesh)?;
                let Some(&idx) = m.peer_index.get(&peer) else {
                    return Err(ProtoError::new(
                        ErrorCode::NotFound,
                        "ack from an unknown peer",
                    ));
                };
                let upto = upto.min(m.durable_pos);
                let p = &mut m.peers[idx as usize];
                if upto > p.acked {
                    p.acked = upto;
                    // One cursor record per peer per group commit, however often it acks:
                    // the record is framed with the peer's latest cursor in `poll_wal`.
                    if !p.cursor_unlogged && !lose_cursor_update {
                        p.cursor_unlogged = true;
                        self.unlogged_cursors.push((mesh, idx));
                    }
                }
            }
            ShardOp::Flushed { frames } => {
                let max = self.config.push_credit_frames_max;
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.credit = s.credit.saturating_add(frames).min(max);
                    self.queue_drain(session);
                }
            }
            ShardOp::Closed => self.detach(session),
        }
        Ok(())
    }

    /// The shard's state for a session, made on its first attaching request.
    fn session_state(&mut self, session: SessionId) -> &mut SessionState {
        let credit = self.config.push_credit_frames_max;
        self.sessions
            .entry(session)
            .or_insert_with(|| SessionState {
                credit,
                queued: false,
                inbox: None,
                subs: Vec::new(),
                hello_nonce: None,
            })
    }

    fn authenticate(
        &self,
        mesh: &str,
        peer: Option<&str>,
        token: &str,
    ) -> Result<(u64, u64, u32), ProtoError> {
        let refuse = || {
            ProtoError::new(
                ErrorCode::Unauthorized,
                "unknown mesh, unknown peer or wrong token",
            )
        };
        let m = self
            .meshes
            .get(mesh)
            .filter(|m| m.exists)
            .ok_or_else(refuse)?;
        let hash = hash_token(token);
        let idx = match peer {
            Some(p) => *m.peer_index.get(p).ok_or_else(refuse)?,
            None => *m.token_index.get(&hash).ok_or_else(refuse)?,
        };
        let p = &m.peers[idx as usize];
        let token_ok = p
            .token_hash
            .is_some_and(|stored| bool::from(stored.ct_eq(&hash)));
        if p.placeholder || !token_ok {
            return Err(refuse());
        }
        Ok((p.acked, m.durable_pos, idx))
    }

    /// A key hello: the signature over the hello message with the nonce the session issued,
    /// verified with the peer's stored public key. Each refusal says which check failed; none
    /// says whether the mesh or peer exists.
    fn authenticate_key(
        &mut self,
        now: u64,
        session: SessionId,
        mesh: &str,
        peer: &str,
        proof: &HelloProof,
    ) -> Result<(u64, u64, u32), ProtoError> {
        let refuse = |message: String| ProtoError::new(ErrorCode::Unauthorized, message);
        // The nonce is single-use per session, whatever the outcome of its first use.
        let s = self.session_state(session);
        if s.hello_nonce == Some(proof.nonce) {
            return Err(refuse(
                "this session's nonce was already used by a hello; reconnect for a new one".into(),
            ));
        }
        s.hello_nonce = Some(proof.nonce);
        let skew = now.abs_diff(proof.ts);
        if skew > HELLO_SKEW_MS_MAX {
            return Err(refuse(format!(
                "hello ts {} is {skew} ms from the node's clock {now}; the limit is \
                 {HELLO_SKEW_MS_MAX} (hello_skew_ms_max)",
                proof.ts
            )));
        }
        let unknown =
            || refuse("unknown mesh or peer, or no public key registered for the peer".into());
        let m = self
            .meshes
            .get(mesh)
            .filter(|m| m.exists)
            .ok_or_else(unknown)?;
        let idx = *m.peer_index.get(peer).ok_or_else(unknown)?;
        let p = &m.peers[idx as usize];
        let key = p
            .public_key
            .filter(|_| !p.placeholder)
            .ok_or_else(unknown)?;
        let key = VerifyingKey::from_bytes(&key).map_err(|_| unknown())?;
        let sig: [u8; SIGNATURE_BYTES] = proof
            .sig
            .as_slice()
            .try_into()
            .map_err(|_| refuse("bad signature: not 64 bytes".into()))?;
        let message = hello_message(mesh, peer, proof.ts, &proof.nonce);
        key.verify_strict(&message, &Signature::from_bytes(&sig))
            .map_err(|_| {
                refuse(
                    "bad signature: it does not verify with the peer's public key over this \
                     session's nonce"
                        .into(),
                )
            })?;
        Ok((p.acked, m.durable_pos, idx))
    }

    fn mesh_mut(&mut self, mesh: &Arc<str>) -> Result<&mut Mesh, ProtoError> {
        self.meshes
            .get_mut(mesh)
            .filter(|m| m.exists)
            .ok_or_else(|| ProtoError::new(ErrorCode::NotFound, format!("no mesh {mesh:?}")))
    }

    fn detach(&mut self, session: SessionId) {
        let Some(s) = self.sessions.remove(&session) else {
            return;
        };
        if let Some((mesh, _, _)) = s.inbox {
            if let Some(m) = self.meshes.get_mut(&mesh) {
                m.sessions.retain(|x| *x != session);
            }
        }
        for sub in s.subs {
            if let Some(c) = self.convs.get_mut(&sub.key) {
                c.subscribers.retain(|x| *x != session);
            }
        }
    }

    /// Frames a record into the building batch and returns its LSN.
    fn log(&mut self, record: Record) -> u64 {
        let lsn = self.next_lsn;
        if self.building.is_empty() {
            self.building_first_lsn = lsn;
        }
        let framed = wal::encode_record(lsn, &record, &mut self.building);
        self.next_lsn += 1;
        self.building_records += 1;
        self.stats.records_written += 1;
        self.stats.bytes_written += framed as u64;
        lsn
    }

    fn ack_at(&mut self, lsn: u64, session: SessionId, reply: Reply) {
        if self.config.planted.ack_before_fsync {
            self.emit(session, reply);
            return;
        }
        debug_assert!(self.pending.back().is_none_or(|(l, _)| *l <= lsn));
        self.pending.push_back((lsn, Output { session, reply }));
    }

    fn emit(&mut self, session: SessionId, reply: Reply) {
        self.out.push_back(Output { session, reply });
    }

    fn queue_drain(&mut self, session: SessionId) {
        if let Some(s) = self.sessions.get_mut(&session) {
            if !s.queued {
                s.queued = true;
                self.drain_queue.push_back(session);
            }
        }
    }

    /// The next WAL write, if one is due and none is in flight.
    pub fn poll_wal(&mut self) -> Option<WalWrite> {
        if self.inflight.is_some() {
            return None;
        }
        for (mesh, idx) in std::mem::take(&mut self.unlogged_cursors) {
            let Some(m) = self.meshes.get_mut(&mesh) else {
                continue;
            };
            let p = &mut m.peers[idx as usize];
            p.cursor_unlogged = false;
            let rec = AckedRec {
                mesh,
                peer: p.id.clone(),
                upto: p.acked,
            };
            self.log(Record::Acked(rec));
        }
        if self.building.is_empty() && self.deletes.is_empty() {
            return None;
        }
        let bytes = std::mem::replace(&mut self.building, std::mem::take(&mut self.spare_buffer));
        let records = std::mem::take(&mut self.building_records);
        let first_lsn = self.building_first_lsn;
        let last_lsn = self.next_lsn - 1;
        let mut create = false;
        let rotate = match self.segments.back() {
            None => true,
            Some(s) => {
                s.bytes > 0 && s.bytes + bytes.len() as u64 > self.config.wal_segment_bytes_max
            }
        };
        if rotate && !bytes.is_empty() {
            let id = self.segments.back().map_or(1, |s| s.id + 1);
            self.segments.push_back(SegmentInfo {
                id,
                first_lsn,
                last_lsn: first_lsn - 1,
                bytes: 0,
            });
            create = true;
        }
        let seg = self.segments.back_mut();
        let segment = seg.as_ref().map_or(0, |s| s.id);
        if let Some(seg) = seg {
            if !bytes.is_empty() {
                debug_assert_eq!(seg.last_lsn + 1, first_lsn, "LSNs are dense across writes");
                seg.last_lsn = last_lsn;
                seg.bytes += bytes.len() as u64;
                self.wal_bytes += bytes.len() as u64;
            }
        }
        let mut dirty = std::mem::take(&mut self.building_dirty);
        for (mesh, pos) in &mut dirty.meshes {
            if let Some(m) = self.meshes.get_mut(mesh) {
                m.in_building = false;
                *pos = m.head;
            }
        }
        for (ck, seq) in &mut dirty.convs {
            if let Some(c) = self.convs.get_mut(ck) {
                c.in_building = false;
                *seq = c.head;
            }
        }
        self.inflight = Some(Inflight { last_lsn, dirty });
        self.stats.wal_writes += 1;
        Some(WalWrite {
            segment,
            create,
            bytes,
            first_lsn,
            last_lsn,
            records,
            delete: std::mem::take(&mut self.deletes),
        })
    }

    /// The glue wrote and fdatasynced everything up to `last_lsn`.
    pub fn handle_wal_done(&mut self, _now: u64, last_lsn: u64) {
        let Some(inflight) = self.inflight.take() else {
            debug_assert!(false, "wal done with no write in flight");
            return;
        };
        assert_eq!(inflight.last_lsn, last_lsn, "WAL writes complete in order");
        assert!(last_lsn >= self.durable_lsn, "durability never goes back");
        self.durable_lsn = last_lsn;
        while self.pending.front().is_some_and(|(l, _)| *l <= last_lsn) {
            let (_, o) = self.pending.pop_front().expect("front exists");
            self.stats.acks_released += 1;
            match &o.reply {
                Reply::Frame(ServerOp::Ok { pos: Some(_), .. }) => self.stats.sends_acked += 1,
                Reply::Frame(ServerOp::Ok { seq: Some(_), .. }) => self.stats.appends_acked += 1,
                _ => {}
            }
            self.out.push_back(o);
        }
        for (mesh, pos) in inflight.dirty.meshes {
            let sessions = match self.meshes.get_mut(&mesh) {
                Some(m) if pos > m.durable_pos => {
                    m.durable_pos = pos;
                    m.sessions.clone()
                }
                _ => continue,
            };
            for s in sessions {
                self.queue_drain(s);
            }
        }
        for (ck, seq) in inflight.dirty.convs {
            let subs = match self.convs.get_mut(&ck) {
                Some(c) if seq > c.durable_seq => {
                    c.durable_seq = seq;
                    c.subscribers.clone()
                }
                _ => continue,
            };
            for s in subs {
                self.queue_drain(s);
            }
        }
        if let Retention::AwaitingCheckpoint {
            checkpoint_lsn,
            segment,
        } = self.retention
        {
            if last_lsn >= checkpoint_lsn {
                let seg = self.segments.pop_front().expect("retained segment exists");
                assert_eq!(seg.id, segment, "segments are deleted oldest first");
                assert!(
                    seg.first_lsn <= checkpoint_lsn,
                    "the checkpoint is newer than the segment"
                );
                self.wal_bytes -= seg.bytes;
                self.deletes.push(seg.id);
                self.stats.segments_deleted += 1;
                self.retention = Retention::Idle;
            }
        }
        self.maybe_start_retention();
    }

    /// Hands back the buffer of a finished [`WalWrite`] for the next batch. Optional: without
    /// it each batch starts in a new `Vec`. Only its allocation is kept, never its bytes.
    pub fn recycle_wal_buffer(&mut self, mut buffer: Vec<u8>) {
        buffer.clear();
        // A buffer larger than one batch may hold (a checkpoint can be) is not kept.
        if buffer.capacity() > 2 * self.config.wal_batch_bytes_max {
            return;
        }
        if self.building.is_empty() && buffer.capacity() > self.building.capacity() {
            self.building = buffer;
        } else if buffer.capacity() > self.spare_buffer.capacity() {
            self.spare_buffer = buffer;
        }
    }

    /// The glue could not write or sync the WAL. Nothing pending can be acknowledged: the
    /// writes fail with `unavailable`, and the shard refuses writes until it is recovered anew
    /// from disk (after a failed fsync the page cache cannot be trusted).
    pub fn handle_wal_failed(&mut self, _now: u64, reason: &str) {
        self.failed = true;
        self.inflight = None;
        let pending = std::mem::take(&mut self.pending);
        for (_, o) in pending {
            let r = match &o.reply {
                Reply::Frame(ServerOp::Ok { r, .. }) => Some(*r),
                _ => None,
            };
            self.stats.errors_sent += 1;
            self.emit(
                o.session,
                Reply::Frame(ServerOp::error(
                    r,
                    ProtoError::new(
                        ErrorCode::Unavailable,
                        format!("WAL write failed: {reason}"),
                    ),
                )),
            );
        }
    }

    /// Nothing is building, in flight or waiting for durability: every request taken in has
    /// been written, synced and answered.
    pub fn is_idle(&self) -> bool {
        self.building.is_empty()
            && self.inflight.is_none()
            && self.pending.is_empty()
            && self.deletes.is_empty()
            && self.unlogged_cursors.is_empty()
    }

    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// The sessions this shard holds state for (an attached inbox, subscriptions, push
    /// credit), in id order. Read-only: the simulator checks at quiescence that every one of
    /// them is still open on the node (a `Closed` that never reached this shard leaks them).
    pub fn session_ids(&self) -> Vec<SessionId> {
        let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    fn maybe_start_retention(&mut self) {
        if !matches!(self.retention, Retention::Idle)
            || self.wal_bytes
                <= self
                    .config
                    .retention_bytes_max
                    .max(self.retention_blocked_bytes)
            || self.segments.len() < 2
        {
            return;
        }
        let oldest = self.segments.front().expect("two segments").clone();
        // Inbox messages in the oldest segment that some recipient still needs must be copied
        // forward. Not a prefix in position order: a message copied by an earlier round has a
        // newer LSN than later positions still in the oldest segment. Meshes in id order, so
        // the copies get the same LSNs on every run (determinism).
        let mut mesh_ids: Vec<Arc<str>> = self.meshes.keys().cloned().collect();
        mesh_ids.sort();
        let mut copies = Vec::new();
        let mut drops = Vec::new();
        let mut copy_bytes = 0u64;
        for id in &mesh_ids {
            let m = &self.meshes[id];
            for (&pos, msg) in m.log.iter().filter(|(_, msg)| msg.lsn <= oldest.last_lsn) {
                if m.is_needed(pos, msg) {
                    copy_bytes += (msg.body.len() + wal::RECORD_HEADER_BYTES + 64) as u64;
                    copies.push(SentRec {
                        mesh: m.id.clone(),
                        pos,
                        from: m.peers[msg.from as usize].id.clone(),
                        to: m.wire_target(&msg.to),
                        body: msg.body.clone(),
                        ts: msg.ts,
                    });
                } else {
                    drops.push((id.clone(), pos));
                }
            }
        }
        // A round that would rewrite most of the segment gains nothing and, repeated on every
        // commit, would rewrite the backlog forever: unacknowledged inbox data larger than the
        // limit holds retention back until another segment's worth has been written.
        if copy_bytes * 2 > oldest.bytes {
            self.retention_blocked_bytes = self.wal_bytes + self.config.wal_segment_bytes_max;
            self.stats.retention_blocked += 1;
            return;
        }
        self.retention_blocked_bytes = 0;
        for (id, pos) in drops {
            if let Some(m) = self.meshes.get_mut(&id) {
                m.log.remove(&pos);
            }
        }
        // Conversation events in the oldest segment leave memory now; they stay on disk (and
        // come back on a restart) until the checkpoint is durable and the segment is deleted.
        for c in self.convs.values_mut() {
            while c.events.front().is_some_and(|e| e.lsn <= oldest.last_lsn) {
                let e = c.events.pop_front().expect("front exists");
                // The key may point to a newer, retained entry (a retry stored after a failed
                // write and a restart): only a key that points here leaves with this entry.
                if let Some(k) = e.key {
                    if c.keys.get(&k) == Some(&e.seq) {
                        c.keys.remove(&k);
                    }
                }
                c.first_seq = e.seq + 1;
            }
        }
        for rec in copies {
            let lsn = self.next_lsn;
            if let Some(msg) = self
                .meshes
                .get_mut(&rec.mesh)
                .and_then(|m| m.log.get_mut(&rec.pos))
            {
                msg.lsn = lsn;
            }
            self.log(Record::Sent(rec));
            self.stats.records_copied_forward += 1;
        }
        let checkpoint = self.checkpoint();
        let record = match checkpoint.to_v1() {
            Some(v1) => Record::Checkpoint(v1),
            None => Record::CheckpointV2(checkpoint),
        };
        let checkpoint_lsn = self.log(record);
        self.retention = Retention::AwaitingCheckpoint {
            checkpoint_lsn,
            segment: oldest.id,
        };
    }

    fn checkpoint(&self) -> CheckpointV2Rec {
        // Sorted, so that the same state always writes the same bytes (determinism).
        let mut meshes: Vec<MeshCheckpointV2> = self
            .meshes
            .values()
            .filter(|m| m.exists)
            .map(|m| MeshCheckpointV2 {
                mesh: m.id.clone(),
                head: m.head,
                peers: m
                    .peers
                    .iter()
                    .filter(|p| !p.placeholder)
                    .map(|p| PeerCheckpointV2 {
                        peer: p.id.clone(),
                        groups: p.groups.clone(),
                        token_hash: p.token_hash,
                        public_key: p.public_key,
                        acked: p.acked,
                    })
                    .collect(),
            })
            .collect();
        meshes.sort_by(|a, b| a.mesh.cmp(&b.mesh));
        let mut convs: Vec<ConvCheckpoint> = self
            .convs
            .iter()
            .filter(|(_, c)| c.head > 0)
            .map(|((m, c), v)| ConvCheckpoint {
                mesh: m.clone(),
                conv: c.clone(),
                head: v.head,
            })
            .collect();
        convs.sort_by(|a, b| (&a.mesh, &a.conv).cmp(&(&b.mesh, &b.conv)));
        CheckpointV2Rec { meshes, convs }
    }

    /// The next reply for a session: acks and errors first, then pushed deliveries and events.
    pub fn poll_output(&mut self) -> Option<Output> {
        loop {
            if let Some(o) = self.out.pop_front() {
                return Some(o);
            }
            let session = self.drain_queue.pop_front()?;
            self.drain(session);
        }
    }

    /// Pushes durable inbox messages and conversation events to one session, within its credit.
    fn drain(&mut self, session: SessionId) {
        let Some(mut s) = self.sessions.remove(&session) else {
            return;
        };
        s.queued = false;
        let mut scanned = 0usize;
        let scan_max = self.config.drain_scan_entries_max;
        let mut more = false;
        if let Some((mesh, peer, next)) = s.inbox.as_mut() {
            if let Some(m) = self.meshes.get(mesh) {
                let mut delivered_upto = m.peers[*peer as usize].delivered_upto;
                let mut last = *next;
                let visible = if *next <= m.durable_pos {
                    m.log.range(*next..=m.durable_pos)
                } else {
                    m.log.range(0..0)
                };
                for (&pos, msg) in visible {
                    if s.credit == 0 || scanned >= scan_max {
                        more = s.credit > 0;
                        break;
                    }
                    scanned += 1;
                    last = pos + 1;
                    if m.is_recipient(msg, *peer) {
                        s.credit -= 1;
                        self.stats.deliveries += 1;
                        if pos <= delivered_upto {
                            self.stats.redeliveries += 1;
                        } else {
                            delivered_upto = pos;
                        }
                        self.out.push_back(Output {
                            session,
                            reply: Reply::Frame(ServerOp::Deliver {
                                pos,
                                from: m.peers[msg.from as usize].id.clone(),
                                to: m.wire_target(&msg.to),
                                body: msg.body.clone(),
                                ts: msg.ts,
                            }),
                        });
                    }
                }
                if !more && s.credit > 0 {
                    last = last.max(m.durable_pos + 1);
                }
                *next = last;
                if let Some(m) = self.meshes.get_mut(mesh) {
                    m.peers[*peer as usize].delivered_upto = delivered_upto;
                }
            }
        }
        for sub in &mut s.subs {
            let Some(c) = self.convs.get(&sub.key) else {
                continue;
            };
            sub.next_seq = sub.next_seq.max(c.first_seq);
            while sub.next_seq <= c.durable_seq {
                if s.credit == 0 || scanned >= scan_max {
                    more |= s.credit > 0;
                    break;
                }
                let Some(e) = c.get(sub.next_seq) else { break };
                s.credit -= 1;
                scanned += 1;
                self.stats.events_pushed += 1;
                self.out.push_back(Output {
                    session,
                    reply: Reply::Frame(ServerOp::Event(delivered(&sub.key.1, e))),
                });
                sub.next_seq += 1;
            }
        }
        self.sessions.insert(session, s);
        if more {
            self.queue_drain(session);
        }
    }
}

fn ok(r: u64, pos: Option<u64>, seq: Option<u64>) -> ServerOp {
    ServerOp::Ok { r, pos, seq }
}

fn delivered(conv: &Arc<str>, e: &StoredEvent) -> DeliveredEvent {
    DeliveredEvent {
        conv: conv.clone(),
        seq: e.seq,
        from: e.from.clone(),
        body: e.body.clone(),
        ts: e.ts,
    }
}

/// Rebuilds a shard from its segments, oldest first.
pub struct Recoverer {
    shard: Shard,
    expect_lsn: Option<u64>,
    last_segment: Option<u64>,
    report: RecoveryReport,
}

impl Recoverer {
    pub fn new(config: ShardConfig) -> Recoverer {
        Recoverer {
            shard: Shard::new(config),
            expect_lsn: None,
            last_segment: None,
            report: RecoveryReport::default(),
        }
    }

    /// Feeds one segment's bytes. `is_last` says it is the newest segment: only there may a
    /// torn or corrupt tail be cut off; anywhere else it is an error naming file and offset.
    pub fn handle_segment(
        &mut self,
        id: u64,
        file: &str,
        bytes: &[u8],
        is_last: bool,
    ) -> Result<(), RecoverError> {
        if let Some(prev) = self.last_segment {
            if id <= prev {
                return Err(RecoverError::OutOfOrder {
                    file: file.to_string(),
                    id,
                    previous: prev,
                });
            }
        }
        self.last_segment = Some(id);
        let skip_crc = self.shard.config.planted.skip_crc_on_recovery;
        let scan = wal::scan_segment(bytes, self.expect_lsn, skip_crc);
        match &scan.stop {
            None | Some(wal::StopReason::ZeroTail) => {}
            // What a crash during a write leaves: cut it off, nothing acknowledged was there.
            Some(wal::StopReason::Torn | wal::StopReason::Corrupt(_)) if is_last => {
                self.report.truncate = Some((id, scan.valid_len));
                self.report.truncated_bytes = bytes.len() as u64 - scan.valid_len;
            }
            Some(reason) => {
                let reason = match reason {
                    wal::StopReason::Torn => "torn record in a segment that is not the last".into(),
                    wal::StopReason::Corrupt(r) | wal::StopReason::Invalid(r) => r.clone(),
                    wal::StopReason::ZeroTail => "zero bytes".into(),
                };
                return Err(RecoverError::Corrupt {
                    file: file.to_string(),
                    offset: scan.valid_len,
                    reason,
                });
            }
        }
        if matches!(scan.stop, Some(wal::StopReason::ZeroTail)) && is_last {
            self.report.truncate = Some((id, scan.valid_len));
            self.report.truncated_bytes = bytes.len() as u64 - scan.valid_len;
        }
        let first_lsn = scan.records.first().map_or(self.shard.next_lsn, |r| r.lsn);
        let mut last_lsn = first_lsn - 1;
        for rec in scan.records {
            last_lsn = rec.lsn;
            self.report.records += 1;
            self.apply(rec.lsn, rec.record);
        }
        self.shard.next_lsn = last_lsn + 1;
        self.expect_lsn = Some(last_lsn + 1);
        self.shard.segments.push_back(SegmentInfo {
            id,
            first_lsn,
            last_lsn,
            bytes: scan.valid_len,
        });
        self.shard.wal_bytes += scan.valid_len;
        self.report.segments += 1;
        self.report.bytes += scan.valid_len;
        Ok(())
    }

    fn apply(&mut self, lsn: u64, record: Record) {
        let s = &mut self.shard;
        match record {
            Record::MeshCreated(r) => {
                s.meshes
                    .entry(r.mesh.clone())
                    .or_insert_with(|| Mesh::new(r.mesh.clone()))
                    .exists = true;
            }
            Record::PeerAdded(r) => {
                let m = s
                    .meshes
                    .entry(r.mesh.clone())
                    .or_insert_with(|| Mesh::new(r.mesh.clone()));
                m.define_peer(&r.peer, r.groups, Some(r.token_hash), None);
            }
            Record::PeerKeyAdded(r) => {
                let m = s
                    .meshes
                    .entry(r.mesh.clone())
                    .or_insert_with(|| Mesh::new(r.mesh.clone()));
                m.define_peer(&r.peer, r.groups, r.token_hash, Some(r.public_key));
            }
            Record::Sent(r) => {
                let m = s
                    .meshes
                    .entry(r.mesh.clone())
                    .or_insert_with(|| Mesh::new(r.mesh.clone()));
                let from = m.ensure_peer(&r.from);
                let to = m.stored_target(&r.to);
                // A message copied forward by retention appears twice until the old segment is
                // gone; the newest copy's LSN is the one retention must see.
                m.log.insert(
                    r.pos,
                    InboxMsg {
                        from,
                        to,
                        body: r.body,
                        ts: r.ts,
                        lsn,
                    },
                );
                m.head = m.head.max(r.pos);
                m.durable_pos = m.head;
            }
            Record::Appended(r) => {
                let c = s.convs.entry((r.mesh, r.conv)).or_default();
                if r.seq > c.head {
                    c.push(StoredEvent {
                        seq: r.seq,
                        from: r.from,
                        body: r.body,
                        ts: r.ts,
                        lsn,
                        key: r.key,
                    });
                    c.durable_seq = c.head;
                }
            }
            Record::Acked(r) => {
                if let Some(m) = s.meshes.get_mut(&r.mesh) {
                    let i = m.ensure_peer(&r.peer) as usize;
                    m.peers[i].acked = m.peers[i].acked.max(r.upto);
                }
            }
            Record::Checkpoint(ck) => Self::apply_checkpoint(s, ck.into()),
            Record::CheckpointV2(ck) => Self::apply_checkpoint(s, ck),
        }
    }

    fn apply_checkpoint(s: &mut Shard, ck: CheckpointV2Rec) {
        for mc in ck.meshes {
            let m = s
                .meshes
                .entry(mc.mesh.clone())
                .or_insert_with(|| Mesh::new(mc.mesh.clone()));
            m.exists = true;
            m.head = m.head.max(mc.head);
            m.durable_pos = m.head;
            for pc in mc.peers {
                m.define_peer(&pc.peer, pc.groups, pc.token_hash, pc.public_key);
                let i = m.peer_index[&pc.peer] as usize;
                m.peers[i].acked = m.peers[i].acked.max(pc.acked);
            }
        }
        for cc in ck.convs {
            let c = s.convs.entry((cc.mesh, cc.conv)).or_default();
            if cc.head > c.head {
                c.head = cc.head;
                c.durable_seq = cc.head;
                if c.events.is_empty() {
                    c.first_seq = cc.head + 1;
                }
            }
        }
    }

    /// The recovered shard, ready to serve, and what the glue must do to the files first.
    pub fn finish(mut self) -> (Shard, RecoveryReport) {
        let s = &mut self.shard;
        s.durable_lsn = s.next_lsn - 1;
        s.building_first_lsn = s.next_lsn;
        (self.shard, self.report)
    }
}

#[cfg(test)]
mod tests;
