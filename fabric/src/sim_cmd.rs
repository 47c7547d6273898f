//! `fabric sim`: the deterministic simulator from the command line. The simulation itself is
//! `fabric_sim`; this only parses flags, prints, and writes failing schedules to files.

use anyhow::Context;
use clap::{Args, Subcommand};
use fabric_sim::options::planted_names;
use fabric_sim::runner::{run_seeds, SwarmReport};
use fabric_sim::{Schedule, Simulation, Violation};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Run the deterministic simulator: the real shard, router and edge cores against a simulated
/// network and disks, under crashes, partitions and disk faults, with checkers.
///
/// `fabric sim --seed N` runs one seed; `fabric sim --seeds COUNT` runs many (progress bar,
/// then a summary table); `fabric sim replay FILE` runs a schedule file. A failing run prints
/// its SEED= line, the violation and the last events, writes the schedule it applied to
/// --out, and exits with status 1.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SimArgs {
    #[command(subcommand)]
    replay: Option<SimCommand>,
    /// Run this one seed.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run this many seeds, from --first.
    #[arg(long)]
    seeds: Option<u64>,
    /// First seed of --seeds.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Threads for --seeds (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Plant a known bug (proves the checkers catch it): ack_before_fsync,
    /// skip_crc_on_recovery, lose_cursor_update, cut_any_damage_in_newest_segment,
    /// no_dir_fsync_on_segment_create, trust_page_cache_after_failed_sync or
    /// no_sync_after_recovery, skip_crc_on_log_reads, forget_sealed_send_keys, or in the node's
    /// shard host: glue_drop_reply_on_full_queue,
    /// glue_restart_without_recovery, glue_no_dir_fsync_on_segment_create,
    /// glue_batch_drops_rest_under_backpressure. Only `fabric sim` can plant them; `fabric serve` never
    /// does.
    #[arg(long)]
    planted: Option<String>,
    /// Print one line per event, with simulated time (--seed only).
    #[arg(long)]
    trace: bool,
    /// Where failing runs' schedules are written.
    #[arg(long, default_value = "sim-failures")]
    out: PathBuf,
    /// Run replicated clusters (3 or 5 nodes, drawn per seed) instead of the single-node
    /// world: the node's replicated shard host under power losses, partitions and lossy node
    /// links. --planted then names a replication bug: ack_before_quorum,
    /// follower_ack_before_fsync, commit_old_term_by_count, vote_not_persisted,
    /// truncate_committed_on_conflict, no_prevote_checkquorum, read_without_quorum,
    /// repair_votes_early or members_not_persisted.
    #[arg(long)]
    cluster: bool,
}

#[derive(Subcommand)]
enum SimCommand {
    /// Run the run a schedule file describes (one a failing run wrote, or one written by hand).
    Replay {
        file: PathBuf,
        /// Print one line per event, with simulated time.
        #[arg(long)]
        trace: bool,
    },
}

/// Runs the command; `Ok(false)` when a run broke a promise.
pub fn run(args: SimArgs) -> anyhow::Result<bool> {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`fabric sim --trace | head`), instead of panicking on a failed print.
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if let Some(SimCommand::Replay { file, trace }) = args.replay {
        let schedule = Schedule::load(&file)?;
        println!(
            "replaying {} (SEED={}, {} events)",
            file.display(),
            schedule.seed,
            schedule.events.len()
        );
        return one(Simulation::from_schedule(schedule), trace, None);
    }
    if args.cluster {
        return cluster(&args);
    }
    let mut planted = fabric_shard::PlantedBugs::default();
    let mut planted_glue = fabric_router::host::PlantedGlueBugs::default();
    if let Some(name) = &args.planted {
        planted_names::plant_any(&mut planted, &mut planted_glue, name)
            .map_err(anyhow::Error::msg)?;
    }
    match (args.seed, args.seeds) {
        (Some(seed), _) => {
            let options = fabric_sim::SimOptions {
                planted,
                planted_glue,
                ..fabric_sim::swarm(seed)
            };
            println!("SEED={seed} {options}");
            one(Simulation::new(seed, options), args.trace, Some(&args.out))
        }
        (None, Some(count)) => {
            let planted = (planted, planted_glue);
            many(args.first, count, args.threads, planted, &args.out)
        }
        (None, None) => anyhow::bail!("give --seed N, --seeds COUNT, or `replay FILE`"),
    }
}

fn one(sim: Simulation, trace: bool, out: Option<&Path>) -> anyhow::Result<bool> {
    let sim = sim.keeping_last_events();
    let sim = if trace {
        sim.with_trace(|line| {
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        })
    } else {
        sim
    };
    match sim.run() {
        Ok(s) => {
            println!(
                "ok: {} simulated s, {} events, {} acks, {} crashes, {} restarts, {} faults, {} connections, {} packets lost, {} blocked, trace {:016x}",
                s.sim_ms / 1000,
                s.events,
                s.requests_acked,
                s.crashes,
                s.restarts,
                s.faults_injected,
                s.connections,
                s.net.packets_lost,
                s.net.packets_blocked,
                s.trace_hash
            );
            Ok(true)
        }
        Err(v) => {
            report_violation(&v, out)?;
            Ok(false)
        }
    }
}

fn report_violation(v: &Violation, out: Option<&Path>) -> anyhow::Result<()> {
    println!("{v}");
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("seed-{}.json", v.seed));
        v.schedule.save(&path)?;
        println!(
            "schedule written to {}; replay it with: fabric sim replay {}",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

fn many(
    first: u64,
    count: u64,
    threads: Option<usize>,
    planted: (
        fabric_shard::PlantedBugs,
        fabric_router::host::PlantedGlueBugs,
    ),
    out: &Path,
) -> anyhow::Result<bool> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let bar = indicatif::ProgressBar::new(count);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} seeds  {per_sec}  eta {eta}")
            .expect("a valid template"),
    );
    let tweak = move |o: &mut fabric_sim::SimOptions| (o.planted, o.planted_glue) = planted;
    let report = run_seeds(first, count, threads, &tweak, &|done| {
        bar.set_position(done)
    });
    bar.finish_and_clear();
    for v in &report.first {
        report_violation(v, Some(out))?;
    }
    print_table(&report, first, threads);
    Ok(report.violation_count() == 0)
}

/// Every failing seed, with its violation kind: `1335 (UnexpectedReply), 1346 (NotDelivered)`.
fn failing_seeds(r: &SwarmReport) -> String {
    if r.failing.is_empty() {
        return "none".into();
    }
    let seeds: Vec<String> = r
        .failing
        .iter()
        .map(|(seed, kind)| format!("{seed} ({kind})"))
        .collect();
    seeds.join(", ")
}

fn print_table(r: &SwarmReport, first: u64, threads: usize) {
    let rows = [
        (
            "seeds run",
            format!("{} ({}..{})", r.seeds, first, first + r.seeds),
        ),
        ("passed", r.passed.to_string()),
        (
            "violations",
            format!("{} {:?}", r.violation_count(), r.violations),
        ),
        ("failing seeds", failing_seeds(r)),
        (
            "simulated time",
            format!(
                "{:.0} s ({:.1} s a seed)",
                r.sim_ms as f64 / 1e3,
                r.sim_ms as f64 / 1e3 / r.passed.max(1) as f64
            ),
        ),
        ("events", r.events.to_string()),
        ("requests acked", r.requests_acked.to_string()),
        (
            "http reads / appends",
            format!("{} / {}", r.workload.http_reads, r.workload.http_appends),
        ),
        ("log reads from disk", r.log_reads.to_string()),
        ("crashes", r.crashes.to_string()),
        ("shard restarts", r.restarts.to_string()),
        ("faults injected", r.faults_injected.to_string()),
        ("packets lost or blocked", r.packets_lost.to_string()),
        ("connections", r.connections.to_string()),
        (
            "wall time",
            format!("{:.1} s on {threads} threads", r.wall.as_secs_f64()),
        ),
        ("seeds per second", format!("{:.1}", r.seeds_per_second())),
        ("simulated s per wall s", format!("{:.0}", r.speedup())),
    ];
    for (k, v) in rows {
        println!("{k:<24} {v}");
    }
}

/// `fabric sim --cluster`: replicated clusters, one seed or many.
fn cluster(args: &SimArgs) -> anyhow::Result<bool> {
    use fabric_sim::cluster::{
        cluster_swarm, run_cluster, run_cluster_seeds, ClusterPlanted, CLUSTER_PLANTED_NAMES,
    };
    let planted = match &args.planted {
        None => ClusterPlanted::default(),
        Some(name) => ClusterPlanted::by_name(name).ok_or_else(|| {
            anyhow::anyhow!(
                "--planted {name}: a cluster run plants one of {}",
                CLUSTER_PLANTED_NAMES.join(", ")
            )
        })?,
    };
    let (first, count) = match (args.seed, args.seeds) {
        (Some(seed), _) => {
            let mut opts = cluster_swarm(seed);
            opts.planted = planted;
            println!("SEED={seed} {opts:?}");
            return Ok(match run_cluster(seed, &opts) {
                Ok(s) => {
                    println!("ok: {s:?}");
                    true
                }
                Err(v) => {
                    println!("SEED={} {:?}: {}", v.seed, v.kind, v.message);
                    false
                }
            });
        }
        (None, Some(count)) => (args.first, count),
        (None, None) => anyhow::bail!("give --seed N or --seeds COUNT with --cluster"),
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // A core's failed assertion is a violation the report prints (with its message); the
    // default hook would also print every one of them, with a backtrace, as it happens.
    std::panic::set_hook(Box::new(|_| {}));
    let bar = indicatif::ProgressBar::new(count);
    let report = run_cluster_seeds(first, count, threads, planted, &|done| {
        bar.set_position(done)
    });
    bar.finish_and_clear();
    for v in report.failures.iter().take(8) {
        println!("SEED={} {:?}: {}", v.seed, v.kind, v.message);
    }
    let wall = report.wall.as_secs_f64().max(0.001);
    println!(
        "cluster seeds {first}..{}: {} passed, {} failed; {} acks, {} crashes, {} restarts, \
         {} partitions, {} bits flipped in synced logs, {} node-link messages, {} terms \
         with a leader; {:.1} simulated s per wall s ({:.1} s wall, {threads} threads)",
        first + count,
        report.passed,
        report.seeds - report.passed,
        report.acked,
        report.crashes,
        report.restarts,
        report.partitions,
        report.bitrots,
        report.messages,
        report.leaders,
        report.sim_ms as f64 / 1000.0 / wall,
        wall
    );
    Ok(report.failures.is_empty())
}
