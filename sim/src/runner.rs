//! Many seeds at once: the loop behind `fabric sim --seeds N` and the CI swarm test.

use crate::{run, swarm, RunSummary, SimOptions, Violation, ViolationKind, WorkloadStats};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a range of seeds did.
#[derive(Debug, Default)]
pub struct SwarmReport {
    pub seeds: u64,
    pub passed: u64,
    pub sim_ms: u64,
    pub events: u64,
    pub requests_acked: u64,
    pub crashes: u64,
    pub restarts: u64,
    pub faults_injected: u64,
    pub packets_lost: u64,
    pub connections: u64,
    /// Disk reads of the log the shards asked for.
    pub log_reads: u64,
    pub workload: WorkloadStats,
    pub violations: BTreeMap<ViolationKind, u64>,
    /// The first violations found (lowest seeds first), at most [`VIOLATIONS_KEPT_MAX`].
    pub first: Vec<Box<Violation>>,
    /// Every failing seed with its violation kind, lowest first (at most
    /// [`FAILING_SEEDS_KEPT_MAX`]).
    pub failing: Vec<(u64, ViolationKind)>,
    pub wall: Duration,
}

/// Violations a report keeps whole.
pub const VIOLATIONS_KEPT_MAX: usize = 8;
/// Failing seeds a report lists (a broken build fails every seed; the list stays bounded).
pub const FAILING_SEEDS_KEPT_MAX: usize = 10_000;

impl SwarmReport {
    fn add(&mut self, r: Result<RunSummary, Box<Violation>>) {
        self.seeds += 1;
        match r {
            Ok(s) => {
                self.passed += 1;
                self.sim_ms += s.sim_ms;
                self.events += s.events;
                self.requests_acked += s.requests_acked;
                self.crashes += s.crashes;
                self.restarts += s.restarts;
                self.faults_injected += s.faults_injected;
                self.packets_lost += s.net.packets_lost + s.net.packets_blocked;
                self.connections += s.connections;
                self.log_reads += s.log_reads;
                self.workload.add(&s.workload);
            }
            Err(v) => {
                *self.violations.entry(v.kind).or_insert(0) += 1;
                if self.failing.len() < FAILING_SEEDS_KEPT_MAX {
                    self.failing.push((v.seed, v.kind));
                }
                self.first.push(v);
                self.first.sort_by_key(|v| v.seed);
                self.first.truncate(VIOLATIONS_KEPT_MAX);
            }
        }
    }

    pub fn violation_count(&self) -> u64 {
        self.violations.values().sum()
    }

    pub fn seeds_per_second(&self) -> f64 {
        self.seeds as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// Simulated seconds per wall second (over passing runs).
    pub fn speedup(&self) -> f64 {
        self.sim_ms as f64 / 1000.0 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Runs seeds `first..first + count` on `threads` threads, each with `swarm(seed)` changed by
/// `tweak`; `progress(done)` is called after each seed (from any thread).
pub fn run_seeds(
    first: u64,
    count: u64,
    threads: usize,
    tweak: &(dyn Fn(&mut SimOptions) + Sync),
    progress: &(dyn Fn(u64) + Sync),
) -> SwarmReport {
    let seeds: Vec<u64> = (first..first.saturating_add(count)).collect();
    run_list(&seeds, threads, tweak, progress)
}

/// Runs the seeds listed (a regression list, say), as [`run_seeds`] does a range.
pub fn run_list(
    seeds: &[u64],
    threads: usize,
    tweak: &(dyn Fn(&mut SimOptions) + Sync),
    progress: &(dyn Fn(u64) + Sync),
) -> SwarmReport {
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let report = Mutex::new(SwarmReport::default());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                while let Some(&seed) = seeds.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let mut options = swarm(seed);
                    tweak(&mut options);
                    let r = run(seed, &options);
                    report.lock().expect("no thread panics holding it").add(r);
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1);
                }
            });
        }
    });
    let mut report = report.into_inner().expect("threads joined");
    report.failing.sort_unstable();
    report.wall = started.elapsed();
    report
}

/// The seeds of a regression list: the first number of each line; `#` starts a comment
/// (what the seed found). See `sim/regression-seeds.txt`.
pub fn parse_seed_list(text: &str) -> Result<Vec<u64>, String> {
    let mut seeds = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(first) = line.split_whitespace().next() else {
            continue;
        };
        let seed = first
            .parse()
            .map_err(|_| format!("line {}: {first:?} is not a seed", i + 1))?;
        seeds.push(seed);
    }
    Ok(seeds)
}
