//! A conversation's state: where its retained entries are, the newest of them in memory, its
//! head, idempotency keys and subscribers.
//!
//! Retained entries live on disk. Memory holds the newest ones (the log cache, bounded
//! shard-wide by `log_cache_bytes_max`) and a sparse index to the rest ([`Mark`]: the
//! conversation's first entry in each segment, and one entry per `log_index_stride_records` of
//! its entries at most), so memory follows what is cached and how many segments there are, not
//! how much is retained. A conversation with no retained entry and no subscriber keeps only its
//! head, and one that never had an entry is not kept at all.

use fabric_proto::{Body, DeliveredEvent};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::SessionId;

/// Bytes a cached entry costs beyond its body, sender and key (the entry, the cache queue's
/// slot): an estimate for the cache's budget, not an exact size.
pub(crate) const CACHED_ENTRY_OVERHEAD_BYTES: u64 = 96;

#[derive(Debug, Clone)]
pub(crate) struct StoredEvent {
    pub(crate) seq: u64,
    pub(crate) from: Arc<str>,
    pub(crate) body: Body,
    pub(crate) ts: u64,
    pub(crate) lsn: u64,
    pub(crate) key: Option<Arc<str>>,
}

impl StoredEvent {
    /// What the entry counts against the log cache.
    pub(crate) fn cache_bytes(&self) -> u64 {
        (self.body.len() + self.from.len() + self.key.as_ref().map_or(0, |k| k.len())) as u64
            + CACHED_ENTRY_OVERHEAD_BYTES
    }
}

/// Where one retained entry is on disk: reading the conversation from `seq` on starts at the
/// record at `offset` of `segment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    pub(crate) seq: u64,
    pub(crate) lsn: u64,
    pub(crate) segment: u64,
    pub(crate) offset: u64,
}

pub(crate) type ConvKey = (Arc<str>, Arc<str>);

#[derive(Debug)]
pub(crate) struct Conv {
    /// The newest entries, in memory: contiguous seqs ending at `head` (or empty).
    pub(crate) cached: VecDeque<StoredEvent>,
    /// The sparse index of retained entries on disk, in seq order; the first mark is the
    /// oldest retained entry written so far.
    pub(crate) marks: VecDeque<Mark>,
    /// Seq of the oldest retained entry, or `head + 1` when none is retained.
    pub(crate) first_seq: u64,
    pub(crate) head: u64,
    pub(crate) durable_seq: u64,
    /// Idempotency keys of entries in the newest segment (and not yet written) -> their seq;
    /// sealed segments' keys are fingerprints in the shard's `keys` index.
    pub(crate) keys: HashMap<Arc<str>, u64>,
    pub(crate) subscribers: Vec<SessionId>,
    /// Listed in the building batch's `Dirty` (one entry per conversation per batch).
    pub(crate) in_building: bool,
    /// Replay only: the segment and frame of the last entry replayed (marks go at a
    /// conversation's first entry in a frame, as the live path places them).
    pub(crate) replay_frame: (u64, u64),
}

impl Default for Conv {
    fn default() -> Conv {
        // An empty conversation's next seq is 1, so its (empty) retained range starts there.
        Conv {
            cached: VecDeque::new(),
            marks: VecDeque::new(),
            first_seq: 1,
            head: 0,
            durable_seq: 0,
            keys: HashMap::new(),
            subscribers: Vec::new(),
            in_building: false,
            replay_frame: (0, 0),
        }
    }
}

impl Conv {
    /// A new entry (seq `head + 1`, or past a replayed checkpoint's head); it joins the cache.
    /// Returns the cache bytes of entries that left the cache to keep it contiguous.
    pub(crate) fn push(&mut self, e: StoredEvent) -> u64 {
        let mut released = 0;
        debug_assert!(e.seq > self.head);
        if !self.has_retained() {
            self.first_seq = e.seq;
        }
        if self.cached.back().is_some_and(|b| b.seq + 1 != e.seq) {
            // Only a replay past a gap (entries cut by a checkpoint's head) gets here: the
            // cache holds contiguous seqs, so what was cached before the gap leaves it.
            released = self.cached.drain(..).map(|x| x.cache_bytes()).sum();
        }
        self.head = e.seq;
        if let Some(k) = &e.key {
            self.keys.insert(k.clone(), e.seq);
        }
        self.cached.push_back(e);
        released
    }

    /// Whether an entry is retained (on disk, in the cache, or both).
    pub(crate) fn has_retained(&self) -> bool {
        !self.marks.is_empty() || !self.cached.is_empty()
    }

    /// The entry at `seq`, if it is in the cache.
    pub(crate) fn cached(&self, seq: u64) -> Option<&StoredEvent> {
        let first = self.cached.front()?.seq;
        let i = seq.checked_sub(first)? as usize;
        self.cached.get(i)
    }

    /// The seq the cache starts at, or `head + 1` when it is empty.
    pub(crate) fn cached_from(&self) -> u64 {
        self.cached.front().map_or(self.head + 1, |e| e.seq)
    }

    /// The last mark at or before `seq`: where a disk read for `seq` starts.
    pub(crate) fn mark_before(&self, seq: u64) -> Option<Mark> {
        let i = self.marks.partition_point(|m| m.seq <= seq);
        i.checked_sub(1).map(|i| self.marks[i])
    }

    /// Adds a mark for the conversation's first entry in a write, if the index needs one
    /// there: the first entry of a segment, or `stride` entries past the last mark.
    pub(crate) fn maybe_mark(&mut self, m: Mark, stride: u64) {
        let due = match self.marks.back() {
            None => true,
            Some(last) => {
                debug_assert!(last.seq < m.seq, "marks in seq order");
                last.segment != m.segment || m.seq - last.seq >= stride
            }
        };
        if due {
            self.marks.push_back(m);
        }
    }

    /// The LSN of the oldest retained entry.
    pub(crate) fn first_lsn(&self) -> Option<u64> {
        match (self.marks.front(), self.cached.front()) {
            (Some(m), _) => Some(m.lsn),
            (None, Some(e)) => Some(e.lsn),
            (None, None) => None,
        }
    }

    /// Forgets the entries held at or below `lsn` (their segments are being retired): their
    /// marks and cached copies (their keys are in those segments' fingerprints, which go
    /// with the segments). Returns the cache bytes released. The oldest mark left
    /// is the conversation's first entry in the oldest segment kept, so it is the new first
    /// seq; with no mark left, only unwritten entries (all cached) are retained.
    pub(crate) fn evict_upto(&mut self, lsn: u64) -> u64 {
        while self.marks.front().is_some_and(|m| m.lsn <= lsn) {
            self.marks.pop_front();
        }
        let mut released = 0;
        while self.cached.front().is_some_and(|e| e.lsn <= lsn) {
            released += self.cached.pop_front().expect("front exists").cache_bytes();
        }
        self.first_seq = match (self.marks.front(), self.cached.front()) {
            (Some(m), _) => m.seq,
            (None, Some(e)) => e.seq,
            (None, None) => self.head + 1,
        };
        if !self.has_retained() {
            self.cached = VecDeque::new();
            self.marks = VecDeque::new();
            self.keys = HashMap::new();
        }
        released
    }

    /// Nothing to remember but the head, and nobody listening.
    pub(crate) fn is_idle(&self) -> bool {
        !self.has_retained() && self.subscribers.is_empty() && !self.in_building
    }

    pub(crate) fn unsubscribe(&mut self, session: SessionId) {
        self.subscribers.retain(|x| *x != session);
        if self.subscribers.is_empty() {
            self.subscribers = Vec::new();
        }
    }
}

pub(crate) fn delivered(conv: &Arc<str>, e: &StoredEvent) -> DeliveredEvent {
    DeliveredEvent {
        conv: conv.clone(),
        seq: e.seq,
        from: e.from.clone(),
        body: e.body.clone(),
        ts: e.ts,
    }
}
