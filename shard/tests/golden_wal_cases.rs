//! One record of every `Record` variant, for the WAL golden test (`record_variant` is an
//! exhaustive match: a new variant does not compile until it gets a case).

#![allow(dead_code)]

use fabric_proto::{Body, Target};
use fabric_shard::record::*;

pub fn record_variant(r: &Record) -> usize {
    match r {
        Record::MeshCreated(_) => 0,
        Record::PeerAdded(_) => 1,
        Record::Sent(_) => 2,
        Record::Appended(_) => 3,
        Record::Acked(_) => 4,
        Record::PeerKeyAdded(_) => 5,
        Record::CheckpointPart(_) => 6,
    }
}
pub const RECORD_VARIANTS: usize = 7;

pub fn records() -> Vec<Record> {
    let body = |t: &str| Body::from_json_text(t.to_string()).expect("a body");
    vec![
        Record::MeshCreated(MeshRec { mesh: "m".into() }),
        Record::PeerAdded(PeerRec {
            mesh: "m".into(),
            peer: "a".into(),
            groups: vec!["g".into()],
            token_hash: [1; 32],
        }),
        Record::Sent(SentRec {
            mesh: "m".into(),
            pos: 5,
            from: "a".into(),
            to: Target::Group("g".into()),
            body: body("1"),
            ts: 1_700_000_000_000,
        }),
        Record::Appended(AppendedRec {
            mesh: "m".into(),
            conv: "c".into(),
            seq: 3,
            from: "a".into(),
            body: body("\"x\""),
            key: Some("k".into()),
            ts: 1_700_000_000_001,
        }),
        Record::Acked(AckedRec {
            mesh: "m".into(),
            peer: "a".into(),
            upto: 300,
        }),
        Record::PeerKeyAdded(PeerKeyRec {
            mesh: "m".into(),
            peer: "b".into(),
            groups: vec![],
            token_hash: None,
            public_key: [2; 32],
        }),
        Record::CheckpointPart(CheckpointPartRec {
            part: 0,
            parts: 1,
            meshes: vec![MeshCheckpoint {
                mesh: "m".into(),
                head: 9,
                peers: vec![PeerCheckpoint {
                    peer: "a".into(),
                    groups: vec!["g".into()],
                    token_hash: Some([3; 32]),
                    public_key: None,
                    acked: 4,
                }],
            }],
            convs: vec![ConvCheckpoint {
                mesh: "m".into(),
                conv: "c".into(),
                head: 3,
            }],
        }),
    ]
}
