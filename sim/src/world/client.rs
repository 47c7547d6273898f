//! The simulated clients' connections: connect, say hello (with a token, or signed over the
//! session's challenge nonce), send frames, take in frames (checking every ordering promise
//! on the way, checker 8), acknowledge deliveries, reconnect.

use super::*;
use fabric_proto::MeshId;
use fabric_proto::PeerId;

/// What a scripted client does next (see `crate::script`).
#[derive(Debug, Clone)]
pub(crate) enum Action {
    Send {
        to: Target,
        body: String,
    },
    Append {
        conv: Arc<str>,
        body: String,
        key: Option<Arc<str>>,
    },
}

/// A request a client waits for an answer to, by its ref.
#[derive(Debug, Clone)]
pub(super) enum Req {
    /// A send or append; `ordered` if the ordering checker follows its answer (sends, and
    /// first attempts of appends).
    Op {
        op: usize,
        ordered: bool,
    },
    Subscribe {
        conv: Arc<str>,
    },
    Unsubscribe {
        conv: Arc<str>,
    },
}

#[derive(Debug)]
pub(super) struct ClientConn {
    pub(super) id: ConnId,
    pub(super) stream: Stream,
    pub(super) welcomed: bool,
    /// A key hello waits for the session's challenge nonce.
    pub(super) awaiting_challenge: bool,
    pub(super) timer_at: Option<u64>,
    /// Checker 8: the ordering promises on this connection.
    pub(super) checks: ConnChecks,
}

#[derive(Debug)]
pub(crate) struct Client {
    pub(crate) peer: Arc<str>,
    /// The node it is attached to (`Endpoint::Node(node)`), and its peer's index in that
    /// node's model (`Node::clients[local]` is this client).
    pub(super) node: usize,
    pub(super) local: usize,
    pub(super) token: String,
    /// A key peer's signing key: it says key hellos.
    pub(super) key: Option<ed25519_dalek::SigningKey>,
    pub(super) binary: bool,
    /// Server ops per frame this client asks for with `options` before each hello (0: none).
    pub(super) batch_in: u32,
    pub(super) conn: Option<ClientConn>,
    pub(super) next_r: u64,
    /// Ref -> request, on the current connection.
    pub(super) inflight: BTreeMap<u64, Req>,
    pub(super) retry: VecDeque<usize>,
    pub(super) ops_left: u32,
    pub(crate) script: VecDeque<Action>,
    /// False while the client stays away (scripted `go_offline`).
    pub(crate) online: bool,
    pub(super) max_received: u64,
    pub(super) acked_sent: u64,
    /// Inbox messages received, once per position: sender, target, body.
    pub(crate) received: BTreeMap<u64, (Arc<str>, Target, Body)>,
    pub(super) wake_pending: bool,
    /// After an `unavailable` or a lost connection, the client waits until this time.
    pub(super) backoff_until_ms: u64,
    /// The last event seq received per conversation: a new subscription starts after it.
    pub(super) last_event: BTreeMap<Arc<str>, u64>,
}

impl Client {
    /// Client `peer`, attached to node `node` as its `local`-th peer. Its key, frame kind and
    /// batching are drawn from `rng`, client by client (the run's draws do not depend on the
    /// node count).
    pub(super) fn new(
        peer: &Arc<str>,
        node: usize,
        local: usize,
        options: &SimOptions,
        scripted: bool,
        rng: &mut ChaCha8Rng,
    ) -> Client {
        Client {
            peer: peer.clone(),
            node,
            local,
            token: format!("tok-{peer}"),
            key: rng
                .random_bool(options.key_peer_probability)
                .then(|| ed25519_dalek::SigningKey::from_bytes(&rng.random())),
            binary: rng.random_bool(options.binary_probability),
            batch_in: if rng.random_bool(options.batch_in_probability) {
                [2, 3, 64][rng.random_range(0..3)]
            } else {
                0
            },
            conn: None,
            next_r: 1,
            inflight: BTreeMap::new(),
            retry: VecDeque::new(),
            ops_left: if scripted { 0 } else { options.client_ops_max },
            script: VecDeque::new(),
            online: true,
            max_received: 0,
            acked_sent: 0,
            received: BTreeMap::new(),
            wake_pending: false,
            backoff_until_ms: 0,
            last_event: BTreeMap::new(),
        }
    }
}

impl Simulation {
    /// Client `c` abandons its connection (with a reset, which may or may not arrive): what was
    /// in flight has an unknown outcome. Keyed appends and sends are retried (a send may then
    /// be stored twice, which at-least-once allows); keyless appends are abandoned, since a
    /// retry could store them twice.
    pub(crate) fn drop_conn(&mut self, c: usize) {
        if let Some(mut k) = self.clients[c].conn.take() {
            trace!(self, "{} drops connection {}", self.clients[c].peer, k.id);
            k.stream.close();
            while let Some(seg) = k.stream.poll_segment() {
                self.send_to_node(c, k.id, seg);
            }
        }
        self.lost_conn(c);
    }

    pub(super) fn lost_conn(&mut self, c: usize) {
        let model = &self.nodes[self.clients[c].node].model;
        let client = &mut self.clients[c];
        client.conn = None;
        // In ref order, so retries go out in the order the operations first did. A hedged
        // append is in flight under two refs: it is retried once.
        let mut lost: Vec<usize> = Vec::new();
        for req in std::mem::take(&mut client.inflight).into_values() {
            if let Req::Op { op, .. } = req {
                if model.retryable(op) && !lost.contains(&op) && !client.retry.contains(&op) {
                    lost.push(op);
                }
            }
        }
        for op in lost.into_iter().rev() {
            client.retry.push_front(op);
        }
        let delay = self.rng.random_range(1..=RECONNECT_DELAY_MAX_MS);
        self.clients[c].backoff_until_ms = self.now + delay;
        self.wake(c, delay);
    }

    /// A new connection and its hello: `options` first for a client that takes batch frames,
    /// then a token hello, or a `challenge` for a key peer (its signed hello follows the
    /// nonce). Half the time the two go in one batch frame, as docs/PROTOCOL.md suggests.
    pub(super) fn connect(&mut self, c: usize) -> Checked {
        let id = self.next_conn;
        self.next_conn += 1;
        self.counters.connections += 1;
        let stream = Stream::new(self.now, self.options.stream.clone());
        let key_hello = self.clients[c].key.is_some();
        self.clients[c].conn = Some(ClientConn {
            id,
            stream,
            welcomed: false,
            awaiting_challenge: key_hello,
            timer_at: None,
            checks: ConnChecks::default(),
        });
        let mut ops = Vec::with_capacity(2);
        let batch = self.clients[c].batch_in;
        if batch > 0 {
            ops.push(ClientOp::Options {
                r: OPTIONS_REF,
                batch,
            });
        }
        ops.push(if key_hello {
            ClientOp::Challenge
        } else {
            ClientOp::Hello {
                mesh: MeshId::must(MESH),
                peer: PeerId::must(&self.clients[c].peer),
                token: self.clients[c].token.clone(),
            }
        });
        trace!(
            self,
            "{} connects: connection {id}{}",
            self.clients[c].peer,
            if key_hello { " (key hello)" } else { "" }
        );
        if ops.len() > 1 && self.rng.random_bool(0.5) {
            self.client_send_frame(c, ops);
        } else {
            for op in ops {
                self.client_send(c, &op);
            }
        }
        self.pump_client(c)
    }

    /// A key peer's hello: mesh, peer, its clock and the session's nonce, signed.
    fn signed_hello(&mut self, c: usize, nonce: [u8; 32]) -> ClientOp {
        let client = &self.clients[c];
        let key = client.key.as_ref().expect("a key peer");
        let ts = self.now;
        let message = fabric_proto::hello::hello_message(MESH, &client.peer, ts, &nonce);
        let sig = ed25519_dalek::Signer::sign(key, &message)
            .to_bytes()
            .to_vec();
        self.counters.workload.key_hellos += 1;
        ClientOp::HelloSigned {
            mesh: MeshId::must(MESH),
            peer: PeerId::must(&client.peer),
            sig,
            ts,
        }
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

    /// Ops in one frame: alone, or as a batch (a binary `Batch`, or a JSON array).
    pub(super) fn client_send_frame(&mut self, c: usize, mut ops: Vec<ClientOp>) {
        if ops.len() == 1 {
            let op = ops.pop().expect("one op");
            self.client_send(c, &op);
            return;
        }
        self.counters.workload.client_batches += 1;
        trace!(
            self,
            "{} sends {} ops in one frame",
            self.clients[c].peer,
            ops.len()
        );
        self.client_send(c, &ClientOp::Batch(ops));
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
        self.maybe_ack(c, delivered);
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
            trace!(self, "{} connection {id} {how}", self.clients[c].peer);
            self.lost_conn(c);
        }
        Ok(())
    }

    /// After a frame of deliveries, the client acks what it has (always in the liveness
    /// phase and in scripts, otherwise with `ack_probability`).
    fn maybe_ack(&mut self, c: usize, delivered: bool) {
        let ack = self.phase == Phase::Liveness
            || self.scripted
            || self.rng.random_bool(self.options.ack_probability);
        let upto = self.clients[c].max_received;
        if delivered && ack && upto > self.clients[c].acked_sent {
            self.clients[c].acked_sent = upto;
            trace!(self, "{} ack upto {upto}", self.clients[c].peer);
            self.client_send(c, &ClientOp::Ack { upto });
        }
    }

    fn checks(&mut self, c: usize) -> Checked<&mut ConnChecks> {
        match self.clients[c].conn.as_mut() {
            Some(k) => Ok(&mut k.checks),
            None => fail(
                ViolationKind::UnexpectedReply,
                "a frame on no connection".to_string(),
            ),
        }
    }

    /// One server frame at client `c`; true if it was a delivery.
    fn client_frame(&mut self, c: usize, op: ServerOp) -> Checked<bool> {
        let peer = self.clients[c].peer.clone();
        match op {
            ServerOp::Welcome {
                session,
                acked,
                head,
                ..
            } => {
                trace!(
                    self,
                    "{peer} welcome session={session} acked={acked} head={head}"
                );
                self.client_welcome(c, acked);
            }
            ServerOp::Challenge { nonce } => self.client_challenge(c, nonce)?,
            ServerOp::Ok { r: OPTIONS_REF, .. } if self.clients[c].batch_in > 0 => {}
            ServerOp::Ok { r, pos, seq } => self.client_ok(c, r, pos.or(seq))?,
            ServerOp::Error {
                r: Some(r),
                code: code @ (ErrorCode::Unavailable | ErrorCode::StorageFull),
                message,
            } => {
                trace!(self, "{peer} {code} r={r}: {message}");
                self.client_unavailable(c, r)?;
            }
            ServerOp::Error {
                r: None,
                code,
                message,
            } if code == ErrorCode::Unavailable
                || (code == ErrorCode::Unauthorized && message.contains("timed out"))
                // Only with a reply queue smaller than the node's rule: under the rule a
                // session is owed no more than its queue holds, so it never overflows.
                || (code == ErrorCode::Overloaded && self.options.reply_queue_batches_max != 0) =>
            {
                // The session ends (a shard restarted, a hello the network delayed past the
                // deadline, replies that did not fit its queue); the connection closes behind
                // it.
                trace!(self, "{peer} session error {code:?}: {message}");
            }
            ServerOp::Deliver {
                pos,
                from,
                to,
                body,
                ..
            } => {
                self.client_deliver(c, pos, from, to, body)?;
                return Ok(true);
            }
            ServerOp::Event(e) => {
                trace!(self, "{peer} event {} seq={}", e.conv, e.seq);
                self.counters.workload.events_received += 1;
                let evicted = self.model(c).evicted_upto(&e.conv);
                self.checks(c)?.on_event(&e.conv, e.seq, evicted)?;
                self.clients[c].last_event.insert(e.conv, e.seq);
            }
            ServerOp::Pong { r } => self.checks(c)?.on_pong(r)?,
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

    /// The session's welcome: the client may send, and anything it received before was
    /// acknowledged or is redelivered from `acked`.
    fn client_welcome(&mut self, c: usize, acked: u64) {
        if let Some(k) = self.clients[c].conn.as_mut() {
            k.welcomed = true;
        }
        self.clients[c].acked_sent = acked;
        self.clients[c].max_received = acked;
        self.wake(c, 0);
    }

    /// A `challenge` a key peer asked for: it answers with its signed hello.
    fn client_challenge(&mut self, c: usize, nonce: [u8; 32]) -> Checked {
        let k = self.clients[c].conn.as_mut();
        if !k.as_ref().is_some_and(|k| k.awaiting_challenge) {
            return fail(
                ViolationKind::UnexpectedReply,
                format!(
                    "{} got a challenge it did not ask for",
                    self.clients[c].peer
                ),
            );
        }
        if let Some(k) = k {
            k.awaiting_challenge = false;
        }
        let hello = self.signed_hello(c, nonce);
        self.client_send(c, &hello);
        Ok(())
    }

    /// An inbox delivery at client `c` (checker 8 on its order; the model notes it arrived).
    fn client_deliver(
        &mut self,
        c: usize,
        pos: u64,
        from: Arc<str>,
        to: Target,
        body: Body,
    ) -> Checked {
        trace!(self, "{} deliver pos={pos}", self.clients[c].peer);
        self.checks(c)?.on_deliver(pos)?;
        let local = self.clients[c].local;
        self.model_mut(c).delivered[local].insert(pos);
        if self.scripted {
            // What `MeshSim::received` shows; the swarm has no use for it.
            self.clients[c].received.insert(pos, (from, to, body));
        }
        let client = &mut self.clients[c];
        client.max_received = client.max_received.max(pos);
        Ok(())
    }

    /// An `ok` for ref `r` carrying `value` (a send's position, an append's seq, or none).
    fn client_ok(&mut self, c: usize, r: u64, value: Option<u64>) -> Checked {
        let Some(req) = self.clients[c].inflight.remove(&r) else {
            return fail(
                ViolationKind::UnexpectedReply,
                format!(
                    "{} got ok for r={r}, which it is not waiting for",
                    self.clients[c].peer
                ),
            );
        };
        match req {
            Req::Op { op, ordered: true } => {
                let key = self.model(c).order_key(op);
                self.checks(c)?.answered(&key, r, value)?;
            }
            Req::Op { .. } => {}
            Req::Subscribe { conv } | Req::Unsubscribe { conv } => {
                self.checks(c)?.sub_answered(&conv, r)?;
            }
        }
        let delay = self.rng.random_range(0..=self.think_time_max_ms);
        self.wake(c, delay);
        Ok(())
    }

    /// `unavailable` for ref `r`: refused, or its WAL write failed (and may yet survive in the
    /// page cache). Keyed appends and sends are retried; keyless appends abandoned.
    fn client_unavailable(&mut self, c: usize, r: u64) -> Checked {
        match self.clients[c].inflight.remove(&r) {
            Some(Req::Op { op, ordered }) => {
                if ordered {
                    let key = self.model(c).order_key(op);
                    self.checks(c)?.answered(&key, r, None)?;
                }
                let client = &self.clients[c];
                // A hedged append still in flight under its other ref is not queued twice.
                let queued = client.retry.contains(&op)
                    || client
                        .inflight
                        .values()
                        .any(|q| matches!(q, Req::Op { op: o, .. } if *o == op));
                if self.model(c).retryable(op) && !queued {
                    self.clients[c].retry.push_back(op);
                }
            }
            Some(Req::Subscribe { conv } | Req::Unsubscribe { conv }) => {
                self.checks(c)?.sub_refused(&conv);
            }
            None => {}
        }
        let delay = self.rng.random_range(1..=RECONNECT_DELAY_MAX_MS);
        self.clients[c].backoff_until_ms = self.now + delay;
        self.wake(c, delay);
        Ok(())
    }

    /// The model of client `c`'s node (its operations, its peer's promises).
    pub(super) fn model(&self, c: usize) -> &Model {
        &self.nodes[self.clients[c].node].model
    }

    pub(super) fn model_mut(&mut self, c: usize) -> &mut Model {
        &mut self.nodes[self.clients[c].node].model
    }

    /// The node client `c` is attached to.
    pub(crate) fn node_of(&self, c: usize) -> u32 {
        self.clients[c].node as u32
    }
}
