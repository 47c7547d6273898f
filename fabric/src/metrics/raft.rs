//! A clustered node's Raft and node-link series (a single node registers none of them).
//!
//! Nothing here walks a replica: the gauges are set at scrape time from what each shard's host
//! last published into its slot (`ReplicaStatus`, at most 50 ms old; the same figures
//! `/v1/cluster` answers with) and from the node link's view of each peer. The replica's
//! counters (leader changes, snapshots) and the host's election count start again from zero
//! when a shard restarts; [`Monotonic`] turns them into counter increments that never go back.
//!
//! Label cardinality is bounded: `shard`, and `peer`/`follower` only for the cluster's members.

use super::Registrar;
use crate::cluster::links::PeerStatus;
use crate::shard_actor::ReplicaStatus;
use fabric_shard::raft::{NodeId, Role};
use metrics::{Counter, Gauge};
use std::fmt::Write as _;
use std::sync::Mutex;

/// Who this node is in its cluster, and its peers: the label values of the cluster series.
#[derive(Debug, Clone)]
pub struct ClusterLabels {
    pub node: NodeId,
    /// Every other member.
    pub peers: Vec<NodeId>,
}

/// What one scrape reads of a clustered node: each shard's published replica view (by shard
/// index; `None` before its host published one) and each peer's link.
#[derive(Debug, Clone, Default)]
pub struct ClusterScrape {
    pub replicas: Vec<Option<ReplicaStatus>>,
    pub links: Vec<PeerStatus>,
}

/// One shard's Raft series (label `shard`).
struct RaftShardMetrics {
    term: Gauge,
    commit: Gauge,
    applied: Gauge,
    is_leader: Gauge,
    has_leader: Gauge,
    repairing: Gauge,
    leader_changes: Counter,
    elections: Counter,
    snapshots_sent: Counter,
    snapshots_installed: Counter,
}

/// What the shard's counters were at the last scrape.
#[derive(Debug, Default)]
struct RaftShardLast {
    leader_changes: Monotonic,
    elections: Monotonic,
    snapshots_sent: Monotonic,
    snapshots_installed: Monotonic,
}

/// One peer's node-link series (label `peer`).
struct LinkMetrics {
    peer: NodeId,
    up: Gauge,
    rtt: Gauge,
    resets: Counter,
    resets_last: Monotonic,
}

/// Every cluster series of one node.
pub struct RaftMetrics {
    shards: Vec<RaftShardMetrics>,
    /// One per peer: the members at start, and each that joined since (registered at the first
    /// scrape that finds it; a member that left stays, at 0).
    links: Mutex<Vec<LinkMetrics>>,
    last: Mutex<Vec<RaftShardLast>>,
}

impl RaftMetrics {
    pub(super) fn register(r: &Registrar<'_>, shards: u32, c: &ClusterLabels) -> RaftMetrics {
        RaftMetrics {
            shards: (0..shards).map(|i| shard_metrics(r, i)).collect(),
            links: Mutex::new(c.peers.iter().map(|p| link_metrics(r, *p)).collect()),
            last: Mutex::new((0..shards).map(|_| RaftShardLast::default()).collect()),
        }
    }

    /// Sets every series from one scrape's figures (before the exposition is rendered).
    pub(super) fn set(&self, r: &Registrar<'_>, c: &ClusterScrape) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        for ((m, l), r) in self.shards.iter().zip(last.iter_mut()).zip(&c.replicas) {
            if let Some(r) = r {
                set_shard(m, l, r);
            }
        }
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        for p in &c.links {
            if !links.iter().any(|m| m.peer == p.id) {
                links.push(link_metrics(r, p.id));
            }
        }
        for m in links.iter_mut() {
            let Some(p) = c.links.iter().find(|p| p.id == m.peer) else {
                m.up.set(0.0);
                continue;
            };
            m.up.set(if p.up { 1.0 } else { 0.0 });
            m.resets.increment(m.resets_last.advance(p.resets));
            if let Some(rtt) = p.rtt {
                m.rtt.set(rtt.as_secs_f64());
            }
        }
    }
}

fn shard_metrics(r: &Registrar<'_>, shard: u32) -> RaftShardMetrics {
    let l = [("shard", shard.to_string())];
    RaftShardMetrics {
        term: r.gauge(
            "fabric_raft_term",
            "The shard's Raft term as this node knows it.",
            &l,
        ),
        commit: r.gauge(
            "fabric_raft_commit_index",
            "The shard's Raft commit index on this node.",
            &l,
        ),
        applied: r.gauge(
            "fabric_raft_applied_index",
            "The last Raft index this node's replica applied to its shard.",
            &l,
        ),
        is_leader: r.gauge(
            "fabric_raft_is_leader",
            "1 while this node is the shard's Raft leader.",
            &l,
        ),
        has_leader: r.gauge(
            "fabric_raft_has_leader",
            "1 while this node knows a leader of the shard.",
            &l,
        ),
        repairing: r.gauge(
            "fabric_raft_repairing",
            "1 while this node's replica of the shard is in repair (its log was damaged; it neither votes nor leads until it has fetched the cut range).",
            &l,
        ),
        leader_changes: r.counter(
            "fabric_raft_leader_changes_total",
            "Changes of the shard's known leader seen by this node.",
            &l,
        ),
        elections: r.counter(
            "fabric_raft_elections_total",
            "Elections this node started for the shard (terms it became candidate in).",
            &l,
        ),
        snapshots_sent: r.counter(
            "fabric_raft_snapshots_sent_total",
            "Snapshots of the shard this node offered to followers as leader.",
            &l,
        ),
        snapshots_installed: r.counter(
            "fabric_raft_snapshots_installed_total",
            "Snapshots of the shard this node installed as follower.",
            &l,
        ),
    }
}

fn link_metrics(r: &Registrar<'_>, peer: NodeId) -> LinkMetrics {
    let l = [("peer", peer.to_string())];
    LinkMetrics {
        peer,
        up: r.gauge("fabric_node_link_up", "1 while the node link to the peer is connected.", &l),
        rtt: r.gauge("fabric_node_link_rtt_seconds", "The node link's round-trip estimate to the peer (QUIC's), seconds, as last sampled while up.", &l),
        resets: r.counter("fabric_node_link_resets_total", "Connections to the peer this node ended because it dropped a frame for it (queue full, group stream failed).", &l),
        resets_last: Monotonic::default(),
    }
}

fn set_shard(m: &RaftShardMetrics, l: &mut RaftShardLast, r: &ReplicaStatus) {
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    m.term.set(r.term as f64);
    m.commit.set(r.commit as f64);
    m.applied.set(r.applied as f64);
    m.is_leader.set(flag(r.leader == Some(r.node)));
    m.has_leader.set(flag(r.leader.is_some()));
    m.repairing.set(flag(r.repair_through.is_some()));
    m.leader_changes
        .increment(l.leader_changes.advance(r.leader_changes));
    m.elections.increment(l.elections.advance(r.elections));
    m.snapshots_sent
        .increment(l.snapshots_sent.advance(r.snapshots_sent));
    m.snapshots_installed
        .increment(l.snapshots_installed.advance(r.snapshots_installed));
}

/// A count that starts again from zero when its owner restarts, as counter increments.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Monotonic {
    last: u64,
}

impl Monotonic {
    /// How much to add for the count now at `now`: the rise since the last call, or all of
    /// `now` if it went down (its owner restarted and counted `now` since).
    pub fn advance(&mut self, now: u64) -> u64 {
        let add = if now >= self.last {
            now - self.last
        } else {
            now
        };
        self.last = now;
        add
    }
}

/// Counts the elections a replica started, from its (term, role) as its host observes them
/// after each step: a term above the last one observed while the replica is a candidate (or
/// already leader: a one-voter group wins in the step it campaigns) is an election it started.
/// A pre-vote does not raise the term and is not counted; a term learned from another node
/// leaves the replica a follower and is not counted either.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ElectionCounter {
    last_term: Option<u64>,
    pub elections: u64,
}

impl ElectionCounter {
    pub fn observe(&mut self, term: u64, role: Role) {
        let campaigned = matches!(role, Role::Candidate | Role::Leader);
        if self.last_term.is_some_and(|t| term > t) && campaigned {
            self.elections += 1;
        }
        self.last_term = Some(term);
    }
}

/// `fabric_raft_follower_lag_entries{shard,follower}`: only for the shards this node leads,
/// one series per follower (the leader's last index minus the follower's match index).
/// Rendered as text rather than through the facade: a series must vanish when this node stops
/// leading, and the facade's series cannot be removed.
pub fn render_lag(out: &mut String, replicas: &[Option<ReplicaStatus>]) {
    const NAME: &str = "fabric_raft_follower_lag_entries";
    let mut lines = String::new();
    for (shard, r) in replicas.iter().enumerate() {
        let Some(r) = r.as_ref().filter(|r| r.leader == Some(r.node)) else {
            continue;
        };
        for (follower, matched) in r.matched.iter().filter(|(id, _)| *id != r.node) {
            let lag = r.last_index.saturating_sub(*matched);
            let _ = writeln!(
                lines,
                "{NAME}{{shard=\"{shard}\",follower=\"{follower}\"}} {lag}"
            );
        }
    }
    if !lines.is_empty() {
        let _ = writeln!(
            out,
            "# HELP {NAME} On the shard's leader: entries each follower's log is behind the \
             leader's.\n# TYPE {NAME} gauge\n{lines}"
        );
    }
}

#[cfg(test)]
mod tests;
