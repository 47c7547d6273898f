//! The checks hooked into the world: every frame a shard sends is checked as it leaves
//! (checkers 1, 2, 7), checker 7's oracle learns what each node's disks hold synced, a fresh
//! incarnation of a shard is audited (every conversation read back, every inbox replayed:
//! checkers 1, 2, 6), and the final checks run once the world is quiet (checkers 3, 9).

use super::*;
use fabric_proto::MeshId;
use fabric_proto::{ConvId, PeerId};

impl Simulation {
    /// Checker 9 on node `n`, once everything is quiet: no shard holds state for a session
    /// the node no longer has (every session that ends tells every shard `Closed`, through
    /// its router).
    pub(super) fn check_no_leaked_sessions(&self, n: usize) -> Checked {
        let node = &self.nodes[n];
        for (s, h) in node.hosts.iter().enumerate() {
            if let Some(id) = h
                .driver
                .shard()
                .map(|x| x.session_ids())
                .unwrap_or_default()
                .into_iter()
                .find(|id| !node.sessions.contains_key(id))
            {
                return fail(
                    ViolationKind::LeakedSession,
                    format!("n{n} s{s} holds state for session {id}, which the node closed"),
                );
            }
        }
        Ok(())
    }

    /// The final checks once everything is quiet (checkers 3 and 9), node by node.
    pub(super) fn finish(&mut self) -> Checked {
        for n in 0..self.nodes.len() {
            self.nodes[n].model.final_delivery()?;
            self.check_no_leaked_sessions(n)?;
        }
        self.finished = true;
        trace!(
            self,
            "end acked={} crashes={} restarts={} faults={} connections={}",
            self.acks(),
            self.counters.crashes,
            self.counters.restarts,
            self.counters.faults,
            self.counters.connections
        );
        Ok(())
    }

    /// Checkers 1, 2 and 7 on one frame a shard of node `n` sends to connection `id`: an
    /// `ok` for the request it answers, naming a durable position or seq of that request's
    /// operation; a delivery or an event of a durable entry, with the body its operation
    /// wrote.
    pub(super) fn check_frame(
        &mut self,
        n: usize,
        shard: ShardIdx,
        id: ConnId,
        frame: &ServerOp,
    ) -> Checked {
        let c = self.nodes[n].conns[&id].client;
        let peer = self.clients[c].peer.clone();
        let local = self.clients[c].local;
        match frame {
            ServerOp::Welcome { acked, head, .. } => {
                self.nodes[n].model.on_welcome(local, *acked, *head)
            }
            ServerOp::Ok { r, pos, seq } => {
                let Some(req) = self.refs.remove(&(id, *r)) else {
                    return fail(
                        ViolationKind::UnexpectedReply,
                        format!("{peer} ok for unknown r={r} on connection {id}"),
                    );
                };
                let Req::Op { op, .. } = req else {
                    if pos.is_some() || seq.is_some() {
                        return fail(
                            ViolationKind::UnexpectedReply,
                            format!("{peer} ok r={r} for a subscription carries {pos:?} {seq:?}"),
                        );
                    }
                    return Ok(());
                };
                trace!(
                    self,
                    "s{shard} ok {peer} op {op} r={r} pos={pos:?} seq={seq:?}"
                );
                self.nodes[n].model.on_ok(op, *pos, *seq)?;
                self.check_durable_ok(n, op, *pos, *seq)
            }
            ServerOp::Error { r, code, message } => {
                if !matches!(code, ErrorCode::Unavailable | ErrorCode::StorageFull) {
                    return fail(
                        ViolationKind::UnexpectedReply,
                        format!("s{shard} error to {peer} r={r:?} {code:?}: {message}"),
                    );
                }
                if let Some(r) = r {
                    self.refs.remove(&(id, *r));
                }
                Ok(())
            }
            ServerOp::Deliver {
                pos,
                from,
                to,
                body,
                ..
            } => {
                let node = &mut self.nodes[n];
                node.model.on_deliver(local, *pos, from, to, body)?;
                let op = node.model.op_of(body, || "a delivery".into())?;
                check_durable_delivery(node, shard, *pos, op, &peer)
            }
            ServerOp::Event(e) => self.check_durable_event(n, shard, &peer, e),
            _ => Ok(()),
        }
    }

    /// Checker 7 for an `ok`: node `n`'s disks hold its operation synced at the position or
    /// seq it names (a keyed retry's too: its original must be durable by now).
    fn check_durable_ok(&self, n: usize, op: usize, pos: Option<u64>, seq: Option<u64>) -> Checked {
        let node = &self.nodes[n];
        let (durable, what) = match (&node.model.ops[op].kind, pos, seq) {
            (OpKind::Send { .. }, Some(pos), _) => (node.durable.pos_op(pos), format!("pos {pos}")),
            (OpKind::Append { conv, .. }, _, Some(seq)) => {
                (node.durable.seq_op(conv, seq), format!("{conv} seq {seq}"))
            }
            _ => return Ok(()),
        };
        if durable == Some(op) {
            return Ok(());
        }
        fail(
            ViolationKind::NotDurable,
            format!("ok for op {op} at {what} before it is durable (durable there: {durable:?})"),
        )
    }

    /// Checkers 2 and 7 for an event (pushed, or a read's): the body its append wrote, durable.
    pub(super) fn check_durable_event(
        &mut self,
        n: usize,
        shard: ShardIdx,
        to: &str,
        e: &fabric_proto::DeliveredEvent,
    ) -> Checked {
        let node = &mut self.nodes[n];
        node.model.on_event(&e.conv, e.seq, &e.from, &e.body)?;
        let op = node.model.op_of(&e.body, || "an event".into())?;
        if node.durable.seq_op(&e.conv, e.seq) != Some(op) {
            return fail(
                ViolationKind::NotDurable,
                format!(
                    "s{shard} shows {} seq {} (op {op}) to {to} before it is durable",
                    e.conv, e.seq
                ),
            );
        }
        Ok(())
    }

    /// Checker 7's oracle learns what the disk of `shard` on node `n` now holds synced: the
    /// segment a write just completed to (`Some`), or, after a recovery, every segment, if
    /// the recovery left nothing unsynced (a crash makes what survived durable, and the glue
    /// syncs what a restart read; without that sync, page-cache data stays unlearned until a
    /// later write to its segment syncs it).
    pub(super) fn learn_synced(
        &mut self,
        n: usize,
        shard: ShardIdx,
        segment: Option<u64>,
    ) -> Checked {
        let s = shard as usize;
        let node = &mut self.nodes[n];
        let disk = &node.hosts[s].disk;
        let segments = disk.segments();
        match segment {
            Some(id) => match segments.iter().find(|(x, _)| *x == id) {
                Some((_, bytes)) => node.durable.learn_segment(&node.model, s, id, bytes),
                None => Ok(()),
            },
            None if disk.unsynced_bytes() == 0 => {
                node.durable.learn_disk(&node.model, s, &segments)
            }
            None => Ok(()),
        }
    }

    /// Reads back every conversation of a fresh incarnation and, on the mesh's shard, replays
    /// every inbox (checkers 1, 2 and 6), on sessions of its own that it closes again.
    pub(super) fn audit(&mut self, n: usize, shard: ShardIdx) -> Checked {
        let s = shard as usize;
        let audit = self.nodes[n].new_session();
        for conv in self.nodes[n].model.conv_names() {
            if self.conv_shard(&conv) != shard {
                continue;
            }
            let read = ShardOp::Read {
                r: 0,
                mesh: MeshId::must(MESH),
                conv: ConvId::must(&conv),
                from: 1,
                limit: fabric_proto::READ_LIMIT_MAX,
                local: false,
            };
            self.nodes[n].hosts[s]
                .driver
                .shard_mut()
                .expect("a recovered shard")
                .handle_requests(
                    self.now,
                    [Request {
                        session: audit,
                        op: read,
                    }],
                );
            let mut got = None;
            for o in self.shard_outputs_reading(n, s) {
                match o.reply {
                    Reply::Messages { events, head, .. } => got = Some((events, head)),
                    r => {
                        return fail(
                            ViolationKind::UnexpectedReply,
                            format!("audit read got {r:?}"),
                        )
                    }
                }
            }
            let Some((events, head)) = got else {
                return fail(ViolationKind::UnexpectedReply, "audit read got no reply");
            };
            self.nodes[n].model.audit_conv(&conv, &events, head)?;
        }
        if shard == self.mesh_shard {
            for local in 0..self.nodes[n].clients.len() {
                self.audit_inbox(n, local)?;
            }
        }
        trace!(self, "s{shard} audit passed");
        Ok(())
    }

    /// Everything a shard says now, its disk reads performed at once (without faults): an
    /// audit's `read` of entries older than the log cache is answered from disk.
    fn shard_outputs_reading(&mut self, n: usize, s: usize) -> Vec<Output> {
        let now = self.now;
        let host = &mut self.nodes[n].hosts[s];
        let shard = host.driver.shard_mut().expect("a recovered shard");
        let mut out = Vec::new();
        loop {
            while let Some(o) = shard.poll_output() {
                out.push(o);
            }
            let Some(rq) = shard.poll_reads() else {
                return out;
            };
            let got = fabric_shard::store::SegmentStore::read_at(
                &mut host.disk,
                rq.segment,
                rq.offset,
                rq.len,
            );
            shard.handle_read_done(now, rq.id, got);
        }
    }

    /// Replays the inbox of node `n`'s `local`-th peer from its cursor on a fresh
    /// incarnation of the mesh's shard, on an audit session of its own that it closes again.
    pub(super) fn audit_inbox(&mut self, n: usize, local: usize) -> Checked {
        let c = self.nodes[n].clients[local];
        let session = self.nodes[n].new_session();
        let hello = ShardOp::Hello {
            mesh: MeshId::must(MESH),
            peer: PeerId::must(&self.clients[c].peer),
            token: self.clients[c].token.clone(),
            proof: None,
        };
        self.mesh_shard_request(n, session, hello);
        let mut cursor = None;
        let mut shown = BTreeSet::new();
        loop {
            let frames = self.replay_frames(n, local, &mut cursor, &mut shown)?;
            if frames == 0 {
                break;
            }
            self.mesh_shard_request(n, session, ShardOp::Flushed { frames });
        }
        let Some(acked) = cursor else {
            return fail(ViolationKind::UnexpectedReply, "audit hello got no welcome");
        };
        self.nodes[n].model.audit_inbox(local, acked, &shown)?;
        self.mesh_shard_request(n, session, ShardOp::Closed);
        Ok(())
    }

    /// One request of an audit session straight into node `n`'s fresh mesh shard.
    fn mesh_shard_request(&mut self, n: usize, session: SessionId, op: ShardOp) {
        let s = self.mesh_shard as usize;
        self.nodes[n].hosts[s]
            .driver
            .shard_mut()
            .expect("a recovered shard")
            .handle_requests(self.now, [Request { session, op }]);
    }

    /// The frames an inbox replay got since its last flush, checked: the welcome (its cursor)
    /// and deliveries, in position order. Returns how many deliveries there were.
    fn replay_frames(
        &mut self,
        n: usize,
        local: usize,
        cursor: &mut Option<u64>,
        shown: &mut BTreeSet<u64>,
    ) -> Checked<u32> {
        let s = self.mesh_shard as usize;
        let outputs = self.shard_outputs_reading(n, s);
        let node = &mut self.nodes[n];
        let mut frames = 0;
        for o in outputs {
            match o.reply {
                Reply::Frame(ServerOp::Welcome { acked, head, .. }) => {
                    node.model.on_welcome(local, acked, head)?;
                    *cursor = Some(acked);
                }
                Reply::Frame(ServerOp::Deliver {
                    pos,
                    from,
                    to,
                    body,
                    ..
                }) => {
                    node.model.on_deliver(local, pos, &from, &to, &body)?;
                    if shown.last().is_some_and(|l| *l >= pos) {
                        return fail(
                            ViolationKind::WrongRecord,
                            format!(
                                "audit replay of {} out of order at pos {pos}",
                                node.model.peers[local]
                            ),
                        );
                    }
                    shown.insert(pos);
                    frames += 1;
                }
                r => {
                    return fail(
                        ViolationKind::UnexpectedReply,
                        format!("audit hello got {r:?}"),
                    )
                }
            }
        }
        Ok(frames)
    }
}

/// Checker 7 for a delivery: the inbox entry at `pos` is durable on the node's disks, as
/// operation `op`.
fn check_durable_delivery(
    node: &Node,
    shard: ShardIdx,
    pos: u64,
    op: usize,
    peer: &str,
) -> Checked {
    if node.durable.pos_op(pos) == Some(op) {
        return Ok(());
    }
    fail(
        ViolationKind::NotDurable,
        format!("s{shard} delivers pos {pos} (op {op}) to {peer} before it is durable"),
    )
}
