//! The WebSocket transport: moves bytes between a socket and the transport-neutral session core
//! (`fabric_edge::Session`), and batches between the session and the shards (via a per-session
//! `fabric_router::Router`). No protocol decision is made here.

use crate::metrics::SessionExport;
use crate::node::NodeCtx;
use crate::shard_actor::{SessionMsg, ShardMsg};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use fabric_edge::{InFrame, Session};
use futures_util::{FutureExt, SinkExt, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::Instrument;

/// Most frames read from the socket before the session forwards a batch to the shards.
const READ_FRAMES_PER_BATCH_MAX: usize = 256;
/// Most reply batches taken from the shards before the session writes to the socket.
const REPLY_BATCHES_PER_FLUSH_MAX: usize = 64;
/// How long a session closing for node shutdown waits for its in-flight acks.
const SHUTDOWN_DRAIN_MS: u64 = 5_000;

pub async fn run(socket: WebSocket, ctx: Arc<NodeCtx>) {
    let id = ctx.next_session_id();
    // `mesh` and `peer` are filled in once the session is welcomed.
    let span = tracing::info_span!(
        "session",
        node = %ctx.node_name,
        session = id,
        transport = "ws",
        mesh = tracing::field::Empty,
        peer = tracing::field::Empty,
    );
    run_session(socket, ctx, id).instrument(span).await
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

async fn run_session(socket: WebSocket, ctx: Arc<NodeCtx>, id: u64) {
    let mut core = Session::new(id, crate::now_ms(), ctx.session_config.clone());
    let mut router = ctx.router();
    let (tx, mut rx) = mpsc::channel::<SessionMsg>(ctx.session_queue_max());
    let (mut sink, mut stream) = socket.split();
    let mut shutdown = ctx.shutdown.clone();
    let mut shutting_down = false;
    let mut drain_deadline = None;
    ctx.sessions_open
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let meter = &ctx.metrics.ws;
    meter.sessions_opened.increment(1);
    meter.sessions_open.increment(1.0);
    let mut export = ctx.metrics.enabled().then(SessionExport::default);
    let mut identified = false;

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
        // shard's queue is full: that wait is the backpressure that stops this socket's reads.
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
            let msg = if frame.binary {
                Message::Binary(frame.bytes.into())
            } else {
                match String::from_utf8(frame.bytes) {
                    Ok(s) => Message::Text(s.into()),
                    Err(_) => continue,
                }
            };
            if sink.feed(msg).await.is_err() {
                core.handle_transport_closed(crate::now_ms());
                break;
            }
            wrote = true;
        }
        if wrote {
            if sink.flush().await.is_err() {
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
            let _ = sink
                .send(Message::Close(Some(CloseFrame {
                    code: 1001,
                    reason: "node shutting down".into(),
                })))
                .await;
            core.handle_transport_closed(crate::now_ms());
            continue;
        }
        let timeout = core
            .poll_timeout()
            .or(drain_deadline)
            .map(|t| Duration::from_millis(t.saturating_sub(crate::now_ms())))
            .unwrap_or(Duration::from_secs(3600));
        let reading = core.wants_read() && !shutting_down;
        tokio::select! {
            frame = stream.next(), if reading => {
                let mut next = Some(frame);
                let mut n = 0;
                while let Some(frame) = next.take() {
                    match frame {
                        Some(Ok(Message::Text(t))) => core.handle_frame(crate::now_ms(), InFrame { binary: false, bytes: t.as_bytes() }),
                        Some(Ok(Message::Binary(b))) => core.handle_frame(crate::now_ms(), InFrame { binary: true, bytes: &b }),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Close(_))) | None => {
                            core.handle_transport_closed(crate::now_ms());
                            break;
                        }
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "websocket read failed");
                            core.handle_transport_closed(crate::now_ms());
                            break;
                        }
                    }
                    n += 1;
                    // Take whatever else is already buffered, so the shards get one batch.
                    if n < READ_FRAMES_PER_BATCH_MAX && core.wants_read() && !core.is_closed() {
                        next = stream.next().now_or_never();
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
            _ = tokio::time::sleep(timeout) => {
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
    let _ = sink.close().await;
    if let Some(x) = export.as_mut() {
        x.requests_in(meter, core.stats(), Instant::now());
    }
    meter.sessions_open.decrement(1.0);
    ctx.sessions_open
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}
