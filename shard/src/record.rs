//! WAL record payloads. The type byte of the frame says which struct the payload is; payloads
//! are postcard. Field order is part of the on-disk format: add new record types, never change
//! an existing one (a change needs a new WAL format, `wal::FORMAT`).

use crate::raft::ConfChange;
use fabric_proto::{codec, Body, ErrorCode, ProtoError, Target};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    MeshCreated = 1,
    PeerAdded = 2,
    Sent = 3,
    Appended = 4,
    Acked = 5,
    // 6 (a format-1 checkpoint) is retired: format 2 never writes or reads it.
    /// A peer with an ed25519 public key (and maybe a token): [`PeerKeyRec`].
    PeerKeyAdded = 7,
    // 8 (a format-1 checkpoint with keys) is retired as well.
    /// One part of a checkpoint: [`CheckpointPartRec`].
    CheckpointPart = 9,
    /// A new Raft leader's first entry of its term (empty payload): committing it commits
    /// every entry before it.
    Noop = 10,
    /// A single-server membership change; the payload is [`ConfChange::encode`]'s 9 bytes.
    ConfChange = 11,
    /// A replicated shard's leader retired its segments below an LSN (a committed checkpoint
    /// covers them): [`RetiredRec`]. Followers retire theirs when they apply it.
    Retired = 12,
}

impl RecordType {
    pub fn from_u8(b: u8) -> Option<RecordType> {
        Some(match b {
            1 => RecordType::MeshCreated,
            2 => RecordType::PeerAdded,
            3 => RecordType::Sent,
            4 => RecordType::Appended,
            5 => RecordType::Acked,
            7 => RecordType::PeerKeyAdded,
            9 => RecordType::CheckpointPart,
            10 => RecordType::Noop,
            11 => RecordType::ConfChange,
            12 => RecordType::Retired,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshRec {
    pub mesh: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRec {
    pub mesh: Arc<str>,
    pub peer: Arc<str>,
    pub groups: Vec<Arc<str>>,
    pub token_hash: [u8; 32],
}

/// A peer added with a public key. Token-only peers keep using [`PeerRec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerKeyRec {
    pub mesh: Arc<str>,
    pub peer: Arc<str>,
    pub groups: Vec<Arc<str>>,
    pub token_hash: Option<[u8; 32]>,
    pub public_key: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentRec {
    pub mesh: Arc<str>,
    pub pos: u64,
    pub from: Arc<str>,
    pub to: Target,
    pub body: Body,
    pub ts: u64,
    /// The send's idempotency key (scoped to `from`); a copy forward keeps it.
    pub key: Option<Arc<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendedRec {
    pub mesh: Arc<str>,
    pub conv: Arc<str>,
    pub seq: u64,
    pub from: Arc<str>,
    pub body: Body,
    pub key: Option<Arc<str>>,
    pub ts: u64,
}

/// The leading fields of an [`AppendedRec`], borrowed from its payload: enough for a disk
/// read to pass over other conversations' entries without decoding their bodies.
#[derive(Debug, Deserialize)]
pub(crate) struct AppendedHead<'a> {
    pub(crate) mesh: &'a str,
    pub(crate) conv: &'a str,
    pub(crate) seq: u64,
}

/// The leading fields of a [`SentRec`], borrowed (see [`AppendedHead`]).
#[derive(Debug, Deserialize)]
pub(crate) struct SentHead<'a> {
    pub(crate) mesh: &'a str,
    pub(crate) pos: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckedRec {
    pub mesh: Arc<str>,
    pub peer: Arc<str>,
    pub upto: u64,
}

/// One part of a checkpoint: everything a shard must remember that is not in a retained data
/// record, written before the oldest segment is deleted, so the deletion loses no metadata. A
/// checkpoint is split into parts of at most `CHECKPOINT_PART_BYTES_MAX` (a mesh with many
/// peers may appear in several parts, each with some of its peers); the segment is deleted only
/// once the last part is durable. Applying parts is idempotent (heads and cursors take the
/// maximum), so a checkpoint cut short by a crash is harmless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CheckpointPartRec {
    /// 0-based index of this part, and how many parts the checkpoint has.
    pub part: u32,
    pub parts: u32,
    pub meshes: Vec<MeshCheckpoint>,
    pub convs: Vec<ConvCheckpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshCheckpoint {
    pub mesh: Arc<str>,
    pub head: u64,
    pub peers: Vec<PeerCheckpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCheckpoint {
    pub peer: Arc<str>,
    pub groups: Vec<Arc<str>>,
    pub token_hash: Option<[u8; 32]>,
    pub public_key: Option<[u8; 32]>,
    pub acked: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvCheckpoint {
    pub mesh: Arc<str>,
    pub conv: Arc<str>,
    pub head: u64,
}

/// Segments whose records are all below `below` are retired: a committed checkpoint (and the
/// copies forward before it) hold everything they held that is still needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredRec {
    pub below: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    MeshCreated(MeshRec),
    PeerAdded(PeerRec),
    Sent(SentRec),
    Appended(AppendedRec),
    Acked(AckedRec),
    PeerKeyAdded(PeerKeyRec),
    CheckpointPart(CheckpointPartRec),
    Noop,
    ConfChange(ConfChange),
    Retired(RetiredRec),
}

impl Record {
    /// Appends the record's payload (postcard) to `out` and returns its type.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> RecordType {
        use fabric_proto::codec::to_binary_into as put;
        match self {
            Record::MeshCreated(r) => put(r, out),
            Record::PeerAdded(r) => put(r, out),
            Record::Sent(r) => put(r, out),
            Record::Appended(r) => put(r, out),
            Record::Acked(r) => put(r, out),
            Record::PeerKeyAdded(r) => put(r, out),
            Record::CheckpointPart(r) => put(r, out),
            Record::Noop => {}
            Record::ConfChange(cc) => out.extend_from_slice(&cc.encode()),
            Record::Retired(r) => put(r, out),
        }
        self.kind()
    }

    pub fn kind(&self) -> RecordType {
        match self {
            Record::MeshCreated(_) => RecordType::MeshCreated,
            Record::PeerAdded(_) => RecordType::PeerAdded,
            Record::Sent(_) => RecordType::Sent,
            Record::Appended(_) => RecordType::Appended,
            Record::Acked(_) => RecordType::Acked,
            Record::PeerKeyAdded(_) => RecordType::PeerKeyAdded,
            Record::CheckpointPart(_) => RecordType::CheckpointPart,
            Record::Noop => RecordType::Noop,
            Record::ConfChange(_) => RecordType::ConfChange,
            Record::Retired(_) => RecordType::Retired,
        }
    }

    pub fn decode(kind: RecordType, bytes: &[u8]) -> Result<Record, ProtoError> {
        Ok(match kind {
            RecordType::MeshCreated => Record::MeshCreated(codec::from_binary(bytes)?),
            RecordType::PeerAdded => Record::PeerAdded(codec::from_binary(bytes)?),
            RecordType::Sent => Record::Sent(codec::from_binary(bytes)?),
            RecordType::Appended => Record::Appended(codec::from_binary(bytes)?),
            RecordType::Acked => Record::Acked(codec::from_binary(bytes)?),
            RecordType::PeerKeyAdded => Record::PeerKeyAdded(codec::from_binary(bytes)?),
            RecordType::CheckpointPart => Record::CheckpointPart(codec::from_binary(bytes)?),
            RecordType::Noop if bytes.is_empty() => Record::Noop,
            RecordType::ConfChange => match ConfChange::decode(bytes) {
                Some(cc) => Record::ConfChange(cc),
                None => return Err(malformed(kind, bytes)),
            },
            RecordType::Noop => return Err(malformed(kind, bytes)),
            RecordType::Retired => Record::Retired(codec::from_binary(bytes)?),
        })
    }
}

impl Record {
    /// Whether `bytes` decode as a `kind` record, exactly as [`Record::decode`] would
    /// decide, without building it: the two types every write carries (`Appended`, `Sent`)
    /// are checked through views that borrow their strings and body from `bytes`, so a
    /// follower checking a leader's entries copies nothing (it decodes each once more when it
    /// applies it).
    pub fn decodes(kind: RecordType, bytes: &[u8]) -> bool {
        match kind {
            RecordType::Appended => codec::from_binary::<AppendedView>(bytes).is_ok(),
            RecordType::Sent => codec::from_binary::<SentView>(bytes).is_ok(),
            _ => Record::decode(kind, bytes).is_ok(),
        }
    }
}

/// [`AppendedRec`]'s fields in its order, borrowed (postcard is positional: the same bytes
/// decode to both or to neither).
#[derive(Deserialize)]
#[allow(dead_code)] // Read only to check the bytes.
struct AppendedView<'a> {
    mesh: &'a str,
    conv: &'a str,
    seq: u64,
    from: &'a str,
    body: &'a [u8],
    #[serde(borrow)]
    key: Option<&'a str>,
    ts: u64,
}

/// [`SentRec`]'s fields in its order, borrowed but for the target (its ids are validated
/// as they decode).
#[derive(Deserialize)]
#[allow(dead_code)] // Read only to check the bytes.
struct SentView<'a> {
    mesh: &'a str,
    pos: u64,
    from: &'a str,
    to: Target,
    body: &'a [u8],
    ts: u64,
    #[serde(borrow)]
    key: Option<&'a str>,
}

fn malformed(kind: RecordType, bytes: &[u8]) -> ProtoError {
    ProtoError::new(
        ErrorCode::BadRequest,
        format!(
            "a {kind:?} record with a malformed {}-byte payload",
            bytes.len()
        ),
    )
}
