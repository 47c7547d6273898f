//! What every scenario starts with: a transport, the node under test (in-process on a fresh
//! temp data dir, or a running one given by `--target`), the fsync probe of the disk, the admin
//! calls that make a fresh mesh and its peers, and the process sampler.

use crate::error::BenchError;
use crate::stats::{ProcSampler, ProcStats};
use fabric::client::Admin;
use fabric::config::{Config, Durability};
use fabric::node::{NodeCtx, RunningNode};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Admin calls (peer creation) in flight at once while a scenario sets up.
const ADMIN_CALLS_INFLIGHT_MAX: usize = 64;

/// How the load generator talks to the node; every scenario goes through
/// [`crate::wire::WsConn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// WebSocket, JSON text frames.
    WsJson,
    /// WebSocket, postcard binary frames.
    WsBinary,
    /// QUIC: postcard frames on a control stream, a stream per subscription.
    Quic,
    /// WebSocket over TLS (`wss://`, the node's `--ws-tls`), JSON text frames.
    WssJson,
    /// WebSocket over TLS, postcard binary frames: QUIC's like-for-like (both encrypted).
    WssBinary,
}

impl Transport {
    pub fn binary(self) -> bool {
        matches!(
            self,
            Transport::WsBinary | Transport::Quic | Transport::WssBinary
        )
    }

    /// WebSocket over TLS: the node's HTTP port must speak TLS.
    pub fn wss(self) -> bool {
        matches!(self, Transport::WssJson | Transport::WssBinary)
    }

    pub fn name(self) -> &'static str {
        match self {
            Transport::WsJson => "ws-json",
            Transport::WsBinary => "ws-binary",
            Transport::Quic => "quic",
            Transport::WssJson => "wss-json",
            Transport::WssBinary => "wss-binary",
        }
    }
}

/// Where the node under test is and how an in-process one is configured.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// `http://host:port` of a running node; `None` starts one in-process.
    pub target: Option<String>,
    /// Admin token of the target node (in-process, the bench makes its own).
    pub admin_token: Option<String>,
    /// PID of the --target node's process, for CPU/RSS/FD sampling.
    pub server_pid: Option<u32>,
    /// `quic://host:port?pin=SHA256` of the --target node, for `--transport quic`.
    pub quic_url: Option<String>,
    /// Where the temp dir (node data, fsync probe) is made; default the system temp dir.
    pub data_dir: Option<PathBuf>,
    /// fsync probe length; zero skips it.
    pub probe: Duration,
    /// In-process node: shards (default: one per core).
    pub shards: Option<u32>,
    pub durability: Durability,
    /// In-process node: per-shard WAL size that triggers retention.
    pub retention_bytes_max: Option<u64>,
    /// Run the bench's own node in a child process (this binary's `serve-node`) instead of
    /// in-process: the server's CPU, RSS and FDs are then its own, and each process needs
    /// only one fd per connection.
    pub node_process: bool,
    /// A replicated cluster of this many nodes, each a child process; connections spread
    /// over them.
    pub cluster: Option<u32>,
    /// QUIC sessions of the load generator share one client endpoint (one UDP socket and one
    /// endpoint driver, as in a process that hosts many agents) instead of one each.
    pub quic_shared_endpoint: bool,
    /// Server ops per frame the load generator's sessions ask for (`options` `batch`); 0 or
    /// 1 asks for nothing: one op per frame.
    pub batch_in: u32,
    /// The bench's own node serves its HTTP port over TLS (for `wss-*` transports).
    pub ws_tls: bool,
}

impl NodeOptions {
    /// A cluster of `nodes` with one shard, so "the shard" and "its leader" are one thing (the
    /// failover and catch-up modes).
    pub fn one_shard_cluster(nodes: u32) -> NodeOptions {
        NodeOptions {
            cluster: Some(nodes),
            shards: Some(1),
            ..NodeOptions::default()
        }
    }
}

impl Default for NodeOptions {
    fn default() -> NodeOptions {
        NodeOptions {
            target: None,
            admin_token: None,
            server_pid: None,
            quic_url: None,
            data_dir: None,
            probe: Duration::from_secs(2),
            shards: None,
            durability: Durability::Fsync,
            retention_bytes_max: None,
            node_process: false,
            cluster: None,
            quic_shared_endpoint: false,
            batch_in: crate::wire::BATCH_OPS_IN_DEFAULT,
            ws_tls: false,
        }
    }
}

impl NodeOptions {
    /// Durability as reported: a remote node's is not known here.
    pub fn durability_name(&self) -> String {
        match self.target {
            Some(_) => "the target's".into(),
            None => format!("{:?}", self.durability).to_lowercase(),
        }
    }

    /// The transport as reported: QUIC says whether its client endpoint was shared.
    pub fn transport_name(&self, transport: Transport) -> String {
        match transport {
            Transport::Quic if self.quic_shared_endpoint => "quic (shared client endpoint)".into(),
            t => t.name().into(),
        }
    }

    pub fn target_name(&self) -> String {
        match (&self.target, self.cluster, self.node_process) {
            (Some(t), _, _) => t.clone(),
            (None, Some(n), _) => format!("cluster of {n} (child processes)"),
            (None, None, true) => "child process".into(),
            (None, None, false) => "in-process".into(),
        }
    }

    pub fn config(&self, data_dir: PathBuf) -> Config {
        let defaults = Config::default();
        let shards = self.shards.unwrap_or(defaults.shards);
        Config {
            data_dir,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_token: Some(fabric::node::new_token()),
            durability: self.durability,
            retention_bytes_max: self
                .retention_bytes_max
                .unwrap_or(defaults.retention_bytes_max),
            shards,
            partitions: defaults.partitions.max(shards),
            ws_tls: self.ws_tls,
            ..defaults
        }
    }
}

/// A temp dir under `--data-dir` (or the system temp dir).
pub fn temp_dir(parent: &Option<PathBuf>, prefix: &str) -> Result<tempfile::TempDir, BenchError> {
    let parent = parent.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent)?;
    Ok(tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&parent)?)
}

/// The fsync probe on the disk under test (`dir`), unless `--probe-ms 0` turned it off.
pub(crate) fn probe_disk(
    opts: &NodeOptions,
    dir: &std::path::Path,
) -> Result<Option<crate::fsync_probe::FsyncProbe>, BenchError> {
    if opts.probe.is_zero() {
        return Ok(None);
    }
    Ok(Some(crate::fsync_probe::run(dir, opts.probe)?))
}

/// The load generator's runtime (its threads are named `load`).
pub(crate) fn load_runtime() -> Result<tokio::runtime::Runtime, BenchError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("load")
        .build()?)
}

/// A scenario's report, which carries the conditions it was measured under.
pub trait RunContext {
    fn set_context(
        &mut self,
        fsync_probe: Option<crate::fsync_probe::FsyncProbe>,
        load_average: String,
    );
}

/// The node under test, for the length of one scenario run. Owns the in-process node's
/// runtime (so the load generator's tasks never share worker threads with the node) and a
/// second runtime for the load.
pub struct Setup {
    pub base: String,
    pub ws_url: String,
    /// The node certificate's SHA-256, when its HTTP port speaks TLS (`wss://`, `https://`).
    tls_pin: Option<[u8; 32]>,
    /// `quic://host:port?pin=SHA256`, when the node serves QUIC.
    pub quic_url: Option<String>,
    pub admin_token: String,
    /// The in-process node's context (WAL counters); `None` for a target.
    pub ctx: Option<Arc<NodeCtx>>,
    pub fsync_probe: Option<crate::fsync_probe::FsyncProbe>,
    /// The `/proc/loadavg` numbers when the run started.
    pub load_average: String,
    pub load_rt: tokio::runtime::Runtime,
    /// The load generator's shared QUIC endpoint (`--quic-shared-endpoint`).
    quic_endpoint: Option<quinn::Endpoint>,
    batch_in: u32,
    server_pid: Option<u32>,
    node: Option<(tokio::runtime::Runtime, RunningNode)>,
    child: Option<std::process::Child>,
    /// `--cluster`: every node's child process, and every node's WebSocket URL (node 1
    /// first); connections spread over them.
    cluster: Vec<std::process::Child>,
    ws_urls: Vec<String>,
    _tmp: tempfile::TempDir,
}

/// The line a `serve-node` child prints once it listens:
/// `fabric-bench-node ADDR TOKEN QUIC_URL` (`-` without QUIC).
const CHILD_READY: &str = "fabric-bench-node";
/// How long a child node may take to start, and to stop after its stdin closes.
const CHILD_WAIT_MS: u64 = 15_000;

/// The child side of [`NodeOptions::node_process`]: starts a node on `data_dir`, prints the
/// ready line, serves until its stdin closes, then shuts down gracefully.
pub fn serve_node(config: fabric::config::Config) -> Result<(), BenchError> {
    use std::io::{Read, Write};
    crate::stats::raise_nofile(u64::MAX >> 1);
    let rt = config.runtime_builder().thread_name("node").build()?;
    let n = rt.block_on(fabric::node::start(config))?;
    {
        let mut out = std::io::stdout().lock();
        let quic = quic_url(&n).unwrap_or_else(|| "-".into());
        writeln!(out, "{CHILD_READY} {} {} {quic}", n.addr(), n.admin_token())?;
        out.flush()?;
    }
    // Blocks until the parent closes our stdin (or dies): bounded by the parent's life.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    rt.block_on(n.shutdown());
    Ok(())
}

/// `quic://ADDR?pin=SHA256` of a running node, if it serves QUIC.
fn quic_url(n: &RunningNode) -> Option<String> {
    let (addr, pin) = (n.quic_addr()?, n.tls_fingerprint()?);
    Some(format!(
        "quic://{addr}?pin={}",
        fabric::tls::fingerprint_hex(&pin)
    ))
}

/// A started child: the process, base URL, token and QUIC URL.
type Child = (std::process::Child, String, String, Option<String>);

/// Starts this binary's `serve-node` on `data_dir`.
fn spawn_node(opts: &NodeOptions, data_dir: &std::path::Path) -> Result<Child, BenchError> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("serve-node")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--durability")
        .arg(format!("{:?}", opts.durability).to_lowercase());
    if let Some(s) = opts.shards {
        cmd.arg("--shards").arg(s.to_string());
    }
    if let Some(r) = opts.retention_bytes_max {
        cmd.arg("--retention-bytes-max").arg(r.to_string());
    }
    if opts.ws_tls {
        cmd.arg("--ws-tls");
    }
    spawn_child(cmd)
}

/// A replicated cluster of `nodes` nodes written into `dir` (`fabric cluster init`, on free
/// loopback ports), each node this binary's `serve-node --config` in a child process; waits
/// until every node is ready (every shard has a leader). The children, their base URLs (node
/// 1 first) and the admin token.
pub fn spawn_cluster(
    opts: &NodeOptions,
    dir: &std::path::Path,
    nodes: u32,
) -> Result<(Vec<std::process::Child>, Vec<String>, String), BenchError> {
    spawn_cluster_with(opts, dir, nodes, "")
}

/// [`spawn_cluster`], with `top_level` (TOML lines of top-level node keys, such as limits:
/// `retention_bytes_max = 67108864`) put at the head of every `node-i.toml` before the nodes
/// start.
pub fn spawn_cluster_with(
    opts: &NodeOptions,
    dir: &std::path::Path,
    nodes: u32,
    top_level: &str,
) -> Result<(Vec<std::process::Child>, Vec<String>, String), BenchError> {
    let mut init = fabric::cluster::init::InitOptions::new(nodes, dir.to_path_buf());
    init.base_port = fabric::cluster::init::free_base_port(nodes, std::process::id())
        .ok_or_else(|| BenchError::Options("no free block of loopback ports".into()))?;
    if let Some(s) = opts.shards {
        init.shards = s;
    }
    fabric::cluster::init::init(&init).map_err(|e| BenchError::Options(e.to_string()))?;
    // As `fabric cluster local` runs them: the nodes split this machine's cores.
    let share = fabric::cluster::local::worker_threads_share(nodes);
    let top_level = format!("worker_threads = {share}\n{top_level}");
    for i in 1..=nodes {
        let path = dir.join(format!("node-{i}.toml"));
        let written = std::fs::read_to_string(&path)?;
        // Top-level keys must come before the first table (`[cluster]`).
        std::fs::write(&path, format!("{}\n{written}", top_level.trim_end()))?;
    }
    let token = std::fs::read_to_string(dir.join("admin-token"))?
        .trim()
        .to_string();
    let (mut children, mut bases) = (Vec::new(), Vec::new());
    for i in 1..=nodes {
        let (child, base) = spawn_cluster_node(dir, i)?;
        children.push(child);
        bases.push(base);
    }
    wait_cluster_ready(&bases)?;
    Ok((children, bases, token))
}

/// Starts (or restarts, with the same command) node `i` (1-based) of the cluster written
/// into `dir`: this binary's `serve-node --config dir/node-i.toml`. The child and its base URL.
pub fn spawn_cluster_node(
    dir: &std::path::Path,
    i: u32,
) -> Result<(std::process::Child, String), BenchError> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("serve-node")
        .arg("--config")
        .arg(dir.join(format!("node-{i}.toml")));
    let (child, base, _, _) = spawn_child(cmd)?;
    Ok((child, base))
}

/// Waits (at most `CHILD_WAIT_MS`) until every node answers `/readyz` 200.
pub fn wait_cluster_ready(bases: &[String]) -> Result<(), BenchError> {
    let deadline = std::time::Instant::now() + Duration::from_millis(CHILD_WAIT_MS);
    for base in bases {
        let addr = base.trim_start_matches("http://");
        while !ready(addr) {
            if std::time::Instant::now() > deadline {
                return Err(BenchError::Timeout("cluster nodes ready"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// One `GET /readyz` (HTTP/1.1, connection closed after): whether it answered 200.
fn ready(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut head = [0u8; 12];
    s.write_all(req.as_bytes()).is_ok()
        && s.read_exact(&mut head).is_ok()
        && head.starts_with(b"HTTP/1.1 200")
}

/// Runs a `serve-node` child and reads its ready line.
fn spawn_child(mut cmd: std::process::Command) -> Result<Child, BenchError> {
    use std::io::BufRead;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| BenchError::Protocol("child node has no stdout".into()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_millis(CHILD_WAIT_MS))
        .map_err(|_| BenchError::Timeout("child node start"))?;
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(CHILD_READY), Some(addr), Some(token), Some(quic)) => Ok((
            child,
            format!("http://{addr}"),
            token.to_string(),
            (quic != "-").then(|| quic.to_string()),
        )),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            Err(BenchError::Protocol(format!(
                "child node did not start: {line:?}"
            )))
        }
    }
}

impl Setup {
    /// Probes the disk, then starts (or finds) the node.
    // Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
    pub fn start(opts: &NodeOptions) -> Result<Setup, BenchError> {
        let tmp = temp_dir(&opts.data_dir, "fabric-bench-")?;
        let fsync_probe = probe_disk(opts, tmp.path())?;
        let load_average = crate::stats::load_average();
        let mut child = None;
        let mut cluster = Vec::new();
        let mut cluster_bases = Vec::new();
        let (base, admin_token, node, server_pid, quic_url) = match &opts.target {
            Some(t) => (
                t.trim_end_matches('/').to_string(),
                opts.admin_token
                    .clone()
                    .ok_or_else(|| BenchError::Options("--target needs --admin-token".into()))?,
                None,
                opts.server_pid,
                opts.quic_url.clone(),
            ),
            None if opts.cluster.is_some() => {
                let n = opts.cluster.unwrap_or(1);
                let (children, bases, token) = spawn_cluster(opts, &tmp.path().join("cluster"), n)?;
                cluster = children;
                cluster_bases = bases;
                (cluster_bases[0].clone(), token, None, None, None)
            }
            None if opts.node_process => {
                let (c, base, token, quic) = spawn_node(opts, &tmp.path().join("data"))?;
                let pid = c.id();
                child = Some(c);
                (base, token, None, Some(pid), quic)
            }
            None => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .thread_name("node")
                    .build()?;
                let n = rt.block_on(fabric::node::start(opts.config(tmp.path().join("data"))))?;
                let base = format!("http://{}", n.addr());
                let token = n.admin_token().to_string();
                let quic = quic_url(&n);
                (base, token, Some((rt, n)), Some(std::process::id()), quic)
            }
        };
        let load_rt = load_runtime()?;
        // With --ws-tls the HTTP port speaks TLS with the QUIC certificate: its pin is in the
        // QUIC URL.
        let tls_pin = match (opts.ws_tls, &quic_url) {
            (false, _) => None,
            (true, Some(url)) => Some(
                url.split_once("?pin=")
                    .and_then(|(_, p)| fabric::tls::parse_pin(p).ok())
                    .ok_or_else(|| BenchError::Options(format!("{url:?}: no pin")))?,
            ),
            (true, None) => {
                return Err(BenchError::Options(
                    "wss transports need the bench's own node (no --target)".into(),
                ))
            }
        };
        let base = match tls_pin {
            Some(_) => base.replacen("http://", "https://", 1),
            None => base,
        };
        let quic_endpoint = match (&quic_url, opts.quic_shared_endpoint) {
            (Some(url), true) => {
                let addr = url
                    .strip_prefix("quic://")
                    .and_then(|r| r.split('?').next())
                    .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                    .ok_or_else(|| BenchError::Options(format!("{url:?}: no host:port")))?;
                let _in_load_rt = load_rt.enter();
                Some(
                    fabric::quic::client_endpoint(addr)
                        .map_err(|e| BenchError::Protocol(e.to_string()))?,
                )
            }
            _ => None,
        };
        Ok(Setup {
            quic_endpoint,
            batch_in: opts.batch_in,
            ws_url: match tls_pin {
                Some(pin) => format!(
                    "{}/v1/ws?pin={}",
                    base.replacen("https", "wss", 1),
                    fabric::tls::fingerprint_hex(&pin)
                ),
                None => format!("{}/v1/ws", base.replacen("http", "ws", 1)),
            },
            tls_pin,
            quic_url,
            base,
            admin_token,
            ctx: node.as_ref().map(|(_, n)| n.ctx().clone()),
            ws_urls: cluster_bases
                .iter()
                .map(|b| format!("{}/v1/ws", b.replacen("http", "ws", 1)))
                .collect(),
            cluster,
            fsync_probe,
            load_average,
            load_rt,
            server_pid,
            node,
            child,
            _tmp: tmp,
        })
    }

    /// Where a session of `transport` dials.
    pub fn url(&self, transport: Transport) -> Result<&str, BenchError> {
        match transport {
            Transport::Quic => self.quic_url.as_deref().ok_or_else(|| {
                BenchError::Options(
                    "--transport quic: the node serves no QUIC (for --target, give --quic-url)"
                        .into(),
                )
            }),
            t if t.wss() != self.tls_pin.is_some() => Err(BenchError::Options(format!(
                "--transport {}: the node's HTTP port {} TLS",
                t.name(),
                if self.tls_pin.is_some() {
                    "speaks"
                } else {
                    "does not speak"
                }
            ))),
            _ => Ok(&self.ws_url),
        }
    }

    /// Opens one session of `transport` (QUIC from the shared endpoint, if there is one),
    /// asking for batch frames as configured.
    pub async fn connect(
        &self,
        transport: Transport,
        mesh: &str,
        peer: &str,
        token: &str,
    ) -> Result<crate::wire::WsConn, BenchError> {
        crate::wire::WsConn::connect_via(
            self.quic_endpoint.as_ref(),
            self.batch_in,
            self.url(transport)?,
            transport,
            mesh,
            peer,
            token,
        )
        .await
    }

    /// Session `i`'s connection: with `--cluster`, to node `i` modulo the node count (over
    /// WebSocket); else as [`Setup::connect`].
    pub async fn connect_nth(
        &self,
        i: usize,
        transport: Transport,
        mesh: &str,
        peer: &str,
        token: &str,
    ) -> Result<crate::wire::WsConn, BenchError> {
        if self.ws_urls.is_empty() || transport == Transport::Quic {
            return self.connect(transport, mesh, peer, token).await;
        }
        let url = &self.ws_urls[i % self.ws_urls.len()];
        crate::wire::WsConn::connect_via(None, self.batch_in, url, transport, mesh, peer, token)
            .await
    }

    /// The node runs in this process (so samples of it include the load generator).
    pub fn in_process(&self) -> bool {
        self.node.is_some()
    }

    /// Starts sampling the server's process, if its pid is known.
    pub fn sampler(&self) -> Option<ProcSampler> {
        self.server_pid
            .map(|pid| ProcSampler::start(pid, self.in_process()))
    }

    /// The pid the sampler watches (this process in-process, `--server-pid` for a target).
    pub fn sampler_pid(&self) -> Option<u32> {
        self.server_pid
    }

    pub fn admin(&self) -> Admin {
        match self.tls_pin {
            Some(pin) => {
                Admin::with_trust(&self.base, &self.admin_token, &fabric::tls::Trust::Pin(pin))
                    .unwrap_or_else(|_| Admin::new(&self.base, &self.admin_token))
            }
            None => Admin::new(&self.base, &self.admin_token),
        }
    }

    /// Stops the bench's own node gracefully.
    /// Stops the node and stamps the scenario's `result` with the run's fsync probe and load
    /// average: the end of every scenario's `run`.
    pub fn finish_with<R: RunContext>(
        self,
        result: Result<R, BenchError>,
    ) -> Result<R, BenchError> {
        let probe = self.fsync_probe.clone();
        let load = self.load_average.clone();
        self.finish();
        let mut r = result?;
        r.set_context(probe, load);
        Ok(r)
    }

    pub fn finish(self) {
        let Setup {
            node,
            load_rt,
            child,
            cluster,
            ..
        } = self;
        drop(load_rt);
        for mut c in cluster {
            // Closing its stdin is a child's signal to shut down; a cluster node that does
            // not within the wait is killed (the run is over).
            drop(c.stdin.take());
            let deadline = std::time::Instant::now() + Duration::from_millis(CHILD_WAIT_MS);
            while std::time::Instant::now() < deadline && !matches!(c.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some((rt, n)) = node {
            rt.block_on(n.shutdown());
        }
        if let Some(mut c) = child {
            // Closing its stdin is the child's signal to shut down.
            drop(c.stdin.take());
            let deadline = std::time::Instant::now() + Duration::from_millis(CHILD_WAIT_MS);
            while std::time::Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// WAL writes and bytes so far, all shards of an in-process node.
pub fn wal_counters(ctx: &NodeCtx) -> (u64, u64) {
    ctx.slots
        .iter()
        .map(|s| {
            s.stats
                .lock()
                .map_or((0, 0), |st| (st.wal_writes, st.wal_bytes))
        })
        .fold((0, 0), |(w, b), (w1, b1)| (w + w1, b + b1))
}

/// A fresh mesh (named after the clock, so its conversations start at seq 1) with peers
/// `p0..p{n}`, each in `groups`; returns the mesh id and the peers' tokens in order.
pub async fn mesh_with_peers(
    admin: &Admin,
    prefix: &str,
    peers: usize,
    groups: &[&str],
) -> Result<(String, Vec<String>), BenchError> {
    use futures_util::StreamExt;
    let mesh = format!("{prefix}-{}", fabric::now_ms());
    admin.create_mesh(&mesh).await?;
    let mesh_ref = &mesh;
    let tokens: Vec<Result<String, BenchError>> =
        futures_util::stream::iter((0..peers).map(|i| async move {
            admin
                .add_peer(mesh_ref, &peer_id(i), groups)
                .await
                .map_err(BenchError::from)
        }))
        .buffered(ADMIN_CALLS_INFLIGHT_MAX)
        .collect()
        .await;
    let tokens = tokens.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok((mesh, tokens))
}

pub fn peer_id(i: usize) -> String {
    format!("p{i}")
}

/// The sampler's result, if it ran.
pub fn finish_sampler(s: Option<ProcSampler>) -> Option<ProcStats> {
    s.and_then(ProcSampler::finish)
}
