//! One handler per request. Each write validates first (everything input controls, sizes
//! included), frames its record, and only then changes state, so a refusal leaves nothing
//! behind; the record's LSN decides when its `ok` may leave.

use crate::conv::{delivered, StoredEvent};
use crate::mesh::{InboxMsg, Mesh};
use crate::record::*;
use crate::{token_hash, SessionState, Shard, Sub};
use ed25519_dalek::{Signature, VerifyingKey};
use fabric_proto::hello::{hello_message, HELLO_SKEW_MS_MAX, SIGNATURE_BYTES};
use fabric_proto::internal::{HelloProof, Reply, Request, SessionId, ShardOp};
use fabric_proto::{Body, ErrorCode, ProtoError, ServerOp, Target};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The `ref` of an op that is answered with one (exhaustive: a new op must say).
pub(crate) fn op_ref(op: &ShardOp) -> Option<u64> {
    match op {
        ShardOp::CreateMesh { r, .. }
        | ShardOp::AddPeer { r, .. }
        | ShardOp::Auth { r, .. }
        | ShardOp::Send { r, .. }
        | ShardOp::Append { r, .. }
        | ShardOp::Subscribe { r, .. }
        | ShardOp::Unsubscribe { r, .. }
        | ShardOp::Read { r, .. } => Some(*r),
        ShardOp::Hello { .. } | ShardOp::Ack { .. } | ShardOp::Flushed { .. } | ShardOp::Closed => {
            None
        }
    }
}

/// Whether an op writes a record (exhaustive: a new op must say).
fn is_write(op: &ShardOp) -> bool {
    match op {
        ShardOp::CreateMesh { .. }
        | ShardOp::AddPeer { .. }
        | ShardOp::Send { .. }
        | ShardOp::Append { .. } => true,
        ShardOp::Hello { .. }
        | ShardOp::Auth { .. }
        | ShardOp::Subscribe { .. }
        | ShardOp::Unsubscribe { .. }
        | ShardOp::Read { .. }
        | ShardOp::Ack { .. }
        | ShardOp::Flushed { .. }
        | ShardOp::Closed => false,
    }
}

pub(crate) fn ok(r: u64, pos: Option<u64>, seq: Option<u64>) -> ServerOp {
    ServerOp::Ok { r, pos, seq }
}

impl Shard {
    pub(crate) fn apply_request(&mut self, now: u64, req: Request) -> Result<(), ProtoError> {
        let session = req.session;
        if is_write(&req.op) {
            self.refuse_write(now)?;
        }
        match req.op {
            ShardOp::CreateMesh { r, mesh } => self.create_mesh(session, r, mesh),
            ShardOp::AddPeer {
                r,
                mesh,
                peer,
                groups,
                token_hash,
                public_key,
            } => {
                let rec = PeerKeyRec {
                    mesh,
                    peer,
                    groups,
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
            } => self.hello(now, session, mesh, peer, &token, proof),
            ShardOp::Auth { r, mesh, token } => {
                let (_, _, idx) = self.authenticate(&mesh, None, &token)?;
                let peer = self.meshes[&mesh].peers[idx as usize].id.clone();
                self.emit(session, Reply::Authed { r, peer });
                Ok(())
            }
            ShardOp::Send {
                r,
                mesh,
                from,
                to,
                body,
            } => self.send(now, session, r, mesh, from, to, body),
            ShardOp::Append {
                r,
                mesh,
                conv,
                from,
                body,
                key,
            } => {
                let rec = AppendedRec {
                    mesh,
                    conv,
                    seq: 0,
                    from,
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
            } => self.subscribe(session, r, (mesh, conv), from),
            ShardOp::Unsubscribe { r, mesh, conv } => {
                self.unsubscribe(session, &(mesh, conv));
                self.emit(session, Reply::Frame(ok(r, None, None)));
                Ok(())
            }
            ShardOp::Read {
                r,
                mesh,
                conv,
                from,
                limit,
            } => {
                self.read(session, r, (mesh, conv), from, limit);
                Ok(())
            }
            ShardOp::Ack { mesh, peer, upto } => self.ack(&mesh, &peer, upto),
            ShardOp::Flushed { frames } => {
                let max = self.config.push_credit_frames_max;
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.credit = s.credit.saturating_add(frames).min(max);
                    self.queue_drain(session);
                }
                Ok(())
            }
            ShardOp::Closed => {
                self.detach(session);
                Ok(())
            }
        }
    }

    fn create_mesh(
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
        let lsn = self.log(&Record::MeshCreated(MeshRec { mesh: mesh.clone() }))?;
        self.meshes
            .entry(mesh.clone())
            .or_insert_with(|| Mesh::new(mesh))
            .exists = true;
        self.ack_at(lsn, session, Reply::Frame(ok(r, None, None)));
        Ok(())
    }

    fn add_peer(
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
                mesh: rec.mesh.clone(),
                peer: rec.peer.clone(),
                groups: rec.groups.clone(),
                token_hash,
            }),
            _ => Record::PeerKeyAdded(rec.clone()),
        };
        let lsn = self.log(&record)?;
        let key = has_key.then_some(rec.public_key);
        let m = self.meshes.get_mut(&rec.mesh).expect("checked above");
        let head = m.head;
        m.define_peer(&rec.peer, rec.groups, rec.token_hash, key, head);
        self.ack_at(lsn, session, Reply::Frame(ok(r, None, None)));
        Ok(())
    }

    fn hello(
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
            }),
        );
        self.queue_drain(session);
        Ok(())
    }

    fn check_body(&self, body: &Body) -> Result<(), ProtoError> {
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

    #[allow(clippy::too_many_arguments)] // one per field of the op, as the request carries them
    fn send(
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
                .get(p)
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
            mesh: mesh.clone(),
            pos,
            from,
            to,
            body: body.clone(),
            ts: now,
        };
        let lsn = self.log(&Record::Sent(rec))?;
        let m = self.meshes.get_mut(&mesh).expect("checked above");
        m.head = pos;
        let msg = InboxMsg {
            from: from_idx,
            to: stored_to,
            body,
            ts: now,
            lsn,
            pending: recipients.len() as u32,
        };
        if m.charge(&recipients, bytes) {
            // Nobody needs a message with no recipient: it takes its position and is gone.
            m.log.insert(pos, msg);
            self.inbox_by_lsn.insert(lsn, (mesh.clone(), pos));
        }
        if !m.in_building {
            m.in_building = true;
            self.building_dirty.meshes.push((mesh, 0));
        }
        self.ack_at(lsn, session, Reply::Frame(ok(r, Some(pos), None)));
        Ok(())
    }

    fn append(
        &mut self,
        session: SessionId,
        r: u64,
        mut rec: AppendedRec,
    ) -> Result<(), ProtoError> {
        self.check_body(&rec.body)?;
        let ck = (rec.mesh.clone(), rec.conv.clone());
        if let Some(c) = self.convs.get(&ck) {
            if let Some(&seq) = rec.key.as_ref().and_then(|k| c.keys.get(k)) {
                // A retry: answer with the original seq once the original is durable (it is at
                // or below the last record framed, so that record's durability covers it).
                let reply = Reply::Frame(ok(r, None, Some(seq)));
                if seq <= c.durable_seq {
                    self.stats.appends_acked += 1;
                    self.emit(session, reply);
                } else {
                    let lsn = self.next_lsn - 1;
                    self.ack_at(lsn, session, reply);
                }
                return Ok(());
            }
        }
        let head = self.convs.get(&ck).map_or(0, |c| c.head);
        if head == 0 {
            self.check_conversation_count(&rec.mesh)?;
        }
        rec.seq = head + 1;
        let lsn = self.log(&Record::Appended(rec.clone()))?;
        if head == 0 {
            *self.mesh_convs.entry(rec.mesh.clone()).or_default() += 1;
        }
        let c = self.convs.entry(ck.clone()).or_default();
        let was_empty = c.events.is_empty();
        c.push(StoredEvent {
            seq: rec.seq,
            from: rec.from,
            body: rec.body,
            ts: rec.ts,
            lsn,
            key: rec.key,
        });
        let new_in_building = !c.in_building;
        c.in_building = true;
        if was_empty {
            self.convs_by_lsn.insert((lsn, ck.clone()));
        }
        if new_in_building {
            self.building_dirty.convs.push((ck, 0));
        }
        self.ack_at(lsn, session, Reply::Frame(ok(r, None, Some(rec.seq))));
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

    fn subscribe(
        &mut self,
        session: SessionId,
        r: u64,
        ck: (Arc<str>, Arc<str>),
        from: u64,
    ) -> Result<(), ProtoError> {
        let max = self.config.session_subscriptions_max as usize;
        let s = self.session_state(session);
        let next_seq = from.max(1);
        let held = s.subs.len();
        match s.subs.iter_mut().find(|x| x.key == ck) {
            Some(sub) => sub.next_seq = next_seq,
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
            }),
        }
        let c = self.convs.entry(ck).or_default();
        if !c.subscribers.contains(&session) {
            c.subscribers.push(session);
        }
        // The ok goes out before any event of the subscription.
        self.emit(session, Reply::Frame(ok(r, None, None)));
        self.queue_drain(session);
        Ok(())
    }

    fn unsubscribe(&mut self, session: SessionId, ck: &(Arc<str>, Arc<str>)) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.subs.retain(|x| &x.key != ck);
        }
        self.release_conv_listener(ck, session);
    }

    /// Drops `session` from a conversation's subscribers, and the conversation itself if it
    /// never had an entry and nobody listens any more.
    fn release_conv_listener(&mut self, ck: &(Arc<str>, Arc<str>), session: SessionId) {
        if let Some(c) = self.convs.get_mut(ck) {
            c.unsubscribe(session);
            if c.head == 0 && c.is_idle() {
                self.convs.remove(ck);
            }
        }
    }

    fn read(
        &mut self,
        session: SessionId,
        r: u64,
        ck: (Arc<str>, Arc<str>),
        from: u64,
        limit: u32,
    ) {
        let limit = limit.min(fabric_proto::READ_LIMIT_MAX) as u64;
        let (events, head) = match self.convs.get(&ck) {
            None => (Vec::new(), 0),
            Some(c) => {
                let start = from.max(c.first_seq);
                let end = c
                    .durable_seq
                    .min(start.saturating_add(limit).saturating_sub(1));
                let events = (start..=end)
                    .filter_map(|seq| c.get(seq))
                    .map(|e| delivered(&ck.1, e))
                    .collect();
                (events, c.durable_seq)
            }
        };
        self.emit(session, Reply::Messages { r, events, head });
    }

    fn ack(&mut self, mesh: &Arc<str>, peer: &Arc<str>, upto: u64) -> Result<(), ProtoError> {
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
        if log_it {
            self.unlogged_cursors.push((mesh.clone(), idx));
        }
        Ok(())
    }

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
            })
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

    pub(crate) fn mesh_mut(&mut self, mesh: &Arc<str>) -> Result<&mut Mesh, ProtoError> {
        self.meshes
            .get_mut(mesh)
            .filter(|m| m.exists)
            .ok_or_else(|| ProtoError::new(ErrorCode::NotFound, format!("no mesh {mesh:?}")))
    }

    fn detach(&mut self, session: SessionId) {
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
        op => op_ref(op).and_then(|r| error(Some(r))),
    }
}
