//! Meshes and peers: creating them, and proving who a session speaks for (token or key
//! hello). Authentication changes no durable state; creation proposes one record each.

use super::ok;
use crate::record::*;
use crate::{token_hash, Shard};
use ed25519_dalek::{Signature, VerifyingKey};
use fabric_proto::hello::{hello_message, HELLO_SKEW_MS_MAX, SIGNATURE_BYTES};
use fabric_proto::internal::{HelloProof, Reply, SessionId};
use fabric_proto::{ErrorCode, ProtoError, ServerOp};
use std::sync::Arc;
use subtle::ConstantTimeEq;

impl Shard {
    pub(super) fn create_mesh(
        &mut self,
        session: SessionId,
        r: u64,
        mesh: Arc<str>,
    ) -> Result<(), ProtoError> {
        if self.meshes.get(&mesh).is_some_and(|m| m.exists) {
            return Err(ProtoError::new(
                ErrorCode::Conflict,
                format!("mesh {mesh:?} already exists"),
            ));
        }
        let lsn = self.propose(Record::MeshCreated(MeshRec { mesh }))?;
        self.ack_at(lsn, session, Reply::Frame(ok(r, None, None)));
        Ok(())
    }

    pub(super) fn add_peer(
        &mut self,
        session: SessionId,
        r: u64,
        rec: PeerKeyRec,
        has_key: bool,
    ) -> Result<(), ProtoError> {
        if rec.token_hash.is_none() && !has_key {
            return Err(ProtoError::bad_request(
                "a peer needs a token, a public key, or both",
            ));
        }
        if has_key {
            VerifyingKey::from_bytes(&rec.public_key).map_err(|_| {
                ProtoError::bad_request("the public key is not a valid ed25519 point")
            })?;
        }
        if rec.groups.len() > fabric_proto::PEER_GROUPS_MAX {
            return Err(ProtoError::new(
                ErrorCode::TooLarge,
                format!(
                    "a peer may be in at most {} groups",
                    fabric_proto::PEER_GROUPS_MAX
                ),
            ));
        }
        let m = self.mesh_mut(&rec.mesh)?;
        if m.peer_index
            .get(&rec.peer)
            .is_some_and(|i| !m.peers[*i as usize].placeholder)
        {
            return Err(ProtoError::new(
                ErrorCode::Conflict,
                format!("peer {:?} already exists in mesh {:?}", rec.peer, rec.mesh),
            ));
        }
        // Token-only peers keep the original record type.
        let record = match (rec.token_hash, has_key) {
            (Some(token_hash), false) => Record::PeerAdded(PeerRec {
                mesh: rec.mesh,
                peer: rec.peer,
                groups: rec.groups,
                token_hash,
            }),
            _ => Record::PeerKeyAdded(rec),
        };
        let lsn = self.propose(record)?;
        self.ack_at(lsn, session, Reply::Frame(ok(r, None, None)));
        Ok(())
    }

    pub(super) fn hello(
        &mut self,
        now: u64,
        session: SessionId,
        mesh: Arc<str>,
        peer: Arc<str>,
        token: &str,
        proof: Option<HelloProof>,
    ) -> Result<(), ProtoError> {
        let (acked, head, idx) = match proof {
            None => self.authenticate(&mesh, Some(&peer), token)?,
            Some(proof) => self.authenticate_key(now, session, &mesh, &peer, &proof)?,
        };
        let m = self
            .meshes
            .get_mut(&mesh)
            .expect("authenticated mesh exists");
        if !m.sessions.contains(&session) {
            m.sessions.push(session);
        }
        let s = self.session_state(session);
        s.inbox = Some((mesh, idx, acked + 1));
        self.emit(
            session,
            Reply::Frame(ServerOp::Welcome {
                session,
                acked,
                head,
                nodes: Vec::new(),
            }),
        );
        self.queue_drain(session);
        Ok(())
    }

    /// `auth` (admin tools): which peer a token belongs to.
    pub(super) fn auth(
        &mut self,
        session: SessionId,
        r: u64,
        mesh: &Arc<str>,
        token: &str,
    ) -> Result<(), ProtoError> {
        let (_, _, idx) = self.authenticate(mesh, None, token)?;
        let peer = self.meshes[mesh].peers[idx as usize].id.clone();
        self.emit(session, Reply::Authed { r, peer });
        Ok(())
    }

    fn authenticate(
        &self,
        mesh: &str,
        peer: Option<&str>,
        token: &str,
    ) -> Result<(u64, u64, u32), ProtoError> {
        let refuse = || {
            ProtoError::new(
                ErrorCode::Unauthorized,
                "unknown mesh, unknown peer or wrong token",
            )
        };
        let m = self
            .meshes
            .get(mesh)
            .filter(|m| m.exists)
            .ok_or_else(refuse)?;
        let hash = token_hash(token);
        let idx = match peer {
            Some(p) => *m.peer_index.get(p).ok_or_else(refuse)?,
            None => *m.token_index.get(&hash).ok_or_else(refuse)?,
        };
        let p = &m.peers[idx as usize];
        let token_ok = p
            .token_hash
            .is_some_and(|stored| bool::from(stored.ct_eq(&hash)));
        if p.placeholder || !token_ok {
            return Err(refuse());
        }
        Ok((p.acked, m.durable_pos, idx))
    }

    /// A key hello: the signature over the hello message with the nonce the session issued,
    /// verified with the peer's stored public key. The checks that do not depend on the peer
    /// (nonce reuse, clock skew, signature length) say which failed; every check that does
    /// (unknown mesh or peer, no key, a signature that does not verify) gives one message, so
    /// a refusal never reveals whether a mesh or peer exists.
    fn authenticate_key(
        &mut self,
        now: u64,
        session: SessionId,
        mesh: &str,
        peer: &str,
        proof: &HelloProof,
    ) -> Result<(u64, u64, u32), ProtoError> {
        let refuse = |message: String| ProtoError::new(ErrorCode::Unauthorized, message);
        // The nonce is single-use per session, whatever the outcome of its first use.
        let s = self.session_state(session);
        if s.hello_nonce == Some(proof.nonce) {
            return Err(refuse(
                "this session's nonce was already used by a hello; reconnect for a new one".into(),
            ));
        }
        s.hello_nonce = Some(proof.nonce);
        let skew = now.abs_diff(proof.ts);
        if skew > HELLO_SKEW_MS_MAX {
            return Err(refuse(format!(
                "hello ts {} is {skew} ms from the node's clock {now}; the limit is \
                 {HELLO_SKEW_MS_MAX} (hello_skew_ms_max)",
                proof.ts
            )));
        }
        let sig: [u8; SIGNATURE_BYTES] = proof
            .sig
            .as_slice()
            .try_into()
            .map_err(|_| refuse("bad signature: not 64 bytes".into()))?;
        let denied = || {
            refuse(
                "key hello refused: bad signature, or no public key registered for this mesh \
                 and peer (one answer for both, so it never tells whether they exist)"
                    .into(),
            )
        };
        let m = self
            .meshes
            .get(mesh)
            .filter(|m| m.exists)
            .ok_or_else(denied)?;
        let idx = *m.peer_index.get(peer).ok_or_else(denied)?;
        let p = &m.peers[idx as usize];
        let key = p.public_key.filter(|_| !p.placeholder).ok_or_else(denied)?;
        let key = VerifyingKey::from_bytes(&key).map_err(|_| denied())?;
        let message = hello_message(mesh, peer, proof.ts, &proof.nonce);
        key.verify_strict(&message, &Signature::from_bytes(&sig))
            .map_err(|_| denied())?;
        Ok((p.acked, m.durable_pos, idx))
    }
}
