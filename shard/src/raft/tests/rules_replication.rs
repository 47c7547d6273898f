//! Rules of replication: flow control (probe, replicate, snapshot), log reads, the commit
//! index, the term index, persistence reports.

use super::harness::{test_config, Cluster, STEP_MS};
use super::rules::{append_body, cluster_with_leader, core_with_log, entries, msg, ready};
use crate::raft::{MessageBody, ProgressState, ProposeError, Role};

fn appends_to(c: &Cluster, to: u64) -> Vec<Vec<crate::raft::Entry>> {
    let appends = c.sent.iter().filter(|m| m.to == to);
    appends
        .filter_map(|m| match &m.body {
            MessageBody::Append { entries, .. } => Some(entries.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn test_probe_state_one_append_in_flight() {
    // Proves a follower in probe state gets one append at a time until it answers, then moves to replicate.
    let mut c = Cluster::new(3, test_config(), 3);
    c.isolate(3);
    assert!(c.campaign(1, 50));
    assert_eq!(
        c.core(1).progress(3).map(|p| p.0),
        Some(ProgressState::Probe)
    );
    c.record_sent = true;
    for i in 0..5u8 {
        c.propose(1, vec![i]).expect("leader");
        c.run(2);
    }
    assert!(
        appends_to(&c, 3).len() <= 1,
        "{} appends while the probe is unanswered",
        appends_to(&c, 3).len()
    );
    assert!(
        appends_to(&c, 2).len() >= 5,
        "the replicating follower gets every entry"
    );
    c.heal();
    assert!(c.run_until(50, |c| c.core(1).progress(3)
        == Some((ProgressState::Replicate, c.core(1).last_index()))));
}

#[test]
fn test_replicate_state_pipelines_up_to_inflight_max() {
    // Proves a replicating follower gets several appends before answering, never more than raft_inflight_entries_max entries nor raft_append_bytes_max per append.
    let mut c = cluster_with_leader(3, test_config(), 1);
    assert_eq!(
        c.core(1).progress(2).map(|p| p.0),
        Some(ProgressState::Replicate)
    );
    c.cut_one_way(2, 1); // answers from 2 are lost
    c.record_sent = true;
    for i in 0..20u8 {
        c.propose(1, vec![i; 30]).expect("leader");
    }
    c.run(3);
    let appends = appends_to(&c, 2);
    let sent: usize = appends.iter().map(|a| a.len()).sum();
    assert!(appends.len() >= 2, "pipelined: {} appends", appends.len());
    assert_eq!(sent as u64, c.config.raft_inflight_entries_max);
    for a in &appends {
        let bytes: u64 = a.iter().map(|e| e.size_bytes()).sum();
        assert!(
            a.len() == 1 || bytes <= c.config.raft_append_bytes_max,
            "{bytes} bytes in one append"
        );
    }
}

/// A group whose follower 3 missed `n` entries that left the leader's cache.
fn lagging_follower(n: u8, config: crate::raft::RaftConfig) -> Cluster {
    let mut c = cluster_with_leader(3, config, 1);
    c.isolate(3);
    for i in 0..n {
        c.propose(1, vec![i; 8]).expect("leader");
        c.run(1);
    }
    c.run(5);
    c
}

#[test]
fn test_log_reads_serve_follower_behind_cache() {
    // Proves a follower behind the entry cache is caught up from host log reads, not a snapshot.
    let mut c = lagging_follower(40, test_config());
    c.heal();
    assert!(c.run_until(200, |c| c.core(3).commit() == c.core(1).commit()));
    assert!(c.nodes[&1].log_reads_served > 0);
    assert_eq!(c.nodes[&3].snapshots_installed, 0);
    assert_eq!(c.committed_on(3), c.committed_on(1));
}

#[test]
fn test_snapshot_when_follower_needs_compacted_entries() {
    // Proves a follower needing entries the leader compacted away gets a snapshot, then the log after it.
    let mut c = lagging_follower(40, test_config());
    let commit = c.core(1).commit();
    assert!(c.core_mut(1).compact(commit));
    c.nodes.get_mut(&1).expect("node").compacted = commit;
    c.heal();
    assert!(c.run_until(100, |c| c.nodes[&3].snapshots_installed == 1));
    c.propose(1, b"after".to_vec()).expect("leader");
    let last = c.core(1).last_index();
    assert!(c.run_until(100, |c| c.core(3).commit() == last
        && c.core(1).progress(3) == Some((ProgressState::Replicate, last))));
    assert!(
        c.checker.violations.is_empty(),
        "{:?}",
        c.checker.violations
    );
}

#[test]
fn test_log_read_compacted_starts_snapshot() {
    // Proves a log read answered `Compacted` (the host compacted first) turns into a snapshot.
    let mut c = lagging_follower(40, test_config());
    let commit = c.core(1).commit();
    c.nodes.get_mut(&1).expect("node").compacted = commit; // the core has not heard yet
    c.heal();
    assert!(c.run_until(100, |c| c.nodes[&3].snapshots_installed == 1));
    assert!(c.run_until(100, |c| c.core(3).commit() == c.core(1).commit()));
}

#[test]
fn test_snapshot_when_lag_exceeds_bytes() {
    // Proves a follower lagging more than raft_snapshot_lag_bytes_max bytes gets a snapshot instead of the log.
    let mut config = test_config();
    config.raft_snapshot_lag_bytes_max = 300;
    let mut c = lagging_follower(40, config);
    c.heal();
    assert!(c.run_until(100, |c| c.nodes[&3].snapshots_installed == 1));
    assert!(c.run_until(100, |c| c.core(3).commit() == c.core(1).commit()));
}

#[test]
fn test_commit_never_goes_back() {
    // Proves a follower's commit index only grows, whatever stale commit a message carries.
    let mut core = core_with_log(2, 3, &[1, 1, 1, 1, 1], 0, test_config());
    core.handle_message(
        0,
        msg(
            1,
            2,
            1,
            MessageBody::Heartbeat {
                commit: 5,
                read_seq: 0,
            },
        ),
    );
    assert_eq!(core.commit(), 5);
    core.handle_message(
        0,
        msg(
            1,
            2,
            1,
            MessageBody::Heartbeat {
                commit: 3,
                read_seq: 0,
            },
        ),
    );
    let append = append_body(1, 1, &[1], 2);
    core.handle_message(0, msg(1, 2, 1, append));
    assert_eq!(core.commit(), 5);
    assert_eq!(ready(&mut core).commit, Some(5));
}

#[test]
fn test_follower_commit_capped_at_matched() {
    // Proves a follower commits no further than the entries it matched with the leader.
    let mut core = core_with_log(2, 3, &[1, 1, 1], 0, test_config());
    let append = append_body(0, 0, &[1], 9);
    core.handle_message(0, msg(1, 2, 1, append));
    assert_eq!(
        core.commit(),
        1,
        "entries 2 and 3 were not matched by this append"
    );
    core.handle_message(
        0,
        msg(
            1,
            2,
            1,
            MessageBody::Heartbeat {
                commit: 9,
                read_seq: 0,
            },
        ),
    );
    assert_eq!(
        core.commit(),
        3,
        "a heartbeat's commit is capped at the log's end"
    );
}

#[test]
fn test_leader_heartbeat_commit_capped_at_follower_match() {
    // Proves the leader tells each follower a commit index no higher than what that follower matched.
    let mut c = lagging_follower(10, test_config());
    c.record_sent = true;
    c.cut.remove(&(1, 3));
    c.run(c.config.raft_heartbeat_ms / STEP_MS + 1);
    let matched = c.core(1).progress(3).expect("follower").1;
    let heartbeats = c.sent.iter().filter_map(|m| match m.body {
        MessageBody::Heartbeat { commit, .. } if m.to == 3 => Some(commit),
        _ => None,
    });
    let heartbeats: Vec<u64> = heartbeats.collect();
    assert!(!heartbeats.is_empty());
    assert!(
        heartbeats.iter().all(|&h| h <= matched),
        "{heartbeats:?} vs match {matched}"
    );
    assert!(c.core(1).commit() > matched);
}

#[test]
fn test_stale_persisted_report_ignored() {
    // Proves a persistence report for entries since cut and replaced does not count as durable.
    let mut core = core_with_log(2, 3, &[1], 1, test_config());
    let append = append_body(1, 1, &[1, 1], 1);
    core.handle_message(0, msg(1, 2, 1, append));
    let _ = ready(&mut core);
    let append = append_body(2, 1, &[2], 1);
    core.handle_message(0, msg(3, 2, 2, append));
    let r = ready(&mut core);
    assert_eq!(r.truncate_from, Some(3));
    core.handle_persisted(0, 3, 1);
    assert_eq!(core.persisted_index(), 1, "entry 3 of term 1 was replaced");
    core.handle_persisted(0, 3, 2);
    assert_eq!(core.persisted_index(), 3);
}

#[test]
fn test_propose_full_when_uncommitted_backlog_hit() {
    // Proves proposals are refused with Full once raft_uncommitted_entries_max entries are uncommitted.
    let mut c = cluster_with_leader(3, test_config(), 1);
    c.isolate(1);
    let max = c.config.raft_uncommitted_entries_max;
    let accepted = (0..2 * max)
        .take_while(|_| c.propose(1, vec![1]).is_ok())
        .count() as u64;
    assert_eq!(accepted, max);
    assert_eq!(c.propose(1, vec![1]), Err(ProposeError::Full));
}

#[test]
fn test_term_index_memory_independent_of_log_length() {
    // Proves the term index keeps one run per term, not per entry.
    let mut core = core_with_log(2, 3, &[1], 1, test_config());
    for i in 0..2000u64 {
        let term = 1 + i / 1000;
        let append = MessageBody::Append {
            prev_index: 1 + i,
            prev_term: 1 + i.saturating_sub(1) / 1000,
            entries: entries(2 + i, &[term]),
            commit: 1,
        };
        core.handle_message(0, msg(1, 2, term, append));
        let _ = ready(&mut core);
    }
    assert_eq!(core.last_index(), 2001);
    assert_eq!(core.log.run_count(), 2);
    assert_eq!((core.term_at(1001), core.term_at(1002)), (Some(1), Some(2)));
    assert_eq!(core.role(), Role::Follower);
}

#[test]
fn test_term_index_matches_a_plain_log() {
    // Proves the run-length term index answers term_at, last_term and find_conflict_by_term as a plain per-entry log would, through appends, cuts and compactions.
    use crate::raft::log::RaftLog;
    use crate::raft::tests::harness::Rng;
    for seed in 0..50 {
        let mut rng = Rng::new(seed);
        let mut log = RaftLog::new(&crate::raft::LogState::default(), 0, 300);
        let mut model: Vec<u64> = vec![0]; // model[i]: term of index i (i < base: compacted)
        let mut base = 0u64;
        for _ in 0..300 {
            match rng.below(10) {
                0..=5 => {
                    let term = log.last_term() + rng.below(2);
                    let index = log.last_index + 1;
                    let e = crate::raft::Entry {
                        index,
                        term: term.max(1),
                        kind: crate::raft::EntryKind::Normal,
                        data: vec![0; rng.below(40) as usize],
                    };
                    log.append(&[e]);
                    model.push(term.max(1));
                }
                6 if log.last_index > log.commit => {
                    let from = log.commit + 1 + rng.below(log.last_index - log.commit);
                    log.truncate(from, false);
                    model.truncate(from as usize);
                }
                7 if log.last_index > log.commit => {
                    let _ = log.take_unstable();
                    log.persist(log.last_index, log.last_term());
                    log.commit += 1 + rng.below(log.last_index - log.commit);
                }
                8 => {
                    let _ = log.take_unstable();
                    if log.compact(log.commit.min(log.persisted)) {
                        base = log.snapshot_index;
                    }
                }
                _ => {}
            }
            assert_eq!(log.last_index + 1, model.len() as u64, "seed {seed}");
            assert_eq!(log.last_term(), *model.last().expect("base"), "seed {seed}");
            for i in 0..model.len() as u64 {
                let expected = (i >= base).then(|| model[i as usize]);
                assert_eq!(log.term_at(i), expected, "seed {seed} index {i}");
            }
            let (index, term) = (rng.below(model.len() as u64 + 3), rng.below(6));
            let naive = (base..=index.min(log.last_index))
                .rev()
                .find(|&i| model[i as usize] <= term);
            let naive = naive.map_or((base, model[base as usize]), |i| (i, model[i as usize]));
            assert_eq!(log.find_conflict_by_term(index, term), naive, "seed {seed}");
        }
    }
}
