//! Idempotency keys of retained appends, without holding them all in memory.
//!
//! The keys of entries in the newest segment (and of entries not yet written) are exact, in
//! each conversation's map. When a segment is sealed (the next write starts a new one), its
//! keys leave the maps and become that segment's index: a sorted array of 32-bit fingerprints
//! (crc32c of mesh, conversation and key), 4 bytes a key. A keyed append whose key is not in
//! the maps checks the sealed segments' fingerprints, newest first; a match in a segment that
//! holds entries of the conversation is confirmed on disk (a scan of the conversation's entries
//! in that segment, from its mark there), while the append and every later append to the same
//! conversation wait, so seqs keep the order appends arrived in. A false match (another key
//! with the same fingerprint, about one in 2^32 per key) costs one scan, never a wrong answer.

use crate::conv::ConvKey;
use crate::read::{ReadStart, Reader};
use crate::record::{AppendedHead, AppendedRec, Record, RecordType};
use crate::Shard;
use fabric_proto::codec::from_binary_prefix;
use fabric_proto::internal::{Reply, SessionId};
use fabric_proto::ServerOp;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// What one read of a key lookup found: the key's seq, where the scan stopped (in the next
/// segment: this one is done), or that the first record needs a longer read.
pub(crate) struct KeyScan {
    pub(crate) found: Option<u64>,
    pub(crate) stop: (u64, u64),
    pub(crate) grow: Option<usize>,
}

/// An append waiting for a key lookup of its conversation.
#[derive(Debug)]
pub(crate) struct Parked {
    pub(crate) session: SessionId,
    pub(crate) r: u64,
    pub(crate) rec: AppendedRec,
}

/// A key lookup under way: the conversation's first parked append is the one looked up.
#[derive(Debug)]
pub(crate) struct Lookup {
    pub(crate) conv: ConvKey,
    pub(crate) key: Arc<str>,
    /// Sealed segments still to scan, newest first.
    pub(crate) segments: Vec<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct KeyIndex {
    /// Sorted fingerprints of each sealed segment's keys, oldest segment first.
    sealed: VecDeque<(u64, Box<[u32]>)>,
    /// The segment whose keys are still exact, and those keys (conversation, key, seq).
    open_segment: u64,
    open: Vec<(ConvKey, Arc<str>, u64)>,
    /// Appends waiting per conversation while its first one's key is looked up on disk.
    pub(crate) parked: HashMap<ConvKey, VecDeque<Parked>>,
    pub(crate) parked_count: usize,
    pub(crate) lookups: HashMap<u64, Lookup>,
    next_lookup: u64,
}

/// The fingerprint of a key in a conversation.
pub(crate) fn fingerprint(conv: &ConvKey, key: &str) -> u32 {
    let mut h = crc32c::crc32c(conv.0.as_bytes());
    h = crc32c::crc32c_append(h, &[0]);
    h = crc32c::crc32c_append(h, conv.1.as_bytes());
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
    pub(crate) fn note_keys(&mut self, segment: u64, keys: Vec<(ConvKey, Arc<str>, u64)>) {
        if segment != self.keys.open_segment {
            self.seal_open_keys();
            self.keys.open_segment = segment;
        }
        self.keys.open.extend(keys);
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
        let mut fps: Vec<u32> = open.iter().map(|(c, k, _)| fingerprint(c, k)).collect();
        fps.sort_unstable();
        fps.dedup();
        for (conv, key, seq) in open {
            if let Some(c) = self.convs.get_mut(&conv) {
                // A key leaves only with the entry it names (a newer entry may hold it now).
                if c.keys.get(&key) == Some(&seq) {
                    c.keys.remove(&key);
                }
            }
        }
        let segment = self.keys.open_segment;
        self.keys
            .sealed
            .push_back((segment, fps.into_boxed_slice()));
    }

    /// Sealed segments, newest first, that may hold `key` for `conv`: its fingerprint is
    /// there and so is an entry of the conversation.
    pub(crate) fn key_candidates(&self, conv: &ConvKey, key: &str) -> Vec<u64> {
        let Some(c) = self.convs.get(conv) else {
            return Vec::new();
        };
        let fp = fingerprint(conv, key);
        self.keys
            .sealed
            .iter()
            .rev()
            .filter(|(seg, fps)| {
                fps.binary_search(&fp).is_ok() && c.marks.iter().any(|m| m.segment == *seg)
            })
            .map(|(seg, _)| *seg)
            .collect()
    }

    /// Parks `p` (the first of its conversation) and starts looking its key up in `segments`.
    pub(crate) fn park_for_lookup(&mut self, p: Parked, segments: Vec<u64>) {
        let conv = (p.rec.mesh.clone(), p.rec.conv.clone());
        let key = p.rec.key.clone().expect("only keyed appends are looked up");
        self.keys
            .parked
            .entry(conv.clone())
            .or_default()
            .push_back(p);
        self.keys.parked_count += 1;
        self.stats.key_lookups += 1;
        self.keys.next_lookup += 1;
        let id = self.keys.next_lookup;
        let lookup = Lookup {
            conv,
            key,
            segments,
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
            let start = at.filter(|(s, _)| *s == segment).or_else(|| {
                let c = self.convs.get(&l.conv)?;
                let m = c.marks.iter().find(|m| m.segment == segment)?;
                Some((m.segment, m.offset))
            });
            let conv = l.conv.clone();
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

    /// Answers the looked-up append (its original seq, or as a new append), then takes the
    /// conversation's other parked appends in order until one needs a lookup of its own.
    fn finish_lookup(&mut self, id: u64, found: Option<u64>) {
        let Some(l) = self.keys.lookups.remove(&id) else {
            return;
        };
        let Some(mut queue) = self.keys.parked.remove(&l.conv) else {
            return;
        };
        let first = queue.pop_front().expect("the looked-up append is parked");
        self.keys.parked_count -= 1;
        match found {
            Some(seq) => {
                // The original is in a sealed segment: durable.
                self.stats.appends_acked += 1;
                self.stats.key_lookups_found += 1;
                let reply = Reply::Frame(ServerOp::Ok {
                    r: first.r,
                    pos: None,
                    seq: Some(seq),
                });
                self.emit(first.session, reply);
            }
            None => self.append_or_refuse(first, false),
        }
        while let Some(next) = queue.pop_front() {
            self.keys.parked_count -= 1;
            self.append_or_refuse(next, true);
            if let Some(q) = self.keys.parked.get_mut(&l.conv) {
                // It parked for a lookup of its own: the rest wait behind it, in order (they
                // are still counted in `parked_count`).
                q.extend(queue);
                return;
            }
        }
    }

    /// A parked append, taken now: an error goes to its session as the request's answer.
    fn append_or_refuse(&mut self, p: Parked, look_up: bool) {
        let (session, r) = (p.session, p.r);
        if let Err(e) = self.append_taken(session, r, p.rec, look_up) {
            self.stats.errors_sent += 1;
            self.emit(session, Reply::Frame(ServerOp::error(Some(r), e)));
        }
    }

    /// Scans a key lookup's read: the seq of an entry of the conversation with the key, if
    /// one is in `bytes`, and where the scan stopped.
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
            let ours = r.kind == RecordType::Appended
                && from_binary_prefix::<AppendedHead>(r.payload)
                    .is_some_and(|h| *h.mesh == *l.conv.0 && *h.conv == *l.conv.1);
            if ours {
                if let Record::Appended(a) = r.decode()? {
                    if a.key.as_deref() == Some(&*l.key) {
                        found = Some(a.seq);
                    }
                }
            }
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
