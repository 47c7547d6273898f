//! The session task, once for every transport: moves frames between a transport and the
//! transport-neutral session core (`fabric_edge::Session`), and batches between the session and
//! the shards (via a per-session `fabric_router::Router`). A transport (`ws.rs`, `quic.rs`)
//! only says how to read a frame, queue one, write and close; no protocol decision is made
//! here or there: deadlines (hello, writes, pings, pongs) are the core's timers, and every
//! write is raced against them, so a client that stops reading cannot hold a session (or its
//! hello deadline) hostage.

use crate::metrics::{SessionExport, TransportMetrics};
use crate::node::NodeCtx;
use crate::shard_actor::{SessionMsg, ShardMsg};
use fabric_edge::{OutFrame, Session};
use futures_util::FutureExt;
use std::future::Future;
use std::pin::Pin;
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
/// Longest a transport's closing handshake may take (a close frame, a QUIC linger): the peer
/// may be the one that stopped reading.
const CLOSE_WAIT_MS: u64 = 2_000;

/// Why a transport cannot go on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    #[error("write failed: {0}")]
    Write(String),
    #[error("a text frame was not UTF-8")]
    NotUtf8,
}

/// What [`Transport::next`] saw.
pub(crate) enum Event<I> {
    In(I),
    Wrote(Result<(), TransportError>),
}

/// One client connection as the session task sees it.
pub(crate) trait Transport: Send {
    /// What one read yields: a frame, or the end of the connection.
    type In: Send;
    /// Whether the core pings the peer through this transport (WebSocket ping frames); a
    /// transport with keepalives of its own (QUIC) says false.
    const PINGS: bool;
    /// Waits for the next input. Must be cancel-safe: the task selects it against replies.
    fn recv(&mut self) -> impl Future<Output = Self::In> + Send;
    /// Hands an input to the core; returns false if the transport is finished.
    fn handle_in(&mut self, core: &mut Session, now: u64, input: Self::In) -> bool;
    /// Queues a frame for writing; no I/O (so nothing is lost to a cancelled write).
    fn feed(&mut self, frame: OutFrame) -> Result<(), TransportError>;
    /// Queues a transport ping.
    fn feed_ping(&mut self, payload: u64);
    /// Writes what was queued until some of it moved (or everything is written). Cancel-safe:
    /// the session races it against its deadlines and calls it again.
    fn write(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// The next input (when `reading`) or write progress (when anything is pending), whichever
    /// comes first; pending forever when neither. Cancel-safe.
    fn next(&mut self, reading: bool) -> impl Future<Output = Event<Self::In>> + Send;
    /// Tells the core what the writes since the last report did (progress, a finished flush
    /// with the push credit it returns, per-stream state); true once the main stream has
    /// written everything queued on it.
    fn report(&mut self, core: &mut Session, now: u64) -> bool;
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

/// The core's next deadline as one timer, moved only when the deadline changes: a new `Sleep`
/// per loop iteration would register and cancel a timer-wheel entry (under the driver's lock)
/// for every batch of frames.
struct Timer {
    sleep: Pin<Box<tokio::time::Sleep>>,
    at: Option<u64>,
}

impl Timer {
    fn new() -> Timer {
        Timer {
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(TIMER_IDLE_SECS))),
            at: None,
        }
    }

    fn arm(&mut self, deadline: Option<u64>) {
        if deadline != self.at {
            self.at = deadline;
            let wait = deadline.map_or(Duration::from_secs(TIMER_IDLE_SECS), |t| {
                Duration::from_millis(t.saturating_sub(crate::now_ms()))
            });
            self.sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + wait);
        }
    }

    /// Resolves at the deadline; never while none is armed. Cancel-safe.
    async fn fired(&mut self) {
        if self.at.is_none() {
            return std::future::pending().await;
        }
        (&mut self.sleep).await;
        self.at = None;
    }
}

/// Why the session loop stopped.
enum Ended {
    /// Every shard must still be told; the transport is closed normally.
    Normally,
    /// A write timed out: the transport is dropped without a closing handshake.
    Abandoned,
}

/// Queues what the core has for the client (frames, a due ping) and writes it, racing every
/// write against the core's deadlines; `Err` when the session must end now.
async fn write_out<T: Transport>(
    transport: &mut T,
    core: &mut Session,
    timer: &mut Timer,
) -> Result<bool, Ended> {
    let mut fed = false;
    while let Some(frame) = core.poll_transmit() {
        if transport.feed(frame).is_err() {
            core.handle_transport_closed(crate::now_ms());
            return Err(Ended::Normally);
        }
        fed = true;
    }
    if let Some(ping) = core.poll_ping(crate::now_ms()) {
        transport.feed_ping(ping);
        fed = true;
    }
    if !fed {
        return Ok(false);
    }
    core.handle_writing(crate::now_ms(), None);
    while !transport.report(core, crate::now_ms()) {
        timer.arm(core.poll_timeout());
        tokio::select! {
            r = transport.write() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "session write failed");
                    core.handle_transport_closed(crate::now_ms());
                    return Err(Ended::Normally);
                }
            }
            _ = timer.fired() => {
                core.handle_timeout(crate::now_ms());
                if core.is_write_abandoned() {
                    return Err(Ended::Abandoned);
                }
            }
        }
    }
    Ok(true)
}

async fn run_session<T: Transport>(
    mut transport: T,
    ctx: Arc<NodeCtx>,
    id: u64,
    meter: &TransportMetrics,
) {
    let mut config = ctx.session_config.clone();
    if let Some(nodes) = ctx.welcome_nodes() {
        config.nodes = nodes;
    }
    if !T::PINGS {
        config.ping_interval_ms = 0;
    }
    let mut core = Session::new(id, crate::now_ms(), config);
    // The nonce a key hello on this session must sign (the core has no RNG).
    core.set_challenge_nonce(crate::now_ms(), crate::identity::new_nonce());
    let (tx, mut rx) = mpsc::channel::<SessionMsg>(ctx.config.session_reply_queue_max());
    ctx.sessions_open
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    meter.sessions_opened.increment(1);
    meter.sessions_open.increment(1.0);
    let mut export = ctx.metrics.enabled().then(SessionExport::default);
    let mut router = ctx.router();
    let ended = session_loop(
        &mut transport,
        &mut core,
        &ctx,
        id,
        (&tx, &mut rx),
        &mut router,
        (meter, &mut export),
    )
    .await;
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
    if matches!(ended, Ended::Normally) {
        let _ = tokio::time::timeout(Duration::from_millis(CLOSE_WAIT_MS), transport.close()).await;
    }
    if let Some(x) = export.as_mut() {
        x.requests_in(meter, core.stats(), Instant::now());
    }
    meter.sessions_open.decrement(1.0);
    ctx.sessions_open
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

/// The session's replies from the shards: its channel, and the sender it hands them.
type Replies<'a> = (
    &'a mpsc::Sender<SessionMsg>,
    &'a mut mpsc::Receiver<SessionMsg>,
);

async fn session_loop<T: Transport>(
    transport: &mut T,
    core: &mut Session,
    ctx: &NodeCtx,
    id: u64,
    (tx, rx): Replies<'_>,
    router: &mut fabric_router::Router,
    (meter, export): (&TransportMetrics, &mut Option<SessionExport>),
) -> Ended {
    let mut shutdown = ctx.shutdown.clone();
    let mut shutting_down = false;
    let mut drain_deadline = None;
    let mut identified = false;
    let mut timer = Timer::new();
    loop {
        if let Some(x) = export.as_mut() {
            // Once per iteration: what the last batch of frames or replies changed.
            x.requests_in(meter, core.stats(), Instant::now());
        }
        if !identified {
            identified = record_identity(core);
        }
        if forward_requests(core, router, ctx, id, tx).await.is_err() {
            return Ended::Normally;
        }
        match write_out(transport, core, &mut timer).await {
            Err(ended) => return ended,
            Ok(true) => {
                if let Some(x) = export.as_mut() {
                    x.answers_out(meter, core.stats(), Instant::now());
                }
                continue;
            }
            Ok(false) => {}
        }
        if core.is_closed() {
            return Ended::Normally;
        }
        if shutting_down
            && (core.inflight() == 0 || drain_deadline.is_some_and(|d| crate::now_ms() >= d))
        {
            let _ = tokio::time::timeout(
                Duration::from_millis(CLOSE_WAIT_MS),
                transport.close_for_shutdown(),
            )
            .await;
            core.handle_transport_closed(crate::now_ms());
            continue;
        }
        timer.arm(
            [core.poll_timeout(), drain_deadline]
                .into_iter()
                .flatten()
                .min(),
        );
        let reading = core.wants_read() && !shutting_down;
        tokio::select! {
            event = transport.next(reading) => handle_event(transport, core, event),
            msg = rx.recv() => take_replies(core, router, rx, msg),
            _ = shutdown.changed(), if !shutting_down => {
                shutting_down = true;
                drain_deadline = Some(crate::now_ms() + SHUTDOWN_DRAIN_MS);
            }
            _ = timer.fired() => core.handle_timeout(crate::now_ms()),
        }
    }
}

/// Requests the core produced go to the shards in per-shard batches. `send` waits when a
/// shard's queue is full: that wait is the backpressure that stops this session's reads.
async fn forward_requests(
    core: &mut Session,
    router: &mut fabric_router::Router,
    ctx: &NodeCtx,
    id: u64,
    tx: &mpsc::Sender<SessionMsg>,
) -> Result<(), ()> {
    while let Some((route, req)) = core.poll_request() {
        router.handle_request(crate::now_ms(), route, req);
    }
    while let Some((shard, requests)) = router.poll_batch() {
        let msg = ShardMsg::Batch {
            session: id,
            tx: tx.clone(),
            requests,
        };
        send_to_shard(ctx, shard as usize, msg).await?;
    }
    Ok(())
}

/// Names the session's mesh and peer in its span once it is welcomed; true then.
fn record_identity(core: &Session) -> bool {
    let Some((mesh, peer)) = core.identity() else {
        return false;
    };
    let span = tracing::Span::current();
    span.record("mesh", &**mesh);
    span.record("peer", &**peer);
    true
}

fn handle_event<T: Transport>(transport: &mut T, core: &mut Session, event: Event<T::In>) {
    match event {
        Event::In(input) => read_frames(transport, core, input),
        // Streams the main write does not wait for (QUIC subscriptions) moved on.
        Event::Wrote(Ok(())) => {
            transport.report(core, crate::now_ms());
        }
        Event::Wrote(Err(e)) => {
            tracing::debug!(error = %e, "session write failed");
            core.handle_transport_closed(crate::now_ms());
        }
    }
}

/// Hands the core `input` and whatever else the transport has already buffered, so the shards
/// get one batch.
fn read_frames<T: Transport>(transport: &mut T, core: &mut Session, input: T::In) {
    let mut next = Some(input);
    let mut n = 0;
    while let Some(input) = next.take() {
        if !transport.handle_in(core, crate::now_ms(), input) {
            break;
        }
        n += 1;
        if n < READ_FRAMES_PER_BATCH_MAX && core.wants_read() && !core.is_closed() {
            next = transport.recv().now_or_never();
        }
    }
}

/// Hands the core `msg` and the reply batches already queued behind it.
fn take_replies(
    core: &mut Session,
    router: &fabric_router::Router,
    rx: &mut mpsc::Receiver<SessionMsg>,
    msg: Option<SessionMsg>,
) {
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
                tracing::warn!(
                    shard,
                    "shard restarted; closing the session so the client resumes"
                );
                core.handle_shard_restarted(crate::now_ms(), shard);
            }
            SessionMsg::ShardDetached(shard) => {
                tracing::info!(
                    shard,
                    "the shard's leader changed; attaching the session to the new one"
                );
                core.handle_shard_detached(crate::now_ms(), shard, &|p| router.shard_of(p));
            }
            SessionMsg::Overloaded(shard) => {
                tracing::warn!(
                    shard,
                    "the shard could not queue replies for this session; closing it"
                );
                core.handle_shard_overloaded(crate::now_ms(), shard);
            }
        }
        n += 1;
        if n < REPLY_BATCHES_PER_FLUSH_MAX {
            next = rx.try_recv().ok();
        }
    }
}
