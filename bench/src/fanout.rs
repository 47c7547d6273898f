//! `fanout`: one sender, N subscribers of a group (or of `*`). The sender sends M messages
//! with a window in flight; every subscriber reads and acks its deliveries. Measures
//! deliveries/s (first send -> last delivery) and publish -> deliver latency.

use crate::error::BenchError;
use crate::inbox::{delivered_ratio, run_peer, Plan, Recipients, Shared};
use crate::report::{Report, Unit};
use crate::setup::{peer_id, NodeOptions, Setup, Transport};
use crate::stats::{merge, new_histogram, Latency};
use fabric_proto::GroupId;
use fabric_proto::Target;
use std::time::{Duration, Instant};

/// The group every subscriber is in.
const GROUP: &str = "fan";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FanTo {
    /// `group:fan` (every subscriber is a member; the sender is not).
    Group,
    /// `*` (every peer but the sender).
    All,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub node: NodeOptions,
    pub transport: Transport,
    pub subscribers: usize,
    pub messages: usize,
    /// Sends in flight.
    pub depth: usize,
    pub body_bytes: usize,
    pub to: FanTo,
    pub duration_secs_max: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            node: NodeOptions::default(),
            transport: Transport::WsJson,
            subscribers: 100,
            messages: 2000,
            depth: 64,
            body_bytes: 128,
            to: FanTo::Group,
            duration_secs_max: 120,
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
            subscribers: 3,
            messages: 50,
            duration_secs_max: 30,
            ..Options::default()
        }
    }
}

pub fn run(opts: &Options) -> Result<Report, BenchError> {
    if opts.subscribers == 0 || opts.messages == 0 || opts.depth == 0 {
        return Err(BenchError::Options(
            "fanout needs positive subscribers, messages and depth".into(),
        ));
    }
    let setup = Setup::start(&opts.node)?;
    let result = setup.load_rt.block_on(scenario(opts, &setup));
    setup.finish_with(result)
}

// Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
async fn scenario(opts: &Options, setup: &Setup) -> Result<Report, BenchError> {
    let admin = setup.admin();
    let (mesh, tokens) =
        crate::setup::mesh_with_peers(&admin, "fanout", opts.subscribers, &[GROUP]).await?;
    let sender_token = admin.add_peer(&mesh, "sender", &[]).await?;
    let mut subs = Vec::with_capacity(opts.subscribers);
    for (i, token) in tokens.iter().enumerate() {
        subs.push(
            setup
                .connect(opts.transport, &mesh, &peer_id(i), token)
                .await?,
        );
    }
    let sender = setup
        .connect(opts.transport, &mesh, "sender", &sender_token)
        .await?;
    let sampler = setup.sampler();
    let shared = Shared::new(opts.subscribers, 1);
    let total = (opts.subscribers * opts.messages) as u64;
    let progress = crate::progress::Progress::counted("fanout", total, shared.delivered.clone());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(opts.duration_secs_max);
    let target = match opts.to {
        FanTo::Group => Target::Group(GroupId::must(GROUP)),
        FanTo::All => Target::All,
    };
    let mut tasks = Vec::new();
    for (i, conn) in subs.into_iter().enumerate() {
        let plan = Plan {
            me: Some(i),
            sends_total: 0,
            depth: 1,
            body_bytes: opts.body_bytes,
            pick: Box::new(|| (Target::All, Recipients::All)),
            deadline,
        };
        tasks.push(tokio::spawn(run_peer(conn, plan, shared.clone())));
    }
    let plan = Plan {
        me: None,
        sends_total: opts.messages,
        depth: opts.depth,
        body_bytes: opts.body_bytes,
        pick: Box::new(move || (target.clone(), Recipients::All)),
        deadline,
    };
    tasks.push(tokio::spawn(run_peer(sender, plan, shared.clone())));
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(
            t.await
                .map_err(|e| BenchError::Protocol(format!("peer task failed: {e}")))??,
        );
    }
    progress.finish();
    let server = crate::setup::finish_sampler(sampler);

    let mut publish_ack = new_histogram()?;
    let mut publish_deliver = new_histogram()?;
    let mut first_send = None;
    let mut last_delivery = None;
    for r in &results {
        merge(&mut publish_ack, &r.send_ack)?;
        merge(&mut publish_deliver, &r.send_deliver)?;
        first_send = first_send.or(r.first_send);
        last_delivery = last_delivery.max(r.last_delivery);
    }
    let (expected, got) = delivered_ratio(&results, opts.subscribers);
    let span = match (first_send, last_delivery) {
        (Some(a), Some(b)) => b.saturating_duration_since(a),
        _ => started.elapsed(),
    };
    let mut rep = Report::new(
        "fanout",
        "fabric",
        &format!("{} durability, group commit", opts.node.durability_name()),
        serde_json::json!({
            "target": opts.node.target_name(),
            "transport": opts.node.transport_name(opts.transport),
            "batch_in": opts.node.batch_in,
            "subscribers": opts.subscribers,
            "messages": opts.messages,
            "depth": opts.depth,
            "body_bytes": opts.body_bytes,
            "to": match opts.to { FanTo::Group => "group", FanTo::All => "*" },
        }),
    );
    rep.add(
        "deliveries_per_sec",
        got as f64 / span.as_secs_f64().max(1e-9),
        Unit::PerSec,
    );
    rep.add(
        "delivered_ratio",
        if expected == 0 {
            0.0
        } else {
            got as f64 / expected as f64
        },
        Unit::Ratio,
    );
    rep.add("elapsed_secs", span.as_secs_f64(), Unit::Secs);
    rep.add_latency("publish_deliver", &Latency::of(&publish_deliver));
    rep.add_latency("publish_ack", &Latency::of(&publish_ack));
    rep.set_server(server);
    Ok(rep)
}
