//! Replicated drivers: three `ShardDriver`s serving replicas of one shard, each on its own
//! in-memory store, with an adapter that performs their effects and carries their messages
//! to each other (the node link's job), so the host code a node runs is what is tested.

use super::*;
use fabric_proto::internal::ShardOp;
use fabric_proto::{Body, ConvId, ErrorCode, MeshId, PeerId, ServerOp};
use fabric_shard::raft::{NodeId, RaftConfig};
use fabric_shard::replica::{ReplicaConfig, ReplicaPlanted};
use fabric_shard::store::mem::MemStore;

struct Node {
    driver: ShardDriver,
    store: MemStore,
    up: bool,
}

struct Cluster {
    nodes: Vec<Node>,
    t: Time,
    /// Node-link frames in flight: (deliver at mono ms, from, to, frame).
    wire: Vec<(u64, NodeId, NodeId, NodeFrame)>,
    isolated: Option<NodeId>,
    /// Ok replies per ref.
    oks: BTreeSet<u64>,
    unavailable: u64,
    restarts_seen: u64,
    /// Pages answered: ref -> the last seq in it.
    pages: BTreeMap<u64, u64>,
    /// Sessions a driver closed: (its node index, session, why).
    closed: Vec<(usize, SessionId, CloseReason)>,
    /// The next reply frame for another node's session is lost on the link.
    lose_next_remote: bool,
    /// Attach answers: (node index, refused).
    attached: Vec<(usize, Option<ErrorCode>)>,
    /// Deliveries (node index, pos) and events (node index, seq), in arrival order.
    delivered: Vec<(usize, u64)>,
    events: Vec<(usize, u64)>,
}

fn replica_config(node: NodeId) -> ReplicaConfig {
    ReplicaConfig {
        node,
        voters: [1, 2, 3].into(),
        raft: RaftConfig {
            raft_heartbeat_ms: 50,
            raft_election_timeout_ms: 300,
            ..RaftConfig::default()
        },
        planted: ReplicaPlanted::default(),
    }
}

impl Cluster {
    fn new() -> Cluster {
        Cluster::with_nodes(3)
    }

    /// Nodes 1 to `n`; the group's voters at creation are 1, 2 and 3.
    fn with_nodes(n: u64) -> Cluster {
        let nodes = (1..=n)
            .map(|id| {
                let mut store = MemStore::new(0);
                store::init(&mut store, 0).expect("init");
                let driver = ShardDriver::replicated(
                    0,
                    ShardConfig::default(),
                    RestartPolicy::default(),
                    64,
                    1_000,
                    replica_config(id),
                    id * 7919,
                );
                Node {
                    driver,
                    store,
                    up: true,
                }
            })
            .collect();
        let mut c = Cluster {
            nodes,
            t: Time {
                unix_ms: 1_000_000,
                mono_ms: 0,
            },
            wire: Vec::new(),
            isolated: None,
            oks: BTreeSet::new(),
            unavailable: 0,
            restarts_seen: 0,
            pages: BTreeMap::new(),
            closed: Vec::new(),
            lose_next_remote: false,
            attached: Vec::new(),
            delivered: Vec::new(),
            events: Vec::new(),
        };
        c.run_effects();
        c
    }

    /// Performs every node's effects until none is left.
    fn run_effects(&mut self) {
        for i in 0..self.nodes.len() {
            while let Some(e) = self.nodes[i].driver.poll_effect() {
                self.perform(i, e);
            }
        }
    }

    fn perform(&mut self, i: usize, e: Effect) {
        let t = self.t;
        let n = &mut self.nodes[i];
        match e {
            Effect::Write(w) => {
                let r = w.perform(&mut n.store);
                n.driver.handle_write_done(t, r);
            }
            Effect::Recover(job) => {
                self.restarts_seen += 1;
                let r = job.perform(&mut n.store);
                n.driver.handle_recovered(t, r);
            }
            Effect::Read(job) => {
                let done = job.perform(&mut n.store);
                n.driver.handle_read_done(t, done);
            }
            Effect::LogRead(job) => {
                let r = job.perform(&mut n.store);
                n.driver.handle_log_read_done(t, &job, r);
            }
            Effect::Remote { .. } if std::mem::take(&mut self.lose_next_remote) => {}
            e @ (Effect::Peer(_)
            | Effect::Forward { .. }
            | Effect::Remote { .. }
            | Effect::RemoteClose { .. }) => {
                if let Ok((to, frame)) = NodeFrame::from_effect(e) {
                    self.wire.push((t.mono_ms + 2, i as NodeId + 1, to, frame));
                }
            }
            Effect::Replies { replies, .. } => {
                for r in replies {
                    match r {
                        Reply::Frame(ServerOp::Ok { r, .. }) => {
                            self.oks.insert(r);
                        }
                        Reply::Frame(ServerOp::Error { .. }) => self.unavailable += 1,
                        Reply::Messages { r, events, .. } => {
                            let last = events.last().map_or(0, |e| e.seq);
                            self.pages.insert(r, last);
                        }
                        Reply::Attached { refused, .. } => {
                            self.attached.push((i, refused.map(|(code, _)| code)))
                        }
                        Reply::Frame(ServerOp::Deliver { pos, .. }) => {
                            self.delivered.push((i, pos))
                        }
                        Reply::Frame(ServerOp::Event(e)) => self.events.push((i, e.seq)),
                        _ => {}
                    }
                }
            }
            Effect::CloseSession { session, why } => self.closed.push((i, session, why)),
            Effect::Forget { .. } => {}
        }
    }

    /// Advances time by `ms` in 5 ms steps: due messages delivered, timers fired.
    fn advance(&mut self, ms: u64) {
        for _ in 0..ms / 5 {
            self.t.mono_ms += 5;
            self.t.unix_ms += 5;
            let now = self.t.mono_ms;
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.wire)
                .into_iter()
                .partition(|w| w.0 <= now);
            self.wire = later;
            for (_, from, to, frame) in due {
                if self.isolated.is_some_and(|x| x == from || x == to) {
                    continue;
                }
                let d = &mut self.nodes[to as usize - 1].driver;
                assert!(
                    d.handle_node_frame(self.t, from, frame),
                    "frames pass their checks"
                );
            }
            for i in 0..self.nodes.len() {
                if self.nodes[i]
                    .driver
                    .poll_timeout()
                    .is_some_and(|at| at <= now)
                {
                    self.nodes[i].driver.handle_timeout(self.t);
                }
            }
            self.run_effects();
        }
    }

    fn leader(&self) -> Option<usize> {
        self.nodes.iter().position(|n| {
            n.up && n
                .driver
                .replica()
                .is_some_and(|r| r.mode() == fabric_shard::replica::Mode::Leading)
                && self.isolated != n.driver.replica().map(|r| r.raft().id())
        })
    }

    /// A batch of node `i`'s session (each node has one).
    fn send(&mut self, i: usize, ops: Vec<ShardOp>) {
        let session = session_id(i as NodeId + 1, 1);
        let batch = ops.into_iter().map(|op| Request { session, op }).collect();
        self.nodes[i].driver.handle_batch(self.t, session, batch);
        self.run_effects();
    }
}

fn append(r: u64) -> ShardOp {
    ShardOp::Append {
        r,
        mesh: MeshId::must("m"),
        conv: ConvId::must("c"),
        from: PeerId::must("a"),
        body: Body::from_json_text(format!("{r}")).unwrap(),
        key: None,
    }
}

fn setup(c: &mut Cluster) -> usize {
    c.advance(1_000);
    let l = c.leader().expect("a leader within a second");
    c.send(
        l,
        vec![
            ShardOp::CreateMesh {
                r: 1,
                mesh: MeshId::must("m"),
            },
            ShardOp::AddPeer {
                r: 2,
                mesh: MeshId::must("m"),
                peer: PeerId::must("a"),
                groups: vec![],
                token_hash: Some([1; 32]),
                public_key: None,
            },
        ],
    );
    c.advance(100);
    assert!(c.oks.contains(&1) && c.oks.contains(&2));
    l
}

#[test]
fn replicated_drivers_elect_a_leader_and_answer_appends_at_commit() {
    // Proves three drivers of one shard's replicas elect a leader from their ticks, that the
    // leader's driver answers appends once a quorum holds them, and that every replica ends
    // with every append.
    let mut c = Cluster::new();
    let l = setup(&mut c);
    for r in 100..150 {
        c.send(l, vec![append(r)]);
    }
    assert!(!c.oks.contains(&149), "no ok before the followers answered");
    c.advance(200);
    assert!(
        (100..150).all(|r| c.oks.contains(&r)),
        "every append acknowledged"
    );
    for n in &c.nodes {
        let head = n.driver.shard().and_then(|s| s.conversation_head("m", "c"));
        assert_eq!(head, Some(50));
    }
}

#[test]
fn a_deposed_leader_driver_recovers_its_replica_from_disk() {
    // Proves a leader cut off from its followers acknowledges nothing, steps down (check
    // quorum) and its driver recovers its replica from disk (an incarnation ends), the others
    // elect a new leader, and after the heal the old leader follows, holding the new leader's
    // appends and not its own unacknowledged one.
    let mut c = Cluster::new();
    let old = setup(&mut c);
    let restarts = c.restarts_seen;
    c.isolated = Some(old as NodeId + 1);
    c.send(old, vec![append(500)]);
    c.advance(1_500);
    assert!(!c.oks.contains(&500), "no ok without a quorum");
    // Check-quorum: it stepped down within an election timeout or two of losing its quorum,
    // and a leader that steps down with applied records starts again from disk.
    let state = c.nodes[old]
        .driver
        .replica()
        .map(|r| (r.mode(), r.raft().role(), r.raft().term()));
    assert!(c.restarts_seen > restarts, "recovered from disk: {state:?}");
    let new = c.leader().expect("a new leader");
    assert_ne!(new, old);
    for r in 600..610 {
        c.send(new, vec![append(r)]);
    }
    c.advance(200);
    assert!((600..610).all(|r| c.oks.contains(&r)));
    c.isolated = None;
    c.advance(1_000);
    let head = c.nodes[old]
        .driver
        .shard()
        .and_then(|s| s.conversation_head("m", "c"));
    assert_eq!(head, Some(10), "the new leader's appends, not its own");
}

#[test]
fn a_follower_forwards_to_its_leader_and_the_answer_comes_back() {
    // Proves any node serves any client: a batch of a session on a follower's node goes to
    // the leader's node, is answered there once committed, and the answer reaches the session
    // on its own node; with the leader cut off, the follower's node answers `unavailable`
    // within an election timeout, and a late answer is never a second one.
    let mut c = Cluster::new();
    let l = setup(&mut c);
    let f = (l + 1) % 3;
    for r in 700..720 {
        c.send(f, vec![append(r)]);
    }
    c.advance(100);
    assert!(
        (700..720).all(|r| c.oks.contains(&r)),
        "answered through the leader"
    );
    c.isolated = Some(l as NodeId + 1);
    let before = c.unavailable;
    c.send(f, vec![append(800)]);
    c.advance(400);
    assert!(
        c.unavailable > before,
        "unavailable within an election timeout"
    );
    assert!(!c.oks.contains(&800), "one answer per request");
    c.isolated = None;
    c.advance(2_000);
    assert!(
        !c.oks.contains(&800),
        "a late ok after `unavailable` is dropped"
    );
}

#[test]
fn a_new_leader_tells_the_sessions_a_follower_forwarded_to_the_old_one_to_attach_again() {
    // Proves a session on a follower's node, whose batches went to a leader that was then
    // replaced (a newer term), is told so by its node (`LeaderChanged`: it attaches again at
    // the new leader) instead of staying silently attached to nothing; while the leader
    // stays, nothing is said.
    let mut c = Cluster::new();
    let l = setup(&mut c);
    let f = (l + 1) % 3;
    let session = session_id(f as NodeId + 1, 1);
    c.send(f, vec![append(900)]);
    c.advance(500);
    assert!(c.oks.contains(&900));
    assert!(c.closed.is_empty(), "nothing closed while the leader stays");
    c.isolated = Some(l as NodeId + 1);
    c.advance(3_000);
    let new = c.leader().expect("a new leader");
    assert_ne!(new, l);
    assert!(
        c.closed.contains(&(f, session, CloseReason::LeaderChanged)),
        "{:?}",
        c.closed
    );
}

fn attach(inbox_after: u64, next_seq: u64) -> ShardOp {
    ShardOp::Attach {
        mesh: MeshId::must("m"),
        peer: PeerId::must("a"),
        inbox_after: Some(inbox_after),
        subs: vec![(ConvId::must("c"), next_seq)],
        attempt: 1,
    }
}

fn send_to_a(r: u64) -> ShardOp {
    ShardOp::Send {
        r,
        mesh: MeshId::must("m"),
        from: PeerId::must("a"),
        to: fabric_proto::Target::Peer(PeerId::must("a")),
        body: Body::from_json_text(format!("{r}")).unwrap(),
        key: None,
    }
}

#[test]
fn a_session_attached_again_at_a_new_leader_gets_each_message_and_event_once() {
    // Proves the leader-change path end to end at the driver level: a follower's session
    // attached through the old leader receives deliveries and events; the leader is cut off,
    // the session is told `LeaderChanged`, attaches at the new leader from the marks it has
    // (retrying while no leader is known), and then receives only what comes after them:
    // no pos or seq twice, none skipped.
    let mut c = Cluster::new();
    let l = setup(&mut c);
    let f = (l + 1) % 3;
    c.send(f, vec![attach(0, 1)]);
    c.advance(200);
    assert_eq!(c.attached, vec![(f, None)]);
    c.send(l, vec![send_to_a(10), send_to_a(11), append(12)]);
    c.advance(300);
    let got = |c: &Cluster, v: &Vec<(usize, u64)>| -> Vec<u64> {
        let _ = c;
        v.iter().filter(|x| x.0 == f).map(|x| x.1).collect()
    };
    assert_eq!(got(&c, &c.delivered), vec![1, 2]);
    assert_eq!(got(&c, &c.events), vec![1]);
    c.isolated = Some(l as NodeId + 1);
    let session = session_id(f as NodeId + 1, 1);
    for _ in 0..60 {
        c.advance(100);
        if c.closed.contains(&(f, session, CloseReason::LeaderChanged)) {
            break;
        }
    }
    assert!(c.closed.contains(&(f, session, CloseReason::LeaderChanged)));
    // What the edge does: attach from its marks until the new leader confirms.
    for _ in 0..40 {
        c.send(f, vec![attach(2, 2)]);
        c.advance(100);
        if c.attached.last() == Some(&(f, None)) {
            break;
        }
    }
    assert_eq!(c.attached.last(), Some(&(f, None)), "{:?}", c.attached);
    let new = c.leader().expect("a new leader");
    c.send(new, vec![send_to_a(20), append(21), append(22)]);
    c.advance(300);
    assert!(c.oks.contains(&20) && c.oks.contains(&22));
    assert_eq!(
        got(&c, &c.delivered),
        vec![1, 2, 3],
        "each pos once, in order"
    );
    assert_eq!(got(&c, &c.events), vec![1, 2, 3], "each seq once, in order");
}

#[test]
fn a_lost_reply_frame_closes_its_session_at_the_next_one() {
    // Proves a session whose replies come from another node's leader is closed at the first
    // frame after one the link lost (a lost frame may hold deliveries; a client acknowledging
    // a later one would move its cursor past them), and what that later frame held is not
    // handed to the closed session.
    let mut c = Cluster::new();
    let l = setup(&mut c);
    let f = (l + 1) % 3;
    let session = session_id(f as NodeId + 1, 1);
    c.send(f, vec![append(960)]);
    c.advance(200);
    assert!(c.oks.contains(&960));
    c.lose_next_remote = true;
    c.send(f, vec![append(961)]);
    c.advance(200);
    assert!(!c.oks.contains(&961), "its reply frame was lost");
    assert!(c.closed.is_empty(), "nothing shows a gap yet");
    c.send(f, vec![append(962)]);
    c.advance(200);
    assert!(c.closed.contains(&(f, session, CloseReason::Restarted)));
    assert!(
        !c.oks.contains(&962),
        "the frame after the gap is not handed over"
    );
}

#[test]
fn past_remote_sessions_max_the_oldest_numbering_goes_and_its_session_is_closed() {
    // Proves the numbering of remote sessions is bounded: with room for one, a second
    // session's frames push the first one's numbering out, and the first session's next
    // batch reads as a gap at the leader, which closes it: the bound costs a resume, never a
    // silent loss.
    let mut c = Cluster::new();
    let l = setup(&mut c);
    let f = (l + 1) % 3;
    c.nodes[l].driver.set_remote_sessions_max(1);
    let (a, b) = (
        session_id(f as NodeId + 1, 1),
        session_id(f as NodeId + 1, 2),
    );
    let send = |c: &mut Cluster, session: SessionId, r: u64| {
        let batch = vec![Request {
            session,
            op: append(r),
        }];
        c.nodes[f].driver.handle_batch(c.t, session, batch);
        c.run_effects();
        c.advance(200);
    };
    send(&mut c, a, 970);
    send(&mut c, b, 971);
    assert!(c.oks.contains(&970) && c.oks.contains(&971));
    assert!(c.closed.is_empty());
    send(&mut c, a, 972);
    assert!(
        c.closed.contains(&(f, a, CloseReason::Restarted)),
        "{:?}",
        c.closed
    );
    assert!(!c.closed.iter().any(|x| x.1 == b), "b keeps its numbering");
}

#[test]
fn a_restarted_node_counts_its_sessions_past_the_ids_it_used_before() {
    // Proves a clustered node's session ids after a restart start past the ones its previous
    // process used (128 a millisecond of its life), fit the 48 bits beside the node id, and
    // keep the node id: a leader still holding a dead session never meets its id again.
    let boot = 1_765_000_000_000u64;
    let first = session_counter_start(boot);
    let used = first + 128 * 60_000; // a minute of life at 128 sessions a millisecond
    let after = session_counter_start(boot + 60_000);
    assert!(after >= used, "{after} < {used}");
    assert!(after < 1 << SESSION_NODE_SHIFT);
    assert_eq!(session_home(session_id(3, after)), 3);
}

fn read(r: u64, local: bool) -> ShardOp {
    ShardOp::Read {
        r,
        mesh: MeshId::must("m"),
        conv: ConvId::must("c"),
        from: 1,
        limit: 100,
        local,
    }
}

#[test]
fn a_local_read_is_answered_by_the_receiving_replica_even_cut_off_from_its_leader() {
    // Proves `?consistency=local`: a follower's node answers a local read from its own
    // replica's committed entries without the leader (here unreachable), while a default
    // (linearizable) read on that node goes to the leader and is answered `unavailable`.
    let mut c = Cluster::new();
    let l = setup(&mut c);
    for r in 100..110 {
        c.send(l, vec![append(r)]);
    }
    c.advance(200);
    let f = (l + 1) % 3;
    c.isolated = Some(f as NodeId + 1);
    c.send(f, vec![read(900, true)]);
    c.advance(10);
    assert_eq!(
        c.pages.get(&900),
        Some(&10),
        "the follower's own page, at once"
    );
    let before = c.unavailable;
    c.send(f, vec![read(901, false)]);
    c.advance(400);
    assert!(
        !c.pages.contains_key(&901),
        "no linearizable page without the leader"
    );
    assert!(c.unavailable > before, "answered unavailable instead");
}

#[test]
fn placement_replaces_the_leader_one_change_at_a_time_without_losing_an_append() {
    // Proves the leader's reconciler moves the group to a new target: it adds the new node as
    // a learner, promotes it once caught up, hands leadership on (it is itself leaving), and
    // the next leader removes it; appends before and after are all acknowledged, and the
    // group ends with exactly the target as voters.
    let mut c = Cluster::with_nodes(4);
    let l = setup(&mut c);
    for r in 10..40 {
        c.send(l, vec![append(r)]);
    }
    c.advance(200);
    let old = l as NodeId + 1;
    let target: BTreeSet<NodeId> = (1..=4).filter(|id| *id != old).collect();
    for n in c.nodes.iter_mut() {
        n.driver.set_members_target(target.clone());
    }
    c.advance(3_000);
    let l = c.leader().expect("a leader");
    assert!(
        target.contains(&(l as NodeId + 1)),
        "the new leader is in the target"
    );
    let raft = c.nodes[l].driver.replica().expect("a replica").raft();
    assert_eq!(raft.committed_membership().voters, target);
    assert!(raft.committed_membership().learners.is_empty());
    for r in 40..60 {
        c.send(l, vec![append(r)]);
    }
    c.advance(300);
    for r in (1..2).chain(10..60) {
        assert!(c.oks.contains(&r), "append {r} acknowledged");
    }
    let new = c.nodes[3].driver.replica().expect("node 4").applied();
    assert!(new >= c.nodes[l].driver.replica().expect("leader").applied());
}

#[test]
fn a_replaced_link_connection_makes_the_sessions_forwarded_over_it_attach_again() {
    // Proves a session forwarded to the leader is not left silent when the node link's
    // connection is replaced (frames queued on the old one, such as returned push credit or
    // deliveries, may be lost): its node tells it `LeaderChanged`, it attaches again from its
    // marks at the same leader, the leader's reply numbering starts again at 1 and is taken,
    // and deliveries go on, each pos once.
    let mut c = Cluster::new();
    let l = setup(&mut c);
    let f = (l + 1) % 3;
    let session = session_id(f as NodeId + 1, 1);
    c.send(f, vec![attach(0, 1)]);
    c.advance(200);
    c.send(l, vec![send_to_a(30)]);
    c.advance(200);
    let got = |c: &Cluster| -> Vec<u64> {
        c.delivered
            .iter()
            .filter(|x| x.0 == f)
            .map(|x| x.1)
            .collect()
    };
    assert_eq!(got(&c), vec![1]);
    let t = c.t;
    assert!(c.nodes[f]
        .driver
        .handle_node_frame(t, l as NodeId + 1, NodeFrame::LinkReset));
    c.run_effects();
    assert!(c.closed.contains(&(f, session, CloseReason::LeaderChanged)));
    let mut second = attach(1, 1);
    if let ShardOp::Attach { attempt, .. } = &mut second {
        *attempt = 2;
    }
    c.send(f, vec![second]);
    c.advance(200);
    assert_eq!(c.attached.last(), Some(&(f, None)));
    c.send(l, vec![send_to_a(31)]);
    c.advance(200);
    assert_eq!(got(&c), vec![1, 2], "the frames numbered afresh are taken");
}
