//! Runs a range of seeds and prints each violation with its `SEED=` line.
//!
//! ```text
//! cargo run --release -p fabric-sim --example swarm -- [first_seed] [count] [planted]
//! ```
//! `planted` is one of `ack_before_fsync`, `skip_crc_on_recovery`, `lose_cursor_update`.
//! Set `SIM_RETENTION=1` to draw retention settings whatever `SWARM_RETENTION` says, and
//! `SIM_VERBOSE=1` to print every violation rather than the first three, and
//! `SIM_NO_RECOVERY_SYNC=1` to recover like `fabric/src/storage.rs` (no fsync unless it
//! truncates).

use fabric_shard::PlantedBugs;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let first: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(0);
    let count: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let mut planted = PlantedBugs::default();
    match args.get(3).map(String::as_str) {
        None | Some("none") => {}
        Some("ack_before_fsync") => planted.ack_before_fsync = true,
        Some("skip_crc_on_recovery") => planted.skip_crc_on_recovery = true,
        Some("lose_cursor_update") => planted.lose_cursor_update = true,
        Some(other) => {
            eprintln!("unknown planted bug {other}");
            std::process::exit(2);
        }
    }
    let started = Instant::now();
    let mut failed = 0u64;
    let mut kinds = std::collections::BTreeMap::new();
    let (mut crashes, mut faults, mut acked) = (0u64, 0u64, 0u64);
    for seed in first..first + count {
        let base = if std::env::var_os("SIM_RETENTION").is_some() {
            fabric_sim::swarm_with_retention(seed)
        } else {
            fabric_sim::swarm(seed)
        };
        let options = fabric_sim::SimOptions {
            planted,
            sync_after_recovery: std::env::var_os("SIM_NO_RECOVERY_SYNC").is_none(),
            ..base
        };
        match fabric_sim::run(seed, &options) {
            Ok(s) => {
                crashes += s.crashes;
                faults += s.faults_injected;
                acked += s.requests_acked;
            }
            Err(v) => {
                failed += 1;
                *kinds.entry(v.kind).or_insert(0u64) += 1;
                if failed <= 3 || std::env::var_os("SIM_VERBOSE").is_some() {
                    println!("{v}");
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{count} seeds, {failed} violations {kinds:?}; passing runs: {acked} acks, {crashes} crashes, {faults} faults; {:.0} seeds/s",
        count as f64 / secs
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
