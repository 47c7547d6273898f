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

use crate::recovery::{RecoveredLog, Recoverer};
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
pub fn recover_replica_log<S: SegmentStore>(
    store: &mut S,
    config: ShardConfig,
    window: usize,
) -> Result<(Shard, RecoveryReport, RecoveredLog), RecoverError> {
    let planted = config.planted;
    recover_log(store, config, &planted, Some(window))
}

fn recover_log<S: SegmentStore>(
    store: &mut S,
    config: ShardConfig,
    planted: &PlantedBugs,
    replica_window: Option<usize>,
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
    let mut ids = store.list_segments()?;
    ids.sort_unstable();
    let (retired, listed, unlisted) = classify(&manifest, &ids)?;
    let mut r = match replica_window {
        None => Recoverer::new(config),
        Some(window) => Recoverer::replica(config, manifest.commit, window),
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
    let mut incomplete = Vec::new();
    if let Some(id) = unlisted {
        incomplete = store.read_segment(id)?;
        r.handle_unlisted(id, &store.segment_path(id), &incomplete)?;
    }
    let (shard, mut report, log) = r.finish_replica(manifest);
    carry_out(store, &mut report, &newest_bytes, &incomplete)?;
    if !planted.no_sync_after_recovery {
        for id in &listed {
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
type Classified = (Vec<u64>, Vec<u64>, Option<u64>);

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
    let expected_next = m.newest + 1;
    match newer.as_slice() {
        [] => Ok((retired, listed, None)),
        [id] if *id == expected_next => Ok((retired, listed, Some(*id))),
        _ => Err(RecoverError::Manifest(format!(
            "segments {newer:?} are newer than MANIFEST's newest ({}); only one incompletely \
             created segment ({expected_next}) can be",
            m.newest
        ))),
    }
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
