//! The randomized run: a 3- or 5-node group under drops, duplicates, delays, partitions
//! (one-way too), crashes that lose unsynced writes, slow fsyncs, proposals, reads and
//! leadership transfers; then healing, which must elect a leader that commits a new proposal
//! (liveness); then one follower is isolated and rejoins, which must not disrupt the leader
//! (pre-vote and check-quorum). The checker's safety properties hold throughout.
//!
//! Debugging a seed: set `ONLY_SEED` to run only that seed, and `harness::TRACE` to print each
//! seed's profile and counts, every election and the leader's flow control (constants, not
//! environment variables: core sources read no environment, their tests included).

use super::harness::{test_config, Cluster, Faults, STEP_MS};
use crate::raft::{ConfChange, EntryKind, NodeId, RaftPlanted, Role};

pub const FAULT_STEPS: u64 = 2500;

/// Runs one seed; `Err` names the first property violated.
pub fn random_run(seed: u64, planted: RaftPlanted) -> Result<(), String> {
    let (mut c, profile) = setup(seed, planted);
    let mut next_data = 0u64;
    for _ in 0..FAULT_STEPS {
        fault_step(&mut c, profile, &mut next_data);
        c.step();
        trace_leader(&c);
        if let Some(v) = c.checker.violations.first() {
            return Err(v.clone());
        }
    }
    if super::harness::TRACE {
        let conf_changes = c
            .checker
            .committed
            .iter()
            .filter(|e| e.kind == EntryKind::ConfChange);
        let snapshots: u64 = c.nodes.values().map(|n| n.snapshots_installed).sum();
        let log_reads: u64 = c.nodes.values().map(|n| n.log_reads_served).sum();
        eprintln!(
            "seed {seed}: leaders {} double votes {} old-term commits {} committed {} conf changes {} \
             snapshots {snapshots} log reads {log_reads} {profile:?} {:?}",
            c.checker.leaders.len(),
            c.checker.double_votes,
            c.checker.old_term_commits,
            c.checker.committed.len(),
            conf_changes.count(),
            c.faults
        );
    }
    liveness(&mut c, &mut next_data)?;
    stability(&mut c)?;
    c.checker
        .violations
        .first()
        .map_or(Ok(()), |v| Err(v.clone()))
}

/// The seed's cluster and fault profile: group size, message size limits, fault rates,
/// whether membership changes.
fn setup(seed: u64, planted: RaftPlanted) -> (Cluster, Profile) {
    let mut config = test_config();
    config.planted = planted;
    let mut rng = super::harness::Rng::new(seed.wrapping_mul(31).wrapping_add(7));
    let n = if rng.percent(50) { 3 } else { 5 };
    config.raft_append_bytes_max = [48, 200, 1000][rng.below(3) as usize];
    config.raft_inflight_entries_max = 1 + rng.below(8);
    config.raft_snapshot_lag_bytes_max = [u64::MAX, 1500][rng.below(2) as usize];
    let mut profile = Profile {
        crash_per_mille: 2 + rng.below(30),
        partition_per_mille: 2 + rng.below(15),
        conf_changes: false,
    };
    let faults = Faults {
        drop_pct: rng.below(10),
        dup_pct: rng.below(5),
        delay_steps_max: rng.below(8),
        fsync_pct: 20 + rng.below(80),
        jitter_spread: [0, 0, 20, 60][rng.below(4) as usize],
        reboot_after_vote_pct: rng.below(50),
        isolate_new_leader_pct: rng.below(40),
        isolate_after_commit_pct: rng.below(10),
    };
    let mut c = Cluster::new(n, config.clone(), seed);
    if rng.percent(50) {
        // Membership changes: two spare nodes may be added as learners, promoted, removed.
        profile.conf_changes = true;
        c = Cluster::with_membership(c.initial.clone(), &[n + 1, n + 2], config, seed);
    }
    c.faults = faults;
    (c, profile)
}

/// With `harness::TRACE` on, prints the leader's flow control every 100 simulated ms.
fn trace_leader(c: &Cluster) {
    if !super::harness::TRACE || !c.now_ms.is_multiple_of(100) {
        return;
    }
    if let Some(l) = c.leader() {
        let k = c.core(l);
        let (term, commit, persisted) = (k.term(), k.commit(), k.persisted_index());
        eprintln!(
            "{} L{l} t{term} c{commit} p{persisted} last{} {:?} cut {:?}",
            c.now_ms,
            k.last_index(),
            k.progress,
            c.cut
        );
    }
}

#[derive(Debug, Clone, Copy)]
struct Profile {
    crash_per_mille: u64,
    partition_per_mille: u64,
    conf_changes: bool,
}

/// Random inputs and faults for one step.
fn fault_step(c: &mut Cluster, p: Profile, next_data: &mut u64) {
    let ids: Vec<NodeId> = c.nodes.keys().copied().collect();
    let n = ids.len() as u64;
    // Any node that thinks it leads takes requests, stale leaders too: divergent logs.
    let leaders: Vec<NodeId> = ids
        .iter()
        .copied()
        .filter(|&id| c.is_up(id) && c.core(id).role() == Role::Leader)
        .collect();
    if !leaders.is_empty() {
        let leader = leaders[c.rng.below(leaders.len() as u64) as usize];
        if c.rng.percent(30) {
            *next_data += 1;
            let _ = c.propose(leader, next_data.to_le_bytes().to_vec());
        }
        if c.rng.percent(5) {
            *next_data += 1;
            c.read_index(leader, *next_data);
        }
        if p.conf_changes && c.rng.percent(2) {
            conf_change(c, leader);
        }
        if c.rng.percent(1) {
            let to = 1 + c.rng.below(n);
            let now = c.now_ms;
            let _ = c.core_mut(leader).transfer_leadership(now, to);
            c.after_input(leader);
        }
    }
    if c.rng.percent(1) {
        let id = ids[c.rng.below(n) as usize];
        c.compact(id); // followers that lag behind it need a snapshot now
    }
    // Faults hit the leader half the time: leader churn is where elections go wrong.
    let node = match c.leader() {
        Some(l) if c.rng.percent(50) => l,
        _ => ids[c.rng.below(n) as usize],
    };
    if c.rng.below(1000) < p.crash_per_mille {
        match c.rng.below(3) {
            0 if c.is_up(node) => c.crash(node),
            // A process restart: unsynced writes are lost, the node is back at once.
            1 if c.is_up(node) => {
                c.crash(node);
                c.restart(node);
            }
            _ => {}
        }
    }
    if !c.is_up(node) && c.rng.percent(5) {
        c.restart(node);
    }
    if c.rng.below(1000) < p.partition_per_mille {
        match c.rng.below(5) {
            0 | 4 => c.heal(),
            1 => c.isolate(node),
            2 => {
                let side: Vec<NodeId> = ids.iter().copied().filter(|_| c.rng.percent(50)).collect();
                c.partition(&side);
            }
            _ => {
                let other = ids[c.rng.below(n) as usize];
                c.cut.insert((node, other)); // one way: node no longer reaches other
            }
        }
    }
}

/// A random single-server change at `leader`, keeping at least three voters.
fn conf_change(c: &mut Cluster, leader: NodeId) {
    let conf = c.core(leader).membership().clone();
    let ids: Vec<NodeId> = c.nodes.keys().copied().collect();
    let pick = ids[c.rng.below(ids.len() as u64) as usize];
    let cc = if conf.learners.contains(&pick) {
        if c.rng.percent(70) {
            ConfChange::PromoteLearner(pick)
        } else {
            ConfChange::RemoveNode(pick)
        }
    } else if conf.voters.contains(&pick) {
        if conf.voters.len() <= 3 {
            return;
        }
        ConfChange::RemoveNode(pick)
    } else {
        ConfChange::AddLearner(pick)
    };
    let _ = c.propose_conf_change(leader, cc);
}

/// After healing every fault, a leader is elected and a new proposal commits on every node.
fn liveness(c: &mut Cluster, next_data: &mut u64) -> Result<(), String> {
    let n = c.nodes.len() as u64;
    c.heal();
    c.faults = Faults {
        jitter_spread: 0,
        ..Faults::default()
    };
    for id in 1..=n {
        if !c.is_up(id) {
            c.restart(id);
        }
        c.complete_writes(id);
    }
    let steps_max = 20 * c.config.raft_election_timeout_ms / STEP_MS;
    for _ in 0..5 {
        let elected = c.run_until(steps_max, |c| {
            c.leader()
                .is_some_and(|l| c.core(l).term_at(c.core(l).commit()) == Some(c.core(l).term()))
        });
        let Some(leader) = c.leader().filter(|_| elected) else {
            dump(c, n);
            return Err(format!(
                "liveness: no leader {steps_max} steps after healing"
            ));
        };
        *next_data += 1;
        let marker = next_data.to_le_bytes().to_vec();
        let index = match c.propose(leader, marker.clone()) {
            Ok(index) => index,
            Err(e) => {
                let _ = e; // a transfer in flight, or the leader just stepped down: retry
                c.run(steps_max);
                continue;
            }
        };
        // Every member of the leader's committed configuration (removed nodes are not).
        let conf = c.core(leader).committed_membership().clone();
        let members: Vec<NodeId> = conf
            .voters
            .iter()
            .chain(conf.learners.iter())
            .copied()
            .collect();
        let committed = c.run_until(steps_max, |c| {
            members.iter().all(|&id| {
                c.committed_on(id)
                    .get(index as usize - 1)
                    .is_some_and(|e| e.data == marker)
            })
        });
        if committed {
            return Ok(());
        }
    }
    dump(c, n);
    Err("liveness: a proposal made after healing never committed on every node".to_string())
}

/// With `harness::TRACE` on, prints every node's state (for a failing seed).
fn dump(c: &Cluster, n: u64) {
    if !super::harness::TRACE {
        return;
    }
    for id in (1..=n).filter(|&id| c.is_up(id)) {
        let k = c.core(id);
        let (role, term, commit, snap) = (k.role(), k.term(), k.commit(), k.log.snapshot_index);
        eprintln!(
            "node {id}: {role:?} t{term} c{commit} snap {snap} last {} {:?}",
            k.last_index(),
            k.progress
        );
    }
}

/// A follower cut off for several election timeouts rejoins without deposing the leader.
fn stability(c: &mut Cluster) -> Result<(), String> {
    let Some(leader) = c.leader() else {
        return Err("liveness: no leader after healing".into());
    };
    let term = c.core(leader).term();
    let voters = c.core(leader).committed_membership().voters.clone();
    let follower = voters
        .into_iter()
        .find(|&id| id != leader)
        .expect("3 voters or more");
    c.isolate(follower);
    c.run(4 * c.config.raft_election_timeout_ms / STEP_MS);
    c.heal();
    c.run(4 * c.config.raft_election_timeout_ms / STEP_MS);
    let now = c.leader();
    if now != Some(leader)
        || c.core(leader).term() != term
        || c.core(follower).role() != Role::Follower
    {
        let t = now.map(|l| c.core(l).term());
        return Err(format!(
            "stability: rejoining node {follower} disrupted leader {leader} of term {term} (now {now:?} in term {t:?})"
        ));
    }
    Ok(())
}

pub const SEEDS: u64 = 200;
/// Set to run one seed only (debugging it, with `harness::TRACE`).
const ONLY_SEED: Option<u64> = None;

#[test]
fn test_random_safety_and_liveness() {
    // Proves every safety property, liveness after healing and leader stability hold on 200 seeds.
    let seeds = ONLY_SEED.map_or(0..SEEDS, |s| s..s + 1);
    for seed in seeds.clone() {
        if let Err(v) = random_run(seed, RaftPlanted::default()) {
            panic!("seed {seed}: {v}");
        }
    }
    eprintln!("{} seeds x {FAULT_STEPS} fault steps", seeds.count());
}

/// The first seed in `0..seeds_max` on which the planted bug violates a property.
fn first_catch(planted: RaftPlanted, seeds_max: u64) -> Option<(u64, String)> {
    (0..seeds_max).find_map(|seed| random_run(seed, planted).err().map(|v| (seed, v)))
}

fn assert_caught(planted: RaftPlanted, property: &str) {
    let Some((seed, v)) = first_catch(planted, 400) else {
        panic!("{planted:?} survived 400 seeds")
    };
    eprintln!("{planted:?}: seed {seed}: {v}");
    assert!(
        v.starts_with(property),
        "seed {seed}: expected {property}, got {v}"
    );
}

#[test]
fn test_planted_commit_old_term_by_count_is_caught() {
    // Proves the checker catches a leader committing an old term's entry by counting (Figure 8).
    let planted = RaftPlanted {
        commit_old_term_by_count: true,
        ..Default::default()
    };
    let Some((seed, v)) = first_catch(planted, 400) else {
        panic!("survived 400 seeds")
    };
    eprintln!("commit_old_term_by_count: seed {seed}: {v}");
    assert!(
        v.starts_with("committed prefix") || v.starts_with("leader completeness"),
        "seed {seed}: {v}"
    );
}

#[test]
fn test_planted_vote_not_persisted_is_caught() {
    // Proves the checker catches a node that votes twice in a term after losing an unpersisted vote.
    assert_caught(
        RaftPlanted {
            vote_not_persisted: true,
            ..Default::default()
        },
        "election safety",
    );
}

#[test]
fn test_planted_truncate_committed_on_conflict_is_caught() {
    // Proves the checker catches a follower that cuts committed entries on a stale append.
    let planted = RaftPlanted {
        truncate_committed_on_conflict: true,
        ..Default::default()
    };
    let Some((seed, v)) = first_catch(planted, 400) else {
        panic!("survived 400 seeds")
    };
    eprintln!("truncate_committed_on_conflict: seed {seed}: {v}");
    assert!(
        v.starts_with("committed prefix") || v.starts_with("commit monotonic"),
        "seed {seed}: {v}"
    );
}

#[test]
fn test_planted_no_prevote_checkquorum_is_caught() {
    // Proves the checker catches a rejoining node deposing a healthy leader without pre-vote.
    assert_caught(
        RaftPlanted {
            no_prevote_checkquorum: true,
            ..Default::default()
        },
        "stability",
    );
}
