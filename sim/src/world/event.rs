//! What the world's event queue holds: events and their order.

use super::*;

#[derive(Debug)]
pub(super) enum Event {
    Wake(usize),
    /// A packet of connection `conn` reaches `to` (from a client to its node, from a node to
    /// a client; a link between two nodes carries them too, once nodes talk to each other).
    Packet {
        from: Endpoint,
        to: Endpoint,
        conn: ConnId,
        seg: Segment,
    },
    NodeTimer {
        node: usize,
        conn: ConnId,
    },
    ClientTimer(usize, ConnId),
    WalDone {
        node: usize,
        shard: ShardIdx,
        write: u64,
    },
    /// A disk read of the log a shard host asked for completes (`epoch`: the host's
    /// incarnation count when it was asked; a read of an older one is dropped).
    ReadDone {
        node: usize,
        shard: ShardIdx,
        epoch: u64,
        job: ReadJob,
    },
    /// The shard driver's timer (restart backoff, stall watchdog).
    ShardTimer {
        node: usize,
        shard: ShardIdx,
        epoch: u64,
    },
    Fault(FaultEvent),
    FaultsEnd,
    /// The HTTP client beside `node` reads or appends to a conversation.
    HttpCall {
        node: usize,
    },
    /// A REST call's answer deadline.
    HttpTimeout {
        node: usize,
        session: SessionId,
    },
}

/// An event in the queue. The heap pops the earliest first, and of events at the same time
/// the one queued first, so the order is a function of the run alone.
#[derive(Debug)]
pub(super) struct Queued {
    pub(super) at: u64,
    pub(super) seq: u64,
    pub(super) event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Queued) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Queued) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Queued) -> std::cmp::Ordering {
        // Reversed: `BinaryHeap` is a max-heap.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl Event {
    /// Feeds the event's kind and identity into the run's hash (`Trace`). An event at node
    /// 0 hashes as it did before events named their node, so a one-node run keeps its hash
    /// (and recorded hashes stay comparable); another node's events add its number last.
    // Over 70 lines: one arm per event kind (an exhaustive match, so a new kind is hashed).
    pub(super) fn hash_into(&self, h: &mut Fnv) {
        let mut put = |xs: &[u64]| {
            for x in xs {
                h.write(&x.to_le_bytes());
            }
        };
        let seg = |s: &Segment| match s {
            Segment::Data { seq, bytes } => [1, *seq, bytes.len() as u64],
            Segment::Ack { next } => [2, *next, 0],
            Segment::Ping => [3, 0, 0],
            Segment::Reset => [4, 0, 0],
        };
        let node = match self {
            Event::Wake(c) => {
                put(&[1, *c as u64]);
                0
            }
            Event::Packet {
                from,
                to,
                conn,
                seg: s,
            } => {
                let (words, len, node) = packet_words(*from, *to, *conn);
                put(&words[..len]);
                put(&seg(s));
                node
            }
            Event::NodeTimer { node, conn } => {
                put(&[4, *conn]);
                *node as u64
            }
            Event::ClientTimer(c, id) => {
                put(&[5, *c as u64, *id]);
                0
            }
            Event::WalDone { node, shard, write } => {
                put(&[6, u64::from(*shard), *write]);
                *node as u64
            }
            Event::ShardTimer { node, shard, epoch } => {
                put(&[7, u64::from(*shard), *epoch]);
                *node as u64
            }
            Event::Fault(f) => {
                put(&[8]);
                h.write(format!("{f:?}").as_bytes());
                return;
            }
            Event::FaultsEnd => {
                put(&[9]);
                0
            }
            Event::HttpCall { node } => {
                put(&[10]);
                *node as u64
            }
            Event::HttpTimeout { node, session } => {
                put(&[12, *session]);
                *node as u64
            }
            Event::ReadDone {
                node,
                shard,
                epoch,
                job,
            } => {
                let r = job.request;
                put(&[13, u64::from(*shard), *epoch, r.id, r.segment, r.offset]);
                *node as u64
            }
        };
        if node != 0 {
            put(&[11, node]);
        }
    }
}

/// A packet's words in the hash (the first `len`), and the node whose number follows the
/// event's words (0: none). A client-node link hashes as the `ToNode`/`ToClient` events it
/// replaced did. No allocation: this runs for every packet.
fn packet_words(from: Endpoint, to: Endpoint, conn: ConnId) -> ([u64; 6], usize, u64) {
    let end = |e: Endpoint| match e {
        Endpoint::Node(n) => (0, u64::from(n)),
        Endpoint::Client(c) => (1, u64::from(c)),
    };
    match (end(from), end(to)) {
        ((1, c), (0, n)) => ([2, conn, c, 0, 0, 0], 3, n),
        ((0, n), (1, c)) => ([3, conn, c, 0, 0, 0], 3, n),
        // Between two nodes, or two clients (no such link is used yet).
        ((k, a), (l, b)) => ([12, conn, k, a, l, b], 6, 0),
    }
}
