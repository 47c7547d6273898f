//! Raft entries and WAL records are one thing in two shapes: an entry's index and term are the
//! record's LSN and term, and its data is the record's type byte and payload (a no-op is an
//! empty `Noop` record, a membership change a `ConfChange` record of its 9 bytes). So the WAL
//! is the Raft log, and a follower writes exactly the bytes its leader wrote, record by record.

use crate::raft::{ConfChange, Entry, EntryKind};
use crate::record::{Record, RecordType};
use crate::wal;

/// The record type byte and payload an entry is written as.
pub(crate) fn record_parts(entry: &Entry) -> (u8, &[u8]) {
    match entry.kind {
        EntryKind::Normal => (entry.data[0], &entry.data[1..]),
        EntryKind::Noop => (RecordType::Noop as u8, &[]),
        EntryKind::ConfChange => (RecordType::ConfChange as u8, &entry.data),
    }
}

/// An entry from a peer is written only if it is a record this node could recover: a known
/// type that decodes (a `Normal` entry is never one of Raft's own types). Checked before the
/// Raft core sees the message, so a malformed entry never reaches the log.
pub(crate) fn entry_is_valid(entry: &Entry) -> bool {
    match entry.kind {
        EntryKind::Noop => entry.data.is_empty(),
        EntryKind::ConfChange => ConfChange::decode(&entry.data).is_some(),
        EntryKind::Normal => {
            let Some((&kind, payload)) = entry.data.split_first() else {
                return false;
            };
            let raft_own = [RecordType::Noop as u8, RecordType::ConfChange as u8];
            payload.len() <= wal::RECORD_BYTES_MAX
                && !raft_own.contains(&kind)
                && RecordType::from_u8(kind).is_some_and(|k| Record::decodes(k, payload))
        }
    }
}

/// The entry a record read back from the WAL is (for a leader's log reads).
pub(crate) fn entry_of(lsn: u64, term: u64, record: &Record) -> Entry {
    let (kind, data) = match record {
        Record::Noop => (EntryKind::Noop, Vec::new()),
        Record::ConfChange(cc) => (EntryKind::ConfChange, cc.encode()),
        other => {
            let mut data = vec![0];
            data[0] = other.encode_into(&mut data) as u8;
            (EntryKind::Normal, data)
        }
    };
    Entry {
        index: lsn,
        term,
        kind,
        data,
    }
}

/// A leader's entry data for a record it framed: the type byte and the payload, taken from
/// the framed bytes (`framed` starts at the record's header).
pub(crate) fn entry_data(framed: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(1 + framed.len() - wal::RECORD_HEADER_BYTES);
    data.push(framed[8]);
    data.extend_from_slice(&framed[wal::RECORD_HEADER_BYTES..]);
    data
}

/// The record a committed entry describes (entries were checked when they arrived, and a
/// leader's own data is what it framed).
pub(crate) fn record_of(kind: u8, payload: &[u8]) -> Option<Record> {
    Record::decode(RecordType::from_u8(kind)?, payload).ok()
}
