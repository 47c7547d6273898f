//! One REST call (an HTTP conversation append or page read) as the edge sees it: a session of
//! its own that lives for one request. The HTTP glue parses the route, query and bearer
//! header; this core authenticates the token with the mesh's shard (`Auth`) first (so an
//! unauthenticated caller learns nothing about its input), then decodes and checks the op with
//! the same codec and session rules as a WebSocket or QUIC op (ids, key, body nesting and
//! size, page limit: the same error codes), forwards it as the token's peer, and answers once. It does
//! no I/O and reads no clock, so the node's HTTP handler and the simulator's HTTP clients run
//! the same decisions.
//!
//! ```text
//! glue                                     RestCall
//! RestCall::new(id, now, config, request) ->  validate; queue Auth (or answer an error)
//! poll_request()                       <-     (route, request) for the router
//! handle_reply(now, shard, reply)      ->     Authed: queue the op; ok / page / error: answer
//! handle_shard_restarted / _overloaded ->     answer unavailable / overloaded
//! poll_timeout() / handle_timeout(now) <->    the answer deadline
//! poll_answer()                        <-     the one answer
//! handle_cancel(now)                   ->     the client went away: forget the session
//! ```
//!
//! After the answer (or a cancel) the core queues `Closed` for every shard that may hold the
//! session's reply channel: the ones that answered, or all of them if one never did.

use crate::SessionConfig;
use bytes::Bytes;
use fabric_proto::codec::decode_rest_append;
use fabric_proto::internal::{Reply, Request, Route, SessionId, ShardIdx, ShardOp};
use fabric_proto::{
    validate_key, Body, ConvId, DeliveredEvent, ErrorCode, MeshId, PeerId, ProtoError, ServerOp,
};
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

/// The ref the core gives its own requests (one call has at most two, one at a time).
const AUTH_REF: u64 = 1;
const OP_REF: u64 = 2;

/// What an HTTP client asked for, as parsed from the route, query and body (not yet checked).
#[derive(Debug, Clone)]
pub struct RestRequest {
    pub mesh: String,
    /// The bearer token (a peer token of `mesh`).
    pub token: String,
    pub op: RestOp,
}

#[derive(Debug, Clone)]
pub enum RestOp {
    /// `POST /v1/meshes/{mesh}/conversations/{conv}/messages`, with the request body as it
    /// came (`{"body": JSON, "key": string}`).
    Append { conv: String, payload: Bytes },
    /// `GET /v1/meshes/{mesh}/conversations/{conv}/messages?from=&limit=&consistency=`;
    /// `local`: the receiving node's replica answers (authentication included), from its
    /// committed entries, which may lag the leader's.
    Read {
        conv: String,
        from: u64,
        limit: u32,
        local: bool,
    },
}

/// The call's one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestAnswer {
    Appended {
        seq: u64,
    },
    Page {
        events: Vec<DeliveredEvent>,
        head: u64,
    },
    Error(ProtoError),
}

/// The op, checked, waiting for the token's peer.
#[derive(Debug)]
enum Checked {
    Append {
        conv: ConvId,
        body: Body,
        key: Option<Arc<str>>,
    },
    Read {
        conv: ConvId,
        from: u64,
        limit: u32,
        local: bool,
    },
}

#[derive(Debug)]
enum Step {
    Authenticating(MeshId, RestOp),
    Waiting,
    Answered,
}

/// How long the shards have to answer, in ms. Unanswered by then: `unavailable`.
#[derive(Debug, Clone, Copy)]
pub struct RestConfig {
    pub reply_timeout_ms: u64,
    pub body_bytes_max: usize,
}

impl RestConfig {
    /// A REST call waits for its shards as long as a session's request does
    /// (`request_timeout_ms`).
    pub fn new(session: &SessionConfig) -> RestConfig {
        RestConfig {
            reply_timeout_ms: session.request_timeout_ms,
            body_bytes_max: session.body_bytes_max,
        }
    }
}

#[derive(Debug)]
pub struct RestCall {
    id: SessionId,
    step: Step,
    requests: VecDeque<(Route, Request)>,
    answer: Option<RestAnswer>,
    deadline: u64,
    body_bytes_max: usize,
    /// Shards that answered this session (they may hold its reply channel).
    answered_by: BTreeSet<ShardIdx>,
    /// A request is out that no shard answered yet.
    unanswered: bool,
    closed: bool,
}

impl RestCall {
    /// Queues the request's `Auth`; a mesh id that breaks the rules is answered at once and
    /// sends nothing.
    pub fn new(id: SessionId, now: u64, config: &RestConfig, request: RestRequest) -> RestCall {
        let mut call = RestCall {
            id,
            step: Step::Answered,
            requests: VecDeque::new(),
            answer: None,
            deadline: now.saturating_add(config.reply_timeout_ms),
            body_bytes_max: config.body_bytes_max,
            answered_by: BTreeSet::new(),
            unanswered: false,
            closed: true,
        };
        match MeshId::new(&request.mesh) {
            Err(e) => call.answer = Some(RestAnswer::Error(e)),
            Ok(mesh) => {
                let local = matches!(request.op, RestOp::Read { local: true, .. });
                call.step = Step::Authenticating(mesh.clone(), request.op);
                call.closed = false;
                let op = ShardOp::Auth {
                    r: AUTH_REF,
                    mesh,
                    token: request.token,
                    local,
                };
                call.forward(op);
            }
        }
        call
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    pub fn poll_request(&mut self) -> Option<(Route, Request)> {
        self.requests.pop_front()
    }

    pub fn poll_answer(&mut self) -> Option<RestAnswer> {
        self.answer.take()
    }

    /// The answer deadline, while the call waits for a shard.
    pub fn poll_timeout(&self) -> Option<u64> {
        matches!(self.step, Step::Authenticating(..) | Step::Waiting).then_some(self.deadline)
    }

    pub fn handle_timeout(&mut self, now: u64) {
        if now >= self.deadline && self.poll_timeout().is_some() {
            let e = ProtoError::new(
                ErrorCode::Unavailable,
                "the shard did not answer in time; retry",
            );
            self.finish(RestAnswer::Error(e));
        }
    }

    pub fn handle_reply(&mut self, _now: u64, shard: ShardIdx, reply: Reply) {
        self.answered_by.insert(shard);
        self.unanswered = false;
        let step = std::mem::replace(&mut self.step, Step::Waiting);
        match (step, reply) {
            (Step::Authenticating(mesh, op), Reply::Authed { r: AUTH_REF, peer }) => {
                // The shard names a peer it stored, which was a valid id when it came in.
                let checked = PeerId::from_arc(peer)
                    .and_then(|peer| Ok((peer, check(self.body_bytes_max, op)?)));
                match checked {
                    Ok((peer, checked)) => self.forward(op_for(checked, mesh, peer)),
                    Err(e) => self.finish(RestAnswer::Error(e)),
                }
            }
            (Step::Answered, _) => self.step = Step::Answered,
            (_, Reply::Frame(ServerOp::Error { code, message, .. })) => {
                self.finish(RestAnswer::Error(ProtoError::new(code, message)))
            }
            (Step::Waiting, Reply::Frame(ServerOp::Ok { seq: Some(seq), .. })) => {
                self.finish(RestAnswer::Appended { seq })
            }
            (Step::Waiting, Reply::Messages { events, head, .. }) => {
                self.finish(RestAnswer::Page { events, head })
            }
            (_, other) => {
                let e = ProtoError::new(
                    ErrorCode::Internal,
                    format!("unexpected reply to a REST call: {other:?}"),
                );
                self.finish(RestAnswer::Error(e))
            }
        }
    }

    /// The shard restarted and forgot this session: the call cannot know whether its op
    /// landed (an append may have), so it says so; the client retries with its key.
    pub fn handle_shard_restarted(&mut self, _now: u64, shard: ShardIdx) {
        self.answered_by.insert(shard);
        let e = ProtoError::new(
            ErrorCode::Unavailable,
            "the shard restarted before answering; retry",
        );
        self.finish(RestAnswer::Error(e));
    }

    /// The shard could not queue this session's replies and forgot it.
    pub fn handle_shard_overloaded(&mut self, _now: u64, shard: ShardIdx) {
        self.answered_by.insert(shard);
        let e = ProtoError::new(
            ErrorCode::Overloaded,
            "the shard could not queue the answer; retry",
        );
        self.finish(RestAnswer::Error(e));
    }

    /// The HTTP client went away: no answer is owed, but the shards must forget the session.
    pub fn handle_cancel(&mut self, _now: u64) {
        self.step = Step::Answered;
        self.answer = None;
        self.close();
    }

    fn forward(&mut self, op: ShardOp) {
        self.unanswered = true;
        let req = Request {
            session: self.id,
            op,
        };
        self.requests.push_back((Route::ByKey, req));
    }

    fn finish(&mut self, answer: RestAnswer) {
        if self.closed {
            return; // answered (or cancelled) already: one answer per call
        }
        self.step = Step::Answered;
        self.answer = Some(answer);
        self.close();
    }

    /// `Closed` to every shard that may hold the session: those that answered, or all of
    /// them while a request is unanswered (its shard is not known here).
    fn close(&mut self) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        let req = |id| Request {
            session: id,
            op: ShardOp::Closed,
        };
        if self.unanswered {
            self.requests.push_back((Route::AllShards, req(self.id)));
            return;
        }
        for shard in std::mem::take(&mut self.answered_by) {
            self.requests.push_back((Route::Shard(shard), req(self.id)));
        }
    }
}

/// The op as the token's peer.
fn op_for(checked: Checked, mesh: MeshId, peer: PeerId) -> ShardOp {
    match checked {
        Checked::Append { conv, body, key } => ShardOp::Append {
            r: OP_REF,
            mesh,
            conv,
            from: peer,
            body,
            key,
        },
        Checked::Read {
            conv,
            from,
            limit,
            local,
        } => ShardOp::Read {
            r: OP_REF,
            mesh,
            conv,
            from,
            limit,
            local,
        },
    }
}

/// The session's rules, applied to a REST op once its caller is authenticated: the same
/// decoding and checks (and codes) as the codec and session apply to a WebSocket or QUIC op.
fn check(body_bytes_max: usize, op: RestOp) -> Result<Checked, ProtoError> {
    match op {
        RestOp::Append { conv, payload } => {
            let conv = ConvId::new(&conv)?;
            let (body, key) = decode_rest_append(&payload)?;
            if let Some(k) = &key {
                validate_key(k)?;
            }
            if body.len() > body_bytes_max {
                return Err(crate::body_too_large(body.len(), body_bytes_max));
            }
            Ok(Checked::Append {
                conv,
                body,
                key: key.as_deref().map(Into::into),
            })
        }
        RestOp::Read {
            conv,
            from,
            limit,
            local,
        } => {
            let conv = ConvId::new(&conv)?;
            if limit == 0 || limit > fabric_proto::READ_LIMIT_MAX {
                return Err(ProtoError::bad_request(format!(
                    "limit must be 1..={}",
                    fabric_proto::READ_LIMIT_MAX
                )));
            }
            Ok(Checked::Read {
                conv,
                from,
                limit,
                local,
            })
        }
    }
}

#[cfg(test)]
mod tests;
