//! Golden bytes of the WAL on disk (format 4): a whole segment holding every record type, in
//! `tests/golden/segment-format4.hex` (annotated field by field), and the manifest. The bytes
//! were written from the layout in `wal.rs`'s module docs and postcard's rules by an encoder
//! separate from this crate (its own CRC32C included), never produced by the code under test.
//! Reordering a record's fields, renumbering a record type or moving a header field fails here.
//!
//! Coverage: [`record_type`] matches every [`Record`] variant without a `_` arm (a new record
//! does not compile until it gets its type byte here), and
//! `golden_cases_cover_every_record_type` fails until the golden segment holds a record of
//! every type byte the scanner accepts.

use fabric_proto::GroupId;
use fabric_proto::{Body, Target};
use fabric_shard::record::*;
use fabric_shard::store::{self, mem::MemStore, SegmentStore};
use fabric_shard::wal::{self, FrameHeader, Manifest, SegmentHeader};
use fabric_shard::ShardConfig;
use std::collections::BTreeSet;

/// The annotated hex file: two hex digits per byte, `#` starts a comment.
const SEGMENT_HEX: &str = include_str!("golden/segment-format4.hex");

fn unhex(text: &str) -> Vec<u8> {
    text.lines()
        .flat_map(|line| line.split('#').next().unwrap_or("").split_whitespace())
        .map(|b| u8::from_str_radix(b, 16).expect("two hex digits"))
        .collect()
}

fn segment_bytes() -> Vec<u8> {
    unhex(SEGMENT_HEX)
}

/// The type byte of each record variant, as the format names it. No `_` arm.
fn record_type(r: &Record) -> u8 {
    match r {
        Record::MeshCreated(_) => 1,
        Record::PeerAdded(_) => 2,
        Record::Sent(_) => 3,
        Record::Appended(_) => 4,
        Record::Acked(_) => 5,
        Record::PeerKeyAdded(_) => 7,
        Record::CheckpointPart(_) => 9,
        Record::Noop => 10,
        Record::ConfChange(_) => 11,
        Record::Retired(_) => 12,
    }
}

/// The records of the golden segment, with their LSN, byte offset and framed size.
// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
fn golden_records() -> Vec<(u64, u64, u64, Record)> {
    let body = |s: &str| Body::from_trusted(bytes::Bytes::copy_from_slice(s.as_bytes()));
    vec![
        (
            1,
            64,
            30,
            Record::MeshCreated(MeshRec {
                mesh: "demo".into(),
            }),
        ),
        (
            2,
            94,
            73,
            Record::PeerAdded(PeerRec {
                mesh: "demo".into(),
                peer: "alice".into(),
                groups: vec!["ops".into()],
                token_hash: [0x11; 32],
            }),
        ),
        (
            3,
            167,
            68,
            Record::PeerKeyAdded(PeerKeyRec {
                mesh: "demo".into(),
                peer: "bob".into(),
                groups: vec![],
                token_hash: None,
                public_key: [0x22; 32],
            }),
        ),
        (
            4,
            263,
            73,
            Record::Sent(SentRec {
                mesh: "demo".into(),
                pos: 300,
                from: "alice".into(),
                to: Target::Group(GroupId::must("ops")),
                body: body(r#"{"text":"hi"}"#),
                ts: 1_795_356_091_730,
                key: Some("alice-s1".into()),
            }),
        ),
        (
            5,
            336,
            68,
            Record::Appended(AppendedRec {
                mesh: "demo".into(),
                conv: "standup".into(),
                seq: 1,
                from: "alice".into(),
                body: body(r#"{"n":1}"#),
                key: Some("alice-1".into()),
                ts: 1_795_356_091_771,
            }),
        ),
        (
            6,
            404,
            36,
            Record::Acked(AckedRec {
                mesh: "demo".into(),
                peer: "bob".into(),
                upto: 300,
            }),
        ),
        (
            7,
            468,
            138,
            Record::CheckpointPart(CheckpointPartRec {
                part: 0,
                parts: 2,
                meshes: vec![MeshCheckpoint {
                    mesh: "demo".into(),
                    head: 300,
                    peers: vec![
                        PeerCheckpoint {
                            peer: "alice".into(),
                            groups: vec!["ops".into()],
                            token_hash: Some([0x11; 32]),
                            public_key: None,
                            acked: 0,
                        },
                        PeerCheckpoint {
                            peer: "bob".into(),
                            groups: vec![],
                            token_hash: None,
                            public_key: Some([0x22; 32]),
                            acked: 300,
                        },
                    ],
                }],
                convs: vec![ConvCheckpoint {
                    mesh: "demo".into(),
                    conv: "standup".into(),
                    head: 1,
                }],
            }),
        ),
    ]
}

/// The term each record is written with (terms never decrease along the log).
fn term_of(lsn: u64) -> u64 {
    match lsn {
        1..=3 => 1,
        4..=6 => 2,
        _ => 3,
    }
}

/// Which records each write frame of the golden segment holds (indexes into the list above).
const FRAMES: [std::ops::Range<usize>; 3] = [0..3, 3..6, 6..7];

/// Where each frame starts in the golden segment.
const FRAME_OFFSETS: [usize; 3] = [36, 235, 440];

fn golden_header() -> SegmentHeader {
    SegmentHeader {
        shard: 3,
        segment: 7,
        first_lsn: 1,
    }
}

/// The segment as this crate writes it: header, then each frame reserved, filled, sealed.
fn written_segment() -> Vec<u8> {
    let records = golden_records();
    let mut out = golden_header().encode().to_vec();
    for range in FRAMES {
        let start = out.len();
        out.extend_from_slice(&[0; wal::FRAME_HEADER_BYTES]);
        for (lsn, _, _, record) in &records[range.clone()] {
            wal::encode_record(*lsn, term_of(*lsn), record, &mut out).expect("small record");
        }
        let first_lsn = records[range.start].0;
        FrameHeader::seal(&mut out[start..], first_lsn, range.len() as u32);
    }
    out
}

#[test]
fn golden_segment_header_has_the_pinned_bytes() {
    // Proves the segment header is magic, format, shard, segment, first LSN and CRC, as pinned.
    let golden = segment_bytes();
    assert_eq!(
        golden_header().encode()[..],
        golden[..wal::SEGMENT_HEADER_BYTES]
    );
    assert_eq!(SegmentHeader::decode(&golden), Ok(golden_header()));
    assert_eq!(wal::SEGMENT_HEADER_BYTES, 36);
    assert_eq!(&wal::SEGMENT_MAGIC[..], b"FABRWAL2");
    assert_eq!(wal::FORMAT, 4);
}

#[test]
fn golden_frame_headers_have_the_pinned_bytes() {
    // Proves each write frame's header (magic, length, first LSN, record count, flags, CRC) is
    // the pinned one, and decodes back to its fields.
    let golden = segment_bytes();
    let written = written_segment();
    let records = golden_records();
    let ends = [FRAME_OFFSETS[1], FRAME_OFFSETS[2], golden.len()];
    for (i, at) in FRAME_OFFSETS.iter().enumerate() {
        let header = &golden[*at..*at + wal::FRAME_HEADER_BYTES];
        assert_eq!(
            &written[*at..*at + wal::FRAME_HEADER_BYTES],
            header,
            "frame {i}"
        );
        assert_eq!(
            FrameHeader::decode(header),
            Some(FrameHeader {
                len: (ends[i] - at - wal::FRAME_HEADER_BYTES) as u32,
                first_lsn: records[FRAMES[i].start].0,
                records: FRAMES[i].len() as u32,
                flags: 0,
            }),
            "frame {i}"
        );
    }
    assert_eq!(wal::FRAME_MAGIC, [0xff, 0xfe, b'F', b'W']);
    assert_eq!(wal::FRAME_HEADER_BYTES, 28);
    assert_eq!(wal::RECORD_HEADER_BYTES, 25);
}

#[test]
fn golden_every_record_variant_frames_to_the_pinned_bytes() {
    // Proves each record type encodes (length, CRC, type, LSN, term, postcard payload) exactly as
    // pinned at its place in the golden segment, and decodes back from its payload.
    let golden = segment_bytes();
    for (lsn, offset, size, record) in golden_records() {
        let pinned = &golden[offset as usize..(offset + size) as usize];
        let mut out = Vec::new();
        assert_eq!(
            wal::encode_record(lsn, term_of(lsn), &record, &mut out),
            Some(size as usize)
        );
        assert_eq!(out, pinned, "{record:?}");
        assert_eq!(pinned[8], record_type(&record), "{record:?}");
        assert_eq!(pinned[9..17], lsn.to_le_bytes(), "{record:?}");
        assert_eq!(pinned[17..25], term_of(lsn).to_le_bytes(), "{record:?}");
        let kind = RecordType::from_u8(pinned[8]).expect("a known type");
        assert_eq!(kind, record.kind());
        assert_eq!(
            Record::decode(kind, &pinned[wal::RECORD_HEADER_BYTES..]).expect("decodes"),
            record
        );
    }
}

#[test]
fn golden_segment_is_written_byte_for_byte() {
    // Proves a segment written by this crate's framing is the pinned file, every byte of it.
    let golden = segment_bytes();
    let written = written_segment();
    assert_eq!(written.len(), golden.len());
    if let Some(i) = (0..golden.len()).find(|i| written[*i] != golden[*i]) {
        panic!(
            "first difference at byte {i}: wrote {:02x}, pinned {:02x}",
            written[i], golden[i]
        );
    }
}

#[test]
fn golden_segment_scans_back_to_its_records() {
    // Proves the scanner reads the pinned segment as its records, LSNs, offsets and frames.
    let golden = segment_bytes();
    let scan = wal::scan_frames(&golden, 1, false);
    assert!(scan.damage.is_none(), "{:?}", scan.damage);
    assert_eq!(scan.valid_len, golden.len() as u64);
    assert_eq!(scan.frames, 3);
    let want = golden_records();
    assert_eq!(scan.records.len(), want.len());
    for (got, (lsn, offset, size, record)) in scan.records.iter().zip(want) {
        assert_eq!(
            (got.lsn, got.term, got.offset, got.bytes, &got.record),
            (lsn, term_of(lsn), offset, size, &record)
        );
    }
}

#[test]
fn golden_manifest_has_the_pinned_bytes() {
    // Proves MANIFEST is magic, format, shard, oldest, newest, the hard state (term, vote,
    // commit hint, base term) and CRC, as pinned, also empty.
    let listed = Manifest {
        shard: 3,
        oldest: 7,
        newest: 7,
        term: 5,
        vote: 2,
        commit: 9,
        base_term: 4,
    };
    let pinned = unhex(
        "46 41 42 52 4d 41 4e 49  04 00 00 00  03 00 00 00  07 00 00 00 00 00 00 00 \
         07 00 00 00 00 00 00 00  05 00 00 00 00 00 00 00  02 00 00 00 00 00 00 00 \
         09 00 00 00 00 00 00 00  04 00 00 00 00 00 00 00  6f 12 bd e7",
    );
    assert_eq!(listed.encode()[..], pinned[..]);
    assert_eq!(Manifest::decode(&pinned), Ok(listed));
    let empty = unhex(
        "46 41 42 52 4d 41 4e 49  04 00 00 00  03 00 00 00  00 00 00 00 00 00 00 00 \
         00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 \
         00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  fe 07 40 49",
    );
    assert_eq!(Manifest::empty(3).encode()[..], empty[..]);
    assert_eq!(Manifest::decode(&empty), Ok(Manifest::empty(3)));
    assert_eq!(wal::MANIFEST_BYTES, 68);
    assert_eq!(wal::segment_file_name(7), "00000000000000000007.wal");
}

#[test]
fn golden_segment_recovers_through_the_store() {
    // Proves recovery reads the pinned files (MANIFEST and segment 7) into the shard they
    // describe: every record applied, nothing cut, the mesh's head and peers rebuilt.
    let mut disk = MemStore::new(3);
    disk.create_segment(7).unwrap();
    disk.append(7, &segment_bytes()).unwrap();
    disk.sync(7).unwrap();
    disk.write_manifest_temp(
        &Manifest {
            oldest: 7,
            newest: 7,
            ..Manifest::empty(3)
        }
        .encode(),
    )
    .unwrap();
    disk.rename_manifest().unwrap();
    disk.sync_dir().unwrap();
    disk.crash();
    let config = ShardConfig {
        shard: 3,
        ..ShardConfig::default()
    };
    let (shard, report) = store::recover(&mut disk, config).expect("the golden segment recovers");
    assert_eq!(report.records, 7);
    assert_eq!(report.segments, 1);
    assert_eq!(report.cut, None);
    assert_eq!(shard.durable_lsn(), 7);
    assert_eq!(shard.wal_bytes(), segment_bytes().len() as u64);
    assert_eq!(shard.conversation_count(), 1);
    let mesh = shard.mesh_stats("demo", 100).expect("mesh demo exists");
    assert_eq!((mesh.durable_pos, mesh.peers), (300, 2));
}

#[test]
fn golden_cases_cover_every_record_type() {
    // Proves the golden segment holds a record of every type byte the scanner accepts, and
    // that those are exactly the bytes `record_type` lists.
    // A replica's own records (10, 11, 12) are pinned by
    // `golden_raft_records_have_the_pinned_bytes`.
    let raft = BTreeSet::from([10, 11, 12]);
    let covered: BTreeSet<u8> = golden_records()
        .iter()
        .map(|(_, _, _, r)| record_type(r))
        .collect();
    let known: BTreeSet<u8> = (0..=255u8)
        .filter(|b| RecordType::from_u8(*b).is_some() && !raft.contains(b))
        .collect();
    assert_eq!(covered, known);
    assert_eq!(known, BTreeSet::from([1, 2, 3, 4, 5, 7, 9]));
    let golden = segment_bytes();
    let in_file: BTreeSet<u8> = golden_records()
        .iter()
        .map(|(_, offset, _, _)| golden[*offset as usize + 8])
        .collect();
    assert_eq!(in_file, known);
}

#[test]
fn golden_raft_records_have_the_pinned_bytes() {
    // Proves a leader's no-op (empty payload), a membership change (tag and node id, 9 bytes)
    // and a retired mark (postcard varint) frame to the pinned bytes and decode back.
    let noop =
        unhex("00 00 00 00  16 4f aa 37  0a  05 00 00 00 00 00 00 00  02 00 00 00 00 00 00 00");
    let learner = unhex(
        "09 00 00 00  db 56 ad 40  0b  06 00 00 00 00 00 00 00  02 00 00 00 00 00 00 00 \
         01  04 00 00 00 00 00 00 00",
    );
    let retired = unhex(
        "02 00 00 00  2c 3f 93 88  0c  07 00 00 00 00 00 00 00  02 00 00 00 00 00 00 00 \
         ac 02",
    );
    let cc = Record::ConfChange(fabric_shard::raft::ConfChange::AddLearner(4));
    let below = Record::Retired(fabric_shard::record::RetiredRec { below: 300 });
    let cases = [
        (5, Record::Noop, noop),
        (6, cc, learner),
        (7, below, retired),
    ];
    for (lsn, record, pinned) in cases {
        let mut out = Vec::new();
        assert_eq!(
            wal::encode_record(lsn, 2, &record, &mut out),
            Some(pinned.len())
        );
        assert_eq!(out, pinned, "{record:?}");
        assert_eq!(pinned[8], record_type(&record));
        let kind = RecordType::from_u8(pinned[8]).expect("a known type");
        let payload = &pinned[wal::RECORD_HEADER_BYTES..];
        assert_eq!(Record::decode(kind, payload).expect("decodes"), record);
    }
}
