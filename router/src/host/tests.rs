//! The driver under an adapter written the way the node's and the simulator's are: effects
//! performed on an in-memory store (`MemStore`), results fed back.

use super::*;
use fabric_proto::internal::ShardOp;
use fabric_proto::{Body, ErrorCode, ServerOp};
use fabric_proto::{ConvId, MeshId, PeerId};
use fabric_shard::store::mem::MemStore;

struct Adapter {
    driver: ShardDriver,
    store: MemStore,
    t: Time,
    /// Replies per session, in order.
    replies: Vec<(SessionId, Reply)>,
    closed: Vec<(SessionId, CloseReason)>,
    /// The next write fails with this kind.
    fail_next_write: Option<StoreErrorKind>,
    /// Sessions whose replies the adapter cannot queue.
    full: Vec<SessionId>,
    /// Reads flip a bit in what they return (bit rot after start).
    rot_reads: bool,
    /// Reads held back instead of performed (performed by the test, late).
    hold_reads: bool,
    held: Vec<ReadJob>,
}

impl Adapter {
    fn new(policy: RestartPolicy) -> Adapter {
        let mut a = Adapter {
            driver: ShardDriver::new(0, ShardConfig::default(), policy, 4, 1_000),
            store: MemStore::new(0),
            t: Time {
                unix_ms: 1_000_000,
                mono_ms: 0,
            },
            replies: Vec::new(),
            closed: Vec::new(),
            fail_next_write: None,
            full: Vec::new(),
            rot_reads: false,
            hold_reads: false,
            held: Vec::new(),
        };
        a.run();
        a
    }

    /// Performs effects until none is left.
    fn run(&mut self) {
        while let Some(e) = self.driver.poll_effect() {
            match e {
                Effect::Write(w) => {
                    if let Some(kind) = self.fail_next_write.take() {
                        self.store.fail_next("sync", kind);
                    }
                    let r = w.perform(&mut self.store);
                    self.driver.handle_write_done(self.t, r);
                }
                Effect::Recover(job) => {
                    let r = job.perform(&mut self.store);
                    self.driver.handle_recovered(self.t, r);
                }
                Effect::Read(job) if self.hold_reads => self.held.push(job),
                Effect::Read(job) => {
                    let mut done = job.perform(&mut self.store);
                    if let (true, Ok(bytes)) = (self.rot_reads, &mut done.result) {
                        let last = bytes.len() - 1;
                        bytes[last] ^= 0x10;
                    }
                    self.driver.handle_read_done(self.t, done);
                }
                Effect::Replies { session, replies } => {
                    if self.full.contains(&session) {
                        self.driver.handle_reply_refused(self.t, session);
                    } else {
                        self.replies
                            .extend(replies.into_iter().map(|r| (session, r)));
                    }
                }
                Effect::Forget { .. } => {}
                Effect::CloseSession { session, why } => self.closed.push((session, why)),
                Effect::Peer(_)
                | Effect::LogRead(_)
                | Effect::Forward { .. }
                | Effect::Remote { .. }
                | Effect::RemoteClose { .. } => {
                    unreachable!("an unreplicated shard's driver has no peers")
                }
            }
        }
    }

    fn batch(&mut self, session: SessionId, ops: Vec<ShardOp>) {
        let batch = ops.into_iter().map(|op| Request { session, op }).collect();
        self.driver.handle_batch(self.t, session, batch);
        self.run();
    }

    fn advance(&mut self, ms: u64) {
        self.t.mono_ms += ms;
        self.t.unix_ms += ms;
        self.driver.handle_timeout(self.t);
        self.run();
    }

    fn codes(&self, session: SessionId) -> Vec<Option<ErrorCode>> {
        self.replies
            .iter()
            .filter(|(s, _)| *s == session)
            .map(|(_, r)| match r {
                Reply::Frame(ServerOp::Error { code, .. }) => Some(*code),
                _ => None,
            })
            .collect()
    }
}

fn append(r: u64) -> ShardOp {
    ShardOp::Append {
        r,
        mesh: MeshId::must("m"),
        conv: ConvId::must("c"),
        from: PeerId::must("a"),
        body: Body::from_json_text("\"x\"".to_string()).unwrap(),
        key: None,
    }
}

#[test]
fn a_batch_is_written_synced_and_answered_in_order() {
    // Proves the driver's loop: a batch goes into the shard, one write is asked for, and the
    // answers are routed to the session only after it completes.
    let mut a = Adapter::new(RestartPolicy::default());
    a.batch(1, (1..=5).map(append).collect());
    assert_eq!(a.codes(1), vec![None; 5]);
    assert!(a.driver.is_idle());
    assert!(a.driver.status().serving);
}

#[test]
fn a_failed_write_closes_the_sessions_answers_unavailable_then_recovers_after_the_backoff() {
    // Proves the restart policy runs in the host: the failed write's requests get
    // `unavailable`, the incarnation's sessions are closed, requests meanwhile are answered
    // `unavailable` by the stand-in, and after the backoff a recovered incarnation serves
    // again with exactly what was synced.
    let mut a = Adapter::new(RestartPolicy::default());
    a.batch(1, vec![append(1)]);
    a.fail_next_write = Some(StoreErrorKind::Io);
    a.batch(1, vec![append(2)]);
    assert_eq!(a.codes(1)[1], Some(ErrorCode::Unavailable));
    assert_eq!(a.closed, vec![(1, CloseReason::Restarted)]);
    assert!(!a.driver.status().serving);
    a.batch(2, vec![append(3)]);
    assert_eq!(
        a.codes(2),
        vec![Some(ErrorCode::Unavailable)],
        "the stand-in"
    );
    a.advance(10);
    a.batch(2, vec![append(4)]);
    assert_eq!(a.codes(2)[1], None);
    match &a.replies.last().unwrap().1 {
        Reply::Frame(ServerOp::Ok { seq, .. }) => assert_eq!(*seq, Some(2)),
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_full_disk_recovers_at_once_and_refuses_writes_until_the_backoff_passes() {
    // Proves ENOSPC is not an outage: the shard is recovered at once, writes get
    // storage_full until the backoff has passed, then they go through again.
    let mut a = Adapter::new(RestartPolicy::default());
    a.fail_next_write = Some(StoreErrorKind::NoSpace);
    a.batch(1, vec![append(1)]);
    assert_eq!(a.codes(1), vec![Some(ErrorCode::StorageFull)]);
    assert!(a.driver.status().disk_full);
    a.batch(2, vec![append(2)]);
    assert_eq!(
        a.codes(2),
        vec![Some(ErrorCode::StorageFull)],
        "refused, not unavailable"
    );
    a.advance(10);
    a.batch(2, vec![append(3)]);
    assert_eq!(a.codes(2)[1], None);
    assert!(!a.driver.status().disk_full);
}

#[test]
fn a_session_whose_replies_cannot_be_queued_is_closed_not_forgotten() {
    // Proves reply-queue overflow closes the session as overloaded (its client resumes), and
    // the planted bug that drops it silently is visible as the missing close.
    for planted in [false, true] {
        let mut a = Adapter::new(RestartPolicy::default());
        a.driver = ShardDriver::new(
            0,
            ShardConfig::default(),
            RestartPolicy::default(),
            4,
            1_000,
        )
        .with_planted(PlantedGlueBugs {
            glue_drop_reply_on_full_queue: planted,
            ..PlantedGlueBugs::default()
        });
        a.run();
        a.full.push(7);
        a.batch(7, vec![append(1)]);
        let closed = a.closed.contains(&(7, CloseReason::Overloaded));
        assert_eq!(closed, !planted, "planted={planted}");
    }
}

#[test]
fn a_batch_past_backpressure_is_taken_whole_and_the_planted_bug_loses_its_rest() {
    // Proves a batch is fed whole even when the shard stops wanting input in its middle, and
    // that the planted glue bug (checking inside the batch) loses requests.
    for planted in [false, true] {
        let config = ShardConfig {
            pending_acks_max: 2,
            ..ShardConfig::default()
        };
        let mut a = Adapter::new(RestartPolicy::default());
        a.driver = ShardDriver::new(0, config, RestartPolicy::default(), 4, 1_000).with_planted(
            PlantedGlueBugs {
                glue_batch_drops_rest_under_backpressure: planted,
                ..PlantedGlueBugs::default()
            },
        );
        a.run();
        a.batch(1, (1..=10).map(append).collect());
        let answered = a.codes(1).len();
        assert_eq!(
            answered == 10,
            !planted,
            "planted={planted}: {answered} answered"
        );
    }
}

#[test]
fn a_stalled_write_is_reported_until_it_completes() {
    // Proves the stall watchdog: a write in flight past wal_sync_stall_ms_max marks the shard
    // stalled; its completion clears it.
    let mut a = Adapter::new(RestartPolicy::default());
    let batch = vec![Request {
        session: 1,
        op: append(1),
    }];
    a.driver.handle_batch(a.t, 1, batch);
    let Some(Effect::Write(w)) = a.driver.poll_effect() else {
        panic!("a write");
    };
    assert_eq!(a.driver.poll_timeout(), Some(1_000));
    a.t.mono_ms = 1_000;
    a.driver.handle_timeout(a.t);
    assert!(a.driver.status().wal_stalled);
    let r = w.perform(&mut a.store);
    a.driver.handle_write_done(a.t, r);
    assert!(!a.driver.status().wal_stalled);
}

#[test]
fn a_crash_with_a_write_in_flight_ends_the_incarnation_and_ignores_its_late_completion() {
    // Proves handle_crash: the sessions are told, the restart policy's backoff applies, the
    // ended incarnation's write finishing later is ignored (not a second failure), and the next
    // incarnation recovers what that write made durable.
    let mut a = Adapter::new(RestartPolicy::default());
    a.driver.handle_batch(
        a.t,
        1,
        vec![Request {
            session: 1,
            op: append(1),
        }],
    );
    let Some(Effect::Write(w)) = a.driver.poll_effect() else {
        panic!("a write");
    };
    a.driver.handle_crash(a.t, "crash drill");
    a.run();
    assert_eq!(a.closed, vec![(1, CloseReason::Restarted)]);
    assert!(!a.driver.status().serving);
    let r = w.perform(&mut a.store);
    a.driver.handle_write_done(a.t, r);
    let wait = a.driver.poll_timeout().expect("a restart is scheduled");
    a.advance(wait);
    assert!(a.driver.status().serving);
    assert_eq!(a.driver.shard().map(|s| s.durable_lsn()), Some(1));
}

#[test]
fn the_planted_glue_no_dir_fsync_reaches_the_write_job_only_when_planted() {
    // Proves the glue bug lives in the host's write job: with it planted a segment-creating
    // write skips the directory fsync; without it the job keeps the shard's own steps.
    for planted in [false, true] {
        let bugs = PlantedGlueBugs {
            glue_no_dir_fsync_on_segment_create: planted,
            ..Default::default()
        };
        let mut d = ShardDriver::new(
            0,
            ShardConfig::default(),
            RestartPolicy::default(),
            4,
            1_000,
        )
        .with_planted(bugs);
        let mut store = MemStore::new(0);
        let Some(Effect::Recover(job)) = d.poll_effect() else {
            panic!("a recovery first");
        };
        let t = Time {
            unix_ms: 1,
            mono_ms: 1,
        };
        d.handle_recovered(t, job.perform(&mut store));
        d.handle_batch(
            t,
            1,
            vec![Request {
                session: 1,
                op: append(1),
            }],
        );
        let Some(Effect::Write(w)) = d.poll_effect() else {
            panic!("a write");
        };
        assert!(w.write.create, "the first write creates a segment");
        assert_eq!(w.steps.no_dir_fsync_on_segment_create, planted);
    }
}

/// A shard that keeps nothing in its log cache, with `count` appends to "c" durable.
fn disk_only_adapter(count: u64) -> Adapter {
    let mut a = Adapter::new(RestartPolicy::default());
    a.driver = ShardDriver::new(
        0,
        ShardConfig {
            log_cache_bytes_max: 0,
            ..ShardConfig::default()
        },
        RestartPolicy::default(),
        4,
        1_000,
    );
    a.run();
    a.batch(1, (1..=count).map(append).collect());
    a
}

fn read_c(r: u64) -> ShardOp {
    ShardOp::Read {
        r,
        mesh: MeshId::must("m"),
        conv: ConvId::must("c"),
        from: 1,
        limit: 100,
        local: false,
    }
}

#[test]
fn a_read_older_than_the_cache_goes_through_the_adapter_and_is_answered() {
    // Proves the host hands the shard's disk reads to its adapter as effects and feeds their
    // bytes back: a read of entries no longer in memory is answered with all of them.
    let mut a = disk_only_adapter(20);
    a.batch(2, vec![read_c(7)]);
    match &a.replies.last().unwrap() {
        (2, Reply::Messages { events, head, .. }) => assert_eq!((events.len(), *head), (20, 20)),
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_read_that_never_verifies_ends_the_incarnation_and_recovery_serves_again() {
    // Proves bit rot seen by a read fails the incarnation (its sessions closed, the status
    // naming the read), and the restart policy recovers it from disk, whose bytes are intact
    // here, so the same read is then answered.
    let mut a = disk_only_adapter(20);
    a.rot_reads = true;
    a.batch(2, vec![read_c(7)]);
    assert!(
        a.closed.contains(&(2, CloseReason::Restarted)),
        "{:?}",
        a.closed
    );
    assert!(!a.driver.status().serving);
    let why = a.driver.status().last_error.clone().unwrap_or_default();
    assert!(why.contains("reading the WAL failed"), "{why}");
    a.rot_reads = false;
    a.advance(10);
    a.batch(3, vec![read_c(8)]);
    match &a.replies.last().unwrap() {
        (3, Reply::Messages { events, .. }) => assert_eq!(events.len(), 20),
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_read_finishing_after_its_incarnation_ended_is_ignored() {
    // Proves a read handed out by an ended incarnation cannot feed the next one: its
    // completion carries the old incarnation and is dropped.
    let mut a = disk_only_adapter(20);
    a.hold_reads = true;
    a.batch(2, vec![read_c(7)]);
    let late = a.held.pop().expect("a read was asked for");
    a.driver.handle_crash(a.t, "drill");
    a.run();
    a.advance(10);
    let before = a.replies.len();
    let done = late.perform(&mut a.store);
    a.driver.handle_read_done(a.t, done);
    a.run();
    assert_eq!(
        a.replies.len(),
        before,
        "nothing answered from the old read"
    );
    assert!(a.driver.status().serving);
}

#[test]
fn a_subscription_behind_the_cache_is_fed_by_reads_the_drain_asks_for() {
    // Proves reads a drain asks for (while the driver routes outputs) leave as effects in the
    // same pump: a subscription from seq 1 over entries only on disk gets every one of them
    // without anything else happening.
    let mut a = disk_only_adapter(20);
    a.batch(
        2,
        vec![ShardOp::Subscribe {
            r: 1,
            mesh: MeshId::must("m"),
            conv: ConvId::must("c"),
            from: 1,
        }],
    );
    let seqs: Vec<u64> = a
        .replies
        .iter()
        .filter_map(|(s, r)| match r {
            Reply::Frame(ServerOp::Event(e)) if *s == 2 => Some(e.seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
}
