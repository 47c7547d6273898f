//! Property tests of the shard's disk reads: whatever bytes a read returns (bit flips,
//! truncations, garbage, records of other conversations), the shard never panics and never
//! answers with an entry that differs from the one written: it answers correctly, retries,
//! or fails (and waits for its host to recover it).

use fabric_proto::internal::{Reply, Request, ShardOp};
use fabric_proto::{Body, ConvId, MeshId, PeerId};
use fabric_shard::store::{self, mem::MemStore, SegmentStore};
use fabric_shard::{PlantedBugs, Shard, ShardConfig};
use proptest::prelude::*;

const ENTRIES: u64 = 30;

/// A shard whose cache keeps nothing durable, after `ENTRIES` appends to "c" (and some to
/// "d" between them), with the store holding its segments.
fn written() -> (Shard, MemStore) {
    let config = ShardConfig {
        log_cache_bytes_max: 0,
        log_read_bytes_max: 512,
        wal_segment_bytes_max: 2_000,
        ..ShardConfig::default()
    };
    let mut disk = MemStore::new(0);
    let mut shard = Shard::new(config);
    for i in 1..=ENTRIES {
        for conv in ["c", "d"] {
            let op = ShardOp::Append {
                r: i,
                mesh: MeshId::must("m"),
                conv: ConvId::must(conv),
                from: PeerId::must("a"),
                body: Body::from_json_text(format!("\"{conv}{i}\"")).unwrap(),
                key: None,
            };
            shard.handle_request(1, Request { session: 1, op });
        }
        while let Some(w) = shard.poll_wal() {
            store::perform(&mut disk, &w, &PlantedBugs::default()).unwrap();
            shard.handle_wal_done(1, w.last_lsn);
        }
        while shard.poll_output().is_some() {}
    }
    (shard, disk)
}

fn read_all(shard: &mut Shard) {
    let op = ShardOp::Read {
        r: 9,
        mesh: MeshId::must("m"),
        conv: ConvId::must("c"),
        from: 1,
        limit: 1000,
        local: false,
    };
    shard.handle_request(2, Request { session: 2, op });
}

/// Damage applied to what a read returns.
#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Cut(usize),
    Garbage(Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, m)| Damage::Flip(i, m)),
        any::<usize>().prop_map(Damage::Cut),
        proptest::collection::vec(any::<u8>(), 0..600).prop_map(Damage::Garbage),
    ]
}

fn apply(d: &Damage, mut bytes: Vec<u8>) -> Vec<u8> {
    match d {
        Damage::Flip(i, m) if !bytes.is_empty() => {
            let n = bytes.len();
            bytes[i % n] ^= m;
            bytes
        }
        Damage::Flip(..) => bytes,
        Damage::Cut(i) => {
            bytes.truncate(i % (bytes.len() + 1));
            bytes
        }
        Damage::Garbage(g) => g.clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn damaged_reads_never_panic_and_never_serve_a_wrong_entry(
        damages in proptest::collection::vec(damage(), 1..6)
    ) {
        // Proves a read's bytes are never trusted: each read in turn is damaged (the rest
        // are served intact), and every entry of the answer, if there is one, is the one
        // written, in order from seq 1; otherwise the shard has failed.
        let (mut shard, mut disk) = written();
        read_all(&mut shard);
        let mut answer = None;
        for n in 0..200 {
            while let Some(o) = shard.poll_output() {
                if let Reply::Messages { events, .. } = o.reply {
                    answer = Some(events);
                }
            }
            let Some(rq) = shard.poll_reads() else { break };
            let got = disk.read_at(rq.segment, rq.offset, rq.len);
            let got = match (damages.get(n), got) {
                (Some(d), Ok(b)) => Ok(apply(d, b)),
                (_, r) => r,
            };
            shard.handle_read_done(3, rq.id, got);
        }
        match answer {
            Some(events) => {
                for (i, e) in events.iter().enumerate() {
                    prop_assert_eq!(e.seq, i as u64 + 1);
                    prop_assert_eq!(e.body.as_str(), format!("\"c{}\"", e.seq));
                }
                prop_assert_eq!(events.len() as u64, ENTRIES);
            }
            None => prop_assert!(shard.is_failed(), "no answer and not failed"),
        }
    }
}
