//! A leader's log reads: entries a follower needs that left the Raft core's entry cache, read
//! back from the WAL. A file step like [`crate::store::perform`], run by the host on any
//! [`SegmentStore`]; the replica describes the read ([`LogReadJob`]) and takes the answer.

use super::entries::entry_of;
use crate::raft::{Entry, LogReadError};
use crate::store::{SegmentStore, StoreErrorKind};
use crate::wal;

/// Read entries `lo..=hi` (at most `bytes_max` bytes, at least one entry) for the Raft core's
/// log read `id`. `segments` and `rewinds` are the shard's as the read was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogReadJob {
    pub shard: u32,
    pub id: u64,
    pub lo: u64,
    pub hi: u64,
    pub bytes_max: u64,
    /// (segment id, first LSN), oldest first.
    pub segments: Vec<(u64, u64)>,
    /// (first LSN, (segment, offset) of the rewind frame): records at or above the LSN before
    /// the frame were replaced.
    pub rewinds: Vec<(u64, (u64, u64))>,
}

/// Performs a log read: from the segment that holds `lo` (the last one starting at or below
/// it), scans forward, passing over replaced records, checking every record as recovery does.
pub fn read_entries<S: SegmentStore>(
    store: &mut S,
    job: &LogReadJob,
) -> Result<Vec<Entry>, LogReadError> {
    let Some(start) = job.segments.iter().rposition(|(_, first)| *first <= job.lo) else {
        return Err(LogReadError::Compacted);
    };
    let mut out: Vec<Entry> = Vec::new();
    let mut bytes = 0;
    for (id, first) in &job.segments[start..] {
        let data = match store.read_segment(*id) {
            Ok(d) => d,
            Err(e) if e.kind == StoreErrorKind::NotFound => return Err(LogReadError::Compacted),
            Err(_) => return Err(LogReadError::Io),
        };
        let scan = wal::scan_frames(&data, *first, false);
        for rec in scan.records {
            let replaced = job
                .rewinds
                .iter()
                .any(|(from, at)| rec.lsn >= *from && (*id, rec.offset) < *at);
            if replaced || rec.lsn < job.lo || rec.lsn > job.hi {
                continue;
            }
            let entry = entry_of(rec.lsn, rec.term, &rec.record);
            if !out.is_empty() && bytes + entry.size_bytes() > job.bytes_max {
                return Ok(out);
            }
            bytes += entry.size_bytes();
            out.push(entry);
            if rec.lsn == job.hi {
                return Ok(out);
            }
        }
    }
    // Every entry the core asks for is in the durable log: a shorter answer means the files
    // changed under the read (retention), which the core treats as a failed read.
    if out.first().is_some_and(|e| e.index == job.lo) {
        Ok(out)
    } else {
        Err(LogReadError::Io)
    }
}
