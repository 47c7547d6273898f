//! `catchup`: how long a follower that fell behind the leader's retained log (so it needs a
//! snapshot) takes to rejoin while writes go on.
//!
//! Starts a 3-node cluster (child processes, one shard) whose nodes retain `retention` bytes
//! of WAL per shard (segments of a quarter of that, so retention works in steps). SIGKILLs a
//! node that is not the shard's leader, writes `behind` bytes of appends (~1 KiB bodies,
//! pipelined by several clients) through the two others, then starts a tail writer at a
//! steady rate, notes every conversation's head (linearizable read) and restarts the
//! follower. The catch-up time runs from the restart until the follower's own replica
//! (`?consistency=local`) holds every conversation up to those heads. Then the tail writer
//! stops and the follower must hold the last acknowledged tail writes. Reported beside it: the
//! follower's `fabric_raft_snapshots_installed_total`, the bytes the whole run wrote to disk
//! (this process and its reaped children, `/proc/self/io`) and the fsync probe.

use crate::error::BenchError;
use crate::failover::{get_json, http_client, wait_leader, Cluster};
use crate::report::{Report, Unit};
use crate::setup::{NodeOptions, RunContext};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
/// Cluster size: one follower down leaves a quorum of two.
const NODES: u32 = 3;
/// The tail writer's conversation.
const TAIL_CONV: &str = "tail";
/// Poll period of the catch-up wait.
const POLL_MS: u64 = 50;
/// Tail writes the follower must hold at the end (the newest acknowledged ones).
const TAIL_CHECK: usize = 200;
/// Smallest WAL segment the bench configures.
const SEGMENT_BYTES_MIN: u64 = MIB;
/// One HTTP request's timeout (reads, admin).
const HTTP_TIMEOUT_MS: u64 = 5_000;
/// How long the final tail check waits on a follower that did not catch up.
const TAIL_WAIT_BEHIND_SECS: u64 = 5;
/// Progress line period of the catch-up wait.
const PROGRESS_MS: u64 = 5_000;
/// How long the tail writer runs before the restart.
const TAIL_LEAD_MS: u64 = 1_000;

#[derive(Debug, Clone)]
pub struct Options {
    /// Per-shard WAL retained by every node (`retention_bytes_max`).
    pub retention_bytes: u64,
    /// WAL segment size (`wal_segment_bytes_max`); `None`: [`segment_bytes`] of the retention.
    pub segment_bytes: Option<u64>,
    /// The catch-up wait gives up once the run has written this much to disk (this process
    /// and its node processes), so a follower that never catches up cannot wear the disk.
    pub write_budget_bytes: u64,
    /// Appended body bytes written while the follower is down.
    pub behind_bytes: u64,
    pub body_bytes: usize,
    /// Bulk writers (one session and one conversation each).
    pub writers: usize,
    /// Appends in flight per bulk writer.
    pub depth: usize,
    /// Tail writer's appends per second while the follower catches up.
    pub tail_rate: u64,
    /// Bound of every wait (bulk writing, catch-up, the final check).
    pub timeout: Duration,
    /// The target for the catch-up time.
    pub target: Duration,
    pub node: NodeOptions,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            retention_bytes: 64 * MIB,
            segment_bytes: None,
            write_budget_bytes: 900 * MIB,
            behind_bytes: 256 * MIB,
            body_bytes: 1024,
            writers: 4,
            depth: 64,
            tail_rate: 1000,
            timeout: Duration::from_secs(120),
            target: Duration::from_secs(30),
            node: NodeOptions::one_shard_cluster(NODES),
        }
    }
}

impl Options {
    pub fn smoke() -> Options {
        Options {
            retention_bytes: 4 * MIB,
            behind_bytes: 16 * MIB,
            tail_rate: 200,
            timeout: Duration::from_secs(60),
            ..Options::default()
        }
    }
}

/// WAL segment size for a retention limit: a quarter of it (retention never deletes the
/// newest segment, so segments as large as the limit would let the WAL reach twice it), at
/// least [`SEGMENT_BYTES_MIN`].
pub fn segment_bytes(retention_bytes: u64) -> u64 {
    (retention_bytes / 4).max(SEGMENT_BYTES_MIN)
}

/// The top-level node keys the bench adds to every node's config.
pub fn node_limits(retention_bytes: u64, segment: Option<u64>) -> String {
    format!(
        "retention_bytes_max = {retention_bytes}\nwal_segment_bytes_max = {}\n",
        segment.unwrap_or_else(|| segment_bytes(retention_bytes))
    )
}

/// Appends each of `writers` makes so that together they write `behind_bytes` of bodies of
/// `body_bytes` (rounded up, at least one each).
pub fn appends_per_writer(behind_bytes: u64, body_bytes: usize, writers: usize) -> u64 {
    let total = behind_bytes.div_ceil(body_bytes.max(1) as u64);
    total.div_ceil(writers.max(1) as u64).max(1)
}

/// A JSON body `{"n":n,"pad":"xx…"}` of about `bytes` bytes.
pub fn body(n: u64, bytes: usize) -> serde_json::Value {
    let pad = bytes.saturating_sub(32);
    serde_json::json!({"n": n, "pad": "x".repeat(pad)})
}

/// `write_bytes` of a `/proc/<pid>/io` text.
pub fn io_write_bytes(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Bytes process `pid` (`self`: this one, with its reaped children) made the kernel write.
fn disk_writes_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|t| io_write_bytes(&t))
        .unwrap_or(0)
}

/// Bytes this process and its reaped children made the kernel write to disk.
fn disk_writes() -> u64 {
    disk_writes_of("self")
}

/// The value of the Prometheus sample `name{labels}` (exactly as rendered) in `text`.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(sample)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// The `metrics_listen` address in a node's TOML config.
pub fn metrics_listen(toml: &str) -> Option<String> {
    toml.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "metrics_listen").then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Whether every target head is reached by the follower's heads.
pub fn caught_up(targets: &BTreeMap<String, u64>, heads: &BTreeMap<String, u64>) -> bool {
    targets
        .iter()
        .all(|(conv, t)| heads.get(conv).copied().unwrap_or(0) >= *t)
}

/// How many of the acknowledged `(n, seq)` writes `log` (`seq -> n`) does not hold.
pub fn missing(acks: &[(u64, u64)], log: &BTreeMap<u64, Option<u64>>) -> usize {
    acks.iter()
        .filter(|(n, seq)| log.get(seq) != Some(&Some(*n)))
        .count()
}

/// One conversation's head on `base` (`local`: that node's replica); `None` while the node
/// cannot answer.
async fn head(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    mesh: &str,
    conv: &str,
    local: bool,
) -> Option<u64> {
    let url = crate::failover::page_url(base, mesh, conv, 1, 1, local);
    get_json(http, &url, token).await.ok()?["head"].as_u64()
}

async fn heads(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    mesh: &str,
    convs: &[String],
    local: bool,
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for c in convs {
        if let Some(h) = head(http, base, token, mesh, c, local).await {
            out.insert(c.clone(), h);
        }
    }
    out
}

/// Entries `from..` of the tail conversation on `base`'s own replica, `seq -> n`.
async fn read_local(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    mesh: &str,
    from: u64,
    limit: usize,
) -> Result<BTreeMap<u64, Option<u64>>, BenchError> {
    let url = crate::failover::page_url(base, mesh, TAIL_CONV, from, limit as u64, true);
    let page = get_json(http, &url, token).await?;
    Ok(crate::failover::page_entries(&page).into_iter().collect())
}

/// The tail writer's state.
#[derive(Default)]
struct Tail {
    /// `(n, seq, acked)` of every acknowledged tail write.
    acks: Mutex<Vec<(u64, u64, Instant)>>,
    errors: AtomicU64,
    stop: AtomicBool,
}

/// Appends `{"n":…}` to the tail conversation at `rate` per second until stopped.
async fn tail_writer(client: Arc<fabric::client::Client>, opts: Options, tail: Arc<Tail>) {
    let period = Duration::from_secs_f64(1.0 / opts.tail_rate.max(1) as f64);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0;
    let mut tasks = tokio::task::JoinSet::new();
    while !tail.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let (client, tail, b) = (client.clone(), tail.clone(), body(n, opts.body_bytes));
        tasks.spawn(async move {
            match client.append(TAIL_CONV, &b, None).await {
                Ok(seq) => {
                    if let Ok(mut a) = tail.acks.lock() {
                        a.push((n, seq, Instant::now()));
                    }
                }
                Err(_) => {
                    tail.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// One bulk writer: `count` appends to `conv`, `depth` in flight; the acknowledged count.
async fn bulk_writer(
    client: fabric::client::Client,
    conv: String,
    count: u64,
    opts: Options,
    errors: Arc<AtomicU64>,
) -> u64 {
    use futures_util::StreamExt;
    let b = body(0, opts.body_bytes);
    let client = &client;
    let (conv, b) = (&conv, &b);
    futures_util::stream::iter(0..count)
        .map(|_| async move { client.append(conv, b, None).await })
        .buffer_unordered(opts.depth)
        .fold(0u64, |acked, r| {
            let acked = match r {
                Ok(_) => acked + 1,
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    acked
                }
            };
            async move { acked }
        })
        .await
}

/// What the run measured, before it becomes a report.
#[derive(Default)]
struct Outcome {
    follower: usize,
    leader: usize,
    bulk_acked: u64,
    bulk_errors: u64,
    bulk_time: Duration,
    ready: Duration,
    catch_up: Option<Duration>,
    /// The catch-up wait stopped at the write budget.
    budget_hit: bool,
    tail_acked_during: usize,
    tail_acked: usize,
    tail_errors: u64,
    tail_missing: usize,
    tail_checked: usize,
    snapshots_installed: Option<f64>,
    snapshots_sent: Option<f64>,
    lag_after: Option<u64>,
    targets: BTreeMap<String, u64>,
}

pub fn run(opts: &Options) -> Result<Report, BenchError> {
    if opts.node.target.is_some() {
        return Err(BenchError::Options(
            "catchup starts its own cluster (no --target)".into(),
        ));
    }
    let written_before = disk_writes();
    let tmp = crate::setup::temp_dir(&opts.node.data_dir, "fabric-bench-catchup-")?;
    let probe = crate::setup::probe_disk(&opts.node, tmp.path())?;
    let load_average = crate::stats::load_average();
    let rt = crate::setup::load_runtime()?;
    let mut cluster = Cluster::start_with(
        &opts.node,
        tmp.path().join("cluster"),
        &node_limits(opts.retention_bytes, opts.segment_bytes),
    )?;
    let outcome = scenario(opts, &rt, &mut cluster, written_before);
    drop(cluster);
    drop(rt);
    let outcome = outcome?;
    let written = disk_writes().saturating_sub(written_before);
    let mut r = report(opts, &outcome, written);
    r.set_context(probe, load_average);
    Ok(r)
}

// Over 70 lines: the scenario's phases (kill, write behind, restart, catch up, check) in the
// order they happen.
fn scenario(
    opts: &Options,
    rt: &tokio::runtime::Runtime,
    cluster: &mut Cluster,
    written_before: u64,
) -> Result<Outcome, BenchError> {
    let mut o = Outcome::default();
    let http = http_client(Duration::from_millis(HTTP_TIMEOUT_MS))?;
    let admin = fabric::client::Admin::new(&cluster.bases[0], &cluster.token);
    let (mesh, tokens) = rt.block_on(crate::setup::mesh_with_peers(&admin, "catchup", 1, &[]))?;
    let token = tokens[0].clone();
    let bases = cluster.bases.clone();
    o.leader = rt.block_on(wait_leader(&http, &bases, &cluster.token, opts.timeout))?;
    o.follower = (o.leader + 1) % bases.len();
    let live: Vec<String> = (0..bases.len())
        .filter(|i| *i != o.follower)
        .map(|i| bases[i].clone())
        .collect();
    cluster.kill(o.follower)?;
    eprintln!(
        "catchup: leader node {}, follower node {} killed; writing {:.0} MiB through the others",
        o.leader + 1,
        o.follower + 1,
        opts.behind_bytes as f64 / MIB as f64
    );
    // Bulk: `writers` sessions, spread over the live nodes, one conversation each.
    let convs: Vec<String> = (0..opts.writers).map(|w| format!("bulk{w}")).collect();
    let per = appends_per_writer(opts.behind_bytes, opts.body_bytes, opts.writers);
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let bulk = rt.block_on(async {
        let mut tasks = Vec::new();
        for (w, conv) in convs.iter().enumerate() {
            let url = format!("{},{}", live[w % 2], live[(w + 1) % 2]);
            let cfg = fabric::client::ClientConfig::new(&url, &mesh, "p0", &token);
            let client = fabric::client::Client::connect(cfg).await?;
            tasks.push(tokio::spawn(bulk_writer(
                client,
                conv.clone(),
                per,
                opts.clone(),
                errors.clone(),
            )));
        }
        let mut acked = 0;
        for t in tasks {
            acked += tokio::time::timeout(opts.timeout, t)
                .await
                .map_err(|_| BenchError::Timeout("bulk writes"))?
                .map_err(|e| BenchError::Protocol(format!("bulk writer: {e}")))?;
        }
        Ok::<u64, BenchError>(acked)
    })?;
    o.bulk_acked = bulk;
    o.bulk_errors = errors.load(Ordering::Relaxed);
    o.bulk_time = started.elapsed();
    eprintln!(
        "catchup: {} appends acked in {:.1} s ({} failed)",
        o.bulk_acked,
        o.bulk_time.as_secs_f64(),
        o.bulk_errors
    );
    // The tail writer, then the restart.
    let tail = Arc::new(Tail::default());
    let tail_task = {
        let url = live.join(",");
        let cfg = fabric::client::ClientConfig::new(&url, &mesh, "p0", &token);
        let client = Arc::new(rt.block_on(fabric::client::Client::connect(cfg))?);
        rt.spawn(tail_writer(client, opts.clone(), tail.clone()))
    };
    std::thread::sleep(Duration::from_millis(TAIL_LEAD_MS));
    let mut all_convs = convs.clone();
    all_convs.push(TAIL_CONV.into());
    o.targets = rt.block_on(heads(&http, &live[0], &token, &mesh, &all_convs, false));
    let restart = Instant::now();
    let restarted = cluster.restart(o.follower);
    o.ready = restart.elapsed();
    let pids = cluster.pids();
    let budget = Budget {
        start: written_before,
        pids: &pids,
        bytes: opts.write_budget_bytes,
    };
    let caught = restarted.and_then(|()| {
        rt.block_on(wait_caught_up(
            &http,
            &bases[o.follower],
            &token,
            &mesh,
            &o.targets,
            restart,
            opts.timeout,
            &budget,
        ))
    });
    tail.stop.store(true, Ordering::Relaxed);
    let _ = rt.block_on(async { tokio::time::timeout(opts.timeout, tail_task).await });
    o.catch_up = caught?;
    o.budget_hit = o.catch_up.is_none() && budget.spent() > budget.bytes;
    let acks = tail.acks.lock().map(|a| a.clone()).unwrap_or_default();
    let end = restart + o.catch_up.unwrap_or(opts.timeout);
    o.tail_acked = acks.len();
    o.tail_acked_during = acks
        .iter()
        .filter(|(_, _, t)| *t >= restart && *t <= end)
        .count();
    o.tail_errors = tail.errors.load(Ordering::Relaxed);
    // The follower must hold the newest acknowledged tail writes.
    let mut last: Vec<(u64, u64)> = acks.iter().map(|(n, s, _)| (*n, *s)).collect();
    last.sort_by_key(|(_, s)| *s);
    let last = last.split_off(last.len().saturating_sub(TAIL_CHECK));
    o.tail_checked = last.len();
    // A follower that did not catch up gets a short look only.
    let tail_wait = match o.catch_up {
        Some(_) => opts.timeout,
        None => Duration::from_secs(TAIL_WAIT_BEHIND_SECS),
    };
    o.tail_missing = rt.block_on(wait_tail(
        &http,
        &bases[o.follower],
        &token,
        &mesh,
        &last,
        tail_wait,
    ));
    let metrics = |i: usize| -> Option<String> {
        let toml = std::fs::read_to_string(cluster.dir.join(format!("node-{}.toml", i + 1)));
        let addr = metrics_listen(&toml.ok()?)?;
        let url = format!("http://{addr}/metrics");
        rt.block_on(async { http.get(url).send().await.ok()?.text().await.ok() })
    };
    o.snapshots_installed = metrics(o.follower)
        .and_then(|t| metric(&t, "fabric_raft_snapshots_installed_total{shard=\"0\"}"));
    o.snapshots_sent =
        metrics(o.leader).and_then(|t| metric(&t, "fabric_raft_snapshots_sent_total{shard=\"0\"}"));
    o.lag_after = rt.block_on(follower_lag(&http, &bases, &cluster.token, o.follower));
    Ok(o)
}

/// The run's disk write budget: bytes written since `start` by this process (with its reaped
/// children) and the node processes `pids` running now.
struct Budget<'a> {
    start: u64,
    pids: &'a [u32],
    bytes: u64,
}

impl Budget<'_> {
    fn spent(&self) -> u64 {
        let nodes: u64 = self
            .pids
            .iter()
            .map(|p| disk_writes_of(&p.to_string()))
            .sum();
        (disk_writes() + nodes).saturating_sub(self.start)
    }
}

/// Waits (bounded by `timeout` and the write budget) until the follower's own heads reach
/// `targets`; the time since `restart`.
#[allow(clippy::too_many_arguments)]
async fn wait_caught_up(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    mesh: &str,
    targets: &BTreeMap<String, u64>,
    restart: Instant,
    timeout: Duration,
    budget: &Budget<'_>,
) -> Result<Option<Duration>, BenchError> {
    let convs: Vec<String> = targets.keys().cloned().collect();
    let deadline = restart + timeout;
    let mut progress = Instant::now();
    loop {
        let h = heads(http, base, token, mesh, &convs, true).await;
        if caught_up(targets, &h) {
            return Ok(Some(restart.elapsed()));
        }
        let spent = budget.spent();
        if Instant::now() > deadline || spent > budget.bytes {
            eprintln!(
                "catchup: not caught up after {:.1} s ({:.0} MB written, budget {:.0} MB): {h:?} of {targets:?}",
                restart.elapsed().as_secs_f64(),
                spent as f64 / 1e6,
                budget.bytes as f64 / 1e6
            );
            return Ok(None);
        }
        if progress.elapsed() >= Duration::from_millis(PROGRESS_MS) {
            progress = Instant::now();
            eprintln!(
                "catchup: {:.1} s after the restart, follower heads {h:?}, {:.0} MB written",
                restart.elapsed().as_secs_f64(),
                spent as f64 / 1e6
            );
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

/// How many of `last` the follower's replica still misses after a bounded wait.
async fn wait_tail(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    mesh: &str,
    last: &[(u64, u64)],
    timeout: Duration,
) -> usize {
    let Some(from) = last.first().map(|(_, s)| *s) else {
        return 0;
    };
    let deadline = Instant::now() + timeout;
    loop {
        let log = read_local(http, base, token, mesh, from, 2 * TAIL_CHECK)
            .await
            .unwrap_or_default();
        let m = missing(last, &log);
        if m == 0 || Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

/// The follower's lag (entries) as the shard's leader reports it, if a leader answers.
async fn follower_lag(
    http: &reqwest::Client,
    bases: &[String],
    admin: &str,
    follower: usize,
) -> Option<u64> {
    let id = (follower + 1).to_string();
    for base in bases {
        let Ok(v) = get_json(http, &format!("{base}/v1/cluster"), admin).await else {
            continue;
        };
        if v["node"].as_u64().is_some() && v["shards"][0]["leader"] == v["node"] {
            return v["shards"][0]["lag"][&id].as_u64();
        }
    }
    None
}

fn report(opts: &Options, o: &Outcome, written: u64) -> Report {
    let params = serde_json::json!({
        "nodes": NODES,
        "shards": 1,
        "retention_mib": opts.retention_bytes as f64 / MIB as f64,
        "behind_mib": opts.behind_bytes as f64 / MIB as f64,
        "body_bytes": opts.body_bytes,
        "writers": opts.writers,
        "depth": opts.depth,
        "tail_rate": opts.tail_rate,
        "segment_mib": opts.segment_bytes.unwrap_or_else(|| segment_bytes(opts.retention_bytes)) as f64 / MIB as f64,
        "write_budget_mib": opts.write_budget_bytes / MIB,
    });
    let mut r = Report::new("catchup", "fabric", "fsync (cluster default)", params);
    let bulk_bytes = o.bulk_acked * opts.body_bytes as u64;
    r.add("behind_appends", o.bulk_acked as f64, Unit::Count);
    r.add("behind_body_bytes", bulk_bytes as f64, Unit::Bytes);
    r.add("behind_failed_appends", o.bulk_errors as f64, Unit::Count);
    r.add("behind_write_secs", o.bulk_time.as_secs_f64(), Unit::Secs);
    r.add(
        "behind_appends_per_sec",
        o.bulk_acked as f64 / o.bulk_time.as_secs_f64().max(1e-9),
        Unit::PerSec,
    );
    r.add("restart_to_ready_secs", o.ready.as_secs_f64(), Unit::Secs);
    r.add(
        "catchup_secs",
        o.catch_up.map_or(-1.0, |d| d.as_secs_f64()),
        Unit::Secs,
    );
    r.add(
        "caught_up_within_target",
        f64::from(u8::from(o.catch_up.is_some_and(|d| d <= opts.target))),
        Unit::Count,
    );
    r.add(
        "snapshots_installed",
        o.snapshots_installed.unwrap_or(-1.0),
        Unit::Count,
    );
    r.add(
        "snapshots_sent_by_leader",
        o.snapshots_sent.unwrap_or(-1.0),
        Unit::Count,
    );
    r.add(
        "tail_acked_during_catchup",
        o.tail_acked_during as f64,
        Unit::Count,
    );
    r.add("tail_acked", o.tail_acked as f64, Unit::Count);
    r.add("tail_failed_appends", o.tail_errors as f64, Unit::Count);
    r.add("tail_checked", o.tail_checked as f64, Unit::Count);
    r.add(
        "tail_missing_on_follower",
        o.tail_missing as f64,
        Unit::Count,
    );
    r.add(
        "follower_lag_after",
        o.lag_after.map_or(-1.0, |l| l as f64),
        Unit::Count,
    );
    r.add("disk_write_bytes", written as f64, Unit::Bytes);
    r.add(
        "stopped_at_write_budget",
        f64::from(u8::from(o.budget_hit)),
        Unit::Count,
    );
    r.notes.push(format!(
        "leader node {}, follower node {} (killed, restarted); heads at restart: {:?}",
        o.leader + 1,
        o.follower + 1,
        o.targets
    ));
    r.notes.push(
        "disk_write_bytes: /proc/self/io write_bytes of the bench and its reaped node \
         processes, fsync probe included; -1: figure not available"
            .into(),
    );
    r
}

/// Whether the follower caught up and holds the newest acknowledged tail writes.
pub fn rejoined(r: &Report) -> bool {
    r.get("catchup_secs").is_some_and(|s| s >= 0.0)
        && r.get("tail_missing_on_follower") == Some(0.0)
        && r.get("tail_checked").is_some_and(|c| c > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_is_a_quarter_of_retention_at_least_one_mib() {
        // Proves retention gets segments small enough to retire in steps, never below 1 MiB.
        assert_eq!(segment_bytes(64 * MIB), 16 * MIB);
        assert_eq!(segment_bytes(2 * MIB), MIB);
        let limits = node_limits(64 * MIB, None);
        assert!(limits.contains("retention_bytes_max = 67108864\n"));
        assert!(limits.contains("wal_segment_bytes_max = 16777216\n"));
        let own = node_limits(64 * MIB, Some(64 * MIB));
        assert!(own.contains("wal_segment_bytes_max = 67108864\n"));
    }

    #[test]
    fn appends_cover_the_behind_bytes() {
        // Proves the writers together write at least the asked bytes, split evenly, rounded up.
        assert_eq!(appends_per_writer(256 * MIB, 1024, 4), 65_536);
        assert_eq!(appends_per_writer(10, 3, 2), 2);
        assert_eq!(appends_per_writer(0, 1024, 4), 1);
        let b = serde_json::to_vec(&body(123_456, 1024)).unwrap_or_default();
        assert!((1000..=1030).contains(&b.len()), "{}", b.len());
    }

    #[test]
    fn parses_proc_io_metrics_and_config() {
        // Proves write_bytes, one exact Prometheus sample and metrics_listen are read correctly.
        let io = "rchar: 10\nwchar: 20\nwrite_bytes: 4096\ncancelled_write_bytes: 0\n";
        assert_eq!(io_write_bytes(io), Some(4096));
        let text = "# TYPE x counter\nfabric_raft_snapshots_installed_total{shard=\"0\"} 1\n\
                    fabric_raft_snapshots_installed_total{shard=\"1\"} 5\n";
        let s = "fabric_raft_snapshots_installed_total{shard=\"0\"}";
        assert_eq!(metric(text, s), Some(1.0));
        assert_eq!(metric(text, "fabric_raft_snapshots_installed_total"), None);
        let toml = "data_dir = \"/d\"\nmetrics_listen = \"127.0.0.1:7413\"\n";
        assert_eq!(metrics_listen(toml).as_deref(), Some("127.0.0.1:7413"));
    }

    #[test]
    fn caught_up_needs_every_head_and_missing_counts_wrong_seqs() {
        // Proves catch-up waits for every conversation and the tail check catches gaps and moves.
        let t: BTreeMap<String, u64> = [("a".into(), 5), ("b".into(), 7)].into();
        let mut h: BTreeMap<String, u64> = [("a".into(), 9)].into();
        assert!(!caught_up(&t, &h));
        h.insert("b".into(), 7);
        assert!(caught_up(&t, &h));
        let log: BTreeMap<u64, Option<u64>> = [(10, Some(1)), (11, Some(9))].into();
        assert_eq!(missing(&[(1, 10), (2, 11), (3, 12)], &log), 2);
        assert_eq!(missing(&[(1, 10)], &log), 0);
    }
}
