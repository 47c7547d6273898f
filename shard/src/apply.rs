//! The one apply path (raft-rs's committed-entries model): every record changes shard state
//! here and nowhere else, whether a handler just proposed it (live), recovery read it back
//! (replay), or, with replication, a follower received it. Handlers in `ops` validate and
//! `propose`; only `apply` mutates what a record describes.
//!
//! Live and replay differ in one deliberate way each, written where it happens:
//! - Visibility: a live record joins the building write and becomes visible when that write
//!   is durable (`commit`); a replayed record is durable already.
//! - Derived counts and indexes (who still waits for a message, backlog bytes, retention's
//!   LSN indexes): live, they move with each record; in replay they are rebuilt once in
//!   `Recoverer::finish`, because a checkpoint later in the log may define peers that an
//!   earlier retained message was sent to (their definitions were in deleted segments).

use crate::commit::DirtyConv;
use crate::conv::{Mark, StoredEvent};
use crate::keys::{KeyScope, SentAt};
use crate::mesh::{InboxMsg, Mesh};
use crate::read::Cached;
use crate::record::*;
use crate::Shard;
use fabric_proto::ProtoError;
use std::collections::HashMap;
use std::sync::Arc;

impl Shard {
    /// Frames `record` into the building write and applies it; returns its LSN. Nothing is
    /// applied if it cannot be framed (too large): validation happened before, so a refusal
    /// leaves no state behind.
    pub(crate) fn propose(&mut self, record: Record) -> Result<u64, ProtoError> {
        debug_assert!(!self.replaying, "a recovering shard proposes nothing");
        let lsn = self.log(&record)?;
        self.apply(lsn, record);
        Ok(lsn)
    }

    /// Applies one record at `lsn`. Records come in LSN order, each once; a replay may see a
    /// message twice (copied forward by retention), the newest copy last.
    pub(crate) fn apply(&mut self, lsn: u64, record: Record) {
        match record {
            Record::MeshCreated(r) => {
                mesh_entry(&mut self.meshes, &r.mesh).exists = true;
            }
            // A peer starts at the head it was added at (in replay the replayed head; a
            // checkpoint later in the log gives its exact cursor if older messages moved).
            Record::PeerAdded(r) => {
                let m = mesh_entry(&mut self.meshes, &r.mesh);
                let head = m.head;
                m.define_peer(&r.peer, r.groups, Some(r.token_hash), None, head);
            }
            Record::PeerKeyAdded(r) => {
                let m = mesh_entry(&mut self.meshes, &r.mesh);
                let head = m.head;
                m.define_peer(&r.peer, r.groups, r.token_hash, Some(r.public_key), head);
            }
            Record::Sent(r) => self.apply_sent(lsn, r),
            Record::Appended(r) => self.apply_appended(lsn, r),
            Record::Acked(r) => self.apply_acked(r),
            Record::CheckpointPart(ck) => self.apply_checkpoint(ck),
            // Raft's own entries: the replica (`crate::replica`) reads membership from the
            // log; the shard's state does not change.
            Record::Noop | Record::ConfChange(_) => {}
            // A leader retired the segments below it already; a follower (or a replica's
            // recovery) retires its own once it can (`Shard::retire_below`).
            Record::Retired(r) => self.retire_below = self.retire_below.max(r.below),
        }
    }

    fn apply_sent(&mut self, lsn: u64, r: SentRec) {
        let replaying = self.replaying;
        let (segment, _, offset) = self.replay_at;
        self.note_send_key(lsn, &r);
        let m = mesh_entry(&mut self.meshes, &r.mesh);
        if m.log.contains_key(&r.pos) {
            return self.apply_copy(lsn, r);
        }
        assert!(
            replaying || r.pos == m.head + 1,
            "live positions are dense: pos {} after head {}",
            r.pos,
            m.head
        );
        let from = m.ensure_peer(&r.from);
        let to = m.stored_target(&r.to);
        let mut msg = InboxMsg {
            from,
            to,
            body_len: r.body.len() as u64,
            body: Some(r.body),
            ts: r.ts,
            lsn,
            at: (0, 0),
            pending: 0,
            key: r.key,
        };
        m.head = m.head.max(r.pos);
        if replaying {
            msg.at = (segment, offset);
            let cost = msg.cache_cost();
            m.log.insert(r.pos, msg);
            m.durable_pos = m.head;
            self.cache_body(lsn, r.mesh, r.pos, cost);
            self.trim_cache();
            return;
        }
        let recipients = m.recipients(from, &msg.to);
        msg.pending = recipients.len() as u32;
        let cost = msg.cache_cost();
        // Nobody needs a message with no recipient: it takes its position and is gone.
        let held = m.charge(&recipients, msg.body_len);
        if held {
            m.log.insert(r.pos, msg);
        }
        if !m.in_building {
            m.in_building = true;
            self.building_dirty.meshes.push((r.mesh.clone(), 0));
        }
        if held {
            self.inbox_by_lsn.insert(lsn, (r.mesh.clone(), r.pos));
            let rel = self.framed_at as u64;
            self.building_dirty
                .sent
                .push((r.mesh.clone(), r.pos, lsn, rel));
            self.cache_body(lsn, r.mesh, r.pos, cost);
        }
    }

    /// A send's key (an original's, or a copy's: a copy carries it, so the key stays known
    /// while the copy is retained) joins the exact keys and its segment's keys, marked with
    /// the record's LSN (a copy's position is the original's).
    fn note_send_key(&mut self, lsn: u64, r: &SentRec) {
        let Some(k) = r.key.clone() else {
            return;
        };
        let exact = (r.mesh.clone(), r.from.clone(), k.clone());
        self.note_sent_key(exact, SentAt { pos: r.pos, lsn });
        let key = (KeyScope::Sender(r.mesh.clone(), r.from.clone()), k, lsn);
        if self.replaying {
            self.note_keys(self.replay_at.0, vec![key]);
        } else {
            self.building_dirty.keys.push(key);
        }
    }

    /// A copy forward of a held message: the newest copy's LSN (and place) is the one
    /// retention and reads must see; a cached body stays cached under it.
    fn apply_copy(&mut self, lsn: u64, r: SentRec) {
        let (segment, _, offset) = self.replay_at;
        let m = self.meshes.get_mut(&r.mesh).expect("the copy's mesh");
        let held = m.log.get_mut(&r.pos).expect("the copied message");
        let old = std::mem::replace(&mut held.lsn, lsn);
        assert!(old < lsn, "a copy is newer than what it copies");
        let cached = held.body.is_some();
        if self.replaying {
            held.at = (segment, offset);
        } else {
            self.inbox_by_lsn.remove(&old);
            self.inbox_by_lsn.insert(lsn, (r.mesh.clone(), r.pos));
            let rel = self.framed_at as u64;
            let frame = &mut self.building_dirty.sent;
            frame.push((r.mesh.clone(), r.pos, lsn, rel));
        }
        if cached {
            self.cache_fifo
                .push_back((lsn, Cached::Inbox(r.mesh, r.pos)));
        }
    }

    fn apply_appended(&mut self, lsn: u64, r: AppendedRec) {
        let replaying = self.replaying;
        let ck = (r.mesh, r.conv);
        let c = self.convs.entry(ck.clone()).or_default();
        if r.seq <= c.head {
            // Only a replay sees an entry at or below the head (a checkpoint's head came
            // first); live seqs are assigned as head + 1.
            assert!(replaying, "live seq {} at or below head {}", r.seq, c.head);
            return;
        }
        assert!(replaying || r.seq == c.head + 1, "live seqs are dense");
        let (first, was_empty) = (c.head == 0, !c.has_retained());
        let seq = r.seq;
        let e = StoredEvent {
            seq,
            from: r.from,
            body: r.body,
            ts: r.ts,
            lsn,
            key: r.key,
        };
        let key = (e.key.clone()).map(|k| (KeyScope::Conv(ck.clone()), k, seq));
        self.cache_bytes += e.cache_bytes();
        self.cache_bytes -= c.push(e);
        self.cache_fifo.push_back((lsn, Cached::Entry(ck.clone())));
        if replaying {
            c.durable_seq = c.head;
            let (segment, frame, offset) = self.replay_at;
            let keys = key.into_iter().collect();
            if c.replay_frame != (segment, frame) {
                // The conversation's first entry in this frame: where the live path marks.
                c.replay_frame = (segment, frame);
                let mark = Mark {
                    seq,
                    lsn,
                    segment,
                    offset,
                };
                c.maybe_mark(mark, self.config.log_index_stride_records);
            }
            self.note_keys(segment, keys);
            self.trim_cache();
            return;
        }
        self.building_dirty.keys.extend(key);
        let new_in_building = !c.in_building;
        c.in_building = true;
        if first {
            *self.mesh_convs.entry(ck.0.clone()).or_default() += 1;
        }
        if was_empty {
            self.convs_by_lsn.insert((lsn, ck.clone()));
        }
        if new_in_building {
            // Where the conversation's first entry in this write is, relative to the frame;
            // the write's segment and offset are known when it is handed out.
            let first = Mark {
                seq,
                lsn,
                segment: 0,
                offset: self.framed_at as u64,
            };
            self.building_dirty.convs.push(DirtyConv {
                key: ck,
                head: 0,
                first,
            });
        }
    }

    /// Live, a cursor moves when the ack arrives and its record (one per peer per group
    /// commit, with the latest cursor) only makes the move durable, so the state is already
    /// there; a replay (and a follower) moves the cursor here.
    fn apply_acked(&mut self, r: AckedRec) {
        let replaying = self.replaying;
        let Some(m) = self.meshes.get_mut(&r.mesh) else {
            assert!(
                replaying,
                "a live cursor record names a mesh the shard holds"
            );
            return;
        };
        let i = m.ensure_peer(&r.peer) as usize;
        if replaying {
            m.peers[i].acked = m.peers[i].acked.max(r.upto);
        } else {
            assert!(m.peers[i].acked >= r.upto, "the live cursor moved first");
        }
    }

    /// Idempotent (heads and cursors take the maximum, peers are defined once): a checkpoint
    /// cut short by a crash is harmless, and live it restates what the shard holds.
    fn apply_checkpoint(&mut self, ck: CheckpointPartRec) {
        for mc in ck.meshes {
            let replaying = self.replaying;
            let m = mesh_entry(&mut self.meshes, &mc.mesh);
            m.exists = true;
            assert!(
                replaying || mc.head <= m.head,
                "a live checkpoint restates the head"
            );
            m.head = m.head.max(mc.head);
            if replaying {
                m.durable_pos = m.head;
            }
            for pc in mc.peers {
                m.define_peer(&pc.peer, pc.groups, pc.token_hash, pc.public_key, 0);
                let i = m.peer_index[&pc.peer] as usize;
                m.peers[i].acked = m.peers[i].acked.max(pc.acked);
            }
        }
        for cc in ck.convs {
            let c = self.convs.entry((cc.mesh, cc.conv)).or_default();
            if cc.head > c.head {
                c.head = cc.head;
                c.durable_seq = cc.head;
                if !c.has_retained() {
                    c.first_seq = cc.head + 1;
                }
            }
        }
    }
}

/// The mesh a record names, made if the log has not named it before (a replay may meet a
/// mesh's messages before the checkpoint that defines it).
fn mesh_entry<'a>(meshes: &'a mut HashMap<Arc<str>, Mesh>, mesh: &Arc<str>) -> &'a mut Mesh {
    meshes
        .entry(mesh.clone())
        .or_insert_with(|| Mesh::new(mesh.clone()))
}
