//! Idempotency keys of retained appends and sends, without holding them all in memory.
//!
//! A key has a scope ([`KeyScope`]): an append's is its conversation, a send's is its sender
//! (mesh and peer). The keys of records in the newest segment (and of records not yet
//! written) are exact: an append's in its conversation's map, a send's in `sent`. When a segment is sealed (the next write starts a new one), its
//! keys leave the maps and become that segment's index: a sorted array of 32-bit fingerprints
//! (crc32c of scope and key), 4 bytes a key. A keyed append or send whose key is not in the
//! maps checks the sealed segments' fingerprints, newest first; a match (for an append, in a
//! segment that holds entries of the conversation) is confirmed on disk (a scan of that
//! segment: for an append from the conversation's mark there, for a send from its start),
//! while the op and every later op of the same scope wait, so seqs and a sender's positions
//! keep the order ops arrived in. A false match (another key
//! with the same fingerprint, about one in 2^32 per key) costs one scan, never a wrong answer.

use crate::conv::ConvKey;
use crate::read::Seen;
use crate::read::{ReadStart, Reader};
use crate::record::{AppendedHead, AppendedRec, Record, RecordType, SentHead, SentRec};
use crate::{wal, Shard};
use fabric_proto::codec::from_binary_prefix;
use fabric_proto::internal::{Reply, SessionId};
use fabric_proto::{ProtoError, ServerOp};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// What one read of a key lookup found: the key's seq, where the scan stopped (in the next
/// segment: this one is done), or that the first record needs a longer read.
pub(crate) struct KeyScan {
    pub(crate) found: Option<u64>,
    pub(crate) stop: (u64, u64),
    pub(crate) grow: Option<usize>,
}

/// A send's exact key: (mesh, sender, key).
pub(crate) type SentKey = (Arc<str>, Arc<str>, Arc<str>);

/// What a send's exact key names: the message's position, and the LSN of the record that
/// holds the key (the original, or retention's newest copy of it). A copy keeps the position,
/// so only the LSN tells the copy from the original when the original's segment is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SentAt {
    pub(crate) pos: u64,
    pub(crate) lsn: u64,
}

/// Where a key is unique: an append's conversation, or a send's sender (mesh, peer).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum KeyScope {
    Conv(ConvKey),
    Sender(Arc<str>, Arc<str>),
}

impl KeyScope {
    fn mesh(&self) -> &Arc<str> {
        match self {
            KeyScope::Conv((mesh, _)) | KeyScope::Sender(mesh, _) => mesh,
        }
    }
}

/// An op waiting for a key lookup of its scope.
#[derive(Debug)]
pub(crate) struct Parked {
    pub(crate) session: SessionId,
    pub(crate) r: u64,
    pub(crate) op: ParkedOp,
}

#[derive(Debug)]
pub(crate) enum ParkedOp {
    Append(AppendedRec),
    /// A send, its record built but its position not yet assigned (0).
    Send(SentRec),
}

impl ParkedOp {
    fn scope(&self) -> KeyScope {
        match self {
            ParkedOp::Append(a) => KeyScope::Conv((a.mesh.clone(), a.conv.clone())),
            ParkedOp::Send(s) => KeyScope::Sender(s.mesh.clone(), s.from.clone()),
        }
    }

    fn key(&self) -> Option<&Arc<str>> {
        match self {
            ParkedOp::Append(a) => a.key.as_ref(),
            ParkedOp::Send(s) => s.key.as_ref(),
        }
    }
}

/// A key lookup under way: the scope's first parked op is the one looked up.
#[derive(Debug)]
pub(crate) struct Lookup {
    pub(crate) scope: KeyScope,
    pub(crate) key: Arc<str>,
    /// Sealed segments still to scan, newest first.
    pub(crate) segments: Vec<u64>,
    /// The segment that was open when the lookup began: segments from it on may have been
    /// sealed meanwhile, holding the key in a record retention copied forward.
    pub(crate) open_at: u64,
}

#[derive(Debug, Default)]
pub(crate) struct KeyIndex {
    /// Sorted fingerprints of each sealed segment's keys, oldest segment first.
    sealed: VecDeque<(u64, Box<[u32]>)>,
    /// The segment whose keys are still exact, and those keys (scope, key, and the record's
    /// mark in its exact map: an append's seq, a send's record LSN).
    open_segment: u64,
    open: Vec<(KeyScope, Arc<str>, u64)>,
    /// Exact keys of sends in the open segment (and not yet written): (mesh, sender, key) to
    /// the message's position and record. (An append's are in its conversation's map.)
    pub(crate) sent: HashMap<SentKey, SentAt>,
    /// Ops waiting per scope while its first one's key is looked up on disk.
    pub(crate) parked: HashMap<KeyScope, VecDeque<Parked>>,
    pub(crate) parked_count: usize,
    pub(crate) lookups: HashMap<u64, Lookup>,
    next_lookup: u64,
}

/// The fingerprint of a key in its scope (a leading byte keeps the two kinds apart).
pub(crate) fn fingerprint(scope: &KeyScope, key: &str) -> u32 {
    let (kind, mesh, name) = match scope {
        KeyScope::Conv((mesh, conv)) => (0u8, mesh, conv),
        KeyScope::Sender(mesh, peer) => (1u8, mesh, peer),
    };
    let mut h = crc32c::crc32c(&[kind]);
    h = crc32c::crc32c_append(h, mesh.as_bytes());
    h = crc32c::crc32c_append(h, &[0]);
    h = crc32c::crc32c_append(h, name.as_bytes());
    h = crc32c::crc32c_append(h, &[0]);
    crc32c::crc32c_append(h, key.as_bytes())
}

#[cfg(test)]
impl KeyIndex {
    /// Fingerprints held for sealed segments (memory: 4 bytes each).
    pub(crate) fn sealed_fingerprints(&self) -> usize {
        self.sealed.iter().map(|(_, f)| f.len()).sum()
    }

    /// Exact keys held for the open segment.
    pub(crate) fn open_keys(&self) -> usize {
        self.open.len()
    }
}

impl Shard {
    /// Keys of entries written into `segment` (live: when their write is handed out; replay:
    /// as they are read). A new segment seals the open one first.
    pub(crate) fn note_keys(&mut self, segment: u64, keys: Vec<(KeyScope, Arc<str>, u64)>) {
        if segment != self.keys.open_segment {
            self.seal_open_keys();
            self.keys.open_segment = segment;
        }
        self.keys.open.extend(keys);
    }

    /// A send's key joins the exact keys (its record is in the open segment, or will be).
    pub(crate) fn note_sent_key(&mut self, key: SentKey, at: SentAt) {
        self.keys.sent.insert(key, at);
    }

    /// Retention retired every segment up to `segment`: their keys go (the open ones too, if
    /// the open segment is among them, as after a recovery whose newest segments held no key).
    pub(crate) fn retire_keys_upto(&mut self, segment: u64) {
        if self.keys.open_segment <= segment {
            self.seal_open_keys();
        }
        let k = &mut self.keys;
        while k.sealed.front().is_some_and(|(s, _)| *s <= segment) {
            k.sealed.pop_front();
        }
    }

    /// The open segment's keys leave the conversations' maps and become its fingerprints.
    fn seal_open_keys(&mut self) {
        let open = std::mem::take(&mut self.keys.open);
        if open.is_empty() {
            return;
        }
        let mut fps: Vec<u32> = open.iter().map(|(s, k, _)| fingerprint(s, k)).collect();
        fps.sort_unstable();
        fps.dedup();
        for (scope, key, at) in open {
            // A key leaves only with the record it names (a newer record may hold it now).
            match scope {
                KeyScope::Conv(conv) => {
                    if let Some(c) = self.convs.get_mut(&conv) {
                        if c.keys.get(&key) == Some(&at) {
                            c.keys.remove(&key);
                        }
                    }
                }
                // A copy forward names the same position from a newer record (in a segment
                // still open, or not yet written): only the record's own LSN lets its key go.
                KeyScope::Sender(mesh, peer) => {
                    let k = (mesh, peer, key);
                    if self.keys.sent.get(&k).is_some_and(|s| s.lsn == at) {
                        self.keys.sent.remove(&k);
                    }
                }
            }
        }
        let segment = self.keys.open_segment;
        self.keys
            .sealed
            .push_back((segment, fps.into_boxed_slice()));
    }

    /// Sealed segments, newest first, that may hold `key` in `scope`: its fingerprint is
    /// there (and, for an append, an entry of the conversation).
    pub(crate) fn key_candidates(&self, scope: &KeyScope, key: &str) -> Vec<u64> {
        let conv = match scope {
            KeyScope::Conv(conv) => match self.convs.get(conv) {
                Some(c) => Some(c),
                None => return Vec::new(),
            },
            KeyScope::Sender(..) => None,
        };
        let fp = fingerprint(scope, key);
        self.keys
            .sealed
            .iter()
            .rev()
            .filter(|(seg, fps)| {
                fps.binary_search(&fp).is_ok()
                    && conv.is_none_or(|c| c.marks.iter().any(|m| m.segment == *seg))
            })
            .map(|(seg, _)| *seg)
            .collect()
    }

    /// An append or send in its scope's order: behind the scope's key lookup if one is under
    /// way (seqs and a sender's positions keep arrival order), else taken now.
    pub(crate) fn take_in_order(&mut self, p: Parked) -> Result<(), ProtoError> {
        if let Some(q) = self.keys.parked.get_mut(&p.op.scope()) {
            q.push_back(p);
            self.keys.parked_count += 1;
            return Ok(());
        }
        self.take(p, true)
    }

    /// A retried key's answer: now if its original is durable, else with the last record
    /// framed (at or after the original, so its durability covers it).
    pub(crate) fn answer_retry(&mut self, session: SessionId, reply: Reply, durable: bool) {
        if durable {
            self.emit(session, reply);
        } else {
            let lsn = self.next_lsn - 1;
            self.ack_at(lsn, session, reply);
        }
    }

    /// Parks `p` (the first of its scope) and starts looking its key up in `segments`.
    pub(crate) fn park_for_lookup(&mut self, p: Parked, segments: Vec<u64>) {
        let scope = p.op.scope();
        let key = p.op.key().cloned().expect("only keyed ops are looked up");
        self.keys
            .parked
            .entry(scope.clone())
            .or_default()
            .push_back(p);
        self.keys.parked_count += 1;
        self.start_lookup(scope, key, segments);
    }

    /// Looks `key` up in `segments` for the scope's first parked op.
    fn start_lookup(&mut self, scope: KeyScope, key: Arc<str>, segments: Vec<u64>) {
        self.stats.key_lookups += 1;
        self.keys.next_lookup += 1;
        let id = self.keys.next_lookup;
        let lookup = Lookup {
            scope,
            key,
            segments,
            open_at: self.keys.open_segment,
        };
        self.keys.lookups.insert(id, lookup);
        self.scan_next_segment(id, None);
    }

    /// Reads on in the lookup's current segment (from `at`) or starts on its next one; with
    /// none left the key is new.
    pub(crate) fn scan_next_segment(&mut self, id: u64, mut at: Option<(u64, u64)>) {
        while let Some(l) = self.keys.lookups.get(&id) {
            let Some(&segment) = l.segments.first() else {
                return self.finish_lookup(id, None);
            };
            let start = at
                .filter(|(s, _)| *s == segment)
                .or_else(|| match &l.scope {
                    KeyScope::Conv(conv) => {
                        let c = self.convs.get(conv)?;
                        let m = c.marks.iter().find(|m| m.segment == segment)?;
                        Some((m.segment, m.offset))
                    }
                    // A sender's messages have no marks: its segments are scanned whole.
                    KeyScope::Sender(..) => Some((segment, wal::SEGMENT_HEADER_BYTES as u64)),
                });
            let conv = (l.scope.mesh().clone(), Arc::from(""));
            if let Some(start) = start {
                match self.start_read(Reader::Key(id), &conv, 0, 1, Some(start)) {
                    ReadStart::Started(_) | ReadStart::Busy => return,
                    ReadStart::Nothing => {}
                }
            }
            // Nothing to read there (retired meanwhile, or scanned to its end): next one.
            if let Some(l) = self.keys.lookups.get_mut(&id) {
                l.segments.remove(0);
            }
            at = None;
        }
    }

    /// What a key lookup's read found: the key's seq, or where to read on (`stop`), or that
    /// the segment is done (`stop` in another segment).
    pub(crate) fn key_read(&mut self, id: u64, found: Option<u64>, stop: (u64, u64)) {
        if found.is_some() {
            return self.finish_lookup(id, found);
        }
        let Some(l) = self.keys.lookups.get_mut(&id) else {
            return;
        };
        if l.segments.first() != Some(&stop.0) {
            l.segments.remove(0);
            return self.scan_next_segment(id, None);
        }
        self.scan_next_segment(id, Some(stop));
    }

    /// Answers the looked-up op (its original seq or position, or as a new op), then takes
    /// the scope's other parked ops in order until one needs a lookup of its own.
    fn finish_lookup(&mut self, id: u64, found: Option<u64>) {
        let Some(l) = self.keys.lookups.remove(&id) else {
            return;
        };
        if found.is_none() {
            // A copy forward may have moved the original into a segment sealed while this
            // lookup ran (and retention may have deleted the one it was in): look there too.
            let sealed_since: Vec<u64> = (self.key_candidates(&l.scope, &l.key).into_iter())
                .filter(|segment| *segment >= l.open_at)
                .collect();
            if !sealed_since.is_empty() {
                return self.start_lookup(l.scope, l.key, sealed_since);
            }
        }
        let Some(mut queue) = self.keys.parked.remove(&l.scope) else {
            return;
        };
        let first = queue.pop_front().expect("the looked-up op is parked");
        self.keys.parked_count -= 1;
        match found {
            Some(at) => {
                // The original is in a sealed segment: durable here. It is answered now if it
                // is also visible (a replica's leader makes data visible only once committed),
                // else with the records framed since.
                self.stats.key_lookups_found += 1;
                let (pos, seq, visible) = match &first.op {
                    ParkedOp::Append(rec) => {
                        let key = (rec.mesh.clone(), rec.conv.clone());
                        let c = self.convs.get(&key);
                        (None, Some(at), c.is_some_and(|c| at <= c.durable_seq))
                    }
                    ParkedOp::Send(rec) => {
                        let m = self.meshes.get(&rec.mesh);
                        (Some(at), None, m.is_some_and(|m| at <= m.durable_pos))
                    }
                };
                if seq.is_some() && visible {
                    self.stats.appends_acked += 1;
                }
                let reply = Reply::Frame(ServerOp::Ok {
                    r: first.r,
                    pos,
                    seq,
                });
                self.answer_retry(first.session, reply, visible);
            }
            None => self.take_or_refuse(first, false),
        }
        while let Some(next) = queue.pop_front() {
            self.keys.parked_count -= 1;
            self.take_or_refuse(next, true);
            if let Some(q) = self.keys.parked.get_mut(&l.scope) {
                // It parked for a lookup of its own: the rest wait behind it, in order (they
                // are still counted in `parked_count`).
                q.extend(queue);
                return;
            }
        }
    }

    /// A parked op, taken now: an error goes to its session as the request's answer.
    fn take_or_refuse(&mut self, p: Parked, look_up: bool) {
        let (session, r) = (p.session, p.r);
        if let Err(e) = self.take(p, look_up) {
            self.stats.errors_sent += 1;
            self.emit(session, Reply::Frame(ServerOp::error(Some(r), e)));
        }
    }

    /// An op taken in its turn (a lookup first, if `look_up` and a sealed segment may hold
    /// its key).
    fn take(&mut self, p: Parked, look_up: bool) -> Result<(), ProtoError> {
        let (session, r) = (p.session, p.r);
        match p.op {
            ParkedOp::Append(rec) => self.append_taken(session, r, rec, look_up),
            ParkedOp::Send(rec) => self.send_taken(session, r, rec, look_up),
        }
    }

    /// Scans a key lookup's read: the seq of an entry of the conversation (or the position of
    /// a message of the sender) with the key, if one is in `bytes`, and where the scan stopped.
    pub(crate) fn find_key(
        &self,
        id: u64,
        segment: u64,
        base: u64,
        bytes: &[u8],
    ) -> Result<KeyScan, String> {
        let scan = |found, stop, grow| KeyScan { found, stop, grow };
        let Some(l) = self.keys.lookups.get(&id) else {
            return Ok(scan(None, (segment, base), None));
        };
        let mut found = None;
        let walked = self.walk_records(segment, base, bytes, |r| {
            found = keyed_record(&l.scope, &l.key, r)?;
            Ok(found.is_none())
        })?;
        let end = walked.stop;
        if found.is_none() && walked.grow.is_none() && self.readable_len(segment, end) == 0 {
            // The segment ends here: the lookup is done with it.
            return Ok(scan(None, (segment + 1, 0), None));
        }
        Ok(scan(found, (segment, end), walked.grow))
    }
}

/// The seq (append) or position (send) `r` holds for `key` in `scope`, if it is such a record.
fn keyed_record(scope: &KeyScope, key: &str, r: &Seen) -> Result<Option<u64>, String> {
    let hit = match scope {
        KeyScope::Conv((mesh, conv)) => {
            r.kind == RecordType::Appended
                && from_binary_prefix::<AppendedHead>(r.payload)
                    .is_some_and(|h| *h.mesh == **mesh && *h.conv == **conv)
        }
        KeyScope::Sender(mesh, _) => {
            r.kind == RecordType::Sent
                && from_binary_prefix::<SentHead>(r.payload).is_some_and(|h| *h.mesh == **mesh)
        }
    };
    if !hit {
        return Ok(None);
    }
    Ok(match (scope, r.decode()?) {
        (KeyScope::Conv(_), Record::Appended(a)) if a.key.as_deref() == Some(key) => Some(a.seq),
        (KeyScope::Sender(_, peer), Record::Sent(s))
            if s.from == *peer && s.key.as_deref() == Some(key) =>
        {
            Some(s.pos)
        }
        _ => None,
    })
}
