//! Conversations: appends (dense seqs, idempotency keys), subscriptions that tail them, and
//! reads of a range. Only appends propose records.

use super::ok;
use crate::conv::delivered;
use crate::keys::{KeyScope, Parked, ParkedOp};
use crate::record::*;
use crate::{Shard, Sub};
use fabric_proto::internal::{Reply, SessionId};
use fabric_proto::{ErrorCode, ProtoError};
use std::sync::Arc;

impl Shard {
    pub(super) fn append(
        &mut self,
        session: SessionId,
        r: u64,
        rec: AppendedRec,
    ) -> Result<(), ProtoError> {
        self.check_body(&rec.body)?;
        let op = ParkedOp::Append(rec);
        self.take_in_order(Parked { session, r, op })
    }

    /// An append taken in its turn: a retried key answered with its original seq (looked up
    /// on disk first when only a sealed segment may hold it, if `look_up`), else a new entry.
    pub(crate) fn append_taken(
        &mut self,
        session: SessionId,
        r: u64,
        mut rec: AppendedRec,
        look_up: bool,
    ) -> Result<(), ProtoError> {
        let ck = (rec.mesh.clone(), rec.conv.clone());
        if let Some(c) = self.convs.get(&ck) {
            if let Some(&seq) = rec.key.as_ref().and_then(|k| c.keys.get(k)) {
                // A retry: answered with the original seq once the original is durable.
                let durable = seq <= c.durable_seq;
                if durable {
                    self.stats.appends_acked += 1;
                }
                self.answer_retry(session, Reply::Frame(ok(r, None, Some(seq))), durable);
                return Ok(());
            }
        }
        if let (true, Some(k)) = (look_up, rec.key.as_ref()) {
            let segments = self.key_candidates(&KeyScope::Conv(ck.clone()), k);
            if !segments.is_empty() {
                let op = ParkedOp::Append(rec);
                self.park_for_lookup(Parked { session, r, op }, segments);
                return Ok(());
            }
        }
        let head = self.convs.get(&ck).map_or(0, |c| c.head);
        if head == 0 {
            self.check_conversation_count(&rec.mesh)?;
        }
        rec.seq = head + 1;
        let seq = rec.seq;
        let lsn = self.propose(Record::Appended(rec))?;
        self.ack_at(lsn, session, Reply::Frame(ok(r, None, Some(seq))));
        Ok(())
    }

    fn check_conversation_count(&self, mesh: &Arc<str>) -> Result<(), ProtoError> {
        let held = self.mesh_convs.get(mesh).copied().unwrap_or(0);
        if held >= self.config.mesh_conversations_max {
            return Err(ProtoError::new(
                ErrorCode::TooLarge,
                format!(
                    "mesh {mesh:?} has {held} conversations on this shard; the limit is {} \
                     (mesh_conversations_max); append to an existing conversation",
                    self.config.mesh_conversations_max
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn subscribe(
        &mut self,
        session: SessionId,
        r: u64,
        ck: (Arc<str>, Arc<str>),
        from: u64,
    ) -> Result<(), ProtoError> {
        self.subscribe_from(session, ck, from)?;
        // The ok goes out before any event of the subscription.
        self.emit(session, Reply::Frame(ok(r, None, None)));
        self.queue_drain(session);
        Ok(())
    }

    /// Subscribes `session` to a conversation from seq `from` (replay, then tail), or moves
    /// its subscription there; no answer (the caller's).
    pub(super) fn subscribe_from(
        &mut self,
        session: SessionId,
        ck: (Arc<str>, Arc<str>),
        from: u64,
    ) -> Result<(), ProtoError> {
        let max = self.config.session_subscriptions_max as usize;
        let s = self.session_state(session);
        let next_seq = from.max(1);
        let held = s.subs.len();
        match s.subs.iter_mut().find(|x| x.key == ck) {
            Some(sub) => {
                // A read under way for the old position is ignored when it lands.
                sub.next_seq = next_seq;
                sub.reading = None;
                sub.resume = None;
            }
            None if held >= max => {
                return Err(ProtoError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "this session holds {max} subscriptions on this shard; the limit is \
                         {max} (session_subscriptions_max); unsubscribe first"
                    ),
                ))
            }
            None => s.subs.push(Sub {
                key: ck.clone(),
                next_seq,
                reading: None,
                resume: None,
            }),
        }
        let c = self.convs.entry(ck).or_default();
        if !c.subscribers.contains(&session) {
            c.subscribers.push(session);
        }
        Ok(())
    }

    pub(super) fn unsubscribe(&mut self, session: SessionId, ck: &(Arc<str>, Arc<str>)) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.subs.retain(|x| &x.key != ck);
        }
        self.release_conv_listener(ck, session);
    }

    /// Drops `session` from a conversation's subscribers, and the conversation itself if it
    /// never had an entry and nobody listens any more.
    pub(super) fn release_conv_listener(&mut self, ck: &(Arc<str>, Arc<str>), session: SessionId) {
        if let Some(c) = self.convs.get_mut(ck) {
            c.unsubscribe(session);
            if c.head == 0 && c.is_idle() {
                self.convs.remove(ck);
            }
        }
    }

    /// Up to `limit` durable entries from `from`: from the log cache when it holds them all,
    /// else through disk reads (the answer then comes when they are done).
    pub(super) fn read(
        &mut self,
        session: SessionId,
        r: u64,
        ck: (Arc<str>, Arc<str>),
        from: u64,
        limit: u32,
    ) -> Result<(), ProtoError> {
        let limit = limit.min(fabric_proto::READ_LIMIT_MAX) as u64;
        let Some(c) = self.convs.get(&ck) else {
            let reply = Reply::Messages {
                r,
                events: Vec::new(),
                head: 0,
            };
            self.emit(session, reply);
            return Ok(());
        };
        let start = from.max(c.first_seq);
        let last = start.saturating_add(limit).saturating_sub(1);
        let end = c.durable_seq.min(last);
        let head = c.durable_seq;
        if start <= end && start < c.cached_from() {
            return self.read_from_disk(session, r, ck, (start, last));
        }
        let events = (start..=end)
            .filter_map(|seq| c.cached(seq))
            .map(|e| delivered(&ck.1, e))
            .collect();
        self.emit(session, Reply::Messages { r, events, head });
        Ok(())
    }
}
