//! The adapter's own duties: notices that must not be lost, and a full reply channel handed
//! to the driver (which closes the session) instead of dropped.

use super::*;
use fabric_proto::internal::{Request, ShardOp};
use fabric_proto::ServerOp;

fn pong() -> Reply {
    Reply::Frame(ServerOp::Pong { r: 1 })
}

async fn next(rx: &mut mpsc::Receiver<SessionMsg>) -> SessionMsg {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a message in time")
        .expect("the channel is open")
}

fn slot() -> Arc<ShardSlot> {
    let metrics = Arc::new(Metrics::new(false, 1, &[]).expect("metrics"));
    ShardSlot::new(SlotSettings {
        idx: 0,
        dir: PathBuf::from("/nonexistent"),
        config: ShardConfig::default(),
        durability: Durability::Fsync,
        queue_batches_max: 4,
        node: "n".into(),
        metrics,
        policy: RestartPolicy::default(),
        wal_sync_stall_ms_max: 1_000,
        replication: None,
    })
    .0
}

#[tokio::test]
async fn a_restart_notice_reaches_a_session_whose_channel_is_full() {
    // Proves the driver's CloseSession(Restarted) is never lost by the adapter: a crash drill
    // ends the incarnation a session sent a batch to, and with that session's channel full
    // (try_send fails) the notice still arrives once the session takes the message ahead.
    let slot = slot();
    let mut driver = slot.driver();
    let mut io = HostIo::new(slot.clone());
    let t = SystemClock.time();
    let Some(Effect::Recover(job)) = driver.poll_effect() else {
        panic!("a recovery first");
    };
    let mut store = fabric_shard::store::mem::MemStore::new(0);
    driver.handle_recovered(t, job.perform(&mut store));
    driver.handle_batch(t, 7, Vec::new());
    io.perform_effects(&mut driver);
    let (tx, mut rx) = mpsc::channel(1);
    tx.try_send(SessionMsg::Replies(0, vec![pong()])).unwrap();
    io.sinks.insert(7, tx);
    driver.handle_crash(t, "crash drill");
    io.perform_effects(&mut driver);
    assert!(!io.sinks.contains_key(&7), "the sink is forgotten");
    assert!(matches!(next(&mut rx).await, SessionMsg::Replies(0, _)));
    assert!(matches!(next(&mut rx).await, SessionMsg::ShardRestarted(0)));
}

#[tokio::test]
async fn replies_that_do_not_fit_close_the_session_instead_of_vanishing() {
    // Proves deliver() with a full session channel hands the session to the driver, which
    // closes it (Overloaded, after what was queued) instead of dropping its replies in
    // silence; another session is served as usual.
    let slot = slot();
    let mut driver = slot.driver();
    let mut io = HostIo::new(slot);
    assert!(matches!(driver.poll_effect(), Some(Effect::Recover(_))));
    let (full_tx, mut full_rx) = mpsc::channel(1);
    full_tx
        .try_send(SessionMsg::Replies(0, vec![pong()]))
        .unwrap();
    let (ok_tx, mut ok_rx) = mpsc::channel(8);
    io.sinks.insert(1, full_tx);
    io.sinks.insert(2, ok_tx);
    io.deliver(&mut driver, 1, vec![pong()]);
    io.deliver(&mut driver, 2, vec![pong()]);
    io.perform_effects(&mut driver);
    assert!(!io.sinks.contains_key(&1) && io.sinks.contains_key(&2));
    assert!(matches!(next(&mut ok_rx).await, SessionMsg::Replies(0, _)));
    assert!(matches!(
        next(&mut full_rx).await,
        SessionMsg::Replies(0, _)
    ));
    assert!(matches!(
        next(&mut full_rx).await,
        SessionMsg::Overloaded(0)
    ));
}

/// The node link, in process: frames go straight into the other slots' inbound channels.
struct Wire {
    inbound: Mutex<std::collections::BTreeMap<NodeId, mpsc::Sender<(NodeId, NodeFrame)>>>,
    from: NodeId,
}

impl NodeSender for Wire {
    fn send(&self, to: NodeId, _shard: ShardIdx, frame: NodeFrame) -> bool {
        let tx = self.inbound.lock().ok().and_then(|m| m.get(&to).cloned());
        tx.is_some_and(|tx| tx.try_send((self.from, frame)).is_ok())
    }
}

/// Three replicas of shard 0, each its own host over its own directory, joined by wires.
async fn replicated_slots(
    tmp: &tempfile::TempDir,
) -> (
    Vec<Arc<ShardSlot>>,
    Vec<mpsc::Sender<ShardMsg>>,
    Vec<ActorRef<SupervisorMsg>>,
) {
    let voters: std::collections::BTreeSet<NodeId> = [1, 2, 3].into();
    let metrics = Arc::new(Metrics::new(false, 1, &[]).expect("metrics"));
    let wires: Vec<Arc<Wire>> = (1..=3)
        .map(|id| {
            Arc::new(Wire {
                inbound: Mutex::new(Default::default()),
                from: id,
            })
        })
        .collect();
    let (mut slots, mut senders, mut inbound) = (Vec::new(), Vec::new(), Vec::new());
    for id in 1..=3u64 {
        let dir = tmp.path().join(format!("node-{id}"));
        crate::storage::init_shard_dirs(&dir, 1).expect("init");
        let config = fabric_shard::replica::ReplicaConfig {
            node: id,
            voters: voters.clone(),
            raft: fabric_shard::raft::RaftConfig::default(),
            planted: Default::default(),
        };
        let sender: Arc<dyn NodeSender> = wires[id as usize - 1].clone();
        let (replication, tx_in) = SlotReplication::new(config, sender);
        inbound.push((id, tx_in));
        let (slot, tx) = ShardSlot::new(SlotSettings {
            idx: 0,
            dir: crate::storage::shard_dir(&dir, 0),
            config: ShardConfig::default(),
            durability: Durability::Fsync,
            queue_batches_max: 16,
            node: format!("n{id}").into(),
            metrics: metrics.clone(),
            policy: RestartPolicy::default(),
            wal_sync_stall_ms_max: 10_000,
            replication: Some(replication),
        });
        slots.push(slot);
        senders.push(tx);
    }
    for w in &wires {
        let mut m = w.inbound.lock().expect("lock");
        for (id, tx) in &inbound {
            m.insert(*id, tx.clone());
        }
    }
    let mut supervisors = Vec::new();
    for (slot, tx) in slots.iter().zip(&senders) {
        let args = SupervisorArgs {
            slots: vec![slot.clone()],
            senders: vec![tx.clone()],
        };
        let (sup, _) = Actor::spawn(None, NodeSupervisor, args)
            .await
            .expect("spawn");
        slot.wait_recovered().await.expect("recovered");
        supervisors.push(sup);
    }
    (slots, senders, supervisors)
}

fn status(slot: &ShardSlot) -> Option<ReplicaStatus> {
    slot.stats.lock().ok().and_then(|s| s.replica.clone())
}

#[tokio::test]
async fn three_replicated_hosts_elect_and_answer_through_any_node() {
    // Proves the node's shard host runs a replica over real files: three hosts elect a leader
    // over an in-process wire, a batch sent to a follower's host is forwarded to the leader,
    // committed on a quorum and answered back through the follower's host, and every replica
    // applies it.
    let tmp = tempfile::tempdir().expect("tmp");
    let (slots, senders, sups) = replicated_slots(&tmp).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let leader = loop {
        let leading = slots
            .iter()
            .position(|s| status(s).is_some_and(|r| r.leading));
        if let Some(l) = leading {
            break l;
        }
        assert!(Instant::now() < deadline, "a leader within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let follower = (leader + 1) % 3;
    let session = fabric_router::host::session_id(follower as u64 + 1, 1);
    let (tx, mut rx) = mpsc::channel(16);
    let ops = vec![ShardOp::CreateMesh {
        r: 1,
        mesh: fabric_proto::MeshId::must("m"),
    }];
    let requests = ops.into_iter().map(|op| Request { session, op }).collect();
    senders[follower]
        .send(ShardMsg::Batch {
            session,
            tx,
            requests,
        })
        .await
        .expect("sent");
    let msg = next(&mut rx).await;
    assert!(
        matches!(&msg, SessionMsg::Replies(0, r) if matches!(r[0], Reply::Frame(ServerOp::Ok { r: 1, .. }))),
        "{msg:?}"
    );
    let applied = |s: &ShardSlot| status(s).map_or(0, |r| r.applied);
    let target = applied(&slots[leader]);
    while slots.iter().any(|s| applied(s) < target) {
        assert!(
            Instant::now() < deadline,
            "every replica applies the commit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for sup in sups {
        let (tx, rx) = oneshot::channel();
        let _ = sup.cast(SupervisorMsg::Stop(tx));
        let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
    }
}

#[tokio::test]
async fn a_stopping_leader_hands_its_leadership_over_before_it_stops() {
    // Proves graceful shutdown transfers leadership: stopping the leading replica's host makes
    // another replica lead well within one election timeout (1 s at the defaults; without a
    // transfer the followers would wait at least that long before campaigning).
    let tmp = tempfile::tempdir().expect("tmp");
    let (slots, _senders, sups) = replicated_slots(&tmp).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let leader = loop {
        if let Some(l) = slots
            .iter()
            .position(|s| status(s).is_some_and(|r| r.leading))
        {
            break l;
        }
        assert!(Instant::now() < deadline, "a leader within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stopped = Instant::now();
    let (tx, rx) = oneshot::channel();
    sups[leader].cast(SupervisorMsg::Stop(tx)).expect("stop");
    let new_leader = loop {
        let other = (0..3)
            .filter(|i| *i != leader)
            .find(|i| status(&slots[*i]).is_some_and(|r| r.leading && r.term > 1));
        if let Some(n) = other {
            break n;
        }
        assert!(
            stopped.elapsed() < Duration::from_millis(900),
            "a new leader within 900 ms of the stop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_ne!(new_leader, leader);
    let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
    for (i, sup) in sups.into_iter().enumerate() {
        if i != leader {
            let (tx, rx) = oneshot::channel();
            let _ = sup.cast(SupervisorMsg::Stop(tx));
            let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
        }
    }
}
