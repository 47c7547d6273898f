//! Any node serves any client: a replicated driver whose replica follows forwards its batches
//! to the node its Raft core names as leader, and routes the replies for sessions homed on
//! other nodes back to them. Sans-IO: forwarded batches, replies and closes leave as effects
//! (the node link carries them) and come back through `handle_forwarded`,
//! `handle_remote_replies` and `handle_remote_close`.
//!
//! The rules:
//! - A session's id says which node it lives on ([`session_home`]); replies for it go there.
//! - A forwarded request with a ref is answered `unavailable` by the forwarding node as soon as
//!   its replica sees a newer term, or after `forward_timeout_ms` without an answer; a late
//!   answer from the old leader is then dropped, so each request gets one answer. Such a
//!   request may still commit: a client retries with its idempotency key.
//! - A batch forwarded to a node that no longer leads is answered there (`unavailable`,
//!   naming the leader it knows), never forwarded again: no loops.
//! - A batch of `?consistency=local` reads only (`ShardOp::is_local_read`) is never forwarded:
//!   this node's replica answers it from its committed state, however far behind.

use super::{CloseReason, Effect, ShardDriver, State, Time};
use fabric_proto::internal::{Reply, Request, SessionId, ShardOp};
use fabric_proto::{ErrorCode, ProtoError, ServerOp};
use fabric_shard::raft::NodeId;
use fabric_shard::replica::{Mode, PeerMessage};

/// Bits of a session id below its home node's id: sessions of node `n` are
/// `n << SESSION_NODE_SHIFT | k`.
pub const SESSION_NODE_SHIFT: u32 = 48;

/// Forwarded requests waiting for an answer, per driver (bounded by what the input queue
/// holds: each was taken from it).
pub const FORWARDED_REQUESTS_MAX: usize = 65_536;

/// Sessions a driver numbers reply frames for, on either side (`remote_sent`, `remote_seen`).
/// Past it the lowest session id's numbering is forgotten: its next frame no longer follows,
/// so its node closes it (the client resumes). Safe, and it bounds the entries of sessions
/// whose node died without closing them.
pub const REMOTE_SESSIONS_MAX: usize = 1 << 20;

/// `remote_seen`'s mark of a session closed at a gap, kept until the session is forgotten.
const CLOSED_AT_GAP: u64 = u64::MAX;

/// What the node link carries for one shard between its drivers on two nodes (postcard).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NodeFrame {
    /// Between the shard's replicas: Raft, snapshots.
    Peer(PeerMessage),
    /// A local session's batch, to the leader's node; `seq` counts the session's batches to
    /// that node (a gap closes the session: see `handle_forwarded`).
    Forward {
        session: SessionId,
        batch: Vec<Request>,
        seq: u64,
    },
    /// Replies for a session of the receiving node; `seq` counts the session's frames (a gap
    /// closes the session: see `handle_remote_replies`).
    Remote {
        session: SessionId,
        replies: Vec<Reply>,
        seq: u64,
    },
    /// Close a session of the receiving node.
    Close {
        session: SessionId,
        why: CloseReason,
    },
    /// Heartbeats (and their answers) of many shards between one pair of nodes, in one frame,
    /// on the link's [`super::beats::BEATS_GROUP`]: (shard, message). Last, so the encodings of
    /// the variants before it are unchanged.
    Beats(Vec<(u32, PeerMessage)>),
    /// Never sent: the receiving node's link says its connection with the sender was
    /// replaced, so frames queued on the old one may be lost (`handle_link_reset`).
    LinkReset,
}

impl NodeFrame {
    /// The effect's frame for another node, with its destination; any other effect back.
    #[allow(clippy::result_large_err)] // the "error" is the effect itself, handed back whole
    pub fn from_effect(e: Effect) -> Result<(NodeId, NodeFrame), Effect> {
        match e {
            Effect::Peer(m) => Ok((m.to(), NodeFrame::Peer(m))),
            Effect::Forward {
                to,
                session,
                batch,
                seq,
            } => Ok((
                to,
                NodeFrame::Forward {
                    session,
                    batch,
                    seq,
                },
            )),
            Effect::Remote {
                to,
                session,
                replies,
                seq,
            } => Ok((
                to,
                NodeFrame::Remote {
                    session,
                    replies,
                    seq,
                },
            )),
            Effect::RemoteClose { to, session, why } => Ok((to, NodeFrame::Close { session, why })),
            e => Err(e),
        }
    }
}

/// The node a session lives on.
pub fn session_home(session: SessionId) -> NodeId {
    session >> SESSION_NODE_SHIFT
}

/// Where a clustered node's session counter starts: its boot time in ms times 128, within the
/// 48 bits of `k`. A restarted node must not reuse the ids of its sessions before the crash:
/// a leader elsewhere may still hold one of them attached (no `Closed` came), and would send
/// that session's replies and deliveries to whoever has the id now. The ids a process uses stay
/// below the next boot's start unless it opened more than 128 sessions a millisecond on
/// average over its life (the start wraps in 2039: ms since 1970 times 128 reaches 2^48).
pub fn session_counter_start(boot_unix_ms: u64) -> u64 {
    boot_unix_ms.wrapping_mul(128) & ((1 << SESSION_NODE_SHIFT) - 1)
}

/// The id of session `k` of node `node`.
pub fn session_id(node: NodeId, k: u64) -> SessionId {
    node << SESSION_NODE_SHIFT | (k & ((1 << SESSION_NODE_SHIFT) - 1))
}

/// The ref a reply answers, if it answers one request.
fn reply_ref(reply: &Reply) -> Option<u64> {
    match reply {
        Reply::Frame(ServerOp::Ok { r, .. }) | Reply::Frame(ServerOp::Pong { r }) => Some(*r),
        Reply::Frame(ServerOp::Error { r, .. }) => *r,
        Reply::Authed { r, .. } | Reply::Messages { r, .. } => Some(*r),
        _ => None,
    }
}

/// A forwarded request waiting for its answer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Waiting {
    deadline_mono_ms: u64,
    term: u64,
}

impl ShardDriver {
    /// The node this driver serves on (0 for an unreplicated driver).
    pub fn node(&self) -> NodeId {
        self.replica.as_ref().map_or(0, |r| r.node)
    }

    fn is_local(&self, session: SessionId) -> bool {
        session_home(session) == self.node()
    }

    /// Where a follower sends what it takes in: its leader, if it knows one elsewhere.
    fn forward_target(&self) -> Option<(NodeId, u64)> {
        let State::Serving(core) = &self.state else {
            return None;
        };
        let r = core.replica()?;
        let leader = r.raft().leader()?;
        (r.mode() == Mode::Follower && leader != r.raft().id()).then(|| (leader, r.raft().term()))
    }

    /// A batch the driver takes in: forwarded to the leader (true), or for the core (false).
    /// Only a local session's batch is forwarded (a forwarded one is answered here), and not
    /// one of `?consistency=local` reads only: this node's replica answers those.
    pub(super) fn forward(
        &mut self,
        t: Time,
        session: SessionId,
        batch: &mut Vec<Request>,
    ) -> bool {
        let Some((to, term)) = self.forward_target() else {
            return false;
        };
        // Sessions forwarded in an older term are told before anything goes out in this one.
        self.close_sessions_of_old_leader(term);
        if !self.is_local(session) || self.forwarded.len() >= FORWARDED_REQUESTS_MAX {
            return false;
        }
        if batch.iter().all(|r| r.op.is_local_read()) {
            return false;
        }
        if batch.iter().any(|r| matches!(r.op, ShardOp::Closed)) {
            // The leader forgets the session; so do this driver and this node's adapter.
            self.sessions.remove(&session);
            self.effects.push_back(Effect::Forget { session });
        }
        self.forward_term = Some(term);
        let deadline = t.mono_ms + self.forward_timeout_ms;
        for req in batch.iter() {
            if let Some(r) = req.op.reference() {
                let w = Waiting {
                    deadline_mono_ms: deadline,
                    term,
                };
                self.forwarded.insert((req.session, r), w);
            }
        }
        bound_sessions(&mut self.forward_sent, session, self.remote_sessions_max);
        let sent = self.forward_sent.entry(session).or_insert((to, 0));
        if sent.0 != to {
            *sent = (to, 0); // another leader: its numbering starts at 1
        }
        sent.1 += 1;
        let seq = sent.1;
        self.effects.push_back(Effect::Forward {
            to,
            session,
            batch: std::mem::take(batch),
            seq,
        });
        true
    }

    /// A frame node `from` sent this shard. A forwarded batch is taken only if every op in it
    /// passes the checks a client's binary op passes (`ShardOp::check_wire`): a frame is
    /// bytes from the network, mutual TLS or not; a bad one is dropped whole (false).
    pub fn handle_node_frame(&mut self, t: Time, from: NodeId, frame: NodeFrame) -> bool {
        match frame {
            NodeFrame::Peer(m) if m.from() == from => self.handle_peer_message(t, m),
            NodeFrame::Peer(_) => return false,
            NodeFrame::Forward {
                session,
                batch,
                seq,
            } => {
                if batch.iter().any(|r| r.op.check_wire().is_err()) {
                    return false;
                }
                self.handle_forwarded(t, from, session, batch, seq);
            }
            NodeFrame::Remote {
                session,
                replies,
                seq,
            } => self.handle_remote_replies(t, from, session, replies, seq),
            NodeFrame::Close { session, why } => self.handle_remote_close(t, session, why),
            // The link expands these before they reach a shard (`beats::expand`).
            NodeFrame::Beats(_) => return false,
            NodeFrame::LinkReset => self.handle_link_reset(t, from),
        }
        true
    }

    /// A batch another node forwarded here (this node leads, or did when it was sent).
    /// Requests of sessions that do not live on the sending node are dropped: a node forwards
    /// only its own sessions. Batch `seq` must follow the session's last one here (1 starts a
    /// numbering: the session came here from another leader): a gap means the link lost a
    /// batch, which may have held what the session must not lose in silence (returned push
    /// credit, without which its deliveries would stop for good; a `Closed`). The session is
    /// closed instead, and its client resumes.
    pub fn handle_forwarded(
        &mut self,
        t: Time,
        from: NodeId,
        session: SessionId,
        batch: Vec<Request>,
        seq: u64,
    ) {
        if session_home(session) != from || from == self.node() {
            return;
        }
        let last = self.forward_seen.get(&session).copied().unwrap_or(0);
        if last == CLOSED_AT_GAP {
            return;
        }
        if seq != 1 && seq != last + 1 {
            self.forward_seen.insert(session, CLOSED_AT_GAP);
            let closed = vec![Request {
                session,
                op: ShardOp::Closed,
            }];
            self.handle_batch(t, session, closed);
            self.effects.push_back(Effect::CloseSession {
                session,
                why: CloseReason::Restarted,
            });
            return;
        }
        bound_sessions(&mut self.forward_seen, session, self.remote_sessions_max);
        self.forward_seen.insert(session, seq);
        if batch.iter().any(|r| matches!(r.op, ShardOp::Attach { .. })) {
            // The session's node numbers this leader's frames afresh after an attach.
            self.remote_sent.remove(&session);
        }
        let batch: Vec<Request> = batch.into_iter().filter(|r| r.session == session).collect();
        self.handle_batch(t, session, batch);
    }

    /// Replies leader `from` sent for one of this node's sessions: each request is answered
    /// once (an answer to a request this node already answered `unavailable` is dropped).
    /// Frame `seq` must follow the last one from the leader the session follows: a gap means
    /// the node link dropped a frame, which may have held deliveries the client will never
    /// see, and a client that acknowledged a later one would move its cursor past them. The
    /// session is closed instead (its client resumes; the inbox is redelivered from its
    /// cursor). A frame numbered 1 from another node is a new leader's first for the session
    /// (it attached there after a leader change): the session follows that node from then on,
    /// and later frames of the leader it left are dropped (what they carried, the new leader
    /// delivers again from where the session was).
    pub fn handle_remote_replies(
        &mut self,
        _t: Time,
        from: NodeId,
        session: SessionId,
        replies: Vec<Reply>,
        seq: u64,
    ) {
        if !self.is_local(session) {
            return;
        }
        let (node, last) = self.remote_seen.get(&session).copied().unwrap_or((from, 0));
        if last == CLOSED_AT_GAP {
            return; // closed already: the frames the leader sends until it hears are dropped
        }
        if node != from && seq != 1 {
            return; // a leader the session left
        }
        // Frame 1 starts a numbering: a new leader's, or the same one's after the session
        // attached again (what came before is delivered again from the session's marks).
        let last = if seq == 1 { 0 } else { last };
        if seq != last + 1 {
            self.remote_seen.insert(session, (from, CLOSED_AT_GAP));
            self.sessions.remove(&session);
            self.effects.push_back(Effect::CloseSession {
                session,
                why: CloseReason::Restarted,
            });
            return;
        }
        bound_sessions(&mut self.remote_seen, session, self.remote_sessions_max);
        self.remote_seen.insert(session, (from, seq));
        let replies: Vec<Reply> = replies
            .into_iter()
            .filter(|reply| match reply_ref(reply) {
                Some(r) => self.forwarded.remove(&(session, r)).is_some(),
                None => true,
            })
            .collect();
        if !replies.is_empty() {
            self.effects.push_back(Effect::Replies { session, replies });
        }
    }

    /// The leader's incarnation that one of this node's sessions was attached to ended.
    pub fn handle_remote_close(&mut self, _t: Time, session: SessionId, why: CloseReason) {
        if why == CloseReason::LeaderChanged {
            self.follow_anew(session);
        }
        if self.is_local(session) {
            self.effects
                .push_back(Effect::CloseSession { session, why });
        }
    }

    /// The node link's connection with `peer` was replaced: frames between the two may have
    /// been lost either way (a batch's returned push credit, deliveries, a close), which would
    /// leave a session silent for good. Every local session forwarded to `peer` is told
    /// `LeaderChanged` and attaches again there from its marks (an attach also restores its
    /// push credit and restarts the reply numbering), and its batches are numbered from 1.
    pub fn handle_link_reset(&mut self, _t: Time, peer: NodeId) {
        let gone: Vec<SessionId> = self
            .forward_sent
            .iter()
            .filter(|(s, (to, _))| *to == peer && self.sessions.contains(s))
            .map(|(s, _)| *s)
            .collect();
        for session in gone {
            self.attach_again(session);
        }
    }

    /// A local session's state at the leader it was forwarded to is gone (or may have lost
    /// frames): it is told `LeaderChanged` and attaches again. Its batches are numbered from 1
    /// wherever they go next (the same node, re-elected or reconnected, included), and so are
    /// the frames it takes.
    fn attach_again(&mut self, session: SessionId) {
        self.sessions.remove(&session);
        if let Some(sent) = self.forward_sent.get_mut(&session) {
            *sent = (0, 0);
        }
        self.follow_anew(session);
        self.effects.push_back(Effect::CloseSession {
            session,
            why: CloseReason::LeaderChanged,
        });
    }

    /// The session follows no leader's reply numbering until a frame numbered 1 (node 0 is no
    /// node: ids start at 1); the old leader's late frames no longer follow anything
    /// (`handle_remote_replies` drops them). A session closed at a gap stays closed.
    fn follow_anew(&mut self, session: SessionId) {
        if let Some(seen) = self.remote_seen.get_mut(&session) {
            if seen.1 != CLOSED_AT_GAP {
                *seen = (0, 0);
            }
        }
    }

    /// At most `max` sessions numbered (tests set a small one; see [`REMOTE_SESSIONS_MAX`]).
    pub fn set_remote_sessions_max(&mut self, max: usize) {
        self.remote_sessions_max = max.max(1);
    }

    /// Replies and closes for sessions of other nodes go there (replies numbered per session);
    /// a session's numbering ends with it.
    pub(super) fn route_effect(&mut self, e: Effect) -> Effect {
        match e {
            Effect::Replies { session, replies } if !self.is_local(session) => {
                bound_sessions(&mut self.remote_sent, session, self.remote_sessions_max);
                let seq = self.remote_sent.entry(session).or_insert(0);
                *seq += 1;
                Effect::Remote {
                    to: session_home(session),
                    session,
                    replies,
                    seq: *seq,
                }
            }
            Effect::CloseSession { session, why } if !self.is_local(session) => {
                self.remote_sent.remove(&session);
                Effect::RemoteClose {
                    to: session_home(session),
                    session,
                    why,
                }
            }
            Effect::Forget { session } => {
                self.remote_sent.remove(&session);
                self.remote_seen.remove(&session);
                self.forward_sent.remove(&session);
                Effect::Forget { session }
            }
            e => e,
        }
    }

    /// Forwarded requests past their deadline, or sent in an older term than the replica
    /// knows now, are answered `unavailable`; a newer term also closes the local sessions
    /// forwarded in the old one.
    pub(super) fn expire_forwarded(&mut self, t: Time) {
        let term = match &self.state {
            State::Serving(core) => core.replica().map_or(0, |r| r.raft().term()),
            _ => 0,
        };
        self.close_sessions_of_old_leader(term);
        let expired: Vec<(SessionId, u64)> = self
            .forwarded
            .iter()
            .filter(|(_, w)| t.mono_ms >= w.deadline_mono_ms || w.term < term)
            .map(|(k, _)| *k)
            .collect();
        for (session, r) in expired {
            self.forwarded.remove(&(session, r));
            let e = ProtoError::new(
                ErrorCode::Unavailable,
                "the shard's leader did not answer in time (or leadership changed); retry, \
                 with the same idempotency key",
            );
            self.effects.push_back(Effect::Replies {
                session,
                replies: vec![Reply::Frame(ServerOp::error(Some(r), e))],
            });
        }
    }

    /// The leader these local sessions were forwarded to was replaced (a newer term): their
    /// attachment there (the inbox being delivered, subscriptions) is gone, and no new leader
    /// knows them. Each session is told (`LeaderChanged`) and attaches again at the new
    /// leader from where it was (`ShardOp::Attach`); left alone, it would silently stop
    /// receiving.
    fn close_sessions_of_old_leader(&mut self, term: u64) {
        if self.forward_term.is_none_or(|ft| term <= ft) {
            return;
        }
        self.forward_term = None;
        let local: Vec<SessionId> = self
            .sessions
            .iter()
            .copied()
            .filter(|s| self.is_local(*s))
            .collect();
        for session in local {
            self.attach_again(session);
        }
    }

    /// The node is stopping: a replica that leads hands its leadership to the voter whose log
    /// is furthest along (raft's transfer: it catches that voter up, then tells it to
    /// campaign at once), so the group elects without waiting out an election timeout. True
    /// if a transfer started.
    pub fn handle_stop(&mut self, t: Time) -> bool {
        let State::Serving(core) = &mut self.state else {
            return false;
        };
        let Some(r) = core.replica_mut() else {
            return false;
        };
        if r.mode() != Mode::Leading {
            return false;
        }
        let raft = r.raft();
        let me = raft.id();
        let target = raft
            .membership()
            .voters
            .iter()
            .filter(|v| **v != me)
            .filter_map(|v| raft.progress(*v).map(|(_, m)| (m, *v)))
            .max();
        let started = target.is_some_and(|(_, to)| r.transfer_leadership(t.mono_ms, to).is_ok());
        self.pump(t);
        started
    }

    /// A leadership transfer (see `handle_stop`) is still under way.
    pub fn transferring(&self) -> bool {
        self.replica().is_some_and(|r| r.raft().transferring())
    }

    /// The earliest deadline of a forwarded request.
    pub(super) fn forward_deadline(&self) -> Option<u64> {
        self.forwarded.values().map(|w| w.deadline_mono_ms).min()
    }
}

/// Makes room for `session` in a numbering map holding at most `max` sessions: the lowest
/// session id's entry goes (see [`REMOTE_SESSIONS_MAX`]).
fn bound_sessions<V>(
    map: &mut std::collections::BTreeMap<SessionId, V>,
    session: SessionId,
    max: usize,
) {
    if !map.contains_key(&session) && map.len() >= max {
        map.pop_first();
    }
}
