//! One test per Raft rule, named after it. Single cores driven by hand where the rule is about
//! one node's answer; the harness's cluster where it is about a group.

use std::collections::BTreeSet;

use super::harness::{test_config, Cluster, Faults, STEP_MS};
use crate::raft::{
    Entry, EntryKind, HardState, LogState, Membership, Message, MessageBody, NodeId, ProposeError,
    RaftConfig, RaftCore, Ready, Role, TermRun,
};

pub(super) fn voters(n: u64) -> Membership {
    Membership {
        voters: (1..=n).collect(),
        learners: BTreeSet::new(),
    }
}

/// A core restarted with a log whose entry `i + 1` has term `terms[i]`.
pub(super) fn core_with_log(
    id: NodeId,
    n: u64,
    terms: &[u64],
    commit: u64,
    config: RaftConfig,
) -> RaftCore {
    let mut runs: Vec<TermRun> = Vec::new();
    for (i, &t) in terms.iter().enumerate() {
        if runs.last().is_none_or(|r| r.term != t) {
            runs.push(TermRun {
                first_index: i as u64 + 1,
                term: t,
            });
        }
    }
    let term = terms.last().copied().unwrap_or(0);
    let log = LogState {
        first_index: 1,
        last_index: terms.len() as u64,
        term_runs: runs,
        snapshot_index: 0,
        snapshot_term: 0,
    };
    let hs = HardState {
        term,
        vote: None,
        commit,
    };
    RaftCore::new(config, id, hs, log, voters(n), &[]).expect("valid state")
}

pub(super) fn msg(from: NodeId, to: NodeId, term: u64, body: MessageBody) -> Message {
    Message {
        from,
        to,
        term,
        body,
    }
}

pub(super) fn entries(from_index: u64, terms: &[u64]) -> Vec<Entry> {
    let kind = EntryKind::Normal;
    terms
        .iter()
        .enumerate()
        .map(|(i, &term)| Entry {
            index: from_index + i as u64,
            term,
            kind,
            data: vec![i as u8],
        })
        .collect()
}

/// An append after (`prev_index`, `prev_term`) of entries with `terms`, with `commit`.
pub(super) fn append_body(
    prev_index: u64,
    prev_term: u64,
    terms: &[u64],
    commit: u64,
) -> MessageBody {
    MessageBody::Append {
        prev_index,
        prev_term,
        entries: entries(prev_index + 1, terms),
        commit,
    }
}

pub(super) fn ready(core: &mut RaftCore) -> Ready {
    core.poll_ready().unwrap_or_default()
}

/// A 3- or 5-node cluster on a perfect network with synchronous fsyncs, with a leader.
pub(super) fn cluster_with_leader(n: u64, config: RaftConfig, leader: NodeId) -> Cluster {
    let mut c = Cluster::new(n, config, 7);
    assert!(
        c.campaign(leader, 50),
        "node {leader} wins a quiet election"
    );
    c.run(5);
    c
}

pub(super) fn vote_request(
    from: NodeId,
    to: NodeId,
    term: u64,
    last_index: u64,
    last_term: u64,
) -> Message {
    msg(
        from,
        to,
        term,
        MessageBody::Vote {
            last_index,
            last_term,
            transfer: false,
        },
    )
}

pub(super) fn granted(r: &Ready, to: NodeId) -> Option<bool> {
    let all = r.persisted_messages.iter().chain(r.messages.iter());
    all.filter(|m| m.to == to).find_map(|m| match m.body {
        MessageBody::VoteResponse { granted } => Some(granted),
        _ => None,
    })
}

#[test]
fn test_term_and_vote_persisted_before_vote_response() {
    // Proves a vote answer leaves only with the Ready that persists term and vote together.
    let mut core = core_with_log(2, 3, &[1], 1, test_config());
    core.handle_message(0, vote_request(1, 2, 2, 1, 1));
    let r = ready(&mut core);
    assert_eq!(
        r.hard_state,
        Some(HardState {
            term: 2,
            vote: Some(1),
            commit: 1
        })
    );
    assert!(r
        .messages
        .iter()
        .all(|m| !matches!(m.body, MessageBody::VoteResponse { .. })));
    assert!(r
        .persisted_messages
        .iter()
        .any(|m| m.body == MessageBody::VoteResponse { granted: true }));
}

#[test]
fn test_append_response_only_after_entries_persisted() {
    // Proves an append's success answer rides in the same Ready as the entries, after their write.
    let mut core = core_with_log(2, 3, &[1], 1, test_config());
    let append = append_body(1, 1, &[1, 1], 1);
    core.handle_message(0, msg(1, 2, 1, append));
    let r = ready(&mut core);
    assert_eq!(r.entries.len(), 2);
    assert!(r
        .messages
        .iter()
        .all(|m| !matches!(m.body, MessageBody::AppendResponse { .. })));
    let answer = MessageBody::AppendResponse {
        success: true,
        index: 3,
        hint_index: 0,
        hint_term: 0,
    };
    assert!(r.persisted_messages.iter().any(|m| m.body == answer));
}

#[test]
fn test_candidate_counts_own_vote_only_after_persist() {
    // Proves a candidate's own vote reaches it as a persisted message, so a single voter leads only after its fsync.
    let mut core = core_with_log(1, 1, &[], 0, test_config());
    core.handle_tick(0, 0);
    core.handle_tick(10_000, 0);
    assert_eq!(core.role(), Role::Candidate);
    let r = ready(&mut core);
    assert_eq!(r.hard_state.map(|h| (h.term, h.vote)), Some((1, Some(1))));
    let own = r
        .persisted_messages
        .iter()
        .find(|m| m.to == 1)
        .cloned()
        .expect("own vote");
    core.handle_message(10_000, own);
    assert_eq!(core.role(), Role::Leader);
}

#[test]
fn test_one_vote_per_term() {
    // Proves a node that voted in a term refuses every other candidate of that term.
    let mut core = core_with_log(3, 3, &[1], 1, test_config());
    core.handle_message(0, vote_request(1, 3, 2, 1, 1));
    assert_eq!(granted(&ready(&mut core), 1), Some(true));
    core.handle_message(0, vote_request(2, 3, 2, 5, 1));
    assert_eq!(granted(&ready(&mut core), 2), Some(false));
    assert_eq!(core.vote(), Some(1));
    core.handle_message(0, vote_request(1, 3, 2, 1, 1));
    assert_eq!(
        granted(&ready(&mut core), 1),
        Some(true),
        "a repeated request from the same candidate is granted again"
    );
}

#[test]
fn test_vote_requires_up_to_date_log() {
    // Proves votes go only to candidates whose log is at least as up to date (last term, then index).
    let mut core = core_with_log(3, 3, &[1, 1, 2, 2, 2], 2, test_config());
    core.handle_message(0, vote_request(1, 3, 3, 9, 1));
    assert_eq!(
        granted(&ready(&mut core), 1),
        Some(false),
        "a longer log of an older last term"
    );
    core.handle_message(0, vote_request(1, 3, 4, 4, 2));
    assert_eq!(
        granted(&ready(&mut core), 1),
        Some(false),
        "same last term, shorter"
    );
    core.handle_message(0, vote_request(1, 3, 5, 5, 2));
    assert_eq!(
        granted(&ready(&mut core), 1),
        Some(true),
        "same last term and index"
    );
}

#[test]
fn test_election_safety_one_leader_per_term() {
    // Proves a group under split votes and churn never has two leaders in one term (the checker's property).
    for seed in 0..20 {
        let mut c = Cluster::new(5, test_config(), seed);
        c.faults = Faults {
            delay_steps_max: 5,
            jitter_spread: 3,
            drop_pct: 10,
            ..Faults::default()
        };
        for _ in 0..10 {
            c.run(70);
            if let Some(l) = c.leader() {
                c.crash(l);
                c.run(30);
                c.restart(l);
            }
        }
        assert!(
            c.checker.violations.is_empty(),
            "seed {seed}: {:?}",
            c.checker.violations
        );
        assert!(
            c.checker.leaders.len() > 1,
            "seed {seed}: elections happened"
        );
    }
}

#[test]
fn test_prevote_failure_does_not_bump_term() {
    // Proves an isolated node's failed pre-votes leave its term where it was.
    let mut c = cluster_with_leader(3, test_config(), 1);
    let term = c.core(3).term();
    c.isolate(3);
    c.run(10 * c.config.raft_election_timeout_ms / STEP_MS);
    assert_eq!(c.core(3).term(), term);
    assert_eq!(c.core(3).role(), Role::PreCandidate);
}

#[test]
fn test_checkquorum_leader_steps_down_without_quorum() {
    // Proves a leader that hears from no quorum for an election timeout steps down.
    let mut c = cluster_with_leader(3, test_config(), 1);
    c.isolate(1);
    c.run(2 * c.config.raft_election_timeout_ms / STEP_MS + 1);
    assert_eq!(c.core(1).role(), Role::Follower);
    assert_eq!(
        c.propose(1, vec![1]),
        Err(ProposeError::NotLeader { leader_hint: None })
    );
}

#[test]
fn test_checkquorum_one_way_partition() {
    // Proves a leader whose messages still go out but hears nothing back steps down, and the others elect a new leader.
    let mut c = cluster_with_leader(3, test_config(), 1);
    let term = c.core(1).term();
    c.cut_one_way(2, 1);
    c.cut_one_way(3, 1);
    c.run(2 * c.config.raft_election_timeout_ms / STEP_MS + 1);
    assert_eq!(c.core(1).role(), Role::Follower);
    assert!(c.run_until(200, |c| c
        .leader()
        .is_some_and(|l| l != 1 && c.core(l).term() > term)));
    assert!(
        c.checker.violations.is_empty(),
        "{:?}",
        c.checker.violations
    );
}

#[test]
fn test_follower_in_lease_ignores_vote_requests() {
    // Proves a follower that heard from a live leader within the election timeout ignores (pre)votes and keeps its term.
    let mut core = core_with_log(2, 3, &[1], 1, test_config());
    let hb = MessageBody::Heartbeat {
        commit: 1,
        read_seq: 0,
    };
    core.handle_message(1000, msg(1, 2, 1, hb));
    let _ = ready(&mut core);
    core.handle_message(1100, vote_request(3, 2, 5, 9, 1));
    core.handle_message(
        1100,
        msg(
            3,
            2,
            5,
            MessageBody::PreVote {
                last_index: 9,
                last_term: 1,
            },
        ),
    );
    assert_eq!(core.term(), 1);
    let r = ready(&mut core);
    assert!(r.messages.is_empty() && r.persisted_messages.is_empty() && r.hard_state.is_none());
    // Once the lease ran out, the same request is heard.
    core.handle_message(1000 + 300, vote_request(3, 2, 5, 9, 1));
    assert_eq!(core.term(), 5);
}

#[test]
fn test_rejoining_node_does_not_disrupt_leader() {
    // Proves a partitioned node rejoining a healthy group does not depose its leader (pre-vote and check-quorum).
    for planted in [false, true] {
        let mut config = test_config();
        config.planted.no_prevote_checkquorum = planted;
        let mut c = cluster_with_leader(3, config, 1);
        let term = c.core(1).term();
        c.isolate(3);
        c.run(5 * c.config.raft_election_timeout_ms / STEP_MS);
        c.heal();
        c.run(5 * c.config.raft_election_timeout_ms / STEP_MS);
        let undisturbed = c.leader() == Some(1) && c.core(1).term() == term;
        assert_eq!(undisturbed, !planted, "planted: {planted}");
    }
}

#[test]
fn test_log_matching_rejects_mismatched_prev() {
    // Proves an append whose (prev index, prev term) is not in the log is refused and changes nothing.
    let mut core = core_with_log(2, 3, &[1, 1, 2], 1, test_config());
    let append = append_body(3, 3, &[3], 1);
    core.handle_message(0, msg(1, 2, 3, append));
    let r = ready(&mut core);
    assert!(r.entries.is_empty() && r.truncate_from.is_none());
    let reject = r.messages.iter().find_map(|m| match m.body {
        MessageBody::AppendResponse {
            success: false,
            index,
            hint_index,
            hint_term,
        } => Some((index, hint_index, hint_term)),
        _ => None,
    });
    assert_eq!(reject, Some((3, 3, 2)));
    assert_eq!(core.last_index(), 3);
}

#[test]
fn test_follower_truncates_only_conflicting_suffix() {
    // Proves a follower keeps matching entries and cuts from the first conflicting one only.
    let mut core = core_with_log(2, 3, &[1, 1, 2, 2, 2], 2, test_config());
    let append = append_body(2, 1, &[2, 3], 2);
    core.handle_message(0, msg(1, 2, 3, append));
    let r = ready(&mut core);
    assert_eq!(r.truncate_from, Some(4));
    assert_eq!(
        r.entries
            .iter()
            .map(|e| (e.index, e.term))
            .collect::<Vec<_>>(),
        vec![(4, 3)]
    );
    assert_eq!((core.last_index(), core.term_at(3)), (4, Some(2)));
}

#[test]
fn test_follower_never_truncates_committed_entries() {
    // Proves an append conflicting at or below the commit index cuts nothing (committed entries match every leader's).
    let mut core = core_with_log(2, 3, &[1, 1, 2, 2], 3, test_config());
    let append = append_body(1, 1, &[3, 3], 1);
    core.handle_message(0, msg(1, 2, 3, append));
    let r = ready(&mut core);
    assert!(
        r.truncate_from.is_none_or(|t| t > 3),
        "truncate_from {:?}",
        r.truncate_from
    );
    assert_eq!(
        (core.term_at(2), core.term_at(3), core.commit()),
        (Some(1), Some(2), 3)
    );
}

#[test]
#[should_panic(expected = "a committed entry is never cut")]
fn test_truncating_committed_entry_is_asserted() {
    // Proves the log asserts, rather than performs, a cut at or below the commit index.
    let mut log = crate::raft::log::RaftLog::new(
        &LogState {
            first_index: 1,
            last_index: 3,
            term_runs: vec![TermRun {
                first_index: 1,
                term: 1,
            }],
            snapshot_index: 0,
            snapshot_term: 0,
        },
        2,
        1024,
    );
    log.truncate(2, false);
}

#[test]
fn test_reject_hint_backs_up_by_term() {
    // Proves a follower with a long divergent suffix is caught up in a few probes, not one per entry.
    let mut config = test_config();
    config.raft_uncommitted_entries_max = 1000;
    let mut c = cluster_with_leader(3, config, 1);
    c.isolate(1);
    for i in 0..40u8 {
        c.propose(1, vec![i]).expect("still leader");
    }
    c.run(c.config.raft_election_timeout_ms / STEP_MS + 1); // node 3's lease on node 1 runs out
    assert!(c.campaign(2, 200));
    for i in 0..40u8 {
        let _ = c.propose(2, vec![100 + i]);
        c.run(1);
    }
    c.heal();
    c.record_sent = true;
    c.run(50);
    let rejects = c.sent.iter().filter(|m| {
        m.from == 1 && matches!(m.body, MessageBody::AppendResponse { success: false, .. })
    });
    let rejects = rejects.count();
    assert!(rejects <= 3, "{rejects} rejects");
    assert_eq!(c.committed_on(1), c.committed_on(2));
    assert!(
        c.checker.violations.is_empty(),
        "{:?}",
        c.checker.violations
    );
}

#[test]
fn test_leader_appends_noop_at_term_start() {
    // Proves a new leader's first entry is a no-op of its term.
    let c = cluster_with_leader(3, test_config(), 2);
    let last = c.nodes[&2].written.last().cloned().expect("an entry");
    assert_eq!((last.kind, last.term), (EntryKind::Noop, c.core(2).term()));
}

#[test]
fn test_figure8_old_term_entry_not_committed_by_count() {
    // Proves a leader does not commit an older term's entry by counting replicas (Raft Figure 8); the planted bug does.
    assert!(figure8(false).is_empty());
    let violations = figure8(true);
    assert!(
        violations
            .iter()
            .any(|v| v.starts_with("leader completeness") || v.starts_with("committed prefix")),
        "{violations:?}"
    );
}

/// Raft's Figure 8 on three nodes; returns the checker's violations.
fn figure8(planted: bool) -> Vec<String> {
    let mut config = test_config();
    config.raft_inflight_entries_max = 1;
    config.planted.commit_old_term_by_count = planted;
    let mut c = cluster_with_leader(3, config, 1);
    // S1 appends x at index 2 that reaches no one.
    c.isolate(1);
    let x = c.propose(1, b"x".to_vec()).expect("leader");
    c.run(1);
    c.crash(1);
    // S2 wins a newer term; its no-op at index 2 reaches no one either.
    c.heal();
    c.isolate(1);
    assert!(c.campaign(2, 100));
    c.isolate(2);
    c.crash(2);
    // S1 comes back, wins with S3's vote and copies x (an older term) to S3.
    c.restart(1);
    c.heal();
    c.isolate(2);
    assert!(c.campaign(1, 200));
    let s1_term = c.core(1).term();
    assert!(c.run_until(50, |c| c.core(1).progress(3).is_some_and(|p| p.1 >= x)));
    assert_eq!(
        c.core(1).commit() >= x,
        planted,
        "x commits only under the planted bug"
    );
    c.cut_one_way(1, 3); // S1's no-op never reaches S3
    c.run(1);
    c.crash(1);
    // S2 returns with its newer last term, wins S3's vote and overwrites index 2.
    c.restart(2);
    c.heal();
    c.isolate(1);
    assert!(c.campaign(2, 200));
    assert!(c.core(2).term() > s1_term);
    c.run(20);
    eprintln!("old-term commits {}", c.checker.old_term_commits);
    c.checker.violations.clone()
}
