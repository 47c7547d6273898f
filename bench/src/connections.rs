//! `connections`: K idle authenticated sessions. Creates K peers, raises this process's
//! open-file limit, connects them all (a bounded number of handshakes at once), then reports
//! the time to connect all, handshake latency, and the server's RSS per session (RSS growth
//! from before the first connection to after the last, divided by K).

use crate::error::BenchError;
use crate::report::{Report, Unit};
use crate::setup::{peer_id, NodeOptions, Setup, Transport};
use crate::stats::{fd_count, new_histogram, rss_bytes, Latency};
use crate::wire::WsConn;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// File descriptors kept free beyond the sessions' own (listener, WAL, runtime, stdio).
const FDS_SPARE: u64 = 1024;
/// Settling time after the last handshake before RSS is read.
const SETTLE_MS: u64 = 500;

#[derive(Debug, Clone)]
pub struct Options {
    pub node: NodeOptions,
    pub transport: Transport,
    pub sessions: usize,
    /// Handshakes in flight at once.
    pub connect_inflight: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            node: NodeOptions::default(),
            transport: Transport::WsJson,
            sessions: 10_000,
            connect_inflight: 128,
        }
    }
}

impl Options {
    pub fn smoke() -> Options {
        Options {
            node: NodeOptions {
                probe: Duration::from_millis(200),
                ..NodeOptions::default()
            },
            sessions: 50,
            connect_inflight: 16,
            ..Options::default()
        }
    }
}

pub fn run(opts: &Options) -> Result<Report, BenchError> {
    if opts.sessions == 0 || opts.connect_inflight == 0 {
        return Err(BenchError::Options(
            "connections needs positive sessions and connect-inflight".into(),
        ));
    }
    let mut node = opts.node.clone();
    let mut notes = Vec::new();
    // One fd per client socket, and in-process one more per server socket.
    let want_in_process = opts.sessions as u64 * 2 + FDS_SPARE;
    let want_alone = opts.sessions as u64 + FDS_SPARE;
    let mut limit = crate::stats::raise_nofile(want_in_process);
    if node.target.is_none() && !node.node_process && limit < want_in_process {
        // Both ends do not fit in this process's limit (it cannot be raised past the hard
        // limit unprivileged): the node moves to a child process with its own limit.
        node.node_process = true;
        notes.push(format!(
            "{} sessions need {want_in_process} fds in one process, the hard limit is {limit}: the node ran as a child process",
            opts.sessions
        ));
    }
    if node.target.is_some() || node.node_process {
        limit = crate::stats::raise_nofile(want_alone);
        if limit < want_alone {
            return Err(BenchError::Options(format!(
                "{} sessions need about {want_alone} open files; the limit is {limit}",
                opts.sessions
            )));
        }
    }
    let opts = &Options {
        node,
        ..opts.clone()
    };
    let setup = Setup::start(&opts.node)?;
    let result = setup.load_rt.block_on(scenario(opts, &setup));
    let mut r = setup.finish_with(result)?;
    r.notes.extend(notes);
    r.notes
        .push(format!("open-file limit of the load generator: {limit}"));
    Ok(r)
}

// Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
async fn scenario(opts: &Options, setup: &Setup) -> Result<Report, BenchError> {
    let admin = setup.admin();
    let (mesh, tokens) = crate::setup::mesh_with_peers(&admin, "conns", opts.sessions, &[]).await?;
    let pid = setup
        .sampler_pid()
        .ok_or_else(|| BenchError::Options("--target needs --server-pid to measure RSS".into()))?;
    let sampler = setup.sampler();
    tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
    let rss_before = rss_bytes(pid);
    let fds_before = fd_count(pid);
    let counter = Arc::new(AtomicU64::new(0));
    let progress =
        crate::progress::Progress::counted("connections", opts.sessions as u64, counter.clone());
    let started = Instant::now();
    let mesh_ref = &mesh;
    let transport = opts.transport;
    setup.url(transport)?;
    let results: Vec<Result<(WsConn, u64), BenchError>> =
        futures_util::stream::iter(tokens.iter().enumerate().map(|(i, token)| {
            let counter = counter.clone();
            async move {
                let t = Instant::now();
                let c = setup
                    .connect(transport, mesh_ref, &peer_id(i), token)
                    .await?;
                counter.fetch_add(1, Ordering::Relaxed);
                Ok((c, t.elapsed().as_micros().max(1) as u64))
            }
        }))
        .buffer_unordered(opts.connect_inflight)
        .collect()
        .await;
    let connect_secs = started.elapsed().as_secs_f64();
    progress.finish();
    let mut hist = new_histogram()?;
    let mut conns = Vec::with_capacity(results.len());
    for r in results {
        let (c, us) = r?;
        hist.saturating_record(us);
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
    let rss_after = rss_bytes(pid);
    let fds_after = fd_count(pid);
    let server = crate::setup::finish_sampler(sampler);
    let n = conns.len() as f64;
    let mut rep = Report::new(
        "connections",
        "fabric",
        &opts.node.durability_name(),
        serde_json::json!({
            "target": opts.node.target_name(),
            "transport": opts.transport.name(),
            "sessions": opts.sessions,
            "connect_inflight": opts.connect_inflight,
        }),
    );
    rep.add("sessions", n, Unit::Count);
    rep.add("connect_all_secs", connect_secs, Unit::Secs);
    rep.add("connects_per_sec", n / connect_secs.max(1e-9), Unit::PerSec);
    rep.add_latency("handshake", &Latency::of(&hist));
    rep.add(
        "rss_per_session_bytes",
        rss_after.saturating_sub(rss_before) as f64 / n,
        Unit::Bytes,
    );
    rep.add("rss_before_bytes", rss_before as f64, Unit::Bytes);
    rep.add("rss_after_bytes", rss_after as f64, Unit::Bytes);
    rep.add(
        "fds_per_session",
        fds_after.saturating_sub(fds_before) as f64 / n,
        Unit::Ratio,
    );
    rep.set_server(server);
    if setup.in_process() {
        rep.notes.push(
            "in-process: RSS and FDs per session count both ends (client and server) of each \
             connection; use --target with --server-pid for the server alone"
                .into(),
        );
    }
    futures_util::future::join_all(conns.into_iter().map(WsConn::close)).await;
    Ok(rep)
}
