//! A session survives its shards' leader changes. In a cluster, a shard's state for a session
//! (the peer's inbox being delivered to it, its subscriptions) lives on the shard's leader
//! only; a new leader does not have it. The session keeps what it needs to take up where it
//! was, and attaches again at the new leader (`ShardOp::Attach`):
//!
//! - the highest inbox `pos` it handed its client (the new leader delivers from after it, or
//!   from the peer's cursor if that is further), and for each subscription the next `seq` it
//!   has not handed out;
//! - pushes at or below those marks are dropped (a deposed leader's late frames, or a second
//!   attach's overlap), and so is whatever a shard pushes while an attach to it is under way
//!   (the attachment being replaced pushed it), so each message reaches the client once per
//!   session, in increasing `pos`, and each event once per subscription, as docs/PROTOCOL.md
//!   promises;
//! - an attach answered `unavailable` (no leader known yet, an election under way) is tried
//!   again every [`REATTACH_RETRY_MS`]; one not done within `request_timeout_ms` of the leader
//!   change closes the session as before (`unavailable`: the client resumes).
//!
//! A subscription the client adds while an attach is under way: the attach replaces what the
//! shard holds for the session, so once the shard has taken the `subscribe` (its `ok` came
//! back), the pending attach names it too, and if an attach is already out (it may reach the
//! shard after the subscribe and end it) a new attempt goes out naming it.
//!
//! Size: one entry per shard being re-attached (at most the node's shard count), each naming
//! at most the session's subscriptions.

use crate::{Session, State};
use fabric_proto::internal::{Placement, Route, ShardIdx, ShardOp};
use fabric_proto::{ConvId, ErrorCode, ProtoError, ServerOp};
use std::collections::BTreeMap;

/// Wait between attach attempts that were answered `unavailable`.
pub const REATTACH_RETRY_MS: u64 = 100;

/// A subscription's mark: the next seq the session has not handed to the client.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SubMark {
    pub(crate) next: u64,
    /// Set once an attach took the subscription up at a new leader: events below `next` are
    /// then ones the client has. Until then nothing is dropped (a client's own subscribe to
    /// an earlier seq replays on purpose).
    pub(crate) attached: bool,
    /// The `from` of the client's latest `subscribe` (at least 1): no event below it belongs
    /// to the subscription the client now holds. One below it was pushed for an earlier
    /// subscribe whose outcome the client was told is unknown (answered `unavailable`) and
    /// that took effect late, after a leader change; it is dropped.
    pub(crate) floor: u64,
    /// The ref of the client's latest `subscribe`. Its `ok` restarts the marks at `floor` and
    /// sets `attached`: from then on an event below `next` is a replay the client did not ask
    /// for (an earlier subscribe answered `unavailable` that took effect after this one), and
    /// is dropped.
    pub(crate) latest_ref: u64,
}

/// One shard the session is attaching to again.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The session closes if the shard has not confirmed the attach by then.
    pub(crate) give_up_at: u64,
    /// When to send the attach again (`None`: one is out, waiting for its answer).
    pub(crate) retry_at: Option<u64>,
    /// Whether the session's inbox is on this shard.
    pub(crate) inbox: bool,
    /// The subscribed conversations on this shard: those when its leader changed, and each
    /// the shard took a `subscribe` for since.
    pub(crate) convs: Vec<ConvId>,
    /// The latest attach sent: only its answer counts (an earlier one's may come later).
    pub(crate) attempt: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Reattaching {
    pending: BTreeMap<ShardIdx, Pending>,
}

impl Reattaching {
    /// A leader change on `shard`: an attach goes out now. A change while one is under way
    /// keeps its first deadline (the session must not wait forever on a flapping shard).
    pub(crate) fn start(&mut self, shard: ShardIdx, p: Pending) {
        let give_up_at = self
            .pending
            .get(&shard)
            .map_or(p.give_up_at, |old| old.give_up_at.min(p.give_up_at));
        self.pending.insert(shard, Pending { give_up_at, ..p });
    }

    /// The shard attached the session: done.
    pub(crate) fn done(&mut self, shard: ShardIdx) -> bool {
        self.pending.remove(&shard).is_some()
    }

    /// Whether `attempt` is the latest attach sent to `shard` (an answer to an older one is
    /// ignored: a later leader change superseded it).
    pub(crate) fn is_latest(&self, shard: ShardIdx, attempt: u64) -> bool {
        self.pending
            .get(&shard)
            .is_some_and(|p| p.attempt == attempt)
    }

    /// The attach was refused as `unavailable`: true if it is tried again (at `now` plus
    /// [`REATTACH_RETRY_MS`]), false if the deadline has passed or none is under way.
    pub(crate) fn retry_later(&mut self, now: u64, shard: ShardIdx) -> bool {
        match self.pending.get_mut(&shard) {
            Some(p) if now < p.give_up_at => {
                p.retry_at = Some(now.saturating_add(REATTACH_RETRY_MS));
                true
            }
            _ => false,
        }
    }

    /// Shards whose attach is due again at `now` (marked as sent).
    pub(crate) fn due(&mut self, now: u64) -> Vec<ShardIdx> {
        let mut out = Vec::new();
        for (shard, p) in self.pending.iter_mut() {
            if p.retry_at.is_some_and(|at| at <= now) && now < p.give_up_at {
                p.retry_at = None;
                out.push(*shard);
            }
        }
        out
    }

    /// A shard past its deadline, if any.
    pub(crate) fn expired(&self, now: u64) -> Option<ShardIdx> {
        self.pending
            .iter()
            .find(|(_, p)| now >= p.give_up_at)
            .map(|(shard, _)| *shard)
    }

    /// The next time something is due.
    pub(crate) fn poll_timeout(&self) -> Option<u64> {
        self.pending
            .values()
            .map(|p| p.retry_at.map_or(p.give_up_at, |r| r.min(p.give_up_at)))
            .min()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether an attach to `shard` is under way.
    pub(crate) fn contains(&self, shard: ShardIdx) -> bool {
        self.pending.contains_key(&shard)
    }
}

impl Session {
    /// The leader of `shard` changed and the new one does not know this session
    /// (`CloseReason::LeaderChanged`). An open session attaches again there: its inbox if
    /// the mesh lives on `shard`, and its subscriptions that do; `shard_of` is the node's
    /// placement (the router's). A session still authenticating cannot: its hello's answer
    /// is lost, so it closes as after a restart.
    pub fn handle_shard_detached(
        &mut self,
        now: u64,
        shard: ShardIdx,
        shard_of: &dyn Fn(Placement<'_>) -> Option<ShardIdx>,
    ) {
        if self.is_closed() {
            return;
        }
        let State::Open { mesh, .. } = &self.state else {
            return self.handle_shard_restarted(now, shard);
        };
        self.stats.leader_changes += 1;
        let inbox = shard_of(Placement::Mesh(mesh)) == Some(shard);
        let mut convs: Vec<ConvId> = self
            .subscriptions
            .keys()
            .filter(|c| shard_of(Placement::Conversation(mesh, c)) == Some(shard))
            .cloned()
            .collect();
        if !inbox && convs.is_empty() {
            return; // nothing of this session lived there
        }
        convs.sort();
        let p = Pending {
            give_up_at: now.saturating_add(self.config.request_timeout_ms),
            retry_at: None,
            inbox,
            convs,
            attempt: 0,
        };
        self.reattach.start(shard, p);
        self.send_attach(shard);
    }

    /// The shard answered a `subscribe` to `conv` (ref `r`) with `ok`; `late` if the session
    /// had answered it `unavailable` at its deadline already.
    ///
    /// - The client's latest subscribe, answered in time: the shard replays from its `from`,
    ///   so the marks restart there, and nothing below what it then hands out is pushed again
    ///   (a replay of an earlier subscribe that took effect after it is dropped).
    /// - If an attach to `shard` is under way, it must name the subscription, or it would end
    ///   it (module docs): an attach already out goes out again, as a new attempt.
    pub(crate) fn subscribe_ok(&mut self, shard: ShardIdx, r: u64, conv: ConvId, late: bool) {
        if let Some(m) = self.subscriptions.get_mut(&conv) {
            if m.latest_ref == r && !late {
                m.next = m.floor;
                m.attached = true;
            }
        }
        let Some(p) = self.reattach.pending.get_mut(&shard) else {
            return;
        };
        if p.convs.contains(&conv) {
            return;
        }
        p.convs.push(conv);
        p.convs.sort();
        if p.retry_at.is_none() {
            self.send_attach(shard);
        }
    }

    /// Sends `shard` its pending attach, built from what the session handed its client so
    /// far, as a new attempt.
    fn send_attach(&mut self, shard: ShardIdx) {
        let (State::Open { mesh, peer }, Some(p)) =
            (&self.state, self.reattach.pending.get_mut(&shard))
        else {
            return;
        };
        let mut subs = Vec::with_capacity(p.convs.len());
        for c in &p.convs {
            if let Some(m) = self.subscriptions.get_mut(c) {
                m.attached = true;
                subs.push((c.clone(), m.next));
            }
        }
        self.attach_attempts += 1;
        p.attempt = self.attach_attempts;
        let op = ShardOp::Attach {
            mesh: mesh.clone(),
            peer: peer.clone(),
            inbox_after: p.inbox.then_some(self.delivered_pos),
            subs,
            attempt: p.attempt,
        };
        self.forward(Route::Shard(shard), op);
    }

    /// The shard's answer to an attach: done, tried again later (`unavailable`), or the end
    /// of the session (the peer is gone, or the deadline passed).
    pub(crate) fn handle_attached(
        &mut self,
        now: u64,
        shard: ShardIdx,
        attempt: u64,
        refused: Option<(ErrorCode, String)>,
    ) {
        if !self.reattach.is_latest(shard, attempt) {
            return; // superseded by a later attach (or none is under way)
        }
        self.settle_attach(now, shard, refused);
    }

    /// The latest attach's outcome.
    fn settle_attach(&mut self, now: u64, shard: ShardIdx, refused: Option<(ErrorCode, String)>) {
        match refused {
            None => {
                if self.reattach.done(shard) {
                    self.stats.reattached += 1;
                }
            }
            Some((ErrorCode::Unavailable, _)) if self.reattach.retry_later(now, shard) => {}
            Some((code, message)) => {
                self.reattach.done(shard);
                self.stats.reattach_failed += 1;
                self.error(
                    None,
                    ProtoError::new(
                        code,
                        format!(
                            "shard {shard}'s leader changed and this session could not attach \
                             to the new one ({message}); reconnect to resume"
                        ),
                    ),
                );
                self.close(now);
            }
        }
    }

    /// Attaches due again go out; one past its deadline closes the session.
    pub(crate) fn reattach_timeout(&mut self, now: u64) {
        if self.reattach.is_empty() {
            return;
        }
        if let Some(shard) = self.reattach.expired(now) {
            let timeout_ms = self.config.request_timeout_ms;
            let why =
                format!("no new leader confirmed within request_timeout_ms ({timeout_ms} ms)");
            return self.settle_attach(now, shard, Some((ErrorCode::Unavailable, why)));
        }
        for shard in self.reattach.due(now) {
            self.send_attach(shard);
        }
    }

    /// A delivery or event from `shard`: handed to the client unless it already has it in
    /// this session (at or below the marks an attach starts from), or it comes while an
    /// attach to `shard` is under way: then it was pushed by the attachment being replaced
    /// (the shard answers the attach before anything it pushes from the marks), and taking it
    /// would move the marks past what the attach replays.
    pub(crate) fn handle_push(&mut self, now: u64, shard: ShardIdx, op: ServerOp) {
        let fresh = !self.reattach.contains(shard)
            && match &op {
                ServerOp::Deliver { pos, .. } => {
                    let fresh = *pos > self.delivered_pos;
                    self.delivered_pos = self.delivered_pos.max(*pos);
                    fresh
                }
                ServerOp::Event(e) => match self.subscriptions.get_mut(&*e.conv) {
                    Some(m) if e.seq < m.floor || (m.attached && e.seq < m.next) => false,
                    Some(m) => {
                        m.next = e.seq + 1;
                        true
                    }
                    // Unsubscribed, with events still on their way: passed on as before.
                    None => true,
                },
                _ => true,
            };
        if fresh {
            return self.push_frame(&op, Some(shard));
        }
        // Its push credit returns at once: the client will never write it.
        self.stats.pushes_duplicate += 1;
        self.handle_credit_released(now, shard, 1);
    }
}
