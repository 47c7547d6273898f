//! `failover`: how long a shard takes to serve writes again after its leader is killed, and
//! whether any acknowledged write is lost.
//!
//! Starts a 3-node cluster (child processes, one shard, so "the shard" is unambiguous). One
//! writer appends to one conversation over HTTP with an idempotency key per write, retrying a
//! failed attempt (timeout, refused connection, `unavailable`) with the same key on the next
//! node. `kills` times: find the shard's leader, SIGKILL it, time the kill to the first `ok` of
//! a write issued after the kill, restart the node with the same command, wait until every node
//! is ready, pause. At the end the conversation is read back (linearizable, then each node's
//! replica with `consistency=local`): every acknowledged key's seq must hold that write.

use crate::error::BenchError;
use crate::report::{Report, Unit};
use crate::setup::{NodeOptions, RunContext};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The conversation the writer appends to.
const CONV: &str = "failover";
/// Cluster size: a leader kill leaves a quorum of two.
const NODES: u32 = 3;
/// Pause between a failed attempt and its retry on the next node.
const RETRY_PAUSE_MS: u64 = 20;
/// Poll period of the orchestrator's waits.
const POLL_MS: u64 = 10;
/// Entries per read page.
const PAGE_LIMIT: u32 = 1000;
/// Most pages one read-back fetches (bounds the loop; 10 million entries).
const PAGES_MAX: usize = 10_000;
/// How long a restarted replica may take to hold the whole log.
const CATCH_UP_MS: u64 = 15_000;
/// How long a cluster node gets to stop after its stdin closes, at the end.
const STOP_WAIT_MS: u64 = 5_000;

#[derive(Debug, Clone)]
pub struct Options {
    pub kills: usize,
    /// Pause after the cluster is ready again, before the next kill.
    pub pause: Duration,
    /// One HTTP attempt's timeout (an established connection to a dead node may hang).
    pub attempt_timeout: Duration,
    /// Pause between one acknowledged write and the next.
    pub write_interval: Duration,
    /// Bound of every wait of a round (leader known, first ok, one write's retries).
    pub round_timeout: Duration,
    pub node: NodeOptions,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            kills: 20,
            pause: Duration::from_millis(1000),
            attempt_timeout: Duration::from_millis(500),
            write_interval: Duration::from_millis(10),
            round_timeout: Duration::from_secs(30),
            node: NodeOptions::one_shard_cluster(NODES),
        }
    }
}

impl Options {
    pub fn smoke() -> Options {
        Options {
            kills: 2,
            pause: Duration::from_millis(300),
            ..Options::default()
        }
    }
}

/// One acknowledged write: its number (key `k{n}`, body `{"n":n}`), seq, when it was first
/// issued and when its `ok` came.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub n: u64,
    pub seq: u64,
    pub issued: Instant,
    pub acked: Instant,
}

/// What the read-back found, against the acknowledged writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Check {
    pub entries: usize,
    /// Acknowledged writes whose seq is missing or holds another write.
    pub lost: usize,
    /// Seqs run 1, 2, … without a gap.
    pub dense: bool,
    /// Writes present at more than one seq (an idempotency key that did not hold).
    pub duplicates: usize,
}

/// Checks a read-back log `(seq, n of its body)` against the acknowledged `(n, seq)` pairs.
pub fn check(acked: &[(u64, u64)], log: &[(u64, Option<u64>)]) -> Check {
    let by_seq: BTreeMap<u64, Option<u64>> = log.iter().copied().collect();
    let lost = acked
        .iter()
        .filter(|(n, seq)| by_seq.get(seq) != Some(&Some(*n)))
        .count();
    let dense = log.iter().enumerate().all(|(i, (s, _))| *s == i as u64 + 1);
    let mut times: BTreeMap<u64, usize> = BTreeMap::new();
    for n in log.iter().filter_map(|(_, n)| *n) {
        *times.entry(n).or_default() += 1;
    }
    Check {
        entries: log.len(),
        lost,
        dense,
        duplicates: times.values().filter(|c| **c > 1).count(),
    }
}

/// Nearest-rank percentile `q` (0..=1) of sorted durations; zero for none.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The time from `kill` to the first `ok` of a write issued at or after it, if one came.
pub fn failover_time(acks: &[Ack], kill: Instant) -> Option<Duration> {
    acks.iter()
        .filter(|a| a.issued >= kill)
        .map(|a| a.acked)
        .min()
        .map(|t| t - kill)
}

/// The cluster's node processes, restartable one by one; stops them all when dropped.
pub(crate) struct Cluster {
    pub(crate) dir: PathBuf,
    children: Vec<Option<Child>>,
    pub(crate) bases: Vec<String>,
    pub(crate) token: String,
}

impl Cluster {
    fn start(opts: &NodeOptions, dir: PathBuf) -> Result<Cluster, BenchError> {
        Cluster::start_with(opts, dir, "")
    }

    /// [`Cluster::start`] with top-level node keys put into every node's config
    /// ([`crate::setup::spawn_cluster_with`]).
    pub(crate) fn start_with(
        opts: &NodeOptions,
        dir: PathBuf,
        top_level: &str,
    ) -> Result<Cluster, BenchError> {
        let (children, bases, token) =
            crate::setup::spawn_cluster_with(opts, &dir, NODES, top_level)?;
        Ok(Cluster {
            dir,
            children: children.into_iter().map(Some).collect(),
            bases,
            token,
        })
    }

    /// The pids of the nodes running now.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.children.iter().flatten().map(Child::id).collect()
    }

    /// SIGKILLs node `i` (0-based) and reaps it.
    pub(crate) fn kill(&mut self, i: usize) -> Result<(), BenchError> {
        if let Some(mut c) = self.children[i].take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts node `i` (0-based) again with the same command and waits until all are ready.
    pub(crate) fn restart(&mut self, i: usize) -> Result<(), BenchError> {
        let (child, base) = crate::setup::spawn_cluster_node(&self.dir, i as u32 + 1)?;
        self.children[i] = Some(child);
        if base != self.bases[i] {
            return Err(BenchError::Protocol(format!(
                "node {} came back on {base}, not {}",
                i + 1,
                self.bases[i]
            )));
        }
        crate::setup::wait_cluster_ready(&self.bases)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for mut c in self.children.iter_mut().filter_map(Option::take) {
            // Closing its stdin is a node's signal to shut down; killed if it does not.
            drop(c.stdin.take());
            let deadline = Instant::now() + Duration::from_millis(STOP_WAIT_MS);
            while Instant::now() < deadline && !matches!(c.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The writer's state shared with the orchestrator.
#[derive(Default)]
struct Shared {
    acks: Mutex<Vec<Ack>>,
    stop: AtomicBool,
    /// Failed attempts by class (`timeout`, `connect`, an error code, …).
    errors: Mutex<BTreeMap<String, u64>>,
    retries: AtomicU64,
}

impl Shared {
    fn acks(&self) -> Vec<Ack> {
        self.acks.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

/// One writer: appends `{"n":n}` with key `k{n}`, one at a time, to any node.
struct Writer {
    http: reqwest::Client,
    bases: Vec<String>,
    token: String,
    mesh: String,
    opts: Options,
    shared: Arc<Shared>,
}

impl Writer {
    async fn run(self) -> Result<(), BenchError> {
        let mut node = 0;
        let mut n = 0;
        while !self.shared.stop.load(Ordering::Relaxed) {
            n += 1;
            let issued = Instant::now();
            let seq = self.write(n, &mut node).await?;
            let ack = Ack {
                n,
                seq,
                issued,
                acked: Instant::now(),
            };
            if let Ok(mut a) = self.shared.acks.lock() {
                a.push(ack);
            }
            tokio::time::sleep(self.opts.write_interval).await;
        }
        Ok(())
    }

    /// Write `n` until a node answers `ok`, moving to the next node after a failed attempt.
    async fn write(&self, n: u64, node: &mut usize) -> Result<u64, BenchError> {
        let deadline = Instant::now() + self.opts.round_timeout;
        loop {
            match self.attempt(n, &self.bases[*node]).await {
                Ok(seq) => return Ok(seq),
                Err(class) => self.failed(class),
            }
            *node = (*node + 1) % self.bases.len();
            if Instant::now() > deadline {
                return Err(BenchError::Timeout(
                    "a write retried past the round timeout",
                ));
            }
            tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
        }
    }

    fn failed(&self, class: String) {
        self.shared.retries.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.shared.errors.lock() {
            *e.entry(class).or_default() += 1;
        }
    }

    /// One `POST …/messages`: the seq, or the failure's class.
    async fn attempt(&self, n: u64, base: &str) -> Result<u64, String> {
        let url = format!(
            "{base}/v1/meshes/{}/conversations/{CONV}/messages",
            self.mesh
        );
        let req = serde_json::json!({"body": {"n": n}, "key": format!("k{n}")});
        let resp = self
            .http
            .post(url)
            .bearer_auth(&self.token)
            .json(&req)
            .send()
            .await
            .map_err(|e| error_class(&e))?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.map_err(|e| error_class(&e))?;
        match body["seq"].as_u64() {
            Some(seq) if status.is_success() => Ok(seq),
            _ => Err(body["code"]
                .as_str()
                .map_or_else(|| format!("http {status}"), str::to_string)),
        }
    }
}

fn error_class(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else {
        "http".into()
    }
}

pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, BenchError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .map_err(|e| BenchError::Protocol(format!("http client: {e}")))
}

/// GET a JSON document with a bearer token.
pub(crate) async fn get_json(
    http: &reqwest::Client,
    url: &str,
    token: &str,
) -> Result<serde_json::Value, BenchError> {
    let resp = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| BenchError::Protocol(format!("GET {url}: {e}")))?;
    let status = resp.status();
    let v: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| BenchError::Protocol(format!("GET {url}: {e}")))?;
    if !status.is_success() {
        return Err(BenchError::Protocol(format!("GET {url}: {status} {v}")));
    }
    Ok(v)
}

/// The index of the node that reports itself leader of shard 0, if one does.
async fn leader(http: &reqwest::Client, bases: &[String], admin: &str) -> Option<usize> {
    for (i, base) in bases.iter().enumerate() {
        let Ok(v) = get_json(http, &format!("{base}/v1/cluster"), admin).await else {
            continue;
        };
        let me = v["node"].as_u64();
        if me.is_some() && v["shards"][0]["leader"].as_u64() == me {
            return Some(i);
        }
    }
    None
}

/// Waits (bounded) until a node reports itself the shard's leader.
pub(crate) async fn wait_leader(
    http: &reqwest::Client,
    bases: &[String],
    admin: &str,
    timeout: Duration,
) -> Result<usize, BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(i) = leader(http, bases, admin).await {
            return Ok(i);
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout("a shard leader"));
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS * 5)).await;
    }
}

/// The URL of a page of conversation `conv` on `base` (`local`: that node's own replica
/// answers, which may lag; otherwise the leader, linearizably).
pub(crate) fn page_url(
    base: &str,
    mesh: &str,
    conv: &str,
    from: u64,
    limit: u64,
    local: bool,
) -> String {
    let consistency = if local { "local" } else { "linearizable" };
    format!(
        "{base}/v1/meshes/{mesh}/conversations/{conv}/messages?from={from}&limit={limit}&consistency={consistency}"
    )
}

/// A page's entries as `(seq, n)` (`n` from a body `{"n": …}`).
pub(crate) fn page_entries(page: &serde_json::Value) -> Vec<(u64, Option<u64>)> {
    let msgs = page["messages"].as_array().map_or(&[][..], Vec::as_slice);
    msgs.iter()
        .map(|m| (m["seq"].as_u64().unwrap_or(0), m["body"]["n"].as_u64()))
        .collect()
}

/// The whole conversation as `(seq, n)` from `base` (`local`: that node's replica).
async fn read_log(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    mesh: &str,
    local: bool,
) -> Result<Vec<(u64, Option<u64>)>, BenchError> {
    let mut out = Vec::new();
    for _ in 0..PAGES_MAX {
        let from = out.last().map_or(1, |(s, _)| s + 1);
        let url = page_url(base, mesh, CONV, from, PAGE_LIMIT.into(), local);
        let page = get_json(http, &url, token).await?;
        let entries = page_entries(&page);
        let head = page["head"].as_u64().unwrap_or(0);
        let done = entries.is_empty() || entries.last().map_or(0, |(s, _)| *s) >= head;
        out.extend(entries);
        if done {
            return Ok(out);
        }
    }
    Err(BenchError::Timeout("read-back pages"))
}

/// Node `base`'s replica, once it holds at least `len` entries (bounded wait).
async fn read_replica(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    mesh: &str,
    len: usize,
) -> Result<Vec<(u64, Option<u64>)>, BenchError> {
    let deadline = Instant::now() + Duration::from_millis(CATCH_UP_MS);
    loop {
        let log = read_log(http, base, token, mesh, true).await?;
        if log.len() >= len || Instant::now() > deadline {
            return Ok(log);
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS * 10)).await;
    }
}

/// Waits (bounded) until the writer has an ack for a write issued at or after `since`.
fn wait_ack(shared: &Shared, since: Instant, timeout: Duration) -> Result<Duration, BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = failover_time(&shared.acks(), since) {
            return Ok(t);
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout("a write acknowledged after the kill"));
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    }
}

/// What the run measured, before it becomes a report.
struct Outcome {
    failovers: Vec<Duration>,
    acks: Vec<(u64, u64)>,
    linearizable: Check,
    replicas: Vec<Check>,
    errors: BTreeMap<String, u64>,
    retries: u64,
}

pub fn run(opts: &Options) -> Result<Report, BenchError> {
    if opts.node.target.is_some() {
        return Err(BenchError::Options(
            "failover starts its own cluster (no --target)".into(),
        ));
    }
    let tmp = crate::setup::temp_dir(&opts.node.data_dir, "fabric-bench-failover-")?;
    let probe = crate::setup::probe_disk(&opts.node, tmp.path())?;
    let load_average = crate::stats::load_average();
    let rt = crate::setup::load_runtime()?;
    let mut cluster = Cluster::start(&opts.node, tmp.path().join("cluster"))?;
    let outcome = scenario(opts, &rt, &mut cluster)?;
    drop(cluster);
    let mut r = report(opts, &outcome);
    r.set_context(probe, load_average);
    Ok(r)
}

fn scenario(
    opts: &Options,
    rt: &tokio::runtime::Runtime,
    cluster: &mut Cluster,
) -> Result<Outcome, BenchError> {
    let admin = fabric::client::Admin::new(&cluster.bases[0], &cluster.token);
    let (mesh, tokens) = rt.block_on(crate::setup::mesh_with_peers(&admin, "failover", 1, &[]))?;
    let http = http_client(opts.attempt_timeout)?;
    let shared = Arc::new(Shared::default());
    let writer = rt.spawn(
        Writer {
            http: http.clone(),
            bases: cluster.bases.clone(),
            token: tokens[0].clone(),
            mesh: mesh.clone(),
            opts: opts.clone(),
            shared: shared.clone(),
        }
        .run(),
    );
    let failovers = kill_rounds(opts, rt, cluster, &http, &shared);
    shared.stop.store(true, Ordering::Relaxed);
    let written = rt
        .block_on(writer)
        .map_err(|e| BenchError::Protocol(format!("writer task: {e}")));
    let failovers = failovers?;
    written??;
    let read_http = http_client(opts.round_timeout)?;
    let acks: Vec<(u64, u64)> = shared.acks().iter().map(|a| (a.n, a.seq)).collect();
    let (linearizable, replicas) =
        rt.block_on(read_back(&read_http, cluster, &tokens[0], &mesh, &acks))?;
    Ok(Outcome {
        failovers,
        acks,
        linearizable,
        replicas,
        errors: shared.errors.lock().map(|e| e.clone()).unwrap_or_default(),
        retries: shared.retries.load(Ordering::Relaxed),
    })
}

/// The kill loop: each round's kill-to-first-ok time.
fn kill_rounds(
    opts: &Options,
    rt: &tokio::runtime::Runtime,
    cluster: &mut Cluster,
    http: &reqwest::Client,
    shared: &Shared,
) -> Result<Vec<Duration>, BenchError> {
    let mut failovers = Vec::with_capacity(opts.kills);
    // The writer is under way before the first kill.
    wait_ack(shared, Instant::now(), opts.round_timeout)?;
    for round in 0..opts.kills {
        let bases = cluster.bases.clone();
        let i = rt.block_on(wait_leader(
            http,
            &bases,
            &cluster.token,
            opts.round_timeout,
        ))?;
        let kill = Instant::now();
        cluster.kill(i)?;
        let t = wait_ack(shared, kill, opts.round_timeout)?;
        eprintln!(
            "failover: kill {} of {}: node {} (leader), first ok after {:.0} ms",
            round + 1,
            opts.kills,
            i + 1,
            t.as_secs_f64() * 1000.0
        );
        failovers.push(t);
        cluster.restart(i)?;
        std::thread::sleep(opts.pause);
    }
    Ok(failovers)
}

/// Reads the conversation back linearizably, then from each node's replica, and checks both.
async fn read_back(
    http: &reqwest::Client,
    cluster: &Cluster,
    token: &str,
    mesh: &str,
    acks: &[(u64, u64)],
) -> Result<(Check, Vec<Check>), BenchError> {
    let log = read_log(http, &cluster.bases[0], token, mesh, false).await?;
    let mut replicas = Vec::new();
    for base in &cluster.bases {
        let replica = read_replica(http, base, token, mesh, log.len()).await?;
        replicas.push(check(acks, &replica));
    }
    Ok((check(acks, &log), replicas))
}

fn report(opts: &Options, o: &Outcome) -> Report {
    let params = serde_json::json!({
        "kills": opts.kills,
        "nodes": NODES,
        "shards": 1,
        "attempt_timeout_ms": opts.attempt_timeout.as_millis() as u64,
        "write_interval_ms": opts.write_interval.as_millis() as u64,
        "pause_ms": opts.pause.as_millis() as u64,
    });
    let mut r = Report::new("failover", "fabric", "fsync (cluster default)", params);
    let mut sorted = o.failovers.clone();
    sorted.sort();
    r.add("kills", sorted.len() as f64, Unit::Count);
    for (name, q) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
        let us = percentile(&sorted, q).as_micros() as f64;
        r.add(&format!("failover_{name}_us"), us, Unit::Micros);
    }
    r.add("acked_writes", o.acks.len() as f64, Unit::Count);
    r.add("lost_writes", o.linearizable.lost as f64, Unit::Count);
    let replica_lost: usize = o.replicas.iter().map(|c| c.lost).sum();
    r.add("lost_writes_replicas", replica_lost as f64, Unit::Count);
    r.add(
        "duplicate_writes",
        o.linearizable.duplicates as f64,
        Unit::Count,
    );
    r.add("log_entries", o.linearizable.entries as f64, Unit::Count);
    r.add("retried_attempts", o.retries as f64, Unit::Count);
    r.notes.push(format!(
        "failover ms per kill: {:?}",
        o.failovers
            .iter()
            .map(|d| d.as_millis())
            .collect::<Vec<_>>()
    ));
    r.notes
        .push(format!("failed attempts by class: {:?}", o.errors));
    r.add(
        "seqs_dense",
        u8::from(o.linearizable.dense) as f64,
        Unit::Count,
    );
    let dense = o.replicas.iter().filter(|c| c.dense).count();
    r.add("replicas_dense", dense as f64, Unit::Count);
    r
}

/// Whether the run kept every acknowledged write, once, at dense seqs, on every replica.
pub fn intact(r: &Report) -> bool {
    r.get("lost_writes") == Some(0.0)
        && r.get("lost_writes_replicas") == Some(0.0)
        && r.get("duplicate_writes") == Some(0.0)
        && r.get("seqs_dense") == Some(1.0)
        && r.get("replicas_dense") == Some(f64::from(NODES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        // Proves p50/p99/max pick the nearest-rank sample (p99 of 20 is the largest) and none is zero.
        let ms = |v: u64| Duration::from_millis(v);
        let sorted: Vec<Duration> = (1..=20).map(ms).collect();
        assert_eq!(percentile(&sorted, 0.5), ms(10));
        assert_eq!(percentile(&sorted, 0.99), ms(20));
        assert_eq!(percentile(&sorted, 1.0), ms(20));
        assert_eq!(percentile(&[], 0.99), Duration::ZERO);
    }

    #[test]
    fn check_finds_lost_moved_and_duplicated_writes() {
        // Proves a missing seq, a seq holding another write, a gap and a repeated write are all caught.
        let ok = check(&[(1, 1), (2, 2)], &[(1, Some(1)), (2, Some(2))]);
        assert_eq!((ok.lost, ok.dense, ok.duplicates), (0, true, 0));
        let gap = check(&[(1, 1), (2, 3)], &[(1, Some(1)), (3, Some(2))]);
        assert_eq!((gap.lost, gap.dense), (0, false));
        let moved = check(&[(1, 1), (2, 2)], &[(1, Some(1)), (2, Some(7))]);
        assert_eq!(moved.lost, 1);
        let missing = check(&[(1, 1), (2, 2)], &[(1, Some(1))]);
        assert_eq!(missing.lost, 1);
        let dup = check(&[(1, 1)], &[(1, Some(1)), (2, Some(1))]);
        assert_eq!(dup.duplicates, 1);
    }

    #[test]
    fn failover_time_counts_only_writes_issued_after_the_kill() {
        // Proves a write issued before the kill, even if acked after it, does not end the failover.
        let kill = Instant::now();
        let at = |ms: u64| kill + Duration::from_millis(ms);
        let before = Ack {
            n: 1,
            seq: 1,
            issued: kill - Duration::from_millis(5),
            acked: at(100),
        };
        let after = Ack {
            n: 2,
            seq: 2,
            issued: at(100),
            acked: at(900),
        };
        assert_eq!(failover_time(&[before], kill), None);
        assert_eq!(
            failover_time(&[before, after], kill),
            Some(Duration::from_millis(900))
        );
    }
}
