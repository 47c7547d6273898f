//! `fabric-bench`: load scenarios against an in-process or remote Fabric node.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fabric::config::Durability;
use fabric_bench::pipelined::{self, Driver, Options};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "fabric-bench", about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// C connections each keep D durable conversation appends in flight; reports acked
    /// appends/s and ack latency percentiles, beside an fsync probe of the data dir's disk.
    Pipelined(PipelinedArgs),
    /// Writes N conversation appends through the real shard core into real segment files,
    /// then times the recovery a node runs at start (read, scan with CRC checks, rebuild).
    Recovery(RecoveryArgs),
}

#[derive(Args)]
struct RecoveryArgs {
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    #[arg(long, default_value_t = 128)]
    body_bytes: usize,
    /// Conversations the records are spread over.
    #[arg(long, default_value_t = 1000)]
    conversations: u64,
    /// Parent directory of the temp WAL dir (the disk under test). Default: the system temp dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct PipelinedArgs {
    /// HTTP base URL of a running node (e.g. http://127.0.0.1:7400). Default: start a node
    /// in-process on a fresh temp data dir.
    #[arg(long)]
    target: Option<String>,
    /// Admin token of the --target node.
    #[arg(long, env = "FABRIC_ADMIN_TOKEN")]
    admin_token: Option<String>,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Appends in flight per connection.
    #[arg(long, default_value_t = 256)]
    depth: usize,
    #[arg(long, default_value_t = 128)]
    body_bytes: usize,
    /// Measured time, after the warm-up. Keep it short: the disk throttles after a few GB.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    #[arg(long, default_value_t = 1500)]
    warmup_ms: u64,
    /// Binary (postcard) frames instead of JSON.
    #[arg(long)]
    binary: bool,
    /// `raw` drives the protocol with the codec; `client` goes through fabric::client::Client.
    #[arg(long, value_enum, default_value_t = Driver::Raw)]
    driver: Driver,
    /// Write every figure to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A tiny run (2 connections, 1 s) that proves the scenario works.
    #[arg(long)]
    smoke: bool,
    /// Parent directory of the temp data dir (the disk under test). Default: the system temp dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// fsync probe length in ms (0 skips it).
    #[arg(long, default_value_t = 2000)]
    probe_ms: u64,
    /// In-process node: shard count (default: one per core).
    #[arg(long)]
    shards: Option<u32>,
    /// In-process node: `none` skips fdatasync, to see what durability costs.
    #[arg(long, value_enum, default_value_t = Durability::Fsync)]
    durability: Durability,
    /// In-process node: per-shard WAL size above which retention deletes old segments.
    #[arg(long)]
    retention_bytes_max: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FABRIC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Recovery(a) => {
            let dir = match &a.data_dir {
                Some(d) => tempfile::tempdir_in(d)?,
                None => tempfile::tempdir()?,
            };
            let f =
                fabric_bench::recovery::run(dir.path(), a.records, a.body_bytes, a.conversations)
                    .context("recovery scenario failed")?;
            println!(
                "recovery: {} records ({} conversations, {}-byte bodies), {:.1} MB in {} segments",
                f.records,
                a.conversations,
                a.body_bytes,
                f.wal_bytes as f64 / 1e6,
                f.segments
            );
            println!(
                "  write (no fsync)      {:>8.2} s",
                f.write_duration.as_secs_f64()
            );
            println!(
                "  recovery              {:>8.2} s  ({:.0} records/s, {:.0} MB/s)",
                f.recovery_duration.as_secs_f64(),
                f.records as f64 / f.recovery_duration.as_secs_f64(),
                f.wal_bytes as f64 / 1e6 / f.recovery_duration.as_secs_f64()
            );
        }
        Scenario::Pipelined(a) => {
            let opts = if a.smoke {
                Options {
                    target: a.target,
                    admin_token: a.admin_token,
                    binary: a.binary,
                    driver: a.driver,
                    data_dir: a.data_dir,
                    durability: a.durability,
                    shards: a.shards,
                    retention_bytes_max: a.retention_bytes_max,
                    ..Options::smoke()
                }
            } else {
                Options {
                    target: a.target,
                    admin_token: a.admin_token,
                    connections: a.connections,
                    depth: a.depth,
                    body_bytes: a.body_bytes,
                    duration: Duration::from_secs(a.duration_secs),
                    warmup: Duration::from_millis(a.warmup_ms),
                    binary: a.binary,
                    driver: a.driver,
                    data_dir: a.data_dir,
                    probe: Duration::from_millis(a.probe_ms),
                    shards: a.shards,
                    durability: a.durability,
                    retention_bytes_max: a.retention_bytes_max,
                }
            };
            let report = pipelined::run(&opts).context("pipelined scenario failed")?;
            print!("{}", report.table());
            if let Some(path) = a.json {
                let text = serde_json::to_string_pretty(&report.to_json())?;
                std::fs::write(&path, text + "\n")
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            anyhow::ensure!(
                report.seqs_dense,
                "acked seqs were not dense per conversation"
            );
        }
    }
    Ok(())
}
