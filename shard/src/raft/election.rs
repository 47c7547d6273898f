//! Elections: ticks, pre-vote, vote, check-quorum (both sides), leadership transfer, and the
//! role changes. The dispatch of peer messages lives here too, since a message's term decides
//! first whether the node changes role.

use super::message::{Message, MessageBody};
use super::progress::Progress;
use super::{EntryKind, NodeId, RaftCore, Role, Transfer, TransferError};

const TERM_MAX: u64 = 1 << 62;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Campaign {
    Pre,
    Real { transfer: bool },
}

impl RaftCore {
    /// Time passed. `jitter` is a random number the host drew; election deadlines map it into
    /// `[raft_election_timeout_ms, 2 * raft_election_timeout_ms)`.
    pub fn handle_tick(&mut self, now_ms: u64, jitter: u64) {
        self.jitter = jitter;
        if self.role == Role::Leader {
            self.leader_tick(now_ms);
            return;
        }
        let deadline = *self
            .election_deadline_ms
            .get_or_insert(now_ms + self.randomized_timeout_ms());
        if now_ms < deadline {
            return;
        }
        self.reset_election_deadline(now_ms);
        // Learners, removed nodes and nodes in repair never campaign.
        if self.may_elect() {
            let kind = if self.prevote_on() {
                Campaign::Pre
            } else {
                Campaign::Real { transfer: false }
            };
            self.campaign(now_ms, kind);
        }
    }

    fn randomized_timeout_ms(&self) -> u64 {
        let t = self.config.raft_election_timeout_ms;
        t + self.jitter % t
    }

    pub(super) fn reset_election_deadline(&mut self, now_ms: u64) {
        self.election_deadline_ms = Some(now_ms + self.randomized_timeout_ms());
    }

    fn prevote_on(&self) -> bool {
        !self.config.planted.no_prevote_checkquorum
    }

    fn leader_tick(&mut self, now_ms: u64) {
        if now_ms >= self.heartbeat_due_ms {
            self.heartbeat_due_ms = now_ms + self.config.raft_heartbeat_ms;
            self.broadcast_heartbeats();
        }
        if self
            .transfer
            .is_some_and(|t| now_ms >= t.started_ms + self.config.raft_election_timeout_ms)
        {
            self.transfer = None; // the target did not win in time: take proposals again
        }
        if now_ms < self.quorum_check_due_ms {
            return;
        }
        self.quorum_check_due_ms = now_ms + self.config.raft_election_timeout_ms;
        let voters = &self.conf.current().voters;
        let active = voters
            .iter()
            .filter(|&&v| v == self.id || self.progress.get(&v).is_some_and(|p| p.recent_active))
            .count();
        if active < self.conf.current().quorum() && self.prevote_on() {
            // Check-quorum: cut off from a quorum, this leader may be deposed without knowing;
            // stepping down stops it from serving reads or taking proposals that cannot commit.
            let term = self.term;
            self.become_follower(now_ms, term, None);
            return;
        }
        for p in self.progress.values_mut() {
            p.recent_active = false;
        }
    }

    /// Whether a live leader holds this node (check-quorum's lease): vote requests are then
    /// ignored, so a partitioned node rejoining cannot disrupt a healthy group.
    fn in_lease(&self, now_ms: u64) -> bool {
        if !self.prevote_on() {
            return false;
        }
        self.role == Role::Leader
            || (self.leader.is_some()
                && self
                    .leader_contact_ms
                    .is_some_and(|t| now_ms < t + self.config.raft_election_timeout_ms))
    }

    /// A peer's message. Messages not for this node, stale ones and malformed ones are ignored
    /// or answered; none can make the core panic.
    pub fn handle_message(&mut self, now_ms: u64, msg: Message) {
        // Terms past 2^62 are malformed (no group lives that long); refusing them keeps every
        // `term + 1` below overflow whatever a peer sends.
        if msg.to != self.id || msg.from == 0 || msg.term > TERM_MAX {
            return;
        }
        // Only our own vote comes back to us (see `campaign`); anything else "from" us is forged.
        if msg.from == self.id && !matches!(msg.body, MessageBody::VoteResponse { .. }) {
            return;
        }
        if msg.term > self.term {
            let transfer = matches!(msg.body, MessageBody::Vote { transfer: true, .. });
            if msg.body.is_vote_request() && !transfer && self.in_lease(now_ms) {
                return;
            }
            match msg.body {
                // Pre-vote changes no term: the asker has not adopted it, nor will we.
                MessageBody::PreVote { .. } | MessageBody::PreVoteResponse { granted: true } => {}
                MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::TimeoutNow => self.become_follower(now_ms, msg.term, Some(msg.from)),
                _ => self.become_follower(now_ms, msg.term, None),
            }
        } else if msg.term < self.term {
            self.answer_stale(msg);
            return;
        }
        self.dispatch(now_ms, msg);
    }

    fn dispatch(&mut self, now_ms: u64, msg: Message) {
        let from = msg.from;
        match msg.body {
            MessageBody::PreVote {
                last_index,
                last_term,
            } => self.handle_pre_vote(&msg, last_index, last_term),
            MessageBody::Vote {
                last_index,
                last_term,
                ..
            } => self.handle_vote(now_ms, from, last_index, last_term),
            MessageBody::PreVoteResponse { granted } => {
                self.handle_vote_response(now_ms, from, msg.term, granted, true)
            }
            MessageBody::VoteResponse { granted } => {
                self.handle_vote_response(now_ms, from, msg.term, granted, false)
            }
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => self.handle_append(now_ms, from, prev_index, prev_term, entries, commit),
            MessageBody::AppendResponse {
                success,
                index,
                hint_index,
                hint_term,
            } => self.handle_append_response(now_ms, from, success, index, hint_index, hint_term),
            MessageBody::Heartbeat { commit, read_seq } => {
                self.handle_heartbeat(now_ms, from, commit, read_seq)
            }
            MessageBody::HeartbeatResponse { read_seq } => {
                self.handle_heartbeat_response(from, read_seq)
            }
            MessageBody::TimeoutNow => {
                if self.role != Role::Leader && self.may_elect() {
                    self.campaign(now_ms, Campaign::Real { transfer: true });
                }
            }
            MessageBody::LostEntries { last_index } => self.handle_lost_entries(from, last_index),
        }
    }

    /// A message from an older term: tell a stale leader or candidate our term so it steps
    /// down; the rest needs no answer.
    fn answer_stale(&mut self, msg: Message) {
        let body = match msg.body {
            MessageBody::Append { .. } => MessageBody::AppendResponse {
                success: false,
                index: 0,
                hint_index: 0,
                hint_term: 0,
            },
            MessageBody::Heartbeat { .. } => MessageBody::HeartbeatResponse { read_seq: 0 },
            MessageBody::PreVote { .. } => MessageBody::PreVoteResponse { granted: false },
            MessageBody::Vote { .. } => MessageBody::VoteResponse { granted: false },
            _ => return,
        };
        self.send(msg.from, body);
    }

    fn handle_pre_vote(&mut self, msg: &Message, last_index: u64, last_term: u64) {
        // Grant if the asker's campaign term is ahead of ours and its log is up to date; a
        // node in repair never votes. A node that thinks it is a learner (or not a member)
        // does: it may have been promoted without having the entry yet, and a candidate counts
        // only the voters of its own configuration, so its vote decides only where it is one.
        // The grant echoes the asked term, a refusal carries ours.
        let granted = msg.term > self.term
            && self.may_vote()
            && self.log.is_up_to_date(last_index, last_term);
        let body = MessageBody::PreVoteResponse { granted };
        let term = if granted { msg.term } else { self.term };
        self.out.messages.push(Message {
            from: self.id,
            to: msg.from,
            term,
            body,
        });
    }

    fn handle_vote(&mut self, now_ms: u64, from: NodeId, last_index: u64, last_term: u64) {
        debug_assert!(self.role != Role::Leader || self.vote == Some(self.id));
        let free = self.vote.is_none() || self.vote == Some(from);
        let granted = free && self.may_vote() && self.log.is_up_to_date(last_index, last_term);
        if granted {
            let before = self.vote;
            self.vote = Some(from);
            assert!(before.is_none() || before == self.vote, "one vote per term");
            self.reset_election_deadline(now_ms);
        }
        let body = MessageBody::VoteResponse { granted };
        if self.config.planted.vote_not_persisted {
            self.send(from, body);
        } else {
            // The grant binds this node for the term: it leaves only with term and vote durable.
            self.send_persisted(from, body);
        }
    }

    fn handle_vote_response(
        &mut self,
        now_ms: u64,
        from: NodeId,
        term: u64,
        granted: bool,
        pre: bool,
    ) {
        let expected = if pre {
            (Role::PreCandidate, self.term + 1)
        } else {
            (Role::Candidate, self.term)
        };
        if (self.role, term) != expected || !self.conf.current().is_voter(from) {
            return;
        }
        self.votes.entry(from).or_insert(granted);
        let yes = self.votes.values().filter(|&&g| g).count();
        let no = self.votes.len() - yes;
        let quorum = self.conf.current().quorum();
        if yes >= quorum {
            if pre {
                self.campaign(now_ms, Campaign::Real { transfer: false });
            } else {
                self.become_leader(now_ms);
            }
        } else if no > self.conf.current().voters.len() - quorum {
            let term = self.term;
            self.become_follower(now_ms, term, None);
        }
    }

    pub(super) fn campaign(&mut self, now_ms: u64, kind: Campaign) {
        assert!(self.is_voter(), "only voters campaign");
        self.clear_leader_state();
        self.leader = None;
        self.votes.clear();
        self.reset_election_deadline(now_ms);
        let (last_index, last_term) = (self.log.last_index, self.log.last_term());
        let voters: Vec<NodeId> = self
            .conf
            .current()
            .voters
            .iter()
            .copied()
            .filter(|&v| v != self.id)
            .collect();
        match kind {
            Campaign::Pre => {
                self.role = Role::PreCandidate;
                for &to in &voters {
                    let body = MessageBody::PreVote {
                        last_index,
                        last_term,
                    };
                    self.out.messages.push(Message {
                        from: self.id,
                        to,
                        term: self.term + 1,
                        body,
                    });
                }
                // Our own pre-vote needs no persistence.
                self.handle_vote_response(now_ms, self.id, self.term + 1, true, true);
            }
            Campaign::Real { transfer } => {
                self.term += 1;
                self.vote = Some(self.id);
                self.role = Role::Candidate;
                for &to in &voters {
                    self.send(
                        to,
                        MessageBody::Vote {
                            last_index,
                            last_term,
                            transfer,
                        },
                    );
                }
                // Our own vote counts only once durable with the term: it comes back to us as
                // a message that leaves after this Ready's write, so a crash before the fsync
                // cannot leave a leader whose own vote a restart forgot.
                let body = MessageBody::VoteResponse { granted: true };
                if self.config.planted.vote_not_persisted {
                    self.send(self.id, body);
                } else {
                    self.send_persisted(self.id, body);
                }
            }
        }
    }

    pub(super) fn become_follower(&mut self, now_ms: u64, term: u64, leader: Option<NodeId>) {
        assert!(term >= self.term, "terms never go back");
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        debug_assert!(!(self.role == Role::Leader && leader == Some(self.id)));
        self.clear_leader_state();
        self.role = Role::Follower;
        self.leader = leader;
        self.leader_contact_ms = leader.map(|_| now_ms);
        self.reset_election_deadline(now_ms);
    }

    /// Drops everything only a leader keeps; reads it accepted are reported dropped.
    fn clear_leader_state(&mut self) {
        self.progress.clear();
        self.transfer = None;
        self.log_reads.clear();
        let dropped = self.reads.drop_all();
        self.out.dropped_reads.extend(dropped);
    }

    fn become_leader(&mut self, now_ms: u64) {
        assert_eq!(self.role, Role::Candidate);
        assert_eq!(self.vote, Some(self.id), "a leader voted for itself");
        self.role = Role::Leader;
        self.leader = Some(self.id);
        self.election_deadline_ms = None;
        let next = self.log.last_index + 1;
        let peers: Vec<NodeId> = self.conf.current().peers(self.id).collect();
        for id in peers {
            let mut p = Progress::new(next);
            p.recent_active = true; // a grace period of one election timeout
            self.progress.insert(id, p);
        }
        self.heartbeat_due_ms = now_ms;
        self.quorum_check_due_ms = now_ms + self.config.raft_election_timeout_ms;
        // The no-op: committing it commits every earlier entry (§5.4.2) and tells this leader
        // its commit index is current (§6.4, ReadIndex).
        self.term_start_index = self.append_leader_entry(EntryKind::Noop, Vec::new());
        self.leader_tick(now_ms);
    }

    /// Hands leadership to `to`: stop taking proposals, bring it up to date, then TimeoutNow.
    pub fn transfer_leadership(&mut self, now_ms: u64, to: NodeId) -> Result<(), TransferError> {
        if self.role != Role::Leader {
            return Err(TransferError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if !self.conf.current().is_voter(to) {
            return Err(TransferError::NotVoter(to));
        }
        if let Some(t) = self.transfer {
            return Err(TransferError::InProgress(t.to));
        }
        if to == self.id {
            return Ok(());
        }
        self.transfer = Some(Transfer {
            to,
            started_ms: now_ms,
        });
        self.maybe_send_timeout_now(to);
        Ok(())
    }

    pub(super) fn maybe_send_timeout_now(&mut self, to: NodeId) {
        let up_to_date = self
            .progress
            .get(&to)
            .is_some_and(|p| p.match_index == self.log.last_index);
        if self.transfer.is_some_and(|t| t.to == to) && up_to_date {
            self.send(to, MessageBody::TimeoutNow);
        }
    }
}
