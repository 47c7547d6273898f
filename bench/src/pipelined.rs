//! `pipelined` and `fire-and-wait`: C connections appending to their own conversation each
//! (so the load spreads over the shards), for a fixed time after a warm-up.
//!
//! - `pipelined` keeps D appends in flight per connection, refilling the window as acks come,
//!   N appends per frame (`--batch`); latency is per append, written -> `ok` read.
//! - `fire-and-wait` sends one batch of B appends (as frames of N), waits for every ack, and
//!   repeats, after a pause if `--interval-ms` is given (TopGun's `send_interval_ms`); latency
//!   is the batch's round trip, written -> last `ok` read. With no interval it is a closed
//!   loop with C x B appends always in flight. Each pause is drawn uniformly from half to one
//!   and a half times the interval (mean: the interval), from a generator seeded by the
//!   connection's index: independent clients do not move in step, while identical fixed
//!   pauses (`--interval-fixed`, TopGun's exact loop) lock every connection that was acked
//!   in one group commit into sending its next batch in the same instant.
//!
//! Both check that every conversation's acked seqs are exactly 1..=n (nothing lost, nothing
//! doubled). Two load drivers: `raw` speaks the protocol with the proto codec (the least client
//! overhead), and `client` goes through `fabric::client::Client` (what an application gets;
//! it batches whatever is queued by itself, so `--batch` does not apply to it).

pub use crate::error::BenchError;
use crate::report::{Report as Figures, Unit};
use crate::setup::{wal_counters, NodeOptions, Setup, Transport};
use crate::stats::{merge, new_histogram, Latency};
use crate::wire::{WsConn, REPLY_TIMEOUT_MS};
use fabric::client::{Client, ClientConfig, ClientError};
use fabric_proto::ConvId;
use fabric_proto::{Body, ClientOp, ServerOp};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most already-received frames the raw driver takes before it writes the refill.
const READ_FRAMES_PER_REFILL_MAX: usize = 1024;

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

/// Keep the window full, or send a whole batch and wait for all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pipelined,
    FireAndWait,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pipelined => "pipelined",
            Mode::FireAndWait => "fire-and-wait",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub node: NodeOptions,
    pub mode: Mode,
    pub connections: usize,
    /// Appends in flight per connection (fire-and-wait: the batch size B).
    pub depth: usize,
    /// Appends per frame, at most `fabric_proto::BATCH_OPS_MAX`.
    pub batch: usize,
    pub body_bytes: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub transport: Transport,
    pub driver: Driver,
    /// fire-and-wait: mean pause between a batch's last ack and the next batch.
    pub interval: Duration,
    /// fire-and-wait: every pause exactly `interval` instead of drawn around it.
    pub interval_fixed: bool,
}

/// Pipeline depth of `pipelined` (FleetLM's hot path: a few appends in flight per connection).
pub const PIPELINED_DEPTH: usize = 5;
/// Pipeline depth of `pipelined --deep`.
pub const PIPELINED_DEPTH_DEEP: usize = 256;

impl Default for Options {
    fn default() -> Options {
        Options {
            node: NodeOptions::default(),
            mode: Mode::Pipelined,
            connections: 64,
            depth: PIPELINED_DEPTH,
            batch: 1,
            body_bytes: 128,
            duration: Duration::from_secs(10),
            warmup: Duration::from_millis(1500),
            transport: Transport::WsJson,
            driver: Driver::Raw,
            interval: Duration::ZERO,
            interval_fixed: false,
        }
    }
}

impl Options {
    /// A second of light load: proves the scenario works, measures nothing.
    pub fn smoke() -> Options {
        Options {
            node: NodeOptions {
                probe: Duration::from_millis(200),
                ..NodeOptions::default()
            },
            connections: 2,
            depth: 16,
            duration: Duration::from_secs(1),
            warmup: Duration::from_millis(200),
            ..Options::default()
        }
    }

    /// TopGun's mode: 200 connections, batches of 10.
    pub fn fire_and_wait() -> Options {
        Options {
            mode: Mode::FireAndWait,
            connections: 200,
            depth: 10,
            batch: 10,
            ..Options::default()
        }
    }

    fn transport(&self) -> Transport {
        self.transport
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
    /// Per append (pipelined) or per batch round trip (fire-and-wait).
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// WAL writes (each one `fdatasync` under fsync durability) in the measured window, all
    /// shards; known only for an in-process node.
    pub wal_fsyncs: Option<u64>,
    /// WAL bytes written in the measured window, all shards (in-process node only).
    pub wal_bytes: Option<u64>,
    /// Every conversation's acked seqs were exactly 1..=n.
    pub seqs_dense: bool,
    /// Per second of the measured window: (acked appends, slowest latency in µs).
    pub seconds: Vec<(u64, u64)>,
    pub fsync_probe: Option<crate::fsync_probe::FsyncProbe>,
    pub server: Option<crate::stats::ProcStats>,
    pub load_average: String,
}

impl Report {
    fn latency_name(&self) -> &'static str {
        match self.options.mode {
            Mode::Pipelined => "ack",
            Mode::FireAndWait => "round_trip",
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = self.figures().to_json();
        let o = &self.options;
        v["driver"] = o.driver.name().into();
        v["acked"] = self.acked.into();
        v["acked_total"] = self.acked_total.into();
        v["seqs_dense"] = self.seqs_dense.into();
        v["wal_fsyncs"] = self.wal_fsyncs.into();
        v["wal_bytes"] = self.wal_bytes.into();
        v["per_second"] = self
            .seconds
            .iter()
            .map(|(n, max)| serde_json::json!({"acked": n, "max_us": max}))
            .collect::<Vec<_>>()
            .into();
        v
    }

    pub fn appends_per_fsync(&self) -> Option<f64> {
        self.wal_fsyncs
            .filter(|n| *n > 0)
            .map(|n| self.acked as f64 / n as f64)
    }

    /// The figures in the shape every scenario shares (for JSON, baselines, NATS ratios).
    pub fn figures(&self) -> Figures {
        let o = &self.options;
        let mut r = Figures::new(
            o.mode.name(),
            "fabric",
            &format!("{} durability, group commit", o.node.durability_name()),
            serde_json::json!({
                "target": o.node.target_name(),
                "transport": o.node.transport_name(o.transport()),
                "batch_in": o.node.batch_in,
                "driver": o.driver.name(),
                "connections": o.connections,
                "depth": o.depth,
                "batch": o.batch,
                "body_bytes": o.body_bytes,
                "duration_secs": self.measured.as_secs_f64(),
                "warmup_secs": o.warmup.as_secs_f64(),
                "interval_ms": o.interval.as_millis() as u64,
                "interval_fixed": o.interval_fixed,
            }),
        );
        r.add("msgs_per_sec", self.msgs_per_sec, Unit::PerSec);
        let l = Latency {
            count: self.acked,
            p50_us: self.p50_us,
            p95_us: self.p95_us,
            p99_us: self.p99_us,
            p999_us: self.p999_us,
            max_us: self.max_us,
        };
        r.add_latency(self.latency_name(), &l);
        if let Some(per) = self.appends_per_fsync() {
            r.add("appends_per_fsync", per, Unit::Ratio);
        }
        if let Some(n) = self.wal_fsyncs {
            r.add(
                "wal_fsyncs_per_sec",
                n as f64 / self.measured.as_secs_f64(),
                Unit::PerSec,
            );
        }
        r.set_server(self.server);
        r.fsync_probe = self.fsync_probe.clone();
        r.load_average = self.load_average.clone();
        if !self.seqs_dense {
            r.notes
                .push("acked seqs were NOT dense per conversation".into());
        }
        if self.seconds.len() > 1 {
            let per: Vec<String> = self
                .seconds
                .iter()
                .map(|(n, max)| format!("{}k/{:.0}ms", n / 1000, *max as f64 / 1000.0))
                .collect();
            r.notes
                .push(format!("per second (acked/max) {}", per.join(" ")));
        }
        r
    }

    /// The human-readable summary.
    pub fn table(&self) -> String {
        self.figures().table()
    }
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
    /// Per second of the measured window: (acks, slowest latency in µs).
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

    fn in_window(s: &Schedule, now: Instant) -> bool {
        now >= s.measure_from && now < s.measure_until
    }

    /// One ack; its latency is recorded unless `latency` is false (fire-and-wait records the
    /// batch instead).
    fn ack(&mut self, s: &Schedule, sent: Instant, now: Instant, seq: u64, latency: bool) {
        if Self::in_window(s, now) {
            self.measured += 1;
            let second = self.second(s, now);
            self.seconds[second].0 += 1;
            if latency {
                self.latency(s, sent, now);
            }
        }
        self.seqs.push(seq);
    }

    fn second(&mut self, s: &Schedule, now: Instant) -> usize {
        let second = now.saturating_duration_since(s.measure_from).as_secs() as usize;
        if self.seconds.len() <= second {
            self.seconds.resize(second + 1, (0, 0));
        }
        second
    }

    fn latency(&mut self, s: &Schedule, sent: Instant, now: Instant) {
        if Self::in_window(s, now) {
            let us = now.saturating_duration_since(sent).as_micros().max(1) as u64;
            self.hist.saturating_record(us);
            let second = self.second(s, now);
            self.seconds[second].1 = self.seconds[second].1.max(us);
        }
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
    if opts.batch == 0 || opts.batch > fabric_proto::BATCH_OPS_MAX {
        return Err(BenchError::Options(format!(
            "--batch must be 1 to {}",
            fabric_proto::BATCH_OPS_MAX
        )));
    }
    let setup = Setup::start(&opts.node)?;
    let result = setup.load_rt.block_on(scenario(opts, &setup));
    let probe = setup.fsync_probe.clone();
    let load = setup.load_average.clone();
    setup.finish();
    let mut report = result?;
    report.fsync_probe = probe;
    report.load_average = load;
    Ok(report)
}

// Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
async fn scenario(opts: &Options, setup: &Setup) -> Result<Report, BenchError> {
    let admin = setup.admin();
    let (mesh, tokens) =
        crate::setup::mesh_with_peers(&admin, "bench", opts.connections, &[]).await?;
    let body = padded_body(opts.body_bytes);

    // Everybody connects first, so that handshakes are not part of the measurement.
    let mut conns = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let peer = crate::setup::peer_id(i);
        let conv: Arc<str> = format!("conv-{i}").into();
        let c = match opts.driver {
            Driver::Raw => Conn::Raw(
                Box::new(
                    setup
                        .connect_nth(i, opts.transport(), &mesh, &peer, token)
                        .await?,
                ),
                conv,
            ),
            Driver::Client => {
                let mut cfg = ClientConfig::new(setup.url(opts.transport())?, &mesh, &peer, token);
                cfg.binary = opts.transport.binary();
                cfg.window = opts.depth;
                Conn::Client(Arc::new(Client::connect(cfg).await?), conv)
            }
        };
        conns.push(c);
    }

    let sampler = setup.sampler();
    let start = Instant::now();
    let schedule = Schedule {
        measure_from: start + opts.warmup,
        measure_until: start + opts.warmup + opts.duration,
    };
    let counter = Arc::new(AtomicU64::new(0));
    let progress = crate::progress::Progress::timed(
        opts.mode.name(),
        opts.warmup + opts.duration,
        counter.clone(),
    );
    let fsyncs = setup.ctx.clone().map(|ctx| {
        tokio::spawn(async move {
            tokio::time::sleep_until(schedule.measure_from.into()).await;
            let before = wal_counters(&ctx);
            tokio::time::sleep_until(schedule.measure_until.into()).await;
            let after = wal_counters(&ctx);
            (after.0 - before.0, after.1 - before.1)
        })
    });
    let wait_all = opts.mode == Mode::FireAndWait;
    let connections = conns.len() as u32;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let body = body.clone();
            let depth = opts.depth;
            let batch = opts.batch;
            let pause = Pause::new(opts.interval, opts.interval_fixed, i as u64);
            // Paced connections start spread over one interval, as independent clients would;
            // started together they stay in step and every batch lands in the same instant.
            let stagger = opts.interval * i as u32 / connections;
            let counter = counter.clone();
            tokio::spawn(async move {
                tokio::time::sleep(stagger).await;
                match c {
                    Conn::Raw(raw, conv) => {
                        let shape = Shape {
                            depth,
                            batch,
                            wait_all,
                            pause,
                        };
                        run_raw(*raw, conv, body, shape, schedule, counter).await
                    }
                    Conn::Client(client, conv) => {
                        let shape = Shape {
                            depth,
                            batch,
                            wait_all,
                            pause,
                        };
                        run_client(client, conv, body, shape, schedule, counter).await
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
        merge(&mut hist, &r.hist)?;
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
    progress.finish();
    let server = crate::setup::finish_sampler(sampler);
    let wal = match fsyncs {
        Some(h) => h.await.ok(),
        None => None,
    };
    let measured = opts.duration;
    let l = Latency::of(&hist);
    Ok(Report {
        options: opts.clone(),
        acked,
        acked_total,
        measured,
        msgs_per_sec: acked as f64 / measured.as_secs_f64(),
        p50_us: l.p50_us,
        p95_us: l.p95_us,
        p99_us: l.p99_us,
        p999_us: l.p999_us,
        max_us: l.max_us,
        wal_fsyncs: wal.map(|w| w.0),
        wal_bytes: wal.map(|w| w.1),
        seqs_dense,
        seconds,
        fsync_probe: None,
        server,
        load_average: String::new(),
    })
}

enum Conn {
    Raw(Box<WsConn>, Arc<str>),
    Client(Arc<Client>, Arc<str>),
}

/// How a raw connection loads the node.
#[derive(Debug, Clone)]
struct Shape {
    depth: usize,
    batch: usize,
    wait_all: bool,
    /// fire-and-wait: the pause after a batch's last ack.
    pause: Pause,
}

/// The pause of one fire-and-wait connection between a batch's last ack and its next batch.
#[derive(Debug, Clone)]
struct Pause {
    mean: Duration,
    fixed: bool,
    rng: rand::rngs::SmallRng,
}

impl Pause {
    fn new(mean: Duration, fixed: bool, seed: u64) -> Pause {
        use rand::SeedableRng;
        Pause {
            mean,
            fixed,
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
        }
    }

    /// Waits one pause: `mean`, or uniform in [mean/2, 3 mean/2]. Nothing without a mean.
    async fn wait(&mut self) {
        use rand::Rng;
        if self.mean.is_zero() {
            return;
        }
        let factor = if self.fixed {
            1.0
        } else {
            self.rng.random_range(0.5..1.5)
        };
        tokio::time::sleep(self.mean.mul_f64(factor)).await;
    }
}

/// Keeps `depth` appends in flight (or sends `depth` and waits for all) until the measured
/// window ends, then drains.
// Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
async fn run_raw(
    mut conn: WsConn,
    conv: Arc<str>,
    body: Body,
    mut shape: Shape,
    schedule: Schedule,
    counter: Arc<AtomicU64>,
) -> Result<ConnResult, BenchError> {
    let mut result = ConnResult::new()?;
    let mut inflight: HashMap<u64, Instant> = HashMap::with_capacity(shape.depth * 2);
    let mut next_ref = 1u64;
    let mut batch = Vec::with_capacity(shape.batch);
    let mut now = Instant::now();
    let mut batch_sent = now;
    loop {
        if now < schedule.measure_until {
            if !shape.wait_all || inflight.is_empty() {
                batch_sent = Instant::now();
                while inflight.len() + batch.len() < shape.depth {
                    let r = next_ref;
                    next_ref += 1;
                    batch.push(ClientOp::Append {
                        r,
                        conv: ConvId::must(&conv),
                        body: body.clone(),
                        key: None,
                    });
                    if batch.len() == shape.batch {
                        flush(&mut conn, &mut batch, &mut inflight).await?;
                    }
                }
                flush(&mut conn, &mut batch, &mut inflight).await?;
                conn.flush().await?;
            }
        } else if inflight.is_empty() {
            break;
        }
        let mut next = Some(conn.next("append ack").await?);
        now = Instant::now();
        // Take every frame already received before refilling, so that one frame of new
        // appends answers many acks (the node sends each ack as its own frame).
        let mut frames = 0;
        while let Some(ops) = next.take() {
            for op in ops {
                match op {
                    ServerOp::Ok {
                        r, seq: Some(seq), ..
                    } => {
                        let sent = inflight.remove(&r).ok_or_else(|| {
                            BenchError::Protocol(format!("ok for unknown ref {r}"))
                        })?;
                        result.ack(&schedule, sent, now, seq, !shape.wait_all);
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        return Err(BenchError::Protocol(format!("unexpected frame {other:?}")))
                    }
                }
            }
            frames += 1;
            if frames < READ_FRAMES_PER_REFILL_MAX {
                next = conn.try_next()?;
            }
        }
        if shape.wait_all && inflight.is_empty() {
            result.latency(&schedule, batch_sent, now);
            if now < schedule.measure_until {
                shape.pause.wait().await;
            }
        }
    }
    conn.close().await;
    Ok(result)
}

/// Queues the appends as one frame, stamping each with the time it was queued (the caller
/// flushes once per refill).
async fn flush(
    conn: &mut WsConn,
    batch: &mut Vec<ClientOp>,
    inflight: &mut HashMap<u64, Instant>,
) -> Result<(), BenchError> {
    if batch.is_empty() {
        return Ok(());
    }
    let refs: Vec<u64> = batch.iter().filter_map(ClientOp::reference).collect();
    // Stamped just before the write: the time on the wire and in the node counts.
    let sent = Instant::now();
    for r in refs {
        inflight.insert(r, sent);
    }
    conn.feed(std::mem::take(batch)).await
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

/// The same load through `fabric::client::Client`.
async fn run_client(
    client: Arc<Client>,
    conv: Arc<str>,
    body: Body,
    mut shape: Shape,
    schedule: Schedule,
    counter: Arc<AtomicU64>,
) -> Result<ConnResult, BenchError> {
    let depth = shape.depth;
    let mut result = ConnResult::new()?;
    let deadline = Duration::from_millis(REPLY_TIMEOUT_MS);
    if shape.wait_all {
        while Instant::now() < schedule.measure_until {
            let sent = Instant::now();
            let all = futures_util::future::join_all(
                (0..depth).map(|_| append_once(client.clone(), conv.clone(), body.clone())),
            );
            let answers = tokio::time::timeout(deadline, all)
                .await
                .map_err(|_| BenchError::Timeout("append ack"))?;
            let now = Instant::now();
            for (_, r) in answers {
                result.ack(&schedule, sent, now, r?, false);
                counter.fetch_add(1, Ordering::Relaxed);
            }
            result.latency(&schedule, sent, now);
            if now < schedule.measure_until {
                shape.pause.wait().await;
            }
        }
        return Ok(result);
    }
    let mut inflight = FuturesUnordered::new();
    for _ in 0..depth {
        inflight.push(append_once(client.clone(), conv.clone(), body.clone()));
    }
    while let Some((sent, r)) = tokio::time::timeout(deadline, inflight.next())
        .await
        .map_err(|_| BenchError::Timeout("append ack"))?
    {
        let now = Instant::now();
        result.ack(&schedule, sent, now, r?, true);
        counter.fetch_add(1, Ordering::Relaxed);
        if now < schedule.measure_until {
            inflight.push(append_once(client.clone(), conv.clone(), body.clone()));
        }
    }
    Ok(result)
}
