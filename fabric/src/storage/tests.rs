//! The file layer on real files: the steps `fabric_shard::store` orders, as `FileStore`
//! performs them, with failures injected by a wrapper.

use super::*;
use fabric_proto::internal::{Request, ShardOp};
use fabric_proto::Body;
use fabric_proto::{ConvId, MeshId, PeerId};
use fabric_shard::{PlantedBugs, Shard, ShardConfig, WalWrite};

/// A store that records every call and can fail the next call of one operation.
struct Recording {
    inner: FileStore,
    calls: Vec<String>,
    fail: Option<(&'static str, std::io::Error)>,
}

impl Recording {
    fn call(&mut self, op: &'static str, id: Option<u64>) -> Result<(), StoreError> {
        self.calls.push(match id {
            Some(id) => format!("{op} {id}"),
            None => op.to_string(),
        });
        match self.fail.take() {
            Some((o, e)) if o == op => Err(store_err(op, Path::new("injected"), e)),
            other => {
                self.fail = other;
                Ok(())
            }
        }
    }
}

impl SegmentStore for Recording {
    fn list_segments(&mut self) -> Result<Vec<u64>, StoreError> {
        self.inner.list_segments()
    }
    fn read_segment(&mut self, id: u64) -> Result<Vec<u8>, StoreError> {
        self.inner.read_segment(id)
    }
    fn read_at(&mut self, id: u64, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        self.inner.read_at(id, offset, len)
    }
    fn read_manifest(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.read_manifest()
    }
    fn create_segment(&mut self, id: u64) -> Result<(), StoreError> {
        self.call("create", Some(id))?;
        self.inner.create_segment(id)
    }
    fn append(&mut self, id: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.call("append", Some(id))?;
        self.inner.append(id, bytes)
    }
    fn sync(&mut self, id: u64) -> Result<(), StoreError> {
        self.call("sync", Some(id))?;
        self.inner.sync(id)
    }
    fn truncate(&mut self, id: u64, len: u64) -> Result<(), StoreError> {
        self.call("truncate", Some(id))?;
        self.inner.truncate(id, len)
    }
    fn remove_segment(&mut self, id: u64) -> Result<(), StoreError> {
        self.call("remove", Some(id))?;
        self.inner.remove_segment(id)
    }
    fn sync_dir(&mut self) -> Result<(), StoreError> {
        self.call("sync_dir", None)?;
        self.inner.sync_dir()
    }
    fn write_manifest_temp(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.call("manifest_temp", None)?;
        self.inner.write_manifest_temp(bytes)
    }
    fn rename_manifest(&mut self) -> Result<(), StoreError> {
        self.call("rename_manifest", None)?;
        self.inner.rename_manifest()
    }
    fn quarantine(&mut self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.inner.quarantine(name, bytes)
    }
    fn read_repair(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.read_repair()
    }
    fn write_repair(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.call("write_repair", None)?;
        self.inner.write_repair(bytes)
    }
    fn remove_repair(&mut self) -> Result<(), StoreError> {
        self.call("remove_repair", None)?;
        self.inner.remove_repair()
    }
    fn read_members(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.read_members()
    }
    fn write_members(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.call("write_members", None)?;
        self.inner.write_members(bytes)
    }
    fn segment_path(&self, id: u64) -> String {
        self.inner.segment_path(id)
    }
}

fn shard_dir_in(tmp: &tempfile::TempDir) -> PathBuf {
    init_shard_dirs(tmp.path(), 1).expect("init");
    shard_dir(tmp.path(), 0)
}

fn append(shard: &mut Shard, r: u64, body: &str) -> WalWrite {
    shard.handle_request(
        r,
        Request {
            session: 1,
            op: ShardOp::Append {
                r,
                mesh: MeshId::must("m"),
                conv: ConvId::must("c"),
                from: PeerId::must("p"),
                body: Body::from_json_text(body.to_string()).expect("json"),
                key: None,
            },
        },
    );
    shard.poll_wal().expect("a write")
}

fn done(shard: &mut Shard, w: &WalWrite) {
    shard.handle_wal_done(0, w.last_lsn);
    while shard.poll_output().is_some() {}
}

/// A fresh shard directory holding one acknowledged append.
fn one_append(tmp: &tempfile::TempDir) -> (PathBuf, FileStore, Shard) {
    let dir = shard_dir_in(tmp);
    let mut store = FileStore::new(&dir);
    let mut shard = Shard::new(ShardConfig::default());
    let w = append(&mut shard, 1, "\"acknowledged\"");
    store::perform(&mut store, &w, &PlantedBugs::default()).unwrap();
    done(&mut shard, &w);
    (dir, store, shard)
}

#[test]
fn a_segment_is_listed_and_its_name_synced_before_any_record_goes_into_it() {
    // Proves the node performs the file steps in the order recovery relies on, on real files:
    // header synced, manifest renamed in and the directory fsynced, then the frame and its
    // fdatasync; and the files are private (0600 in a 0700 directory).
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir_in(&tmp);
    let mut store = Recording {
        inner: FileStore::new(&dir),
        calls: Vec::new(),
        fail: None,
    };
    let mut shard = Shard::new(ShardConfig::default());
    let w = append(&mut shard, 1, "\"first\"");
    store::perform(&mut store, &w, &PlantedBugs::default()).expect("lands");
    assert_eq!(
        store.calls,
        [
            "create 1",
            "append 1",
            "sync 1",
            "manifest_temp",
            "rename_manifest",
            "sync_dir",
            "append 1",
            "sync 1"
        ]
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join(wal::segment_file_name(1))), 0o600);
        assert_eq!(mode(&dir.join(wal::MANIFEST_FILE)), 0o600);
        assert_eq!(mode(&dir), 0o700);
    }
    let (_, report) =
        store::recover(&mut FileStore::new(&dir), ShardConfig::default()).expect("recovers");
    assert_eq!(report.records, 1);
}

#[test]
fn a_failed_fdatasync_cuts_the_file_back_and_enospc_is_told_apart() {
    // Proves the fsyncgate rule on real files: after an injected fdatasync failure the segment
    // is truncated to what was synced before (nothing of the failed write is ever read back),
    // and ENOSPC is reported as a full disk, EIO as another failure.
    for (errno, kind) in [
        (libc::ENOSPC, StoreErrorKind::NoSpace),
        (libc::EIO, StoreErrorKind::Io),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = shard_dir_in(&tmp);
        let mut store = Recording {
            inner: FileStore::new(&dir),
            calls: Vec::new(),
            fail: None,
        };
        let mut shard = Shard::new(ShardConfig::default());
        let w = append(&mut shard, 1, "\"synced\"");
        store::perform(&mut store, &w, &PlantedBugs::default()).unwrap();
        done(&mut shard, &w);
        let synced = std::fs::metadata(dir.join(wal::segment_file_name(1)))
            .unwrap()
            .len();
        let w = append(&mut shard, 2, "\"never acknowledged\"");
        store.fail = Some(("sync", std::io::Error::from_raw_os_error(errno)));
        let failure = store::perform(&mut store, &w, &PlantedBugs::default()).unwrap_err();
        assert_eq!(failure.error.kind, kind);
        assert!(failure.cleaned);
        assert!(store
            .calls
            .ends_with(&["sync 1".into(), "truncate 1".into()]));
        let len = std::fs::metadata(dir.join(wal::segment_file_name(1)))
            .unwrap()
            .len();
        assert_eq!(len, synced, "cut back to the synced length");
    }
}

#[test]
fn a_torn_final_write_on_disk_is_quarantined_then_cut() {
    // Proves recovery on real files keeps the bytes it cuts: quarantine/ holds them (0600),
    // the segment is truncated to the last whole write, and the acknowledged write survives.
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _, mut shard) = one_append(&tmp);
    let path = dir.join(wal::segment_file_name(1));
    let good = std::fs::metadata(&path).unwrap().len();
    let torn = append(&mut shard, 2, "\"torn by a power loss\"");
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(&torn.bytes[..torn.bytes.len() / 2]).unwrap();
    drop(f);
    let recovered = recover(
        &dir,
        &RecoverJob {
            config: ShardConfig::default(),
            replica: None,
        },
        Durability::Fsync,
    )
    .unwrap();
    assert_eq!(recovered.report.records, 1);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
    let q = dir
        .join(wal::QUARANTINE_DIR)
        .join(&recovered.report.quarantined[0]);
    assert_eq!(
        std::fs::read(&q).unwrap(),
        &torn.bytes[..torn.bytes.len() / 2]
    );
}

#[test]
fn an_emptied_shard_directory_refuses_to_start() {
    // Proves a shard directory whose files were removed (MANIFEST and segments) is refused
    // instead of starting that shard empty.
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _, _) = one_append(&tmp);
    for e in std::fs::read_dir(&dir).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    match recover(
        &dir,
        &RecoverJob {
            config: ShardConfig::default(),
            replica: None,
        },
        Durability::Fsync,
    ) {
        Err(fabric_shard::RecoverError::Manifest(m)) => {
            assert!(m.contains("emptied"), "{m}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("an emptied shard directory started empty"),
    }
}

#[test]
fn a_ranged_read_returns_the_bytes_and_a_file_cut_back_under_it_is_a_short_read() {
    // Proves FileStore::read_at is a positioned read of exactly the asked range, and that a
    // range past the end (a segment cut back after a failed sync, or a wrong range) answers
    // ShortRead instead of faulting or returning fewer bytes.
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir_in(&tmp);
    let mut store = FileStore::new(&dir);
    store.create_segment(9).unwrap();
    store.append(9, b"0123456789").unwrap();
    store.sync(9).unwrap();
    assert_eq!(store.read_at(9, 3, 4).unwrap(), b"3456");
    assert_eq!(store.read_at(9, 10, 0).unwrap(), b"");
    store.truncate(9, 5).unwrap();
    let e = store.read_at(9, 3, 4).unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::ShortRead, "{e}");
    assert_eq!(
        store.read_at(8, 0, 1).unwrap_err().kind,
        StoreErrorKind::NotFound
    );
}
