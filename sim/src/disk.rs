//! A simulated disk holding one shard's directory (segment files, `MANIFEST`, `quarantine/`),
//! with the failures a real disk and file system can produce. It implements
//! `fabric_shard::store::SegmentStore`, so the node's own file steps
//! (`fabric_shard::store::perform` and `recover`) run against it: the order of syncs the
//! checkers judge is the order the node performs.
//!
//! # Fault model
//!
//! - **Volatile until synced.** Every change lands first in a volatile layer (the page cache):
//!   reads see it, a crash may lose it. An fdatasync makes a file's data durable. A directory
//!   entry change (segment create, segment delete, the manifest's rename) becomes durable
//!   only at the next directory fsync.
//! - **Crash = power loss, at any step of a write.** A crash while a write is in flight stops
//!   the node's file steps after a random number of them ([`Fault::CrashAfter`]). Then
//!   unsynced directory operations survive as a random *prefix* (file systems journal metadata
//!   in order), and a file's unsynced data is lost, kept whole, or *torn*: a random prefix of
//!   whole 512-byte sectors (counted from the start of the file) survives, and the rest is
//!   either missing or, as on file systems that extend the size before the data lands,
//!   zero-filled. Synced data is never lost or changed by a crash.
//! - **Damage in the torn tail.** A crash may also flip one bit inside the unsynced bytes that
//!   survived (never acknowledged: recovery must cut at the damaged write), aimed at a message
//!   body half of the time, because a flipped body still decodes and only a checksum catches it.
//! - **Read corruption and bit rot.** A recovery may read one flipped bit in synced data: in a
//!   sealed segment, or in the newest segment before its final write. Either way recovery must
//!   refuse to start (`RecoverError::Corrupt`) rather than serve from, or cut, damaged
//!   acknowledged data; the next recovery reads clean (an operator restored the byte). Rot in
//!   the final write of the newest segment is not injected: it cannot be told from a torn
//!   write, which recovery cuts (docs/OPERATIONS.md says so).
//! - **Write failure.** A write may stop with ENOSPC after a whole number of sectors, a file
//!   creation or manifest write may fail with ENOSPC, or a write may land whole and its
//!   fdatasync fail (EIO). After a failed fdatasync the kernel may drop the dirty pages and
//!   mark them clean (fsyncgate): reads still see the bytes, but no later sync makes them
//!   durable, and a crash turns them into zeros. While a schedule holds a disk full
//!   (`disk_full` .. `disk_free`), every write fails with ENOSPC.
//!
//! Why a prefix of sectors rather than arbitrary bytes: disks write whole sectors atomically
//! (the property O_DIRECT databases rely on), and the core's scan must be right for every cut,
//! which `shard/src/wal/tests.rs` covers byte by byte; the simulator's job is the interleaving
//! of cuts with acknowledgements, so it draws cuts where hardware makes them.

use fabric_shard::store::{SegmentStore, StoreError, StoreErrorKind};
use fabric_shard::wal;
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
    /// `data[..durable_len]` survives a crash (but for `stale` ranges).
    durable_len: usize,
    /// Pages dropped after a failed fdatasync: readable now, never durable; zeros after a
    /// crash.
    stale: Vec<(usize, usize)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DirOp {
    Create(u64),
    Delete(u64),
    /// The manifest's rename: these bytes become the manifest.
    Manifest(Vec<u8>),
}

/// What the next file steps run into (set by the world around one `perform`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The power fails after `steps` file operations: the rest never happen.
    CrashAfter { steps: usize },
    /// Operation number `step` fails: an append with ENOSPC after `sectors` whole sectors
    /// (`usize::MAX`: all of it landed and the fdatasync fails with EIO instead), a creation
    /// or manifest write with ENOSPC. `drop_pages`: an EIO'd fdatasync drops the dirty pages.
    FailAt {
        step: usize,
        sectors: usize,
        drop_pages: bool,
    },
    /// Every operation that needs space fails with ENOSPC (a full disk).
    Full,
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
    /// Stale (dropped-after-EIO) bytes that a crash turned into zeros.
    pub stale_zeroed: usize,
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

/// One shard's directory.
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
    manifest: Option<Vec<u8>>,
    durable_manifest: Option<Vec<u8>>,
    manifest_temp: Option<Vec<u8>>,
    quarantine: BTreeMap<String, Vec<u8>>,
    /// The repair marker: written (temp file, fsync, rename, directory fsync) and removed
    /// (removal, directory fsync) durably in one step each.
    repair: Option<Vec<u8>>,
    /// The membership file, written durably in one step the same way.
    members: Option<Vec<u8>>,
    /// The fault the current file steps run into, and how many steps ran so far.
    fault: Option<Fault>,
    steps: usize,
    /// The operation of each step since `set_fault`.
    step_ops: Vec<&'static str>,
    /// The next read of this segment returns one flipped bit.
    flip_next_read: Option<ReadFlip>,
}

fn failed(kind: StoreErrorKind, op: &'static str, file: String, message: &str) -> StoreError {
    StoreError {
        kind,
        op,
        file,
        message: message.into(),
    }
}

impl Disk {
    /// A shard directory as the node leaves a new one: an empty manifest, durable.
    pub fn new(shard: u32) -> Disk {
        let manifest = Some(wal::Manifest::empty(shard).encode().to_vec());
        Disk {
            durable_manifest: manifest.clone(),
            manifest,
            ..Disk::default()
        }
    }

    /// The fault the next file steps run into (`None`: none), counting steps from zero.
    pub fn set_fault(&mut self, fault: Option<Fault>) {
        self.fault = fault;
        self.steps = 0;
        self.step_ops.clear();
    }

    /// The operations of the steps taken since `set_fault`, in order.
    pub fn step_ops(&self) -> &[&'static str] {
        &self.step_ops
    }

    /// File steps taken since `set_fault`.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The next read of `flip.segment` returns it with one bit flipped.
    pub fn flip_next_read(&mut self, flip: ReadFlip) {
        self.flip_next_read = Some(flip);
    }

    /// One step begins: `Err` if the fault stops or fails it. `space`: the step needs space.
    fn step(&mut self, op: &'static str, file: String, space: bool) -> Result<(), StoreError> {
        let n = self.steps;
        self.steps += 1;
        self.step_ops.push(op);
        match self.fault {
            Some(Fault::CrashAfter { steps }) if n >= steps => {
                Err(failed(StoreErrorKind::Io, op, file, "the power failed"))
            }
            Some(Fault::Full) if space => Err(failed(
                StoreErrorKind::NoSpace,
                op,
                file,
                "no space left on device",
            )),
            Some(Fault::FailAt { step, .. }) if n == step && space && op != "append" => Err(
                failed(StoreErrorKind::NoSpace, op, file, "no space left on device"),
            ),
            _ => Ok(()),
        }
    }

    /// Whether this step is the one a `FailAt` fault fails.
    fn failing_now(&self) -> Option<(usize, bool)> {
        match self.fault {
            Some(Fault::FailAt {
                step,
                sectors,
                drop_pages,
            }) if step + 1 == self.steps => Some((sectors, drop_pages)),
            _ => None,
        }
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

    pub fn quarantined(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.quarantine
    }

    /// A read corruption in synced data: in a sealed segment, or in the newest segment before
    /// its final write (see the module doc); in a message body half of the time, anywhere in
    /// the range otherwise. A schedule may narrow it to one segment and a byte range.
    pub fn pick_read_flip_in(
        &self,
        rng: &mut ChaCha8Rng,
        segment: Option<u64>,
        offset_min: Option<usize>,
        offset_max: Option<usize>,
    ) -> Option<ReadFlip> {
        let segs = self.segments();
        // Only listed segments: an unlisted one is an incomplete creation recovery removes.
        let manifest = self
            .manifest
            .as_deref()
            .and_then(|b| wal::Manifest::decode(b).ok())?;
        let newest = Some(manifest.newest);
        let ranges: Vec<(u64, &[u8], usize)> = segs
            .iter()
            .filter(|(id, _)| manifest.lists(*id) && segment.is_none_or(|s| s == *id))
            .map(|(id, b)| {
                let end = if Some(*id) == newest {
                    last_frame_start(b)
                } else {
                    b.len()
                };
                (*id, *b, end.min(self.files[id].durable_len))
            })
            .filter(|(_, _, end)| *end > 0)
            .collect();
        if ranges.is_empty() {
            return None;
        }
        let (segment, bytes, end) = ranges[rng.random_range(0..ranges.len())];
        let lo = offset_min.unwrap_or(0).min(end - 1);
        let hi = offset_max.unwrap_or(end).clamp(lo + 1, end);
        let offset = pick_flip_offset(&bytes[..end], lo, hi, rng)?;
        Some(ReadFlip {
            segment,
            offset,
            mask: 1 << rng.random_range(0..8),
        })
    }

    /// Bit rot: flips `flip`'s bit in the file itself, synced bytes included (a later read
    /// and every recovery see it).
    pub fn rot(&mut self, flip: ReadFlip) {
        if let Some(b) = self
            .files
            .get_mut(&flip.segment)
            .and_then(|f| f.data.get_mut(flip.offset))
        {
            *b ^= flip.mask;
        }
    }

    /// Power loss: see the module doc for what survives.
    pub fn crash(&mut self, rng: &mut ChaCha8Rng, faults: CrashFaults) -> CrashReport {
        let mut report = CrashReport::default();
        let total = self.unsynced.len();
        let kept = rng.random_range(0..=total);
        report.dir_ops_kept = (kept, total);
        for op in self.unsynced.drain(..kept) {
            match op {
                DirOp::Create(id) => {
                    self.durable.insert(id);
                }
                DirOp::Delete(id) => {
                    self.durable.remove(&id);
                }
                DirOp::Manifest(b) => self.durable_manifest = Some(b),
            }
        }
        self.unsynced.clear();
        self.visible = self.durable.clone();
        self.manifest = self.durable_manifest.clone();
        self.manifest_temp = None;
        self.fault = None;
        self.flip_next_read = None;
        self.forget_unnamed();
        for (id, f) in self.files.iter_mut() {
            crash_file(*id, f, rng, faults, &mut report);
        }
        report
    }

    fn forget_unnamed(&mut self) {
        let keep = &self.visible;
        let durable = &self.durable;
        self.files
            .retain(|id, _| keep.contains(id) || durable.contains(id));
    }

    fn file_mut(&mut self, op: &'static str, id: u64) -> Result<&mut File, StoreError> {
        if !self.visible.contains(&id) {
            return Err(failed(
                StoreErrorKind::NotFound,
                op,
                wal::segment_file_name(id),
                "no such segment",
            ));
        }
        Ok(self
            .files
            .get_mut(&id)
            .expect("visible segments have files"))
    }
}

/// What a crash leaves of one file's unsynced tail (and of its stale pages).
fn crash_file(
    id: u64,
    f: &mut File,
    rng: &mut ChaCha8Rng,
    faults: CrashFaults,
    report: &mut CrashReport,
) {
    let start = f.durable_len;
    let end = f.data.len();
    if start < end {
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
                report.tail_flip = Some((id, at));
            }
        }
        report.tail = Some((id, end - start, keep_to - start));
    }
    for (a, b) in std::mem::take(&mut f.stale) {
        let b = b.min(f.data.len());
        if a < b {
            f.data[a..b].fill(0);
            report.stale_zeroed += b - a;
        }
    }
    f.durable_len = f.data.len();
}

impl SegmentStore for Disk {
    fn list_segments(&mut self) -> Result<Vec<u64>, StoreError> {
        self.step("list", String::new(), false)?;
        Ok(self.visible.iter().copied().collect())
    }

    fn read_segment(&mut self, id: u64) -> Result<Vec<u8>, StoreError> {
        self.step("read", wal::segment_file_name(id), false)?;
        let mut bytes = self.file_mut("read", id)?.data.clone();
        if let Some(flip) = self.flip_next_read.filter(|f| f.segment == id) {
            self.flip_next_read = None;
            if let Some(b) = bytes.get_mut(flip.offset) {
                *b ^= flip.mask;
            }
        }
        Ok(bytes)
    }

    /// A positioned read, with the same injected faults as a whole read: an I/O error of the
    /// step, and a bit flipped in the bytes it returns (if the armed flip falls in the range).
    fn read_at(&mut self, id: u64, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        self.step("read_at", wal::segment_file_name(id), false)?;
        let data = &self.file_mut("read_at", id)?.data;
        let mut bytes =
            fabric_shard::store::read_range(data, wal::segment_file_name(id), offset, len)?;
        if let Some(flip) = self.flip_next_read.filter(|f| f.segment == id) {
            let at = (flip.offset as u64).checked_sub(offset);
            if let Some(b) = at.and_then(|i| bytes.get_mut(i as usize)) {
                self.flip_next_read = None;
                *b ^= flip.mask;
            }
        }
        Ok(bytes)
    }

    fn read_manifest(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        self.step("read", wal::MANIFEST_FILE.into(), false)?;
        Ok(self.manifest.clone())
    }

    fn create_segment(&mut self, id: u64) -> Result<(), StoreError> {
        self.step("create", wal::segment_file_name(id), true)?;
        assert!(!self.visible.contains(&id), "segment {id} created twice");
        self.files.insert(id, File::default());
        self.visible.insert(id);
        self.unsynced.push(DirOp::Create(id));
        Ok(())
    }

    fn append(&mut self, id: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let full = self.fault == Some(Fault::Full);
        self.step("append", wal::segment_file_name(id), false)?;
        let failing = self.failing_now();
        let f = self.file_mut("append", id)?;
        let start = f.data.len();
        let landed = match (full, failing) {
            (true, _) => Some(0),
            (false, Some((usize::MAX, _))) | (false, None) => None,
            (false, Some((sectors, _))) => {
                let cuts = sector_cuts(start, start + bytes.len());
                Some(
                    cuts.get(sectors.min(cuts.len().saturating_sub(1)))
                        .map_or(0, |c| c - start),
                )
            }
        };
        match landed {
            None => {
                f.data.extend_from_slice(bytes);
                Ok(())
            }
            Some(n) => {
                f.data.extend_from_slice(&bytes[..n.min(bytes.len())]);
                Err(failed(
                    StoreErrorKind::NoSpace,
                    "write",
                    wal::segment_file_name(id),
                    "no space left on device",
                ))
            }
        }
    }

    fn sync(&mut self, id: u64) -> Result<(), StoreError> {
        self.step("fdatasync", wal::segment_file_name(id), false)?;
        let eio = self
            .failing_now()
            .filter(|(sectors, _)| *sectors == usize::MAX);
        let f = self.file_mut("fdatasync", id)?;
        if let Some((_, drop_pages)) = eio {
            if drop_pages && f.durable_len < f.data.len() {
                f.stale.push((f.durable_len, f.data.len()));
            }
            return Err(failed(
                StoreErrorKind::Io,
                "fdatasync",
                wal::segment_file_name(id),
                "input/output error",
            ));
        }
        f.durable_len = f.data.len();
        Ok(())
    }

    fn truncate(&mut self, id: u64, len: u64) -> Result<(), StoreError> {
        self.step("truncate", wal::segment_file_name(id), false)?;
        let f = self.file_mut("truncate", id)?;
        let len = len as usize;
        f.data.truncate(len);
        f.durable_len = f.data.len();
        f.stale.retain_mut(|(a, b)| {
            *b = (*b).min(len);
            *a < *b
        });
        Ok(())
    }

    fn remove_segment(&mut self, id: u64) -> Result<(), StoreError> {
        self.step("delete", wal::segment_file_name(id), false)?;
        self.file_mut("delete", id)?;
        self.visible.remove(&id);
        self.unsynced.push(DirOp::Delete(id));
        Ok(())
    }

    fn sync_dir(&mut self) -> Result<(), StoreError> {
        self.step("fsync directory", String::new(), false)?;
        self.durable = self.visible.clone();
        self.durable_manifest = self.manifest.clone();
        self.unsynced.clear();
        self.forget_unnamed();
        Ok(())
    }

    fn write_manifest_temp(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.step("write", wal::MANIFEST_TEMP_FILE.into(), true)?;
        self.manifest_temp = Some(bytes.to_vec());
        Ok(())
    }

    fn rename_manifest(&mut self) -> Result<(), StoreError> {
        self.step("rename", wal::MANIFEST_FILE.into(), false)?;
        if let Some(t) = self.manifest_temp.take() {
            self.manifest = Some(t.clone());
            self.unsynced.push(DirOp::Manifest(t));
        }
        Ok(())
    }

    fn quarantine(&mut self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.step("quarantine", name.into(), false)?;
        self.quarantine.insert(name.to_string(), bytes.to_vec());
        Ok(())
    }

    fn read_repair(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        self.step("read", fabric_shard::repair::REPAIR_FILE.into(), false)?;
        Ok(self.repair.clone())
    }

    fn write_repair(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.step("write", fabric_shard::repair::REPAIR_FILE.into(), true)?;
        self.repair = Some(bytes.to_vec());
        Ok(())
    }

    fn read_members(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        self.step("read", fabric_shard::members::MEMBERS_FILE.into(), false)?;
        Ok(self.members.clone())
    }

    fn write_members(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.step("write", fabric_shard::members::MEMBERS_FILE.into(), true)?;
        self.members = Some(bytes.to_vec());
        Ok(())
    }

    fn remove_repair(&mut self) -> Result<(), StoreError> {
        self.step("delete", fabric_shard::repair::REPAIR_FILE.into(), false)?;
        self.repair = None;
        Ok(())
    }

    fn segment_path(&self, id: u64) -> String {
        wal::segment_file_name(id)
    }
}

/// Where the last write frame of a segment starts (its header's end if it has none).
fn last_frame_start(bytes: &[u8]) -> usize {
    let mut at = wal::SEGMENT_HEADER_BYTES.min(bytes.len());
    let mut last = at;
    while let Some(h) = wal::FrameHeader::decode(&bytes[at..]) {
        last = at;
        at += wal::FRAME_HEADER_BYTES + h.len as usize;
        if at > bytes.len() {
            break;
        }
    }
    last
}

/// Sector boundaries strictly between `start` and `end` (file offsets).
fn sector_cuts(start: usize, end: usize) -> Vec<usize> {
    let first = (start / SECTOR_BYTES + 1) * SECTOR_BYTES;
    (first..end).step_by(SECTOR_BYTES).collect()
}

/// An offset in `bytes[start..end]` to flip: half of the time inside a message body there
/// (bodies start with [`BODY_MARKER`] and end at the first `}`), otherwise anywhere in the
/// range.
fn pick_flip_offset(bytes: &[u8], start: usize, end: usize, rng: &mut ChaCha8Rng) -> Option<usize> {
    if start >= end {
        return None;
    }
    if rng.random_bool(0.5) {
        let hay = &bytes[start..end];
        let mut bodies = Vec::new();
        let mut from = 0;
        while let Some(at) = find(&hay[from..], BODY_MARKER) {
            let open = from + at;
            let Some(close) = hay[open..].iter().position(|b| *b == b'}') else {
                break;
            };
            if close > 1 {
                bodies.push((start + open + 1, start + open + close));
            }
            from = open + close;
        }
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
mod tests;
