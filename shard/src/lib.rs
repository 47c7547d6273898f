//! The shard core: one shard's log, inboxes, conversations and drains, as a deterministic state
//! machine. It owns the WAL *format* and *policy* (what to write, when to rotate, what to
//! delete, what recovery may cut); the glue owns the files, through [`store::SegmentStore`].
//!
//! # The loop (raft-rs's Ready, quinn-proto's poll style)
//!
//! ```text
//! glue                                   Shard
//! ----                                   -----
//! handle_requests(now, batch)      ->    validate, assign pos/seq, frame WAL records into the
//!                                        building batch, queue acks as *pending*
//! poll_wal()                       <-    the next write frame (one write + one fdatasync), if
//!                                        no write is in flight: this is group commit
//! store::perform(write), then
//! handle_wal_done(now, last_lsn)   ->    release the pending acks up to last_lsn, make the new
//!                                        data visible, queue drains, maybe start retention
//! poll_output() until None         <-    acks, errors, welcomes, deliveries, events
//! ```
//!
//! Invariants, asserted where they are cheap:
//! - An `Ok` for a write leaves `poll_output` only after `handle_wal_done` covered its LSN.
//! - Deliveries and events carry only durable data (at or below the durable pos/seq).
//! - At most one WAL write is in flight; LSNs are dense and strictly increasing; a write is at
//!   most `wal_batch_bytes_max` plus one record.
//! - A segment is deleted only after a durable checkpoint that makes it unnecessary.
//!
//! Modules: [`wal`] (format), [`record`] (payloads), `mesh` and `conv` (state), `ops` (one
//! handler per request: validate, then propose), `apply` (the one apply path, live and
//! replay), `commit` (group commit), `retention`, `drain`, [`recovery`] (what recovery may
//! cut), [`store`] (the file steps every host performs, generic over storage), [`raft`] (a
//! sans-IO Raft core for replicating a shard; not wired to the WAL or the node links yet).

pub mod members;
pub mod raft;
pub mod record;
pub mod recovery;
pub mod repair;
pub mod store;
pub mod wal;

mod apply;
mod commit;
mod conv;
mod drain;
mod keys;
mod mesh;
mod ops;
mod read;
pub mod replica;
mod retention;

pub use ops::unavailable_reply;
pub use read::{ReadRequest, READ_ATTEMPTS_MAX, READ_OPS_MAX};
pub use recovery::{RecoverError, Recoverer, RecoveryReport};

use commit::{Dirty, Inflight, Sealed};
use conv::{Conv, ConvKey};
use fabric_proto::internal::{Output, Reply, Request, SessionId, ShardIdx};
use fabric_proto::{ErrorCode, ProtoError, ServerOp};
use mesh::Mesh;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

/// Limits of one shard. Units are last in every name.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub shard: ShardIdx,
    /// Rotate to a new segment once the current one holds this much.
    pub wal_segment_bytes_max: u64,
    /// Stop taking requests while the building batch is this large (the glue stops reading its
    /// input channel, which fills, which stops the sessions reading their sockets); a write is
    /// cut at this size plus one record.
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
    /// Largest message body accepted (the edge refuses larger ones first; checked here too, so
    /// no request can make a record over `wal::RECORD_BYTES_MAX`).
    pub body_bytes_max: usize,
    /// Body bytes of unacknowledged inbox messages one peer may hold; a send that would grow a
    /// full backlog is refused with `inbox_full`.
    pub inbox_backlog_bytes_max: u64,
    /// The same, summed over a mesh (each message counted once).
    pub mesh_inbox_backlog_bytes_max: u64,
    /// Conversations of one mesh this shard holds; the first append to one more is refused
    /// with `too_large`.
    pub mesh_conversations_max: u32,
    /// Subscriptions one session may hold on this shard.
    pub session_subscriptions_max: u32,
    /// Bytes of recent conversation entries and inbox bodies kept in memory; older ones are
    /// read from disk.
    pub log_cache_bytes_max: u64,
    /// A conversation's disk index keeps one entry per this many of its entries at most
    /// (and one per segment): a disk read scans at most about this many of its entries to
    /// reach the one it wants.
    pub log_index_stride_records: u64,
    /// Bytes one disk read asks for (a record longer than this is read whole anyway).
    pub log_read_bytes_max: usize,
    /// Disk reads in flight at once; readers past it wait for a free slot.
    pub log_reads_inflight_max: usize,
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
            body_bytes_max: fabric_proto::FRAME_BYTES_MAX_DEFAULT - 1024,
            inbox_backlog_bytes_max: 64 * 1024 * 1024,
            mesh_inbox_backlog_bytes_max: 512 * 1024 * 1024,
            mesh_conversations_max: 100_000,
            session_subscriptions_max: 1024,
            log_cache_bytes_max: 8 * 1024 * 1024,
            log_index_stride_records: 256,
            log_read_bytes_max: 256 * 1024,
            log_reads_inflight_max: 16,
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
    /// Recovery cuts any damage in the newest segment as a torn tail (the old rule), even in
    /// writes that were synced and acknowledged.
    pub cut_any_damage_in_newest_segment: bool,
    /// The file steps skip the directory fsync that makes a new segment's name (and the
    /// manifest listing it) durable.
    pub no_dir_fsync_on_segment_create: bool,
    /// After a failed write, the file steps keep what reached the page cache instead of
    /// cutting it back (and the next recovery serves it, though a later sync may not make it
    /// durable: fsyncgate).
    pub trust_page_cache_after_failed_sync: bool,
    /// Recovery does not sync what it read (it may be page cache only, after a process crash
    /// or a failed write, and the shard serves it as durable).
    pub no_sync_after_recovery: bool,
    /// Disk reads of the log do not check record checksums (a flipped bit in what a read
    /// returns is served as the entry).
    pub skip_crc_on_log_reads: bool,
    /// A keyed send looks its key up only among the newest segment's exact keys, never in
    /// sealed segments' fingerprints (a retry whose original was sealed is sent again).
    pub forget_sealed_send_keys: bool,
}

/// One write for the glue, performed by [`store::perform`]: create `segment` (header, then
/// the manifest listing it) if `create`; else write `manifest` if set; append `bytes` (one
/// write frame) at `offset` and fdatasync; then delete the segments in `delete`. Then report
/// `handle_wal_done(last_lsn)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalWrite {
    pub shard: u32,
    pub segment: u64,
    pub create: bool,
    /// Bytes of `segment` before this write (its header included): where a failed write is cut
    /// back to, since everything before it is synced.
    pub offset: u64,
    /// One write frame (header and records), or empty for a write that only deletes.
    pub bytes: Vec<u8>,
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub records: u64,
    /// The shard's manifest after this write, when it changes (a new segment, deletions).
    pub manifest: Option<wal::Manifest>,
    /// Retired segments, deleted after the manifest stops listing them.
    pub delete: Vec<u64>,
    /// The replica's repair ended (its log holds every entry it may have acknowledged): remove
    /// the `REPAIR` marker ([`repair`]) first. Recovery removes it too, if this fails.
    pub remove_repair: bool,
    /// The group's committed membership changed (or a snapshot brings one): write `MEMBERS`
    /// ([`members`]) first, before anything this write deletes.
    pub members: Option<members::MembersFile>,
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
    /// Sends refused with `inbox_full`.
    pub sends_refused_inbox_full: u64,
    /// Writes refused with `storage_full`.
    pub writes_refused_storage_full: u64,
    /// Disk reads answered (conversation entries older than the log cache), and their bytes.
    pub disk_reads: u64,
    pub disk_read_bytes: u64,
    /// Disk reads tried again (an I/O error, or bytes that did not verify).
    pub disk_read_retries: u64,
    /// Keyed appends whose key only a sealed segment could hold, looked up on disk; and those
    /// the lookup found (answered with the original seq).
    pub key_lookups: u64,
    pub key_lookups_found: u64,
}

/// Inbox messages waiting for their recipients' acknowledgement: messages addressed to a peer
/// beyond its acknowledged cursor.
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
    /// Body bytes of messages some recipient has not acknowledged (each counted once).
    pub backlog_bytes: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct SegmentInfo {
    pub(crate) id: u64,
    pub(crate) first_lsn: u64,
    pub(crate) last_lsn: u64,
    /// Bytes in the file, its header included.
    pub(crate) bytes: u64,
}

#[derive(Debug)]
pub(crate) struct Sub {
    pub(crate) key: ConvKey,
    pub(crate) next_seq: u64,
    /// The disk read under way for this subscription, if any.
    pub(crate) reading: Option<u64>,
    /// Where on disk the entry `.0` can be found by scanning forward: (seq, (segment,
    /// offset)), left by the last read (saves going back to the conversation's mark).
    pub(crate) resume: Option<(u64, (u64, u64))>,
}

#[derive(Debug)]
pub(crate) struct SessionState {
    pub(crate) credit: u32,
    pub(crate) queued: bool,
    pub(crate) inbox: Option<(Arc<str>, u32, u64)>, // mesh, peer, next pos to look at
    pub(crate) subs: Vec<Sub>,
    /// The nonce of the last key hello on this session (each nonce proves one hello only).
    pub(crate) hello_nonce: Option<[u8; 32]>,
    /// The disk read under way that fills inbox bodies this session's drain waits for.
    pub(crate) inbox_reading: Option<u64>,
}

pub struct Shard {
    pub(crate) config: ShardConfig,
    pub(crate) meshes: HashMap<Arc<str>, Mesh>,
    pub(crate) convs: HashMap<ConvKey, Conv>,
    /// Conversations with an entry, per mesh (bounded by `mesh_conversations_max`).
    pub(crate) mesh_convs: HashMap<Arc<str>, u32>,
    pub(crate) sessions: HashMap<SessionId, SessionState>,
    pub(crate) drain_queue: VecDeque<SessionId>,

    pub(crate) segments: VecDeque<SegmentInfo>,
    pub(crate) wal_bytes: u64,
    pub(crate) next_lsn: u64,
    /// The consensus term records are written with (the WAL's record header carries it): 0,
    /// as this shard writes without replication.
    pub(crate) term: u64,
    pub(crate) durable_lsn: u64,
    /// The write frame being built: a reserved frame header, then records.
    pub(crate) building: Vec<u8>,
    pub(crate) building_first_lsn: u64,
    pub(crate) building_records: u64,
    pub(crate) building_dirty: Dirty,
    /// Flags of the building frame ([`wal::FRAME_FLAG_REWIND`] for a replica's rewind).
    pub(crate) building_flags: u32,
    /// Rewind frames in the retained log: (first LSN, (segment, offset) of the frame). A
    /// record at or above the LSN that lies before the frame was replaced by it: reads pass
    /// over it.
    pub(crate) rewinds: Vec<(u64, (u64, u64))>,
    /// Frames cut at `wal_batch_bytes_max`, waiting for their write (oldest first).
    pub(crate) sealed: VecDeque<Sealed>,
    /// An emptied buffer of an earlier write, handed back by the glue
    /// ([`Shard::recycle_wal_buffer`]): the next batch is framed into memory that is already
    /// allocated and faulted in, instead of growing a new `Vec` by doubling every commit.
    pub(crate) spare_buffer: Vec<u8>,
    pub(crate) inflight: Option<Inflight>,
    pub(crate) pending: VecDeque<(u64, Output)>,
    pub(crate) deletes: Vec<u64>,
    /// The manifest as last written, and whether the next write must write it anew.
    pub(crate) manifest: wal::Manifest,
    pub(crate) manifest_dirty: bool,
    pub(crate) retention: retention::Retention,
    /// Inbox messages in memory by the LSN of the record holding them: retention finds the
    /// ones in the oldest segment without walking every mesh.
    pub(crate) inbox_by_lsn: BTreeMap<u64, (Arc<str>, u64)>,
    /// Conversations by the LSN of their oldest retained entry, for the same reason.
    pub(crate) convs_by_lsn: BTreeSet<(u64, ConvKey)>,
    /// Peers whose cursor moved since their last cursor record, in the order they first moved.
    pub(crate) unlogged_cursors: Vec<(Arc<str>, u32)>,
    /// While the WAL is below this size, retention does not retry (see maybe_start_retention).
    pub(crate) retention_blocked_bytes: u64,
    /// Bytes the last retention round wrote (copies and checkpoint), and `stats.bytes_written`
    /// right after it: a round that frees less than it writes waits until as much other data
    /// has been written, so checkpoints never rewrite themselves in a loop.
    pub(crate) last_round_bytes: u64,
    pub(crate) last_round_end_written: u64,
    pub(crate) failed: bool,
    /// Recovery is feeding this shard records read back from its WAL (see `apply`).
    pub(crate) replaying: bool,
    /// Writes are refused with `storage_full` until this time (the disk was full).
    pub(crate) storage_full_until: Option<u64>,

    /// The log cache: cached conversation entries in LSN order (each conversation's
    /// `cached` holds the entries), and the bytes they count.
    pub(crate) cache_fifo: VecDeque<(u64, read::Cached)>,
    /// The cache queue's length after its last compaction (stale entries are dropped when it
    /// has doubled since).
    pub(crate) cache_fifo_compacted: usize,
    pub(crate) cache_bytes: u64,
    /// Disk reads under way and the readers waiting for them.
    pub(crate) reads: read::Reads,
    /// Idempotency keys: exact for the newest segment, fingerprints for sealed ones, and the
    /// appends waiting for a lookup on disk.
    pub(crate) keys: keys::KeyIndex,
    /// Where durable bytes end: (segment, offset). Reads never go past it.
    pub(crate) durable_end: (u64, u64),
    /// Where the record being applied is: live, its offset in the building frame; in replay,
    /// (segment, frame offset, record offset).
    pub(crate) framed_at: usize,
    pub(crate) replay_at: (u64, u64, u64),

    pub(crate) out: VecDeque<Output>,
    pub(crate) stats: ShardStats,

    /// Replication (`crate::replica`): `Some` when this shard is one replica of a Raft group.
    pub(crate) replica: Option<replica::Hooks>,
    /// A replica in replay: its leader retired segments below this LSN (a `Retired` record).
    pub(crate) retire_below: u64,
}

/// The SHA-256 of a peer token, as stored (tokens themselves are never stored).
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Shard {
    /// A shard with an empty WAL (and an empty manifest).
    pub fn new(config: ShardConfig) -> Shard {
        let manifest = wal::Manifest::empty(config.shard);
        Shard {
            config,
            meshes: HashMap::new(),
            convs: HashMap::new(),
            mesh_convs: HashMap::new(),
            sessions: HashMap::new(),
            drain_queue: VecDeque::new(),
            segments: VecDeque::new(),
            wal_bytes: 0,
            next_lsn: 1,
            term: 0,
            durable_lsn: 0,
            building: Vec::new(),
            building_first_lsn: 1,
            building_records: 0,
            building_dirty: Dirty::default(),
            building_flags: 0,
            rewinds: Vec::new(),
            sealed: VecDeque::new(),
            spare_buffer: Vec::new(),
            inflight: None,
            pending: VecDeque::new(),
            deletes: Vec::new(),
            manifest,
            manifest_dirty: false,
            retention: retention::Retention::Idle,
            inbox_by_lsn: BTreeMap::new(),
            convs_by_lsn: BTreeSet::new(),
            unlogged_cursors: Vec::new(),
            retention_blocked_bytes: 0,
            last_round_bytes: 0,
            last_round_end_written: 0,
            failed: false,
            replaying: false,
            storage_full_until: None,
            cache_fifo: VecDeque::new(),
            cache_fifo_compacted: 0,
            cache_bytes: 0,
            reads: read::Reads::default(),
            keys: keys::KeyIndex::default(),
            durable_end: (0, 0),
            framed_at: 0,
            replay_at: (0, 0, 0),
            out: VecDeque::new(),
            stats: ShardStats::default(),
            replica: None,
            retire_below: 0,
        }
    }

    /// An empty shard that recovery feeds records into ([`Recoverer`]).
    pub(crate) fn replaying(config: ShardConfig) -> Shard {
        Shard {
            replaying: true,
            ..Shard::new(config)
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

    /// The manifest as of the last write (what the glue's `MANIFEST` file says).
    pub fn manifest(&self) -> wal::Manifest {
        self.manifest
    }

    /// Sessions this shard holds state for (attached to an inbox, subscribed, or mid key
    /// hello), in id order: a session the glue no longer has must not be among them.
    pub fn session_ids(&self) -> Vec<SessionId> {
        let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Bytes the log cache counts now (at most `log_cache_bytes_max` plus what is not yet
    /// durable).
    pub fn cache_bytes(&self) -> u64 {
        self.cache_bytes
    }

    /// The oldest retained seq of a conversation (its head plus one when none is retained),
    /// if the shard knows the conversation.
    pub fn retained_from(&self, mesh: &str, conv: &str) -> Option<u64> {
        let c = self.convs.get(&(Arc::from(mesh), Arc::from(conv)))?;
        Some(c.first_seq)
    }

    /// The first LSN of the retained log: the lowest of a segment holding a live record (a
    /// segment whose records a rewind replaced holds none), or the next LSN if none does.
    pub fn log_start(&self) -> u64 {
        let live = self.segments.iter().filter(|s| s.last_lsn >= s.first_lsn);
        live.map(|s| s.first_lsn).min().unwrap_or(self.next_lsn)
    }

    /// A conversation's head: the last seq appended (durable or not).
    pub fn conversation_head(&self, mesh: &str, conv: &str) -> Option<u64> {
        let c = self.convs.get(&(Arc::from(mesh), Arc::from(conv)))?;
        Some(c.head)
    }

    /// Conversations held in memory (with entries, subscribers, or only a head).
    pub fn conversation_count(&self) -> usize {
        self.convs.len()
    }

    /// Total unacknowledged inbox messages retained, summed over peers, and the largest one.
    pub fn inbox_backlog(&self) -> (u64, u64) {
        let mut sum = 0;
        let mut max = 0;
        for m in self.meshes.values() {
            for p in m.peers.iter().filter(|p| !p.placeholder) {
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
        add_backlog(m, &mut backlog, &mut budget);
        Some(MeshStats {
            durable_pos: m.durable_pos,
            peers: m.peers.iter().filter(|p| !p.placeholder).count() as u64,
            sessions: m.sessions.len() as u64,
            backlog,
            backlog_bytes: m.backlog_bytes,
        })
    }

    /// Every mesh's inbox backlog, walking at most `scan_entries_max` log entries in all (a
    /// metrics refresh, not a per-request call).
    pub fn inbox_backlog_scan(&self, scan_entries_max: usize) -> Backlog {
        let mut backlog = Backlog::default();
        let mut budget = scan_entries_max;
        for m in self.meshes.values().filter(|m| m.exists) {
            add_backlog(m, &mut backlog, &mut budget);
        }
        backlog
    }

    /// False while the shard wants no more requests (its batch, its sealed frames or its
    /// pending acks are full). The glue then leaves requests in its bounded input channel:
    /// backpressure. A batch already handed to [`Shard::handle_requests`] is taken whole.
    pub fn wants_input(&self) -> bool {
        self.sealed.is_empty()
            && self.building.len() < self.config.wal_batch_bytes_max
            && self.pending.len() + self.keys.parked_count < self.config.pending_acks_max
    }

    /// Takes a whole batch of requests, in order: every one is answered (an `ok` once durable
    /// or an error), whatever `wants_input` says meanwhile. The glue checks `wants_input`
    /// between batches, never inside one.
    pub fn handle_requests(&mut self, now: u64, batch: impl IntoIterator<Item = Request>) {
        for req in batch {
            self.handle_request(now, req);
        }
    }

    pub fn handle_request(&mut self, now: u64, req: Request) {
        let session = req.session;
        let r = req.op.reference();
        if let Err(e) = self.handle_op(now, req) {
            self.stats.errors_sent += 1;
            self.emit(session, Reply::Frame(ServerOp::error(r, e)));
        }
    }

    /// Writes are refused with `storage_full` until `until` (unix ms): the glue says so after
    /// a write failed for lack of space and the shard was recovered. Reads go on meanwhile;
    /// after `until` writes are tried again.
    pub fn handle_storage_full(&mut self, _now: u64, until: u64) {
        self.storage_full_until = Some(until);
    }

    /// Why a write cannot be taken now, if it cannot.
    pub(crate) fn refuse_write(&mut self, now: u64) -> Result<(), ProtoError> {
        if self.failed {
            return Err(ProtoError::new(
                ErrorCode::Unavailable,
                "this shard's storage failed; it is restarting",
            ));
        }
        if let Some(until) = self.storage_full_until {
            if now < until {
                self.stats.writes_refused_storage_full += 1;
                return Err(ProtoError::new(
                    ErrorCode::StorageFull,
                    format!(
                        "this shard's disk is full; writes are refused for {} ms more, then \
                         tried again (reads are served)",
                        until - now
                    ),
                ));
            }
            self.storage_full_until = None;
        }
        Ok(())
    }

    pub(crate) fn emit(&mut self, session: SessionId, reply: Reply) {
        self.out.push_back(Output { session, reply });
    }

    pub(crate) fn queue_drain(&mut self, session: SessionId) {
        if let Some(s) = self.sessions.get_mut(&session) {
            if !s.queued {
                s.queued = true;
                self.drain_queue.push_back(session);
            }
        }
    }

    /// Nothing is building, in flight, waiting for durability or for a disk read: every
    /// request taken in has been written, synced and answered.
    pub fn is_idle(&self) -> bool {
        self.reads_in_flight() == 0
            && self.keys.parked_count == 0
            && self.building_records == 0
            && self.sealed.is_empty()
            && self.inflight.is_none()
            && self.pending.is_empty()
            && self.deletes.is_empty()
            && !self.manifest_dirty
            && self.unlogged_cursors.is_empty()
    }

    /// Every record taken in so far is in a write already handed out (nothing building, no
    /// frame waiting): a write polled in this state carries every cursor moved before it.
    pub fn all_polled(&self) -> bool {
        self.building_records == 0 && self.sealed.is_empty()
    }

    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Forgets that a write failed, keeping memory ahead of the disk: exactly what a host
    /// must never do. Only the simulator's planted `glue_restart_without_recovery` calls it.
    pub fn revive_for_planted_bug(&mut self) {
        self.failed = false;
    }
}

/// Adds each peer's count of durable messages addressed to it beyond its cursor.
fn add_backlog(m: &Mesh, b: &mut Backlog, budget: &mut usize) {
    for (i, p) in m.peers.iter().enumerate() {
        if p.placeholder || p.acked >= m.durable_pos {
            continue;
        }
        let mut n = 0;
        for (_, msg) in m.log.range(p.acked + 1..=m.durable_pos) {
            if *budget == 0 {
                b.truncated = true;
                break;
            }
            *budget -= 1;
            if m.is_recipient(msg, i as u32) {
                n += 1;
            }
        }
        b.sum += n;
        b.max = b.max.max(n);
    }
}

#[cfg(test)]
mod tests;
