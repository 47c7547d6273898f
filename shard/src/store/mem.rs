//! An in-memory [`SegmentStore`] for tests (redb's in-memory backend, TigerBeetle's test
//! storage): files whose bytes are volatile until synced, directory entries volatile until the
//! directory is synced, a `crash()` that keeps exactly what was made durable, and injected
//! failures. Deterministic: nothing here is random (the simulator has a richer disk).

use super::{SegmentStore, StoreError, StoreErrorKind};
use crate::wal;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Default)]
struct File {
    data: Vec<u8>,
    /// `data[..durable_len]` survives a crash.
    durable_len: usize,
}

/// One shard directory in memory.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    files: BTreeMap<u64, File>,
    /// Segment names a listing shows now, and the ones that survive a crash.
    visible: BTreeSet<u64>,
    durable: BTreeSet<u64>,
    manifest: Option<Vec<u8>>,
    manifest_temp: Option<Vec<u8>>,
    /// The manifest a crash leaves (a rename is durable at the next directory sync).
    durable_manifest: Option<Vec<u8>>,
    quarantine: BTreeMap<String, Vec<u8>>,
    /// The repair marker (written and removed durably at once).
    repair: Option<Vec<u8>>,
    /// The membership file (written durably at once).
    members: Option<Vec<u8>>,
    /// The next call of the named operation fails with this kind (then the injection ends).
    fail_next: Option<(&'static str, StoreErrorKind)>,
    /// Every operation, in order (`"create 1"`, `"sync_dir"`, ...), for tests of the steps.
    pub log: Vec<String>,
}

impl MemStore {
    /// A directory with an empty manifest (as the node leaves a new shard directory).
    pub fn new(shard: u32) -> MemStore {
        let mut s = MemStore::default();
        s.manifest = Some(wal::Manifest::empty(shard).encode().to_vec());
        s.durable_manifest = s.manifest.clone();
        s
    }

    /// Makes the next call of `op` (`"append"`, `"sync"`, `"truncate"`, `"create"`, ...) fail.
    pub fn fail_next(&mut self, op: &'static str, kind: StoreErrorKind) {
        self.fail_next = Some((op, kind));
    }

    /// Power loss: unsynced bytes and unsynced directory entries are gone.
    pub fn crash(&mut self) {
        self.manifest = self.durable_manifest.clone();
        self.visible = self.durable.clone();
        let keep = &self.visible;
        self.files.retain(|id, _| keep.contains(id));
        for f in self.files.values_mut() {
            f.data.truncate(f.durable_len);
        }
    }

    /// Segment contents as a listing shows them.
    pub fn segments(&self) -> BTreeMap<u64, Vec<u8>> {
        self.visible
            .iter()
            .map(|id| (*id, self.files[id].data.clone()))
            .collect()
    }

    /// Mutable access to a segment's bytes (tests that damage a file). Damage is durable.
    pub fn segment_mut(&mut self, id: u64) -> Option<&mut Vec<u8>> {
        let f = self.files.get_mut(&id)?;
        f.durable_len = f.data.len();
        Some(&mut f.data)
    }

    /// Removes a segment durably, as a disk or an operator could.
    pub fn lose_segment(&mut self, id: u64) {
        self.files.remove(&id);
        self.visible.remove(&id);
        self.durable.remove(&id);
    }

    pub fn remove_manifest(&mut self) {
        self.manifest = None;
        self.durable_manifest = None;
    }

    pub fn manifest_bytes(&self) -> Option<&[u8]> {
        self.manifest.as_deref()
    }

    pub fn quarantined(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.quarantine
    }

    fn op(&mut self, op: &'static str, id: Option<u64>) -> Result<(), StoreError> {
        self.log.push(match id {
            Some(id) => format!("{op} {id}"),
            None => op.to_string(),
        });
        match self.fail_next {
            Some((o, kind)) if o == op => {
                self.fail_next = None;
                Err(StoreError {
                    kind,
                    op,
                    file: id.map_or_else(|| "MANIFEST".into(), wal::segment_file_name),
                    message: format!("injected {kind:?}"),
                })
            }
            _ => Ok(()),
        }
    }

    fn file(&mut self, op: &'static str, id: u64) -> Result<&mut File, StoreError> {
        if !self.visible.contains(&id) {
            return Err(StoreError {
                kind: StoreErrorKind::NotFound,
                op,
                file: wal::segment_file_name(id),
                message: "no such segment".into(),
            });
        }
        Ok(self
            .files
            .get_mut(&id)
            .expect("visible segments have files"))
    }
}

impl SegmentStore for MemStore {
    fn list_segments(&mut self) -> Result<Vec<u64>, StoreError> {
        self.op("list", None)?;
        Ok(self.visible.iter().copied().collect())
    }

    fn read_segment(&mut self, id: u64) -> Result<Vec<u8>, StoreError> {
        self.op("read", Some(id))?;
        Ok(self.file("read", id)?.data.clone())
    }

    fn read_at(&mut self, id: u64, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        self.op("read_at", Some(id))?;
        let data = &self.file("read_at", id)?.data;
        super::read_range(data, wal::segment_file_name(id), offset, len)
    }

    fn read_manifest(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        self.op("read_manifest", None)?;
        Ok(self.manifest.clone())
    }

    fn create_segment(&mut self, id: u64) -> Result<(), StoreError> {
        self.op("create", Some(id))?;
        assert!(!self.visible.contains(&id), "segment {id} created twice");
        self.files.insert(id, File::default());
        self.visible.insert(id);
        Ok(())
    }

    fn append(&mut self, id: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.op("append", Some(id))?;
        self.file("append", id)?.data.extend_from_slice(bytes);
        Ok(())
    }

    fn sync(&mut self, id: u64) -> Result<(), StoreError> {
        self.op("sync", Some(id))?;
        let f = self.file("sync", id)?;
        f.durable_len = f.data.len();
        Ok(())
    }

    fn truncate(&mut self, id: u64, len: u64) -> Result<(), StoreError> {
        self.op("truncate", Some(id))?;
        let f = self.file("truncate", id)?;
        f.data.truncate(len as usize);
        f.durable_len = f.data.len();
        Ok(())
    }

    fn remove_segment(&mut self, id: u64) -> Result<(), StoreError> {
        self.op("remove", Some(id))?;
        self.file("remove", id)?;
        self.visible.remove(&id);
        Ok(())
    }

    fn sync_dir(&mut self) -> Result<(), StoreError> {
        self.op("sync_dir", None)?;
        self.durable = self.visible.clone();
        self.durable_manifest = self.manifest.clone();
        let keep = (&self.visible, &self.durable);
        self.files
            .retain(|id, _| keep.0.contains(id) || keep.1.contains(id));
        Ok(())
    }

    fn write_manifest_temp(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.op("write_manifest_temp", None)?;
        self.manifest_temp = Some(bytes.to_vec());
        Ok(())
    }

    fn rename_manifest(&mut self) -> Result<(), StoreError> {
        self.op("rename_manifest", None)?;
        if let Some(t) = self.manifest_temp.take() {
            self.manifest = Some(t);
        }
        Ok(())
    }

    fn quarantine(&mut self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.op("quarantine", None)?;
        self.quarantine.insert(name.to_string(), bytes.to_vec());
        Ok(())
    }

    fn read_repair(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        self.op("read_repair", None)?;
        Ok(self.repair.clone())
    }

    fn write_repair(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.op("write_repair", None)?;
        self.repair = Some(bytes.to_vec());
        Ok(())
    }

    fn read_members(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        self.op("read_members", None)?;
        Ok(self.members.clone())
    }

    fn write_members(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.op("write_members", None)?;
        self.members = Some(bytes.to_vec());
        Ok(())
    }

    fn remove_repair(&mut self) -> Result<(), StoreError> {
        self.op("remove_repair", None)?;
        self.repair = None;
        Ok(())
    }

    fn segment_path(&self, id: u64) -> String {
        wal::segment_file_name(id)
    }
}
