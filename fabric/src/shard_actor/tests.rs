//! The adapter's own duties: notices that must not be lost, and a full reply channel handed
//! to the driver (which closes the session) instead of dropped.

use super::*;
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
