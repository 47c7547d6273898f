//! The session protocol core: one [`Session`] per client connection, whatever the transport
//! (WebSocket now, QUIC next). It turns frames into shard requests and shard replies into
//! frames, and owns the session's rules: hello first, size limits, the in-flight limit, push
//! credit, the hello deadline. It does no I/O, reads no clock and draws no random numbers
//! (quinn-proto's `Connection` style): time comes in as `now` (unix ms), work goes out through
//! `poll_*`, so the simulator can drive it exactly as the node does.
//!
//! ```text
//! glue                                    Session
//! handle_frame(now, frame)          ->    decode, check, queue requests or error frames
//! poll_request()                    <-    (route, request) for the router
//! handle_reply(now, shard, reply)   ->    encode frames, count acks and pushes
//! poll_transmit()                   <-    frames for the socket
//! handle_writing(now, stream)       ->    a write started or progressed: it has write_timeout_ms
//! handle_flushed(now)               ->    every polled frame is written: return push credit
//! poll_ping(now) / handle_pong(now) <->   liveness: a transport ping is due / its pong came
//! poll_timeout() / handle_timeout() <->   hello, write, ping and pong deadlines
//! wants_read()                      <-    false = stop reading the socket (backpressure)
//! is_closed()                       <-    send what is left to transmit, then close
//! is_write_abandoned()              <-    a write timed out: drop the transport, write nothing
//! ```
//!
//! Lifecycle: `AwaitingHello` -> (hello forwarded) `Authenticating` -> (welcome) `Open`, and
//! from anywhere -> `Closed`. Bad client input never panics and never silently vanishes: it
//! becomes an `error` frame with a stable [`ErrorCode`].
//!
//! Queues and their limits (every one is bounded):
//! - ops held between hello and welcome, plus requests awaiting their answer:
//!   `inflight_requests_max` (soft: `wants_read` turns false), and that plus
//!   [`BATCH_OPS_MAX`] (hard: further ops are refused with `overloaded`). The soft limit is
//!   checked between frames, and one frame may carry a whole batch, hence the slack.
//! - frames for the socket: `pending_transmit_frames_max` (soft for answers the session makes
//!   itself, which `wants_read` stops; past it a shard's frame closes the session as
//!   `overloaded`, since shard frames cannot be refused).
//! - requests for the router: counted ops are bounded as above; consecutive acks coalesce into
//!   one (acks are cumulative), so an ack flood cannot grow the queue; `Flushed` adds at most
//!   one per shard per flush and `Hello`/`Closed` one each per session.

use fabric_proto::codec;
use fabric_proto::internal::{HelloProof, Reply, Request, Route, SessionId, ShardIdx, ShardOp};
use fabric_proto::{
    ClientOp, ConvId, ErrorCode, MeshId, PeerId, ProtoError, ServerOp, BATCH_OPS_MAX,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

mod deadlines;
mod liveness;
mod reattach;
pub mod rest;

pub use reattach::REATTACH_RETRY_MS;

/// Bytes a batch frame adds around its parts (brackets, or a variant index and a length).
const BATCH_FRAMING_BYTES: usize = 16;

/// Limits of one session. Units are last in every name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Largest frame accepted; a larger one gets `too_large` and is dropped.
    pub frame_bytes_max: usize,
    /// Requests awaiting their answer (plus ops held before welcome) before `wants_read` turns
    /// false.
    pub inflight_requests_max: u32,
    /// Time from the session's start to `welcome`.
    pub hello_timeout_ms: u64,
    /// Frames queued for the socket (not yet polled) past which a shard's frame closes the
    /// session as `overloaded`. It must exceed what the glue can legitimately take in before
    /// it next drains: every in-flight answer plus every shard's push credit. The default,
    /// 65 536, covers the node defaults (1024 in flight + 1024 credit x up to 63 shards); a
    /// smaller value such as 4096 would close healthy sessions on nodes with 4+ shards when
    /// every shard spends its credit at once.
    pub pending_transmit_frames_max: usize,
    /// Most server ops joined into one frame for a client that asked for batches (`options`
    /// with `batch`); the client's own number is used when smaller. At most `BATCH_OPS_MAX`.
    pub out_batch_ops_max: u32,
    /// Largest `send` or `append` body; a larger one gets `too_large` (with the request's
    /// ref). Keep it below `frame_bytes_max` by the most a `deliver` or `event` frame adds
    /// around a body (ids of 128 bytes, numbers, field names: well under 1 KiB), so that no
    /// frame carrying an accepted body is over `frame_bytes_max`.
    pub body_bytes_max: usize,
    /// Distinct conversations the session may be subscribed to at once; a `subscribe` to one
    /// more gets `too_large` (unsubscribing frees a place).
    pub subscriptions_max: usize,
    /// A transport ping is due this long after the session started or the last ping was
    /// sent; 0: never (a transport with its own keepalives, QUIC).
    pub ping_interval_ms: u64,
    /// The session closes as `overloaded` when a ping's pong is this late (unless the node
    /// itself was not reading: then it waits another period).
    pub pong_timeout_ms: u64,
    /// A write to the transport (one stream's) that makes no progress for this long ends the
    /// session: the client stopped reading. 0: no deadline.
    pub write_timeout_ms: u64,
    /// Frames a session may send before its hello; one more closes it as `unauthorized`.
    pub prehello_frames_max: u32,
    /// Frames the session answers before it is welcomed (errors, `challenge`, `ok` to
    /// `options`); past it the session closes as `unauthorized`.
    pub prehello_answers_max: u32,
    /// A request (send, append, subscribe, unsubscribe) its shard has not answered within
    /// this time is answered `unavailable` by the session; the shard's later answer is
    /// dropped.
    pub request_timeout_ms: u64,
    /// The cluster's client base URLs, named in every `welcome` (`nodes`) so a client learns
    /// where else it can reconnect; empty on a single node (then `welcome` has no `nodes`).
    pub nodes: Arc<[Arc<str>]>,
}

impl Default for SessionConfig {
    fn default() -> SessionConfig {
        SessionConfig {
            frame_bytes_max: fabric_proto::FRAME_BYTES_MAX_DEFAULT,
            inflight_requests_max: 1024,
            hello_timeout_ms: 10_000,
            pending_transmit_frames_max: 65_536,
            out_batch_ops_max: 256,
            body_bytes_max: fabric_proto::FRAME_BYTES_MAX_DEFAULT - BODY_FRAMING_BYTES,
            subscriptions_max: 1024,
            ping_interval_ms: 30_000,
            pong_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            prehello_frames_max: 16,
            request_timeout_ms: 5_000,
            prehello_answers_max: 64,
            nodes: Arc::from(Vec::new()),
        }
    }
}

/// The refusal of a body over `body_bytes_max`, whichever transport carried it.
pub(crate) fn body_too_large(len: usize, max: usize) -> ProtoError {
    ProtoError::new(
        ErrorCode::TooLarge,
        format!(
            "body is {len} bytes; the limit is {max} (body_bytes_max: frame_bytes_max less room \
             for the frame that delivers it)"
        ),
    )
}

/// What `body_bytes_max` leaves below `frame_bytes_max` by default: room for everything a
/// `deliver` or `event` frame puts around its body (at most about 400 bytes of JSON).
pub const BODY_FRAMING_BYTES: usize = 1024;

/// How a session's frames are encoded: fixed by its first frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Text frames, JSON (`codec::encode_server_json`).
    Json,
    /// Binary frames, postcard (`codec::encode_server_binary`).
    Binary,
}

/// A frame from the transport.
#[derive(Debug, Clone, Copy)]
pub struct InFrame<'a> {
    pub binary: bool,
    pub bytes: &'a [u8],
}

/// A frame for the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutFrame {
    pub binary: bool,
    pub bytes: Vec<u8>,
    /// For a conversation event, its conversation: a transport with streams (QUIC) gives each
    /// subscription a stream of its own, so one slow tail never blocks inbox delivery. Every
    /// other frame (answers, deliveries, errors) is `None` and goes on the control stream.
    pub conv: Option<Arc<str>>,
    /// For a conversation's frame: the shard whose push credit its events spent, and how many
    /// (one conversation lives on one shard). A stream transport that cannot write it yet
    /// keeps that credit back (`handle_flushed_holding`) until it can.
    pub credit: Option<(ShardIdx, u32)>,
}

/// Plain counters for metrics. Frames and bytes out count when polled (handed to the glue).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub frames_in: u64,
    pub bytes_in: u64,
    pub frames_out: u64,
    /// Server ops handed out, counting each op of a batch frame.
    pub ops_out: u64,
    pub bytes_out: u64,
    /// Error frames queued for the client, its own or a shard's.
    pub errors_sent: u64,
    /// Requests queued for the router (coalesced acks count once).
    pub requests_forwarded: u64,
    /// Replies that make no sense for a session (HTTP-only replies, a welcome when not
    /// authenticating, nested batches): bugs elsewhere, counted and dropped, never fatal.
    pub internal_errors: u64,
    /// `errors_sent` by code, indexed by [`error_code_index`] (the order of `ErrorCode::ALL`).
    pub errors_by_code: [u64; ErrorCode::ALL.len()],
    /// Requests that took an in-flight slot (send, append, subscribe, unsubscribe) ...
    pub requests_counted: u64,
    /// ... and the answers (`ok` or `error` with a ref) that released one. The glue pairs them
    /// in order to time answers without per-request bookkeeping in the core.
    pub requests_answered: u64,
    /// Requests the session answered `unavailable` at `request_timeout_ms` (each also counts
    /// in `requests_answered`: the client got its answer) ...
    pub requests_timed_out: u64,
    /// ... and their shards' answers that came later and were dropped.
    pub requests_answered_late: u64,
    /// Ops refused with `overloaded` because the session was past its hard in-flight limit.
    pub refused_overloaded: u64,
    /// Hellos the shard refused as `unauthorized` (unknown mesh or peer, wrong token).
    pub hellos_refused: u64,
    /// Hellos answered with any other error (the shard unavailable or restarting).
    pub hellos_failed: u64,
    /// Sessions that did not say hello in time.
    pub hellos_timed_out: u64,
    /// Sessions whose first op was not a hello.
    pub ops_before_hello: u64,
    /// Sessions closed for sending or being answered too much before hello.
    pub prehello_limited: u64,
    /// Transport pings handed to the glue.
    pub pings_sent: u64,
    /// Sessions closed because a pong was too late (a dead or stuck peer).
    pub pongs_late: u64,
    /// Sessions closed because a write (one stream's) made no progress in time.
    pub writes_timed_out: u64,
    /// `subscribe`s refused at `subscriptions_max`.
    pub subscriptions_refused: u64,
    /// Deliveries and events that could not be encoded for this session (a stored body that
    /// is not UTF-8, for JSON; a frame over `frame_bytes_max`): each became an error frame.
    pub unencodable_pushes: u64,
    /// Leader changes of a shard this session used (its state there had to be attached
    /// again) ...
    pub leader_changes: u64,
    /// ... attaches the new leader confirmed ...
    pub reattached: u64,
    /// ... and sessions closed because none was confirmed within `request_timeout_ms`.
    pub reattach_failed: u64,
    /// Deliveries and events dropped because the client already had them in this session (a
    /// deposed leader's late frames, or an attach's overlap).
    pub pushes_duplicate: u64,
}

/// The index of `code` in `SessionStats::errors_by_code` (and in `ErrorCode::ALL`).
pub fn error_code_index(code: ErrorCode) -> usize {
    ErrorCode::ALL.iter().position(|c| *c == code).unwrap_or(0)
}

#[derive(Debug)]
enum State {
    AwaitingHello,
    /// Hello forwarded; holds the mesh and peer it named until the shard confirms them.
    Authenticating {
        mesh: MeshId,
        peer: PeerId,
    },
    Open {
        mesh: MeshId,
        peer: PeerId,
    },
    Closed,
}

/// Where a session's hello nonce is.
#[derive(Debug, Clone, Copy)]
enum Challenge {
    /// The glue gave none: key hellos are refused.
    None,
    /// Set by the glue, not yet sent to the client.
    Ready([u8; 32]),
    /// Sent in a `challenge` frame: a key hello may now sign it.
    Issued([u8; 32]),
    /// A key hello used it.
    Used,
}

/// A queued frame, and the shard whose push credit it spent (for deliveries and events).
#[derive(Debug)]
struct Queued {
    frame: OutFrame,
    pushed_by: Option<ShardIdx>,
}

#[derive(Debug)]
pub struct Session {
    id: SessionId,
    config: SessionConfig,
    state: State,
    /// `None` until the first frame picks it.
    encoding: Option<Encoding>,
    hello_deadline: u64,
    /// Requests forwarded and not yet answered by their shard (send, append, subscribe,
    /// unsubscribe), including ones the session answered at their deadline.
    inflight: u32,
    deadlines: deadlines::Deadlines,
    /// Ops that arrived after hello but before welcome, handled in order once welcomed.
    early: VecDeque<ClientOp>,
    requests: VecDeque<(Route, Request)>,
    transmit: VecDeque<Queued>,
    /// Pushed frames per shard handed to the glue since the last `handle_flushed`: the credit
    /// that flush returns. Counted at poll time, not queue time, because only polled frames
    /// can have been written. A BTreeMap keeps the `Flushed` requests in shard order.
    pushed_polled: BTreeMap<ShardIdx, u32>,
    /// Whether the shards may know this session (a hello went out): it must then tell them
    /// `Closed` when it ends.
    attached: bool,
    closed_sent: bool,
    /// The nonce a key hello on this session must sign, set by the glue from its OS RNG.
    challenge: Challenge,
    /// Most ops `poll_transmit` joins into one frame: 1 until the client asks for batches.
    out_batch_ops: usize,
    /// Conversations subscribed to (by request; `unsubscribe` removes), each with the next
    /// seq it has not handed to the client: where a new leader takes the subscription up.
    subscriptions: HashMap<ConvId, reattach::SubMark>,
    /// The conversation of each `subscribe` waiting for its answer, by ref: a shard being
    /// attached again that takes one must be named in the attach (`reattach.rs`). Bounded by
    /// the in-flight cap: each leaves at its answer or its deadline.
    subscribing: HashMap<u64, ConvId>,
    /// The highest inbox `pos` handed to the client (0: none): where a new leader takes the
    /// inbox up.
    delivered_pos: u64,
    /// Shards whose leader changed, being attached again, and the attaches sent so far.
    reattach: reattach::Reattaching,
    attach_attempts: u64,
    /// Frames received and frames answered before the session was welcomed.
    prehello_frames: u32,
    prehello_answers: u32,
    liveness: liveness::Liveness,
    stats: SessionStats,
}

impl Session {
    pub fn new(id: SessionId, now: u64, config: SessionConfig) -> Session {
        Session {
            id,
            hello_deadline: now.saturating_add(config.hello_timeout_ms),
            state: State::AwaitingHello,
            encoding: None,
            inflight: 0,
            deadlines: deadlines::Deadlines::new(config.request_timeout_ms),
            early: VecDeque::new(),
            requests: VecDeque::new(),
            transmit: VecDeque::new(),
            pushed_polled: BTreeMap::new(),
            attached: false,
            challenge: Challenge::None,
            closed_sent: false,
            out_batch_ops: 1,
            subscriptions: HashMap::new(),
            subscribing: HashMap::new(),
            delivered_pos: 0,
            reattach: reattach::Reattaching::default(),
            attach_attempts: 0,
            prehello_frames: 0,
            prehello_answers: 0,
            liveness: liveness::Liveness::new(now, &config),
            config,
            stats: SessionStats::default(),
        }
    }

    /// Gives the session the nonce a key hello must sign (32 bytes from the glue's OS RNG;
    /// the core has no RNG). Without one, `challenge` is answered with an error and key hellos
    /// are refused; token hellos work either way. A nonce is set once: later calls are ignored,
    /// so a nonce the client has seen can never be swapped.
    pub fn set_challenge_nonce(&mut self, _now: u64, nonce: [u8; 32]) {
        if matches!(self.challenge, Challenge::None) {
            self.challenge = Challenge::Ready(nonce);
        }
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// The session's encoding, once its first frame arrived.
    pub fn encoding(&self) -> Option<Encoding> {
        self.encoding
    }

    /// Requests forwarded and not yet answered (the glue waits for 0 when draining on shutdown).
    pub fn inflight(&self) -> u32 {
        self.inflight
    }

    /// `(mesh, peer)` once welcomed.
    pub fn identity(&self) -> Option<(&MeshId, &PeerId)> {
        match &self.state {
            State::Open { mesh, peer } => Some((mesh, peer)),
            _ => None,
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// False while the glue must not read more from the socket: at the in-flight limit
    /// (counting ops held before welcome), with the transmit queue full, or closed.
    pub fn wants_read(&self) -> bool {
        !self.is_closed()
            && self.pending_ops() < self.config.inflight_requests_max
            && self.transmit.len() < self.config.pending_transmit_frames_max
    }

    /// The next deadline in unix ms: the hello deadline until welcomed, write deadlines while
    /// a write is under way (also after close: the last frames' write is bounded too), and the
    /// ping and pong deadlines.
    pub fn poll_timeout(&self) -> Option<u64> {
        let hello = match self.state {
            State::AwaitingHello | State::Authenticating { .. } => Some(self.hello_deadline),
            State::Open { .. } | State::Closed => None,
        };
        let liveness = self.liveness.poll_timeout(self.is_closed());
        let (request, reattach) = match self.state {
            State::Open { .. } => (self.deadlines.poll_timeout(), self.reattach.poll_timeout()),
            _ => (None, None),
        };
        [hello, liveness, request, reattach]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next request for the router, in the order the session made them.
    pub fn poll_request(&mut self) -> Option<(Route, Request)> {
        self.requests.pop_front()
    }

    /// The next frame for the socket.
    ///
    /// For a client that asked for batches, consecutive queued frames bound for the same
    /// stream (the control stream, or one conversation's) are joined into one batch frame of
    /// at most `out_batch_ops` ops and `frame_bytes_max` bytes; each op still counts against
    /// the push credit of the shard that sent it.
    pub fn poll_transmit(&mut self) -> Option<OutFrame> {
        let first = self.transmit.pop_front()?;
        self.count_polled(&first);
        let (conv, binary) = (first.frame.conv.clone(), first.frame.binary);
        let frame_bytes_max = self.config.frame_bytes_max;
        // `bytes` counts each part plus a separator, and room for the batch's own framing.
        let joins = |q: &Queued, bytes: usize| {
            q.frame.conv == conv
                && q.frame.binary == binary
                && bytes + q.frame.bytes.len() < frame_bytes_max
        };
        let framing = BATCH_FRAMING_BYTES + first.frame.bytes.len();
        let frame = match self.transmit.front() {
            Some(next) if self.out_batch_ops > 1 && joins(next, framing) => {
                let mut bytes = framing;
                let mut parts = vec![first.frame.bytes];
                while parts.len() < self.out_batch_ops {
                    match self.transmit.front() {
                        Some(q) if joins(q, bytes) => {}
                        _ => break,
                    }
                    let q = self.transmit.pop_front().expect("front exists");
                    self.count_polled(&q);
                    bytes += q.frame.bytes.len() + 1;
                    parts.push(q.frame.bytes);
                }
                let credit = first
                    .frame
                    .credit
                    .map(|(shard, _)| (shard, parts.len() as u32));
                OutFrame {
                    binary: first.frame.binary,
                    bytes: codec::batch_server_frames(&parts, first.frame.binary),
                    conv: first.frame.conv,
                    credit,
                }
            }
            _ => first.frame,
        };
        self.stats.frames_out += 1;
        self.stats.bytes_out += frame.bytes.len() as u64;
        Some(frame)
    }

    /// A queued op is handed to the glue: a pushed one spends its shard's credit.
    fn count_polled(&mut self, q: &Queued) {
        self.stats.ops_out += 1;
        if let Some(shard) = q.pushed_by {
            let n = self.pushed_polled.entry(shard).or_insert(0);
            *n = n.saturating_add(1);
        }
    }

    /// A frame the transport would not read into memory because its length prefix alone is
    /// over `frame_bytes_max` (stream transports skip its bytes): `too_large`, as for a whole
    /// frame over the limit, and the session goes on.
    pub fn handle_oversize_frame(&mut self, now: u64, len: u64) {
        if self.is_closed() {
            return;
        }
        self.stats.frames_in += 1;
        self.stats.bytes_in += len;
        if self.prehello_frame_refused(now) {
            return;
        }
        self.error(
            None,
            ProtoError::new(
                ErrorCode::TooLarge,
                format!(
                    "frame is {len} bytes; the limit is {} (frame_bytes_max); it was dropped",
                    self.config.frame_bytes_max
                ),
            ),
        );
        self.prehello_answers_refused(now);
    }

    /// One frame read from the transport. A frame may carry several ops (a batch); each is
    /// handled in order, as if it had come alone.
    pub fn handle_frame(&mut self, now: u64, frame: InFrame<'_>) {
        if self.is_closed() {
            return;
        }
        self.stats.frames_in += 1;
        self.stats.bytes_in += frame.bytes.len() as u64;
        if self.encoding.is_none() {
            self.encoding = Some(if frame.binary {
                Encoding::Binary
            } else {
                Encoding::Json
            });
        }
        if self.prehello_frame_refused(now) {
            return;
        }
        if frame.bytes.len() > self.config.frame_bytes_max {
            self.error(
                None,
                ProtoError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "frame is {} bytes; the limit is {} (frame_bytes_max); it was dropped",
                        frame.bytes.len(),
                        self.config.frame_bytes_max
                    ),
                ),
            );
            self.prehello_answers_refused(now);
            return;
        }
        // Each frame decodes by its own kind; answers use the session's encoding.
        let decoded = if frame.binary {
            codec::decode_client_binary(frame.bytes)
        } else {
            codec::decode_client_json(frame.bytes)
        };
        match decoded {
            Ok(ops) => {
                for op in ops {
                    self.handle_op(now, op);
                    if self.is_closed() || self.prehello_answers_refused(now) {
                        return;
                    }
                }
            }
            Err(e) => {
                self.error(None, e);
                self.prehello_answers_refused(now);
            }
        }
    }

    /// Counts a frame that arrived before hello; past `prehello_frames_max` the session closes
    /// (a client that never says hello cannot keep the node busy answering it). True if so.
    fn prehello_frame_refused(&mut self, now: u64) -> bool {
        if !matches!(self.state, State::AwaitingHello) {
            return false;
        }
        self.prehello_frames = self.prehello_frames.saturating_add(1);
        if self.prehello_frames <= self.config.prehello_frames_max {
            return false;
        }
        self.refuse_prehello(
            now,
            format!(
                "more than {} frames before hello (prehello_frames_max); say hello first",
                self.config.prehello_frames_max
            ),
        );
        true
    }

    /// Past `prehello_answers_max` frames answered before welcome, the session closes (one
    /// batch frame of 1024 `options` or `challenge` ops would otherwise get 1024 answers,
    /// each frame of them). True if so.
    fn prehello_answers_refused(&mut self, now: u64) -> bool {
        if self.is_closed() || self.prehello_answers <= self.config.prehello_answers_max {
            return false;
        }
        self.refuse_prehello(
            now,
            format!(
                "more than {} frames answered before welcome (prehello_answers_max)",
                self.config.prehello_answers_max
            ),
        );
        true
    }

    fn refuse_prehello(&mut self, now: u64, message: String) {
        self.stats.prehello_limited += 1;
        self.error(None, ProtoError::new(ErrorCode::Unauthorized, message));
        self.close(now);
    }

    // Over 70 lines: one arm per op (an exhaustive dispatch; each arm calls its handler).
    fn handle_op(&mut self, now: u64, op: ClientOp) {
        if let ClientOp::Options { r, batch } = op {
            // Session-local, and valid in every state (a client may send it with its hello).
            if !self.is_closed() {
                self.set_options(r, batch);
            }
            return;
        }
        match &self.state {
            State::Closed => {}
            State::AwaitingHello => match op {
                ClientOp::Challenge => self.answer_challenge(),
                ClientOp::HelloSigned {
                    mesh,
                    peer,
                    sig,
                    ts,
                } => {
                    let Challenge::Issued(nonce) = self.challenge else {
                        self.error(
                            None,
                            ProtoError::new(
                                ErrorCode::Unauthorized,
                                "no challenge was issued on this session: send \
                                 {\"op\":\"challenge\"} first and sign its nonce",
                            ),
                        );
                        return self.close(now);
                    };
                    // Single-use: whatever the shard says, this nonce never proves another hello.
                    self.challenge = Challenge::Used;
                    self.state = State::Authenticating {
                        mesh: mesh.clone(),
                        peer: peer.clone(),
                    };
                    self.attached = true;
                    let proof = Some(HelloProof { sig, ts, nonce });
                    self.forward(
                        Route::ByKey,
                        ShardOp::Hello {
                            mesh,
                            peer,
                            token: String::new(),
                            proof,
                        },
                    );
                }
                ClientOp::Hello { mesh, peer, token } => {
                    // A nonce serves the session's one hello, whichever kind it is.
                    self.challenge = Challenge::Used;
                    self.state = State::Authenticating {
                        mesh: mesh.clone(),
                        peer: peer.clone(),
                    };
                    // From here the hello's shard may attach the session: it must hear Closed.
                    self.attached = true;
                    self.forward(
                        Route::ByKey,
                        ShardOp::Hello {
                            mesh,
                            peer,
                            token,
                            proof: None,
                        },
                    );
                }
                op => {
                    self.stats.ops_before_hello += 1;
                    self.error(
                        op.reference(),
                        ProtoError::new(
                            ErrorCode::Unauthorized,
                            format!("send hello first (got {})", op.name()),
                        ),
                    );
                    self.close(now);
                }
            },
            State::Authenticating { .. } => match op {
                ClientOp::HelloSigned { .. } => self.nonce_reused(),
                ClientOp::Challenge => self.answer_challenge(),
                ClientOp::Hello { .. } => self.second_hello(),
                // Held and handled after welcome, in order; counted against the in-flight
                // limit meanwhile so that a client cannot park unbounded work here.
                op if self.pending_ops() < self.inflight_hard_max() => self.early.push_back(op),
                op => self.refuse_overloaded(op.reference()),
            },
            State::Open { mesh, peer } => {
                let (mesh, peer) = (mesh.clone(), peer.clone());
                self.handle_open_op(now, op, mesh, peer);
            }
        }
    }

    /// `options`: the client's batch size, capped by the node's; answered at once.
    fn set_options(&mut self, r: u64, batch: u32) {
        let cap = self.config.out_batch_ops_max.min(BATCH_OPS_MAX as u32);
        self.out_batch_ops = batch.clamp(1, cap.max(1)) as usize;
        self.push_frame(
            &ServerOp::Ok {
                r,
                pos: None,
                seq: None,
            },
            None,
        );
    }

    fn handle_open_op(&mut self, now: u64, op: ClientOp, mesh: MeshId, peer: PeerId) {
        // Ops that wait for an answer pass the hard in-flight cap first (a glue that honours
        // `wants_read` never reaches it).
        if let Some(r) = counted_ref(&op) {
            if self.pending_ops() >= self.inflight_hard_max() {
                self.refuse_overloaded(Some(r));
                return;
            }
        }
        if let Some(e) = self.refusal(&op) {
            return self.error(op.reference(), e);
        }
        let shard_op = match op {
            ClientOp::HelloSigned { .. } => return self.nonce_reused(),
            ClientOp::Challenge => return self.answer_challenge(),
            ClientOp::Hello { .. } => return self.second_hello(),
            ClientOp::Send { r, to, body, key } => ShardOp::Send {
                r,
                mesh,
                from: peer,
                to,
                body,
                key,
            },
            ClientOp::Append { r, conv, body, key } => ShardOp::Append {
                r,
                mesh,
                conv,
                from: peer,
                body,
                key,
            },
            ClientOp::Subscribe { r, conv, from } => {
                // The shard starts at `from`, or 1 (see `subscribe`).
                let mark = reattach::SubMark {
                    next: from.max(1),
                    attached: false,
                    floor: from.max(1),
                    latest_ref: r,
                };
                self.subscriptions.insert(conv.clone(), mark);
                self.subscribing.insert(r, conv.clone());
                ShardOp::Subscribe {
                    r,
                    mesh,
                    conv,
                    from,
                }
            }
            ClientOp::Unsubscribe { r, conv } => {
                self.subscriptions.remove(&conv);
                ShardOp::Unsubscribe { r, mesh, conv }
            }
            ClientOp::Ack { upto } => return self.forward_ack(mesh, peer, upto),
            ClientOp::Ping { r } => return self.push_frame(&ServerOp::Pong { r }, None),
            // Handled in `handle_op` before any state.
            ClientOp::Options { r, batch } => return self.set_options(r, batch),
            // The codec flattens batches and refuses nested ones; this is only a safety net.
            ClientOp::Batch(_) => {
                return self.error(None, ProtoError::bad_request("batches may not nest"))
            }
        };
        self.inflight = self.inflight.saturating_add(1);
        self.stats.requests_counted += 1;
        if let Some(r) = shard_op.reference() {
            self.deadlines.started(now, r);
        }
        self.forward(Route::ByKey, shard_op);
    }

    /// Why an open op is refused before it goes anywhere: a body over `body_bytes_max`, or a
    /// subscription past `subscriptions_max`. Both answer the op's own ref.
    fn refusal(&mut self, op: &ClientOp) -> Option<ProtoError> {
        match op {
            ClientOp::Send { body, .. } | ClientOp::Append { body, .. }
                if body.len() > self.config.body_bytes_max =>
            {
                Some(body_too_large(body.len(), self.config.body_bytes_max))
            }
            ClientOp::Subscribe { conv, .. }
                if self.subscriptions.len() >= self.config.subscriptions_max
                    && !self.subscriptions.contains_key(conv) =>
            {
                self.stats.subscriptions_refused += 1;
                Some(ProtoError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "this session is subscribed to {} conversations, the limit \
                         (session_subscriptions_max); unsubscribe from one first",
                        self.subscriptions.len()
                    ),
                ))
            }
            _ => None,
        }
    }

    /// Acks are cumulative and the shard keeps the highest, so an ack right behind another
    /// unpolled one merges into it: same effect, one request.
    fn forward_ack(&mut self, mesh: MeshId, peer: PeerId, upto: u64) {
        if let Some((
            Route::ByKey,
            Request {
                op: ShardOp::Ack { upto: queued, .. },
                ..
            },
        )) = self.requests.back_mut()
        {
            *queued = (*queued).max(upto);
            return;
        }
        self.forward(Route::ByKey, ShardOp::Ack { mesh, peer, upto });
    }

    fn forward(&mut self, route: Route, op: ShardOp) {
        self.stats.requests_forwarded += 1;
        self.requests.push_back((
            route,
            Request {
                session: self.id,
                op,
            },
        ));
    }

    /// A reply from shard `shard` for this session.
    pub fn handle_reply(&mut self, now: u64, shard: ShardIdx, reply: Reply) {
        if self.is_closed() {
            return;
        }
        match reply {
            Reply::Frame(ServerOp::Batch(ops)) => {
                // Shards send frames one by one; should one batch them, each still counts.
                for op in ops {
                    if matches!(op, ServerOp::Batch(_)) {
                        self.stats.internal_errors += 1;
                        continue;
                    }
                    self.handle_server_op(now, shard, op);
                    if self.is_closed() {
                        return;
                    }
                }
            }
            Reply::Frame(op) => self.handle_server_op(now, shard, op),
            Reply::Attached { attempt, refused } => {
                self.handle_attached(now, shard, attempt, refused)
            }
            // HTTP-only replies: a session never asks for them.
            Reply::Authed { .. } | Reply::Messages { .. } => {
                self.stats.internal_errors += 1;
                return;
            }
        }
        if !self.is_closed() && self.transmit.len() > self.config.pending_transmit_frames_max {
            // The glue is not draining: the client is not reading. Drop what it will never read
            // and say why, first in line.
            self.transmit.clear();
            self.error(
                None,
                ProtoError::new(
                    ErrorCode::Overloaded,
                    format!(
                        "more than {} frames are waiting for the client to read them; \
                         closing the session",
                        self.config.pending_transmit_frames_max
                    ),
                ),
            );
            self.close(now);
        }
    }

    /// The shard's `welcome` with this node's view of the cluster added: the shard knows the
    /// peer's cursor, the edge knows the nodes.
    fn push_welcome(&mut self, mut op: ServerOp) {
        if let ServerOp::Welcome { nodes, .. } = &mut op {
            if nodes.is_empty() {
                nodes.extend(self.config.nodes.iter().cloned());
            }
        }
        self.push_frame(&op, None);
    }

    fn handle_server_op(&mut self, now: u64, shard: ShardIdx, op: ServerOp) {
        match &op {
            ServerOp::Welcome { .. } => {
                let State::Authenticating { mesh, peer } = &self.state else {
                    self.stats.internal_errors += 1;
                    return;
                };
                // The shard verified the mesh and peer this session's hello named.
                self.state = State::Open {
                    mesh: mesh.clone(),
                    peer: peer.clone(),
                };
                self.push_welcome(op);
                while let Some(early) = self.early.pop_front() {
                    self.handle_op(now, early);
                }
            }
            ServerOp::Error { r: None, code, .. }
                if matches!(self.state, State::Authenticating { .. }) =>
            {
                // Hello refused: tell the client why, then end the session.
                if *code == ErrorCode::Unauthorized {
                    self.stats.hellos_refused += 1;
                } else {
                    self.stats.hellos_failed += 1;
                }
                self.count_error(*code);
                self.push_frame(&op, None);
                self.close(now);
            }
            ServerOp::Ok { r, .. } | ServerOp::Error { r: Some(r), .. } => {
                self.inflight = self.inflight.saturating_sub(1);
                let late = self.deadlines.answered(*r) == deadlines::Answer::Late;
                if let Some(conv) = self.subscribing.remove(r) {
                    if matches!(op, ServerOp::Ok { .. }) {
                        self.subscribe_ok(shard, *r, conv, late);
                    }
                }
                if late {
                    // The session answered it `unavailable` at its deadline.
                    self.stats.requests_answered_late += 1;
                    return;
                }
                if let ServerOp::Error { code, .. } = &op {
                    self.count_error(*code);
                }
                self.stats.requests_answered += 1;
                self.push_frame(&op, None);
            }
            ServerOp::Error { r: None, code, .. } => {
                self.count_error(*code);
                self.push_frame(&op, None);
            }
            ServerOp::Deliver { .. } | ServerOp::Event(_) => self.handle_push(now, shard, op),
            ServerOp::Pong { .. } => self.push_frame(&op, None),
            // Only the session itself answers `challenge`.
            ServerOp::Challenge { .. } => self.stats.internal_errors += 1,
            // Flattened by `handle_reply`.
            ServerOp::Batch(_) => self.stats.internal_errors += 1,
        }
    }

    /// The glue wrote every frame polled so far: each shard gets back the credit its polled
    /// pushes used, as one `Flushed` per shard, in shard order.
    pub fn handle_flushed(&mut self, now: u64) {
        self.handle_flushed_holding(now, &[]);
    }

    /// As [`Session::handle_flushed`], for a stream transport that wrote everything polled
    /// except some conversation frames whose streams were not writable yet: `held` lists, per
    /// shard, the pushes in them (their `OutFrame::credit`). Their credit comes back with
    /// [`Session::handle_credit_released`] once they are written, so a stream the client does
    /// not read is paced by its shard's push credit instead of buffering without bound.
    pub fn handle_flushed_holding(&mut self, now: u64, held: &[(ShardIdx, u32)]) {
        self.liveness.written(None);
        if self.is_closed() {
            // The shards were told `Closed` and forgot the session; credit means nothing now.
            self.pushed_polled.clear();
            return;
        }
        for &(shard, frames) in held {
            if let Some(n) = self.pushed_polled.get_mut(&shard) {
                *n = n.saturating_sub(frames);
            }
        }
        for (shard, frames) in std::mem::take(&mut self.pushed_polled) {
            self.handle_credit_released(now, shard, frames);
        }
    }

    /// Pushes of `shard` that a stream transport held back are written now: their credit
    /// returns to the shard. Credit adds up, so it joins a `Flushed` for the same shard still
    /// queued last, as acks do: returning credit one frame at a time cannot grow the queue.
    pub fn handle_credit_released(&mut self, _now: u64, shard: ShardIdx, frames: u32) {
        if frames == 0 || self.is_closed() {
            return;
        }
        if let Some((
            Route::Shard(s),
            Request {
                op: ShardOp::Flushed { frames: queued },
                ..
            },
        )) = self.requests.back_mut()
        {
            if *s == shard {
                *queued = queued.saturating_add(frames);
                return;
            }
        }
        self.forward(Route::Shard(shard), ShardOp::Flushed { frames });
    }

    /// Time passed: closes the session if the hello deadline is reached without a welcome, a
    /// write made no progress in time, or a pong is late; marks a ping as due.
    pub fn handle_timeout(&mut self, now: u64) {
        if self.liveness_timeout(now) || self.is_closed() {
            return;
        }
        if matches!(
            self.state,
            State::AwaitingHello | State::Authenticating { .. }
        ) && now >= self.hello_deadline
        {
            self.stats.hellos_timed_out += 1;
            self.error(
                None,
                ProtoError::new(ErrorCode::Unauthorized, "hello timed out"),
            );
            self.close(now);
        }
        self.reattach_timeout(now);
        if self.is_closed() {
            return;
        }
        while let Some(r) = self.deadlines.pop_expired(now) {
            self.subscribing.remove(&r);
            self.stats.requests_timed_out += 1;
            self.stats.requests_answered += 1;
            let timeout_ms = self.config.request_timeout_ms;
            self.error(
                Some(r),
                ProtoError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "no answer within request_timeout_ms ({timeout_ms} ms): the shard has \
                         no reachable quorum or leader; the request may still take effect, so \
                         retry it with its idempotency key"
                    ),
                ),
            );
        }
    }

    /// A shard could not queue its replies for this session (the session's reply channel was
    /// full: it did not take them in time) and forgot it; replies may be lost, so the session
    /// ends and the client resumes on a new one.
    pub fn handle_shard_overloaded(&mut self, now: u64, shard: ShardIdx) {
        if self.is_closed() {
            return;
        }
        self.error(
            None,
            ProtoError::new(
                ErrorCode::Overloaded,
                format!(
                    "shard {shard} could not queue replies for this session in time; closing \
                     the session: reconnect to resume"
                ),
            ),
        );
        self.close(now);
    }

    /// A shard restarted and forgot this session: the client must reconnect to resume.
    pub fn handle_shard_restarted(&mut self, now: u64, shard: ShardIdx) {
        if self.is_closed() {
            return;
        }
        self.error(
            None,
            ProtoError::new(
                ErrorCode::Unavailable,
                format!("shard {shard} restarted (or, in a cluster, its leader changed); reconnect to resume"),
            ),
        );
        self.close(now);
    }

    /// The transport is gone (peer closed, read or write failed).
    pub fn handle_transport_closed(&mut self, now: u64) {
        self.close(now);
    }

    /// Ends the session; the shards that may know it hear `Closed` exactly once. A session
    /// that never sent hello is known to no shard, so it tells none.
    fn close(&mut self, _now: u64) {
        self.state = State::Closed;
        self.early.clear();
        if self.attached && !self.closed_sent {
            self.closed_sent = true;
            self.forward(Route::AllShards, ShardOp::Closed);
        }
    }

    /// `challenge` before hello: the session's nonce, as often as asked until a hello uses it.
    fn answer_challenge(&mut self) {
        match self.challenge {
            Challenge::Ready(nonce) | Challenge::Issued(nonce) => {
                self.challenge = Challenge::Issued(nonce);
                self.push_frame(&ServerOp::Challenge { nonce }, None);
            }
            Challenge::None => self.error(
                None,
                ProtoError::new(
                    ErrorCode::Unavailable,
                    "this session has no challenge nonce (its transport did not provide one); \
                     say hello with a token",
                ),
            ),
            Challenge::Used => self.error(
                None,
                ProtoError::new(
                    ErrorCode::Unauthorized,
                    "this session's nonce was already used; reconnect for a new one",
                ),
            ),
        }
    }

    /// A key hello after a hello: the session's nonce is spent.
    fn nonce_reused(&mut self) {
        self.error(
            None,
            ProtoError::new(
                ErrorCode::Unauthorized,
                "hello was already sent on this session and its nonce is single-use",
            ),
        );
    }

    fn second_hello(&mut self) {
        self.error(
            None,
            ProtoError::bad_request("hello was already sent on this session"),
        );
    }

    fn refuse_overloaded(&mut self, r: Option<u64>) {
        self.stats.refused_overloaded += 1;
        self.error(
            r,
            ProtoError::new(
                ErrorCode::Overloaded,
                format!(
                    "more than {} requests are waiting for an answer; wait for answers \
                     before sending more",
                    self.inflight_hard_max()
                ),
            ),
        );
    }

    /// Ops that occupy the in-flight budget: answered-later requests and ops held for welcome.
    fn pending_ops(&self) -> u32 {
        let early = u32::try_from(self.early.len()).unwrap_or(u32::MAX);
        self.inflight.saturating_add(early)
    }

    /// Where ops are refused rather than held: the soft limit plus one whole batch frame,
    /// which `wants_read` cannot split.
    fn inflight_hard_max(&self) -> u32 {
        self.config
            .inflight_requests_max
            .saturating_add(BATCH_OPS_MAX as u32)
    }

    fn error(&mut self, r: Option<u64>, e: ProtoError) {
        self.count_error(e.code);
        self.push_frame(&ServerOp::error(r, e), None);
    }

    fn count_error(&mut self, code: ErrorCode) {
        self.stats.errors_sent += 1;
        self.stats.errors_by_code[error_code_index(code)] += 1;
    }

    fn push_frame(&mut self, op: &ServerOp, pushed_by: Option<ShardIdx>) {
        if !matches!(self.state, State::Open { .. }) {
            self.prehello_answers = self.prehello_answers.saturating_add(1);
        }
        // Before any frame arrived (a timeout) there is no choice yet: JSON, the default.
        let binary = self.encoding == Some(Encoding::Binary);
        let bytes = if binary {
            codec::encode_server_binary(op)
        } else {
            let mut out = Vec::with_capacity(96);
            codec::encode_server_json(op, &mut out);
            out
        };
        if let Some(e) = self.unencodable(op, binary, bytes.len()) {
            // Never skipped in silence: the client sees which message it cannot get here, in
            // its place (and the push credit it spent comes back as for any push).
            self.stats.unencodable_pushes += 1;
            self.count_error(e.code);
            let bytes = if binary {
                codec::encode_server_binary(&ServerOp::error(None, e))
            } else {
                let mut out = Vec::with_capacity(256);
                codec::encode_server_json(&ServerOp::error(None, e), &mut out);
                out
            };
            return self.queue(binary, bytes, None, pushed_by);
        }
        let conv = match op {
            ServerOp::Event(e) => Some(e.conv.clone()),
            _ => None,
        };
        self.queue(binary, bytes, conv, pushed_by);
    }

    fn queue(
        &mut self,
        binary: bool,
        bytes: Vec<u8>,
        conv: Option<Arc<str>>,
        pushed_by: Option<ShardIdx>,
    ) {
        let credit = match (&conv, pushed_by) {
            (Some(_), Some(shard)) => Some((shard, 1)),
            _ => None,
        };
        self.transmit.push_back(Queued {
            frame: OutFrame {
                binary,
                bytes,
                conv,
                credit,
            },
            pushed_by,
        });
    }

    /// Why a pushed message cannot go to this client as it is: a JSON frame needs a UTF-8
    /// body (bodies are checked on the way in; data an older node stored may not be), and no
    /// frame may be over `frame_bytes_max` (`body_bytes_max` keeps new ones under it).
    fn unencodable(&self, op: &ServerOp, binary: bool, len: usize) -> Option<ProtoError> {
        let (what, body) = match op {
            ServerOp::Deliver { pos, body, .. } => (format!("inbox message pos {pos}"), body),
            ServerOp::Event(e) => (format!("event {} seq {}", e.conv, e.seq), &e.body),
            _ => return None,
        };
        if !binary && body.to_text().is_none() {
            return Some(ProtoError::new(
                ErrorCode::Internal,
                format!(
                    "{what} cannot be sent as JSON: its stored body is not UTF-8 text; a binary \
                     session can read it"
                ),
            ));
        }
        (len > self.config.frame_bytes_max).then(|| {
            ProtoError::new(
                ErrorCode::TooLarge,
                format!(
                    "{what} cannot be sent: its frame would be {len} bytes, over \
                     frame_bytes_max ({})",
                    self.config.frame_bytes_max
                ),
            )
        })
    }
}

/// The ref of an op that waits for a shard's answer (and so counts as in flight).
fn counted_ref(op: &ClientOp) -> Option<u64> {
    match op {
        ClientOp::Send { r, .. }
        | ClientOp::Append { r, .. }
        | ClientOp::Subscribe { r, .. }
        | ClientOp::Unsubscribe { r, .. } => Some(*r),
        ClientOp::Hello { .. }
        | ClientOp::HelloSigned { .. }
        | ClientOp::Challenge
        | ClientOp::Ack { .. }
        | ClientOp::Ping { .. }
        | ClientOp::Options { .. } => None,
        ClientOp::Batch(_) => None,
    }
}

#[cfg(test)]
mod tests;
