//! Inboxes: direct, group and broadcast sends (one record each, at-least-once delivery from
//! the inbox), and cursor moves (coalesced into one record per peer per group commit).

use super::ok;
use crate::mesh::Mesh;
use crate::record::*;
use crate::Shard;
use fabric_proto::internal::{Reply, SessionId};
use fabric_proto::{Body, ErrorCode, ProtoError, Target};
use std::sync::Arc;

impl Shard {
    #[allow(clippy::too_many_arguments)] // one per field of the op, as the request carries them
    pub(super) fn send(
        &mut self,
        now: u64,
        session: SessionId,
        r: u64,
        mesh: Arc<str>,
        from: Arc<str>,
        to: Target,
        body: Body,
    ) -> Result<(), ProtoError> {
        self.check_body(&body)?;
        let (peer_max, mesh_max) = (
            self.config.inbox_backlog_bytes_max,
            self.config.mesh_inbox_backlog_bytes_max,
        );
        let m = self.mesh_mut(&mesh)?;
        if let Target::Peer(p) = &to {
            if m.peer_index
                .get(p.as_str())
                .is_none_or(|i| m.peers[*i as usize].placeholder)
            {
                return Err(ProtoError::new(
                    ErrorCode::NotFound,
                    format!("peer {p:?} is not a member of mesh {mesh:?}"),
                ));
            }
        }
        let from_idx = m.ensure_peer(&from);
        let stored_to = m.stored_target(&to);
        let recipients = m.recipients(from_idx, &stored_to);
        let bytes = body.len() as u64;
        if let Err(e) = check_backlog(m, &recipients, bytes, peer_max, mesh_max) {
            self.stats.sends_refused_inbox_full += 1;
            return Err(e);
        }
        let pos = m.head + 1;
        let rec = SentRec {
            mesh,
            pos,
            from,
            to,
            body,
            ts: now,
        };
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
