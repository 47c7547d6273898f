//! The inbox peer both `mesh` and `fanout` are made of: one session that sends a bounded number
//! of messages (keeping a window in flight, each body stamped with its send time) while it
//! reads and acks its own deliveries, and stops once every sender is done and it has every
//! message addressed to it that was acked, or at a deadline.

use crate::error::BenchError;
use crate::stats::{new_histogram, since_stamp_us, stamp_us, stamped_body};
use crate::wire::WsConn;
use fabric_proto::{Body, ClientOp, ServerOp, Target};
use hdrhistogram::Histogram;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a peer waits for a frame before it looks at its exit conditions again.
const POLL_MS: u64 = 50;
/// Most already-received frames taken before the peer writes again.
const READ_FRAMES_PER_WRITE_MAX: usize = 256;

/// Bits a [`Seen`] keeps in its bitmap before it falls back to a set: positions this far past
/// the first one seen (32 MiB of bitmap) are not from a run of this harness's sizes.
const SEEN_BITS_MAX: u64 = 1 << 28;

/// The unique positions (Fabric) or stream sequences (NATS) one peer has received. Both are
/// dense and arrive in ascending order, so a bitmap from the first one seen holds them in a
/// few KiB and answers in a couple of instructions: the `HashSet<u64>` it replaced (SipHash,
/// rehashing as it grew to 200,000 entries) took 17% of the load generator's CPU in `fanout`,
/// work a real subscriber does not do, taken from the node on the same two cores. Anything
/// below the first or too far past it goes to a set.
#[derive(Debug, Default)]
pub struct Seen {
    base: Option<u64>,
    words: Vec<u64>,
    outside: HashSet<u64>,
    len: usize,
}

impl Seen {
    /// The bitmap word and bit of `pos`, or None if it lies below the base or too far past it.
    fn slot(base: u64, pos: u64) -> Option<(usize, u64)> {
        let i = pos.checked_sub(base).filter(|&i| i < SEEN_BITS_MAX)?;
        Some(((i / 64) as usize, 1u64 << (i % 64)))
    }

    /// Adds `pos`; false if it was there already.
    pub fn insert(&mut self, pos: u64) -> bool {
        let base = *self.base.get_or_insert(pos);
        let fresh = match Seen::slot(base, pos) {
            Some((word, bit)) => {
                if word >= self.words.len() {
                    self.words.resize(word + 1, 0);
                }
                let fresh = self.words[word] & bit == 0;
                self.words[word] |= bit;
                fresh
            }
            None => self.outside.insert(pos),
        };
        self.len += usize::from(fresh);
        fresh
    }

    pub fn contains(&self, pos: u64) -> bool {
        let Some(base) = self.base else { return false };
        match Seen::slot(base, pos) {
            Some((word, bit)) => self.words.get(word).is_some_and(|w| w & bit != 0),
            None => self.outside.contains(&pos),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Who an acked send is for (by peer index), so that deliveries can be checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipients {
    One(usize),
    /// Every receiving peer (a group all receivers are in, or `*` with a non-receiving sender).
    All,
}

/// Counts shared by every peer of a run.
pub struct Shared {
    /// Acked sends per receiving peer.
    expected: Vec<AtomicU64>,
    /// Acked sends for [`Recipients::All`].
    expected_all: AtomicU64,
    senders_done: AtomicUsize,
    senders_total: usize,
    /// Deliveries so far, all peers (for the progress bar).
    pub delivered: Arc<AtomicU64>,
}

impl Shared {
    pub fn new(receivers: usize, senders_total: usize) -> Arc<Shared> {
        Arc::new(Shared {
            expected: (0..receivers).map(|_| AtomicU64::new(0)).collect(),
            expected_all: AtomicU64::new(0),
            senders_done: AtomicUsize::new(0),
            senders_total,
            delivered: Arc::new(AtomicU64::new(0)),
        })
    }

    /// An acked send for `who` (so its recipients know to wait for it).
    pub fn acked(&self, who: Recipients) {
        match who {
            Recipients::One(i) => {
                self.expected[i].fetch_add(1, Ordering::Relaxed);
            }
            Recipients::All => {
                self.expected_all.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A sender has every answer.
    pub fn sender_done(&self) {
        self.senders_done.fetch_add(1, Ordering::Relaxed);
    }

    /// Every sender is done and `me` has every acked message addressed to it.
    pub fn complete(&self, me: Option<usize>, delivered: usize) -> bool {
        self.senders_done.load(Ordering::Relaxed) >= self.senders_total
            && delivered as u64 >= self.expected_for(me)
    }

    fn expected_for(&self, me: Option<usize>) -> u64 {
        me.map_or(0, |i| {
            self.expected[i].load(Ordering::Relaxed) + self.expected_all.load(Ordering::Relaxed)
        })
    }
}

/// What one peer does.
pub struct Plan {
    /// Index among the receivers; `None` for a peer that only sends.
    pub me: Option<usize>,
    pub sends_total: usize,
    pub depth: usize,
    pub body_bytes: usize,
    /// Picks the target of each send.
    pub pick: Box<dyn FnMut() -> (Target, Recipients) + Send>,
    pub deadline: Instant,
}

/// What one peer saw.
pub struct PeerResult {
    pub me: Option<usize>,
    pub send_ack: Histogram<u64>,
    pub send_deliver: Histogram<u64>,
    /// Acked sends: (pos, recipients).
    pub acked: Vec<(u64, Recipients)>,
    /// Unique positions delivered to this peer.
    pub delivered: Seen,
    pub duplicates: u64,
    pub first_send: Option<Instant>,
    pub last_delivery: Option<Instant>,
    pub last_ack: Option<Instant>,
}

// Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
pub async fn run_peer(
    mut conn: WsConn,
    mut plan: Plan,
    shared: Arc<Shared>,
) -> Result<PeerResult, BenchError> {
    let mut res = PeerResult {
        me: plan.me,
        send_ack: new_histogram()?,
        send_deliver: new_histogram()?,
        acked: Vec::with_capacity(plan.sends_total),
        delivered: Seen::default(),
        duplicates: 0,
        first_send: None,
        last_delivery: None,
        last_ack: None,
    };
    let mut inflight: HashMap<u64, (u64, Recipients)> = HashMap::new();
    let mut sent = 0usize;
    let mut next_ref = 1u64;
    let mut ack_upto = 0u64;
    let mut ack_sent = 0u64;
    let mut done = false;
    loop {
        let mut ops = Vec::new();
        while sent < plan.sends_total && inflight.len() + ops.len() < plan.depth {
            let (to, who) = (plan.pick)();
            let stamp = stamp_us();
            let r = next_ref;
            next_ref += 1;
            inflight.insert(r, (stamp, who));
            ops.push(ClientOp::Send {
                r,
                to,
                body: Body::from_trusted(stamped_body(plan.body_bytes, stamp).into()),
                key: None,
            });
            sent += 1;
            res.first_send.get_or_insert_with(Instant::now);
        }
        if ack_upto > ack_sent {
            ops.push(ClientOp::Ack { upto: ack_upto });
            ack_sent = ack_upto;
        }
        if !ops.is_empty() {
            conn.send(ops).await?;
        }
        if !done && sent == plan.sends_total && inflight.is_empty() {
            done = true;
            if plan.sends_total > 0 {
                shared.sender_done();
            }
        }
        if done && shared.complete(plan.me, res.delivered.len()) && ack_sent == ack_upto {
            break;
        }
        if Instant::now() > plan.deadline {
            break;
        }
        let Some(first) = conn.next_within(Duration::from_millis(POLL_MS)).await? else {
            continue;
        };
        let mut next = Some(first);
        let mut frames = 0;
        while let Some(frame) = next.take() {
            for op in frame {
                match op {
                    ServerOp::Ok {
                        r, pos: Some(pos), ..
                    } => {
                        let (stamp, who) = inflight.remove(&r).ok_or_else(|| {
                            BenchError::Protocol(format!("ok for unknown ref {r}"))
                        })?;
                        res.send_ack.saturating_record(since_stamp_us(stamp));
                        res.acked.push((pos, who));
                        res.last_ack = Some(Instant::now());
                        shared.acked(who);
                    }
                    ServerOp::Deliver { pos, body, .. } => {
                        if res.delivered.insert(pos) {
                            if let Some(stamp) = crate::stats::read_stamp(&body.0) {
                                res.send_deliver.saturating_record(since_stamp_us(stamp));
                            }
                            res.last_delivery = Some(Instant::now());
                            shared.delivered.fetch_add(1, Ordering::Relaxed);
                        } else {
                            res.duplicates += 1;
                        }
                        ack_upto = ack_upto.max(pos);
                    }
                    other => {
                        return Err(BenchError::Protocol(format!("unexpected frame {other:?}")))
                    }
                }
            }
            frames += 1;
            if frames < READ_FRAMES_PER_WRITE_MAX {
                next = conn.try_next()?;
            }
        }
    }
    conn.close().await;
    Ok(res)
}

/// Acked sends, and how many of them reached each recipient they were for (unique
/// deliveries counted against what was acked; extra deliveries are not counted).
pub fn delivered_ratio(results: &[PeerResult], receivers: usize) -> (u64, u64) {
    let mut by_pos_one: HashMap<usize, Vec<u64>> = HashMap::new();
    let mut all: Vec<u64> = Vec::new();
    for r in results {
        for (pos, who) in &r.acked {
            match who {
                Recipients::One(i) => by_pos_one.entry(*i).or_default().push(*pos),
                Recipients::All => all.push(*pos),
            }
        }
    }
    let mut expected = 0u64;
    let mut got = 0u64;
    for r in results {
        let Some(me) = r.me else { continue };
        if me >= receivers {
            continue;
        }
        for pos in by_pos_one.get(&me).into_iter().flatten().chain(all.iter()) {
            expected += 1;
            got += u64::from(r.delivered.contains(*pos));
        }
    }
    (expected, got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_counts_each_position_once_wherever_it_falls() {
        // Proves the bitmap set agrees with a plain set: in order, repeated, below the first
        // position seen, and too far past it for the bitmap.
        let mut seen = Seen::default();
        let mut plain = HashSet::new();
        let far = 10 + SEEN_BITS_MAX;
        for pos in [10, 11, 11, 75, 74, 3, 3, 10, far, far, 200, 139, 138] {
            assert_eq!(seen.insert(pos), plain.insert(pos), "insert {pos}");
        }
        assert_eq!(seen.len(), plain.len());
        assert!(!seen.is_empty() && Seen::default().is_empty());
        for pos in 0..300 {
            assert_eq!(seen.contains(pos), plain.contains(&pos), "contains {pos}");
        }
        assert!(seen.contains(far) && !seen.contains(far + 1));
        assert!(!Seen::default().contains(0));
    }
}
