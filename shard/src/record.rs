//! WAL record payloads. The type byte of the frame says which struct the payload is; payloads
//! are postcard. Field order is part of the on-disk format: add new record types, never change
//! an existing one.

use fabric_proto::{codec, Body, ProtoError, Target};
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
    Checkpoint = 6,
    /// A peer with an ed25519 public key (and maybe a token): [`PeerKeyRec`].
    PeerKeyAdded = 7,
    /// A checkpoint that can hold public keys: [`CheckpointV2Rec`]. Written instead of
    /// `Checkpoint` once some peer of the shard has a key or no token.
    CheckpointV2 = 8,
}

impl RecordType {
    pub fn from_u8(b: u8) -> Option<RecordType> {
        Some(match b {
            1 => RecordType::MeshCreated,
            2 => RecordType::PeerAdded,
            3 => RecordType::Sent,
            4 => RecordType::Appended,
            5 => RecordType::Acked,
            6 => RecordType::Checkpoint,
            7 => RecordType::PeerKeyAdded,
            8 => RecordType::CheckpointV2,
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckedRec {
    pub mesh: Arc<str>,
    pub peer: Arc<str>,
    pub upto: u64,
}

/// Everything a shard must remember that is not in a retained data record: written before the
/// oldest segment is deleted, so the deletion loses no metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CheckpointRec {
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
    pub token_hash: [u8; 32],
    pub acked: u64,
}

/// [`CheckpointRec`] with peers that may have a public key and no token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CheckpointV2Rec {
    pub meshes: Vec<MeshCheckpointV2>,
    pub convs: Vec<ConvCheckpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshCheckpointV2 {
    pub mesh: Arc<str>,
    pub head: u64,
    pub peers: Vec<PeerCheckpointV2>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCheckpointV2 {
    pub peer: Arc<str>,
    pub groups: Vec<Arc<str>>,
    pub token_hash: Option<[u8; 32]>,
    pub public_key: Option<[u8; 32]>,
    pub acked: u64,
}

impl CheckpointV2Rec {
    /// The same checkpoint in the old format, if no peer needs the new fields.
    pub fn to_v1(&self) -> Option<CheckpointRec> {
        let mut meshes = Vec::with_capacity(self.meshes.len());
        for m in &self.meshes {
            let mut peers = Vec::with_capacity(m.peers.len());
            for p in &m.peers {
                match (p.token_hash, p.public_key) {
                    (Some(token_hash), None) => peers.push(PeerCheckpoint {
                        peer: p.peer.clone(),
                        groups: p.groups.clone(),
                        token_hash,
                        acked: p.acked,
                    }),
                    _ => return None,
                }
            }
            meshes.push(MeshCheckpoint {
                mesh: m.mesh.clone(),
                head: m.head,
                peers,
            });
        }
        Some(CheckpointRec {
            meshes,
            convs: self.convs.clone(),
        })
    }
}

impl From<CheckpointRec> for CheckpointV2Rec {
    fn from(c: CheckpointRec) -> CheckpointV2Rec {
        CheckpointV2Rec {
            meshes: c
                .meshes
                .into_iter()
                .map(|m| MeshCheckpointV2 {
                    mesh: m.mesh,
                    head: m.head,
                    peers: m
                        .peers
                        .into_iter()
                        .map(|p| PeerCheckpointV2 {
                            peer: p.peer,
                            groups: p.groups,
                            token_hash: Some(p.token_hash),
                            public_key: None,
                            acked: p.acked,
                        })
                        .collect(),
                })
                .collect(),
            convs: c.convs,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvCheckpoint {
    pub mesh: Arc<str>,
    pub conv: Arc<str>,
    pub head: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    MeshCreated(MeshRec),
    PeerAdded(PeerRec),
    Sent(SentRec),
    Appended(AppendedRec),
    Acked(AckedRec),
    Checkpoint(CheckpointRec),
    PeerKeyAdded(PeerKeyRec),
    CheckpointV2(CheckpointV2Rec),
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
            Record::Checkpoint(r) => put(r, out),
            Record::PeerKeyAdded(r) => put(r, out),
            Record::CheckpointV2(r) => put(r, out),
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
            Record::Checkpoint(_) => RecordType::Checkpoint,
            Record::PeerKeyAdded(_) => RecordType::PeerKeyAdded,
            Record::CheckpointV2(_) => RecordType::CheckpointV2,
        }
    }

    pub fn decode(kind: RecordType, bytes: &[u8]) -> Result<Record, ProtoError> {
        Ok(match kind {
            RecordType::MeshCreated => Record::MeshCreated(codec::from_binary(bytes)?),
            RecordType::PeerAdded => Record::PeerAdded(codec::from_binary(bytes)?),
            RecordType::Sent => Record::Sent(codec::from_binary(bytes)?),
            RecordType::Appended => Record::Appended(codec::from_binary(bytes)?),
            RecordType::Acked => Record::Acked(codec::from_binary(bytes)?),
            RecordType::Checkpoint => Record::Checkpoint(codec::from_binary(bytes)?),
            RecordType::PeerKeyAdded => Record::PeerKeyAdded(codec::from_binary(bytes)?),
            RecordType::CheckpointV2 => Record::CheckpointV2(codec::from_binary(bytes)?),
        })
    }
}
