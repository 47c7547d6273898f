//! WAL files: [`FileStore`], the shard directory as `fabric_shard::store::SegmentStore`
//! implements it with real files, and the writer thread that performs each `WalWrite`. The
//! order of the file steps (create, manifest, append, fdatasync, cut back after a failure,
//! delete) and what recovery reads, cuts and quarantines are decided in
//! `fabric_shard::store`, shared with the simulator; this module only does the syscalls.

use crate::config::Durability;
use crossbeam_channel::Receiver;
use fabric_router::host::{Core, RecoverJob, WriteJob};
use fabric_shard::store::{self, SegmentStore, StoreError, StoreErrorKind, WriteFailure};
use fabric_shard::{wal, RecoverError, RecoveryReport};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Makes a directory entry change (create, rename) durable.
pub fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))
}

/// Files the node writes hold data of its tenants: only the node's user may read them.
const FILE_MODE: u32 = 0o600;

fn open_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(FILE_MODE);
    }
    o
}

fn file_err(e: crate::files::FileError) -> StoreError {
    store_err(e.op, &e.path.clone(), e.source)
}

/// Creates `dir` (mode 0700, each missing level) and makes its entry durable in its parent.
fn create_private_dir(dir: &Path) -> Result<(), StorageError> {
    crate::files::create_dir_private(dir).map_err(|e| StorageError::Store(file_err(e)))
}

/// Prepares the shard directories of a new data directory: each created with an empty
/// manifest, durably, before the node records its placement (so a data directory with a
/// placement always has every shard's manifest, and a missing one means it was emptied).
/// A directory that already holds segments is left alone (recovery judges it).
pub fn init_shard_dirs(data_dir: &Path, shards: u32) -> Result<(), StorageError> {
    for i in 0..shards {
        init_shard_dir(&shard_dir(data_dir, i), i)?;
    }
    Ok(())
}

/// Shard `i`'s directory `dir` and the empty manifest of a new one (a directory with segments
/// or a manifest is left as it is: recovery checks it).
pub fn init_shard_dir(dir: &Path, i: u32) -> Result<(), StorageError> {
    create_private_dir(dir)?;
    let mut s = FileStore::new(dir);
    if s.read_manifest()?.is_none() && s.list_segments()?.is_empty() {
        store::init(&mut s, i)?;
    }
    Ok(())
}

/// A small file's bytes, or `None` if it does not exist (the manifest, the markers).
fn read_if_present(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(store_err("read", path, e)),
    }
}

/// Where shard `i` keeps its WAL.
pub fn shard_dir(data_dir: &Path, i: u32) -> PathBuf {
    data_dir.join(format!("shard-{i:03}"))
}

/// A shard directory as a `SegmentStore`: segment files, `MANIFEST`, `quarantine/`.
pub struct FileStore {
    dir: PathBuf,
    /// Segments open for appending (the newest, mostly).
    open: HashMap<u64, File>,
    durability: Durability,
    /// Time spent in data syncs since the last `take_sync_time` (the fsync histogram).
    sync_time: Duration,
}

fn store_err(op: &'static str, file: &Path, e: std::io::Error) -> StoreError {
    let kind = match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreErrorKind::NoSpace,
        _ if e.kind() == std::io::ErrorKind::NotFound => StoreErrorKind::NotFound,
        _ if e.kind() == std::io::ErrorKind::StorageFull => StoreErrorKind::NoSpace,
        _ => StoreErrorKind::Io,
    };
    StoreError {
        kind,
        op,
        file: file.display().to_string(),
        message: e.to_string(),
    }
}

impl FileStore {
    /// The store of shard directory `dir` (nothing is opened until a step needs it).
    pub fn new(dir: &Path) -> FileStore {
        FileStore {
            dir: dir.to_path_buf(),
            open: HashMap::new(),
            durability: Durability::Fsync,
            sync_time: Duration::ZERO,
        }
    }

    /// `Durability::None` skips the data syncs of appends (benchmark comparisons only); the
    /// syncs that order the directory and manifest steps are kept.
    pub fn with_durability(mut self, durability: Durability) -> FileStore {
        self.durability = durability;
        self
    }

    /// Time spent in fdatasync since the last call.
    pub fn take_sync_time(&mut self) -> Duration {
        std::mem::take(&mut self.sync_time)
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(wal::segment_file_name(id))
    }

    fn handle(&mut self, op: &'static str, id: u64) -> Result<&mut File, StoreError> {
        if !self.open.contains_key(&id) {
            let path = self.path(id);
            let f = open_options()
                .read(true)
                .append(true)
                .open(&path)
                .map_err(|e| store_err(op, &path, e))?;
            self.open.insert(id, f);
        }
        Ok(self.open.get_mut(&id).expect("just opened"))
    }
}

impl SegmentStore for FileStore {
    fn list_segments(&mut self) -> Result<Vec<u64>, StoreError> {
        let dir = self.dir.clone();
        let mut ids = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| store_err("list", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| store_err("list", &dir, e))?;
            let name = entry.file_name();
            match name.to_str().and_then(wal::parse_segment_file_name) {
                Some(id) => ids.push(id),
                None => {
                    let known = [
                        wal::MANIFEST_FILE,
                        wal::MANIFEST_TEMP_FILE,
                        wal::QUARANTINE_DIR,
                    ];
                    if !name.to_str().is_some_and(|n| known.contains(&n)) {
                        tracing::warn!(file = ?name, "ignoring a file that is not a WAL segment");
                    }
                }
            }
        }
        Ok(ids)
    }

    fn read_segment(&mut self, id: u64) -> Result<Vec<u8>, StoreError> {
        let path = self.path(id);
        std::fs::read(&path).map_err(|e| store_err("read", &path, e))
    }

    /// `pread` (no mmap: a file cut back under a reader is `ShortRead`, never SIGBUS).
    fn read_at(&mut self, id: u64, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        use std::os::unix::fs::FileExt;
        let path = self.path(id);
        let file = std::fs::File::open(&path).map_err(|e| store_err("read_at", &path, e))?;
        let mut bytes = vec![0; len];
        match file.read_exact_at(&mut bytes, offset) {
            Ok(()) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(StoreError {
                kind: StoreErrorKind::ShortRead,
                op: "read_at",
                file: path.display().to_string(),
                message: format!("{len} bytes at offset {offset} are past the end"),
            }),
            Err(e) => Err(store_err("read_at", &path, e)),
        }
    }

    fn read_manifest(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        read_if_present(&self.dir.join(wal::MANIFEST_FILE))
    }

    fn create_segment(&mut self, id: u64) -> Result<(), StoreError> {
        let path = self.path(id);
        let f = open_options()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| store_err("create", &path, e))?;
        self.open.insert(id, f);
        Ok(())
    }

    fn append(&mut self, id: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.path(id);
        self.handle("write", id)?
            .write_all(bytes)
            .map_err(|e| store_err("write", &path, e))
    }

    fn sync(&mut self, id: u64) -> Result<(), StoreError> {
        if self.durability == Durability::None {
            return Ok(());
        }
        let path = self.path(id);
        let started = Instant::now();
        let result = self
            .handle("fdatasync", id)?
            .sync_data()
            .map_err(|e| store_err("fdatasync", &path, e));
        self.sync_time += started.elapsed();
        result
    }

    fn truncate(&mut self, id: u64, len: u64) -> Result<(), StoreError> {
        let path = self.path(id);
        let f = self.handle("truncate", id)?;
        f.set_len(len)
            .map_err(|e| store_err("truncate", &path, e))?;
        f.sync_all().map_err(|e| store_err("fsync", &path, e))
    }

    fn remove_segment(&mut self, id: u64) -> Result<(), StoreError> {
        self.open.remove(&id);
        let path = self.path(id);
        std::fs::remove_file(&path).map_err(|e| store_err("delete", &path, e))
    }

    fn sync_dir(&mut self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| store_err("fsync directory", &self.dir, e))
    }

    fn write_manifest_temp(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let tmp = self.dir.join(wal::MANIFEST_TEMP_FILE);
        let mut f = open_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| store_err("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| store_err("write", &tmp, e))?;
        f.sync_all().map_err(|e| store_err("fsync", &tmp, e))
    }

    fn rename_manifest(&mut self) -> Result<(), StoreError> {
        let tmp = self.dir.join(wal::MANIFEST_TEMP_FILE);
        let path = self.dir.join(wal::MANIFEST_FILE);
        std::fs::rename(&tmp, &path).map_err(|e| store_err("rename", &path, e))
    }

    fn quarantine(&mut self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let q = self.dir.join(wal::QUARANTINE_DIR);
        crate::files::create_dir_private(&q).map_err(file_err)?;
        crate::files::write_atomic(&q.join(name), bytes, FILE_MODE).map_err(file_err)
    }

    fn read_repair(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        read_if_present(&self.dir.join(fabric_shard::repair::REPAIR_FILE))
    }

    fn write_repair(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.dir.join(fabric_shard::repair::REPAIR_FILE);
        crate::files::write_atomic(&path, bytes, FILE_MODE).map_err(file_err)
    }

    fn read_members(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        read_if_present(&self.dir.join(fabric_shard::members::MEMBERS_FILE))
    }

    fn write_members(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.dir.join(fabric_shard::members::MEMBERS_FILE);
        crate::files::write_atomic(&path, bytes, FILE_MODE).map_err(file_err)
    }

    fn remove_repair(&mut self) -> Result<(), StoreError> {
        let path = self.dir.join(fabric_shard::repair::REPAIR_FILE);
        crate::files::remove_file(&path)
            .map_err(file_err)
            .map(|_| ())
    }

    fn segment_path(&self, id: u64) -> String {
        self.path(id).display().to_string()
    }
}

/// A recovered shard with its store, ready for the writer thread.
pub struct Recovered {
    pub core: Core,
    pub report: RecoveryReport,
    pub store: FileStore,
    pub duration: Duration,
}

/// Runs the host's recovery job on shard directory `dir` (see
/// `fabric_router::host::RecoverJob`), logging what it cut or removed.
pub fn recover(
    dir: &Path,
    job: &RecoverJob,
    durability: Durability,
) -> Result<Recovered, RecoverError> {
    let started = Instant::now();
    let mut store = FileStore::new(dir).with_durability(durability);
    let (core, report) = job.perform(&mut store)?;
    if let Some(cut) = report.cut {
        tracing::warn!(
            file = %store.segment_path(cut.segment),
            offset = cut.offset,
            cut_bytes = cut.bytes,
            reason = report.cut_reason.as_deref().unwrap_or(""),
            quarantine = ?report.quarantined,
            "cut a damaged final write (never synced, nothing acknowledged in it); its bytes \
             are kept in quarantine/"
        );
    }
    if let Some(id) = report.incomplete_segment {
        tracing::warn!(
            file = %store.segment_path(id),
            "removed an incompletely created segment (kept in quarantine/)"
        );
    }
    log_repair(&store, &report);
    Ok(Recovered {
        core,
        report,
        store,
        duration: started.elapsed(),
    })
}

/// The log lines of a replica's repair (`fabric_shard::repair`).
fn log_repair(store: &FileStore, report: &RecoveryReport) {
    if let Some(cut) = &report.repair {
        tracing::error!(
            file = %store.segment_path(cut.segment),
            offset = cut.offset,
            from_lsn = cut.from_lsn,
            through_lsn = cut.through_lsn,
            removed = ?cut.removed,
            reason = %cut.reason,
            quarantine = ?report.quarantined,
            "the replica's log is damaged where no torn write can be: cut it there (the bytes \
             are kept in quarantine/); the replica starts in repair, fetches the range from the \
             leader and neither votes nor leads until it holds it"
        );
    } else if let Some(through) = report.repair_through {
        tracing::warn!(
            through_lsn = through,
            "the replica is still in repair (REPAIR marker): it neither votes nor leads until it \
             holds entries through through_lsn"
        );
    }
    if report.repair_finished {
        tracing::info!("the replica's repair is complete: REPAIR marker removed");
    }
}

/// What the writer thread reports back for each write, in order.
#[derive(Debug)]
pub struct WalDone {
    pub last_lsn: u64,
    /// How the file steps ended (a failure says whether its bytes were cut back).
    pub result: Result<(), WriteFailure>,
    /// The whole write: create, write, sync, deletions.
    pub duration: Duration,
    /// The fdatasyncs alone (zero with `durability = none`).
    pub fsync: Duration,
    pub bytes: usize,
    pub records: u64,
    /// The written buffer, handed back for the shard to reuse (`Shard::recycle_wal_buffer`).
    pub buffer: Vec<u8>,
}

/// The body of a shard's WAL thread: it owns the store, performs each write the host hands
/// it (`WriteJob::perform`: the file steps are the host's), and reports completion through
/// `done` (a blocking send into a bounded channel: at most one write is in flight, so it never
/// waits long). It ends when its channel closes: the host drops the sender when the
/// incarnation ends, and waits for this thread before it recovers the next one.
pub fn writer_thread(
    mut store: FileStore,
    writes: Receiver<WriteJob>,
    done: tokio::sync::mpsc::Sender<WalDone>,
) {
    while let Ok(job) = writes.recv() {
        let started = Instant::now();
        let result = job.perform(&mut store);
        let report = WalDone {
            last_lsn: job.write.last_lsn,
            result,
            duration: started.elapsed(),
            fsync: store.take_sync_time(),
            bytes: job.write.bytes.len(),
            records: job.write.records,
            buffer: job.into_buffer(),
        };
        if done.blocking_send(report).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
