//! The simulated clients: connect, say hello, issue the workload, take in frames, reconnect.

use super::*;

impl Simulation {
    /// Client `c` abandons its connection (with a reset, which may or may not arrive): what was
    /// in flight has an unknown outcome. Keyed appends and sends are retried (a send may then
    /// be stored twice, which at-least-once allows); keyless appends are abandoned, since a
    /// retry could store them twice.
    pub(crate) fn drop_conn(&mut self, c: usize) {
        if let Some(mut k) = self.clients[c].conn.take() {
            self.trace(format!(
                "{} drops connection {}",
                self.clients[c].peer, k.id
            ));
            k.stream.close();
            while let Some(seg) = k.stream.poll_segment() {
                self.send_to_node(c, k.id, seg);
            }
        }
        self.lost_conn(c);
    }

    pub(super) fn lost_conn(&mut self, c: usize) {
        let client = &mut self.clients[c];
        client.conn = None;
        let lost: Vec<usize> = std::mem::take(&mut client.inflight).into_values().collect();
        for op in lost.into_iter().rev() {
            let retryable = match &self.model.ops[op].kind {
                OpKind::Send { .. } => true,
                OpKind::Append { key, .. } => key.is_some(),
            };
            if retryable {
                self.clients[c].retry.push_front(op);
            }
        }
        let delay = self.rng.random_range(1..=RECONNECT_DELAY_MAX_MS);
        self.clients[c].backoff_until_ms = self.now + delay;
        self.wake(c, delay);
    }

    pub(super) fn client_wake(&mut self, c: usize) -> Checked {
        if !self.clients[c].online {
            return Ok(());
        }
        if self.now < self.clients[c].backoff_until_ms {
            let delay = self.clients[c].backoff_until_ms - self.now;
            self.wake(c, delay);
            return Ok(());
        }
        let Some(k) = &self.clients[c].conn else {
            return self.connect(c);
        };
        if !k.welcomed {
            return Ok(());
        }
        if self.clients[c].inflight.len() >= self.options.inflight_requests_max {
            return Ok(());
        }
        let op = if let Some(op) = self.clients[c].retry.pop_front() {
            op
        } else if let Some(action) = self.clients[c].script.pop_front() {
            self.scripted_op(c, action)
        } else if self.phase == Phase::Faults && !self.load_paused && self.clients[c].ops_left > 0 {
            self.clients[c].ops_left -= 1;
            self.new_op(c)
        } else {
            return Ok(());
        };
        self.issue(c, op)?;
        let client = &self.clients[c];
        let more = !client.retry.is_empty()
            || !client.script.is_empty()
            || (self.phase == Phase::Faults && !self.load_paused && client.ops_left > 0);
        if more && client.inflight.len() < self.options.inflight_requests_max {
            let delay = self.rng.random_range(0..=self.think_time_max_ms);
            self.wake(c, delay);
        }
        Ok(())
    }

    /// A new connection and its hello.
    pub(super) fn connect(&mut self, c: usize) -> Checked {
        let id = self.next_conn;
        self.next_conn += 1;
        self.counters.connections += 1;
        let stream = Stream::new(self.now, self.options.stream.clone());
        self.clients[c].conn = Some(ClientConn {
            id,
            stream,
            welcomed: false,
            timer_at: None,
        });
        let hello = ClientOp::Hello {
            mesh: MESH.into(),
            peer: self.clients[c].peer.clone(),
            token: self.clients[c].token.clone(),
        };
        self.trace(format!(
            "{} connects: connection {id}",
            self.clients[c].peer
        ));
        let batch = self.clients[c].batch_in;
        if batch > 0 {
            self.client_send(
                c,
                &ClientOp::Options {
                    r: OPTIONS_REF,
                    batch,
                },
            );
        }
        self.client_send(c, &hello);
        self.pump_client(c)
    }

    pub(super) fn client_send(&mut self, c: usize, op: &ClientOp) {
        let now = self.now;
        let client = &mut self.clients[c];
        let Some(k) = client.conn.as_mut() else {
            return;
        };
        let bytes = if client.binary {
            let mut b = vec![FRAME_BINARY];
            b.extend_from_slice(&codec::encode_client_binary(op));
            b
        } else {
            let mut b = vec![FRAME_TEXT];
            codec::encode_client_json(op, &mut b);
            b
        };
        k.stream.send(now, Bytes::from(bytes));
    }

    /// The client's socket loop: frames in, reactions out, packets onto the network.
    pub(super) fn pump_client(&mut self, c: usize) -> Checked {
        let mut delivered = false;
        while let Some(frame) = self.clients[c]
            .conn
            .as_mut()
            .and_then(|k| k.stream.poll_frame())
        {
            let (kind, bytes) = frame.split_first().unwrap_or((&FRAME_TEXT, &[]));
            let ops = if *kind == FRAME_BINARY {
                codec::decode_server_binary(bytes)
            } else {
                codec::decode_server_json(bytes)
            };
            let ops = match ops {
                Ok(ops) => ops,
                Err(e) => {
                    return fail(
                        ViolationKind::UnexpectedReply,
                        format!("{} cannot decode a frame: {e}", self.clients[c].peer),
                    )
                }
            };
            for op in ops {
                delivered |= self.client_frame(c, op)?;
            }
        }
        let ack = self.phase == Phase::Liveness
            || self.scripted
            || self.rng.random_bool(self.options.ack_probability);
        let upto = self.clients[c].max_received;
        if delivered && ack && upto > self.clients[c].acked_sent {
            self.clients[c].acked_sent = upto;
            self.trace(format!("{} ack upto {upto}", self.clients[c].peer));
            self.client_send(c, &ClientOp::Ack { upto });
        }
        let now = self.now;
        let Some(k) = self.clients[c].conn.as_mut() else {
            return Ok(());
        };
        let id = k.id;
        let mut segs = Vec::new();
        while let Some(seg) = k.stream.poll_segment() {
            segs.push(seg);
        }
        let closed = k.stream.closed();
        let timer = k.stream.poll_timeout();
        let arm = timer.filter(|t| k.timer_at.is_none_or(|a| *t < a));
        if let Some(t) = arm {
            k.timer_at = Some(t);
        }
        for seg in segs {
            self.send_to_node(c, id, seg);
        }
        if let Some(t) = arm {
            self.schedule_at(t.max(now), Event::ClientTimer(c, id));
        }
        if let Some(why) = closed {
            let how = match why {
                Closed::Reset => "was reset",
                Closed::IdleTimeout => "timed out",
                Closed::Local => "closed",
            };
            self.trace(format!("{} connection {id} {how}", self.clients[c].peer));
            self.lost_conn(c);
        }
        Ok(())
    }

    /// One server frame at client `c`; true if it was a delivery.
    pub(super) fn client_frame(&mut self, c: usize, op: ServerOp) -> Checked<bool> {
        let peer = self.clients[c].peer.clone();
        match op {
            ServerOp::Welcome {
                session,
                acked,
                head,
            } => {
                self.trace(format!(
                    "{peer} welcome session={session} acked={acked} head={head}"
                ));
                if let Some(k) = self.clients[c].conn.as_mut() {
                    k.welcomed = true;
                }
                // Anything received before was acknowledged or is redelivered from `acked`.
                self.clients[c].acked_sent = acked;
                self.clients[c].max_received = acked;
                self.wake(c, 0);
            }
            ServerOp::Ok { r: OPTIONS_REF, .. } if self.clients[c].batch_in > 0 => {}
            ServerOp::Ok { r, .. } => {
                if self.clients[c].inflight.remove(&r).is_none() {
                    return fail(
                        ViolationKind::UnexpectedReply,
                        format!("{peer} got ok for r={r}, which it is not waiting for"),
                    );
                }
                let delay = self.rng.random_range(0..=self.think_time_max_ms);
                self.wake(c, delay);
            }
            ServerOp::Error {
                r: Some(r),
                code: ErrorCode::Unavailable,
                message,
            } => {
                self.trace(format!("{peer} unavailable r={r}: {message}"));
                // Refused, or its WAL write failed (and may yet survive in the page cache).
                // Keyed appends and sends are retried; keyless appends abandoned.
                if let Some(op) = self.clients[c].inflight.remove(&r) {
                    let keyless =
                        matches!(&self.model.ops[op].kind, OpKind::Append { key: None, .. });
                    if !keyless {
                        self.clients[c].retry.push_back(op);
                    }
                }
                let delay = self.rng.random_range(1..=RECONNECT_DELAY_MAX_MS);
                self.clients[c].backoff_until_ms = self.now + delay;
                self.wake(c, delay);
            }
            ServerOp::Error {
                r: None,
                code,
                message,
            } if code == ErrorCode::Unavailable
                || (code == ErrorCode::Unauthorized && message.contains("timed out")) =>
            {
                // The session ends (a shard restarted, or a hello the network delayed past
                // the deadline); the connection closes behind it.
                self.trace(format!("{peer} session error {code:?}: {message}"));
            }
            ServerOp::Deliver {
                pos,
                from,
                to,
                body,
                ..
            } => {
                self.trace(format!("{peer} deliver pos={pos}"));
                self.model.delivered[c].insert(pos);
                self.clients[c].received.insert(pos, (from, to, body));
                let client = &mut self.clients[c];
                client.max_received = client.max_received.max(pos);
                return Ok(true);
            }
            ServerOp::Batch(ops) => {
                let mut delivered = false;
                for op in ops {
                    delivered |= self.client_frame(c, op)?;
                }
                return Ok(delivered);
            }
            f => return fail(ViolationKind::UnexpectedReply, format!("{peer} got {f:?}")),
        }
        Ok(false)
    }

    /// A new operation for client `c`, with a body unique to it (its id twice, and padding).
    pub(super) fn new_op(&mut self, c: usize) -> usize {
        let id = self.model.ops.len();
        let pad = "x".repeat(self.rng.random_range(0..=BODY_PAD_BYTES_MAX));
        let body =
            Body::from_trusted(format!("{{\"op\":{id},\"pad\":\"{pad}\",\"again\":{id}}}").into());
        let kind = if self.rng.random_bool(0.5) {
            let n = self.clients.len();
            let to = match self.rng.random_range(0..10) {
                0 | 1 => Target::Group(format!("g{}", self.rng.random_range(0..2)).into()),
                2 => Target::All,
                _ => Target::Peer(self.clients[self.rng.random_range(0..n)].peer.clone()),
            };
            let recipients = self.model.recipients(c, &to);
            OpKind::Send { to, recipients }
        } else {
            let conv: Arc<str> =
                format!("c{}", self.rng.random_range(0..self.options.convs)).into();
            let key = self
                .rng
                .random_bool(0.8)
                .then(|| Arc::from(format!("k{id}")));
            OpKind::Append { conv, key }
        };
        self.model.add_op(c, kind, body)
    }

    /// A scripted operation: the user's body inside an envelope that makes it unique, which
    /// the checkers need to tell operations apart (`crate::script` unwraps it again).
    pub(super) fn scripted_op(&mut self, c: usize, action: Action) -> usize {
        let id = self.model.ops.len();
        let wrap = |body: &str| {
            Body::from_trusted(format!("{{\"op\":{id},\"user\":{body},\"again\":{id}}}").into())
        };
        let (kind, body) = match action {
            Action::Send { to, body } => {
                let recipients = self.model.recipients(c, &to);
                (OpKind::Send { to, recipients }, wrap(&body))
            }
            Action::Append { conv, body, key } => (OpKind::Append { conv, key }, wrap(&body)),
        };
        self.model.add_op(c, kind, body)
    }

    pub(super) fn issue(&mut self, c: usize, op: usize) -> Checked {
        let Some(id) = self.clients[c].conn.as_ref().map(|k| k.id) else {
            self.clients[c].retry.push_front(op);
            return Ok(());
        };
        let r = self.clients[c].next_r;
        self.clients[c].next_r += 1;
        self.clients[c].inflight.insert(r, op);
        self.refs.insert((id, r), op);
        let o = &self.model.ops[op];
        let (client_op, what) = match &o.kind {
            OpKind::Send { to, .. } => (
                ClientOp::Send {
                    r,
                    to: to.clone(),
                    body: o.body.clone(),
                },
                format!("send to {}", to.to_wire()),
            ),
            OpKind::Append { conv, key } => (
                ClientOp::Append {
                    r,
                    conv: conv.clone(),
                    body: o.body.clone(),
                    key: key.clone(),
                },
                format!("append {conv} key={key:?}"),
            ),
        };
        self.trace(format!("{} op {op} r={r} {what}", self.clients[c].peer));
        self.client_send(c, &client_op);
        self.pump_client(c)
    }
}
