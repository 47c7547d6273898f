//! The replica's side of the Ready loop: what each part of a Raft `Ready` becomes (messages
//! out, the hard state into `MANIFEST`, entries into write frames, commits into applied
//! records and released acks), and the writes themselves.

use super::{entries, LogReadJob, Mode, PeerMessage, Replica, Unapplied, Waiting};
use crate::raft::{Entry, HardState, MessageBody, Ready, Role, RoleChange};
use crate::WalWrite;

impl Replica {
    /// Takes every Ready the core has, then releases what durability now allows and applies
    /// what is committed.
    pub(super) fn process_ready(&mut self, now: u64) {
        loop {
            // A leader's shard may have framed records (retention, cursors) since: they become
            // entries before anything else can take their indexes.
            self.feed_proposals(now);
            while let Some(ready) = self.raft.poll_ready() {
                self.take_ready(now, ready);
            }
            // Our own vote comes back through the core once it is durable.
            if self.release_waiting(now) {
                continue;
            }
            self.apply_committed(now);
            self.release_held();
            if !self.proposals_pending() {
                break;
            }
        }
    }

    fn proposals_pending(&self) -> bool {
        self.mode == Mode::Leading
            && self
                .shard
                .replica
                .as_ref()
                .is_some_and(|h| !h.proposals.is_empty())
    }

    fn take_ready(&mut self, now: u64, ready: Ready) {
        if let Some(role) = ready.role {
            self.role_changed(role);
        }
        self.outbox
            .extend(ready.messages.into_iter().map(PeerMessage::Raft));
        if let Some(hs) = ready.hard_state {
            self.set_hard_state(hs);
        }
        self.take_entries(ready.truncate_from, ready.entries);
        if !ready.persisted_messages.is_empty() {
            self.waiting.push_back(Waiting {
                lsn: self.raft.last_index(),
                hard_state: self.hard_state.0,
                messages: ready.persisted_messages,
            });
        }
        if let Some(c) = ready.commit {
            self.commit = self.commit.max(c);
        }
        for r in ready.log_reads {
            self.log_reads.push(LogReadJob {
                shard: self.shard.config.shard,
                id: r.id,
                lo: r.lo,
                hi: r.hi,
                bytes_max: r.bytes_max,
                segments: self
                    .shard
                    .segments
                    .iter()
                    .map(|s| (s.id, s.first_lsn))
                    .collect(),
                rewinds: self.shard.rewinds.clone(),
            });
        }
        for to in ready.snapshots_to_send {
            self.offer_snapshot(now, to);
        }
        self.take_read_states(ready.read_states, &ready.dropped_reads);
    }

    /// Term and vote go into `MANIFEST` (written before the next frame, in the same write);
    /// the commit index is not hard state that needs a write (the manifest's commit hint
    /// follows `applied` whenever the manifest is written anyway).
    fn set_hard_state(&mut self, hs: HardState) {
        let m = &mut self.shard.manifest;
        let vote = hs.vote.unwrap_or(0);
        if m.term != hs.term || m.vote != vote {
            m.term = hs.term;
            m.vote = vote;
            self.shard.manifest_dirty = true;
            self.hard_state.0 += 1;
        }
    }

    fn role_changed(&mut self, role: RoleChange) {
        if role.leader.is_some() && role.leader != self.last_leader {
            self.stats.leader_changes += 1;
            self.last_leader = role.leader;
        }
        match (self.mode, role.role) {
            (Mode::Follower, Role::Leader) => {
                self.mode = Mode::CatchingUp {
                    noop: self.raft.last_index(),
                };
            }
            (Mode::CatchingUp { .. }, r) if r != Role::Leader => self.mode = Mode::Follower,
            (Mode::Leading, r) if r != Role::Leader => self.depose("leadership was lost"),
            _ => {}
        }
    }

    /// A leader that lost its leadership (or could not propose what it applied): everything
    /// waiting for an `ok` is answered `unavailable` (it may still commit: a client retries
    /// with its idempotency key), and the host recovers the replica from disk.
    pub(super) fn depose(&mut self, reason: &str) {
        self.mode = Mode::Deposed;
        self.shard
            .fail_pending(&format!("{reason}; retry (with the same idempotency key)"));
        self.fail_held(&format!("{reason}; retry"));
    }

    /// Entries to write: a leader's own are framed already (it proposes what it framed); a
    /// follower's (and a new leader's no-op) wait for the next write, replacing what a
    /// truncation says conflicts.
    fn take_entries(&mut self, truncate_from: Option<u64>, entries: Vec<Entry>) {
        if self.mode == Mode::Leading {
            debug_assert!(truncate_from.is_none(), "a leader never cuts its own log");
            debug_assert!(entries.iter().all(|e| e.index < self.shard.next_lsn));
            return;
        }
        if let Some(from) = truncate_from {
            self.members.truncated(from);
            self.unframed.retain(|e| e.index < from);
            self.unapplied.retain(|u| u.lsn < from);
            // Answers waiting for entries the truncation replaced describe a log that is gone:
            // append answers are dropped (they were for the old leader), others wait only for
            // what remains.
            for w in self.waiting.iter_mut().filter(|w| w.lsn >= from) {
                w.messages
                    .retain(|m| !matches!(m.body, MessageBody::AppendResponse { .. }));
                w.lsn = from - 1;
            }
            if from < self.shard.next_lsn {
                self.rewind_from = Some(self.rewind_from.map_or(from, |r| r.min(from)));
                // What was written from `from` on is no longer the log: nothing counts as
                // durable past `from - 1` until the rewind is written.
                self.rewind_floor = Some(self.rewind_floor.map_or(from - 1, |f| f.min(from - 1)));
            }
        }
        if let (Some(first), Some(last)) = (entries.first(), self.unframed.last()) {
            debug_assert_eq!(first.index, last.index + 1, "entries come in order");
        }
        self.unframed.extend(entries);
    }

    /// Frames the entries waiting for a write (a rewind frame first, if they replace framed
    /// records), when no write is in flight.
    fn frame_unframed(&mut self) {
        // Frames cut from an earlier batch go out first (one per write): a rewind starts a
        // frame of its own, after them.
        let framing = self.shard.building_records > 0 || !self.shard.sealed.is_empty();
        if self.unframed.is_empty() || framing {
            return;
        }
        if let Some(from) = self.rewind_from.take() {
            debug_assert_eq!(self.unframed[0].index, from, "a rewind carries its entries");
            self.shard.start_rewind(from);
            self.rewind_in_write = true;
            self.stats.rewinds += 1;
        }
        for e in std::mem::take(&mut self.unframed) {
            if e.kind == crate::raft::EntryKind::ConfChange {
                self.members
                    .appended(e.index, crate::raft::ConfChange::decode(&e.data));
            }
            let (kind, payload) = entries::record_parts(&e);
            self.shard.log_raw(e.index, e.term, kind, payload);
            self.unapplied.push_back(Unapplied {
                lsn: e.index,
                term: e.term,
                kind,
                payload: payload.to_vec(),
                at: None,
            });
        }
    }

    /// The next write, if none is in flight: entries framed, the leader's cursor records
    /// proposed, the manifest (hard state, commit hint, base term) brought up to date.
    pub fn poll_wal(&mut self, now: u64) -> Option<WalWrite> {
        if self.inflight.is_some() || self.mode == Mode::Deposed {
            return None;
        }
        if let Some(w) = self.install_write() {
            return Some(w);
        }
        self.frame_unframed();
        let mut w = self.shard.poll_wal()?;
        self.process_ready(now);
        self.place_framed();
        if let Some(m) = &mut w.manifest {
            m.commit = self.applied.min(self.shard.durable_lsn);
            m.base_term = self.base_term();
            self.shard.manifest = *m;
            self.hard_state_in_write = Some(self.hard_state.0);
        }
        w.members = self.members_for_write();
        if self.repair_marker && self.raft.repair_through().is_none() {
            self.repair_marker = false;
            w.remove_repair = true;
        }
        let term = self.raft.term_at(w.last_lsn).unwrap_or(0);
        self.inflight = Some((w.last_lsn, term, w.records));
        Some(w)
    }

    /// The log is durable here through this LSN (a rewind not yet written holds it back).
    pub(super) fn durable_through(&self) -> u64 {
        self.shard
            .durable_lsn
            .min(self.rewind_floor.unwrap_or(u64::MAX))
    }

    /// The term of the entry just before the oldest retained one.
    fn base_term(&self) -> u64 {
        let first = self.shard.log_start();
        self.raft.term_at(first.saturating_sub(1)).unwrap_or(0)
    }

    fn place_framed(&mut self) {
        let Some(hooks) = &mut self.shard.replica else {
            return;
        };
        for (lsn, at) in hooks.placed.drain(..) {
            if let Some(u) = self.unapplied.iter_mut().rev().find(|u| u.lsn == lsn) {
                u.at = Some(at);
            }
        }
    }

    /// A leader's framed records become Raft entries, at the same indexes. The core refusing
    /// one (it stopped leading) leaves the shard with applied records that are not in the
    /// log: the replica is deposed and recovered from disk.
    pub(super) fn feed_proposals(&mut self, now: u64) {
        let Some(hooks) = &mut self.shard.replica else {
            return;
        };
        let proposals = std::mem::take(&mut hooks.proposals);
        for (lsn, data) in proposals {
            match self.raft.propose(now, data) {
                Ok(index) => assert_eq!(index, lsn, "the WAL is the Raft log"),
                Err(e) => {
                    self.depose(&format!("the proposal failed: {e}"));
                    return;
                }
            }
        }
    }

    /// The write handed out by `poll_wal` is durable.
    pub fn handle_wal_done(&mut self, now: u64, last_lsn: u64) {
        let Some((lsn, term, records)) = self.inflight.take() else {
            debug_assert!(false, "wal done with no write in flight");
            return;
        };
        debug_assert_eq!(lsn, last_lsn);
        self.shard.handle_wal_done(now, last_lsn);
        if let Some(v) = self.hard_state_in_write.take() {
            self.hard_state.2 = v;
        }
        self.members.written();
        if std::mem::take(&mut self.rewind_in_write) && self.rewind_from.is_none() {
            self.rewind_floor = None;
        }
        if records > 0 {
            self.raft.handle_persisted(now, lsn, term);
        }
        self.finish_install(now);
        self.process_ready(now);
    }

    /// Releases answers whose data is now durable; true if one was addressed to this node
    /// (its own vote), which went back into the core.
    fn release_waiting(&mut self, now: u64) -> bool {
        let mut own = false;
        while let Some(w) = self.waiting.front() {
            let held = self.durable_through() < w.lsn || self.hard_state.2 < w.hard_state;
            if held && !self.planted.follower_ack_before_fsync {
                break;
            }
            let w = self.waiting.pop_front().expect("a front");
            for m in w.messages {
                if m.to == self.raft.id() {
                    self.raft.handle_message(now, m);
                    own = true;
                } else {
                    self.outbox.push(PeerMessage::Raft(m));
                }
            }
        }
        own
    }

    /// Applies what is committed and durable here: a leader releases its acks and makes data
    /// visible; a follower (or a leader catching up) applies its records, and a leader whose
    /// no-op is applied starts serving.
    fn apply_committed(&mut self, _now: u64) {
        let mut c = self.commit.min(self.durable_through());
        match self.mode {
            Mode::Leading => {
                if self.planted.ack_before_quorum {
                    c = self.durable_through();
                }
                if c > self.applied {
                    self.applied = c;
                    self.shard.commit_through(c);
                }
            }
            Mode::Follower | Mode::CatchingUp { .. } => {
                self.apply_records(c);
                self.shard.retire_below();
            }
            Mode::Deposed => return,
        }
        // Entries in retired segments can no longer be read: a follower that needs them
        // gets a snapshot.
        let first = self.shard.log_start();
        if first > 1 && self.raft.compact(first - 1) {
            self.stats.compactions += 1;
        }
        if let Mode::CatchingUp { noop } = self.mode {
            if self.applied >= noop {
                self.start_leading();
            }
        }
    }

    fn apply_records(&mut self, c: u64) {
        while let Some(u) = self.unapplied.front() {
            let (Some(at), true) = (u.at, u.lsn <= c) else {
                break;
            };
            let u = self.unapplied.pop_front().expect("a front");
            let Some(record) = entries::record_of(u.kind, &u.payload) else {
                // Checked when it arrived; a leader's own data is what it framed.
                unreachable!("a committed entry that is not a record");
            };
            debug_assert!(u.term <= self.raft.term());
            self.shard.replay_at = at;
            self.shard.apply(u.lsn, record);
            self.applied = u.lsn;
            self.stats.entries_applied += 1;
        }
    }

    /// The no-op of this leader's term is applied: every earlier entry is too. The shard
    /// leaves replay (counts and indexes rebuilt) and serves, writing records of this term.
    fn start_leading(&mut self) {
        self.shard.end_replay();
        self.shard.term = self.raft.term();
        if let Some(hooks) = &mut self.shard.replica {
            hooks.awaiting_commit.clear();
        }
        self.mode = Mode::Leading;
    }
}
