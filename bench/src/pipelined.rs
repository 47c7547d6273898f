//! `pipelined`: C connections, each keeping D durable conversation appends in flight (each
//! connection its own conversation), for a fixed time after a warm-up. Measures acked
//! appends/s and ack latency (request written -> `ok` read), and checks that every
//! conversation's acked seqs are exactly 1..=n (nothing lost, nothing doubled).
//!
//! Two load drivers: `raw` speaks the protocol directly with the proto codec (one task per
//! connection, refilling the window with one batched frame per frame of acks: the least client
//! overhead), and `client` goes through `fabric::client::Client` (what an application gets).
//!
//! Without a target the node runs in-process on its own tokio runtime (so the load generator's
//! tasks never share worker threads with it), on a fresh temp data dir, fsync durability.

use fabric::client::{Admin, Client, ClientConfig, ClientError};
use fabric::config::{Config, Durability};
use fabric::node::{NodeCtx, NodeError};
use fabric_proto::{codec, Body, ClientOp, ServerOp};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// An ack slower than this is taken for a hung node, failing the run instead of hanging it.
const REPLY_TIMEOUT_MS: u64 = 30_000;
/// Most already-received frames the raw driver takes before it writes the refill.
const READ_FRAMES_PER_REFILL_MAX: usize = 1024;
/// Highest latency the histograms track (larger values are clamped): one minute, in µs.
const LATENCY_US_MAX: u64 = 60_000_000;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("node: {0}")]
    Node(#[from] NodeError),
    #[error("client: {0}")]
    Client(#[from] ClientError),
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("histogram: {0}")]
    Histogram(String),
    #[error("invalid options: {0}")]
    Options(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Driver {
    /// The protocol spoken directly with the proto codec.
    Raw,
    /// `fabric::client::Client`.
    Client,
}

impl Driver {
    fn name(self) -> &'static str {
        match self {
            Driver::Raw => "raw",
            Driver::Client => "client",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// `http://host:port` of a running node; `None` starts one in-process.
    pub target: Option<String>,
    /// Admin token of the target node (ignored in-process: the bench makes its own).
    pub admin_token: Option<String>,
    pub connections: usize,
    /// Appends in flight per connection.
    pub depth: usize,
    pub body_bytes: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub binary: bool,
    pub driver: Driver,
    /// Where the temp dir (node data, fsync probe) is made; default the system temp dir.
    pub data_dir: Option<PathBuf>,
    /// fsync probe length; zero skips it.
    pub probe: Duration,
    /// In-process node: shards (default: the node's default, one per core).
    pub shards: Option<u32>,
    /// In-process node: durability (`none` only to see what the disk costs).
    pub durability: Durability,
    /// In-process node: per-shard WAL size that triggers retention (default: the node's).
    pub retention_bytes_max: Option<u64>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            target: None,
            admin_token: None,
            connections: 64,
            depth: 256,
            body_bytes: 128,
            duration: Duration::from_secs(10),
            warmup: Duration::from_millis(1500),
            binary: false,
            driver: Driver::Raw,
            data_dir: None,
            probe: Duration::from_secs(2),
            shards: None,
            durability: Durability::Fsync,
            retention_bytes_max: None,
        }
    }
}

impl Options {
    /// A second of light load: proves the scenario works, measures nothing.
    pub fn smoke() -> Options {
        Options {
            connections: 2,
            depth: 16,
            duration: Duration::from_secs(1),
            warmup: Duration::from_millis(200),
            probe: Duration::from_millis(200),
            ..Options::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub options: Options,
    /// Appends acked inside the measured window.
    pub acked: u64,
    /// Appends acked over the whole run (warm-up and drain included).
    pub acked_total: u64,
    pub measured: Duration,
    pub msgs_per_sec: f64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    /// WAL writes (each one `fdatasync` under fsync durability) in the measured window, all
    /// shards; known only for an in-process node.
    pub wal_fsyncs: Option<u64>,
    /// WAL bytes written in the measured window, all shards (in-process node only).
    pub wal_bytes: Option<u64>,
    /// Every conversation's acked seqs were exactly 1..=n.
    pub seqs_dense: bool,
    /// Per second of the measured window: (acked appends, slowest ack in µs).
    pub seconds: Vec<(u64, u64)>,
    pub fsync_probe: Option<crate::fsync_probe::FsyncProbe>,
}

impl Report {
    pub fn to_json(&self) -> serde_json::Value {
        let o = &self.options;
        serde_json::json!({
            "scenario": "pipelined",
            "target": o.target.clone().unwrap_or_else(|| "in-process".into()),
            "driver": o.driver.name(),
            "encoding": if o.binary { "binary" } else { "json" },
            "connections": o.connections,
            "depth": o.depth,
            "body_bytes": o.body_bytes,
            "duration_secs": self.measured.as_secs_f64(),
            "warmup_secs": o.warmup.as_secs_f64(),
            "durability": self.durability(),
            "acked": self.acked,
            "acked_total": self.acked_total,
            "msgs_per_sec": self.msgs_per_sec,
            "latency_us": {
                "p50": self.p50_us, "p95": self.p95_us, "p99": self.p99_us,
                "p99_9": self.p999_us, "max": self.max_us, "mean": self.mean_us,
            },
            "wal_fsyncs": self.wal_fsyncs,
            "wal_bytes": self.wal_bytes,
            "appends_per_fsync": self.appends_per_fsync(),
            "seqs_dense": self.seqs_dense,
            "per_second": self.seconds.iter().map(|(n, max)| serde_json::json!({"acked": n, "max_us": max})).collect::<Vec<_>>(),
            "fsync_probe": self.fsync_probe.as_ref().map(|p| p.to_json()),
        })
    }

    /// The in-process node's durability; a remote node's is not known here.
    fn durability(&self) -> String {
        match self.options.target {
            Some(_) => "the target's".into(),
            None => format!("{:?}", self.options.durability).to_lowercase(),
        }
    }

    pub fn appends_per_fsync(&self) -> Option<f64> {
        self.wal_fsyncs
            .filter(|n| *n > 0)
            .map(|n| self.acked as f64 / n as f64)
    }

    /// The human-readable summary.
    pub fn table(&self) -> String {
        let o = &self.options;
        let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
        let mut s = format!(
            "pipelined: {} connections x {} in flight, {}-byte bodies, {}, {} driver, {} durability, \
             {:.1} s measured after {:.1} s warm-up, node {}\n",
            o.connections,
            o.depth,
            o.body_bytes,
            if o.binary { "binary" } else { "JSON" },
            o.driver.name(),
            self.durability(),
            self.measured.as_secs_f64(),
            o.warmup.as_secs_f64(),
            o.target.as_deref().unwrap_or("in-process"),
        );
        s += &format!("  {:<22}{:>12.0}\n", "acked appends/s", self.msgs_per_sec);
        for (name, v) in [
            ("p50", self.p50_us),
            ("p95", self.p95_us),
            ("p99", self.p99_us),
            ("p99.9", self.p999_us),
            ("max", self.max_us),
        ] {
            s += &format!("  {:<22}{:>12}\n", format!("ack latency {name}"), ms(v));
        }
        match (self.wal_fsyncs, self.appends_per_fsync()) {
            (Some(n), Some(per)) => {
                s += &format!(
                    "  {:<22}{:>12}  ({:.0}/s, {:.1} appends per fsync)\n",
                    "WAL fsyncs",
                    n,
                    n as f64 / self.measured.as_secs_f64(),
                    per
                )
            }
            _ => s += &format!("  {:<22}{:>12}\n", "WAL fsyncs", "n/a"),
        }
        if let Some(b) = self.wal_bytes {
            s += &format!(
                "  {:<22}{:>12.0}  ({:.0} MB/s)\n",
                "WAL MB written",
                b as f64 / 1e6,
                b as f64 / 1e6 / self.measured.as_secs_f64()
            );
        }
        if self.seconds.len() > 1 {
            let per: Vec<String> = self
                .seconds
                .iter()
                .map(|(n, max)| format!("{}k/{:.0}ms", n / 1000, *max as f64 / 1000.0))
                .collect();
            s += &format!("  per second (acked/max) {}\n", per.join(" "));
        }
        s += &format!(
            "  {:<22}{:>12}\n",
            "seqs dense per conv",
            if self.seqs_dense { "yes" } else { "NO" }
        );
        if let Some(p) = &self.fsync_probe {
            s += &format!(
                "  fsync probe ({} B write + fdatasync, {:.1} s): p50 {}, p99 {}, {:.0} syncs/s\n",
                crate::fsync_probe::WRITE_BYTES,
                p.duration.as_secs_f64(),
                ms(p.p50_us),
                ms(p.p99_us),
                p.syncs_per_sec
            );
            if p.is_slow() {
                s += &format!(
                    "  WARNING: fsync p50 is above {} — the disk is slow or throttling; durable \
                     figures are bounded by it\n",
                    ms(crate::fsync_probe::SLOW_SYNC_P50_US)
                );
            }
        }
        s
    }
}

fn new_histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
        .map_err(|e| BenchError::Histogram(e.to_string()))
}

/// When each connection measures and stops.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    measure_from: Instant,
    measure_until: Instant,
}

/// What one connection saw.
struct ConnResult {
    hist: Histogram<u64>,
    measured: u64,
    seqs: Vec<u64>,
    /// Per second of the measured window: (acks, slowest ack in µs). Shows when stalls happen.
    seconds: Vec<(u64, u64)>,
}

impl ConnResult {
    fn new() -> Result<ConnResult, BenchError> {
        Ok(ConnResult {
            hist: new_histogram()?,
            measured: 0,
            seqs: Vec::new(),
            seconds: Vec::new(),
        })
    }

    fn record(&mut self, s: &Schedule, sent: Instant, now: Instant, seq: u64) {
        if now >= s.measure_from && now < s.measure_until {
            let us = now.saturating_duration_since(sent).as_micros().max(1) as u64;
            self.hist.saturating_record(us);
            self.measured += 1;
            let second = now.saturating_duration_since(s.measure_from).as_secs() as usize;
            if self.seconds.len() <= second {
                self.seconds.resize(second + 1, (0, 0));
            }
            let slot = &mut self.seconds[second];
            slot.0 += 1;
            slot.1 = slot.1.max(us);
        }
        self.seqs.push(seq);
    }
}

/// A JSON body of exactly `bytes` bytes (at least `{"p":""}`).
pub fn padded_body(bytes: usize) -> Body {
    let pad = bytes.saturating_sub(8);
    let text = format!("{{\"p\":\"{}\"}}", "x".repeat(pad));
    Body::from_trusted(text.into_bytes().into())
}

/// Runs the scenario to completion (blocking: it owns its runtimes).
pub fn run(opts: &Options) -> Result<Report, BenchError> {
    if opts.connections == 0 || opts.depth == 0 || opts.duration.is_zero() {
        return Err(BenchError::Options(
            "connections, depth and duration must be positive".into(),
        ));
    }
    let parent = opts.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent)?;
    let tmp = tempfile::Builder::new()
        .prefix("fabric-bench-")
        .tempdir_in(&parent)?;
    let fsync_probe = if opts.probe.is_zero() {
        None
    } else {
        Some(crate::fsync_probe::run(tmp.path(), opts.probe)?)
    };

    let mut node_rt = None;
    let mut node = None;
    let (base, admin_token) = match &opts.target {
        Some(t) => (
            t.trim_end_matches('/').to_string(),
            opts.admin_token
                .clone()
                .ok_or_else(|| BenchError::Options("--target needs --admin-token".into()))?,
        ),
        None => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("node")
                .build()?;
            let defaults = Config::default();
            let config = Config {
                data_dir: tmp.path().join("data"),
                listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                admin_token: Some(fabric::node::new_token()),
                durability: opts.durability,
                retention_bytes_max: opts
                    .retention_bytes_max
                    .unwrap_or(defaults.retention_bytes_max),
                shards: opts.shards.unwrap_or(defaults.shards),
                partitions: defaults.partitions.max(opts.shards.unwrap_or(1)),
                ..defaults
            };
            let n = rt.block_on(fabric::node::start(config))?;
            let out = (format!("http://{}", n.addr()), n.admin_token().to_string());
            node = Some(n);
            node_rt = Some(rt);
            out
        }
    };
    let ctx = node.as_ref().map(|n| n.ctx().clone());

    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("load")
        .build()?;
    let result = load_rt.block_on(scenario(opts, &base, &admin_token, ctx));
    drop(load_rt);
    if let (Some(rt), Some(n)) = (node_rt, node) {
        rt.block_on(n.shutdown());
    }
    let mut report = result?;
    report.fsync_probe = fsync_probe;
    Ok(report)
}

/// WAL writes and bytes so far, all shards.
fn wal_counters(ctx: &NodeCtx) -> (u64, u64) {
    ctx.slots
        .iter()
        .map(|s| {
            s.stats
                .lock()
                .map_or((0, 0), |st| (st.wal_writes, st.wal_bytes))
        })
        .fold((0, 0), |(w, b), (w1, b1)| (w + w1, b + b1))
}

async fn scenario(
    opts: &Options,
    base: &str,
    admin_token: &str,
    ctx: Option<Arc<NodeCtx>>,
) -> Result<Report, BenchError> {
    let admin = Admin::new(base, admin_token);
    // A fresh mesh per run: its conversations start at seq 1, which the density check needs.
    let mesh = format!("bench-{}", fabric::now_ms());
    admin.create_mesh(&mesh).await?;
    let tokens = futures_util::future::try_join_all((0..opts.connections).map(|i| {
        let admin = &admin;
        let mesh = &mesh;
        async move { admin.add_peer(mesh, &format!("p{i}"), &[]).await }
    }))
    .await?;
    let ws_url = format!("{}/v1/ws", base.replacen("http", "ws", 1));
    let body = padded_body(opts.body_bytes);

    // Everybody connects first, so that handshakes are not part of the measurement.
    let mut conns = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let peer = format!("p{i}");
        let conv: Arc<str> = format!("conv-{i}").into();
        let c = match opts.driver {
            Driver::Raw => Conn::Raw(
                Box::new(RawConn::connect(&ws_url, &mesh, &peer, token, opts.binary).await?),
                conv,
            ),
            Driver::Client => {
                let mut cfg = ClientConfig::new(&ws_url, &mesh, &peer, token);
                cfg.binary = opts.binary;
                cfg.window = opts.depth;
                Conn::Client(Arc::new(Client::connect(cfg).await?), conv)
            }
        };
        conns.push(c);
    }

    let start = Instant::now();
    let schedule = Schedule {
        measure_from: start + opts.warmup,
        measure_until: start + opts.warmup + opts.duration,
    };
    let fsyncs = ctx.map(|ctx| {
        tokio::spawn(async move {
            tokio::time::sleep_until(schedule.measure_from.into()).await;
            let before = wal_counters(&ctx);
            tokio::time::sleep_until(schedule.measure_until.into()).await;
            let after = wal_counters(&ctx);
            (after.0 - before.0, after.1 - before.1)
        })
    });
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| {
            let body = body.clone();
            let depth = opts.depth;
            let binary = opts.binary;
            tokio::spawn(async move {
                match c {
                    Conn::Raw(raw, conv) => raw.run(conv, body, depth, binary, schedule).await,
                    Conn::Client(client, conv) => {
                        run_client(client, conv, body, depth, schedule).await
                    }
                }
            })
        })
        .collect();

    let mut hist = new_histogram()?;
    let mut acked = 0;
    let mut acked_total = 0;
    let mut seqs_dense = true;
    let mut seconds: Vec<(u64, u64)> = Vec::new();
    for t in tasks {
        let r = t
            .await
            .map_err(|e| BenchError::Protocol(format!("connection task failed: {e}")))??;
        hist.add(&r.hist)
            .map_err(|e| BenchError::Histogram(e.to_string()))?;
        acked += r.measured;
        acked_total += r.seqs.len() as u64;
        if seconds.len() < r.seconds.len() {
            seconds.resize(r.seconds.len(), (0, 0));
        }
        for (total, (n, max)) in seconds.iter_mut().zip(&r.seconds) {
            total.0 += n;
            total.1 = total.1.max(*max);
        }
        let mut seqs = r.seqs;
        seqs.sort_unstable();
        seqs_dense &= seqs.iter().enumerate().all(|(i, s)| *s == i as u64 + 1);
    }
    let wal = match fsyncs {
        Some(h) => h.await.ok(),
        None => None,
    };
    let measured = opts.duration;
    Ok(Report {
        options: opts.clone(),
        acked,
        acked_total,
        measured,
        msgs_per_sec: acked as f64 / measured.as_secs_f64(),
        p50_us: hist.value_at_quantile(0.5),
        p95_us: hist.value_at_quantile(0.95),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
        mean_us: hist.mean(),
        wal_fsyncs: wal.map(|w| w.0),
        wal_bytes: wal.map(|w| w.1),
        seqs_dense,
        seconds,
        fsync_probe: None,
    })
}

enum Conn {
    Raw(Box<RawConn>, Arc<str>),
    Client(Arc<Client>, Arc<str>),
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A connection driven with the codec directly.
struct RawConn {
    ws: Ws,
}

fn encode(ops: Vec<ClientOp>, binary: bool) -> Result<Message, BenchError> {
    if binary {
        let op = if ops.len() == 1 {
            ops.into_iter()
                .next()
                .ok_or_else(|| BenchError::Protocol("empty".into()))?
        } else {
            ClientOp::Batch(ops)
        };
        Ok(Message::Binary(codec::encode_client_binary(&op).into()))
    } else {
        let mut out = Vec::with_capacity(ops.len() * 192);
        if ops.len() == 1 {
            codec::encode_client_json(&ops[0], &mut out);
        } else {
            out.push(b'[');
            for (i, op) in ops.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                codec::encode_client_json(op, &mut out);
            }
            out.push(b']');
        }
        String::from_utf8(out)
            .map(|s| Message::Text(s.into()))
            .map_err(|_| BenchError::Protocol("JSON encoding is not UTF-8".into()))
    }
}

fn decode(msg: Message) -> Result<Option<Vec<ServerOp>>, BenchError> {
    let ops = match msg {
        Message::Text(t) => codec::decode_server_json(t.as_bytes()),
        Message::Binary(b) => codec::decode_server_binary(&b),
        Message::Close(f) => {
            return Err(BenchError::Protocol(format!(
                "the node closed the connection: {f:?}"
            )))
        }
        _ => return Ok(None),
    };
    ops.map(Some)
        .map_err(|e| BenchError::Protocol(format!("undecodable frame: {e}")))
}

impl RawConn {
    async fn connect(
        url: &str,
        mesh: &str,
        peer: &str,
        token: &str,
        binary: bool,
    ) -> Result<RawConn, BenchError> {
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
        let hello = ClientOp::Hello {
            mesh: mesh.into(),
            peer: peer.into(),
            token: token.to_string(),
        };
        ws.send(encode(vec![hello], binary)?).await?;
        let deadline = Duration::from_millis(REPLY_TIMEOUT_MS);
        loop {
            let msg = tokio::time::timeout(deadline, ws.next())
                .await
                .map_err(|_| BenchError::Timeout("welcome"))?
                .ok_or_else(|| BenchError::Protocol("closed before welcome".into()))??;
            if let Some(op) = decode(msg)?.unwrap_or_default().into_iter().next() {
                match op {
                    ServerOp::Welcome { .. } => return Ok(RawConn { ws }),
                    other => {
                        return Err(BenchError::Protocol(format!(
                            "expected welcome, got {other:?}"
                        )))
                    }
                }
            }
        }
    }

    /// Keeps `depth` appends in flight until the measured window ends, then drains.
    async fn run(
        self,
        conv: Arc<str>,
        body: Body,
        depth: usize,
        binary: bool,
        schedule: Schedule,
    ) -> Result<ConnResult, BenchError> {
        let (mut sink, mut stream) = self.ws.split();
        let mut result = ConnResult::new()?;
        let mut inflight: HashMap<u64, Instant> = HashMap::with_capacity(depth * 2);
        let mut next_ref = 1u64;
        let mut batch = Vec::with_capacity(depth);
        let deadline = Duration::from_millis(REPLY_TIMEOUT_MS);
        let mut now = Instant::now();
        loop {
            if now < schedule.measure_until {
                while inflight.len() < depth {
                    let r = next_ref;
                    next_ref += 1;
                    inflight.insert(r, now);
                    batch.push(ClientOp::Append {
                        r,
                        conv: conv.clone(),
                        body: body.clone(),
                        key: None,
                    });
                    if batch.len() == fabric_proto::BATCH_OPS_MAX {
                        flush(&mut sink, &mut batch, &mut inflight, binary).await?;
                    }
                }
                flush(&mut sink, &mut batch, &mut inflight, binary).await?;
            } else if inflight.is_empty() {
                break;
            }
            let first = tokio::time::timeout(deadline, stream.next())
                .await
                .map_err(|_| BenchError::Timeout("append ack"))?;
            now = Instant::now();
            // Take every frame already received before refilling, so that one frame of new
            // appends answers many acks (the node sends each ack as its own frame).
            let mut next = Some(first);
            let mut frames = 0;
            while let Some(msg) = next.take() {
                let msg = msg.ok_or_else(|| {
                    BenchError::Protocol("the node closed the connection".into())
                })??;
                for op in decode(msg)?.unwrap_or_default() {
                    match op {
                        ServerOp::Ok {
                            r, seq: Some(seq), ..
                        } => {
                            let sent = inflight.remove(&r).ok_or_else(|| {
                                BenchError::Protocol(format!("ok for unknown ref {r}"))
                            })?;
                            result.record(&schedule, sent, now, seq);
                        }
                        other => {
                            return Err(BenchError::Protocol(format!("unexpected frame {other:?}")))
                        }
                    }
                }
                frames += 1;
                if frames < READ_FRAMES_PER_REFILL_MAX {
                    next = stream.next().now_or_never();
                }
            }
        }
        let _ = sink.send(Message::Close(None)).await;
        Ok(result)
    }
}

/// Writes the queued appends as one frame, stamping each with the time it was written.
async fn flush(
    sink: &mut futures_util::stream::SplitSink<Ws, Message>,
    batch: &mut Vec<ClientOp>,
    inflight: &mut HashMap<u64, Instant>,
    binary: bool,
) -> Result<(), BenchError> {
    if batch.is_empty() {
        return Ok(());
    }
    let refs: Vec<u64> = batch.iter().filter_map(ClientOp::reference).collect();
    let msg = encode(std::mem::take(batch), binary)?;
    // Stamped just before the write: the time on the wire and in the node counts, encoding
    // does not.
    let sent = Instant::now();
    for r in refs {
        inflight.insert(r, sent);
    }
    sink.send(msg).await?;
    Ok(())
}

async fn append_once(
    client: Arc<Client>,
    conv: Arc<str>,
    body: Body,
) -> (Instant, Result<u64, ClientError>) {
    let sent = Instant::now();
    let r = client.append_raw(conv, body, None).await;
    (sent, r)
}

/// The same load through `fabric::client::Client`: `depth` appends in flight per client.
async fn run_client(
    client: Arc<Client>,
    conv: Arc<str>,
    body: Body,
    depth: usize,
    schedule: Schedule,
) -> Result<ConnResult, BenchError> {
    let mut result = ConnResult::new()?;
    let mut inflight = FuturesUnordered::new();
    for _ in 0..depth {
        inflight.push(append_once(client.clone(), conv.clone(), body.clone()));
    }
    let deadline = Duration::from_millis(REPLY_TIMEOUT_MS);
    while let Some((sent, r)) = tokio::time::timeout(deadline, inflight.next())
        .await
        .map_err(|_| BenchError::Timeout("append ack"))?
    {
        let now = Instant::now();
        result.record(&schedule, sent, now, r?);
        if now < schedule.measure_until {
            inflight.push(append_once(client.clone(), conv.clone(), body.clone()));
        }
    }
    Ok(result)
}
