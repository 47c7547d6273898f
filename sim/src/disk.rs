//! A simulated disk holding one shard's WAL segment files, with the failures a real disk and
//! file system can produce. It applies each `WalWrite` the way the node's glue does
//! (`fabric/src/storage.rs`): create the segment and fsync the directory, append the bytes,
//! fdatasync, then delete the segments the write names.
//!
//! # Fault model
//!
//! - **Volatile until synced.** Every change lands first in a volatile layer (the page cache):
//!   reads see it, a crash may lose it. An fdatasync makes a file's data durable. A directory
//!   entry change (segment create, segment delete) becomes durable only at the next directory
//!   fsync, which the glue performs when it creates a segment.
//! - **Crash = power loss.** Unsynced directory operations survive as a random *prefix* (file
//!   systems journal metadata in order, so a later create never survives an earlier lost one).
//!   The unsynced data of a file (at most one write's worth: the core keeps one write in flight
//!   and every completed write was synced) is lost, kept whole, or *torn*: a random prefix of
//!   whole 512-byte sectors (sector boundaries count from the start of the file) survives, and
//!   the rest is either missing or, as on file systems that extend the size before the data
//!   lands, zero-filled. Synced data is never lost or changed.
//! - **Damage in the torn tail.** A crash may also flip one bit inside the unsynced bytes that
//!   survived. Those bytes were never acknowledged, so recovery must cut at the damaged record;
//!   a recovery that skips checksums accepts the damage as a record nobody wrote. The damage is
//!   aimed at a message body half of the time, because a flipped body still decodes and so is
//!   the damage only a checksum can catch.
//! - **Read corruption.** A read may return one flipped bit in a segment that is not the last
//!   (a bad cable, a bad controller). The disk itself is fine; recovery must refuse to start
//!   with `RecoverError::Corrupt` rather than serve from a damaged log, and a retry reads clean.
//! - **Write failure.** A write may stop with ENOSPC after a whole number of sectors, or land
//!   whole and have its fdatasync fail (EIO); what it wrote stays in the page cache, unsynced.
//!   While a schedule holds a disk full (`disk_full` .. `disk_free`), every write fails so. The shard is told `handle_wal_failed` and must be
//!   recovered from what a restarted process reads (the page cache), after which the glue
//!   makes everything it read durable.
//!
//! Why a prefix of sectors rather than arbitrary bytes: disks write whole sectors atomically
//! (the property O_DIRECT databases rely on), and the core's scan must be right for every cut,
//! which `shard/src/wal.rs`'s own tests cover byte by byte; the simulator's job is the
//! interleaving of cuts with acknowledgements, so it draws cuts where hardware makes them.

use fabric_shard::{wal, WalWrite};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};

/// The unit a disk writes atomically, in bytes.
pub const SECTOR_BYTES: usize = 512;

/// Bodies the simulator writes start with this, so faults can aim at them.
pub const BODY_MARKER: &[u8] = b"{\"op\":";

#[derive(Debug, Clone, Default)]
struct File {
    data: Vec<u8>,
    /// `data[..durable_len]` survives a crash; the rest is page cache only.
    durable_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirOp {
    Create(u64),
    Delete(u64),
}

/// How a crash treated the unsynced tail of the file that had one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CrashReport {
    /// Unsynced directory operations kept, of how many.
    pub dir_ops_kept: (usize, usize),
    /// Segment with unsynced data, unsynced bytes, bytes kept.
    pub tail: Option<(u64, usize, usize)>,
    /// The tail was torn at a sector boundary (rather than lost or kept whole).
    pub torn: bool,
    /// The torn part was zero-filled rather than missing.
    pub zero_filled: bool,
    /// Segment and byte offset of a bit flipped in the surviving unsynced bytes.
    pub tail_flip: Option<(u64, usize)>,
}

impl CrashReport {
    /// Faults this crash injected beyond the crash itself.
    pub fn faults(&self) -> u64 {
        u64::from(self.torn) + u64::from(self.tail_flip.is_some())
    }
}

/// One flipped bit in what a read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadFlip {
    pub segment: u64,
    pub offset: usize,
    pub mask: u8,
}

/// Crash-time fault probabilities, from the simulation's options.
#[derive(Debug, Clone, Copy)]
pub struct CrashFaults {
    pub torn_write_probability: f64,
    pub tail_corruption_probability: f64,
}

/// One shard's segment files.
#[derive(Debug, Clone, Default)]
pub struct Disk {
    /// Contents by segment id, including files whose deletion is not durable yet (a crash can
    /// bring them back).
    files: BTreeMap<u64, File>,
    /// Names a directory listing shows now.
    visible: BTreeSet<u64>,
    /// Names that survive a crash.
    durable: BTreeSet<u64>,
    /// Directory operations since the last directory fsync, in order.
    unsynced: Vec<DirOp>,
}

impl Disk {
    pub fn new() -> Disk {
        Disk::default()
    }

    /// The glue's first half of a write: create (its directory fsync is part of completing the
    /// write), then append into the page cache.
    pub fn begin_write(&mut self, w: &WalWrite) {
        if w.create {
            assert!(
                !self.visible.contains(&w.segment),
                "segment {} created twice",
                w.segment
            );
            self.files.insert(w.segment, File::default());
            self.visible.insert(w.segment);
            self.unsynced.push(DirOp::Create(w.segment));
        }
        if !w.bytes.is_empty() {
            assert!(
                self.visible.contains(&w.segment),
                "write to missing segment {}",
                w.segment
            );
            let f = self
                .files
                .get_mut(&w.segment)
                .expect("visible segment has a file");
            f.data.extend_from_slice(&w.bytes);
        }
    }

    /// The glue's second half: the directory fsync (if it created), the fdatasync, then the
    /// deletions, which stay volatile until some later directory fsync.
    pub fn complete_write(&mut self, w: &WalWrite) {
        if w.create {
            self.sync_dir();
        }
        if let Some(f) = self.files.get_mut(&w.segment) {
            f.durable_len = f.data.len();
        }
        for id in &w.delete {
            if self.visible.remove(id) {
                self.unsynced.push(DirOp::Delete(*id));
            }
        }
    }

    /// A failed write: the directory fsync of a create happened (it precedes the write), the
    /// write put `written` of its bytes in the page cache, nothing was synced or deleted.
    pub fn fail_write(&mut self, w: &WalWrite, written: usize) {
        if w.create {
            self.sync_dir();
        }
        if let Some(f) = self.files.get_mut(&w.segment) {
            let start = f.data.len() - w.bytes.len();
            f.data.truncate(start + written.min(w.bytes.len()));
        }
    }

    /// How many bytes of a failing write `w` reach the page cache (call after `begin_write`):
    /// none, or a random number of whole sectors (counted from the start of the file) when the
    /// write itself stops with ENOSPC, or all of them when the write landed and its fdatasync
    /// failed (EIO).
    pub fn failed_write_cut(&self, w: &WalWrite, rng: &mut ChaCha8Rng) -> usize {
        let Some(f) = self.files.get(&w.segment) else {
            return 0;
        };
        let start = f.data.len() - w.bytes.len();
        let cuts = sector_cuts(start, f.data.len());
        match rng.random_range(0..3) {
            0 => 0,
            1 if !cuts.is_empty() => cuts[rng.random_range(0..cuts.len())] - start,
            _ => w.bytes.len(),
        }
    }

    fn sync_dir(&mut self) {
        self.durable = self.visible.clone();
        self.unsynced.clear();
        self.forget_unnamed();
    }

    fn forget_unnamed(&mut self) {
        let keep = &self.visible;
        let durable = &self.durable;
        self.files
            .retain(|id, _| keep.contains(id) || durable.contains(id));
    }

    /// The glue's recovery cut of a torn tail (`set_len`, then `sync_all`).
    pub fn truncate(&mut self, segment: u64, len: u64) {
        if let Some(f) = self.files.get_mut(&segment) {
            f.data.truncate(len as usize);
            f.durable_len = f.data.len();
        }
    }

    /// Makes everything visible durable. The glue must do this after recovering from what it
    /// read, because what it read (after an ENOSPC, without a crash) may be page cache only, and
    /// the recovered shard serves it as durable.
    pub fn sync_all(&mut self) {
        for id in &self.visible {
            if let Some(f) = self.files.get_mut(id) {
                f.durable_len = f.data.len();
            }
        }
        self.sync_dir();
    }

    /// Visible segments oldest first, as a directory listing sorted by name shows them.
    pub fn segments(&self) -> Vec<(u64, &[u8])> {
        self.visible
            .iter()
            .map(|id| (*id, self.files.get(id).map_or(&[][..], |f| &f.data[..])))
            .collect()
    }

    pub fn segment_count(&self) -> usize {
        self.visible.len()
    }

    /// Bytes in visible segments.
    pub fn bytes(&self) -> u64 {
        self.segments().iter().map(|(_, b)| b.len() as u64).sum()
    }

    /// Bytes not yet durable (page cache only), over all files.
    pub fn unsynced_bytes(&self) -> usize {
        self.files
            .values()
            .map(|f| f.data.len() - f.durable_len)
            .sum()
    }

    /// A segment's visible contents with one bit flipped.
    pub fn read_flipped(&self, flip: ReadFlip) -> Vec<(u64, Vec<u8>)> {
        self.segments()
            .into_iter()
            .map(|(id, bytes)| {
                let mut bytes = bytes.to_vec();
                if id == flip.segment {
                    bytes[flip.offset] ^= flip.mask;
                }
                (id, bytes)
            })
            .collect()
    }

    /// A read corruption in a segment that is not the last, if there is a non-empty one: in a
    /// message body half of the time, anywhere in the file otherwise.
    pub fn pick_read_flip(&self, rng: &mut ChaCha8Rng) -> Option<ReadFlip> {
        self.pick_read_flip_in(rng, None, None, None)
    }

    /// [`Disk::pick_read_flip`] narrowed to one sealed segment and a byte range of it, where
    /// a schedule names them; `None` if no sealed, non-empty segment matches.
    pub fn pick_read_flip_in(
        &self,
        rng: &mut ChaCha8Rng,
        segment: Option<u64>,
        offset_min: Option<usize>,
        offset_max: Option<usize>,
    ) -> Option<ReadFlip> {
        let segs = self.segments();
        let sealed: Vec<(u64, &[u8])> = segs[..segs.len().saturating_sub(1)]
            .iter()
            .filter(|(id, b)| !b.is_empty() && segment.is_none_or(|s| s == *id))
            .copied()
            .collect();
        if sealed.is_empty() {
            return None;
        }
        let (segment, bytes) = sealed[rng.random_range(0..sealed.len())];
        let lo = offset_min.unwrap_or(0).min(bytes.len() - 1);
        let hi = offset_max.unwrap_or(bytes.len()).clamp(lo + 1, bytes.len());
        let offset = pick_flip_offset(bytes, lo, hi, rng)?;
        Some(ReadFlip {
            segment,
            offset,
            mask: 1 << rng.random_range(0..8),
        })
    }

    /// Power loss: see the module doc for what survives.
    pub fn crash(&mut self, rng: &mut ChaCha8Rng, faults: CrashFaults) -> CrashReport {
        let mut report = CrashReport::default();
        let total = self.unsynced.len();
        let kept = rng.random_range(0..=total);
        report.dir_ops_kept = (kept, total);
        for op in self.unsynced.drain(..kept) {
            match op {
                DirOp::Create(id) => self.durable.insert(id),
                DirOp::Delete(id) => self.durable.remove(&id),
            };
        }
        self.unsynced.clear();
        self.visible = self.durable.clone();
        self.forget_unnamed();
        for (id, f) in self.files.iter_mut() {
            let start = f.durable_len;
            let end = f.data.len();
            if start == end {
                continue;
            }
            let cuts = sector_cuts(start, end);
            let torn = !cuts.is_empty() && rng.random_bool(faults.torn_write_probability);
            let keep_to = if torn {
                report.torn = true;
                cuts[rng.random_range(0..cuts.len())]
            } else if rng.random_bool(0.5) {
                end
            } else {
                start
            };
            if torn && rng.random_bool(0.5) {
                report.zero_filled = true;
                f.data[keep_to..].fill(0);
            } else {
                f.data.truncate(keep_to);
            }
            if keep_to > start && rng.random_bool(faults.tail_corruption_probability) {
                if let Some(at) = pick_flip_offset(&f.data, start, keep_to, rng) {
                    f.data[at] ^= 1 << rng.random_range(0..8);
                    report.tail_flip = Some((*id, at));
                }
            }
            report.tail = Some((*id, end - start, keep_to - start));
            f.durable_len = f.data.len();
        }
        report
    }
}

/// Sector boundaries strictly between `start` and `end` (file offsets).
fn sector_cuts(start: usize, end: usize) -> Vec<usize> {
    let first = (start / SECTOR_BYTES + 1) * SECTOR_BYTES;
    (first..end).step_by(SECTOR_BYTES).collect()
}

/// An offset in `bytes[start..end]` to flip: half of the time inside the body of a whole
/// record there (bodies start with [`BODY_MARKER`] and end at the first `}`), otherwise
/// anywhere in the range. `start` must be a record boundary for the aimed half to work.
fn pick_flip_offset(bytes: &[u8], start: usize, end: usize, rng: &mut ChaCha8Rng) -> Option<usize> {
    if start >= end {
        return None;
    }
    if rng.random_bool(0.5) {
        let scan = wal::scan_segment(&bytes[start..end], None, false);
        let bodies: Vec<(usize, usize)> = scan
            .records
            .iter()
            .filter_map(|r| {
                let from = start + r.offset as usize;
                let frame = &bytes[from..from + r.bytes as usize];
                let at = find(frame, BODY_MARKER)?;
                let close = frame[at..].iter().position(|b| *b == b'}')?;
                Some((from + at + 1, from + at + close))
            })
            .filter(|(a, b)| a < b)
            .collect();
        if !bodies.is_empty() {
            let (a, b) = bodies[rng.random_range(0..bodies.len())];
            return Some(rng.random_range(a..b));
        }
    }
    Some(rng.random_range(start..end))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn write(segment: u64, create: bool, bytes: Vec<u8>, delete: Vec<u64>) -> WalWrite {
        WalWrite {
            segment,
            create,
            bytes,
            first_lsn: 1,
            last_lsn: 1,
            records: 1,
            delete,
        }
    }

    #[test]
    fn synced_data_survives_every_crash_and_unsynced_data_is_a_sector_prefix() {
        // Proves a crash never touches synced bytes and keeps only whole-sector prefixes (or
        // none, or all) of the unsynced write.
        for seed in 0..200 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut d = Disk::new();
            let w1 = write(1, true, vec![7; 700], vec![]);
            d.begin_write(&w1);
            d.complete_write(&w1);
            let w2 = write(1, false, vec![9; 1500], vec![]);
            d.begin_write(&w2);
            let faults = CrashFaults {
                torn_write_probability: 0.5,
                tail_corruption_probability: 0.0,
            };
            let r = d.crash(&mut rng, faults);
            let segs = d.segments();
            assert_eq!(segs.len(), 1);
            let data = segs[0].1;
            assert!(data[..700].iter().all(|b| *b == 7), "synced bytes intact");
            let len = data.len();
            let zero_tail = data[700..]
                .iter()
                .rposition(|b| *b == 9)
                .map_or(700, |p| 700 + p + 1);
            assert!(
                [700, 2200].contains(&zero_tail) || zero_tail % SECTOR_BYTES == 0,
                "cut {zero_tail} on a sector boundary ({r:?})"
            );
            assert!(len == zero_tail || r.zero_filled);
            assert_eq!(d.unsynced_bytes(), 0);
        }
    }

    #[test]
    fn unsynced_creates_and_deletes_survive_a_crash_as_an_ordered_prefix() {
        // Proves a deleted segment may come back after a crash until a directory fsync, and an
        // unsynced create never survives while an earlier unsynced operation is lost.
        let mut seen_back = false;
        let mut seen_gone = false;
        for seed in 0..100 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut d = Disk::new();
            for (id, create) in [(1, true), (2, true)] {
                let w = write(id, create, vec![1; 10], vec![]);
                d.begin_write(&w);
                d.complete_write(&w);
            }
            let w = write(2, false, vec![1; 10], vec![1]);
            d.begin_write(&w);
            d.complete_write(&w);
            assert_eq!(d.segment_count(), 1, "deleted from the listing at once");
            let w = write(3, true, vec![1; 10], vec![]);
            d.begin_write(&w);
            let faults = CrashFaults {
                torn_write_probability: 0.0,
                tail_corruption_probability: 0.0,
            };
            d.crash(&mut rng, faults);
            let ids: Vec<u64> = d.segments().iter().map(|s| s.0).collect();
            assert!(
                [vec![1, 2], vec![2], vec![2, 3]].contains(&ids),
                "prefix of [delete 1, create 3]: {ids:?}"
            );
            seen_back |= ids.contains(&1);
            seen_gone |= ids == vec![2, 3];
        }
        assert!(seen_back && seen_gone);
    }
}
