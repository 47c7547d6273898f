//! The node's links to every other member of its cluster, over one [`NodeLink`].
//!
//! [`NodeLinks::start`] listens on the link and dials every member with exponential backoff
//! (capped). The link keeps one connection per node pair and that is the one used: a dial or
//! an accept it refuses as a duplicate, or a connection it replaces, is normal, not an error.
//! A node waits `links_dial_backoff_ms_min` before dialing a member of lower id (at start and
//! after losing it), so the pair's connection is usually the one the lower id dials, which is
//! the one the link keeps, and fewer handshakes are wasted.
//!
//! - **Sending.** [`NodeLinks::send`] never blocks: it queues a frame on the peer's current
//!   connection (at most `links_queue_frames_max` waiting) or drops and counts it (peer
//!   unknown or down, queue full; Raft repeats what is lost). A frame dropped while the
//!   connection stays up (queue full, group stream failed) ends it: a link reset. One task per connection takes
//!   everything queued, writes it, then waits. It opens a group's stream on the group's first
//!   frame (at most `links_group_streams_per_peer_max` streams, each opened within
//!   `links_stream_open_ms_max`) and writes only on streams it opened.
//! - **Receiving.** One task per connection accepts the peer's group streams (as many as the
//!   link's `streams_per_connection_max` lets the peer open), and one task per stream reads
//!   its frames until it ends, into the bounded inbound channel (`links_inbound_frames_max`).
//!   When that channel is full the reading task waits and QUIC flow control holds the peer
//!   back: nothing is buffered without bound. A malformed or oversize frame closes its stream
//!   (counted); the peer's next frame for that group opens a new one.
//! - **Connection loss.** Frames queued for a connection that ends are dropped and counted,
//!   and the peer is redialed.

use super::link::{
    FrameSender, GroupStream, Incoming, LinkError, NodeLink, PeerConn, Refusal, CLOSE_DUPLICATE,
    CLOSE_REPLACED, CONTROL_GROUP, STREAMS_PER_CONNECTION_MAX_DEFAULT,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// Default frames waiting to be written to one peer.
pub const LINKS_QUEUE_FRAMES_MAX_DEFAULT: usize = 1024;
/// Default received frames waiting for the application.
pub const LINKS_INBOUND_FRAMES_MAX_DEFAULT: usize = 4096;
/// Default first dial backoff, and the wait before dialing a member of lower id.
pub const LINKS_DIAL_BACKOFF_MS_MIN_DEFAULT: u64 = 50;
/// Default cap of the dial backoff.
pub const LINKS_DIAL_BACKOFF_MS_MAX_DEFAULT: u64 = 5_000;
/// Default group streams one connection keeps open for sending: the link's default
/// concurrent streams, less the control stream.
pub const LINKS_GROUP_STREAMS_PER_PEER_MAX_DEFAULT: usize =
    STREAMS_PER_CONNECTION_MAX_DEFAULT as usize - 1;
/// Default time to open a group stream (the peer's stream limit may hold it back).
pub const LINKS_STREAM_OPEN_MS_MAX_DEFAULT: u64 = 5_000;
/// Default members a node links to.
pub const LINKS_PEERS_MAX_DEFAULT: usize = 256;
/// Largest value a frame-count or stream-count limit may be set to.
pub const LINKS_COUNT_MAX_LIMIT: usize = 1 << 20;
/// Largest value a time limit may be set to.
pub const LINKS_MS_MAX_LIMIT: u64 = 600_000;
/// Longest [`NodeLinks::shutdown`] waits for closed connections to drain. Peers learn of the
/// close from its first packet; a dial still in its handshake drains for three probe timeouts
/// (seconds), which the endpoint finishes in the background.
pub const LINKS_SHUTDOWN_DRAIN_MS_MAX: u64 = 500;

/// A member of the cluster: its node id and the address of its node link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub link: SocketAddr,
}

/// A frame received from a peer on a shard group's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound<T> {
    pub from: u64,
    pub group: u32,
    pub frame: T,
    /// The connection it came on (quinn's stable id): a frame on another connection than
    /// the last one from this peer means the old one ended, and what was queued on it may
    /// be lost.
    pub conn: usize,
}

/// Bounds of [`NodeLinks`]; see the module docs for what each holds back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinksLimits {
    pub links_queue_frames_max: usize,
    pub links_inbound_frames_max: usize,
    pub links_dial_backoff_ms_min: u64,
    pub links_dial_backoff_ms_max: u64,
    pub links_group_streams_per_peer_max: usize,
    pub links_stream_open_ms_max: u64,
    pub links_peers_max: usize,
}

impl Default for LinksLimits {
    fn default() -> LinksLimits {
        LinksLimits {
            links_queue_frames_max: LINKS_QUEUE_FRAMES_MAX_DEFAULT,
            links_inbound_frames_max: LINKS_INBOUND_FRAMES_MAX_DEFAULT,
            links_dial_backoff_ms_min: LINKS_DIAL_BACKOFF_MS_MIN_DEFAULT,
            links_dial_backoff_ms_max: LINKS_DIAL_BACKOFF_MS_MAX_DEFAULT,
            links_group_streams_per_peer_max: LINKS_GROUP_STREAMS_PER_PEER_MAX_DEFAULT,
            links_stream_open_ms_max: LINKS_STREAM_OPEN_MS_MAX_DEFAULT,
            links_peers_max: LINKS_PEERS_MAX_DEFAULT,
        }
    }
}

impl LinksLimits {
    /// Every count is 1 to [`LINKS_COUNT_MAX_LIMIT`], every time 1 to [`LINKS_MS_MAX_LIMIT`],
    /// and the backoff's floor is at most its cap.
    pub fn validate(&self) -> Result<(), LinkError> {
        let counts = [
            ("links_queue_frames_max", self.links_queue_frames_max),
            ("links_inbound_frames_max", self.links_inbound_frames_max),
            (
                "links_group_streams_per_peer_max",
                self.links_group_streams_per_peer_max,
            ),
            ("links_peers_max", self.links_peers_max),
        ];
        for (name, v) in counts {
            if v == 0 || v > LINKS_COUNT_MAX_LIMIT {
                return Err(LinkError::Config(format!(
                    "{name} must be 1 to {LINKS_COUNT_MAX_LIMIT}, not {v}"
                )));
            }
        }
        let times = [
            ("links_dial_backoff_ms_min", self.links_dial_backoff_ms_min),
            ("links_dial_backoff_ms_max", self.links_dial_backoff_ms_max),
            ("links_stream_open_ms_max", self.links_stream_open_ms_max),
        ];
        for (name, v) in times {
            if v == 0 || v > LINKS_MS_MAX_LIMIT {
                return Err(LinkError::Config(format!(
                    "{name} must be 1 to {LINKS_MS_MAX_LIMIT}, not {v}"
                )));
            }
        }
        if self.links_dial_backoff_ms_min > self.links_dial_backoff_ms_max {
            return Err(LinkError::Config(
                "links_dial_backoff_ms_min must not be above links_dial_backoff_ms_max".into(),
            ));
        }
        Ok(())
    }
}

/// A peer as [`NodeLinks::status`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: u64,
    pub link: SocketAddr,
    /// Connected now.
    pub up: bool,
    /// When its last frame arrived, in ms since [`NodeLinks::start`]; `None` if none has.
    pub last_frame_ms: Option<u64>,
    /// Connections with it established so far (more than one: it was lost and found again).
    pub connections: u64,
    /// The live connection's current round-trip estimate (QUIC's), when it is up.
    pub rtt: Option<std::time::Duration>,
    /// Connections with it this node ended because it dropped a frame for it (link resets).
    pub resets: u64,
}

/// Counters of [`NodeLinks`] since its start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinksStats {
    /// Frames written to a peer's stream.
    pub frames_sent: u64,
    /// Frames read and decoded from peers.
    pub frames_received: u64,
    /// Frames not sent: peer unknown or down, queue full, connection or stream lost with the
    /// frame queued, frame over `node_frame_bytes_max`, stream limit reached.
    pub frames_dropped: u64,
    /// Connections established, by dial or accept.
    pub connections: u64,
    /// Connections established with a peer that had one before.
    pub reconnects: u64,
    /// Dials that failed (not counting duplicates the link refused, which are normal).
    pub dials_failed: u64,
    /// Streams a peer opened that were closed for a malformed or oversize frame or header.
    pub streams_refused: u64,
    /// Connections this node ended because it dropped a frame while they stayed up (a full
    /// queue, a failed group stream): link resets.
    pub resets: u64,
}

#[derive(Default)]
struct Counters {
    frames_sent: AtomicU64,
    frames_received: AtomicU64,
    frames_dropped: AtomicU64,
    connections: AtomicU64,
    reconnects: AtomicU64,
    dials_failed: AtomicU64,
    streams_refused: AtomicU64,
    resets: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// `last_frame_ms` of a peer no frame came from yet.
const NEVER: u64 = u64::MAX;

/// A queued frame and its group (frames are `Sync`, so a writing task holding a reference to
/// one across awaits stays `Send`).
type Queued<T> = (u32, T);

/// The connection in use with a peer and its send queue.
struct Current<T> {
    conn: quinn::Connection,
    queue: mpsc::Sender<Queued<T>>,
}

struct Slot<T> {
    current: Option<Current<T>>,
    connections: u64,
}

struct Peer<T> {
    link: SocketAddr,
    slot: Mutex<Slot<T>>,
    last_frame_ms: AtomicU64,
    /// Connections with it this node ended for a dropped frame (link resets).
    resets: AtomicU64,
}

impl<T> Peer<T> {
    fn new(link: SocketAddr) -> Peer<T> {
        Peer {
            link,
            slot: Mutex::new(Slot {
                current: None,
                connections: 0,
            }),
            last_frame_ms: AtomicU64::new(NEVER),
            resets: AtomicU64::new(0),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Slot<T>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Shared<T> {
    node: u64,
    started: Instant,
    limits: LinksLimits,
    /// Every member but this node: those at start, then as members join and leave
    /// ([`NodeLinks::add_member`], [`NodeLinks::remove_member`]).
    peers: RwLock<BTreeMap<u64, Arc<Peer<T>>>>,
    counters: Counters,
    /// The peer that closed its connection saying it removed this node from the cluster
    /// (0: none did, or a member connected since: it joined again).
    removed: AtomicU64,
    inbound: mpsc::Sender<Inbound<T>>,
    /// Applied to each batch taken for a peer before it is written (the node folds its
    /// shards' heartbeats into one frame: `fabric_router::host::beats::coalesce`).
    coalesce: Coalesce<T>,
}

/// What a batch for one peer goes through before it is written: (group, frame) in queue order.
pub type Coalesce<T> = fn(&mut Vec<(u32, T)>);

impl<T> Shared<T> {
    fn peers(&self) -> RwLockReadGuard<'_, BTreeMap<u64, Arc<Peer<T>>>> {
        self.peers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn peer(&self, id: u64) -> Option<Arc<Peer<T>>> {
        self.peers().get(&id).cloned()
    }

    /// The live connection with `peer`, if any.
    fn live(&self, peer: u64) -> Option<quinn::Connection> {
        let p = self.peer(peer)?;
        let slot = p.slot();
        let c = slot.current.as_ref()?;
        c.conn.close_reason().is_none().then(|| c.conn.clone())
    }

    /// Forgets `conn` as `peer`'s connection, unless another replaced it already.
    fn clear(&self, peer: u64, conn: &quinn::Connection) {
        if let Some(p) = self.peer(peer) {
            let mut slot = p.slot();
            if slot
                .current
                .as_ref()
                .is_some_and(|c| c.conn.stable_id() == conn.stable_id())
            {
                slot.current = None;
            }
        }
    }

    fn dropped(&self, n: usize) {
        add(&self.counters.frames_dropped, n as u64);
    }

    fn removed_by(&self, peer: u64) {
        if self.removed.swap(peer, Ordering::Relaxed) == 0 {
            tracing::error!(
                peer,
                "this node was removed from the cluster (a committed membership change, applied \
                 by the peer); the members refuse it from now on: stop it"
            );
        }
    }
}

/// What the background tasks share: the links' state, the link, the stop signal, and a
/// sender each task holds until it ends (so shutdown can wait for all of them).
struct Ctx<T> {
    shared: Arc<Shared<T>>,
    link: NodeLink,
    stop: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
}

impl<T> Clone for Ctx<T> {
    fn clone(&self) -> Ctx<T> {
        Ctx {
            shared: self.shared.clone(),
            link: self.link.clone(),
            stop: self.stop.clone(),
            alive: self.alive.clone(),
        }
    }
}

/// The frames a [`NodeLinks`] carries.
trait Frame: Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Frame for T {}

impl<T: Frame> Ctx<T> {
    /// Runs `fut` in a task that ends when it does or at the stop signal.
    fn spawn(&self, span: tracing::Span, fut: impl Future<Output = ()> + Send + 'static) {
        let mut stop = self.stop.clone();
        let alive = self.alive.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {}
                    () = fut => {}
                }
                drop(alive);
            }
            .instrument(span),
        );
    }

    fn span(&self, task: &'static str, peer: u64) -> tracing::Span {
        tracing::info_span!("node_links", node = self.shared.node, peer, task)
    }

    /// Makes `pc` the connection in use with its peer and starts its sending and accepting
    /// tasks, unless the link closed it already (another connection won).
    fn install(&self, pc: PeerConn, dialed: bool) {
        let peer = pc.node_id;
        let Some(p) = self.shared.peer(peer) else {
            tracing::warn!(peer, "a node outside this node's members connected; closed");
            pc.close();
            return;
        };
        let (queue, rx) = mpsc::channel(self.shared.limits.links_queue_frames_max);
        {
            let mut slot = p.slot();
            if pc.connection.close_reason().is_some() {
                tracing::debug!(peer, dialed, "connection superseded before use");
                return;
            }
            // A replaced connection was closed by the link; its sending task drops its queue.
            slot.current = Some(Current {
                conn: pc.connection.clone(),
                queue,
            });
            slot.connections += 1;
            if slot.connections > 1 {
                add(&self.shared.counters.reconnects, 1);
            }
        }
        add(&self.shared.counters.connections, 1);
        if self.shared.removed.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!(peer, "a member connected again after this node was removed");
        }
        tracing::info!(peer, dialed, "peer connected");
        let pc = Arc::new(pc);
        let ctx = self.clone();
        self.spawn(self.span("send", peer), send_loop(ctx, pc.clone(), rx));
        let ctx = self.clone();
        self.spawn(self.span("accept_groups", peer), accept_groups(ctx, pc));
    }
}

/// Whether a link error is the normal end of a duplicate connection (refused, replaced, or
/// closed by this node), not a failure.
fn normal_end(e: &LinkError) -> bool {
    match e {
        LinkError::Connection(c) => duplicate_close(c),
        e => e.refusal() == Some(Refusal::Duplicate),
    }
}

/// Whether the peer closed the connection because it removed this node from the cluster.
fn removal_close(c: &quinn::ConnectionError) -> bool {
    matches!(c, quinn::ConnectionError::ApplicationClosed(a)
        if a.error_code.into_inner() == u64::from(super::link::CLOSE_MEMBER_REMOVED))
}

fn duplicate_close(c: &quinn::ConnectionError) -> bool {
    match c {
        quinn::ConnectionError::ApplicationClosed(a) => {
            let code = a.error_code.into_inner();
            code == u64::from(CLOSE_DUPLICATE) || code == u64::from(CLOSE_REPLACED)
        }
        quinn::ConnectionError::LocallyClosed => true,
        _ => false,
    }
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Keeps a connection with `peer`: waits while one is live, dials when none is, with
/// exponential backoff after failures.
async fn dial_loop<T: Frame>(ctx: Ctx<T>, peer: u64, mine: Arc<Peer<T>>) {
    let addr = mine.link;
    let (min, max) = (
        ctx.shared.limits.links_dial_backoff_ms_min,
        ctx.shared.limits.links_dial_backoff_ms_max,
    );
    let mut backoff = min;
    // The lower id of a pair dials first (module docs).
    let mut wait_first = peer < ctx.shared.node;
    loop {
        // A member that left is no longer dialed, and one that joined again (or moved) has a
        // dialer of its own: one per member entry.
        if ctx
            .shared
            .peer(peer)
            .is_none_or(|p| !Arc::ptr_eq(&p, &mine))
        {
            return;
        }
        if let Some(conn) = ctx.shared.live(peer) {
            let reason = conn.closed().await;
            if removal_close(&reason) {
                // Dialing goes on (refused, with backoff): should it join again, it is let in.
                ctx.shared.removed_by(peer);
            }
            if duplicate_close(&reason) {
                tracing::debug!(reason = %reason, "connection replaced");
            } else {
                tracing::info!(reason = %reason, "connection lost");
            }
            backoff = min;
            wait_first = peer < ctx.shared.node;
            continue;
        }
        if wait_first {
            wait_first = false;
            sleep_ms(min).await;
            continue;
        }
        match ctx.link.connect(addr, peer).await {
            Ok(pc) => {
                ctx.install(pc, true);
                backoff = min;
            }
            Err(e) if normal_end(&e) => {
                tracing::debug!(error = %e, "dial refused as a duplicate: the other connection is kept");
                sleep_ms(min).await;
            }
            Err(e) => {
                add(&ctx.shared.counters.dials_failed, 1);
                tracing::debug!(error = %e, backoff_ms = backoff, "dial failed; retrying");
                sleep_ms(backoff).await;
                backoff = backoff.saturating_mul(2).min(max);
            }
        }
    }
}

/// Installs every connection the link accepts; refusals were logged by the link.
async fn accept_loop<T: Frame>(ctx: Ctx<T>, mut incoming: Incoming) {
    while let Some(accepted) = incoming.next().await {
        match accepted {
            Ok(pc) => ctx.install(pc, false),
            Err(e) if normal_end(&e) => tracing::debug!(error = %e, "duplicate connection"),
            Err(e) => tracing::debug!(error = %e, "incoming connection refused or failed"),
        }
    }
}

/// The sending task of one connection: takes everything queued, writes it, waits. When the
/// connection ends (or another replaces it), what is still queued is dropped and counted.
async fn send_loop<T: Frame>(ctx: Ctx<T>, pc: Arc<PeerConn>, mut rx: mpsc::Receiver<Queued<T>>) {
    let limit = ctx.shared.limits.links_queue_frames_max;
    let mut streams = HashMap::new();
    let mut batch = Vec::new();
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, limit) => n,
            _ = pc.connection.closed() => 0,
        };
        // Frames other threads are queueing in this same instant (every shard's heartbeats
        // at the tick) join the batch: one yield, then whatever is there.
        if n > 0 && batch.len() < limit {
            tokio::task::yield_now().await;
            while batch.len() < limit {
                match rx.try_recv() {
                    Ok(f) => batch.push(f),
                    Err(_) => break,
                }
            }
        }
        if n == 0 || !write_batch(&ctx, &pc, &mut streams, &mut batch).await {
            break;
        }
    }
    ctx.shared.clear(pc.node_id, &pc.connection);
    rx.close();
    let mut lost = batch.len();
    while rx.try_recv().is_ok() {
        lost += 1;
    }
    ctx.shared.dropped(lost);
    if lost > 0 {
        tracing::debug!(lost, "frames queued for a lost connection dropped");
    }
}

/// Writes a batch, in order; `false` once the connection is gone (the rest is counted as
/// dropped). A frame the stream refused is dropped; a failed stream is reopened next time.
async fn write_batch<T: Frame>(
    ctx: &Ctx<T>,
    pc: &PeerConn,
    streams: &mut HashMap<u32, FrameSender>,
    batch: &mut Vec<Queued<T>>,
) -> bool {
    let counters = &ctx.shared.counters;
    (ctx.shared.coalesce)(batch);
    let mut frames = batch.drain(..);
    while let Some((group, frame)) = frames.next() {
        match write_one(&ctx.shared.limits, pc, streams, group, &frame).await {
            Ok(()) => add(&counters.frames_sent, 1),
            Err(e) if pc.connection.close_reason().is_some() => {
                ctx.shared.dropped(1 + frames.len());
                tracing::debug!(error = %e, "connection gone while writing");
                return false;
            }
            Err(e @ LinkError::FrameTooLarge { .. }) => {
                // Nothing was written: the stream stays usable.
                ctx.shared.dropped(1);
                tracing::warn!(shard = group, error = %e, "frame dropped");
            }
            Err(e) => {
                // The peer would see the group's next frames with a gap: the link starts over.
                ctx.shared.dropped(1 + frames.len());
                tracing::debug!(shard = group, error = %e, "group stream failed; frame dropped");
                let peer = ctx.shared.peer(pc.node_id);
                let resets = peer.as_ref().map(|p| &p.resets);
                let why = "a group stream failed";
                ctx.shared
                    .reset_for_drop(&pc.connection, pc.node_id, resets, why);
                return false;
            }
        }
    }
    true
}

impl<T> Shared<T> {
    /// Ends a connection that lost a frame while it stayed up (see [`NodeLinks::send`]),
    /// counted for the node and for the peer (`peer_resets`).
    fn reset_for_drop(
        &self,
        conn: &quinn::Connection,
        peer: u64,
        peer_resets: Option<&AtomicU64>,
        why: &str,
    ) {
        add(&self.counters.resets, 1);
        if let Some(r) = peer_resets {
            add(r, 1);
        }
        reset_connection(conn, peer, why);
    }
}

fn reset_connection(conn: &quinn::Connection, peer: u64, why: &str) {
    tracing::warn!(
        peer,
        "a frame for the peer was dropped ({why}); the connection starts over (link reset)"
    );
    conn.close(
        quinn::VarInt::from_u32(super::link::CLOSE_FRAME_DROPPED),
        b"frame dropped",
    );
}

/// Writes one frame on its group's stream, opening the stream on first use.
async fn write_one<T: Frame>(
    limits: &LinksLimits,
    pc: &PeerConn,
    streams: &mut HashMap<u32, FrameSender>,
    group: u32,
    frame: &T,
) -> Result<(), LinkError> {
    if !streams.contains_key(&group) {
        if streams.len() >= limits.links_group_streams_per_peer_max {
            return Err(LinkError::Protocol(format!(
                "links_group_streams_per_peer_max ({}) streams are open",
                limits.links_group_streams_per_peer_max
            )));
        }
        let ms = limits.links_stream_open_ms_max;
        let opened = tokio::time::timeout(Duration::from_millis(ms), pc.open_group(group))
            .await
            .map_err(|_| LinkError::Timeout {
                what: "a group stream to open",
                ms,
            })??;
        // Frames to this node come on the streams the peer opens; this one only sends.
        let (sender, _receiver) = opened.split();
        streams.insert(group, sender);
    }
    match streams.get_mut(&group) {
        Some(sender) => sender.send_frame(frame).await,
        None => Err(LinkError::Protocol("group stream missing".into())),
    }
}

/// Accepts the group streams the peer opens on one connection and starts a reading task for
/// each; a bad stream is refused and the next one accepted.
async fn accept_groups<T: Frame>(ctx: Ctx<T>, pc: Arc<PeerConn>) {
    let peer = pc.node_id;
    loop {
        match pc.accept_group().await {
            Ok(stream) => {
                let span = tracing::info_span!(
                    "node_links",
                    node = ctx.shared.node,
                    peer,
                    shard = stream.group,
                    task = "read"
                );
                let reader = ctx.clone();
                let conn = pc.connection.stable_id();
                ctx.spawn(span, read_loop(reader, peer, conn, stream));
            }
            Err(e) if pc.connection.close_reason().is_some() => {
                tracing::debug!(error = %e, "connection ended");
                return;
            }
            Err(e) => {
                add(&ctx.shared.counters.streams_refused, 1);
                tracing::warn!(error = %e, "group stream refused");
            }
        }
    }
}

/// Reads one group stream's frames into the inbound channel until the stream ends, waiting
/// while the channel is full. A malformed or oversize frame closes the stream.
async fn read_loop<T: Frame>(ctx: Ctx<T>, peer: u64, conn: usize, stream: GroupStream) {
    let group = stream.group;
    // Frames from this node go on the streams it opens; this one only receives.
    let (_sender, mut receiver) = stream.split();
    let shared = &ctx.shared;
    loop {
        match receiver.recv_frame::<T>().await {
            Ok(Some(frame)) => {
                add(&shared.counters.frames_received, 1);
                if let Some(p) = shared.peer(peer) {
                    let now = shared.started.elapsed().as_millis() as u64;
                    p.last_frame_ms.store(now, Ordering::Relaxed);
                }
                let inbound = Inbound {
                    from: peer,
                    group,
                    frame,
                    conn,
                };
                if shared.inbound.send(inbound).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(
                e @ (LinkError::Decode(_)
                | LinkError::FrameTooLarge { .. }
                | LinkError::Truncated(_)),
            ) => {
                // Dropping the receiver stops the stream.
                add(&shared.counters.streams_refused, 1);
                tracing::warn!(error = %e, "bad frame; group stream closed");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "group stream ended");
                return;
            }
        }
    }
}

/// This node's connections to every other member: see the module docs.
pub struct NodeLinks<T> {
    shared: Arc<Shared<T>>,
    link: NodeLink,
    stop: watch::Sender<bool>,
    /// Yields `None` once every background task has ended.
    done: mpsc::Receiver<()>,
    /// For the dial tasks of members that join (dropped at shutdown, so `done` can end).
    ctx: Option<Ctx<T>>,
}

/// The peers of `node`: every member but itself, each id once, at most `links_peers_max`.
fn peers<T>(
    node: u64,
    members: Vec<Member>,
    limits: &LinksLimits,
) -> Result<BTreeMap<u64, Arc<Peer<T>>>, LinkError> {
    let mut peers = BTreeMap::new();
    for m in members.into_iter().filter(|m| m.id != node) {
        if peers.insert(m.id, Arc::new(Peer::new(m.link))).is_some() {
            return Err(LinkError::Config(format!(
                "member {} is listed twice",
                m.id
            )));
        }
    }
    if peers.len() > limits.links_peers_max {
        return Err(LinkError::Config(format!(
            "{} peers are over links_peers_max ({})",
            peers.len(),
            limits.links_peers_max
        )));
    }
    Ok(peers)
}

impl<T> NodeLinks<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Starts accepting on `link` (already bound) and dialing every member but this node, in
    /// background tokio tasks. Returns the links and the bounded channel of frames received;
    /// it ends after [`NodeLinks::shutdown`]. A member listed twice, too many members or bad
    /// limits are a [`LinkError::Config`].
    pub async fn start(
        link: NodeLink,
        members: Vec<Member>,
        limits: LinksLimits,
    ) -> Result<(NodeLinks<T>, mpsc::Receiver<Inbound<T>>), LinkError> {
        NodeLinks::start_coalescing(link, members, limits, |_| {}).await
    }

    /// [`NodeLinks::start`], with every batch taken for a peer passed through `coalesce`
    /// before it is written.
    pub async fn start_coalescing(
        link: NodeLink,
        members: Vec<Member>,
        limits: LinksLimits,
        coalesce: Coalesce<T>,
    ) -> Result<(NodeLinks<T>, mpsc::Receiver<Inbound<T>>), LinkError> {
        limits.validate()?;
        let node = link.node_id();
        let peers = peers(node, members, &limits)?;
        let (inbound, inbound_rx) = mpsc::channel(limits.links_inbound_frames_max);
        let (stop, stop_rx) = watch::channel(false);
        let (alive, done) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            node,
            started: Instant::now(),
            limits,
            peers: RwLock::new(peers),
            counters: Counters::default(),
            removed: AtomicU64::new(0),
            inbound,
            coalesce,
        });
        let ctx = Ctx {
            shared: shared.clone(),
            link: link.clone(),
            stop: stop_rx,
            alive,
        };
        let incoming = link.listen();
        ctx.spawn(ctx.span("accept", node), accept_loop(ctx.clone(), incoming));
        let dials: Vec<(u64, Arc<Peer<T>>)> = shared
            .peers()
            .iter()
            .map(|(&id, p)| (id, p.clone()))
            .collect();
        for (peer, p) in dials {
            ctx.spawn(ctx.span("dial", peer), dial_loop(ctx.clone(), peer, p));
        }
        tracing::info!(node, peers = shared.peers().len(), "node links started");
        let links = NodeLinks {
            shared,
            link,
            stop,
            done,
            ctx: Some(ctx),
        };
        Ok((links, inbound_rx))
    }

    /// Queues `frame` for node `to` on shard group `group`. Never blocks: a peer that is
    /// unknown or down, a full queue (`links_queue_frames_max`) or the control group drop the
    /// frame and count it (Raft repeats what is lost). Returns whether it was queued, which
    /// is not delivery: a connection lost with it queued drops it too.
    ///
    /// A frame dropped for a full queue ends the connection
    /// ([`super::link::CLOSE_FRAME_DROPPED`]; what was queued on it is dropped too): the frames
    /// after it go on a new one, which both nodes see as a link reset, so nothing that needs
    /// in-order delivery (a forwarded session's batches and credit) builds on a gap.
    pub fn send(&self, to: u64, group: u32, frame: T) -> bool {
        let queued = group != CONTROL_GROUP
            && self.shared.peers().get(&to).is_some_and(|p| {
                let mut slot = p.slot();
                let Some(c) = slot.current.as_ref() else {
                    return false;
                };
                match c.queue.try_send((group, frame)) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        let why = "its queue (links_queue_frames_max) was full";
                        self.shared
                            .reset_for_drop(&c.conn, to, Some(&p.resets), why);
                        slot.current = None;
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
        if !queued {
            self.shared.dropped(1);
        }
        queued
    }

    /// Node `m` joined the cluster: it may connect, and it is dialed. A member already known
    /// at the same address is no change; at another address, it is dialed there from now on.
    pub fn add_member(&self, m: Member) -> Result<(), LinkError> {
        let Some(ctx) = &self.ctx else {
            return Ok(());
        };
        if m.id == self.shared.node {
            return Ok(());
        }
        let peer = {
            let mut peers = self.shared.peers.write().unwrap_or_else(|p| p.into_inner());
            if peers.get(&m.id).is_some_and(|p| p.link == m.link) {
                return Ok(());
            }
            if !peers.contains_key(&m.id) && peers.len() >= self.shared.limits.links_peers_max {
                return Err(LinkError::Config(format!(
                    "member {} would be over links_peers_max ({})",
                    m.id, self.shared.limits.links_peers_max
                )));
            }
            let p = Arc::new(Peer::new(m.link));
            peers.insert(m.id, p.clone());
            p
        };
        self.link.set_member(m.id, true);
        tracing::info!(node = self.shared.node, peer = m.id, link = %m.link, "member joined the node links");
        ctx.spawn(ctx.span("dial", m.id), dial_loop(ctx.clone(), m.id, peer));
        Ok(())
    }

    /// Node `id` left the cluster: it may no longer connect, its connection is closed and it
    /// is no longer dialed; frames for it are dropped.
    pub fn remove_member(&self, id: u64) {
        self.link.set_member(id, false);
        let gone = self
            .shared
            .peers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(p) = gone {
            if let Some(c) = p.slot().current.take() {
                let code = quinn::VarInt::from_u32(super::link::CLOSE_MEMBER_REMOVED);
                c.conn.close(code, b"member removed");
            }
            tracing::info!(
                node = self.shared.node,
                peer = id,
                "member left the node links"
            );
        }
    }

    /// The member that told this node it was removed from the cluster (closing their
    /// connection with [`super::link::CLOSE_MEMBER_REMOVED`]), if one did. A node down when it
    /// was removed hears nothing: the members refuse its dials as `NotMember`.
    pub fn removed_by(&self) -> Option<u64> {
        let by = self.shared.removed.load(Ordering::Relaxed);
        (by != 0).then_some(by)
    }

    /// Every peer, by id: connected now or not, when its last frame arrived.
    pub fn status(&self) -> Vec<PeerStatus> {
        let shared = &self.shared;
        shared
            .peers()
            .iter()
            .map(|(&id, p)| {
                let slot = p.slot();
                let last = p.last_frame_ms.load(Ordering::Relaxed);
                let live = slot
                    .current
                    .as_ref()
                    .filter(|c| c.conn.close_reason().is_none());
                PeerStatus {
                    id,
                    link: p.link,
                    up: live.is_some(),
                    last_frame_ms: (last != NEVER).then_some(last),
                    connections: slot.connections,
                    rtt: live.map(|c| c.conn.rtt()),
                    resets: p.resets.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    pub fn stats(&self) -> LinksStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LinksStats {
            frames_sent: get(&c.frames_sent),
            frames_received: get(&c.frames_received),
            frames_dropped: get(&c.frames_dropped),
            connections: get(&c.connections),
            reconnects: get(&c.reconnects),
            dials_failed: get(&c.dials_failed),
            streams_refused: get(&c.streams_refused),
            resets: get(&c.resets),
        }
    }

    /// Stops every task, closes every connection and the link's endpoint, waits until the
    /// tasks have ended and (at most [`LINKS_SHUTDOWN_DRAIN_MS_MAX`]) the connections have
    /// drained. Frames still queued are dropped.
    pub async fn shutdown(mut self) {
        self.ctx = None;
        self.stop.send_replace(true);
        self.link.close();
        while self.done.recv().await.is_some() {}
        let drain = Duration::from_millis(LINKS_SHUTDOWN_DRAIN_MS_MAX);
        let _ = tokio::time::timeout(drain, self.link.wait_idle()).await;
        tracing::info!(node = self.shared.node, "node links stopped");
    }
}

impl<T> Drop for NodeLinks<T> {
    /// Dropped without [`NodeLinks::shutdown`], the tasks still stop and the link closes.
    fn drop(&mut self) {
        self.stop.send_replace(true);
        self.link.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::link::LinkConfig;
    use crate::cluster::pki::{ClusterCa, NodeIdentity};
    use rustls::pki_types::CertificateDer;
    use serde::Deserialize;
    use std::collections::BTreeSet;

    /// Every wait in these tests ends within this.
    const WAIT: Duration = Duration::from_secs(10);
    const POLL_MS: u64 = 10;
    /// The group of settle's probe frames.
    const PROBE: u32 = 99;
    const PROBE_EVERY_MS: u64 = 50;

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    struct Msg {
        seq: u64,
    }

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn identity(ca: &ClusterCa, id: u64) -> NodeIdentity {
        ca.issue_node(id, &["127.0.0.1".into()], 1)
            .unwrap()
            .identity()
    }

    fn config(members: &[u64]) -> LinkConfig {
        let mut config = LinkConfig::new(members.iter().copied());
        config.handshake_timeout_ms = 1_000;
        config
    }

    fn bind(ca: &CertificateDer<'static>, id: &NodeIdentity, members: &[u64]) -> NodeLink {
        NodeLink::bind(loopback(), id, ca, config(members)).unwrap()
    }

    fn members(links: &[&NodeLink]) -> Vec<Member> {
        links
            .iter()
            .map(|l| Member {
                id: l.node_id(),
                link: l.local_addr().unwrap(),
            })
            .collect()
    }

    fn limits() -> LinksLimits {
        LinksLimits {
            links_dial_backoff_ms_min: 50,
            links_dial_backoff_ms_max: 250,
            ..LinksLimits::default()
        }
    }

    struct Node {
        links: NodeLinks<Msg>,
        rx: mpsc::Receiver<Inbound<Msg>>,
    }

    impl Node {
        fn id(&self) -> u64 {
            self.links.shared.node
        }

        fn peer(&self, id: u64) -> PeerStatus {
            let status = self.links.status();
            status.into_iter().find(|s| s.id == id).unwrap()
        }
    }

    async fn start(link: NodeLink, members: &[Member], limits: LinksLimits) -> Node {
        let (links, rx) = NodeLinks::start(link, members.to_vec(), limits)
            .await
            .unwrap();
        Node { links, rx }
    }

    /// Waits until `cond` holds, polling at most WAIT / POLL_MS times.
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..WAIT.as_millis() as u64 / POLL_MS {
            if cond() {
                return;
            }
            sleep_ms(POLL_MS).await;
        }
        panic!("{what} did not happen within {WAIT:?}");
    }

    /// Waits until every node is connected to every other and a probe frame went from every
    /// node to every other (the connections the pairs keep carry frames).
    async fn settle(nodes: &mut [Node]) {
        let ids: Vec<u64> = nodes.iter().map(Node::id).collect();
        eventually("every node connected to every other", || {
            nodes.iter().all(|n| n.links.status().iter().all(|s| s.up))
        })
        .await;
        let mut seen = vec![BTreeSet::new(); nodes.len()];
        for _ in 0..WAIT.as_millis() as u64 / PROBE_EVERY_MS {
            for n in nodes.iter() {
                for &to in ids.iter().filter(|&&to| to != n.id()) {
                    n.links.send(to, PROBE, Msg { seq: 0 });
                }
            }
            sleep_ms(PROBE_EVERY_MS).await;
            for (n, seen) in nodes.iter_mut().zip(&mut seen) {
                while let Ok(m) = n.rx.try_recv() {
                    assert_eq!(m.group, PROBE, "only probes are sent while settling");
                    seen.insert(m.from);
                }
            }
            if seen.iter().all(|s| s.len() == ids.len() - 1) {
                return;
            }
        }
        panic!("probes did not go between every pair within {WAIT:?}: {seen:?}");
    }

    /// The next `count` frames `n` receives that are not probes, within WAIT; then checks
    /// that no other arrives for a moment.
    async fn receive(n: &mut Node, count: usize) -> Vec<Inbound<Msg>> {
        let mut got = Vec::with_capacity(count);
        let collect = async {
            while got.len() < count {
                match n.rx.recv().await {
                    Some(m) if m.group == PROBE => {}
                    Some(m) => got.push(m),
                    None => panic!("the inbound channel ended"),
                }
            }
        };
        if tokio::time::timeout(WAIT, collect).await.is_err() {
            panic!("node {} got {} of {count} frames", n.id(), got.len());
        }
        let extra = tokio::time::timeout(Duration::from_millis(100), async {
            loop {
                match n.rx.recv().await {
                    Some(m) if m.group == PROBE => {}
                    other => return other,
                }
            }
        });
        assert!(extra.await.is_err(), "a frame arrived beyond the {count}");
        got
    }

    /// Shuts a node down and checks its inbound channel then ends.
    async fn stop(n: Node) {
        let Node { links, mut rx } = n;
        tokio::time::timeout(WAIT, links.shutdown())
            .await
            .expect("shutdown within WAIT");
        for _ in 0..LINKS_INBOUND_FRAMES_MAX_DEFAULT + 1 {
            match tokio::time::timeout(WAIT, rx.recv()).await {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(_) => panic!("the inbound channel did not end after shutdown"),
            }
        }
        panic!("the inbound channel kept yielding after shutdown");
    }

    #[tokio::test]
    async fn three_nodes_exchange_frames_on_two_groups_once_and_in_order() {
        // Proves three nodes deliver every frame, both ways on two groups, once and in order per (peer, group).
        let ca = ClusterCa::generate("test").unwrap();
        let ids = [1u64, 2, 3];
        let links: Vec<NodeLink> = ids
            .iter()
            .map(|&id| bind(ca.cert_der(), &identity(&ca, id), &ids))
            .collect();
        let members = members(&links.iter().collect::<Vec<_>>());
        // A small inbound channel: reading tasks wait on it (backpressure) and lose nothing.
        let limits = LinksLimits {
            links_inbound_frames_max: 8,
            ..limits()
        };
        let mut nodes = Vec::new();
        for link in links {
            nodes.push(start(link, &members, limits.clone()).await);
        }
        settle(&mut nodes).await;
        let dropped: Vec<u64> = nodes
            .iter()
            .map(|n| n.links.stats().frames_dropped)
            .collect();
        const N: u64 = 200;
        for seq in 0..N {
            for n in &nodes {
                for to in ids.into_iter().filter(|&to| to != n.id()) {
                    for group in [0, 1] {
                        assert!(n.links.send(to, group, Msg { seq }));
                    }
                }
            }
        }
        for n in &mut nodes {
            let got = receive(n, 2 * 2 * N as usize).await;
            let mut streams: BTreeMap<(u64, u32), Vec<u64>> = BTreeMap::new();
            for m in got {
                streams
                    .entry((m.from, m.group))
                    .or_default()
                    .push(m.frame.seq);
            }
            let want: Vec<u64> = (0..N).collect();
            assert_eq!(streams.len(), 4, "node {}: {:?}", n.id(), streams.keys());
            for ((from, group), seqs) in &streams {
                assert_ne!(*from, n.id());
                assert!(*group < 2);
                assert_eq!(seqs, &want, "node {} from {from} group {group}", n.id());
            }
        }
        for (n, before) in nodes.iter().zip(dropped) {
            let stats = n.links.stats();
            assert_eq!(stats.frames_dropped, before, "node {}: {stats:?}", n.id());
            assert!(stats.frames_sent >= 4 * N && stats.frames_received >= 4 * N);
            assert!(n.links.status().iter().all(|s| s.last_frame_ms.is_some()));
        }
        for n in nodes {
            stop(n).await;
        }
    }

    #[tokio::test]
    async fn a_member_added_at_run_time_is_dialed_and_one_removed_is_cut_off() {
        // Proves membership changes at run time: two nodes that know only each other link up
        // with a third once each is told it joined (frames flow both ways), and once node 3 is
        // removed from node 1, node 1 drops its connection and its frames for node 3, and node 3
        // learns it was removed (the close code); added again, it links up again.
        let ca = ClusterCa::generate("test").unwrap();
        let links: Vec<NodeLink> = [(1u64, &[1u64, 2][..]), (2, &[1, 2]), (3, &[1, 2, 3])]
            .iter()
            .map(|(id, m)| bind(ca.cert_der(), &identity(&ca, *id), m))
            .collect();
        let all = members(&links.iter().collect::<Vec<_>>());
        let mut nodes = Vec::new();
        for (i, link) in links.into_iter().enumerate() {
            let known = if i < 2 { &all[..2] } else { &all[..] };
            nodes.push(start(link, known, limits()).await);
        }
        for n in &nodes[..2] {
            n.links.add_member(all[2]).unwrap();
            // Adding it again is no change.
            n.links.add_member(all[2]).unwrap();
        }
        settle(&mut nodes).await;
        nodes[0].links.remove_member(3);
        assert!(nodes[0].links.status().iter().all(|s| s.id != 3));
        let dropped = nodes[0].links.stats().frames_dropped;
        assert!(!nodes[0].links.send(3, 1, Msg { seq: 1 }));
        assert_eq!(nodes[0].links.stats().frames_dropped, dropped + 1);
        eventually("node 3 sees its link to node 1 go down", || {
            !nodes[2].peer(1).up
        })
        .await;
        // Node 3 keeps dialing node 1, which refuses it: the link stays down.
        sleep_ms(300).await;
        assert!(!nodes[2].peer(1).up, "a removed member cannot reconnect");
        assert_eq!(nodes[2].links.removed_by(), Some(1), "node 1 told node 3");
        assert_eq!(nodes[1].links.removed_by(), None);
        assert!(nodes[1].peer(3).up, "node 2 still links with node 3");
        // Node 3 joins again: it is dialed and let in anew.
        nodes[0].links.add_member(all[2]).unwrap();
        eventually("node 1 links with node 3 again", || nodes[0].peer(3).up).await;
        eventually("node 3 no longer counts itself removed", || {
            nodes[2].links.removed_by().is_none()
        })
        .await;
    }

    #[tokio::test]
    async fn a_restarted_node_is_redialed_and_frames_for_it_while_down_are_dropped() {
        // Proves a node stopped and started again on its address is redialed and frames flow again; frames for it while down are dropped and counted without blocking.
        let ca = ClusterCa::generate("test").unwrap();
        let ids = [1u64, 2];
        let id2 = identity(&ca, 2);
        let (l1, l2) = (
            bind(ca.cert_der(), &identity(&ca, 1), &ids),
            bind(ca.cert_der(), &id2, &ids),
        );
        let members = members(&[&l1, &l2]);
        let mut nodes = vec![
            start(l1, &members, limits()).await,
            start(l2, &members, limits()).await,
        ];
        settle(&mut nodes).await;

        stop(nodes.pop().unwrap()).await;
        eventually("node 1 sees node 2 down", || !nodes[0].peer(2).up).await;
        let before = nodes[0].links.stats().frames_dropped;
        let t = Instant::now();
        for seq in 0..20 {
            assert!(!nodes[0].links.send(2, 0, Msg { seq }));
        }
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(nodes[0].links.stats().frames_dropped >= before + 20);

        // The address is free again once the old endpoint's driver has let go of it.
        let mut l2 = None;
        for _ in 0..WAIT.as_millis() as u64 / PROBE_EVERY_MS {
            match NodeLink::bind(members[1].link, &id2, ca.cert_der(), config(&ids)) {
                Ok(l) => {
                    l2 = Some(l);
                    break;
                }
                Err(_) => sleep_ms(PROBE_EVERY_MS).await,
            }
        }
        let l2 = l2.expect("node 2's address bound again within WAIT");
        nodes.push(start(l2, &members, limits()).await);
        settle(&mut nodes).await;
        let stats = nodes[0].links.stats();
        assert!(stats.reconnects >= 1, "{stats:?}");
        assert!(nodes[0].peer(2).connections >= 2);
        for n in nodes {
            stop(n).await;
        }
    }

    #[tokio::test]
    async fn a_full_peer_queue_drops_counts_and_starts_the_connection_over() {
        // Proves a frame beyond links_queue_frames_max is dropped at once without blocking, and that the drop ends the connection (a link reset): what was queued on it is dropped too, and later frames arrive on a new connection.
        let (l1, l2, members) = two_links();
        let limits = LinksLimits {
            links_queue_frames_max: 4,
            ..limits()
        };
        let mut nodes = vec![
            start(l1, &members, limits.clone()).await,
            start(l2, &members, limits).await,
        ];
        settle(&mut nodes).await;
        assert!(nodes[0].links.send(2, 3, Msg { seq: 1_000 }));
        let first_conn = receive(&mut nodes[1], 1).await[0].conn;
        let before = nodes[0].links.stats();
        let conns = nodes[0].peer(2).connections;
        // A #[tokio::test] runtime has one thread: the sending task cannot drain the queue
        // during this loop, so the queue fills after 4 frames.
        let t = Instant::now();
        let queued: Vec<bool> = (0..100)
            .map(|seq| nodes[0].links.send(2, 3, Msg { seq }))
            .collect();
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(queued.iter().filter(|&&q| q).count(), 4);
        assert!(queued[..4].iter().all(|&q| q));
        assert_eq!(nodes[0].links.stats().resets, before.resets + 1);
        eventually(
            "the queued frames are dropped with their connection",
            || nodes[0].links.stats().frames_dropped == before.frames_dropped + 100,
        )
        .await;
        eventually("node 1 connects to node 2 again", || {
            nodes[0].peer(2).up && nodes[0].peer(2).connections > conns
        })
        .await;
        let got = loop {
            // The new connection may still be settling (the other end's duplicate dial).
            if nodes[0].links.send(2, 3, Msg { seq: 7 }) {
                break receive(&mut nodes[1], 1).await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!((got[0].from, got[0].group, got[0].frame.seq), (1, 3, 7));
        assert_ne!(
            got[0].conn, first_conn,
            "a frame after a drop rides a new connection"
        );
        for n in nodes {
            stop(n).await;
        }
    }

    /// Links of nodes 1 and 2 of one new cluster CA, and the members they make.
    fn two_links() -> (NodeLink, NodeLink, Vec<Member>) {
        let ca = ClusterCa::generate("test").unwrap();
        let ids = [1u64, 2];
        let (l1, l2) = (
            bind(ca.cert_der(), &identity(&ca, 1), &ids),
            bind(ca.cert_der(), &identity(&ca, 2), &ids),
        );
        let members = members(&[&l1, &l2]);
        (l1, l2, members)
    }

    /// A coalescer for the test: every frame of group 7 in a batch becomes one frame of group
    /// 98 whose seq is their sum.
    fn fold_group_7(batch: &mut Vec<(u32, Msg)>) {
        let sum: u64 = batch.iter().filter(|f| f.0 == 7).map(|f| f.1.seq).sum();
        let had = batch.iter().any(|f| f.0 == 7);
        batch.retain(|f| f.0 != 7);
        if had {
            batch.push((98, Msg { seq: sum }));
        }
    }

    #[tokio::test]
    async fn a_batch_for_a_peer_goes_through_the_coalescer_before_it_is_written() {
        // Proves the frames taken for a peer in one batch pass through the node's coalescer (as
        // the node folds its shards' heartbeats): frames queued together on group 7 arrive as
        // one frame of group 98, the others as they were.
        let (l1, l2, members) = two_links();
        let (links, rx) = NodeLinks::start_coalescing(l1, members.clone(), limits(), fold_group_7)
            .await
            .unwrap();
        let mut nodes = vec![Node { links, rx }, start(l2, &members, limits()).await];
        settle(&mut nodes).await;
        // One thread: nothing is taken from the queue until this loop yields.
        for seq in 1..=5 {
            assert!(nodes[0].links.send(2, 7, Msg { seq }));
        }
        assert!(nodes[0].links.send(2, 3, Msg { seq: 100 }));
        let got = receive(&mut nodes[1], 2).await;
        let mut seen: Vec<(u32, u64)> = got.iter().map(|m| (m.group, m.frame.seq)).collect();
        seen.sort();
        assert_eq!(seen, [(3, 100), (98, 15)]);
        for n in nodes {
            stop(n).await;
        }
    }

    #[tokio::test]
    async fn nodes_of_another_cluster_or_outside_the_members_never_connect() {
        // Proves a node with another cluster's certificate, or not a member, is never connected (status down) while members connect.
        let (ca, other) = (
            ClusterCa::generate("test").unwrap(),
            ClusterCa::generate("other").unwrap(),
        );
        let ids = [1u64, 2, 3];
        let l1 = bind(ca.cert_der(), &identity(&ca, 1), &ids);
        let l2 = bind(ca.cert_der(), &identity(&ca, 2), &ids);
        // Node 3 is a member by id, but its certificate is of another cluster.
        let l3 = bind(other.cert_der(), &identity(&other, 3), &ids);
        // Node 4 has a certificate of this cluster but is no member of nodes 1 and 2.
        let l4 = bind(ca.cert_der(), &identity(&ca, 4), &[1, 2, 4]);
        let members123 = members(&[&l1, &l2, &l3]);
        let members124 = members(&[&l1, &l2, &l4]);
        let n1 = start(l1, &members123, limits()).await;
        let n2 = start(l2, &members123, limits()).await;
        let n3 = start(l3, &members123, limits()).await;
        let n4 = start(l4, &members124, limits()).await;
        eventually("nodes 1 and 2 connected", || n1.peer(2).up && n2.peer(1).up).await;
        // Several dial rounds each way (the backoff is capped at 250 ms).
        eventually("repeated failed dials", || {
            [&n1, &n2, &n3, &n4]
                .iter()
                .all(|n| n.links.stats().dials_failed >= 3)
        })
        .await;
        for (n, member) in [(&n1, 2), (&n2, 1)] {
            let s = n.peer(3);
            assert!(!s.up && s.connections == 0, "{s:?}");
            // Every connection it made was with the other member.
            assert_eq!(n.links.stats().connections, n.peer(member).connections);
        }
        for n in [&n3, &n4] {
            assert!(n.links.status().iter().all(|s| !s.up && s.connections == 0));
            assert_eq!(n.links.stats().connections, 0);
        }
        assert!(!n1.links.send(3, 0, Msg { seq: 0 }));
        assert!(!n4.links.send(1, 0, Msg { seq: 0 }));
        for n in [n1, n2, n3, n4] {
            stop(n).await;
        }
    }

    #[tokio::test]
    async fn a_malformed_or_oversize_frame_closes_only_its_stream() {
        // Proves a frame that does not decode, or is over node_frame_bytes_max, closes only its stream (counted) and later frames still arrive.
        let ca = ClusterCa::generate("test").unwrap();
        let ids = [1u64, 2];
        let mut small = config(&ids);
        small.node_frame_bytes_max = 1024;
        let l1 = NodeLink::bind(loopback(), &identity(&ca, 1), ca.cert_der(), small).unwrap();
        // Node 2 is a bare node link that writes what it likes.
        let raw = bind(ca.cert_der(), &identity(&ca, 2), &ids);
        let members = members(&[&l1, &raw]);
        let mut n1 = start(l1, &members, limits()).await;
        let conn = tokio::time::timeout(WAIT, raw.connect(members[0].link, 1))
            .await
            .unwrap()
            .unwrap();
        eventually("node 1 sees node 2 up", || n1.peer(2).up).await;

        let mut empty = conn.open_group(5).await.unwrap();
        empty.send_frame(&()).await.unwrap();
        let mut big = conn.open_group(6).await.unwrap();
        big.send_frame(&vec![7u8; 2_000]).await.unwrap();
        eventually("both bad streams refused", || {
            n1.links.stats().streams_refused == 2
        })
        .await;
        let mut good = conn.open_group(7).await.unwrap();
        good.send_frame(&Msg { seq: 42 }).await.unwrap();
        let got = receive(&mut n1, 1).await;
        assert_eq!((got[0].from, got[0].group, got[0].frame.seq), (2, 7, 42));
        assert!(n1.peer(2).up);
        assert_eq!(n1.links.stats().frames_received, 1);
        stop(n1).await;
        raw.close();
    }

    #[tokio::test]
    async fn bad_limits_and_a_member_listed_twice_are_refused() {
        // Proves out-of-bounds limits and a duplicate member are refused at start with a Config error.
        let mut bad = LinksLimits::default();
        assert!(bad.validate().is_ok());
        bad.links_queue_frames_max = 0;
        assert!(matches!(bad.validate(), Err(LinkError::Config(_))));
        let bad = LinksLimits {
            links_dial_backoff_ms_min: 10,
            links_dial_backoff_ms_max: 5,
            ..LinksLimits::default()
        };
        assert!(matches!(bad.validate(), Err(LinkError::Config(_))));
        let ca = ClusterCa::generate("test").unwrap();
        let link = bind(ca.cert_der(), &identity(&ca, 1), &[1, 2]);
        let twice = vec![
            Member {
                id: 2,
                link: loopback(),
            };
            2
        ];
        let r = NodeLinks::<Msg>::start(link.clone(), twice, LinksLimits::default()).await;
        assert!(matches!(r, Err(LinkError::Config(_))));
        let few = LinksLimits {
            links_peers_max: 1,
            ..LinksLimits::default()
        };
        let three = (2..5)
            .map(|id| Member {
                id,
                link: loopback(),
            })
            .collect();
        let r = NodeLinks::<Msg>::start(link.clone(), three, few).await;
        assert!(matches!(r, Err(LinkError::Config(_))));
        link.close();
    }
}
