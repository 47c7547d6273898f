//! Shards at run time: the node's adapter over the shared shard host
//! (`fabric_router::host::ShardDriver`), which the simulator runs too. Everything that decides
//! (the input queue and its bound, the one WAL write in flight, the restart policy, the
//! stand-in that answers `unavailable` while a shard is down, routing replies to sessions,
//! closing a session whose replies do not fit) is in the driver; this file only moves its
//! effects onto threads, files and channels:
//! - a tokio task per shard (the host loop) owns the driver, reads the shard's bounded input
//!   channel of request *batches*, and hands replies to sessions with `try_send`;
//! - a WAL writer thread per incarnation performs each `WriteJob` on a `FileStore` (fed by a
//!   bounded crossbeam channel); recoveries run on tokio's blocking pool.
//!
//! A ractor actor per shard holds the task for lifecycle only (start, graceful stop): ractor's
//! mailbox is unbounded and costs ~360 ns a message, so requests never pass through it. A
//! panic in the shard core is caught around the driver call and ends the incarnation like a
//! failed write (`ShardDriver::handle_crash`); a panic in the adapter itself fails the actor,
//! and the supervisor starts a new host after `ADAPTER_RESTART_DELAY_MS`.

use crate::config::Durability;
use crate::metrics::raft::ElectionCounter;
use crate::metrics::{Metrics, ShardExport};
use crate::storage::{self, WalDone};
use fabric_proto::internal::{Reply, Request, SessionId, ShardIdx};
use fabric_router::host::{
    Clock, CloseReason, Core, DriverStatus, Effect, NodeFrame, ReadDone, ShardDriver, Time,
    PUMP_BATCHES_MAX,
};
use fabric_router::supervise::RestartPolicy;
use fabric_shard::raft::NodeId;
use fabric_shard::store::{StoreError, StoreErrorKind};
use fabric_shard::{RecoverError, RecoveryReport, ShardConfig};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::Instrument;

pub mod peers;

pub use peers::{NodeSender, SlotReplication};

/// What a shard sends a session.
#[derive(Debug)]
pub enum SessionMsg {
    Replies(ShardIdx, Vec<Reply>),
    /// The shard restarted and forgot this session's attachments: reconnect.
    ShardRestarted(ShardIdx),
    /// The shard's leader changed and the new one does not know this session: attach again
    /// (`Session::handle_shard_detached`).
    ShardDetached(ShardIdx),
    /// The session's channel was full when the shard had replies for it (it stopped taking
    /// them): the shard forgot the session, which must close.
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
    /// The nodes that should hold this shard's replicas now (the cluster's placement, from
    /// its metadata group): a leading replica moves its group there.
    Members(std::collections::BTreeSet<NodeId>),
}

/// A host whose adapter (not its core: that is caught) panicked is started again after this.
const ADAPTER_RESTART_DELAY_MS: u64 = 1_000;
/// What publishing a replica's figures at once depends on.
/// (term, leader, leading, in repair): a change publishes at once.
type ReplicaRole = (u64, Option<NodeId>, bool, bool);

/// A replicated shard's commit and lag reach `/v1/cluster` at most this often (its role at
/// once).
const REPLICA_PUBLISH_INTERVAL_MS: u64 = 50;
/// Bound of the channel to the WAL writer thread: at most one write is in flight.
const WRITER_QUEUE_WRITES_MAX: usize = 2;

/// Reads of the log queued to a host's reader thread beyond the shard's in-flight bound (reads
/// an ended incarnation asked for may still be queued); a read that finds the queue full is
/// answered at once with an error, which the shard retries.
const READER_QUEUE_SLACK_READS: usize = 64;

/// The host's reader thread: positioned reads of the shard's segments (`pread` through a
/// `FileStore` of its own), so a cold read never stalls the host loop or the WAL writer.
struct Reader {
    /// Taken (closed) on drop, which ends the thread after the reads it holds.
    tx: Option<crossbeam_channel::Sender<fabric_router::host::ReadJob>>,
    done: mpsc::Receiver<ReadDone>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    fn spawn(slot: &ShardSlot) -> std::io::Result<Reader> {
        let cap = slot.config.log_reads_inflight_max + READER_QUEUE_SLACK_READS;
        let (tx, rx) = crossbeam_channel::bounded::<fabric_router::host::ReadJob>(cap);
        let (done_tx, done) = mpsc::channel(cap);
        let mut store = storage::FileStore::new(&slot.dir);
        let thread = std::thread::Builder::new()
            .name(format!("fabric-read-{}", slot.idx))
            .spawn(move || {
                for job in rx {
                    if done_tx.blocking_send(job.perform(&mut store)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Reader {
            tx: Some(tx),
            done,
            thread: Some(thread),
        })
    }

    /// Queues a read; a full queue or a gone thread answers it at once with an error.
    fn send(&self, job: fabric_router::host::ReadJob) -> Result<(), ReadDone> {
        let tx = self.tx.as_ref().expect("open until dropped");
        tx.try_send(job).map_err(|e| {
            e.into_inner()
                .failed("the shard's reader queue is full or its thread ended")
        })
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.tx.take();
        self.done.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Everything about one shard that outlives its host tasks.
pub struct ShardSlot {
    pub idx: ShardIdx,
    pub dir: PathBuf,
    pub config: ShardConfig,
    pub durability: Durability,
    input: Mutex<Option<mpsc::Receiver<ShardMsg>>>,
    /// Serving, as the driver says (`/readyz` also checks stalls and a full disk).
    pub ready: AtomicBool,
    pub restarts: AtomicU64,
    /// The node's name for log spans.
    pub node: Arc<str>,
    pub stats: Mutex<SlotStats>,
    /// The node's metrics; this shard's are `metrics.shards[idx]`.
    pub metrics: Arc<Metrics>,
    policy: RestartPolicy,
    /// Capacity of the driver's input queue (the channel in front of it has the same).
    queue_batches_max: usize,
    /// A WAL write in flight longer than this marks the shard not ready (a hung fdatasync).
    pub wal_sync_stall_ms_max: u64,
    /// An operator's crash drill for the running host.
    crash: Notify,
    /// How the first recovery ended (the node does not start over a shard that refused to
    /// recover): the sender is taken by the host, the receiver by `wait_recovered`.
    first_recovery: Mutex<Option<oneshot::Sender<Result<(), RecoveryRefused>>>>,
    first_recovered: tokio::sync::Mutex<Option<oneshot::Receiver<Result<(), RecoveryRefused>>>>,
    /// Set when the shard is one replica of a Raft group.
    pub replication: Option<SlotReplication>,
    /// The placement last handed in (`ShardMsg::Members`), for the drivers a restart makes.
    members_target: Mutex<std::collections::BTreeSet<NodeId>>,
}

/// Why a shard's first recovery did not give it an incarnation (the recovery error, which
/// names the file and offset of what it refused).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RecoveryRefused(pub String);

/// Figures the host loop publishes for health checks and metrics.
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
    /// A replica's Raft view, as of its host's last step (`/v1/cluster`, `/readyz`, metrics).
    pub replica: Option<ReplicaStatus>,
}

/// What a replicated shard's host publishes of its replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub node: NodeId,
    pub term: u64,
    /// The leader this replica knows of, if any.
    pub leader: Option<NodeId>,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    /// Whether this replica serves requests as the leader (its no-op applied).
    pub leading: bool,
    pub voters: Vec<NodeId>,
    /// Members that get the log but do not vote yet (a node joining, catching up).
    pub learners: Vec<NodeId>,
    /// On a leader: each follower's (and learner's) match index.
    pub matched: Vec<(NodeId, u64)>,
    /// Counts of this replica (they start again from zero when the shard restarts).
    pub leader_changes: u64,
    pub snapshots_sent: u64,
    pub snapshots_installed: u64,
    /// Elections this host saw its replica start.
    pub elections: u64,
    /// In repair (its log was damaged; `fabric_shard::repair`): it must hold entries through
    /// this index before it votes; `/readyz` fails for the shard meanwhile.
    pub repair_through: Option<u64>,
}

/// How one shard slot is set up (`ShardSlot::new`).
pub struct SlotSettings {
    pub idx: ShardIdx,
    pub dir: PathBuf,
    pub config: ShardConfig,
    pub durability: Durability,
    pub queue_batches_max: usize,
    pub node: Arc<str>,
    pub metrics: Arc<Metrics>,
    pub policy: RestartPolicy,
    pub wal_sync_stall_ms_max: u64,
    pub replication: Option<SlotReplication>,
}

impl ShardSlot {
    pub fn new(s: SlotSettings) -> (Arc<ShardSlot>, mpsc::Sender<ShardMsg>) {
        let (tx, rx) = mpsc::channel(s.queue_batches_max.max(1));
        let (first_tx, first_rx) = oneshot::channel();
        let slot = Arc::new(ShardSlot {
            idx: s.idx,
            dir: s.dir,
            config: s.config,
            durability: s.durability,
            input: Mutex::new(Some(rx)),
            ready: AtomicBool::new(false),
            restarts: AtomicU64::new(0),
            node: s.node,
            stats: Mutex::new(SlotStats::default()),
            metrics: s.metrics,
            policy: s.policy,
            queue_batches_max: s.queue_batches_max,
            wal_sync_stall_ms_max: s.wal_sync_stall_ms_max,
            crash: Notify::new(),
            first_recovery: Mutex::new(Some(first_tx)),
            first_recovered: tokio::sync::Mutex::new(Some(first_rx)),
            replication: s.replication,
            members_target: Mutex::new(Default::default()),
        });
        (slot, tx)
    }

    /// Waits for the shard's first recovery: its error (naming the file and offset of what it
    /// refused) if it refused to recover.
    pub async fn wait_recovered(&self) -> Result<(), RecoveryRefused> {
        let Some(rx) = self.first_recovered.lock().await.take() else {
            return Ok(());
        };
        rx.await.unwrap_or_else(|_| {
            Err(RecoveryRefused(
                "the shard host ended before recovering".into(),
            ))
        })
    }

    fn driver(&self) -> ShardDriver {
        let mut d = self.new_driver();
        if let Ok(target) = self.members_target.lock() {
            d.set_members_target(target.clone());
        }
        d
    }

    fn new_driver(&self) -> ShardDriver {
        match &self.replication {
            // The election jitter's seed: the node's one injected randomness, drawn here.
            Some(r) => ShardDriver::replicated(
                self.idx,
                self.config.clone(),
                self.policy,
                self.queue_batches_max,
                self.wal_sync_stall_ms_max,
                r.config.clone(),
                rand::random(),
            ),
            None => ShardDriver::new(
                self.idx,
                self.config.clone(),
                self.policy,
                self.queue_batches_max,
                self.wal_sync_stall_ms_max,
            ),
        }
    }
}

/// The node's clocks: the system's wall clock for message timestamps, a monotonic one (never
/// jumps) for the host's timers.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn time(&self) -> Time {
        Time {
            unix_ms: crate::now_ms(),
            mono_ms: monotonic_ms(),
        }
    }
}

fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The `Instant` at which the monotonic clock reads `mono_ms`.
fn instant_at(mono_ms: u64) -> Instant {
    let now = monotonic_ms();
    Instant::now() + Duration::from_millis(mono_ms.saturating_sub(now))
}

/// Gives the input receiver back to its slot when a host task ends, even by panic or abort.
struct InputGuard {
    slot: Arc<ShardSlot>,
    rx: Option<mpsc::Receiver<ShardMsg>>,
    /// A replica's frames from other nodes.
    node_rx: Option<mpsc::Receiver<(NodeId, NodeFrame)>>,
}

impl Drop for InputGuard {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            if let Ok(mut g) = self.slot.input.lock() {
                *g = Some(rx);
            }
        }
        if let (Some(rx), Some(r)) = (self.node_rx.take(), &self.slot.replication) {
            if let Ok(mut g) = r.inbound.lock() {
                *g = Some(rx);
            }
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

/// The current incarnation's WAL writer thread and its channels.
struct Writer {
    tx: crossbeam_channel::Sender<fabric_router::host::WriteJob>,
    done: mpsc::Receiver<WalDone>,
    thread: std::thread::JoinHandle<()>,
}

type Recovery = tokio::task::JoinHandle<Result<storage::Recovered, RecoverError>>;

/// What the host loop keeps besides the driver: the I/O the driver's effects started.
struct HostIo {
    slot: Arc<ShardSlot>,
    /// Reply senders of the sessions that sent this shard a batch.
    sinks: HashMap<SessionId, SessionTx>,
    writer: Option<Writer>,
    reader: Option<Reader>,
    recovery: Option<Recovery>,
    stop: Option<oneshot::Sender<()>>,
    export: Option<ShardExport>,
    /// What was last published (logs on changes).
    published: DriverStatus,
    log_reads: peers::LogReads,
    /// The replica's role as last published, and when the rest (commit, lag) was: a
    /// change of role publishes at once, the figures at most every
    /// `REPLICA_PUBLISH_INTERVAL_MS` (not on every step of the hot path).
    replica_published: Option<(ReplicaRole, Instant)>,
    /// Elections the replica started, observed after every step (the core does not count them).
    elections: ElectionCounter,
}

/// The host loop of one shard: driver in, effects out, until stopped.
async fn host_loop(slot: Arc<ShardSlot>, mut input: InputGuard) {
    let mut driver = slot.driver();
    let mut io = HostIo::new(slot.clone());
    let clock = SystemClock;
    loop {
        io.perform_effects(&mut driver);
        io.publish(&driver);
        if io.stop.is_some() && driver.is_idle() && !driver.transferring() && io.recovery.is_none()
        {
            if let Some(done) = io.stop.take() {
                let _ = done.send(());
            }
            io.end_writer().await;
            return;
        }
        let rx = input.rx.as_mut().expect("input present while running");
        let timer = driver.poll_timeout().map(instant_at);
        let refresh = io.refresh_due();
        let reading = io.stop.is_none() && driver.feeds_now();
        tokio::select! {
            biased;
            done = recv_done(&mut io.writer) => io.write_done(&mut driver, clock.time(), done),
            Some(done) = recv_read(&mut io.reader) => {
                guarded(&mut driver, clock.time(), |d, t| d.handle_read_done(t, done));
            }
            rec = join_recovery(&mut io.recovery) => io.recovered(&mut driver, clock.time(), rec),
            _ = slot.crash.notified() => driver.handle_crash(clock.time(), "crash drill"),
            Some((from, frame)) = recv_node(&mut input.node_rx) => {
                guarded(&mut driver, clock.time(), |d, t| {
                    if !d.handle_node_frame(t, from, frame) {
                        tracing::warn!(from, "dropped a node frame that failed its checks");
                    }
                });
            }
            Some((job, result)) = io.log_reads.rx.recv() => {
                io.log_reads.finished(&slot.dir);
                guarded(&mut driver, clock.time(), |d, t| d.handle_log_read_done(t, &job, result));
            }
            msg = rx.recv(), if reading => {
                let Some(msg) = msg else { return };
                io.take_batches(&mut driver, &clock, rx, msg);
            }
            _ = sleep_until(timer), if timer.is_some() => {
                guarded(&mut driver, clock.time(), |d, t| d.handle_timeout(t));
            }
            _ = sleep_until(refresh), if refresh.is_some() => {}
        }
    }
}

/// Runs one driver step; a panic inside it (a bug in the shard core) ends the incarnation
/// through the restart policy instead of taking the node down.
fn guarded(driver: &mut ShardDriver, t: Time, step: impl FnOnce(&mut ShardDriver, Time)) {
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| step(driver, t)));
    if let Err(panic) = run {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        tracing::error!(panic = %why, "the shard core panicked; restarting the shard");
        driver.handle_crash(t, &format!("the shard core panicked: {why}"));
    }
}

async fn recv_node(
    rx: &mut Option<mpsc::Receiver<(NodeId, NodeFrame)>>,
) -> Option<(NodeId, NodeFrame)> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_done(writer: &mut Option<Writer>) -> Option<WalDone> {
    match writer {
        Some(w) => w.done.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_read(reader: &mut Option<Reader>) -> Option<ReadDone> {
    match reader {
        Some(r) => r.done.recv().await,
        None => std::future::pending().await,
    }
}

async fn join_recovery(
    recovery: &mut Option<Recovery>,
) -> Result<storage::Recovered, RecoverError> {
    let Some(r) = recovery.as_mut() else {
        return std::future::pending().await;
    };
    let joined = r.await;
    *recovery = None;
    joined.unwrap_or_else(|e| {
        Err(RecoverError::Store(StoreError {
            kind: StoreErrorKind::Io,
            op: "recover",
            file: String::new(),
            message: format!("recovery panicked: {e}"),
        }))
    })
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

impl HostIo {
    fn new(slot: Arc<ShardSlot>) -> HostIo {
        HostIo {
            slot,
            sinks: HashMap::new(),
            writer: None,
            reader: None,
            recovery: None,
            stop: None,
            export: None,
            published: DriverStatus::default(),
            log_reads: peers::LogReads::new(),
            replica_published: None,
            elections: ElectionCounter::default(),
        }
    }

    /// Does what the driver asked, in order.
    fn perform_effects(&mut self, driver: &mut ShardDriver) {
        while let Some(e) = driver.poll_effect() {
            match e {
                Effect::Write(job) => {
                    let w = self.writer.as_ref().expect("a write only while serving");
                    // At most one write is in flight (the driver's rule), so this never blocks.
                    if w.tx.send(job).is_err() {
                        driver.handle_crash(SystemClock.time(), "the WAL writer thread ended");
                    }
                }
                Effect::Read(job) => self.start_read(driver, job),
                Effect::Recover(job) => self.start_recovery(job),
                Effect::Replies { session, replies } => {
                    self.deliver(driver, session, replies);
                }
                Effect::Forget { session } => {
                    self.sinks.remove(&session);
                }
                Effect::LogRead(job) => self.log_reads.start(&self.slot.dir, job),
                e @ (Effect::Peer(_)
                | Effect::Forward { .. }
                | Effect::Remote { .. }
                | Effect::RemoteClose { .. }) => self.send_to_node(e),
                Effect::CloseSession {
                    session,
                    why: CloseReason::LeaderChanged,
                } => {
                    // The session lives on and attaches again: its channel stays.
                    if let Some(tx) = self.sinks.get(&session) {
                        notify(tx, SessionMsg::ShardDetached(self.slot.idx));
                    }
                }
                Effect::CloseSession { session, why } => {
                    if let Some(tx) = self.sinks.remove(&session) {
                        let idx = self.slot.idx;
                        notify(
                            &tx,
                            match why {
                                CloseReason::Overloaded => SessionMsg::Overloaded(idx),
                                _ => SessionMsg::ShardRestarted(idx),
                            },
                        );
                    }
                }
            }
        }
    }

    /// A frame for another node, through the node link (only a replica's driver has them).
    fn send_to_node(&self, e: Effect) {
        let (Some(r), Ok((to, frame))) = (&self.slot.replication, NodeFrame::from_effect(e)) else {
            return;
        };
        r.sender.send(to, self.slot.idx, frame);
    }

    /// Hands a read to the reader thread (started on the first read).
    fn start_read(&mut self, driver: &mut ShardDriver, job: fabric_router::host::ReadJob) {
        if self.reader.is_none() {
            match Reader::spawn(&self.slot) {
                Ok(r) => self.reader = Some(r),
                Err(e) => tracing::error!(error = %e, "cannot start the shard's reader thread"),
            }
        }
        let sent = match &self.reader {
            Some(r) => r.send(job),
            None => Err(job.failed("the shard's reader thread could not start")),
        };
        if let Err(done) = sent {
            guarded(driver, SystemClock.time(), |d, t| {
                d.handle_read_done(t, done)
            });
        }
    }

    /// Hands a session its replies without waiting: the channel's capacity covers every reply
    /// a session can be owed (`host::session_reply_queue_batches_min`), so Full means the
    /// session stopped taking replies, and the driver decides (it closes the session).
    fn deliver(&mut self, driver: &mut ShardDriver, session: SessionId, replies: Vec<Reply>) {
        let Some(tx) = self.sinks.get(&session) else {
            return; // the session is gone (it told the shard `Closed`)
        };
        match tx.try_send(SessionMsg::Replies(self.slot.idx, replies)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                driver.handle_reply_refused(SystemClock.time(), session);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.sinks.remove(&session);
            }
        }
    }

    /// Takes batches while the driver takes them at once (up to `host::PUMP_BATCHES_MAX`), each whole.
    fn take_batches(
        &mut self,
        driver: &mut ShardDriver,
        clock: &SystemClock,
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
                    self.sinks.entry(session).or_insert(tx);
                    guarded(driver, clock.time(), |d, t| {
                        d.handle_batch(t, session, requests)
                    });
                }
                ShardMsg::Members(target) => {
                    if let Ok(mut t) = self.slot.members_target.lock() {
                        t.clone_from(&target);
                    }
                    driver.set_members_target(target);
                }
                ShardMsg::Stop { done } => {
                    // A leading replica hands its leadership over before the host stops.
                    guarded(driver, clock.time(), |d, t| {
                        d.handle_stop(t);
                    });
                    self.stop = Some(done);
                }
            }
            taken += 1;
            if taken < PUMP_BATCHES_MAX && self.stop.is_none() && driver.feeds_now() {
                next = rx.try_recv().ok();
            }
        }
    }

    /// A write finished: the driver learns the outcome; the buffer goes back for reuse.
    fn write_done(&mut self, driver: &mut ShardDriver, t: Time, done: Option<WalDone>) {
        let Some(done) = done else {
            // The writer thread ended without reporting: it panicked.
            self.writer = None;
            driver.handle_crash(t, "the WAL writer thread ended");
            return;
        };
        let ok = done.result.is_ok();
        if ok {
            // The metadata group has no shard series.
            let meter = self.slot.metrics.shards.get(self.slot.idx as usize);
            if let Some(meter) = meter.filter(|_| self.slot.metrics.enabled()) {
                crate::metrics::record_commit(meter, done.records, done.bytes, done.fsync);
            }
            if let Ok(mut s) = self.slot.stats.lock() {
                s.wal_writes += 1;
                s.wal_bytes += done.bytes as u64;
                s.records_written += done.records;
            }
        }
        guarded(driver, t, |d, t| d.handle_write_done(t, done.result));
        if ok {
            driver.recycle_wal_buffer(done.buffer);
        }
    }

    /// Starts a recovery on the blocking pool, after the ended incarnation's writer thread has
    /// finished its last write (its channel closes when the sender is dropped here).
    fn start_recovery(&mut self, job: fabric_router::host::RecoverJob) {
        let old = self.writer.take().map(|w| w.thread);
        let dir = self.slot.dir.clone();
        let durability = self.slot.durability;
        self.recovery = Some(tokio::task::spawn_blocking(move || {
            if let Some(thread) = old {
                let _ = thread.join();
            }
            storage::recover(&dir, &job, durability)
        }));
    }

    /// A recovery finished: the new incarnation gets a writer thread, the driver the shard.
    fn recovered(
        &mut self,
        driver: &mut ShardDriver,
        t: Time,
        result: Result<storage::Recovered, RecoverError>,
    ) {
        let result = result.and_then(|r| self.start_incarnation(r));
        let first = self
            .slot
            .first_recovery
            .lock()
            .ok()
            .and_then(|mut f| f.take());
        if let Some(first) = first {
            let outcome = result.as_ref().map(|_| ());
            let _ = first.send(outcome.map_err(|e| RecoveryRefused(e.to_string())));
        }
        if let Ok((shard, _)) = &result {
            if self.slot.metrics.enabled() {
                self.export = Some(ShardExport::new(shard.shard()));
            }
        }
        guarded(driver, t, |d, t| d.handle_recovered(t, result));
    }

    fn start_incarnation(
        &mut self,
        r: storage::Recovered,
    ) -> Result<(Core, RecoveryReport), RecoverError> {
        let (tx, rx) = crossbeam_channel::bounded(WRITER_QUEUE_WRITES_MAX);
        let (done_tx, done) = mpsc::channel(WRITER_QUEUE_WRITES_MAX);
        let store = r.store;
        let thread = std::thread::Builder::new()
            .name(format!("wal-{}", self.slot.idx))
            .spawn(move || storage::writer_thread(store, rx, done_tx))
            .map_err(|e| {
                RecoverError::Store(StoreError {
                    kind: StoreErrorKind::Io,
                    op: "start WAL thread",
                    file: String::new(),
                    message: e.to_string(),
                })
            })?;
        self.writer = Some(Writer { tx, done, thread });
        tracing::info!(
            records = r.report.records,
            segments = r.report.segments,
            bytes = r.report.bytes,
            ms = r.duration.as_millis() as u64,
            "shard recovered"
        );
        if let Ok(mut s) = self.slot.stats.lock() {
            s.recovery_ms = r.duration.as_millis() as u64;
            s.recovered_records = r.report.records;
        }
        if let Some(meter) = self.slot.metrics.shards.get(self.slot.idx as usize) {
            meter.recovery_seconds.set(r.duration.as_secs_f64());
            meter.recovered_records.set(r.report.records as f64);
        }
        Ok((r.core, r.report))
    }

    /// Ends the writer thread after its last write (graceful stop).
    async fn end_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            drop(w.tx);
            let _ = tokio::task::spawn_blocking(move || w.thread.join()).await;
        }
    }

    fn refresh_due(&self) -> Option<Instant> {
        self.export
            .as_ref()
            .filter(|e| e.refresh_pending)
            .and_then(|e| e.refresh_due(Instant::now()))
    }

    /// The driver's status into the slot (`/readyz`, metrics), logging what changed; and the
    /// shard's counters into the metrics, once per loop iteration.
    fn publish(&mut self, driver: &ShardDriver) {
        let st = driver.status();
        if *st != self.published {
            log_change(&self.published, st, self.slot.wal_sync_stall_ms_max);
            self.slot.ready.store(st.serving, Ordering::SeqCst);
            // Counted across hosts: a host started again after its adapter failed counts on.
            let more = st.restarts.saturating_sub(self.published.restarts);
            self.slot.restarts.fetch_add(more, Ordering::SeqCst);
            if let Ok(mut s) = self.slot.stats.lock() {
                s.wal_stalled = st.wal_stalled;
                s.disk_full = st.disk_full;
                s.last_error.clone_from(&st.last_error);
            }
            self.published = st.clone();
        }
        self.publish_replica(driver);
        let m = &self.slot.metrics;
        let meter = m.shards.get(self.slot.idx as usize);
        if let (Some(x), Some(shard), Some(meter)) = (self.export.as_mut(), driver.shard(), meter) {
            x.export(shard, meter, &m.meshes, Instant::now());
        }
    }
}

impl HostIo {
    fn publish_replica(&mut self, driver: &ShardDriver) {
        if self.slot.replication.is_none() {
            return;
        }
        let role = driver.replica().map(|r| {
            let leading = r.mode() == fabric_shard::replica::Mode::Leading;
            self.elections.observe(r.raft().term(), r.raft().role());
            let repairing = r.raft().repair_through().is_some();
            (r.raft().term(), r.raft().leader(), leading, repairing)
        });
        let now = Instant::now();
        let fresh = self.replica_published.is_some_and(|(was, at)| {
            Some(was) == role
                && now.duration_since(at) < Duration::from_millis(REPLICA_PUBLISH_INTERVAL_MS)
        });
        if fresh {
            return;
        }
        self.replica_published = role.map(|r| (r, now));
        let elections = self.elections.elections;
        let status = driver.replica().map(|r| {
            let raft = r.raft();
            let conf = raft.membership();
            let voters: Vec<NodeId> = conf.voters.iter().copied().collect();
            let learners: Vec<NodeId> = conf.learners.iter().copied().collect();
            let matched = voters
                .iter()
                .chain(&learners)
                .filter_map(|v| raft.progress(*v).map(|(_, m)| (*v, m)))
                .collect();
            ReplicaStatus {
                node: raft.id(),
                term: raft.term(),
                leader: raft.leader(),
                commit: raft.commit(),
                applied: r.applied(),
                last_index: raft.last_index(),
                leading: r.mode() == fabric_shard::replica::Mode::Leading,
                voters,
                learners,
                matched,
                leader_changes: r.stats().leader_changes,
                snapshots_sent: r.stats().snapshots_sent,
                snapshots_installed: r.stats().snapshots_installed,
                elections,
                repair_through: raft.repair_through(),
            }
        });
        if let Ok(mut s) = self.slot.stats.lock() {
            if s.replica != status {
                s.replica = status;
            }
        }
    }
}

/// One log line per change an operator must hear about.
fn log_change(old: &DriverStatus, new: &DriverStatus, stall_ms: u64) {
    if new.restarts > old.restarts {
        tracing::error!(
            restarts = new.restarts,
            reason = new.last_error.as_deref().unwrap_or(""),
            disk_full = new.disk_full,
            "shard failed; the restart policy recovers it from its WAL"
        );
    }
    if new.stopped && !old.stopped {
        tracing::error!(
            reason = new.last_error.as_deref().unwrap_or(""),
            "shard stays down until an operator looks"
        );
    }
    if new.wal_stalled && !old.wal_stalled {
        tracing::error!(
            stall_ms,
            "a WAL write (fdatasync) has been in flight longer than wal_sync_stall_ms_max"
        );
    }
}

/// The shard actor's control messages.
pub enum ShardActorMsg {
    HostEnded,
}

/// Holds one shard's host task for its lifecycle.
pub struct ShardActor;

pub struct ShardActorState {
    task: Option<tokio::task::JoinHandle<()>>,
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
            .ok_or("shard input is held by another host")?;
        let node_rx = match &slot.replication {
            Some(r) => Some(
                r.inbound
                    .lock()
                    .map_err(|_| "shard inbound lock poisoned")?
                    .take()
                    .ok_or("shard inbound frames are held by another host")?,
            ),
            None => None,
        };
        let input = InputGuard {
            slot: slot.clone(),
            rx: Some(rx),
            node_rx,
        };
        let task = tokio::spawn(
            async move {
                use futures_util::FutureExt;
                let run = std::panic::AssertUnwindSafe(host_loop(slot, input)).catch_unwind();
                if run.await.is_err() {
                    tracing::error!("the shard host's adapter panicked");
                    let _ = myself.cast(ShardActorMsg::HostEnded);
                    return;
                }
                myself.stop(Some("stopped".into()));
            }
            .instrument(span),
        );
        Ok(ShardActorState { task: Some(task) })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardActorMsg::HostEnded => {
                state.task = None;
                Err("the shard host's adapter panicked".into())
            }
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(task) = state.task.take() {
            task.abort();
            let _ = task.await;
        }
        Ok(())
    }
}

/// Starts the shard hosts and starts one again if its adapter fails; shard failures
/// themselves (failed writes, panics in the core, crash drills) are the driver's to handle.
pub struct NodeSupervisor;

pub enum SupervisorMsg {
    Crash(ShardIdx),
    /// Start shard `i`'s host again (its adapter failed).
    Restart(ShardIdx),
    /// Stop every shard gracefully (each finishes its batch and syncs), then reply.
    Stop(oneshot::Sender<()>),
}

pub struct SupervisorState {
    slots: Vec<Arc<ShardSlot>>,
    senders: Vec<mpsc::Sender<ShardMsg>>,
    actors: Vec<Option<ActorRef<ShardActorMsg>>>,
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
                if let Some(slot) = state.slots.get(i as usize) {
                    slot.crash.notify_one();
                }
            }
            SupervisorMsg::Restart(i) => {
                let i = i as usize;
                if !state.stopping && state.actors.get(i).is_some_and(|a| a.is_none()) {
                    let slot = state.slots[i].clone();
                    match Actor::spawn_linked(None, ShardActor, slot, myself.get_cell()).await {
                        Ok((a, _)) => state.actors[i] = Some(a),
                        Err(e) => tracing::error!(shard = i, error = %e, "cannot start shard host"),
                    }
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
        let SupervisionEvent::ActorFailed(cell, err) = evt else {
            return Ok(());
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
        state.slots[i].ready.store(false, Ordering::SeqCst);
        tracing::error!(shard = i, reason = %err, "shard host failed; starting it again");
        let me = myself.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ADAPTER_RESTART_DELAY_MS)).await;
            let _ = me.cast(SupervisorMsg::Restart(i as ShardIdx));
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests;
