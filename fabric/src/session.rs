//! The session task, once for every transport: moves frames between a transport and the
//! transport-neutral session core (`fabric_edge::Session`), and batches between the session and
//! the shards (via a per-session `fabric_router::Router`). A transport (`ws.rs`, `quic.rs`)
//! only says how to read a frame, write one, flush and close; no protocol decision is made
//! here or there.

use crate::metrics::{SessionExport, TransportMetrics};
use crate::node::NodeCtx;
use crate::shard_actor::{SessionMsg, ShardMsg};
use fabric_edge::{OutFrame, Session};
use futures_util::FutureExt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::Instrument;

/// Most frames read from the transport before the session forwards a batch to the shards.
const READ_FRAMES_PER_BATCH_MAX: usize = 256;
/// Most reply batches taken from the shards before the session writes to the transport.
const REPLY_BATCHES_PER_FLUSH_MAX: usize = 64;
/// Where the session's timer rests while the core has no deadline.
const TIMER_IDLE_SECS: u64 = 3600;
/// How long a session closing for node shutdown waits for its in-flight acks.
const SHUTDOWN_DRAIN_MS: u64 = 5_000;

/// One client connection as the session task sees it.
pub(crate) trait Transport: Send {
    /// What one read yields: a frame, or the end of the connection.
    type In: Send;
    /// Waits for the next input. Must be cancel-safe: the task selects it against replies.
    fn recv(&mut self) -> impl Future<Output = Self::In> + Send;
    /// Hands an input to the core; returns false if the transport is finished.
    fn handle_in(core: &mut Session, now: u64, input: Self::In) -> bool;
    /// Queues a frame for writing.
    fn feed(&mut self, frame: OutFrame) -> impl Future<Output = Result<(), String>> + Send;
    /// Writes everything fed so far.
    fn flush(&mut self) -> impl Future<Output = Result<(), String>> + Send;
    /// Tells the client the node is going away (WebSocket 1001, a QUIC application close).
    fn close_for_shutdown(&mut self) -> impl Future<Output = ()> + Send;
    /// Ends the connection when the session is over.
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// Runs one session over `transport` until either side ends it.
pub(crate) async fn run<T: Transport>(
    transport: T,
    ctx: Arc<NodeCtx>,
    transport_name: &'static str,
) {
    let id = ctx.next_session_id();
    // `mesh` and `peer` are filled in once the session is welcomed.
    let span = tracing::info_span!(
        "session",
        node = %ctx.node_name,
        session = id,
        transport = transport_name,
        mesh = tracing::field::Empty,
        peer = tracing::field::Empty,
    );
    let meter = ctx.metrics.transport(transport_name);
    run_session(transport, ctx.clone(), id, meter)
        .instrument(span)
        .await
}

/// Sends a batch to a shard, counting the waits a full queue (backpressure) causes.
async fn send_to_shard(ctx: &NodeCtx, shard: usize, msg: ShardMsg) -> Result<(), ()> {
    match ctx.shards[shard].try_send(msg) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(msg)) => {
            ctx.metrics.shards[shard].queue_full.increment(1);
            ctx.shards[shard].send(msg).await.map_err(|_| ())
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
    }
}

async fn run_session<T: Transport>(
    mut transport: T,
    ctx: Arc<NodeCtx>,
    id: u64,
    meter: &TransportMetrics,
) {
    let mut core = Session::new(id, crate::now_ms(), ctx.session_config.clone());
    // The nonce a key hello on this session must sign (the core has no RNG).
    core.set_challenge_nonce(crate::now_ms(), crate::identity::new_nonce());
    let mut router = ctx.router();
    let (tx, mut rx) = mpsc::channel::<SessionMsg>(ctx.session_queue_max());
    let mut shutdown = ctx.shutdown.clone();
    let mut shutting_down = false;
    let mut drain_deadline = None;
    ctx.sessions_open
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    meter.sessions_opened.increment(1);
    meter.sessions_open.increment(1.0);
    let mut export = ctx.metrics.enabled().then(SessionExport::default);
    let mut identified = false;
    // One timer for the session's life, moved only when its deadline changes: a new `Sleep`
    // per loop iteration would register and cancel a timer-wheel entry (under the driver's
    // lock) for every batch of frames.
    let timer = tokio::time::sleep(Duration::from_secs(TIMER_IDLE_SECS));
    tokio::pin!(timer);
    let mut timer_at: Option<u64> = None;

    'session: loop {
        if let Some(x) = export.as_mut() {
            // Once per iteration: what the last batch of frames or replies changed.
            x.requests_in(meter, core.stats(), Instant::now());
        }
        if !identified {
            if let Some((mesh, peer)) = core.identity() {
                identified = true;
                let span = tracing::Span::current();
                span.record("mesh", &**mesh);
                span.record("peer", &**peer);
            }
        }
        // Requests the core produced go to the shards in per-shard batches. `send` waits when a
        // shard's queue is full: that wait is the backpressure that stops this session's reads.
        while let Some((route, req)) = core.poll_request() {
            router.handle_request(crate::now_ms(), route, req);
        }
        while let Some((shard, requests)) = router.poll_batch() {
            let msg = ShardMsg::Batch {
                session: id,
                tx: tx.clone(),
                requests,
            };
            if send_to_shard(&ctx, shard as usize, msg).await.is_err() {
                break 'session;
            }
        }
        let mut wrote = false;
        while let Some(frame) = core.poll_transmit() {
            if transport.feed(frame).await.is_err() {
                core.handle_transport_closed(crate::now_ms());
                break;
            }
            wrote = true;
        }
        if wrote {
            if transport.flush().await.is_err() {
                core.handle_transport_closed(crate::now_ms());
            } else {
                core.handle_flushed(crate::now_ms());
                if let Some(x) = export.as_mut() {
                    x.answers_out(meter, core.stats(), Instant::now());
                }
            }
            continue;
        }
        if core.is_closed() {
            break;
        }
        if shutting_down
            && (core.inflight() == 0 || drain_deadline.is_some_and(|d| crate::now_ms() >= d))
        {
            transport.close_for_shutdown().await;
            core.handle_transport_closed(crate::now_ms());
            continue;
        }
        let deadline = core.poll_timeout().or(drain_deadline);
        if deadline != timer_at {
            timer_at = deadline;
            let wait = deadline.map_or(Duration::from_secs(TIMER_IDLE_SECS), |t| {
                Duration::from_millis(t.saturating_sub(crate::now_ms()))
            });
            timer.as_mut().reset(tokio::time::Instant::now() + wait);
        }
        let reading = core.wants_read() && !shutting_down;
        tokio::select! {
            input = transport.recv(), if reading => {
                let mut next = Some(input);
                let mut n = 0;
                while let Some(input) = next.take() {
                    if !T::handle_in(&mut core, crate::now_ms(), input) {
                        break;
                    }
                    n += 1;
                    // Take whatever else is already buffered, so the shards get one batch.
                    if n < READ_FRAMES_PER_BATCH_MAX && core.wants_read() && !core.is_closed() {
                        next = transport.recv().now_or_never();
                    }
                }
            }
            msg = rx.recv() => {
                let mut next = msg;
                let mut n = 0;
                while let Some(msg) = next.take() {
                    match msg {
                        SessionMsg::Replies(shard, replies) => {
                            for reply in replies {
                                core.handle_reply(crate::now_ms(), shard, reply);
                            }
                        }
                        SessionMsg::ShardRestarted(shard) => {
                            tracing::warn!(shard, "shard restarted; closing the session so the client resumes");
                            core.handle_shard_restarted(crate::now_ms(), shard);
                        }
                    }
                    n += 1;
                    if n < REPLY_BATCHES_PER_FLUSH_MAX {
                        next = rx.try_recv().ok();
                    }
                }
            }
            _ = shutdown.changed(), if !shutting_down => {
                shutting_down = true;
                drain_deadline = Some(crate::now_ms() + SHUTDOWN_DRAIN_MS);
            }
            _ = &mut timer, if timer_at.is_some() => {
                timer_at = None;
                core.handle_timeout(crate::now_ms());
            }
        }
    }
    // Make sure every shard forgets this session, even if the loop ended on a send error.
    core.handle_transport_closed(crate::now_ms());
    while let Some((route, req)) = core.poll_request() {
        router.handle_request(crate::now_ms(), route, req);
    }
    while let Some((shard, requests)) = router.poll_batch() {
        let _ = ctx.shards[shard as usize]
            .send(ShardMsg::Batch {
                session: id,
                tx: tx.clone(),
                requests,
            })
            .await;
    }
    transport.close().await;
    if let Some(x) = export.as_mut() {
        x.requests_in(meter, core.stats(), Instant::now());
    }
    meter.sessions_open.decrement(1.0);
    ctx.sessions_open
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}
