//! Inboxes: direct, group and broadcast sends (one record each, at-least-once delivery from
//! the inbox), and cursor moves (coalesced into one record per peer per group commit).

use super::ok;
use crate::keys::{KeyScope, Parked, ParkedOp, SentAt};
use crate::mesh::Mesh;
use crate::record::*;
use crate::Shard;
use fabric_proto::internal::{Reply, SessionId};
use fabric_proto::{ErrorCode, ProtoError, Target};
use std::sync::Arc;

impl Shard {
    /// A send, in its sender's order: behind a key lookup of the sender under way, if any.
    pub(super) fn send(
        &mut self,
        session: SessionId,
        r: u64,
        rec: SentRec,
    ) -> Result<(), ProtoError> {
        self.check_body(&rec.body)?;
        let op = ParkedOp::Send(rec);
        self.take_in_order(Parked { session, r, op })
    }

    /// A send taken in its turn: a retried key answered with its original position (looked
    /// up on disk first when only a sealed segment may hold it, if `look_up`), else a new
    /// message at the mesh's next position.
    pub(crate) fn send_taken(
        &mut self,
        session: SessionId,
        r: u64,
        mut rec: SentRec,
        look_up: bool,
    ) -> Result<(), ProtoError> {
        if let Some(k) = rec.key.clone() {
            let exact = (rec.mesh.clone(), rec.from.clone(), k.clone());
            if let Some(&SentAt { pos, .. }) = self.keys.sent.get(&exact) {
                let durable = self
                    .meshes
                    .get(&rec.mesh)
                    .is_some_and(|m| pos <= m.durable_pos);
                self.answer_retry(session, Reply::Frame(ok(r, Some(pos), None)), durable);
                return Ok(());
            }
            let scope = KeyScope::Sender(rec.mesh.clone(), rec.from.clone());
            let forget = self.config.planted.forget_sealed_send_keys;
            let segments = if look_up && !forget {
                self.key_candidates(&scope, &k)
            } else {
                Vec::new()
            };
            if !segments.is_empty() {
                let op = ParkedOp::Send(rec);
                self.park_for_lookup(Parked { session, r, op }, segments);
                return Ok(());
            }
        }
        let (peer_max, mesh_max) = (
            self.config.inbox_backlog_bytes_max,
            self.config.mesh_inbox_backlog_bytes_max,
        );
        let m = self.mesh_mut(&rec.mesh)?;
        check_target(m, &rec.to)?;
        let from_idx = m.ensure_peer(&rec.from);
        let stored_to = m.stored_target(&rec.to);
        let recipients = m.recipients(from_idx, &stored_to);
        let bytes = rec.body.len() as u64;
        if let Err(e) = check_backlog(m, &recipients, bytes, peer_max, mesh_max) {
            self.stats.sends_refused_inbox_full += 1;
            return Err(e);
        }
        rec.pos = m.head + 1;
        let pos = rec.pos;
        let lsn = self.propose(Record::Sent(rec))?;
        self.ack_at(lsn, session, Reply::Frame(ok(r, Some(pos), None)));
        Ok(())
    }

    pub(super) fn ack(
        &mut self,
        mesh: &Arc<str>,
        peer: &Arc<str>,
        upto: u64,
    ) -> Result<(), ProtoError> {
        let lose_cursor_update = self.config.planted.lose_cursor_update;
        let m = self.mesh_mut(mesh)?;
        let Some(&idx) = m.peer_index.get(peer) else {
            return Err(ProtoError::new(
                ErrorCode::NotFound,
                "ack from an unknown peer",
            ));
        };
        let upto = upto.min(m.durable_pos);
        if upto <= m.peers[idx as usize].acked {
            return Ok(());
        }
        let dropped = m.advance_cursor(idx, upto);
        let released = std::mem::take(&mut m.cache_released);
        // One cursor record per peer per group commit, however often it acks: the record is
        // framed with the peer's latest cursor in `poll_wal`.
        let p = &mut m.peers[idx as usize];
        let log_it = !p.cursor_unlogged && !lose_cursor_update;
        if log_it {
            p.cursor_unlogged = true;
        }
        for (_, lsn) in dropped {
            self.inbox_by_lsn.remove(&lsn);
        }
        self.cache_bytes -= released;
        if log_it {
            self.unlogged_cursors.push((mesh.clone(), idx));
        }
        Ok(())
    }
}

/// `not_found` for a direct send to a peer the mesh does not have.
fn check_target(m: &Mesh, to: &Target) -> Result<(), ProtoError> {
    if let Target::Peer(p) = to {
        if m.peer_index
            .get(p.as_str())
            .is_none_or(|i| m.peers[*i as usize].placeholder)
        {
            return Err(ProtoError::new(
                ErrorCode::NotFound,
                format!("peer {p:?} is not a member of mesh {:?}", m.id),
            ));
        }
    }
    Ok(())
}

/// `inbox_full` if the message would grow a recipient's or the mesh's backlog past its limit.
fn check_backlog(
    m: &Mesh,
    recipients: &[u32],
    bytes: u64,
    peer_max: u64,
    mesh_max: u64,
) -> Result<(), ProtoError> {
    for r in recipients {
        let p = &m.peers[*r as usize];
        if p.backlog_bytes + bytes > peer_max {
            return Err(ProtoError::new(
                ErrorCode::InboxFull,
                format!(
                    "peer {:?} holds {} bytes of unacknowledged messages; {bytes} more would pass \
                     the limit of {peer_max} (inbox_backlog_bytes_max); retry once it acknowledges",
                    p.id, p.backlog_bytes
                ),
            ));
        }
    }
    if !recipients.is_empty() && m.backlog_bytes + bytes > mesh_max {
        return Err(ProtoError::new(
            ErrorCode::InboxFull,
            format!(
                "mesh {:?} holds {} bytes of unacknowledged messages; {bytes} more would pass \
                 the limit of {mesh_max} (mesh_inbox_backlog_bytes_max)",
                m.id, m.backlog_bytes
            ),
        ));
    }
    Ok(())
}
