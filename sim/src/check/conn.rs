//! Checker 8: the ordering promises a client sees on one connection (docs/PROTOCOL.md,
//! "Guarantees"), checked as its frames arrive, after every batch frame is unpacked:
//!
//! - `deliver` frames arrive in increasing `pos`;
//! - a session's sends get increasing positions, and its appends to one conversation
//!   increasing seqs, in the order they were sent, and their `ok`s arrive in that order (only
//!   first attempts count: a keyed retry may be answered at once with its original seq, which
//!   the protocol allows to overtake);
//! - a subscription's events are dense and in seq order, from its `from` (or the oldest
//!   retained seq), none before its `ok` and none after its unsubscribe's `ok`; a jump forward
//!   is allowed only over seqs that retention has taken out of the shard's memory;
//! - `pong`s come in the order of their pings.
//!
//! A correct stack keeps all of them: one connection is one ordered stream, a shard answers a
//! session's writes in LSN order and drains each subscription in seq order, the edge joins
//! frames into batches in queue order, and the router keeps each session's requests to a shard
//! in order.

use super::{fail, Checked, ViolationKind};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// What a request's answer is ordered with: the session's sends (one mesh, one shard), or its
/// appends to one conversation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum OrderKey {
    Inbox,
    Conv(Arc<str>),
}

#[derive(Debug, Default)]
struct Order {
    /// Refs of first attempts sent and not yet answered, in send order.
    waiting: VecDeque<u64>,
    /// The position or seq of the last one acknowledged.
    last: u64,
}

/// One conversation's subscription on this connection, as the client knows it.
#[derive(Debug, Default)]
struct Sub {
    /// The seq the next event must have (`None`: not subscribed, no event may come).
    next: Option<u64>,
    /// A subscribe (with its `from`) or an unsubscribe (`None`) awaiting its `ok`.
    pending: Option<(u64, Option<u64>)>,
}

/// The ordering state of one connection.
#[derive(Debug, Default)]
pub struct ConnChecks {
    last_pos: u64,
    order: BTreeMap<OrderKey, Order>,
    subs: BTreeMap<Arc<str>, Sub>,
    pings: VecDeque<u64>,
}

impl ConnChecks {
    /// A `deliver` of `pos`.
    pub fn on_deliver(&mut self, pos: u64) -> Checked {
        if pos <= self.last_pos {
            return fail(
                ViolationKind::OutOfOrder,
                format!("deliver pos {pos} after pos {}", self.last_pos),
            );
        }
        self.last_pos = pos;
        Ok(())
    }

    /// A first attempt of a send or append went out with ref `r`.
    pub fn sent(&mut self, key: OrderKey, r: u64) {
        self.order.entry(key).or_default().waiting.push_back(r);
    }

    /// The answer to a first attempt: `Some(value)` for an `ok` with its position or seq,
    /// `None` for an error.
    pub fn answered(&mut self, key: &OrderKey, r: u64, value: Option<u64>) -> Checked {
        let Some(o) = self.order.get_mut(key) else {
            return Ok(());
        };
        let Some(value) = value else {
            o.waiting.retain(|x| *x != r);
            return Ok(());
        };
        if o.waiting.front() != Some(&r) {
            return fail(
                ViolationKind::OutOfOrder,
                format!(
                    "{key:?}: ok for r={r} while r={:?} sent before it waits for its answer",
                    o.waiting.front()
                ),
            );
        }
        o.waiting.pop_front();
        if value <= o.last {
            return fail(
                ViolationKind::OutOfOrder,
                format!(
                    "{key:?}: r={r} got {value}, not above {} that a request sent before it got",
                    o.last
                ),
            );
        }
        o.last = value;
        Ok(())
    }

    /// Whether a subscribe or unsubscribe of `conv` awaits its `ok` (the workload sends one
    /// at a time per conversation).
    pub fn sub_pending(&self, conv: &str) -> bool {
        self.subs.get(conv).is_some_and(|s| s.pending.is_some())
    }

    /// Whether `conv` is subscribed (its subscribe answered, no unsubscribe answered since).
    pub fn subscribed(&self, conv: &str) -> bool {
        self.subs.get(conv).is_some_and(|s| s.next.is_some())
    }

    /// A subscribe (`from: Some`) or unsubscribe (`None`) of `conv` went out with ref `r`.
    pub fn sub_sent(&mut self, conv: &Arc<str>, r: u64, from: Option<u64>) {
        self.subs.entry(conv.clone()).or_default().pending = Some((r, from));
    }

    /// The `ok` for a subscribe or unsubscribe of `conv` with ref `r`.
    pub fn sub_answered(&mut self, conv: &str, r: u64) -> Checked {
        let s = self.subs.get_mut(conv);
        let Some((sent, from)) = s.as_ref().and_then(|s| s.pending) else {
            return fail(
                ViolationKind::UnexpectedReply,
                format!("ok r={r} for a subscription of {conv} that waits for none"),
            );
        };
        if sent != r {
            return fail(
                ViolationKind::UnexpectedReply,
                format!("ok r={r} for a subscription of {conv} that waits for r={sent}"),
            );
        }
        let s = s.expect("looked up above");
        s.pending = None;
        // `from` 0 means 1.
        s.next = from.map(|f| f.max(1));
        Ok(())
    }

    /// A subscribe or unsubscribe of `conv` answered with an error: nothing changed.
    pub fn sub_refused(&mut self, conv: &str) {
        if let Some(s) = self.subs.get_mut(conv) {
            s.pending = None;
        }
    }

    /// An `event` of `conv` at `seq`; seqs up to `evicted_upto` may be skipped.
    pub fn on_event(&mut self, conv: &str, seq: u64, evicted_upto: u64) -> Checked {
        let Some(next) = self.subs.get_mut(conv).and_then(|s| s.next.as_mut()) else {
            return fail(
                ViolationKind::OutOfOrder,
                format!("event {conv} seq {seq} without a subscription (before its ok, or after the unsubscribe's)"),
            );
        };
        if seq < *next {
            return fail(
                ViolationKind::OutOfOrder,
                format!("event {conv} seq {seq} where seq {next} was due (a repeat, or backwards)"),
            );
        }
        if seq > *next && seq - 1 > evicted_upto {
            return fail(
                ViolationKind::OutOfOrder,
                format!(
                    "event {conv} seq {seq} skips seqs {next}..={} that retention never evicted (evicted up to {evicted_upto})",
                    seq - 1
                ),
            );
        }
        *next = seq + 1;
        Ok(())
    }

    /// The seq the next event of `conv` must have, if subscribed.
    pub fn next_event(&self, conv: &str) -> Option<u64> {
        self.subs.get(conv).and_then(|s| s.next)
    }

    pub fn ping_sent(&mut self, r: u64) {
        self.pings.push_back(r);
    }

    pub fn on_pong(&mut self, r: u64) -> Checked {
        match self.pings.pop_front() {
            Some(p) if p == r => Ok(()),
            Some(p) => fail(
                ViolationKind::OutOfOrder,
                format!("pong r={r} where the pong for ping r={p} was due"),
            ),
            None => fail(
                ViolationKind::UnexpectedReply,
                format!("pong r={r} for no ping"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ordering_promise_can_fail() {
        // Proves every check here fires on the disorder it is for and passes the order a
        // correct stack produces.
        let mut c = ConnChecks::default();
        c.on_deliver(3).unwrap();
        assert!(c.on_deliver(3).is_err());
        let conv: Arc<str> = "c0".into();
        let key = OrderKey::Conv(conv.clone());
        c.sent(key.clone(), 1);
        c.sent(key.clone(), 2);
        assert!(
            c.answered(&key, 2, Some(5)).is_err(),
            "answered out of order"
        );
        let mut c = ConnChecks::default();
        c.sent(key.clone(), 1);
        c.sent(key.clone(), 2);
        c.answered(&key, 1, Some(5)).unwrap();
        assert!(c.answered(&key, 2, Some(4)).is_err(), "seqs decrease");
        c.sent(key.clone(), 3);
        c.sent(key.clone(), 4);
        c.answered(&key, 3, None).unwrap();
        c.answered(&key, 4, Some(6)).unwrap();
        assert!(
            c.on_event(&conv, 1, 0).is_err(),
            "an event before subscribing"
        );
        c.sub_sent(&conv, 5, Some(4));
        assert!(
            c.on_event(&conv, 4, 0).is_err(),
            "an event before the subscribe's ok"
        );
        c.sub_answered(&conv, 5).unwrap();
        assert!(c.on_event(&conv, 5, 0).is_err(), "replay one seq off");
        c.on_event(&conv, 4, 0).unwrap();
        assert!(c.on_event(&conv, 7, 5).is_err(), "a gap over retained seqs");
        c.on_event(&conv, 7, 6).unwrap();
        assert!(c.on_event(&conv, 7, 6).is_err(), "a repeat");
        c.sub_sent(&conv, 6, None);
        c.on_event(&conv, 8, 0).unwrap();
        c.sub_answered(&conv, 6).unwrap();
        assert!(
            c.on_event(&conv, 9, 0).is_err(),
            "an event after unsubscribing"
        );
        c.ping_sent(7);
        c.ping_sent(8);
        assert!(c.on_pong(8).is_err());
    }
}
