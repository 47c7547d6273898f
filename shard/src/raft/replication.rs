//! Log replication: the leader's proposals, appends (from the cache or via host log reads),
//! snapshots, commit by counting the current term's entries; the follower's log matching,
//! conflict truncation, reject hints and commit learning.

use super::message::{ConfChange, Entry, EntryKind, MessageBody};
use super::progress::ProgressState;
use super::{
    LogRead, LogReadError, Membership, NodeId, PendingLogRead, ProposeError, RaftCore, Role,
    SnapshotError,
};

impl RaftCore {
    /// Appends `data` as a normal entry; returns its index. Leader only.
    pub fn propose(&mut self, _now_ms: u64, data: Vec<u8>) -> Result<u64, ProposeError> {
        self.check_proposable()?;
        Ok(self.append_leader_entry(EntryKind::Normal, data))
    }

    fn check_proposable(&self) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if self.transfer.is_some() {
            return Err(ProposeError::TransferInProgress);
        }
        if self.log.last_index - self.log.commit >= self.config.raft_uncommitted_entries_max {
            return Err(ProposeError::Full);
        }
        Ok(())
    }

    /// Appends a single-server membership change; returns its index. Refused while another is
    /// uncommitted, and before this leader committed an entry of its term (so it knows the
    /// latest committed configuration: the bug fix to the dissertation's §4.1 rule).
    pub fn propose_conf_change(
        &mut self,
        now_ms: u64,
        cc: ConfChange,
    ) -> Result<u64, ProposeError> {
        self.check_proposable()?;
        if self.log.commit < self.term_start_index {
            return Err(ProposeError::TermNotCommitted);
        }
        if self.conf.pending_index().is_some() {
            return Err(ProposeError::ConfChangePending);
        }
        self.conf.current().apply(cc)?;
        let index = self.append_leader_entry(EntryKind::ConfChange, cc.encode());
        self.sync_progress();
        // A shrinking voter set may make entries committed at once.
        self.maybe_commit(now_ms);
        Ok(index)
    }

    pub(super) fn append_leader_entry(&mut self, kind: EntryKind, data: Vec<u8>) -> u64 {
        assert_eq!(self.role, Role::Leader);
        let index = self.log.last_index + 1;
        let entry = Entry {
            index,
            term: self.term,
            kind,
            data,
        };
        self.append_entries(std::slice::from_ref(&entry));
        index
    }

    /// Appends to the log; conf entries take effect now (dissertation §4.1).
    fn append_entries(&mut self, entries: &[Entry]) {
        self.log.append(entries);
        for e in entries.iter().filter(|e| e.kind == EntryKind::ConfChange) {
            self.conf.appended(e.index, ConfChange::decode(&e.data));
        }
    }

    /// Leader: one Progress per member other than itself.
    fn sync_progress(&mut self) {
        let members: Vec<NodeId> = self.conf.current().peers(self.id).collect();
        self.progress.retain(|id, _| members.contains(id));
        // A new member is probed with our last entry (the conf entry itself): nothing is sent
        // to a follower whose next index is past our log, so `last + 1` would wait for the
        // next proposal.
        let next = self.log.last_index.max(1);
        for id in members {
            self.progress
                .entry(id)
                .or_insert_with(|| super::Progress::new(next));
        }
    }

    /// Sends `to` what flow control allows: entries from the cache, or a log read for older
    /// ones, or a snapshot when the entries are gone or the lag is too large.
    pub(super) fn send_append(&mut self, to: NodeId) {
        let max = self.config.raft_inflight_entries_max;
        let Some(pr) = self.progress.get(&to) else {
            return;
        };
        let next = pr.next_index;
        if !pr.can_send(max) || next > self.log.last_index {
            return;
        }
        let Some(prev_term) = self.log.term_at(next - 1) else {
            return self.start_snapshot(to);
        };
        let hi = self.log.last_index.min(next + pr.room_entries(max) - 1);
        if let Some(entries) = self.log.cached(next, hi, self.config.raft_append_bytes_max) {
            return self.send_entries(to, prev_term, entries);
        }
        if self.config.snapshot_is_committed_state
            && self.log.lag_bytes(next) > self.config.raft_snapshot_lag_bytes_max
        {
            return self.start_snapshot(to);
        }
        let id = self.next_log_read_id;
        self.next_log_read_id += 1;
        let hi = hi.min(self.log.cache_first() - 1);
        debug_assert!(next <= hi);
        self.log_reads.insert(
            id,
            PendingLogRead {
                to,
                lo: next,
                term: self.term,
            },
        );
        let read = LogRead {
            id,
            to,
            lo: next,
            hi,
            bytes_max: self.config.raft_append_bytes_max,
        };
        self.out.log_reads.push(read);
        self.progress
            .get_mut(&to)
            .expect("checked above")
            .log_read_pending = true;
    }

    fn send_entries(&mut self, to: NodeId, prev_term: u64, entries: Vec<Entry>) {
        debug_assert!(!entries.is_empty());
        let pr = self.progress.get_mut(&to).expect("caller checked");
        let prev_index = pr.next_index - 1;
        debug_assert_eq!(entries[0].index, prev_index + 1);
        let last = entries.last().map_or(prev_index, |e| e.index);
        pr.on_sent(last, last - prev_index);
        let commit = self.log.commit;
        self.send(
            to,
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            },
        );
    }

    fn start_snapshot(&mut self, to: NodeId) {
        if let Some(pr) = self.progress.get_mut(&to) {
            pr.become_snapshot();
            self.out.snapshots_to_send.push(to);
        }
    }

    /// Entries the host read for a log read (or why it could not).
    pub fn handle_log_read(&mut self, id: u64, result: Result<Vec<Entry>, LogReadError>) {
        let Some(read) = self.log_reads.remove(&id) else {
            return;
        };
        if self.role != Role::Leader || read.term != self.term {
            return;
        }
        let Some(pr) = self.progress.get_mut(&read.to) else {
            return;
        };
        pr.log_read_pending = false;
        let entries = match result {
            Ok(entries) => entries,
            Err(LogReadError::Compacted) => return self.start_snapshot(read.to),
            Err(LogReadError::Io) => return, // the next poll asks again
        };
        // Send only what still fits: the follower's next index is where the read began, and
        // the entries are ours (the host may answer after our log changed).
        let room = pr.room_entries(self.config.raft_inflight_entries_max) as usize;
        let fits = pr.next_index == read.lo
            && entries.first().is_some_and(|e| e.index == read.lo)
            && entries.iter().enumerate().all(|(i, e)| {
                e.index == read.lo + i as u64 && self.log.term_at(e.index) == Some(e.term)
            });
        if !fits || room == 0 {
            return;
        }
        let Some(prev_term) = self.log.term_at(read.lo - 1) else {
            // Compacted since the read was asked: the follower needs a snapshot now.
            return self.start_snapshot(read.to);
        };
        let mut entries = entries;
        entries.truncate(room);
        self.send_entries(read.to, prev_term, entries);
    }

    /// The host finished (or failed) sending a snapshot at `index` to `to`.
    pub fn handle_snapshot_sent(&mut self, to: NodeId, result: Result<u64, SnapshotError>) {
        let Some(pr) = self.progress.get_mut(&to) else {
            return;
        };
        if self.role != Role::Leader || pr.state != ProgressState::Snapshot {
            return;
        }
        pr.become_probe();
        if let Ok(index) = result {
            // Probe right after the snapshot; the follower's answer sets the match.
            pr.next_index = pr.next_index.max(index + 1);
        }
    }

    /// A follower's host installed a snapshot at (`index`, `term`) with configuration `conf`
    /// and replaced its log with it (after the writes of earlier Readies): the log restarts
    /// empty at `index`. Stale (at or below the commit index) or on a leader: ignored.
    pub fn handle_snapshot_installed(
        &mut self,
        _now_ms: u64,
        index: u64,
        term: u64,
        conf: Membership,
    ) -> bool {
        if self.role == Role::Leader || index <= self.log.commit || conf.voters.is_empty() {
            return false;
        }
        self.log.reset_to_snapshot(index, term);
        self.conf.reset(conf);
        self.end_repair_if_done();
        true
    }

    /// Follower: Raft's AppendEntries receiver (log matching on prev index and term).
    pub(super) fn handle_append(
        &mut self,
        now_ms: u64,
        from: NodeId,
        prev_index: u64,
        prev_term: u64,
        entries: Vec<Entry>,
        commit: u64,
    ) {
        self.heard_from_leader(now_ms, from);
        if !append_well_formed(prev_index, prev_term, self.term, &entries) {
            return;
        }
        self.append_since_heartbeat = true;
        let planted = self.config.planted.truncate_committed_on_conflict;
        let last_new = prev_index + entries.len() as u64;
        let (prev_index, prev_term, entries) = if prev_index < self.log.commit && !planted {
            // Everything up to our commit matches any leader's log: skip it.
            let skip = entries
                .iter()
                .take_while(|e| e.index <= self.log.commit)
                .count();
            let commit_term = self
                .log
                .term_at(self.log.commit)
                .expect("commit is in the log");
            (self.log.commit, commit_term, &entries[skip..])
        } else {
            (prev_index, prev_term, &entries[..])
        };
        if planted && prev_index < self.log.snapshot_index {
            return;
        }
        if self.log.term_at(prev_index) != Some(prev_term) {
            if self.repair_through.is_some() && prev_index > self.log.last_index {
                // The leader may still count entries we lost as ours: tell it where our log
                // ends, or its stale match would ignore every reject (a livelock).
                let last_index = self.log.last_index;
                return self.send(from, MessageBody::LostEntries { last_index });
            }
            let (hint_index, hint_term) = self.log.find_conflict_by_term(prev_index, prev_term);
            let body = MessageBody::AppendResponse {
                success: false,
                index: prev_index,
                hint_index,
                hint_term,
            };
            return self.send(from, body);
        }
        self.merge_entries(entries, last_new.max(prev_index), planted);
        let last_new = last_new.max(self.log.commit.min(self.log.last_index));
        let new_commit = commit.min(last_new).min(self.log.last_index);
        if new_commit > self.log.commit {
            self.commit_to(now_ms, new_commit);
        }
        // The answer says "I durably hold up to last_new": it leaves after this Ready's write.
        let body = MessageBody::AppendResponse {
            success: true,
            index: last_new,
            hint_index: 0,
            hint_term: 0,
        };
        self.send_persisted(from, body);
    }

    /// Appends the entries after the matched prev entry: entries already in the log are kept,
    /// the suffix from the first conflicting one is cut (never committed: a committed entry is
    /// in every later leader's log, so no leader sends a conflict for it).
    fn merge_entries(&mut self, entries: &[Entry], last_new: u64, planted: bool) {
        let mut start = entries.len();
        for (i, e) in entries.iter().enumerate() {
            match self.log.term_at(e.index) {
                Some(t) if t == e.term && !planted => continue,
                Some(_) => {
                    if !planted {
                        assert!(
                            e.index > self.log.commit,
                            "conflict at or below the commit index"
                        );
                    }
                    self.truncate_log(e.index, planted);
                }
                None => {}
            }
            start = i;
            break;
        }
        if planted && start == entries.len() && self.log.last_index > last_new {
            // The planted bug: a stale, shorter append cuts the suffix past it, matched or not.
            self.truncate_log(last_new + 1, true);
        }
        self.append_entries(&entries[start..]);
    }

    fn truncate_log(&mut self, from: u64, planted: bool) {
        self.log.truncate(from, planted);
        self.conf.truncated(from);
    }

    fn heard_from_leader(&mut self, now_ms: u64, from: NodeId) {
        if self.role != Role::Follower || self.leader != Some(from) {
            let term = self.term;
            self.become_follower(now_ms, term, Some(from));
        }
        self.leader_contact_ms = Some(now_ms);
        self.reset_election_deadline(now_ms);
    }

    pub(super) fn handle_heartbeat(
        &mut self,
        now_ms: u64,
        from: NodeId,
        commit: u64,
        read_seq: u64,
    ) {
        self.heard_from_leader(now_ms, from);
        // The leader caps `commit` at our match, so our log holds those entries as its does;
        // except in repair, where its match may count entries we lost, and our entries at
        // those indexes may be another term's: only appends (log matching) commit then.
        let new_commit = commit.min(self.log.last_index);
        if new_commit > self.log.commit && self.repair_through.is_none() {
            self.commit_to(now_ms, new_commit);
        }
        self.send(from, MessageBody::HeartbeatResponse { read_seq });
        // In repair with no append since the last heartbeat: the leader may believe us caught
        // up (a match from before we lost entries) and send nothing more. Tell it.
        if self.repair_through.is_some() && !std::mem::take(&mut self.append_since_heartbeat) {
            let last_index = self.log.last_index;
            self.send(from, MessageBody::LostEntries { last_index });
        }
    }

    pub(super) fn broadcast_heartbeats(&mut self) {
        let read_seq = self.reads.seq();
        let peers: Vec<(NodeId, u64)> = self
            .progress
            .iter()
            .map(|(&id, p)| (id, p.match_index))
            .collect();
        for (to, matched) in peers {
            let commit = self.log.commit.min(matched);
            self.send(to, MessageBody::Heartbeat { commit, read_seq });
        }
    }

    pub(super) fn handle_append_response(
        &mut self,
        now_ms: u64,
        from: NodeId,
        success: bool,
        index: u64,
        hint_index: u64,
        hint_term: u64,
    ) {
        if self.role != Role::Leader || index > self.log.last_index {
            return;
        }
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        if success {
            if pr.state != ProgressState::Snapshot && pr.on_ack(index) {
                self.maybe_commit(now_ms);
            }
            self.maybe_send_timeout_now(from);
            return;
        }
        // The match point is at or below the largest index of ours whose term is at most the
        // follower's hint term (a whole term skipped per round trip).
        let (probe_from, _) = self
            .log
            .find_conflict_by_term(hint_index.min(index), hint_term);
        if pr.on_reject(index, probe_from) && index <= self.log.snapshot_index {
            // The follower lacks even our base entry: only a snapshot can bring it back.
            self.start_snapshot(from);
        }
    }

    /// Leader: a follower in repair lost entries we count as matched; its log ends at
    /// `last_index`. Stop counting them and probe from its end (a stale or duplicated report
    /// only costs a probe: the follower acknowledges again what it holds).
    pub(super) fn handle_lost_entries(&mut self, from: NodeId, last_index: u64) {
        if self.role != Role::Leader {
            return;
        }
        // Its log may run past ours (entries of an old term we will replace): probe from our
        // end then, or there is no entry to probe with and nothing would ever be sent.
        let last_index = last_index.min(self.log.last_index);
        if let Some(pr) = self.progress.get_mut(&from) {
            pr.recent_active = true;
            pr.forget_beyond(last_index);
        }
    }

    pub(super) fn handle_heartbeat_response(&mut self, from: NodeId, read_seq: u64) {
        if self.role != Role::Leader {
            return;
        }
        let last = self.log.last_index;
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        pr.read_seq_acked = pr.read_seq_acked.max(read_seq.min(self.reads.seq()));
        match pr.state {
            ProgressState::Probe => pr.paused = false, // resend a probe that may have been lost
            ProgressState::Replicate if !pr.acked_since_heartbeat && pr.match_index < last => {
                pr.become_probe(); // a pipeline silent for a heartbeat lost a message
            }
            _ => {}
        }
        pr.acked_since_heartbeat = false;
        self.release_reads();
        // A TimeoutNow may have been lost: repeat it while the transfer waits.
        self.maybe_send_timeout_now(from);
    }

    /// Leader: commit the largest index a quorum of voters durably holds, if it is of the
    /// current term (Raft §5.4.2: an older term's entry commits only under one of ours).
    pub(super) fn maybe_commit(&mut self, now_ms: u64) {
        let quorum_index = self.quorum_value(self.log.persisted, |p| p.match_index);
        let ours = self.log.term_at(quorum_index) == Some(self.term);
        if quorum_index > self.log.commit && (ours || self.config.planted.commit_old_term_by_count)
        {
            self.commit_to(now_ms, quorum_index);
        }
    }

    pub(super) fn commit_to(&mut self, now_ms: u64, index: u64) {
        assert!(index > self.log.commit, "the commit index never goes back");
        assert!(index <= self.log.last_index, "commit within the log");
        self.log.commit = index;
        self.conf.committed_to(index);
        self.log.check();
        if self.role == Role::Leader && !self.conf.committed().is_voter(self.id) {
            // A removed leader steps down once its removal commits (dissertation §4.2.2).
            let term = self.term;
            self.become_follower(now_ms, term, None);
        } else if self.role == Role::Leader {
            self.release_reads();
        }
    }
}

/// An append a leader could have sent: dense indexes after `prev_index`, terms never going
/// back and never above the leader's `term`, no overflow. Anything else is dropped unanswered.
fn append_well_formed(prev_index: u64, prev_term: u64, term: u64, entries: &[Entry]) -> bool {
    prev_index.checked_add(entries.len() as u64 + 1).is_some()
        && entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.index == prev_index + 1 + i as u64 && e.term <= term)
        && entries.windows(2).all(|w| w[0].term <= w[1].term)
        && entries.first().is_none_or(|e| e.term >= prev_term)
}
