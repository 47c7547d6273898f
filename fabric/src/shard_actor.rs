//! Shards at run time: a ractor actor per shard for lifecycle and supervision, and under it the
//! hot loop (a tokio task fed by a bounded channel of request *batches*) plus a WAL writer thread
//! (fed by a bounded crossbeam channel). Ractor's mailbox is unbounded and costs ~360 ns a
//! message, so it carries only control messages; requests never pass through it.
//!
//! A crashed shard (loop panic, storage failure, or a crash drill) fails its actor; the node
//! supervisor decides what next with the shared restart policy
//! (`fabric_router::supervise`): recover after a backoff that doubles per failure in a row,
//! recover at once refusing writes with `storage_full` after ENOSPC, or stay down after a
//! failure whose bytes could not be cut back. While a shard is down a stand-in holds its input
//! channel and answers every request `unavailable` (`fabric_shard::unavailable_reply`), so no
//! session waits on a shard that is not there. The input channel outlives incarnations, so
//! sessions keep their senders; sessions attached to the old incarnation are told to
//! reconnect.

use crate::config::Durability;
use crate::metrics::{Metrics, ShardExport};
use crate::storage::{self, WalDone, WriteOutcome};
use fabric_proto::internal::{Output, Reply, Request, SessionId, ShardIdx};
use fabric_router::supervise::{Decision, RestartPolicy, ShardFailure, Supervision};
use fabric_shard::{Shard, ShardConfig};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

/// What a shard sends a session.
#[derive(Debug)]
pub enum SessionMsg {
    Replies(ShardIdx, Vec<Reply>),
    /// The shard restarted and forgot this session's attachments: reconnect.
    ShardRestarted(ShardIdx),
    /// The session's channel was full when the shard had replies for it (it stopped taking
    /// them): the shard dropped them and forgot the session, which must close.
    Overloaded(ShardIdx),
}

pub type SessionTx = mpsc::Sender<SessionMsg>;

/// The hot path's unit: a batch of requests from one session.
pub enum ShardMsg {
    Batch {
        session: SessionId,
        tx: SessionTx,
        requests: Vec<Request>,
    },
    /// Finish what was taken in (write, sync, ack), then stop.
    Stop { done: oneshot::Sender<()> },
}

/// Everything about one shard that outlives its incarnations.
pub struct ShardSlot {
    pub idx: ShardIdx,
    pub dir: PathBuf,
    pub config: ShardConfig,
    pub durability: Durability,
    input: Mutex<Option<mpsc::Receiver<ShardMsg>>>,
    pub ready: AtomicBool,
    pub restarts: AtomicU64,
    /// The node's name for log spans.
    pub node: Arc<str>,
    pub stats: Mutex<SlotStats>,
    /// The node's metrics; this shard's are `metrics.shards[idx]`.
    pub metrics: Arc<Metrics>,
    /// Why the last incarnation ended (set by its loop), and the failure history.
    failure: Mutex<Option<ShardFailure>>,
    supervision: Mutex<Supervision>,
    /// After ENOSPC: writes are refused with `storage_full` until this unix ms.
    writes_from_ms: Mutex<Option<u64>>,
    /// A WAL write in flight longer than this marks the shard not ready (a hung fdatasync).
    pub wal_sync_stall_ms_max: u64,
}

/// Figures the shard loop publishes for health checks and metrics.
#[derive(Debug, Clone, Default)]
pub struct SlotStats {
    pub recovery_ms: u64,
    pub recovered_records: u64,
    pub wal_writes: u64,
    pub wal_bytes: u64,
    pub records_written: u64,
    pub last_error: Option<String>,
    /// A WAL write has been in flight longer than `wal_sync_stall_ms_max` (cleared when it
    /// completes): `/readyz` reports it.
    pub wal_stalled: bool,
    /// The last write failed for lack of space, and none has landed since (`/readyz`).
    pub disk_full: bool,
}

impl ShardSlot {
    #[allow(clippy::too_many_arguments)] // each is a setting of the slot, named at the call
    pub fn new(
        idx: ShardIdx,
        dir: PathBuf,
        config: ShardConfig,
        durability: Durability,
        queue_batches_max: usize,
        node: Arc<str>,
        metrics: Arc<Metrics>,
        policy: RestartPolicy,
        wal_sync_stall_ms_max: u64,
    ) -> (Arc<ShardSlot>, mpsc::Sender<ShardMsg>) {
        let (tx, rx) = mpsc::channel(queue_batches_max);
        let slot = Arc::new(ShardSlot {
            idx,
            dir,
            config,
            durability,
            input: Mutex::new(Some(rx)),
            ready: AtomicBool::new(false),
            restarts: AtomicU64::new(0),
            node,
            stats: Mutex::new(SlotStats::default()),
            metrics,
            failure: Mutex::new(None),
            supervision: Mutex::new(Supervision::new(policy)),
            writes_from_ms: Mutex::new(None),
            wal_sync_stall_ms_max,
        });
        (slot, tx)
    }
}

/// Gives the input receiver back to its slot when an incarnation ends, even by panic or abort.
struct InputGuard {
    slot: Arc<ShardSlot>,
    rx: Option<mpsc::Receiver<ShardMsg>>,
}

impl Drop for InputGuard {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            if let Ok(mut g) = self.slot.input.lock() {
                *g = Some(rx);
            }
        }
    }
}

/// Session reply senders known to one incarnation; told to reconnect when it ends.
struct Sessions {
    idx: ShardIdx,
    txs: HashMap<SessionId, SessionTx>,
}

impl Drop for Sessions {
    fn drop(&mut self) {
        for tx in self.txs.values() {
            notify(tx, SessionMsg::ShardRestarted(self.idx));
        }
    }
}

/// Sends a notice that must never be lost (a restart, an overload) even when the session's
/// channel is full: a full channel means the session is busy (a slow write, bounded by its
/// write deadline), not gone, so the notice waits for room in a task of its own. It is lost
/// only with the session itself (its receiver dropped) or the runtime.
fn notify(tx: &SessionTx, msg: SessionMsg) {
    match tx.try_send(msg) {
        Err(mpsc::error::TrySendError::Full(msg)) => {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let tx = tx.clone();
                rt.spawn(async move {
                    let _ = tx.send(msg).await;
                });
            }
        }
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

// Beside what it tests (the rest of this file is the supervisor's, changed separately).
#[cfg(test)]
#[allow(clippy::items_after_test_module)]
mod session_notice_tests {
    use super::*;
    use fabric_proto::ServerOp;

    fn pong() -> Reply {
        Reply::Frame(ServerOp::Pong { r: 1 })
    }

    async fn next(rx: &mut mpsc::Receiver<SessionMsg>) -> SessionMsg {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a message in time")
            .expect("the channel is open")
    }

    #[tokio::test]
    async fn a_restart_notice_reaches_a_session_whose_channel_is_full() {
        // Proves Sessions' drop never loses ShardRestarted: with the session's channel full
        // (try_send fails), the notice arrives once the session takes the message ahead of it.
        let (tx, mut rx) = mpsc::channel(1);
        tx.try_send(SessionMsg::Replies(0, vec![pong()])).unwrap();
        drop(Sessions {
            idx: 3,
            txs: HashMap::from([(7, tx)]),
        });
        assert!(matches!(next(&mut rx).await, SessionMsg::Replies(0, _)));
        assert!(matches!(next(&mut rx).await, SessionMsg::ShardRestarted(3)));
    }

    #[tokio::test]
    async fn replies_that_do_not_fit_close_the_session_instead_of_vanishing() {
        // Proves route() with a full session channel forgets the session's sender and tells the
        // session Overloaded (so it closes and its client resumes) instead of dropping it in
        // silence; another session is served as usual.
        let mut shard = Shard::new(ShardConfig::default());
        let (full_tx, mut full_rx) = mpsc::channel(1);
        full_tx
            .try_send(SessionMsg::Replies(2, vec![pong()]))
            .unwrap();
        let (ok_tx, mut ok_rx) = mpsc::channel(8);
        let mut sessions = Sessions {
            idx: 2,
            txs: HashMap::from([(1, full_tx), (2, ok_tx)]),
        };
        let mut per_session = HashMap::from([(1, vec![pong()]), (2, vec![pong()])]);
        route(&mut shard, &mut sessions, &mut per_session);
        assert!(!sessions.txs.contains_key(&1) && sessions.txs.contains_key(&2));
        assert!(matches!(next(&mut ok_rx).await, SessionMsg::Replies(2, _)));
        assert!(matches!(
            next(&mut full_rx).await,
            SessionMsg::Replies(2, _)
        ));
        assert!(matches!(
            next(&mut full_rx).await,
            SessionMsg::Overloaded(2)
        ));
        sessions.txs.clear();
    }
}

/// Most batches taken from the input channel before the loop writes and answers.
const LOOP_BATCHES_MAX: usize = 256;

/// Why a shard incarnation's loop ended early.
#[derive(Debug, thiserror::Error)]
pub enum ShardLoopError {
    #[error("the WAL writer thread ended")]
    WriterEnded,
    #[error("WAL write failed: {0}")]
    WriteFailed(String),
    #[error("shard loop panicked")]
    Panicked,
}

/// One incarnation's loop state besides the shard itself.
struct LoopState {
    sessions: Sessions,
    stop: Option<oneshot::Sender<()>>,
    per_session: HashMap<SessionId, Vec<Reply>>,
    /// When the write in flight was handed to the writer thread (the stall watchdog), and
    /// whether it was reported stalled already.
    write_started: Option<std::time::Instant>,
    stall_marked: bool,
}

/// The hot loop of one shard incarnation.
async fn shard_loop(
    slot: Arc<ShardSlot>,
    mut shard: Shard,
    mut input: InputGuard,
    wal_tx: crossbeam_channel::Sender<fabric_shard::WalWrite>,
    mut wal_done: mpsc::Receiver<WalDone>,
) -> Result<(), ShardLoopError> {
    let mut st = LoopState {
        sessions: Sessions {
            idx: slot.idx,
            txs: HashMap::new(),
        },
        stop: None,
        per_session: HashMap::new(),
        write_started: None,
        stall_marked: false,
    };
    let metrics = slot.metrics.clone();
    let meter = &metrics.shards[slot.idx as usize];
    let mut export = metrics.enabled().then(|| ShardExport::new(&shard));
    let stall = Duration::from_millis(slot.wal_sync_stall_ms_max);
    loop {
        let rx = input.rx.as_mut().expect("input present while running");
        // Gauges that walk peers are refreshed at most every REFRESH_INTERVAL_MS; when one is
        // owed and the shard goes quiet, this timer delivers it.
        let refresh_at = export
            .as_ref()
            .filter(|e| e.refresh_pending)
            .and_then(|e| e.refresh_due(std::time::Instant::now()));
        let stall_at = st
            .write_started
            .filter(|_| !st.stall_marked)
            .map(|t| t + stall);
        tokio::select! {
            biased;
            done = wal_done.recv() => {
                let done = done.ok_or(ShardLoopError::WriterEnded)?;
                handle_done(&slot, &mut shard, &mut st, done, meter, export.is_some())?;
            }
            msg = rx.recv(), if st.stop.is_none() && shard.wants_input() => {
                let Some(msg) = msg else { return Ok(()) };
                take_batches(&mut shard, &mut st, rx, msg);
            }
            _ = sleep_until(stall_at), if stall_at.is_some() => {
                st.stall_marked = true;
                mark_stalled(&slot, stall);
            }
            _ = sleep_until(refresh_at), if refresh_at.is_some() => {}
        }
        if let Some(w) = shard.poll_wal() {
            // At most one write is in flight (the core guarantees it), so this never blocks.
            wal_tx.send(w).map_err(|_| ShardLoopError::WriterEnded)?;
            st.write_started = Some(std::time::Instant::now());
            st.stall_marked = false;
        }
        route(&mut shard, &mut st.sessions, &mut st.per_session);
        if let Some(x) = export.as_mut() {
            // Once per iteration (a group commit or up to LOOP_BATCHES_MAX request batches).
            x.export(&shard, meter, &metrics.meshes, std::time::Instant::now());
        }
        if st.stop.is_some() && shard.is_idle() {
            if let Some(done) = st.stop.take() {
                let _ = done.send(());
            }
            st.sessions.txs.clear();
            return Ok(());
        }
    }
}

/// A write the writer thread finished: on success the acks it covers go out; on failure the
/// pending writes are answered with an error, the failure is recorded for the supervisor,
/// and the incarnation ends (its memory holds records that are not on disk).
fn handle_done(
    slot: &ShardSlot,
    shard: &mut Shard,
    st: &mut LoopState,
    done: WalDone,
    meter: &crate::metrics::ShardMetrics,
    metered: bool,
) -> Result<(), ShardLoopError> {
    st.write_started = None;
    let (failure, error, no_space) = match done.outcome {
        WriteOutcome::Done => {
            if metered {
                crate::metrics::record_commit(meter, done.records, done.bytes, done.fsync_duration);
            }
            shard.handle_wal_done(crate::now_ms(), done.last_lsn);
            shard.recycle_wal_buffer(done.buffer);
            if let Ok(mut s) = slot.stats.lock() {
                s.wal_writes += 1;
                s.wal_bytes += done.bytes as u64;
                s.records_written += done.records;
                s.wal_stalled = false;
                s.disk_full &= done.bytes == 0;
            }
            return Ok(());
        }
        WriteOutcome::Failed { no_space, error } => {
            let kind = if no_space {
                ShardFailure::NoSpace
            } else {
                ShardFailure::Storage
            };
            (kind, error, no_space)
        }
        WriteOutcome::Fatal { error } => (ShardFailure::Unrecoverable, error, false),
    };
    shard.handle_wal_failed(crate::now_ms(), no_space, &error);
    route(shard, &mut st.sessions, &mut st.per_session);
    if let Ok(mut f) = slot.failure.lock() {
        *f = Some(failure);
    }
    if let Ok(mut s) = slot.stats.lock() {
        s.last_error = Some(error.clone());
        s.disk_full = no_space;
    }
    Err(ShardLoopError::WriteFailed(error))
}

/// Takes up to LOOP_BATCHES_MAX batches, each whole, checking `wants_input` between them.
fn take_batches(
    shard: &mut Shard,
    st: &mut LoopState,
    rx: &mut mpsc::Receiver<ShardMsg>,
    first: ShardMsg,
) {
    let mut next = Some(first);
    let mut taken = 0;
    while let Some(msg) = next.take() {
        match msg {
            ShardMsg::Batch {
                session,
                tx,
                requests,
            } => {
                st.sessions.txs.entry(session).or_insert(tx);
                let closing = requests
                    .iter()
                    .any(|r| matches!(r.op, fabric_proto::internal::ShardOp::Closed));
                shard.handle_requests(crate::now_ms(), requests);
                if closing {
                    // Deliver what is already owed, then forget the sender.
                    route(shard, &mut st.sessions, &mut st.per_session);
                    st.sessions.txs.remove(&session);
                }
            }
            ShardMsg::Stop { done } => st.stop = Some(done),
        }
        taken += 1;
        if taken < LOOP_BATCHES_MAX && st.stop.is_none() && shard.wants_input() {
            next = rx.try_recv().ok();
        }
    }
}

/// The write in flight has taken longer than `wal_sync_stall_ms_max`: the shard is not ready
/// (`/readyz` says why) until it completes.
fn mark_stalled(slot: &ShardSlot, stall: Duration) {
    if let Ok(mut s) = slot.stats.lock() {
        if !s.wal_stalled {
            tracing::error!(
                stall_ms = stall.as_millis() as u64,
                "a WAL write (fdatasync) has been in flight longer than wal_sync_stall_ms_max"
            );
        }
        s.wal_stalled = true;
    }
}

async fn sleep_until(at: Option<std::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Groups outputs per session and hands each session one batch.
fn route(
    shard: &mut Shard,
    sessions: &mut Sessions,
    per_session: &mut HashMap<SessionId, Vec<Reply>>,
) {
    while let Some(Output { session, reply }) = shard.poll_output() {
        per_session.entry(session).or_default().push(reply);
    }
    for (session, replies) in per_session.drain() {
        if replies.is_empty() {
            continue;
        }
        let Some(tx) = sessions.txs.get(&session) else {
            continue;
        };
        // The channel's capacity covers every reply a session can be owed (in-flight limit plus
        // push credit; `Config::session_reply_queue_max`), so Full means the session stopped
        // taking replies. The shard must not block on it: it forgets the session, and the
        // session is told to close as `overloaded` (its client resumes; its inbox is
        // redelivered), never left open with its replies silently gone.
        match tx.try_send(SessionMsg::Replies(sessions.idx, replies)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                if let Some(tx) = sessions.txs.remove(&session) {
                    notify(&tx, SessionMsg::Overloaded(sessions.idx));
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                sessions.txs.remove(&session);
            }
        }
    }
}

/// The shard actor's control messages.
pub enum ShardActorMsg {
    LoopEnded(Result<(), ShardLoopError>),
    /// Chaos drill: fail this incarnation now (tests and operators' drills).
    Crash,
}

pub struct ShardActor;

pub struct ShardActorState {
    slot: Arc<ShardSlot>,
    task: Option<tokio::task::JoinHandle<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Actor for ShardActor {
    type Msg = ShardActorMsg;
    type State = ShardActorState;
    type Arguments = Arc<ShardSlot>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        slot: Arc<ShardSlot>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let span = tracing::info_span!("shard", node = %slot.node, shard = slot.idx);
        let rx = slot
            .input
            .lock()
            .map_err(|_| "shard input lock poisoned")?
            .take()
            .ok_or("shard input is held by another incarnation")?;
        let input = InputGuard {
            slot: slot.clone(),
            rx: Some(rx),
        };
        let recovered = recover_slot(&slot, &span).await?;
        let (wal_tx, wal_rx) = crossbeam_channel::bounded(2);
        let (done_tx, done_rx) = mpsc::channel(2);
        let store = recovered.store;
        let writer = std::thread::Builder::new()
            .name(format!("wal-{}", slot.idx))
            .spawn(move || storage::writer_thread(store, wal_rx, done_tx))
            .map_err(|e| format!("cannot start WAL thread: {e}"))?;
        let loop_slot = slot.clone();
        let mut shard = recovered.shard;
        let full_until = slot.writes_from_ms.lock().ok().and_then(|mut w| w.take());
        if let Some(until) = full_until {
            shard.handle_storage_full(crate::now_ms(), until);
        }
        if let Ok(mut s) = slot.stats.lock() {
            s.wal_stalled = false;
        }
        let task = tokio::spawn(
            async move {
                use futures_util::FutureExt;
                let run = shard_loop(loop_slot, shard, input, wal_tx, done_rx);
                // A panic in the loop is a shard failure like any other: report it to the actor.
                let result = std::panic::AssertUnwindSafe(run)
                    .catch_unwind()
                    .await
                    .unwrap_or(Err(ShardLoopError::Panicked));
                let _ = myself.cast(ShardActorMsg::LoopEnded(result));
            }
            .instrument(span),
        );
        slot.ready.store(true, Ordering::SeqCst);
        Ok(ShardActorState {
            slot,
            task: Some(task),
            writer: Some(writer),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Ractor skips post_stop when a handler fails, so a failing incarnation cleans up here,
        // before it reports the failure that makes the supervisor start the next one.
        match msg {
            ShardActorMsg::LoopEnded(Ok(())) => {
                myself.stop(Some("stopped".into()));
                Ok(())
            }
            ShardActorMsg::LoopEnded(Err(e)) => {
                state.end().await;
                Err(Box::new(e))
            }
            ShardActorMsg::Crash => {
                state.end().await;
                Err("crash drill".into())
            }
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.end().await;
        Ok(())
    }
}

/// Recovers a slot's shard from its directory on a blocking thread, and records how long it
/// took.
async fn recover_slot(
    slot: &Arc<ShardSlot>,
    span: &tracing::Span,
) -> Result<storage::Recovered, ActorProcessingErr> {
    let dir = slot.dir.clone();
    let config = slot.config.clone();
    let durability = slot.durability;
    let recovered = tokio::task::spawn_blocking(move || storage::recover(&dir, config, durability))
        .await
        .map_err(|e| format!("recovery panicked: {e}"))??;
    tracing::info!(
        parent: span,
        records = recovered.report.records,
        segments = recovered.report.segments,
        bytes = recovered.report.bytes,
        ms = recovered.duration.as_millis() as u64,
        "shard recovered"
    );
    if let Ok(mut s) = slot.stats.lock() {
        s.recovery_ms = recovered.duration.as_millis() as u64;
        s.recovered_records = recovered.report.records;
    }
    let meter = &slot.metrics.shards[slot.idx as usize];
    meter.recovery_seconds.set(recovered.duration.as_secs_f64());
    meter.recovered_records.set(recovered.report.records as f64);
    Ok(recovered)
}

impl ShardActorState {
    /// Ends this incarnation: stops the loop (which returns the input receiver and tells its
    /// sessions to reconnect) and waits for the WAL thread to finish its last write.
    async fn end(&mut self) {
        self.slot.ready.store(false, Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        if let Some(writer) = self.writer.take() {
            // The loop owned the writer's sender, so the thread sees its channel close.
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
    }
}

/// Milliseconds on the node's monotonic clock (the restart policy's time; never the wall
/// clock, which can jump).
fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Stands in for a shard that is down: holds its input channel and answers every request
/// `unavailable` (so no session waits on it), until told to hand the channel back.
struct StandIn {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl StandIn {
    fn start(slot: Arc<ShardSlot>, reason: String) -> StandIn {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let Some(mut rx) = slot.input.lock().ok().and_then(|mut g| g.take()) else {
                return;
            };
            loop {
                let msg = tokio::select! {
                    _ = &mut stopped => break,
                    msg = rx.recv() => msg,
                };
                match msg {
                    None => break,
                    Some(ShardMsg::Stop { done }) => {
                        let _ = done.send(());
                    }
                    Some(ShardMsg::Batch { tx, requests, .. }) => {
                        let replies: Vec<Reply> = requests
                            .iter()
                            .filter_map(|r| fabric_shard::unavailable_reply(r, &reason))
                            .map(|o| o.reply)
                            .collect();
                        if !replies.is_empty() {
                            let _ = tx.try_send(SessionMsg::Replies(slot.idx, replies));
                        }
                    }
                }
            }
            if let Ok(mut g) = slot.input.lock() {
                *g = Some(rx);
            }
        });
        StandIn { stop, task }
    }

    /// Stops answering and waits until the input channel is back in its slot.
    async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Supervises the shard actors: a failed shard is recovered from its WAL when the restart
/// policy says so (`fabric_router::supervise`), and answered for meanwhile.
pub struct NodeSupervisor;

pub enum SupervisorMsg {
    Crash(ShardIdx),
    /// The restart policy's wait for a failed shard is over: recover it.
    Restart(ShardIdx),
    /// Stop every shard gracefully (each finishes its batch and syncs), then reply.
    Stop(oneshot::Sender<()>),
}

pub struct SupervisorState {
    slots: Vec<Arc<ShardSlot>>,
    senders: Vec<mpsc::Sender<ShardMsg>>,
    actors: Vec<Option<ActorRef<ShardActorMsg>>>,
    stand_ins: Vec<Option<StandIn>>,
    stopping: bool,
}

pub struct SupervisorArgs {
    pub slots: Vec<Arc<ShardSlot>>,
    pub senders: Vec<mpsc::Sender<ShardMsg>>,
}

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut actors = Vec::new();
        for slot in &args.slots {
            let (a, _) =
                Actor::spawn_linked(None, ShardActor, slot.clone(), myself.get_cell()).await?;
            actors.push(Some(a));
        }
        Ok(SupervisorState {
            stand_ins: args.slots.iter().map(|_| None).collect(),
            slots: args.slots,
            senders: args.senders,
            actors,
            stopping: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Crash(i) => {
                if let Some(Some(a)) = state.actors.get(i as usize) {
                    let _ = a.cast(ShardActorMsg::Crash);
                }
            }
            SupervisorMsg::Restart(i) => {
                if !state.stopping && state.actors[i as usize].is_none() {
                    state.spawn_shard(i as usize, &myself).await;
                }
            }
            SupervisorMsg::Stop(reply) => {
                state.stopping = true;
                for tx in &state.senders {
                    let (done_tx, done_rx) = oneshot::channel();
                    if tx.send(ShardMsg::Stop { done: done_tx }).await.is_ok() {
                        let _ = tokio::time::timeout(Duration::from_secs(30), done_rx).await;
                    }
                }
                for a in state.actors.iter().flatten() {
                    let _ = a.stop_and_wait(None, Some(Duration::from_secs(30))).await;
                }
                for s in state.stand_ins.iter_mut().filter_map(Option::take) {
                    s.finish().await;
                }
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "terminated".into()))
            }
            _ => return Ok(()),
        };
        let Some(i) = state
            .actors
            .iter()
            .position(|a| a.as_ref().is_some_and(|a| a.get_id() == cell.get_id()))
        else {
            return Ok(());
        };
        state.actors[i] = None;
        if state.stopping {
            return Ok(());
        }
        // The failed incarnation has ended (input returned, writer joined).
        let slot = state.slots[i].clone();
        let failure = slot
            .failure
            .lock()
            .ok()
            .and_then(|mut f| f.take())
            .unwrap_or(ShardFailure::Crashed);
        let now = monotonic_ms();
        let decision = match slot.supervision.lock() {
            Ok(mut s) => s.handle_failure(now, failure),
            Err(_) => Decision::StayDown,
        };
        let restarts = slot.restarts.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::error!(shard = i, restarts, reason = %why, ?failure, ?decision, "shard failed");
        match decision {
            Decision::RecoverRefusingWrites { writes_from_ms } => {
                if let Ok(mut w) = slot.writes_from_ms.lock() {
                    *w = Some(crate::now_ms() + writes_from_ms.saturating_sub(now));
                }
                state.spawn_shard(i, &myself).await;
            }
            Decision::RestartAt { at_ms } => {
                let reason = format!(
                    "shard {i} failed ({why}); it restarts in {} ms",
                    at_ms - now
                );
                state.stand_ins[i] = Some(StandIn::start(slot, reason));
                let me = myself.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(at_ms.saturating_sub(now))).await;
                    let _ = me.cast(SupervisorMsg::Restart(i as ShardIdx));
                });
            }
            Decision::StayDown => state.stay_down(i, why),
        }
        Ok(())
    }
}

impl SupervisorState {
    /// Starts a new incarnation of shard `i` (after handing back its input channel, if a
    /// stand-in holds it). If recovery fails (corruption, I/O), the shard stays down.
    async fn spawn_shard(&mut self, i: usize, myself: &ActorRef<SupervisorMsg>) {
        if let Some(s) = self.stand_ins[i].take() {
            s.finish().await;
        }
        let slot = self.slots[i].clone();
        match Actor::spawn_linked(None, ShardActor, slot, myself.get_cell()).await {
            Ok((a, _)) => self.actors[i] = Some(a),
            Err(e) => self.stay_down(i, format!("recovery failed: {e}")),
        }
    }

    /// Shard `i` stays down: `/readyz` names the reason, requests are answered `unavailable`.
    fn stay_down(&mut self, i: usize, why: String) {
        tracing::error!(shard = i, reason = %why, "shard stays down until an operator looks");
        let slot = self.slots[i].clone();
        if let Ok(mut s) = slot.stats.lock() {
            s.last_error = Some(why.clone());
        }
        let reason = format!("shard {i} is down: {why}");
        self.stand_ins[i] = Some(StandIn::start(slot, reason));
    }
}
