//! A session's state in this shard: made on its first attaching request, credit returned as
//! it writes, and dropped (with its subscriptions) when it closes. None of it is durable.

use crate::{SessionState, Shard};
use fabric_proto::internal::SessionId;
use fabric_proto::{ConvId, ErrorCode, ProtoError};
use std::sync::Arc;

/// The refusal of an attach for a peer the shard no longer has.
fn gone(mesh: &str, peer: &str) -> ProtoError {
    ProtoError::new(
        ErrorCode::Unauthorized,
        format!("peer {peer:?} of mesh {mesh:?} no longer exists here; hello again"),
    )
}

impl Shard {
    /// The shard's state for a session, made on its first attaching request.
    pub(crate) fn session_state(&mut self, session: SessionId) -> &mut SessionState {
        let credit = self.config.push_credit_frames_max;
        self.sessions
            .entry(session)
            .or_insert_with(|| SessionState {
                credit,
                queued: false,
                inbox: None,
                subs: Vec::new(),
                hello_nonce: None,
                inbox_reading: None,
            })
    }

    /// The session wrote `frames` pushed frames: their push credit returns, and a drain may
    /// go on.
    pub(super) fn flushed(&mut self, session: SessionId, frames: u32) {
        let max = self.config.push_credit_frames_max;
        if let Some(s) = self.sessions.get_mut(&session) {
            s.credit = s.credit.saturating_add(frames).min(max);
            self.queue_drain(session);
        }
    }

    /// `attach`: a session its node authenticated before this shard's leader changed takes up
    /// where it was. What the shard held for it is dropped first, so a repeated attach (the
    /// node retrying, or a second leader change) replaces rather than adds. The peer must
    /// still exist (the node vouches for the hello it checked, not for what changed since);
    /// the inbox is delivered from after `inbox_after` or the peer's cursor, whichever is
    /// further, and each subscription from its next seq.
    pub(super) fn attach(
        &mut self,
        session: SessionId,
        mesh: Arc<str>,
        peer: &str,
        inbox_after: Option<u64>,
        subs: Vec<(ConvId, u64)>,
    ) -> Result<(), ProtoError> {
        self.detach(session);
        if let Some(after) = inbox_after {
            let m = self
                .meshes
                .get_mut(&mesh)
                .filter(|m| m.exists)
                .ok_or_else(|| gone(&mesh, peer))?;
            let idx = *m.peer_index.get(peer).ok_or_else(|| gone(&mesh, peer))?;
            let p = &m.peers[idx as usize];
            if p.placeholder {
                return Err(gone(&mesh, peer));
            }
            let next = p.acked.max(after) + 1;
            m.sessions.push(session);
            self.session_state(session).inbox = Some((mesh.clone(), idx, next));
        }
        for (conv, next) in subs {
            if let Err(e) = self.subscribe_from(session, (mesh.clone(), conv.into()), next) {
                self.detach(session);
                return Err(e);
            }
        }
        // Made afresh after the detach above, so its push credit is full again: what the
        // session's node wrote before is forgotten with the old leader (or lost on a link).
        self.session_state(session);
        self.queue_drain(session);
        Ok(())
    }

    pub(super) fn detach(&mut self, session: SessionId) {
        self.drop_reads_of(session);
        let Some(s) = self.sessions.remove(&session) else {
            return;
        };
        if let Some((mesh, _, _)) = s.inbox {
            if let Some(m) = self.meshes.get_mut(&mesh) {
                m.sessions.retain(|x| *x != session);
            }
        }
        for sub in s.subs {
            self.release_conv_listener(&sub.key, session);
        }
    }
}
