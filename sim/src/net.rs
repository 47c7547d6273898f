//! The simulated network, in two layers, as in a real stack:
//!
//! - [`Network`] carries *packets* between endpoints (nodes `n0`, `n1`, …, clients `c0`, `c1`, …). Each
//!   packet gets its own latency, drawn from a distribution with a heavy tail, so packets
//!   reorder; a packet may be lost or duplicated; a *partition* drops every packet from one set
//!   of endpoints to another (symmetric, or one-way); a *clogged* link holds its packets until
//!   the clog ends, then lets them through (a congested or stalled path, not a lossy one).
//! - [`Stream`] is one end of a reliable, ordered connection over those packets (what TCP or a
//!   QUIC stream gives the node's glue): sequence numbers, cumulative acks, retransmission
//!   with exponential backoff, duplicate and reorder suppression, keepalives and an idle
//!   timeout after which the end gives up, and a reset. The session protocol above it sees
//!   what it sees on a real socket: frames in order, stalls, and connections that die, both
//!   cleanly (a reset reaches the peer) and silently (a partition or a crashed node: each end
//!   finds out by its own idle timeout, at different times, as half-open TCP does).
//!
//! Neither layer reads a clock or draws a random number of its own: time is an argument and
//! the network takes the simulation's RNG, so a seed replays every packet.

use bytes::Bytes;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// One connection's id, unique over a run (never reused, so a stray old packet is recognised).
pub type ConnId = u64;

/// A host on the simulated network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Endpoint {
    Node(u32),
    Client(u32),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Node(n) => write!(f, "n{n}"),
            Endpoint::Client(c) => write!(f, "c{c}"),
        }
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.to_string()
    }
}

/// A schedule names an endpoint that is neither `nN` nor `cN`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("endpoint {0:?} is neither nN (a node) nor cN (a client)")]
pub struct BadEndpoint(pub String);

impl TryFrom<String> for Endpoint {
    type Error = BadEndpoint;

    fn try_from(s: String) -> Result<Endpoint, BadEndpoint> {
        let bad = || BadEndpoint(s.clone());
        let (kind, n) = s.split_at_checked(1).ok_or_else(bad)?;
        let n: u32 = n.parse().map_err(|_| bad())?;
        match kind {
            "n" => Ok(Endpoint::Node(n)),
            "c" => Ok(Endpoint::Client(n)),
            _ => Err(bad()),
        }
    }
}

/// How packets travel while faults are on. Once faults stop, loss and duplication stop too;
/// latencies stay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetOptions {
    pub latency_min_ms: u64,
    pub latency_max_ms: u64,
    /// Chance a packet takes the slow path instead (a retransmission deep in the path, a
    /// congested queue): up to `latency_tail_ms_max` more.
    pub latency_tail_probability: f64,
    pub latency_tail_ms_max: u64,
    pub loss_probability: f64,
    pub duplicate_probability: f64,
}

impl Default for NetOptions {
    fn default() -> NetOptions {
        NetOptions {
            latency_min_ms: 0,
            latency_max_ms: 2,
            latency_tail_probability: 0.0,
            latency_tail_ms_max: 0,
            loss_probability: 0.0,
            duplicate_probability: 0.0,
        }
    }
}

/// What the network did, for the run's summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub packets_sent: u64,
    pub packets_lost: u64,
    pub packets_duplicated: u64,
    /// Dropped by a partition.
    pub packets_blocked: u64,
    /// Held by a clogged link.
    pub packets_clogged: u64,
}

/// Links, partitions and clogs. Packets themselves live in the simulation's event queue.
#[derive(Debug, Default)]
pub struct Network {
    /// Directed pairs (from, to) whose packets are dropped.
    blocked: BTreeSet<(Endpoint, Endpoint)>,
    /// Directed pairs whose packets are held until the given time.
    clogged: BTreeMap<(Endpoint, Endpoint), u64>,
    pub stats: NetStats,
}

/// Most copies of one packet the network delivers (the original and one duplicate).
pub const PACKET_COPIES_MAX: usize = 2;

impl Network {
    /// Drops packets from every endpoint of `a` to every endpoint of `b`, and back unless
    /// `one_way`.
    pub fn partition(&mut self, a: &[Endpoint], b: &[Endpoint], one_way: bool) {
        for x in a {
            for y in b {
                if x != y {
                    self.blocked.insert((*x, *y));
                    if !one_way {
                        self.blocked.insert((*y, *x));
                    }
                }
            }
        }
    }

    /// Ends every partition and clog.
    pub fn heal(&mut self) {
        self.blocked.clear();
        self.clogged.clear();
    }

    /// Holds packets from `from` to `to` until `until_ms`.
    pub fn clog(&mut self, from: Endpoint, to: Endpoint, until_ms: u64) {
        let u = self.clogged.entry((from, to)).or_insert(0);
        *u = (*u).max(until_ms);
    }

    pub fn is_partitioned(&self) -> bool {
        !self.blocked.is_empty()
    }

    /// When the copies of a packet sent now from `from` to `to` arrive: none if it is lost or
    /// blocked, two if it is duplicated. Each copy draws its own latency, so packets reorder.
    pub fn arrivals(
        &mut self,
        now: u64,
        rng: &mut ChaCha8Rng,
        options: &NetOptions,
        faults: bool,
        from: Endpoint,
        to: Endpoint,
    ) -> ([u64; PACKET_COPIES_MAX], usize) {
        self.stats.packets_sent += 1;
        let mut at = [0; PACKET_COPIES_MAX];
        if self.blocked.contains(&(from, to)) {
            self.stats.packets_blocked += 1;
            return (at, 0);
        }
        if faults && options.loss_probability > 0.0 && rng.random_bool(options.loss_probability) {
            self.stats.packets_lost += 1;
            return (at, 0);
        }
        let copies = if faults
            && options.duplicate_probability > 0.0
            && rng.random_bool(options.duplicate_probability)
        {
            self.stats.packets_duplicated += 1;
            2
        } else {
            1
        };
        let clog = self.clogged.get(&(from, to)).copied().unwrap_or(0);
        for a in at.iter_mut().take(copies) {
            let mut latency = rng.random_range(options.latency_min_ms..=options.latency_max_ms);
            if options.latency_tail_probability > 0.0
                && rng.random_bool(options.latency_tail_probability)
            {
                latency += rng.random_range(0..=options.latency_tail_ms_max);
            }
            *a = now + latency;
            if clog > *a {
                self.stats.packets_clogged += 1;
                *a = clog;
            }
        }
        (at, copies)
    }
}

/// What one packet of a connection carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Frame number `seq` of the sender's direction (from 0).
    Data { seq: u64, bytes: Bytes },
    /// Every frame below `next` arrived.
    Ack { next: u64 },
    /// Nothing to say; keeps the peer's idle timer from firing.
    Ping,
    /// The connection is gone at the sender (or the receiver never knew it).
    Reset,
}

/// Timers of a [`Stream`]. Units last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamConfig {
    /// First retransmission timeout; it doubles on each expiry without progress.
    pub rto_initial_ms: u64,
    pub rto_max_ms: u64,
    /// Send a ping after this long without sending anything.
    pub keepalive_ms: u64,
    /// Give up after this long without receiving anything.
    pub idle_timeout_ms: u64,
}

impl Default for StreamConfig {
    fn default() -> StreamConfig {
        StreamConfig {
            rto_initial_ms: 200,
            rto_max_ms: 1_600,
            keepalive_ms: 1_000,
            idle_timeout_ms: 4_000,
        }
    }
}

/// Frames one direction may have unacknowledged; more is a runaway (the session layers above
/// bound what they send by in-flight limits and push credit), and a bug in the simulation.
pub const STREAM_UNACKED_FRAMES_MAX: usize = 1 << 20;
/// Out-of-order frames a receiver keeps; beyond it new ones are dropped (and retransmitted).
pub const STREAM_REORDER_FRAMES_MAX: usize = 4_096;

/// Why a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// This end closed it (and sent a reset).
    Local,
    /// The peer sent a reset.
    Reset,
    /// Nothing arrived for `idle_timeout_ms`.
    IdleTimeout,
}

/// One end of a reliable, ordered connection. Sans-IO: `send`/`handle_segment`/
/// `handle_timeout` in, `poll_segment`/`poll_frame`/`poll_timeout` out.
#[derive(Debug)]
pub struct Stream {
    config: StreamConfig,
    next_seq: u64,
    unacked: VecDeque<(u64, Bytes)>,
    rto_at: Option<u64>,
    rto_ms: u64,
    recv_next: u64,
    reorder: BTreeMap<u64, Bytes>,
    frames: VecDeque<Bytes>,
    out: VecDeque<Segment>,
    last_recv_ms: u64,
    last_send_ms: u64,
    closed: Option<Closed>,
}

impl Stream {
    pub fn new(now: u64, config: StreamConfig) -> Stream {
        Stream {
            rto_ms: config.rto_initial_ms,
            config,
            next_seq: 0,
            unacked: VecDeque::new(),
            rto_at: None,
            recv_next: 0,
            reorder: BTreeMap::new(),
            frames: VecDeque::new(),
            out: VecDeque::new(),
            last_recv_ms: now,
            last_send_ms: now,
            closed: None,
        }
    }

    pub fn closed(&self) -> Option<Closed> {
        self.closed
    }

    /// Frames sent and not yet acknowledged by the peer.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// Queues a frame. Ignored once closed (the bytes die with the connection).
    pub fn send(&mut self, now: u64, bytes: Bytes) {
        if self.closed.is_some() {
            return;
        }
        assert!(
            self.unacked.len() < STREAM_UNACKED_FRAMES_MAX,
            "stream runaway: {} frames unacknowledged",
            self.unacked.len()
        );
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked.push_back((seq, bytes.clone()));
        self.out.push_back(Segment::Data { seq, bytes });
        self.last_send_ms = now;
        if self.rto_at.is_none() {
            self.rto_at = Some(now + self.rto_ms);
        }
    }

    /// Ends the connection here and tells the peer.
    pub fn close(&mut self) {
        if self.closed.is_none() {
            self.closed = Some(Closed::Local);
            self.out.push_back(Segment::Reset);
            self.unacked.clear();
            self.rto_at = None;
        }
    }

    pub fn handle_segment(&mut self, now: u64, segment: Segment) {
        if self.closed.is_some() {
            return;
        }
        self.last_recv_ms = now;
        match segment {
            Segment::Data { seq, bytes } => {
                if seq == self.recv_next {
                    self.frames.push_back(bytes);
                    self.recv_next += 1;
                    while let Some(b) = self.reorder.remove(&self.recv_next) {
                        self.frames.push_back(b);
                        self.recv_next += 1;
                    }
                } else if seq > self.recv_next && self.reorder.len() < STREAM_REORDER_FRAMES_MAX {
                    self.reorder.insert(seq, bytes);
                }
                // Acknowledge every data packet, duplicates too: the peer's ack may be lost.
                self.out.push_back(Segment::Ack {
                    next: self.recv_next,
                });
                self.last_send_ms = now;
            }
            Segment::Ack { next } => {
                let before = self.unacked.len();
                while self.unacked.front().is_some_and(|(s, _)| *s < next) {
                    self.unacked.pop_front();
                }
                if self.unacked.len() < before {
                    self.rto_ms = self.config.rto_initial_ms;
                    self.rto_at = (!self.unacked.is_empty()).then(|| now + self.rto_ms);
                }
            }
            Segment::Ping => {}
            Segment::Reset => {
                self.closed = Some(Closed::Reset);
                self.unacked.clear();
                self.rto_at = None;
            }
        }
    }

    /// The next deadline: a retransmission, a keepalive, or the idle timeout.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.closed.is_some() {
            return None;
        }
        let keepalive = self.last_send_ms + self.config.keepalive_ms;
        let idle = self.last_recv_ms + self.config.idle_timeout_ms;
        Some(
            self.rto_at
                .map_or(keepalive, |r| r.min(keepalive))
                .min(idle),
        )
    }

    pub fn handle_timeout(&mut self, now: u64) {
        if self.closed.is_some() {
            return;
        }
        if now >= self.last_recv_ms + self.config.idle_timeout_ms {
            self.closed = Some(Closed::IdleTimeout);
            self.unacked.clear();
            self.rto_at = None;
            return;
        }
        if self.rto_at.is_some_and(|r| now >= r) {
            // Go-back-N: resend everything unacknowledged, and back off.
            for (seq, bytes) in &self.unacked {
                self.out.push_back(Segment::Data {
                    seq: *seq,
                    bytes: bytes.clone(),
                });
            }
            self.rto_ms = (self.rto_ms * 2).min(self.config.rto_max_ms);
            self.rto_at = Some(now + self.rto_ms);
            self.last_send_ms = now;
        }
        if now >= self.last_send_ms + self.config.keepalive_ms {
            self.out.push_back(Segment::Ping);
            self.last_send_ms = now;
        }
    }

    /// The next packet to put on the network.
    pub fn poll_segment(&mut self) -> Option<Segment> {
        self.out.pop_front()
    }

    /// The next frame received in order.
    pub fn poll_frame(&mut self) -> Option<Bytes> {
        self.frames.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Moves every packet between two ends with a 1 ms delay, dropping the packets `drop`
    /// picks (by their index in send order), until both are quiet or `until` passes.
    fn exchange(
        a: &mut Stream,
        b: &mut Stream,
        now: &mut u64,
        until: u64,
        drop: &dyn Fn(u64) -> bool,
    ) {
        let mut sent = 0u64;
        let mut wire: Vec<(u64, bool, Segment)> = Vec::new();
        while *now < until {
            for (from_a, s) in [(true, &mut *a), (false, &mut *b)] {
                while let Some(seg) = s.poll_segment() {
                    if !drop(sent) {
                        wire.push((*now + 1, from_a, seg));
                    }
                    sent += 1;
                }
            }
            let next_timer = [a.poll_timeout(), b.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            let next_packet = wire.iter().map(|(t, _, _)| *t).min();
            let Some(t) = [next_timer, next_packet].into_iter().flatten().min() else {
                return;
            };
            *now = t.max(*now);
            let (due, rest): (Vec<_>, Vec<_>) = wire.drain(..).partition(|(at, _, _)| *at <= *now);
            wire = rest;
            for (_, from_a, seg) in due {
                if from_a {
                    b.handle_segment(*now, seg);
                } else {
                    a.handle_segment(*now, seg);
                }
            }
            a.handle_timeout(*now);
            b.handle_timeout(*now);
        }
    }

    #[test]
    fn stream_delivers_in_order_despite_loss() {
        // Proves retransmission and reorder suppression: every third packet lost, every frame
        // still arrives exactly once and in order, and nothing is left unacknowledged.
        let (mut a, mut b) = (
            Stream::new(0, StreamConfig::default()),
            Stream::new(0, StreamConfig::default()),
        );
        for i in 0..50u8 {
            a.send(0, Bytes::from(vec![i]));
        }
        let mut now = 0;
        exchange(&mut a, &mut b, &mut now, 3_000, &|i| i % 3 == 1);
        let got: Vec<u8> = std::iter::from_fn(|| b.poll_frame())
            .map(|f| f[0])
            .collect();
        assert_eq!(got, (0..50).collect::<Vec<u8>>());
        assert_eq!(a.unacked(), 0);
        assert!(a.closed().is_none() && b.closed().is_none());
    }

    #[test]
    fn stream_gives_up_after_the_idle_timeout() {
        // Proves a silent peer (a partition, a dead host) is detected by the idle timeout, not
        // earlier and not never.
        let config = StreamConfig::default();
        let mut a = Stream::new(0, config.clone());
        a.send(0, Bytes::from_static(b"x"));
        let mut now = 0;
        while a.closed().is_none() {
            now = a.poll_timeout().expect("an open stream has a timer");
            a.handle_timeout(now);
            while a.poll_segment().is_some() {}
        }
        assert_eq!(a.closed(), Some(Closed::IdleTimeout));
        assert_eq!(now, config.idle_timeout_ms);
    }

    #[test]
    fn stream_reset_reaches_the_peer() {
        // Proves a clean close ends both ends: the reset is a packet the peer acts on.
        let (mut a, mut b) = (
            Stream::new(0, StreamConfig::default()),
            Stream::new(0, StreamConfig::default()),
        );
        a.close();
        let seg = a.poll_segment().expect("a reset");
        b.handle_segment(1, seg);
        assert_eq!(b.closed(), Some(Closed::Reset));
        assert_eq!(a.closed(), Some(Closed::Local));
    }

    #[test]
    fn network_partitions_clogs_loss_and_duplicates() {
        // Proves each network fault does what the fault model says: one-way partitions block
        // one direction only, clogs delay without losing, loss and duplication follow their
        // probabilities, and healing restores delivery.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut net = Network::default();
        let (n, c) = (Endpoint::Node(0), Endpoint::Client(0));
        let o = NetOptions::default();
        net.partition(&[c], &[n], true);
        assert_eq!(net.arrivals(0, &mut rng, &o, true, c, n).1, 0);
        assert_eq!(net.arrivals(0, &mut rng, &o, true, n, c).1, 1);
        net.heal();
        net.clog(c, n, 500);
        let (at, k) = net.arrivals(10, &mut rng, &o, true, c, n);
        assert_eq!((at[0], k), (500, 1));
        net.heal();
        let lossy = NetOptions {
            loss_probability: 0.5,
            duplicate_probability: 0.5,
            ..NetOptions::default()
        };
        let copies: usize = (0..1000)
            .map(|_| net.arrivals(0, &mut rng, &lossy, true, c, n).1)
            .sum();
        assert!((600..900).contains(&copies), "{copies}");
        let clean: usize = (0..100)
            .map(|_| net.arrivals(0, &mut rng, &lossy, false, c, n).1)
            .sum();
        assert_eq!(clean, 100, "no loss once faults are off");
        assert_eq!(
            Endpoint::try_from("c12".to_string()),
            Ok(Endpoint::Client(12))
        );
        assert!(Endpoint::try_from("x1".to_string()).is_err());
    }
}
