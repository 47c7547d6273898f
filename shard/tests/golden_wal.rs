//! Golden bytes of the WAL (format 2): a record of every type, a segment header, the manifest
//! and a write frame, exactly as `shard/src/wal.rs` documents them (record: `len u32 | crc32c
//! u32 | type u8 | lsn u64 | postcard payload`, little-endian). The expected bytes are literals
//! checked by hand against that layout once, never produced by the code under test at test
//! time: reordering a record enum, changing a field or the framing fails here, and so does
//! reading back what an older node wrote.

mod golden_wal_cases;

use fabric_shard::wal::{self, FrameHeader, Manifest, SegmentHeader, SEGMENT_HEADER_BYTES};
use golden_wal_cases::*;

/// Each `records()` case framed at LSN 10, 11, ... in order.
const RECORDS_GOLDEN: &[&str] = &[
    "020000004a6c7625010a00000000000000016d",
    "270000003015e625020b00000000000000016d01610101670101010101010101010101010101010101010101010101010101010101010101",
    "100000007f812cb5030c00000000000000016d050161010167013180d095ffbc31",
    "14000000d836d95c040d00000000000000016d01630301610322782201016b81d095ffbc31",
    "060000005d8378cf050e00000000000000016d0161ac02",
    "2600000045f59074070f00000000000000016d016200000202020202020202020202020202020202020202020202020202020202020202",
    "35000000da5cf11a091000000000000000000101016d09010161010167010303030303030303030303030303030303030303030303030303030303030303000401016d016303",
];
/// `SegmentHeader { shard: 2, segment: 7, first_lsn: 10 }`.
const SEGMENT_HEADER_GOLDEN: &str =
    "4641425257414c32020000000200000007000000000000000a00000000000000f03e96b0";
/// `Manifest { shard: 2, oldest: 7, newest: 8 }`.
const MANIFEST_GOLDEN: &str =
    "464142524d414e49020000000200000007000000000000000800000000000000448644a9";
/// One write frame holding the first record (`MeshCreated`) at LSN 10.
const FRAME_GOLDEN: &str = "fffe4657130000000a00000000000000010000000000000047e3919e020000004a6c7625010a00000000000000016d";

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("golden hex")
}

#[test]
fn golden_wal_cases_cover_every_record_type() {
    // Proves every Record variant has a golden case.
    let mut seen = vec![false; RECORD_VARIANTS];
    records()
        .iter()
        .for_each(|r| seen[record_variant(r)] = true);
    assert!(
        seen.iter().all(|s| *s),
        "record types without a case: {seen:?}"
    );
    assert_eq!(records().len(), RECORDS_GOLDEN.len());
}

#[test]
fn golden_wal_records_encode_to_the_pinned_bytes() {
    // Proves each record type is framed into exactly the pinned bytes.
    for (i, (r, want)) in records().iter().zip(RECORDS_GOLDEN).enumerate() {
        let mut out = Vec::new();
        wal::encode_record(10 + i as u64, r, &mut out).expect("small");
        assert_eq!(hex::encode(&out), *want, "{r:?}");
    }
}

#[test]
fn golden_wal_records_scan_back_from_the_pinned_bytes() {
    // Proves a segment built from the pinned bytes (header, one frame of every record) scans
    // back into the same records at the same LSNs, with no damage.
    let mut body = Vec::new();
    for r in RECORDS_GOLDEN {
        body.extend_from_slice(&unhex(r));
    }
    let mut frame = vec![0; wal::FRAME_HEADER_BYTES];
    frame.extend_from_slice(&body);
    FrameHeader::seal(&mut frame, 10, RECORDS_GOLDEN.len() as u32);
    let mut seg = unhex(SEGMENT_HEADER_GOLDEN);
    seg.extend_from_slice(&frame);
    let scan = wal::scan_frames(&seg, 10, false);
    assert!(scan.damage.is_none(), "{:?}", scan.damage);
    let back: Vec<_> = scan
        .records
        .iter()
        .map(|s| (s.lsn, s.record.clone()))
        .collect();
    let want: Vec<_> = records()
        .into_iter()
        .enumerate()
        .map(|(i, r)| (10 + i as u64, r))
        .collect();
    assert_eq!(back, want);
}

#[test]
fn golden_segment_header_manifest_and_frame_bytes() {
    // Proves the segment header, the manifest and the write frame header are the pinned
    // bytes, and decode back.
    let h = SegmentHeader {
        shard: 2,
        segment: 7,
        first_lsn: 10,
    };
    assert_eq!(hex::encode(h.encode()), SEGMENT_HEADER_GOLDEN);
    assert_eq!(SegmentHeader::decode(&unhex(SEGMENT_HEADER_GOLDEN)), Ok(h));
    assert_eq!(unhex(SEGMENT_HEADER_GOLDEN).len(), SEGMENT_HEADER_BYTES);
    let m = Manifest {
        shard: 2,
        oldest: 7,
        newest: 8,
    };
    assert_eq!(hex::encode(m.encode()), MANIFEST_GOLDEN);
    let mut frame = vec![0; wal::FRAME_HEADER_BYTES];
    frame.extend_from_slice(&unhex(RECORDS_GOLDEN[0]));
    FrameHeader::seal(&mut frame, 10, 1);
    assert_eq!(hex::encode(&frame), FRAME_GOLDEN);
    let header = FrameHeader::decode(&unhex(FRAME_GOLDEN)).expect("intact");
    assert_eq!((header.len, header.first_lsn, header.records), (19, 10, 1));
}
