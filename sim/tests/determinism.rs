//! A seed is a complete description of a run: the same seed replays the same run (same trace
//! hash, same summary, same violation), different seeds explore different runs, and a few
//! hundred seeds of the real core pass.

use fabric_shard::PlantedBugs;
use fabric_sim::{run, swarm, SimOptions};
use std::collections::BTreeSet;

#[test]
fn the_same_seed_replays_the_same_run() {
    // Proves determinism: two runs of a seed agree on the trace hash and every counter, even
    // though the shard core's own HashMaps get a fresh random hasher on every run.
    for seed in 0..30 {
        let options = swarm(seed);
        let a = run(seed, &options).expect("passes");
        let b = run(seed, &options).expect("passes");
        assert_eq!(a, b, "seed {seed}");
        assert_eq!(swarm(seed), options, "options are a function of the seed");
    }
}

#[test]
fn a_violation_replays_identically() {
    // Proves a failing seed reproduces its failure exactly: same kind, message and trace.
    let options = SimOptions {
        planted: PlantedBugs {
            ack_before_fsync: true,
            ..PlantedBugs::default()
        },
        ..swarm(3)
    };
    let seed = (0..50)
        .find(|s| run(*s, &options).is_err())
        .expect("a failing seed");
    let a = run(seed, &options).unwrap_err();
    let b = run(seed, &options).unwrap_err();
    assert_eq!(
        (a.kind, &a.message, &a.last_events),
        (b.kind, &b.message, &b.last_events)
    );
    assert!(a.to_string().starts_with(&format!("SEED={seed} ")));
    assert!(!a.last_events.is_empty() && a.last_events.len() <= fabric_sim::TRACE_RING_LINES);
}

#[test]
fn different_seeds_explore_different_runs() {
    // Proves the seed reaches the run: a hundred seeds give a hundred distinct trace hashes,
    // also with the options held fixed (so the run's own RNG, not just the swarm, varies).
    let hashes: BTreeSet<u64> = (0..100)
        .map(|s| run(s, &swarm(s)).expect("passes").trace_hash)
        .collect();
    assert_eq!(hashes.len(), 100);
    let fixed = SimOptions::default();
    let hashes: BTreeSet<u64> = (0..100)
        .map(|s| run(s, &fixed).expect("passes").trace_hash)
        .collect();
    assert_eq!(hashes.len(), 100);
}

#[test]
fn a_hundred_seeds_pass_and_inject_faults() {
    // Proves the real core keeps its promises over a hundred seeds of the swarm, and that the swarm really
    // crashes, fails writes, acknowledges requests and spreads keys over several shards (a
    // simulator that injects nothing passes trivially).
    let (mut acked, mut crashes, mut faults, mut restarts, mut multi_shard) = (0, 0, 0, 0, 0);
    for seed in 1_000..1_100 {
        let options = swarm(seed);
        multi_shard += u32::from(options.shards > 1);
        match run(seed, &options) {
            Ok(s) => {
                acked += s.requests_acked;
                crashes += s.crashes;
                faults += s.faults_injected;
                restarts += s.restarts;
            }
            Err(v) => panic!("{v}"),
        }
    }
    assert!(
        acked > 100_000 && crashes > 1_000 && faults > 2_000 && restarts > 100 && multi_shard > 40,
        "acked {acked} crashes {crashes} faults {faults} restarts {restarts} multi {multi_shard}"
    );
}

#[test]
fn options_print_on_one_line() {
    // Proves a failing seed's options fit beside its SEED= line and name every planted bug.
    let mut o = swarm(9);
    o.planted.lose_cursor_update = true;
    let line = o.to_string();
    assert!(!line.contains('\n'));
    assert!(line.contains("planted=lose_cursor_update"));
    assert!(swarm(9).to_string().ends_with("planted=none"));
}
