//! The core's view of the log: a compact term index (runs of equal terms, memory independent
//! of log length), a bounded cache of recent entries for replication, the entries not yet
//! handed to the host, and the commit and persistence watermarks.
//!
//! Index 0 (or the snapshot index) is the base: its term is known, no entry is kept for it.

use std::collections::VecDeque;

use super::message::Entry;

/// One run of consecutive entries of the same term, starting at `first_index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermRun {
    pub first_index: u64,
    pub term: u64,
}

/// What the host's durable log holds at a restart: everything in it is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogState {
    /// `snapshot_index + 1`: the first entry the host can read.
    pub first_index: u64,
    pub last_index: u64,
    /// Runs covering `first_index..=last_index`, ascending, each term above the last.
    pub term_runs: Vec<TermRun>,
    pub snapshot_index: u64,
    pub snapshot_term: u64,
}

impl Default for LogState {
    /// An empty log (a node's first start).
    fn default() -> LogState {
        LogState {
            first_index: 1,
            last_index: 0,
            term_runs: Vec::new(),
            snapshot_index: 0,
            snapshot_term: 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    first_index: u64,
    term: u64,
    /// Data bytes of all entries before this run (an estimate after a restart or truncation):
    /// lets the leader tell how many bytes a follower lags without keeping per-entry sizes.
    bytes_before: u64,
}

#[derive(Debug)]
pub(super) struct RaftLog {
    pub snapshot_index: u64,
    pub snapshot_term: u64,
    runs: Vec<Run>,
    pub last_index: u64,
    bytes_total: u64,
    pub commit: u64,
    /// The host reported entries up to here durable (for the leader: its own match).
    pub persisted: u64,
    /// The last index handed to the host in a Ready (what its WAL holds, durable or not).
    pub stable_last: u64,
    /// Entries after `stable_last`, for the next Ready.
    pub unstable: Vec<Entry>,
    /// The host must cut its log from here before appending `unstable`.
    pub truncate_from: Option<u64>,
    cache: VecDeque<Entry>,
    cache_bytes: u64,
    cache_bytes_max: u64,
}

impl RaftLog {
    pub fn new(state: &LogState, commit: u64, cache_bytes_max: u64) -> RaftLog {
        let runs = state.term_runs.iter().map(|r| Run {
            first_index: r.first_index,
            term: r.term,
            bytes_before: 0,
        });
        let log = RaftLog {
            snapshot_index: state.snapshot_index,
            snapshot_term: state.snapshot_term,
            runs: runs.collect(),
            last_index: state.last_index,
            bytes_total: 0,
            commit: commit.max(state.snapshot_index),
            persisted: state.last_index,
            stable_last: state.last_index,
            unstable: Vec::new(),
            truncate_from: None,
            cache: VecDeque::new(),
            cache_bytes: 0,
            cache_bytes_max,
        };
        log.check();
        log
    }

    /// The invariants every change keeps; cheap enough for every state change in debug.
    pub fn check(&self) {
        debug_assert!(self.snapshot_index <= self.commit);
        assert!(self.commit <= self.last_index, "commit beyond the log");
        debug_assert!(self.persisted <= self.stable_last);
        debug_assert!(self.stable_last <= self.last_index);
        debug_assert!(self
            .runs
            .windows(2)
            .all(|w| w[0].first_index < w[1].first_index));
        debug_assert!(self.runs.windows(2).all(|w| w[0].term < w[1].term));
        debug_assert!(self
            .runs
            .first()
            .is_none_or(|r| r.first_index > self.snapshot_index));
        debug_assert!(self
            .runs
            .last()
            .is_none_or(|r| r.first_index <= self.last_index));
        debug_assert!(self.runs.is_empty() == (self.last_index == self.snapshot_index));
        debug_assert!(self.cache.back().is_none_or(|e| e.index == self.last_index));
        debug_assert!(self
            .unstable
            .first()
            .is_none_or(|e| e.index == self.stable_last + 1));
        debug_assert!(self
            .unstable
            .last()
            .is_none_or(|e| e.index == self.last_index));
    }

    /// The term of the entry at `index`, `None` outside `snapshot_index..=last_index`.
    pub fn term_at(&self, index: u64) -> Option<u64> {
        if index == self.snapshot_index {
            return Some(self.snapshot_term);
        }
        if index < self.snapshot_index || index > self.last_index {
            return None;
        }
        let at = self.runs.partition_point(|r| r.first_index <= index);
        debug_assert!(at > 0);
        Some(self.runs[at - 1].term)
    }

    /// Runs in the term index: one per term with entries, whatever the log's length.
    #[cfg(test)]
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    pub fn last_term(&self) -> u64 {
        self.runs.last().map_or(self.snapshot_term, |r| r.term)
    }

    /// Raft §5.4.1: a log is at least as up to date as ours by last term, then last index.
    pub fn is_up_to_date(&self, last_index: u64, last_term: u64) -> bool {
        (last_term, last_index) >= (self.last_term(), self.last_index)
    }

    /// The largest index at most `index` whose term is at most `term` (the base when none is):
    /// the reject hint, and the leader's reading of it (the match point is at or below it).
    pub fn find_conflict_by_term(&self, index: u64, term: u64) -> (u64, u64) {
        let index = index.min(self.last_index);
        for (i, run) in self.runs.iter().enumerate().rev() {
            if run.first_index > index || run.term > term {
                continue;
            }
            let end = self
                .runs
                .get(i + 1)
                .map_or(self.last_index, |r| r.first_index - 1);
            return (index.min(end), run.term);
        }
        (self.snapshot_index, self.snapshot_term)
    }

    /// Appends entries that follow `last_index` (the caller checked contiguity).
    pub fn append(&mut self, entries: &[Entry]) {
        for e in entries {
            assert_eq!(e.index, self.last_index + 1, "appends are contiguous");
            assert!(e.term >= self.last_term(), "terms never go back in a log");
            if e.term > self.last_term() || self.runs.is_empty() {
                self.runs.push(Run {
                    first_index: e.index,
                    term: e.term,
                    bytes_before: self.bytes_total,
                });
            }
            self.last_index = e.index;
            self.bytes_total += e.size_bytes();
            self.cache_bytes += e.size_bytes();
            self.cache.push_back(e.clone());
            self.unstable.push(e.clone());
        }
        self.evict();
        self.check();
    }

    /// Cuts `from..` (a conflicting uncommitted suffix). The caller asserted `from > commit`;
    /// `planted` lets the simulator's bug cut committed entries (commit follows it down).
    pub fn truncate(&mut self, from: u64, planted: bool) {
        assert!(from > self.snapshot_index, "a snapshot is never cut");
        if !planted {
            assert!(from > self.commit, "a committed entry is never cut");
        }
        if from > self.last_index {
            return;
        }
        self.bytes_total = self.bytes_at(from - 1);
        self.runs.retain(|r| r.first_index < from);
        self.last_index = from - 1;
        self.commit = self.commit.min(self.last_index);
        self.unstable.retain(|e| e.index < from);
        if from <= self.stable_last {
            // The host holds entries from `from` on: it cuts them in the same write as the
            // replacement entries. An earlier cut point already covers a later one.
            self.truncate_from = Some(self.truncate_from.map_or(from, |t| t.min(from)));
            self.stable_last = from - 1;
            self.persisted = self.persisted.min(from - 1);
        }
        while self.cache.back().is_some_and(|e| e.index >= from) {
            let e = self.cache.pop_back().expect("checked non-empty");
            self.cache_bytes -= e.size_bytes();
        }
        self.check();
    }

    /// Estimated data bytes of entries `..=index` (exact at run boundaries, linear inside a
    /// run): enough to decide a snapshot by lag.
    fn bytes_at(&self, index: u64) -> u64 {
        let at = self.runs.partition_point(|r| r.first_index <= index);
        if at == 0 {
            return self
                .runs
                .first()
                .map_or(self.bytes_total, |r| r.bytes_before);
        }
        let run = self.runs[at - 1];
        let (end, end_bytes) = match self.runs.get(at) {
            Some(next) => (next.first_index - 1, next.bytes_before),
            None => (self.last_index, self.bytes_total),
        };
        let run_bytes = end_bytes.saturating_sub(run.bytes_before);
        let done = index.min(end) - run.first_index + 1;
        run.bytes_before + run_bytes * done / (end - run.first_index + 1)
    }

    /// Bytes of the committed entries a follower whose next entry is `next` still needs: what
    /// a snapshot (taken at or below the commit index) would spare it. Uncommitted bytes do
    /// not count: no snapshot covers them, so counting them would loop snapshot after snapshot.
    pub fn lag_bytes(&self, next: u64) -> u64 {
        if next > self.commit {
            return 0;
        }
        self.bytes_at(self.commit)
            .saturating_sub(self.bytes_at(next.saturating_sub(1)))
    }

    /// Hands the unstable entries to the host (the Ready takes them).
    pub fn take_unstable(&mut self) -> (Option<u64>, Vec<Entry>) {
        let entries = std::mem::take(&mut self.unstable);
        if let Some(last) = entries.last() {
            self.stable_last = last.index;
        }
        self.evict();
        self.check();
        (self.truncate_from.take(), entries)
    }

    /// The host made entries up to `index` of `term` durable. A report for entries since cut
    /// (their index now holds another term, or is beyond the log) is stale and ignored.
    pub fn persist(&mut self, index: u64, term: u64) -> bool {
        if index <= self.persisted || index > self.stable_last || self.term_at(index) != Some(term)
        {
            return false;
        }
        self.persisted = index;
        self.evict();
        self.check();
        true
    }

    /// Entries `lo..=hi` from the cache, at most `bytes_max` (at least one), or `None` when
    /// the cache no longer holds `lo`.
    pub fn cached(&self, lo: u64, hi: u64, bytes_max: u64) -> Option<Vec<Entry>> {
        let first = self.cache.front()?.index;
        if lo < first || lo > self.last_index {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in self.cache.range((lo - first) as usize..) {
            if e.index > hi || (!out.is_empty() && bytes + e.size_bytes() > bytes_max) {
                break;
            }
            bytes += e.size_bytes();
            out.push(e.clone());
        }
        Some(out)
    }

    /// The first index the cache holds (`last_index + 1` when empty).
    pub fn cache_first(&self) -> u64 {
        self.cache.front().map_or(self.last_index + 1, |e| e.index)
    }

    /// Entries the host made durable may leave the cache (it can read them back from its
    /// log); entries handed out but not yet durable stay: a log read for them would find
    /// nothing on disk yet, and asking again at once would spin until the write is done.
    fn evict(&mut self) {
        while self.cache_bytes > self.cache_bytes_max {
            match self.cache.front() {
                Some(e) if e.index <= self.stable_last && e.index <= self.persisted => {
                    self.cache_bytes -= e.size_bytes();
                    self.cache.pop_front();
                }
                _ => break,
            }
        }
    }

    /// The host compacted its log through `index` (a snapshot covers it).
    pub fn compact(&mut self, index: u64) -> bool {
        if index <= self.snapshot_index || index > self.commit || index > self.persisted {
            return false;
        }
        let term = self.term_at(index).expect("index within the log");
        // Runs starting at or below `index` go, except the last of them if it runs past
        // `index`: it then starts right after the new base.
        let covering = self.runs.partition_point(|r| r.first_index <= index);
        debug_assert!(covering > 0, "index is in the log, above the old base");
        let end = self
            .runs
            .get(covering)
            .map_or(self.last_index, |r| r.first_index - 1);
        if end > index {
            self.runs[covering - 1].first_index = index + 1;
            self.runs.drain(..covering - 1);
        } else {
            self.runs.drain(..covering);
        }
        self.snapshot_index = index;
        self.snapshot_term = term;
        while self.cache.front().is_some_and(|e| e.index <= index) {
            let e = self.cache.pop_front().expect("checked non-empty");
            self.cache_bytes -= e.size_bytes();
        }
        self.check();
        true
    }

    /// A follower installed a snapshot: its log is now empty at (`index`, `term`).
    pub fn reset_to_snapshot(&mut self, index: u64, term: u64) {
        self.snapshot_index = index;
        self.snapshot_term = term;
        self.runs.clear();
        self.last_index = index;
        self.commit = index;
        self.persisted = index;
        self.stable_last = index;
        self.unstable.clear();
        self.truncate_from = None;
        self.cache.clear();
        self.cache_bytes = 0;
        self.check();
    }
}
