//! HTTP-style conversation reads, as the node's HTTP path makes them once requests go
//! through the router: on a session of its own, `Auth` (the bearer token) to the mesh's
//! shard, then `Read` to the conversation's shard, then `Closed`, each sent through a
//! `Router` into the shards' input channels. They do not cross the simulated network (the
//! HTTP client sits beside the node), but they meet every shard fault: a crash or a shard
//! restart loses them as it loses the node's in-flight HTTP calls (answered 503).
//!
//! Each page is checked (checkers 1, 2 and 7): its entries are durable with the bodies their
//! appends wrote, dense and in seq order from `from` (or from the oldest retained seq, if
//! retention evicted the ones before), up to `limit` or the head; the head covers every
//! acknowledged seq.

use super::*;

/// Page sizes a read asks for, small ones more often (`READ_LIMIT_MAX` reads a whole
/// conversation; every entry of a page is checked, which costs the simulator time).
const HTTP_READ_LIMITS: [u32; 8] = [1, 1, 10, 10, 100, 100, 1_000, fabric_proto::READ_LIMIT_MAX];

/// One HTTP read in progress.
#[derive(Debug)]
pub(super) struct HttpRead {
    /// The shard whose answer it waits for.
    shard: ShardIdx,
    /// The peer whose token it carries.
    peer: usize,
    conv: Arc<str>,
    from: u64,
    limit: u32,
    authed: bool,
}

impl Simulation {
    /// Queues the next read of node `n`'s HTTP client, while faults are on.
    pub(super) fn schedule_http_read(&mut self, n: usize) {
        let mean = self.options.http_read_interval_ms_mean;
        if mean > 0 && self.phase == Phase::Faults {
            let gap = self.rng.random_range(1..=mean.saturating_mul(2));
            self.schedule_at(self.now + gap, Event::HttpRead { node: n });
        }
    }

    /// Node `n`'s HTTP client reads a page of a conversation as one of the node's peers (if
    /// the node is up: otherwise its connection is refused).
    pub(super) fn http_read(&mut self, n: usize) {
        self.schedule_http_read(n);
        if !self.nodes[n].up || self.phase != Phase::Faults {
            return;
        }
        let conv: Arc<str> = format!("c{}", self.rng.random_range(0..self.options.convs)).into();
        let peer = self.nodes[n].clients[self.rng.random_range(0..self.nodes[n].clients.len())];
        let from = match self.rng.random_range(0..4) {
            0 => 0,
            1 => 1,
            _ => self
                .rng
                .random_range(1..=self.nodes[n].model.conv_acked_max(&conv) + 2),
        };
        let limit = HTTP_READ_LIMITS[self.rng.random_range(0..HTTP_READ_LIMITS.len())];
        let session = self.nodes[n].new_session();
        trace!(
            self,
            "http session {session} reads {conv} from={from} limit={limit} as {}",
            self.clients[peer].peer
        );
        self.nodes[n].http.insert(
            session,
            HttpRead {
                shard: self.mesh_shard,
                peer,
                conv,
                from,
                limit,
                authed: false,
            },
        );
        let auth = ShardOp::Auth {
            r: 0,
            mesh: MESH.into(),
            token: self.clients[peer].token.clone(),
        };
        self.http_send(n, session, auth);
    }

    /// One request of an HTTP session, through the HTTP router into the shards' channels.
    fn http_send(&mut self, n: usize, session: SessionId, op: ShardOp) {
        let node = &mut self.nodes[n];
        node.http_router
            .handle_request(self.now, Route::ByKey, Request { session, op });
        while let Some((shard, batch)) = node.http_router.poll_batch() {
            node.hosts[shard as usize].input.push_back(batch);
        }
    }

    /// A shard's answer to an HTTP session: `Authed`, then the page.
    pub(super) fn http_reply(&mut self, n: usize, o: Output) -> Checked {
        let session = o.session;
        let h = self.nodes[n]
            .http
            .get_mut(&session)
            .expect("an HTTP session");
        match o.reply {
            Reply::Authed { peer, .. } if !h.authed => {
                let want = &self.clients[h.peer].peer;
                if peer != *want {
                    return fail(
                        ViolationKind::UnexpectedReply,
                        format!("http session {session}: {want}'s token authenticated {peer}"),
                    );
                }
                h.authed = true;
                let (conv, from, limit) = (h.conv.clone(), h.from, h.limit);
                let shard = self.conv_shard(&conv);
                if let Some(h) = self.nodes[n].http.get_mut(&session) {
                    h.shard = shard;
                }
                let read = ShardOp::Read {
                    r: 0,
                    mesh: MESH.into(),
                    conv,
                    from,
                    limit,
                };
                self.http_send(n, session, read);
                Ok(())
            }
            Reply::Messages { events, head, .. } if h.authed => {
                let h = self.nodes[n]
                    .http
                    .remove(&session)
                    .expect("an HTTP session");
                trace!(
                    self,
                    "http session {session} got {} events of {} head={head}",
                    events.len(),
                    h.conv
                );
                self.counters.workload.http_reads += 1;
                self.check_page(n, &h, &events, head)?;
                // As the HTTP glue does: let the shards forget the one-request session.
                self.http_send(n, session, ShardOp::Closed);
                Ok(())
            }
            // A shard that is down answers `unavailable` (the node's 503): the request ends.
            Reply::Frame(fabric_proto::ServerOp::Error {
                code: fabric_proto::ErrorCode::Unavailable,
                message,
                ..
            }) => {
                self.nodes[n].http.remove(&session);
                trace!(self, "http session {session} unavailable: {message}");
                self.http_send(n, session, ShardOp::Closed);
                Ok(())
            }
            other => fail(
                ViolationKind::UnexpectedReply,
                format!("http session {session} got {other:?}"),
            ),
        }
    }

    /// Checkers 1, 2 and 7 on one page.
    fn check_page(
        &mut self,
        n: usize,
        h: &HttpRead,
        events: &[fabric_proto::DeliveredEvent],
        head: u64,
    ) -> Checked {
        let conv = &h.conv;
        let acked = self.nodes[n].model.conv_acked_max(conv);
        if head < acked {
            return fail(
                ViolationKind::LostWrite,
                format!("http read of {conv}: head {head} is below acknowledged seq {acked}"),
            );
        }
        let evicted = self.nodes[n].model.evicted_upto(conv);
        let start = h.from.max(1);
        let ok = match events.first() {
            // From `from`, or past evicted seqs only; dense; up to `limit` or the head.
            Some(e) => {
                let first = e.seq;
                let end = head.min(first.saturating_add(u64::from(h.limit)) - 1);
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
                    "http read of {conv} from {} limit {} (head {head}, evicted up to \
                     {evicted}) returned seqs {seqs:?}",
                    h.from, h.limit
                ),
            );
        }
        for e in events {
            self.check_durable_event(n, h.shard, "an http client", e)?;
        }
        Ok(())
    }

    /// A shard restarted: HTTP requests waiting for it are lost (the node answers them 503).
    pub(super) fn http_forget(&mut self, n: usize, shard: ShardIdx) {
        self.nodes[n].http.retain(|_, h| h.shard != shard);
    }
}
