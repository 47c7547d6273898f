//! `fabric-bench`: load scenarios against an in-process or remote Fabric node, optionally
//! side by side with NATS JetStream (`--vs nats`).

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use fabric::config::Durability;
use fabric_bench::chart::{Point, Series};
use fabric_bench::nats::{NatsServer, Policy};
use fabric_bench::pipelined::{self, Driver, Mode};
use fabric_bench::report::{self, Report};
use fabric_bench::setup::{NodeOptions, Transport};
use fabric_bench::{catchup, connections, failover, fanout, mesh, replay};
use std::path::PathBuf;
use std::time::Duration;

/// The same allocator as the `fabric` binary, so an in-process node runs as a real one does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// fsync probe length of `--smoke` runs.
const SMOKE_PROBE_MS: u64 = 200;

#[derive(Parser)]
#[command(name = "fabric-bench", about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// C connections each send one batch of B appends, wait for every ack, repeat (TopGun's
    /// mode); ops/s and batch round-trip percentiles.
    FireAndWait(LoadArgs),
    /// C connections each keep D durable appends in flight, N per frame; acked appends/s and
    /// ack latency percentiles.
    Pipelined(LoadArgs),
    /// P peers x M direct messages to random peers: send->ack, send->deliver, delivered
    /// ratio, server peak RSS and FDs.
    Mesh(MeshArgs),
    /// One sender, N subscribers of a group or `*`: deliveries/s, publish->deliver latency.
    Fanout(FanoutArgs),
    /// Readers replay conversations from seq 1 while appends continue: replay events/s and
    /// write latency alone and during replay.
    Replay(ReplayArgs),
    /// K idle authenticated sessions: time to connect all, RSS per session.
    Connections(ConnectionsArgs),
    /// (Internal) a node for `--node-process`: serves on a free loopback port until stdin
    /// closes; prints `fabric-bench-node ADDR TOKEN` once it listens.
    #[command(hide = true)]
    ServeNode(ServeNodeArgs),
    /// Writes N conversation appends through the real shard core into real segment files,
    /// then times the recovery a node runs at start (read, scan with CRC checks, rebuild).
    Recovery(RecoveryArgs),
    /// A 3-node cluster (one shard) under one keyed writer: SIGKILL the shard's leader N
    /// times; kill-to-first-ok percentiles, and every acknowledged write read back from every
    /// replica (exits non-zero if one is lost).
    Failover(FailoverArgs),
    /// A 3-node cluster (one shard, small retention): SIGKILL a follower, write past the
    /// leaders' retained log, restart it while a writer goes on; the time until its replica
    /// holds the heads of the restart (via a snapshot), and the tail it must hold after.
    Catchup(CatchupArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Versus {
    Nats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SweepOf {
    Connections,
    Depth,
}

/// Flags every load scenario has.
#[derive(Args, Clone)]
struct Common {
    /// HTTP base URL of a running node (e.g. http://127.0.0.1:7400). Default: start a node
    /// in-process on a fresh temp data dir.
    #[arg(long)]
    target: Option<String>,
    /// Admin token of the --target node.
    #[arg(long, env = "FABRIC_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// PID of the --target node, to sample its CPU, RSS and open FDs from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// QUIC URL of the --target node, `quic://host:port?pin=SHA256` (the fingerprint
    /// `fabric serve` prints), for `--transport quic`.
    #[arg(long)]
    quic_url: Option<String>,
    #[arg(long, value_enum, default_value_t = Transport::WsJson)]
    transport: Transport,
    /// Same as `--transport ws-binary`.
    #[arg(long)]
    binary: bool,
    /// In-process node: `none` skips fdatasync, to see what durability costs.
    #[arg(long, value_enum, default_value_t = Durability::Fsync)]
    durability: Durability,
    /// Parent directory of the temp data dirs (the disk under test). Default: system temp dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// fsync probe length in ms before each run (0 skips it).
    #[arg(long, default_value_t = 2000)]
    probe_ms: u64,
    /// In-process node: shard count (default: one per core).
    #[arg(long)]
    shards: Option<u32>,
    /// In-process node: per-shard WAL size above which retention deletes old segments.
    #[arg(long)]
    retention_bytes_max: Option<u64>,
    /// Run the bench's node in a child process instead of in-process (server CPU, RSS and
    /// FDs are then the server's alone).
    #[arg(long)]
    node_process: bool,
    /// Run a replicated cluster of this many nodes (1, 3 or 5) instead of one node: the
    /// bench writes it (`fabric cluster init`) into its temp dir, runs each node in a child
    /// process, and spreads its connections over the nodes (WebSocket transports). With
    /// `--vs nats`, NATS runs as a JetStream cluster of as many servers, streams replicated
    /// on each, connections spread the same way.
    #[arg(long)]
    cluster: Option<u32>,
    /// `--transport quic`: the load generator's sessions share one UDP socket and endpoint
    /// driver (as in one process hosting many agents) instead of one each.
    #[arg(long)]
    quic_shared_endpoint: bool,
    /// Server ops per frame the load generator's sessions ask for (`options` with `batch`,
    /// as the Rust client does); 0 or 1: one op per frame.
    #[arg(long, default_value_t = fabric_bench::wire::BATCH_OPS_IN_DEFAULT)]
    batch_in: u32,
    /// Write every figure of every run to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Compare with bench/baseline.json (or --baseline) and report regressions beyond 20%
    /// (informational: the exit code stays 0).
    #[arg(long)]
    check_baseline: bool,
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/baseline.json"))]
    baseline: PathBuf,
    /// Run the same scenario against NATS JetStream too (pipelined, fire-and-wait, fanout, mesh).
    #[arg(long, value_enum)]
    vs: Option<Versus>,
    /// nats-server binary (default: .venv-bench/bin/nats-server, then PATH; 2.10 or newer).
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// A/B rounds: each round runs Fabric, then NATS default, then NATS sync_interval always;
    /// comparisons use each figure's median over the rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Comma-separated values of the swept parameter (see --sweep-of); one run set per value.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<usize>,
    /// pipelined / fire-and-wait: sweep connections or depth (other scenarios sweep their
    /// count: peers, subscribers, sessions, writers).
    #[arg(long, value_enum, default_value_t = SweepOf::Connections)]
    sweep_of: SweepOf,
    /// Draw throughput and p99 against the swept values into this SVG file.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// A tiny run that proves the scenario works.
    #[arg(long)]
    smoke: bool,
}

impl Common {
    fn node(&self) -> NodeOptions {
        NodeOptions {
            target: self.target.clone(),
            admin_token: self.admin_token.clone(),
            server_pid: self.server_pid,
            quic_url: self.quic_url.clone(),
            data_dir: self.data_dir.clone(),
            probe: Duration::from_millis(self.probe_ms),
            shards: self.shards,
            durability: self.durability,
            retention_bytes_max: self.retention_bytes_max,
            node_process: self.node_process,
            cluster: self.cluster,
            quic_shared_endpoint: self.quic_shared_endpoint,
            batch_in: self.batch_in,
            ws_tls: self.transport().wss(),
        }
    }

    /// The node options, with the short probe of a smoke run.
    fn node_opts(&self) -> NodeOptions {
        let mut n = self.node();
        if self.smoke {
            n.probe = Duration::from_millis(SMOKE_PROBE_MS);
        }
        n
    }

    fn transport(&self) -> Transport {
        if self.binary {
            Transport::WsBinary
        } else {
            self.transport
        }
    }
}

#[derive(Args, Clone)]
struct LoadArgs {
    #[command(flatten)]
    common: Common,
    /// Default: 64 (pipelined), 200 (fire-and-wait).
    #[arg(long)]
    connections: Option<usize>,
    /// Appends in flight per connection (fire-and-wait: the batch B). Default 5 (pipelined),
    /// 256 with --deep, 10 (fire-and-wait).
    #[arg(long)]
    depth: Option<usize>,
    /// pipelined: the deep mode, 256 appends in flight per connection.
    #[arg(long)]
    deep: bool,
    /// Appends per frame (1 to 1024): client-side batching. Default 1 (pipelined), 10
    /// (fire-and-wait: the whole batch in one frame).
    #[arg(long)]
    batch: Option<usize>,
    /// fire-and-wait: mean pause between a batch's last ack and the next batch, drawn per
    /// pause from half to one and a half times it (TopGun's harness sleeps 50 ms; 40 lets
    /// 200 x 10 offer 50,000 ops/s). 0: a closed loop. pipelined: ignored.
    #[arg(long, default_value_t = 40)]
    interval_ms: u64,
    /// fire-and-wait: every pause exactly --interval-ms (TopGun's loop), which locks the
    /// connections acked in one group commit into sending again in the same instant.
    #[arg(long)]
    interval_fixed: bool,
    #[arg(long, default_value_t = 128)]
    body_bytes: usize,
    /// Measured time, after the warm-up. Keep it short: the disk throttles after a few GB.
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
    #[arg(long, default_value_t = 1500)]
    warmup_ms: u64,
    /// `raw` drives the protocol with the codec; `client` goes through fabric::client::Client.
    #[arg(long, value_enum, default_value_t = Driver::Raw)]
    driver: Driver,
}

#[derive(Args, Clone)]
struct MeshArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 100)]
    peers: usize,
    /// Direct messages each peer sends.
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    /// Sends in flight per peer.
    #[arg(long, default_value_t = 32)]
    depth: usize,
    #[arg(long, default_value_t = 128)]
    body_bytes: usize,
    /// The run must finish within this.
    #[arg(long, default_value_t = 120)]
    duration_secs_max: u64,
}

#[derive(Args, Clone)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Sends in flight.
    #[arg(long, default_value_t = 64)]
    depth: usize,
    #[arg(long, default_value_t = 128)]
    body_bytes: usize,
    #[arg(long, value_enum, default_value_t = fanout::FanTo::Group)]
    to: fanout::FanTo,
    #[arg(long, default_value_t = 120)]
    duration_secs_max: u64,
}

#[derive(Args, Clone)]
struct ReplayArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Entries preloaded into each reader's conversation.
    #[arg(long, default_value_t = 20_000)]
    entries: u64,
    #[arg(long, default_value_t = 16)]
    writers: usize,
    #[arg(long, default_value_t = 32)]
    depth: usize,
    #[arg(long, default_value_t = 128)]
    body_bytes: usize,
    /// Each of the two windows (writers alone, then with replay).
    #[arg(long, default_value_t = 3)]
    duration_secs: u64,
}

#[derive(Args, Clone)]
struct ConnectionsArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 128)]
    connect_inflight: usize,
}

#[derive(Args)]
struct ServeNodeArgs {
    #[arg(long, required_unless_present = "config")]
    data_dir: Option<PathBuf>,
    /// A node config file (a cluster member's, from `fabric cluster init`) instead of the
    /// other flags.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Durability::Fsync)]
    durability: Durability,
    #[arg(long)]
    shards: Option<u32>,
    #[arg(long)]
    retention_bytes_max: Option<u64>,
    #[arg(long)]
    ws_tls: bool,
}

#[derive(Args, Clone)]
struct FailoverArgs {
    #[command(flatten)]
    common: Common,
    /// Leader kills.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Pause after the cluster is ready again, before the next kill.
    #[arg(long, default_value_t = 1000)]
    pause_ms: u64,
    /// One write attempt's HTTP timeout; a failed attempt is retried (same key) on the next node.
    #[arg(long, default_value_t = 500)]
    attempt_timeout_ms: u64,
    /// Pause between one acknowledged write and the next.
    #[arg(long, default_value_t = 10)]
    write_interval_ms: u64,
    /// Bound of every wait of a round (a leader, the first ok after the kill, one write).
    #[arg(long, default_value_t = 30)]
    round_timeout_secs: u64,
}

#[derive(Args, Clone)]
struct CatchupArgs {
    #[command(flatten)]
    common: Common,
    /// Per-shard WAL every node retains (`retention_bytes_max`; segments of a quarter of it).
    #[arg(long, default_value_t = 64)]
    retention_mib: u64,
    /// WAL segment size (`wal_segment_bytes_max`); default a quarter of --retention-mib.
    #[arg(long)]
    segment_mib: Option<u64>,
    /// The catch-up wait gives up once the run wrote this much to disk.
    #[arg(long, default_value_t = 900)]
    write_budget_mib: u64,
    /// Appended body bytes written while the follower is down.
    #[arg(long, default_value_t = 256)]
    behind_mib: u64,
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Bulk writer sessions (spread over the two live nodes).
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Appends in flight per bulk writer.
    #[arg(long, default_value_t = 64)]
    depth: usize,
    /// Appends per second of the writer that goes on while the follower catches up.
    #[arg(long, default_value_t = 1000)]
    tail_rate: u64,
    /// Bound of every wait (the bulk writes, the catch-up, the final check).
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// The catch-up target the report checks.
    #[arg(long, default_value_t = 30)]
    target_secs: u64,
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

/// What a scenario needs from the driver loop below.
trait Run {
    fn common(&self) -> &Common;
    /// Runs Fabric with the swept value applied.
    fn fabric(&self, sweep: Option<usize>) -> anyhow::Result<Report>;
    /// Runs NATS with the swept value applied, if the scenario has a NATS side.
    fn nats(
        &self,
        _server: &NatsServer,
        _rt: &tokio::runtime::Runtime,
        _sweep: Option<usize>,
    ) -> Option<anyhow::Result<Report>> {
        None
    }
    /// (x-axis label, throughput figure, p99 figure) for charts.
    fn chart_keys(&self) -> (&'static str, &'static str, &'static str);
}

impl LoadArgs {
    fn options(&self, mode: Mode, sweep: Option<usize>) -> pipelined::Options {
        let c = &self.common;
        let base = match mode {
            Mode::Pipelined => pipelined::Options::default(),
            Mode::FireAndWait => pipelined::Options::fire_and_wait(),
        };
        let mut o = if c.smoke {
            pipelined::Options {
                mode,
                ..pipelined::Options::smoke()
            }
        } else {
            pipelined::Options {
                connections: self.connections.unwrap_or(base.connections),
                depth: self
                    .depth
                    .unwrap_or(if self.deep && mode == Mode::Pipelined {
                        pipelined::PIPELINED_DEPTH_DEEP
                    } else {
                        base.depth
                    }),
                interval: match mode {
                    Mode::FireAndWait => Duration::from_millis(self.interval_ms),
                    Mode::Pipelined => Duration::ZERO,
                },
                interval_fixed: self.interval_fixed,
                batch: self.batch.unwrap_or(base.batch),
                body_bytes: self.body_bytes,
                duration: Duration::from_secs(self.duration_secs),
                warmup: Duration::from_millis(self.warmup_ms),
                ..base
            }
        };
        o.node = NodeOptions {
            probe: if c.smoke {
                o.node.probe
            } else {
                c.node().probe
            },
            ..c.node()
        };
        o.transport = c.transport();
        o.driver = self.driver;
        if let Some(v) = sweep {
            match c.sweep_of {
                SweepOf::Connections => o.connections = v,
                SweepOf::Depth => o.depth = v,
            }
        }
        if mode == Mode::FireAndWait {
            o.batch = o.batch.min(o.depth);
        }
        o
    }
}

struct LoadRun(LoadArgs, Mode);

impl Run for LoadRun {
    fn common(&self) -> &Common {
        &self.0.common
    }

    fn fabric(&self, sweep: Option<usize>) -> anyhow::Result<Report> {
        let r = pipelined::run(&self.0.options(self.1, sweep))
            .with_context(|| format!("{} scenario failed", self.1.name()))?;
        anyhow::ensure!(r.seqs_dense, "acked seqs were not dense per conversation");
        Ok(r.figures())
    }

    fn nats(
        &self,
        server: &NatsServer,
        rt: &tokio::runtime::Runtime,
        sweep: Option<usize>,
    ) -> Option<anyhow::Result<Report>> {
        if self.1 == Mode::FireAndWait {
            return None;
        }
        let o = self.0.options(self.1, sweep);
        Some(
            rt.block_on(fabric_bench::nats::pipelined(server, &o))
                .map_err(Into::into),
        )
    }

    fn chart_keys(&self) -> (&'static str, &'static str, &'static str) {
        let x = match self.0.common.sweep_of {
            SweepOf::Connections => "connections",
            SweepOf::Depth => "depth",
        };
        match self.1 {
            Mode::Pipelined => (x, "msgs_per_sec", "ack_p99_us"),
            Mode::FireAndWait => (x, "msgs_per_sec", "round_trip_p99_us"),
        }
    }
}

impl MeshArgs {
    fn options(&self, sweep: Option<usize>) -> mesh::Options {
        let c = &self.common;
        let mut o = if c.smoke {
            mesh::Options::smoke()
        } else {
            mesh::Options {
                peers: self.peers,
                messages: self.messages,
                depth: self.depth,
                body_bytes: self.body_bytes,
                duration_secs_max: self.duration_secs_max,
                ..mesh::Options::default()
            }
        };
        o.transport = c.transport();
        o.node = c.node_opts();
        if let Some(v) = sweep {
            o.peers = v;
        }
        o
    }
}

impl Run for MeshArgs {
    fn common(&self) -> &Common {
        &self.common
    }
    fn fabric(&self, sweep: Option<usize>) -> anyhow::Result<Report> {
        mesh::run(&self.options(sweep)).context("mesh scenario failed")
    }
    fn nats(
        &self,
        server: &NatsServer,
        rt: &tokio::runtime::Runtime,
        sweep: Option<usize>,
    ) -> Option<anyhow::Result<Report>> {
        let o = self.options(sweep);
        Some(
            rt.block_on(fabric_bench::nats::mesh(server, &o))
                .map_err(Into::into),
        )
    }
    fn chart_keys(&self) -> (&'static str, &'static str, &'static str) {
        ("peers", "msgs_per_sec", "send_deliver_p99_us")
    }
}

impl FanoutArgs {
    fn options(&self, sweep: Option<usize>) -> fanout::Options {
        let c = &self.common;
        let mut o = if c.smoke {
            fanout::Options::smoke()
        } else {
            fanout::Options {
                subscribers: self.subscribers,
                messages: self.messages,
                depth: self.depth,
                body_bytes: self.body_bytes,
                to: self.to,
                duration_secs_max: self.duration_secs_max,
                ..fanout::Options::default()
            }
        };
        o.transport = c.transport();
        o.node = c.node_opts();
        if let Some(v) = sweep {
            o.subscribers = v;
        }
        o
    }
}

impl Run for FanoutArgs {
    fn common(&self) -> &Common {
        &self.common
    }
    fn fabric(&self, sweep: Option<usize>) -> anyhow::Result<Report> {
        fanout::run(&self.options(sweep)).context("fanout scenario failed")
    }
    fn nats(
        &self,
        server: &NatsServer,
        rt: &tokio::runtime::Runtime,
        sweep: Option<usize>,
    ) -> Option<anyhow::Result<Report>> {
        let o = self.options(sweep);
        Some(
            rt.block_on(fabric_bench::nats::fanout(server, &o))
                .map_err(Into::into),
        )
    }
    fn chart_keys(&self) -> (&'static str, &'static str, &'static str) {
        (
            "subscribers",
            "deliveries_per_sec",
            "publish_deliver_p99_us",
        )
    }
}

impl Run for ReplayArgs {
    fn common(&self) -> &Common {
        &self.common
    }
    fn fabric(&self, sweep: Option<usize>) -> anyhow::Result<Report> {
        let c = &self.common;
        let mut o = if c.smoke {
            replay::Options::smoke()
        } else {
            replay::Options {
                readers: self.readers,
                entries: self.entries,
                writers: self.writers,
                depth: self.depth,
                body_bytes: self.body_bytes,
                duration: Duration::from_secs(self.duration_secs),
                ..replay::Options::default()
            }
        };
        o.transport = c.transport();
        o.node = c.node_opts();
        if let Some(v) = sweep {
            o.writers = v;
        }
        replay::run(&o).context("replay scenario failed")
    }
    fn chart_keys(&self) -> (&'static str, &'static str, &'static str) {
        (
            "writers",
            "replay_events_per_sec",
            "write_during_replay_p99_us",
        )
    }
}

impl Run for ConnectionsArgs {
    fn common(&self) -> &Common {
        &self.common
    }
    fn fabric(&self, sweep: Option<usize>) -> anyhow::Result<Report> {
        let c = &self.common;
        let mut o = if c.smoke {
            connections::Options::smoke()
        } else {
            connections::Options {
                sessions: self.sessions,
                connect_inflight: self.connect_inflight,
                ..connections::Options::default()
            }
        };
        o.transport = c.transport();
        o.node = c.node_opts();
        if let Some(v) = sweep {
            o.sessions = v;
        }
        connections::run(&o).context("connections scenario failed")
    }
    fn chart_keys(&self) -> (&'static str, &'static str, &'static str) {
        ("sessions", "connects_per_sec", "handshake_p99_us")
    }
}

impl FailoverArgs {
    fn options(&self, sweep: Option<usize>) -> failover::Options {
        let c = &self.common;
        let mut o = if c.smoke {
            failover::Options::smoke()
        } else {
            failover::Options {
                kills: self.kills,
                pause: Duration::from_millis(self.pause_ms),
                attempt_timeout: Duration::from_millis(self.attempt_timeout_ms),
                write_interval: Duration::from_millis(self.write_interval_ms),
                round_timeout: Duration::from_secs(self.round_timeout_secs),
                ..failover::Options::default()
            }
        };
        o.node = NodeOptions {
            cluster: Some(3),
            // One shard: the leader killed is the one the writes go to.
            shards: Some(1),
            ..c.node_opts()
        };
        if let Some(v) = sweep {
            o.kills = v;
        }
        o
    }
}

impl Run for FailoverArgs {
    fn common(&self) -> &Common {
        &self.common
    }
    fn fabric(&self, sweep: Option<usize>) -> anyhow::Result<Report> {
        let r = failover::run(&self.options(sweep)).context("failover scenario failed")?;
        if !failover::intact(&r) {
            print!("{}", r.table());
            anyhow::bail!("failover: acknowledged writes lost, duplicated or not dense");
        }
        Ok(r)
    }
    fn chart_keys(&self) -> (&'static str, &'static str, &'static str) {
        ("kills", "acked_writes", "failover_p99_us")
    }
}

impl CatchupArgs {
    fn options(&self, sweep: Option<usize>) -> catchup::Options {
        let c = &self.common;
        const MIB: u64 = 1024 * 1024;
        let mut o = if c.smoke {
            catchup::Options::smoke()
        } else {
            catchup::Options {
                retention_bytes: self.retention_mib * MIB,
                segment_bytes: self.segment_mib.map(|m| m * MIB),
                write_budget_bytes: self.write_budget_mib * MIB,
                behind_bytes: self.behind_mib * MIB,
                body_bytes: self.body_bytes,
                writers: self.writers,
                depth: self.depth,
                tail_rate: self.tail_rate,
                timeout: Duration::from_secs(self.timeout_secs),
                target: Duration::from_secs(self.target_secs),
                ..catchup::Options::default()
            }
        };
        o.node = NodeOptions {
            cluster: Some(3),
            // One shard: the follower's one Raft group is the one written past retention.
            shards: Some(1),
            ..c.node_opts()
        };
        if let Some(v) = sweep {
            o.behind_bytes = v as u64 * MIB;
        }
        o
    }
}

impl Run for CatchupArgs {
    fn common(&self) -> &Common {
        &self.common
    }
    fn fabric(&self, sweep: Option<usize>) -> anyhow::Result<Report> {
        let r = catchup::run(&self.options(sweep)).context("catchup scenario failed")?;
        if !catchup::rejoined(&r) {
            print!("{}", r.table());
            anyhow::bail!("catchup: the follower did not catch up, or misses acknowledged writes");
        }
        Ok(r)
    }
    fn chart_keys(&self) -> (&'static str, &'static str, &'static str) {
        ("behind_mib", "behind_appends_per_sec", "catchup_secs")
    }
}

/// Runs one side of a round with the fsync probe beside it.
fn nats_round(
    run: &dyn Run,
    policy: Policy,
    binary: &std::path::Path,
    rt: &tokio::runtime::Runtime,
    sweep: Option<usize>,
) -> anyhow::Result<Option<Report>> {
    let c = run.common();
    let nodes = c.cluster.unwrap_or(1) as usize;
    let server = NatsServer::start(binary, policy, &c.data_dir, nodes)?;
    let probe_ms = if c.smoke { SMOKE_PROBE_MS } else { c.probe_ms };
    let probe = if probe_ms == 0 {
        None
    } else {
        let dir = fabric_bench::setup::temp_dir(&c.data_dir, "fabric-bench-probe-")?;
        Some(fabric_bench::fsync_probe::run(
            dir.path(),
            Duration::from_millis(probe_ms),
        )?)
    };
    let load = fabric_bench::stats::load_average();
    let Some(r) = run.nats(&server, rt, sweep) else {
        return Ok(None);
    };
    let mut r = r?;
    r.fsync_probe = probe;
    r.load_average = load;
    Ok(Some(r))
}

// Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
fn drive(run: &dyn Run, scenario: &str) -> anyhow::Result<()> {
    let c = run.common();
    anyhow::ensure!(c.rounds >= 1, "--rounds must be at least 1");
    let nats = match c.vs {
        Some(Versus::Nats) => {
            let bin = fabric_bench::nats::find_server(c.nats_server.as_deref())?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("load-nats")
                .build()?;
            Some((bin, rt))
        }
        None => None,
    };
    let sweep: Vec<Option<usize>> = if c.sweep.is_empty() {
        vec![None]
    } else {
        c.sweep.iter().copied().map(Some).collect()
    };
    let mut all_runs = Vec::new();
    let mut comparisons = Vec::new();
    let mut chart: Vec<Series> = Vec::new();
    let (x_label, thr_key, p99_key) = run.chart_keys();
    let mut regressions = 0;
    for value in &sweep {
        let mut by_system: Vec<(String, Vec<Report>)> = Vec::new();
        let push = |r: Report, by_system: &mut Vec<(String, Vec<Report>)>| {
            print!("{}", r.table());
            match by_system.iter_mut().find(|(s, _)| *s == r.system) {
                Some((_, v)) => v.push(r),
                None => by_system.push((r.system.clone(), vec![r])),
            }
        };
        for round in 0..c.rounds {
            if c.rounds > 1 {
                println!(
                    "== round {} of {}{}",
                    round + 1,
                    c.rounds,
                    sweep_note(*value)
                );
            }
            push(run.fabric(*value)?, &mut by_system);
            if let Some((bin, rt)) = &nats {
                for policy in [Policy::Default, Policy::Always] {
                    match nats_round(run, policy, bin, rt, *value)? {
                        Some(r) => push(r, &mut by_system),
                        None => {
                            eprintln!("{scenario} has no NATS side; --vs nats ignored");
                            break;
                        }
                    }
                }
            }
        }
        let medians: Vec<Report> = by_system
            .iter()
            .filter_map(|(_, rs)| report::median(rs))
            .collect();
        if let Some(fabric) = medians.iter().find(|r| r.system == "fabric") {
            for other in medians.iter().filter(|r| r.system != "fabric") {
                print!("{}", report::ratio_table(fabric, other));
                let mut j = report::ratios_json(fabric, other);
                j["sweep"] = serde_json::json!(value);
                comparisons.push(j);
            }
            if c.check_baseline {
                let b = report::load_baseline(&c.baseline)
                    .with_context(|| format!("cannot read {}", c.baseline.display()))?;
                let (text, n) = report::check_baseline(fabric, &b);
                print!("{text}");
                regressions += n;
            }
        }
        for m in &medians {
            let point = Point {
                x: value.unwrap_or(0) as f64,
                throughput: m.get(thr_key).unwrap_or(0.0),
                p99_us: m.get(p99_key).unwrap_or(0.0),
            };
            match chart.iter_mut().find(|s| s.name == m.system) {
                Some(s) => s.points.push(point),
                None => chart.push(Series {
                    name: m.system.clone(),
                    points: vec![point],
                }),
            }
        }
        for (_, rs) in by_system {
            for r in rs {
                let mut j = r.to_json();
                j["sweep"] = serde_json::json!(value);
                all_runs.push(j);
            }
        }
    }
    if c.check_baseline && regressions > 0 {
        println!("{regressions} figure(s) regressed beyond 20% of the baseline (informational)");
    }
    if let Some(path) = &c.json {
        let doc = serde_json::json!({
            "scenario": scenario,
            "date_unix_ms": fabric::now_ms(),
            "runs": all_runs,
            "comparisons": comparisons,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &c.chart {
        anyhow::ensure!(!c.sweep.is_empty(), "--chart needs --sweep values");
        fabric_bench::chart::draw(
            path,
            &format!("fabric-bench {scenario}"),
            x_label,
            thr_key,
            &chart,
        )?;
        println!("chart written to {}", path.display());
    }
    Ok(())
}

fn sweep_note(v: Option<usize>) -> String {
    v.map_or_else(String::new, |v| format!(" (sweep value {v})"))
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
        Scenario::ServeNode(a) => {
            let opts = NodeOptions {
                durability: a.durability,
                shards: a.shards,
                retention_bytes_max: a.retention_bytes_max,
                ws_tls: a.ws_tls,
                ..NodeOptions::default()
            };
            let config = match (&a.config, a.data_dir) {
                (Some(path), _) => fabric::config::Config::from_toml_file(path)?,
                (None, Some(dir)) => opts.config(dir),
                (None, None) => anyhow::bail!("serve-node needs --data-dir or --config"),
            };
            fabric_bench::setup::serve_node(config)?;
        }
        Scenario::FireAndWait(a) => drive(&LoadRun(a, Mode::FireAndWait), "fire-and-wait")?,
        Scenario::Pipelined(a) => drive(&LoadRun(a, Mode::Pipelined), "pipelined")?,
        Scenario::Mesh(a) => drive(&a, "mesh")?,
        Scenario::Fanout(a) => drive(&a, "fanout")?,
        Scenario::Replay(a) => drive(&a, "replay")?,
        Scenario::Connections(a) => drive(&a, "connections")?,
        Scenario::Failover(a) => drive(&a, "failover")?,
        Scenario::Catchup(a) => drive(&a, "catchup")?,
    }
    Ok(())
}
