//! The CI swarm, on the real cores with every fault on: a fixed range of seeds, a fresh range
//! drawn anew on every run (so CI explores instead of re-running the same seeds forever), and
//! every seed that ever failed (`sim/regression-seeds.txt`).

use fabric_sim::runner::{parse_seed_list, run_list, run_seeds, SwarmReport};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seeds of the fixed range, and of the fresh one.
const FIXED_FIRST: u64 = 10_000;
const FIXED_SEEDS: u64 = 1_000;
const FRESH_SEEDS: u64 = 1_000;
/// Set to a seed to rerun a fresh range that failed (its first seed is printed first).
const FRESH_FIRST_ENV: &str = "FABRIC_SIM_FRESH_FIRST";

fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn report_failures(what: &str, r: &SwarmReport) {
    for v in &r.first {
        eprintln!("{v}");
    }
    assert_eq!(
        r.violation_count(),
        0,
        "{what}: failing seeds {:?} (add each to sim/regression-seeds.txt)",
        r.failing
    );
}

#[test]
fn swarm_fixed_range_keeps_every_promise() {
    // Proves the cores keep their promises across a fixed range of seeds of 60 simulated
    // seconds of faults each (crashes, partitions, clogs, loss, full disks, corruption), and
    // that the swarm really injects them (a simulator that injects nothing passes trivially).
    let r = run_seeds(FIXED_FIRST, FIXED_SEEDS, threads(), &|_| {}, &|_| {});
    report_failures("fixed range", &r);
    assert!(
        r.sim_ms >= FIXED_SEEDS * 60_000,
        "simulated {} ms",
        r.sim_ms
    );
    assert!(
        r.crashes > 5 * FIXED_SEEDS
            && r.restarts > FIXED_SEEDS
            && r.faults_injected > 5 * FIXED_SEEDS
            && r.packets_lost > 10 * FIXED_SEEDS
            && r.requests_acked > 1_000 * FIXED_SEEDS,
        "{r:?}"
    );
    println!(
        "{FIXED_SEEDS} seeds: {:.1} seeds/s, {:.0} simulated s per wall s, {:?}",
        r.seeds_per_second(),
        r.speedup(),
        r.wall
    );
}

/// The first seed of this run's fresh range: from the environment, or from the clock.
fn fresh_first() -> u64 {
    if let Ok(v) = std::env::var(FRESH_FIRST_ENV) {
        return v.parse().expect("FABRIC_SIM_FRESH_FIRST is a seed");
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // Past the fixed range and the regression seeds, anywhere below 2^48.
    1_000_000 + nanos % (1 << 48)
}

#[test]
fn swarm_fresh_range_keeps_every_promise() {
    // Proves the promises hold on seeds no earlier run has tried: a range drawn from the clock
    // on every run, named first so that a failure can be rerun.
    let first = fresh_first();
    println!(
        "fresh range: seeds {first}..{} (rerun with {FRESH_FIRST_ENV}={first})",
        first + FRESH_SEEDS
    );
    eprintln!("fresh range starts at seed {first}");
    let r = run_seeds(first, FRESH_SEEDS, threads(), &|_| {}, &|_| {});
    report_failures(&format!("fresh range from {first}"), &r);
    assert_eq!(r.passed, FRESH_SEEDS);
}

#[test]
fn regression_seeds_pass() {
    // Proves every seed that ever failed (real bugs, and the simulator's own) passes now, and
    // that the list is read (a list that parses to nothing would pass trivially).
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/regression-seeds.txt");
    let text = std::fs::read_to_string(path).expect("sim/regression-seeds.txt");
    let seeds = parse_seed_list(&text).expect("a valid seed list");
    assert!(seeds.len() >= 18, "{} seeds", seeds.len());
    let r = run_list(&seeds, threads(), &|_| {}, &|_| {});
    report_failures("regression seeds", &r);
    assert_eq!(r.passed, seeds.len() as u64);
}

#[test]
fn a_seed_list_names_its_seeds_and_refuses_a_typo() {
    // Proves the regression list's format: a seed first, comments after `#`, blank lines.
    let seeds = parse_seed_list("# what\n\n7  Kind  why\n 12\n").unwrap();
    assert_eq!(seeds, vec![7, 12]);
    assert!(parse_seed_list("12x what\n").is_err());
}
