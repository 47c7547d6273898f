//! The file steps of the WAL, written once for every host: the order in which a write creates
//! a segment, updates the manifest, appends, syncs and deletes ([`perform`]), what it does
//! when a step fails, and how recovery reads, checks, quarantines and cuts ([`recover`]). It
//! is generic over [`SegmentStore`], the small set of file operations a shard directory
//! needs: the node implements it with files (`fabric/src/storage.rs`), the simulator with its
//! simulated disk, the tests with [`mem::MemStore`]. So the order of fsyncs the simulator
//! checks is the order the node performs (TigerBeetle's storage interface, redb's
//! `StorageBackend`).
//!
//! A write ([`crate::WalWrite`]), step by step:
//! 0. `members`, when the group's committed membership changed: replace `MEMBERS`
//!    ([`crate::members`]) durably, before anything the write deletes;
//! 1. `create`: create the segment file, append its header, fdatasync it (the header is
//!    durable before anything lists the segment);
//! 2. `manifest`: write `MANIFEST.tmp` and fsync it, rename it over `MANIFEST`, fsync the
//!    directory: that one directory fsync makes both the new segment's name and the rename
//!    durable, before any record goes into the segment;
//! 3. append the frame, fdatasync;
//! 4. unlink each retired segment (the manifest no longer lists it), fsync the directory.
//!
//! If step 3 fails, the segment is cut back to `offset` (all of it synced before) and synced:
//! after a failed fdatasync Linux may drop the dirty pages and report the error once, so the
//! page cache is not trusted; the bytes go, and the shard is recovered anew. If the cut fails
//! too, the shard must stop ([`WriteFailure::cleaned`] is false).

use crate::members::{self, MembersFile};
use crate::recovery::{RecoveredLog, Recoverer};
use crate::repair::{self, RepairMarker};
use crate::wal::{self, Manifest, SegmentHeader};
use crate::{PlantedBugs, RecoverError, RecoveryReport, Shard, ShardConfig, WalWrite};

pub mod mem;

/// What kind of failure a file operation had (what the shard does next depends on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The disk is full (ENOSPC, EDQUOT): writes wait for space, reads go on.
    NoSpace,
    /// The file does not exist.
    NotFound,
    /// Any other I/O error (EIO, permissions, ...).
    Io,
    /// A ranged read asked for bytes past the end of the file (it was cut back, or the range
    /// is wrong): an answer, never a fault (no mmap, so a shorter file cannot become SIGBUS).
    ShortRead,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op} {file}: {message}")]
pub struct StoreError {
    pub kind: StoreErrorKind,
    pub op: &'static str,
    pub file: String,
    pub message: String,
}

/// Bytes `[offset, offset + len)` of an in-memory file's `data`, or `ShortRead` naming the
/// file: the ranged read of the in-memory stores (tests, the simulator), with the bounds a
/// `pread` of a real file has.
pub fn read_range(
    data: &[u8],
    file: String,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, StoreError> {
    let range = usize::try_from(offset)
        .ok()
        .and_then(|start| Some(start..start.checked_add(len)?))
        .filter(|r| r.end <= data.len());
    match range {
        Some(r) => Ok(data[r].to_vec()),
        None => Err(StoreError {
            kind: StoreErrorKind::ShortRead,
            op: "read_at",
            file,
            message: format!(
                "{len} bytes at offset {offset} are past the end ({} bytes)",
                data.len()
            ),
        }),
    }
}

/// The file operations of one shard directory. Every method is blocking; a host runs them on
/// a thread of its own.
pub trait SegmentStore {
    /// Ids of the segment files in the directory, in any order.
    fn list_segments(&mut self) -> Result<Vec<u64>, StoreError>;
    /// A segment's whole contents.
    fn read_segment(&mut self, id: u64) -> Result<Vec<u8>, StoreError>;
    /// Bytes `[offset, offset + len)` of a segment (a positioned read, `pread`): the way a
    /// shard reads back what it no longer keeps in memory. A range past the end of the file
    /// is `ShortRead`.
    fn read_at(&mut self, id: u64, offset: u64, len: usize) -> Result<Vec<u8>, StoreError>;
    /// The manifest's bytes, or `None` if the file does not exist.
    fn read_manifest(&mut self) -> Result<Option<Vec<u8>>, StoreError>;
    /// Creates an empty segment file (it must not exist) and opens it for appending.
    fn create_segment(&mut self, id: u64) -> Result<(), StoreError>;
    fn append(&mut self, id: u64, bytes: &[u8]) -> Result<(), StoreError>;
    /// fdatasync of one segment.
    fn sync(&mut self, id: u64) -> Result<(), StoreError>;
    /// Cuts a segment to `len` bytes and syncs it.
    fn truncate(&mut self, id: u64, len: u64) -> Result<(), StoreError>;
    fn remove_segment(&mut self, id: u64) -> Result<(), StoreError>;
    /// fsync of the directory: makes creations, renames and removals durable.
    fn sync_dir(&mut self) -> Result<(), StoreError>;
    /// Writes `MANIFEST.tmp` (created or truncated) and fsyncs it.
    fn write_manifest_temp(&mut self, bytes: &[u8]) -> Result<(), StoreError>;
    /// Renames `MANIFEST.tmp` over `MANIFEST` (durable at the next `sync_dir`).
    fn rename_manifest(&mut self) -> Result<(), StoreError>;
    /// Keeps `bytes` in `quarantine/<name>`, durably (temp file, fsync, rename, directory
    /// fsyncs), before recovery cuts them from a segment.
    fn quarantine(&mut self, name: &str, bytes: &[u8]) -> Result<(), StoreError>;
    /// The repair marker's bytes (`REPAIR`, [`crate::repair`]), or `None` if there is none.
    fn read_repair(&mut self) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes the repair marker durably: temp file, fsync, rename, directory fsync.
    fn write_repair(&mut self, bytes: &[u8]) -> Result<(), StoreError>;
    /// Removes the repair marker (if any) and makes the removal durable.
    fn remove_repair(&mut self) -> Result<(), StoreError>;
    /// The membership file's bytes (`MEMBERS`, [`crate::members`]), or `None` if there is none.
    fn read_members(&mut self) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes the membership file durably: temp file, fsync, rename, directory fsync.
    fn write_members(&mut self, bytes: &[u8]) -> Result<(), StoreError>;
    /// How to name segment `id` in messages (its path).
    fn segment_path(&self, id: u64) -> String;
}

/// A write that failed, and whether the segment was cut back to what was synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFailure {
    pub error: StoreError,
    /// The store holds exactly what was synced before this write: the shard may be recovered
    /// and go on. False: the cut failed too; the shard must stop until an operator looks.
    pub cleaned: bool,
    pub cleanup_error: Option<Box<StoreError>>,
}

/// Performs one [`WalWrite`] (see the module docs for the steps).
#[allow(clippy::result_large_err)] // a failure is rare; its error is what the host reports
pub fn perform<S: SegmentStore>(
    store: &mut S,
    w: &WalWrite,
    planted: &PlantedBugs,
) -> Result<(), WriteFailure> {
    let fail = |error: StoreError| WriteFailure {
        error,
        cleaned: true,
        cleanup_error: None,
    };
    if w.remove_repair {
        // The log already holds the repaired range durably; a failure here only keeps the
        // marker until recovery finds the range held and removes it.
        let _ = store.remove_repair();
    }
    if let Some(m) = &w.members {
        // Before the manifest and the deletions: a segment holding a conf entry, or the log
        // a snapshot replaces, goes only once the membership it implies is on disk.
        store.write_members(&m.encode()).map_err(fail)?;
    }
    if w.create {
        create_segment(store, w).map_err(fail)?;
    }
    if let Some(m) = &w.manifest {
        let skip_dir_fsync = w.create && planted.no_dir_fsync_on_segment_create;
        write_manifest(store, m, !skip_dir_fsync).map_err(fail)?;
    }
    if !w.bytes.is_empty() {
        let written = store
            .append(w.segment, &w.bytes)
            .and_then(|()| store.sync(w.segment));
        if let Err(error) = written {
            return Err(cut_back(store, w, error, planted));
        }
    }
    if !w.delete.is_empty() {
        for id in &w.delete {
            // Recovery finishes a removal that did not happen (the manifest no longer lists
            // the segment), so a failure here costs disk space for a while, never data.
            let _ = store.remove_segment(*id);
        }
        // Failing to make the removals durable only brings retired segments back after a
        // crash, and recovery removes them again.
        let _ = store.sync_dir();
    }
    Ok(())
}

fn create_segment<S: SegmentStore>(store: &mut S, w: &WalWrite) -> Result<(), StoreError> {
    let header = SegmentHeader {
        shard: w.shard,
        segment: w.segment,
        first_lsn: w.first_lsn,
    };
    store.create_segment(w.segment)?;
    store.append(w.segment, &header.encode())?;
    store.sync(w.segment)
}

/// Replaces the manifest atomically: temp file and its fsync, rename, directory fsync.
fn write_manifest<S: SegmentStore>(
    store: &mut S,
    m: &Manifest,
    sync_dir: bool,
) -> Result<(), StoreError> {
    store.write_manifest_temp(&m.encode())?;
    store.rename_manifest()?;
    if sync_dir {
        store.sync_dir()?;
    }
    Ok(())
}

/// After a failed append or sync: cut the segment back to `offset` (synced before this write)
/// and sync, so nothing the page cache may or may not hold is ever read back as data.
fn cut_back<S: SegmentStore>(
    store: &mut S,
    w: &WalWrite,
    error: StoreError,
    planted: &PlantedBugs,
) -> WriteFailure {
    if planted.trust_page_cache_after_failed_sync {
        return WriteFailure {
            error,
            cleaned: true,
            cleanup_error: None,
        };
    }
    match store.truncate(w.segment, w.offset) {
        Ok(()) => WriteFailure {
            error,
            cleaned: true,
            cleanup_error: None,
        },
        Err(e) => WriteFailure {
            error,
            cleaned: false,
            cleanup_error: Some(Box::new(e)),
        },
    }
}

/// Writes the empty manifest of a new shard directory (the node does this once, when it
/// creates the data directory, before anything else may rely on the directory).
pub fn init<S: SegmentStore>(store: &mut S, shard: u32) -> Result<(), StoreError> {
    write_manifest(store, &Manifest::empty(shard), true)
}

/// Recovers a shard from its store: reads and checks the manifest and every listed segment,
/// rebuilds the shard, then carries out what recovery decided (quarantine and cut a damaged
/// final write, quarantine and remove an incomplete segment, remove retired ones), and syncs
/// every segment it read (what it read may have been page cache only, after a process crash,
/// and the shard now serves it as durable).
pub fn recover<S: SegmentStore>(
    store: &mut S,
    config: ShardConfig,
) -> Result<(Shard, RecoveryReport), RecoverError> {
    let planted = config.planted;
    recover_planted(store, config, &planted)
}

/// [`recover`] with planted bugs (the simulator's checkers).
pub fn recover_planted<S: SegmentStore>(
    store: &mut S,
    config: ShardConfig,
    planted: &PlantedBugs,
) -> Result<(Shard, RecoveryReport), RecoverError> {
    let (mut shard, report, log) = recover_log(store, config, planted, None)?;
    debug_assert!(
        log.tail.is_empty(),
        "a shard without replication applies everything"
    );
    shard.end_replay();
    Ok((shard, report))
}

/// Recovers a replica's shard ([`crate::replica::Replica::new`] takes the result): records are
/// applied up to the manifest's commit hint, `window` records held back for rewinds
/// ([`crate::replica::recovery_window`]); the shard stays in replay.
///
/// `repairable` (a group with other voters): damage a bit flip can leave is cut and the replica
/// starts in repair ([`crate::repair`]) instead of refusing to start.
pub fn recover_replica_log<S: SegmentStore>(
    store: &mut S,
    config: ShardConfig,
    window: usize,
    repairable: bool,
) -> Result<(Shard, RecoveryReport, RecoveredLog), RecoverError> {
    let planted = config.planted;
    let replica = ReplicaRecovery { window, repairable };
    recover_log(store, config, &planted, Some(replica))
}

#[derive(Debug, Clone, Copy)]
struct ReplicaRecovery {
    window: usize,
    repairable: bool,
}

fn recover_log<S: SegmentStore>(
    store: &mut S,
    config: ShardConfig,
    planted: &PlantedBugs,
    replica: Option<ReplicaRecovery>,
) -> Result<(Shard, RecoveryReport, RecoveredLog), RecoverError> {
    let shard_idx = config.shard;
    let Some(bytes) = store.read_manifest()? else {
        return Err(missing_manifest(store)?);
    };
    let manifest = Manifest::decode(&bytes)
        .map_err(|e| RecoverError::Manifest(format!("MANIFEST is damaged: {e}")))?;
    if manifest.shard != shard_idx {
        return Err(RecoverError::Manifest(format!(
            "MANIFEST belongs to shard {}, but this is shard {shard_idx}",
            manifest.shard
        )));
    }
    let (marker, members) = match replica {
        Some(_) => (
            read_marker(store, shard_idx)?,
            read_members(store, shard_idx)?,
        ),
        None => (None, None),
    };
    let mut ids = store.list_segments()?;
    ids.sort_unstable();
    let (retired, listed, newer) = classify(&manifest, &ids)?;
    let mut r = match replica {
        None => Recoverer::new(config),
        Some(rr) if rr.repairable => {
            Recoverer::replica(config, manifest.commit, rr.window).repairable()
        }
        Some(rr) => Recoverer::replica(config, manifest.commit, rr.window),
    };
    let mut newest_bytes = Vec::new();
    for id in &listed {
        let bytes = store.read_segment(*id)?;
        let newest = *id == manifest.newest;
        r.handle_segment(*id, &store.segment_path(*id), &bytes, newest)?;
        if newest {
            newest_bytes = bytes;
        }
    }
    let in_repair = marker.is_some() || r.repairing();
    let (unlisted, leftovers) = split_newer(&manifest, newer, in_repair)?;
    let mut incomplete = Vec::new();
    if let Some(id) = unlisted {
        incomplete = store.read_segment(id)?;
        r.handle_unlisted(id, &store.segment_path(id), &incomplete)?;
    }
    let (shard, mut report, mut log) = r.finish_replica(manifest);
    carry_out(store, &mut report, &newest_bytes, &incomplete)?;
    let cut_whole = cut_for_repair(store, &mut report, &shard, marker, &leftovers)?;
    let through = report.repair_through.unwrap_or(0);
    if marker.is_some() && through < shard.next_lsn {
        // The log holds the whole range again (the repair ended before a restart).
        store.remove_repair()?;
        report.repair_through = None;
        report.repair_finished = true;
    }
    log.repair_through = report.repair_through;
    log.members = members;
    if !planted.no_sync_after_recovery {
        for id in listed.iter().filter(|id| !cut_whole.contains(id)) {
            store.sync(*id)?;
        }
    }
    for id in retired {
        store.remove_segment(id)?;
        report.retired_removed.push(id);
    }
    store.sync_dir()?;
    Ok((shard, report, log))
}

/// Which segments are retired (older than the manifest's oldest: their removal was not
/// durable), listed (all must exist), and at most one newer (an incomplete creation).
/// Segment ids: retired, listed, and the one newer than the manifest's newest (if any).
type Classified = (Vec<u64>, Vec<u64>, Vec<u64>);

fn classify(m: &Manifest, ids: &[u64]) -> Result<Classified, RecoverError> {
    let retired: Vec<u64> = ids.iter().copied().filter(|id| *id < m.oldest).collect();
    let listed: Vec<u64> = ids.iter().copied().filter(|id| m.lists(*id)).collect();
    let newer: Vec<u64> = ids.iter().copied().filter(|id| *id > m.newest).collect();
    if !m.is_empty() {
        if let Some(missing) = (m.oldest..=m.newest).find(|id| !listed.contains(id)) {
            let which = match missing {
                x if x == m.newest => "the newest",
                x if x == m.oldest => "the oldest",
                _ => "a middle",
            };
            return Err(RecoverError::Manifest(format!(
                "segment {} ({which} of segments {}..={} that MANIFEST lists) is missing",
                wal::segment_file_name(missing),
                m.oldest,
                m.newest
            )));
        }
    }
    Ok((retired, listed, newer))
}

/// Segments past the manifest's newest: one incomplete creation (`.0`), or, in repair, what an
/// interrupted repair cut had not yet removed (`.1`); anything else refuses.
fn split_newer(
    m: &Manifest,
    newer: Vec<u64>,
    in_repair: bool,
) -> Result<(Option<u64>, Vec<u64>), RecoverError> {
    match newer.as_slice() {
        _ if in_repair => Ok((None, newer)),
        [] => Ok((None, Vec::new())),
        [id] if *id == m.newest + 1 => Ok((Some(*id), Vec::new())),
        _ => Err(RecoverError::Manifest(format!(
            "segments {newer:?} are newer than MANIFEST's newest ({}); only one incompletely \
             created segment ({}) can be",
            m.newest,
            m.newest + 1
        ))),
    }
}

/// The shard's repair marker, if it has one; a damaged one refuses to start.
fn read_marker<S: SegmentStore>(
    store: &mut S,
    shard: u32,
) -> Result<Option<RepairMarker>, RecoverError> {
    let Some(bytes) = store.read_repair()? else {
        return Ok(None);
    };
    RepairMarker::decode(&bytes, shard)
        .map(Some)
        .map_err(|e| RecoverError::Manifest(format!("{} is damaged: {e}", repair::REPAIR_FILE)))
}

fn read_members<S: SegmentStore>(
    store: &mut S,
    shard: u32,
) -> Result<Option<MembersFile>, RecoverError> {
    let Some(bytes) = store.read_members()? else {
        return Ok(None);
    };
    MembersFile::decode(&bytes, shard)
        .map(Some)
        .map_err(|e| RecoverError::Manifest(format!("{} is damaged: {e}", members::MEMBERS_FILE)))
}

/// Carries out a cut for repair: the marker first (so a crash at any later step restarts in
/// repair), then every cut byte into quarantine, then the manifest that ends the log at the
/// cut, then the cut itself. Leftovers of an interrupted cut go the same way. Returns the
/// segments removed whole.
fn cut_for_repair<S: SegmentStore>(
    store: &mut S,
    report: &mut RecoveryReport,
    shard: &Shard,
    prior: Option<RepairMarker>,
    leftovers: &[u64],
) -> Result<Vec<u64>, RecoverError> {
    let mut whole: Vec<u64> = leftovers.to_vec();
    let mut marker = prior;
    if let Some(cut) = &report.repair {
        let found = RepairMarker {
            shard: shard.config.shard,
            from_lsn: cut.from_lsn,
            through_lsn: cut.through_lsn,
        };
        marker = Some(marker.map_or(found, |m| m.merge(found)));
        whole.extend(cut.removed.iter().copied());
        if cut.offset == 0 {
            whole.push(cut.segment);
        }
    }
    for id in leftovers {
        let bytes = store.read_segment(*id)?;
        if let Some(m) = &mut marker {
            m.through_lsn = repair::acked_bound_of_segment(&bytes, m.through_lsn);
        }
    }
    let Some(marker) = marker else {
        return Ok(whole);
    };
    report.repair_through = Some(marker.through_lsn);
    if report.repair.is_none() && leftovers.is_empty() {
        return Ok(whole);
    }
    if prior != Some(marker) {
        store.write_repair(&marker.encode())?;
    }
    let partial = report
        .repair
        .as_ref()
        .filter(|c| c.offset > 0)
        .map(|c| (c.segment, c.offset));
    if let Some((id, offset)) = partial {
        let bytes = store.read_segment(id)?;
        let name = wal::quarantine_file_name(id, offset);
        store.quarantine(&name, bytes.get(offset as usize..).unwrap_or_default())?;
        report.quarantined.push(name);
    }
    for id in &whole {
        let name = wal::quarantine_file_name(*id, 0);
        let bytes = store.read_segment(*id)?;
        store.quarantine(&name, &bytes)?;
        report.quarantined.push(name);
    }
    write_manifest(store, &shard.manifest, true)?;
    if let Some((id, offset)) = partial {
        store.truncate(id, offset)?;
    }
    for id in &whole {
        store.remove_segment(*id)?;
    }
    store.sync_dir()?;
    Ok(whole)
}

/// No manifest: a directory emptied (or never initialized), or data of an older format.
fn missing_manifest<S: SegmentStore>(store: &mut S) -> Result<RecoverError, RecoverError> {
    let mut ids = store.list_segments()?;
    ids.sort_unstable();
    let Some(first) = ids.first().copied() else {
        return Ok(RecoverError::Manifest(
            "the shard directory has no MANIFEST and no segment: it was emptied (or never \
             initialized by this node); restore it from a backup, or move the whole data \
             directory away to start empty"
                .into(),
        ));
    };
    let bytes = store.read_segment(first)?;
    if !bytes.starts_with(wal::SEGMENT_MAGIC) {
        return Ok(RecoverError::Format {
            file: store.segment_path(first),
            reason: format!(
                "has no format-{} segment header: it was written by an older Fabric (WAL \
                 format 1), which this node does not read",
                wal::FORMAT
            ),
        });
    }
    Ok(RecoverError::Manifest(format!(
        "MANIFEST is missing, but segments {ids:?} exist"
    )))
}

/// Quarantines and cuts a damaged final write; quarantines and removes an incomplete segment.
fn carry_out<S: SegmentStore>(
    store: &mut S,
    report: &mut RecoveryReport,
    newest: &[u8],
    incomplete: &[u8],
) -> Result<(), RecoverError> {
    if let Some(cut) = report.cut {
        let name = wal::quarantine_file_name(cut.segment, cut.offset);
        store.quarantine(&name, &newest[cut.offset as usize..])?;
        store.truncate(cut.segment, cut.offset)?;
        report.quarantined.push(name);
    }
    if let Some(id) = report.incomplete_segment {
        let name = wal::quarantine_file_name(id, 0);
        store.quarantine(&name, incomplete)?;
        store.remove_segment(id)?;
        report.quarantined.push(name);
    }
    Ok(())
}
