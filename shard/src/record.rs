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
}

impl Record {
    pub fn encode(&self) -> (RecordType, Vec<u8>) {
        use crate::wal::payload;
        match self {
            Record::MeshCreated(r) => (RecordType::MeshCreated, payload(r)),
            Record::PeerAdded(r) => (RecordType::PeerAdded, payload(r)),
            Record::Sent(r) => (RecordType::Sent, payload(r)),
            Record::Appended(r) => (RecordType::Appended, payload(r)),
            Record::Acked(r) => (RecordType::Acked, payload(r)),
            Record::Checkpoint(r) => (RecordType::Checkpoint, payload(r)),
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
        })
    }
}
