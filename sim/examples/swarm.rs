//! Runs a range of seeds and prints the first violations with their `SEED=` lines (`fabric sim
//! --seeds N` is the full tool; this needs no node build).
//!
//! ```text
//! cargo run --release -p fabric-sim --example swarm -- [first_seed] [count] [planted]
//! ```

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let first: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(0);
    let count: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let planted = args.get(3).cloned().unwrap_or_else(|| "none".into());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tweak = |o: &mut fabric_sim::SimOptions| {
        fabric_sim::options::planted_names::plant(&mut o.planted, &planted).expect("known bug");
    };
    let r = fabric_sim::runner::run_seeds(first, count, threads, &tweak, &|_| {});
    for v in r.first.iter().take(3) {
        println!("{v}");
    }
    println!(
        "{} seeds, {} violations {:?}; passing: {} acks, {} crashes, {} faults, {} events, {:.0} seeds/s, {:.0}x real time",
        r.seeds,
        r.violation_count(),
        r.violations,
        r.requests_acked,
        r.crashes,
        r.faults_injected,
        r.events,
        r.seeds_per_second(),
        r.speedup()
    );
    if r.violation_count() > 0 {
        std::process::exit(1);
    }
}
