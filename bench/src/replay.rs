//! `replay`: readers replay conversations from seq 1 while appends continue. First R
//! conversations are preloaded with L entries each; then W writers keep D appends in flight
//! on their own conversations for two windows: alone, then while R readers replay the
//! preloaded conversations from seq 1 over and over (subscribe from 1, read to L, unsubscribe).
//! Measures replayed events/s and the writers' ack latency in both windows.

use crate::error::BenchError;
use crate::report::{Report, Unit};
use crate::setup::{peer_id, NodeOptions, Setup, Transport};
use crate::stats::{merge, new_histogram, Latency};
use crate::wire::WsConn;
use fabric_proto::ConvId;
use fabric_proto::{Body, ClientOp, ServerOp};
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Appends in flight per preloading connection.
const PRELOAD_DEPTH: usize = 512;

#[derive(Debug, Clone)]
pub struct Options {
    pub node: NodeOptions,
    pub transport: Transport,
    pub readers: usize,
    /// Entries preloaded into each reader's conversation.
    pub entries: u64,
    pub writers: usize,
    /// Appends in flight per writer.
    pub depth: usize,
    pub body_bytes: usize,
    /// Each of the two windows (writers alone, writers with replay).
    pub duration: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            node: NodeOptions::default(),
            transport: Transport::WsJson,
            readers: 4,
            entries: 20_000,
            writers: 16,
            depth: 32,
            body_bytes: 128,
            duration: Duration::from_secs(3),
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
            readers: 2,
            entries: 500,
            writers: 2,
            depth: 8,
            duration: Duration::from_millis(600),
            ..Options::default()
        }
    }
}

pub fn run(opts: &Options) -> Result<Report, BenchError> {
    if opts.readers == 0 || opts.entries == 0 || opts.writers == 0 || opts.depth == 0 {
        return Err(BenchError::Options(
            "replay needs positive readers, entries, writers and depth".into(),
        ));
    }
    let setup = Setup::start(&opts.node)?;
    let result = setup.load_rt.block_on(scenario(opts, &setup));
    setup.finish_with(result)
}

fn reader_conv(i: usize) -> Arc<str> {
    format!("replay-{i}").into()
}

/// Appends `n` entries to `conv` with a deep window; returns when all are acked.
async fn preload(conn: &mut WsConn, conv: Arc<str>, body: &Body, n: u64) -> Result<(), BenchError> {
    let mut next = 1u64;
    let mut acked = 0u64;
    while acked < n {
        let mut ops = Vec::new();
        while next <= n
            && next - 1 - acked < PRELOAD_DEPTH as u64
            && ops.len() < fabric_proto::BATCH_OPS_MAX
        {
            ops.push(ClientOp::Append {
                r: next,
                conv: ConvId::must(&conv),
                body: body.clone(),
                key: None,
            });
            next += 1;
        }
        if !ops.is_empty() {
            conn.send(ops).await?;
        }
        for op in conn.next("preload ack").await? {
            match op {
                ServerOp::Ok { .. } => acked += 1,
                other => return Err(BenchError::Protocol(format!("unexpected frame {other:?}"))),
            }
        }
    }
    Ok(())
}

struct WriterResult {
    alone: Histogram<u64>,
    during: Histogram<u64>,
    acked_alone: u64,
    acked_during: u64,
}

async fn writer(
    mut conn: WsConn,
    conv: Arc<str>,
    body: Body,
    depth: usize,
    replay_from: Instant,
    until: Instant,
) -> Result<WriterResult, BenchError> {
    let mut res = WriterResult {
        alone: new_histogram()?,
        during: new_histogram()?,
        acked_alone: 0,
        acked_during: 0,
    };
    let mut inflight: HashMap<u64, Instant> = HashMap::new();
    let mut next_ref = 1u64;
    loop {
        let now = Instant::now();
        if now < until {
            let mut ops = Vec::new();
            while inflight.len() < depth {
                inflight.insert(next_ref, now);
                ops.push(ClientOp::Append {
                    r: next_ref,
                    conv: ConvId::must(&conv),
                    body: body.clone(),
                    key: None,
                });
                next_ref += 1;
            }
            if !ops.is_empty() {
                conn.send(ops).await?;
            }
        } else if inflight.is_empty() {
            break;
        }
        let ops = conn.next("append ack").await?;
        let now = Instant::now();
        for op in ops {
            match op {
                ServerOp::Ok { r, .. } => {
                    let sent = inflight
                        .remove(&r)
                        .ok_or_else(|| BenchError::Protocol(format!("ok for unknown ref {r}")))?;
                    let us = now.saturating_duration_since(sent).as_micros().max(1) as u64;
                    if now >= until {
                        // Drain after the windows: not measured.
                    } else if now >= replay_from {
                        res.during.saturating_record(us);
                        res.acked_during += 1;
                    } else {
                        res.alone.saturating_record(us);
                        res.acked_alone += 1;
                    }
                }
                other => return Err(BenchError::Protocol(format!("unexpected frame {other:?}"))),
            }
        }
    }
    conn.close().await;
    Ok(res)
}

/// Replays `conv` from seq 1 to `entries`, again and again, until `until`; returns events read.
async fn reader(
    mut conn: WsConn,
    conv: Arc<str>,
    entries: u64,
    start: Instant,
    until: Instant,
    counter: Arc<AtomicU64>,
) -> Result<(u64, u64), BenchError> {
    tokio::time::sleep_until(start.into()).await;
    let mut events = 0u64;
    let mut passes = 0u64;
    let mut r = 1u64;
    'passes: while Instant::now() < until {
        conn.send(vec![ClientOp::Subscribe {
            r,
            conv: ConvId::must(&conv),
            from: 1,
        }])
        .await?;
        r += 1;
        let mut last = 0u64;
        while last < entries {
            for op in conn.next("replay event").await? {
                match op {
                    ServerOp::Ok { .. } => {}
                    ServerOp::Event(e) => {
                        if e.seq != last + 1 {
                            return Err(BenchError::Protocol(format!(
                                "replay of {conv} jumped from seq {last} to {}",
                                e.seq
                            )));
                        }
                        last = e.seq;
                        events += 1;
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        return Err(BenchError::Protocol(format!("unexpected frame {other:?}")))
                    }
                }
            }
            if Instant::now() >= until {
                break 'passes;
            }
        }
        passes += 1;
        let unsub = r;
        r += 1;
        conn.send(vec![ClientOp::Unsubscribe {
            r: unsub,
            conv: ConvId::must(&conv),
        }])
        .await?;
        // Events of this pass may still be queued before the unsubscribe's ok.
        'wait: loop {
            for op in conn.next("unsubscribe ok").await? {
                if matches!(op, ServerOp::Ok { r, .. } if r == unsub) {
                    break 'wait;
                }
            }
        }
    }
    conn.close().await;
    Ok((events, passes))
}

// Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
async fn scenario(opts: &Options, setup: &Setup) -> Result<Report, BenchError> {
    let admin = setup.admin();
    let peers = opts.readers + opts.writers;
    let (mesh, tokens) = crate::setup::mesh_with_peers(&admin, "replay", peers, &[]).await?;
    let body = crate::pipelined::padded_body(opts.body_bytes);
    let mut conns = Vec::with_capacity(peers);
    for (i, token) in tokens.iter().enumerate() {
        conns.push(
            setup
                .connect(opts.transport, &mesh, &peer_id(i), token)
                .await?,
        );
    }
    let writers: Vec<WsConn> = conns.split_off(opts.readers);
    let mut readers = conns;
    let preload_started = Instant::now();
    let preloads = readers
        .iter_mut()
        .enumerate()
        .map(|(i, c)| preload(c, reader_conv(i), &body, opts.entries));
    futures_util::future::try_join_all(preloads).await?;
    let preload_secs = preload_started.elapsed().as_secs_f64();

    let sampler = setup.sampler();
    let counter = Arc::new(AtomicU64::new(0));
    let progress = crate::progress::Progress::timed("replay", opts.duration * 2, counter.clone());
    let started = Instant::now();
    let replay_from = started + opts.duration;
    let until = replay_from + opts.duration;
    let w: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let conv: Arc<str> = format!("write-{i}").into();
            tokio::spawn(writer(
                c,
                conv,
                body.clone(),
                opts.depth,
                replay_from,
                until,
            ))
        })
        .collect();
    // Readers run on a runtime of their own: decoding a replay is the heaviest client work
    // here, and sharing the writers' workers would stall the writers in the load generator
    // itself, which would then be measured as a slow node.
    let reader_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("load-replay")
        .build()?;
    let r: Vec<_> = readers
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            reader_rt.spawn(reader(
                c,
                reader_conv(i),
                opts.entries,
                replay_from,
                until,
                counter.clone(),
            ))
        })
        .collect();
    let mut alone = new_histogram()?;
    let mut during = new_histogram()?;
    let (mut acked_alone, mut acked_during) = (0, 0);
    for t in w {
        let x = t
            .await
            .map_err(|e| BenchError::Protocol(format!("writer failed: {e}")))??;
        merge(&mut alone, &x.alone)?;
        merge(&mut during, &x.during)?;
        acked_alone += x.acked_alone;
        acked_during += x.acked_during;
    }
    let (mut events, mut passes) = (0, 0);
    for t in r {
        let (e, p) = t
            .await
            .map_err(|e| BenchError::Protocol(format!("reader failed: {e}")))??;
        events += e;
        passes += p;
    }
    progress.finish();
    reader_rt.shutdown_background();
    let server = crate::setup::finish_sampler(sampler);
    let secs = opts.duration.as_secs_f64();
    let mut rep = Report::new(
        "replay",
        "fabric",
        &format!("{} durability, group commit", opts.node.durability_name()),
        serde_json::json!({
            "target": opts.node.target_name(),
            "transport": opts.node.transport_name(opts.transport),
            "batch_in": opts.node.batch_in,
            "readers": opts.readers,
            "entries_per_conversation": opts.entries,
            "writers": opts.writers,
            "depth": opts.depth,
            "body_bytes": opts.body_bytes,
            "window_secs": secs,
        }),
    );
    rep.add("replay_events_per_sec", events as f64 / secs, Unit::PerSec);
    rep.add("replay_passes", passes as f64, Unit::Count);
    rep.add("preload_secs", preload_secs, Unit::Secs);
    rep.add(
        "write_alone_per_sec",
        acked_alone as f64 / secs,
        Unit::PerSec,
    );
    rep.add(
        "write_during_replay_per_sec",
        acked_during as f64 / secs,
        Unit::PerSec,
    );
    rep.add_latency("write_alone", &Latency::of(&alone));
    rep.add_latency("write_during_replay", &Latency::of(&during));
    rep.set_server(server);
    Ok(rep)
}
