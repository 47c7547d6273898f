//! WAL files: recovery at start, and the writer thread that turns each `WalWrite` into one
//! `write` and one `fdatasync`. The shard core decides *what* to write; this module only does it.

use crate::config::Durability;
use crossbeam_channel::Receiver;
use fabric_shard::{wal, Recoverer, RecoveryReport, Shard, ShardConfig, WalWrite};
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
    Recover(#[from] fabric_shard::RecoverError),
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

/// A recovered shard with its open last segment.
pub struct Recovered {
    pub shard: Shard,
    pub report: RecoveryReport,
    pub open: Option<(u64, File)>,
    pub duration: Duration,
}

/// Scans every segment in `dir` oldest first, truncates a torn tail, and rebuilds the shard.
pub fn recover(dir: &Path, config: ShardConfig) -> Result<Recovered, StorageError> {
    let started = Instant::now();
    std::fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let entry = entry.map_err(io("list", dir))?;
        let name = entry.file_name();
        match name.to_str().and_then(wal::parse_segment_file_name) {
            Some(id) => ids.push(id),
            None => tracing::warn!(file = ?name, "ignoring a file that is not a WAL segment"),
        }
    }
    ids.sort_unstable();
    let mut recoverer = Recoverer::new(config);
    for (i, id) in ids.iter().enumerate() {
        let path = dir.join(wal::segment_file_name(*id));
        let bytes = std::fs::read(&path).map_err(io("read", &path))?;
        recoverer.handle_segment(*id, &path.display().to_string(), &bytes, i + 1 == ids.len())?;
    }
    let (shard, report) = recoverer.finish();
    if let Some((id, len)) = report.truncate {
        let path = dir.join(wal::segment_file_name(id));
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        f.set_len(len).map_err(io("truncate", &path))?;
        f.sync_all().map_err(io("fsync", &path))?;
        tracing::warn!(
            file = %path.display(),
            kept_bytes = len,
            cut_bytes = report.truncated_bytes,
            "truncated a torn WAL tail"
        );
    }
    let open = match ids.last() {
        Some(id) => {
            let path = dir.join(wal::segment_file_name(*id));
            let f = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(io("open", &path))?;
            // What recovery just read may exist only in the page cache (a write or fdatasync
            // that failed before a restart, or a crash of this process but not of the
            // machine). The shard now serves it as durable, so make it so before serving.
            f.sync_all().map_err(io("fsync", &path))?;
            Some((*id, f))
        }
        None => None,
    };
    sync_dir(dir)?;
    Ok(Recovered {
        shard,
        report,
        open,
        duration: started.elapsed(),
    })
}

/// What the writer thread reports back for each write, in order.
#[derive(Debug)]
pub struct WalDone {
    pub last_lsn: u64,
    pub result: Result<(), String>,
    /// The whole write: create, write and sync.
    pub sync_duration: Duration,
    /// The `fdatasync` alone (zero with `durability = none`).
    pub fsync_duration: Duration,
    pub bytes: usize,
    pub records: u64,
    /// The written buffer, handed back for the shard to reuse (`Shard::recycle_wal_buffer`).
    pub buffer: Vec<u8>,
}

/// The body of a shard's WAL thread: it owns the open segment, performs each write with one
/// `write_all` and one `fdatasync`, and reports completion through `done` (a blocking send into
/// a bounded channel: at most one write is in flight, so it never waits long).
pub fn writer_thread(
    dir: PathBuf,
    open: Option<(u64, File)>,
    durability: Durability,
    writes: Receiver<WalWrite>,
    done: tokio::sync::mpsc::Sender<WalDone>,
) {
    let (deleter, retired) = std::sync::mpsc::channel::<Vec<u64>>();
    let deleter_dir = dir.clone();
    let deleter_thread = std::thread::Builder::new()
        .name("wal-delete".into())
        .spawn(move || delete_thread(deleter_dir, retired));
    write_loop(&dir, open, durability, writes, done, &deleter);
    // The next incarnation lists segments as soon as this thread is joined: no deletion may
    // still be under way then.
    drop(deleter);
    if let Ok(t) = deleter_thread {
        let _ = t.join();
    }
}

fn write_loop(
    dir: &Path,
    mut open: Option<(u64, File)>,
    durability: Durability,
    writes: Receiver<WalWrite>,
    done: tokio::sync::mpsc::Sender<WalDone>,
    deleter: &std::sync::mpsc::Sender<Vec<u64>>,
) {
    while let Ok(mut w) = writes.recv() {
        let started = Instant::now();
        let result = apply(dir, &mut open, durability, &w);
        let delete = std::mem::take(&mut w.delete);
        let failed = result.is_err();
        let fsync_duration = *result.as_ref().unwrap_or(&Duration::ZERO);
        let report = WalDone {
            last_lsn: w.last_lsn,
            result: result.map(|_| ()).map_err(|e| e.to_string()),
            sync_duration: started.elapsed(),
            fsync_duration,
            bytes: w.bytes.len(),
            records: w.records,
            buffer: w.bytes,
        };
        if done.blocking_send(report).is_err() || failed {
            // The shard loop is gone, or storage failed: a failed fsync leaves the page cache
            // in an unknown state, so this writer stops; the shard is recovered anew.
            return;
        }
        // Deletions go to their own thread: unlinking a large segment can take long, and no
        // ack waits on it (the checkpoint that makes it safe is already durable).
        if !delete.is_empty() && deleter.send(delete).is_err() {
            return;
        }
    }
}

/// Deletes retired segments strictly oldest first; a failed one is retried (after a pause)
/// before any newer one, so the segments left on disk never have an LSN gap between them.
/// Ends when the writer thread ends.
fn delete_thread(dir: PathBuf, retired: std::sync::mpsc::Receiver<Vec<u64>>) {
    let mut queue: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
    loop {
        let next = if queue.is_empty() {
            retired.recv().map_err(|_| ())
        } else {
            match retired.recv_timeout(Duration::from_secs(1)) {
                Ok(ids) => Ok(ids),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Ok(Vec::new()),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(()),
            }
        };
        let Ok(ids) = next else { return };
        queue.extend(ids);
        while let Some(&id) = queue.front() {
            let path = dir.join(wal::segment_file_name(id));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot delete a retired WAL segment; will retry");
                    break;
                }
            }
            queue.pop_front();
        }
    }
}

fn apply(
    dir: &Path,
    open: &mut Option<(u64, File)>,
    durability: Durability,
    w: &WalWrite,
) -> Result<Duration, StorageError> {
    let mut fsync = Duration::ZERO;
    if w.create {
        let path = dir.join(wal::segment_file_name(w.segment));
        let f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io("create", &path))?;
        // The new file's directory entry must be durable before any ack depends on it.
        sync_dir(dir)?;
        *open = Some((w.segment, f));
    }
    if !w.bytes.is_empty() {
        let path = dir.join(wal::segment_file_name(w.segment));
        let (id, f) = open.as_mut().ok_or_else(|| StorageError::Io {
            op: "write",
            path: path.clone(),
            source: std::io::Error::other("no open segment"),
        })?;
        assert_eq!(*id, w.segment, "writes go to the open segment");
        f.write_all(&w.bytes).map_err(io("write", &path))?;
        if durability == Durability::Fsync {
            let started = Instant::now();
            f.sync_data().map_err(io("fdatasync", &path))?;
            fsync = started.elapsed();
        }
    }
    Ok(fsync)
}
