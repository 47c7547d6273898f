//! How fast can this disk make a small write durable? A WAL with group commit can ack at most
//! (syncs/s x records per sync), so this number frames every durable-throughput figure.
//!
//! The probe appends 4 KiB and `fdatasync`s, in a loop, like a WAL writer with one tiny batch.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// Bytes appended before each sync (one page: the smallest write a WAL can make durable).
pub const WRITE_BYTES: usize = 4096;
/// A p50 above this means the disk (or its throttling) will dominate durable latency.
pub const SLOW_SYNC_P50_US: u64 = 2_000;

#[derive(Debug, Clone)]
pub struct FsyncProbe {
    pub syncs: u64,
    pub duration: Duration,
    pub syncs_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl FsyncProbe {
    pub fn is_slow(&self) -> bool {
        self.p50_us > SLOW_SYNC_P50_US
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "write_bytes": WRITE_BYTES,
            "syncs": self.syncs,
            "duration_secs": self.duration.as_secs_f64(),
            "syncs_per_sec": self.syncs_per_sec,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "max_us": self.max_us,
        })
    }
}

/// Runs the probe in `dir` for `duration` and removes its file afterwards.
pub fn run(dir: &Path, duration: Duration) -> std::io::Result<FsyncProbe> {
    let path = dir.join("fsync-probe.tmp");
    let result = probe_file(&path, duration);
    let _ = std::fs::remove_file(&path);
    result
}

fn probe_file(path: &Path, duration: Duration) -> std::io::Result<FsyncProbe> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    let block = vec![0xa5u8; WRITE_BYTES];
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let started = Instant::now();
    let mut syncs = 0u64;
    while started.elapsed() < duration {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        hist.saturating_record(t.elapsed().as_micros() as u64);
        syncs += 1;
    }
    let elapsed = started.elapsed();
    Ok(FsyncProbe {
        syncs,
        duration: elapsed,
        syncs_per_sec: syncs as f64 / elapsed.as_secs_f64(),
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
    })
}
