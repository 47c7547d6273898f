//! One handler per request, in a module per family: `mesh` (meshes, peers, hellos), `inbox`
//! (sends, cursor moves), `conversation` (appends, subscriptions, reads), `session` (credit,
//! close). A write validates first (everything input controls, sizes included), then
//! proposes its record through the one apply path (`crate::apply`), so a refusal leaves
//! nothing behind; the record's LSN decides when its `ok` may leave.

mod conversation;
mod inbox;
mod mesh;
mod session;

use crate::mesh::Mesh;
use crate::record::*;
use crate::Shard;
use fabric_proto::internal::{Reply, Request, ShardOp};
use fabric_proto::{Body, ErrorCode, ProtoError, ServerOp};
use std::sync::Arc;

pub(crate) fn ok(r: u64, pos: Option<u64>, seq: Option<u64>) -> ServerOp {
    ServerOp::Ok { r, pos, seq }
}

impl Shard {
    /// Validates one request and hands it to its handler, which proposes the record (if
    /// any) through the one apply path (`apply`). An error leaves no state behind.
    // Over 70 lines: one arm per op (an exhaustive dispatch; each arm calls its handler).
    pub(crate) fn handle_op(&mut self, now: u64, req: Request) -> Result<(), ProtoError> {
        let session = req.session;
        if req.op.is_write() {
            self.refuse_write(now)?;
        }
        match req.op {
            ShardOp::CreateMesh { r, mesh } => self.create_mesh(session, r, mesh.into()),
            ShardOp::AddPeer {
                r,
                mesh,
                peer,
                groups,
                token_hash,
                public_key,
            } => {
                // Past this dispatch the shard keeps ids as the strings its records hold.
                let rec = PeerKeyRec {
                    mesh: mesh.into(),
                    peer: peer.into(),
                    groups: groups.into_iter().map(Into::into).collect(),
                    token_hash,
                    public_key: public_key.unwrap_or_default(),
                };
                self.add_peer(session, r, rec, public_key.is_some())
            }
            ShardOp::Hello {
                mesh,
                peer,
                token,
                proof,
            } => self.hello(now, session, mesh.into(), peer.into(), &token, proof),
            ShardOp::Auth { r, mesh, token, .. } => self.auth(session, r, &mesh.into(), &token),
            ShardOp::Send {
                r,
                mesh,
                from,
                to,
                body,
                key,
            } => {
                let rec = SentRec {
                    mesh: mesh.into(),
                    pos: 0,
                    from: from.into(),
                    to,
                    body,
                    ts: now,
                    key,
                };
                self.send(session, r, rec)
            }
            ShardOp::Append {
                r,
                mesh,
                conv,
                from,
                body,
                key,
            } => {
                let rec = AppendedRec {
                    mesh: mesh.into(),
                    conv: conv.into(),
                    seq: 0,
                    from: from.into(),
                    body,
                    key,
                    ts: now,
                };
                self.append(session, r, rec)
            }
            ShardOp::Subscribe {
                r,
                mesh,
                conv,
                from,
            } => self.subscribe(session, r, (mesh.into(), conv.into()), from),
            ShardOp::Unsubscribe { r, mesh, conv } => {
                self.unsubscribe(session, &(mesh.into(), conv.into()));
                self.emit(session, Reply::Frame(ok(r, None, None)));
                Ok(())
            }
            ShardOp::Read {
                r,
                mesh,
                conv,
                from,
                limit,
                local: _,
            } => self.read(session, r, (mesh.into(), conv.into()), from, limit),
            ShardOp::Ack { mesh, peer, upto } => self.ack(&mesh.into(), &peer.into(), upto),
            ShardOp::Flushed { frames } => {
                self.flushed(session, frames);
                Ok(())
            }
            ShardOp::Closed => {
                self.detach(session);
                Ok(())
            }
            ShardOp::Attach {
                mesh,
                peer,
                inbox_after,
                subs,
                attempt,
            } => {
                // Answered with its own reply, success or not: the session waits for it.
                let refused = self
                    .attach(session, mesh.into(), &peer, inbox_after, subs)
                    .err()
                    .map(|e| (e.code, e.message));
                self.emit(session, Reply::Attached { attempt, refused });
                Ok(())
            }
        }
    }

    pub(super) fn check_body(&self, body: &Body) -> Result<(), ProtoError> {
        if body.len() > self.config.body_bytes_max {
            return Err(ProtoError::new(
                ErrorCode::TooLarge,
                format!(
                    "body is {} bytes; the limit is {} (body_bytes_max)",
                    body.len(),
                    self.config.body_bytes_max
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn mesh_mut(&mut self, mesh: &Arc<str>) -> Result<&mut Mesh, ProtoError> {
        self.meshes
            .get_mut(mesh)
            .filter(|m| m.exists)
            .ok_or_else(|| ProtoError::new(ErrorCode::NotFound, format!("no mesh {mesh:?}")))
    }
}

/// The answer to a request while its shard is down (between incarnations, or stopped after a
/// failure an operator must look at): `unavailable` for every request that is answered at
/// all, with `reason`. Sans-IO, so every host answers the same.
pub fn unavailable_reply(req: &Request, reason: &str) -> Option<fabric_proto::internal::Output> {
    let error = |r| {
        let e = ProtoError::new(ErrorCode::Unavailable, reason.to_string());
        Some(fabric_proto::internal::Output {
            session: req.session,
            reply: Reply::Frame(ServerOp::error(r, e)),
        })
    };
    match &req.op {
        ShardOp::Hello { .. } => error(None),
        ShardOp::Attach { attempt, .. } => Some(fabric_proto::internal::Output {
            session: req.session,
            reply: Reply::Attached {
                attempt: *attempt,
                refused: Some((ErrorCode::Unavailable, reason.to_string())),
            },
        }),
        op => op.reference().and_then(|r| error(Some(r))),
    }
}
