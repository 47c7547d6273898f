//! Property tests of the WAL readers: no bytes make the scanner, the header decoders or
//! recovery panic (arbitrary bytes, a valid header over garbage, frames and records whose CRCs
//! are right but whose contents are anything); valid records of every type round-trip through
//! segments and recovery; and no damage to a valid segment ever yields a record that differs
//! from the one written (the CRCs are checked, never bypassed). proptest draws a new seed each
//! run and prints the smallest failing input; `PROPTEST_RNG_SEED=N` replays one.

use fabric_proto::{Body, Target};
use fabric_shard::record::*;
use fabric_shard::recovery::Recoverer;
use fabric_shard::store::{self, mem::MemStore, SegmentStore};
use fabric_shard::wal::{self, Damage, FrameHeader, Manifest, SegmentHeader};
use fabric_shard::ShardConfig;
use proptest::prelude::*;
use std::sync::Arc;

const KNOWN_TYPES: [RecordType; 7] = [
    RecordType::MeshCreated,
    RecordType::PeerAdded,
    RecordType::Sent,
    RecordType::Appended,
    RecordType::Acked,
    RecordType::PeerKeyAdded,
    RecordType::CheckpointPart,
];

fn text() -> impl Strategy<Value = Arc<str>> {
    prop_oneof!["[a-z]{1,6}", any::<String>()].prop_map(Into::into)
}

fn texts() -> impl Strategy<Value = Vec<Arc<str>>> {
    prop::collection::vec(text(), 0..4)
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        // Targets hold validated ids (a WAL record with an invalid one does not decode).
        "[a-z]{1,6}".prop_map(|s| Target::Peer(fabric_proto::PeerId::must(&s))),
        "[a-z]{1,6}".prop_map(|s| Target::Group(fabric_proto::GroupId::must(&s))),
        Just(Target::All),
    ]
}

/// Any bytes: the WAL keeps bodies as they were validated, and must keep whatever it holds.
fn body() -> impl Strategy<Value = Body> {
    prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| Body::from_trusted(b.into()))
}

fn peer_checkpoint() -> impl Strategy<Value = PeerCheckpoint> {
    (
        text(),
        texts(),
        any::<Option<[u8; 32]>>(),
        any::<Option<[u8; 32]>>(),
        any::<u64>(),
    )
        .prop_map(
            |(peer, groups, token_hash, public_key, acked)| PeerCheckpoint {
                peer,
                groups,
                token_hash,
                public_key,
                acked,
            },
        )
}

/// A record of any type with any field values (recovery does not validate ids: the shard
/// did before writing them).
// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        text().prop_map(|mesh| Record::MeshCreated(MeshRec { mesh })),
        (text(), text(), texts(), any::<[u8; 32]>()).prop_map(
            |(mesh, peer, groups, token_hash)| Record::PeerAdded(PeerRec {
                mesh,
                peer,
                groups,
                token_hash,
            })
        ),
        (
            text(),
            any::<u64>(),
            text(),
            target(),
            body(),
            any::<u64>(),
            proptest::option::of(text())
        )
            .prop_map(
                |(mesh, pos, from, to, body, ts, key)| Record::Sent(SentRec {
                    mesh,
                    pos,
                    from,
                    to,
                    body,
                    ts,
                    key,
                })
            ),
        (
            text(),
            text(),
            any::<u64>(),
            text(),
            body(),
            prop::option::of(text()),
            any::<u64>()
        )
            .prop_map(|(mesh, conv, seq, from, body, key, ts)| {
                Record::Appended(AppendedRec {
                    mesh,
                    conv,
                    seq,
                    from,
                    body,
                    key,
                    ts,
                })
            }),
        (text(), text(), any::<u64>()).prop_map(|(mesh, peer, upto)| Record::Acked(AckedRec {
            mesh,
            peer,
            upto
        })),
        (
            text(),
            text(),
            texts(),
            any::<Option<[u8; 32]>>(),
            any::<[u8; 32]>()
        )
            .prop_map(|(mesh, peer, groups, token_hash, public_key)| {
                Record::PeerKeyAdded(PeerKeyRec {
                    mesh,
                    peer,
                    groups,
                    token_hash,
                    public_key,
                })
            }),
        (
            any::<u32>(),
            any::<u32>(),
            prop::collection::vec(
                (
                    text(),
                    any::<u64>(),
                    prop::collection::vec(peer_checkpoint(), 0..3)
                ),
                0..3
            ),
            prop::collection::vec((text(), text(), any::<u64>()), 0..3),
        )
            .prop_map(|(part, parts, meshes, convs)| {
                Record::CheckpointPart(CheckpointPartRec {
                    part,
                    parts,
                    meshes: meshes
                        .into_iter()
                        .map(|(mesh, head, peers)| MeshCheckpoint { mesh, head, peers })
                        .collect(),
                    convs: convs
                        .into_iter()
                        .map(|(mesh, conv, head)| ConvCheckpoint { mesh, conv, head })
                        .collect(),
                })
            }),
    ]
}

/// Records cut into write frames: each inner list is one frame of at least one record.
fn frames() -> impl Strategy<Value = Vec<Vec<Record>>> {
    prop::collection::vec(prop::collection::vec(record(), 1..4), 1..5)
}

/// A segment of `frames`, its first record at `first_lsn`, and where each frame starts and
/// ends.
fn segment(id: u64, first_lsn: u64, frames: &[Vec<Record>]) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut out = SegmentHeader {
        shard: 0,
        segment: id,
        first_lsn,
    }
    .encode()
    .to_vec();
    let mut spans = Vec::new();
    let mut lsn = first_lsn;
    for frame in frames {
        let start = out.len();
        out.extend_from_slice(&[0; wal::FRAME_HEADER_BYTES]);
        for r in frame {
            wal::encode_record(lsn, 0, r, &mut out).expect("small record");
            lsn += 1;
        }
        FrameHeader::seal(
            &mut out[start..],
            lsn - frame.len() as u64,
            frame.len() as u32,
        );
        spans.push((start, out.len()));
    }
    (out, spans)
}

/// A store holding `bytes` as segment 1, listed by the manifest, all durable.
fn store_with(bytes: &[u8]) -> MemStore {
    let mut disk = MemStore::new(0);
    disk.create_segment(1).unwrap();
    disk.append(1, bytes).unwrap();
    disk.sync(1).unwrap();
    let manifest = Manifest {
        oldest: 1,
        newest: 1,
        ..Manifest::empty(0)
    };
    disk.write_manifest_temp(&manifest.encode()).unwrap();
    disk.rename_manifest().unwrap();
    disk.sync_dir().unwrap();
    disk
}

/// Every reader of WAL bytes, fed `bytes` as a segment, a header, a frame and a payload; then
/// recovery of it as the newest and as an older segment, pure and through the store. Only
/// panics matter here.
fn read_everything(bytes: &[u8], lsn: u64, at: usize) {
    let _ = SegmentHeader::decode(bytes);
    let _ = Manifest::decode(bytes);
    let _ = FrameHeader::decode(bytes);
    let _ = wal::scan_frames(bytes, lsn, false);
    let _ = wal::scan_frames_at(bytes, at);
    let _ = wal::find_frame_after(bytes, at, lsn);
    for kind in KNOWN_TYPES {
        let _ = Record::decode(kind, bytes);
    }
    for newest in [true, false] {
        let mut r = Recoverer::new(ShardConfig::default());
        if r.handle_segment(1, "segment 1", bytes, newest).is_ok() {
            let _ = r.finish(Manifest {
                oldest: 1,
                newest: 1,
                ..Manifest::empty(0)
            });
        }
    }
    let _ = store::recover(&mut store_with(bytes), ShardConfig::default());
}

/// Seals a frame header over `records` bytes with any fields (a correct CRC over them).
fn checksummed_frame_header(len: u32, first_lsn: u64, records: u32, flags: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(wal::FRAME_HEADER_BYTES);
    h.extend_from_slice(&wal::FRAME_MAGIC);
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&first_lsn.to_le_bytes());
    h.extend_from_slice(&records.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// A record with a correct CRC over any type byte, LSN and payload, and a length that is the
/// payload's or any other.
fn checksummed_record(kind: u8, lsn: u64, payload: &[u8], len: Option<u32>) -> Vec<u8> {
    let mut covered = vec![kind];
    covered.extend_from_slice(&lsn.to_le_bytes());
    covered.extend_from_slice(payload);
    let mut r = len.unwrap_or(payload.len() as u32).to_le_bytes().to_vec();
    r.extend_from_slice(&crc32c::crc32c(&covered).to_le_bytes());
    r.extend_from_slice(&covered);
    r
}

/// A record as the generator may damage it: type byte, LSN, payload, length override.
type RawRecord = (u8, u64, Vec<u8>, Option<u32>);

fn raw_record() -> impl Strategy<Value = RawRecord> {
    (
        prop_oneof![
            any::<u8>(),
            prop::sample::select(vec![1u8, 2, 3, 4, 5, 7, 9])
        ],
        prop_oneof![1u64..4, any::<u64>()],
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..80),
            record().prop_map(|r| {
                let mut out = Vec::new();
                r.encode_into(&mut out);
                out
            }),
        ],
        prop::option::weighted(0.1, any::<u32>()),
    )
}

#[test]
fn a_checksummed_frame_header_naming_four_billion_records_is_damage_not_an_abort() {
    // Proves the scanner does not trust a frame header's record count for an allocation: a
    // 28-byte header with a correct CRC that names u32::MAX records over no bytes once
    // aborted the process (allocation failure); it is torn damage at that frame.
    let mut bytes = SegmentHeader {
        shard: 0,
        segment: 1,
        first_lsn: 1,
    }
    .encode()
    .to_vec();
    bytes.extend(checksummed_frame_header(0, 1, u32::MAX, 0));
    let scan = wal::scan_frames(&bytes, 1, false);
    assert!(scan.records.is_empty());
    assert!(
        matches!(&scan.damage, Some((36, Damage::Torn(r))) if r.contains("4294967295")),
        "{:?}",
        scan.damage
    );
    let (_, report) = store::recover(&mut store_with(&bytes), ShardConfig::default())
        .expect("the final write is cut");
    assert_eq!(report.cut.map(|c| c.offset), Some(36));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn arbitrary_bytes_never_panic_a_wal_reader(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        lsn in any::<u64>(),
        at in 0usize..700,
    ) {
        // Proves the header decoders, the scanner, the frame finder, every payload decoder and
        // recovery return a result, never a panic, on any bytes at all.
        read_everything(&bytes, lsn, at);
    }

    #[test]
    fn a_valid_header_over_arbitrary_bytes_never_panics_a_wal_reader(
        first_lsn in prop_oneof![1u64..10, any::<u64>()],
        tail in prop::collection::vec(any::<u8>(), 0..600),
        at in 0usize..700,
    ) {
        // Proves a segment whose header is intact but whose frames are garbage (the bytes a
        // reader gets furthest with) is answered with damage or a refusal, never a panic.
        let mut bytes = SegmentHeader { shard: 0, segment: 1, first_lsn }.encode().to_vec();
        bytes.extend(tail);
        read_everything(&bytes, first_lsn, at);
    }

    #[test]
    fn checksummed_frames_of_anything_never_panic_a_wal_reader(
        first_lsn in prop_oneof![Just(1u64), any::<u64>()],
        records in prop_oneof![Just(None), any::<u32>().prop_map(Some), (0u32..4).prop_map(Some)],
        len in prop::option::weighted(0.2, any::<u32>()),
        flags in prop::option::weighted(0.1, any::<u32>()),
        raw in prop::collection::vec(raw_record(), 0..4),
        after in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        // Proves frames and records whose CRCs are right but whose fields are anything (record
        // counts up to 2^32, lengths past the frame, unknown types, LSNs out of sequence,
        // payloads that do not decode) are damage or a refusal, never a panic or an abort.
        let mut body = Vec::new();
        for (kind, lsn, payload, len) in &raw {
            body.extend(checksummed_record(*kind, *lsn, payload, *len));
        }
        let mut bytes = SegmentHeader { shard: 0, segment: 1, first_lsn: 1 }.encode().to_vec();
        bytes.extend(checksummed_frame_header(
            len.unwrap_or(body.len() as u32),
            first_lsn,
            records.unwrap_or(raw.len() as u32),
            flags.unwrap_or(0),
        ));
        bytes.extend(body);
        bytes.extend(after);
        read_everything(&bytes, 1, wal::SEGMENT_HEADER_BYTES);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn valid_records_round_trip_through_segments_and_recovery(
        first_lsn in prop_oneof![Just(1u64), 1u64..1_000_000],
        frames in frames(),
    ) {
        // Proves records of every type, with any field values, framed into writes, scan back
        // as themselves at dense LSNs, and a store holding them recovers every one.
        let (bytes, spans) = segment(1, first_lsn, &frames);
        let scan = wal::scan_frames(&bytes, first_lsn, false);
        prop_assert!(scan.damage.is_none(), "{:?}", scan.damage);
        prop_assert_eq!(scan.frames, frames.len() as u64);
        prop_assert_eq!(scan.valid_len, bytes.len() as u64);
        let want: Vec<&Record> = frames.iter().flatten().collect();
        let got: Vec<&Record> = scan.records.iter().map(|s| &s.record).collect();
        prop_assert_eq!(got, want);
        for (i, s) in scan.records.iter().enumerate() {
            prop_assert_eq!(s.lsn, first_lsn + i as u64);
        }
        prop_assert_eq!(spans.last().map(|s| s.1), Some(bytes.len()));
        let (shard, report) = store::recover(&mut store_with(&bytes), ShardConfig::default())
            .expect("valid segment recovers");
        prop_assert_eq!(report.records, want_len(&frames));
        prop_assert_eq!(report.cut, None);
        prop_assert_eq!(shard.durable_lsn(), first_lsn + want_len(&frames) - 1);
    }

    #[test]
    fn a_damaged_segment_never_yields_a_record_that_was_not_written(
        frames in frames(),
        hits in prop::collection::vec(
            (any::<prop::sample::Index>(), prop_oneof![
                (0u8..8).prop_map(|bit| (true, 1u8 << bit)),
                any::<u8>().prop_map(|b| (false, b)),
            ]),
            1..4,
        ),
    ) {
        // Proves bit flips or overwritten bytes anywhere in a valid segment are caught by a
        // CRC: the segment header is refused, or the scanner keeps exactly the frames before
        // the first damaged one, with their records unaltered, and reports damage where that
        // frame starts; recovery then cuts there or refuses, and never applies more.
        let (clean, spans) = segment(1, 1, &frames);
        let mut bytes = clean.clone();
        for (index, (flip, b)) in &hits {
            let i = index.index(bytes.len());
            if *flip {
                bytes[i] ^= b;
            } else {
                bytes[i] = *b;
            }
        }
        let Some(first) = (0..bytes.len()).find(|i| bytes[*i] != clean[*i]) else {
            return Ok(()); // every overwrite wrote the byte that was there
        };
        if first < wal::SEGMENT_HEADER_BYTES {
            prop_assert!(SegmentHeader::decode(&bytes).is_err());
            prop_assert!(store::recover(&mut store_with(&bytes), ShardConfig::default()).is_err());
            return Ok(());
        }
        let hit = spans.iter().position(|(s, e)| (*s..*e).contains(&first)).expect("in a frame");
        let kept: Vec<&Record> = frames[..hit].iter().flatten().collect();
        let scan = wal::scan_frames(&bytes, 1, false);
        let got: Vec<&Record> = scan.records.iter().map(|s| &s.record).collect();
        prop_assert_eq!(got, kept.clone());
        prop_assert_eq!(scan.damage.as_ref().map(|d| d.0), Some(spans[hit].0 as u64));
        prop_assert_eq!(scan.valid_len, spans[hit].0 as u64);
        if let Ok((shard, report)) = store::recover(&mut store_with(&bytes), ShardConfig::default()) {
            prop_assert_eq!(report.records, kept.len() as u64);
            prop_assert_eq!(report.cut.map(|c| c.offset), Some(spans[hit].0 as u64));
            prop_assert_eq!(shard.durable_lsn(), kept.len() as u64);
        }
    }

    #[test]
    fn a_record_or_frame_with_any_other_crc_is_never_accepted(
        frames in frames(),
        which in any::<prop::sample::Index>(),
        frame_crc in any::<bool>(),
        crc in any::<u32>(),
    ) {
        // Proves that replacing one record's CRC, or one frame header's, by any other value
        // makes the scanner refuse that frame and keep only the frames before it.
        let (clean, spans) = segment(1, 1, &frames);
        let hit = which.index(frames.len());
        let at = if frame_crc {
            spans[hit].0 + wal::FRAME_HEADER_BYTES - 4
        } else {
            let scan = wal::scan_frames(&clean, 1, false);
            let first_of_hit: usize = frames[..hit].iter().map(Vec::len).sum();
            let k = first_of_hit + which.index(frames[hit].len());
            scan.records[k].offset as usize + 4
        };
        let mut bytes = clean.clone();
        bytes[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        prop_assume!(bytes != clean);
        let scan = wal::scan_frames(&bytes, 1, false);
        let kept: Vec<&Record> = frames[..hit].iter().flatten().collect();
        let got: Vec<&Record> = scan.records.iter().map(|s| &s.record).collect();
        prop_assert_eq!(got, kept);
        prop_assert!(
            matches!(&scan.damage, Some((d, Damage::Torn(_))) if *d == spans[hit].0 as u64),
            "{:?}",
            scan.damage
        );
    }
}

fn want_len(frames: &[Vec<Record>]) -> u64 {
    frames.iter().map(Vec::len).sum::<usize>() as u64
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn checking_a_payload_agrees_with_decoding_it(
        rec in record(),
        damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        cut in prop::option::of(any::<prop::sample::Index>()),
        extra in prop::collection::vec(any::<u8>(), 0..3),
        as_kind in prop::sample::select(KNOWN_TYPES.to_vec()),
    ) {
        // Proves Record::decodes (a follower's check of a leader's entries, borrowing instead
        // of copying) accepts exactly what Record::decode accepts: valid payloads of every
        // type, and the same payloads with bytes changed, cut short, extended, or read as
        // another type.
        let mut bytes = Vec::new();
        let kind = rec.encode_into(&mut bytes);
        prop_assert!(Record::decodes(kind, &bytes));
        for (at, b) in &damage {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = *b;
            }
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len() + 1));
        }
        bytes.extend_from_slice(&extra);
        for k in [kind, as_kind] {
            prop_assert_eq!(Record::decodes(k, &bytes), Record::decode(k, &bytes).is_ok());
        }
    }
}
