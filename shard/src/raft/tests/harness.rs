//! An in-memory cluster of Raft cores (raft-rs's `harness/`, written afresh): a simulated
//! network (drops, delays and reordering, duplicates, partitions, one-way cuts), simulated
//! durable storage per node (a crash keeps only what an fsync covered), a host loop that
//! follows the Ready contract, and a checker of Raft's safety properties. Deterministic: all
//! randomness comes from one seeded splitmix64.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::raft::{
    ConfChange, Entry, EntryKind, HardState, LogReadError, LogState, Membership, Message,
    MessageBody, NodeId, ProposeError, RaftConfig, RaftCore, ReadState, Role, TermRun,
};

/// Simulated milliseconds per step.
pub const STEP_MS: u64 = 10;
/// Turn on to print a run's leaders, snapshots and per-node state (debugging one seed; the
/// cores' sources read no environment, tests included).
pub const TRACE: bool = false;

/// splitmix64: small, seedable, good enough to drive a simulation.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn percent(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

pub fn test_config() -> RaftConfig {
    RaftConfig {
        raft_heartbeat_ms: 50,
        raft_election_timeout_ms: 300,
        raft_inflight_entries_max: 8,
        raft_append_bytes_max: 200,
        raft_entry_cache_bytes_max: 400,
        raft_snapshot_lag_bytes_max: u64::MAX,
        // The harness snapshots the committed prefix.
        snapshot_is_committed_state: true,
        raft_uncommitted_entries_max: 64,
        raft_pending_reads_max: 64,
        planted: Default::default(),
    }
}

/// Network and disk faults; all zero is a perfect network with synchronous fsyncs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub drop_pct: u64,
    pub dup_pct: u64,
    /// Extra delay of a message, uniformly in `0..=delay_steps_max` steps (reorders them).
    pub delay_steps_max: u64,
    /// Chance per step that a node's pending writes become durable (0: at once).
    pub fsync_pct: u64,
    /// Election jitter is drawn from `0..jitter_spread` (0: any u64). A small spread makes
    /// nodes time out together: split votes, and candidates sharing a term.
    pub jitter_spread: u64,
    /// Chance that a node reboots (losing unsynced writes) right after it grants a vote: the
    /// moment that promise must already be durable.
    pub reboot_after_vote_pct: u64,
    /// Chance that a node is cut off from everyone the moment it becomes leader (its first
    /// appends are lost): leaders whose entries reach no one, as in Raft's Figure 8.
    pub isolate_new_leader_pct: u64,
    /// Chance that a leader is cut off from everyone right after it reports a new commit index
    /// (the entries it sends next are lost).
    pub isolate_after_commit_pct: u64,
}

/// One Ready's write, durable once its fsync completes.
#[derive(Debug)]
struct Write {
    hard_state: Option<HardState>,
    truncate_from: Option<u64>,
    entries: Vec<Entry>,
    persisted_messages: Vec<Message>,
}

#[derive(Debug, Default)]
pub struct Node {
    pub core: Option<RaftCore>,
    pub durable_hs: HardState,
    /// The durable log: `durable[i]` has index `i + 1`.
    pub durable: Vec<Entry>,
    /// The WAL as the host reads it (durable plus unsynced writes).
    pub written: Vec<Entry>,
    /// Entries up to here were compacted into a snapshot: log reads below fail.
    pub compacted: u64,
    pending: VecDeque<Write>,
    /// The highest commit reported in this node's current life.
    pub commit_seen: u64,
    pub read_states: Vec<ReadState>,
    pub dropped_reads: Vec<u64>,
    pub snapshots_installed: u64,
    pub log_reads_served: u64,
}

#[derive(Debug, Default)]
pub struct Checker {
    /// term -> the one leader seen in it.
    pub leaders: BTreeMap<u64, NodeId>,
    /// The group's committed log: `committed[i]` has index `i + 1`.
    pub committed: Vec<Entry>,
    /// term -> the highest index a leader of that term reported committed.
    commit_by_term: BTreeMap<u64, u64>,
    /// (node, ctx) -> the group's commit index when the read was asked.
    reads_asked: BTreeMap<(NodeId, u64), u64>,
    pub violations: Vec<String>,
    /// (node, term) -> the vote seen; and how often a node voted twice in a term (a symptom the
    /// checker does not need to flag itself: two leaders in a term is the property).
    votes: BTreeMap<(NodeId, u64), NodeId>,
    pub double_votes: u64,
    /// Leaders reporting a commit index whose entry is of an older term (Figure 8's risk).
    pub old_term_commits: u64,
}

pub struct Cluster {
    pub config: RaftConfig,
    pub now_ms: u64,
    pub rng: Rng,
    pub nodes: BTreeMap<NodeId, Node>,
    pub initial: Membership,
    net: Vec<(u64, Message)>,
    /// Links (from, to) that drop everything.
    pub cut: BTreeSet<(NodeId, NodeId)>,
    pub faults: Faults,
    pub checker: Checker,
    snapshot_queue: Vec<(NodeId, NodeId)>,
    reboots: Vec<NodeId>,
    /// Messages sent (before any loss), for tests that look at them; off in random runs.
    pub sent: Vec<Message>,
    pub record_sent: bool,
}

impl Cluster {
    pub fn new(voters: u64, config: RaftConfig, seed: u64) -> Cluster {
        let initial = Membership {
            voters: (1..=voters).collect(),
            learners: BTreeSet::new(),
        };
        Cluster::with_membership(initial, &[], config, seed)
    }

    /// `extra` are nodes outside the initial configuration (to be added as learners).
    pub fn with_membership(
        initial: Membership,
        extra: &[NodeId],
        config: RaftConfig,
        seed: u64,
    ) -> Cluster {
        let mut c = Cluster {
            config,
            now_ms: 0,
            rng: Rng::new(seed),
            nodes: BTreeMap::new(),
            initial: initial.clone(),
            net: Vec::new(),
            cut: BTreeSet::new(),
            faults: Faults::default(),
            checker: Checker::default(),
            snapshot_queue: Vec::new(),
            reboots: Vec::new(),
            sent: Vec::new(),
            record_sent: false,
        };
        let ids: Vec<NodeId> = initial
            .voters
            .iter()
            .chain(initial.learners.iter())
            .chain(extra)
            .copied()
            .collect();
        for id in ids {
            c.nodes.insert(id, Node::default());
            c.restart(id);
        }
        c
    }

    pub fn core(&self, id: NodeId) -> &RaftCore {
        self.nodes[&id].core.as_ref().expect("node is up")
    }

    pub fn core_mut(&mut self, id: NodeId) -> &mut RaftCore {
        self.nodes
            .get_mut(&id)
            .and_then(|n| n.core.as_mut())
            .expect("node is up")
    }

    pub fn is_up(&self, id: NodeId) -> bool {
        self.nodes[&id].core.is_some()
    }

    /// The live leader with the highest term, if any.
    pub fn leader(&self) -> Option<NodeId> {
        let leaders = self
            .nodes
            .iter()
            .filter_map(|(&id, n)| n.core.as_ref().map(|c| (id, c)));
        leaders
            .filter(|(_, c)| c.role() == Role::Leader)
            .max_by_key(|(_, c)| c.term())
            .map(|(id, _)| id)
    }

    pub fn crash(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        node.core = None;
        node.pending.clear();
        node.written = node.durable.clone();
    }

    /// Starts (or restarts) `id` from its durable state, as the host would.
    pub fn restart(&mut self, id: NodeId) {
        let config = self.config.clone();
        let initial = self.initial.clone();
        let node = self.nodes.get_mut(&id).expect("known node");
        let hs = node.durable_hs;
        let (log_state, committed_conf, conf_entries) =
            log_state_of(&node.durable, node.compacted, hs.commit, &initial);
        match RaftCore::new(config, id, hs, log_state, committed_conf, &conf_entries) {
            Ok(core) => {
                node.core = Some(core);
                node.commit_seen = hs.commit;
                node.written = node.durable.clone();
            }
            Err(e) => self
                .checker
                .violations
                .push(format!("restart: node {id} cannot restart: {e}")),
        }
    }

    pub fn isolate(&mut self, id: NodeId) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for other in ids.into_iter().filter(|&o| o != id) {
            self.cut.insert((id, other));
            self.cut.insert((other, id));
        }
    }

    /// Cuts the group into `side` and the rest.
    pub fn partition(&mut self, side: &[NodeId]) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for &a in side {
            for &b in ids.iter().filter(|b| !side.contains(b)) {
                self.cut.insert((a, b));
                self.cut.insert((b, a));
            }
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    pub fn propose(&mut self, id: NodeId, data: Vec<u8>) -> Result<u64, ProposeError> {
        let now = self.now_ms;
        let r = self.core_mut(id).propose(now, data);
        self.after_input(id);
        r
    }

    pub fn propose_conf_change(&mut self, id: NodeId, cc: ConfChange) -> Result<u64, ProposeError> {
        let now = self.now_ms;
        let r = self.core_mut(id).propose_conf_change(now, cc);
        self.after_input(id);
        r
    }

    pub fn read_index(&mut self, id: NodeId, ctx: u64) -> bool {
        let now = self.now_ms;
        let asked_at = self.checker.committed.len() as u64;
        let ok = self.core_mut(id).read_index(now, ctx).is_ok();
        if ok {
            self.checker.reads_asked.insert((id, ctx), asked_at);
        }
        self.after_input(id);
        ok
    }

    /// Observes `id` after an input and hands out its Readies.
    pub fn after_input(&mut self, id: NodeId) {
        self.observe(id);
        self.process_ready(id);
    }

    /// The committed entries node `id` holds (its written log up to its commit).
    /// Makes `id` campaign now (pre-vote first) and steps until it leads or `steps_max` pass.
    pub fn campaign(&mut self, id: NodeId, steps_max: u64) -> bool {
        let now = self.now_ms;
        self.core_mut(id)
            .campaign(now, crate::raft::election::Campaign::Pre);
        self.after_input(id);
        self.run_until(steps_max, |c| {
            c.is_up(id) && c.core(id).role() == Role::Leader
        })
    }

    /// The host of `id` compacts its log through what is committed and durable.
    pub fn compact(&mut self, id: NodeId) {
        let Some(core) = self.nodes.get_mut(&id).and_then(|n| n.core.as_mut()) else {
            return;
        };
        let index = core.commit().min(core.persisted_index());
        if core.compact(index) {
            self.nodes.get_mut(&id).expect("known node").compacted = index;
        }
    }

    /// Cuts messages from `from` to `to` only.
    pub fn cut_one_way(&mut self, from: NodeId, to: NodeId) {
        self.cut.insert((from, to));
    }

    pub fn committed_on(&self, id: NodeId) -> Vec<Entry> {
        let n = &self.nodes[&id];
        let commit = n.core.as_ref().map_or(n.durable_hs.commit, |c| c.commit());
        n.written.iter().take(commit as usize).cloned().collect()
    }

    /// One step of simulated time: deliver due messages (in random order), tick every node,
    /// complete fsyncs, serve snapshots, hand out Readies.
    pub fn step(&mut self) {
        self.now_ms += STEP_MS;
        let now = self.now_ms;
        for id in std::mem::take(&mut self.reboots) {
            if self.is_up(id) {
                self.crash(id);
                self.restart(id);
            }
        }
        let (mut due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.net)
            .into_iter()
            .partition(|m| m.0 <= now);
        self.net = rest;
        for i in (1..due.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            due.swap(i, j);
        }
        for (_, msg) in due {
            self.deliver(msg);
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for &id in &ids {
            let jitter = match self.faults.jitter_spread {
                0 => self.rng.next_u64(),
                spread => self.rng.below(spread),
            };
            if let Some(core) = self.nodes.get_mut(&id).and_then(|n| n.core.as_mut()) {
                core.handle_tick(now, jitter);
                self.after_input(id);
            }
        }
        for &id in &ids {
            if self.faults.fsync_pct > 0 && self.rng.percent(self.faults.fsync_pct) {
                self.complete_writes(id);
            }
        }
        self.serve_snapshots();
    }

    pub fn run(&mut self, steps: u64) {
        for _ in 0..steps {
            self.step();
        }
    }

    /// Steps until `done` holds (true) or `steps_max` steps passed (false).
    pub fn run_until(&mut self, steps_max: u64, mut done: impl FnMut(&Cluster) -> bool) -> bool {
        for _ in 0..steps_max {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }

    fn deliver(&mut self, msg: Message) {
        let to = msg.to;
        if self.cut.contains(&(msg.from, to))
            || self.nodes.get(&to).is_none_or(|n| n.core.is_none())
        {
            return;
        }
        let now = self.now_ms;
        self.core_mut(to).handle_message(now, msg);
        self.after_input(to);
    }

    fn send(&mut self, msg: Message) {
        if self.record_sent {
            self.sent.push(msg.clone());
        }
        if msg.from == msg.to {
            // The host's loopback: our own vote, after its fsync.
            self.net.push((self.now_ms, msg));
            return;
        }
        let f = self.faults;
        let promise = matches!(msg.body, MessageBody::VoteResponse { granted: true });
        if promise && f.reboot_after_vote_pct > 0 && self.rng.percent(f.reboot_after_vote_pct) {
            self.reboots.push(msg.from);
        }
        if f.drop_pct > 0 && self.rng.percent(f.drop_pct) {
            return;
        }
        let copies = if f.dup_pct > 0 && self.rng.percent(f.dup_pct) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = STEP_MS * (1 + self.rng.below(f.delay_steps_max + 1));
            self.net.push((self.now_ms + delay, msg.clone()));
        }
    }

    /// The host loop for one node: write, send, check, serve reads, until nothing is ready.
    fn process_ready(&mut self, id: NodeId) {
        loop {
            let Some(core) = self.nodes.get_mut(&id).and_then(|n| n.core.as_mut()) else {
                return;
            };
            let Some(ready) = core.poll_ready() else {
                return;
            };
            let node = self.nodes.get_mut(&id).expect("known node");
            if let Some(from) = ready.truncate_from {
                if from <= node.commit_seen {
                    let v = format!(
                        "committed prefix: node {id} cut its log from {from}, below its commit {}",
                        node.commit_seen
                    );
                    self.checker.violations.push(v);
                }
                node.written.truncate(from as usize - 1);
            }
            node.written.extend(ready.entries.iter().cloned());
            node.pending.push_back(Write {
                hard_state: ready.hard_state,
                truncate_from: ready.truncate_from,
                entries: ready.entries,
                persisted_messages: ready.persisted_messages,
            });
            for msg in ready.messages {
                self.send(msg);
            }
            if let Some(commit) = ready.commit {
                self.check_commit(id, commit);
                let pct = self.faults.isolate_after_commit_pct;
                let leading = self.core(id).role() == Role::Leader;
                if leading && pct > 0 && self.rng.percent(pct) {
                    self.isolate(id);
                }
            }
            self.check_reads(id, &ready.read_states);
            let node = self.nodes.get_mut(&id).expect("known node");
            node.read_states.extend(ready.read_states);
            node.dropped_reads.extend(ready.dropped_reads);
            self.snapshot_queue
                .extend(ready.snapshots_to_send.iter().map(|&to| (id, to)));
            for read in ready.log_reads {
                let node = self.nodes.get_mut(&id).expect("known node");
                node.log_reads_served += 1;
                let result = if read.lo <= node.compacted {
                    Err(LogReadError::Compacted)
                } else {
                    Ok(read_entries(
                        &node.written,
                        read.lo,
                        read.hi,
                        read.bytes_max,
                    ))
                };
                self.core_mut(id).handle_log_read(read.id, result);
            }
            if self.faults.fsync_pct == 0 {
                self.complete_writes(id);
            }
        }
    }

    /// Every pending write of `id` becomes durable, in order; then its persisted messages leave
    /// and the core hears of it.
    pub fn complete_writes(&mut self, id: NodeId) {
        loop {
            let Some(node) = self.nodes.get_mut(&id) else {
                return;
            };
            let Some(w) = node.pending.pop_front() else {
                return;
            };
            if let Some(from) = w.truncate_from {
                node.durable.truncate(from as usize - 1);
            }
            node.durable.extend(w.entries.iter().cloned());
            if let Some(hs) = w.hard_state {
                node.durable_hs = hs;
            }
            for msg in w.persisted_messages {
                self.send(msg);
            }
            if let Some(last) = w.entries.last() {
                let now = self.now_ms;
                if let Some(core) = self.nodes.get_mut(&id).and_then(|n| n.core.as_mut()) {
                    core.handle_persisted(now, last.index, last.term);
                }
            }
            self.after_input(id);
        }
    }

    /// The host's snapshot transfer: the follower's log becomes the leader's committed prefix.
    fn serve_snapshots(&mut self) {
        for (from, to) in std::mem::take(&mut self.snapshot_queue) {
            if TRACE {
                eprintln!(
                    "{} snapshot {from} -> {to} up {} {} cut {}",
                    self.now_ms,
                    self.is_up(from),
                    self.is_up(to),
                    self.cut.contains(&(from, to))
                );
            }
            if !self.is_up(from) || !self.is_up(to) || self.cut.contains(&(from, to)) {
                if self.is_up(from) {
                    self.core_mut(from)
                        .handle_snapshot_sent(to, Err(crate::raft::SnapshotError::Failed));
                }
                continue;
            }
            let index = self.core(from).commit();
            let term = self.core(from).term_at(index).unwrap_or(0);
            let conf = self.core(from).committed_membership().clone();
            let prefix: Vec<Entry> = self.nodes[&from].written[..index as usize].to_vec();
            // The host installs the snapshot durably after its earlier writes.
            self.complete_writes(to);
            let now = self.now_ms;
            if self
                .core_mut(to)
                .handle_snapshot_installed(now, index, term, conf)
            {
                let node = self.nodes.get_mut(&to).expect("known node");
                node.pending.clear();
                node.durable = prefix.clone();
                node.written = prefix;
                node.compacted = index;
                node.durable_hs.commit = index;
                node.snapshots_installed += 1;
            }
            self.core_mut(from).handle_snapshot_sent(to, Ok(index));
            self.after_input(from);
            self.after_input(to);
        }
    }

    /// Election safety, leader completeness and commit monotonicity, checked after every input.
    fn observe(&mut self, id: NodeId) {
        let Some(core) = self.nodes[&id].core.as_ref() else {
            return;
        };
        let (role, term, commit) = (core.role(), core.term(), core.commit());
        if let Some(v) = core.vote() {
            if *self.checker.votes.entry((id, term)).or_insert(v) != v {
                self.checker.double_votes += 1;
            }
        }
        if commit < self.nodes[&id].commit_seen {
            let v = format!(
                "commit monotonic: node {id} commit went back to {commit} from {}",
                self.nodes[&id].commit_seen
            );
            self.checker.violations.push(v);
        }
        if role != Role::Leader {
            return;
        }
        match self.checker.leaders.get(&term) {
            Some(&other) if other != id => {
                let v = format!("election safety: nodes {other} and {id} both led term {term}");
                self.checker.violations.push(v);
            }
            Some(_) => {}
            None => {
                self.checker.leaders.insert(term, id);
                self.check_leader_completeness(id, term);
                if TRACE {
                    let others: Vec<String> = self
                        .nodes
                        .iter()
                        .map(|(i, n)| match &n.core {
                            Some(k) => format!(
                                "{i}:{:?}/t{}/last{}/lt{}/c{}",
                                k.role(),
                                k.term(),
                                k.last_index(),
                                k.last_term(),
                                k.commit()
                            ),
                            None => format!("{i}:down"),
                        })
                        .collect();
                    eprintln!(
                        "{} leader {id} term {term}: {}",
                        self.now_ms,
                        others.join(" ")
                    );
                }
                let pct = self.faults.isolate_new_leader_pct;
                if pct > 0 && self.rng.percent(pct) {
                    self.isolate(id);
                }
            }
        }
    }

    /// A new leader of `term` holds every entry committed in an earlier term.
    fn check_leader_completeness(&mut self, id: NodeId, term: u64) {
        let bound = self
            .checker
            .commit_by_term
            .range(..term)
            .map(|(_, &i)| i)
            .max()
            .unwrap_or(0);
        let core = self.core(id);
        for e in self.checker.committed.iter().take(bound as usize) {
            match core.term_at(e.index) {
                Some(t) if t == e.term => {}
                None if e.index <= core.commit() => {} // inside its snapshot
                other => {
                    let v = format!(
                        "leader completeness: leader {id} of term {term} has term {other:?} at {} committed with term {}",
                        e.index, e.term
                    );
                    self.checker.violations.push(v);
                    return;
                }
            }
        }
    }

    /// Node `id` says it committed up to `commit`: those entries must be the group's.
    fn check_commit(&mut self, id: NodeId, commit: u64) {
        let node = &self.nodes[&id];
        if commit <= node.commit_seen {
            let v = format!(
                "commit monotonic: node {id} reported commit {commit} after {}",
                node.commit_seen
            );
            self.checker.violations.push(v);
            return;
        }
        let from = node.commit_seen.max(node.compacted);
        for index in from + 1..=commit {
            let Some(e) = node.written.get(index as usize - 1) else {
                let v = format!("committed prefix: node {id} committed {index} it does not hold");
                self.checker.violations.push(v);
                break;
            };
            match self.checker.committed.get(index as usize - 1) {
                Some(c) if c != e => {
                    let v = format!(
                        "committed prefix: node {id} committed {e:?} at {index}, the group {c:?}"
                    );
                    self.checker.violations.push(v);
                    break;
                }
                Some(_) => {}
                None => self.checker.committed.push(e.clone()),
            }
        }
        let core = self.core(id);
        let (role, term, commit_term) = (core.role(), core.term(), core.term_at(commit));
        if role == Role::Leader {
            self.checker.old_term_commits += u64::from(commit_term != Some(term));
            let slot = self.checker.commit_by_term.entry(term).or_insert(0);
            *slot = (*slot).max(commit);
        }
        self.nodes.get_mut(&id).expect("known node").commit_seen = commit;
    }

    /// ReadIndex linearizability: a released read's index is at least the group's commit when
    /// it was asked.
    fn check_reads(&mut self, id: NodeId, released: &[ReadState]) {
        for r in released {
            let asked_at = self.checker.reads_asked.remove(&(id, r.ctx)).unwrap_or(0);
            if r.index < asked_at {
                let v = format!("read linearizability: node {id} released read {} at {} < commit {asked_at} when asked", r.ctx, r.index);
                self.checker.violations.push(v);
            }
        }
    }
}

/// What a host hands `RaftCore::new` from its durable log: the term runs, the configuration
/// committed at `commit`, and the conf entries above it.
pub fn log_state_of(
    log: &[Entry],
    compacted: u64,
    commit: u64,
    initial: &Membership,
) -> (LogState, Membership, Vec<(u64, ConfChange)>) {
    let snapshot_term = if compacted == 0 {
        0
    } else {
        log[compacted as usize - 1].term
    };
    let mut runs: Vec<TermRun> = Vec::new();
    for e in &log[compacted as usize..] {
        if runs.last().is_none_or(|r| r.term != e.term) {
            runs.push(TermRun {
                first_index: e.index,
                term: e.term,
            });
        }
    }
    let mut conf = initial.clone();
    let mut conf_entries = Vec::new();
    for e in log.iter().filter(|e| e.kind == EntryKind::ConfChange) {
        let Some(cc) = ConfChange::decode(&e.data) else {
            continue;
        };
        if e.index <= commit.max(compacted) {
            conf = conf.apply(cc).unwrap_or(conf);
        } else {
            conf_entries.push((e.index, cc));
        }
    }
    let state = LogState {
        first_index: compacted + 1,
        last_index: log.len() as u64,
        term_runs: runs,
        snapshot_index: compacted,
        snapshot_term,
    };
    (state, conf, conf_entries)
}

fn read_entries(log: &[Entry], lo: u64, hi: u64, bytes_max: u64) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut bytes = 0;
    for e in log
        .iter()
        .skip(lo as usize - 1)
        .take_while(|e| e.index <= hi)
    {
        if !out.is_empty() && bytes + e.size_bytes() > bytes_max {
            break;
        }
        bytes += e.size_bytes();
        out.push(e.clone());
    }
    out
}
