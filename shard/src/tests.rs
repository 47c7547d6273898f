//! Shard core tests, driven by the in-memory store (`store::mem::MemStore`) through the same
//! file steps every host performs (`store::perform`, `store::recover`), so recovery runs over
//! real segment bytes.

use super::*;
use crate::record::{MeshRec, Record};
use crate::store::mem::MemStore;
use crate::store::SegmentStore;
use crate::store::StoreErrorKind;
use fabric_proto::internal::{Output, Reply, Request, ShardOp};
use fabric_proto::GroupId;
use fabric_proto::{Body, Target};
use fabric_proto::{ConvId, MeshId, PeerId};

struct Node {
    shard: Shard,
    disk: MemStore,
    now: u64,
}

impl Node {
    fn new(config: ShardConfig) -> Node {
        Node {
            disk: MemStore::new(config.shard),
            shard: Shard::new(config),
            now: 1_000,
        }
    }

    fn req(&mut self, session: SessionId, op: ShardOp) {
        self.shard.handle_request(self.now, Request { session, op });
    }

    /// Performs one write as a host does.
    fn write(&mut self, w: &WalWrite) {
        store::perform(&mut self.disk, w, &PlantedBugs::default()).expect("the write lands");
    }

    /// Runs WAL writes to completion and returns every output.
    fn pump(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        loop {
            while let Some(o) = self.shard.poll_output() {
                out.push(o);
            }
            if let Some(rq) = self.shard.poll_reads() {
                let got = self.disk.read_at(rq.segment, rq.offset, rq.len);
                self.shard.handle_read_done(self.now, rq.id, got);
                continue;
            }
            match self.shard.poll_wal() {
                Some(w) => {
                    self.write(&w);
                    self.now += 1;
                    self.shard.handle_wal_done(self.now, w.last_lsn);
                    // As the glue does; scribbled over first, so that a recycled buffer whose
                    // old bytes leaked into the next write would show up as a corrupt WAL.
                    let mut buffer = w.bytes;
                    buffer.fill(0xEE);
                    self.shard.recycle_wal_buffer(buffer);
                }
                None => break,
            }
        }
        out
    }

    fn recover(&self, config: ShardConfig) -> Result<(Shard, RecoveryReport), RecoverError> {
        store::recover(&mut self.disk.clone(), config)
    }

    fn restart(&mut self) -> RecoveryReport {
        let (shard, report) =
            store::recover(&mut self.disk, self.shard.config.clone()).expect("recovers");
        self.shard = shard;
        report
    }

    fn last_segment(&self) -> u64 {
        *self.disk.segments().keys().last().expect("a segment")
    }

    fn setup_mesh(&mut self, peers: &[(&str, &[&str])]) {
        self.req(
            0,
            ShardOp::CreateMesh {
                r: 1,
                mesh: MeshId::must("m"),
            },
        );
        for (p, groups) in peers {
            self.req(
                0,
                ShardOp::AddPeer {
                    r: 2,
                    mesh: MeshId::must("m"),
                    peer: PeerId::must(p),
                    groups: groups.iter().map(|g| GroupId::must(g)).collect(),
                    token_hash: Some(token_hash(&format!("tok-{p}"))),
                    public_key: None,
                },
            );
        }
        self.pump();
    }

    fn hello(&mut self, session: SessionId, peer: &str) -> Vec<Output> {
        self.req(
            session,
            ShardOp::Hello {
                mesh: MeshId::must("m"),
                peer: PeerId::must(peer),
                token: format!("tok-{peer}"),
                proof: None,
            },
        );
        self.pump()
    }

    fn send(&mut self, session: SessionId, r: u64, from: &str, to: &str, body: &str) {
        self.send_keyed(session, r, from, to, body, None);
    }

    fn send_keyed(
        &mut self,
        session: SessionId,
        r: u64,
        from: &str,
        to: &str,
        body: &str,
        key: Option<&str>,
    ) {
        self.req(
            session,
            ShardOp::Send {
                r,
                mesh: MeshId::must("m"),
                from: PeerId::must(from),
                to: Target::parse(to).unwrap(),
                body: Body::from_json_text(body.to_string()).unwrap(),
                key: key.map(Into::into),
            },
        );
    }

    fn append(&mut self, session: SessionId, r: u64, conv: &str, body: &str, key: Option<&str>) {
        self.req(
            session,
            ShardOp::Append {
                r,
                mesh: MeshId::must("m"),
                conv: ConvId::must(conv),
                from: PeerId::must("a"),
                body: Body::from_json_text(body.to_string()).unwrap(),
                key: key.map(Arc::from),
            },
        );
    }
}

fn deliveries(out: &[Output], session: SessionId) -> Vec<u64> {
    out.iter()
        .filter(|o| o.session == session)
        .filter_map(|o| match &o.reply {
            Reply::Frame(ServerOp::Deliver { pos, .. }) => Some(*pos),
            _ => None,
        })
        .collect()
}

fn events(out: &[Output], session: SessionId) -> Vec<u64> {
    out.iter()
        .filter(|o| o.session == session)
        .filter_map(|o| match &o.reply {
            Reply::Frame(ServerOp::Event(e)) => Some(e.seq),
            _ => None,
        })
        .collect()
}

fn oks(out: &[Output]) -> Vec<(u64, Option<u64>, Option<u64>)> {
    out.iter()
        .filter_map(|o| match &o.reply {
            Reply::Frame(ServerOp::Ok { r, pos, seq }) => Some((*r, *pos, *seq)),
            _ => None,
        })
        .collect()
}

fn error_code(out: &[Output]) -> Option<ErrorCode> {
    out.iter().find_map(|o| match &o.reply {
        Reply::Frame(ServerOp::Error { code, .. }) => Some(*code),
        _ => None,
    })
}

#[test]
fn acks_wait_for_the_wal_and_share_one_group_commit() {
    // Proves no Ok leaves before its WAL write completes and many writes share one write+sync.
    let mut n = Node::new(ShardConfig::default());
    n.setup_mesh(&[("a", &[]), ("b", &[])]);
    for i in 0..50 {
        n.send(1, i, "a", "b", "{\"n\":1}");
        n.append(1, 100 + i, "c", "1", None);
    }
    assert!(
        n.shard.poll_output().is_none(),
        "nothing acknowledged before the write"
    );
    let w = n.shard.poll_wal().expect("one batch");
    assert_eq!(w.records, 100);
    assert!(
        n.shard.poll_wal().is_none(),
        "one write in flight at a time"
    );
    assert!(
        n.shard.poll_output().is_none(),
        "nothing acknowledged before fsync returns"
    );
    n.write(&w);
    n.shard.handle_wal_done(n.now, w.last_lsn);
    let out = n.pump();
    let oks = oks(&out);
    assert_eq!(oks.len(), 100);
    let seqs: Vec<u64> = oks.iter().filter_map(|o| o.2).collect();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>(), "dense seqs from 1");
    let poss: Vec<u64> = oks.iter().filter_map(|o| o.1).collect();
    assert_eq!(poss, (1..=50).collect::<Vec<_>>());
}

#[test]
fn direct_group_and_broadcast_reach_exactly_their_recipients() {
    // Proves target resolution: a peer, a group (members only) and * (everyone but the sender).
    let mut n = Node::new(ShardConfig::default());
    n.setup_mesh(&[("a", &["ops"]), ("b", &["ops"]), ("c", &[])]);
    n.hello(1, "a");
    n.hello(2, "b");
    n.hello(3, "c");
    n.send(1, 1, "a", "b", "1");
    n.send(1, 2, "a", "group:ops", "2");
    n.send(1, 3, "a", "*", "3");
    let out = n.pump();
    assert_eq!(
        deliveries(&out, 1),
        vec![2],
        "a is in ops; * skips the sender"
    );
    assert_eq!(deliveries(&out, 2), vec![1, 2, 3]);
    assert_eq!(deliveries(&out, 3), vec![3]);
}

#[test]
fn unacknowledged_messages_are_redelivered_on_reconnect_and_survive_restart() {
    // Proves at-least-once: a reconnect gets what was not acked, across a restart too.
    let mut n = Node::new(ShardConfig::default());
    n.setup_mesh(&[("a", &[]), ("b", &[])]);
    for i in 0..5 {
        n.send(1, i, "a", "b", "{}");
    }
    n.pump();
    let out = n.hello(2, "b");
    assert_eq!(deliveries(&out, 2), vec![1, 2, 3, 4, 5], "offline backlog");
    n.req(
        2,
        ShardOp::Ack {
            mesh: MeshId::must("m"),
            peer: PeerId::must("b"),
            upto: 3,
        },
    );
    n.req(2, ShardOp::Closed);
    n.pump();
    n.restart();
    let out = n.hello(3, "b");
    match &out[0].reply {
        Reply::Frame(ServerOp::Welcome { acked, head, .. }) => {
            assert_eq!((*acked, *head), (3, 5));
        }
        r => panic!("expected welcome, got {r:?}"),
    }
    assert_eq!(deliveries(&out, 3), vec![4, 5]);
}

#[test]
fn idempotency_keys_return_the_original_seq() {
    // Proves a retried append with the same key writes nothing and answers the first seq.
    let mut n = Node::new(ShardConfig::default());
    n.append(1, 1, "c", "1", Some("k"));
    n.append(1, 2, "c", "1", Some("k")); // retried before the first is durable
    let out = n.pump();
    assert_eq!(oks(&out), vec![(1, None, Some(1)), (2, None, Some(1))]);
    n.append(1, 3, "c", "2", None);
    n.append(1, 4, "c", "1", Some("k"));
    let out = n.pump();
    assert_eq!(oks(&out), vec![(4, None, Some(1)), (3, None, Some(2))]);
    n.restart();
    n.append(1, 5, "c", "1", Some("k"));
    assert_eq!(
        oks(&n.pump()),
        vec![(5, None, Some(1))],
        "keys survive restart"
    );
}

#[test]
fn subscribe_replays_then_tails_without_gaps_or_duplicates() {
    // Proves subscribe from a seq yields every later event exactly once, old and new.
    let mut n = Node::new(ShardConfig::default());
    for i in 0..10 {
        n.append(1, i, "c", "1", None);
    }
    n.pump();
    n.req(
        2,
        ShardOp::Subscribe {
            r: 1,
            mesh: MeshId::must("m"),
            conv: ConvId::must("c"),
            from: 4,
        },
    );
    for i in 0..5 {
        n.append(1, 100 + i, "c", "1", None);
    }
    let out = n.pump();
    assert_eq!(events(&out, 2), (4..=15).collect::<Vec<_>>());
    let first_ok = out.iter().position(|o| o.session == 2).unwrap();
    assert!(matches!(
        out[first_ok].reply,
        Reply::Frame(ServerOp::Ok { r: 1, .. })
    ));
}

#[test]
fn pushes_stop_at_credit_and_resume_when_flushed() {
    // Proves a session never gets more than its credit of unflushed pushes.
    let config = ShardConfig {
        push_credit_frames_max: 4,
        ..ShardConfig::default()
    };
    let mut n = Node::new(config);
    n.setup_mesh(&[("a", &[]), ("b", &[])]);
    for i in 0..10 {
        n.send(1, i, "a", "b", "1");
    }
    n.pump();
    let out = n.hello(2, "b");
    assert_eq!(deliveries(&out, 2), vec![1, 2, 3, 4]);
    n.req(2, ShardOp::Flushed { frames: 4 });
    assert_eq!(deliveries(&n.pump(), 2), vec![5, 6, 7, 8]);
    n.req(2, ShardOp::Flushed { frames: 4 });
    assert_eq!(deliveries(&n.pump(), 2), vec![9, 10]);
}

#[test]
fn bad_requests_get_stable_codes() {
    // Proves each refused request yields its documented code and changes nothing.
    let mut n = Node::new(ShardConfig::default());
    n.setup_mesh(&[("a", &[])]);
    n.req(
        1,
        ShardOp::CreateMesh {
            r: 1,
            mesh: MeshId::must("m"),
        },
    );
    assert_eq!(error_code(&n.pump()), Some(ErrorCode::Conflict));
    n.send(1, 1, "a", "nobody", "1");
    assert_eq!(error_code(&n.pump()), Some(ErrorCode::NotFound));
    n.req(
        1,
        ShardOp::Hello {
            mesh: MeshId::must("m"),
            peer: PeerId::must("a"),
            token: "wrong".into(),
            proof: None,
        },
    );
    assert_eq!(error_code(&n.pump()), Some(ErrorCode::Unauthorized));
    n.req(
        1,
        ShardOp::Hello {
            mesh: MeshId::must("other"),
            peer: PeerId::must("a"),
            token: "tok-a".into(),
            proof: None,
        },
    );
    assert_eq!(error_code(&n.pump()), Some(ErrorCode::Unauthorized));
    n.req(
        1,
        ShardOp::AddPeer {
            r: 1,
            mesh: MeshId::must("nope"),
            peer: PeerId::must("x"),
            groups: vec![],
            token_hash: Some([0; 32]),
            public_key: None,
        },
    );
    assert_eq!(error_code(&n.pump()), Some(ErrorCode::NotFound));
    n.req(
        1,
        ShardOp::Auth {
            r: 1,
            mesh: MeshId::must("m"),
            token: "tok-a".into(),
            local: false,
        },
    );
    assert!(n
        .pump()
        .iter()
        .any(|o| matches!(&o.reply, Reply::Authed { peer, .. } if &**peer == "a")));
}

#[test]
fn recovery_rebuilds_heads_cursors_and_keys() {
    // Proves a restart from the WAL bytes restores everything acknowledged.
    let mut n = Node::new(ShardConfig {
        wal_segment_bytes_max: 2_000,
        ..ShardConfig::default()
    });
    n.setup_mesh(&[("a", &[]), ("b", &[])]);
    for i in 0..200 {
        n.send(1, i, "a", "b", "{\"x\":\"yyyyyyyyyyyyyyyy\"}");
        n.append(1, i, "c", "2", Some(&format!("k{i}")));
        n.pump();
    }
    assert!(n.disk.segments().len() > 3, "segments rotated");
    let report = n.restart();
    assert_eq!(report.cut, None);
    assert_eq!(report.records, 3 + 400);
    n.send(1, 1, "a", "b", "1");
    n.append(1, 2, "c", "1", Some("k7"));
    n.append(1, 3, "c", "1", None);
    let out = n.pump();
    assert_eq!(
        oks(&out),
        vec![
            (2, None, Some(8)),
            (1, Some(201), None),
            (3, None, Some(201))
        ]
    );
}

#[test]
fn a_torn_final_write_is_cut_to_quarantine_and_earlier_corruption_refuses_to_start() {
    // Proves recovery cuts a torn final write of the newest segment (keeping its bytes in
    // quarantine) but names file and offset for damage anywhere else.
    let mut n = Node::new(ShardConfig {
        wal_segment_bytes_max: 1_000,
        ..ShardConfig::default()
    });
    n.setup_mesh(&[("a", &[]), ("b", &[])]);
    for i in 0..60 {
        n.append(1, i, "c", "\"some body\"", None);
        n.pump();
    }
    let last = n.last_segment();
    let seg = n.disk.segment_mut(last).unwrap();
    let len = seg.len();
    seg.truncate(len - 3);
    let report = n.restart();
    let cut = report.cut.expect("the torn write is cut");
    assert_eq!(cut.segment, last);
    assert_eq!(report.quarantined.len(), 1);
    assert_eq!(
        n.disk.quarantined()[&report.quarantined[0]].len() as u64,
        cut.bytes
    );
    n.append(1, 99, "c", "1", None);
    assert_eq!(
        oks(&n.pump()),
        vec![(99, None, Some(60))],
        "the torn append is gone"
    );

    let first = *n.disk.segments().keys().next().unwrap();
    n.disk.segment_mut(first).unwrap()[wal::SEGMENT_HEADER_BYTES + 30] ^= 0xff;
    match n.recover(ShardConfig::default()) {
        Err(RecoverError::Corrupt { file, .. }) => assert_eq!(file, wal::segment_file_name(first)),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("corruption went unnoticed"),
    }
}

/// Twenty acknowledged appends, one per write, in one segment; the offset where each write
/// (frame) starts.
fn twenty_acknowledged_appends() -> (Node, Vec<usize>) {
    let mut n = Node::new(ShardConfig::default());
    let mut starts = Vec::new();
    for i in 1..=20 {
        starts.push(
            n.disk
                .segments()
                .get(&1)
                .map_or(wal::SEGMENT_HEADER_BYTES, |b| b.len()),
        );
        n.append(1, i, "c", "\"an acknowledged entry\"", None);
        assert_eq!(oks(&n.pump()), vec![(i, None, Some(i))]);
    }
    (n, starts)
}

#[test]
fn one_flipped_byte_in_an_acknowledged_record_of_the_newest_segment_refuses_to_start() {
    // Proves the audit's case: a flip inside record 4 of 20 acknowledged appends in the newest
    // segment is refused (naming file and offset), not cut as a torn tail.
    let (mut n, starts) = twenty_acknowledged_appends();
    assert_eq!(n.disk.segments().len(), 1, "one segment: the newest");
    n.disk.segment_mut(1).unwrap()[starts[3] + wal::FRAME_HEADER_BYTES + 20] ^= 0x01;
    match n.recover(ShardConfig::default()) {
        Err(RecoverError::Corrupt {
            file,
            offset,
            reason,
        }) => {
            assert_eq!(file, wal::segment_file_name(1));
            assert_eq!(offset as usize, starts[3], "the damaged write's offset");
            assert!(reason.contains("follows"), "{reason}");
        }
        Err(e) => panic!("wrong error {e}"),
        Ok((_, report)) => panic!("acknowledged records were cut: {report:?}"),
    }
}

#[test]
fn damage_in_the_final_write_is_cut_even_with_valid_records_after_the_hole() {
    // Proves a power loss that kept later pages of the final write but not an earlier one (a
    // hole, then valid records) is cut whole: nothing in the final write was acknowledged.
    let mut n = Node::new(ShardConfig::default());
    n.append(1, 1, "c", "\"kept\"", None);
    n.pump();
    for r in 2..=6 {
        n.append(1, r, "c", "\"in the final write\"", None);
    }
    let w = n.shard.poll_wal().expect("the final write");
    assert_eq!(w.records, 5);
    n.write(&w);
    let start = w.offset as usize;
    // The second record's bytes never reached the disk: a hole of zeros inside the write.
    let hole = start + wal::FRAME_HEADER_BYTES + 40;
    n.disk.segment_mut(1).unwrap()[hole..hole + 30].fill(0);
    let (mut shard, report) = n.recover(ShardConfig::default()).expect("recovers");
    assert_eq!(report.cut.map(|c| c.offset as usize), Some(start));
    let mut out = Vec::new();
    shard.handle_request(
        n.now,
        Request {
            session: 9,
            op: ShardOp::Read {
                r: 0,
                mesh: MeshId::must("m"),
                conv: ConvId::must("c"),
                from: 1,
                limit: 100,
                local: false,
            },
        },
    );
    while let Some(o) = shard.poll_output() {
        out.push(o);
    }
    match &out[0].reply {
        Reply::Messages { events, head, .. } => assert_eq!((events.len(), *head), (1, 1)),
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_damaged_tail_longer_than_one_write_refuses_to_start() {
    // Proves damage followed by more bytes than one write can hold is not taken for the final
    // write, even when no intact frame header follows it.
    let (mut n, starts) = twenty_acknowledged_appends();
    let seg = n.disk.segment_mut(1).unwrap();
    // Destroy every frame header from the fifth write on (no intact write is visible after
    // the damage), then make the tail longer than one write can be.
    for s in &starts[4..] {
        seg[*s] ^= 0xff;
    }
    let config = ShardConfig {
        wal_batch_bytes_max: 16,
        ..ShardConfig::default()
    };
    let limit = config.wal_batch_bytes_max + wal::RECORD_BYTES_MAX + wal::FRAME_HEADER_BYTES;
    seg.resize(starts[4] + limit + 1, 7);
    match n.recover(config) {
        Err(RecoverError::Corrupt { offset, reason, .. }) => {
            assert_eq!(offset as usize, starts[4]);
            assert!(reason.contains("more than one write"), "{reason}");
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("a tail longer than one write was cut"),
    }
}

#[test]
fn planted_cut_any_damage_in_newest_segment_loses_acknowledged_records() {
    // Proves the planted bug (the old rule) really cuts acknowledged records, so the
    // simulator's checkers have something to catch.
    let (mut n, starts) = twenty_acknowledged_appends();
    n.disk.segment_mut(1).unwrap()[starts[3] + wal::FRAME_HEADER_BYTES + 20] ^= 0x01;
    let config = ShardConfig {
        planted: PlantedBugs {
            cut_any_damage_in_newest_segment: true,
            ..PlantedBugs::default()
        },
        ..ShardConfig::default()
    };
    let (_, report) = n.recover(config).expect("the planted bug cuts");
    assert_eq!(report.cut.map(|c| c.offset as usize), Some(starts[3]));
}

#[test]
fn missing_segments_an_emptied_directory_and_a_lost_manifest_refuse_to_start() {
    // Proves the manifest catches a missing newest, oldest or middle segment and an emptied
    // shard directory, instead of starting with data missing.
    let mut n = Node::new(ShardConfig {
        wal_segment_bytes_max: 600,
        ..ShardConfig::default()
    });
    for i in 0..40 {
        n.append(1, i, "c", "\"fill the segments up\"", None);
        n.pump();
    }
    let ids: Vec<u64> = n.disk.segments().keys().copied().collect();
    assert!(ids.len() >= 3, "{ids:?}");
    for (which, id) in [
        ("newest", *ids.last().unwrap()),
        ("oldest", ids[0]),
        ("middle", ids[1]),
    ] {
        let mut disk = n.disk.clone();
        disk.lose_segment(id);
        match store::recover(&mut disk, ShardConfig::default()) {
            Err(RecoverError::Manifest(m)) => assert!(m.contains(which), "{which}: {m}"),
            Err(e) => panic!("{which}: wrong error {e}"),
            Ok(_) => panic!("the {which} segment went missing unnoticed"),
        }
    }
    let mut emptied = n.disk.clone();
    emptied.remove_manifest();
    for id in &ids {
        emptied.lose_segment(*id);
    }
    assert!(matches!(
        store::recover(&mut emptied, ShardConfig::default()),
        Err(RecoverError::Manifest(m)) if m.contains("emptied")
    ));
    let mut no_manifest = n.disk.clone();
    no_manifest.remove_manifest();
    assert!(store::recover(&mut no_manifest, ShardConfig::default()).is_err());
}

#[test]
fn a_segment_created_but_not_yet_listed_is_quarantined_and_removed() {
    // Proves a crash between a new segment's header and the manifest listing it leaves a
    // segment recovery removes (after quarantine), while one that holds records refuses.
    let mut n = Node::new(ShardConfig::default());
    n.append(1, 1, "c", "1", None);
    n.pump();
    let mut disk = n.disk.clone();
    disk.create_segment(2).unwrap();
    let header = wal::SegmentHeader {
        shard: 0,
        segment: 2,
        first_lsn: 2,
    };
    disk.append(2, &header.encode()[..20]).unwrap();
    disk.sync_dir().unwrap();
    let (_, report) = store::recover(&mut disk, ShardConfig::default()).expect("recovers");
    assert_eq!(report.incomplete_segment, Some(2));
    assert_eq!(disk.segments().len(), 1);
    assert_eq!(disk.quarantined().len(), 1);

    let mut disk = n.disk.clone();
    disk.create_segment(2).unwrap();
    disk.append(2, &header.encode()).unwrap();
    disk.append(2, &[1; 64]).unwrap();
    disk.sync_dir().unwrap();
    assert!(matches!(
        store::recover(&mut disk, ShardConfig::default()),
        Err(RecoverError::Manifest(m)) if m.contains("does not list")
    ));
}

#[test]
fn a_crash_right_after_each_write_step_keeps_every_acknowledged_append() {
    // Proves the order of the file steps: a power loss after any acknowledged write (across
    // segment creations, manifest updates and deletions) recovers every acknowledged entry.
    let mut n = Node::new(ShardConfig {
        wal_segment_bytes_max: 500,
        retention_bytes_max: 1_500,
        ..ShardConfig::default()
    });
    for i in 1..=60 {
        n.append(
            1,
            i,
            "c",
            "\"survives every crash\"",
            Some(&format!("k{i}")),
        );
        assert_eq!(oks(&n.pump()).len(), 1);
        let mut crashed = n.disk.clone();
        crashed.crash();
        let (mut shard, _) =
            store::recover(&mut crashed, ShardConfig::default()).expect("recovers");
        shard.handle_request(
            n.now,
            Request {
                session: 5,
                op: ShardOp::Read {
                    r: 0,
                    mesh: MeshId::must("m"),
                    conv: ConvId::must("c"),
                    from: 1,
                    limit: 1_000,
                    local: false,
                },
            },
        );
        match shard.poll_output().map(|o| o.reply) {
            Some(Reply::Messages { events, head, .. }) => {
                assert_eq!(head, i, "the head after a crash at {i}");
                assert_eq!(events.last().map(|e| e.seq), Some(i));
            }
            r => panic!("{r:?}"),
        }
    }
    assert!(
        n.shard.stats().segments_deleted > 0,
        "retention deleted segments meanwhile"
    );
}

#[test]
fn a_missing_directory_fsync_on_segment_creation_loses_the_segment_in_a_crash() {
    // Proves the directory fsync that makes a new segment's name durable matters: without it
    // (planted), a crash takes the segment and the manifest's rename, and an acknowledged
    // write is gone; with it, the same crash keeps it.
    for planted in [false, true] {
        let mut disk = MemStore::new(0);
        let mut shard = Shard::new(ShardConfig::default());
        shard.handle_request(
            1,
            Request {
                session: 1,
                op: ShardOp::CreateMesh {
                    r: 1,
                    mesh: MeshId::must("m"),
                },
            },
        );
        let w = shard.poll_wal().expect("the first write creates segment 1");
        assert!(w.create);
        let bugs = PlantedBugs {
            no_dir_fsync_on_segment_create: planted,
            ..PlantedBugs::default()
        };
        store::perform(&mut disk, &w, &bugs).expect("lands");
        shard.handle_wal_done(2, w.last_lsn);
        assert!(shard.poll_output().is_some(), "the create is acknowledged");
        let mut crashed = disk.clone();
        crashed.crash();
        let (mut recovered, _) =
            store::recover(&mut crashed, ShardConfig::default()).expect("recovers");
        recovered.handle_request(
            3,
            Request {
                session: 1,
                op: ShardOp::CreateMesh {
                    r: 2,
                    mesh: MeshId::must("m"),
                },
            },
        );
        let refused = error_code(&recovered.poll_output().into_iter().collect::<Vec<_>>());
        let kept = refused == Some(ErrorCode::Conflict);
        assert_eq!(
            kept, !planted,
            "planted={planted}: the acknowledged mesh survives"
        );
    }
}

#[test]
fn a_failed_sync_cuts_the_segment_back_to_what_was_synced() {
    // Proves the fsyncgate rule: after a failed fdatasync the bytes of that write are cut
    // (never trusted from the page cache), the shard answers the write with an error, and a
    // recovery reads exactly the synced records.
    for (kind, code) in [
        (StoreErrorKind::Io, ErrorCode::Unavailable),
        (StoreErrorKind::NoSpace, ErrorCode::StorageFull),
    ] {
        let mut n = Node::new(ShardConfig::default());
        n.append(1, 1, "c", "1", None);
        n.pump();
        let synced = n.disk.segments()[&1].len();
        n.append(1, 2, "c", "2", None);
        let w = n.shard.poll_wal().unwrap();
        n.disk.fail_next("sync", kind);
        let failure = store::perform(&mut n.disk, &w, &PlantedBugs::default()).unwrap_err();
        assert!(failure.cleaned);
        assert_eq!(
            n.disk.segments()[&1].len(),
            synced,
            "cut back to the synced length"
        );
        n.shard.handle_wal_failed(
            n.now,
            failure.error.kind == StoreErrorKind::NoSpace,
            "injected",
        );
        assert_eq!(error_code(&n.pump()), Some(code));
        let report = n.restart();
        assert_eq!(report.records, 1);
    }
}

#[test]
fn after_a_full_disk_writes_are_refused_with_storage_full_and_reads_go_on() {
    // Proves the degraded mode: until the glue's deadline writes get storage_full, reads are
    // answered, and after it writes are taken again.
    let mut n = Node::new(ShardConfig::default());
    n.append(1, 1, "c", "1", None);
    n.pump();
    n.shard.handle_storage_full(n.now, n.now + 1_000);
    n.append(1, 2, "c", "2", None);
    assert_eq!(error_code(&n.pump()), Some(ErrorCode::StorageFull));
    n.req(
        2,
        ShardOp::Read {
            r: 3,
            mesh: MeshId::must("m"),
            conv: ConvId::must("c"),
            from: 1,
            limit: 10,
            local: false,
        },
    );
    assert!(matches!(n.pump()[0].reply, Reply::Messages { .. }));
    n.now += 1_000;
    n.append(1, 4, "c", "3", None);
    assert_eq!(oks(&n.pump()), vec![(4, None, Some(2))]);
}

#[test]
fn retention_deletes_old_segments_but_keeps_unacked_inbox_and_metadata() {
    // Proves the size limit drops acknowledged data only, and a restart after deletions loses
    // no mesh, peer, cursor, conversation head or unacknowledged message.
    let mut n = Node::new(ShardConfig {
        wal_segment_bytes_max: 4_000,
        retention_bytes_max: 12_000,
        ..ShardConfig::default()
    });
    n.setup_mesh(&[("a", &[]), ("b", &[]), ("c", &[])]);
    n.send(1, 0, "a", "c", "\"for c, never acked\"");
    n.pump();
    for i in 0..400 {
        n.send(1, i, "a", "b", "\"to b\"");
        n.append(1, i, "conv", "\"event\"", None);
        n.pump();
        if i % 50 == 0 {
            n.req(
                2,
                ShardOp::Ack {
                    mesh: MeshId::must("m"),
                    peer: PeerId::must("b"),
                    upto: 1_000,
                },
            );
        }
    }
    assert!(n.shard.stats().segments_deleted > 0, "retention ran");
    assert!(
        n.disk
            .segments()
            .values()
            .map(|s| s.len() as u64)
            .sum::<u64>()
            < 40_000
    );
    n.restart();
    let out = n.hello(3, "c");
    assert_eq!(
        deliveries(&out, 3),
        vec![1],
        "unacked message kept through deletions"
    );
    n.append(1, 9, "conv", "1", None);
    assert_eq!(
        oks(&n.pump()),
        vec![(9, None, Some(401))],
        "conversation head kept"
    );
    n.send(1, 9, "a", "b", "1");
    assert_eq!(oks(&n.pump()), vec![(9, Some(402), None)], "mesh head kept");
}

#[test]
fn planted_ack_before_fsync_releases_acks_early() {
    // Proves the planted bug does what the simulator expects it to (and is off by default).
    let mut n = Node::new(ShardConfig {
        planted: PlantedBugs {
            ack_before_fsync: true,
            ..PlantedBugs::default()
        },
        ..ShardConfig::default()
    });
    n.append(1, 1, "c", "1", None);
    assert!(n.shard.poll_output().is_some());
    assert_eq!(
        PlantedBugs::default(),
        PlantedBugs {
            ack_before_fsync: false,
            skip_crc_on_recovery: false,
            lose_cursor_update: false,
            cut_any_damage_in_newest_segment: false,
            no_dir_fsync_on_segment_create: false,
            trust_page_cache_after_failed_sync: false,
            no_sync_after_recovery: false,
            skip_crc_on_log_reads: false,
            forget_sealed_send_keys: false,
        }
    );
}

#[test]
fn repeated_retention_rounds_keep_every_unacked_message() {
    // Proves a regression found by the simulator: after one round copies a low position forward,
    // later positions still in the oldest segment are copied too, not lost; and a backlog larger
    // than the limit blocks retention instead of rewriting itself forever.
    let mut n = Node::new(ShardConfig {
        wal_segment_bytes_max: 2_000,
        retention_bytes_max: 6_000,
        ..ShardConfig::default()
    });
    n.setup_mesh(&[("a", &[]), ("b", &[]), ("c", &[])]);
    for i in 0..300u64 {
        // Every tenth message is for c, who never acks; b acks everything.
        let to = if i % 10 == 0 { "c" } else { "b" };
        n.send(1, i, "a", to, "\"payload payload\"");
        n.pump();
        n.req(
            2,
            ShardOp::Ack {
                mesh: MeshId::must("m"),
                peer: PeerId::must("b"),
                upto: 10_000,
            },
        );
    }
    let deleted = n.shard.stats().segments_deleted;
    assert!(deleted > 3, "several rounds ran ({deleted})");
    let writes = n.shard.stats().wal_writes;
    n.pump();
    assert!(n.shard.stats().wal_writes - writes < 3, "no rewrite storm");
    n.restart();
    let out = n.hello(3, "c");
    let expect: Vec<u64> = (0..300u64).filter(|i| i % 10 == 0).map(|i| i + 1).collect();
    assert_eq!(deliveries(&out, 3), expect);
}

#[test]
fn a_checksummed_frame_out_of_sequence_in_the_last_segment_refuses_to_start() {
    // Proves recovery cuts only what a torn write can leave: an intact frame with an
    // unexpected LSN (lost records before it) is an error even as the newest segment's final
    // write.
    let mut n = Node::new(ShardConfig::default());
    n.append(1, 1, "c", "1", None);
    n.pump();
    let mut frame = vec![0; wal::FRAME_HEADER_BYTES];
    wal::encode_record(
        5,
        0,
        &Record::MeshCreated(MeshRec { mesh: "x".into() }),
        &mut frame,
    )
    .unwrap();
    wal::FrameHeader::seal(&mut frame, 5, 1);
    n.disk.segment_mut(1).unwrap().extend_from_slice(&frame);
    match n.recover(ShardConfig::default()) {
        Err(RecoverError::Corrupt { reason, .. }) => assert!(reason.contains("lsn 5"), "{reason}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("a gap in the last segment was cut silently"),
    }
}

#[test]
fn many_acks_in_one_group_commit_write_one_cursor_record() {
    // Proves cursor moves are coalesced per peer per batch, and the latest one is durable.
    let mut n = Node::new(ShardConfig::default());
    n.setup_mesh(&[("a", &[]), ("b", &[])]);
    for i in 0..10 {
        n.send(1, i, "a", "b", "1");
    }
    n.pump();
    for upto in 1..=10 {
        n.req(
            2,
            ShardOp::Ack {
                mesh: MeshId::must("m"),
                peer: PeerId::must("b"),
                upto,
            },
        );
    }
    let w = n.shard.poll_wal().expect("the cursor record");
    assert_eq!(w.records, 1, "ten acks, one record");
    n.write(&w);
    n.shard.handle_wal_done(n.now, w.last_lsn);
    n.pump();
    n.restart();
    let out = n.hello(3, "b");
    match &out[0].reply {
        Reply::Frame(ServerOp::Welcome { acked, .. }) => assert_eq!(*acked, 10),
        r => panic!("expected welcome, got {r:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Key hellos
// ---------------------------------------------------------------------------------------------

use ed25519_dalek::{Signer, SigningKey};
use fabric_proto::internal::HelloProof;

fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

impl Node {
    /// Adds peer `peer` to mesh "m" with `key`'s public key and, if given, a token.
    fn add_key_peer(&mut self, peer: &str, key: &SigningKey, token: Option<&str>) -> Vec<Output> {
        self.req(
            0,
            ShardOp::AddPeer {
                r: 7,
                mesh: MeshId::must("m"),
                peer: PeerId::must(peer),
                groups: vec![],
                token_hash: token.map(token_hash),
                public_key: Some(key.verifying_key().to_bytes()),
            },
        );
        self.pump()
    }

    /// A key hello as the session forwards it: signed by `key` over `nonce` at `ts`.
    fn key_hello(
        &mut self,
        session: SessionId,
        peer: &str,
        key: &SigningKey,
        ts: u64,
        nonce: [u8; 32],
    ) -> Vec<Output> {
        let msg = fabric_proto::hello::hello_message("m", peer, ts, &nonce);
        let sig = key.sign(&msg).to_bytes().to_vec();
        self.req(
            session,
            ShardOp::Hello {
                mesh: MeshId::must("m"),
                peer: PeerId::must(peer),
                token: String::new(),
                proof: Some(HelloProof { sig, ts, nonce }),
            },
        );
        self.pump()
    }
}

fn welcomed(out: &[Output], session: SessionId) -> bool {
    out.iter()
        .any(|o| o.session == session && matches!(o.reply, Reply::Frame(ServerOp::Welcome { .. })))
}

fn error_message(out: &[Output]) -> String {
    out.iter()
        .find_map(|o| match &o.reply {
            Reply::Frame(ServerOp::Error { message, .. }) => Some(message.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

#[test]
fn a_key_hello_with_a_good_signature_is_welcomed_and_gets_its_inbox() {
    // Proves a peer registered with a public key authenticates by signature and is attached.
    let mut n = Node::new(ShardConfig::default());
    n.setup_mesh(&[("a", &[])]);
    let key = signing_key(1);
    assert_eq!(error_code(&n.add_key_peer("k", &key, None)), None);
    n.send(1, 1, "a", "k", "\"hi\"");
    n.pump();
    let now = n.now;
    let out = n.key_hello(5, "k", &key, now - 1_000, [9; 32]);
    assert!(welcomed(&out, 5), "{out:?}");
    assert_eq!(deliveries(&out, 5), vec![1]);
}

#[test]
fn key_hellos_with_a_bad_signature_wrong_key_or_no_key_are_unauthorized() {
    // Proves a tampered signature, a signature by another key, a key hello for a peer that has
    // only a token, and one for a peer that does not exist are each refused as unauthorized,
    // all with the same message: a refusal never reveals whether a mesh or peer exists.
    let mut n = Node::new(ShardConfig::default());
    n.setup_mesh(&[("a", &[])]);
    let key = signing_key(1);
    n.add_key_peer("k", &key, None);
    let now = n.now;

    // Signed over another nonce than the one the session forwards: the signature is bad.
    let msg = fabric_proto::hello::hello_message("m", "k", now, &[1; 32]);
    let sig = key.sign(&msg).to_bytes().to_vec();
    n.req(
        10,
        ShardOp::Hello {
            mesh: MeshId::must("m"),
            peer: PeerId::must("k"),
            token: String::new(),
            proof: Some(HelloProof {
                sig,
                ts: now,
                nonce: [2; 32],
            }),
        },
    );
    let out = n.pump();
    assert_eq!(error_code(&out), Some(ErrorCode::Unauthorized));
    let tampered = error_message(&out);
    assert!(!welcomed(&out, 10));

    let out = n.key_hello(11, "k", &signing_key(2), now, [3; 32]);
    assert_eq!(error_code(&out), Some(ErrorCode::Unauthorized));
    assert_eq!(error_message(&out), tampered);

    let out = n.key_hello(12, "a", &key, now, [4; 32]);
    assert_eq!(error_code(&out), Some(ErrorCode::Unauthorized));
    assert_eq!(error_message(&out), tampered);

    let out = n.key_hello(13, "ghost", &key, now, [5; 32]);
    assert_eq!(error_code(&out), Some(ErrorCode::Unauthorized));
    assert_eq!(
        error_message(&out),
        tampered,
        "a missing peer looks like a bad signature"
    );

    let out = n.key_hello(15, "k", &key, now, [6; 32]);
    assert!(welcomed(&out, 15), "the right key is welcomed");

    // A key-only peer has no token: a token hello with an empty token is refused too.
    n.req(
        14,
        ShardOp::Hello {
            mesh: MeshId::must("m"),
            peer: PeerId::must("k"),
            token: String::new(),
            proof: None,
        },
    );
    assert_eq!(error_code(&n.pump()), Some(ErrorCode::Unauthorized));
}

#[test]
fn a_stale_or_future_ts_is_refused_at_the_skew_limit() {
    // Proves `ts` more than HELLO_SKEW_MS_MAX from the shard's clock is refused either way,
    // and exactly at the limit it is accepted.
    let mut n = Node::new(ShardConfig::default());
    n.now = 10_000_000;
    n.setup_mesh(&[]);
    let key = signing_key(1);
    n.add_key_peer("k", &key, None);
    let max = fabric_proto::hello::HELLO_SKEW_MS_MAX;
    let now = n.now;
    let out = n.key_hello(1, "k", &key, now - max - 1, [1; 32]);
    assert_eq!(error_code(&out), Some(ErrorCode::Unauthorized));
    assert!(error_message(&out).contains("hello_skew_ms_max"), "{out:?}");
    let out = n.key_hello(2, "k", &key, now + max + 1, [2; 32]);
    assert_eq!(error_code(&out), Some(ErrorCode::Unauthorized));
    let now = n.now;
    let out = n.key_hello(3, "k", &key, now - max, [3; 32]);
    assert!(welcomed(&out, 3), "{out:?}");
}

#[test]
fn a_nonce_proves_one_hello_per_session() {
    // Proves a second hello on a session with the nonce already used is refused, even with a
    // valid signature, while another session with its own nonce is welcomed.
    let mut n = Node::new(ShardConfig::default());
    n.setup_mesh(&[]);
    let key = signing_key(1);
    n.add_key_peer("k", &key, Some("tok-k"));
    let now = n.now;
    assert!(welcomed(&n.key_hello(1, "k", &key, now, [7; 32]), 1));
    let out = n.key_hello(1, "k", &key, now, [7; 32]);
    assert_eq!(error_code(&out), Some(ErrorCode::Unauthorized));
    assert!(error_message(&out).contains("already used"), "{out:?}");
    assert!(welcomed(&n.key_hello(2, "k", &key, now, [8; 32]), 2));
    // The peer registered with both can still use its token.
    assert!(welcomed(&n.hello(3, "k"), 3));
}

#[test]
fn add_peer_needs_a_token_or_a_valid_key() {
    // Proves a peer with neither credential, or with bytes that are not an ed25519 point, is
    // refused as a bad request and nothing is logged.
    let mut n = Node::new(ShardConfig::default());
    n.setup_mesh(&[]);
    let before = n.shard.stats().records_written;
    // Some y coordinates have no point on the curve; take the first such small one.
    let not_a_point = (0u8..=255)
        .map(|i| {
            let mut b = [0u8; 32];
            b[0] = i;
            b
        })
        .find(|b| ed25519_dalek::VerifyingKey::from_bytes(b).is_err())
        .expect("an invalid encoding exists");
    for public_key in [None, Some(not_a_point)] {
        n.req(
            0,
            ShardOp::AddPeer {
                r: 1,
                mesh: MeshId::must("m"),
                peer: PeerId::must("x"),
                groups: vec![],
                token_hash: None,
                public_key,
            },
        );
        assert_eq!(error_code(&n.pump()), Some(ErrorCode::BadRequest));
    }
    assert_eq!(n.shard.stats().records_written, before);
}

#[test]
fn public_keys_survive_restarts_and_retention_checkpoints() {
    // Proves a key-only peer is recovered from its PeerKeyAdded record, and from a version-2
    // checkpoint once retention deleted the segment that held that record.
    let mut n = Node::new(ShardConfig {
        wal_segment_bytes_max: 4_000,
        retention_bytes_max: 12_000,
        ..ShardConfig::default()
    });
    n.setup_mesh(&[("a", &[])]);
    let key = signing_key(3);
    n.add_key_peer("k", &key, None);
    n.restart();
    let now = n.now;
    assert!(welcomed(&n.key_hello(1, "k", &key, now, [1; 32]), 1));
    for i in 0..400 {
        n.append(1, i, "conv", "\"event\"", None);
        n.pump();
    }
    assert!(n.shard.stats().segments_deleted > 0, "retention ran");
    let first = *n.disk.segments().keys().next().unwrap();
    assert!(
        first > 1,
        "the segment with the PeerKeyAdded record is gone"
    );
    n.restart();
    let now = n.now;
    assert!(welcomed(&n.key_hello(2, "k", &key, now, [2; 32]), 2));
    let out = n.key_hello(3, "k", &signing_key(4), now, [3; 32]);
    assert_eq!(error_code(&out), Some(ErrorCode::Unauthorized));
}

#[test]
fn group_commit_reuses_the_last_write_buffer_and_none_of_its_bytes() {
    // Proves WAL buffer recycling: the next batch is framed into the finished write's
    // allocation (no new Vec per commit), and starts empty, so the WAL on disk recovers exactly.
    let mut n = Node::new(ShardConfig::default());
    n.append(1, 10, "c", "1", None);
    let first = n.shard.poll_wal().expect("a write");
    let first_ptr = first.bytes.as_ptr();
    n.write(&first);
    n.shard.handle_wal_done(n.now, first.last_lsn);
    let mut buffer = first.bytes;
    buffer.fill(0xEE);
    n.shard.recycle_wal_buffer(buffer);
    n.append(1, 11, "c", "2", None);
    let second = n.shard.poll_wal().expect("a write");
    assert_eq!(second.bytes.as_ptr(), first_ptr, "the allocation is reused");
    assert!(
        !second.bytes.contains(&0xEE),
        "no old byte is written again"
    );
    n.write(&second);
    n.shard.handle_wal_done(n.now, second.last_lsn);
    n.restart();
    n.req(
        2,
        ShardOp::Subscribe {
            r: 1,
            mesh: MeshId::must("m"),
            conv: ConvId::must("c"),
            from: 1,
        },
    );
    assert_eq!(events(&n.pump(), 2), vec![1, 2]);
}

impl Node {
    /// Like `pump`, but the segment deletions the writes ask for never reach the disk (a power
    /// loss took the unsynced directory operations): a restart then reads the old segments.
    fn pump_keeping_segments(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        loop {
            while let Some(o) = self.shard.poll_output() {
                out.push(o);
            }
            let Some(mut w) = self.shard.poll_wal() else {
                break;
            };
            w.delete.clear();
            self.write(&w);
            self.now += 1;
            self.shard.handle_wal_done(self.now, w.last_lsn);
        }
        out
    }

    fn first_retained_seq(&mut self, conv: &str) -> Option<u64> {
        self.req(
            99,
            ShardOp::Read {
                r: 0,
                mesh: MeshId::must("m"),
                conv: ConvId::must(conv),
                from: 1,
                limit: 1,
                local: false,
            },
        );
        self.pump_keeping_segments()
            .into_iter()
            .find_map(|o| match o.reply {
                Reply::Messages { events, .. } => Some(events.first().map_or(u64::MAX, |e| e.seq)),
                _ => None,
            })
    }
}

#[test]
fn evicting_an_old_entry_keeps_its_key_when_the_key_points_to_a_newer_retained_entry() {
    // Proves retention forgets an idempotency key only with the entry it points to: a key
    // stored twice (its first entry left memory, a retry got a new seq, a restart then read
    // both from disk) keeps answering the retained seq when the old entry is evicted again.
    // Seeds 7417 and 8752 of the swarm found this as DuplicateSeq.
    let mut n = Node::new(ShardConfig {
        wal_segment_bytes_max: 600,
        retention_bytes_max: 1_200,
        ..ShardConfig::default()
    });
    n.append(1, 1, "c", "\"first\"", Some("k"));
    n.pump_keeping_segments();
    let mut r = 2;
    while n.first_retained_seq("c") == Some(1) {
        n.append(1, r, "other", "\"filler to roll segments\"", None);
        n.pump_keeping_segments();
        r += 1;
        assert!(r < 1_000, "retention never evicted seq 1");
    }
    // The key left memory with seq 1: a retry is stored again, at a new seq.
    n.append(1, r, "c", "\"first\"", Some("k"));
    let retried = oks(&n.pump_keeping_segments())[0].2.expect("a seq");
    assert!(retried > 1);
    // The restart reads seq 1 (its segment was never deleted) and then the retry.
    n.restart();
    n.append(
        1,
        r + 1,
        "other",
        "\"one more write, so retention runs again\"",
        None,
    );
    n.pump_keeping_segments();
    n.append(1, r + 2, "c", "\"first\"", Some("k"));
    assert_eq!(
        oks(&n.pump_keeping_segments()),
        vec![(r + 2, None, Some(retried))],
        "the key still answers its retained seq"
    );
}

mod apply;
mod keys;
mod limits;
mod reads;

#[test]
fn the_in_memory_store_reads_a_range_and_refuses_one_past_the_end() {
    // Proves MemStore::read_at returns exactly the asked bytes of a segment's data and answers
    // ShortRead (naming the segment) for a range past the end or one that overflows.
    let mut disk = MemStore::new(0);
    disk.create_segment(4).unwrap();
    disk.append(4, b"hello world").unwrap();
    assert_eq!(disk.read_at(4, 6, 5).unwrap(), b"world");
    for (offset, len) in [(6, 6), (u64::MAX, 1), (0, usize::MAX)] {
        let e = disk.read_at(4, offset, len).unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::ShortRead, "{offset} {len}");
        assert_eq!(e.file, wal::segment_file_name(4));
    }
}

fn attach_op(peer: &str, inbox_after: Option<u64>, subs: &[(&str, u64)]) -> ShardOp {
    ShardOp::Attach {
        mesh: MeshId::must("m"),
        peer: PeerId::must(peer),
        inbox_after,
        subs: subs.iter().map(|(c, n)| (ConvId::must(c), *n)).collect(),
        attempt: 1,
    }
}

fn attached(out: &[Output], session: SessionId) -> Vec<Option<ErrorCode>> {
    out.iter()
        .filter(|o| o.session == session)
        .filter_map(|o| match &o.reply {
            Reply::Attached { refused, .. } => Some(refused.as_ref().map(|r| r.0)),
            _ => None,
        })
        .collect()
}

#[test]
fn an_attach_delivers_the_inbox_after_its_mark_and_subscriptions_from_their_next_seq() {
    // Proves `attach` (a session taken up at a new leader): the inbox resumes after the pos
    // the session had handed out (not at the peer's older cursor), each subscription at its
    // next seq, one answer; a repeated attach moves the marks instead of adding listeners,
    // and an attach for a peer the shard does not have is refused as unauthorized.
    let mut n = Node::new(ShardConfig::default());
    n.setup_mesh(&[("a", &[]), ("b", &[])]);
    for r in 1..=4 {
        n.send(1, r, "b", "a", "1");
        n.append(1, 10 + r, "c", "1", None);
    }
    n.pump();
    n.req(5, attach_op("a", Some(2), &[("c", 3)]));
    let out = n.pump();
    assert_eq!(attached(&out, 5), vec![None]);
    assert_eq!(deliveries(&out, 5), vec![3, 4]);
    assert_eq!(events(&out, 5), vec![3, 4]);
    n.req(5, attach_op("a", Some(3), &[("c", 4)]));
    let out = n.pump();
    assert_eq!(deliveries(&out, 5), vec![4]);
    assert_eq!(events(&out, 5), vec![4]);
    n.append(1, 20, "c", "1", None);
    assert_eq!(events(&n.pump(), 5), vec![5], "one listener, not two");
    n.req(6, attach_op("nobody", Some(0), &[]));
    assert_eq!(attached(&n.pump(), 6), vec![Some(ErrorCode::Unauthorized)]);
}
