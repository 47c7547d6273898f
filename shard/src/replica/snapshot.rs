//! Snapshots. A shard's retained log is self-sufficient: recovery rebuilds the shard from it
//! alone (the checkpoint in it, and the copies forward of every unacknowledged inbox message,
//! hold everything the retired segments held that is still needed). So a snapshot for a
//! follower that needs entries the leader retired is the leader's retained log itself: the
//! leader offers "my log starts after `index`", the follower replaces its log with an empty one
//! starting at `index + 1` (a new segment listed alone by a new `MANIFEST`, written temp file,
//! fsync, rename, directory fsync, before the old segments are unlinked) and its state with an
//! empty shard, and takes the retained entries as ordinary appends, applying them as recovery
//! would.

use super::{Hooks, Mode, PeerMessage, Replica};
use crate::commit::Inflight;
use crate::members::MembersFile;
use crate::raft::{Membership, NodeId, SnapshotError};
use crate::{wal, SegmentInfo, Shard, WalWrite};

/// A leader's offer: its log starts right after `index` (of term `index_term`), with the
/// membership committed as of its commit index.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotOffer {
    pub index: u64,
    pub index_term: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
}

impl Replica {
    /// The leader offers its retained log to `to` (the Raft core asked for a snapshot).
    pub(super) fn offer_snapshot(&mut self, now: u64, to: NodeId) {
        let index = self.shard.log_start() - 1;
        let conf = self.raft.committed_membership();
        let offer = SnapshotOffer {
            index,
            index_term: self.raft.term_at(index).unwrap_or(0),
            voters: conf.voters.iter().copied().collect(),
            learners: conf.learners.iter().copied().collect(),
        };
        self.stats.snapshots_sent += 1;
        self.offers.insert(to, now);
        self.outbox.push(PeerMessage::Snapshot {
            from: self.raft.id(),
            to,
            term: self.raft.term(),
            offer,
        });
    }

    /// A follower takes an offer from its term's leader: installed at the next write unless
    /// it holds everything up to the offer already.
    pub(super) fn handle_offer(&mut self, from: NodeId, term: u64, offer: SnapshotOffer) {
        if term < self.raft.term() || self.raft.role() == crate::raft::Role::Leader {
            return;
        }
        if offer.index <= self.applied || offer.voters.is_empty() {
            let index = self.raft.commit();
            self.answer_offer(from, index, true);
            return;
        }
        self.installing = Some((from, offer));
    }

    pub(super) fn answer_offer(&mut self, to: NodeId, index: u64, installed: bool) {
        self.outbox.push(PeerMessage::SnapshotDone {
            from: self.raft.id(),
            to,
            term: self.raft.term(),
            index,
            installed,
        });
    }

    /// Offers unanswered for too long failed (the offer or its answer was lost).
    pub(super) fn expire_offers(&mut self, now: u64) {
        let timeout = self.offer_timeout_ms;
        let expired: Vec<NodeId> = self
            .offers
            .iter()
            .filter(|(_, at)| now.saturating_sub(**at) >= timeout)
            .map(|(to, _)| *to)
            .collect();
        for to in expired {
            self.offers.remove(&to);
            self.raft
                .handle_snapshot_sent(to, Err(SnapshotError::Failed));
        }
    }

    /// The leader hears how an offer went.
    pub(super) fn handle_offer_done(&mut self, from: NodeId, index: u64, installed: bool) {
        self.offers.remove(&from);
        let result = if installed {
            Ok(index)
        } else {
            Err(SnapshotError::Failed)
        };
        self.raft.handle_snapshot_sent(from, result);
    }

    /// The write that installs the pending offer, if one waits (no write is in flight).
    pub(super) fn install_write(&mut self) -> Option<WalWrite> {
        let (from, offer) = self.installing.take()?;
        if offer.index <= self.raft.commit() {
            // Caught up meanwhile: nothing to install.
            let index = self.raft.commit();
            self.answer_offer(from, index, true);
            return None;
        }
        let w = self
            .shard
            .reset_for_snapshot(offer.index + 1, offer.index_term);
        self.unframed.clear();
        self.unapplied.clear();
        self.rewind_from = None;
        self.rewind_floor = None;
        // Answers about entries this log no longer holds must not leave.
        self.waiting.retain(|w| {
            w.messages
                .iter()
                .all(|m| !matches!(m.body, crate::raft::MessageBody::AppendResponse { .. }))
        });
        let mut w = w;
        w.members = Some(self.members.reset(MembersFile {
            shard: self.shard.config.shard,
            index: offer.index,
            membership: Membership {
                voters: offer.voters.iter().copied().collect(),
                learners: offer.learners.iter().copied().collect(),
            },
        }));
        self.inflight = Some((w.last_lsn, 0, 0));
        self.installed = Some((from, offer));
        Some(w)
    }

    /// The install write is durable: the core's log restarts at the offer.
    pub(super) fn finish_install(&mut self, now: u64) {
        let Some((from, offer)) = self.installed.take() else {
            return;
        };
        let conf = Membership {
            voters: offer.voters.iter().copied().collect(),
            learners: offer.learners.iter().copied().collect(),
        };
        let ok = self
            .raft
            .handle_snapshot_installed(now, offer.index, offer.index_term, conf);
        if !ok {
            // The core moved on while the log was replaced (it cannot: appends wait while an
            // install is under way); the disk holds the new log, so start again from it.
            self.mode = Mode::Deposed;
            return;
        }
        self.applied = offer.index;
        self.commit = self.commit.max(offer.index);
        self.stats.snapshots_installed += 1;
        self.mode = Mode::Follower;
        self.answer_offer(from, offer.index, true);
    }
}

impl Shard {
    /// Replaces this (follower) shard with an empty one whose log starts at `first_lsn`, and
    /// returns the write that makes it so on disk: a new segment, a manifest listing only it,
    /// then the old segments unlinked.
    pub(crate) fn reset_for_snapshot(&mut self, first_lsn: u64, base_term: u64) -> WalWrite {
        let old: Vec<u64> = self.segments.iter().map(|s| s.id).collect();
        let id = self
            .manifest
            .newest
            .max(self.segments.back().map_or(0, |s| s.id))
            + 1;
        let header = wal::SEGMENT_HEADER_BYTES as u64;
        let mut fresh = Shard::replaying(self.config.clone());
        fresh.replica = Some(Hooks::default());
        fresh.next_lsn = first_lsn;
        fresh.durable_lsn = first_lsn - 1;
        fresh.building_first_lsn = first_lsn;
        fresh.term = self.term;
        fresh.segments.push_back(SegmentInfo {
            id,
            first_lsn,
            last_lsn: first_lsn - 1,
            bytes: header,
        });
        fresh.wal_bytes = header;
        fresh.manifest = wal::Manifest {
            oldest: id,
            newest: id,
            commit: first_lsn - 1,
            base_term,
            ..self.manifest
        };
        fresh.durable_end = (id, header);
        fresh.inflight = Some(Inflight {
            last_lsn: first_lsn - 1,
            dirty: Default::default(),
            end: (id, header),
        });
        *self = fresh;
        WalWrite {
            shard: self.config.shard,
            segment: id,
            create: true,
            offset: header,
            bytes: Vec::new(),
            first_lsn,
            last_lsn: first_lsn - 1,
            records: 0,
            manifest: Some(self.manifest),
            delete: old,
            remove_repair: false,
            members: None,
        }
    }
}
