//! Protocol-aware recovery (`crate::repair`): a node whose log lost entries it may have
//! acknowledged neither votes nor leads until it holds them again.

use super::harness::test_config;
use super::rules::{
    append_body, cluster_with_leader, core_with_log, granted, msg, ready, vote_request,
};
use crate::raft::{Membership, MessageBody, ProgressState, Role};

#[test]
fn test_node_in_repair_grants_no_vote_or_prevote() {
    // Proves a node in repair refuses votes and pre-votes even to a candidate whose log is
    // ahead of its own, and grants again once its log holds the repaired range.
    let mut core = core_with_log(3, 3, &[1, 1], 2, test_config());
    core.begin_repair(5);
    assert_eq!(core.repair_through(), Some(5));
    core.handle_message(
        0,
        msg(
            1,
            3,
            2,
            MessageBody::PreVote {
                last_index: 9,
                last_term: 1,
            },
        ),
    );
    let r = ready(&mut core);
    let pre = r.messages.iter().find_map(|m| match m.body {
        MessageBody::PreVoteResponse { granted } => Some(granted),
        _ => None,
    });
    assert_eq!(pre, Some(false), "no pre-vote in repair");
    core.handle_message(0, vote_request(1, 3, 2, 9, 1));
    assert_eq!(
        granted(&ready(&mut core), 1),
        Some(false),
        "no vote in repair"
    );
    assert_eq!(core.vote(), None);
    // The leader of term 2 brings the log through index 5; durable, the repair ends.
    core.handle_message(0, msg(1, 3, 2, append_body(2, 1, &[2, 2, 2], 2)));
    let r = ready(&mut core);
    assert_eq!(r.entries.len(), 3);
    assert_eq!(
        core.repair_through(),
        Some(5),
        "not before the entries are durable"
    );
    core.handle_persisted(0, 5, 2);
    assert_eq!(core.repair_through(), None);
    // Past the leader's lease (check-quorum ignores vote requests within it).
    core.handle_message(10_000, vote_request(2, 3, 3, 5, 2));
    assert_eq!(granted(&ready(&mut core), 2), Some(true), "votes again");
}

#[test]
fn test_node_in_repair_never_campaigns_or_takes_timeout_now() {
    // Proves a node in repair never starts an election however long it hears no leader, and
    // ignores a leadership transfer's TimeoutNow.
    let mut core = core_with_log(2, 3, &[1], 1, test_config());
    core.begin_repair(4);
    for t in 0..100 {
        core.handle_tick(t * 100, 7);
    }
    let r = ready(&mut core);
    assert_eq!(core.role(), Role::Follower);
    assert!(
        r.messages.is_empty() && r.persisted_messages.is_empty(),
        "{r:?}"
    );
    core.handle_message(10_000, msg(1, 2, 1, MessageBody::TimeoutNow));
    assert_eq!(core.role(), Role::Follower);
    assert_eq!(core.term(), 1);
}

#[test]
fn test_repair_ends_with_a_snapshot_covering_the_range() {
    // Proves a node in repair that gets a snapshot past its repaired range (the leader
    // compacted the entries it needs) leaves repair once the snapshot is installed.
    let mut core = core_with_log(3, 3, &[1, 1], 2, test_config());
    core.begin_repair(6);
    let conf = Membership {
        voters: (1..=3).collect(),
        learners: Default::default(),
    };
    assert!(core.handle_snapshot_installed(0, 10, 1, conf));
    assert_eq!(core.repair_through(), None);
}

#[test]
fn test_repair_already_held_is_no_repair() {
    // Proves a node whose durable log already reaches the bound does not enter repair.
    let mut core = core_with_log(3, 3, &[1, 1, 1], 3, test_config());
    core.begin_repair(3);
    assert_eq!(core.repair_through(), None);
}

#[test]
fn test_follower_in_repair_reports_lost_entries_and_leader_probes_from_its_end() {
    // Proves a follower in repair answers an append past its log with LostEntries, and the
    // leader, whose match for it counted entries it lost, forgets that match and probes from
    // the follower's end (a stale match would ignore every reject of the follower: a livelock).
    let mut follower = core_with_log(2, 3, &[1, 1], 2, test_config());
    follower.begin_repair(6);
    follower.handle_message(0, msg(1, 2, 1, append_body(5, 1, &[1], 2)));
    let r = ready(&mut follower);
    let lost = r.messages.iter().find_map(|m| match m.body {
        MessageBody::LostEntries { last_index } => Some(last_index),
        _ => None,
    });
    assert_eq!(lost, Some(2));

    let mut c = cluster_with_leader(3, test_config(), 1);
    for i in 0..4 {
        c.propose(1, vec![i]).expect("leader takes it");
        c.run(3);
    }
    let matched = c.core(1).progress(2).map(|(_, m)| m).expect("a follower");
    assert!(matched >= 5, "{matched}");
    let term = c.core(1).term();
    let lost = msg(2, 1, term, MessageBody::LostEntries { last_index: 2 });
    c.core_mut(1).handle_message(0, lost);
    c.after_input(1);
    let (state, matched) = c.core(1).progress(2).expect("a follower");
    assert_eq!(
        (state, matched),
        (ProgressState::Probe, 0),
        "nothing matched"
    );
    // Node 2 lost nothing here (a stale report): the probe finds its match again.
    c.run(10);
    let (_, again) = c.core(1).progress(2).expect("a follower");
    assert!(again >= 5, "{again}");
    // A report naming the leader's own last index (the follower caught up as it said so):
    // the probe still goes out (the last entry, not an empty append past the log).
    let last = c.core(1).last_index();
    let lost = msg(2, 1, term, MessageBody::LostEntries { last_index: last });
    c.core_mut(1).handle_message(0, lost);
    c.after_input(1);
    c.run(10);
    let (_, again) = c.core(1).progress(2).expect("a follower");
    assert_eq!(again, last, "matched again without new writes");
}

#[test]
fn test_follower_in_repair_answers_a_heartbeat_without_appends_with_lost_entries() {
    // Proves a follower in repair whose leader sends only heartbeats (it believes the follower
    // caught up, from a match made before the entries were lost) says LostEntries on the next
    // heartbeat, and not while appends come.
    let mut core = core_with_log(2, 3, &[1, 1], 2, test_config());
    core.begin_repair(6);
    let beat = |commit| MessageBody::Heartbeat {
        commit,
        read_seq: 1,
    };
    let lost = |r: &crate::raft::Ready| {
        r.messages
            .iter()
            .any(|m| matches!(m.body, MessageBody::LostEntries { last_index: 2 }))
    };
    core.handle_message(0, msg(1, 2, 1, beat(6)));
    assert!(lost(&ready(&mut core)), "no append came: say it");
    assert_eq!(core.commit(), 2, "no commit from a heartbeat in repair");
    core.handle_message(10, msg(1, 2, 1, append_body(2, 1, &[1], 2)));
    let _ = ready(&mut core);
    core.handle_message(20, msg(1, 2, 1, beat(3)));
    assert!(
        !lost(&ready(&mut core)),
        "an append came since the last heartbeat"
    );
}
