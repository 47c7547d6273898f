//! The swarm's workload really does what the simulator claims: most seeds issue thousands of
//! requests, and across a few hundred seeds the clients subscribe and unsubscribe, receive
//! events, ping, resend keyed appends in flight, say key hellos and batch frames, HTTP reads
//! go through the router, and the shards take multi-request batches through
//! `Shard::handle_requests` that run into backpressure part-way (the path where a batch entry
//! point that drops the rest of its batch would lose requests).

use fabric_sim::{run, swarm, RunSummary, WorkloadStats};

const SEEDS: u64 = 200;

#[test]
fn the_swarm_workload_covers_every_request_kind() {
    // Proves each kind of traffic and each glue path the checkers rely on is exercised, and
    // that the median seed issues over a thousand requests.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let runs: Vec<RunSummary> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..SEEDS)
                        .step_by(threads as usize)
                        .map(|seed| run(seed, &swarm(seed)).unwrap_or_else(|v| panic!("{v}")))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("no panic"))
            .collect()
    });
    let mut per_seed: Vec<u64> = runs.iter().map(|r| r.workload.requests).collect();
    per_seed.sort_unstable();
    let median = per_seed[per_seed.len() / 2];
    let thousands = per_seed.iter().filter(|n| **n >= 1_000).count();
    assert!(
        median >= 1_000 && thousands * 2 > per_seed.len(),
        "median {median}, {thousands} of {} seeds with 1,000 or more",
        per_seed.len()
    );
    let mut w = WorkloadStats::default();
    for r in &runs {
        w.add(&r.workload);
    }
    let counts = [
        ("subscribes", w.subscribes),
        ("unsubscribes", w.unsubscribes),
        ("events received", w.events_received),
        ("pings", w.pings),
        ("resent keyed appends", w.hedges),
        ("key hellos", w.key_hellos),
        ("client batch frames", w.client_batches),
        ("http reads", w.http_reads),
        ("shard batches", w.shard_batches),
        (
            "shard batches past backpressure",
            w.shard_batches_past_backpressure,
        ),
    ];
    for (what, n) in counts {
        assert!(n >= SEEDS, "only {n} {what} in {SEEDS} seeds: {w:?}");
    }
    println!("{SEEDS} seeds: {w:?}, median {median} requests a seed");
}
