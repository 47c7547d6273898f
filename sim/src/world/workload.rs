//! What the simulated clients ask for: sends (direct, group, broadcast), appends (most with
//! idempotency keys, retried with the same key after a lost connection, some resent while
//! still in flight), subscribes and unsubscribes, pings, several requests in one batch frame,
//! and scripted actions.

use super::*;
use fabric_proto::ConvId;
use fabric_proto::{GroupId, PeerId};

impl Simulation {
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
        let window = self.options.inflight_requests_max;
        let room = window.saturating_sub(self.clients[c].inflight.len());
        if room == 0 {
            return Ok(());
        }
        let n = if room > 1 && self.rng.random_bool(self.options.client_batch_probability) {
            self.rng.random_range(2..=room.min(CLIENT_BATCH_OPS_MAX))
        } else {
            1
        };
        let mut frame = Vec::with_capacity(n + 1);
        while frame.len() < n {
            match self.next_request(c) {
                Some(op) => frame.push(op),
                None => break,
            }
        }
        if frame.is_empty() {
            return Ok(());
        }
        if self.rng.random_bool(self.options.ping_probability) {
            frame.push(self.ping(c));
        }
        self.client_send_frame(c, frame);
        self.pump_client(c)?;
        if self.has_work(c) && self.clients[c].inflight.len() < window {
            let delay = self.rng.random_range(0..=self.think_time_max_ms);
            self.wake(c, delay);
        }
        Ok(())
    }

    /// Whether client `c` has something to send when its window has room.
    fn has_work(&self, c: usize) -> bool {
        let client = &self.clients[c];
        !client.retry.is_empty() || !client.script.is_empty() || self.new_work(c)
    }

    fn new_work(&self, c: usize) -> bool {
        self.phase == Phase::Faults && !self.load_paused && self.clients[c].ops_left > 0
    }

    /// The next request of client `c`: a retry, a scripted action, or new work.
    fn next_request(&mut self, c: usize) -> Option<ClientOp> {
        if let Some(op) = self.clients[c].retry.pop_front() {
            return Some(self.op_request(c, op, false));
        }
        if let Some(action) = self.clients[c].script.pop_front() {
            let op = self.scripted_op(c, action);
            return Some(self.op_request(c, op, true));
        }
        if !self.new_work(c) {
            return None;
        }
        self.clients[c].ops_left -= 1;
        let roll: f64 = self.rng.random();
        let subscribe = self.options.subscribe_probability;
        let other = if roll < subscribe {
            self.subscription_request(c)
        } else if roll < subscribe + self.options.hedge_probability {
            self.hedge_request(c)
        } else {
            None
        };
        if other.is_some() {
            return other;
        }
        let op = self.new_op(c);
        Some(self.op_request(c, op, true))
    }

    fn next_ref(&mut self, c: usize) -> u64 {
        let r = self.clients[c].next_r;
        self.clients[c].next_r += 1;
        r
    }

    fn conn_id(&self, c: usize) -> ConnId {
        self.clients[c].conn.as_ref().expect("connected").id
    }

    /// The request for operation `op`; `first` for its first attempt. Sends and first
    /// attempts are followed by the ordering checker (a retried append may be answered at once
    /// with its original seq).
    fn op_request(&mut self, c: usize, op: usize, first: bool) -> ClientOp {
        let r = self.next_ref(c);
        let id = self.conn_id(c);
        let o = &self.model(c).ops[op];
        // A retried keyed op may be answered at once with its original position or seq.
        let ordered = first || matches!(o.kind, OpKind::Send { key: None, .. });
        let (client_op, what) = match &o.kind {
            OpKind::Send { to, key, .. } => (
                ClientOp::Send {
                    r,
                    to: to.clone(),
                    body: o.body.clone(),
                    key: key.clone(),
                },
                format!("send to {} key={key:?}", to.to_wire()),
            ),
            OpKind::Append { conv, key } => (
                ClientOp::Append {
                    r,
                    conv: ConvId::must(conv),
                    body: o.body.clone(),
                    key: key.clone(),
                },
                format!("append {conv} key={key:?}"),
            ),
        };
        let key = self.model(c).order_key(op);
        let req = Req::Op { op, ordered };
        self.clients[c].inflight.insert(r, req.clone());
        self.refs.insert((id, r), req);
        if ordered {
            if let Some(k) = self.clients[c].conn.as_mut() {
                k.checks.sent(key, r);
            }
        }
        self.counters.workload.requests += 1;
        let again = if first { "" } else { " (again)" };
        trace!(self, "{} op {op} r={r} {what}{again}", self.clients[c].peer);
        client_op
    }

    /// A subscribe of a conversation the connection does not follow, or an unsubscribe of
    /// one it does; `None` if that conversation's last one is still unanswered. A subscribe
    /// starts after the last event received (as docs/PROTOCOL.md advises after a reconnect),
    /// at 0 or 1, or anywhere up to just past the acknowledged end.
    fn subscription_request(&mut self, c: usize) -> Option<ClientOp> {
        let conv: Arc<str> = format!("c{}", self.rng.random_range(0..self.options.convs)).into();
        let k = self.clients[c].conn.as_ref()?;
        if k.checks.sub_pending(&conv) {
            return None;
        }
        let subscribed = k.checks.subscribed(&conv);
        let r = self.next_ref(c);
        let id = self.conn_id(c);
        let (req, op, from) = if subscribed {
            self.counters.workload.unsubscribes += 1;
            let op = ClientOp::Unsubscribe {
                r,
                conv: ConvId::must(&conv),
            };
            (Req::Unsubscribe { conv: conv.clone() }, op, None)
        } else {
            self.counters.workload.subscribes += 1;
            let last = self.clients[c].last_event.get(&conv).copied();
            let from = match self.rng.random_range(0..10) {
                0..=6 => last.map_or(1, |s| s + 1),
                7 => self.rng.random_range(0..=1),
                _ => self
                    .rng
                    .random_range(1..=self.model(c).conv_acked_max(&conv) + 3),
            };
            let op = ClientOp::Subscribe {
                r,
                conv: ConvId::must(&conv),
                from,
            };
            (Req::Subscribe { conv: conv.clone() }, op, Some(from))
        };
        trace!(
            self,
            "{} r={r} {} {conv} from={from:?}",
            self.clients[c].peer,
            if subscribed {
                "unsubscribe"
            } else {
                "subscribe"
            }
        );
        if let Some(k) = self.clients[c].conn.as_mut() {
            k.checks.sub_sent(&conv, r, from);
        }
        self.clients[c].inflight.insert(r, req.clone());
        self.refs.insert((id, r), req);
        Some(op)
    }

    /// A keyed append or send still waiting for its answer, sent again with a new ref (a
    /// client whose request timer fired); `None` if there is none.
    fn hedge_request(&mut self, c: usize) -> Option<ClientOp> {
        let op = self.clients[c].inflight.values().find_map(|q| match q {
            Req::Op { op, .. } if self.model(c).keyed(*op) => Some(*op),
            _ => None,
        })?;
        self.counters.workload.hedges += 1;
        Some(self.op_request(c, op, false))
    }

    fn ping(&mut self, c: usize) -> ClientOp {
        let r = self.next_ref(c);
        if let Some(k) = self.clients[c].conn.as_mut() {
            k.checks.ping_sent(r);
        }
        self.counters.workload.pings += 1;
        ClientOp::Ping { r }
    }

    /// A new operation for client `c`, with a body unique to it (its id twice, and padding).
    fn new_op(&mut self, c: usize) -> usize {
        let id = self.model(c).ops.len();
        let pad = "x".repeat(self.rng.random_range(0..=BODY_PAD_BYTES_MAX));
        let body =
            Body::from_trusted(format!("{{\"op\":{id},\"pad\":\"{pad}\",\"again\":{id}}}").into());
        let local = self.clients[c].local;
        let kind = if self.rng.random_bool(0.5) {
            // A peer of the client's own mesh (its node's; all clients with one node).
            let n = self.model(c).peers.len();
            let to = match self.rng.random_range(0..10) {
                0 | 1 => Target::Group(GroupId::must(&format!("g{}", self.rng.random_range(0..2)))),
                2 => Target::All,
                _ => {
                    let i = self.rng.random_range(0..n);
                    Target::Peer(PeerId::must(&self.model(c).peers[i]))
                }
            };
            let recipients = self.model(c).recipients(local, &to);
            let key = (self.rng.random_bool(0.5)).then(|| Arc::from(format!("s{id}")));
            OpKind::Send {
                to,
                recipients,
                key,
            }
        } else {
            let conv: Arc<str> =
                format!("c{}", self.rng.random_range(0..self.options.convs)).into();
            let key = self
                .rng
                .random_bool(0.8)
                .then(|| Arc::from(format!("k{id}")));
            OpKind::Append { conv, key }
        };
        self.model_mut(c).add_op(local, kind, body)
    }

    /// A scripted operation: the user's body inside an envelope that makes it unique, which
    /// the checkers need to tell operations apart (`crate::script` unwraps it again).
    pub(super) fn scripted_op(&mut self, c: usize, action: Action) -> usize {
        let id = self.model(c).ops.len();
        let local = self.clients[c].local;
        let wrap = |body: &str| {
            Body::from_trusted(format!("{{\"op\":{id},\"user\":{body},\"again\":{id}}}").into())
        };
        let (kind, body) = match action {
            Action::Send { to, body } => {
                let recipients = self.model(c).recipients(local, &to);
                let key = None;
                (
                    OpKind::Send {
                        to,
                        recipients,
                        key,
                    },
                    wrap(&body),
                )
            }
            Action::Append { conv, body, key } => (OpKind::Append { conv, key }, wrap(&body)),
        };
        self.model_mut(c).add_op(local, kind, body)
    }
}
