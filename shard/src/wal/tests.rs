use super::*;
use crate::record::{AckedRec, MeshRec};

fn acked(upto: u64) -> Record {
    Record::Acked(AckedRec {
        mesh: "m".into(),
        peer: "p".into(),
        upto,
    })
}

/// A segment (header, then one frame per entry of `writes`, each of that many records) and
/// the offset where each frame ends; every record of term 0.
fn segment(first_lsn: u64, writes: &[u64]) -> (Vec<u8>, Vec<usize>) {
    segment_with_terms(first_lsn, writes, |_| 0)
}

/// As [`segment`], each record with the term `term_of` its LSN.
fn segment_with_terms(
    first_lsn: u64,
    writes: &[u64],
    term_of: impl Fn(u64) -> u64,
) -> (Vec<u8>, Vec<usize>) {
    let header = SegmentHeader {
        shard: 3,
        segment: 7,
        first_lsn,
    };
    let mut out = header.encode().to_vec();
    let mut ends = Vec::new();
    let mut lsn = first_lsn;
    for n in writes {
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
        for _ in 0..*n {
            encode_record(lsn, term_of(lsn), &acked(lsn), &mut out).expect("small record");
            lsn += 1;
        }
        FrameHeader::seal(&mut out[start..], lsn - *n, *n as u32);
        ends.push(out.len());
    }
    (out, ends)
}

#[test]
fn whole_segment_scans_to_the_end() {
    // Proves framed writes scan back in order with dense LSNs and no damage.
    let (bytes, _) = segment(10, &[3, 1, 4]);
    assert_eq!(SegmentHeader::decode(&bytes).unwrap().first_lsn, 10);
    let scan = scan_frames(&bytes, 10, false);
    assert_eq!(scan.records.len(), 8);
    assert_eq!(scan.frames, 3);
    assert_eq!(scan.valid_len, bytes.len() as u64);
    assert!(scan.damage.is_none());
    assert_eq!(scan.records[7].lsn, 17);
}

#[test]
fn every_truncation_point_keeps_exactly_the_whole_frames_before_it() {
    // Proves a cut anywhere (a torn final write) keeps the frames that end before the cut and
    // reports the damage at the start of the frame the cut falls in.
    let (bytes, ends) = segment(1, &[2, 3, 1]);
    for cut in SEGMENT_HEADER_BYTES..bytes.len() {
        let scan = scan_frames(&bytes[..cut], 1, false);
        let whole = ends.iter().filter(|e| **e <= cut).count();
        let valid = if whole == 0 {
            SEGMENT_HEADER_BYTES
        } else {
            ends[whole - 1]
        };
        assert_eq!(scan.valid_len as usize, valid, "cut at {cut}");
        if valid != cut {
            assert!(
                matches!(scan.damage, Some((at, Damage::Torn(_))) if at as usize == valid),
                "cut at {cut}: {:?}",
                scan.damage
            );
        }
    }
}

#[test]
fn a_flipped_bit_anywhere_damages_exactly_its_frame() {
    // Proves a single bit flip in any byte after the header is noticed at the frame it lies
    // in: the frames before it are kept whole, none of its records is accepted.
    let (bytes, ends) = segment(1, &[2, 2, 2]);
    for i in SEGMENT_HEADER_BYTES..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x10;
        let scan = scan_frames(&bad, 1, false);
        let frame = ends.iter().position(|e| i < *e).unwrap();
        assert_eq!(scan.records.len(), 2 * frame, "flip at {i}");
        assert!(scan.damage.is_some(), "flip at {i} went unnoticed");
    }
}

#[test]
fn a_checksummed_frame_out_of_sequence_is_invalid_not_torn() {
    // Proves an intact frame with an unexpected first LSN (records lost before it) is never
    // mistaken for a torn write.
    let (bytes, _) = segment(5, &[2]);
    let scan = scan_frames(&bytes, 4, false);
    assert!(matches!(scan.damage, Some((_, Damage::Invalid(r))) if r.contains("lsn 5")));
}

#[test]
fn zero_tails_and_partial_headers_are_torn() {
    // Proves the shapes a torn write leaves (zero fill, a partial header) are Torn.
    let (mut bytes, ends) = segment(1, &[1]);
    bytes.extend_from_slice(&[0; 300]);
    let scan = scan_frames(&bytes, 1, false);
    assert_eq!(scan.valid_len as usize, ends[0]);
    assert!(matches!(scan.damage, Some((_, Damage::Torn(_)))));
    let (two, _) = segment(1, &[1, 1]);
    let partial = &two[..ends[0] + 10];
    assert!(matches!(
        scan_frames(partial, 1, false).damage,
        Some((_, Damage::Torn(_)))
    ));
}

#[test]
fn a_later_intact_frame_is_found_past_damage() {
    // Proves recovery can see that a write followed a damaged one (so the damage is not in
    // the final write), and that no later frame means none is found.
    let (bytes, ends) = segment(1, &[2, 2, 2]);
    let mut bad = bytes.clone();
    bad[ends[0] + 40] ^= 0x01;
    assert_eq!(find_frame_after(&bad, ends[0], 3), Some(ends[1]));
    assert_eq!(find_frame_after(&bad, ends[1], 6), None);
}

#[test]
fn headers_and_manifests_round_trip_and_refuse_damage() {
    // Proves segment headers and manifests decode what they encode and refuse flips, other
    // formats and foreign files.
    let h = SegmentHeader {
        shard: 2,
        segment: 9,
        first_lsn: 77,
    };
    assert_eq!(SegmentHeader::decode(&h.encode()), Ok(h));
    let m = Manifest {
        shard: 2,
        oldest: 4,
        newest: 9,
        term: 5,
        vote: 3,
        commit: 40,
        base_term: 2,
    };
    assert_eq!(Manifest::decode(&m.encode()), Ok(m));
    for i in 0..SEGMENT_HEADER_BYTES {
        let mut b = h.encode();
        b[i] ^= 0x04;
        assert!(SegmentHeader::decode(&b).is_err(), "flip at {i}");
    }
    for i in 0..MANIFEST_BYTES {
        let mut b = m.encode();
        b[i] ^= 0x04;
        assert!(Manifest::decode(&b).is_err(), "flip at {i}");
    }
    // A format-3 manifest (36 bytes, no hard state) is refused by its format number.
    let mut old = m.encode()[..36].to_vec();
    old[8..12].copy_from_slice(&3u32.to_le_bytes());
    assert_eq!(Manifest::decode(&old), Err(HeaderError::Format(3)));
    for format in [3u32, 5] {
        // Format 3 (before the hard state) and a newer one are both refused, by number.
        let mut other = h.encode();
        other[8..12].copy_from_slice(&format.to_le_bytes());
        let crc = crc32c::crc32c(&other[..32]);
        other[32..36].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            SegmentHeader::decode(&other),
            Err(HeaderError::Format(format))
        );
        let msg = HeaderError::Format(format).to_string();
        assert!(msg.contains(&format!("WAL format {format}")), "{msg}");
    }
    assert!(matches!(
        SegmentHeader::decode(&[1u8; 40]),
        Err(HeaderError::Magic { .. })
    ));
}

#[test]
fn a_record_over_the_limit_is_refused_without_touching_the_buffer() {
    // Proves encode_record returns None (never panics) for a payload over RECORD_BYTES_MAX.
    let mut out = vec![1, 2, 3];
    let huge = Record::MeshCreated(MeshRec {
        mesh: "x".repeat(RECORD_BYTES_MAX + 1).into(),
    });
    assert_eq!(encode_record(1, 0, &huge, &mut out), None);
    assert_eq!(out, vec![1, 2, 3]);
}

#[test]
fn segment_names_round_trip() {
    // Proves segment file names sort numerically and parse back.
    assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
    assert!(segment_file_name(9) < segment_file_name(10));
    assert_eq!(parse_segment_file_name("42.wal"), None);
    assert_eq!(parse_segment_file_name("00000000000000000042.tmp"), None);
    assert!(!quarantine_file_name(1, 2).contains("wal"));
    assert!(!MANIFEST_FILE.contains("wal"));
}

#[test]
fn a_record_whose_term_goes_down_is_refused_by_the_scan() {
    // Proves terms never decrease along the log: a frame whose second record has a lower term
    // than its first is invalid (not torn: its checksums match), so recovery will not cut it.
    let (bytes, _) = segment_with_terms(1, &[2], |lsn| if lsn == 1 { 5 } else { 4 });
    let scan = scan_frames(&bytes, 1, false);
    match scan.damage {
        Some((_, Damage::Invalid(reason))) => assert!(reason.contains("term 4"), "{reason}"),
        other => panic!("a falling term was accepted: {other:?}"),
    }
    assert!(scan.records.is_empty(), "nothing of the frame is taken");
}

/// Appends one frame of `terms.len()` cursor records from `first_lsn`, each with its term.
fn push_frame(out: &mut Vec<u8>, first_lsn: u64, terms: &[u64], flags: u32) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    for (i, term) in terms.iter().enumerate() {
        let lsn = first_lsn + i as u64;
        encode_record(lsn, *term, &acked(lsn), out).expect("small record");
    }
    FrameHeader::seal_flags(&mut out[start..], first_lsn, terms.len() as u32, flags);
}

#[test]
fn a_rewind_frame_replaces_the_records_from_its_lsn_on() {
    // Proves a rewind frame drops the records it replaces (even of a lower term than theirs:
    // Raft may replace a newer-term uncommitted entry with an older-term committed one) and
    // the scan goes on from its last record.
    let (mut bytes, _) = segment_with_terms(10, &[4], |lsn| if lsn < 12 { 1 } else { 3 });
    push_frame(&mut bytes, 12, &[2, 4], FRAME_FLAG_REWIND);
    push_frame(&mut bytes, 14, &[4], 0);
    let scan = scan_frames(&bytes, 10, false);
    assert!(scan.damage.is_none(), "{:?}", scan.damage);
    let got: Vec<(u64, u64)> = scan.records.iter().map(|r| (r.lsn, r.term)).collect();
    assert_eq!(got, vec![(10, 1), (11, 1), (12, 2), (13, 4), (14, 4)]);
    assert_eq!(scan.rewound_to, Some(12));
    assert_eq!(scan.valid_len, bytes.len() as u64);
}

#[test]
fn a_rewind_frame_below_the_segment_is_reported_and_terms_still_may_not_fall() {
    // Proves a rewind reaching into earlier segments is reported (recovery drops those
    // records), and a rewind's records still may not fall below the term before them.
    let (mut bytes, _) = segment_with_terms(20, &[2], |_| 5);
    push_frame(&mut bytes, 18, &[6], FRAME_FLAG_REWIND);
    let scan = scan_frames(&bytes, 20, false);
    assert!(scan.damage.is_none(), "{:?}", scan.damage);
    assert_eq!(scan.rewound_to, Some(18));
    let got: Vec<u64> = scan.records.iter().map(|r| r.lsn).collect();
    assert_eq!(got, vec![18]);
    let (mut bytes, _) = segment_with_terms(20, &[2], |_| 5);
    push_frame(&mut bytes, 21, &[4], FRAME_FLAG_REWIND);
    let scan = scan_frames(&bytes, 20, false);
    assert!(matches!(scan.damage, Some((_, Damage::Invalid(_)))));
}

#[test]
fn a_rewind_frame_past_the_log_or_empty_or_with_unknown_flags_is_refused() {
    // Proves a rewind may not skip ahead or carry no record, and a frame with an unknown flag
    // bit does not decode: corruption of these fields is never taken as a rewind.
    for (first, terms, flags) in [
        (13u64, vec![1u64], FRAME_FLAG_REWIND),
        (11, vec![], FRAME_FLAG_REWIND),
    ] {
        let (mut bytes, _) = segment_with_terms(10, &[2], |_| 1);
        push_frame(&mut bytes, first, &terms, flags);
        let scan = scan_frames(&bytes, 10, false);
        assert!(
            matches!(scan.damage, Some((_, Damage::Invalid(_)))),
            "{first} {terms:?}"
        );
        assert_eq!(scan.records.len(), 2);
    }
    let (mut bytes, ends) = segment_with_terms(10, &[2], |_| 1);
    push_frame(&mut bytes, 12, &[1], 2);
    let scan = scan_frames(&bytes, 10, false);
    assert_eq!(scan.damage.as_ref().map(|d| d.0), Some(ends[0] as u64));
}
