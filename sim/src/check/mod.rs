//! The checkers: a model of what the clients were promised, fed with every acknowledgement,
//! delivery, welcome and post-recovery audit, and refusing anything a correct shard cannot
//! produce.
//!
//! What each checker holds the shard to, and why it is sound (a correct shard never trips it):
//!
//! 1. **Acknowledged writes survive.** An `Ok{pos}` or `Ok{seq}` is a promise that the record
//!    is durable, so after every recovery the audit must find it with the same body: the mesh
//!    head and conversation head cover every acknowledged position and seq, and the audit's
//!    replay of each recipient's inbox (from its cursor) holds every acknowledged message.
//! 2. **Positions and seqs never change meaning.** Once a position or seq is acknowledged or
//!    observed (a delivery or a read: the shard shows only durable data), its content is fixed
//!    for the rest of the run: the log after a restart extends what was promised. Every body
//!    shown must be one a client sent to that conversation or inbox (bodies are unique per
//!    operation and carry their id twice, so one flipped bit cannot turn a body into another
//!    valid one). Conversation seqs read back are dense and end at the head (from 1 unless
//!    retention may have evicted the oldest). One operation (a key's retries share it) never
//!    gets two seqs.
//! 3. **At-least-once delivery.** Every acknowledged inbox message reaches each recipient at
//!    least once. Checked at the end, after a fault-free phase in which every client
//!    reconnects and drains.
//! 4. **Liveness** is the simulator's (`lib.rs`): bounded completion after faults stop.
//! 5. **Recovery refuses corruption** outside the last segment, also the simulator's.
//! 6. **Durable cursors are kept.** A welcome's `acked` is never below the highest `upto` a
//!    peer acknowledged before a WAL write that then completed (the write, polled after the
//!    ack, carries its record; losing it only costs redelivery, which at-least-once allows, so
//!    checkers 1-3 cannot see it). Nor is it above anything the peer ever acknowledged.
//! 7. **Nothing is shown before it is durable** ([`durable`]): an `ok`, delivery, event or read
//!    page entry names only what the disks hold synced, checked when the shard sends it.
//! 8. **Ordering while connected** ([`conn`]): what one connection's client sees keeps the
//!    ordering promises of docs/PROTOCOL.md.
//! 9. **No leaked sessions**: at quiescence no shard holds state for a session the node closed
//!    (the simulator's, `world`).

pub mod conn;
pub mod durable;

use fabric_proto::{Body, DeliveredEvent, Target};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

/// Which promise a run broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ViolationKind {
    /// (1) An acknowledged send or append is missing after a recovery.
    LostWrite,
    /// (1, 2) A position or seq holds something other than what was acknowledged or shown
    /// before, or something no client wrote there.
    WrongRecord,
    /// (2) Conversation seqs read back with a gap, or not ending at the head.
    SeqGap,
    /// (2) One append (one idempotency key) at two seqs.
    DuplicateSeq,
    /// (2) One keyed send at two positions while the first one's message was still held.
    DuplicatePos,
    /// (3) An acknowledged inbox message never reached one of its recipients.
    NotDelivered,
    /// (4) Requests pending, or the shard busy, a bounded time after faults stopped.
    Liveness,
    /// (5) Recovery accepted a flipped bit in a segment that is not the last.
    CorruptionAccepted,
    /// Recovery refused a disk without corruption (or refused corruption the wrong way).
    RecoveryRefused,
    /// (6) A peer's cursor fell below an ack that a completed WAL write covered.
    CursorLost,
    /// (6) A peer's cursor is above anything the peer acknowledged.
    CursorInvented,
    /// A reply the protocol does not allow here (an unexpected error, an unknown ref).
    UnexpectedReply,
    /// (7) An `ok`, delivery, event or read named data the disks did not hold synced at the
    /// moment it was sent.
    NotDurable,
    /// (8) An ordering promise broke on one connection: deliveries not in increasing `pos`,
    /// requests to one conversation (or sends) answered out of order or with decreasing seqs
    /// (positions), a subscription's events not dense and in order from its `from`, pongs out
    /// of order.
    OutOfOrder,
    /// (9) At quiescence a shard holds state for a session the node no longer has.
    LeakedSession,
    /// The shard core panicked.
    Panic,
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A broken promise, before the simulator adds the seed and the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: ViolationKind,
    pub message: String,
}

pub type Checked<T = ()> = Result<T, Failure>;

pub(crate) fn fail<T>(kind: ViolationKind, message: impl Into<String>) -> Checked<T> {
    Err(Failure {
        kind,
        message: message.into(),
    })
}

#[derive(Debug, Clone)]
pub enum OpKind {
    Send {
        to: Target,
        recipients: Vec<usize>,
        /// Idempotency key (scoped to the sender).
        key: Option<Arc<str>>,
    },
    Append {
        conv: Arc<str>,
        key: Option<Arc<str>>,
    },
}

/// One client operation; retries of it share the entry (and its body).
#[derive(Debug, Clone)]
pub struct Op {
    pub client: usize,
    pub kind: OpKind,
    pub body: Body,
    /// Positions (sends) or seqs (appends) acknowledged for it, in order.
    pub acks: Vec<u64>,
}

/// No operation (yet) at a seq of [`ConvModel::at`].
const NO_OP: usize = usize::MAX;

#[derive(Debug, Default)]
struct ConvModel {
    /// Seq -> operation ([`NO_OP`] where none yet), fixed once acknowledged or shown.
    at: Vec<usize>,
    /// Operation -> its one seq.
    seq_of: BTreeMap<usize, u64>,
    acked_max: u64,
    /// Seqs up to this one have left the shard's memory at some point (retention), and with
    /// them their idempotency keys.
    evicted_upto: u64,
}

/// What the clients were promised, and what the shard has shown.
#[derive(Debug)]
pub struct Model {
    pub peers: Vec<Arc<str>>,
    pub groups: Vec<Vec<Arc<str>>>,
    pub ops: Vec<Op>,
    /// Position -> operation, fixed once acknowledged or delivered.
    inbox: Vec<usize>,
    acked_pos_max: u64,
    convs: BTreeMap<Arc<str>, ConvModel>,
    /// Conversation events may leave memory (retention), so a read need not start at seq 1.
    retention: bool,
    /// Highest `upto` per peer the current incarnation has taken in.
    handled_ack: Vec<u64>,
    /// Highest `upto` per peer covered by a completed WAL write.
    durable_ack: Vec<u64>,
    /// Highest `upto` per peer ever sent and taken in.
    ever_ack: Vec<u64>,
    /// Positions each peer's client received (content checked on receipt).
    pub delivered: Vec<PosSet>,
    /// Keyed send -> the first position it was acknowledged or shown at.
    send_pos: BTreeMap<usize, u64>,
}

impl Model {
    pub fn new(peers: Vec<Arc<str>>, groups: Vec<Vec<Arc<str>>>, retention: bool) -> Model {
        let n = peers.len();
        Model {
            peers,
            groups,
            ops: Vec::new(),
            inbox: Vec::new(),
            acked_pos_max: 0,
            convs: BTreeMap::new(),
            retention,
            handled_ack: vec![0; n],
            durable_ack: vec![0; n],
            ever_ack: vec![0; n],
            delivered: vec![PosSet::default(); n],
            send_pos: BTreeMap::new(),
        }
    }

    fn peer_index(&self, peer: &str) -> Option<usize> {
        self.peers.iter().position(|p| &**p == peer)
    }

    /// Who an inbox message to `to` from peer `from` is for, by the protocol's rules.
    pub fn recipients(&self, from: usize, to: &Target) -> Vec<usize> {
        match to {
            Target::Peer(p) => self.peer_index(p).into_iter().collect(),
            Target::Group(g) => (0..self.peers.len())
                .filter(|i| self.groups[*i].iter().any(|x| **x == **g))
                .collect(),
            Target::All => (0..self.peers.len()).filter(|i| *i != from).collect(),
        }
    }

    pub fn add_op(&mut self, client: usize, kind: OpKind, body: Body) -> usize {
        let id = self.ops.len();
        if let OpKind::Append { conv, .. } = &kind {
            self.convs.entry(conv.clone()).or_default();
        }
        assert_eq!(
            op_id_of(&body.0),
            Some(id),
            "a body starts with its operation's id, which makes it unique"
        );
        self.ops.push(Op {
            client,
            kind,
            body,
            acks: Vec::new(),
        });
        id
    }

    /// Seqs of `conv` that have left the shard's memory at some point (retention): a read or a
    /// subscription may skip them.
    pub fn evicted_upto(&self, conv: &str) -> u64 {
        self.convs.get(conv).map_or(0, |c| c.evicted_upto)
    }

    /// The highest seq of `conv` acknowledged so far.
    pub fn conv_acked_max(&self, conv: &str) -> u64 {
        self.convs.get(conv).map_or(0, |c| c.acked_max)
    }

    /// A conversation entry shown to a client (an event or a read): checker 2.
    pub fn on_event(&mut self, conv: &Arc<str>, seq: u64, from: &str, body: &Body) -> Checked {
        // Shown so before (the common case of an audit after a restart): the same operation's
        // body from the same peer, at the one seq it has.
        if let Some(c) = self.convs.get(conv) {
            if let Some(&op) = c.at.get(seq as usize).filter(|op| **op != NO_OP) {
                let o = &self.ops[op];
                if o.body == *body
                    && *self.peers[o.client] == *from
                    && c.seq_of.get(&op) == Some(&seq)
                {
                    return Ok(());
                }
            }
        }
        let what = || format!("conv {conv} seq {seq}");
        let op = self.op_of(body, what)?;
        let o = &self.ops[op];
        match &o.kind {
            OpKind::Append { conv: c, .. } if c == conv && *self.peers[o.client] == *from => {}
            _ => {
                return fail(
                    ViolationKind::WrongRecord,
                    format!("{} shows op {op} ({:?} from {from})", what(), o.kind),
                )
            }
        }
        self.fix_seq(conv, seq, op, "shown")
    }

    /// Whether operation `op` may be sent again after an unknown outcome: sends (a second
    /// copy is allowed) and keyed appends (the key makes it idempotent), not keyless appends.
    pub fn retryable(&self, op: usize) -> bool {
        match &self.ops[op].kind {
            OpKind::Send { .. } => true,
            OpKind::Append { key, .. } => key.is_some(),
        }
    }

    /// Whether operation `op` carries an idempotency key (an append's or a send's).
    pub fn keyed(&self, op: usize) -> bool {
        matches!(
            &self.ops[op].kind,
            OpKind::Append { key: Some(_), .. } | OpKind::Send { key: Some(_), .. }
        )
    }

    /// What operation `op`'s answer is ordered with on a connection (checker 8).
    pub fn order_key(&self, op: usize) -> conn::OrderKey {
        match &self.ops[op].kind {
            OpKind::Send { .. } => conn::OrderKey::Inbox,
            OpKind::Append { conv, .. } => conn::OrderKey::Conv(conv.clone()),
        }
    }

    pub fn conv_names(&self) -> Vec<Arc<str>> {
        self.convs.keys().cloned().collect()
    }

    /// The operation that wrote `body`: bodies start with their operation's id, and must then
    /// be exactly that operation's body (a flipped bit elsewhere is caught by the comparison).
    pub fn op_of(&self, body: &Body, what: impl FnOnce() -> String) -> Checked<usize> {
        match op_id_of(&body.0).filter(|id| self.ops.get(*id).is_some_and(|o| o.body == *body)) {
            Some(op) => Ok(op),
            None => fail(
                ViolationKind::WrongRecord,
                format!("{} has body {body:?}, which no client wrote", what()),
            ),
        }
    }

    /// An `Ok` for operation `op`.
    pub fn on_ok(&mut self, op: usize, pos: Option<u64>, seq: Option<u64>) -> Checked {
        match (&self.ops[op].kind, pos, seq) {
            (OpKind::Send { .. }, Some(pos), None) => {
                self.fix_pos(pos, op, "acknowledged")?;
                self.acked_pos_max = self.acked_pos_max.max(pos);
                self.ops[op].acks.push(pos);
            }
            (OpKind::Append { conv, .. }, None, Some(seq)) => {
                let conv = conv.clone();
                self.fix_seq(&conv, seq, op, "acknowledged")?;
                let c = self.convs.get_mut(&conv).expect("conv of an op");
                c.acked_max = c.acked_max.max(seq);
                self.ops[op].acks.push(seq);
            }
            _ => {
                return fail(
                    ViolationKind::UnexpectedReply,
                    format!("op {op} acknowledged with pos {pos:?} seq {seq:?}"),
                )
            }
        }
        Ok(())
    }

    fn fix_pos(&mut self, pos: u64, op: usize, how: &str) -> Checked {
        self.check_send_key(pos, op, how)?;
        let i = pos as usize;
        match self.inbox.get(i) {
            Some(o) if *o != op && *o != NO_OP => fail(
                ViolationKind::WrongRecord,
                format!("inbox pos {pos} {how} as op {op} but was op {o} before"),
            ),
            _ => {
                if self.inbox.len() <= i {
                    self.inbox.resize(i + 1, NO_OP);
                }
                self.inbox[i] = op;
                Ok(())
            }
        }
    }

    /// A keyed send is one message: a second position for it is a violation while its first
    /// one is still held (no ack the shard ever took in reaches it for some recipient, so the
    /// shard never let it go, and retention copies it forward with its key). After that, keys
    /// are remembered for retained records only (docs/PROTOCOL.md), which the model does not
    /// follow.
    fn check_send_key(&mut self, pos: u64, op: usize, how: &str) -> Checked {
        let OpKind::Send {
            key: Some(_),
            recipients,
            ..
        } = &self.ops[op].kind
        else {
            return Ok(());
        };
        let Some(&first) = self.send_pos.get(&op) else {
            self.send_pos.insert(op, pos);
            return Ok(());
        };
        let held = recipients.iter().any(|r| self.ever_ack[*r] < first);
        if first != pos && held {
            return fail(
                ViolationKind::DuplicatePos,
                format!(
                    "keyed send op {op} {how} at pos {pos} but is at pos {first} too, which \
                     some recipient never acknowledged (highest acks taken in {:?})",
                    recipients
                        .iter()
                        .map(|r| self.ever_ack[*r])
                        .collect::<Vec<_>>()
                ),
            );
        }
        Ok(())
    }

    fn fix_seq(&mut self, conv: &Arc<str>, seq: u64, op: usize, how: &str) -> Checked {
        if !self.convs.contains_key(conv) {
            self.convs.insert(conv.clone(), ConvModel::default());
        }
        let c = self.convs.get_mut(conv).expect("inserted above");
        let i = seq as usize;
        if c.at.get(i) == Some(&op) && c.seq_of.get(&op) == Some(&seq) {
            return Ok(()); // seen so before: the common case of an audit
        }
        if let Some(o) = c.at.get(i).filter(|o| **o != NO_OP) {
            if *o != op {
                return fail(
                    ViolationKind::WrongRecord,
                    format!("conv {conv} seq {seq} {how} as op {op} but was op {o} before"),
                );
            }
        }
        if let Some(s) = c.seq_of.get(&op) {
            // Keys are remembered for retained entries only (docs/OPERATIONS.md), so a retry
            // after its original left memory may legitimately get a second seq.
            if *s != seq && (*s).min(seq) > c.evicted_upto {
                return fail(
                    ViolationKind::DuplicateSeq,
                    format!("conv {conv}: op {op} {how} at seq {seq} but is at seq {s} too"),
                );
            }
        }
        if c.at.len() <= i {
            c.at.resize(i + 1, NO_OP);
        }
        c.at[i] = op;
        c.seq_of.insert(op, seq);
        Ok(())
    }

    /// A delivery to `peer` (a client's or an audit's).
    pub fn on_deliver(
        &mut self,
        peer: usize,
        pos: u64,
        from: &str,
        to: &Target,
        body: &Body,
    ) -> Checked {
        let what = || format!("delivery of pos {pos} to {}", self.peers[peer]);
        let op = self.op_of(body, what)?;
        let o = &self.ops[op];
        let OpKind::Send {
            to: sent_to,
            recipients,
            ..
        } = &o.kind
        else {
            return fail(
                ViolationKind::WrongRecord,
                format!("{} carries append op {op}", what()),
            );
        };
        if &*self.peers[o.client] != from || sent_to != to {
            return fail(
                ViolationKind::WrongRecord,
                format!(
                    "{}: op {op} was from {} to {sent_to:?}, shown from {from} to {to:?}",
                    what(),
                    self.peers[o.client]
                ),
            );
        }
        if !recipients.contains(&peer) {
            return fail(
                ViolationKind::WrongRecord,
                format!("{}: op {op} is not for this peer", what()),
            );
        }
        self.fix_pos(pos, op, "delivered")
    }

    /// A welcome to `peer`: checkers 1 (the head covers acknowledged sends) and 6.
    pub fn on_welcome(&mut self, peer: usize, acked: u64, head: u64) -> Checked {
        let name = &self.peers[peer];
        if acked < self.durable_ack[peer] {
            return fail(
                ViolationKind::CursorLost,
                format!(
                    "welcome for {name} says acked {acked}, but it acked {} before a WAL write that completed",
                    self.durable_ack[peer]
                ),
            );
        }
        if acked > self.ever_ack[peer] {
            return fail(
                ViolationKind::CursorInvented,
                format!(
                    "welcome for {name} says acked {acked}; it never acked past {}",
                    self.ever_ack[peer]
                ),
            );
        }
        if head < self.acked_pos_max {
            return fail(
                ViolationKind::LostWrite,
                format!(
                    "welcome head {head} is below acknowledged pos {}",
                    self.acked_pos_max
                ),
            );
        }
        Ok(())
    }

    /// After a recovery, `peer`'s inbox replayed from its cursor `acked`: every acknowledged
    /// message for it past the cursor must be there.
    pub fn audit_inbox(&self, peer: usize, acked: u64, shown: &BTreeSet<u64>) -> Checked {
        let from = usize::try_from(acked + 1).unwrap_or(usize::MAX);
        for (pos, op) in self.inbox.iter().enumerate().skip(from) {
            if *op == NO_OP {
                continue;
            }
            let pos = &(pos as u64);
            let o = &self.ops[*op];
            let OpKind::Send { recipients, .. } = &o.kind else {
                continue;
            };
            if o.acks.contains(pos) && recipients.contains(&peer) && !shown.contains(pos) {
                return fail(
                    ViolationKind::LostWrite,
                    format!(
                        "acknowledged pos {pos} (op {op}) for {} is missing after recovery (cursor {acked})",
                        self.peers[peer]
                    ),
                );
            }
        }
        Ok(())
    }

    /// After a recovery, one conversation read from seq 1: checkers 1 and 2.
    pub fn audit_conv(&mut self, conv: &Arc<str>, events: &[DeliveredEvent], head: u64) -> Checked {
        self.note_evicted(conv, events.first().map_or(head, |e| e.seq - 1));
        let acked_max = self.convs.get(conv).map_or(0, |c| c.acked_max);
        if head < acked_max {
            return fail(
                ViolationKind::LostWrite,
                format!("conv {conv} head {head} is below acknowledged seq {acked_max}"),
            );
        }
        if let Some(first) = events.first() {
            if !self.retention && first.seq != 1 {
                return fail(
                    ViolationKind::SeqGap,
                    format!("conv {conv} starts at seq {}", first.seq),
                );
            }
            for (i, e) in events.iter().enumerate() {
                if e.seq != first.seq + i as u64 {
                    return fail(
                        ViolationKind::SeqGap,
                        format!(
                            "conv {conv}: seq {} where {} was due",
                            e.seq,
                            first.seq + i as u64
                        ),
                    );
                }
            }
        }
        let last = events.last().map_or(0, |e| e.seq);
        if (!events.is_empty() || !self.retention) && last != head {
            return fail(
                ViolationKind::SeqGap,
                format!("conv {conv} reads up to {last}, head {head}"),
            );
        }
        for e in events {
            self.on_event(conv, e.seq, &e.from, &e.body)?;
        }
        Ok(())
    }

    /// A read of `conv` from seq 1 showed `events` (its first retained event first) and `head`.
    pub fn note_evicted(&mut self, conv: &Arc<str>, evicted: u64) {
        let c = self.convs.entry(conv.clone()).or_default();
        c.evicted_upto = c.evicted_upto.max(evicted);
    }

    /// The shard took in an ack.
    pub fn ack_handled(&mut self, peer: usize, upto: u64) {
        self.handled_ack[peer] = self.handled_ack[peer].max(upto);
        self.ever_ack[peer] = self.ever_ack[peer].max(upto);
    }

    /// The acks a WAL write polled now carries (all taken in so far).
    pub fn ack_snapshot(&self) -> Vec<u64> {
        self.handled_ack.clone()
    }

    /// A WAL write polled with `snapshot` completed.
    pub fn ack_durable(&mut self, snapshot: &[u64]) {
        for (d, s) in self.durable_ack.iter_mut().zip(snapshot) {
            *d = (*d).max(*s);
        }
    }

    /// A new incarnation: acks no completed write covered may be gone.
    pub fn restart(&mut self) {
        self.handled_ack = self.durable_ack.clone();
    }

    /// Checker 3, at the end: every acknowledged message reached every recipient.
    pub fn final_delivery(&self) -> Checked {
        for (id, o) in self.ops.iter().enumerate() {
            let OpKind::Send { recipients, .. } = &o.kind else {
                continue;
            };
            for pos in &o.acks {
                for r in recipients {
                    if !self.delivered[*r].contains(*pos) {
                        return fail(
                            ViolationKind::NotDelivered,
                            format!(
                                "acknowledged pos {pos} (op {id}) never reached {}",
                                self.peers[*r]
                            ),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Acknowledgements received, over all operations.
    pub fn acks(&self) -> u64 {
        self.ops.iter().map(|o| o.acks.len() as u64).sum()
    }
}

/// The operation id a simulated body starts with (`{"op":ID,`), if it does.
fn op_id_of(body: &[u8]) -> Option<usize> {
    let digits = body.strip_prefix(br#"{"op":"#)?;
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 18 || digits.get(n) != Some(&b',') {
        return None;
    }
    std::str::from_utf8(&digits[..n]).ok()?.parse().ok()
}

/// A set of inbox positions, as a bitmap: positions are dense from 1, and a peer receives a
/// good share of them.
#[derive(Debug, Clone, Default)]
pub struct PosSet(Vec<u64>);

impl PosSet {
    pub fn insert(&mut self, pos: u64) {
        let (word, bit) = ((pos / 64) as usize, pos % 64);
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << bit;
    }

    pub fn contains(&self, pos: u64) -> bool {
        self.0
            .get((pos / 64) as usize)
            .is_some_and(|w| w & (1 << (pos % 64)) != 0)
    }
}
