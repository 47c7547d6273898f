//! Request deadlines: every request that waits for an answer (send, append, subscribe,
//! unsubscribe) is answered within `request_timeout_ms`, by its shard or, failing that, by the
//! session itself with `unavailable`. A shard without a quorum, a forward to a leader that
//! went silent, or a wedged disk must not leave a client waiting forever: it learns in bounded
//! time that the outcome is unknown, and retries with its idempotency key.
//!
//! The shard's own answer may still come after the session gave up; it is then dropped (the
//! client already has its one answer for that request). A client may reuse a ref while an
//! earlier request with it is out, so each ref keeps its requests in order: answers and
//! deadlines both take the oldest first (one shard answers in order, and the client cannot
//! tell two requests with one ref apart anyway).
//!
//! Size: one timer per request awaiting its answer, and one count per ref whose answer is
//! late: both bounded by the session's in-flight limit, since a request stays counted in
//! flight until its shard answers, late or not.

use std::collections::{BTreeMap, HashMap, VecDeque};

#[derive(Debug, Default)]
pub(crate) struct Deadlines {
    timeout_ms: u64,
    /// Requests awaiting their answer by start order (which is deadline order: one timeout
    /// for all): number -> (deadline, ref).
    timers: BTreeMap<u64, (u64, u64)>,
    /// The numbers of each ref's waiting requests, oldest first.
    by_ref: HashMap<u64, VecDeque<u64>>,
    /// Per ref: requests the session answered at their deadline whose shard has not answered
    /// yet; that many of the ref's next answers are dropped.
    late: HashMap<u64, u32>,
    next: u64,
}

/// What to do with a shard's answer to a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The first answer to the request: pass it on.
    Forward,
    /// The session answered it at its deadline already: drop this one.
    Late,
}

impl Deadlines {
    pub(crate) fn new(timeout_ms: u64) -> Deadlines {
        Deadlines {
            timeout_ms,
            ..Deadlines::default()
        }
    }

    /// A request with ref `r` went to its shard at `now`.
    pub(crate) fn started(&mut self, now: u64, r: u64) {
        let n = self.next;
        self.next += 1;
        self.timers
            .insert(n, (now.saturating_add(self.timeout_ms), r));
        self.by_ref.entry(r).or_default().push_back(n);
    }

    /// A shard answered a request with ref `r`.
    pub(crate) fn answered(&mut self, r: u64) -> Answer {
        if let Some(late) = self.late.get_mut(&r) {
            *late -= 1;
            if *late == 0 {
                self.late.remove(&r);
            }
            return Answer::Late;
        }
        if let Some(n) = self.take_oldest(r) {
            self.timers.remove(&n);
        }
        Answer::Forward
    }

    /// The earliest deadline of a request still waiting.
    pub(crate) fn poll_timeout(&self) -> Option<u64> {
        self.timers.first_key_value().map(|(_, (d, _))| *d)
    }

    /// Takes the next request whose deadline is reached at `now`; its ref is answered by the
    /// session, and its shard's answer, when it comes, is dropped.
    pub(crate) fn pop_expired(&mut self, now: u64) -> Option<u64> {
        let (&n, &(deadline, r)) = self.timers.first_key_value()?;
        if deadline > now {
            return None;
        }
        self.timers.remove(&n);
        let oldest = self.take_oldest(r);
        debug_assert_eq!(oldest, Some(n), "a ref's requests expire in order");
        *self.late.entry(r).or_insert(0) += 1;
        Some(r)
    }

    fn take_oldest(&mut self, r: u64) -> Option<u64> {
        let queue = self.by_ref.get_mut(&r)?;
        let n = queue.pop_front();
        if queue.is_empty() {
            self.by_ref.remove(&r);
        }
        n
    }

    /// Requests awaiting their answer, and requests answered late whose shard has not
    /// answered yet.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, u32) {
        (self.timers.len(), self.late.values().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_gets_one_answer_within_its_deadline() {
        // Proves the deadline rule: a request not answered in time is given back once at its
        // deadline (not before), and its shard's later answer is marked late exactly once.
        let mut d = Deadlines::new(100);
        d.started(1000, 7);
        d.started(1050, 8);
        assert_eq!(d.poll_timeout(), Some(1100));
        assert_eq!(d.pop_expired(1099), None);
        assert_eq!(d.answered(8), Answer::Forward, "8 answered in time");
        assert_eq!(d.pop_expired(1100), Some(7));
        assert_eq!(d.pop_expired(10_000), None, "8 has no timer any more");
        assert_eq!(d.poll_timeout(), None);
        assert_eq!(d.counts(), (0, 1));
        assert_eq!(d.answered(7), Answer::Late);
        assert_eq!(d.counts(), (0, 0));
    }

    #[test]
    fn a_reused_ref_keeps_its_requests_in_order() {
        // Proves that two requests with one ref are timed and answered oldest first: the first
        // expires, its late answer is dropped, the second's answer is passed on.
        let mut d = Deadlines::new(100);
        d.started(0, 5);
        d.started(60, 5);
        assert_eq!(d.pop_expired(100), Some(5));
        assert_eq!(d.poll_timeout(), Some(160));
        assert_eq!(
            d.answered(5),
            Answer::Late,
            "the first request's own answer"
        );
        assert_eq!(d.answered(5), Answer::Forward, "the second's, in time");
        assert_eq!(d.poll_timeout(), None);
        assert_eq!(d.counts(), (0, 0));
    }
}
