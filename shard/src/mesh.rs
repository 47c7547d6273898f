//! A mesh's inbox state: peers, groups, the log of inbox messages still needed by some
//! recipient, cursors, and the byte backlog each peer and the mesh hold.
//!
//! Recipients are fixed when a message is sent (a peer added later starts its cursor at the
//! mesh's head), so each message counts its recipients that have not acknowledged it
//! (`pending`): a message whose last recipient acknowledges it leaves memory at once, and the
//! backlog a send is refused on (`inbox_full`) is exact and O(1) to keep per peer.

use fabric_proto::{Body, GroupId, PeerId, Target};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::SessionId;

#[derive(Debug, Clone)]
pub(crate) enum StoredTarget {
    /// The peer's index, and its id as the send named it (kept, so that a delivery's
    /// target is the id itself, neither looked up nor checked again per delivery).
    Peer(u32, PeerId),
    Group(GroupId),
    All,
}

#[derive(Debug, Clone)]
pub(crate) struct InboxMsg {
    pub(crate) from: u32,
    pub(crate) to: StoredTarget,
    /// In memory while the message is in the log cache; else read back from `at`.
    pub(crate) body: Option<Body>,
    pub(crate) body_len: u64,
    pub(crate) ts: u64,
    /// The LSN of the newest record holding this message (a copy-forward moves it).
    pub(crate) lsn: u64,
    /// Where that record is: (segment, offset); (0, 0) until its write is handed out.
    pub(crate) at: (u64, u64),
    /// Recipients whose cursor is still below this message.
    pub(crate) pending: u32,
    /// Its send's idempotency key, which a copy forward keeps.
    pub(crate) key: Option<Arc<str>>,
}

impl InboxMsg {
    /// What the message counts against backlogs: its body's bytes.
    pub(crate) fn bytes(&self) -> u64 {
        self.body_len
    }

    /// What its body counts against the log cache while in memory.
    pub(crate) fn cache_cost(&self) -> u64 {
        self.body_len + crate::conv::CACHED_ENTRY_OVERHEAD_BYTES
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) id: Arc<str>,
    pub(crate) groups: Vec<Arc<str>>,
    /// `None`: the peer has no token (it says hello with its key).
    pub(crate) token_hash: Option<[u8; 32]>,
    /// The ed25519 public key key hellos are verified with.
    pub(crate) public_key: Option<[u8; 32]>,
    pub(crate) acked: u64,
    /// Body bytes of messages addressed to this peer above its cursor.
    pub(crate) backlog_bytes: u64,
    /// Highest position delivered to this peer by this incarnation (for counting redeliveries;
    /// not persisted).
    pub(crate) delivered_upto: u64,
    /// `acked` moved since the last cursor record was framed.
    pub(crate) cursor_unlogged: bool,
    /// Seen only in data records so far (recovery before the checkpoint that names it).
    pub(crate) placeholder: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Mesh {
    pub(crate) id: Arc<str>,
    pub(crate) exists: bool,
    pub(crate) peers: Vec<Peer>,
    pub(crate) peer_index: HashMap<Arc<str>, u32>,
    pub(crate) token_index: HashMap<[u8; 32], u32>,
    /// Members of each group (defined peers only), in the order they were added.
    pub(crate) groups: HashMap<Arc<str>, Vec<u32>>,
    /// Messages some recipient has not acknowledged, by position.
    pub(crate) log: BTreeMap<u64, InboxMsg>,
    pub(crate) head: u64,
    pub(crate) durable_pos: u64,
    /// Body bytes of the messages in `log` (each counted once, however many recipients).
    pub(crate) backlog_bytes: u64,
    /// Sessions attached to this mesh's inboxes (in attach order).
    pub(crate) sessions: Vec<SessionId>,
    /// Listed in the building batch's `Dirty` (one entry per mesh per batch, not per send).
    pub(crate) in_building: bool,
    /// Log cache bytes of message bodies dropped with their messages since the shard last
    /// took this count (it keeps the cache's total).
    pub(crate) cache_released: u64,
}

impl Mesh {
    pub(crate) fn new(id: Arc<str>) -> Mesh {
        Mesh {
            id,
            ..Mesh::default()
        }
    }

    pub(crate) fn ensure_peer(&mut self, id: &Arc<str>) -> u32 {
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
            backlog_bytes: 0,
            delivered_upto: 0,
            cursor_unlogged: false,
            placeholder: true,
        });
        self.peer_index.insert(id.clone(), i);
        i
    }

    /// Defines a peer (once; later definitions of the same peer change nothing), its cursor
    /// at least `acked_floor`. A peer added now starts at the mesh's head: it receives only
    /// messages sent after it was added. (A checkpoint gives its own cursor instead.)
    pub(crate) fn define_peer(
        &mut self,
        id: &Arc<str>,
        groups: Vec<Arc<str>>,
        token_hash: Option<[u8; 32]>,
        public_key: Option<[u8; 32]>,
        acked_floor: u64,
    ) {
        let i = self.ensure_peer(id);
        let p = &mut self.peers[i as usize];
        if !p.placeholder {
            return;
        }
        p.placeholder = false;
        p.acked = p.acked.max(acked_floor);
        p.token_hash = token_hash;
        p.public_key = public_key;
        for g in &groups {
            self.groups.entry(g.clone()).or_default().push(i);
        }
        p.groups = groups;
        if let Some(h) = token_hash {
            self.token_index.insert(h, i);
        }
    }

    pub(crate) fn stored_target(&mut self, t: &Target) -> StoredTarget {
        match t {
            Target::Peer(p) => StoredTarget::Peer(self.ensure_peer(p.as_arc()), p.clone()),
            Target::Group(g) => StoredTarget::Group(g.clone()),
            Target::All => StoredTarget::All,
        }
    }

    pub(crate) fn wire_target(&self, t: &StoredTarget) -> Target {
        match t {
            StoredTarget::Peer(_, id) => Target::Peer(id.clone()),
            StoredTarget::Group(g) => Target::Group(g.clone()),
            StoredTarget::All => Target::All,
        }
    }

    pub(crate) fn is_recipient(&self, msg: &InboxMsg, peer: u32) -> bool {
        is_recipient(&self.peers, msg, peer)
    }

    /// The defined peers a message from `from` to `to` is for, by the protocol's rules.
    pub(crate) fn recipients(&self, from: u32, to: &StoredTarget) -> Vec<u32> {
        match to {
            StoredTarget::Peer(p, _) if !self.peers[*p as usize].placeholder => vec![*p],
            StoredTarget::Peer(..) => Vec::new(),
            StoredTarget::Group(g) => self.groups.get(g.as_str()).cloned().unwrap_or_default(),
            StoredTarget::All => (0..self.peers.len() as u32)
                .filter(|i| *i != from && !self.peers[*i as usize].placeholder)
                .collect(),
        }
    }

    /// Counts a new message against its recipients' and the mesh's backlogs. Returns false
    /// (and counts nothing) when nobody needs it.
    pub(crate) fn charge(&mut self, recipients: &[u32], bytes: u64) -> bool {
        for r in recipients {
            self.peers[*r as usize].backlog_bytes += bytes;
        }
        if recipients.is_empty() {
            return false;
        }
        self.backlog_bytes += bytes;
        true
    }

    /// Moves `peer`'s cursor to `upto` (never back): releases its backlog for the messages it
    /// passes, and drops from memory each message no recipient needs any more. Returns the
    /// positions dropped, with the LSN each was held at.
    pub(crate) fn advance_cursor(&mut self, peer: u32, upto: u64) -> Vec<(u64, u64)> {
        let from = self.peers[peer as usize].acked;
        if upto <= from {
            return Vec::new();
        }
        self.peers[peer as usize].acked = upto;
        let mut released = 0;
        let mut done = Vec::new();
        let peers = &self.peers;
        for (pos, msg) in self.log.range_mut(from + 1..=upto) {
            if !is_recipient(peers, msg, peer) {
                continue;
            }
            released += msg.bytes();
            msg.pending = msg.pending.saturating_sub(1);
            if msg.pending == 0 {
                done.push((*pos, msg.lsn));
            }
        }
        let p = &mut self.peers[peer as usize];
        p.backlog_bytes = p.backlog_bytes.saturating_sub(released);
        for (pos, _) in &done {
            if let Some(msg) = self.log.remove(pos) {
                self.backlog_bytes = self.backlog_bytes.saturating_sub(msg.bytes());
                self.release_cached(&msg);
            }
        }
        done
    }

    fn release_cached(&mut self, msg: &InboxMsg) {
        if msg.body.is_some() {
            self.cache_released += msg.cache_cost();
        }
    }

    /// Recomputes every count from the log and the cursors (after recovery, when peers that
    /// data records named only as placeholders have been defined by a checkpoint). Returns
    /// the positions no recipient needs, which the caller drops.
    pub(crate) fn recount(&mut self) -> Vec<(u64, u64)> {
        for p in &mut self.peers {
            p.backlog_bytes = 0;
        }
        self.backlog_bytes = 0;
        let mut done = Vec::new();
        let positions: Vec<u64> = self.log.keys().copied().collect();
        for pos in positions {
            let msg = &self.log[&pos];
            let waiting: Vec<u32> = self
                .recipients(msg.from, &msg.to)
                .into_iter()
                .filter(|r| self.peers[*r as usize].acked < pos)
                .collect();
            let bytes = msg.bytes();
            let lsn = msg.lsn;
            self.log.get_mut(&pos).expect("listed").pending = waiting.len() as u32;
            if !self.charge(&waiting, bytes) {
                done.push((pos, lsn));
            }
        }
        for (pos, _) in &done {
            if let Some(msg) = self.log.remove(pos) {
                self.release_cached(&msg);
            }
        }
        done
    }
}

/// Whether `peer` is one of `msg`'s recipients (the protocol's rules; placeholders never are).
fn is_recipient(peers: &[Peer], msg: &InboxMsg, peer: u32) -> bool {
    let p = &peers[peer as usize];
    if p.placeholder {
        return false;
    }
    match &msg.to {
        StoredTarget::Peer(to, _) => *to == peer,
        StoredTarget::Group(g) => p.groups.iter().any(|x| **x == **g),
        StoredTarget::All => msg.from != peer,
    }
}
