//! Retention by size: once the WAL is over `retention_bytes_max`, the oldest segment's
//! still-needed inbox messages are copied forward, a checkpoint of all metadata is written,
//! and the segment is deleted when the checkpoint is durable (one segment per round).
//!
//! Each round touches only what the oldest segment holds: inbox messages in memory are
//! indexed by the LSN that holds them, conversations by the LSN of their oldest retained
//! entry; nothing walks every mesh's log.

use crate::conv::ConvKey;
use crate::record::{
    CheckpointPartRec, ConvCheckpoint, MeshCheckpoint, PeerCheckpoint, Record, RetiredRec, SentRec,
};
use crate::{wal, Shard};
use std::sync::Arc;

/// A checkpoint is written in parts of about this size (each part one record).
pub const CHECKPOINT_PART_BYTES_MAX: usize = 1024 * 1024;
/// Bytes a checkpoint entry costs beyond its ids (lengths, numbers, hashes): an upper bound
/// for sizing parts, not an exact size.
const CHECKPOINT_ENTRY_OVERHEAD_BYTES: usize = 96;

#[derive(Debug)]
pub(crate) enum Retention {
    Idle,
    /// A checkpoint ending at `checkpoint_lsn` makes every segment up to `upto_segment`
    /// unnecessary once durable.
    AwaitingCheckpoint {
        checkpoint_lsn: u64,
        upto_segment: u64,
    },
}

impl Shard {
    /// After a write is durable: retire the segments a now-durable checkpoint covers, then
    /// maybe start the next round.
    pub(crate) fn retention_step(&mut self, last_lsn: u64) {
        if let Retention::AwaitingCheckpoint {
            checkpoint_lsn,
            upto_segment,
        } = self.retention
        {
            if last_lsn >= checkpoint_lsn {
                while self.segments.front().is_some_and(|s| s.id <= upto_segment) {
                    self.retire_oldest(checkpoint_lsn);
                }
                self.retention = Retention::Idle;
                if self.replica.is_some() {
                    // Followers retire their own segments when they apply this.
                    let below = self.segments.front().map_or(self.next_lsn, |s| s.first_lsn);
                    let logged = self.propose(Record::Retired(RetiredRec { below }));
                    debug_assert!(logged.is_ok(), "a retired record is a few bytes");
                }
            }
        }
        self.maybe_start_retention();
    }

    fn retire_oldest(&mut self, checkpoint_lsn: u64) {
        let seg = self.segments.front().expect("retained segment exists");
        assert!(
            seg.first_lsn <= seg.last_lsn + 1 && seg.last_lsn < checkpoint_lsn,
            "the checkpoint is newer than the segment it retires"
        );
        self.retire_front_segment();
    }

    /// A replica in replay (a follower) retires its segments whose records are all below
    /// what its leader retired, or were all replaced by a rewind (never the newest).
    pub(crate) fn retire_below(&mut self) {
        while self.segments.len() > 1
            && self
                .segments
                .front()
                .is_some_and(|s| s.last_lsn < self.retire_below || s.last_lsn < s.first_lsn)
        {
            self.retire_front_segment();
        }
    }

    fn retire_front_segment(&mut self) {
        let seg = self.segments.pop_front().expect("retained segment exists");
        let next = self
            .segments
            .front()
            .expect("a round never retires the newest segment");
        self.wal_bytes -= seg.bytes;
        // Rewinds whose frame was in a retired segment replaced only records there or before.
        self.rewinds.retain(|(_, (segment, _))| *segment > seg.id);
        self.deletes.push(seg.id);
        self.manifest.oldest = next.id;
        self.manifest_dirty = true;
        self.stats.segments_deleted += 1;
        self.retire_keys_upto(seg.id);
    }

    /// The oldest segments a round retires: as many as bring the WAL within the limit, never
    /// the newest. Returns the last one's id and last LSN, and the bytes they hold.
    fn round_span(&self) -> (u64, u64, u64) {
        let over = self.wal_bytes - self.config.retention_bytes_max;
        let mut freed = 0;
        let mut span = (0, 0);
        for s in self.segments.iter().take(self.segments.len() - 1) {
            freed += s.bytes;
            span = (s.id, s.last_lsn);
            if freed >= over {
                break;
            }
        }
        (span.0, span.1, freed)
    }

    pub(crate) fn maybe_start_retention(&mut self) {
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
        let (upto_segment, upto_lsn, freed) = self.round_span();
        // Still-needed inbox messages held in those segments. Not a prefix in position order:
        // a message copied by an earlier round has a newer LSN than later positions.
        let held: Vec<(u64, Arc<str>, u64)> = self
            .inbox_by_lsn
            .range(..=upto_lsn)
            .map(|(lsn, (mesh, pos))| (*lsn, mesh.clone(), *pos))
            .collect();
        let copy_bytes: u64 = held
            .iter()
            .filter_map(|(_, mesh, pos)| self.meshes.get(mesh)?.log.get(pos))
            .map(|m| m.body_len + (wal::RECORD_HEADER_BYTES + 64) as u64)
            .sum();
        // Segments that are mostly unacknowledged inbox data mean a backlog as large as the
        // segments: rewriting it every commit would gain nothing, so wait for another
        // segment's worth of writes (the inbox limits bound that backlog).
        let full = freed * 2 >= self.config.wal_segment_bytes_max;
        if full && copy_bytes * 2 > freed {
            self.retention_blocked_bytes = self.wal_bytes + self.config.wal_segment_bytes_max;
            self.stats.retention_blocked += 1;
            return;
        }
        // A round that would free less than it writes (a checkpoint larger than what it
        // retires) waits until as much other data has been written since the last round.
        let since = self.stats.bytes_written - self.last_round_end_written;
        if freed <= copy_bytes + self.last_round_bytes && since < self.last_round_bytes {
            return;
        }
        if self.fill_for_retention(&held) {
            // Bodies of held messages are being read back first; the round starts after.
            return;
        }
        self.retention_blocked_bytes = 0;
        let before = self.stats.bytes_written;
        self.evict_conversations(upto_lsn);
        for (old_lsn, mesh, pos) in held {
            self.copy_forward(old_lsn, mesh, pos);
        }
        let checkpoint_lsn = self.log_checkpoint();
        self.last_round_end_written = self.stats.bytes_written;
        self.last_round_bytes = self.stats.bytes_written - before;
        self.retention = Retention::AwaitingCheckpoint {
            checkpoint_lsn,
            upto_segment,
        };
    }

    /// Conversation entries in the oldest segments leave the conversations' indexes and the
    /// log cache now: no new read starts there (a read already under way that finds its
    /// segment deleted starts again from what is retained).
    fn evict_conversations(&mut self, upto_lsn: u64) {
        while let Some((lsn, ck)) = self.convs_by_lsn.first().cloned() {
            if lsn > upto_lsn {
                break;
            }
            self.convs_by_lsn.pop_first();
            if let Some(c) = self.convs.get_mut(&ck) {
                self.cache_bytes -= c.evict_upto(upto_lsn);
                if let Some(first) = c.first_lsn() {
                    self.convs_by_lsn.insert((first, ck));
                }
            }
        }
    }

    fn copy_forward(&mut self, old_lsn: u64, mesh: Arc<str>, pos: u64) {
        let Some(m) = self.meshes.get(&mesh) else {
            return;
        };
        let Some(msg) = m.log.get(&pos) else {
            return;
        };
        let rec = SentRec {
            mesh: mesh.clone(),
            pos,
            from: m.peers[msg.from as usize].id.clone(),
            to: m.wire_target(&msg.to),
            body: msg
                .body
                .clone()
                .expect("a round starts once every held body is in memory"),
            ts: msg.ts,
            key: msg.key.clone(),
        };
        // Applying the copy moves the message's LSN (and retention's index) to it.
        let lsn = self
            .propose(Record::Sent(rec))
            .expect("a copy is the size of the original, which was framed before");
        debug_assert_eq!(self.inbox_by_lsn.get(&lsn), Some(&(mesh, pos)));
        debug_assert!(!self.inbox_by_lsn.contains_key(&old_lsn));
        self.stats.records_copied_forward += 1;
    }

    /// Frames a checkpoint (in parts) and returns the LSN of its last part.
    fn log_checkpoint(&mut self) -> u64 {
        let mut parts = self.checkpoint_parts();
        let n = parts.len() as u32;
        let mut last = self.next_lsn;
        for (i, mut part) in parts.drain(..).enumerate() {
            part.part = i as u32;
            part.parts = n;
            last = self
                .propose(Record::CheckpointPart(part))
                .expect("checkpoint parts are sized far below the record limit");
        }
        last
    }

    #[cfg(test)]
    pub(crate) fn checkpoint_parts_for_test(&self) -> Vec<CheckpointPartRec> {
        self.checkpoint_parts()
    }

    /// The checkpoint, split into parts of about [`CHECKPOINT_PART_BYTES_MAX`]. Sorted, so
    /// that the same state always writes the same bytes (determinism). Always at least one
    /// part (an empty shard's checkpoint says so).
    // Over 70 lines: one pass over meshes, peers and conversations that keeps the parts
    // deterministic.
    fn checkpoint_parts(&self) -> Vec<CheckpointPartRec> {
        let mut parts = vec![CheckpointPartRec::default()];
        let mut size = 0usize;
        let next_part = |parts: &mut Vec<CheckpointPartRec>, size: &mut usize, add: usize| {
            if *size + add > CHECKPOINT_PART_BYTES_MAX && *size > 0 {
                parts.push(CheckpointPartRec::default());
                *size = 0;
            }
            *size += add;
        };
        let mut mesh_ids: Vec<&Arc<str>> = self
            .meshes
            .iter()
            .filter(|(_, m)| m.exists)
            .map(|(id, _)| id)
            .collect();
        mesh_ids.sort();
        for id in mesh_ids {
            let m = &self.meshes[id];
            let entry = || MeshCheckpoint {
                mesh: m.id.clone(),
                head: m.head,
                peers: Vec::new(),
            };
            next_part(
                &mut parts,
                &mut size,
                id.len() + CHECKPOINT_ENTRY_OVERHEAD_BYTES,
            );
            parts.last_mut().expect("one part").meshes.push(entry());
            for p in m.peers.iter().filter(|p| !p.placeholder) {
                let add = p.id.len()
                    + p.groups.iter().map(|g| g.len() + 2).sum::<usize>()
                    + CHECKPOINT_ENTRY_OVERHEAD_BYTES;
                next_part(&mut parts, &mut size, add);
                let part = parts.last_mut().expect("one part");
                // A mesh whose peers spill into a new part is named again there.
                if part.meshes.last().is_none_or(|mc| mc.mesh != m.id) {
                    part.meshes.push(entry());
                }
                let mc = part.meshes.last_mut().expect("the mesh's entry");
                mc.peers.push(PeerCheckpoint {
                    peer: p.id.clone(),
                    groups: p.groups.clone(),
                    token_hash: p.token_hash,
                    public_key: p.public_key,
                    acked: p.acked,
                });
            }
        }
        let mut convs: Vec<(&ConvKey, u64)> = self
            .convs
            .iter()
            .filter(|(_, c)| c.head > 0)
            .map(|(k, c)| (k, c.head))
            .collect();
        convs.sort();
        for ((mesh, conv), head) in convs {
            next_part(
                &mut parts,
                &mut size,
                mesh.len() + conv.len() + CHECKPOINT_ENTRY_OVERHEAD_BYTES,
            );
            parts
                .last_mut()
                .expect("one part")
                .convs
                .push(ConvCheckpoint {
                    mesh: mesh.clone(),
                    conv: conv.clone(),
                    head,
                });
        }
        parts
    }
}
