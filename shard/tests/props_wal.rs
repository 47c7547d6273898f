//! Properties of the WAL scanner (proptest): whatever bytes a segment holds, scanning never
//! panics, and a record whose checksum does not match is never returned as good.

use fabric_proto::Body;
use fabric_shard::record::{AppendedRec, Record};
use fabric_shard::wal::{self, FrameHeader, FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use proptest::prelude::*;

fn record(i: u64, text: &str) -> Record {
    Record::Appended(AppendedRec {
        mesh: "m".into(),
        conv: "c".into(),
        seq: i,
        from: "p".into(),
        body: Body::from_json_text(format!("\"{text}\"")).expect("a body"),
        key: i.is_multiple_of(2).then(|| format!("k{i}").into()),
        ts: 1_700_000_000_000 + i,
    })
}

/// A segment (header bytes zeroed: the scanner starts after them) holding one write frame of
/// `records`, LSNs from 1.
fn segment(records: &[Record]) -> Vec<u8> {
    let mut frame = vec![0; FRAME_HEADER_BYTES];
    for (i, r) in records.iter().enumerate() {
        wal::encode_record(i as u64 + 1, r, &mut frame).expect("a small record");
    }
    FrameHeader::seal(&mut frame, 1, records.len() as u32);
    let mut seg = vec![0; SEGMENT_HEADER_BYTES];
    seg.extend_from_slice(&frame);
    seg
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_flipped_bit_never_comes_back_as_a_good_record(
        texts in proptest::collection::vec("[a-z]{0,40}", 1..8),
        at in any::<usize>(),
        bit in 0u8..8,
    ) {
        // Proves the scanner checks every checksum: after one bit flip anywhere in the frame,
        // each record it still returns is one that was written, unchanged, at its LSN.
        let records: Vec<Record> = texts.iter().enumerate().map(|(i, t)| record(i as u64, t)).collect();
        let mut seg = segment(&records);
        let span = seg.len() - SEGMENT_HEADER_BYTES;
        seg[SEGMENT_HEADER_BYTES + at % span] ^= 1 << bit;
        let scan = wal::scan_frames(&seg, 1, false);
        prop_assert!(scan.damage.is_some(), "a flipped bit is damage");
        for s in &scan.records {
            prop_assert_eq!(&s.record, &records[(s.lsn - 1) as usize]);
        }
    }

    #[test]
    fn scanning_arbitrary_bytes_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        lsn in any::<u64>(),
    ) {
        // Proves the scanner returns damage, never a panic, on any segment content.
        let mut seg = vec![0; SEGMENT_HEADER_BYTES];
        seg.extend_from_slice(&bytes);
        let _ = wal::scan_frames(&seg, lsn, false);
        let _ = wal::scan_frames_at(&seg, SEGMENT_HEADER_BYTES);
    }

    #[test]
    fn intact_frames_scan_back_every_record(texts in proptest::collection::vec("[a-z]{0,40}", 1..8)) {
        // Proves the write frame round-trips: every record back, in order, no damage.
        let records: Vec<Record> = texts.iter().enumerate().map(|(i, t)| record(i as u64, t)).collect();
        let scan = wal::scan_frames(&segment(&records), 1, false);
        prop_assert!(scan.damage.is_none());
        let back: Vec<&Record> = scan.records.iter().map(|s| &s.record).collect();
        prop_assert_eq!(back, records.iter().collect::<Vec<_>>());
    }
}
