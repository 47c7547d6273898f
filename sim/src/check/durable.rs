//! Checker 7's oracle: what the simulated disks hold *synced*, learned from the bytes
//! themselves, independent of the shard's own bookkeeping (its durable LSN, positions and
//! seqs). Each completed WAL write (written and fdatasynced) is scanned with the WAL's own
//! scanner (`fabric_shard::wal::scan_frames_at`), as is whatever a recovery kept and synced;
//! every `Sent` record makes its inbox position durable and every `Appended` record its
//! conversation seq, each naming the operation that wrote its body.
//!
//! The simulator then holds every frame a shard sends to this: an `ok` names a durable
//! position or seq of its own operation (also a keyed retry's), and a delivery, an event or a
//! read carries only durable entries, at the moment it leaves the shard.
//!
//! Synced data never changes (the disk model), so a position or seq, once durable, keeps its
//! operation for the rest of the run: a second durable record saying otherwise is checker 2's
//! violation. Records a crash lost were never synced, so the oracle never learned them and
//! their positions may be reused.

use super::{fail, Checked, Model, ViolationKind};
use fabric_shard::record::Record;
use fabric_shard::wal;
use std::collections::BTreeMap;
use std::sync::Arc;

/// An operation id in the dense position and seq tables: none yet.
const UNKNOWN: usize = usize::MAX;

/// What is durable, by inbox position and by conversation seq (the simulator's one mesh).
#[derive(Debug, Default)]
pub struct Durable {
    /// Position -> operation (`UNKNOWN` where nothing is durable yet).
    inbox: Vec<usize>,
    /// Conversation -> seq -> operation.
    convs: BTreeMap<Arc<str>, Vec<usize>>,
    /// Per shard, per segment: bytes from its start already scanned (all synced).
    scanned: Vec<BTreeMap<u64, usize>>,
}

impl Durable {
    pub fn new(shards: usize) -> Durable {
        Durable {
            scanned: vec![BTreeMap::new(); shards],
            ..Durable::default()
        }
    }

    /// The operation whose send is durable at `pos`.
    pub fn pos_op(&self, pos: u64) -> Option<usize> {
        lookup(&self.inbox, pos)
    }

    /// The operation whose append is durable at `seq` of `conv`.
    pub fn seq_op(&self, conv: &str, seq: u64) -> Option<usize> {
        self.convs.get(conv).and_then(|v| lookup(v, seq))
    }

    /// Segment `segment` of `shard` now holds `bytes`, all of them synced (a write to it
    /// completed, or a recovery kept and synced them): learns what was not scanned before.
    pub fn learn_segment(
        &mut self,
        model: &Model,
        shard: usize,
        segment: u64,
        bytes: &[u8],
    ) -> Checked {
        let from = self.scanned[shard].get(&segment).copied().unwrap_or(0);
        self.scanned[shard].insert(segment, bytes.len());
        if from >= bytes.len() {
            return Ok(());
        }
        let scan = wal::scan_frames_at(bytes, from);
        for r in &scan.records {
            self.learn_record(model, &r.record)?;
        }
        match scan.damage {
            None => Ok(()),
            Some((at, why)) => fail(
                ViolationKind::WrongRecord,
                format!(
                    "s{shard} segment {segment}: synced bytes from offset {at} do not scan as \
                     write frames ({why:?})"
                ),
            ),
        }
    }

    /// After a recovery that left every visible byte synced: learns what it kept (a crash's
    /// surviving tail, a failed write's bytes now synced) and forgets deleted segments.
    pub fn learn_disk(
        &mut self,
        model: &Model,
        shard: usize,
        segments: &[(u64, &[u8])],
    ) -> Checked {
        self.scanned[shard].retain(|id, _| segments.iter().any(|(s, _)| s == id));
        for (id, bytes) in segments {
            // A cut below what was scanned would have cut synced data: the audit that follows
            // finds any acknowledged record it took.
            if let Some(n) = self.scanned[shard].get_mut(id) {
                *n = (*n).min(bytes.len());
            }
            self.learn_segment(model, shard, *id, bytes)?;
        }
        Ok(())
    }

    fn learn_record(&mut self, model: &Model, record: &Record) -> Checked {
        match record {
            Record::Sent(r) => {
                let op = model.op_of(&r.body, || format!("durable inbox pos {}", r.pos))?;
                fix(&mut self.inbox, r.pos, op, || {
                    format!("inbox pos {}", r.pos)
                })
            }
            Record::Appended(r) => {
                let what = || format!("conv {} seq {}", r.conv, r.seq);
                let op = model.op_of(&r.body, what)?;
                let seqs = self.convs.entry(r.conv.clone()).or_default();
                fix(seqs, r.seq, op, what)
            }
            _ => Ok(()),
        }
    }
}

fn lookup(table: &[usize], at: u64) -> Option<usize> {
    table.get(at as usize).copied().filter(|op| *op != UNKNOWN)
}

/// Records `op` as durable at `at`; a different durable operation there already is a changed
/// meaning.
fn fix(table: &mut Vec<usize>, at: u64, op: usize, what: impl Fn() -> String) -> Checked {
    let i = at as usize;
    if table.len() <= i {
        table.resize(i + 1, UNKNOWN);
    }
    match table[i] {
        UNKNOWN => {
            table[i] = op;
            Ok(())
        }
        o if o == op => Ok(()),
        o => fail(
            ViolationKind::WrongRecord,
            format!(
                "{} was durable as op {o} and is now durable as op {op}",
                what()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::OpKind;
    use fabric_proto::internal::{Request, ShardOp};
    use fabric_proto::{Body, Target};
    use fabric_proto::{ConvId, MeshId, PeerId};
    use fabric_shard::{Shard, ShardConfig};

    fn body(op: usize, pad: &str) -> Body {
        Body::from_trusted(format!("{{\"op\":{op},\"pad\":\"{pad}\",\"again\":{op}}}").into())
    }

    /// One WAL write of a fresh shard holding a mesh, peer `a`, a send of `send` and an
    /// append to `c` of `append`.
    fn write_of(send: &Body, append: &Body) -> Vec<u8> {
        let mut shard = Shard::new(ShardConfig::default());
        let ops = [
            ShardOp::CreateMesh {
                r: 0,
                mesh: MeshId::must("m"),
            },
            ShardOp::AddPeer {
                r: 1,
                mesh: MeshId::must("m"),
                peer: PeerId::must("a"),
                groups: vec![],
                token_hash: Some([7; 32]),
                public_key: None,
            },
            ShardOp::Send {
                r: 2,
                mesh: MeshId::must("m"),
                from: PeerId::must("a"),
                to: Target::Peer(PeerId::must("a")),
                body: send.clone(),
                key: None,
            },
            ShardOp::Append {
                r: 3,
                mesh: MeshId::must("m"),
                conv: ConvId::must("c"),
                from: PeerId::must("a"),
                body: append.clone(),
                key: None,
            },
        ];
        shard.handle_requests(0, ops.map(|op| Request { session: 1, op }));
        let w = shard.poll_wal().expect("a write");
        // A segment as the file steps leave it: its header, then the write's frame.
        let header = wal::SegmentHeader {
            shard: 0,
            segment: w.segment,
            first_lsn: w.first_lsn,
        };
        let mut segment = header.encode().to_vec();
        segment.extend_from_slice(&w.bytes);
        segment
    }

    #[test]
    fn durability_comes_from_the_synced_bytes_and_never_changes_meaning() {
        // Proves the oracle learns what a completed write holds from its bytes alone (nothing
        // is durable before), learns each byte once, and refuses a later durable record that
        // gives a position another operation's body.
        let mut model = Model::new(vec!["a".into()], vec![vec![]], false);
        let send = OpKind::Send {
            to: Target::Peer(PeerId::must("a")),
            recipients: vec![0],
            key: None,
        };
        let append = OpKind::Append {
            conv: "c".into(),
            key: None,
        };
        let s = model.add_op(0, send.clone(), body(0, ""));
        let a = model.add_op(0, append, body(1, ""));
        let other = model.add_op(0, send, body(2, "x"));
        let bytes = write_of(&body(s, ""), &body(a, ""));
        let mut d = Durable::new(1);
        assert_eq!((d.pos_op(1), d.seq_op("c", 1)), (None, None));
        d.learn_segment(&model, 0, 1, &bytes).unwrap();
        assert_eq!((d.pos_op(1), d.seq_op("c", 1)), (Some(s), Some(a)));
        d.learn_segment(&model, 0, 1, &bytes).unwrap();
        let changed = write_of(&body(other, "x"), &body(a, ""));
        let e = d.learn_segment(&model, 0, 2, &changed).unwrap_err();
        assert_eq!(e.kind, ViolationKind::WrongRecord, "{e:?}");
        let mut garbage = bytes.clone();
        garbage.extend_from_slice(&[0xff; 40]);
        let e = Durable::new(1)
            .learn_segment(&model, 0, 1, &garbage)
            .unwrap_err();
        assert_eq!(e.kind, ViolationKind::WrongRecord, "{e:?}");
    }
}
