//! A session's state in this shard: made on its first attaching request, credit returned as
//! it writes, and dropped (with its subscriptions) when it closes. None of it is durable.

use crate::{SessionState, Shard};
use fabric_proto::internal::SessionId;

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
