//! `recovery`: how long a shard takes to start over a WAL of N records.
//!
//! Writes N conversation appends through the real shard core into real segment files (spread
//! over `conversations` conversations, like a busy shard), then times `storage::recover`, the
//! exact code a node runs at start: list, read, scan with CRC checks, rebuild state.

use fabric::config::Durability;
use fabric_proto::internal::{Request, ShardOp};
use fabric_proto::Body;
use fabric_proto::ConvId;
use fabric_proto::{MeshId, PeerId};
use fabric_shard::{Shard, ShardConfig};
use std::path::Path;
use std::time::{Duration, Instant};

pub struct RecoveryFigures {
    pub records: u64,
    pub wal_bytes: u64,
    pub segments: u64,
    pub write_duration: Duration,
    pub recovery_duration: Duration,
}

/// Appends per request batch handed to the core (a group commit of this size).
const BATCH_RECORDS: u64 = 1024;

// Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
pub fn run(
    dir: &Path,
    records: u64,
    body_bytes: usize,
    conversations: u64,
) -> std::io::Result<RecoveryFigures> {
    let config = ShardConfig {
        // Retention must not delete what we are about to measure.
        retention_bytes_max: u64::MAX,
        ..ShardConfig::default()
    };
    let body = Body::from_json_text(format!("\"{}\"", "x".repeat(body_bytes.saturating_sub(2))))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let started = Instant::now();
    let mut shard = Shard::new(config.clone());
    let (writes_tx, writes_rx) = crossbeam_channel::bounded(2);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(2);
    std::fs::create_dir_all(dir)?;
    fabric::storage::init_shard_dirs(dir, 1).map_err(|e| std::io::Error::other(e.to_string()))?;
    let wal_dir = fabric::storage::shard_dir(dir, 0);
    let store = fabric::storage::FileStore::new(&wal_dir).with_durability(Durability::None);
    // The node's own writer thread, without fdatasync: the bytes are what recovery reads.
    let writer =
        std::thread::spawn(move || fabric::storage::writer_thread(store, writes_rx, done_tx));
    let mut written = 0u64;
    while written < records {
        let n = BATCH_RECORDS.min(records - written);
        for i in 0..n {
            let k = written + i;
            shard.handle_request(
                k,
                Request {
                    session: 1,
                    op: ShardOp::Append {
                        r: k,
                        mesh: MeshId::must("bench"),
                        conv: ConvId::must(&format!("c{}", k % conversations.max(1))),
                        from: PeerId::must("p"),
                        body: body.clone(),
                        key: None,
                    },
                },
            );
        }
        written += n;
        if let Some(w) = shard.poll_wal() {
            writes_tx
                .send(fabric_router::host::WriteJob::new(w, &config))
                .map_err(|_| std::io::Error::other("writer ended"))?;
            let done = done_rx
                .blocking_recv()
                .ok_or_else(|| std::io::Error::other("writer ended"))?;
            if let Err(f) = done.result {
                return Err(std::io::Error::other(f.error.to_string()));
            }
            shard.handle_wal_done(written, done.last_lsn);
        }
        while shard.poll_output().is_some() {}
    }
    drop(writes_tx);
    let _ = writer.join();
    let write_duration = started.elapsed();

    let started = Instant::now();
    let job = fabric_router::host::RecoverJob {
        config,
        replica: None,
    };
    let recovered = fabric::storage::recover(&wal_dir, &job, Durability::None)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let recovery_duration = started.elapsed();
    assert_eq!(recovered.report.records, records, "every record recovered");
    Ok(RecoveryFigures {
        records,
        wal_bytes: recovered.report.bytes,
        segments: recovered.report.segments,
        write_duration,
        recovery_duration,
    })
}
