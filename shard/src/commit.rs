//! Group commit: records are framed into the building write frame as requests arrive; one
//! frame at a time goes to the glue as a [`WalWrite`]; `handle_wal_done` releases the acks it
//! covers and makes its data visible.
//!
//! A frame is cut ("sealed") once it holds `wal_batch_bytes_max`: requests stop being taken
//! then (`wants_input`), but records the shard makes itself (copy-forwards, checkpoint parts,
//! cursor records) may keep coming, and go into further frames. So no write is longer than
//! `wal_batch_bytes_max` plus one record, which is what lets recovery tell the final write of a
//! segment from an earlier one whose header was damaged.

use crate::conv::{ConvKey, Mark};
use crate::keys::KeyScope;
use crate::record::{AckedRec, Record};
use crate::{wal, SegmentInfo, Shard, WalWrite};
use fabric_proto::internal::{Output, Reply, SessionId};
use fabric_proto::{ErrorCode, ProtoError, ServerOp};
use std::sync::Arc;

/// The set of entities a write frame made durable, applied on `handle_wal_done`: each mesh and
/// conversation once, in the order it was first written, with its head when the frame was
/// sealed. Per-message entries would make `handle_wal_done` queue every attached session once
/// per message.
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    pub(crate) meshes: Vec<(Arc<str>, u64)>,
    pub(crate) convs: Vec<DirtyConv>,
    /// Idempotency keys of the frame's appends and sends (scope, key, an append's seq or a
    /// send's record LSN).
    pub(crate) keys: Vec<(KeyScope, Arc<str>, u64)>,
    /// Inbox messages the frame holds a record of (mesh, pos, LSN, offset in the frame): they
    /// learn where on disk their body is when the write is handed out.
    pub(crate) sent: Vec<(Arc<str>, u64, u64, u64)>,
    /// A follower replica's records framed as received (LSN, offset in the frame): the
    /// replica learns where each is, to apply it there once committed.
    pub(crate) raw: Vec<(u64, u64)>,
}

/// A conversation a write frame holds entries of.
#[derive(Debug)]
pub(crate) struct DirtyConv {
    pub(crate) key: ConvKey,
    /// Its head when the frame was sealed (the last seq the frame holds).
    pub(crate) head: u64,
    /// Its first entry in the frame, the offset relative to the frame's start (the segment
    /// and the frame's offset are known when the write is handed out).
    pub(crate) first: Mark,
}

/// A frame cut from the building buffer, waiting for its write.
#[derive(Debug)]
pub(crate) struct Sealed {
    bytes: Vec<u8>,
    first_lsn: u64,
    last_lsn: u64,
    records: u64,
    dirty: Dirty,
    /// [`wal::FRAME_FLAG_REWIND`] for a replica's rewind frame.
    flags: u32,
}

#[derive(Debug)]
pub(crate) struct Inflight {
    pub(crate) last_lsn: u64,
    pub(crate) dirty: Dirty,
    /// Where the write ends: (segment, offset).
    pub(crate) end: (u64, u64),
}

impl Shard {
    /// Frames a record into the building write frame and returns its LSN; `too_large` (and
    /// nothing framed) if its payload is over `wal::RECORD_BYTES_MAX`. Callers check sizes
    /// that input controls before they change any state, so this refusal is a last guard.
    pub(crate) fn log(&mut self, record: &Record) -> Result<u64, ProtoError> {
        let lsn = self.next_lsn;
        self.frame_next_record();
        let Some(framed) = wal::encode_record(lsn, self.term, record, &mut self.building) else {
            if self.building_records == 0 {
                self.building.clear();
            }
            return Err(ProtoError::new(
                ErrorCode::TooLarge,
                format!(
                    "the record is over {} bytes (the WAL's record limit)",
                    wal::RECORD_BYTES_MAX
                ),
            ));
        };
        self.next_lsn += 1;
        self.building_records += 1;
        self.stats.records_written += 1;
        self.stats.bytes_written += framed as u64;
        if let Some(hooks) = &mut self.replica {
            // A leader replica proposes every record it frames, as Raft entry data.
            hooks.propose(lsn, &self.building[self.framed_at..]);
        }
        Ok(lsn)
    }

    /// Makes room for the next record in the building frame (sealing a full one first, or
    /// starting one with its reserved header) and notes where the record starts.
    pub(crate) fn frame_next_record(&mut self) {
        if self.building.len() >= self.config.wal_batch_bytes_max {
            self.seal();
        }
        if self.building_records == 0 {
            debug_assert!(self.building.is_empty());
            self.building.clear();
            self.building
                .extend_from_slice(&[0; wal::FRAME_HEADER_BYTES]);
            self.building_first_lsn = self.next_lsn;
        }
        self.framed_at = self.building.len();
    }

    /// Cuts the building frame: fills its header and captures what it makes visible (each
    /// dirty mesh and conversation with its head now, which is the last position or seq the
    /// frame holds: positions and seqs are assigned in the order records are framed).
    fn seal(&mut self) {
        if self.building_records == 0 {
            return;
        }
        let records = std::mem::take(&mut self.building_records);
        let mut bytes =
            std::mem::replace(&mut self.building, std::mem::take(&mut self.spare_buffer));
        self.building.clear();
        let first_lsn = self.building_first_lsn;
        let flags = std::mem::take(&mut self.building_flags);
        wal::FrameHeader::seal_flags(&mut bytes, first_lsn, records as u32, flags);
        let mut dirty = std::mem::take(&mut self.building_dirty);
        for (mesh, pos) in &mut dirty.meshes {
            if let Some(m) = self.meshes.get_mut(mesh) {
                m.in_building = false;
                *pos = m.head;
            }
        }
        for d in &mut dirty.convs {
            if let Some(c) = self.convs.get_mut(&d.key) {
                c.in_building = false;
                d.head = c.head;
            }
        }
        self.sealed.push_back(Sealed {
            bytes,
            first_lsn,
            last_lsn: self.next_lsn - 1,
            records,
            dirty,
            flags,
        });
    }

    pub(crate) fn ack_at(&mut self, lsn: u64, session: SessionId, reply: Reply) {
        if self.config.planted.ack_before_fsync {
            self.emit(session, reply);
            return;
        }
        debug_assert!(self.pending.back().is_none_or(|(l, _)| *l <= lsn));
        self.pending.push_back((lsn, Output { session, reply }));
    }

    /// One cursor record per peer whose cursor moved since the last write, with its latest
    /// cursor (however often it acknowledged meanwhile).
    fn log_cursors(&mut self) {
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
            // A cursor record is a few hundred bytes at most (two ids and a number).
            let logged = self.propose(Record::Acked(rec));
            debug_assert!(logged.is_ok());
        }
    }

    /// The next WAL write, if one is due and none is in flight.
    pub fn poll_wal(&mut self) -> Option<WalWrite> {
        if self.inflight.is_some() || self.failed {
            return None;
        }
        self.log_cursors();
        if self.sealed.is_empty() {
            self.seal();
        }
        let frame = self.sealed.pop_front();
        if frame.is_none() && self.deletes.is_empty() && !self.manifest_dirty {
            return None;
        }
        let (bytes, first_lsn, last_lsn, records, mut dirty, flags) = match frame {
            Some(f) => (
                f.bytes,
                f.first_lsn,
                f.last_lsn,
                f.records,
                f.dirty,
                f.flags,
            ),
            None => (
                Vec::new(),
                self.next_lsn,
                self.next_lsn - 1,
                0,
                Dirty::default(),
                0,
            ),
        };
        let rewind = flags & wal::FRAME_FLAG_REWIND != 0;
        if rewind {
            self.rewind_segments(first_lsn);
        }
        // A rewind below the newest segment's first LSN starts a segment of its own (a
        // segment's header names the LSN its first frame starts at); any other rewind goes
        // into the newest segment whatever its size.
        let create = !bytes.is_empty()
            && if rewind {
                self.segments.back().is_none_or(|s| first_lsn < s.first_lsn)
            } else {
                self.rotates(bytes.len() as u64)
            };
        if create {
            self.open_segment(first_lsn);
        }
        let (segment, offset) = self.append_to_newest(&bytes, first_lsn, last_lsn);
        if rewind {
            self.rewinds.push((first_lsn, (segment, offset)));
        }
        self.place_raw(&mut dirty, segment, offset);
        self.mark_conversations(&dirty, segment, offset);
        self.locate_sent(&mut dirty, segment, offset);
        let keys = std::mem::take(&mut dirty.keys);
        if !keys.is_empty() || create {
            self.note_keys(segment, keys);
        }
        let manifest = std::mem::take(&mut self.manifest_dirty).then_some(self.manifest);
        let end = (segment, offset + bytes.len() as u64);
        self.inflight = Some(Inflight {
            last_lsn,
            dirty,
            end,
        });
        self.stats.wal_writes += 1;
        Some(WalWrite {
            shard: self.config.shard,
            segment,
            create,
            offset,
            bytes,
            first_lsn,
            last_lsn,
            records,
            manifest,
            delete: std::mem::take(&mut self.deletes),
            remove_repair: false,
            members: None,
        })
    }

    /// Each conversation in a write gets its disk index entry, if due, now that the write's
    /// place is known.
    fn mark_conversations(&mut self, dirty: &Dirty, segment: u64, offset: u64) {
        let stride = self.config.log_index_stride_records;
        for d in &dirty.convs {
            if let Some(c) = self.convs.get_mut(&d.key) {
                let mark = Mark {
                    segment,
                    offset: offset + d.first.offset,
                    ..d.first
                };
                c.maybe_mark(mark, stride);
            }
        }
    }

    /// Each inbox message the write holds learns where its record is (if that record is
    /// still its newest copy).
    fn locate_sent(&mut self, dirty: &mut Dirty, segment: u64, offset: u64) {
        for (mesh, pos, lsn, rel) in dirty.sent.drain(..) {
            let msg = self.meshes.get_mut(&mesh).and_then(|m| m.log.get_mut(&pos));
            if let Some(msg) = msg.filter(|m| m.lsn == lsn) {
                msg.at = (segment, offset + rel);
            }
        }
    }

    /// A rewind frame from `lsn` is being written: the records from `lsn` on are replaced,
    /// in whichever segments they are.
    fn rewind_segments(&mut self, lsn: u64) {
        for seg in self.segments.iter_mut() {
            seg.last_lsn = seg.last_lsn.min(lsn - 1).max(seg.first_lsn - 1);
        }
    }

    /// A follower replica's records in a write learn where they are: (LSN, (segment, frame
    /// offset, record offset)).
    fn place_raw(&mut self, dirty: &mut Dirty, segment: u64, offset: u64) {
        if let Some(hooks) = &mut self.replica {
            for (lsn, rel) in dirty.raw.drain(..) {
                hooks.placed.push((lsn, (segment, offset, offset + rel)));
            }
        }
    }

    /// A frame of `len` bytes starts a new segment: there is none yet, or the newest one holds
    /// a frame already and would grow past `wal_segment_bytes_max`.
    fn rotates(&self, len: u64) -> bool {
        match self.segments.back() {
            None => true,
            Some(s) => {
                s.bytes > wal::SEGMENT_HEADER_BYTES as u64
                    && s.bytes + len > self.config.wal_segment_bytes_max
            }
        }
    }

    fn open_segment(&mut self, first_lsn: u64) {
        let id = self.segments.back().map_or(1, |s| s.id + 1);
        self.segments.push_back(SegmentInfo {
            id,
            first_lsn,
            last_lsn: first_lsn - 1,
            bytes: wal::SEGMENT_HEADER_BYTES as u64,
        });
        self.wal_bytes += wal::SEGMENT_HEADER_BYTES as u64;
        self.manifest.newest = id;
        if self.manifest.oldest == 0 {
            self.manifest.oldest = id;
        }
        self.manifest_dirty = true;
    }

    /// Accounts a frame to the newest segment; returns the segment and the offset it starts at.
    fn append_to_newest(&mut self, bytes: &[u8], first_lsn: u64, last_lsn: u64) -> (u64, u64) {
        let Some(seg) = self.segments.back_mut() else {
            return (0, 0);
        };
        let offset = seg.bytes;
        if !bytes.is_empty() {
            assert_eq!(seg.last_lsn + 1, first_lsn, "LSNs are dense across writes");
            seg.last_lsn = last_lsn;
            seg.bytes += bytes.len() as u64;
            self.wal_bytes += bytes.len() as u64;
        }
        (seg.id, offset)
    }

    /// The glue wrote and fdatasynced everything up to `last_lsn`.
    pub fn handle_wal_done(&mut self, _now: u64, last_lsn: u64) {
        let Some(inflight) = self.inflight.take() else {
            debug_assert!(false, "wal done with no write in flight");
            return;
        };
        assert_eq!(inflight.last_lsn, last_lsn, "WAL writes complete in order");
        assert!(
            last_lsn >= self.durable_lsn || self.replica.is_some(),
            "durability never goes back (a replica's rewind excepted)"
        );
        self.durable_lsn = last_lsn;
        if inflight.end.1 > 0 {
            self.durable_end = inflight.end;
        }
        match &mut self.replica {
            // A replica's data becomes visible, and its acks leave, at commit
            // (`commit_through`), which Raft decides.
            Some(hooks) => hooks.awaiting_commit.push_back((last_lsn, inflight.dirty)),
            None => {
                self.release_acks(last_lsn);
                self.make_visible(inflight.dirty);
                self.retention_step(last_lsn);
                self.trim_cache();
            }
        }
    }

    /// A leader replica: everything up to `lsn` is committed (durable on a quorum, this
    /// node's own copy included): release the acks, make the data visible, go on with
    /// retention (whose checkpoints count only once committed).
    pub(crate) fn commit_through(&mut self, lsn: u64) {
        debug_assert!(
            lsn <= self.durable_lsn,
            "a leader commits only what it holds durably"
        );
        // A write's acks leave with its data, when the commit covers the whole write (a
        // leader's write may commit in parts): an `ok` then means every read shows the entry.
        while let Some((last, dirty)) = self.replica.as_mut().and_then(|h| h.committed_write(lsn)) {
            self.release_acks(last);
            self.make_visible(dirty);
        }
        self.retention_step(lsn);
        self.trim_cache();
    }

    fn release_acks(&mut self, last_lsn: u64) {
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
    }

    fn make_visible(&mut self, dirty: Dirty) {
        for (mesh, pos) in dirty.meshes {
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
        for d in dirty.convs {
            let subs = match self.convs.get_mut(&d.key) {
                Some(c) if d.head > c.durable_seq => {
                    c.durable_seq = d.head;
                    c.subscribers.clone()
                }
                _ => continue,
            };
            for s in subs {
                self.queue_drain(s);
            }
        }
    }

    /// Hands back the buffer of a finished [`WalWrite`] for the next batch. Optional: without
    /// it each batch starts in a new `Vec`. Only its allocation is kept, never its bytes.
    pub fn recycle_wal_buffer(&mut self, mut buffer: Vec<u8>) {
        buffer.clear();
        // A buffer larger than one batch may hold is not kept.
        if buffer.capacity() > 2 * self.config.wal_batch_bytes_max {
            return;
        }
        if self.building.is_empty() && buffer.capacity() > self.building.capacity() {
            self.building = buffer;
        } else if buffer.capacity() > self.spare_buffer.capacity() {
            self.spare_buffer = buffer;
        }
    }

    /// The glue could not write or sync the WAL (and has cut the segment back to what was
    /// synced). Nothing pending can be acknowledged: the writes fail with `unavailable`, or
    /// `storage_full` when the disk was full, and the shard refuses writes until it is
    /// recovered anew from disk.
    pub fn handle_wal_failed(&mut self, _now: u64, no_space: bool, reason: &str) {
        self.failed = true;
        self.inflight = None;
        let code = if no_space {
            ErrorCode::StorageFull
        } else {
            ErrorCode::Unavailable
        };
        let pending = std::mem::take(&mut self.pending);
        for (_, o) in pending {
            let r = match &o.reply {
                Reply::Frame(ServerOp::Ok { r, .. }) => Some(*r),
                _ => None,
            };
            self.stats.errors_sent += 1;
            let message = format!("WAL write failed: {reason}");
            self.emit(
                o.session,
                Reply::Frame(ServerOp::error(r, ProtoError::new(code, message))),
            );
        }
    }
}
