//! Durable file and directory changes: every file the node writes goes temp file, fsync,
//! rename, directory fsync (BRIEF principle 4), so after a crash or power loss it is either
//! wholly there (old or new) or not at all, never empty or half-written.
//!
//! API (all paths are full paths; `mode` is the Unix permission bits, ignored elsewhere):
//! - [`write_atomic`]: replace (or create) a file with `bytes`;
//! - [`write_new`]: create a file with `bytes`, never replacing an existing one;
//! - [`create_new_file`]: create an empty file for appending and make its directory entry durable;
//! - [`remove_file`]: unlink a file and make that durable;
//! - [`create_dir_private`]: create a directory (and missing parents) with mode 0700 and make the
//!   new entries durable;
//! - [`sync_dir`]: fsync a directory (makes creates, renames and unlinks in it durable).
//!
//! Each has a `*_with` twin taking a [`FileOps`], the file-system steps it is made of, so that
//! tests can fail or record any step ([`Faulty`]) and prove the order: data synced before the
//! rename, directory synced after it, and a failed step never leaves a partial file in place of
//! the target.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Mode of secrets (admin token, private keys).
pub const MODE_SECRET: u32 = 0o600;
/// Mode of files anyone on the host may read (metadata, certificates).
pub const MODE_PUBLIC: u32 = 0o644;
/// Mode of directories the node creates.
pub const MODE_DIR_PRIVATE: u32 = 0o700;

/// One failed step: what was being done, to which path.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {path}: {source}")]
pub struct FileError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    pub fn kind(&self) -> std::io::ErrorKind {
        self.source.kind()
    }
}

/// The steps a durable change is made of, in the order [`Faulty`] records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    CreateFile,
    Write,
    SyncFile,
    Rename,
    Link,
    Remove,
    SyncDir,
    CreateDir,
}

/// The file-system calls behind this module. [`Os`] is the real one.
pub trait FileOps {
    /// Creates `path`, failing if it exists, with permissions `mode`.
    fn create_new(&mut self, path: &Path, mode: u32) -> std::io::Result<File>;
    fn write_all(&mut self, file: &mut File, bytes: &[u8]) -> std::io::Result<()>;
    /// `fsync` of a file's data and metadata.
    fn sync_file(&mut self, file: &File) -> std::io::Result<()>;
    /// Atomically replaces `to` with `from`.
    fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()>;
    /// Makes `to` a second name of `from`; fails if `to` exists (an atomic create-if-absent).
    fn hard_link(&mut self, from: &Path, to: &Path) -> std::io::Result<()>;
    fn remove(&mut self, path: &Path) -> std::io::Result<()>;
    fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()>;
    /// Creates one directory (its parent exists) with permissions `mode`.
    fn create_dir(&mut self, path: &Path, mode: u32) -> std::io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct Os;

impl FileOps for Os {
    fn create_new(&mut self, path: &Path, mode: u32) -> std::io::Result<File> {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // The mode applies from creation: a secret is never readable by others, not even
            // for an instant (the umask can only narrow it).
            opts.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        opts.open(path)
    }

    fn write_all(&mut self, file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
        file.write_all(bytes)
    }

    fn sync_file(&mut self, file: &File) -> std::io::Result<()> {
        file.sync_all()
    }

    fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }

    fn hard_link(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::hard_link(from, to)
    }

    fn remove(&mut self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn create_dir(&mut self, path: &Path, mode: u32) -> std::io::Result<()> {
        let mut b = std::fs::DirBuilder::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        b.create(path)
    }
}

/// Wraps a [`FileOps`], records every step, and fails the `n`th occurrence (0-based) of one
/// step with an I/O error, for fault-injection tests.
#[derive(Debug)]
pub struct Faulty<O: FileOps> {
    pub inner: O,
    pub steps: Vec<Step>,
    pub fail: Option<(Step, usize)>,
}

impl<O: FileOps> Faulty<O> {
    pub fn new(inner: O, fail: Option<(Step, usize)>) -> Faulty<O> {
        Faulty {
            inner,
            steps: Vec::new(),
            fail,
        }
    }

    fn step(&mut self, s: Step) -> std::io::Result<()> {
        let seen = self.steps.iter().filter(|x| **x == s).count();
        self.steps.push(s);
        match self.fail {
            Some((f, n)) if f == s && n == seen => Err(std::io::Error::other(format!(
                "injected failure of {s:?} #{n}"
            ))),
            _ => Ok(()),
        }
    }
}

impl<O: FileOps> FileOps for Faulty<O> {
    fn create_new(&mut self, path: &Path, mode: u32) -> std::io::Result<File> {
        self.step(Step::CreateFile)?;
        self.inner.create_new(path, mode)
    }
    fn write_all(&mut self, file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
        self.step(Step::Write)?;
        self.inner.write_all(file, bytes)
    }
    fn sync_file(&mut self, file: &File) -> std::io::Result<()> {
        self.step(Step::SyncFile)?;
        self.inner.sync_file(file)
    }
    fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.step(Step::Rename)?;
        self.inner.rename(from, to)
    }
    fn hard_link(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.step(Step::Link)?;
        self.inner.hard_link(from, to)
    }
    fn remove(&mut self, path: &Path) -> std::io::Result<()> {
        self.step(Step::Remove)?;
        self.inner.remove(path)
    }
    fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()> {
        self.step(Step::SyncDir)?;
        self.inner.sync_dir(dir)
    }
    fn create_dir(&mut self, path: &Path, mode: u32) -> std::io::Result<()> {
        self.step(Step::CreateDir)?;
        self.inner.create_dir(path, mode)
    }
}

fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The temp file next to `path`: hidden, in the same directory (a rename never crosses file
/// systems). One fixed name per target, so a temp left by a crash is replaced, not piled up.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_dir(path).join(format!(".{name}.tmp"))
}

/// Writes `bytes` to a fresh temp file with `mode` and syncs it; removes it on failure.
fn write_temp<O: FileOps>(
    ops: &mut O,
    tmp: &Path,
    bytes: &[u8],
    mode: u32,
) -> Result<(), FileError> {
    // A temp left by a crash may have another mode: never reuse it.
    match ops.remove(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("remove stale temp file", tmp)(e)),
    }
    let mut f = ops
        .create_new(tmp, mode)
        .map_err(err("create temp file", tmp))?;
    let written = ops
        .write_all(&mut f, bytes)
        .map_err(err("write", tmp))
        .and_then(|()| ops.sync_file(&f).map_err(err("fsync", tmp)));
    drop(f);
    if written.is_err() {
        let _ = ops.remove(tmp);
    }
    written
}

/// Replaces (or creates) `path` with `bytes`, durably and atomically: a temp file in the same
/// directory created with `mode`, written, fsynced, renamed over `path`, then the directory
/// fsynced. A crash at any point leaves the old file or the new one, never a partial one; on
/// an error before the rename the old file is untouched and the temp file is removed.
/// Not for concurrent writers of one path (they share the temp name).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    write_atomic_with(&mut Os, path, bytes, mode)
}

pub fn write_atomic_with<O: FileOps>(
    ops: &mut O,
    path: &Path,
    bytes: &[u8],
    mode: u32,
) -> Result<(), FileError> {
    let tmp = temp_path(path);
    write_temp(ops, &tmp, bytes, mode)?;
    if let Err(e) = ops.rename(&tmp, path) {
        let _ = ops.remove(&tmp);
        return Err(err("rename temp file onto", path)(e));
    }
    sync_dir_with(ops, parent_dir(path))
}

/// Creates `path` with `bytes` and `mode`, durably, failing with `AlreadyExists` (and changing
/// nothing) if it exists: the temp file is linked to `path` (an atomic create-if-absent), then
/// unlinked, then the directory fsynced.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    write_new_with(&mut Os, path, bytes, mode)
}

pub fn write_new_with<O: FileOps>(
    ops: &mut O,
    path: &Path,
    bytes: &[u8],
    mode: u32,
) -> Result<(), FileError> {
    let tmp = temp_path(path);
    write_temp(ops, &tmp, bytes, mode)?;
    let linked = ops.hard_link(&tmp, path).map_err(err("create", path));
    let _ = ops.remove(&tmp);
    linked?;
    sync_dir_with(ops, parent_dir(path))
}

/// Creates an empty file for appending (failing if it exists) and fsyncs its directory, so the
/// file's entry survives a crash before anything written to it is acknowledged.
pub fn create_new_file(path: &Path, mode: u32) -> Result<File, FileError> {
    create_new_file_with(&mut Os, path, mode)
}

pub fn create_new_file_with<O: FileOps>(
    ops: &mut O,
    path: &Path,
    mode: u32,
) -> Result<File, FileError> {
    let f = ops.create_new(path, mode).map_err(err("create", path))?;
    sync_dir_with(ops, parent_dir(path))?;
    Ok(f)
}

/// Unlinks `path` and fsyncs its directory; `Ok(false)` if it did not exist.
pub fn remove_file(path: &Path) -> Result<bool, FileError> {
    remove_file_with(&mut Os, path)
}

pub fn remove_file_with<O: FileOps>(ops: &mut O, path: &Path) -> Result<bool, FileError> {
    match ops.remove(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(err("remove", path)(e)),
    }
    sync_dir_with(ops, parent_dir(path))?;
    Ok(true)
}

/// Creates `path` and any missing parents with mode 0700, fsyncing each new directory's parent
/// so the new entries survive a crash. An existing directory is left as it is (its mode too).
pub fn create_dir_private(path: &Path) -> Result<(), FileError> {
    create_dir_private_with(&mut Os, path)
}

pub fn create_dir_private_with<O: FileOps>(ops: &mut O, path: &Path) -> Result<(), FileError> {
    let mut missing = Vec::new();
    let mut at = path;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(err("create directory", at)(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a directory is in the way",
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(at),
            Err(e) => return Err(err("inspect", at)(e)),
        }
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            // A relative path's first component: its parent is the working directory.
            _ => break,
        }
    }
    for dir in missing.into_iter().rev() {
        match ops.create_dir(dir, MODE_DIR_PRIVATE) {
            Ok(()) => {}
            // Someone else made it meanwhile: fine, it exists.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(err("create directory", dir)(e)),
        }
        sync_dir_with(ops, parent_dir(dir))?;
    }
    Ok(())
}

/// fsyncs a directory: creates, renames and unlinks in it become durable.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    sync_dir_with(&mut Os, dir)
}

pub fn sync_dir_with<O: FileOps>(ops: &mut O, dir: &Path) -> Result<(), FileError> {
    ops.sync_dir(dir).map_err(err("fsync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_atomic_syncs_the_data_before_the_rename_and_the_directory_after() {
        // Proves the order that makes a write crash-safe: temp created, written, fsynced,
        // renamed, then the directory fsynced; and the result has the asked mode.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.json");
        let mut ops = Faulty::new(Os, None);
        write_atomic_with(&mut ops, &path, b"{}", MODE_SECRET).unwrap();
        assert_eq!(
            ops.steps,
            [
                Step::Remove,
                Step::CreateFile,
                Step::Write,
                Step::SyncFile,
                Step::Rename,
                Step::SyncDir
            ]
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(entries(dir.path()), ["node.json"]);
    }

    #[test]
    fn a_failed_step_never_replaces_the_target_and_leaves_no_temp_file() {
        // Proves fault injection at every step before the rename keeps the old content and
        // removes the temp file, and the error names the failed operation.
        for step in [Step::CreateFile, Step::Write, Step::SyncFile, Step::Rename] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("cert.pem");
            std::fs::write(&path, b"old").unwrap();
            let mut ops = Faulty::new(Os, Some((step, 0)));
            let e = write_atomic_with(&mut ops, &path, b"new", MODE_PUBLIC).unwrap_err();
            assert!(e.to_string().contains("injected failure"), "{step:?}: {e}");
            assert_eq!(std::fs::read(&path).unwrap(), b"old", "{step:?}");
            assert_eq!(entries(dir.path()), ["cert.pem"], "{step:?}");
        }
        // A failed directory fsync is reported (the rename may not be durable).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let mut ops = Faulty::new(Os, Some((Step::SyncDir, 0)));
        let e = write_atomic_with(&mut ops, &path, b"new", MODE_PUBLIC).unwrap_err();
        assert_eq!(e.op, "fsync directory");
    }

    /// Records the mode each file has the moment it is created.
    struct ModeAtCreate(Vec<u32>);

    impl FileOps for ModeAtCreate {
        fn create_new(&mut self, path: &Path, mode: u32) -> std::io::Result<File> {
            let f = Os.create_new(path, mode)?;
            self.0.push(mode_of(path));
            Ok(f)
        }
        fn write_all(&mut self, file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
            Os.write_all(file, bytes)
        }
        fn sync_file(&mut self, file: &File) -> std::io::Result<()> {
            Os.sync_file(file)
        }
        fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
            Os.rename(from, to)
        }
        fn hard_link(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
            Os.hard_link(from, to)
        }
        fn remove(&mut self, path: &Path) -> std::io::Result<()> {
            Os.remove(path)
        }
        fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()> {
            Os.sync_dir(dir)
        }
        fn create_dir(&mut self, path: &Path, mode: u32) -> std::io::Result<()> {
            Os.create_dir(path, mode)
        }
    }

    #[test]
    fn a_secret_is_0600_from_the_moment_its_file_exists() {
        // Proves the mode is applied at creation (not by a later chmod), so a secret is never
        // readable by others, even between create and rename.
        let dir = tempfile::tempdir().unwrap();
        let mut ops = ModeAtCreate(Vec::new());
        write_atomic_with(&mut ops, &dir.path().join("t"), b"s", MODE_SECRET).unwrap();
        write_new_with(&mut ops, &dir.path().join("k"), b"s", MODE_SECRET).unwrap();
        assert_eq!(ops.0, [0o600, 0o600]);
    }

    #[test]
    fn a_stale_temp_file_with_a_wide_mode_is_never_reused() {
        // Proves a temp left by a crash (mode 0644, old bytes) is replaced, so a secret is
        // never written into a file others can read.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin-token");
        let tmp = temp_path(&path);
        std::fs::write(&tmp, b"stale stale stale").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"secret", MODE_SECRET).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        assert_eq!(mode_of(&path), 0o600);
        assert!(!tmp.exists());
    }

    #[test]
    fn write_new_never_replaces_an_existing_file() {
        // Proves write_new creates a file once, refuses to overwrite it, and cleans its temp.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.key");
        let mut ops = Faulty::new(Os, None);
        write_new_with(&mut ops, &path, b"one", MODE_SECRET).unwrap();
        assert_eq!(
            ops.steps,
            [
                Step::Remove,
                Step::CreateFile,
                Step::Write,
                Step::SyncFile,
                Step::Link,
                Step::Remove,
                Step::SyncDir
            ]
        );
        let e = write_new(&path, b"two", MODE_SECRET).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(entries(dir.path()), ["peer.key"]);
        // A failure before the link leaves nothing behind.
        let other = dir.path().join("other.key");
        let mut ops = Faulty::new(Os, Some((Step::SyncFile, 0)));
        assert!(write_new_with(&mut ops, &other, b"x", MODE_SECRET).is_err());
        assert_eq!(entries(dir.path()), ["peer.key"]);
    }

    #[test]
    fn create_dir_private_makes_every_missing_level_0700_and_syncs_each_parent() {
        // Proves nested creation with mode 0700 and a parent fsync after each new directory,
        // and that an existing directory is accepted unchanged.
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a").join("b");
        let mut ops = Faulty::new(Os, None);
        create_dir_private_with(&mut ops, &deep).unwrap();
        assert_eq!(
            ops.steps,
            [
                Step::CreateDir,
                Step::SyncDir,
                Step::CreateDir,
                Step::SyncDir
            ]
        );
        assert_eq!(mode_of(&dir.path().join("a")), 0o700);
        assert_eq!(mode_of(&deep), 0o700);
        let mut ops = Faulty::new(Os, None);
        create_dir_private_with(&mut ops, &deep).unwrap();
        assert!(ops.steps.is_empty(), "nothing to do: {:?}", ops.steps);
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(create_dir_private(&file).is_err());
        let mut ops = Faulty::new(Os, Some((Step::SyncDir, 0)));
        let e = create_dir_private_with(&mut ops, &dir.path().join("c")).unwrap_err();
        assert_eq!(e.op, "fsync directory");
    }

    #[test]
    fn create_new_file_and_remove_file_sync_the_directory() {
        // Proves a new file's and a removed file's directory entries are fsynced.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let mut ops = Faulty::new(Os, None);
        let f = create_new_file_with(&mut ops, &path, MODE_SECRET).unwrap();
        drop(f);
        assert_eq!(ops.steps, [Step::CreateFile, Step::SyncDir]);
        assert_eq!(mode_of(&path), 0o600);
        assert!(create_new_file(&path, MODE_SECRET).is_err(), "exists");
        let mut ops = Faulty::new(Os, None);
        assert!(remove_file_with(&mut ops, &path).unwrap());
        assert_eq!(ops.steps, [Step::Remove, Step::SyncDir]);
        assert!(!remove_file(&path).unwrap(), "already gone");
    }
}
