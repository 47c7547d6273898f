//! Reading the log back: the log cache of recent conversation entries, and positioned disk
//! reads for the rest (a subscription that fell behind the cache, a `read` of older entries).
//!
//! The shard asks for reads as outputs ([`Shard::poll_reads`] gives a [`ReadRequest`]) and
//! takes their bytes back ([`Shard::handle_read_done`]); its host performs them with
//! `SegmentStore::read_at` (`pread`, never mmap: a file cut back must not become SIGBUS), at
//! whatever time that takes. A read starts at a record boundary the shard knows (a
//! conversation's [`Mark`](crate::conv::Mark), or where the previous read of the same reader
//! stopped) and every record it returns is checked again (CRC, framing, seq order): a read
//! that does not verify is tried again, and after [`READ_ATTEMPTS_MAX`] tries the shard fails
//! and its host recovers it from disk, which verifies every record (bit rot found after start
//! is then refused like any other corruption in a synced write).

use crate::conv::{delivered, ConvKey, StoredEvent};
use crate::record::{AppendedHead, Record, RecordType, SentHead};
use crate::store::{StoreError, StoreErrorKind};
use crate::{wal, Shard};
use fabric_proto::codec::from_binary_prefix;
use fabric_proto::internal::{Reply, SessionId};
use fabric_proto::{DeliveredEvent, ErrorCode, ProtoError, ServerOp};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Tries of one read before the shard fails (the host then recovers it from disk).
pub const READ_ATTEMPTS_MAX: u32 = 3;
/// `read` requests served from disk at once; more are refused with `overloaded`.
pub const READ_OPS_MAX: usize = 4096;

/// One positioned read for the host: `len` bytes of `segment` from `offset`, reported back
/// with [`Shard::handle_read_done`] under `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    pub id: u64,
    pub segment: u64,
    pub offset: u64,
    pub len: usize,
}

/// Who a disk read is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reader {
    /// A subscription of this session (its conversation is the task's).
    Sub(SessionId),
    /// A `read` request.
    Op(u64),
    /// A key lookup (`keys`).
    Key(u64),
    /// Inbox bodies a session's drain waits for.
    Inbox(SessionId),
    /// Inbox bodies a retention round waits for.
    Fill,
}

#[derive(Debug)]
pub(crate) struct ReadTask {
    reader: Reader,
    key: ConvKey,
    /// The first seq wanted, and how many entries at most.
    from_seq: u64,
    want: u64,
    request: ReadRequest,
    attempts: u32,
}

/// A `read` request waiting for entries from disk.
#[derive(Debug)]
pub(crate) struct ReadOp {
    session: SessionId,
    r: u64,
    key: ConvKey,
    /// The first seq of the answer, the next one wanted, and the last its limit allows.
    from: u64,
    next: u64,
    last: u64,
    events: Vec<DeliveredEvent>,
    /// Where the next disk read starts, once one stopped: (segment, offset).
    resume: Option<(u64, u64)>,
}

#[derive(Debug, Default)]
pub(crate) struct Reads {
    next_id: u64,
    /// Requests not yet handed to the host, oldest first.
    queued: VecDeque<ReadRequest>,
    tasks: HashMap<u64, ReadTask>,
    ops: HashMap<u64, ReadOp>,
    /// Readers that found every read slot taken: woken (oldest first) as slots free.
    waiting: VecDeque<Reader>,
    /// Why reading failed for good (the shard is then failed).
    pub(crate) failure: Option<String>,
    /// Reads filling bodies for a retention round, under way.
    pub(crate) retention_fills: usize,
}

/// What `start_read` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadStart {
    Started(u64),
    /// Every read slot is taken (`log_reads_inflight_max`); the reader is woken later.
    Busy,
    /// Nothing durable to read there.
    Nothing,
}

/// The cache queue is compacted no shorter than this.
const CACHE_FIFO_COMPACT_MIN: usize = 4096;

/// What a log cache queue entry stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cached {
    /// A conversation entry (the oldest cached one of this conversation, at that LSN).
    Entry(ConvKey),
    /// An inbox message's body (while the message's newest record is at that LSN).
    Inbox(Arc<str>, u64),
}

/// A whole, checked record a walk over a read's bytes meets: its type, LSN and payload (not
/// decoded: most records a reader meets belong to others), where it starts and ends.
pub(crate) struct Seen<'a> {
    pub(crate) kind: RecordType,
    pub(crate) lsn: u64,
    pub(crate) payload: &'a [u8],
    pub(crate) at: u64,
    pub(crate) end: u64,
}

impl Seen<'_> {
    /// The record, decoded (its checksum already matched).
    pub(crate) fn decode(&self) -> Result<Record, String> {
        Record::decode(self.kind, self.payload).map_err(|e| {
            let at = self.at;
            format!("record at offset {at}: payload does not decode: {e}")
        })
    }
}

/// Where a walk stopped (an offset), and the length to read the first record whole when it
/// is longer than what was read.
pub(crate) struct Walked {
    pub(crate) stop: u64,
    pub(crate) grow: Option<usize>,
}

/// What one read's bytes held for its reader.
struct Parsed {
    /// The entries found, each with the offset just past its record.
    events: Vec<(StoredEvent, u64)>,
    /// Where the scan stopped: (segment, offset).
    stop: (u64, u64),
    /// The first record did not fit: read again with this many bytes.
    grow: Option<usize>,
}

impl Shard {
    /// The next read the host should perform.
    pub fn poll_reads(&mut self) -> Option<ReadRequest> {
        self.reads.queued.pop_front()
    }

    /// Reads handed out or queued and not yet answered.
    pub fn reads_in_flight(&self) -> usize {
        self.reads.tasks.len()
    }

    /// Why reading the log failed for good, if it did: the shard is failed, and its host must
    /// recover it from disk.
    pub fn read_failure(&self) -> Option<&str> {
        self.reads.failure.as_deref()
    }

    /// The host performed read `id`. Unknown ids (a read of an ended incarnation) are ignored.
    pub fn handle_read_done(&mut self, _now: u64, id: u64, result: Result<Vec<u8>, StoreError>) {
        let Some(task) = self.reads.tasks.remove(&id) else {
            return;
        };
        let gone = |k: StoreErrorKind| matches!(k, StoreErrorKind::NotFound);
        match result {
            // Retention deleted the segment meanwhile: the reader starts again from what is
            // retained now.
            Err(e) if gone(e.kind) && !self.holds_segment(task.request.segment) => {
                self.deliver_read(task, Vec::new(), None);
            }
            Err(e) => self.retry_read(task, e.to_string()),
            Ok(bytes) => {
                self.stats.disk_reads += 1;
                self.stats.disk_read_bytes += bytes.len() as u64;
                self.read_bytes(task, &bytes);
            }
        }
        self.wake_readers();
    }

    fn read_bytes(&mut self, task: ReadTask, bytes: &[u8]) {
        if matches!(task.reader, Reader::Inbox(_) | Reader::Fill) {
            let (segment, base) = (task.request.segment, task.request.offset);
            return match self.fill_bodies(segment, base, bytes) {
                Err(reason) => self.retry_read(task, reason),
                Ok(Walked {
                    grow: Some(len), ..
                }) => self.requeue(task, len),
                Ok(_) => self.deliver_read(task, Vec::new(), None),
            };
        }
        if let Reader::Key(id) = task.reader {
            let (segment, base) = (task.request.segment, task.request.offset);
            return match self.find_key(id, segment, base, bytes) {
                Err(reason) => self.retry_read(task, reason),
                Ok(s) => match (s.found, s.grow) {
                    (None, Some(len)) => self.requeue(task, len),
                    (found, _) => self.key_read(id, found, s.stop),
                },
            };
        }
        match self.parse_read(&task, bytes) {
            Err(reason) => self.retry_read(task, reason),
            Ok(Parsed {
                grow: Some(len), ..
            }) => self.requeue(task, len),
            Ok(p) => self.deliver_read(task, p.events, Some(p.stop)),
        }
    }

    fn holds_segment(&self, id: u64) -> bool {
        self.segments.iter().any(|s| s.id == id)
    }

    /// Starts a disk read for `reader` of `key` from `from_seq` (at most `want` entries), at
    /// `at` if given (where its last read stopped), else at the conversation's mark.
    pub(crate) fn start_read(
        &mut self,
        reader: Reader,
        key: &ConvKey,
        from_seq: u64,
        want: u64,
        at: Option<(u64, u64)>,
    ) -> ReadStart {
        if self.reads.tasks.len() >= self.config.log_reads_inflight_max {
            if !self.reads.waiting.contains(&reader) {
                self.reads.waiting.push_back(reader);
            }
            return ReadStart::Busy;
        }
        let at = at.filter(|(seg, _)| self.holds_segment(*seg)).or_else(|| {
            let m = self.convs.get(key)?.mark_before(from_seq)?;
            Some((m.segment, m.offset))
        });
        let Some((segment, offset)) = at else {
            return ReadStart::Nothing;
        };
        let len = self.readable_len(segment, offset);
        if len == 0 {
            return ReadStart::Nothing;
        }
        self.reads.next_id += 1;
        let request = ReadRequest {
            id: self.reads.next_id,
            segment,
            offset,
            len,
        };
        self.reads.queued.push_back(request);
        self.reads.tasks.insert(
            request.id,
            ReadTask {
                reader,
                key: key.clone(),
                from_seq,
                want: want.max(1),
                request,
                attempts: 0,
            },
        );
        ReadStart::Started(request.id)
    }

    /// Durable bytes of `segment` from `offset`, up to `log_read_bytes_max`.
    pub(crate) fn readable_len(&self, segment: u64, offset: u64) -> usize {
        self.readable_len_unbounded(segment, offset)
            .min(self.config.log_read_bytes_max)
    }

    /// Durable bytes of `segment` from `offset`.
    fn readable_len_unbounded(&self, segment: u64, offset: u64) -> usize {
        let (dseg, dend) = self.durable_end;
        let end = match self.segments.iter().find(|s| s.id == segment) {
            Some(_) if segment == dseg => dend,
            Some(s) if segment < dseg => s.bytes,
            _ => 0,
        };
        end.saturating_sub(offset) as usize
    }

    fn requeue(&mut self, mut task: ReadTask, len: usize) {
        task.request.len = len;
        self.reads.queued.push_back(task.request);
        self.reads.tasks.insert(task.request.id, task);
    }

    fn retry_read(&mut self, mut task: ReadTask, reason: String) {
        task.attempts += 1;
        self.stats.disk_read_retries += 1;
        if task.attempts < READ_ATTEMPTS_MAX {
            let len = task.request.len;
            self.requeue(task, len);
            return;
        }
        let r = task.request;
        self.reads.failure = Some(format!(
            "reading {} at offset {} ({} bytes) failed {} times: {reason}",
            wal::segment_file_name(r.segment),
            r.offset,
            r.len,
            task.attempts
        ));
        self.failed = true;
    }

    /// Finds the task's entries in `bytes` (read at the task's position), checking every
    /// record as recovery does.
    fn parse_read(&self, task: &ReadTask, bytes: &[u8]) -> Result<Parsed, String> {
        let (segment, base) = (task.request.segment, task.request.offset);
        let key = &task.key;
        let mut events = Vec::new();
        let mut expect = task.from_seq;
        let walked = self.walk_records(segment, base, bytes, |r| {
            let ours = r.kind == RecordType::Appended
                && from_binary_prefix::<AppendedHead>(r.payload)
                    .is_some_and(|h| *h.mesh == *key.0 && *h.conv == *key.1 && h.seq >= expect);
            if !ours {
                return Ok(true);
            }
            let Record::Appended(a) = r.decode()? else {
                return Ok(true);
            };
            if a.seq > expect {
                let (conv, seq, at) = (&a.conv, a.seq, r.at);
                return Err(format!(
                    "conversation {conv:?} has seq {seq} at offset {at} where {expect} was expected"
                ));
            }
            expect += 1;
            let e = StoredEvent {
                seq: a.seq,
                from: a.from,
                body: a.body,
                ts: a.ts,
                lsn: r.lsn,
                key: a.key,
            };
            events.push((e, r.end));
            Ok((events.len() as u64) < task.want)
        })?;
        let mut stop = (segment, walked.stop);
        if self.readable_len(segment, walked.stop) == 0 && segment < self.durable_end.0 {
            // The segment ends here: the next read starts after the next one's header.
            stop = (segment + 1, wal::SEGMENT_HEADER_BYTES as u64);
        }
        let grow = walked.grow.filter(|_| events.is_empty());
        Ok(Parsed { events, stop, grow })
    }

    /// Walks the whole records in `bytes` (read at `base` of `segment`), checking frame
    /// headers and every record (length, checksum, type) as recovery does, and hands each
    /// to `visit` until it says stop (false). A walk also stops at the durable end and at a
    /// record the bytes cut short (a first record longer than the read asks for a longer one).
    pub(crate) fn walk_records(
        &self,
        segment: u64,
        base: u64,
        bytes: &[u8],
        mut visit: impl FnMut(&Seen) -> Result<bool, String>,
    ) -> Result<Walked, String> {
        let check_crc = !self.config.planted.skip_crc_on_log_reads;
        let mut i = 0usize;
        loop {
            let (rest, at) = (&bytes[i..], base + i as u64);
            if rest.len() >= 4 && rest[..4] == wal::FRAME_MAGIC {
                if rest.len() < wal::FRAME_HEADER_BYTES {
                    break;
                }
                if wal::FrameHeader::decode(rest).is_none() {
                    return Err(format!("no intact frame header at offset {at}"));
                }
                i += wal::FRAME_HEADER_BYTES;
                continue;
            }
            let Some(size) = wal::record_size(rest) else {
                break;
            };
            if size > rest.len() {
                return self.cut_short(segment, at, size, i == 0);
            }
            let (head, payload) = wal::check_record(&rest[..size], check_crc)
                .map_err(|d| format!("record at offset {at}: {}", d.reason()))?;
            let (lsn, kind) = (head.lsn, head.kind);
            if self.replaced(lsn, (segment, at)) {
                // A rewind frame later in the log replaced this record: it is not data.
                i += size;
                continue;
            }
            if lsn > self.durable_lsn {
                break;
            }
            i += size;
            let end = base + i as u64;
            let seen = Seen {
                kind,
                lsn,
                payload,
                at,
                end,
            };
            if !visit(&seen)? {
                break;
            }
        }
        Ok(Walked {
            stop: base + i as u64,
            grow: None,
        })
    }

    /// Whether the record of `lsn` at `at` (segment, offset) was replaced by a later rewind.
    fn replaced(&self, lsn: u64, at: (u64, u64)) -> bool {
        self.rewinds
            .iter()
            .any(|(from, frame)| lsn >= *from && at < *frame)
    }

    /// A record of `size` bytes at `at` that the read cut short: read whole next (if it is the
    /// first), when it is really there (a length past the record limit or the durable bytes
    /// is damage, not a long record).
    fn cut_short(&self, segment: u64, at: u64, size: usize, first: bool) -> Result<Walked, String> {
        if size > wal::RECORD_HEADER_BYTES + wal::RECORD_BYTES_MAX {
            return Err(format!(
                "record length {size} at offset {at} is over the record limit"
            ));
        }
        if size > self.readable_len_unbounded(segment, at) {
            return Err(format!(
                "record length {size} at offset {at} runs past the durable bytes"
            ));
        }
        let grow = first.then_some(size);
        Ok(Walked { stop: at, grow })
    }

    /// Hands a finished read's entries to its reader. `stop` is where the scan stopped
    /// (`None`: start again from the marks).
    fn deliver_read(
        &mut self,
        task: ReadTask,
        events: Vec<(StoredEvent, u64)>,
        stop: Option<(u64, u64)>,
    ) {
        match task.reader {
            Reader::Sub(session) => self.deliver_to_sub(session, &task, events, stop),
            Reader::Op(op) => self.deliver_to_op(op, events, stop),
            // Its segment went (retention): the lookup goes on with the next one.
            Reader::Key(id) => self.key_read(id, None, (0, 0)),
            Reader::Inbox(session) => {
                if let Some(s) = self.sessions.get_mut(&session) {
                    if s.inbox_reading == Some(task.request.id) {
                        s.inbox_reading = None;
                    }
                }
                self.queue_drain(session);
            }
            Reader::Fill => {
                self.reads.retention_fills -= 1;
                if self.reads.retention_fills == 0 {
                    self.maybe_start_retention();
                }
            }
        }
    }

    fn deliver_to_sub(
        &mut self,
        session: SessionId,
        task: &ReadTask,
        events: Vec<(StoredEvent, u64)>,
        stop: Option<(u64, u64)>,
    ) {
        let Some(mut s) = self.sessions.remove(&session) else {
            return;
        };
        let id = task.request.id;
        if let Some(sub) = s.subs.iter_mut().find(|x| x.reading == Some(id)) {
            sub.reading = None;
            sub.resume = None;
            // Where the next read starts: where this one stopped, or, when credit runs out
            // first, just past the last entry delivered (from the marks if none was).
            let mut resume = stop;
            let mut delivered_end = None;
            for (e, end) in events {
                if e.seq != sub.next_seq {
                    continue;
                }
                if s.credit == 0 {
                    resume = delivered_end;
                    break;
                }
                s.credit -= 1;
                self.stats.events_pushed += 1;
                self.out.push_back(fabric_proto::internal::Output {
                    session,
                    reply: Reply::Frame(ServerOp::Event(delivered(&sub.key.1, &e))),
                });
                sub.next_seq += 1;
                delivered_end = Some((task.request.segment, end));
            }
            sub.resume = resume.map(|at| (sub.next_seq, at));
        }
        self.sessions.insert(session, s);
        self.queue_drain(session);
    }

    fn deliver_to_op(
        &mut self,
        op_id: u64,
        events: Vec<(StoredEvent, u64)>,
        stop: Option<(u64, u64)>,
    ) {
        let Some(mut op) = self.reads.ops.remove(&op_id) else {
            return;
        };
        for (e, _) in events {
            if e.seq == op.next && op.next <= op.last {
                op.events.push(delivered(&op.key.1, &e));
                op.next += 1;
            }
        }
        op.resume = stop;
        self.continue_op(op_id, op);
    }

    /// Takes a `read` from memory as far as it can, then from disk; answers it when done.
    pub(crate) fn continue_op(&mut self, op_id: u64, mut op: ReadOp) {
        let Some(c) = self.convs.get(&op.key) else {
            return self.finish_op(op, 0);
        };
        // The answer is as of when it is sent: entries made durable meanwhile are in it (up
        // to the limit), and its head is the durable head then.
        if op.next < c.first_seq {
            // Retention passed the read meanwhile: it starts again at the oldest entry
            // retained now (what it found so far is gone), still up to `limit` entries.
            let limit = op.last - op.from + 1;
            op.events.clear();
            op.from = c.first_seq;
            op.next = c.first_seq;
            op.last = op.from.saturating_add(limit - 1);
        }
        let (end, head) = (op.last.min(c.durable_seq), c.durable_seq);
        while op.next <= end {
            let Some(e) = c.cached(op.next) else { break };
            op.events.push(delivered(&op.key.1, e));
            op.next += 1;
        }
        if op.next > end {
            return self.finish_op(op, head);
        }
        let (key, next, want, at) = (op.key.clone(), op.next, end - op.next + 1, op.resume);
        self.reads.ops.insert(op_id, op);
        match self.start_read(Reader::Op(op_id), &key, next, want, at) {
            ReadStart::Started(_) | ReadStart::Busy => {}
            ReadStart::Nothing => {
                let op = self.reads.ops.remove(&op_id).expect("just inserted");
                self.finish_op(op, head);
            }
        }
    }

    fn finish_op(&mut self, op: ReadOp, head: u64) {
        self.emit(
            op.session,
            Reply::Messages {
                r: op.r,
                events: op.events,
                head,
            },
        );
    }

    /// A `read` that needs the disk: refused with `overloaded` past [`READ_OPS_MAX`].
    pub(crate) fn read_from_disk(
        &mut self,
        session: SessionId,
        r: u64,
        key: ConvKey,
        (from, last): (u64, u64),
    ) -> Result<(), ProtoError> {
        if self.reads.ops.len() >= READ_OPS_MAX {
            return Err(ProtoError::new(
                ErrorCode::Overloaded,
                format!(
                    "{READ_OPS_MAX} reads from disk are under way on this shard; retry shortly"
                ),
            ));
        }
        self.reads.next_id += 1;
        let id = self.reads.next_id;
        let op = ReadOp {
            session,
            r,
            key,
            from,
            next: from,
            last,
            events: Vec::new(),
            resume: None,
        };
        self.continue_op(id, op);
        Ok(())
    }

    /// Readers that waited for a read slot try again, while slots are free.
    fn wake_readers(&mut self) {
        while self.reads.tasks.len() < self.config.log_reads_inflight_max {
            let Some(reader) = self.reads.waiting.pop_front() else {
                break;
            };
            match reader {
                Reader::Sub(session) => self.queue_drain(session),
                Reader::Op(id) => {
                    if let Some(op) = self.reads.ops.remove(&id) {
                        self.continue_op(id, op);
                    }
                }
                Reader::Key(id) => self.scan_next_segment(id, None),
                Reader::Inbox(session) => self.queue_drain(session),
                Reader::Fill => self.maybe_start_retention(),
            }
        }
    }

    /// Drops a closed session's `read`s (their disk reads finish and are ignored).
    pub(crate) fn drop_reads_of(&mut self, session: SessionId) {
        self.reads.ops.retain(|_, op| op.session != session);
        self.reads.waiting.retain(|r| *r != Reader::Sub(session));
    }

    /// Trims the log cache to `log_cache_bytes_max`, oldest entries first, keeping what is not
    /// durable yet (it cannot be read back).
    pub(crate) fn trim_cache(&mut self) {
        self.compact_cache_fifo();
        while let Some((lsn, what)) = self.cache_fifo.front() {
            let lsn = *lsn;
            if !self.cache_entry_live(lsn, what) {
                // Gone already (retention, an ack, a copy forward), its bytes released.
                self.cache_fifo.pop_front();
                continue;
            }
            let durable = lsn <= self.durable_lsn || self.replaying;
            if self.cache_bytes <= self.config.log_cache_bytes_max || !durable {
                break;
            }
            let (_, what) = self.cache_fifo.pop_front().expect("front exists");
            self.cache_bytes -= self.evict_cached(what);
        }
    }

    /// Whether a cache queue entry still stands for something in memory.
    fn cache_entry_live(&self, lsn: u64, what: &Cached) -> bool {
        match what {
            Cached::Entry(key) => self
                .convs
                .get(key)
                .and_then(|c| c.cached.front())
                .is_some_and(|e| e.lsn <= lsn),
            Cached::Inbox(mesh, pos) => self
                .meshes
                .get(mesh)
                .and_then(|m| m.log.get(pos))
                .is_some_and(|m| m.lsn == lsn && m.body.is_some()),
        }
    }

    /// Drops a live cache entry's bytes from memory; returns what they counted.
    fn evict_cached(&mut self, what: Cached) -> u64 {
        match what {
            Cached::Entry(key) => {
                let c = self
                    .convs
                    .get_mut(&key)
                    .expect("a live entry's conversation");
                c.cached.pop_front().expect("a live entry").cache_bytes()
            }
            Cached::Inbox(mesh, pos) => {
                let m = self.meshes.get_mut(&mesh).expect("a live entry's mesh");
                let msg = m.log.get_mut(&pos).expect("a live entry's message");
                msg.body = None;
                msg.cache_cost()
            }
        }
    }

    /// Drops stale entries from the cache queue once it has doubled since the last time
    /// (acknowledged messages leave stale entries anywhere in it, not only at its front).
    fn compact_cache_fifo(&mut self) {
        let len = self.cache_fifo.len();
        if len < CACHE_FIFO_COMPACT_MIN || len < 2 * self.cache_fifo_compacted {
            return;
        }
        let mut fifo = std::mem::take(&mut self.cache_fifo);
        fifo.retain(|(lsn, what)| self.cache_entry_live(*lsn, what));
        self.cache_fifo_compacted = fifo.len();
        self.cache_fifo = fifo;
    }

    /// A drain found an inbox message whose body is on disk only: a read fills the bodies it
    /// covers, then the session's drain goes on.
    pub(crate) fn fill_for_session(
        &mut self,
        session: SessionId,
        s: &mut crate::SessionState,
        mesh: &Arc<str>,
        at: (u64, u64),
    ) {
        let key = (mesh.clone(), Arc::from(""));
        let started = self.start_read(Reader::Inbox(session), &key, 0, 1, Some(at));
        if let ReadStart::Started(id) = started {
            s.inbox_reading = Some(id);
        }
    }

    /// Before a retention round copies messages forward, the bodies it needs come back from
    /// disk. True while reads are under way (the round waits for them).
    pub(crate) fn fill_for_retention(&mut self, held: &[(u64, Arc<str>, u64)]) -> bool {
        if self.reads.retention_fills > 0 {
            return true;
        }
        let missing: Vec<(Arc<str>, (u64, u64))> = held
            .iter()
            .filter_map(|(_, mesh, pos)| {
                let msg = self.meshes.get(mesh)?.log.get(pos)?;
                msg.body.is_none().then(|| (mesh.clone(), msg.at))
            })
            .collect();
        for (mesh, at) in missing.iter().take(self.config.log_reads_inflight_max) {
            let key = (mesh.clone(), Arc::from(""));
            if let ReadStart::Started(_) = self.start_read(Reader::Fill, &key, 0, 1, Some(*at)) {
                self.reads.retention_fills += 1;
            }
        }
        !missing.is_empty()
    }

    /// Puts back into memory every body in `bytes` whose message is still needed and whose
    /// newest record this is. Returns where the walk stopped.
    fn fill_bodies(&mut self, segment: u64, base: u64, bytes: &[u8]) -> Result<Walked, String> {
        let meshes = &self.meshes;
        let mut found = Vec::new();
        let walked = self.walk_records(segment, base, bytes, |r| {
            let needed = r.kind == RecordType::Sent
                && from_binary_prefix::<SentHead>(r.payload).is_some_and(|h| {
                    let msg = meshes.get(h.mesh).and_then(|m| m.log.get(&h.pos));
                    msg.is_some_and(|m| m.lsn == r.lsn && m.body.is_none())
                });
            if needed {
                if let Record::Sent(sent) = r.decode()? {
                    found.push((r.lsn, sent));
                }
            }
            Ok(true)
        })?;
        for (lsn, sent) in found {
            self.fill_body(lsn, sent);
        }
        Ok(walked)
    }

    fn fill_body(&mut self, lsn: u64, r: crate::record::SentRec) {
        let Some(msg) = self
            .meshes
            .get_mut(&r.mesh)
            .and_then(|m| m.log.get_mut(&r.pos))
        else {
            return;
        };
        if msg.lsn != lsn || msg.body.is_some() {
            return;
        }
        msg.body = Some(r.body);
        let cost = msg.cache_cost();
        self.cache_body(lsn, r.mesh, r.pos, cost);
    }

    /// An inbox body (of the message at `pos`, whose newest record is `lsn`) joins the log
    /// cache: counted, and queued for eviction in LSN order.
    pub(crate) fn cache_body(&mut self, lsn: u64, mesh: Arc<str>, pos: u64, cost: u64) {
        self.cache_bytes += cost;
        self.cache_fifo.push_back((lsn, Cached::Inbox(mesh, pos)));
    }
}
