//! Per-follower flow control on the leader (raft-rs's Progress, written afresh).
//!
//! - `Probe`: the leader does not know where the follower's log matches; one append is in
//!   flight at a time, and each reject moves `next_index` back by a term (the hint).
//! - `Replicate`: the match is known; appends are pipelined, optimistically advancing
//!   `next_index`, up to `raft_inflight_entries_max` entries unacknowledged.
//! - `Snapshot`: the follower needs entries the leader no longer keeps, or lags too many bytes;
//!   nothing is sent until the host reports the snapshot sent.

use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressState {
    Probe,
    Replicate,
    Snapshot,
}

#[derive(Debug, Clone)]
pub(super) struct Progress {
    /// The follower durably holds our log up to here (it answered after its fsync).
    pub match_index: u64,
    pub next_index: u64,
    pub state: ProgressState,
    /// Probe: an append is in flight; wait for its answer (or a heartbeat answer).
    pub paused: bool,
    /// Replicate: (last index, entries) of each append in flight, oldest first.
    inflight: VecDeque<(u64, u64)>,
    inflight_entries: u64,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// An append answer arrived since the last heartbeat answer: a pipeline that made no
    /// progress over a whole heartbeat has lost a message and falls back to probing.
    pub acked_since_heartbeat: bool,
    /// The highest ReadIndex round this follower confirmed.
    pub read_seq_acked: u64,
    /// A log read for this follower is out with the host; send nothing else meanwhile.
    pub log_read_pending: bool,
}

impl Progress {
    pub fn new(next_index: u64) -> Progress {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            paused: false,
            inflight: VecDeque::new(),
            inflight_entries: 0,
            recent_active: false,
            acked_since_heartbeat: false,
            read_seq_acked: 0,
            log_read_pending: false,
        }
    }

    fn check(&self) {
        debug_assert!(self.match_index < self.next_index);
        debug_assert!(self.state == ProgressState::Replicate || self.inflight.is_empty());
        debug_assert_eq!(
            self.inflight.iter().map(|f| f.1).sum::<u64>(),
            self.inflight_entries
        );
    }

    /// Entries that may still be sent without an answer.
    pub fn room_entries(&self, inflight_entries_max: u64) -> u64 {
        match self.state {
            ProgressState::Probe if self.paused => 0,
            ProgressState::Probe => inflight_entries_max,
            ProgressState::Replicate => inflight_entries_max.saturating_sub(self.inflight_entries),
            ProgressState::Snapshot => 0,
        }
    }

    pub fn can_send(&self, inflight_entries_max: u64) -> bool {
        !self.log_read_pending && self.room_entries(inflight_entries_max) > 0
    }

    /// An append ending at `last` with `entries` entries left.
    pub fn on_sent(&mut self, last: u64, entries: u64) {
        match self.state {
            ProgressState::Probe => self.paused = true,
            ProgressState::Replicate => {
                if entries > 0 {
                    debug_assert_eq!(last + 1, self.next_index + entries);
                    self.next_index = last + 1;
                    self.inflight.push_back((last, entries));
                    self.inflight_entries += entries;
                }
            }
            ProgressState::Snapshot => debug_assert!(false, "nothing is sent while snapshotting"),
        }
        self.check();
    }

    /// The follower matches up to `index`. Returns whether the match moved (a stale or
    /// duplicated answer does not move it).
    pub fn on_ack(&mut self, index: u64) -> bool {
        self.acked_since_heartbeat = true;
        self.paused = false;
        while self.inflight.front().is_some_and(|f| f.0 <= index) {
            let (_, n) = self.inflight.pop_front().expect("checked non-empty");
            self.inflight_entries -= n;
        }
        if index <= self.match_index {
            self.check();
            return false;
        }
        self.match_index = index;
        self.next_index = self.next_index.max(index + 1);
        if self.state == ProgressState::Probe {
            self.become_replicate();
        }
        self.check();
        true
    }

    /// A reject of an append with `prev_index == rejected`; `probe_from` is where the hint says
    /// to probe next. Stale rejects (for an index already matched) are ignored.
    pub fn on_reject(&mut self, rejected: u64, probe_from: u64) -> bool {
        if rejected <= self.match_index || self.state == ProgressState::Snapshot {
            return false;
        }
        if self.state == ProgressState::Replicate {
            // An append after the match was lost or refused: the pipeline is broken. Later
            // rejects of the same pipeline find us probing with another `next_index` and are
            // dropped as stale below.
            self.become_probe();
        } else if rejected != self.next_index - 1 {
            return false; // a stale probe answer
        }
        self.next_index = probe_from.max(self.match_index) + 1;
        self.paused = false;
        self.check();
        true
    }

    /// The follower's log ends at `last` (it lost entries in a repair; `last` at most the
    /// leader's): nothing it matched is known any more (the cut may have removed a rewind,
    /// bringing back entries it replaced, at or below `last`), so the match starts again from
    /// zero and the probe sends its last entry (an entry the leader holds, so the probe is
    /// never an empty append past the leader's log, which nothing would send). Nothing
    /// changes while a snapshot is out.
    pub fn forget_beyond(&mut self, last: u64) {
        if self.state == ProgressState::Snapshot {
            return;
        }
        self.match_index = 0;
        self.restart_from_match(ProgressState::Probe);
        self.next_index = last.max(1);
        self.check();
    }

    /// Probe: one append in flight until the follower's match is found again.
    pub fn become_probe(&mut self) {
        self.restart_from_match(ProgressState::Probe);
    }

    /// Replicate: appends pipelined from just past the match.
    pub fn become_replicate(&mut self) {
        self.restart_from_match(ProgressState::Replicate);
    }

    /// Probe and replicate both start over just past the match, with nothing in flight.
    fn restart_from_match(&mut self, state: ProgressState) {
        self.state = state;
        self.paused = false;
        self.inflight.clear();
        self.inflight_entries = 0;
        self.next_index = self.match_index + 1;
        self.check();
    }

    pub fn become_snapshot(&mut self) {
        self.state = ProgressState::Snapshot;
        self.paused = false;
        self.inflight.clear();
        self.inflight_entries = 0;
        self.log_read_pending = false;
        self.check();
    }
}
