//! The HTTP client beside each node: conversation appends and page reads, each a REST call
//! run by the edge's own `RestCall` core (the one the node's HTTP handler drives: token first,
//! the session's checks, one answer, `Closed` to every shard that may hold the session), its
//! requests through a `Router` into the shards' input channels. They do not cross the
//! simulated network (the HTTP client sits beside the node), but they meet every shard fault:
//! a shard restart answers them `unavailable` (the node's 503), as the host's session close
//! tells the core; a node crash loses them with their connections.
//!
//! An append is an operation of its peer's model like a WebSocket one: its `seq` is checked
//! and must stay (checkers 1 and 2); an unanswered one has an unknown outcome. Each page is
//! checked (checkers 1, 2 and 7): its entries are durable with the bodies their appends wrote,
//! dense and in seq order from `from` (or from the oldest retained seq, if retention evicted
//! the ones before), up to `limit` or the head; the head covers every acknowledged seq.

use super::*;
use fabric_edge::rest::{RestAnswer, RestCall, RestConfig, RestOp, RestRequest};
use fabric_proto::ProtoError;

/// Page sizes a read asks for, small ones more often (`READ_LIMIT_MAX` reads a whole
/// conversation; every entry of a page is checked, which costs the simulator time).
const HTTP_READ_LIMITS: [u32; 8] = [1, 1, 10, 10, 100, 100, 1_000, fabric_proto::READ_LIMIT_MAX];

/// One REST call in progress.
#[derive(Debug)]
pub(super) struct HttpCall {
    call: RestCall,
    /// The client whose peer token it carries.
    client: usize,
    what: HttpWhat,
}

#[derive(Debug)]
enum HttpWhat {
    Read {
        conv: Arc<str>,
        from: u64,
        limit: u32,
    },
    /// The model's operation it performs.
    Append { op: usize },
}

impl Simulation {
    /// Queues node `n`'s HTTP client's next call, while faults are on.
    pub(super) fn schedule_http_call(&mut self, n: usize) {
        let mean = self.options.http_call_interval_ms_mean;
        if mean > 0 && self.phase == Phase::Faults {
            let gap = self.rng.random_range(1..=mean.saturating_mul(2));
            self.schedule_at(self.now + gap, Event::HttpCall { node: n });
        }
    }

    /// Node `n`'s HTTP client reads a page of a conversation or appends to one, as one of the
    /// node's peers (if the node is up: otherwise its connection is refused).
    pub(super) fn http_call(&mut self, n: usize) -> Checked {
        self.schedule_http_call(n);
        if !self.nodes[n].up || self.phase != Phase::Faults {
            return Ok(());
        }
        let clients = &self.nodes[n].clients;
        let client = clients[self.rng.random_range(0..clients.len())];
        let conv: Arc<str> = format!("c{}", self.rng.random_range(0..self.options.convs)).into();
        let (op, what) = if self.rng.random_bool(0.5) {
            self.http_append(client, conv)
        } else {
            self.http_read(n, conv)
        };
        let session = self.nodes[n].new_session();
        let request = RestRequest {
            mesh: MESH.into(),
            token: self.clients[client].token.clone(),
            op,
        };
        let config = RestConfig::new(&self.session_config);
        trace!(self, "http session {session}: {what:?} as c{client}");
        let call = RestCall::new(session, self.now, &config, request);
        let timeout = call.poll_timeout();
        self.nodes[n]
            .http
            .insert(session, HttpCall { call, client, what });
        if let Some(at) = timeout {
            self.schedule_at(at, Event::HttpTimeout { node: n, session });
        }
        self.http_pump(n, session)
    }

    /// A new keyed or keyless append of `client`'s, as the model's operation.
    fn http_append(&mut self, client: usize, conv: Arc<str>) -> (RestOp, HttpWhat) {
        let id = self.model(client).ops.len();
        let body = format!("{{\"op\":{id},\"pad\":\"http\",\"again\":{id}}}");
        let key = self
            .rng
            .random_bool(0.5)
            .then(|| Arc::<str>::from(format!("h{id}")));
        let payload = match &key {
            Some(k) => format!("{{\"body\":{body},\"key\":\"{k}\"}}"),
            None => format!("{{\"body\":{body}}}"),
        };
        let kind = OpKind::Append {
            conv: conv.clone(),
            key,
        };
        let local = self.clients[client].local;
        let body = Body::from_trusted(body.into());
        let op = self.model_mut(client).add_op(local, kind, body);
        let rest = RestOp::Append {
            conv: conv.to_string(),
            payload: payload.into(),
        };
        (rest, HttpWhat::Append { op })
    }

    fn http_read(&mut self, n: usize, conv: Arc<str>) -> (RestOp, HttpWhat) {
        let from = match self.rng.random_range(0..4) {
            0 => 0,
            1 => 1,
            _ => self
                .rng
                .random_range(1..=self.nodes[n].model.conv_acked_max(&conv) + 2),
        };
        let limit = HTTP_READ_LIMITS[self.rng.random_range(0..HTTP_READ_LIMITS.len())];
        // Linearizable reads only: the model checks every page against what was acknowledged.
        let rest = RestOp::Read {
            conv: conv.to_string(),
            from,
            limit,
            local: false,
        };
        (rest, HttpWhat::Read { conv, from, limit })
    }

    /// The call's requests through the HTTP router into the shards' channels, then its
    /// answer, if it has one (after which it is gone, its `Closed`s sent).
    fn http_pump(&mut self, n: usize, session: SessionId) -> Checked {
        let now = self.now;
        let node = &mut self.nodes[n];
        let Some(h) = node.http.get_mut(&session) else {
            return Ok(());
        };
        while let Some((route, req)) = h.call.poll_request() {
            node.http_router.handle_request(now, route, req);
        }
        while let Some((shard, batch)) = node.http_router.poll_batch() {
            node.hosts[shard as usize].input.push_back(batch);
        }
        let Some(answer) = h.call.poll_answer() else {
            return Ok(());
        };
        let h = node.http.remove(&session).expect("looked up above");
        self.http_answer(n, session, h, answer)
    }

    /// A shard's reply to an HTTP session.
    pub(super) fn http_reply(&mut self, n: usize, shard: ShardIdx, o: Output) -> Checked {
        if let Some(h) = self.nodes[n].http.get_mut(&o.session) {
            h.call.handle_reply(self.now, shard, o.reply);
        }
        self.http_pump(n, o.session)
    }

    /// The host closed an HTTP session (its shard's incarnation ended, or its replies could
    /// not be queued).
    pub(super) fn http_closed(
        &mut self,
        n: usize,
        shard: ShardIdx,
        session: SessionId,
        why: CloseReason,
    ) -> Checked {
        if let Some(h) = self.nodes[n].http.get_mut(&session) {
            match why {
                // A call is one request: a leader change under it is a restart for it.
                CloseReason::Restarted | CloseReason::LeaderChanged => {
                    h.call.handle_shard_restarted(self.now, shard)
                }
                CloseReason::Overloaded => h.call.handle_shard_overloaded(self.now, shard),
            }
        }
        self.http_pump(n, session)
    }

    /// The call's answer deadline passed.
    pub(super) fn http_timeout(&mut self, n: usize, session: SessionId) -> Checked {
        if let Some(h) = self.nodes[n].http.get_mut(&session) {
            h.call.handle_timeout(self.now);
        }
        self.http_pump(n, session)
    }

    fn http_answer(
        &mut self,
        n: usize,
        session: SessionId,
        h: HttpCall,
        answer: RestAnswer,
    ) -> Checked {
        trace!(self, "http session {session} answered {answer:?}");
        match (h.what, answer) {
            (HttpWhat::Append { op }, RestAnswer::Appended { seq }) => {
                self.counters.workload.http_appends += 1;
                self.model_mut(h.client).on_ok(op, None, Some(seq))
            }
            (HttpWhat::Read { conv, from, limit }, RestAnswer::Page { events, head }) => {
                self.counters.workload.http_reads += 1;
                self.check_page(n, (&conv, from, limit), &events, head)
            }
            // A shard that is down or restarted (the node's 503), one that could not queue the
            // answer, a full disk: the outcome of an append is unknown; nothing to check.
            (
                _,
                RestAnswer::Error(ProtoError {
                    code: ErrorCode::Unavailable | ErrorCode::Overloaded | ErrorCode::StorageFull,
                    ..
                }),
            ) => Ok(()),
            (what, other) => fail(
                ViolationKind::UnexpectedReply,
                format!("http session {session} ({what:?}) got {other:?}"),
            ),
        }
    }

    /// Checkers 1, 2 and 7 on one page.
    fn check_page(
        &mut self,
        n: usize,
        (conv, from, limit): (&Arc<str>, u64, u32),
        events: &[fabric_proto::DeliveredEvent],
        head: u64,
    ) -> Checked {
        let acked = self.nodes[n].model.conv_acked_max(conv);
        if head < acked {
            return fail(
                ViolationKind::LostWrite,
                format!("http read of {conv}: head {head} is below acknowledged seq {acked}"),
            );
        }
        let evicted = self.nodes[n].model.evicted_upto(conv);
        let start = from.max(1);
        let ok = match events.first() {
            // From `from`, or past evicted seqs only; dense; up to `limit` or the head.
            Some(e) => {
                let first = e.seq;
                let end = head.min(first.saturating_add(u64::from(limit)) - 1);
                first >= start
                    && (first == start || first - 1 <= evicted)
                    && events.len() as u64 == end.saturating_add(1).saturating_sub(first)
                    && events
                        .iter()
                        .enumerate()
                        .all(|(i, e)| e.seq == first + i as u64)
            }
            // Empty: no retained seq from `from` to the head.
            None => head < start.max(evicted + 1),
        };
        if !ok {
            let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
            return fail(
                ViolationKind::SeqGap,
                format!(
                    "http read of {conv} from {from} limit {limit} (head {head}, evicted up to \
                     {evicted}) returned seqs {seqs:?}"
                ),
            );
        }
        let shard = self.conv_shard(conv);
        for e in events {
            self.check_durable_event(n, shard, "an http client", e)?;
        }
        Ok(())
    }
}
