//! A conversation's state: its retained entries, head, idempotency keys and subscribers.
//!
//! A conversation with no retained entry and no subscriber keeps only its head (its collections
//! are released), and one that never had an entry is not kept at all: memory follows what is
//! retained and who listens, not how many conversation names were ever used.

use fabric_proto::{Body, DeliveredEvent};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::SessionId;

#[derive(Debug, Clone)]
pub(crate) struct StoredEvent {
    pub(crate) seq: u64,
    pub(crate) from: Arc<str>,
    pub(crate) body: Body,
    pub(crate) ts: u64,
    pub(crate) lsn: u64,
    pub(crate) key: Option<Arc<str>>,
}

pub(crate) type ConvKey = (Arc<str>, Arc<str>);

#[derive(Debug)]
pub(crate) struct Conv {
    pub(crate) events: VecDeque<StoredEvent>,
    /// Seq of `events[0]`, or `head + 1` when empty.
    pub(crate) first_seq: u64,
    pub(crate) head: u64,
    pub(crate) durable_seq: u64,
    /// Idempotency keys of retained entries -> their seq.
    pub(crate) keys: HashMap<Arc<str>, u64>,
    pub(crate) subscribers: Vec<SessionId>,
    /// Listed in the building batch's `Dirty` (one entry per conversation per batch).
    pub(crate) in_building: bool,
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
    pub(crate) fn push(&mut self, e: StoredEvent) {
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

    pub(crate) fn get(&self, seq: u64) -> Option<&StoredEvent> {
        let i = seq.checked_sub(self.first_seq)? as usize;
        self.events.get(i)
    }

    /// The LSN of the oldest retained entry.
    pub(crate) fn first_lsn(&self) -> Option<u64> {
        self.events.front().map(|e| e.lsn)
    }

    /// Drops the entries held at or below `lsn` from memory (they stay on disk until their
    /// segment is deleted). A key leaves only with the entry it points to: a retry stored
    /// after a failed write and a restart may have moved it to a newer, retained entry.
    pub(crate) fn evict_upto(&mut self, lsn: u64) {
        while self.events.front().is_some_and(|e| e.lsn <= lsn) {
            let e = self.events.pop_front().expect("front exists");
            if let Some(k) = e.key {
                if self.keys.get(&k) == Some(&e.seq) {
                    self.keys.remove(&k);
                }
            }
            self.first_seq = e.seq + 1;
        }
        if self.events.is_empty() {
            self.events = VecDeque::new();
            self.keys = HashMap::new();
        }
    }

    /// Nothing to remember but the head, and nobody listening.
    pub(crate) fn is_idle(&self) -> bool {
        self.events.is_empty() && self.subscribers.is_empty() && !self.in_building
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
