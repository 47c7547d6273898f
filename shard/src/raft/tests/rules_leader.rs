//! Rules of leadership: transfer, membership, ReadIndex, a single voter, robustness.

use std::collections::BTreeSet;

use super::harness::{test_config, Cluster, Rng, STEP_MS};
use super::rules::{
    append_body, cluster_with_leader, core_with_log, granted, msg, ready, vote_request,
};
use crate::raft::{
    ConfChange, Entry, EntryKind, Membership, Message, MessageBody, ProposeError, RaftConfig,
    RaftCore, ReadState, Role, TransferError,
};

#[test]
fn test_transfer_leadership_target_campaigns_at_once() {
    // Proves a transfer sends TimeoutNow to an up-to-date target, which wins the next term without pre-vote.
    let mut c = cluster_with_leader(3, test_config(), 1);
    let term = c.core(1).term();
    c.record_sent = true;
    let now = c.now_ms;
    c.core_mut(1).transfer_leadership(now, 2).expect("leader");
    c.after_input(1);
    assert_eq!(c.propose(1, vec![1]), Err(ProposeError::TransferInProgress));
    assert!(c.run_until(5, |c| c.core(2).role() == Role::Leader));
    assert_eq!(c.core(2).term(), term + 1);
    assert!(c
        .sent
        .iter()
        .any(|m| m.to == 2 && m.body == MessageBody::TimeoutNow));
    assert!(!c
        .sent
        .iter()
        .any(|m| m.from == 2 && matches!(m.body, MessageBody::PreVote { .. })));
    assert!(c
        .sent
        .iter()
        .any(|m| m.from == 2 && matches!(m.body, MessageBody::Vote { transfer: true, .. })));
}

#[test]
fn test_transfer_brings_target_up_to_date_first() {
    // Proves TimeoutNow goes out only once the target matches the leader's whole log.
    let mut c = cluster_with_leader(3, test_config(), 1);
    c.isolate(3);
    for i in 0..5u8 {
        c.propose(1, vec![i]).expect("leader");
    }
    c.run(3);
    c.record_sent = true;
    let now = c.now_ms;
    c.core_mut(1).transfer_leadership(now, 3).expect("leader");
    c.after_input(1);
    c.run(3);
    assert!(
        !c.sent.iter().any(|m| m.body == MessageBody::TimeoutNow),
        "not while 3 lags"
    );
    c.heal();
    assert!(c.run_until(30, |c| c.core(3).role() == Role::Leader));
    assert_eq!(c.committed_on(3)[..5], c.committed_on(1)[..5]);
    assert!(
        c.checker.violations.is_empty(),
        "{:?}",
        c.checker.violations
    );
}

#[test]
fn test_transfer_aborts_after_election_timeout() {
    // Proves a transfer whose target does not win within an election timeout is abandoned and proposals resume.
    let mut c = cluster_with_leader(3, test_config(), 1);
    c.isolate(3);
    let now = c.now_ms;
    c.core_mut(1).transfer_leadership(now, 3).expect("leader");
    assert_eq!(
        c.core_mut(1).transfer_leadership(now, 2),
        Err(TransferError::InProgress(3))
    );
    assert_eq!(c.propose(1, vec![1]), Err(ProposeError::TransferInProgress));
    c.run(c.config.raft_election_timeout_ms / STEP_MS + 1);
    assert_eq!(c.leader(), Some(1));
    assert!(c.propose(1, vec![1]).is_ok());
}

fn cluster_with_spares(spares: &[u64]) -> Cluster {
    let initial = Membership {
        voters: (1..=3).collect(),
        learners: BTreeSet::new(),
    };
    let mut c = Cluster::with_membership(initial, spares, test_config(), 5);
    assert!(c.campaign(1, 50));
    c.run(5);
    c
}

#[test]
fn test_conf_change_requires_commit_in_current_term() {
    // Proves a new leader refuses membership changes until it committed an entry of its own term.
    let mut c = Cluster::new(3, test_config(), 5);
    assert!(c.campaign(1, 50));
    assert_eq!(
        c.propose_conf_change(1, ConfChange::AddLearner(4)),
        Err(ProposeError::TermNotCommitted)
    );
    c.run(5);
    assert!(c.propose_conf_change(1, ConfChange::AddLearner(4)).is_ok());
}

#[test]
fn test_conf_change_one_at_a_time() {
    // Proves a second membership change is refused while the first is uncommitted.
    let mut c = cluster_with_spares(&[4, 5]);
    c.isolate(1);
    c.propose_conf_change(1, ConfChange::AddLearner(4))
        .expect("first change");
    assert_eq!(
        c.propose_conf_change(1, ConfChange::AddLearner(5)),
        Err(ProposeError::ConfChangePending)
    );
    c.heal();
    c.run(5);
    assert!(c.propose_conf_change(1, ConfChange::AddLearner(5)).is_ok());
    assert_eq!(
        c.propose_conf_change(1, ConfChange::RemoveNode(9)),
        Err(ProposeError::ConfChangePending)
    );
}

#[test]
fn test_conf_takes_effect_when_appended() {
    // Proves a configuration is used as soon as its entry is in a node's log, before it commits.
    let mut c = cluster_with_spares(&[4]);
    c.cut_one_way(2, 1);
    c.cut_one_way(3, 1);
    c.propose_conf_change(1, ConfChange::AddLearner(4))
        .expect("change");
    assert!(c.core(1).membership().learners.contains(&4));
    assert!(
        c.core(1).progress(4).is_some(),
        "the leader replicates to the learner at once"
    );
    c.run(3);
    assert!(c.core(2).membership().learners.contains(&4));
    assert!(
        !c.core(2).committed_membership().learners.contains(&4),
        "not committed yet"
    );
}

#[test]
fn test_conf_change_reverted_when_entry_cut() {
    // Proves cutting an uncommitted conf entry brings back the configuration before it.
    let mut core = core_with_log(2, 3, &[1], 1, test_config());
    let cc = Entry {
        index: 2,
        term: 1,
        kind: EntryKind::ConfChange,
        data: ConfChange::AddLearner(4).encode(),
    };
    let append = MessageBody::Append {
        prev_index: 1,
        prev_term: 1,
        entries: vec![cc],
        commit: 1,
    };
    core.handle_message(0, msg(1, 2, 1, append));
    assert!(core.membership().learners.contains(&4));
    let append = append_body(1, 1, &[2], 1);
    core.handle_message(0, msg(3, 2, 2, append));
    assert!(!core.membership().learners.contains(&4));
}

#[test]
fn test_learner_receives_log_and_neither_its_copy_nor_its_vote_counts() {
    // Proves a learner gets the log and its copy does not make an entry committed, and that it
    // grants a vote it is asked for (it may have been promoted without knowing it yet: etcd's
    // rule; else a group whose promote entry it lacks could not elect). Candidates ask, and
    // count, only the voters of their own configuration.
    let mut c = cluster_with_spares(&[4]);
    c.propose_conf_change(1, ConfChange::AddLearner(4))
        .expect("change");
    c.run(10);
    assert_eq!(c.committed_on(4), c.committed_on(1));
    let last = (c.core(4).last_index(), c.core(4).last_term());
    let term = c.core(4).term();
    let later = c.now_ms + 10_000; // past any lease
    c.core_mut(4)
        .handle_message(later, vote_request(2, 4, term + 1, last.0 + 5, last.1 + 1));
    assert_eq!(granted(&ready(c.core_mut(4)), 2), Some(true));
    let mut c = cluster_with_spares(&[4]);
    c.propose_conf_change(1, ConfChange::AddLearner(4))
        .expect("change");
    c.run(10);
    c.cut_one_way(2, 1);
    c.cut_one_way(3, 1);
    let index = c.propose(1, b"x".to_vec()).expect("leader");
    c.run(5);
    assert!(c.core(4).last_index() >= index, "the learner has it");
    assert!(
        c.core(1).commit() < index,
        "leader + learner are not a quorum of voters"
    );
}

#[test]
fn test_promoted_learner_votes_and_counts() {
    // Proves a promoted learner becomes a voter that counts toward the quorum.
    let mut c = cluster_with_spares(&[4]);
    c.propose_conf_change(1, ConfChange::AddLearner(4))
        .expect("change");
    c.run(10);
    c.propose_conf_change(1, ConfChange::PromoteLearner(4))
        .expect("promote");
    c.run(10);
    assert_eq!(c.core(1).committed_membership().voters, (1..=4).collect());
    c.cut_one_way(3, 1);
    let index = c.propose(1, b"x".to_vec()).expect("leader");
    c.run(5);
    assert!(
        c.core(1).commit() >= index,
        "1, 2 and 4 are a quorum of four"
    );
    c.cut_one_way(2, 1);
    let index = c.propose(1, b"y".to_vec()).expect("leader");
    c.run(5);
    assert!(c.core(1).commit() < index, "1 and 4 are not");
}

#[test]
fn test_removed_leader_steps_down_after_commit() {
    // Proves a leader that removes itself leads until the change commits, then steps down and the rest elect a leader.
    let mut c = cluster_with_leader(3, test_config(), 1);
    let index = c
        .propose_conf_change(1, ConfChange::RemoveNode(1))
        .expect("change");
    assert_eq!(c.core(1).role(), Role::Leader);
    assert!(c.run_until(10, |c| c.core(1).role() != Role::Leader));
    assert!(c.core(1).commit() >= index);
    assert!(c.run_until(200, |c| c.leader().is_some_and(|l| l != 1)));
    let leader = c.leader().expect("checked");
    assert_eq!(
        c.core(leader).membership().voters,
        [2, 3].into_iter().collect()
    );
    assert!(
        c.checker.violations.is_empty(),
        "{:?}",
        c.checker.violations
    );
}

#[test]
fn test_read_index_waits_for_quorum_round() {
    // Proves a read is released only after a quorum answered a heartbeat round started after it.
    let mut c = cluster_with_leader(3, test_config(), 1);
    c.cut_one_way(2, 1);
    c.cut_one_way(3, 1);
    assert!(c.read_index(1, 7));
    c.run(20);
    assert!(c.nodes[&1].read_states.is_empty());
    c.cut.remove(&(2, 1));
    c.run(c.config.raft_heartbeat_ms / STEP_MS + 3);
    let commit = c.core(1).commit();
    assert_eq!(
        c.nodes[&1].read_states,
        vec![ReadState {
            ctx: 7,
            index: commit
        }]
    );
}

#[test]
fn test_read_index_batches_reads_into_one_round() {
    // Proves reads asked together share one heartbeat round.
    let mut c = cluster_with_leader(3, test_config(), 1);
    c.record_sent = true;
    let now = c.now_ms;
    for ctx in 1..=3 {
        c.core_mut(1).read_index(now, ctx).expect("leader");
    }
    c.after_input(1);
    let rounds: BTreeSet<u64> = c
        .sent
        .iter()
        .filter_map(|m| match m.body {
            MessageBody::Heartbeat { read_seq, .. } => Some(read_seq),
            _ => None,
        })
        .collect();
    assert_eq!(rounds.len(), 1, "{rounds:?}");
    let heartbeats = c
        .sent
        .iter()
        .filter(|m| matches!(m.body, MessageBody::Heartbeat { .. }))
        .count();
    assert_eq!(heartbeats, 2, "one heartbeat per peer");
    c.run(3);
    assert_eq!(c.nodes[&1].read_states.len(), 3);
}

#[test]
fn test_new_leader_serves_no_read_before_committing_in_term() {
    // Proves a new leader holds reads until its no-op commits, then releases them at or after it.
    let mut c = Cluster::new(3, test_config(), 9);
    assert!(c.campaign(1, 50));
    let noop = c.core(1).last_index();
    assert!(c.core(1).commit() < noop);
    assert!(c.read_index(1, 1));
    assert!(c.nodes[&1].read_states.is_empty());
    assert!(c.run_until(20, |c| !c.nodes[&1].read_states.is_empty()));
    assert!(c.nodes[&1].read_states[0].index >= noop);
}

#[test]
fn test_leader_dropping_reads_when_deposed() {
    // Proves reads a leader accepted but never released are reported dropped when it steps down.
    let mut c = cluster_with_leader(3, test_config(), 1);
    c.isolate(1);
    assert!(c.read_index(1, 42));
    c.run(2 * c.config.raft_election_timeout_ms / STEP_MS + 1);
    assert_eq!(c.core(1).role(), Role::Follower);
    assert_eq!(c.nodes[&1].dropped_reads, vec![42]);
    assert!(c.nodes[&1].read_states.is_empty());
}

#[test]
fn test_single_voter_elects_itself_and_commits_on_fsync() {
    // Proves a lone voter leads after persisting its vote and commits each entry when its own fsync reports.
    let one = Membership {
        voters: [1].into_iter().collect(),
        learners: BTreeSet::new(),
    };
    let hs = Default::default();
    let mut core =
        RaftCore::new(test_config(), 1, hs, Default::default(), one, &[]).expect("valid");
    core.handle_tick(0, 0);
    core.handle_tick(1000, 0);
    let r = ready(&mut core);
    for m in r.persisted_messages {
        core.handle_message(1000, m);
    }
    assert_eq!(core.role(), Role::Leader);
    let r = ready(&mut core);
    assert_eq!(r.entries.len(), 1);
    assert_eq!(r.commit, None, "nothing commits before the fsync");
    core.handle_persisted(1000, 1, core.term());
    assert_eq!(ready(&mut core).commit, Some(1));
    let index = core.propose(1000, b"x".to_vec()).expect("leader");
    assert_eq!(ready(&mut core).commit, None);
    core.handle_persisted(1000, index, core.term());
    assert_eq!(ready(&mut core).commit, Some(index));
}

#[test]
fn test_restarted_node_starts_as_follower() {
    // Proves a leader that restarts comes back as a follower with its durable term and vote.
    let mut c = cluster_with_leader(3, test_config(), 1);
    let term = c.core(1).term();
    c.crash(1);
    c.restart(1);
    assert_eq!(
        (c.core(1).role(), c.core(1).term(), c.core(1).vote()),
        (Role::Follower, term, Some(1))
    );
}

/// A random, often malformed message to `to`.
fn random_message(rng: &mut Rng, to: u64) -> Message {
    let small = |rng: &mut Rng| {
        if rng.percent(10) {
            rng.next_u64()
        } else {
            rng.below(12)
        }
    };
    let from = small(rng);
    let term = small(rng);
    let body = match rng.below(9) {
        0 => MessageBody::PreVote {
            last_index: small(rng),
            last_term: small(rng),
        },
        1 => MessageBody::PreVoteResponse {
            granted: rng.percent(50),
        },
        2 => MessageBody::Vote {
            last_index: small(rng),
            last_term: small(rng),
            transfer: rng.percent(50),
        },
        3 => MessageBody::VoteResponse {
            granted: rng.percent(50),
        },
        4 => {
            let (prev_index, n) = (small(rng), rng.below(4));
            let kind =
                [EntryKind::Normal, EntryKind::Noop, EntryKind::ConfChange][rng.below(3) as usize];
            let entries = (0..n)
                .map(|i| Entry {
                    index: prev_index.wrapping_add(1 + i),
                    term: small(rng),
                    kind,
                    data: vec![rng.below(4) as u8; rng.below(10) as usize],
                })
                .collect();
            MessageBody::Append {
                prev_index,
                prev_term: small(rng),
                entries,
                commit: small(rng),
            }
        }
        5 => MessageBody::AppendResponse {
            success: rng.percent(50),
            index: small(rng),
            hint_index: small(rng),
            hint_term: small(rng),
        },
        6 => MessageBody::Heartbeat {
            commit: small(rng),
            read_seq: small(rng),
        },
        7 => MessageBody::HeartbeatResponse {
            read_seq: small(rng),
        },
        _ => MessageBody::TimeoutNow,
    };
    Message {
        from,
        to,
        term,
        body,
    }
}

#[test]
fn test_peer_messages_never_panic() {
    // Proves no sequence of stale, forged or malformed peer messages makes a core panic, in any role.
    for seed in 0..30 {
        let mut rng = Rng::new(seed);
        let mut c = cluster_with_leader(
            3,
            RaftConfig {
                raft_election_timeout_ms: 300,
                ..test_config()
            },
            1,
        );
        for _ in 0..400 {
            let to = 1 + rng.below(3);
            let m = random_message(&mut rng, to);
            if c.is_up(to) {
                let now = c.now_ms;
                c.core_mut(to).handle_message(now, m);
                c.after_input(to);
            }
            if rng.percent(10) {
                c.step();
            }
        }
    }
}

#[test]
fn test_conf_change_add_past_members_max_is_refused() {
    // Proves a group never grows past MEMBERS_MAX members (what MEMBERS holds): the add that
    // would is refused, and a removal first makes room.
    let full = crate::raft::Membership {
        voters: (1..=3).collect(),
        learners: (4..=crate::raft::MEMBERS_MAX as u64).collect(),
    };
    let more = full.apply(ConfChange::AddLearner(1_000));
    assert_eq!(more, Err(crate::raft::ConfChangeInvalid::TooMany));
    let room = full
        .apply(ConfChange::RemoveNode(4))
        .expect("a removal applies");
    assert!(room.apply(ConfChange::AddLearner(1_000)).is_ok());
}
