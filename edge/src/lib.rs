//! The session protocol core: one `Session` per client connection, whatever the transport
//! (WebSocket now, QUIC next). It turns frames into shard requests and shard replies into
//! frames, and owns the session's rules: hello first, size limits, in-flight limit, push credit,
//! the hello deadline. It does no I/O and reads no clock (quinn-proto's `Connection` style):
//!
//! ```text
//! glue                                    Session
//! handle_frame(now, bytes)          ->    decode, check, queue requests or error frames
//! poll_request()                    <-    (route, request) for the router
//! handle_reply(now, shard, reply)   ->    encode frames, count acks and pushes
//! poll_transmit()                   <-    frames for the socket
//! handle_flushed(now)               ->    every polled frame is written: return push credit
//! wants_read()                      <-    false = stop reading the socket (backpressure)
//! ```

use fabric_proto::codec;
use fabric_proto::internal::{Reply, Request, Route, SessionId, ShardIdx, ShardOp};
use fabric_proto::{ClientOp, ErrorCode, ProtoError, ServerOp};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Limits of one session. Units are last in every name.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Largest frame accepted; a larger one gets `too_large` and is dropped.
    pub frame_bytes_max: usize,
    /// Requests waiting for their ack before `wants_read` turns false.
    pub inflight_requests_max: u32,
    /// Time from the first byte to `welcome`.
    pub hello_timeout_ms: u64,
    /// Frames queued for the socket before the session gives up on a client that does not read.
    pub pending_transmit_frames_max: usize,
}

impl Default for SessionConfig {
    fn default() -> SessionConfig {
        SessionConfig {
            frame_bytes_max: fabric_proto::FRAME_BYTES_MAX_DEFAULT,
            inflight_requests_max: 1024,
            hello_timeout_ms: 10_000,
            pending_transmit_frames_max: 65_536,
        }
    }
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
}

/// Plain counters for metrics.
#[derive(Debug, Clone, Default)]
pub struct SessionStats {
    pub frames_in: u64,
    pub bytes_in: u64,
    pub frames_out: u64,
    pub bytes_out: u64,
    pub errors_sent: u64,
    pub requests_forwarded: u64,
    /// Replies that made no sense for a session (HTTP-only replies): bugs, counted not fatal.
    pub unexpected_replies: u64,
}

#[derive(Debug)]
enum State {
    AwaitingHello,
    Authenticating,
    Open { mesh: Arc<str>, peer: Arc<str> },
    Closed,
}

#[derive(Debug)]
pub struct Session {
    id: SessionId,
    config: SessionConfig,
    state: State,
    binary: Option<bool>,
    hello_deadline: u64,
    inflight: u32,
    /// Ops that arrived after hello but before welcome, taken in order once welcomed.
    early: VecDeque<ClientOp>,
    requests: VecDeque<(Route, Request)>,
    transmit: VecDeque<OutFrame>,
    /// Pushed frames per shard queued since the last flush, and those polled (in the socket).
    pushed_queued: BTreeMap<ShardIdx, u32>,
    /// The mesh and peer named by the hello being authenticated.
    hello_identity: Option<(Arc<str>, Arc<str>)>,
    /// Whether the shards may know this session (it must then say `Closed` to them).
    attached: bool,
    closed_sent: bool,
    stats: SessionStats,
}

impl Session {
    pub fn new(id: SessionId, now: u64, config: SessionConfig) -> Session {
        Session {
            id,
            hello_deadline: now.saturating_add(config.hello_timeout_ms),
            config,
            state: State::AwaitingHello,
            binary: None,
            inflight: 0,
            early: VecDeque::new(),
            requests: VecDeque::new(),
            transmit: VecDeque::new(),
            pushed_queued: BTreeMap::new(),
            hello_identity: None,
            attached: false,
            closed_sent: false,
            stats: SessionStats::default(),
        }
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Requests forwarded and not yet answered.
    pub fn inflight(&self) -> u32 {
        self.inflight
    }

    /// `(mesh, peer)` once welcomed.
    pub fn identity(&self) -> Option<(&Arc<str>, &Arc<str>)> {
        match &self.state {
            State::Open { mesh, peer } => Some((mesh, peer)),
            _ => None,
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// False while the session must not read more: at its in-flight limit, or holding early ops.
    pub fn wants_read(&self) -> bool {
        !self.is_closed()
            && self.inflight + (self.early.len() as u32) < self.config.inflight_requests_max
            && self.transmit.len() < self.config.pending_transmit_frames_max
    }

    /// The hello deadline, until welcomed.
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.state {
            State::AwaitingHello | State::Authenticating => Some(self.hello_deadline),
            _ => None,
        }
    }

    pub fn poll_request(&mut self) -> Option<(Route, Request)> {
        self.requests.pop_front()
    }

    pub fn poll_transmit(&mut self) -> Option<OutFrame> {
        let f = self.transmit.pop_front()?;
        self.stats.frames_out += 1;
        self.stats.bytes_out += f.bytes.len() as u64;
        Some(f)
    }

    pub fn handle_frame(&mut self, now: u64, frame: InFrame<'_>) {
        if self.is_closed() {
            return;
        }
        self.stats.frames_in += 1;
        self.stats.bytes_in += frame.bytes.len() as u64;
        if self.binary.is_none() {
            self.binary = Some(frame.binary);
        }
        if frame.bytes.len() > self.config.frame_bytes_max {
            self.error(
                None,
                ProtoError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "frame is {} bytes; the limit is {}",
                        frame.bytes.len(),
                        self.config.frame_bytes_max
                    ),
                ),
            );
            return;
        }
        let decoded = if frame.binary {
            codec::decode_client_binary(frame.bytes)
        } else {
            codec::decode_client_json(frame.bytes)
        };
        match decoded {
            Ok(ops) => {
                for op in ops {
                    self.handle_op(now, op);
                    if self.is_closed() {
                        return;
                    }
                }
            }
            Err(e) => self.error(None, e),
        }
    }

    fn handle_op(&mut self, now: u64, op: ClientOp) {
        match &self.state {
            State::Closed => {}
            State::AwaitingHello => match op {
                ClientOp::Hello { mesh, peer, token } => {
                    self.state = State::Authenticating;
                    self.attached = true;
                    self.hello_identity = Some((mesh.clone(), peer.clone()));
                    self.forward(Route::ByKey, ShardOp::Hello { mesh, peer, token }, false);
                }
                _ => {
                    self.error(
                        op.reference(),
                        ProtoError::new(ErrorCode::Unauthorized, "send hello first"),
                    );
                    self.close(now);
                }
            },
            State::Authenticating => match op {
                ClientOp::Hello { .. } => self.error(
                    None,
                    ProtoError::bad_request("hello was already sent on this session"),
                ),
                // Taken after welcome, in order; counted against the in-flight limit meanwhile.
                op => self.early.push_back(op),
            },
            State::Open { mesh, peer } => {
                let (mesh, peer) = (mesh.clone(), peer.clone());
                self.handle_open_op(op, mesh, peer);
            }
        }
    }

    fn handle_open_op(&mut self, op: ClientOp, mesh: Arc<str>, peer: Arc<str>) {
        match op {
            ClientOp::Hello { .. } => self.error(
                None,
                ProtoError::bad_request("hello was already sent on this session"),
            ),
            ClientOp::Send { r, to, body } => self.forward(
                Route::ByKey,
                ShardOp::Send {
                    r,
                    mesh,
                    from: peer,
                    to,
                    body,
                },
                true,
            ),
            ClientOp::Append { r, conv, body, key } => self.forward(
                Route::ByKey,
                ShardOp::Append {
                    r,
                    mesh,
                    conv,
                    from: peer,
                    body,
                    key,
                },
                true,
            ),
            ClientOp::Subscribe { r, conv, from } => self.forward(
                Route::ByKey,
                ShardOp::Subscribe {
                    r,
                    mesh,
                    conv,
                    from,
                },
                true,
            ),
            ClientOp::Unsubscribe { r, conv } => {
                self.forward(Route::ByKey, ShardOp::Unsubscribe { r, mesh, conv }, true)
            }
            ClientOp::Ack { upto } => {
                self.forward(Route::ByKey, ShardOp::Ack { mesh, peer, upto }, false)
            }
            ClientOp::Ping { r } => self.push_frame(&ServerOp::Pong { r }),
            // The codec flattens batches; a nested one never reaches here.
            ClientOp::Batch(_) => self.error(None, ProtoError::bad_request("batches may not nest")),
        }
    }

    fn forward(&mut self, route: Route, op: ShardOp, counts: bool) {
        if counts {
            self.inflight += 1;
        }
        self.stats.requests_forwarded += 1;
        self.requests.push_back((
            route,
            Request {
                session: self.id,
                op,
            },
        ));
    }

    pub fn handle_reply(&mut self, now: u64, shard: ShardIdx, reply: Reply) {
        if self.is_closed() {
            return;
        }
        let op = match reply {
            Reply::Frame(op) => op,
            Reply::Authed { .. } | Reply::Messages { .. } => {
                self.stats.unexpected_replies += 1;
                return;
            }
        };
        match &op {
            ServerOp::Welcome { .. } => {
                if let State::Authenticating = self.state {
                    // The shard verified these; the hello that named them is the one queued.
                    let (mesh, peer) = self.hello_identity.take().unwrap_or_default();
                    self.state = State::Open { mesh, peer };
                    self.push_frame(&op);
                    while let Some(early) = self.early.pop_front() {
                        self.handle_op(now, early);
                    }
                } else {
                    self.stats.unexpected_replies += 1;
                }
                return;
            }
            ServerOp::Error { r: None, .. } if matches!(self.state, State::Authenticating) => {
                self.stats.errors_sent += 1;
                self.push_frame(&op);
                self.close(now);
                return;
            }
            ServerOp::Ok { .. } | ServerOp::Error { r: Some(_), .. } => {
                self.inflight = self.inflight.saturating_sub(1);
            }
            ServerOp::Error { r: None, .. } => self.stats.errors_sent += 1,
            ServerOp::Deliver { .. } | ServerOp::Event(_) => {
                *self.pushed_queued.entry(shard).or_insert(0) += 1;
            }
            ServerOp::Pong { .. } | ServerOp::Batch(_) => {}
        }
        if matches!(op, ServerOp::Error { r: Some(_), .. }) {
            self.stats.errors_sent += 1;
        }
        self.push_frame(&op);
        if self.transmit.len() > self.config.pending_transmit_frames_max {
            self.transmit.clear();
            self.error(
                None,
                ProtoError::new(
                    ErrorCode::Overloaded,
                    "the client is not reading its frames; closing the session",
                ),
            );
            self.close(now);
        }
    }

    /// The glue wrote every frame polled so far: pushed frames give their credit back.
    pub fn handle_flushed(&mut self, _now: u64) {
        if self.is_closed() {
            return;
        }
        let pushed = std::mem::take(&mut self.pushed_queued);
        for (shard, frames) in pushed {
            if frames > 0 {
                self.forward(Route::Shard(shard), ShardOp::Flushed { frames }, false);
            }
        }
    }

    pub fn handle_timeout(&mut self, now: u64) {
        if matches!(self.state, State::AwaitingHello | State::Authenticating)
            && now >= self.hello_deadline
        {
            self.error(
                None,
                ProtoError::new(ErrorCode::Unauthorized, "hello timed out"),
            );
            self.close(now);
        }
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
                format!("shard {shard} restarted; reconnect to resume"),
            ),
        );
        self.close(now);
    }

    pub fn handle_transport_closed(&mut self, now: u64) {
        self.close(now);
    }

    fn close(&mut self, _now: u64) {
        self.state = State::Closed;
        self.early.clear();
        if self.attached && !self.closed_sent {
            self.closed_sent = true;
            self.requests.push_back((
                Route::AllShards,
                Request {
                    session: self.id,
                    op: ShardOp::Closed,
                },
            ));
        }
    }

    fn error(&mut self, r: Option<u64>, e: ProtoError) {
        self.stats.errors_sent += 1;
        self.push_frame(&ServerOp::error(r, e));
    }

    fn push_frame(&mut self, op: &ServerOp) {
        let binary = self.binary.unwrap_or(false);
        let bytes = if binary {
            codec::encode_server_binary(op)
        } else {
            let mut out = Vec::with_capacity(96);
            codec::encode_server_json(op, &mut out);
            out
        };
        self.transmit.push_back(OutFrame { binary, bytes });
    }
}

#[cfg(test)]
mod tests;
