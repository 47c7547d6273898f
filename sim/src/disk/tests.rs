use super::*;
use fabric_proto::internal::{Request, ShardOp};
use fabric_proto::Body;
use fabric_proto::PeerId;
use fabric_proto::{ConvId, MeshId};
use fabric_shard::store;
use fabric_shard::{Shard, ShardConfig, WalWrite};
use rand::SeedableRng;

fn faults(torn: f64) -> CrashFaults {
    CrashFaults {
        torn_write_probability: torn,
        tail_corruption_probability: 0.0,
    }
}

/// A shard that has appended `n` entries (each in its own write) onto `disk`, and the next
/// write, not yet performed.
fn writes(disk: &mut Disk, n: u64) -> (Shard, WalWrite) {
    let mut shard = Shard::new(ShardConfig {
        wal_segment_bytes_max: 2_000,
        ..ShardConfig::default()
    });
    let append = |shard: &mut Shard, r: u64| {
        shard.handle_request(
            r,
            Request {
                session: 1,
                op: ShardOp::Append {
                    r,
                    mesh: MeshId::must("m"),
                    conv: ConvId::must("c"),
                    from: PeerId::must("p"),
                    body: Body::from_json_text(format!(
                        "{{\"op\":{r},\"pad\":\"{}\"}}",
                        "x".repeat(300)
                    ))
                    .unwrap(),
                    key: None,
                },
            },
        );
    };
    for r in 1..=n + 1 {
        append(&mut shard, r);
        let w = shard.poll_wal().expect("a write");
        if r == n + 1 {
            return (shard, w);
        }
        store::perform(disk, &w, &fabric_shard::PlantedBugs::default()).expect("lands");
        shard.handle_wal_done(r, w.last_lsn);
        while shard.poll_output().is_some() {}
    }
    unreachable!()
}

fn recovered_head(disk: &mut Disk) -> u64 {
    let (shard, _) = store::recover(disk, ShardConfig::default()).expect("recovers");
    shard.durable_lsn()
}

#[test]
fn synced_data_survives_a_crash_at_every_step_of_a_write() {
    // Proves a power failure after any number of the node's file steps (across a segment
    // creation and its manifest) keeps every synced write, and recovery succeeds.
    for seed in 0..40 {
        for steps in 0..12 {
            let mut disk = Disk::new(0);
            let (_, w) = writes(&mut disk, 6);
            let before = recovered_head(&mut disk.clone());
            disk.set_fault(Some(Fault::CrashAfter { steps }));
            let _ = store::perform(&mut disk, &w, &fabric_shard::PlantedBugs::default());
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            disk.crash(&mut rng, faults(0.5));
            let after = recovered_head(&mut disk);
            assert!(
                after >= before,
                "seed {seed} steps {steps}: {after} < {before}"
            );
        }
    }
}

#[test]
fn unsynced_data_survives_only_as_a_sector_prefix() {
    // Proves a crash keeps only whole-sector prefixes (or none, or all) of unsynced bytes.
    for seed in 0..100 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut d = Disk::new(0);
        d.create_segment(1).unwrap();
        d.append(1, &[7; 700]).unwrap();
        d.sync(1).unwrap();
        d.sync_dir().unwrap();
        d.append(1, &[9; 1500]).unwrap();
        let r = d.crash(&mut rng, faults(0.5));
        let data = d.segments()[0].1.to_vec();
        assert!(data[..700].iter().all(|b| *b == 7), "synced bytes intact");
        let end = data[700..]
            .iter()
            .rposition(|b| *b == 9)
            .map_or(700, |p| 700 + p + 1);
        assert!(
            [700, 2200].contains(&end) || end % SECTOR_BYTES == 0,
            "cut {end} on a sector boundary ({r:?})"
        );
        assert_eq!(d.unsynced_bytes(), 0);
    }
}

#[test]
fn pages_dropped_after_a_failed_sync_are_never_durable() {
    // Proves the fsyncgate model: after an EIO'd fdatasync that dropped the pages, a later
    // sync does not make those bytes durable, and a crash turns them into zeros; cutting the
    // file back (what the node does) removes them for good.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut d = Disk::new(0);
    d.create_segment(1).unwrap();
    d.append(1, &[1; 100]).unwrap();
    d.sync(1).unwrap();
    d.sync_dir().unwrap();
    d.set_fault(Some(Fault::FailAt {
        step: 1,
        sectors: usize::MAX,
        drop_pages: true,
    }));
    d.append(1, &[2; 100]).unwrap();
    assert!(d.sync(1).is_err());
    d.set_fault(None);
    d.sync(1).unwrap();
    assert_eq!(d.segments()[0].1.len(), 200, "still readable");
    let mut crashed = d.clone();
    crashed.crash(&mut rng, faults(0.0));
    assert!(crashed.segments()[0].1[100..].iter().all(|b| *b == 0));
    d.truncate(1, 100).unwrap();
    d.crash(&mut rng, faults(0.0));
    assert_eq!(d.segments()[0].1, &[1; 100][..]);
}

#[test]
fn a_failed_write_is_cut_back_by_the_node_steps() {
    // Proves the shared file steps cut a failed write back to what was synced, whichever
    // step failed (ENOSPC part-way, EIO on the sync).
    for (step, sectors) in [(0, 0), (0, 1), (1, usize::MAX)] {
        let mut disk = Disk::new(0);
        let (_, w) = writes(&mut disk, 3);
        let synced = disk.segments().last().unwrap().1.len();
        disk.set_fault(Some(Fault::FailAt {
            step,
            sectors,
            drop_pages: true,
        }));
        let failure =
            store::perform(&mut disk, &w, &fabric_shard::PlantedBugs::default()).unwrap_err();
        assert!(failure.cleaned, "{failure:?}");
        disk.set_fault(None);
        assert_eq!(disk.segments().last().unwrap().1.len(), synced);
    }
}

#[test]
fn read_flips_land_in_synced_data_outside_the_final_write() {
    // Proves read corruption is aimed only where recovery must refuse: sealed segments and the
    // newest segment before its final write.
    let mut disk = Disk::new(0);
    let (_, _) = writes(&mut disk, 12);
    let segs: Vec<(u64, Vec<u8>)> = disk
        .segments()
        .iter()
        .map(|(i, b)| (*i, b.to_vec()))
        .collect();
    let newest = segs.last().unwrap();
    let final_start = last_frame_start(&newest.1);
    for seed in 0..200 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let flip = disk.pick_read_flip_in(&mut rng, None, None, None).unwrap();
        if flip.segment == newest.0 {
            assert!(flip.offset < final_start, "{flip:?} in the final write");
        }
        let mut d = disk.clone();
        d.flip_next_read(flip);
        assert!(
            store::recover(&mut d, ShardConfig::default()).is_err(),
            "seed {seed}: {flip:?} accepted"
        );
    }
}

#[test]
fn a_ranged_read_sees_an_armed_bit_flip_only_inside_its_range() {
    // Proves the simulated disk's positioned read returns exactly the range, answers ShortRead
    // past the end, and corrupts a read only when the armed flip falls inside the range (an
    // unrelated read leaves the flip armed for the read it was meant for).
    let mut disk = Disk::new(0);
    disk.create_segment(1).unwrap();
    disk.append(1, b"abcdefgh").unwrap();
    disk.flip_next_read(ReadFlip {
        segment: 1,
        offset: 6,
        mask: 0x20,
    });
    assert_eq!(
        disk.read_at(1, 0, 4).unwrap(),
        b"abcd",
        "flip outside the range"
    );
    assert_eq!(
        disk.read_at(1, 4, 4).unwrap(),
        b"efGh",
        "flip inside the range"
    );
    assert_eq!(
        disk.read_at(1, 4, 4).unwrap(),
        b"efgh",
        "a flip corrupts one read"
    );
    let e = disk.read_at(1, 6, 3).unwrap_err();
    assert_eq!(e.kind, fabric_shard::store::StoreErrorKind::ShortRead);
}
