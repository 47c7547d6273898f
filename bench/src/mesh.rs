//! `mesh` (claudemesh's test): P peers each send M direct messages to random other peers,
//! keeping a window in flight, while reading and acking their own inbox. Measures send -> ack
//! and send -> deliver latency, the delivered ratio (unique deliveries per recipient counted
//! against what was acked), and the server's peak RSS and open FDs.

use crate::error::BenchError;
use crate::inbox::{delivered_ratio, run_peer, Plan, Recipients, Shared};
use crate::report::{Report, Unit};
use crate::setup::{peer_id, NodeOptions, Setup, Transport};
use crate::stats::{merge, new_histogram, Latency};
use fabric_proto::PeerId;
use fabric_proto::Target;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Options {
    pub node: NodeOptions,
    pub transport: Transport,
    pub peers: usize,
    /// Direct messages each peer sends.
    pub messages: usize,
    /// Sends in flight per peer.
    pub depth: usize,
    pub body_bytes: usize,
    /// The whole run (sends and deliveries) must finish within this.
    pub duration_secs_max: u64,
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            node: NodeOptions::default(),
            transport: Transport::WsJson,
            peers: 100,
            messages: 1000,
            depth: 32,
            body_bytes: 128,
            duration_secs_max: 120,
            seed: 1,
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
            peers: 4,
            messages: 50,
            duration_secs_max: 30,
            ..Options::default()
        }
    }
}

pub fn run(opts: &Options) -> Result<Report, BenchError> {
    if opts.peers < 2 || opts.messages == 0 || opts.depth == 0 {
        return Err(BenchError::Options(
            "mesh needs at least 2 peers, and positive messages and depth".into(),
        ));
    }
    let setup = Setup::start(&opts.node)?;
    let result = setup.load_rt.block_on(scenario(opts, &setup));
    setup.finish_with(result)
}

// Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
async fn scenario(opts: &Options, setup: &Setup) -> Result<Report, BenchError> {
    let admin = setup.admin();
    let (mesh, tokens) = crate::setup::mesh_with_peers(&admin, "mesh", opts.peers, &[]).await?;
    let mut conns = Vec::with_capacity(opts.peers);
    for (i, token) in tokens.iter().enumerate() {
        conns.push(
            setup
                .connect(opts.transport, &mesh, &peer_id(i), token)
                .await?,
        );
    }
    let sampler = setup.sampler();
    let shared = Shared::new(opts.peers, opts.peers);
    let total = (opts.peers * opts.messages) as u64;
    let progress = crate::progress::Progress::counted("mesh", total, shared.delivered.clone());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(opts.duration_secs_max);
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| {
            let peers = opts.peers;
            let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed.wrapping_add(i as u64));
            let pick = move || {
                // A random peer other than the sender.
                let mut j = rng.random_range(0..peers - 1);
                if j >= i {
                    j += 1;
                }
                (Target::Peer(PeerId::must(&peer_id(j))), Recipients::One(j))
            };
            let plan = Plan {
                me: Some(i),
                sends_total: opts.messages,
                depth: opts.depth,
                body_bytes: opts.body_bytes,
                pick: Box::new(pick),
                deadline,
            };
            tokio::spawn(run_peer(conn, plan, shared.clone()))
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(
            t.await
                .map_err(|e| BenchError::Protocol(format!("peer task failed: {e}")))??,
        );
    }
    let elapsed = started.elapsed();
    progress.finish();
    let first_send = results.iter().filter_map(|r| r.first_send).min();
    let last_ack = results.iter().filter_map(|r| r.last_ack).max();
    let send_span = match (first_send, last_ack) {
        (Some(a), Some(b)) => b.saturating_duration_since(a),
        _ => elapsed,
    };
    let server = crate::setup::finish_sampler(sampler);

    let mut send_ack = new_histogram()?;
    let mut send_deliver = new_histogram()?;
    let mut duplicates = 0;
    for r in &results {
        merge(&mut send_ack, &r.send_ack)?;
        merge(&mut send_deliver, &r.send_deliver)?;
        duplicates += r.duplicates;
    }
    let (expected, got) = delivered_ratio(&results, opts.peers);
    let acked: u64 = results.iter().map(|r| r.acked.len() as u64).sum();
    let mut rep = Report::new(
        "mesh",
        "fabric",
        &format!("{} durability, group commit", opts.node.durability_name()),
        serde_json::json!({
            "target": opts.node.target_name(),
            "transport": opts.node.transport_name(opts.transport),
            "batch_in": opts.node.batch_in,
            "peers": opts.peers,
            "messages_per_peer": opts.messages,
            "depth": opts.depth,
            "body_bytes": opts.body_bytes,
        }),
    );
    rep.add("sent", total as f64, Unit::Count);
    rep.add("acked", acked as f64, Unit::Count);
    rep.add(
        "delivered_ratio",
        if expected == 0 {
            0.0
        } else {
            got as f64 / expected as f64
        },
        Unit::Ratio,
    );
    rep.add("duplicate_deliveries", duplicates as f64, Unit::Count);
    rep.add(
        "msgs_per_sec",
        acked as f64 / send_span.as_secs_f64().max(1e-9),
        Unit::PerSec,
    );
    rep.add("elapsed_secs", elapsed.as_secs_f64(), Unit::Secs);
    rep.add_latency("send_ack", &Latency::of(&send_ack));
    rep.add_latency("send_deliver", &Latency::of(&send_deliver));
    rep.set_server(server);
    if setup.in_process() {
        rep.notes
            .push("in-process: RSS, FDs and whole-process CPU include the load generator".into());
    }
    Ok(rep)
}
