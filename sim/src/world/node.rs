//! The node's glue, done by hand as `fabric` does it: shard loops, session tasks, routers.

use super::*;

impl Simulation {
    /// Moves work between shards and sessions until nothing moves: shard input, WAL writes,
    /// shard outputs into sessions, sessions' requests into shard input, frames onto streams.
    pub(super) fn pump(&mut self) -> Checked {
        for _ in 0..PUMP_ROUNDS_MAX {
            let outputs = self.pump_shards()?;
            if outputs.is_empty() && self.dirty.is_empty() {
                return Ok(());
            }
            for (shard, o) in outputs {
                match o {
                    HostOut::Replies(session, replies) => {
                        self.queue_replies(shard, session, replies)?
                    }
                    HostOut::Close(session, why) => self.close_for_shard(shard, session, why),
                }
            }
            for id in std::mem::take(&mut self.dirty) {
                self.take_replies(id)?;
                self.pump_conn(id);
            }
        }
        fail(
            ViolationKind::Liveness,
            format!(
                "{PUMP_ROUNDS_MAX} rounds between shards and sessions in one event: {}",
                self.pending_summary()
            ),
        )
    }

    /// The shard loop of the glue (`fabric/src/shard_actor.rs`), shard by shard: while the
    /// shard wants input, hand it whole batches from its channel (up to
    /// [`PUMP_BATCHES_MAX`] a round) through `Shard::handle_requests`, as the node does;
    /// `wants_input` is asked between batches, never inside one. Then start a WAL write if
    /// none is in flight, and collect outputs.
    pub(super) fn pump_shards(&mut self) -> Checked<Vec<(ShardIdx, HostOut)>> {
        let mut outputs = Vec::new();
        if !self.node_up {
            return Ok(outputs);
        }
        for s in 0..self.hosts.len() {
            let shard = s as ShardIdx;
            // What the host asked for since (a write polled when the last one completed)
            // happens before new input is taken in.
            self.host_effects(shard, &mut outputs)?;
            let mut taken = 0;
            while taken < PUMP_BATCHES_MAX && self.hosts[s].driver.feeds_now() {
                let Some(batch) = self.hosts[s].input.pop_front() else {
                    break;
                };
                taken += 1;
                self.feed_batch(s, batch);
                // At once, as the node's adapter does: a write the host polled starts before
                // the next batch's acks are taken in (the cursor checker counts on it).
                self.host_effects(shard, &mut outputs)?;
            }
            self.host_effects(shard, &mut outputs)?;
        }
        Ok(outputs)
    }

    /// One batch from a shard's channel into its host, which takes it at once (the loop asks
    /// `feeds_now` first): the model learns the acks the shard took in.
    fn feed_batch(&mut self, s: usize, batch: Vec<Request>) {
        let several = batch.len() > 1;
        if self.hosts[s].driver.shard().is_some() {
            for req in &batch {
                if let ShardOp::Ack { peer, upto, .. } = &req.op {
                    if let Some(i) = self.clients.iter().position(|c| c.peer == *peer) {
                        self.model.ack_handled(i, *upto);
                    }
                }
            }
        }
        let t = self.time();
        let session = batch.first().map_or(0, |r| r.session);
        let host = &mut self.hosts[s];
        host.driver.handle_batch(t, session, batch);
        self.counters.workload.shard_batches += 1;
        if several && host.driver.shard().is_some_and(|x| !x.wants_input()) {
            self.counters.workload.shard_batches_past_backpressure += 1;
        }
    }

    /// What the host asks of the glue, done as the node's adapter does it: writes started,
    /// recoveries run, replies and session closes routed (in order), the host's timer armed.
    pub(super) fn host_effects(
        &mut self,
        shard: ShardIdx,
        outputs: &mut Vec<(ShardIdx, HostOut)>,
    ) -> Checked {
        let s = shard as usize;
        while let Some(e) = self.hosts[s].driver.poll_effect() {
            match e {
                Effect::Write(w) => self.start_write(shard, w),
                Effect::Recover(job) => self.recover_effect(shard, job)?,
                Effect::Replies { session, replies } => {
                    outputs.push((shard, HostOut::Replies(session, replies)));
                }
                Effect::Forget { .. } => {}
                Effect::CloseSession { session, why } => {
                    outputs.push((shard, HostOut::Close(session, why)));
                }
            }
        }
        self.arm_host_timer(shard);
        Ok(())
    }

    fn arm_host_timer(&mut self, shard: ShardIdx) {
        let h = &mut self.hosts[shard as usize];
        let Some(at) = h.driver.poll_timeout() else {
            return;
        };
        if h.timer_at.is_some_and(|t| t <= at) {
            return;
        }
        h.timer_at = Some(at);
        let epoch = h.epoch;
        self.schedule_at(at.max(self.now), Event::ShardTimer { shard, epoch });
    }

    /// The host closed a session (its shard incarnation ended, or its replies could not be
    /// queued): the session core decides how the client hears it.
    fn close_for_shard(&mut self, shard: ShardIdx, session: SessionId, why: CloseReason) {
        let Some(&id) = self.sessions.get(&session) else {
            return;
        };
        if let Some(k) = self.conns.get_mut(&id) {
            match why {
                CloseReason::Restarted => k.session.handle_shard_restarted(self.now, shard),
                CloseReason::Overloaded => k.session.handle_shard_overloaded(self.now, shard),
            }
            self.dirty.insert(id);
        }
    }

    /// The glue's session task for one connection: read frames while the session wants them,
    /// forward its requests, write its frames (then report the flush), close when it closes.
    pub(super) fn pump_conn(&mut self, id: ConnId) {
        let now = self.now;
        let Some(k) = self.conns.get_mut(&id) else {
            return;
        };
        while k.session.wants_read() {
            let Some(frame) = k.stream.poll_frame() else {
                break;
            };
            let (kind, bytes) = frame.split_first().unwrap_or((&FRAME_TEXT, &[]));
            k.session.handle_frame(
                now,
                InFrame {
                    binary: *kind == FRAME_BINARY,
                    bytes,
                },
            );
        }
        if k.stream.closed().is_some() {
            k.session.handle_transport_closed(now);
        }
        let mut wrote = false;
        while let Some(f) = k.session.poll_transmit() {
            k.stream.send(now, frame_bytes(&f));
            wrote = true;
        }
        if wrote {
            k.session.handle_flushed(now);
        }
        if k.session.is_closed() {
            k.stream.close();
        }
        let client = k.client;
        let mut segs = Vec::new();
        while let Some(seg) = k.stream.poll_segment() {
            segs.push(seg);
        }
        let timer = [k.stream.poll_timeout(), k.session.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        let arm = timer.filter(|t| k.timer_at.is_none_or(|a| *t < a));
        if let Some(t) = arm {
            k.timer_at = Some(t);
        }
        let done = k.session.is_closed() && k.stream.closed().is_some();
        let session = k.session.id();
        self.forward_requests(id);
        for seg in segs {
            self.send_to_client(client, id, seg);
        }
        if let Some(t) = arm {
            self.schedule_at(t.max(now), Event::NodeTimer(id));
        }
        if done {
            self.conns.remove(&id);
            self.sessions.remove(&session);
        }
    }

    /// A session's requests, batched by its router, into the shards' input channels.
    pub(super) fn forward_requests(&mut self, id: ConnId) {
        let Some(k) = self.conns.get_mut(&id) else {
            return;
        };
        while let Some((route, req)) = k.session.poll_request() {
            k.router.handle_request(self.now, route, req);
        }
        while let Some((shard, requests)) = k.router.poll_batch() {
            self.hosts[shard as usize].input.push_back(requests);
        }
    }

    /// A shard's output: the checkers see it first (what a shard says is its promise, whether
    /// or not the client ever reads it), then the session it is for.
    /// A batch of replies for one session, as the node's adapter hands it over: into the
    /// session's bounded reply queue, or, when the queue is full, back to the host as refused
    /// (which closes the session). The simulator's own sessions (probe, HTTP reads) take
    /// theirs at once.
    fn queue_replies(
        &mut self,
        shard: ShardIdx,
        session: SessionId,
        replies: Vec<Reply>,
    ) -> Checked {
        if Some(session) == self.probe || self.http.contains_key(&session) {
            for reply in replies {
                self.route_output(shard, Output { session, reply })?;
            }
            return Ok(());
        }
        let Some(&id) = self.sessions.get(&session) else {
            return Ok(()); // the session is gone; the shard will hear `Closed`
        };
        let cap = self.reply_queue_batches_max;
        let k = self.conns.get_mut(&id).expect("sessions and conns agree");
        if k.replies.len() >= cap {
            self.counters.workload.reply_queue_overflows += 1;
            trace!(
                self,
                "s{shard} cannot queue replies for session {session}: closing it"
            );
            let t = self.time();
            self.hosts[shard as usize]
                .driver
                .handle_reply_refused(t, session);
            return Ok(());
        }
        k.replies.push_back((shard, replies));
        self.dirty.insert(id);
        Ok(())
    }

    /// The session task takes reply batches from its queue unless it is blocked writing (its
    /// socket holds `socket_window_frames` unacknowledged frames).
    fn take_replies(&mut self, id: ConnId) -> Checked {
        loop {
            let window = self.options.socket_window_frames;
            let Some(k) = self.conns.get_mut(&id) else {
                return Ok(());
            };
            if k.stream.unacked() >= window {
                return Ok(());
            }
            let Some((shard, replies)) = k.replies.pop_front() else {
                return Ok(());
            };
            let session = k.session.id();
            for reply in replies {
                self.route_output(shard, Output { session, reply })?;
            }
        }
    }

    pub(super) fn route_output(&mut self, shard: ShardIdx, o: Output) -> Checked {
        if Some(o.session) == self.probe {
            let Reply::Messages { r, events, head } = o.reply else {
                return fail(
                    ViolationKind::UnexpectedReply,
                    format!("probe got {:?}", o.reply),
                );
            };
            let conv = self.model.conv_names()[r as usize].clone();
            self.model.note_retained(&conv, &events, head);
            return Ok(());
        }
        if self.http.contains_key(&o.session) {
            return self.http_reply(o);
        }
        let Some(&id) = self.sessions.get(&o.session) else {
            return Ok(()); // the session is gone; the shard will hear `Closed`
        };
        if let Reply::Frame(frame) = &o.reply {
            self.check_frame(shard, id, frame)?;
        }
        let k = self.conns.get_mut(&id).expect("looked up above");
        k.session.handle_reply(self.now, shard, o.reply);
        self.dirty.insert(id);
        Ok(())
    }

    /// Checkers 1, 2 and 7 on one frame a shard sends to connection `id`: an `ok` for the
    /// request it answers, naming a durable position or seq of that request's operation; a
    /// delivery or an event of a durable entry, with the body its operation wrote.
    fn check_frame(&mut self, shard: ShardIdx, id: ConnId, frame: &ServerOp) -> Checked {
        let c = self.conns[&id].client;
        let peer = self.clients[c].peer.clone();
        match frame {
            ServerOp::Welcome { acked, head, .. } => self.model.on_welcome(c, *acked, *head),
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
                self.model.on_ok(op, *pos, *seq)?;
                self.check_durable_ok(op, *pos, *seq)
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
                self.model.on_deliver(c, *pos, from, to, body)?;
                let op = self.model.op_of(body, || "a delivery".into())?;
                if self.durable.pos_op(*pos) != Some(op) {
                    return fail(
                        ViolationKind::NotDurable,
                        format!(
                            "s{shard} delivers pos {pos} (op {op}) to {peer} before it is durable"
                        ),
                    );
                }
                Ok(())
            }
            ServerOp::Event(e) => self.check_durable_event(shard, &peer, e),
            _ => Ok(()),
        }
    }

    /// Checker 7 for an `ok`: the disks hold its operation synced at the position or seq it
    /// names (a keyed retry's too: its original must be durable by now).
    fn check_durable_ok(&self, op: usize, pos: Option<u64>, seq: Option<u64>) -> Checked {
        let (durable, what) = match (&self.model.ops[op].kind, pos, seq) {
            (OpKind::Send { .. }, Some(pos), _) => (self.durable.pos_op(pos), format!("pos {pos}")),
            (OpKind::Append { conv, .. }, _, Some(seq)) => {
                (self.durable.seq_op(conv, seq), format!("{conv} seq {seq}"))
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
        shard: ShardIdx,
        to: &str,
        e: &fabric_proto::DeliveredEvent,
    ) -> Checked {
        self.model.on_event(&e.conv, e.seq, &e.from, &e.body)?;
        let op = self.model.op_of(&e.body, || "an event".into())?;
        if self.durable.seq_op(&e.conv, e.seq) != Some(op) {
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
}

impl Simulation {
    /// Checker 7's oracle learns what the disk of `shard` now holds synced: the segment a
    /// write just completed to (`Some`), or, after a recovery, every segment, if the recovery
    /// left nothing unsynced (a crash makes what survived durable, and the glue syncs what a
    /// restart read; without that sync, page-cache data stays unlearned until a later write
    /// to its segment syncs it).
    pub(super) fn learn_synced(&mut self, shard: ShardIdx, segment: Option<u64>) -> Checked {
        let s = shard as usize;
        let disk = &self.hosts[s].disk;
        let segments = disk.segments();
        match segment {
            Some(id) => match segments.iter().find(|(x, _)| *x == id) {
                Some((_, bytes)) => self.durable.learn_segment(&self.model, s, id, bytes),
                None => Ok(()),
            },
            None if disk.unsynced_bytes() == 0 => {
                self.durable.learn_disk(&self.model, s, &segments)
            }
            None => Ok(()),
        }
    }
}
