//! The repair marker, the bound on what a damaged log may have acknowledged, and replica
//! recovery's cut for repair (over the in-memory store, through the same file steps a host
//! runs), including a crash at every step of the cut.

use super::*;
use crate::store::mem::MemStore;
use crate::store::{self, SegmentStore};
use crate::{wal, PlantedBugs, RecoverError, Shard, ShardConfig};
use fabric_proto::internal::{Request, ShardOp};
use fabric_proto::{Body, ConvId, MeshId, PeerId};

fn config() -> ShardConfig {
    ShardConfig {
        wal_segment_bytes_max: 1_000,
        ..ShardConfig::default()
    }
}

/// `n` acknowledged appends, one write each, over several small segments.
fn log_of(n: u64) -> MemStore {
    let mut disk = MemStore::new(0);
    let mut shard = Shard::new(config());
    for r in 1..=n {
        let op = ShardOp::Append {
            r,
            mesh: MeshId::must("m"),
            conv: ConvId::must("c"),
            from: PeerId::must("a"),
            body: Body::from_json_text(format!("\"entry {r}\"")).expect("json"),
            key: None,
        };
        shard.handle_request(r, Request { session: 1, op });
        while let Some(w) = shard.poll_wal() {
            store::perform(&mut disk, &w, &PlantedBugs::default()).expect("lands");
            shard.handle_wal_done(r, w.last_lsn);
        }
        while shard.poll_output().is_some() {}
    }
    disk
}

fn recover_replica(
    disk: &mut MemStore,
    repairable: bool,
) -> Result<(Shard, crate::RecoveryReport, crate::recovery::RecoveredLog), RecoverError> {
    store::recover_replica_log(disk, config(), 64, repairable)
}

/// The last LSN a disk's segments name.
fn last_lsn(disk: &MemStore) -> u64 {
    disk.segments()
        .values()
        .map(|b| acked_bound_of_segment(b, 0))
        .max()
        .unwrap_or(0)
}

#[test]
fn a_marker_round_trips_and_a_damaged_one_is_refused() {
    // Proves the REPAIR file decodes to what was encoded and any damaged, foreign or
    // nonsensical marker is an error (recovery refuses: it cannot tell how far to repair).
    let m = RepairMarker {
        shard: 3,
        from_lsn: 10,
        through_lsn: 25,
    };
    let b = m.encode();
    assert_eq!(RepairMarker::decode(&b, 3), Ok(m));
    let mut flipped = b;
    flipped[14] ^= 1;
    assert_eq!(
        RepairMarker::decode(&flipped, 3),
        Err(RepairMarkerError::Checksum)
    );
    assert!(matches!(
        RepairMarker::decode(&b, 4),
        Err(RepairMarkerError::Shard { .. })
    ));
    assert!(matches!(
        RepairMarker::decode(&b[..20], 3),
        Err(RepairMarkerError::Length(20))
    ));
    let bad = RepairMarker { from_lsn: 30, ..m };
    assert!(matches!(
        RepairMarker::decode(&bad.encode(), 3),
        Err(RepairMarkerError::Range { .. })
    ));
}

#[test]
fn the_acked_bound_covers_frames_whose_headers_the_damage_hid() {
    // Proves the bound names every LSN of intact frames after the damage and, for bytes no
    // intact frame covers (a frame whose header was hit), counts one record per record header.
    let disk = log_of(6);
    let segs = disk.segments();
    let (_, bytes) = segs.iter().next().expect("a segment");
    let first = wal::SegmentHeader::decode(bytes).expect("header").first_lsn;
    let end = acked_bound(bytes, wal::SEGMENT_HEADER_BYTES, first - 1);
    let last_named = {
        let scan = wal::scan_frames(bytes, first, false);
        scan.records.last().expect("records").lsn
    };
    assert_eq!(end, last_named, "intact frames: exactly their LSNs");
    // Hide the last frame's header: its records are still counted, by bytes.
    let mut hit = bytes.clone();
    let last_frame = hit
        .windows(4)
        .rposition(|w| w == wal::FRAME_MAGIC)
        .expect("a frame");
    hit[last_frame + 5] ^= 0x40;
    let bound = acked_bound(&hit, wal::SEGMENT_HEADER_BYTES, first - 1);
    assert!(bound >= last_named, "{bound} < {last_named}");
}

#[test]
fn a_replica_cuts_a_flipped_bit_in_a_synced_frame_for_repair_and_a_lone_node_refuses() {
    // Proves a replica with other voters cuts its log at damage no torn write explains (a flip
    // in a sealed segment), keeps every cut byte in quarantine, writes the REPAIR marker with a
    // bound covering every LSN it held, and ends its log at the cut; a replica without other
    // voters refuses to start, naming file and offset, as a single node does.
    let mut disk = log_of(30);
    let segments: Vec<u64> = disk.segments().keys().copied().collect();
    assert!(segments.len() >= 3, "{segments:?}");
    let held = last_lsn(&disk);
    let damaged = segments[1];
    let at = wal::SEGMENT_HEADER_BYTES + wal::FRAME_HEADER_BYTES + wal::RECORD_HEADER_BYTES + 2;
    disk.segment_mut(damaged).expect("segment")[at] ^= 0x08;
    match recover_replica(&mut disk.clone(), false) {
        Err(RecoverError::Corrupt { file, .. }) => {
            assert_eq!(file, wal::segment_file_name(damaged))
        }
        other => panic!("a lone replica must refuse: {:?}", other.map(|r| r.1)),
    }
    let (shard, report, log) = recover_replica(&mut disk, true).expect("repairs");
    let cut = report.repair.clone().expect("a cut for repair");
    assert_eq!(cut.segment, damaged);
    assert_eq!(cut.offset, wal::SEGMENT_HEADER_BYTES as u64);
    assert_eq!(cut.removed, segments[2..].to_vec());
    assert!(cut.through_lsn >= held, "{} < {held}", cut.through_lsn);
    assert_eq!(log.repair_through, Some(cut.through_lsn));
    assert_eq!(shard.next_lsn, cut.from_lsn, "the log ends at the cut");
    let marker = disk.read_repair().expect("read").expect("a marker");
    let marker = RepairMarker::decode(&marker, 0).expect("valid");
    assert_eq!(
        (marker.from_lsn, marker.through_lsn),
        (cut.from_lsn, cut.through_lsn)
    );
    let listed: Vec<u64> = disk.segments().keys().copied().collect();
    assert_eq!(listed, segments[..2].to_vec(), "later segments removed");
    let quarantined: usize = disk.quarantined().values().map(|b| b.len()).sum();
    let cut_bytes = disk_len_after(&log_of(30), damaged, cut.offset as usize);
    assert_eq!(quarantined, cut_bytes, "every cut byte is kept");
    // A restart before the repair ends stays in repair with the same bound.
    let (_, again, log) = recover_replica(&mut disk, true).expect("recovers");
    assert_eq!(again.repair, None);
    assert_eq!(log.repair_through, Some(cut.through_lsn));
}

/// Bytes of `id` from `offset` on plus every later segment, on an undamaged copy.
fn disk_len_after(disk: &MemStore, id: u64, offset: usize) -> usize {
    disk.segments()
        .iter()
        .map(|(s, b)| match s.cmp(&id) {
            std::cmp::Ordering::Less => 0,
            std::cmp::Ordering::Equal => b.len() - offset,
            std::cmp::Ordering::Greater => b.len(),
        })
        .sum()
}

#[test]
fn a_damaged_segment_header_cuts_the_whole_segment_but_the_oldest_refuses() {
    // Proves a flip in a later segment's header cuts that segment whole (from the LSN the one
    // before it ends at), while a flip in the oldest segment's header refuses: where its log
    // starts is then unknown.
    let mut disk = log_of(30);
    let segments: Vec<u64> = disk.segments().keys().copied().collect();
    disk.segment_mut(segments[2]).expect("segment")[20] ^= 0x01;
    let (_, report, _) = recover_replica(&mut disk, true).expect("repairs");
    let cut = report.repair.expect("a cut");
    assert_eq!((cut.segment, cut.offset), (segments[2], 0));
    let listed: Vec<u64> = disk.segments().keys().copied().collect();
    assert_eq!(listed, segments[..2].to_vec());

    let mut disk = log_of(30);
    disk.segment_mut(segments[0]).expect("segment")[20] ^= 0x01;
    assert!(matches!(
        recover_replica(&mut disk, true),
        Err(RecoverError::Corrupt { offset: 0, .. })
    ));
}

#[test]
fn a_crash_at_any_step_of_the_repair_cut_restarts_in_repair_with_the_bound() {
    // Proves the cut is crash-safe: a failure (then a power loss) at each of its file steps
    // leaves a directory that recovers in repair, with a bound at least the first one, and
    // never refuses to start.
    let mut damaged = log_of(30);
    let segments: Vec<u64> = damaged.segments().keys().copied().collect();
    let at = wal::SEGMENT_HEADER_BYTES + wal::FRAME_HEADER_BYTES + wal::RECORD_HEADER_BYTES + 2;
    damaged.segment_mut(segments[1]).expect("segment")[at] ^= 0x08;
    let through = {
        let (_, r, _) = recover_replica(&mut damaged.clone(), true).expect("repairs");
        r.repair.expect("a cut").through_lsn
    };
    let steps = [
        "write_repair",
        "quarantine",
        "write_manifest_temp",
        "rename_manifest",
        "truncate",
        "remove",
        "sync_dir",
    ];
    for step in steps {
        let mut disk = damaged.clone();
        disk.fail_next(step, crate::store::StoreErrorKind::Io);
        let failed = recover_replica(&mut disk, true);
        assert!(failed.is_err(), "{step}: the injected failure surfaces");
        disk.crash();
        let (_, _, log) = recover_replica(&mut disk, true)
            .unwrap_or_else(|e| panic!("{step}: recovery after the crash refused: {e}"));
        let again = log.repair_through.expect("still in repair");
        assert!(again >= through, "{step}: bound {again} < {through}");
    }
}

#[test]
fn a_marker_the_log_covers_again_is_removed_at_recovery() {
    // Proves a restart after the repaired range came back ends the repair (marker removed),
    // and one before it stays in repair.
    let mut disk = log_of(10);
    let held = last_lsn(&disk);
    let marker = RepairMarker {
        shard: 0,
        from_lsn: 3,
        through_lsn: held + 5,
    };
    disk.write_repair(&marker.encode()).expect("write");
    let (_, report, log) = recover_replica(&mut disk, true).expect("recovers");
    assert_eq!(log.repair_through, Some(held + 5));
    assert!(!report.repair_finished);
    let done = RepairMarker {
        through_lsn: held,
        ..marker
    };
    disk.write_repair(&done.encode()).expect("write");
    let (_, report, log) = recover_replica(&mut disk, true).expect("recovers");
    assert_eq!(log.repair_through, None);
    assert!(report.repair_finished);
    assert_eq!(disk.read_repair().expect("read"), None);
}

#[test]
fn a_cut_for_repair_keeps_entries_a_cut_rewind_could_reach_unapplied() {
    // Proves the commit hint stops a rewind's reach below the cut: the cut bytes may hold a
    // rewind that replaced kept entries the hint covers, so the last `window` kept entries
    // stay unapplied (for a leader's append to confirm or replace), whatever the hint says.
    let mut disk = log_of(30);
    let segments: Vec<u64> = disk.segments().keys().copied().collect();
    let held = last_lsn(&disk);
    let bytes = disk.read_manifest().expect("read").expect("a manifest");
    let mut m = wal::Manifest::decode(&bytes).expect("valid");
    m.commit = held;
    disk.write_manifest_temp(&m.encode()).expect("temp");
    disk.rename_manifest().expect("rename");
    disk.sync_dir().expect("sync");
    let at = wal::SEGMENT_HEADER_BYTES + wal::FRAME_HEADER_BYTES + wal::RECORD_HEADER_BYTES + 2;
    disk.segment_mut(segments[2]).expect("segment")[at] ^= 0x08;
    let window = 4;
    let (_, report, log) =
        store::recover_replica_log(&mut disk, config(), window, true).expect("repairs");
    let cut = report.repair.expect("a cut");
    let kept_last = cut.from_lsn - 1;
    assert_eq!(log.applied, kept_last - window as u64);
    let tail: Vec<u64> = log.tail.iter().map(|t| t.lsn).collect();
    assert_eq!(tail, ((kept_last - 3)..=kept_last).collect::<Vec<_>>());
    let after =
        wal::Manifest::decode(&disk.read_manifest().expect("read").expect("m")).expect("valid");
    assert_eq!(
        after.commit,
        kept_last - window as u64,
        "the hint written with the cut"
    );
}
